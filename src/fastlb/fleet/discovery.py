"""DNS service discovery: a pool's backends from SRV or A/AAAA records, re-resolved at their TTL.

One asyncio task per discovering pool, in the control process.  Each answer becomes a list of
BackendConfig named deterministically from the record (`target:port` for SRV, `address:port` for
A/AAAA), so every fastlb instance that sees the same answer builds the same Maglev table.  The list
goes to the backend manager's ordinary lifecycle (added: slow start; vanished: drained with
drain_timeout; weight changed: applied).  A failing or empty answer keeps the last good set: the
pool is never emptied by DNS trouble (logged, and counted in `failures`), not across a restart in
place either: a successor starts from its predecessor's last good set (runtime/handover.py) and
serves it before its own first answer.  A fresh start with only discovered backends waits for
the first answer (`initial_timeout`) before it opens its listeners (`wait_first`).

SRV: every record becomes a backend; its priority (RFC 2782: lower first, higher ones are backups)
becomes the backend's priority group (new connections go to the lowest group with a usable backend,
the same mechanism as `priority` / `backup = true` in the file), and its weight (0..65535) the
backend weight, clamped to 1..1000.  A target listed under two priorities counts at the lower one.  A target's address comes
from the answer's additional section or from an A (then AAAA) lookup; its first address is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from fastlb.config import Address, BackendConfig
from fastlb.config.model import MAX_NAME_BYTES, MAX_WEIGHT, DiscoverConfig

log = logging.getLogger("fastlb")

QUERY_TIMEOUT = 3.0  # seconds for one resolution (all resolvers)
RETRY_AFTER_FAILURE = 2.0  # seconds before asking again after a failed or empty answer


class DiscoveryError(Exception):
    """A resolution that gave no usable answer (the reason, one line)."""


@dataclass
class PoolDiscovery:
    """What one pool's discovery knows: the last good answer and how it went."""

    pool: str
    config: DiscoverConfig
    backends: list[BackendConfig] = field(default_factory=list)
    last_ok: float | None = None  # wall-clock time of the last good answer
    last_error: str | None = None
    failures: int = 0  # failed or empty answers since start
    resolutions: int = 0
    next_in: float = 0.0  # seconds until the next resolution (as last scheduled)
    inherited_from: int = 0  # the predecessor whose last good set this pool started from
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # set at the first good answer

    def status(self) -> dict:
        return {
            "query": self.query,
            "backends": [b.name for b in self.backends],
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "failures": self.failures,
            "resolutions": self.resolutions,
            "next_in": round(self.next_in, 3),
            **({"inherited_from": self.inherited_from} if self.inherited_from else {}),
        }

    @property
    def query(self) -> str:
        return f"{self.config.kind.upper()} {self.config.name}"


def backend_name(host: str, port: int) -> str:
    """`host:port`, deterministic; a name over the length limit keeps its head and a hash of the whole."""
    name = f"{host.rstrip('.')}:{port}"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[: MAX_NAME_BYTES - 13]}~{digest}"


def _resolver(dc: DiscoverConfig) -> dns.asyncresolver.Resolver:
    if not dc.resolvers:
        r = dns.asyncresolver.Resolver()  # /etc/resolv.conf
    else:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port) for a in dc.resolvers]
    r.lifetime = QUERY_TIMEOUT
    r.timeout = QUERY_TIMEOUT / 2
    r.cache = None
    return r


async def resolve(
    dc: DiscoverConfig, resolver: dns.asyncresolver.Resolver
) -> tuple[list[BackendConfig], float]:
    """One resolution: (backends sorted by name, TTL in seconds).  Raises DiscoveryError."""
    try:
        if dc.kind == "a":
            return await _resolve_a(dc, resolver)
        return await _resolve_srv(dc, resolver)
    except dns.resolver.NXDOMAIN:
        raise DiscoveryError(f"{dc.name}: no such name (NXDOMAIN)") from None
    except dns.resolver.NoAnswer:
        raise DiscoveryError(f"{dc.name}: no {dc.kind.upper()} records") from None
    except dns.resolver.NoNameservers as exc:
        raise DiscoveryError(f"{dc.name}: no resolver answered ({exc})") from None
    except dns.exception.Timeout:
        raise DiscoveryError(f"{dc.name}: resolvers timed out after {QUERY_TIMEOUT:g}s") from None
    except dns.exception.DNSException as exc:
        raise DiscoveryError(f"{dc.name}: {exc}") from None


