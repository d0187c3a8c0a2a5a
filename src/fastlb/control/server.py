"""The control socket's server side: one request line in, one reply out (runs in the control process).

It knows the control process only through the small `ControlTarget` protocol below, so this module
imports nothing of fastlb.runtime: the supervisor imports it, never the other way round.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from fastlb.control import MAX_REQUEST, MAX_WEIGHT, ControlError
from fastlb.fleet.announce import INSTANCE_COMMANDS, instance_request


class _Slot(Protocol):
    pool: str
    name: str
    weight: int
    admin: str


class _Backends(Protocol):
    def find(self, pool: str, backend: str) -> Any: ...
    def set_weight(self, slot: Any, weight: int) -> None: ...
    def set_admin(self, slot: Any, admin: str) -> None: ...


class _Routes(Protocol):
    def set_split(self, listener: str, route: str, weights: dict[str, int]) -> dict[str, int]: ...
    def split(self, listener: str, route: str) -> dict[str, int]: ...


class _Deploy(Protocol):
    def request(self, cmd: str, req: dict[str, Any]) -> dict[str, Any]: ...


class ControlTarget(Protocol):
    """What a control request can reach in the control process (fastlb.runtime.supervisor.Supervisor)."""

    backends: _Backends
    routes: _Routes
    deploy: _Deploy  # rollout-*, switch (fastlb.deploy.requests)

    def status(self) -> dict[str, Any]: ...
    def reload(self) -> dict[str, Any]: ...


MAX_NAME = 63  # config names are 1..63 bytes (FLB_NAME_LEN with its NUL)
ADMIN_FOR = {"drain": "drain", "enable": "ready", "disable": "maint"}
# Request keys whose value the control process runs as a command (a rollout's gate, through
# /bin/sh).  Only the config file and the control socket (0600, its owner) may give one: a remote
# request carrying one is refused (fastlb.fleet.admin passes remote=True).  A named [rollouts.NAME]
# table brings its own `check` from the config file, which stays allowed.
COMMAND_KEYS = ("check",)
DEPLOY_COMMANDS = (
    "rollout-start",
    "rollout-status",
    "rollout-pause",
    "rollout-resume",
    "rollout-promote",
    "rollout-abort",
    "switch",
)


def _find(sup: ControlTarget, req: dict[str, Any]) -> Any:
    pool, backend = req.get("pool"), req.get("backend")
    if not isinstance(pool, str) or not isinstance(backend, str):
        raise ControlError("'pool' and 'backend' must be strings")
    if len(pool) > MAX_NAME or len(backend) > MAX_NAME:
        raise ControlError(f"no such backend: pool and backend names are at most {MAX_NAME} characters")
    try:
        return sup.backends.find(pool, backend)
    except KeyError as exc:
        raise ControlError(exc.args[0]) from None


def _show(value: object, limit: int = 60) -> str:
    """A request value for an error message: its repr, cut to `limit` characters (a request may be
    64 KiB of one string, or nested to the edge of what the parser takes)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _set_split(sup: ControlTarget, req: dict[str, Any]) -> dict[str, Any]:
    listener, route, weights = req.get("listener"), req.get("route"), req.get("weights")
    if not isinstance(listener, str) or not isinstance(route, str):
        raise ControlError("'listener' and 'route' must be strings")
    if not isinstance(weights, dict) or not weights:
        raise ControlError("'weights' must be a non-empty object of pool -> weight")
    for pool, w in weights.items():
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
            raise ControlError(f"weight of pool {pool!r} must be an integer 0..{MAX_WEIGHT}, got {w!r}")
    try:
        previous = sup.routes.set_split(listener, route, weights)
    except (KeyError, ValueError) as exc:
        raise ControlError(str(exc.args[0]) if exc.args else "bad split") from None
    return {
        "ok": True,
        "listener": listener,
        "route": route,
        "weights": sup.routes.split(listener, route),
        "previous": previous,
    }


CHANGES = ("set-weight", *ADMIN_FOR, "set-split", *(c for c in DEPLOY_COMMANDS if c != "rollout-status"))


def handle_request(sup: ControlTarget, line: bytes, remote: bool = False) -> dict[str, Any]:
    """Apply one request line; never raises, never half-applies.  The reply of a runtime change
    that will not survive a restart (the state file cannot be written) carries a "warning".
    `remote`: it came through the admin API, which may not carry a command (COMMAND_KEYS)."""
    seen: list[str] = []
    reply = _handle(sup, line, seen, remote)
    if reply.get("ok") and seen and seen[0] in CHANGES:
        warning = getattr(sup, "persist_warning", lambda: None)()
        if warning:
            reply["warning"] = warning
    return reply


def _handle(sup: ControlTarget, line: bytes, seen: list[str], remote: bool) -> dict[str, Any]:
    try:
        if len(line) > MAX_REQUEST:
            raise ControlError("request too long")
        try:
            req = json.loads(line)
        except RecursionError:
            raise ControlError("request is nested too deeply") from None
        except ValueError:  # also bad UTF-8, and integers longer than int() takes
            raise ControlError("request is not JSON (one JSON object per line)") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ControlError("request must be a JSON object with a string 'cmd'")
        cmd = req["cmd"]
        seen.append(cmd)
        if remote:
            for key in COMMAND_KEYS:
                if key in req:
                    raise ControlError(
                        f"{key!r} (a shell command) is not accepted through the admin API: commands come only "
                        "from the config file ([rollouts.NAME] tables, started by name) or the local control socket"
                    )
        if cmd == "status":
            return {"ok": True, "status": sup.status()}
        if cmd == "set-weight":
            slot = _find(sup, req)
            w = req.get("weight")
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
                raise ControlError(f"weight must be an integer 0..{MAX_WEIGHT}, got {_show(w)}")
            old = slot.weight
            sup.backends.set_weight(slot, w)
            return {"ok": True, "pool": slot.pool, "backend": slot.name, "weight": w, "previous": old}
        if cmd in ADMIN_FOR:
            slot = _find(sup, req)
            old = slot.admin
            sup.backends.set_admin(slot, ADMIN_FOR[cmd])
            return {"ok": True, "pool": slot.pool, "backend": slot.name, "admin": slot.admin, "previous": old}
        if cmd == "set-split":
            return _set_split(sup, req)
        if cmd == "reload":
            return sup.reload()
        if cmd in INSTANCE_COMMANDS:  # drain-instance, undrain-instance (fleet/announce.py)
            return {"ok": True, **instance_request(sup, cmd)}
        if cmd in DEPLOY_COMMANDS:
            return {"ok": True, **sup.deploy.request(cmd, req)}
        raise ControlError(
            f"unknown command {_show(cmd)} (status, set-weight, drain, enable, disable, set-split, reload, "
            "drain-instance, undrain-instance)"
        )
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
