"""Backend servers for the end-to-end tests: one process (stdlib only) serving several named servers.

Run as a script by `Backends` below: `python backends.py SPEC_JSON`, where
SPEC_JSON = {"servers": [{"name": "a", "mode": "echo", "host": "127.0.0.1", "port": 0, ...}, ...]}.
One selectors (epoll) loop serves every connection, so thousands at once are fine.

Modes:
  echo               echo everything; at EOF, flush, shut down writing and close
  id                 send b"NAME\\n" on accept, then echo
  blast              send `send_bytes` bytes seeded by `seed` (0: none), then shutdown(SHUT_WR); read to
                     EOF hashing; close and report an event when both are done
  half_close_answer  read to EOF hashing, then send `send_bytes` seeded bytes and close; report
  sink               half_close_answer with send_bytes = 0
  reset              read; on the first bytes, close with a RST (SO_LINGER 0); report
  flaky              like id, but resets a share of the connections (`reset_share`, 0..1, drawn
                     from `seed`) at once on accept, before any byte (a crashing canary)
  blackhole          listen(0), queue pre-filled, never accept: further SYNs are dropped, so a connect
                     never completes (checked at start: "blackhole_ok")
  close_on_accept    accept, then close at once (FIN) without reading or sending
  greet_reset        send b"NAME\\n" on accept, then `reset_delay` seconds (0.05) later close with a
                     RST (SO_LINGER 0), whatever the client sent: a canary that crashes after its
                     first bytes (issue 24)
  answer_reset       read `read_bytes` (16) bytes, send `answer`, close with the rest of the request
                     unread (so the kernel resets the connection right after the answer); report
  hold               read and discard everything, never send, never close (not even at EOF); report
                     when the peer resets
  paced              send `count` messages of `size` seeded bytes `interval_ms` apart, then
                     shutdown(SHUT_WR); read to EOF; report
Options for any mode: `rcvbuf` (SO_RCVBUF of the listening socket, so of its connections),
`read_delay` (seconds after accept before the first read).

Control: one command a line on stdin, one JSON line answer on stdout.
  stats   -> {"accepted": {name: n}, "active": {name: n}}
  events  -> {"events": [...]} and forgets them; one per finished blast/half_close_answer/sink/reset
             connection: name, recv_len, recv_sha256, sent_len, sent_sha256, end ("ok" | "reset" | error)
  quit    -> exit.  EOF on stdin (the test process died) exits too.
The first stdout line, once every server listens: {"ports": {name: port}, "blackhole_ok": {name: bool}}.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import select
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 256 * 1024
OUT_HIGH = 4 * 1024 * 1024  # echo: stop reading while this much is waiting to go back
HASHED = {"blast", "half_close_answer", "sink", "reset", "answer_reset", "hold", "paced"}
MODES = HASHED | {"echo", "id", "flaky", "blackhole", "close_on_accept", "greet_reset"}

# ================================================================================ server side


class Conn:
    __slots__ = (
        "sock",
        "name",
        "mode",
        "out",
        "off",
        "gen_left",
        "rng",
        "send_active",
        "eof_in",
        "shut_out",
        "recv_len",
        "sent_len",
        "recv_hash",
        "sent_hash",
        "mask",
        "send_bytes",
        "srv",
        "left",
        "next_at",
        "read_at",
    )

    def __init__(self, sock: socket.socket, srv: dict) -> None:
        self.sock = sock
        self.name = srv["name"]
        self.mode = "id" if srv["mode"] == "flaky" else srv["mode"]
        self.out = bytearray()
        self.off = 0
        self.send_bytes = int(srv.get("send_bytes", 0))
        self.rng = random.Random(int(srv.get("seed", 0)))
        self.gen_left = self.send_bytes if self.mode == "blast" else 0
        # echo/id/blast may send from the start; half_close_answer/sink only after EOF
        self.send_active = self.mode in ("echo", "id", "blast")
        self.eof_in = False
        self.shut_out = False
        self.recv_len = 0
        self.sent_len = 0
        self.recv_hash = hashlib.sha256()
        self.sent_hash = hashlib.sha256()
        self.mask = 0
        self.srv = srv
        self.left = int(srv.get("count", 0)) if self.mode == "paced" else 0
        now = time.monotonic()
        # the first message one interval after accept: fastlb has the connection set up by then, so
        # each message arrives on its own (the test wants message-sized reads)
        self.next_at = now + float(srv.get("interval_ms", 5)) / 1000.0 if self.left else 0.0
        self.read_at = now + float(srv.get("read_delay", 0))
        if self.mode == "paced":
            self.send_active = True
        if self.mode == "id":
            self.out += self.name.encode() + b"\n"


class Server:
    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[int, tuple[socket.socket, dict]] = {}
        self.accepted: dict[str, int] = {}
        self.active: dict[str, int] = {}
        self.events: list[dict] = []
        self.flaky_resets: dict[str, int] = {}  # flaky: connections reset at accept
        self.ports: dict[str, int] = {}
        self.blackhole_ok: dict[str, bool] = {}
        self.keep: list[socket.socket] = []  # blackhole queue fillers
        self.stdin_buf = b""
        self.running = True
        self.timed: set[Conn] = set()  # paced senders and delayed readers: woken by time
        self.doomed: list[tuple[float, socket.socket]] = []  # greet_reset: (reset at, socket)

    # --- setup ---------------------------------------------------------------------------

    def listen(self) -> None:
        for srv in self.spec["servers"]:
            if srv["mode"] not in MODES:
                raise SystemExit(f"unknown mode {srv['mode']!r}")
            host = srv.get("host", "127.0.0.1")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            ls = socket.socket(family, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if "rcvbuf" in srv:
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(srv["rcvbuf"]))
            ls.bind((host, int(srv.get("port", 0))))
            name = srv["name"]
            self.ports[name] = ls.getsockname()[1]
            self.accepted[name] = 0
            self.active[name] = 0
            if srv["mode"] == "blackhole":
                ls.listen(0)
                self.blackhole_ok[name] = self._fill(ls, family, (host, self.ports[name]))
                self.keep.append(ls)
                continue
            ls.listen(int(srv.get("backlog", 4096)))
            ls.setblocking(False)
            self.listeners[ls.fileno()] = (ls, srv)
            self.sel.register(ls, selectors.EVENT_READ, "listen")

    def _fill(self, ls: socket.socket, family: int, addr: tuple) -> bool:
        """Connect to a listen(0) socket until a connect does not complete in 0.3 s: from then on
        the accept queue is full and the kernel drops SYNs. True if that point was reached."""
        for _ in range(16):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.setblocking(False)
            rc = c.connect_ex(addr)
            if rc not in (0, errno.EINPROGRESS):
                c.close()
                return False
            _, w, _ = select.select([], [c], [], 0.3)
            if not w:
                c.close()  # this SYN was dropped: the queue is full
                return True
            if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                c.close()
                return False
            self.keep.append(c)
        return False

    # --- connections ---------------------------------------------------------------------

    def accept(self, ls: socket.socket, srv: dict) -> None:
        for _ in range(512):
            try:
                s, _ = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    print(f"backends: accept: {exc}", file=sys.stderr, flush=True)
                    return
                raise
            name = srv["name"]
            if srv["mode"] == "flaky":
                rng = srv.setdefault("_rng", random.Random(int(srv.get("seed", 0))))
                if rng.random() < float(srv.get("reset_share", 0.5)):
                    self.flaky_resets[name] = self.flaky_resets.get(name, 0) + 1
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                    continue
            self.accepted[name] += 1
            if srv["mode"] == "close_on_accept":
                s.close()
                continue
            if srv["mode"] == "greet_reset":
                try:
                    s.send(name.encode() + b"\n")  # small: the socket buffer takes it whole
                except OSError:
                    pass
                self.doomed.append((time.monotonic() + float(srv.get("reset_delay", 0.05)), s))
                continue
            s.setblocking(False)
            self.active[name] += 1
            c = Conn(s, srv)
            if c.left or c.read_at > time.monotonic():
                self.timed.add(c)
            self.update(c)

    def reset_doomed(self) -> float | None:
        """Reset the greet_reset connections that are due; the delay to the next one (None: none)."""
        now = time.monotonic()
        while self.doomed and self.doomed[0][0] <= now:
            _, s = self.doomed.pop(0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        return max(0.0, self.doomed[0][0] - now) if self.doomed else None

    def timers(self) -> float | None:
        """Feed the paced senders that are due, wake the delayed readers; the next wake-up delay."""
        now = time.monotonic()
        nxt = None
        for c in list(self.timed):
            if c.mask == 0 and c.sock.fileno() < 0:
                self.timed.discard(c)
                continue
            # one message per send(): a late message waits until the previous one is out
            if c.left and c.next_at <= now and c.off == len(c.out):
                chunk = c.rng.randbytes(int(c.srv["size"]))
                c.sent_hash.update(chunk)
                c.out = bytearray(chunk)
                c.off = 0
                c.left -= 1
                c.next_at = max(c.next_at + float(c.srv.get("interval_ms", 5)) / 1000.0, now)
            due = [t for t in (c.next_at if c.left else None, c.read_at if c.read_at > now else None) if t]
            if not due:
                self.timed.discard(c)
            else:
                nxt = min(due + ([nxt] if nxt is not None else []))
            self.update(c)
        return None if nxt is None else max(0.0, nxt - now)

    def update(self, c: Conn) -> None:
        """Make progress that needs no I/O readiness, then set the epoll interest (or finish)."""
        if c.sock.fileno() < 0:
            return
        if c.send_active and c.off == len(c.out) and c.gen_left == 0 and not c.shut_out and c.left == 0:
            if c.mode in ("blast", "paced") or (c.eof_in and c.mode != "hold"):
                try:
                    c.sock.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.finish(c, f"shutdown: {exc.strerror}")
                    return
                c.shut_out = True
        if c.eof_in and c.shut_out:
            self.finish(c, "ok")
            return
        want = 0
        if not c.eof_in and len(c.out) - c.off < OUT_HIGH and c.read_at <= time.monotonic():
            want |= selectors.EVENT_READ
        if c.send_active and (c.off < len(c.out) or c.gen_left > 0):
            want |= selectors.EVENT_WRITE
        if want != c.mask:
            if c.mask == 0:
                self.sel.register(c.sock, want, c)
            elif want == 0:
                self.sel.unregister(c.sock)
            else:
                self.sel.modify(c.sock, want, c)
            c.mask = want

    def finish(self, c: Conn, end: str, reset: bool = False) -> None:
        self.timed.discard(c)
        if c.mask:
            self.sel.unregister(c.sock)
            c.mask = 0
        if reset:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
        self.active[c.name] -= 1
        if c.mode in HASHED:
            self.events.append(
                {
                    "name": c.name,
                    "mode": c.mode,
                    "recv_len": c.recv_len,
                    "recv_sha256": c.recv_hash.hexdigest(),
                    "sent_len": c.sent_len,
                    "sent_sha256": c.sent_hash.hexdigest(),
                    "end": end,
                }
            )

    def readable(self, c: Conn) -> None:
        want = CHUNK
        if c.mode == "answer_reset":
            want = max(1, int(c.srv.get("read_bytes", 16)) - c.recv_len)
        try:
            data = c.sock.recv(want)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(c, "reset" if exc.errno == errno.ECONNRESET else f"recv: {exc.strerror}")
            return
        if not data:
            c.eof_in = True
            if c.mode in ("half_close_answer", "sink"):
                c.send_active = True
                c.gen_left = c.send_bytes if c.mode == "half_close_answer" else 0
            self.update(c)
            return
        c.recv_len += len(data)
        if c.mode in HASHED:
            c.recv_hash.update(data)
        if c.mode == "reset":
            self.finish(c, "ok", reset=True)
            return
        if c.mode == "answer_reset" and c.recv_len >= int(c.srv.get("read_bytes", 16)):
            answer = str(c.srv.get("answer", "-ERR Protocol error\r\n")).encode()
            try:
                c.sock.send(answer)  # small: the socket buffer takes it whole
                c.sent_len += len(answer)
                c.sent_hash.update(answer)
            except OSError as exc:
                self.finish(c, f"send: {exc.strerror}")
                return
            self.finish(c, "ok")  # the request's rest is unread: the kernel sends a reset
            return
        if c.mode in ("echo", "id"):
            if c.off and c.off == len(c.out):
                c.out = bytearray()
                c.off = 0
            c.out += data
        self.update(c)

    def writable(self, c: Conn) -> None:
        if c.off == len(c.out) and c.gen_left > 0:
            chunk = c.rng.randbytes(min(CHUNK, c.gen_left))
            c.gen_left -= len(chunk)
            c.sent_hash.update(chunk)
            c.out = bytearray(chunk)
            c.off = 0
        try:
            with memoryview(c.out) as mv:
                n = c.sock.send(mv[c.off : c.off + 4 * CHUNK] if c.mode != "paced" else mv[c.off :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(
                c, "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else f"send: {exc.strerror}"
            )
            return
        c.off += n
        c.sent_len += n
        if c.off == len(c.out):
            c.out = bytearray()
            c.off = 0
        elif c.off > OUT_HIGH:
            del c.out[: c.off]
            c.off = 0
        self.update(c)

    # --- control -------------------------------------------------------------------------

    def reply(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def command(self) -> None:
        data = os.read(0, 4096)
        if not data:
            self.running = False
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            cmd = line.decode().strip()
            if cmd == "stats":
                self.reply(
                    {"accepted": self.accepted, "active": self.active, "flaky_resets": self.flaky_resets}
                )
            elif cmd == "events":
                self.reply({"events": self.events})
                self.events = []
            elif cmd == "quit":
                self.reply({"bye": True})
                self.running = False
            else:
                self.reply({"error": f"unknown command {cmd!r}"})

    def run(self) -> None:
        self.listen()
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.reply({"ports": self.ports, "blackhole_ok": self.blackhole_ok})
        while self.running:
            waits = [w for w in (self.timers() if self.timed else None, self.reset_doomed()) if w is not None]
            for key, ev in self.sel.select(min(waits) if waits else None):
                if key.data == "listen":
                    ls, srv = self.listeners[key.fd]
                    self.accept(ls, srv)
                elif key.data == "stdin":
                    self.command()
                else:
                    c = key.data
                    if c.mask == 0:  # finished earlier in this batch
                        continue
                    if ev & selectors.EVENT_WRITE:
                        self.writable(c)
                    if c.mask and ev & selectors.EVENT_READ:
                        self.readable(c)


def raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    raise_nofile()
    Server(json.loads(sys.argv[1])).run()


# ================================================================================ test side


def server(name: str, mode: str, **params) -> dict:
    """One server's spec: server("a", "id"), server("x", "blast", send_bytes=N, seed=1)."""
    if mode not in MODES:
        raise ValueError(f"unknown backend mode {mode!r}")
    return {"name": name, "mode": mode, **params}


