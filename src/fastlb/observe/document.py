"""Pieces of the status document (`fastlb status --json`, the control socket's `status` reply) that
turn shared-memory numbers into names: worker states, per-backend outcome counters, check runs.

Every field and state name is documented in docs/status.md; tests/test_status_doc.py holds the two
together.
"""

from __future__ import annotations

import time
from typing import Any

from fastlb.shm import WORKER_STATE_NAMES


def worker_status(w: dict[str, Any], index: int) -> dict[str, Any]:
    """One worker record with its state as a name and the age of its heartbeat."""
    out = dict(w, index=index)
    out["state"] = WORKER_STATE_NAMES.get(w["state"], f"unknown-{w['state']}")
    beat = w["heartbeat_ms"]
    out["heartbeat_age_ms"] = max(0, int(time.monotonic() * 1000) - beat) if beat else None
    return out


def listener_settings(li: dict[str, Any]) -> dict[str, Any]:
    """The settings the workers run a listener with now (a reload changes them in place)."""
    return {
        "connect_timeout_ms": li["connect_timeout_ms"],
        "idle_timeout_ms": li["idle_timeout_ms"],
        "max_connections": li["max_connections"],
        "backlog": li["backlog"],
        **keepalive_settings(li, "client_keepalive"),
    }


def keepalive_settings(rec: dict[str, Any], key: str) -> dict[str, Any]:
    """TCP keepalive (`key`: client_keepalive of a listener, backend_keepalive of a pool; None = off)
    and tcp_user_timeout_ms (0 = the kernel's default) as the workers apply them now (issue 21)."""
    keepalive = None
    if rec["ka_idle_s"]:
        keepalive = {"idle_s": rec["ka_idle_s"], "interval_s": rec["ka_interval_s"], "count": rec["ka_count"]}
    return {key: keepalive, "tcp_user_timeout_ms": rec["user_timeout_ms"]}


def check_status(check: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last active health check of a backend, or None when its pool has no health_check."""
    if check is None:
        return None
    done = check["last_check"] is not None
    return {
        "type": check["type"],
        "address": check["address"],
        "result": ("ok" if check["last_reason"] == "ok" else "failed") if done else "pending",
        "reason": check["last_reason"] or None,
        "time": check["last_check"],
        "duration_ms": round(check["last_duration"] * 1000, 3) if done else None,
        "checks": check["checks"],
        "consecutive_ok": check["consecutive_ok"],
        "consecutive_failures": check["consecutive_fail"],
    }


def backend_extras(b: dict[str, Any], slot: Any, check: dict[str, Any] | None) -> dict[str, Any]:
    """Backend fields beyond the original status: outcome counters, ejections, drains, last check."""
    return {
        "attempts": b["attempts"],
        "early_closes": b["early_closes"],
        "late_resets": b["late_resets"],
        "backend_first_closes": b["backend_first_closes"],
        "connect_time_sum_us": b["connect_time_sum_us"],
        "ejections": slot.ejections,
        "drains": slot.drains,
        "priority": slot.priority,
        "backup": slot.backup,
        "check": check_status(check),
    }


def refused(li: dict[str, Any]) -> dict[str, Any]:
    """A listener's `rejected` (every connection it refused) and `rejected_by`, from its
    shared-memory record: connections closed without a backend (the data plane's own `rejected`:
    no route, `sni_no_match = "reject"`, no pool of the split usable, no eligible backend, retries
    exhausted) plus the PROXY-protocol refusals, which are reset before any route is picked
    (untrusted senders; missing, malformed or cut-short headers).  max_connections refuses none:
    connections beyond it wait in the kernel's backlog (`paused_full` counts the pauses)."""
    by = {
        "no_backend": li["rejected"],
        "proxy_refused": li.get("proxy_refused", 0),
        "proxy_errors": li.get("proxy_errors", 0),
    }
    return {"rejected": sum(by.values()), "rejected_by": by}
