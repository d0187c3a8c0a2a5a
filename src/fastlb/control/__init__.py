"""Runtime control of a running `fastlb serve`: the Python API the CLI uses (ControlClient).

The server side, which runs in the control process, is fastlb.control.server.

Transport: a unix stream socket (`global.control_socket`, mode 0600, so file permissions decide
who may talk to it), one JSON object per line each way.  Requests:
  {"cmd": "status"}
  {"cmd": "set-weight", "pool": P, "backend": B, "weight": W}
  {"cmd": "drain" | "enable" | "disable", "pool": P, "backend": B}
  {"cmd": "set-split", "listener": L, "route": R, "weights": {"v1": 0, "v2": 100}}
    -> {"ok": true, "listener": L, "route": R, "weights": {...}, "previous": {...}}
  {"cmd": "upgrade"}  (like SIGUSR2: start `fastlb serve --takeover`; -> {"successor": PID})
  {"cmd": "shutdown"}  (like SIGTERM; with "successor": PID, that pid is the new main process)
  {"cmd": "handover", "pid": PID}  (the listening sockets, as SCM_RIGHTS descriptors: see
      fastlb.runtime.takeover and docs/failure-behaviour.md; used by `fastlb serve --takeover`)
  {"cmd": "abandon", "successor": PID, "error": E}  (that takeover gave up; status "upgrade")
  {"cmd": "reload"} -> {"ok": true, "file": F, "applied": [...], "needs_restart": [...]}
                       (+ "takeover": [...], "pid", "successor": PID, "control_socket" when a
                       takeover applies the rest; "ignored": [...]; "takeover_error")
                       or {"ok": false, "error": "reload refused, nothing changed: ..."}
  {"cmd": "rollout-start" | "rollout-status" | "rollout-pause" | ... | "switch", ...}
    (see fastlb.deploy.requests)
Replies: {"ok": true, ...} or {"ok": false, "error": "..."}.  A malformed or unknown request
changes nothing.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

MAX_WEIGHT = 1000
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """The control socket could not be reached, or the request was refused (message says why)."""


class ControlClient:
    """Talks to one fastlb control socket."""

    __slots__ = ("path", "timeout", "on_warning")

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        # called with a reply's "warning" (a change applied but not kept across a restart)
        self.on_warning: Callable[[str], None] | None = None

    def _checked(self, reply: dict[str, Any]) -> dict[str, Any]:
        """The reply if it says ok (its warning passed to on_warning), else ControlError."""
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise ControlError(error or "request refused")
        if reply.get("warning") and self.on_warning is not None:
            self.on_warning(str(reply["warning"]))
        return reply

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
        return self._checked(reply)

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

    def set_split(self, listener: str, route: str, weights: dict[str, int]) -> dict[str, Any]:
        """Replace the whole split of ROUTE on LISTENER (pools not named get weight 0) in one
        publish; connections accepted after the reply go by it.  Reply: weights, previous."""
        return self.request({"cmd": "set-split", "listener": listener, "route": route, "weights": weights})

    def upgrade(self) -> dict[str, Any]:
        """Ask the running fastlb to start its successor (`fastlb serve --takeover`)."""
        return self.request({"cmd": "upgrade"})

    def reload(self) -> dict[str, Any]:
        """Re-read the config file; raises ControlError (nothing changed) if it is refused."""
        return self.request({"cmd": "reload"})

    # --- deployments (fastlb.deploy.requests) ------------------------------------------------------

    def rollout_start(
        self, listener: str | None = None, route: str | None = None, to: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Start a canary rollout of pool `to` on ROUTE of LISTENER (or rollout=NAME for a
        [rollouts.NAME] table).  options: from_ (or "from"), name, steps, interval, pause_at,
        threshold, max_failure_rate, max_early_reset_rate, max_reset_rate, max_unhealthy, max_connect_time,
        min_connections, check, check_timeout, in the config file's forms ("30s", "1%")."""
        if "from_" in options:
            options["from"] = options.pop("from_")
        req = {"cmd": "rollout-start", "listener": listener, "route": route, "to": to, **options}
        return self.request({k: v for k, v in req.items() if v is not None})["rollout"]

    def rollout_status(self, name: str | None = None) -> list[dict[str, Any]]:
        return self.request({"cmd": "rollout-status", **({"name": name} if name else {})})["rollouts"]

    def rollout_action(self, action: str, name: str | None = None) -> dict[str, Any]:
        """action: pause | resume | promote | abort."""
        return self.request({"cmd": f"rollout-{action}", **({"name": name} if name else {})})["rollout"]

    def switch(
        self,
        listener: str,
        route: str,
        pool: str | None = None,
        *,
        drain_old: bool = False,
        back: bool = False,
    ) -> dict[str, Any]:
        """Blue-green: every new connection of the route to `pool` (or back to the previous side)."""
        req: dict[str, Any] = {"cmd": "switch", "listener": listener, "route": route, "drain_old": drain_old}
        if back:
            req["back"] = True
        else:
            req["pool"] = pool
        return self.request(req)["switch"]
