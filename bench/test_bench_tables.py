"""pytest-benchmark timings of the table builders and lookups in fastlb._maglev (run: pytest bench/)."""

import pytest

from fastlb import _maglev as mg

M = 65537
VNODES = 160  # ketama's classic 160 points per server
BUDGET_S = 0.020  # requirement: a 1,000-backend Maglev build in under 20 ms (median)


def backends(n):
    return [f"10.0.{i // 256}.{i % 256}:8080" for i in range(n)]


NAMES = backends(1000)
KEYS = [f"192.168.{i // 256}.{i % 256}".encode() for i in range(1000)]


def test_maglev_build_65537_1000(benchmark):
    table = benchmark(mg.maglev_build, NAMES, [1] * 1000, M)
    assert len(table) == M
    assert benchmark.stats.stats.median < BUDGET_S


def test_maglev_build_65537_1000_skewed_weights(benchmark):
    # One heavy backend makes the others sit most rounds out: the worst case for a round-scan fill.
    weights = [1000] + [1] * 999
    table = benchmark(mg.maglev_build, NAMES, weights, M)
    assert len(table) == M
    assert benchmark.stats.stats.median < BUDGET_S


def test_maglev_build_into_65537_1000(benchmark):
    out = memoryview(bytearray(4 * M)).cast("I")
    benchmark(mg.maglev_build_into, out, NAMES, [1] * 1000, M)


def test_ring_build_1000(benchmark):
    ring = benchmark(mg.ring_build, NAMES, [1] * 1000, VNODES)
    assert len(ring) == 2 * 1000 * VNODES


@pytest.fixture(scope="module")
def tables():
    return mg.maglev_build(NAMES, [1] * 1000, M), mg.ring_build(NAMES, [1] * 1000, VNODES)


def _lookups(fn, table):
    for key in KEYS:
        fn(table, key)


def test_maglev_lookup_1000_keys(benchmark, tables):
    # From Python, so this is mostly call overhead; the data plane does the same in C.
    benchmark(_lookups, mg.maglev_lookup, tables[0])


def test_ring_lookup_1000_keys(benchmark, tables):
    benchmark(_lookups, mg.ring_lookup, tables[1])


def test_key_hash_1000_keys(benchmark):
    benchmark(lambda: [mg.key_hash(key) for key in KEYS])
