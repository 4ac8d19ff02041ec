"""``traboule db migrate``: an embedded site (an engine run on SQLite: orders, a patient update, a merge, FHIR
resources in several versions, a rejected message, events still in the outbox) copied into PostgreSQL, then read
back through the PostgreSQL stores and compared with what the SQLite stores answer; a migration stopped midway and
run again ends with the same rows, none twice; the command line's progress, count check, refusals, and no password
in what it prints."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from pydicom.dataset import Dataset

from tests.conftest import ROOT
from tests.test_engine import cli
from tests.test_flow import ack_code, engine_config, fixture, send, store, until
from traboule import model
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.stores import migrate
from traboule.stores.factory import PostgresStores
from traboule.stores.fhir_store import SQLiteFHIRStore
from traboule.stores.journal import SCHEMA as JOURNAL_SCHEMA
from traboule.stores.journal import JournalEntry, OutboxEvent, Query, SQLiteJournal
from traboule.stores.mpps_state import MPPSInstance, SQLiteMPPSStates
from traboule.stores.patient_identity import PatientIdentities
from traboule.stores.postgres import connect
from traboule.stores.postgres.fhir_store import PostgresFHIRStore
from traboule.stores.postgres.journal import PostgresJournal
from traboule.stores.postgres.mpps_state import PostgresMPPSStates
from traboule.stores.postgres.patient_identity import PostgresPatientRegistry
from traboule.stores.postgres.reports import PostgresReportStorage
from traboule.stores.postgres.sender_state import PostgresSenderState
from traboule.stores.postgres.submissions import PostgresSubmissions
from traboule.stores.postgres.worklist import PostgresWorklistStore
from traboule.stores.reports import SQLiteReportStorage
from traboule.stores.sender_state import KnownOrder, SQLiteSenderState
from traboule.stores.submissions import SQLiteSubmissions
from traboule.stores.worklist import SQLiteWorklistStore

pytestmark = pytest.mark.timeout(120)

SENT = [
    "orm_o01_nw_latin1.hl7",  # IPP0001, ACC0001, CT
    "omi_o23_nw_utf8.hl7",  # IPP0002
    "adt_a08_update.hl7",  # IPP0001 renamed: new Patient and ServiceRequest versions
    "adt_a40_merge.hl7",  # IPP0001 merged into IPP0009
    "orm_o01_no_pid3.hl7",  # rejected (journaled raw)
]


async def _run_site(data_dir: Path) -> None:
    cfg = engine_config(data_dir)
    cfg.channels.append(Config().channel("fhir"))
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        fhir = runtime.channel("fhir").store  # type: ignore[attr-defined]
        for name in SENT[:2]:
            (ack,) = await send(runtime, fixture(name))
            assert ack_code(ack) == "AA"
        await until(lambda: store(runtime).count() >= 2 and fhir.count("ServiceRequest") >= 2)
        for name in SENT[2:]:
            await send(runtime, fixture(name))
        await until(lambda: store(runtime).keys_for_patient("IPP0009", "CHU-LYON") != [])
        await runtime.wait_idle()
        await until(lambda: fhir.get("Patient", _patient_id(fhir, "IPP0009")) is not None)
        await runtime.wait_idle()
    finally:
        await runtime.stop()
    # Events still in the outbox (an engine stopped before its dispatcher published them), text with a NUL.
    journal = SQLiteJournal(data_dir / "journal.sqlite")
    try:
        await journal.append(
            JournalEntry("ris-orders", b"MSH|late", "accepted", peer="10.0.0.9:4000", warnings="odd \x00 text",
                         idempotency_key="late-1"),
            [OutboxEvent("order.created", "ev-late-1", b'{"a": 1}'), OutboxEvent("order.changed", "ev-late-2", b"{}")],
        )  # fmt: skip
    finally:
        journal.close()


def _patient_id(fhir: Any, ipp: str) -> str:
    total, found = fhir.search("Patient", {"identifier": ipp})
    return str(found[0]["id"]) if total else ""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded site's data folder (built once; every test migrates it, none writes into it)."""
    data_dir = tmp_path_factory.mktemp("site") / "var"
    asyncio.run(_run_site(data_dir))
    return data_dir


def _copy(site: Path, tmp_path: Path) -> Path:
    """A copy of the site for a test that writes into the folder itself (engine.json)."""
    target = tmp_path / "var"
    shutil.copytree(site, target)
    return target


