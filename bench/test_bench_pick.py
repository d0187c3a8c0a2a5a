"""Cost of one backend pick (lb_pick in core/lb.pxi) per algorithm, over a pool of 1,000 backends.

The region is built as `fastlb serve` builds it (Supervisor._build_region: a pool with spare backend
slots, the backends written with set_backend, the Maglev/ring table published with
fastlb.runtime.tables.publish_table, then the generation bumped).  fastlb._core.pick_benchmark() then calls
lb_pick() in a C loop from a private worker state over that region and returns ns per pick, timed in
C with CLOCK_MONOTONIC: no Python per pick.  Each pick hashes a new key (as a new connection would),
every backend is up, ready and idle (no active connections, no connect-time history).

    pytest bench/test_bench_pick.py --benchmark-json pick.json   # ns/pick is in each entry's extra_info
    .venv/bin/python bench/test_bench_pick.py                               # a Markdown table

Not part of the test run (tests/ is the test path).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from fastlb import _core, _shm
from fastlb._version import __version__
from fastlb.config import ALGORITHMS
from fastlb.runtime.tables import publish_table, table_capacity

N_BACKENDS = 1000
SPARE_SLOTS_MIN = 8  # as fastlb.runtime.supervisor
MAGLEV_TABLE_SIZE = 65537  # config defaults
RING_VNODES = 160
TARGET_NS = 50_000_000  # each measurement: enough picks for ~50 ms
ROUNDS = 7


def _sockaddr(port: int) -> bytes:
    """struct sockaddr_in for 127.0.0.1:port (fastlb.shm.sockaddr_bytes without a config Address)."""
    return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), socket.inet_aton("127.0.0.1"))


def weights(n: int) -> list[int]:
    """Weights 1..10, mixed, so that the weighted algorithms do their real work."""
    return [1 + (i * 7) % 10 for i in range(n)]


@contextmanager
def pool_region(algorithm: str, n: int = N_BACKENDS) -> Iterator[_shm.Region]:
    """A region with one listener, one pool of n backends (+ spare slots) and one worker, as
    Supervisor._build_region and BackendManager._write_pool make it."""
    n_slots = n + max(SPARE_SLOTS_MIN, n)
    cap = table_capacity(algorithm, n_slots, MAGLEV_TABLE_SIZE, RING_VNODES)
    region = _shm.Region(1, 1, n_slots, 1, [cap])
    try:
        region.set_pool(0, "bench", algorithm, "source_ip_port", 2, 0, n_slots, "reject")
        names, ws = [], []
        for i, w in enumerate(weights(n)):
            name = f"b{i:04d}"
            region.set_backend(i, 0, name, _sockaddr(10000 + i), w)
            names.append(name)
            ws.append(w)
        for i in range(n, n_slots):  # free slots take part in the table by name, with weight 0
            names.append(f"\x00free-{i}")
            ws.append(0)
        region.set_listener(0, "bench", 0, 1000, 60000, 0, _sockaddr(9999))
        if algorithm in ("maglev", "ring_hash"):
            publish_table(region, 0, algorithm, 0, names, ws, MAGLEV_TABLE_SIZE, RING_VNODES)
        region.publish()
        yield region
    finally:
        region.close()


def iterations_for(region: _shm.Region) -> int:
    """Picks per measurement: about TARGET_NS worth, from a short calibration run."""
    n = 1000
    while True:
        ns = _core.pick_benchmark(region.address, 0, n)
        assert ns >= 0, "pick_benchmark failed (out of memory?)"
        if ns * n >= TARGET_NS / 10 or n >= 10_000_000:
            return max(1000, int(TARGET_NS / max(ns, 0.1)))
        n *= 10


def measure(algorithm: str, rounds: int = ROUNDS) -> tuple[float, list[float], int]:
    """(median ns/pick, every round's ns/pick, picks per round) for `algorithm`."""
    with pool_region(algorithm) as region:
        iters = iterations_for(region)
        samples = [_core.pick_benchmark(region.address, 0, iters) for _ in range(rounds)]
    return statistics.median(samples), samples, iters


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pick_1000_backends(benchmark, algorithm):
    with pool_region(algorithm) as region:
        iters = iterations_for(region)
        samples: list[float] = []

        def run():
            ns = _core.pick_benchmark(region.address, 0, iters)
            samples.append(ns)
            return ns

        ns = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
        assert ns > 0
        # pytest-benchmark times the whole call (iters picks); the C-measured cost of one pick:
        benchmark.extra_info.update(
            {
                "algorithm": algorithm,
                "backends": N_BACKENDS,
                "picks_per_round": iters,
                "ns_per_pick_median": statistics.median(samples),
                "ns_per_pick_rounds": samples,
            }
        )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> int:
    print(f"## fastlb: cost of one pick, {N_BACKENDS} backends (weights 1..10)\n")
    print(
        f"fastlb {__version__}, {cpu_model()}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}. lb_pick() called in a C loop by fastlb._core.pick_benchmark "
        f"(CLOCK_MONOTONIC around the loop, a new key hash per pick, every backend up and idle); "
        f"median of {ROUNDS} rounds of ~{TARGET_NS // 1_000_000} ms each. Maglev M={MAGLEV_TABLE_SIZE}, "
        f"ring {RING_VNODES} points for the heaviest backend.\n"
    )
    print("| algorithm | ns/pick (median) | min | max | picks per round |")
    print("|---|---:|---:|---:|---:|")
    for algorithm in ALGORITHMS:
        median, samples, iters = measure(algorithm)
        print(f"| {algorithm} | {median:.1f} | {min(samples):.1f} | {max(samples):.1f} | {iters:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
