"""Comparison benchmark driver: fastlb against HAProxy, nginx stream, an asyncio proxy and a direct connection.

Run it through scripts/bench, which installs the tools first.  All traffic stays on 127.0.0.1; every
process started here is stopped in a finally block (also on SIGTERM/SIGINT), every load has a time bound.

The balancer under test is the bottleneck by construction: it runs pinned to one CPU inside a cgroup with a
CPU quota, while the load generators and backends run on the other CPU.  Targets are interleaved in rounds;
the summary gives medians with min/max, the balancer's own CPU time per run, work per balancer CPU-second
and ratios to HAProxy and to the direct connection from the same round.  bench/README.md has the method.

    python bench/compare.py run [--quick] [--rounds 3] [--duration 5] [--workers 1,2] [--targets ...]
    python bench/compare.py report RESULTS.json        # regenerate BENCHMARKS.md and the chart only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
OPTIMISATIONS = HERE / "optimisations.md"  # hand-written section of BENCHMARKS.md
MICRO = RESULTS / "micro.json"  # pytest-benchmark's JSON of bench/test_bench_*.py (scripts/bench micro)
LOOPBACK = "127.0.0.1"

TARGETS = ("direct", "haproxy", "nginx", "asyncio", "fastlb")
BALANCERS = TARGETS[1:]
WORKLOADS = ("idle", "bulk1", "bulk4", "keepalive", "close")
# title, unit of the rate, unit of the work counted per balancer CPU-second, higher is better?
WORKLOAD_INFO = {
    "bulk1": ("Bulk throughput, 1 stream (iperf3)", "Gbit/s", "Gbit", True),
    "bulk4": ("Bulk throughput, 4 streams (iperf3)", "Gbit/s", "Gbit", True),
    "keepalive": ("Keep-alive HTTP requests (wrk)", "req/s", "req", True),
    "close": ("New connection per request (wrk, Connection: close)", "conn/s", "conn", True),
    "idle": ("Memory per idle connection (all balancer processes)", "KiB/conn", "", False),
}
TARGET_LABEL = {
    "direct": "direct (no balancer)",
    "haproxy": "HAProxy",
    "nginx": "nginx stream",
    "asyncio": "asyncio proxy",
    "fastlb": "fastlb",
}
NOFILE_HARD_FALLBACK = 20000
NOISY = 0.10  # other processes using more than this share of a CPU make a run noisy
QUIET_WAIT_S = 20.0  # before each target, wait up to this long for the machine to be quiet
NOISY_RETRIES = 2  # a noisy run is repeated at most this many times
BOOST_NICE = -10  # the load side (driver, clients, backends) runs at this nice value (--no-boost: off)
BOOST_SHARES = 10240  # cgroup v1 cpu.shares (v2: cpu.weight 1000) of the balancer's group (--no-boost: off)
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
BODY = "fastlb benchmark backend: a small static response."  # the HTTP backend's whole response body


def fmt_other(other: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in other.items())


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run that could not be measured; the message says why (recorded, the suite goes on)."""


# ---------------------------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    rounds: int = 3
    duration: float = 5.0
    workers: tuple[int, ...] = (1, 2)
    targets: tuple[str, ...] = TARGETS
    workloads: tuple[str, ...] = WORKLOADS
    idle_conns: int = 9000
    wrk_conns: int = 32
    cpu_quota_pct: int = 50
    cpu_period_us: int = 10000
    balancer_cpu: int = 1
    load_cpu: int = 0
    port_base: int = 18000
    quick: bool = False
    publish: bool = True
    boost: bool = True  # priority over other processes on a shared machine (nice, cgroup weight)

    def ports(self, target: str) -> dict[str, int]:
        """Listening ports of a balancer target (direct uses the backends' own ports)."""
        base = self.port_base + 1000 + 100 * BALANCERS.index(target)
        return {"http": base, "bulk": base + 1, "idle": base + 2}

    def backend_ports(self) -> dict[str, list[int]]:
        b = self.port_base
        return {"http": [b + 81, b + 82], "bulk": [b + 201], "idle": [b + 301, b + 302]}


# ---------------------------------------------------------------------------------------------------------
# The CPU limit: a cgroup with a CPU quota (v2 cpu.max, else v1 cfs_quota_us), else pinning only


