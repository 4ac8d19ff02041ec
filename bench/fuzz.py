"""The long fuzz campaign of the engine's network inputs, one table line per surface.

Each surface's campaign lives beside this file (``fuzz_mllp.py``, ``fuzz_dicom.py``, ``fuzz_http.py``): a real
listener on loopback, generated hostile inputs, and per input an answer expected within a bounded time (an ACK, a
DICOM status, an HTTP 4xx), the listener still serving the next valid request. The suite runs the same
generators briefly (tests/test_fuzz_*.py); this runs them long and prints what docs/performance.md records.

    python bench/fuzz.py [--inputs 10000] [--surface mllp --surface dicom --surface http]
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SURFACES = {"mllp": "fuzz_mllp", "dicom": "fuzz_dicom", "http": "fuzz_http"}


def generation_only(n: int) -> Callable[[Any], Any]:
    """The hypothesis settings of a campaign: ``n`` generated inputs, a crash counted (not shrunk), no database."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(
        max_examples=n, deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
    )


def surface_main(campaign: Callable[[int], dict[str, Any]], doc: str) -> None:
    """A surface's script entry point: ``--inputs N``, the campaign's figures as one JSON line."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    print(json.dumps(campaign(parser.parse_args().inputs)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="inputs per surface")
    parser.add_argument("--surface", action="append", choices=sorted(SURFACES), help="default: all")
    args = parser.parse_args()
    surfaces = args.surface or list(SURFACES)
    print(f"# {platform.node()} · {platform.processor() or platform.machine()} · Python {platform.python_version()}")
    print(f"| {'surface':24} | {'inputs':>7} | {'answered':>8} | {'crashes':>7} | {'slowest ms':>10} | {'s':>6} |")
    print(f"|{'-' * 26}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 12}|{'-' * 8}|")
    worst = 0
    for name in surfaces:
        module = importlib.import_module(SURFACES[name])
        started = time.monotonic()
        result = module.campaign(args.inputs)
        elapsed = time.monotonic() - started
        print(
            f"| {result['surface']:24} | {result['inputs']:>7} | {result['answered']:>8} | {result['crashes']:>7} "
            f"| {result['slowest_ms']:>10.1f} | {elapsed:>6.0f} |",
            flush=True,
        )
        worst = worst or int(result["crashes"] > 0)
    return worst


if __name__ == "__main__":
    sys.exit(main())
