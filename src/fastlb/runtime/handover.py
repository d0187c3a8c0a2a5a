"""What a successor inherits from its predecessor, and the predecessor's side of a restart in place.

A restart in place (`fastlb serve --takeover`, `fastlb upgrade` / SIGUSR2, a reload that needs a
takeover) hands these from the running instance (the predecessor) to the new one (the successor):

* **sockets**: every listening socket (their accept queues too), and the /metrics and admin API
  sockets (worker -1 in the table), over SCM_RIGHTS in the reply to `{"cmd": "handover"}`;
* **discovered backend sets**: each DNS-discovered pool's last good set ("carried" in the same
  reply): the successor serves it at once, before its first answer (fleet/discovery.py refreshes it);
* **a pending reload**: a SIGHUP or `fastlb reload` that arrives while the takeover is under way
  is remembered and named in the reply to `{"cmd": "shutdown"}`: the successor re-reads the file
  once it is ready.  After that reply the predecessor forwards a SIGHUP to the successor;
* **the main process**: under systemd the predecessor tells NOTIFY_SOCKET `MAINPID=successor`
  before it answers "shutdown", and the successor announces `MAINPID=` itself with its READY=1.  In
  the foreground (no NOTIFY_SOCKET) the process the operator started stays: once it has drained
  it becomes a small keeper (`python3 -m fastlb.runtime.handover`, named `fastlb serve`) that waits for whichever fastlb serves now
  (a subreaper: every later successor becomes its child), forwards SIGTERM, SIGINT, SIGHUP, SIGUSR1
  and SIGUSR2 to it and exits with its exit code.  Every successor keeps the same stdout/stderr.
  The data plane never depends on the keeper: killing it only orphans the successor to init;
* **the in-flight HTTP requests** stay with the predecessor: its /metrics and admin API stop
  accepting, answer what they already accepted (Connection: close), then let go.

takeover.py is the successor's side of the same exchange (finding the predecessor, receiving).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fastlb")

SCM_MAX = 250  # descriptors per SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253)
HANDOVER_TIMEOUT = 10.0
TAKEOVER_COMMANDS = ("handover", "shutdown", "upgrade", "abandon")  # answered by Handover.answer
KEEPER_ENV = "FASTLB_KEEPER"  # the pid of the foreground keeper, in every successor's environment
KEEPER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
SERVICES_GRACE = 5.0  # seconds the predecessor answers HTTP requests it accepted before the handover


def set_title(title: str = "fastlb serve") -> None:
    """The process name `ps -e`, `top`, `pgrep` and psutil show (comm, at most 15 bytes): not
    `python3`.  The command line stays `python3 -m fastlb serve ...` (tools parse it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)


# --- what is carried besides the sockets ---------------------------------------------------------


@dataclass
class Carried:
    """The state a predecessor passes on in its handover reply (the "carried" field)."""

    # pool -> {"query": "SRV NAME.", "backends": [{"name", "address", "weight"}, ...]}
    discovered: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending_reload: bool = False  # from the shutdown reply: re-read the config once ready

    def to_message(self) -> dict[str, Any]:
        return {"discovered": self.discovered}

    @classmethod
    def from_message(cls, msg: object) -> Carried:
        """Parse the "carried" field; anything malformed is dropped (never raises)."""
        out = cls()
        if not isinstance(msg, dict) or not isinstance(msg.get("discovered"), dict):
            return out
        for pool, entry in msg["discovered"].items():
            if (
                isinstance(pool, str)
                and isinstance(entry, dict)
                and isinstance(entry.get("query"), str)
                and isinstance(entry.get("backends"), list)
            ):
                out.discovered[pool] = {"query": entry["query"], "backends": entry["backends"]}
        return out


def discovered_sets(discovery: Any) -> dict[str, dict[str, Any]]:
    """Every discovered pool's last good set (fleet/discovery.py), as carried in a handover."""
    if discovery is None:
        return {}
    out = {}
    for name, pd in discovery.pools.items():
        if pd.backends:
            out[name] = {
                "query": pd.status()["query"],
                "backends": [
                    {"name": b.name, "address": str(b.address), "weight": b.weight} for b in pd.backends
                ],
            }
    return out


