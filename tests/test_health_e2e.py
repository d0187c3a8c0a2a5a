"""End-to-end: active health checks (tcp, http, send_expect), rise/fall, slow start, passive ejection
and the all-down policies, against a real `fastlb serve` with two workers and real backend processes.

Every wait has a deadline derived from the configured interval / fall / rise plus SLACK (the two
cores are shared with the backends, the test clients and the other fastlb process).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from support.backends import server
from support.helpers import wait_until
from support.protocols import (
    Gate,
    backends_status,
    log_lines,
    log_mark,
    pool_status,
    proto,
    states,
    try_id_request,
    wait_log,
)

WORKERS = 2
INTERVAL = 0.25  # seconds between checks of one backend
RISE = 2
FALL = 2
SLACK = 0.35  # scheduling slack on a loaded 2-core machine, added to every computed deadline


def check(kind: str, **kw) -> dict:
    """A [pools.web.health_check] table with the test timing."""
    return {
        "type": kind,
        "interval": f"{int(INTERVAL * 1000)}ms",
        "timeout": "200ms",
        "rise": RISE,
        "fall": FALL,
        **kw,
    }


# Jitter is +-10% per interval (fastlb.runtime.health): a state change needs at most FALL (RISE) checks,
# the first of them at most one interval after the change.
DOWN_WITHIN = FALL * INTERVAL * 1.1 + INTERVAL + SLACK
UP_WITHIN = RISE * INTERVAL * 1.1 + INTERVAL + SLACK


def wait_state(lb, name: str, state: str, timeout: float) -> float:
    """Wait until backend `name` has `state` in fastlb's status; returns the monotonic time seen."""
    wait_until(
        lambda: states(lb).get(name) == state,
        timeout,
        lambda: f"backend {name} {state} (status: {states(lb)})",
    )
    return time.monotonic()


