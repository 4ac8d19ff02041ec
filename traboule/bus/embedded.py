"""The embedded message bus: the ``Bus`` protocol in-process, durable in one SQLite file.

For single-node deployments without RabbitMQ. Every published message is a committed row (WAL,
``synchronous=FULL``) in each queue whose bindings match its topic, so a restart loses nothing that
``publish`` returned for, and a row is deleted only after its handler returned.

All SQLite work runs on one dedicated thread (one connection, serialised access, no lock contention) so the
event loop is never blocked by disk I/O. Concurrent ``publish`` calls are coalesced into one transaction while
the previous one commits (group commit); ``publish_many`` commits a whole list at once.

Batches (``subscribe_batch``) are cut from the rows of one fetch (the rows that are due, up to ``batch_size``
rounded up to a multiple of ``max_batch``), so a batch never waits for more messages to arrive.

Differences from RabbitMQ worth knowing: one consumer per queue per ``EmbeddedBus`` (and one process per
file); a delivery interrupted by a crash is redelivered without counting as a failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from traboule.bus import (
    BatchHandler,
    Delivery,
    Handler,
    Item,
    dlq_name,
    one_by_one,
    topic_matches,
)
from traboule.bus.retry import DeadLetter, Retry, RetryPolicy, handed_alone
from traboule.errors import BusClosedError
from traboule.stores.sqlite import Durability, open_database

log = structlog.get_logger("traboule.bus.embedded")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    queue   TEXT NOT NULL,
    pattern TEXT NOT NULL,
    PRIMARY KEY (queue, pattern)
);
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue        TEXT NOT NULL,
    topic        TEXT NOT NULL,
    body         BLOB NOT NULL,
    message_id   TEXT NOT NULL,
    headers      TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 1,
    available_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, available_at, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    queue      TEXT NOT NULL,
    topic      TEXT NOT NULL,
    body       BLOB NOT NULL,
    message_id TEXT NOT NULL,
    headers    TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    dead_at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, seq);
"""


@dataclass
class _Row:
    seq: int
    topic: str
    body: bytes
    message_id: str
    headers: dict[str, str]
    attempt: int


@dataclass
class _Consumer:
    queue: str
    handler: BatchHandler
    policy: RetryPolicy
    max_batch: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    inflight: set[int] = field(default_factory=set)  # fetched, not yet settled: excluded from depth()
    acked: list[int] = field(default_factory=list)  # handler returned, row not deleted yet
    failed: list[tuple[_Row, Retry | DeadLetter]] = field(default_factory=list)  # handler raised: what next


