"""Prometheus metrics: `[global] metrics = "ADDRESS:PORT"` serves GET /metrics in the text format.

The control process answers scrapes on its own asyncio loop (no thread: it forks workers, and a
fork beside a running thread can inherit a held lock).  A scrape reads the shared-memory counters
through the same status document `fastlb status` shows, plus the per-backend connect-time
histogram buckets (`hist_connect[16]`); the workers never see a scrape.  prometheus_client renders
the families (names, HELP, TYPE, escaping, the histogram's cumulative `le` buckets).

Anyone who can reach the address reads every counter, pool and backend name: bind it to loopback
or a management network (docs/metrics.md lists every family).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from fastlb._version import __version__
from fastlb.shm import HIST_BOUNDS_US, WORKER_STATE_NAMES

log = logging.getLogger("fastlb")

BACKEND_STATES = ("up", "down", "ejected", "drain", "maint")
# the classic text format (what generate_latest writes for names like fastlb's; every Prometheus reads it)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192  # bytes of request line + headers a scrape may send
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request
MAX_CONNECTIONS = 256  # scrapes open at once; one more is accepted and closed at once


class MetricsSource(Protocol):
    """What a scrape reads in the control process (fastlb.runtime.supervisor.Supervisor)."""

    def status(self) -> dict[str, Any]: ...
    def connect_histogram(self, pool: str, backend: str) -> list[int] | None: ...


# (status key, metric suffix, help, counter?) per record kind
_LISTENER = [
    ("accepted", "connections_accepted", "Connections accepted.", True),
    ("active", "connections_active", "Connections open now.", False),
    (
        "rejected",
        "connections_rejected",
        "Connections refused: without a backend (no route, none eligible, retries exhausted) or PROXY refusals.",
        True,
    ),
    ("paused_full", "max_connections_pauses", "Times a worker stopped accepting at max_connections.", True),
    ("accept_errors", "accept_errors", "accept4() errors other than EAGAIN.", True),
]
_BACKEND = [
    ("total", "connections", "Connections established to the backend.", True),
    ("active", "connections_active", "Connections assigned now (connecting or established).", False),
    ("attempts", "connect_attempts", "Connect attempts (first tries and retries).", True),
    ("bytes_in", "bytes_in", "Bytes forwarded client -> backend.", True),
    ("bytes_out", "bytes_out", "Bytes forwarded backend -> client.", True),
    ("connect_errors", "connect_errors", "Connects refused or failed (not timeouts).", True),
    ("connect_timeouts", "connect_timeouts", "Connects that hit connect_timeout.", True),
    ("resets", "resets", "Connections reset before the backend's first byte.", True),
    (
        "early_closes",
        "early_closes",
        "Connections closed or reset by the backend before any byte moved.",
        True,
    ),
    ("late_resets", "late_resets", "Connections the backend reset after its first byte.", True),
    (
        "backend_first_closes",
        "backend_first_closes",
        "Connections whose backend sent its FIN before the client's, after a byte moved.",
        True,
    ),
    ("ejections", "ejections", "Times passive ejection (outlier detection) took the backend out.", True),
    ("drains", "drains", "Times a drain of the backend began.", True),
    ("weight", "weight", "Configured weight (or the last set-weight).", False),
    ("priority", "priority", "Priority group, lower first (65536: backup = true).", False),
    ("effective_weight", "effective_weight", "Weight the workers use now (slow start, 0 = none).", False),
    ("consecutive_failures", "consecutive_failures", "Failed connects since the last success.", False),
]
_WORKER = [
    ("active", "connections_active", "Connections open in the worker.", False),
    ("accepted", "connections_accepted", "Connections the worker accepted.", True),
    ("retries", "retries", "Connect attempts beyond the first (on another backend).", True),
    ("emfile", "emfile_pauses", "Times accept4/socket hit the descriptor limit (accepting paused).", True),
    ("timeouts_connect", "connect_timeouts", "Connects that hit connect_timeout.", True),
    ("timeouts_idle", "idle_timeouts", "Connections closed by idle_timeout.", True),
    ("resets", "resets", "Connections closed by a reset on either side.", True),
    ("no_backend", "no_backend", "Picks that found no eligible backend.", True),
    ("splice_errors", "splice_errors", "splice() errors.", True),
    ("pipes_in_use", "pipes_in_use", "Pipes held by connections now.", False),
    ("pipes_pooled", "pipes_pooled", "Pipes idle in the worker's pool.", False),
    ("conn_capacity", "connection_slots", "Connection slots in the worker's slab.", False),
    ("deadline_resets", "deadline_resets", "Connections reset by shutdown_timeout or drain_timeout.", True),
    ("half_close_timeouts", "half_close_timeouts", "Connections reset by half_close_timeout.", True),
    (
        "early_close_retries",
        "early_close_retries",
        "Connections retried after a backend closed before any byte.",
        True,
    ),
    ("flushed_resets", "flushed_resets", "Resets delivered after forwarding what the dead side sent.", True),
    ("seqlock_fallbacks", "seqlock_fallbacks", "Backend addresses read from the last good copy.", True),
    ("pipes_small", "pipes_small", "Pipes smaller than the default 64 KiB.", True),
    ("linger_errors", "linger_errors", "setsockopt(SO_LINGER) failures (reset-on-death not set).", True),
    # issue 21: the kernel gave up on a peer (ETIMEDOUT: keepalive probes or tcp_user_timeout)
    (
        "clients_lost",
        "clients_lost",
        "Connections reset because the client stopped answering (keepalive, user timeout).",
        True,
    ),
    (
        "backends_lost",
        "backends_lost",
        "Connections reset because the backend stopped answering (keepalive, user timeout).",
        True,
    ),
    ("sockopt_errors", "sockopt_errors", "Keepalive / user-timeout setsockopt calls that failed.", True),
]


def _family(name: str, doc: str, counter: bool, labels: list[str]) -> Metric:
    if counter:
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _table(
    prefix: str, spec: list, labels: list[str], rows: list[tuple[list[str], dict]]
) -> Iterator[Metric]:
    for key, suffix, doc, counter in spec:
        fam = _family(f"{prefix}_{suffix}", doc, counter, labels)
        for values, rec in rows:
            if rec.get(key) is not None:
                fam.add_metric(values, rec[key])
        yield fam


# UDP listeners (issue 13): status "udp" key -> label value, per family
_UDP_DROPS = {
    "drop_table_full": "table_full",
    "drop_no_backend": "no_backend",
    "drop_oversized": "oversized",
    "drop_send": "send",
    "drop_unexpected": "unexpected",
    "drop_rcvbuf": "rcvbuf",
    "drop_reply_rcvbuf": "reply_rcvbuf",
}
_UDP_CLOSED = {
    "expired_idle": "idle_timeout",
    "expired_responses": "responses",
    "drop_unreachable": "unreachable",
}


def _udp(st: dict[str, Any]) -> Iterator[Metric]:
    """Datagrams each way, drops by reason and ended flows by reason, per UDP listener."""
    datagrams = CounterMetricFamily(
        "fastlb_udp_datagrams",
        "Datagrams forwarded: in (client to backend), out (back).",
        labels=["listener", "direction"],
    )
    drops = CounterMetricFamily(
        "fastlb_udp_dropped_datagrams", "Datagrams dropped, by reason.", labels=["listener", "reason"]
    )
    closed = CounterMetricFamily(
        "fastlb_udp_flows_closed", "Flows forgotten, by reason.", labels=["listener", "reason"]
    )
    for li in st["listeners"]:
        u = li.get("udp")
        if not u:
            continue
        datagrams.add_metric([li["name"], "in"], u["datagrams_in"])
        datagrams.add_metric([li["name"], "out"], u["datagrams_out"])
        for key, reason in _UDP_DROPS.items():
            drops.add_metric([li["name"], reason], u.get(key, 0))
        for key, reason in _UDP_CLOSED.items():
            closed.add_metric([li["name"], reason], u.get(key, 0))
    yield from (datagrams, drops, closed)


class FastlbCollector:
    """A prometheus_client collector: one status read per scrape, every family built from it."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        st = self.source.status()
        yield InfoMetricFamily("fastlb_build", "fastlb version.", value={"version": __version__})
        yield GaugeMetricFamily(
            "fastlb_generation", "Shared-memory generation (bumped on every publish).", st["generation"]
        )
        reload = st.get("reload") or {}
        fam = CounterMetricFamily("fastlb_reloads", "Reloads by result.", labels=["result"])
        for result in ("ok", "failed"):
            fam.add_metric([result], reload.get(f"{result}_total", 0))
        yield fam
        sf = st.get("state_file")
        if sf is not None:
            yield GaugeMetricFamily(
                "fastlb_state_file_writable",
                "1 if the last write of the state file succeeded; 0: runtime changes are not kept "
                "across a restart.",
                1 if sf["writable"] else 0,
            )
        yield from self._access_log(st)
        yield from self._listeners(st)
        yield from self._pools(st)
        yield from self._workers(st)
        yield from announce_metrics(st)

    def _access_log(self, st: dict[str, Any]) -> Iterator[Metric]:
        """The access log's records written and dropped (a worker's ring was full), when it is on."""
        al = st.get("access_log")
        if not al:
            return
        yield CounterMetricFamily(
            "fastlb_access_log_records_written", "Access-log records written.", al["written"]
        )
        fam = CounterMetricFamily(
            "fastlb_access_log_records_dropped",
            "Access-log records dropped: the worker's ring was full.",
            labels=["worker"],
        )
        for w in st["workers"]:
            fam.add_metric([str(w["index"])], w.get("log_dropped", 0))
        yield fam

    def _listeners(self, st: dict[str, Any]) -> Iterator[Metric]:
        rows = [([li["name"]], li) for li in st["listeners"]]
        yield from _table("fastlb_listener", _LISTENER, ["listener"], rows)
        # routes and splits (issue 10): present once the status document has them
        routes = [(li["name"], r) for li in st["listeners"] for r in li.get("routes") or []]
        conns = CounterMetricFamily(
            "fastlb_route_connections", "Connections the route took.", labels=["listener", "route"]
        )
        pool_conns = CounterMetricFamily(
            "fastlb_route_pool_connections",
            "Connections the route sent to each pool of its split.",
            labels=["listener", "route", "pool"],
        )
        split = GaugeMetricFamily(
            "fastlb_route_split_weight",
            "Weight of each pool in the route's split.",
            labels=["listener", "route", "pool"],
        )
        for lname, r in routes:
            conns.add_metric([lname, r["name"]], r.get("connections", 0))
            for pool, n in (r.get("pools") or {}).items():
                pool_conns.add_metric([lname, r["name"], pool], n)
            for pool, w in (r.get("split") or {}).items():
                split.add_metric([lname, r["name"], pool], w)
        yield from (conns, pool_conns, split)
        yield from _udp(st)

    def _pools(self, st: dict[str, Any]) -> Iterator[Metric]:
        no_backend = CounterMetricFamily(
            "fastlb_pool_no_backend", "Picks that found no eligible backend.", labels=["pool"]
        )
        panic = GaugeMetricFamily(
            "fastlb_pool_panic", "1 while every backend is down and all_down = panic.", labels=["pool"]
        )
        active = GaugeMetricFamily(
            "fastlb_pool_active_priority",
            "The priority group taking new connections (-1: none usable).",
            labels=["pool"],
        )
        for p in st["pools"]:
            no_backend.add_metric([p["name"]], p["no_backend"])
            panic.add_metric([p["name"]], 1 if p["panic"] else 0)
            active.add_metric([p["name"]], -1 if p["active_priority"] is None else p["active_priority"])
        yield from (no_backend, panic, active)
        # pool totals: sums over the pool's backends (removed ones included while they drain)
        pool_rows = []
        for p in st["pools"]:
            sums = {k: sum(b[k] for b in p["backends"]) for k, _, _, c in _BACKEND if c}
            sums["active"] = sum(b["active"] for b in p["backends"])
            pool_rows.append(([p["name"]], sums))
        spec = [s for s in _BACKEND if s[3] or s[0] == "active"]
        spec = [s for s in spec if s[0] not in ("ejections", "drains")]
        yield from _table("fastlb_pool", spec, ["pool"], pool_rows)
        rows = [([p["name"], b["name"]], b) for p in st["pools"] for b in p["backends"]]
        yield from _table("fastlb_backend", _BACKEND, ["pool", "backend"], rows)
        yield from self._backend_states(rows)
        yield from self._checks(rows)
        yield self._histogram(rows)

    def _backend_states(self, rows: list[tuple[list[str], dict]]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "fastlb_backend_up",
            "1 if the health checks (and passive ejection) say up.",
            labels=["pool", "backend"],
        )
        state = GaugeMetricFamily(
            "fastlb_backend_state",
            "1 for the backend's current state (up, down, ejected, drain, maint).",
            labels=["pool", "backend", "state"],
        )
        for values, b in rows:
            up.add_metric(values, 1 if b["health"] == "up" else 0)
            for s in BACKEND_STATES:
                state.add_metric([*values, s], 1 if b["state"] == s else 0)
        yield from (up, state)

    def _checks(self, rows: list[tuple[list[str], dict]]) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "fastlb_backend_check_success",
            "1 if the last active health check passed.",
            labels=["pool", "backend"],
        )
        when = GaugeMetricFamily(
            "fastlb_backend_check_timestamp_seconds",
            "Unix time the last check finished.",
            labels=["pool", "backend"],
        )
        dur = GaugeMetricFamily(
            "fastlb_backend_check_duration_seconds",
            "How long the last check took.",
            labels=["pool", "backend"],
        )
        runs = CounterMetricFamily(
            "fastlb_backend_checks", "Active health checks run.", labels=["pool", "backend"]
        )
        for values, b in rows:
            c = b.get("check")
            if not c:
                continue
            runs.add_metric(values, c["checks"])
            if c["time"] is not None:
                ok.add_metric(values, 1 if c["result"] == "ok" else 0)
                when.add_metric(values, c["time"])
                dur.add_metric(values, c["duration_ms"] / 1000)
        yield from (ok, when, dur, runs)

    def _histogram(self, rows: list[tuple[list[str], dict]]) -> Metric:
        h = HistogramMetricFamily(
            "fastlb_backend_connect_time_seconds",
            "Time to establish the backend connection.",
            labels=["pool", "backend"],
        )
        for values, b in rows:
            counts = self.source.connect_histogram(*values)
            if counts is None:
                continue
            buckets, acc = [], 0
            for bound, n in zip((*HIST_BOUNDS_US, None), counts, strict=True):
                acc += n
                buckets.append(("+Inf" if bound is None else repr(bound / 1e6), acc))
            h.add_metric(values, buckets, b["connect_time_sum_us"] / 1e6)
        return h

    def _workers(self, st: dict[str, Any]) -> Iterator[Metric]:
        rows = [([str(w["index"])], w) for w in st["workers"]]
        yield from _table("fastlb_worker", _WORKER, ["worker"], rows)
        age = GaugeMetricFamily(
            "fastlb_worker_heartbeat_age_seconds",
            "Seconds since the worker's loop last turned.",
            labels=["worker"],
        )
        state = GaugeMetricFamily(
            "fastlb_worker_state", "1 for the worker's current state.", labels=["worker", "state"]
        )
        for values, w in rows:
            if w.get("heartbeat_age_ms") is not None:
                age.add_metric(values, w["heartbeat_age_ms"] / 1000)
            for s in WORKER_STATE_NAMES.values():
                state.add_metric([*values, s], 1 if w["state"] == s else 0)
        yield from (age, state)


