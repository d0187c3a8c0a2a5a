"""A worker process's entry point, in a fresh interpreter that the control process execs.

The control process forks, opens the worker's listening sockets in the child (so a bind error is
reported with the listener's name) and then execs ``python -I -S -c BOOT``: a bare interpreter
(no site, no environment) that imports only this module and the data-plane extension.  The worker
so does not carry a copy of the control process (asyncio, click, the parsed config: about 10 MiB
resident per worker); what it holds is the interpreter core, fastlb._core and the loop's own
tables.  The shared region reaches it as its memfd, which it maps itself.

argv (after BOOT's own first argument, the directory that holds the fastlb package):
    region_fd index shutdown_timeout orphan_timeout control_pid listen_fd...

The worker watches control_pid through a pidfd (core/orphan.pxi): when the control process dies it
keeps serving with the last published state and drains orphan_timeout seconds later (or when a new
fastlb takes over and sends SIGTERM).

With [global] user / group the control process puts "UID:GID" in FASTLB_RUN_AS: the worker drops
to them (setgroups, setgid, setuid, PR_SET_NO_NEW_PRIVS) after its sockets and the region are
open and before it reads a byte from a client (PROXY headers, ClientHellos, datagrams).

Drained by orphan_timeout, its last act is to withdraw the announced routes (fastlb.fleet.announce:
FASTLB_ORPHAN_WITHDRAW names them), in a normal interpreter it execs: this one never imports the
netlink library.  A worker that dropped to [global] user has no CAP_NET_ADMIN left for that: the
next `fastlb serve` withdraws (or adopts) the routes it finds instead.
"""

from __future__ import annotations

import os
import sys

from fastlb import _core

# The program the control process passes to `python -I -S -c`.  -I: no environment variables, no
# user site, no current directory on sys.path; -S: no site-packages processing (.pth files would
# import whatever they like), so the package's directory is put on sys.path explicitly.
RUN_AS_ENV = "FASTLB_RUN_AS"
PR_SET_NO_NEW_PRIVS = 38
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from fastlb.worker import main; sys.exit(main(sys.argv[2:]))"


def command(
    index: int,
    region_fd: int,
    listen_fds: list[int],
    shutdown_timeout: float,
    orphan_timeout: float = 300.0,
    control_pid: int | None = None,
) -> list[str]:
    """The argv that execs worker `index` (every fd in it must be inheritable); control_pid defaults
    to the calling process (the worker's parent after fork)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        BOOT,
        package_parent,
        str(region_fd),
        str(index),
        repr(shutdown_timeout),
        repr(orphan_timeout),
        str(os.getpid() if control_pid is None else control_pid),
        *(str(fd) for fd in listen_fds),
    ]


def drop_privileges(spec: str) -> None:
    """Become UID:GID ("-1" keeps that id) for good: the supplementary groups go, the saved ids
    follow (setuid/setgid as root set all three), and no exec may gain privileges again.  Raises
    OSError (EPERM when the control process may not change ids)."""
    import ctypes  # here, and before the ids change: the interpreter's own files may be root's only

    libc = ctypes.CDLL(None, use_errno=True)  # (a worker without user/group keeps its interpreter lean)
    uid, gid = (int(x) for x in spec.split(":"))
    if gid >= 0:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
    if uid >= 0:
        os.setresuid(uid, uid, uid)
    if (uid >= 0 and os.geteuid() != uid) or (gid >= 0 and os.getegid() != gid):
        raise PermissionError(1, "the ids did not change")
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def main(argv: list[str]) -> int:
    region_fd, index, shutdown_timeout = int(argv[0]), int(argv[1]), float(argv[2])
    orphan_timeout, control_pid = float(argv[3]), int(argv[4])
    listen_fds = [int(a) for a in argv[5:]]
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(f"fastlb-w{index}")
    except OSError:
        pass
    address = _core.map_region(region_fd, os.fstat(region_fd).st_size)
    # region_fd stays open (close-on-exec): after a kill -9 of the control process, `fastlb status`
    # reads the orphans' state through /proc/PID/fd/REGION_FD (fastlb.observe.orphans)
    os.set_inheritable(region_fd, False)
    run_as = os.environ.pop(RUN_AS_ENV, None)
    if run_as:
        try:
            drop_privileges(run_as)
        except OSError as exc:
            print(
                f"fastlb: worker {index}: cannot drop privileges to uid:gid {run_as} ([global] user/group): "
                f"{exc.strerror or exc} (fastlb serve must start as root, or with CAP_SETUID and CAP_SETGID)",
                file=sys.stderr,
                flush=True,
            )
            return 1
    rc = _core.run_worker(address, index, listen_fds, shutdown_timeout, orphan_timeout, control_pid)
    if rc == -3:
        print(
            f"fastlb: worker {index}: control process {control_pid} gone before start",
            file=sys.stderr,
            flush=True,
        )
        return 1
    if rc < 0:
        print(f"fastlb: worker {index}: data plane stopped: {os.strerror(-rc)}", file=sys.stderr, flush=True)
        return 1
    spec = os.environ.get("FASTLB_ORPHAN_WITHDRAW", "").split()
    if _core.orphan_expired() and len(spec) > 2 and not run_as:  # a dropped user cannot (see above)
        table, protocol, *hosts = spec
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=package_parent)
        argv = [
            sys.executable,
            "-m",
            "fastlb.fleet.announce",
            "withdraw",
            "--table",
            table,
            "--protocol",
            protocol,
        ]
        try:
            os.execve(sys.executable, argv + hosts, env)
        except OSError as exc:
            print(
                f"fastlb: worker {index}: cannot withdraw {' '.join(hosts)}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return 1
    return 0
