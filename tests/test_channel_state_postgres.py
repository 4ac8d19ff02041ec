"""The channels' own states on PostgreSQL, as two engine nodes on one database see them (a real PostgreSQL server,
``tests/peer_postgres.py``): an MPPS N-SET reaching the node that did not take its N-CREATE, two nodes racing for
one MPPS instance or one XDS submission, the HL7 senders' marks and pending documents; a hold's bounded wait, the
first calls after a server restart, a channel's event loop while the database makes it wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import shared_path
from tests.test_flow import free_port, until
from tests.test_mpps import Modality, Ris, completed, in_progress
from tests.test_xds import channel_config, level3, publish
from tests.xds_endpoint import XDSEndpoint, make_pki
from traboule.adapters.mllp import MLLPListener
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.model import Envelope, PerformedStep
from traboule.stores.factory import PostgresStores
from traboule.stores.mpps_state import MPPSInstance
from traboule.stores.postgres import connect
from traboule.stores.postgres import mpps_state as postgres_mpps_state
from traboule.stores.postgres.idempotency import PostgresAppliedKeys
from traboule.stores.postgres.mpps_state import PostgresMPPSStates
from traboule.stores.postgres.sender_state import PostgresSenderState
from traboule.stores.postgres.submissions import PostgresSubmissions
from traboule.stores.sender_state import KnownOrder
from traboule.stores.submissions import Submission

pytestmark = pytest.mark.timeout(60)


def _unscheduled() -> Dataset:
    """An N-CREATE without a worklist item (the study UID only): accepted on its own, no order needed."""
    item = Dataset()
    item.update({"StudyInstanceUID": generate_uid(), "AccessionNumber": "", "RequestedProcedureID": ""})
    item.ScheduledProcedureStepSequence = [Dataset()]
    item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID = ""
    item.update({"PatientName": "DUPONT^Helene", "PatientID": "IPP0001", "IssuerOfPatientID": "CHU-LYON"})
    return in_progress(item)


async def test_an_n_set_received_by_another_node_finds_the_n_create(tmp_path: Path, pg_url: str) -> None:
    """Node A takes the N-CREATE, node B the N-SET COMPLETED (Success, not "no such instance"); then A refuses a
    further N-SET (no longer updatable) and B a second N-CREATE (duplicate): both read the instance's state in the
    database, and neither keeps a SQLite file of its own for it."""
    nodes, ports = [], []
    for name in ("a", "b"):
        port = free_port()
        mpps = {"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": port}]}
        cfg = Config(data_dir=str(tmp_path / name), channels=[mpps])
        cfg.database_url = pg_url
        nodes.append(Runtime(cfg))
        ports.append(port)
    for node in nodes:
        await node.start()
    uid, step = generate_uid(), _unscheduled()
    on_a, on_b = Modality(ports[0]), Modality(ports[1])
    try:
        assert await on_a.create(uid, step) == 0x0000
        assert (await on_b.set(uid, completed())).Status == 0x0000
        refused = await on_a.set(uid, completed())
        assert (refused.Status, refused.get("ErrorID")) == (0x0110, 0xA710)
        assert await on_b.create(uid, step) == 0x0111
    finally:
        on_a.close()
        on_b.close()
        for node in nodes:
            await node.stop()
    with connect(pg_url) as db:
        journaled = db.execute(
            "SELECT message_type, status FROM journal_messages WHERE channel = 'mpps' ORDER BY id"
        ).fetchall()
        (state,) = db.execute("SELECT status FROM mpps_instances WHERE uid = %s", (uid,)).fetchall()
    assert journaled == [
        ("N-CREATE", "accepted"),
        ("N-SET", "accepted"),
        ("N-SET", "rejected"),
        ("N-CREATE", "rejected"),
    ]
    assert state == ("COMPLETED",)
    assert not list(tmp_path.glob("*/mpps.sqlite"))


async def test_two_nodes_creating_one_instance_at_once_create_it_once(pg_url: str) -> None:
    """Four nodes hold the same new instance at once: one finds it absent and creates it, the others wait and find
    it; a hold of another instance does not wait for them."""
    nodes = [PostgresMPPSStates(pg_url, "mpps") for _ in range(4)]
    created: list[int] = []

    async def create(i: int) -> None:
        async with nodes[i].hold("1.2.3") as held:
            if held.current is None:
                await asyncio.sleep(0.1)  # a journal write, during which the others wait
                held.save("IN PROGRESS", f"node {i}".encode())
                created.append(i)

    try:
        await asyncio.wait_for(asyncio.gather(*(create(i) for i in range(len(nodes)))), 30)
        assert len(created) == 1
        assert nodes[0].get("1.2.3") == MPPSInstance("IN PROGRESS", f"node {created[0]}".encode())
        async with nodes[0].hold("1.2.3"):
            started = time.monotonic()
            async with nodes[1].hold("1.2.4") as other:  # another instance: no wait
                assert other.current is None
            assert time.monotonic() - started < 1
    finally:
        for node in nodes:
            node.close()


def test_a_document_claimed_by_one_node_is_free_again_when_that_node_dies(pg_url: str) -> None:
    """Node A claims a document and stores its entry; node B is refused the claim, and reads A's entry; A's session
    ends without releasing (a node killed): the server dropped the lock, B claims it and keeps A's entryUUID; A's
    next call finds its session gone and runs on a new one (the old connection closed)."""
    a, b = PostgresSubmissions(pg_url, "dmp"), PostgresSubmissions(pg_url, "dmp")
    try:
        claim = a.claim("1.2.3.1")
        assert claim.__enter__() is True
        a.begin("1.2.3.1", "urn:uuid:a", "set")
        with b.claim("1.2.3.1") as mine:
            assert not mine
        assert b.begin("1.2.3.1", "urn:uuid:b", "set").entry_uuid == "urn:uuid:a"
        with connect(pg_url) as db:  # the node dies: its session ends
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND pid <> pg_backend_pid()"
            )
        deadline = time.monotonic() + 10
        while True:
            with b.claim("1.2.3.1") as mine:
                if mine:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        b.registered("1.2.3.1", "1.2.9.1")
        gone = a._db
        assert a.get("1.2.3.1").status == "registered"  # type: ignore[union-attr]  # a's session is gone: a new one
        assert gone.closed and a._db is not gone
    finally:
        a.close()
        b.close()


def test_the_senders_state_is_shared_by_the_nodes_and_wired_by_the_factory(tmp_path: Path, pg_url: str) -> None:
    """Through `PostgresStores`: a document node A could not deliver holds back its replacement on node B; B's
    mark, made with the pending row's removal, is the marks table every node reads (`applied_keys`); an order
    remembered by A fills B's status message. Nothing is written into the data folders."""
    a, b = PostgresStores(pg_url, tmp_path / "a"), PostgresStores(pg_url, tmp_path / "b")
    on_a, on_b = a.sender_state("drimbox"), b.sender_state("drimbox")
    keys = b.applied_keys("drimbox")
    try:
        assert isinstance(keys, PostgresAppliedKeys)
        on_a.set_pending("doc-1")
        assert on_b.is_pending("doc-1")
        assert on_b.mark_done("event-1", "D0001", clear_pending="doc-1")
        assert not on_a.is_pending("doc-1") and on_a.is_done("event-1") and keys.detail("event-1") == "D0001"
        assert not on_a.mark_done("event-1", "D0002")
        on_a.remember_order("ACC1", KnownOrder("P1^RIS", "", "IPP1^^^CHU^PI", "1.2.3"))
        assert on_b.known_order("ACC1") == KnownOrder("P1^RIS", "", "IPP1^^^CHU^PI", "1.2.3")
        assert b.sender_state("ris-status").known_order("ACC1") is None  # each channel its own rows
    finally:
        on_a.close()
        on_b.close()
        keys.close()
    described = a.describe()
    assert all(described[s].startswith("postgresql") for s in ("applied_keys", "sender_state", "mpps_states"))
    assert described["submissions"].startswith("postgresql")
    assert not list(tmp_path.rglob("*.sqlite"))
    a.check()  # every schema at the version this code knows


