"""The ``Bus`` protocol on RabbitMQ (aio-pika), with the same observable semantics as the embedded bus.

Topology, all durable: a topic exchange ``<exchange>``; per subscriber queue ``<exchange>.<queue>`` bound to its
topics; a direct exchange ``<exchange>.dlx`` routing to each queue's dead-letter queue ``<exchange>.<queue>.dlq``.

Queue type and retries: queues are classic durable queues by default, and attempts are counted by the
application, which republishes a failed message (after a short backoff) with ``x-attempt`` + 1 and then acks
the original; after ``max_attempts`` it publishes it to ``<queue>.dlq`` with ``x-error`` and acks. Why not
quorum queues with ``x-delivery-limit``: on the installed RabbitMQ (3.10) their ``x-delivery-count`` grows on
*every* return, including the prefetched, never-handled messages returned at each graceful restart or
connection loss (measured: +1 per channel close), so a message could be dead-lettered without its handler ever
failing; broker-side dead-lettering also cannot record the handler's error, and a plain requeue has no backoff.
Counting in the application gives exactly the embedded bus's behaviour (attempt numbers, backoff, ``x-error``)
with any queue type: ``queue_type="quorum"`` is accepted for replicated clusters and changes nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import ChannelNotFoundEntity

from traboule.bus import BatchHandler, Delivery, Handler, PermanentError, dlq_name, one_by_one

log = logging.getLogger(__name__)

Item = tuple[str, bytes, str, dict[str, str] | None]  # topic, body, message_id, headers

ATTEMPT = "x-attempt"  # deliveries so far, including this one (absent on the first)
TOPIC = "x-original-topic"  # republished copies travel via the default exchange, which loses the topic
ERROR = "x-error"
_INTERNAL = frozenset({ATTEMPT, TOPIC})


@dataclass
class _Subscription:
    queue: AbstractQueue
    handler: BatchHandler
    max_attempts: int
    max_batch: int
    buffer: asyncio.Queue[AbstractIncomingMessage | None] = field(default_factory=asyncio.Queue)
    held: AbstractIncomingMessage | None = None  # taken from the buffer, to start the next batch
    consumer_tag: str | None = None
    worker: asyncio.Task[None] | None = None


class RabbitMQBus:
    """Durable topic bus on RabbitMQ: publisher confirms, persistent messages, manual acks after the handler."""

    def __init__(
        self,
        url: str,
        exchange: str = "traboule",
        prefetch: int = 64,
        *,
        retry_backoff: float = 0.2,
        close_timeout: float = 10.0,
        queue_type: Literal["classic", "quorum"] = "classic",
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.prefetch = prefetch
        self.retry_backoff = retry_backoff  # a failed delivery waits retry_backoff * attempt before the next
        self.close_timeout = close_timeout
        self.queue_type = queue_type
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None  # publisher confirms; declarations and publishing
        self._topic_exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._subscriptions: list[_Subscription] = []
        self._retries: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (reconnecting automatically later) and declare the exchanges; idempotent."""
        async with self._start_lock:
            if self._closing:
                raise RuntimeError("bus is closed")
            if self._connection is not None:
                return
            connection = await aio_pika.connect_robust(self.url)
            try:
                channel = await connection.channel(publisher_confirms=True)
                self._topic_exchange = await channel.declare_exchange(
                    self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                )
                self._dlx = await channel.declare_exchange(
                    f"{self.exchange}.dlx", aio_pika.ExchangeType.DIRECT, durable=True
                )
            except BaseException:
                await connection.close()
                raise
            self._connection, self._channel = connection, channel

    async def close(self) -> None:
        """Stop consuming (letting in-flight handlers finish, up to ``close_timeout``) and disconnect.

        Safe to call from inside a handler: that delivery is then not acknowledged and the broker delivers it
        again to the next consumer. Prefetched, unhandled messages go back to the queue, without counting as
        an attempt.
        """
        if self._closing:
            return
        self._closing = True
        current = asyncio.current_task()
        for sub in self._subscriptions:
            if sub.consumer_tag is not None:  # no new deliveries while the in-flight ones finish
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
        if self._connection is not None:
            await self._connection.close()

    async def _ready(self) -> tuple[AbstractRobustConnection, AbstractChannel]:
        if self._connection is None or self._channel is None:
            await self.start()
        assert self._connection is not None and self._channel is not None
        return self._connection, self._channel

    # -- publishing ------------------------------------------------------------------------------------

    async def publish(self, topic: str, body: bytes, *, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Publish persistently to the topic exchange; returns once the broker confirmed it."""
        await self._ready()
        assert self._topic_exchange is not None
        message = _message(body, message_id, dict(headers or {}))
        # mandatory=False: like the embedded bus, a topic nobody is bound to is dropped, not an error.
        await self._topic_exchange.publish(message, routing_key=topic, mandatory=False)

    async def publish_many(self, items: Sequence[Item]) -> None:
        """Publish several messages with their confirms awaited concurrently (pipelined, not one by one)."""
        await asyncio.gather(
            *(self.publish(topic, body, message_id=mid, headers=headers) for topic, body, mid, headers in items)
        )

    # -- consuming -------------------------------------------------------------------------------------

    def queue_name(self, queue: str) -> str:
        """The broker's name for a channel's queue: prefixed with the exchange, so that engines sharing a broker
        (or test runs) never consume each other's queues."""
        return f"{self.exchange}.{queue}"

    async def declare(self, queue: str, topics: list[str]) -> None:
        """Declare the durable queue, its dead-letter queue and bindings, without consuming."""
        queue = self.queue_name(queue)
        _, channel = await self._ready()
        await self._declare(channel, queue, topics)

    async def _declare(self, channel: AbstractChannel, queue: str, topics: list[str]) -> AbstractQueue:
        if not queue or queue.endswith(".dlq"):
            raise ValueError(f"invalid queue name {queue!r}")
        arguments: dict[str, Any] = {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}
        dlq = await channel.declare_queue(dlq_name(queue), durable=True, arguments=arguments)
        await dlq.bind(f"{self.exchange}.dlx", routing_key=dlq_name(queue))
        declared = await channel.declare_queue(queue, durable=True, arguments=arguments)
        for topic in topics:
            await declared.bind(self.exchange, routing_key=topic)
        return declared

    async def subscribe(self, queue: str, topics: list[str], handler: Handler, *, max_attempts: int = 5) -> None:
        """Declare ``queue`` bound to ``topics`` and consume it; deliveries are handled one at a time, in order."""
        await self.subscribe_batch(queue, topics, one_by_one(handler), max_attempts=max_attempts, max_batch=1)

    async def subscribe_batch(
        self, queue: str, topics: list[str], handler: BatchHandler, *, max_attempts: int = 5, max_batch: int = 100
    ) -> None:
        """Like ``subscribe``, handing over the prefetched messages in lists of up to ``max_batch``.

        A batch is the first message to arrive plus whatever is already prefetched behind it (never waiting for
        more), so the subscription's prefetch window is ``max(prefetch, max_batch)``.
        """
        queue = self.queue_name(queue)
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        connection, _ = await self._ready()
        # A channel per subscription: its own prefetch window, and a channel error cannot stop the others.
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=max(self.prefetch, max_batch))
        sub = _Subscription(await self._declare(channel, queue, topics), handler, max_attempts, max_batch)
        sub.worker = asyncio.create_task(self._work(sub), name=f"rabbitmq-bus:{queue}")
        sub.consumer_tag = await sub.queue.consume(sub.buffer.put, no_ack=False)
        self._subscriptions.append(sub)

    async def _work(self, sub: _Subscription) -> None:
        while not self._closing:
            batch = await self._next_batch(sub)
            if not batch or self._closing:
                return  # unacked: the broker redelivers them when the channel closes
            if len(batch) > 1 and await self._handle_batch(sub, batch):
                continue
            for message in batch:  # one at a time: a single delivery, or the messages of a batch that failed
                if self._closing:
                    return
                await self._handle_one(sub, message)

    async def _next_batch(self, sub: _Subscription) -> list[AbstractIncomingMessage]:
        """The next message (waiting for it), then those already buffered behind it, up to ``max_batch``."""
        first, sub.held = sub.held, None
        if first is None:
            first = await sub.buffer.get()
            if first is None:
                return []  # closing
        batch = [first]
        if _attempt(first) > 1:
            return batch  # a message that already failed is handed alone
        while len(batch) < sub.max_batch:
            try:
                message = sub.buffer.get_nowait()
            except asyncio.QueueEmpty:
                break
            if message is None:
                break  # closing (the flag is set before the sentinel is queued): _work stops
            if _attempt(message) > 1:
                sub.held = message
                break
            batch.append(message)
        return batch

    async def _handle_batch(self, sub: _Subscription, batch: list[AbstractIncomingMessage]) -> bool:
        """Hand ``batch`` over as one list and ack it; False (nothing settled) when the handler raised."""
        try:
            await sub.handler([_delivery(message) for message in batch])
        except Exception as exc:
            log.warning(
                "batch handler for %s failed on %d deliveries (%s ... %s), handing each alone: %s: %s",
                sub.queue.name,
                len(batch),
                batch[0].message_id,
                batch[-1].message_id,
                type(exc).__name__,
                exc,
            )
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

    async def _handle_one(self, sub: _Subscription, message: AbstractIncomingMessage) -> None:
        try:
            await self._handle(sub, message)
        except Exception as exc:  # e.g. the connection dropped while settling: the broker redelivers
            self._settle_failed(sub, message, exc)
            if not self._closing:
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)  # same attempt number, handled again

    def _settle_failed(self, sub: _Subscription, message: AbstractIncomingMessage, exc: Exception) -> None:
        if self._closing:  # closed from inside the handler: expected, the message comes back
            log.info("%s from %s not acked: bus closed", message.message_id, sub.queue.name)
        else:
            log.warning("settling %s from %s failed: %r", message.message_id, sub.queue.name, exc)

    async def _handle(self, sub: _Subscription, message: AbstractIncomingMessage) -> None:
        delivery = _delivery(message)
        attempt = delivery.attempt
        try:
            await sub.handler([delivery])
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.warning(
                "handler for %s failed on %s (attempt %d/%d): %s",
                sub.queue.name,
                delivery.message_id,
                attempt,
                sub.max_attempts,
                error,
            )
            if attempt >= sub.max_attempts or isinstance(exc, PermanentError):
                await self._dead_letter(sub.queue.name, delivery, error)
                await message.ack()
            else:
                # The original stays unacked (a prefetch slot) during the backoff, while the worker goes on.
                task = asyncio.create_task(self._retry(sub.queue.name, message, delivery))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)
            return
        await message.ack()  # only now: the handler returned, so its work is done

    async def _retry(self, queue: str, message: AbstractIncomingMessage, delivery: Delivery) -> None:
        await asyncio.sleep(self.retry_backoff * delivery.attempt)
        _, channel = await self._ready()
        headers = {**delivery.headers, ATTEMPT: str(delivery.attempt + 1), TOPIC: delivery.topic}
        try:
            # Copy first, ack second: a crash in between gives a duplicate, never a loss.
            await channel.default_exchange.publish(
                _message(delivery.body, delivery.message_id, headers), routing_key=queue, mandatory=False
            )
            await message.ack()
        except Exception as exc:
            log.warning("retrying %s on %s failed: %r", delivery.message_id, queue, exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)  # same attempt number, handled again

    async def _dead_letter(self, queue: str, delivery: Delivery, error: str) -> None:
        await self._ready()
        assert self._dlx is not None
        headers = {**delivery.headers, ERROR: error[:4000], ATTEMPT: str(delivery.attempt), TOPIC: delivery.topic}
        await self._dlx.publish(
            _message(delivery.body, delivery.message_id, headers), routing_key=dlq_name(queue), mandatory=False
        )

    # -- inspection ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _scratch_channel(self) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel for passive declares and basic.get, closed (returning unacked gets) after."""
        connection, _ = await self._ready()
        channel = await connection.channel()
        try:
            yield channel
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (unacked in-flight ones excluded); 0 when it does not exist."""
        queue = self.queue_name(queue)
        async with self._scratch_channel() as channel:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except ChannelNotFoundEntity:
                return 0
            assert declared.declaration_result.message_count is not None
            return declared.declaration_result.message_count

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
        _, publisher = await self._ready()
        found = False
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
                headers[TOPIC] = dead.topic
                await publisher.default_exchange.publish(
                    _message(dead.body, dead.message_id, headers), routing_key=queue, mandatory=False
                )
                await message.ack()
                found = True
        return found


def _message(body: bytes, message_id: str, headers: dict[str, str]) -> aio_pika.Message:
    return aio_pika.Message(
        body=bytes(body),
        message_id=message_id,
        headers=dict(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


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
    """The handler's (and dead-letter reader's) view of a message: original topic, attempt, no bookkeeping."""
    headers = _str_headers(message.headers)
    return Delivery(
        topic=headers.get(TOPIC) or message.routing_key or "",
        body=message.body,
        message_id=message.message_id or "",
        headers={k: v for k, v in headers.items() if k not in _INTERNAL},
        attempt=int(headers.get(ATTEMPT, "1")),
    )


def _attempt(message: AbstractIncomingMessage) -> int:
    return int(_str_headers(message.headers).get(ATTEMPT, "1"))
