"""What the PostgreSQL journal adds to the contract (tests/test_store_contracts.py): several nodes on one database
(each a `PostgresJournal` on its own event loop in its own thread), group commit on the server, and an engine whose
``[database] url`` puts its journal there."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import psycopg
import pytest

from tests.test_flow import ack_code, engine_config, fixture, send, store, until
from traboule.app.runtime import Runtime
from traboule.model import Envelope, Identifier, ImagingOrder, Patient, ScheduledStep
from traboule.stores.journal import JournalEntry, OutboxEvent, Query
from traboule.stores.postgres import connect
from traboule.stores.postgres.journal import PostgresJournal

pytestmark = pytest.mark.timeout(60)


def _nodes(url: str, count: int, work) -> list:  # type: ignore[no-untyped-def]
    """Run ``work(journal, node_number)`` on ``count`` nodes at once (a barrier lines up their first append)."""
    results: list = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def node(n: int) -> None:
        async def main() -> None:
            journal = PostgresJournal(url)
            try:
                barrier.wait()
                results[n] = await work(journal, n)
            finally:
                journal.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors
    return results


def test_the_same_messages_on_two_nodes_are_accepted_once(pg_url: str) -> None:
    """Each of 40 messages reaches both nodes at the same moment: one accepted (with its events), one duplicate."""

    async def send_all(journal: PostgresJournal, n: int) -> list[JournalEntry]:
        return await asyncio.gather(
            *(
                journal.append(
                    JournalEntry("ris-orders", b"m%d" % i, "accepted", idempotency_key=f"k{i}", peer=f"node{n}"),
                    [OutboxEvent("order.new", f"e{i}-node{n}", b"{}")],
                )
                for i in range(40)
            )
        )

    first, second = _nodes(pg_url, 2, send_all)
    for a, b in zip(first, second, strict=True):
        assert sorted((a.status, b.status)) == ["accepted", "duplicate"], (a, b)
        winner, loser = (a, b) if a.status == "accepted" else (b, a)
        assert f"journal entry {winner.id}" in loser.warnings
    journal = PostgresJournal(pg_url)
    try:
        events = journal.pending_events()
        assert len(events) == 40 and len({e.event_id.split("-")[0] for e in events}) == 40  # one per message
        assert journal.counts() == {"accepted": 40, "duplicate": 40}
    finally:
        journal.close()


def test_ids_grow_in_commit_order_across_nodes(pg_url: str) -> None:
    """Whatever the interleaving of two nodes' commits, no entry ever appears below one already visible: a reader
    paging with ``after`` misses nothing."""
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        with connect(pg_url) as db:
            after = 0
            while not done.is_set() or after < 200:
                rows = (
                    db.execute("SELECT id FROM journal_messages WHERE id > %s ORDER BY id", (after,)).fetchall()
                    if _has_table(db)
                    else []
                )
                seen.extend(r[0] for r in rows)
                after = seen[-1] if seen else 0
                if done.is_set() and not rows:
                    break

    async def send(journal: PostgresJournal, n: int) -> None:
        for i in range(20):
            await asyncio.gather(
                *(
                    journal.append(JournalEntry("ch", b"x", "accepted", idempotency_key=f"{n}-{i}-{j}"))
                    for j in range(5)
                )
            )

    PostgresJournal(pg_url).close()  # the schema exists before the reader starts
    reader = threading.Thread(target=read)
    reader.start()
    try:
        _nodes(pg_url, 2, send)
    finally:
        done.set()
        reader.join()
    with connect(pg_url) as db:
        everything = [r[0] for r in db.execute("SELECT id FROM journal_messages ORDER BY id")]
    assert len(everything) == 200 and sorted(seen) == everything  # the reader saw every one, none skipped


def _has_table(db) -> bool:  # type: ignore[no-untyped-def]
    return bool(db.execute("SELECT to_regclass('journal_messages') IS NOT NULL").fetchone()[0])


async def test_appends_of_one_loop_iteration_share_one_commit(pg_url: str) -> None:
    """Rows written by one transaction share their ``xmin``: 50 concurrent appends, one or two commits."""
    journal = PostgresJournal(pg_url)
    try:
        await journal.append(JournalEntry("ch", b"warm-up", "accepted", idempotency_key="w"))
        written = await asyncio.gather(
            *(journal.append(JournalEntry("ch", b"m", "accepted", idempotency_key=f"k{i}")) for i in range(50))
        )
        with connect(pg_url) as db:
            (transactions,) = db.execute(
                "SELECT count(DISTINCT xmin::text) FROM journal_messages WHERE id = ANY(%s)", ([e.id for e in written],)
            ).fetchone()  # type: ignore[misc]
        assert transactions == 1
    finally:
        journal.close()


async def test_a_server_that_goes_away_fails_the_append_and_the_next_one_reconnects(pg_url: str) -> None:
    """The sender is not acknowledged when the commit fails; the journal reconnects for the next message."""
    journal = PostgresJournal(pg_url)
    try:
        await journal.append(JournalEntry("ch", b"before", "accepted", idempotency_key="a"))
        with connect(pg_url) as db:  # every other connection of this database is cut
            db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        entry = JournalEntry("ch", b"lost", "accepted", idempotency_key="b")
        with pytest.raises(Exception):  # noqa: B017 - psycopg's OperationalError, whatever its subclass
            await journal.append(entry)
        assert entry.status == "accepted" and entry.id == 0  # as given: nothing of it was stored
        with pytest.raises(Exception):  # noqa: B017 - the blocking connection was cut as well
            journal.outbox_depth()
        assert journal.outbox_depth() == 0  # reconnected
        again = await journal.append(JournalEntry("ch", b"lost", "accepted", idempotency_key="b"))
        assert again.status == "accepted" and journal.accepted("b")
    finally:
        journal.close()


async def test_every_selection_filter_in_postgresql_s_dialect(pg_url: str) -> None:
    """`Query` writes SQLite's SQL; the journal translates it (placeholders, TRUE): each filter once."""
    journal = PostgresJournal(pg_url)
    try:
        a = await journal.append(JournalEntry("ch", b"a", "accepted", message_type="ORM^O01", idempotency_key="a"))
        b = await journal.append(JournalEntry("ch", b"b", "rejected", message_type="ORU^R01", idempotency_key="b"))
        c = await journal.append(JournalEntry("x", b"c", "accepted", message_type="ORMX^O01", idempotency_key="c"))
        assert [e.id for e in journal.select(Query(types=["ORM"]))] == [a.id]  # ORM, not ORMX
        assert [e.id for e in journal.select(Query(types=["ORU^R01", "ORMX"]))] == [b.id, c.id]
        assert [e.id for e in journal.select(Query(ids=[a.id, c.id], statuses=["accepted"]))] == [a.id, c.id]
        assert [e.id for e in journal.select(Query(ranges=[(b.id, c.id)], channels=["x"]))] == [c.id]
        assert journal.count(Query(since="2000-01-01", until="2999-01-01", upto=b.id)) == 2
        assert journal.count(Query()) == 3 and journal.counts() == {"accepted": 2, "rejected": 1}
        assert journal.prune("2999-01-01", keep=[]) == 3
    finally:
        journal.close()


