"""The runtime state file (`[global] state_file`): what the operator changed at runtime - backend
weights, admin states (drain/maint), route splits, rollouts - kept across SIGHUP and restart.

HAProxy's `server-state-file` is the anchor, with one rule added for the question it leaves open
(which value wins when the config file changed too).  Every value changed at runtime is recorded
with the config file's value for that key at the time it was last loaded (the "baseline"):

* on SIGHUP and on start, a runtime value wins over the config file's value, UNLESS the file's value
  for that key changed since it was last loaded (file value != baseline): then the file wins and the
  runtime entry is dropped.  Either way the log says which values were overridden.
* a runtime value that equals the file's value is dropped (nothing to remember).

The file is JSON, written atomically (temporary file in the same directory, fsync, rename, fsync of
the directory) on every change.  A damaged file never stops a start (docs/failure-behaviour.md):

* a file that cannot be read, is not a regular file, is larger than MAX_BYTES, is not JSON, is
  nested deeper than MAX_DEPTH, is not fastlb's format (or version, or config file), or is not
  trusted (not owned by this process's uid, or writable by group or others) is renamed aside
  (`PATH.bad-YYYYmmddTHHMMSS`) with one warning, and the start goes on from the config file;
* every restored value is checked with the config file's own rules (weights 0..1000 integers,
  admin states, splits, rollout records, deploy records): a bad entry is skipped with one warning
  naming its key and the file (`parse()` below: pure, fuzzed by tests/test_statefile.py).

A file another live instance (another control socket) last wrote is refused (StateFileInUse): two
instances never share one.  A file that cannot be written is a visible fault (`status()`: status,
metrics); it is logged at most once a minute while it lasts and written again every RETRY seconds.

Layout:
  {"format": "fastlb-state", "version": 1, "config": "/abs/path/of/fastlb.toml",
   "written": <unix time>, "pid": <control pid>, "start_time": <its /proc start time>,
   "control_socket": "/run/fastlb/control.sock",
   "values": {"weight:POOL/BACKEND": {"value": 0, "file": 3}, "admin:POOL/BACKEND": {...},
              "split:LISTENER/ROUTE": {"value": {"v1": 90, "v2": 10}, "file": {"v1": 100}}},
   "rollouts": {NAME: {...rollout state, see fastlb.deploy.rollout...}},
   "deploy": {"switches": {...}, "retired": {POOL: [BACKEND, ...]}}}  (fastlb.deploy.engine)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
import time
from typing import Any

from fastlb.config.model import MAX_SPLIT, MAX_WEIGHT, ConfigError
from fastlb.config.values import _check_name, _Table
from fastlb.deploy.rollout import Rollout
from fastlb.runtime import runfile

log = logging.getLogger("fastlb")

FORMAT = "fastlb-state"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64  # JSON nesting: fastlb writes at most about 6
LOG_EVERY = 60.0  # seconds between two "cannot write it" lines while the fault lasts
RETRY = 60.0  # seconds between two attempts to write a file that could not be written
ADMIN_VALUES = ("ready", "drain", "maint")
_KEY_RE = re.compile(r"(weight|admin|split):([^/]*)/(.*)", re.DOTALL)


class StateFileInUse(Exception):
    """Another live fastlb instance owns the state file; str() is the one-line reason."""


def trusted(st: os.stat_result, uid: int | None = None) -> str | None:
    """Why a state file with this stat may not be trusted, or None: it must be a regular file owned
    by this process's uid (`uid`), writable by nobody else (not by its group, not by others)."""
    uid = os.geteuid() if uid is None else uid
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not by this fastlb's uid {uid}"
    if st.st_mode & 0o022:
        who = {0o020: "its group", 0o002: "others", 0o022: "its group and others"}[st.st_mode & 0o022]
        return f"writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


