"""docs/deployments.md, "Automated deployments": every documented `fastlb` command line parses (it
reaches the control socket: exit 1 "cannot reach fastlb", never a usage error, exit 2), and the
documented [rollouts.NAME] table validates; the "Rolling updates" commands run against the section's
config and print what the page shows.  The behaviour behind them is tested end to end in
test_deploy_e2e.py, test_rolling_update.py and test_statefile.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fastlb.config import parse_config
from support.backends import server
from support.fastlb import FastLB

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deployments.md"


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


def rolling_section() -> str:
    text = section()
    start = text.index("## Rolling updates")
    return text[start : text.index("\n## ", start + 1)]


def documented_runs() -> list[tuple[list[str], list[str]]]:
    """(argv, documented output lines) for each command of "Rolling updates"; a comment line is
    output up to two spaces (a note follows them), and `...` stands for lines left out."""
    runs: list[tuple[list[str], list[str]]] = []
    for block in re.findall(r"```sh\n(.*?)```", rolling_section(), re.S):
        for line in block.splitlines():
            if not line.startswith("#"):
                runs.append((shlex.split(line), []))
            elif out := re.split(r"\s{2,}", line[2:].rstrip())[0]:
                runs[-1][1].append(out)
    return runs


def normalised(lines: list[str]) -> list[str]:
    """Lines with what differs from run to run written as the page writes it: the documented
    10.0.0.X hosts run on their loopback twins 127.0.0.X, durations vary, and which fastlb ran."""
    out = []
    for line in lines:
        line = re.sub(r"\b127\.0\.0\.(\d+)\b", r"10.0.0.\1", line)
        line = re.sub(r"\bin \d+\.\d+s$", "in 41.2s", line)
        line = re.sub(r"using fastlb \S+ from \S+ \(.*\)$", "using fastlb VERSION from PYTHON (WHY)", line)
        out.append(line)
    return out


def test_rolling_update_commands_run_against_the_documented_config(tmp_path, backends) -> None:
    runs = documented_runs()
    assert [a[0] for a, _ in runs] == ["fastlb", "systemctl", "fastlb", "fastlb", "scripts/rolling-update"]
    toml = re.search(r"```toml\n(.*?)```", section(), re.S).group(1)
    names = re.findall(r'\{ name = "([^"]+)", address = "10\.0\.0\.(\d+):\d+" \}', toml)
    b = backends(*(server(n, "id", host=f"127.0.0.{last}") for n, last in names))
    for n, last in names:
        toml = re.sub(rf'"10\.0\.0\.{last}:\d+"', f'"{b.address(n)}"', toml)
    parse_config(toml)
    bin_dir = tmp_path / "bin"  # `ssh HOST CMD` of the replace command: succeeds and says where it went
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\necho "$@" >>{tmp_path}/ssh.log\n')
    (bin_dir / "ssh").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable)
    lb = FastLB(tmp_path / "lb", [], workers=1, raw=toml)
    try:
        lb.start()
        for argv, expected in runs:
            if argv[0] == "systemctl":
                continue
            i = argv.index("-c")
            argv[i : i + 2] = ["--socket", str(lb.dir / "control.sock")]
            cmd = (
                [sys.executable, "-m", "fastlb", *argv[1:]]
                if argv[0] == "fastlb"
                else [ROOT / argv[0], *argv[1:]]
            )
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
            )
            assert r.returncode == 0, (argv, r.stdout, r.stderr)
            got = normalised(r.stderr.splitlines() + r.stdout.splitlines())
            expected = normalised(expected)
            if "..." in expected:
                cut = expected.index("...")
                head, tail = expected[:cut], expected[cut + 1 :]
                assert got[:cut] == head and got[len(got) - len(tail) :] == tail, (argv, got)
            else:
                assert got == expected, (argv, got)
    finally:
        lb.stop()
    assert (tmp_path / "ssh.log").read_text().splitlines() == [
        "127.0.0.11 systemctl restart app",
        "127.0.0.12 systemctl restart app",
    ]
