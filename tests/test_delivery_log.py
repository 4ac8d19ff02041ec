"""The delivery log: what each destination did with each message, on both store backends, recorded by the consumer
bases (and the channels' notes), shown on the console's message page."""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.test_console import ADMIN, login, open_console
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, store, until
from tests.test_mpps import Modality, Ris, in_progress
from tests.test_reports import TCC, study
from traboule.adapters.mllp import MLLPListener
from traboule.app.http import create_app
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.channel import ConsumerChannel
from traboule.errors import PermanentError
from traboule.model import Envelope, Identifier, ImagingOrder, topic_of
from traboule.stores import delivery_log
from traboule.stores.delivery_log import MAX_DETAIL, DeliveryRecord, DeliveryRecorder
from traboule.stores.factory import PostgresStores, SQLiteStores
from traboule.stores.journal import Query


def factory_of(tmp_path: Path, database_url: str) -> SQLiteStores:
    return PostgresStores(database_url, tmp_path) if database_url else SQLiteStores(tmp_path)


def test_the_log_keeps_a_messages_rows_bounded_and_prunes(tmp_path: Path, database_url: str) -> None:
    log = factory_of(tmp_path, database_url).delivery_log()
    try:
        log.add(
            [
                DeliveryRecord(
                    "K1:0", "C1", "worklist", "applied", "applied: 1 item(s) written", "2026-01-01T00:00:01"
                ),
                DeliveryRecord("K1:1", "C1", "fhir", "error", "FHIRServerError (attempt 1)", "2026-01-01T00:00:02"),
                DeliveryRecord("K10:0", "C10", "worklist", "applied", "", "2026-01-01T00:00:03"),  # another message
                DeliveryRecord("", "C1", "fhir.push", "applied", "Patient/7/_history/2 201", "2026-06-01T00:00:00"),
                DeliveryRecord("", "C10", "fhir.push", "applied", "", "2026-06-01T00:00:00"),
                DeliveryRecord("K1:2", "C1", "dmp", "duplicate", "x\x00y\n" * 400),  # now; NUL, lines, too long
            ]
        )
        rows = log.of("K1", "C1")
        assert [(r.channel, r.outcome) for r in rows] == [
            ("worklist", "applied"),
            ("fhir", "error"),
            ("fhir.push", "applied"),
            ("dmp", "duplicate"),
        ]
        assert rows[0].detail == "applied: 1 item(s) written" and rows[0].at == "2026-01-01T00:00:01"
        assert (
            len(rows[-1].detail) == MAX_DETAIL
            and rows[-1].detail.startswith("x\x00y x\x00y")
            and "\n" not in rows[-1].detail
        )
        assert [r.key for r in log.of("K10")] == ["K10:0"]
        assert log.of("K") == [] and log.of("K1:0")[0].channel == "worklist"
        assert log.prune("2026-03-01T00:00:00") == 3
        assert [r.channel for r in log.of("K1", "C1")] == ["fhir.push", "dmp"]
    finally:
        log.close()
    with pytest.raises(ValueError, match="outcome"):
        DeliveryRecord("K", "C", "worklist", "sent")


def test_a_failing_log_drops_its_rows_and_never_raises(tmp_path: Path) -> None:
    def refuse() -> Any:
        raise OSError("disk gone")

    recorder = DeliveryRecorder(refuse)
    started = time.perf_counter()
    recorder.add(DeliveryRecord("K:0", "C", "worklist", "applied"))
    assert time.perf_counter() - started < 0.1  # never waits for the store
    deadline = time.monotonic() + 5
    while recorder.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.dropped == 1


def test_close_writes_the_waiting_rows_at_once(tmp_path: Path) -> None:
    from traboule.stores.delivery_log import FLUSH_S, SQLiteDeliveryLog

    path = tmp_path / "deliveries.sqlite"
    recorder = DeliveryRecorder(lambda: SQLiteDeliveryLog(path))
    for n in range(3):
        recorder.add(DeliveryRecord(f"K{n}:0", "C", "worklist", "applied"))
    started = time.perf_counter()
    recorder.close()
    assert time.perf_counter() - started < FLUSH_S  # not at the next round: now
    log = SQLiteDeliveryLog(path)
    try:
        assert [r.key for n in range(3) for r in log.of(f"K{n}")] == ["K0:0", "K1:0", "K2:0"]
    finally:
        log.close()
    recorder.add(DeliveryRecord("K9:0", "C", "worklist", "applied"))  # after close: written all the same
    recorder.close()
    log = SQLiteDeliveryLog(path)
    try:
        assert [r.key for r in log.of("K9")] == ["K9:0"]
    finally:
        log.close()


