"""The targets of the comparison benchmark: the balancers under test and the direct connection.

Every module in this package is a target file; the registry below finds them by itself, so adding a
target is adding one file (bench/README.md says how).  A target file defines:

    NAME = "haproxy"          # the --targets name, also the key in the results
    LABEL = "HAProxy"         # how BENCHMARKS.md names it
    ORDER = 20                # position in a round (targets are interleaved in this order)
    BALANCER = True           # False only for "direct": no process, the backends' own ports
    def command(suite, workers, ports, run, env) -> list[str]:
        # write its config into suite.rundir (one listener per pool in suite.pools: ports[pool] in
        # front of suite.bp[pool]), return the argv; may add to env and to run.extra
    def ready(run) -> None:   # optional: wait for its own readiness signal (fastlb: sd_notify)
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def _discover() -> dict[str, ModuleType]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found.append(module)
    found.sort(key=lambda m: (m.ORDER, m.NAME))
    return {m.NAME: m for m in found}


REGISTRY = _discover()
TARGETS = tuple(REGISTRY)
# what a plain `scripts/bench` compares; a target file with DEFAULT = False runs only when named
DEFAULT_TARGETS = tuple(name for name, m in REGISTRY.items() if getattr(m, "DEFAULT", True))
BALANCERS = tuple(name for name, m in REGISTRY.items() if m.BALANCER)
TARGET_LABEL = {name: m.LABEL for name, m in REGISTRY.items()}
