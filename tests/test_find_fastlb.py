"""Which fastlb the scripts run (scripts/lib/find-fastlb.sh), on a host where Debian's python3 has none:
PATH is a stock root shell's, fastlb is only in a venv made as README command 1 makes it (or behind a
/usr/local/bin/fastlb, or nowhere).  Every script says in one line which fastlb it uses, or that there
is none; the benchmark never skips fastlb silently."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastlb import __version__
from support.install import REPO, linked_checkout, script_env

# each script that runs fastlb, with arguments that only make it show its usage
SCRIPTS = {
    "scripts/rolling-update": ["--help"],
    "scripts/bench": ["--help"],
    "scripts/fleet-demo": [],
}


def run_script(checkout: Path, script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = dict(env, FASTLB_BENCH_SKIP_INSTALL="1")  # scripts/bench: no apt, no build
    return subprocess.run(
        [checkout / script, *(args or SCRIPTS[script])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd="/",
        stdin=subprocess.DEVNULL,
    )


def used(script: str, venv: Path, why: str) -> str:
    return f"{script}: using fastlb {__version__} from {venv}/bin/python ({why})"


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_fastlb_anywhere_is_one_line_saying_how_to_get_one(tmp_path, script):
    checkout = linked_checkout(tmp_path / "checkout")
    r = run_script(checkout, script, script_env(PYTHON="python3"))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        f"{script}: no fastlb found (FASTLB_VENV unset, no {checkout}/.venv, no "
        "/nonexistent/usr/local/bin/fastlb, none on PATH): run scripts/venv .venv (README command 1) "
        "or scripts/install, or set FASTLB_VENV=DIR"
    ], r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script(checkout, script, script_env(FASTLB_VENV=str(empty)))
    assert r.returncode != 0
    assert r.stderr.splitlines() == [
        f"{script}: FASTLB_VENV={empty} holds no fastlb (make one: scripts/venv {empty})"
    ]


def test_the_scripts_run_fastlb_only_through_the_shared_snippet():
    runs_fastlb = re.compile(r"-m fastlb\b|\bfastlb (demo|serve)\b|FASTLB_(PYTHON|BIN)")
    for path in sorted((REPO / "scripts").iterdir()):
        if not path.is_file() or path.name in ("venv", "install", "test") or path.suffix:
            continue  # these create a venv; they do not look for one
        text = path.read_text()
        if runs_fastlb.search(text):
            assert "scripts/lib/find-fastlb.sh" in text, path.name
            assert "python3 -m" not in text and "${PYTHON:-python3}" not in text, path.name


def test_make_targets_use_the_venv_never_the_system_python():
    r = subprocess.run(
        ["make", "-n", "build", "debug", "lint", "demo"],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=REPO,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4  # build (also demo's), debug, lint, demo
    for line in lines:
        assert line.startswith(". scripts/lib/find-fastlb.sh && "), line
        assert "python3" not in line and "pip " not in line, line
    assert sum('scripts/venv "$(fastlb_venv_dir)"' in line for line in lines) == 2
    assert lines[2].endswith('"$FASTLB_PYTHON" -m ruff format --check src tests bench')
    assert lines[3] == '. scripts/lib/find-fastlb.sh && fastlb_find make && "$FASTLB_BIN" demo'


def test_bench_refuses_to_run_without_fastlb_before_measuring(tmp_path):
    raw = REPO / "bench/results/raw"
    before = set(raw.iterdir()) if raw.exists() else set()
    r = subprocess.run(
        [sys.executable, REPO / "bench/compare.py", "run", "--quick", "--no-publish"],
        capture_output=True,
        text=True,
        env=dict(os.environ, FASTLB_BIN=str(tmp_path / "no-fastlb")),
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.splitlines()
    assert line.endswith(
        f"fastlb does not run ({tmp_path}/no-fastlb serve --help: [Errno 2] No such file or directory:"
        f" '{tmp_path}/no-fastlb'): build it (scripts/venv .venv) or point FASTLB_BIN at it;"
        " to measure without it: --targets direct,haproxy,nginx,asyncio"
    ), line
    assert (set(raw.iterdir()) if raw.exists() else set()) == before  # nothing was measured


@pytest.mark.slow
def test_scripts_use_the_venv_in_fastlb_venv(tmp_path, debian_venv):
    checkout = linked_checkout(tmp_path / "checkout")
    # PYTHON as scripts/test and scripts/venv use it (the interpreter that makes venvs): not a fastlb
    env = script_env(FASTLB_VENV=str(debian_venv), PYTHON="/usr/bin/python3")
    r = run_script(checkout, "scripts/rolling-update", env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: rolling-update")
    assert r.stderr.splitlines() == [used("scripts/rolling-update", debian_venv, "FASTLB_VENV")]
    r = run_script(checkout, "scripts/bench", env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: compare.py run")
    assert r.stderr.splitlines() == [used("scripts/bench", debian_venv, "FASTLB_VENV")]


@pytest.mark.slow
def test_scripts_use_the_checkouts_venv_then_the_installed_fastlb(tmp_path, debian_venv):
    checkout = linked_checkout(tmp_path / "checkout")
    (checkout / ".venv").symlink_to(debian_venv)  # README command 1 in that checkout
    for script in ("scripts/rolling-update", "scripts/bench"):
        r = run_script(checkout, script, script_env())
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines() == [used(script, checkout / ".venv", "the checkout's .venv")]
    (checkout / ".venv").unlink()
    installed = tmp_path / "usr/local/bin/fastlb"  # as scripts/install links it into its venv
    installed.parent.mkdir(parents=True)
    installed.symlink_to(debian_venv / "bin/fastlb")
    r = run_script(checkout, "scripts/rolling-update", script_env(FASTLB_INSTALLED=str(installed)))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [used("scripts/rolling-update", debian_venv, str(installed))]


@pytest.mark.slow
def test_bench_measures_the_venvs_fastlb_not_one_on_path(debian_venv):
    # the PYTHON=.venv/bin/python: the fastlb target is the venv's, though none is on PATH
    probe = (
        "import sys; sys.path.insert(0, 'bench'); import compare; "
        "print(compare.fastlb_argv()); print(compare.fastlb_unavailable())"
    )
    r = subprocess.run(
        [debian_venv / "bin/python", "-c", probe],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str([f"{debian_venv}/bin/fastlb"]), "None"]


@pytest.mark.slow
def test_make_demo_runs_the_venvs_fastlb(debian_venv):
    r = subprocess.run(
        ["make", "-s", "-o", "build", "demo"],  # -o build: the venv is made already
        capture_output=True,
        text=True,
        env=script_env(FASTLB_VENV=str(debian_venv)),
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.splitlines()[0] == used("make", debian_venv, "FASTLB_VENV")
    assert re.search(r"0 wrong bytes, 0 failed; fastlb exited with code 0", r.stdout), r.stdout
