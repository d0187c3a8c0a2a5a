"""Canary rollouts and blue-green switches end to end (issue 11): a real `fastlb serve` whose
listener "web" routes "default" between pool "web" (v1, backend v1a) and pool "v2" (backend v2a),
real backend processes that greet with their name, load running during the changes.

What is checked: a good canary is promoted through 10 -> 50 -> 100 with v1 drained and no client
connection failing; a bad canary (refusing, or resetting a share before the first byte) is rolled
back in time, by the gate that says so, and no new connection reaches it afterwards; an idle canary
holds; a failing --check rolls back; pause/resume/promote/abort; SIGHUP and restart mid-rollout;
blue-green switch and back under load with the old side drained.
"""

from __future__ import annotations

import signal
import time

from fastlb.control import ControlClient
from support.backends import server
from support.clients import Load, cli
from support.helpers import free_port, recv_line, wait_closed, wait_until
from support.protocols import log_mark, wait_log

SPLIT = [{"name": '"default"', "backends": '[{ pool = "web", weight = 100 }, { pool = "v2", weight = 0 }]'}]
FAST = ["--steps", "10,50,100", "--interval", "1s", "--min-connections", "5"]


def routes_toml(v2_address: str, drain_timeout: str = "30s") -> str:
    out = [
        f'[pools.v2]\ndrain_timeout = "{drain_timeout}"\nbackends = [{{ name = "v2a", address = "{v2_address}" }}]\n'
    ]
    for r in SPLIT:
        out.append("[[listeners.web.routes]]\n" + "\n".join(f"{k} = {v}" for k, v in r.items()) + "\n")
    return "\n".join(out)


def start(
    backends,
    fastlb,
    v2: dict | None = None,
    v2_address: str | None = None,
    drain_timeout: str = "30s",
    extra: str = "",
):
    """v1a (pool web) and v2a (pool v2, `v2` overrides its server spec; v2_address overrides its
    address, e.g. a port nothing listens on); returns (backends, lb, client, socket path)."""
    b = backends(server("v1a", "id"), v2 or server("v2a", "id"))
    lb = fastlb(
        [("v1a", b.address("v1a"), None)],
        workers=2,
        listener={"pool": None},
        pool={"drain_timeout": drain_timeout},
        extra=routes_toml(v2_address or b.address("v2a"), drain_timeout) + extra,
    )
    sock = str(lb.dir / "control.sock")
    return b, lb, ControlClient(sock), sock


def rollout(sock: str, *args: str):
    r = cli("rollout", *args, "--socket", sock)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def view(client: ControlClient, name: str = "web-default") -> dict:
    return client.rollout_status(name)[0]


def wait_status(client: ControlClient, status: str, timeout: float = 30.0, name: str = "web-default") -> dict:
    return wait_until(
        lambda: (v := view(client, name))["status"] == status and v,
        timeout,
        lambda: (
            f"rollout {status}; now {view(client, name)['status']} at {view(client, name)['share']}%: "
            f"{view(client, name)['history'][-3:]}"
        ),
    )


def route(client: ControlClient) -> dict:
    li = next(x for x in client.status()["listeners"] if x["name"] == "web")
    return next(r for r in li["routes"] if r["name"] == "default")


def backend(client: ControlClient, pool: str, name: str) -> dict:
    p = next(p for p in client.status()["pools"] if p["name"] == pool)
    return next(b for b in p["backends"] if b["name"] == name)


