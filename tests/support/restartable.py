"""A backend that can be restarted on the same port by a command line (for rolling updates).

  python restartable.py start NAME PORT DIR   start a detached "id" server (greets with NAME + "\\n",
                                              then echoes) on 127.0.0.1:PORT; returns once it listens;
                                              its pid goes to DIR/NAME.pid, each start is counted in
                                              DIR/NAME.starts
  python restartable.py restart NAME PORT DIR SIGTERM the running one, wait until it is gone, start again
  python restartable.py stop NAME DIR         SIGTERM, wait until gone

The server exits by itself after LIFETIME seconds (bounded, even if a test dies) and on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LIFETIME = 300.0


def serve(name: str, port: int, ready_fd: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1024)
    ls.setblocking(False)
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die at once, whatever the loop is doing
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)
    end = time.monotonic() + LIFETIME
    greeting = name.encode() + b"\n"
    while time.monotonic() < end:
        for key, _ in sel.select(1.0):
            if key.data is None:
                try:
                    s, _ = ls.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                        continue
                    raise
                s.setblocking(False)
                try:
                    s.send(greeting)
                except OSError:
                    s.close()
                    continue
                sel.register(s, selectors.EVENT_READ, "c")
                continue
            s = key.fileobj
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            with contextlib.suppress(OSError):
                s.sendall(data)  # small echoes: the socket buffer takes them


def start(name: str, port: int, d: Path) -> None:
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, __file__, "_serve", name, str(port), str(w)],
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(d / f"{name}.log", "ab"),  # noqa: SIM115  (the child keeps it)
        start_new_session=True,
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline()
    if line != b"ok\n":
        raise SystemExit(f"restartable {name}: did not start (exit {proc.wait(5)})")
    (d / f"{name}.pid").write_text(str(proc.pid))
    with open(d / f"{name}.starts", "a") as f:
        f.write(f"{proc.pid}\n")


def stop(name: str, d: Path) -> None:
    try:
        pid = int((d / f"{name}.pid").read_text())
    except FileNotFoundError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break  # exited, not yet reaped by its new parent
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.02)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (d / f"{name}.pid").unlink()


def main() -> None:
    cmd = sys.argv[1]
    if cmd == "_serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "start":
        start(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "restart":
        stop(sys.argv[2], Path(sys.argv[4]))
        start(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    elif cmd == "stop":
        stop(sys.argv[2], Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
