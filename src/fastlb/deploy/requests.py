"""Control-socket requests of the deployment commands (called by fastlb.control.server through
`sup.deploy.request`); each returns the reply's fields or raises ControlError (one line).

  {"cmd": "rollout-start", "listener": L, "route": R, "to": P, ["from": P], [options...]}
  {"cmd": "rollout-start", "rollout": NAME, [options...]}      a [rollouts.NAME] table; options override
      options: name, steps, interval, pause_at, threshold, max_failure_rate, max_early_reset_rate, max_reset_rate,
      max_unhealthy, max_connect_time, min_connections, check, check_timeout - in the config file's
      forms ("30s", "1%", [5, 10, 100] or "5,10,100"; numbers are seconds / percent)
  {"cmd": "rollout-status", ["name": N]}  -> {"rollouts": [...]}
  {"cmd": "rollout-pause" | "rollout-resume" | "rollout-promote" | "rollout-abort", ["name": N]}
      -> {"rollout": {...}}
  {"cmd": "switch", "listener": L, "route": R, "pool": P | "back": true, ["drain_old": bool]}
      -> {"switch": {...}}
"""

from __future__ import annotations

from typing import Any, Protocol

from fastlb.config import Config, ConfigError
from fastlb.config.rollouts import ROLLOUT_KEYS, parse_option
from fastlb.control import ControlError
from fastlb.deploy import DeployError
from fastlb.deploy.gates import Gates
from fastlb.deploy.rollout import DEFAULT_INTERVAL, DEFAULT_STEPS, DEFAULT_THRESHOLD, RolloutSpec

COMMANDS = (
    "rollout-start",
    "rollout-status",
    "rollout-pause",
    "rollout-resume",
    "rollout-promote",
    "rollout-abort",
    "switch",
)
_NAME_MAX = 63


class DeployManager(Protocol):
    """What the requests need of fastlb.deploy.engine.DeployManager (which imports this module;
    this one imports nothing of it)."""

    config: Config

    def default_from(self, listener: str, route: str, to_pool: str) -> str: ...
    def start(self, spec: RolloutSpec, from_given: bool = True) -> dict[str, Any]: ...
    def status(self, name: str | None = None) -> list[dict[str, Any]]: ...
    def act(self, name: str | None, action: str) -> dict[str, Any]: ...
    def switch(
        self, listener: str, route: str, pool: str | None, drain_old: bool, back: bool
    ) -> dict[str, Any]: ...


def _str(req: dict[str, Any], key: str, required: bool = True) -> str | None:
    v = req.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v:
        raise ControlError(f"'{key}' must be a non-empty string")
    return v


def spec_from_request(mgr: DeployManager, req: dict[str, Any]) -> RolloutSpec:
    opts: dict[str, Any] = {}
    name = req.get("name")
    table = req.get("rollout")
    if table is not None:
        rc = mgr.config.rollouts.get(table) if isinstance(table, str) else None
        if rc is None:
            known = ", ".join(mgr.config.rollouts) or "none"
            raise ControlError(f"no [rollouts.{table}] table in the config (rollouts: {known})")
        opts.update(rc.as_dict())
        name = name or table
    try:
        for key in ROLLOUT_KEYS:
            if req.get(key) is not None:
                opts[key] = parse_option(key, req[key], "", "rollout start")
    except ConfigError as exc:
        raise ControlError(f"{exc.key}: {exc.problem}") from None
    for key in ("listener", "route", "to"):
        if key not in opts:
            raise ControlError(
                f"rollout start needs {key!r}"
                + (" (or a [rollouts.NAME] table)" if key == "listener" else "")
            )
    listener, route, to = opts["listener"], opts["route"], opts["to"]
    name = name or f"{listener}-{route}"
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX or not name.isprintable():
        raise ControlError(f"rollout name must be 1..{_NAME_MAX} printable characters")
    frm = opts.get("from") or mgr.default_from(listener, route, to)
    d = Gates()
    gates = Gates(
        max_failure_rate=opts.get("max_failure_rate", d.max_failure_rate),
        max_early_reset_rate=opts.get("max_early_reset_rate", d.max_early_reset_rate),
        max_reset_rate=opts.get("max_reset_rate", d.max_reset_rate),
        max_unhealthy=opts.get("max_unhealthy", d.max_unhealthy),
        max_connect_time=opts.get("max_connect_time", d.max_connect_time),
        min_connections=opts.get("min_connections", d.min_connections),
        check=opts.get("check"),
        check_timeout=opts.get("check_timeout", d.check_timeout),
    )
    return RolloutSpec(
        name=name,
        listener=listener,
        route=route,
        to_pool=to,
        from_pool=frm,
        steps=opts.get("steps", DEFAULT_STEPS),
        interval=opts.get("interval", DEFAULT_INTERVAL),
        pause_at=opts.get("pause_at", ()),
        threshold=opts.get("threshold", DEFAULT_THRESHOLD),
        gates=gates,
    )


def handle(mgr: DeployManager, cmd: str, req: dict[str, Any]) -> dict[str, Any]:
    try:
        if cmd == "rollout-start":
            return {"rollout": mgr.start(spec_from_request(mgr, req))}
        if cmd == "rollout-status":
            return {"rollouts": mgr.status(_str(req, "name", required=False))}
        if cmd.startswith("rollout-"):
            return {"rollout": mgr.act(_str(req, "name", required=False), cmd.removeprefix("rollout-"))}
        if cmd == "switch":
            back = req.get("back", False) is True
            pool = _str(req, "pool", required=not back)
            listener, route = _str(req, "listener"), _str(req, "route")
            assert listener is not None and route is not None
            return {"switch": mgr.switch(listener, route, pool, req.get("drain_old", False) is True, back)}
    except DeployError as exc:
        raise ControlError(str(exc)) from None
    raise ControlError(f"unknown command {cmd!r}")
