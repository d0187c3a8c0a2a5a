"""Fixtures for the end-to-end tests: backend processes and `fastlb serve` processes, always cleaned up.

`backends(server(...), ...)` starts one backend process, `proto_servers(proto(...), ...)` one
health-check protocol server process, `fastlb(backends=[...], ...)` a `fastlb serve` that has sent
READY=1.  All are stopped (SIGKILL if they linger) at teardown, and their logs are attached to the
report of a failing test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import support` from any rootdir

from support.backends import Backends  # noqa: E402
from support.fastlb import FastLB  # noqa: E402
from support.protocols import ProtoServers  # noqa: E402


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


def _server_factory(cls, label: str, tmp_path, request):
    """A fixture body: start(*servers, prefix=()) launches one `cls` process (a
    support.backends.ServerProcess; prefix: a wrapper such as a support.netns.Netns's) with its log
    attached to a failing test's report; every one is stopped at teardown."""
    started: list = []

    def start(*servers: dict, prefix: tuple[str, ...] | list[str] = ()):
        proc = cls(list(servers), tmp_path / f"{label}{len(started)}.log")
        proc.argv_prefix = list(prefix)
        started.append(proc)
        _logs(request.node).append((f"{label} process #{len(started)} log", proc.log_text))
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def backends(tmp_path, request):
    """Factory: backends(server("a", "id"), server("b", "echo")) -> a started Backends."""
    yield from _server_factory(Backends, "backends", tmp_path, request)


@pytest.fixture
def proto_servers(tmp_path, request):
    """Factory: proto_servers(proto("a", "http"), ...) -> a started ProtoServers (health-check
    protocol servers: http, send_expect, resets)."""
    yield from _server_factory(ProtoServers, "proto", tmp_path, request)


@pytest.fixture
def fastlb(tmp_path, request):
    """Factory: fastlb(backends=[(name, address, weight)], workers=N, listener={...}, ...) -> a
    FastLB that has sent READY=1."""
    started: list[FastLB] = []

    def start(backends, prefix: tuple[str, ...] = (), **kw) -> FastLB:
        lb = FastLB(tmp_path / f"lb{len(started)}", backends, **kw)
        lb.argv_prefix = list(prefix)  # a wrapper process, e.g. tests/support/subreaper.py
        started.append(lb)
        _logs(request.node).append((f"fastlb #{len(started)} stderr", lb.log_text))
        _logs(request.node).append((f"fastlb #{len(started)} config", lambda: lb.config_text))
        return lb.start()

    def again(lb: FastLB, *serve_args: str, prefix: tuple[str, ...] = (), start: bool = True) -> FastLB:
        """Another `fastlb serve` on lb's config (e.g. again(lb, "--takeover")), stopped at teardown;
        start=False returns it unstarted."""
        other = lb.clone(f"{len(started)}")
        other.serve_args = list(serve_args)
        other.argv_prefix = list(prefix)
        started.append(other)
        _logs(request.node).append((f"fastlb #{len(started)} stderr (same config)", other.log_text))
        return other.start() if start else other

    start.again = again  # type: ignore[attr-defined]
    yield start
    for lb in started:
        lb.stop()


@pytest.fixture
def udp_servers(tmp_path, request):
    """Factory: udp_servers(udp_server("a", "echo"), ...) -> a started UdpServers (issue 13)."""
    from support.udp import UdpServers

    yield from _server_factory(UdpServers, "udp", tmp_path, request)


@pytest.fixture
def netns():
    """Factory: netns("fd00:f1b::1/128", ...) -> a new support.netns.Netns (lo up, these addresses on
    it); skips the test without root and iproute2.  Each is deleted, with what runs in it, at
    teardown (ask for this fixture before fastlb and the servers: it is torn down after them)."""
    from support.netns import Netns, netns_missing

    made: list[Netns] = []

    def make(*addresses: str) -> Netns:
        why = netns_missing()
        if why:
            pytest.skip(why)
        ns = Netns()
        made.append(ns)
        return ns.create(*addresses)

    yield make
    for ns in made:
        ns.delete()


@pytest.fixture
def dnsmasq(tmp_path, request):
    """Factory: dnsmasq(answer="127.0.0.9", host="127.0.0.1") -> a started support.dns.Dnsmasq
    answering every name under test.example with `answer`; each is stopped at teardown."""
    from support.dns import Dnsmasq

    started: list = []

    def start(answer: str, host: str = "127.0.0.1"):
        d = Dnsmasq(tmp_path / f"dns{len(started)}", host)
        started.append(d)
        _logs(request.node).append((f"dnsmasq {answer} log", d.log_text))
        return d.start(wildcard=[("test.example", answer)])

    yield start
    for d in started:
        d.stop()


@pytest.fixture(scope="session")
def debian_wheel(tmp_path_factory):
    """fastlb compiled once per session into a wheel by Debian's own /usr/bin/python3."""
    from support.install import build_wheel, have_debian_python

    if not have_debian_python():
        pytest.skip("no Debian /usr/bin/python3 with venv (apt-get install python3-venv)")
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed_root(tmp_path_factory, debian_wheel):
    """A root directory holding what `scripts/install` installs (DESTDIR), plus the host's units."""
    from support.install import add_system_units, run_install

    root = tmp_path_factory.mktemp("install") / "root"
    root.mkdir()
    r = run_install(root, debian_wheel)
    assert r.returncode == 0, r.stdout + r.stderr
    add_system_units(root)
    return root


@pytest.fixture(scope="session")
def debian_venv(tmp_path_factory, debian_wheel):
    """A venv made as README command 1 makes one (scripts/venv, Debian's python3), holding the
    session's wheel: the only place fastlb is installed, for tests of how scripts find it."""
    from support.install import make_venv

    venv = tmp_path_factory.mktemp("venv") / "venv"
    make_venv(venv, debian_wheel)
    return venv
