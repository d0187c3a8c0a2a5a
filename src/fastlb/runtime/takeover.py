"""One fastlb per address and control socket; the successor's side of taking over from a running or
crashed predecessor (what is handed over, and the predecessor's side: runtime/handover.py).

Before a new `fastlb serve` opens anything, `prepare()` looks at what already runs for this config:

* The control socket answers: another fastlb runs.  Without `--takeover` that is a refusal (one
  line naming its pid).  With `--takeover` it is a live takeover: the new process asks for the
  listening sockets (`{"cmd": "handover"}`, answered with the descriptors over SCM_RIGHTS and a
  table saying which is which; the /metrics and admin API sockets too, as worker -1), starts its
  own workers on them (and serves the discovered backend sets it was handed), replaces the control
  socket path, and then sends `{"cmd": "shutdown"}` on the same connection: the old instance stops accepting and
  drains its connections up to its shutdown_timeout.
* The runtime file (runtime/runfile.py) names a dead control process whose workers still run
  (orphans, core/orphan.pxi): a crash takeover.  Their listening sockets are fetched with
  pidfd_getfd(2) (or, where that is refused, new SO_REUSEPORT sockets join their group), the new
  workers start on them, then the orphans get SIGTERM and drain.  Processes are identified by pid
  plus start time, never by name.
* Any listener address that is bound by something else: a refusal (the probe does not use
  SO_REUSEPORT).

The sockets carry their accept queues with them, so nothing queued is lost across a takeover.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from fastlb.config import Config
from fastlb.runtime import runfile
from fastlb.runtime.handover import HANDOVER_TIMEOUT, SCM_MAX, Carried
from fastlb.runtime.listeners import BindError, Key, bind_key, check_free, is_listening_on

log = logging.getLogger("fastlb")

SYS_PIDFD_GETFD = 438  # the same number on every architecture (Linux 5.6)


class TakeoverError(Exception):
    """fastlb must not start: another instance runs, or an address is taken (one-line message)."""


# --- the predecessor, as seen by the new instance -------------------------------------------------


@dataclass
class Predecessor:
    """What prepare() found: sockets to inherit, and how to retire whoever held them."""

    kind: str = "none"  # "none" | "live" | "orphans"
    pid: int = 0  # the old control process
    sockets: dict[Key, socket.socket] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)  # bind addresses the predecessor holds
    # the HTTP services' listening sockets ("metrics/ADDR", "admin/ADDR"), worker -1 in the table
    services: dict[str, socket.socket] = field(default_factory=dict)
    carried: Carried = field(default_factory=Carried)  # discovered sets, a pending reload (handover.py)
    _conn: socket.socket | None = None  # live: the handover connection, kept for "shutdown"
    _orphans: list[tuple[int, int]] = field(default_factory=list)  # (pid, pidfd)

    def finish(self) -> None:
        """The new workers are ready: retire the predecessor (never raises)."""
        if self.kind == "live" and self._conn is not None:
            try:
                _send_line(self._conn, {"cmd": "shutdown", "successor": os.getpid()})
                reply, _ = _recv_reply(self._conn, 0)
                if not reply.get("ok"):
                    log.error(
                        "takeover: old instance %d refused to shut down: %s", self.pid, reply.get("error")
                    )
                else:
                    log.info("takeover: old instance %d stops accepting and drains", self.pid)
                    self.carried.pending_reload = reply.get("pending_reload") is True
            except (OSError, ValueError) as exc:
                log.error("takeover: telling old instance %d to shut down failed: %s", self.pid, exc)
            finally:
                self._conn.close()
                self._conn = None
        for pid, pidfd in self._orphans:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                log.info("takeover: orphaned worker %d told to drain", pid)
            except OSError as exc:
                log.info("takeover: orphaned worker %d: %s", pid, exc.strerror)
            finally:
                os.close(pidfd)
        self._orphans = []

    def abandon(self, reason: str | None = None) -> None:
        """Startup failed: leave the predecessor as it was (the live one keeps running).  The live
        one is told why (`{"cmd": "abandon"}`), so the reload or upgrade that started this instance
        can report it."""
        if self._conn is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.settimeout(2.0)
                _send_line(self._conn, {"cmd": "abandon", "successor": os.getpid(), "error": reason})
                _recv_reply(self._conn, 0)
            self._conn.close()
            self._conn = None
        for _, pidfd in self._orphans:
            os.close(pidfd)
        self._orphans = []
        for s in [*self.sockets.values(), *self.services.values()]:
            s.close()
        self.sockets.clear()
        self.services.clear()


def prepare(config: Config, takeover: bool) -> Predecessor:
    """Decide how this instance starts (see the module docstring); raises TakeoverError."""
    path = config.global_.control_socket
    pred = Predecessor()
    running = _ask_status(path)
    if running is not None:
        if not takeover:
            raise TakeoverError(
                f"fastlb is already running with control socket {path} (pid {running}); "
                "use `fastlb serve --takeover` to replace it"
            )
        pred = _live_handover(path, running)
    else:
        rf = runfile.read(runfile.path_for(path))
        if rf is not None and rf.control_pid != os.getpid():
            if rf.control_alive():
                raise TakeoverError(
                    f"fastlb pid {rf.control_pid} is running for {path} but its control socket does not answer"
                )
            orphans = rf.live_workers()
            if orphans:
                pred = _crash_takeover(rf, orphans)
    try:
        for lc in config.listeners.values():
            if bind_key(lc) not in pred.shared:
                check_free(lc)
    except BindError as exc:
        pred.abandon(str(exc))
        raise TakeoverError(str(exc)) from None
    return pred


def _ask_status(path: str) -> int | None:
    """The pid of the fastlb answering on control socket `path`, or None if nothing answers."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(5.0)
            s.connect(path)
            _send_line(s, {"cmd": "status"})
            reply, _ = _recv_reply(s, 0)
    except (OSError, ValueError):
        return None
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return int(reply["status"]["pid"])
    return 0


