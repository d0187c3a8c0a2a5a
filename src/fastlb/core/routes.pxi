# core/routes.pxi - routes and traffic splits: which pool a new connection goes to.
#
# A listener owns an ordered slice of routes (shared memory, flb_route_t).  route_select() takes the
# first route whose match holds (source prefixes against c.peer, server-name patterns against the
# SNI the prelude read; exact names in any route before `*.` wildcards), else the listener's
# default route, then a pool by that route's split.  The split lives in the worker as a local copy
# (RouteView), rebuilt by routes_refresh() when the generation moves, so a pick reads no shared
# configuration: a few comparisons, no allocation, no lock.
#
# Splits: weights per pool, in a fixed order.  affinity none: a weighted draw among the pools that
# can take a connection (weight > 0 and at least one eligible backend).  affinity source_ip: a
# 32-bit hash h of the client address, scaled onto [0, total): the entry k with
# cum[k-1] <= h * total / 2^32 < cum[k].  A client's h never changes, so moving weight from one
# entry to its neighbour only moves clients between those two (raising a canary listed first or
# last only moves clients onto it).  If that pool has no usable backend, the same h is scaled over
# the usable pools instead.  No usable pool at all: the pool by weight, whose pick fails (rejected,
# counted as that pool's no_backend).  Every weight 0 (a closed route): FLB_NONE, rejected.


cdef int routes_setup() noexcept nogil:
    """Map the route tables, allocate the per-route views, fill each Listener's route fields.
    Call after the listeners are set up.  Returns 0 or -ENOMEM."""
    cdef int i
    cdef uint32_t last
    cdef Listener *l
    W.routes = <flb_route_t *>(W.base + W.hdr.routes_off)
    W.cidrs = <flb_cidr_t *>(W.base + W.hdr.cidrs_off)
    W.snis = <flb_sni_t *>(W.base + W.hdr.snis_off)
    W.route_pools = <uint64_t *>(W.base + W.hdr.route_pools_off)
    W.rviews = <RouteView *>calloc(W.hdr.n_routes + 1, sizeof(RouteView))
    if W.rviews == NULL:
        return -ENOMEM
    for i in range(W.n_listeners):
        l = &W.listeners[i]
        l.first_route = l.shm.first_route
        l.n_routes = l.shm.n_routes
        if l.first_route + l.n_routes > W.hdr.n_routes:
            l.n_routes = 0              # a region that does not add up routes nothing
        l.needs_sni = l.shm.needs_sni
        l.sni_policy = l.shm.sni_policy
        l.default_route = FLB_NONE
        if l.n_routes > 0:
            last = l.first_route + l.n_routes - 1
            if W.routes[last].has_match == 0:
                l.default_route = last
    return 0


cdef void routes_free() noexcept nogil:
    free(W.rviews)
    W.rviews = NULL


cdef void route_view_build(RouteView *v, flb_split_t *sp) noexcept nogil:
    """Fill v from the split copy sp (entries with a pool index out of range are dropped) and the
    pools' current views (lb_refresh() must have run first)."""
    cdef uint32_t k, n = sp.n if sp.n <= FLB_MAX_SPLIT else FLB_MAX_SPLIT
    cdef uint32_t pi, wt, total = 0, live = 0
    v.n = 0
    v.n_live = 0
    v.affinity = sp.affinity
    for k in range(n):
        pi = sp.pool[k]
        if pi >= W.hdr.n_pools:
            continue
        wt = sp.weight[k] if sp.weight[k] <= 1000 else 1000
        total += wt
        v.pool[v.n] = pi
        v.cum[v.n] = total
        v.n += 1
        if wt > 0 and W.views[pi].n > 0:
            live += wt
            v.live_pool[v.n_live] = pi
            v.live_cum[v.n_live] = live
            v.n_live += 1
    v.total = total
    v.live_total = live


