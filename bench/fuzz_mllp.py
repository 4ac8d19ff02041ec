"""Fuzz campaign on the MLLP listener: ``n`` generated inputs (the strategies of tests/test_fuzz_mllp.py: framing
variations, MSH variants and separators, declared charsets, non-UTF-8 bytes, FHS/BHS batches, segment / field /
repetition explosions, huge fields, pieces cut anywhere) against the orders channel's listener on 127.0.0.1.

A *crash* is an input not answered as it should be (an ACK per framed message, AA / AE / AR, or a clean close for
framing abuse) within the bound (5 s), an AA whose control id is not in the journal, or the listener not serving
the valid order sent after every 100 inputs and at the end.

    .venv/bin/python bench/fuzz_mllp.py [--inputs 10000]

``campaign(n)`` is what bench/fuzz.py calls.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import generation_only, surface_main  # noqa: E402
from hypothesis import given  # noqa: E402

from tests.test_fuzz_mllp import Case, MLLPEngine, cases, exchange, problems, still_serving  # noqa: E402
from traboule.app import logging as tlog  # noqa: E402

CHECK_EVERY = 100  # inputs between two checks that a valid order is still accepted


def campaign(n: int = 10_000, *, quiet: bool = True) -> dict[str, Any]:
    """Send ``n`` generated inputs; counts of what was answered and what crashed, and the slowest exchange.
    ``quiet``: engine logs at error level only (a refused input is a warning line, and there are thousands)."""
    if quiet:
        tlog.configure("json", "error")
    answered = crashes = sent = 0
    slowest = 0.0
    codes: Counter[str] = Counter()
    with MLLPEngine() as engine, contextlib.closing(engine.journal()) as journal:
        # Generation only: a crash is counted, not shrunk, and the campaign goes on.
        @generation_only(n)
        @given(case=cases())
        def one(case: Case) -> None:
            nonlocal answered, crashes, sent, slowest
            sent += 1
            outcome = exchange(engine.port, case)
            slowest = max(slowest, outcome.ms)
            codes.update(code for code, _ in outcome.codes)
            codes.update(["closed, no answer"] if outcome.closed and not outcome.answers else [])
            found = problems(journal, case, outcome)
            if sent % CHECK_EVERY == 0 and not still_serving(engine):
                found.append("a valid order is not accepted any more")
            if found:
                crashes += 1
                print(f"crash: {found} for {b''.join(case.pieces)[:200]!r}", file=sys.stderr)
            else:
                answered += 1

        one()
        if not still_serving(engine):
            crashes += 1
            print("crash: a valid order is not accepted after the campaign", file=sys.stderr)
    print(f"answers: {dict(codes)}", file=sys.stderr)
    return {
        "surface": "MLLP listener",
        "inputs": sent,
        "answered": answered,
        "crashes": crashes,
        "slowest_ms": round(slowest, 1),
    }


if __name__ == "__main__":
    surface_main(campaign, __doc__ or "")
