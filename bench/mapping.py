"""HL7 v2 → canonical mapping: µs per message, the interpreted rules against their compiled form.

For each fixture (ORM^O01, OMI^O23, ADT^A08, ORU^R01 of ``fixtures/hl7/``), decoded and tokenized once, one thread:

* ``map ref``: ``HL7InboundMapping(compiled=False).map`` (the rule-by-rule interpreter, the compiled form's
  reference);
* ``map compiled``: ``HL7InboundMapping().map`` (what the engine runs);
* baselines: ``traboule.formats.hl7.parse`` of the same text (the tokenizer the ingest path runs first) and
  ``hl7apy.parser.parse_message`` (a plain library parse, no validation, no groups).

Each figure is the best of ``--repeat`` runs of ``--number`` calls (the least disturbed by other load), in µs per
message; the ratios: reference / compiled, and compiled / each parse. Every mapped result is checked equal both
ways before timing (a faster wrong answer is not measured). Also prints how long compiling the shipped mapping takes.

    .venv/bin/python bench/mapping.py [--number 2000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hl7apy.parser import parse_message  # noqa: E402

from traboule import model  # noqa: E402
from traboule.formats import hl7  # noqa: E402
from traboule.translate.hl7_mapping import _COMPILED, HL7InboundMapping  # noqa: E402

FIXTURES = ROOT / "fixtures" / "hl7"
MESSAGES = {
    "ORM^O01": "orm_o01_nw_latin1.hl7",
    "OMI^O23": "omi_o23_nw_utf8.hl7",
    "ADT^A08": "adt_a08_update.hl7",
    "ORU^R01": "oru_r01_report.hl7",
}


def best(calls: list[Any], number: int, repeat: int) -> list[float]:
    """µs per call of each of ``calls``: the best of ``repeat`` runs of ``number`` calls, the runs of the calls
    taking turns (a burst of other load then disturbs them alike)."""
    runs: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for times, call in zip(runs, calls, strict=True):
            times.append(timeit.timeit(call, number=number) / number * 1e6)
    return [min(times) for times in runs]


def load_ms(compiled: bool) -> float:
    start = time.perf_counter()
    HL7InboundMapping(compiled=compiled)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the best is kept")
    args = parser.parse_args()

    compiled, reference = HL7InboundMapping(), HL7InboundMapping(compiled=False)  # imports done, code cached
    load_reference = min(load_ms(False) for _ in range(3))
    _COMPILED.clear()
    load_compiled = load_ms(True)

    print(
        f"# Python {platform.python_version()} on {platform.machine()}, {args.repeat} x {args.number} calls, best run"
    )
    print(f"# load hl7_inbound.yaml: {load_reference:.1f} ms interpreted, {load_compiled:.1f} ms compiled (first time)")
    header = ("message", "hl7.parse", "hl7apy", "map ref", "map compiled", "ref/compiled", "compiled/parse", "/hl7apy")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for label, name in MESSAGES.items():
        text = hl7.decode((FIXTURES / name).read_bytes()).text
        msg = hl7.parse(text)
        er7 = text.replace("\r\n", "\r").replace("\n", "\r")
        mapped = [model.plain(p) for p in compiled.map(msg, [])]
        if mapped != [model.plain(p) for p in reference.map(msg, [])]:
            raise SystemExit(f"{name}: the compiled mapping's result differs from the reference")
        parse_us, ref_us, fast_us = best(
            [lambda: hl7.parse(text), lambda: reference.map(msg, []), lambda: compiled.map(msg, [])],  # noqa: B023
            args.number,
            args.repeat,
        )
        (hl7apy_us,) = best([lambda: parse_message(er7, find_groups=False)], max(args.number // 200, 1), 3)  # noqa: B023
        row = (
            label,
            f"{parse_us:.1f}",
            f"{hl7apy_us:.0f}",
            f"{ref_us:.1f}",
            f"{fast_us:.1f}",
            f"{ref_us / fast_us:.2f}x",
            f"{fast_us / parse_us:.2f}",
            f"{fast_us / hl7apy_us:.3f}",
        )
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
