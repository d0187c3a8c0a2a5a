"""End-to-end: connection draining (operator drain, drain_timeout) and SIGHUP reloads that remove,
add and fail, against a real `fastlb serve` with two workers and real `id` backends (which send
their name, then echo)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib

import pytest

from fastlb.control import ControlError
from support.backends import server
from support.fastlb import toml_table
from support.helpers import MiB, drain, recv_exact, recv_line, stream_chunks, wait_closed, wait_until
from support.protocols import (
    backends_status,
    control,
    log_lines,
    log_mark,
    states,
    try_id_request,
    wait_log,
)

WORKERS = 2


def connect_to(lb, name: str, tries: int = 20) -> socket.socket:
    """A client connection through fastlb that landed on backend `name` (its greeting is read)."""
    got = []
    for _ in range(tries):
        s = lb.connect()
        who = recv_line(s).decode()
        if who == name:
            return s
        got.append(who)
        s.close()
    raise AssertionError(f"no connection reached {name} in {tries} tries (got {got})")


def echo_once(s: socket.socket, payload: bytes) -> None:
    s.sendall(payload)
    assert recv_exact(s, len(payload)) == payload


# ---------------------------------------------------------------------------------------------------
# 6. drain


def test_drain_lets_a_long_transfer_finish_byte_exact(backends, fastlb):
    """64 MiB echoed through backend a, in three parts: the drain is issued after the first part, new
    connections are checked during the second, the third ends the transfer.  The transfer arrives
    byte-exact, a accepts nothing new, and "drain finished" is logged only after the transfer ends."""
    total = 64 * MiB
    parts = (16 * MiB, 32 * MiB, 16 * MiB)
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb([("a", b.address("a"), None), ("b", b.address("b"), None)], workers=WORKERS)
    s = connect_to(lb, "a")
    s.settimeout(30)
    go = [threading.Event(), threading.Event()]
    sent = hashlib.sha256()
    got = hashlib.sha256()
    out: dict = {}

    def sender() -> None:
        try:
            chunks = stream_chunks(total, seed=11, chunk=MiB)
            for i, size in enumerate(parts):
                if i and not go[i - 1].wait(30):
                    raise AssertionError(f"part {i} never released")
                for _ in range(size // MiB):
                    c = next(chunks)
                    sent.update(c)
                    s.sendall(c)
            s.shutdown(socket.SHUT_WR)
            out["sent"] = "ok"
        except Exception as exc:  # reported by the main thread
            out["sent"] = repr(exc)

    def reader() -> None:
        try:
            out["read"] = drain(s, got)
        except Exception as exc:
            out["read"] = repr(exc)

    threads = [threading.Thread(target=sender, daemon=True), threading.Thread(target=reader, daemon=True)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: backends_status(lb)["a"]["bytes_out"] >= parts[0], 20, "first part through a")
        accepted_a = b.accepted()["a"]
        mark = log_mark(lb)
        r = subprocess.run(
            [sys.executable, "-m", "fastlb", "drain", "--socket", str(lb.dir / "control.sock"), "web", "a"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (r.returncode, r.stdout.strip()) == (0, "web/a: ready -> drain"), r.stderr
        go[0].set()
        st = backends_status(lb)["a"]
        assert (st["state"], st["admin"], st["draining"], st["active"]) == ("drain", "drain", True, 1)
        wait_log(lb, r"pool web backend a: ready -> drain \(1 connections open\)", 2, since=mark)
        # while the transfer runs: new connections all go to b
        assert [try_id_request(lb.addr) for _ in range(10)] == ["b"] * 10
        assert backends_status(lb)["a"]["active"] == 1
        assert log_lines(lb, "drain finished", since=mark) == []
        go[1].set()
        for t in threads:
            t.join(60)
    finally:
        go[0].set()
        go[1].set()
        s.close()
    assert out == {"sent": "ok", "read": (total, "eof")}, out
    assert got.hexdigest() == sent.hexdigest()
    wait_log(lb, r"pool web backend a: drain finished", 2, since=mark)
    assert b.accepted()["a"] == accepted_a
    st = backends_status(lb)["a"]
    assert (st["state"], st["active"]) == ("drain", 0)
    assert st["bytes_in"] == total and st["bytes_out"] >= total


def test_drain_timeout_closes_an_idle_connection(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=WORKERS,
        pool={"drain_timeout": "1s"},
    )
    s = connect_to(lb, "a")
    echo_once(s, b"still here")
    mark = log_mark(lb)
    t0 = time.monotonic()
    assert control(lb).drain("web", "a")["admin"] == "drain"
    how, _ = wait_closed(s, 4.0)
    elapsed = time.monotonic() - t0
    s.close()
    assert how == "reset"  # a deadline ends a connection visibly (issue 9): never a FIN
    assert 0.95 <= elapsed <= 1.0 + 1.0, f"closed {elapsed:.2f}s after the drain (drain_timeout 1s)"
    line = wait_log(lb, r"pool web backend a: drain_timeout", 2, since=mark)
    assert "drain_timeout (1.0s) passed; closing its 1 remaining connections" in line
    assert sum(w["deadline_resets"] for w in control(lb).status()["workers"]) == 1
    wait_log(lb, r"pool web backend a: drain finished", 2, since=mark)
    wait_until(lambda: b.active()["a"] == 0, 2, "the backend side closed too")
    # b was not touched, a takes nothing new
    assert [try_id_request(lb.addr) for _ in range(4)] == ["b"] * 4


# ---------------------------------------------------------------------------------------------------
# 7. reload


def write_config(lb, backends: list[dict], **pool_changes) -> None:
    """Rewrite fastlb's config file with other backends (and pool keys); the rest stays as started."""
    doc = tomllib.loads(lb.config_path.read_text())
    doc["pools"]["web"]["backends"] = backends
    doc["pools"]["web"].update(pool_changes)
    text = toml_table("global", doc["global"]) + "\n" + toml_table("listeners.web", doc["listeners"]["web"])
    text += "\n" + toml_table("pools.web", doc["pools"]["web"])
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(lb.config_path)