class Failing(ConsumerChannel):
    """A consumer whose destination fails ``fail`` deliveries with ``error``, then notes what it wrote."""

    kind = "test-failing"
    error: Exception = ConnectionError("down")
    fail = 0

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error
        if delivery.attempt == 9:  # what a destination that already has it says
            self.note(env, "seen already", "duplicate")
        else:
            self.note(env, "item written")


async def test_the_consumer_base_records_each_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery_log, "FLUSH_S", 0.05)
    stores = SQLiteStores(tmp_path)
    channel = Failing({"name": "dest", "topics": ["order.#"], "max_attempts": 3}, SimpleNamespace(stores=stores))

    async def deliver(key: str, attempt: int) -> None:
        env = Envelope(ImagingOrder(placer_order_number=Identifier("P1")), "ris", f"{key}:0", "CID")
        await channel.handle(Delivery(topic_of(env.payload), env.to_json(), env.id, {}, attempt))

    channel.fail = 1
    with pytest.raises(ConnectionError):
        await deliver("A", 1)
    await deliver("A", 2)
    channel.fail, channel.error = 1, ConnectionError("still down")
    with pytest.raises(ConnectionError):
        await deliver("B", 3)  # the last attempt: the bus dead-letters it
    channel.fail, channel.error = 1, PermanentError("refused")
    with pytest.raises(PermanentError):
        await deliver("C", 1)
    await deliver("D", 9)
    log = stores.delivery_log()
    try:
        deadline = time.monotonic() + 5
        while len(log.of("D")) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert [(r.outcome, r.detail) for r in log.of("A", "CID")] == [
            ("error", "ConnectionError (attempt 1)"),
            ("applied", "item written"),
        ]
        assert [r.outcome for r in log.of("B")] == ["dead_letter"]
        assert [(r.outcome, r.detail) for r in log.of("C")] == [("dead_letter", "PermanentError (attempt 1)")]
        assert [(r.channel, r.outcome, r.detail) for r in log.of("D")] == [("dest", "duplicate", "seen already")]
        assert channel._notes == {}  # nothing noted is left behind
    finally:
        log.close()


async def test_the_message_page_shows_what_the_worklist_did(tmp_path: Path) -> None:
    async with open_console(tmp_path) as (runtime, client):
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack.segment("MSA") is not None
        assert runtime.journal is not None
        (entry,) = runtime.journal.select(Query(), after=0, limit=10)
        log = runtime.stores.delivery_log()
        try:
            await until(lambda: bool(log.of(entry.idempotency_key)), timeout=8)
            (row,) = log.of(entry.idempotency_key)
            assert (row.channel, row.outcome) == ("worklist", "applied")
            assert row.detail == "applied: 1 item(s) written, 0 removed" and row.key.startswith(entry.idempotency_key)
            # The same event again (a redelivery): the worklist says it already applied it.
            again = Envelope(ImagingOrder(placer_order_number=Identifier("X")), "test", row.key, row.correlation_id)
            await runtime.bus.publish(topic_of(again.payload), again.to_json(), message_id=again.id)
            await until(lambda: len(log.of(entry.idempotency_key)) == 2, timeout=8)
            assert [r.outcome for r in log.of(entry.idempotency_key)] == ["applied", "duplicate"]
        finally:
            log.close()
        await login(client, ADMIN)
        page = await client.get(f"/console/messages/{entry.id}")
        assert page.status_code == 200
        table = re.search(r'<table id="destinations">(.*?)</table>', page.text, re.S)
        assert table, page.text
        assert re.findall(r"<tr class=\"outcome-(\w+)\"><td>(\w+)</td>", table.group(1)) == [
            ("applied", "worklist"),
            ("duplicate", "worklist"),
        ]
        assert "1 item(s) written" in table.group(1)


