# core/conn.pxi - the state machine of one proxied connection:
#   accepted -> CS_CONNECTING (non-blocking connect; failure or timeout -> next backend, up to
#   `retries`) -> CS_ESTABLISHED (small messages recv+send, bulk spliced through pooled pipes; EOF becomes
#   shutdown(SHUT_WR) on the other side once the pipe is drained; an error or reset on either side
#   first forwards what that side still held, then resets both: core/flush.pxi) -> closed when both
#   directions are done.  A backend that closes or resets before any byte moved either way is an
#   early close: counted as a failure and retried on another backend (core/flush.pxi).


cdef inline void backend_failed(flb_backend_t *b, bint timeout) noexcept nogil:
    if timeout:
        flb_add64(&b.connect_timeouts, 1)
    else:
        flb_add64(&b.connect_errors, 1)
    flb_add64(&b.consecutive_failures, 1)


cdef inline void backend_succeeded(flb_backend_t *b) noexcept nogil:
    # written only when it changes: keeps the cache line shared between workers clean
    if flb_load64(&b.consecutive_failures) != 0:
        flb_store64(&b.consecutive_failures, 0)


cdef int sock_keepalive(int fd, uint32_t idle_s, uint32_t intvl_s, uint32_t cnt,
                        uint32_t uto_ms) noexcept nogil:
    """Protections (issue 21): TCP keepalive on fd when idle_s > 0 (SO_KEEPALIVE, TCP_KEEPIDLE,
    TCP_KEEPINTVL, TCP_KEEPCNT), and TCP_USER_TIMEOUT when uto_ms > 0.  Values come from the
    listener's or pool's shared record (the config checked their ranges).  Returns 0, or -errno of
    the first call that failed (counted in worker.sockopt_errors; the connection goes on with the
    kernel's defaults for what failed)."""
    cdef int one = 1, v, rc = 0
    if idle_s > 0:
        if setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) < 0:
            rc = -errno
        v = <int>idle_s
        if setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &v, sizeof(v)) < 0 and rc == 0:
            rc = -errno
        v = <int>intvl_s
        if setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &v, sizeof(v)) < 0 and rc == 0:
            rc = -errno
        v = <int>cnt
        if setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &v, sizeof(v)) < 0 and rc == 0:
            rc = -errno
    if uto_ms > 0:
        v = <int>uto_ms
        if setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &v, sizeof(v)) < 0 and rc == 0:
            rc = -errno
    if rc < 0:
        W.me.sockopt_errors += 1
    return rc


cdef inline void sock_protect_client(int fd, flb_listener_t *ls) noexcept nogil:
    """client_keepalive / tcp_user_timeout of listener record ls on accepted fd: two loads and no
    call when neither is configured.  Side effects only."""
    cdef uint32_t idle = flb_load32(&ls.ka_idle_s)
    cdef uint32_t uto = flb_load32(&ls.user_timeout_ms)
    if idle != 0 or uto != 0:
        sock_keepalive(fd, idle, flb_load32(&ls.ka_interval_s), flb_load32(&ls.ka_count), uto)


cdef inline void sock_protect_backend(int fd, flb_pool_t *p) noexcept nogil:
    """backend_keepalive / tcp_user_timeout of pool record p on a new backend socket fd."""
    cdef uint32_t idle = flb_load32(&p.ka_idle_s)
    cdef uint32_t uto = flb_load32(&p.user_timeout_ms)
    if idle != 0 or uto != 0:
        sock_keepalive(fd, idle, flb_load32(&p.ka_interval_s), flb_load32(&p.ka_count), uto)


cdef inline socklen_t addr_read(flb_backend_t *b, uint8_t *out) noexcept nogil:
    """Copy b's address under its seqlock, SEQLOCK_TRIES reads at most.  Returns its length, or 0
    when no read saw the same even seq before and after (a writer in progress, or one that died
    between its two stores and left seq odd)."""
    cdef uint32_t s1, s2
    cdef socklen_t n
    cdef int k
    for k in range(SEQLOCK_TRIES):
        s1 = flb_load32_acq(&b.seq)
        if s1 & 1:
            continue
        n = b.addrlen
        if n > FLB_ADDR_LEN:
            n = FLB_ADDR_LEN
        memcpy(out, b.addr, n)
        flb_fence_acq()
        s2 = flb_load32(&b.seq)
        if s1 == s2:
            return n
    return 0


