"""Audit trail benchmark: the cost of one audited HL7 order in the ingest process, per step, in µs per event.

Compares the DICOM audit message written as text (`traboule.audit.message.encode`) with the lxml tree the engine
built before (`tests.audit_reference`, the bytes the test suite checks the new encoder against), the file's JSON
line, and the writer's whole path (`AuditTrail._write`: encode, line, append, fsync per batch) in CPU time of the
writer's thread (what it takes from the interpreter shared with the event loop; the fsync's wait is not counted)
and in wall time. Also the caller's side on the event loop: making the event (`audit.message_received` with the
values `channels.orders` gives it) and `AuditTrail.record`.

    .venv/bin/python bench/audit_encode.py [--events 20000] [--batch 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import audit_reference  # noqa: E402
from traboule import audit  # noqa: E402
from traboule.app import audit_trail  # noqa: E402
from traboule.app.audit_trail import AuditTrail  # noqa: E402
from traboule.app.config import Config  # noqa: E402
from traboule.audit.message import AuditSource, encode  # noqa: E402

SOURCE = AuditSource("engine-1", "CHU-LYON", "TRABOULE", "ris-gw.example")


def order_event(i: int = 0) -> audit.AuditEvent:
    """An ORM^O01 NW as `channels.orders` audits it: the sender, two patient identifiers, the message, the order,
    the accession and the study."""
    source = audit.actor("RIS|CHU", "10.1.2.3", "")
    return audit.message_received(
        "order",
        "C",
        source=source,
        patients=audit.patient_refs([(f"IPP{i:07d}", "1.2.250.1.999.1.1"), ("279035121518989", "1.2.250.1.213.1.4.8")]),
        objects=(
            audit.object_ref("message", f"MSG{i:08d}"),
            audit.object_ref("order", f"ORD{i}"),
            audit.object_ref("accession", f"ACC{i}"),
            audit.object_ref("study", f"1.2.250.1.999.2.3.4.{i}"),
        ),
        transaction="RAD-2",
    )


def per_call(function: Callable[[], Any], n: int) -> float:
    """CPU µs per call of ``function`` (best of 3 runs of ``n``; CPU time: other loads on the machine count less)."""
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        for _ in range(n):
            function()
        best = min(best, time.thread_time() - start)
    return best / n * 1e6


def old_line(event: audit.AuditEvent, xml: bytes, pid: int) -> bytes:
    """The file's line as it was written before: one json.dumps of the record per event."""
    record = {
        "at": audit_reference.event_time(event.at),
        "kind": event.kind,
        "action": event.action,
        "outcome": int(event.outcome),
        "transaction": event.transaction,
        "pid": pid,
        "xml": xml.decode("utf-8"),
    }
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def writer(events: list[audit.AuditEvent], batch: int, *, old: bool) -> tuple[float, float]:
    """(CPU µs, wall µs) per event of the writer's path, batches of ``batch`` events to a fresh file."""
    saved = audit_trail.encode, audit_trail._line
    if old:
        audit_trail.encode, audit_trail._line = audit_reference.encode, old_line
    try:
        with tempfile.TemporaryDirectory() as data_dir:
            trail = AuditTrail(Config(data_dir=data_dir), relay=False)
            trail._write(events[:1])
            cpu, wall = time.thread_time(), time.perf_counter()
            for start in range(0, len(events), batch):
                trail._write(events[start : start + batch])
            cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
            trail._release()
    finally:
        audit_trail.encode, audit_trail._line = saved
    return cpu / len(events) * 1e6, wall / len(events) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100, help="events per writer batch (one fsync each)")
    args = parser.parse_args()
    n = args.events
    events = [order_event(i) for i in range(n)]
    event = events[0]
    xml = encode(event, SOURCE)
    assert xml == audit_reference.encode(event, SOURCE)
    assert audit_trail._line(event, xml, 1) == old_line(event, xml, 1)

    rows = [
        ("encode (DICOM audit XML)", per_call(lambda: audit_reference.encode(event, SOURCE), n // 4),
         per_call(lambda: encode(event, SOURCE), n)),
        ("file line (JSON)", per_call(lambda: old_line(event, xml, 1), n),
         per_call(lambda: audit_trail._line(event, xml, 1), n)),
    ]  # fmt: skip
    old_cpu, old_wall = writer(events[: n // 4], args.batch, old=True)
    new_cpu, new_wall = writer(events, args.batch, old=False)
    rows.append((f"writer path, CPU (batch {args.batch})", old_cpu, new_cpu))
    rows.append((f"writer path, wall with fsync (batch {args.batch})", old_wall, new_wall))

    print(f"audit trail, µs per event ({n} ORM^O01 order events, {len(xml)} bytes of XML each)")
    print(f"{'':50} {'before':>9} {'after':>9} {'ratio':>7}")
    for name, before, after in rows:
        print(f"{name:50} {before:9.2f} {after:9.2f} {before / after:6.1f}x")

    making = per_call(lambda: order_event(7), n)
    with tempfile.TemporaryDirectory() as data_dir:
        trail = AuditTrail(Config(data_dir=data_dir), relay=False)
        recording = float("inf")
        for _ in range(5):  # 2000 at a time: within the buffer, done before the writer's next batch
            start = time.thread_time()
            for recorded in events[:2000]:
                trail.record(recorded)
            recording = min(recording, (time.thread_time() - start) / 2000 * 1e6)
            assert trail.flush(30)
        assert not trail.dropped
        trail._release()
    print(f"{'making the event (caller, event loop)':50} {making:9.2f}")
    print(f"{'AuditTrail.record (caller, event loop)':50} {recording:9.2f}")


if __name__ == "__main__":
    main()
