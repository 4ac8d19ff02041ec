"""Fuzz campaign on the MWL C-FIND identifier: ``n`` generated identifiers (the strategies of
tests/test_fuzz_dicom.py: every worklist key with its VR or any other, wild cards, ranges, pathological patterns,
garbage bytes, character sets, sequences of 0 to 2 items, nested ones) sent over real associations to the MWL SCP
and store served on 127.0.0.1 in this process.

A *crash* is a final status the SCP did not choose (pynetdicom's C311/C312: our handler raised), no status at all
(the association went away), or an answer slower than the bound (5 s); after the campaign the SCP must still answer
a valid query with its match, or that counts as one more crash.

    .venv/bin/python bench/fuzz_dicom.py [--inputs 10000]

``campaign(n)`` is what bench/fuzz.py calls.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz import generation_only, surface_main  # noqa: E402
from hypothesis import given  # noqa: E402

from tests.test_fuzz_dicom import ANSWER_WITHIN, Modality, ServedWorklist, identifiers, valid_query  # noqa: E402
from traboule.app import logging as tlog  # noqa: E402


def campaign(n: int = 10_000, *, quiet: bool = True) -> dict[str, Any]:
    """Send ``n`` generated identifiers; counts of what was answered and what crashed, and the slowest answer.
    ``quiet``: engine logs at error level only, pydicom's too (each invalid value is a warning)."""
    if quiet:
        tlog.configure("json", "error")
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    answered = crashes = sent = 0
    slowest = 0.0
    statuses: Counter[int | None] = Counter()
    with ServedWorklist() as served:
        modality = Modality(served.port)

        # Generation only: a crash is counted, not shrunk, and the campaign goes on.
        @generation_only(n)
        @given(identifier=identifiers())
        def one(identifier: bytes) -> None:
            nonlocal answered, crashes, sent, slowest
            sent += 1
            try:
                answer = modality.ask(identifier)
            except Exception as exc:  # the SCU could not even get an association
                crashes += 1
                print(f"crash: {type(exc).__name__}: {exc} for {identifier[:200]!r}", file=sys.stderr)
                return
            statuses[answer.final] += 1
            slowest = max(slowest, answer.ms)
            if answer.final is not None:
                answered += 1
            if not answer.handled or answer.ms >= ANSWER_WITHIN * 1000:
                crashes += 1
                print(f"crash: {answer} for {identifier[:200]!r}", file=sys.stderr)

        one()
        if modality.ask(valid_query()).statuses != [0xFF00, 0x0000]:
            crashes += 1
        modality.close()
    shown = {
        f"0x{s:04X}" if s is not None else "none": c for s, c in sorted(statuses.items(), key=lambda kv: kv[0] or 0)
    }
    print(f"statuses: {shown}", file=sys.stderr)
    return {
        "surface": "C-FIND identifier",
        "inputs": sent,
        "answered": answered,
        "crashes": crashes,
        "slowest_ms": round(slowest, 1),
    }


def _status_order(item: tuple[int | None, int]) -> int:
    return item[0] or 0


if __name__ == "__main__":
    surface_main(campaign, __doc__ or "")
