"""The journal on PostgreSQL: `PostgresJournal` implements `traboule.stores.Journal` for several engine nodes sharing
one database, with the guarantees of `traboule.stores.journal.SQLiteJournal`.

* Durable on return: ``append`` resolves once its transaction has committed with ``synchronous_commit`` on (the
  commit is flushed to the server's WAL).
* Group commit: the appends queued in one event-loop iteration, and those that arrive while a commit is in flight,
  share the next transaction (one WAL flush for all of them). Appends and outbox confirmations go through an
  asyncio connection, so the loop keeps serving while the server commits; the other calls of the protocol are
  blocking, as the protocol states, on a second (blocking) connection. A group commit is one statement, in one round
  trip and one transaction: ``journal_append`` (a function of the schema, migration 3) takes the lock, writes each
  entry with its events (an accepted entry whose key turns out taken as ``duplicate``, without its events) and
  deletes the confirmed events. The senders of a group commit are all answered from that one commit: none is
  acknowledged for an entry that did not commit, none refused for one that did.
* One accepted entry per idempotency key across nodes: a unique index on the key of ``accepted`` rows, written with
  ``INSERT ... ON CONFLICT DO NOTHING``. Two nodes appending the same message at once: the second insert waits for
  the first transaction, finds the key taken and stores its entry as ``duplicate`` (no read-then-write race), with
  the warning the SQLite journal writes (``same message as journal entry <id>``).
* Ids grow in commit order across nodes too: every group commit holds an advisory lock (`LOCK_KEY`) from before
  its first insert to its commit, so no node commits an id lower than one already visible (a reader paging with
  ``after`` never skips an entry committed late). Events added with ``append_events`` take the next outbox ids when
  they commit; they do not take that lock (it runs on the loop's thread, which a commit in flight needs). The lock
  is global on purpose: the sequence hands out ids to every node, so any two group commits may interleave their
  ids, and no narrower key (per channel, per key) orders them. It costs little: it is taken inside the commit's one
  statement, a node has one group commit in flight at a time (uncontended on one node), and across nodes it
  serialises group commits, not messages (a commit carries every append queued meanwhile).
* Text as the SQLite journal keeps it: PostgreSQL ``text`` cannot hold NUL, so every text column is stored through
  `traboule.stores.postgres.encode_text` (injective, identity on text without NUL or ``\\x01``) and decoded on read;
  ``raw`` is exact ``bytea``. An entry the server still refuses (``DataError``) fails alone: the group commit it
  was in rolled back as a whole and is committed again one entry at a time.
* Closing commits the confirmations made before it, even while a group commit is in flight (the loop cannot finish
  that one while ``close`` runs: a commit holding only confirmations is ended and done again on the blocking
  connection; one holding appends finishes on its own when the loop runs on).
* The server's disk is not visible from a client: ``min_free_bytes`` is 0 and a full disk on the server (SQLSTATE
  53100) raises `traboule.errors.DiskFull`, as the SQLite journal does for a full local disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psycopg

from traboule.errors import DiskFull
from traboule.stores.journal import COLUMNS, PUBLISHED_DELAY, JournalEntry, OutboxEvent, Query
from traboule.stores.postgres import async_connect, connect, decode_text, encode_text, migrations, redact

if TYPE_CHECKING:
    from psycopg import AsyncConnection, Connection

COMPONENT = "journal"
LOCK_KEY = 0x6A6F_7572_6E61  # "journa": held by each group commit, so that ids grow in commit order
PRUNE_BATCH = 5_000  # messages deleted per statement: a large prune never runs into the statement timeout

# Migration 2 (replaced by migration 3, kept as applied): a group commit in one statement (its own transaction, one
# round trip): the lock, then each entry with its events (``e_first``/``e_count``: where they are in the ``e_*``
# arrays), then the confirmed events deleted. One id per entry, in order; NULL for an accepted entry whose key is
# taken: nothing was written for it, the caller stored it as a duplicate in a second transaction.
_APPEND_FUNCTION = """
CREATE FUNCTION journal_append(
    lock_key bigint, m_received text[], m_channel text[], m_peer text[], m_control_id text[], m_message_type text[],
    m_status text[], m_ack_code text[], m_error text[], m_warnings text[], m_key text[], m_correlation_id text[],
    m_raw bytea[], e_first int4[], e_count int4[], e_topic text[], e_event_id text[], e_body bytea[],
    published bigint[]
) RETURNS SETOF bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    FOR i IN 1 .. coalesce(array_length(m_status, 1), 0) LOOP
        new_id := NULL;
        IF m_status[i] = 'accepted' AND m_key[i] <> '' THEN
            INSERT INTO journal_messages (received, channel, peer, control_id, message_type, status, ack_code, error,
                                          warnings, idempotency_key, correlation_id, raw)
            VALUES (m_received[i], m_channel[i], m_peer[i], m_control_id[i], m_message_type[i], m_status[i],
                    m_ack_code[i], m_error[i], m_warnings[i], m_key[i], m_correlation_id[i], m_raw[i])
            ON CONFLICT (idempotency_key) WHERE status = 'accepted' AND idempotency_key <> '' DO NOTHING
            RETURNING id INTO new_id;
        ELSE
            INSERT INTO journal_messages (received, channel, peer, control_id, message_type, status, ack_code, error,
                                          warnings, idempotency_key, correlation_id, raw)
            VALUES (m_received[i], m_channel[i], m_peer[i], m_control_id[i], m_message_type[i], m_status[i],
                    m_ack_code[i], m_error[i], m_warnings[i], m_key[i], m_correlation_id[i], m_raw[i])
            RETURNING id INTO new_id;
        END IF;
        IF new_id IS NOT NULL AND m_status[i] = 'accepted' AND e_count[i] > 0 THEN
            INSERT INTO journal_outbox (message_id, topic, event_id, body)
                SELECT new_id, e_topic[j], e_event_id[j], e_body[j]
                FROM generate_series(e_first[i], e_first[i] + e_count[i] - 1) AS j ORDER BY j;
        END IF;
        RETURN NEXT new_id;
    END LOOP;
    IF cardinality(published) > 0 THEN
        DELETE FROM journal_outbox WHERE id = ANY(published);
    END IF;
