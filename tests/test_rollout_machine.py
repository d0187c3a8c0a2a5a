"""The rollout state machine and its gates alone (fastlb.deploy.rollout / gates): a fake clock and
fake per-pool counters, no processes."""

from __future__ import annotations

import pytest

from fastlb.deploy.gates import COUNTERS, CheckOutcome, Gates, judge
from fastlb.deploy.rollout import Rollout, RolloutSpec


class Pools:
    """Fake cumulative counters of the canary and stable pools."""

    def __init__(self) -> None:
        self.c = {"canary": dict.fromkeys(COUNTERS, 0), "stable": dict.fromkeys(COUNTERS, 0)}

    def traffic(self, which: str, n: int, refused: int = 0, resets: int = 0, connect_us: int = 500) -> None:
        d = self.c[which]
        d["attempts"] += n
        d["connect_errors"] += refused
        d["resets"] += resets
        d["total"] += n - refused
        d["connect_time_sum_us"] += (n - refused) * connect_us

    def now(self) -> dict:
        return {k: dict(v) for k, v in self.c.items()}


def spec(**kw) -> RolloutSpec:
    base = dict(
        name="r",
        listener="web",
        route="default",
        to_pool="v2",
        from_pool="v1",
        steps=(10, 50, 100),
        interval=1.0,
    )
    base.update(kw)
    return RolloutSpec(**base)


def run(r: Rollout, pools: Pools, t: float, canary=20, stable=80, unhealthy=0.0, check=None, **kw):
    pools.traffic("canary", canary, **kw)
    pools.traffic("stable", stable)
    assert r.due(t)
    return r.judge(t, pools.now(), unhealthy, check)


def test_good_canary_steps_and_promotes() -> None:
    p = Pools()
    r = Rollout.begin(spec(), {"v1": 100}, 0.0, p.now())
    assert (r.status, r.share, r.split()) == ("progressing", 10, {"v1": 90, "v2": 10})
    assert not r.due(0.5)
    assert run(r, p, 1.0).result == "pass"
    assert (r.share, r.split()) == (50, {"v1": 50, "v2": 50})
    assert run(r, p, 2.0).result == "pass"
    assert (r.status, r.split()) == ("promoted", {"v1": 0, "v2": 100})
    assert not r.active
    assert [h.get("event", h.get("result")) for h in r.history] == [
        "start",
        "pass",
        "step",
        "pass",
        "step",
        "promoted",
    ]


def test_bad_canary_rolls_back_at_the_threshold_with_the_gate_and_figure() -> None:
    p = Pools()
    r = Rollout.begin(spec(threshold=2), {"v1": 100}, 0.0, p.now())
    j = run(r, p, 1.0, canary=20, refused=5)
    assert j.result == "fail" and r.status == "progressing" and r.share == 10 and r.failures == 1
    assert "failure_rate: canary 25.0% > max 1.0% (stable 0.0%) over 20 connections" in j.reason
    run(r, p, 2.0, canary=20, resets=4)
    assert (r.status, r.share, r.split()) == ("failed", 0, {"v1": 100, "v2": 0})
    assert "failed judgement 2/2 at 10%" in r.reason and "early_reset_rate: canary 20.0%" in r.reason


def test_inconclusive_without_traffic_holds() -> None:
    p = Pools()
    r = Rollout.begin(spec(gates=Gates(min_connections=10)), {"v1": 100}, 0.0, p.now())
    for t in (1.0, 2.0, 3.0):
        j = run(r, p, t, canary=3)
        assert j.result == "inconclusive" and "3 canary connections in the window < min 10" in j.reason
    assert (r.status, r.share, r.failures) == ("progressing", 10, 0)


def test_stable_as_bad_is_inconclusive_not_a_failure() -> None:
    j = judge(
        Gates(),
        {**dict.fromkeys(COUNTERS, 0), "attempts": 20, "connect_errors": 4},
        {**dict.fromkeys(COUNTERS, 0), "attempts": 80, "connect_errors": 40},
        0.0,
        None,
    )
    assert j.result == "inconclusive" and "stable is as bad" in j.reason


def test_health_connect_time_and_check_gates() -> None:
    p = Pools()
    g = Gates(max_connect_time=0.05, max_unhealthy=0.0, check="true")
    r = Rollout.begin(spec(gates=g, threshold=1), {"v1": 100}, 0.0, p.now())
    j = run(r, p, 1.0, connect_us=80_000, check=CheckOutcome(True, "exit 0"))
    assert j.result == "fail" and "connect_time: canary 80.0ms > max 50.0ms" in j.reason
    assert r.status == "failed"
    r = Rollout.begin(spec(gates=g, threshold=1), {"v1": 100}, 0.0, p.now())
    j = run(r, p, 1.0, canary=0, unhealthy=0.5)  # no traffic needed to fail on health
    assert j.result == "fail" and "unhealthy: 50.0% of canary backends down" in j.reason
    r = Rollout.begin(spec(gates=g, threshold=1), {"v1": 100}, 0.0, p.now())
    j = run(r, p, 1.0, canary=0, check=CheckOutcome(False, "exit 2: HTTP 503"))
    assert j.result == "fail" and "check: exit 2: HTTP 503" in j.reason