def test_what_a_fhir_server_answered_is_said_in_plain_references_only() -> None:
    from traboule.channels.fhir_push import answered

    response = {
        "entry": [
            {"response": {"location": "https://h.example/FHIR/R4/Patient/12/_history/3", "status": "201 Created"}},
            {"response": {"location": "ServiceRequest/a-1/_history/1", "status": "200 OK"}},
            {"response": {"location": "Patient/<script>/_history/1\n", "status": "200"}},
            {},
        ]
        + [{"response": {"status": "200 OK"}}] * 10
    }
    assert answered(response) == (
        "Patient/12/_history/3 201, ServiceRequest/a-1/_history/1 200, 200, , " + ", ".join(["200"] * 6) + " (+4)"
    )


@contextlib.asynccontextmanager
async def engine_with(
    tmp_path: Path, *channels: dict[str, Any], reports: dict[str, Any] | None = None, database_url: str = ""
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """An engine (orders, with ``reports`` settings → worklist; and ``channels``), an admin token and a client of
    its HTTP app (console and /fhir)."""
    cfg = engine_config(tmp_path, database_url=database_url)
    cfg.api_tokens = [ADMIN]
    if reports is not None:
        cfg.channels[0]["reports"] = reports
    cfg.channels.extend(channels)
    runtime = Runtime(cfg)
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield runtime, client
    finally:
        await runtime.stop()


def destinations(page: httpx.Response) -> list[tuple[str, str, str]]:
    """(outcome, channel, text of the rest) of each row of a message page's destinations table."""
    assert page.status_code == 200, page.text
    table = re.search(r'<table id="destinations">(.*?)</table>', page.text, re.S)
    assert table, page.text
    rows = re.findall(r'<tr class="outcome-(\w+)"><td>([\w.-]+)</td>(.*?)</tr>', table.group(1), re.S)
    return [(o, c, " ".join(html.unescape(re.sub(r"<[^>]+>", " ", rest)).split())) for o, c, rest in rows]


async def rows_of(runtime: Runtime, key: str, count: int) -> list[DeliveryRecord]:
    """The delivery log's rows of ``key`` once there are ``count``."""
    log = runtime.stores.delivery_log()
    try:
        await until(lambda: len(log.of(key)) >= count, timeout=20)
        return log.of(key)
    finally:
        log.close()


def entry_of(runtime: Runtime, message_type: str) -> Any:
    assert runtime.journal is not None
    found = [e for e in runtime.journal.recent(50) if e.message_type.startswith(message_type)]
    assert found, message_type
    return found[0]  # the newest


@pytest.mark.timeout(180)
async def test_a_report_shows_its_document_on_the_message_page_and_its_sharing_on_the_documents_page(
    tmp_path: Path, database_url: str, cda_validator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_log, "FLUSH_S", 0.05)
    drimbox = Ris()
    drimbox.listener = MLLPListener(drimbox.handle, port=0, name="drimbox")
    await drimbox.listener.start()
    reports = {"validate": True, "validators": str(TCC), "cache": str(cda_validator.cache_dir)}
    feed = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": drimbox.listener.port}
    fhir = {"name": "fhir", "kind": "fhir", "api": True}
    try:
        async with engine_with(
            tmp_path,
            fhir,
            {"name": "drimbox", "kind": "hl7-documents", "destination": feed},
            reports=reports,
            database_url=database_url,
        ) as (runtime, client):
            assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"
            # Before its study: accepted, waiting.
            assert ack_code((await send(runtime, fixture("oru_r01_report.hl7")))[0]) == "AA"
            first = entry_of(runtime, "ORU")
            (waiting,) = await rows_of(runtime, first.idempotency_key, 1)
            assert (waiting.channel, waiting.outcome) == ("ris-orders", "applied")
            assert waiting.detail == "waiting for its study; CI-SIS validation: valid"
            env = Envelope(study())
            await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)  # published: fed
            await until(lambda: len(drimbox.accepted()) == 1, timeout=30)
            # The correction, its study known: a document at once.
            assert ack_code((await send(runtime, fixture("oru_r01_report_corrected.hl7")))[0]) == "AA"
            await until(lambda: len(drimbox.accepted()) == 2, timeout=30)
            second = entry_of(runtime, "ORU")
            assert second.id != first.id
            made = [r for r in await rows_of(runtime, second.idempotency_key, 2) if r.channel == "ris-orders"]
            (row,) = made
            match = re.fullmatch(r"CDA (\S+) version 2 \(replace\); CI-SIS validation: valid", row.detail)
            assert match and row.outcome == "applied", row.detail
            current = match.group(1)

            await login(client, ADMIN)
            shown = destinations(await client.get(f"/console/messages/{second.id}"))
            assert ("applied", "ris-orders") in [(o, c) for o, c, _ in shown]
            assert any(c == "ris-orders" and "CI-SIS validation: valid" in d for _, c, d in shown), shown
            assert any(c == "drimbox" and f"document {current} sent, ACK AA" in d for _, c, d in shown), shown

            # The documents page: each version fed to the DRIMbox; MHD retrievals counted.
            docs = await client.get("/console/worklist", params={"date": ""})
            assert docs.status_code == 200, docs.text
            fed = re.findall(r'<dt>(\w+)</dt><dd class="fed-(\w+)">([^<]*)</dd>', docs.text)
            assert [(d, w) for d, w, _ in fed] == [
                ("drimbox", "sent_ack"),
                ("MHD", "not_retrieved"),
                ("drimbox", "sent_ack"),
                ("MHD", "not_retrieved"),
            ], fed
            assert fed[0][2].startswith("sent, ACK AA at 20")
            bearer = {"Authorization": f"Bearer {ADMIN}"}
            found = await client.get("/fhir/DocumentReference", params={"status": "current"}, headers=bearer)
            (reference,) = [e["resource"] for e in found.json().get("entry", [])]
            url = reference["content"][0]["attachment"]["url"]
            binary = url[url.index("/fhir/") :]
            for _ in range(2):
                assert (await client.get(binary, headers=bearer)).status_code == 200
            await rows_of(runtime, current, 2)
            docs = await client.get("/console/worklist", params={"date": ""})
            fed = re.findall(r'<dt>(\w+)</dt><dd class="fed-(\w+)">([^<]*)</dd>', docs.text)
            assert (fed[1][1], fed[3][1]) == ("retrieved_times", "not_retrieved"), fed  # the current version only
            assert fed[1][2].startswith("retrieved 2 time(s), last at 20"), fed
            french = await client.get("/console/worklist", params={"date": "", "lang": "fr"})
            assert "envoyé, ACK AA le 20" in french.text and "récupéré 2 fois, la dernière le 20" in french.text

            # A report that cannot make a document: refused, said by its codes only.
            bad = fixture("oru_r01_report.hl7").decode().replace("801234567890&", "&")  # an author without RPPS
            assert ack_code((await send(runtime, bad.encode()))[0]) == "AE"
            refused = entry_of(runtime, "ORU")
            assert refused.status == "rejected"
            (row,) = await rows_of(runtime, refused.idempotency_key, 1)
            assert (row.channel, row.outcome, row.detail) == (
                "ris-orders",
                "error",
                "report refused (AE, error code 101)",
            )
    finally:
        await drimbox.listener.stop()


