"""The documentation's examples are true: README/docs TOML blocks validate, the documented
shared-memory sizes are the compiled ones, and the README's commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastlb import _shm, shm

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def toml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in DOCS:
        for i, m in enumerate(re.finditer(r"```toml\n(.*?)```", doc.read_text(), re.S)):
            if "[listeners." in m.group(1):  # complete configs only (fragments show single tables)
                blocks.append((f"{doc.name}#{i}", m.group(1)))
    return blocks


@pytest.mark.parametrize(("where", "text"), toml_blocks(), ids=[w for w, _ in toml_blocks()])
def test_documented_config_validates(tmp_path: Path, where: str, text: str) -> None:
    cfg = tmp_path / "example.toml"
    cfg.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "fastlb", "check-config", str(cfg)], capture_output=True, text=True
    )
    assert r.returncode == 0, f"{where}: {r.stderr}"
    assert "OK" in r.stdout


def test_readme_has_complete_example() -> None:
    assert any(w.startswith("README.md") for w, _ in toml_blocks())


def test_layout_sizes_match_docs() -> None:
    shm.check_layout()
    text = (ROOT / "docs" / "shared-memory.md").read_text()
    for record, size in _shm.RECORD_SIZES.items():
        name = "flb_" + record + "_t"
        assert re.search(rf"{name}(\[[^\]]*\])?\s+{size} B", text), f"{name} size {size} not documented"


def test_region_header_self_describes() -> None:
    r = _shm.Region(1, 1, 4, 2, [0])
    h = r.header()
    assert h["magic"] == _shm.MAGIC and h["layout_version"] == _shm.LAYOUT_VERSION
    assert (h["listener_size"], h["pool_size"], h["backend_size"], h["worker_size"]) == (704, 320, 512, 384)
    assert (h["route_size"], h["cidr_size"], h["sni_size"]) == (448, 32, 320)
    assert (
        h["listeners_off"]
        < h["pools_off"]
        < h["backends_off"]
        < h["workers_off"]
        < h["tables_off"]
        <= h["total_size"]
    )
    r.close()


def test_version_and_help() -> None:
    r = subprocess.run([sys.executable, "-m", "fastlb", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastlb" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastlb", "--help"], capture_output=True, text=True)
    for cmd in (
        "serve",
        "check-config",
        "status",
        "set-weight",
        "drain",
        "enable",
        "disable",
        "set-split",
        "demo",
    ):
        assert cmd in r.stdout
