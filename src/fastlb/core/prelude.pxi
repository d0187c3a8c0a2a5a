# core/prelude.pxi - connection preludes: the PROXY protocol header a trusted sender puts before the
# client's bytes, the TLS ClientHello's server name (SNI) read without terminating TLS, and the PROXY
# header fastlb writes to a backend before the first client byte.
#
#   accepted -> CS_PRELUDE (PROXY header expected) -> CS_PRELUDE_SNI (ClientHello expected)
#            -> route_select(c, sni) -> conn_connect -> CS_CONNECTING -> connected: the PROXY header
#            (pool.send_proxy) and the client's buffered bytes go out in one send -> CS_ESTABLISHED
#
# The client's first bytes are read into a bounded PreludeBuf (PRELUDE_CAP = 16 KiB) taken from a
# per-worker pool when the first byte arrives and given back as soon as they are all at the backend:
# a connection that has sent nothing yet, and every established connection, holds none.  The
# parsers (includes/flb_proxy.h, flb_tls.h) are pure C and stateless: each read re-parses the buffer.
# A received PROXY header is dropped; every byte after it (the ClientHello included) is forwarded
# unchanged.  The buffer keeps PP_HEADROOM bytes in front of the client's bytes so that the PROXY
# header fastlb sends lands right before them and both leave in one send().  Bounded in time by
# sni_timeout_ms (timer wheel), in memory by PRELUDE_CAP per connection in its prelude.

cdef enum:
    # (CS_PRELUDE: waiting for the PROXY header; CS_PRELUDE_SNI: for the ClientHello - core/state.pxi)
    PRELUDE_CAP = 16384     # client bytes a prelude may buffer (PROXY header + ClientHello)
    PP_HEADROOM = 112       # room in front of them for the PROXY header we send (>= FLB_PP_WRITE_MAX)
    SNI_NAME_CAP = 256
    PRELUDE_POOL_MAX = 256  # idle buffers kept per worker (4 MiB); more are freed


ctypedef struct PreludeBuf:
    uint32_t len                    # client bytes in data[PP_HEADROOM ..]
    uint32_t off                    # of those, the received PROXY header's (dropped)
    uint32_t out                    # next byte of data[] to send to the backend; 0 = not started
    uint8_t has_dst                 # dst: the destination a received PROXY header announced
    uint8_t dst[FLB_ADDR_LEN]
    void *next_free
    uint8_t data[PP_HEADROOM + PRELUDE_CAP]


ctypedef struct PreludeWorker:
    uint8_t *reasm                  # PRELUDE_CAP bytes: a ClientHello reassembled from its records
    PreludeBuf *free_list
    int n_free


cdef PreludeWorker PW


cdef int prelude_setup() noexcept nogil:
    """Allocate the per-worker reassembly buffer (worker_setup).  Returns 0 or -ENOMEM."""
    memset(&PW, 0, sizeof(PW))
    PW.reasm = <uint8_t *>malloc(PRELUDE_CAP)
    if PW.reasm == NULL:
        return -ENOMEM
    return 0


cdef inline PreludeBuf *pbuf(Conn *c) noexcept nogil:
    """c's PreludeBuf, taken from the pool (or malloc) on first use; NULL when out of memory."""
    cdef PreludeBuf *b = <PreludeBuf *>c.pre
    if b != NULL:
        return b
    if PW.free_list != NULL:
        b = PW.free_list
        PW.free_list = <PreludeBuf *>b.next_free
        PW.n_free -= 1
    else:
        b = <PreludeBuf *>malloc(sizeof(PreludeBuf))
        if b == NULL:
            return NULL
    b.len = 0
    b.off = 0
    b.out = 0
    b.has_dst = 0
    b.next_free = NULL
    c.pre = b
    return b


cdef void prelude_release(Conn *c) noexcept nogil:
    """Give c's PreludeBuf back (conn_close, and once its bytes are out).  No-op without one."""
    cdef PreludeBuf *b = <PreludeBuf *>c.pre
    if b == NULL:
        return
    c.pre = NULL
    if PW.n_free < PRELUDE_POOL_MAX:
        b.next_free = PW.free_list
        PW.free_list = b
        PW.n_free += 1
    else:
        free(b)


