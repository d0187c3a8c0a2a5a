/* shm_layout.h - THE shared-memory layout between the fastlb control process and its workers.
 *
 * One region, created by the control process (memfd, mode 0600) before it forks the workers,
 * mapped MAP_SHARED by all of them.  Zero-filled means empty.  All multi-byte fields are native
 * endian (the region never leaves the host).  Every record is a multiple of 64 bytes so that
 * counters written by the workers do not share a cache line with configuration read on every pick.
 *
 *   offset 0                 flb_header_t          (magic, layout version, generation, offsets)
 *   header.listeners_off     flb_listener_t[n_listeners]
 *   header.pools_off         flb_pool_t[n_pools]
 *   header.backends_off      flb_backend_t[n_backends]   (each pool owns a contiguous slice)
 *   header.workers_off       flb_worker_t[n_workers]
 *   header.wactive_off       int32_t[n_workers][n_backends + n_listeners] (per-worker active shares)
 *   header.tables_off        per pool, two table buffers (double buffer for maglev / ring_hash)
 *   header.logring_off       per worker, an access-log ring: flb_logring_t + slots x flb_logrec_t (0: off)
 *   header.cidrs_off         flb_cidr_t[n_cidrs]   (address ranges: proxy_from slices, then match.source)
 *   header.routes_off        flb_route_t[n_routes]       (each listener owns a contiguous slice)
 *   header.snis_off          flb_sni_t[n_snis]           (match.sni patterns)
 *   header.route_pools_off   uint64_t[n_routes][n_pools] (connections each route sent to each pool)
 *
 * Publishing rules (writer = control process only):
 *   - weight, eff_weight, admin, health, listener timeouts/max_connections/pool/backlog: single
 *     aligned 32-bit stores (never torn).
 *   - address/name of a backend: seqlock `seq` (odd while writing; readers retry).
 *   - hash tables: write the inactive buffer, then release-store pool.table_active,
 *     then bump header.generation (release).  A backend slot is written before any
 *     table that points at it.
 *   - route splits: write split[(split_seq + 1) & 1], then release-store split_seq + 1,
 *     then bump header.generation.  Workers copy the live split into local memory when the
 *     generation moves, and retry the copy if split_seq changed meanwhile: no worker ever
 *     uses half of a split.
 *   - workers acquire-load header.generation once per loop turn (and again before routing a
 *     new connection) and refresh their local pick state when it moved.
 * Counters (active, total, bytes, errors) are updated by the workers with atomic adds.
 *
 * Bump FLB_LAYOUT_VERSION on any change to this file.
 */
#ifndef FLB_SHM_LAYOUT_H
#define FLB_SHM_LAYOUT_H

#include <stdint.h>

#define FLB_SHM_MAGIC      0x314D48534246534CULL   /* "LSFBSHM1" read as little-endian bytes */
#define FLB_LAYOUT_VERSION 3u
#define FLB_NAME_LEN       64
#define FLB_ADDR_LEN       28                     /* sizeof(struct sockaddr_in6) */
#define FLB_NONE           0xFFFFFFFFu            /* "no backend" in tables and picks */
#define FLB_HIST_BUCKETS   16                     /* connect-time histogram buckets per backend */
#define FLB_MAX_SPLIT      15                     /* pools in one route's split */
#define FLB_SNI_LEN        256                    /* a server-name pattern, lower case, NUL-padded */
#define FLB_PRIORITY_BACKUP 65536u                /* backend.priority of `backup = true` (after every SRV priority) */

/* Upper bounds (microseconds, inclusive) of the connect-time histogram buckets; the last is +Inf.
 * A worker increments exactly one bucket per established connection; readers accumulate them
 * (Prometheus `le` buckets are cumulative). */
#define FLB_HIST_BOUNDS_US { 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, \
                             250000, 500000, 1000000, 2500000, 5000000, 0xFFFFFFFFFFFFFFFFULL }

/* pool.algorithm */
enum flb_algorithm {
    FLB_ALG_ROUND_ROBIN = 0,
    FLB_ALG_WEIGHTED_ROUND_ROBIN = 1,
    FLB_ALG_LEAST_CONN = 2,
    FLB_ALG_RANDOM = 3,
    FLB_ALG_P2C = 4,
    FLB_ALG_MAGLEV = 5,
    FLB_ALG_RING_HASH = 6,
    FLB_ALG_LEAST_RESPONSE_TIME = 7,
};

