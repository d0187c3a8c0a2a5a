# core/udp.pxi - UDP listeners: flows, batching, expiry (issue 13).
#
# A flow is (listener, client address:port, the local address the client sent to) -> one backend.
# Flows live in the connection slab (state CS_UDP_FLOW), so the timer wheel, the epoll tags with
# their generations and lb_pick() work for them unchanged; the UDP-only part of a flow sits in a
# parallel array U.flows[slot].  Lookup is an open-addressing (linear probing, backward-shift
# delete) index of slot + 1 (0 = empty), sized at twice the worker's flow capacity, so it is never
# more than half full.  Nothing here allocates per datagram: the index, the flow array and the
# batch buffers are allocated once in udp_setup() (calloc/malloc of untouched pages: memory
# follows use, not capacity).
#
# Backend side: one connected UDP socket per flow (what nginx does).  The kernel then does the
# demultiplexing of replies, and an ICMP error from the backend shows up on exactly that flow's
# socket (EPOLLERR, then ECONNREFUSED from recv/send).  Cost: one descriptor per flow.
#
# Client side: datagrams come in with recvmmsg() (UDP_BATCH at a time) from this worker's
# SO_REUSEPORT socket; the kernel hashes the 4-tuple to pick the socket, so a flow stays on one
# worker for its whole life.  Replies from the backend sockets are queued into a batch of the
# listener they belong to and go out with sendmmsg() on the listening socket, so the client sees the
# address it sent to; a wildcard listener (0.0.0.0 / ::) gets the destination address from
# IP_PKTINFO / IPV6_PKTINFO and sends the reply with the same control message.
#
# Datagrams are never merged, split or reordered: each is one recvmmsg entry and one send, in
# arrival order, through one socket per flow.

cdef enum:
    UDP_BATCH = 32          # datagrams per recvmmsg / sendmmsg
    UDP_BUF = 65536         # per datagram buffer: the largest UDP payload (65,507 / 65,527) fits
    UDP_CTRL_WORDS = 12     # 96 bytes of control message space per datagram (in6_pktinfo 40 + SO_RXQ_OVFL 24)
    UDP_KEY_LEN = 44        # listener (4) + family (2) + port (2) + address (16) + local address (16) + ifindex (4)
    UDP_RX_ROUNDS = 8       # recvmmsg calls per listener per loop turn before other work runs
    UDP_SPARE_MAX = 256     # spare backend sockets kept per backend per worker
    UDP_SPARE_IDLE_MS = 2000  # a spare unused this long is closed
    UDP_SWEEP_MS = 500      # how often spares are looked at for that
    UDP_BACKEND_RCVBUF = 1048576  # SO_RCVBUF of a flow's backend socket (the kernel doubles it)


ctypedef struct UdpFlow:
    uint64_t hash
    uint8_t key[UDP_KEY_LEN]
    uint8_t peer[FLB_ADDR_LEN]   # the client's sockaddr_in / sockaddr_in6 (replies go there)
    uint32_t peerlen
    uint32_t expect              # replies still expected (udp_responses per client datagram)
    uint32_t seq                 # the backend slot's seq when the socket was connected
    uint32_t ovfl_seen           # the backend socket's kernel drop count last read (SO_RXQ_OVFL)


ctypedef struct Udp:
    int n_listeners             # UDP listeners of this worker
    UdpFlow *flows              # [W.n_conns], by slab slot
    int32_t *index              # [mask + 1]: slot + 1, 0 = empty
    uint64_t mask
    int64_t n_flows
    int64_t capacity            # flows this worker may hold
    # receive batch (listening sockets)
    mmsghdr rx[UDP_BATCH]
    iovec rx_iov[UDP_BATCH]
    sockaddr_in6 rx_name[UDP_BATCH]
    uint64_t rx_ctrl[UDP_BATCH * UDP_CTRL_WORDS]
    char *rx_buf
    # reply batch (to clients, through one listening socket)
    mmsghdr tx[UDP_BATCH]
    iovec tx_iov[UDP_BATCH]
    sockaddr_in6 tx_name[UDP_BATCH]
    uint64_t tx_ctrl[UDP_BATCH * UDP_CTRL_WORDS]
    char *tx_buf
    int n_tx
    uint32_t tx_listener
    # spare sockets: per backend, a LIFO list (through Conn.next_free) of CS_UDP_SPARE slots
    int32_t *spare_head         # [n_backends]
    uint32_t *n_spare           # [n_backends]
    int64_t n_spares
    uint64_t next_sweep_ms


cdef Udp U


