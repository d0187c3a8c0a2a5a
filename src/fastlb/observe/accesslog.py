"""The access log's consumer side: one line per ended connection, drained from the workers' rings.

Workers write fixed-size records into their own ring in shared memory (core/accesslog.pxi) and never
wait for this process; a full ring drops records and counts them (`dropped`, in status and metrics).
This process drains every ring every DRAIN_INTERVAL and writes the lines to `[global] access_log`
("stdout", a file path, or "off").  SIGUSR1 reopens the file (logrotate's `postrotate`).

Formats (`[global] access_log_format`):
  json (default): {"time": "2026-12-02T00:41:07.123456Z", "client": "10.0.0.7:51544",
                   "listener": "web", "route": "default", "pool": "web", "backend": "a",
                   "connect_ms": 0.21, "duration_ms": 12.5, "bytes_in": 517, "bytes_out": 2048,
                   "retries": 0, "termination": "client_close"}
  text: 2026-12-02T00:41:07.123456Z 10.0.0.7:51544 web/default web/a connect=0.21ms
        duration=12.50ms in=517 out=2048 retries=0 client_close       (one line, fields space-separated)
A field with no value (no backend was reached, no route) is null in json and "-" in text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger("fastlb")

DRAIN_INTERVAL = 0.1  # seconds between drains of the rings
NONE = 0xFFFFFFFF

# enum flb_term (shm_layout.h), in order
TERMINATIONS = (
    "client_close",
    "backend_close",
    "client_reset",
    "backend_reset",
    "connect_failed",
    "no_backend",
    "connect_timeout",
    "idle_timeout",
    "half_close_timeout",
    "drain_deadline",
    "shutdown_deadline",
    "prelude_error",
    "local_error",
    "client_gone",
    "responses",
    "backend_unreachable",
    "backend_down",
    "client_lost",
    "backend_lost",
)
FORMATS = ("json", "text")


class Names:
    """Index -> name maps for listeners, routes, pools and backends; `refresh()` re-reads the
    backend and route maps (they change with reloads and discovery) once per drain."""

    def __init__(
        self,
        listeners: list[str],
        pools: list[str],
        backends: Callable[[], dict[int, str]],
        routes: Callable[[], dict[int, str]] | None = None,
    ) -> None:
        self.listeners = listeners
        self.pools = pools
        self._backends = backends
        self._routes = routes or dict
        self.backends: dict[int, str] = {}
        self.routes: dict[int, str] = {}

    def refresh(self) -> None:
        self.backends = self._backends()
        self.routes = self._routes()


class AccessLog:
    """Drains the region's access-log rings into one destination."""

    def __init__(self, region: Any, n_workers: int, destination: str, fmt: str, names: Names) -> None:
        self.region = region
        self.n_workers = n_workers
        self.destination = destination
        self.format = fmt
        self.names = names
        self.written = 0
        self.write_errors = 0
        self._out: IO[str] | None = None
        self._task: asyncio.Task | None = None

    # --- destination -----------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or reopen, after logrotate moved the file) the destination."""
        if self.destination == "stdout":
            self._out = sys.stdout
            return
        old = self._out
        try:
            os.makedirs(os.path.dirname(self.destination) or ".", exist_ok=True)
            self._out = open(self.destination, "a", encoding="utf-8", buffering=1 << 16)  # noqa: SIM115
        except OSError as exc:
            log.error(
                "access log %s: cannot open: %s (records are counted, not written)", self.destination, exc
            )
            self._out = None
        if old is not None and old is not sys.stdout:
            with contextlib.suppress(OSError):
                old.close()

    def reopen(self) -> None:
        self.drain()
        self.open()
        log.info("access log reopened: %s", self.destination)

    def dropped(self) -> list[int]:
        return [self.region.log_dropped(i) for i in range(self.n_workers)]

    # --- draining --------------------------------------------------------------------------------

    def start(self) -> None:
        self.open()
        self._task = asyncio.create_task(self._loop(), name="access-log")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.drain()  # the last connections of a stopping instance
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_INTERVAL)
            try:
                self.drain()
            except Exception:
                log.exception("access log: draining failed")

    def drain(self) -> int:
        """Write every record the rings hold now; returns how many.  The lines are formatted in C
        (Region.log_drain_lines) with the names encoded once per drain."""
        enc = None
        texts: list[bytes] = []
        count = 0
        for w in range(self.n_workers):
            if enc is None:
                enc = self._encoded()
            text, n = self.region.log_drain_lines(w, self.format == "json", *enc)
            if n:
                texts.append(text)
                count += n
        if texts and self._out is not None:
            try:
                self._out.write(b"".join(texts).decode("utf-8", "replace"))
                self._out.flush()
            except OSError as exc:
                self.write_errors += 1
                if self.write_errors == 1:
                    log.error("access log %s: write failed: %s", self.destination, exc)
        self.written += count
        return count

    def _encoded(self) -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], list[bytes]]:
        """The name tables log_drain_lines() prints from: listeners, routes, pools, backends and
        terminations by index, each already a JSON literal (json) or plain text (text)."""
        self.names.refresh()
        none = b"null" if self.format == "json" else b"-"

        def enc(name: str | None) -> bytes:
            if name is None:
                return none
            return json.dumps(name).encode() if self.format == "json" else name.encode()

        def table(by_index: dict[int, str]) -> list[bytes]:
            out = [none] * (max(by_index, default=-1) + 1)
            for i, name in by_index.items():
                out[i] = enc(name)
            return out

        n = self.names
        return (
            [enc(x) for x in n.listeners],
            table(n.routes),
            [enc(x) for x in n.pools],
            table(n.backends),
            [enc(x) for x in TERMINATIONS],
        )
