"""Typed readers for configuration values: durations, addresses, names, and the `_Table` getter
that turns every wrong type or value into one ConfigError line."""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from fastlb.config.model import (
    MAX_DURATION,
    MAX_NAME_BYTES,
    MIN_TIMEOUT,
    Address,
    ConfigError,
)


def parse_duration(value: object, key: str, file: str) -> float:
    """Seconds from "500ms" / "2s" / "5m" / "1h" / "1.5s" or a plain int/float of seconds.

    Rejects booleans, negatives, NaN/inf, unit-less strings and anything above MAX_DURATION (30 days).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(file, key, f'expected a duration like "2s" or "500ms", got {_describe(value)}')
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None:
            if value.startswith("-"):
                raise ConfigError(file, key, f"duration {_quote(value)} must not be negative")
            raise ConfigError(
                file,
                key,
                f"invalid duration {_quote(value)}: use a number and a unit (ms, s, m, h), "
                'e.g. "500ms", "2s", "1.5s", "5m", "1h"',
            )
        number, unit = float(m.group(1)), m.group(2)
        seconds = number / 1000.0 if unit == "ms" else number * _UNIT_SECONDS[unit]
    elif isinstance(value, int):
        seconds = float(value) if abs(value) <= MAX_DURATION else math.copysign(math.inf, value)
    else:
        seconds = value
    if math.isnan(seconds):
        raise ConfigError(file, key, "duration must be a number, not nan")
    if seconds < 0:
        raise ConfigError(file, key, f"duration {_show(value)} must not be negative")
    if seconds > MAX_DURATION:
        raise ConfigError(file, key, f"duration {_show(value)} is too long (at most 720h, i.e. 30 days)")
    return seconds


def parse_address(value: object, key: str, file: str) -> Address:
    """An Address from "127.0.0.1:8080", "[::1]:8080" or "localhost:8080" (= 127.0.0.1). No DNS."""
    if not isinstance(value, str):
        raise ConfigError(
            file, key, f'expected an address string like "127.0.0.1:8080", got {_describe(value)}'
        )
    shown = _quote(value)
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ConfigError(file, key, f"address {shown} has '[' without ']'")
        host_text, rest = value[1:end], value[end + 1 :]
        if not rest:
            raise ConfigError(file, key, f'address {shown} has no port (expected "[host]:port")')
        if not rest.startswith(":"):
            raise ConfigError(file, key, f"address {shown}: expected ':port' after ']'")
        port_text = rest[1:]
        ip = _ip_literal(host_text, key, file, shown)
        if ip.version != 6:
            raise ConfigError(
                file, key, f"address {shown}: brackets are only for IPv6; write {ip}:{port_text}"
            )
    else:
        host_text, sep, port_text = value.rpartition(":")
        if not sep:
            raise ConfigError(
                file, key, f'address {shown} has no port (expected "host:port", e.g. "127.0.0.1:80")'
            )
        if ":" in host_text:
            raise ConfigError(
                file, key, f'address {shown}: put IPv6 addresses in brackets, e.g. "[::1]:8080"'
            )
        ip = _ip_literal(host_text, key, file, shown)
    port = _port_number(port_text, key, file, shown)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return Address(host=str(ip), port=port, family=family)


# ---------------------------------------------------------------------------------------------------------
# Sections


# ---------------------------------------------------------------------------------------------------------
# Helpers


_MISSING: Any = object()


class _Table:
    """One TOML table under validation: its dotted path, and typed getters that raise ConfigError."""

    __slots__ = ("data", "path", "file")

    def __init__(self, data: object, path: str, file: str, what: str = "a table") -> None:
        if not isinstance(data, dict):
            raise ConfigError(file, path or "(root)", f"expected {what}, got {_describe(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self.file = file

    def key(self, name: str) -> str:
        return _join(self.path, name)

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def only(self, allowed: Sequence[str], elsewhere: Mapping[str, str] | None = None) -> None:
        """Reject the first key not in `allowed`; `elsewhere` explains keys that are valid in other contexts."""
        for name in self.data:
            if name in allowed:
                continue
            if elsewhere and name in elsewhere:
                raise self.error(
                    name, f"{_quote(name)} {elsewhere[name]}; allowed here: {', '.join(allowed)}"
                )
            hint = _did_you_mean(name, allowed)
            raise self.error(name, f"unknown key {_quote(name)}{hint}; allowed keys: {', '.join(allowed)}")

    def required(self, name: str, hint: str = "") -> Any:
        if name not in self.data:
            raise self.error(name, f"missing required key{hint}")
        return self.data[name]

    def get_int(self, name: str, default: int, low: int, high: int) -> int:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            raise self.error(name, f"{value} is out of range {low}..{high}")
        return value

    def get_bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {_describe(value)}")
        return value

    def get_str(self, name: str, default: str) -> str:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {_describe(value)}")
        return value

    def get_choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(name, f"expected one of {', '.join(choices)} (a string), got {_describe(value)}")
        if value not in choices:
            hint = _did_you_mean(value, choices)
            raise self.error(
                name, f"unknown {name} {_quote(value)}{hint}; choose one of: {', '.join(choices)}"
            )
        return value

    def get_duration(self, name: str, default: float, positive: bool = False) -> float:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            return default
        seconds = parse_duration(value, self.key(name), self.file)
        if positive and seconds < MIN_TIMEOUT:
            raise self.error(name, f"duration {_show(value)} is too short: it must be at least 1ms")
        return seconds


_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_STATUS_RE = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")
_HTTP_PATH_RE = re.compile(r"/[!-~]*")
_HTTP_TOKEN_RE = re.compile(r"[!-~]+")


def _check_name(name: object, key: str, file: str, what: str) -> None:
    """Names: 1..63 bytes of [A-Za-z0-9_.:-] (they are copied into shared memory and shown in logs)."""
    if not isinstance(name, str):
        raise ConfigError(file, key, f"expected a {what} name (a string), got {_describe(name)}")
    if not name:
        raise ConfigError(file, key, f"{what} name is empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise ConfigError(file, key, f"{what} name is {size} bytes long; the limit is {MAX_NAME_BYTES}")
    if not _NAME_RE.fullmatch(name):
        bad = "".join(sorted({c for c in name if not _NAME_RE.fullmatch(c)}))
        raise ConfigError(
            file,
            key,
            f"{what} name {_quote(name)} contains {_quote(bad)}; use only letters, digits and _ . : -",
        )


def _ip_literal(text: str, key: str, file: str, shown: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if text.lower() == "localhost":
        return ipaddress.IPv4Address("127.0.0.1")
    if not text:
        raise ConfigError(file, key, f"address {shown} has no host (use 0.0.0.0 or [::] for all addresses)")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(
            file,
            key,
            f"address {shown}: {_quote(text)} is not an IP address (only IP literals and localhost; no DNS)",
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ConfigError(file, key, f"address {shown}: zone ids (%{ip.scope_id}) are not supported")
    return ip


def _port_number(text: str, key: str, file: str, shown: str) -> int:
    if not text:
        raise ConfigError(file, key, f"address {shown} has no port")
    if not _PORT_RE.fullmatch(text):
        raise ConfigError(file, key, f"address {shown}: port {_quote(text)} is not a number in 1..65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ConfigError(file, key, f"address {shown}: port {port} is out of range 1..65535")
    return port


def _check_host(value: object, key: str, file: str) -> str:
    """A health-check host: an IP literal (IPv6 with or without brackets) or localhost; normalised, no brackets."""
    if not isinstance(value, str):
        raise ConfigError(file, key, f'expected an IP address string like "10.0.0.5", got {_describe(value)}')
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if text.count(":") == 1:
        raise ConfigError(file, key, f"{_quote(value)}: give only the host here; the port goes in 'port'")
    return str(_ip_literal(text, key, file, _quote(value)))


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def _join(path: str, name: str) -> str:
    """Dotted key path; segments that are not bare TOML keys are quoted, as TOML would need them."""
    seg = name if _BARE_KEY_RE.fullmatch(name) else _quote(name, limit=80)
    return f"{path}.{seg}" if path else seg


def _quote(text: str, limit: int = 60) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    return json.dumps(text, ensure_ascii=False)


def _show(value: object) -> str:
    return _quote(value) if isinstance(value, str) else repr(value)


def _describe(value: object) -> str:
    """The TOML name of a value's type, with the value when it is short."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})" if abs(value) < 10**18 else "an integer"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({_quote(value, limit=40)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # datetime, date, time


def _did_you_mean(word: str, choices: Sequence[str] | Mapping[str, object]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {_quote(close[0])}?)" if close else ""


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"
