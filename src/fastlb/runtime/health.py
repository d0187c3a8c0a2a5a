"""Active health checks (asyncio, one loop, no threads) and passive-ejection bookkeeping.

The control process owns both halves:

* ``HealthChecker`` runs tcp / http / send_expect checks against every backend, applies
  rise/fall, and calls ``on_transition(target, now_up, reason)`` only when a backend changes
  state; the control process then writes the new health into shared memory.
* ``OutlierTracker`` is pure bookkeeping (no I/O, no clock): the control process feeds it the
  workers' consecutive-connect-failure counters and acts on what it returns.

Nothing here imports ``fastlb.config``: the config types are described by the Protocols below,
so this module works (and is tested) on its own.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from fastlb.runtime.health_udp import UDP_CHECK_TYPES, udp_check

__all__ = [
    "CheckResult",
    "CheckTarget",
    "HealthCheckConfig",
    "HealthChecker",
    "OutlierConfig",
    "OutlierTracker",
    "Transition",
    "check_once",
    "update_state",
]

LOG = logging.getLogger("fastlb.runtime.health")

# An HTTP check reads at most this much of the response (status line, headers and body).
HTTP_MAX_RESPONSE = 64 * 1024
# A send_expect check reads at most this much while waiting for len(expect) bytes.
EXPECT_MAX_READ = 64 * 1024
# Replies quoted in failure reasons are cut to this many bytes.
_REASON_BYTES = 64
# Close check sockets with RST (SO_LINGER 0) so thousands of checks per second do not leave
# thousands of TIME_WAIT sockets on the balancer; HAProxy's checks do the same.
_LINGER_ZERO = struct.pack("ii", 1, 0)
_CHECK_TYPES = frozenset({"tcp", "http", "send_expect", *UDP_CHECK_TYPES})
# A check that fails for one of these reasons failed here, not at the backend: the control process is
# out of descriptors or memory.  It is counted as local and changes no backend state.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})(?:[ \t][^\r\n]*)?(?:\r?\n|\Z)")


class HealthCheckConfig(Protocol):
    """What this module reads from ``fastlb.config.HealthCheckConfig`` (one per pool).
    Read-only members, so frozen dataclasses match."""

    @property
    def type(self) -> str: ...  # "tcp" | "http" | "send_expect" | "udp_send_expect" | "dns"
    @property
    def interval(self) -> float: ...
    @property
    def timeout(self) -> float: ...
    @property
    def rise(self) -> int: ...
    @property
    def fall(self) -> int: ...
    @property
    def port(self) -> int | None: ...
    @property
    def address(self) -> str | None: ...
    @property
    def send(self) -> bytes: ...
    @property
    def expect(self) -> bytes: ...
    @property
    def path(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def expect_status(self) -> tuple[int, int]: ...
    @property
    def expect_body(self) -> str | None: ...
    @property
    def query(self) -> str | None: ...  # dns (runtime/health_udp.py)
    @property
    def send_proxy(self) -> str: ...  # "off" | "v1" | "v2": PROXY header sent right after connect


class OutlierConfig(Protocol):
    """What this module reads from ``fastlb.config.OutlierConfig`` (one per pool)."""

    @property
    def consecutive_failures(self) -> int: ...  # 0 = disabled
    @property
    def base_ejection_time(self) -> float: ...
    @property
    def max_ejection_percent(self) -> int: ...


@dataclass(eq=False)
class CheckTarget:
    """One backend to check. ``host``/``port`` are the traffic address; the check goes to
    ``config.address``/``config.port`` when those are set.

    State (HAProxy semantics for ``up``): a target starts in state ``up`` (default True) and
    goes down after ``config.fall`` consecutive failures, up after ``config.rise`` consecutive
    successes. The two counters below are the consecutive runs; exactly one is non-zero
    after the first check.
    """

    pool: str
    backend: str
    host: str
    port: int
    config: HealthCheckConfig
    up: bool = True
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    last_reason: str = ""
    last_check: float | None = None  # wall clock (time.time()) when the last check finished
    last_duration: float = 0.0
    checks: int = 0
    local_errors: int = 0  # checks that could not run for a local reason (LOCAL_ERRNOS)

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.backend)

    def check_address(self) -> tuple[str, int]:
        """The (host, port) the check connects to."""
        cfg = self.config
        return (cfg.address or self.host, cfg.port or self.port)


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str  # "ok", "timeout", "connection refused", "bad status 503", ...
    duration: float  # seconds, monotonic
    local: bool = False  # failed for a local reason (LOCAL_ERRNOS): says nothing about the backend


Transition = Callable[[CheckTarget, bool, str], None]


# --------------------------------------------------------------------------- one check


def _quote(data: bytes) -> str:
    return repr(data[:_REASON_BYTES])


def _os_reason(exc: OSError) -> str:
    """Short lower-case reason for a socket error: "connection refused", "no route to host"."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "connection closed"
    if exc.errno is not None and exc.strerror:
        return exc.strerror.lower()
    return f"error: {exc!r}"


