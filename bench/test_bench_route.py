"""Cost of one route lookup (route_select in core/routes.pxi): which route and pool a new connection
takes, per kind of listener.

The region is the one `fastlb serve` builds (Supervisor without workers); fastlb._core.route_probe()
calls route_select() in a C loop from a private worker state and returns ns per call, timed in C:
no Python per call.  The lookup is what a worker adds per connection on top of the backend pick
(bench/test_bench_pick.py); the SNI peek itself (reading the ClientHello) is the prelude's cost.

    pytest bench/test_bench_route.py --benchmark-json route.json   # ns/lookup in extra_info
    .venv/bin/python bench/test_bench_route.py                                 # a Markdown table

Not part of the test run (tests/ is the test path).
"""

from __future__ import annotations

import socket
import statistics
import sys

import pytest

from fastlb import _core
from fastlb.config import Address, parse_config
from fastlb.runtime.supervisor import Supervisor
from fastlb.shm import sockaddr_bytes

ITERATIONS = 2_000_000
ROUNDS = 5
POOLS = "".join(
    f'[pools.p{i}]\nbackends = [{{ name = "b{i}", address = "127.0.0.1:{9000 + i}" }}]\n' for i in range(4)
)


def _route(name: str, backends: str, match: str = "", extra: str = "") -> str:
    m = f"match = {match}\n" if match else ""
    return f'[[listeners.web.routes]]\nname = "{name}"\n{m}backends = {backends}\n{extra}\n'


CASES: dict[str, tuple[str, str, bytes]] = {
    # name: (routes, client address, server name)
    "short form (one pool)": ("", "10.1.2.3", b""),
    "split 90/10": (
        _route("default", '[{ pool = "p0", weight = 90 }, { pool = "p1", weight = 10 }]'),
        "10.1.2.3",
        b"",
    ),
    "split 90/10, source_ip affinity": (
        _route(
            "default",
            '[{ pool = "p0", weight = 90 }, { pool = "p1", weight = 10 }]',
            extra='split_affinity = "source_ip"',
        ),
        "10.1.2.3",
        b"",
    ),
    "8 source routes (IPv4), default taken": (
        "".join(
            _route(f"s{k}", '[{ pool = "p1" }]', f'{{ source = ["10.{100 + k}.0.0/16"] }}') for k in range(8)
        )
        + _route("default", '[{ pool = "p0" }]'),
        "10.1.2.3",
        b"",
    ),
    "16 sni routes, wildcard hit on the last": (
        "".join(
            _route(f"n{k}", '[{ pool = "p1" }]', f'{{ sni = ["host{k}.example.com"] }}') for k in range(15)
        )
        + _route("w", '[{ pool = "p2" }]', '{ sni = ["*.apps.example.com"] }')
        + _route("default", '[{ pool = "p0" }]'),
        "10.1.2.3",
        b"shop.apps.example.com",
    ),
}


def supervisor(routes: str) -> Supervisor:
    listener = "" if routes else 'pool = "p0"'
    text = f'[global]\nworkers = 1\n[listeners.web]\nbind = "127.0.0.1:8080"\n{listener}\n{routes}\n{POOLS}'
    return Supervisor(parse_config(text))


def measure(case: str) -> float:
    routes, ip, sni = CASES[case]
    sup = supervisor(routes)
    peer = sockaddr_bytes(Address(ip, 40000, socket.AF_INET))
    try:
        runs = [_core.route_probe(sup.region.address, 0, peer, sni, ITERATIONS)[2] for _ in range(ROUNDS)]
        return statistics.median(runs)
    finally:
        sup.region.close()


@pytest.mark.parametrize("case", list(CASES))
def test_route_lookup(benchmark, case: str) -> None:
    ns = benchmark.pedantic(measure, args=(case,), rounds=1, iterations=1)
    benchmark.extra_info["ns_per_lookup"] = ns
    benchmark.extra_info["case"] = case
    assert ns > 0


if __name__ == "__main__":
    print("| listener | ns per route lookup |")
    print("|---|---:|")
    for name in CASES:
        print(f"| {name} | {measure(name):.1f} |")
    sys.exit(0)