class EmbeddedBus:
    """Durable in-process bus on SQLite, with the delivery semantics of ``traboule.bus``."""

    def __init__(
        self,
        path: str,
        *,
        retry_backoff: float = 0.2,
        batch_size: int = 100,
        poll_interval: float = 0.5,
        close_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.retry_backoff = retry_backoff  # a failed delivery waits retry_backoff * attempt before the next
        self.batch_size = batch_size
        self.poll_interval = poll_interval  # fallback only: publishes on this bus wake consumers at once
        self.close_timeout = close_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._consumers: dict[str, _Consumer] = {}
        self._pending: list[tuple[list[Item], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._since = time.time()

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (and create) the database; idempotent, and implied by the other methods."""
        if self._closing:
            raise BusClosedError("bus is closed")
        if self._executor is None:
            # One thread owns the connection: SQLite calls are serialised without locks, and work submitted
            # by concurrent callers while the file opens simply queues behind _open.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-bus")
            try:
                await self._run(self._open)
            except BaseException:
                self._executor.shutdown(wait=False)
                self._executor = None
                raise

    @property
    def connected(self) -> bool:
        """True until closed: the bus is a local file, there is no peer to lose."""
        return not self._closing

    def state(self) -> dict[str, Any]:
        """For /health, in the shape of the RabbitMQ bus's."""
        return {
            "backend": "embedded",
            "connected": self.connected,
            "since": datetime.fromtimestamp(self._since, UTC).isoformat(timespec="seconds"),
            "last_error": None,
        }

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Open the file if needed (nothing to wait for); :class:`BusClosedError` once closed."""
        await self.start()

    def _open(self) -> None:
        # Autocommit (explicit BEGIN/COMMIT below); a committed publish survives power loss, not only a crash.
        conn = open_database(self.path, Durability.POWER_LOSS, busy_timeout_s=5.0)
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def close(self) -> None:
        """Stop consumers (letting in-flight handlers finish, up to ``close_timeout``), then close the file.

        Safe to call from inside a handler: that handler's delivery is then not acknowledged, so it is
        delivered again by the next bus opened on the same file.
        """
        if self._closing:
            return
        self._closing = True
        self._since = time.time()
        current = asyncio.current_task()
        for consumer in self._consumers.values():
            consumer.wake.set()
        others = [c.task for c in self._consumers.values() if c.task is not None and c.task is not current]
        if others:
            _, pending = await asyncio.wait(others, timeout=self.close_timeout)
            for task in pending:  # a handler that did not finish in time: its row stays for redelivery
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._executor is not None:
            for consumer in self._consumers.values():  # acks of handlers that returned before close
                with contextlib.suppress(Exception):
                    await self._settle(consumer)
            with contextlib.suppress(Exception):
                await self._run(self._close_conn)
            self._executor.shutdown(wait=False)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise BusClosedError("bus is not started")
        try:
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
            raise BusClosedError(str(exc)) from exc
        return await future

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BusClosedError("bus is closed")
        return self._conn

    # -- publishing ------------------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, *, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Store the message in every bound queue whose pattern matches ``topic``; returns once committed."""
        await self.publish_many([(topic, body, message_id, headers)])

    async def publish_many(self, items: Sequence[Item]) -> None:
        """Publish several messages in one transaction (all or none)."""
        _check(items)  # here, so that one bad item cannot fail the other callers sharing its group commit
        await self.start()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((list(items), done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_publishes())
        await done

    async def _flush_publishes(self) -> None:
        """Commit queued publishes, one transaction per round; later callers share the next round."""
        while self._pending:
            group, self._pending = self._pending, []
            try:
                queues = await self._run(self._insert, [item for items, _ in group for item in items])
            except BaseException as exc:
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc if isinstance(exc, Exception) else BusClosedError(str(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for _, done in group:
                if not done.done():
                    done.set_result(None)
            for queue in queues:
                if queue in self._consumers:
                    self._consumers[queue].wake.set()

    def _insert(self, items: list[Item]) -> set[str]:
        conn = self._db()
        with _transaction(conn):
            # Read inside the transaction: a binding committed before this publish always gets its copy.
            bindings: dict[str, list[str]] = {}
            for queue, pattern in conn.execute("SELECT queue, pattern FROM bindings"):
                bindings.setdefault(queue, []).append(pattern)
            rows = []
            for topic, body, message_id, headers in items:
                header_json = json.dumps(headers or {})
                for queue, patterns in bindings.items():
                    # One copy per queue even when several of its bindings match (AMQP semantics).
                    if any(topic_matches(p, topic) for p in patterns):
                        rows.append((queue, topic, bytes(body), message_id, header_json))
            conn.executemany(
                "INSERT INTO messages (queue, topic, body, message_id, headers) VALUES (?, ?, ?, ?, ?)", rows
            )
        return {row[0] for row in rows}

    async def send(self, queue: str, items: Sequence[Item]) -> None:
        """Store ``items`` in ``queue`` only, in one transaction; ``LookupError`` when ``queue`` was never declared."""
        if not queue or queue.endswith(".dlq"):
            raise ValueError(f"invalid queue name {queue!r}")
        _check(items)
        await self.start()
        await self._run(self._insert_into, queue, list(items))
        if queue in self._consumers:
            self._consumers[queue].wake.set()

    def _insert_into(self, queue: str, items: list[Item]) -> None:
        conn = self._db()
        with _transaction(conn):
            if conn.execute("SELECT 1 FROM bindings WHERE queue = ? LIMIT 1", (queue,)).fetchone() is None:
                raise LookupError(f"no queue {queue!r}: declare it first")
            conn.executemany(
                "INSERT INTO messages (queue, topic, body, message_id, headers) VALUES (?, ?, ?, ?, ?)",
                [(queue, topic, bytes(body), mid, json.dumps(headers or {})) for topic, body, mid, headers in items],
            )

    # -- consuming -------------------------------------------------------------------------------------

    async def declare(self, queue: str, topics: list[str]) -> None:
        """Create the durable queue bindings: from now on matching messages are kept for ``queue``."""
        if not queue or queue.endswith(".dlq"):
            raise ValueError(f"invalid queue name {queue!r}")
        await self.start()
        await self._run(self._bind, queue, topics)

    def _bind(self, queue: str, topics: list[str]) -> None:
        conn = self._db()
        with _transaction(conn):
            conn.executemany(
                "INSERT OR IGNORE INTO bindings (queue, pattern) VALUES (?, ?)", [(queue, t) for t in topics]
            )

    async def subscribe(self, queue: str, topics: list[str], handler: Handler, *, max_attempts: int = 5) -> None:
        """Declare ``queue`` bound to ``topics`` and consume it (waiting rows first, in publish order)."""
        await self.subscribe_batch(queue, topics, one_by_one(handler), max_attempts=max_attempts, max_batch=1)

    async def subscribe_batch(
        self, queue: str, topics: list[str], handler: BatchHandler, *, max_attempts: int = 5, max_batch: int = 100
    ) -> None:
        """Like ``subscribe``, handing the rows available at each fetch in lists of up to ``max_batch``."""
        policy = RetryPolicy(max_attempts, self.retry_backoff)
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if queue in self._consumers:
            raise RuntimeError(f"queue {queue!r} already has a consumer on this bus")
        await self.declare(queue, topics)
        consumer = _Consumer(queue, handler, policy, max_batch)
        self._consumers[queue] = consumer
        consumer.task = asyncio.create_task(self._consume(consumer), name=f"embedded-bus:{queue}")

    async def _consume(self, consumer: _Consumer) -> None:
        while not self._closing:
            try:
                await self._consume_batch(consumer)
            except BusClosedError:
                return  # closed while settling: unsettled rows stay in the file and are delivered again
            except Exception:  # e.g. disk full: keep the consumer alive, the rows are still in the file
                log.exception("bus.consumer_failed", queue=consumer.queue, retry_in=self.poll_interval)
                consumer.inflight.clear()
                await asyncio.sleep(self.poll_interval)

    async def _consume_batch(self, consumer: _Consumer) -> None:
        consumer.wake.clear()  # before fetching, so that a publish during the fetch is not missed
        limit = -(-self.batch_size // consumer.max_batch) * consumer.max_batch  # whole batches, >= batch_size
        rows, next_at = await self._run(self._fetch, consumer.queue, limit)
        if not rows:
            timeout = self.poll_interval
            if next_at is not None:  # a retry falls due before the next poll
                timeout = min(timeout, max(0.0, next_at - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer.wake.wait(), timeout)
            return
        consumer.inflight.update(row.seq for row in rows)
        last_settle = time.monotonic()
        todo = list(_chunks(rows, consumer.max_batch))
        todo.reverse()  # a stack: pop() gives the next list in queue order
        while todo and not self._closing:
            chunk = todo.pop()
            if len(chunk) == 1:
                await self._deliver(consumer, chunk[0])
            elif not await self._deliver_batch(consumer, chunk):
                todo.extend([row] for row in reversed(chunk))  # next: each row of the failed batch alone, in order
            # Acks are committed per fetch (one fsync), but not later than ~50 ms after the handler returned.
            if time.monotonic() - last_settle > 0.05:
                await self._settle(consumer)
                last_settle = time.monotonic()
        await self._settle(consumer)
        consumer.inflight.clear()

    async def _deliver_batch(self, consumer: _Consumer, rows: list[_Row]) -> bool:
        """Hand ``rows`` over as one list; False (nothing acked, no attempt counted) when the handler raised."""
        try:
            await consumer.handler([_delivery(row) for row in rows])
        except Exception as exc:
            outcome = consumer.policy.after_batch_failure(exc)
            consumer.policy.log(outcome, consumer.queue, [row.message_id for row in rows])
            return False
        consumer.acked.extend(row.seq for row in rows)
        return True

    async def _deliver(self, consumer: _Consumer, row: _Row) -> None:
        try:
            await consumer.handler([_delivery(row)])
        except Exception as exc:
            outcome = consumer.policy.after_failure(exc, row.attempt)
            consumer.policy.log(outcome, consumer.queue, [row.message_id], row.attempt)
            consumer.failed.append((row, outcome))
        else:
            # Settled in batches; if close() was called from inside this handler the file is closed by the
            # time it returns, so the settle fails and the row is delivered again by the next bus.
            consumer.acked.append(row.seq)

    async def _settle(self, consumer: _Consumer) -> None:
        acked, consumer.acked = consumer.acked, []
        failed, consumer.failed = consumer.failed, []
        if acked or failed:
            await self._run(self._apply, consumer.queue, acked, failed)
            consumer.inflight.difference_update(acked)
            consumer.inflight.difference_update(row.seq for row, _ in failed)

    def _fetch(self, queue: str, limit: int) -> tuple[list[_Row], float | None]:
        conn = self._db()
        now = time.time()
        rows = [
            _Row(seq, topic, body, message_id, json.loads(headers), attempt)
            for seq, topic, body, message_id, headers, attempt in conn.execute(
                "SELECT seq, topic, body, message_id, headers, attempt FROM messages"
                " WHERE queue = ? AND available_at <= ? ORDER BY seq LIMIT ?",
                (queue, now, limit),
            )
        ]
        next_at = None
        if not rows:
            (next_at,) = conn.execute(
                "SELECT MIN(available_at) FROM messages WHERE queue = ? AND available_at > ?", (queue, now)
            ).fetchone()
        return rows, next_at

    def _apply(self, queue: str, acked: list[int], failed: list[tuple[_Row, Retry | DeadLetter]]) -> None:
        conn = self._db()
        now = time.time()
        with _transaction(conn):
            conn.executemany("DELETE FROM messages WHERE seq = ?", [(seq,) for seq in acked])
            for row, outcome in failed:
                if isinstance(outcome, DeadLetter):
                    headers = {**row.headers, "x-error": outcome.error}
                    conn.execute(
                        "INSERT INTO dead_letters (queue, topic, body, message_id, headers, attempt, dead_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            dlq_name(queue),
                            row.topic,
                            row.body,
                            row.message_id,
                            json.dumps(headers),
                            row.attempt,
                            now,
                        ),
                    )
                    conn.execute("DELETE FROM messages WHERE seq = ?", (row.seq,))
                else:
                    conn.execute(
                        "UPDATE messages SET attempt = ?, available_at = ? WHERE seq = ?",
                        (outcome.attempt, now + outcome.delay, row.seq),
                    )

    # -- inspection ------------------------------------------------------------------------------------

    async def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (including those waiting for a retry, excluding in-flight ones).

        ``<queue>.dlq`` counts the dead letters, as the dead-letter queue would on RabbitMQ.
        """
        await self.start()
        consumer = self._consumers.get(queue)
        return await self._run(self._count, queue, list(consumer.inflight) if consumer else [])

    def _count(self, queue: str, inflight: list[int]) -> int:
        conn = self._db()
        if queue.endswith(".dlq"):
            (n,) = conn.execute("SELECT COUNT(*) FROM dead_letters WHERE queue = ?", (queue,)).fetchone()
            return int(n)
        (n,) = conn.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()
        if inflight:
            marks = ",".join("?" * len(inflight))
            (busy,) = conn.execute(
                f"SELECT COUNT(*) FROM messages WHERE queue = ? AND seq IN ({marks})", (queue, *inflight)
            ).fetchone()
            n -= busy
        return int(n)

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Delivery]:
        """Messages parked in ``<queue>.dlq``, oldest first; ``attempt`` is the number of failed attempts."""
        await self.start()
        return await self._run(self._dead_letters, dlq_name(queue), limit)

    def _dead_letters(self, dlq: str, limit: int) -> list[Delivery]:
        return [
            Delivery(topic, body, message_id, json.loads(headers), attempt)
            for topic, body, message_id, headers, attempt in self._db().execute(
                "SELECT topic, body, message_id, headers, attempt FROM dead_letters"
                " WHERE queue = ? ORDER BY seq LIMIT ?",
                (dlq, limit),
            )
        ]

    async def replay_dead_letter(self, queue: str, message_id: str) -> bool:
        """Move the dead letter(s) with ``message_id`` back into ``queue`` as fresh deliveries (attempt 1)."""
        await self.start()
        moved = await self._run(self._replay, queue, message_id)
        if moved and queue in self._consumers:
            self._consumers[queue].wake.set()
        return moved

    def _replay(self, queue: str, message_id: str) -> bool:
        conn = self._db()
        with _transaction(conn):
            rows = conn.execute(
                "SELECT seq, topic, body, headers FROM dead_letters WHERE queue = ? AND message_id = ? ORDER BY seq",
                (dlq_name(queue), message_id),
            ).fetchall()
            for seq, topic, body, headers in rows:
                clean = {k: v for k, v in json.loads(headers).items() if k != "x-error"}
                conn.execute(
                    "INSERT INTO messages (queue, topic, body, message_id, headers) VALUES (?, ?, ?, ?, ?)",
                    (queue, topic, body, message_id, json.dumps(clean)),
                )
                conn.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))
        return bool(rows)

    async def discard_dead_letter(self, queue: str, message_id: str) -> bool:
        """Delete the dead letter(s) with ``message_id`` from ``<queue>.dlq``; False when there is none by that id."""
        await self.start()
        return await self._run(self._discard, dlq_name(queue), message_id)

    def _discard(self, dlq: str, message_id: str) -> bool:
        conn = self._db()
        with _transaction(conn):
            gone = conn.execute("DELETE FROM dead_letters WHERE queue = ? AND message_id = ?", (dlq, message_id))
        return gone.rowcount > 0


def _check(items: Sequence[Item]) -> None:
    for topic, body, message_id, headers in items:
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        if not topic or not isinstance(message_id, str):
            raise ValueError("topic and message_id are required")
        if headers is not None and not all(isinstance(v, str) for v in headers.values()):
            raise TypeError("header values must be str")


def _delivery(row: _Row) -> Delivery:
    return Delivery(row.topic, row.body, row.message_id, dict(row.headers), row.attempt)


def _chunks(rows: list[_Row], size: int) -> Iterator[list[_Row]]:
    """Consecutive runs of up to ``size`` rows, in order; a row that already failed (attempt > 1) is alone."""
    chunk: list[_Row] = []
    for row in rows:
        if handed_alone(row.attempt):
            if chunk:
                yield chunk
                chunk = []
            yield [row]
            continue
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
