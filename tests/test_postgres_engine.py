"""The engine with ``[database] url``: its channels get their stores from the engine's store factory, so the journal
and the worklist are in PostgreSQL, and two engine nodes on one database serve one worklist (an order received by
one node is found by a C-FIND on the other's MWL SCP, dcmtk findscu as the modality). Several nodes share a
RabbitMQ broker, and one of them (the holder of the "outbox" lease) publishes the shared outbox."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.peer_dcmtk import findscu, free_port, require_dcmtk
from tests.test_engine import cli
from tests.test_flow import CT_QUERY, ack_code, engine_config, fixture, send, store, until
from traboule.app.config import Config
from traboule.app.runtime import Runtime, check_database, preflight
from traboule.errors import ConfigError
from traboule.stores.factory import PostgresStores, SQLiteStores
from traboule.stores.journal import JournalEntry
from traboule.stores.postgres import connect
from traboule.stores.postgres.fhir_store import PostgresFHIRStore
from traboule.stores.postgres.journal import PostgresJournal
from traboule.stores.postgres.worklist import PostgresWorklistStore

pytestmark = pytest.mark.timeout(60)

ORDER = "fixtures/hl7/orm_o01_nw_latin1.hl7"  # accession ACC0001, CT, 2026-11-25


async def test_an_order_lands_in_the_database_s_journal_and_worklist_and_findscu_finds_it(
    tmp_path: Path, pg_url: str
) -> None:
    require_dcmtk("findscu")
    cfg = engine_config(tmp_path)
    cfg.channels.append(Config().channel("fhir"))
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    assert isinstance(runtime.stores, PostgresStores)
    await runtime.start()
    try:
        assert isinstance(runtime.journal, PostgresJournal)
        assert isinstance(store(runtime), PostgresWorklistStore)
        fhir = runtime.channel("fhir").store  # type: ignore[attr-defined]
        assert isinstance(fhir, PostgresFHIRStore)
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack_code(ack) == "AA"
        await until(lambda: store(runtime).count() == 1 and fhir.count("ServiceRequest") == 1)
        port = runtime.channel("worklist").scps[0].port  # type: ignore[attr-defined]
        found = await asyncio.to_thread(findscu, port, "TRABOULE", CT_QUERY)
        assert [str(ds.AccessionNumber) for ds in found] == ["ACC0001"]
        await runtime.wait_idle()
    finally:
        await runtime.stop()
    with connect(pg_url) as db:
        journaled = db.execute("SELECT status, message_type FROM journal_messages").fetchall()
        items = db.execute("SELECT accession_number FROM worklist_items").fetchall()
        requests = db.execute("SELECT count(*) FROM fhir_resources WHERE type = 'ServiceRequest'").fetchone()
    assert [(s, t[:3]) for s, t in journaled] == [("accepted", "ORM")] and items == [("ACC0001",)]
    assert requests == (1,)
    # In the data folder: the embedded bus only (the reports store is in PostgreSQL too).
    assert sorted(p.name for p in tmp_path.glob("*.sqlite")) == ["bus.sqlite"]
    with connect(pg_url) as db:
        owners = db.execute("SELECT count(*) FROM patients_owners").fetchone()
    assert owners is not None and owners[0] > 0  # the order's keys and their patient, for every node's checks


def test_undelivered_entries_go_to_the_journal_s_backend(tmp_path: Path, pg_url: str) -> None:
    """``record`` (an outbound message a destination refused, written from a worker process) appends to the
    PostgreSQL journal when the engine journals there, after the entries already there; SQLite otherwise."""
    stores = PostgresStores(pg_url, tmp_path)
    first = stores.record(JournalEntry("xds", b"<refused/>", "undelivered", ack_code="400"))
    second = stores.record(JournalEntry("fhir", b"{}", "undelivered", ack_code="422"))
    assert 0 < first.id < second.id
    journal = stores.journal()
    try:
        entry = journal.get(second.id)
        assert entry is not None and (entry.channel, entry.status, entry.ack_code) == ("fhir", "undelivered", "422")
    finally:
        journal.close()
    assert not (tmp_path / "journal.sqlite").exists()
    local = SQLiteStores(tmp_path).record(JournalEntry("xds", b"x", "undelivered"))
    assert local.id == 1 and (tmp_path / "journal.sqlite").exists()


def test_the_start_up_check_writes_nothing_into_the_database(tmp_path: Path, pg_url: str) -> None:
    """The channels are built on SQLite files of a scratch folder; the database is only read (no schema created);
    a schema newer than this code, two worklists on one database and an unreachable server are refused."""
    cfg = engine_config(tmp_path)
    cfg.database_url = pg_url
    assert len(preflight(cfg)) == 2
    with connect(pg_url) as db:
        tables = db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert tables == (0,)
    assert not list(tmp_path.glob("*.sqlite"))
    PostgresJournal(pg_url).close()  # the schema as a node leaves it
    with connect(pg_url) as db:
        db.execute("UPDATE traboule_schema SET version = 99 WHERE component = 'journal'")
    with pytest.raises(ConfigError, match="journal schema is version 99"):
        preflight(cfg)
    two = engine_config(tmp_path)
    two.database_url = pg_url
    two.channels.append({**two.channels[1], "name": "worklist-2", "destinations": []})
    with pytest.raises(ConfigError, match="worklist, worklist-2"):
        check_database(two)
    two.channels[2:] = [Config().channel("fhir"), {**Config().channel("fhir"), "name": "fhir-2", "api": False}]
    with pytest.raises(ConfigError, match="fhir, fhir-2"):
        check_database(two)
    cfg.database_url = f"postgresql://traboule:secret-pw@127.0.0.1:{free_port()}/none"
    with pytest.raises(ConnectionError) as refused:
        preflight(cfg)
    assert "traboule:***@127.0.0.1" in str(refused.value) and "secret-pw" not in str(refused.value)


def _variant(n: int) -> bytes:
    """The fixture order with its own control id, order numbers, accession and study (order ``n``)."""
    message = fixture("orm_o01_nw_latin1.hl7")
    for old in (b"MSG0001", b"PLC0001", b"FIL0001", b"ACC0001", b"RP0001", b"SPS0001"):
        message = message.replace(old, old[:-1] + str(n).encode())
    return message.replace(b"20261125.1^", f"20261125.{n}^".encode())


async def _published(amqp_url: str, queue: str) -> list[str]:
    """The message ids of what sits in a queue nobody consumes (taken off it): one per publish."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        ids = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            ids.append(str(message.message_id))
        return ids
    finally:
        await connection.close()


