"""The ``Bus`` protocol on RabbitMQ (aio-pika), with the same observable semantics as the embedded bus.

Topology, all durable: a topic exchange ``<exchange>``; per subscriber queue ``<exchange>.<queue>`` bound to its
topics; a direct exchange ``<exchange>.dlx`` routing to each queue's dead-letter queue ``<exchange>.<queue>.dlq``.

Queue type and retries: queues are classic durable queues by default, and attempts are counted by the
application, which applies the bus's retry policy (``traboule.bus.retry``, the embedded bus's too): it republishes
a failed message (after its backoff) with ``x-attempt`` + 1 and then acks the original; after ``max_attempts`` it
publishes it to ``<queue>.dlq`` with ``x-error`` and acks. Why not
quorum queues with ``x-delivery-limit``: on the installed RabbitMQ (3.10) their ``x-delivery-count`` grows on
*every* return, including the prefetched, never-handled messages returned at each graceful restart or
connection loss (measured: +1 per channel close), so a message could be dead-lettered without its handler ever
failing; broker-side dead-lettering also cannot record the handler's error, and a plain requeue has no backoff.
Counting in the application gives exactly the embedded bus's behaviour (attempt numbers, backoff, ``x-error``)
with any queue type. ``queue_type="quorum"`` (replicated clusters) declares every queue, dead-letter queues too,
with ``x-queue-type: quorum``: ``x-delivery-count`` is ignored, so broker restarts, leader changes and consumer
reconnections never count as attempts (docs/architecture.md, "The bus on a RabbitMQ cluster"). There, a
subscriber queue also gets ``x-single-active-consumer`` (several engine nodes run the same channels: one
consumer per queue at a time, the others standing by, so per-queue order holds across nodes) and a broker-side
dead-letter route to its ``.dlq`` (``at-least-once``, ``reject-publish``), a safety net for whatever the broker
itself would drop (the engine never rejects without requeue). On RabbitMQ >= 4.0, which gives quorum queues a
default delivery limit of 20, every quorum queue is declared with ``x-delivery-limit: -1`` (unlimited); on 3.x
no limit is set (3.x has none by default, and reads -1 as "drop at the first return"). Classic queues get no
argument at all, as ever.

Partitions (``partitions`` >= 2, ``[bus] partitions``): ordering per patient with patients in parallel, on
what RabbitMQ ships. A subscriber is then a consistent-hash exchange ``<queue>.hash`` (plugin
``rabbitmq_consistent_hash_exchange``, hashing the ``partition-key`` header) bound to the topic exchange by the
subscriber's topics, and ``partitions`` queues ``<queue>.p0`` ... bound to it with the same weight, each with
``x-single-active-consumer`` (and the queue type's arguments, dead letters going to the subscriber's one
``<queue>.dlq``). Every engine node consumes every partition, each on its own channel with its own worker: one
node at a time is active per partition (the first to subscribe it; RabbitMQ 3.10 has no balancing of active
consumers), the partitions run concurrently and each keeps its order. A message without the header hashes like
every other keyless one: they all go to one partition. Within a partition, a delivery that fails is not
republished at the tail (its key's later messages would overtake it): it stays unacked and is tried again in
place after its backoff, while the messages of its key (the same header value) that come meanwhile are set
aside, unacked, and handed over after it, in order; the other keys go on. The attempt number of a retry in place
is kept in memory (a redelivery after a crash starts again from its header). A key's messages set aside take
prefetch slots: a key with more than ``prefetch`` messages waiting stalls its partition until its failing message
is settled. A message that could not be settled while its channel is open (its dead letter not published) is held
in place too, at the same attempt. When the broker closes a partition's channel alone (``consumer_timeout``, which
an event held in place for long reaches; a channel error), aio-pika reopens it while single active consumer may
give the partition to another node: everything delivered on the closed channel is forgotten (held keys, messages
set aside, buffered ones), and a message the worker still holds is skipped without calling the handler. Changing
``partitions`` on a running site re-spreads the keys: see docs/operations.md. A subscriber exists in one mode
only: declaring or subscribing it raises :class:`ConfigError` when the broker holds the other one (its single
queue while partitioned, its consistent-hash exchange while not), which would consume every event twice.

Brokers: ``url`` may list several brokers of one cluster, comma-separated (``amqp://a:5672/,amqp://b:5672/``).
The first connection tries them in turn; once connected, a lost connection makes the next reconnection attempt
go to the next broker of the list, and so on round the list until one answers (aio-pika restores channels,
queues and consumers there). Messages prefetched on the lost connection are dropped from the buffers unhandled
(they can no longer be acked; the broker delivers them again), and one already taken from them is skipped.

Availability: the engine must take orders while the broker is down (the journal holds them and the outbox
publishes them later), so ``start`` never fails on an unreachable broker. It waits for one connection attempt
per broker listed (so a reachable broker is ready when it returns), then a background task retries with a capped
exponential backoff (``reconnect_min`` → ``reconnect_max``, per round of the list). Until the first connection,
``declare`` and ``subscribe*`` are recorded and applied on connection, before anything can be published, so no
event reaches the exchange before the queues it is routed to exist. ``publish`` and the inspection methods raise
:class:`BusUnavailableError` at once while disconnected (the outbox dispatcher retries every second). Once
connected, aio-pika's robust connection reconnects by itself and restores channels, queues, bindings and
consumers, as before (on the next broker of the list, see above).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelInvalidStateError, ChannelNotFoundEntity
from aiormq.abc import DeliveredMessage
from yarl import URL

from traboule.bus import PARTITION_KEY, BatchHandler, Delivery, Handler, Item, dlq_name, one_by_one
from traboule.bus.retry import Retry, RetryPolicy, handed_alone
from traboule.errors import BusUnavailableError, ConfigError

log = structlog.get_logger("traboule.adapters.rabbitmq")

ATTEMPT = "x-attempt"  # deliveries so far, including this one (absent on the first)
TOPIC = "x-original-topic"  # what goes to one queue travels via the default exchange, which loses the topic
ERROR = "x-error"
DELIVERY_COUNT = "x-delivery-count"  # a quorum queue's count of returns (restarts too): not an attempt, not shown
_INTERNAL = frozenset({ATTEMPT, TOPIC, DELIVERY_COUNT})
_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")  # the broker's dead-lettering notes (x-death is a table)


@dataclass(frozen=True)
class _Due:
    """Put in a partition's buffer when the backoff of its held ``message`` (the first of ``key``) is over."""

    key: str
    message: AbstractIncomingMessage
    attempt: int  # the attempt number of the next try