END $$;
"""

# Migration 3: the group commit stores the duplicates itself (before, the caller stored them in a second
# transaction, after the first had committed). One row per entry, in order: its id, its status (``duplicate`` for
# an accepted entry whose key is taken, by a committed entry or one earlier in the call) and, for a duplicate, its
# warnings as stored (the SQLite journal's line added).
_APPEND_FUNCTION_3 = """
DROP FUNCTION journal_append(
    bigint, text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], text[], bytea[], int4[],
    int4[], text[], text[], bytea[], bigint[]
);
CREATE FUNCTION journal_append(
    lock_key bigint, m_received text[], m_channel text[], m_peer text[], m_control_id text[], m_message_type text[],
    m_status text[], m_ack_code text[], m_error text[], m_warnings text[], m_key text[], m_correlation_id text[],
    m_raw bytea[], e_first int4[], e_count int4[], e_topic text[], e_event_id text[], e_body bytea[],
    published bigint[]
) RETURNS TABLE (entry_id bigint, entry_status text, entry_warnings text) LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    seen bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    FOR i IN 1 .. coalesce(array_length(m_status, 1), 0) LOOP
        entry_id := NULL;
        entry_status := m_status[i];
        entry_warnings := NULL;
        IF m_status[i] = 'accepted' AND m_key[i] <> '' THEN
            INSERT INTO journal_messages (received, channel, peer, control_id, message_type, status, ack_code, error,
                                          warnings, idempotency_key, correlation_id, raw)
            VALUES (m_received[i], m_channel[i], m_peer[i], m_control_id[i], m_message_type[i], m_status[i],
                    m_ack_code[i], m_error[i], m_warnings[i], m_key[i], m_correlation_id[i], m_raw[i])
            ON CONFLICT (idempotency_key) WHERE status = 'accepted' AND idempotency_key <> '' DO NOTHING
            RETURNING journal_messages.id INTO entry_id;
            IF entry_id IS NULL THEN  -- the key is taken: the entry is stored as a duplicate, without its events
                SELECT m.id INTO seen FROM journal_messages m
                    WHERE m.idempotency_key = m_key[i] AND m.status = 'accepted' LIMIT 1;
                entry_status := 'duplicate';
                entry_warnings := btrim(
                    m_warnings[i] || E'\n' || 'same message as journal entry ' || coalesce(seen::text, '?'),
                    E' \t\n\r\x0b\x0c'
                );
            END IF;
        END IF;
        IF entry_id IS NULL THEN
            INSERT INTO journal_messages (received, channel, peer, control_id, message_type, status, ack_code, error,
                                          warnings, idempotency_key, correlation_id, raw)
            VALUES (m_received[i], m_channel[i], m_peer[i], m_control_id[i], m_message_type[i], entry_status,
                    m_ack_code[i], m_error[i], coalesce(entry_warnings, m_warnings[i]), m_key[i],
                    m_correlation_id[i], m_raw[i])
            RETURNING journal_messages.id INTO entry_id;
        END IF;
        IF entry_status = 'accepted' AND e_count[i] > 0 THEN
            INSERT INTO journal_outbox (message_id, topic, event_id, body)
                SELECT entry_id, e_topic[j], e_event_id[j], e_body[j]
                FROM generate_series(e_first[i], e_first[i] + e_count[i] - 1) AS j ORDER BY j;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF cardinality(published) > 0 THEN
        DELETE FROM journal_outbox WHERE journal_outbox.id = ANY(published);
    END IF;
