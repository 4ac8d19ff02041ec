"""The stores' contracts (`traboule.stores`), run against every backend the project has.

Each test pins a guarantee a protocol's docstring states, through the protocol's methods only, so that a second
backend passes the same file: add its name to ``BACKENDS`` with a factory like `SQLiteBackend`. What one backend's
own tests already pin (PS3.4 matching, FHIR search parameters, report versions, INS rules) is not repeated here.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from tests.conftest import ROOT
from tests.peer_dcmtk import mwl_item
from tests.test_flow import fixture
from traboule import model, stores
from traboule.errors import MappingFailure, SearchError
from traboule.formats.fhir_codes import IS_DELETED
from traboule.stores.fhir_store import SQLiteFHIRStore
from traboule.stores.journal import JournalEntry, OutboxEvent, Query, SQLiteJournal
from traboule.stores.mpps_state import MPPSInstance, SQLiteMPPSStates
from traboule.stores.patient_identity import PatientIdentities
from traboule.stores.reports import Held, ReportPublisher
from traboule.stores.sender_state import KnownOrder, SQLiteSenderState
from traboule.stores.submissions import SQLiteSubmissions, Submission
from traboule.stores.worklist import SQLiteWorklistStore
from traboule.translate.cda import CDAMapping

pytestmark = pytest.mark.timeout(60)


class SQLiteBackend:
    """Every store on SQLite files in one folder; each call opens the store anew (a restart opens the same data)."""

    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def journal(self) -> stores.Journal:
        return SQLiteJournal(self.folder / "journal.sqlite", min_free_bytes=0)

    def worklist(self) -> stores.WorklistStore:
        return SQLiteWorklistStore(str(self.folder / "worklist.sqlite"))

    def fhir(self) -> stores.FHIRStore:
        return SQLiteFHIRStore(str(self.folder / "fhir.sqlite"))

    def reports(self) -> stores.ReportStore:
        return ReportPublisher(CDAMapping(), self.folder / "ris-orders.reports.sqlite")  # no CDA validator

    def registry(self) -> stores.PatientRegistry:
        return PatientIdentities(self.folder / "patients.sqlite")

    def mpps_states(self, channel: str = "mpps") -> stores.MPPSStates:
        return SQLiteMPPSStates(self.folder / f"{channel}.sqlite")

    def submissions(self, channel: str = "dmp") -> stores.SubmissionStore:
        return SQLiteSubmissions(self.folder / f"{channel}.sqlite")

    def sender_state(self, channel: str = "drimbox") -> stores.SenderState:
        return SQLiteSenderState.open(self.folder / f"{channel}.sqlite")


class PostgresBackend:
    """The stores PostgreSQL has, in one fresh database per test (the ``pg_url`` fixture). The URL is also written
    into ``folder``, so that a child process given only the folder (``BACKENDS[name](folder)``) opens the same
    database; a store without a PostgreSQL implementation skips its tests."""

    name = "postgresql"
    fixtures = ("pg_url",)  # what `backend` passes besides the folder

    def __init__(self, folder: Path, pg_url: str | None = None) -> None:
        self.folder = folder
        if pg_url is None:
            pg_url = (folder / "postgresql.url").read_text()
        else:
            (folder / "postgresql.url").write_text(pg_url)
        self.url = pg_url

    def journal(self) -> stores.Journal:
        from traboule.stores.postgres.journal import PostgresJournal

        return PostgresJournal(self.url)

    def worklist(self) -> stores.WorklistStore:
        from traboule.stores.postgres.worklist import PostgresWorklistStore

        return PostgresWorklistStore(self.url)

    def fhir(self) -> stores.FHIRStore:
        from traboule.stores.postgres.fhir_store import PostgresFHIRStore

        return PostgresFHIRStore(self.url)

    def reports(self) -> stores.ReportStore:
        from traboule.stores.postgres.reports import PostgresReportStorage

        return ReportPublisher(CDAMapping(), PostgresReportStorage(self.url, "ris-orders"))  # no CDA validator

    def registry(self) -> stores.PatientRegistry:
        from traboule.stores.postgres.patient_identity import PostgresPatientRegistry

        return PostgresPatientRegistry(self.url)

    def mpps_states(self, channel: str = "mpps") -> stores.MPPSStates:
        from traboule.stores.postgres.mpps_state import PostgresMPPSStates

        return PostgresMPPSStates(self.url, channel)

    def submissions(self, channel: str = "dmp") -> stores.SubmissionStore:
        from traboule.stores.postgres.submissions import PostgresSubmissions

        return PostgresSubmissions(self.url, channel)

    def sender_state(self, channel: str = "drimbox") -> stores.SenderState:
        from traboule.stores.postgres.sender_state import PostgresSenderState

        return PostgresSenderState(self.url, channel)


# name → factory(folder, **fixtures named by its ``fixtures``): one entry per backend
BACKENDS: dict[str, Any] = {"sqlite": SQLiteBackend, "postgresql": PostgresBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SQLiteBackend:
    factory = BACKENDS[request.param]
    return factory(tmp_path, **{name: request.getfixturevalue(name) for name in getattr(factory, "fixtures", ())})


PROTOCOLS = {
    "journal": stores.Journal,
    "worklist": stores.WorklistStore,
    "fhir": stores.FHIRStore,
    "reports": stores.ReportStore,
    "registry": stores.PatientRegistry,
    "mpps_states": stores.MPPSStates,
    "submissions": stores.SubmissionStore,
    "sender_state": stores.SenderState,
}


@pytest.mark.parametrize("kind", sorted(PROTOCOLS))
async def test_each_store_implements_its_whole_protocol(backend: SQLiteBackend, kind: str) -> None:
    """Every method the protocol names, with the same parameters (names, kinds, defaults): a caller written against
    the protocol works with any backend."""
    protocol = PROTOCOLS[kind]
    store = getattr(backend, kind)()
    try:
        assert isinstance(store, protocol)
        for name, member in vars(protocol).items():
            if name.startswith("_") or not callable(member):
                continue
            wanted = inspect.signature(member).parameters
            found = inspect.signature(getattr(type(store), name)).parameters
            assert [(p.name, p.kind, p.default) for p in wanted.values()] == [
                (p.name, p.kind, p.default) for p in found.values()
            ], f"{type(store).__name__}.{name}"
            assert inspect.iscoroutinefunction(member) == inspect.iscoroutinefunction(getattr(store, name)), name
    finally:
        store.close()


# -- journal ------------------------------------------------------------------------------------------------------

_KILLED_AFTER_ACK = """
import asyncio, sys
from pathlib import Path
from tests.test_store_contracts import BACKENDS
from traboule.stores.journal import JournalEntry, OutboxEvent

