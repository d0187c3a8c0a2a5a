"""Health-aware VIP announcement: one route per announced listener address in a kernel table.

fastlb does not speak BGP.  For every listener with `announce = true` the control process keeps a
/32 (or /128) route for the listener's bind address in `[global] announce_table` (tagged with
`announce_protocol`), written over netlink (pyroute2); a routing daemon (BIRD's kernel protocol,
FRR's `redistribute table`) imports that table and announces it.  The VIP itself stays where the
operator put it (on lo): only the route comes and goes, so connections being drained keep working.

An address is announced while every worker has its listeners open and at least one backend of one
of its listeners' pools is usable (up, not ejected, not drained or disabled, weight > 0); it is
withdrawn at once when none is, and announced again after `announce_rise` of being usable.
`fastlb drain-instance` withdraws everything (reason "draining") until `undrain-instance`; a stop
withdraws first and keeps accepting for `announce_withdraw_delay`; a takeover leaves the routes
alone (the successor adopts them: a restart is not a withdrawal).

Reconciliation is idempotent: every tick compares what should be announced with what this object
wrote; at start it adopts the routes of its table and protocol that are already there (left by a
predecessor), and withdraws those of addresses it no longer announces.

Without CAP_NET_ADMIN it says so in one line and serves without announcing.

    python -m fastlb.fleet.announce withdraw --table T --protocol P ADDRESS...
        removes the routes (used by an orphaned worker at orphan_timeout: see fastlb.worker)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fastlb")

CAP_NET_ADMIN = 12  # <linux/capability.h>
# why an address is (not) announced; the first four are the names
READY, NO_USABLE_BACKEND, DRAINING, STOPPING = "ready", "no_usable_backend", "draining", "stopping"
RISING = "rising"  # usable, but not yet for announce_rise
NOT_LISTENING = "not_listening"  # a worker does not have the listener open (starting, restarting)
NO_CAPABILITY = "no_capability"  # fastlb lacks CAP_NET_ADMIN: it serves without announcing
NETLINK_ERROR = "netlink_error"  # the route could not be written (the log says why)


def has_net_admin() -> bool:
    """Does this process hold CAP_NET_ADMIN (its effective set, from /proc/self/status)?"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return False


def prefix_of(host: str) -> tuple[int, str, int]:
    """(family, address, prefix length) of a host route for this IP literal."""
    ip = ipaddress.ip_address(host)
    return (socket.AF_INET6, ip.compressed, 128) if ip.version == 6 else (socket.AF_INET, str(ip), 32)


class RouteTable:
    """The routes of one kernel table and protocol, over netlink (pyroute2, imported here only:
    the data plane never imports it).  Each call raises OSError (NetlinkError is one) on failure.

    pyroute2's synchronous IPRoute runs an asyncio loop of its own, which cannot run inside the
    control process's loop: every call goes to one thread of its own that holds the socket (a
    netlink request takes well under a millisecond; they happen only when a route changes)."""

    TIMEOUT = 5.0

    def __init__(self, table: int, protocol: int) -> None:
        self.table = table
        self.protocol = protocol
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastlb-netlink")
        self.ipr: Any = None
        self.lo = 0
        self._call(self._open)

    def _open(self) -> None:
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.lo = self.ipr.link_lookup(ifname="lo")[0]

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return self._pool.submit(fn, *args).result(self.TIMEOUT)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "netlink request timed out") from None
        except OSError:
            raise
        except Exception as exc:  # pyroute2's NetlinkError (not an OSError in every version)
            code = getattr(exc, "code", 0)
            raise OSError(code, os.strerror(code) if code else str(exc)) from None

    def list(self) -> set[str]:
        """The IP literals that have a host route of ours in the table."""
        return self._call(self._list)

    def _list(self) -> set[str]:
        found: set[str] = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self.ipr.get_routes(family=family, table=self.table):
                dst = msg.get_attr("RTA_DST")
                full = 32 if family == socket.AF_INET else 128
                if dst and msg["proto"] == self.protocol and msg["dst_len"] == full:
                    found.add(ipaddress.ip_address(dst).compressed)
        return found

    def add(self, host: str) -> None:
        self._call(self._add, host)

    def _add(self, host: str) -> None:
        family, addr, plen = prefix_of(host)
        self.ipr.route(
            "replace",
            family=family,
            dst=f"{addr}/{plen}",
            table=self.table,
            proto=self.protocol,
            oif=self.lo,
            scope=_scope(family),
        )

    def remove(self, host: str) -> None:
        self._call(self._remove, host)

    def _remove(self, host: str) -> None:
        family, addr, plen = prefix_of(host)
        try:
            self.ipr.route(
                "del",
                family=family,
                dst=f"{addr}/{plen}",
                table=self.table,
                proto=self.protocol,
                scope=_scope(family),
            )
        except Exception as exc:
            if getattr(exc, "code", getattr(exc, "errno", 0)) != errno.ESRCH:  # already gone: fine
                raise

    def close(self) -> None:
        if self.ipr is not None:
            with contextlib.suppress(Exception):
                self._call(self.ipr.close)
        self._pool.shutdown(wait=False)


