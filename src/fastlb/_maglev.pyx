# _maglev.pyx - consistent-hash table builders (weighted Maglev, ketama ring) for the control process.
"""Consistent-hash tables for fastlb.

The control process builds these tables when membership, health or weights change and
publishes them into shared memory; the data plane only reads them. Builders are pure
functions of (names, weights, size): every fastlb process, and every fastlb instance with
the same configuration, builds the same table, because the hash and its seeds are fixed
(flb_hash.h) and backends are placed by their name, not by their position in the list.

Maglev (Eisenbud et al., NSDI 2016, section 3.4): backend i walks the permutation
offset_i + j * skip_i (mod M) and the backends take turns claiming the next free slot of
their permutation until the table is full. Two changes from Pseudocode 1, both as in
Envoy's maglev_lb.cc:
  * turns are taken in the byte order of the UTF-8 names, so reordering the configuration
    changes only the indices written, never which name owns which slot;
  * weights: with W the largest weight, a backend of weight w takes its turn in round r
    only when r * w >= k * W, k being the slots it already holds. So the heaviest backend
    takes a slot every round and one of weight W/3 every third round. Integer arithmetic
    keeps this exact, and scaling every weight by the same factor builds the same table.

Ring (ketama style): a backend of weight w gets max(1, round(w * V / W)) points, V being
vnodes_per_weight, so the heaviest backend gets exactly V points and the ring holds at
most N * V. Point k of backend "name" sits at flb_hash64("name#k", FLB_SEED_RING) >> 32;
a key belongs to the first point at or after key_hash(key) >> 32, wrapping.
"""

cimport cython
from cpython cimport array as carray
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport ENOMEM
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcmp, memcpy, memset

from flb_hash cimport FLB_SEED_KEY, FLB_SEED_OFFSET, FLB_SEED_RING, FLB_SEED_SKIP, flb_hash64

import array

NONE = 0xFFFFFFFF
SEED_OFFSET = FLB_SEED_OFFSET
SEED_SKIP = FLB_SEED_SKIP
SEED_RING = FLB_SEED_RING
SEED_KEY = FLB_SEED_KEY

cdef extern from *:
    # Constants above INT_MAX cannot be enumerators; C macros keep them compile-time constants.
    """
    #define MG_NONE 0xFFFFFFFFu           /* empty slot; never a valid index + base */
    #define MG_MAX_WEIGHT 0xFFFFFFFFull   /* so that slots taken * largest weight fits uint64 */
    #define MG_MAX_TABLE 4294967291ull    /* largest prime below 2**32: slots are uint32 */
    """
    uint32_t MG_NONE
    uint64_t MG_MAX_WEIGHT
    uint64_t MG_MAX_TABLE

cdef enum:
    # Cap on ring points (8 bytes each): a typo in vnodes_per_weight must not eat the host.
    MG_MAX_RING_POINTS = 1 << 24
    # '#' plus the longest decimal uint64.
    MG_SUFFIX_MAX = 21
    MG_RADIX = 1 << 16

cdef carray.array _U32 = array.array("I")
if _U32.itemsize != 4:
    raise ImportError("fastlb._maglev needs array typecode 'I' to be 4 bytes")


ctypedef struct mg_backend:
    const char *name        # UTF-8 bytes, owned by a Python bytes object the caller keeps alive
    size_t name_len
    uint64_t pos            # next position of this backend's permutation to try
    uint64_t skip
    uint64_t weight         # 0: takes no slots / no points
    uint64_t taken          # slots taken so far
    uint64_t round          # the round in which it takes its next slot
    uint32_t index          # position in the caller's list: what the table stores


# ---------------------------------------------------------------------------------------------
# C core: everything below runs without the GIL over malloc'd arrays.

cdef int mg_cmp_name(const void *a, const void *b) noexcept nogil:
    # qsort order of backends: bytewise on the name, a prefix first (as Python bytes compare).
    cdef const mg_backend *x = <const mg_backend *>a
    cdef const mg_backend *y = <const mg_backend *>b
    cdef size_t n = x.name_len if x.name_len < y.name_len else y.name_len
    cdef int c = memcmp(x.name, y.name, n)
    if c != 0:
        return c
    return (x.name_len > y.name_len) - (x.name_len < y.name_len)


cdef bint mg_is_prime(uint64_t m) noexcept nogil:
    # Trial division: m < 2**32, so at most ~32k odd divisors; negligible next to a build.
    cdef uint64_t d = 3
    if m < 2:
        return False
    if m % 2 == 0:
        return m == 2
    while d * d <= m:
        if m % d == 0:
            return False
        d += 2
    return True


