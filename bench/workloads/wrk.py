"""HTTP through the balancer with wrk: keep-alive requests, and a new connection per request.

Pool "http": one nginx worker (configs/nginx_backend.conf.tmpl) serving BODY on 2 ports."""

from __future__ import annotations

import json
import socket
import subprocess

from common import CONFIGS, LOOPBACK, NOFILE_HARD_FALLBACK, BenchError, render_template, wait_until
from workloads import Pool, Workload

BODY = "fastlb benchmark backend: a small static response."  # the HTTP backend's whole response body


def http_ok(port: int) -> bool:
    """One GET through `port`: True if the benchmark backend's 200 response came back whole."""
    with socket.create_connection((LOOPBACK, port), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not (data.startswith(b"HTTP/1.1 200") and data.endswith(BODY.encode())):
        raise BenchError(f"unexpected response through port {port}: {data[:80]!r}")
    return True


def start_nginx(suite, ports: list[int]) -> None:
    conf = render_template(
        "nginx_backend.conf.tmpl",
        suite.rundir / "backend.conf",
        rundir=suite.rundir,
        nofile=NOFILE_HARD_FALLBACK,
        n_ports=len(ports),
        body=BODY,
        listens="\n".join(f"        listen {LOOPBACK}:{p};" for p in ports),
    )
    log_path = suite.logs / "backend-nginx.log"
    p = suite.procs.start(
        "backend-nginx",
        ["nginx", "-p", str(suite.rundir), "-c", str(conf), "-e", str(suite.rundir / "backend-error.log")],
        cpu=suite.s.load_cpu,
        log_path=log_path,
    )
    for port in ports:
        wait_until(lambda port=port: http_ok(port), f"nginx backend :{port}", p, log_path)


HTTP = Pool(
    "http", n_backends=2, backend_offset=81, listener=0, start=start_nginx, check=http_ok, what="HTTP"
)


def wrk(suite, port: int, close: bool) -> dict:
    s = suite.s
    argv = ["taskset", "-c", str(s.load_cpu), "wrk", "-t1", f"-c{s.wrk_conns}", f"-d{s.duration:g}s"]
    argv += ["--timeout", "2s", "-s", str(CONFIGS / "wrk_report.lua")]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{LOOPBACK}:{port}/")
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=s.duration + 30)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("wrk did not finish in time") from exc
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if r.returncode != 0 or line is None:
        raise BenchError(f"wrk exit {r.returncode}: {(r.stderr or r.stdout).strip()[:200]}")
    w = json.loads(line[len("WRKJSON ") :])
    errors = sum(v for k, v in w.items() if k.startswith("errors_"))
    seconds = w["duration_us"] / 1e6
    if w["requests"] == 0:
        raise BenchError(f"wrk: no request completed ({errors} errors)")
    return {
        "rate": w["requests"] / seconds,
        "work": w["requests"],
        "seconds": seconds,
        "p50_ms": w["lat_p50_us"] / 1000,
        "p90_ms": w["lat_p90_us"] / 1000,
        "p99_ms": w["lat_p99_us"] / 1000,
        "max_ms": w["lat_max_us"] / 1000,
        "errors": errors,
        "wrk": w,
    }


WORKLOADS = [
    Workload(
        name,
        order=order,
        title=title,
        unit=unit,
        work_unit=unit.split("/")[0],
        higher_is_better=True,
        pool=HTTP,
        measure=lambda suite, run, close=close: wrk(suite, run.ports["http"], close=close),
        table="latency",
        summary_keys=("p50_ms", "p99_ms", "errors"),
    )
    for name, order, title, unit, close in (
        ("keepalive", 40, "Keep-alive HTTP requests (wrk)", "req/s", False),
        ("close", 50, "New connection per request (wrk, Connection: close)", "conn/s", True),
    )
]
