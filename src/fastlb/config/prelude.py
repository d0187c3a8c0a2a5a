"""Config keys of the connection preludes (issue 10): PROXY protocol accept/send and the SNI peek.

Listener keys: `proxy_protocol` ("off" | "v1" | "v2" | "any"), `proxy_protocol_from` (CIDRs of the
trusted senders; required when proxy_protocol is not "off"), `sni_timeout` (bound on the whole
prelude: PROXY header and ClientHello), `sni_policy` ("default" | "reject": what a connection without
a usable server name gets on a listener with SNI routes). Pool key: `send_proxy` ("off" | "v1" | "v2").
Health-check key: `send_proxy` (true: the check sends the pool's PROXY header first).

STUB until the `routes` branch lands (it owns these keys and `routes`): `needs_sni` is computed from
`[[listeners.NAME.routes]]` entries that have a `match.sni`; nothing else of a route is read here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

from fastlb.config.values import _describe, _quote, _Table

PROXY_PROTOCOLS = ("off", "v1", "v2", "any")  # enum flb_proxy_protocol order
SEND_PROXY = ("off", "v1", "v2")  # enum flb_send_proxy order
SNI_POLICIES = ("default", "reject")  # enum flb_sni_policy order
MAX_PROXY_FROM = 64  # address ranges per listener
DEFAULT_SNI_TIMEOUT = 5.0  # seconds; HAProxy's usual `tcp-request inspect-delay 5s`

LISTENER_KEYS = ("proxy_protocol", "proxy_protocol_from", "sni_timeout", "sni_policy", "routes")
POOL_KEYS = ("send_proxy",)
HEALTH_KEYS = ("send_proxy",)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def listener_fields(t: _Table) -> dict[str, Any]:
    """The prelude fields of a ListenerConfig from its table (validated; one-line ConfigError)."""
    proto = t.get_choice("proxy_protocol", "off", PROXY_PROTOCOLS)
    nets: list[Network] = []
    if "proxy_protocol_from" in t.data:
        raw = t.data["proxy_protocol_from"]
        if proto == "off":
            raise t.error("proxy_protocol_from", 'has no effect with proxy_protocol = "off"')
        if not isinstance(raw, list) or not raw:
            raise t.error("proxy_protocol_from", f"expected a non-empty list of CIDRs, got {_describe(raw)}")
        if len(raw) > MAX_PROXY_FROM:
            raise t.error("proxy_protocol_from", f"{len(raw)} ranges; the limit is {MAX_PROXY_FROM}")
        for i, item in enumerate(raw):
            key = f"proxy_protocol_from[{i}]"
            if not isinstance(item, str):
                raise t.error(key, f"expected a CIDR string, got {_describe(item)}")
            try:
                nets.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                raise t.error(key, f"{_quote(item)} is not a CIDR ({exc})") from None
    elif proto != "off":
        raise t.error(
            "proxy_protocol_from",
            f'missing: proxy_protocol = "{proto}" needs the trusted senders (e.g. ["10.0.0.0/8"])',
        )
    needs_sni = False
    routes = t.data.get("routes", [])
    if not isinstance(routes, list):
        raise t.error("routes", f"expected an array of [[routes]] tables, got {_describe(routes)}")
    for r in routes:
        if isinstance(r, dict) and isinstance(r.get("match"), dict) and r["match"].get("sni"):
            needs_sni = True
    return {
        "proxy_protocol": proto,
        "proxy_protocol_from": tuple(nets),
        "sni_timeout": t.get_duration("sni_timeout", DEFAULT_SNI_TIMEOUT, positive=True),
        "sni_policy": t.get_choice("sni_policy", "default", SNI_POLICIES),
        "needs_sni": needs_sni,
    }


def pool_fields(t: _Table) -> dict[str, Any]:
    return {"send_proxy": t.get_choice("send_proxy", "off", SEND_PROXY)}


def health_fields(t: _Table) -> dict[str, Any]:
    """health_check.send_proxy (true | false) as a marker; resolved by resolve_health_send_proxy."""
    value = t.data.get("send_proxy", False)
    if not isinstance(value, bool):
        raise t.error("send_proxy", f"expected true or false, got {_describe(value)}")
    return {"send_proxy": "on" if value else "off"}


def resolve_health_send_proxy(pool: _Table, health: Any, send_proxy: str) -> Any:
    """health_check.send_proxy = true sends the pool's PROXY version (send_proxy "v1" | "v2");
    returns health with send_proxy set to that version, or "off"."""
    if health.send_proxy == "off":
        return health
    if send_proxy == "off":
        raise pool.error(
            "health_check.send_proxy", 'needs the pool\'s send_proxy = "v1" or "v2" (the header to send)'
        )
    return dataclasses.replace(health, send_proxy=send_proxy)