async def test_an_mpps_request_shows_its_outcome_on_its_message_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_log, "FLUSH_S", 0.05)
    port = free_port()
    mpps = {"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": port}]}
    async with engine_with(tmp_path, mpps) as (runtime, client):
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: store(runtime).count() == 1)
        ((_, item),) = list(store(runtime).all())
        uid = generate_uid()
        modality = await asyncio.to_thread(Modality, port)
        try:
            assert await modality.create(uid, in_progress(item)) == 0x0000
            again = Dataset()
            again.PerformedProcedureStepStatus = "IN PROGRESS"  # no change of status: journaled as a duplicate
            assert (await modality.set(uid, again)).Status == 0x0000
        finally:
            modality.close()
        created = entry_of(runtime, "N-CREATE")
        assert created.idempotency_key == f"mpps|{uid}|IN PROGRESS"
        logged = await rows_of(runtime, created.idempotency_key, 3)  # the worklist's row, then the two requests'
        rows = [r for r in logged if r.channel == "mpps"]
        assert [(r.outcome, r.detail) for r in rows] == [
            ("applied", "N-CREATE IN PROGRESS, answered 0x0000, published procedure.in-progress"),
            ("duplicate", "N-SET IN PROGRESS, answered 0x0000, status unchanged: nothing published"),
        ]
        await login(client, ADMIN)
        shown = destinations(await client.get(f"/console/messages/{created.id}"))
        assert [(o, c) for o, c, _ in shown if c == "mpps"] == [("applied", "mpps"), ("duplicate", "mpps")], shown
