"""Routes and traffic splits end to end (issue 10): real connections through `fastlb serve` to real
backend processes that greet with their name.

Pools: "web" (the fixture's pool, backend v1a) and "v2" (backend v2a); the listener routes by
[[listeners.web.routes]] instead of `pool`.  What is checked:
  * a 90/10 split over 20,000 connections is within 1 percentage point;
  * `fastlb set-split` to 0/100 and back under load: no connection fails, and no connection
    started after the command's reply goes by the old split (client side: which backend greeted
    it; fastlb side: the per-pool counters of the route);
  * split_affinity = "source_ip": 500 client addresses keep their side across 10 -> 30 -> 50 ->
    100 %, and none moves back from the canary;
  * match.source routing, IPv4 and IPv6 (loopback IPv6 sources are only ::1: it is matched by
    ::1/128, and a non-matching prefix before it must not take it);
  * status (JSON and text) shows routes, splits and counts; a pool whose backends are all down is
    skipped while the route has another.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

from fastlb.control import ControlClient
from support.backends import server
from support.clients import Load, assert_one_line_error, cli, count_backends, names_by_source, raw_request
from support.helpers import connect, wait_until

N_SPLIT = 20_000


def routes_toml(routes: list[dict], pools: dict[str, str]) -> str:
    """[pools.X] tables (one backend each, named by the dict's value's name) and the routes."""
    out = []
    for pool, (name, address) in pools.items():
        out.append(f'[pools.{pool}]\nbackends = [{{ name = "{name}", address = "{address}" }}]\n')
    for r in routes:
        lines = ["[[listeners.web.routes]]"]
        for k, v in r.items():
            lines.append(f"{k} = {v}")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def start(backends, fastlb, routes: list[dict], *, workers: int = 2, host: str = "127.0.0.1", **kw):
    """v1a in pool "web", v2a in pool "v2", x in pool "x"; fastlb with the given routes."""
    b = backends(*(server(n, "id", host=host) for n in ("v1a", "v2a", "x")))
    extra = routes_toml(routes, {"v2": ("v2a", b.address("v2a")), "x": ("x", b.address("x"))})
    lb = fastlb(
        [("v1a", b.address("v1a"), None)],
        workers=workers,
        host=host,
        listener={"pool": None},
        extra=extra,
        **kw,
    )
    return b, lb, ControlClient(str(lb.dir / "control.sock"))


def route_of(st: dict, route: str, listener: str = "web") -> dict:
    li = next(x for x in st["listeners"] if x["name"] == listener)
    return next(r for r in li["routes"] if r["name"] == route)


CANARY = [{"name": '"default"', "backends": '[{ pool = "web", weight = 90 }, { pool = "v2", weight = 10 }]'}]


def test_split_90_10_within_one_percent(backends, fastlb):
    _, lb, client = start(backends, fastlb, CANARY)
    counts = count_backends(lb.addr, N_SPLIT, concurrency=64)
    assert sum(counts.values()) == N_SPLIT
    share = 100.0 * counts["v2a"] / N_SPLIT
    assert abs(share - 10.0) <= 1.0, counts
    r = route_of(client.status(), "default")
    assert r["split"] == {"web": 90, "v2": 10}
    assert r["connections"] == N_SPLIT
    assert r["pools"] == {"web": counts["v1a"], "v2": counts["v2a"]}


def _switch(lb, client, load: Load, weights: dict[str, int], new: str) -> None:
    """set-split by the CLI under load; then every connection started after the reply is on `new`,
    and the old pool's route counter grows by at most the connections in flight at the reply."""
    args = [f"{p}={w}" for p, w in weights.items()]
    before = route_of(client.status(), "default")["pools"]
    proc = cli("set-split", "--socket", str(lb.dir / "control.sock"), "web", "default", *args)
    t_reply = time.monotonic()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(" ".join(args)), proc.stdout
    n_at_reply = len(load.done)
    load.wait_count(n_at_reply + 2000)
    after_conns = [(t, name) for t, name in list(load.done) if t > t_reply]
    assert len(after_conns) >= 1000
    wrong = Counter(name for _, name in after_conns if name != new)
    assert not wrong, f"connections started after the reply went by the old split: {wrong}"
    old_pool = "v2" if new == "v1a" else "web"
    now = route_of(client.status(), "default")["pools"]
    assert now[old_pool] - before[old_pool] <= n_at_reply - sum(before.values()) + load.concurrency + 1


