"""Production protections (issue 21): the keys and their validation.

TCP keepalive and user timeout on both sides: listener keys `client_keepalive` and
`tcp_user_timeout`, pool keys `backend_keepalive` and `tcp_user_timeout`.  loader.py calls
`listener_protect_fields` / `pool_protect_fields` and passes what they return to the dataclasses.
"""

from __future__ import annotations

from fastlb.config.model import KeepaliveConfig
from fastlb.config.values import _describe, _fmt_seconds, _Table

LISTENER_KEYS = ("client_keepalive", "tcp_user_timeout")
POOL_KEYS = ("backend_keepalive", "tcp_user_timeout")
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