cdef int udp_setup() noexcept nogil:
    """Allocate the flow array, the index and the batch buffers if any listener is UDP.
    Returns 0 or -ENOMEM.  W.listeners and the slab must be set up already."""
    cdef int i
    cdef uint64_t want = 0, size = 1
    U.n_listeners = 0
    U.n_tx = 0
    U.tx_listener = FLB_NONE
    for i in range(W.n_listeners):
        if W.listeners[i].protocol == FLB_PROTO_UDP:
            U.n_listeners += 1
            want += W.listeners[i].max_flows
    if U.n_listeners == 0:
        return 0
    if want > <uint64_t>W.n_conns:
        want = <uint64_t>W.n_conns
    U.capacity = <int64_t>want
    while size < 2 * want:
        size <<= 1
    U.mask = size - 1
    U.index = <int32_t *>calloc(size, sizeof(int32_t))
    U.flows = <UdpFlow *>calloc(W.n_conns, sizeof(UdpFlow))
    U.rx_buf = <char *>malloc(<size_t>UDP_BATCH * UDP_BUF)
    U.tx_buf = <char *>malloc(<size_t>UDP_BATCH * UDP_BUF)
    U.spare_head = <int32_t *>malloc(sizeof(int32_t) * (W.hdr.n_backends + 1))
    U.n_spare = <uint32_t *>calloc(W.hdr.n_backends + 1, sizeof(uint32_t))
    if U.index == NULL or U.flows == NULL or U.rx_buf == NULL or U.tx_buf == NULL \
            or U.spare_head == NULL or U.n_spare == NULL:
        return -ENOMEM
    for i in range(<int>W.hdr.n_backends):
        U.spare_head[i] = -1
    U.n_spares = 0
    U.next_sweep_ms = W.now_ms + UDP_SWEEP_MS
    W.me.udp_flow_capacity = <uint64_t>U.capacity
    return 0


cdef inline uint64_t udp_key(Listener *l, uint32_t li, sockaddr_in6 *peer, msghdr *mh,
                             uint8_t *key) noexcept nogil:
    """Fill key[UDP_KEY_LEN] for a datagram from `peer` (with its IP_PKTINFO control message when
    the listener asked for one); returns the key's hash."""
    cdef sockaddr_in *a4
    cdef cmsghdr *cm
    cdef in_pktinfo *pi4
    cdef in6_pktinfo *pi6
    memset(key, 0, UDP_KEY_LEN)
    memcpy(key, &li, 4)
    memcpy(key + 4, &peer.sin6_family, 2)
    memcpy(key + 6, &peer.sin6_port, 2)
    if peer.sin6_family == AF_INET:
        a4 = <sockaddr_in *>peer
        memcpy(key + 8, &a4.sin_addr, 4)
    else:
        memcpy(key + 8, &peer.sin6_addr, 16)
    if l.udp_pktinfo and mh.msg_controllen > 0:
        cm = CMSG_FIRSTHDR(mh)
        while cm != NULL:
            if cm.cmsg_level == IPPROTO_IP and cm.cmsg_type == IP_PKTINFO:
                pi4 = <in_pktinfo *>CMSG_DATA(cm)
                memcpy(key + 24, &pi4.ipi_addr, 4)
            elif cm.cmsg_level == IPPROTO_IPV6 and cm.cmsg_type == IPV6_PKTINFO:
                pi6 = <in6_pktinfo *>CMSG_DATA(cm)
                memcpy(key + 24, &pi6.ipi6_addr, 16)
                memcpy(key + 40, &pi6.ipi6_ifindex, 4)
            cm = CMSG_NXTHDR(mh, cm)
    return flb_hash64(key, UDP_KEY_LEN, FLB_SEED_KEY)


cdef inline void udp_rx_drops(msghdr *mh, uint32_t *seen, uint64_t *counter) noexcept nogil:
    """Count what the kernel dropped on a socket with SO_RXQ_OVFL: a datagram queued after a drop
    carries the socket's drop total; its growth since *seen goes to *counter (shared memory)."""
    cdef cmsghdr *cm
    cdef uint32_t total
    if mh.msg_controllen == 0:
        return
    cm = CMSG_FIRSTHDR(mh)
    while cm != NULL:
        if cm.cmsg_level == SOL_SOCKET and cm.cmsg_type == SO_RXQ_OVFL:
            memcpy(&total, CMSG_DATA(cm), 4)
            if total != seen[0]:
                flb_add64(counter, <uint64_t>(total - seen[0]))
                seen[0] = total
            return
        cm = CMSG_NXTHDR(mh, cm)


cdef inline int32_t udp_find(uint8_t *key, uint64_t h) noexcept nogil:
    """The slab slot of the flow with this key, or -1."""
    cdef uint64_t pos = h & U.mask
    cdef int32_t e
    while True:
        e = U.index[pos]
        if e == 0:
            return -1
        if U.flows[e - 1].hash == h and memcmp(U.flows[e - 1].key, key, UDP_KEY_LEN) == 0:
            return e - 1
        pos = (pos + 1) & U.mask