def test_good_canary_is_promoted_and_v1_drained_without_a_failed_connection(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb)
    load = Load(lb.addr, concurrency=8).start()
    try:
        load.wait_count(100)
        out = rollout(sock, "start", "web", "default", "--to", "v2", "--from", "web", *FAST)
        assert out.startswith("rollout web-default: started: v2 at 10% (split web=90 v2=10)")
        v = wait_status(client, "promoted")
        time.sleep(0.3)
        load.wait_count(len(load.done) + 200)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    shares = [h["share"] for h in v["history"] if h.get("event") in ("start", "step")]
    assert shares == [10, 50, 100], v["history"]
    assert [h["result"] for h in v["history"] if "result" in h] == ["pass", "pass"]
    assert route(client)["split"] == {"web": 0, "v2": 100}
    v1 = backend(client, "web", "v1a")
    assert v1["admin"] == "drain"
    wait_until(lambda: backend(client, "web", "v1a")["active"] == 0, 10, "v1 drained")
    names = {n for _, n in load.done[-100:]}
    assert names == {"v2a"}, names
    text = cli("rollout", "status", "--socket", sock).stdout
    assert "web/default web -> v2: PROMOTED" in text and "promoted: v2 takes 100%, web drained" in text


def _bad_canary(backends, fastlb, gate: str, **kw):
    b, lb, client, sock = start(backends, fastlb, **kw)
    load = Load(lb.addr, concurrency=8).start()
    try:
        load.wait_count(100)
        t0 = time.monotonic()
        rollout(sock, "start", "web", "default", "--to", "v2", *FAST, "--threshold", "2")
        v = wait_status(client, "failed", timeout=30)
        took = time.monotonic() - t0
        after = route(client)["pools"]["v2"]
        n = len(load.done)
        load.wait_count(n + 500)
        again = route(client)["pools"]["v2"]
        n_fail = len(load.failures)
        time.sleep(0.5)
    finally:
        load.stop()
    # threshold x interval + one interval, with room for a busy machine
    assert took < 2 * 1.0 + 1.0 + 3.0, (took, v["history"])
    assert route(client)["split"] == {"web": 100, "v2": 0}
    assert again == after, "new connections reached v2 after the rollback"
    assert len(load.failures) == n_fail, "connections failed after the rollback"
    assert "failed judgement 2/2 at 10%" in v["reason"], v["reason"]
    fails = [h["reason"] for h in v["history"] if h.get("result") == "fail"]
    assert len(fails) == 2 and gate in fails[0], fails
    return v


def test_bad_canary_that_refuses_is_rolled_back_by_the_failure_rate_gate(backends, fastlb):
    v = _bad_canary(
        backends, fastlb, "failure_rate: canary 100.0% > max 1.0%", v2_address=f"127.0.0.1:{free_port()}"
    )
    # a refusing backend is soon ejected (outlier detection): then the health gate fails too, and
    # it needs no traffic (an ejected canary gets none)
    assert "failure_rate: canary 100.0%" in v["reason"] or "unhealthy: 100.0% of canary" in v["reason"]


def test_bad_canary_that_resets_before_the_first_byte_is_rolled_back_by_the_early_reset_gate(
    backends, fastlb
):
    v = _bad_canary(
        backends, fastlb, "early_reset_rate: canary", v2=server("v2a", "flaky", reset_share=0.5, seed=3)
    )
    assert "early_reset_rate: canary" in v["reason"] or "unhealthy: 100.0%" in v["reason"], v["reason"]
    first = next(h["reason"] for h in v["history"] if h.get("result") == "fail")
    assert "> max 1.0% (stable 0.0%)" in first, first


STEPS_20 = ["--steps", "20,50,100", "--interval", "1s"]


def test_canary_that_resets_after_its_greeting_is_rolled_back_by_the_reset_gate(backends, fastlb):
    """Issue 24, item 6: v2 greets, then resets every connection 50 ms later.  With the issue's
    `--steps 20,50,100 --interval 1s` (default gates) it is rolled back by reset_rate, never promoted;
    the backend's late_resets show in status."""
    b, lb, client, sock = start(backends, fastlb, v2=server("v2a", "greet_reset"))
    load = Load(lb.addr, concurrency=8).start()
    try:
        load.wait_count(100)
        rollout(sock, "start", "web", "default", "--to", "v2", *STEPS_20)
        v = wait_status(client, "failed", timeout=30)
    finally:
        load.stop()
    assert route(client)["split"] == {"web": 100, "v2": 0}
    assert all(h.get("share", 0) < 100 for h in v["history"]), v["history"]
    fails = [h["reason"] for h in v["history"] if h.get("result") == "fail"]
    assert fails and all("reset_rate: canary" in f for f in fails), fails
    assert "> max 1.0% (stable 0.0%)" in fails[0], fails
    assert backend(client, "v2", "v2a")["late_resets"] > 0
    assert backend(client, "web", "v1a")["late_resets"] == 0
    text = cli("rollout", "status", "--socket", sock).stdout
    assert "reset_rate" in text and "FAILED" in text, text


