"""``traboule journal reprocess``: journaled messages through today's mappings into chosen channels, with real
engines (in process), the real journal, embedded bus and stores, and the command run as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.test_flow import fixture, free_port, send, until
from traboule.app import config as config_mod
from traboule.app.runtime import Runtime, channel_bindings
from traboule.model import Envelope, Identifier, ImagingOrder, Patient, ScheduledStep
from traboule.stores.journal import Journal, JournalEntry, OutboxEvent


def write_config(
    tmp_path: Path,
    *,
    fhir: bool,
    inbound: Path | None = None,
    name: str = "traboule.toml",
    amqp_url: str = "",
    database_url: str = "",
) -> Path:
    """An explicit configuration (no defaults): orders over MLLP, the worklist, and the FHIR channel if asked."""
    mapping = inbound or ROOT / "mappings" / "hl7_inbound.yaml"
    bus = f'[bus]\namqp_url = "{amqp_url}"\nexchange = "traboule-{tmp_path.name}"\n' if amqp_url else ""
    if database_url:
        bus += f'[database]\nurl = "{database_url}"\n'
    text = f"""
[engine]
defaults = false
data_dir = "{tmp_path / "var"}"
{bus}

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
mapping = "{mapping}"
source = {{adapter = "mllp-listener", host = "127.0.0.1", port = {free_port()}}}