def http_get(addr: tuple[str, int], timeout: float = 5.0) -> bytes:
    """GET / through fastlb to a protocol "http" server; the whole response (it closes)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"response never ended: {data[:200]!r}")


# ---------------------------------------------------------------------------------------------------
# 1. a backend dies under load, comes back, ramps up


def test_killed_backend_no_client_fails_then_rises_with_slow_start(backends, fastlb):
    """Three `id` backends, each its own process; c is SIGKILLed while 10 client threads open 100
    connections: with retries = 2 none fails, c is down within fall x interval + interval and gets no
    connect attempt after that.  Restarted on the same port it is up after `rise` checks and its
    effective weight ramps from 5% to full over slow_start, and its share of connections with it."""
    slow_start = 3.0
    procs = {n: backends(server(n, "id")) for n in "abc"}
    port_c = procs["c"].ports["c"]
    lb = fastlb(
        [(n, procs[n].address(n), 100) for n in "abc"],
        workers=WORKERS,
        pool={
            "retries": 2,
            "slow_start": f"{slow_start}s",
            "health_check": check("tcp"),
            "outlier_detection": {"consecutive_failures": 0},  # active checks only
        },
    )
    assert states(lb) == {"a": "up", "b": "up", "c": "up"}

    gate = Gate()
    tokens = threading.Semaphore(0)  # one token per connection a client may open
    results: list[tuple[float, str]] = []  # (start time, backend name or "FAIL: ...")
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        for _ in range(100):
            if not tokens.acquire(timeout=15) or stop.is_set():
                return
            with gate.use():
                t0 = time.monotonic()
                r = try_id_request(lb.addr)
            with lock:
                results.append((t0, r))
            stop.wait(0.1)  # pacing: spread the connections over the detection window

    threads = [threading.Thread(target=client, daemon=True) for _ in range(10)]
    tokens.release(70)
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 20, 15, lambda: f"20 connections done (have {len(results)})")
        # kill c between connections: one established on c when it dies would be lost, and no
        # balancer can help that; the claim is about connections opened afterwards
        with gate.exclusive():
            procs["c"].proc.kill()
            procs["c"].proc.wait(5)
            t_kill = time.monotonic()
        t_down = wait_state(lb, "c", "down", DOWN_WITHIN)
        assert t_down - t_kill <= DOWN_WITHIN
        wait_log(lb, r"pool web backend c DOWN after 2 failed checks: connection refused", 2)
        with gate.exclusive():  # no connect in flight: the counter is final for the pre-down picks
            t_down = time.monotonic()
            errors_at_down = backends_status(lb)["c"]["connect_errors"]
        tokens.release(30)
        wait_until(lambda: len(results) == 100, 20, lambda: f"100 connections done (have {len(results)})")
    finally:
        stop.set()
        tokens.release(len(threads))  # wake the clients waiting for a token: they see `stop`
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)

    assert len(results) == 100
    failed = [r for _, r in results if r.startswith("FAIL")]
    assert failed == [], f"{len(failed)} of 100 client connections failed: {failed[:5]}"
    before = [r for t, r in results if t < t_kill]
    after = [r for t, r in results if t > t_kill]
    after_down = [r for t, r in results if t > t_down]
    assert {"a", "b", "c"} <= set(before)
    assert set(after) <= {"a", "b"} and len(after_down) >= 30
    st = backends_status(lb)["c"]
    # connects refused between the kill and the down verdict were retried on a or b ...
    assert errors_at_down >= 1, "no connection tried c after the kill: the retry path was not exercised"
    # ... and none was attempted once c was down
    assert st["connect_errors"] == errors_at_down
    assert st["state"] == "down" and st["health"] == "down"

    # --- restart c on the same port: up after `rise` checks, then a slow start
    mark = log_mark(lb)
    procs["c2"] = backends(server("c", "id", port=port_c))
    t_up = wait_state(lb, "c", "up", UP_WITHIN)
    wait_log(lb, r"pool web backend c UP after 2 successful checks", 2, since=mark)
    first = backends_status(lb)["c"]["effective_weight"]
    assert 1 <= first <= 40, f"effective weight right after up is {first}, expected a slow-start value"

    def share_of_c(n: int) -> int:
        names = [try_id_request(lb.addr) for _ in range(n)]
        assert not [x for x in names if x.startswith("FAIL")], names
        return names.count("c")

    early = share_of_c(60)
    samples = [first]

    def ramped() -> bool:
        samples.append(backends_status(lb)["c"]["effective_weight"])
        return samples[-1] == 100

    wait_until(ramped, slow_start + 2.0, lambda: f"c at full weight (samples {samples})", interval=0.1)
    t_full = time.monotonic()
    assert samples == sorted(samples), f"effective weight went down during slow start: {samples}"
    assert len({w for w in samples if 30 < w < 100}) >= 3, f"no gradual ramp: {samples}"
    assert t_full - t_up >= slow_start * 0.8, (
        f"full weight after {t_full - t_up:.2f}s, slow_start {slow_start}s"
    )
    late = share_of_c(60)
    assert late >= 14, f"c got {late} of 60 connections at full weight (expected about 20)"
    assert early * 2 < late, f"c's share did not grow: {early} of 60 early, {late} of 60 at full weight"


# ---------------------------------------------------------------------------------------------------
# 2. http, 3. send_expect


def test_http_check_503_marks_down_and_200_brings_back(fastlb, proto_servers):
    ps = proto_servers(proto("a", "http", status=200), proto("b", "http", status=200))
    lb = fastlb(
        [("a", ps.address("a"), None), ("b", ps.address("b"), None)],
        workers=WORKERS,
        pool={"health_check": check("http", path="/healthz", expect_status=200)},
    )
    wait_until(
        lambda: ps.stats()["received"]["a"].startswith("GET /healthz HTTP/1.0\r\n"),
        2 * INTERVAL + SLACK,
        lambda: f"an http check of a (got {ps.stats()['received']['a']!r})",
    )
    assert states(lb) == {"a": "up", "b": "up"}

    mark = log_mark(lb)
    ps.set("a", "status", 503)
    wait_state(lb, "a", "down", DOWN_WITHIN)
    line = wait_log(lb, r"backend a DOWN", 2, since=mark)
    assert "bad status 503" in line
    assert states(lb)["b"] == "up"
    # new connections only reach b now
    bodies = {http_get(lb.addr).split(b"\r\n\r\n", 1)[1] for _ in range(8)}
    assert bodies == {b"b 200\n"}

    mark = log_mark(lb)
    ps.set("a", "status", 200)
    wait_state(lb, "a", "up", UP_WITHIN)
    assert "ok" in wait_log(lb, r"backend a UP after 2 successful checks", 2, since=mark)
    bodies = {http_get(lb.addr).split(b"\r\n\r\n", 1)[1] for _ in range(8)}
    assert bodies == {b"a 200\n", b"b 200\n"}


def test_send_expect_wrong_reply_down_correct_one_stays_up(fastlb, proto_servers):
    ps = proto_servers(
        proto("good", "line", reply="+PONG\r\n"), proto("bad", "line", reply="-ERR unknown command\r\n")
    )
    lb = fastlb(
        [("good", ps.address("good"), None), ("bad", ps.address("bad"), None)],
        workers=WORKERS,
        pool={"health_check": check("send_expect", send="PING\r\n", expect="+PONG")},
    )
    wait_state(lb, "bad", "down", DOWN_WITHIN)
    line = wait_log(lb, r"backend bad DOWN after 2 failed checks", 2)
    assert "unexpected reply b'-ERR unknown command" in line
    # the good one keeps passing: at least 4 more checks, and up at every look
    seen = ps.accepted("good")
    looks = []

    def checked() -> bool:
        looks.append(states(lb)["good"])
        return ps.accepted("good") >= seen + 4

    wait_until(checked, 5 * INTERVAL * 1.1 + SLACK, "4 more checks of good")
    assert set(looks) == {"up"}
    assert ps.stats()["received"]["good"] == "PING\r\n"
    assert log_lines(lb, r"backend good (DOWN|UP)") == []
    assert states(lb) == {"good": "up", "bad": "down"}


# ---------------------------------------------------------------------------------------------------
# 4. passive ejection


def test_resetting_backend_is_ejected_without_active_checks(backends, fastlb, proto_servers):
    b = backends(server("a", "id"))
    ps = proto_servers(proto("r", "rst"))
    lb = fastlb(
        [("a", b.address("a"), None), ("r", ps.address("r"), None)],
        workers=WORKERS,
        pool={
            "outlier_detection": {
                "consecutive_failures": 3,
                "base_ejection_time": "30s",
                "max_ejection_percent": 50,
            }
        },
    )
    results = []

    def enough_failures() -> bool:
        results.append(try_id_request(lb.addr))
        return backends_status(lb)["r"]["consecutive_failures"] >= 3

    wait_until(enough_failures, 10, lambda: f"3 failures of r (clients saw {results})", interval=0)
    assert len(results) <= 20
    assert ps.accepted("r") >= 3  # r really accepted and reset them
    wait_state(lb, "r", "ejected", 1.0)
    line = wait_log(lb, r"backend r: EJECTED after \d+ consecutive failures", 2)
    assert "for 30.0s" in line
    st = backends_status(lb)
    assert (st["r"]["health"], st["r"]["admin"], st["a"]["state"]) == ("ejected", "ready", "up")
    assert st["r"]["connect_errors"] + st["r"]["resets"] >= 3
    # ejected: every new connection goes to a, r sees none
    accepted_r = ps.accepted("r")
    assert [try_id_request(lb.addr) for _ in range(20)] == ["a"] * 20
    assert ps.accepted("r") == accepted_r
    assert states(lb)["r"] == "ejected"


def test_max_ejection_percent_one_of_three_at_a_time(backends, fastlb, proto_servers):
    """Pool of 3, two reset every connection, max_ejection_percent = 50: (1+1)*100 > 50*3, so
    only one may be ejected; the other waits - in service although over the threshold - and is
    ejected when the first one's ejection ends."""
    b = backends(server("a", "id"))
    ps = proto_servers(proto("r1", "rst"), proto("r2", "rst"))
    lb = fastlb(
        [("a", b.address("a"), None), ("r1", ps.address("r1"), None), ("r2", ps.address("r2"), None)],
        workers=WORKERS,
        pool={
            "retries": 0,
            "outlier_detection": {
                "consecutive_failures": 3,
                "base_ejection_time": "1.5s",
                "max_ejection_percent": 50,
            },
        },
    )
    looks: list[dict[str, dict]] = []

    def ejected(st: dict[str, dict]) -> set[str]:
        return {n for n, x in st.items() if x["state"] == "ejected"}

    def look() -> dict[str, dict]:
        st = backends_status(lb)
        looks.append(st)
        assert len(ejected(st)) <= 1, f"two backends ejected at once: {st}"
        return st

    def both_over_threshold() -> bool:
        try_id_request(lb.addr)
        st = look()
        return all(st[n]["consecutive_failures"] >= 3 for n in ("r1", "r2")) and len(ejected(st)) == 1

    wait_until(
        both_over_threshold,
        15,
        lambda: f"r1 and r2 over the threshold, one ejected ({looks[-1:]})",
        interval=0,
    )
    st = looks[-1]
    (first,) = ejected(st)
    other = "r2" if first == "r1" else "r1"
    assert st[other]["state"] == "up", "the cap should keep the second offender in service"
    # no more traffic: first's ejection ends after 1.5 s and other is ejected in its place
    seen: list[str] = [first]

    def other_took_over() -> bool:
        ej = ejected(look())
        if ej and ej != {seen[-1]}:
            seen.extend(ej)
        return seen == [first, other]

    wait_until(
        other_took_over,
        1.5 + 1.0 + SLACK,
        lambda: f"{other} ejected after {first} (seen {seen})",
        interval=0.02,
    )
    wait_log(lb, rf"backend {first}: ejection over", 1)
    assert len(log_lines(lb, r"EJECTED after")) == 2
    assert [line.split("backend ")[1].split(":")[0] for line in log_lines(lb, "EJECTED after")] == [
        first,
        other,
    ]
    assert states(lb)["a"] == "up"