/* listener.protocol */
enum flb_protocol {
    FLB_PROTO_TCP = 0,
    FLB_PROTO_UDP = 1,
};

/* pool.hash_key */
enum flb_hash_key {
    FLB_HASH_SOURCE_IP = 0,
    FLB_HASH_SOURCE_IP_PORT = 1,
    FLB_HASH_FOUR_TUPLE = 2,
};

/* route split.affinity */
enum flb_split_affinity {
    FLB_AFFINITY_NONE = 0,       /* a weighted draw per connection */
    FLB_AFFINITY_SOURCE_IP = 1,  /* a hash of the client address picks the pool */
};

/* listener.proxy_protocol */
enum flb_proxy_protocol {
    FLB_PROXY_OFF = 0,
    FLB_PROXY_V1 = 1,
    FLB_PROXY_V2 = 2,
    FLB_PROXY_ANY = 3,
};

/* listener.sni_policy */
enum flb_sni_policy {
    FLB_SNI_POLICY_DEFAULT = 0,  /* route as if the client had sent no server name */
    FLB_SNI_POLICY_REJECT = 1,   /* close the connection, counted */
};

/* pool.send_proxy */
enum flb_send_proxy {
    FLB_SEND_PROXY_OFF = 0,
    FLB_SEND_PROXY_V1 = 1,
    FLB_SEND_PROXY_V2 = 2,
};

/* backend.admin (operator's intent) */
enum flb_admin {
    FLB_ADMIN_READY = 0,   /* takes new connections */
    FLB_ADMIN_DRAIN = 1,   /* no new connections, established ones continue */
    FLB_ADMIN_MAINT = 2,   /* maintenance: no new connections */
};

/* backend.health (checker's verdict); zero = up, so a pool without checks is up */
enum flb_health {
    FLB_HEALTH_UP = 0,
    FLB_HEALTH_DOWN = 1,
    FLB_HEALTH_EJECTED = 2, /* passive ejection (outlier detection) */
};

/* pool.all_down_policy */
enum flb_all_down {
    FLB_ALL_DOWN_REJECT = 0,
    FLB_ALL_DOWN_PANIC = 1,
};

typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_size;        /* sizeof(flb_header_t) */
    uint64_t total_size;         /* bytes in the region */
    uint64_t generation;         /* bumped (release) after every published change */
    uint32_t n_listeners;
    uint32_t n_pools;
    uint32_t n_backends;         /* slots, configured + spare */
    uint32_t n_workers;
    uint64_t listeners_off;
    uint64_t pools_off;
    uint64_t backends_off;
    uint64_t workers_off;
    uint64_t tables_off;
    uint32_t listener_size;      /* sizeof each record, for the Python self-check */
    uint32_t pool_size;
    uint32_t backend_size;
    uint32_t worker_size;
    uint32_t stopping;           /* 1: control process is shutting down */
    uint32_t n_cidrs;            /* preludes: entries in cidrs[] */
    uint64_t wactive_off;        /* int32_t[n_workers][n_backends + n_listeners]: each worker's own
                                    share of the active counters, so the control process can take
                                    a crashed worker's connections back out of the shared totals */
    uint64_t logring_off;        /* access-log rings, one per worker (0: access log off) */
    /* routes and preludes (issue 10) */
    uint64_t routes_off;         /* flb_route_t[n_routes] */
    uint64_t cidrs_off;          /* flb_cidr_t[n_cidrs]: every listener's proxy_protocol_from, then
                                    the routes' match.source prefixes; written before fork */
    uint64_t snis_off;           /* flb_sni_t[n_snis] */
    uint64_t route_pools_off;    /* uint64_t[n_routes][n_pools] */
    uint32_t n_routes;
    uint32_t n_snis;
    uint32_t route_size;         /* sizeof(flb_route_t), for the Python self-check */
    uint32_t cidr_size;
    uint32_t sni_size;
    uint32_t _rpad;
    uint64_t _rreserved;
} flb_header_t;                  /* 192 bytes */