async def _resolve(host: str, port: int) -> tuple[int, tuple]:
    """(family, sockaddr) for host:port. IP literals (IPv4, IPv6, "[v6]", "fe80::1%eth0") are
    parsed without blocking; names fall back to the loop's getaddrinfo (its executor)."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    except socket.gaierror:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


async def _recv_until(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, done: Callable[[bytearray], bool], limit: int
) -> bytes:
    """Read until done(data), EOF, or ``limit`` bytes. Returns what was read (maybe b"")."""
    buf = bytearray()
    while len(buf) < limit and not done(buf):
        chunk = await loop.sock_recv(sock, min(65536, limit - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf[:limit])


def _bracket(host: str) -> str:
    """IPv6 literals in brackets (as in URLs and Host headers), everything else as is."""
    host = host.removeprefix("[").removesuffix("]")
    return f"[{host}]" if ":" in host else host


def _host_header(target: CheckTarget, host: str, port: int) -> str:
    if target.config.host:
        return target.config.host
    return _bracket(host) if port == 80 else f"{_bracket(host)}:{port}"


async def _http(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, target: CheckTarget, addr: tuple[str, int]
) -> str:
    cfg = target.config
    request = (
        f"GET {cfg.path or '/'} HTTP/1.0\r\n"
        f"Host: {_host_header(target, *addr)}\r\n"
        "User-Agent: fastlb-health\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    await loop.sock_sendall(sock, request)
    if cfg.expect_body is None:
        # Only the status line matters: stop at the first newline.
        data = await _recv_until(loop, sock, lambda b: b"\n" in b, HTTP_MAX_RESPONSE)
    else:
        data = await _recv_until(loop, sock, lambda b: False, HTTP_MAX_RESPONSE)
    if not data:
        return "connection closed"
    m = _STATUS_LINE.match(data)
    if m is None:
        first_line = data.split(b"\n", 1)[0]
        return f"bad status line {_quote(first_line)}"
    status = int(m.group(1))
    lo, hi = cfg.expect_status
    if not lo <= status <= hi:
        return f"bad status {status}"
    if cfg.expect_body is not None:
        _, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            _, sep, body = data.partition(b"\n\n")
        if cfg.expect_body.encode() not in body:
            return f"body does not contain {cfg.expect_body!r}"
    return "ok"


async def _send_expect(loop: asyncio.AbstractEventLoop, sock: socket.socket, cfg: HealthCheckConfig) -> str:
    if cfg.send:
        await loop.sock_sendall(sock, cfg.send)
    if not cfg.expect:
        return "ok"
    want = len(cfg.expect)
    data = await _recv_until(loop, sock, lambda b: len(b) >= want, max(want, EXPECT_MAX_READ))
    if not data:
        return "connection closed"
    if not data.startswith(cfg.expect):
        return f"unexpected reply {_quote(data)}"
    return "ok"


PROXY_V2_LOCAL = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def proxy_header(version: str, sock: socket.socket) -> bytes:
    """The PROXY header a health check sends first (health_check.send_proxy): v2 LOCAL (the spec's
    form for a proxy's own checks), or v1 with the check connection's own endpoints."""
    if version == "v2":
        return PROXY_V2_LOCAL
    src, dst = sock.getsockname(), sock.getpeername()
    fam = "TCP6" if sock.family == socket.AF_INET6 else "TCP4"
    return f"PROXY {fam} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode()


async def check_once(target: CheckTarget) -> CheckResult:
    """Run one check of ``target`` and return its result.

    The whole check (resolve, connect, send, read) is bounded by ``config.timeout``. Never
    raises (except ``CancelledError`` when the caller cancels); the socket is closed on
    every path.
    """
    loop = asyncio.get_running_loop()
    cfg = target.config
    start = loop.time()
    if cfg.type not in _CHECK_TYPES:
        return CheckResult(False, f"unknown check type {cfg.type!r}", 0.0)
    sock: socket.socket | None = None
    reason: str
    local = False
    try:
        async with asyncio.timeout(cfg.timeout):
            addr = target.check_address()
            family, sockaddr = await _resolve(*addr)
            if cfg.type in UDP_CHECK_TYPES:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                reason = await udp_check(loop, sock, sockaddr, cfg)  # health_udp.py
            else:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                await loop.sock_connect(sock, sockaddr)
                send_proxy = getattr(cfg, "send_proxy", "off")  # configs made before the key existed
                if send_proxy != "off":
                    await loop.sock_sendall(sock, proxy_header(send_proxy, sock))
                if cfg.type == "tcp":
                    reason = "ok"
                elif cfg.type == "http":
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    reason = await _http(loop, sock, target, addr)
                else:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    reason = await _send_expect(loop, sock, cfg)
    except TimeoutError:
        reason = "timeout"
    except socket.gaierror as exc:
        reason = f"cannot resolve: {exc.strerror or exc}"
    except OSError as exc:
        local = exc.errno in LOCAL_ERRNOS
        reason = "timeout" if exc.errno == errno.ETIMEDOUT else _os_reason(exc)
        if local:
            reason = f"local error: {reason}"
    except MemoryError:
        local, reason = True, "local error: out of memory"
    except Exception as exc:  # a check must never take the checker down
        reason = f"error: {exc!r}"
    finally:
        if sock is not None:
            sock.close()
    return CheckResult(reason == "ok", reason, loop.time() - start, local)


# --------------------------------------------------------------------------- rise / fall


def update_state(target: CheckTarget, result: CheckResult) -> bool:
    """Apply one result to ``target``'s counters and state. Returns True iff ``up`` changed.

    Down after ``fall`` consecutive failures, up after ``rise`` consecutive successes; a
    result of the other kind resets the run. A success while up (or a failure while down)
    changes nothing but the counters.  A local failure (``result.local``) changes nothing but
    ``local_errors`` and ``last_reason``: it is not a result about the backend at all.
    """
    cfg = target.config
    target.last_reason = result.reason
    if result.local:
        target.local_errors += 1
        return False
    target.checks += 1
    target.last_duration = result.duration
    target.last_check = time.time()
    if result.ok:
        target.consecutive_ok += 1
        target.consecutive_fail = 0
        if not target.up and target.consecutive_ok >= max(1, cfg.rise):
            target.up = True
            return True
    else:
        target.consecutive_fail += 1
        target.consecutive_ok = 0
        if target.up and target.consecutive_fail >= max(1, cfg.fall):
            target.up = False
            return True
    return False


# --------------------------------------------------------------------------- scheduler

Key = tuple[str, str]


class HealthChecker:
    """Checks every target every ``config.interval`` seconds on the running event loop.

    Scheduling: a target's first check is at a uniformly random point of its first interval
    (so N backends do not all fire at once); each next check is due ``interval * (1 ± jitter)``
    after the previous one *finished* (a target never has two checks in flight). One
    scheduler coroutine pops due targets from a heap and starts each check only after taking
    a semaphore slot, so at most ``max_concurrency`` checks run and an overloaded checker
    falls behind instead of piling up tasks.
    """

    def __init__(
        self,
        targets: list[CheckTarget],
        on_transition: Transition,
        *,
        max_concurrency: int = 256,
        jitter: float = 0.1,
        logger: logging.Logger | None = None,
        on_success: Callable[[CheckTarget], None] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        self._on_transition = on_transition
        # every passing check of a backend that is up (issue 21: it ends an outlier ejection)
        self._on_success = on_success
        self._max_concurrency = max_concurrency
        self._jitter = jitter
        self._log = logger or LOG
        self._targets: dict[Key, CheckTarget] = self._index(targets)
        self._due: dict[Key, float] = {}  # key -> due time of its one live heap entry
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = 0
        self._inflight: dict[Key, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self.local_errors = 0  # checks that failed for a local reason, all targets

    @staticmethod
    def _index(targets: Iterable[CheckTarget]) -> dict[Key, CheckTarget]:
        out: dict[Key, CheckTarget] = {}
        for t in targets:
            if t.key in out:
                raise ValueError(f"duplicate health check target: pool {t.pool} backend {t.backend}")
            out[t.key] = t
        return out

    # -- public API

    @property
    def targets(self) -> list[CheckTarget]:
        return list(self._targets.values())

    async def run(self) -> None:
        """Check targets until cancelled. In-flight checks are cancelled on the way out."""
        if self._loop is not None:
            raise RuntimeError("HealthChecker.run() is already running")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._sem = asyncio.Semaphore(self._max_concurrency)
        try:
            for key in self._targets:
                self._schedule_first(key)
            await self._scheduler()
        finally:
            tasks = list(self._inflight.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._inflight.clear()
            self._heap.clear()
            self._due.clear()
            self._loop = self._wake = self._sem = None

    def set_targets(self, targets: list[CheckTarget]) -> None:
        """Replace the target set (config reload); call from the event loop's thread.

        A new target whose (pool, backend) already exists inherits the old one's state (up,
        counters, last check) and keeps its place in the schedule. Removed targets stop being
        checked at once (an in-flight check is cancelled). Raises ValueError on duplicates.
        """
        new = self._index(targets)
        for key, t in new.items():
            old = self._targets.get(key)
            if old is not None and old is not t:
                t.up = old.up
                t.consecutive_ok = old.consecutive_ok
                t.consecutive_fail = old.consecutive_fail
                t.last_reason = old.last_reason
                t.last_check = old.last_check
                t.last_duration = old.last_duration
                t.checks = old.checks
                t.local_errors = old.local_errors
        removed = self._targets.keys() - new.keys()
        self._targets = new
        if self._loop is None:
            return
        for key in removed:
            self._due.pop(key, None)  # its heap entry goes stale
            task = self._inflight.pop(key, None)
            if task is not None:
                task.cancel()
        for key in new:
            if key not in self._due and key not in self._inflight:
                self._schedule_first(key)
        assert self._wake is not None
        self._wake.set()

    def snapshot(self) -> list[dict]:
        """Per target: pool, backend, address, up, last_reason, consecutive_ok/fail,
        last_check (wall clock, None before the first check), last_duration, checks."""
        out = []
        for t in self._targets.values():
            host, port = t.check_address()
            out.append(
                {
                    "pool": t.pool,
                    "backend": t.backend,
                    "address": f"{_bracket(host)}:{port}",
                    "type": t.config.type,
                    "up": t.up,
                    "last_reason": t.last_reason,
                    "consecutive_ok": t.consecutive_ok,
                    "consecutive_fail": t.consecutive_fail,
                    "last_check": t.last_check,
                    "last_duration": t.last_duration,
                    "checks": t.checks,
                    "local_errors": t.local_errors,
                }
            )
        return out

    # -- internals

    def _push(self, key: Key, due: float) -> None:
        self._seq += 1
        self._due[key] = due
        heapq.heappush(self._heap, (due, self._seq, key))
        if self._heap[0][1] == self._seq and self._wake is not None:
            self._wake.set()  # new earliest entry: the scheduler may be sleeping past it

    def _schedule_first(self, key: Key) -> None:
        assert self._loop is not None
        interval = self._targets[key].config.interval
        self._push(key, self._loop.time() + random.uniform(0.0, interval))

    def _schedule_next(self, key: Key) -> None:
        assert self._loop is not None
        interval = self._targets[key].config.interval
        factor = 1.0 + random.uniform(-self._jitter, self._jitter)
        self._push(key, self._loop.time() + interval * factor)

    async def _scheduler(self) -> None:
        assert self._loop is not None and self._wake is not None and self._sem is not None
        loop, wake, sem, heap = self._loop, self._wake, self._sem, self._heap
        while True:
            if not heap:
                await wake.wait()
                wake.clear()
                continue
            due, _, key = heap[0]
            if self._due.get(key) != due:  # stale entry (target removed or rescheduled)
                heapq.heappop(heap)
                continue
            delay = due - loop.time()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await wake.wait()
                except TimeoutError:
                    pass
                wake.clear()
                continue
            heapq.heappop(heap)
            del self._due[key]
            await sem.acquire()
            target = self._targets.get(key)
            if target is None or key in self._inflight:  # removed while we waited
                sem.release()
                continue
            self._inflight[key] = loop.create_task(self._check(key, target), name=f"health {key[0]}/{key[1]}")

    async def _check(self, key: Key, target: CheckTarget) -> None:
        assert self._sem is not None
        try:
            result = await check_once(target)
        finally:
            self._sem.release()
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        current = self._targets.get(key)
        if current is None:
            return
        # After a reload the result still counts if it checked the same thing.
        if current is target or (
            current.check_address() == target.check_address() and current.config == target.config
        ):
            self._apply(current, result)
        if key not in self._due:
            self._schedule_next(key)

    def _apply(self, target: CheckTarget, result: CheckResult) -> None:
        if result.local:
            update_state(target, result)
            self.local_errors += 1
            self._log.warning(
                "pool %s backend %s: check could not run (%s); a local problem, not counted against the backend",
                target.pool,
                target.backend,
                result.reason,
            )
            return
        changed = update_state(target, result)
        if result.ok and target.up and self._on_success is not None:
            try:
                self._on_success(target)
            except Exception:
                self._log.exception("on_success failed for pool %s backend %s", target.pool, target.backend)
        if not changed:
            if not result.ok:
                self._log.debug(
                    "pool %s backend %s check failed (%d/%d): %s",
                    target.pool,
                    target.backend,
                    target.consecutive_fail,
                    target.config.fall,
                    result.reason,
                )
            return
        if target.up:
            self._log.info(
                "pool %s backend %s UP after %d successful checks: %s",
                target.pool,
                target.backend,
                target.consecutive_ok,
                result.reason,
            )
        else:
            self._log.info(
                "pool %s backend %s DOWN after %d failed checks: %s",
                target.pool,
                target.backend,
                target.consecutive_fail,
                result.reason,
            )
        try:
            self._on_transition(target, target.up, result.reason)
        except Exception:
            self._log.exception("on_transition failed for pool %s backend %s", target.pool, target.backend)


# --------------------------------------------------------------------------- outlier ejection


@dataclass
class _Outlier:
    baseline: int = 0  # worker counter value already accounted for (at the last ejection)
    ejected_until: float | None = None
    times: int = 0  # ejection multiplier: ejections in a row, decays while healthy
    healthy_since: float | None = None  # last decay point while not ejected


@dataclass
class OutlierTracker:
    """Envoy-style consecutive-failure ejection for one pool; pure bookkeeping, no clock.

    * ``observe(b, n, now)`` is fed the workers' consecutive connect-failure counter for b.
      Only failures *since b's last ejection* count: the counter is not reset by anyone when
      b is ejected, so the tracker remembers the value it ejected at and ejects again once
      ``n - that >= consecutive_failures``; when the counter drops below that value (a
      success reset it) the remembered value goes back to 0.
    * Ejection lasts ``base_ejection_time * times`` where ``times`` counts ejections in a
      row, capped at ``max_ejection_time`` (Envoy's default 300 s; never below the base).
      While b is in service and its failures stay under the threshold, ``times`` drops by
      one per ``base_ejection_time`` elapsed (Envoy decays it once per sweep interval).
    * Cap: an ejection is allowed iff ``(ejected + 1) * 100 <= max_ejection_percent *
      pool_size`` or nothing is ejected yet (Envoy: at least one host can always be ejected).
      ``max_ejection_percent == 0`` or ``consecutive_failures == 0`` disables ejection.
    """

    config: OutlierConfig
    pool_size: int
    max_ejection_time: float = 300.0
    _state: dict[str, _Outlier] = field(default_factory=dict, init=False, repr=False)

    def _get(self, backend: str) -> _Outlier:
        st = self._state.get(backend)
        if st is None:
            st = self._state[backend] = _Outlier()
        return st

    @property
    def enabled(self) -> bool:
        return self.config.consecutive_failures > 0 and self.config.max_ejection_percent > 0

    def ejected(self) -> list[str]:
        return [b for b, st in self._state.items() if st.ejected_until is not None]

    def is_ejected(self, backend: str) -> bool:
        st = self._state.get(backend)
        return st is not None and st.ejected_until is not None

    def ejection_count(self, backend: str) -> int:
        """The current multiplier (ejections in a row, after decay)."""
        st = self._state.get(backend)
        return 0 if st is None else st.times

    def ejected_until(self, backend: str) -> float | None:
        st = self._state.get(backend)
        return None if st is None else st.ejected_until

    def _may_eject(self) -> bool:
        n = sum(1 for st in self._state.values() if st.ejected_until is not None)
        return n == 0 or (n + 1) * 100 <= self.config.max_ejection_percent * self.pool_size

    def observe(self, backend: str, consecutive_failures: int, now: float) -> bool:
        """Feed the worker counter for ``backend``; True iff this call ejected it."""
        st = self._get(backend)
        if consecutive_failures < st.baseline:
            st.baseline = 0  # the counter was reset by a success
        if st.ejected_until is not None or not self.enabled:
            return False
        base = self.config.base_ejection_time
        failures = consecutive_failures - st.baseline
        if failures < self.config.consecutive_failures:
            if st.times and base > 0:
                if st.healthy_since is None:
                    st.healthy_since = now
                steps = int((now - st.healthy_since) // base)
                if steps > 0:
                    st.times = max(0, st.times - steps)
                    st.healthy_since += steps * base
            return False
        if not self._may_eject():
            return False
        st.times += 1
        cap = max(self.max_ejection_time, base)
        st.ejected_until = now + min(base * st.times, cap)
        st.baseline = consecutive_failures
        st.healthy_since = None
        return True

    def uneject(self, backend: str, now: float) -> bool:
        """End ``backend``'s ejection now (a passing active health check, Envoy's
        successful_active_health_check_uneject_host); True iff it was ejected.  Its ejection
        multiplier stays and decays as after an expiry."""
        st = self._state.get(backend)
        if st is None or st.ejected_until is None:
            return False
        st.ejected_until = None
        st.healthy_since = now
        return True

    def expire(self, now: float) -> list[str]:
        """Un-eject and return the backends whose ejection time is over at ``now``."""
        out = []
        for backend, st in self._state.items():
            if st.ejected_until is not None and st.ejected_until <= now:
                st.ejected_until = None
                st.healthy_since = now
                out.append(backend)
        return out

    def set_pool_size(self, pool_size: int, backends: Iterable[str] | None = None) -> None:
        """After a reload: new pool size; if ``backends`` is given, forget the others."""
        self.pool_size = pool_size
        if backends is not None:
            keep = set(backends)
            for b in list(self._state):
                if b not in keep:
                    del self._state[b]
