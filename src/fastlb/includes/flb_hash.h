/* flb_hash.h - the one hash function of fastlb: keys (client addresses) and backend names.
 * Deterministic across processes and instances on hosts of the same byte order, so every worker
 * and every fastlb instance with the same config maps a key to the same backend. */
#ifndef FLB_HASH_H
#define FLB_HASH_H
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* splitmix64 finaliser: a bijective 64-bit mix with full avalanche */
static inline uint64_t flb_mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* 64-bit hash of len bytes at data, with seed; different seeds give independent hashes. */
static inline uint64_t flb_hash64(const void *data, size_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)data;
    uint64_t h = flb_mix64(seed ^ ((uint64_t)len * 0x9e3779b97f4a7c15ULL));
    while (len >= 8) {
        uint64_t k;
        memcpy(&k, p, 8);
        h = flb_mix64(h ^ k) + 0x9e3779b97f4a7c15ULL;
        p += 8; len -= 8;
    }
    uint64_t k = 0;
    memcpy(&k, p, len);
    return flb_mix64(h ^ k ^ ((uint64_t)len << 56));
}

/* Fixed seeds, one per use, so the hashes are independent of each other. They are part of the
 * wire contract: changing one reshuffles every table, so instances of different versions would
 * disagree about where a key goes. The values spell their use in ASCII. */
#define FLB_SEED_OFFSET 0x666c622d6f666673ULL /* "flb-offs": Maglev offset of a backend name */
#define FLB_SEED_SKIP   0x666c622d736b6970ULL /* "flb-skip": Maglev skip of a backend name */
#define FLB_SEED_RING   0x666c622d72696e67ULL /* "flb-ring": ring point "name#k" */
#define FLB_SEED_KEY    0x666c622d6b657973ULL /* "flb-keys": client key in the data plane */
#define FLB_SEED_SPLIT  0x666c622d73706c74ULL /* "flb-splt": client address -> side of a route's split */

#endif