cdef inline bint mg_before(const mg_backend *b, uint32_t x, uint32_t y) noexcept nogil:
    # Fill order: by round, then by name order (x, y are positions in the name-sorted array).
    return b[x].round < b[y].round or (b[x].round == b[y].round and x < y)


cdef void mg_sift_down(uint32_t *heap, uint32_t n, const mg_backend *b) noexcept nogil:
    # Restore the min-heap after the key of heap[0] grew.
    cdef uint32_t i = 0, c, top = heap[0]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and mg_before(b, heap[c + 1], heap[c]):
            c += 1
        if not mg_before(b, heap[c], top):
            break
        heap[i] = heap[c]
        i = c
    heap[i] = top


@cython.cdivision(True)
cdef int mg_fill(mg_backend *b, uint32_t n, uint32_t *table, uint64_t m, uint32_t base) noexcept nogil:
    """Fill table[0..m) with index + base of the owning backend, MG_NONE if all weights are 0.

    b: n backends with unique names, sorted by name, pos = offset and skip set; m: prime >= 2.
    Returns 0, or -ENOMEM (table then holds MG_NONE only).

    Envoy's loop visits every backend in every round and skips those whose weight does not
    let them take a slot yet; with skewed weights that is O(M * N). Its fill order is simply
    ascending (round, name order), so a min-heap on that pair replays it exactly while
    touching only the backend whose turn it is: O(M log N) whatever the weights.
    """
    cdef uint32_t *heap
    cdef uint32_t live = 0, i, top
    cdef uint64_t left = m, pos, skip, max_w = 0, target, nxt
    cdef mg_backend *bk

    for pos in range(m):
        table[pos] = MG_NONE
    for i in range(n):
        if b[i].weight > max_w:
            max_w = b[i].weight
    if max_w == 0:
        return 0
    heap = <uint32_t *>malloc(n * sizeof(uint32_t))
    if heap == NULL:
        return -ENOMEM
    # Everyone starts in round 1; ascending name order is already a valid heap.
    for i in range(n):
        if b[i].weight > 0:
            b[i].round = 1
            b[i].taken = 0
            heap[live] = i
            live += 1

    while left > 0:  # one slot per turn
        left -= 1
        top = heap[0]
        bk = &b[top]
        pos = bk.pos
        skip = bk.skip
        # m is prime and 0 < skip < m, so the walk visits every slot: it ends on a free one.
        while table[pos] != MG_NONE:
            pos += skip
            if pos >= m:
                pos -= m
        table[pos] = bk.index + base
        pos += skip
        if pos >= m:
            pos -= m
        bk.pos = pos
        bk.taken += 1
        # Envoy: takes in round r iff r * w >= taken * W, and at most once per round.
        target = bk.taken * max_w
        nxt = target / bk.weight + (target % bk.weight != 0)
        bk.round = nxt if nxt > bk.round else bk.round + 1
        mg_sift_down(heap, live, b)

    free(heap)
    return 0


@cython.cdivision(True)
cdef uint64_t mg_ring_points(const uint64_t *weights, uint32_t n, uint64_t vnodes,
                             uint64_t *each) noexcept nogil:
    # Points per backend (into each[] if not NULL) and their total. weights < 2**32 and
    # vnodes <= 2**24, so w * vnodes + W/2 fits uint64.
    cdef uint64_t max_w = 0, total = 0, p
    cdef uint32_t i
    for i in range(n):
        if weights[i] > max_w:
            max_w = weights[i]
    for i in range(n):
        p = 0
        if weights[i] > 0:
            p = (weights[i] * vnodes + max_w / 2) / max_w
            if p == 0:
                p = 1
        if each != NULL:
            each[i] = p
        total += p
    return total


@cython.cdivision(True)
cdef size_t mg_u64_dec(char *dst, uint64_t v) noexcept nogil:
    # Decimal digits of v at dst (no NUL), like Python's str(v); returns their count.
    cdef char tmp[20]
    cdef size_t n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        dst[i] = tmp[n - 1 - i]
    return n


