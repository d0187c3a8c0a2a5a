"""`fastlb top` through a real terminal: tmux at 80x24 runs it against a fastlb under load; the
captured screen must show every backend with non-zero rates, and `q` must end it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from support.backends import server
from support.clients import cli, count_backends
from support.helpers import Deadline, wait_until

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")


class Tmux:
    """A private tmux server (its own socket) with one 80x24 session running `command`."""

    def __init__(self, socket_path: str, command: list[str]) -> None:
        self.base = [TMUX, "-S", socket_path]
        self.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "24", " ".join(command))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top").returncode == 0

    def kill(self) -> None:
        self.run("kill-server")


def test_top_shows_backends_and_rates_in_80x24_and_q_quits(backends, fastlb, tmp_path):
    b = backends(*(server(n, "id") for n in "abc"))
    lb = fastlb([(n, b.address(n), w) for n, w in zip("abc", (5, 3, 2), strict=True)], workers=2)
    sock = str(lb.dir / "control.sock")
    stop = threading.Event()

    def load() -> None:  # bounded: at most 40 s, 60 connections a round
        deadline = Deadline(40)
        while not stop.is_set() and not deadline.expired():
            count_backends(lb.addr, 60, concurrency=8)
            time.sleep(0.05)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    tmux = Tmux(
        str(tmp_path / "tmux.sock"),
        [sys.executable, "-m", "fastlb", "top", "--socket", sock, "--interval", "0.5"],
    )
    try:

        def rates_shown() -> str | None:
            screen = tmux.screen()
            rows = {
                m.group(1): m
                for m in re.finditer(
                    r"^\s*web/([abc])\s+up\s+(\d+)\s+(\d+)\s+([\d.]+k?)\s+(\S+)", screen, re.M
                )
            }
            if set(rows) == {"a", "b", "c"} and all(float(m.group(4).rstrip("k")) > 0 for m in rows.values()):
                return screen
            return None

        screen = wait_until(
            rates_shown, 30, lambda: f"top shows a, b, c with rates; screen:\n{tmux.screen()}"
        )
        lines = screen.splitlines()
        assert len(lines) <= 24 and max(len(line) for line in lines) <= 80, screen
        assert "fastlb top" in screen and "workers 2/2" in screen
        assert re.search(r"^\s*web\s+127\.0\.0\.1:\d+\s+-> web", screen, re.M), screen
        tmux.run("send-keys", "-t", "top", "q")
        wait_until(lambda: not tmux.alive(), 10, lambda: f"top exits on q; screen:\n{tmux.screen()}")
    finally:
        stop.set()
        tmux.kill()
        t.join(60)


def test_top_shows_every_route_split_with_its_connections_and_the_rollout(backends, fastlb, tmp_path):
    """Issue 19 item 5: a routed listener shows each pool of the split with its weight now and the
    connections the route sent there (not "-> first pool"), and the rollout in progress."""
    b = backends(server("v1a", "id"), server("v2a", "id"))
    lb = fastlb(
        [("v1a", b.address("v1a"), None)],
        workers=1,
        listener={"pool": None},
        extra=f'[pools.v2]\nbackends = [{{ name = "v2a", address = "{b.address("v2a")}" }}]\n'
        '[[listeners.web.routes]]\nname = "default"\n'
        'backends = [{ pool = "web", weight = 100 }, { pool = "v2", weight = 0 }]\n',
    )
    sock = str(lb.dir / "control.sock")
    r = cli("rollout", "start", "web", "default", "--to", "v2", "--interval", "5m", "--socket", sock)
    assert r.returncode == 0, r.stderr
    assert sum(count_backends(lb.addr, 40, concurrency=4).values()) == 40
    tmux = Tmux(
        str(tmp_path / "tmux.sock"),
        [sys.executable, "-m", "fastlb", "top", "--socket", sock, "--interval", "0.5"],
    )
    try:
        pattern = re.compile(r"^\s+default\*: web=95\((\d+)\) v2=5\((\d+)\)\s*$", re.M)
        screen = wait_until(
            lambda: (s := tmux.screen()) and pattern.search(s) and s,
            20,
            lambda: f"top shows the route's split; screen:\n{tmux.screen()}",
        )
        m = pattern.search(screen)
        assert int(m.group(1)) + int(m.group(2)) == 40, screen
        assert re.search(rf"^\s*web\s+127\.0\.0\.1:{lb.port}\s+0\s", screen, re.M), screen  # no "-> web"
        assert "rollout web-default web/default web -> v2: progressing at 5%" in screen, screen
    finally:
        tmux.kill()


def test_top_without_a_terminal_says_so_and_exits_1(backends, fastlb):
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), None)], workers=1)
    r = cli("top", "--socket", str(lb.dir / "control.sock"), timeout=15)
    assert (r.returncode, r.stdout) == (1, ""), (r.returncode, r.stdout)
    assert r.stderr == (
        "fastlb top: stdout is not a terminal (it draws a live view); "
        "use `fastlb status` or `fastlb status --json` instead\n"
    )
