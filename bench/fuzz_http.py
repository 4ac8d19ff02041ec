"""Fuzz campaign on the HTTP routes: ``n`` generated requests (the strategies of tests/test_fuzz_http.py: every
route, the FHIR search parameters of each type, ``/fhir/Binary/{id}``, archive notifications, odd paths and
request lines, huge and non-UTF-8 query strings) against the engine served by uvicorn on 127.0.0.1.

A *crash* is an answer of 500 or more, no answer at all, or one slower than the bound (5 s); after the campaign
the engine must still answer ``/health/live``, or that counts as one more crash.

    .venv/bin/python bench/fuzz_http.py [--inputs 10000]

``campaign(n)`` is what bench/fuzz.py calls.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import generation_only, surface_main  # noqa: E402
from hypothesis import given  # noqa: E402

from tests.test_fuzz_http import (  # noqa: E402
    ANSWER_WITHIN,
    ServedEngine,
    exchange,
    http_requests,
    is_failure,
    request,
)
from traboule.app import logging as tlog  # noqa: E402


def campaign(n: int = 10_000, *, quiet: bool = True) -> dict[str, Any]:
    """Send ``n`` generated requests; counts of what was answered and what crashed, and the slowest answer.
    ``quiet``: engine logs at error level only (a refused request is a warning line, and there are thousands)."""
    if quiet:
        tlog.configure("json", "error")
    answered = crashes = sent = 0
    slowest = 0.0
    statuses: Counter[int | None] = Counter()
    with ServedEngine() as engine:
        if quiet:  # uvicorn sets its own loggers' level when it starts: "Invalid HTTP request" is a warning
            logging.getLogger("uvicorn.error").setLevel(logging.ERROR)

        # Generation only: a crash is counted, not shrunk, and the campaign goes on.
        @generation_only(n)
        @given(raw=http_requests(engine.ids))
        def one(raw: bytes) -> None:
            nonlocal answered, crashes, sent, slowest
            sent += 1
            answer = exchange(engine.port, raw)
            statuses[answer.status] += 1
            slowest = max(slowest, answer.ms)
            if answer.status is not None:
                answered += 1
            if is_failure(raw, answer.status) or answer.ms >= ANSWER_WITHIN * 1000:
                crashes += 1
                print(f"crash: {answer} for {raw[:200]!r}", file=sys.stderr)

        one()
        if exchange(engine.port, request("GET", b"/health/live")).status != 200:
            crashes += 1
    print(f"statuses: {dict(sorted(statuses.items(), key=lambda kv: kv[0] or 0))}", file=sys.stderr)
    return {
        "surface": "HTTP routes",
        "inputs": sent,
        "answered": answered,
        "crashes": crashes,
        "slowest_ms": round(slowest, 1),
    }


if __name__ == "__main__":
    surface_main(campaign, __doc__ or "")
