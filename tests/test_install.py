"""Installing on a stock Debian 12: the README's first command with Debian's own /usr/bin/python3
(PEP 668 refuses pip outside a venv), and scripts/install's layout for a host.

fastlb is compiled once per session into a wheel by Debian's python3 (fixture debian_wheel); the
tests install that wheel (FASTLB_WHEEL) instead of compiling it again."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from support.install import DEBIAN_PY, REPO, debian_env, run_install


def readme_command_1() -> str:
    m = re.search(r"^# 1\..*\n(.+)$", (REPO / "README.md").read_text(), re.M)
    assert m, "README has no command 1"
    return m.group(1).strip()


@pytest.mark.slow
def test_readme_command_1_with_debian_python(tmp_path, debian_wheel):
    assert readme_command_1() == "scripts/venv .venv && .venv/bin/fastlb demo"
    # why the venv: Debian's interpreter refuses to install into the system (PEP 668)
    refused = subprocess.run(
        [DEBIAN_PY, "-m", "pip", "install", "--dry-run", "--no-deps", "click"],
        capture_output=True,
        text=True,
        env=debian_env(),
    )
    assert refused.returncode != 0, "Debian's python3 installed into the system site-packages?"
    venv = tmp_path / "venv"
    command = readme_command_1().replace(".venv", str(venv)) + " --seconds 1"
    r = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=debian_env(FASTLB_WHEEL=str(debian_wheel)),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"0 wrong bytes, 0 failed; fastlb exited with code 0", r.stdout), r.stdout
    where = subprocess.run(
        [venv / "bin/python", "-c", "import sys, fastlb; print(sys.base_prefix, fastlb.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0] == "/usr" and where[1].startswith(str(venv)), where


@pytest.mark.slow
def test_scripts_install_layout(installed_root, debian_wheel):
    root = installed_root
    assert os.readlink(root / "usr/local/bin/fastlb") == "/opt/fastlb/bin/fastlb"
    assert os.access(root / "opt/fastlb/bin/fastlb", os.X_OK)
    unit = root / "etc/systemd/system/fastlb.service"
    assert unit.read_bytes() == (REPO / "scripts/fastlb.service").read_bytes()
    config = root / "etc/fastlb/fastlb.toml"
    assert config.read_bytes() == (REPO / "scripts/fastlb.example.toml").read_bytes()
    assert config.stat().st_mode & 0o777 == 0o644
    check = subprocess.run(
        [root / "opt/fastlb/bin/fastlb", "check-config", config], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # a second run upgrades in place and keeps the operator's config
    edited = config.read_text() + "\n# edited by the operator\n"
    config.write_text(edited)
    r = run_install(root, debian_wheel)
    assert r.returncode == 0, r.stdout + r.stderr
    assert config.read_text() == edited


@pytest.mark.slow
def test_scripts_install_with_destdir_names_the_staged_paths(tmp_path, debian_wheel):
    root = tmp_path / "root"
    r = run_install(root, debian_wheel)
    assert r.returncode == 0, r.stdout + r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("scripts/install: ")]
    assert said == [
        f"scripts/install: wrote the example config to {root}/etc/fastlb/fastlb.toml: edit it",
        f"scripts/install: staged under {root}: {root}/opt/fastlb, {root}/usr/local/bin/fastlb,"
        f" {root}/etc/systemd/system/fastlb.service, {root}/etc/fastlb/fastlb.toml",
    ]
    assert (root / "etc/fastlb/fastlb.toml").is_file() and (root / "opt/fastlb/bin/fastlb").is_file()
