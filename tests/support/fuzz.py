"""Hypothesis strategies for fuzzing fastlb's two parsers of untrusted input: the config loader and the
control-request handler, plus the checks every input must pass and a fake control process.

The config documents are built from the loader's real key set (so most inputs get past the key checks
and reach the value checks, and a good share are valid), with values drawn from plausible ones (durations,
addresses, names, the real choices) and from any TOML value at all.  tests/test_fuzz.py runs them with a
small example count; FASTLB_FUZZ_EXAMPLES raises it for a long run (docs/failure-behaviour.md).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import tomli_w
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fastlb.config import loader
from fastlb.config import model as cfg
from fastlb.control import ControlError
from fastlb.control.server import handle_request

# --- settings ------------------------------------------------------------------------------------------


def fuzz_settings(default_examples: int) -> settings:
    """Example count from FASTLB_FUZZ_EXAMPLES (the long run), else `default_examples`; no deadline
    (a busy machine must not fail a test), no example database (the runs stay independent)."""
    n = int(os.environ.get("FASTLB_FUZZ_EXAMPLES", "0")) or default_examples
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --- any TOML value ------------------------------------------------------------------------------------

_KEYS_TEXT = st.text(max_size=12)
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.datetimes(timezones=st.none() | st.just(datetime.UTC)),
    st.dates(),
    st.times(),
)
ANY_VALUE = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS_TEXT, inner, max_size=4),
    max_leaves=12,
)

# --- plausible values per key ----------------------------------------------------------------------------
# Each key has good values (what the loader should accept, boundaries included) and bad ones (near
# misses).  A "clean" document draws only good values, so that a good share of the documents are valid
# and reach the cross-checks and the region build; the others mix in bad values and any TOML value.
# (Rare branches use sampled_from over a range rather than integers(0, n) == 0: hypothesis favours
# the smallest integer, which would make "rare" the common case.)

_UNITS = ["ms", "s", "m", "h"]
GOOD_DURATION = st.one_of(
    st.tuples(st.integers(1, 5000).map(str), st.sampled_from(_UNITS)).map("".join),
    st.sampled_from(["500ms", "2s", "1.5s", "5m", "1h", "596h", "597h", "720h", "30s"]),
    st.integers(1, 3600),
)
BAD_DURATION = st.one_of(
    st.tuples(
        st.floats(0, 1e7, allow_nan=False).map(lambda f: f"{f:.3f}"), st.sampled_from(["", "d", " s", "ms"])
    ).map("".join),
    st.sampled_from(["721h", "0s", "0.0001ms", "-1s", "1e3s", "9" * 5000 + "h"]),
    st.integers(-5, 3 * 10**6),
    st.floats(-1, 3e6),
)
GOOD_NAME = st.text("abcxyz0123_.:-", min_size=1, max_size=8) | st.sampled_from(["a", "b", "web", "x" * 63])
BAD_NAME = st.text(max_size=70) | st.sampled_from(["", "x" * 64, "a b", "é"])
_GOOD_HOSTS = st.sampled_from(["127.0.0.1", "[::1]", "0.0.0.0", "localhost", "10.0.0.1", "[::]"])
GOOD_ADDRESS = st.tuples(_GOOD_HOSTS, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}")
BAD_ADDRESS = st.one_of(
    st.tuples(
        st.sampled_from(["::1", "host", "", "[127.0.0.1]", "1.2.3"]),
        st.sampled_from([":", ""]),
        st.integers(-1, 70000).map(str),
    ).map("".join),
    st.text(max_size=30),
)
_PRIMES = [101, 4099, 65537, 131071, 5000011]


def _int(low: int, high: int) -> tuple[st.SearchStrategy[int], st.SearchStrategy[int]]:
    return st.integers(low, high), st.integers(low - 3, low - 1) | st.integers(high + 1, high + 3)


def _choice(choices: tuple[str, ...]) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    return st.sampled_from(choices), st.text(max_size=12) | st.sampled_from([c.upper() for c in choices])


def _text(
    good: list[str], bad: st.SearchStrategy[str]
) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    return st.sampled_from(good), bad


Kinds = dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]
DURATION = (GOOD_DURATION, BAD_DURATION)
NAME = (GOOD_NAME, BAD_NAME)
ADDRESS = (GOOD_ADDRESS, BAD_ADDRESS)

GLOBAL: Kinds = {
    "workers": _int(1, cfg.MAX_WORKERS),
    "control_socket": _text(
        ["/tmp/fastlb-fuzz.sock"], st.sampled_from(["relative.sock", "/" + "x" * 120, "/a\x00"])
    ),
    "shutdown_timeout": DURATION,
    "log_level": _choice(cfg.LOG_LEVELS),
}
LISTENER: Kinds = {
    "bind": ADDRESS,
    "pool": NAME,
    "connect_timeout": DURATION,
    "idle_timeout": DURATION,
    "max_connections": _int(0, cfg.MAX_MAX_CONNECTIONS),
    "backlog": _int(1, 65535),
}
BACKEND: Kinds = {"name": NAME, "address": ADDRESS, "weight": _int(0, cfg.MAX_WEIGHT)}
OUTLIER: Kinds = {
    "consecutive_failures": _int(0, cfg.MAX_THRESHOLD),
    "base_ejection_time": DURATION,
    "max_ejection_percent": _int(0, 100),
}
HEALTH: Kinds = {
    "type": _choice(cfg.HEALTH_CHECK_TYPES),
    "interval": DURATION,
    "timeout": DURATION,
    "rise": _int(1, cfg.MAX_THRESHOLD),
    "fall": _int(1, cfg.MAX_THRESHOLD),
    "port": _int(1, 65535),
    "address": (st.sampled_from(["127.0.0.1", "::1", "[::1]"]), st.sampled_from(["1.2.3.4:80", "host", ""])),
    "path": _text(["/", "/health"], st.sampled_from(["x", "/a b", ""])),
    "host": _text(["example.com"], st.sampled_from(["", "a b"])),
    "expect_status": _text(["200", "200-399", "204"], st.sampled_from(["399-200", "abc", "99", "600"])),
    "expect_body": _text(["ok"], st.just("")),
    "send": _text(["PING\r\n", ""], st.just("")),
    "expect": _text(["+PONG"], st.just("")),
}
POOL: Kinds = {
    "algorithm": _choice(cfg.ALGORITHMS + tuple(cfg.ALGORITHM_ALIASES)),
    "retries": _int(0, cfg.MAX_RETRIES),
    "hash_key": _choice(cfg.HASH_KEYS),
    "maglev_table_size": (st.sampled_from(_PRIMES), st.sampled_from([2, 97, 65536, 5000017, 10**12])),
    "ring_vnodes": _int(1, cfg.MAX_RING_VNODES),
    "slow_start": DURATION,
    "all_down": _choice(cfg.ALL_DOWN_POLICIES),
    "drain_timeout": DURATION,
}


def _one_in(draw: st.DrawFn, n: int) -> bool:
    return draw(st.sampled_from(range(n))) == n // 2


def _value(
    draw: st.DrawFn,
    kind: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
    clean: bool,
    junk: st.SearchStrategy[Any],
) -> Any:
    good, bad = kind
    if clean or not _one_in(draw, 3):
        return draw(good)
    return draw(bad | junk)


def _table(
    draw: st.DrawFn,
    kinds: Kinds,
    clean: bool,
    required: tuple[str, ...] = (),
    junk: st.SearchStrategy[Any] | None = None,
) -> dict:
    """Some of `kinds`' keys (the `required` ones in a clean table) with their values; in a dirty one,
    now and then an unknown key whose value comes from `junk` (default: any TOML value)."""
    keys = draw(st.lists(st.sampled_from(sorted(kinds)), unique=True, max_size=len(kinds)))
    if clean:
        keys = list(dict.fromkeys([*required, *keys]))
    junk = junk if junk is not None else ANY_VALUE
    out = {k: _value(draw, kinds[k], clean, junk) for k in keys}
    if not clean and _one_in(draw, 5):
        out[draw(_KEYS_TEXT)] = draw(junk)
    return out


def _pool(draw: st.DrawFn, clean: bool) -> dict:
    pool = _table(draw, POOL, clean)
    n = draw(st.integers(1 if clean else 0, 4))
    if clean or not _one_in(draw, 3):  # distinct names and addresses
        pool["backends"] = [
            {
                "name": f"b{i}",
                "address": f"127.0.0.1:{9000 + i}",
                "weight": _value(draw, BACKEND["weight"], clean, ANY_VALUE),
            }
            for i in range(n)
        ]
    else:
        pool["backends"] = (
            draw(ANY_VALUE) if _one_in(draw, 4) else [_table(draw, BACKEND, clean) for _ in range(n)]
        )
    if draw(st.booleans()):
        pool["health_check"] = _table(draw, HEALTH, clean, required=("type",))
        hc = pool["health_check"]
        if clean:  # only the keys of its type
            own = loader._HEALTH_COMMON_KEYS + loader._HEALTH_TYPE_KEYS[hc["type"]]
            pool["health_check"] = hc = {k: v for k, v in hc.items() if k in own}
        if hc.get("type") == "send_expect":
            hc.setdefault("expect", "+PONG")
    if _one_in(draw, 3):
        pool["outlier_detection"] = _table(draw, OUTLIER, clean)
    return pool


@st.composite
def config_documents(draw: st.DrawFn) -> dict:
    """A TOML document (as a dict) over the real sections and keys; listeners usually name a pool."""
    clean = draw(st.booleans())
    pools = {
        draw(NAME[0] if clean else NAME[0] | NAME[1]): _pool(draw, clean)
        for _ in range(draw(st.integers(1, 3)))
    }
    names = list(pools)
    listeners = {}
    for i in range(draw(st.integers(1 if clean else 0, 3))):
        lst = _table(draw, LISTENER, clean)
        if clean or not _one_in(draw, 4):
            lst["pool"] = draw(st.sampled_from(names))
            lst["bind"] = f"127.0.0.1:{8000 + i}"
        listeners[draw(NAME[0] if clean else NAME[0] | NAME[1])] = lst
    doc: dict[str, Any] = {"listeners": listeners, "pools": pools}
    if draw(st.booleans()):
        doc["global"] = _table(draw, GLOBAL, clean)
    if not clean and _one_in(draw, 5):
        doc[draw(_KEYS_TEXT)] = draw(ANY_VALUE)
    if not clean and _one_in(draw, 5):  # a whole section of the wrong type, or missing
        section = draw(st.sampled_from(["global", "listeners", "pools"]))
        if draw(st.booleans()):
            doc[section] = draw(ANY_VALUE)
        else:
            doc.pop(section, None)
    return doc


def toml_text(doc: dict) -> str | None:
    """The document as TOML text, or None where TOML cannot say it (tomli_w refuses, e.g. a time zone
    it cannot write)."""
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return None


def _lines(draw_text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(draw_text, max_size=8).map("\n".join)


# Raw text: arbitrary characters, and text made of TOML's own punctuation and the real key names.
_TOML_TOKENS = st.sampled_from(
    list("[]{}=,.\"'#\n \t")
    + ['"""', "'''", "true", "0x", "1e", "_", "\\u", "inf", "nan", "1979-05-27"]
    + list(loader._GLOBAL_KEYS + loader._LISTENER_KEYS + loader._POOL_KEYS + ("global", "listeners", "pools"))
)
RAW_TEXT = st.one_of(
    st.text(max_size=400),
    _lines(st.lists(_TOML_TOKENS, max_size=30).map("".join)),
)