class ServerProcess:
    """A server process seen from the test: started with its JSON spec as argv[1], it answers one
    JSON line per command on stdin/stdout; stop() ends it (SIGKILL if it lingers).  Subclasses
    give the script and read the hello line."""

    script = __file__
    what = "backend process"

    def __init__(self, servers: list[dict], log_path: Path) -> None:
        self.servers = servers
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self._buf = b""
        self._log = None
        self.argv_prefix: list[str] = []  # a wrapper to run the process under (e.g. `ip netns exec NS`)

    def start(self, timeout: float = 10.0):
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [*self.argv_prefix, sys.executable, self.script, json.dumps({"servers": self.servers})],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            close_fds=True,
        )
        self.hello(self._read_line(timeout))
        return self

    def hello(self, msg: dict) -> None:
        self.ports = msg["ports"]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _read_line(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.what} silent for {timeout:.0f}s; log:\n{self.log_text()}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 65536)
                if not data:
                    self.proc.wait(5)
                    raise AssertionError(
                        f"{self.what} exited ({self.proc.returncode}); log:\n{self.log_text()}"
                    )
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _call(self, cmd: str, timeout: float = 10.0) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_line(timeout)

    def stats(self) -> dict:
        return self._call("stats")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF on stdin: the server exits by itself
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()


