"""The state of each MPPS instance on PostgreSQL: what every node of a database knows of the instances its ``mpps``
channels received, so that an N-SET reaching node B finds the N-CREATE node A took.

`PostgresMPPSStates` implements `traboule.stores.MPPSStates`:

* the table ``mpps_instances (channel, uid, status, dataset, updated)``, primary key ``(channel, uid)``, created by
  the ``mpps_state`` migrations (`traboule.stores.postgres.migrations`); each channel sees its own instances;
* ``hold(uid)`` opens a transaction and takes the transaction-level advisory lock ``(LOCK_CLASS, crc32(channel |
  uid))`` before reading the row: two nodes handling the same instance at once (an N-CREATE sent twice, two
  N-SETs) take turns, the second reading what the first saved, so exactly one of them applies a change (the
  other answers "duplicate", "no longer updatable"...). The lock covers an instance not created yet, which a row
  lock could not. A crc32 collision only makes two unrelated instances take turns. The hold ends with the
  transaction: a node that dies mid-request releases it with its session.
* The wait for the lock is bounded by the hold's own ``lock_timeout`` (`HOLD_LOCK_TIMEOUT_MS`, 5 s: well below the
  channel's ``request_timeout``): a hold not granted in time fails (``LockNotAvailable``) and the request is answered
  with a failure status the modality may send again. The wait, the save and the commit run in a worker thread
  (``hold`` is an async context manager; the channel runs ``save`` in a thread): the event loop never waits for
  another holder nor for the server.
* The hold stays open while the caller writes its journal entry: at most the connection's
  ``idle_in_transaction_session_timeout`` (15 s), after which the server ends the session and the hold's change
  is lost (the commit fails, the request fails, the modality sends it again). ``save`` writes on the hold's own
  connection: never outside its transaction.
* A hold cancelled while it waits (a request past its ``request_timeout``) lets its caller go only once the
  connection is idle again (`traboule.stores.mpps_state.begin_in_thread`); a hold that finds the connection in a
  transaction anyway (an earlier one whose end never ran) closes it and opens another session (which ends that
  transaction and releases its lock) before it begins.

A connection found gone (a server restart, an administrator's ``pg_terminate_backend``) when a hold begins or a
read runs is closed and replaced, and the call made once more on the new session: nothing of it had been done.
Every use of the connection holds the store's lock (one thread at a time). Text cannot hold NUL in PostgreSQL: the
channel name, UID and status are stored through `traboule.stores.postgres.encode_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import structlog
from psycopg.pq import TransactionStatus

from traboule.stores.mpps_state import HeldInstance, MPPSInstance, begin_in_thread, run_to_end
from traboule.stores.postgres import decode_text, encode_text, migrations
from traboule.stores.postgres.pool import OwnSession

log = structlog.get_logger("traboule.stores.postgres.mpps_state")

COMPONENT = "mpps_state"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE mpps_instances (
                channel TEXT COLLATE "C" NOT NULL,
                uid TEXT COLLATE "C" NOT NULL,
                status TEXT NOT NULL,
                dataset BYTEA NOT NULL,
                updated TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (channel, uid)
            );
            """,
        )
    ],
)
LOCK_CLASS = 0x6D70_7073  # "mpps": the first int of an instance's two-int advisory lock
HOLD_LOCK_TIMEOUT_MS = 5_000  # a hold waits this long for another holder (the channel's request_timeout is 20 s)


def lock_key(channel: str, uid: str) -> tuple[int, int]:
    value = zlib.crc32(f"{channel}|{uid}".encode("utf-8", "surrogatepass"))
    return LOCK_CLASS, value - (1 << 32) if value >= 1 << 31 else value


class PostgresMPPSStates(OwnSession):
    """The MPPS instances of ``channel`` in the database at ``url``; the schema is created or upgraded when it
    opens. One hold at a time per store (the channel serialises its requests)."""

    reconnect_event = "database.mpps_state_reconnecting"

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self.channel = encode_text(channel)
        self._name = channel
        self._open_session(COMPONENT)

    def get(self, uid: str) -> MPPSInstance | None:
        return self._session(lambda db: self._read(db, uid))

    @asynccontextmanager
    async def hold(self, uid: str) -> AsyncIterator[HeldInstance]:
        db, current = await begin_in_thread(lambda: self._begin(uid), lambda opened: self._rollback(opened[0]))
        try:
            yield HeldInstance(uid, current, lambda u, status, dataset: self._write(db, u, status, dataset))
        except BaseException:
            await run_to_end(asyncio.to_thread(self._rollback, db))
            raise
        await run_to_end(asyncio.to_thread(self._commit, db))

    def _begin(self, uid: str) -> tuple[psycopg.Connection, MPPSInstance | None]:
        """Open the hold's transaction, take the instance's lock (waiting `HOLD_LOCK_TIMEOUT_MS` at most) and read
        it; on a connection out of any transaction."""

        def begin(db: psycopg.Connection) -> tuple[psycopg.Connection, MPPSInstance | None]:
            db.execute("BEGIN")
            try:
                db.execute(f"SET LOCAL lock_timeout = {int(HOLD_LOCK_TIMEOUT_MS)}")
                db.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock_key(self._name, uid))
                return db, self._read(db, uid)
            except BaseException:
                _rollback_quietly(db)
                raise

        with self._lock:
            db = self._db
            if not (db.broken or db.closed) and db.info.transaction_status != TransactionStatus.IDLE:
                # An earlier hold's end never ran: a new session ends its transaction and releases its lock.
                log.warning("mpps_state.abandoned_transaction", status=db.info.transaction_status.name)
                self._replace()
            return self._session(begin)

    def _read(self, db: psycopg.Connection, uid: str) -> MPPSInstance | None:
        sql = "SELECT status, dataset FROM mpps_instances WHERE channel = %s AND uid = %s"
        row = db.execute(sql, (self.channel, encode_text(uid))).fetchone()
        return None if row is None else MPPSInstance(decode_text(row[0]), bytes(row[1]))

    def _write(self, db: psycopg.Connection, uid: str, status: str, dataset: bytes) -> None:
        """The new state, in the hold's transaction on ``db`` (the hold's connection, whatever the store's current
        one is)."""
        with self._lock:
            if db.info.transaction_status != TransactionStatus.INTRANS:
                raise RuntimeError("the MPPS instance is no longer held: its transaction ended")
            db.execute(
                "INSERT INTO mpps_instances (channel, uid, status, dataset) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (channel, uid) DO UPDATE SET status = EXCLUDED.status, dataset = EXCLUDED.dataset,"
                " updated = now()",
                (self.channel, encode_text(uid), encode_text(status), dataset),
            )

    def _commit(self, db: psycopg.Connection) -> None:
        with self._lock:
            if db.info.transaction_status != TransactionStatus.INTRANS:  # a failed statement: COMMIT would roll back
                _rollback_quietly(db)
                raise RuntimeError("the MPPS instance's transaction failed: nothing was saved")
            db.execute("COMMIT")

    def _rollback(self, db: psycopg.Connection) -> None:
        with self._lock:
            _rollback_quietly(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _rollback_quietly(db: psycopg.Connection) -> None:
    """End ``db``'s transaction, if any; a connection that cannot is closed (the server ends the transaction with
    the session, and the next call opens another)."""
    if db.broken or db.closed or db.info.transaction_status == TransactionStatus.IDLE:
        return
    try:
        db.execute("ROLLBACK")
    except Exception:
        with contextlib.suppress(Exception):
            db.close()
