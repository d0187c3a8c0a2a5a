"""Tests for fastlb.config: parsing, defaults, every validation error, and `fastlb check-config` end to end."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "tests" / "configs"

try:
    import fastlb  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # a plain checkout: test the tree this file is in
    sys.path.insert(0, str(REPO / "src"))

from fastlb.config import (  # noqa: E402
    ALGORITHMS,
    Address,
    ConfigError,
    GlobalConfig,
    HealthCheckConfig,
    OutlierConfig,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from fastlb.config import model as cfgmod  # noqa: E402

# The smallest valid file; bad configs below are this with one thing broken.
MINIMAL = """\
[listeners.web]
bind = "127.0.0.1:8080"
pool = "web"

[pools.web]
backends = [{ name = "a", address = "127.0.0.1:9001" }]
"""


def _pool(extra: str = "", backends: str = '{ name = "a", address = "127.0.0.1:9001" }') -> str:
    """MINIMAL with `extra` lines in [pools.web] and the given backends."""
    return f'[listeners.web]\nbind = "127.0.0.1:8080"\npool = "web"\n\n[pools.web]\n{extra}\nbackends = [{backends}]\n'


def _listener(extra: str) -> str:
    """MINIMAL with `extra` lines in [listeners.web]."""
    return MINIMAL.replace('pool = "web"\n', f'pool = "web"\n{extra}\n', 1)


def _health(body: str) -> str:
    return MINIMAL + f"\n[pools.web.health_check]\n{body}\n"


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.toml")
    return info.value


# ---------------------------------------------------------------------------------------------------------
# Good files


def test_example_file() -> None:
    cfg = load_config(CONFIGS / "example.toml")
    assert cfg.file == str(CONFIGS / "example.toml")
    assert cfg.global_ == GlobalConfig(workers=2, shutdown_timeout=30.0)
    web = cfg.listeners["web"]
    assert web.bind == Address("127.0.0.1", 8080, socket.AF_INET)
    assert (web.pool, web.connect_timeout, web.idle_timeout, web.max_connections) == (
        "web",
        2.0,
        300.0,
        20000,
    )
    pool = cfg.pools["web"]
    assert pool.algorithm == "weighted_round_robin"
    assert [(b.name, str(b.address), b.weight) for b in pool.backends] == [
        ("a", "127.0.0.1:9001", 5),
        ("b", "127.0.0.1:9002", 3),
        ("c", "127.0.0.1:9003", 2),
    ]
    assert pool.health_check == HealthCheckConfig(
        type="send_expect",
        send=b"PING\r\n",
        expect=b"+PONG",
        interval=2.0,
        timeout=1.0,
        rise=2,
        fall=3,
        port=9100,
    )


def test_full_file_every_key() -> None:
    cfg = load_config(CONFIGS / "full.toml")
    assert list(cfg.listeners) == ["web", "web6", "redis"]  # file order
    assert list(cfg.pools) == ["web", "redis", "spare"]
    assert cfg.global_ == GlobalConfig(
        workers=4,
        control_socket="/run/fastlb/control.sock",
        shutdown_timeout=10.0,
        log_level="debug",
        state_file="/var/lib/fastlb/web-state.json",
    )
    web = cfg.listeners["web"]
    assert (web.connect_timeout, web.idle_timeout, web.max_connections, web.backlog) == (
        1.5,
        3600.0,
        50000,
        1024,
    )
    assert cfg.listeners["web6"].bind == Address("::", 8080, socket.AF_INET6)
    pool = cfg.pools["web"]
    assert (pool.algorithm, pool.hash_key, pool.ring_vnodes, pool.retries) == (
        "ring_hash",
        "source_ip_port",
        200,
        3,
    )
    assert (pool.slow_start, pool.all_down, pool.drain_timeout) == (30.0, "panic", 120.0)
    assert pool.backends[1].weight == 1
    assert pool.backends[2].weight == 0
    assert pool.backends[2].address == Address("fd00::13", 8080, socket.AF_INET6)
    assert pool.health_check == HealthCheckConfig(
        type="http",
        path="/healthz",
        host="web.internal",
        expect_status=(200, 299),
        expect_body="ok",
        interval=5.0,
        timeout=2.0,
        rise=3,
        fall=2,
        port=9000,
        address="10.0.0.1",
    )
    assert pool.outlier_detection == OutlierConfig(3, 10.0, 33)
    redis = cfg.pools["redis"]
    assert (redis.algorithm, redis.hash_key, redis.maglev_table_size) == ("maglev", "source_ip", 131071)
    assert redis.backends[1].address == Address("127.0.0.1", 6381, socket.AF_INET)
    assert redis.health_check == HealthCheckConfig(type="tcp")
    assert "spare" not in {lst.pool for lst in cfg.listeners.values()}


def test_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.file == "<string>"
    assert 1 <= cfg.global_.workers <= 256
    assert cfg.global_ == GlobalConfig()
    assert (cfg.global_.control_socket, cfg.global_.shutdown_timeout, cfg.global_.log_level) == (
        "/run/fastlb/control.sock",
        30.0,
        "info",
    )
    lst = cfg.listeners["web"]
    assert (lst.connect_timeout, lst.idle_timeout, lst.max_connections, lst.backlog) == (5.0, 600.0, 0, 4096)
    pool = cfg.pools["web"]
    assert (pool.algorithm, pool.retries, pool.hash_key, pool.maglev_table_size, pool.ring_vnodes) == (
        "weighted_round_robin",
        2,
        "source_ip",
        65537,
        160,
    )
    assert (pool.slow_start, pool.all_down, pool.drain_timeout, pool.health_check) == (
        0.0,
        "reject",
        300.0,
        None,
    )
    assert pool.outlier_detection == OutlierConfig(5, 30.0, 50)
    assert pool.backends[0].weight == 1


def test_health_check_defaults() -> None:
    hc = parse_config(_health('type = "tcp"')).pools["web"].health_check
    assert hc == HealthCheckConfig(type="tcp", interval=2.0, timeout=1.0, rise=2, fall=3)
    http = parse_config(_health('type = "http"')).pools["web"].health_check
    assert http is not None
    assert (http.path, http.host, http.expect_status, http.expect_body) == ("/", None, (200, 399), None)
    # timeout left out with a short interval: it follows the interval instead of failing "timeout > interval"
    fast = parse_config(_health('type = "tcp"\ninterval = "500ms"')).pools["web"].health_check
    assert fast is not None and (fast.interval, fast.timeout) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("value", "expected"), [(204, (204, 204)), ('"200"', (200, 200)), ('"301-302"', (301, 302))]
)
def test_http_expect_status(value: object, expected: tuple[int, int]) -> None:
    hc = parse_config(_health(f'type = "http"\nexpect_status = {value}')).pools["web"].health_check
    assert hc is not None and hc.expect_status == expected


def test_every_algorithm_and_alias() -> None:
    for algorithm in ALGORITHMS:
        assert parse_config(_pool(f'algorithm = "{algorithm}"')).pools["web"].algorithm == algorithm
    pool = parse_config(_pool('algorithm = "source_hash"')).pools["web"]
    assert (pool.algorithm, pool.hash_key) == ("maglev", "source_ip")
    pool = parse_config(_pool('algorithm = "source_hash"\nhash_key = "source_ip"')).pools["web"]
    assert (pool.algorithm, pool.hash_key) == ("maglev", "source_ip")


def test_ipv4_and_ipv6_on_the_same_port_are_not_duplicates() -> None:
    text = MINIMAL + '\n[listeners.web6]\nbind = "[::]:8080"\npool = "web"\n'
    text = text.replace('bind = "127.0.0.1:8080"', 'bind = "0.0.0.0:8080"')
    cfg = parse_config(text)
    assert [str(lst.bind) for lst in cfg.listeners.values()] == ["0.0.0.0:8080", "[::]:8080"]


def test_same_backend_address_in_two_pools_is_fine() -> None:
    text = MINIMAL + '\n[pools.other]\nbackends = [{ name = "a", address = "127.0.0.1:9001" }]\n'
    assert len(parse_config(text).pools) == 2


def test_limits_are_inclusive() -> None:
    listeners = "".join(f'[listeners.l{i}]\nbind = "127.0.0.1:{1000 + i}"\npool = "web"\n' for i in range(64))
    text = listeners + '[pools.web]\nbackends = [{ name = "a", address = "127.0.0.1:9001" }]\n'
    assert len(parse_config(text).listeners) == 64
    backends = ", ".join(
        f'{{ name = "b{i}", address = "10.0.{i // 250}.{i % 250 + 1}:80" }}' for i in range(4096)
    )
    assert len(parse_config(_pool(backends=backends)).pools["web"].backends) == 4096
    name = "n" * 63
    pool = parse_config(_pool(backends=f'{{ name = "{name}", address = "127.0.0.1:1" }}')).pools["web"]
    assert pool.backends[0].name == name


def test_config_is_frozen() -> None:
    cfg = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listeners["web"].pool = "x"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------
# parse_duration / parse_address


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("250ms", 0.25),
        (3, 3.0),
        (0, 0.0),
        (0.25, 0.25),
        ("720h", 30 * 86400.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    result = parse_duration(value, "k", "f")
    assert result == seconds and isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "word"),
    [
        ("-1s", "negative"),
        (-1, "negative"),
        (-0.5, "negative"),
        ("2", "unit"),
        ("2 s", "unit"),
        ("1d", "unit"),
        ("1e3s", "unit"),
        ("fast", "unit"),
        ("", "unit"),
        (True, "boolean"),
        ([1], "array"),
        (float("nan"), "nan"),
        (float("inf"), "too long"),
        ("721h", "too long"),
        (10**30, "too long"),
    ],
)
def test_parse_duration_rejects(value: object, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "pools.web.slow_start", "f.toml")
    exc = info.value
    assert (exc.file, exc.key) == ("f.toml", "pools.web.slow_start")
    assert word in exc.problem


@pytest.mark.parametrize(
    ("text", "host", "port", "family", "shown", "sockaddr"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, socket.AF_INET, "127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:8080", "::1", 8080, socket.AF_INET6, "[::1]:8080", ("::1", 8080, 0, 0)),
        ("0.0.0.0:80", "0.0.0.0", 80, socket.AF_INET, "0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::]:80", "::", 80, socket.AF_INET6, "[::]:80", ("::", 80, 0, 0)),
        ("localhost:8080", "127.0.0.1", 8080, socket.AF_INET, "127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[0:0::1]:1", "::1", 1, socket.AF_INET6, "[::1]:1", ("::1", 1, 0, 0)),  # normalised
        ("10.1.2.3:65535", "10.1.2.3", 65535, socket.AF_INET, "10.1.2.3:65535", ("10.1.2.3", 65535)),
    ],
)
def test_parse_address(text: str, host: str, port: int, family: int, shown: str, sockaddr: tuple) -> None:
    addr = parse_address(text, "k", "f")
    assert (addr.host, addr.port, addr.family) == (host, port, family)
    assert str(addr) == shown
    assert addr.sockaddr() == sockaddr
    assert parse_address(str(addr), "k", "f") == addr  # str() round-trips


@pytest.mark.parametrize(("family", "loopback"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "[::1]")])
def test_sockaddr_connects(family: int, loopback: str) -> None:
    try:
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind((loopback.strip("[]"), 0))
    except OSError:
        pytest.skip(f"no {loopback} here")
    with server:
        server.listen(1)
        addr = parse_address(f"{loopback}:{server.getsockname()[1]}", "k", "f")
        with socket.socket(addr.family, socket.SOCK_STREAM) as client:
            client.connect(addr.sockaddr())
            assert client.getpeername()[:2] == server.getsockname()[:2]


@pytest.mark.parametrize(
    ("value", "word"),
    [
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "no port"),
        ("[::1]", "no port"),
        ("[::1]80", "port"),
        ("[::1:80", "]"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:123456", "not a number"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:-1", "not a number"),
        ("::1:80", "brackets"),
        ("[127.0.0.1]:80", "only for IPv6"),
        ("example.com:80", "not an IP"),
        ("256.0.0.1:80", "not an IP"),
        ("010.0.0.1:80", "not an IP"),
        (":80", "no host"),
        ("[fe80::1%eth0]:80", "zone"),
        (8080, "integer"),
    ],
)
def test_parse_address_rejects(value: object, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(value, "listeners.web.bind", "f.toml")
    assert info.value.key == "listeners.web.bind"
    assert word in info.value.problem


def test_config_error_is_one_line_and_pickles() -> None:
    exc = ConfigError("a.toml", 'listeners."x\ny"', "bad\tthing\n")
    assert str(exc) == 'a.toml: listeners."x\\ny": bad\\tthing\\n'
    again = pickle.loads(pickle.dumps(exc))
    assert (again.file, again.key, again.problem) == (exc.file, exc.key, exc.problem)


# ---------------------------------------------------------------------------------------------------------
# Every kind of bad config, in process: (text, key, a word of the problem)

BAD: list[tuple[str, str, str, str]] = [
    # id, text, key, word
    ("syntax", 'bind = = "x"\n', "(syntax)", "line 1"),
    ("duplicate-table", MINIMAL + "[pools.web]\n", "(syntax)", "line"),
    ("unknown-top", MINIMAL + "[listener.x]\n", "listener", 'did you mean "listeners"'),
    ("unknown-global", "[global]\nworker = 2\n" + MINIMAL, "global.worker", "allowed keys: workers"),
    ("unknown-listener", _listener("retries = 1"), "listeners.web.retries", "unknown key"),
    ("unknown-pool", _pool("retry = 1"), "pools.web.retry", 'did you mean "retries"'),
    ("unknown-backend", _pool(backends='{ name = "a", address = "127.0.0.1:1", wieght = 2 }'), "pools.web.backends[0].wieght", "weight"),
    ("unknown-outlier", MINIMAL + "[pools.web.outlier_detection]\nfailures = 1\n", "pools.web.outlier_detection.failures", "consecutive_failures"),
    ("health-key-other-type", _health('type = "tcp"\nexpect = "x"'), "pools.web.health_check.expect", "send_expect"),
    ("global-not-table", 'global = 3\n' + MINIMAL, "global", "table"),
    ("no-listeners", '[pools.web]\nbackends = [{ name = "a", address = "127.0.0.1:1" }]\n', "listeners", "no listeners"),
    ("empty-listeners", "listeners = {}\n" + MINIMAL.split("[listeners.web]")[0], "listeners", "no listeners"),
    ("listener-not-table", 'listeners = { web = 1 }\n', "listeners.web", "table"),
    ("missing-bind", MINIMAL.replace('bind = "127.0.0.1:8080"\n', ""), "listeners.web.bind", "missing"),
    ("missing-pool-key", MINIMAL.replace('pool = "web"\n', ""), "listeners.web.pool", "missing"),
    ("bind-no-port", MINIMAL.replace("127.0.0.1:8080", "127.0.0.1"), "listeners.web.bind", "no port"),
    ("bind-hostname", MINIMAL.replace("127.0.0.1:8080", "web.example:80"), "listeners.web.bind", "not an IP"),
    ("bind-port-range", MINIMAL.replace("127.0.0.1:8080", "[::1]:99999"), "listeners.web.bind", "out of range"),
    ("bind-int", MINIMAL.replace('"127.0.0.1:8080"', "8080"), "listeners.web.bind", "integer"),
    ("duplicate-bind", MINIMAL + '[listeners.web2]\nbind = "127.0.0.1:8080"\npool = "web"\n', "listeners.web2.bind", "already"),
    ("duplicate-bind-normalised", MINIMAL.replace("127.0.0.1:8080", "[::1]:80") + '[listeners.b]\nbind = "[0::1]:80"\npool = "web"\n', "listeners.b.bind", "already"),
    ("unknown-pool-ref", MINIMAL.replace('pool = "web"', 'pool = "wbe"'), "listeners.web.pool", 'did you mean "web"'),
    ("pool-ref-not-string", MINIMAL.replace('pool = "web"', "pool = 1"), "listeners.web.pool", "integer"),
    ("no-pools", MINIMAL.split("[pools.web]")[0], "listeners.web.pool", "defined pools: none"),
    ("no-backends-key", '[listeners.web]\nbind = "127.0.0.1:1"\npool = "web"\n[pools.web]\nretries = 1\n', "pools.web.backends", "at least one backend"),
    ("empty-backends", _pool(backends=""), "pools.web.backends", "no backends"),
    ("backends-not-array", '[listeners.web]\nbind = "127.0.0.1:1"\npool = "web"\n[pools.web]\nbackends = "a"\n', "pools.web.backends", "array"),
    ("backend-not-table", _pool(backends='"127.0.0.1:1"'), "pools.web.backends[0]", "table"),
    ("backend-no-name", _pool(backends='{ address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "missing"),
    ("backend-no-address", _pool(backends='{ name = "a" }'), "pools.web.backends[0].address", "missing"),
    ("backend-bad-address", _pool(backends='{ name = "a", address = "::1:80" }'), "pools.web.backends[0].address", "brackets"),
    ("duplicate-backend-name", _pool(backends='{ name = "a", address = "127.0.0.1:1" }, { name = "a", address = "127.0.0.1:2" }'), "pools.web.backends[1].name", "duplicate"),
    ("duplicate-backend-address", _pool(backends='{ name = "a", address = "127.0.0.1:1" }, { name = "b", address = "localhost:1" }'), "pools.web.backends[1].address", "already"),
    ("weight-high", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = 1001 }'), "pools.web.backends[0].weight", "out of range 0..1000"),
    ("weight-negative", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = -1 }'), "pools.web.backends[0].weight", "out of range"),
    ("weight-bool", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = true }'), "pools.web.backends[0].weight", "boolean"),
    ("weight-float", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = 2.0 }'), "pools.web.backends[0].weight", "float"),
    ("weight-string", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = "2" }'), "pools.web.backends[0].weight", "string"),
    ("name-empty", _pool(backends='{ name = "", address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "empty"),
    ("name-long", _pool(backends=f'{{ name = "{"x" * 64}", address = "127.0.0.1:1" }}'), "pools.web.backends[0].name", "64 bytes"),
    ("name-chars", _pool(backends='{ name = "a/b", address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "contains"),
    ("name-unicode", _pool(backends='{ name = "café", address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "contains"),
    ("name-not-string", _pool(backends='{ name = 1, address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "string"),
    ("listener-name-chars", MINIMAL.replace("[listeners.web]", '[listeners."my web"]'), 'listeners."my web"', "contains"),
    ("listener-name-empty", MINIMAL.replace("[listeners.web]", '[listeners.""]'), 'listeners.""', "empty"),
    ("pool-name-long", MINIMAL.replace("pools.web", "pools." + "p" * 70).replace('pool = "web"', f'pool = "{"p" * 70}"'), "pools." + "p" * 70, "limit is 63"),
    ("algorithm", _pool('algorithm = "roundrobin"'), "pools.web.algorithm", 'did you mean "round_robin"'),
    ("algorithm-type", _pool("algorithm = 1"), "pools.web.algorithm", "integer"),
    ("hash-key", _pool('algorithm = "maglev"\nhash_key = "dest_ip"'), "pools.web.hash_key", "choose one of"),
    ("alias-conflict", _pool('algorithm = "source_hash"\nhash_key = "four_tuple"'), "pools.web.hash_key", "always hashes"),
    ("all-down", _pool('all_down = "ignore"'), "pools.web.all_down", "reject, panic"),
    ("retries", _pool("retries = 11"), "pools.web.retries", "0..10"),
    ("maglev-not-prime", _pool("maglev_table_size = 65536"), "pools.web.maglev_table_size", "prime"),
    ("maglev-small", _pool("maglev_table_size = 97"), "pools.web.maglev_table_size", "100"),
    ("ring-vnodes", _pool("ring_vnodes = 0"), "pools.web.ring_vnodes", "1..1000"),
    ("slow-start", _pool('slow_start = "soon"'), "pools.web.slow_start", "duration"),
    ("drain-negative", _pool("drain_timeout = -5"), "pools.web.drain_timeout", "negative"),
    ("connect-timeout-zero", _listener('connect_timeout = "0s"'), "listeners.web.connect_timeout", "at least 1ms"),
    ("idle-timeout-unit", _listener('idle_timeout = "10 minutes"'), "listeners.web.idle_timeout", "unit"),
    ("max-connections", _listener("max_connections = 10000001"), "listeners.web.max_connections", "out of range"),
    ("backlog", _listener("backlog = 0"), "listeners.web.backlog", "out of range"),
    ("workers-zero", "[global]\nworkers = 0\n" + MINIMAL, "global.workers", "1..256"),
    ("workers-high", "[global]\nworkers = 257\n" + MINIMAL, "global.workers", "1..256"),
    ("workers-bool", "[global]\nworkers = true\n" + MINIMAL, "global.workers", "boolean"),
    ("log-level", '[global]\nlog_level = "verbose"\n' + MINIMAL, "global.log_level", "debug, info, warning, error"),
    ("control-socket-relative", '[global]\ncontrol_socket = "fastlb.sock"\n' + MINIMAL, "global.control_socket", "absolute"),
    ("state-file-relative", '[global]\nstate_file = "state.json"\n' + MINIMAL, "global.state_file", "absolute"),
    ("control-socket-long", f'[global]\ncontrol_socket = "/{"s" * 120}"\n' + MINIMAL, "global.control_socket", "107 bytes"),
    ("shutdown-timeout", '[global]\nshutdown_timeout = "-1s"\n' + MINIMAL, "global.shutdown_timeout", "negative"),
    ("health-not-table", _pool('health_check = "tcp"'), "pools.web.health_check", "table"),
    ("health-no-type", _health('interval = "1s"'), "pools.web.health_check.type", "missing"),
    ("health-type", _health('type = "icmp"'), "pools.web.health_check.type", "tcp, http, send_expect"),
    ("health-rise", _health('type = "tcp"\nrise = 0'), "pools.web.health_check.rise", "out of range 1.."),
    ("health-fall", _health('type = "tcp"\nfall = 0'), "pools.web.health_check.fall", "out of range 1.."),
    ("health-timeout-gt-interval", _health('type = "tcp"\ninterval = "1s"\ntimeout = "1500ms"'), "pools.web.health_check.timeout", "must not exceed interval"),
    ("health-interval-zero", _health('type = "tcp"\ninterval = 0'), "pools.web.health_check.interval", "at least 1ms"),
    ("health-port", _health('type = "tcp"\nport = 0'), "pools.web.health_check.port", "1..65535"),
    ("health-address", _health('type = "tcp"\naddress = "db.local"'), "pools.web.health_check.address", "not an IP"),
    ("health-address-port", _health('type = "tcp"\naddress = "10.0.0.1:80"'), "pools.web.health_check.address", "port"),
    ("send-expect-no-expect", _health('type = "send_expect"\nsend = "PING"'), "pools.web.health_check.expect", "missing"),
    ("send-expect-empty", _health('type = "send_expect"\nexpect = ""'), "pools.web.health_check.expect", "empty"),
    ("send-not-string", _health('type = "send_expect"\nsend = 1\nexpect = "x"'), "pools.web.health_check.send", "string"),
    ("http-status-garbage", _health('type = "http"\nexpect_status = "2xx"'), "pools.web.health_check.expect_status", "range"),
    ("http-status-range", _health('type = "http"\nexpect_status = "200-600"'), "pools.web.health_check.expect_status", "100..599"),
    ("http-status-low", _health('type = "http"\nexpect_status = 99'), "pools.web.health_check.expect_status", "100..599"),
    ("http-status-reversed", _health('type = "http"\nexpect_status = "399-200"'), "pools.web.health_check.expect_status", "empty"),
    ("http-status-bool", _health('type = "http"\nexpect_status = true'), "pools.web.health_check.expect_status", "boolean"),
    ("http-path", _health('type = "http"\npath = "health"'), "pools.web.health_check.path", "start with '/'"),
    ("http-path-space", _health('type = "http"\npath = "/a b"'), "pools.web.health_check.path", "spaces"),
    ("outlier-percent", MINIMAL + "[pools.web.outlier_detection]\nmax_ejection_percent = 101\n", "pools.web.outlier_detection.max_ejection_percent", "0..100"),
    ("outlier-failures", MINIMAL + "[pools.web.outlier_detection]\nconsecutive_failures = -1\n", "pools.web.outlier_detection.consecutive_failures", "out of range"),
    ("outlier-time", MINIMAL + '[pools.web.outlier_detection]\nbase_ejection_time = "x"\n', "pools.web.outlier_detection.base_ejection_time", "duration"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "word"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config(text: str, key: str, word: str) -> None:
    exc = _error(text)
    assert (exc.file, exc.key) == ("t.toml", key)
    assert word in exc.problem
    assert "\n" not in str(exc)
    assert str(exc) == f"t.toml: {key}: {exc.problem}"


def test_too_many_listeners_pools_backends() -> None:
    listeners = "".join(f'[listeners.l{i}]\nbind = "127.0.0.1:{1000 + i}"\npool = "p0"\n' for i in range(65))
    pool = '[pools.p0]\nbackends = [{ name = "a", address = "127.0.0.1:1" }]\n'
    assert _error(listeners + pool).key == "listeners"
    pools = "".join(
        f'[pools.p{i}]\nbackends = [{{ name = "a", address = "127.0.0.1:1" }}]\n' for i in range(65)
    )
    exc = _error('[listeners.l]\nbind = "127.0.0.1:1"\npool = "p0"\n' + pools)
    assert (exc.key, "limit is 64" in exc.problem) == ("pools", True)
    many = ", ".join(
        f'{{ name = "b{i}", address = "10.0.{i // 250}.{i % 250 + 1}:80" }}' for i in range(2050)
    )
    two = f'[listeners.l]\nbind = "127.0.0.1:1"\npool = "x"\n[pools.x]\nbackends = [{many}]\n[pools.y]\nbackends = [{many}]\n'
    exc = _error(two)
    assert (exc.key, "limit is 4096" in exc.problem) == ("pools.y.backends", True)


def test_file_problems(tmp_path: Path) -> None:
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert list(load_config(str(bom)).listeners) == ["web"]
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert (info.value.key, "No such file" in info.value.problem) == ("(file)", True)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.key == "(file)"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(latin1)
    assert (info.value.key, "UTF-8" in info.value.problem) == ("(file)", True)


def test_shared_memory_layout_agrees() -> None:
    """ALGORITHMS / HASH_KEYS / ALL_DOWN_POLICIES are in the C enum order; names fit FLB_NAME_LEN."""
    header = (REPO / "src" / "fastlb" / "includes" / "shm_layout.h").read_text(encoding="utf-8")

    def enum(name: str, prefix: str) -> tuple[str, ...]:
        body = re.search(rf"enum {name} \{{(.*?)\}};", header, re.S)
        assert body is not None, name
        pairs = re.findall(rf"{prefix}(\w+) = (\d+)", body.group(1))
        return tuple(n.lower() for n, _ in sorted(pairs, key=lambda p: int(p[1])))

    assert enum("flb_algorithm", "FLB_ALG_") == ALGORITHMS
    assert enum("flb_hash_key", "FLB_HASH_") == cfgmod.HASH_KEYS
    assert enum("flb_all_down", "FLB_ALL_DOWN_") == cfgmod.ALL_DOWN_POLICIES
    name_len = re.search(r"#define FLB_NAME_LEN\s+(\d+)", header)
    assert name_len is not None and int(name_len.group(1)) - 1 == cfgmod.MAX_NAME_BYTES


def test_docs_show_the_example() -> None:
    docs = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert (CONFIGS / "example.toml").read_text(encoding="utf-8").strip() in docs


# ---------------------------------------------------------------------------------------------------------
# Through the real CLI: exit code 2, one line on stderr naming file, key and problem; no traceback.


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """The environment for `python -m fastlb`: PYTHONPATH=<repo>/src only if fastlb is not importable without."""
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import fastlb.config"], env=env, capture_output=True)
    if probe.returncode != 0:
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    return env


def _check_config(path: Path | str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastlb", "check-config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


CLI_BAD: list[tuple[str, str, str, str]] = [
    ("syntax", '[listeners.web\nbind = "x"\n', "(syntax)", "line 1"),
    ("unknown-key", _pool("retires = 3"), "pools.web.retires", "unknown key"),
    ("wrong-type-bool", "[global]\nworkers = true\n" + MINIMAL, "global.workers", "boolean"),
    ("address-no-port", MINIMAL.replace("127.0.0.1:8080", "127.0.0.1"), "listeners.web.bind", "port"),
    ("address-not-ip", _pool(backends='{ name = "a", address = "db.example.com:5432" }'), "pools.web.backends[0].address", "not an IP"),
    ("duplicate-bind", MINIMAL + '[listeners.web2]\nbind = "127.0.0.1:8080"\npool = "web"\n', "listeners.web2.bind", "already"),
    ("unknown-pool", MINIMAL.replace('pool = "web"', 'pool = "api"'), "listeners.web.pool", "unknown pool"),
    ("no-backends", _pool(backends=""), "pools.web.backends", "backends"),
    ("duplicate-backend", _pool(backends='{ name = "a", address = "127.0.0.1:1" }, { name = "a", address = "127.0.0.1:2" }'), "pools.web.backends[1].name", "duplicate"),
    ("bad-name", _pool(backends='{ name = "a b", address = "127.0.0.1:1" }'), "pools.web.backends[0].name", "contains"),
    ("weight", _pool(backends='{ name = "a", address = "127.0.0.1:1", weight = 5000 }'), "pools.web.backends[0].weight", "range"),
    ("algorithm", _pool('algorithm = "fastest"'), "pools.web.algorithm", "unknown algorithm"),
    ("duration", _listener('idle_timeout = "-5m"'), "listeners.web.idle_timeout", "negative"),
    ("maglev-prime", _pool("maglev_table_size = 1000"), "pools.web.maglev_table_size", "prime"),
    ("timeout-over-interval", _health('type = "tcp"\ninterval = "1s"\ntimeout = "2s"'), "pools.web.health_check.timeout", "interval"),
    ("http-status", _health('type = "http"\nexpect_status = "200-999"'), "pools.web.health_check.expect_status", "range"),
    ("no-listeners", "", "listeners", "no listeners"),
    ("newline-in-name", MINIMAL.replace("[listeners.web]", '[listeners."a\\nb"]'), 'listeners."a\\nb"', "contains"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "word"), [c[1:] for c in CLI_BAD], ids=[c[0] for c in CLI_BAD])
def test_cli_rejects(tmp_path: Path, cli_env: dict[str, str], text: str, key: str, word: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    proc = _check_config(path, cli_env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fastlb: {path}: {key}: "), lines[0]
    assert word in lines[0]


def test_cli_missing_file(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "nope.toml"
    proc = _check_config(path, cli_env)
    assert proc.returncode == 2
    assert proc.stderr == f"fastlb: {path}: (file): cannot read the file: No such file or directory\n"


def test_cli_names_the_dns_names_of_discovered_pools(tmp_path: Path, cli_env: dict[str, str]) -> None:
    path = tmp_path / "dns.toml"
    path.write_text(
        '[listeners.web]\nbind = "127.0.0.1:8080"\npool = "redis"\n'
        '[pools.redis]\ndiscover = { srv = "_redis._tcp.service.consul", resolvers = ["127.0.0.1:8600"] }\n'
        '[pools.db]\ndiscover = { a = "db.internal", port = 5432 }\n'
        'backends = [{ name = "replica", address = "10.0.0.9:5432" }]\n'
    )
    proc = _check_config(path, cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"{path}: OK (1 listeners, 2 pools, 1 static backends, backends from DNS:"
        " _redis._tcp.service.consul (SRV, pool redis), db.internal (A/AAAA, pool db))\n"
    )


@pytest.mark.parametrize("name", ["example.toml", "full.toml"])
def test_cli_accepts(cli_env: dict[str, str], name: str) -> None:
    proc = _check_config(CONFIGS / name, cli_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"{CONFIGS / name}: OK (")
