"""Memory per idle connection: a helper opens many connections through the balancer, echoes one byte
on each end to end, and holds them while the balancer's processes are measured.

Pool "idle": an asyncio echo server on 2 ports (`compare.py echo-server`, run from here; its memory is
not measured).  The helper is `compare.py hold-idle`."""

from __future__ import annotations

import resource
import select
import signal
import socket
import subprocess
import sys
import time

from common import COMPARE, LOOPBACK, BenchError, Running, log_tail, wait_until
from system import memory
from workloads import Pool, Workload


def echo_ok(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=3) as s:
        s.sendall(b"ping")
        return s.recv(16) == b"ping"


def start_echo(suite, ports: list[int]) -> None:
    log_path = suite.logs / "backend-echo.log"
    argv = [sys.executable, str(COMPARE), "echo-server", "--ports", ",".join(map(str, ports))]
    p = suite.procs.start("backend-echo", argv, cpu=suite.s.load_cpu, log_path=log_path)
    for port in ports:
        wait_until(lambda port=port: echo_ok(port), f"echo backend :{port}", p, log_path)


IDLE = Pool(
    "idle", n_backends=2, backend_offset=301, listener=2, start=start_echo, check=echo_ok, what="echo"
)


def idle(suite, run: Running) -> dict:
    """Hold idle connections through the balancer from a helper; RSS before and while they are open."""
    if run.proc is None:
        raise BenchError("no balancer process to measure")
    n = suite.s.idle_conns
    before = memory(run.proc.pid)
    argv = [
        sys.executable,
        str(COMPARE),
        "hold-idle",
        "--port",
        str(run.ports["idle"]),
        "--count",
        str(n),
    ]
    log_path = suite.logs / "hold-idle.log"
    helper = suite.procs.start(
        "hold-idle",
        argv,
        cpu=suite.s.load_cpu,
        log_path=log_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        ready, _, _ = select.select([helper.stdout], [], [], 180)
        line = helper.stdout.readline().decode().split() if ready else []
        if line[:1] != ["ready"]:
            raise BenchError(f"hold-idle did not get {n} connections up: {log_tail(log_path)}")
        time.sleep(1.0)  # let lazy allocations settle
        held = memory(run.proc.pid)
        helper.stdin.write(b"close\n")
        helper.stdin.flush()
        helper.wait(60)
    finally:
        suite.procs.stop(helper)
    return {
        "rate": held["rss"] / n / 1024,
        "marginal_kib_per_conn": (held["rss"] - before["rss"]) / n / 1024,
        "conns": n,
        "rss_before": before["rss"],
        "rss_held": held["rss"],
        "pss_before": before["pss"],
        "pss_held": held["pss"],
        "pss_kib_per_conn": held["pss"] / n / 1024,
        "processes": held["processes"],
    }


WORKLOADS = [
    Workload(
        "idle",
        order=10,  # first, on a fresh process
        title="Memory per idle connection (all balancer processes)",
        unit="KiB/conn",
        work_unit="",
        higher_is_better=False,
        pool=IDLE,
        measure=idle,
        table="memory",
        balancer_only=True,
        retry_when_noisy=False,
        summary_keys=("pss_kib_per_conn", "processes", "marginal_kib_per_conn", "rss_before", "rss_held"),
    )
]


# ---------------------------------------------------------------------------------------------------------
# Helpers run as child processes: the echo backend and the idle-connection holder


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def echo_server(ports: list[int]) -> int:
    """Echo backend for the idle-connection test (asyncio; its memory is not measured)."""
    import asyncio

    raise_nofile()

    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main():
        servers = [await asyncio.start_server(handle, LOOPBACK, p, backlog=4096) for p in ports]
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        for srv in servers:
            srv.close()

    asyncio.run(main())
    return 0


def hold_idle(port: int, count: int, batch: int = 200, limit_s: float = 600) -> int:
    """Open `count` connections to port in batches, each echoing one byte end to end; print 'ready N'; hold
    them until a line (or EOF) on stdin; close them.  Exits by itself after limit_s whatever happens."""
    raise_nofile()
    signal.alarm(int(limit_s))
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        for start in range(0, count, batch):
            chunk = [
                socket.create_connection((LOOPBACK, port), timeout=15)
                for _ in range(min(batch, count - start))
            ]
            for s in chunk:
                s.sendall(b"x")
            for s in chunk:
                if s.recv(1) != b"x":
                    print(f"no echo on connection {len(socks)}", file=sys.stderr)
                    return 1
            socks.extend(chunk)
        print(f"{len(socks)} connections up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        print(f"ready {len(socks)}", flush=True)
        sys.stdin.readline()
        return 0
    except OSError as exc:
        print(f"after {len(socks)} connections: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in socks:
            s.close()