def test_pause_at_pauses_and_resume_continues_and_failures_still_count_while_paused() -> None:
    p = Pools()
    r = Rollout.begin(spec(steps=(10, 25, 50, 100), pause_at=(25,), threshold=2), {"v1": 100}, 0.0, p.now())
    run(r, p, 1.0)
    assert (r.status, r.share) == ("paused", 25)
    assert run(r, p, 2.0).result == "pass" and (r.status, r.share) == ("paused", 25)  # holds
    run(r, p, 3.0, refused=10)
    assert (r.status, r.failures) == ("paused", 1)
    r.resume(3.5, p.now())
    assert r.status == "progressing" and not r.due(4.0) and r.due(4.5)
    run(r, p, 4.5)
    assert r.share == 50
    r.pause(4.6)
    assert r.status == "paused"
    r.promote(4.7)
    assert (r.status, r.split()) == ("promoted", {"v1": 0, "v2": 100})
    with pytest.raises(ValueError, match="is promoted; cannot abort"):
        r.abort(5.0)


def test_abort_rolls_back_and_other_pools_keep_their_weights() -> None:
    p = Pools()
    r = Rollout.begin(spec(), {"v1": 90, "beta": 10}, 0.0, p.now())
    assert r.split() == {"beta": 10, "v1": 90, "v2": 10}
    r.abort(0.5)
    assert (r.status, r.split()) == ("aborted", {"beta": 10, "v1": 100, "v2": 0})
    assert "rolled back at 10%: aborted by the operator" in r.reason


def test_persisted_and_restored_and_bad_records_rejected() -> None:
    p = Pools()
    r = Rollout.begin(spec(), {"v1": 100}, 0.0, p.now())
    run(r, p, 1.0)
    r2 = Rollout.from_dict(r.to_dict())
    assert (r2.status, r2.share, r2.history) == ("progressing", 50, r.history)
    r2.resumed_after_restart(10.0, Pools().now())
    assert not r2.due(10.5) and r2.due(11.0)
    bad = r.to_dict()
    bad["step"] = 7
    with pytest.raises(ValueError, match="step 7 out of range"):
        Rollout.from_dict(bad)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"steps": (10, 50)}, "last step must be 100"),
        ({"steps": (50, 10, 100)}, "steps must increase"),
        ({"pause_at": (30,)}, "--pause-at 30 is not one of the steps"),
        ({"from_pool": "v2"}, "same pool"),
    ],
)
def test_bad_specs(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        spec(**kw).validate()


def test_rollouts_config_table() -> None:
    from fastlb.config import ConfigError, parse_config

    base = (
        '[listeners.web]\nbind = "127.0.0.1:8080"\npool = "v1"\n'
        '[pools.v1]\nalgorithm = "round_robin"\nbackends = [{ name = "a", address = "127.0.0.1:9001" }]\n'
        '[pools.v2]\nalgorithm = "round_robin"\nbackends = [{ name = "b", address = "127.0.0.1:9002" }]\n'
    )
    cfg = parse_config(
        base + '[rollouts.web-v2]\nlistener = "web"\nroute = "default"\nto = "v2"\nsteps = [10, 50, 100]\n'
        'interval = "1s"\nmax_failure_rate = "2%"\nmax_connect_time = "50ms"\ncheck = "true"\n',
        "f.toml",
    )
    assert cfg.rollouts["web-v2"].as_dict() == {
        "listener": "web",
        "route": "default",
        "to": "v2",
        "steps": (10, 50, 100),
        "interval": 1.0,
        "max_failure_rate": 0.02,
        "max_connect_time": 0.05,
        "check": "true",
    }
    for extra, msg in (
        ('to = "v3"', 'f.toml: rollouts.x.to: unknown pool "v3"'),
        ('to = "v2"\nsteps = [10, 50]', "f.toml: rollouts.x.steps: the last step must be 100"),
        ('to = "v2"\nmax_failure_rate = "many"', "f.toml: rollouts.x.max_failure_rate: invalid percentage"),
        ('to = "v2"\nspeed = 3', "f.toml: rollouts.x.speed: unknown key"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_config(base + f'[rollouts.x]\nlistener = "web"\nroute = "default"\n{extra}\n', "f.toml")
        assert str(e.value).startswith(msg), str(e.value)