# -- the engine on PostgreSQL ([database] url) ---------------------------------------------------------------------


async def test_an_engine_with_a_database_url_journals_there(tmp_path: Path, pg_url: str) -> None:
    """One order through MLLP: acknowledged once in PostgreSQL, its events published from the database's outbox to
    the worklist; nothing in a journal.sqlite. Then an event left in the outbox (a crash before publishing) reaches
    the worklist when the engine starts again."""
    cfg = engine_config(tmp_path)
    cfg.database_url = pg_url
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        assert isinstance(runtime.journal, PostgresJournal)
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack_code(ack) == "AA"
        await until(lambda: store(runtime).count() == 1)
        await runtime.wait_idle()
    finally:
        await runtime.stop()
    assert not (tmp_path / "journal.sqlite").exists()
    journal = PostgresJournal(pg_url)
    try:
        (entry,) = journal.recent()
        assert entry.status == "accepted" and entry.message_type.startswith("ORM") and journal.outbox_depth() == 0
        order = ImagingOrder(
            placer_order_number=Identifier("PLC-PG", "RIS"),
            accession_number=Identifier("ACC-PG"),
            patient=Patient(ids=[Identifier("IPP9", "CHU")]),
            steps=[ScheduledStep(step_id="S1", modality="CT", start="20261125100000")],
        )
        env = Envelope(order, idempotency_key="pg-crash-1")
        await journal.append(
            JournalEntry(channel="ris-orders", raw=b"MSH|...", status="accepted", idempotency_key="pg-crash-1"),
            [OutboxEvent("order.new", env.id, env.to_json())],
        )
    finally:
        journal.close()  # the process dies here: the event never reached the bus
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        await until(lambda: store(runtime).count() == 2)
        assert store(runtime).keys_for_accession("ACC-PG")
        await runtime.wait_idle()
        assert runtime.journal is not None and runtime.journal.outbox_depth() == 0
    finally:
        await runtime.stop()