_Buffered = AbstractIncomingMessage | _Due | None  # None: the bus is closing


@dataclass
class _Subscription:
    name: str  # the broker's queue name (a partition's own queue when partitioned)
    topics: list[str]
    handler: BatchHandler
    policy: RetryPolicy
    max_batch: int
    base: str = ""  # the subscriber's queue name: its dead-letter queue is ``<base>.dlq`` ("" = ``name``)
    partition: int | None = None  # the partition consumed (None: the subscriber's one queue)
    queue: AbstractQueue | None = None  # None until consumed on a connection
    buffer: asyncio.Queue[_Buffered] = field(default_factory=asyncio.Queue)
    held: AbstractIncomingMessage | _Due | None = None  # taken from the buffer, to start the next batch
    consumer_tag: str | None = None
    worker: asyncio.Task[None] | None = None
    # Partitions only: per key, the messages held back behind the key's failing one (first), in queue order.
    blocked: dict[str, deque[AbstractIncomingMessage]] = field(default_factory=dict)

    @property
    def dead_letters(self) -> str:
        """The subscriber queue whose ``.dlq`` takes this subscription's dead letters."""
        return self.base or self.name


class RabbitMQBus:
    """Durable topic bus on RabbitMQ: publisher confirms, persistent messages, manual acks after the handler."""

    def __init__(
        self,
        url: str | Sequence[str],
        exchange: str = "traboule",
        prefetch: int = 64,
        *,
        retry_backoff: float = 0.2,
        close_timeout: float = 10.0,
        queue_type: Literal["classic", "quorum"] = "classic",
        connect_timeout: float = 5.0,
        reconnect_min: float = 1.0,
        reconnect_max: float = 30.0,
        publish_timeout: float = 30.0,
        partitions: int = 1,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.urls = _broker_urls(url)
        self._current = 0  # index in ``urls`` of the broker connected to, or to be tried next
        self.exchange = exchange
        self.prefetch = prefetch
        self.retry_backoff = retry_backoff  # a failed delivery waits retry_backoff * attempt before the next
        self.close_timeout = close_timeout
        self.queue_type = queue_type
        self.connect_timeout = connect_timeout  # one connection attempt (TCP + AMQP handshake)
        self.reconnect_min = reconnect_min  # first connection: delay after the first failure, doubled up to max
        self.reconnect_max = reconnect_max
        self.publish_timeout = publish_timeout  # bounds a publish caught by a connection loss or a blocked broker
        self.partitions = partitions  # >= 2: each subscriber is that many queues behind a consistent-hash exchange
        self._connection: AbstractRobustConnection | None = None  # set once connected and intents applied
        self._channel: AbstractChannel | None = None  # publisher confirms; declarations and publishing
        self._topic_exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._broker_version: tuple[int, ...] = ()  # from the connection's server properties; () when unknown
        self._declarations: list[tuple[str, list[str]]] = []  # declared before the first connection
        self._subscriptions: list[_Subscription] = []
        self._retries: set[asyncio.Task[None]] = set()
        self._connector: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._up = asyncio.Event()  # connected and usable (cleared while aio-pika reconnects)
        self._since = time.time()  # last change of ``connected`` (or creation)
        self._last_error: BaseException | None = None
        self._closing = False
        self._failover: asyncio.Task[None] | None = None  # rotates the broker while reconnecting (several urls)
        self._partitioned: set[str] = set()  # subscriber queues whose consistent-hash exchange was seen

    @property
    def broker_version(self) -> tuple[int, ...]:
        """The version of the broker connected to (last connected to), e.g. ``(3, 10, 8)``; () before that."""
        return self._broker_version

    @property
    def url(self) -> str:
        """The broker connected to (or tried next)."""
        return self.urls[self._current]

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting; idempotent. Never fails on an unreachable broker (see the module docstring).

        Returns once the first attempt on each broker is over (at most ``connect_timeout`` + 1 s): connected when a
        broker is reachable, otherwise connecting in the background (see ``connected``, ``wait_connected``).
        """
        if self._closing:
            raise BusUnavailableError("RabbitMQ bus is closed")
        if self._connector is None:
            self._connector = asyncio.create_task(self._connect_loop(), name=f"rabbitmq-bus:connect:{self.exchange}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.connect_timeout + 1):
                await self._first_attempt.wait()

    @property
    def connected(self) -> bool:
        """True when the broker is connected and the recorded declarations applied: ``publish`` can succeed."""
        return self._up.is_set()

    def state(self) -> dict[str, Any]:
        """For /health: connected or not, since when (ISO 8601 UTC), and the type of the last connection error
        (kept after recovery: ``since`` tells when the state last changed)."""
        return {
            "backend": "rabbitmq",
            "connected": self.connected,
            "since": datetime.fromtimestamp(self._since, UTC).isoformat(timespec="seconds"),
            "last_error": type(_root(self._last_error)).__name__ if self._last_error is not None else None,
        }

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` seconds for the connection; :class:`BusUnavailableError` (with the last error)
        after that. For tools (the CLI) that have nothing to do without the broker."""
        await self._ensure_started()
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            raise BusUnavailableError(self._unavailable(f"not connected after {timeout:g} s")) from None

    async def _ensure_started(self) -> None:
        if self._connector is None and not self._closing:
            await self.start()  # the other methods imply start, as on the embedded bus

    async def _connect_loop(self) -> None:
        """Connect for the first time, retrying with a capped exponential backoff; aio-pika's robust connection
        takes over after that. Each failure is logged: the backoff bounds the rate (one line per
        ``reconnect_max`` once capped)."""
        delay, attempt, down_since = self.reconnect_min, 0, time.monotonic()
        while not self._closing:
            attempt += 1
            self._current = (attempt - 1) % len(self.urls)  # each broker in turn; the backoff grows per round
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:  # the broker holds the other mode's topology: nothing is consumed
                self._last_error = exc
                self._first_attempt.set()
                log.error("rabbitmq.topology_conflict", broker=self._redacted_url(), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
                continue
            except Exception as exc:
                self._last_error = exc
                round_over = self._current == len(self.urls) - 1  # every broker of the list failed
                if round_over:
                    self._first_attempt.set()
                log.warning(
                    "rabbitmq.unreachable",
                    broker=self._redacted_url(),
                    attempt=attempt,
                    error=_describe(exc),
                    retry_in=delay if round_over else 0,
                )
                if round_over:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.reconnect_max)
                continue
            self._first_attempt.set()
            if attempt > 1:
                log.info(
                    "rabbitmq.connected",
                    broker=self._redacted_url(),
                    attempts=attempt,
                    down_s=round(time.monotonic() - down_since),
                )
            return

    async def _connect_once(self) -> None:
        """One attempt: connect, declare the exchanges, apply the recorded declarations and subscriptions; on any
        failure close everything of this attempt, so that the next one starts clean."""
        connection = aio_pika.RobustConnection(URL(self.url))
        consumed: list[_Subscription] = []
        try:
            # Both bounds: aiormq's timeout covers the handshake, the outer one anything left unbounded.
            async with asyncio.timeout(self.connect_timeout + 1):
                await connection.connect(timeout=self.connect_timeout)
            self._broker_version = _server_version(connection)
            channel = await connection.channel(publisher_confirms=True)
            topic_exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            dlx = await channel.declare_exchange(f"{self.exchange}.dlx", aio_pika.ExchangeType.DIRECT, durable=True)
            # Recorded in order; calls made meanwhile append to these lists and are applied by the same loops.
            while self._declarations:
                queue, topics = self._declarations[0]
                await self._check_mode(connection, queue)
                await self._declare(channel, queue, topics)
                self._declarations.pop(0)
            while (sub := next((s for s in self._subscriptions if s.queue is None), None)) is not None:
                consumed.append(sub)
                if sub.partition is None or sub.partition == 0:
                    await self._check_mode(connection, sub.dead_letters)
                await self._consume(connection, sub)
        except BaseException:
            for sub in consumed:  # consumed on the connection being closed: start afresh on the next one
                sub.queue, sub.consumer_tag, sub.held = None, None, None
                sub.blocked.clear()
                _drain(sub.buffer)  # unacked, so the broker redelivers them
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        # No await since the last check of the pending lists: nothing recorded can be missed.
        self._connection, self._channel, self._topic_exchange, self._dlx = connection, channel, topic_exchange, dlx
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_reconnected)
        self._set_up(True)

    def _on_connection_lost(self, connection: Any, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        if self.connected:
            log.warning("rabbitmq.connection_lost", broker=self._redacted_url(), error=_describe(exc))
        if isinstance(exc, Exception):
            self._last_error = exc
        self._set_up(False)
        for sub in self._subscriptions:  # delivered on the lost connection: no longer ackable, the broker redelivers
            sub.held = None
            sub.blocked.clear()  # in their queue order, before anything newer
            _drain(sub.buffer)
        if len(self.urls) > 1 and isinstance(connection, aio_pika.RobustConnection):
            self._next_broker(connection)
            if self._failover is None or self._failover.done():
                self._failover = asyncio.create_task(self._fail_over(connection), name="rabbitmq-bus:failover")

    def _next_broker(self, connection: aio_pika.RobustConnection) -> None:
        """Make aio-pika's next reconnection attempt go to the next broker of the list."""
        self._current = (self._current + 1) % len(self.urls)
        connection.url = URL(self.url)

    async def _fail_over(self, connection: aio_pika.RobustConnection) -> None:
        """While reconnecting, move on to the next broker at the pace of aio-pika's attempts (one per
        ``reconnect_interval``), so that a broker that stays down is not retried for ever."""
        while not self._closing and not self.connected and not connection.is_closed:
            await asyncio.sleep(connection.reconnect_interval + 0.05)
            if not self._closing and not self.connected and not connection.is_closed:
                self._next_broker(connection)

    def _on_reconnected(self, connection: Any) -> None:
        if isinstance(connection, aio_pika.RobustConnection):
            self._broker_version = _server_version(connection)
        if not self._closing:
            log.info("rabbitmq.reconnected", broker=self._redacted_url())
            self._set_up(True)

    def _set_up(self, up: bool) -> None:
        if up != self.connected:
            self._since = time.time()
        if up:
            self._up.set()
        else:
            self._up.clear()

    def _redacted_url(self) -> str:
        """The broker's address for logs and errors: no password, no query (it may name key files)."""
        url = URL(self.url)
        return str(url.with_password(None).with_query(None)) if url.is_absolute() else "(invalid AMQP URL)"

    def _unavailable(self, what: str) -> str:
        error = f"; last error: {_describe(self._last_error)}" if self._last_error is not None else ""
        return f"RabbitMQ {self._redacted_url()} {what}{error}"

    def _live(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        """The connection and publishing channel, or :class:`BusUnavailableError` at once (never waiting for a
        reconnection: callers such as the outbox dispatcher retry on their own schedule)."""
        if self._closing:
            raise BusUnavailableError(f"RabbitMQ {self._redacted_url()}: bus is closed")
        if self._connection is None or self._channel is None or not self.connected:
            raise BusUnavailableError(self._unavailable("is not connected"))
        return self._connection, self._channel

    async def close(self) -> None:
        """Stop connecting or consuming (letting in-flight handlers finish, up to ``close_timeout``) and
        disconnect; prompt in every state (never connected, connecting, connected, reconnecting).

        Safe to call from inside a handler: that delivery is then not acknowledged and the broker delivers it
        again to the next consumer. Prefetched, unhandled messages go back to the queue, without counting as
        an attempt.
        """
        if self._closing:
            return
        self._closing = True
        self._first_attempt.set()  # a start() waiting for the first attempt returns now
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()  # closes the connection of an attempt under way
            await asyncio.gather(self._connector, return_exceptions=True)
        current = asyncio.current_task()
        for sub in self._subscriptions:
            # No new deliveries while the in-flight ones finish; while disconnected there is nothing to cancel
            # (and aio-pika would wait for the reconnection).
            if sub.queue is not None and sub.consumer_tag is not None and self.connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sub.queue.cancel(sub.consumer_tag), self.close_timeout)
            sub.buffer.put_nowait(None)
        workers = [s.worker for s in self._subscriptions if s.worker is not None and s.worker is not current]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=self.close_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in list(self._retries):  # unacked originals return to the queue with their attempt number
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)
        self._up.clear()
        if self._failover is not None:
            self._failover.cancel()
            await asyncio.gather(self._failover, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()

    # -- publishing ------------------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, *, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Publish persistently to the topic exchange; returns once the broker confirmed it.

        Raises :class:`BusUnavailableError` at once while disconnected, or when no confirm came within
        ``publish_timeout`` (then the message may still arrive: publishing again may duplicate it).
        """
        await self.publish_many([(topic, body, message_id, headers)])

    async def publish_many(self, items: Sequence[Item]) -> None:
        """Publish several messages with their confirms awaited concurrently (pipelined, not one by one)."""
        await self._ensure_started()
        self._live()  # raises at once while disconnected
        assert self._topic_exchange is not None
        exchange = self._topic_exchange
        try:
            async with asyncio.timeout(self.publish_timeout):
                # mandatory=False: like the embedded bus, a topic nobody is bound to is dropped, not an error.
                await asyncio.gather(
                    *(
                        exchange.publish(_message(body, mid, dict(headers or {})), routing_key=topic, mandatory=False)
                        for topic, body, mid, headers in items
                    )
                )
        except TimeoutError:
            raise BusUnavailableError(
                self._unavailable(f"gave no publisher confirm within {self.publish_timeout:g} s")
            ) from None

    async def send(self, queue: str, items: Sequence[Item]) -> None:
        """Put ``items`` on ``queue`` only, through the default exchange (the topic travels in a header), their
        confirms awaited concurrently; ``LookupError`` when the broker has no such queue (the messages come back
        unroutable: nothing is delivered). :class:`BusUnavailableError` as for ``publish``."""
        queue = _checked(self.queue_name(queue))
        await self._ensure_started()
        _, channel = self._live()
        if self.partitions >= 2:
            await self._check_partitioned(queue)
        try:
            async with asyncio.timeout(self.publish_timeout):
                await asyncio.gather(
                    *(
                        self._to_subscriber(channel, queue, topic, body, mid, _public(headers))
                        for topic, body, mid, headers in items
                    )
                )
        except TimeoutError:
            raise BusUnavailableError(
                self._unavailable(f"gave no publisher confirm within {self.publish_timeout:g} s")
            ) from None

    async def _check_partitioned(self, queue: str) -> None:
        """``LookupError`` unless subscriber ``queue``'s consistent-hash exchange exists (checked on a scratch
        channel: publishing to a missing exchange would close the publishing channel). Checked once per queue:
        an exchange seen is remembered (a subscriber's topology is not deleted under a running engine)."""
        if queue in self._partitioned:
            return
        async with self._scratch_channel() as channel:
            try:
                await channel.declare_exchange(hash_exchange_name(queue), passive=True)
            except ChannelNotFoundEntity:
                raise LookupError(f"no queue {queue!r} on the broker: declare it first") from None
        self._partitioned.add(queue)

    async def _to_subscriber(
        self, channel: AbstractChannel, queue: str, topic: str, body: bytes, message_id: str, headers: dict[str, str]
    ) -> None:
        """Put one message on subscriber ``queue`` only: its one queue, or the partition its key hashes to
        (through its consistent-hash exchange, checked beforehand by ``_check_partitioned``)."""
        if self.partitions < 2:
            await _to_queue(channel, queue, topic, body, message_id, headers)
            return
        exchange = await channel.get_exchange(hash_exchange_name(queue), ensure=False)
        result = await exchange.publish(
            _message(body, message_id, {**headers, TOPIC: topic}), routing_key=topic, mandatory=True
        )
        if isinstance(result, DeliveredMessage):  # returned: no partition bound
            raise LookupError(f"no partition of {queue!r} on the broker: declare it first")

    # -- consuming -------------------------------------------------------------------------------------

    def queue_name(self, queue: str) -> str:
        """The broker's name for a channel's queue: prefixed with the exchange, so that engines sharing a broker
        (or test runs) never consume each other's queues."""
        return f"{self.exchange}.{queue}"

    async def declare(self, queue: str, topics: list[str]) -> None:
        """Declare the durable queue, its dead-letter queue and bindings, without consuming.

        Before the first connection the declaration is recorded and applied on connection, before any publish
        can go through (so nothing routed to it is lost).
        """
        queue = _checked(self.queue_name(queue))
        await self._ensure_started()
        if self._connection is None:
            self._declarations.append((queue, list(topics)))
            return
        assert self._channel is not None  # during a reconnection, aio-pika's robust channel waits for it
        await self._check_mode(self._connection, queue)
        await self._declare(self._channel, queue, topics)

    async def _check_mode(self, connection: AbstractRobustConnection, queue: str) -> None:
        """:class:`ConfigError` when the broker holds subscriber ``queue`` in the other mode: its one queue while
        this bus is partitioned, or its consistent-hash exchange while it is not. Both bound to the topic exchange,
        every event would be consumed twice (once per mode): the engine refuses to go on until one is deleted."""
        if self.partitions >= 2:
            other, kind = queue, "queue"
            found = await _exists(connection, lambda channel: channel.declare_queue(queue, passive=True))
        else:
            other, kind = hash_exchange_name(queue), "exchange"
            found = await _exists(connection, lambda channel: channel.declare_exchange(other, passive=True))
        if found:
            mode = f"partitions = {self.partitions}" if self.partitions >= 2 else "partitions = 1"
            raise ConfigError(
                f"RabbitMQ holds the {kind} {other!r}, left by engine nodes run with another [bus] partitions, while "
                f"this node runs with {mode}: both would consume every event of {queue!r}. Set the same [bus] "
                "partitions on every node and delete what the other setting declared (docs/operations.md)"
            )

    async def _declare(self, channel: AbstractChannel, queue: str, topics: list[str]) -> None:
        """The subscriber ``queue`` with everything it needs: its one queue, or its partitions."""
        if self.partitions < 2:
            await self._declare_queue(channel, queue, topics)
            return
        await self._declare_partitioning(channel, queue, topics)
        for partition in range(self.partitions):
            await self._declare_partition(channel, queue, partition)

    async def _declare_queue(self, channel: AbstractChannel, queue: str, topics: list[str]) -> AbstractQueue:
        await self._declare_dlq(channel, queue)
        declared = await channel.declare_queue(queue, durable=True, arguments=self.queue_arguments(queue))
        for topic in topics:
            await declared.bind(self.exchange, routing_key=topic)
        return declared

    async def _declare_partitioning(self, channel: AbstractChannel, queue: str, topics: list[str]) -> None:
        """The dead-letter queue of subscriber ``queue`` and its consistent-hash exchange, bound to the topic
        exchange by ``topics`` and hashing the ``partition-key`` header."""
        await self._declare_dlq(channel, queue)
        hashing = await channel.declare_exchange(
            hash_exchange_name(queue),
            aio_pika.ExchangeType.X_CONSISTENT_HASH,
            durable=True,
            arguments={"hash-header": PARTITION_KEY},
        )
        for topic in topics:
            await hashing.bind(self.exchange, routing_key=topic)

    async def _declare_partition(self, channel: AbstractChannel, queue: str, partition: int) -> AbstractQueue:
        """Partition ``partition`` of subscriber ``queue``: its own queue (one active consumer), bound with the
        weight 1 to the subscriber's consistent-hash exchange, its dead letters going to ``<queue>.dlq``."""
        arguments = {**self.queue_arguments(queue), "x-single-active-consumer": True}
        declared = await channel.declare_queue(partition_name(queue, partition), durable=True, arguments=arguments)
        await declared.bind(hash_exchange_name(queue), routing_key="1")
        return declared

    async def _declare_dlq(self, channel: AbstractChannel, queue: str) -> None:
        dlq = await channel.declare_queue(
            dlq_name(queue), durable=True, arguments=self.queue_arguments(queue, dlq=True)
        )
        await dlq.bind(f"{self.exchange}.dlx", routing_key=dlq_name(queue))

    def queue_arguments(self, queue: str, *, dlq: bool = False) -> dict[str, Any]:
        """The arguments ``queue`` (or its dead-letter queue) is declared with on the broker connected to: none
        for classic queues, :func:`quorum_arguments` for quorum queues. A queue's arguments are fixed when it is
        created: redeclaring an existing queue with other ones is refused (PRECONDITION_FAILED)."""
        if self.queue_type != "quorum":
            return {}
        return quorum_arguments(self.exchange, queue, self.broker_version, dlq=dlq)

    async def subscribe(self, queue: str, topics: list[str], handler: Handler, *, max_attempts: int = 5) -> None:
        """Declare ``queue`` bound to ``topics`` and consume it; deliveries are handled one at a time, in order."""
        await self.subscribe_batch(queue, topics, one_by_one(handler), max_attempts=max_attempts, max_batch=1)

    async def subscribe_batch(
        self, queue: str, topics: list[str], handler: BatchHandler, *, max_attempts: int = 5, max_batch: int = 100
    ) -> None:
        """Like ``subscribe``, handing over the prefetched messages in lists of up to ``max_batch``.

        A batch is the first message to arrive plus whatever is already prefetched behind it (never waiting for
        more), so the subscription's prefetch window is ``max(prefetch, max_batch)``. Before the first
        connection the subscription is recorded and starts on connection.
        """
        queue = _checked(self.queue_name(queue))
        policy = RetryPolicy(max_attempts, self.retry_backoff)
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        await self._ensure_started()
        if self.partitions < 2:
            subs = [_Subscription(queue, list(topics), handler, policy, max_batch)]
        else:  # one consumer per partition, each with its own channel, worker and order
            subs = [
                _Subscription(partition_name(queue, p), list(topics), handler, policy, max_batch, queue, p)
                for p in range(self.partitions)
            ]
        if self._connection is None:
            self._subscriptions.extend(subs)  # the connector consumes them
            return
        await self._check_mode(self._connection, queue)
        for sub in subs:
            try:
                await self._consume(self._connection, sub)
            except BaseException:
                if sub.worker is not None:
                    sub.worker.cancel()
                raise
            self._subscriptions.append(sub)

    async def _consume(self, connection: AbstractRobustConnection, sub: _Subscription) -> None:
        # A channel per subscription: its own prefetch window, and a channel error cannot stop the others.
        channel = await connection.channel()
        # A channel closed alone (the broker's consumer_timeout, a channel error) is reopened by aio-pika, and the
        # partition may meanwhile have gone to another node's consumer: forget what was delivered on it.
        channel.close_callbacks.add(lambda _channel, exc=None: self._on_channel_closed(sub, exc))
        await channel.set_qos(prefetch_count=max(self.prefetch, sub.max_batch))
        if sub.partition is None:
            sub.queue = await self._declare_queue(channel, sub.name, sub.topics)
        else:
            await self._declare_partitioning(channel, sub.base, sub.topics)
            sub.queue = await self._declare_partition(channel, sub.base, sub.partition)
        if sub.worker is None:
            sub.worker = asyncio.create_task(self._work(sub), name=f"rabbitmq-bus:{sub.name}")
        sub.consumer_tag = await sub.queue.consume(sub.buffer.put, no_ack=False)

    def _on_channel_closed(self, sub: _Subscription, exc: BaseException | None) -> None:
        """``sub``'s channel closed (alone, or with the connection): the messages delivered on it can no longer be
        settled and the broker delivers them again, perhaps to another node (single active consumer). Held keys,
        messages set aside and buffered ones are dropped unhandled; a backoff ending later finds nothing to resume,
        and a message the worker holds is skipped (``_handle_one``, ``_handle_batch``)."""
        if self._closing:
            return  # closing: the buffer holds the worker's stop sentinel
        if sub.blocked:  # events held in place: they go back to the queue, perhaps to another node
            log.warning("bus.channel_closed", queue=sub.name, error=_describe(exc), held_keys=len(sub.blocked))
        sub.held = None
        sub.blocked.clear()
        _drain(sub.buffer)

    async def _work(self, sub: _Subscription) -> None:
        while not self._closing:
            batch = await self._next_batch(sub)
            if isinstance(batch, _Due):
                await self._resume(sub, batch)
                continue
            if not batch or self._closing:
                return  # unacked: the broker redelivers them when the channel closes
            if len(batch) > 1 and await self._handle_batch(sub, batch):
                continue
            for message in batch:  # one at a time: a single delivery, or the messages of a batch that failed
                if self._closing:
                    return
                if not self._held_back(sub, message):  # behind one of its key that failed just now
                    await self._handle_one(sub, message)

    async def _next_batch(self, sub: _Subscription) -> list[AbstractIncomingMessage] | _Due:
        """The next message (waiting for it), then those already buffered behind it, up to ``max_batch``; or a
        held key whose backoff is over. Messages of a held key are set aside behind it (partitions only)."""
        first, sub.held = sub.held, None
        while first is None or (not isinstance(first, _Due) and self._held_back(sub, first)):
            first = await sub.buffer.get()
            if first is None:
                return []  # closing
        if isinstance(first, _Due):
            return first
        batch = [first]
        if handed_alone(_attempt(first)):
            return batch
        while len(batch) < sub.max_batch:
            try:
                message = sub.buffer.get_nowait()
            except asyncio.QueueEmpty:
                break
            if message is None:
                break  # closing (the flag is set before the sentinel is queued): _work stops
            if isinstance(message, _Due) or handed_alone(_attempt(message)):
                sub.held = message
                break
            if not self._held_back(sub, message):
                batch.append(message)
        return batch

    def _held_back(self, sub: _Subscription, message: AbstractIncomingMessage) -> bool:
        """Whether ``message`` waits behind a failing message of its key (partitions only), set aside if so; a
        message whose channel closed is dropped instead (True): the broker delivers it again."""
        waiting = sub.blocked.get(_partition_key(message)) if sub.partition is not None else None
        if waiting is None:
            return False
        if _settleable(message):
            waiting.append(message)
        return True

    async def _resume(self, sub: _Subscription, due: _Due) -> None:
        """Try a held key's failing message again, then hand its messages set aside behind it over one by one,
        in order, until one fails again (the key is held again) or none is left (the key is free)."""
        waiting = sub.blocked.get(due.key)
        if not waiting or waiting[0] is not due.message:
            return  # stale: the connection was lost since (the broker delivers them all again)
        attempt: int | None = due.attempt
        while waiting and not self._closing:
            settled = await self._handle_one(sub, waiting[0], attempt)
            if settled is None:  # not settled, put back (its channel is gone, most likely): the rest follows it
                if sub.blocked.get(due.key) is waiting:
                    del sub.blocked[due.key]
                waiting.popleft()
                for message in waiting:  # in order, behind it; refused too when their channel is gone
                    with contextlib.suppress(Exception):
                        await message.nack(requeue=True)
                return
            if not settled:
                return  # failed again and held: a new backoff
            waiting.popleft()
            attempt = None
        if not waiting and sub.blocked.get(due.key) is waiting:
            del sub.blocked[due.key]

    async def _handle_batch(self, sub: _Subscription, batch: list[AbstractIncomingMessage]) -> bool:
        """Hand ``batch`` over as one list and ack it; False (nothing settled) when the handler raised. Messages
        whose channel closed meanwhile are left out (not handed over): the broker delivers them again."""
        batch = [message for message in batch if _settleable(message)]
        if not batch:
            return True
        try:
            await sub.handler([_delivery(message) for message in batch])
        except Exception as exc:
            sub.policy.log(sub.policy.after_batch_failure(exc), sub.name, [m.message_id or "" for m in batch])
            return False
        # One ack per message: ack(multiple=True) would also ack older messages of this channel that are
        # still unacked on purpose (originals of failed deliveries waiting for their retry).
        for n, message in enumerate(batch):
            try:
                await message.ack()
            except Exception as exc:  # e.g. the connection dropped while settling: the broker redelivers
                self._settle_failed(sub, message, exc)
                if not self._closing:
                    for unsettled in batch[n:]:
                        with contextlib.suppress(Exception):
                            await unsettled.nack(requeue=True)  # same attempt number, handled again
                break
        return True

    async def _handle_one(
        self, sub: _Subscription, message: AbstractIncomingMessage, attempt: int | None = None
    ) -> bool | None:
        """Handle ``message`` alone (as ``attempt`` when given: a retry in place); True once it is settled (acked
        or dead-lettered), False when it waits for a retry, None when it could not be settled (put back).

        A message whose channel is closed is skipped without calling the handler (None): the broker delivers it
        again, maybe to another node that owns its partition now. In a partition, a message that could not be
        settled while its channel is open (the dead-letter publish failed) is held in place with its key, as a
        retry at the same attempt: a nack would let its key's later prefetched messages overtake it."""
        if not _settleable(message):
            log.info("bus.stale_delivery", queue=sub.name, message_id=message.message_id)
            return None
        try:
            return await self._handle(sub, message, attempt)
        except Exception as exc:  # e.g. the connection dropped while settling: the broker redelivers
            self._settle_failed(sub, message, exc)
            if self._closing or not _settleable(message):
                return None  # the channel is gone: the broker delivers it again
            if sub.partition is not None:
                number = attempt if attempt is not None else _attempt(message)
                self._hold(sub, message, Retry(_describe(exc), number, max(self.retry_backoff, 0.05)))
                return False
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)  # same attempt number, handled again
            return None

    def _settle_failed(self, sub: _Subscription, message: AbstractIncomingMessage, exc: Exception) -> None:
        if self._closing:  # closed from inside the handler: expected, the message comes back
            log.info("bus.not_acked", queue=sub.name, message_id=message.message_id, reason="bus closed")
        else:
            log.warning("bus.settle_failed", queue=sub.name, message_id=message.message_id, error=_describe(exc))

    async def _handle(self, sub: _Subscription, message: AbstractIncomingMessage, attempt: int | None = None) -> bool:
        delivery = _delivery(message)
        if attempt is not None:
            delivery.attempt = attempt
        try:
            await sub.handler([delivery])
        except Exception as exc:
            outcome = sub.policy.after_failure(exc, delivery.attempt)
            sub.policy.log(outcome, sub.name, [delivery.message_id], delivery.attempt)
            if isinstance(outcome, Retry):
                # The original stays unacked (a prefetch slot) during the backoff, while the worker goes on.
                if sub.partition is not None:  # with its key's later messages held behind it, tried again in place
                    self._hold(sub, message, outcome)
                    return False
                task = asyncio.create_task(self._retry(sub.name, message, delivery, outcome))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
                return False
            await self._park(sub.dead_letters, message, delivery, outcome.error)
            return True
        await message.ack()  # only now: the handler returned, so its work is done
        return True

    def _hold(self, sub: _Subscription, message: AbstractIncomingMessage, retry: Retry) -> None:
        """Hold ``message``'s key: its later messages wait behind it, unacked, while the other keys go on; once
        the backoff is over the worker tries it again (``_Due``). Not republished, so that nothing of the key
        can overtake it; the attempt number lives here meanwhile (a redelivery starts again from its header)."""
        key = _partition_key(message)
        waiting = sub.blocked.setdefault(key, deque())
        if not waiting or waiting[0] is not message:
            waiting.appendleft(message)

        async def due() -> None:
            await asyncio.sleep(retry.delay)
            sub.buffer.put_nowait(_Due(key, message, retry.attempt))

        task = asyncio.create_task(due())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, queue: str, message: AbstractIncomingMessage, delivery: Delivery, retry: Retry) -> None:
        await asyncio.sleep(retry.delay)
        headers = {**delivery.headers, ATTEMPT: str(retry.attempt)}
        try:
            _, channel = self._live()
            # Copy first, ack second: a crash in between gives a duplicate, never a loss.
            await _to_queue(channel, queue, delivery.topic, delivery.body, delivery.message_id, headers)
            await message.ack()
        except Exception as exc:
            log.warning("bus.retry_failed", queue=queue, message_id=delivery.message_id, error=_describe(exc))
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)  # same attempt number, handled again

    async def _park(self, queue: str, message: AbstractIncomingMessage, delivery: Delivery, error: str) -> None:
        """Dead-letter ``message``, then ack it. When the broker returns the dead letter (no ``.dlq`` bound to the
        dead-letter exchange), the original stays unacked and a background task declares the ``.dlq`` and its
        binding again and retries until it is confirmed (``bus.dead_letter_returned``)."""
        try:
            await self._dead_letter(queue, delivery, error)
        except LookupError:
            log.warning("bus.dead_letter_returned", queue=queue, message_id=delivery.message_id)
            task = asyncio.create_task(self._dead_letter_later(queue, message, delivery, error))
            self._retries.add(task)  # cancelled by close: the unacked original returns to the queue
            task.add_done_callback(self._retries.discard)
            return
        await message.ack()

    async def _dead_letter_later(
        self, queue: str, message: AbstractIncomingMessage, delivery: Delivery, error: str
    ) -> None:
        delay = max(self.retry_backoff, 0.05)
        while not self._closing:
            await asyncio.sleep(delay)
            if not _settleable(message):
                return  # its channel is gone with a lost connection: the broker delivers the original again
            try:
                async with self._scratch_channel() as channel:  # a refused declaration closes only this channel
                    await self._declare_dlq(channel, queue)
                await self._dead_letter(queue, delivery, error)
            except Exception as exc:  # returned again, refused, or disconnected: try again later
                event = "bus.dead_letter_returned" if isinstance(exc, LookupError) else "bus.dead_letter_failed"
                log.warning(event, queue=queue, message_id=delivery.message_id, error=_describe(exc))
                delay = min(delay * 2, self.reconnect_max)
                continue
            with contextlib.suppress(Exception):  # not acked: delivered again, then dead-lettered twice (a duplicate)
                await message.ack()
            log.info("bus.dead_lettered", queue=queue, message_id=delivery.message_id)
            return

    async def _dead_letter(self, queue: str, delivery: Delivery, error: str) -> None:
        """Publish ``delivery`` to ``<queue>.dlq`` through the dead-letter exchange; returns once confirmed;
        ``LookupError`` when the broker returns it as unroutable (nothing bound for ``<queue>.dlq``)."""
        self._live()
        assert self._dlx is not None
        headers = {**delivery.headers, ERROR: error[:4000], ATTEMPT: str(delivery.attempt), TOPIC: delivery.topic}
        result = await self._dlx.publish(
            _message(delivery.body, delivery.message_id, headers), routing_key=dlq_name(queue), mandatory=True
        )
        if isinstance(result, DeliveredMessage):  # returned (basic.return) rather than routed
            raise LookupError(f"no dead-letter queue bound for {queue!r}")

    # -- inspection ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _scratch_channel(self) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel for passive declares and basic.get, closed (returning unacked gets) after."""
        await self._ensure_started()
        connection, _ = self._live()
        channel = await connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked in-flight ones excluded), over all its partitions when
        partitioned; 0 when it does not exist."""
        queue = self.queue_name(queue)
        names = [queue] if self.partitions < 2 else [partition_name(queue, p) for p in range(self.partitions)]
        total = 0
        while names:  # one channel for all, unless a missing queue closes it: then a new one for the rest
            async with self._scratch_channel() as channel:
                while names:
                    try:
                        declared = await channel.declare_queue(names.pop(0), passive=True)
                    except ChannelNotFoundEntity:
                        break
                    assert declared.declaration_result.message_count is not None
                    total += declared.declaration_result.message_count
        return total

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Delivery]:
        """Messages parked in ``<queue>.dlq``, oldest first, left in place (read with basic.get, not acked)."""
        queue = self.queue_name(queue)
        result: list[Delivery] = []
        async with self._scratch_channel() as channel:
            try:
                dlq = await channel.declare_queue(dlq_name(queue), passive=True)
            except ChannelNotFoundEntity:
                return []
            while len(result) < limit:
                message = await dlq.get(no_ack=False, fail=False)
                if message is None:
                    break
                result.append(_delivery(message))
        return result  # closing the channel put them all back, in their original order

    async def replay_dead_letter(self, queue: str, message_id: str) -> bool:
        """Move the dead letter(s) with ``message_id`` back into ``queue`` as fresh deliveries (attempt 1)."""
        queue = self.queue_name(queue)
        await self._ensure_started()
        _, publisher = self._live()
        found = False
        if self.partitions >= 2:
            await self._check_partitioned(queue)
        async with self._scratch_channel() as channel:
            try:
                dlq = await channel.declare_queue(dlq_name(queue), passive=True)
            except ChannelNotFoundEntity:
                return False
            while (message := await dlq.get(no_ack=False, fail=False)) is not None:
                if message.message_id != message_id:
                    continue  # stays unacked until the channel closes, so the scan cannot see it twice
                dead = _delivery(message)
                headers = {k: v for k, v in dead.headers.items() if k != ERROR}
                # Back on its queue (its partition), then acked: a queue deleted meanwhile raises and it stays.
                await self._to_subscriber(publisher, queue, dead.topic, dead.body, dead.message_id, headers)
                await message.ack()
                found = True
        return found

    async def discard_dead_letter(self, queue: str, message_id: str) -> bool:
        """Remove the dead letter(s) with ``message_id`` from ``<queue>.dlq`` (acked, not published anywhere)."""
        queue = self.queue_name(queue)
        await self._ensure_started()
        found = False
        async with self._scratch_channel() as channel:
            try:
                dlq = await channel.declare_queue(dlq_name(queue), passive=True)
            except ChannelNotFoundEntity:
                return False
            while (message := await dlq.get(no_ack=False, fail=False)) is not None:
                if message.message_id == message_id:  # the others stay unacked until the channel closes
                    await message.ack()
                    found = True
        return found


def partition_name(queue: str, partition: int) -> str:
    """The broker's queue of partition ``partition`` (0-based) of subscriber queue ``queue``."""
    return f"{queue}.p{partition}"


