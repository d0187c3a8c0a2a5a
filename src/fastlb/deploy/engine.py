"""Deployments inside the control process (`sup.deploy`): canary rollouts (an asyncio task judging
them), blue-green switches, and the persistence of every split change in the state file.

Everything goes through the routes/splits layer (`sup.routes`, INTERFACES.md section 3:
`split(listener, route)`, `set_split(listener, route, weights)` - one atomic publish each), reached
through the small `Splits` protocol below so this module is testable with a fake.

Splits and the state file: every split change (set-split, a rollout step, a switch) is recorded as
the runtime value of `split:LISTENER/ROUTE` against the config file's split for that route, so the
state file's rule applies (a runtime split wins over the file on SIGHUP and restart unless the file's
split for that route changed).  An active rollout owns its route's split: after a reload its split
is applied again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastlb.deploy import DeployError
from fastlb.deploy.gates import COUNTERS, CheckOutcome
from fastlb.deploy.requests import handle
from fastlb.deploy.rollout import Rollout, RolloutSpec

log = logging.getLogger("fastlb")

TICK = 0.1  # seconds: the shortest sleep of the rollout task (a judgement is due within it)
FINISHED_KEPT = 20  # finished rollouts kept for `rollout status`


class Splits(Protocol):
    def split(self, listener: str, route: str) -> dict[str, int]: ...
    def set_split(self, listener: str, route: str, weights: dict[str, int]) -> dict[str, int]: ...


def norm(split: dict[str, int]) -> dict[str, int]:
    """A split without its weight-0 entries (they change nothing), unless every weight is 0."""
    kept = {p: w for p, w in split.items() if w}
    return kept or dict(split)


def file_split(config: Any, listener: str, route: str) -> dict[str, int] | None:
    """The config file's split of a route, or None if the config has no such route."""
    lc = config.listeners.get(listener)
    for rc in getattr(lc, "routes", ()) if lc is not None else ():
        if rc.name == route:
            return norm({t.pool: t.weight for t in rc.backends})
    return None


