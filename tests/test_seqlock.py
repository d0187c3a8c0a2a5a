"""Issue 9, item 6 (seqlock half): no worker spins on a backend seqlock left odd by a writer that
died between its two stores; a new write repairs the record.

The test corrupts the live region from outside, as a dead control process would leave it: it maps
the control process's memfd through /proc/PID/fd (root) and makes backend a's `seq` odd."""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time

from support.backends import server
from support.fastlb import rewrite_backends
from support.protocols import control, log_mark, try_id_request, wait_log

HEADER = struct.Struct("=QIIQQIIIIQQQQQ")  # magic .. tables_off (shm_layout.h flb_header_t)


def map_region(pid: int) -> mmap.mmap:
    """The fastlb-shm memfd of process pid, mapped read-write."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:fastlb-shm"):
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
            try:
                return mmap.mmap(f, os.fstat(f).st_size)
            finally:
                os.close(f)
    raise AssertionError(f"no fastlb-shm memfd in process {pid}")


def backend_seq_offset(m: mmap.mmap, index: int) -> int:
    h = HEADER.unpack_from(m, 0)
    backends_off = h[11]
    backend_size = struct.unpack_from("=I", m, 96)[0]  # header.backend_size
    return backends_off + index * backend_size


def worker_cpu(lb) -> float:
    total = 0.0
    for p in lb.workers_now():
        t = p.cpu_times()
        total += t.user + t.system
    return total


def test_odd_seqlock_does_not_make_workers_spin(backends, fastlb):
    """Backend a's seq is made odd under two running workers: 20 connections all succeed (a from the
    workers' last good copy of its address, b as usual) without the workers burning CPU; a reload
    that rewrites a's record makes seq even again and the copy is no longer needed."""
    b = backends(server("a", "id"), server("b", "id"), server("a2", "id"))
    lb = fastlb([("a", b.address("a"), 1), ("b", b.address("b"), 1)], workers=2, algorithm="round_robin")
    assert sorted(try_id_request(lb.addr) for _ in range(4)) == ["a", "a", "b", "b"]
    m = map_region(lb.pid)
    off = backend_seq_offset(m, 0)
    seq = struct.unpack_from("=I", m, off)[0]
    assert seq % 2 == 0
    struct.pack_into("=I", m, off, seq + 1)  # a writer died between its two stores
    cpu0 = worker_cpu(lb)
    t0 = time.monotonic()
    got = [try_id_request(lb.addr, timeout=5) for _ in range(20)]
    wall = time.monotonic() - t0
    cpu = worker_cpu(lb) - cpu0
    failed = [r for r in got if r.startswith("FAIL")]
    assert failed == [], f"{len(failed)} of 20 connections failed with a's seqlock odd: {failed[:3]}"
    assert sorted(set(got)) == ["a", "b"], "a (from the worker's last good copy) and b both serve"
    assert cpu < 0.5 + wall / 2, f"workers used {cpu:.2f}s CPU in {wall:.2f}s: spinning"
    st = control(lb).status()
    assert sum(w["seqlock_fallbacks"] for w in st["workers"]) >= 10
    # a new write of the record (a reload moving a to another address) repairs it
    mark = log_mark(lb)
    rewrite_backends(
        lb,
        [{"name": "a", "address": b.address("a2"), "weight": 1}, {"name": "b", "address": b.address("b")}],
    )
    lb.signal(signal.SIGHUP)
    wait_log(lb, r"pool web backend a: address now", 5, since=mark)
    assert struct.unpack_from("=I", m, off)[0] % 2 == 0
    before = sum(w["seqlock_fallbacks"] for w in control(lb).status()["workers"])
    got = [try_id_request(lb.addr, timeout=5) for _ in range(10)]
    assert sorted(set(got)) == ["a2", "b"], got
    after = sum(w["seqlock_fallbacks"] for w in control(lb).status()["workers"])
    assert after == before, "still reading a's address from the fallback copy after the repair"
    m.close()
