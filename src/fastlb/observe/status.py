"""Human-readable rendering of `fastlb status` (the JSON form is the control socket's reply as is)."""

from __future__ import annotations

import time
from typing import Any


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _check(c: dict[str, Any] | None) -> str:
    """The last health check in a few words: "ok (1s ago)", "failed: connection refused (0s ago)", "-"."""
    if not c:
        return "-"
    if c["result"] == "pending":
        return "pending"
    text = "ok" if c["result"] == "ok" else f"failed: {c['reason']}"
    if c.get("time"):
        text += f" ({max(0.0, time.time() - c['time']):.0f}s ago)"
    return text


def format_status(st: dict[str, Any]) -> str:
    head = (
        "POOL",
        "BACKEND",
        "STATE",
        "WEIGHT",
        "ACTIVE",
        "TOTAL",
        "BYTES_IN",
        "BYTES_OUT",
        "ERRORS",
        "CHECK",
    )
    rows = [head]
    runtime = False
    for p in st["pools"]:
        for b in p["backends"]:
            weight = (
                str(b["weight"])
                if b["effective_weight"] == b["weight"]
                else f"{b['effective_weight']}/{b['weight']}"
            )
            state = b["state"]
            if b.get("weight_source") == "runtime":
                weight += "*"
                runtime = True
            if b.get("admin_source") == "runtime":
                state += "*"
                runtime = True
            errors = b["connect_errors"] + b["connect_timeouts"] + b["resets"]
            rows.append(
                (
                    p["name"],
                    b["name"],
                    state,
                    weight,
                    str(b["active"]),
                    str(b["total"]),
                    _size(b["bytes_in"]),
                    _size(b["bytes_out"]),
                    str(errors),
                    _check(b.get("check")),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    sf = st.get("state_file") or {}
    if runtime:
        lines.append(
            "* set at runtime (kept in the state file), not the config file's value"
            if sf.get("writable", True)
            else "* set at runtime, NOT kept across a restart (the state file cannot be written), "
            "not the config file's value"
        )
    if not sf.get("writable", True):
        lines.append(
            f"state file {sf['path']}: cannot be written ({sf.get('error')}): runtime changes will "
            "not survive a restart"
        )
    rollouts = running_rollouts(st)
    for li in st["listeners"]:
        if li.get("protocol") == "udp":
            lines.append(_udp_line(li))
        else:
            target = f" -> {li['pool']}" if not routed(li) else ""
            lines.append(
                f"listener {li['name']} {li['bind']}{target}: active {li['active']}, "
                f"accepted {li['accepted']}, rejected {li['rejected']}{_rejected_by(li)}"
            )
            lines.extend(_prelude_lines(li.get("preludes")))
        lines.extend(_route_lines(li.get("routes", []), rollouts))
    if st.get("deploy"):
        from fastlb.deploy.view import format_deploy

        lines.extend(format_deploy(st["deploy"]))
    lines.extend(_announce_lines(st.get("announce") or []))
    alive = sum(1 for w in st["workers"] if w["state"] == "running")
    lines.append(f"workers: {alive}/{len(st['workers'])} running, generation {st['generation']}")
    return "\n".join(lines)


def _udp_line(li: dict[str, Any]) -> str:
    """A UDP listener: flows now and created, datagrams each way, drops by cause (only those > 0)."""
    u = li["udp"]
    drops = {k.removeprefix("drop_"): v for k, v in u.items() if k.startswith("drop_") and v}
    text = (
        f"listener {li['name']} udp {li['bind']} -> {li['pool']}: flows {li['active']} "
        f"(created {li['accepted']}), datagrams in {u['datagrams_in']} out {u['datagrams_out']}"
    )
    if drops:
        text += ", dropped " + " ".join(f"{k}={v}" for k, v in drops.items())
    return text


def _announce_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per announced address (fleet/announce.py): announced or not, since when, why."""
    import time

    lines = []
    for a in rows:
        state = "announced" if a["announced"] else "withdrawn"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["since"]))
        lines.append(f"announce {a['address']}: {state} since {since} ({a['reason']})")
    return lines


def format_reload(r: dict[str, Any]) -> str:
    """`fastlb reload`'s output: what was applied in place, what a takeover applies, and what
    needs a restart."""
    if r.get("deferred") or r.get("forwarded"):  # a takeover is under way (runtime/handover.py)
        pid = r.get("successor") or r.get("forwarded")
        return (
            f"reload of {r['file']} left to pid {pid}, which is taking over: it re-reads the file once ready"
        )
    lines = [f"reloaded {r['file']}: {len(r['applied'])} changes applied"]
    lines += [f"  applied: {a}" for a in r["applied"]]
    lines += [f"  ignored: {a}" for a in r.get("ignored", [])]
    if r.get("takeover"):
        lines.append(
            f"{len(r['takeover'])} changes need new sockets or processes: pid {r['successor']} takes over "
            f"from pid {r['pid']} (fastlb serve --takeover) to apply them:"
        )
        lines += [f"  takeover: {x}" for x in r["takeover"]]
    if r["needs_restart"]:
        lines.append(
            f"NOT applied, {len(r['needs_restart'])} changes need a restart (fastlb serve --takeover):"
        )
        lines += [f"  restart: {x}" for x in r["needs_restart"]]
        if r.get("takeover_error"):
            lines.append(f"  ({r['takeover_error']})")
    return "\n".join(lines)


def routed(li: dict[str, Any]) -> bool:
    """Whether a listener's traffic goes by routes and splits (several routes, or one whose split
    names several pools): then its `pool` (the first) says little, the route lines say it all."""
    routes = li.get("routes") or []
    return len(routes) > 1 or any(len(r.get("split") or {}) > 1 for r in routes)


def running_rollouts(st: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """The rollouts in progress (progressing or paused), by (listener, route)."""
    return {
        (v["listener"], v["route"]): v
        for v in (st.get("deploy") or {}).get("rollouts", [])
        if v.get("status") in ("progressing", "paused")
    }


def _rejected_by(li: dict[str, Any]) -> str:
    """What the refused connections were refused for, when any was (document.refused)."""
    by = {k: v for k, v in (li.get("rejected_by") or {}).items() if v}
    if not by:
        return ""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in by.items()) + ")"


def _prelude_lines(p: dict[str, Any] | None) -> list[str]:
    """A listener with a prelude: its PROXY-protocol and SNI counters (one line each)."""
    if not p:
        return []
    lines = []
    if p.get("proxy_protocol", "off") != "off":
        senders = ",".join(p.get("proxy_protocol_from") or []) or "anyone"
        lines.append(
            f"  proxy {p['proxy_protocol']} from {senders}: accepted {p['proxy_accepted']}, "
            f"refused {p['proxy_refused']}, errors {p['proxy_errors']}, timeouts {p['prelude_timeouts']}"
        )
    if p.get("sni"):
        lines.append(
            f"  sni (no match: {p['sni_no_match']}): found {p['sni_found']}, missing {p['sni_missing']}, "
            f"rejected {p['sni_rejected']}"
            + (f", timeouts {p['prelude_timeouts']}" if p.get("proxy_protocol", "off") == "off" else "")
        )
    return lines


def _route_lines(
    routes: list[dict[str, Any]], rollouts: dict[tuple[str, str], dict[str, Any]] | None = None
) -> list[str]:
    """One line per route: its match, split (weight and connections per pool), affinity, and the
    rollout in progress on it."""
    lines = []
    for r in routes:
        match = [f"source {','.join(r['match']['source'])}"] if r["match"]["source"] else []
        match += [f"sni {','.join(r['match']['sni'])}"] if r["match"]["sni"] else []
        split = " ".join(f"{p}={w} ({r['pools'].get(p, 0)} conns)" for p, w in r["split"].items())
        affinity = f", affinity {r['split_affinity']}" if r["split_affinity"] != "none" else ""
        if r.get("split_source") == "runtime":
            split += " *"  # set at runtime (state file), not the config file's split
        ro = (rollouts or {}).get((r.get("listener", ""), r["name"]))
        running = f"; rollout {ro['name']}: {ro['canary']} {ro['status']} at {ro['share']}%" if ro else ""
        lines.append(
            f"  route {r['name']} [{'; '.join(match) or 'default'}]: {split}{affinity}; "
            f"{r['connections']} connections{running}"
        )
    return lines