cdef void routes_refresh() noexcept nogil:
    """The generation moved: copy every route's live split (retrying a copy that raced with a
    republish, see shm_layout.h) and rebuild its view.  After lb_refresh()."""
    cdef uint32_t ri, s1
    cdef flb_route_t *r
    cdef flb_split_t copy
    for ri in range(W.hdr.n_routes):
        r = &W.routes[ri]
        while True:
            s1 = flb_load32_acq(&r.split_seq)
            memcpy(&copy, &r.split[s1 & 1], sizeof(flb_split_t))
            flb_fence_acq()
            if flb_load32(&r.split_seq) == s1:
                break
        route_view_build(&W.rviews[ri], &copy)


cdef inline uint32_t peer_addr(const uint8_t *peer, const uint8_t **addr) noexcept nogil:
    """The address bytes of the sockaddr at peer (an IPv4-mapped IPv6 address counts as IPv4):
    sets *addr and returns 4 or 16, or 0 for any other family."""
    cdef uint16_t fam
    memcpy(&fam, peer, 2)
    if fam == AF_INET:
        addr[0] = peer + 4              # sockaddr_in.sin_addr
        return 4
    if fam == AF_INET6:
        addr[0] = peer + 8              # sockaddr_in6.sin6_addr
        if peer[8] == 0 and peer[9] == 0 and peer[10] == 0 and peer[11] == 0 and peer[12] == 0 \
                and peer[13] == 0 and peer[14] == 0 and peer[15] == 0 and peer[16] == 0 \
                and peer[17] == 0 and peer[18] == 0xFF and peer[19] == 0xFF:
            addr[0] = peer + 20
            return 4
        return 16
    return 0


cdef bint routes_cidr_match(uint32_t first, uint32_t n, const uint8_t *peer) noexcept nogil:
    """Is the address of the sockaddr at peer inside one of the prefixes cidrs[first, first + n)?
    (match.source; an IPv4-mapped IPv6 address counts as IPv4.)  No side effects."""
    cdef const uint8_t *a
    cdef uint32_t alen = peer_addr(peer, &a)
    cdef uint32_t k, j, fam, bits, full
    cdef flb_cidr_t *e
    cdef bint ok
    if alen == 0 or first + n > W.hdr.n_cidrs:
        return False
    fam = AF_INET if alen == 4 else AF_INET6
    for k in range(first, first + n):
        e = &W.cidrs[k]
        if e.family != fam:
            continue
        bits = e.prefix if e.prefix <= alen * 8 else alen * 8
        full = bits >> 3
        ok = True
        for j in range(full):
            if a[j] != e.addr[j]:
                ok = False
                break
        if ok and (bits & 7) != 0 and ((a[full] ^ e.addr[full]) & <uint8_t>(0xFF << (8 - (bits & 7)))) != 0:
            ok = False
        if ok:
            return True
    return False


cdef inline uint8_t ascii_lower(uint8_t ch) noexcept nogil:
    return ch + 32 if ch >= 65 and ch <= 90 else ch


cdef bint routes_sni_match(uint32_t first, uint32_t n, const char *sni, uint32_t sni_len,
                           bint wildcard) noexcept nogil:
    """Does the server name sni[0:sni_len] match one of the patterns snis[first, first + n) of the
    given kind: exact names (wildcard = 0) or `*.` suffixes (wildcard = 1)?  ASCII
    case-insensitive (patterns are stored lower case).  No side effects."""
    cdef uint32_t k, j, off
    cdef flb_sni_t *p
    cdef bint ok
    if first + n > W.hdr.n_snis:
        return False
    for k in range(first, first + n):
        p = &W.snis[k]
        if p.wildcard != <uint32_t>wildcard or p.len == 0 or p.len >= FLB_SNI_LEN:
            continue
        if wildcard:
            if sni_len <= p.len:
                continue                # "*.example.com" needs a label in front of ".example.com"
            off = sni_len - p.len
        else:
            if sni_len != p.len:
                continue
            off = 0
        ok = True
        for j in range(p.len):
            if ascii_lower(<uint8_t>sni[off + j]) != <uint8_t>p.name[j]:
                ok = False
                break
        if ok:
            return True
    return False