class DeployManager:
    """sup.deploy: rollouts, switches, split persistence.  `sup` gives config, pools, region,
    backends, state, routes (may be None in a build without routes) and poke()."""

    def __init__(self, sup: Any, clock: Callable[[], float] = time.time) -> None:
        self.sup = sup
        self.config = sup.config  # the config file as last loaded (the baseline of the splits)
        self.clock = clock
        self.rollouts: dict[str, Rollout] = {}
        self._checks: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self.stopped = False
        self._reloading = False
        self._own_change = False
        d = sup.state.deploy
        self.switches: dict[str, dict[str, Any]] = d.setdefault("switches", {})
        self.retired: dict[str, list[str]] = d.setdefault("retired", {})  # pool -> backends we drained

    # --- the splits layer ----------------------------------------------------------------------

    @property
    def splits(self) -> Splits:
        routes = getattr(self.sup, "routes", None)
        if routes is None:
            raise DeployError("this fastlb has no routes/splits (issue 10) to drive")
        return routes

    def on_split_change(self, listener: str, route: str, split: dict[str, int]) -> None:
        """Hook for every published split change (RouteManager.on_change): record it in the state
        file, except while a reload applies the file's splits (settled by after_reload)."""
        if self._reloading:
            return
        if not self._own_change:
            for r in self.rollouts.values():
                if r.active and (r.spec.listener, r.spec.route) == (listener, route):
                    log.warning(
                        "listener %s route %s: split set by hand while rollout %s runs; it sets its own "
                        "split again at its next judgement (pause, abort or promote it first)",
                        listener,
                        route,
                        r.spec.name,
                    )
        base = file_split(self.config, listener, route)
        if base is None:
            return
        self.sup.state.set(f"split:{listener}/{route}", norm(split), base)

    def _set_split(self, listener: str, route: str, weights: dict[str, int]) -> dict[str, int]:
        self._own_change = True
        try:
            previous = self.splits.set_split(listener, route, weights)
        except (KeyError, ValueError) as exc:
            raise DeployError(str(exc.args[0]) if exc.args else "bad split") from None
            if getattr(self.sup.routes, "on_change", None) is None:  # no hook: record it ourselves
                self.on_split_change(listener, route, self.splits.split(listener, route))
        finally:
            self._own_change = False
        return previous

    def _split(self, listener: str, route: str) -> dict[str, int]:
        try:
            return self.splits.split(listener, route)
        except KeyError as exc:
            raise DeployError(str(exc.args[0])) from None

    # --- counters ------------------------------------------------------------------------------

    def counters(self, pool: str) -> dict[str, int]:
        """Sums of a pool's backend outcome counters (INTERFACES.md section 4)."""
        ps = self.sup.pools[pool]
        out = dict.fromkeys(COUNTERS, 0)
        for slot in list(ps.slots.values()):
            b = self.sup.region.backend(slot.index)
            for k in COUNTERS:
                out[k] += b.get(k, 0)
        return out

    def unhealthy(self, pool: str) -> float:
        live = [s for s in self.sup.pools[pool].slots.values() if not s.removed]
        return sum(1 for s in live if s.health != "up") / len(live) if live else 1.0

    def _pair(self, r: Rollout) -> dict[str, dict[str, int]]:
        return {"canary": self.counters(r.spec.to_pool), "stable": self.counters(r.spec.from_pool)}

    # --- start, restore, reload ----------------------------------------------------------------

    def restore(self) -> None:
        """At start: runtime splits by the state file's rule, then the persisted rollouts (resumed
        at their step with a fresh window, or rolled back with the reason if they cannot be trusted)."""
        routes = getattr(self.sup, "routes", None)
        if routes is None:
            return
        self._settle_splits()
        restored = list(self.sup.state.rollouts.items())
        for name, (rec, why) in list(self.sup.state.rejected_rollouts.items()):  # skipped by the loader
            self._untrusted(name, rec, why)
        for name, rec in restored:
            try:
                r = Rollout.from_dict(rec)
                self._check_spec(r.spec)
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, DeployError) as exc:
                self._untrusted(name, rec, str(exc.args[0]) if exc.args else type(exc).__name__)
                continue
            self.rollouts[name] = r
            if r.active:
                r.resumed_after_restart(self.clock(), self._pair(r))
                if r.spec.gates.check and r.status == "progressing" and not self.sup.state.commands_trusted:
                    # its command came from a file this fastlb cannot vouch for (issue 24 item 1)
                    r.pause(self.clock())
                    log.warning(
                        "rollout %s: paused after a restart: its check command comes from the state file "
                        "%s, which is not owned by this fastlb's uid or is writable by others; resume it "
                        "(fastlb rollout resume %s) if the command is yours",
                        name,
                        self.sup.state.path,
                        name,
                    )
                else:
                    log.warning("rollout %s: resumed after a restart at %d%% (%s)", name, r.share, r.status)
                self._apply(r)
                self._save(r)

    def _untrusted(self, name: str, rec: Any, why: str) -> None:
        """A persisted rollout that cannot be resumed: send its route back to stable, say why.
        A finished one (promoted, failed, aborted) changes nothing: its record is dropped."""
        if isinstance(rec, dict) and rec.get("status") in ("promoted", "failed", "aborted"):
            log.warning(
                "rollout %s: its saved record (%s) is unreadable (%s); dropped", name, rec["status"], why
            )
            self.sup.state.set_rollout(name, None)
            return
        log.error("rollout %s: its saved state cannot be trusted (%s); rolling back", name, why)
        spec = rec.get("spec", {}) if isinstance(rec, dict) else {}
        spec = spec if isinstance(spec, dict) else {}
        listener, route, to, frm = (spec.get(k) for k in ("listener", "route", "to", "from"))
        if all(isinstance(x, str) for x in (listener, route, to, frm)):
            with contextlib.suppress(DeployError):
                cur = self._split(listener, route)
                self._set_split(listener, route, {**cur, frm: 100, to: 0})
        if isinstance(rec, dict):
            rec = dict(
                rec, status="failed", reason=f"rolled back after a restart: saved state untrusted ({why})"
            )
            self.sup.state.set_rollout(name, rec)

    def _settle_splits(self) -> list[str]:
        known = {
            f"split:{ln}/{rc.name}"
            for ln, lc in self.config.listeners.items()
            for rc in getattr(lc, "routes", ())
        }
        self.sup.state.prune(known | {k for k in self.sup.state.values if not k.startswith("split:")})
        notes: list[str] = []
        for lname, lc in self.config.listeners.items():
            for rc in getattr(lc, "routes", ()):
                base = file_split(self.config, lname, rc.name)
                value, src = self.sup.state.resolve(
                    f"split:{lname}/{rc.name}", base, f"listener {lname} route {rc.name} split"
                )
                if src == "runtime" and norm(self._split(lname, rc.name)) != value:
                    self._reloading = True  # already recorded: do not record it again
                    try:
                        self.splits.set_split(lname, rc.name, dict(value))
                        notes.append(
                            f"listeners.{lname}.routes.{rc.name}.split: {_fmt(value)} (runtime value kept)"
                        )
                    except (KeyError, ValueError) as exc:
                        log.warning(
                            "state: listener %s route %s: runtime split not applied: %s", lname, rc.name, exc
                        )
                        self.sup.state.values.pop(f"split:{lname}/{rc.name}", None)
                    finally:
                        self._reloading = False
        self.sup.state.save()
        return notes

    def before_reload(self) -> None:
        self._reloading = True

    def after_reload(self, new: Any) -> list[str]:
        """After the routes applied the file's splits: runtime splits by the rule, then every active
        rollout's split again (it owns its route).  Returns the file's split changes a running
        rollout kept from being applied, for the reload's report (the reload itself names the
        splits that changed)."""
        self._reloading = False
        old_config, self.config = self.config, new
        if getattr(self.sup, "routes", None) is None:
            return []
        self._settle_splits()
        notes: list[str] = []
        for r in self.rollouts.values():
            if not r.active:
                continue
            try:
                self._check_spec(r.spec)
            except DeployError as exc:
                why = f"the reload removed what it needs: {exc}"
                self._finish(r, lambda r=r, why=why: r.rollback(self.clock(), why))
                continue
            if norm(self._split(r.spec.listener, r.spec.route)) != norm(r.split()):
                log.info("rollout %s: reload: its split %s applied again", r.spec.name, _fmt(r.split()))
            filed = file_split(new, r.spec.listener, r.spec.route)
            if filed is not None and filed != file_split(old_config, r.spec.listener, r.spec.route):
                notes.append(
                    f"listeners.{r.spec.listener}.routes.{r.spec.route}.split: the file's {_fmt(filed)} "
                    f"waits: rollout {r.spec.name} is running and keeps {_fmt(r.split())}"
                )
            self._apply(r)
        return notes

    def _check_spec(self, s: RolloutSpec) -> None:
        for p in (s.to_pool, s.from_pool):
            if p not in self.sup.pools:
                raise DeployError(f"pool {p!r} is not in the config")
        self._split(s.listener, s.route)

    # --- requests ------------------------------------------------------------------------------

    def start(self, spec: RolloutSpec, from_given: bool = True) -> dict[str, Any]:
        now = self.clock()
        try:
            spec.validate()
        except ValueError as exc:
            raise DeployError(str(exc)) from None
        self._check_spec(spec)
        for r in self.rollouts.values():
            if r.active and (r.spec.listener, r.spec.route) == (spec.listener, spec.route):
                raise DeployError(
                    f"rollout {r.spec.name} is already running on {spec.listener}/{spec.route}; "
                    "promote or abort it first"
                )
        old = self.rollouts.get(spec.name)
        if old is not None and old.active:
            raise DeployError(f"rollout {spec.name} is already running")
        base = self._split(spec.listener, spec.route)
        self._check_canary(spec, base)
        self._unretire(spec.to_pool)
        r = Rollout.begin(
            spec, base, now, {"canary": self.counters(spec.to_pool), "stable": self.counters(spec.from_pool)}
        )
        self.rollouts[spec.name] = r
        self._apply(r)
        if not r.active:  # a single step (--steps 100): promoted at once, the old pool drains
            self._after(r)
        log.info(
            "rollout %s: started on %s/%s: %s -> %s, steps %s every %gs, threshold %d",
            spec.name,
            spec.listener,
            spec.route,
            spec.from_pool,
            spec.to_pool,
            ",".join(map(str, spec.steps)),
            spec.interval,
            spec.threshold,
        )
        self._save(r)
        return r.view(now)

    def _check_canary(self, spec: RolloutSpec, base: dict[str, int]) -> None:
        """Refuse a rollout that would move traffic the wrong way: --to already has the whole split
        (the rollout would hand 95% to the other pool), or --to has no backend that can take a
        connection (not removed, weight > 0, healthy, in service or drained by fastlb itself, which
        the start puts back)."""
        where = f"{spec.listener}/{spec.route}"
        if {p for p, w in base.items() if w > 0} == {spec.to_pool}:
            raise DeployError(
                f"{where}: pool {spec.to_pool} already has the whole split ({_fmt(norm(base))}): "
                "nothing to roll out"
            )
        retired = self.retired.get(spec.to_pool) or []
        usable = [
            s
            for s in self.sup.pools[spec.to_pool].slots.values()
            if not s.removed
            and s.weight > 0
            and s.health == "up"
            and (s.admin == "ready" or (s.admin == "drain" and s.name in retired))
        ]
        if not usable:
            raise DeployError(
                f"{where}: pool {spec.to_pool} has no usable backend (none in service, healthy and with a "
                "weight above 0): nothing to roll out to"
            )

    def default_from(self, listener: str, route: str, to_pool: str) -> str:
        """--from left out: the pool with the largest weight in the route's split, other than --to."""
        split = self._split(listener, route)
        cands = sorted(((w, p) for p, w in split.items() if p != to_pool), reverse=True)
        if not cands:
            raise DeployError(f"{listener}/{route} splits only to {to_pool}: give --from")
        return cands[0][1]

    def get(self, name: str | None) -> Rollout:
        if name is None:
            active = [r for r in self.rollouts.values() if r.active]
            if len(active) == 1:
                return active[0]
            if active:
                raise DeployError("name the rollout: " + ", ".join(r.spec.name for r in active))
            last = list(self.rollouts.values())[-1:]
            raise DeployError(
                "no rollout is running"
                + (f" (the last one, {last[0].spec.name}, is {last[0].status})" if last else "")
            )
        r = self.rollouts.get(name)
        if r is None:
            raise DeployError(f"no rollout {name!r} (rollouts: {', '.join(self.rollouts) or 'none'})")
        return r

    def act(self, name: str | None, action: str) -> dict[str, Any]:
        r = self.get(name)
        now = self.clock()
        try:
            if action == "pause":
                r.pause(now)
            elif action == "resume":
                r.resume(now, self._pair(r))
            elif action == "promote":
                self._finish(r, lambda: r.promote(now))
            elif action == "abort":
                self._finish(r, lambda: r.abort(now))
            else:
                raise DeployError(f"unknown rollout action {action!r}")
        except ValueError as exc:
            raise DeployError(str(exc)) from None
        log.info("rollout %s: %s (%s, %d%%)", r.spec.name, action, r.status, r.share)
        self._save(r)
        return r.view(now)

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        now = self.clock()
        if name is not None:
            return [self.get(name).view(now)]
        return [r.view(now) for r in self.rollouts.values()]

    # --- blue-green ------------------------------------------------------------------------------

    def switch(
        self, listener: str, route: str, pool: str | None, drain_old: bool, back: bool
    ) -> dict[str, Any]:
        """All new connections of the route to `pool` in one publish (or, with back, to the side
        that was live before the last switch)."""
        key = f"{listener}/{route}"
        for r in self.rollouts.values():
            if r.active and (r.spec.listener, r.spec.route) == (listener, route):
                raise DeployError(f"rollout {r.spec.name} is running on {key}; promote or abort it first")
        current = self._split(listener, route)
        if back:
            rec = self.switches.get(key)
            if rec is None:
                raise DeployError(f"{key} was never switched: nothing to go back to")
            target = dict(rec["previous"])
        else:
            if pool is None:
                raise DeployError("give the POOL to switch to, or --back")
            if pool not in self.sup.pools:
                raise DeployError(f"unknown pool {pool!r} (pools: {', '.join(self.sup.pools)})")
            target = {p: 0 for p in current}
            target[pool] = 100
        for p, w in target.items():
            if w > 0:
                self._unretire(p)
        previous = self._set_split(listener, route, target)
        live = sorted(p for p, w in target.items() if w > 0)
        old = sorted(p for p, w in previous.items() if w > 0 and p not in live)
        if drain_old:
            for p in old:
                self._retire(p)
        self.switches[key] = {
            "listener": listener,
            "route": route,
            "live": live,
            "old": old,
            "previous": norm(previous),
            "drain_old": drain_old,
            "at": self.clock(),
        }
        self.sup.state.save()
        log.info(
            "switch %s: live %s (was %s)%s",
            key,
            ",".join(live),
            ",".join(old) or "-",
            "; draining the old side" if drain_old and old else "",
        )
        return self.switch_view(key)

    def switch_view(self, key: str) -> dict[str, Any]:
        rec = self.switches[key]
        split = norm(self._split(rec["listener"], rec["route"]))
        other = {}
        for p in rec["old"]:
            if p in self.sup.pools:
                slots = [s for s in self.sup.pools[p].slots.values() if not s.removed]
                active = sum(self.sup.region.backend(s.index)["active"] for s in slots)
                other[p] = {
                    "active": active,
                    "draining": any(s.admin == "drain" for s in slots),
                }
        return {**rec, "split": split, "other": other}

    # --- pools taken out of and back into service -----------------------------------------------

    def _retire(self, pool: str) -> None:
        """Drain every backend of `pool` (its established connections get its drain_timeout)."""
        names = []
        for slot in list(self.sup.pools[pool].slots.values()):
            if slot.removed:
                continue
            if slot.admin == "ready":
                self.sup.backends.set_admin(slot, "drain")
            names.append(slot.name)
        self.retired[pool] = names
        self.sup.state.save()
        self.sup.poke()

    def _unretire(self, pool: str) -> None:
        """A pool fastlb drained when it retired it takes traffic again: its backends back in service."""
        names = self.retired.pop(pool, None)
        if not names:
            return
        for slot in list(self.sup.pools[pool].slots.values()):
            if slot.name in names and slot.admin == "drain" and not slot.removed:
                self.sup.backends.set_admin(slot, "ready")
        log.info("pool %s: back in service (%s)", pool, ",".join(names))
        self.sup.state.save()

    # --- the task ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Judge each rollout when it is due: sleeps until the next judgement (or a poke) - an
        idle control process stays asleep."""
        self._wake = asyncio.Event()
        try:
            while True:
                try:
                    async with asyncio.timeout(self._delay()):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
                    self.tick()
                except Exception:
                    log.exception("rollout tick failed")
        finally:  # stopping: no --check left running
            for t in list(self._checks.values()):
                t.cancel()

    def _delay(self) -> float | None:
        due = [r.next_at for n, r in self.rollouts.items() if r.active and n not in self._checks]
        if self.stopped:
            due = []
        if not due:
            return None
        return min(max(TICK, min(due) - self.clock()), 60.0)

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def stop(self, handed_over: bool = False) -> None:
        """Stopping: no more judgements (a restart resumes them from the state file).  handed_over:
        a successor instance took over and owns the state file from now on: this one stops writing."""
        self.stopped = True
        if handed_over:
            self.sup.state.frozen = True
        self.poke()

    def tick(self) -> None:
        if self.stopped:
            return
        now = self.clock()
        for name, r in list(self.rollouts.items()):
            if not r.due(now) or name in self._checks:
                continue
            counters = self._pair(r)
            unhealthy = self.unhealthy(r.spec.to_pool)
            if r.spec.gates.check:
                self._checks[name] = asyncio.create_task(self._judge_with_check(r, counters, unhealthy))
            else:
                self._judge(r, counters, unhealthy, None)

    async def _judge_with_check(self, r: Rollout, counters: dict, unhealthy: float) -> None:
        try:
            outcome = await run_check(r)
            if r.active:
                self._judge(r, counters, unhealthy, outcome)
        finally:
            self._checks.pop(r.spec.name, None)
            self.poke()

    def _judge(self, r: Rollout, counters: dict, unhealthy: float, check: CheckOutcome | None) -> None:
        before, share = r.status, r.share
        j = r.judge(self.clock(), counters, unhealthy, check)
        level = logging.WARNING if j.result == "fail" else logging.INFO
        log.log(
            level,
            "rollout %s: judgement at %d%%: %s: %s",
            r.spec.name,
            share,
            j.result,
            j.reason,
        )
        if r.status != before or not r.active:
            self._after(r)
        self._apply(r)
        self._save(r)

    def _finish(self, r: Rollout, transition: Callable[[], None]) -> None:
        transition()
        self._after(r)
        self._apply(r)
        self._save(r)

    def _after(self, r: Rollout) -> None:
        """Side effects of reaching an end: promote drains the stable pool; rollbacks are logged."""
        if r.status == "promoted":
            log.info("rollout %s: %s", r.spec.name, r.reason)
            self._apply(r)
            self._retire(r.spec.from_pool)
        elif r.status in ("failed", "aborted"):
            log.error("rollout %s: %s", r.spec.name, r.reason)

    def _apply(self, r: Rollout) -> None:
        want = r.split()
        if norm(self._split(r.spec.listener, r.spec.route)) != norm(want):
            self._set_split(r.spec.listener, r.spec.route, want)

    def _save(self, r: Rollout) -> None:
        self.poke()  # its next judgement may have moved
        finished = [n for n, x in self.rollouts.items() if not x.active]
        for n in finished[:-FINISHED_KEPT]:
            del self.rollouts[n]
            self.sup.state.rollouts.pop(n, None)
        self.sup.state.set_rollout(r.spec.name, r.to_dict())

    def request(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
        """A control-socket request (fastlb.deploy.requests); ControlError on a bad one."""
        return handle(self, cmd, req)

    def mark_routes(self, listener: str, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add "split_source" ("runtime" | "file") to the routes' status records."""
        for r in routes:
            r["split_source"] = self.sup.state.source(f"split:{listener}/{r['name']}")
        return routes

    def status_view(self) -> dict[str, Any]:
        switches = []
        for key in list(self.switches):
            with contextlib.suppress(DeployError, KeyError):
                switches.append(self.switch_view(key))
        return {"rollouts": self.status(), "switches": switches}


async def run_check(r: Rollout) -> CheckOutcome:
    """The --check command through /bin/sh, with the rollout in its environment; exit 0 = pass."""
    g, s = r.spec.gates, r.spec
    env = dict(
        os.environ,
        FASTLB_ROLLOUT=s.name,
        FASTLB_LISTENER=s.listener,
        FASTLB_ROUTE=s.route,
        FASTLB_CANARY=s.to_pool,
        FASTLB_STABLE=s.from_pool,
        FASTLB_SHARE=str(r.share),
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            g.check or "true",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CheckOutcome(False, f"cannot run it: {exc.strerror or exc}")
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), g.check_timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return CheckOutcome(False, f"timed out after {g.check_timeout:g}s")
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    last = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
    detail = f"exit {proc.returncode}" + (f": {last[0][:200]}" if last else "")
    return CheckOutcome(proc.returncode == 0, detail)


def _fmt(split: dict[str, int]) -> str:
    return " ".join(f"{p}={w}" for p, w in split.items())