def hash_exchange_name(queue: str) -> str:
    """The consistent-hash exchange spreading subscriber ``queue``'s messages over its partitions."""
    return f"{queue}.hash"


def quorum_arguments(exchange: str, queue: str, broker_version: tuple[int, ...], *, dlq: bool) -> dict[str, Any]:
    """A quorum queue's arguments: its type; on RabbitMQ >= 4.0 an unlimited delivery limit (4.0 defaults to
    20, then drops the message; 3.x has no default and reads -1 as "drop at the first return"); for a subscriber
    queue (not ``dlq``) one active consumer at a time and the broker's own dead-letter route to its ``.dlq``."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if broker_version >= (4, 0):
        arguments["x-delivery-limit"] = -1
    if not dlq:
        arguments |= {
            "x-single-active-consumer": True,
            "x-dead-letter-exchange": f"{exchange}.dlx",
            "x-dead-letter-routing-key": dlq_name(queue),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
        }
    return arguments


async def _to_queue(
    channel: AbstractChannel, queue: str, topic: str, body: bytes, message_id: str, headers: dict[str, str]
) -> None:
    """Publish to the broker queue ``queue`` alone (default exchange), the topic in ``x-original-topic``; returns
    once confirmed; ``LookupError`` when the broker returns it as unroutable (no such queue)."""
    result = await channel.default_exchange.publish(
        _message(body, message_id, {**headers, TOPIC: topic}), routing_key=queue, mandatory=True
    )
    if isinstance(result, DeliveredMessage):  # returned (basic.return) rather than acked
        raise LookupError(f"no queue {queue!r} on the broker: declare it first")


def _message(body: bytes, message_id: str, headers: dict[str, str]) -> aio_pika.Message:
    return aio_pika.Message(
        body=bytes(body),
        message_id=message_id,
        headers=dict(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


def _broker_urls(url: str | Sequence[str]) -> list[str]:
    """The brokers of ``url``: one AMQP URL, several comma-separated, or a list; at least one."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


