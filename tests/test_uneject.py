"""A passing active health check ends an outlier ejection at once (issue 21, item 5: Envoy's
successful_active_health_check_uneject_host, default on), and status shows the real
`ejected_until` while a backend is ejected."""

from __future__ import annotations

import time

import pytest

from fastlb.control import ControlClient
from support.backends import server
from support.clients import backends_of, greet
from support.helpers import free_port, wait_until

EJECTION = 30.0


def _backend(lb, name: str) -> dict:
    return backends_of(ControlClient(str(lb.dir / "control.sock")).status())[name]


def _eject_a(fastlb, backends, uneject: bool):
    """a and b, round robin; a killed, then ejected by the failed connects of a few clients (the
    health checks, 1 s apart and fall 10, are far from marking it down)."""
    port = free_port()
    a = backends(server("a", "id", port=port))
    b = backends(server("b", "id"))
    lb = fastlb(
        [("a", f"127.0.0.1:{port}", None), ("b", b.address("b"), None)],
        algorithm="round_robin",
        pool={
            "health_check": {"type": "tcp", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 10},
            "outlier_detection": {
                "consecutive_failures": 2,
                "base_ejection_time": f"{EJECTION:g}s",
                "successful_active_health_check_uneject_host": uneject,
            },
        },
    )
    assert _backend(lb, "a")["ejected_until"] is None
    a.stop()
    assert {greet(lb.addr) for _ in range(6)} == {"b"}  # a refused: retried on b
    st = wait_until(lambda: (x := _backend(lb, "a"))["state"] == "ejected" and x, 5, "a ejected")
    now = time.time()
    assert now + EJECTION - 3 <= st["ejected_until"] <= now + EJECTION + 0.5, st["ejected_until"]
    assert st["health"] == "ejected"
    return lb, port


def test_a_passing_check_ends_the_ejection_at_once(fastlb, backends):
    lb, port = _eject_a(fastlb, backends, uneject=True)
    backends(server("a", "id", port=port))  # restarted: its next check passes
    st = wait_until(lambda: (x := _backend(lb, "a"))["state"] == "up" and x, 5, "a back after one check")
    assert st["ejected_until"] is None
    assert "a" in {greet(lb.addr) for _ in range(10)}


def test_uneject_off_keeps_the_ejection_time(fastlb, backends):
    lb, port = _eject_a(fastlb, backends, uneject=False)
    backends(server("a", "id", port=port))
    checks = _backend(lb, "a")["check"]["checks"]
    wait_until(lambda: _backend(lb, "a")["check"]["checks"] >= checks + 2, 5, "two more passing checks")
    st = _backend(lb, "a")
    assert st["check"]["result"] == "ok"
    assert st["state"] == "ejected" and st["ejected_until"] > time.time() + EJECTION - 6
    assert {greet(lb.addr) for _ in range(6)} == {"b"}


def test_uneject_key_must_be_a_boolean():
    from fastlb.config import ConfigError, parse_config

    text = (
        '[listeners.web]\nbind = "127.0.0.1:8080"\npool = "web"\n[pools.web]\n'
        'backends = [{ name = "a", address = "127.0.0.1:1" }]\n'
        '[pools.web.outlier_detection]\nsuccessful_active_health_check_uneject_host = "yes"\n'
    )
    with pytest.raises(ConfigError, match="outlier_detection.successful_active_health_check_uneject_host"):
        parse_config(text, "f.toml")
