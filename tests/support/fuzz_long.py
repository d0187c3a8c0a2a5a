"""The long fuzz run of the config loader and the control-request handler (not part of the suite).

    .venv/bin/python tests/support/fuzz_long.py --inputs 1000000 [--seed S] [--seeds 2000]

Hypothesis builds a corpus of seed inputs from tests/support/fuzz.py's strategies (config documents
over the real key set, raw TOML-ish text, control requests); then a plain random mutator (delete,
duplicate, insert a token, flip a character, splice two seeds, insert a long number or deep nesting)
turns them into `--inputs` inputs, about 85 % config texts and 15 % control requests, because
hypothesis itself takes ~30 ms per structured document and a million would take hours.  Every input
goes through the same checks as tests/test_fuzz.py (one-line error or a valid result; a valid config
is built into a shared region as serve would).  Prints the figure recorded in docs/failure-behaviour.md;
exits 1 on the first finding, with the input saved next to the report.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import traceback
from pathlib import Path

# run as a script, sys.path[0] is tests/support/, where support's own fastlb.py would shadow the
# fastlb package: put tests/ there instead, so `support` is a package and `fastlb` is fastlb
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from hypothesis import given, settings  # noqa: E402

from fastlb.runtime.supervisor import Supervisor  # noqa: E402
from support.fuzz import (  # noqa: E402
    _TOML_TOKENS,
    RAW_TEXT,
    REQUESTS,
    FakeControlTarget,
    check_config_text,
    check_request,
    config_documents,
    toml_text,
)

_EXTRA_TOKENS = ["9" * 4301, "[" * 3000, "{a=" * 1500, "1_000", "-0", "+inf", "\x00", "\ud800", "\r\n", "é"]


def collect(strategy, n: int) -> list:
    """n examples of a hypothesis strategy (generated, not shrunk)."""
    out: list = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=list(__import__("hypothesis").HealthCheck),
    )
    @given(strategy)
    def grab(x) -> None:
        out.append(x)

    grab()
    return out


def mutate(text: str, rng: random.Random, corpus: list[str], tokens: list[str]) -> str:
    """One random edit of text (60 %), or two to four."""
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4)):
        n = len(text)
        i = rng.randint(0, n)
        j = min(n, i + rng.randint(0, 16))
        op = rng.randrange(7)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + text[i:j] * rng.randint(2, 4) + text[i:]
        elif op == 2:
            text = text[:i] + rng.choice(tokens) + text[i:]
        elif op == 3:
            text = text[:i] + chr(rng.choice((rng.randint(0, 127), rng.randint(0, 0x10FFFF)))) + text[j:]
        elif op == 4:
            other = rng.choice(corpus)
            k = rng.randint(0, len(other))
            text = text[:i] + other[k : k + rng.randint(0, 200)] + text[j:]
        elif op == 5:
            lines = text.split("\n")
            rng.shuffle(lines)
            text = "\n".join(lines)
        else:
            text = text[:i] + rng.choice(_EXTRA_TOKENS) + text[i:]
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=2000, help="hypothesis examples per seed corpus")
    ap.add_argument("--out", type=Path, default=Path("fuzz-finding.txt"))
    args = ap.parse_args()
    logging.getLogger("fastlb").disabled = True
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    docs = [t for t in (toml_text(d) for d in collect(config_documents(), args.seeds)) if t is not None]
    corpus = docs + collect(RAW_TEXT, args.seeds // 2)
    requests = [r.decode("utf-8", "surrogateescape") for r in collect(REQUESTS, args.seeds // 2)]
    tokens = list(_TOML_TOKENS.elements) + _EXTRA_TOKENS  # type: ignore[attr-defined]
    t_seeds = time.monotonic() - t0
    counts = {"config": 0, "config_valid": 0, "request": 0, "request_ok": 0}
    target = FakeControlTarget()
    t1 = time.monotonic()
    for k in range(args.inputs):
        is_request = rng.random() < 0.15
        base = rng.choice(requests if is_request else corpus)
        text = mutate(base, rng, requests if is_request else corpus, tokens)
        try:
            if is_request:
                counts["request"] += 1
                if check_request(target, text.encode("utf-8", "surrogatepass"))["ok"]:
                    counts["request_ok"] += 1
            else:
                counts["config"] += 1
                config = check_config_text(text)
                if config is not None:
                    counts["config_valid"] += 1
                    Supervisor(config).region.close()
        except BaseException:
            args.out.write_text(
                f"input #{k} ({'request' if is_request else 'config'}):\n{text!r}\n\n{traceback.format_exc()}"
            )
            print(f"FINDING after {k} inputs: see {args.out}", file=sys.stderr)
            return 1
        if k and k % 100_000 == 0:
            print(f"{k} inputs, {time.monotonic() - t1:.0f}s", file=sys.stderr, flush=True)
    took = time.monotonic() - t1
    print(
        f"{args.inputs} inputs ({counts['config']} config texts, {counts['config_valid']} of them valid and "
        f"built into a region; {counts['request']} control requests, {counts['request_ok']} accepted) "
        f"in {took:.0f}s after {t_seeds:.0f}s of seeding ({len(corpus)} config and {len(requests)} request "
        f"seeds), seed {args.seed}: 0 findings"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