cdef inline bint prelude_wanted(Listener *l) noexcept nogil:
    return l.shm.proxy_protocol != FLB_PROXY_OFF or l.shm.needs_sni != 0


cdef inline bint proxy_trusted(Listener *l, Conn *c) noexcept nogil:
    """Is c's sender (the accepted peer) one of l's proxy_protocol_from prefixes?"""
    return routes_cidr_match(l.shm.proxy_from_first, l.shm.proxy_from_n, c.peer)


cdef void set_sockaddr(uint8_t *out, uint8_t family, const uint8_t *addr, uint16_t port) noexcept nogil:
    """out (FLB_ADDR_LEN bytes) = sockaddr_in / sockaddr_in6 of addr:port (port in host order)."""
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    memset(out, 0, FLB_ADDR_LEN)
    if family == AF_INET:
        a4 = <sockaddr_in *>out
        a4.sin_family = AF_INET
        a4.sin_port = htons(port)
        memcpy(&a4.sin_addr, addr, 4)
    else:
        a6 = <sockaddr_in6 *>out
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(port)
        memcpy(a6.sin6_addr.s6_addr, addr, 16)


cdef void prelude_begin(Conn *c, Listener *l) noexcept nogil:
    """A new connection on a listener with preludes: refuse an untrusted PROXY sender at once (reset,
    counted), else wait for its first bytes (bounded by sni_timeout_ms) and read what is there."""
    if l.shm.proxy_protocol != FLB_PROXY_OFF:
        if not proxy_trusted(l, c):
            flb_add64(&l.shm.proxy_refused, 1)
            c.term = FLB_TERM_PRELUDE_ERROR + 1
            conn_close(c, True)
            return
        c.state = CS_PRELUDE
    else:
        c.state = CS_PRELUDE_SNI
    c.start_us = W.now_us
    timer_schedule(c, W.now_ms + l.shm.sni_timeout_ms)
    c.flags |= F_C_RD                   # the first bytes often came with the handshake's last ACK
    prelude_run(c)


cdef void prelude_route(Conn *c, const char *sni, uint32_t sni_len) noexcept nogil:
    """The prelude is complete: pick the route (and pool) by c.peer and the server name, then start
    the backend connect; no route or no backend -> closed, counted as rejected."""
    cdef Listener *l = &W.listeners[c.listener]
    if conn_route(c, sni, sni_len) == FLB_NONE or conn_connect(c) < 0:
        if c.term == 0:
            c.term = FLB_TERM_NO_BACKEND + 1
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)


cdef void sni_fallback(Conn *c, Listener *l) noexcept nogil:
    """No usable server name (no ClientHello, not TLS, no SNI, too big, or the timeout): the default
    route, or a close when the listener's sni_policy is reject (route_select() applies it)."""
    flb_add64(&l.shm.sni_missing, 1)
    if conn_route(c, NULL, 0) == FLB_NONE:
        if c.route == FLB_NONE and l.sni_policy == FLB_SNI_POLICY_REJECT and l.needs_sni:
            flb_add64(&l.shm.sni_rejected, 1)   # refused for want of a name
            c.term = FLB_TERM_PRELUDE_ERROR + 1
        else:
            c.term = FLB_TERM_NO_BACKEND + 1
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)
        return
    if conn_connect(c) < 0:
        if c.term == 0:
            c.term = FLB_TERM_NO_BACKEND + 1
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)


