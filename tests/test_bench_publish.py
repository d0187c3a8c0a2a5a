"""bench/compare.py's last step (report.publish) after a whole run: the JSON and BENCHMARKS.md are
written first, the chart only when matplotlib is importable, and its absence is one line, not a
traceback that throws the measurements away."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

PUBLISH = """
import json, sys
from pathlib import Path
if sys.argv[2] == "without":
    sys.modules["matplotlib"] = None  # as on a host without it: `import matplotlib` raises ImportError
sys.path.insert(0, {bench!r})
from report import publish
from stats import evaluate_goals
summary = json.loads(Path({bench!r}, "results", "latest.json").read_text())
summary["goals"] = evaluate_goals(summary)
publish(summary, Path(sys.argv[1]), publish_top=False)
"""


def publish(out: Path, matplotlib: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PUBLISH.format(bench=str(BENCH)), str(out), matplotlib],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_matplotlib_the_json_and_the_tables_are_written_and_one_line_says_no_chart(tmp_path):
    r = publish(tmp_path, "without")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "summary.json"]
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| " in md and "ratios.png" not in md  # the tables, and no link to a chart that is not there
    (line,) = r.stderr.splitlines()
    assert "no ratio chart (" in line and "matplotlib" in line, line
    assert line.endswith("): the JSON and BENCHMARKS.md are written; pip install matplotlib for it"), line


def test_with_matplotlib_the_chart_is_drawn_too(tmp_path):
    pytest.importorskip("matplotlib")
    r = publish(tmp_path, "with")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md", "ratios.png", "summary.json"]
    assert "![ratios to HAProxy](ratios.png)" in (tmp_path / "BENCHMARKS.md").read_text()
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
