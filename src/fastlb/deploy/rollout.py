"""The canary rollout state machine: pure Python, given the time and the counters, so it is testable
alone with a fake clock and fake counters (fastlb.deploy.engine runs it in the control process).

Semantics (Argo Rollouts' setWeight/pause steps, Flagger's interval/threshold):
* start: the canary's share is set to the first step (the split {from: 100 - share, to: share};
  other pools of the route keep the weights they had).
* every `interval` the gates are judged over the window since the last judgement (fastlb.deploy.gates):
  - pass: the next step; the last step (100) promotes at once: the stable pool gets 0 (the engine
    drains it with its drain_timeout) and the rollout is "promoted";
  - fail: counted; at `threshold` failed judgements (default 2) the rollout rolls back at once: the
    canary's share goes to 0, status "failed" with the reason (the gate and its figure);
    below the threshold it holds at the same step and judges again after another interval;
  - inconclusive (too few connections, or the stable pool as bad): holds, judged again later.
* --pause-at P: when the step with share P is reached, the rollout pauses (Argo's `pause: {}`)
  until `resume`.  While paused (there, or by `pause`) the share holds and the gates are still judged
  each interval: passes do not advance, failed judgements still count and still roll back.
* promote: skip to 100 now.  abort: roll back now ("aborted", with the reason).
Times are wall-clock seconds (time.time()), so a persisted rollout means the same after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastlb.deploy.gates import CheckOutcome, Gates, Judgement, delta, judge

DEFAULT_STEPS = (5, 10, 25, 50, 100)
DEFAULT_INTERVAL = 30.0
DEFAULT_THRESHOLD = 2
HISTORY_MAX = 100
ACTIVE = ("progressing", "paused")
STATE_VERSION = 1


@dataclass(frozen=True)
class RolloutSpec:
    name: str
    listener: str
    route: str
    to_pool: str  # the canary
    from_pool: str  # the stable pool
    steps: tuple[int, ...] = DEFAULT_STEPS
    interval: float = DEFAULT_INTERVAL
    pause_at: tuple[int, ...] = ()
    threshold: int = DEFAULT_THRESHOLD
    gates: Gates = Gates()

    def validate(self) -> None:
        """ValueError (one line) when the spec cannot run."""
        if self.to_pool == self.from_pool:
            raise ValueError(f"--to and --from are the same pool ({self.to_pool})")
        if not self.steps or any(not 0 < s <= 100 for s in self.steps):
            raise ValueError(f"steps must be percentages 1..100, got {','.join(map(str, self.steps))}")
        if list(self.steps) != sorted(set(self.steps)):
            raise ValueError(f"steps must increase, got {','.join(map(str, self.steps))}")
        if self.steps[-1] != 100:
            raise ValueError(f"the last step must be 100 (it promotes), got {self.steps[-1]}")
        bad = [p for p in self.pause_at if p not in self.steps]
        if bad:
            raise ValueError(
                f"--pause-at {bad[0]} is not one of the steps ({','.join(map(str, self.steps))})"
            )
        if self.interval <= 0:
            raise ValueError("interval must be > 0")
        if self.threshold < 1:
            raise ValueError("threshold must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listener": self.listener,
            "route": self.route,
            "to": self.to_pool,
            "from": self.from_pool,
            "steps": list(self.steps),
            "interval": self.interval,
            "pause_at": list(self.pause_at),
            "threshold": self.threshold,
            "gates": self.gates.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutSpec:
        return cls(
            name=str(d["name"]),
            listener=str(d["listener"]),
            route=str(d["route"]),
            to_pool=str(d["to"]),
            from_pool=str(d["from"]),
            steps=tuple(int(s) for s in d["steps"]),
            interval=float(d["interval"]),
            pause_at=tuple(int(s) for s in d.get("pause_at", ())),
            threshold=int(d["threshold"]),
            gates=Gates.from_dict(d.get("gates", {})),
        )


@dataclass
class Rollout:
    spec: RolloutSpec
    base: dict[str, int]  # the route's split when the rollout started
    status: str = "progressing"  # progressing | paused | promoted | failed | aborted
    step: int = 0  # index into spec.steps
    failures: int = 0  # failed judgements so far
    started_at: float = 0.0
    updated_at: float = 0.0
    window_at: float = 0.0  # start of the current judgement window
    next_at: float = 0.0  # when the window is judged
    window: dict[str, dict[str, int]] = field(default_factory=dict)  # "canary"/"stable" counters then
    reason: str = ""
    last: dict[str, Any] | None = None  # the last judgement (figures)
    history: list[dict[str, Any]] = field(default_factory=list)

    # --- what the split should be ------------------------------------------------------------

    @property
    def share(self) -> int:
        if self.status == "promoted":
            return 100
        if self.status in ("failed", "aborted"):
            return 0
        return self.spec.steps[self.step]

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def split(self) -> dict[str, int]:
        """The split this rollout wants now: {from: 100 - share, to: share}, other pools as at start."""
        s = self.spec
        out = {p: w for p, w in self.base.items() if p not in (s.from_pool, s.to_pool)}
        out[s.from_pool] = 100 - self.share
        out[s.to_pool] = self.share
        return out

    # --- transitions ---------------------------------------------------------------------------

    @classmethod
    def begin(
        cls, spec: RolloutSpec, base: dict[str, int], now: float, counters: dict[str, dict[str, int]]
    ) -> Rollout:
        spec.validate()
        r = cls(spec, dict(base), started_at=now)
        r._note(now, "start", f"rollout started: {spec.to_pool} at {r.share}% (from {spec.from_pool})")
        r._enter_step(now, counters)
        return r

    def _enter_step(self, now: float, counters: dict[str, dict[str, int]]) -> None:
        if self.share == 100:
            self._finish(
                now, "promoted", f"promoted: {self.spec.to_pool} takes 100%, {self.spec.from_pool} drained"
            )
            return
        if self.share in self.spec.pause_at and self.status == "progressing":
            self.status = "paused"
            self._note(now, "pause", f"paused at {self.share}% (--pause-at); resume to continue")
        self._new_window(now, counters)

    def _new_window(self, now: float, counters: dict[str, dict[str, int]]) -> None:
        self.window_at = now
        self.next_at = now + self.spec.interval
        self.window = {k: dict(v) for k, v in counters.items()}
        self.updated_at = now

    def due(self, now: float) -> bool:
        return self.active and now >= self.next_at

    def judge(
        self,
        now: float,
        counters: dict[str, dict[str, int]],
        unhealthy: float,
        check: CheckOutcome | None,
    ) -> Judgement:
        """Judge the window that ends now and act on it.  counters: {"canary": {...}, "stable": {...}}."""
        j = judge(
            self.spec.gates,
            delta(counters["canary"], self.window.get("canary", {})),
            delta(counters["stable"], self.window.get("stable", {})),
            unhealthy,
            check,
        )
        self.last = {"at": now, "share": self.share, **j.to_dict()}
        entry = {"at": now, "step": self.step, "share": self.share, "result": j.result, "reason": j.reason}
        self.history.append(entry)
        del self.history[:-HISTORY_MAX]
        if j.result == "fail":
            self.failures += 1
            if self.failures >= self.spec.threshold:
                self.rollback(
                    now,
                    f"failed judgement {self.failures}/{self.spec.threshold} at {self.share}%: {j.reason}",
                )
                return j
            self._new_window(now, counters)
            return j
        if j.result == "pass" and self.status == "progressing":
            self.step += 1
            self._note(
                now,
                "step",
                f"step {self.step + 1}/{len(self.spec.steps)}: {self.spec.to_pool} at {self.share}%",
            )
            self._enter_step(now, counters)
            return j
        self._new_window(now, counters)  # inconclusive, or paused: hold
        return j

    def pause(self, now: float) -> None:
        self._need_active("pause")
        if self.status == "paused":
            return
        self.status = "paused"
        self._note(now, "pause", f"paused at {self.share}% by the operator")

    def resume(self, now: float, counters: dict[str, dict[str, int]]) -> None:
        self._need_active("resume")
        if self.status == "progressing":
            return
        self.status = "progressing"
        self._note(now, "resume", f"resumed at {self.share}%")
        self._new_window(now, counters)

    def promote(self, now: float) -> None:
        self._need_active("promote")
        self._finish(
            now, "promoted", f"promoted by the operator at {self.share}%: {self.spec.to_pool} takes 100%"
        )

    def abort(self, now: float, reason: str = "aborted by the operator") -> None:
        self._need_active("abort")
        self._finish(now, "aborted", f"rolled back at {self.share}%: {reason}")

    def rollback(self, now: float, reason: str) -> None:
        self._finish(now, "failed", f"rolled back: {reason}")

    def resumed_after_restart(self, now: float, counters: dict[str, dict[str, int]]) -> None:
        """A restart lost the counters of the window: start a fresh one at the same step."""
        self._note(now, "restart", f"resumed after a restart at {self.share}% (new judgement window)")
        self._new_window(now, counters)

    def _finish(self, now: float, status: str, reason: str) -> None:
        self.status = status
        self.reason = reason
        self.updated_at = now
        self._note(now, status, reason)

    def _need_active(self, what: str) -> None:
        if not self.active:
            raise ValueError(f"rollout {self.spec.name} is {self.status}; cannot {what} it")

    def _note(self, now: float, event: str, text: str) -> None:
        self.history.append(
            {"at": now, "step": self.step, "share": self.share, "event": event, "reason": text}
        )
        del self.history[:-HISTORY_MAX]
        self.updated_at = now

    # --- status and persistence ----------------------------------------------------------------

    def view(self, now: float) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "listener": s.listener,
            "route": s.route,
            "canary": s.to_pool,
            "stable": s.from_pool,
            "status": self.status,
            "step": self.step + 1,
            "steps": list(s.steps),
            "share": self.share,
            "split": self.split(),
            "failures": self.failures,
            "threshold": s.threshold,
            "interval": s.interval,
            "next_judgement_in": max(0.0, self.next_at - now) if self.active else None,
            "reason": self.reason,
            "gates": s.gates.to_dict(),
            "last_judgement": self.last,
            "history": list(self.history),
            "started_at": self.started_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "base": self.base,
            "status": self.status,
            "step": self.step,
            "failures": self.failures,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "next_at": self.next_at,
            "reason": self.reason,
            "last": self.last,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        """Raises ValueError/KeyError/TypeError when the record cannot be trusted."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"state version {d.get('version')!r}, expected {STATE_VERSION}")
        spec = RolloutSpec.from_dict(d["spec"])
        spec.validate()
        r = cls(spec, {str(k): int(v) for k, v in d["base"].items()})
        r.status = str(d["status"])
        if r.status not in (*ACTIVE, "promoted", "failed", "aborted"):
            raise ValueError(f"unknown status {r.status!r}")
        r.step = int(d["step"])
        if not 0 <= r.step < len(spec.steps):
            raise ValueError(f"step {r.step} out of range")
        r.failures = int(d["failures"])
        r.started_at = float(d["started_at"])
        r.updated_at = float(d["updated_at"])
        r.next_at = float(d.get("next_at", 0.0))
        r.reason = str(d.get("reason", ""))
        r.last = d.get("last")
        r.history = list(d.get("history", []))
        return r
