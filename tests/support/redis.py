"""A real redis-server (Debian's redis-server package) on a free loopback port, for tests of fastlb
in front of Redis; redis-cli and redis-benchmark (redis-tools) drive it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .helpers import connect_refused, free_port, wait_until

AVAILABLE = shutil.which("redis-server") is not None


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """Run redis-server (no persistence, its files in workdir) until the block ends; yields its port."""
    port = free_port()
    with open(workdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: not connect_refused(("127.0.0.1", port)), 10, "redis-server listening")
            yield port
        finally:
            proc.kill()
            proc.wait(5)


def redis_cli(port: int, *args: str) -> str:
    """`redis-cli -p PORT ARGS...`'s output (raises on a non-zero exit)."""
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout.strip()
