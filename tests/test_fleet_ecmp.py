"""A fleet behind ECMP in network namespaces (fastlb.fleet.lab): three fastlb instances with the same
config agree on every client's backend, losing one moves only its flows (to the same backends),
differing health views disagree only on the affected keys, and `fastlb fleet` reaches them all."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import Counter

import pytest

from fastlb.fleet.lab import Lab, agreement, lb_address

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (network namespaces)"
)


@pytest.fixture(scope="module")
def lab():
    lab = Lab(prefix=f"ft{os.getpid() % 10000}")
    try:
        lab.build().start()
        yield lab
    finally:
        lab.close()


def test_every_instance_sends_a_client_to_the_same_backend(lab):
    recs = lab.probe("vip", lab.sources(), 4)  # 250 addresses x 4 ports = 1,000 flows
    assert len(recs) == 1000 and not [r for r in recs if "error" in r]
    per_lb = Counter(r["lb"] for r in recs)
    assert set(per_lb) == {1, 2, 3} and min(per_lb.values()) > 200, per_lb  # the router spreads them
    spread = [r["src"] for r in recs]
    multi = {s for s in set(spread) if len({r["lb"] for r in recs if r["src"] == s}) > 1}
    assert len(multi) > 150  # most addresses were carried by more than one instance ...
    ok, n = agreement(recs)
    assert (ok, n) == (250, 250)  # ... and every address reached exactly one backend


def test_losing_an_instance_moves_only_its_flows_to_the_same_backends(lab):
    before = lab.probe("vip", lab.sources(), 2)
    backend_of = {r["src"]: r["backend"] for r in before}
    failures: list[dict] = []
    stop = threading.Event()

    def load() -> None:  # new connections keep working while the instance leaves (bounded)
        for _ in range(20):
            if stop.is_set():
                return
            failures.extend(r for r in lab.probe("vip", lab.sources()[:40], 1) if "error" in r)

    t = threading.Thread(target=load)
    t.start()
    try:
        lab.set_nexthops([1, 2])  # instance 3 leaves the ECMP group
        after = lab.probe("vip", lab.sources(), 2)
    finally:
        stop.set()
        t.join(60)
        lab.set_nexthops([1, 2, 3])
    assert not failures, failures[:5]
    assert {r["lb"] for r in after} == {1, 2}
    moved = [r for r in after if r["src"] in backend_of]
    same = sum(1 for r in moved if r["backend"] == backend_of[r["src"]])
    assert (
        same == len(moved) == 500
    )  # flows of instance 3 land on the backends they had; the rest keep theirs


def test_differing_health_views_disagree_only_on_the_affected_keys(lab):
    r = lab.fastlb("--admin", f"http://{lb_address(1)}:9091", "disable", "web", "c")
    assert r.returncode == 0, r.stderr
    try:
        view = {
            k: {x["src"]: x["backend"] for x in lab.probe(lb_address(k), lab.sources(), 1)} for k in (1, 2)
        }
    finally:
        lab.fastlb("--admin", f"http://{lb_address(1)}:9091", "enable", "web", "c")
    on_c = [s for s, b in view[2].items() if b == "c"]
    others = [s for s, b in view[2].items() if b != "c"]
    assert on_c and all(view[1][s] != "c" for s in on_c)  # instance 1 moved c's keys elsewhere
    kept = sum(1 for s in others if view[1][s] == view[2][s])
    # Maglev moves a removed backend's keys and only a few others: measured here, kept >= 95 %
    assert kept >= 0.95 * len(others), f"{kept} of {len(others)} other keys agree"
    print(f"health views differ on c: {len(on_c)} keys of c moved, {kept}/{len(others)} other keys agree")


def test_fleet_command_changes_every_instance(lab):
    hosts = str(lab.hosts_file())
    r = lab.fastlb("fleet", "-f", hosts, "set-weight", "web", "a", "0", check=False)
    assert r.returncode == 0 and "3 of 3 instances ok" in r.stdout, r.stdout + r.stderr
    for k in (1, 2, 3):
        st = json.loads(lab.fastlb("--admin", f"http://{lb_address(k)}:9091", "status", "--json").stdout)
        a = next(b for b in st["pools"][0]["backends"] if b["name"] == "a")
        assert a["weight"] == 0
    recs = lab.probe("vip", lab.sources(), 2)
    assert not [x for x in recs if x.get("backend") == "a"]  # no instance sends anyone to a
    assert agreement(recs) == (250, 250)  # and they still agree: same change, same tables
    lab.fastlb("fleet", "-f", hosts, "set-weight", "web", "a", "1")