@pytest.mark.rabbitmq
async def test_two_nodes_on_one_database_and_one_broker_publish_each_event_once(
    tmp_path: Path, pg_url: str, rabbitmq_url: str, rabbitmq_exchange: str
) -> None:
    """Two engines (their own data folders and ports) on one database and one RabbitMQ exchange: one holds the
    "outbox" lease and publishes the whole shared outbox; the other journals what it receives and publishes
    nothing. A queue bound to every topic receives each event once, and the worklist has every order."""
    nodes = []
    for name in ("a", "b"):
        cfg = engine_config(tmp_path / name, rabbitmq_url, rabbitmq_exchange)
        cfg.channels[1]["destinations"] = cfg.channels[1]["destinations"][:1]  # the SCP; no worklist files
        cfg.database_url = pg_url
        nodes.append(Runtime(cfg))
    a, b = nodes
    await a.start()
    try:
        await a.bus.declare("every-event", ["#"])
        await until(lambda: a.outbox_role == "leader")
        await b.start()
        try:
            await asyncio.sleep(1.5)  # b's lease retries at least once
            assert (a.outbox_role, b.outbox_role) == ("leader", "standby")
            assert (a.health()["outbox"], b.health()["outbox"]) == ("leader", "standby")
            for n in range(1, 7):
                (ack,) = await send(nodes[n % 2], _variant(n))
                assert ack_code(ack) == "AA"
            await until(lambda: store(a).count() == 6, 20)  # about a second unloaded
            await a.wait_idle()
            with connect(pg_url) as db:
                accepted = db.execute("SELECT count(*) FROM journal_messages WHERE status = 'accepted'").fetchone()
            assert accepted == (6,)
        finally:
            await b.stop()
    finally:
        await a.stop()
    ids = await _published(rabbitmq_url, f"{rabbitmq_exchange}.every-event")
    assert len(ids) == len(set(ids)) == 6, ids  # each event once (one per order), whichever node received it


def _node(tmp_path: Path, name: str, pg_url: str, amqp_url: str, exchange: str) -> tuple[Path, dict[str, int]]:
    """A node's configuration file: its own data folder and ports, the shared database and broker."""
    ports = {"mllp": free_port(), "mwl": free_port(), "http": free_port()}
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path / name}"
defaults = false

[database]
url = "{pg_url}"

[bus]
amqp_url = "{amqp_url}"
exchange = "{exchange}"

[http]
port = {ports["http"]}

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{ adapter = "mllp-listener", host = "127.0.0.1", port = {ports["mllp"]} }}