def _server_version(connection: aio_pika.RobustConnection) -> tuple[int, ...]:
    """The broker's version from the AMQP ``connection.start`` server properties (``"3.10.8"`` → (3, 10, 8));
    () when absent or unreadable."""
    transport = connection.transport
    properties = transport.connection.server_properties if transport is not None else {}
    numbers = []
    for part in _text((properties or {}).get("version")).split(".")[:3]:
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _str_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    """AMQP header values as ``str`` (the protocol's ``Delivery.headers`` type); broker-added tables dropped."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, bytes):
            out[key] = value.decode("utf-8", "replace")
        elif isinstance(value, str | int | float | bool):
            out[key] = str(value)
    return out


def _delivery(message: AbstractIncomingMessage) -> Delivery:
    """The handler's (and dead-letter reader's) view of a message: original topic, attempt, no bookkeeping.

    A message the broker dead-lettered itself (a quorum queue's safety net) carries its original topic and the
    broker's reason in ``x-death``: shown as its topic and, lacking the engine's ``x-error``, as its error."""
    headers = _str_headers(message.headers)
    topic, reason = _death(message.headers)
    if reason and ERROR not in headers:
        headers[ERROR] = f"dead-lettered by the broker: {reason}"
    return Delivery(
        topic=headers.get(TOPIC) or topic or message.routing_key or "",
        body=message.body,
        message_id=message.message_id or "",
        headers={k: v for k, v in headers.items() if k not in _INTERNAL and not k.startswith(_DEATH_PREFIXES)},
        attempt=int(headers.get(ATTEMPT, "1")),
    )


def _death(headers: dict[str, Any] | None) -> tuple[str, str]:
    """The original routing key and the reason of the latest broker-side dead-lettering (``x-death``, newest
    first), bounded; ``("", "")`` when the broker never dead-lettered the message."""
    deaths = (headers or {}).get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return "", ""
    latest = deaths[0]
    keys = latest.get("routing-keys")
    topic = _text(keys[0]) if isinstance(keys, list) and keys else ""
    return topic[:255], _text(latest.get("reason"))[:64]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _public(headers: dict[str, str] | None) -> dict[str, str]:
    """A sender's headers without this module's bookkeeping (a message sent is a first delivery)."""
    return {k: v for k, v in (headers or {}).items() if k not in _INTERNAL}


async def _exists(connection: AbstractRobustConnection, declare: Any) -> bool:
    """Whether the passive declaration ``declare(channel)`` finds its queue or exchange, on a scratch channel
    (a missing one closes the channel)."""
    channel = await connection.channel()
    try:
        await declare(channel)
    except ChannelNotFoundEntity:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return True


def _settleable(message: AbstractIncomingMessage) -> bool:
    """Whether ``message`` can still be acked: its channel is open (not closed with a lost connection)."""
    try:
        message.channel  # noqa: B018 - the property raises once the channel is closed
    except ChannelInvalidStateError:
        return False
    return True


def _attempt(message: AbstractIncomingMessage) -> int:
    return int(_str_headers(message.headers).get(ATTEMPT, "1"))


def _partition_key(message: AbstractIncomingMessage) -> str:
    """The message's ordering key (``partition-key`` header); "" when it has none (one key for all of those)."""
    return _text((message.headers or {}).get(PARTITION_KEY))[:64]


def _checked(queue: str) -> str:
    """``queue`` if usable as a subscriber queue name; checked when called, also when the bus is not connected."""
    if not queue or queue.endswith(".dlq"):
        raise ValueError(f"invalid queue name {queue!r}")
    return queue


def _root(exc: BaseException) -> BaseException:
    """The error that started it: aiormq wraps e.g. ``ConnectionRefusedError`` in ``AMQPConnectionError``."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _describe(exc: BaseException | None) -> str:
    """An error for a log line: type and message, bounded (aiormq messages can carry whole frames)."""
    if exc is None:
        return "closed"
    exc = _root(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _drain(buffer: asyncio.Queue[_Buffered]) -> None:
    while True:
        try:
            buffer.get_nowait()
        except asyncio.QueueEmpty:
            return
