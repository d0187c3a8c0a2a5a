"""Pure-Python reference for fastlb._maglev: flb_hash64 and Maglev Pseudocode 1, weighted like Envoy."""

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
NONE = 0xFFFFFFFF
# Copied from flb_hash.h on purpose: a test compares them, so a changed seed cannot go unnoticed.
SEED_OFFSET, SEED_SKIP = 0x666C622D6F666673, 0x666C622D736B6970  # "flb-offs", "flb-skip"
SEED_RING, SEED_KEY = 0x666C622D72696E67, 0x666C622D6B657973  # "flb-ring", "flb-keys"


def mix64(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def flb_hash64(data, seed):
    # 8-byte words are read with memcpy in C, i.e. little-endian on the hosts fastlb runs on.
    h, tail = mix64(seed ^ (len(data) * GOLDEN & M64)), len(data) % 8
    for i in range(0, len(data) - tail, 8):
        h = (mix64(h ^ int.from_bytes(data[i : i + 8], "little")) + GOLDEN) & M64
    return mix64(h ^ int.from_bytes(data[len(data) - tail :], "little") ^ (tail << 56))


def maglev_reference(names, weights, m):
    """Pseudocode 1 with turns in name order; a backend skips round r while r * w < taken * max(w)."""
    table = [NONE] * m
    live = sorted((name.encode(), i, w) for i, (name, w) in enumerate(zip(names, weights, strict=True)) if w)
    top = max((w for _, _, w in live), default=0)
    state = [
        [flb_hash64(b, SEED_OFFSET) % m, flb_hash64(b, SEED_SKIP) % (m - 1) + 1, 0, 0] for b, _, _ in live
    ]
    filled, rnd = 0, 0
    while filled < m and live:
        rnd += 1
        for (_, index, w), st in zip(live, state, strict=True):  # st: offset, skip, next, taken * top
            if filled == m or rnd * w < st[3]:
                continue
            st[3] += top
            c = (st[0] + st[1] * st[2]) % m
            while table[c] != NONE:
                st[2] += 1
                c = (st[0] + st[1] * st[2]) % m
            table[c], st[2], filled = index, st[2] + 1, filled + 1
    return table
