"""The channels' own states on SQLite read the files earlier versions wrote, as they are: a site upgraded in place
keeps its MPPS instances, its XDS submissions, its known orders, pending documents and sent-message marks. A
document claimed by another delivery waits its turn on the bus without using up its attempts."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tests.conftest import shared_path
from tests.test_flow import until
from tests.test_xds import channel_config, level3, publish
from tests.xds_endpoint import XDSEndpoint, make_pki
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.bus.retry import HELD_ELSEWHERE_DELAY, Retry, RetryPolicy
from traboule.errors import HeldElsewhere
from traboule.stores.factory import SQLiteStores
from traboule.stores.idempotency import Legacy
from traboule.stores.mpps_state import MPPSInstance
from traboule.stores.sender_state import KnownOrder
from traboule.stores.submissions import SQLiteSubmissions, Submission

# The tables as the channels created them before the stores existed (channels/mpps.py, xds.py, hl7_status.py,
# hl7_documents.py, with the marks' earlier ``sent`` table).
EARLIER = {
    "mpps": """
        CREATE TABLE mpps (uid TEXT PRIMARY KEY, status TEXT NOT NULL, dataset BLOB NOT NULL, updated TEXT NOT NULL);
        INSERT INTO mpps VALUES ('1.2.3', 'IN PROGRESS', x'08002000', '2026-01-01T10:00:00.000+00:00');
    """,
    "dmp": """
        CREATE TABLE entries (
            unique_id TEXT PRIMARY KEY, entry_uuid TEXT NOT NULL UNIQUE, set_id TEXT NOT NULL, status TEXT NOT NULL,
            submission_set TEXT NOT NULL DEFAULT '', updated TEXT NOT NULL
        );
        INSERT INTO entries VALUES ('1.2.3.1', 'urn:uuid:a', 'set', 'registered', '1.2.9.1', '2026-01-01T10:00');
        INSERT INTO entries VALUES ('1.2.3.2', 'urn:uuid:b', 'set', 'sending', '', '2026-01-01T10:01');
    """,
    "ris-status": """
        CREATE TABLE orders (
            accession TEXT PRIMARY KEY, placer TEXT NOT NULL, filler TEXT NOT NULL, patient_id TEXT NOT NULL,
            study_uid TEXT NOT NULL
        );
        INSERT INTO orders VALUES ('ACC1', 'P1^RIS', 'F1^PACS', 'IPP1^^^CHU^PI', '1.2.3');
        CREATE TABLE sent (idempotency_key TEXT PRIMARY KEY, control_id TEXT NOT NULL, sent_at TEXT NOT NULL);
        INSERT INTO sent VALUES ('mpps|1.2.3|COMPLETED', 'S0001', '2026-01-01T10:00:00');
    """,
    "drimbox": """
        CREATE TABLE applied (
            idempotency_key TEXT PRIMARY KEY, applied_at TEXT NOT NULL, detail TEXT NOT NULL DEFAULT ''
        ) WITHOUT ROWID;
        INSERT INTO applied VALUES ('event-1', '2026-01-01T10:00:00', 'D0001');
        CREATE TABLE pending (document_id TEXT PRIMARY KEY);
        INSERT INTO pending VALUES ('doc-2');
    """,
}


async def test_the_files_of_an_earlier_version_are_read_as_they_are(tmp_path: Path) -> None:
    for name, script in EARLIER.items():
        db = sqlite3.connect(tmp_path / f"{name}.sqlite")
        db.executescript(script)
        db.close()
    stores = SQLiteStores(tmp_path)
    mpps, submissions = stores.mpps_states("mpps"), stores.submissions("dmp")
    status = stores.sender_state("ris-status", legacy=[Legacy("sent", "idempotency_key", "sent_at", "control_id")])
    documents = stores.sender_state("drimbox")
    try:
        assert mpps.get("1.2.3") == MPPSInstance("IN PROGRESS", b"\x08\x00\x20\x00")
        async with mpps.hold("1.2.3") as held:
            held.save("COMPLETED", b"")
        assert mpps.get("1.2.3") == MPPSInstance("COMPLETED", b"")
        assert submissions.get("1.2.3.1") == Submission("1.2.3.1", "urn:uuid:a", "registered")
        assert submissions.begin("1.2.3.2", "urn:uuid:new", "set").entry_uuid == "urn:uuid:b"  # a retry: the same
        assert status.known_order("ACC1") == KnownOrder("P1^RIS", "F1^PACS", "IPP1^^^CHU^PI", "1.2.3")
        assert status.is_done("mpps|1.2.3|COMPLETED") and status.detail("mpps|1.2.3|COMPLETED") == "S0001"
        assert documents.is_done("event-1") and documents.is_pending("doc-2")
        assert documents.mark_done("event-2", "D0002", clear_pending="doc-2") and not documents.is_pending("doc-2")
    finally:
        for store in (mpps, submissions, status, documents):
            store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".sqlite") == [
        f"{name}.sqlite" for name in sorted(EARLIER)
    ]


def test_a_delivery_finding_its_document_claimed_is_retried_without_counting_an_attempt() -> None:
    policy = RetryPolicy(max_attempts=2, backoff=0.2)
    error = HeldElsewhere("document 1.2.3 is being sent by another delivery: retried later")
    assert policy.after_failure(error, 2) == Retry(f"HeldElsewhere: {error}", 2, HELD_ELSEWHERE_DELAY)


async def test_a_document_claimed_by_another_delivery_waits_its_turn_and_is_not_dead_lettered(tmp_path: Path) -> None:
    """Another delivery of the document holds its claim (in its own retry loop, which may last minutes): this one
    goes back to the bus, uncounted, for longer than its attempts would last (two attempts, 0.2 s apart), never to
    the dead letters; once the claim is released it is sent, once."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    endpoint = XDSEndpoint(pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    data = tmp_path / "data"
    runtime = Runtime(Config(data_dir=str(data), channels=[channel_config(pki, endpoint, max_attempts=2)]))
    await runtime.start()
    other = SQLiteSubmissions(data / "dmp.sqlite")  # the other delivery's store: claims are the file's
    doc = level3()
    claim = other.claim(doc.id)
    try:
        assert claim.__enter__() is True
        await publish(runtime, doc)
        await asyncio.sleep(HELD_ELSEWHERE_DELAY + 1.0)
        assert endpoint.received == []
        assert await runtime.bus.dead_letters("dmp") == []
        claim.__exit__(None, None, None)
        await until(lambda: len(endpoint.accepted()) == 1, timeout=15)
        await until(lambda: runtime.channel("dmp").entry(doc.id).status == "registered")  # type: ignore[attr-defined]
        assert await runtime.bus.dead_letters("dmp") == [] and len(endpoint.received) == 1
    finally:
        other.close()
        await runtime.stop()
        endpoint.stop()
