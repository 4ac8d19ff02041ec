"""The delivery log: what each destination did with each message, on both store backends, recorded by the consumer
bases (and the channels' notes), shown on the console's message page."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.test_console import ADMIN, login, open_console
from tests.test_flow import fixture, send, until
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