async def test_an_entry_the_server_refuses_fails_alone(pg_url: str) -> None:
    """A value PostgreSQL refuses (here a NUL in an event id) fails only its own append: the group commit it was in
    is committed again one entry at a time, on the asyncio path and at close (the blocking path)."""
    journal = PostgresJournal(pg_url)
    try:

        def appends(tag: str) -> list[asyncio.Future[JournalEntry]]:
            return [
                asyncio.ensure_future(journal.append(JournalEntry("ch", b"ok", "accepted", idempotency_key=f"{tag}1"))),
                asyncio.ensure_future(
                    journal.append(
                        JournalEntry("ch", b"bad", "accepted", idempotency_key=f"{tag}2"),
                        [OutboxEvent("order.new", "e\x00", b"{}")],
                    )
                ),
                asyncio.ensure_future(journal.append(JournalEntry("ch", b"ok", "rejected", control_id=f"{tag}3"))),
            ]

        first = await asyncio.gather(*appends("a"), return_exceptions=True)
        assert isinstance(first[1], psycopg.DataError)
        assert [e.status for e in (first[0], first[2])] == ["accepted", "rejected"]  # type: ignore[union-attr]
        late = appends("b")
        await asyncio.sleep(0)  # queued, not yet committing: close commits them
        journal.close()
        second = await asyncio.gather(*late, return_exceptions=True)
        assert isinstance(second[1], psycopg.DataError)
        assert [e.status for e in (second[0], second[2])] == ["accepted", "rejected"]  # type: ignore[union-attr]
    finally:
        journal.close()
    journal = PostgresJournal(pg_url)
    try:
        assert journal.counts() == {"accepted": 2, "rejected": 2}
        assert not journal.accepted("a2") and not journal.accepted("b2") and journal.outbox_depth() == 0
    finally:
        journal.close()


@pytest.mark.parametrize("with_append", [False, True])
async def test_confirmations_made_before_close_are_committed_with_a_commit_in_flight(
    pg_url: str, with_append: bool
) -> None:
    """The bus confirmed an event, its deletion is being committed (or an append is) when the engine closes the
    journal: once ``close`` returns the outbox is empty, without the loop running again."""
    journal = PostgresJournal(pg_url)
    appended: list[asyncio.Future[JournalEntry]] = []
    try:
        await journal.append(JournalEntry("ch", b"m", "accepted", idempotency_key="m"), [OutboxEvent("t", "e", b"{}")])
        (event,) = journal.pending_events()
        await journal.events_published([event.id])
        if with_append:
            appended.append(asyncio.ensure_future(journal.append(JournalEntry("ch", b"n", "rejected"))))
        while journal._flush_task is None:  # the confirmation's own commit starts (after PUBLISHED_DELAY): seen at
            await asyncio.sleep(0)  # once, a commit of one round trip may end within a millisecond
        if with_append:
            await asyncio.sleep(0)
            await journal.events_published([event.id + 1000])  # another one queued behind the commit in flight
        else:
            await asyncio.sleep(0)  # into the commit: connecting, locking or deleting
    finally:
        journal.close()
    with connect(pg_url) as db:
        row = db.execute("SELECT count(*) FROM journal_outbox").fetchone()
    assert row == (0,) or (with_append and row == (1,))
    assert [e.status for e in await asyncio.gather(*appended)] == (["rejected"] if with_append else [])
    with connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM journal_outbox").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM journal_messages").fetchone() == (2 if with_append else 1,)