cdef int proxy_accept(Conn *c, Listener *l, PreludeBuf *b) noexcept nogil:
    """Parse the PROXY header at the start of b's client bytes.  Returns 1 when it was accepted
    (c.peer is now the announced source; b.off its length), 0 when more bytes are needed, -1 when c
    was closed (malformed, oversized, wrong version, or cut short by the client's FIN: reset,
    counted)."""
    cdef flb_proxy_result r
    cdef int rc = flb_proxy_parse(b.data + PP_HEADROOM, b.len, &r)
    if rc == 0:
        if not (c.flags & F_C_EOF):
            return 0
        rc = -EINVAL                    # the sender finished before its header did
    if rc > 0 and ((l.shm.proxy_protocol == FLB_PROXY_V1 and r.version != 1)
                   or (l.shm.proxy_protocol == FLB_PROXY_V2 and r.version != 2)):
        rc = -EPROTO
    if rc < 0:
        flb_add64(&l.shm.proxy_errors, 1)
        c.term = FLB_TERM_PRELUDE_ERROR + 1
        conn_close(c, True)
        return -1
    flb_add64(&l.shm.proxy_accepted, 1)
    b.off = <uint32_t>rc
    if r.family == AF_INET or r.family == AF_INET6:
        set_sockaddr(c.peer, r.family, r.src_addr, r.src_port)
        c.peer_len = <uint8_t>(sizeof(sockaddr_in) if r.family == AF_INET else sizeof(sockaddr_in6))
        set_sockaddr(b.dst, r.family, r.dst_addr, r.dst_port)
        b.has_dst = 1
    return 1


cdef int prelude_read(Conn *c, PreludeBuf *b) noexcept nogil:
    """Read what the client has into b (up to PRELUDE_CAP).  A short read proves the socket queue
    empty (F_C_RD cleared, as pump_small does) unless its FIN was reported: then read on to the EOF
    (F_C_EOF).  Returns the bytes added (>= 0) or -errno."""
    cdef ssize_t n
    cdef size_t want
    cdef int added = 0, e
    while b.len < PRELUDE_CAP and not (c.flags & F_C_EOF):
        want = PRELUDE_CAP - b.len
        n = recv(c.cfd, b.data + PP_HEADROOM + b.len, want, MSG_DONTWAIT)
        if n > 0:
            b.len += <uint32_t>n
            added += <int>n
            if <size_t>n < want and not (c.flags & F_C_HUP):
                c.flags &= ~F_C_RD
                break
            continue
        if n == 0:
            c.flags |= F_C_EOF
            break
        e = errno
        if e == EINTR:
            continue
        if e == EAGAIN:
            c.flags &= ~F_C_RD
            break
        return -e
    return added