typedef struct {
    /* configuration (control writes before fork; a reload may rewrite pool, timeouts,
       max_connections and backlog) */
    char     name[FLB_NAME_LEN];
    uint32_t pool;               /* index into pools[] */
    uint32_t connect_timeout_ms;
    uint32_t idle_timeout_ms;
    uint32_t max_connections;    /* across all workers; 0 = unlimited */
    uint8_t  addr[FLB_ADDR_LEN]; /* struct sockaddr_in / sockaddr_in6 */
    uint32_t addrlen;
    uint32_t backlog;            /* ops (issue 12): listen(2) backlog; a worker calls listen() again
                                    on its socket when this differs from what it applied.  A reload
                                    rewrites pool, the timeouts, max_connections and backlog (single
                                    32-bit stores); workers re-read them when the generation moves. */
    uint32_t _pad1[3];
    /* counters (workers, atomic) - own cache line */
    int64_t  active;             /* connections open now, all workers */
    uint64_t accepted;
    uint64_t rejected;           /* closed without a backend (no backend / retries exhausted) */
    uint64_t paused_full;        /* times a worker stopped accepting at max_connections */
    uint64_t accept_errors;
    uint64_t _cpad[3];
    /* preludes (issue 10: PROXY protocol accept, TLS SNI peek) - configuration, written before fork */
    uint32_t proxy_protocol;     /* enum flb_proxy_protocol: headers accepted from trusted senders */
    uint32_t proxy_from_first;   /* trusted senders: cidrs[first, first + n) */
    uint32_t proxy_from_n;
    uint32_t needs_sni;          /* 1: read the ClientHello's server_name before routing */
    uint32_t sni_timeout_ms;     /* bound on the whole prelude (PROXY header and ClientHello) */
    uint32_t sni_policy;         /* enum flb_sni_policy: no ClientHello / not TLS / no SNI */
    uint32_t _ppad[10];
    /* preludes - counters (workers, atomic) */
    uint64_t proxy_accepted;     /* PROXY headers accepted */
    uint64_t proxy_refused;      /* connections from senders outside proxy_from: reset at once */
    uint64_t proxy_errors;       /* missing, malformed, truncated or oversized header: reset */
    uint64_t prelude_timeouts;   /* prelude not complete within sni_timeout_ms */
    uint64_t sni_found;          /* ClientHellos with a server_name */
    uint64_t sni_missing;        /* no ClientHello, not TLS, no SNI, too big or timeout */
    uint64_t sni_rejected;       /* of those, closed by sni_policy = reject */
    uint64_t _pcpad[1];
    /* routes (issue 10): configuration (before fork), then counters */
    uint32_t first_route;        /* slice of routes[]: [first_route, first_route + n_routes) */
    uint32_t n_routes;           /* >= 1: `pool = "X"` is one default route */
    uint32_t _rpad[6];
    uint64_t no_route;           /* connections no route took (also sni_policy = reject, no name) */
    uint64_t _rcpad[3];
    /* dprel (issue 9, data-plane reliability): configuration, control writes before fork */
    uint32_t half_close_timeout_ms; /* after one side finished (EOF forwarded), the other side gets
                                    this long; then the connection is reset.  0 = no limit */
    uint32_t _dpad[15];
    /* UDP (issue 13): configuration (control writes before fork) - own cache line (offset 448) */
    uint32_t protocol;           /* enum flb_protocol */
    uint32_t udp_idle_timeout_ms; /* a flow with no datagram either way for this long is closed */
    uint32_t udp_responses;      /* replies expected per client datagram; 0 = unknown (idle timeout only) */
    uint32_t max_flows;          /* across all workers (counted in `active`) */
    uint32_t udp_pktinfo;        /* 1: wildcard bind, replies carry IP_PKTINFO/IPV6_PKTINFO */
    uint32_t _upad[11];
    /* UDP counters (workers, atomic); for a UDP listener `active` is flows open now and
       `accepted` flows created */
    uint64_t udp_datagrams_in;   /* client datagrams forwarded to a backend */
    uint64_t udp_datagrams_out;  /* backend datagrams sent back to a client */
    uint64_t udp_drop_table_full; /* client datagrams dropped: max_flows (or the worker's table) full */
    uint64_t udp_drop_no_backend; /* dropped: no backend could take a new flow (or draining) */
    uint64_t udp_drop_oversized; /* dropped: truncated on receive or EMSGSIZE on send */
    uint64_t udp_drop_unreachable; /* flows closed by an ICMP error from the backend (ECONNREFUSED...) */
    uint64_t udp_drop_send;      /* datagrams lost to a send error (ENOBUFS, EAGAIN: socket buffer full) */
    uint64_t udp_expired_idle;   /* flows closed by udp_idle_timeout */
    uint64_t udp_expired_responses; /* flows closed after udp_responses replies per datagram */
    uint64_t udp_drop_unexpected; /* backend datagrams past the expected replies (udp_responses) */
    uint64_t udp_drop_rcvbuf;    /* client datagrams the kernel dropped: the listening socket's receive
                                    buffer was full (SO_RXQ_OVFL) */
    uint64_t udp_drop_reply_rcvbuf; /* backend datagrams the kernel dropped: a flow's backend socket's
                                    receive buffer was full (SO_RXQ_OVFL) */
    uint64_t _ucpad[4];
    /* protections (issue 21): TCP keepalive and user timeout of the accepted client sockets -
       configuration (control writes before fork; a reload rewrites them: single 32-bit stores,
       applied to connections accepted afterwards) - own cache line (offset 640) */
    uint32_t ka_idle_s;          /* client_keepalive.idle (TCP_KEEPIDLE); 0 = keepalive off */
    uint32_t ka_interval_s;      /* client_keepalive.interval (TCP_KEEPINTVL) */
    uint32_t ka_count;           /* client_keepalive.count (TCP_KEEPCNT) */
    uint32_t user_timeout_ms;    /* tcp_user_timeout (TCP_USER_TIMEOUT); 0 = the kernel's default */
    uint32_t _kpad[12];
} flb_listener_t;                /* 704 bytes */