async def test_one_group_commit_keeps_each_entry_s_events_and_finds_duplicates_within_it(pg_url: str) -> None:
    """The entries of one group commit go out together (one statement, entries and events): an accepted entry keeps
    its events in order, a second one with its key in the same commit is a duplicate without events (with the
    SQLite journal's warning), a refused entry and an accepted one without a key are stored as they are: all of them
    in the one transaction."""
    journal = PostgresJournal(pg_url)
    try:
        await journal.append(JournalEntry("ch", b"warm-up", "accepted", idempotency_key="w"))
        first, again, refused, keyless = await asyncio.gather(
            journal.append(
                JournalEntry("ch", b"a", "accepted", idempotency_key="k"),
                [OutboxEvent("order.new", "e1", b"one"), OutboxEvent("order.change", "e2", b"\x00two")],
            ),
            journal.append(JournalEntry("ch", b"a", "accepted", idempotency_key="k"), [OutboxEvent("t", "e3", b"3")]),
            journal.append(JournalEntry("ch", b"bad", "rejected", idempotency_key="r", error="MSH-9: unknown")),
            journal.append(JournalEntry("ch", b"b", "accepted"), [OutboxEvent("order.new", "e4", b"four")]),
        )
        assert (first.status, again.status, refused.status, keyless.status) == (
            "accepted",
            "duplicate",
            "rejected",
            "accepted",
        )
        assert f"same message as journal entry {first.id}" in again.warnings
        assert len({first.id, again.id, refused.id, keyless.id}) == 4 and 0 not in (again.id, refused.id)
        assert [(e.topic, e.event_id, e.body) for e in journal.outbox_of(first.id)] == [
            ("order.new", "e1", b"one"),
            ("order.change", "e2", b"\x00two"),
        ]
        assert journal.outbox_of(again.id) == [] and journal.outbox_of(refused.id) == []
        assert [e.event_id for e in journal.outbox_of(keyless.id)] == ["e4"]
        assert journal.get(again.id).status == "duplicate"  # type: ignore[union-attr]
        with connect(pg_url) as db:
            (transactions,) = db.execute(
                "SELECT count(DISTINCT xmin::text) FROM journal_messages WHERE id = ANY(%s)",
                ([first.id, again.id, refused.id, keyless.id],),
            ).fetchone()  # type: ignore[misc]
        assert transactions == 1  # the duplicate too: no second transaction after the batch committed
        assert first.id < again.id < refused.id < keyless.id  # in the order of the appends
    finally:
        journal.close()


async def test_a_batch_of_new_and_duplicate_keys_is_one_transaction_and_one_answer(pg_url: str) -> None:
    """Keys already committed and keys new, in one group commit: every row of it written by one transaction (they
    share their ``xmin``), every sender answered from it, the duplicates stored with the SQLite journal's warning and
    without their events."""
    journal = PostgresJournal(pg_url)
    try:
        old = [await journal.append(JournalEntry("ch", b"m", "accepted", idempotency_key=f"o{i}")) for i in range(3)]
        written = await asyncio.gather(
            *(
                journal.append(
                    JournalEntry("ch", b"m", "accepted", idempotency_key=f"{k}{i}"), [OutboxEvent("t", k, b"")]
                )
                for i in range(3)
                for k in ("o", "n")
            ),
        )
        with connect(pg_url) as db:
            (transactions,) = db.execute(
                "SELECT count(DISTINCT xmin::text) FROM journal_messages WHERE id = ANY(%s)", ([e.id for e in written],)
            ).fetchone()  # type: ignore[misc]
        assert transactions == 1
        assert [e.status for e in written] == ["duplicate", "accepted"] * 3
        assert [e.id for e in written] == sorted(e.id for e in written) and min(e.id for e in written) > old[-1].id
        for seen, again in zip(old, written[::2], strict=True):
            assert again.warnings == f"same message as journal entry {seen.id}"
            assert journal.get(again.id).warnings == again.warnings  # type: ignore[union-attr]
        assert journal.counts() == {"accepted": 6, "duplicate": 3}
        assert [(e.message_id, e.event_id) for e in journal.pending_events()] == [(e.id, "n") for e in written[1::2]]
    finally:
        journal.close()


