"""Cost of a CDA validation: traboule's CDAValidator (one Saxon processor, schematrons compiled once) against the
naive way of the FRANCE.md recipe (a fresh PySaxonProcessor and a stylesheet compile for every document).

Documents: the level-3 and level-1 skeletons of ``shared/standards/derived`` and the largest ANS CR-IMG example.
Per document: XSD, each schematron and the whole ``validate()`` call, p50/p99 over ``--runs``; the naive way
over ``--naive-runs`` (each run recompiles ~10 MB of XSLT, ~8 s). First-compile cost: a cold cache (schematron →
XSLT, then Saxon compile) and a warm one (Saxon compile only, what every new process pays).

    .venv/bin/python bench/cda_validate.py [--runs 50] [--naive-runs 3] [--validators PATH]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from lxml import etree  # noqa: E402
from saxonche import PySaxonProcessor  # noqa: E402

from traboule.formats.cda_validation import COMPILED_SUFFIX, XSD, CDAValidator  # noqa: E402

STANDARDS = ROOT.parent / "shared" / "standards"


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.1f}"


def short(sch: str) -> str:
    return Path(sch).name.removesuffix(".sch")


def naive_once(validator: CDAValidator, xsd: etree.XMLSchema, path: Path, schematrons: tuple[str, ...]) -> float:
    """The FRANCE.md recipe for one document: XSD (schema loaded once), then per schematron a new processor,
    a compile of the already generated XSLT, a transform and a regex over the SVRL."""
    start = time.perf_counter()
    xsd.validate(etree.parse(str(path)))
    for sch in schematrons:
        xsl = validator.work / "schematrons" / (sch.removesuffix(".sch") + COMPILED_SUFFIX)
        with PySaxonProcessor(license=False) as proc:
            svrl = (
                proc.new_xslt30_processor()
                .compile_stylesheet(stylesheet_file=str(xsl))
                .transform_to_string(source_file=str(path))
            )
        re.findall(r"<svrl:failed-assert.*?<svrl:text>(.*?)</svrl:text>", svrl, re.S)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--naive-runs", type=int, default=3)
    parser.add_argument("--validators", type=Path, default=STANDARDS / "ans-testcontenucda")
    args = parser.parse_args()

    examples = sorted((args.validators / "ExemplesCDA").glob("IMG_CR_IMG_2024.01*.xml"), key=lambda p: p.stat().st_size)
    docs = {
        "skeleton N3": STANDARDS / "derived" / "skeleton_IMG-CR-IMG_2024.01_N3_minimal.xml",
        "skeleton N1": STANDARDS / "derived" / "skeleton_IMG-CR-IMG_N1_minimal.xml",
        f"ANS {examples[-1].name}": examples[-1],
    }
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")

    with tempfile.TemporaryDirectory(prefix="cda-bench-") as cache:
        start = time.perf_counter()
        cold = CDAValidator(args.validators, cache)
        cold_setup = time.perf_counter() - start
        cold_compile = cold.compile_all()
        start = time.perf_counter()
        validator = CDAValidator(args.validators, cache)
        warm_setup = time.perf_counter() - start
        warm_compile = validator.compile_all()
        print("\nFirst compile (s): cold = empty cache (copy tree, schematron -> XSLT, Saxon compile); warm = cache")
        print("filled by an earlier process (Saxon compile only, paid by every new process)")
        print(f"{'step':40} {'cold':>8} {'warm':>8}")
        print(f"{'copy tree + load XSD':40} {cold_setup:8.2f} {warm_setup:8.2f}")
        for sch in cold_compile:
            print(f"{short(sch):40} {cold_compile[sch]:8.2f} {warm_compile[sch]:8.2f}")
        total_cold = cold_setup + sum(cold_compile.values())
        total_warm = warm_setup + sum(warm_compile.values())
        print(f"{'total':40} {total_cold:8.2f} {total_warm:8.2f}")
        del cold

        xsd = etree.XMLSchema(etree.parse(str(validator.work / XSD)))
        summary = []
        for label, path in docs.items():
            data = path.read_bytes()
            start = time.perf_counter()
            report = validator.validate(data)  # the first one also loads the value sets the schematrons read
            first = time.perf_counter() - start
            assert report.valid, report.summary()
            steps: dict[str, list[float]] = {}
            totals = []
            for _ in range(args.runs):
                start = time.perf_counter()
                report = validator.validate(data)
                totals.append(time.perf_counter() - start)
                for key, value in report.timings.items():
                    steps.setdefault(key, []).append(value)
            naive = [naive_once(validator, xsd, path, report.schematrons) for _ in range(args.naive_runs)]
            print(f"\n{label} ({path.stat().st_size // 1024} KiB, {report.document}), ms over {args.runs} runs")
            print(f"{'step':40} {'p50':>9} {'p99':>9}")
            for key in ("xsd", *report.schematrons):
                print(f"{short(key):40} {ms(pct(steps[key], 50))} {ms(pct(steps[key], 99))}")
            other = [
                t - sum(v[i] for k, v in steps.items() if k == "xsd" or k in report.schematrons)
                for i, t in enumerate(totals)
            ]
            print(f"{'(parse + Saxon parse + SVRL reading)':40} {ms(pct(other, 50))} {ms(pct(other, 99))}")
            print(f"{'total validate()':40} {ms(pct(totals, 50))} {ms(pct(totals, 99))}")
            print(f"{'first validate() of this document':40} {ms(first)}")
            print(f"{f'naive, {args.naive_runs} runs':40} {ms(pct(naive, 50))} {ms(max(naive))}")
            summary.append((label, pct(totals, 50), pct(naive, 50)))

    print("\nSummary (p50 per document)")
    print(f"{'document':48} {'CDAValidator ms':>15} {'naive ms':>10} {'ratio':>7}")
    for label, ours, naive_p50 in summary:
        print(f"{label:48} {ours * 1000:15.1f} {naive_p50 * 1000:10.1f} {naive_p50 / ours:6.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
