"""Tests of the ketama-style ring builder in fastlb._maglev: layout, point counts, weights, disruption."""

import array
import bisect
import hashlib
import mmap
import os
import subprocess
import sys

import pytest

from fastlb import _maglev as mg
from support.maglev_reference import NONE, SEED_KEY, SEED_RING, flb_hash64

SPACE = 1 << 32


def backends(n):
    return [f"10.1.{i // 256}.{i % 256}:6379" for i in range(n)]


def ring_reference(names, weights, vnodes):
    # The documented rule, written independently: heaviest gets vnodes points, others by rounding.
    top = max(weights, default=0)
    points = []
    for i, (name, w) in enumerate(zip(names, weights, strict=True)):
        count = max(1, (w * vnodes + top // 2) // top) if w else 0
        points += [(flb_hash64(f"{name}#{k}".encode(), SEED_RING) >> 32, i) for k in range(count)]
    return [x for point in sorted(points) for x in point]


def lookup_reference(ring, key):
    hashes = ring[0::2]
    j = bisect.bisect_left(hashes, flb_hash64(key, SEED_KEY) >> 32)
    return ring[2 * (j % len(hashes)) + 1]


def arc_shares(ring, n):
    # Exact keyspace share: point j owns the hashes in (hash[j-1], hash[j]], the first one wrapping.
    hashes, owners = ring[0::2], ring[1::2]
    shares = [0] * n
    for j in range(len(hashes)):
        shares[owners[j]] += (hashes[j] - hashes[j - 1]) % SPACE if len(hashes) > 1 else SPACE
    return [s / SPACE for s in shares]


@pytest.mark.parametrize(
    ("n", "weights", "vnodes"),
    [
        (1, [1], 1),
        (1, [1], 160),
        (3, [5, 3, 2], 100),
        (10, [1] * 10, 160),
        (10, [0, 1, 2, 3, 4, 0, 1, 2, 3, 1000], 50),  # tiny weights still get one point
        (4, [3, 2, 1, 3], 10),  # 6.67 and 3.33 points: rounding to nearest
        (100, [1] * 100, 40),
    ],
)
def test_equals_reference(n, weights, vnodes):
    names = backends(n)
    ring = mg.ring_build(names, weights, vnodes)
    assert isinstance(ring, array.array) and ring.typecode == "I"
    assert list(ring) == ring_reference(names, weights, vnodes)


def test_sorted_by_hash_then_index():
    ring = mg.ring_build(backends(200), [1] * 200, 160)
    pairs = list(zip(ring[0::2], ring[1::2], strict=True))
    assert pairs == sorted(pairs)


def test_point_counts():
    names = ["a", "b", "c", "d", "e"]
    weights = [5, 3, 2, 0, 1]
    ring = mg.ring_build(names, weights, 100)
    counts = [list(ring[1::2]).count(i) for i in range(5)]
    assert counts == [100, 60, 40, 0, 20]
    assert mg.ring_points(weights, 100) == 220 == len(ring) // 2
    assert mg.ring_points([1000, 1], 10) == 11  # rounds to 0, floored at 1
    assert mg.ring_points([3, 2], 10) == 17  # 2 * 10 / 3 = 6.67 rounds to 7, not down to 6


@pytest.mark.parametrize("weights", [[], [0], [0, 0]])
def test_no_live_backend_gives_empty_ring(weights):
    ring = mg.ring_build(backends(len(weights)), weights, 160)
    assert len(ring) == 0 and mg.ring_points(weights, 160) == 0
    assert mg.ring_lookup(ring, b"k") == NONE


def test_weights_share_of_keyspace():
    # Arc-share noise is about 1/sqrt(points), so enough points make 5% a several-sigma bound.
    shares = arc_shares(mg.ring_build(["a", "b", "c"], [5, 3, 2], 10000), 3)
    for share, expected in zip(shares, [0.5, 0.3, 0.2], strict=True):
        assert share == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("removed", [0, 7, 19])
def test_removing_one_of_20_moves_only_its_keys(removed):
    names = backends(20)
    rest = names[:removed] + names[removed + 1 :]
    old = mg.ring_build(names, [1] * 20, 160)
    new = mg.ring_build(rest, [1] * 19, 160)
    # The survivors' points are untouched, so the new ring is the old one without the removed points.
    old_named = [(h, names[i]) for h, i in zip(old[0::2], old[1::2], strict=True) if i != removed]
    assert old_named == [(h, rest[i]) for h, i in zip(new[0::2], new[1::2], strict=True)]
    moved = 0
    for k in range(20000):
        key = k.to_bytes(4, "little")
        before, after = names[mg.ring_lookup(old, key)], rest[mg.ring_lookup(new, key)]
        if before != after:
            assert before == names[removed]
            moved += 1
    assert moved / 20000 == pytest.approx(arc_shares(old, 20)[removed], abs=0.01)


def test_lookup_matches_reference_including_wrap():
    ring = mg.ring_build(["a", "b"], [1, 1], 1)
    top = ring[-2]
    wrapped = 0
    for k in range(3000):
        key = k.to_bytes(2, "little")
        assert mg.ring_lookup(ring, key) == lookup_reference(ring, key)
        wrapped += (flb_hash64(key, SEED_KEY) >> 32) > top
    assert wrapped  # some keys hash past the last point and must land on the first


def test_lookup_rejects_odd_length():
    with pytest.raises(ValueError):
        mg.ring_lookup(array.array("I", [1, 2, 3]), b"k")


def test_deterministic_within_and_across_processes():
    names = backends(50)
    ring = mg.ring_build(names, [1] * 50, 160)
    assert ring == mg.ring_build(names, [1] * 50, 160)
    code = (
        "import hashlib; from fastlb import _maglev as mg; "
        "names = [f'10.1.{i // 256}.{i % 256}:6379' for i in range(50)]; "
        "print(hashlib.sha256(mg.ring_build(names, [1] * 50, 160).tobytes()).hexdigest())"
    )
    src = os.path.dirname(os.path.dirname(os.path.abspath(mg.__file__)))
    env = dict(os.environ, PYTHONPATH=src, PYTHONHASHSEED="777")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(ring.tobytes()).hexdigest()


def test_build_into_shared_memory():
    names, weights = backends(10), [1 + i % 3 for i in range(10)]
    need = 2 * mg.ring_points(weights, 64)
    with mmap.mmap(-1, 4 * (need + 1)) as shm:
        view = memoryview(shm).cast("I")
        view[need] = 4242
        assert mg.ring_build_into(view, names, weights, 64, index_base=5) == need
        ring = mg.ring_build(names, weights, 64)
        assert view[0:need:2].tolist() == list(ring[0::2])
        assert view[1:need:2].tolist() == [i + 5 for i in ring[1::2]]
        assert view[need] == 4242
        view.release()


def test_build_into_too_small_is_rejected_untouched():
    out = array.array("I", [9]) * 19
    with pytest.raises(ValueError):
        mg.ring_build_into(out, ["a", "b"], [1, 1], 10)  # needs 40
    assert list(out) == [9] * 19
    assert mg.ring_build_into(array.array("I"), ["a"], [0], 10) == 0


@pytest.mark.parametrize(
    ("names", "weights", "vnodes", "exc"),
    [
        (["a"], [1], 0, ValueError),
        (["a"], [1], 2**25, ValueError),
        (["a", "b"], [1, 1], 2**23 + 1, ValueError),  # total over the 2**24 cap
        (["a", "a"], [1, 1], 10, ValueError),
        (["a"], [1, 2], 10, ValueError),
        (["a"], [-1], 10, ValueError),
        (["a"], [1], 1.5, TypeError),
    ],
)
def test_bad_input_rejected(names, weights, vnodes, exc):
    with pytest.raises(exc):
        mg.ring_build(names, weights, vnodes)