cdef void mg_radix_sort(uint64_t *keys, uint64_t *tmp, size_t *count, size_t n) noexcept nogil:
    # LSD radix sort of n uint64 keys, 16 bits per pass (count: MG_RADIX counters, on the
    # heap: 512 KiB is too much for a thread's stack). A pass where every key has the same
    # digit is skipped, typically the index bits above 16. The result ends in keys.
    cdef size_t i, s, c
    cdef unsigned int shift, d
    cdef uint64_t *src = keys
    cdef uint64_t *dst = tmp
    cdef uint64_t *t
    for shift in range(0, 64, 16):
        memset(count, 0, MG_RADIX * sizeof(size_t))
        for i in range(n):
            count[(src[i] >> shift) & 0xFFFF] += 1
        if n == 0 or count[(src[0] >> shift) & 0xFFFF] == n:
            continue
        s = 0
        for d in range(<unsigned int>MG_RADIX):
            c = count[d]
            count[d] = s
            s += c
        for i in range(n):
            d = (src[i] >> shift) & 0xFFFF
            dst[count[d]] = src[i]
            count[d] += 1
        t = src
        src = dst
        dst = t
    if src != keys:
        memcpy(keys, src, n * sizeof(uint64_t))


cdef int mg_ring_fill(const mg_backend *b, uint32_t n, uint64_t vnodes, uint32_t *out,
                      uint32_t base) noexcept nogil:
    """Write the sorted ring as (hash32, index + base) pairs into out (2 * points uint32).

    b: n backends in input order (index == position). Returns 0, or -ENOMEM.
    Keys are (hash32 << 32) | index, so sorting them sorts by hash, ties by index.
    """
    cdef uint64_t *weights = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
    cdef uint64_t *each = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
    cdef size_t *count = <size_t *>malloc(MG_RADIX * sizeof(size_t))
    cdef uint64_t *keys = NULL
    cdef uint64_t *tmp = NULL
    cdef char *buf = NULL
    cdef uint64_t total = 0, k, h
    cdef size_t p = 0, longest = 0, j, nl
    cdef uint32_t i
    cdef int rc = -ENOMEM

    if weights != NULL and each != NULL:
        for i in range(n):
            weights[i] = b[i].weight
            if b[i].name_len > longest:
                longest = b[i].name_len
        total = mg_ring_points(weights, n, vnodes, each)
        keys = <uint64_t *>malloc((total + 1) * sizeof(uint64_t))
        tmp = <uint64_t *>malloc((total + 1) * sizeof(uint64_t))
        buf = <char *>malloc(longest + MG_SUFFIX_MAX)
    if keys != NULL and tmp != NULL and buf != NULL and count != NULL:
        for i in range(n):
            # Point k hashes the bytes of f"{name}#{k}", the same text a Python reference hashes.
            nl = b[i].name_len
            memcpy(buf, b[i].name, nl)
            buf[nl] = 35  # '#'
            for k in range(each[i]):
                h = flb_hash64(buf, nl + 1 + mg_u64_dec(buf + nl + 1, k), FLB_SEED_RING) >> 32
                keys[p] = (h << 32) | b[i].index
                p += 1
        mg_radix_sort(keys, tmp, count, p)
        for j in range(p):
            out[2 * j] = <uint32_t>(keys[j] >> 32)
            out[2 * j + 1] = <uint32_t>keys[j] + base
        rc = 0
    free(weights)
    free(each)
    free(count)
    free(keys)
    free(tmp)
    free(buf)
    return rc


# ---------------------------------------------------------------------------------------------
# Python edge: validate, encode names, allocate; raise here, never below.

cdef class _Backends:
    # The C array of backends plus the bytes objects its name pointers point into.
    cdef mg_backend *b
    cdef uint32_t n
    cdef list encoded

    def __cinit__(self, names, weights):
        cdef Py_ssize_t i, n = len(names)
        if len(weights) != n:
            raise ValueError(f"{n} names but {len(weights)} weights")
        # Equal names would share a permutation (or ring points): which one wins would then
        # depend on input order, which the table must not.
        if len(set(names)) != n:
            raise ValueError("backend names must be unique")
        if n >= MG_NONE:
            raise ValueError("too many backends")
        self.encoded = []
        self.n = <uint32_t>n
        self.b = <mg_backend *>malloc((n + 1) * sizeof(mg_backend))
        if self.b == NULL:
            raise MemoryError()
        memset(self.b, 0, (n + 1) * sizeof(mg_backend))
        for i in range(n):
            name, w = names[i], weights[i]
            if not isinstance(name, str):
                raise TypeError(f"backend name must be str, got {type(name).__name__}")
            if not isinstance(w, int):
                raise TypeError(f"weight of {name!r} must be int, got {type(w).__name__}")
            if not 0 <= w <= MG_MAX_WEIGHT:
                raise ValueError(f"weight of {name!r} must be in 0..{MG_MAX_WEIGHT}, got {w}")
            raw = name.encode("utf-8")
            self.encoded.append(raw)
            self.b[i].name = PyBytes_AS_STRING(raw)
            self.b[i].name_len = <size_t>PyBytes_GET_SIZE(raw)
            self.b[i].weight = <uint64_t>w
            self.b[i].index = <uint32_t>i

    def __dealloc__(self):
        free(self.b)