def inherited_backends(carried: Carried, pool: str, query: str) -> list[Any]:
    """The predecessor's last good set for `pool` as BackendConfigs, if it answered the same query
    (a changed discover table starts from nothing); bad entries are skipped."""
    from fastlb.config import BackendConfig, ConfigError
    from fastlb.config.model import MAX_WEIGHT
    from fastlb.config.values import parse_address

    entry = carried.discovered.get(pool)
    if entry is None or entry.get("query") != query:
        return []
    out = []
    for b in entry["backends"]:
        try:
            weight = b["weight"]
            if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
                continue
            out.append(
                BackendConfig(str(b["name"]), parse_address(b["address"], "carried", "handover"), weight)
            )
        except (ConfigError, KeyError, TypeError, ValueError):
            continue
    return out


# --- the running instance's side ------------------------------------------------------------------


class Handover:
    """The predecessor's side of a restart in place, one per Supervisor (`sup`)."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup
        self.successor_pid = 0  # a takeover in progress: the new instance this process started
        self.handed_to = 0  # the successor that took over (after its "shutdown")
        self.pending_reload = False  # a reload asked for while a takeover is under way
        self.keep = False  # the foreground: stay as the keeper once drained
        self._services: asyncio.Task | None = None

    # --- starting a successor ---

    def upgrade(self, reason: str = "upgrade") -> str | None:
        """SIGUSR2, `fastlb upgrade` or a reload that needs new sockets: restart in place without
        refusing a connection.  Returns None, or why it did not start one."""
        sup = self.sup
        if sup.stopping or self.successor_pid:
            why = "stopping" if sup.stopping else f"an upgrade to pid {self.successor_pid} is in progress"
            log.warning("upgrade not started: %s", why)
            return why
        try:
            self.successor_pid = self._spawn_successor(sup.config.file, sup.workers_override)
        except OSError as exc:
            log.error("upgrade failed: cannot start a new instance: %s", exc)
            return f"cannot start a new instance: {exc}"
        sup.ops.record_upgrade(self.successor_pid, reason)
        log.info("%s: started pid %d with --takeover", reason, self.successor_pid)
        return None

    def _spawn_successor(self, config_file: str, workers: int | None) -> int:
        """Start `fastlb serve -c FILE --takeover` from the fastlb installed now (a new build if it
        was upgraded) as a child of this process, in this service's cgroup, on this process's
        stdout and stderr.  Returns its pid (raises OSError)."""
        argv = [sys.executable, "-m", "fastlb", "serve", "-c", config_file, "--takeover"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        env = dict(os.environ)
        if not os.environ.get("NOTIFY_SOCKET") and not os.environ.get(KEEPER_ENV):
            # the foreground: this process stays (as the keeper) and adopts every later successor
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
                self.keep = True
                env[KEEPER_ENV] = str(os.getpid())
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, close_fds=True, env=env)  # noqa: S603
        return proc.pid

    def children(self) -> list[int]:
        return [self.successor_pid] if self.successor_pid else []

    def reaped(self, pid: int, status: int) -> None:
        """A successor this process started exited (the supervisor reaped it)."""
        if pid != self.successor_pid or self.sup.stopping:
            return
        self.successor_pid = 0
        code = os.waitstatus_to_exitcode(status)
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        self.sup.ops.upgrade_failed(pid, f"the new instance exited ({why})")
        self._run_pending_reload()

    def forward(self, sig: signal.Signals | None) -> None:
        """A SIGTERM/SIGINT while this process drains after a takeover in the foreground: it is
        meant for the instance that serves now (this process becomes the keeper that forwards)."""
        if sig is None or not (self.keep and self.handed_to):
            return
        pid = serving_pid(self.sup.runfile_path, self.handed_to)
        log.info("%s: forwarding it to pid %d, which serves now", sig.name, pid)
        with contextlib.suppress(OSError):
            os.kill(pid, sig)

    # --- a reload during a takeover ---

    def reload(self, run: Any) -> dict[str, Any]:
        """SIGHUP / `fastlb reload`: run() it now, or, while a takeover is under way, remember it
        for the successor (or forward it, once the successor has taken over)."""
        path = self.sup.config.file
        if self.handed_to:
            log.info("reload: taken over by pid %d; forwarding the reload (SIGHUP) to it", self.handed_to)
            try:
                os.kill(self.handed_to, signal.SIGHUP)
            except OSError as exc:
                return {
                    "ok": False,
                    "file": path,
                    "error": f"reload not forwarded to pid {self.handed_to}: {exc}",
                }
            return {"ok": True, "file": path, "applied": [], "needs_restart": [], "forwarded": self.handed_to}
        if self.successor_pid:
            self.pending_reload = True
            log.info(
                "reload: a takeover by pid %d is under way; it re-reads %s once it is ready",
                self.successor_pid,
                path,
            )
            return {
                "ok": True,
                "file": path,
                "applied": [],
                "needs_restart": [],
                "deferred": True,
                "pid": os.getpid(),
                "successor": self.successor_pid,
                "control_socket": self.sup.config.global_.control_socket,
            }
        return run()

    def _run_pending_reload(self) -> None:
        if self.pending_reload:
            self.pending_reload = False
            log.info(
                "reload: the takeover failed; re-reading %s for the reload asked during it",
                self.sup.config.file,
            )
            asyncio.get_running_loop().call_soon(self.sup.reload)

    # --- the control socket's takeover requests ---

    def answer(self, req: dict[str, Any], writer: Any) -> dict[str, Any] | None:
        """Handle a takeover request on the control socket of the running instance.

        "upgrade": start `fastlb serve --takeover` from this process (as SIGUSR2 does); the reply
        names the new pid ("successor"), which is not ready yet.  "abandon": that successor failed
        to start (its "error" is kept for `fastlb status`'s "upgrade"); this instance goes on.
        "handover": send the reply line with every listening socket attached (SCM_RIGHTS) and the
        carried state straight on the connection's socket and return None (already answered).
        "shutdown": begin a graceful shutdown (like SIGTERM) after the reply, which says whether a
        reload is pending; with "successor": PID, systemd is told that PID is the main process now."""
        sup = self.sup
        cmd = req.get("cmd")
        if cmd == "handover":
            table = sup.listeners.table() + sup.service_sockets()
            fds = [t["fd"] for t in table]
            carried = Carried(discovered_sets(sup.discovery)).to_message()
            reply = {"ok": True, "pid": os.getpid(), "listeners": table, "fds": len(fds), "carried": carried}
            sock = writer.get_extra_info("socket")
            raw = socket.socket(fileno=os.dup(sock.fileno()))
            try:
                send_with_fds(raw, _json_line(reply), fds)
            finally:
                raw.close()
            n_sets = len(carried["discovered"])
            log.info(
                "handover: sent %d listening sockets%s to pid %s",
                len(fds),
                f" and {n_sets} discovered backend sets" if n_sets else "",
                req.get("pid"),
            )
            return None
        if cmd == "upgrade":
            why = self.upgrade()
            if why is not None:
                return {"ok": False, "error": f"upgrade not started: {why}"}
            return {"ok": True, "pid": os.getpid(), "successor": self.successor_pid}
        if cmd == "abandon":  # the successor gave up before taking over: this instance keeps running
            successor, error = req.get("successor"), req.get("error")
            if isinstance(successor, int) and not isinstance(successor, bool):
                sup.ops.upgrade_failed(successor, str(error) if error else "the new instance did not start")
                if successor == self.successor_pid:
                    self.successor_pid = 0
                    self._run_pending_reload()
            return {"ok": True, "pid": os.getpid()}
        if cmd == "shutdown":
            successor = req.get("successor")
            if not isinstance(successor, int) or isinstance(successor, bool):
                successor = None
            pending, self.pending_reload = self.pending_reload, False
            if successor is not None:
                self.handed_to = successor
                if pending:
                    log.info("reload: handing the reload asked during the takeover to pid %d", successor)
            return {"ok": True, "pid": os.getpid(), "successor": successor, "pending_reload": pending}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # --- letting go of the HTTP services ---

    def release_services(self) -> None:
        """Taken over: /metrics and the admin API stop accepting (the successor serves the same
        sockets), answer what they accepted already, then close (a task; see services_released)."""
        if self._services is None:
            self._services = asyncio.ensure_future(self._release())

    async def _release(self) -> None:
        sup = self.sup
        admin = sup.admin.hand_over(SERVICES_GRACE) if sup.admin is not None else _nothing()
        await asyncio.gather(sup.ops.hand_over_metrics(SERVICES_GRACE), admin, return_exceptions=True)

    async def services_released(self) -> None:
        if self._services is not None:
            with contextlib.suppress(Exception):
                await self._services


async def stop_accepting(server: asyncio.AbstractServer | None) -> None:
    """Stop accepting on an asyncio server without losing a connection it accepted already, then
    close it.  asyncio accepts a burst of connections and makes their transports one loop turn
    later; Server.close() in between makes those fail (`assert self._sockets is not None` in
    Server._attach) and drops them unanswered (a reset, or a hang until the socket is collected).
    So: stop watching the listening sockets first, let the accepted ones attach, then close."""
    if server is None:
        return
    if hasattr(server, "stop_accepting"):  # fastlb.fleet.http_guard.GuardedServer (or its holder)
        await server.stop_accepting()
        return
    loop = asyncio.get_running_loop()
    for s in server.sockets or ():
        loop.remove_reader(s.fileno())
    for _ in range(3):
        await asyncio.sleep(0)
    server.close()


async def _nothing() -> None:
    return None


def _json_line(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode() + b"\n"


def send_with_fds(s: socket.socket, line: bytes, fds: list[int]) -> None:
    """line with the first SCM_MAX fds, then one NUL byte per further SCM_MAX fds (a stream socket
    never merges data across messages that carry descriptors)."""
    chunks = [fds[i : i + SCM_MAX] for i in range(0, len(fds), SCM_MAX)] or [[]]
    for k, chunk in enumerate(chunks):
        data = line if k == 0 else b"\0"
        while data:
            select.select([], [s], [], HANDOVER_TIMEOUT)
            try:
                n = socket.send_fds(s, [data], chunk) if chunk else s.send(data)
            except BlockingIOError:
                continue
            data = data[n:]
            chunk = []


def takeover_request(line: bytes) -> dict | None:
    """The request if it is one Handover.answer takes (TAKEOVER_COMMANDS), else None."""
    import json

    if not any(c.encode() in line for c in TAKEOVER_COMMANDS):
        return None
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        return None  # handle_request answers it (with the one-line error)
    if isinstance(req, dict) and req.get("cmd") in TAKEOVER_COMMANDS:
        return req
    return None


# --- the foreground keeper ------------------------------------------------------------------------


def become_keeper(successor: int, runfile_path: str) -> None:
    """Replace this (drained) control process with the keeper: same pid, same parent, same
    stdout/stderr, so the shell or supervisor that started `fastlb serve` keeps waiting."""
    argv = [sys.executable, "-m", "fastlb.runtime.handover", str(successor), runfile_path]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def serving_pid(runfile_path: str, default: int) -> int:
    """The control process that serves now (the runtime file names it), else default."""
    from fastlb.runtime import runfile

    rf = runfile.read(runfile_path)
    return rf.control_pid if rf is not None and rf.control_alive() else default


def keep(main: int, runfile_path: str) -> int:
    """The keeper's loop: wait for every child (the successors adopted as a subreaper), forward
    the operator's signals to whichever fastlb serves now, exit with the last one's exit code."""
    set_title()
    current = [main]

    def serving() -> int:
        return serving_pid(runfile_path, current[0])

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            os.kill(serving(), sig)

    for sig in KEEPER_SIGNALS:
        signal.signal(sig, forward)
    code = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return code
        if pid == current[0]:
            rc = os.waitstatus_to_exitcode(status)
            code = 128 - rc if rc < 0 else rc
            nxt = serving()
            if nxt != pid:
                current[0] = nxt


if __name__ == "__main__":  # become_keeper() runs this module: `python -m fastlb.runtime.handover PID FILE`
    sys.exit(keep(int(sys.argv[1]), sys.argv[2]))
