"""Fixtures for the end-to-end tests: backend processes and `fastlb serve` processes, always cleaned up.

`backends(server(...), ...)` starts one backend process; `fastlb(backends=[...], ...)` starts
`fastlb serve` and returns once it sent READY=1.  Both are SIGKILLed at teardown if still running,
and their logs are attached to the report of a failing test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import support` from any rootdir

from support.backends import Backends  # noqa: E402
from support.fastlb import FastLB  # noqa: E402


def _logs(item) -> list:
    if not hasattr(item, "_flb_logs"):
        item._flb_logs = []
    return item._flb_logs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for title, source in _logs(item):
            text = source()
            if text:
                report.sections.append((title, text))


@pytest.fixture
def backends(tmp_path, request):
    """Factory: backends(server("a", "id"), server("b", "echo")) -> a started Backends."""
    started: list[Backends] = []

    def start(*servers: dict) -> Backends:
        b = Backends(list(servers), tmp_path / f"backends{len(started)}.log")
        started.append(b)
        _logs(request.node).append((f"backend process #{len(started)} log", b.log_text))
        return b.start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def fastlb(tmp_path, request):
    """Factory: fastlb(backends=[(name, address, weight)], workers=N, listener={...}, ...) -> a
    FastLB that has sent READY=1."""
    started: list[FastLB] = []

    def start(backends, **kw) -> FastLB:
        lb = FastLB(tmp_path / f"lb{len(started)}", backends, **kw)
        started.append(lb)
        _logs(request.node).append((f"fastlb #{len(started)} stderr", lb.log_text))
        _logs(request.node).append((f"fastlb #{len(started)} config", lambda: lb.config_text))
        return lb.start()

    yield start
    for lb in started:
        lb.stop()
