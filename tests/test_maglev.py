"""Tests of the Maglev table builder fastlb._maglev against the pure-Python reference and its quality goals."""

import array
import hashlib
import mmap
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from fastlb import _maglev as mg
from support.maglev_reference import (
    NONE,
    SEED_KEY,
    SEED_OFFSET,
    SEED_RING,
    SEED_SKIP,
    flb_hash64,
    maglev_reference,
)

M = 65537


def backends(n, prefix="10.0"):
    return [f"{prefix}.{i // 256}.{i % 256}:8080" for i in range(n)]


def owners(table, names):
    # Slot -> name, so tables built from differently ordered or shorter lists compare.
    return [None if e == NONE else names[e] for e in table]


# --- the hash and seeds the data plane shares ------------------------------------------------


def test_seeds_match_reference():
    assert (mg.SEED_OFFSET, mg.SEED_SKIP, mg.SEED_RING, mg.SEED_KEY) == (
        SEED_OFFSET,
        SEED_SKIP,
        SEED_RING,
        SEED_KEY,
    )
    assert len({SEED_OFFSET, SEED_SKIP, SEED_RING, SEED_KEY}) == 4


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 15, 16, 17, 64])
def test_key_hash_matches_reference(length):
    key = bytes((i * 37 + 11) & 0xFF for i in range(length))
    assert mg.key_hash(key) == flb_hash64(key, SEED_KEY)


def test_golden_values():
    # Pinned outputs: if these change, a new fastlb disagrees with running ones about every key.
    assert mg.key_hash(b"") == flb_hash64(b"", SEED_KEY) == 0x32CBB11DEBDCBFD9
    assert list(mg.maglev_build(["a", "b", "c"], [1, 1, 1], 7)) == [1, 0, 2, 1, 0, 2, 0]


def test_key_hash_rejects_non_bytes():
    with pytest.raises(TypeError):
        mg.key_hash("10.0.0.1")


# --- equal to the reference ------------------------------------------------------------------

CASES = [
    (1, None, 7),
    (1, None, M),
    (2, None, M),
    (3, None, M),
    (10, None, M),
    (100, None, M),
    (3, [5, 3, 2], M),
    (10, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], M),
    (10, [4, 0, 4, 1, 0, 9, 9, 2, 1, 3], 1009),
    (5, [1000, 1, 1, 1, 1], 4099),  # skewed: most backends sit most rounds out
    (7, [1, 1, 1, 1, 1, 1, 1], 7),  # M == N: every backend exactly one slot
    (20, [3] * 20, 211),
]


@pytest.mark.parametrize(("n", "weights", "m"), CASES)
def test_equals_reference(n, weights, m):
    names = backends(n)
    weights = weights or [1] * n
    table = mg.maglev_build(names, weights, m)
    assert isinstance(table, array.array) and table.typecode == "I" and len(table) == m
    assert list(table) == maglev_reference(names, weights, m)


def test_equals_reference_unicode_and_long_names():
    names = ["é", "backend-with-a-name-longer-than-eight-bytes", "日本:443", "", "x" * 300]
    weights = [1, 2, 3, 1, 2]
    assert list(mg.maglev_build(names, weights, 1021)) == maglev_reference(names, weights, 1021)


@pytest.mark.parametrize("weights", [[], [0], [0, 0, 0]])
def test_no_live_backend_gives_all_none(weights):
    table = mg.maglev_build(backends(len(weights)), weights, 13)
    assert list(table) == [NONE] * 13


def test_zero_weight_backend_gets_no_entries():
    names = backends(4)
    table = mg.maglev_build(names, [1, 0, 1, 1], 101)
    assert 1 not in table and NONE not in table


def test_scaling_weights_builds_the_same_table():
    names = backends(6)
    assert mg.maglev_build(names, [1, 2, 3, 4, 5, 6], 1009) == mg.maglev_build(
        names, [7, 14, 21, 28, 35, 42], 1009
    )


