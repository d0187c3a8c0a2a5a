"""Peers for the connection-prelude tests (PROXY protocol, SNI): HAProxy and nginx processes with
their own config files in a tmp dir, test-made certificates, a recording echo server and a TLS echo
server that reports the server name it saw.  Every wait has a deadline; every process is stopped."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import threading
from pathlib import Path

from .helpers import wait_until


def port_open(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class PeerProcess:
    """A foreground peer (haproxy -db, nginx 'daemon off') started from a config file in `workdir`."""

    def __init__(self, argv: list[str], workdir: Path, label: str) -> None:
        self.argv = argv
        self.workdir = workdir
        self.log_path = workdir / f"{label}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, ports: list[tuple[str, int]], timeout: float = 15.0) -> PeerProcess:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
        for host, port in ports:
            wait_until(
                lambda h=host, p=port: self.proc.poll() is not None or port_open(h, p),
                timeout,
                f"{self.argv[0]} listening on {host}:{port}",
            )
            assert self.proc.poll() is None, f"{self.argv[0]} exited: {self.log_text()}"
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self._log.close()


def haproxy(workdir: Path, config: str, ports: list[tuple[str, int]]) -> PeerProcess:
    """HAProxy in the foreground (-db) on `config` (the global/defaults sections are added)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 5s\n"
        "    timeout client 30s\n    timeout server 30s\n\n" + config
    )
    return PeerProcess(
        [shutil.which("haproxy") or "haproxy", "-f", str(cfg), "-db"], workdir, "haproxy"
    ).start(ports)


def nginx(workdir: Path, body: str, ports: list[tuple[str, int]]) -> PeerProcess:
    """nginx in the foreground with prefix `workdir`; `body` goes into the http {} block."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    cfg = workdir / "nginx.conf"
    cfg.write_text(
        f"worker_processes 1;\nerror_log {workdir}/logs/error.log info;\npid {workdir}/nginx.pid;\n"
        "user root;\nevents { worker_connections 512; }\n"
        "http {\n"
        f"    access_log off;\n    client_body_temp_path {workdir}/body;\n"
        f"    proxy_temp_path {workdir}/proxy;\n    fastcgi_temp_path {workdir}/fastcgi;\n"
        f"    uwsgi_temp_path {workdir}/uwsgi;\n    scgi_temp_path {workdir}/scgi;\n"
        f"{body}\n}}\n"
    )
    argv = [
        shutil.which("nginx") or "/usr/sbin/nginx",
        "-c",
        str(cfg),
        "-p",
        str(workdir),
        "-g",
        "daemon off;",
    ]
    return PeerProcess(argv, workdir, "nginx").start(ports)


def make_cert(workdir: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (and *.name) made with openssl req: (certfile, keyfile)."""
    workdir.mkdir(parents=True, exist_ok=True)
    crt, key = workdir / f"{name}.crt", workdir / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},DNS:*.{name}",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return crt, key


class RecordingServer:
    """A loopback TCP server (thread) that echoes and records every byte each connection sent."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []  # per finished connection, in finishing order
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        data = b""
        c.settimeout(20)
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                data += d
                c.sendall(d)
        except OSError:
            pass
        finally:
            c.close()
            with self.lock:
                self.received.append(data)

    def wait(self, n: int, timeout: float = 10.0) -> list[bytes]:
        wait_until(lambda: len(self.received) >= n, timeout, f"{n} finished connections at the backend")
        with self.lock:
            return list(self.received)

    def close(self) -> None:
        self.sock.close()


class TLSServer:
    """A TLS server (thread, Python ssl) with a certificate for `name`; answers each request line with
    "NAME SNI LINE" (its own name, the server name the client asked for) and closes."""

    def __init__(self, name: str, certfile: Path, keyfile: Path, host: str = "127.0.0.1") -> None:
        self.name = name
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(certfile, keyfile)
        self.seen: list[str | None] = []
        self.ctx.sni_callback = lambda obj, sni, ctx: self.seen.append(sni)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        c.settimeout(20)
        try:
            with self.ctx.wrap_socket(c, server_side=True) as t:
                line = b""
                while not line.endswith(b"\n"):
                    d = t.recv(4096)
                    if not d:
                        break
                    line += d
                sni = self.seen[-1] if self.seen else None
                t.sendall(f"{self.name} {sni} ".encode() + line)
        except (OSError, ssl.SSLError):
            c.close()

    def close(self) -> None:
        self.sock.close()


def tls_request(
    addr: tuple[str, int], server_name: str, line: bytes = b"hello\n", timeout: float = 10.0
) -> str:
    """One TLS exchange through `addr` (no verification: test certificates): the server's answer."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(addr, timeout=timeout) as s,
        ctx.wrap_socket(s, server_hostname=server_name) as t,
    ):
        t.sendall(line)
        out = b""
        while True:
            d = t.recv(4096)
            if not d:
                break
            out += d
        return out.decode()


# PROXY v2's family/transport byte (HAProxy's doc/proxy-protocol.txt, section 2.2): the values the
# spec defines; "other values are unspecified and ... must be rejected as invalid by receivers".
V2_FAMILIES = {
    0x00: "UNSPEC",
    0x11: "TCP4",
    0x12: "UDP4",
    0x21: "TCP6",
    0x22: "UDP6",
    0x31: "UNIX_STREAM",
    0x32: "UNIX_DGRAM",
}
V2_STREAM_FAMILIES = {0x00, 0x11, 0x21, 0x31}  # what can describe a connection on a TCP listener
V2_ADDR_LEN = {1: 12, 2: 36, 3: 216}  # address block by family nibble


def v2_accepted_on_tcp(command: int, fam: int) -> bool:
    """Does a TCP listener accept a v2 header with this command (0 LOCAL, 1 PROXY) and family byte?
    LOCAL: the receiver "must discard the protocol block including the family which is ignored";
    PROXY: only the stream transports (and UNSPEC) fit; a datagram transport (UDP4/UDP6/UNIX_DGRAM)
    or an undefined value is malformed."""
    return command == 0 or fam in V2_STREAM_FAMILIES


def v2_header(command: int, fam: int, body: bytes | None = None) -> bytes:
    """A v2 header with this command and family byte; body defaults to a zeroed address block of the
    size the family nibble asks for (none for UNSPEC or undefined families)."""
    if body is None:
        body = b"\x00" * V2_ADDR_LEN.get(fam >> 4, 0)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, fam]) + struct.pack("!H", len(body)) + body
