"""Rate-limiting of repeated identical log lines (issue 9 item 8: 9.5 MB of log in 15 s once).

`RepeatFilter` lets the first `burst` occurrences of a message within `window` seconds through (a
reload twice in a row is two events worth seeing), drops the identical ones that follow in that
window, and when the message comes again after the window, lets it through with " (repeated N times
in the last Ss)" appended.  Identical means: same logger, level and rendered message.  The filter
holds at most `max_keys` messages (the oldest are forgotten).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

WINDOW = 10.0
BURST = 5
MAX_KEYS = 1024


class RepeatFilter(logging.Filter):
    def __init__(self, window: float = WINDOW, burst: int = BURST, max_keys: int = MAX_KEYS) -> None:
        super().__init__()
        self.window = window
        self.burst = burst
        self.max_keys = max_keys
        # key -> [window start, lines let through in it, lines dropped in it]
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as it would
            return True
        key = (record.name, record.levelno, message)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            return False
        if entry is not None and entry[2]:
            record.msg = f"{message} (repeated {int(entry[2])} times in the last {now - entry[0]:.0f}s)"
            record.args = None
        self._seen[key] = [now, 1, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True


def install(logger: logging.Logger | None = None, window: float = WINDOW, burst: int = BURST) -> RepeatFilter:
    """Add one RepeatFilter to every handler of `logger` (default: the root logger), so that records
    propagated from every logger (fastlb's, asyncio's) pass through it."""
    flt = RepeatFilter(window, burst)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt
