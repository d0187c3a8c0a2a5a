"""Large tables do not cost what they do not use (issue 9 item 12).

A pool with maglev_table_size = 5000011 (a ~1 s build here) and a slow start: the control process
stays well under a core during the ramp and answers status quickly, because ramp steps rebuild the
table at most once per 5 x its build time and identical tables are not rebuilt at all; the shared
region's table memory is allocated as it is written (no memset of every buffer up front).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil

from fastlb.control import ControlClient
from support.backends import server
from support.clients import backends_of, wait_status
from support.helpers import Deadline

BIG = 5_000_011
BUFFER = 4 * BIG  # bytes of one of the pool's two table buffers
RAMP = 6.0
MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")  # the first line of a mapping in /proc/PID/smaps


def _region_rss(pid: int) -> int:
    """Resident bytes of the process's mapping of the shared region (memfd "fastlb-shm")."""
    rss, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            inside = "fastlb-shm" in line
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


def test_slow_start_over_a_big_maglev_table(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"), server("c", "id"))
    lb = fastlb(
        [("a", b.address("a"), 100), ("b", b.address("b"), 60), ("c", b.address("c"), 40)],
        algorithm="maglev",
        pool={"maglev_table_size": BIG, "slow_start": f"{RAMP:g}s"},
    )
    ctl = ControlClient(str(lb.dir / "control.sock"), timeout=30)
    # one table built (at startup): one buffer written, the other untouched
    at_start = _region_rss(lb.pid)
    assert BUFFER * 0.9 < at_start < BUFFER * 1.25, f"region RSS {at_start / 2**20:.1f} MiB at start"

    ctl.disable("web", "a")
    proc = psutil.Process(lb.pid)
    cpu0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
    ctl.enable("web", "a")  # a ramps from 5 % to its weight over RAMP seconds
    latencies = []
    deadline = Deadline(RAMP + 20)
    while True:
        s0 = time.monotonic()
        st = ctl.status()
        latencies.append(time.monotonic() - s0)
        a = backends_of(st)["a"]
        if a["effective_weight"] == a["weight"] and time.monotonic() - t0 > RAMP:
            break
        assert not deadline.expired(), f"ramp did not end: {a}"
        time.sleep(0.25)
    wall = time.monotonic() - t0
    cpu = (sum(proc.cpu_times()[:2]) - cpu0) / wall
    assert cpu < 0.30, f"control process at {cpu:.0%} of a core during the ramp"
    latencies.sort()
    assert latencies[len(latencies) // 2] < 0.5, f"status latencies {latencies}"
    assert latencies[-1] < 5.0, f"status latencies {latencies}"
    # both buffers written by now, nothing beyond them
    assert _region_rss(lb.pid) < 2 * BUFFER * 1.15

    # the ramp's end is published: the live table gives a its full share again
    wait_status(ctl, lambda s: backends_of(s)["a"]["effective_weight"] == 100, "a at full weight")