# --- control requests --------------------------------------------------------------------------------

JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_REQUEST_KEYS = {
    "cmd": (
        st.sampled_from(["status", "set-weight", "drain", "enable", "disable"]),
        st.sampled_from(["", "STATUS"]),
    ),
    "pool": (st.sampled_from(["web"]), st.sampled_from(["other", "x" * 100])),
    "backend": (st.sampled_from(["a", "b"]), st.sampled_from(["zz", ""])),
    "weight": (st.integers(0, 1000), st.integers(-2, -1) | st.integers(1001, 1002) | st.booleans()),
}


@st.composite
def _request_objects(draw: st.DrawFn) -> dict:
    return _table(draw, _REQUEST_KEYS, draw(st.booleans()), required=("cmd",), junk=JSON_VALUE)


REQUESTS = st.one_of(
    _request_objects().map(lambda d: json.dumps(d).encode()),
    JSON_VALUE.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.tuples(st.sampled_from([b"[", b"{", b'{"a":', b'{"cmd":[']), st.integers(0, 70_000)).map(
        lambda t: t[0] * t[1]
    ),
)


class FakeSlot:
    def __init__(self, pool: str, name: str) -> None:
        self.pool, self.name, self.weight, self.admin = pool, name, 1, "ready"


class FakeBackends:
    """control.server's _Backends protocol over two pools; KeyError for unknown names, as the real one."""

    def __init__(self) -> None:
        self.slots = {("web", "a"): FakeSlot("web", "a"), ("web", "b"): FakeSlot("web", "b")}

    def find(self, pool: str, backend: str) -> FakeSlot:
        try:
            return self.slots[(pool, backend)]
        except KeyError:
            raise KeyError(f"unknown backend {backend!r} in pool {pool!r}") from None

    def set_weight(self, slot: FakeSlot, weight: int) -> None:
        slot.weight = weight

    def set_admin(self, slot: FakeSlot, admin: str) -> None:
        slot.admin = admin


