"""Reload (SIGHUP, `fastlb reload`, `systemctl reload`): re-read the config file and apply every
change; name whatever is not applied.

Applied in place: listener timeouts, max_connections, backlog (listen(2) again on the existing
sockets) and pool; routes and splits; pool settings and backends (fastlb.runtime.backends);
[global] log_level, metrics, control_socket, worker_stall_timeout and shutdown_timeout (for workers
started from now on).  What the running process cannot apply - listeners added, removed or
re-bound, pools added or removed, [global] workers, prelude settings, backends beyond a pool's
spare slots, hash tables that outgrow their buffers, keys read at start - is applied by a takeover
([global] reload_takeover, on by default): the reload starts `fastlb serve --takeover` on the same
file, which receives the listening sockets (accept queues included), opens the new ones and closes
the removed ones, and this instance stops accepting and drains its connections (up to its
shutdown_timeout).  A new address that something else holds refuses the whole reload before
anything changes.  With reload_takeover = false those changes stay as they run, and the log line
and the reply name each one.

systemd sees RELOADING=1 (with MONOTONIC_USEC) before and READY=1 after every reload, with a
STATUS= line that says how it went; `fastlb reload` (the unit's ExecReload) exits non-zero when the
file was refused, so `systemctl reload` reports the failure.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastlb.config import Config, ConfigError, GlobalConfig, ListenerConfig, load_config
from fastlb.config.protect import keepalive_record

log = logging.getLogger("fastlb")

RESTART_HINT = "restart (fastlb serve --takeover keeps the sockets)"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def reload_config(sup: Any, notify: Callable[[str], None]) -> dict[str, Any]:
    """Re-read sup.config.file and apply it; the reply of the control socket's `reload`."""
    path = sup.config.file
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
    try:
        new = load_config(path)
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        result = {"ok": False, "file": path, "error": f"reload refused, nothing changed: {exc}"}
        sup.ops.record_reload(result)
        notify(f"READY=1\nSTATUS=reload failed: {exc}")
        return result
    takeover = new.global_.reload_takeover
    busy = _busy_addresses(sup, new) if takeover else None
    if busy is not None:
        log.error("reload failed, keeping the running configuration: %s: %s", path, busy)
        result = {"ok": False, "file": path, "error": f"reload refused, nothing changed: {path}: {busy}"}
        sup.ops.record_reload(result)
        notify(f"READY=1\nSTATUS=reload failed: {busy}")
        return result
    ignored: list[str] = []
    splits_before = _splits(sup)
    g_applied, g_restart, running_global = _global(sup, new, ignored)
    deploy = getattr(sup, "deploy", None)  # runtime values: fastlb.runtime.statefile's rule
    if deploy is not None:
        deploy.before_reload()
    b_applied, b_restart = sup.backends.reload(new)
    discovery = getattr(sup, "discovery", None)
    if discovery is not None:  # DNS discovery: the file's discover settings replace the running ones
        discovery.update(
            {n: p.discover for n, p in new.pools.items() if getattr(p, "discover", None) is not None}
        )
    l_applied, l_restart, listeners = _listeners(sup, new)
    applied, needs_restart = g_applied + l_applied + b_applied, g_restart + l_restart + b_restart
    needs_restart += _routes(sup, new, not l_restart)
    if deploy is not None:
        ignored += deploy.after_reload(new)  # runtime splits kept; running rollouts keep theirs
    applied += _split_changes(sup, splits_before)  # what the splits are now against before
    sup.config = Config(
        file=path,
        global_=running_global,
        listeners=listeners,
        pools={name: ps.config for name, ps in sup.pools.items()},
    )
    sup.ops.config = sup.config
    for i, lc in enumerate(listeners.values()):
        pool = sup.pools.get(getattr(lc, "pool", None) or "")
        sup.region.set_listener_runtime(
            i,
            pool.index if pool is not None else sup.region.listener(i)["pool"],
            _ms(lc.connect_timeout),
            _ms(lc.idle_timeout),
            lc.max_connections,
            lc.backlog,
            round(getattr(lc, "half_close_timeout", 0.0) * 1000),
        )
        sup.region.set_listener_keepalive(
            i,
            *keepalive_record(getattr(lc, "client_keepalive", None), getattr(lc, "tcp_user_timeout", 0.0)),
        )
    sup.region.publish()
    if sup.checker is not None:
        sup.checker.set_targets(sup.backends.check_targets())
    sup.poke()
    for line in applied:
        log.info("reload: %s", line)
    result: dict[str, Any] = {"ok": True, "file": path, "applied": applied, "needs_restart": needs_restart}
    if ignored:
        result["ignored"] = ignored
        for line in ignored:
            log.warning("reload: ignored: %s", line)
    if needs_restart and takeover:
        result.update(_takeover(sup, needs_restart))
    if "successor" in result:
        log.info(
            "reloaded %s: %d changes applied, %d by the takeover", path, len(applied), len(needs_restart)
        )
    else:
        if needs_restart:
            log.warning("reload: NOT applied, these need a %s: %s", RESTART_HINT, "; ".join(needs_restart))
        log.info("reloaded %s: %d changes applied, %d need a restart", path, len(applied), len(needs_restart))
    sup.ops.record_reload(result)
    if "successor" in result:
        state = f"pid {result['successor']} takes over to apply {len(result['takeover'])} changes"
    elif needs_restart:
        state = f"{len(needs_restart)} changes need a restart"
    else:
        state = "all changes applied"
    notify(f"READY=1\nSTATUS=reloaded {path}: {state}")
    return result


