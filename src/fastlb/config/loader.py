"""Reading a configuration file: TOML -> validated Config, section by section."""

from __future__ import annotations

import os
import re
import sys
import tomllib

from fastlb.config.announce import (
    ANNOUNCE_GLOBAL_KEYS,
    ANNOUNCE_LISTENER_KEYS,
    listener_announce,
    parse_announce,
)
from fastlb.config.fleet import ADMIN_KEYS, parse_admin, parse_discover
from fastlb.config.model import (
    ALGORITHM_ALIASES,
    ALGORITHMS,
    ALL_DOWN_POLICIES,
    HASH_KEYS,
    HEALTH_CHECK_TYPES,
    LOG_LEVELS,
    MAX_BACKENDS,
    MAX_FILE_BYTES,
    MAX_LISTENERS,
    MAX_MAGLEV_TABLE_SIZE,
    MAX_MAX_CONNECTIONS,
    MAX_POOLS,
    MAX_RETRIES,
    MAX_RING_VNODES,
    MAX_SUN_PATH,
    MAX_THRESHOLD,
    MAX_WEIGHT,
    MAX_WORKERS,
    MIN_MAGLEV_TABLE_SIZE,
    Address,
    BackendConfig,
    Config,
    ConfigError,
    GlobalConfig,
    HealthCheckConfig,
    ListenerConfig,
    OutlierConfig,
    PoolConfig,
    default_state_file,
)
from fastlb.config.observe import ACCESS_LOG_KEYS, parse_access_log
from fastlb.config.protect import BACKEND_KEYS as _PROTECT_BACKEND_KEYS
from fastlb.config.protect import LISTENER_KEYS as _PROTECT_LISTENER_KEYS
from fastlb.config.protect import POOL_KEYS as _PROTECT_POOL_KEYS
from fastlb.config.protect import (
    backend_priority,
    listener_protect_fields,
    pool_priorities,
    pool_protect_fields,
)
from fastlb.config.rollouts import parse_rollouts
from fastlb.config.routes import (
    LISTENER_KEYS as _ROUTE_LISTENER_KEYS,
)
from fastlb.config.routes import (
    check_route_pools,
    health_send_proxy,
    listener_prelude,
    listener_routes,
    pool_send_proxy,
)
from fastlb.config.udp import (
    UDP_HEALTH_CHECK_TYPES,
    UDP_HEALTH_TYPE_KEYS,
    UDP_LISTENER_KEYS,
    check_udp_routes,
    health_udp_fields,
    listener_udp_fields,
)
from fastlb.config.values import (
    _HTTP_PATH_RE,
    _HTTP_TOKEN_RE,
    _STATUS_RE,
    _check_host,
    _check_name,
    _describe,
    _fmt_seconds,
    _is_prime,
    _quote,
    _Table,
    parse_address,
)

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
    doc = _parse_toml(text, file)
    root = _Table(doc, "", file)
    root.only(("global", "listeners", "pools", "rollouts"))
    global_ = _global(root.data.get("global", {}), file)
    short_form: set[str] = set()
    listeners = _listeners(root, file, short_form, global_.announce.default)
    pools = _pools(root, file)
    check_route_pools(listeners, pools, file, short_form)
    rollouts = parse_rollouts(root, file, listeners, pools)
    return Config(file=file, global_=global_, listeners=listeners, pools=pools, rollouts=rollouts)


