# core/state.pxi - worker state, the connection slab (array + free list), named states and flags.

# Connection states: the state machine of one proxied connection.
cdef enum:
    CS_FREE = 0          # slot on the free list
    CS_CONNECTING = 1    # client accepted, non-blocking connect to a backend in flight
    CS_ESTABLISHED = 2   # both sockets open, forwarding both ways
    CS_FLUSHING = 3      # one side errored or reset: forwarding what it still held to the other
                         # side, then waiting (bounded) for that side's send queue to drain, then
                         # resetting both (core/flush.pxi)
    CS_UDP_FLOW = 4      # a UDP flow (core/udp.pxi): bfd is its connected backend socket, no cfd
    CS_UDP_SPARE = 5     # a spare connected UDP socket to `backend`, kept for the next flow (core/udp.pxi)
    CS_PRELUDE = 6       # waiting for the PROXY header (core/prelude.pxi), before CS_CONNECTING
    CS_PRELUDE_SNI = 7   # waiting for the TLS ClientHello's server name (core/prelude.pxi)

# Connection flags.  *_RD / *_WR: the socket is known readable / writable (edge-triggered epoll:
# set by an event, cleared only by EAGAIN).  *_EOF: we read EOF from that side.  *_SHUT: we sent
# shutdown(SHUT_WR) to that side.
cdef enum:
    F_C_RD = 0x001
    F_C_WR = 0x002
    F_B_RD = 0x004
    F_B_WR = 0x008
    F_C_EOF = 0x010
    F_B_EOF = 0x020
    F_B_SHUT = 0x040
    F_C_SHUT = 0x080
    F_B_DATA = 0x100     # the backend sent at least one byte
    F_C_ERR = 0x200      # error seen on the client socket
    F_B_ERR = 0x400      # error seen on the backend socket
    F_STARVED = 0x800    # waits for a pipe (fd limit reached): retried every loop turn
    F_C_HUP = 0x1000     # epoll reported the client's FIN (or an error): read on to the EOF
    F_B_HUP = 0x2000
    F_C2B_BULK = 0x4000  # this direction once filled the scratch buffer: splice from now on
    F_B2C_BULK = 0x8000
    F_C2B_SENT = 0x10000 # a client byte (or the client's EOF) reached the backend: it has worked
    F_B_OK = 0x20000     # the backend was credited with a success (consecutive_failures reset)
    F_FLUSH_B = 0x40000  # CS_FLUSHING: the backend is the dead side (its bytes go to the client)
    F_FLUSH_C = 0x80000  # CS_FLUSHING: the client is the dead side
    F_FLUSH_END = 0x100000 # CS_FLUSHING: the dead side is read to its end
    F_C_LINGER = 0x200000  # the client socket has SO_LINGER {1, 0} (inherited from the listener):
                           # if this process dies, the kernel resets it (core/conn.pxi linger_set)
    F_B_LINGER = 0x400000  # the backend socket has SO_LINGER {1, 0} (set once it connected)

cdef enum:
    MAX_TRIES = 11       # 1 + the largest `retries` the config accepts
    MAX_EVENTS = 256
    ACCEPT_BATCH = 64
    EMFILE_PAUSE_MS = 100
    FD_RESERVE = 16      # descriptors kept free for pipes of established connections
    SCRATCH_SIZE = 16384 # recv/send buffer for small messages (per worker, not per connection)
    IDLE_POLL_MS = 100   # epoll_wait timeout when nothing is scheduled sooner
    FLUSH_TIMEOUT_MS = 1000 # CS_FLUSHING: at most this long (from the last byte moved) before the reset
    SEQLOCK_TRIES = 4096 # backend_addr(): reads of an odd/moving seq before the last good copy is used

# epoll_event.data.u64: a connection is (gen << 32) | (slot << 1) | side; a listener or the
# signalfd has the top bit set.  The generation drops stale events for a slot reused in one batch.
cdef enum:
    SIDE_CLIENT = 0
    SIDE_BACKEND = 1
    SIDE_NONE = 2        # core/flush.pxi conn_side(): neither socket (a pipe failed)
cdef uint64_t TAG_SPECIAL = 1ULL << 63
cdef uint64_t SPECIAL_SIGNAL = 0xFFFFFFFFULL


ctypedef struct Pipe:
    int rfd                 # -1: no pipe held
    int wfd
    uint32_t bytes          # bytes in the pipe, not yet spliced out
    uint32_t cap            # its capacity (F_GETPIPE_SZ when created): it never holds more


