"""UDP listeners and UDP health checks (issue 13): the keys and their validation.

loader.py calls `listener_udp_fields` for every listener and `health_udp_fields` for the UDP check
types; everything UDP-specific about the configuration lives here.
"""

from __future__ import annotations

from fastlb.config.values import _fmt_seconds, _quote, _Table

PROTOCOLS = ("tcp", "udp")
UDP_LISTENER_KEYS = ("udp_idle_timeout", "udp_responses", "max_flows")
TCP_ONLY_LISTENER_KEYS = (
    "connect_timeout",
    "idle_timeout",
    "max_connections",
    "backlog",
    # preludes read a TCP stream (PROXY header, TLS ClientHello): nothing of the sort for datagrams
    "proxy_protocol",
    "proxy_protocol_from",
    "sni_timeout",
    "sni_no_match",
    "sni_policy",
    # TCP keepalive and user timeout (issue 21, config/protect.py)
    "client_keepalive",
    "tcp_user_timeout",
)
UDP_HEALTH_CHECK_TYPES = ("udp_send_expect", "dns")
UDP_HEALTH_TYPE_KEYS = {"udp_send_expect": ("send", "expect"), "dns": ("query",)}

DEFAULT_UDP_IDLE_TIMEOUT = 30.0
DEFAULT_UDP_RESPONSES = 0  # 0 = unknown: a flow ends only by udp_idle_timeout
DEFAULT_MAX_FLOWS = 100_000
MAX_UDP_RESPONSES = 1000
MAX_MAX_FLOWS = 10_000_000
# flows expire through the timer wheel of the data plane (core/timers.pxi): 4096 ticks of 10 ms;
# longer deadlines are re-armed, so any uint32 millisecond value works
MAX_UDP_IDLE_TIMEOUT = 86400.0


def listener_udp_fields(t: _Table) -> dict:
    """protocol and the UDP keys of one [listeners.NAME] table, as ListenerConfig keyword arguments.

    UDP keys on a TCP listener, and TCP-only keys on a UDP listener, are errors naming the key."""
    protocol = t.get_choice("protocol", "tcp", PROTOCOLS)
    if protocol == "tcp":
        for key in UDP_LISTENER_KEYS:
            if key in t.data:
                raise t.error(key, 'applies only to protocol = "udp"')
        return {"protocol": "tcp"}
    for key in TCP_ONLY_LISTENER_KEYS:
        if key in t.data:
            hint = "; use udp_idle_timeout" if key == "idle_timeout" else ""
            hint = "; use max_flows" if key == "max_connections" else hint
            raise t.error(key, f'applies only to protocol = "tcp"{hint}')
    idle = t.get_duration("udp_idle_timeout", DEFAULT_UDP_IDLE_TIMEOUT, positive=True)
    if idle > MAX_UDP_IDLE_TIMEOUT:
        raise t.error("udp_idle_timeout", f"{_fmt_seconds(idle)} is longer than the limit of 1 day")
    return {
        "protocol": "udp",
        "udp_idle_timeout": idle,
        "udp_responses": t.get_int("udp_responses", DEFAULT_UDP_RESPONSES, 0, MAX_UDP_RESPONSES),
        "max_flows": t.get_int("max_flows", DEFAULT_MAX_FLOWS, 1, MAX_MAX_FLOWS),
    }


def check_udp_routes(t: _Table, protocol: str, needs_sni: bool) -> None:
    """A UDP listener's routes match on the source address only (a datagram has no server name)."""
    if protocol == "udp" and needs_sni:
        raise t.error(
            "routes", 'match.sni applies only to protocol = "tcp" (UDP routes match on source only)'
        )


def health_udp_fields(kind: str, t: _Table) -> dict:
    """send/expect (udp_send_expect) or query (dns) of a health_check table, as HealthCheckConfig
    keyword arguments."""
    if kind == "udp_send_expect":
        if "send" not in t.data:
            raise t.error("send", 'missing required key for type = "udp_send_expect" (the datagram to send)')
        send = t.get_str("send", "").encode("utf-8")
        if not send:
            raise t.error("send", "must not be empty (a UDP check needs a datagram to send)")
        if "expect" not in t.data:
            raise t.error(
                "expect",
                'missing required key for type = "udp_send_expect" (the bytes a healthy reply starts with)',
            )
        expect = t.get_str("expect", "").encode("utf-8")
        if not expect:
            raise t.error("expect", "must not be empty")
        return {"send": send, "expect": expect}
    if "query" not in t.data:
        raise t.error(
            "query", 'missing required key for type = "dns" (a name to ask for, e.g. "example.com")'
        )
    query = t.get_str("query", "")
    # dnspython only here: the config package is read by the CLI and by check-config, stdlib otherwise
    import dns.exception
    import dns.name

    try:
        name = dns.name.from_text(query)
    except dns.exception.DNSException as exc:
        raise t.error("query", f"{_quote(query)} is not a DNS name: {exc}") from None
    if name == dns.name.root or not query.strip(". "):
        raise t.error("query", "must name something below the root (e.g. example.com)")
    return {"query": query}
