"""The documents the ``xds`` channels submitted, on PostgreSQL: every node of a database sees each version's
entryUUID, status and replacement chain (`traboule.stores.SubmissionStore`, semantics of
`traboule.stores.submissions.SQLiteSubmissions`).

* The table ``xds_submissions (channel, unique_id, entry_uuid, set_id, status, submission_set, updated)``,
  primary key ``(channel, unique_id)``, ``entry_uuid`` unique per channel, created by the ``submissions``
  migrations (`traboule.stores.postgres.migrations`).
* Two nodes handling the same document at once (a redelivery while the first delivery is still in flight) do not
  both submit it: ``claim`` takes the session-level advisory lock ``(LOCK_CLASS, crc32(channel | uniqueId))``
  with ``pg_try_advisory_lock`` and yields False at once when another node (or another caller of this one: a
  session's advisory locks are re-entrant, so the process keeps its own set too) holds it; the caller gives the
  delivery back to the bus. The lock is the session's, not a transaction's: it stays held while the channel
  waits for the registry (no transaction stays open), and the server drops it when a node dies with its session.
  A crc32 collision only makes two unrelated documents take turns.
* Every write is a conditional statement: ``begin`` inserts ``ON CONFLICT DO NOTHING`` and returns the row as
  stored (an entry already there keeps its entryUUID); ``refused`` changes only a ``sending`` row; ``registered``
  changes the version and the one it replaces in one transaction.

A connection found gone (a server restart, an administrator's ``pg_terminate_backend``) is closed and replaced, and
the call made once more on the new session: every call is a read, a claim or an idempotent write (replayed, it
leaves the same rows; ``refused`` then says False). Its claims went with its session: a claim in progress is then
no longer exclusive, which the registry's duplicate-uniqueId check still catches. Every use of the connection holds
the store's lock (the channel calls it from worker threads). Text is stored through
`traboule.stores.postgres.encode_text` (no NUL in PostgreSQL text).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from traboule.stores.postgres import decode_text, encode_text, migrations
from traboule.stores.postgres.pool import OwnSession
from traboule.stores.submissions import SKIPPED_PREFIX, Claims, Submission

COMPONENT = "submissions"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE xds_submissions (
                channel TEXT COLLATE "C" NOT NULL,
                unique_id TEXT COLLATE "C" NOT NULL,
                entry_uuid TEXT COLLATE "C" NOT NULL,
                set_id TEXT NOT NULL,
                status TEXT NOT NULL,
                submission_set TEXT NOT NULL DEFAULT '',
                updated TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (channel, unique_id),
                UNIQUE (channel, entry_uuid)
            );
            """,
        )
    ],
)
LOCK_CLASS = 0x7864_7373  # "xdss": the first int of a document's two-int advisory lock


def lock_key(channel: str, unique_id: str) -> tuple[int, int]:
    value = zlib.crc32(f"{channel}|{unique_id}".encode("utf-8", "surrogatepass"))
    return LOCK_CLASS, value - (1 << 32) if value >= 1 << 31 else value


class PostgresSubmissions(OwnSession):
    """The submissions of ``channel`` in the database at ``url``; the schema is created or upgraded when it opens."""

    reconnect_event = "database.submissions_reconnecting"

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self._name = channel
        self.channel = encode_text(channel)
        self._claims = Claims()
        self._open_session(COMPONENT)

    def get(self, unique_id: str) -> Submission | None:
        row = self._session(
            lambda db: db.execute(
                "SELECT unique_id, entry_uuid, status FROM xds_submissions WHERE channel = %s AND unique_id = %s",
                (self.channel, encode_text(unique_id)),
            ).fetchone()
        )
        return Submission(*(decode_text(v) for v in row)) if row else None

    @contextmanager
    def claim(self, unique_id: str) -> Iterator[bool]:
        if not self._claims.take(unique_id):
            yield False
            return
        try:
            key = lock_key(self._name, unique_id)

            def take(db: psycopg.Connection) -> tuple[psycopg.Connection, bool]:
                row = db.execute("SELECT pg_try_advisory_lock(%s, %s)", key).fetchone()
                return db, bool(row and row[0])

            db, mine = self._session(take)
            if not mine:
                yield False
                return
            try:
                yield True
            finally:
                with self._lock:
                    if not (db.broken or db.closed):  # a lost session took its locks with it
                        db.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        finally:
            self._claims.release(unique_id)

    def begin(self, unique_id: str, entry_uuid: str, set_id: str) -> Submission:
        self._insert(unique_id, entry_uuid, set_id, "sending")
        found = self.get(unique_id)
        assert found is not None
        return found

    def skip(self, unique_id: str, set_id: str) -> None:
        self._insert(unique_id, SKIPPED_PREFIX + unique_id, set_id, "skipped")

    def _insert(self, unique_id: str, entry_uuid: str, set_id: str, status: str) -> None:
        self._session(
            lambda db: db.execute(
                "INSERT INTO xds_submissions (channel, unique_id, entry_uuid, set_id, status)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (channel, unique_id) DO NOTHING",
                (self.channel, *(encode_text(v) for v in (unique_id, entry_uuid, set_id)), status),
            )
        )

    def registered(self, unique_id: str, submission_set: str, replaced: str = "") -> None:
        def register(db: psycopg.Connection) -> None:
            with db.transaction():
                db.execute(
                    "UPDATE xds_submissions SET status = 'registered', submission_set = %s, updated = now()"
                    " WHERE channel = %s AND unique_id = %s",
                    (encode_text(submission_set), self.channel, encode_text(unique_id)),
                )
                if replaced:
                    db.execute(
                        "UPDATE xds_submissions SET status = 'replaced', updated = now()"
                        " WHERE channel = %s AND unique_id = %s",
                        (self.channel, encode_text(replaced)),
                    )

        self._session(register)

    def deleted(self, unique_id: str) -> None:
        self._session(
            lambda db: db.execute(
                "UPDATE xds_submissions SET status = 'deleted', updated = now() WHERE channel = %s AND unique_id = %s",
                (self.channel, encode_text(unique_id)),
            )
        )

    def refused(self, unique_id: str) -> bool:
        cur = self._session(
            lambda db: db.execute(
                "UPDATE xds_submissions SET status = 'refused', updated = now()"
                " WHERE channel = %s AND unique_id = %s AND status = 'sending'",
                (self.channel, encode_text(unique_id)),
            )
        )
        return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
