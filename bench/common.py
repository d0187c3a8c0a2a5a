"""What every part of the comparison benchmark shares: paths, limits, logging, the error type, a started
target (`Running`), config templates and the readiness checks."""

from __future__ import annotations

import contextlib
import datetime as dt
import select
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
OPTIMISATIONS = HERE / "optimisations.md"  # hand-written section of BENCHMARKS.md
MICRO = RESULTS / "micro.json"  # pytest-benchmark's JSON of bench/test_bench_*.py (scripts/bench micro)
COMPARE = HERE / "compare.py"  # the driver; its echo-server and hold-idle subcommands run as helpers
LOOPBACK = "127.0.0.1"

NOFILE_HARD_FALLBACK = 20000
NOISY = 0.10  # other processes using more than this share of a CPU make a run noisy
QUIET_WAIT_S = 20.0  # before each target, wait up to this long for the machine to be quiet
NOISY_RETRIES = 2  # a noisy run is repeated at most this many times
BOOST_NICE = -10  # the load side (driver, clients, backends) runs at this nice value (--no-boost: off)
BOOST_SHARES = 10240  # cgroup v1 cpu.shares (v2: cpu.weight 1000) of the balancer's group (--no-boost: off)


def fmt_other(other: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in other.items())


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class BenchError(Exception):
    """A run that could not be measured; the message says why (recorded, the suite goes on)."""


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
