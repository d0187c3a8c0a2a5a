"""`fastlb demo`, the README's first command, works and shows the 5:3:2 split."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_splits_by_weight() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fastlb", "demo", "--seconds", "1.5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    shares = {
        m.group(1): float(m.group(3))
        for m in re.finditer(r"^\s+(\w): +(\d+) connections +([\d.]+)%", r.stdout, re.M)
    }
    assert set(shares) == {"a", "b", "c"}, r.stdout
    assert abs(shares["a"] - 50) < 2 and abs(shares["b"] - 30) < 2 and abs(shares["c"] - 20) < 2, shares
    m = re.search(
        r"clients: (\d+) echoed correctly, 0 wrong bytes, 0 failed; fastlb exited with code 0", r.stdout
    )
    assert m and int(m.group(1)) > 100, r.stdout