class FakeControlTarget:
    """A stand-in for the supervisor: control.server.ControlTarget."""

    def __init__(self) -> None:
        self.backends = FakeBackends()

    def status(self) -> dict[str, Any]:
        return {"pools": [{"name": "web", "backends": [vars(s) for s in self.backends.slots.values()]}]}


# --- the properties -------------------------------------------------------------------------------------


def check_config_text(text: str) -> cfg.Config | None:
    """parse_config(text) returns a Config or raises one ConfigError of one printable line, nothing else."""
    try:
        return loader.parse_config(text, "fuzz.toml")
    except cfg.ConfigError as exc:
        line = str(exc)
        assert line.startswith("fuzz.toml: ") and "\n" not in line and line.isprintable(), repr(line)
        return None


def check_request(target: FakeControlTarget, line: bytes) -> dict[str, Any]:
    """handle_request gives a JSON-serialisable reply: ok, or an error of one printable line."""
    reply = handle_request(target, line)
    json.dumps(reply)
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        err = reply["error"]
        assert isinstance(err, str) and err.isprintable() and len(err) < 1000, repr(err)
    return reply


__all__ = [
    "ANY_VALUE",
    "ControlError",
    "FakeControlTarget",
    "RAW_TEXT",
    "REQUESTS",
    "check_config_text",
    "check_request",
    "config_documents",
    "fuzz_settings",
    "toml_text",
]