[[channels]]
name = "worklist"
kind = "worklist"
destinations = [{{adapter = "mwl-scp", host = "127.0.0.1", port = {free_port()}, ae_title = "TRABOULE"}}]
"""
    if fhir:
        text += '\n[[channels]]\nname = "fhir"\nkind = "fhir"\n'
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    command = [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "journal", "reprocess", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


async def receive(config: Path, *messages: bytes) -> None:
    """An engine with this configuration receives the messages and delivers their events, then stops."""
    runtime = Runtime(config_mod.load(str(config), env={}))
    await runtime.start()
    try:
        await send(runtime, *messages)
        await runtime.wait_idle()
        await drained(runtime)
    finally:
        await runtime.stop()


async def drained(runtime: Runtime, timeout: float = 10.0) -> None:
    """Every queue of the engine's channels is empty (on either bus), and on the embedded bus nothing is in flight
    either (``depth`` does not count a delivery being handled: stopping then would cut its handling short)."""
    queues = [q for c in runtime.config.channels for q, _ in channel_bindings(c)]
    consumers = getattr(runtime.bus, "_consumers", {})
    deadline = asyncio.get_running_loop().time() + timeout

    async def busy() -> bool:
        waiting = any([await runtime.bus.depth(q) for q in queues])
        return waiting or any(getattr(consumers.get(q), "inflight", None) for q in queues)

    while await busy():
        assert asyncio.get_running_loop().time() < deadline, "queues not drained in time"
        await asyncio.sleep(0.05)


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def dump(path: Path) -> list[str]:
    """A store's whole content, as SQL (its file's bytes change when a reader checkpoints the WAL)."""
    db = sqlite3.connect(str(path))
    try:
        return list(db.iterdump())
    finally:
        db.close()


def queued(config: Path, queue: str | None = None) -> int:
    bus = Path(config_mod.load(str(config), env={}).data_dir) / "bus.sqlite"
    if not bus.exists():
        return 0
    if queue is None:
        return rows(bus, "SELECT COUNT(*) FROM messages")[0][0]
    return rows(bus, "SELECT COUNT(*) FROM messages WHERE queue = ?", queue)[0][0]


def service_requests(var: Path) -> dict[str, dict[str, Any]]:
    found = rows(var / "fhir.sqlite", "SELECT json FROM resources WHERE type = 'ServiceRequest'")
    return {r["id"]: r for r in (json.loads(j) for (j,) in found)}


def reprocessed_keys(var: Path) -> list[str]:
    """Idempotency keys the worklist applied that a reprocess made."""
    return [k for (k,) in rows(var / "worklist.sqlite", "SELECT idempotency_key FROM applied") if "~" in k]


def changed_inbound_mapping(tmp_path: Path) -> Path:
    """Today's inbound mapping: the procedure's meaning is now the protocol (OBR-4.5), no longer OBR-44.2/4.2."""
    folder = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings" / "tables", folder / "tables")
    text = (ROOT / "mappings" / "hl7_inbound.yaml").read_text(encoding="utf-8")
    old = "procedure.display: {from: [OBR-44.2, OBR-4.2]"
    assert old in text
    (folder / "hl7_inbound.yaml").write_text(text.replace(old, "procedure.display: {from: [OBR-4.5]"), "utf-8")
    return folder / "hl7_inbound.yaml"


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def amqp_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else ""


async def test_backfill_into_a_fhir_channel_added_after_the_orders(tmp_path: Path, amqp_url: str) -> None:
    before = write_config(tmp_path, fhir=False, amqp_url=amqp_url)
    await receive(before, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))
    var = tmp_path / "var"
    assert not (var / "fhir.sqlite").exists()  # the FHIR channel did not exist: it never saw the orders

    after = write_config(tmp_path, fhir=True, name="with-fhir.toml", amqp_url=amqp_url)
    runtime = Runtime(config_mod.load(str(after), env={}))
    await runtime.start()
    try:
        store: Any = runtime.channel("fhir").store  # type: ignore[attr-defined]
        assert store.count("ServiceRequest") == 0
        out = cli(after, "--type", "ORM^O01", "--to", "fhir")
        assert out.returncode == 0, out.stderr
        assert "1 message(s) reprocessed into fhir" in out.stdout
        await until(lambda: store.count("ServiceRequest") == 1)
        (request,) = service_requests(var).values()
        assert any(i["value"] == "ACC0001" for i in request["identifier"])
        assert request["status"] == "active"
        await drained(runtime)
        # Only the channel asked for: the worklist did not get the order again.
        assert reprocessed_keys(var) == []
    finally:
        await runtime.stop()


async def test_running_the_same_reprocess_twice_applies_it_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir=True)
    await receive(config, fixture("orm_o01_nw_latin1.hl7"))
    var = tmp_path / "var"
    version = service_requests(var).copy()

    # The engine is stopped: the events wait in the channels' durable queues.
    first = cli(config, "1", "--to", "fhir,worklist")
    assert first.returncode == 0, first.stderr
    assert "engine not running" in first.stderr
    assert queued(config, "fhir") == 1 and queued(config, "worklist") == 1
    second = cli(config, "1", "--to", "fhir,worklist")
    assert second.returncode == 0, second.stderr
    assert queued(config, "fhir") == 2 and queued(config, "worklist") == 2

    runtime = Runtime(config_mod.load(str(config), env={}))
    await runtime.start()
    try:
        await until(lambda: queued(config) == 0)
    finally:
        await runtime.stop()
    assert len(reprocessed_keys(var)) == 1  # the second run's event had the same key: a duplicate
    items = rows(var / "worklist.sqlite", "SELECT key FROM items")
    assert len(items) == 1
    # Same mapping, same content: the FHIR resource was not even versioned again.
    assert service_requests(var) == version


async def test_dry_run_shows_a_changed_mapping_and_changes_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir=True)
    await receive(config, fixture("orm_o01_nw_latin1.hl7"))
    var = tmp_path / "var"
    unchanged = cli(config, "1", "--to", "fhir,worklist", "--dry-run")
    assert unchanged.returncode == 0, unchanged.stderr
    assert "fhir: no change" in unchanged.stdout and "worklist: no change" in unchanged.stdout

    today = write_config(tmp_path, fhir=True, inbound=changed_inbound_mapping(tmp_path), name="today.toml")
    stores = {name: dump(var / name) for name in ("worklist.sqlite", "fhir.sqlite", "journal.sqlite", "bus.sqlite")}
    out = cli(today, "--type", "ORM", "--to", "fhir,worklist", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "journal entry 1  ORM^O01  accepted" in text
    assert "the event as received is not kept" in text
    fhir_diff = text[text.index("--- fhir ServiceRequest/") :]
    assert '-        "display": "Scanner thoraco-abdomino-pelvien"' in fhir_diff
    assert '+        "display": "Protocole TAP inject\u00e9"' in fhir_diff
    worklist_diff = text[text.index("--- worklist ") :]
    assert '+      "CodeMeaning": "Protocole TAP inject\u00e9",' in worklist_diff
    assert "dry run: 1 message(s), 1 would change fhir, worklist, 0 would fail; nothing was sent" in text

    assert {name: dump(var / name) for name in stores} == stores
    assert queued(config) == 0
    assert not (var / "reprocess.json").exists()


async def test_dry_run_compares_the_event_with_the_one_still_in_the_outbox(tmp_path: Path) -> None:
    """A message journaled while the bus was away: its event is still in the outbox, and today's differs."""
    config = write_config(tmp_path, fhir=True)
    raw = fixture("orm_o01_nw_latin1.hl7")
    recorded = ImagingOrder(
        placer_order_number=Identifier("PLC0001", "RIS"),
        accession_number=Identifier("ACC0001"),
        patient=Patient(ids=[Identifier("IPP0001", "CHU-LYON")]),
        steps=[ScheduledStep(modality="MR")],
    )
    env = Envelope(recorded, idempotency_key="k:0")
    journal = Journal(tmp_path / "var" / "journal.sqlite")
    await journal.append(
        JournalEntry("ris-orders", raw, "accepted", message_type="ORM^O01", idempotency_key="k"),
        [OutboxEvent("order.new", env.id, env.to_json())],
    )
    journal.close()
    out = cli(config, "1", "--to", "fhir", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "event 0 order.new: changed (against the event in the outbox)" in out.stdout
    assert '-      "modality": "MR",' in out.stdout and '+      "modality": "CT",' in out.stdout
    assert "fhir: ServiceRequest/" in out.stdout and " new" in out.stdout


async def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir=False)
    await receive(
        config,
        fixture("orm_o01_nw_latin1.hl7"),
        fixture("orm_o01_no_pid3.hl7"),  # rejected: not selected (--status accepted by default)
        fixture("omi_o23_nw_utf8.hl7"),
        fixture("orm_o01_xo_change.hl7"),
    )
    with_fhir = write_config(tmp_path, fhir=True, name="with-fhir.toml")
    first = cli(with_fhir, "--since", "2000-01-01", "--to", "fhir", "--max", "2")
    assert first.returncode == 0, first.stderr
    assert "stopped after journal entry 3: --resume continues" in first.stdout
    state = json.loads((tmp_path / "var" / "reprocess.json").read_text())
    assert (state["after"], state["done"], state["finished"]) == (3, 2, "")

    again = cli(with_fhir, "--resume")
    assert again.returncode == 0, again.stderr
    state = json.loads((tmp_path / "var" / "reprocess.json").read_text())
    assert (state["after"], state["done"]) == (4, 3) and state["finished"]
    bodies = rows(tmp_path / "var" / "bus.sqlite", "SELECT headers FROM messages WHERE queue = 'fhir' ORDER BY seq")
    assert [json.loads(h)["journal-id"] for (h,) in bodies] == ["1", "3", "4"]  # each once, in order
    assert "nothing to resume" in cli(with_fhir, "--resume").stderr

    runtime = Runtime(config_mod.load(str(with_fhir), env={}))
    await runtime.start()
    try:
        store: Any = runtime.channel("fhir").store  # type: ignore[attr-defined]
        await until(lambda: queued(with_fhir) == 0)
        assert store.count("ServiceRequest") == 2  # ACC0001 (new, then changed) and the OMI order
    finally:
        await runtime.stop()