async def test_concurrent_n_sets_on_two_nodes_apply_one_final_status(tmp_path: Path, pg_url: str) -> None:
    """N-SET COMPLETED on node A and N-SET DISCONTINUED on node B of one instance at the same moment: exactly one is
    accepted, the other is refused as no longer updatable, and one procedure event is journaled for it."""
    nodes, ports = [], []
    for name in ("a", "b"):
        port = free_port()
        mpps = {"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": port}]}
        cfg = Config(data_dir=str(tmp_path / name), channels=[mpps])
        cfg.database_url = pg_url
        nodes.append(Runtime(cfg))
        ports.append(port)
    for node in nodes:
        await node.start()
    uid = generate_uid()
    on_a, on_b = Modality(ports[0]), Modality(ports[1])
    discontinued = Dataset()
    discontinued.PerformedProcedureStepStatus = "DISCONTINUED"
    try:
        assert await on_a.create(uid, _unscheduled()) == 0x0000
        answers = await asyncio.gather(on_a.set(uid, completed()), on_b.set(uid, discontinued))
        assert sorted(int(a.Status) for a in answers) == [0x0000, 0x0110]
    finally:
        on_a.close()
        on_b.close()
        for node in nodes:
            await node.stop()
    with connect(pg_url) as db:
        final = db.execute(
            "SELECT count(*) FROM journal_messages WHERE channel = 'mpps' AND message_type = 'N-SET'"
            " AND status = 'accepted'"
        ).fetchone()
    assert final == (1,)