cdef uint32_t _check_base(uint32_t n, index_base) except? 0xFFFFFFFF:
    # The largest entry, n - 1 + index_base, must stay below NONE.
    if not isinstance(index_base, int):
        raise TypeError("index_base must be int")
    if index_base < 0 or n + index_base > MG_NONE:
        raise ValueError(f"index_base {index_base} with {n} backends reaches NONE")
    return <uint32_t>index_base


cdef uint64_t _check_table_size(table_size, Py_ssize_t n) except 0:
    if not isinstance(table_size, int):
        raise TypeError("table_size must be int")
    if not 2 <= table_size <= MG_MAX_TABLE or not mg_is_prime(<uint64_t>table_size):
        raise ValueError(f"table_size must be a prime in 2..{MG_MAX_TABLE}, got {table_size}")
    if table_size < n:
        raise ValueError(f"table_size {table_size} is smaller than the {n} backends")
    return <uint64_t>table_size


cdef uint64_t _check_vnodes(vnodes_per_weight) except 0:
    if not isinstance(vnodes_per_weight, int):
        raise TypeError("vnodes_per_weight must be int")
    if not 1 <= vnodes_per_weight <= MG_MAX_RING_POINTS:
        raise ValueError(f"vnodes_per_weight must be in 1..{MG_MAX_RING_POINTS}, got {vnodes_per_weight}")
    return <uint64_t>vnodes_per_weight


@cython.cdivision(True)
cdef _maglev_into(uint32_t *out, _Backends bs, uint64_t m, uint32_t base):
    # Turn order by name, permutations from the names, then the fill.
    cdef uint32_t i, n = bs.n
    cdef int rc
    cdef mg_backend *b = bs.b
    with nogil:
        qsort(b, n, sizeof(mg_backend), mg_cmp_name)
        for i in range(n):
            b[i].pos = flb_hash64(b[i].name, b[i].name_len, FLB_SEED_OFFSET) % m
            b[i].skip = flb_hash64(b[i].name, b[i].name_len, FLB_SEED_SKIP) % (m - 1) + 1
        rc = mg_fill(b, n, out, m, base)
    if rc != 0:
        raise MemoryError()


def maglev_build(names, weights, table_size):
    """Maglev table of table_size uint32 entries (array 'I'): entry = index into names.

    Raises ValueError if table_size is not a prime >= len(names), names repeat, or a weight
    is outside 0..2**32-1. Backends of weight 0 get no entries; if none has weight > 0 every
    entry is NONE.
    """
    cdef _Backends bs = _Backends(names, weights)
    cdef uint64_t m = _check_table_size(table_size, bs.n)
    cdef carray.array table = carray.clone(_U32, <Py_ssize_t>m, False)
    _maglev_into(<uint32_t *>table.data.as_uints, bs, m, 0)
    return table


def maglev_build_into(uint32_t[::1] out not None, names, weights, table_size, index_base=0):
    """Like maglev_build, written into out[0:table_size] with entry = index + index_base.

    out: a writable C-contiguous uint32 buffer (e.g. a memoryview of shared memory cast to
    'I') of at least table_size entries. Everything is validated before out is touched.
    """
    cdef _Backends bs = _Backends(names, weights)
    cdef uint64_t m = _check_table_size(table_size, bs.n)
    cdef uint32_t base = _check_base(bs.n, index_base)
    if <uint64_t>out.shape[0] < m:
        raise ValueError(f"out holds {out.shape[0]} entries, table_size is {m}")
    _maglev_into(&out[0], bs, m, base)