def test_set_split_under_load_blue_green(backends, fastlb):
    _, lb, client = start(backends, fastlb, CANARY)
    load = Load(lb.addr, concurrency=16).start()
    try:
        load.wait_count(500)
        _switch(lb, client, load, {"web": 0, "v2": 100}, "v2a")
        _switch(lb, client, load, {"web": 100, "v2": 0}, "v1a")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    r = route_of(client.status(), "default")
    assert r["split"] == {"web": 100, "v2": 0}
    assert r["connections"] == sum(r["pools"].values())


def test_set_split_errors_change_nothing(backends, fastlb):
    _, lb, client = start(backends, fastlb, CANARY, workers=1)
    sock = str(lb.dir / "control.sock")
    gen = client.status()["generation"]
    assert_one_line_error(
        cli("set-split", "--socket", sock, "web", "default", "nope=1"), "unknown pool", "nope"
    )
    assert_one_line_error(cli("set-split", "--socket", sock, "web", "nosuch", "v2=1"), "no route", "nosuch")
    assert_one_line_error(cli("set-split", "--socket", sock, "api", "default", "v2=1"), "unknown listener")
    assert_one_line_error(cli("set-split", "--socket", sock, "web", "default", "v2=1001"), "0..1000")
    assert_one_line_error(cli("set-split", "--socket", sock, "web", "default", "v2"), "POOL=WEIGHT")
    for bad in (
        {"cmd": "set-split", "listener": "web", "route": "default", "weights": []},
        {"cmd": "set-split", "listener": "web", "route": "default", "weights": {}},
        {"cmd": "set-split", "listener": "web", "route": "default", "weights": {"v2": True}},
        {"cmd": "set-split", "listener": "web", "route": "default", "weights": {"v2": "1"}},
        {"cmd": "set-split", "listener": 1, "route": "default", "weights": {"v2": 1}},
        {
            "cmd": "set-split",
            "listener": "web",
            "route": "default",
            "weights": {f"p{i}": 1 for i in range(16)},
        },
    ):
        (reply,) = raw_request(sock, json.dumps(bad).encode() + b"\n")
        assert reply["ok"] is False and "\n" not in reply["error"], (bad, reply)
    st = client.status()
    assert st["generation"] == gen
    assert route_of(st, "default")["split"] == {"web": 90, "v2": 10}
    # the Python API: one publish, returns the previous split; a new pool is appended
    r = client.set_split("web", "default", {"x": 5, "v2": 5})
    assert r["previous"] == {"web": 90, "v2": 10}
    assert r["weights"] == {"web": 0, "v2": 5, "x": 5}
    assert client.status()["generation"] == gen + 1


def test_affinity_clients_only_move_onto_the_canary(backends, fastlb):
    routes = [
        {
            "name": '"default"',
            "backends": '[{ pool = "web", weight = 90 }, { pool = "v2", weight = 10 }]',
            "split_affinity": '"source_ip"',
        }
    ]
    _, lb, client = start(backends, fastlb, routes)
    sources = [f"127.0.{1 + k // 250}.{1 + k % 250}" for k in range(500)]
    side = names_by_source(lb.addr, sources)
    on_canary = {s for s, n in side.items() if n == "v2a"}
    assert 20 <= len(on_canary) <= 90, len(on_canary)  # about 10 % of 500
    # the same clients again: the same side
    assert names_by_source(lb.addr, sources[:100]) == {s: side[s] for s in sources[:100]}
    for pct in (30, 50, 100):
        client.set_split("web", "default", {"web": 100 - pct, "v2": pct})
        side = names_by_source(lb.addr, sources)
        now = {s for s, n in side.items() if n == "v2a"}
        assert on_canary <= now, f"{len(on_canary - now)} clients moved back from the canary at {pct} %"
        assert abs(len(now) - 5 * pct) <= 60, (pct, len(now))
        on_canary = now
    assert len(on_canary) == 500


