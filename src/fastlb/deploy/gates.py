"""A rollout's gates: what the data plane measured for the canary pool (against the stable pool, over
the same window), judged against thresholds.  Pure functions over counter snapshots; the external
`--check` command is run by fastlb.deploy.engine and handed in as a CheckOutcome.

Figures per window (INTERFACES.md section 4; deltas of the sums over a pool's backend slots):
  failure_rate     (connect_errors + connect_timeouts) / attempts       refused, timed out
  early_reset_rate (resets + early_closes) / attempts, at most 1        reset or closed before any byte
  reset_rate       late_resets / total, at most 1                       reset after the backend's first
                   byte (a canary that greets, then crashes: issue 24)
  unhealthy        share of the canary's backends down or ejected, at judgement time
  connect_time     connect_time_sum_us / total (seconds)                average connect time

A judgement is "fail" when a gate's canary figure is above its threshold AND worse than the stable
pool's figure over the same window (when the stable pool is as bad, the canary is not the cause:
the judgement is "inconclusive" and holds); "inconclusive" when the canary had fewer than
min_connections connect attempts in the window (the traffic gates cannot tell); the health gate and
the --check gate need no traffic and can fail an idle canary.  Otherwise "pass".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

COUNTERS = (
    "attempts",
    "total",
    "connect_errors",
    "connect_timeouts",
    "resets",
    "early_closes",
    "connect_time_sum_us",
    "late_resets",
)


@dataclass(frozen=True)
class Gates:
    max_failure_rate: float | None = 0.01  # fraction; None = gate off
    max_early_reset_rate: float | None = 0.01
    max_reset_rate: float | None = 0.01  # resets after the backend's first byte, per connection
    max_unhealthy: float | None = 0.0  # fraction of the canary's backends down or ejected
    max_connect_time: float | None = None  # seconds
    min_connections: int = 10  # canary connect attempts per window, below: inconclusive
    check: str | None = None  # external command: exit 0 = pass
    check_timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gates:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class CheckOutcome:
    ok: bool
    detail: str  # "exit 0", "exit 2: <last line of output>", "timed out after 10s"


@dataclass
class Judgement:
    result: str  # "pass" | "fail" | "inconclusive"
    reason: str  # one line; for "fail" it names the gate and its figure
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # gate -> canary, stable, max, ok

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason, "figures": self.figures}


def delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Counter deltas, never negative (a backend slot freed after its drain loses its sums)."""
    return {k: max(0, now.get(k, 0) - before.get(k, 0)) for k in COUNTERS}


def failure_rate(w: dict[str, int]) -> float | None:
    return (w["connect_errors"] + w["connect_timeouts"]) / w["attempts"] if w["attempts"] else None


def early_reset_rate(w: dict[str, int]) -> float | None:
    return min(1.0, (w["resets"] + w["early_closes"]) / w["attempts"]) if w["attempts"] else None


def reset_rate(w: dict[str, int]) -> float | None:
    return min(1.0, w["late_resets"] / w["total"]) if w["total"] else None


def connect_time(w: dict[str, int]) -> float | None:
    return w["connect_time_sum_us"] / w["total"] / 1e6 if w["total"] else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:.1f}ms"


RATE_GATES = (
    ("failure_rate", "max_failure_rate", failure_rate, _pct),
    ("early_reset_rate", "max_early_reset_rate", early_reset_rate, _pct),
    ("reset_rate", "max_reset_rate", reset_rate, _pct),
    ("connect_time", "max_connect_time", connect_time, _ms),
)


def judge(
    gates: Gates,
    canary: dict[str, int],
    stable: dict[str, int],
    unhealthy: float,
    check: CheckOutcome | None,
) -> Judgement:
    """One judgement over a window: canary and stable are that window's counter deltas; unhealthy
    the canary's share of backends down or ejected now; check the --check outcome (None: no check)."""
    figures: dict[str, dict[str, Any]] = {}
    fails: list[str] = []
    holds: list[str] = []
    n = canary["attempts"]
    figures["connections"] = {"canary": n, "stable": stable["attempts"], "min": gates.min_connections}
    if gates.max_unhealthy is not None:
        ok = unhealthy <= gates.max_unhealthy + 1e-9
        figures["unhealthy"] = {"canary": unhealthy, "max": gates.max_unhealthy, "ok": ok}
        if not ok:
            fails.append(
                f"unhealthy: {_pct(unhealthy)} of canary backends down > {_pct(gates.max_unhealthy)}"
            )
    if check is not None:
        figures["check"] = {"ok": check.ok, "detail": check.detail}
        if not check.ok:
            fails.append(f"check: {check.detail}")
    enough = n >= max(1, gates.min_connections)
    for name, key, fn, fmt in RATE_GATES:
        limit = getattr(gates, key)
        if limit is None:
            continue
        c, s = fn(canary), fn(stable)
        ok = None if not enough or c is None else c <= limit + 1e-12
        figures[name] = {"canary": c, "stable": s, "max": limit, "ok": ok}
        if ok is False:
            if s is not None and s >= c:
                figures[name]["ok"] = None
                holds.append(f"{name}: canary {fmt(c)} > {fmt(limit)} but stable is as bad ({fmt(s)})")
            else:
                fails.append(
                    f"{name}: canary {fmt(c)} > max {fmt(limit)} (stable {fmt(s)}) over {n} connections"
                )
    if fails:
        return Judgement("fail", "; ".join(fails), figures)
    if not enough:
        return Judgement(
            "inconclusive", f"{n} canary connections in the window < min {gates.min_connections}", figures
        )
    if holds:
        return Judgement("inconclusive", "; ".join(holds), figures)
    return Judgement("pass", f"all gates passed over {n} canary connections", figures)