ctypedef struct Conn:
    int cfd
    int bfd
    uint32_t gen
    uint16_t state
    uint32_t flags
    uint32_t listener
    uint32_t backend        # global backend index, FLB_NONE while unassigned
    uint32_t route          # routes (INTERFACES §1): global route index, FLB_NONE before selection
    uint32_t pool           # the pool route_select() chose for this connection
    uint8_t peer[FLB_ADDR_LEN]  # the client: the accepted peer, or the source a PROXY header announced
    void *pre               # preludes: PreludeBuf (core/prelude.pxi) while one is needed, else NULL
    uint64_t key_hash       # hash of the client key, for the hashing algorithms
    uint64_t start_us       # connect start (for the connect timeout and the connect-time average)
    uint64_t active_ms      # last traffic (idle timeout)
    uint64_t half_ms        # when the first direction finished (half_close_timeout), 0 = not yet
    uint8_t attempts        # connect attempts so far
    uint32_t tried[MAX_TRIES]
    Pipe c2b                # client -> backend
    Pipe b2c                # backend -> client
    int32_t t_prev          # timer wheel links (slot indices, -1 = none)
    int32_t t_next
    int32_t t_slot          # wheel slot, -1 = not scheduled
    int32_t next_free
    # what the access log reports (core/accesslog.pxi); cheap enough to keep always
    uint64_t accepted_us
    uint64_t bytes_c2b
    uint64_t bytes_b2c
    uint32_t connect_us     # connect time of the attempt that succeeded
    uint8_t term            # 0: derive at close from the flags; else enum flb_term + 1
    uint8_t closer          # who finished first: 0 nobody yet, 1 the client, 2 the backend
    uint8_t peer_len        # bytes of peer in use


ctypedef struct PoolView:
    uint32_t n              # eligible backends (in_use, ready, up or panic, weight > 0)
    uint32_t *idx           # their global indices
    uint32_t *w             # their effective weights
    uint64_t *cum           # prefix sums of w, for weighted random draws
    int64_t *cw             # smooth-WRR current weights
    uint64_t total          # sum of w
    uint32_t ramp           # round_robin: 1 while a backend's effective weight is below its weight
                            # (slow start): w then holds 1000 x eff_weight / weight, picked by smooth WRR


ctypedef struct RouteView:
    # a worker's copy of one route's live split (core/routes.pxi), rebuilt when the generation moves
    uint32_t n              # split entries
    uint32_t affinity       # enum flb_split_affinity
    uint32_t pool[FLB_MAX_SPLIT]
    uint32_t cum[FLB_MAX_SPLIT]   # prefix sums of the weights
    uint32_t total
    uint32_t n_live         # entries with weight > 0 whose pool has a usable backend
    uint32_t live_pool[FLB_MAX_SPLIT]
    uint32_t live_cum[FLB_MAX_SPLIT]
    uint32_t live_total


ctypedef struct Listener:
    int fd                  # -1 once closed (draining)
    uint32_t pool           # the default route's first pool (kept for what reads it; picks use c.pool)
    uint32_t first_route    # routes of this listener: [first_route, first_route + n_routes)
    uint32_t n_routes
    uint32_t default_route  # the route without a match, FLB_NONE if there is none
    uint32_t needs_sni
    uint32_t sni_policy
    uint32_t connect_timeout_ms
    uint32_t idle_timeout_ms
    uint32_t max_connections
    uint32_t half_close_timeout_ms
    uint32_t backlog        # the listen(2) backlog applied to fd (core/reload.pxi)
    int pending             # may have connections waiting in the accept queue
    int paused_full         # stopped at max_connections
    uint64_t paused_until   # ms: EMFILE back-off
    flb_listener_t *shm
    uint32_t protocol       # FLB_PROTO_TCP / FLB_PROTO_UDP (core/udp.pxi)
    uint32_t udp_idle_timeout_ms
    uint32_t udp_responses
    uint32_t max_flows
    uint32_t udp_pktinfo
    uint32_t udp_ovfl_seen  # the listening socket's kernel drop count last read (SO_RXQ_OVFL)
    bint retime             # a reload shortened a timeout: move established timers (core/reload.pxi)
    bint linger             # fd has SO_LINGER {1, 0}: accepted sockets inherit it (core/conn.pxi)


