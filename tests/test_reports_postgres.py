"""The reports store on PostgreSQL: what two engine nodes sharing one database add to the rules every backend keeps
(those are pinned by tests/test_store_contracts.py and, on SQLite, tests/test_reports.py and
tests/test_report_waiting.py). Two `ReportPublisher` instances on one database are two nodes; a publisher that
pauses between building a version and storing it makes the other node's write land in between."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.test_engine import cli
from tests.test_flow import ack_code, engine_config, fixture, send, until
from tests.test_reports import report_of, study
from traboule import model
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.model import Envelope
from traboule.stores.factory import PostgresStores
from traboule.stores.postgres import connect
from traboule.stores.postgres.reports import PostgresReportStorage
from traboule.stores.reports import (
    Held,
    ReportPublisher,
    Waiting,
    held_report,
    held_reports,
    kept_messages,
    request_publication,
)
from traboule.translate.cda import CDAMapping

pytestmark = pytest.mark.timeout(120)


class Node(ReportPublisher):
    """A node's publisher whose next validation, once ``pause`` is set, waits until the test lets it go: the moment
    between building a version (its number, the version it replaces) and storing it."""

    def __init__(self, url: str, channel: str = "ris-orders", node: str = "", **kwargs: Any) -> None:
        super().__init__(CDAMapping(), PostgresReportStorage(url, channel, node=node), **kwargs)
        self.pause = False
        self.reached = threading.Event()
        self.go = threading.Event()
        self.built: list[bytes] = []  # every CDA it built (a retry builds again)

    def _check(self, data: bytes) -> None:
        self.built.append(data)
        if self.pause:
            self.pause = False
            self.reached.set()
            assert self.go.wait(30)
        super()._check(data)


def correction(action: str = "replace") -> model.Report:
    report = report_of(fixture("oru_r01_report.hl7"))
    report.action = action
    return report


def versions(url: str, channel: str = "ris-orders") -> list[tuple[int, str, str]]:
    """(version, status, id) of every document of the channel, by version."""
    with connect(url) as db:
        rows = db.execute(
            "SELECT version, status, id FROM report_documents WHERE channel = %s ORDER BY version", (channel,)
        ).fetchall()
    return [(int(v), str(s), str(i)) for v, s, i in rows]


@pytest.fixture
def nodes(pg_url: str) -> Any:
    a, b = Node(pg_url, node="node-a"), Node(pg_url, node="node-b")
    yield a, b
    a.close()
    b.close()


def test_a_version_built_while_another_node_stored_one_is_built_again_on_top_of_it(nodes: Any, pg_url: str) -> None:
    a, b = nodes
    a.remember([study()])
    first = a.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(first, model.Document) and first.version == 1
    a.built.clear()
    a.pause = True
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(a.prepare, correction(), "m2")  # node A builds version 2 on version 1 ...
        assert a.reached.wait(30)
        other = b.prepare(correction(), "m3")  # ... node B stores its own version 2 meanwhile
        a.go.set()
        mine = late.result(30)
    assert isinstance(other, model.Document) and (other.version, other.replaces) == (2, first.id)
    # A's first build named version 2; the store refused it, and A built version 3 on B's version.
    assert isinstance(mine, model.Document) and (mine.version, mine.replaces) == (3, other.id)
    assert len(a.built) == 2  # built twice: on version 1, refused, then on version 2
    assert b'<versionNumber value="3"/>' in base64.b64decode(mine.content)
    assert versions(pg_url) == [(1, "superseded", first.id), (2, "superseded", other.id), (3, "current", mine.id)]
    # Both nodes read the same set: a resend of either message on the other node is the same document.
    again = b.prepare(correction(), "m2")
    assert isinstance(again, model.Document) and again.id == mine.id and b.current(first.set_id).id == mine.id  # type: ignore[union-attr]


def test_corrections_on_two_nodes_at_once_number_every_version_once(nodes: Any, pg_url: str) -> None:
    a, b = nodes
    a.remember([study()])
    keys = [f"c{i}" for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        docs = list(pool.map(lambda k: (a if int(k[1:]) % 2 else b).prepare(correction("publish"), k), keys))
    assert all(isinstance(d, model.Document) for d in docs)
    numbered = sorted((d.version, d.replaces, d.id) for d in docs)  # type: ignore[union-attr]
    assert [v for v, _, _ in numbered] == list(range(1, 13))  # no number twice, none lost
    assert [r for _, r, _ in numbered] == ["", *[i for _, _, i in numbered[:-1]]]  # each replaces the one before
    stored = versions(pg_url)
    assert [s for _, s, _ in stored] == ["superseded"] * 11 + ["current"]
    for doc in docs:  # the bytes as built: the hash the event carries is the stored CDA's
        kept = b.document(doc.id)  # type: ignore[union-attr]
        assert kept is not None and hashlib.sha1(base64.b64decode(kept.content)).hexdigest() == doc.sha1  # type: ignore[union-attr]


def test_one_message_on_two_nodes_at_once_makes_one_version(nodes: Any, pg_url: str) -> None:
    a, b = nodes
    a.remember([study()])
    a.pause = True
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(a.prepare, report_of(fixture("oru_r01_report.hl7")), "m1")
        assert a.reached.wait(30)
        other = b.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")  # the sender tried the other node too
        a.go.set()
        mine = late.result(30)
    assert isinstance(mine, model.Document) and isinstance(other, model.Document)
    assert (mine.id, mine.version) == (other.id, other.version) == (other.id, 1)
    assert len(versions(pg_url)) == 1


def test_a_waiting_report_is_published_by_one_node_only(nodes: Any, pg_url: str) -> None:
    a, b = nodes
    held = a.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")  # its study is not known yet
    assert isinstance(held, Waiting) and held.new
    again = b.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")  # a resend to the other node
    assert isinstance(again, Held) and not again.new and b.counts()["waiting"] == 1
    b.remember([study()])  # node B hears of the study; both nodes' waiting tasks look at the report
    assert a.waiting_for([], ["ACC0001"]) == b.waiting_for([], ["ACC0001"]) == ["m1"]
    b.pause = True
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(b.publish_waiting, "m1")  # B builds the document from the waiting report ...
        assert b.reached.wait(30)
        published = a.publish_waiting("m1")  # ... A publishes it meanwhile
        b.go.set()
        assert late.result(30) is None  # B's store was refused, and the report waits no more: nothing to do
    assert isinstance(published, model.Document) and published.version == 1
    assert len(versions(pg_url)) == 1
    row = b.held("m1")
    assert row is not None and (row["status"], row["document_id"]) == ("published", published.id)
    assert [r["message_key"] for r in b.unnoted()] == ["m1"]  # one outcome to write into the journal entry ...
    assert a.unnoted() == [] and len(b.unnoted()) == 1  # ... by the node that listed it (A's task leaves it)
    b.noted(row["n"], 7)
    assert a.unnoted() == b.unnoted() == []
    assert a.publish_waiting("m1") is None and b.publish_waiting("m1") is None


def test_a_node_starting_undoes_its_own_unjournaled_versions_never_those_another_node_is_journaling(
    nodes: Any, pg_url: str
) -> None:
    a, b = nodes
    a.remember([study()])
    first = a.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    mine = a.prepare(correction(), "m2")  # node A stored it, then died before journaling it
    theirs = b.prepare(correction(), "m3")  # node B is journaling this one right now
    assert isinstance(first, model.Document) and isinstance(mine, model.Document) and isinstance(theirs, model.Document)
    held = b.prepare(correction(), "m4")
    assert isinstance(held, model.Document)

    def journaled(key: str) -> bool:
        return key == "m1"

    assert a.reconcile(journaled) == 1  # A's restart: its own m2 only
    assert a.document(mine.id) is None and b.document(theirs.id) is not None
    assert [v for v, _, _ in versions(pg_url)] == [1, 3, 4]
    with connect(pg_url) as db:  # node B never came back: its preparations are orphans after a while
        db.execute("UPDATE report_messages SET prepared = now() - interval '1 hour' WHERE message_key = 'm4'")
    assert a.reconcile(journaled) == 1
    assert a.document(held.id) is None and a.current(first.set_id).id == theirs.id  # type: ignore[union-attr]


def test_a_waiting_report_expired_by_another_node_is_not_published(nodes: Any, pg_url: str) -> None:
    a, b = nodes
    assert isinstance(a.prepare(report_of(fixture("oru_r01_report.hl7")), "m1"), Waiting)
    a.remember([study()])
    a.pause = True
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(a.publish_waiting, "m1")
        assert a.reached.wait(30)
        assert b.expire(now=2e10) == 1  # past its deadline on node B meanwhile: a dead letter
        a.go.set()
        assert late.result(30) is None
    assert versions(pg_url) == []
    row = a.held("m1")
    assert row is not None and row["status"] == "expired"


def test_an_operator_ask_goes_to_one_node(nodes: Any) -> None:
    a, b = nodes
    held = a.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(held, Waiting)
    a.expire(now=2e10)
    assert request_publication(b, held.n, 60.0) == "expired"  # `traboule reports publish N`, from any node
    assert request_publication(b, held.n + 1000) is None
    asks = [a.requested(), b.requested()]
    assert sorted(asks, key=len) == [[], ["m1"]]
    row = held_report(a, held.n)
    assert row is not None and row["status"] == "waiting"
    assert [r["n"] for r in held_reports(a.storage, ("waiting",))] == [held.n]
    assert kept_messages(b) == {"m1"}  # `traboule journal prune` keeps its journal entry


def test_each_channel_has_its_own_sets(pg_url: str) -> None:
    orders, other = Node(pg_url, "ris-orders"), Node(pg_url, "ris-other")
    try:
        for node in (orders, other):
            node.remember([study()])
        one = orders.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
        two = other.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
        assert isinstance(one, model.Document) and isinstance(two, model.Document)
        assert (one.id, one.version) == (two.id, two.version)  # numbered per channel, as one file per channel was
        assert orders.counts() == other.counts() == {"waiting": 0, "dead_letters": 0}
        assert len(versions(pg_url, "ris-orders")) == len(versions(pg_url, "ris-other")) == 1
    finally:
        orders.close()
        other.close()


def test_texts_with_nul_characters_are_kept_as_they_came(pg_url: str) -> None:
    node = Node(pg_url)
    try:
        key = "m\x00\x01\x02"  # an idempotency key made of what the sender put in MSH
        held = node.prepare(report_of(fixture("oru_r01_report.hl7")), key)
        assert isinstance(held, Waiting)
        row = node.held(key)
        assert row is not None and row["message_key"] == key and node.held("m") is None
        assert node.waiting_for([], ["ACC0001"]) == [key] and [k for _, k, *_ in node.scan(0, 10)] == [key]
        node.storage.settle(key, "invalid", "refused: \x00\x01")
        (dead,) = node.unnoted()
        assert (dead["message_key"], dead["reason"]) == (key, "refused: \x00\x01")
        assert node.prepare(report_of(fixture("oru_r01_report.hl7")), key).new is False  # type: ignore[union-attr]
        node.remember([study()])
        doc = node.publish_waiting(key)
        assert isinstance(doc, model.Document) and node.document(doc.id) == doc
        assert node.storage.message(key) == (doc.id, "publish")
    finally:
        node.close()


def test_the_engine_s_store_factory_keeps_reports_in_postgresql(tmp_path: Path, pg_url: str) -> None:
    stores = PostgresStores(pg_url, tmp_path)
    reports = stores.reports("ris-orders", CDAMapping(), wait_for_study=60.0)
    try:
        assert isinstance(reports, ReportPublisher) and isinstance(reports.storage, PostgresReportStorage)
        assert stores.describe()["reports"].startswith("postgresql (")
        stores.check()
        held = reports.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
        assert isinstance(held, Waiting)
    finally:
        reports.close()
    assert list(tmp_path.iterdir()) == []  # no SQLite file in the data folder
    again = stores.reports("ris-orders", CDAMapping())  # a restart: the same rows
    try:
        assert again.counts()["waiting"] == 1
    finally:
        again.close()


async def test_the_engine_holds_a_report_in_postgresql_and_publishes_it_when_its_study_comes(
    tmp_path: Path, pg_url: str
) -> None:
    cfg = engine_config(tmp_path / "node")
    cfg.channels[0]["reports"] = {"validate": False}
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    await runtime.start()
    documents: list[model.Document] = []

    async def probe(delivery: Delivery) -> None:
        documents.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await runtime.bus.subscribe("probe", ["document.#"], probe)
    try:
        (ack,) = await send(runtime, fixture("oru_r01_report.hl7"))
        assert ack_code(ack) == "AA"
        reports = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        assert isinstance(reports.storage, PostgresReportStorage) and reports.counts()["waiting"] == 1
        env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "cli"), TRABOULE_DATABASE_URL=pg_url)
        listed = await asyncio.to_thread(cli, "reports", "waiting", env=env)  # an operator, on another machine
        assert listed.returncode == 0 and "1 report(s)" in listed.stdout, listed.stdout + listed.stderr
        study_event = Envelope(study())
        await runtime.bus.publish("study.stable", study_event.to_json(), message_id=study_event.id)
        await until(lambda: len(documents) == 1)
        assert (documents[0].action, documents[0].version) == ("publish", 1)
        await until(lambda: not reports.unnoted())
        listed = await asyncio.to_thread(cli, "reports", "waiting", "--all", env=env)
        assert " published " in listed.stdout and documents[0].id in listed.stdout, listed.stdout + listed.stderr
    finally:
        await runtime.stop()
    assert not list((tmp_path / "node").glob("*.reports.sqlite"))


def test_orders_remembered_by_two_nodes_at_once_are_merged_not_overwritten(pg_url: str) -> None:
    """A batch of orders is read, merged and written in a few statements: an accession another node inserts
    between this node's read and its insert is read again and merged with it."""
    a, b = PostgresReportStorage(pg_url, "ris-orders"), PostgresReportStorage(pg_url, "ris-orders")
    calls: list[int] = []

    def merge(stored: Any, summary: Any) -> Any:
        if not calls:  # after node A's read, before its insert: node B inserts A3 and commits
            with ThreadPoolExecutor(1) as other:
                other.submit(b.remember, [("A3", {"b": 2})], [], [], lambda s, n: {**s, **n}).result(30)
        calls.append(1)
        return {**stored, **summary}

    try:
        a.remember([("A1", {"x": 1})], [], [], merge)
        a.remember([("A0", {"x": 1}), ("A0", {"y": 2}), ("A1", {"y": 2}), ("A3", {"a": 1})], [], [], merge)
        assert a.order("A0") == {"x": 1, "y": 2} and a.order("A1") == {"x": 1, "y": 2}
        assert a.order("A3") == {"b": 2, "a": 1} == b.order("A3")
    finally:
        a.close()
        b.close()


def test_the_message_that_made_a_document_is_found_by_an_index(pg_url: str) -> None:
    """The console's documents page asks, for each document shown, which message made it (its DRIMbox feed rows):
    an index look-up, not a read of every report message of the channel."""
    from traboule.app.console.worklist import ShownDocument, _made_by

    node = Node(pg_url)
    try:
        node.remember([study()])
        made = node.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
        assert isinstance(made, model.Document)
        shown = {"ACC0001": [ShownDocument(made.id, "", 1, "current", "", "", [], [], [])]}
        assert _made_by(node.storage, "ris-orders", shown) == {made.id: "m1"}
    finally:
        node.close()
    with connect(pg_url) as db:
        db.execute("SET enable_seqscan = off")  # the plan for a large table, whatever this one's size
        plan = " ".join(
            r[0]
            for r in db.execute(
                "EXPLAIN SELECT document_id, message_key FROM report_messages"
                " WHERE channel = %s AND document_id = ANY(%s)",
                ("ris-orders", [made.id]),
            )
        )
    assert "report_messages_document" in plan, plan
