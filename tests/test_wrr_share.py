"""Shares of (weighted) round robin, end to end: every connection reads which backend it reached.

Smooth weighted round robin (nginx's) with weights 5:3:2 repeats a period of 10 picks holding
exactly 5 a, 3 b and 2 c, spread out (a b c a a b a c b a, the README's example, checked
against fastlb's real picks below): never three of one in a row.
"""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from support.backends import server
from support.helpers import connect, recv_line

TOTAL = 10_000
THREADS = 4
WEIGHTS = {"a": 5, "b": 3, "c": 2}


def served_by(addr: tuple[str, int]) -> str:
    """One short connection: connect, read the backend's name, close."""
    with connect(addr, timeout=5) as s:
        return recv_line(s).decode()


def parallel_counts(addr: tuple[str, int], n: int, threads: int = THREADS) -> Counter:
    def batch(k: int) -> Counter:
        return Counter(served_by(addr) for _ in range(k))

    sizes = [n // threads + (1 if t < n % threads else 0) for t in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(batch, k) for k in sizes]
        return sum((f.result(timeout=120) for f in futures), Counter())


def assert_shares(counts: Counter, weights: dict[str, int], total: int) -> None:
    assert sum(counts.values()) == total, counts
    wsum = sum(weights.values())
    off = {name: counts[name] / total - w / wsum for name, w in weights.items()}
    assert all(abs(d) <= 0.02 for d in off.values()), (
        f"shares off by more than 2 points: counts {dict(counts)}, deviation {off}"
    )


def assert_smooth(seq: list[str], weights: dict[str, int]) -> None:
    period = sum(weights.values())
    for i in range(len(seq) - period + 1):
        window = Counter(seq[i : i + period])
        assert window == Counter(weights), f"picks {i}..{i + period - 1} are {dict(window)}: {''.join(seq)}"
    for i in range(len(seq) - 2):
        assert not seq[i] == seq[i + 1] == seq[i + 2], f"three {seq[i]} in a row at {i}: {''.join(seq)}"


@pytest.mark.parametrize("workers", [1, 2])
def test_weighted_round_robin_5_3_2(backends, fastlb, workers):
    b = backends(*(server(name, "id") for name in WEIGHTS))
    lb = fastlb([(name, b.address(name), w) for name, w in WEIGHTS.items()], workers=workers)
    counts: Counter = Counter()
    if workers == 1:
        # one client at a time: the worker sees the connections in this order
        seq = [served_by(lb.addr) for _ in range(120)]
        assert_smooth(seq[20:], WEIGHTS)  # after any start-up offset
        counts.update(seq)
    # with 2 workers each runs its own smooth WRR over the connections SO_REUSEPORT gives it
    counts += parallel_counts(lb.addr, TOTAL - sum(counts.values()))
    assert_shares(counts, WEIGHTS, TOTAL)
    assert Counter(b.accepted()) == counts, "the backends counted other connections than the clients"


def test_round_robin_equal_shares(backends, fastlb):
    names = ["a", "b", "c"]
    b = backends(*(server(name, "id") for name in names))
    lb = fastlb([(name, b.address(name), None) for name in names], workers=1, algorithm="round_robin")
    seq = [served_by(lb.addr) for _ in range(30)]
    for i in range(len(seq) - 2):
        assert sorted(seq[i : i + 3]) == names, f"not a rotation at {i}: {''.join(seq)}"
    counts = Counter(seq) + parallel_counts(lb.addr, 6000 - len(seq))
    assert_shares(counts, dict.fromkeys(names, 1), 6000)
    assert Counter(b.accepted()) == counts


ROOT = Path(__file__).resolve().parents[1]


def readme_wrr_example() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^\| `weighted_round_robin` \| smooth WRR, as nginx \(5:3:2 -> ([a-c ]+)\)", readme, re.M)
    assert m, "README's algorithm table has no 5:3:2 example"
    return m.group(1).split()


def test_the_pickers_comment_gives_the_readmes_sequence():
    source = (ROOT / "src/fastlb/core/lb.pxi").read_text()
    m = re.search(r"5:3:2 gives ([a-c ]+?) -", source)
    assert m, "pick_smooth_wrr's comment has no 5:3:2 example"
    assert m.group(1).split() == readme_wrr_example()


def test_readme_smooth_wrr_example_is_fastlbs_real_sequence(backends, fastlb):
    documented = readme_wrr_example()
    assert documented == "a b c a a b a c b a".split()  # nginx's ngx_http_upstream_get_peer for 5:3:2
    b = backends(*(server(name, "id") for name in WEIGHTS))
    lb = fastlb([(name, b.address(name), w) for name, w in WEIGHTS.items()], workers=1)
    # one client at a time, from a fresh start: the worker's first picks, in order, twice round
    seq = [served_by(lb.addr) for _ in range(20)]
    assert seq == documented * 2, "".join(seq)