cdef inline void udp_index_add(int32_t slot) noexcept nogil:
    """Put slot into the index (its key is not there: the caller looked it up)."""
    cdef uint64_t pos = U.flows[slot].hash & U.mask
    while U.index[pos] != 0:
        pos = (pos + 1) & U.mask
    U.index[pos] = slot + 1


cdef void udp_index_remove(int32_t slot) noexcept nogil:
    """Take slot out of the index, shifting later entries of its probe run back (no tombstones)."""
    cdef uint64_t i = U.flows[slot].hash & U.mask, j, k
    cdef int32_t e
    while U.index[i] != slot + 1:
        if U.index[i] == 0:
            return                  # not indexed (cannot happen; keeps a bug from looping)
        i = (i + 1) & U.mask
    while True:
        U.index[i] = 0
        j = i
        while True:
            j = (j + 1) & U.mask
            e = U.index[j]
            if e == 0:
                return
            k = U.flows[e - 1].hash & U.mask
            # the entry at j may stay unless its home k lies cyclically outside (i, j]
            if (i <= j and i < k and k <= j) or (i > j and (i < k or k <= j)):
                continue
            break
        U.index[i] = e
        i = j


cdef void udp_flow_end(Conn *c, bint reuse, uint16_t term) noexcept nogil:
    """Forget flow c, which ended for reason `term` (enum flb_term; c.term, when a deadline set it,
    wins): log it, unindex it, release the counters and the timer.  With `reuse` (the flow got
    every reply it expected, so nothing more is due on its socket) the slot and its connected
    backend socket become a spare for the next flow to the same backend; otherwise the socket is
    closed (which takes it out of epoll) and the slot freed.  Replies already queued for the
    client still go out (the batch holds copies)."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef int32_t slot = <int32_t>(c - W.conns)
    cdef uint32_t idx = c.backend
    if W.logring != NULL:
        if c.term == 0:
            c.term = <uint8_t>(term + 1)
        log_conn(c, False)
    udp_index_remove(slot)
    if idx != FLB_NONE:
        lb_drop(idx)
    timer_unlink(c)
    flb_sadd64(&l.shm.active, -1)
    W.wactive[W.hdr.n_backends + c.listener] -= 1
    W.active -= 1
    U.n_flows -= 1
    W.me.udp_flows = <uint64_t>U.n_flows
    if reuse and idx != FLB_NONE and U.n_spare[idx] < UDP_SPARE_MAX and not W.stopping \
            and flb_load32(&W.backends[idx].health) == FLB_HEALTH_UP:
        c.state = CS_UDP_SPARE
        c.active_ms = W.now_ms
        c.next_free = U.spare_head[idx]
        U.spare_head[idx] = slot
        U.n_spare[idx] += 1
        U.n_spares += 1
        return
    close_fd(c.bfd)
    c.bfd = -1
    c.backend = FLB_NONE
    slab_free(c)


cdef inline void udp_flow_close(Conn *c, uint16_t term) noexcept nogil:
    """Forget flow c (ended for reason `term`) and close its backend socket."""
    udp_flow_end(c, False, term)


cdef void udp_spare_unlink(Conn *s) noexcept nogil:
    """Take spare s off its backend's list (a walk of at most UDP_SPARE_MAX entries)."""
    cdef uint32_t idx = s.backend
    cdef int32_t slot = <int32_t>(s - W.conns), k = U.spare_head[idx], prev = -1
    while k >= 0 and k != slot:
        prev = k
        k = W.conns[k].next_free
    if k < 0:
        return
    if prev < 0:
        U.spare_head[idx] = s.next_free
    else:
        W.conns[prev].next_free = s.next_free
    U.n_spare[idx] -= 1
    U.n_spares -= 1
    s.next_free = -1


cdef void udp_spare_close(Conn *s) noexcept nogil:
    """Close spare s (on its backend's list) and free its slot."""
    udp_spare_unlink(s)
    close_fd(s.bfd)
    s.bfd = -1
    s.backend = FLB_NONE
    slab_free(s)


cdef int udp_spare_drain(Conn *s) noexcept nogil:
    """Read and drop whatever a spare's socket holds (replies nobody expects any more, counted in
    udp_drop_unexpected).  Returns 0, or -1 if the socket reports an error (ICMP from the backend:
    counted like a flow's; the caller closes it)."""
    cdef char byte
    cdef ssize_t n
    cdef int e
    cdef flb_backend_t *b = &W.backends[s.backend]
    while True:
        n = recv(s.bfd, &byte, 1, MSG_DONTWAIT | MSG_TRUNC)
        if n >= 0:
            flb_add64(&W.listeners[s.listener].shm.udp_drop_unexpected, 1)
            continue
        e = errno
        if e == EINTR:
            continue
        if e == EAGAIN:
            return 0
        if udp_icmp_error(e):
            flb_add64(&b.udp_unreachable, 1)
            backend_failed(b, False)
        return -1