def _takeover(sup: Any, changes: list[str]) -> dict[str, Any]:
    """Start `fastlb serve --takeover` to apply what this process cannot ([global] reload_takeover):
    the new instance reads the same file, receives the listening sockets (their queues too), opens
    the new ones, and this one stops accepting and drains.  The reply part that says so."""
    why = sup.upgrade("reload")
    if why is not None:
        return {"takeover_error": f"no takeover started: {why}"}
    log.warning(
        "reload: pid %d takes over (fastlb serve --takeover) to apply: %s",
        sup.successor_pid,
        "; ".join(changes),
    )
    control_socket = sup.config.global_.control_socket
    return {
        "takeover": list(changes),
        "needs_restart": [],
        "pid": os.getpid(),
        "successor": sup.successor_pid,
        "control_socket": control_socket,
    }


def _busy_addresses(sup: Any, new: Config) -> str | None:
    """The first address a takeover would have to bind that something else holds, as a one-line
    reason; None when every new address is free (or nothing new is bound)."""
    from fastlb.runtime.listeners import BindError, bind_key, check_free

    running = {bind_key(lc) for lc in sup.config.listeners.values()}
    for lc in new.listeners.values():
        if bind_key(lc) in running:
            continue
        try:
            check_free(lc)
        except BindError as exc:
            return f"listeners.{lc.name}.bind: {exc}"
    return None


def _global(sup: Any, new: Config, ignored: list[str]) -> tuple[list[str], list[str], GlobalConfig]:
    old, g = sup.config.global_, new.global_
    applied: list[str] = []
    restart: list[str] = []
    running = g
    override = getattr(sup, "workers_override", None)
    if g.workers != old.workers and override is not None:
        ignored.append(
            f"global.workers: {old.workers} -> {g.workers} (`fastlb serve --workers {override}` overrides the file)"
        )
        running = replace(running, workers=old.workers)
    elif g.workers != old.workers:
        restart.append(
            f"global.workers: {old.workers} -> {g.workers} (the shared region is sized for the running workers)"
        )
        running = replace(running, workers=old.workers)
    if g.log_level != old.log_level:
        logging.getLogger().setLevel(getattr(logging, g.log_level.upper()))
        applied.append(f"global.log_level: {old.log_level} -> {g.log_level}")
    if g.shutdown_timeout != old.shutdown_timeout:
        sup.shutdown_timeout = g.shutdown_timeout
        applied.append(
            f"global.shutdown_timeout: {old.shutdown_timeout:g}s -> {g.shutdown_timeout:g}s "
            f"(workers started from now on; the running ones keep {old.shutdown_timeout:g}s)"
        )
    if g.control_socket != old.control_socket:
        try:
            move_control_socket(sup, g.control_socket)
            applied.append(f"global.control_socket: {old.control_socket} -> {g.control_socket}")
        except OSError as exc:
            restart.append(
                f"global.control_socket: cannot listen on {g.control_socket}: {exc.strerror or exc}"
            )
            running = replace(running, control_socket=old.control_socket)
    if g.metrics != old.metrics:
        try:
            sup.ops.move_metrics(sup, g.metrics)
            applied.append(f"global.metrics: {old.metrics or 'off'} -> {g.metrics or 'off'}")
        except OSError as exc:
            restart.append(f"global.metrics: cannot listen on {g.metrics}: {exc.strerror or exc}")
            running = replace(running, metrics=old.metrics)
    watchdog = getattr(sup, "watchdog", None)
    if watchdog is not None and g.worker_stall_timeout != old.worker_stall_timeout:
        watchdog.timeout_ms = int(g.worker_stall_timeout * 1000)
        applied.append(
            f"global.worker_stall_timeout: {old.worker_stall_timeout:g}s -> {g.worker_stall_timeout:g}s"
        )
    for key in _fields(g):
        if key not in _GLOBAL_HANDLED and getattr(g, key) != getattr(old, key):
            restart += _global_changes(key, getattr(old, key), getattr(g, key), " (read at start)")
            running = replace(running, **{key: getattr(old, key)})
    return applied, restart, running


