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

    async def lost(self) -> None:
        await asyncio.Event().wait()  # never

    async def release(self) -> None:
        return None