# -- what the stores answer -------------------------------------------------------------------------------------


def _journal_view(journal: Any) -> tuple[list[Any], list[Any], int]:
    entries = journal.select(Query(), limit=10_000)
    return [vars(e) for e in entries], [vars(e) for e in journal.pending_events(10_000)], journal.last_id()


def _ct_query() -> Dataset:
    query = Dataset()
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "IssuerOfPatientID"):
        setattr(query, keyword, "")
    step = Dataset()
    step.Modality = ""
    step.ScheduledProcedureStepStartDate = ""
    step.ScheduledProcedureStepID = ""
    query.ScheduledProcedureStepSequence = [step]
    return query


def _worklist_view(worklist: Any) -> tuple[list[Any], list[Any]]:
    found = sorted(json.dumps(ds.to_json_dict(), sort_keys=True) for ds in worklist.find(_ct_query()))
    items = [(key, json.dumps(ds.to_json_dict(), sort_keys=True)) for key, ds in worklist.all()]
    return found, items


def _fhir_view(fhir: Any) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for rtype in ("Patient", "ServiceRequest"):
        total, resources = fhir.search(rtype, {}, count=100)
        view[rtype] = (total, resources)
        for resource in resources:
            view[f"{rtype}/{resource['id']}"] = (fhir.get(rtype, resource["id"]), fhir.seq_of(rtype, resource["id"]))
    view["by identifier"] = fhir.search("Patient", {"identifier": "IPP0009"})
    view["ServiceRequest of IPP0009"] = fhir.search("ServiceRequest", {"patient.identifier": "IPP0009"})
    return view


def _sqlite_fhir(data_dir: Path) -> SQLiteFHIRStore:
    return SQLiteFHIRStore(str(data_dir / "fhir.sqlite"))


# -- tests ------------------------------------------------------------------------------------------------------


def test_the_site_migrates_whole_and_reads_the_same_through_the_postgres_stores(site: Path, pg_url: str) -> None:
    seen: list[tuple[str, int, int]] = []
    report = migrate.migrate(site, pg_url, progress=lambda s, d, t: seen.append((s, d, t)))
    assert not report.mismatches, report.counts
    counts = {c.step: (c.source, c.destination) for c in report.counts}
    for step in ("journal.messages", "journal.outbox", "worklist.items", "fhir.resources", "patients.owners"):
        assert counts[step][0] > 0, step
    assert counts["patients.merges"] == (1, 1)
    assert counts["journal.outbox"] == (2, 2)
    assert counts["journal.messages"][0] == len(SENT) + 1
    assert ("journal.messages", counts["journal.messages"][0], counts["journal.messages"][0]) in seen
    assert [p.name for p in report.left] == ["bus.sqlite"]  # the embedded bus only: not a store
    assert counts["reports.orders[ris-orders]"][0] > 0  # the reports catalog's orders
    again = migrate.migrate(site, pg_url)  # finished: nothing copied again, the counts still match
    assert again.copied == 0 and not again.mismatches

    # The journal: the same entries under the same ids (NUL included), the outbox, and new ids after them.
    sqlite_journal = SQLiteJournal(site / "journal.sqlite")
    pg_journal = PostgresJournal(pg_url)
    try:
        expected = _journal_view(sqlite_journal)
        assert _journal_view(pg_journal) == expected
        assert any("\x00" in e["warnings"] for e in expected[0])
        assert [e["topic"] for e in expected[1]] == ["order.created", "order.changed"]
        statuses = {e["status"] for e in expected[0]}
        assert {"accepted", "rejected"} <= statuses
    finally:
        sqlite_journal.close()

    async def one_more() -> JournalEntry:
        return await pg_journal.append(JournalEntry("ris-orders", b"MSH|next", "accepted", idempotency_key="next"))

    try:
        assert asyncio.run(one_more()).id == expected[2] + 1
        assert pg_journal.accepted("late-1")
    finally:
        pg_journal.close()

    # The worklist: the same C-FIND answers and items (the merge applied: IPP0009's).
    sqlite_worklist = SQLiteWorklistStore(str(site / "worklist.sqlite"))
    pg_worklist = PostgresWorklistStore(pg_url)
    try:
        found, items = _worklist_view(sqlite_worklist)
        assert len(found) == 2 and _worklist_view(pg_worklist) == (found, items)
        assert (
            pg_worklist.keys_for_patient("IPP0009", "CHU-LYON")
            == sqlite_worklist.keys_for_patient("IPP0009", "CHU-LYON")
            != []
        )
        keys = [k for k, _ in items]
        assert pg_worklist.order_seqs(keys) == sqlite_worklist.order_seqs(keys)
    finally:
        sqlite_worklist.close()
        pg_worklist.close()
    with connect(pg_url) as conn:
        applied = conn.execute("SELECT count(*) FROM worklist_applied").fetchone()
    assert applied is not None and applied[0] == counts["worklist.applied"][0] > 0

    # The FHIR store: every resource with its version, time and sequence; searches (tokens) answer alike.
    sqlite_fhir, pg_fhir = _sqlite_fhir(site), PostgresFHIRStore(pg_url)
    try:
        view = _fhir_view(sqlite_fhir)
        assert _fhir_view(pg_fhir) == view
        versions = [r["meta"]["versionId"] for r in view["ServiceRequest"][1]]
        assert "2" in versions or any(int(v) > 1 for v in versions), versions  # the update made a new version
        assert view["by identifier"][0] == 1
    finally:
        sqlite_fhir.close()
        pg_fhir.close()

    # The patient registry: what it holds about each IPP, the merge included.
    sqlite_patients, pg_patients = PatientIdentities(site / "patients.sqlite"), PostgresPatientRegistry(pg_url)
    try:
        for ipp in ("IPP0001", "IPP0002", "IPP0009"):
            assert pg_patients.show(ipp) == sqlite_patients.show(ipp), ipp
        assert pg_patients.mark("ris-orders") == sqlite_patients.mark("ris-orders")
    finally:
        sqlite_patients.close()
        pg_patients.close()