typedef struct {
    char     name[FLB_NAME_LEN];
    uint32_t algorithm;          /* enum flb_algorithm */
    uint32_t hash_key;           /* enum flb_hash_key */
    uint32_t retries;            /* extra connect attempts on other backends */
    uint32_t first_backend;      /* slice of backends[]: [first, first + n_backends) */
    uint32_t n_backends;         /* slots in the slice (in_use or not) */
    uint32_t all_down_policy;    /* enum flb_all_down */
    uint32_t table_active;       /* 0/1: live table buffer (acquire-load) */
    uint32_t table_capacity;     /* uint32 entries each buffer can hold */
    uint32_t table_len[2];       /* valid uint32 entries in each buffer */
    uint64_t table_off[2];       /* byte offset of each buffer from the region start */
    uint32_t panic;              /* 1: every backend down and policy=panic (set by control) */
    uint32_t scan_len;           /* slots [first, first + scan_len) hold every in-use backend:
                                    the scanning algorithms look no further */
    /* counters (workers, atomic) */
    uint64_t no_backend;         /* picks that found no eligible backend */
    uint64_t _cpad[7];
    /* preludes (issue 10: PROXY protocol send) - configuration */
    uint32_t send_proxy;         /* enum flb_send_proxy: header written to the backend first */
    uint32_t _spad[15];
    /* protections (issue 21): TCP keepalive and user timeout of the backend sockets - configuration
       (single 32-bit stores; applied to connects started afterwards) - own cache line (offset 256) */
    uint32_t ka_idle_s;          /* backend_keepalive.idle (TCP_KEEPIDLE); 0 = keepalive off */
    uint32_t ka_interval_s;      /* backend_keepalive.interval (TCP_KEEPINTVL) */
    uint32_t ka_count;           /* backend_keepalive.count (TCP_KEEPCNT) */
    uint32_t user_timeout_ms;    /* tcp_user_timeout (TCP_USER_TIMEOUT); 0 = the kernel's default */
    uint32_t _kpad[12];
} flb_pool_t;                    /* 320 bytes */

/* Table formats (uint32 entries):
 *   maglev:    table_len = M entries, each a global backend index (or FLB_NONE).
 *   ring_hash: table_len = 2 * points entries: (point hash >> 32, backend index) pairs,
 *              sorted by point hash ascending. */

