"""Issue 9, item 2: a backend that accepts and then closes or resets before any byte moved is a
failure, and the connection is retried on another backend; a backend that has read bytes worked.

Real `fastlb serve`, real backend processes (support.backends), real iperf3."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from support.backends import server
from support.helpers import free_port, wait_until
from support.protocols import Gate, backends_status, control, log_text, try_id_request, wait_log

WORKERS = 2


def run_clients(lb, n_threads: int, per_thread: int, results: list, gate: Gate | None = None) -> list:
    """n_threads client threads, each doing per_thread id requests in a row; results get
    (start time, backend name or "FAIL: ...")."""
    lock = threading.Lock()

    def client() -> None:
        for _ in range(per_thread):
            t0 = time.monotonic()
            if gate is not None:
                with gate.use():
                    r = try_id_request(lb.addr)
            else:
                r = try_id_request(lb.addr)
            with lock:
                results.append((t0, r))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()
    return threads


def test_accept_then_close_backend_is_ejected_and_its_connections_retried(backends, fastlb):
    """x accepts and closes at once.  With retries = 1 every client connection x took is retried on
    a: no client fails at all; x's early closes count as consecutive failures and eject it after
    `consecutive_failures` (5); afterwards x gets no connection."""
    b = backends(server("a", "id"), server("x", "close_on_accept"))
    lb = fastlb(
        [("a", b.address("a"), 1), ("x", b.address("x"), 1)],
        workers=WORKERS,
        algorithm="round_robin",
        pool={
            "retries": 1,
            "outlier_detection": {"consecutive_failures": 5, "base_ejection_time": "60s"},
        },
    )
    results: list = []
    for t in run_clients(lb, 4, 25, results):
        t.join(60)
    failed = [r for _, r in results if r.startswith("FAIL")]
    assert len(results) == 100 and failed == [], f"{len(failed)} client connections failed: {failed[:3]}"
    assert {r for _, r in results} == {"a"}
    wait_log(lb, r"pool web backend x: EJECTED after \d+ consecutive failures", 5)
    st = backends_status(lb)["x"]
    assert st["health"] == "ejected"
    assert st["early_closes"] >= 5
    workers = control(lb).status()["workers"]
    assert sum(w["early_close_retries"] for w in workers) >= 5
    # after the ejection: x takes nothing, nothing fails
    accepted_x = b.accepted()["x"]
    after: list = []
    for t in run_clients(lb, 4, 10, after):
        t.join(60)
    assert [r for _, r in after] == ["a"] * 40
    assert b.accepted()["x"] == accepted_x


def test_killed_backend_queue_is_retried_no_client_fails(backends, fastlb):
    """Three `id` backends, each its own process; 8 clients loop.  c is frozen (SIGSTOP) between
    connections, so the connections sent to it next sit in its kernel accept queue (connected for
    fastlb, never seen by the process), then SIGKILLed: the kernel resets them before any byte, and
    fastlb retries them on a or b.  0 failed client connections over the whole run."""
    procs = {n: backends(server(n, "id")) for n in "abc"}
    lb = fastlb(
        [(n, procs[n].address(n), 1) for n in "abc"],
        workers=WORKERS,
        algorithm="round_robin",
        pool={"retries": 2, "outlier_detection": {"consecutive_failures": 3, "base_ejection_time": "60s"}},
        listener={"connect_timeout": "2s"},
    )
    gate = Gate()
    results: list = []
    threads = run_clients(lb, 8, 40, results, gate)
    try:
        wait_until(lambda: len(results) >= 40, 30, lambda: f"40 connections done (have {len(results)})")
        with gate.exclusive():
            os.kill(procs["c"].pid, signal.SIGSTOP)
        # connections now land in c's accept queue; wait until some do, then kill it
        wait_until(lambda: backends_status(lb)["c"]["active"] >= 2, 10, "connections waiting on the frozen c")
        t_kill = time.monotonic()
        os.kill(procs["c"].pid, signal.SIGKILL)
        procs["c"].proc.wait(5)
    finally:
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads)
    failed = [r for _, r in results if r.startswith("FAIL")]
    assert len(results) == 320
    assert failed == [], f"{len(failed)} of 320 client connections failed: {failed[:3]}"
    st = backends_status(lb)["c"]
    assert st["early_closes"] + st["resets"] >= 2, st
    assert {r for t, r in results if t > t_kill + 1.0} <= {"a", "b"}


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
def test_iperf3_upload_streams_reset_by_the_server_are_not_failures(fastlb, tmp_path):
    """iperf3's data streams are upload-only and the iperf3 server ends them with a reset: the
    backend has read bytes, so it worked.  `iperf3 -P 8` five times in a row through fastlb: all
    pass, the only backend is never ejected and has no failure streak."""
    port = free_port()
    log = open(tmp_path / "iperf3-server.log", "wb")  # noqa: SIM115
    srv = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        lb = fastlb(
            [("i", f"127.0.0.1:{port}", 1)],
            workers=WORKERS,
            pool={"outlier_detection": {"consecutive_failures": 8, "base_ejection_time": "60s"}},
        )
        time.sleep(0.3)  # the iperf3 server listens (it prints nothing before it does)
        for run in range(5):
            r = subprocess.run(
                ["iperf3", "-c", "127.0.0.1", "-p", str(lb.port), "-P", "8", "-t", "1", "-b", "200M"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, f"iperf3 run {run + 1} failed: {r.stdout[-500:]} {r.stderr[-500:]}"
            st = backends_status(lb)["i"]
            assert st["health"] == "up", f"backend ejected after run {run + 1}: {st}"
            wait_until(lambda: backends_status(lb)["i"]["active"] == 0, 10, "the iperf3 streams to finish")
        st = backends_status(lb)["i"]
        assert st["consecutive_failures"] == 0 and st["early_closes"] == 0, st
        assert "EJECTED" not in log_text(lb)
    finally:
        srv.kill()
        srv.wait(5)
        log.close()
