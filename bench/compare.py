"""Comparison benchmark driver: fastlb against HAProxy, nginx stream, an asyncio proxy and a direct connection.

Run it through scripts/bench, which installs the tools first.  All traffic stays on 127.0.0.1; every
process started here is stopped in a finally block (also on SIGTERM/SIGINT), every load has a time bound.

The balancer under test is the bottleneck by construction: it runs pinned to one CPU inside a cgroup with a
CPU quota, while the load generators and backends run on the other CPU.  Targets are interleaved in rounds;
the summary gives medians with min/max, the balancer's own CPU time per run, work per balancer CPU-second
and ratios to HAProxy and to the direct connection from the same round.  bench/README.md has the method.

    .venv/bin/python bench/compare.py run [--quick] [--rounds 3] [--duration 5] [--workers 1,2] [--targets ...]
    .venv/bin/python bench/compare.py report RESULTS.json        # regenerate BENCHMARKS.md and the chart only

This file is the command line and the orchestration; the parts live beside it: targets/ (how each
balancer is started), workloads/ (what is measured, against which backends), suite.py (running
rounds), system.py (cgroup, processes, CPU and memory readings), stats.py (medians, ratios, goals),
report.py (BENCHMARKS.md, the chart), settings.py, common.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported: same modules

from common import BOOST_NICE, RESULTS, log  # noqa: E402
from report import machine_meta, publish  # noqa: E402
from settings import Settings  # noqa: E402
from stats import evaluate_goals, summarize  # noqa: E402
from suite import run_suite  # noqa: E402
from targets import TARGETS  # noqa: E402
from targets.fastlb import fastlb_argv  # noqa: E402
from workloads import WORKLOADS  # noqa: E402
from workloads.idle import echo_server, hold_idle  # noqa: E402


def fastlb_unavailable() -> str | None:
    """None when the fastlb under test runs (`fastlb serve --help`), else why not, in one line."""
    argv = [*fastlb_argv(), "serve", "--help"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv)}: {exc}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{' '.join(argv)}: exit {r.returncode}: {last}"
    return None


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
    wants_fastlb = [t for t in s.targets if t.startswith("fastlb")]
    if wants_fastlb:
        # a target that cannot run is an error before anything is measured, never a silent skip
        why = fastlb_unavailable()
        if why:
            others = ",".join(t for t in s.targets if t not in wants_fastlb)
            log(
                f"fastlb does not run ({why}): build it (scripts/venv .venv) or point FASTLB_BIN at it;"
                f" to measure without it: --targets {others}"
            )
            return 2
        log(f"fastlb under test: {' '.join(fastlb_argv())}")
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