def test_healthy_canary_is_promoted_with_the_reset_gate_on(backends, fastlb):
    """The same steps with a healthy v2: every judgement passes (reset_rate 0.0%), promoted."""
    b, lb, client, sock = start(backends, fastlb)
    load = Load(lb.addr, concurrency=8).start()
    try:
        load.wait_count(100)
        rollout(sock, "start", "web", "default", "--to", "v2", *STEPS_20)
        v = wait_status(client, "promoted")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert [h["result"] for h in v["history"] if "result" in h] == ["pass", "pass"], v["history"]
    figures = [h for h in v["history"] if h.get("result") == "pass"]
    assert figures, v["history"]
    assert route(client)["split"] == {"web": 0, "v2": 100}


IDLE_TABLE = """
[rollouts.idle]
listener = "web"
route = "default"
to = "v2"
steps = [10, 100]
interval = "300ms"
"""


def test_idle_canary_is_inconclusive_and_holds(backends, fastlb):
    """Started through the Python API from a [rollouts.NAME] table."""
    b, lb, client, sock = start(backends, fastlb, extra=IDLE_TABLE)
    v = client.rollout_start(rollout="idle", name="web-default")
    assert (v["share"], v["stable"], v["interval"]) == (10, "web", 0.3)
    wait_until(
        lambda: sum(1 for h in view(client)["history"] if h.get("result") == "inconclusive") >= 3,
        20,
        "3 judgements",
    )
    v = view(client)
    assert (v["status"], v["share"], v["failures"]) == ("progressing", 10, 0)
    assert "0 canary connections in the window < min 10" in v["last_judgement"]["reason"]
    assert route(client)["split"] == {"web": 90, "v2": 10}


def test_failing_check_rolls_back(backends, fastlb, tmp_path):
    b, lb, client, sock = start(backends, fastlb)
    marker = tmp_path / "checked"
    check = f'echo "$FASTLB_CANARY $FASTLB_SHARE" >> {marker}; echo "HTTP 503 from canary"; exit 1'
    rollout(
        sock,
        "start",
        "web",
        "default",
        "--to",
        "v2",
        *FAST,
        "--min-connections",
        "0",
        "--check",
        check,
        "--threshold",
        "1",
    )
    v = wait_status(client, "failed")
    assert "check: exit 1: HTTP 503 from canary" in v["reason"], v["reason"]
    assert marker.read_text().split() == ["v2", "10"]
    assert route(client)["split"] == {"web": 100, "v2": 0}