def _scope(family: int) -> int:
    """The scope of our routes: link for IPv4 (a route through a device only, as `ip route` makes
    it), universe for IPv6 (which has no scopes for routes)."""
    return 253 if family == socket.AF_INET else 0


@dataclass
class AddressState:
    """One announced address (several listeners may share it: TCP and UDP, several ports)."""

    host: str
    listeners: list[str]
    announced: bool = False
    since: float = field(default_factory=time.time)  # wall clock of the last change
    reason: str = NOT_LISTENING
    usable_since: float | None = None  # monotonic: when it last became usable
    withdrawals: Counter[str] = field(default_factory=Counter)  # by reason


class Announcer:
    """The control process's announcements (see the module docstring).  `sup` is the Supervisor:
    read for its config, pools, region and workers; nothing else is touched."""

    def __init__(self, sup: Any, table_factory: Callable[[int, int], RouteTable] = RouteTable) -> None:
        self.sup = sup
        self.cfg = sup.config.global_.announce
        self.addresses: dict[str, AddressState] = {}
        for lc in sup.config.listeners.values():
            if lc.announce:
                host = ipaddress.ip_address(lc.bind.host).compressed
                self.addresses.setdefault(host, AddressState(host, [])).listeners.append(lc.name)
        self.mode = "running"  # "running" | "draining" | "stopping" | "handed_over"
        self.table: RouteTable | None = None
        self.enabled = False
        self._factory = table_factory
        self._stop_state = 0  # delay_stop: 0 not stopping, 1 waiting, 2 done
        self._last_error = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Open netlink and adopt the routes already there; without the capability, one line."""
        if not self.addresses:
            return
        if not has_net_admin():
            log.warning(
                "announce: no CAP_NET_ADMIN, serving without announcing %s "
                "(systemd: AmbientCapabilities=CAP_NET_ADMIN)",
                ", ".join(self.addresses),
            )
            self._set_all(NO_CAPABILITY)
            return
        try:
            self.table = self._factory(self.cfg.table, self.cfg.protocol)
            present = self.table.list()
        except Exception as exc:  # noqa: BLE001 - whatever netlink says, serve without announcing
            log.warning("announce: cannot use netlink (%s), serving without announcing", exc)
            self.table = None
            self._set_all(NETLINK_ERROR)
            return
        self.enabled = True
        for host, st in self.addresses.items():
            if host in present:  # a predecessor's route (takeover, restart): kept, not re-risen
                st.announced, st.reason, st.since = True, READY, time.time()
                log.info("announce: %s adopted (its route is in table %d)", host, self.cfg.table)
        for host in present - set(self.addresses):
            self._remove(host, "not_configured")
        log.info(
            "announce: %s into table %d (protocol %d)",
            ", ".join(self.addresses),
            self.cfg.table,
            self.cfg.protocol,
        )

    def tick(self, now: float | None = None) -> None:
        """Reconcile every address with its listeners' and pools' state (cheap; idempotent)."""
        if not self.enabled or self.mode in ("stopping", "handed_over"):
            return
        now = time.monotonic() if now is None else now
        listening = self._listening()
        for st in self.addresses.values():
            if self.mode == "draining":
                want, why = False, DRAINING
            elif not listening:
                want, why = False, NOT_LISTENING
            elif not self._usable(st):
                want, why = False, NO_USABLE_BACKEND
            else:
                if st.usable_since is None:
                    st.usable_since = now
                want = st.announced or now - st.usable_since >= self.cfg.rise
                why = READY if want else RISING
            if why != READY:
                st.usable_since = None if why != RISING else st.usable_since
            if want and not st.announced:
                if self._add(st.host):
                    st.announced, st.since = True, time.time()
                    log.info("announce: %s announced", st.host)
                else:
                    why = NETLINK_ERROR
            elif not want and st.announced:
                self._withdraw(st, why)
            if st.reason != why and not st.announced:
                st.since = time.time()
            st.reason = why

    def needs_tick(self) -> bool:
        """A rise timer runs: the tick loop must come back soon."""
        return self.enabled and any(st.reason == RISING for st in self.addresses.values())

    def drain(self) -> int:
        """`fastlb drain-instance`: withdraw every address until undrain.  Returns how many were."""
        n = sum(1 for st in self.addresses.values() if st.announced)
        if self.mode == "running":
            self.mode = "draining"
        self.tick()
        return n

    def undrain(self) -> None:
        """`fastlb undrain-instance`: announce again (each address after its announce_rise)."""
        if self.mode == "draining":
            self.mode = "running"
        self.tick()

    def delay_stop(self, callback: Callable[..., None], *args: Any) -> bool:
        """The first call on a stop: withdraw every address and call callback(*args) again after
        announce_withdraw_delay (True: the caller returns now).  False when there is nothing to
        wait for (nothing was announced, the delay is 0, or this is the delayed call) and on a
        takeover (successor given as the last arg): the successor keeps the routes."""
        successor = args[-1] if args else None
        if successor is not None:
            self.hand_over()
            return False
        if self._stop_state:
            return self._stop_state == 1  # 1: waiting (a repeated signal changes nothing); 2: done
        announced = self.enabled and any(st.announced for st in self.addresses.values())
        self.withdraw_all(STOPPING)
        self._stop_state = 2
        if not announced or self.cfg.withdraw_delay <= 0:
            return False
        self._stop_state = 1
        log.info(
            "announce: routes withdrawn; still accepting for %.1fs (announce_withdraw_delay)",
            self.cfg.withdraw_delay,
        )

        def later() -> None:
            self._stop_state = 2
            callback(*args)

        asyncio.get_running_loop().call_later(self.cfg.withdraw_delay, later)
        return True

    def withdraw_all(self, reason: str) -> None:
        self.mode = "stopping" if reason == STOPPING else self.mode
        for st in self.addresses.values():
            if st.announced:
                self._withdraw(st, reason)
            st.reason, st.usable_since = reason, None

    def hand_over(self) -> None:
        """A takeover: leave every route in place for the successor, write nothing more."""
        if self.mode != "handed_over" and self.enabled:
            log.info("announce: routes left in place for the new instance")
        self.mode = "handed_over"

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None

    # --- views -------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """`fastlb status` "announce": per address, announced or not, since when, why."""
        return [
            {
                "address": st.host,
                "announced": st.announced,
                "since": round(st.since, 3),
                "reason": st.reason,
                "listeners": list(st.listeners),
                "withdrawals": dict(st.withdrawals),
            }
            for st in self.addresses.values()
        ]

    # --- inside ------------------------------------------------------------------------------

    def _listening(self) -> bool:
        sup = self.sup
        return bool(sup.ready) and not sup.stopping and sup.workers_ready()

    def _usable(self, st: AddressState) -> bool:
        """Is one backend of one pool of one of the address's listeners usable (any route)?"""
        sup = self.sup
        pools = {
            t.pool for name in st.listeners for r in sup.config.listeners[name].routes for t in r.backends
        }
        for name in pools:
            ps = sup.pools.get(name)
            if ps is None:
                continue
            for slot in list(ps.slots.values()):
                if slot.removed:
                    continue
                b = sup.region.backend(slot.index)
                if b["admin"] == 0 and b["health"] == 0 and b["weight"] > 0:
                    return True
        return False

    def _set_all(self, reason: str) -> None:
        for st in self.addresses.values():
            st.reason = reason

    def _withdraw(self, st: AddressState, reason: str) -> None:
        if self._remove(st.host, reason):
            st.announced, st.since = False, time.time()
            st.withdrawals[reason] += 1

    def _add(self, host: str) -> bool:
        try:
            assert self.table is not None
            self.table.add(host)
        except OSError as exc:
            self._error(f"announce: cannot add the route for {host}: {exc}")
            return False
        return True

    def _remove(self, host: str, reason: str) -> bool:
        try:
            assert self.table is not None
            self.table.remove(host)
        except OSError as exc:
            self._error(f"announce: cannot withdraw the route for {host}: {exc}")
            return False
        log.info("announce: %s withdrawn (%s)", host, reason)
        return True

    def _error(self, msg: str) -> None:
        if msg != self._last_error:  # once per distinct problem, not once per tick
            log.warning("%s", msg)
        self._last_error = msg


