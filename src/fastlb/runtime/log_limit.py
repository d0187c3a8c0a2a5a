"""Rate-limiting of repeated identical log lines (issue 9 item 8: 9.5 MB of log in 15 s once).

`RepeatFilter` lets the first occurrence of a message through, drops the identical ones that follow
within `window` seconds, and when the message comes again after the window, lets it through with
" (repeated N times in the last Ss)" appended.  Identical means: same logger, level and rendered
message.  The filter holds at most `max_keys` messages (the oldest are forgotten).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

WINDOW = 10.0
MAX_KEYS = 1024


class RepeatFilter(logging.Filter):
    def __init__(self, window: float = WINDOW, max_keys: int = MAX_KEYS) -> None:
        super().__init__()
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()  # key -> [since, count]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as it would
            return True
        key = (record.name, record.levelno, message)
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            return False
        if entry is not None and entry[1]:
            record.msg = f"{message} (repeated {int(entry[1])} times in the last {now - entry[0]:.0f}s)"
            record.args = None
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True


def install(logger: logging.Logger | None = None, window: float = WINDOW) -> RepeatFilter:
    """Add one RepeatFilter to every handler of `logger` (default: the root logger), so that records
    propagated from every logger (fastlb's, asyncio's) pass through it."""
    flt = RepeatFilter(window)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt
