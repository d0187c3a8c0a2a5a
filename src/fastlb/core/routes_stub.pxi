# core/routes_stub.pxi - STUB of route_select() (INTERFACES.md §1, owned by `routes`) so the prelude
# code can call it before the routes branch lands.  Delete this file (and its include in _core.pyx)
# when core/routes.pxi arrives.


cdef uint32_t route_select(Conn *c, const char *sni, uint32_t sni_len) noexcept nogil:
    """STUB: every connection goes to its listener's pool.  Sets c.pool; returns it."""
    c.pool = W.listeners[c.listener].pool
    return c.pool
