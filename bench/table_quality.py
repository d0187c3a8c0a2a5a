"""Quality and build time of fastlb's Maglev and ring tables; prints Markdown (run: .venv/bin/python bench/table_quality.py)."""

import bisect
import os
import platform
import statistics
import sys
import time
from collections import Counter
from importlib import metadata

from fastlb import _maglev as mg

M = 65537
VNODES = 160
SIZES = (10, 100, 1000)
ROUNDS = 5  # builds timed per cell; the median is reported
REMOVALS = 10  # backends removed one at a time (evenly spread); moved fractions are averaged
SPACE = 1 << 32


def backends(n):
    return [f"10.0.{i // 256}.{i % 256}:8080" for i in range(n)]


def median_ms(fn, *args):
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def removed_positions(n):
    return sorted({round(k * (n - 1) / max(1, REMOVALS - 1)) for k in range(min(n, REMOVALS))})


def maglev_row(n):
    names = backends(n)
    ms = median_ms(mg.maglev_build, names, [1] * n, M)
    table = mg.maglev_build(names, [1] * n, M)
    balance = max(Counter(table).values()) / (M / n)
    old = [names[e] for e in table]
    moved = []
    for r in removed_positions(n):
        rest = names[:r] + names[r + 1 :]
        new = [rest[e] for e in mg.maglev_build(rest, [1] * (n - 1), M)]
        # Keys hash uniformly onto slots, so the changed-slot fraction is the moved-key fraction.
        moved.append(sum(a != b for a, b in zip(old, new, strict=True)) / M)
    return ms, balance, statistics.mean(moved)


def ring_owner(hashes, owners, h):
    j = bisect.bisect_left(hashes, h)
    return owners[j % len(hashes)]


def ring_moved(old, old_names, new, new_names):
    # Exact: between consecutive points of either ring both owners are constant, and each
    # interval (a, b] belongs in each ring to the first point at or after b.
    oh, oo = list(old[0::2]), [old_names[i] for i in old[1::2]]
    nh, no = list(new[0::2]), [new_names[i] for i in new[1::2]]
    cuts = sorted(set(oh) | set(nh))
    moved = 0
    for j, b in enumerate(cuts):
        width = (b - cuts[j - 1]) % SPACE or SPACE
        if ring_owner(oh, oo, b) != ring_owner(nh, no, b):
            moved += width
    return moved / SPACE


def ring_row(n):
    names = backends(n)
    ms = median_ms(mg.ring_build, names, [1] * n, VNODES)
    ring = mg.ring_build(names, [1] * n, VNODES)
    hashes, owners = ring[0::2], ring[1::2]
    share = Counter()
    for j in range(len(hashes)):
        share[owners[j]] += (hashes[j] - hashes[j - 1]) % SPACE
    balance = max(share.values()) / (SPACE / n)
    moved = []
    for r in removed_positions(n):
        rest = names[:r] + names[r + 1 :]
        moved.append(ring_moved(ring, names, mg.ring_build(rest, [1] * (n - 1), VNODES), rest))
    return ms, balance, statistics.mean(moved)


def weighted_shares():
    names, weights = ["a", "b", "c"], [5, 3, 2]
    table = Counter(mg.maglev_build(names, weights, M))
    ring = mg.ring_build(names, weights, VNODES)
    arcs = Counter()
    for j in range(len(ring) // 2):
        arcs[ring[2 * j + 1]] += (ring[2 * j] - ring[2 * j - 2]) % SPACE
    return [table[i] / M for i in range(3)], [arcs[i] / SPACE for i in range(3)]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cython_version() -> str:
    """Cython's version if this interpreter has it (a venv from `scripts/venv` built fastlb in an
    isolated build environment and does not)."""
    try:
        return f"Cython {metadata.version('Cython')}"
    except metadata.PackageNotFoundError:
        return "Cython not in this environment"


def main():
    print("## fastlb consistent-hash tables: quality and build time\n")
    print(
        f"{cpu_model()}, {os.cpu_count()} CPUs (shared), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {cython_version()}. "
        f"Equal weights; Maglev M={M}; ring {VNODES} points per backend. Build time: median of {ROUNDS} "
        f"builds from Python. Moved: mean over {REMOVALS} removals of one backend (every backend when N <= {REMOVALS}), "
        "Maglev exactly by slots, ring exactly by arc length.\n"
    )
    print("| algorithm | N | build ms | max/mean | keys moved | optimal 1/N | extra over 1/N |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in (("maglev", maglev_row), ("ring_hash", ring_row)):
        for n in SIZES:
            ms, balance, moved = row(n)
            print(
                f"| {name} | {n} | {ms:.2f} | {balance:.3f} | {moved:.2%} | {1 / n:.2%} | "
                f"{moved - 1 / n:+.2%} ({moved * n:.2f}x) |"
            )
    maglev, ring = weighted_shares()
    print("\nWeights 5:3:2 (ideal 50% / 30% / 20%):\n")
    print("| algorithm | shares |")
    print("|---|---|")
    print(f"| maglev M={M} | {' / '.join(f'{s:.2%}' for s in maglev)} |")
    print(f"| ring_hash {VNODES} points for the heaviest | {' / '.join(f'{s:.2%}' for s in ring)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
