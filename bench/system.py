"""The machine side of the comparison benchmark: the balancer's CPU limit (a cgroup with a quota), the
processes the driver starts (each in its own process group, all stopped at the end), and the CPU time and
memory of a balancer's process tree."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from common import BOOST_SHARES, ROOT, log

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
