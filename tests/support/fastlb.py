"""`fastlb serve` as a real process for the end-to-end tests: config, sd_notify readiness, workers, teardown."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .helpers import LOCALHOST, connect, free_port, free_udp_port, wait_until

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
PR_SET_PDEATHSIG = 1


def toml_value(v) -> str:
    """The few TOML forms the tests need: strings, integers, booleans, lists, inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML form for {v!r}")


def toml_table(header: str, items: dict) -> str:
    lines = [f"[{header}]"] + [f"{k} = {toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


class FastLB:
    """One `fastlb serve` with one listener "web" on a free port, forwarding to pool "web".

    backends: [(name, "HOST:PORT", weight or None), ...]. listener/pool/global_ add or override keys
    (a value None removes the key, e.g. listener={"pool": None} for a listener with routes).
    extra: more TOML appended as is (other pools, [[listeners.web.routes]] tables).
    raw: a whole config (without [global]) to run instead, e.g. one from the docs: its first
    `bind` becomes this instance's address and a [global] table with the control socket is put
    in front; `backends` and the other table arguments are then ignored.
    nofile: RLIMIT_NOFILE (soft and hard) for the serve process and so its workers.
    user: run `fastlb serve` as this (unprivileged) user; its work directory is handed to it.
    workers_flag: pass `--workers N` (which overrides the file's [global] workers); False: the
    file's value counts (a reload that changes it).
    """

    def __init__(
        self,
        workdir: Path,
        backends: list[tuple[str, str, int | None]],
        *,
        workers: int = 1,
        algorithm: str = "weighted_round_robin",
        listener: dict | None = None,
        pool: dict | None = None,
        global_: dict | None = None,
        host: str = LOCALHOST,
        nofile: int | None = None,
        extra: str = "",
        raw: str | None = None,
        user: str | None = None,
        workers_flag: bool = True,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        # unix socket paths must fit in 107 bytes: fall back to a short directory if needed (also
        # for another user: pytest's tmp tree is private to root)
        if len(str(workdir / "control.sock")) > 100 or user is not None:
            workdir = Path(tempfile.mkdtemp(prefix="flb-", dir="/tmp"))
        self.dir = workdir
        self.workers = workers
        self.workers_flag = workers_flag
        self.nofile = nofile
        self.user = user
        self.host = host
        udp = (listener or {}).get("protocol") == "udp"
        self.port = free_udp_port(host) if udp else free_port(host)
        self.config_path = workdir / "fastlb.toml"
        self.log_path = workdir / "fastlb.log"
        self.notify_path = workdir / "notify.sock"
        bind = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        g = {
            "workers": workers,
            "control_socket": str(workdir / "control.sock"),
            "state_file": str(workdir / "state.json"),
            "shutdown_timeout": "30s",
        }
        g.update(global_ or {})
        lst = {"bind": bind, "pool": "web"}
        if not udp:  # these keys apply to TCP listeners only
            lst.update({"connect_timeout": "2s", "idle_timeout": "5m"})
        lst.update(listener or {})
        lst = {k: v for k, v in lst.items() if v is not None}
        entries = []
        for name, address, weight in backends:
            e = {"name": name, "address": address}
            if weight is not None:
                e["weight"] = weight
            entries.append(e)
        pl = {"algorithm": algorithm, "backends": entries}
        pl.update(pool or {})
        self.config_text = (
            toml_table("global", g)
            + "\n"
            + toml_table("listeners.web", lst)
            + "\n"
            + toml_table("pools.web", pl)
            + (("\n" + extra) if extra else "")
        )
        if raw is not None:
            self.config_text = (
                toml_table("global", g) + "\n" + re.sub(r'bind = "[^"]+"', f'bind = "{bind}"', raw, count=1)
            )
        self.config_path.write_text(self.config_text)
        self.proc: subprocess.Popen | None = None
        self.notify_sock: socket.socket | None = None
        self.notifications: list[tuple[float, int, str]] = []  # (monotonic time, sender pid, text)
        self._known: dict[int, psutil.Process] = {}  # every process seen in the tree, for teardown
        self._log = None
        self.serve_args: list[str] = []  # extra `fastlb serve` arguments (e.g. --takeover)
        self.argv_prefix: list[str] = []  # a wrapper to run `fastlb serve` under (e.g. a subreaper)
        self.env: dict[str, str] = {}  # extra environment (e.g. PYTHONPATH of another fastlb build)

    def clone(self, tag: str) -> FastLB:
        """Another, not yet started, `fastlb serve` on this one's config file and port (its own log
        and notify socket): a second instance, a restart or a takeover."""
        other = object.__new__(FastLB)
        other.__dict__.update(self.__dict__)
        other.log_path = self.dir / f"fastlb-{tag}.log"
        other.notify_path = self.dir / f"notify-{tag}.sock"
        other.proc = None
        other.notify_sock = None
        other.notifications = []
        other._known = {}
        other._log = None
        other.serve_args = []
        other.argv_prefix = []
        other.env = {}
        return other

    @property
    def addr(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- start and readiness ---------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> FastLB:
        """Start `fastlb serve` and wait for READY=1 on NOTIFY_SOCKET (no port polling)."""
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ns.bind(str(self.notify_path))
        ns.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ns.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.notify_sock = ns
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify_path), PYTHONUNBUFFERED="1", **self.env)
        python = sys.executable
        user_kw = {}
        if self.user is not None:
            import pwd

            pw = pwd.getpwnam(self.user)
            for p in (self.dir, self.config_path):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(self.notify_path, 0o666)  # the unprivileged sender must reach it
            user_kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
            # the test's interpreter may live where that user cannot reach (a root-only pyenv):
            # the system python3 with fastlb from its source tree (Debian python3-click, -psutil)
            python = "/usr/bin/python3"
            import fastlb

            env["PYTHONPATH"] = str(Path(fastlb.__file__).resolve().parent.parent)
        nofile = self.nofile
        prctl = ctypes.CDLL(None, use_errno=True).prctl

        def preexec() -> None:
            # if the test process dies (killed by a timeout), fastlb dies too; its workers follow
            # the control process. (PDEATHSIG fires when the forking *thread* exits: start fastlb
            # from the test's main thread.)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop; appends after restart)
        self.proc = subprocess.Popen(
            [
                *self.argv_prefix,
                python,
                "-m",
                "fastlb",
                "serve",
                "-c",
                str(self.config_path),
                *(["--workers", str(self.workers)] if self.workers_flag else []),
                *self.serve_args,
            ],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown can kill the whole tree
            preexec_fn=preexec,
            **user_kw,
        )
        self.wait_notify("READY=1", timeout)
        self.workers_now()  # remember the worker pids for teardown
        return self

    def _recv_notifications(self, wait: float) -> None:
        assert self.notify_sock is not None
        r, _, _ = select.select([self.notify_sock], [], [], wait)
        while r:
            msg, anc, _, _ = self.notify_sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            pid = -1
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = UCRED.unpack(data[: UCRED.size])[0]
            self.notifications.append((time.monotonic(), pid, msg.decode(errors="replace")))
            r, _, _ = select.select([self.notify_sock], [], [], 0)

    def notified(self, text: str) -> tuple[float, int, str] | None:
        """The first datagram received so far with `text` on one of its lines, or None."""
        self._recv_notifications(0)
        for note in self.notifications:
            if text in note[2].split("\n"):
                return note
        return None

    def wait_notify(self, text: str, timeout: float) -> tuple[float, int, str]:
        """Wait for a datagram with the line `text`; fail at once (with the log) if fastlb exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            note = self.notified(text)
            if note:
                return note
            if self.proc.poll() is not None and self.notified(text) is None:
                raise AssertionError(
                    f"fastlb exited with {self.proc.returncode} before sending {text}; log:\n{self.log_text()}"
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {text} from fastlb within {timeout:.0f}s (got {[n[2] for n in self.notifications]}); "
                    f"log:\n{self.log_text()}"
                )
            self._recv_notifications(min(left, 0.05))

    # --- processes ---------------------------------------------------------------------------

    def workers_now(self) -> list[psutil.Process]:
        """Live (non-zombie) child processes of the serve process: the workers."""
        try:
            kids = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        live = []
        for k in kids:
            try:
                if k.status() != psutil.STATUS_ZOMBIE:
                    live.append(k)
                    self._known.setdefault(k.pid, k)
            except psutil.NoSuchProcess:
                pass
        return live

    def _successors(self) -> list[psutil.Process]:
        """`fastlb serve --takeover` processes on this config file (started by an upgrade or a
        reload, possibly after the test stopped looking) and their workers: teardown kills them."""
        config = str(self.config_path)
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "--takeover" in cmd and config in cmd:
                found.append(p)
                with contextlib.suppress(psutil.NoSuchProcess):
                    found += p.children()
        return found

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers_now()}

    def wait_workers(self, n: int, timeout: float = 10.0, exclude: set[int] = frozenset()) -> set[int]:
        """Wait until exactly n live workers run, none of them in `exclude`; their pids."""

        def ok():
            pids = self.worker_pids()
            return pids if len(pids) == n and not (pids & exclude) else None

        return wait_until(ok, timeout, lambda: f"{n} workers (have {sorted(self.worker_pids())})")

    def the_worker(self) -> psutil.Process:
        ws = self.workers_now()
        assert len(ws) == 1, f"expected one worker, found {[w.pid for w in ws]}"
        return ws[0]

    def established_per_worker(self) -> dict[int, int]:
        """Worker pid -> client connections (ESTABLISHED, local port = the listener's) it holds."""
        counts = {}
        for w in self.workers_now():
            try:
                conns = w.net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            counts[w.pid] = sum(
                1
                for c in conns
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
            )
        return counts

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return connect(self.addr, timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"fastlb still running {timeout:.0f}s later; log:\n{self.log_text()}"
            ) from None

    def restart(self, timeout: float = 30.0) -> FastLB:
        """Stop this fastlb gracefully (SIGTERM, exit 0 expected) and start it again with the same
        config file, port, control socket and state file; its log continues in the same file."""
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        assert code == 0, f"fastlb exited {code} on SIGTERM; log:\n{self.log_text()}"
        if self.notify_sock is not None:
            self.notify_sock.close()
            self.notify_sock = None
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        if self._log is not None:
            self._log.close()
        self.notifications = []
        return self.start(timeout)

    def log_text(self, limit: int = 20000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def stop(self) -> None:
        """Teardown: SIGKILL the serve process, its process group and every worker ever seen."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.workers_now()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for p in [*self._known.values(), *self._successors()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running():  # is_running() also guards against a reused pid
                    p.kill()
        if self.notify_sock is not None:
            self.notify_sock.close()
        if self._log is not None:
            self._log.close()


def rewrite_backends(lb: FastLB, backends: list[dict], **pool_changes) -> None:
    """Rewrite lb's config file with other backends (and pool keys), atomically; the rest stays as
    started.  SIGHUP makes fastlb load it."""
    import tomllib

    doc = tomllib.loads(lb.config_path.read_text())
    doc["pools"]["web"]["backends"] = backends
    doc["pools"]["web"].update(pool_changes)
    text = toml_table("global", doc["global"]) + "\n" + toml_table("listeners.web", doc["listeners"]["web"])
    text += "\n" + toml_table("pools.web", doc["pools"]["web"])
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(lb.config_path)


def read_config(lb: FastLB) -> dict:
    """The running FastLB's config file as a dict (to edit and write back with write_config)."""
    import tomllib

    return tomllib.loads(lb.config_path.read_text())


def write_config(lb: FastLB, doc: dict) -> None:
    """Replace lb's config file atomically with doc ({"global": {...}, "listeners": {name: {...}},
    "pools": {name: {...}}}; nested tables such as health_check are written inline)."""
    text = toml_table("global", doc.get("global", {}))
    for section in ("listeners", "pools"):
        for name, table in doc.get(section, {}).items():
            text += "\n" + toml_table(f"{section}.{name}", table)
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(lb.config_path)
