# cython: language_level=3
# _shm.pyx - the control process's handle on the shared region (layout: includes/shm_layout.h).
#
# The control process creates the region (memfd, 0600) before forking the workers, fills the
# configuration records, and afterwards publishes changes with the rules of shm_layout.h: single
# 32-bit stores for weights and states, a seqlock for addresses, double-buffered tables flipped
# with one release-store, and a generation bump (release) after every change.  This module holds
# the GIL throughout: it runs on configuration changes and status reads, never per connection.

import os

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset
from libc.time cimport gmtime, strftime, time_t

from flb_atomic cimport *
from linux cimport MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)
from shm_layout cimport *

MAGIC = FLB_SHM_MAGIC
LAYOUT_VERSION = FLB_LAYOUT_VERSION
NONE = FLB_NONE
ALGORITHMS = {
    "round_robin": FLB_ALG_ROUND_ROBIN,
    "weighted_round_robin": FLB_ALG_WEIGHTED_ROUND_ROBIN,
    "least_conn": FLB_ALG_LEAST_CONN,
    "random": FLB_ALG_RANDOM,
    "p2c": FLB_ALG_P2C,
    "maglev": FLB_ALG_MAGLEV,
    "ring_hash": FLB_ALG_RING_HASH,
    "least_response_time": FLB_ALG_LEAST_RESPONSE_TIME,
}
HASH_KEYS = {"source_ip": FLB_HASH_SOURCE_IP, "source_ip_port": FLB_HASH_SOURCE_IP_PORT,
             "four_tuple": FLB_HASH_FOUR_TUPLE}
ADMIN = {"ready": FLB_ADMIN_READY, "drain": FLB_ADMIN_DRAIN, "maint": FLB_ADMIN_MAINT}
HEALTH = {"up": FLB_HEALTH_UP, "down": FLB_HEALTH_DOWN, "ejected": FLB_HEALTH_EJECTED}
ALL_DOWN = {"reject": FLB_ALL_DOWN_REJECT, "panic": FLB_ALL_DOWN_PANIC}
AFFINITY = {"none": FLB_AFFINITY_NONE, "source_ip": FLB_AFFINITY_SOURCE_IP}
MAX_SPLIT = FLB_MAX_SPLIT
SNI_LEN = FLB_SNI_LEN
PROTOCOLS = {"tcp": FLB_PROTO_TCP, "udp": FLB_PROTO_UDP}

RECORD_SIZES = {
    "header": sizeof(flb_header_t),
    "listener": sizeof(flb_listener_t),
    "pool": sizeof(flb_pool_t),
    "backend": sizeof(flb_backend_t),
    "worker": sizeof(flb_worker_t),
    "cidr": sizeof(flb_cidr_t),
    "route": sizeof(flb_route_t),
    "sni": sizeof(flb_sni_t),
}


cdef inline uint64_t _align(uint64_t n, uint64_t a):
    return (n + a - 1) // a * a


cdef inline void _set_name(char *dst, str name):
    cdef bytes b = name.encode()[:FLB_NAME_LEN - 1]
    memset(dst, 0, FLB_NAME_LEN)
    memcpy(dst, <char *>b, len(b))