def test_pause_resume_promote_abort(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb)
    load = Load(lb.addr, concurrency=4).start()
    try:
        load.wait_count(50)
        rollout(
            sock,
            "start",
            "web",
            "default",
            "--to",
            "v2",
            "--steps",
            "10,50,100",
            "--interval",
            "1500ms",
            "--min-connections",
            "1",
            "--pause-at",
            "50",
        )
        assert rollout(sock, "pause").strip() == "rollout web-default: paused at 10%"
        time.sleep(3.5)
        v = view(client)
        assert (v["status"], v["share"]) == ("paused", 10)
        assert any(h.get("result") == "pass" for h in v["history"])  # judged, but held
        rollout(sock, "resume", "web-default")
        wait_until(
            lambda: (view(client)["share"], view(client)["status"]) == (50, "paused"), 20, "--pause-at 50"
        )
        out = rollout(sock, "promote")
        assert out.startswith("rollout web-default: promoted at 100%: promoted by the operator at 50%")
        assert route(client)["split"] == {"web": 0, "v2": 100}
        assert backend(client, "web", "v1a")["admin"] == "drain"
        # back to v1 as a new rollout: v1's backends come back into service; then abort it
        rollout(sock, "start", "web", "default", "--to", "web", "--name", "back", "--interval", "1m")
        assert backend(client, "web", "v1a")["admin"] == "ready"
        assert route(client)["split"] == {"web": 5, "v2": 95}
        out = rollout(sock, "abort", "back")
        assert "aborted at 0%: rolled back at 5%: aborted by the operator" in out
        assert route(client)["split"] == {"web": 0, "v2": 100}
        r = cli("rollout", "abort", "back", "--socket", sock)
        assert r.returncode == 1 and r.stderr.strip() == "fastlb: rollout back is aborted; cannot abort it"
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]


def test_sighup_mid_rollout_continues(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb)
    load = Load(lb.addr, concurrency=4).start()
    try:
        load.wait_count(50)
        rollout(
            sock,
            "start",
            "web",
            "default",
            "--to",
            "v2",
            "--steps",
            "10,50,100",
            "--interval",
            "1500ms",
            "--min-connections",
            "3",
        )
        mark = log_mark(lb)
        lb.signal(signal.SIGHUP)
        wait_log(lb, "reloaded", 10, since=mark)
        assert route(client)["split"] == {"web": 90, "v2": 10}  # the file's 100/0 did not win
        v = wait_status(client, "promoted")
    finally:
        load.stop()
    assert load.failures == []
    assert [h["share"] for h in v["history"] if h.get("event") in ("start", "step")] == [10, 50, 100]


def test_restart_mid_rollout_resumes_at_the_same_step(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb)
    load = Load(lb.addr, concurrency=4).start()
    try:
        load.wait_count(50)
        rollout(
            sock,
            "start",
            "web",
            "default",
            "--to",
            "v2",
            "--steps",
            "10,50,100",
            "--interval",
            "1s",
            "--min-connections",
            "3",
        )
        wait_until(lambda: view(client)["share"] == 50, 20, "50%")
        rollout(sock, "pause")  # hold it at 50 across the restart
    finally:
        load.stop()
    lb.restart()
    wait_log(lb, r"rollout web-default: resumed after a restart at 50% \(paused\)", 5)
    v = view(client)
    assert (v["status"], v["share"], v["history"][-1]["event"]) == ("paused", 50, "restart")
    assert route(client)["split"] == {"web": 50, "v2": 50}
    load = Load(lb.addr, concurrency=4).start()
    try:
        rollout(sock, "resume")
        v = wait_status(client, "promoted")
    finally:
        load.stop()
    assert load.failures == []


def test_blue_green_switch_and_back_under_load_old_side_drained(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb, drain_timeout="1s")
    held = None
    load = Load(lb.addr, concurrency=8).start()
    try:
        load.wait_count(100)
        held = lb.connect()
        assert recv_line(held) == b"v1a"
        r = cli("switch", "web", "default", "v2", "--drain-old", "--socket", sock)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == "switch web/default: live v2 (split v2=100)"
        assert "other side web: " in r.stdout and "draining" in r.stdout
        n = len(load.done)
        load.wait_count(n + 300)
        assert {x for _, x in load.done[n + 16 :]} == {"v2a"}
        # the old side is drained: the held connection is closed after drain_timeout (1s)
        how, _ = wait_closed(held, 10)  # closed at the drain deadline (reset or FIN)
        assert how in ("reset", "eof")
        wait_until(lambda: backend(client, "web", "v1a")["active"] == 0, 10, "v1 empty")
        st = cli("status", "--socket", sock).stdout
        assert (
            "switch web/default: live v2" in st and "other side web: 0 connections still open, draining" in st
        )
        r = cli("switch", "web", "default", "--back", "--socket", sock)
        assert r.returncode == 0 and r.stdout.startswith("switch web/default: live web (split web=100)"), (
            r.stdout
        )
        assert backend(client, "web", "v1a")["admin"] == "ready"
        n = len(load.done)
        load.wait_count(n + 300)
        assert {x for _, x in load.done[n + 16 :]} == {"v1a"}
    finally:
        load.stop()
        if held is not None:
            held.close()
    assert load.failures == [], load.failures[:5]


