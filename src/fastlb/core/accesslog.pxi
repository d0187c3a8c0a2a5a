# core/accesslog.pxi - the access log's producer side: one fixed-size record per ended connection
# into this worker's ring in shared memory (flb_logring_t, shm_layout.h).  The control process
# drains the rings (observe/accesslog.py).  A full ring drops the record and counts it: forwarding
# never waits for the log.  Off (no ring) costs one pointer test per closed connection.


cdef int log_setup() noexcept nogil:
    """Find this worker's ring (header.logring_off; 0 = access log off).  Returns 0 or -EINVAL."""
    cdef flb_logring_t *first
    cdef uint64_t ring_bytes
    W.logring = NULL
    if W.hdr.logring_off == 0:
        return 0
    first = <flb_logring_t *>(W.base + W.hdr.logring_off)
    if first.slots == 0 or (first.slots & (first.slots - 1)) != 0:
        return -22
    ring_bytes = sizeof(flb_logring_t) + <uint64_t>first.slots * sizeof(flb_logrec_t)
    W.logring = <flb_logring_t *>(W.base + W.hdr.logring_off + <uint64_t>W.index * ring_bytes)
    W.logrecs = <flb_logrec_t *>(<char *>W.logring + sizeof(flb_logring_t))
    return 0


cdef inline uint16_t log_termination(Conn *c, bint reset) noexcept nogil:
    """Why c ended: what its closer recorded (c.term), else what its flags say."""
    if c.term != 0:
        return <uint16_t>(c.term - 1)
    if reset:
        if c.flags & F_B_ERR:
            return FLB_TERM_BACKEND_RESET
        return FLB_TERM_CLIENT_RESET
    if c.closer == 2:
        return FLB_TERM_BACKEND_CLOSE
    return FLB_TERM_CLIENT_CLOSE


cdef void log_conn(Conn *c, bint reset) noexcept nogil:
    """Append c's record to this worker's ring (called by conn_close before the slot is freed);
    with the ring full, count a drop instead.  No syscall but one vDSO clock read."""
    cdef flb_logring_t *ring = W.logring
    cdef flb_logrec_t *r
    cdef uint64_t head, tail
    cdef timespec ts
    if ring == NULL:
        return
    head = ring.head                    # only this worker writes head
    tail = flb_load64_acq(&ring.tail)
    if head - tail >= ring.slots:
        flb_add64(&ring.dropped, 1)
        return
    r = &W.logrecs[head & (ring.slots - 1)]
    clock_gettime(CLOCK_REALTIME, &ts)
    r.end_unix_us = <uint64_t>ts.tv_sec * 1000000ULL + <uint64_t>ts.tv_nsec / 1000ULL
    r.duration_us = W.now_us - c.accepted_us if W.now_us > c.accepted_us else 0
    r.bytes_in = c.bytes_c2b
    r.bytes_out = c.bytes_b2c
    r.connect_us = c.connect_us
    r.listener = c.listener
    r.route = c.route
    r.pool = c.pool
    r.backend = c.backend
    r.termination = log_termination(c, reset)
    r.retries = c.attempts - 1 if c.attempts > 1 else 0
    r.client_len = c.peer_len if c.peer_len <= FLB_ADDR_LEN else FLB_ADDR_LEN
    memcpy(r.client, c.peer, r.client_len)
    flb_store64_rel(&ring.head, head + 1)
