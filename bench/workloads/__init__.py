"""The workloads of the comparison benchmark, and the backend pools they run against.

Every module in this package is a workload file: it defines `WORKLOADS`, a list of `Workload`s, and
the `Pool` (backends) they use, either its own or one imported from another workload file.  The
registry below finds them by itself: adding a workload is adding one file (bench/README.md says how).

A pool is one kind of backend (nginx serving HTTP, an iperf3 server, an echo server) on ports of its
own; every balancer target gets one listener per pool, in front of that pool's backends (see
bench/targets/).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pool:
    """Backends of one kind.

    start(suite, ports) starts them (on the load CPU) and waits until they answer; check(port) is a
    request through a balancer's listener that must succeed before measuring (None: do not probe,
    e.g. iperf3's one-test-at-a-time server); restart(suite) starts them again after a failed run
    (None: not needed).  backend_offset: their ports are port_base + backend_offset + 0, 1, ...;
    listener: the balancer listener's offset within the target's port block (order of appearance)."""

    name: str
    n_backends: int
    backend_offset: int
    listener: int
    start: Callable
    check: Callable[[int], bool] | None = None
    restart: Callable | None = None
    what: str = ""  # how a failed check names what did not come through ("HTTP"); default: the name


@dataclass(frozen=True)
class Workload:
    """One measured run against a started target.

    measure(suite, run) returns the metrics dict of the run: "rate" (the headline figure, in `unit`)
    and "work" (what is counted per balancer CPU-second, in `work_unit`) at least.  `table` picks the
    BENCHMARKS.md layout: "rate", "latency" (rate plus p50/p99/errors) or "memory" (the idle table).
    `summary_keys`: further metrics that get medians in the summary.  `order`: position in the suite."""

    name: str
    order: int
    title: str
    unit: str
    work_unit: str
    higher_is_better: bool
    pool: Pool
    measure: Callable
    table: str = "rate"
    balancer_only: bool = False  # not run against the direct connection
    retry_when_noisy: bool = True
    summary_keys: tuple[str, ...] = field(default_factory=tuple)


def _discover() -> dict[str, Workload]:
    found: list[Workload] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += getattr(module, "WORKLOADS", [])
    found.sort(key=lambda w: (w.order, w.name))
    names = [w.name for w in found]
    if len(set(names)) != len(names):
        raise ImportError(f"two workloads with the same name in bench/workloads: {names}")
    return {w.name: w for w in found}


REGISTRY = _discover()
WORKLOADS = tuple(REGISTRY)
POOLS: dict[str, Pool] = {}
for _w in sorted(REGISTRY.values(), key=lambda w: w.pool.listener):
    if POOLS.setdefault(_w.pool.name, _w.pool) is not _w.pool:
        raise ImportError(f"two pools named {_w.pool.name!r} in bench/workloads")
_taken: dict[int, str] = {}
for _p in POOLS.values():
    for _port in [1000 + _p.listener, *(_p.backend_offset + i for i in range(_p.n_backends))]:
        if _taken.setdefault(_port, _p.name) != _p.name:
            raise ImportError(f"pools {_taken[_port]!r} and {_p.name!r} use the same port offset {_port}")
WORKLOAD_INFO = {w.name: (w.title, w.unit, w.work_unit, w.higher_is_better) for w in REGISTRY.values()}