async def test_a_hold_waits_for_another_node_a_bounded_time_then_the_connection_serves_again(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hold not granted within the hold's lock timeout fails (the request is answered with a failure status the
    modality sends again), well before the channel's request timeout; the store's next hold works."""
    assert postgres_mpps_state.HOLD_LOCK_TIMEOUT_MS <= 5_000  # the channel's request_timeout is 20 s
    monkeypatch.setattr(postgres_mpps_state, "HOLD_LOCK_TIMEOUT_MS", 300)
    a, b = PostgresMPPSStates(pg_url, "mpps"), PostgresMPPSStates(pg_url, "mpps")
    try:
        async with b.hold("1.2.3"):
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                async with a.hold("1.2.3"):
                    pass
            assert time.monotonic() - started < 3
        async with a.hold("1.2.3") as held:
            await asyncio.to_thread(held.save, "IN PROGRESS", b"created")
        assert b.get("1.2.3") == MPPSInstance("IN PROGRESS", b"created")
    finally:
        a.close()
        b.close()


async def test_a_save_is_written_in_its_hold_whatever_connection_the_store_has_since(pg_url: str) -> None:
    """The store's connection replaced while an instance is held: the save still goes into the hold's transaction,
    rolled back with it (never committed on its own outside the hold)."""
    states = PostgresMPPSStates(pg_url, "mpps")
    held_on = None
    try:
        with pytest.raises(RuntimeError, match="journal"):
            async with states.hold("1.2.3") as held:
                held_on, states._db = states._db, connect(pg_url)
                await asyncio.to_thread(held.save, "IN PROGRESS", b"created")
                raise RuntimeError("the journal refused the request")
        assert states.get("1.2.3") is None
    finally:
        states.close()
        if held_on is not None:
            held_on.close()


async def test_the_first_calls_after_a_server_restart_run_on_a_new_session() -> None:
    """The server restarts (fast shutdown: every session ended) between two requests: the first MPPS hold after it
    (no failure answered to the modality), the first calls of the submissions and the sender state run on a new
    session, and the ended sessions' connections are closed."""
    from tests.test_ha import private_postgres, start_postgres, stop_postgres

    with private_postgres() as server:
        url = server.url(server.create_database())
        mpps, submissions = PostgresMPPSStates(url, "mpps"), PostgresSubmissions(url, "dmp")
        state = PostgresSenderState(url, "drimbox")
        try:
            async with mpps.hold("1.2.3") as held:
                await asyncio.to_thread(held.save, "IN PROGRESS", b"created")
            submissions.begin("1.2.3.1", "urn:uuid:a", "set")
            state.set_pending("doc-1")
            ended = [mpps._db, submissions._db, state.keys.db]
            stop_postgres(server)
            start_postgres(server)
            async with mpps.hold("1.2.3") as held:
                assert held.current == MPPSInstance("IN PROGRESS", b"created")
                await asyncio.to_thread(held.save, "COMPLETED", b"completed")
            assert submissions.get("1.2.3.1") == Submission("1.2.3.1", "urn:uuid:a", "sending")
            assert state.is_pending("doc-1")
            assert [conn.closed for conn in ended] == [True, True, True]
            assert PostgresMPPSStates(url, "mpps").get("1.2.3") == MPPSInstance("COMPLETED", b"completed")
        finally:
            mpps.close()
            submissions.close()
            state.close()


