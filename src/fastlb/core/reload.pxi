# core/reload.pxi - listener settings a reload changes in place (issue 12).
#
# The control process rewrites a listener's pool, timeouts (connect, idle, half-close),
# max_connections and backlog in its
# shared record (single 32-bit stores) and bumps the generation; sync_generation() calls
# listeners_refresh(), so every worker applies them within one loop turn, without restarting.


cdef void listeners_refresh() noexcept nogil:
    """Copy each listener's runtime settings from shared memory into the worker's Listener.

    New timers use the new timeouts.  When a listener's idle or half-close timeout got shorter (or
    the half-close one was off), its established connections are moved to their new deadlines at
    once (timers_retime: one walk of the slab); a longer one needs nothing (the wheel re-checks a
    deadline when its tick comes).
    A listener paused at max_connections is unpaused when the limit was raised or removed (the
    next housekeeping() turn looks again).  When `backlog` differs from the one this worker applied,
    listen(2) is called again on the existing socket: Linux changes the accept-queue limit of a
    listening socket in place, queued connections stay.  A failed listen() keeps the old backlog
    and is counted in the listener's accept_errors.  Side effects only; no return value."""
    cdef uint32_t i, backlog, idle, half
    cdef Listener *l
    cdef bint sooner = False
    for i in range(<uint32_t>W.n_listeners):
        l = &W.listeners[i]
        l.pool = flb_load32(&l.shm.pool)
        l.connect_timeout_ms = flb_load32(&l.shm.connect_timeout_ms)
        idle = flb_load32(&l.shm.idle_timeout_ms)
        half = flb_load32(&l.shm.half_close_timeout_ms)
        l.retime = (idle != 0 and (l.idle_timeout_ms == 0 or idle < l.idle_timeout_ms)) or \
            (half != 0 and (l.half_close_timeout_ms == 0 or half < l.half_close_timeout_ms))
        sooner = sooner or l.retime
        l.idle_timeout_ms = idle
        l.max_connections = flb_load32(&l.shm.max_connections)
        l.half_close_timeout_ms = half
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
    if sooner:
        timers_retime()


cdef void timers_retime() noexcept nogil:
    """Put every established connection of a listener marked `retime` at its deadline under the
    listener's new timeouts (timer_schedule relinks it), then clear the marks.  O(slots in use)."""
    cdef int32_t k
    cdef Conn *c
    for k in range(W.n_used):
        c = &W.conns[k]
        if c.state == CS_ESTABLISHED and W.listeners[c.listener].retime:
            timer_schedule(c, conn_deadline(c))
    for k in range(W.n_listeners):
        W.listeners[k].retime = 0
