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


def test_shared_memory_doc_names_the_headers_layout_version() -> None:
    header = (ROOT / "src/fastlb/includes/shm_layout.h").read_text()
    version = int(re.search(r"#define FLB_LAYOUT_VERSION (\d+)u", header).group(1))
    assert version == _shm.LAYOUT_VERSION
    text = (ROOT / "docs" / "shared-memory.md").read_text()
    assert text.splitlines()[0] == f"# The shared-memory layout (version {version})"
    assert re.search(rf"^\| layout_version \| u32 \| {version};", text, re.M), "layout_version row"


def documented_keys(doc: str, heading: str) -> set[str]:
    """The keys in the first column of every table under `heading`, up to the next `## ` heading."""
    text = (ROOT / "docs" / doc).read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    rows = [line.split("|")[1] for line in text[start:end].splitlines() if line.startswith("| `")]
    return {key for cell in rows for key in re.findall(r"`([a-z_]+)`", cell)}


@pytest.mark.parametrize(
    ("heading", "keys"),
    [
        ("## `[global]` (optional)", "_GLOBAL_KEYS"),
        ("## `[listeners.NAME]` (at least 1, at most 64)", "_LISTENER_KEYS"),
        ("## `[pools.NAME]` (at most 64; a pool no listener uses is allowed)", "_POOL_KEYS"),
    ],
)
def test_config_reference_lists_every_key_the_loader_accepts(heading: str, keys: str) -> None:
    from fastlb.config import loader

    missing = set(getattr(loader, keys)) - documented_keys("config.md", heading)
    assert not missing, f"docs/config.md {heading} does not list {sorted(missing)}"


def test_fleet_doc_lists_every_discover_key() -> None:
    from fastlb.config.fleet import DISCOVER_KEYS

    text = (ROOT / "docs" / "fleet.md").read_text()
    section = text[text.index("## DNS service discovery") : text.index("## The admin API")]
    missing = [k for k in DISCOVER_KEYS if f"`{k}`" not in section]
    assert not missing, f"docs/fleet.md's DNS service discovery does not name {missing}"


def test_documented_command_lines_name_an_interpreter_that_has_fastlb() -> None:
    """A stock Debian host has no `python`, and its `python3` has no fastlb (nor pip, PEP 668): a
    command line in the docs runs `.venv/bin/python ...`, `scripts/...` or `make ...`."""
    docs = [*DOCS, ROOT / "bench" / "README.md", ROOT / "BENCHMARKS.md"]
    # at the start of inline code, of a shell line, or after `$ `; not `python -I -S` (the workers'
    # flags) nor a bare `pip install` (what Debian refuses)
    bare = re.compile(r"(?:`|^|\$ )((?:python3?|pytest|pip3?) (?!-I |install`))", re.M)
    found = [
        f"{doc.relative_to(ROOT)}:{n}: {line.strip()}"
        for doc in docs
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert found == []


def test_fastlb_is_described_as_serving_tcp_and_udp() -> None:
    what = "Layer-4 (TCP and UDP) load balancer"
    r = subprocess.run([sys.executable, "-m", "fastlb", "--help"], capture_output=True, text=True)
    assert f"fastlb: a {what} (" in r.stdout, r.stdout
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^description = "{re.escape(what)}: ', pyproject, re.M)
    unit = (ROOT / "scripts" / "fastlb.service").read_text()
    assert f"\nDescription=fastlb {what}\n" in unit
    assert unit.startswith(f"# systemd unit for fastlb, the {what}.\n")
    assert "TCP load balancer" not in r.stdout + pyproject + unit
