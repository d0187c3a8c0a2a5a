"""The control process's view of every backend: what the operator said (weight, ready/drain/maint),
what the checks say (up/down, passive ejection), slow start, drain deadlines, panic, reloads - and
publishing the result into shared memory for the workers.

One rule turns the inputs into what the workers see: a backend takes new connections when its
admin state is ready, its health is up (or its pool is in panic) and its effective weight is > 0.
The effective weight is the weight, ramped over `slow_start` after the backend (re)enters service.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from fastlb._shm import Region
from fastlb.config import BackendConfig, Config, PoolConfig
from fastlb.config.protect import keepalive_record
from fastlb.runtime.health import CheckTarget, OutlierTracker
from fastlb.runtime.statefile import StateFile
from fastlb.runtime.tables import TablePublisher, table_capacity
from fastlb.shm import sockaddr_bytes

log = logging.getLogger("fastlb")

SLOW_START_FLOOR = 0.05  # slow start begins at 5% of the weight (never below 1)


@dataclass
class BackendSlot:
    index: int  # global slot in the region
    pool: str
    name: str
    address: str
    weight: int  # configured, or the last set-weight
    admin: str = "ready"  # ready | drain | maint
    check_up: bool = True  # active health checks' verdict
    ejected: bool = False  # passive ejection (outlier detection)
    removed: bool = False  # gone from the config: draining, then the slot is freed
    slow_start_from: float | None = None  # monotonic time the ramp began
    drain_since: float | None = None
    drain_closed: bool = False  # drain_timeout passed: workers told to close
    eff_weight: int = 0
    ejections: int = 0  # times passive ejection took it out (metrics, status)
    drains: int = 0  # times a drain began (operator, or removed from the config)
    priority: int = 0  # priority group, lower first (BACKUP_PRIORITY for backup = true)
    backup: bool = False

    @property
    def health(self) -> str:
        if not self.check_up:
            return "down"
        return "ejected" if self.ejected else "up"


@dataclass
class PoolState:
    index: int
    config: PoolConfig
    first: int
    n_slots: int
    slots: dict[str, BackendSlot] = field(default_factory=dict)
    outlier: OutlierTracker | None = None
    all_down: bool = False

    def free_slot(self) -> int | None:
        used = {s.index for s in self.slots.values()}
        for i in range(self.first, self.first + self.n_slots):
            if i not in used:
                return i
        return None


class BackendManager:
    """Owns the backend records of the region after the supervisor created it."""

    def __init__(self, region: Region, pools: dict[str, PoolState], state: StateFile | None = None) -> None:
        self.region = region
        self.pools = pools
        self.state = state
        self.discovered: dict[str, list[BackendConfig]] = {}  # pool -> backends from DNS
        self.tables = TablePublisher(region)
        for ps in pools.values():
            ps.outlier = OutlierTracker(ps.config.outlier_detection, len(ps.config.backends))
        self.restore_state()
        for ps in pools.values():
            for slot in ps.slots.values():
                slot.eff_weight = slot.weight
        self.publish_all()

    # --- runtime state (fastlb.runtime.statefile) ------------------------------------------------

    def restore_state(self) -> None:
        """Weights and admin states by the state file's rule (start and reload): a runtime value wins
        unless the config file's value changed since it was last loaded."""
        if self.state is None:
            return
        now = time.monotonic()
        keep = set()
        for ps in self.pools.values():
            conf = {b.name: b.weight for b in ps.config.backends}
            for slot in ps.slots.values():
                if slot.removed or slot.name not in conf:
                    continue
                what = f"pool {slot.pool} backend {slot.name}"
                wkey, akey = f"weight:{slot.pool}/{slot.name}", f"admin:{slot.pool}/{slot.name}"
                keep |= {wkey, akey}
                slot.weight, _ = self.state.resolve(wkey, conf[slot.name], f"{what} weight")
                admin, src = self.state.resolve(akey, "ready", f"{what} admin state")
                if src == "runtime" and admin in ("drain", "maint") and slot.admin != admin:
                    slot.admin = admin
                    slot.drain_since = now if admin == "drain" else None
        self.state.prune(keep | {k for k in self.state.values if not k.startswith(("weight:", "admin:"))})
        self.state.save()

    def _config_weight(self, slot: BackendSlot) -> int:
        return next(
            (b.weight for b in self.pools[slot.pool].config.backends if b.name == slot.name), slot.weight
        )

    def value_source(self, slot: BackendSlot, what: str) -> str:
        """ "runtime" if slot's `what` ("weight" | "admin") was set at runtime, else "file"."""
        if self.state is None:
            return "file"
        return self.state.source(f"{what}:{slot.pool}/{slot.name}")

    # --- publishing ----------------------------------------------------------------------------

    def _effective(self, ps: PoolState, slot: BackendSlot, now: float) -> int:
        ramp = ps.config.slow_start
        if ramp <= 0:
            slot.slow_start_from = None  # no ramp configured: nothing left to do periodically
            return slot.weight
        if slot.slow_start_from is None or slot.weight == 0:
            return slot.weight
        frac = (now - slot.slow_start_from) / ramp
        if frac >= 1.0:
            slot.slow_start_from = None
            return slot.weight
        return max(1, round(slot.weight * max(SLOW_START_FLOOR, frac)))

    def active_priority(self, ps: PoolState) -> int | None:
        """The priority group that takes new connections now: the lowest one with a usable backend
        (what every worker computes from the same records in core/lb.pxi lb_refresh); None if none."""
        panic = ps.all_down and ps.config.all_down == "panic"
        usable = [
            s.priority
            for s in ps.slots.values()
            if not s.removed and s.admin == "ready" and s.eff_weight > 0 and (s.health == "up" or panic)
        ]
        return min(usable, default=None)

    def _write_pool(self, ps: PoolState, now: float, ramp_tick: bool = False) -> None:
        """Weights, states, panic and the hash table of one pool (without the generation bump).
        ramp_tick: called by tick(), so a hash-table change that only advances slow-start ramps may
        wait for the table's rebuild budget (runtime/tables.py)."""
        r = self.region
        r.set_scan_len(ps.index, max((s.index - ps.first + 1 for s in ps.slots.values()), default=0))
        for slot in ps.slots.values():
            slot.eff_weight = self._effective(ps, slot, now)
            r.set_weight(slot.index, slot.weight, slot.eff_weight)
            r.set_admin(slot.index, slot.admin)
            r.set_health(slot.index, slot.health)
            r.set_priority(slot.index, slot.priority)
        live = [s for s in ps.slots.values() if not s.removed]
        all_down = bool(live) and all(s.health != "up" for s in live)
        if all_down != ps.all_down:
            ps.all_down = all_down
            if all_down:
                what = (
                    "panic: spreading new connections over all backends, ignoring health"
                    if ps.config.all_down == "panic"
                    else "rejecting new connections"
                )
                log.error("pool %s: every backend is down; %s", ps.config.name, what)
            else:
                log.info("pool %s: a backend is up again; panic/reject over", ps.config.name)
        r.set_panic(ps.index, all_down and ps.config.all_down == "panic")
        if ps.config.algorithm in ("maglev", "ring_hash"):
            group = self.active_priority(ps)  # the table holds the first usable priority group only
            names, weights, ramping = [], [], []
            by_index = {s.index: s for s in ps.slots.values()}
            for i in range(ps.first, ps.first + ps.n_slots):
                slot = by_index.get(i)
                if slot is None:
                    names.append(f"\x00free-{i}")
                    weights.append(0)
                    ramping.append(False)
                    continue
                names.append(slot.name)
                ok = (
                    slot.admin == "ready"
                    and (slot.health == "up" or (all_down and ps.config.all_down == "panic"))
                    and slot.priority == group
                )
                weights.append(slot.eff_weight if ok else 0)
                ramping.append(ramp_tick and ok and slot.slow_start_from is not None)
            self.tables.publish(
                ps.index,
                ps.config.algorithm,
                ps.first,
                names,
                weights,
                ramping,
                ps.config.maglev_table_size,
                ps.config.ring_vnodes,
            )

    def publish_pool(self, ps: PoolState) -> None:
        self._write_pool(ps, time.monotonic())
        self.region.publish()

    def publish_all(self) -> None:
        now = time.monotonic()
        for ps in self.pools.values():
            self._write_pool(ps, now)
        self.region.publish()

    # --- operator actions ----------------------------------------------------------------------

    def find(self, pool: str, backend: str) -> BackendSlot:
        ps = self.pools.get(pool)
        if ps is None:
            raise KeyError(f"unknown pool {pool!r} (pools: {', '.join(self.pools)})")
        slot = ps.slots.get(backend)
        if slot is None or slot.removed:
            names = ", ".join(n for n, s in ps.slots.items() if not s.removed)
            raise KeyError(f"unknown backend {backend!r} in pool {pool!r} (backends: {names})")
        return slot

    def set_weight(self, slot: BackendSlot, weight: int) -> None:
        slot.weight = weight
        log.info("pool %s backend %s: weight %d", slot.pool, slot.name, weight)
        self.publish_pool(self.pools[slot.pool])
        if self.state is not None and not slot.removed:
            self.state.set(f"weight:{slot.pool}/{slot.name}", weight, self._config_weight(slot))

    def set_admin(self, slot: BackendSlot, admin: str) -> None:
        old = slot.admin
        if old == admin:
            return
        slot.admin = admin
        now = time.monotonic()
        if admin == "drain":
            slot.drain_since = now
            slot.drains += 1
        else:
            slot.drain_since = None
            if slot.drain_closed:
                slot.drain_closed = False
                self.region.set_close_conns(slot.index, False)
        if admin == "ready":
            slot.slow_start_from = now
        log.info(
            "pool %s backend %s: %s -> %s (%d connections open)",
            slot.pool,
            slot.name,
            old,
            admin,
            self.region.backend(slot.index)["active"],
        )
        self.publish_pool(self.pools[slot.pool])
        if self.state is not None and not slot.removed:
            self.state.set(f"admin:{slot.pool}/{slot.name}", admin, "ready")

    # --- health ----------------------------------------------------------------------------------

    def check_targets(self) -> list[CheckTarget]:
        targets = []
        for ps in self.pools.values():
            hc = ps.config.health_check
            if hc is None:
                continue
            for slot in ps.slots.values():
                if slot.removed:
                    continue
                host, _, port = slot.address.rpartition(":")
                targets.append(
                    CheckTarget(ps.config.name, slot.name, host.strip("[]"), int(port), hc, up=slot.check_up)
                )
        return targets

    def on_check_transition(self, target: CheckTarget, up: bool, reason: str) -> None:
        ps = self.pools.get(target.pool)
        slot = ps.slots.get(target.backend) if ps else None
        if slot is None or slot.removed:
            return
        # fastlb.runtime.health has logged the transition with its reason
        slot.check_up = up
        if up:
            slot.slow_start_from = time.monotonic()
        self.publish_pool(ps)

    def on_check_success(self, target: CheckTarget) -> None:
        """A passing active check of an up backend: it ends the backend's outlier ejection at once
        (outlier_detection.successful_active_health_check_uneject_host, default on) - else a
        restarted backend whose checks pass would stay out for the whole ejection time."""
        ps = self.pools.get(target.pool)
        slot = ps.slots.get(target.backend) if ps else None
        if slot is None or slot.removed or not slot.ejected or ps.outlier is None:
            return
        if not ps.config.outlier_detection.successful_active_health_check_uneject_host:
            return
        now = time.monotonic()
        ps.outlier.uneject(slot.name, now)
        slot.ejected = False
        slot.slow_start_from = now
        log.info("pool %s backend %s: active health check passed; ejection over", ps.config.name, slot.name)
        self.publish_pool(ps)

    def ejected_until(self, slot: BackendSlot) -> float | None:
        """Unix time the backend's ejection ends (None while it is not ejected)."""
        tracker = self.pools[slot.pool].outlier
        until = tracker.ejected_until(slot.name) if tracker is not None and slot.ejected else None
        return None if until is None else time.time() + (until - time.monotonic())

    # --- periodic work -----------------------------------------------------------------------------

    def needs_tick(self) -> bool:
        """Whether tick() has work now, at its short interval: a backend is failing or ejected
        (passive ejection), a slow-start ramp or a drain is in progress.  Otherwise the control
        process only looks at the failure counters now and then (TICK_IDLE_MAX)."""
        for ps in self.pools.values():
            tracker = ps.outlier
            watch = tracker is not None and tracker.enabled
            if watch and tracker.ejected():
                return True
            for slot in ps.slots.values():
                if slot.slow_start_from is not None:
                    return True
                if slot.admin == "drain" and slot.drain_since is not None:
                    return True
                if watch and not slot.removed and self.region.consecutive_failures(slot.index) > 0:
                    return True
        return False

    def tick(self) -> None:
        """Periodic work (see needs_tick): passive ejection, slow-start ramps, drain deadlines and
        completions."""
        now = time.monotonic()
        for ps in self.pools.values():
            changed = False
            tracker = ps.outlier
            if tracker is not None and tracker.enabled:
                for name in tracker.expire(now):
                    slot = ps.slots.get(name)
                    if slot is not None and slot.ejected:
                        slot.ejected = False
                        slot.slow_start_from = now
                        changed = True
                        log.info("pool %s backend %s: ejection over, back in service", ps.config.name, name)
                for slot in ps.slots.values():
                    if slot.removed or slot.ejected:
                        continue
                    failures = self.region.consecutive_failures(slot.index)
                    if tracker.observe(slot.name, failures, now):
                        slot.ejected = True
                        slot.ejections += 1
                        changed = True
                        log.warning(
                            "pool %s backend %s: EJECTED after %d consecutive failures, for %.1fs",
                            ps.config.name,
                            slot.name,
                            failures,
                            (tracker.ejected_until(slot.name) or now) - now,
                        )
            for slot in list(ps.slots.values()):
                if slot.slow_start_from is not None:
                    changed = True
                if slot.admin == "drain" and slot.drain_since is not None:
                    changed |= self._drain_progress(ps, slot, now)
            if changed:
                self._write_pool(ps, now, ramp_tick=True)
                self.region.publish()

    def _drain_progress(self, ps: PoolState, slot: BackendSlot, now: float) -> bool:
        active = self.region.backend(slot.index)["active"]
        if active <= 0:
            log.info("pool %s backend %s: drain finished", ps.config.name, slot.name)
            slot.drain_since = None
            if slot.drain_closed:
                slot.drain_closed = False
                self.region.set_close_conns(slot.index, False)
            if slot.removed:
                self.region.set_in_use(slot.index, False)
                del ps.slots[slot.name]
                log.info("pool %s backend %s: removed", ps.config.name, slot.name)
            return True
        if not slot.drain_closed and now - slot.drain_since >= ps.config.drain_timeout:
            slot.drain_closed = True
            self.region.set_close_conns(slot.index, True)
            log.warning(
                "pool %s backend %s: drain_timeout (%.1fs) passed; closing its %d remaining connections",
                ps.config.name,
                slot.name,
                ps.config.drain_timeout,
                active,
            )
            return True
        return False

    # --- membership: reload and discovery -------------------------------------------------------

    def extra_backends(self, pool: str) -> list[BackendConfig]:
        """Backends of `pool` that come from outside the config file (DNS discovery)."""
        return list(self.discovered.get(pool, ()))

    def apply_discovered(self, pool: str, backends: list[BackendConfig]) -> None:
        """A new DNS answer for `pool`: the static backends plus these, through the usual lifecycle."""
        ps = self.pools.get(pool)
        if ps is None:
            return
        self.discovered[pool] = list(backends)
        problems: list[str] = []
        self._sync_backends(ps, list(ps.config.backends) + list(backends), time.monotonic(), problems)
        for p in problems:
            log.error("discovery: %s", p)
        if ps.outlier is not None:
            members = list(ps.config.backends) + list(backends)
            ps.outlier.set_pool_size(len(members), [b.name for b in members])
        self.publish_pool(ps)

    def _sync_backends(
        self,
        ps: PoolState,
        backends: list[BackendConfig],
        now: float,
        needs_restart: list[str],
        applied: list[str] | None = None,
    ) -> None:
        """Make ps's members exactly `backends`: drain the vanished, add the new (slow start),
        apply changed weights and addresses.  Each change is appended to `applied` (when given),
        each backend that finds no free slot to `needs_restart`."""
        name = ps.config.name
        done = applied if applied is not None else []
        wanted = {b.name: b for b in backends}
        for bname, slot in list(ps.slots.items()):
            if bname not in wanted and not slot.removed:
                slot.removed = True
                if slot.admin != "drain":
                    slot.admin = "drain"
                    slot.drain_since = now
                    slot.drains += 1
                log.info("pool %s backend %s: removed from the config; draining", name, bname)
                done.append(f"pools.{name}.backends.{bname}: removed (draining)")
        for bc in backends:
            slot = ps.slots.get(bc.name)
            if slot is not None and not slot.removed:
                # a weight set at runtime is settled by restore_state() (and logged there)
                runtime = self.state is not None and f"weight:{name}/{bc.name}" in self.state.values
                weight = slot.weight if runtime else bc.weight
                if slot.weight != weight:
                    log.info(
                        "pool %s backend %s: weight %d -> %d (reload)",
                        name,
                        bc.name,
                        slot.weight,
                        weight,
                    )
                    done.append(f"pools.{name}.backends.{bc.name}.weight: {slot.weight} -> {weight}")
                    slot.weight = weight
                if (slot.priority, slot.backup) != (bc.priority, bc.backup):
                    done.append(
                        f"pools.{name}.backends.{bc.name}.priority: "
                        f"{'backup' if slot.backup else slot.priority} -> {bc.priority_name}"
                    )
                    slot.priority, slot.backup = bc.priority, bc.backup
                if slot.address != str(bc.address):
                    self.region.set_backend(
                        slot.index,
                        ps.index,
                        bc.name,
                        sockaddr_bytes(bc.address),
                        slot.weight,
                        fresh=False,
                    )
                    done.append(f"pools.{name}.backends.{bc.name}.address: {slot.address} -> {bc.address}")
                    slot.address = str(bc.address)
                    log.info("pool %s backend %s: address now %s (reload)", name, bc.name, bc.address)
                continue
            if slot is not None and slot.removed:
                del ps.slots[bc.name]  # re-added before its drain finished: a fresh slot
                self.region.set_in_use(slot.index, False)
            index = ps.free_slot()
            if index is None:
                needs_restart.append(
                    f"pools.{name}.backends.{bc.name}: no free slot (a pool has max(8, its configured "
                    f"backends at start) spare slots; all {ps.n_slots} are in use or draining)"
                )
                continue
            self.region.set_backend(index, ps.index, bc.name, sockaddr_bytes(bc.address), bc.weight)
            ps.slots[bc.name] = BackendSlot(
                index,
                name,
                bc.name,
                str(bc.address),
                bc.weight,
                slow_start_from=now,
                priority=bc.priority,
                backup=bc.backup,
            )
            log.info("pool %s backend %s: added (%s, weight %d)", name, bc.name, bc.address, bc.weight)
            done.append(f"pools.{name}.backends.{bc.name}: added ({bc.address}, weight {bc.weight})")

    # --- reload ----------------------------------------------------------------------------------

    def reload(self, new: Config) -> tuple[list[str], list[str]]:
        """Apply the pool and backend changes of a new config: weights, backends added, removed
        (drained) or moved, pool settings (algorithm, hash key, retries, all_down, table sizes,
        slow start, drain timeout, health check, outlier detection).  Returns (applied, needs_restart):
        what changed, and what could not be applied without a restart (named, not applied)."""
        applied: list[str] = []
        needs_restart = [
            f"pools.{name}: new pool (pools are laid out in shared memory at start)"
            for name in new.pools
            if name not in self.pools
        ]
        needs_restart += [
            f"pools.{name}: removed from the config, still running"
            for name in self.pools
            if name not in new.pools
        ]
        now = time.monotonic()
        weights = {
            (s.pool, s.name): s.weight
            for ps in self.pools.values()
            for s in ps.slots.values()
            if not s.removed
        }
        for name, pc in new.pools.items():
            ps = self.pools.get(name)
            if ps is None:
                continue
            old = ps.config
            merged, pool_applied, pool_restart = _pool_settings(self.region, ps, pc)
            applied += pool_applied
            needs_restart += pool_restart
            if old.health_check is not None and pc.health_check is None:
                for slot in ps.slots.values():
                    slot.check_up = True  # no checks any more: nobody would ever bring it back up
            self._sync_backends(
                ps, list(pc.backends) + self.extra_backends(name), now, needs_restart, applied
            )
            ps.config = merged
            if ps.outlier is not None:
                ps.outlier.config = ps.config.outlier_detection
                members = list(pc.backends) + self.extra_backends(name)
                ps.outlier.set_pool_size(len(members), [b.name for b in members])
        self.restore_state()
        # a weight the file changed wins over a runtime value (restore_state's rule): a change too
        for ps in self.pools.values():
            for slot in ps.slots.values():
                was = weights.get((slot.pool, slot.name))
                line = f"pools.{slot.pool}.backends.{slot.name}.weight: {was} -> {slot.weight}"
                if was is not None and was != slot.weight and not slot.removed and line not in applied:
                    applied.append(line + " (the file's new value replaces the runtime one)")
        self.publish_all()
        return applied, needs_restart


