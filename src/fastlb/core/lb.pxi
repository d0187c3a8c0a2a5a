# core/lb.pxi - backend selection.  One entry point, lb_pick(), a switch on the pool's algorithm;
# lb_take()/lb_drop() at exactly the assign and release points.  Everything a pick reads is in
# shared memory (weights, admin and health states, active counts of all workers, hash tables built
# by the control process); only the round-robin cursors and smooth-WRR current weights are per
# worker.  A pick never returns a backend the connection already tried (retries go elsewhere).


cdef inline bint be_ok(flb_backend_t *b, uint32_t panic) noexcept nogil:
    """Can b take a new connection?  In panic mode (every backend down, policy panic) health is ignored."""
    if flb_load32(&b.in_use) == 0 or flb_load32(&b.eff_weight) == 0:
        return False
    if flb_load32(&b.admin) != FLB_ADMIN_READY:
        return False
    return panic != 0 or flb_load32(&b.health) == FLB_HEALTH_UP


cdef inline bint conn_tried(Conn *c, uint32_t idx) noexcept nogil:
    cdef int i
    for i in range(c.attempts):
        if c.tried[i] == idx:
            return True
    return False


cdef inline bint candidate(Conn *c, uint32_t idx, uint32_t panic) noexcept nogil:
    return be_ok(&W.backends[idx], panic) and not conn_tried(c, idx)


cdef inline uint64_t rng_next() noexcept nogil:
    # xorshift64*: per-worker, seeded from pid and time; quality is ample for load spreading
    W.rng ^= W.rng >> 12
    W.rng ^= W.rng << 25
    W.rng ^= W.rng >> 27
    return W.rng * 0x2545F4914F6CDD1DULL


cdef inline bint less_loaded(uint32_t a, uint32_t b) noexcept nogil:
    """Is backend a less loaded than b, active connections relative to weight ((n+1)/w, as HAProxy)?"""
    cdef uint64_t na = <uint64_t>(flb_sload64(&W.backends[a].active) + 1)
    cdef uint64_t nb = <uint64_t>(flb_sload64(&W.backends[b].active) + 1)
    return na * flb_load32(&W.backends[b].eff_weight) < nb * flb_load32(&W.backends[a].eff_weight)


cdef inline uint32_t scan_len(flb_pool_t *p) noexcept nogil:
    cdef uint32_t n = flb_load32(&p.scan_len)
    return n if n <= p.n_backends else p.n_backends


cdef uint32_t pick_round_robin(Conn *c, flb_pool_t *p, uint32_t pi, uint32_t panic) noexcept nogil:
    # a retry looks from the cursor on without moving it: the next connection then starts on the
    # backend the retry went to, instead of every connection paying for the same dead one first
    cdef uint32_t k, idx, n = scan_len(p)
    if n == 0:
        return FLB_NONE
    for k in range(n):
        idx = p.first_backend + (W.rr[pi] + (k if c.attempts > 0 else 0)) % n
        if c.attempts == 0:
            W.rr[pi] += 1
        if candidate(c, idx, panic):
            return idx
    return FLB_NONE


cdef uint32_t pick_smooth_wrr(Conn *c, flb_pool_t *p, uint32_t panic) noexcept nogil:
    # nginx's smooth weighted round robin: every candidate gains its weight, the richest wins and
    # pays the total.  5:3:2 gives a b a c a b a b a c - no bursts to the heavy backend.
    cdef uint32_t idx, best = FLB_NONE
    cdef int64_t total = 0
    for idx in range(p.first_backend, p.first_backend + scan_len(p)):
        if not candidate(c, idx, panic):
            continue
        W.cw[idx] += flb_load32(&W.backends[idx].eff_weight)
        total += flb_load32(&W.backends[idx].eff_weight)
        if best == FLB_NONE or W.cw[idx] > W.cw[best]:
            best = idx
    if best != FLB_NONE:
        W.cw[best] -= total
    return best


cdef uint32_t pick_least_conn(Conn *c, flb_pool_t *p, uint32_t pi, uint32_t panic) noexcept nogil:
    # start at a rotating offset so that ties spread instead of piling on the first backend
    cdef uint32_t k, idx, best = FLB_NONE, n = scan_len(p)
    cdef uint32_t start = W.rr[pi]
    W.rr[pi] += 1
    if n == 0:
        return FLB_NONE
    for k in range(n):
        idx = p.first_backend + (start + k) % n
        if candidate(c, idx, panic) and (best == FLB_NONE or less_loaded(idx, best)):
            best = idx
    return best


