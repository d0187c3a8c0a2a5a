"""Consistent-hash tables (Maglev, ring) built by the control process and published to the workers.

A pool's table is rebuilt whenever the set of backends that may take new connections, or their
weights, change.  Every backend slot of the pool takes part by name, with weight 0 while it cannot
take connections, so the other backends keep their slots (Maglev's permutations are per name).

Rebuilds cost: a Maglev table of 5,000,011 entries takes ~0.5-1 s of CPU.  `TablePublisher` so
rebuilds a pool's table only when the names or weights it encodes change, and a change that only
moves slow-start ramps along is applied at most once per RAMP_COST_FACTOR x the pool's last build
time: a ramp over a big table costs at most ~1/(1 + RAMP_COST_FACTOR) of a core (and moves other
backends' keys fewer times), while small tables (a 65537-entry build takes ~10 ms) follow every
slow-start tick.  Any other change (membership, health, admin state, set-weight, the end of a ramp)
is published at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from fastlb import _maglev
from fastlb._shm import Region


def table_capacity(algorithm: str, n_slots: int, maglev_table_size: int, ring_vnodes: int) -> int:
    """uint32 entries each of a pool's two table buffers needs (0 for the non-hashing algorithms)."""
    if algorithm == "maglev":
        return maglev_table_size
    if algorithm == "ring_hash":
        return 2 * _maglev.ring_points([1000] * n_slots, ring_vnodes)
    return 0


def publish_table(
    region: Region,
    pool_index: int,
    algorithm: str,
    first_backend: int,
    names: Sequence[str],
    weights: Sequence[int],
    maglev_table_size: int,
    ring_vnodes: int,
) -> None:
    """Build the pool's table into the spare buffer and flip it live (the caller bumps the generation)."""
    spare = region.table_spare(pool_index)
    if algorithm == "maglev":
        _maglev.maglev_build_into(spare, list(names), list(weights), maglev_table_size, first_backend)
        region.table_flip(pool_index, maglev_table_size)
    elif algorithm == "ring_hash":
        n = _maglev.ring_build_into(spare, list(names), list(weights), ring_vnodes, first_backend)
        region.table_flip(pool_index, n)


RAMP_COST_FACTOR = 5.0


class TablePublisher:
    """Publishes the pools' hash tables into the region, skipping rebuilds that would change nothing
    and spacing out those that only advance slow-start ramps (see the module docstring)."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.builds = 0  # tables built and flipped live
        self.skipped = 0  # publishes that encoded the same names and weights as the live table
        self.deferred = 0  # ramp-only changes held back by the cost budget
        self._live: dict[int, tuple[tuple[str, ...], tuple[int, ...]]] = {}  # pool -> what the table encodes
        self._built_at: dict[int, float] = {}  # pool -> monotonic end of its last build
        self._cost: dict[int, float] = {}  # pool -> seconds its last build took

    def publish(
        self,
        pool_index: int,
        algorithm: str,
        first_backend: int,
        names: Sequence[str],
        weights: Sequence[int],
        ramping: Sequence[bool],
        maglev_table_size: int,
        ring_vnodes: int,
    ) -> bool:
        """Build and flip the pool's table if it must change now; True if it did.

        ramping[i]: slot i is in a slow-start ramp (its weight will change again soon), so a change
        confined to such slots may wait for the cost budget.  Callers pass all False for changes an
        operator or a health check made: those are published at once."""
        want = (tuple(names), tuple(weights))
        live = self._live.get(pool_index)
        if live == want:
            self.skipped += 1
            return False
        now = time.monotonic()
        if live is not None and live[0] == want[0]:
            # weights that only move between non-zero values of ramping slots (a slot coming back
            # from 0, or going to 0, is a membership change: never deferred)
            ramp_only = all(
                a == b or (r and a > 0 and b > 0) for a, b, r in zip(live[1], want[1], ramping, strict=True)
            )
            budget = RAMP_COST_FACTOR * self._cost.get(pool_index, 0.0)
            if ramp_only and now - self._built_at.get(pool_index, 0.0) < budget:
                self.deferred += 1
                return False
        start = time.perf_counter()
        publish_table(
            self.region, pool_index, algorithm, first_backend, names, weights, maglev_table_size, ring_vnodes
        )
        self._cost[pool_index] = time.perf_counter() - start
        self._built_at[pool_index] = time.monotonic()
        self._live[pool_index] = want
        self.builds += 1
        return True