def test_weight_extremes_match_reference():
    names = backends(3)
    weights = [2**32 - 1, 1, 2**31]
    assert list(mg.maglev_build(names, weights, 1009)) == maglev_reference(names, weights, 1009)


# --- rejected input --------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0, 1, 4, 9, 15, 65536, 65535, 2**32 + 15, -7])
def test_non_prime_table_size_rejected(m):
    with pytest.raises(ValueError):
        mg.maglev_build(backends(1), [1], m)


def test_table_smaller_than_backends_rejected():
    with pytest.raises(ValueError):
        mg.maglev_build(backends(8), [1] * 8, 7)


@pytest.mark.parametrize(
    ("names", "weights", "exc"),
    [
        (["a", "b"], [1], ValueError),
        (["a", "a"], [1, 1], ValueError),
        (["a"], [-1], ValueError),
        (["a"], [2**32], ValueError),
        (["a"], [1.0], TypeError),
        ([b"a"], [1], TypeError),
    ],
)
def test_bad_backends_rejected(names, weights, exc):
    with pytest.raises(exc):
        mg.maglev_build(names, weights, 7)


# --- building into shared memory --------------------------------------------------------------


def test_build_into_shared_memory_with_index_base():
    names = backends(10)
    with mmap.mmap(-1, 4 * (M + 3)) as shm:
        view = memoryview(shm).cast("I")
        view[M] = 12345  # beyond the table: must stay untouched
        mg.maglev_build_into(view[:M], names, [1] * 10, M, index_base=1)
        expected = [e + 1 for e in mg.maglev_build(names, [1] * 10, M)]
        assert view[:M].tolist() == expected
        assert view[M] == 12345
        view.release()


def test_build_into_validates_before_writing():
    out = array.array("I", [7]) * 11
    with pytest.raises(ValueError):
        mg.maglev_build_into(out, backends(2), [1, 1], 13)  # too small
    with pytest.raises(ValueError):
        mg.maglev_build_into(out, backends(2), [1, 1], 12)  # not prime
    with pytest.raises(ValueError):
        mg.maglev_build_into(out, backends(2), [1, 1], 11, index_base=NONE - 1)  # index 1 + base == NONE
    assert list(out) == [7] * 11
    mg.maglev_build_into(out, backends(2), [1, 1], 11, index_base=NONE - 2)
    assert set(out) == {NONE - 2, NONE - 1}


def test_build_into_rejects_wrong_buffers():
    with pytest.raises((ValueError, TypeError)):
        mg.maglev_build_into(array.array("H", [0] * 13), ["a"], [1], 13)
    with pytest.raises((ValueError, TypeError, BufferError)):
        mg.maglev_build_into(bytes(4 * 13), ["a"], [1], 13)  # read-only


# --- determinism and placement by name --------------------------------------------------------


def test_deterministic_within_process():
    names = backends(100)
    assert mg.maglev_build(names, [1] * 100, M) == mg.maglev_build(names, [1] * 100, M)


