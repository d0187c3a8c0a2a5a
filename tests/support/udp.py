"""UDP peers for the end-to-end tests: a UDP server process (udp_server.py) and dnsmasq instances."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from .backends import ServerProcess
from .helpers import free_udp_port, wait_until
from .udp_server import MODES


def udp_server(name: str, mode: str, **params) -> dict:
    """One UDP server's spec: udp_server("a", "echo"), udp_server("b", "tag", host="::1")."""
    if mode not in MODES:
        raise ValueError(f"unknown UDP server mode {mode!r}")
    return {"name": name, "mode": mode, **params}


class UdpServers(ServerProcess):
    """The UDP server process seen from the test: ports and per-server datagram counts."""

    script = str(Path(__file__).with_name("udp_server.py"))
    what = "UDP server process"

    def address(self, name: str) -> str:
        host = next(s.get("host", "127.0.0.1") for s in self.servers if s["name"] == name)
        return f"[{host}]:{self.ports[name]}" if ":" in host else f"{host}:{self.ports[name]}"

    def received(self) -> dict[str, int]:
        return self.stats()["received"]


class Dnsmasq:
    """One dnsmasq on loopback, authoritative-style for test.example: every name under it
    resolves to `answer`; anything else is REFUSED (no upstream).  Started in the foreground
    so the test owns the process; stop() or kill() ends it."""

    def __init__(
        self, workdir: Path, answer: str, host: str = "127.0.0.1", log_queries: bool = False
    ) -> None:
        self.workdir = workdir
        self.answer = answer
        self.host = host
        self.log_path = workdir / f"dnsmasq-{answer}.log"
        self.log_queries = log_queries
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self, port: int | None = None, timeout: float = 10.0) -> Dnsmasq:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_udp_port(self.host)
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-negcache",
            "--cache-size=0",
            f"--address=/test.example/{self.answer}",
            "--pid-file=",
            f"--log-facility={self.log_path}",
        ]
        if os.geteuid() == 0:
            argv.append("--user=root")  # no privilege drop to "nobody": the test owns the log file
        if self.log_queries:
            argv.append("--log-queries")
        self._out = open(self.workdir / f"dnsmasq-{self.answer}.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out)
        wait_until(self.answers, timeout, lambda: f"dnsmasq on {self.address} to answer ({self.log_text()})")
        return self

    def answers(self) -> bool:
        """Does it answer an A query for probe.test.example right now?"""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited with {self.proc.returncode}: {self.log_text()}")
        q = dns.message.make_query("probe.test.example", "A")
        try:
            r = dns.query.udp(q, self.host, port=self.port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        return bool(r.answer)

    def log_text(self) -> str:
        texts = []
        for p in (self.log_path, self.workdir / f"dnsmasq-{self.answer}.out"):
            with contextlib.suppress(OSError):
                texts.append(p.read_text(errors="replace")[-5000:])
        return "\n".join(texts)

    def kill(self) -> None:
        """SIGKILL (a crashed server: its port answers ICMP port unreachable)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_out", None) is not None:
            self._out.close()


def udp_client(addr: tuple[str, int], timeout: float = 5.0, rcvbuf: int = 0) -> socket.socket:
    """A UDP socket connected to addr (so only its replies are received), with a timeout."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(addr)
    return s
