"""The readers of a PostgreSQL store: a bounded pool of autocommit connections that survives a server restart.

A store's reads (`traboule.stores.postgres.fhir_store`, `traboule.stores.postgres.worklist`) each take one
connection of the pool for the duration of a statement or two, and hand it back. The pool is bounded: at most
``size`` connections are open at once (``MAX_READERS`` by default), idle or in use; a read that finds them all in
use waits for one up to ``wait_s`` seconds, then fails with an ``OperationalError`` (the database
is unavailable for now).

A connection kept idle may have been closed by the server meanwhile (a restart, a failover, an administrator's
``pg_terminate_backend``): the first statement on it fails. `ReaderPool.read` then discards that connection and
every idle one (they are from the same server session generation) and runs the read once more on a new
connection; the caller sees an error only when the database is really out of reach. A write is never retried here:
a write whose commit outcome is unknown must surface as an error (the stores' writers reconnect on their next call).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import psycopg
import structlog
from psycopg import pq

from traboule.stores.postgres import CONNECT_TIMEOUT_S, connect

log = structlog.get_logger("traboule.stores.postgres.pool")

MAX_READERS = 8  # connections a store's pool holds open at most (idle or in use)
WAIT_S = float(CONNECT_TIMEOUT_S)  # how long a read waits for a connection of a full pool

# SQLSTATEs that end the session: class 08 (connection exception), and the server shutting down or starting up.
_SESSION_ENDED = ("57P01", "57P02", "57P03")

T = TypeVar("T")


class _PoolTimeout(psycopg.OperationalError):
    """Every connection of the pool stayed in use for ``wait_s`` seconds."""


def connection_lost(exc: BaseException, conn: psycopg.Connection | None = None) -> bool:
    """Whether ``exc`` says the session itself is gone (the server closed it, restarted, or the network cut it),
    as opposed to one statement failing (a constraint, a cancel, a deadlock) on a session that lives on."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if not isinstance(exc, psycopg.OperationalError) or isinstance(exc, _PoolTimeout):
        return False
    if conn is not None and (conn.broken or conn.closed):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith("08") or state in _SESSION_ENDED


class ReaderPool:
    """At most ``size`` autocommit connections to the database at ``url``, for reads (thread-safe)."""

    def __init__(self, url: str, *, size: int = MAX_READERS, wait_s: float = WAIT_S, name: str = "store") -> None:
        if size < 1:
            raise ValueError("a reader pool holds at least one connection")
        self.url, self.size, self.wait_s, self.name = url, size, wait_s, name
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[psycopg.Connection] = []  # LIFO: the most recently used first
        self._lock = threading.Lock()
        self._closed = False

    @property
    def idle(self) -> int:
        """Connections kept open for the next reads."""
        with self._lock:
            return len(self._idle)

    def acquire(self, *, fresh: bool = False) -> psycopg.Connection:
        """A connection for one read (an idle one unless ``fresh``); hand it back with `release`."""
        if self._closed:
            raise RuntimeError(f"the {self.name} is closed")
        if not self._slots.acquire(timeout=self.wait_s):
            raise _PoolTimeout(f"the {self.name}'s {self.size} database connections stayed busy for {self.wait_s} s")
        try:
            conn = None
            if not fresh:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
            return conn if conn is not None else connect(self.url)
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: psycopg.Connection, *, discard: bool = False) -> None:
        """Hand ``conn`` back: kept idle when it is healthy and out of any transaction, else closed."""
        try:
            keep = not (discard or conn.broken or conn.closed)
            keep = keep and conn.info.transaction_status == pq.TransactionStatus.IDLE
            if keep:
                with self._lock:
                    if not self._closed:
                        self._idle.append(conn)
                        return
            with contextlib.suppress(Exception):
                conn.close()
        finally:
            self._slots.release()

    def discard_idle(self) -> int:
        """Close every idle connection (their server went away); how many there were."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        return len(idle)

    def read(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body(conn)`` on a connection of the pool; run once more on a new connection when the session it ran on
        was gone (``body`` must be a read: it is replayed). Errors of the statement itself are raised."""
        conn = self.acquire()
        try:
            result = body(conn)
        except Exception as exc:
            if not connection_lost(exc, conn):
                self.release(conn)
                raise
            self.release(conn, discard=True)
            stale = self.discard_idle()
            log.info("database.reader_reconnecting", store=self.name, error=type(exc).__name__, discarded=stale + 1)
            conn = self.acquire(fresh=True)
            try:
                result = body(conn)
            except BaseException as again:
                self.release(conn, discard=connection_lost(again, conn))
                raise
            self.release(conn)
            return result
        except BaseException:
            self.release(conn, discard=True)  # interrupted mid-statement: its session may be in any state
            raise
        self.release(conn)
        return result

    def close(self) -> None:
        """Close the idle connections; one in use is closed when handed back."""
        with self._lock:
            self._closed = True
        self.discard_idle()


def begin(conn: psycopg.Connection, url: str) -> tuple[psycopg.Connection, psycopg.Transaction]:
    """A transaction entered on a store's writer ``conn``, or on a new connection when ``conn``'s session is gone
    (found closed, or failing at ``BEGIN``: nothing of the transaction was sent yet, so beginning it again cannot
    apply anything twice; a failure at any later point is the caller's, raised). Returns the connection used (the
    writer from now on) and the entered transaction, to exit (``contextlib.ExitStack.push``)."""
    if conn.broken or conn.closed:
        conn = connect(url)
    tx = conn.transaction()
    try:
        tx.__enter__()
    except Exception as exc:
        if not connection_lost(exc, conn):
            raise
        with contextlib.suppress(Exception):
            conn.close()
        log.info("database.writer_reconnecting", error=type(exc).__name__)
        conn = connect(url)
        tx = conn.transaction()
        tx.__enter__()
    return conn, tx


class OwnSession:
    """A store's own connection (the MPPS states, the XDS submissions): used by one thread at a time under
    ``_lock``, replaced by a new session when it is found gone. A subclass calls `_open_session` in its
    ``__init__`` and names its reconnect log event in ``reconnect_event``."""

    url: str
    reconnect_event = "database.reconnecting"
    _db: psycopg.Connection
    _lock: threading.RLock

    def _open_session(self, component: str) -> None:
        """Connect and check that the schema of ``component`` is one this code knows (closed again if not)."""
        from traboule.stores.postgres import migrations

        self._lock = threading.RLock()  # the connection is used by one thread at a time
        self._db = self._connect()
        try:
            migrations.check(self._db, component)
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> psycopg.Connection:
        from traboule.stores.postgres import redact

        try:
            return connect(self.url)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"database {redact(self.url)}: {exc}".strip()) from exc

    def _replace(self) -> psycopg.Connection:
        """A new session instead of the current one, which is closed (its server-side transaction, if any, ends
        with it)."""
        with contextlib.suppress(Exception):
            self._db.close()
        self._db = self._connect()
        return self._db

    def _session(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body(connection)`` under the store's lock, once more on a new session when the current one is found
        gone (``body`` must be harmless to run again: a read, an idempotent write, or a transaction it rolls back
        when it fails)."""
        with self._lock:
            db = self._db
            if db.broken or db.closed:  # found gone before: a new session
                db = self._replace()
            try:
                return body(db)
            except Exception as exc:
                if not connection_lost(exc, db):
                    raise
                log.info(self.reconnect_event, error=type(exc).__name__)
                return body(self._replace())