# --- state files (fastlb.runtime.statefile) ---------------------------------------------------------

JSON_ODD = [
    None, True, False, 0, -7, 5000, 1000, 1e308, -1e308, float("nan"), float("inf"), 2**70, 0.5, "abc", "",
    "drain", "maint", "ready", "v1", "web/a", "\x00", "é" * 70, [], {}, [1], {"v1": 5000}, {"v1": "x"},
    {"": 1}, 5, "5", [[[]]],
]  # fmt: skip


def state_document(config_file: str) -> dict[str, Any]:
    """A valid state document as fastlb writes it: runtime weights, admin states, a split, one
    running rollout with a check command, a switch and a retired pool."""
    rollout = {
        "version": 1,
        "spec": {
            "name": "r", "listener": "web", "route": "default", "to": "v2", "from": "v1",
            "steps": [10, 50, 100], "interval": 1.0, "pause_at": [], "threshold": 2,
            "gates": {"max_failure_rate": 0.01, "max_early_reset_rate": 0.01, "max_unhealthy": 0.0,
                      "max_connect_time": None, "min_connections": 10, "check": "true", "check_timeout": 10.0},
        },
        "base": {"v1": 100}, "status": "progressing", "step": 1, "failures": 0, "started_at": 1000.0,
        "updated_at": 1001.0, "next_at": 1002.0, "reason": "", "last": None,
        "history": [{"time": 1000.0, "event": "start", "text": "started"}],
    }  # fmt: skip
    return {
        "format": "fastlb-state",
        "version": 1,
        "config": config_file,
        "written": 1000.0,
        "pid": 1,
        "start_time": 1,
        "control_socket": "/run/fastlb/control.sock",
        "values": {
            "weight:web/a": {"value": 0, "file": 3},
            "admin:web/b": {"value": "drain", "file": "ready"},
            "split:web/default": {"value": {"v1": 50, "v2": 50}, "file": {"v1": 100}},
        },
        "rollouts": {"r": rollout},
        "deploy": {
            "switches": {
                "web/default": {"listener": "web", "route": "default", "live": ["v2"], "old": ["v1"],
                                "previous": {"v1": 100}, "drain_old": False, "at": 1000.0},
            },
            "retired": {"v1": ["a", "b"]},
        },
    }  # fmt: skip


def mutate(doc: Any, rng: Any, n: int) -> Any:
    """`doc` with n random nodes replaced (an odd JSON value, a deep nest, a node of itself) or
    deleted: documents that pass most checks and fail a few.  rng: a random.Random."""
    doc = json.loads(json.dumps(doc))

    def odd() -> Any:
        # a fresh copy each time: the same list placed twice would let a later step nest it in
        # itself (a cycle the walk below never leaves) and would change JSON_ODD for every caller
        return json.loads(json.dumps(rng.choice(JSON_ODD)))

    for _ in range(n):
        paths: list[tuple[Any, Any]] = []
        todo = [doc]
        while todo:
            node = todo.pop()
            keys = (
                list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
            )
            for k in keys:
                paths.append((node, k))
                todo.append(node[k])
        if not paths:
            return odd()
        node, k = rng.choice(paths)
        roll = rng.random()
        if roll < 0.15 and isinstance(node, dict):
            del node[k]
        elif roll < 0.25:
            deep: Any = odd()
            for _ in range(rng.choice((2, 70, 300))):
                deep = [deep]
            node[k] = deep
        elif roll < 0.35 and isinstance(node, dict):
            node[
                rng.choice(["weight:web/a", "admin:x/y", "split:web/r", "weight:bad name/a", "rollouts", "x"])
            ] = odd()
        else:
            node[k] = odd()
    return doc