typedef struct {
    /* configuration (control writes; seqlock for name/addr) */
    uint32_t seq;                /* odd while control rewrites name/addr */
    uint32_t pool;
    uint32_t in_use;             /* 0: free slot */
    uint32_t weight;             /* configured weight (0..1000) */
    uint32_t eff_weight;         /* weight the workers use (slow start, set-weight); 0 = none */
    uint32_t admin;              /* enum flb_admin */
    uint32_t health;             /* enum flb_health */
    uint32_t addrlen;
    uint8_t  addr[FLB_ADDR_LEN];
    uint32_t close_conns;        /* 1: workers close this backend's connections (drain_timeout passed);
                                    looked at when the generation moves */
    char     name[FLB_NAME_LEN];
    /* counters (workers, atomic) - own cache lines */
    int64_t  active;             /* connections assigned now (connecting or established) */
    uint64_t total;              /* connections established */
    uint64_t bytes_in;           /* client -> backend */
    uint64_t bytes_out;          /* backend -> client */
    uint64_t connect_errors;     /* refused, unreachable, ... */
    uint64_t connect_timeouts;
    uint64_t resets;             /* reset before the first byte from the backend */
    uint64_t consecutive_failures; /* reset to 0 by a successful connect */
    uint64_t connect_time_ewma_us; /* exponential moving average (1/8) of connect time */
    uint64_t attempts;           /* connect attempts */
    uint64_t connect_time_sum_us; /* sum of connect times of the established connections (with
                                    `total`, an exact average over any window) */
    uint64_t early_closes;       /* closed or reset by the backend before any byte moved either way */
    uint64_t _cpad[4];
    uint64_t hist_connect[FLB_HIST_BUCKETS]; /* connect times, one bucket per established connection */
    /* UDP (issue 13) counters (workers, atomic); a flow counts in active/total/attempts like a
       connection, its payload bytes in bytes_in/bytes_out */
    uint64_t udp_datagrams_in;   /* client -> backend */
    uint64_t udp_datagrams_out;  /* backend -> client */
    uint64_t udp_unreachable;    /* ICMP errors seen on a flow's socket (also in connect_errors and
                                    consecutive_failures: passive ejection sees them) */
    /* issue 24: how established connections end on the backend's side (workers, atomic) */
    uint64_t late_resets;        /* reset by the backend after its first byte (`resets` counts the
                                    ones before it): the crash-after-greeting case */
    uint64_t backend_first_closes; /* the backend's FIN came before the client's, after a byte
                                    moved: a crash that leaves nothing unread, or a server-close
                                    protocol (HTTP/1.0) by design */
    uint64_t _ucpad[3];
    /* protections (issue 21): configuration (control writes, single 32-bit store) - own cache line */
    uint32_t priority;           /* priority group, lower first (backup = FLB_PRIORITY_BACKUP): a pick
                                    uses only the lowest group with a usable backend; a retry that
                                    has tried all of it goes on to the next group */
    uint32_t _ppad[15];
} flb_backend_t;                 /* 512 bytes */

typedef struct {
    int32_t  pid;
    uint32_t state;              /* 0 starting, 1 running, 2 draining, 3 exited */
    uint64_t heartbeat_ms;       /* CLOCK_MONOTONIC ms, updated every loop turn */
    int64_t  active;             /* connections in this worker */
    uint64_t accepted;
    uint64_t accept_errors;
    uint64_t emfile;             /* accept4/socket hit the fd limit (worker paused accepting) */
    uint64_t no_backend;
    uint64_t retries;            /* connect attempts beyond the first */
    uint64_t timeouts_connect;
    uint64_t timeouts_idle;
    uint64_t resets;             /* connections closed by a reset on either side */
    uint64_t pipes_pooled;       /* pipes idle in the pool now */
    uint64_t pipes_in_use;       /* pipes held by connections now */
    uint64_t splice_errors;
    uint64_t conn_capacity;      /* slab slots */
    uint64_t generation_seen;
    /* process lifecycle (procrel) */
    uint64_t orphaned_since_ms;  /* CLOCK_MONOTONIC ms when this worker saw its control process
                                    die (0: it has a control process); it then drains and exits
                                    orphan_timeout later, or when a new fastlb takes over */
    uint32_t control_pid;        /* the control process this worker watches (a pidfd) */
    uint32_t _lpad;
    uint64_t _lcpad[6];
    /* dprel (issue 9, data-plane reliability) */
    uint32_t pipe_size;          /* smallest pipe capacity (bytes) this worker has got so far */
    uint32_t pipe_pool_cap;      /* idle pipes it keeps at most (sized from pipe-user-pages-soft) */
    uint64_t pipes_small;        /* pipes that came out smaller than the default 64 KiB */
    uint64_t deadline_resets;    /* connections reset by shutdown_timeout or drain_timeout */
    uint64_t half_close_timeouts; /* connections reset by half_close_timeout */
    uint64_t seqlock_fallbacks;  /* backend address read from the worker's last good copy */
    uint64_t flushed_resets;     /* resets delivered after forwarding what the dead side held */
    uint64_t early_close_retries; /* connections retried after a backend closed before any byte */
    uint64_t _dpad;
    /* UDP (issue 13) */
    uint64_t udp_flows;          /* flows open in this worker now */
    uint64_t udp_rx_calls;       /* recvmmsg calls on listening sockets that returned datagrams */
    uint64_t udp_rx_datagrams;   /* datagrams those calls returned */
    uint64_t udp_tx_calls;       /* sendmmsg calls towards clients */
    uint64_t udp_tx_datagrams;   /* datagrams those calls sent */
    uint64_t udp_flow_capacity;  /* flows this worker's table can hold */
    uint64_t udp_socket_errors;  /* socket()/connect() for a flow failed (EMFILE, ENETUNREACH...) */
    uint64_t linger_errors;      /* issue 24: setsockopt(SO_LINGER) failed: that socket closes as it was armed */
    /* protections (issue 21) - own cache line (offset 320) */
    uint64_t clients_lost;       /* connections reset because the kernel gave up on the client
                                    (ETIMEDOUT: client_keepalive probes or tcp_user_timeout) */
    uint64_t backends_lost;      /* the same for the backend side (backend_keepalive, tcp_user_timeout) */
    uint64_t sockopt_errors;     /* keepalive / user-timeout setsockopt calls that failed */
    uint64_t _kpad[5];
} flb_worker_t;                  /* 384 bytes */

