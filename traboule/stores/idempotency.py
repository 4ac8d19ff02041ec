"""Idempotent consumer: the keys of the events whose effect is done, so that a redelivered event does nothing.

Delivery is at least once (a crash before the acknowledgement, a retry, a replayed dead letter hand an event over
again). A consumer asks `AppliedKeys.is_done` before acting and calls `mark_done` once the effect is durable:

* the effect is a write to a database the consumer owns: the mark is written on the same connection inside the
  same transaction (``with keys.transaction(): ...effect...; keys.mark_done(key)``), so both are kept or neither;
* the effect is elsewhere (a message a peer acknowledged): the mark follows the acknowledgement; a crash in
  between sends once more, the at-least-once every receiver takes.

The keys live in the table ``applied (idempotency_key, applied_at, detail)`` of the consumer's database, opened
with `traboule.stores.sqlite.open_database` at ``Durability.POWER_LOSS``: a mark decides what is sent next. The
worklist store's ``applied (idempotency_key, applied_at)`` is the same table without ``detail``, and is used as it
is. A table an earlier version kept under another name (``sent``...) is named in ``legacy`` and its rows are
moved into ``applied`` when the database is opened, so an engine upgraded in place sends nothing twice.

With ``[database] url`` the store factory gives `traboule.stores.postgres.idempotency.PostgresAppliedKeys`
instead: the same API and the same guarantee (a mark and the consumer's own writes made on its connection inside
``transaction()`` commit together or not at all), in one table every node shares. The HL7 sender channels reach
their marks through `traboule.stores.sender_state`, which keeps their own tables on the marks' connection.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from traboule.stores.sqlite import Durability, open_database

TABLE = "applied"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    idempotency_key TEXT PRIMARY KEY,
    applied_at TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID
"""
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_LOOKUP_CHUNK = 500  # keys per IN (...) query: below SQLite's bound on host parameters


@dataclass(frozen=True)
class Legacy:
    """A table of done keys an earlier version kept: its name, key column, time column and detail column."""

    table: str
    key: str
    at: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        for name in (self.table, self.key, self.at, self.detail):
            if name and not _NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a table or column name")


class AppliedKeys:
    """The done keys of one consumer, on ``db`` (the consumer's own connection, or one `open` made).

    ``db`` is used as it is given: an autocommit connection (``isolation_level=None``, as `open_database` makes)
    writes each mark at once unless a `transaction` is open on it. Not thread-safe: one caller at a time."""

    def __init__(self, db: sqlite3.Connection, *, legacy: Sequence[Legacy] = ()) -> None:
        self.db = db
        db.execute(SCHEMA)
        # The worklist store's table of the same name has no detail (and inserts two values): left as it is.
        self._detail = "detail" in {row[1] for row in db.execute(f"PRAGMA table_info({TABLE})")}
        for old in legacy:
            self._migrate(old)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        durability: Durability = Durability.POWER_LOSS,
        threads: bool = False,
        legacy: Sequence[Legacy] = (),
    ) -> AppliedKeys:
        """The done keys kept in the database at ``path`` (created if needed)."""
        return cls(open_database(path, durability, threads=threads), legacy=legacy)

    def is_done(self, key: str) -> bool:
        """Whether ``key`` was marked done; an empty key never is."""
        if not key:
            return False
        return self.db.execute(f"SELECT 1 FROM {TABLE} WHERE idempotency_key = ?", (key,)).fetchone() is not None

    def done(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` were marked done (a batch's lookup in a few queries)."""
        return done_keys(self.db, keys)

    def mark_done(self, key: str, detail: str = "") -> bool:
        """Mark ``key`` done (``detail``: what the effect was, e.g. the control id a peer acknowledged). False when
        it was already marked (the first mark is kept). Inside `transaction` it commits with the caller's writes."""
        if not key:
            raise ValueError("an idempotency key is needed")
        if self._detail:
            sql, values = f"INSERT OR IGNORE INTO {TABLE} VALUES (?, ?, ?)", (key, _now(), detail)
        else:
            sql, values = f"INSERT OR IGNORE INTO {TABLE} VALUES (?, ?)", (key, _now())
        return self.db.execute(sql, values).rowcount == 1

    def detail(self, key: str) -> str | None:
        """What was recorded with ``key`` when it was marked done; None when it was not."""
        column = "detail" if self._detail else "''"
        row = self.db.execute(f"SELECT {column} FROM {TABLE} WHERE idempotency_key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on the connection (``ROLLBACK`` when the block raises): the caller's own
        writes on the connection it yields and `mark_done` are kept together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def _migrate(self, old: Legacy) -> None:
        """Move the rows of an earlier version's table into ``applied``, then drop it (once: it is gone after)."""
        exists = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (old.table,))
        if exists.fetchone() is None or old.table == TABLE:
            return
        columns = [old.key, f"coalesce({old.at}, '')" if old.at else "''"]
        if self._detail:
            columns.append(f"coalesce({old.detail}, '')" if old.detail else "''")
        with self.transaction():
            self.db.execute(
                f"INSERT OR IGNORE INTO {TABLE} SELECT {', '.join(columns)} FROM {old.table}"
                f" WHERE {old.key} IS NOT NULL AND {old.key} != ''"
            )
            self.db.execute(f"DROP TABLE {old.table}")


def done_keys(db: sqlite3.Connection, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` are marked done in ``db``'s table, read on any connection (a store's reader too)."""
    wanted = list(dict.fromkeys(k for k in keys if k))
    found: set[str] = set()
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        chunk = wanted[start : start + _LOOKUP_CHUNK]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT idempotency_key FROM {TABLE} WHERE idempotency_key IN ({marks})", chunk)
        found.update(r[0] for r in rows)
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