INSTANCE_COMMANDS = ("drain-instance", "undrain-instance")
ORPHAN_ENV = "FASTLB_ORPHAN_WITHDRAW"  # what an orphaned worker withdraws at orphan_timeout


def instance_request(sup: Any, cmd: str) -> dict[str, Any]:
    """`fastlb drain-instance` / `undrain-instance` on the control socket (or the admin API):
    take this instance out of the fleet (every announcement withdrawn) without stopping it."""
    ann: Announcer | None = getattr(sup, "announce", None)
    if ann is None:
        return {"announce": [], "note": "no listener announces its address (announce = true)"}
    if cmd == "drain-instance":
        ann.drain()
    else:
        ann.undrain()
    return {"announce": ann.status(), "mode": ann.mode}


def orphan_withdraw_env(config: Any) -> None:
    """In a forked worker before exec: tell it (ORPHAN_ENV: "TABLE PROTOCOL ADDRESS...") which routes
    to withdraw if it is orphaned until orphan_timeout (fastlb.worker runs withdraw_main then)."""
    hosts = sorted(
        {ipaddress.ip_address(lc.bind.host).compressed for lc in config.listeners.values() if lc.announce}
    )
    if not hosts:
        os.environ.pop(ORPHAN_ENV, None)
        return
    a = config.global_.announce
    os.environ[ORPHAN_ENV] = " ".join([str(a.table), str(a.protocol), *hosts])


def withdraw_main(argv: list[str] | None = None) -> int:
    """`python -m fastlb.fleet.announce withdraw --table T --protocol P ADDRESS...` (see the top)."""
    ap = argparse.ArgumentParser(prog="python -m fastlb.fleet.announce")
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("withdraw")
    w.add_argument("--table", type=int, required=True)
    w.add_argument("--protocol", type=int, required=True)
    w.add_argument("addresses", nargs="+")
    args = ap.parse_args(argv)
    try:
        table = RouteTable(args.table, args.protocol)
        present = table.list()
        for host in args.addresses:
            if ipaddress.ip_address(host).compressed in present:
                table.remove(host)
                print(f"fastlb: orphan_timeout: withdrew the route for {host}", file=sys.stderr, flush=True)
        table.close()
    except (OSError, ImportError, ValueError) as exc:
        print(f"fastlb: orphan_timeout: cannot withdraw {' '.join(args.addresses)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(withdraw_main())