/* Access log (observe/accesslog.py drains these).  One single-producer single-consumer ring per
 * worker: the worker writes record `head % slots`, then release-stores head + 1; the control process
 * acquire-loads head, reads records [tail, head), then release-stores tail.  A worker whose ring is
 * full drops the record and counts it in `dropped`: forwarding never waits for the log. */
#define FLB_LOGREC_SIZE 128

/* flb_logrec_t.termination: why a connection ended (HAProxy's termination states are the anchor) */
enum flb_term {
    FLB_TERM_CLIENT_CLOSE = 0,      /* normal: the client finished first */
    FLB_TERM_BACKEND_CLOSE = 1,     /* normal: the backend finished first */
    FLB_TERM_CLIENT_RESET = 2,
    FLB_TERM_BACKEND_RESET = 3,
    FLB_TERM_CONNECT_FAILED = 4,    /* every backend tried refused or failed (retries exhausted) */
    FLB_TERM_NO_BACKEND = 5,        /* the pool had no usable backend */
    FLB_TERM_CONNECT_TIMEOUT = 6,   /* the last attempt timed out */
    FLB_TERM_IDLE_TIMEOUT = 7,
    FLB_TERM_HALF_CLOSE_TIMEOUT = 8,
    FLB_TERM_DRAIN_DEADLINE = 9,    /* the backend's drain_timeout passed */
    FLB_TERM_SHUTDOWN_DEADLINE = 10,/* the worker's shutdown_timeout passed */
    FLB_TERM_PRELUDE_ERROR = 11,    /* bad or missing PROXY header / ClientHello, or its timeout */
    FLB_TERM_LOCAL_ERROR = 12,      /* fastlb's own trouble (descriptors, memory) */
    FLB_TERM_CLIENT_GONE = 13,      /* the client left before a backend answered the connect */
    /* UDP flows (a record per flow when it is forgotten) */
    FLB_TERM_RESPONSES = 14,        /* every reply udp_responses expects arrived */
    FLB_TERM_BACKEND_UNREACHABLE = 15, /* the backend answered with an ICMP error */
    FLB_TERM_BACKEND_DOWN = 16,     /* its backend went down: the next datagram made a new flow */
    /* protections (issue 21) */
    FLB_TERM_CLIENT_LOST = 17,      /* the kernel gave up on the client (ETIMEDOUT: keepalive, user timeout) */
    FLB_TERM_BACKEND_LOST = 18,     /* the kernel gave up on the backend (ETIMEDOUT) */
};

typedef struct {
    uint64_t head;               /* records written (worker; release-store after the record) */
    uint64_t tail;               /* records consumed (control process; release-store) */
    uint64_t dropped;            /* records lost because the ring was full (worker) */
    uint32_t slots;              /* capacity, a power of two (control process, before fork) */
    uint32_t _pad0;
    uint64_t _pad[4];
} flb_logring_t;                 /* 64 bytes, followed by slots x flb_logrec_t */

