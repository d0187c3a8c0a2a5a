"""Config keys of the preludes (config/prelude.py): defaults, values, one-line errors."""

from __future__ import annotations

import ipaddress

import pytest

from fastlb.config import ConfigError, parse_config

BASE = """
[listeners.web]
bind = "127.0.0.1:8443"
pool = "web"
{listener}
[pools.web]
backends = [{{ name = "a", address = "127.0.0.1:9000" }}]
{pool}
"""


def cfg(listener: str = "", pool: str = ""):
    return parse_config(BASE.format(listener=listener, pool=pool), "f.toml")


def test_defaults() -> None:
    c = cfg()
    lc, pc = c.listeners["web"], c.pools["web"]
    assert (lc.proxy_protocol, lc.proxy_protocol_from, lc.sni_timeout, lc.sni_policy) == (
        "off",
        (),
        5.0,
        "default",
    )
    assert pc.send_proxy == "off" and not lc.needs_sni


def test_values() -> None:
    c = cfg(
        'proxy_protocol = "any"\nproxy_protocol_from = ["10.0.0.0/8", "2001:db8::/32"]\n'
        'sni_timeout = "750ms"\nsni_policy = "reject"\n',
        'send_proxy = "v2"\nhealth_check = { type = "tcp", send_proxy = true }',
    )
    lc, pc = c.listeners["web"], c.pools["web"]
    assert lc.proxy_protocol_from == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert lc.sni_timeout == 0.75 and lc.sni_policy == "reject"
    assert pc.send_proxy == "v2" and pc.health_check.send_proxy == "v2"


@pytest.mark.parametrize(
    "listener,pool,key,text",
    [
        ('proxy_protocol = "v3"', "", "listeners.web.proxy_protocol", "choose one of: off, v1, v2, any"),
        ('proxy_protocol = "v1"', "", "listeners.web.proxy_protocol_from", "needs the trusted senders"),
        (
            'proxy_protocol_from = ["10.0.0.0/8"]',
            "",
            "listeners.web.proxy_protocol_from",
            'proxy_protocol = "off"',
        ),
        (
            'proxy_protocol = "v2"\nproxy_protocol_from = []',
            "",
            "listeners.web.proxy_protocol_from",
            "non-empty",
        ),
        (
            'proxy_protocol = "v2"\nproxy_protocol_from = ["10.0.0.1/8"]',
            "",
            "proxy_protocol_from[0]",
            "host bits",
        ),
        ('proxy_protocol = "v2"\nproxy_protocol_from = [8]', "", "proxy_protocol_from[0]", "CIDR string"),
        ('sni_policy = "drop"', "", "listeners.web.sni_policy", "default, reject"),
        ('sni_timeout = "0s"', "", "listeners.web.sni_timeout", "at least 1ms"),
        ("", 'send_proxy = "v3"', "pools.web.send_proxy", "off, v1, v2"),
        ("", 'health_check = { type = "tcp", send_proxy = true }', "health_check.send_proxy", "send_proxy"),
        (
            "",
            'send_proxy = "v1"\nhealth_check = { type = "tcp", send_proxy = "yes" }',
            "send_proxy",
            "true or false",
        ),
    ],
)
def test_errors(listener: str, pool: str, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(listener, pool)
    msg = str(e.value)
    assert key in e.value.key and text in msg and "\n" not in msg, msg
