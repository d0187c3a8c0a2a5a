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
from support.clients import count_backends
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
