"""OutlierTracker: Envoy-style consecutive-failure ejection, driven with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fastlb.runtime.health import OutlierTracker


@dataclass(frozen=True)
class OC:
    """Stand-in for fastlb.config.OutlierConfig (same fields)."""

    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 50


def test_ejects_after_n_consecutive_failures() -> None:
    tr = OutlierTracker(OC(consecutive_failures=3), pool_size=4)
    assert [tr.observe("a", n, now=float(n)) for n in range(3)] == [False, False, False]
    assert not tr.is_ejected("a")
    assert tr.observe("a", 3, now=3.0) is True
    assert tr.is_ejected("a") and tr.ejected() == ["a"]
    assert tr.ejected_until("a") == 33.0
    # Only the call that ejects returns True.
    assert tr.observe("a", 4, now=4.0) is False and tr.is_ejected("a")
    assert not tr.is_ejected("unknown")


def test_expiry_and_growing_ejection_time() -> None:
    tr = OutlierTracker(OC(consecutive_failures=2, base_ejection_time=10.0), pool_size=2)
    assert tr.observe("a", 2, now=0.0)
    assert tr.expire(9.9) == [] and tr.is_ejected("a")
    assert tr.expire(10.0) == ["a"] and not tr.is_ejected("a")
    assert tr.expire(10.0) == []
    # The workers' counter still says 2: those failures were already punished.
    assert tr.observe("a", 2, now=10.5) is False
    # Two new failures on top of the stale counter: second ejection, twice as long.
    assert tr.observe("a", 3, now=11.0) is False
    assert tr.observe("a", 4, now=12.0) is True
    assert tr.ejection_count("a") == 2 and tr.ejected_until("a") == 32.0
    assert tr.expire(31.0) == [] and tr.expire(32.0) == ["a"]
    # A success resets the workers' counter (goes below the remembered value).
    assert tr.observe("a", 0, now=32.5) is False
    assert tr.observe("a", 1, now=33.0) is False
    assert tr.observe("a", 2, now=33.5) is True
    assert tr.ejection_count("a") == 3 and tr.ejected_until("a") == 33.5 + 30.0


def test_ejection_time_is_capped() -> None:
    tr = OutlierTracker(
        OC(consecutive_failures=1, base_ejection_time=100.0), pool_size=1, max_ejection_time=250.0
    )
    now, n = 0.0, 0
    lengths = []
    for _ in range(4):
        n += 1
        assert tr.observe("a", n, now)
        until = tr.ejected_until("a")
        assert until is not None
        lengths.append(until - now)
        now = until
        assert tr.expire(now) == ["a"]
    assert lengths == [100.0, 200.0, 250.0, 250.0]


def test_multiplier_decays_while_healthy() -> None:
    tr = OutlierTracker(OC(consecutive_failures=1, base_ejection_time=10.0), pool_size=1)
    assert tr.observe("a", 1, 0.0) and tr.expire(10.0) == ["a"]
    assert tr.observe("a", 2, 10.0) and tr.expire(30.0) == ["a"]
    assert tr.ejection_count("a") == 2
    assert tr.observe("a", 0, 35.0) is False and tr.ejection_count("a") == 2  # 5 s healthy
    assert tr.observe("a", 0, 40.0) is False and tr.ejection_count("a") == 1  # 10 s healthy
    assert tr.observe("a", 0, 60.0) is False and tr.ejection_count("a") == 0
    assert tr.observe("a", 1, 61.0) is True and tr.ejected_until("a") == 71.0  # back to the base


def test_max_ejection_percent_pool_of_3_at_50() -> None:
    tr = OutlierTracker(
        OC(consecutive_failures=1, base_ejection_time=10.0, max_ejection_percent=50), pool_size=3
    )
    assert tr.observe("a", 1, 0.0) is True
    assert tr.observe("b", 1, 0.0) is False  # 2/3 = 67% > 50%
    assert tr.observe("c", 5, 1.0) is False
    assert tr.ejected() == ["a"]
    # When a's ejection ends there is room again; b is still failing and goes next.
    assert tr.expire(10.0) == ["a"]
    assert tr.observe("b", 1, 10.0) is True
    assert tr.ejected() == ["b"]


@pytest.mark.parametrize(
    ("pool_size", "pct", "max_ejected"),
    [(3, 50, 1), (4, 50, 2), (10, 10, 1), (3, 10, 1), (5, 100, 5), (2, 0, 0), (7, 34, 2)],
)
def test_max_ejection_percent(pool_size: int, pct: int, max_ejected: int) -> None:
    tr = OutlierTracker(OC(consecutive_failures=1, max_ejection_percent=pct), pool_size=pool_size)
    ejected = sum(tr.observe(f"b{i}", 1, 0.0) for i in range(pool_size))
    assert ejected == max_ejected == len(tr.ejected())


def test_disabled() -> None:
    tr = OutlierTracker(OC(consecutive_failures=0), pool_size=3)
    assert not tr.enabled
    assert tr.observe("a", 1000, 0.0) is False and tr.ejected() == []


def test_set_pool_size_forgets_removed_backends() -> None:
    tr = OutlierTracker(OC(consecutive_failures=1, max_ejection_percent=50), pool_size=4)
    assert tr.observe("a", 1, 0.0) and tr.observe("b", 1, 0.0)
    assert not tr.observe("c", 1, 0.0)
    tr.set_pool_size(2, backends=["b", "c"])
    assert tr.ejected() == ["b"] and not tr.is_ejected("a")
    assert not tr.observe("c", 1, 1.0)  # 2/2 = 100% > 50%


def test_real_config_type_is_accepted() -> None:
    config = pytest.importorskip("fastlb.config")
    tr = OutlierTracker(config.OutlierConfig(consecutive_failures=2), pool_size=2)
    assert tr.observe("a", 2, 0.0)
