"""One fastlb per control socket and per listener address: a second `fastlb serve` refuses to start
(exit 1, one line naming the running pid) and leaves the first one alone; an address held by any
other process is refused too, even a SO_REUSEPORT listener of the same user (the startup check
binds without SO_REUSEPORT)."""

from __future__ import annotations

import socket

import pytest

from fastlb.control import ControlClient
from support.backends import server
from support.clients import assert_one_line_error, cli, count_backends


def test_second_serve_with_the_same_config_exits_1_naming_the_pid(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=1)
    before = lb.worker_pids()
    r = cli("serve", "-c", str(lb.config_path), timeout=30)
    line = assert_one_line_error(r, f"pid {lb.pid}", "--takeover")
    assert "already running" in line
    # the first instance is untouched: same workers, still controllable, still serving alone
    assert lb.worker_pids() == before
    assert ControlClient(str(lb.dir / "control.sock")).status()["pid"] == lb.pid
    assert count_backends(lb.addr, 50) == {"a": 50}


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_address_in_use_by_another_process_is_refused(backends, fastlb, reuseport):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=1)
    other = fastlb.again(lb, start=False)  # its config, moved to another control socket
    other.config_path = other.dir / "other.toml"
    other.config_path.write_text(lb.config_text.replace("control.sock", "other.sock"))
    r = cli("serve", "-c", str(other.config_path), timeout=30)
    assert_one_line_error(r, "listener web", "already in use")
    # a foreign listener on a fresh port: nobody's runtime file, no control socket
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(8)
    try:
        port = squatter.getsockname()[1]
        other.config_path.write_text(other.config_path.read_text().replace(f":{lb.port}", f":{port}"))
        r = cli("serve", "-c", str(other.config_path), timeout=30)
        assert_one_line_error(r, "listener web", f"127.0.0.1:{port}", "already in use")
    finally:
        squatter.close()
    assert count_backends(lb.addr, 20) == {"a": 20}
