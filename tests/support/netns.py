"""Network namespaces for the end-to-end tests (root and iproute2): addresses that exist only in a
namespace the test made, processes run inside it (`prefix`), sockets opened inside it (`socket`).

Every namespace is new and empty (lo up: 127.0.0.1 and ::1), so nothing it carries leaves it; the
conftest `netns` fixture deletes it, and kills what still runs in it, at teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess

from .helpers import Bg

CLONE_NEWNET = 0x40000000  # <sched.h>
_names = itertools.count(1)


def netns_missing() -> str | None:
    """Why network namespaces cannot be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns)"
    return None


def _ip(*args: str) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


class Netns:
    """One network namespace made by the test: Netns().create("fd00:f1b::1/128") adds the
    addresses to its lo (IPv6 ones without duplicate address detection, so usable at once)."""

    def __init__(self) -> None:
        self.name = f"flbt{os.getpid()}n{next(_names)}"
        self.created = False

    def create(self, *addresses: str) -> Netns:
        _ip("netns", "add", self.name)
        self.created = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        for a in addresses:
            self.add_address(a)
        return self

    def add_address(self, cidr: str, dev: str = "lo") -> None:
        _ip("-n", self.name, "addr", "add", cidr, "dev", dev, *(["nodad"] if ":" in cidr else []))

    @property
    def prefix(self) -> list[str]:
        """The argv prefix that runs a program inside (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name]

    def socket(self, family: int = socket.AF_INET6, kind: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket of this namespace (see socket_in)."""
        return socket_in(self.name, family, kind)

    def drop(self, address: str) -> None:
        """Make `address` vanish without a FIN or a reset: an nftables rule drops every packet to or
        from it as it arrives (the input hook: senders see nothing fail).  Skips the test when `nft`
        is missing (Debian package nftables)."""
        import pytest

        if shutil.which("nft") is None:
            pytest.skip("needs nft (Debian package nftables)")
        family = "ip6" if ":" in address else "ip"
        script = (
            "table inet flbtest {\n"
            "  chain input { type filter hook input priority 0; policy accept;\n"
            f"    {family} saddr {address} drop\n"
            f"    {family} daddr {address} drop\n"
            "  }\n"
            "}\n"
        )
        r = subprocess.run(
            [*self.prefix, "nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30
        )
        if r.returncode != 0:
            raise AssertionError(f"nft in {self.name}: exit {r.returncode}: {r.stderr.strip()}")

    def undrop(self) -> None:
        """Remove what drop() added: the address answers again."""
        subprocess.run(
            [*self.prefix, "nft", "delete", "table", "inet", "flbtest"], capture_output=True, timeout=30
        )

    def delete(self) -> None:
        """Kill what still runs inside (by pid: only processes of this namespace), then delete it."""
        if not self.created:
            return
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=30)
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)
        self.created = False


def socket_in(name: str, family: int = socket.AF_INET6, kind: int = socket.SOCK_DGRAM) -> socket.socket:
    """A socket of the named namespace (a socket keeps the namespace it was made in): made by a
    short-lived thread that joins the namespace (setns affects the calling thread only)."""

    def make() -> socket.socket:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns {name}: {os.strerror(e)}")
        finally:
            os.close(fd)
        return socket.socket(family, kind)

    return Bg(make).result(10)