END $$;
"""

migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE journal_messages (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                received TEXT NOT NULL,
                channel TEXT NOT NULL,
                peer TEXT NOT NULL DEFAULT '',
                control_id TEXT NOT NULL DEFAULT '',
                message_type TEXT NOT NULL DEFAULT '',
                status TEXT NOT NULL,
                ack_code TEXT NOT NULL DEFAULT '',
                error TEXT NOT NULL DEFAULT '',
                warnings TEXT NOT NULL DEFAULT '',
                idempotency_key TEXT NOT NULL DEFAULT '',
                correlation_id TEXT NOT NULL DEFAULT '',
                raw BYTEA NOT NULL
            );
            CREATE UNIQUE INDEX journal_messages_accepted_key ON journal_messages (idempotency_key)
                WHERE status = 'accepted' AND idempotency_key <> '';
            CREATE INDEX journal_messages_key ON journal_messages (idempotency_key);
            CREATE INDEX journal_messages_status ON journal_messages (status, id);
            CREATE INDEX journal_messages_received ON journal_messages (received);
            CREATE TABLE journal_outbox (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id BIGINT NOT NULL,
                topic TEXT NOT NULL,
                event_id TEXT NOT NULL,
                body BYTEA NOT NULL
            );
            CREATE INDEX journal_outbox_message ON journal_outbox (message_id, id);
            """,
        ),
        (2, _APPEND_FUNCTION),
        (3, _APPEND_FUNCTION_3),
    ],
)

_SELECT = f"SELECT id, {', '.join(COLUMNS)} FROM journal_messages"
_ACCEPTED_ID = "SELECT id FROM journal_messages WHERE idempotency_key = %s AND status = 'accepted' LIMIT 1"
_INSERT_EVENT = "INSERT INTO journal_outbox (message_id, topic, event_id, body) VALUES (%s, %s, %s, %s)"
_EVENTS = "SELECT id, message_id, topic, event_id, body FROM journal_outbox"
_APPEND = (
    "SELECT * FROM journal_append(%s, %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[], %b::int4[], %b::int4[], %b::text[],"
    " %b::text[], %b::bytea[], %b::bigint[])"
)

Pending = tuple[JournalEntry, list[OutboxEvent], "asyncio.Future[JournalEntry]"]


