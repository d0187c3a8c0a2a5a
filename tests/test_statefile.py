"""Runtime state that survives SIGHUP and restart (`[global] state_file`, fastlb.runtime.statefile):
the rule (a runtime value wins unless the config file's value for that key changed since it was last
loaded), atomic writes, corrupt and foreign files; end to end against a real `fastlb serve`."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastlb.runtime import statefile
from fastlb.runtime.statefile import StateFile, StateFileInUse
from support.backends import server
from support.clients import cli, count_backends
from support.fuzz import fuzz_settings, mutate, state_document
from support.helpers import wait_until
from support.protocols import backends_status, control, log_mark, wait_log

WEIGHTS = {"a": 3, "b": 1}


# --- the rule, without processes -----------------------------------------------------------------


def test_rule_runtime_wins_unless_the_file_changed(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "fastlb")
    st = StateFile(str(tmp_path / "s.json"), str(tmp_path / "fastlb.toml"))
    st.set("weight:web/a", 0, 3)
    # the file still says 3: the runtime 0 wins, and the log says so
    assert st.resolve("weight:web/a", 3, "pool web backend a weight") == (0, "runtime")
    assert "runtime value 0 kept; it overrides the config file's value 3" in caplog.text
    # a new process reads the same file: same answer
    st2 = StateFile(str(tmp_path / "s.json"), str(tmp_path / "fastlb.toml"))
    assert st2.load()
    assert st2.resolve("weight:web/a", 3, "w") == (0, "runtime")
    # the file changed 3 -> 7 since it was last loaded: the file wins, logged, runtime value forgotten
    assert st2.resolve("weight:web/a", 7, "pool web backend a weight") == (7, "file")
    assert "changed it (3 -> 7)" in caplog.text and "overrides the runtime value 0" in caplog.text
    assert "weight:web/a" not in st2.values
    # setting the file's value at runtime leaves nothing to remember
    st2.set("weight:web/a", 7, 7)
    assert st2.values == {}


def test_atomic_write_leaves_no_temporary_file(tmp_path) -> None:
    path = tmp_path / "sub" / "state.json"
    st = StateFile(str(path), "/etc/fastlb.toml")
    st.set("admin:web/a", "drain", "ready")
    st.set_rollout("r1", {"step": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    doc = json.loads(path.read_text())
    assert doc["format"] == "fastlb-state" and doc["config"] == "/etc/fastlb.toml"
    assert doc["values"] == {"admin:web/a": {"value": "drain", "file": "ready"}}
    assert doc["rollouts"] == {"r1": {"step": 1}}


def test_corrupt_and_foreign_files_are_ignored(tmp_path, caplog) -> None:
    path = tmp_path / "state.json"
    for text, why in (
        ("{not json", "not valid JSON"),
        ('{"hello": 1}', "not a fastlb state file"),
        ('{"format": "fastlb-state", "version": 1, "config": "/other.toml", "values": {}}', "another config"),
        ('{"format": "fastlb-state", "version": 9, "config": "/x.toml", "values": {}}', "version 9"),
    ):
        path.write_text(text)
        st = StateFile(str(path), "/x.toml")
        caplog.clear()
        assert not st.load()
        assert why in caplog.text and "ignored" in caplog.text
        assert st.values == {}


# --- damaged state files never stop a start (issue 24 item 4) -------------------------------------


def write_doc(path, doc) -> None:
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)


def bad_entry_doc(config: str) -> dict:
    doc = state_document(config)
    doc["values"] = {
        "weight:web/a": {"value": "abc", "file": 3},
        "weight:web/b": {"value": -7, "file": 1},
        "weight:web/c": {"value": 1e308, "file": 1},
        "weight:web/d": {"value": None, "file": 1},
        "weight:web/e": {"value": 5000, "file": 1},
        "weight:web/f": {"value": 7, "file": 1},  # the one good entry
        "admin:web/a": {"value": "bogus", "file": "ready"},
        "split:web/default": {"value": {"v1": "x"}, "file": {"v1": 100}},
        "weight:bad name/a": {"value": 1, "file": 1},
    }
    doc["rollouts"] = {"r": dict(doc["rollouts"]["r"], spec=5)}
    doc["deploy"] = {"switches": {"web/default": 5}, "retired": {"v1": "a"}}
    return doc


def test_every_bad_entry_is_skipped_with_one_warning_naming_key_and_file(tmp_path, caplog) -> None:
    path = tmp_path / "state.json"
    config = str(tmp_path / "fastlb.toml")
    write_doc(path, bad_entry_doc(config))
    st = StateFile(str(path), config)
    assert st.load()
    assert st.values == {"weight:web/f": {"value": 7, "file": 1}}
    assert st.rollouts == {} and list(st.rejected_rollouts) == ["r"]
    assert st.deploy == {"switches": {}, "retired": {}}
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    keys = [
        "values.weight:web/a",
        "values.weight:web/b",
        "values.weight:web/c",
        "values.weight:web/d",
        "values.weight:web/e",
        "values.admin:web/a",
        "values.split:web/default",
        "values.weight:bad name/a",
        "rollouts.r",
        "deploy.switches.web/default",
        "deploy.retired.v1",
    ]
    assert len(skipped) == len(keys)
    for key, line in zip(keys, skipped, strict=True):
        assert line.startswith(f"state file {path}: {key} skipped: "), line
    assert "out of range 0..1000" in skipped[4] and "expected an integer" in skipped[0]


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


DAMAGED = {
    "not-json": lambda p: p.write_bytes(b'{"format": "fastlb-state", "values": {'),
    "too-deep": lambda p: p.write_bytes(deep(200_000)),
    "deep-inside": lambda p: p.write_bytes(
        b'{"format": "fastlb-state", "version": 1, "values": {}, "x": ' + deep(900) + b"}"
    ),
    "too-large": lambda p: p.write_bytes(b" " * (statefile.MAX_BYTES + 1)),
    "not-utf8": lambda p: p.write_bytes(b'{"\xff\xfe": 1}'.replace(b"\\", b"\\")),
    "foreign": lambda p: p.write_text('{"hello": 1}'),
    "a-directory": lambda p: p.mkdir(),
    "a-fifo": lambda p: os.mkfifo(p),
}
UNTRUSTED = {"world-writable": (0o666, None), "group-writable": (0o620, None), "other-owner": (0o600, 65534)}


@pytest.mark.parametrize("kind", [*DAMAGED, *UNTRUSTED])
def test_damaged_or_untrusted_file_is_renamed_aside(tmp_path, caplog, kind) -> None:
    path = tmp_path / "state.json"
    config = str(tmp_path / "fastlb.toml")
    if kind in DAMAGED:
        DAMAGED[kind](path)
        if path.is_file():
            os.chmod(path, 0o600)
    else:
        mode, owner = UNTRUSTED[kind]
        write_doc(path, state_document(config))
        os.chmod(path, mode)
        if owner is not None:
            if os.geteuid() != 0:
                pytest.skip("needs root to chown")
            os.chown(path, owner, owner)
    st = StateFile(str(path), config)
    assert st.load() is False
    assert st.values == {} and st.rollouts == {}
    assert not os.path.lexists(path)
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith("state.json.bad-")]
    assert len(aside) == 1, aside
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and f"renamed to {tmp_path / aside[0]}" in lines[0].getMessage()
    assert "using the config file only" in lines[0].getMessage()
    if kind in UNTRUSTED:
        assert "not trusted" in lines[0].getMessage()


def test_a_file_another_live_instance_owns_is_refused_a_successor_is_not(tmp_path) -> None:
    path = tmp_path / "state.json"
    config = str(tmp_path / "fastlb.toml")
    mine = StateFile(str(path), config, "/run/a.sock")
    assert mine.save()
    assert json.loads(path.read_text())["control_socket"] == "/run/a.sock"
    # the same control socket (a restart, a takeover successor): used
    assert StateFile(str(path), config, "/run/a.sock").load()
    # another instance while the writer (this process) is alive: refused, one line
    doc = json.loads(path.read_text())
    doc["pid"] = os.getppid()  # a live process other than us, with its own start time
    doc["start_time"] = statefile.runfile.start_time(os.getppid())
    write_doc(path, doc)
    with pytest.raises(
        StateFileInUse, match=r"belongs to the fastlb running as pid \d+ with control socket /run/a.sock"
    ):
        StateFile(str(path), config, "/run/b.sock").load()
    # the writer is gone (same pid, another start time): the file is free
    doc["start_time"] += 1
    write_doc(path, doc)
    assert StateFile(str(path), config, "/run/b.sock").load()


DOCS_PER_EXAMPLE = 50


def fuzz_one(tmp_path, seed: int, n: int = DOCS_PER_EXAMPLE) -> int:
    """n mutated state documents through StateFile.use (decode, header check, entry checks): it
    returns True or False and never raises; a kept value is one the config would accept."""
    rng = random.Random(seed)
    config = str(tmp_path / "fastlb.toml")
    base = state_document(config)
    for _ in range(n):
        doc = mutate(base, rng, rng.randint(1, 6))
        try:
            data = json.dumps(doc).encode()
        except (RecursionError, ValueError):
            data = deep(rng.randint(1, 100_000))
        if rng.random() < 0.1:
            data = data[: rng.randint(0, len(data))]
        st = StateFile(str(tmp_path / "none" / "state.json"), config, "/run/fastlb/control.sock")
        logging.disable(logging.WARNING)
        try:
            st.use(data)
        except StateFileInUse:
            pass
        finally:
            logging.disable(logging.NOTSET)
        for key, entry in st.values.items():
            if key.startswith("weight:"):
                assert type(entry["value"]) is int and 0 <= entry["value"] <= 1000, (key, entry)
        json.dumps({"v": st.values, "r": st.rollouts, "d": st.deploy})  # it can be written back
    return n


@fuzz_settings(200)
@given(seed=st.integers(0, 2**32))
def test_fuzz_state_documents_never_raise(tmp_path_factory, seed) -> None:
    fuzz_one(tmp_path_factory.getbasetemp(), seed)


@pytest.mark.slow
def test_fuzz_state_documents_long(tmp_path) -> None:
    """>= 100,000 documents (2,000 seeds x 50) in one run."""
    assert sum(fuzz_one(tmp_path, seed) for seed in range(2_000)) >= 100_000


# --- end to end ------------------------------------------------------------------------------------


def start(backends, fastlb):
    b = backends(*(server(n, "id") for n in WEIGHTS))
    lb = fastlb([(n, b.address(n), w) for n, w in WEIGHTS.items()], workers=1)
    return b, lb, str(lb.dir / "control.sock")


def spread(lb, n: int = 40) -> Counter:
    return count_backends(lb.addr, n, concurrency=8, timeout=30)


def weights(lb) -> dict[str, tuple[int, str]]:
    return {n: (x["weight"], x["weight_source"]) for n, x in backends_status(lb).items()}


def test_sighup_keeps_runtime_weight_then_file_change_wins(backends, fastlb):
    b, lb, path = start(backends, fastlb)
    r = cli("set-weight", "--socket", path, "web", "a", "0")
    assert r.returncode == 0, r.stderr
    state = json.loads((lb.dir / "state.json").read_text())
    assert state["values"]["weight:web/a"] == {"value": 0, "file": 3}
    # an unrelated reload (config file unchanged): a stays at 0
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    wait_log(lb, "reloaded", 10, since=mark)
    assert weights(lb) == {"a": (0, "runtime"), "b": (1, "file")}
    assert "a" not in spread(lb)
    assert cli("status", "--socket", path).stdout.splitlines()[1].split()[3] == "0*"
    # the operator edits a's weight in the config file: 3 -> 2; SIGHUP: the file wins, logged
    lb.config_path.write_text(lb.config_text.replace("weight = 3", "weight = 2"))
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    line = wait_log(lb, r"pool web backend a weight: the config file changed it \(3 -> 2\)", 10, since=mark)
    assert "overrides the runtime value 0" in line
    wait_log(lb, "reloaded", 10, since=mark)
    assert weights(lb) == {"a": (2, "file"), "b": (1, "file")}
    assert spread(lb)["a"] > 0
    assert json.loads((lb.dir / "state.json").read_text())["values"] == {}


def test_restart_restores_runtime_weights_and_drains(backends, fastlb):
    b, lb, path = start(backends, fastlb)
    assert cli("set-weight", "--socket", path, "web", "b", "7").returncode == 0
    assert cli("drain", "--socket", path, "web", "a").returncode == 0
    lb.restart()
    wait_log(lb, r"pool web backend b weight: runtime value 7 kept", 5)
    wait_log(lb, r"pool web backend a admin state: runtime value drain kept", 5)
    st = backends_status(lb)
    assert (st["a"]["admin"], st["a"]["admin_source"]) == ("drain", "runtime")
    assert (st["b"]["weight"], st["b"]["weight_source"]) == (7, "runtime")
    assert spread(lb) == Counter({"b": 40})
    # enable: back to the file's value, nothing left to remember for a
    assert cli("enable", "--socket", path, "web", "a").returncode == 0
    assert backends_status(lb)["a"]["admin_source"] == "file"
    assert list(json.loads((lb.dir / "state.json").read_text())["values"]) == ["weight:web/b"]


def test_corrupt_state_file_warns_and_uses_the_config(backends, fastlb):
    b, lb, path = start(backends, fastlb)
    assert cli("set-weight", "--socket", path, "web", "a", "0").returncode == 0
    (lb.dir / "state.json").write_text('{"format": "fastlb-state", "values": {"weight:web/a": ')
    lb.restart()
    wait_log(lb, r"WARNING state file .*state\.json ignored: not valid JSON", 5)
    assert weights(lb) == {"a": (3, "file"), "b": (1, "file")}
    wait_until(lambda: spread(lb)["a"] > 0, 10, "a serving again")
    # the next runtime change overwrites the bad file with a good one
    control(lb).set_weight("web", "b", 2)
    assert json.loads((lb.dir / "state.json").read_text())["values"] == {
        "weight:web/b": {"value": 2, "file": 1}
    }
