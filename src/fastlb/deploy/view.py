"""Human-readable rollout and switch status (`fastlb rollout status`, `fastlb switch`, `fastlb status`)."""

from __future__ import annotations

import time
from typing import Any


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ms(x: Any) -> str:
    return "-" if x is None else f"{x * 1000:.1f}ms"


def _when(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _split(split: dict[str, int]) -> str:
    return " ".join(f"{p}={w}" for p, w in split.items())


GATE_FORMAT = {
    "failure_rate": _pct,
    "early_reset_rate": _pct,
    "reset_rate": _pct,
    "connect_time": _ms,
    "unhealthy": _pct,
}


def format_rollout(v: dict[str, Any], history: int = 10) -> str:
    lines = [
        f"rollout {v['name']}: {v['listener']}/{v['route']} {v['stable']} -> {v['canary']}: {v['status'].upper()}"
    ]
    nxt = v.get("next_judgement_in")
    step = f"step {v['step']}/{len(v['steps'])} ({','.join(map(str, v['steps']))})"
    lines.append(
        f"  {step}: {v['canary']} at {v['share']}% (split {_split(v['split'])}); "
        f"failed judgements {v['failures']}/{v['threshold']}"
        + (f"; next judgement in {nxt:.1f}s (every {v['interval']:g}s)" if nxt is not None else "")
    )
    if v.get("reason"):
        lines.append(f"  {v['reason']}")
    last = v.get("last_judgement")
    if last:
        lines.append(
            f"  last judgement ({_when(last['at'])}, at {last['share']}%): {last['result']}: {last['reason']}"
        )
        for gate, f in last["figures"].items():
            if gate == "connections":
                lines.append(
                    f"    {'connections':<17} canary {f['canary']:<8} stable {f['stable']:<8} min {f['min']}"
                )
            elif gate == "check":
                lines.append(f"    {'check':<17} {'ok' if f['ok'] else 'FAILED'}: {f['detail']}")
            else:
                fmt = GATE_FORMAT.get(gate, str)
                ok = {True: "ok", False: "FAILED", None: "-"}[f.get("ok")]
                stable = f"stable {fmt(f['stable']):<8} " if "stable" in f else " " * 16
                lines.append(
                    f"    {gate:<17} canary {fmt(f['canary']):<8} {stable}max {fmt(f['max']):<8} {ok}"
                )
    if v.get("gates", {}).get("check"):
        lines.append(f"  check: {v['gates']['check']}")
    lines.append("  history:")
    for h in v["history"][-history:]:
        what = h.get("event") or h.get("result")
        lines.append(f"    {_when(h['at'])} {what:<12} {h['share']:>3}%  {h['reason']}")
    return "\n".join(lines)


def format_switch(s: dict[str, Any]) -> str:
    live = ",".join(s["live"])
    lines = [f"switch {s['listener']}/{s['route']}: live {live} (split {_split(s['split'])})"]
    for pool, o in s.get("other", {}).items():
        state = "draining" if o["draining"] else "kept (no new connections)"
        lines.append(f"  other side {pool}: {o['active']} connections still open, {state}")
    if not s.get("other"):
        lines.append("  other side: none")
    return "\n".join(lines)


def format_deploy(d: dict[str, Any]) -> list[str]:
    """The lines `fastlb status` adds: one per rollout and per switched route."""
    out = []
    for v in d.get("rollouts", []):
        extra = (
            f", next judgement in {v['next_judgement_in']:.1f}s"
            if v.get("next_judgement_in") is not None
            else ""
        )
        out.append(
            f"rollout {v['name']} {v['listener']}/{v['route']} {v['stable']} -> {v['canary']}: {v['status']} "
            f"at {v['share']}%{extra}"
        )
    for s in d.get("switches", []):
        out.extend(format_switch(s).splitlines())
    return out
