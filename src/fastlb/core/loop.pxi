# core/loop.pxi - worker setup, accept, event dispatch, signals and the loop itself.


cdef void accept_ready(Listener *l, uint32_t li) noexcept nogil:
    """Accept up to ACCEPT_BATCH connections from l and start their backend connects.

    Stops at EAGAIN (queue empty: l.pending = 0), at max_connections (paused until a connection
    ends; they wait in the kernel backlog, never accept-and-drop) and at the fd limit (paused for
    EMFILE_PAUSE_MS: no spinning, the backlog keeps them).
    """
    cdef int k, fd, e
    cdef sockaddr_storage peer
    cdef socklen_t plen
    cdef Conn *c
    cdef epoll_event ev
    cdef flb_pool_t *p
    for k in range(ACCEPT_BATCH):
        # reserve a place first, so that all workers together never exceed max_connections
        if flb_sadd64(&l.shm.active, 1) > <int64_t>l.max_connections and l.max_connections > 0:
            flb_sadd64(&l.shm.active, -1)
            if not l.paused_full:
                l.paused_full = 1
                flb_add64(&l.shm.paused_full, 1)
            return
        if slab_full() or fds_short():
            flb_sadd64(&l.shm.active, -1)
            W.me.emfile += 1
            l.paused_until = W.now_ms + EMFILE_PAUSE_MS
            return
        plen = sizeof(peer)
        fd = accept4(l.fd, <sockaddr *>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            e = errno
            flb_sadd64(&l.shm.active, -1)
            if e == EAGAIN:
                l.pending = 0
                return
            if e == EINTR or e == ECONNABORTED:
                continue
            if e == EMFILE or e == ENFILE or e == ENOBUFS or e == ENOMEM:
                W.me.emfile += 1
                pipes_release_pool()
            else:
                W.me.accept_errors += 1
                flb_add64(&l.shm.accept_errors, 1)
            l.paused_until = W.now_ms + EMFILE_PAUSE_MS
            return
        c = slab_alloc()
        c.cfd = fd
        c.listener = li
        if l.linger:
            c.flags |= F_C_LINGER       # inherited from the listening socket: no syscall
        c.accepted_us = W.now_us
        c.peer_len = <uint8_t>(plen if plen <= FLB_ADDR_LEN else FLB_ADDR_LEN)
        memcpy(c.peer, &peer, c.peer_len)
        W.wactive[W.hdr.n_backends + li] += 1
        c.active_ms = W.now_ms
        W.active += 1
        W.me.accepted += 1
        flb_add64(&l.shm.accepted, 1)
        # TCP_NODELAY comes from the listening socket (accepted sockets inherit it)
        sock_protect_client(fd, l.shm)
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = conn_tag(c, SIDE_CLIENT)
        if epoll_ctl(W.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
            conn_close(c, True)
            continue
        if prelude_wanted(l):
            prelude_begin(c, l)         # PROXY header / ClientHello first: core/prelude.pxi
            continue
        if conn_route(c, NULL, 0) == FLB_NONE or conn_connect(c) < 0:
            if c.term == 0:
                c.term = FLB_TERM_NO_BACKEND + 1
            flb_add64(&l.shm.rejected, 1)
            conn_close(c, False)


cdef void begin_drain(uint32_t shutdown_ms) noexcept nogil:
    """Stop accepting at once (close our listening sockets); connections continue until they end
    or the shutdown deadline."""
    cdef int i
    if W.stopping:
        return
    W.stopping = 1
    W.stop_deadline_ms = W.now_ms + shutdown_ms
    W.me.state = 2
    for i in range(W.n_listeners):
        # a UDP listener's socket also carries the replies: it stays open (but is not read any
        # more) until the worker's flows are gone (core/udp.pxi)
        if W.listeners[i].fd >= 0 and W.listeners[i].protocol != FLB_PROTO_UDP:
            close_fd(W.listeners[i].fd)
            W.listeners[i].fd = -1
            W.listeners[i].pending = 0


cdef void read_signals(uint32_t shutdown_ms) noexcept nogil:
    cdef signalfd_siginfo si
    cdef ssize_t n
    while True:
        n = read(W.sfd, &si, sizeof(si))
        if n != sizeof(si):
            if n < 0 and errno == EINTR:
                continue
            return
        if si.ssi_signo == SIGTERM or si.ssi_signo == SIGINT:
            begin_drain(shutdown_ms)
        # SIGHUP: the control process reloads; workers pick the change up from shared memory


cdef void dispatch(epoll_event *ev, uint32_t shutdown_ms) noexcept nogil:
    cdef uint64_t u = ev.data.u64
    cdef uint32_t e = ev.events
    cdef uint32_t slot, gen, idx
    cdef Conn *c
    if u & TAG_SPECIAL:
        idx = <uint32_t>(u & 0xFFFFFFFFULL)
        if idx == SPECIAL_SIGNAL:
            read_signals(shutdown_ms)
        elif idx == SPECIAL_PARENT:
            orphan_begin()
        elif idx < <uint32_t>W.n_listeners and W.listeners[idx].fd >= 0:
            W.listeners[idx].pending = 1
        return
    slot = <uint32_t>((u >> 1) & 0x7FFFFFFFULL)
    gen = <uint32_t>((u >> 32) & 0x7FFFFFFFULL)
    if slot >= <uint32_t>W.n_conns:
        return
    c = &W.conns[slot]
    if c.state == CS_FREE or c.gen != gen:
        return                          # stale: the slot was freed (and maybe reused) meanwhile
    if c.state == CS_UDP_FLOW or c.state == CS_UDP_SPARE:
        udp_event(c, e)                 # core/udp.pxi: a flow's or a spare's backend socket
        return
    if (u & 1) == SIDE_CLIENT:
        if e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            c.flags |= F_C_RD
        if e & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            c.flags |= F_C_WR
        if e & EPOLLERR:
            c.flags |= F_C_ERR
        if e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            c.flags |= F_C_HUP
    else:
        if e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            c.flags |= F_B_RD
        if e & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            c.flags |= F_B_WR
        if e & EPOLLERR:
            c.flags |= F_B_ERR
        if e & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            c.flags |= F_B_HUP
    conn_run(c)


cdef void retry_starved() noexcept nogil:
    """Run the connections that waited for a pipe again (they re-park if still short)."""
    cdef int32_t n = W.n_starved, k, slot
    cdef uint32_t gen
    cdef Conn *c
    for k in range(n):
        slot = W.starved[W.starved_head]
        gen = W.starved_gen[W.starved_head]
        W.starved_head = (W.starved_head + 1) % W.n_conns
        W.n_starved -= 1
        c = &W.conns[slot]
        if c.state != CS_FREE and c.gen == gen:
            c.flags &= ~F_STARVED           # (it may have moved on: retried, or flushing)
            if c.state == CS_ESTABLISHED or c.state == CS_FLUSHING:
                conn_run(c)


cdef void close_condemned() noexcept nogil:
    """Reset (and count) the connections of backends whose drain deadline passed (backend.close_conns)."""
    cdef uint32_t i
    cdef int32_t k
    cdef int any_ = 0
    for i in range(W.hdr.n_backends):
        if flb_load32(&W.backends[i].close_conns):
            any_ = 1
            break
    if not any_:
        return
    for k in range(W.n_used):
        if W.conns[k].state != CS_FREE and W.conns[k].backend != FLB_NONE \
                and flb_load32(&W.backends[W.conns[k].backend].close_conns):
            W.conns[k].term = FLB_TERM_DRAIN_DEADLINE + 1
            conn_deadline_reset(&W.conns[k])


cdef inline void sync_generation() noexcept nogil:
    """First thing after every wake-up, before any pick: a change the control process published
    before this wake-up (e.g. before it answered `fastlb drain`) applies to every connection
    accepted from now on."""
    cdef uint64_t g = flb_load64_acq(&W.hdr.generation)
    if g != W.generation:
        W.generation = g
        listeners_refresh()
        lb_refresh()
        routes_refresh()
        addr_copies_refresh()
        close_condemned()
        W.me.generation_seen = g


cdef int housekeeping() noexcept nogil:
    """Once per loop turn: heartbeat and gauges, paused listeners.
    Returns 1 when a listener has work waiting (poll without blocking)."""
    cdef int i, work = 0
    cdef Listener *l
    W.me.heartbeat_ms = W.now_ms
    W.me.active = W.active
    W.me.pipes_pooled = <uint64_t>W.n_pooled
    W.me.pipes_in_use = <uint64_t>W.pipes_in_use
    udp_sweep()                         # core/udp.pxi: close spare sockets unused for a while
    for i in range(W.n_listeners):
        l = &W.listeners[i]
        if l.fd < 0:
            continue
        if l.paused_full and flb_sload64(&l.shm.active) < <int64_t>l.max_connections:
            l.paused_full = 0
            l.pending = 1
        if l.paused_until != 0 and W.now_ms >= l.paused_until:
            l.paused_until = 0
            l.pending = 1
        if l.pending and not l.paused_full and l.paused_until == 0:
            work = 1
    return work


cdef int worker_setup(char *base, int index, int *fds, int nfds) noexcept nogil:
    """Map the region's records, raise the fd limit, allocate the slab, pipes, timers and selection
    state, register listeners and the signalfd.  Returns 0 or -errno."""
    cdef rlimit rl
    cdef sigset_t mask
    cdef epoll_event ev
    cdef int i, rc
    cdef int32_t capacity
    cdef Pipe first
    cdef linger lg
    cdef flb_listener_t *sl
    memset(&W, 0, sizeof(Worker))
    W.base = base
    W.hdr = <flb_header_t *>base
    if W.hdr.magic != FLB_SHM_MAGIC or W.hdr.layout_version != FLB_LAYOUT_VERSION:
        return -22                      # EINVAL: not our region
    W.shm_listeners = <flb_listener_t *>(base + W.hdr.listeners_off)
    W.pools = <flb_pool_t *>(base + W.hdr.pools_off)
    W.backends = <flb_backend_t *>(base + W.hdr.backends_off)
    W.me = &(<flb_worker_t *>(base + W.hdr.workers_off))[index]
    W.wactive = <int32_t *>(base + W.hdr.wactive_off) + <size_t>index * (W.hdr.n_backends + W.hdr.n_listeners)
    W.index = index
    W.rng = (<uint64_t>getpid() << 32) ^ clock_us() ^ 0x9E3779B97F4A7C15ULL
    clock_update()
    # the control process going away does not stop the data plane: see core/orphan.pxi
    # a peer that is gone must show up as EPIPE from splice/send, never as a fatal SIGPIPE
    if signal(SIGPIPE, SIG_IGN) == SIG_ERR:
        return -errno
    sigemptyset(&mask)
    sigaddset(&mask, SIGTERM)
    sigaddset(&mask, SIGINT)
    sigaddset(&mask, SIGHUP)
    sigaddset(&mask, SIGUSR1)           # reopen-the-log is the control process's business
    sigaddset(&mask, SIGUSR2)           # the control process's upgrade signal: ignored here
    if sigprocmask(SIG_BLOCK, &mask, NULL) < 0:
        return -errno
    W.sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)
    if W.sfd < 0:
        return -errno
    # one slot per two descriptors: EMFILE, not a full slab, is what stops accepting
    if getrlimit(RLIMIT_NOFILE, &rl) == 0:
        if rl.rlim_cur < rl.rlim_max:
            rl.rlim_cur = rl.rlim_max
            setrlimit(RLIMIT_NOFILE, &rl)
            getrlimit(RLIMIT_NOFILE, &rl)
        capacity = <int32_t>(rl.rlim_cur // 2 + 16 if rl.rlim_cur < 2000000 else 1000000)
        W.nofile = <int64_t>rl.rlim_cur
    else:
        capacity = 10000
        W.nofile = 20000
    rc = slab_init(capacity)
    if rc < 0:
        return rc
    W.me.conn_capacity = <uint64_t>capacity
    W.scratch = <char *>malloc(SCRATCH_SIZE)
    if W.scratch == NULL:
        return -ENOMEM
    W.starved = <int32_t *>malloc(sizeof(int32_t) * capacity)
    W.starved_gen = <uint32_t *>malloc(sizeof(uint32_t) * capacity)
    if W.starved == NULL or W.starved_gen == NULL:
        return -ENOMEM
    rc = pipes_init()
    if rc < 0:
        return rc
    # learn the pipe size once, and keep the pipe in the pool
    first.rfd = -1
    rc = pipe_get(&first)
    if rc < 0:
        return rc
    pipe_put(&first)
    rc = timers_init()
    if rc < 0:
        return rc
    rc = lb_setup()
    if rc < 0:
        return rc
    rc = log_setup()
    if rc < 0:
        return rc
    rc = prelude_setup()
    if rc < 0:
        return rc
    W.listeners = <Listener *>calloc(nfds + 1, sizeof(Listener))
    if W.listeners == NULL:
        return -ENOMEM
    W.ep = epoll_create1(EPOLL_CLOEXEC)
    if W.ep < 0:
        return -errno
    W.n_listeners = nfds
    for i in range(nfds):
        sl = &W.shm_listeners[i]
        W.listeners[i].fd = fds[i]
        W.listeners[i].shm = sl
        W.listeners[i].pool = sl.pool
        W.listeners[i].connect_timeout_ms = sl.connect_timeout_ms
        W.listeners[i].idle_timeout_ms = sl.idle_timeout_ms
        W.listeners[i].max_connections = sl.max_connections
        W.listeners[i].half_close_timeout_ms = sl.half_close_timeout_ms
        W.listeners[i].protocol = sl.protocol
        W.listeners[i].udp_idle_timeout_ms = sl.udp_idle_timeout_ms
        W.listeners[i].udp_responses = sl.udp_responses
        W.listeners[i].max_flows = sl.max_flows
        W.listeners[i].udp_pktinfo = sl.udp_pktinfo
        W.listeners[i].backlog = sl.backlog  # the control process listened with it
        W.listeners[i].pending = 1
        if sl.protocol != FLB_PROTO_UDP:
            # accepted sockets inherit SO_LINGER {1, 0}: a client is reset, not sent a FIN, when
            # this worker dies (kill -9); every orderly close clears it first (core/conn.pxi)
            lg.l_onoff = 1
            lg.l_linger = 0
            if setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg)) == 0:
                W.listeners[i].linger = 1
            else:
                W.me.linger_errors += 1
        ev.events = EPOLLIN | EPOLLET
        ev.data.u64 = TAG_SPECIAL | <uint64_t>i
        if epoll_ctl(W.ep, EPOLL_CTL_ADD, fds[i], &ev) < 0:
            return -errno
    rc = routes_setup()
    if rc < 0:
        return rc
    rc = udp_setup()
    if rc < 0:
        return rc
    ev.events = EPOLLIN
    ev.data.u64 = TAG_SPECIAL | SPECIAL_SIGNAL
    if epoll_ctl(W.ep, EPOLL_CTL_ADD, W.sfd, &ev) < 0:
        return -errno
    W.generation = flb_load64_acq(&W.hdr.generation)
    lb_refresh()
    routes_refresh()
    addr_copies_refresh()
    W.me.generation_seen = W.generation
    W.me.heartbeat_ms = W.now_ms        # before state 1: the watchdog reads both
    W.me.pid = getpid()
    W.me.state = 1
    return 0