cdef void prelude_run(Conn *c) noexcept nogil:
    """Read the client's first bytes and move c through its prelude: PROXY header, then ClientHello,
    then route and connect.  Returns with c waiting for more bytes, connecting, or closed."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef PreludeBuf *b
    cdef int rc
    cdef char name[SNI_NAME_CAP]
    cdef size_t name_len = 0
    if c.flags & F_C_ERR:
        if c.state == CS_PRELUDE:
            flb_add64(&l.shm.proxy_errors, 1)
        c.term = FLB_TERM_CLIENT_RESET + 1
        conn_close(c, True)
        return
    if not (c.flags & F_C_RD):
        return
    b = pbuf(c)
    if b == NULL:
        W.me.emfile += 1                # out of memory: treated like the fd limit
        c.term = FLB_TERM_LOCAL_ERROR + 1
        conn_close(c, True)
        return
    rc = prelude_read(c, b)
    if rc < 0:
        if c.state == CS_PRELUDE:
            flb_add64(&l.shm.proxy_errors, 1)
        c.term = FLB_TERM_CLIENT_RESET + 1
        conn_close(c, True)
        return
    if b.len == b.off:
        if c.flags & F_C_EOF:
            # nothing (more) came before the FIN: a probe or a health check; no backend for it
            if c.state == CS_PRELUDE and b.len == 0:
                flb_add64(&l.shm.proxy_errors, 1)
                c.term = FLB_TERM_PRELUDE_ERROR + 1
                conn_close(c, True)
            else:
                conn_close(c, False)
        elif b.len == 0:
            prelude_release(c)          # woken without bytes: hold no buffer while waiting
        return
    if c.state == CS_PRELUDE:
        rc = proxy_accept(c, l, b)
        if rc <= 0:
            return
        if not l.shm.needs_sni:
            if b.len == b.off and (c.flags & F_C_EOF):
                conn_close(c, False)    # a header, then the FIN (a sender's health check)
                return
            prelude_route(c, NULL, 0)   # at once: the backend may be the one to speak first
            return
        c.state = CS_PRELUDE_SNI
        if b.len == b.off:
            if c.flags & F_C_EOF:
                conn_close(c, False)    # a header, then the FIN
            return
    rc = flb_sni_parse(b.data + PP_HEADROOM + b.off, b.len - b.off, PW.reasm, PRELUDE_CAP,
                       name, SNI_NAME_CAP, &name_len)
    if rc == FLB_SNI_NEED_MORE and b.len < PRELUDE_CAP and not (c.flags & F_C_EOF):
        return                          # the next segment comes with the next EPOLLIN edge
    if rc == FLB_SNI_FOUND:
        flb_add64(&l.shm.sni_found, 1)
        prelude_route(c, name, <uint32_t>name_len)
        return
    sni_fallback(c, l)


cdef void prelude_timeout(Conn *c) noexcept nogil:
    """sni_timeout_ms passed: a missing PROXY header resets; a missing ClientHello falls back."""
    cdef Listener *l = &W.listeners[c.listener]
    flb_add64(&l.shm.prelude_timeouts, 1)
    if c.state == CS_PRELUDE:
        flb_add64(&l.shm.proxy_errors, 1)
        c.term = FLB_TERM_PRELUDE_ERROR + 1
        conn_close(c, True)
        return
    sni_fallback(c, l)


cdef void unmap_v4(uint8_t *sa) noexcept nogil:
    """Rewrite a v4-mapped sockaddr_in6 (::ffff:a.b.c.d) as the sockaddr_in it stands for."""
    cdef sockaddr_in6 *a6 = <sockaddr_in6 *>sa
    cdef uint8_t a4[4]
    cdef uint16_t port
    memcpy(a4, a6.sin6_addr.s6_addr + 12, 4)
    port = ntohs(a6.sin6_port)
    set_sockaddr(sa, AF_INET, a4, port)


cdef bint is_v4_mapped(const uint8_t *sa) noexcept nogil:
    cdef const uint8_t *a
    cdef int k
    if (<sockaddr *>sa).sa_family != AF_INET6:
        return False
    a = (<sockaddr_in6 *>sa).sin6_addr.s6_addr
    for k in range(10):
        if a[k] != 0:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef int proxy_header(Conn *c, int version, uint8_t *out) noexcept nogil:
    """The PROXY header announcing c's client (c.peer) and the address it connected to (the one a
    received header announced, else our local address), into out (FLB_PP_WRITE_MAX bytes).
    Returns its length or -errno."""
    cdef PreludeBuf *s = <PreludeBuf *>c.pre
    cdef uint8_t src[FLB_ADDR_LEN]
    cdef uint8_t dst[FLB_ADDR_LEN]
    cdef socklen_t dlen = FLB_ADDR_LEN
    cdef flb_proxy_result h
    memcpy(src, c.peer, FLB_ADDR_LEN)
    if s != NULL and s.has_dst:
        memcpy(dst, s.dst, FLB_ADDR_LEN)
    else:
        memset(dst, 0, FLB_ADDR_LEN)
        if getsockname(c.cfd, <sockaddr *>dst, &dlen) < 0:
            return -errno
    # a dual-stack listener's IPv4 client: announce it as TCP4 (what the backend's logs should show)
    if is_v4_mapped(src) and is_v4_mapped(dst):
        unmap_v4(src)
        unmap_v4(dst)
    memset(&h, 0, sizeof(h))
    if (<sockaddr *>src).sa_family == (<sockaddr *>dst).sa_family:
        h.family = <uint8_t>(<sockaddr *>src).sa_family
        if h.family == AF_INET:
            memcpy(h.src_addr, &(<sockaddr_in *>src).sin_addr, 4)
            memcpy(h.dst_addr, &(<sockaddr_in *>dst).sin_addr, 4)
            h.src_port = ntohs((<sockaddr_in *>src).sin_port)
            h.dst_port = ntohs((<sockaddr_in *>dst).sin_port)
        else:
            memcpy(h.src_addr, (<sockaddr_in6 *>src).sin6_addr.s6_addr, 16)
            memcpy(h.dst_addr, (<sockaddr_in6 *>dst).sin6_addr.s6_addr, 16)
            h.src_port = ntohs((<sockaddr_in6 *>src).sin6_port)
            h.dst_port = ntohs((<sockaddr_in6 *>dst).sin6_port)
    # else (mixed families cannot come from one socket): family 0 = "UNKNOWN" / LOCAL
    return flb_proxy_write(version, &h, out, FLB_PP_WRITE_MAX)


cdef int prelude_connected(Conn *c) noexcept nogil:
    """The backend connect completed: the pool's PROXY header (send_proxy) goes first, right in front
    of the client bytes the prelude buffered, in one send.  What the socket does not take at once
    stays in c's PreludeBuf (prelude_flush sends it before any other client byte).  Returns 0, or
    -errno (the caller resets)."""
    cdef uint32_t version = W.pools[c.pool].send_proxy
    cdef uint8_t hdr[FLB_PP_WRITE_MAX]
    cdef PreludeBuf *b = <PreludeBuf *>c.pre
    cdef uint32_t start
    cdef int n = 0
    cdef ssize_t m
    if version != FLB_PROXY_OFF:
        n = proxy_header(c, <int>version, hdr)
        if n < 0:
            return n
    if b == NULL:
        if n == 0:
            return 0
        # no prelude: the header alone, usually taken whole by the fresh socket
        m = send(c.bfd, hdr, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if m < 0:
            if errno != EAGAIN and errno != EINTR:
                return -errno
            m = 0
        if m == n:
            return 0
        b = pbuf(c)
        if b == NULL:
            return -ENOMEM
        memcpy(b.data + PP_HEADROOM - (n - m), hdr + m, <size_t>(n - m))
        b.out = PP_HEADROOM - <uint32_t>(n - m)
        c.flags &= ~F_B_WR
        return 0
    start = PP_HEADROOM + b.off
    memcpy(b.data + start - n, hdr, <size_t>n)     # over the received header's bytes, or headroom
    b.out = start - <uint32_t>n
    return 0 if prelude_flush(c) >= 0 else -EIO


cdef int prelude_flush(Conn *c) noexcept nogil:
    """Send what c's PreludeBuf still holds for the backend (PROXY header, then the client's first
    bytes).  Returns 1 when all is out (the buffer is released: normal forwarding follows), 0 while
    the backend's socket is full (F_B_WR cleared), -errno on error."""
    cdef PreludeBuf *b = <PreludeBuf *>c.pre
    cdef uint32_t end, first
    cdef uint64_t sent
    cdef ssize_t m
    cdef int e
    if b == NULL:
        return 1
    end = PP_HEADROOM + b.len
    first = PP_HEADROOM + b.off         # the first client byte (before it: the PROXY header we send)
    while b.out < end:
        if not (c.flags & F_B_WR):
            return 0
        m = send(c.bfd, b.data + b.out, end - b.out, MSG_DONTWAIT | MSG_NOSIGNAL)
        if m < 0:
            e = errno
            if e == EAGAIN:
                c.flags &= ~F_B_WR
                return 0
            if e != EINTR:
                W.err_fd = c.bfd
                return -e
            continue
        if b.out + <uint32_t>m > first:
            # client bytes reached the backend: no retry elsewhere after this (they are gone)
            sent = b.out + <uint64_t>m - (first if b.out < first else b.out)
            flb_add64(&W.backends[c.backend].bytes_in, sent)
            c.bytes_c2b += sent
            c.flags |= F_C2B_SENT
        b.out += <uint32_t>m
    prelude_release(c)
    return 1
