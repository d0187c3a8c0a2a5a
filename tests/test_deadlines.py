"""Issue 9, item 9: deadlines end connections visibly (a reset, never a FIN that makes a cut
transfer look complete), and half-closed connections have their own timeout (half_close_timeout).
(drain_timeout's reset is asserted in test_drain.py.)"""

from __future__ import annotations

import signal
import socket
import time

from support.backends import server
from support.helpers import MiB, drain, wait_closed, wait_until
from support.protocols import control


def test_shutdown_timeout_resets_a_download(backends, fastlb):
    """A 256 MiB download whose client stopped reading is still running when fastlb stops: at
    shutdown_timeout (1 s) it is reset - the client sees a reset after fewer bytes, not an EOF."""
    n = 256 * MiB
    b = backends(server("d", "blast", send_bytes=n, seed=3))
    lb = fastlb([("d", b.address("d"), None)], workers=1, global_={"shutdown_timeout": "1s"})
    s = socket.create_connection(lb.addr, timeout=10)
    s.settimeout(10)
    got, how = drain(s, limit=MiB)
    assert (got, how) == (MiB, "limit")
    t0 = time.monotonic()
    lb.signal(signal.SIGTERM)
    assert lb.wait_exit(15) == 0
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.9, f"fastlb exited {elapsed:.2f}s after SIGTERM (shutdown_timeout 1s)"
    rest, how = drain(s)
    s.close()
    assert got + rest < n
    assert how == "reset", f"the cut download ended with {how} after {got + rest} of {n} bytes"


def test_half_close_timeout_resets_when_the_backend_never_finishes(backends, fastlb):
    """The client sends, then shuts down its side; the backend reads on and never answers or closes.
    half_close_timeout = 1s: the connection is reset about 1 s after the client's FIN, and counted."""
    b = backends(server("h", "hold"))
    lb = fastlb([("h", b.address("h"), None)], workers=1, listener={"half_close_timeout": "1s"})
    s = socket.create_connection(lb.addr, timeout=10)
    s.sendall(b"request")
    s.shutdown(socket.SHUT_WR)
    how, elapsed = wait_closed(s, 6)
    s.close()
    assert how == "reset"
    assert 0.9 <= elapsed <= 4.0, f"reset {elapsed:.2f}s after the FIN (half_close_timeout 1s)"
    w = control(lb).status()["workers"][0]
    assert w["half_close_timeouts"] == 1 and w["timeouts_idle"] == 0


def test_half_close_timeout_resets_when_the_client_never_finishes(backends, fastlb):
    """The other way round: the backend sends 1000 bytes and shuts down its side; the client reads
    them and the EOF but never closes.  The backend's side is reset about 1 s later."""
    b = backends(server("d", "blast", send_bytes=1000, seed=1))
    lb = fastlb([("d", b.address("d"), None)], workers=1, listener={"half_close_timeout": "1s"})
    s = socket.create_connection(lb.addr, timeout=10)
    s.settimeout(10)
    got, how = drain(s)
    t0 = time.monotonic()
    assert (got, how) == (1000, "eof")
    (ev,) = b.wait_events(1, 6)
    elapsed = time.monotonic() - t0
    s.close()
    assert ev["end"] == "reset", ev
    assert 0.8 <= elapsed <= 4.0, f"backend reset {elapsed:.2f}s after the EOF (half_close_timeout 1s)"
    wait_until(lambda: control(lb).status()["workers"][0]["half_close_timeouts"] == 1, 3, "counted")


def test_half_close_timeout_zero_means_no_limit(backends, fastlb):
    """half_close_timeout = "0s": a half-closed connection stays until idle_timeout."""
    b = backends(server("h", "hold"))
    lb = fastlb(
        [("h", b.address("h"), None)],
        workers=1,
        listener={"half_close_timeout": "0s", "idle_timeout": "2s"},
    )
    s = socket.create_connection(lb.addr, timeout=10)
    s.sendall(b"request")
    s.shutdown(socket.SHUT_WR)
    how, elapsed = wait_closed(s, 8)
    s.close()
    assert elapsed >= 1.9, f"closed {elapsed:.2f}s after the FIN: before idle_timeout (2s)"
    w = control(lb).status()["workers"][0]
    assert w["half_close_timeouts"] == 0 and w["timeouts_idle"] == 1


MINIMAL = """\
[listeners.web]
bind = "127.0.0.1:8080"
pool = "web"
{extra}

[pools.web]
backends = [{{ name = "a", address = "127.0.0.1:9000" }}]
"""


def test_half_close_timeout_config_key() -> None:
    """Default 60 s; a duration, 0 = no limit; at most 1000h (its milliseconds fit the record)."""
    from fastlb.config import ConfigError, parse_config

    assert parse_config(MINIMAL.format(extra=""), "t.toml").listeners["web"].half_close_timeout == 60.0
    cfg = parse_config(MINIMAL.format(extra='half_close_timeout = "2500ms"'), "t.toml")
    assert cfg.listeners["web"].half_close_timeout == 2.5
    cfg = parse_config(MINIMAL.format(extra='half_close_timeout = "0s"'), "t.toml")
    assert cfg.listeners["web"].half_close_timeout == 0.0
    for bad, word in (('"1001h"', "too long"), ('"-1s"', "negative"), ('"soon"', "")):
        try:
            parse_config(MINIMAL.format(extra=f"half_close_timeout = {bad}"), "t.toml")
        except ConfigError as exc:
            msg = str(exc)
            assert "\n" not in msg and "listeners.web.half_close_timeout" in msg and word in msg, msg
        else:
            raise AssertionError(f"half_close_timeout = {bad} accepted")
