# core/lb.pxi - backend selection.  One entry point, lb_pick(), a switch on the pool's algorithm;
# lb_take()/lb_drop() at exactly the assign and release points.
#
# What may take new connections changes only when the control process publishes (weights, admin and
# health states, panic), so each worker keeps a view per pool - the eligible backends with their
# weights and prefix sums - rebuilt by lb_refresh() when the generation moves.  Picks scan that
# compact local array (or binary-search it, for the weighted random draws) and read shared memory
# only for what the other workers change all the time: active counts and connect times.  The hash
# tables are read in place.  A pick never returns a backend the connection already tried.
#
# Priorities (issue 21): the view holds only the lowest priority group with a usable backend (backups
# last); a second view holds the next usable group.  A connection that has tried every backend of
# the first group (refused, timed out: the control process has not ejected them yet) goes on to the
# second, so a dead primary costs a retry, never a failed client; the next publish moves the groups.


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


cdef inline uint64_t rng_next() noexcept nogil:
    # xorshift64*: per-worker, seeded from pid and time; quality is ample for load spreading
    W.rng ^= W.rng >> 12
    W.rng ^= W.rng << 25
    W.rng ^= W.rng >> 27
    return W.rng * 0x2545F4914F6CDD1DULL


cdef inline bint less_loaded(PoolView *v, uint32_t a, uint32_t b) noexcept nogil:
    """Is view entry a less loaded than entry b: active connections (all workers) relative to
    weight, (n + 1) / w as HAProxy does?"""
    cdef uint64_t na = <uint64_t>(flb_sload64(&W.backends[v.idx[a]].active) + 1)
    cdef uint64_t nb = <uint64_t>(flb_sload64(&W.backends[v.idx[b]].active) + 1)
    return na * v.w[b] < nb * v.w[a]


cdef inline uint32_t scan_len(flb_pool_t *p) noexcept nogil:
    cdef uint32_t n = flb_load32(&p.scan_len)
    return n if n <= p.n_backends else p.n_backends


cdef int lb_setup() noexcept nogil:
    """Allocate the per-pool views, the eligibility map and the backend address copies.  Returns 0
    or -ENOMEM."""
    cdef uint32_t pi, cap
    cdef PoolView *v
    W.views = <PoolView *>calloc(W.hdr.n_pools + 1, sizeof(PoolView))
    W.fviews = <PoolView *>calloc(W.hdr.n_pools + 1, sizeof(PoolView))
    W.ok = <uint8_t *>calloc(W.hdr.n_backends + 1, 1)
    W.rr = <uint32_t *>calloc(W.hdr.n_pools + 1, sizeof(uint32_t))
    W.addr_copy = <uint8_t *>calloc(W.hdr.n_backends + 1, FLB_ADDR_LEN)
    W.addr_copy_len = <uint32_t *>calloc(W.hdr.n_backends + 1, sizeof(uint32_t))
    if W.views == NULL or W.fviews == NULL or W.ok == NULL or W.rr == NULL or W.addr_copy == NULL \
            or W.addr_copy_len == NULL:
        return -ENOMEM
    for pi in range(W.hdr.n_pools):
        cap = W.pools[pi].n_backends + 1
        if view_alloc(&W.views[pi], cap) < 0 or view_alloc(&W.fviews[pi], cap) < 0:
            return -ENOMEM
        W.rr[pi] = <uint32_t>W.index      # workers start their round-robin at different places
    return 0


cdef int view_alloc(PoolView *v, uint32_t cap) noexcept nogil:
    """Arrays for a view of up to cap backends.  Returns 0 or -ENOMEM (lb_free frees what was made)."""
    v.idx = <uint32_t *>calloc(cap, sizeof(uint32_t))
    v.w = <uint32_t *>calloc(cap, sizeof(uint32_t))
    v.cum = <uint64_t *>calloc(cap, sizeof(uint64_t))
    v.cw = <int64_t *>calloc(cap, sizeof(int64_t))
    if v.idx == NULL or v.w == NULL or v.cum == NULL or v.cw == NULL:
        return -ENOMEM
    return 0


cdef void view_free(PoolView *v) noexcept nogil:
    free(v.idx)
    free(v.w)
    free(v.cum)
    free(v.cw)