cdef Conn *udp_spare_take(uint32_t idx) noexcept nogil:
    """A spare connected socket (with its slot) to backend idx, drained, off the list; NULL if none.
    A spare whose backend slot was rewritten since (seq moved) is closed, not returned."""
    cdef Conn *s
    cdef uint32_t seq = flb_load32_acq(&W.backends[idx].seq)
    while U.spare_head[idx] >= 0:
        s = &W.conns[U.spare_head[idx]]
        U.spare_head[idx] = s.next_free
        U.n_spare[idx] -= 1
        U.n_spares -= 1
        s.next_free = -1
        if U.flows[s - W.conns].seq == seq and udp_spare_drain(s) == 0:
            return s
        close_fd(s.bfd)
        s.bfd = -1
        s.backend = FLB_NONE
        slab_free(s)
    return NULL


cdef void udp_sweep() noexcept nogil:
    """Every UDP_SWEEP_MS: close the spares unused for UDP_SPARE_IDLE_MS."""
    cdef uint32_t idx
    cdef int32_t k, nxt
    if U.n_spares == 0 or W.now_ms < U.next_sweep_ms:
        return
    U.next_sweep_ms = W.now_ms + UDP_SWEEP_MS
    for idx in range(W.hdr.n_backends):
        k = U.spare_head[idx]
        while k >= 0:
            nxt = W.conns[k].next_free
            if W.now_ms - W.conns[k].active_ms >= UDP_SPARE_IDLE_MS:
                udp_spare_close(&W.conns[k])
            k = nxt


cdef void udp_backend_sockopts(int fd) noexcept nogil:
    """A flow's backend socket: a receive buffer for bursts of replies (UDP_BACKEND_RCVBUF, forced
    past net.core.rmem_max where the process may, else as far as rmem_max allows) and SO_RXQ_OVFL,
    so that whatever the kernel still drops is counted (udp_rx_drops).  Best effort: a socket whose
    options are refused works with the defaults."""
    cdef int size = UDP_BACKEND_RCVBUF, one = 1
    if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0:
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size))
    setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one))


