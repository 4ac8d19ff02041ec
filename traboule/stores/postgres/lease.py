"""A lease for work that must run on one engine node at a time (the outbox dispatcher): a PostgreSQL session
advisory lock held on a connection of its own.

* The key is ``(CLASS_ID, crc32(name))`` in the two-int advisory key space, which PostgreSQL keeps apart from the
  single-bigint one of the migrations and journal locks.
* A node that does not hold the lease tries again every `RETRY` seconds (`Lease.acquire`).
* The holder checks its connection every `CHECK_INTERVAL` seconds (``SELECT 1``, bounded by `CHECK_TIMEOUT`); TCP
  keepalives (5 s idle, then 3 probes 1 s apart) notice a silent peer. When a check fails the lease is lost at
  once: ``held`` turns false and `Lease.lost` returns, so the holder stops its work. The server releases the lock
  when the session dies, so another node may take it from then on: a check that fails is never retried while
  the work goes on.
* A node that dies (even ``kill -9``) closes its socket: the server ends its session and the lock is free for the
  next retry of another node (about a second).
* A node whose host is lost without closing its socket (power loss, frozen VM, network partition): the server's
  side of the session has keepalives and a user timeout of its own (`traboule.stores.postgres.SERVER_KEEPALIVES`,
  set on every connection): the server ends the session, and the lock is free, about 10 s after the host went
  silent (not the OS's 2 hours); the next retry of another node takes the lease.
* Fencing: the holder calls `Lease.confirm` right before each piece of its work (each batch the outbox dispatcher
  publishes): the server says whether this session still holds the lock. A session the server ended (an
  administrator, a network cut noticed by the server) stops the work before the next batch rather than at the next
  check, while another node may already hold the lease: two holders overlap by one batch at most, not by a check
  interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from typing import TYPE_CHECKING

import psycopg
import structlog

from traboule.stores.postgres import _params, redact

if TYPE_CHECKING:
    from psycopg import AsyncConnection

log = structlog.get_logger("traboule.stores.postgres.lease")

CLASS_ID = 0x7472_6C73  # "trls": the first int of every lease's two-int advisory key
RETRY = 1.0  # seconds between two attempts of a node that does not hold the lease
CHECK_INTERVAL = 1.0  # seconds between two checks of the holder's connection
CHECK_TIMEOUT = 3.0  # a check slower than this loses the lease
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 3}


# This session holds the advisory lock (classid, objid) of the two-int key space (objsubid 2).
_HELD = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
    " AND objsubid = 2 AND classid::bigint = (%s::bigint & 4294967295) AND objid::bigint = (%s::bigint & 4294967295))"
)


def lease_key(name: str) -> tuple[int, int]:
    """The two-int advisory lock key of the lease ``name``."""
    value = zlib.crc32(name.encode())
    return CLASS_ID, value - (1 << 32) if value >= 1 << 31 else value


class Lease:
    """The lease ``name`` on the database at ``url`` for this node."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.key = lease_key(name)
        self._conn: AsyncConnection | None = None
        self._held = False
        self._lost = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._failing = False

    @property
    def held(self) -> bool:
        """Whether this node holds the lease (its connection answered the last check)."""
        return self._held

    async def try_acquire(self) -> bool:
        """One attempt: True when this node holds the lease now."""
        if self._held:
            return True
        try:
            if self._conn is None or self._conn.closed:
                params = {**_params(self.url), **KEEPALIVES}
                self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **params)  # type: ignore[arg-type]
            row = await (await self._conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self.key)).fetchone()
        except (psycopg.Error, OSError) as exc:
            if not self._failing:  # once per outage
                log.warning("lease.unreachable", lease=self.name, database=redact(self.url), error=type(exc).__name__)
                self._failing = True
            await self._drop()
            return False
        self._failing = False
        if not (row and row[0]):
            return False
        self._held = True
        self._lost = asyncio.Event()
        self._watch = asyncio.create_task(self._check(), name=f"lease-{self.name}")
        log.info("lease.acquired", lease=self.name)
        return True

    async def acquire(self) -> None:
        """Wait until this node holds the lease (an attempt every `RETRY` seconds)."""
        while not await self.try_acquire():
            await asyncio.sleep(RETRY)

    async def lost(self) -> None:
        """Wait until the lease is lost (returns at once when it is not held)."""
        if self._held:
            await self._lost.wait()

    async def confirm(self) -> bool:
        """Whether this node still holds the lease, as the server says now (its session still holds the lock);
        when not, the lease is lost (``held`` false, `lost` returns). Bounded by `CHECK_TIMEOUT`."""
        conn = self._conn
        if not self._held or conn is None or conn.closed:
            return False
        try:
            cur = await asyncio.wait_for(conn.execute(_HELD, self.key), CHECK_TIMEOUT)
            row = await cur.fetchone()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self._lose(type(exc).__name__)
            return False
        if not (row and row[0]):  # cannot happen while the session lives; said all the same
            await self._lose("not held")
            return False
        return True

    async def _lose(self, error: str) -> None:
        """The lease is lost (found by `confirm`): the periodic check stops, the connection is closed."""
        log.warning("lease.lost", lease=self.name, error=error)
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        self._set_lost()
        await self._drop()

    async def _check(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            conn = self._conn
            try:
                if conn is None or conn.closed:
                    raise psycopg.OperationalError("the lease's connection is closed")
                await asyncio.wait_for(conn.execute("SELECT 1"), CHECK_TIMEOUT)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("lease.lost", lease=self.name, error=type(exc).__name__)
                self._set_lost()
                await self._drop()
                return

    def _set_lost(self) -> None:
        self._held = False
        self._lost.set()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def release(self) -> None:
        """Give the lease up (closing its connection ends the session, which frees the lock)."""
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
        if self._held:
            log.info("lease.released", lease=self.name)
        self._set_lost()
        await self._drop()


class LocalLease:
    """The lease of a single node (SQLite stores): always held."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def held(self) -> bool:
        return True

    async def try_acquire(self) -> bool:
        return True

    async def acquire(self) -> None:
        return None

    async def confirm(self) -> bool:
        return True

    async def lost(self) -> None:
        await asyncio.Event().wait()  # never

    async def release(self) -> None:
        return None