cdef void lb_free() noexcept nogil:
    cdef uint32_t pi
    for pi in range(W.hdr.n_pools):
        if W.views != NULL:
            view_free(&W.views[pi])
        if W.fviews != NULL:
            view_free(&W.fviews[pi])
    free(W.views)
    free(W.fviews)
    W.fviews = NULL
    free(W.ok)
    free(W.rr)
    W.views = NULL
    W.ok = NULL
    W.rr = NULL


cdef void lb_refresh() noexcept nogil:
    """The control process published a change: rebuild every pool's views (and restart the
    smooth-WRR rounds).  Called after the acquire-load that saw the new generation.  views[pi]: the
    usable backends of the lowest priority group that has one; fviews[pi]: those of the next group."""
    cdef uint32_t pi, idx, pr, first, second, panic
    cdef flb_pool_t *p
    for pi in range(W.hdr.n_pools):
        p = &W.pools[pi]
        panic = flb_load32(&p.panic)
        first = FLB_NONE
        second = FLB_NONE
        for idx in range(p.first_backend, p.first_backend + p.n_backends):
            W.ok[idx] = 0
        for idx in range(p.first_backend, p.first_backend + scan_len(p)):
            if not be_ok(&W.backends[idx], panic):
                continue
            pr = flb_load32(&W.backends[idx].priority)
            if pr < first:
                second = first
                first = pr
            elif pr > first and pr < second:
                second = pr
        view_build(&W.views[pi], p, panic, first, True)
        view_build(&W.fviews[pi], p, panic, second, False)


