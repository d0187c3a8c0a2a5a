"""Operations services of the control process: the Prometheus /metrics server and the record of
the last reload, both started and stopped with `fastlb serve` (fastlb.runtime.supervisor)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastlb.config import Config
from fastlb.observe.metrics import MetricsSource, start_metrics_server

log = logging.getLogger("fastlb")


class OpsServices:
    """The metrics endpoint ([global] metrics) and reload bookkeeping."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._metrics: asyncio.AbstractServer | None = None
        self.reloads = {"ok": 0, "failed": 0}
        self.last_reload: dict[str, Any] | None = None

    async def start(self, source: MetricsSource) -> None:
        addr = self.config.global_.metrics
        if addr is None:
            return
        try:
            self._metrics = await start_metrics_server(source, addr.host, addr.port)
        except OSError as exc:
            log.error("metrics: cannot listen on %s: %s (metrics disabled)", addr, exc.strerror or exc)
            return
        log.info("metrics: serving http://%s/metrics", addr)

    async def stop(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def record_reload(self, result: dict[str, Any]) -> None:
        self.reloads["ok" if result.get("ok") else "failed"] += 1
        self.last_reload = dict(result, time=time.time())

    def status(self) -> dict[str, Any]:
        addr = self.config.global_.metrics
        return {
            "metrics": None if addr is None else str(addr),
            "reload": {
                "ok_total": self.reloads["ok"],
                "failed_total": self.reloads["failed"],
                "last": self.last_reload,
            },
        }