cdef uint32_t pick_weighted_random(Conn *c, flb_pool_t *p, uint32_t panic, uint32_t skip) noexcept nogil:
    """A candidate drawn with probability proportional to its weight, never `skip`."""
    cdef uint32_t idx, end = p.first_backend + scan_len(p)
    cdef uint64_t total = 0, r
    for idx in range(p.first_backend, end):
        if idx != skip and candidate(c, idx, panic):
            total += flb_load32(&W.backends[idx].eff_weight)
    if total == 0:
        return FLB_NONE
    r = rng_next() % total
    for idx in range(p.first_backend, end):
        if idx != skip and candidate(c, idx, panic):
            if r < flb_load32(&W.backends[idx].eff_weight):
                return idx
            r -= flb_load32(&W.backends[idx].eff_weight)
    return FLB_NONE


cdef uint32_t pick_p2c(Conn *c, flb_pool_t *p, uint32_t panic) noexcept nogil:
    cdef uint32_t a = pick_weighted_random(c, p, panic, FLB_NONE)
    cdef uint32_t b
    if a == FLB_NONE:
        return a
    b = pick_weighted_random(c, p, panic, a)
    if b != FLB_NONE and less_loaded(b, a):
        return b
    return a


cdef inline uint32_t *table_live(flb_pool_t *p, uint32_t *length) noexcept nogil:
    # one acquire-load of the live buffer index; the control process wrote that buffer before
    # the release-store that made it live
    cdef uint32_t act = flb_load32_acq(&p.table_active) & 1
    length[0] = p.table_len[act]
    return <uint32_t *>(W.base + p.table_off[act])


cdef inline bint in_pool(flb_pool_t *p, uint32_t idx) noexcept nogil:
    return idx >= p.first_backend and idx < p.first_backend + p.n_backends


cdef uint32_t pick_maglev(Conn *c, flb_pool_t *p, uint32_t panic) noexcept nogil:
    # table[key % M]; if that backend cannot take it (down since the last rebuild, or already
    # tried) look at the following slots, so every worker still agrees on the fallback.
    cdef uint32_t m, k, idx
    cdef uint32_t *t = table_live(p, &m)
    cdef uint64_t slot
    if m == 0:
        return FLB_NONE
    slot = c.key_hash % m
    for k in range(m if m < 64 else 64):
        idx = t[(slot + k) % m]
        if idx != FLB_NONE and in_pool(p, idx) and candidate(c, idx, panic):
            return idx
    return FLB_NONE


cdef uint32_t pick_ring_hash(Conn *c, flb_pool_t *p, uint32_t panic) noexcept nogil:
    # (hash32, backend) pairs sorted by hash32: the first point at or after the key, clockwise
    cdef uint32_t m, lo, hi, mid, k, idx
    cdef uint32_t *t = table_live(p, &m)
    cdef uint32_t npts = m // 2
    cdef uint32_t h = <uint32_t>(c.key_hash >> 32)
    if npts == 0:
        return FLB_NONE
    lo = 0
    hi = npts
    while lo < hi:
        mid = (lo + hi) // 2
        if t[2 * mid] < h:
            lo = mid + 1
        else:
            hi = mid
    for k in range(npts):
        idx = t[2 * ((lo + k) % npts) + 1]
        if in_pool(p, idx) and candidate(c, idx, panic):
            return idx
    return FLB_NONE


cdef uint32_t pick_least_response_time(Conn *c, flb_pool_t *p, uint32_t pi, uint32_t panic) noexcept nogil:
    # score = (connect-time moving average + 1us) * (active + 1) / weight: the fastest backend
    # wins until its own load evens it out; ties go to fewer active connections.
    cdef uint32_t k, idx, best = FLB_NONE, n = scan_len(p)
    cdef uint32_t start = W.rr[pi]
    cdef double score, best_score = 0.0
    cdef flb_backend_t *b
    W.rr[pi] += 1
    if n == 0:
        return FLB_NONE
    for k in range(n):
        idx = p.first_backend + (start + k) % n
        if not candidate(c, idx, panic):
            continue
        b = &W.backends[idx]
        score = (<double>flb_load64(&b.connect_time_ewma_us) + 1.0) * <double>(flb_sload64(&b.active) + 1) \
            / <double>flb_load32(&b.eff_weight)
        if best == FLB_NONE or score < best_score or (score == best_score and less_loaded(idx, best)):
            best = idx
            best_score = score
    return best


