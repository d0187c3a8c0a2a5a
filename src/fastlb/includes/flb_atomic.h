/* flb_atomic.h - the few atomic operations fastlb uses on shared memory (GCC __atomic builtins). */
#ifndef FLB_ATOMIC_H
#define FLB_ATOMIC_H
#include <stdint.h>

static inline uint32_t flb_load32_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t flb_load32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void flb_store32_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void flb_store32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t flb_load64_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t flb_load64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void flb_store64_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void flb_store64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline uint64_t flb_add64(uint64_t *p, uint64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline int64_t flb_sadd64(int64_t *p, int64_t v) { return __atomic_add_fetch(p, v, __ATOMIC_RELAXED); }
static inline int64_t flb_sload64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void flb_fence_acq(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void flb_fence_rel(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

#endif
