# core/flush.pxi - when one side of an established connection errors or resets (issue 9, items 2
# and 3).
#
# A backend that closes or resets before any byte moved either way has failed exactly like a
# refused connect: it is counted (early_closes, consecutive_failures: passive ejection sees it) and
# the connection is retried on another backend - nothing was sent, so nothing is replayed (client
# bytes not yet forwarded stay in the c2b pipe or the client's socket and go to the next backend).
#
# Otherwise the last bytes before a reset must arrive: the dead side's socket may still hold what
# its peer sent before the reset (recv returns queued data before the error).  The connection goes
# to CS_FLUSHING: that data is forwarded to the other side (no FIN: it must see a reset, as it would
# directly), the other side's send queue is left to drain (SIOCOUTQ: closing with SO_LINGER 0 would
# discard it), then both are reset.  At most FLUSH_TIMEOUT_MS from the last byte moved; a wheel tick
# re-checks the queue (no event says "send queue empty").  Only the reset path pays for this.

cdef inline int conn_side(Conn *c, int fd) noexcept nogil:
    """Which side of c descriptor fd is: SIDE_CLIENT, SIDE_BACKEND or SIDE_NONE."""
    if fd == c.cfd:
        return SIDE_CLIENT
    if fd == c.bfd:
        return SIDE_BACKEND
    return SIDE_NONE


cdef inline bint backend_holds_bytes(Conn *c) noexcept nogil:
    """Has the backend socket unread bytes?  One MSG_PEEK recv (reset path only); no side effects."""
    cdef char ch
    return recv(c.bfd, &ch, 1, MSG_PEEK | MSG_DONTWAIT) > 0


cdef inline bint sock_timed_out(int fd) noexcept nogil:
    """Did the kernel give up on fd's peer (pending SO_ERROR ETIMEDOUT: keepalive probes
    unanswered, tcp_user_timeout or retransmissions exhausted)?  Reset path only; reading SO_ERROR
    clears it, which nothing after this needs."""
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if fd < 0 or getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return False
    return err == ETIMEDOUT


cdef void conn_early_close(Conn *c) noexcept nogil:
    """c's backend closed or reset before any byte moved either way: count a failure for passive
    ejection (early_closes, consecutive_failures), drop the backend and connect c to another one,
    as after a refused connect (`retries` bounds it).  No backend left: c is closed with a reset,
    counted as rejected; a client that errored too is just reset."""
    cdef flb_backend_t *b = &W.backends[c.backend]
    cdef Listener *l = &W.listeners[c.listener]
    flb_add64(&b.early_closes, 1)
    flb_add64(&b.consecutive_failures, 1)
    if c.flags & F_B_LINGER:
        linger_set(c, SIDE_BACKEND, False)  # its FIN is answered by ours, as before
    close_fd(c.bfd)
    c.bfd = -1
    lb_drop(c.backend)
    c.backend = FLB_NONE
    pipe_put(&c.b2c)
    c.flags &= ~(F_B_RD | F_B_WR | F_B_EOF | F_B_ERR | F_B_HUP | F_B_SHUT | F_B2C_BULK | F_B_DATA | F_B_OK
                 | F_B_LINGER)
    if c.flags & F_C_ERR:
        c.term = FLB_TERM_CLIENT_RESET + 1
        conn_close(c, True)                 # the client is gone too: nothing to retry for
        return
    W.me.early_close_retries += 1
    if conn_connect(c) < 0:
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, True)