async def main():
    journal = BACKENDS[sys.argv[1]](Path(sys.argv[2])).journal()
    entry = JournalEntry("ris-orders", b"MSH|acked", "accepted", idempotency_key="k1")
    written = await journal.append(entry, [OutboxEvent("order.new", "e1", b"{}")])
    print(written.id, flush=True)  # the ACK goes out now
    await asyncio.sleep(60)  # killed here: never closed

asyncio.run(main())
"""


async def test_an_entry_journaled_before_append_returns_survives_a_kill(backend: SQLiteBackend) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_AFTER_ACK, backend.name, str(backend.folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = child.stdout.readline() if child.stdout else b""
    finally:
        child.kill()  # kill -9 right after the answer
        _, err = child.communicate(timeout=10)
    assert line.strip().isdigit(), err.decode()
    journal = backend.journal()
    try:
        entry = journal.get(int(line))
        assert entry is not None and entry.raw == b"MSH|acked" and entry.status == "accepted"
        assert [e.event_id for e in journal.pending_events()] == ["e1"]
        assert journal.accepted("k1")
    finally:
        journal.close()


async def test_the_same_message_twice_is_a_duplicate_without_events(backend: SQLiteBackend) -> None:
    journal = backend.journal()
    try:
        first = await journal.append(JournalEntry("ch", b"one", "accepted", idempotency_key="k"), [_event("e1")])
        again = await journal.append(JournalEntry("ch", b"one", "accepted", idempotency_key="k"), [_event("e2")])
        refused = await journal.append(JournalEntry("ch", b"bad", "rejected", idempotency_key="r"), [_event("e3")])
        assert (first.status, again.status, refused.status) == ("accepted", "duplicate", "rejected")
        assert str(first.id) in again.warnings
        assert [e.event_id for e in journal.pending_events()] == ["e1"]  # neither the duplicate's nor the refusal's
        assert journal.accepted("k") and not journal.accepted("r")
        assert first.id < again.id < refused.id
    finally:
        journal.close()


async def test_the_outbox_gives_events_in_journal_order_until_confirmed(backend: SQLiteBackend) -> None:
    journal = backend.journal()
    try:
        journal.outbox_ready.clear()
        a = await journal.append(
            JournalEntry("ch", b"a", "accepted", idempotency_key="a"), [_event("a1"), _event("a2")]
        )
        assert journal.outbox_ready.is_set()
        await journal.append(JournalEntry("ch", b"b", "accepted", idempotency_key="b"), [_event("b1")])
        pending = journal.pending_events()
        assert [e.event_id for e in pending] == ["a1", "a2", "b1"] and journal.outbox_depth() == 3
        assert [e.event_id for e in journal.outbox_of(a.id)] == ["a1", "a2"]
        await journal.events_published([pending[0].id])
        assert [e.event_id for e in journal.pending_events()] == ["a2", "b1"]  # at once, before any commit
        assert journal.outbox_depth() == 2
    finally:
        journal.close()
    journal = backend.journal()  # close commits the confirmation
    try:
        assert [e.event_id for e in journal.pending_events()] == ["a2", "b1"]
    finally:
        journal.close()


async def test_events_added_to_an_accepted_entry_and_only_to_one(backend: SQLiteBackend) -> None:
    journal = backend.journal()
    try:
        entry = await journal.append(JournalEntry("ch", b"report", "accepted", idempotency_key="m"), [_event("m1")])
        await journal.append(JournalEntry("ch", b"refused", "rejected", idempotency_key="x"))
        journal.outbox_ready.clear()
        assert journal.append_events("m", [_event("m2")], "published later") == entry.id
        assert journal.outbox_ready.is_set()
        assert journal.append_events("x", [_event("x1")], "never") == 0  # not accepted: nothing written
        assert journal.append_events("unknown", [_event("u1")]) == 0
        assert [e.event_id for e in journal.pending_events()] == ["m1", "m2"]
        stored = journal.get(entry.id)
        assert stored is not None and "published later" in stored.warnings
    finally:
        journal.close()


async def test_concurrent_appends_are_all_durable_and_paged_in_id_order(backend: SQLiteBackend) -> None:
    journal = backend.journal()
    try:
        written = await asyncio.gather(
            *(journal.append(JournalEntry("ch", b"m%d" % i, "accepted", idempotency_key=f"k{i}")) for i in range(30))
        )
        ids = [e.id for e in written]
        assert len(set(ids)) == 30 and journal.last_id() == max(ids)
    finally:
        journal.close()
    journal = backend.journal()
    try:
        query, after, paged = Query(channels=["ch"]), 0, []
        while page := journal.select(query, after=after, limit=7):
            paged += page
            after = page[-1].id
        assert [e.id for e in paged] == sorted(ids) and journal.count(query) == 30
        assert journal.count(query, after=sorted(ids)[9]) == 20
        assert [e.id for e in journal.recent(3)] == sorted(ids, reverse=True)[:3]
    finally:
        journal.close()


async def test_a_closed_journal_stores_nothing(backend: SQLiteBackend) -> None:
    journal = backend.journal()
    journal.close()
    with pytest.raises(RuntimeError):
        await journal.append(JournalEntry("ch", b"late", "accepted", idempotency_key="late"))
    journal = backend.journal()
    try:
        assert journal.last_id() == 0 and not journal.accepted("late")
    finally:
        journal.close()


async def test_prune_keeps_what_the_outbox_and_the_caller_still_need(backend: SQLiteBackend) -> None:
    old, cutoff = "2026-01-01T00:00:00.000+00:00", "2026-06-01T00:00:00.000+00:00"
    journal = backend.journal()
    try:
        await journal.append(JournalEntry("ch", b"gone", "accepted", idempotency_key="g", received=old))
        await journal.append(JournalEntry("ch", b"kept", "accepted", idempotency_key="kept", received=old))
        await journal.append(JournalEntry("ch", b"queued", "accepted", idempotency_key="q", received=old), [_event()])
        assert journal.prune(cutoff, keep=["kept"]) == 1
        assert sorted(e.raw for e in journal.recent()) == [b"kept", b"queued"]
        assert not journal.accepted("g")  # forgotten: a resend would be new
    finally:
        journal.close()


async def test_a_nul_in_any_text_field_is_stored_as_is_and_fails_nobody_else(backend: SQLiteBackend) -> None:
    """A hostile sender's NUL bytes (MSH-10 and the rest) are journaled exactly, without failing the entries
    committed with them; keys that differ only by control characters stay different."""

    def entry(key: str, status: str = "accepted", raw: bytes = b"MSH|\x00") -> JournalEntry:
        return JournalEntry(
            "ch\x00x", raw, status, peer="10.0.0.1\x00", control_id="A\x00B", message_type="ORM^O01\x00",
            ack_code="AA", error="bad\x00\x01", warnings="w\x00", idempotency_key=key, correlation_id="c\x00\x01\x02",
        )  # fmt: skip

    journal = backend.journal()
    try:
        good = JournalEntry("ch", b"good", "accepted", idempotency_key="good")
        written = await asyncio.gather(  # one group commit
            journal.append(good, [_event("g1")]),
            journal.append(entry("k\x00", raw=b"a"), [_event("n1")]),
            journal.append(entry("k\x01\x01", raw=b"b")),  # what NUL is escaped to: another key
            journal.append(entry("r\x00", "rejected")),
            journal.append(entry("k\x00", raw=b"again")),
        )
        assert [e.status for e in written] == ["accepted", "accepted", "accepted", "rejected", "duplicate"]
        assert journal.accepted("k\x00") and journal.accepted("k\x01\x01") and not journal.accepted("k")
        assert journal.append_events("k\x00", [_event("n2")], "note\x00") == written[1].id
    finally:
        journal.close()
    journal = backend.journal()
    try:
        stored = journal.get(written[1].id)
        assert stored is not None and stored.raw == b"a" and stored.warnings == "w\x00\nnote\x00"
        expected = entry("k\x00", raw=b"a")
        for name in ("channel", "peer", "control_id", "message_type", "error", "idempotency_key", "correlation_id"):
            assert getattr(stored, name) == getattr(expected, name), name
        assert journal.get(written[3].id).idempotency_key == "r\x00"  # type: ignore[union-attr]
        assert [e.id for e in journal.select(Query(channels=["ch\x00x"]))] == [e.id for e in written[1:]]
        assert [e.event_id for e in journal.pending_events()] == ["g1", "n1", "n2"]
        assert journal.prune("9999", keep=["k\x00"]) == 2  # not the kept key, not the ones with events queued
        assert journal.accepted("k\x00") and not journal.accepted("k\x01\x01")
    finally:
        journal.close()


def _event(event_id: str = "e") -> OutboxEvent:
    return OutboxEvent("order.new", event_id, b"{}")


# -- worklist -----------------------------------------------------------------------------------------------------


def test_worklist_applies_a_key_once_even_twice_in_one_batch_and_keeps_the_latest_seq(backend: SQLiteBackend) -> None:
    worklist = backend.worklist()
    try:
        applied = worklist.apply_batch(
            [
                ([("o1#1", mwl_item(accession="A1"))], [], "event-1"),
                ([("o1#1", mwl_item(accession="AGAIN"))], [], "event-1"),  # a redelivery inside the batch
                ([("o2#1", mwl_item(accession="A2"))], [], ""),  # no key: always applied
            ],
            {"o1": 7, "o2": 3},
        )
        assert applied == [True, False, True]
        worklist.apply_batch([([], ["o2#1", "absent"], "event-2")], {"o1": 5})  # an older sequence
        assert worklist.order_seqs(["o1", "o2", "o3"]) == {"o1": 7, "o2": 3}
        assert worklist.applied(["event-1", "event-2", "event-3", ""]) == {"event-1", "event-2"}
    finally:
        worklist.close()
    worklist = backend.worklist()  # a restart: what was applied stays applied
    try:
        assert [(k, ds.AccessionNumber) for k, ds in worklist.all()] == [("o1#1", "A1")]
        assert worklist.apply([("o1#1", mwl_item(accession="REDELIVERED"))], [], "event-1") is False
        assert worklist.order_seqs(["o1"]) == {"o1": 7}
        assert worklist.keys_for_accession("A1") == ["o1#1"] and worklist.count() == 1
    finally:
        worklist.close()


def test_worklist_readers_in_another_store_see_whole_batches(backend: SQLiteBackend) -> None:
    """A reader of the same data (the MWL SCP of another process) sees every batch whole or not at all."""
    writer, reader = backend.worklist(), backend.worklist()
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                seen.append(len(list(reader.find(Dataset()))))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for batch in range(15):
            writer.apply([(f"o{batch}#{step}", mwl_item(accession=f"A{batch}")) for step in range(4)], [])
    finally:
        done.set()
        thread.join()
        writer.close()
        reader.close()
    assert errors == [] and seen
    assert all(n % 4 == 0 for n in seen), sorted(set(seen))


# -- FHIR ---------------------------------------------------------------------------------------------------------


def _patient(rid: str, value: str, system: str = "urn:oid:1.2.250.1.999.1.1") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": rid, "identifier": [{"system": system, "value": value}]}


def test_fhir_transaction_is_all_or_nothing_and_visible_only_once_committed(backend: SQLiteBackend) -> None:
    store, other = backend.fhir(), backend.fhir()
    try:
        with pytest.raises(RuntimeError), store.transaction():
            store.upsert(_patient("p1", "IPP1"), 1)
            raise RuntimeError("the event's handler failed")
        assert store.get("Patient", "p1") is None
        with store.transaction():
            store.upsert(_patient("p1", "IPP1"), 1)
            with store.transaction():  # nested: part of the outer one
                store.upsert(_patient("p2", "IPP2"), 1)
            assert other.get("Patient", "p2") is None  # not committed before the outer transaction ends
        assert other.count("Patient") == 2
    finally:
        store.close()
        other.close()


def test_fhir_upsert_is_idempotent_versioned_and_never_goes_back(backend: SQLiteBackend) -> None:
    store = backend.fhir()
    try:
        assert store.upsert(_patient("p1", "IPP1"), 5)
        assert not store.upsert({**_patient("p1", "IPP1"), "meta": {"source": "redelivery"}}, 5)  # same content
        assert not store.upsert(_patient("p1", "OLDER"), 4)  # an older event
        assert store.upsert(_patient("p1", "IPP1-B"), 6)
        assert store.seq_of("Patient", "p1") == 6
    finally:
        store.close()
    store = backend.fhir()
    try:
        stored = store.get("Patient", "p1")
        assert stored is not None and stored["meta"]["versionId"] == "2" and stored["meta"]["lastUpdated"]
        assert stored["identifier"][0]["value"] == "IPP1-B"
    finally:
        store.close()


def test_fhir_token_search_in_every_form_in_insertion_order(backend: SQLiteBackend) -> None:
    store = backend.fhir()
    try:
        store.upsert(_patient("b", "V1", "urn:a"))
        store.upsert(_patient("a", "V1", "urn:b"))
        store.upsert({"resourceType": "Patient", "id": "c", "identifier": [{"value": "V1"}]})
        store.upsert(_patient("d", "V2", "urn:a"))
        for value, ids in (
            ("urn:a|V1", ["b"]),
            ("V1", ["b", "a", "c"]),  # any system, in the order first stored
            ("|V1", ["c"]),  # no system
            ("urn:a|", ["b", "d"]),  # any value of the system
            ("urn:b|V1,urn:a|V2", ["a", "d"]),  # a comma: or
        ):
            total, found = store.search("Patient", {"identifier": value})
            assert (total, [r["id"] for r in found]) == (len(ids), ids), value
        total, page = store.search("Patient", {"identifier": "V1"}, count=1, offset=1)
        assert total == 3 and [r["id"] for r in page] == ["a"]
        assert store.holders("Patient", "V1") and {i for i, _ in store.holders("Patient", "V1")} == {"a", "b", "c"}
        with pytest.raises(SearchError):
            store.search("Patient", {"no-such-parameter": "x"})  # never a silent match-all
    finally:
        store.close()


def test_fhir_remote_versions_only_grow_and_can_be_forgotten(backend: SQLiteBackend) -> None:
    store = backend.fhir()
    try:
        store.upsert(_patient("p1", "IPP1"))
        store.upsert(_patient("p2", "IPP2"))
        assert store.unpushed() == 2
        store.set_remote([("Patient", "p1", 1, "Patient/srv-1")])
        store.set_remote([("Patient", "p1", 0, "Patient/srv-1")])  # a late, older acknowledgement
        assert store.get_with_remote("Patient", "p1")[1] == (1, "Patient/srv-1") and store.unpushed() == 1
        store.upsert(_patient("p1", "IPP1-B"))
        assert store.unpushed() == 2  # the server holds an older version now
        assert sorted(store.forget_remote()) == [("Patient", "p1"), ("Patient", "p2")]
        assert store.get_with_remote("Patient", "p1")[1] is None
    finally:
        store.close()


def test_fhir_readers_never_see_half_a_transaction(backend: SQLiteBackend) -> None:
    writer, reader = backend.fhir(), backend.fhir()
    totals: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                for i in range(20):
                    totals.append(reader.search("Patient", {"identifier": f"batch-{i}"})[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for i in range(20):
            with writer.transaction():
                writer.upsert(_patient(f"p{i}a", f"batch-{i}"), i + 1)
                writer.upsert(_patient(f"p{i}b", f"batch-{i}"), i + 1)
    finally:
        done.set()
        thread.join()
        writer.close()
        reader.close()
    assert errors == [] and totals and set(totals) <= {0, 2}


def _document(rid: str, binary: str, unique_id: str, **more: Any) -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{unique_id}"},
        "status": "current",
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"contentType": "text/xml", "url": f"Binary/{binary}"}}],
        **more,
    }


def test_fhir_a_binary_leads_to_its_document_reference(backend: SQLiteBackend) -> None:
    store = backend.fhir()
    try:
        store.upsert(_document("d1", "b1", "1.2.3.1"))
        store.upsert(_document("d2", "b2", "1.2.3.2"))
        store.upsert({"resourceType": "Binary", "id": "b1", "contentType": "text/xml", "data": "PHgvPg=="})
        found = store.document_of_binary("b1")
        assert found is not None and found["id"] == "d1" and found["subject"] == {"reference": "Patient/p1"}
        assert found["masterIdentifier"]["value"] == "urn:oid:1.2.3.1"
        assert store.document_of_binary("b3") is None
        assert store.document_of_binary("b1\x00") is None and store.document_of_binary("") is None
        # A deleted document (PDSm: found by no search) still leads from its Binary; its latest version is given.
        extension = [{"url": IS_DELETED, "valueBoolean": True}]
        store.upsert(_document("d2", "b2", "1.2.3.2", status="superseded", extension=extension))
        assert store.search("DocumentReference", {"_id": "d2"})[0] == 0
        latest = store.document_of_binary("b2")
        assert latest is not None and latest["status"] == "superseded" and latest["meta"]["versionId"] == "2"
        # Pointed at by two DocumentReferences: the one stored last.
        store.upsert(_document("d3", "b1", "1.2.3.3"))
        assert (store.document_of_binary("b1") or {}).get("id") == "d3"
    finally:
        store.close()


# -- reports ------------------------------------------------------------------------------------------------------


def test_a_prepared_report_survives_a_restart_and_reconcile_undoes_an_unjournaled_one(backend: SQLiteBackend) -> None:
    from tests.test_reports import report_of, study

    report = report_of(fixture("oru_r01_report.hl7"))
    reports = backend.reports()
    try:
        reports.remember([study()])
        assert reports.missing_study(report) is None
        journaled = reports.prepare(report, "journaled")
        assert isinstance(journaled, model.Document)
        again = reports.prepare(report_of(fixture("oru_r01_report.hl7")), "journaled")  # a resend
        assert isinstance(again, model.Document) and (again.id, again.version) == (journaled.id, journaled.version)
    finally:
        reports.close()
    reports = backend.reports()
    try:
        assert reports.document(journaled.id) is not None
        corrected = report_of(fixture("oru_r01_report.hl7"))
        corrected.action = "replace"
        lost = reports.prepare(corrected, "lost")  # prepared, then the engine died before journaling it
        assert isinstance(lost, model.Document) and lost.version == journaled.version + 1
    finally:
        reports.close()
    reports = backend.reports()
    try:
        assert reports.reconcile(lambda key: key == "journaled") == 1
        assert reports.document(lost.id) is None
        current = reports.document(journaled.id)
        assert current is not None
        assert reports.prepare(report_of(fixture("oru_r01_report.hl7")), "journaled").id == journaled.id  # type: ignore[union-attr]
    finally:
        reports.close()


def test_a_waiting_report_is_held_once_across_restarts(backend: SQLiteBackend) -> None:
    from tests.test_reports import report_of

    reports = backend.reports()
    try:
        held = reports.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")  # its study is not known
        assert isinstance(held, Held) and held.new
        reports.journaled("m1", 42)
    finally:
        reports.close()
    reports = backend.reports()
    try:
        again = reports.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
        assert isinstance(again, Held) and not again.new
        assert reports.counts()["waiting"] == 1
        row = reports.held("m1")
        assert row is not None and row["journal_id"] == 42
        assert [n for n, key, *_ in reports.scan(0, 10) if key == "m1"]
    finally:
        reports.close()


# -- patient registry ---------------------------------------------------------------------------------------------


def _order(ipp: str, accession: str) -> model.ImagingOrder:
    patient = model.Patient(ids=[model.Identifier(ipp, "CHU-LYON", "1.2.250.1.999.1.1", "PI")])
    return model.ImagingOrder(patient=patient, accession_number=model.Identifier(accession))


def test_the_registry_keeps_whose_each_order_is_across_a_close(backend: SQLiteBackend) -> None:
    """``close`` writes the owners held in memory: a restart right after an order still refuses its exam to
    another patient."""
    registry = backend.registry()
    try:
        registry.check_order([_order("IPP1", "ACC1")])
        registry.record([_order("IPP1", "ACC1")], channel="ris-orders", journal_id=7)
        registry.record([_order("IPP1", "ACC1")], channel="ris-orders", journal_id=7)  # a redelivery
    finally:
        registry.close()
    registry = backend.registry()
    try:
        assert registry.mark("ris-orders") == 7
        registry.check_order([_order("IPP1", "ACC1")])  # its own patient again
        registry.release([_order("IPP1", "ACC1")])
        with pytest.raises(MappingFailure):
            registry.check_order([_order("IPP2", "ACC1")])
    finally:
        registry.close()


# -- channel states: MPPS instances, XDS submissions, HL7 sender state -------------------------------------------


async def test_an_mpps_hold_commits_its_save_at_the_end_and_nothing_when_it_raises(backend: SQLiteBackend) -> None:
    states = backend.mpps_states()
    try:
        async with states.hold("1.2.3") as held:
            assert held.current is None
            held.save("IN PROGRESS", b"created")
            assert held.current == MPPSInstance("IN PROGRESS", b"created")
        with pytest.raises(RuntimeError):
            async with states.hold("1.2.3") as held:
                held.save("COMPLETED", b"set")
                raise RuntimeError("the journal refused the request")
        assert states.get("1.2.3") == MPPSInstance("IN PROGRESS", b"created")
        assert states.get("9.9") is None
    finally:
        states.close()
    again = backend.mpps_states()  # a restart, or another node
    other_channel = backend.mpps_states("mpps-2")
    try:
        async with again.hold("1.2.3") as held:
            assert held.current == MPPSInstance("IN PROGRESS", b"created")
        assert other_channel.get("1.2.3") is None  # each channel its own instances
    finally:
        again.close()
        other_channel.close()


async def test_a_second_hold_of_an_instance_waits_and_reads_what_the_first_saved(backend: SQLiteBackend) -> None:
    """Two stores on the same data (two nodes): the second N-SET is checked against the state the first left; the
    event loop runs on while it waits."""
    first, second = backend.mpps_states(), backend.mpps_states()
    seen: list[MPPSInstance | None] = []

    async def set_on_the_other_node() -> None:
        async with second.hold("1.2.3") as held:
            seen.append(held.current)

    try:
        async with first.hold("1.2.3") as held:
            held.save("IN PROGRESS", b"created")
            other = asyncio.create_task(set_on_the_other_node())
            started = time.monotonic()
            await asyncio.sleep(0.5)
            assert time.monotonic() - started < 1.5  # the loop was not blocked by the waiting hold
            assert seen == []  # waiting for the first hold
            held.save("COMPLETED", b"completed")
        await asyncio.wait_for(other, 15)
        assert seen == [MPPSInstance("COMPLETED", b"completed")]
    finally:
        first.close()
        second.close()


async def test_a_hold_cancelled_during_the_wait_then_another_hold_commits_for_good(backend: SQLiteBackend) -> None:
    """A request times out while its hold waits for another node's (the channel cancels it) and the next request of
    the channel holds another instance: the channel's lock is let go only once the store's connection is out of the
    cancelled hold, so the next holds commit for good (another store on the same data reads them) and nothing of
    the cancelled one is kept."""
    mine, other = backend.mpps_states(), backend.mpps_states()
    reader: stores.MPPSStates | None = None
    lock = asyncio.Lock()  # the channel's: one request at a time

    async def request(uid: str) -> None:
        async with lock, mine.hold(uid) as held:
            await asyncio.to_thread(held.save, "IN PROGRESS", uid.encode())

    try:
        async with other.hold("1.2.3"):
            timed_out = asyncio.create_task(request("1.2.3"))
            await asyncio.sleep(0.3)
            timed_out.cancel()  # still waiting for the other node's hold
            following = asyncio.create_task(request("1.2.4"))
            await asyncio.sleep(0.3)
        await asyncio.wait_for(following, 15)
        with pytest.raises(asyncio.CancelledError):
            await timed_out
        await asyncio.wait_for(request("1.2.5"), 15)
        reader = backend.mpps_states()
        assert reader.get("1.2.4") == MPPSInstance("IN PROGRESS", b"1.2.4")
        assert reader.get("1.2.5") == MPPSInstance("IN PROGRESS", b"1.2.5")
        assert reader.get("1.2.3") is None
    finally:
        for store in (mine, other, reader):
            if store is not None:
                store.close()


def test_a_submission_keeps_its_first_entry_uuid_and_follows_its_statuses(backend: SQLiteBackend) -> None:
    store = backend.submissions()
    try:
        assert store.get("1.2.3.1") is None
        assert store.begin("1.2.3.1", "urn:uuid:a", "set") == Submission("1.2.3.1", "urn:uuid:a", "sending")
        assert store.begin("1.2.3.1", "urn:uuid:b", "set").entry_uuid == "urn:uuid:a"  # a retry: the same entry
        store.registered("1.2.3.1", "1.2.9.1")
        assert not store.refused("1.2.3.1")  # registered: not refused afterwards
        store.begin("1.2.3.2", "urn:uuid:c", "set")
        store.registered("1.2.3.2", "1.2.9.2", replaced="1.2.3.1")
        store.begin("1.2.3.3", "urn:uuid:d", "set")
        assert store.refused("1.2.3.3")
        store.skip("1.2.3.4", "set")
        store.skip("1.2.3.2", "set")  # stored already: unchanged
        store.deleted("1.2.3.2")
    finally:
        store.close()
    store = backend.submissions()
    other_channel = backend.submissions("dmp-2")
    try:
        found = [store.get(f"1.2.3.{n}") for n in range(1, 5)]
        assert [(s.status if s else None) for s in found] == ["replaced", "deleted", "refused", "skipped"]
        assert found[1] is not None and found[1].entry_uuid == "urn:uuid:c"
        assert other_channel.get("1.2.3.1") is None
    finally:
        store.close()
        other_channel.close()


def test_a_document_is_claimed_by_one_caller_at_a_time(backend: SQLiteBackend) -> None:
    a, b = backend.submissions(), backend.submissions()
    try:
        with a.claim("1.2.3.1") as mine:
            assert mine
            with a.claim("1.2.3.1") as again, b.claim("1.2.3.1") as elsewhere:
                assert not again and not elsewhere
            with b.claim("1.2.3.2") as other_document:
                assert other_document
        with b.claim("1.2.3.1") as mine:  # released at the end of the block
            assert mine
        with pytest.raises(RuntimeError), a.claim("1.2.3.1"):
            raise RuntimeError("the registry failed")
        with b.claim("1.2.3.1") as mine:  # released when the block raises too
            assert mine
    finally:
        a.close()
        b.close()


def test_a_sender_marks_once_and_clears_its_pending_document_in_the_same_transaction(backend: SQLiteBackend) -> None:
    state = backend.sender_state()
    try:
        assert not state.is_done("event-1") and state.detail("event-1") is None
        state.set_pending("doc-1")
        state.set_pending("doc-1")  # twice: still one
        assert state.is_pending("doc-1") and not state.is_pending("doc-2")
        with pytest.raises(ValueError):  # no mark: the pending document stays (both or neither)
            state.mark_done("", "D0001", clear_pending="doc-1")
        assert state.is_pending("doc-1")
        assert state.mark_done("event-1", "D0001", clear_pending="doc-1")
        assert not state.is_pending("doc-1") and state.is_done("event-1")
        assert not state.mark_done("event-1", "D0002")  # the first mark is kept
        state.remember_order("ACC1", KnownOrder("P1^RIS", "F1^PACS", "IPP1^^^CHU^PI", "1.2.3"))
        state.remember_order("ACC1", KnownOrder("P2^RIS", "F1^PACS", "IPP1^^^CHU^PI", "1.2.3"))
        assert state.known_order("ACC2") is None
    finally:
        state.close()
    state, other = backend.sender_state(), backend.sender_state()  # a restart; another store on the same data
    try:
        assert other.detail("event-1") == "D0001" and not other.mark_done("event-1", "D0003")
        assert state.known_order("ACC1") == KnownOrder("P2^RIS", "F1^PACS", "IPP1^^^CHU^PI", "1.2.3")
        other.set_pending("doc-2")
        assert state.is_pending("doc-2")
    finally:
        state.close()
        other.close()
