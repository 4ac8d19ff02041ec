"""Idempotent consumer on PostgreSQL: the done keys of every consumer of several engine nodes, in one table.

`PostgresAppliedKeys` has the API and the semantics of `traboule.stores.idempotency.AppliedKeys` (``is_done``,
``done``, ``mark_done`` keeping the first mark, ``detail``, ``transaction``, ``close``) for one consumer (a channel's
name) of a database all channels and nodes share:

* the table ``applied_keys (consumer, idempotency_key, applied_at, detail)``, primary key ``(consumer,
  idempotency_key)``, created by the ``applied_keys`` migrations (`traboule.stores.postgres.migrations`): two
  consumers never see each other's keys;
* ``mark_done`` is ``INSERT ... ON CONFLICT DO NOTHING``: two nodes marking one key at once get exactly one True
  (the second insert waits for the first's transaction, then finds the key taken);
* ``transaction()`` opens a transaction on the connection (the consumer's own writes on it and the marks are kept
  together or not at all: the guarantee of the SQLite store; `traboule.stores.postgres.sender_state` writes the
  HL7 senders' own tables on this connection for that). A connection given to the constructor is used as it is
  (autocommit, as `traboule.stores.postgres.connect` makes, writes each mark at once outside a transaction) and
  closed by ``close`` as the SQLite one is.

PostgreSQL text cannot hold a NUL character: a key with one is refused by ``mark_done`` (``ValueError``) and is
never done; a NUL in ``detail`` is kept as U+FFFD. No legacy table exists on PostgreSQL (a fresh database).
Not thread-safe: one caller at a time, as the SQLite store. The store factory's ``applied_keys(channel)`` gives
this store (consumer: the channel's name) when the engine runs on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psycopg

from traboule.stores.postgres import connect, migrations

COMPONENT = "applied_keys"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE applied_keys (
                consumer TEXT COLLATE "C" NOT NULL,
                idempotency_key TEXT COLLATE "C" NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                detail TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (consumer, idempotency_key)
            );
            """,
        )
    ],
)
_LOOKUP_CHUNK = 1000  # keys per `= ANY(...)` lookup


class PostgresAppliedKeys:
    """The done keys of ``consumer`` (a channel's name) in the database at ``db`` (a URL, or a connection the
    consumer owns and writes its effects on). The schema is created or upgraded when it opens."""

    def __init__(self, db: str | psycopg.Connection, consumer: str) -> None:
        if not consumer or "\x00" in consumer:
            raise ValueError("a consumer name (without NUL) is needed")
        self.consumer = consumer
        self.db = connect(db) if isinstance(db, str) else db
        try:
            if self.db.autocommit:
                migrations.check(self.db, COMPONENT)
            elif migrations.versions(self.db).get(COMPONENT, 0) != migrations.registered()[COMPONENT]:
                raise ValueError(f"{COMPONENT}: the schema is not current (open it once with an autocommit connection)")
        except BaseException:
            if isinstance(db, str):
                self.db.close()
            raise

    def is_done(self, key: str) -> bool:
        """Whether ``key`` was marked done by this consumer (on any node); an empty key never is."""
        if not key or "\x00" in key:
            return False
        row = self.db.execute(
            "SELECT 1 FROM applied_keys WHERE consumer = %s AND idempotency_key = %s", (self.consumer, key)
        ).fetchone()
        return row is not None

    def done(self, keys: Iterable[str]) -> set[str]:
        """Which of ``keys`` were marked done (a batch's lookup in a few queries)."""
        wanted = [k for k in dict.fromkeys(keys) if k and "\x00" not in k]
        found: set[str] = set()
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            rows = self.db.execute(
                "SELECT idempotency_key FROM applied_keys WHERE consumer = %s AND idempotency_key = ANY(%s)",
                (self.consumer, wanted[start : start + _LOOKUP_CHUNK]),
            )
            found.update(r[0] for r in rows)
        return found

    def mark_done(self, key: str, detail: str = "") -> bool:
        """Mark ``key`` done (``detail``: what the effect was). False when it was already marked, by this node or
        another (the first mark is kept). Inside `transaction` it commits with the caller's writes."""
        if not key:
            raise ValueError("an idempotency key is needed")
        if "\x00" in key:
            raise ValueError("an idempotency key cannot hold a NUL character")
        cur = self.db.execute(
            "INSERT INTO applied_keys (consumer, idempotency_key, detail) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (self.consumer, key, detail.replace("\x00", "\ufffd")),
        )
        return cur.rowcount == 1

    def detail(self, key: str) -> str | None:
        """What was recorded with ``key`` when it was marked done; None when it was not."""
        if "\x00" in key:
            return None
        row = self.db.execute(
            "SELECT detail FROM applied_keys WHERE consumer = %s AND idempotency_key = %s", (self.consumer, key)
        ).fetchone()
        return None if row is None else str(row[0])

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A transaction on the connection (rolled back when the block raises): the caller's own writes on the
        connection it yields and `mark_done` are kept together or not at all."""
        with self.db.transaction():
            yield self.db

    def close(self) -> None:
        self.db.close()