typedef struct {
    uint64_t end_unix_us;        /* CLOCK_REALTIME when the connection ended */
    uint64_t duration_us;        /* accept to end */
    uint64_t bytes_in;           /* client -> backend */
    uint64_t bytes_out;          /* backend -> client */
    uint32_t connect_us;         /* connect time of the attempt that succeeded (0: none did) */
    uint32_t listener;
    uint32_t route;              /* FLB_NONE: no route */
    uint32_t pool;
    uint32_t backend;            /* FLB_NONE: no backend */
    uint16_t termination;        /* enum flb_term */
    uint8_t  retries;            /* connect attempts beyond the first */
    uint8_t  _pad0;
    uint8_t  client[FLB_ADDR_LEN]; /* sockaddr_in/in6 of the client (the PROXY address if accepted) */
    uint32_t client_len;
    uint8_t  _pad1[40];
} flb_logrec_t;                  /* 128 bytes */

_Static_assert(sizeof(flb_logring_t) == 64, "logring size");
_Static_assert(sizeof(flb_logrec_t) == FLB_LOGREC_SIZE, "logrec size");

/* preludes and routes: an address range (proxy_protocol_from, match.source) */
typedef struct {
    uint32_t family;             /* AF_INET or AF_INET6 */
    uint32_t prefix;             /* leading bits that must match: 0..32 / 0..128 */
    uint8_t  addr[16];           /* network order; IPv4 in the first 4 bytes; host bits zero */
    uint32_t _pad[2];
} flb_cidr_t;                    /* 32 bytes: read-only after fork, no counters */

/* One server-name pattern (match.sni), lower case.  wildcard = 0: an exact name; 1: the pattern
 * was "*.example.com" and name holds ".example.com": any name ending so, with at least one more
 * character in front, matches (suffix match, as Gateway API hostnames). */
typedef struct {
    uint32_t len;                /* bytes in name */
    uint32_t wildcard;
    char     name[FLB_SNI_LEN];
    uint8_t  _pad[56];
} flb_sni_t;                     /* 320 bytes */

/* One split of a route: the pools and their weights, in a fixed order (config order, then pools
 * added at runtime).  With affinity source_ip the order matters: entry k owns the share
 * [sum(w[0..k-1]), sum(w[0..k])) of the client-address hash space. */
typedef struct {
    uint32_t n;                  /* entries */
    uint32_t affinity;           /* enum flb_split_affinity */
    uint32_t pool[FLB_MAX_SPLIT];
    uint32_t weight[FLB_MAX_SPLIT]; /* 0..1000 */
} flb_split_t;                   /* 128 bytes */

typedef struct {
    /* configuration (control writes before fork; the split is republished at runtime) */
    char     name[FLB_NAME_LEN];
    uint32_t listener;           /* index into listeners[] */
    uint32_t has_match;          /* 0: the default route (no match: takes what the others leave) */
    uint32_t first_cidr;         /* match.source: slice of cidrs[] (n_cidrs = 0: any source) */
    uint32_t n_cidrs;
    uint32_t first_sni;          /* match.sni: slice of snis[] (n_snis = 0: any name) */
    uint32_t n_snis;
    uint32_t split_seq;          /* live split = split[split_seq & 1] (acquire-load) */
    uint32_t _pad1[9];
    flb_split_t split[2];        /* double buffer, see the publishing rules above */
    /* counters (workers, atomic) - own cache line.  The connections a route took are
     * no_pool + the sum of its route_pools[route][*] (one atomic add per connection, not two). */
    uint64_t no_pool;            /* taken, but refused: every weight of the split is 0 */
    uint64_t _cpad[7];
} flb_route_t;                   /* 448 bytes */

_Static_assert(sizeof(flb_header_t) == 192, "header size");
_Static_assert(sizeof(flb_listener_t) == 704, "listener size");
_Static_assert(sizeof(flb_pool_t) == 320, "pool size");
_Static_assert(sizeof(flb_cidr_t) == 32, "cidr size");
_Static_assert(sizeof(flb_sni_t) == 320, "sni size");
_Static_assert(sizeof(flb_split_t) == 128, "split size");
_Static_assert(sizeof(flb_route_t) == 448, "route size");
_Static_assert(sizeof(flb_backend_t) == 512, "backend size");
_Static_assert(sizeof(flb_worker_t) == 384, "worker size");

#endif