async def test_clear_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, fhir=True)
    await receive(config, fixture("orm_o01_nw_latin1.hl7"))
    out = cli(config, "99", "--to", "fhir")
    assert out.returncode == 1 and "no journal entry 99" in out.stderr
    out = cli(config, "--type", "ADT^A08", "--to", "fhir")
    assert out.returncode == 1 and "no journal entry matches the selection" in out.stderr
    out = cli(config, "1", "--to", "fhir,pacs")
    assert out.returncode == 1 and "unknown channel 'pacs'" in out.stderr and "['fhir', 'worklist']" in out.stderr
    out = cli(config, "--channel", "mpps", "--to", "fhir")
    assert out.returncode == 1 and "unknown channel 'mpps': the inbound HL7 channels are ['ris-orders']" in out.stderr
    out = cli(config, "1")
    assert out.returncode == 2 and "--to CHANNEL" in out.stderr
    out = cli(config, "--to", "fhir")
    assert out.returncode == 2 and "say which messages" in out.stderr
    assert queued(config) == 0


async def test_a_report_is_reprocessed_as_the_document_it_made(tmp_path: Path) -> None:
    before = write_config(tmp_path, fhir=False)
    await receive(before, fixture("orm_o01_nw_latin1.hl7"), fixture("oru_r01_pdf.hl7"))
    var = tmp_path / "var"
    ((made,),) = rows(var / "ris-orders.reports.sqlite", "SELECT id FROM documents")

    with_fhir = write_config(tmp_path, fhir=True, name="with-fhir.toml")
    out = cli(with_fhir, "--type", "ORU", "--to", "fhir,worklist")
    assert out.returncode == 0, out.stderr
    ((topic, headers),) = rows(var / "bus.sqlite", "SELECT topic, headers FROM messages WHERE queue = 'fhir'")
    assert topic == "document.publish" and json.loads(headers)["journal-id"] == "2"
    assert queued(with_fhir, "worklist") == 0  # it takes no document events
    runtime = Runtime(config_mod.load(str(with_fhir), env={}))
    await runtime.start()
    try:
        await drained(runtime)
    finally:
        await runtime.stop()
    documents = rows(var / "fhir.sqlite", "SELECT json FROM resources WHERE type = 'DocumentReference'")
    (reference,) = (json.loads(j) for (j,) in documents)
    assert reference["masterIdentifier"]["value"].endswith(made)  # the same version, not a new one
    assert rows(var / "ris-orders.reports.sqlite", "SELECT COUNT(*) FROM documents") == [(1,)]