cdef uint32_t lb_pick(Conn *c, uint32_t pi) noexcept nogil:
    """The backend for c's next connect attempt in pool pi, or FLB_NONE when none can take it."""
    cdef flb_pool_t *p = &W.pools[pi]
    cdef uint32_t panic = flb_load32(&p.panic)
    cdef uint32_t alg = p.algorithm
    cdef uint32_t idx
    if alg == FLB_ALG_WEIGHTED_ROUND_ROBIN:
        return pick_smooth_wrr(c, p, panic)
    if alg == FLB_ALG_ROUND_ROBIN:
        return pick_round_robin(c, p, pi, panic)
    if alg == FLB_ALG_LEAST_CONN:
        return pick_least_conn(c, p, pi, panic)
    if alg == FLB_ALG_RANDOM:
        return pick_weighted_random(c, p, panic, FLB_NONE)
    if alg == FLB_ALG_P2C:
        return pick_p2c(c, p, panic)
    if alg == FLB_ALG_LEAST_RESPONSE_TIME:
        return pick_least_response_time(c, p, pi, panic)
    if alg == FLB_ALG_MAGLEV:
        idx = pick_maglev(c, p, panic)
    elif alg == FLB_ALG_RING_HASH:
        idx = pick_ring_hash(c, p, panic)
    else:
        return FLB_NONE
    if idx == FLB_NONE:
        # the table has no live candidate (being rebuilt, or all tried): keep the promise of a
        # working connection over affinity
        idx = pick_weighted_random(c, p, panic, FLB_NONE)
    return idx


cdef inline void lb_take(uint32_t idx) noexcept nogil:
    flb_sadd64(&W.backends[idx].active, 1)
    W.wactive[idx] += 1


cdef inline void lb_drop(uint32_t idx) noexcept nogil:
    flb_sadd64(&W.backends[idx].active, -1)
    W.wactive[idx] -= 1


cdef void lb_refresh() noexcept nogil:
    """The control process published a change: restart the smooth-WRR rounds."""
    cdef uint32_t i
    for i in range(W.hdr.n_backends):
        W.cw[i] = 0


cdef uint64_t lb_key_hash(uint32_t hash_key, sockaddr_storage *peer, int cfd) noexcept nogil:
    """Hash of the client key: source_ip -> address bytes; + port (network order); four_tuple
    also the local address and port.  fastlb._maglev.key_hash() hashes the same bytes."""
    cdef uint8_t buf[36]
    cdef size_t n = 0
    cdef sockaddr_storage local
    cdef socklen_t llen = sizeof(local)
    n = sockaddr_key(peer, buf, hash_key != FLB_HASH_SOURCE_IP)
    if hash_key == FLB_HASH_FOUR_TUPLE and getsockname(cfd, <sockaddr *>&local, &llen) == 0:
        n += sockaddr_key(&local, buf + n, True)
    return flb_hash64(buf, n, FLB_SEED_KEY)


cdef size_t sockaddr_key(sockaddr_storage *sa, uint8_t *out, bint with_port) noexcept nogil:
    cdef sockaddr_in *a4
    cdef sockaddr_in6 *a6
    cdef size_t n
    if sa.ss_family == AF_INET:
        a4 = <sockaddr_in *>sa
        memcpy(out, &a4.sin_addr, 4)
        n = 4
        if with_port:
            memcpy(out + n, &a4.sin_port, 2)
            n += 2
        return n
    a6 = <sockaddr_in6 *>sa
    memcpy(out, &a6.sin6_addr, 16)
    n = 16
    if with_port:
        memcpy(out + n, &a6.sin6_port, 2)
        n += 2
    return n


cdef double lb_bench(char *base, int pool, long iterations) noexcept nogil:
    """ns per lb_pick() on `pool` of the region at base, from a private worker state."""
    cdef Conn c
    cdef long i
    cdef uint64_t t0, t1, sink = 0
    W.base = base
    W.hdr = <flb_header_t *>base
    W.pools = <flb_pool_t *>(base + W.hdr.pools_off)
    W.backends = <flb_backend_t *>(base + W.hdr.backends_off)
    W.rr = <uint32_t *>calloc(W.hdr.n_pools + 1, sizeof(uint32_t))
    W.cw = <int64_t *>calloc(W.hdr.n_backends + 1, sizeof(int64_t))
    W.rng = 0x9E3779B97F4A7C15ULL
    if W.rr == NULL or W.cw == NULL:
        return -1.0
    memset(&c, 0, sizeof(Conn))
    t0 = clock_us()
    for i in range(iterations):
        c.key_hash = flb_hash64(&i, sizeof(i), FLB_SEED_KEY)
        sink += lb_pick(&c, pool)
    t1 = clock_us()
    free(W.rr)
    free(W.cw)
    W.rr = NULL
    W.cw = NULL
    if sink == 1:
        t1 += 1        # keep the loop from being optimised away
    return <double>(t1 - t0) * 1000.0 / <double>(iterations if iterations > 0 else 1)