[[channels]]
name = "worklist"
kind = "worklist"
destinations = [{{ adapter = "mwl-scp", host = "127.0.0.1", port = {ports["mwl"]}, ae_title = "TRABOULE" }}]
"""
    )
    return config, ports


class _Node:
    """``traboule run --config`` in a child process, its log lines gathered by a thread as they come."""

    def __init__(self, config: Path, http_port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        env["TRABOULE_LOG_FORMAT"] = "json"
        self.http_port = http_port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "run"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def ready(self, timeout: float = 40.0) -> None:
        """Wait for ``engine.ready`` (the bound is for a loaded machine: about two seconds otherwise)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any('"engine.ready"' in line for line in list(self.lines)):
                return
            time.sleep(0.05)
        raise AssertionError(f"node did not start (exit {self.proc.poll()}): {''.join(self.lines[-10:])}")

    def outbox(self) -> str:
        """What the node's /health says of the outbox: ``leader`` or ``standby``."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=5) as answer:
                body = answer.read()
        except urllib.error.HTTPError as refused:  # 503 while starting or degraded: the same body
            body = refused.read()
        return str(json.loads(body).get("outbox"))

    def kill(self) -> None:
        """``kill -9`` of the node (its whole process group: the node's processes only)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            assert self.proc.wait(20) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.mark.rabbitmq
@pytest.mark.timeout(120)
def test_the_standby_takes_the_outbox_when_the_leader_is_killed(
    tmp_path: Path, pg_url: str, rabbitmq_url: str, rabbitmq_exchange: str
) -> None:
    """Two ``traboule run`` nodes on one database and one broker. Node A (the first) publishes; an order sent to
    B reaches the worklist through A's dispatcher. ``kill -9`` of A: B takes the "outbox" lease and publishes an
    order it received meanwhile within 10 s (the failover time is printed); B's MWL SCP answers both orders."""
    require_dcmtk("findscu")
    config_a, ports_a = _node(tmp_path, "a", pg_url, rabbitmq_url, rabbitmq_exchange)
    config_b, ports_b = _node(tmp_path, "b", pg_url, rabbitmq_url, rabbitmq_exchange)
    node_a = _Node(config_a, ports_a["http"])
    node_b: _Node | None = None
    try:
        node_a.ready()
        _wait(lambda: node_a.outbox() == "leader", 10)
        node_b = _Node(config_b, ports_b["http"])
        node_b.ready()
        time.sleep(1.5)  # b's lease retries at least once
        assert (node_a.outbox(), node_b.outbox()) == ("leader", "standby")
        sent = cli("send", ORDER, "--to", f"127.0.0.1:{ports_b['mllp']}", env=dict(os.environ))
        assert sent.returncode == 0 and ": AA" in sent.stdout, sent.stdout + sent.stderr
        _wait(lambda: len(findscu(ports_b["mwl"], "TRABOULE", CT_QUERY)) == 1, 20)

        node_a.kill()
        killed = time.monotonic()
        second = tmp_path / "second.hl7"
        second.write_bytes(_variant(2))
        sent = cli("send", str(second), "--to", f"127.0.0.1:{ports_b['mllp']}", env=dict(os.environ))
        assert sent.returncode == 0 and ": AA" in sent.stdout, sent.stdout + sent.stderr
        _wait(lambda: node_b.outbox() == "leader", 10)
        leader_after = time.monotonic() - killed
        _wait(lambda: len(findscu(ports_b["mwl"], "TRABOULE", CT_QUERY)) == 2, 10 - leader_after)
        published_after = time.monotonic() - killed
        print(
            f"failover: B leads {leader_after:.2f} s after kill -9 of A, its pending order on the worklist"
            f" after {published_after:.2f} s"
        )
        assert published_after < 10
        found = findscu(ports_b["mwl"], "TRABOULE", CT_QUERY)
        assert sorted(str(ds.AccessionNumber) for ds in found) == ["ACC0001", "ACC0002"]
    finally:
        if node_b is not None:
            node_b.stop()
        if node_a.proc.poll() is None:
            node_a.kill()
    with connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM journal_messages WHERE status = 'accepted'").fetchone() == (2,)
        assert db.execute("SELECT count(*) FROM journal_outbox").fetchone() == (0,)
    for node in ("a", "b"):
        assert not (tmp_path / node / "journal.sqlite").exists() and not (tmp_path / node / "worklist.sqlite").exists()


def test_check_warns_that_a_database_without_a_shared_bus_is_one_node(tmp_path: Path, pg_url: str) -> None:
    """``traboule check``: ``[database] url`` with the embedded bus is one node only (its bus is its own); with an
    AMQP URL, no such warning."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    shared, _ = _node(tmp_path, "shared", pg_url, "amqp://guest:guest@127.0.0.1:5672/", "traboule")
    alone = tmp_path / "alone.toml"
    alone.write_text(shared.read_text().replace('amqp_url = "amqp://guest:guest@127.0.0.1:5672/"', ""))
    checked = cli("--config", str(alone), "check", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "warn bus: [database] url without an AMQP URL" in checked.stdout
    assert "several nodes on one database need a shared RabbitMQ" in checked.stdout
    checked = cli("--config", str(shared), "check", env=env)
    assert checked.returncode == 0 and "warn bus" not in checked.stdout, checked.stdout + checked.stderr
