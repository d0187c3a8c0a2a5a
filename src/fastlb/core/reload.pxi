# core/reload.pxi - listener settings a reload changes in place (issue 12).
#
# The control process rewrites a listener's pool, timeouts (connect, idle, half-close),
# max_connections and backlog in its
# shared record (single 32-bit stores) and bumps the generation; sync_generation() calls
# listeners_refresh(), so every worker applies them within one loop turn, without restarting.


cdef void listeners_refresh() noexcept nogil:
    """Copy each listener's runtime settings from shared memory into the worker's Listener.

    New timers use the new timeouts; an idle timer re-armed by traffic uses the new idle timeout.
    A listener paused at max_connections is unpaused when the limit was raised or removed (the
    next housekeeping() turn looks again).  When `backlog` differs from the one this worker applied,
    listen(2) is called again on the existing socket: Linux changes the accept-queue limit of a
    listening socket in place, queued connections stay.  A failed listen() keeps the old backlog
    and is counted in the listener's accept_errors.  Side effects only; no return value."""
    cdef uint32_t i, backlog
    cdef Listener *l
    for i in range(<uint32_t>W.n_listeners):
        l = &W.listeners[i]
        l.pool = flb_load32(&l.shm.pool)
        l.connect_timeout_ms = flb_load32(&l.shm.connect_timeout_ms)
        l.idle_timeout_ms = flb_load32(&l.shm.idle_timeout_ms)
        l.max_connections = flb_load32(&l.shm.max_connections)
        l.half_close_timeout_ms = flb_load32(&l.shm.half_close_timeout_ms)
        if l.paused_full and l.max_connections == 0:
            l.paused_full = 0
            l.pending = 1
        backlog = flb_load32(&l.shm.backlog)
        if l.fd >= 0 and backlog != 0 and backlog != l.backlog:
            if listen(l.fd, <int>backlog) == 0:
                l.backlog = backlog
            else:
                flb_add64(&l.shm.accept_errors, 1)
                l.backlog = backlog  # do not retry on every generation change