def _live_handover(path: str, pid: int) -> Predecessor:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(HANDOVER_TIMEOUT)
        s.connect(path)
        _send_line(s, {"cmd": "handover", "pid": os.getpid()})
        reply, fds = _recv_reply(s, -1)
    except (OSError, ValueError) as exc:
        s.close()
        raise TakeoverError(f"takeover: handover from fastlb pid {pid} failed: {exc}") from None
    if not reply.get("ok"):
        s.close()
        for fd in fds:
            os.close(fd)
        raise TakeoverError(f"takeover: fastlb pid {pid} refused the handover: {reply.get('error')}")
    carried = Carried.from_message(reply.get("carried"))
    pred = Predecessor(kind="live", pid=int(reply.get("pid", pid)), carried=carried, _conn=s)
    entries = reply.get("listeners", [])
    for entry, fd in zip(entries, fds, strict=False):
        sock = socket.socket(fileno=fd)
        if int(entry["worker"]) < 0:  # an HTTP service's socket (metrics, admin API)
            pred.services[str(entry["bind"])] = sock
            continue
        pred.sockets[(str(entry["bind"]), int(entry["worker"]))] = sock
        pred.shared.add(str(entry["bind"]))
    for fd in fds[len(entries) :]:
        os.close(fd)
    log.info("takeover: received %d listening sockets from fastlb pid %d", len(pred.sockets), pred.pid)
    return pred


def _pidfd_getfd(pidfd: int, target: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(
        ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(target), ctypes.c_long(0)
    )
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _crash_takeover(rf: runfile.RunFile, orphans: list[runfile.WorkerEntry]) -> Predecessor:
    pred = Predecessor(kind="orphans", pid=rf.control_pid)
    log.warning(
        "control process %d is gone; taking over from its %d orphaned workers (%s)",
        rf.control_pid,
        len(orphans),
        ", ".join(str(w.pid) for w in orphans),
    )
    fallback = False
    for w in orphans:
        try:
            pidfd = os.pidfd_open(w.pid)
        except OSError:
            continue
        if not runfile.alive(w.pid, w.start_time):  # the pid was reused before pidfd_open
            os.close(pidfd)
            continue
        pred._orphans.append((w.pid, pidfd))
        for entry in w.listeners:
            bind = str(entry["bind"])
            pred.shared.add(bind)
            try:
                sock = socket.socket(fileno=_pidfd_getfd(pidfd, int(entry["fd"])))
            except OSError as exc:
                fallback = True
                log.debug("pidfd_getfd(%d, %s): %s", w.pid, entry["fd"], exc.strerror)
                continue
            pred.sockets[(bind, w.index)] = sock
    if fallback:
        log.warning(
            "could not fetch some listening sockets from the orphaned workers (pidfd_getfd needs ptrace "
            "rights); joining their SO_REUSEPORT groups with new sockets instead: connections queued on the "
            "orphans' sockets when they close are reset unless net.ipv4.tcp_migrate_req = 1"
        )
    return pred


# --- the wire: one JSON line each way (the handover reply: handover.send_with_fds) ---------------


def _send_line(s: socket.socket, req: dict[str, Any]) -> None:
    s.sendall(json.dumps(req).encode() + b"\n")


def _recv_reply(s: socket.socket, n_fds: int) -> tuple[dict[str, Any], list[int]]:
    """One reply line and, if n_fds is -1, the descriptors its "fds" field announces."""
    buf = b""
    fds: list[int] = []
    want: int | None = None if n_fds < 0 else n_fds
    while True:
        if b"\n" in buf:
            reply = json.loads(buf[: buf.index(b"\n")])
            if want is None:
                want = int(reply.get("fds", 0)) if isinstance(reply, dict) else 0
            if len(fds) >= want:
                return reply, fds
        data, got, _, _ = socket.recv_fds(s, 65536, SCM_MAX)
        fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ValueError("connection closed before the reply")
        buf += data


__all__ = ["Predecessor", "TakeoverError", "is_listening_on", "prepare"]
