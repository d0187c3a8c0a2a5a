# core/prelude.pxi - connection preludes: the PROXY protocol header a trusted sender puts before the
# client's bytes, the TLS ClientHello's server name (SNI) read without terminating TLS, and the PROXY
# header fastlb writes to a backend before the first client byte.
#
#   accepted -> CS_PRELUDE (PROXY header expected) -> CS_PRELUDE_SNI (ClientHello expected)
#            -> route_select(c, sni) -> conn_connect -> CS_CONNECTING -> connected: PROXY header out
#            first (pool.send_proxy), then the client's bytes as they came -> CS_ESTABLISHED
#
# The client's bytes are never copied into a per-connection buffer: each time the client socket is
# readable the worker looks at what it has sent so far with recv(MSG_PEEK) into ONE per-worker buffer
# (PRELUDE_PEEK bytes) and parses it with the pure-C parsers (includes/flb_proxy.h, flb_tls.h).  A
# received PROXY header is then consumed (recv) and dropped; the ClientHello stays in the kernel's
# socket buffer and is forwarded by the normal pump, unchanged.  A connection in its prelude holds no
# memory of its own; the only per-connection allocation is a small PreludeState (from a per-worker
# free list) for a PROXY destination address to re-announce, or a header the backend's socket did not
# take at once, released as soon as that header is out.  Everything is bounded by sni_timeout_ms.

cdef enum:
    CS_PRELUDE = 3          # listener with proxy_protocol: waiting for the PROXY header
    CS_PRELUDE_SNI = 4      # listener with SNI routes: waiting for the ClientHello's server name
    PRELUDE_PEEK = 16384    # bytes of the client's first flight looked at (PROXY header + ClientHello)
    SNI_NAME_CAP = 256
    PRELUDE_POOL_MAX = 1024 # idle PreludeStates kept per worker


ctypedef struct PreludeState:
    uint8_t dst[FLB_ADDR_LEN]       # the destination a received PROXY header announced (has_dst)
    uint8_t has_dst
    uint8_t hdr_len                 # a PROXY header for the backend: hdr[hdr_sent .. hdr_len) to go
    uint8_t hdr_sent
    uint8_t hdr[FLB_PP_WRITE_MAX]
    void *next_free


ctypedef struct PreludeWorker:
    uint8_t *peek                   # PRELUDE_PEEK bytes: MSG_PEEK copy of the client's first bytes
    uint8_t *reasm                  # PRELUDE_PEEK bytes: a ClientHello reassembled from its records
    flb_cidr_t *cidrs               # the region's address ranges (proxy_protocol_from slices)
    uint32_t n_cidrs
    PreludeState *free_list
    int n_free


cdef PreludeWorker PW


cdef int prelude_setup() noexcept nogil:
    """Allocate the per-worker peek and reassembly buffers (worker_setup).  Returns 0 or -ENOMEM."""
    memset(&PW, 0, sizeof(PW))
    PW.peek = <uint8_t *>malloc(PRELUDE_PEEK)
    PW.reasm = <uint8_t *>malloc(PRELUDE_PEEK)
    if PW.peek == NULL or PW.reasm == NULL:
        return -ENOMEM
    PW.cidrs = <flb_cidr_t *>(W.base + W.hdr.cidrs_off)
    PW.n_cidrs = W.hdr.n_cidrs
    return 0


cdef inline PreludeState *pstate(Conn *c) noexcept nogil:
    """c's PreludeState, taken from the free list (or malloc) on first use; NULL when out of memory."""
    cdef PreludeState *s = <PreludeState *>c.pre
    if s != NULL:
        return s
    if PW.free_list != NULL:
        s = PW.free_list
        PW.free_list = <PreludeState *>s.next_free
        PW.n_free -= 1
    else:
        s = <PreludeState *>malloc(sizeof(PreludeState))
        if s == NULL:
            return NULL
    s.has_dst = 0
    s.hdr_len = 0
    s.hdr_sent = 0
    s.next_free = NULL
    c.pre = s
    return s


cdef void prelude_release(Conn *c) noexcept nogil:
    """Give c's PreludeState back (conn_close, and once its header is out).  No-op without one."""
    cdef PreludeState *s = <PreludeState *>c.pre
    if s == NULL:
        return
    c.pre = NULL
    if PW.n_free < PRELUDE_POOL_MAX:
        s.next_free = PW.free_list
        PW.free_list = s
        PW.n_free += 1
    else:
        free(s)


cdef inline bint prelude_wanted(Listener *l) noexcept nogil:
    return l.shm.proxy_protocol != FLB_PROXY_OFF or l.shm.needs_sni != 0


