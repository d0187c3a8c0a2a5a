"""Running the comparison: the suite's context (settings, processes, CPU limit, backends), starting and
stopping targets, measuring one workload, and the rounds (targets interleaved, one JSON file per run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import targets
from common import (
    LOOPBACK,
    NOISY,
    NOISY_RETRIES,
    QUIET_WAIT_S,
    BenchError,
    Running,
    can_connect,
    fmt_other,
    log,
    now_iso,
    port_free,
    wait_until,
)
from settings import Settings
from system import CpuLimit, CpuSnapshot, Procs, pin_tree, proc_tree
from workloads import POOLS, REGISTRY, WORKLOAD_INFO, Pool


class Suite:
    def __init__(self, settings: Settings, out_dir: Path) -> None:
        self.s = settings
        self.out_dir = out_dir
        self.logs = out_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rundir = Path(tempfile.mkdtemp(prefix="fastlb-bench-"))
        self.procs = Procs()
        self.cpu = CpuLimit(settings.cpu_quota_pct, settings.cpu_period_us, settings.boost)
        self.iperf: subprocess.Popen | None = None  # the bulk pool's server (workloads/iperf3.py)
        self.bp = settings.backend_ports()
        self.pools = POOLS

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
        for name, pool in self.pools.items():
            pool.start(self, self.bp[name])

    def restart_pool(self, pool: Pool) -> None:
        if pool.restart is not None:
            pool.restart(self)

    # -- targets (the balancer on its own CPU, in the cgroup) ------------------------------------------

    def start_target(self, target: str, workers: int, tag: str) -> Running:
        s = self.s
        module = targets.REGISTRY.get(target)
        if module is None:
            raise BenchError(f"unknown target {target}")
        if not module.BALANCER:
            return Running(target, workers, {k: v[0] for k, v in self.bp.items()})
        ports = s.ports(target)
        log_path = self.logs / f"{tag}.log"
        env = dict(os.environ)
        run = Running(target, workers, ports, log_path=log_path)
        argv = module.command(self, workers, ports, run, env)
        with open(log_path, "ab") as f:
            f.write(f"$ {' '.join(argv)}\n".encode())
        run.proc = self.procs.start(
            target, argv, cpu=s.balancer_cpu, log_path=log_path, procs_file=self.cpu.procs_file, env=env
        )
        try:
            if hasattr(module, "ready"):
                module.ready(run)
            first = next(iter(ports))
            wait_until(lambda: can_connect(ports[first]), f"{target} :{ports[first]}", run.proc, log_path)
            for name, pool in self.pools.items():
                if pool.check is not None:
                    wait_until(
                        lambda pool=pool, name=name: pool.check(ports[name]),
                        f"{target} {pool.what or name} through",
                        run.proc,
                        log_path,
                        10,
                    )
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
        if workload not in REGISTRY:
            raise BenchError(f"unknown workload {workload}")
        metrics = REGISTRY[workload].measure(self, run)
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
            if metrics.get("work") is not None and cpu > 0:
                metrics["per_cpu"] = metrics["work"] / cpu
        return out


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
    workloads = [w for w in s.workloads if not (target == "direct" and REGISTRY[w].balancer_only)]
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
    for attempt in range(1 + (NOISY_RETRIES if REGISTRY[workload].retry_when_noisy else 0)):
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