cdef socklen_t backend_addr(uint32_t idx, uint8_t *out) noexcept nogil:
    """Backend idx's address into out: read under its seqlock (bounded), else the worker's last
    good copy (counted: worker.seqlock_fallbacks).  Returns its length, 0 if there is none (the
    caller skips the backend for this pick).  Never spins without bound on a writer that can die."""
    cdef socklen_t n = addr_read(&W.backends[idx], out)
    if n > 0:
        return n
    W.me.seqlock_fallbacks += 1
    n = W.addr_copy_len[idx]
    if n > 0:
        memcpy(out, W.addr_copy + <size_t>idx * FLB_ADDR_LEN, n)
    return n


cdef void addr_copies_refresh() noexcept nogil:
    """Refresh the worker's copy of every in-use backend's address (called on each generation
    change, from lb_refresh's caller); a record whose seqlock cannot be read keeps its old copy."""
    cdef uint32_t i
    cdef socklen_t n
    for i in range(W.hdr.n_backends):
        if flb_load32(&W.backends[i].in_use) == 0:
            continue
        n = addr_read(&W.backends[i], W.addr_copy + <size_t>i * FLB_ADDR_LEN)
        if n > 0:
            W.addr_copy_len[i] = n


cdef void linger_set(Conn *c, int side, bint on) noexcept nogil:
    """Arm (on: SO_LINGER {1, 0}) or clear ({0, 0}) the reset-on-close of c's socket on `side`
    (SIDE_CLIENT / SIDE_BACKEND), keeping F_C_LINGER / F_B_LINGER in step.  Armed, a close() - ours,
    or the kernel's when this process dies (kill -9) - resets the peer instead of sending a FIN, so a
    cut transfer never looks complete (issue 24, item 5).  A failed setsockopt is counted in
    worker.linger_errors and leaves the flag as it was; no other side effect."""
    cdef linger lg
    cdef int fd = c.cfd if side == SIDE_CLIENT else c.bfd
    cdef uint32_t flag = F_C_LINGER if side == SIDE_CLIENT else F_B_LINGER
    if fd < 0:
        return
    lg.l_onoff = 1 if on else 0
    lg.l_linger = 0
    if setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) < 0:
        W.me.linger_errors += 1
        return
    if on:
        c.flags |= flag
    else:
        c.flags &= ~flag


cdef void conn_close(Conn *c, bint reset) noexcept nogil:
    """Close both sockets (with an RST when reset), release pipes, counters and timer; free the slot.
    An orderly close (reset 0) first clears the SO_LINGER {1, 0} an established pair carries, so the
    close() sends the FIN after every queued byte; a reset arms it on a socket that lacks it."""
    cdef Listener *l = &W.listeners[c.listener]
    if c.state == CS_UDP_FLOW or c.state == CS_UDP_SPARE:
        udp_conn_close(c)               # core/udp.pxi: a flow or a spare socket
        return
    if W.logring != NULL:
        log_conn(c, reset)
    if reset:
        if not (c.flags & F_C_LINGER):
            linger_set(c, SIDE_CLIENT, True)
        if not (c.flags & F_B_LINGER):
            linger_set(c, SIDE_BACKEND, True)
        W.me.resets += 1
    else:
        if c.flags & F_C_LINGER:
            linger_set(c, SIDE_CLIENT, False)
        if c.flags & F_B_LINGER:
            linger_set(c, SIDE_BACKEND, False)
    close_fd(c.cfd)
    close_fd(c.bfd)
    c.cfd = -1
    c.bfd = -1
    pipe_put(&c.c2b)
    pipe_put(&c.b2c)
    prelude_release(c)
    if c.backend != FLB_NONE:
        lb_drop(c.backend)
        c.backend = FLB_NONE
    timer_unlink(c)
    flb_sadd64(&l.shm.active, -1)
    W.wactive[W.hdr.n_backends + c.listener] -= 1
    W.active -= 1
    if l.paused_full:
        l.paused_full = 0
        l.pending = 1
    slab_free(c)


