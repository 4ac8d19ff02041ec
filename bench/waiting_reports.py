"""Reports waiting for their study: what they cost the ingest process while they wait.

With ``--waiting`` structured reports waiting (default 10,000, each for its own accession number, none of whose
study is known), the channel's waiting task (``WaitingReports``: publisher, journal, one executor thread, as the
orders channel runs it, no archive) is started in this process and measured with the process's CPU time (every
thread: the event loop and the executor):

1. idle: ``--seconds`` with nothing happening (after the first pass at start, which is measured apart);
2. MPPS: ``--seconds`` of completed performed steps with their series, ``--rate`` per second, each written and
   announced as the orders channel does for a batch of ``procedure.*`` events (``remember`` then ``wake``); one in
   ``--match`` is for the accession number of a waiting report (which is then published into its journal entry),
   the others for exams whose report has not come.

Prints a table: CPU seconds per minute idle, CPU milliseconds per MPPS (above idle), the first pass, and how many
reports were published. The rows are written straight into the reports store (the first one by ``prepare``, the
others copies of it with their own accession numbers): building 10,000 CDAs would take minutes and measure nothing
of interest here.

To compare with another version of the code, run it from that tree (``PYTHONPATH=/path/to/tree``): the script
adapts to the older ``wake()`` without arguments.

    .venv/bin/python bench/waiting_reports.py [--waiting 10000] [--seconds 60] [--rate 2] [--match 10]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after PYTHONPATH: a tree given there is the one measured

import traboule  # noqa: E402
from traboule import model  # noqa: E402
from traboule.channels.waiting_reports import WaitingReports  # noqa: E402
from traboule.formats import hl7  # noqa: E402
from traboule.stores.journal import Journal, JournalEntry  # noqa: E402
from traboule.stores.reports import ReportPublisher, request_publication  # noqa: E402
from traboule.translate.cda import CDAMapping  # noqa: E402
from traboule.translate.hl7_mapping import HL7InboundMapping  # noqa: E402

FIXTURE = ROOT / "fixtures" / "hl7" / "oru_r01_report.hl7"


def fill(publisher: ReportPublisher, waiting: int) -> None:
    """``waiting`` reports waiting, for accession numbers W00000...: one prepared, the others copied."""
    report = HL7InboundMapping().map(hl7.parse(hl7.decode(FIXTURE.read_bytes()).text))[0]
    report.accession_number.value = "W00000"
    assert publisher.prepare(report, "k00000").__class__.__name__ == "Waiting"
    db = publisher._db
    (text, deadline) = db.execute("SELECT report, deadline FROM waiting WHERE message_key = 'k00000'").fetchone()
    rows = [
        (f"k{i:05}", f"acc:W{i:05}", f"W{i:05}", "", "2026-12-05T00:00:00+00:00", deadline, "waiting",
         text.replace('"W00000"', f'"W{i:05}"'))
        for i in range(1, waiting)
    ]  # fmt: skip
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO waiting (message_key, set_key, accession, study_uid, received, deadline, status, report)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    db.execute("COMMIT")


def step(n: int, accession: str) -> model.PerformedStep:
    uid = f"1.2.826.0.1.3680043.10.1001.77.{n}"
    series = model.Series(
        f"{uid}.1", "1", "CT", instances=[model.Instance(f"{uid}.1.{i}", "1.2.840.10008.5.1.4.1.1.2") for i in (1, 2)]
    )
    return model.PerformedStep(
        f"{uid}.9",
        "COMPLETED",
        uid,
        accession,
        patient=model.Patient(ids=[model.Identifier("IPP0001", "CHU-LYON", type="PI")]),
        ended="20261125094801",
        series=[series],
    )


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, float]:
    publisher = ReportPublisher(CDAMapping(), folder / "reports.sqlite")
    journal = Journal(folder / "journal.sqlite")
    started = time.perf_counter()
    fill(publisher, args.waiting)
    matched = [f"k{i:05}" for i in range(0, args.waiting, max(1, args.waiting // 1000))][:1000]
    for key in matched:  # the journal entries of the reports that may be published
        await journal.append(JournalEntry("ris-orders", b"MSH|", "accepted", idempotency_key=key))
    print(f"{args.waiting} waiting reports written in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    executor = ThreadPoolExecutor(1)
    task = WaitingReports("ris-orders", publisher, journal, executor)
    targeted = len(inspect.signature(task.wake).parameters) > 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    task.start()
    await asyncio.sleep(args.settle)  # the first pass at start
    first = time.process_time() - cpu0
    cpu1 = time.process_time()
    await asyncio.sleep(args.seconds)
    idle = (time.process_time() - cpu1) / args.seconds * 60
    cpu2, sent, n = time.process_time(), 0, 0
    loop = asyncio.get_running_loop()
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        n += 1
        accession = f"X{n:06}"  # an exam whose report has not come
        if n % args.match == 0:  # the exam of a waiting report
            accession = "W" + matched[(n // args.match) % len(matched)][1:]
        payloads = [step(n, accession)]
        await loop.run_in_executor(None, publisher.remember, payloads)  # as _observe: asyncio.to_thread
        if targeted:
            task.wake([p.study_instance_uid for p in payloads], [p.accession_number for p in payloads])
        else:
            task.wake()
        sent += 1
        await asyncio.sleep(1 / args.rate)
    await asyncio.sleep(3)  # the last wake handled
    busy = time.process_time() - cpu2
    per_mpps = (busy - idle / 60 * (args.seconds + 3)) / sent * 1000
    published = len(publisher.waiting(("published",)))
    # The operator's `traboule reports publish N` for the last report, whose study is known (no wake said so):
    # until it is published.
    last = args.waiting - 1
    await journal.append(JournalEntry("ris-orders", b"MSH|", "accepted", idempotency_key=f"k{last:05}"))
    await loop.run_in_executor(None, publisher.remember, [step(10**6, f"W{last:05}")])
    asked = time.perf_counter()
    request_publication(publisher.path, last + 1)  # rows are numbered from 1
    while publisher._db.execute("SELECT status FROM waiting WHERE n = ?", (last + 1,)).fetchone()[0] == "waiting":
        await asyncio.sleep(0.02)
    request = time.perf_counter() - asked
    await task.stop()
    executor.shutdown()
    journal.close()
    publisher.close()
    return {
        "first": first,
        "idle": idle,
        "per_mpps": per_mpps,
        "mpps_cpu_per_min": busy / (args.seconds + 3) * 60,
        "sent": sent,
        "published": published,
        "request": request,
        "wall": time.perf_counter() - wall0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measure")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds left to the first pass at start")
    parser.add_argument("--rate", type=float, default=2.0, help="MPPS per second")
    parser.add_argument("--match", type=int, default=10, help="one MPPS in this many is for a waiting report")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    print(f"traboule from {Path(traboule.__file__).parent.parent}, {args.waiting} waiting reports, no archive")
    print(f"| {'measure':44} | {'value':>10} |")
    print(f"|{'-' * 46}|{'-' * 12}|")
    print(f"| {'first pass at start (CPU s, within --settle)':44} | {result['first']:>10.2f} |")
    print(f"| {'idle: CPU s per minute':44} | {result['idle']:>10.3f} |")
    print(f"| {f'MPPS at {args.rate:g}/s: CPU s per minute':44} | {result['mpps_cpu_per_min']:>10.2f} |")
    print(f"| {'CPU ms per MPPS (above idle)':44} | {result['per_mpps']:>10.2f} |")
    print(f"| {'MPPS sent / reports published':44} | {result['sent']:>4} / {result['published']:<3} |")
    print(f"| {'reports publish N: published after (s)':44} | {result['request']:>10.2f} |")


if __name__ == "__main__":
    main()
