# flb_atomic.pxd - declarations of flb_atomic.h (atomic loads/stores/adds on shared memory).
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef extern from "flb_atomic.h" nogil:
    uint32_t flb_load32_acq(const uint32_t *p)
    uint32_t flb_load32(const uint32_t *p)
    void flb_store32_rel(uint32_t *p, uint32_t v)
    void flb_store32(uint32_t *p, uint32_t v)
    uint64_t flb_load64_acq(const uint64_t *p)
    uint64_t flb_load64(const uint64_t *p)
    void flb_store64_rel(uint64_t *p, uint64_t v)
    void flb_store64(uint64_t *p, uint64_t v)
    uint64_t flb_add64(uint64_t *p, uint64_t v)
    int64_t flb_sadd64(int64_t *p, int64_t v)
    int64_t flb_sload64(const int64_t *p)
    void flb_fence_acq()
    void flb_fence_rel()
