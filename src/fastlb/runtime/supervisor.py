"""The control process of `fastlb serve`: shared memory, workers, the control socket, publishing.

It creates the shared region from the config, opens the listening sockets and keeps them
(runtime/listeners.py), starts one worker per CPU (a bare interpreter that runs the nogil loop of
fastlb._core, see fastlb.worker), restarts a worker that dies or stalls (on the same sockets: its
accept queue survives), answers the control socket (status, weights, drain, takeover: see
runtime/takeover.py), and on SIGTERM/SIGINT stops accepting, lets connections finish up to
shutdown_timeout and exits 0.  Everything per connection happens in the workers; this process only writes
configuration and states into shared memory and reads counters back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import TYPE_CHECKING

from fastlb import worker
from fastlb._shm import Region
from fastlb.config import Config
from fastlb.config.protect import keepalive_record
from fastlb.control.server import handle_request
from fastlb.deploy.engine import DeployManager
from fastlb.fleet.announce import orphan_withdraw_env
from fastlb.observe.document import (
    backend_extras,
    keepalive_settings,
    listener_settings,
    refused,
    worker_status,
)
from fastlb.runtime import handover, runfile, takeover
from fastlb.runtime.backends import BackendManager, BackendSlot, PoolState
from fastlb.runtime.control_socket import ControlServer, ControlSocketError
from fastlb.runtime.dataplane import DataPlaneWatch
from fastlb.runtime.health import CheckTarget, HealthChecker
from fastlb.runtime.listeners import BindError, ListenerSockets, log_migrate_req
from fastlb.runtime.ops import OpsServices
from fastlb.runtime.preludes import prelude_status
from fastlb.runtime.reload import reload_config
from fastlb.runtime.routes import RouteManager, route_layout
from fastlb.runtime.statefile import StateFile, StateFileInUse
from fastlb.runtime.tables import table_capacity
from fastlb.runtime.udp import udp_listener_fields, udp_listener_status
from fastlb.runtime.watchdog import Watchdog
from fastlb.shm import ADMIN_NAMES, HEALTH_NAMES, check_layout, sockaddr_bytes

if TYPE_CHECKING:
    from fastlb.fleet.admin import AdminServer
    from fastlb.fleet.announce import Announcer
    from fastlb.fleet.discovery import Discovery
    from fastlb.observe.accesslog import AccessLog

log = logging.getLogger("fastlb")

SPARE_SLOTS_MIN = 8  # backend slots kept free per pool for backends added at runtime
READY_TIMEOUT = 15.0  # seconds for all workers to open their listeners
RESTART_BACKOFF_MAX = 5.0
TICK_INTERVAL = 0.1  # seconds between backends.tick() while ejection, a ramp or a drain is active
TICK_IDLE_MAX = 0.5  # otherwise: how soon a backend's first failed connects are looked at
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class StartupError(Exception):
    """fastlb serve cannot start (a listener cannot bind, a worker fails at once)."""


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1; a no-op without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", message, exc)


class Supervisor:
    """Owns the region and the workers; one instance per `fastlb serve`."""

    def __init__(
        self, config: Config, workers: int | None = None, predecessor: takeover.Predecessor | None = None
    ) -> None:
        check_layout()
        self.config = config
        self.n_workers = workers or config.global_.workers
        self.workers_override = workers
        self.shutdown_timeout = config.global_.shutdown_timeout
        self.pools: dict[str, PoolState] = {}
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.restarts: dict[int, int] = {}  # worker index -> consecutive quick deaths
        self.restart_count: dict[int, int] = {}  # worker index -> restarts since start
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.ready = False
        self.startup_failure: str | None = None
        self.exit_code = 0
        self.control: ControlServer | None = None
        self._all_exited: asyncio.Event | None = None  # set once stopping and no worker is left
        self._tick_wake: asyncio.Event | None = None  # set when backend state may need tick()
        self._control_path = ""
        self.control_pid = os.getpid()  # what a worker watches (it must not read it after fork)
        self._control_ino = 0
        self.predecessor = predecessor or takeover.Predecessor()
        self.handover = handover.Handover(self)  # what a successor gets from this process
        self.listeners = ListenerSockets(config, self.n_workers)
        self.runfile_path = runfile.path_for(config.global_.control_socket)
        self.watchdog = Watchdog(self, config.global_.worker_stall_timeout)
        self.region = self._build_region()
        self.state = StateFile(config.global_.state_file, config.file, config.global_.control_socket)
        try:
            self.state.load()
        except StateFileInUse as exc:
            raise StartupError(str(exc)) from None
        self.backends = BackendManager(self.region, self.pools, self.state)
        self.routes = RouteManager(self.region, config, {n: ps.index for n, ps in self.pools.items()})
        self.dataplane = DataPlaneWatch(self.region, self.n_workers)
        self.deploy = DeployManager(self)  # rollouts, switches, runtime splits (fastlb.deploy)
        self.routes.on_change = self.deploy.on_split_change  # every split change -> state file
        self.deploy.restore()
        self.checker: HealthChecker | None = None
        self.discovery: Discovery | None = None
        self.access_log: AccessLog | None = None
        self.admin: AdminServer | None = None
        self.ops = OpsServices(config)
        self.announce: Announcer | None = None  # VIP routes (fleet/announce.py), once ready

    # --- shared memory -----------------------------------------------------------------------

    def _build_region(self) -> Region:
        cfg = self.config
        first = 0
        caps = []
        for i, (name, pc) in enumerate(cfg.pools.items()):
            n_slots = len(pc.backends) + max(SPARE_SLOTS_MIN, len(pc.backends))
            if pc.discover is not None:
                n_slots += pc.discover.max_backends
            self.pools[name] = PoolState(i, pc, first, n_slots)
            caps.append(table_capacity(pc.algorithm, n_slots, pc.maglev_table_size, pc.ring_vnodes))
            first += n_slots
        n_routes, n_cidrs, n_snis = route_layout(cfg)
        log_slots = cfg.global_.access_log_buffer if cfg.global_.access_log != "off" else 0
        region = Region(
            len(cfg.listeners),
            len(cfg.pools),
            first,
            self.n_workers,
            caps,
            n_cidrs=n_cidrs,
            n_routes=n_routes,
            n_snis=n_snis,
            log_slots=log_slots,
        )
        for ps in self.pools.values():
            pc = ps.config
            region.set_pool(
                ps.index, pc.name, pc.algorithm, pc.hash_key, pc.retries, ps.first, ps.n_slots, pc.all_down
            )
            region.set_pool_keepalive(ps.index, *keepalive_record(pc.backend_keepalive, pc.tcp_user_timeout))
            for k, bc in enumerate(pc.backends):
                slot = BackendSlot(
                    ps.first + k,
                    pc.name,
                    bc.name,
                    str(bc.address),
                    bc.weight,
                    priority=bc.priority,
                    backup=bc.backup,
                )
                ps.slots[bc.name] = slot
                region.set_backend(slot.index, ps.index, bc.name, sockaddr_bytes(bc.address), bc.weight)
        for i, lc in enumerate(cfg.listeners.values()):
            region.set_listener(
                i,
                lc.name,
                self.pools[lc.pool].index,
                int(lc.connect_timeout * 1000),
                int(lc.idle_timeout * 1000),
                lc.max_connections,
                sockaddr_bytes(lc.bind),
                lc.backlog,
                round(lc.half_close_timeout * 1000),
                **udp_listener_fields(lc),
            )
            region.set_listener_keepalive(i, *keepalive_record(lc.client_keepalive, lc.tcp_user_timeout))
        return region

    # --- workers -----------------------------------------------------------------------------

    def open_listeners(self) -> None:
        """Open (or inherit from a predecessor) every listening socket; fail early, with the
        listener's name, if an address cannot be bound."""
        log_migrate_req()
        try:
            self.listeners.open(self.predecessor.sockets)
        except BindError as exc:
            raise StartupError(str(exc)) from None
        finally:
            self.predecessor.sockets = {}

    def write_runfile(self) -> None:
        """Record this control process and its workers (pid, start time, listening fds).  Not once
        stopping: after a takeover the file is the successor's."""
        if self.stopping:
            return
        entries = []
        fds_of = {}
        for t in self.listeners.table():
            fds_of.setdefault(t["worker"], []).append({"name": t["name"], "bind": t["bind"], "fd": t["fd"]})
        for pid, index in self.pids.items():
            started = runfile.start_time(pid)
            if started is not None:
                entries.append(runfile.WorkerEntry(index, pid, started, fds_of.get(index, [])))
        try:
            runfile.write(self.runfile_path, self.config.file, entries)
        except OSError as exc:
            log.warning("runtime file %s: %s", self.runfile_path, exc.strerror)

    def spawn(self, index: int) -> int:
        self.region.reset_worker(index)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = 70
            try:
                code = self._worker_child(index)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.pids[pid] = index
        self.started_at[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, pid)
        self.write_runfile()
        return pid

    def _worker_child(self, index: int) -> int:
        """In the forked child: keep the region's memfd and this worker's listening sockets (the
        control process's own, so a replacement gets the same ones back), then exec a bare
        interpreter running fastlb.worker (see there why), which maps the region from its memfd."""
        # signals stay blocked from before fork() and across exec: the loop takes them through a
        # signalfd.  Drop every other descriptor inherited from the control process (its event
        # loop, the control socket, other workers' listening sockets, health checks in flight).
        signal.set_wakeup_fd(-1)
        region_fd = self.region.fd
        fds = self.listeners.fds(index)
        low = 3
        for fd in sorted({region_fd, *fds}):
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, os.sysconf("SC_OPEN_MAX"))
        for fd in (region_fd, *fds):
            os.set_inheritable(fd, True)
        g = self.config.global_
        orphan_withdraw_env(self.config)  # orphan_timeout withdraws the routes (fastlb.worker)
        argv = worker.command(
            index, region_fd, fds, self.shutdown_timeout, g.orphan_timeout, self.control_pid
        )
        os.environ.pop(worker.RUN_AS_ENV, None)  # ([global] user/group) only ever from the config
        if g.run_as is not None:  # the worker drops to them once its sockets are open (worker.py)
            os.environ[worker.RUN_AS_ENV] = f"{g.run_as[0]}:{g.run_as[1]}"
        os.execv(argv[0], argv)
        return 70  # not reached: execv raises on failure

    def workers_ready(self) -> bool:
        for pid, index in self.pids.items():
            w = self.region.worker(index)
            if w["pid"] != pid or w["state"] != 1:
                return False
        return len(self.pids) == self.n_workers

    def reap(self) -> None:
        """Collect dead workers; restart them (with back-off if they keep dying) unless stopping."""
        # only our workers and an upgrade's successor: waitpid(-1) would also reap the children
        # asyncio waits for (a rollout's --check command)
        for pid in [*self.pids, *self.handover.children()]:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # gone without a status (cannot happen to a live child)
                got, status = (pid, 0) if pid in self.pids else (0, 0)
            if got == 0:
                continue
            index = self.pids.pop(pid, None)
            if index is None:
                self.handover.reaped(pid, status)
                continue
            self.write_runfile()
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log.info("worker %d (pid %d) exited (%s)", index, pid, _describe_exit(code))
                self.region.reset_worker(index)
                if not self.pids and self._all_exited is not None:
                    self._all_exited.set()
                continue
            if not self.ready:
                self.startup_failure = f"worker {index} failed to start ({_describe_exit(code)})"
                continue
            log.error("worker %d (pid %d) died (%s); restarting it", index, pid, _describe_exit(code))
            self.restart_count[index] = self.restart_count.get(index, 0) + 1
            # killed from outside (kill -9, the OOM killer, our watchdog): back at once, on the same
            # sockets.  Back-off is only for a worker that keeps dying by itself.
            quick = code != -signal.SIGKILL and time.monotonic() - self.started_at.get(index, 0.0) < 5.0
            self.restarts[index] = self.restarts.get(index, 0) + 1 if quick else 0
            delay = min(RESTART_BACKOFF_MAX, 0.1 * (2 ** self.restarts[index])) if quick else 0.0
            asyncio.get_running_loop().call_later(delay, self._restart, index)

    def _restart(self, index: int) -> None:
        if not self.stopping and index not in self.pids.values():
            self.spawn(index)

    # --- the control process's loop ------------------------------------------------------------

    async def run(self) -> int:
        """Start the workers, serve until told to stop, wait for the workers to exit.

        Event-driven: between events (signals, a worker exiting, control requests, health checks,
        periodic backend work while some is pending) this process sleeps in epoll_wait."""
        loop = asyncio.get_running_loop()
        self._all_exited = asyncio.Event()
        self._tick_wake = asyncio.Event()
        await self._start_discovery()  # only discovered backends: their first answer comes first
        self.open_listeners()
        await self._start_control_socket()  # before any worker: without it, serve does not start
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_shutdown, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR2, self.upgrade)
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        for i in range(self.n_workers):
            self.spawn(i)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.workers_ready():
            if self.stopping:
                break
            if self.startup_failure or time.monotonic() > deadline:
                self.begin_shutdown(None)
                if self.control is not None:
                    self.control.close()
                raise StartupError(self.startup_failure or "workers did not open their listeners in time")
            await asyncio.sleep(0.01)
        self._publish_control_socket()
        self.ready = True
        self._start_access_log()
        self.predecessor.finish()  # a takeover: the old instance or the orphans drain now
        self.write_runfile()
        self.ops.inherited = self.predecessor.services  # a takeover: the HTTP services' sockets
        self.predecessor.services = {}
        await self.ops.start(self)
        tasks = [asyncio.create_task(self._tick_loop()), asyncio.create_task(self.deploy.run())]
        targets = self.backends.check_targets()
        self.checker = HealthChecker(
            targets, self._on_check_transition, on_success=self.backends.on_check_success
        )
        tasks.append(asyncio.create_task(self.checker.run()))
        self._start_fleet_services()
        self._start_announce()
        self.ops.close_inherited()
        if not self.stopping:
            listeners = ", ".join(f"{lc.name}={lc.bind}" for lc in self.config.listeners.values())
            log.info("ready: %d workers, listeners: %s", self.n_workers, listeners)
            # a successor announces itself as the main process too (NotifyAccess=all, a crash takeover)
            sd_notify("READY=1" if self.predecessor.kind == "none" else f"READY=1\nMAINPID={os.getpid()}")
            if self.predecessor.carried.pending_reload:
                log.info(
                    "reload: pid %d was asked to reload during the takeover; re-reading now",
                    self.predecessor.pid,
                )
                self.reload()
        if self.stopping and not self.pids:
            self._all_exited.set()
        await self._all_exited.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.handover.services_released()  # taken over: HTTP requests in flight answered
        await self._stop_fleet_services()
        if self.announce is not None:
            self.announce.close()
        if self.access_log is not None:
            await self.access_log.stop()  # after the workers: their last connections are logged too
        if self.control is not None:
            self.control.close()
        runfile.remove_if_mine(self.runfile_path)
        await self.ops.stop()
        log.info("stopped")
        return self.exit_code

    async def _tick_loop(self) -> None:
        """backends.tick() every TICK_INTERVAL while it has work; otherwise sleep until poked
        (a control request, a reload, a health transition) or, as a safety net, TICK_IDLE_MAX."""
        assert self._tick_wake is not None
        while True:
            busy = self.backends.needs_tick() or (self.announce is not None and self.announce.needs_tick())
            try:
                async with asyncio.timeout(TICK_INTERVAL if busy else TICK_IDLE_MAX):
                    await self._tick_wake.wait()
            except TimeoutError:
                pass
            self._tick_wake.clear()
            try:
                self.backends.tick()
                self.dataplane.check()
                if self.announce is not None:
                    self.announce.tick()
                self.state.retry()
            except Exception:
                log.exception("periodic backend update failed")
            self.watchdog.check()

    def _start_access_log(self) -> None:
        g = self.config.global_
        if g.access_log == "off":
            return
        from fastlb.observe.accesslog import AccessLog, Names

        def backend_names() -> dict[int, str]:
            return {s.index: s.name for ps in self.pools.values() for s in ps.slots.values()}

        names = Names(
            list(self.config.listeners), list(self.config.pools), backend_names, self.routes.index_names
        )
        self.access_log = AccessLog(self.region, self.n_workers, g.access_log, g.access_log_format, names)
        self.access_log.start()
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.access_log.reopen)

    def metrics_text(self) -> tuple[bytes, str] | None:
        """The /metrics page (body, content type) when [global] metrics is on: the admin API serves
        it on its own port too."""
        if self.config.global_.metrics is None:
            return None
        from fastlb.observe.metrics import CONTENT_TYPE, render

        return render(self), CONTENT_TYPE

    async def _start_discovery(self) -> None:
        """DNS discovery for the pools that have it, from the predecessor's last good sets (a
        takeover); a pool with no static backends and nothing inherited waits for its first answer
        (discover.initial_timeout) before the listeners open."""
        # imported only when used: dnspython costs the control process memory
        discovering = {n: p.discover for n, p in self.config.pools.items() if p.discover is not None}
        if not discovering:
            return
        from fastlb.fleet.discovery import Discovery

        self.discovery = Discovery(discovering, self._on_discovered)
        for name, pd in self.discovery.pools.items():
            inherited = handover.inherited_backends(self.predecessor.carried, name, pd.query)
            self.discovery.inherit(name, inherited, self.predecessor.pid)
            if inherited:  # served before: full weight at once, as static backends at start
                for slot in self.pools[name].slots.values():
                    slot.slow_start_from = None
                self.backends.publish_pool(self.pools[name])
        self.discovery.start()
        await self.discovery.wait_first(
            [n for n, p in self.config.pools.items() if p.discover and not p.backends]
        )

    def _start_fleet_services(self) -> None:
        """The remote admin API if configured (DNS discovery started before the listeners)."""
        # imported only when used: aiohttp costs the control process memory (and OpenSSL)
        if self.config.global_.admin is not None:
            from fastlb.fleet.admin import AdminServer

            cfg = self.config.global_.admin
            self.admin = AdminServer(self, cfg, self.ops.inherited.pop(f"admin/{cfg.bind}", None))
            self._admin_task = asyncio.create_task(self.admin.start())

    # --- VIP announcement (fleet/announce.py) ------------------------------------------------

    def _start_announce(self) -> None:
        """Routes for the listeners with announce = true; imported only when one has it."""
        if self.stopping or not any(lc.announce for lc in self.config.listeners.values()):
            return
        from fastlb.fleet.announce import Announcer

        self.announce = Announcer(self)
        self.announce.start()
        self.announce.tick()

    async def _stop_fleet_services(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        if self.admin is not None:
            await self.admin.stop()

    def _on_discovered(self, pool: str, backends: list) -> None:
        self.backends.apply_discovered(pool, backends)
        if self.checker is not None:
            self.checker.set_targets(self.backends.check_targets())
        self.poke()

    def poke(self) -> None:
        """Backend state changed outside tick(): let the tick loop re-evaluate what it has to do."""
        if self._tick_wake is not None:
            self._tick_wake.set()

    def _on_check_transition(self, target: CheckTarget, up: bool, reason: str) -> None:
        self.backends.on_check_transition(target, up, reason)
        self.poke()

    def _kill_stragglers(self) -> None:
        for pid in list(self.pids):
            log.warning("worker pid %d still running after shutdown_timeout; killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reload(self) -> dict:
        """SIGHUP / `fastlb reload`: re-read the config, apply what can be applied, name the rest
        (fastlb.runtime.reload); a bad file changes nothing and says why.  During a takeover it is
        left to the successor (runtime/handover.py)."""
        return self.handover.reload(lambda: reload_config(self, sd_notify))

    def service_sockets(self) -> list[dict]:
        """The HTTP services' listening sockets for a handover (runtime/takeover.py): /metrics and
        the admin API, as table entries with worker -1."""
        admin = self.admin.service_sockets() if self.admin is not None else []
        return self.ops.service_sockets() + admin

    @property
    def successor_pid(self) -> int:
        return self.handover.successor_pid

    def upgrade(self, reason: str = "upgrade") -> str | None:
        """SIGUSR2, `fastlb upgrade` or a reload that needs new sockets: restart in place without
        refusing a connection (runtime/handover.py).  Returns None, or why it did not start one."""
        return self.handover.upgrade(reason)

    def begin_shutdown(self, sig: signal.Signals | None, successor: int | None = None) -> None:
        """Stop accepting (close the listening sockets: new connections are refused, unless a
        successor holds them too), tell the workers to drain, exit when they are gone.
        successor: the pid of the fastlb that took over; systemd is told it is the main process."""
        if self.stopping:
            self.handover.forward(sig)  # the foreground: a stop meant for whichever instance serves
            return
        if self.announce is not None and self.announce.delay_stop(self.begin_shutdown, sig, successor):
            return  # routes withdrawn first: called again after announce_withdraw_delay
        self.stopping = True
        self.deploy.stop(handed_over=successor is not None)  # rollouts hold; a successor owns the state file
        asyncio.get_running_loop().call_later(self.shutdown_timeout + 5.0, self._kill_stragglers)
        if not self.pids and self._all_exited is not None:
            self._all_exited.set()
        name = sig.name if sig is not None else "startup failure"
        if successor is not None:
            name = f"taken over by pid {successor}"
        log.info("%s: stop accepting, letting connections finish (up to %.1fs)", name, self.shutdown_timeout)
        if successor is None:
            sd_notify("STOPPING=1")
        else:  # the successor serves /metrics and the admin API on the sockets it was handed
            self.handover.release_services()
        self.listeners.close()
        self.region.set_stopping()
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # --- control socket ------------------------------------------------------------------------

    async def _start_control_socket(self) -> None:
        """Listen on the control socket (runtime/control_socket.py); StartupError if it cannot be made."""
        self.control = ControlServer(self.config.global_.control_socket, self._control_request)
        try:
            # a live takeover takes the path over only once its workers run (_publish_control_socket)
            await self.control.start(publish=self.predecessor.kind != "live")
        except ControlSocketError as exc:
            self.control = None
            raise StartupError(str(exc)) from None

    def _publish_control_socket(self) -> None:
        if self.control is None:
            return
        try:
            self.control.publish()
        except ControlSocketError as exc:
            raise StartupError(str(exc)) from None

    def persist_warning(self) -> str | None:
        """For the reply of a runtime change (fastlb.control.server): None, or that the change
        will not survive a restart because the state file cannot be written."""
        return self.state.warning()

    def _control_request(self, line: bytes, writer: asyncio.StreamWriter) -> dict | None:
        """One request line from the control socket: its reply (written by the ControlServer)."""
        req = handover.takeover_request(line)
        if req is None:
            reply = handle_request(self, line)
            self.poke()
            return reply
        reply = self.handover.answer(req, writer)
        if reply is None:
            return None  # the handover reply went out with its descriptors
        if req.get("cmd") == "shutdown" and reply.get("successor"):
            # before the reply: the successor's READY=1 must find it the main pid already
            sd_notify(f"MAINPID={reply['successor']}")
        if req.get("cmd") == "shutdown":
            # after this reply is written (the next loop turn): stop accepting and drain
            asyncio.get_running_loop().call_soon(self.begin_shutdown, None, reply.get("successor"))
        return reply

    # --- status --------------------------------------------------------------------------------

    def status(self) -> dict:
        r = self.region
        checks = {(c["pool"], c["backend"]): c for c in self.checker.snapshot()} if self.checker else {}
        pools = []
        for ps in self.pools.values():
            backends = []
            for slot in list(ps.slots.values()):
                b = r.backend(slot.index)
                backends.append(
                    {
                        "name": slot.name,
                        "address": slot.address,
                        "state": _state_name(b),
                        "admin": ADMIN_NAMES[b["admin"]],
                        "health": HEALTH_NAMES[b["health"]],
                        "weight": b["weight"],
                        "effective_weight": b["eff_weight"],
                        "active": b["active"],
                        "total": b["total"],
                        "bytes_in": b["bytes_in"],
                        "bytes_out": b["bytes_out"],
                        "connect_errors": b["connect_errors"],
                        "connect_timeouts": b["connect_timeouts"],
                        "resets": b["resets"],
                        "early_closes": b["early_closes"],
                        "consecutive_failures": b["consecutive_failures"],
                        "connect_time_us": b["connect_time_ewma_us"],
                        "draining": slot.admin == "drain",
                        "removed": slot.removed,
                        "weight_source": self.backends.value_source(slot, "weight"),
                        "admin_source": self.backends.value_source(slot, "admin"),
                        "ejected_until": self.backends.ejected_until(slot),
                        **backend_extras(b, slot, checks.get((ps.config.name, slot.name))),
                        **_check_counts(checks.get((ps.config.name, slot.name))),
                    }
                )
            p = r.pool(ps.index)
            pools.append(
                {
                    "name": ps.config.name,
                    "algorithm": ps.config.algorithm,
                    "no_backend": p["no_backend"],
                    "panic": bool(p["panic"]),
                    "all_down": ps.all_down,
                    "all_down_policy": ps.config.all_down,
                    "rise": ps.config.health_check.rise if ps.config.health_check else 0,
                    "slow_start": ps.config.slow_start,
                    **keepalive_settings(p, "backend_keepalive"),
                    "active_priority": self.backends.active_priority(ps),
                    "backends": backends,
                    **(
                        {"discovery": self.discovery.pools[ps.config.name].status()}
                        if self.discovery is not None and ps.config.name in self.discovery.pools
                        else {}
                    ),
                }
            )
        listeners = []
        for i, lc in enumerate(self.config.listeners.values()):
            li = r.listener(i)
            listeners.append(
                {
                    "name": lc.name,
                    "bind": str(lc.bind),
                    "pool": lc.pool,
                    "active": li["active"],
                    "accepted": li["accepted"],
                    **refused(li),
                    "paused_full": li["paused_full"],
                    "accept_errors": li["accept_errors"],
                    **listener_settings(li),
                    "no_route": li["no_route"],
                    "routes": self.deploy.mark_routes(lc.name, self.routes.routes_status(lc.name)),
                    **udp_listener_status(lc, li),
                    "preludes": prelude_status(lc, li),
                }
            )
        workers = [
            dict(
                worker_status(r.worker(i), i),
                restarts=self.restart_count.get(i, 0),
                stalls=self.watchdog.stalls_of.get(i, 0),
            )
            for i in range(self.n_workers)
        ]
        extra = {}
        if self.access_log is not None:
            dropped = self.access_log.dropped()
            for w, d in zip(workers, dropped, strict=True):
                w["log_dropped"] = d
            extra["access_log"] = {
                "destination": self.access_log.destination,
                "format": self.access_log.format,
                "written": self.access_log.written,
                "dropped": sum(dropped),
            }
        ctl = self.control
        return {
            "control_socket": {
                "clients": ctl.clients if ctl else 0,
                "evicted": ctl.evicted if ctl else 0,
                "timed_out": ctl.timed_out if ctl else 0,
            },
            "health_check_local_errors": self.checker.local_errors if self.checker else 0,
            **extra,
            "pid": os.getpid(),
            "generation": r.generation,
            "deploy": self.deploy.status_view(),
            "config_file": self.config.file,
            "state_file": self.state.status(),
            "listeners": listeners,
            "pools": pools,
            "workers": workers,
            **self.ops.status(),
            "announce": self.announce.status() if self.announce is not None else [],
        }

    def connect_histogram(self, pool: str, backend: str) -> list[int] | None:
        """The backend's connect-time histogram buckets (shm_layout.h hist_connect), for metrics."""
        ps = self.pools.get(pool)
        slot = ps.slots.get(backend) if ps else None
        return None if slot is None else self.region.backend(slot.index)["hist_connect"]


def _state_name(b: dict) -> str:
    if b["admin"] != 0:
        return ADMIN_NAMES[b["admin"]]
    if b["health"] != 0:
        return HEALTH_NAMES[b["health"]]
    return "up"


def _check_counts(check: dict | None) -> dict:
    """Health checks run and passing in a row (fastlb wait --healthy needs fresh rise checks)."""
    return {"checks": check["checks"], "checks_ok": check["consecutive_ok"]} if check else {}


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def serve(config: Config, workers: int | None = None, takeover_: bool = False) -> int:
    """Run `fastlb serve` until stopped; returns the process exit code.  takeover_: replace a
    running instance with the same control socket (`fastlb serve --takeover`)."""
    try:
        predecessor = takeover.prepare(config, takeover_)
    except takeover.TakeoverError as exc:
        print(f"fastlb: {exc}", file=sys.stderr, flush=True)
        return 1
    handover.set_title()  # `fastlb serve`, not `python3`, in ps and top (a successor too)
    try:
        sup = Supervisor(config, workers, predecessor)
    except StartupError as exc:
        log.error("%s", exc)
        predecessor.abandon(str(exc))
        return 1
    try:
        code = asyncio.run(sup.run())
    except StartupError as exc:
        log.error("%s", exc)
        predecessor.abandon(str(exc))
        for pid in list(sup.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runfile.remove_if_mine(sup.runfile_path)
        return 1
    if sup.handover.keep and sup.handover.handed_to:  # the foreground: stay, for the successor
        handover.become_keeper(sup.handover.handed_to, sup.runfile_path)
    return code
