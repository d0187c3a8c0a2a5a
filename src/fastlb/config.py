"""The fastlb configuration: a TOML file read into frozen dataclasses, with every default and every check.

Contract: `load_config` / `parse_config` either return a fully validated `Config` or raise exactly one
`ConfigError` whose str() is one line, "FILE: dotted.key: problem in plain words".  Nothing else escapes
(no KeyError, no TypeError, no traceback for the operator).  Stdlib only: the CLI imports this without the
compiled data plane.

Limits come from the shared-memory layout (includes/shm_layout.h): names fit FLB_NAME_LEN with its NUL,
timeouts are stored as uint32 milliseconds, weights are 0..1000.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALGORITHMS",
    "Address",
    "BackendConfig",
    "Config",
    "ConfigError",
    "GlobalConfig",
    "HealthCheckConfig",
    "ListenerConfig",
    "OutlierConfig",
    "PoolConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_duration",
]

# Order matches enum flb_algorithm in shm_layout.h: ALGORITHMS.index(name) is the C value.
ALGORITHMS = (
    "round_robin",
    "weighted_round_robin",
    "least_conn",
    "random",
    "p2c",
    "maglev",
    "ring_hash",
    "least_response_time",
)
# alias -> (algorithm, hash_key it implies)
ALGORITHM_ALIASES = {"source_hash": ("maglev", "source_ip")}
HASH_KEYS = ("source_ip", "source_ip_port", "four_tuple")  # enum flb_hash_key order
HEALTH_CHECK_TYPES = ("tcp", "http", "send_expect")
ALL_DOWN_POLICIES = ("reject", "panic")  # enum flb_all_down order
LOG_LEVELS = ("debug", "info", "warning", "error")

MAX_LISTENERS = 64
MAX_POOLS = 64
MAX_BACKENDS = 4096  # in all pools together
MAX_NAME_BYTES = 63  # FLB_NAME_LEN (64) minus the NUL
MAX_WEIGHT = 1000
MAX_WORKERS = 256
MAX_RETRIES = 10
MAX_MAX_CONNECTIONS = 10_000_000
MAX_THRESHOLD = 1000  # rise, fall, consecutive_failures
MIN_MAGLEV_TABLE_SIZE = 100
MAX_MAGLEV_TABLE_SIZE = 5_000_011  # Envoy's bound; two uint32 buffers per pool in shared memory
MAX_RING_VNODES = 1000
MAX_DURATION = 30 * 86400.0  # seconds; uint32 milliseconds would overflow at ~49.7 days
MIN_TIMEOUT = 0.001  # timeouts are stored in whole milliseconds: below 1ms would become "0"
MAX_SUN_PATH = 107  # sizeof(sockaddr_un.sun_path) minus the NUL
MAX_FILE_BYTES = 16 * 1024 * 1024


def _default_workers() -> int:
    """CPUs this process may run on (honours taskset/cpusets, unlike os.cpu_count()), clamped to 1..256."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


# ---------------------------------------------------------------------------------------------------------
# The public types


class ConfigError(Exception):
    """A configuration problem: str(exc) == f"{file}: {key}: {problem}", always one printable line."""

    file: str
    key: str
    problem: str

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(file, key, problem)  # args mirror the signature, so it pickles
        self.file = file
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return _one_line(f"{self.file}: {self.key}: {self.problem}")


