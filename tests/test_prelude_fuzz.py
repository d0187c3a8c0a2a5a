"""A bounded libFuzzer run of the prelude parsers under ASan/UBSan (scripts/fuzz), when clang is here.

The long run (>= 1,000,000 inputs per parser) is recorded in docs/routing-preludes.md; this one keeps
the harnesses building and catches a regression quickly.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clang_can_fuzz(tmp_path) -> bool:
    if shutil.which("clang") is None:
        return False
    src = tmp_path / "probe.c"
    src.write_text(
        "#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { return 0; }\n"
    )
    r = subprocess.run(
        ["clang", "-fsanitize=fuzzer,address", str(src), "-o", str(tmp_path / "probe")], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.parametrize("target", ["proxy", "sni"])
def test_fuzz_bounded(target: str, tmp_path) -> None:
    if not _clang_can_fuzz(tmp_path):
        pytest.skip("clang with libFuzzer (clang, libclang-rt-14-dev) is not installed")
    r = subprocess.run(
        [os.path.join(ROOT, "scripts", "fuzz"), "30000", target],
        cwd=ROOT,
        env={**os.environ, "FUZZ_OUT": str(tmp_path / "out")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Done 30000 runs" in r.stderr
