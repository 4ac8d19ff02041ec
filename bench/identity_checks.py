"""Patient identity registry benchmark (SQLite): the cost of the usual order's identity checks and record, in µs per
order, on the event loop as the orders channel makes them.

For each order (ORM^O01 as mapped: an IPP of CHU-LYON and an INS, its own accession, placer and filler numbers),
the checks are either the four calls (`resolve_merged`, `check`, `check_report`, `check_order`) or `admit`; a
window of orders stays in flight (checked, not yet recorded: the channel's concurrent messages) and the oldest is
recorded when a new one comes. The owners of order keys are written as in the engine: every `OWNERS_FLUSH` seconds
by a thread of the loop's pool, on their own connection (each commit empties the reading connection's page cache).
Two cases: every order names the same patient, or each its own (a new IPP and INS: its record writes the pair,
``synchronous=FULL``). ``--recorded N``: the registry holds N other patients first (an INS and an order each), as a
site's does after a while. Wall time and CPU time of the loop's thread, per call.

    .venv/bin/python bench/identity_checks.py [--orders 4000] [--in-flight 8] [--recorded 0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.model import Identifier, ImagingOrder, Patient  # noqa: E402
from traboule.stores.patient_identity import PatientIdentities  # noqa: E402


def nir(n: int) -> str:
    """A valid INS-NIR (its key computed), one per ``n``."""
    body = f"{1790375000000 + n:013d}"
    return f"{body}{97 - int(body) % 97:02d}"


def order(i: int, *, same_patient: bool) -> ImagingOrder:
    who = 0 if same_patient else i
    patient = Patient(
        ids=[
            Identifier(f"IPP{who:07d}", "CHU-LYON", "1.2.250.1.999.1.1", "PI"),
            Identifier(nir(who), "ASIP-SANTE-INS-NIR", "1.2.250.1.213.1.4.10", "INS"),
        ]
    )
    return ImagingOrder(
        patient=patient,
        accession_number=Identifier(f"ACC{i:08d}", "CHU-LYON"),
        placer_order_number=Identifier(f"PLC{i:08d}", "RIS"),
        filler_order_number=Identifier(f"FIL{i:08d}", "PACS"),
    )


def prefill(path: Path, n: int) -> None:
    """``n`` other patients recorded (their pairs and their orders' keys), written at once."""
    if not n:
        return
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO ins VALUES (?, '1.2.250.1.999.1.1', 'CHU-LYON', '1.2.250.1.213.1.4.10', ?, '')",
        ((f"OLD{i:08d}", nir(10_000_000 + i)) for i in range(n)),
    )
    db.executemany(
        "INSERT INTO owners VALUES (?, ?, '[]', 'order', '')",
        ((kind, f"OLD{kind[:3]}{i:08d}") for i in range(n) for kind in ("accession", "placer", "filler")),
    )
    db.execute("COMMIT")
    db.close()


def four_calls(registry: PatientIdentities, payloads: list[Any]) -> None:
    registry.resolve_merged(payloads)
    registry.check(payloads)
    registry.check_report(payloads)
    registry.check_order(payloads)


def admit(registry: PatientIdentities, payloads: list[Any]) -> None:
    if not registry.admit(payloads):
        raise SystemExit("admit declined the usual order")


class Timer:
    """Wall and CPU time (the calling thread's) of the calls it times, in µs each."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        call(*args, **kwargs)
        self.cpu.append((time.thread_time_ns() - cpu) / 1000)
        self.wall.append((time.perf_counter_ns() - wall) / 1000)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.wall), statistics.median(self.cpu)


async def run(
    path: Path, checks: Callable[[PatientIdentities, list[Any]], None], args: Any, same: bool
) -> tuple[Timer, Timer]:
    """One run on a new registry file: the timers of the checks and of the records."""
    PatientIdentities(path).close()  # its tables
    prefill(path, args.recorded)
    registry = PatientIdentities(path)
    try:
        warm = max(args.orders // 10, args.in_flight)  # not counted: the files' first pages, the statement cache
        checked, recorded = Timer(), Timer()
        flight: deque[list[Any]] = deque()
        for i in range(warm + args.orders):
            payloads: list[Any] = [order(i, same_patient=same)]
            counted = i >= warm
            (checked if counted else Timer())(checks, registry, payloads)
            flight.append(payloads)
            if len(flight) > args.in_flight:
                (recorded if counted else Timer())(
                    registry.record, flight.popleft(), channel="ris-orders", journal_id=i
                )
            await asyncio.sleep(0)  # the loop's turn: the owners' flush when due
        while flight:
            registry.record(flight.popleft())
    finally:
        registry.close()
    return checked, recorded


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=4000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--recorded", type=int, default=0, help="other patients recorded before")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each way, in turn (the best median is kept)")
    parser.add_argument("--dir", default=None, help="where the registry files are made (default: the temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for same in (True, False):
            who = "one patient" if same else "each its own"
            print(f"{args.orders} orders, {args.in_flight} in flight, {who}, {args.recorded} other patients recorded")
            print(f"  median µs per order, best of {args.rounds} runs    checks wall / cpu    record wall / cpu")
            best: dict[str, list[tuple[float, float]]] = {}
            for n in range(args.rounds):
                for checks in (four_calls, admit):
                    timers = await run(
                        Path(folder) / f"patients-{same}-{n}-{checks.__name__}.sqlite", checks, args, same
                    )
                    found = [t.medians() for t in timers]
                    best[checks.__name__] = [
                        min(pair) for pair in zip(best.get(checks.__name__, found), found, strict=True)
                    ]
            for name, ((checks_wall, checks_cpu), (record_wall, record_cpu)) in best.items():
                print(
                    f"  {name.replace('_', ' '):<36} {checks_wall:7.1f} / {checks_cpu:5.1f}"
                    f"       {record_wall:7.1f} / {record_cpu:5.1f}"
                )


if __name__ == "__main__":
    asyncio.run(main())
