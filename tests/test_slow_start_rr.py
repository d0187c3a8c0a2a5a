"""slow_start with round_robin (issue 21, item 8): a backend coming back into service ramps its share
of new connections as the weighted algorithms do, instead of getting its full share at once."""

from __future__ import annotations

from fastlb.control import ControlClient
from support.backends import server
from support.clients import backends_of, count_backends, wait_published


def test_round_robin_ramps_a_returning_backend(fastlb, backends):
    """a, b, c equal under round_robin, slow_start 60s.  c disabled and enabled again: its effective
    weight starts at 5% of its weight, so of 300 connections it takes about 300 x 0.05 / 2.05 (~7),
    far below the third it gets without the ramp (what it got before this fix)."""
    b = backends(server("a", "id"), server("b", "id"), server("c", "id"))
    lb = fastlb(
        [(n, b.address(n), 10) for n in "abc"],
        algorithm="round_robin",
        pool={"slow_start": "60s"},
    )
    ctl = ControlClient(str(lb.dir / "control.sock"))
    counts = count_backends(lb.addr, 300, concurrency=8, timeout=30)
    assert counts == {"a": 100, "b": 100, "c": 100}, counts  # no ramp: exact round robin
    ctl.disable("web", "c")
    ctl.enable("web", "c")
    wait_published(ctl)
    eff = backends_of(ctl.status())["c"]["effective_weight"]
    assert 1 <= eff <= 3, eff  # the ramp has begun (5% of 10, rounded, after a few ticks)
    counts = count_backends(lb.addr, 300, concurrency=8, timeout=30)
    assert sum(counts.values()) == 300
    assert 0 < counts["c"] <= 30, counts
    assert abs(counts["a"] - counts["b"]) <= 2, counts