cdef Conn *udp_flow_connect(Conn *c, Listener *l, int *rc) noexcept nogil:
    """Pick a backend for flow c (up to the pool's retries when a socket cannot be connected at
    once) and give c a connected, non-blocking UDP socket to it, registered with epoll - or hand
    over a spare socket to that backend: then c's slot is freed and the spare's slot (already in
    epoll) is returned as the flow.  Returns the flow's slot with *rc = 0, or NULL with *rc = -1
    when no backend could be picked, -2 when socket() failed (fd limit)."""
    cdef flb_pool_t *p = &W.pools[c.pool]
    cdef flb_backend_t *b
    cdef uint32_t idx
    cdef int fd, e
    cdef Conn *s
    cdef uint8_t addr[FLB_ADDR_LEN]
    cdef socklen_t alen
    cdef epoll_event ev
    rc[0] = -1
    while c.attempts <= p.retries and c.attempts < MAX_TRIES:
        idx = lb_pick(c, c.pool)
        if idx == FLB_NONE:
            if c.attempts == 0:
                flb_add64(&p.no_backend, 1)
                W.me.no_backend += 1
            return NULL
        c.tried[c.attempts] = idx
        c.attempts += 1
        if c.attempts > 1:
            W.me.retries += 1
        b = &W.backends[idx]
        flb_add64(&b.attempts, 1)
        s = udp_spare_take(idx)
        if s != NULL:
            s.state = CS_UDP_FLOW
            s.flags = 0
            s.listener = c.listener
            s.route = c.route
            s.pool = c.pool
            s.peer_len = c.peer_len
            memcpy(s.peer, c.peer, sizeof(c.peer))
            s.key_hash = c.key_hash
            s.active_ms = c.active_ms
            s.accepted_us = c.accepted_us
            s.bytes_c2b = 0
            s.bytes_b2c = 0
            s.term = 0
            s.attempts = c.attempts
            memcpy(s.tried, c.tried, sizeof(c.tried))
            slab_free(c)
            lb_take(idx)
            flb_add64(&b.total, 1)
            rc[0] = 0
            return s
        alen = backend_addr(idx, addr)
        if alen == 0:
            continue                    # no address to be had (core/conn.pxi): try another backend
        fd = socket((<sockaddr *>addr).sa_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            e = errno
            if e == EMFILE or e == ENFILE:
                W.me.emfile += 1
            W.me.udp_socket_errors += 1
            rc[0] = -2
            return NULL
        udp_backend_sockopts(fd)
        if connect(fd, <sockaddr *>addr, alen) < 0:
            # a UDP connect only sets the default destination: it fails at once or not at all
            close_fd(fd)
            W.me.udp_socket_errors += 1
            backend_failed(b, False)
            continue
        ev.events = EPOLLIN | EPOLLET
        ev.data.u64 = conn_tag(c, SIDE_BACKEND)
        if epoll_ctl(W.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
            close_fd(fd)
            W.me.udp_socket_errors += 1
            rc[0] = -2
            return NULL
        c.bfd = fd
        c.backend = idx
        U.flows[c - W.conns].seq = flb_load32_acq(&b.seq)
        U.flows[c - W.conns].ovfl_seen = 0
        lb_take(idx)
        flb_add64(&b.total, 1)
        rc[0] = 0
        return c
    return NULL


cdef void udp_four_tuple(Conn *c, Listener *l, uint8_t *key) noexcept nogil:
    """c.key_hash for a flow of a pool hashing `four_tuple`: the client's address and port, then the
    address the client sent to (the IP_PKTINFO one on a wildcard listener, in key[24:]) and the
    listener's port - the bytes lb_key_hash() hashes for a TCP connection (getsockname of its
    socket).  One getsockname(2) per new flow; on failure the source_ip_port hash stays."""
    cdef sockaddr_storage local
    cdef socklen_t llen = sizeof(local)
    cdef uint8_t buf[36]
    cdef size_t n
    if getsockname(l.fd, <sockaddr *>&local, &llen) != 0:
        return
    if l.udp_pktinfo:
        if local.ss_family == AF_INET:
            memcpy(&(<sockaddr_in *>&local).sin_addr, key + 24, 4)
        else:
            memcpy(&(<sockaddr_in6 *>&local).sin6_addr, key + 24, 16)
    n = sockaddr_key(<sockaddr_storage *>c.peer, buf, True)
    n += sockaddr_key(&local, buf + n, True)
    c.key_hash = flb_hash64(buf, n, FLB_SEED_KEY)


cdef Conn *udp_flow_new(Listener *l, uint32_t li, uint8_t *key, uint64_t h,
                        sockaddr_in6 *peer, socklen_t peerlen) noexcept nogil:
    """A new flow for this key with a backend socket, indexed and on the timer wheel; NULL when
    the datagram must be dropped (counted: table full, no backend, draining)."""
    cdef Conn *c
    cdef Conn *flow
    cdef UdpFlow *f
    cdef int rc
    if W.stopping:
        flb_add64(&l.shm.udp_drop_no_backend, 1)
        return NULL
    # reserve a place first, so that all workers together never exceed max_flows
    if flb_sadd64(&l.shm.active, 1) > <int64_t>l.max_flows or U.n_flows >= U.capacity \
            or slab_full() or fds_short() or W.active * 2 + U.n_spares + FD_RESERVE >= W.nofile:
        flb_sadd64(&l.shm.active, -1)
        flb_add64(&l.shm.udp_drop_table_full, 1)
        return NULL
    c = slab_alloc()
    c.listener = li
    c.state = CS_UDP_FLOW
    c.active_ms = W.now_ms
    c.accepted_us = W.now_us
    c.peer_len = <uint8_t>(peerlen if peerlen <= FLB_ADDR_LEN else FLB_ADDR_LEN)
    memcpy(c.peer, peer, c.peer_len)
    # routes (core/routes.pxi): source matches and the split pick c.pool (and c.key_hash)
    if conn_route(c, NULL, 0) == FLB_NONE:
        flb_sadd64(&l.shm.active, -1)
        flb_add64(&l.shm.udp_drop_no_backend, 1)
        flb_add64(&l.shm.rejected, 1)
        slab_free(c)
        return NULL
    if W.pools[c.pool].hash_key == FLB_HASH_FOUR_TUPLE and (W.pools[c.pool].algorithm == FLB_ALG_MAGLEV
                                                          or W.pools[c.pool].algorithm == FLB_ALG_RING_HASH):
        udp_four_tuple(c, l, key)   # conn_route() hashed the client only: a UDP flow has no cfd
    flow = udp_flow_connect(c, l, &rc)
    if flow == NULL:
        flb_sadd64(&l.shm.active, -1)
        flb_add64(&l.shm.udp_drop_no_backend if rc == -1 else &l.shm.udp_drop_table_full, 1)
        if rc == -1:
            flb_add64(&l.shm.rejected, 1)
        slab_free(c)
        return NULL
    c = flow
    f = &U.flows[c - W.conns]
    f.hash = h
    memcpy(f.key, key, UDP_KEY_LEN)
    memset(f.peer, 0, FLB_ADDR_LEN)
    memcpy(f.peer, peer, peerlen if peerlen <= FLB_ADDR_LEN else FLB_ADDR_LEN)
    f.peerlen = peerlen
    f.expect = 0
    udp_index_add(<int32_t>(c - W.conns))
    W.wactive[W.hdr.n_backends + li] += 1
    W.active += 1
    U.n_flows += 1
    W.me.udp_flows = <uint64_t>U.n_flows
    W.me.accepted += 1
    flb_add64(&l.shm.accepted, 1)
    timer_schedule(c, W.now_ms + l.udp_idle_timeout_ms)
    return c


cdef inline void udp_unreachable(Conn *c) noexcept nogil:
    """The backend answered a flow's datagram with an ICMP error: count it where passive ejection
    looks (consecutive_failures) and forget the flow; the client's next datagram makes a new one."""
    cdef flb_backend_t *b = &W.backends[c.backend]
    flb_add64(&b.udp_unreachable, 1)
    backend_failed(b, False)
    flb_add64(&W.listeners[c.listener].shm.udp_drop_unreachable, 1)
    udp_flow_close(c, FLB_TERM_BACKEND_UNREACHABLE)


cdef inline bint udp_icmp_error(int e) noexcept nogil:
    """Errors a connected UDP socket reports for an ICMP message from the path or the backend."""
    return e == ECONNREFUSED or e == EHOSTUNREACH or e == ENETUNREACH or e == EHOSTDOWN \
        or e == ENONET or e == EPROTO


cdef void udp_from_client(Listener *l, uint32_t li, mmsghdr *m, sockaddr_in6 *peer) noexcept nogil:
    """Forward one received client datagram on its flow (made if new); drops are counted."""
    cdef uint8_t key[UDP_KEY_LEN]
    cdef uint64_t h
    cdef int32_t slot
    cdef Conn *c
    cdef ssize_t n
    cdef int e
    cdef flb_backend_t *b
    udp_rx_drops(&m.msg_hdr, &l.udp_ovfl_seen, &l.shm.udp_drop_rcvbuf)
    if m.msg_hdr.msg_flags & MSG_TRUNC:
        flb_add64(&l.shm.udp_drop_oversized, 1)
        return
    h = udp_key(l, li, peer, &m.msg_hdr, key)
    slot = udp_find(key, h)
    if slot >= 0:
        c = &W.conns[slot]
        # a flow whose backend went down moves to another one with its next datagram
        if flb_load32(&W.backends[c.backend].health) != FLB_HEALTH_UP and not W.pools[c.pool].panic:
            udp_flow_close(c, FLB_TERM_BACKEND_DOWN)
            slot = -1
    if slot < 0:
        c = udp_flow_new(l, li, key, h, peer, m.msg_hdr.msg_namelen)
        if c == NULL:
            return
    b = &W.backends[c.backend]
    while True:
        n = send(c.bfd, (<iovec *>m.msg_hdr.msg_iov).iov_base, m.msg_len, MSG_DONTWAIT | MSG_NOSIGNAL)
        if n >= 0 or errno != EINTR:
            break
    if n < 0:
        e = errno
        if udp_icmp_error(e):
            udp_unreachable(c)      # an error for an earlier datagram of this flow; this one is lost too
        elif e == EMSGSIZE:
            flb_add64(&l.shm.udp_drop_oversized, 1)
        else:
            flb_add64(&l.shm.udp_drop_send, 1)
        return
    c.active_ms = W.now_ms
    c.bytes_c2b += <uint64_t>n
    if l.udp_responses > 0:
        U.flows[c - W.conns].expect += l.udp_responses
    flb_add64(&b.udp_datagrams_in, 1)
    flb_add64(&b.bytes_in, <uint64_t>n)


cdef void udp_listener_ready(Listener *l, uint32_t li) noexcept nogil:
    """Read what l's socket holds (UDP_RX_ROUNDS batches at most, then let other work run: l stays
    pending) and forward every datagram.  A draining worker reads nothing more: the socket is shared
    with the control process (and, after a takeover, the next instance's worker), which takes the
    new datagrams; the draining worker only sends the replies of its flows in flight."""
    cdef int k, n, r, e
    cdef mmsghdr *m
    if W.stopping:
        l.pending = 0
        return
    for r in range(UDP_RX_ROUNDS):
        for k in range(UDP_BATCH):
            m = &U.rx[k]
            U.rx_iov[k].iov_base = U.rx_buf + <size_t>k * UDP_BUF
            U.rx_iov[k].iov_len = UDP_BUF
            m.msg_hdr.msg_name = &U.rx_name[k]
            m.msg_hdr.msg_namelen = sizeof(sockaddr_in6)
            m.msg_hdr.msg_iov = &U.rx_iov[k]
            m.msg_hdr.msg_iovlen = 1
            # IP_PKTINFO (wildcard listeners) and SO_RXQ_OVFL (the kernel's drop count, when not 0)
            m.msg_hdr.msg_control = &U.rx_ctrl[k * UDP_CTRL_WORDS]
            m.msg_hdr.msg_controllen = UDP_CTRL_WORDS * 8
            m.msg_hdr.msg_flags = 0
            m.msg_len = 0
        n = recvmmsg(l.fd, U.rx, UDP_BATCH, MSG_DONTWAIT, NULL)
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e != EAGAIN:
                W.me.accept_errors += 1
                flb_add64(&l.shm.accept_errors, 1)
            l.pending = 0
            return
        W.me.udp_rx_calls += 1
        W.me.udp_rx_datagrams += <uint64_t>n
        for k in range(n):
            udp_from_client(l, li, &U.rx[k], &U.rx_name[k])
        flb_add64(&l.shm.udp_datagrams_in, <uint64_t>n)
        if n < UDP_BATCH:
            l.pending = 0           # a short batch: the queue was empty (the next datagram is a new edge)
            return


cdef void udp_flush() noexcept nogil:
    """Send the queued replies to their clients with sendmmsg on their listening socket.  A datagram
    the kernel refuses is counted and skipped; the rest still go."""
    cdef Listener *l
    cdef int off = 0, r, e
    cdef uint64_t sent = 0
    if U.n_tx == 0:
        return
    l = &W.listeners[U.tx_listener]
    while off < U.n_tx:
        if l.fd < 0:
            flb_add64(&l.shm.udp_drop_send, <uint64_t>(U.n_tx - off))
            break
        r = sendmmsg(l.fd, &U.tx[off], <unsigned int>(U.n_tx - off), MSG_DONTWAIT | MSG_NOSIGNAL)
        if r < 0:
            e = errno
            if e == EINTR:
                continue
            flb_add64(&l.shm.udp_drop_oversized if e == EMSGSIZE else &l.shm.udp_drop_send, 1)
            off += 1
            continue
        W.me.udp_tx_calls += 1
        W.me.udp_tx_datagrams += <uint64_t>r
        sent += <uint64_t>r
        off += r
    if sent > 0:
        flb_add64(&l.shm.udp_datagrams_out, sent)
    U.n_tx = 0


cdef inline void udp_reply_control(Listener *l, UdpFlow *f, int k) noexcept nogil:
    """Give reply k the IP_PKTINFO / IPV6_PKTINFO that makes it leave from the address the client
    sent to (wildcard listeners only)."""
    cdef msghdr *mh = &U.tx[k].msg_hdr
    cdef cmsghdr *cm
    cdef in_pktinfo *pi4
    cdef in6_pktinfo *pi6
    mh.msg_control = &U.tx_ctrl[k * UDP_CTRL_WORDS]
    memset(mh.msg_control, 0, UDP_CTRL_WORDS * 8)
    if (<sockaddr *>f.peer).sa_family == AF_INET:
        mh.msg_controllen = CMSG_SPACE(sizeof(in_pktinfo))
        cm = CMSG_FIRSTHDR(mh)
        cm.cmsg_level = IPPROTO_IP
        cm.cmsg_type = IP_PKTINFO
        cm.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
        pi4 = <in_pktinfo *>CMSG_DATA(cm)
        memcpy(&pi4.ipi_spec_dst, f.key + 24, 4)
    else:
        mh.msg_controllen = CMSG_SPACE(sizeof(in6_pktinfo))
        cm = CMSG_FIRSTHDR(mh)
        cm.cmsg_level = IPPROTO_IPV6
        cm.cmsg_type = IPV6_PKTINFO
        cm.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
        pi6 = <in6_pktinfo *>CMSG_DATA(cm)
        memcpy(&pi6.ipi6_addr, f.key + 24, 16)
        memcpy(&pi6.ipi6_ifindex, f.key + 40, 4)


cdef void udp_flow_event(Conn *c, uint32_t events) noexcept nogil:
    """The backend socket of flow c is readable (or has an error): read its datagrams into the
    reply batch (flushing it when full or when it holds another listener's replies), then close
    the flow if it got every reply it expected."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef UdpFlow *f = &U.flows[c - W.conns]
    cdef flb_backend_t *b = &W.backends[c.backend]
    cdef int k, n, room, e, got = 0, j
    cdef uint64_t nbytes = 0
    cdef mmsghdr *m
    while True:
        if U.n_tx > 0 and (U.n_tx == UDP_BATCH or U.tx_listener != c.listener):
            udp_flush()
        U.tx_listener = c.listener
        room = UDP_BATCH - U.n_tx
        for k in range(U.n_tx, UDP_BATCH):
            m = &U.tx[k]
            U.tx_iov[k].iov_base = U.tx_buf + <size_t>k * UDP_BUF
            U.tx_iov[k].iov_len = UDP_BUF
            m.msg_hdr.msg_name = NULL
            m.msg_hdr.msg_namelen = 0
            m.msg_hdr.msg_iov = &U.tx_iov[k]
            m.msg_hdr.msg_iovlen = 1
            # received into: SO_RXQ_OVFL; then reused for the reply's own control message
            m.msg_hdr.msg_control = &U.tx_ctrl[k * UDP_CTRL_WORDS]
            m.msg_hdr.msg_controllen = UDP_CTRL_WORDS * 8
            m.msg_hdr.msg_flags = 0
        n = recvmmsg(c.bfd, &U.tx[U.n_tx], <unsigned int>room, MSG_DONTWAIT, NULL)
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                break
            if got > 0:
                backend_succeeded(b)
            if udp_icmp_error(e):
                udp_unreachable(c)
            else:
                flb_add64(&l.shm.udp_drop_send, 1)
                udp_flow_close(c, FLB_TERM_LOCAL_ERROR)
            return
        j = U.n_tx
        for k in range(U.n_tx, U.n_tx + n):
            m = &U.tx[k]
            udp_rx_drops(&m.msg_hdr, &f.ovfl_seen, &l.shm.udp_drop_reply_rcvbuf)  # (k: not rewritten yet)
            if m.msg_hdr.msg_flags & MSG_TRUNC:
                flb_add64(&l.shm.udp_drop_oversized, 1)
                continue
            if l.udp_responses > 0:
                if f.expect == 0:
                    flb_add64(&l.shm.udp_drop_unexpected, 1)
                    continue
                f.expect -= 1
            if j != k:              # close the gap of a skipped entry (rare: copy, buffers stay put)
                memcpy(U.tx_buf + <size_t>j * UDP_BUF, U.tx_buf + <size_t>k * UDP_BUF, m.msg_len)
                U.tx[j].msg_len = m.msg_len
            m = &U.tx[j]
            U.tx_iov[j].iov_len = m.msg_len
            memcpy(&U.tx_name[j], f.peer, f.peerlen)
            m.msg_hdr.msg_name = &U.tx_name[j]
            m.msg_hdr.msg_namelen = f.peerlen
            if l.udp_pktinfo:
                udp_reply_control(l, f, j)
            else:
                m.msg_hdr.msg_control = NULL
                m.msg_hdr.msg_controllen = 0
            nbytes += m.msg_len
            got += 1
            j += 1
        U.n_tx = j
        if n < room:
            break
    if got > 0:
        backend_succeeded(b)
        flb_add64(&b.udp_datagrams_out, <uint64_t>got)
        flb_add64(&b.bytes_out, nbytes)
        c.active_ms = W.now_ms
        c.bytes_b2c += nbytes
        if l.udp_responses > 0 and f.expect == 0:
            flb_add64(&l.shm.udp_expired_responses, 1)
            udp_flow_end(c, True, FLB_TERM_RESPONSES)   # nothing more is due on its socket: a spare


cdef void udp_flow_timeout(Conn *c) noexcept nogil:
    """udp_idle_timeout passed without a datagram either way: forget the flow."""
    flb_add64(&W.listeners[c.listener].shm.udp_expired_idle, 1)
    W.me.timeouts_idle += 1
    udp_flow_close(c, FLB_TERM_IDLE_TIMEOUT)


cdef void udp_event(Conn *c, uint32_t events) noexcept nogil:
    """An epoll event on a UDP slot: a flow's backend socket, or a spare's (stray datagrams are
    dropped; an error closes the spare)."""
    if c.state == CS_UDP_FLOW:
        udp_flow_event(c, events)
    elif udp_spare_drain(c) < 0:
        udp_spare_close(c)


cdef void udp_conn_close(Conn *c) noexcept nogil:
    """conn_close() for a UDP slot (drain deadline, teardown): a flow or a spare."""
    if c.state == CS_UDP_FLOW:
        udp_flow_close(c, FLB_TERM_LOCAL_ERROR)     # c.term says which deadline, when one did
    else:
        udp_spare_close(c)


cdef void udp_teardown() noexcept nogil:
    free(U.spare_head)
    free(U.n_spare)
    U.spare_head = NULL
    U.n_spare = NULL
    free(U.index)
    free(U.flows)
    free(U.rx_buf)
    free(U.tx_buf)
    U.index = NULL
    U.flows = NULL
    U.rx_buf = NULL
    U.tx_buf = NULL