cdef int conn_connect(Conn *c) noexcept nogil:
    """Start a connect to the next backend the pool picks; an attempt that fails at once moves on.

    Returns 0 while a connect is in flight, -1 when no backend can be tried any more (the caller
    closes the client).
    """
    cdef Listener *l = &W.listeners[c.listener]
    cdef flb_pool_t *p = &W.pools[c.pool]
    cdef flb_backend_t *b
    cdef uint32_t idx
    cdef int fd, rc, e, one = 1
    cdef uint8_t addr[FLB_ADDR_LEN]
    cdef socklen_t alen
    cdef epoll_event ev
    while c.attempts <= p.retries and c.attempts < MAX_TRIES:
        idx = lb_pick(c, c.pool)
        if idx == FLB_NONE:
            if c.attempts == 0:
                flb_add64(&p.no_backend, 1)
                W.me.no_backend += 1
                c.term = FLB_TERM_NO_BACKEND + 1
            elif c.term == 0:
                c.term = FLB_TERM_CONNECT_FAILED + 1
            return -1
        c.tried[c.attempts] = idx
        c.attempts += 1
        if c.attempts > 1:
            W.me.retries += 1
        b = &W.backends[idx]
        alen = backend_addr(idx, addr)
        if alen == 0:
            continue                        # no readable address (seqlock stuck): next pick
        fd = socket((<sockaddr *>addr).sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            e = errno
            if e == EMFILE or e == ENFILE:
                W.me.emfile += 1
            c.term = FLB_TERM_LOCAL_ERROR + 1
            return -1
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        sock_protect_backend(fd, p)
        flb_add64(&b.attempts, 1)
        rc = connect(fd, <sockaddr *>addr, alen)
        e = errno
        if rc == 0 or e == EINPROGRESS:
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.u64 = conn_tag(c, SIDE_BACKEND)
            if epoll_ctl(W.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
                close_fd(fd)
                return -1
            c.bfd = fd
            c.backend = idx
            lb_take(idx)
            c.state = CS_CONNECTING
            c.flags &= ~(F_B_RD | F_B_WR | F_B_ERR | F_B_HUP)
            c.start_us = W.now_us
            timer_schedule(c, W.now_ms + l.connect_timeout_ms)
            return 0
        close_fd(fd)
        backend_failed(b, False)
    if c.term == 0:
        c.term = FLB_TERM_CONNECT_FAILED + 1
    return -1


cdef void conn_connect_failed(Conn *c, bint timeout) noexcept nogil:
    """The attempt in flight failed: count it, then try the next backend or close the client."""
    cdef Listener *l = &W.listeners[c.listener]
    backend_failed(&W.backends[c.backend], timeout)
    c.term = (FLB_TERM_CONNECT_TIMEOUT if timeout else FLB_TERM_CONNECT_FAILED) + 1
    if timeout:
        W.me.timeouts_connect += 1
    close_fd(c.bfd)
    c.bfd = -1
    lb_drop(c.backend)
    c.backend = FLB_NONE
    if conn_connect(c) < 0:
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)


cdef uint64_t HIST_BOUNDS[FLB_HIST_BUCKETS]
HIST_BOUNDS[:] = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
                  250000, 500000, 1000000, 2500000, 5000000, 0xFFFFFFFFFFFFFFFF]


cdef inline uint32_t hist_bucket(uint64_t us) noexcept nogil:
    """The connect-time histogram bucket of `us` (FLB_HIST_BOUNDS_US in shm_layout.h)."""
    cdef uint32_t k = 0
    while k < FLB_HIST_BUCKETS - 1 and us > HIST_BOUNDS[k]:
        k += 1
    return k