def _parse_toml(text: str, file: str) -> dict[str, object]:
    """tomllib.loads, with its ways to fail (bad syntax, an integer too long for int(), nesting
    deeper than the interpreter's stack, a lone surrogate that no file can hold but a str can) turned
    into one ConfigError each."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            file, "(syntax)", f"not valid Unicode text (a lone surrogate at character {exc.start})"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(
            file, "(syntax)", "invalid TOML: arrays or inline tables are nested too deeply"
        ) from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        m = _LONG_NUMBER_RE.search(text)
        where = f" (line {text.count(chr(10), 0, m.start()) + 1})" if m else ""
        raise ConfigError(
            file, "(syntax)", f"invalid TOML: a number{where} has more than {_MAX_DIGITS} digits"
        ) from None


_MAX_DIGITS = sys.get_int_max_str_digits()  # 4300 by default; tomllib's int() obeys it (decimal only)
_LONG_NUMBER_RE = re.compile(rf"[0-9_]{{{_MAX_DIGITS + 1},}}")

_GLOBAL_KEYS = (
    "workers",
    "control_socket",
    "shutdown_timeout",
    "log_level",
    "state_file",
    "orphan_timeout",
    "worker_stall_timeout",
    *ADMIN_KEYS,
    *ACCESS_LOG_KEYS,
    "metrics",
    "reload_takeover",
    *ANNOUNCE_GLOBAL_KEYS,
    "user",
    "group",
)
_LISTENER_KEYS = (
    "bind",
    "pool",
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "backlog",
    "half_close_timeout",
    *_ROUTE_LISTENER_KEYS,
    "protocol",
    *UDP_LISTENER_KEYS,
    *ANNOUNCE_LISTENER_KEYS,
    *_PROTECT_LISTENER_KEYS,
)
MAX_HALF_CLOSE_TIMEOUT = 1000 * 3600.0  # milliseconds of it must fit the record's u32
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
    "discover",
    "send_proxy",
    *_PROTECT_POOL_KEYS,
)
_BACKEND_KEYS = ("name", "address", "weight", *_PROTECT_BACKEND_KEYS)
_OUTLIER_KEYS = (
    "consecutive_failures",
    "base_ejection_time",
    "max_ejection_percent",
    "successful_active_health_check_uneject_host",
)
_HEALTH_COMMON_KEYS = ("type", "interval", "timeout", "rise", "fall", "port", "address", "send_proxy")
_HEALTH_TYPE_KEYS = {
    "tcp": (),
    "http": ("path", "host", "expect_status", "expect_body"),
    "send_expect": ("send", "expect"),
    **UDP_HEALTH_TYPE_KEYS,
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
    state_file = t.get_str("state_file", default_state_file(sock))
    if not state_file.startswith("/") or "\0" in state_file:
        raise t.error("state_file", f"{_quote(state_file)} must be an absolute path (no NUL)")
    access_log = parse_access_log(t)
    return GlobalConfig(
        workers=workers,
        control_socket=sock,
        state_file=state_file,
        shutdown_timeout=t.get_duration("shutdown_timeout", d.shutdown_timeout),
        log_level=t.get_choice("log_level", d.log_level, LOG_LEVELS),
        admin=parse_admin(t),
        access_log=access_log[0],
        access_log_format=access_log[1],
        access_log_buffer=access_log[2],
        orphan_timeout=t.get_duration("orphan_timeout", d.orphan_timeout),
        worker_stall_timeout=_stall_timeout(t, d.worker_stall_timeout),
        metrics=_metrics_address(t, file),
        reload_takeover=t.get_bool("reload_takeover", d.reload_takeover),
        announce=parse_announce(t),
        **_run_as(t),
    )


def _run_as(t: _Table) -> dict:
    """[global] user / group: who the workers run as (resolved now: an unknown name is a config
    error).  user alone also takes the user's primary group."""
    import grp
    import pwd

    user = t.get_str("user", "") if "user" in t.data else None
    group = t.get_str("group", "") if "group" in t.data else None
    if user is None and group is None:
        return {}
    uid = gid = -1
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError, OverflowError):
            raise t.error("user", f"unknown user {_quote(user)} (not in the user database)") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gr = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
        except (KeyError, ValueError, OverflowError):
            raise t.error("group", f"unknown group {_quote(group)} (not in the group database)") from None
        gid = gr.gr_gid
    return {"user": user, "group": group, "run_as": (uid, gid)}


