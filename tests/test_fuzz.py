"""Fuzzing the two parsers of untrusted input (issue 9 item 11): every config text and every control
request gives a one-line error or a valid result, never another exception; and a config that
check-config accepts can be set up by serve (the shared region is built and published from it).

Bounded for the suite (a few hundred examples each, a few seconds); FASTLB_FUZZ_EXAMPLES=N runs N
examples per test (the long run recorded in docs/failure-behaviour.md).
"""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from fastlb.config import Config
from fastlb.runtime.supervisor import Supervisor
from support.fuzz import (
    RAW_TEXT,
    REQUESTS,
    FakeControlTarget,
    check_config_text,
    check_request,
    config_documents,
    fuzz_settings,
    toml_text,
)


def _can_serve(config: Config) -> None:
    """What `fastlb serve` does with a config before it forks: build and publish the shared region."""
    logging.getLogger("fastlb").disabled = True  # a valid pool with every backend at weight 0 logs
    try:
        sup = Supervisor(config)
    finally:
        logging.getLogger("fastlb").disabled = False
    sup.region.close()


@fuzz_settings(150)
@given(config_documents())
def test_config_documents(doc: dict) -> None:
    text = toml_text(doc)
    if text is None:
        return
    config = check_config_text(text)
    if config is not None:
        _can_serve(config)


@fuzz_settings(300)
@given(RAW_TEXT)
def test_config_raw_text(text: str) -> None:
    config = check_config_text(text)
    if config is not None:
        _can_serve(config)


@fuzz_settings(300)
@given(REQUESTS)
def test_control_requests(line: bytes) -> None:
    check_request(FakeControlTarget(), line)


@fuzz_settings(100)
@given(st.lists(REQUESTS, min_size=2, max_size=5))
def test_control_request_sequences(lines: list[bytes]) -> None:
    """State carried between requests (weights, admin states) never turns a later request into an exception."""
    target = FakeControlTarget()
    for line in lines:
        check_request(target, line)
