"""Issue 9, item 1: a connection is never reset because a pipe is small.

An unprivileged user over fs.pipe-user-pages-soft gets 8 KiB pipes instead of 64 KiB (that is the
shipped systemd unit: DynamicUser, no CAP_SYS_RESOURCE).  The test makes a real system user, has
one of its processes hold enough pipes to be over the soft limit, runs `fastlb serve` as that user,
and pushes a backend's paced messages to clients that read late (small receive buffers): before the
fix every connection was reset (pump_small wrote 16 KiB into an 8 KiB pipe)."""

from __future__ import annotations

import hashlib
import os
import pwd
import random
import shutil
import socket
import subprocess
import threading
import time

import pytest

from support.backends import server
from support.helpers import drain
from support.protocols import control, log_lines

USER = "fastlb-pipetest"  # our own user: its pipe budget is what the test exhausts
CLIENTS = 10
COUNT = 400
SIZE = 16000
READ_AFTER = 3.0

HOG = r"""
import fcntl, os, sys
F_GETPIPE_SZ = 1032
pipes = []
while True:
    r, w = os.pipe()
    pipes.append((r, w))
    if fcntl.fcntl(r, F_GETPIPE_SZ) < 65536 or len(pipes) > 4000:
        break
print(len(pipes), fcntl.fcntl(pipes[-1][0], F_GETPIPE_SZ), flush=True)
sys.stdin.read()
"""


def ensure_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(USER)


@pytest.fixture
def pipe_hog():
    """A process of USER holding pipes until the next one comes out small; yields that size."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root, useradd and the system python3 to run as an unprivileged user")
    pw = ensure_user()
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-I", "-S", "-c", HOG],
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().split()
        assert len(line) == 2, f"pipe hog failed: {line}"
        n, size = int(line[0]), int(line[1])
        if size >= 65536:
            pytest.skip(f"{n} pipes did not exhaust fs.pipe-user-pages-soft (no soft limit?)")
        yield size
    finally:
        proc.kill()
        proc.wait(5)


def expected_stream() -> str:
    rng = random.Random(5)
    h = hashlib.sha256()
    for _ in range(COUNT):
        h.update(rng.randbytes(SIZE))
    return h.hexdigest()


def late_reader(addr: tuple[str, int], out: list, i: int) -> None:
    """Connect with SO_RCVBUF 16384, read nothing for READ_AFTER seconds, then read to the end."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.settimeout(30)
        s.connect(addr)
        time.sleep(READ_AFTER)
        h = hashlib.sha256()
        n, how = drain(s, h)
        out[i] = (n, how, h.hexdigest())
    except OSError as exc:
        out[i] = (0, repr(exc), "")
    finally:
        s.close()


def test_small_pipes_never_reset_a_connection(pipe_hog, backends, fastlb):
    """fastlb runs as USER, whose new pipes are small (pipe_hog): 10 clients, each sent 400 x 16,000
    bytes 5 ms apart by the backend, reading only after 3 s.  0 resets, every stream byte-exact, the
    workers know their pipes are small, size their pool from the user's budget, and the small
    pipes are logged once."""
    b = backends(server("p", "paced", count=COUNT, size=SIZE, interval_ms=5, seed=5))
    lb = fastlb([("p", b.address("p"), None)], workers=2, user=USER)
    assert all(p.uids().real == pwd.getpwnam(USER).pw_uid for p in lb.workers_now())
    out: list = [None] * CLIENTS
    threads = [threading.Thread(target=late_reader, args=(lb.addr, out, i)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want = expected_stream()
    bad = [(i, r[:2]) for i, r in enumerate(out) if r is None or r != (COUNT * SIZE, "eof", want)]
    assert bad == [], f"{len(bad)} of {CLIENTS} streams broken (bytes, end): {bad[:5]}"
    st = control(lb).status()
    assert sum(w["resets"] for w in st["workers"]) == 0
    sizes = [w["pipe_size"] for w in st["workers"]]
    assert all(0 < s <= pipe_hog for s in sizes), f"workers' pipe sizes {sizes}, hog got {pipe_hog}"
    assert all(w["pipe_pool_cap"] < 512 for w in st["workers"])  # sized from the user's budget
    lines = log_lines(lb, r"pipes are \d+ bytes, not 65536")
    assert len(lines) == 1, lines
