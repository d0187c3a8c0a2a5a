"""Prometheus metrics ([global] metrics): the /metrics text a real Prometheus scrapes and queries,
counted against the connections the test made; the histogram from the workers' buckets."""

from __future__ import annotations

import os
import re
import signal
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastlb.config import ConfigError, load_config
from fastlb.control import ControlClient
from fastlb.shm import HIST_BOUNDS_US
from support.backends import server
from support.clients import count_backends
from support.helpers import free_port, wait_until
from support.prometheus import PROMETHEUS, Prometheus

WEIGHTS = {"a": 5, "b": 3, "c": 2}
HEADER = Path(__file__).resolve().parents[1] / "src/fastlb/includes/shm_layout.h"


def start(backends, fastlb, workers: int = 1):
    b = backends(*(server(n, "id") for n in WEIGHTS))
    port = free_port()
    lb = fastlb(
        [(n, b.address(n), w) for n, w in WEIGHTS.items()],
        workers=workers,
        global_={"metrics": f"127.0.0.1:{port}"},
        pool={"health_check": {"type": "tcp", "interval": "200ms"}},
    )
    return lb, f"127.0.0.1:{port}"


def scrape(addr: str) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_backend(samples: dict[tuple, float]) -> dict[str, float]:
    return {dict(k)["backend"]: v for k, v in samples.items()}


def test_histogram_bounds_match_the_header():
    text = HEADER.read_text()
    m = re.search(r"#define FLB_HIST_BOUNDS_US \{(.*?)\}", text, re.S)
    values = [v.strip() for v in m.group(1).replace("\\", "").split(",")]
    assert tuple(int(v) for v in values[:-1]) == HIST_BOUNDS_US
    assert values[-1] == "0xFFFFFFFFFFFFFFFFULL" and len(values) == 16


def test_metrics_is_off_by_default_and_checked(tmp_path):
    base = (Path(__file__).parent / "configs/example.toml").read_text()
    f = tmp_path / "a.toml"
    f.write_text(base)
    assert load_config(f).global_.metrics is None
    f.write_text(base.replace("[global]", '[global]\nmetrics = "[::1]:9100"'))
    assert str(load_config(f).global_.metrics) == "[::1]:9100"
    f.write_text(base.replace("[global]", '[global]\nmetrics = "0.0.0.0"'))
    with pytest.raises(ConfigError, match=r"global\.metrics"):
        load_config(f)


