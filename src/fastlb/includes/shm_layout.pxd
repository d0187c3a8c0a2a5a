# shm_layout.pxd - Cython view of shm_layout.h (THE shared-memory layout; see that file for the rules).
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "shm_layout.h" nogil:
    uint64_t FLB_SHM_MAGIC
    uint32_t FLB_LAYOUT_VERSION
    enum:
        FLB_NAME_LEN
        FLB_ADDR_LEN
        FLB_HIST_BUCKETS
        FLB_MAX_SPLIT
        FLB_SNI_LEN
    uint32_t FLB_NONE
    uint32_t FLB_PRIORITY_BACKUP

    cdef enum flb_algorithm:
        FLB_ALG_ROUND_ROBIN
        FLB_ALG_WEIGHTED_ROUND_ROBIN
        FLB_ALG_LEAST_CONN
        FLB_ALG_RANDOM
        FLB_ALG_P2C
        FLB_ALG_MAGLEV
        FLB_ALG_RING_HASH
        FLB_ALG_LEAST_RESPONSE_TIME

    cdef enum flb_hash_key:
        FLB_HASH_SOURCE_IP
        FLB_HASH_SOURCE_IP_PORT
        FLB_HASH_FOUR_TUPLE

    cdef enum flb_split_affinity:
        FLB_AFFINITY_NONE
        FLB_AFFINITY_SOURCE_IP

    cdef enum flb_proxy_protocol:
        FLB_PROXY_OFF
        FLB_PROXY_V1
        FLB_PROXY_V2
        FLB_PROXY_ANY

    cdef enum flb_sni_policy:
        FLB_SNI_POLICY_DEFAULT
        FLB_SNI_POLICY_REJECT

    cdef enum flb_send_proxy:
        FLB_SEND_PROXY_OFF
        FLB_SEND_PROXY_V1
        FLB_SEND_PROXY_V2

    cdef enum flb_protocol:
        FLB_PROTO_TCP
        FLB_PROTO_UDP

    cdef enum flb_admin:
        FLB_ADMIN_READY
        FLB_ADMIN_DRAIN
        FLB_ADMIN_MAINT

    cdef enum flb_health:
        FLB_HEALTH_UP
        FLB_HEALTH_DOWN
        FLB_HEALTH_EJECTED

    cdef enum flb_all_down:
        FLB_ALL_DOWN_REJECT
        FLB_ALL_DOWN_PANIC

    ctypedef struct flb_header_t:
        uint64_t magic
        uint32_t layout_version
        uint32_t header_size
        uint64_t total_size
        uint64_t generation
        uint32_t n_listeners
        uint32_t n_pools
        uint32_t n_backends
        uint32_t n_workers
        uint64_t listeners_off
        uint64_t pools_off
        uint64_t backends_off
        uint64_t workers_off
        uint64_t tables_off
        uint32_t listener_size
        uint32_t pool_size
        uint32_t backend_size
        uint32_t worker_size
        uint32_t stopping
        uint32_t n_cidrs
        uint64_t wactive_off
        uint64_t logring_off
        # routes (issue 10)
        uint64_t routes_off
        uint64_t cidrs_off
        uint64_t snis_off
        uint64_t route_pools_off
        uint32_t n_routes
        uint32_t n_snis
        uint32_t route_size
        uint32_t cidr_size
        uint32_t sni_size

    ctypedef struct flb_cidr_t:
        uint32_t family
        uint32_t prefix
        uint8_t addr[16]

    ctypedef struct flb_listener_t:
        char name[64]
        uint32_t pool
        uint32_t connect_timeout_ms
        uint32_t idle_timeout_ms
        uint32_t max_connections
        uint8_t addr[28]
        uint32_t addrlen
        uint32_t backlog
        int64_t active
        uint64_t accepted
        uint64_t rejected
        uint64_t paused_full
        uint64_t accept_errors
        uint32_t proxy_protocol
        uint32_t proxy_from_first
        uint32_t proxy_from_n
        uint32_t needs_sni
        uint32_t sni_timeout_ms
        uint32_t sni_policy
        uint64_t proxy_accepted
        uint64_t proxy_refused
        uint64_t proxy_errors
        uint64_t prelude_timeouts
        uint64_t sni_found
        uint64_t sni_missing
        uint64_t sni_rejected
        # routes (issue 10)
        uint32_t first_route
        uint32_t n_routes
        uint64_t no_route
        uint32_t half_close_timeout_ms
        uint32_t protocol
        uint32_t udp_idle_timeout_ms
        uint32_t udp_responses
        uint32_t max_flows
        uint32_t udp_pktinfo
        uint64_t udp_datagrams_in
        uint64_t udp_datagrams_out
        uint64_t udp_drop_table_full
        uint64_t udp_drop_no_backend
        uint64_t udp_drop_oversized
        uint64_t udp_drop_unreachable
        uint64_t udp_drop_send
        uint64_t udp_expired_idle
        uint64_t udp_expired_responses
        uint64_t udp_drop_unexpected
        uint64_t udp_drop_rcvbuf
        uint64_t udp_drop_reply_rcvbuf
        # protections (issue 21): keepalive and user timeout of accepted sockets
        uint32_t ka_idle_s
        uint32_t ka_interval_s
        uint32_t ka_count
        uint32_t user_timeout_ms
        # preludes: counters
        uint64_t proxy_accepted
        uint64_t proxy_refused
        uint64_t proxy_errors
        uint64_t prelude_timeouts
        uint64_t sni_found
        uint64_t sni_missing
        uint64_t sni_rejected

    ctypedef struct flb_pool_t:
        char name[64]
        uint32_t algorithm
        uint32_t hash_key
        uint32_t retries
        uint32_t first_backend
        uint32_t n_backends
        uint32_t all_down_policy
        uint32_t table_active
        uint32_t table_capacity
        uint32_t table_len[2]
        uint64_t table_off[2]
        uint32_t panic
        uint32_t scan_len
        uint64_t no_backend
        uint32_t send_proxy
        # protections (issue 21): keepalive and user timeout of backend sockets
        uint32_t ka_idle_s
        uint32_t ka_interval_s
        uint32_t ka_count
        uint32_t user_timeout_ms

    ctypedef struct flb_backend_t:
        uint32_t seq
        uint32_t pool
        uint32_t in_use
        uint32_t weight
        uint32_t eff_weight
        uint32_t admin
        uint32_t health
        uint32_t addrlen
        uint8_t addr[28]
        uint32_t close_conns
        char name[64]
        int64_t active
        uint64_t total
        uint64_t bytes_in
        uint64_t bytes_out
        uint64_t connect_errors
        uint64_t connect_timeouts
        uint64_t resets
        uint64_t consecutive_failures
        uint64_t connect_time_ewma_us
        uint64_t attempts
        uint64_t connect_time_sum_us
        uint64_t early_closes
        uint64_t hist_connect[FLB_HIST_BUCKETS]
        uint64_t udp_datagrams_in
        uint64_t udp_datagrams_out
        uint64_t udp_unreachable
        uint64_t late_resets
        uint64_t backend_first_closes
        uint32_t priority

    ctypedef struct flb_worker_t:
        int32_t pid
        uint32_t state
        uint64_t heartbeat_ms
        int64_t active
        uint64_t accepted
        uint64_t accept_errors
        uint64_t emfile
        uint64_t no_backend
        uint64_t retries
        uint64_t timeouts_connect
        uint64_t timeouts_idle
        uint64_t resets
        uint64_t pipes_pooled
        uint64_t pipes_in_use
        uint64_t splice_errors
        uint64_t conn_capacity
        uint64_t generation_seen
        uint64_t orphaned_since_ms
        uint32_t control_pid
        uint32_t pipe_size
        uint32_t pipe_pool_cap
        uint64_t pipes_small
        uint64_t deadline_resets
        uint64_t half_close_timeouts
        uint64_t seqlock_fallbacks
        uint64_t flushed_resets
        uint64_t early_close_retries
        uint64_t udp_flows
        uint64_t udp_rx_calls
        uint64_t udp_rx_datagrams
        uint64_t udp_tx_calls
        uint64_t udp_tx_datagrams
        uint64_t udp_flow_capacity
        uint64_t udp_socket_errors
        uint64_t linger_errors
        uint64_t clients_lost
        uint64_t backends_lost
        uint64_t sockopt_errors

    cdef enum flb_term:
        FLB_TERM_CLIENT_CLOSE
        FLB_TERM_BACKEND_CLOSE
        FLB_TERM_CLIENT_RESET
        FLB_TERM_BACKEND_RESET
        FLB_TERM_CONNECT_FAILED
        FLB_TERM_NO_BACKEND
        FLB_TERM_CONNECT_TIMEOUT
        FLB_TERM_IDLE_TIMEOUT
        FLB_TERM_HALF_CLOSE_TIMEOUT
        FLB_TERM_DRAIN_DEADLINE
        FLB_TERM_SHUTDOWN_DEADLINE
        FLB_TERM_PRELUDE_ERROR
        FLB_TERM_LOCAL_ERROR
        FLB_TERM_CLIENT_GONE
        FLB_TERM_RESPONSES
        FLB_TERM_BACKEND_UNREACHABLE
        FLB_TERM_BACKEND_DOWN
        FLB_TERM_CLIENT_LOST
        FLB_TERM_BACKEND_LOST

    ctypedef struct flb_logring_t:
        uint64_t head
        uint64_t tail
        uint64_t dropped
        uint32_t slots

    ctypedef struct flb_logrec_t:
        uint64_t end_unix_us
        uint64_t duration_us
        uint64_t bytes_in
        uint64_t bytes_out
        uint32_t connect_us
        uint32_t listener
        uint32_t route
        uint32_t pool
        uint32_t backend
        uint16_t termination
        uint8_t retries
        uint8_t client[FLB_ADDR_LEN]
        uint32_t client_len

    # routes (issue 10)
    ctypedef struct flb_sni_t:
        uint32_t len
        uint32_t wildcard
        char name[256]

    ctypedef struct flb_split_t:
        uint32_t n
        uint32_t affinity
        uint32_t pool[15]
        uint32_t weight[15]

    ctypedef struct flb_route_t:
        char name[64]
        uint32_t listener
        uint32_t has_match
        uint32_t first_cidr
        uint32_t n_cidrs
        uint32_t first_sni
        uint32_t n_snis
        uint32_t split_seq
        flb_split_t split[2]
        uint64_t no_pool