def sighup(lb, expect: str) -> str:
    """SIGHUP fastlb and wait for the log line matching `expect` that the reload produces."""
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    return wait_log(lb, expect, 5, since=mark)


def test_reload_removes_adds_and_survives_a_broken_file(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"), server("c", "id"))
    entry = {n: {"name": n, "address": b.address(n), "weight": 1} for n in "abc"}
    lb = fastlb([("a", entry["a"]["address"], 1), ("b", entry["b"]["address"], 1)], workers=WORKERS)
    held = connect_to(lb, "b")

    # --- remove b: drained (its connection keeps working), gone once that connection ends
    write_config(lb, [entry["a"]])
    mark = log_mark(lb)
    sighup(lb, r"reloaded ")
    assert log_lines(lb, r"pool web backend b: removed from the config; draining", since=mark)
    st = backends_status(lb)["b"]
    assert (st["state"], st["draining"], st["removed"], st["active"]) == ("drain", True, True, 1)
    accepted_b = b.accepted()["b"]
    assert [try_id_request(lb.addr) for _ in range(10)] == ["a"] * 10
    assert b.accepted()["b"] == accepted_b
    echo_once(held, b"b still serves its established connection")
    held.shutdown(socket.SHUT_WR)
    assert drain(held) == (0, "eof")
    held.close()
    wait_until(
        lambda: "b" not in backends_status(lb), 3, lambda: f"b gone from status ({backends_status(lb)})"
    )
    wait_log(lb, r"pool web backend b: removed$", 1, since=mark)
    assert states(lb) == {"a": "up"}
    with pytest.raises(ControlError, match="unknown backend 'b'"):
        control(lb).drain("web", "b")

    # --- add c: it appears and takes connections
    write_config(lb, [entry["a"], entry["c"]])
    mark = log_mark(lb)
    sighup(lb, r"reloaded ")
    assert log_lines(lb, r"pool web backend c: added \(127\.0\.0\.1:\d+, weight 1\)", since=mark)
    assert states(lb) == {"a": "up", "c": "up"}
    names = [try_id_request(lb.addr) for _ in range(20)]
    assert sorted(set(names)) == ["a", "c"] and names.count("c") >= 6, names
    assert b.accepted()["c"] == names.count("c")

    # --- a broken file: logged with file and key, nothing changes
    before = {n: (x["state"], x["weight"], x["effective_weight"]) for n, x in backends_status(lb).items()}
    write_config(lb, [entry["a"], dict(entry["c"], weight=5000)])
    line = sighup(lb, r"reload failed")
    assert f"{lb.config_path}: pools.web.backends[1].weight: 5000 is out of range 0..1000" in line
    assert "keeping the running configuration" in line
    after = {n: (x["state"], x["weight"], x["effective_weight"]) for n, x in backends_status(lb).items()}
    assert after == before == {"a": ("up", 1, 1), "c": ("up", 1, 1)}
    names = [try_id_request(lb.addr) for _ in range(20)]
    assert sorted(set(names)) == ["a", "c"] and names.count("c") >= 6, names
    assert lb.proc.poll() is None
