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
import socket
import struct
import sys
import time
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
)
FORMATS = ("json", "text")


def client_address(sa: bytes) -> str | None:
    """sockaddr_in / sockaddr_in6 bytes -> "ip:port" / "[ip]:port"."""
    if len(sa) < 8:
        return None
    family = struct.unpack_from("=H", sa)[0]
    port = struct.unpack_from("!H", sa, 2)[0]
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, sa[4:8])}:{port}"
    if family == socket.AF_INET6 and len(sa) >= 24:
        return f"[{socket.inet_ntop(socket.AF_INET6, sa[8:24])}]:{port}"
    return None


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
        self._sec = -1
        self._prefix = ""
        self._clients: dict[bytes, str | None] = {}

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

    # --- formatting: the control process formats every record, so this is its hot path ----------
    # (per-second time prefixes, names and client addresses are cached: a record costs a few
    # dictionary lookups and one f-string, not a datetime and a json.dumps)

    def _time(self, end_us: int) -> str:
        sec, us = divmod(end_us, 1_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{us:06d}Z"

    def _client(self, sa: bytes) -> str | None:
        cached = self._clients.get(sa, _MISSING)
        if cached is _MISSING:
            if len(self._clients) >= CLIENT_CACHE:
                self._clients.clear()
            cached = self._clients[sa] = client_address(sa)
        return cached  # type: ignore[return-value]

    def _names(self, li: int, route: int, pool: int, backend: int) -> tuple[Any, Any, Any, Any]:
        n = self.names
        return (
            n.listeners[li] if li < len(n.listeners) else None,
            n.routes.get(route) if route != NONE else None,
            n.pools[pool] if pool < len(n.pools) else None,
            n.backends.get(backend) if backend != NONE else None,
        )

    def record(self, rec: tuple) -> dict[str, Any]:
        """One record as a dict (what the json format writes, in this key order)."""
        (end_us, dur_us, b_in, b_out, conn_us, li, route, pool, backend, term, retries, client) = rec
        listener, route_name, pool_name, backend_name = self._names(li, route, pool, backend)
        return {
            "time": self._time(end_us),
            "client": self._client(client),
            "listener": listener,
            "route": route_name,
            "pool": pool_name,
            "backend": backend_name,
            "connect_ms": round(conn_us / 1000, 3) if conn_us else None,
            "duration_ms": round(dur_us / 1000, 3),
            "bytes_in": b_in,
            "bytes_out": b_out,
            "retries": retries,
            "termination": TERMINATIONS[term] if term < len(TERMINATIONS) else f"unknown-{term}",
        }

    def render(self, rec: tuple) -> str:
        (end_us, dur_us, b_in, b_out, conn_us, li, route, pool, backend, term, retries, client) = rec
        listener, route_name, pool_name, backend_name = self._names(li, route, pool, backend)
        termination = TERMINATIONS[term] if term < len(TERMINATIONS) else f"unknown-{term}"
        when, addr = self._time(end_us), self._client(client)
        if self.format == "json":
            js = _json_text
            connect = "null" if not conn_us else repr(round(conn_us / 1000, 3))
            return (
                f'{{"time": "{when}", "client": {js(addr)}, "listener": {js(listener)}, '
                f'"route": {js(route_name)}, "pool": {js(pool_name)}, "backend": {js(backend_name)}, '
                f'"connect_ms": {connect}, "duration_ms": {round(dur_us / 1000, 3)!r}, '
                f'"bytes_in": {b_in}, "bytes_out": {b_out}, "retries": {retries}, '
                f'"termination": "{termination}"}}'
            )

        def v(x: Any) -> str:
            return "-" if x is None else str(x)

        connect = "-" if not conn_us else f"{conn_us / 1000:.2f}ms"
        return (
            f"{when} {v(addr)} {v(listener)}/{v(route_name)} {v(pool_name)}/{v(backend_name)} "
            f"connect={connect} duration={dur_us / 1000:.2f}ms in={b_in} out={b_out} "
            f"retries={retries} {termination}"
        )


_MISSING = object()
CLIENT_CACHE = 65536  # client addresses whose text is kept (cleared when full)
_JSON_CACHE: dict[str, str] = {}


def _json_text(value: str | None) -> str:
    """value as a JSON string literal (names and addresses repeat: cached), null for None."""
    if value is None:
        return "null"
    text = _JSON_CACHE.get(value)
    if text is None:
        if len(_JSON_CACHE) >= CLIENT_CACHE:
            _JSON_CACHE.clear()
        text = _JSON_CACHE[value] = json.dumps(value)
    return text
