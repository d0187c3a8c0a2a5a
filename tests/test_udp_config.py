"""UDP listener and UDP health-check configuration (issue 13): keys, defaults and one-line errors."""

from __future__ import annotations

import pytest

from fastlb.config import ConfigError, parse_config

POOL = '[pools.p]\nbackends = [{ name = "a", address = "127.0.0.1:5353" }]\n'


def listener(extra: str, bind: str = "127.0.0.1:53") -> str:
    return f'[listeners.l]\nbind = "{bind}"\npool = "p"\n{extra}\n' + POOL


def error(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.toml")
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_issue_example_parses():
    cfg = parse_config(
        """
[listeners.dns]
bind = "0.0.0.0:53"
protocol = "udp"
pool = "resolvers"
udp_idle_timeout = "30s"
udp_responses = 1
max_flows = 100000

[pools.resolvers]
backends = [{ name = "r1", address = "127.0.0.1:5353" }]
health_check = { type = "dns", query = "example.com" }
"""
    )
    lc = cfg.listeners["dns"]
    assert (lc.protocol, lc.udp_idle_timeout, lc.udp_responses, lc.max_flows) == ("udp", 30.0, 1, 100000)
    hc = cfg.pools["resolvers"].health_check
    assert hc is not None and hc.type == "dns" and hc.query == "example.com"


def test_defaults():
    lc = parse_config(listener('protocol = "udp"')).listeners["l"]
    assert (lc.protocol, lc.udp_idle_timeout, lc.udp_responses, lc.max_flows) == ("udp", 30.0, 0, 100_000)
    assert parse_config(listener("")).listeners["l"].protocol == "tcp"


def test_tcp_and_udp_on_the_same_port():
    text = (
        '[listeners.u]\nbind = "127.0.0.1:53"\nprotocol = "udp"\npool = "p"\n'
        '[listeners.t]\nbind = "127.0.0.1:53"\npool = "p"\n' + POOL
    )
    cfg = parse_config(text)
    assert [lc.protocol for lc in cfg.listeners.values()] == ["udp", "tcp"]
    twice = text.replace(
        '[listeners.t]\nbind = "127.0.0.1:53"\n', '[listeners.t]\nbind = "127.0.0.1:53"\nprotocol = "udp"\n'
    )
    assert "already the bind address of listener" in error(twice)


@pytest.mark.parametrize(
    "extra, key, problem",
    [
        ('protocol = "sctp"', "listeners.l.protocol", 'unknown protocol "sctp"'),
        ("udp_responses = 1", "listeners.l.udp_responses", 'applies only to protocol = "udp"'),
        ('udp_idle_timeout = "5s"', "listeners.l.udp_idle_timeout", 'applies only to protocol = "udp"'),
        ("max_flows = 10", "listeners.l.max_flows", 'applies only to protocol = "udp"'),
        ('protocol = "udp"\nidle_timeout = "5s"', "listeners.l.idle_timeout", "use udp_idle_timeout"),
        ('protocol = "udp"\nmax_connections = 5', "listeners.l.max_connections", "use max_flows"),
        ('protocol = "udp"\nmax_flows = 0', "listeners.l.max_flows", "out of range"),
        ('protocol = "udp"\nudp_responses = -1', "listeners.l.udp_responses", "out of range"),
        ('protocol = "udp"\nudp_idle_timeout = "0s"', "listeners.l.udp_idle_timeout", ""),
        ('protocol = "udp"\nudp_idle_timeout = "25h"', "listeners.l.udp_idle_timeout", "limit of 1 day"),
    ],
)
def test_listener_errors(extra, key, problem):
    msg = error(listener(extra))
    assert msg.startswith(f"f.toml: {key}: "), msg
    assert problem in msg


@pytest.mark.parametrize(
    "check, key, problem",
    [
        ('{ type = "dns" }', "query", "missing required key"),
        ('{ type = "dns", query = "a..b" }', "query", "is not a DNS name"),
        ('{ type = "dns", query = "." }', "query", "below the root"),
        ('{ type = "dns", query = "x", send = "y" }', "send", "applies only to type"),
        ('{ type = "udp_send_expect", expect = "y" }', "send", "missing required key"),
        ('{ type = "udp_send_expect", send = "", expect = "y" }', "send", "must not be empty"),
        ('{ type = "udp_send_expect", send = "x" }', "expect", "missing required key"),
        ('{ type = "udp_send_expect", send = "x", expect = "" }', "expect", "must not be empty"),
    ],
)
def test_health_check_errors(check, key, problem):
    msg = error(listener("") + f"health_check = {check}\n")
    assert msg.startswith(f"f.toml: pools.p.health_check.{key}: "), msg
    assert problem in msg


def test_udp_send_expect_parses():
    hc = parse_config(
        listener("") + 'health_check = { type = "udp_send_expect", send = "ping", expect = "pong" }\n'
    )
    check = hc.pools["p"].health_check
    assert check is not None and (check.send, check.expect) == (b"ping", b"pong")


@pytest.mark.parametrize(
    "extra, key",
    [
        ('protocol = "udp"\nproxy_protocol = "v1"\nproxy_protocol_from = ["10.0.0.0/8"]', "proxy_protocol"),
        ('protocol = "udp"\nsni_timeout = "1s"', "sni_timeout"),
    ],
)
def test_udp_listener_has_no_preludes(extra, key):
    msg = error(listener(extra))
    assert msg.startswith(f"f.toml: listeners.l.{key}: ") and 'applies only to protocol = "tcp"' in msg


def test_udp_routes_match_on_source_only():
    text = (
        '[listeners.l]\nbind = "127.0.0.1:53"\nprotocol = "udp"\n'
        '[[listeners.l.routes]]\nname = "r"\nmatch = { sni = ["a.example"] }\nbackends = [{ pool = "p" }]\n'
        '[[listeners.l.routes]]\nname = "d"\nbackends = [{ pool = "p" }]\n' + POOL
    )
    msg = error(text)
    assert msg.startswith("f.toml: listeners.l.routes: ") and "source only" in msg
    ok = text.replace('match = { sni = ["a.example"] }', 'match = { source = ["10.0.0.0/8"] }')
    assert parse_config(ok).listeners["l"].protocol == "udp"