class CpuLimit:
    """One cgroup for the balancer under test.  `procs_file` is where a child writes its pid before exec.

    The quota is a fraction of one CPU per `period_us`.  A short period (10 ms by default) keeps the
    throttling stalls short, so latency percentiles measure queueing in the balancer, not 50 ms pauses.
    """

    def __init__(self, quota_pct: int, period_us: int, boost: bool) -> None:
        self.quota_us = max(1000, period_us * quota_pct // 100)
        self.boost = boost
        self.period_us = period_us
        self.path: Path | None = None
        self.kind = "none"
        self.note = ""
        name = f"fastlb-bench-{os.getpid()}"
        for kind, root in (("v2", Path("/sys/fs/cgroup")), ("v2", Path("/sys/fs/cgroup/unified"))):
            controllers = root / "cgroup.controllers"
            if controllers.exists() and "cpu" in controllers.read_text().split():
                try:
                    with contextlib.suppress(OSError):
                        (root / "cgroup.subtree_control").write_text("+cpu")
                    path = root / name
                    path.mkdir(exist_ok=True)
                    (path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
                    if boost:
                        (path / "cpu.weight").write_text(str(BOOST_SHARES * 1000 // 10240))
                    self.path, self.kind = path, kind
                    break
                except OSError as exc:
                    self.note = f"cgroup v2 at {root} not usable: {exc}"
        if self.path is None and Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
            try:
                path = Path("/sys/fs/cgroup/cpu") / name
                path.mkdir(exist_ok=True)
                (path / "cpu.cfs_period_us").write_text(str(self.period_us))
                (path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                if boost:
                    (path / "cpu.shares").write_text(str(BOOST_SHARES))
                self.path, self.kind = path, "v1"
            except OSError as exc:
                self.note = f"cgroup v1 cpu controller not usable: {exc}"
        if self.path is None:
            log(f"no writable cgroup CPU controller ({self.note or 'none mounted'}): pinning only, no quota")

    @property
    def procs_file(self) -> str | None:
        return str(self.path / "cgroup.procs") if self.path else None

    def describe(self) -> str:
        if self.path is None:
            return f"no CPU quota (no writable cgroup CPU controller: {self.note or 'none mounted'})"
        knob = "cpu.max" if self.kind == "v2" else "cpu.cfs_quota_us/cpu.cfs_period_us"
        text = (
            f"cgroup {self.kind} {knob} = {self.quota_us}/{self.period_us} us "
            f"({100 * self.quota_us / self.period_us:.0f}% of one CPU)"
        )
        if self.boost:
            weight = "cpu.weight 1000" if self.kind == "v2" else f"cpu.shares {BOOST_SHARES}"
            text += f", {weight} against other processes"
        return text

    def stat(self) -> dict[str, int] | None:
        """nr_periods, nr_throttled, throttled_usec of the cgroup (v1 reports nanoseconds: converted)."""
        if self.path is None:
            return None
        raw = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            raw[key] = int(value)
        usec = raw.get("throttled_usec", raw.get("throttled_time", 0) // 1000)
        return {
            "nr_periods": raw.get("nr_periods", 0),
            "nr_throttled": raw.get("nr_throttled", 0),
            "throttled_usec": usec,
        }

    def pids(self) -> list[int]:
        if self.path is None:
            return []
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        log(f"could not remove cgroup {self.path} (processes left: {self.pids()})")


# ---------------------------------------------------------------------------------------------------------
# Processes: every one started here is registered and stopped, process group and all


def _child_setup(cpu: int, procs_file: str | None) -> None:  # runs in the child between fork and exec
    os.sched_setaffinity(0, {cpu})
    if procs_file:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Procs:
    """Start processes in their own process group on a chosen CPU; stop_all() ends them in reverse order."""

    def __init__(self) -> None:
        self.live: list[tuple[str, subprocess.Popen]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int,
        log_path: Path,
        procs_file: str | None = None,
        env: dict[str, str] | None = None,
        stdin=subprocess.DEVNULL,
        stdout=None,
    ) -> subprocess.Popen:
        logf = open(log_path, "ab")  # the child gets its own copy; ours is closed below
        try:
            p = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout if stdout is not None else logf,
                stderr=logf,
                env=env,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(cpu, procs_file),
                cwd=ROOT,
            )
        finally:
            logf.close()
        self.live.append((name, p))
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 10.0) -> None:
        """SIGTERM to the top process only (a master stops its own workers in order), then SIGKILL the group."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        # children that outlived their parent are still in its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        for stream in (p.stdin, p.stdout):
            if stream:
                stream.close()
        self.live = [(n, q) for n, q in self.live if q is not p]

    def stop_all(self) -> None:
        for _, p in reversed(list(self.live)):
            self.stop(p)


def log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# ---------------------------------------------------------------------------------------------------------
# Readiness


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port or *:port, from /proc/net/tcp* (no connection made)."""
    want = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[1].endswith(want) and cols[3] == "0A":
                    return True
    return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def wait_until(check, what: str, proc: subprocess.Popen | None, log_path: Path | None, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(
                f"{what}: exited with {proc.returncode}: {log_tail(log_path) if log_path else ''}"
            )
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what}: not ready after {timeout:.0f}s: {log_tail(log_path) if log_path else ''}"
            )
        time.sleep(0.05)


def can_connect(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=0.5):
        return True


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


def echo_ok(port: int) -> bool:
    with socket.create_connection((LOOPBACK, port), timeout=3) as s:
        s.sendall(b"ping")
        return s.recv(16) == b"ping"


def wait_notify(sock: socket.socket, proc: subprocess.Popen, log_path: Path, timeout: float = 30.0) -> None:
    """Wait for sd_notify READY=1 on our AF_UNIX datagram socket, failing fast if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"fastlb exited with {proc.returncode}: {log_tail(log_path)}")
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            msg = sock.recv(4096)
            if b"READY=1" in msg.split(b"\n"):
                return
    raise BenchError(f"fastlb sent no READY=1 within {timeout:.0f}s: {log_tail(log_path)}")


# ---------------------------------------------------------------------------------------------------------
# The balancer's processes: CPU time, memory, pinning


def proc_tree(pid: int) -> list[psutil.Process]:
    try:
        top = psutil.Process(pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in proc_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def memory(pid: int) -> dict[str, int]:
    rss = pss = 0
    procs = proc_tree(pid)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            m = p.memory_full_info()
            rss += m.rss
            pss += m.pss
    return {"rss": rss, "pss": pss, "processes": len(procs)}


def busy_per_cpu() -> list[tuple[float, float]]:
    """(process time: user+nice+system, interrupt time: irq+softirq) of each CPU since boot, in seconds."""
    return [(c.user + c.nice + c.system, c.irq + c.softirq) for c in psutil.cpu_times(percpu=True)]


def our_cpu_seconds() -> float:
    """CPU time of this driver and everything it started, live or already reaped."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class CpuSnapshot:
    """A point to measure from: per-CPU busy time, ours, the balancer's.  other_since() is the noise:
    process time on the balancer's and the load CPU that neither the balancer nor our load/backends used
    (interrupt time, mostly loopback networking done for us, is reported apart)."""

    busy: list[tuple[float, float]]
    ours: float
    balancer: float

    @classmethod
    def take(cls, balancer_pid: int | None) -> CpuSnapshot:
        return cls(busy_per_cpu(), our_cpu_seconds(), cpu_seconds(balancer_pid) if balancer_pid else 0.0)

    def other_since(self, before: CpuSnapshot, balancer_cpu: int, load_cpu: int) -> dict[str, float]:
        bal = self.balancer - before.balancer
        load = (self.ours - before.ours) - bal

        def delta(cpu: int, i: int) -> float:
            return self.busy[cpu][i] - before.busy[cpu][i]

        return {
            "balancer_cpu": max(0.0, delta(balancer_cpu, 0) - bal),
            "load_cpu": max(0.0, delta(load_cpu, 0) - load),
            "irq_balancer_cpu": delta(balancer_cpu, 1),
            "irq_load_cpu": delta(load_cpu, 1),
        }

    @staticmethod
    def noise(other: dict[str, float]) -> float:
        return max(other["balancer_cpu"], other["load_cpu"])


def pin_tree(pid: int, cpu: int) -> int:
    """Pin every thread of the balancer to `cpu` (a balancer may set its own affinity); returns threads moved."""
    moved = 0
    for p in proc_tree(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with contextlib.suppress(OSError):
                    if os.sched_getaffinity(int(tid)) != {cpu}:
                        os.sched_setaffinity(int(tid), {cpu})
                        moved += 1
    return moved


# ---------------------------------------------------------------------------------------------------------
# The suite's context: settings, processes, backends


def render_template(name: str, out: Path, **values) -> Path:
    text = string.Template((CONFIGS / name).read_text()).substitute({k: str(v) for k, v in values.items()})
    out.write_text(text)
    return out


@dataclass
class Running:
    """A started target: its top process (None for direct), the ports clients use, setup notes."""

    target: str
    workers: int
    ports: dict[str, int]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    extra: list = field(default_factory=list)  # sockets etc. to close on stop


class Suite:
    def __init__(self, settings: Settings, out_dir: Path) -> None:
        self.s = settings
        self.out_dir = out_dir
        self.logs = out_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix="fastlb-bench-"))
        self.procs = Procs()
        self.cpu = CpuLimit(settings.cpu_quota_pct, settings.cpu_period_us, settings.boost)
        self.iperf: subprocess.Popen | None = None
        self.bp = settings.backend_ports()

    def close(self) -> None:
        self.procs.stop_all()
        self.cpu.remove()
        shutil.rmtree(self.rundir, ignore_errors=True)

    # -- backends (on the load CPU) ------------------------------------------------------------------

    def start_backends(self) -> None:
        s = self.s
        for port in [p for ports in self.bp.values() for p in ports] + [
            p for t in s.targets if t != "direct" for p in s.ports(t).values()
        ]:
            if not port_free(port):
                raise BenchError(f"port {port} on {LOOPBACK} is in use: pick another --port-base")
        conf = render_template(
            "nginx_backend.conf.tmpl",
            self.rundir / "backend.conf",
            rundir=self.rundir,
            nofile=NOFILE_HARD_FALLBACK,
            n_ports=len(self.bp["http"]),
            body=BODY,
            listens="\n".join(f"        listen {LOOPBACK}:{p};" for p in self.bp["http"]),
        )
        log_path = self.logs / "backend-nginx.log"
        p = self.procs.start(
            "backend-nginx",
            ["nginx", "-p", str(self.rundir), "-c", str(conf), "-e", str(self.rundir / "backend-error.log")],
            cpu=s.load_cpu,
            log_path=log_path,
        )
        for port in self.bp["http"]:
            wait_until(lambda port=port: http_ok(port), f"nginx backend :{port}", p, log_path)
        log_path = self.logs / "backend-echo.log"
        argv = [
            sys.executable,
            str(Path(__file__)),
            "echo-server",
            "--ports",
            ",".join(map(str, self.bp["idle"])),
        ]
        p = self.procs.start("backend-echo", argv, cpu=s.load_cpu, log_path=log_path)
        for port in self.bp["idle"]:
            wait_until(lambda port=port: echo_ok(port), f"echo backend :{port}", p, log_path)
        self.start_iperf()

    def start_iperf(self) -> None:
        if self.iperf is not None:
            self.procs.stop(self.iperf)
        port = self.bp["bulk"][0]
        log_path = self.logs / "backend-iperf3.log"
        self.iperf = self.procs.start(
            "backend-iperf3",
            ["iperf3", "-s", "-B", LOOPBACK, "-p", str(port)],
            cpu=self.s.load_cpu,
            log_path=log_path,
        )
        wait_until(lambda: listening(port), f"iperf3 server :{port}", self.iperf, log_path)

    # -- targets (the balancer on its own CPU, in the cgroup) ------------------------------------------

    def servers(self, kind: str, fmt: str) -> str:
        return "\n".join(fmt.format(i=i, port=port, host=LOOPBACK) for i, port in enumerate(self.bp[kind]))

    def start_target(self, target: str, workers: int, tag: str) -> Running:
        s = self.s
        if target == "direct":
            return Running(target, workers, {k: v[0] for k, v in self.bp.items()})
        ports = s.ports(target)
        log_path = self.logs / f"{tag}.log"
        env = dict(os.environ)
        run = Running(target, workers, ports, log_path=log_path)
        if target == "haproxy":
            cfg = render_template(
                "haproxy.cfg.tmpl",
                self.rundir / "haproxy.cfg",
                workers=workers,
                maxconn=(maxconn := min(9500, s.idle_conns + 400)),
                # HAProxy reserves 2 fds per splice pipe (maxpipes defaults to maxconn/4): keep the total
                # under the 20,000 open-file limit; a few hundred pipes cover every non-idle workload here.
                maxpipes=max(64, (NOFILE_HARD_FALLBACK - 2 * maxconn - 200) // 2),
                rundir=self.rundir,
                **{f"{k}_port": v for k, v in ports.items()},
                **{f"{k}_servers": self.servers(k, "    server b{i} {host}:{port}") for k in self.bp},
            )
            argv = ["haproxy", "-db", "-f", str(cfg)]
        elif target == "nginx":
            cfg = render_template(
                "nginx_stream.conf.tmpl",
                self.rundir / "nginx-stream.conf",
                stream_module=STREAM_MODULE,
                workers=workers,
                nofile=NOFILE_HARD_FALLBACK,
                worker_connections=NOFILE_HARD_FALLBACK - 200,
                rundir=self.rundir,
                **{f"{k}_port": v for k, v in ports.items()},
                **{f"{k}_servers": self.servers(k, "        server {host}:{port};") for k in self.bp},
            )
            argv = [
                "nginx",
                "-p",
                str(self.rundir),
                "-c",
                str(cfg),
                "-e",
                str(self.rundir / "nginx-stream-error.log"),
            ]
        elif target == "asyncio":
            argv = [sys.executable, str(HERE / "asyncio_proxy.py"), "--workers", str(workers)]
            for kind, port in ports.items():
                backends = ",".join(f"{LOOPBACK}:{p}" for p in self.bp[kind])
                argv += ["--route", f"{LOOPBACK}:{port}={backends}"]
        elif target == "fastlb":
            cfg = render_template(
                "fastlb.toml.tmpl",
                self.rundir / "fastlb.toml",
                rundir=self.rundir,
                **{f"{k}_port": v for k, v in ports.items()},
                **{
                    f"{k}_servers": self.servers(k, '  {{ name = "b{i}", address = "{host}:{port}" }},')
                    for k in self.bp
                },
            )
            notify_path = self.rundir / "notify.sock"
            with contextlib.suppress(FileNotFoundError):
                notify_path.unlink()
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(str(notify_path))
            run.extra.append(notify)
            env["NOTIFY_SOCKET"] = str(notify_path)
            argv = [shutil.which("fastlb") or "fastlb", "serve", "-c", str(cfg), "--workers", str(workers)]
        else:
            raise BenchError(f"unknown target {target}")
        with open(log_path, "ab") as f:
            f.write(f"$ {' '.join(argv)}\n".encode())
        run.proc = self.procs.start(
            target, argv, cpu=s.balancer_cpu, log_path=log_path, procs_file=self.cpu.procs_file, env=env
        )
        try:
            if target == "fastlb":
                wait_notify(run.extra[0], run.proc, log_path)
            wait_until(lambda: can_connect(ports["http"]), f"{target} :{ports['http']}", run.proc, log_path)
            wait_until(lambda: http_ok(ports["http"]), f"{target} HTTP through", run.proc, log_path, 10)
            wait_until(lambda: echo_ok(ports["idle"]), f"{target} echo through", run.proc, log_path, 10)
            time.sleep(0.3)  # let all workers finish starting before the baseline readings
            moved = pin_tree(run.proc.pid, s.balancer_cpu)
            if moved:
                run.notes.append(f"re-pinned {moved} threads that had left CPU {s.balancer_cpu}")
            if self.cpu.path is not None:
                outside = {p.pid for p in proc_tree(run.proc.pid)} - set(self.cpu.pids())
                if outside:
                    raise BenchError(f"{target}: processes {sorted(outside)} are not in the CPU cgroup")
        except BaseException:
            self.stop_target(run)
            raise
        return run

    def stop_target(self, run: Running) -> None:
        if run.proc is not None:
            self.procs.stop(run.proc)
        for item in run.extra:
            item.close()
        run.extra.clear()

    def wait_quiet(self) -> float:
        """Wait (bounded) until other processes use < NOISY of each of our CPUs; returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            before = CpuSnapshot.take(None)
            time.sleep(0.5)
            other = CpuSnapshot.take(None).other_since(before, self.s.balancer_cpu, self.s.load_cpu)
            waited = time.monotonic() - t0
            if CpuSnapshot.noise(other) < NOISY * 0.5 or waited > QUIET_WAIT_S:
                if waited > 1:
                    log(f"waited {waited:.0f}s for other processes to go quiet (last: {fmt_other(other)})")
                return waited

    # -- workloads -----------------------------------------------------------------------------------

    def measure(self, run: Running, workload: str) -> dict:
        """Run one workload against a started target, with the balancer's CPU time and throttling around it."""
        pid = run.proc.pid if run.proc else None
        snap0 = CpuSnapshot.take(pid)
        thr0 = self.cpu.stat() if pid else None
        t0 = time.monotonic()
        if workload in ("bulk1", "bulk4"):
            metrics = self.iperf3(run.ports["bulk"], 1 if workload == "bulk1" else 4)
        elif workload in ("keepalive", "close"):
            metrics = self.wrk(run.ports["http"], close=workload == "close")
        elif workload == "idle":
            metrics = self.idle(run)
        else:
            raise BenchError(f"unknown workload {workload}")
        wall = time.monotonic() - t0
        snap1 = CpuSnapshot.take(pid)
        other = snap1.other_since(snap0, self.s.balancer_cpu, self.s.load_cpu)
        out = {"metrics": metrics, "wall_s": wall, "other_cpu_s": other}
        if pid:
            if run.proc.poll() is not None:
                raise BenchError(f"{run.target} exited with {run.proc.returncode} during {workload}")
            cpu = snap1.balancer - snap0.balancer
            thr1 = self.cpu.stat()
            out["balancer"] = {"cpu_s": cpu, "cpu_util": cpu / wall if wall else None}
            if thr0 and thr1:
                out["cgroup"] = {k: thr1[k] - thr0[k] for k in thr1}
            if workload != "idle" and metrics.get("work") is not None and cpu > 0:
                metrics["per_cpu"] = metrics["work"] / cpu
        return out

    def iperf3(self, port: int, streams: int) -> dict:
        s = self.s
        argv = ["iperf3", "-c", LOOPBACK, "-p", str(port), "-t", f"{s.duration:g}", "-P", str(streams), "-J"]
        argv = ["taskset", "-c", str(s.load_cpu), *argv]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=s.duration + 30)
            data = json.loads(r.stdout or "{}")
        except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            self.start_iperf()
            raise BenchError(f"iperf3: {exc}") from exc
        if r.returncode != 0 or "error" in data:
            self.start_iperf()  # a failed test can leave the one-at-a-time server busy
            raise BenchError(f"iperf3 exit {r.returncode}: {data.get('error') or r.stderr.strip()[:200]}")
        got = data["end"]["sum_received"]
        return {
            "rate": got["bits_per_second"] / 1e9,
            "work": got["bytes"] * 8 / 1e9,
            "seconds": got["seconds"],
            "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
        }

    def wrk(self, port: int, close: bool) -> dict:
        s = self.s
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

    def idle(self, run: Running) -> dict:
        """Hold idle connections through the balancer from a helper; RSS before and while they are open."""
        if run.proc is None:
            raise BenchError("no balancer process to measure")
        n = self.s.idle_conns
        before = memory(run.proc.pid)
        argv = [
            sys.executable,
            str(Path(__file__)),
            "hold-idle",
            "--port",
            str(run.ports["idle"]),
            "--count",
            str(n),
        ]
        log_path = self.logs / "hold-idle.log"
        helper = self.procs.start(
            "hold-idle",
            argv,
            cpu=self.s.load_cpu,
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
            self.procs.stop(helper)
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


# ---------------------------------------------------------------------------------------------------------
# The suite: targets interleaved in rounds, one JSON file per run


def run_suite(s: Settings, out_dir: Path) -> tuple[list[dict], str]:
    """All rounds of all targets; returns the run records and a description of the CPU limit used."""
    suite = Suite(s, out_dir)
    records: list[dict] = []
    cpu_limit = suite.cpu.describe()
    try:
        log(f"CPU limit for balancers: {cpu_limit}; balancer CPU {s.balancer_cpu}, load CPU {s.load_cpu}")
        suite.start_backends()
        for workers in s.workers:
            for rnd in range(1, s.rounds + 1):
                for target in s.targets:
                    records += run_target(suite, target, workers, rnd)
    finally:
        suite.close()
    return records, cpu_limit


def run_target(suite: Suite, target: str, workers: int, rnd: int) -> list[dict]:
    s = suite.s
    tag = f"w{workers}-r{rnd}-{target}"
    workloads = [w for w in s.workloads if not (target == "direct" and w == "idle")]
    out = []
    run = None
    waited = suite.wait_quiet()
    try:
        run = suite.start_target(target, workers, tag)
        start_error = None
    except BenchError as exc:
        start_error = str(exc)
        log(f"{tag}: did not start: {exc}")
    try:
        for workload in workloads:
            rec = {
                "target": target,
                "workers": workers,
                "round": rnd,
                "workload": workload,
                "time": now_iso(),
            }
            if start_error:
                rec["error"] = f"start: {start_error}"
            else:
                try:
                    rec.update(measure_quietly(suite, run, workload, tag))
                    rec["notes"] = run.notes
                    rec["waited_for_quiet_s"] = round(waited, 1)
                except BenchError as exc:
                    rec["error"] = str(exc)
            out.append(rec)
            (suite.out_dir / f"{tag}-{workload}.json").write_text(json.dumps(rec, indent=1) + "\n")
            log(f"{tag} {workload}: {brief(rec)}")
            time.sleep(0.3)
    finally:
        if run is not None:
            suite.stop_target(run)
    return out


def measure_quietly(suite: Suite, run: Running, workload: str, tag: str) -> dict:
    """measure(), repeated up to NOISY_RETRIES times (after waiting for quiet) while other processes used more
    than NOISY of a CPU during it; keeps the quietest attempt.  Memory is not sensitive to it: measured once."""
    best = None
    for attempt in range(1 + (NOISY_RETRIES if workload != "idle" else 0)):
        if attempt:
            log(f"{tag} {workload}: noisy ({brief_noise(best)}); again, attempt {attempt + 1}")
            suite.wait_quiet()
        res = suite.measure(run, workload)
        res["attempts"] = attempt + 1
        if best is None or CpuSnapshot.noise(res["other_cpu_s"]) < CpuSnapshot.noise(best["other_cpu_s"]):
            best = res
        if CpuSnapshot.noise(best["other_cpu_s"]) <= NOISY * best["wall_s"]:
            break
    return best


def brief_noise(res: dict) -> str:
    return f"others used {100 * CpuSnapshot.noise(res['other_cpu_s']) / res['wall_s']:.0f}% of a CPU"


def brief(rec: dict) -> str:
    if "error" in rec:
        return f"ERROR {rec['error']}"
    m = rec["metrics"]
    unit = WORKLOAD_INFO[rec["workload"]][1]
    text = f"{m['rate']:.4g} {unit}"
    if "p99_ms" in m:
        text += f", p50 {m['p50_ms']:.3g} ms, p99 {m['p99_ms']:.3g} ms, {m['errors']} errors"
    b = rec.get("balancer")
    if b:
        text += f"; balancer {b['cpu_s']:.2f} CPU-s ({100 * b['cpu_util']:.0f}%)"
        if "per_cpu" in m:
            text += f", {m['per_cpu']:.4g} {WORKLOAD_INFO[rec['workload']][2]}/CPU-s"
    c = rec.get("cgroup")
    if c and c["nr_periods"]:
        text += f", throttled {c['nr_throttled']}/{c['nr_periods']} periods"
    if CpuSnapshot.noise(rec["other_cpu_s"]) > NOISY * rec["wall_s"]:
        text += f" [NOISY: {brief_noise(rec)}]"
    return text


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------------------
# Summary: medians with min/max, ratios from the same round, the targets


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(records: list[dict], s: Settings, meta: dict) -> dict:
    ok = {(r["workers"], r["workload"], r["round"], r["target"]): r for r in records if "error" not in r}
    results: dict = {}
    for workers in s.workers:
        for workload in s.workloads:
            rows = {}
            for target in s.targets:
                if target == "direct" and workload == "idle":
                    continue
                series: dict[str, list] = {}
                errors = []
                for rnd in range(1, s.rounds + 1):
                    rec = ok.get((workers, workload, rnd, target))
                    if rec is None:
                        bad = next(
                            (
                                r
                                for r in records
                                if (r["workers"], r["workload"], r["round"], r["target"])
                                == (workers, workload, rnd, target)
                            ),
                            None,
                        )
                        if bad is not None:
                            errors.append(f"round {rnd}: {bad['error']}")
                        continue
                    m = rec["metrics"]

                    def add(key, value, series=series):
                        series.setdefault(key, []).append(value)

                    add("rate", m["rate"])
                    add("per_cpu", m.get("per_cpu"))
                    for key in (
                        "p50_ms",
                        "p99_ms",
                        "errors",
                        "pss_kib_per_conn",
                        "processes",
                        "marginal_kib_per_conn",
                        "rss_before",
                        "rss_held",
                    ):
                        if key in m:
                            add(key, m[key])
                    if rec.get("other_cpu_s") and rec.get("wall_s"):
                        add("noise_pct", 100 * CpuSnapshot.noise(rec["other_cpu_s"]) / rec["wall_s"])
                    b = rec.get("balancer")
                    if b:
                        add("cpu_s", b["cpu_s"])
                        add("cpu_util", b["cpu_util"])
                    c = rec.get("cgroup")
                    if c and c["nr_periods"]:
                        add("throttled_pct", 100 * c["nr_throttled"] / c["nr_periods"])
                        add("throttled_s", c["throttled_usec"] / 1e6)
                    for ref in ("haproxy", "direct"):
                        other = ok.get((workers, workload, rnd, ref))
                        if other and target != ref and other["metrics"]["rate"]:
                            add(f"vs_{ref}", m["rate"] / other["metrics"]["rate"])
                            if ref == "haproxy" and m.get("per_cpu") and other["metrics"].get("per_cpu"):
                                add("per_cpu_vs_haproxy", m["per_cpu"] / other["metrics"]["per_cpu"])
                rows[target] = {k: spread(v) for k, v in series.items()}
                if errors:
                    rows[target]["errors_runs"] = errors
            results.setdefault(str(workers), {})[workload] = rows
    summary = {"meta": meta, "settings": asdict(s), "results": results}
    summary["goals"] = evaluate_goals(summary)
    return summary


def _median(summary: dict, workers: str, workload: str, target: str, key: str) -> float | None:
    cell = summary["results"].get(workers, {}).get(workload, {}).get(target, {}).get(key)
    return cell["median"] if cell else None


def evaluate_goals(summary: dict) -> list[dict]:
    """fastlb's targets from the benchmark issue, judged on medians at each worker count."""
    goals = []
    for workers in summary["results"]:

        def med(workload, target, key, workers=workers):
            return _median(summary, workers, workload, target, key)

        def goal(name, value, ref_value, ref_name, factor, higher=True, workers=workers):
            ratio = value / ref_value if value is not None and ref_value else None
            met = None if ratio is None else (ratio >= factor if higher else ratio <= factor)
            goals.append(
                {
                    "workers": int(workers),
                    "goal": name,
                    "fastlb": value,
                    "reference": ref_name,
                    "reference_value": ref_value,
                    "ratio": ratio,
                    "needed": factor,
                    "higher_is_better": higher,
                    "met": met,
                }
            )

        for workload, what in (("close", "connections/s"), ("keepalive", "keep-alive req/s")):
            refs = {t: med(workload, t, "per_cpu") for t in ("haproxy", "nginx")}
            refs = {t: v for t, v in refs.items() if v is not None}
            best = max(refs, key=refs.get) if refs else None
            goal(
                f"{what} per balancer CPU-second >= best of HAProxy/nginx",
                med(workload, "fastlb", "per_cpu"),
                refs.get(best) if best else None,
                best or "haproxy/nginx",
                1.0,
            )
        # (goal, workload, metric, reference target, factor needed, higher is better)
        for name, workload, key, ref, factor, higher in (
            ("bulk Gbit/s (1 stream) >= HAProxy", "bulk1", "rate", "haproxy", 1.0, True),
            ("bulk Gbit/s (4 streams) >= HAProxy", "bulk4", "rate", "haproxy", 1.0, True),
            ("connections/s >= 3x asyncio", "close", "rate", "asyncio", 3.0, True),
            ("keep-alive req/s >= 1.5x asyncio", "keepalive", "rate", "asyncio", 1.5, True),
            ("memory per idle connection (RSS summed) <= HAProxy", "idle", "rate", "haproxy", 1.0, False),
            (
                "memory per idle connection (PSS: shared pages split, for information) <= HAProxy",
                "idle",
                "pss_kib_per_conn",
                "haproxy",
                1.0,
                False,
            ),
        ):
            goal(name, med(workload, "fastlb", key), med(workload, ref, key), ref, factor, higher=higher)
    return goals


# ---------------------------------------------------------------------------------------------------------
# Machine and versions


def first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_meta(s: Settings, cpu_limit: str) -> dict:
    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "date": now_iso(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "wrk": first_line(["wrk", "--version"]).split(" Copyright")[0],
        "fastlb": first_line(["fastlb", "--version"]),
        "fastlb_commit": commit + ("+uncommitted changes" if dirty else ""),
        "cpu_limit": cpu_limit,
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


# ---------------------------------------------------------------------------------------------------------
# BENCHMARKS.md


def memory_break_even(summary: dict) -> list[str]:
    """Fixed RSS plus marginal cost per connection: from how many connections fastlb's RSS is HAProxy's or less."""
    out = []
    for workers, per_w in summary["results"].items():
        rows = per_w.get("idle", {})
        f, h = rows.get("fastlb", {}), rows.get("haproxy", {})
        need = ("rss_before", "marginal_kib_per_conn")
        if not all(f.get(k) and h.get(k) for k in need):
            continue
        f0, fm = f["rss_before"]["median"] / 1024, f["marginal_kib_per_conn"]["median"]
        h0, hm = h["rss_before"]["median"] / 1024, h["marginal_kib_per_conn"]["median"]
        if hm > fm:
            n = max(0.0, (f0 - h0) / (hm - fm))
            text = f"from about {n:,.0f} connections on"
        else:
            text = "never (its marginal cost is not lower)" if f0 > h0 else "always"
        out.append(
            f"- {workers} worker{'s' if workers != '1' else ''}: fastlb {f0 / 1024:.1f} MiB fixed + {fm:.2f} KiB/conn, "
            f"HAProxy {h0 / 1024:.1f} MiB + {hm:.2f} KiB/conn: fastlb's summed RSS is the smaller {text}."
        )
    return ["Fixed plus marginal (RSS summed over processes):", "", *out, ""] if out else []


def noise_note(summary: dict) -> str:
    cells = [
        r["noise_pct"]
        for per_w in summary["results"].values()
        for rows in per_w.values()
        for r in rows.values()
        if r.get("noise_pct")
    ]
    if not cells:
        return ""
    worst = max(c["max"] for c in cells)
    median = statistics.median(c["median"] for c in cells)
    return (
        f"Here: median {median:.0f} % of a CPU used by others during a run, worst run {worst:.0f} % "
        "(above ~10 %, read that run's figures with care)."
    )


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def cell(c: dict | None, digits: int = 3) -> str:
    if not c:
        return "–"
    med = fmt(c["median"], digits)
    if c["n"] > 1 and c["min"] != c["max"]:
        return f"{med} ({fmt(c['min'], digits)}–{fmt(c['max'], digits)})"
    return med


def pct_cell(c: dict | None, scale: float) -> str:
    if not c:
        return "–"
    text = f"{c['median'] * scale:.0f} %"
    if c["n"] > 1 and round(c["min"] * scale) != round(c["max"] * scale):
        text += f" ({c['min'] * scale:.0f}–{c['max'] * scale:.0f})"
    return text


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def ratio(c: dict | None) -> str:
    return (
        "–" if not c else f"{c['median']:.2f}x" + (f" ({c['min']:.2f}–{c['max']:.2f})" if c["n"] > 1 else "")
    )


def render_markdown(summary: dict, chart_rel: str | None) -> str:
    meta, s = summary["meta"], summary["settings"]
    quota = f"{s['cpu_quota_pct']}% of CPU {s['balancer_cpu']}"
    lines = [
        "# Benchmarks: fastlb against HAProxy, nginx stream, an asyncio proxy and a direct connection",
        "",
        f"_Generated by `scripts/bench` ({'quick smoke run' if s['quick'] else 'full run'}) on {meta['date']}; "
        "regenerate, do not edit by hand. Method and how to run it: [bench/README.md](bench/README.md)._",
        "",
        "## Machine",
        "",
        f"- CPU: {meta['cpu_model']}, {meta['cpus']} CPUs, {meta['memory_gib']} GiB; Linux {meta['kernel']}",
        f"- {meta['haproxy']}; {meta['nginx']} (stream module); Python {meta['python']} (asyncio proxy); "
        f"{meta['fastlb']} at {meta['fastlb_commit']}",
        f"- load: {meta['iperf3']}; {meta['wrk']}",
        "",
        "## How it was measured",
        "",
        f"- Each balancer runs pinned to CPU {s['balancer_cpu']} and limited to {quota} "
        f"({meta['cpu_limit']}); clients (wrk, iperf3) and backends run on CPU {s['load_cpu']}. "
        "So the balancer is the bottleneck; the *throttled* column shows how often it hit its quota.",
        f"- Same backends for every target: one nginx worker answering a {len(BODY)}-byte static body on "
        f"{len(Settings().backend_ports()['http'])} ports (HTTP pool, round robin), one iperf3 server (bulk pool: one "
        "backend, since iperf3's control and data connections must meet the same server), an echo server on "
        "2 ports (idle pool). *direct* is the client talking to the backend itself: the ceiling.",
        f"- {s['rounds']} round{'s' if s['rounds'] > 1 else ''} with the targets interleaved (A B C … A B C …), "
        f"{s['duration']:g} s per run; cells are *median (min–max)* over rounds. "
        "Ratios are taken within a round (target ÷ HAProxy, target ÷ direct), then the median.",
        "- *per balancer CPU-s*: the work done (Gbit, requests, connections) divided by the user+system CPU time "
        "of all the balancer's processes during the run (psutil) — the efficiency figure that does not depend "
        "on the quota.",
        f"- wrk: 1 thread, {s['wrk_conns']} connections, latency from wrk's own percentiles; *close* sends "
        "`Connection: close`, so every request is a new TCP connection through the balancer.",
        f"- Idle memory: {s['idle_conns']:,} connections opened by a helper process, each echoing one byte "
        "end to end, then held idle. Headline: RSS of all balancer processes (psutil, summed) while they are "
        "held ÷ connections, so fixed costs (an interpreter, preallocated tables) count; PSS (shared pages "
        "split between processes) and the marginal cost (RSS growth ÷ connections) are shown too. Kernel "
        "socket buffers are in none of them. "
        f"{s['idle_conns']:,}, not 10,000: the open-file limit here is {meta['nofile_limit']:,} per process and "
        "cannot be raised (no CAP_SYS_RESOURCE), and a one-process balancer needs two descriptors per connection.",
        "- Noise: other processes on this machine are measured during every run (busy CPU time not used by "
        "the balancer or by our load and backends); before each target the driver waits (at most "
        f"{QUIET_WAIT_S:.0f} s) for them to go quiet, and a run during which they used more than "
        f"{100 * NOISY:.0f} % of a CPU is repeated (at most {NOISY_RETRIES} times, the quietest kept)"
        + (
            f"; the load side runs at nice {BOOST_NICE} and the balancer's cgroup has a raised CPU weight, "
            "so other processes get only what the benchmark leaves idle"
            if s.get("boost")
            else ""
        )
        + f". {noise_note(summary)}",
        "",
    ]
    goals = summary.get("goals", [])
    if any(g["fastlb"] is not None for g in goals):
        lines += ["## fastlb against its targets", ""]
        lines += [
            "| workers | target | fastlb | reference | ratio | needed | met |",
            "|---:|---|---:|---|---:|---:|:---:|",
        ]
        for g in goals:
            need = ("≥ " if g["higher_is_better"] else "≤ ") + f"{g['needed']:g}x"
            met = {True: "yes", False: "**no**", None: "–"}[g["met"]]
            lines.append(
                f"| {g['workers']} | {g['goal']} | {fmt(g['fastlb'])} | {g['reference']} {fmt(g['reference_value'])} | "
                f"{fmt_ratio(g['ratio'])} | {need} | {met} |"
            )
        lines.append("")
    if chart_rel:
        lines += ["## Ratios", "", f"![ratios to HAProxy]({chart_rel})", ""]
    # hand-written: what each data-plane optimisation gained and what the profile shows; kept in
    # its own file because everything else here is regenerated
    if OPTIMISATIONS.exists():
        lines += [OPTIMISATIONS.read_text().strip(), ""]
    lines += render_micro()
    lines += ["## Results", ""]
    for workload in s["workloads"]:
        title, unit, work, higher = WORKLOAD_INFO[workload]
        lines += [f"### {title}", ""]
        if workload == "idle":
            head = (
                "| target | workers | KiB per conn: RSS ÷ conns | vs HAProxy | PSS ÷ conns | marginal: RSS growth ÷ conns "
                "| RSS MiB before → held | processes |"
            )
            lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
        else:
            head = f"| target | workers | {unit} | {work} per balancer CPU-s | vs HAProxy | per CPU-s vs HAProxy | vs direct |"
            extra = " p50 ms | p99 ms | errors |" if workload in ("keepalive", "close") else ""
            lines += [head + extra + " balancer CPU | throttled periods |"]
            lines += ["|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if extra else "") + "---:|---:|"]
        for workers in map(str, s["workers"]):
            rows = summary["results"].get(workers, {}).get(workload, {})
            for target, r in rows.items():
                name = TARGET_LABEL.get(target, target)
                if not r.get("rate"):
                    lines.append(
                        f"| {name} | {workers} | failed: {'; '.join(r.get('errors_runs', []))[:150]} |"
                    )
                    continue
                if workload == "idle":
                    mib = {
                        k: fmt(r[k]["median"] / 2**20) if r.get(k) else "–"
                        for k in ("rss_before", "rss_held")
                    }
                    lines.append(
                        f"| {name} | {workers} | {cell(r['rate'])} | {ratio(r.get('vs_haproxy'))} | "
                        f"{cell(r.get('pss_kib_per_conn'))} | {cell(r.get('marginal_kib_per_conn'))} | "
                        f"{mib['rss_before']} → {mib['rss_held']} | {cell(r.get('processes'))} |"
                    )
                    continue
                row = (
                    f"| {name} | {workers} | {cell(r['rate'])} | {cell(r.get('per_cpu'))} | {ratio(r.get('vs_haproxy'))} | "
                    f"{ratio(r.get('per_cpu_vs_haproxy'))} | {ratio(r.get('vs_direct'))} |"
                )
                if workload in ("keepalive", "close"):
                    row += f" {cell(r.get('p50_ms'))} | {cell(r.get('p99_ms'))} | {cell(r.get('errors'))} |"
                row += f" {pct_cell(r.get('cpu_util'), 100)} | {pct_cell(r.get('throttled_pct'), 1)} |"
                lines.append(row)
        lines.append("")
        if workload == "idle":
            lines += memory_break_even(summary)
    lines += [
        "Raw per-run JSON: `bench/results/raw/` (not committed); this summary: `bench/results/latest.json`.",
        "",
    ]
    return "\n".join(lines)


def render_micro(path: Path = MICRO) -> list[str]:
    """The micro-benchmark section from pytest-benchmark's JSON: the cost of one pick per algorithm
    (timed in C, extra_info) and the table builders and lookups (timed by pytest-benchmark)."""
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    commit = (data.get("commit_info") or {}).get("id") or "?"
    lines = [
        "## Micro-benchmarks (pytest-benchmark)",
        "",
        f"_`scripts/bench micro` on {data.get('datetime', '?')[:19]}Z at {commit[:7]}: "
        "`pytest bench/test_bench_pick.py bench/test_bench_tables.py bench/test_bench_route.py --benchmark-json "
        "bench/results/micro.json`; the balancer comparison above does not depend on it._",
        "",
    ]
    picks = [b for b in data["benchmarks"] if (b.get("extra_info") or {}).get("ns_per_pick_median")]
    if picks:
        n = picks[0]["extra_info"].get("backends", "?")
        lines += [
            f"Cost of one pick (`lb_pick()` called in a C loop, a new key hash per pick), {n} backends:",
            "",
            "| algorithm | ns per pick (median) | min | max |",
            "|---|---:|---:|---:|",
        ]
        for b in sorted(picks, key=lambda b: b["extra_info"]["ns_per_pick_median"]):
            rounds = b["extra_info"]["ns_per_pick_rounds"]
            lines.append(
                f"| {b['extra_info']['algorithm']} | {fmt(b['extra_info']['ns_per_pick_median'])} | "
                f"{fmt(min(rounds))} | {fmt(max(rounds))} |"
            )
        lines.append("")
    routes = [b for b in data["benchmarks"] if (b.get("extra_info") or {}).get("ns_per_lookup")]
    if routes:
        lines += [
            "Cost of one route lookup (`route_select()` called in a C loop: the route and pool of a new",
            "connection; bench/test_bench_route.py), per kind of listener:",
            "",
            "| listener | ns per lookup (median of 5) |",
            "|---|---:|",
        ]
        for b in routes:
            lines.append(f"| {b['extra_info']['case']} | {fmt(b['extra_info']['ns_per_lookup'])} |")
        lines.append("")
    others = [b for b in data["benchmarks"] if b not in picks and b not in routes]
    if others:
        lines += [
            "Table builders and lookups (`fastlb._maglev`, called from Python):",
            "",
            "| benchmark | median ms | min ms | max ms | rounds |",
            "|---|---:|---:|---:|---:|",
        ]
        for b in sorted(others, key=lambda b: b["name"]):
            st = b["stats"]
            lines.append(
                f"| `{b['name']}` | {fmt(st['median'] * 1e3)} | {fmt(st['min'] * 1e3)} | {fmt(st['max'] * 1e3)} | "
                f"{st['rounds']} |"
            )
        lines.append("")
    return lines


def publish(summary: dict, run_dir: Path | None, publish_top: bool) -> None:
    """Write the summary JSON, the chart and the Markdown into run_dir (one run's own copy) and, when
    publish_top, the repository's copies: bench/results/latest.json, bench/results/ratios.png, BENCHMARKS.md."""
    sys.path.insert(0, str(HERE))
    import chart  # bench/chart.py; imports matplotlib

    if run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        chart.render(summary, run_dir / "ratios.png")
        (run_dir / "BENCHMARKS.md").write_text(render_markdown(summary, "ratios.png"))
    if publish_top:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(summary, indent=1) + "\n")
        chart.render(summary, RESULTS / "ratios.png")
        (ROOT / "BENCHMARKS.md").write_text(render_markdown(summary, "bench/results/ratios.png"))
        log(f"published BENCHMARKS.md, {RESULTS / 'latest.json'}, {RESULTS / 'ratios.png'}")


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


# ---------------------------------------------------------------------------------------------------------
# Command line


def fastlb_available() -> bool:
    try:
        return subprocess.run(["fastlb", "serve", "--help"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def csv(kind, allowed=None):
    def parse(text: str):
        items = tuple(kind(x) for x in text.split(",") if x)
        if allowed is not None:
            bad = [x for x in items if x not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the suite")
    r.add_argument(
        "--quick", action="store_true", help="smoke test: 1 round, 2 s runs, 1,000 idle connections"
    )
    r.add_argument("--rounds", type=int)
    r.add_argument("--duration", type=float, help="seconds per run")
    r.add_argument("--workers", type=csv(int), help="worker counts, e.g. 1,2")
    r.add_argument("--targets", type=csv(str, TARGETS))
    r.add_argument("--workloads", type=csv(str, WORKLOADS))
    r.add_argument("--idle-conns", type=int)
    r.add_argument("--wrk-conns", type=int)
    r.add_argument("--cpu-quota", type=int, dest="cpu_quota_pct", help="percent of one CPU for the balancer")
    r.add_argument("--cpu-period-us", type=int)
    r.add_argument("--port-base", type=int)
    r.add_argument(
        "--no-boost", action="store_true", help="do not raise the benchmark's priority over other processes"
    )
    r.add_argument(
        "--no-publish", action="store_true", help="do not update BENCHMARKS.md / latest.json / ratios.png"
    )
    rep = sub.add_parser("report", help="regenerate BENCHMARKS.md and the chart from a summary JSON")
    rep.add_argument("summary", type=Path, nargs="?", default=RESULTS / "latest.json")
    e = sub.add_parser("echo-server")
    e.add_argument("--ports", type=csv(int), required=True)
    h = sub.add_parser("hold-idle")
    h.add_argument("--port", type=int, required=True)
    h.add_argument("--count", type=int, required=True)
    args = ap.parse_args(argv)

    if args.cmd == "echo-server":
        return echo_server(list(args.ports))
    if args.cmd == "hold-idle":
        return hold_idle(args.port, args.count)
    if args.cmd == "report":
        summary = json.loads(args.summary.read_text())
        summary["goals"] = evaluate_goals(summary)
        top = args.summary.resolve() == (RESULTS / "latest.json").resolve()
        publish(summary, None if top else args.summary.parent, publish_top=top)
        return 0

    s = Settings()
    if args.quick:
        s.rounds, s.duration, s.idle_conns, s.quick = 1, 2.0, 1000, True
    for key in ("rounds", "duration", "workers", "targets", "workloads", "idle_conns", "wrk_conns"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    for key in ("cpu_quota_pct", "cpu_period_us", "port_base"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    s.publish = not (args.no_publish or args.quick)
    s.boost = not args.no_boost
    if s.idle_conns > 9900:
        log(
            f"--idle-conns {s.idle_conns}: one-process balancers need 2 fds per connection under a 20,000 limit"
        )
    if "fastlb" in s.targets and not fastlb_available():
        if args.targets:
            log("fastlb serve is not available (pip install -e . ?)")
            return 2
        log("fastlb serve is not available yet: benchmarking the other targets only")
        s.targets = tuple(t for t in s.targets if t != "fastlb")
    if os.cpu_count() and max(s.balancer_cpu, s.load_cpu) >= os.cpu_count():
        log("need 2 CPUs (balancer and load on different CPUs)")
        return 2
    os.sched_setaffinity(0, {s.load_cpu})  # the driver and everything it starts default to the load CPU
    if s.boost:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, BOOST_NICE)  # inherited by the load side and the backends
        except OSError as exc:
            log(f"cannot raise priority ({exc}): running at normal priority")
            s.boost = False

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = RESULTS / "raw" / (stamp + ("-quick" if s.quick else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(
        f"results in {out_dir}; targets {','.join(s.targets)}; workers {s.workers}; {s.rounds} rounds of {s.duration:g}s"
    )
    records, cpu_limit = run_suite(s, out_dir)
    meta = machine_meta(s, cpu_limit)
    meta["elapsed_s"] = round(time.monotonic() - t0)
    summary = summarize(records, s, meta)
    publish(summary, out_dir, s.publish)
    failed = sum("error" in r for r in records)
    log(f"done in {meta['elapsed_s']}s: {len(records)} runs, {failed} failed; {out_dir / 'BENCHMARKS.md'}")
    return 1 if failed == len(records) else 0


if __name__ == "__main__":
    sys.exit(main())
