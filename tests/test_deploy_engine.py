"""fastlb.deploy.engine with a fake control process (fake routes, counters, backends and clock):
rollouts drive the split through set_split, promotion drains the old pool, switches, split
persistence in the state file, restore after a restart, reload."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from fastlb.deploy.engine import DeployError, DeployManager
from fastlb.deploy.gates import COUNTERS, Gates
from fastlb.deploy.requests import spec_from_request
from fastlb.deploy.rollout import RolloutSpec
from fastlb.runtime.statefile import StateFile


@dataclass
class Slot:
    index: int
    name: str
    admin: str = "ready"
    health: str = "up"
    weight: int = 1
    removed: bool = False


class FakeRoutes:
    def __init__(self, splits: dict) -> None:
        self.splits = splits
        self.on_change = None
        self.calls: list = []

    def split(self, listener, route):
        if (listener, route) not in self.splits:
            raise KeyError(f"listener {listener!r} has no route {route!r}")
        return dict(self.splits[(listener, route)])

    def set_split(self, listener, route, weights):
        prev = self.split(listener, route)
        new = {p: 0 for p in prev}
        new.update(weights)
        self.splits[(listener, route)] = new
        self.calls.append(dict(weights))
        if self.on_change:
            self.on_change(listener, route, dict(new))
        return prev


@dataclass
class FakeSup:
    tmp: object
    now: list = field(default_factory=lambda: [1000.0])

    def __post_init__(self) -> None:
        route = SimpleNamespace(name="default", backends=(SimpleNamespace(pool="v1", weight=100),))
        self.config = SimpleNamespace(
            file=str(self.tmp / "fastlb.toml"),
            listeners={"web": SimpleNamespace(routes=(route,))},
            rollouts={},
        )
        self.counters = {i: dict.fromkeys(COUNTERS, 0) for i in range(4)}
        self.pools = {
            "v1": SimpleNamespace(slots={"a": Slot(0, "a"), "b": Slot(1, "b")}),
            "v2": SimpleNamespace(slots={"c": Slot(2, "c"), "d": Slot(3, "d")}),
        }
        self.region = SimpleNamespace(backend=lambda i: {**self.counters[i], "active": 0})
        self.admin_calls: list = []
        self.backends = SimpleNamespace(set_admin=self._set_admin)
        self.state = StateFile(str(self.tmp / "state.json"), self.config.file)
        self.state.load()
        self.routes = FakeRoutes({("web", "default"): {"v1": 100}})
        self.poke = lambda: None

    def _set_admin(self, slot, admin):
        slot.admin = admin
        self.admin_calls.append((slot.name, admin))

    def traffic(self, pool: str, n: int, refused: int = 0) -> None:
        for slot in self.pools[pool].slots.values():
            c = self.counters[slot.index]
            c["attempts"] += n
            c["connect_errors"] += refused
            c["total"] += n - refused

    def manager(self) -> DeployManager:
        m = DeployManager(self, clock=lambda: self.now[0])
        self.routes.on_change = m.on_split_change
        m.restore()
        return m


def spec(**kw) -> RolloutSpec:
    d = dict(
        name="r",
        listener="web",
        route="default",
        to_pool="v2",
        from_pool="v1",
        steps=(10, 50, 100),
        interval=1.0,
    )
    d.update(kw)
    return RolloutSpec(**d)


def advance(sup: FakeSup, m: DeployManager, dt: float, canary=20, stable=80, refused=0) -> None:
    sup.traffic("v2", canary, refused)
    sup.traffic("v1", stable)
    sup.now[0] += dt
    m.tick()


def test_good_rollout_through_set_split_promotes_and_drains_the_old_pool(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    v = m.start(spec())
    assert v["share"] == 10 and sup.routes.splits[("web", "default")] == {"v1": 90, "v2": 10}
    advance(sup, m, 1.0)
    assert sup.routes.splits[("web", "default")] == {"v1": 50, "v2": 50}
    advance(sup, m, 1.0)
    assert sup.routes.splits[("web", "default")] == {"v1": 0, "v2": 100}
    assert m.get("r").status == "promoted"
    assert sorted(sup.admin_calls) == [("a", "drain"), ("b", "drain")]
    doc = json.loads((tmp_path / "state.json").read_text())
    assert doc["values"]["split:web/default"] == {"value": {"v2": 100}, "file": {"v1": 100}}
    assert doc["rollouts"]["r"]["status"] == "promoted"
    assert doc["deploy"]["retired"] == {"v1": ["a", "b"]}
    # rolling v1 out again puts the backends fastlb drained back in service
    m.start(spec(name="back", to_pool="v1", from_pool="v2"))
    assert sup.admin_calls[-2:] == [("a", "ready"), ("b", "ready")]


def test_bad_rollout_rolls_back_and_refuses_a_second_one_on_the_route_while_running(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    m.start(spec(threshold=2))
    with pytest.raises(DeployError, match="already running on web/default"):
        m.start(spec(name="other"))
    with pytest.raises(DeployError, match="promote or abort it first"):
        m.switch("web", "default", "v2", False, False)
    advance(sup, m, 1.0, refused=10)
    advance(sup, m, 1.0, refused=10)
    r = m.get("r")
    assert r.status == "failed" and "failure_rate: canary 50.0% > max 1.0%" in r.reason
    assert sup.routes.splits[("web", "default")] == {"v1": 100, "v2": 0}
    assert sup.admin_calls == []  # a rollback drains nothing


def test_check_gate_runs_asynchronously(tmp_path):
    import asyncio

    sup = FakeSup(tmp_path)

    async def main() -> str:
        m = sup.manager()
        m.start(spec(gates=Gates(check="echo nope; exit 3"), threshold=1))
        advance(sup, m, 1.0)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not m.get("r").active:
                break
        return m.get("r").reason

    reason = asyncio.run(main())
    assert "check: exit 3: nope" in reason


def test_restart_resumes_at_the_same_step_and_untrusted_state_rolls_back(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    m.start(spec())
    advance(sup, m, 1.0)
    assert m.get("r").share == 50
    # a restart: new process, fresh counters, the routes start from the config file's split
    sup2 = FakeSup(tmp_path)
    m2 = sup2.manager()
    r = m2.get("r")
    assert (r.status, r.share) == ("progressing", 50)
    assert sup2.routes.splits[("web", "default")] == {"v1": 50, "v2": 50}
    assert r.history[-1]["event"] == "restart"
    # a record that cannot be trusted: rolled back, with the reason
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["rollouts"]["r"]["step"] = 9
    (tmp_path / "state.json").write_text(json.dumps(doc))
    sup3 = FakeSup(tmp_path)
    m3 = sup3.manager()
    assert "r" not in m3.rollouts
    assert sup3.routes.splits[("web", "default")] == {"v1": 100, "v2": 0}
    saved = json.loads((tmp_path / "state.json").read_text())["rollouts"]["r"]
    assert saved["status"] == "failed" and "saved state untrusted (step 9 out of range)" in saved["reason"]


def test_reload_reapplies_the_rollout_split_and_runtime_splits_follow_the_rule(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    m.switch("web", "default", "v2", False, False)
    assert sup.routes.splits[("web", "default")] == {"v1": 0, "v2": 100}
    # SIGHUP with the file unchanged: the routes apply the file's split, then deploy settles
    m.before_reload()
    sup.routes.set_split("web", "default", {"v1": 100})
    m.after_reload(sup.config)
    assert sup.routes.splits[("web", "default")] == {"v1": 0, "v2": 100}
    v = m.switch("web", "default", None, False, True)  # --back
    assert v["live"] == ["v1"] and sup.routes.splits[("web", "default")]["v2"] == 0
    assert "split:web/default" not in sup.state.values  # back to the file's split
    # a rollout owns its route's split across a reload
    m.start(spec())
    m.before_reload()
    sup.routes.set_split("web", "default", {"v1": 100})
    m.after_reload(sup.config)
    assert sup.routes.splits[("web", "default")] == {"v1": 90, "v2": 10}


def test_requests_parse_the_config_file_forms(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    s = spec_from_request(
        m,
        {
            "listener": "web",
            "route": "default",
            "to": "v2",
            "steps": "10,50,100",
            "interval": "2s",
            "max_failure_rate": "0.5%",
            "max_connect_time": "50ms",
            "max_unhealthy": "off",
            "threshold": 1,
        },
    )
    assert (s.from_pool, s.steps, s.interval, s.threshold) == ("v1", (10, 50, 100), 2.0, 1)
    assert (s.gates.max_failure_rate, s.gates.max_connect_time, s.gates.max_unhealthy) == (0.005, 0.05, None)
    from fastlb.control import ControlError

    with pytest.raises(ControlError, match="max_failure_rate: invalid percentage"):
        spec_from_request(m, {"listener": "web", "route": "default", "to": "v2", "max_failure_rate": "lots"})
    with pytest.raises(ControlError, match="no \\[rollouts.nope\\] table"):
        spec_from_request(m, {"rollout": "nope"})


def test_an_unreadable_finished_rollout_is_dropped_without_touching_the_split(tmp_path):
    sup = FakeSup(tmp_path)
    m = sup.manager()
    m.start(spec())
    m.act("r", "promote")
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["rollouts"]["r"]["step"] = "x"
    (tmp_path / "state.json").write_text(json.dumps(doc))
    sup2 = FakeSup(tmp_path)
    m2 = sup2.manager()
    assert "r" not in m2.rollouts and "r" not in sup2.state.rollouts
    assert sup2.routes.splits[("web", "default")] == {"v1": 0, "v2": 100}  # the runtime split stays
