"""The lease of work that runs on one node at a time (`traboule.stores.postgres.lease`), on a real PostgreSQL: one
holder per database, a free lease taken by the next retry, a lost session noticed by the holder's next check."""

from __future__ import annotations

import asyncio
import time

import pytest
import structlog

from traboule.stores.factory import PostgresStores, SQLiteStores
from traboule.stores.postgres import connect
from traboule.stores.postgres.journal import LOCK_KEY
from traboule.stores.postgres.lease import CHECK_INTERVAL, CLASS_ID, RETRY, Lease, LocalLease, lease_key
from traboule.stores.postgres.migrations import LOCK_KEY as MIGRATIONS_KEY

pytestmark = pytest.mark.timeout(30)


def _holder(url: str, name: str) -> int | None:
    """The backend pid holding the lease ``name``, as the server's lock table says."""
    _, key = lease_key(name)
    with connect(url) as db:
        row = db.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
            " AND classid::bigint = %s AND objid::bigint = %s",
            (CLASS_ID, key & 0xFFFF_FFFF),
        ).fetchone()
    return int(row[0]) if row else None


async def test_one_holder_per_database_and_the_next_retry_takes_a_released_lease(pg_url: str) -> None:
    a, b = Lease(pg_url, "outbox"), Lease(pg_url, "outbox")
    other = Lease(pg_url, "another")
    try:
        assert await a.try_acquire() and a.held
        assert not await b.try_acquire() and not b.held
        assert await other.try_acquire()  # another name, another lease
        assert _holder(pg_url, "outbox") is not None
        waiting = asyncio.create_task(b.acquire())
        await asyncio.sleep(RETRY * 1.5)
        assert not waiting.done() and not b.held
        started = time.monotonic()
        await a.release()
        assert not a.held
        await asyncio.wait_for(waiting, RETRY * 3)
        assert b.held and time.monotonic() - started <= RETRY * 2.5
        assert not await a.try_acquire()
    finally:
        for lease in (a, b, other):
            await lease.release()


async def test_the_key_space_is_apart_from_the_journal_and_migrations_locks(pg_url: str) -> None:
    """The single-bigint advisory keys of the journal and the migrations, held by another session, never block a
    lease (nor does a lease whose two ints read like those keys)."""
    assert lease_key("outbox") != lease_key("prune") and lease_key("outbox")[0] == CLASS_ID
    with connect(pg_url) as db:
        db.execute("SELECT pg_advisory_lock(%s), pg_advisory_lock(%s)", (LOCK_KEY, MIGRATIONS_KEY))
        for big in (LOCK_KEY, MIGRATIONS_KEY):  # the same 64 bits in the two-int space: another lock
            hi, lo = big >> 32, big & 0xFFFF_FFFF
            row = db.execute("SELECT pg_try_advisory_lock(%s, %s)", (hi, lo - (1 << 32) if lo >= 1 << 31 else lo))
            assert row.fetchone() == (True,)
        lease = Lease(pg_url, "outbox")
        try:
            assert await lease.try_acquire()
        finally:
            await lease.release()


async def test_a_lost_session_loses_the_lease_at_the_next_check_and_another_node_takes_it(pg_url: str) -> None:
    """The server ends the holder's session (as it does for a node gone): the holder's check fails within about
    a second, ``held`` turns false and ``lost()`` returns; the other node's retry takes the lease."""
    a, b = Lease(pg_url, "outbox"), Lease(pg_url, "outbox")
    try:
        await a.acquire()
        lost = asyncio.create_task(a.lost())
        taken = asyncio.create_task(b.acquire())
        await asyncio.sleep(0.2)
        assert not lost.done() and not taken.done()
        pid = _holder(pg_url, "outbox")
        assert pid is not None
        started = time.monotonic()
        with connect(pg_url) as db:
            assert db.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        await asyncio.wait_for(lost, CHECK_INTERVAL * 3)
        assert not a.held
        await asyncio.wait_for(taken, RETRY * 3)
        assert b.held and time.monotonic() - started < CHECK_INTERVAL + RETRY * 2.5
        assert _holder(pg_url, "outbox") not in (None, pid)
        assert not await a.try_acquire()  # reconnects, finds the lease taken
    finally:
        await a.release()
        await b.release()


async def test_the_factories_lease(tmp_path, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """SQLite stores are one node: their lease is always held and never lost."""
    local = SQLiteStores(tmp_path).lease("outbox")
    assert isinstance(local, LocalLease) and local.held
    await local.acquire()
    never = asyncio.create_task(local.lost())
    await asyncio.sleep(0.05)
    assert not never.done()
    never.cancel()
    shared = PostgresStores(pg_url, tmp_path).lease("outbox")
    try:
        assert isinstance(shared, Lease) and not shared.held
        await shared.acquire()
        assert shared.held and _holder(pg_url, "outbox") is not None
    finally:
        await shared.release()
    assert _holder(pg_url, "outbox") is None


async def test_an_engine_publishes_only_while_it_holds_the_outbox_lease(tmp_path, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    """Another node holds the lease: the engine journals and answers AA but publishes nothing (``standby``). The
    lease released, the engine takes it and publishes what waited. Its session ended by the server, it stops
    (``outbox.standby``), takes the lease again and publishes on."""
    from tests.test_flow import ack_code, engine_config, fixture, send, store, until
    from traboule.app.runtime import Runtime

    other = Lease(pg_url, "outbox")
    assert await other.try_acquire()
    cfg = engine_config(tmp_path)
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack_code(ack) == "AA"
        await asyncio.sleep(RETRY * 1.5)
        assert runtime.outbox_role == "standby" and runtime.health()["outbox"] == "standby"
        assert store(runtime).count() == 0 and runtime.health()["outbox_pending"] == 1
        await other.release()
        await until(lambda: store(runtime).count() == 1, RETRY * 3)
        assert runtime.outbox_role == "leader"
        with structlog.testing.capture_logs() as logs:
            pid = _holder(pg_url, "outbox")
            assert pid is not None
            with connect(pg_url) as db:
                db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            await until(lambda: any(e["event"] == "outbox.standby" for e in logs), CHECK_INTERVAL * 3)
            await until(lambda: runtime.outbox_role == "leader", RETRY * 3)
        assert [e["event"] for e in logs if e["event"].startswith("outbox.")] == ["outbox.standby", "outbox.leader"]
        assert _holder(pg_url, "outbox") not in (None, pid)
        order = fixture("orm_o01_nw_latin1.hl7").replace(b"MSG0001", b"MSG0002").replace(b"ACC0001", b"ACC0002")
        (ack,) = await send(runtime, order.replace(b"PLC0001", b"PLC0002").replace(b"FIL0001", b"FIL0002"))
        assert ack_code(ack) == "AA"
        await until(lambda: store(runtime).count() == 2)
        await runtime.wait_idle()
    finally:
        await runtime.stop()
        await other.release()
    assert _holder(pg_url, "outbox") is None  # stopping gives the lease up
