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
the directory) on every change.  A file that is not JSON, not fastlb's format, or written for another
config file is reported and ignored (the config file is used as is); it is never fatal.  A file that
cannot be written is logged (once until a write succeeds again); runtime control keeps working.

Layout:
  {"format": "fastlb-state", "version": 1, "config": "/abs/path/of/fastlb.toml",
   "written": <unix time>, "pid": <control pid>,
   "values": {"weight:POOL/BACKEND": {"value": 0, "file": 3}, "admin:POOL/BACKEND": {...},
              "split:LISTENER/ROUTE": {"value": {"v1": 90, "v2": 10}, "file": {"v1": 100}}},
   "rollouts": {NAME: {...rollout state, see fastlb.deploy.rollout...}},
   "deploy": {"switches": {...}, "retired": {POOL: [BACKEND, ...]}}}  (fastlb.deploy.engine)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("fastlb")

FORMAT = "fastlb-state"
VERSION = 1
MAX_BYTES = 16 * 1024 * 1024


class StateFile:
    """In-memory runtime values plus their baselines, mirrored to one file."""

    def __init__(self, path: str, config_file: str) -> None:
        self.path = path
        self.config_file = os.path.abspath(config_file)
        self.values: dict[str, dict[str, Any]] = {}
        self.rollouts: dict[str, dict[str, Any]] = {}
        self.deploy: dict[str, Any] = {}  # fastlb.deploy.engine's own records (switches, retired pools)
        self._write_failed = False
        self.frozen = False  # another instance took over (fastlb serve --takeover): it writes now

    # --- reading -------------------------------------------------------------------------------

    def load(self) -> bool:
        """Read the file; returns True if it was used.  Missing: nothing to restore.  Corrupt or
        foreign: a warning, and it is ignored (overwritten at the next runtime change)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning(
                "state file %s: cannot read it (%s); using the config file only", self.path, exc.strerror
            )
            return False
        problem = None
        doc: Any = None
        if len(data) > MAX_BYTES:
            problem = f"larger than {MAX_BYTES // (1024 * 1024)} MiB"
        else:
            try:
                doc = json.loads(data)
            except ValueError as exc:
                problem = f"not valid JSON ({exc})"
        if problem is None:
            problem = _check(doc, self.config_file)
        if problem is not None:
            log.warning("state file %s ignored: %s; using the config file only", self.path, problem)
            return False
        self.values = {k: v for k, v in doc["values"].items() if isinstance(v, dict) and "value" in v}
        self.rollouts = {k: v for k, v in doc.get("rollouts", {}).items() if isinstance(v, dict)}
        deploy = doc.get("deploy", {})
        self.deploy = deploy if isinstance(deploy, dict) else {}
        log.info(
            "state file %s: %d runtime values, %d rollouts (written by pid %s)",
            self.path,
            len(self.values),
            len(self.rollouts),
            doc.get("pid", "?"),
        )
        return True

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
        """Write the whole state atomically; False (logged) if it could not be written."""
        if self.frozen:
            return False
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config_file,
            "written": time.time(),
            "pid": os.getpid(),
            "values": self.values,
            "rollouts": self.rollouts,
            "deploy": self.deploy,
        }
        tmp = f"{self.path}.tmp.{os.getpid()}"
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
            if not self._write_failed:
                log.error(
                    "state file %s: cannot write it (%s); runtime changes will not survive a restart",
                    self.path,
                    exc.strerror or exc,
                )
            self._write_failed = True
            return False
        if self._write_failed:
            log.info("state file %s: written again", self.path)
        self._write_failed = False
        return True


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
