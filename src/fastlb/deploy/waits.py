"""Waiting on a running fastlb from the outside (the CLI and scripts/rolling-update): poll its status
through the control socket until a backend reaches a state, or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

POLL = 0.1  # seconds between status requests


@dataclass
class WaitResult:
    ok: bool
    backend: dict[str, Any]  # the backend's last status record
    pool: dict[str, Any]  # its pool's last status record (without "backends")


def backend_record(client: Any, pool: str, backend: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backend record, pool record) from one status request; KeyError (one line) if unknown."""
    st = client.status()
    for p in st["pools"]:
        if p["name"] != pool:
            continue
        for b in p["backends"]:
            if b["name"] == backend and not b.get("removed"):
                return b, {k: v for k, v in p.items() if k != "backends"}
        raise KeyError(f"unknown backend {backend!r} in pool {pool!r}")
    raise KeyError(f"unknown pool {pool!r}")


def wait_for(
    client: Any,
    pool: str,
    backend: str,
    done: Callable[[dict[str, Any], dict[str, Any]], bool],
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WaitResult:
    end = clock() + timeout
    while True:
        b, p = backend_record(client, pool, backend)
        if done(b, p):
            return WaitResult(True, b, p)
        if clock() >= end:
            return WaitResult(False, b, p)
        sleep(min(POLL, max(0.0, end - clock())))


def drained(b: dict[str, Any], p: dict[str, Any]) -> bool:
    """The backend holds no connection."""
    return b["active"] <= 0


def healthy_since(start_checks: int, ramped: bool) -> Callable[[dict[str, Any], dict[str, Any]], bool]:
    """The backend is up after its rise checks: health "up" and, when the pool has health checks,
    at least `rise` consecutive passing checks that all ran after the wait began (so a backend that
    was just restarted is not taken as healthy on an old verdict).  ramped: also its slow-start ramp
    is over (effective weight == weight)."""

    def done(b: dict[str, Any], p: dict[str, Any]) -> bool:
        if b["health"] != "up":
            return False
        rise = max(1, p.get("rise", 0)) if p.get("rise", 0) else 0
        if rise and (b.get("checks_ok", 0) < rise or b.get("checks", 0) - start_checks < rise):
            return False
        return not ramped or b["effective_weight"] >= b["weight"]

    return done
