# core/deadlines.pxi - deadlines that end connections visibly (issue 9, item 9).
#
# shutdown_timeout (the worker's stop deadline) and drain_timeout (backend.close_conns) reset both
# sides, counted in worker.deadline_resets: a transfer cut by a deadline must not look complete.
# half_close_timeout: once one direction has finished (its EOF forwarded), the other side gets the
# listener's half_close_timeout_ms to finish too; then both are reset (worker.half_close_timeouts).


cdef void conn_deadline_reset(Conn *c) noexcept nogil:
    """A deadline ends established (or connecting) c: reset both sides and count it."""
    W.me.deadline_resets += 1
    conn_close(c, True)


cdef void half_close_begin(Conn *c) noexcept nogil:
    """The first direction of c just finished: start its half-close clock and, when the listener
    has a half_close_timeout sooner than the wheel's current deadline for c, move c there."""
    cdef Listener *l = &W.listeners[c.listener]
    c.half_ms = W.now_ms
    if l.half_close_timeout_ms != 0:
        timer_schedule(c, conn_deadline(c))


cdef inline bint half_close_expired(Conn *c) noexcept nogil:
    """Is established c past its half_close_timeout?"""
    cdef uint32_t t = W.listeners[c.listener].half_close_timeout_ms
    return c.half_ms != 0 and t != 0 and W.now_ms >= c.half_ms + t