cdef void worker_teardown() noexcept nogil:
    """Reset (counted: the shutdown deadline ended them) what is still open, close the rest, mark
    the worker exited."""
    cdef int32_t i
    for i in range(W.n_used):
        if W.conns[i].state != CS_FREE:
            W.conns[i].term = FLB_TERM_SHUTDOWN_DEADLINE + 1
            if W.conns[i].state == CS_UDP_FLOW or W.conns[i].state == CS_UDP_SPARE:
                udp_conn_close(&W.conns[i])     # core/udp.pxi: a flow is forgotten, not reset
            else:
                conn_deadline_reset(&W.conns[i])
    udp_flush()
    for i in range(W.n_listeners):
        close_fd(W.listeners[i].fd)
    udp_teardown()
    pipes_release_pool()
    orphan_close()
    close_fd(W.ep)
    close_fd(W.sfd)
    W.me.active = 0
    W.me.pipes_pooled = 0
    W.me.pipes_in_use = 0
    W.me.state = 3


cdef int worker_main(char *base, int index, int *fds, int nfds, uint32_t shutdown_ms,
                     uint64_t orphan_ms, int control_pid) noexcept nogil:
    """The worker: set up, watch the control process, then loop until drained after SIGTERM/SIGINT
    (or orphan_timeout after the control process died).  Returns 0 or -errno."""
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout, work
    cdef uint32_t li
    cdef int rc = worker_setup(base, index, fds, nfds)
    if rc < 0:
        return rc
    rc = orphan_watch(control_pid, orphan_ms)
    if rc < 0:
        W.me.state = 3
        return rc
    work = 1
    while True:
        if work:
            timeout = 0
        elif W.n_timers > 0 or W.stopping or W.n_starved > 0:
            timeout = TICK_MS
        else:
            timeout = IDLE_POLL_MS
        n = epoll_wait(W.ep, events, MAX_EVENTS, timeout)
        if n < 0:
            if errno != EINTR:
                rc = -errno
                break
            n = 0
        clock_update()
        sync_generation()
        for i in range(n):
            dispatch(&events[i], shutdown_ms)
        udp_flush()                     # replies read in this batch go out together
        for li in range(<uint32_t>W.n_listeners):
            if W.listeners[li].pending and W.listeners[li].fd >= 0 and not W.listeners[li].paused_full \
                    and W.listeners[li].paused_until == 0:
                if W.listeners[li].protocol == FLB_PROTO_UDP:
                    udp_listener_ready(&W.listeners[li], li)
                else:
                    accept_ready(&W.listeners[li], li)
        if W.n_starved > 0:
            retry_starved()
        timers_run()
        work = housekeeping()
        orphan_check(shutdown_ms)
        if W.stopping and (W.active == 0 or W.now_ms >= W.stop_deadline_ms):
            break
    worker_teardown()
    return rc