def test_a_migration_stopped_midway_finishes_on_the_next_run_without_duplicates(site: Path, pg_url: str) -> None:
    stops = iter(["journal.messages", "worklist.items", "fhir.resources", "patients.owners"])
    target = {"step": next(stops)}

    def stop(step: str, batches: int) -> None:
        if step == target["step"] and batches == 1:
            raise KeyboardInterrupt  # Ctrl-C right after a committed batch

    runs = 0
    while True:
        runs += 1
        try:
            report = migrate.migrate(site, pg_url, batch_size=2, after_batch=stop)
            break
        except KeyboardInterrupt:
            target["step"] = next(stops, "")
        assert runs < 10
    assert runs == 5
    assert not report.mismatches, report.counts
    with connect(pg_url) as conn:
        progress = conn.execute("SELECT step, copied, done FROM traboule_migration ORDER BY step").fetchall()
        ids = conn.execute("SELECT id FROM journal_messages ORDER BY id").fetchall()
        tokens = conn.execute("SELECT count(*) FROM fhir_tokens").fetchone()
    counts = {c.step: c.source for c in report.counts}
    assert all(done for _, _, done in progress)
    assert {s: n for s, n, _ in progress if n} == {s: n for s, n in counts.items() if n}
    assert [i for (i,) in ids] == list(range(1, counts["journal.messages"] + 1))

    # Same content as one uninterrupted run: the search index too (written with each batch of resources).
    sqlite_fhir, pg_fhir = _sqlite_fhir(site), PostgresFHIRStore(pg_url)
    try:
        assert _fhir_view(pg_fhir) == _fhir_view(sqlite_fhir)
    finally:
        sqlite_fhir.close()
        pg_fhir.close()
    with migrate._source(site / "fhir.sqlite") as db:
        assert tokens is not None and tokens[0] == db.execute("SELECT count(*) FROM tokens").fetchone()[0]


