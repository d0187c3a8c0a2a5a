"""Config of routes, splits and preludes (issue 10): what parses, what it means, every one-line error."""

from __future__ import annotations

import ipaddress

import pytest

from fastlb.config import ConfigError, RouteConfig, SplitTarget, parse_config

POOLS = """
[pools.v1]
backends = [{ name = "a", address = "127.0.0.1:9001" }]

[pools.v2]
backends = [{ name = "b", address = "127.0.0.1:9002" }]
"""


def cfg(listener: str = "", routes: str = "", pools: str = POOLS):
    """A listener "web" (with extra keys) and [[listeners.web.routes]] tables."""
    return parse_config(f'[listeners.web]\nbind = "127.0.0.1:8080"\n{listener}\n{routes}\n{pools}', "t.toml")


def route(name: str, backends: str = '[{ pool = "v1" }]', extra: str = "") -> str:
    return f'[[listeners.web.routes]]\nname = "{name}"\nbackends = {backends}\n{extra}\n'


DEFAULT = route("default")


def error(key: str, *words: str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(**kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"t.toml: {key}: "), msg
    for w in words:
        assert w in msg, msg
    return msg


def test_issue_example_parses() -> None:
    routes = (
        route(
            "beta-testers", '[{ pool = "v2" }]', 'match = { source = ["10.20.0.0/16", "2001:db8:20::/48"] }'
        )
        + route("admin", '[{ pool = "v1" }]', 'match = { sni = ["Admin.Example.com", "*.ops.example.com"] }')
        + route(
            "default",
            '[{ pool = "v1", weight = 90 }, { pool = "v2", weight = 10 }]',
            'split_affinity = "source_ip"',
        )
    )
    lc = cfg('proxy_protocol = "off"', routes).listeners["web"]
    assert [r.name for r in lc.routes] == ["beta-testers", "admin", "default"]
    assert lc.routes[0].source == (
        ipaddress.ip_network("10.20.0.0/16"),
        ipaddress.ip_network("2001:db8:20::/48"),
    )
    assert lc.routes[1].sni == ("admin.example.com", "*.ops.example.com")  # lower case
    assert lc.routes[2].backends == (SplitTarget("v1", 90), SplitTarget("v2", 10))
    assert lc.routes[2].split_affinity == "source_ip" and not lc.routes[2].has_match
    assert lc.pool == "v1"  # the default route's first pool
    assert (
        lc.needs_sni and lc.proxy_protocol == "off" and lc.sni_timeout == 5.0 and lc.sni_no_match == "default"
    )


def test_short_form_is_one_default_route() -> None:
    lc = cfg('pool = "v2"').listeners["web"]
    assert lc.routes == (RouteConfig("default", backends=(SplitTarget("v2", 1),)),)
    assert not lc.needs_sni


def test_weights_default_one_and_all_zero_is_a_closed_route() -> None:
    lc = cfg(routes=route("default", '[{ pool = "v1" }, { pool = "v2", weight = 0 }]')).listeners["web"]
    assert lc.routes[0].backends == (SplitTarget("v1", 1), SplitTarget("v2", 0))
    lc = cfg(routes=route("default", '[{ pool = "v1", weight = 0 }, { pool = "v2", weight = 0 }]')).listeners[
        "web"
    ]
    assert sum(t.weight for t in lc.routes[0].backends) == 0


def test_no_default_route_is_allowed() -> None:
    lc = cfg(routes=route("beta", extra='match = { source = ["10.0.0.0/8"] }')).listeners["web"]
    assert lc.routes[0].has_match


def test_prelude_keys() -> None:
    lc = cfg(
        'proxy_protocol = "v1"\nproxy_protocol_from = ["10.0.0.0/8", "::1"]\nsni_timeout = "2s"\nsni_no_match = "reject"',
        route("tls", extra='match = { sni = ["a.example.com"] }') + DEFAULT,
    ).listeners["web"]
    assert lc.proxy_protocol == "v1"  # PROXY v1 text, then the ClientHello: allowed
    assert lc.proxy_protocol_from == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert (lc.sni_timeout, lc.sni_no_match) == (2.0, "reject")
    # sni_timeout also bounds a PROXY header alone
    lc = cfg(
        'pool = "v1"\nproxy_protocol = "any"\nproxy_protocol_from = ["0.0.0.0/0"]\nsni_timeout = "500ms"'
    ).listeners["web"]
    assert lc.sni_timeout == 0.5


def test_send_proxy_keys() -> None:
    pools = POOLS.replace(
        "[pools.v2]\n", '[pools.v2]\nsend_proxy = "v2"\nhealth_check = { type = "tcp", send_proxy = true }\n'
    )
    c = cfg('pool = "v1"', pools=pools)
    assert c.pools["v1"].send_proxy == "off" and c.pools["v2"].send_proxy == "v2"
    assert c.pools["v2"].health_check.send_proxy == "v2"
    pools = POOLS.replace("[pools.v2]\n", '[pools.v2]\nhealth_check = { type = "tcp", send_proxy = "v1" }\n')
    assert cfg('pool = "v1"', pools=pools).pools["v2"].health_check.send_proxy == "v1"
    pools = POOLS.replace("[pools.v2]\n", '[pools.v2]\nhealth_check = { type = "tcp", send_proxy = false }\n')
    assert cfg('pool = "v1"', pools=pools).pools["v2"].health_check.send_proxy == "off"


@pytest.mark.parametrize(
    ("kw", "key", "words"),
    [
        ({}, "listeners.web.pool", ("missing required key", "routes")),
        ({"listener": 'pool = "v1"', "routes": DEFAULT}, "listeners.web.routes", ("either pool", "not both")),
        ({"listener": 'pool = "v3"'}, "listeners.web.pool", ('unknown pool "v3"', "defined pools: v1, v2")),
        (
            {"routes": route("default", '[{ pool = "v3" }]')},
            "listeners.web.routes[0].backends[0].pool",
            ('unknown pool "v3"',),
        ),
        ({"routes": DEFAULT + DEFAULT}, "listeners.web.routes[1].name", ('duplicate route name "default"',)),
        (
            {"routes": DEFAULT + route("late", extra='match = { source = ["10.0.0.0/8"] }')},
            "listeners.web.routes[1].name",
            ("after the default route", "move it before"),
        ),
        ({"routes": route("r", extra="match = {}")}, "listeners.web.routes[0].match", ("empty match",)),
        (
            {"routes": route("r", extra="match = { port = 1 }")},
            "listeners.web.routes[0].match.port",
            ("unknown key",),
        ),
        (
            {"routes": route("r", extra='match = { source = ["10.20.0.1/16"] }')},
            "listeners.web.routes[0].match.source[0]",
            ("host bits", '"10.20.0.0/16"'),
        ),
        (
            {"routes": route("r", extra='match = { source = ["10.300.0.0/16"] }')},
            "listeners.web.routes[0].match.source[0]",
            ("not an IP prefix",),
        ),
        (
            {"routes": route("r", extra='match = { source = ["::1/129"] }')},
            "listeners.web.routes[0].match.source[0]",
            ("not an IP prefix",),
        ),
        (
            {"routes": route("r", extra="match = { source = [] }")},
            "listeners.web.routes[0].match.source",
            ("non-empty",),
        ),
        (
            {"routes": route("r", extra="match = { source = [10] }")},
            "listeners.web.routes[0].match.source[0]",
            ("prefix string",),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["a.*.example.com"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ('one leading "*."',),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["*example.com"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ('one leading "*."',),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["*.*.example.com"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ('one leading "*."',),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["*"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ("*",),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["example.com."] }')},
            "listeners.web.routes[0].match.sni[0]",
            ("trailing dot",),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["exa mple.com"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ("not a DNS label",),
        ),
        (
            {"routes": route("r", extra='match = { sni = ["-a.example.com"] }')},
            "listeners.web.routes[0].match.sni[0]",
            ("not a DNS label",),
        ),
        (
            {"routes": route("default", '[{ pool = "v1", weight = 1001 }]')},
            "listeners.web.routes[0].backends[0].weight",
            ("out of range 0..1000",),
        ),
        (
            {"routes": route("default", '[{ pool = "v1", weight = -1 }]')},
            "listeners.web.routes[0].backends[0].weight",
            ("out of range",),
        ),
        ({"routes": route("default", "[]")}, "listeners.web.routes[0].backends", ("non-empty",)),
        (
            {"routes": route("default", '[{ pool = "v1" }, { pool = "v1" }]')},
            "listeners.web.routes[0].backends[1].pool",
            ("already in this route",),
        ),
        (
            {"routes": route("default", "[" + ", ".join(['{ pool = "v1" }'] * 16) + "]")},
            "listeners.web.routes[0].backends",
            ("at most 15",),
        ),
        (
            {"routes": route("default", extra='split_affinity = "cookie"')},
            "listeners.web.routes[0].split_affinity",
            ("none, source_ip",),
        ),
        ({"routes": route("bad name")}, "listeners.web.routes[0].name", ("route name",)),
        (
            {"listener": 'pool = "v1"\nproxy_protocol = "v3"'},
            "listeners.web.proxy_protocol",
            ("off, v1, v2, any",),
        ),
        (
            {"listener": 'pool = "v1"\nproxy_protocol = "v2"'},
            "listeners.web.proxy_protocol_from",
            ("trusted senders",),
        ),
        (
            {"listener": 'pool = "v1"\nproxy_protocol_from = ["10.0.0.0/8"]'},
            "listeners.web.proxy_protocol_from",
            ('proxy_protocol = "off"',),
        ),
        (
            {"listener": 'pool = "v1"\nproxy_protocol = "v1"\nproxy_protocol_from = ["10.0.0.1/8"]'},
            "listeners.web.proxy_protocol_from[0]",
            ("host bits",),
        ),
        ({"listener": 'pool = "v1"\nsni_timeout = "5s"'}, "listeners.web.sni_timeout", ("applies only",)),
        ({"listener": 'pool = "v1"\nsni_no_match = "reject"'}, "listeners.web.sni_no_match", ("sni routes",)),
        (
            {
                "listener": 'sni_no_match = "drop"',
                "routes": route("t", extra='match = { sni = ["a.b"] }') + DEFAULT,
            },
            "listeners.web.sni_no_match",
            ("default, reject",),
        ),
        (
            {
                "listener": 'sni_timeout = "0ms"',
                "routes": route("t", extra='match = { sni = ["a.b"] }') + DEFAULT,
            },
            "listeners.web.sni_timeout",
            ("at least 1ms",),
        ),
        (
            {
                "listener": 'pool = "v1"',
                "pools": POOLS.replace("[pools.v2]\n", '[pools.v2]\nsend_proxy = "any"\n'),
            },
            "pools.v2.send_proxy",
            ("off, v1, v2",),
        ),
        (
            {
                "listener": 'pool = "v1"',
                "pools": POOLS.replace(
                    "[pools.v2]\n", '[pools.v2]\nhealth_check = { type = "tcp", send_proxy = true }\n'
                ),
            },
            "pools.v2.health_check.send_proxy",
            ('"off"',),
        ),
        (
            {
                "listener": 'pool = "v1"',
                "pools": POOLS.replace(
                    "[pools.v2]\n", '[pools.v2]\nhealth_check = { type = "tcp", send_proxy = 2 }\n'
                ),
            },
            "pools.v2.health_check.send_proxy",
            ("expected true, false",),
        ),
    ],
)
def test_errors(kw: dict, key: str, words: tuple[str, ...]) -> None:
    error(key, *words, **kw)
