"""Configuration for running fastlb as one of a fleet: the remote admin API ([global] admin*) and
DNS service discovery (a pool's `discover` table)."""

from __future__ import annotations

import ipaddress
import os
import re

from fastlb.config.model import Address, AdminConfig, DiscoverConfig
from fastlb.config.values import _describe, _quote, _Table, parse_address

ADMIN_KEYS = (
    "admin",
    "admin_token_file",
    "admin_tls_cert",
    "admin_tls_key",
    "admin_header_timeout",
    "admin_keepalive_timeout",
    "admin_max_connections",
)
MAX_ADMIN_CONNECTIONS = 65536
DISCOVER_KEYS = (
    "srv",
    "a",
    "port",
    "resolvers",
    "min_interval",
    "max_interval",
    "max_backends",
    "initial_timeout",
)
MAX_INITIAL_TIMEOUT = 300.0  # seconds a start may wait for its first DNS answer
MAX_DISCOVERED = 256  # backend slots a discovered pool reserves at most
_DNS_NAME_RE = re.compile(
    r"(?=.{1,253}\.?$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?"
)


def parse_admin(t: _Table) -> AdminConfig | None:
    """The admin API keys of [global]; None when `admin` is absent (the API is off).

    Off loopback a bearer token is required: an admin API reachable from the network without one
    would let anyone who can reach the port drain the fleet.  Without a token (loopback) the API is
    read-only: any local user could otherwise do what only the 0600 control socket's owner may."""
    if "admin" not in t.data:
        for k in ADMIN_KEYS[1:]:
            if k in t.data:
                raise t.error(k, 'applies only with admin = "ADDRESS:PORT" (the admin API is off)')
        return None
    bind = parse_address(t.data["admin"], t.key("admin"), t.file)
    token_file = _path(t, "admin_token_file")
    cert, key = _path(t, "admin_tls_cert"), _path(t, "admin_tls_key")
    if (cert is None) != (key is None):
        missing = "admin_tls_key" if key is None else "admin_tls_cert"
        raise t.error(missing, "admin_tls_cert and admin_tls_key go together (TLS needs both)")
    if token_file is None and not ipaddress.ip_address(bind.host).is_loopback:
        raise t.error(
            "admin_token_file",
            f"the admin API binds {bind}, which is not loopback: set admin_token_file (a bearer token)",
        )
    d = AdminConfig(bind)
    return AdminConfig(
        bind=bind,
        token_file=token_file,
        tls_cert=cert,
        tls_key=key,
        header_timeout=t.get_duration("admin_header_timeout", d.header_timeout, positive=True),
        keepalive_timeout=t.get_duration("admin_keepalive_timeout", d.keepalive_timeout, positive=True),
        max_connections=t.get_int("admin_max_connections", d.max_connections, 1, MAX_ADMIN_CONNECTIONS),
    )


def read_admin_token(path: str) -> str:
    """The bearer token: the first line of `path`, stripped.  The file must belong to this process's
    uid (or root) and be neither readable nor writable by group or others, as ssh wants of a
    private key: any local user could otherwise read it and do what the 0600 control socket allows
    only its owner.  Raises ValueError with one line naming the file (OSError when unreadable)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        uid = os.geteuid()
        if st.st_uid not in (uid, 0):
            raise ValueError(
                f"{path}: the token file belongs to uid {st.st_uid}, not to the service's uid {uid} "
                "(chown it)"
            )
        if st.st_mode & 0o077:
            raise ValueError(
                f"{path}: the token file is open to group or others (mode {st.st_mode & 0o777:04o}); "
                "chmod 600 it"
            )
        with os.fdopen(os.dup(fd), encoding="utf-8") as f:
            token = f.readline().strip()
    finally:
        os.close(fd)
    if len(token) < 16:
        raise ValueError(f"{path}: the token must be at least 16 characters")
    return token


def describe_admin(cfg: AdminConfig) -> str:
    """One line for `fastlb check-config`: what the admin API lets through, and to whom."""
    scheme = "https" if cfg.tls_cert else "http"
    if cfg.read_only:
        return (
            f"admin API on {scheme}://{cfg.bind}: read-only without admin_token_file (GET /v1/status, "
            "/v1/rollout-status, /metrics); every change is refused (401) - set admin_token_file, or use the control socket"
        )
    return (
        f"admin API on {scheme}://{cfg.bind}: every request needs the bearer token in {cfg.token_file}; "
        "gate commands (check) only from [rollouts.NAME] tables"
    )


def _path(t: _Table, name: str) -> str | None:
    if name not in t.data:
        return None
    value = t.get_str(name, "")
    if not value.startswith("/"):
        raise t.error(name, f"{_quote(value)} must be an absolute path")
    return os.path.normpath(value)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_discover(pool: _Table) -> DiscoverConfig | None:
    """A pool's `discover = { srv = NAME | a = NAME, port = P, resolvers = [...], ... }`."""
    if "discover" not in pool.data:
        return None
    t = _Table(
        pool.data["discover"],
        pool.key("discover"),
        pool.file,
        'a table like { srv = "_redis._tcp.service.consul" } or { a = "redis.internal", port = 6379 }',
    )
    t.only(DISCOVER_KEYS)
    if ("srv" in t.data) == ("a" in t.data):
        raise t.error("srv", 'give exactly one of srv = "_service._tcp.NAME" or a = "NAME" (with port)')
    kind = "srv" if "srv" in t.data else "a"
    name = t.get_str(kind, "")
    if not _DNS_NAME_RE.fullmatch(name):
        raise t.error(kind, f"{_quote(name)} is not a DNS name")
    port = None
    if kind == "a":
        if "port" not in t.data:
            raise t.error("port", "missing required key (the backends' port; A/AAAA records carry none)")
        port = t.get_int("port", 0, 1, 65535)
    elif "port" in t.data:
        raise t.error("port", "applies only to a = NAME (SRV records carry their own ports)")
    resolvers: list[Address] = []
    raw = t.data.get("resolvers", [])
    if not isinstance(raw, list):
        raise t.error("resolvers", f'expected an array like ["127.0.0.1:53"], got {_describe(raw)}')
    for i, item in enumerate(raw):
        if isinstance(item, str) and _is_ip(item):  # a bare address: the DNS port
            item = f"[{item}]:53" if ":" in item else f"{item}:53"
        resolvers.append(parse_address(item, f"{t.key('resolvers')}[{i}]", t.file))
    min_interval = t.get_duration("min_interval", 1.0, positive=True)
    max_interval = t.get_duration("max_interval", 300.0, positive=True)
    if max_interval < min_interval:
        raise t.error("max_interval", f"is below min_interval ({min_interval:g}s)")
    initial_timeout = t.get_duration("initial_timeout", 5.0)
    if initial_timeout > MAX_INITIAL_TIMEOUT:
        raise t.error(
            "initial_timeout", f"is over {MAX_INITIAL_TIMEOUT:g}s (a start waits that long at most)"
        )
    return DiscoverConfig(
        kind=kind,
        name=name.rstrip(".") + ".",
        port=port,
        resolvers=tuple(resolvers),
        min_interval=min_interval,
        max_interval=max_interval,
        max_backends=t.get_int("max_backends", 64, 1, MAX_DISCOVERED),
        initial_timeout=initial_timeout,
    )