class PostgresJournal:
    """Durable message journal on PostgreSQL with group commit and a transactional outbox (`traboule.stores.Journal`).

    ``url``: ``postgresql://user:password@host:port/dbname``; the schema is migrated (or refused when newer than
    this code) when the journal opens."""

    def __init__(self, url: str, *, max_batch: int = 512, min_free_bytes: int = 0):
        self.url = url
        self.max_batch = max_batch
        self.min_free_bytes = min_free_bytes  # the server's disk is not visible from here: see the module docstring
        try:
            self._db: Connection = connect(url)
        except psycopg.OperationalError as exc:  # an OSError: the engine says "cannot start" with the reason
            raise ConnectionError(f"database {redact(url)}: {exc}".strip()) from exc
        try:
            migrations.check(self._db, COMPONENT)
        except BaseException:
            self._db.close()
            raise
        self._aconn: AsyncConnection | None = None
        self._aconn_loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[Pending] = []
        self._published: list[int] = []
        self._deleting: list[int] = []  # confirmations in the commit in flight (still in the table until it ends)
        self._flush_scheduled = False
        self._flush_task: asyncio.Task[None] | None = None
        self._published_timer: asyncio.TimerHandle | None = None
        self._in_flight = 0  # appends in the group commit in flight
        self._isolate = 0  # entries to commit one at a time (a batch the server refused as a whole)
        self._closed = False
        self.outbox_ready = asyncio.Event()

    # -- writing ---------------------------------------------------------------------------------------------

    async def append(self, entry: JournalEntry, events: list[OutboxEvent] | None = None) -> JournalEntry:
        """Store a message (and its events, unless it is a duplicate); returns once its transaction committed."""
        if self._closed:
            raise RuntimeError("journal is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JournalEntry] = loop.create_future()
        self._pending.append((entry, events or [], future))
        self._schedule(loop)
        result = await future
        if events and result.status == "accepted":
            self.outbox_ready.set()
        return result

    def append_events(self, idempotency_key: str, events: list[OutboxEvent], note: str = "") -> int:
        """Add events (and a line to its warnings) to the accepted message with this idempotency key, in one
        transaction; returns the message's id, or 0 when no accepted message has that key (nothing is written)."""
        if self._closed:
            raise RuntimeError("journal is closed")
        db = self._conn()
        with _disk_full(), db.transaction():
            row = db.execute(
                "SELECT id, warnings FROM journal_messages WHERE idempotency_key = %s AND status = 'accepted'"
                " LIMIT 1 FOR UPDATE",
                (encode_text(idempotency_key),),
            ).fetchone()
            if row is None:
                return 0
            with db.cursor() as cur:
                cur.executemany(_INSERT_EVENT, [(row[0], e.topic, e.event_id, e.body) for e in events])
            if note:
                db.execute(
                    "UPDATE journal_messages SET warnings = %s WHERE id = %s",
                    (f"{row[1]}\n{encode_text(note)}".strip(), row[0]),
                )
        if events:
            self.outbox_ready.set()
        return int(row[0])

    def disk_free(self, *, fresh: bool = False) -> int:
        """The server's free space is not visible to a client: as much as a signed 64-bit number holds."""
        return sys.maxsize

    async def events_published(self, ids: list[int]) -> None:
        """Forget outbox events the bus confirmed: the deletion rides along with the next group commit, or is
        committed on its own after ``PUBLISHED_DELAY`` (losing it in a crash only republishes them)."""
        self._published.extend(ids)
        if not self._flush_scheduled and self._flush_task is None and self._published_timer is None:
            loop = asyncio.get_running_loop()
            self._published_timer = loop.call_later(PUBLISHED_DELAY, self._schedule, loop)

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # Two hops through the ready queue: the other connections woken in this loop iteration queue their
        # writes first. A commit in flight takes what queued meanwhile when it ends.
        if not self._flush_scheduled and self._flush_task is None:
            self._flush_scheduled = True
            loop.call_soon(loop.call_soon, self._start_flush, loop)

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_scheduled = False
        if self._flush_task is None and (self._pending or self._published) and not self._closed:
            self._flush_task = loop.create_task(self._flush_all(), name="journal-commit")

    async def _flush_all(self) -> None:
        try:
            while self._pending or self._published:
                if self._published_timer is not None:
                    self._published_timer.cancel()
                    self._published_timer = None
                size = 1 if self._isolate else self.max_batch
                batch, self._pending = self._pending[:size], self._pending[size:]
                self._isolate = max(0, self._isolate - len(batch))
                published, self._published = self._published, []
                saved = [(e.status, e.warnings, e.id) for e, _, _ in batch]
                self._deleting, self._in_flight = published, len(batch)
                try:
                    conn = await self._async_connection()
                    with _disk_full():
                        cur = await conn.execute(_APPEND, _append_args(batch, published))  # one round trip
                        _stored(batch, await cur.fetchall())
                except Exception as exc:  # server gone, disk full: every waiting sender gets the error
                    self._deleting, self._in_flight = [], 0
                    self._published = published + self._published
                    for (entry, _, _), (status, warnings, entry_id) in zip(batch, saved, strict=True):
                        entry.status, entry.warnings, entry.id = status, warnings, entry_id
                    if isinstance(exc, psycopg.DataError) and len(batch) > 1:
                        # one entry the server refuses (the one transaction rolled back, nothing of the batch was
                        # stored): again one at a time, so that only its own sender gets the error
                        self._pending, self._isolate = batch + self._pending, len(batch)
                        continue
                    await self._drop_async_connection()
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not self._pending:
                        break  # the confirmations wait for the next append or close
                    continue
                self._deleting, self._in_flight = [], 0
                for entry, _, future in batch:
                    if not future.done():
                        future.set_result(entry)
        finally:
            self._published, self._deleting = self._deleting + self._published, []  # cancelled mid-commit
            self._in_flight = 0
            self._flush_task = None
            if self._closed:
                await self._drop_async_connection()

    async def _async_connection(self) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        if self._aconn is not None and (self._aconn.closed or self._aconn_loop is not loop):
            self._finish_async_connection()
        if self._aconn is None:
            self._aconn, self._aconn_loop = await async_connect(self.url), loop
        return self._aconn

    async def _drop_async_connection(self) -> None:
        conn, self._aconn = self._aconn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def _finish_async_connection(self) -> None:
        """Close the asyncio connection from blocking code (no commit is in flight on it)."""
        conn, self._aconn = self._aconn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    def close(self) -> None:
        """Commit what was queued and close. A commit in flight finishes on its own (its senders get their
        answers) and takes what was queued behind it."""
        if self._closed:
            return
        self._closed = True
        if self._published_timer is not None:
            self._published_timer.cancel()
            self._published_timer = None
        if self._flush_task is None:
            if self._pending or self._published:
                self._flush_blocking()
            self._finish_async_connection()
        else:
            self._confirm_blocking()
        self._db.close()

    def _confirm_blocking(self) -> None:
        """Close during a group commit: the loop cannot finish it while ``close`` runs, so the confirmations are
        committed here. A commit in flight holding only confirmations is ended (its session terminated: it rolls
        back unless it had committed) and its deletions done again here; one holding appends (and what queued
        behind it) finishes on its own when the loop runs on, with its confirmations."""
        published, self._published = self._published, []
        if not self._in_flight and not self._pending:
            pid = self._aconn.info.backend_pid if self._aconn is not None and not self._aconn.closed else 0
            published, self._deleting = self._deleting + published, []
            if pid:
                with contextlib.suppress(Exception):
                    self._conn().execute("SELECT pg_terminate_backend(%s)", (pid,))
        if published:
            with contextlib.suppress(Exception):  # lost: those events are published again (consumers dedupe)
                self._conn().execute("DELETE FROM journal_outbox WHERE id = ANY(%s)", (published,))

    def _conn(self) -> Connection:
        """The blocking connection, opened again after the server cut it (the call that saw it cut has failed)."""
        if self._db.closed and not self._closed:
            self._db = connect(self.url)
        return self._db

    def _flush_blocking(self) -> None:
        """The last group commit, on the blocking connection (close outside of a commit in flight)."""
        db = self._conn()
        batch, self._pending = self._pending, []
        published, self._published = self._published, []
        saved = [(e.status, e.warnings, e.id) for e, _, _ in batch]
        try:
            with _disk_full():
                _stored(batch, db.execute(_APPEND, _append_args(batch, published)).fetchall())
        except psycopg.DataError as exc:
            for (entry, _, _), (status, warnings, entry_id) in zip(batch, saved, strict=True):
                entry.status, entry.warnings, entry.id = status, warnings, entry_id
            if len(batch) + bool(published) <= 1:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for one in batch:  # one entry the server refuses: the others are committed without it
                self._pending = [one]
                self._flush_blocking()
            if published:
                self._published = published
                self._flush_blocking()
            return
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for entry, _, future in batch:
            if not future.done():
                future.set_result(entry)

    # -- outbox ----------------------------------------------------------------------------------------------

    def outbox_depth(self) -> int:
        """Events journaled but not yet confirmed by the bus."""
        row = self._conn().execute("SELECT count(*) FROM journal_outbox").fetchone()
        return max(0, int(row[0] if row else 0) - len(self._published) - len(self._deleting))

    def pending_events(self, limit: int = 500) -> list[OutboxEvent]:
        published = {*self._published, *self._deleting}
        rows = self._conn().execute(_EVENTS + " ORDER BY id LIMIT %s", (limit + len(published),)).fetchall()
        return [_event(r) for r in rows if r[0] not in published][:limit]

    def outbox_of(self, message_id: int) -> list[OutboxEvent]:
        """The events of a message still in the outbox (not yet confirmed by the bus; published ones are gone)."""
        rows = self._conn().execute(_EVENTS + " WHERE message_id = %s ORDER BY id", (message_id,)).fetchall()
        return [_event(r) for r in rows]

    # -- reading ---------------------------------------------------------------------------------------------

    def prune(self, before: str, keep: Iterable[str] = ()) -> int:
        """Forget messages received before ``before`` (ISO 8601, UTC) whose events all reached the bus, except
        those whose idempotency key is in ``keep``; returns how many."""
        kept = [encode_text(k) for k in keep if k]
        total = 0
        while True:  # in batches: each statement (and its WAL) stays small, whatever the journal's size
            cur = self._conn().execute(
                "DELETE FROM journal_messages WHERE id IN (SELECT m.id FROM journal_messages m WHERE received < %s"
                " AND NOT EXISTS (SELECT 1 FROM journal_outbox o WHERE o.message_id = m.id)"
                " AND NOT (idempotency_key = ANY(%s)) LIMIT %s)",
                (before, kept, PRUNE_BATCH),
            )
            done = int(cur.rowcount or 0)
            total += done
            if done < PRUNE_BATCH:
                return total

    def accepted(self, idempotency_key: str) -> bool:
        """Whether a message with this idempotency key was accepted (its events are or were in the outbox)."""
        return self._conn().execute(_ACCEPTED_ID, (encode_text(idempotency_key),)).fetchone() is not None

    def get(self, entry_id: int) -> JournalEntry | None:
        row = self._conn().execute(_SELECT + " WHERE id = %s", (entry_id,)).fetchone()
        return _entry(row) if row else None

    def recent(self, limit: int = 50, status: str | None = None) -> list[JournalEntry]:
        """The latest entries, newest first (of one status when given)."""
        if status:
            rows = self._conn().execute(_SELECT + " WHERE status = %s ORDER BY id DESC LIMIT %s", (status, limit))
        else:
            rows = self._conn().execute(_SELECT + " ORDER BY id DESC LIMIT %s", (limit,))
        return [_entry(r) for r in rows.fetchall()]

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT status, count(*) FROM journal_messages GROUP BY status").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def last_id(self) -> int:
        """The id of the latest entry (0 when the journal is empty)."""
        row = self._conn().execute("SELECT COALESCE(MAX(id), 0) FROM journal_messages").fetchone()
        return int(row[0] if row else 0)

    def select(self, query: Query, *, after: int = 0, limit: int = 100) -> list[JournalEntry]:
        """Entries matching ``query`` with an id above ``after``, in id order (page on with the last id)."""
        where, args = _where(query)
        rows = self._conn().execute(_SELECT + f" WHERE id > %s AND {where} ORDER BY id LIMIT %s", (after, *args, limit))
        return [_entry(r) for r in rows.fetchall()]

    def count(self, query: Query, *, after: int = 0) -> int:
        where, args = _where(query)
        row = self._conn().execute(f"SELECT count(*) FROM journal_messages WHERE id > %s AND {where}", (after, *args))
        found = row.fetchone()
        return int(found[0] if found else 0)


def _append_args(batch: list[Pending], published: list[int]) -> tuple[Any, ...]:
    """The arguments of ``journal_append`` for a group commit: the entries' columns, their events, the confirmed
    events to delete."""
    columns: list[list[Any]] = [[] for _ in COLUMNS]
    first, count, topics, event_ids, bodies = [], [], [], [], []
    for entry, events, _ in batch:
        for column, value in zip(columns, _values(entry), strict=True):
            column.append(value)
        first.append(len(topics) + 1)
        count.append(len(events))
        topics += [e.topic for e in events]
        event_ids += [e.event_id for e in events]
        bodies += [e.body for e in events]
    by_name = dict(zip(COLUMNS, columns, strict=True))
    order = ("received", "channel", "peer", "control_id", "message_type", "status", "ack_code", "error", "warnings")
    return (
        LOCK_KEY,
        *(by_name[c] for c in order),
        by_name["idempotency_key"],
        by_name["correlation_id"],
        by_name["raw"],
        first,
        count,
        topics,
        event_ids,
        bodies,
        published,
    )


def _stored(batch: list[Pending], rows: list[tuple[Any, ...]]) -> None:
    """What ``journal_append`` stored for each entry of a group commit: its id, and for an accepted entry whose key
    was taken its status ``duplicate`` and its warnings."""
    for (entry, _, _), (entry_id, status, warnings) in zip(batch, rows, strict=True):
        entry.id = int(entry_id)
        if status == "duplicate" and entry.status != "duplicate":
            entry.status, entry.warnings = "duplicate", decode_text(warnings)


def _insert_blocking(db: Connection, entry: JournalEntry, events: list[OutboxEvent]) -> None:
    """One entry (and its events) through ``journal_append`` on a blocking connection, in the caller's transaction
    (which may hold `LOCK_KEY` already: the lock is taken again by the same session) or in its own."""
    batch: list[Any] = [(entry, events, None)]
    _stored(batch, db.execute(_APPEND, _append_args(batch, [])).fetchall())


def _where(query: Query) -> tuple[str, list[Any]]:
    """`Query.where` in PostgreSQL's dialect: ``%s`` placeholders (its text holds no other ``?``), TRUE for all."""
    where, args = query.where()
    args = [encode_text(a) if isinstance(a, str) else a for a in args]
    return ("TRUE" if where == "1" else where.replace("?", "%s")), args


def _values(entry: JournalEntry) -> tuple[Any, ...]:
    """The entry's columns as stored: text through `encode_text` (PostgreSQL text holds no NUL), ``raw`` as is."""
    return tuple(encode_text(v) if isinstance(v, str) else v for v in (getattr(entry, c) for c in COLUMNS))


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    data = {k: decode_text(v) if isinstance(v, str) else v for k, v in zip(("id", *COLUMNS), row, strict=True)}
    data["raw"] = bytes(data["raw"])
    return JournalEntry(**data)


def _event(row: tuple[Any, ...]) -> OutboxEvent:
    return OutboxEvent(row[2], row[3], bytes(row[4]), int(row[0]), int(row[1]))


@contextlib.contextmanager
def _disk_full():  # type: ignore[no-untyped-def]
    """The server's disk is full (SQLSTATE 53100): the same error as a full local disk."""
    try:
        yield
    except psycopg.errors.DiskFull as exc:
        raise DiskFull(f"the database server's disk is full: {exc}") from exc
