# core/timers.pxi - a hashed timer wheel for the connect, idle and half-close timeouts.
#
# Lazy deadlines: a connection sits in the wheel at a tick no later than its real deadline; traffic
# only stores `active_ms` (no wheel work per event).  When its tick comes, the real deadline is
# computed again: expired -> fire, else re-inserted.  Ticks are TICK_MS; anything further than the
# wheel's span is parked at the far end and looked at again then.

cdef enum:
    TICK_MS = 10
    WHEEL_SIZE = 4096       # 40.96 s span
    WHEEL_MASK = WHEEL_SIZE - 1


cdef int timers_init() noexcept nogil:
    cdef int i
    W.wheel = <int32_t *>malloc(sizeof(int32_t) * WHEEL_SIZE)
    if W.wheel == NULL:
        return -ENOMEM
    for i in range(WHEEL_SIZE):
        W.wheel[i] = -1
    W.wheel_tick = W.now_ms // TICK_MS
    W.n_timers = 0
    return 0


cdef void timer_unlink(Conn *c) noexcept nogil:
    if c.t_slot < 0:
        return
    if c.t_prev >= 0:
        W.conns[c.t_prev].t_next = c.t_next
    else:
        W.wheel[c.t_slot] = c.t_next
    if c.t_next >= 0:
        W.conns[c.t_next].t_prev = c.t_prev
    c.t_prev = -1
    c.t_next = -1
    c.t_slot = -1
    W.n_timers -= 1


cdef void timer_schedule(Conn *c, uint64_t deadline_ms) noexcept nogil:
    """(Re)insert c at the tick of deadline_ms, clamped to the wheel's span."""
    cdef uint64_t tick = deadline_ms // TICK_MS
    cdef int32_t slot_idx = <int32_t>(c - W.conns)
    cdef int32_t s
    timer_unlink(c)
    if tick <= W.wheel_tick:
        tick = W.wheel_tick + 1
    if tick - W.wheel_tick >= WHEEL_SIZE:
        tick = W.wheel_tick + WHEEL_SIZE - 1
    s = <int32_t>(tick & WHEEL_MASK)
    c.t_slot = s
    c.t_prev = -1
    c.t_next = W.wheel[s]
    if c.t_next >= 0:
        W.conns[c.t_next].t_prev = slot_idx
    W.wheel[s] = slot_idx
    W.n_timers += 1


cdef uint64_t conn_deadline(Conn *c) noexcept nogil:
    """The moment c times out, in ms (0xFFFF... = never): the connect deadline, every tick while
    flushing (core/flush.pxi), else the sooner of the idle and the half-close deadlines."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef uint64_t d = 0xFFFFFFFFFFFFFFFFULL, h
    if c.state == CS_CONNECTING:
        return c.start_us // 1000ULL + l.connect_timeout_ms
    if c.state == CS_PRELUDE or c.state == CS_PRELUDE_SNI:
        return c.start_us // 1000ULL + l.shm.sni_timeout_ms
    if c.state == CS_UDP_FLOW:
        return c.active_ms + l.udp_idle_timeout_ms
    if c.state == CS_FLUSHING:
        return 0
    if l.idle_timeout_ms != 0:
        d = c.active_ms + l.idle_timeout_ms
    if c.half_ms != 0 and l.half_close_timeout_ms != 0:
        h = c.half_ms + l.half_close_timeout_ms
        if h < d:
            d = h
    return d


cdef void timers_run() noexcept nogil:
    """Process every tick up to now: fire expired connections, re-insert the others."""
    cdef uint64_t now_tick = W.now_ms // TICK_MS
    cdef int steps = 0
    cdef int32_t s, i, nxt
    cdef Conn *c
    cdef uint64_t d
    while W.wheel_tick < now_tick and steps < WHEEL_SIZE:
        W.wheel_tick += 1
        steps += 1
        s = <int32_t>(W.wheel_tick & WHEEL_MASK)
        i = W.wheel[s]
        W.wheel[s] = -1
        # detach the whole slot list first: firing or re-inserting never touches it again
        while i >= 0:
            c = &W.conns[i]
            nxt = c.t_next
            c.t_slot = -1
            c.t_prev = -1
            c.t_next = -1
            W.n_timers -= 1
            if c.state != CS_FREE:
                d = conn_deadline(c)
                if d <= W.now_ms:
                    conn_timeout(c)
                elif d != 0xFFFFFFFFFFFFFFFFULL:
                    timer_schedule(c, d)
            i = nxt
    if W.wheel_tick < now_tick:
        W.wheel_tick = now_tick