def test_deterministic_across_processes():
    names = backends(100)
    weights = [1 + i % 5 for i in range(100)]
    here = hashlib.sha256(mg.maglev_build(names, weights, M).tobytes()).hexdigest()
    code = (
        "import hashlib, sys; from fastlb import _maglev as mg; "
        f"names = [f'10.0.{{i // 256}}.{{i % 256}}:8080' for i in range(100)]; "
        f"print(hashlib.sha256(mg.maglev_build(names, {weights!r}, {M}).tobytes()).hexdigest())"
    )
    src = os.path.dirname(os.path.dirname(os.path.abspath(mg.__file__)))
    env = dict(os.environ, PYTHONPATH=src, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_reordering_input_changes_only_indices():
    names = backends(50)
    weights = [1 + i % 3 for i in range(50)]
    order = list(range(50))
    random.Random(7).shuffle(order)
    shuffled = [names[i] for i in order]
    table = mg.maglev_build(names, weights, M)
    table2 = mg.maglev_build(shuffled, [weights[i] for i in order], M)
    assert table != table2
    assert owners(table, names) == owners(table2, shuffled)


# --- quality ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_balance_equal_weights(n):
    counts = Counter(mg.maglev_build(backends(n), [1] * n, M))
    assert len(counts) == n and NONE not in counts
    assert max(counts.values()) / (M / n) <= 1.02
    # Equal weights: Pseudocode 1 hands out slots strictly in turn, so shares differ by at most one.
    assert max(counts.values()) - min(counts.values()) <= 1


def test_weights_5_3_2_within_one_percent():
    counts = Counter(mg.maglev_build(["a", "b", "c"], [5, 3, 2], M))
    for index, share in enumerate([0.5, 0.3, 0.2]):
        assert counts[index] / M == pytest.approx(share, rel=0.01)


def test_weights_proportional_many_backends():
    n = 100
    weights = [1 + i % 4 for i in range(n)]
    counts = Counter(mg.maglev_build(backends(n), weights, M))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert counts[i] / M == pytest.approx(w / total, rel=0.05)


@pytest.mark.parametrize("removed", [0, 37, 99])
def test_disruption_removing_one_of_100(removed):
    n = 100
    names = backends(n)
    rest = names[:removed] + names[removed + 1 :]
    old = owners(mg.maglev_build(names, [1] * n, M), names)
    new = owners(mg.maglev_build(rest, [1] * (n - 1), M), rest)
    moved = sum(a != b for a, b in zip(old, new, strict=True)) / M
    assert 1 / n <= moved <= 2 / n
    # Every slot of the removed backend moves, necessarily; the rest is Maglev's extra churn.
    assert all(b != names[removed] for b in new)
    kept = [i for i, a in enumerate(old) if a != names[removed]]
    churn = sum(old[i] != new[i] for i in kept) / len(kept)
    assert churn < 1 / n


def test_disruption_when_removing_last_index_is_table_diff():
    # Removing the last name keeps every other index, so table_diff measures the move directly.
    names = backends(100)
    old = mg.maglev_build(names, [1] * 100, M)
    new = mg.maglev_build(names[:-1], [1] * 99, M)
    assert 0.01 <= mg.table_diff(old, new) <= 0.02


def test_adding_back_restores_the_table():
    names = backends(30)
    first = mg.maglev_build(names, [1] * 30, M)
    mg.maglev_build(names[:-1], [1] * 29, M)
    assert mg.maglev_build(names, [1] * 30, M) == first


# --- lookup and diff -------------------------------------------------------------------------


def test_lookup_is_table_at_key_hash():
    table = mg.maglev_build(backends(10), [1] * 10, M)
    for i in range(200):
        key = f"192.168.{i}.1".encode()
        assert mg.maglev_lookup(table, key) == table[flb_hash64(key, SEED_KEY) % M]


def test_lookup_spreads_keys_by_share():
    table = mg.maglev_build(["a", "b", "c"], [5, 3, 2], M)
    hits = Counter(mg.maglev_lookup(table, i.to_bytes(4, "big")) for i in range(30000))
    assert hits[0] / 30000 == pytest.approx(0.5, abs=0.02)
    assert hits[2] / 30000 == pytest.approx(0.2, abs=0.02)


def test_lookup_empty_table_is_none():
    assert mg.maglev_lookup(array.array("I"), b"k") == NONE


def test_table_diff():
    a = array.array("I", [1, 2, 3, 4])
    assert mg.table_diff(a, a) == 0.0
    assert mg.table_diff(a, array.array("I", [1, 9, 3, 9])) == 0.5
    assert mg.table_diff(array.array("I"), array.array("I")) == 0.0
    with pytest.raises(ValueError):
        mg.table_diff(a, array.array("I", [1]))