# [global] keys this module applies or names itself; any other key that changes is named as read
# at start (a feature added later is never ignored silently)
_GLOBAL_HANDLED = (
    "workers",
    "log_level",
    "shutdown_timeout",
    "control_socket",
    "metrics",
    "worker_stall_timeout",
    "reload_takeover",  # read by reload_config itself, from the new file
)
_LISTENER_APPLIED = (
    "pool",
    "connect_timeout",
    "idle_timeout",
    "half_close_timeout",
    "max_connections",
    "backlog",
    "client_keepalive",  # issue 21: connections accepted from then on
    "tcp_user_timeout",
)
# listener keys handled elsewhere: bind (above), routes and preludes (runtime/routes.py via _routes)
_LISTENER_ELSEWHERE = (
    "name",
    "bind",
    "routes",
    "proxy_protocol",
    "proxy_protocol_from",
    "sni_timeout",
    "sni_no_match",
    "sni_policy",  # the ListenerConfig field of the sni_no_match key
)


def _fields(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def _listeners(sup: Any, new: Config) -> tuple[list[str], list[str], dict[str, ListenerConfig]]:
    """Listeners keep their sockets: the running set stays; each one's settings come from `new`."""
    old = sup.config.listeners
    applied: list[str] = []
    restart = [f"listeners.{n}: new listener (needs new sockets)" for n in new.listeners if n not in old]
    restart += [
        f"listeners.{n}: removed from the config, still accepting" for n in old if n not in new.listeners
    ]
    running: dict[str, ListenerConfig] = {}
    for name, lc in old.items():
        nc = new.listeners.get(name)
        if nc is None:
            running[name] = lc
            continue
        if nc.bind != lc.bind:
            restart.append(f"listeners.{name}.bind: {lc.bind} -> {nc.bind} (needs new sockets)")
            nc = replace(nc, bind=lc.bind)
        if nc.pool != lc.pool and nc.pool not in sup.pools:
            restart.append(f"listeners.{name}.pool: {lc.pool} -> {nc.pool} (pool {nc.pool} is not running)")
            nc = replace(nc, pool=lc.pool)
        for key in _LISTENER_APPLIED:
            if not hasattr(lc, key):
                continue
            a, b = getattr(lc, key), getattr(nc, key)
            if a != b:
                shown = (f"{a:g}s", f"{b:g}s") if key.endswith("timeout") else (a, b)
                applied.append(f"listeners.{name}.{key}: {shown[0]} -> {shown[1]}")
        for key in _fields(lc):
            if (
                key not in _LISTENER_APPLIED
                and key not in _LISTENER_ELSEWHERE
                and getattr(lc, key) != getattr(nc, key)
            ):
                restart += _changes(
                    f"listeners.{name}.{key}", getattr(lc, key), getattr(nc, key), " (read at start)"
                )
                nc = replace(nc, **{key: getattr(lc, key)})
        running[name] = nc
    return applied, restart, running


def _routes(sup: Any, new: Config, same_listeners: bool) -> list[str]:
    """Routes and splits (issue 10, fastlb.runtime.routes, once present as sup.routes): the file's
    routes replace the published ones; prelude settings (PROXY protocol, SNI) need a restart."""
    routes = getattr(sup, "routes", None)
    if routes is None:
        return []
    restart = [
        f"listeners.{name}: proxy_protocol / sni settings changed"
        for name, lc in sup.config.listeners.items()
        if name in new.listeners and routes.prelude_changed(lc, new.listeners[name])
    ]
    if same_listeners and not restart:
        restart += routes.reload(new)
    return restart


def _splits(sup: Any) -> dict[tuple[str, str], dict[str, int]]:
    """Every route's split now, by (listener, route)."""
    routes = getattr(sup, "routes", None)
    if routes is None:
        return {}
    return {(r["listener"], r["name"]): dict(r["split"]) for r in routes.routes_status()}


def _split_changes(sup: Any, before: dict[tuple[str, str], dict[str, int]]) -> list[str]:
    """The splits the reload changed, once the file's splits, the runtime splits the state file
    keeps and the running rollouts' splits are all applied: only a split that differs from the one
    before the reload is a change (a runtime split the reload put back is none)."""
    out = []
    for key, now in _splits(sup).items():
        old = before.get(key)
        if old is not None and {p: w for p, w in old.items() if w} != {p: w for p, w in now.items() if w}:
            out.append(f"listeners.{key[0]}.routes.{key[1]}.split: {_split(old)} -> {_split(now)}")
    return out


def _split(weights: dict[str, int]) -> str:
    return " ".join(f"{pool}={w}" for pool, w in weights.items())


def _changes(key: str, old: Any, new: Any, note: str = "") -> list[str]:
    """`key: old -> new` lines in the config file's terms: a table (admin, discover, ...) changed
    in part is one line per key that changed; values are shown as written in the file."""
    if _is_table(old) and type(old) is type(new):
        return [
            line
            for f in dataclasses.fields(old)
            if getattr(old, f.name) != getattr(new, f.name)
            for line in _changes(f"{key}.{f.name}", getattr(old, f.name), getattr(new, f.name), note)
        ]
    return [f"{key}: {config_value(old)} -> {config_value(new)}{note}"]


# the [global] keys of the admin API, by AdminConfig field (config/fleet.py parse_admin)
_ADMIN_KEYS = {
    "bind": "admin",
    "token_file": "admin_token_file",
    "tls_cert": "admin_tls_cert",
    "tls_key": "admin_tls_key",
}


def _global_changes(key: str, old: Any, new: Any, note: str) -> list[str]:
    """_changes() of a [global] key; the admin API's settings under their own keys (admin,
    admin_token_file, ...), as in the file."""
    if key != "admin":
        return _changes(f"global.{key}", old, new, note)
    out = []
    for field, name in _ADMIN_KEYS.items():
        a, b = getattr(old, field, None), getattr(new, field, None)
        if a != b:
            out.append(f"global.{name}: {config_value(a)} -> {config_value(b)}{note}")
    return out


def _is_table(v: Any) -> bool:
    """A config dataclass that stands for a table of keys (an Address, which prints as the file
    writes it, is a value)."""
    return dataclasses.is_dataclass(v) and not isinstance(v, type) and type(v).__str__ is object.__str__


def config_value(v: Any) -> str:
    """A config value as the file spells it: off for an absent table or address, true/false,
    durations and numbers without trailing zeros, lists comma-separated, tables inline."""
    if v is None:
        return "off"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list | frozenset | set):
        return "[" + ", ".join(config_value(x) for x in v) + "]"
    if _is_table(v):
        items = [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]
        return "{" + ", ".join(f"{k} = {config_value(x)}" for k, x in items if x is not None) + "}"
    return str(v)


