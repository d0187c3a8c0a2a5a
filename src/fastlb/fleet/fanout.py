"""`fastlb fleet -f hosts.txt OPERATION ...`: one operation applied to every instance of a fleet,
in parallel, reported per instance.

hosts.txt: one admin URL per line (`http://10.0.0.1:9091`), `#` comments and blank lines ignored.
The operations are the control socket's: status, set-weight, drain, enable, disable, set-split,
reload (and any other command name, with KEY=VALUE arguments passed through as JSON fields).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastlb.control import ControlError
from fastlb.fleet.client import AdminClient


class UsageError(ValueError):
    """The operation's words are off (the message says how they go)."""


def read_hosts(path: str) -> list[str]:
    hosts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                hosts.append(line if "://" in line else f"http://{line}")
    if not hosts:
        raise UsageError(f"{path}: no hosts (one admin URL per line)")
    return hosts


def build_request(op: str, args: Sequence[str]) -> dict[str, Any]:
    """The control request for `op ARGS` as the single-instance commands spell it."""
    if op == "status":
        _arity(op, args, 0, "")
        return {"cmd": "status"}
    if op == "set-weight":
        _arity(op, args, 3, "POOL BACKEND WEIGHT")
        try:
            weight = int(args[2], 10)
        except ValueError:
            raise UsageError(f"set-weight: weight must be an integer, got {args[2]!r}") from None
        return {"cmd": "set-weight", "pool": args[0], "backend": args[1], "weight": weight}
    if op in ("drain", "enable", "disable"):
        _arity(op, args, 2, "POOL BACKEND")
        return {"cmd": op, "pool": args[0], "backend": args[1]}
    if op == "set-split":
        if len(args) < 3:
            raise UsageError("set-split: LISTENER ROUTE POOL=WEIGHT...")
        return {"cmd": "set-split", "listener": args[0], "route": args[1], "weights": _weights(args[2:])}
    if op == "reload":
        _arity(op, args, 0, "")
        return {"cmd": "reload"}
    fields: dict[str, Any] = {"cmd": op}
    for a in args:
        key, sep, value = a.partition("=")
        if not sep:
            raise UsageError(f"{op}: arguments go as KEY=VALUE (VALUE is JSON or a plain string), got {a!r}")
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    return fields


def _arity(op: str, args: Sequence[str], n: int, usage: str) -> None:
    if len(args) != n:
        raise UsageError(f"{op} takes {usage or 'no arguments'}")


def _weights(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        pool, sep, w = item.partition("=")
        if not sep or not w.isdigit():
            raise UsageError(f"set-split: expected POOL=WEIGHT, got {item!r}")
        out[pool] = int(w)
    return out


def summary(op: str, reply: dict[str, Any]) -> str:
    """One line for one instance's successful reply."""
    if op == "status":
        st = reply["status"]
        parts = []
        for p in st.get("pools", []):
            states = ",".join(f"{b['name']}={b['state']}/{b['weight']}" for b in p.get("backends", []))
            parts.append(f"{p['name']}[{states}]")
        return f"pid {st.get('pid')} generation {st.get('generation')} " + " ".join(parts)
    shown = {k: v for k, v in reply.items() if k not in ("ok", "status")}
    return json.dumps(shown, sort_keys=True)


def apply(
    hosts: Sequence[str],
    request: dict[str, Any],
    token: str | None,
    timeout: float,
    cafile: str | None = None,
) -> list[tuple[str, dict[str, Any] | None, str | None]]:
    """Send `request` to every host at once; [(host, reply or None, error or None)] in hosts order."""

    def one(host: str) -> tuple[str, dict[str, Any] | None, str | None]:
        try:
            return host, AdminClient(host, token, timeout, cafile).request(request), None
        except ControlError as exc:
            return host, None, str(exc)

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        return list(pool.map(one, hosts))
