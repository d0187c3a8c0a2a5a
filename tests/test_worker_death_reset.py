"""Issue 24, item 5: a worker killed mid-transfer must not end the client's stream with a clean FIN.

Both sockets of an established pair carry SO_LINGER {1, 0} (the client's inherited from the listening
socket, the backend's set once it connected), so when the worker dies the kernel resets both peers;
every orderly close clears it first (the FIN paths are covered by test_forwarding, test_early_close,
test_drain and test_reset_delivery, and by the byte-exact transfer below)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket

from support.backends import server
from support.helpers import MiB, drain, stream_sha256, wait_until
from support.protocols import control

SIZE = 64 * MiB


def test_kill9_worker_mid_download_resets_client_and_backend(backends, fastlb):
    """kill -9 of the worker during a 64 MiB download: the client reads ECONNRESET (not EOF) well
    before the end, and the backend's send fails with a reset."""
    b = backends(server("big", "blast", send_bytes=SIZE, seed=3))
    lb = fastlb([("big", b.address("big"), None)], workers=1)
    (victim,) = lb.wait_workers(1)
    s = socket.create_connection(lb.addr, timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    got, end = drain(s, limit=MiB)  # the transfer is under way
    assert (got, end) == (MiB, "limit")
    os.kill(victim, signal.SIGKILL)
    got2, end = drain(s)
    s.close()
    assert end == "reset", (
        f"client saw {end} after {got + got2} of {SIZE} bytes: a cut transfer looked complete"
    )
    assert got + got2 < SIZE
    events: list[dict] = []
    wait_until(lambda: events.extend(b.events()) or events, 10, "the backend to report its connection")
    assert events[0]["end"] == "reset", events
    assert events[0]["sent_len"] < SIZE


def test_transfer_after_linger_change_still_ends_in_fin_with_every_byte(backends, fastlb):
    """The orderly path clears SO_LINGER before close(): 8 MiB downloads end in EOF with the exact
    bytes, and the worker counted no reset and no setsockopt failure."""
    b = backends(server("big", "blast", send_bytes=8 * MiB, seed=5))
    lb = fastlb([("big", b.address("big"), None)], workers=1)
    for _ in range(3):
        s = socket.create_connection(lb.addr, timeout=10)
        s.shutdown(socket.SHUT_WR)
        h = hashlib.sha256()
        got, end = drain(s, h)
        s.close()
        assert (got, end) == (8 * MiB, "eof")
        assert h.hexdigest() == stream_sha256(8 * MiB, seed=5)
    workers = control(lb).status()["workers"]
    assert sum(w["resets"] for w in workers) == 0
    assert sum(w.get("linger_errors", 0) for w in workers) == 0
