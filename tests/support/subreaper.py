"""Run a command under a child subreaper: `python subreaper.py CMD ARGS...`.

PR_SET_CHILD_SUBREAPER makes this process adopt its orphaned descendants (as systemd's service
manager or a container init does) instead of pid 1: a child whose parent dies sees getppid() change
to this pid, not to 1.  It reaps every adopted process and exits once none is left (or on SIGTERM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"subreaper: prctl failed: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    subprocess.Popen(sys.argv[1:])  # noqa: S603  (the test's own command line)
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return 0


if __name__ == "__main__":
    sys.exit(main())