cdef inline bint route_matches(flb_route_t *r, Conn *c, const char *sni, uint32_t sni_len,
                               bint wildcard) noexcept nogil:
    """Does r's match hold for c?  Pass 1 (wildcard = 0) counts only exact names; pass 2 only
    `*.` patterns and considers only routes that match on sni."""
    if r.n_snis > 0:
        if sni_len == 0 or not routes_sni_match(r.first_sni, r.n_snis, sni, sni_len, wildcard):
            return False
    elif wildcard:
        return False
    if r.n_cidrs > 0 and not routes_cidr_match(r.first_cidr, r.n_cidrs, c.peer):
        return False
    return True


cdef inline uint32_t split_point(uint32_t h, uint32_t total, uint32_t *cum, uint32_t n) noexcept nogil:
    """The entry k with cum[k-1] <= h * total / 2^32 < cum[k] (n > 0, total = cum[n-1] > 0)."""
    cdef uint32_t x = <uint32_t>((<uint64_t>h * total) >> 32)
    cdef uint32_t k = 0
    while k < n - 1 and cum[k] <= x:
        k += 1
    return k


cdef uint32_t split_pick(RouteView *v, Conn *c) noexcept nogil:
    """The pool of v's split for c.  Pools without a usable backend are skipped while another has
    one; when none has, the pool by weight (its pick then fails: rejected, counted as that pool's
    no_backend, as for a listener with one pool).  FLB_NONE only when every weight is 0."""
    cdef uint32_t h = 0, k
    cdef const uint8_t *a
    cdef uint32_t alen
    if v.total == 0:
        return FLB_NONE
    if v.affinity == FLB_AFFINITY_SOURCE_IP:
        alen = peer_addr(c.peer, &a)
        h = <uint32_t>(flb_hash64(a, alen, FLB_SEED_SPLIT) >> 32)
        k = split_point(h, v.total, v.cum, v.n)
        if v.live_total == 0 or W.views[v.pool[k]].n > 0:
            return v.pool[k]
        return v.live_pool[split_point(h, v.live_total, v.live_cum, v.n_live)]
    if v.n_live == 1:
        return v.live_pool[0]
    if v.n_live > 1:
        return v.live_pool[split_point(<uint32_t>(rng_next() >> 32), v.live_total, v.live_cum, v.n_live)]
    return v.pool[split_point(<uint32_t>(rng_next() >> 32), v.total, v.cum, v.n)]


cdef uint32_t route_select(Conn *c, const char *sni, uint32_t sni_len) noexcept nogil:
    """Route c: the first route of its listener whose match holds for c.peer and the server name
    sni[0:sni_len] (sni_len = 0: none was read), exact names before `*.` wildcards, else the
    default route; then the pool by that route's split.

    Sets c.route and c.pool (the caller computes c.key_hash for a hashing pool), counts the
    connection in route_pools[route][pool] (or the route's no_pool).  Returns c.pool, or FLB_NONE when no route takes c (counted
    in listener.no_route; also sni_policy = reject with no name) or no pool of the route's split can
    (counted in route.no_pool): the caller rejects.  Applies a split published before this call,
    even within one loop turn (one acquire-load of the generation)."""
    cdef Listener *l = &W.listeners[c.listener]
    cdef uint32_t ri, found = FLB_NONE, pi
    cdef uint32_t end = l.first_route + l.n_routes
    if flb_load64_acq(&W.hdr.generation) != W.generation:
        sync_generation()
    for ri in range(l.first_route, end):
        if W.routes[ri].has_match and route_matches(&W.routes[ri], c, sni, sni_len, False):
            found = ri
            break
    if found == FLB_NONE and sni_len > 0 and l.needs_sni:
        for ri in range(l.first_route, end):
            if W.routes[ri].has_match and route_matches(&W.routes[ri], c, sni, sni_len, True):
                found = ri
                break
    if found == FLB_NONE and not (sni_len == 0 and l.needs_sni and l.sni_policy == FLB_SNI_POLICY_REJECT):
        found = l.default_route
    if found == FLB_NONE:
        flb_add64(&l.shm.no_route, 1)
        return FLB_NONE
    c.route = found
    pi = split_pick(&W.rviews[found], c)
    if pi == FLB_NONE:
        flb_add64(&W.routes[found].no_pool, 1)
        return FLB_NONE
    c.pool = pi
    flb_add64(&W.route_pools[<uint64_t>found * W.hdr.n_pools + pi], 1)
    return pi


cdef uint32_t conn_route(Conn *c, const char *sni, uint32_t sni_len) noexcept nogil:
    """route_select(), then c.key_hash when the chosen pool hashes the client (maglev, ring_hash):
    from c.peer - the PROXY-protocol source when one was accepted - and, for four_tuple, c.cfd's
    local address.  What every caller uses (accept, the end of a prelude, a new UDP flow).
    Returns c.pool or FLB_NONE, as route_select()."""
    cdef uint32_t pi = route_select(c, sni, sni_len)
    cdef flb_pool_t *p
    if pi != FLB_NONE:
        p = &W.pools[pi]
        if p.algorithm == FLB_ALG_MAGLEV or p.algorithm == FLB_ALG_RING_HASH:
            c.key_hash = lb_key_hash(p.hash_key, <sockaddr_storage *>c.peer, c.cfd)
    return pi


cdef int64_t route_bench(char *base, uint32_t listener, const uint8_t *peer, uint32_t peer_len,
                         const char *sni, uint32_t sni_len, long iterations, uint32_t *route,
                         uint32_t *pool) noexcept nogil:
    """Call route_select() `iterations` times for one client (peer sockaddr, server name) on
    `listener` of the region at base, from a private worker state (no sockets); sets *route and
    *pool from the last call.  Returns the elapsed microseconds, or -ENOMEM / -EINVAL."""
    cdef Conn c
    cdef long i
    cdef uint64_t t0, t1
    memset(&W, 0, sizeof(Worker))
    W.base = base
    W.hdr = <flb_header_t *>base
    W.shm_listeners = <flb_listener_t *>(base + W.hdr.listeners_off)
    W.pools = <flb_pool_t *>(base + W.hdr.pools_off)
    W.backends = <flb_backend_t *>(base + W.hdr.backends_off)
    W.rng = 0x9E3779B97F4A7C15ULL
    if listener >= W.hdr.n_listeners or peer_len > FLB_ADDR_LEN:
        return -22
    W.n_listeners = <int>W.hdr.n_listeners
    W.listeners = <Listener *>calloc(W.n_listeners, sizeof(Listener))
    if W.listeners == NULL or lb_setup() < 0:
        free(W.listeners)
        lb_free()
        return -ENOMEM
    for i in range(W.n_listeners):
        W.listeners[i].fd = -1
        W.listeners[i].shm = &W.shm_listeners[i]
        W.listeners[i].pool = W.shm_listeners[i].pool
    if routes_setup() < 0:
        free(W.listeners)
        lb_free()
        return -ENOMEM
    W.generation = flb_load64_acq(&W.hdr.generation)
    lb_refresh()
    routes_refresh()
    t0 = clock_us()
    for i in range(iterations if iterations > 0 else 1):
        memset(&c, 0, sizeof(Conn))
        c.cfd = -1
        c.listener = listener
        c.route = FLB_NONE
        c.pool = FLB_NONE
        memcpy(c.peer, peer, peer_len)
        route_select(&c, sni, sni_len)
    t1 = clock_us()
    route[0] = c.route
    pool[0] = c.pool
    routes_free()
    free(W.listeners)
    lb_free()
    memset(&W, 0, sizeof(Worker))
    return <int64_t>(t1 - t0)