cdef void conn_connected(Conn *c) noexcept nogil:
    """The connect completed: record its time (moving average, 1/8 weight) and start forwarding."""
    cdef flb_backend_t *b = &W.backends[c.backend]
    cdef uint64_t dt = W.now_us - c.start_us
    cdef uint64_t avg = flb_load64(&b.connect_time_ewma_us)
    if avg == 0:
        avg = dt
    else:
        avg = avg - avg // 8 + dt // 8
    flb_store64(&b.connect_time_ewma_us, avg if avg > 0 else 1)
    flb_add64(&b.connect_time_sum_us, dt)
    flb_add64(&b.hist_connect[hist_bucket(dt)], 1)
    flb_add64(&b.total, 1)
    c.connect_us = <uint32_t>(dt if dt < 4294967295ULL else 4294967295ULL)
    c.term = 0                          # connected: how it ends is decided from here on
    c.state = CS_ESTABLISHED
    if W.listeners[c.listener].linger:
        linger_set(c, SIDE_BACKEND, True)   # a pair: if this worker dies, the backend is reset too
    c.active_ms = W.now_ms
    # the wheel holds c at its connect deadline; the idle deadline may come sooner
    if W.listeners[c.listener].idle_timeout_ms != 0:
        timer_schedule(c, c.active_ms + W.listeners[c.listener].idle_timeout_ms)
    else:
        timer_unlink(c)