cdef void conn_abort(Conn *c, int dead) noexcept nogil:
    """Established c saw an error or reset on side `dead` (SIDE_NONE: a local failure; reset at
    once).  Before the backend's first byte this is counted on the backend (`resets`), and with
    nothing moved either way it is an early close (retried); after it, in `late_resets`.  Otherwise c goes to CS_FLUSHING:
    what the dead side still holds is forwarded before both sides are reset."""
    cdef flb_backend_t *b = &W.backends[c.backend]
    cdef bint lost
    if dead == SIDE_NONE:
        c.term = FLB_TERM_LOCAL_ERROR + 1
        conn_close(c, True)
        return
    # read before anything else looks at the socket: a recv() would consume the pending error
    lost = sock_timed_out(c.bfd if dead == SIDE_BACKEND else c.cfd)
    if dead == SIDE_BACKEND:
        if (c.flags & F_B_DATA) or backend_holds_bytes(c):
            flb_add64(&b.late_resets, 1)    # after its first byte: the crash-after-greeting case
        else:
            flb_add64(&b.resets, 1)
            if not (c.flags & F_C2B_SENT):
                conn_early_close(c)
                return
    c.state = CS_FLUSHING
    # the live side must see a reset after the bytes, as it would directly: never a FIN
    if dead == SIDE_BACKEND:
        c.flags |= F_FLUSH_B | F_C_SHUT
        c.term = FLB_TERM_BACKEND_RESET + 1
        if lost:
            c.term = FLB_TERM_BACKEND_LOST + 1
            W.me.backends_lost += 1
    else:
        c.flags |= F_FLUSH_C | F_B_SHUT
        c.term = FLB_TERM_CLIENT_RESET + 1
        if lost:
            c.term = FLB_TERM_CLIENT_LOST + 1
            W.me.clients_lost += 1
    c.active_ms = W.now_ms
    timer_schedule(c, W.now_ms + TICK_MS)
    flush_run(c)


cdef void flush_done(Conn *c) noexcept nogil:
    """Everything the dead side held has reached the live side's peer: reset both, counted."""
    W.me.flushed_resets += 1
    conn_close(c, True)


cdef void flush_run(Conn *c) noexcept nogil:
    """CS_FLUSHING: read the dead side to its end into the live side; once all of it is handed to
    the live socket and that socket's send queue is empty, reset both (flush_done).  Returns with c
    still flushing while it waits for the live side (an event or the next wheel tick comes back)."""
    cdef flb_backend_t *b = &W.backends[c.backend]
    cdef int src, dst, rc, outq
    cdef Pipe *p
    cdef uint32_t rd, wr, eof, shut, hup, bulk, dst_err
    cdef uint64_t *counter
    if c.flags & F_FLUSH_B:
        src = c.bfd
        dst = c.cfd
        p = &c.b2c
        rd = F_B_RD
        wr = F_C_WR
        eof = F_B_EOF
        shut = F_C_SHUT
        hup = F_B_HUP
        bulk = F_B2C_BULK
        dst_err = F_C_ERR
        counter = &b.bytes_out
    else:
        src = c.cfd
        dst = c.bfd
        p = &c.c2b
        rd = F_C_RD
        wr = F_B_WR
        eof = F_C_EOF
        shut = F_B_SHUT
        hup = F_C_HUP
        bulk = F_C2B_BULK
        dst_err = F_B_ERR
        counter = &b.bytes_in
    if c.flags & dst_err:
        conn_close(c, True)                 # both sides are gone: nothing can be delivered
        return
    c.flags |= rd | hup                     # read on until the error or the EOF
    rc = pump(c, src, dst, p, rd, wr, eof, shut, hup, bulk, 0, 0, counter)
    if rc < 0:
        if W.err_fd != src:
            conn_close(c, True)
            return
        c.flags |= eof                      # the dead side gave its error: nothing more to read
        rc = pump(c, src, dst, p, rd, wr, eof, shut, hup, bulk, 0, 0, counter)
        if rc < 0:
            conn_close(c, True)
            return
    if c.flags & F_FLUSH_B:
        c.bytes_b2c += <uint64_t>rc         # the access log's per-connection byte counts
    else:
        c.bytes_c2b += <uint64_t>rc
    if not (c.flags & eof) or p.bytes > 0:
        return
    outq = 0
    if ioctl(dst, SIOCOUTQ, &outq) < 0 or outq <= 0:
        flush_done(c)


cdef void flush_tick(Conn *c) noexcept nogil:
    """Wheel tick of a flushing connection: reset it once FLUSH_TIMEOUT_MS passed since its last
    byte moved, else run it again and come back next tick."""
    cdef uint32_t gen = c.gen
    if W.now_ms >= c.active_ms + FLUSH_TIMEOUT_MS:
        conn_close(c, True)
        return
    flush_run(c)
    if c.state == CS_FLUSHING and c.gen == gen:
        timer_schedule(c, W.now_ms + TICK_MS)