def ring_points(weights, vnodes_per_weight):
    """Number of points ring_build makes: the caller sizes its buffer as 2 * this."""
    cdef uint64_t v = _check_vnodes(vnodes_per_weight)
    cdef Py_ssize_t i, n = len(weights)
    cdef uint64_t *w = <uint64_t *>malloc((n + 1) * sizeof(uint64_t))
    cdef uint64_t total
    if w == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            x = weights[i]
            if not isinstance(x, int):
                raise TypeError(f"weight must be int, got {type(x).__name__}")
            if not 0 <= x <= MG_MAX_WEIGHT:
                raise ValueError(f"weight must be in 0..{MG_MAX_WEIGHT}, got {x}")
            w[i] = <uint64_t>x
        total = mg_ring_points(w, <uint32_t>n, v, NULL)
    finally:
        free(w)
    if total > MG_MAX_RING_POINTS:
        raise ValueError(f"{total} ring points exceed the cap of {MG_MAX_RING_POINTS}")
    return total


cdef _ring_into(uint32_t *out, _Backends bs, uint64_t vnodes, uint32_t base):
    cdef int rc
    with nogil:
        rc = mg_ring_fill(bs.b, bs.n, vnodes, out, base)
    if rc != 0:
        raise MemoryError()


def ring_build(names, weights, vnodes_per_weight):
    """Ketama-style ring (array 'I'): flat (hash32, index) pairs sorted by hash32, ties by index.

    Backend i gets max(1, round(weights[i] * vnodes_per_weight / max(weights))) points, none
    if its weight is 0. Names must be unique, as for maglev_build.
    """
    cdef _Backends bs = _Backends(names, weights)
    cdef uint64_t v = _check_vnodes(vnodes_per_weight)
    cdef uint64_t points = ring_points(weights, vnodes_per_weight)
    cdef carray.array ring = carray.clone(_U32, <Py_ssize_t>(2 * points), False)
    _ring_into(<uint32_t *>ring.data.as_uints, bs, v, 0)
    return ring


def ring_build_into(uint32_t[::1] out not None, names, weights, vnodes_per_weight, index_base=0):
    """Like ring_build, into out[0:2 * points] with index + index_base; returns 2 * points.

    Raises ValueError (before touching out) if out holds fewer than 2 * ring_points(...).
    """
    cdef _Backends bs = _Backends(names, weights)
    cdef uint64_t v = _check_vnodes(vnodes_per_weight)
    cdef uint32_t base = _check_base(bs.n, index_base)
    cdef uint64_t need = 2 * ring_points(weights, vnodes_per_weight)
    if <uint64_t>out.shape[0] < need:
        raise ValueError(f"out holds {out.shape[0]} entries, the ring needs {need}")
    if need:
        _ring_into(&out[0], bs, v, base)
    return need


def key_hash(bytes key not None):
    """flb_hash64(key, FLB_SEED_KEY): what the data plane computes for a client key."""
    return flb_hash64(PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key), FLB_SEED_KEY)


@cython.cdivision(True)
def maglev_lookup(const uint32_t[::1] table not None, bytes key not None):
    """table[key_hash(key) % len(table)]; NONE for an empty table."""
    cdef uint64_t n = <uint64_t>table.shape[0]
    if n == 0:
        return NONE
    return table[flb_hash64(PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key), FLB_SEED_KEY) % n]


def ring_lookup(const uint32_t[::1] ring not None, bytes key not None):
    """Index of the first point with hash32 >= key_hash(key) >> 32, wrapping; NONE if empty."""
    cdef size_t n = <size_t>ring.shape[0] // 2, lo = 0, hi, mid
    cdef uint32_t h
    if ring.shape[0] % 2:
        raise ValueError("a ring holds (hash32, index) pairs: its length must be even")
    if n == 0:
        return NONE
    h = <uint32_t>(flb_hash64(PyBytes_AS_STRING(key), <size_t>PyBytes_GET_SIZE(key), FLB_SEED_KEY) >> 32)
    hi = n
    while lo < hi:
        mid = lo + (hi - lo) // 2
        if ring[2 * mid] < h:
            lo = mid + 1
        else:
            hi = mid
    if lo == n:
        lo = 0
    return ring[2 * lo + 1]


def table_diff(const uint32_t[::1] old not None, const uint32_t[::1] new not None):
    """Fraction of slots whose entry differs between two Maglev tables of the same size."""
    cdef Py_ssize_t i, n = old.shape[0]
    cdef size_t changed = 0
    if new.shape[0] != n:
        raise ValueError(f"tables differ in size: {n} and {new.shape[0]}")
    if n == 0:
        return 0.0
    with nogil:
        for i in range(n):
            changed += old[i] != new[i]
    return changed / <double>n