cdef int pump_small(Conn *c, int src, int dst, Pipe *p, uint32_t rd, uint32_t wr, uint32_t eof,
                    uint32_t hup, uint32_t bulk, uint32_t sent) noexcept nogil:
    """One recv() into the worker's scratch buffer and one send() on: the cheap way to forward a
    small message (what HAProxy's splice-auto does too).  Only with an empty pipe, so bytes keep
    their order; whatever dst does not take at once goes into the pipe, and the splice path drains
    it.  The recv() never takes more than that pipe holds (p.cap; a small pipe is back-pressure,
    never an error).  A recv() that fills the buffer marks the direction `bulk`: splice from then on.

    A short recv() proves the socket queue was empty, so `rd` is cleared without the extra call that
    would return EAGAIN - unless the peer's FIN was already reported (`hup`): then we read on to
    see the EOF.  Bytes dst took set `sent`; when dst fails, the bytes are kept in the pipe (they may
    still go to another backend).  Returns bytes moved, or -errno (reset; W.err_fd = the failing
    descriptor), or -EAGAIN when nothing was there.
    """
    cdef ssize_t n, m, w
    cdef size_t limit = SCRATCH_SIZE if p.cap >= SCRATCH_SIZE else p.cap
    cdef int e
    n = recv(src, W.scratch, limit, MSG_DONTWAIT)
    if n <= 0:
        if n == 0:
            c.flags |= eof
            return 0
        e = errno
        if e == EAGAIN:
            c.flags &= ~rd
            return -EAGAIN
        if e == EINTR:
            return -EAGAIN
        W.err_fd = src
        return -e
    if <size_t>n == limit:
        c.flags |= bulk
    elif not (c.flags & hup):
        c.flags &= ~rd
    m = 0
    if c.flags & wr:
        m = send(dst, W.scratch, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if m < 0:
            e = errno
            if e != EAGAIN and e != EINTR:
                if write(p.wfd, W.scratch, <size_t>n) == n:
                    p.bytes += <uint32_t>n
                W.err_fd = dst
                return -e
            if e == EAGAIN:
                c.flags &= ~wr
            m = 0
        elif m > 0:
            c.flags |= sent
    if m < n:
        # the pipe (taken before the recv, empty, and at least n bytes big) keeps the rest
        w = write(p.wfd, W.scratch + m, <size_t>(n - m))
        if w != n - m:
            if w > 0:
                p.bytes += <uint32_t>w
            W.err_fd = p.wfd
            return -EIO
        p.bytes += <uint32_t>(n - m)
    return <int>n


cdef int pump(Conn *c, int src, int dst, Pipe *p, uint32_t rd, uint32_t wr, uint32_t eof,
              uint32_t shut, uint32_t hup, uint32_t bulk, uint32_t got, uint32_t sent,
              uint64_t *counter) noexcept nogil:
    """Move what src has to dst.  Returns bytes moved (>= 0) or -errno when the connection must
    be reset (W.err_fd then names the descriptor that failed).  Bytes read from src set `got`,
    bytes (or the EOF) passed to dst set `sent`.  The backend's EOF is not passed to the client
    while no byte has moved either way: that is an early close, which conn_run retries.

    Small messages take pump_small() (recv + send); a direction that once filled the scratch
    buffer is bulk and goes zero-copy: splice(src -> pipe) and splice(pipe -> dst).  EAGAIN is a
    state, not an error: from the socket into an EMPTY pipe it means the socket is drained (clear
    `rd`); with bytes in the pipe it may only mean the pipe is full, so `rd` stays set and we come
    back once dst has taken some.  EAGAIN into dst clears `wr` until EPOLLOUT.
    """
    cdef ssize_t n
    cdef int64_t moved = 0
    cdef int progress = 1, rc, e
    while progress:
        progress = 0
        if (c.flags & rd) and not (c.flags & eof) and (p.rfd < 0 or p.bytes < p.cap):
            if p.rfd < 0:
                rc = pipe_get(p)
                if rc == -EMFILE or rc == -ENFILE or rc == -ENOMEM:
                    W.me.emfile += 1
                    conn_starve(c)          # back-pressure, not an error: nothing is lost
                    break
                if rc < 0:
                    return rc
            if p.bytes == 0 and not (c.flags & bulk):
                rc = pump_small(c, src, dst, p, rd, wr, eof, hup, bulk, sent)
                if rc > 0:
                    moved += rc
                    progress = 1
                elif rc == 0:
                    progress = 1            # EOF
                elif rc != -EAGAIN:
                    return rc
                continue
            n = splice(src, NULL, p.wfd, NULL, p.cap - p.bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                p.bytes += <uint32_t>n
                moved += n
                progress = 1
            elif n == 0:
                c.flags |= eof
                progress = 1
            else:
                e = errno
                if e == EAGAIN:
                    if p.bytes == 0:
                        c.flags &= ~rd
                elif e == EINTR:
                    progress = 1
                else:
                    W.err_fd = src
                    return -e
        if p.bytes > 0 and (c.flags & wr):
            n = splice(p.rfd, NULL, dst, NULL, p.bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                p.bytes -= <uint32_t>n
                c.flags |= sent
                progress = 1
            else:
                e = errno
                if e == EAGAIN:
                    c.flags &= ~wr
                elif e == EINTR:
                    progress = 1
                else:
                    W.me.splice_errors += 1
                    W.err_fd = dst
                    return -e
    if moved > 0:
        flb_add64(counter, <uint64_t>moved)
        c.active_ms = W.now_ms
        c.flags |= got
    if p.bytes == 0 and p.rfd >= 0:
        pipe_put(p)
    if (c.flags & eof) and p.bytes == 0 and not (c.flags & shut) \
            and (shut != F_C_SHUT or (c.flags & (F_B_DATA | F_C2B_SENT))):
        # the last direction to finish needs no shutdown: close() right after sends the FIN
        if (c.flags & (F_C_SHUT | F_B_SHUT)) == 0 or c.c2b.bytes + c.b2c.bytes > 0 \
                or (c.flags & (F_C_EOF | F_B_EOF)) != (F_C_EOF | F_B_EOF):
            shutdown(dst, SHUT_WR)  # ENOTCONN if the peer is gone: the next splice says so
        c.flags |= shut | sent
    return <int>(moved if moved < 0x7FFFFFFF else 0x7FFFFFFF)


cdef void conn_run(Conn *c) noexcept nogil:
    """Advance c as far as its sockets allow (called after an event on either of them)."""
    cdef flb_backend_t *b
    cdef int rc
    if c.state == CS_PRELUDE or c.state == CS_PRELUDE_SNI:
        prelude_run(c)
        return
    if c.state == CS_FLUSHING:
        flush_run(c)
        return
    if c.state == CS_CONNECTING:
        if c.flags & F_C_ERR:
            c.term = FLB_TERM_CLIENT_GONE + 1
            conn_close(c, True)             # the client went away while we were connecting
            return
        if not (c.flags & (F_B_WR | F_B_ERR)):
            return
        # a failed connect always raises EPOLLERR (with EPOLLHUP): no SO_ERROR read needed
        if c.flags & F_B_ERR:
            conn_connect_failed(c, False)
            return
        conn_connected(c)
        if (c.pre != NULL or W.pools[c.pool].send_proxy != FLB_PROXY_OFF) and prelude_connected(c) < 0:
            conn_close(c, True)
            return
    b = &W.backends[c.backend]
    if c.flags & F_B_ERR:
        conn_abort(c, SIDE_BACKEND)
        return
    if c.flags & F_C_ERR:
        conn_abort(c, SIDE_CLIENT)
        return
    rc = prelude_flush(c) if c.pre != NULL else 1   # the PROXY header and buffered bytes go first
    if rc > 0:
        rc = pump(c, c.cfd, c.bfd, &c.c2b, F_C_RD, F_B_WR, F_C_EOF, F_B_SHUT, F_C_HUP, F_C2B_BULK,
                  0, F_C2B_SENT, &b.bytes_in)
    if rc < 0:
        conn_abort(c, conn_side(c, W.err_fd))
        return
    c.bytes_c2b += <uint64_t>rc
    rc = pump(c, c.bfd, c.cfd, &c.b2c, F_B_RD, F_C_WR, F_B_EOF, F_C_SHUT, F_B_HUP, F_B2C_BULK,
              F_B_DATA, 0, &b.bytes_out)
    if rc < 0:
        conn_abort(c, conn_side(c, W.err_fd))
        return
    c.bytes_b2c += <uint64_t>rc
    if not (c.flags & F_B_OK):
        if c.flags & (F_B_DATA | F_C2B_SENT):
            c.flags |= F_B_OK           # a byte moved either way: the backend works
            backend_succeeded(b)
        elif c.flags & F_B_EOF:
            conn_early_close(c)         # closed before any byte: a failure, and retried
            return
    if c.closer == 0 and c.flags & (F_C_EOF | F_B_EOF):
        c.closer = 1 if c.flags & F_C_EOF else 2
        if c.closer == 2:
            flb_add64(&b.backend_first_closes, 1)   # its FIN before the client's (bytes moved)
    if (c.flags & (F_B_SHUT | F_C_SHUT)) == (F_B_SHUT | F_C_SHUT) and c.c2b.bytes == 0 and c.b2c.bytes == 0:
        conn_close(c, False)            # both directions finished
        return
    if c.half_ms == 0 and (c.flags & (F_B_SHUT | F_C_SHUT)):
        half_close_begin(c)


cdef void conn_timeout(Conn *c) noexcept nogil:
    """c's wheel deadline passed: prelude timeout, connect timeout (next backend), flush tick,
    half-close or idle timeout."""
    if c.state == CS_PRELUDE or c.state == CS_PRELUDE_SNI:
        prelude_timeout(c)
    elif c.state == CS_UDP_FLOW:
        udp_flow_timeout(c)             # core/udp.pxi
    elif c.state == CS_CONNECTING:
        conn_connect_failed(c, True)
    elif c.state == CS_FLUSHING:
        flush_tick(c)
    elif half_close_expired(c):
        W.me.half_close_timeouts += 1
        c.term = FLB_TERM_HALF_CLOSE_TIMEOUT + 1
        conn_close(c, True)
    else:
        W.me.timeouts_idle += 1
        c.term = FLB_TERM_IDLE_TIMEOUT + 1
        conn_close(c, False)