_TABLE_KEYS = ("algorithm", "maglev_table_size", "ring_vnodes")
_POOL_KEYS = (
    "algorithm",
    "hash_key",
    "retries",
    "all_down",
    "maglev_table_size",
    "ring_vnodes",
    "slow_start",
    "drain_timeout",
    "health_check",
    "outlier_detection",
    "backend_keepalive",  # issue 21: backend connects started from then on
    "tcp_user_timeout",
)


def _pool_settings(region: Region, ps: PoolState, new: PoolConfig) -> tuple[PoolConfig, list[str], list[str]]:
    """The pool's settings from `new`, applied in place: (config now running, applied, needs_restart).

    Everything applies at once except a hashing algorithm or table size whose table does not fit
    the buffers allocated at start (they are sized for the algorithm the pool started with)."""
    old = ps.config
    applied, restart = [], []
    changed = [k for k in _POOL_KEYS if getattr(old, k) != getattr(new, k)]
    merged = replace(new, backends=new.backends)
    if any(k in changed for k in _TABLE_KEYS):
        need = table_capacity(new.algorithm, ps.n_slots, new.maglev_table_size, new.ring_vnodes)
        if need > region.pool(ps.index)["table_capacity"]:
            keys = [k for k in _TABLE_KEYS if k in changed]
            restart += [
                f"pools.{old.name}.{k}: {getattr(old, k)} -> {getattr(new, k)} (its table does not fit the "
                f"buffers allocated at start)"
                for k in keys
            ]
            merged = replace(merged, **{k: getattr(old, k) for k in _TABLE_KEYS})
            changed = [k for k in changed if k not in keys]
    for k in changed:
        shown = (lambda v: "on" if v else "off") if k == "health_check" else (lambda v: v)
        if k == "outlier_detection" or (k == "health_check" and old.health_check and new.health_check):
            applied.append(f"pools.{old.name}.{k}: changed")
        else:
            applied.append(f"pools.{old.name}.{k}: {shown(getattr(old, k))} -> {shown(getattr(new, k))}")
    if changed:
        log.info("pool %s: reload applied %s", old.name, ", ".join(changed))
    region.set_pool_runtime(ps.index, merged.algorithm, merged.hash_key, merged.retries, merged.all_down)
    region.set_pool_keepalive(ps.index, *keepalive_record(merged.backend_keepalive, merged.tcp_user_timeout))
    return merged, applied, restart
