"""Consistent-hash tables (Maglev, ring) built by the control process and published to the workers.

A pool's table is rebuilt whenever the set of backends that may take new connections, or their
weights, change.  Every backend slot of the pool takes part by name, with weight 0 while it cannot
take connections, so the other backends keep their slots (Maglev's permutations are per name).
"""

from __future__ import annotations

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