class Backends(ServerProcess):
    """The backend process seen from the test: ports, counts, events."""

    def __init__(self, servers: list[dict], log_path: Path) -> None:
        super().__init__(servers, log_path)
        self.blackhole_ok: dict[str, bool] = {}

    def hello(self, msg: dict) -> None:
        self.ports = msg["ports"]
        self.blackhole_ok = msg["blackhole_ok"]

    def address(self, name: str) -> str:
        """The address of server `name` as fastlb's config wants it: "HOST:PORT"."""
        host = next(s.get("host", "127.0.0.1") for s in self.servers if s["name"] == name)
        return f"[{host}]:{self.ports[name]}" if ":" in host else f"{host}:{self.ports[name]}"

    def sockaddr(self, name: str) -> tuple[str, int]:
        host = next(s.get("host", "127.0.0.1") for s in self.servers if s["name"] == name)
        return host, self.ports[name]

    def accepted(self) -> dict[str, int]:
        return self.stats()["accepted"]

    def active(self) -> dict[str, int]:
        return self.stats()["active"]

    def events(self) -> list[dict]:
        return self._call("events")["events"]

    def wait_events(self, n: int, timeout: float) -> list[dict]:
        """Collect finished-connection events until there are n of them (AssertionError if not in time)."""
        got: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            got += self.events()
            if len(got) >= n:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"backend reported {len(got)} of {n} finished connections: {got}")
            time.sleep(0.02)


if __name__ == "__main__":
    main()