def announce_metrics(st: dict[str, Any]) -> Iterator[Metric]:
    """VIP announcement (fleet/announce.py): is each address announced, withdrawals by reason."""
    rows = st.get("announce") or []
    if not rows:
        return
    up = GaugeMetricFamily(
        "fastlb_announced", "1 while the address's route is announced.", labels=["address"]
    )
    gone = CounterMetricFamily(
        "fastlb_announce_withdrawals", "Routes withdrawn, by reason.", labels=["address", "reason"]
    )
    for a in rows:
        up.add_metric([a["address"]], 1 if a["announced"] else 0)
        for reason, n in sorted(a.get("withdrawals", {}).items()):
            gone.add_metric([a["address"], reason], n)
    yield up
    yield gone


def render(source: MetricsSource) -> bytes:
    """The /metrics body."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FastlbCollector(source))  # type: ignore[arg-type]
    return generate_latest(registry)


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


async def _serve(
    render_body: Callable[[], bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) != 3 or not line[2].startswith("HTTP/"):
            reply = _response("400 Bad Request", b"bad request\n")
        elif line[0] not in ("GET", "HEAD"):
            reply = _response("405 Method Not Allowed", b"GET /metrics\n")
        elif line[1].split("?", 1)[0] != "/metrics":
            reply = _response("404 Not Found", b"fastlb serves /metrics only\n")
        else:
            reply = _response("200 OK", render_body(), CONTENT_TYPE)
            if line[0] == "HEAD":
                reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        writer.write(reply)
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        pass
    except Exception:
        log.exception("metrics: scrape failed")
        with contextlib.suppress(Exception):
            writer.write(_response("500 Internal Server Error", b"scrape failed, see the fastlb log\n"))
    finally:
        writer.close()


class MetricsServer:
    """The /metrics listener: one response per connection (Connection: close), at most
    MAX_CONNECTIONS open, the request head within REQUEST_TIMEOUT (fastlb.fleet.http_guard: the
    same limits as the admin API's defaults, so slow scrapers never pin the control process)."""

    def __init__(self, source: MetricsSource, sock: socket.socket) -> None:
        from fastlb.fleet.http_guard import GuardedServer, HttpLimits

        def protocol() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=MAX_REQUEST_HEAD)
            return asyncio.StreamReaderProtocol(reader, lambda r, w: _serve(lambda: render(source), r, w))

        self.guard = GuardedServer(sock, protocol, HttpLimits(REQUEST_TIMEOUT, MAX_CONNECTIONS), "metrics")

    def close(self) -> None:
        """Stop accepting and close the listening socket (a takeover has handed a copy on)."""
        self.guard.close(close_socket=True)

    async def stop_accepting(self) -> None:
        """A takeover: stop accepting; every scrape accepted already is still answered."""
        await self.guard.stop_accepting()

    @property
    def _active_count(self) -> int:  # what runtime/ops.py waits on: connections not yet closed
        return self.guard.active


async def start_metrics_server(source: MetricsSource, sock: socket.socket) -> MetricsServer:
    """Serve /metrics on the listening socket."""
    server = MetricsServer(source, sock)
    server.guard.start()
    return server
