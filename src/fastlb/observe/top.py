"""`fastlb top`: a live terminal view of a running fastlb (rich), refreshed every second.

It polls the control socket's `status` (the same document `fastlb status --json` prints), turns
counter deltas into rates, and draws listeners (with their routes and splits), pools and backends
(state, weight, active, connections/s, bytes/s, errors/s), running drains and rollouts.  It fits an
80x24 terminal (an ssh session): columns are short, long lists are cut with a "+N more" line.
`q` (or Ctrl-C) quits.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fastlb.observe.status import routed, running_rollouts

Status = dict[str, Any]


def _rate(n: float) -> str:
    if n < 10:
        return f"{n:.1f}"
    for unit in ("", "k", "M", "G"):
        if n < 1000:
            return f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.0f}T"


def _count(n: int) -> str:
    """A total in at most 4 characters: 999, 1.2k, 12k, 3.4M."""
    if n < 1000:
        return str(n)
    x = float(n)
    for unit in ("k", "M", "G"):
        x /= 1000
        if x < 1000:
            return f"{x:.1f}{unit}" if x < 10 else f"{x:.0f}{unit}"
    return f"{x:.0f}T"


def _bytes_rate(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def _errors(b: dict[str, Any]) -> int:
    return b["connect_errors"] + b["connect_timeouts"] + b["resets"]


class Rates:
    """Per-second rates from two successive status documents."""

    def __init__(self) -> None:
        self.prev: Status | None = None
        self.prev_t = 0.0
        self.now: dict[
            tuple[str, str], tuple[float, float, float]
        ] = {}  # (pool, backend) -> conns, bytes, errors
        self.listeners: dict[str, float] = {}

    def update(self, st: Status, t: float) -> None:
        if self.prev is not None and t > self.prev_t:
            dt = t - self.prev_t
            old = {(p["name"], b["name"]): b for p in self.prev["pools"] for b in p["backends"]}
            self.now = {}
            for p in st["pools"]:
                for b in p["backends"]:
                    o = old.get((p["name"], b["name"]))
                    if o is None:
                        continue
                    self.now[(p["name"], b["name"])] = (
                        max(0, b["total"] - o["total"]) / dt,
                        max(0, b["bytes_in"] + b["bytes_out"] - o["bytes_in"] - o["bytes_out"]) / dt,
                        max(0, _errors(b) - _errors(o)) / dt,
                    )
            old_l = {li["name"]: li for li in self.prev["listeners"]}
            self.listeners = {
                li["name"]: max(0, li["accepted"] - old_l[li["name"]]["accepted"]) / dt
                for li in st["listeners"]
                if li["name"] in old_l
            }
        self.prev, self.prev_t = st, t


def _header(st: Status, source: str) -> Text:
    running = sum(1 for w in st["workers"] if w["state"] == "running")
    active = sum(li["active"] for li in st["listeners"])
    text = Text.assemble(
        ("fastlb top", "bold"),
        f"  pid {st['pid']}  workers {running}/{len(st['workers'])}  active {active}  ",
        f"gen {st['generation']}  ",
        ("q quits", "dim"),
        f"  {source}",
    )
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def _listeners(st: Status, rates: Rates, budget: int) -> tuple[Table, int]:
    rollouts = running_rollouts(st)
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    for col, just in (
        ("LISTENER", "left"),
        ("BIND", "left"),
        ("ROUTE / SPLIT", "left"),
        ("ACT", "right"),
        ("CONN/S", "right"),
    ):
        t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis")
    rows = 0
    for n, li in enumerate(st["listeners"]):
        if rows >= budget - 1 and n < len(st["listeners"]) - 1:
            t.add_row(f"+{len(st['listeners']) - n} more", "", "", "", "")
            rows += 1
            break
        routes = li.get("routes") or []
        target = li.get("pool", "")
        if not routed(li):  # one pool takes everything: "-> pool" says it all
            routes = []
        t.add_row(
            li["name"],
            li["bind"],
            f"-> {target}" if target and not routes else "",
            str(li["active"]),
            _rate(rates.listeners.get(li["name"], 0.0)),
        )
        rows += 1
        for r in routes:
            # every pool of the split: its weight now and the connections the route sent there
            split = " ".join(
                f"{pool}={w}({_count(r.get('pools', {}).get(pool, 0))})"
                for pool, w in (r.get("split") or {}).items()
            )
            # a rollout on the route: "*" here, its line under the backends says which and where
            mark = "*" if (li["name"], r["name"]) in rollouts else ""
            t.add_row("", "", Text(f" {r['name']}{mark}: {split}"), "", "")  # Text: no markup
            rows += 1
    return t, rows


def _backends(st: Status, rates: Rates, budget: int) -> Table:
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    cols = (
        ("POOL/BACKEND", "left"),
        ("STATE", "left"),
        ("WEIGHT", "right"),
        ("ACT", "right"),
        ("CONN/S", "right"),
        ("BYTES/S", "right"),
        ("ERR/S", "right"),
        ("CHECK", "left"),
    )
    for col, just in cols:
        t.add_column(
            col,
            justify=just,
            no_wrap=True,
            overflow="ellipsis",
            max_width=22 if col == "POOL/BACKEND" else 14,
        )
    rows = [(p, b) for p in st["pools"] for b in p["backends"]]
    shown = rows if len(rows) <= budget else rows[: budget - 1]
    for p, b in shown:
        conns, nbytes, errs = rates.now.get((p["name"], b["name"]), (0.0, 0.0, 0.0))
        w = (
            str(b["weight"])
            if b["effective_weight"] == b["weight"]
            else f"{b['effective_weight']}/{b['weight']}"
        )
        state = b["state"]
        style = {"up": "green", "down": "red", "ejected": "red", "drain": "yellow", "maint": "blue"}.get(
            state, ""
        )
        check = b.get("check") or {}
        t.add_row(
            f"{p['name']}/{b['name']}",
            Text(state, style=style),
            w,
            str(b["active"]),
            _rate(conns),
            _bytes_rate(nbytes),
            Text(_rate(errs), style="red" if errs else ""),
            (check.get("reason") or "") if check.get("result") == "failed" else check.get("result", "-"),
        )
    if len(shown) < len(rows):
        t.add_row(f"+{len(rows) - len(shown)} more", "", "", "", "", "", "", "")
    return t


def _activity(st: Status) -> list[str]:
    """Running drains and rollouts, one line each."""
    lines = []
    for p in st["pools"]:
        for b in p["backends"]:
            if b["state"] == "drain":
                what = "removed, draining" if b.get("removed") else "draining"
                lines.append(f"{p['name']}/{b['name']} {what}: {b['active']} open")
    for r in running_rollouts(st).values():
        nxt = r.get("next_judgement_in")
        lines.append(
            f"rollout {r['name']} {r['listener']}/{r['route']} {r['stable']} -> {r['canary']}: "
            f"{r['status']} at {r['share']}%" + (f", next judged in {nxt:.0f}s" if nxt is not None else "")
        )
    return lines


def render(st: Status, rates: Rates, source: str, height: int) -> Group:
    """The whole screen for one status document, within `height` lines."""
    header = _header(st, source)
    activity = _activity(st)
    budget = max(4, height - 4 - min(len(activity), 4))
    listeners, lrows = _listeners(st, rates, max(1, budget // 3))
    backends = _backends(st, rates, max(2, budget - lrows - 2))
    parts: list[Any] = [header, listeners, Text(""), backends]
    if activity:
        shown = activity[:4]
        if len(activity) > 4:
            shown[-1] = f"+{len(activity) - 3} more drains/rollouts"
        parts.append(Text("\n".join(shown), style="yellow", no_wrap=True, overflow="ellipsis"))
    return Group(*parts)


def _key_pressed(timeout: float) -> str:
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    return os.read(sys.stdin.fileno(), 32).decode(errors="replace") if r else ""


def run_top(fetch: Callable[[], Status], source: str, interval: float = 1.0) -> int:
    """Draw until `q`; fetch() returns a status document (raises to end with a message).  Without a
    terminal to draw on it says so and returns 1 at once (a live view piped or redirected would
    print nothing, forever)."""
    if not sys.stdout.isatty():
        print(
            "fastlb top: stdout is not a terminal (it draws a live view); "
            "use `fastlb status` or `fastlb status --json` instead",
            file=sys.stderr,
        )
        return 1
    console = Console()
    rates = Rates()
    tty_in = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if tty_in else None
    try:
        if tty_in:
            tty.setcbreak(sys.stdin.fileno())
        st = fetch()
        rates.update(st, time.monotonic())
        with Live(
            render(st, rates, source, console.height), console=console, screen=True, auto_refresh=False
        ) as live:
            next_at = time.monotonic() + interval
            while True:
                keys = (
                    _key_pressed(max(0.0, next_at - time.monotonic()))
                    if tty_in
                    else (time.sleep(interval) or "")
                )
                if "q" in keys.lower() or "\x03" in keys:
                    return 0
                if time.monotonic() >= next_at:
                    st = fetch()
                    rates.update(st, time.monotonic())
                    live.update(render(st, rates, source, console.height), refresh=True)
                    next_at = time.monotonic() + interval
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