cdef class Region:
    """One shared region: header, listeners, pools, backends, workers, double-buffered tables."""

    cdef char *base
    cdef readonly uint64_t size
    cdef readonly int fd
    cdef flb_header_t *hdr

    def __cinit__(self, int n_listeners, int n_pools, int n_backends, int n_workers, list table_capacity,
                  int n_cidrs=0, int n_routes=0, int n_snis=0, uint32_t log_slots=0):
        """table_capacity[p]: uint32 entries each of pool p's two table buffers must hold;
        n_cidrs: address ranges (the listeners' proxy_protocol_from, then the routes' match.source)
        in the cidrs array; n_routes/n_snis: route records and server-name patterns (routes of all
        listeners together; a listener with `pool = "X"` has one default route).
        log_slots: access-log records per worker ring (a power of two; 0 = no access log)."""
        cdef uint64_t off, size, l_off, p_off, b_off, w_off, wa_off, t_off, c_off, r_off, s_off, rp_off
        cdef uint64_t lr_off = 0, ring_bytes = 0
        cdef int i
        cdef flb_pool_t *pools
        if len(table_capacity) != n_pools:
            raise ValueError("one table capacity per pool")
        off = _align(sizeof(flb_header_t), 64)
        l_off = off
        off = _align(off + sizeof(flb_listener_t) * n_listeners, 64)
        p_off = off
        off = _align(off + sizeof(flb_pool_t) * n_pools, 64)
        b_off = off
        off = _align(off + sizeof(flb_backend_t) * n_backends, 64)
        w_off = off
        off = _align(off + sizeof(flb_worker_t) * n_workers, 64)
        wa_off = off
        off = _align(off + 4 * <uint64_t>n_workers * (n_backends + n_listeners), 4096)
        t_off = off
        for cap in table_capacity:
            off = _align(off + 2 * 4 * <uint64_t>cap, 64)
        c_off = off
        off = _align(off + sizeof(flb_cidr_t) * <uint64_t>n_cidrs, 64)
        r_off = off
        off = _align(off + sizeof(flb_route_t) * <uint64_t>n_routes, 64)
        s_off = off
        off = _align(off + sizeof(flb_sni_t) * <uint64_t>n_snis, 64)
        rp_off = off
        off = _align(off + 8 * <uint64_t>n_routes * n_pools, 64)
        if log_slots:
            if log_slots & (log_slots - 1):
                raise ValueError("log_slots must be a power of two")
            lr_off = _align(off, 4096)
            ring_bytes = sizeof(flb_logring_t) + <uint64_t>log_slots * sizeof(flb_logrec_t)
            off = lr_off + ring_bytes * <uint64_t>n_workers
        size = _align(off, 4096)
        self.fd = os.memfd_create("fastlb-shm", os.MFD_CLOEXEC)
        os.fchmod(self.fd, 0o600)
        os.ftruncate(self.fd, size)
        self.base = <char *>mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, self.fd, 0)
        if <void *>self.base == <void *>-1:
            self.base = NULL
            os.close(self.fd)
            raise OSError("mmap of the shared region failed")
        self.size = size
        self.hdr = <flb_header_t *>self.base
        # No memset: a new memfd reads as zeros, and its pages are only allocated when first
        # written.  Zeroing all of it would allocate every table buffer up front (two per pool,
        # 4 bytes x maglev_table_size each: ~40 MB per pool at 5000011) before any is used.
        self.hdr.layout_version = FLB_LAYOUT_VERSION
        self.hdr.header_size = sizeof(flb_header_t)
        self.hdr.total_size = size
        self.hdr.n_listeners = n_listeners
        self.hdr.n_pools = n_pools
        self.hdr.n_backends = n_backends
        self.hdr.n_workers = n_workers
        self.hdr.listeners_off = l_off
        self.hdr.pools_off = p_off
        self.hdr.backends_off = b_off
        self.hdr.workers_off = w_off
        self.hdr.tables_off = t_off
        self.hdr.wactive_off = wa_off
        self.hdr.cidrs_off = c_off
        self.hdr.n_cidrs = n_cidrs
        self.hdr.logring_off = lr_off
        for i in range(n_workers if log_slots else 0):
            (<flb_logring_t *>(self.base + lr_off + <uint64_t>i * ring_bytes)).slots = log_slots
        self.hdr.listener_size = sizeof(flb_listener_t)
        self.hdr.pool_size = sizeof(flb_pool_t)
        self.hdr.backend_size = sizeof(flb_backend_t)
        self.hdr.worker_size = sizeof(flb_worker_t)
        self.hdr.routes_off = r_off
        self.hdr.snis_off = s_off
        self.hdr.route_pools_off = rp_off
        self.hdr.n_routes = n_routes
        self.hdr.n_snis = n_snis
        self.hdr.route_size = sizeof(flb_route_t)
        self.hdr.cidr_size = sizeof(flb_cidr_t)
        self.hdr.sni_size = sizeof(flb_sni_t)
        pools = <flb_pool_t *>(self.base + p_off)
        off = t_off
        for i in range(n_pools):
            pools[i].table_capacity = table_capacity[i]
            pools[i].table_off[0] = off
            pools[i].table_off[1] = off + 4 * <uint64_t>table_capacity[i]
            off = _align(off + 2 * 4 * <uint64_t>table_capacity[i], 64)
        flb_fence_rel()
        self.hdr.magic = FLB_SHM_MAGIC

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def close(self) -> None:
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def address(self) -> int:
        """The mapping's address, for fastlb._core.run_worker() in a forked worker."""
        return <uintptr_t>self.base

    @property
    def generation(self) -> int:
        return flb_load64_acq(&self.hdr.generation)

    def header(self) -> dict:
        h = self.hdr
        return {
            "magic": h.magic, "layout_version": h.layout_version, "header_size": h.header_size,
            "total_size": h.total_size, "generation": flb_load64_acq(&h.generation),
            "n_listeners": h.n_listeners, "n_pools": h.n_pools, "n_backends": h.n_backends,
            "n_workers": h.n_workers, "listeners_off": h.listeners_off, "pools_off": h.pools_off,
            "backends_off": h.backends_off, "workers_off": h.workers_off, "tables_off": h.tables_off,
            "listener_size": h.listener_size, "pool_size": h.pool_size,
            "backend_size": h.backend_size, "worker_size": h.worker_size, "stopping": h.stopping,
            "n_cidrs": h.n_cidrs, "cidrs_off": h.cidrs_off, "routes_off": h.routes_off,
            "snis_off": h.snis_off, "route_pools_off": h.route_pools_off, "n_routes": h.n_routes,
            "n_snis": h.n_snis, "route_size": h.route_size, "cidr_size": h.cidr_size,
            "sni_size": h.sni_size,
        }

    # --- record access -------------------------------------------------------------------

    cdef flb_listener_t *_listener(self, int i) except NULL:
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_listeners:
            raise IndexError(f"listener index {i} out of range")
        return &(<flb_listener_t *>(self.base + self.hdr.listeners_off))[i]

    cdef flb_route_t *_route(self, int i) except NULL:
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_routes:
            raise IndexError(f"route index {i} out of range")
        return &(<flb_route_t *>(self.base + self.hdr.routes_off))[i]

    cdef flb_pool_t *_pool(self, int i) except NULL:
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_pools:
            raise IndexError(f"pool index {i} out of range")
        return &(<flb_pool_t *>(self.base + self.hdr.pools_off))[i]

    cdef flb_backend_t *_backend(self, int i) except NULL:
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_backends:
            raise IndexError(f"backend index {i} out of range")
        return &(<flb_backend_t *>(self.base + self.hdr.backends_off))[i]

    cdef flb_worker_t *_worker(self, int i) except NULL:
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_workers:
            raise IndexError(f"worker index {i} out of range")
        return &(<flb_worker_t *>(self.base + self.hdr.workers_off))[i]

    # --- configuration (before fork, or published afterwards) ------------------------------

    def set_listener(self, int i, str name, int pool, uint32_t connect_timeout_ms,
                     uint32_t idle_timeout_ms, uint32_t max_connections, bytes sockaddr,
                     uint32_t backlog=0, uint32_t half_close_timeout_ms=0, str protocol="tcp",
                     uint32_t udp_idle_timeout_ms=0, uint32_t udp_responses=0, uint32_t max_flows=0,
                     bint udp_pktinfo=False) -> None:
        """Timeouts and max_connections are the record's uint32 fields: the config's limits (30 days
        of milliseconds, 10,000,000 connections) fit them, so whatever check-config accepts is stored."""
        cdef flb_listener_t *l = self._listener(i)
        if len(sockaddr) > FLB_ADDR_LEN:
            raise ValueError("sockaddr too long")
        _set_name(l.name, name)
        l.pool = pool
        l.connect_timeout_ms = connect_timeout_ms
        l.idle_timeout_ms = idle_timeout_ms
        l.max_connections = max_connections
        memset(l.addr, 0, FLB_ADDR_LEN)
        memcpy(l.addr, <char *>sockaddr, len(sockaddr))
        l.addrlen = len(sockaddr)
        l.backlog = backlog
        l.half_close_timeout_ms = half_close_timeout_ms
        l.protocol = PROTOCOLS[protocol]
        l.udp_idle_timeout_ms = udp_idle_timeout_ms
        l.udp_responses = udp_responses
        l.max_flows = max_flows
        l.udp_pktinfo = 1 if udp_pktinfo else 0

    def set_listener_runtime(self, int i, int pool, uint32_t connect_timeout_ms, uint32_t idle_timeout_ms,
                             uint32_t max_connections, uint32_t backlog,
                             uint32_t half_close_timeout_ms=0) -> None:
        """A reload's listener settings (single 32-bit stores); publish() afterwards: workers
        re-read them, and call listen() again when the backlog changed."""
        cdef flb_listener_t *l = self._listener(i)
        flb_store32(&l.pool, pool)
        flb_store32(&l.connect_timeout_ms, connect_timeout_ms)
        flb_store32(&l.idle_timeout_ms, idle_timeout_ms)
        flb_store32(&l.max_connections, max_connections)
        flb_store32(&l.backlog, backlog)
        flb_store32(&l.half_close_timeout_ms, half_close_timeout_ms)

    def set_listener_keepalive(self, int i, uint32_t idle_s, uint32_t interval_s, uint32_t count,
                               uint32_t user_timeout_ms) -> None:
        """client_keepalive (idle_s = 0: off) and tcp_user_timeout (0: the kernel's default) of
        listener i: single 32-bit stores, before fork or by a reload (publish() afterwards); workers
        apply them to connections they accept from then on."""
        cdef flb_listener_t *l = self._listener(i)
        flb_store32(&l.ka_interval_s, interval_s)
        flb_store32(&l.ka_count, count)
        flb_store32(&l.user_timeout_ms, user_timeout_ms)
        flb_store32(&l.ka_idle_s, idle_s)

    def set_pool_keepalive(self, int i, uint32_t idle_s, uint32_t interval_s, uint32_t count,
                           uint32_t user_timeout_ms) -> None:
        """backend_keepalive and tcp_user_timeout of pool i (as set_listener_keepalive), applied to
        backend connects started from then on."""
        cdef flb_pool_t *p = self._pool(i)
        flb_store32(&p.ka_interval_s, interval_s)
        flb_store32(&p.ka_count, count)
        flb_store32(&p.user_timeout_ms, user_timeout_ms)
        flb_store32(&p.ka_idle_s, idle_s)

    def set_listener_prelude(self, int i, int proxy_protocol, int proxy_from_first, int proxy_from_n,
                             bint needs_sni, int sni_timeout_ms, int sni_policy) -> None:
        """Preludes of listener i: the PROXY protocol it accepts (enum flb_proxy_protocol) from the
        senders in cidrs[first, first + n), whether it peeks at the SNI, the prelude timeout and the
        no-SNI policy (enum flb_sni_policy).  Before fork."""
        cdef flb_listener_t *l = self._listener(i)
        if proxy_from_n < 0 or proxy_from_first < 0 or proxy_from_first + proxy_from_n > <int>self.hdr.n_cidrs:
            raise IndexError("proxy_from slice out of range")
        l.proxy_protocol = proxy_protocol
        l.proxy_from_first = proxy_from_first
        l.proxy_from_n = proxy_from_n
        l.needs_sni = needs_sni
        l.sni_timeout_ms = sni_timeout_ms
        l.sni_policy = sni_policy

    def set_cidr(self, int i, int family, bytes addr, int prefix) -> None:
        """cidrs[i] = addr/prefix (addr: 4 or 16 bytes, network order; host bits must be zero)."""
        cdef flb_cidr_t *c
        if i < 0 or i >= <int>self.hdr.n_cidrs:
            raise IndexError(f"cidr index {i} out of range")
        if len(addr) > 16 or prefix < 0 or prefix > 8 * len(addr):
            raise ValueError("bad address range")
        c = &(<flb_cidr_t *>(self.base + self.hdr.cidrs_off))[i]
        memset(c, 0, sizeof(flb_cidr_t))
        c.family = family
        c.prefix = prefix
        memcpy(c.addr, <char *>addr, len(addr))

    def set_listener_routes(self, int i, int first_route, int n_routes) -> None:
        """The listener's slice of routes (before fork)."""
        cdef flb_listener_t *l = self._listener(i)
        if n_routes < 1 or first_route < 0 or <uint32_t>(first_route + n_routes) > self.hdr.n_routes:
            raise ValueError("route slice outside the region's routes")
        l.first_route = first_route
        l.n_routes = n_routes

    def set_sni(self, int i, bytes name, bint wildcard) -> None:
        """Server-name pattern i: lower-case name (for a wildcard, the suffix with its leading dot)."""
        cdef flb_sni_t *p
        if self.base == NULL or i < 0 or i >= <int>self.hdr.n_snis:
            raise IndexError(f"sni index {i} out of range")
        if len(name) == 0 or len(name) >= FLB_SNI_LEN:
            raise ValueError(f"server name must be 1..{FLB_SNI_LEN - 1} bytes")
        p = &(<flb_sni_t *>(self.base + self.hdr.snis_off))[i]
        memset(p, 0, sizeof(flb_sni_t))
        p.len = len(name)
        p.wildcard = 1 if wildcard else 0
        memcpy(p.name, <char *>name, len(name))

    def set_route(self, int i, str name, int listener, bint has_match, int first_cidr, int n_cidrs,
                  int first_sni, int n_snis) -> None:
        """Route i's name, listener and match slices (before fork); its split comes from set_split()."""
        cdef flb_route_t *r = self._route(i)
        if <uint32_t>(first_cidr + n_cidrs) > self.hdr.n_cidrs or <uint32_t>(first_sni + n_snis) > self.hdr.n_snis:
            raise ValueError("match slice outside the region's tables")
        self._listener(listener)
        _set_name(r.name, name)
        r.listener = listener
        r.has_match = 1 if has_match else 0
        r.first_cidr = first_cidr
        r.n_cidrs = n_cidrs
        r.first_sni = first_sni
        r.n_snis = n_snis

    def set_split(self, int route, list pools, list weights, str affinity="none") -> None:
        """Publish route's split: write the spare buffer, then one release-store of split_seq makes
        it live.  Call publish() afterwards so the workers copy it (they retry a copy that raced)."""
        cdef flb_route_t *r = self._route(route)
        cdef uint32_t seq = flb_load32(&r.split_seq)
        cdef flb_split_t *sp = &r.split[(seq + 1) & 1]
        cdef int k, n = len(pools)
        if n < 1 or n > FLB_MAX_SPLIT or len(weights) != n:
            raise ValueError(f"a split has 1..{FLB_MAX_SPLIT} pools, each with a weight")
        for k in range(n):
            if not 0 <= pools[k] < <int>self.hdr.n_pools:
                raise ValueError(f"pool index {pools[k]} out of range")
            if not 0 <= weights[k] <= 1000:
                raise ValueError(f"weight {weights[k]} out of range 0..1000")
        flb_fence_rel()                  # the previous split_seq store before any write below
        memset(sp, 0, sizeof(flb_split_t))
        sp.n = n
        sp.affinity = AFFINITY[affinity]
        for k in range(n):
            sp.pool[k] = pools[k]
            sp.weight[k] = weights[k]
        flb_store32_rel(&r.split_seq, seq + 1)

    def set_pool_send_proxy(self, int i, int send_proxy) -> None:
        """The PROXY header (enum flb_send_proxy) pool i's backends get before any client byte."""
        self._pool(i).send_proxy = send_proxy

    def set_pool(self, int i, str name, str algorithm, str hash_key, int retries, int first_backend,
                 int n_backends, str all_down="reject") -> None:
        cdef flb_pool_t *p = self._pool(i)
        _set_name(p.name, name)
        p.algorithm = ALGORITHMS[algorithm]
        p.hash_key = HASH_KEYS[hash_key]
        p.retries = retries
        p.first_backend = first_backend
        p.n_backends = n_backends
        p.scan_len = n_backends          # narrowed by set_scan_len() once the used slots are known
        p.all_down_policy = ALL_DOWN[all_down]

    def set_pool_runtime(self, int i, str algorithm, str hash_key, int retries, str all_down) -> None:
        """A reload's pool settings (single 32-bit stores; publish() afterwards).  A hashing
        algorithm needs its table built into the buffers first (capacity checked by the caller)."""
        cdef flb_pool_t *p = self._pool(i)
        flb_store32(&p.hash_key, HASH_KEYS[hash_key])
        flb_store32(&p.retries, retries)
        flb_store32(&p.all_down_policy, ALL_DOWN[all_down])
        flb_store32(&p.algorithm, ALGORITHMS[algorithm])

    def set_backend(self, int i, int pool, str name, bytes sockaddr, int weight, bint in_use=True,
                    bint fresh=True) -> None:
        """Write a backend slot (seqlock around name and address); weight is both the configured
        and the effective weight.  Call publish() afterwards if workers are running.

        With `fresh` (a slot taken for a new backend) the slot starts clean: admin ready, health up, no close_conns, no failure streak, no
        connect-time average (a reused slot must not inherit its previous backend's state).  The
        cumulative counters (total, bytes, errors, histogram) and `active` keep counting: they are
        per slot, so sums over a pool stay monotonic, and `active` still covers connections of the
        slot's previous use that have not ended yet.  A `seq` left odd by a writer that died
        mid-write is made even first, so the record is repaired."""
        cdef flb_backend_t *b = self._backend(i)
        cdef uint32_t s = flb_load32(&b.seq)
        if len(sockaddr) > FLB_ADDR_LEN:
            raise ValueError("sockaddr too long")
        if s & 1:
            s += 1
        flb_store32(&b.seq, s + 1)
        flb_fence_rel()
        b.pool = pool
        _set_name(b.name, name)
        memset(b.addr, 0, FLB_ADDR_LEN)
        memcpy(b.addr, <char *>sockaddr, len(sockaddr))
        b.addrlen = len(sockaddr)
        flb_store32_rel(&b.seq, s + 2)
        flb_store32(&b.weight, weight)
        flb_store32(&b.eff_weight, weight)
        if fresh:
            flb_store32(&b.admin, FLB_ADMIN_READY)
            flb_store32(&b.health, FLB_HEALTH_UP)
            flb_store32(&b.close_conns, 0)
            flb_store64(&b.consecutive_failures, 0)
            flb_store64(&b.connect_time_ewma_us, 0)
        flb_store32_rel(&b.in_use, 1 if in_use else 0)

    def repair_seqlocks(self) -> int:
        """Make every odd backend `seq` even (a writer died between its two stores); returns how
        many were repaired.  The record's address may be half-written: rewrite it with
        set_backend() afterwards."""
        cdef uint32_t k, n = 0, s
        for k in range(self.hdr.n_backends):
            s = flb_load32(&self._backend(k).seq)
            if s & 1:
                flb_store32_rel(&self._backend(k).seq, s + 1)
                n += 1
        return n

    def set_weight(self, int i, int weight, effective=None) -> None:
        """Configured weight, and the effective weight the workers use (default: the same)."""
        cdef flb_backend_t *b = self._backend(i)
        flb_store32(&b.weight, weight)
        flb_store32(&b.eff_weight, weight if effective is None else int(effective))

    def set_effective_weight(self, int i, int weight) -> None:
        flb_store32(&self._backend(i).eff_weight, weight)

    def set_admin(self, int i, str state) -> None:
        flb_store32(&self._backend(i).admin, ADMIN[state])

    def set_health(self, int i, str state) -> None:
        flb_store32(&self._backend(i).health, HEALTH[state])

    def set_priority(self, int i, uint32_t priority) -> None:
        """Backend i's priority group (lower first; FLB_PRIORITY_BACKUP for `backup = true`)."""
        flb_store32(&self._backend(i).priority, priority)

    def set_in_use(self, int i, bint in_use) -> None:
        flb_store32(&self._backend(i).in_use, 1 if in_use else 0)

    def set_close_conns(self, int i, bint close) -> None:
        """Ask the workers to close backend i's connections (they act on the next publish())."""
        flb_store32(&self._backend(i).close_conns, 1 if close else 0)

    def set_scan_len(self, int pool, int n) -> None:
        """How many slots from the pool's first hold all its in-use backends (publish() after)."""
        cdef flb_pool_t *p = self._pool(pool)
        if n < 0 or <uint32_t>n > p.n_backends:
            raise ValueError("scan length outside the pool's slots")
        flb_store32(&p.scan_len, n)

    def set_panic(self, int pool, bint panic) -> None:
        flb_store32(&self._pool(pool).panic, 1 if panic else 0)

    def set_stopping(self) -> None:
        flb_store32(&self.hdr.stopping, 1)

    def table_spare(self, int pool):
        """The pool's inactive table buffer (uint32 memoryview) to build the next table into."""
        cdef flb_pool_t *p = self._pool(pool)
        cdef uint32_t act = flb_load32_acq(&p.table_active) & 1
        cdef uint32_t cap = p.table_capacity
        cdef uint32_t *ptr = <uint32_t *>(self.base + p.table_off[1 - act])
        if cap == 0:
            raise ValueError(f"pool {pool} has no table buffers")
        return <uint32_t[:cap]>ptr

    def table_flip(self, int pool, int length) -> None:
        """Make the spare buffer (filled with `length` entries) live: one release-store."""
        cdef flb_pool_t *p = self._pool(pool)
        cdef uint32_t act = flb_load32_acq(&p.table_active) & 1
        if length < 0 or <uint32_t>length > p.table_capacity:
            raise ValueError("table length exceeds the buffer")
        p.table_len[1 - act] = length
        flb_store32_rel(&p.table_active, 1 - act)

    def table_live(self, int pool):
        """The live table (uint32 memoryview of table_len entries)."""
        cdef flb_pool_t *p = self._pool(pool)
        cdef uint32_t act = flb_load32_acq(&p.table_active) & 1
        cdef uint32_t n = p.table_len[act]
        cdef uint32_t *ptr = <uint32_t *>(self.base + p.table_off[act])
        if n == 0:
            return memoryview(b"").cast("I")
        return <uint32_t[:n]>ptr

    def publish(self) -> int:
        """Bump the generation (release): workers refresh their pick state within one loop turn."""
        cdef uint64_t g = flb_load64(&self.hdr.generation) + 1
        flb_store64_rel(&self.hdr.generation, g)
        return g

    # --- counters and states (read) --------------------------------------------------------

    def listener(self, int i) -> dict:
        cdef flb_listener_t *l = self._listener(i)
        return {
            "name": l.name.decode(), "pool": l.pool, "connect_timeout_ms": l.connect_timeout_ms,
            "idle_timeout_ms": l.idle_timeout_ms, "max_connections": l.max_connections,
            "half_close_timeout_ms": l.half_close_timeout_ms,
            "active": flb_sload64(&l.active), "accepted": flb_load64(&l.accepted),
            "rejected": flb_load64(&l.rejected), "paused_full": flb_load64(&l.paused_full),
            "accept_errors": flb_load64(&l.accept_errors), "backlog": flb_load32(&l.backlog),
            "proxy_protocol": l.proxy_protocol, "needs_sni": l.needs_sni,
            "proxy_from_first": l.proxy_from_first, "proxy_from_n": l.proxy_from_n,
            "sni_timeout_ms": l.sni_timeout_ms, "sni_policy": l.sni_policy,
            "proxy_accepted": flb_load64(&l.proxy_accepted), "proxy_refused": flb_load64(&l.proxy_refused),
            "proxy_errors": flb_load64(&l.proxy_errors), "prelude_timeouts": flb_load64(&l.prelude_timeouts),
            "sni_found": flb_load64(&l.sni_found), "sni_missing": flb_load64(&l.sni_missing),
            "sni_rejected": flb_load64(&l.sni_rejected),
            "first_route": l.first_route, "n_routes": l.n_routes, "no_route": flb_load64(&l.no_route),
            "protocol": l.protocol, "udp_idle_timeout_ms": l.udp_idle_timeout_ms,
            "udp_responses": l.udp_responses, "max_flows": l.max_flows, "udp_pktinfo": l.udp_pktinfo,
            "udp_datagrams_in": flb_load64(&l.udp_datagrams_in),
            "udp_datagrams_out": flb_load64(&l.udp_datagrams_out),
            "udp_drop_table_full": flb_load64(&l.udp_drop_table_full),
            "udp_drop_no_backend": flb_load64(&l.udp_drop_no_backend),
            "udp_drop_oversized": flb_load64(&l.udp_drop_oversized),
            "udp_drop_unreachable": flb_load64(&l.udp_drop_unreachable),
            "udp_drop_send": flb_load64(&l.udp_drop_send),
            "udp_expired_idle": flb_load64(&l.udp_expired_idle),
            "udp_expired_responses": flb_load64(&l.udp_expired_responses),
            "udp_drop_unexpected": flb_load64(&l.udp_drop_unexpected),
            "udp_drop_rcvbuf": flb_load64(&l.udp_drop_rcvbuf),
            "udp_drop_reply_rcvbuf": flb_load64(&l.udp_drop_reply_rcvbuf),
            "ka_idle_s": flb_load32(&l.ka_idle_s), "ka_interval_s": flb_load32(&l.ka_interval_s),
            "ka_count": flb_load32(&l.ka_count), "user_timeout_ms": flb_load32(&l.user_timeout_ms),
        }

    def route(self, int i) -> dict:
        """Route i: configuration, the live split, and its counters (connections per pool too)."""
        cdef flb_route_t *r = self._route(i)
        cdef uint32_t seq = flb_load32_acq(&r.split_seq)
        cdef flb_split_t *sp = &r.split[seq & 1]
        cdef uint64_t *per_pool = <uint64_t *>(self.base + self.hdr.route_pools_off) + <uint64_t>i * self.hdr.n_pools
        cdef uint32_t k, n = sp.n if sp.n <= FLB_MAX_SPLIT else FLB_MAX_SPLIT
        return {
            "name": r.name.decode(), "listener": r.listener, "has_match": r.has_match,
            "first_cidr": r.first_cidr, "n_cidrs": r.n_cidrs, "first_sni": r.first_sni,
            "n_snis": r.n_snis, "split_seq": seq, "affinity": sp.affinity,
            "split": [(sp.pool[k], sp.weight[k]) for k in range(n)],
            "no_pool": flb_load64(&r.no_pool),
            "pool_connections": [flb_load64(&per_pool[k]) for k in range(self.hdr.n_pools)],
        }


    def pool(self, int i) -> dict:
        cdef flb_pool_t *p = self._pool(i)
        return {
            "name": p.name.decode(), "algorithm": p.algorithm, "hash_key": p.hash_key,
            "retries": p.retries, "first_backend": p.first_backend, "n_backends": p.n_backends,
            "all_down_policy": p.all_down_policy, "panic": flb_load32(&p.panic),
            "table_active": flb_load32(&p.table_active), "table_capacity": p.table_capacity,
            "scan_len": flb_load32(&p.scan_len),
            "no_backend": flb_load64(&p.no_backend),
            "send_proxy": p.send_proxy,
            "ka_idle_s": flb_load32(&p.ka_idle_s), "ka_interval_s": flb_load32(&p.ka_interval_s),
            "ka_count": flb_load32(&p.ka_count), "user_timeout_ms": flb_load32(&p.user_timeout_ms),
        }

    def backend(self, int i) -> dict:
        cdef flb_backend_t *b = self._backend(i)
        return {
            "name": b.name.decode(), "pool": b.pool, "in_use": flb_load32(&b.in_use),
            "weight": flb_load32(&b.weight), "eff_weight": flb_load32(&b.eff_weight),
            "admin": flb_load32(&b.admin), "health": flb_load32(&b.health),
            "active": flb_sload64(&b.active), "total": flb_load64(&b.total),
            "bytes_in": flb_load64(&b.bytes_in), "bytes_out": flb_load64(&b.bytes_out),
            "connect_errors": flb_load64(&b.connect_errors),
            "connect_timeouts": flb_load64(&b.connect_timeouts), "resets": flb_load64(&b.resets),
            "consecutive_failures": flb_load64(&b.consecutive_failures),
            "connect_time_ewma_us": flb_load64(&b.connect_time_ewma_us),
            "attempts": flb_load64(&b.attempts), "close_conns": flb_load32(&b.close_conns),
            "priority": flb_load32(&b.priority),
            "connect_time_sum_us": flb_load64(&b.connect_time_sum_us),
            "early_closes": flb_load64(&b.early_closes),
            "hist_connect": [flb_load64(&b.hist_connect[k]) for k in range(FLB_HIST_BUCKETS)],
            "udp_datagrams_in": flb_load64(&b.udp_datagrams_in),
            "udp_datagrams_out": flb_load64(&b.udp_datagrams_out),
            "udp_unreachable": flb_load64(&b.udp_unreachable),
            "late_resets": flb_load64(&b.late_resets),
            "backend_first_closes": flb_load64(&b.backend_first_closes),
        }

    def consecutive_failures(self, int i) -> int:
        """Backend i's failed connects since its last success (what passive ejection watches)."""
        return flb_load64(&self._backend(i).consecutive_failures)

    def reset_consecutive_failures(self, int i) -> None:
        flb_store64(&self._backend(i).consecutive_failures, 0)

    def worker(self, int i) -> dict:
        cdef flb_worker_t *w = self._worker(i)
        return {
            "pid": w.pid, "state": w.state, "heartbeat_ms": w.heartbeat_ms, "active": w.active,
            "accepted": w.accepted, "accept_errors": w.accept_errors, "emfile": w.emfile,
            "no_backend": w.no_backend, "retries": w.retries, "timeouts_connect": w.timeouts_connect,
            "timeouts_idle": w.timeouts_idle, "resets": w.resets, "pipes_pooled": w.pipes_pooled,
            "pipes_in_use": w.pipes_in_use, "splice_errors": w.splice_errors,
            "conn_capacity": w.conn_capacity, "generation_seen": w.generation_seen,
            "orphaned_since_ms": w.orphaned_since_ms, "control_pid": w.control_pid,
            "pipe_size": w.pipe_size, "pipe_pool_cap": w.pipe_pool_cap, "pipes_small": w.pipes_small,
            "deadline_resets": w.deadline_resets, "half_close_timeouts": w.half_close_timeouts,
            "seqlock_fallbacks": w.seqlock_fallbacks, "flushed_resets": w.flushed_resets,
            "early_close_retries": w.early_close_retries,
            "udp_flows": w.udp_flows, "udp_rx_calls": w.udp_rx_calls,
            "udp_rx_datagrams": w.udp_rx_datagrams, "udp_tx_calls": w.udp_tx_calls,
            "udp_tx_datagrams": w.udp_tx_datagrams, "udp_flow_capacity": w.udp_flow_capacity,
            "udp_socket_errors": w.udp_socket_errors, "linger_errors": w.linger_errors,
            "clients_lost": w.clients_lost, "backends_lost": w.backends_lost,
            "sockopt_errors": w.sockopt_errors,
        }

    def reset_worker(self, int i) -> None:
        """A worker died: take its share of the active counters back out of the shared totals and
        zero its record and row, before a new worker takes index i."""
        cdef int32_t *row
        cdef uint32_t k, nb = self.hdr.n_backends, nl = self.hdr.n_listeners
        self._worker(i)
        row = <int32_t *>(self.base + self.hdr.wactive_off) + <uint64_t>i * (nb + nl)
        for k in range(nb):
            if row[k] != 0:
                flb_sadd64(&self._backend(k).active, -row[k])
        for k in range(nl):
            if row[nb + k] != 0:
                flb_sadd64(&self._listener(k).active, -row[nb + k])
        memset(row, 0, 4 * (nb + nl))
        memset(self._worker(i), 0, sizeof(flb_worker_t))


    # --- access log (the consumer side; see shm_layout.h) ----------------------------------------

    cdef flb_logring_t *_ring(self, int worker) except NULL:
        cdef flb_logring_t *first
        if self.hdr.logring_off == 0:
            raise ValueError("the region has no access-log rings")
        if not 0 <= worker < <int>self.hdr.n_workers:
            raise IndexError(f"worker index {worker} out of range")
        first = <flb_logring_t *>(self.base + self.hdr.logring_off)
        return <flb_logring_t *>(self.base + self.hdr.logring_off + <uint64_t>worker
                                 * (sizeof(flb_logring_t) + <uint64_t>first.slots * sizeof(flb_logrec_t)))

    def log_dropped(self, int worker) -> int:
        """Records worker's ring had to drop (full) since the region was made."""
        return flb_load64(&self._ring(worker).dropped)


    def log_drain_lines(self, int worker, bint as_json, list listeners, list routes, list pools,
                        list backends, list terms, int limit=65536):
        """log_drain(), formatted here: returns (text bytes, records), each record one line.

        The name lists are indexed by listener / route / pool / backend index and termination code;
        each entry is bytes already in the output's form (json: a JSON string literal or b"null";
        text: the name or b"-"); an index past a list's end prints as null / -."""
        cdef flb_logring_t *ring = self._ring(worker)
        cdef flb_logrec_t *recs = <flb_logrec_t *>(<char *>ring + sizeof(flb_logring_t))
        cdef flb_logrec_t *r
        cdef uint64_t head = flb_load64_acq(&ring.head)
        cdef uint64_t tail = ring.tail
        cdef char tbuf[32]
        cdef char addr[64]
        cdef char client[80]
        cdef char conn[32]
        cdef char line[1536]
        cdef time_t sec, last = -1
        cdef int n = 0, m
        cdef bytes none = b"null" if as_json else b"-"
        cdef bytes li, ro, po, be, te
        cdef bytearray out = bytearray()
        while tail < head and n < limit:
            r = &recs[tail & (ring.slots - 1)]
            sec = <time_t>(r.end_unix_us // 1000000)
            if sec != last:
                last = sec
                strftime(tbuf, sizeof(tbuf), "%Y-%m-%dT%H:%M:%S", gmtime(&sec))
            _client_text(r, addr, client, as_json)
            if r.connect_us == 0:
                snprintf(conn, sizeof(conn), "%s", <char *>none)
            elif as_json:
                snprintf(conn, sizeof(conn), "%.3f", r.connect_us / 1000.0)
            else:
                snprintf(conn, sizeof(conn), "%.2fms", r.connect_us / 1000.0)
            li = listeners[r.listener] if r.listener < len(listeners) else none
            ro = routes[r.route] if r.route < len(routes) else none
            po = pools[r.pool] if r.pool < len(pools) else none
            be = backends[r.backend] if r.backend < len(backends) else none
            te = terms[r.termination] if r.termination < len(terms) else none
            if as_json:
                m = snprintf(line, sizeof(line),
                             '{"time": "%s.%06uZ", "client": %s, "listener": %s, "route": %s, "pool": %s, '
                             '"backend": %s, "connect_ms": %s, "duration_ms": %.3f, "bytes_in": %llu, '
                             '"bytes_out": %llu, "retries": %u, "termination": %s}\n',
                             tbuf, <unsigned int>(r.end_unix_us % 1000000), client, <char *>li, <char *>ro,
                             <char *>po, <char *>be, conn, r.duration_us / 1000.0,
                             <unsigned long long>r.bytes_in, <unsigned long long>r.bytes_out,
                             <unsigned int>r.retries, <char *>te)
            else:
                m = snprintf(line, sizeof(line),
                             "%s.%06uZ %s %s/%s %s/%s connect=%s duration=%.2fms in=%llu out=%llu "
                             "retries=%u %s\n",
                             tbuf, <unsigned int>(r.end_unix_us % 1000000), client, <char *>li, <char *>ro,
                             <char *>po, <char *>be, conn, r.duration_us / 1000.0,
                             <unsigned long long>r.bytes_in, <unsigned long long>r.bytes_out,
                             <unsigned int>r.retries, <char *>te)
            if m > 0:
                out += line[:m if m < <int>sizeof(line) else <int>sizeof(line) - 1]
            tail += 1
            n += 1
        flb_store64_rel(&ring.tail, tail)
        return bytes(out), n


cdef void _client_text(flb_logrec_t *r, char *addr, char *out, bint as_json) noexcept:
    """The record's client as "ip:port" / "[ip]:port" into out (80 bytes), quoted for json; null / -
    when the record has no usable address."""
    cdef uint16_t fam, port
    cdef uint32_t n = r.client_len
    if n >= 8:
        memcpy(&fam, r.client, 2)
        port = (r.client[2] << 8) | r.client[3]
        if fam == 2 and inet_ntop(2, r.client + 4, addr, 64) != NULL:
            snprintf(out, 80, '"%s:%u"' if as_json else "%s:%u", addr, <unsigned int>port)
            return
        if fam == 10 and n >= 24 and inet_ntop(10, r.client + 8, addr, 64) != NULL:
            snprintf(out, 80, '"[%s]:%u"' if as_json else "[%s]:%u", addr, <unsigned int>port)
            return
    snprintf(out, 80, "%s", "null" if as_json else "-")


def orphan_workers(int fd) -> list:
    """The worker records of another process's region, read-only through fd (a descriptor of its
    memfd, e.g. /proc/WORKER/fd/N opened by `fastlb status` when the control process is gone:
    fastlb.observe.orphans).  Only what that report needs: pid, state, heartbeat_ms, active,
    accepted, orphaned_since_ms, control_pid.  Raises OSError when it cannot be mapped and
    ValueError when it is not a region of this layout version."""
    cdef uint64_t size = os.fstat(fd).st_size
    cdef char *base
    cdef flb_header_t *hdr
    cdef flb_worker_t *w
    cdef uint32_t i
    if size < sizeof(flb_header_t):
        raise ValueError("not a fastlb shared region (too small)")
    base = <char *>mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0)
    if <void *>base == <void *>-1:
        raise OSError("mmap of the shared region failed")
    try:
        hdr = <flb_header_t *>base
        if flb_load64(&hdr.magic) != FLB_SHM_MAGIC or hdr.layout_version != FLB_LAYOUT_VERSION:
            raise ValueError("not a fastlb shared region of this layout version")
        if hdr.worker_size != sizeof(flb_worker_t) or \
                hdr.workers_off + <uint64_t>hdr.n_workers * sizeof(flb_worker_t) > size:
            raise ValueError("the shared region's worker records do not fit")
        out = []
        for i in range(hdr.n_workers):
            w = &(<flb_worker_t *>(base + hdr.workers_off))[i]
            out.append({
                "index": i, "pid": w.pid, "state": w.state, "heartbeat_ms": flb_load64(&w.heartbeat_ms),
                "active": w.active, "accepted": w.accepted,
                "orphaned_since_ms": flb_load64(&w.orphaned_since_ms), "control_pid": w.control_pid,
            })
        return out
    finally:
        munmap(base, size)
