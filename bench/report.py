"""Rendering the comparison: the machine and versions, BENCHMARKS.md (with the hand-written
optimisations section and the micro-benchmarks), and publishing it with the chart (bench/chart.py)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import psutil

from common import (
    BOOST_NICE,
    HERE,
    MICRO,
    NOISY,
    NOISY_RETRIES,
    OPTIMISATIONS,
    QUIET_WAIT_S,
    RESULTS,
    ROOT,
    log,
    now_iso,
)
from settings import Settings
from targets import TARGET_LABEL
from workloads import POOLS, REGISTRY, WORKLOAD_INFO
from workloads.wrk import BODY

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
        f"{POOLS['http'].n_backends} ports (HTTP pool, round robin), one iperf3 server (bulk pool: one "
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
        table = REGISTRY[workload].table if workload in REGISTRY else "rate"
        lines += [f"### {title}", ""]
        if table == "memory":
            head = (
                "| target | workers | KiB per conn: RSS ÷ conns | vs HAProxy | PSS ÷ conns | marginal: RSS growth ÷ conns "
                "| RSS MiB before → held | processes |"
            )
            lines += [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
        else:
            head = f"| target | workers | {unit} | {work} per balancer CPU-s | vs HAProxy | per CPU-s vs HAProxy | vs direct |"
            extra = " p50 ms | p99 ms | errors |" if table == "latency" else ""
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
                if table == "memory":
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
                if table == "latency":
                    row += f" {cell(r.get('p50_ms'))} | {cell(r.get('p99_ms'))} | {cell(r.get('errors'))} |"
                row += f" {pct_cell(r.get('cpu_util'), 100)} | {pct_cell(r.get('throttled_pct'), 1)} |"
                lines.append(row)
        lines.append("")
        if table == "memory":
            lines += memory_break_even(summary)
    lines += [
        "Raw per-run JSON: `bench/results/raw/` (not committed); this summary: `bench/results/latest.json`.",
        "",
    ]
    lines += render_features()
    return "\n".join(lines)


# Feature benchmarks: each writes its own Markdown (method and table) into bench/results/; BENCHMARKS.md
# carries them after the comparison, in this order, with their headings one level down.
FEATURES = (
    ("prelude.md", ".venv/bin/python bench/prelude.py"),
    ("udp.md", ".venv/bin/python bench/udp.py run"),
    ("accesslog.md", "scripts/bench --targets fastlb,fastlb-log --workloads close,keepalive"),
)


def render_features() -> list[str]:
    from common import RESULTS

    lines: list[str] = []
    for name, how in FEATURES:
        path = RESULTS / name
        if not path.exists():
            continue
        text = path.read_text().strip().splitlines()
        levels = [len(x) - len(x.lstrip("#")) for x in text if x.startswith("#")]
        shift = 3 - min(levels, default=3)  # each file's top heading becomes ###
        body = [("#" * shift + x if shift > 0 else x[-shift:]) if x.startswith("#") else x for x in text]
        lines += [*body, "", f"_Regenerate: `{how}`._", ""]
    if lines:
        lines = ["## Feature benchmarks", "", *lines]
    return lines


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
        "`.venv/bin/python -m pytest bench/test_bench_pick.py bench/test_bench_tables.py bench/test_bench_route.py --benchmark-json "
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
    """Write the summary JSON and the Markdown into run_dir (one run's own copy) and, when publish_top,
    the repository's copies: bench/results/latest.json, BENCHMARKS.md; then the chart (ratios.png) beside
    each, only when matplotlib is importable (else one line says there is none, and the Markdown does
    not show one): a missing plotting library never costs the measurements."""
    sys.path.insert(0, str(HERE))
    try:
        import chart  # bench/chart.py; imports matplotlib
    except ImportError as exc:
        chart = None
        why = exc
    if run_dir is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (run_dir / "BENCHMARKS.md").write_text(render_markdown(summary, "ratios.png" if chart else None))
    if publish_top:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "latest.json").write_text(json.dumps(summary, indent=1) + "\n")
        (ROOT / "BENCHMARKS.md").write_text(
            render_markdown(summary, "bench/results/ratios.png" if chart else None)
        )
    if chart is None:
        log(f"no ratio chart ({why}): the JSON and BENCHMARKS.md are written; pip install matplotlib for it")
    else:
        if run_dir is not None:
            chart.render(summary, run_dir / "ratios.png")
        if publish_top:
            chart.render(summary, RESULTS / "ratios.png")
    if publish_top:
        log(
            f"published BENCHMARKS.md, {RESULTS / 'latest.json'}"
            + (f", {RESULTS / 'ratios.png'}" if chart else "")
        )
