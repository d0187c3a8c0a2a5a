"""Bad input never produces a traceback (issue 9 item 11), end to end: `fastlb check-config`, a SIGHUP
reload of a bad file, a control request nested too deeply; and what check-config accepts, serve runs
(the longest timeouts the config allows)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from support.backends import server
from support.clients import cli, greet, raw_request
from support.protocols import log_mark, wait_log

GOOD = """\
[listeners.web]
bind = "127.0.0.1:8080"
pool = "web"

[pools.web]
backends = [{ name = "a", address = "127.0.0.1:9001" }]
"""

BAD_FILES = [
    pytest.param(GOOD + "[global]\nworkers = " + "1" * 5000 + "\n", "(line 8)", "4300 digits", id="long-int"),
    pytest.param(
        GOOD + "x = " + "[" * 5000 + "]" * 5000 + "\n", "(syntax)", "nested too deeply", id="deep-array"
    ),
    pytest.param(
        GOOD + "x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", "(syntax)", "nested", id="deep-table"
    ),
]


def _one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got {text!r}"
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize(("text", "where", "word"), BAD_FILES)
def test_check_config_rejects_in_one_line(tmp_path: Path, text: str, where: str, word: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = cli("check-config", str(path))
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith(f"fastlb: {path}: ") and where in line and word in line, line
    proc = cli("serve", "-c", str(path))  # serve refuses the same file the same way, before starting
    assert proc.returncode == 2 and _one_line(proc.stderr) == line


LONGEST = {"connect_timeout": "720h", "idle_timeout": "720h", "max_connections": 10_000_000}


def test_what_check_config_accepts_serve_runs(backends, fastlb) -> None:
    """The largest values the config allows (30 days of milliseconds, ten million connections) pass
    check-config and run: listeners open, traffic flows, status shows them."""
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)], listener=LONGEST, global_={"shutdown_timeout": "720h"})
    proc = cli("check-config", str(lb.config_path))
    assert proc.returncode == 0, proc.stderr
    assert greet(lb.addr) == "a"
    assert "Traceback" not in lb.log_text() and "OverflowError" not in lb.log_text()


BAD_ENDINGS = [
    pytest.param("\n[pools.x]\nretries = " + "1" * 5000 + "\n", "4300 digits", id="long-int"),
    pytest.param("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply", id="deep-array"),
    pytest.param("x = " + "{a=" * 3000 + "1" + "}" * 3000 + "\n", "nested too deeply", id="deep-table"),
]


@pytest.mark.parametrize(("ending", "word"), BAD_ENDINGS)
def test_sighup_with_a_bad_file_logs_one_line(backends, fastlb, ending: str, word: str) -> None:
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)])
    lb.config_path.write_text(lb.config_path.read_text() + ending)
    mark = log_mark(lb)
    lb.signal(signal.SIGHUP)
    line = wait_log(lb, r"reload failed", 10, since=mark)
    assert "(syntax)" in line and word in line, line
    assert "Traceback" not in lb.log_text() and "Exception in callback" not in lb.log_text()
    assert greet(lb.addr) == "a"  # still serving with the old configuration


def test_control_request_nested_too_deeply(backends, fastlb) -> None:
    b = backends(server("a", "id"))
    lb = fastlb([("a", b.address("a"), 1)])
    path = str(lb.dir / "control.sock")
    status = json.dumps({"cmd": "status"}).encode() + b"\n"
    for payload in (b"[" * 60_000, b'{"cmd": ' + b"[" * 30_000, b"{" * 60_000):
        replies = raw_request(path, payload + b"\n" + status)
        assert len(replies) == 2, replies
        assert replies[0] == {"ok": False, "error": "request is nested too deeply"} or (
            replies[0]["ok"] is False and "JSON" in replies[0]["error"]
        ), replies[0]
        assert replies[1]["ok"] is True
    assert "Traceback" not in lb.log_text()


def test_lone_surrogate_in_text_is_a_config_error() -> None:
    """Found by the long fuzz run: parse_config() on a str holding a lone surrogate (no UTF-8 file can
    hold one; a caller's str can) raised UnicodeEncodeError from the send_expect check's encode()."""
    from fastlb.config import ConfigError, parse_config

    text = GOOD + '\n[pools.web.health_check]\ntype = "send_expect"\nexpect = "+PON\ud800G"\n'
    with pytest.raises(ConfigError, match=r"lone surrogate"):
        parse_config(text, "x.toml")
