"""A real DNS server for the tests: dnsmasq (Debian's) on a loopback port, serving a test zone.

`Dnsmasq(workdir).start(srv=[...], a=[...], ttl=2)` writes a config file and runs dnsmasq in the
foreground; `reload(...)` rewrites the zone and restarts it on the same port (dnsmasq re-reads its
config only on start), `stop()` ends it (a test of "the server is gone"), `kill()` SIGKILLs it (a
crash: its port then answers ICMP port unreachable).  `wildcard=[("test.example", "127.0.0.9")]`
answers every name under a domain with one address (the UDP tests tell servers apart by it);
`Dnsmasq(workdir, host="::1")` listens on IPv6 loopback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from .helpers import free_udp_port, wait_until


class Dnsmasq:
    """dnsmasq answering only from its config (no upstream, no /etc/hosts) on host:port
    (127.0.0.1 unless told otherwise); names it does not know are REFUSED."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_udp_port(host)
        self.conf = self.dir / "dnsmasq.conf"
        self.log = self.dir / "dnsmasq.log"
        self.proc: subprocess.Popen | None = None
        binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.binary = binary

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def write(
        self,
        srv: list[tuple[str, str, int, int, int]],
        a: list[tuple[str, str]],
        ttl: int,
        wildcard: list[tuple[str, str]] = (),
    ) -> None:
        """srv: (name, target, port, priority, weight); a: (name, address); wildcard: (domain,
        address): every name under domain answers address."""
        lines = [
            "no-resolv",
            "no-hosts",
            "no-daemon",
            "bind-interfaces",
            f"listen-address={self.host}",
            "except-interface=nonexistent",
            f"port={self.port}",
            f"local-ttl={ttl}",
            f"auth-ttl={ttl}",
            "log-queries",
            f"log-facility={self.log}",
            "user=root",
            "pid-file=",
        ]
        lines += [f"srv-host={n},{t},{p},{prio},{w}" for n, t, p, prio, w in srv]
        lines += [f"host-record={n},{addr}" for n, addr in a]
        lines += [f"address=/{d}/{addr}" for d, addr in wildcard]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, srv=(), a=(), ttl: int = 2, wildcard=()) -> Dnsmasq:
        self.wildcard = list(wildcard)
        self.write(list(srv), list(a), ttl, self.wildcard)
        self.proc = subprocess.Popen(
            [self.binary, f"--conf-file={self.conf}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "dnsmasq.stderr", "ab"),  # noqa: SIM115 - the child keeps it
        )
        wait_until(self._answers, 10.0, f"dnsmasq to answer on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited: {(self.dir / 'dnsmasq.stderr').read_text()}")
        q = dns.message.make_query("probe.invalid.", "A")
        try:
            r = dns.query.udp(q, self.host, port=self.port, timeout=0.3)
        except (OSError, dns.exception.Timeout):
            return False
        return r.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.REFUSED)

    def reload(self, srv=(), a=(), ttl: int = 2) -> Dnsmasq:
        self.stop()
        return self.start(srv, a, ttl)

    def kill(self) -> None:
        """SIGKILL: a crashed server (the port is closed at once; no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> Dnsmasq:
        """Start again on the same port with the same zone (after kill() or stop())."""
        self.stop()
        return self.start(wildcard=self.wildcard)

    def log_text(self) -> str:
        texts = []
        for path in (self.log, self.dir / "dnsmasq.stderr"):
            try:
                texts.append(path.read_text(errors="replace")[-5000:])
            except OSError:
                pass
        return "\n".join(texts)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def queries(self) -> int:
        """How many queries dnsmasq has logged (all runs)."""
        try:
            return sum(1 for line in self.log.read_text().splitlines() if " query[" in line)
        except FileNotFoundError:
            return 0