cdef bint cidr_contains(flb_cidr_t *r, const uint8_t *sa) noexcept nogil:
    """Is the address of sockaddr sa (sockaddr_in / sockaddr_in6; a v4-mapped IPv6 address counts as
    its IPv4 address) inside range r?"""
    cdef const uint8_t *a
    cdef uint32_t fam = (<sockaddr *>sa).sa_family
    cdef uint32_t bits, full, k
    cdef uint8_t mask
    if fam == AF_INET:
        a = <const uint8_t *>&(<sockaddr_in *>sa).sin_addr
    else:
        a = (<sockaddr_in6 *>sa).sin6_addr.s6_addr
        if r.family == AF_INET:
            # ::ffff:a.b.c.d (a dual-stack listener's IPv4 client)
            for k in range(10):
                if a[k] != 0:
                    return False
            if a[10] != 0xFF or a[11] != 0xFF:
                return False
            a = a + 12
            fam = AF_INET
    if fam != r.family:
        return False
    bits = r.prefix
    full = bits // 8
    for k in range(full):
        if a[k] != r.addr[k]:
            return False
    if bits % 8:
        mask = <uint8_t>(0xFF << (8 - bits % 8))
        if (a[full] & mask) != (r.addr[full] & mask):
            return False
    return True


cdef bint proxy_trusted(Listener *l, Conn *c) noexcept nogil:
    """Is c's sender (the accepted peer) one of l's proxy_protocol_from ranges?"""
    cdef uint32_t i, first = l.shm.proxy_from_first, n = l.shm.proxy_from_n
    if first + n > PW.n_cidrs:
        return False
    for i in range(first, first + n):
        if cidr_contains(&PW.cidrs[i], c.peer):
            return True
    return False


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
    counted), else wait for its first bytes (bounded by sni_timeout_ms) and look at what is there."""
    if l.shm.proxy_protocol != FLB_PROXY_OFF:
        if not proxy_trusted(l, c):
            flb_add64(&l.shm.proxy_refused, 1)
            conn_close(c, True)
            return
        c.state = CS_PRELUDE
    else:
        c.state = CS_PRELUDE_SNI
    c.start_us = W.now_us
    timer_schedule(c, W.now_ms + l.shm.sni_timeout_ms)
    c.flags |= F_C_RD                   # a sender often has its header out with the handshake: look now
    prelude_run(c)


cdef void prelude_route(Conn *c, const char *sni, uint32_t sni_len) noexcept nogil:
    """The prelude is complete: pick the route (and pool) by c.peer and the server name, then start
    the backend connect; no route or no backend -> closed, counted as rejected."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef flb_pool_t *p
    if route_select(c, sni, sni_len) == FLB_NONE:
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)
        return
    p = &W.pools[c.pool]
    c.flags |= F_C_RD                   # the bytes we only looked at are still there for the pump
    if p.algorithm == FLB_ALG_MAGLEV or p.algorithm == FLB_ALG_RING_HASH:
        c.key_hash = lb_key_hash(p.hash_key, <sockaddr_storage *>c.peer, c.cfd)
    if conn_connect(c) < 0:
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)


cdef void sni_fallback(Conn *c, Listener *l) noexcept nogil:
    """No usable server name (no ClientHello, not TLS, no SNI, too big, or the timeout): the default
    route, or a close when the listener's sni_policy is reject."""
    flb_add64(&l.shm.sni_missing, 1)
    if l.shm.sni_policy == FLB_SNI_POLICY_REJECT:
        flb_add64(&l.shm.sni_rejected, 1)
        flb_add64(&l.shm.rejected, 1)
        conn_close(c, False)
        return
    prelude_route(c, NULL, 0)


cdef int proxy_accept(Conn *c, Listener *l, ssize_t n) noexcept nogil:
    """Parse the PROXY header in PW.peek[0 .. n).  Returns 1 when it was accepted and consumed from
    the socket (c.peer now the announced source), 0 when more bytes are needed, -1 when c was closed
    (malformed, oversized, wrong version, or truncated by the client's FIN: reset, counted)."""
    cdef flb_proxy_result r
    cdef PreludeState *s
    cdef int rc = flb_proxy_parse(PW.peek, <size_t>n, &r)
    cdef ssize_t got
    if rc == 0:
        if not (c.flags & F_C_HUP):
            return 0
        rc = -EINVAL                    # the sender finished before its header did
    if rc > 0 and ((l.shm.proxy_protocol == FLB_PROXY_V1 and r.version != 1)
                   or (l.shm.proxy_protocol == FLB_PROXY_V2 and r.version != 2)):
        rc = -EPROTO
    if rc > 0:
        # drop the header from the socket: the bytes after it are the client's
        got = recv(c.cfd, PW.peek, <size_t>rc, MSG_DONTWAIT)
        if got != rc:
            rc = -EIO
    if rc < 0:
        flb_add64(&l.shm.proxy_errors, 1)
        conn_close(c, True)
        return -1
    flb_add64(&l.shm.proxy_accepted, 1)
    if r.family == AF_INET or r.family == AF_INET6:
        s = pstate(c)
        if s == NULL:
            W.me.emfile += 1            # out of memory: treated like the fd limit
            conn_close(c, True)
            return -1
        set_sockaddr(c.peer, r.family, r.src_addr, r.src_port)
        set_sockaddr(s.dst, r.family, r.dst_addr, r.dst_port)
        s.has_dst = 1
    return 1


