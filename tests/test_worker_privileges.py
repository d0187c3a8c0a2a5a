"""[global] user / group (issue 24 item 10): workers drop to them once their sockets are open; the
control process keeps its own ids (takeovers, binds).  Real processes: their ids are read from
/proc/PID/status, traffic flows, a killed worker comes back as the same user, a takeover too."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import socket

import psutil

from fastlb.control import ControlClient
from support.backends import server
from support.clients import cli
from support.helpers import wait_until

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrnam("nogroup")


def _ids(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: fields.get(k, "").split() for k in ("Uid", "Gid", "Groups", "NoNewPrivs")}


def _assert_dropped(pid: int) -> None:
    # a worker just forked is still the control process's copy until it has exec'd and dropped
    wait_until(lambda: _ids(pid)["NoNewPrivs"] == ["1"], 10, f"worker {pid} to drop its privileges")
    ids = _ids(pid)
    assert ids["Uid"] == [str(NOBODY.pw_uid)] * 4, ids
    assert ids["Gid"] == [str(NOGROUP.gr_gid)] * 4, ids
    assert ids["Groups"] == [str(NOGROUP.gr_gid)], ids
    assert ids["NoNewPrivs"] == ["1"], ids


def _greets(addr) -> bool:
    with socket.create_connection(addr, timeout=5) as c:
        return c.recv(64).startswith(b"a")


def test_workers_run_as_the_configured_user_through_restarts_and_takeovers(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=2, global_={"user": "nobody", "group": "nogroup"})
    pids = lb.wait_workers(2)
    for pid in pids:
        _assert_dropped(pid)
    assert _ids(lb.pid)["Uid"][0] == str(os.geteuid())  # the control process keeps its own
    assert all(_greets(lb.addr) for _ in range(4))

    victim = sorted(pids)[0]
    os.kill(victim, signal.SIGKILL)
    again = lb.wait_workers(2, exclude={victim})
    for pid in again:
        _assert_dropped(pid)
    assert all(_greets(lb.addr) for _ in range(4))

    r = cli("upgrade", "-c", str(lb.config_path), timeout=90)
    assert r.returncode == 0, r
    new = int(r.stdout.split("pid ")[1].split(" -> ")[1])
    proc = psutil.Process(new)
    lb._known[new] = proc  # teardown: it lives in the old instance's process group
    assert lb.wait_exit(40) == 0

    def successor_workers():
        kids = [k for k in proc.children() if k.status() != psutil.STATUS_ZOMBIE]
        return kids if len(kids) == 2 else None

    for w in wait_until(successor_workers, 20, "the successor's 2 workers"):
        lb._known[w.pid] = w
        _assert_dropped(w.pid)
    assert ControlClient(str(lb.dir / "control.sock")).status()["pid"] == new
    assert all(_greets(lb.addr) for _ in range(4))


def test_user_alone_takes_its_primary_group(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], global_={"user": "nobody"})
    ids = _ids(lb.the_worker().pid)
    assert ids["Uid"][0] == str(NOBODY.pw_uid) and ids["Gid"][0] == str(NOBODY.pw_gid)
    assert ids["Groups"] == [str(NOBODY.pw_gid)]
    assert _greets(lb.addr)


def test_unknown_user_or_group_is_a_config_error(tmp_path):
    base = '[listeners.l]\nbind = "127.0.0.1:1"\npool = "p"\n[pools.p]\nbackends = [{ name = "a", address = "127.0.0.1:2" }]\n'
    for key, value in (("user", "no-such-user-xyz"), ("group", "no-such-group-xyz")):
        cfg = tmp_path / f"{key}.toml"
        cfg.write_text(f'[global]\n{key} = "{value}"\n' + base)
        r = cli("check-config", str(cfg))
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert f"global.{key}" in r.stderr and value in r.stderr and f"unknown {key}" in r.stderr