def _answers(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _move_runfile(sup: Any, control_socket: str) -> None:
    """The runtime file (pids for a later takeover) lives next to the control socket: follow it."""
    if not hasattr(sup, "runfile_path"):
        return
    from fastlb.runtime import runfile

    runfile.remove_if_mine(sup.runfile_path)
    sup.runfile_path = runfile.path_for(control_socket)
    sup.write_runfile()


def move_control_socket(sup: Any, path: str) -> None:
    """Listen on `path` (a new ControlServer, runtime/control_socket.py) at once, serve it from the
    next loop turn, then close the old socket and move the runtime file beside the new one.  Raises
    OSError when `path` is taken or cannot be made.  Bound before this returns: a successor started
    by the same reload finds this instance at the new path."""
    from fastlb.runtime.control_socket import ControlServer, ControlSocketError

    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    if _answers(path):
        raise OSError(errno.EADDRINUSE, "another process answers on it")
    new = ControlServer(path, sup._control_request)
    try:
        new.bind()
    except ControlSocketError as exc:
        raise OSError(errno.EIO, str(exc)) from None
    old, sup.control = sup.control, new

    async def serve() -> None:
        try:
            await new.start()
        except ControlSocketError as exc:
            log.error("reload: the control socket at %s does not serve: %s", path, exc)
            return
        if old is not None:
            old.close()
        _move_runfile(sup, path)

    sup.ops.spawn(serve())