async def _addresses(resolver: dns.asyncresolver.Resolver, name: str) -> tuple[list[str], float]:
    """A records, else AAAA records, of `name`: (addresses, ttl)."""
    for rdtype in ("A", "AAAA"):
        try:
            ans = await resolver.resolve(name, rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        return sorted(r.address for r in ans), float(ans.rrset.ttl if ans.rrset else 0)
    return [], 0.0


async def _resolve_a(
    dc: DiscoverConfig, resolver: dns.asyncresolver.Resolver
) -> tuple[list[BackendConfig], float]:
    assert dc.port is not None
    found: dict[str, BackendConfig] = {}
    ttl = float("inf")
    first_error: Exception | None = None
    for rdtype in ("A", "AAAA"):
        try:
            ans = await resolver.resolve(dc.name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            continue
        except (dns.resolver.NoNameservers, dns.resolver.NXDOMAIN, dns.exception.Timeout) as exc:
            first_error = first_error or exc  # e.g. a server that REFUSEs AAAA: the A answer stands
            continue
        ttl = min(ttl, float(ans.rrset.ttl if ans.rrset else 0))
        for r in ans:
            fam = 10 if rdtype == "AAAA" else 2
            b = BackendConfig(backend_name(r.address, dc.port), Address(r.address, dc.port, fam), 1)
            found[b.name] = b
    if not found:
        raise first_error or dns.resolver.NoAnswer()
    return [found[k] for k in sorted(found)], ttl


async def _resolve_srv(
    dc: DiscoverConfig, resolver: dns.asyncresolver.Resolver
) -> tuple[list[BackendConfig], float]:
    ans = await resolver.resolve(dc.name, "SRV", search=False)
    ttl = float(ans.rrset.ttl if ans.rrset else 0)
    records = list(ans)
    if not records:
        raise dns.resolver.NoAnswer()
    additional: dict[str, list[str]] = {}
    for rrset in ans.response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            additional.setdefault(rrset.name.to_text().lower(), []).extend(sorted(r.address for r in rrset))
    found: dict[str, BackendConfig] = {}
    for r in sorted(records, key=lambda r: r.priority):
        target = r.target.to_text().lower()
        if target == ".":
            continue  # "service decidedly not available" (RFC 2782)
        addrs = additional.get(target)
        if not addrs:
            addrs, attl = await _addresses(resolver, target)
            if attl:
                ttl = min(ttl, attl)
        if not addrs:
            log.warning("discovery %s: SRV target %s has no address; skipped", dc.name, target)
            continue
        host = addrs[0]
        fam = 10 if ":" in host else 2
        name = backend_name(target, r.port)
        if name in found:
            continue  # already there at a lower (preferred) priority
        weight = max(1, min(MAX_WEIGHT, r.weight))
        found[name] = BackendConfig(name, Address(host, r.port, fam), weight, priority=r.priority)
    if not found:
        raise DiscoveryError(f"{dc.name}: no SRV target with an address")
    return [found[k] for k in sorted(found)], ttl


class Discovery:
    """Runs every discovering pool's resolution loop; `apply(pool, backends)` takes each new answer."""

    def __init__(
        self, pools: dict[str, DiscoverConfig], apply: Callable[[str, list[BackendConfig]], None]
    ) -> None:
        self.apply = apply
        self.pools = {name: PoolDiscovery(name, dc) for name, dc in pools.items()}
        self._tasks: list[asyncio.Task] = []

    def inherit(self, pool: str, backends: list[BackendConfig], predecessor: int) -> None:
        """Start `pool` from a predecessor's last good set (a takeover): applied now, refreshed by
        the first answer, kept if that fails."""
        pd = self.pools.get(pool)
        if pd is None or not backends:
            return
        pd.backends = list(backends)
        pd.inherited_from = predecessor
        pd.answered.set()
        log.info(
            "discovery for pool %s: serving the %d backends pid %d discovered (%s) until the first answer",
            pool,
            len(backends),
            predecessor,
            ", ".join(b.name for b in backends),
        )
        self.apply(pool, list(backends))

    def start(self) -> None:
        for pd in self.pools.values():
            self._tasks.append(asyncio.create_task(self._loop(pd), name=f"discovery-{pd.pool}"))

    async def wait_first(self, pools: list[str]) -> None:
        """Wait for each pool's first good answer, up to its initial_timeout; one line per pool
        that got none (its listeners open anyway)."""

        async def one(pd: PoolDiscovery) -> None:
            timeout = pd.config.initial_timeout
            try:
                async with asyncio.timeout(timeout):
                    await pd.answered.wait()
            except TimeoutError:
                why = f": {pd.last_error}" if pd.last_error else ""
                log.warning(
                    "discovery for pool %s: no answer within initial_timeout %gs%s; opening the listeners "
                    "without backends",
                    pd.pool,
                    timeout,
                    why,
                )

        waiting = [
            pd
            for pd in (self.pools[p] for p in pools if p in self.pools)
            if not pd.answered.is_set() and pd.config.initial_timeout > 0  # 0: do not wait
        ]
        if waiting:
            await asyncio.gather(*(one(pd) for pd in waiting))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def update(self, pools: dict[str, DiscoverConfig]) -> None:
        """A reload: keep the loops (and last good sets) of pools whose query is unchanged."""
        for name, pd in self.pools.items():
            if name in pools:
                pd.config = pools[name]
        for name, dc in pools.items():
            if name not in self.pools:
                pd = PoolDiscovery(name, dc)
                self.pools[name] = pd
                self._tasks.append(asyncio.create_task(self._loop(pd), name=f"discovery-{name}"))

    def discovered(self, pool: str) -> list[BackendConfig]:
        pd = self.pools.get(pool)
        return list(pd.backends) if pd else []

    def status(self) -> dict[str, dict]:
        return {name: pd.status() for name, pd in self.pools.items()}

    async def resolve_once(self, pd: PoolDiscovery) -> float:
        """Resolve pool `pd` once, apply a good answer; returns the seconds until the next try."""
        dc = pd.config
        pd.resolutions += 1
        try:
            backends, ttl = await resolve(dc, _resolver(dc))
        except DiscoveryError as exc:
            pd.failures += 1
            if pd.last_error != str(exc):
                kept = ", ".join(b.name for b in pd.backends) or "none"
                log.warning(
                    "discovery for pool %s failed: %s; keeping the last good set (%s)", pd.pool, exc, kept
                )
            pd.last_error = str(exc)
            return max(dc.min_interval, min(RETRY_AFTER_FAILURE, dc.max_interval))
        if pd.last_error is not None:
            log.info("discovery for pool %s: answering again", pd.pool)
        pd.last_error = None
        pd.last_ok = time.time()
        pd.answered.set()
        if [(b.name, b.address, b.weight, b.priority) for b in backends] != [
            (b.name, b.address, b.weight, b.priority) for b in pd.backends
        ]:
            log.info(
                "discovery for pool %s: %s -> %s",
                pd.pool,
                ", ".join(b.name for b in pd.backends) or "none",
                ", ".join(f"{b.name}={b.address}/{b.weight}/priority {b.priority}" for b in backends),
            )
            pd.backends = backends
            self.apply(pd.pool, backends)
        return max(dc.min_interval, min(ttl, dc.max_interval))

    async def _loop(self, pd: PoolDiscovery) -> None:
        while True:
            try:
                delay = await self.resolve_once(pd)
            except Exception:  # never let one pool's discovery die silently
                log.exception("discovery for pool %s: unexpected error", pd.pool)
                delay = pd.config.max_interval
            pd.next_in = delay
            await asyncio.sleep(delay)