def test_source_routing_ipv4(backends, fastlb):
    routes = [
        {
            "name": '"beta"',
            "match": '{ source = ["127.0.0.2/32", "127.9.0.0/16"] }',
            "backends": '[{ pool = "v2" }]',
        },
        {"name": '"default"', "backends": '[{ pool = "web" }]'},
    ]
    _, lb, client = start(backends, fastlb, routes, workers=1)
    assert count_backends(lb.addr, 50, source="127.0.0.2") == Counter({"v2a": 50})
    assert count_backends(lb.addr, 50, source="127.9.3.4") == Counter({"v2a": 50})
    assert count_backends(lb.addr, 50, source="127.0.0.3") == Counter({"v1a": 50})
    st = client.status()
    assert route_of(st, "beta")["connections"] == 100
    assert route_of(st, "beta")["match"] == {"source": ["127.0.0.2/32", "127.9.0.0/16"], "sni": []}
    assert route_of(st, "default")["pools"] == {"web": 50}
    text = cli("status", "--socket", str(lb.dir / "control.sock")).stdout
    assert "route beta [source 127.0.0.2/32,127.9.0.0/16]: v2=1 (100 conns)" in text
    assert "route default [default]: web=1 (50 conns)" in text


def test_source_routing_ipv6(backends, fastlb):
    routes = [
        {"name": '"elsewhere"', "match": '{ source = ["2001:db8::/32"] }', "backends": '[{ pool = "x" }]'},
        {"name": '"local"', "match": '{ source = ["::1/128"] }', "backends": '[{ pool = "v2" }]'},
        {"name": '"default"', "backends": '[{ pool = "web" }]'},
    ]
    _, lb, client = start(backends, fastlb, routes, workers=1, host="::1")
    assert count_backends(lb.addr, 50) == Counter({"v2a": 50})
    st = client.status()
    assert route_of(st, "elsewhere")["connections"] == 0
    assert route_of(st, "local")["connections"] == 50


def _refused(addr) -> bytes:
    """What a refused connection gets: EOF (or a reset) before any byte."""
    with connect(addr) as s:
        try:
            return s.recv(64)
        except ConnectionResetError:
            return b""


def test_no_default_route_refuses_unmatched(backends, fastlb):
    routes = [{"name": '"beta"', "match": '{ source = ["127.0.0.2/32"] }', "backends": '[{ pool = "v2" }]'}]
    _, lb, client = start(backends, fastlb, routes, workers=1)
    assert _refused(lb.addr) == b""
    assert count_backends(lb.addr, 5, source="127.0.0.2") == Counter({"v2a": 5})
    li = client.status()["listeners"][0]
    assert (li["no_route"], li["rejected"]) == (1, 1)


def test_pool_without_usable_backend_is_skipped(backends, fastlb):
    _, lb, client = start(backends, fastlb, CANARY, workers=1)
    client.disable("v2", "v2a")
    assert count_backends(lb.addr, 300) == Counter({"v1a": 300})
    client.enable("v2", "v2a")
    assert count_backends(lb.addr, 1000)["v2a"] > 0
    # every pool of the split without a backend: rejected, counted as that pool's no_backend
    client.disable("web", "v1a")
    client.disable("v2", "v2a")
    assert _refused(lb.addr) == b""
    st = client.status()
    assert sum(p["no_backend"] for p in st["pools"]) == 1
    # a closed route (every weight 0): refused, counted on the route
    client.enable("web", "v1a")
    client.set_split("web", "default", {"web": 0, "v2": 0})
    assert _refused(lb.addr) == b""
    assert route_of(client.status(), "default")["no_pool"] == 1


def test_reload_replaces_the_published_splits(backends, fastlb):
    _, lb, client = start(backends, fastlb, CANARY, workers=1)
    client.set_split("web", "default", {"web": 50, "v2": 50})  # runtime change, then the file wins
    text = lb.config_text.replace(
        'weight = 90 }, { pool = "v2", weight = 10', 'weight = 0 }, { pool = "v2", weight = 100'
    )
    assert text != lb.config_text
    lb.config_path.write_text(text)
    lb.signal(signal.SIGHUP)
    wait_until(
        lambda: route_of(client.status(), "default")["split"] == {"web": 0, "v2": 100}, 10, "the reload"
    )
    assert count_backends(lb.addr, 100) == Counter({"v2a": 100})
    # a structural change (a new route) is not applied: the log says it needs a restart
    gen = client.status()["generation"]
    lb.config_path.write_text(text.replace('name = "default"', 'name = "main"'))
    lb.signal(signal.SIGHUP)
    # (the first reload's summary says "0 need a restart": wait for this reload's own line)
    wait_until(lambda: "routes (names or matches)" in lb.log_text(), 10, "the reload's restart warning")
    st = client.status()
    assert route_of(st, "default")["split"] == {"web": 0, "v2": 100}
    assert st["generation"] >= gen
