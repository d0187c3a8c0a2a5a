"""Routes, splits and preludes of a listener (issue 10), and the pool's PROXY-protocol keys.

    [[listeners.NAME.routes]]
    name = "beta"
    match = { source = ["10.20.0.0/16"], sni = ["admin.example.com", "*.ops.example.com"] }
    backends = [{ pool = "v1", weight = 90 }, { pool = "v2", weight = 10 }]
    split_affinity = "none" | "source_ip"

Decisions (documented in docs/deployments.md and docs/config.md):
  * `pool = "X"` is the short form of one route "default" -> X; a listener has either `pool` or
    routes, not both.
  * A route without `match` is the default; at most one, and it must be the last (a route after it
    could never match).  No default route: a connection no route matches is refused (counted).
  * `source`: IPv4/IPv6 prefixes ("10.0.0.0/8", "2001:db8::/32", or one address); host bits set
    after the prefix are an error (it would not mean what it says).
  * `sni`: exact DNS names or one leading "*." (suffix match: "*.example.com" matches a.example.com
    and a.b.example.com, never example.com); case-insensitive (stored lower case).
  * weights 0..1000, default 1; every weight 0 is allowed and means a closed route (it takes its
    connections and refuses them, counted): the switch-off position of a blue-green route.
  * `proxy_protocol` other than "off" needs `proxy_protocol_from` (no implicit trust); an SNI
    listener may also accept PROXY (v1, v2 or any): the header comes first, then the ClientHello.
  * `sni_timeout` (HAProxy's `tcp-request inspect-delay`) and `sni_no_match` apply only where a
    prelude is read (sni routes or proxy_protocol).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from fastlb.config.model import (
    MAX_MATCH_ENTRIES,
    MAX_ROUTES,
    MAX_SNI_BYTES,
    MAX_SPLIT,
    MAX_WEIGHT,
    PROXY_PROTOCOLS,
    SEND_PROXY,
    SNI_NO_MATCH,
    SPLIT_AFFINITIES,
    ConfigError,
    IPNetwork,
    ListenerConfig,
    PoolConfig,
    RouteConfig,
    SplitTarget,
)
from fastlb.config.values import _check_name, _describe, _did_you_mean, _quote, _Table

LISTENER_KEYS = ("routes", "proxy_protocol", "proxy_protocol_from", "sni_timeout", "sni_no_match")
_ROUTE_KEYS = ("name", "match", "backends", "split_affinity")
_MATCH_KEYS = ("source", "sni")
_TARGET_KEYS = ("pool", "weight")
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def listener_routes(t: _Table) -> tuple[str, tuple[RouteConfig, ...]]:
    """The listener's `pool` (short form) or its routes: (pool for ListenerConfig.pool, routes).
    With the short form the routes are () (ListenerConfig fills in the default route)."""
    has_pool, has_routes = "pool" in t.data, "routes" in t.data
    if has_pool and has_routes:
        raise t.error(
            "routes", 'give either pool = "NAME" (one default route) or [[...routes]] tables, not both'
        )
    if not has_routes:
        pool = t.required("pool", ' (pool = "NAME", or [[listeners.NAME.routes]] tables)')
        if not isinstance(pool, str):
            raise t.error("pool", f"expected a pool name (a string), got {_describe(pool)}")
        return pool, ()
    raw = t.data["routes"]
    key = t.key("routes")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(t.file, key, "expected one or more [[routes]] tables")
    if len(raw) > MAX_ROUTES:
        raise ConfigError(t.file, key, f"{len(raw)} routes; the limit is {MAX_ROUTES} per listener")
    routes: list[RouteConfig] = []
    names: dict[str, int] = {}
    default: RouteConfig | None = None
    for i, item in enumerate(raw):
        rt = _Table(item, f"{key}[{i}]", t.file, 'a table like { name = "default", backends = [...] }')
        route = _route(rt)
        if route.name in names:
            raise rt.error(
                "name", f"duplicate route name {_quote(route.name)} (also routes[{names[route.name]}])"
            )
        names[route.name] = i
        if default is not None:
            raise rt.error(
                "name",
                f"route {_quote(route.name)} comes after the default route {_quote(default.name)} "
                "(a route without match takes every connection); move it before the default",
            )
        if not route.has_match:
            default = route
        routes.append(route)
    main = default or routes[0]
    return main.backends[0].pool, tuple(routes)


def _route(t: _Table) -> RouteConfig:
    t.only(_ROUTE_KEYS)
    name = t.required("name")
    _check_name(name, t.key("name"), t.file, "route")
    source: tuple[IPNetwork, ...] = ()
    sni: tuple[str, ...] = ()
    if "match" in t.data:
        m = _Table(t.data["match"], t.key("match"), t.file, 'a table like { source = ["10.0.0.0/8"] }')
        m.only(_MATCH_KEYS)
        if not m.data:
            raise t.error("match", "empty match; leave match out to make this the default route")
        if "source" in m.data:
            source = cidr_list(m, "source")
        if "sni" in m.data:
            sni = _sni_list(m)
    backends = _targets(t)
    return RouteConfig(
        name=name,
        source=source,
        sni=sni,
        backends=backends,
        split_affinity=t.get_choice("split_affinity", "none", SPLIT_AFFINITIES),
    )


def cidr_list(t: _Table, name: str) -> tuple[IPNetwork, ...]:
    """A non-empty array of IPv4/IPv6 prefixes ("10.0.0.0/8", "::1/128", or a bare address)."""
    raw = t.data[name]
    key = t.key(name)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            t.file, key, f'expected a non-empty array of prefixes like ["10.0.0.0/8"], got {_describe(raw)}'
        )
    if len(raw) > MAX_MATCH_ENTRIES:
        raise ConfigError(t.file, key, f"{len(raw)} prefixes; the limit is {MAX_MATCH_ENTRIES}")
    out: list[IPNetwork] = []
    for i, text in enumerate(raw):
        k = f"{key}[{i}]"
        if not isinstance(text, str):
            raise ConfigError(t.file, k, f'expected a prefix string like "10.0.0.0/8", got {_describe(text)}')
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            try:
                loose = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ConfigError(t.file, k, f"{_quote(text)} is not an IP prefix ({exc})") from None
            raise ConfigError(
                t.file,
                k,
                f"{_quote(text)} has host bits set after the prefix (did you mean {_quote(str(loose))}?)",
            ) from None
        out.append(net)
    return tuple(out)


def _sni_list(t: _Table) -> tuple[str, ...]:
    raw = t.data["sni"]
    key = t.key("sni")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            t.file, key, f'expected a non-empty array of names like ["example.com"], got {_describe(raw)}'
        )
    if len(raw) > MAX_MATCH_ENTRIES:
        raise ConfigError(t.file, key, f"{len(raw)} names; the limit is {MAX_MATCH_ENTRIES}")
    return tuple(sni_pattern(text, f"{key}[{i}]", t.file) for i, text in enumerate(raw))


def sni_pattern(text: object, key: str, file: str) -> str:
    """A server-name pattern, lower case: an exact DNS name, or "*." and a DNS name."""
    if not isinstance(text, str):
        raise ConfigError(file, key, f'expected a server name like "example.com", got {_describe(text)}')
    name = text.lower()
    host = name[2:] if name.startswith("*.") else name
    if "*" in host:
        raise ConfigError(
            file,
            key,
            f'{_quote(text)}: a wildcard is allowed only as one leading "*." (e.g. "*.example.com")',
        )
    if not host or len(name.encode()) > MAX_SNI_BYTES:
        raise ConfigError(file, key, f"{_quote(text)} is not a DNS name of 1..{MAX_SNI_BYTES} bytes")
    if host.endswith("."):
        raise ConfigError(file, key, f"{_quote(text)}: no trailing dot (TLS server names never have one)")
    for label in host.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise ConfigError(
                file,
                key,
                f"{_quote(text)}: label {_quote(label)} is not a DNS label (letters, digits, - and _; 1..63)",
            )
    return name


def _targets(t: _Table) -> tuple[SplitTarget, ...]:
    raw = t.required("backends", ' (e.g. backends = [{ pool = "v1" }])')
    key = t.key("backends")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            t.file, key, f'expected a non-empty array like [{{ pool = "v1" }}], got {_describe(raw)}'
        )
    if len(raw) > MAX_SPLIT:
        raise ConfigError(t.file, key, f"{len(raw)} pools; a route splits between at most {MAX_SPLIT}")
    out: list[SplitTarget] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        bt = _Table(item, f"{key}[{i}]", t.file, 'a table like { pool = "v1", weight = 90 }')
        bt.only(_TARGET_KEYS)
        pool = bt.required("pool")
        if not isinstance(pool, str):
            raise bt.error("pool", f"expected a pool name (a string), got {_describe(pool)}")
        if pool in seen:
            raise bt.error("pool", f"pool {_quote(pool)} is already in this route (backends[{seen[pool]}])")
        seen[pool] = i
        out.append(SplitTarget(pool, bt.get_int("weight", 1, 0, MAX_WEIGHT)))
    return tuple(out)


def listener_prelude(t: _Table, routes: tuple[RouteConfig, ...]) -> dict[str, Any]:
    """proxy_protocol, proxy_protocol_from, sni_timeout, sni_no_match (ListenerConfig keywords)."""
    pp = t.get_choice("proxy_protocol", "off", PROXY_PROTOCOLS)
    trusted: tuple[IPNetwork, ...] = ()
    if "proxy_protocol_from" in t.data:
        if pp == "off":
            raise t.error("proxy_protocol_from", 'has no effect with proxy_protocol = "off"')
        trusted = cidr_list(t, "proxy_protocol_from")
    elif pp != "off":
        raise t.error(
            "proxy_protocol_from",
            f'missing: proxy_protocol = "{pp}" needs the trusted senders, e.g. proxy_protocol_from = ["10.0.0.0/8"]',
        )
    needs_sni = any(r.sni for r in routes)
    for key in ("sni_timeout", "sni_no_match"):
        if key in t.data and not needs_sni and (key == "sni_no_match" or pp == "off"):
            what = "sni routes" if key == "sni_no_match" else "sni routes or proxy_protocol"
            raise t.error(key, f"applies only to a listener with {what}")
    return {
        "proxy_protocol": pp,
        "proxy_protocol_from": trusted,
        "sni_timeout": t.get_duration("sni_timeout", 5.0, positive=True),
        "sni_no_match": t.get_choice("sni_no_match", "default", SNI_NO_MATCH),
    }


def check_route_pools(
    listeners: dict[str, ListenerConfig], pools: dict[str, PoolConfig], file: str, short_form: set[str]
) -> None:
    """Every pool a route names exists (short_form: listeners written as `pool = "X"`)."""
    defined = ", ".join(pools) if pools else "none"
    for lst in listeners.values():
        for i, route in enumerate(lst.routes):
            for j, target in enumerate(route.backends):
                if target.pool in pools:
                    continue
                key = f"listeners.{lst.name}." + (
                    "pool" if lst.name in short_form else f"routes[{i}].backends[{j}].pool"
                )
                raise ConfigError(
                    file,
                    key,
                    f"unknown pool {_quote(target.pool)}{_did_you_mean(target.pool, pools)}; defined pools: {defined}",
                )


def pool_send_proxy(t: _Table) -> str:
    return t.get_choice("send_proxy", "off", SEND_PROXY)


def health_send_proxy(t: _Table, pool_version: str) -> str:
    """health_check.send_proxy: true (the pool's version), false, or "off" | "v1" | "v2"."""
    value = t.data.get("send_proxy", False)
    if isinstance(value, bool):
        if value and pool_version == "off":
            raise t.error(
                "send_proxy", 'true copies the pool\'s send_proxy, which is "off"; give "v1" or "v2" here'
            )
        return pool_version if value else "off"
    if not isinstance(value, str) or value not in SEND_PROXY:
        raise t.error(
            "send_proxy", f"expected true, false, or one of {', '.join(SEND_PROXY)}, got {_describe(value)}"
        )
    return value