async def test_an_xds_channel_waiting_for_the_database_does_not_stall_the_event_loop(
    tmp_path: Path, pg_url: str
) -> None:
    """Another session locks the submissions table for 2 s (a database that makes every statement wait): the
    channel's delivery waits in a worker thread while the event loop runs on (MLLP ingest, the bus's heartbeats);
    once the lock is gone the document is registered."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    endpoint = XDSEndpoint(pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    cfg = Config(data_dir=str(tmp_path / "data"), channels=[channel_config(pki, endpoint)])
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    await runtime.start()
    locker = connect(pg_url)
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE xds_submissions IN ACCESS EXCLUSIVE MODE")
        doc = level3()
        await publish(runtime, doc)
        assert await _loop_lag(2.0) < 0.5
        assert endpoint.received == []  # the delivery is waiting for the database
        locker.execute("ROLLBACK")
        await until(lambda: len(endpoint.accepted()) == 1, timeout=20)
        await until(lambda: runtime.channel("dmp").entry(doc.id).status == "registered")  # type: ignore[attr-defined]
    finally:
        locker.close()
        await runtime.stop()
        endpoint.stop()


async def _loop_lag(seconds: float) -> float:
    """The longest the event loop was late over ``seconds`` (a 50 ms sleep's lateness)."""
    lag, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        lag = max(lag, time.monotonic() - started - 0.05)
    return lag


async def test_an_hl7_sender_waiting_for_the_database_does_not_stall_the_event_loop(
    tmp_path: Path, pg_url: str
) -> None:
    """Another session locks the senders' marks for 2 s: the ``hl7-status`` channel's state calls wait in a worker
    thread while the event loop runs on; once the lock is gone the status message reaches the RIS, marked once."""
    ris = Ris()
    ris.listener = MLLPListener(ris.handle, port=0, name="ris")
    await ris.listener.start()
    status = {
        "name": "ris-status",
        "kind": "hl7-status",
        "destination": {"adapter": "mllp-sender", "host": "127.0.0.1", "port": ris.listener.port, "timeout": 5},
    }
    cfg = Config(data_dir=str(tmp_path / "data"), channels=[status])
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    await runtime.start()
    locker = connect(pg_url)
    try:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE applied_keys IN ACCESS EXCLUSIVE MODE")
        step = PerformedStep(sop_instance_uid="1.2.3", status="COMPLETED", accession_number="ACC1", modality="CT")
        env = Envelope(step, source="test", idempotency_key="mpps|1.2.3|COMPLETED")
        await runtime.bus.publish("procedure.completed", env.to_json(), message_id=env.id)
        assert await _loop_lag(2.0) < 0.5
        assert ris.received == []  # the delivery is waiting for the database
        locker.execute("ROLLBACK")
        await until(lambda: len(ris.accepted()) == 1, timeout=20)
        with connect(pg_url) as db:
            assert db.execute("SELECT count(*) FROM applied_keys WHERE consumer = 'ris-status'").fetchone() == (1,)
    finally:
        locker.close()
        await runtime.stop()
        await ris.listener.stop()