async def test_a_refused_entry_leaves_the_rest_of_its_batch_journaled_once(pg_url: str) -> None:
    """A ``DataError`` in one entry rolls its group commit back as a whole: the others, committed again one at a
    time, are journaled once each (a keyed entry is not its own duplicate, a keyless one not stored twice, their
    events not queued twice), and so on the blocking path of ``close``."""
    journal = PostgresJournal(pg_url)
    try:
        for tag in ("a", "b"):

            def appends(tag: str = tag) -> list[asyncio.Future[JournalEntry]]:
                return [
                    asyncio.ensure_future(
                        journal.append(
                            JournalEntry("ch", b"k", "accepted", idempotency_key=f"{tag}k"),
                            [OutboxEvent("t", f"{tag}1", b"")],
                        )
                    ),
                    asyncio.ensure_future(
                        journal.append(JournalEntry("ch", b"k", "accepted", idempotency_key=f"{tag}k"))
                    ),
                    asyncio.ensure_future(
                        journal.append(JournalEntry("ch", b"bad", "accepted"), [OutboxEvent("t", "\x00", b"")])
                    ),
                    asyncio.ensure_future(
                        journal.append(JournalEntry("ch", b"free", "accepted"), [OutboxEvent("t", f"{tag}2", b"")])
                    ),
                ]

            futures = appends()
            if tag == "b":
                await asyncio.sleep(0)  # queued, not yet committing: close commits them
                journal.close()
            keyed, again, bad, free = await asyncio.gather(*futures, return_exceptions=True)
            assert isinstance(bad, psycopg.DataError)
            assert (keyed.status, again.status, free.status) == ("accepted", "duplicate", "accepted")  # type: ignore[union-attr]
            assert again.warnings == f"same message as journal entry {keyed.id}"  # type: ignore[union-attr]
    finally:
        journal.close()
    with connect(pg_url) as db:
        rows = db.execute("SELECT raw, status, count(*) FROM journal_messages GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
        events = db.execute("SELECT event_id FROM journal_outbox ORDER BY id").fetchall()
    assert rows == [(b"free", "accepted", 2), (b"k", "accepted", 2), (b"k", "duplicate", 2)]
    assert [e for (e,) in events] == ["a1", "a2", "b1", "b2"]


async def test_a_database_of_the_previous_schema_is_upgraded_in_place(pg_url: str) -> None:
    """A database migrated to version 2 (the group commit that left duplicates to the caller) and holding entries
    is brought to version 3 when the journal opens: its entries stay, a message sent again is their duplicate."""
    from traboule.stores.postgres import migrations
    from traboule.stores.postgres.journal import _APPEND_FUNCTION, COMPONENT

    with connect(pg_url) as db:
        migrations.upgrade(db, [COMPONENT])
        with db.transaction():  # back to version 2: its function in place of version 3's
            db.execute("DROP FUNCTION journal_append")
            db.execute(_APPEND_FUNCTION.encode())
            db.execute("UPDATE traboule_schema SET version = 2 WHERE component = %s", (COMPONENT,))
            (kept,) = db.execute(
                "INSERT INTO journal_messages (received, channel, status, idempotency_key, raw)"
                " VALUES ('2026-01-01T00:00:00Z', 'ch', 'accepted', 'k', 'm') RETURNING id"
            ).fetchone()  # type: ignore[misc]
        assert db.execute("SELECT pg_get_function_result('journal_append'::regproc)").fetchone() == ("SETOF bigint",)
    journal = PostgresJournal(pg_url)
    try:
        assert migrations.versions(journal._db)[COMPONENT] == 3
        again = await journal.append(JournalEntry("ch", b"m", "accepted", idempotency_key="k"))
        assert (again.status, again.warnings) == ("duplicate", f"same message as journal entry {kept}")
    finally:
        journal.close()
