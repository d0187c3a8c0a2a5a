# flb_hash.pxd - declarations of flb_hash.h (the one hash function for keys and backend names).
from libc.stdint cimport uint64_t


cdef extern from "flb_hash.h" nogil:
    uint64_t flb_mix64(uint64_t x)
    uint64_t flb_hash64(const void *data, size_t length, uint64_t seed)
    uint64_t FLB_SEED_OFFSET
    uint64_t FLB_SEED_SKIP
    uint64_t FLB_SEED_RING
    uint64_t FLB_SEED_KEY
    uint64_t FLB_SEED_SPLIT
