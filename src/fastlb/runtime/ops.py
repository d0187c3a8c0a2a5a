"""Operations services of the control process: the Prometheus /metrics server and the record of
reloads and upgrades (takeovers this instance started), started and stopped with `fastlb serve` (fastlb.runtime.supervisor).

prometheus_client is imported only when metrics are on: it imports ssl, and the control process
otherwise keeps OpenSSL (about 4 MiB resident) out (see fastlb.cli._keep_openssl_out)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fastlb.config import Address, Config

if TYPE_CHECKING:
    from fastlb.observe.metrics import MetricsServer, MetricsSource

log = logging.getLogger("fastlb")


def _bind(addr: Address) -> socket.socket:
    """A listening TCP socket on addr (raises OSError), for the metrics server."""
    s = socket.socket(addr.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr.sockaddr())
        s.listen(64)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class OpsServices:
    """The metrics endpoint ([global] metrics) and reload bookkeeping."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._metrics: MetricsServer | None = None
        self._metrics_sock: socket.socket | None = None  # what a takeover's handover passes on
        self.inherited: dict[str, socket.socket] = {}  # from a predecessor (runtime/takeover.py)
        self._tasks: set[asyncio.Task] = set()
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload: dict[str, Any] | None = None
        # the last successor this instance started (fastlb upgrade, SIGUSR2, a reload's takeover)
        self.upgrade: dict[str, Any] | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run coro on the loop, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self, source: MetricsSource) -> None:
        addr = self.config.global_.metrics
        if addr is None:
            return
        sock = self.inherited.pop(f"metrics/{addr}", None)  # a takeover: the same socket, queue and all
        try:
            sock = sock or _bind(addr)
        except OSError as exc:
            log.error("metrics: cannot listen on %s: %s (metrics disabled)", addr, exc.strerror or exc)
            return
        from fastlb.observe.metrics import start_metrics_server

        self._metrics_sock = sock
        self._metrics = await start_metrics_server(source, sock)
        log.info("metrics: serving http://%s/metrics", addr)

    def service_sockets(self) -> list[dict[str, Any]]:
        """The metrics socket as a handover table entry (worker -1), if metrics are served."""
        addr, sock = self.config.global_.metrics, self._metrics_sock
        if addr is None or sock is None or self._metrics is None:
            return []
        return [{"name": "metrics", "bind": f"metrics/{addr}", "worker": -1, "fd": sock.fileno()}]

    def close_inherited(self) -> None:
        """Startup is over: close what a predecessor passed on that this configuration does not use."""
        for s in self.inherited.values():
            s.close()
        self.inherited.clear()

    async def hand_over_metrics(self, grace: float) -> None:
        """Taken over: stop accepting scrapes (the successor serves the same socket from now on),
        and answer the ones already accepted (up to grace seconds) before this process lets go."""
        from fastlb.runtime.handover import stop_accepting

        server, self._metrics = self._metrics, None
        if server is None:
            return
        await stop_accepting(server)
        deadline = time.monotonic() + grace
        # asyncio's Server counts its live connections (_active_count); each ends after its answer
        while getattr(server, "_active_count", 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def move_metrics(self, source: MetricsSource, addr: Address | None) -> None:
        """Reload: serve metrics on addr (None: off) instead; raises OSError if it cannot listen."""
        sock = _bind(addr) if addr is not None else None
        old, self._metrics = self._metrics, None
        self._metrics_sock = sock
        if old is not None:
            old.close()

        async def serve() -> None:
            from fastlb.observe.metrics import start_metrics_server

            if sock is not None:
                self._metrics = await start_metrics_server(source, sock)
                log.info("metrics: serving http://%s/metrics", addr)

        self.spawn(serve())

    async def stop(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for t in list(self._tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def record_reload(self, result: dict[str, Any]) -> None:
        self.reloads["ok" if result.get("ok") else "failed"] += 1
        self.last_reload = dict(result, time=time.time())

    def record_upgrade(self, successor: int, reason: str) -> None:
        self.upgrade = {"successor": successor, "reason": reason, "time": time.time(), "error": None}

    def upgrade_failed(self, successor: int, error: str) -> None:
        """The successor gave up (it says why over the handover connection) or exited: the first
        reason is the one kept; this instance keeps running."""
        up = self.upgrade
        if up is None or up["successor"] != successor:  # a `fastlb serve --takeover` run by hand
            up = self.upgrade = {
                "successor": successor,
                "reason": "takeover",
                "time": time.time(),
                "error": None,
            }
        if up["error"] is None:
            up["error"] = error
            log.error("takeover by pid %d failed, this instance keeps running: %s", successor, error)

    def status(self) -> dict[str, Any]:
        addr = self.config.global_.metrics
        return {
            "upgrade": self.upgrade,
            "metrics": None if addr is None else str(addr),
            "reload": {
                "ok_total": self.reloads["ok"],
                "failed_total": self.reloads["failed"],
                "last": self.last_reload,
            },
        }