async def test_a_report_is_reprocessed_from_the_shared_reports_store_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    before = write_config(tmp_path, fhir=False, database_url=pg_url)
    await receive(before, fixture("orm_o01_nw_latin1.hl7"), fixture("oru_r01_pdf.hl7"))
    assert not (tmp_path / "var" / "ris-orders.reports.sqlite").exists()  # the document is in the database

    with_fhir = write_config(tmp_path, fhir=True, name="with-fhir.toml", database_url=pg_url)
    out = cli(with_fhir, "--type", "ORU", "--to", "fhir")
    assert out.returncode == 0, out.stderr
    ((topic, headers),) = rows(
        tmp_path / "var" / "bus.sqlite", "SELECT topic, headers FROM messages WHERE queue = 'fhir'"
    )
    assert topic == "document.publish" and json.loads(headers)["journal-id"] == "2"


async def test_reprocessing_checks_the_patient_identity_as_at_ingest(tmp_path: Path) -> None:
    """A message refused for an identity conflict reaches no channel: it is selected only with `--status rejected`
    and refused again then (listed, nothing queued). An accepted one is checked too: a merged IPP's events name
    its survivor, and what is sent is recorded."""
    config = write_config(tmp_path, fhir=True)
    order = fixture("orm_o01_nw_latin1.hl7")
    conflict = order.replace(b"279035121518989", b"279035121519088").replace(b"MSG0001", b"MSG0002")
    await receive(config, order, conflict, fixture("adt_a40_merge.hl7"))
    var = tmp_path / "var"
    journal = Journal(var / "journal.sqlite")
    try:
        assert [(e.id, e.status) for e in reversed(journal.recent(3))] == [
            (1, "accepted"),
            (2, "rejected"),
            (3, "accepted"),
        ]
        assert journal.get(2).error.startswith("PID-3: identity conflict")  # type: ignore[union-attr]
    finally:
        journal.close()

    out = cli(config, "2", "--to", "worklist")
    assert out.returncode == 2 and "only with --status rejected" in out.stderr
    out = cli(config, "2", "--status", "rejected", "--to", "worklist")
    assert out.returncode == 1, out.stderr
    assert "journal entry 2: refused: PID-3: identity conflict" in out.stdout
    assert "(1 refused by the patient identity checks)" in out.stdout
    assert queued(config) == 0  # the patient is not on the worklist
    out = cli(config, "2", "--status", "rejected", "--to", "worklist", "--dry-run")
    assert out.returncode == 1 and "refused: PID-3: identity conflict" in out.stdout

    # The accepted order of IPP0001, merged since into IPP0009: its event names IPP0009, with the order's INS.
    out = cli(config, "1", "--to", "worklist")
    assert out.returncode == 0, out.stderr
    ((body,),) = rows(var / "bus.sqlite", "SELECT body FROM messages WHERE queue = 'worklist'")
    ids = [i.value for i in Envelope.from_json(body).payload.patient.ids]
    assert ids[0] == "IPP0009" and "279035121518989" in ids and "IPP0001" not in ids
    recorded = rows(var / "patients.sqlite", "SELECT ipp, ins FROM ins ORDER BY ipp")
    assert ("IPP0009", "279035121518989") in recorded
