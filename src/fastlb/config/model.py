"""Configuration model: the limits, the frozen dataclasses and ConfigError.

Limits come from the shared-memory layout (includes/shm_layout.h): names fit FLB_NAME_LEN with its NUL,
timeouts are stored as uint32 milliseconds, weights are 0..1000.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

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
HEALTH_CHECK_TYPES = ("tcp", "http", "send_expect", "udp_send_expect", "dns")  # last two: config/udp.py
ALL_DOWN_POLICIES = ("reject", "panic")  # enum flb_all_down order
LOG_LEVELS = ("debug", "info", "warning", "error")
SPLIT_AFFINITIES = ("none", "source_ip")  # enum flb_split_affinity order
PROXY_PROTOCOLS = ("off", "v1", "v2", "any")  # enum flb_proxy_protocol order (accept side)
SEND_PROXY = ("off", "v1", "v2")  # what fastlb can send
SNI_NO_MATCH = ("default", "reject")  # enum flb_sni_policy order (key sni_no_match, alias sni_policy)

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
MAX_ROUTES = 64  # per listener
MAX_SPLIT = 15  # FLB_MAX_SPLIT: pools in one route's split
MAX_MATCH_ENTRIES = 1024  # source prefixes or sni patterns in one route (and proxy_protocol_from)
MAX_SNI_BYTES = 253  # a DNS name
MAX_PRIORITY = 65535  # a backend's priority group (an SRV record's priority field)
BACKUP_PRIORITY = 65536  # FLB_PRIORITY_BACKUP: `backup = true`, after every numbered group


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
    priority: int = 0  # priority group, lower first (0..65535; backup = BACKUP_PRIORITY): config/protect.py
    backup: bool = False  # `backup = true`: the group after every other one

    @property
    def priority_name(self) -> str:
        return "backup" if self.backup else str(self.priority)


@dataclass(frozen=True)
class HealthCheckConfig:
    type: str  # "tcp" | "http" | "send_expect" | "udp_send_expect" | "dns"
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
    query: str | None = None  # dns: the name of the A query (config/udp.py)
    send_proxy: str = "off"  # "off" | "v1" | "v2" (the loader resolves `true` to the pool's version)


@dataclass(frozen=True)
class OutlierConfig:
    """Passive ejection, Envoy semantics: eject after N consecutive connect failures."""

    consecutive_failures: int = 5  # 0 = disabled
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 50  # 0..100
    # a passing active health check ends an ejection at once (Envoy's name and default)
    successful_active_health_check_uneject_host: bool = True


@dataclass(frozen=True)
class KeepaliveConfig:
    """TCP keepalive of one side (config/protect.py): client_keepalive on a listener,
    backend_keepalive on a pool.  Whole seconds (the kernel counts TCP_KEEPIDLE/INTVL in seconds)."""

    idle: int = 60  # TCP_KEEPIDLE: seconds without traffic before the first probe
    interval: int = 10  # TCP_KEEPINTVL: seconds between unanswered probes
    count: int = 6  # TCP_KEEPCNT: unanswered probes before the connection is reset


@dataclass(frozen=True)
class DiscoverConfig:
    """DNS service discovery for a pool (fastlb.fleet.discovery): SRV, or A/AAAA plus a port."""

    kind: str  # "srv" | "a"
    name: str  # fully qualified, with the trailing dot
    port: int | None  # for kind "a"
    resolvers: tuple[Address, ...] = ()  # empty: the system resolver (/etc/resolv.conf)
    min_interval: float = 1.0  # re-resolve at the record's TTL, bounded by these
    max_interval: float = 300.0
    max_backends: int = 64  # backend slots reserved for what DNS returns
    initial_timeout: float = 5.0  # no static backends: wait this long for the first answer at start


@dataclass(frozen=True)
class AdminConfig:
    """The remote admin API (fastlb.fleet.admin): HTTP JSON, bearer token, optional TLS."""

    bind: Address
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    header_timeout: float = 10.0  # a connection's first request head must be in by then
    keepalive_timeout: float = 30.0  # an idle kept-alive connection is closed after this
    max_connections: int = 256  # open at once; one more is accepted and closed at once

    @property
    def read_only(self) -> bool:
        """No token: GET /v1/status, /v1/rollout-status and /metrics only; every change is 401."""
        return self.token_file is None


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
    discover: DiscoverConfig | None = None
    send_proxy: str = "off"  # "off" | "v1" | "v2": PROXY header written to the backends first
    backend_keepalive: KeepaliveConfig | None = None  # None: no keepalive on backend sockets
    tcp_user_timeout: float = 0.0  # backend sockets' TCP_USER_TIMEOUT, seconds; 0 = the kernel's


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SplitTarget:
    """One entry of a route's split: a pool and its weight (0..1000)."""

    pool: str
    weight: int = 1