class StateFile:
    """In-memory runtime values plus their baselines, mirrored to one file."""

    def __init__(self, path: str, config_file: str, control_socket: str = "") -> None:
        self.path = path
        self.config_file = os.path.abspath(config_file)
        self.control_socket = control_socket
        self.values: dict[str, dict[str, Any]] = {}
        self.rollouts: dict[str, dict[str, Any]] = {}
        self.rejected_rollouts: dict[str, tuple[dict[str, Any], str]] = {}  # (record, why): rolled back
        self.deploy: dict[str, Any] = {}  # fastlb.deploy.engine's own records (switches, retired pools)
        self.commands_trusted = False  # may a restored rollout run its `check` command (engine)
        self.write_error: str | None = None  # why the last write failed ("Read-only file system")
        self.failing_since: float | None = None  # unix time of the first failed write in a row
        self._logged_at = -math.inf  # monotonic time of the last "cannot write it" line
        self._tried_at = -math.inf  # monotonic time of the last failed write
        self.frozen = False  # another instance took over (fastlb serve --takeover): it writes now

    # --- reading -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Read the file; returns True if it was used.  Missing: nothing to restore.  Damaged,
        foreign or untrusted: renamed aside with a warning.  Raises StateFileInUse only."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            return self._aside(f"cannot read it ({exc.strerror or exc})")
        try:
            st = os.fstat(fd)
            why = trusted(st)
            if why is not None:
                return self._aside(f"not trusted: {why}")
            data = b""
            while len(data) <= MAX_BYTES:
                chunk = os.read(fd, MAX_BYTES + 1 - len(data))
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            return self._aside(f"cannot read it ({exc.strerror or exc})")
        finally:
            os.close(fd)
        # trusted() held for the descriptor the document came from: its rollouts' commands may run
        self.commands_trusted = self.use(data)
        return self.commands_trusted

    def use(self, data: bytes) -> bool:
        """Take the runtime values from `data` (the file's bytes, read from a trusted file): True if
        it was used; a damaged or foreign document is set aside (False).  Raises StateFileInUse
        only (tests/test_statefile.py fuzzes it)."""
        doc, problem = decode(data)
        if problem is None:
            problem = _check(doc, self.config_file)
        if problem is not None:
            return self._aside(problem)
        self._refuse_if_owned(doc)
        self.values, self.rollouts, self.rejected_rollouts, self.deploy, warnings = parse(doc)
        for key, why in warnings:
            log.warning("state file %s: %s skipped: %s", self.path, key, why)
        log.info(
            "state file %s: %d runtime values, %d rollouts (written by pid %s)",
            self.path,
            len(self.values),
            len(self.rollouts),
            doc.get("pid", "?"),
        )
        return True

    def _aside(self, problem: str) -> bool:
        """One warning; the file renamed to PATH.bad-TIMESTAMP (if it can be); False."""
        bad = f"{self.path}.bad-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.rename(self.path, bad)
            where = f"renamed to {bad}"
        except OSError as exc:
            where = f"left in place (cannot rename it: {exc.strerror or exc})"
        log.warning("state file %s ignored: %s; %s; using the config file only", self.path, problem, where)
        return False

    def _refuse_if_owned(self, doc: dict[str, Any]) -> None:
        """StateFileInUse if another live instance (another control socket) wrote the file."""
        sock, pid, started = doc.get("control_socket"), doc.get("pid"), doc.get("start_time")
        if not isinstance(sock, str) or sock == self.control_socket:
            return  # this instance (a restart, a takeover), or a file of an older fastlb
        if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(started, int):
            return
        if pid != os.getpid() and runfile.alive(pid, started):
            raise StateFileInUse(
                f"state file {self.path} belongs to the fastlb running as pid {pid} with control socket "
                f"{sock}: give this instance its own [global] state_file"
            )

    # --- the rule --------------------------------------------------------------------------------

    def resolve(self, key: str, file_value: Any, what: str) -> tuple[Any, str]:
        """The value to run with for `key` given the config file's value now: (value, "runtime" |
        "file").  `what` names the key in the log ("pool web backend a weight")."""
        entry = self.values.get(key)
        if entry is None:
            return file_value, "file"
        runtime = entry["value"]
        if entry.get("file") != file_value:
            del self.values[key]
            if runtime != file_value:
                log.warning(
                    "state: %s: the config file changed it (%s -> %s) since it was last loaded: the file's "
                    "value %s overrides the runtime value %s",
                    what,
                    _show(entry.get("file")),
                    _show(file_value),
                    _show(file_value),
                    _show(runtime),
                )
            return file_value, "file"
        if runtime == file_value:
            del self.values[key]
            return file_value, "file"
        log.info(
            "state: %s: runtime value %s kept; it overrides the config file's value %s",
            what,
            _show(runtime),
            _show(file_value),
        )
        return runtime, "runtime"

    def source(self, key: str) -> str:
        return "runtime" if key in self.values else "file"

    def set(self, key: str, value: Any, file_value: Any) -> None:
        """A runtime change of `key` (file_value: the config file's value as last loaded); saved."""
        if value == file_value:
            self.values.pop(key, None)
        else:
            self.values[key] = {"value": value, "file": file_value}
        self.save()

    def prune(self, keep: set[str]) -> None:
        """Forget runtime values of keys that no longer exist (a backend or route removed)."""
        gone = [k for k in self.values if k not in keep]
        for k in gone:
            log.info(
                "state: %s: no longer in the config; runtime value %s dropped",
                k,
                _show(self.values[k]["value"]),
            )
            del self.values[k]

    def set_rollout(self, name: str, state: dict[str, Any] | None) -> None:
        if state is None:
            self.rollouts.pop(name, None)
        else:
            self.rollouts[name] = state
        self.save()

    # --- writing -------------------------------------------------------------------------------

    def save(self) -> bool:
        """Write the whole state atomically; False if it could not be written (write_error says
        why; logged at most once a minute while it lasts)."""
        if self.frozen:
            return False
        me = os.getpid()
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config_file,
            "written": time.time(),
            "pid": me,
            "start_time": runfile.start_time(me) or 0,
            "control_socket": self.control_socket,
            "values": self.values,
            "rollouts": self.rollouts,
            "deploy": self.deploy,
        }
        tmp = f"{self.path}.tmp.{me}"
        try:
            directory = os.path.dirname(self.path) or "."
            os.makedirs(directory, mode=0o750, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                data = json.dumps(doc, indent=1).encode() + b"\n"
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._failed(exc.strerror or str(exc))
            return False
        if self.write_error is not None:
            log.info("state file %s: written again", self.path)
        self.write_error = None
        self.failing_since = None
        self._logged_at = -math.inf
        return True

    def _failed(self, error: str) -> None:
        now = time.monotonic()
        if self.write_error is None:
            self.failing_since = time.time()
        self.write_error = error
        self._tried_at = now
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            log.error(
                "state file %s: cannot write it (%s); runtime changes will not survive a restart",
                self.path,
                error,
            )

    def retry(self) -> None:
        """Called periodically (the supervisor's tick loop): a file that could not be written is
        tried again every RETRY seconds, so that the fault clears by itself once it is fixed."""
        if self.write_error is not None and time.monotonic() - self._tried_at >= RETRY:
            self.save()

    def warning(self) -> str | None:
        """For the reply of a runtime change: None, or that it will not survive a restart."""
        if self.write_error is None or self.frozen:
            return None
        return f"applied, but not kept across a restart: {self.path}: {self.write_error}"

    def status(self) -> dict[str, Any]:
        """`state_file` of the status document (docs/status.md)."""
        return {
            "path": self.path,
            "writable": self.write_error is None,
            "error": self.write_error,
            "failing_since": self.failing_since,
        }


def decode(data: bytes) -> tuple[Any, str | None]:
    """The JSON document in `data`, or (None, why not): too large, not JSON, nested too deeply."""
    if len(data) > MAX_BYTES:
        return None, f"larger than {MAX_BYTES // (1024 * 1024)} MiB"
    try:
        doc = json.loads(data)
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:  # also bad UTF-8
        return None, f"not valid JSON ({str(exc)[:80]})"
    if _depth(doc) > MAX_DEPTH:
        return None, f"nested deeper than {MAX_DEPTH} levels"
    return doc, None


def _depth(doc: Any) -> int:
    """How deeply `doc` nests (iteratively: never a RecursionError)."""
    deepest = 0
    todo = [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            if d > MAX_DEPTH:
                return d
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


Parsed = tuple[
    dict[str, dict[str, Any]],
    dict[str, dict[str, Any]],
    dict[str, tuple[dict[str, Any], str]],
    dict[str, Any],
    list[tuple[str, str]],
]


def parse(doc: Any, file: str = "state file") -> Parsed:
    """The usable entries of a state document (after _check): (values, rollouts, rejected
    rollouts, deploy, [(key, why skipped)]).  Pure; never raises (tests/test_statefile.py fuzzes
    it).  Values are checked with the config file's rules (fastlb.config.values)."""
    warnings: list[tuple[str, str]] = []
    values: dict[str, dict[str, Any]] = {}
    rollouts: dict[str, dict[str, Any]] = {}
    rejected: dict[str, tuple[dict[str, Any], str]] = {}
    deploy: dict[str, Any] = {"switches": {}, "retired": {}}
    if not isinstance(doc, dict):
        return values, rollouts, rejected, deploy, [("(document)", "not an object")]
    raw_values = doc.get("values")
    for key, entry in raw_values.items() if isinstance(raw_values, dict) else ():
        try:
            values[key] = _value(key, entry, file)
        except (ConfigError, ValueError) as exc:
            warnings.append((_key(f"values.{key}"), str(exc)))
    raw_rollouts = doc.get("rollouts", {})
    for name, rec in raw_rollouts.items() if isinstance(raw_rollouts, dict) else ():
        why = _rollout(name, rec)
        if why is None:
            rollouts[name] = rec
        else:
            warnings.append((_key(f"rollouts.{name}"), why))
            if isinstance(rec, dict):
                rejected[name] = (rec, why)
    raw_deploy = doc.get("deploy", {})
    if not isinstance(raw_deploy, dict):
        warnings.append(("deploy", "not an object"))
        raw_deploy = {}
    for key, rec in _items(raw_deploy.get("switches")):
        why = _switch(key, rec)
        if why is None:
            deploy["switches"][key] = rec
        else:
            warnings.append((_key(f"deploy.switches.{key}"), why))
    for pool, names in _items(raw_deploy.get("retired")):
        if _name_ok(pool) and isinstance(names, list) and all(_name_ok(n) for n in names):
            deploy["retired"][pool] = list(names)
        else:
            warnings.append((_key(f"deploy.retired.{pool}"), "expected a list of backend names"))
    return values, rollouts, rejected, deploy, warnings


def _items(v: Any) -> list[tuple[str, Any]]:
    return list(v.items()) if isinstance(v, dict) else []


def _key(text: str) -> str:
    """A key for a log line: printable, at most 100 characters."""
    text = text.encode("ascii", "backslashreplace").decode()
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 100 else text[:100] + "..."


def _name_ok(name: Any) -> bool:
    try:
        _check_name(name, "name", "state file", "a")
    except ConfigError:
        return False
    return True


def _weight(v: Any, key: str, file: str) -> int:
    """A weight as the config file accepts it: an integer 0..1000 (fastlb.config.values._Table)."""
    return _Table({"weight": v}, key, file).get_int("weight", 0, 0, MAX_WEIGHT)


def _split(v: Any, key: str, file: str) -> dict[str, int]:
    """A split as the config accepts it: 1..MAX_SPLIT pools (names) with weights 0..1000."""
    if not isinstance(v, dict) or not v or len(v) > MAX_SPLIT:
        raise ValueError(f"a split is an object of 1..{MAX_SPLIT} pool -> weight")
    for pool, w in v.items():
        _check_name(pool, key, file, "pool")
        _weight(w, f"{key}.{pool}", file)
    return dict(v)


def _value(key: str, entry: Any, file: str) -> dict[str, Any]:
    """One `values` entry, checked: {"value": V, "file": F} (raises ConfigError / ValueError)."""
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        raise ValueError(
            'unknown key (expected "weight:POOL/BACKEND", "admin:..." or "split:LISTENER/ROUTE")'
        )
    kind, a, b = m.groups()
    _check_name(a, key, file, "pool" if kind != "split" else "listener")
    _check_name(b, key, file, "backend" if kind != "split" else "route")
    if not isinstance(entry, dict) or "value" not in entry or "file" not in entry:
        raise ValueError('expected {"value": ..., "file": ...}')
    value, base = entry["value"], entry["file"]
    if kind == "weight":
        return {"value": _weight(value, key, file), "file": _weight(base, key, file)}
    if kind == "admin":
        if value not in ADMIN_VALUES or base != "ready":
            raise ValueError(f"an admin state is one of {', '.join(ADMIN_VALUES)} (the file's: ready)")
        return {"value": value, "file": base}
    return {"value": _split(value, key, file), "file": _split(base, key, file)}


def _finite(*xs: Any) -> bool:
    return all(
        not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and abs(x) < 1e12
        for x in xs
    )


def _rollout(name: Any, rec: Any) -> str | None:
    """Why a rollout record cannot be restored, or None (fastlb.deploy.rollout.Rollout.from_dict
    and the config's rules for names, steps and numbers)."""
    if not _name_ok(name):
        return "not a rollout name"
    if not isinstance(rec, dict):
        return "not an object"
    spec = rec.get("spec")
    if not isinstance(spec, dict):
        return "its spec is not an object"
    if not all(_name_ok(spec.get(k)) for k in ("name", "listener", "route", "to", "from")):
        return "its spec needs the names name, listener, route, to and from"
    for k in ("steps", "pause_at"):
        items = spec.get(k, [])
        if not isinstance(items, list) or len(items) > 100 or not all(type(x) is int for x in items):
            return f"spec.{k} is not a list of percentages"
    base = rec.get("base")
    if not isinstance(base, dict) or len(base) > MAX_SPLIT:
        return "base is not a split"
    try:
        _split(base, "base", "state file") if base else None
        if not _finite(spec.get("interval"), spec.get("threshold"), rec.get("step"), rec.get("failures")):
            return "interval, threshold, step or failures is not a number"
        if not _finite(rec.get("started_at"), rec.get("updated_at"), rec.get("next_at", 0.0)):
            return "a time is not a number"
        gates = spec.get("gates", {})
        if not isinstance(gates, dict) or not isinstance(gates.get("check") or "", str):
            return "spec.gates is not an object"
        if not all(_finite(v) or v is None for k, v in gates.items() if k != "check"):
            return "a gate is not a number"
        if not isinstance(rec.get("history", []), list):
            return "history is not a list"
        Rollout.from_dict(rec)
    except Exception as exc:  # noqa: BLE001  (any record the rollout code cannot take is skipped)
        return str(exc.args[0])[:100] if exc.args else type(exc).__name__
    return None


def _switch(key: Any, rec: Any) -> str | None:
    """Why a blue-green switch record cannot be used, or None (fastlb.deploy.engine.switch)."""
    if not isinstance(rec, dict):
        return "not an object"
    if not (_name_ok(rec.get("listener")) and _name_ok(rec.get("route"))):
        return "listener and route must be names"
    if key != f"{rec['listener']}/{rec['route']}":
        return "its key is not LISTENER/ROUTE"
    for k in ("live", "old"):
        if not isinstance(rec.get(k), list) or not all(_name_ok(p) for p in rec[k]):
            return f"{k} is not a list of pool names"
    try:
        _split(rec.get("previous"), "previous", "state file")
    except (ConfigError, ValueError):
        return "previous is not a split"
    if not isinstance(rec.get("drain_old"), bool) or not _finite(rec.get("at")):
        return "drain_old or at is not valid"
    return None


def _check(doc: Any, config_file: str) -> str | None:
    """Why `doc` is not a state file this instance may use, or None."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return 'not a fastlb state file (no "format": "fastlb-state")'
    if doc.get("version") != VERSION:
        return f"version {doc.get('version')!r}, this fastlb reads version {VERSION}"
    if doc.get("config") != config_file:
        return f"written for another config file ({doc.get('config')!r}, this one is {config_file!r})"
    if not isinstance(doc.get("values"), dict) or not isinstance(doc.get("rollouts", {}), dict):
        return '"values" / "rollouts" are not objects'
    return None


def _show(v: Any) -> str:
    if isinstance(v, dict):
        return "/".join(f"{k}={w}" for k, w in v.items()) or "{}"
    return str(v)
