"""The state of each MPPS instance an ``mpps`` channel received: its status and its merged attribute list.

An N-SET carries only the attributes it changes and is answered from the instance's known state (unknown,
already COMPLETED...): `MPPSStates.hold` gives that state and keeps the instance to its caller until the block
ends, so a request's check, its journal write and its state change are one step, never interleaved with another
request for the same instance (`traboule.stores.MPPSStates`). ``hold`` is an async context manager: the wait for
another holder, and the commit, run in a worker thread, so the event loop (which writes the journal entry of the
holder, when both are in one process) never waits for them.

`SQLiteMPPSStates` keeps the table ``mpps (uid, status, dataset, updated)`` of ``<data_dir>/<channel>.sqlite`` as
earlier versions wrote it (``Durability.POWER_LOSS``: the state decides how the next request is answered); a hold
is a ``BEGIN IMMEDIATE`` transaction, so a second connection to the file waits for it (busy timeout).
`traboule.stores.postgres.mpps_state` keeps the same rows for every node of a database.

A caller cancelled while its hold waits (a DICOM request past its ``request_timeout``) is let go only once the
store's connection is idle again: the cancellation waits for the worker thread to return and ends the transaction
it opened (`begin_in_thread`, `run_to_end`), so the caller's own lock (the channel serialises its requests) never
lets the next request onto a connection still in the abandoned transaction. A hold also finds and ends a
transaction an earlier one left open before it begins. Every use of a store's connection holds the store's lock:
``save`` may be called from a worker thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import structlog

from traboule.stores.sqlite import Durability, open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mpps (
    uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    dataset BLOB NOT NULL,
    updated TEXT NOT NULL
);
"""


T = TypeVar("T")
R = TypeVar("R")

log = structlog.get_logger("traboule.stores.mpps_state")


async def run_to_end(work: Awaitable[R]) -> R:
    """Await ``work`` to its end even when the caller is cancelled meanwhile; the cancellation is raised once it has
    ended (a transaction's commit or rollback in a worker thread is never left running behind its caller)."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError as exc:
            if task.done():
                raise
            cancelled = cancelled or exc
    if cancelled is not None:
        raise cancelled
    return result


async def begin_in_thread(begin: Callable[[], T], undo: Callable[[T], None]) -> T:
    """``begin()`` (a wait for a lock, then a read) in a worker thread. When the caller is cancelled meanwhile (a
    request that timed out), the cancellation waits for ``begin`` to return and for ``undo(result)`` (in a thread)
    to end what it opened, then goes on: the caller is let go with no transaction open."""
    task = asyncio.ensure_future(asyncio.to_thread(begin))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await run_to_end(_undo_after(task, undo))
        raise


async def _undo_after(task: asyncio.Future[T], undo: Callable[[T], None]) -> None:
    try:
        opened = await task
    except Exception:  # begin failed: it ended what it opened itself
        return
    try:
        await asyncio.to_thread(undo, opened)
    except Exception as exc:  # the next hold finds the transaction still open and ends it
        log.warning("mpps_state.undo_failed", error=type(exc).__name__)


@dataclass(frozen=True)
class MPPSInstance:
    """What is known of an MPPS instance: its status and its attribute list (Explicit VR Little Endian bytes)."""

    status: str
    dataset: bytes


class HeldInstance:
    """An MPPS instance held by `MPPSStates.hold`: ``current`` (None when unknown) and `save`, which writes the new
    state in the hold's transaction, on the hold's connection (committed when the block ends without raising).
    ``save`` is a blocking statement: a caller on the event loop runs it in a worker thread."""

    def __init__(self, uid: str, current: MPPSInstance | None, write: Callable[[str, str, bytes], None]) -> None:
        self.uid = uid
        self.current = current
        self._write = write

    def save(self, status: str, dataset: bytes) -> None:
        self._write(self.uid, status, dataset)
        self.current = MPPSInstance(status, dataset)


class SQLiteMPPSStates:
    """The MPPS instances of one channel in the SQLite file at ``path`` (`traboule.stores.MPPSStates`)."""

    def __init__(self, path: str | Path) -> None:
        self.db = open_database(path, Durability.POWER_LOSS, threads=True)
        self.db.executescript(_SCHEMA)
        self._lock = threading.RLock()  # the connection is used by one thread at a time

    def get(self, uid: str) -> MPPSInstance | None:
        with self._lock:
            row = self.db.execute("SELECT status, dataset FROM mpps WHERE uid = ?", (uid,)).fetchone()
        return None if row is None else MPPSInstance(str(row[0]), bytes(row[1]))

    @asynccontextmanager
    async def hold(self, uid: str) -> AsyncIterator[HeldInstance]:
        current = await begin_in_thread(lambda: self._begin(uid), lambda _: self._end("ROLLBACK"))
        try:
            yield HeldInstance(uid, current, self._write)
        except BaseException:
            await run_to_end(asyncio.to_thread(self._end, "ROLLBACK"))
            raise
        await run_to_end(asyncio.to_thread(self._end, "COMMIT"))

    def _begin(self, uid: str) -> MPPSInstance | None:
        with self._lock:
            if self.db.in_transaction:  # an earlier hold's end never ran: nothing of it is kept
                log.warning("mpps_state.abandoned_transaction")
                self.db.execute("ROLLBACK")
            self.db.execute("BEGIN IMMEDIATE")  # waits for another connection's hold (busy timeout)
            try:
                return self.get(uid)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _end(self, statement: str) -> None:
        """``COMMIT`` (which fails when the transaction is gone: the save was not kept), or ``ROLLBACK`` if one is
        open."""
        with self._lock:
            if statement == "COMMIT" or self.db.in_transaction:
                self.db.execute(statement)

    def _write(self, uid: str, status: str, dataset: bytes) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO mpps VALUES (?, ?, ?, ?) ON CONFLICT(uid) DO UPDATE SET status = excluded.status,"
                " dataset = excluded.dataset, updated = excluded.updated",
                (uid, status, dataset, datetime.now(UTC).isoformat(timespec="milliseconds")),
            )

    def close(self) -> None:
        with self._lock:
            self.db.close()