def _stall_timeout(t: _Table, default: float) -> float:
    """worker_stall_timeout: at least 500ms (a worker's loop turns at least every 100 ms)."""
    seconds = t.get_duration("worker_stall_timeout", default, positive=True)
    if seconds < 0.5:
        raise t.error("worker_stall_timeout", "must be at least 500ms (workers beat every 100 ms at most)")
    return seconds


def _metrics_address(t: _Table, file: str) -> Address | None:
    """[global] metrics: an address to serve Prometheus /metrics on, or "off" (the default)."""
    value = t.data.get("metrics", "off")
    if value == "off":
        return None
    return parse_address(value, t.key("metrics"), file)


def _listeners(
    root: _Table, file: str, short_form: set[str], announce: bool = False
) -> dict[str, ListenerConfig]:
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
    bound: dict[tuple[int, str, int, str], str] = {}  # (family, host, port, protocol) -> listener name
    for name, data in section.data.items():
        path = section.key(name)
        _check_name(name, path, file, "listener")
        t = _Table(data, path, file)
        t.only(_LISTENER_KEYS)
        bind = parse_address(t.required("bind", ' (e.g. bind = "0.0.0.0:80")'), t.key("bind"), file)
        udp = listener_udp_fields(t)  # protocol, and the UDP keys (config/udp.py)
        ident = (bind.family, bind.host, bind.port, udp["protocol"])  # TCP and UDP may share a port
        if ident in bound:
            raise t.error("bind", f"{bind} is already the bind address of listener {_quote(bound[ident])}")
        bound[ident] = name
        pool, routes = listener_routes(t)
        if not routes:
            short_form.add(name)
        d = ListenerConfig(name=name, bind=bind, pool=pool)
        listeners[name] = ListenerConfig(
            name=name,
            bind=bind,
            pool=pool,
            connect_timeout=t.get_duration("connect_timeout", d.connect_timeout, positive=True),
            idle_timeout=t.get_duration("idle_timeout", d.idle_timeout, positive=True),
            max_connections=t.get_int("max_connections", d.max_connections, 0, MAX_MAX_CONNECTIONS),
            backlog=t.get_int("backlog", d.backlog, 1, 65535),
            half_close_timeout=_half_close_timeout(t, d.half_close_timeout),
            **udp,
            routes=routes,
            **listener_prelude(t, routes or d.routes),
            announce=listener_announce(t, bind, announce),
            **listener_protect_fields(t),
        )
        check_udp_routes(t, udp["protocol"], listeners[name].needs_sni)
    return listeners


def _half_close_timeout(t: _Table, default: float) -> float:
    value = t.get_duration("half_close_timeout", default)
    if value > MAX_HALF_CLOSE_TIMEOUT:
        raise t.error("half_close_timeout", "is too long: at most 1000h (0 = no limit)")
    return value


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

    discover = parse_discover(t)
    # with DNS discovery the static list is optional (and may be empty)
    backends = _backends(t, file, backends_before) if discover is None or t.data.get("backends") else ()
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

    send_proxy = pool_send_proxy(t)
    health = None
    if "health_check" in t.data:
        health = _health_check(t.data["health_check"], t.key("health_check"), file, send_proxy)
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
        discover=discover,
        send_proxy=send_proxy,
        **pool_protect_fields(t),
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
        backends.append(BackendConfig(name=name, address=address, weight=weight, **backend_priority(t)))
    return pool_priorities(pool, tuple(backends))


def _health_check(data: object, path: str, file: str, pool_send_proxy: str = "off") -> HealthCheckConfig:
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
    host = expect_body = query = None
    status = d.expect_status
    if kind in UDP_HEALTH_CHECK_TYPES:
        udp = health_udp_fields(kind, t)
        send, expect, query = udp.get("send", b""), udp.get("expect", b""), udp.get("query")
    elif kind == "send_expect":
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
        query=query,
        send_proxy=health_send_proxy(t, pool_send_proxy),
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
        successful_active_health_check_uneject_host=t.get_bool(
            "successful_active_health_check_uneject_host", d.successful_active_health_check_uneject_host
        ),
    )
