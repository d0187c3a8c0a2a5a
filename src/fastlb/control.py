"""Runtime control of a running `fastlb serve`: the Python API the CLI uses, and the server side.

Transport: a unix stream socket (`global.control_socket`, mode 0600, so file permissions decide
who may talk to it), one JSON object per line each way.  Requests:
  {"cmd": "status"}
  {"cmd": "set-weight", "pool": P, "backend": B, "weight": W}
  {"cmd": "drain" | "enable" | "disable", "pool": P, "backend": B}
Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.  A malformed or unknown request
changes nothing.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastlb.backends import BackendSlot
    from fastlb.supervisor import Supervisor

MAX_WEIGHT = 1000
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """The control socket could not be reached, or the request was refused (message says why)."""


class ControlClient:
    """Talks to one fastlb control socket."""

    __slots__ = ("path", "timeout")

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                s.sendall(json.dumps(req).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as exc:
            raise ControlError(f"cannot reach fastlb at {self.path}: {exc.strerror or exc}") from None
        try:
            reply = json.loads(buf)
        except ValueError:
            raise ControlError(f"garbled reply from {self.path}") from None
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "request refused"))
        return reply

    def status(self) -> dict[str, Any]:
        return self.request({"cmd": "status"})["status"]

    def set_weight(self, pool: str, backend: str, weight: int) -> dict[str, Any]:
        return self.request({"cmd": "set-weight", "pool": pool, "backend": backend, "weight": weight})

    def drain(self, pool: str, backend: str) -> dict[str, Any]:
        return self.request({"cmd": "drain", "pool": pool, "backend": backend})

    def enable(self, pool: str, backend: str) -> dict[str, Any]:
        return self.request({"cmd": "enable", "pool": pool, "backend": backend})

    def disable(self, pool: str, backend: str) -> dict[str, Any]:
        return self.request({"cmd": "disable", "pool": pool, "backend": backend})


# --- server side (runs in the control process) --------------------------------------------------

ADMIN_FOR = {"drain": "drain", "enable": "ready", "disable": "maint"}


def _find(sup: Supervisor, req: dict[str, Any]) -> BackendSlot:
    pool, backend = req.get("pool"), req.get("backend")
    if not isinstance(pool, str) or not isinstance(backend, str):
        raise ControlError("'pool' and 'backend' must be strings")
    try:
        return sup.backends.find(pool, backend)
    except KeyError as exc:
        raise ControlError(exc.args[0]) from None


def handle_request(sup: Supervisor, line: bytes) -> dict[str, Any]:
    """Apply one request line; never raises, never half-applies."""
    try:
        if len(line) > MAX_REQUEST:
            raise ControlError("request too long")
        try:
            req = json.loads(line)
        except ValueError:
            raise ControlError("request is not JSON (one JSON object per line)") from None
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ControlError("request must be a JSON object with a string 'cmd'")
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "status": sup.status()}
        if cmd == "set-weight":
            slot = _find(sup, req)
            w = req.get("weight")
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
                raise ControlError(f"weight must be an integer 0..{MAX_WEIGHT}, got {w!r}")
            old = slot.weight
            sup.backends.set_weight(slot, w)
            return {"ok": True, "pool": slot.pool, "backend": slot.name, "weight": w, "previous": old}
        if cmd in ADMIN_FOR:
            slot = _find(sup, req)
            old = slot.admin
            sup.backends.set_admin(slot, ADMIN_FOR[cmd])
            return {"ok": True, "pool": slot.pool, "backend": slot.name, "admin": slot.admin, "previous": old}
        raise ControlError(f"unknown command {cmd!r} (status, set-weight, drain, enable, disable)")
    except ControlError as exc:
        return {"ok": False, "error": str(exc)}
