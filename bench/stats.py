"""Statistics of the comparison: medians with min/max over rounds, ratios taken within a round, and
fastlb's targets (goals) judged on the medians."""

from __future__ import annotations

import statistics
from dataclasses import asdict

from settings import Settings
from system import CpuSnapshot
from workloads import REGISTRY


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
                if target == "direct" and REGISTRY[workload].balancer_only:
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
                    for key in REGISTRY[workload].summary_keys:
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