def test_a_batch_that_fails_midway_is_rolled_back_whole_and_copied_again(
    site: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server or the process gone in the middle of a batch: its rows, derived rows and progress are one
    transaction, so the next run copies that batch again, whole."""
    (step,) = [s for s in migrate.STEPS if s.name == "fhir.resources"]
    assert isinstance(step, migrate.TableCopy) and step.derive is not None
    calls = {"n": 0}
    derive = step.derive

    def failing(conn: Any, rows: list[Any]) -> None:
        calls["n"] += 1
        derive(conn, rows)  # the resources and their tokens are written, then the run dies before the commit
        if calls["n"] == 2:
            raise ConnectionError("server closed the connection")

    monkeypatch.setattr(step, "derive", failing)
    with pytest.raises(ConnectionError):
        migrate.migrate(site, pg_url, batch_size=1)
    with connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM fhir_resources").fetchone() == (1,)
        assert conn.execute(
            "SELECT after, copied, done FROM traboule_migration WHERE step = 'fhir.resources'"
        ).fetchone() == ("1", 1, False)
    monkeypatch.setattr(step, "derive", derive)
    report = migrate.migrate(site, pg_url, batch_size=1)
    assert not report.mismatches
    with connect(pg_url) as conn:
        tokens = conn.execute("SELECT count(*) FROM fhir_tokens").fetchone()
    with migrate._source(site / "fhir.sqlite") as db:
        assert tokens is not None and tokens[0] == db.execute("SELECT count(*) FROM tokens").fetchone()[0]


async def test_the_channels_own_stores_move_channel_by_channel(tmp_path: Path, pg_url: str) -> None:
    """MPPS instances, an HL7 sender's marks, known orders and pending documents, an XDS channel's submissions:
    each channel's file into its rows of the shared tables, read back through the PostgreSQL stores."""
    data_dir = tmp_path / "var"
    for channel, uid, status in (("mpps", "1.2.3.1", "IN PROGRESS"), ("mpps-2", "1.2.3.2", "COMPLETED")):
        states = SQLiteMPPSStates(data_dir / f"{channel}.sqlite")
        try:
            async with states.hold(uid) as held:
                held.save(status, b"\x08\x00\x16\x00" + uid.encode())
        finally:
            states.close()
    sender = SQLiteSenderState.open(data_dir / "hl7-status.sqlite")
    try:
        assert sender.mark_done("event-1", "MSG0001")
        sender.remember_order("ACC0001", KnownOrder("P1^RIS", "F1^PACS", "IPP0001^^^CHU", "1.2.3"))
        sender.set_pending("doc-2")
    finally:
        sender.close()
    submissions = SQLiteSubmissions(data_dir / "xds.sqlite")
    try:
        submissions.begin("2.25.1", "urn:uuid:0001", "2.25.9")
        submissions.registered("2.25.1", "2.25.100")
        submissions.skip("2.25.2", "2.25.9")
    finally:
        submissions.close()

    report = migrate.migrate(data_dir, pg_url)
    assert not report.mismatches, report.counts
    counts = {c.step: c.source for c in report.counts if c.path is not None}
    assert counts == {
        "mpps.instances[mpps]": 1,
        "mpps.instances[mpps-2]": 1,
        "hl7_sender.marks[hl7-status]": 1,
        "hl7_sender.orders[hl7-status]": 1,
        "hl7_sender.pending[hl7-status]": 1,
        "xds.submissions[xds]": 2,
    }
    first, second = PostgresMPPSStates(pg_url, "mpps"), PostgresMPPSStates(pg_url, "mpps-2")
    try:
        assert first.get("1.2.3.1") == MPPSInstance("IN PROGRESS", b"\x08\x00\x16\x001.2.3.1")
        assert first.get("1.2.3.2") is None and second.get("1.2.3.2") == MPPSInstance("COMPLETED", ANY)
    finally:
        first.close()
        second.close()
    pg_sender = PostgresSenderState(pg_url, "hl7-status")
    try:
        assert pg_sender.is_done("event-1") and pg_sender.detail("event-1") == "MSG0001"
        assert pg_sender.known_order("ACC0001") == KnownOrder("P1^RIS", "F1^PACS", "IPP0001^^^CHU", "1.2.3")
        assert pg_sender.is_pending("doc-2") and not pg_sender.is_pending("doc-1")
    finally:
        pg_sender.close()
    pg_submissions = PostgresSubmissions(pg_url, "xds")
    sqlite_submissions = SQLiteSubmissions(data_dir / "xds.sqlite")
    try:
        for unique_id in ("2.25.1", "2.25.2"):
            assert pg_submissions.get(unique_id) == sqlite_submissions.get(unique_id) is not None
    finally:
        pg_submissions.close()
        sqlite_submissions.close()
    again = migrate.migrate(data_dir, pg_url)
    assert again.copied == 0 and not again.mismatches


def test_a_reports_store_moves_with_its_sets_versions_and_held_reports(tmp_path: Path, pg_url: str) -> None:
    """An ``hl7-orders`` channel's reports: what the storage answers on SQLite it answers on PostgreSQL after the
    move, and the next document set takes the next number."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    sqlite_reports = SQLiteReportStorage(data_dir / "ris-orders.reports.sqlite")
    cda = base64.b64encode(b"<ClinicalDocument/>").decode("ascii")
    try:
        sqlite_reports.remember(
            [("ACC0001", {"placer": "P1"})], [("1.2.3", "ACC0001", '{"uid": "1.2.3"}')],
            [("1.2.4", "1.2.3", "ACC0001", '{"step": 1}')], lambda old, new: {**old, **new},
        )  # fmt: skip
        set_id = sqlite_reports.new_set("CHU|ACC0001", "", "1.2.250.9")
        first = model.Document(id=f"{set_id}.1", set_id=set_id, version=1, content=cda, title="CR")
        sqlite_reports.store(first, "key-1", current="", supersede="", withdraw=False)
        second = model.Document(
            action="replace", id=f"{set_id}.2", set_id=set_id, version=2, replaces=first.id, content=cda
        )
        sqlite_reports.store(second, "key-2", current=first.id, supersede="", withdraw=False)
        sqlite_reports.wait("key-3", "CHU|ACC0002", "ACC0002", "", time.time() + 3600, '{"report": 3}', "")
        expected = _reports_view(sqlite_reports, set_id)
    finally:
        sqlite_reports.close()
    assert expected["current"] is not None and expected["current"].version == 2 and expected["held"] is not None

    report = migrate.migrate(data_dir, pg_url)
    assert not report.mismatches, report.counts
    counts = {c.step: c.source for c in report.counts if c.path is not None}
    assert counts["reports.documents[ris-orders]"] == 2 and counts["reports.waiting[ris-orders]"] == 1
    pg_reports = PostgresReportStorage(pg_url, "ris-orders")
    try:
        assert _reports_view(pg_reports, set_id) == expected
        assert pg_reports.new_set("CHU|ACC0009", "", "1.2.250.9") == "1.2.250.9.2"  # after the migrated set 1
    finally:
        pg_reports.close()


def _reports_view(storage: Any, set_id: str) -> dict[str, Any]:
    return {
        "order": storage.order("ACC0001"),
        "sources": storage.sources("accession", "ACC0001"),
        "set": storage.set_of("CHU|ACC0001"),
        "messages": [storage.message(k) for k in ("key-1", "key-2", "key-3")],
        "documents": [storage.document(f"{set_id}.{v}") for v in (1, 2)],
        "current": storage.current(set_id),
        "last": storage.last_version(set_id),
        "held": storage.waiting_report("key-3"),
    }


def test_a_migration_killed_midway_finishes_when_run_again(tmp_path: Path, pg_url: str) -> None:
    """``kill -9`` of the command in the middle of the journal (one row per transaction), then the same command."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    db = sqlite3.connect(data_dir / "journal.sqlite")
    db.executescript(JOURNAL_SCHEMA)
    rows = [
        (f"2026-12-01T00:00:{i % 60:02d}", "ris-orders", "accepted", f"key-{i}", f"MSH|{i}".encode())
        for i in range(3000)
    ]
    db.executemany(
        "INSERT INTO messages (received, channel, status, idempotency_key, raw) VALUES (?, ?, ?, ?, ?)", rows
    )
    db.commit()
    db.close()
    env = dict(os.environ)
    env.pop("TRABOULE_DATABASE_URL", None)
    command = [sys.executable, "-m", "traboule.app.cli", "db", "migrate", "--from", str(data_dir), "--to", pg_url]
    proc = subprocess.Popen([*command, "--batch-size", "1"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # a progress line in the middle: journal.messages: N/3000
        found = re.match(r"journal\.messages: (\d+)/3000", line)
        if found and 0 < int(found[1]) < 3000:
            proc.kill()
            break
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    with connect(pg_url) as conn:
        (copied,) = conn.execute("SELECT count(*) FROM journal_messages").fetchone() or (0,)
    assert 0 < copied < 3000
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"journal.messages: {copied}/3000" in done.stderr  # it went on from there
    with connect(pg_url) as conn:
        ids = [i for (i,) in conn.execute("SELECT id FROM journal_messages ORDER BY id")]
        keys = conn.execute("SELECT count(DISTINCT idempotency_key) FROM journal_messages").fetchone()
    assert ids == list(range(1, 3001)) and keys == (3000,)


def test_a_folder_with_two_worklists_names_the_one_to_move(tmp_path: Path, pg_url: str) -> None:
    """The database holds one worklist: with two worklist channels' files, the command says so until one is named."""
    data_dir = tmp_path / "var"
    for name in ("worklist", "worklist-2"):
        worklist = SQLiteWorklistStore(str(data_dir / f"{name}.sqlite"))
        try:
            item = Dataset()
            item.AccessionNumber, item.PatientID = f"ACC-{name}", "IPP1"
            assert worklist.apply([(f"{name}|1", item)], [], f"event-{name}")
        finally:
            worklist.close()
    with pytest.raises(migrate.MigrationError, match=r"several worklist stores \(worklist-2, worklist\)"):
        migrate.migrate(data_dir, pg_url)
    report = migrate.migrate(data_dir, pg_url, channels={"worklist": "worklist-2"})
    assert not report.mismatches and [p.name for p in report.left] == ["worklist.sqlite"]
    pg_worklist = PostgresWorklistStore(pg_url)
    try:
        assert [key for key, _ in pg_worklist.all()] == ["worklist-2|1"]
    finally:
        pg_worklist.close()


def test_a_database_holding_other_data_is_refused(site: Path, pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    journal.close()
    with connect(pg_url) as conn:
        conn.execute("INSERT INTO journal_messages (received, channel, status, raw) VALUES ('x', 'c', 'accepted', '')")
    with pytest.raises(migrate.MigrationError, match=r"journal\.messages: the database already holds 1 rows"):
        migrate.migrate(site, pg_url)
    PostgresStores(pg_url, site).check()  # refused before marking it: its engines still start


def test_the_command_shows_progress_checks_counts_and_never_prints_the_password(
    site: Path, pg_url: str, tmp_path: Path
) -> None:
    data_dir = _copy(site, tmp_path)
    secret = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-Pw@")
    assert "s3cret-Pw" in secret
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "elsewhere"))
    env.pop("TRABOULE_DATABASE_URL", None)

    # An engine running on the folder (its engine.json names a live process: this one): refused, unless --force.
    (data_dir / "engine.json").write_text(json.dumps({"pid": os.getpid()}), encoding="utf-8")
    refused = cli("db", "migrate", "--from", str(data_dir), "--to", secret, env=env)
    assert refused.returncode == 1 and "an engine is running on" in refused.stderr
    with connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('journal_messages')").fetchone() == (None,)

    done = cli("db", "migrate", "--from", str(data_dir), "--to", secret, "--force", "--batch-size", "3", env=env)
    assert done.returncode == 0, done.stderr
    assert "s3cret-Pw" not in done.stdout + done.stderr
    assert "journal.messages: 0/6" in done.stderr and "journal.messages: 6/6" in done.stderr
    assert "worklist.items" in done.stdout and "MISMATCH" not in done.stdout
    assert "postgres:***@" in done.stdout
    (data_dir / "engine.json").unlink()  # the engine stopped

    quiet = cli("db", "migrate", "--from", str(data_dir), "--to", secret, "--quiet", env=env)
    assert quiet.returncode == 0 and "/6" not in quiet.stderr and "0 rows copied" in quiet.stdout

    # A row lost in the database: the count check says which store, exit 1.
    with connect(pg_url) as conn:
        conn.execute("DELETE FROM worklist_items WHERE id = (SELECT min(id) FROM worklist_items)")
    mismatch = cli("db", "migrate", "--from", str(data_dir), "--to", secret, "--quiet", env=env)
    assert mismatch.returncode == 1
    assert "worklist.items" in mismatch.stderr and "count mismatch" in mismatch.stderr
    assert "MISMATCH" in mismatch.stdout and "s3cret-Pw" not in mismatch.stdout + mismatch.stderr

    # A server that does not answer: the error, without the password.
    unreachable = "postgresql://postgres:s3cret-Pw@127.0.0.1:9/none"
    failed = cli("db", "migrate", "--from", str(data_dir), "--to", unreachable, env=env)
    assert failed.returncode == 1 and "s3cret-Pw" not in failed.stdout + failed.stderr


def _sqlite_file(path: Path, script: str) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(script)
        db.commit()
    finally:
        db.close()


_APPLIED = (
    "CREATE TABLE applied (idempotency_key TEXT PRIMARY KEY, applied_at TEXT NOT NULL,"
    " detail TEXT NOT NULL DEFAULT '') WITHOUT ROWID;"
)


def test_sender_files_of_earlier_versions_move_and_an_unknown_file_fails_the_command(
    tmp_path: Path, pg_url: str
) -> None:
    """The previous release's hl7-status (``applied`` + ``orders``) and hl7-documents (``applied`` + ``pending``)
    files, the oldest ``sent`` tables (moved into the marks as the SQLite store's own upgrade does; a key marked
    in both kept once, its ``applied`` row first); a file no step reads fails the command."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    _sqlite_file(
        data_dir / "hl7-status.sqlite",
        _APPLIED + "INSERT INTO applied VALUES ('ev-1', '2026-01-01T00:00:00+00:00', 'MSG1');"
        "CREATE TABLE orders (accession TEXT PRIMARY KEY, placer TEXT NOT NULL, filler TEXT NOT NULL,"
        " patient_id TEXT NOT NULL, study_uid TEXT NOT NULL);"
        "INSERT INTO orders VALUES ('ACC1', 'P1', 'F1', 'IPP1', '1.2.3');",
    )
    _sqlite_file(
        data_dir / "hl7-documents.sqlite",
        _APPLIED + "INSERT INTO applied VALUES ('doc-1', '2026-01-01T00:00:00+00:00', 'MSG2');"
        "CREATE TABLE pending (document_id TEXT PRIMARY KEY); INSERT INTO pending VALUES ('doc-2');"
        "CREATE TABLE sent (event_id TEXT PRIMARY KEY, sent_at TEXT, control_id TEXT);"
        "INSERT INTO sent VALUES ('doc-1', '2025-01-01T00:00:00+00:00', 'OLD'), ('doc-0', NULL, 'MSG0'), ('', '', '');",
    )
    _sqlite_file(
        data_dir / "status-old.sqlite",
        "CREATE TABLE sent (idempotency_key TEXT PRIMARY KEY, sent_at TEXT, control_id TEXT);"
        "INSERT INTO sent VALUES ('ev-9', '2024-05-01T10:00:00+00:00', 'MSG9');",
    )
    report = migrate.migrate(data_dir, pg_url)
    assert not report.mismatches and report.unread == [], report.counts
    counts = {c.step: c.source for c in report.counts if c.path is not None}
    assert counts == {
        "hl7_sender.marks[hl7-documents]": 2,
        "hl7_sender.orders[hl7-documents]": 0,
        "hl7_sender.pending[hl7-documents]": 1,
        "hl7_sender.marks[hl7-status]": 1,
        "hl7_sender.orders[hl7-status]": 1,
        "hl7_sender.pending[hl7-status]": 0,
        "hl7_sender.marks[status-old]": 1,
        "hl7_sender.orders[status-old]": 0,
        "hl7_sender.pending[status-old]": 0,
    }
    for channel, marks in (
        ("hl7-status", {"ev-1": "MSG1"}),
        ("hl7-documents", {"doc-1": "MSG2", "doc-0": "MSG0"}),
        ("status-old", {"ev-9": "MSG9"}),
    ):
        state = PostgresSenderState(pg_url, channel)
        try:
            assert {key: state.detail(key) for key in marks} == marks
        finally:
            state.close()
    state = PostgresSenderState(pg_url, "hl7-status")
    try:
        assert state.known_order("ACC1") == KnownOrder("P1", "F1", "IPP1", "1.2.3")
    finally:
        state.close()
    state = PostgresSenderState(pg_url, "hl7-documents")
    try:
        assert state.is_pending("doc-2")
    finally:
        state.close()

    # A SQLite file no step reads: the command fails and names it.
    _sqlite_file(data_dir / "mystery.sqlite", "CREATE TABLE things (x TEXT); INSERT INTO things VALUES ('a');")
    env = dict(os.environ)
    env.pop("TRABOULE_DATABASE_URL", None)
    done = cli("db", "migrate", "--from", str(data_dir), "--to", pg_url, "--quiet", env=env)
    assert done.returncode == 1 and "mystery.sqlite" in done.stderr and "not migrated" in done.stderr


def test_a_half_migrated_database_refuses_an_engine_and_a_second_run(site: Path, pg_url: str, tmp_path: Path) -> None:
    """A migration stopped midway: the PostgreSQL stores' start-up check refuses (finish the migration first);
    a run while another holds the database is refused; once finished, the check passes."""
    from traboule.errors import ConfigError

    def stop(step: str, batches: int) -> None:
        if step == "worklist.items":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(site, pg_url, batch_size=1, after_batch=stop)
    stores = PostgresStores(pg_url, tmp_path)
    with pytest.raises(ConfigError, match=r"finish `traboule db migrate`"):
        stores.check()
    # Stopped between two steps (the journal done, nothing else started): still unfinished.
    with connect(pg_url) as conn:
        conn.execute("DELETE FROM traboule_migration WHERE step LIKE 'worklist.%'")
        conn.execute("DELETE FROM worklist_items")
    with pytest.raises(ConfigError, match=r"finish `traboule db migrate`"):
        stores.check()
    with connect(pg_url) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (migrate.LOCK_KEY,))
        with pytest.raises(migrate.MigrationError, match="another traboule db migrate is running"):
            migrate.migrate(site, pg_url)
    report = migrate.migrate(site, pg_url)
    assert not report.mismatches
    stores.check()


def test_an_engine_of_another_user_counts_as_running(tmp_path: Path) -> None:
    """``engine.json`` naming a live process this user may not signal (the service account's engine): running."""
    from traboule.app import cli as cli_mod

    if os.geteuid() != 0:
        (tmp_path / "engine.json").write_text(json.dumps({"pid": 1}), encoding="utf-8")
        info = cli_mod._last_engine(Config(data_dir=str(tmp_path)))
        assert info is not None and info["running"] is True
        return
    # As root every process may be signalled: ask as another user (nobody) about a process of root's.
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder.chmod(0o755)
        (folder / "engine.json").write_text(json.dumps({"pid": os.getpid()}), encoding="utf-8")
        (folder / "engine.json").chmod(0o644)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # the child, as nobody: its answer on the pipe
            try:
                os.setgid(65534)
                os.setuid(65534)
                info = cli_mod._last_engine(Config(data_dir=str(folder)))
                os.write(write, repr(None if info is None else info["running"]).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        with os.fdopen(read) as answer:
            assert answer.read() == "True"
    finally:
        shutil.rmtree(folder)


def test_deliveries_queued_in_the_embedded_bus_refuse_the_command(site: Path, pg_url: str, tmp_path: Path) -> None:
    data_dir = _copy(site, tmp_path)
    db = sqlite3.connect(data_dir / "bus.sqlite")
    db.execute(
        "INSERT INTO messages (queue, topic, body, message_id, headers) VALUES ('worklist', 'order.created', x'7b7d',"
        " 'ev-1', '{}')"
    )
    db.commit()
    db.close()
    env = dict(os.environ)
    env.pop("TRABOULE_DATABASE_URL", None)
    refused = cli("db", "migrate", "--from", str(data_dir), "--to", pg_url, "--quiet", env=env)
    assert refused.returncode == 1 and "1 deliveries not yet consumed" in refused.stderr
    assert "--ignore-bus" in refused.stderr
    with connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('journal_messages')").fetchone() == (None,)
    done = cli("db", "migrate", "--from", str(data_dir), "--to", pg_url, "--quiet", "--ignore-bus", env=env)
    assert done.returncode == 0, done.stderr
    assert "1 deliveries not yet consumed" in done.stderr


def test_a_source_changed_between_two_runs_is_refused(site: Path, pg_url: str, tmp_path: Path) -> None:
    """A row changed in place under a key already copied (the run stopped, the file written to, the same command
    again): the resumed run would not see it, so it refuses."""
    data_dir = _copy(site, tmp_path)

    def stop(step: str, batches: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(data_dir, pg_url, batch_size=2, after_batch=stop)
    db = sqlite3.connect(data_dir / "journal.sqlite")
    db.execute("UPDATE messages SET error = 'changed' WHERE id = 1")
    db.commit()
    db.close()
    with pytest.raises(migrate.MigrationError, match=r"journal\.messages: .* changed since .* new database"):
        migrate.migrate(data_dir, pg_url)


def test_an_id_taken_in_the_database_during_a_migration_is_refused(site: Path, pg_url: str) -> None:
    """A journal id written into the database between two runs (by a node that should not have started): the resumed
    run refuses instead of skipping the source row under it."""

    def stop(step: str, batches: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate.migrate(site, pg_url, batch_size=2, after_batch=stop)
    with connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO journal_messages (id, received, channel, status, raw) OVERRIDING SYSTEM VALUE"
            " VALUES (4, 'x', 'c', 'accepted', '')"
        )
    with pytest.raises(migrate.MigrationError, match=r"journal\.messages: the database holds rows with ids"):
        migrate.migrate(site, pg_url)