def test_metrics_text_counts_every_connection(backends, fastlb):
    lb, addr = start(backends, fastlb)
    counts = count_backends(lb.addr, 100)
    assert counts == Counter({"a": 50, "b": 30, "c": 20})

    def all_counted():
        s = scrape(addr)
        return s if by_backend(s["fastlb_backend_connections_total"]) == counts else None

    m = wait_until(all_counted, 10, "metrics show every connection")
    assert by_backend(m["fastlb_backend_connections_total"]) == counts
    assert by_backend(m["fastlb_backend_connect_attempts_total"]) == counts
    assert m["fastlb_pool_connections_total"] == {(("pool", "web"),): 100.0}
    assert m["fastlb_listener_connections_accepted_total"] == {(("listener", "web"),): 100.0}
    assert by_backend(m["fastlb_backend_weight"]) == WEIGHTS
    # the listener's one (short-form) route
    assert m["fastlb_route_connections_total"] == {(("listener", "web"), ("route", "default")): 100.0}
    assert m["fastlb_route_split_weight"] == {
        (("listener", "web"), ("pool", "web"), ("route", "default")): 1.0
    }
    # the histogram: cumulative buckets ending in +Inf == count == established connections
    for name, n in counts.items():
        key = (("backend", name), ("le", "+Inf"), ("pool", "web"))
        assert m["fastlb_backend_connect_time_seconds_bucket"][key] == n
        assert m["fastlb_backend_connect_time_seconds_count"][(("backend", name), ("pool", "web"))] == n
        buckets = sorted(
            (float(dict(k)["le"]), v)
            for k, v in m["fastlb_backend_connect_time_seconds_bucket"].items()
            if dict(k)["backend"] == name
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and len(buckets) == 16
    assert all(v > 0 for v in by_backend(m["fastlb_backend_connect_time_seconds_sum"]).values())
    up = {dict(k)["backend"]: v for k, v in m["fastlb_backend_state"].items() if dict(k)["state"] == "up"}
    assert up == {"a": 1, "b": 1, "c": 1}
    assert m["fastlb_worker_state"][(("state", "running"), ("worker", "0"))] == 1
    assert 0 <= m["fastlb_worker_heartbeat_age_seconds"][(("worker", "0"),)] < 5
    # the health checks ran and are visible

    def checked():
        s = scrape(addr).get("fastlb_backend_check_success", {})
        return s if len(s) == 3 else None

    checks = wait_until(checked, 10, "a check result for every backend")
    assert by_backend(checks) == {"a": 1, "b": 1, "c": 1}
    # every family is documented in docs/metrics.md
    doc = set(re.findall(r"`(fastlb_[a-z_]+)`", (HEADER.parents[3] / "docs/metrics.md").read_text()))
    names = {
        re.sub(r"_(bucket|sum|count)$", "", n) if "connect_time_seconds" in n else n for n in scrape(addr)
    }
    assert names - doc == set(), f"undocumented metrics: {sorted(names - doc)}"
    # only /metrics, only GET/HEAD
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{addr}/other", timeout=5)
    assert e.value.code == 404
    # the control socket still answers: the scrapes ran on the control process's loop
    assert ControlClient(str(lb.dir / "control.sock")).status()["metrics"] == addr


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed")
def test_real_prometheus_scrapes_per_backend_counts(backends, fastlb, tmp_path):
    lb, addr = start(backends, fastlb, workers=2)
    prom = Prometheus(tmp_path / "prom", addr)
    try:
        prom.start()
        # a first scrape before the traffic, so the counters start from a known sample
        wait_until(lambda: prom.query('up{job="fastlb"}') == {(): 1.0}, 30, "prometheus scraped fastlb")
        counts = count_backends(lb.addr, 200)
        assert sum(counts.values()) == 200
        want = {(("backend", n), ("pool", "web")): float(c) for n, c in counts.items()}

        def scraped():
            q = prom.query("fastlb_backend_connections_total")
            return q if q == want else None

        got = wait_until(
            scraped, 30, lambda: f"PromQL shows {want}: {prom.query('fastlb_backend_connections_total')}"
        )
        assert got == want
        assert prom.query('sum(fastlb_listener_connections_accepted_total{listener="web"})') == {(): 200.0}
        # the histogram through PromQL: counts per backend add up to the same totals
        hist = prom.query("sum by (pool, backend) (fastlb_backend_connect_time_seconds_count)")
        assert hist == want
        q = prom.query("histogram_quantile(0.5, sum by (le) (fastlb_backend_connect_time_seconds_bucket))")
        assert len(q) == 1 and 0 < next(iter(q.values())) < 5
    finally:
        prom.stop()


def test_access_log_drops_are_a_metric(backends, fastlb, tmp_path):
    b = backends(server("a", "id"))
    port = free_port()
    lb = fastlb(
        [("a", b.address("a"), 1)],
        global_={
            "metrics": f"127.0.0.1:{port}",
            "access_log": str(tmp_path / "access.log"),
            "access_log_buffer": 64,
        },
    )
    addr = f"127.0.0.1:{port}"
    os.kill(lb.pid, signal.SIGSTOP)  # the control process stops draining the rings: they fill
    try:
        assert sum(count_backends(lb.addr, 100, concurrency=1).values()) == 100
    finally:
        os.kill(lb.pid, signal.SIGCONT)

    def accounted():  # every connection's record is either written or counted as dropped
        s = scrape(addr)
        written = s.get("fastlb_access_log_records_written_total", {}).get((), 0)
        dropped = s.get("fastlb_access_log_records_dropped_total", {}).get((("worker", "0"),), 0)
        return (written, dropped) if written + dropped == 100 else None

    written, dropped = wait_until(accounted, 10, "every record written or counted as dropped")
    assert written >= 64 and dropped >= 30, (written, dropped)


def test_udp_listener_datagrams_drops_and_flows_are_metrics(fastlb, udp_servers):
    from support.udp import udp_client, udp_server

    srv = udp_servers(udp_server("a", "echo"))
    addr = f"127.0.0.1:{free_port()}"
    lb = fastlb(
        [("a", srv.address("a"), None)],
        listener={"protocol": "udp", "udp_responses": 1},
        global_={"metrics": addr},
    )
    for payload in (b"one", b"two", b"three"):
        c = udp_client(lb.addr)
        c.send(payload)
        assert c.recv(100) == payload
        c.close()
    want = {"in": 3.0, "out": 3.0}

    def counted():
        s = scrape(addr)
        got = {dict(k)["direction"]: v for k, v in s["fastlb_udp_datagrams_total"].items()}
        return s if got == want else None

    m = wait_until(counted, 10, "the datagrams in the metrics")
    closed = {dict(k)["reason"]: v for k, v in m["fastlb_udp_flows_closed_total"].items()}
    assert closed == {"idle_timeout": 0.0, "responses": 3.0, "unreachable": 0.0}
    drops = {dict(k)["reason"]: v for k, v in m["fastlb_udp_dropped_datagrams_total"].items()}
    assert set(drops) >= {"table_full", "rcvbuf", "reply_rcvbuf"} and not any(drops.values())
    assert m["fastlb_listener_connections_accepted_total"] == {(("listener", "web"),): 3.0}
