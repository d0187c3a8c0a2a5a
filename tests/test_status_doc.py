"""docs/status.md lists every field and state name a running fastlb's status document has."""

from __future__ import annotations

import re
from pathlib import Path

from fastlb.control import ControlClient
from fastlb.shm import WORKER_STATE_NAMES
from support.backends import server
from support.clients import cli
from support.helpers import wait_until

DOC = Path(__file__).resolve().parents[1] / "docs" / "status.md"


NAME_KEYED = {"split", "pools"}  # dicts keyed by pool names (user data), not by field names


def keys(obj, out: set[str]) -> set[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.add(k)
            if k not in NAME_KEYED or isinstance(v, list):
                keys(v, out)
    elif isinstance(obj, list):
        for v in obj:
            keys(v, out)
    return out


def test_every_status_field_and_state_is_documented(backends, fastlb):
    b = backends(server("a", "id"), server("b", "id"))
    lb = fastlb(
        [("a", b.address("a"), 1), ("b", b.address("b"), 1)],
        workers=2,
        pool={"health_check": {"type": "tcp", "interval": "200ms"}},
    )
    client = ControlClient(str(lb.dir / "control.sock"))
    assert cli("reload", "--socket", client.path).returncode == 0
    st = wait_until(
        lambda: (s := client.status())["pools"][0]["backends"][0]["check"]["result"] == "ok" and s,
        10,
        "a finished health check",
    )
    text = DOC.read_text()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = keys(st, set()) - documented
    assert not missing, f"status fields not in docs/status.md: {sorted(missing)}"
    for w in st["workers"]:
        assert w["state"] == "running" and isinstance(w["heartbeat_age_ms"], int)
    states = {"up", "down", "ejected", "drain", "maint", "ready", "pending", "ok", "failed"}
    assert states | set(WORKER_STATE_NAMES.values()) <= documented
    check = st["pools"][0]["backends"][0]["check"]
    assert check["type"] == "tcp" and check["reason"] == "ok" and check["checks"] >= 1 and check["time"] > 0