ctypedef struct Worker:
    char *base              # the mapped region
    flb_header_t *hdr
    flb_listener_t *shm_listeners
    flb_pool_t *pools
    flb_backend_t *backends
    flb_worker_t *me
    int32_t *wactive        # this worker's row: active per backend, then per listener
    int index
    int ep
    int sfd                 # signalfd
    Listener *listeners
    int n_listeners
    Conn *conns
    int32_t n_conns         # slab capacity
    int32_t n_used          # slots [0, n_used) have been handed out at least once
    int32_t free_head       # released slots; below n_used
    int64_t active
    int64_t nofile          # RLIMIT_NOFILE
    int32_t *starved        # ring of (slot) of connections waiting for a pipe
    uint32_t *starved_gen
    int32_t starved_head
    int32_t n_starved
    char *scratch           # SCRATCH_SIZE bytes
    uint64_t now_ms
    uint64_t now_us
    uint64_t generation
    # pipe pool
    int *pool_fds           # pairs (rfd, wfd)
    uint32_t *pool_caps     # capacity of each pooled pipe
    int n_pooled
    int pool_cap
    int pipe_size
    int64_t pipes_in_use
    # timer wheel
    int32_t *wheel
    uint64_t wheel_tick     # last processed tick
    int64_t n_timers
    # selection state (per worker)
    uint32_t *rr            # per pool round-robin cursor
    PoolView *views         # per pool: what may take new connections (rebuilt on publish)
    PoolView *fviews        # per pool: the next priority group, for retries that tried all of views
    uint8_t *ok             # per backend: 1 if in its pool's view
    # routes (core/routes.pxi)
    flb_route_t *routes
    flb_cidr_t *cidrs
    flb_sni_t *snis
    uint64_t *route_pools   # [n_routes][n_pools] connections per route and pool
    RouteView *rviews       # per route: the local copy of its split
    uint8_t *addr_copy      # per backend: last address read under an even seq (FLB_ADDR_LEN each)
    uint32_t *addr_copy_len # its length; 0 = never read
    int err_fd              # the descriptor whose call failed when pump() returned -errno
    uint64_t rng
    # lifecycle
    int stopping
    uint64_t stop_deadline_ms
    int pending_accept
    # access log (core/accesslog.pxi): this worker's ring, NULL when the log is off
    flb_logring_t *logring
    flb_logrec_t *logrecs


cdef Worker W


cdef inline uint64_t clock_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000ULL + <uint64_t>ts.tv_nsec / 1000ULL


cdef inline void clock_update() noexcept nogil:
    W.now_us = clock_us()
    W.now_ms = W.now_us / 1000ULL


cdef inline int close_fd(int fd) noexcept nogil:
    # close(2) must not be retried on EINTR on Linux: the fd is gone either way.
    if fd >= 0:
        close(fd)
    return -1


cdef int slab_init(int32_t n) noexcept nogil:
    """Reserve n connection slots, all free.  Returns 0 or -ENOMEM.

    calloc of this size maps fresh zero pages (CS_FREE is 0) and nothing here writes to them: a
    slot's page becomes resident when a connection first uses it, so memory follows the peak
    number of connections, not the capacity (sized from the open-file limit)."""
    W.conns = <Conn *>calloc(n, sizeof(Conn))
    if W.conns == NULL:
        return -ENOMEM
    W.n_conns = n
    W.n_used = 0
    W.free_head = -1
    return 0


cdef inline bint slab_full() noexcept nogil:
    return W.free_head < 0 and W.n_used >= W.n_conns


cdef inline Conn *slab_alloc() noexcept nogil:
    """A zeroed connection slot with a fresh generation, or NULL when the slab is full."""
    cdef int32_t slot = W.free_head
    cdef Conn *c
    cdef uint32_t gen
    if slot >= 0:
        c = &W.conns[slot]
        W.free_head = c.next_free
    elif W.n_used < W.n_conns:
        c = &W.conns[W.n_used]
        W.n_used += 1
    else:
        return NULL
    gen = (c.gen + 1) & 0x7FFFFFFF
    memset(c, 0, sizeof(Conn))
    c.gen = gen
    c.cfd = -1
    c.bfd = -1
    c.backend = FLB_NONE
    c.route = FLB_NONE
    c.pool = FLB_NONE
    c.c2b.rfd = -1
    c.c2b.wfd = -1
    c.b2c.rfd = -1
    c.b2c.wfd = -1
    c.t_prev = -1
    c.t_next = -1
    c.t_slot = -1
    c.next_free = -1
    return c


cdef inline void slab_free(Conn *c) noexcept nogil:
    cdef int32_t slot = <int32_t>(c - W.conns)
    c.state = CS_FREE
    c.gen = (c.gen + 1) & 0x7FFFFFFF
    c.next_free = W.free_head
    W.free_head = slot


cdef inline uint64_t conn_tag(Conn *c, int side) noexcept nogil:
    return (<uint64_t>c.gen << 32) | (<uint64_t>(c - W.conns) << 1) | <uint64_t>side
