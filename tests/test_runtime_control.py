"""Runtime control of a running `fastlb serve --workers 2` through its control socket, end to end:
`fastlb set-weight`, `drain`, `enable`, `status` (the CLI as an operator runs it, and the raw
socket), with real connections to real backends deciding whether the change took effect.

The backends greet each connection with their name, then echo, so a connection tells which backend
it reached; their own accept counters and fastlb's status totals must agree with that.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter

import pytest

from fastlb.config import ALGORITHMS
from fastlb.control import ControlClient, ControlError
from support.backends import server
from support.clients import (
    assert_one_line_error,
    backends_of,
    cli,
    close_held,
    config_view,
    open_held,
    raw_request,
    wait_published,
    wait_status,
)
from support.helpers import Bg, MiB, recv_exact, recv_line, stream_chunks, stream_sha256, wait_until

WEIGHTS = {"a": 5, "b": 3, "c": 2}
TRANSFER = 32 * MiB
PAUSE_AFTER = 8 * MiB  # the transfer waits here (bytes in flight both ways) while weights change
PROBE = 60  # new connections opened at once to see where fastlb sends them


def start_pool(backends, fastlb, algorithm: str = "weighted_round_robin", weights=WEIGHTS, **kw):
    """Backends that greet with their name, fastlb (2 workers) in front; (backends, lb, client, socket path)."""
    b = backends(*(server(name, "id") for name in weights))
    pool = {"hash_key": "source_ip_port"} if algorithm in ("maglev", "ring_hash") else None
    lb = fastlb(
        [(n, b.address(n), w) for n, w in weights.items()], workers=2, algorithm=algorithm, pool=pool, **kw
    )
    path = str(lb.dir / "control.sock")
    return b, lb, ControlClient(path), path


def probe(lb, n: int = PROBE) -> Counter:
    """n connections opened at once (so that load-aware algorithms spread them), each read up to its
    greeting, then all closed politely.  Counter of the backends that answered."""
    held = open_held(lb.addr, n)
    try:
        return Counter(name for name, _ in held)
    finally:
        close_held(held)


class EchoTransfer:
    """TRANSFER bytes sent on `sock` and echoed back, checked by sha256.  The sender stops after
    PAUSE_AFTER bytes until resume(), so the connection is busy while the test changes things."""

    def __init__(self, sock: socket.socket, seed: int) -> None:
        self.sock = sock
        self.seed = seed
        self.received = 0
        self._go = threading.Event()
        self._recv = Bg(self._receive)
        self._send = Bg(self._sender)

    def _sender(self) -> None:
        sent = 0
        for chunk in stream_chunks(TRANSFER, self.seed):
            if sent == PAUSE_AFTER and not self._go.wait(60):
                raise AssertionError("transfer never resumed")
            self.sock.sendall(chunk)
            sent += len(chunk)
        self.sock.shutdown(socket.SHUT_WR)

    def _receive(self) -> tuple[int, str, str]:
        h = hashlib.sha256()
        while True:
            try:
                chunk = self.sock.recv(256 * 1024)
            except ConnectionResetError:
                return self.received, h.hexdigest(), "reset"
            if not chunk:
                return self.received, h.hexdigest(), "eof"
            h.update(chunk)
            self.received += len(chunk)

    def wait_paused(self, timeout: float = 20.0) -> None:
        wait_until(
            lambda: self.received >= PAUSE_AFTER,
            timeout,
            lambda: f"{PAUSE_AFTER} bytes echoed ({self.received})",
        )

    def finish(self, timeout: float = 60.0) -> tuple[int, str, str]:
        self._go.set()
        self._send.result(timeout)
        return self._recv.result(timeout)


# --- set-weight ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_set_weight_zero_and_back_while_a_transfer_runs(backends, fastlb, algorithm):
    b, lb, ctl, path = start_pool(backends, fastlb, algorithm)
    sock = socket.create_connection(lb.addr, timeout=30)
    try:
        target = recv_line(sock).decode()  # whichever backend the first connection reached
        assert target in WEIGHTS
        sock.settimeout(30)
        transfer = EchoTransfer(sock, seed=41)
        transfer.wait_paused()
        assert backends_of(ctl.status())[target]["bytes_in"] >= PAUSE_AFTER

        r = cli("set-weight", "--socket", path, "web", target, "0")
        assert (r.returncode, r.stdout, r.stderr) == (0, f"web/{target}: weight {WEIGHTS[target]} -> 0\n", "")
        rec = backends_of(wait_published(ctl))[target]
        assert (rec["weight"], rec["effective_weight"], rec["state"], rec["active"]) == (0, 0, "up", 1)
        accepted, total = b.accepted()[target], rec["total"]
        got = probe(lb)
        assert got[target] == 0 and sum(got.values()) == PROBE, (
            f"{target} at weight 0 got new connections: {got}"
        )
        assert b.accepted()[target] == accepted
        assert backends_of(ctl.status())[target]["total"] == total

        r = cli("set-weight", "--socket", path, "web", target, str(WEIGHTS[target]))
        assert (r.returncode, r.stdout) == (0, f"web/{target}: weight 0 -> {WEIGHTS[target]}\n")
        rec = backends_of(wait_published(ctl))[target]
        assert (rec["weight"], rec["effective_weight"]) == (WEIGHTS[target], WEIGHTS[target])
        got = probe(lb)
        assert got[target] > 0, f"{target} back at weight {WEIGHTS[target]} got nothing: {got}"
        assert b.accepted()[target] == accepted + got[target]

        # the transfer that ran on the backend throughout completes byte-exact
        assert transfer.finish() == (TRANSFER, stream_sha256(TRANSFER, 41), "eof")
    finally:
        sock.close()
    rec = backends_of(ctl.status())[target]
    assert rec["bytes_in"] >= TRANSFER and rec["bytes_out"] >= TRANSFER
    assert (rec["connect_errors"], rec["resets"]) == (0, 0)


# --- drain and enable ----------------------------------------------------------------------------


def test_drain_stops_new_connections_keeps_established_ones(backends, fastlb):
    b, lb, ctl, path = start_pool(backends, fastlb, weights={"a": 1, "b": 1, "c": 1})
    held = open_held(lb.addr, 12)
    try:
        on_b = [s for name, s in held if name == "b"]
        assert on_b, f"no connection reached b: {Counter(n for n, _ in held)}"

        r = cli("drain", "--socket", path, "web", "b")
        assert (r.returncode, r.stdout, r.stderr) == (0, "web/b: ready -> drain\n", "")
        rec = backends_of(wait_published(ctl))["b"]
        assert (rec["state"], rec["admin"], rec["draining"], rec["active"]) == (
            "drain",
            "drain",
            True,
            len(on_b),
        )
        accepted, total = b.accepted()["b"], rec["total"]

        got = probe(lb)
        assert got["b"] == 0 and got["a"] + got["c"] == PROBE, f"draining b got new connections: {got}"
        assert b.accepted()["b"] == accepted, "b's own accept counter moved"
        assert backends_of(ctl.status())["b"]["total"] == total, "status total of b moved"

        # the established connections to b still carry data both ways, byte-exact
        for i, s in enumerate(on_b):
            msg = b"after the drain, connection %d: " % i + bytes(range(256)) * 4
            s.sendall(msg)
            assert recv_exact(s, len(msg)) == msg
        assert b.active()["b"] == len(on_b)
    finally:
        close_held(held)  # FIN and EOF both ways: closed normally, not reset
    wait_until(
        lambda: b.active() == {"a": 0, "b": 0, "c": 0},
        5,
        lambda: f"backend connections closed ({b.active()})",
    )
    rec = backends_of(
        wait_status(ctl, lambda st: backends_of(st)["b"]["active"] == 0, "b to have no connection")
    )["b"]
    assert (rec["state"], rec["resets"], rec["connect_errors"]) == ("drain", 0, 0)
    assert b.accepted()["b"] == accepted

    r = cli("enable", "--socket", path, "web", "b")
    assert (r.returncode, r.stdout, r.stderr) == (0, "web/b: drain -> ready\n", "")
    rec = backends_of(wait_published(ctl))["b"]
    assert (rec["state"], rec["admin"], rec["draining"]) == ("up", "ready", False)
    got = probe(lb)
    assert got["b"] > 0, f"b back in service got nothing: {got}"
    assert b.accepted()["b"] == accepted + got["b"]
    assert backends_of(ctl.status())["b"]["total"] == total + got["b"]


# --- malformed commands ------------------------------------------------------------------------------

CLI_REFUSED = [
    pytest.param(["set-weight", "nope", "a", "3"], ["unknown pool 'nope'"], id="set-weight-unknown-pool"),
    pytest.param(
        ["set-weight", "web", "zz", "3"], ["unknown backend 'zz'", "'web'"], id="set-weight-unknown-backend"
    ),
    pytest.param(["drain", "nope", "a"], ["unknown pool 'nope'"], id="drain-unknown-pool"),
    pytest.param(["drain", "web", "zz"], ["unknown backend 'zz'"], id="drain-unknown-backend"),
    pytest.param(["enable", "web", "zz"], ["unknown backend 'zz'"], id="enable-unknown-backend"),
    pytest.param(["disable", "nope", "a"], ["unknown pool 'nope'"], id="disable-unknown-pool"),
    # "--": a negative number after it is the WEIGHT argument, not an option
    pytest.param(["set-weight", "--", "web", "a", "-1"], ["weight", "0..1000", "-1"], id="weight-negative"),
    pytest.param(["set-weight", "web", "a", "1001"], ["weight", "0..1000", "1001"], id="weight-1001"),
]


def test_malformed_cli_commands_change_nothing(backends, fastlb):
    b, lb, ctl, path = start_pool(backends, fastlb)
    before = config_view(wait_published(ctl))
    for p in CLI_REFUSED:
        args, words = p.values
        r = cli(args[0], "--socket", path, *args[1:])
        assert_one_line_error(r, *words)
        assert config_view(ctl.status()) == before, f"{args} changed the running state"
    # the Python API refuses the same, with the same reasons
    for call, words in [
        (lambda: ctl.set_weight("web", "a", 1001), "0..1000"),
        (lambda: ctl.set_weight("web", "a", True), "0..1000"),
        (lambda: ctl.drain("nope", "a"), "unknown pool"),
        (lambda: ctl.disable("web", "zz"), "unknown backend"),
    ]:
        with pytest.raises(ControlError, match=words):
            call()
    assert config_view(ctl.status()) == before
    # and a good command still works afterwards
    assert cli("set-weight", "--socket", path, "web", "c", "7").returncode == 0
    assert backends_of(ctl.status())["c"]["weight"] == 7


@pytest.mark.parametrize("weight", ["abc", "-5", "2.5"])
def test_cli_weight_that_is_not_0_to_1000_is_a_one_line_error(backends, fastlb, weight):
    """What an operator types, without `--`: still exit 1 and one `fastlb: ...` line about the
    weight (not a usage screen), and nothing changes."""
    b, lb, ctl, path = start_pool(backends, fastlb)
    before = config_view(wait_published(ctl))
    r = cli("set-weight", "--socket", path, "web", "a", weight)
    assert_one_line_error(r, "weight", weight)
    assert config_view(ctl.status()) == before


def _req(**kw) -> bytes:
    return json.dumps(kw).encode() + b"\n"


RAW_REFUSED = [
    pytest.param(b"hello fastlb\n", "not JSON", id="garbage"),
    pytest.param(b"\xff\xfe\x00{\n", "not JSON", id="binary"),
    pytest.param(b"\n", "not JSON", id="empty-line"),
    pytest.param(b"[1, 2, 3]\n", "JSON object", id="json-array"),
    pytest.param(b'"status"\n', "JSON object", id="json-string"),
    pytest.param(_req(cmd=7), "string 'cmd'", id="cmd-not-a-string"),
    pytest.param(_req(command="status"), "string 'cmd'", id="no-cmd"),
    pytest.param(_req(cmd="reboot"), "unknown command 'reboot'", id="unknown-cmd"),
    pytest.param(
        _req(cmd="set-weight", pool="nope", backend="a", weight=1), "unknown pool 'nope'", id="unknown-pool"
    ),
    pytest.param(_req(cmd="drain", pool="web", backend="zz"), "unknown backend 'zz'", id="unknown-backend"),
    pytest.param(_req(cmd="enable", pool="web"), "must be strings", id="no-backend"),
    pytest.param(
        _req(cmd="disable", pool="web", backend=["a"]), "must be strings", id="backend-not-a-string"
    ),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a", weight=-1), "0..1000", id="weight-negative"),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a", weight=1001), "0..1000", id="weight-1001"),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a", weight="abc"), "0..1000", id="weight-abc"),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a", weight=2.5), "0..1000", id="weight-float"),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a", weight=True), "0..1000", id="weight-bool"),
    pytest.param(_req(cmd="set-weight", pool="web", backend="a"), "0..1000", id="weight-missing"),
]


def test_malformed_requests_on_the_socket_change_nothing(backends, fastlb):
    b, lb, ctl, path = start_pool(backends, fastlb)
    before = config_view(wait_published(ctl))
    for p in RAW_REFUSED:
        payload, words = p.values
        # the refused request, then a good one on the same connection: refused, then answered
        replies = raw_request(path, payload + _req(cmd="status"))
        assert len(replies) == 2, f"{p.id}: {replies}"
        bad, good = replies
        assert bad["ok"] is False and isinstance(bad["error"], str) and words in bad["error"], (
            f"{p.id}: {bad}"
        )
        assert set(bad) == {"ok", "error"}, f"{p.id}: {bad}"
        assert good["ok"] is True and config_view(good["status"]) == before, (
            f"{p.id} changed the running state"
        )
    # a line longer than the 64 KiB limit: refused, then the server hangs up
    long_line = (
        b'{"cmd": "set-weight", "pool": "web", "backend": "a", "weight": 0, "pad": "'
        + b"x" * (100 * 1024)
        + b'"}\n'
    )
    replies = raw_request(path, long_line + _req(cmd="status"))
    assert replies == [{"ok": False, "error": "request too long"}]
    assert config_view(ctl.status()) == before
    # connections through the balancer were never disturbed
    assert sum(probe(lb).values()) == PROBE


# --- status ------------------------------------------------------------------------------------------

HEADER = ["POOL", "BACKEND", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "BYTES_IN", "BYTES_OUT", "ERRORS", "CHECK"]


def test_status_table_and_json(backends, fastlb):
    b, lb, ctl, path = start_pool(backends, fastlb)
    cli("drain", "--socket", path, "web", "c")
    got = probe(lb, 20)
    assert got["c"] == 0
    wait_status(
        ctl, lambda st: all(r["active"] == 0 for r in backends_of(st).values()), "connections released"
    )

    r = cli("status", "--socket", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == HEADER
    rows = [line.split() for line in lines[1:4]]
    assert [row[:3] for row in rows] == [["web", "a", "up"], ["web", "b", "up"], ["web", "c", "drain"]]
    assert [row[3] for row in rows] == ["5", "3", "2"]  # WEIGHT
    assert [row[4] for row in rows] == ["0", "0", "0"]  # ACTIVE
    assert [int(row[5]) for row in rows] == [got["a"], got["b"], 0]  # TOTAL
    assert all(row[6].endswith("B") and row[7].endswith("B") for row in rows)  # BYTES_IN, BYTES_OUT
    assert [row[8] for row in rows] == ["0", "0", "0"]  # ERRORS
    assert [row[9] for row in rows] == ["-", "-", "-"]  # CHECK: the pool has no health_check
    assert all(len(row) == len(HEADER) for row in rows)
    assert not any(line.startswith("web ") for line in lines[4:]), "more backend rows than backends"
    # the same through the config file instead of the socket path
    r2 = cli("status", "-c", str(lb.config_path))
    assert r2.returncode == 0 and r2.stdout.splitlines()[:4] == lines[:4]

    r = cli("status", "--socket", path, "--json")
    assert r.returncode == 0
    st = json.loads(r.stdout)
    assert [p["name"] for p in st["pools"]] == ["web"] and st["pools"][0][
        "algorithm"
    ] == "weighted_round_robin"
    recs = backends_of(st)
    assert list(recs) == ["a", "b", "c"]
    assert {n: (x["state"], x["weight"], x["total"]) for n, x in recs.items()} == {
        "a": ("up", 5, got["a"]),
        "b": ("up", 3, got["b"]),
        "c": ("drain", 2, 0),
    }
    assert [li["name"] for li in st["listeners"]] == ["web"] and st["listeners"][0]["accepted"] == 20
    assert len(st["workers"]) == 2 and all(w["state"] == "running" for w in st["workers"])
    assert isinstance(st["generation"], int)


def test_status_without_a_running_fastlb(tmp_path):
    r = cli("status", "--socket", str(tmp_path / "nothing.sock"))
    assert_one_line_error(r, "cannot reach fastlb", "nothing.sock")
