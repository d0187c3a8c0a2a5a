"""fastlb (configs/fastlb.toml.tmpl): `fastlb serve --workers N`, round_robin pools, no health checks;
readiness through sd_notify (NOTIFY_SOCKET pointing at a datagram socket of the driver, READY=1).

Which fastlb: $FASTLB_BIN (scripts/bench sets it, from scripts/lib/find-fastlb.sh), else the `fastlb`
beside the interpreter running the benchmark (a venv's bin/), else `python -m fastlb` with that
interpreter; never whatever `fastlb` is first on PATH."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from common import LOOPBACK, render_template, wait_notify

NAME = "fastlb"
LABEL = "fastlb"
ORDER = 50
BALANCER = True


def fastlb_argv() -> list[str]:
    """The command that runs the fastlb under test (see the module docstring)."""
    if os.environ.get("FASTLB_BIN"):
        return [os.environ["FASTLB_BIN"]]
    beside = Path(sys.executable).parent / "fastlb"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "fastlb"]


def command(suite, workers: int, ports: dict[str, int], run, env: dict[str, str]) -> list[str]:
    sections = []
    for pool, port in ports.items():
        sections.append(
            f'[listeners.{pool}]\nbind = "{LOOPBACK}:{port}"\npool = "{pool}"\nidle_timeout = "10m"\n'
        )
    for pool in ports:
        servers = "\n".join(
            f'  {{ name = "b{i}", address = "{LOOPBACK}:{p}" }},' for i, p in enumerate(suite.bp[pool])
        )
        sections.append(f'[pools.{pool}]\nalgorithm = "round_robin"\nbackends = [\n{servers}\n]\n')
    cfg = render_template(
        "fastlb.toml.tmpl", suite.rundir / "fastlb.toml", rundir=suite.rundir, sections="\n".join(sections)
    )
    notify_path = suite.rundir / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    run.extra.append(notify)
    env["NOTIFY_SOCKET"] = str(notify_path)
    return [*fastlb_argv(), "serve", "-c", str(cfg), "--workers", str(workers)]


def ready(run) -> None:
    wait_notify(run.extra[0], run.proc, run.log_path)