cdef void prelude_run(Conn *c) noexcept nogil:
    """Look at what the client has sent so far (MSG_PEEK) and move c through its prelude: PROXY
    header, then ClientHello, then route and connect.  Returns with c waiting for more bytes,
    connecting, or closed."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef ssize_t n
    cdef int rc, e
    cdef char name[SNI_NAME_CAP]
    cdef size_t name_len = 0
    if c.flags & F_C_ERR:
        if c.state == CS_PRELUDE:
            flb_add64(&l.shm.proxy_errors, 1)
        conn_close(c, True)
        return
    if not (c.flags & (F_C_RD | F_C_HUP)):
        return
    while True:
        n = recv(c.cfd, PW.peek, PRELUDE_PEEK, MSG_PEEK | MSG_DONTWAIT)
        if n >= 0:
            break
        e = errno
        if e == EINTR:
            continue
        if e == EAGAIN:
            c.flags &= ~F_C_RD
            if c.flags & F_C_HUP:
                n = 0
                break
            return
        if c.state == CS_PRELUDE:
            flb_add64(&l.shm.proxy_errors, 1)
        conn_close(c, True)
        return
    c.flags &= ~F_C_RD                  # nothing new until the next EPOLLIN edge
    if n == 0:
        # the client closed (or half-closed) before sending anything
        if c.state == CS_PRELUDE:
            flb_add64(&l.shm.proxy_errors, 1)
            conn_close(c, True)
        else:
            conn_close(c, False)
        return
    if c.state == CS_PRELUDE:
        rc = proxy_accept(c, l, n)
        if rc <= 0:
            return
        if not l.shm.needs_sni:
            prelude_route(c, NULL, 0)
            return
        c.state = CS_PRELUDE_SNI
        # the header is consumed; what followed it is already in PW.peek after the header
        n = recv(c.cfd, PW.peek, PRELUDE_PEEK, MSG_PEEK | MSG_DONTWAIT)
        if n <= 0:
            if n < 0 and errno != EAGAIN and errno != EINTR:
                conn_close(c, True)
            elif c.flags & F_C_HUP:
                conn_close(c, False)    # a header and nothing else, then the FIN
            return
    rc = flb_sni_parse(PW.peek, <size_t>n, PW.reasm, PRELUDE_PEEK, name, SNI_NAME_CAP, &name_len)
    if rc == FLB_SNI_NEED_MORE and n < PRELUDE_PEEK and not (c.flags & F_C_HUP):
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
    cdef PreludeState *s = <PreludeState *>c.pre
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
    """The backend connect completed: write the pool's PROXY header (send_proxy) before anything
    else.  What the socket does not take at once waits in c's PreludeState (flushed by
    prelude_flush before any client byte moves).  Returns 0, or -errno (the caller resets)."""
    cdef uint32_t version = W.pools[c.pool].send_proxy
    cdef uint8_t hdr[FLB_PP_WRITE_MAX]
    cdef PreludeState *s
    cdef int n
    cdef ssize_t m
    if version == FLB_SEND_PROXY_OFF:
        prelude_release(c)
        return 0
    n = proxy_header(c, <int>version, hdr)
    if n < 0:
        return n
    m = send(c.bfd, hdr, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
    if m < 0:
        if errno != EAGAIN and errno != EINTR:
            return -errno
        m = 0
    if m == n:
        prelude_release(c)
        return 0
    s = pstate(c)
    if s == NULL:
        return -ENOMEM
    memcpy(s.hdr, hdr, <size_t>n)
    s.hdr_len = <uint8_t>n
    s.hdr_sent = <uint8_t>m
    c.flags &= ~F_B_WR
    return 0


cdef int prelude_flush(Conn *c) noexcept nogil:
    """Send the rest of c's pending PROXY header.  Returns 1 when it is all out (the PreludeState is
    released: client bytes may follow), 0 while the backend's socket is full, -errno on error."""
    cdef PreludeState *s = <PreludeState *>c.pre
    cdef ssize_t m
    if s == NULL or s.hdr_sent >= s.hdr_len:
        prelude_release(c)
        return 1
    if not (c.flags & F_B_WR):
        return 0
    while True:
        m = send(c.bfd, s.hdr + s.hdr_sent, <size_t>(s.hdr_len - s.hdr_sent), MSG_DONTWAIT | MSG_NOSIGNAL)
        if m >= 0:
            break
        if errno == EAGAIN:
            c.flags &= ~F_B_WR
            return 0
        if errno != EINTR:
            return -errno
    s.hdr_sent += <uint8_t>m
    if s.hdr_sent >= s.hdr_len:
        prelude_release(c)
        return 1
    return 0