def test_runtime_split_survives_sighup_and_restart_until_the_file_changes_it(backends, fastlb):
    b, lb, client, sock = start(backends, fastlb)
    r = cli("set-split", "web", "default", "web=50", "v2=50", "--socket", sock)
    assert r.returncode == 0, r.stderr
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    wait_log(lb, r"listener web route default split: runtime value web=50/v2=50 kept", 10, since=mark)
    wait_log(lb, "reloaded", 10, since=mark)
    rt = route(client)
    assert (rt["split"], rt["split_source"]) == ({"web": 50, "v2": 50}, "runtime")
    assert "web=50 (" in cli("status", "--socket", sock).stdout.split("route default")[1].split("\n")[0]
    lb.restart()
    rt = route(client)
    assert (rt["split"], rt["split_source"]) == ({"web": 50, "v2": 50}, "runtime")
    # the operator edits the route's split in the file: on SIGHUP the file wins, logged
    lb.config_path.write_text(
        lb.config_text.replace(
            'weight = 100 }, { pool = "v2", weight = 0', 'weight = 80 }, { pool = "v2", weight = 20'
        )
    )
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    line = wait_log(lb, r"listener web route default split: the config file changed it", 10, since=mark)
    assert "overrides the runtime value web=50/v2=50" in line
    wait_log(lb, "reloaded", 10, since=mark)
    rt = route(client)
    assert (rt["split"], rt["split_source"]) == ({"web": 80, "v2": 20}, "file")


def test_rollout_cli_refuses_a_pointless_start_says_when_none_runs_and_promotes_in_one_step(backends, fastlb):
    """Issue 19 item 7: --to with the whole split, or with no usable backend, is refused in one
    line (the split unchanged); `--steps 100` promotes at once without a traceback and drains the
    old pool; pause without a running rollout says so at once."""
    b, lb, client, sock = start(backends, fastlb)

    def refused(*args: str) -> str:
        before = route(client)["split"]
        r = cli("rollout", *args, "--socket", sock)
        assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, (r.stdout, r.stderr)
        assert route(client)["split"] == before
        return r.stderr

    assert refused("start", "web", "default", "--to", "web", "--from", "v2") == (
        "fastlb: web/default: pool web already has the whole split (web=100): nothing to roll out\n"
    )
    assert refused("pause") == "fastlb: no rollout is running\n"
    assert cli("disable", "v2", "v2a", "--socket", sock).returncode == 0
    assert refused("start", "web", "default", "--to", "v2") == (
        "fastlb: web/default: pool v2 has no usable backend (none in service, healthy and with a "
        "weight above 0): nothing to roll out to\n"
    )
    assert cli("enable", "v2", "v2a", "--socket", sock).returncode == 0
    r = cli("rollout", "start", "web", "default", "--to", "v2", "--steps", "100", "--socket", sock)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout == "rollout web-default: promoted at 100% (split web=0 v2=100)\n"
    assert route(client)["split"] == {"web": 0, "v2": 100}
    assert backend(client, "web", "v1a")["admin"] == "drain"  # the old pool drains, as the reason says
    assert refused("pause") == "fastlb: no rollout is running (the last one, web-default, is promoted)\n"
    assert refused("start", "web", "default", "--to", "v2").startswith(
        "fastlb: web/default: pool v2 already has the whole split (v2=100)"
    )