@dataclass(frozen=True)
class Address:
    """An IP literal and port. `host` has no brackets; `family` is socket.AF_INET or socket.AF_INET6."""

    host: str
    port: int
    family: int

    def sockaddr(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """The address tuple socket.bind()/connect() take for this family."""
        if self.family == socket.AF_INET6:
            return (self.host, self.port, 0, 0)
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackendConfig:
    name: str
    address: Address
    weight: int = 1  # 0..1000; 0 = no new connections


@dataclass(frozen=True)
class HealthCheckConfig:
    type: str  # "tcp" | "http" | "send_expect"
    interval: float = 2.0
    timeout: float = 1.0  # <= interval; the loader uses min(1s, interval) when the file leaves it out
    rise: int = 2
    fall: int = 3
    port: int | None = None  # check this port instead of the backend's
    address: str | None = None  # check this IP literal instead of the backend's
    send: bytes = b""  # send_expect: UTF-8 of the TOML string
    expect: bytes = b""  # send_expect: required, non-empty
    path: str = "/"  # http
    host: str | None = None  # http Host header; None = the address checked
    expect_status: tuple[int, int] = (200, 399)  # http, inclusive range
    expect_body: str | None = None  # http: substring the body must contain


@dataclass(frozen=True)
class OutlierConfig:
    """Passive ejection, Envoy semantics: eject after N consecutive connect failures."""

    consecutive_failures: int = 5  # 0 = disabled
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 50  # 0..100


@dataclass(frozen=True)
class PoolConfig:
    name: str
    algorithm: str
    backends: tuple[BackendConfig, ...]
    retries: int = 2
    hash_key: str = "source_ip"
    maglev_table_size: int = 65537
    ring_vnodes: int = 160
    slow_start: float = 0.0
    all_down: str = "reject"
    drain_timeout: float = 300.0
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierConfig = OutlierConfig()


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    max_connections: int = 0  # 0 = unlimited
    backlog: int = 4096


@dataclass(frozen=True)
class GlobalConfig:
    workers: int = field(default_factory=_default_workers)
    control_socket: str = "/run/fastlb/control.sock"
    shutdown_timeout: float = 30.0
    log_level: str = "info"


@dataclass(frozen=True)
class Config:
    file: str
    global_: GlobalConfig
    listeners: dict[str, ListenerConfig]  # file order
    pools: dict[str, PoolConfig]  # file order


# ---------------------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the file at `path`. Raises ConfigError (key "(file)" if it cannot be read)."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(file, "(file)", f"cannot read the file: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, "(file)", f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8-sig")  # -sig: a BOM from a Windows editor is not a syntax error
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "(file)", f"not valid UTF-8 (byte {exc.start})") from None
    return parse_config(text, file)


