"""What a Python user writes (bench/asyncio_proxy.py): asyncio.start_server, round robin, N workers =
N processes with SO_REUSEPORT."""

from __future__ import annotations

import sys

from common import HERE, LOOPBACK

NAME = "asyncio"
LABEL = "asyncio proxy"
ORDER = 40
BALANCER = True


def command(suite, workers: int, ports: dict[str, int], run, env: dict[str, str]) -> list[str]:
    argv = [sys.executable, str(HERE / "asyncio_proxy.py"), "--workers", str(workers)]
    for pool, port in ports.items():
        backends = ",".join(f"{LOOPBACK}:{p}" for p in suite.bp[pool])
        argv += ["--route", f"{LOOPBACK}:{port}={backends}"]
    return argv
