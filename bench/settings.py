"""The settings of one benchmark run (`compare.py run` options) and the port plan."""

from __future__ import annotations

from dataclasses import dataclass

from targets import BALANCERS, DEFAULT_TARGETS
from workloads import POOLS, WORKLOADS


@dataclass
class Settings:
    rounds: int = 3
    duration: float = 5.0
    workers: tuple[int, ...] = (1, 2)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    workloads: tuple[str, ...] = WORKLOADS
    idle_conns: int = 9000
    wrk_conns: int = 32
    cpu_quota_pct: int = 50
    cpu_period_us: int = 10000
    balancer_cpu: int = 1
    load_cpu: int = 0
    port_base: int = 18000
    quick: bool = False
    publish: bool = True
    boost: bool = True  # priority over other processes on a shared machine (nice, cgroup weight)

    def ports(self, target: str) -> dict[str, int]:
        """Listening ports of a balancer target, one per pool (direct uses the backends' own ports)."""
        base = self.port_base + 1000 + 100 * BALANCERS.index(target)
        return {name: base + pool.listener for name, pool in POOLS.items()}

    def backend_ports(self) -> dict[str, list[int]]:
        b = self.port_base
        return {
            name: [b + pool.backend_offset + i for i in range(pool.n_backends)]
            for name, pool in POOLS.items()
        }
