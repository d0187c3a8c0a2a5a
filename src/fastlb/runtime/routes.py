"""Routes and splits in the control process: `sup.routes` (INTERFACES.md section 3).

The route records, their address prefixes and server-name patterns are written into the shared
region once, before the workers start (their number is fixed by the config).  What changes at
runtime is each route's split: the pools, their weights and the affinity, published with one
release-store per route into the route's spare split buffer and one generation bump for the
whole change (`Region.set_split` + `Region.publish`), so no worker ever sees half of a change and
every connection routed after `set_split` returns goes by the new split.

A split keeps its entries in a fixed order: the route's pools as configured, then pools a
`set_split` added.  `set_split` gives the whole split: pools it does not name get weight 0 (they
keep their place, so with split_affinity = "source_ip" the clients of each side stay put).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastlb._shm import MAX_SPLIT, Region
from fastlb.config import Config, ListenerConfig, RouteConfig
from fastlb.config.model import MAX_WEIGHT

log = logging.getLogger("fastlb")


@dataclass
class RouteState:
    """One route as the control process knows it: where it lives in shared memory, its split."""

    index: int  # global route index (flb_route_t)
    listener: str
    config: RouteConfig
    entries: list[tuple[str, int]] = field(default_factory=list)  # (pool, weight), in split order
    affinity: str = "none"

    def split(self) -> dict[str, int]:
        return dict(self.entries)


def route_layout(cfg: Config) -> tuple[int, int, int]:
    """(routes, address prefixes, server-name patterns) the region must hold for cfg."""
    n_routes = n_cidrs = n_snis = 0
    for lc in cfg.listeners.values():
        n_routes += len(lc.routes)
        n_cidrs += len(lc.proxy_protocol_from) + sum(len(r.source) for r in lc.routes)
        n_snis += sum(len(r.sni) for r in lc.routes)
    return n_routes, n_cidrs, n_snis


def _cidr_record(net: Any) -> tuple[int, int, bytes, bytes]:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return family, net.prefixlen, net.network_address.packed, net.netmask.packed


class RouteManager:
    """The routes of every listener: writes them at start, publishes split changes, reports them."""

    def __init__(self, region: Region, config: Config, pool_index: Mapping[str, int]) -> None:
        self.region = region
        self.pool_index = dict(pool_index)  # pool name -> index in the region
        self.routes: dict[str, dict[str, RouteState]] = {}  # listener -> route name -> state
        # called after every published split change with (listener, route, new split): the
        # state file (deploy) hooks in here
        self.on_change: Callable[[str, str, dict[str, int]], None] | None = None
        self._write(config)

    # --- start ---------------------------------------------------------------------------------

    def _write(self, cfg: Config) -> None:
        r = self.region
        for name, pc in cfg.pools.items():
            r.set_pool_send_proxy(self.pool_index[name], pc.send_proxy)
        ri = ci = si = 0
        for li, lc in enumerate(cfg.listeners.values()):
            first_route = ri
            proxy_first = ci
            for net in lc.proxy_protocol_from:
                r.set_cidr(ci, *_cidr_record(net))
                ci += 1
            states: dict[str, RouteState] = {}
            for rc in lc.routes:
                first_cidr, first_sni = ci, si
                for net in rc.source:
                    r.set_cidr(ci, *_cidr_record(net))
                    ci += 1
                for pattern in rc.sni:
                    wildcard = pattern.startswith("*.")
                    r.set_sni(si, (pattern[1:] if wildcard else pattern).encode(), wildcard)
                    si += 1
                r.set_route(ri, rc.name, li, rc.has_match, first_cidr, len(rc.source), first_sni, len(rc.sni))
                st = RouteState(ri, lc.name, rc, [(t.pool, t.weight) for t in rc.backends], rc.split_affinity)
                self._store(st)
                states[rc.name] = st
                ri += 1
            r.set_listener_routes(
                li,
                first_route,
                len(lc.routes),
                lc.needs_sni,
                lc.proxy_protocol,
                proxy_first,
                len(lc.proxy_protocol_from),
                int(lc.sni_timeout * 1000),
                lc.sni_no_match,
            )
            self.routes[lc.name] = states

    def _store(self, st: RouteState) -> None:
        """Write st's split into its route's spare buffer and make it live (no generation bump)."""
        self.region.set_split(
            st.index, [self.pool_index[p] for p, _ in st.entries], [w for _, w in st.entries], st.affinity
        )

    # --- runtime -------------------------------------------------------------------------------

    def find(self, listener: str, route: str) -> RouteState:
        """The route, or KeyError with a one-line message naming what exists."""
        routes = self.routes.get(listener)
        if routes is None:
            raise KeyError(f"unknown listener {listener!r} (listeners: {', '.join(self.routes) or 'none'})")
        st = routes.get(route)
        if st is None:
            raise KeyError(f"listener {listener!r} has no route {route!r} (routes: {', '.join(routes)})")
        return st

    def index_names(self) -> dict[int, str]:
        """Global route index -> route name (what the access log prints)."""
        return {st.index: st.config.name for routes in self.routes.values() for st in routes.values()}

    def split(self, listener: str, route: str) -> dict[str, int]:
        """The route's current split: pool -> weight, in split order (weight-0 entries included)."""
        return self.find(listener, route).split()

    def new_entries(self, st: RouteState, weights: Mapping[str, int]) -> list[tuple[str, int]]:
        """The entries set_split(weights) would give st (the whole split: pools left out get 0).
        Raises ValueError (bad weights) or KeyError (unknown pool) with a one-line message."""
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError("a split needs at least one pool=weight")
        for pool, w in weights.items():
            if pool not in self.pool_index:
                raise KeyError(f"unknown pool {pool!r} (pools: {', '.join(self.pool_index)})")
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= MAX_WEIGHT:
                raise ValueError(f"weight of pool {pool!r} must be an integer 0..{MAX_WEIGHT}, got {w!r}")
        have = {p for p, _ in st.entries}
        entries = [(p, weights.get(p, 0)) for p, _ in st.entries]
        entries += [(p, w) for p, w in weights.items() if p not in have]
        if len(entries) > MAX_SPLIT:
            raise ValueError(f"a route splits between at most {MAX_SPLIT} pools")
        return entries

    def set_split(self, listener: str, route: str, weights: Mapping[str, int]) -> dict[str, int]:
        """Replace the route's whole split (pools not named get weight 0) in ONE publish; returns
        the previous split.  KeyError/ValueError (one line) change nothing."""
        st = self.find(listener, route)
        entries = self.new_entries(st, weights)
        previous = st.split()
        self.publish({(listener, route): entries})
        log.info("listener %s route %s: split %s -> %s", listener, route, _fmt(previous), _fmt(dict(entries)))
        return previous

    def publish(
        self,
        changes: Mapping[tuple[str, str], list[tuple[str, int]]],
        affinity: Mapping[tuple[str, str], str] | None = None,
    ) -> int:
        """Make several routes' new entries live with ONE generation bump (reload, rollouts):
        changes[(listener, route)] = [(pool, weight), ...] in split order.  Validate first
        (new_entries); this only writes.  Returns the new generation."""
        for (listener, route), entries in changes.items():
            st = self.find(listener, route)
            st.entries = list(entries)
            if affinity and (listener, route) in affinity:
                st.affinity = affinity[(listener, route)]
            self._store(st)
        gen = self.region.publish()
        if self.on_change is not None:
            for listener, route in changes:
                self.on_change(listener, route, self.find(listener, route).split())
        return gen

    def reload(self, new: Config) -> list[str]:
        """SIGHUP: the splits (pools, weights, affinity) in the file replace the published ones, in
        one publish.  Returns what needs a restart instead (routes added, removed, renamed or
        matching differently; prelude settings; pools the region does not have)."""
        restart: list[str] = []
        changes: dict[tuple[str, str], list[tuple[str, int]]] = {}
        affinity: dict[tuple[str, str], str] = {}
        for lc in new.listeners.values():
            routes = self.routes.get(lc.name)
            if routes is None:
                continue  # a new listener: the supervisor reports it
            if [r.name for r in lc.routes] != list(routes) or any(
                (r.source, r.sni) != (routes[r.name].config.source, routes[r.name].config.sni)
                for r in lc.routes
            ):
                restart.append(f"listeners.{lc.name}.routes (names or matches)")
                continue
            for rc in lc.routes:
                missing = [t.pool for t in rc.backends if t.pool not in self.pool_index]
                if missing:
                    restart.append(f"listeners.{lc.name}.routes.{rc.name} (new pool {missing[0]})")
                    continue
                st = routes[rc.name]
                entries = [(t.pool, t.weight) for t in rc.backends]
                if entries != st.entries or rc.split_affinity != st.affinity:
                    changes[(lc.name, rc.name)] = entries
                    affinity[(lc.name, rc.name)] = rc.split_affinity
                st.config = rc
        if changes:
            self.publish(changes, affinity)
            for (listener, route), entries in changes.items():
                log.info("listener %s route %s: split %s (reload)", listener, route, _fmt(dict(entries)))
        return restart

    @staticmethod
    def prelude_changed(old: ListenerConfig, new: ListenerConfig) -> bool:
        keys = ("proxy_protocol", "proxy_protocol_from", "sni_timeout", "sni_no_match")
        return any(getattr(old, k) != getattr(new, k) for k in keys)

    # --- status --------------------------------------------------------------------------------

    def routes_status(self, listener: str | None = None) -> list[dict[str, Any]]:
        """Every route (of one listener, or of all): match, live split, affinity, connection
        counts (per route and per pool of its split), as `fastlb status` shows them."""
        out = []
        for lname, routes in self.routes.items():
            if listener is not None and lname != listener:
                continue
            for st in routes.values():
                rec = self.region.route(st.index)
                per_pool = rec["pool_connections"]
                out.append(
                    {
                        "listener": lname,
                        "name": st.config.name,
                        "match": {
                            "source": [str(n) for n in st.config.source],
                            "sni": list(st.config.sni),
                        },
                        "split": st.split(),
                        "split_affinity": st.affinity,
                        "connections": rec["connections"],
                        "no_pool": rec["no_pool"],
                        "pools": {p: per_pool[self.pool_index[p]] for p, _ in st.entries},
                    }
                )
        return out


def _fmt(split: Mapping[str, int]) -> str:
    return " ".join(f"{p}={w}" for p, w in split.items())