cdef void view_build(PoolView *v, flb_pool_t *p, uint32_t panic, uint32_t prio, bint mark) noexcept nogil:
    """Fill v with pool p's usable backends of priority group prio (FLB_NONE: none - v is empty);
    mark: set W.ok for them (the hash tables' candidates).  Side effects only."""
    cdef uint32_t idx, n = 0, wt, full
    cdef uint64_t total = 0
    cdef bint rr = p.algorithm == FLB_ALG_ROUND_ROBIN
    v.ramp = 0
    if prio != FLB_NONE:
        for idx in range(p.first_backend, p.first_backend + scan_len(p)):
            if flb_load32(&W.backends[idx].priority) != prio or not be_ok(&W.backends[idx], panic):
                continue
            wt = flb_load32(&W.backends[idx].eff_weight)
            if wt == 0:
                continue                  # changed since be_ok(): the next publish brings it back
            if mark:
                W.ok[idx] = 1
            if rr:
                # round robin gives every backend the same share, a ramping one the part of it that
                # its slow start has reached (issue 21, item 8)
                full = flb_load32(&W.backends[idx].weight)
                if full > wt:
                    wt = <uint32_t>((<uint64_t>wt * 1000 + full - 1) // full)
                    v.ramp = 1
                else:
                    wt = 1000
            total += wt
            v.idx[n] = idx
            v.w[n] = wt
            v.cum[n] = total
            v.cw[n] = 0
            n += 1
    v.n = n
    v.total = total


cdef uint32_t pick_round_robin(Conn *c, PoolView *v, uint32_t pi) noexcept nogil:
    # a retry looks from the cursor on without moving it: the next connection then starts on the
    # backend the retry went to, instead of every connection paying for the same dead one first
    cdef uint32_t k, j
    for k in range(v.n):
        j = (W.rr[pi] + (k if c.attempts > 0 else 0)) % v.n
        if c.attempts == 0:
            W.rr[pi] += 1
        if not conn_tried(c, v.idx[j]):
            return v.idx[j]
    return FLB_NONE


cdef uint32_t pick_smooth_wrr(Conn *c, PoolView *v) noexcept nogil:
    # nginx's smooth weighted round robin: every candidate gains its weight, the richest wins and
    # pays the total (ties to the first).  5:3:2 gives a b c a a b a c b a - no bursts to the heavy
    # backend (tests/test_wrr_share.py checks this against the worker's real picks).
    cdef uint32_t j
    cdef int64_t best = -1, total = 0
    for j in range(v.n):
        if c.attempts > 0 and conn_tried(c, v.idx[j]):
            continue
        v.cw[j] += v.w[j]
        total += v.w[j]
        if best < 0 or v.cw[j] > v.cw[best]:
            best = j
    if best < 0:
        return FLB_NONE
    v.cw[best] -= total
    return v.idx[best]


cdef uint32_t pick_least_conn(Conn *c, PoolView *v, uint32_t pi) noexcept nogil:
    # the fewest active connections (all workers) relative to weight, (n + 1) / w as HAProxy does;
    # the scan starts at a rotating offset so that ties spread instead of piling on the first backend
    cdef uint32_t k, j, n = v.n
    cdef int64_t best = -1
    cdef uint64_t load, best_load = 0, best_w = 1
    if n == 0:
        return FLB_NONE
    j = W.rr[pi] % n
    W.rr[pi] += 1
    for k in range(n):
        if c.attempts == 0 or not conn_tried(c, v.idx[j]):
            load = <uint64_t>(flb_sload64(&W.backends[v.idx[j]].active) + 1)
            if best < 0 or load * best_w < best_load * v.w[j]:
                best = j
                best_load = load
                best_w = v.w[j]
        j += 1
        if j == n:
            j = 0
    return FLB_NONE if best < 0 else v.idx[best]


cdef int64_t draw_weighted(Conn *c, PoolView *v, int64_t skip) noexcept nogil:
    """A view entry drawn with probability proportional to its weight, never `skip` nor an entry
    the connection tried; -1 if none.  Binary search over the prefix sums: O(log n)."""
    cdef uint64_t r, total
    cdef uint32_t lo, hi, mid, j
    if v.total == 0:
        return -1
    if c.attempts == 0 and skip < 0:
        r = rng_next() % v.total
        lo = 0
        hi = v.n - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if v.cum[mid] > r:
                hi = mid
            else:
                lo = mid + 1
        return lo
    # with exclusions (retries, the second p2c choice): a linear pass over what is left
    total = 0
    for j in range(v.n):
        if j != skip and not conn_tried(c, v.idx[j]):
            total += v.w[j]
    if total == 0:
        return -1
    r = rng_next() % total
    for j in range(v.n):
        if j != skip and not conn_tried(c, v.idx[j]):
            if r < v.w[j]:
                return j
            r -= v.w[j]
    return -1


cdef uint32_t pick_random(Conn *c, PoolView *v) noexcept nogil:
    cdef int64_t j = draw_weighted(c, v, -1)
    return FLB_NONE if j < 0 else v.idx[j]


cdef uint32_t pick_p2c(Conn *c, PoolView *v) noexcept nogil:
    # two weighted draws; the one with fewer active connections for its weight wins.  The second
    # draw first tries the cheap way and only excludes the first choice explicitly if it repeats.
    cdef int64_t a = draw_weighted(c, v, -1)
    cdef int64_t b
    if a < 0:
        return FLB_NONE
    b = draw_weighted(c, v, -1)
    if b == a:
        b = draw_weighted(c, v, a)
    if b >= 0 and less_loaded(v, <uint32_t>b, <uint32_t>a):
        return v.idx[b]
    return v.idx[a]


cdef inline uint32_t *table_live(flb_pool_t *p, uint32_t *length) noexcept nogil:
    # one acquire-load of the live buffer index; the control process wrote that buffer before
    # the release-store that made it live
    cdef uint32_t act = flb_load32_acq(&p.table_active) & 1
    length[0] = p.table_len[act]
    return <uint32_t *>(W.base + p.table_off[act])


cdef inline bint table_candidate(Conn *c, flb_pool_t *p, uint32_t idx) noexcept nogil:
    return idx >= p.first_backend and idx < p.first_backend + p.n_backends and W.ok[idx] \
        and not conn_tried(c, idx)


cdef uint32_t pick_maglev(Conn *c, flb_pool_t *p) noexcept nogil:
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
        if idx != FLB_NONE and table_candidate(c, p, idx):
            return idx
    return FLB_NONE


cdef uint32_t pick_ring_hash(Conn *c, flb_pool_t *p) noexcept nogil:
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
        if table_candidate(c, p, idx):
            return idx
    return FLB_NONE


cdef uint32_t pick_least_response_time(Conn *c, PoolView *v, uint32_t pi) noexcept nogil:
    # score = (connect-time moving average + 1us) * (active + 1) / weight: the fastest backend
    # wins until its own load evens it out; ties go to fewer active connections.
    cdef uint32_t k, j, n = v.n
    cdef int64_t best = -1
    cdef uint64_t load, best_load = 0, best_w = 1
    cdef double score, best_score = 0.0
    cdef flb_backend_t *b
    if n == 0:
        return FLB_NONE
    j = W.rr[pi] % n
    W.rr[pi] += 1
    for k in range(n):
        if c.attempts == 0 or not conn_tried(c, v.idx[j]):
            b = &W.backends[v.idx[j]]
            load = <uint64_t>(flb_sload64(&b.active) + 1)
            score = (<double>flb_load64(&b.connect_time_ewma_us) + 1.0) * <double>load / <double>v.w[j]
            if best < 0 or score < best_score or (score == best_score and load * best_w < best_load * v.w[j]):
                best = j
                best_score = score
                best_load = load
                best_w = v.w[j]
        j += 1
        if j == n:
            j = 0
    return FLB_NONE if best < 0 else v.idx[best]


cdef uint32_t lb_pick_group(Conn *c, uint32_t pi) noexcept nogil:
    """The backend for c's next connect attempt among pool pi's first usable priority group (the
    whole pool without priorities), or FLB_NONE when none of it can take c."""
    cdef flb_pool_t *p = &W.pools[pi]
    cdef PoolView *v = &W.views[pi]
    cdef uint32_t alg = p.algorithm
    cdef uint32_t idx
    if v.n == 0:
        return FLB_NONE
    if alg == FLB_ALG_WEIGHTED_ROUND_ROBIN:
        return pick_smooth_wrr(c, v)
    if alg == FLB_ALG_ROUND_ROBIN:
        if v.ramp:
            return pick_smooth_wrr(c, v)    # a slow start runs: shares by ramp progress
        return pick_round_robin(c, v, pi)
    if alg == FLB_ALG_LEAST_CONN:
        return pick_least_conn(c, v, pi)
    if alg == FLB_ALG_RANDOM:
        return pick_random(c, v)
    if alg == FLB_ALG_P2C:
        return pick_p2c(c, v)
    if alg == FLB_ALG_LEAST_RESPONSE_TIME:
        return pick_least_response_time(c, v, pi)
    if alg == FLB_ALG_MAGLEV:
        idx = pick_maglev(c, p)
    elif alg == FLB_ALG_RING_HASH:
        idx = pick_ring_hash(c, p)
    else:
        return FLB_NONE
    if idx == FLB_NONE:
        # the table has no live candidate (being rebuilt, or all tried): keep the promise of a
        # working connection over affinity
        idx = pick_random(c, v)
    return idx


cdef uint32_t lb_pick(Conn *c, uint32_t pi) noexcept nogil:
    """The backend for c's next connect attempt in pool pi, or FLB_NONE when none can take it:
    the pool's algorithm over the first usable priority group; once a retry has tried all of that
    group, a weighted draw from the next group (W.fviews; empty without priorities)."""
    cdef uint32_t idx = lb_pick_group(c, pi)
    if idx == FLB_NONE and W.fviews[pi].n > 0:
        idx = pick_random(c, &W.fviews[pi])
    return idx


cdef inline void lb_take(uint32_t idx) noexcept nogil:
    flb_sadd64(&W.backends[idx].active, 1)
    W.wactive[idx] += 1


cdef inline void lb_drop(uint32_t idx) noexcept nogil:
    flb_sadd64(&W.backends[idx].active, -1)
    W.wactive[idx] -= 1


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
    cdef int32_t *wactive
    memset(&W, 0, sizeof(Worker))
    W.base = base
    W.hdr = <flb_header_t *>base
    W.pools = <flb_pool_t *>(base + W.hdr.pools_off)
    W.backends = <flb_backend_t *>(base + W.hdr.backends_off)
    W.rng = 0x9E3779B97F4A7C15ULL
    if lb_setup() < 0:
        lb_free()
        return -1.0
    lb_refresh()
    memset(&c, 0, sizeof(Conn))
    t0 = clock_us()
    for i in range(iterations):
        c.key_hash = flb_hash64(&i, sizeof(i), FLB_SEED_KEY)
        sink += lb_pick(&c, pool)
    t1 = clock_us()
    lb_free()
    if sink == 1:
        t1 += 1        # keep the loop from being optimised away
    return <double>(t1 - t0) * 1000.0 / <double>(iterations if iterations > 0 else 1)
