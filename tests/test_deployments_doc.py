"""docs/deployments.md is true: each recipe's configuration runs (with its backends replaced by local
ones that greet with their names), each documented `fastlb set-split` command prints exactly the
documented output, and after it the connections land where the new split says.

(tests/test_docs.py already check-configs every TOML block of the page.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastlb.config import parse_config
from support.backends import server
from support.clients import cli, count_backends
from support.fastlb import FastLB

DOC = Path(__file__).resolve().parent.parent / "docs" / "deployments.md"
BACKEND_RE = re.compile(r'\{ name = "([^"]+)", address = "([^"]+)" \}')


def recipes() -> list[tuple[str, str, list[tuple[list[str], str]]]]:
    """(section title, TOML, [(set-split argv, documented output)]) for each section whose TOML
    block is followed by a console block of set-split commands."""
    out = []
    for section in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title = section.splitlines()[0]
        toml = re.search(r"```toml\n(.*?)```", section, re.S)
        console = re.search(r"```console\n(.*?)```", section, re.S)
        if not toml or not console:
            continue
        commands = []
        lines = console.group(1).splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ fastlb set-split "):
                argv = line[2:].split()[1:]
                commands.append((argv, lines[i + 1]))
        out.append((title, toml.group(1), commands))
    return out


def test_the_page_has_the_three_recipes() -> None:
    titles = [t for t, _, cmds in recipes() if cmds]
    assert titles == ["Blue-green", "Canary", "A/B by client group"]


@pytest.mark.parametrize(
    ("title", "toml", "commands"), [r for r in recipes() if r[2]], ids=lambda v: str(v)[:20]
)
def test_documented_commands(tmp_path, backends, title: str, toml: str, commands: list) -> None:
    names = BACKEND_RE.findall(toml)
    b = backends(*(server(n, "id") for n, _ in names))
    for n, address in names:
        toml = toml.replace(f'address = "{address}"', f'address = "{b.address(n)}"', 1)
    cfg = parse_config(toml)
    pool_of = {bc.name: pc.name for pc in cfg.pools.values() for bc in pc.backends}
    lb = FastLB(tmp_path / "lb", [], workers=2, raw=toml)
    try:
        lb.start()
        for argv, expected in commands:
            argv = [a for a in argv if a not in ("-c", "/etc/fastlb/fastlb.toml")]
            proc = cli("set-split", "--socket", str(lb.dir / "control.sock"), *argv[1:])
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.strip() == expected, (title, argv)
            route = argv[2]
            if route != "default":
                continue  # the test client (127.0.0.1) matches no other route
            split = {p: int(w) for p, w in (a.split("=") for a in argv[3:])}
            counts = count_backends(lb.addr, 200)
            used = {pool_of[n] for n in counts}
            assert used <= {p for p, w in split.items() if w > 0}, (argv, counts)
            if sum(1 for w in split.values() if w > 0) == 1:
                assert len(used) == 1
    finally:
        lb.stop()
