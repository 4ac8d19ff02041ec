"""What each destination did with each message: the operator's delivery log (`DeliveryLog`).

One row per delivery handled by a bus consumer: the event's idempotency key (``<journal key>:<n>``: the events of
one journaled message share its key as a prefix), its correlation id, the channel, the outcome (`OUTCOMES`), a
short detail the channel gave and the time. The detail names kinds, counts, versions, codes and error classes,
never patient data; it is cut to `MAX_DETAIL` characters. The console's message page lists a message's rows
(`DeliveryLog.of`); ``traboule journal prune`` forgets the rows older than the messages it forgets.

It is a log for people, not what delivery relies on: rows are written in batches by a `DeliveryRecorder` thread,
after the delivery was acknowledged or failed, and a row lost to a crash or a failing write loses nothing else.
`SQLiteDeliveryLog` keeps it in ``deliveries.sqlite`` in the data folder (written by every engine process:
WAL, busy timeout, `Durability.CRASH`); `traboule.stores.postgres.delivery_log` in the database the nodes share.
Calls block: make them in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog

from traboule.stores.sqlite import Durability, open_database

log = structlog.get_logger("traboule.stores.delivery_log")

OUTCOMES = ("applied", "duplicate", "error", "dead_letter")
MAX_DETAIL = 500  # characters of a detail kept
MAX_KEY = 300  # characters of a key or correlation id kept
MAX_ROWS = 200  # rows `DeliveryLog.of` returns at most
FLUSH_S = 0.5  # how often a `DeliveryRecorder` writes what it holds
IDLE_S = 5.0  # seconds without rows after which a recorder closes its log and ends its thread
MAX_PENDING = 10_000  # rows a recorder holds at most while its store does not answer (beyond: dropped, logged)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class DeliveryRecord:
    key: str  # the event's idempotency key (``<journal key>:<n>``), "" when the message has none
    correlation_id: str
    channel: str
    outcome: str  # one of `OUTCOMES`
    detail: str = ""
    at: str = ""  # ISO 8601 UTC, set when recorded

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"delivery outcome must be one of {OUTCOMES}, not {self.outcome!r}")
        self.key = self.key[:MAX_KEY]
        self.correlation_id = self.correlation_id[:MAX_KEY]
        detail = " ".join(self.detail.split())  # one line
        self.detail = detail if len(detail) <= MAX_DETAIL else detail[: MAX_DETAIL - 1] + "…"
        self.at = self.at or now()


class DeliveryLog(Protocol):
    """The delivery log of one backend (calls block)."""

    def add(self, records: Sequence[DeliveryRecord]) -> None:
        """Append ``records`` in one transaction."""
        ...

    def of(self, key: str, correlation_id: str = "") -> list[DeliveryRecord]:
        """The rows of the message whose journal idempotency key is ``key`` (rows keyed ``key`` or ``key:…``),
        and the rows without a key carrying ``correlation_id``; oldest first, `MAX_ROWS` at most."""
        ...

    def prune(self, before: str) -> int:
        """Forget the rows recorded before ``before`` (ISO 8601 UTC); how many."""
        ...

    def close(self) -> None: ...


def key_range(key: str) -> tuple[str, str]:
    """The bounds of the keys ``key:…`` (``:`` is followed by ``;``): a range scan of the key's index."""
    return key + ":", key + ";"


COLUMNS = "message_key, correlation_id, channel, outcome, detail, at"

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    message_key TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_key ON deliveries (message_key);
CREATE INDEX IF NOT EXISTS deliveries_by_correlation ON deliveries (correlation_id) WHERE message_key = '';
CREATE INDEX IF NOT EXISTS deliveries_by_time ON deliveries (at);
"""


class SQLiteDeliveryLog:
    """The delivery log in the SQLite file ``path`` (usable from any thread: calls are serialised)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = open_database(path, Durability.CRASH, threads=True)
        self._db.executescript(SQLITE_SCHEMA)

    def add(self, records: Sequence[DeliveryRecord]) -> None:
        rows = [(r.key, r.correlation_id, r.channel, r.outcome, r.detail, r.at) for r in records]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(f"INSERT INTO deliveries ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def of(self, key: str, correlation_id: str = "") -> list[DeliveryRecord]:
        low, high = key_range(key)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM deliveries WHERE message_key = ? OR (message_key >= ? AND message_key < ?)"
                " OR (message_key = '' AND correlation_id = ? AND correlation_id != '') ORDER BY at, id LIMIT ?",
                (key, low, high, correlation_id, MAX_ROWS),
            ).fetchall()
        return [DeliveryRecord(*row) for row in rows]

    def prune(self, before: str) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM deliveries WHERE at < ?", (before,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()


class DeliveryRecorder:
    """Writes the rows handed to `add` (from the event loop, never blocking) to a `DeliveryLog` every `FLUSH_S`
    seconds in a thread of its own, opening the log there on first use; the thread closes the log and ends after
    `IDLE_S` seconds without rows (the next row starts another). A failing write is logged and its rows dropped:
    the log never holds up nor fails a delivery. `close` (the engine stopping) writes what is waiting at once."""

    def __init__(self, open_log: Callable[[], DeliveryLog]) -> None:
        self._open = open_log
        self._pending: list[DeliveryRecord] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # set by `close`: write what waits, end the thread
        self.dropped = 0  # rows dropped (store failing, or more than `MAX_PENDING` waiting)

    def add(self, record: DeliveryRecord) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self.dropped += 1
                return
            self._pending.append(record)
            if self._thread is None:
                self._stopping.clear()  # closed earlier (an engine stopped and started again): a thread as before
                self._thread = threading.Thread(target=self._run, name="delivery-log", daemon=True)
                self._thread.start()

    def _take(self) -> list[DeliveryRecord]:
        with self._lock:
            records, self._pending = self._pending, []
            return records

    def _write(self, store: DeliveryLog | None, records: list[DeliveryRecord]) -> DeliveryLog | None:
        try:
            store = store if store is not None else self._open()
            store.add(records)
        except Exception as exc:
            self.dropped += len(records)
            log.warning("delivery_log.write_failed", error=type(exc).__name__, rows=len(records))
        return store

    def close(self, timeout: float = 12.0) -> None:
        """Write the rows still waiting now and end the thread (blocking, at most ``timeout`` seconds: longer than a
        write waiting for the log's lock): the engine stops. Rows added later start a thread as before."""
        self._stopping.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        store: DeliveryLog | None = None
        idle = 0.0
        try:
            while True:
                stopping = self._stopping.wait(FLUSH_S)
                records = self._take()
                if records:
                    idle = 0.0
                    store = self._write(store, records)
                if stopping:
                    with self._lock:
                        if not self._pending:  # (a row added meanwhile: one more round)
                            self._thread = None
                            return
                    continue
                if records:
                    continue
                idle += FLUSH_S
                if idle >= IDLE_S:
                    with self._lock:
                        if not self._pending:
                            self._thread = None
                            return
        finally:
            if store is not None:
                try:
                    store.close()
                except Exception as exc:
                    log.warning("delivery_log.close_failed", error=type(exc).__name__)