@dataclass(frozen=True)
class RouteConfig:
    """One route of a listener (config/routes.py): the first route whose match holds takes the
    connection; a route without a match (no source, no sni) is the default, always the last."""

    name: str
    source: tuple[IPNetwork, ...] = ()
    sni: tuple[str, ...] = ()  # lower case; exact names or "*.suffix"
    backends: tuple[SplitTarget, ...] = ()
    split_affinity: str = "none"  # "none" | "source_ip"

    @property
    def has_match(self) -> bool:
        return bool(self.source or self.sni)


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    pool: str  # the short form's pool; with routes, the first pool of the default (else first) route
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    max_connections: int = 0  # 0 = unlimited
    backlog: int = 4096
    half_close_timeout: float = 60.0  # after one side finished, the other's limit; 0 = none
    # UDP (issue 13, config/udp.py); the four keys above apply to TCP only
    protocol: str = "tcp"  # "tcp" | "udp"
    udp_idle_timeout: float = 30.0  # a flow with no datagram either way for this long is forgotten
    udp_responses: int = 0  # replies expected per client datagram; 0 = unknown
    max_flows: int = 100_000  # across all workers
    routes: tuple[RouteConfig, ...] = ()  # () = the short form: one route "default" -> pool
    proxy_protocol: str = "off"  # "off" | "v1" | "v2" | "any"
    proxy_protocol_from: tuple[IPNetwork, ...] = ()  # senders trusted to send a PROXY header
    sni_timeout: float = 5.0  # how long the prelude (PROXY header, ClientHello) may take
    sni_policy: str = "default"  # key sni_no_match (alias sni_policy): no server name: "default" | "reject"
    announce: bool = False  # keep a /32 or /128 route for the bind address (fleet/announce.py)
    client_keepalive: KeepaliveConfig | None = None  # None: no keepalive on accepted sockets
    tcp_user_timeout: float = 0.0  # accepted sockets' TCP_USER_TIMEOUT, seconds; 0 = the kernel's

    def __post_init__(self) -> None:
        if not self.routes:
            default = RouteConfig("default", backends=(SplitTarget(self.pool, 1),))
            object.__setattr__(self, "routes", (default,))

    @property
    def needs_sni(self) -> bool:
        """Does any route match on sni (the worker then reads the ClientHello before routing)?"""
        return any(r.sni for r in self.routes)

    @property
    def sni_no_match(self) -> str:
        """The config key's name for sni_policy."""
        return self.sni_policy


STATE_DIRECTORY = "/var/lib/fastlb"  # the shipped unit's StateDirectory=fastlb


def default_state_file(control_socket: str) -> str:
    """`[global] state_file` when the file does not set it: one per control socket (two instances
    on a host never share one), and /var/lib/fastlb/state.json for the default control socket (so
    existing installs keep their state): e.g. /run/fastlb/edge.sock ->
    /var/lib/fastlb/edge-<8 hex digits of the socket path's SHA-256>.state.json."""
    if control_socket == GlobalConfig.control_socket:
        return f"{STATE_DIRECTORY}/state.json"
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(control_socket)).removesuffix(".sock")
    digest = hashlib.sha256(control_socket.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{STATE_DIRECTORY}/{(name or 'control')[:40]}-{digest}.state.json"


@dataclass(frozen=True)
class AnnounceConfig:
    """[global] announce_*: how the control process announces listener addresses (fleet/announce.py)
    as routes in a kernel table that a routing daemon (BIRD, FRR) exports by BGP."""

    default: bool = False  # [global] announce: every listener announces unless it says otherwise
    table: int = 200  # announce_table: the kernel routing table of the routes
    protocol: int = 4  # announce_protocol: rtm_protocol the routes carry (a daemon filters on it)
    rise: float = 2.0  # announce_rise: usable this long before (re-)announcing
    withdraw_delay: float = 5.0  # announce_withdraw_delay: keep accepting after a withdrawal on stop


@dataclass(frozen=True)
class GlobalConfig:
    workers: int = field(default_factory=_default_workers)
    control_socket: str = "/run/fastlb/control.sock"
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    # runtime changes kept across reload/restart; the loader derives it from control_socket
    # (default_state_file) when the file does not set it
    state_file: str = "/var/lib/fastlb/state.json"
    admin: AdminConfig | None = None
    access_log: str = "off"  # "off" | "stdout" | an absolute path
    access_log_format: str = "json"  # "json" | "text"
    access_log_buffer: int = 16384  # records per worker ring
    orphan_timeout: float = 300.0  # workers whose control process died drain this long after
    worker_stall_timeout: float = 3.0  # a worker's heartbeat older than this: killed and replaced
    metrics: Address | None = None  # Prometheus /metrics listen address; None = off
    # a reload with changes the running process cannot apply (listeners added, removed or re-bound,
    # workers, pools added or removed, ...) starts `fastlb serve --takeover` to apply them
    reload_takeover: bool = True
    announce: AnnounceConfig = AnnounceConfig()
    # workers drop to these after their sockets are open (fastlb.worker.drop_privileges); the
    # control process keeps its own (takeovers, binds on reload).  run_as: (uid or -1, gid or -1)
    user: str | None = None
    group: str | None = None
    run_as: tuple[int, int] | None = None


@dataclass(frozen=True)
class Config:
    file: str
    global_: GlobalConfig
    listeners: dict[str, ListenerConfig]  # file order
    pools: dict[str, PoolConfig]  # file order
    rollouts: dict = field(default_factory=dict)  # name -> config.rollouts.RolloutConfig


def _one_line(text: str) -> str:
    """Escape anything that is not printable (newlines, tabs, escapes) so a message stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
