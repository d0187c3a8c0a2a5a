"""What the workers record about their own conditions and the control process reports once.

Workers cannot log from their nogil loop; they publish facts in their shared-memory record and the
control process turns them into one log line each (issue 9: pipes smaller than asked).
"""

from __future__ import annotations

import logging

from fastlb._shm import Region

log = logging.getLogger("fastlb")

PIPE_DEFAULT_SIZE = 65536


class DataPlaneWatch:
    """Log, once per control process, when any worker got pipes smaller than the default."""

    def __init__(self, region: Region, n_workers: int) -> None:
        self.region = region
        self.n_workers = n_workers
        self.pipe_logged = False

    def check(self) -> None:
        if self.pipe_logged:
            return
        for i in range(self.n_workers):
            w = self.region.worker(i)
            size = w["pipe_size"]
            if 0 < size < PIPE_DEFAULT_SIZE:
                self.pipe_logged = True
                log.warning(
                    "worker %d: pipes are %d bytes, not %d (the user's pipe budget, "
                    "fs.pipe-user-pages-soft, is used up); forwarding continues with smaller pipes, "
                    "pool capped at %d idle pipes per worker",
                    i,
                    size,
                    PIPE_DEFAULT_SIZE,
                    w["pipe_pool_cap"],
                )
                return
