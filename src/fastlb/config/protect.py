"""Production protections (issue 21): the keys and their validation.

Priority groups: backend keys `priority = N` (lower first) and `backup = true` (the last group),
or the pool key `priorities = [["a", "b"], ["c"]]` (group by group, first = preferred).

TCP keepalive and user timeout on both sides: listener keys `client_keepalive` and
`tcp_user_timeout`, pool keys `backend_keepalive` and `tcp_user_timeout`.  loader.py calls
`listener_protect_fields` / `pool_protect_fields` and passes what they return to the dataclasses.
"""

from __future__ import annotations

from dataclasses import replace

from fastlb.config.model import BACKUP_PRIORITY, MAX_PRIORITY, BackendConfig, KeepaliveConfig
from fastlb.config.values import _describe, _fmt_seconds, _quote, _Table

LISTENER_KEYS = ("client_keepalive", "tcp_user_timeout")
POOL_KEYS = ("backend_keepalive", "tcp_user_timeout", "priorities")
BACKEND_KEYS = ("priority", "backup")
KEEPALIVE_KEYS = ("idle", "interval", "count")
MAX_KEEPALIVE_SECONDS = 32767  # Linux MAX_TCP_KEEPIDLE / MAX_TCP_KEEPINTVL
MAX_KEEPALIVE_COUNT = 127  # Linux MAX_TCP_KEEPCNT
MAX_USER_TIMEOUT = 86400.0  # one day of milliseconds; TCP_USER_TIMEOUT takes an int


def listener_protect_fields(t: _Table) -> dict:
    """client_keepalive and tcp_user_timeout of one [listeners.NAME] table (TCP only), as
    ListenerConfig keyword arguments."""
    return {
        "client_keepalive": _keepalive(t, "client_keepalive"),
        "tcp_user_timeout": _user_timeout(t),
    }


def pool_protect_fields(t: _Table) -> dict:
    """backend_keepalive and tcp_user_timeout of one [pools.NAME] table, as PoolConfig keywords."""
    return {
        "backend_keepalive": _keepalive(t, "backend_keepalive"),
        "tcp_user_timeout": _user_timeout(t),
    }


def _keepalive(parent: _Table, name: str) -> KeepaliveConfig | None:
    """`name = { idle = "60s", interval = "10s", count = 6 }` (each key optional, these are the
    defaults); `name = false` or a missing key: off.  One ConfigError per problem."""
    if name not in parent.data or parent.data[name] is False:
        return None
    raw = parent.data[name]
    if raw is True:
        return KeepaliveConfig()
    if not isinstance(raw, dict):
        raise parent.error(
            name,
            f'expected a table like {{ idle = "60s", interval = "10s", count = 6 }}, got {_describe(raw)}',
        )
    t = _Table(raw, parent.key(name), parent.file)
    t.only(KEEPALIVE_KEYS)
    d = KeepaliveConfig()
    return KeepaliveConfig(
        idle=_whole_seconds(t, "idle", d.idle),
        interval=_whole_seconds(t, "interval", d.interval),
        count=t.get_int("count", d.count, 1, MAX_KEEPALIVE_COUNT),
    )


def _whole_seconds(t: _Table, name: str, default: int) -> int:
    seconds = t.get_duration(name, float(default))
    if seconds != int(seconds) or not 1 <= seconds <= MAX_KEEPALIVE_SECONDS:
        raise t.error(
            name,
            f"{_fmt_seconds(seconds)} is not a whole number of seconds from 1s to {MAX_KEEPALIVE_SECONDS}s"
            " (the kernel counts keepalive times in seconds)",
        )
    return int(seconds)


def _user_timeout(t: _Table) -> float:
    seconds = t.get_duration("tcp_user_timeout", 0.0)
    if seconds > MAX_USER_TIMEOUT:
        raise t.error("tcp_user_timeout", f"{_fmt_seconds(seconds)} is longer than the limit of 1 day")
    if 0 < seconds < 0.001:
        raise t.error("tcp_user_timeout", "must be at least 1ms (0 = the kernel's default)")
    return seconds


def keepalive_record(keepalive: KeepaliveConfig | None, user_timeout: float) -> tuple[int, int, int, int]:
    """(idle_s, interval_s, count, user_timeout_ms) as the listener / pool records hold them
    (Region.set_listener_keepalive / set_pool_keepalive); idle_s = 0: keepalive off."""
    ms = round(user_timeout * 1000)
    if keepalive is None:
        return (0, 0, 0, ms)
    return (keepalive.idle, keepalive.interval, keepalive.count, ms)


def backend_priority(t: _Table) -> dict:
    """`priority` and `backup` of one backend table, as BackendConfig keywords."""
    backup = t.get_bool("backup", False)
    if backup and "priority" in t.data:
        raise t.error(
            "priority", "a backup is the last priority group: set priority or backup = true, not both"
        )
    if backup:
        return {"priority": BACKUP_PRIORITY, "backup": True}
    return {"priority": t.get_int("priority", 0, 0, MAX_PRIORITY)}


def pool_priorities(pool: _Table, backends: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
    """The pool key `priorities = [["a", "b"], ["c"]]`: group k (from 0) is priority k.  Every
    backend that is not `backup = true` must be in exactly one group; backends may then not set
    `priority` themselves.  Returns the backends with their priorities set."""
    if "priorities" not in pool.data:
        return backends
    raw = pool.data["priorities"]
    key = pool.key("priorities")
    if not isinstance(raw, list) or not raw or not all(isinstance(g, list) and g for g in raw):
        raise pool.error(
            "priorities",
            f'expected non-empty arrays of backend names, like [["a", "b"], ["c"]], got {_describe(raw)}',
        )
    if len(raw) > MAX_PRIORITY + 1:
        raise pool.error("priorities", f"{len(raw)} groups; the limit is {MAX_PRIORITY + 1}")
    by_name = {b.name: b for b in backends}
    group_of: dict[str, int] = {}
    for k, group in enumerate(raw):
        for name in group:
            where = f"{key}[{k}]"
            if not isinstance(name, str) or name not in by_name:
                raise pool.error(
                    "priorities",
                    f"{where}: {_describe(name)} is not a backend of this pool"
                    f" (backends: {', '.join(by_name)})",
                )
            if name in group_of:
                raise pool.error(
                    "priorities", f"{where}: backend {_quote(name)} is already in group {group_of[name]}"
                )
            if by_name[name].backup:
                raise pool.error(
                    "priorities", f"{where}: backend {_quote(name)} is a backup (the last group already)"
                )
            group_of[name] = k
    out = []
    for i, b in enumerate(backends):
        if b.backup:
            out.append(b)
            continue
        if b.name not in group_of:
            raise pool.error(
                "priorities", f"backend {_quote(b.name)} is in no group (list it, or give it backup = true)"
            )
        if "priority" in (pool.data.get("backends") or [{}] * (i + 1))[i]:
            raise pool.error(
                "priorities",
                f"backend {_quote(b.name)} sets priority too: use the pool's priorities or the backend key",
            )
        out.append(replace(b, priority=group_of[b.name]))
    return tuple(out)
