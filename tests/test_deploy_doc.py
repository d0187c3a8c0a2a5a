"""docs/deployments.md, "Automated deployments": every documented `fastlb` command line parses (it
reaches the control socket: exit 1 "cannot reach fastlb", never a usage error, exit 2), and the
documented [rollouts.NAME] table validates.  The behaviour behind them is tested end to end in
test_deploy_e2e.py, test_rolling_update.py and test_statefile.py."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fastlb.config import parse_config

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployments.md"


def section() -> str:
    text = DOC.read_text()
    return text[text.index("## Automated deployments") :]


def commands() -> list[list[str]]:
    out = []
    for block in re.findall(r"```sh\n(.*?)```", section(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("fastlb "):
                out.append(shlex.split(line)[1:])
    return out


def test_the_recipes_are_there() -> None:
    verbs = {tuple(a[:2]) if a[0] == "rollout" else (a[0],) for a in commands()}
    assert {("rollout", v) for v in ("start", "status", "pause", "resume", "promote", "abort")} <= verbs
    assert {("switch",), ("drain",), ("wait",), ("enable",)} <= verbs


@pytest.mark.parametrize("argv", commands(), ids=lambda a: " ".join(a)[:40])
def test_documented_command_parses(tmp_path, argv: list[str]) -> None:
    sock = str(tmp_path / "none.sock")
    args = [a for a in argv]
    i = args.index("-c")
    args[i : i + 2] = ["--socket", sock]
    r = subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach fastlb" in r.stderr, (argv, r.returncode, r.stderr)


def test_documented_rollouts_table_validates() -> None:
    table = re.search(r"```toml\n(\[rollouts\..*?)```", section(), re.S).group(1)
    head = (
        '[listeners.web]\nbind = "127.0.0.1:8080"\n[[listeners.web.routes]]\nname = "default"\n'
        'backends = [{ pool = "v1", weight = 100 }, { pool = "v2", weight = 0 }]\n'
        '[pools.v1]\nbackends = [{ name = "a", address = "127.0.0.1:9001" }]\n'
        '[pools.v2]\nbackends = [{ name = "b", address = "127.0.0.1:9002" }]\n'
    )
    cfg = parse_config(head + table)
    opts = cfg.rollouts["web-v2"].as_dict()
    assert (opts["to"], opts["steps"], opts["max_failure_rate"], opts["max_connect_time"]) == (
        "v2",
        (5, 10, 25, 50, 100),
        0.01,
        0.05,
    )
