"""Runtime state that survives SIGHUP and restart (`[global] state_file`, fastlb.runtime.statefile):
the rule (a runtime value wins unless the config file's value for that key changed since it was last
loaded), atomic writes, corrupt and foreign files; end to end against a real `fastlb serve`."""

from __future__ import annotations

import json
import logging
import signal
from collections import Counter

from fastlb.runtime.statefile import StateFile
from support.backends import server
from support.clients import cli, count_backends
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
