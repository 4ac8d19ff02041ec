"""The journal: every inbound message, stored durably before it is acknowledged, with the events it produced.

SQLite in WAL mode with ``synchronous=FULL`` (a commit is on disk when it returns). Writes go through one writer
thread that commits everything queued at that moment in a single transaction (group commit): on the reference
machine a lone commit costs ~0.2 ms of fsync, so eight connections sharing commits ingest several times more
than one commit per message would allow.

The ``outbox`` table holds the canonical events of accepted messages, written in the same transaction as the
message. A dispatcher publishes them to the bus and deletes them; after a crash it publishes what is left
(consumers are idempotent), so nothing acknowledged is ever lost between journal and bus.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    received TEXT NOT NULL,
    channel TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    control_id TEXT NOT NULL DEFAULT '',
    message_type TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,             -- accepted | duplicate | rejected | failed
    ack_code TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    warnings TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL DEFAULT '',
    correlation_id TEXT NOT NULL DEFAULT '',
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_key ON messages(idempotency_key) WHERE status = 'accepted';
CREATE INDEX IF NOT EXISTS messages_status ON messages(status, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL,
    topic TEXT NOT NULL,
    event_id TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


@dataclass
class JournalEntry:
    channel: str
    raw: bytes
    status: str
    peer: str = ""
    control_id: str = ""
    message_type: str = ""
    ack_code: str = ""
    error: str = ""
    warnings: str = ""
    idempotency_key: str = ""
    correlation_id: str = ""
    received: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    id: int = 0


@dataclass
class OutboxEvent:
    topic: str
    event_id: str
    body: bytes
    id: int = 0
    message_id: int = 0


_COLUMNS = (
    "received",
    "channel",
    "peer",
    "control_id",
    "message_type",
    "status",
    "ack_code",
    "error",
    "warnings",
    "idempotency_key",
    "correlation_id",
    "raw",
)


class Journal:
    """Durable message journal with group commit and a transactional outbox."""

    def __init__(self, path: str | Path, *, max_batch: int = 256):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.max_batch = max_batch
        self._queue: queue.Queue = queue.Queue()
        self._writer_db = self._connect()
        self._writer_db.executescript(SCHEMA)
        self._local = threading.local()
        self._thread = threading.Thread(target=self._write_loop, name="journal-writer", daemon=True)
        self._closed = False
        self.outbox_ready = asyncio.Event()  # set when events wait in the outbox
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    @property
    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
            db.row_factory = sqlite3.Row
        return db

    # -- writing ---------------------------------------------------------------------------------------------

    async def append(self, entry: JournalEntry, events: list[OutboxEvent] | None = None) -> JournalEntry:
        """Store a message (and its events, unless it is a duplicate); returns once it is on disk.

        An ``accepted`` entry whose idempotency key was already accepted is stored as ``duplicate`` and its
        events are dropped: the same message sent twice produces its events once.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[JournalEntry] = loop.create_future()
        self._queue.put((entry, events or [], future, loop))
        result = await future
        if events and result.status == "accepted":
            self.outbox_ready.set()
        return result

    def _write_loop(self) -> None:
        db = self._writer_db
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                db.execute("BEGIN IMMEDIATE")
                for entry, events, _, _ in batch:
                    self._insert(db, entry, events)
                db.execute("COMMIT")
            except Exception as exc:  # disk full, I/O error: every waiting sender gets the error
                if db.in_transaction:
                    db.execute("ROLLBACK")
                for _, _, future, loop in batch:
                    loop.call_soon_threadsafe(_set_exception, future, exc)
                continue
            for entry, _, future, loop in batch:
                loop.call_soon_threadsafe(_set_result, future, entry)

    def _insert(self, db: sqlite3.Connection, entry: JournalEntry, events: list[OutboxEvent]) -> None:
        if entry.status == "accepted" and entry.idempotency_key:
            seen = db.execute(
                "SELECT id FROM messages WHERE idempotency_key = ? AND status = 'accepted' LIMIT 1",
                (entry.idempotency_key,),
            ).fetchone()
            if seen:
                entry.status = "duplicate"
                entry.warnings = (entry.warnings + f"\nsame message as journal entry {seen[0]}").strip()
        cur = db.execute(
            f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            tuple(getattr(entry, c) for c in _COLUMNS),
        )
        entry.id = int(cur.lastrowid or 0)
        if entry.status == "accepted":
            db.executemany(
                "INSERT INTO outbox (message_id, topic, event_id, body) VALUES (?, ?, ?, ?)",
                [(entry.id, e.topic, e.event_id, e.body) for e in events],
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._writer_db.close()

    # -- outbox ----------------------------------------------------------------------------------------------

    def pending_events(self, limit: int = 500) -> list[OutboxEvent]:
        rows = self._reader.execute(
            "SELECT id, message_id, topic, event_id, body FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxEvent(r["topic"], r["event_id"], bytes(r["body"]), r["id"], r["message_id"]) for r in rows]

    def events_published(self, ids: list[int]) -> None:
        db = self._reader
        with db:
            db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, entry_id: int) -> JournalEntry | None:
        row = self._reader.execute("SELECT * FROM messages WHERE id = ?", (entry_id,)).fetchone()
        return _entry(row) if row else None

    def recent(self, limit: int = 50, status: str | None = None) -> list[JournalEntry]:
        sql = "SELECT * FROM messages"
        args: tuple = ()
        if status:
            sql += " WHERE status = ?"
            args = (status,)
        rows = self._reader.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_entry(r) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._reader.execute("SELECT status, COUNT(*) FROM messages GROUP BY status").fetchall()
        return {r[0]: r[1] for r in rows}


def _entry(row: sqlite3.Row) -> JournalEntry:
    data = {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a mapping
    data["raw"] = bytes(data["raw"])
    return JournalEntry(**data)


def _set_result(future: asyncio.Future, value: JournalEntry) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