# ---------------------------------------------------------------------------------------------------
# 5. every backend down: reject or panic


@pytest.mark.parametrize("policy", ["reject", "panic"])
def test_all_down_reject_or_panic(backends, fastlb, request, policy):
    b = backends(server("a", "id"), server("b", "id"))
    # the checks go to a port that is bound but not listening (refused, and nobody can take it)
    closed = socket.socket()
    request.addfinalizer(closed.close)
    closed.bind(("127.0.0.1", 0))
    lb = fastlb(
        [("a", b.address("a"), None), ("b", b.address("b"), None)],
        workers=WORKERS,
        pool={"all_down": policy, "health_check": check("tcp", port=closed.getsockname()[1])},
    )
    wait_until(lambda: pool_status(lb)["all_down"], DOWN_WITHIN, lambda: f"all down ({pool_status(lb)})")
    p = pool_status(lb)
    assert {x["name"]: x["state"] for x in p["backends"]} == {"a": "down", "b": "down"}
    assert p["all_down"] is True and p["panic"] is (policy == "panic")
    before = b.accepted()
    assert before == {"a": 0, "b": 0}  # the checks never touched the traffic port

    if policy == "reject":
        wait_log(lb, r"pool web: every backend is down; rejecting new connections", 2)
        for _ in range(5):
            with socket.create_connection(lb.addr, timeout=5) as s:
                s.settimeout(2.0)
                t0 = time.monotonic()
                try:
                    data = s.recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"" and time.monotonic() - t0 < 1.0
        assert b.accepted() == before
        assert pool_status(lb)["no_backend"] == 5
    else:
        wait_log(
            lb, r"pool web: every backend is down; panic: spreading new connections over all backends", 2
        )
        names = [try_id_request(lb.addr) for _ in range(10)]
        assert sorted(set(names)) == ["a", "b"], names
        after = b.accepted()
        assert after["a"] + after["b"] == 10
        assert pool_status(lb)["no_backend"] == 0
