"""`[rollouts.NAME]` tables: canary rollouts defined in the config file, started by name with
`fastlb rollout start NAME` (command-line options override the table).  The same value readers
serve the command line (fastlb.deploy.cli), so a key means the same in both places.

  [rollouts.web-v2]
  listener = "web"            route = "default"         to = "v2"        from = "v1" (optional)
  steps = [5, 10, 25, 50, 100]  interval = "30s"        pause_at = [25]  threshold = 2
  max_failure_rate = "1%"     max_early_reset_rate = "1%"   max_reset_rate = "1%"   max_unhealthy = "0%"
  max_connect_time = "50ms"   min_connections = 10      check = "curl -fsS http://..."  check_timeout = "10s"

Rates are percentages: "1%", "0.5%", or a number (1 = 1%); "off" turns a gate off.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from fastlb.config.model import ConfigError
from fastlb.config.values import _describe, _quote, _Table, parse_duration

ROLLOUT_KEYS = (
    "listener",
    "route",
    "to",
    "from",
    "steps",
    "interval",
    "pause_at",
    "threshold",
    "max_failure_rate",
    "max_early_reset_rate",
    "max_reset_rate",
    "max_unhealthy",
    "max_connect_time",
    "min_connections",
    "check",
    "check_timeout",
)
RATE_KEYS = ("max_failure_rate", "max_early_reset_rate", "max_reset_rate", "max_unhealthy")
MAX_STEPS = 100
MAX_THRESHOLD = 100
MAX_MIN_CONNECTIONS = 1_000_000_000
_PERCENT_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*%?\s*")


@dataclass(frozen=True)
class RolloutConfig:
    """One [rollouts.NAME] table: only the keys the file sets (the rest take the defaults of
    fastlb.deploy.rollout / gates when the rollout starts)."""

    name: str
    options: tuple[tuple[str, Any], ...]  # (key, parsed value), keys of ROLLOUT_KEYS

    def as_dict(self) -> dict[str, Any]:
        return dict(self.options)


def parse_percent(value: object, key: str, file: str) -> float | None:
    """A rate as a fraction: "1%" / "0.5%" / 1 (= 1%) -> 0.01; "off" -> None."""
    if value == "off":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(file, key, f'expected a percentage like "1%" or "off", got {_describe(value)}')
    if isinstance(value, str):
        m = _PERCENT_RE.fullmatch(value)
        if m is None:
            raise ConfigError(
                file, key, f'invalid percentage {_quote(value)}: use e.g. "1%", "0.5%" or "off"'
            )
        pct = float(m.group(1))
    else:
        pct = float(value)
    if math.isnan(pct) or not 0 <= pct <= 100:
        raise ConfigError(file, key, f"percentage {value!r} must be within 0..100")
    return pct / 100.0


def parse_steps(value: object, key: str, file: str, allow_empty: bool = False) -> tuple[int, ...]:
    """[5, 10, 100] or "5,10,100" -> (5, 10, 100): increasing percentages 1..100."""
    if isinstance(value, str):
        parts = [p.strip().rstrip("%") for p in value.split(",") if p.strip()]
        try:
            items: list[Any] = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                file, key, f"expected comma-separated percentages, got {_quote(value)}"
            ) from None
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(file, key, f"expected a list of percentages, got {_describe(value)}")
    if not items and not allow_empty:
        raise ConfigError(file, key, "needs at least one step")
    if len(items) > MAX_STEPS:
        raise ConfigError(file, key, f"{len(items)} steps; the limit is {MAX_STEPS}")
    for s in items:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100:
            raise ConfigError(file, key, f"a step is a percentage 1..100, got {_describe(s)}")
    if items != sorted(set(items)):
        raise ConfigError(file, key, f"steps must increase, got {items}")
    return tuple(items)


def parse_option(key: str, value: object, where: str, file: str) -> Any:
    """One rollout option, checked and converted (durations to seconds, rates to fractions)."""
    t = _Table({key: value}, where, file)
    k = t.key(key)
    if key in ("listener", "route", "to", "from", "check"):
        s = t.get_str(key, "")
        if not s:
            raise ConfigError(file, k, "must not be empty")
        return s
    if key == "steps":
        steps = parse_steps(value, k, file)
        if steps[-1] != 100:
            raise ConfigError(file, k, f"the last step must be 100 (it promotes), got {steps[-1]}")
        return steps
    if key == "pause_at":
        return parse_steps(value, k, file, allow_empty=True)
    if key in ("interval", "check_timeout"):
        seconds = parse_duration(value, k, file)
        if seconds < 0.1:
            raise ConfigError(file, k, "must be at least 100ms")
        return seconds
    if key == "max_connect_time":
        return None if value == "off" else parse_duration(value, k, file)
    if key in RATE_KEYS:
        return parse_percent(value, k, file)
    if key == "threshold":
        return t.get_int(key, 2, 1, MAX_THRESHOLD)
    if key == "min_connections":
        return t.get_int(key, 10, 0, MAX_MIN_CONNECTIONS)
    raise ConfigError(file, k, f"unknown key {_quote(key)}; allowed keys: {', '.join(ROLLOUT_KEYS)}")


def parse_rollouts(root: _Table, file: str, listeners: dict, pools: dict) -> dict[str, RolloutConfig]:
    if "rollouts" not in root.data:
        return {}
    section = _Table(root.data["rollouts"], "rollouts", file, "a table of [rollouts.NAME] tables")
    out: dict[str, RolloutConfig] = {}
    for name, data in section.data.items():
        path = section.key(name)
        t = _Table(data, path, file)
        t.only(ROLLOUT_KEYS)
        for req in ("listener", "route", "to"):
            t.required(req)
        opts = {k: parse_option(k, v, path, file) for k, v in t.data.items()}
        if opts["listener"] not in listeners:
            raise t.error("listener", f"unknown listener {_quote(opts['listener'])}")
        for k in ("to", "from"):
            if k in opts and opts[k] not in pools:
                raise t.error(k, f"unknown pool {_quote(opts[k])}")
        routes = getattr(listeners[opts["listener"]], "routes", None)
        if routes is not None and opts["route"] not in {r.name for r in routes}:
            raise t.error("route", f"listener {opts['listener']} has no route {_quote(opts['route'])}")
        bad = [p for p in opts.get("pause_at", ()) if p not in opts.get("steps", (5, 10, 25, 50, 100))]
        if bad:
            raise t.error("pause_at", f"{bad[0]} is not one of the steps")
        out[name] = RolloutConfig(name, tuple(opts.items()))
    return out
