"""Bulk throughput through the balancer with iperf3, 1 and 4 parallel streams.

Pool "bulk": one iperf3 server (one backend, since iperf3's control and data connections must reach
the same server).  It runs one test at a time, so it is not probed through the balancer, and it is
restarted after a failed run (a failed test can leave it busy)."""

from __future__ import annotations

import json
import subprocess

from common import LOOPBACK, BenchError, listening, wait_until
from workloads import Pool, Workload


def start_iperf(suite, ports: list[int]) -> None:
    """Start (or restart) the iperf3 server; suite.iperf is its process."""
    if suite.iperf is not None:
        suite.procs.stop(suite.iperf)
    port = ports[0]
    log_path = suite.logs / "backend-iperf3.log"
    suite.iperf = suite.procs.start(
        "backend-iperf3",
        ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port)],
        cpu=suite.s.load_cpu,
        log_path=log_path,
    )
    wait_until(lambda: listening(port), f"iperf3 server :{port}", suite.iperf, log_path)


BULK = Pool(
    "bulk",
    n_backends=1,
    backend_offset=201,
    listener=1,
    start=start_iperf,
    restart=lambda suite: start_iperf(suite, suite.bp["bulk"]),
)


def iperf3(suite, port: int, streams: int) -> dict:
    s = suite.s
    argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{s.duration:g}", "-P", str(streams), "-J"]
    argv = ["taskset", "-c", str(s.load_cpu), *argv]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=s.duration + 30)
        data = json.loads(r.stdout or "{}")
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        suite.restart_pool(BULK)
        raise BenchError(f"iperf3: {exc}") from exc
    if r.returncode != 0 or "error" in data:
        suite.restart_pool(BULK)  # a failed test can leave the one-at-a-time server busy
        raise BenchError(f"iperf3 exit {r.returncode}: {data.get('error') or r.stderr.strip()[:200]}")
    got = data["end"]["sum_received"]
    return {
        "rate": got["bits_per_second"] / 1e9,
        "work": got["bytes"] * 8 / 1e9,
        "seconds": got["seconds"],
        "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
    }


WORKLOADS = [
    Workload(
        name,
        order=order,
        title=f"Bulk throughput, {streams} stream{'s' if streams > 1 else ''} (iperf3)",
        unit="Gbit/s",
        work_unit="Gbit",
        higher_is_better=True,
        pool=BULK,
        measure=lambda suite, run, streams=streams: iperf3(suite, run.ports["bulk"], streams),
    )
    for name, order, streams in (("bulk1", 20, 1), ("bulk4", 30, 4))
]
