"""Python side of the shared region: sockaddr packing, state names, and the layout self-check.

The layout itself is one C header (includes/shm_layout.h); fastlb._shm.Region is the only code
that writes it from Python.  This module turns config values into the bytes the records hold and
record values back into names.
"""

from __future__ import annotations

import socket
import struct

from fastlb import _shm
from fastlb.config import Address

ADMIN_NAMES = {v: k for k, v in _shm.ADMIN.items()}
HEALTH_NAMES = {v: k for k, v in _shm.HEALTH.items()}
ALGORITHM_NAMES = {v: k for k, v in _shm.ALGORITHMS.items()}

# The sizes docs/shared-memory.md documents; a mismatch means the header changed without the docs
# (and without a layout version bump).
# FLB_HIST_BOUNDS_US of shm_layout.h without the last (+Inf) bucket: upper bounds, microseconds
HIST_BOUNDS_US = (
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    25000,
    50000,
    100000,
    250000,
    500000,
    1000000,
    2500000,
    5000000,
)
WORKER_STATE_NAMES = {0: "starting", 1: "running", 2: "draining", 3: "exited"}  # flb_worker_t.state

EXPECTED_RECORD_SIZES = {
    "header": 192,
    "listener": 704,
    "pool": 320,
    "backend": 512,
    "worker": 384,
    "cidr": 32,
    "route": 448,
    "sni": 320,
}


def sockaddr_bytes(addr: Address) -> bytes:
    """struct sockaddr_in / sockaddr_in6 for addr, as connect(2) and bind(2) take it."""
    port = socket.htons(addr.port)
    if addr.family == socket.AF_INET:
        return struct.pack("=HH4s8x", socket.AF_INET, port, socket.inet_pton(socket.AF_INET, addr.host))
    return struct.pack("=HHI16sI", socket.AF_INET6, port, 0, socket.inet_pton(socket.AF_INET6, addr.host), 0)


def check_layout() -> None:
    """Raise RuntimeError if the compiled layout differs from the documented one."""
    if _shm.RECORD_SIZES != EXPECTED_RECORD_SIZES:
        raise RuntimeError(f"shared-memory layout mismatch: {_shm.RECORD_SIZES} != {EXPECTED_RECORD_SIZES}")