def parse_config(text: str, file: str = "<string>") -> Config:
    """Parse and validate TOML text; `file` only names the source in errors. Raises ConfigError."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", f"invalid TOML: {exc}") from None
    root = _Table(doc, "", file)
    root.only(("global", "listeners", "pools"))
    global_ = _global(root.data.get("global", {}), file)
    listeners = _listeners(root, file)
    pools = _pools(root, file)
    for lst in listeners.values():
        if lst.pool not in pools:
            defined = ", ".join(pools) if pools else "none"
            raise ConfigError(
                file,
                _join(_join("listeners", lst.name), "pool"),
                f"unknown pool {_quote(lst.pool)}{_did_you_mean(lst.pool, pools)}; defined pools: {defined}",
            )
    return Config(file=file, global_=global_, listeners=listeners, pools=pools)


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


_GLOBAL_KEYS = ("workers", "control_socket", "shutdown_timeout", "log_level")
_LISTENER_KEYS = ("bind", "pool", "connect_timeout", "idle_timeout", "max_connections", "backlog")
_POOL_KEYS = (
    "algorithm",
    "backends",
    "retries",
    "hash_key",
    "maglev_table_size",
    "ring_vnodes",
    "slow_start",
    "all_down",
    "drain_timeout",
    "health_check",
    "outlier_detection",
)
_BACKEND_KEYS = ("name", "address", "weight")
_OUTLIER_KEYS = ("consecutive_failures", "base_ejection_time", "max_ejection_percent")
_HEALTH_COMMON_KEYS = ("type", "interval", "timeout", "rise", "fall", "port", "address")
_HEALTH_TYPE_KEYS = {
    "tcp": (),
    "http": ("path", "host", "expect_status", "expect_body"),
    "send_expect": ("send", "expect"),
}


def _global(data: object, file: str) -> GlobalConfig:
    t = _Table(data, "global", file)
    t.only(_GLOBAL_KEYS)
    d = GlobalConfig()
    workers = t.get_int("workers", d.workers, 1, MAX_WORKERS)
    sock = t.get_str("control_socket", d.control_socket)
    if not sock.startswith("/"):
        raise t.error("control_socket", f"{_quote(sock)} must be an absolute path")
    if "\0" in sock:
        raise t.error("control_socket", "path contains a NUL character")
    if len(sock.encode("utf-8", "surrogatepass")) > MAX_SUN_PATH:
        raise t.error("control_socket", f"path is longer than {MAX_SUN_PATH} bytes (the unix socket limit)")
    return GlobalConfig(
        workers=workers,
        control_socket=sock,
        shutdown_timeout=t.get_duration("shutdown_timeout", d.shutdown_timeout),
        log_level=t.get_choice("log_level", d.log_level, LOG_LEVELS),
    )


def _listeners(root: _Table, file: str) -> dict[str, ListenerConfig]:
    if "listeners" not in root.data:
        raise ConfigError(
            file, "listeners", "no listeners defined; add a [listeners.NAME] table with bind and pool"
        )
    section = _Table(root.data["listeners"], "listeners", file, "a table of [listeners.NAME] tables")
    if not section.data:
        raise ConfigError(
            file, "listeners", "no listeners defined; add a [listeners.NAME] table with bind and pool"
        )
    if len(section.data) > MAX_LISTENERS:
        raise ConfigError(file, "listeners", f"{len(section.data)} listeners; the limit is {MAX_LISTENERS}")
    listeners: dict[str, ListenerConfig] = {}
    bound: dict[tuple[int, str, int], str] = {}  # (family, host, port) -> listener name
    for name, data in section.data.items():
        path = section.key(name)
        _check_name(name, path, file, "listener")
        t = _Table(data, path, file)
        t.only(_LISTENER_KEYS)
        bind = parse_address(t.required("bind", ' (e.g. bind = "0.0.0.0:80")'), t.key("bind"), file)
        ident = (bind.family, bind.host, bind.port)
        if ident in bound:
            raise t.error("bind", f"{bind} is already the bind address of listener {_quote(bound[ident])}")
        bound[ident] = name
        pool = t.required("pool", " (the name of a [pools.NAME] table)")
        if not isinstance(pool, str):
            raise t.error("pool", f"expected a pool name (a string), got {_describe(pool)}")
        d = ListenerConfig(name=name, bind=bind, pool=pool)
        listeners[name] = ListenerConfig(
            name=name,
            bind=bind,
            pool=pool,
            connect_timeout=t.get_duration("connect_timeout", d.connect_timeout, positive=True),
            idle_timeout=t.get_duration("idle_timeout", d.idle_timeout, positive=True),
            max_connections=t.get_int("max_connections", d.max_connections, 0, MAX_MAX_CONNECTIONS),
            backlog=t.get_int("backlog", d.backlog, 1, 65535),
        )
    return listeners


def _pools(root: _Table, file: str) -> dict[str, PoolConfig]:
    section = _Table(root.data.get("pools", {}), "pools", file, "a table of [pools.NAME] tables")
    if len(section.data) > MAX_POOLS:
        raise ConfigError(file, "pools", f"{len(section.data)} pools; the limit is {MAX_POOLS}")
    pools: dict[str, PoolConfig] = {}
    total_backends = 0
    for name, data in section.data.items():
        path = section.key(name)
        _check_name(name, path, file, "pool")
        t = _Table(data, path, file)
        t.only(_POOL_KEYS)
        pool = _pool(name, t, file, total_backends)
        total_backends += len(pool.backends)
        pools[name] = pool
    return pools


def _pool(name: str, t: _Table, file: str, backends_before: int) -> PoolConfig:
    d = PoolConfig(name=name, algorithm="weighted_round_robin", backends=())
    algorithm = t.get_choice("algorithm", d.algorithm, ALGORITHMS + tuple(ALGORITHM_ALIASES))
    hash_key = t.get_choice("hash_key", d.hash_key, HASH_KEYS)
    if algorithm in ALGORITHM_ALIASES:
        real, implied_key = ALGORITHM_ALIASES[algorithm]
        if "hash_key" in t.data and hash_key != implied_key:
            raise t.error(
                "hash_key",
                f'algorithm "{algorithm}" always hashes {implied_key}; '
                f'for hash_key = "{hash_key}" use algorithm = "{real}"',
            )
        algorithm, hash_key = real, implied_key

    backends = _backends(t, file, backends_before)
    table_size = t.get_int(
        "maglev_table_size", d.maglev_table_size, MIN_MAGLEV_TABLE_SIZE, MAX_MAGLEV_TABLE_SIZE
    )
    if not _is_prime(table_size):
        raise t.error(
            "maglev_table_size", f"{table_size} is not a prime number (e.g. 65537, 131071, 5000011)"
        )
    if table_size < len(backends):
        raise t.error(
            "maglev_table_size", f"{table_size} is smaller than the pool's {len(backends)} backends"
        )

    health = None
    if "health_check" in t.data:
        health = _health_check(t.data["health_check"], t.key("health_check"), file)
    return PoolConfig(
        name=name,
        algorithm=algorithm,
        backends=backends,
        retries=t.get_int("retries", d.retries, 0, MAX_RETRIES),
        hash_key=hash_key,
        maglev_table_size=table_size,
        ring_vnodes=t.get_int("ring_vnodes", d.ring_vnodes, 1, MAX_RING_VNODES),
        slow_start=t.get_duration("slow_start", d.slow_start),
        all_down=t.get_choice("all_down", d.all_down, ALL_DOWN_POLICIES),
        drain_timeout=t.get_duration("drain_timeout", d.drain_timeout),
        health_check=health,
        outlier_detection=_outlier(t.data.get("outlier_detection", {}), t.key("outlier_detection"), file),
    )


def _backends(pool: _Table, file: str, backends_before: int) -> tuple[BackendConfig, ...]:
    raw = pool.required("backends", " (a pool needs at least one backend)")
    key = pool.key("backends")
    if not isinstance(raw, list):
        raise ConfigError(file, key, f"expected an array of backend tables, got {_describe(raw)}")
    if not raw:
        raise ConfigError(file, key, "no backends; a pool needs at least one")
    if backends_before + len(raw) > MAX_BACKENDS:
        raise ConfigError(
            file,
            key,
            f"{backends_before + len(raw)} backends in all pools so far; the limit is {MAX_BACKENDS}",
        )
    backends: list[BackendConfig] = []
    names: dict[str, int] = {}
    addresses: dict[Address, str] = {}
    for i, item in enumerate(raw):
        t = _Table(item, f"{key}[{i}]", file, 'a table like { name = "a", address = "10.0.0.1:80" }')
        t.only(_BACKEND_KEYS)
        name = t.required("name")
        _check_name(name, t.key("name"), file, "backend")
        if name in names:
            raise t.error("name", f"duplicate backend name {_quote(name)} (also backends[{names[name]}])")
        names[name] = i
        address = parse_address(
            t.required("address", ' (e.g. address = "10.0.0.1:80")'), t.key("address"), file
        )
        if address in addresses:
            raise t.error(
                "address", f"{address} is already the address of backend {_quote(addresses[address])}"
            )
        addresses[address] = name
        weight = t.get_int("weight", 1, 0, MAX_WEIGHT)
        backends.append(BackendConfig(name=name, address=address, weight=weight))
    return tuple(backends)


def _health_check(data: object, path: str, file: str) -> HealthCheckConfig:
    t = _Table(data, path, file)
    if "type" not in t.data:
        raise t.error("type", f"missing required key (one of: {', '.join(HEALTH_CHECK_TYPES)})")
    kind = t.get_choice("type", "tcp", HEALTH_CHECK_TYPES)
    elsewhere = {
        k: f'applies only to type = "{other}"' for other, ks in _HEALTH_TYPE_KEYS.items() for k in ks
    }
    t.only(_HEALTH_COMMON_KEYS + _HEALTH_TYPE_KEYS[kind], elsewhere)

    d = HealthCheckConfig(type=kind)
    interval = t.get_duration("interval", d.interval, positive=True)
    timeout = t.get_duration("timeout", min(d.timeout, interval), positive=True)
    if timeout > interval:
        raise t.error(
            "timeout",
            f"timeout ({_fmt_seconds(timeout)}) must not exceed interval ({_fmt_seconds(interval)})",
        )
    port = t.get_int("port", 0, 1, 65535) if "port" in t.data else None
    address = _check_host(t.data["address"], t.key("address"), file) if "address" in t.data else None

    send = expect = b""
    path_ = d.path
    host = expect_body = None
    status = d.expect_status
    if kind == "send_expect":
        send = t.get_str("send", "").encode("utf-8")
        if "expect" not in t.data:
            raise t.error(
                "expect",
                'missing required key for type = "send_expect" (the bytes a healthy reply starts with)',
            )
        expect = t.get_str("expect", "").encode("utf-8")
        if not expect:
            raise t.error("expect", "must not be empty")
    elif kind == "http":
        path_ = t.get_str("path", d.path)
        if not _HTTP_PATH_RE.fullmatch(path_):
            raise t.error(
                "path", f"{_quote(path_)} must start with '/' and contain no spaces or control characters"
            )
        if "host" in t.data:
            host = t.get_str("host", "")
            if not _HTTP_TOKEN_RE.fullmatch(host):
                raise t.error(
                    "host", f"{_quote(host)} must be non-empty, without spaces or control characters"
                )
        status = _expect_status(t)
        if "expect_body" in t.data:
            expect_body = t.get_str("expect_body", "")
            if not expect_body:
                raise t.error("expect_body", "must not be empty (leave it out to skip the body check)")
    return HealthCheckConfig(
        type=kind,
        interval=interval,
        timeout=timeout,
        rise=t.get_int("rise", d.rise, 1, MAX_THRESHOLD),
        fall=t.get_int("fall", d.fall, 1, MAX_THRESHOLD),
        port=port,
        address=address,
        send=send,
        expect=expect,
        path=path_,
        host=host,
        expect_status=status,
        expect_body=expect_body,
    )


def _expect_status(t: _Table) -> tuple[int, int]:
    """expect_status: an int, "200" or "200-399"; each code in 100..599, low <= high."""
    value = t.data.get("expect_status", "200-399")
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str):
        m = _STATUS_RE.fullmatch(value)
        if m is None:
            raise t.error(
                "expect_status", f'{_quote(value)} is not a status or range like "200" or "200-399"'
            )
        low = int(m.group(1))
        high = int(m.group(2)) if m.group(2) else low
    else:
        raise t.error("expect_status", f'expected a status like 200 or "200-399", got {_describe(value)}')
    for code in (low, high):
        if not 100 <= code <= 599:
            raise t.error("expect_status", f"status {code} is out of range 100..599")
    if low > high:
        raise t.error("expect_status", f"range {low}-{high} is empty (low end above high end)")
    return (low, high)


def _outlier(data: object, path: str, file: str) -> OutlierConfig:
    t = _Table(data, path, file)
    t.only(_OUTLIER_KEYS)
    d = OutlierConfig()
    return OutlierConfig(
        consecutive_failures=t.get_int("consecutive_failures", d.consecutive_failures, 0, MAX_THRESHOLD),
        base_ejection_time=t.get_duration("base_ejection_time", d.base_ejection_time, positive=True),
        max_ejection_percent=t.get_int("max_ejection_percent", d.max_ejection_percent, 0, 100),
    )


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


def _one_line(text: str) -> str:
    """Escape anything that is not printable (newlines, tabs, escapes) so a message stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
