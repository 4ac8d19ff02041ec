"""The message bus contract: what every implementation provides and guarantees.

Semantics every implementation keeps (RabbitMQ in ``traboule.adapters.rabbitmq``, the embedded SQLite bus in
``traboule.bus.embedded``; the engine picks one at start-up, ``traboule.app.bus_backend``):

* ``publish`` returns only once the message is durable (publisher confirm / committed row).
* Topics are routed like an AMQP topic exchange: ``orders.new`` matches the binding ``orders.*`` and ``#``.
* A subscriber's handler runs once per delivery; the message is acknowledged only after the handler returned
  (its work committed). An exception counts as a failed attempt: the message is redelivered (after a backoff
  growing with the attempt number) until ``max_attempts`` is reached, then moved to the queue's dead-letter
  queue ``<queue>.dlq`` with the handler's error in the ``x-error`` header. A handler raising
  :class:`PermanentError` says a retry cannot succeed (the peer refused the content): the delivery is
  dead-lettered at once. Both buses apply the one policy of ``traboule.bus.retry``.

Batch consumption (``subscribe_batch``), so that a consumer can commit many events in one transaction:

* The handler receives lists of 1..``max_batch`` deliveries in queue order: whatever is available right now,
  never waiting to fill a batch (one waiting message is handed over at once, as a list of one).
* One batch is in flight at a time per subscription, so ordering is as with ``subscribe``.
* When the handler returns, every delivery of the list is acknowledged.
* When the handler raises, the batch is not acknowledged and no attempt is counted; each of its deliveries is
  then handed to the same handler again *alone* (a list of one), in order, so that the failing one is isolated.
  Those single runs follow the per-delivery rules above: the ones that succeed are acknowledged, a failure
  counts an attempt (backoff, then dead-letter after ``max_attempts``). A delivery that already failed
  (``attempt > 1``) is always handed alone.
* Hence a batch handler must be atomic per batch: when it raises, nothing of the batch may have been committed
  (one transaction for the whole list), or re-running its deliveries must be harmless (idempotent handling).
  As with ``subscribe``, delivery is at least once: a crash after the commit but before the acknowledgement
  hands the same deliveries over again.
* ``subscribe(handler)`` is the per-delivery case (``max_batch=1``) and behaves exactly as described above.

Ordering per key (the ``partition-key`` header, :data:`PARTITION_KEY`; the engine's events carry a digest of
their patient, ``traboule.bus.partition``):

* A subscriber receives the messages of one key in the order they were published, one at a time, on the engine
  node consuming them; a message counts as handled once its handler returned (or it was dead-lettered). When the
  key's partition moves to another node (the active node, its connection or its channel lost), the new node gets
  the messages not yet acknowledged first, in order; the old node hands nothing more over, but a handler it had
  already called may still be running: the same message can then be handled on both nodes at once.
* A delivery that fails holds back the later messages of its key only: they wait, unhandled, until it succeeds
  or is dead-lettered, while other keys go on. Once a delivery is dead-lettered, its key's later messages are
  handled (a replay delivers it after them).
* Who keeps it: RabbitMQ with ``partitions`` >= 2 (a queue per partition, one active consumer each, retries in
  place). Without partitions, both buses deliver a queue in publish order, one delivery at a time (the embedded
  bus is one process; RabbitMQ's quorum queues have one active consumer across nodes), but a failed delivery is
  retried *after* the messages behind it, which then overtake it: there, the order holds while nothing fails.
* Delivery stays at least once: a message may come again (a crash, a connection loss, a publish retried), even
  after later messages of its key; its first delivery keeps the order, so a handler idempotent by message id
  (a copy already handled is skipped) applies each message once and in order.

Point to point (``send``): messages put on one named queue, not routed by topic, so that no other subscriber
receives them (a reprocess delivering to the channels it names, as a dead-letter replay does). The consumer sees
them as any delivery, with the topic given; durable as ``publish`` is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from traboule.errors import PermanentError as PermanentError  # part of the bus contract


@dataclass
class Delivery:
    """A message handed to a subscriber."""

    topic: str
    body: bytes
    message_id: str
    headers: dict[str, str] = field(default_factory=dict)
    attempt: int = 1  # 1 on first delivery


PARTITION_KEY = "partition-key"  # header: messages with the same value are handled in publish order
Item = tuple[str, bytes, str, dict[str, str] | None]  # a message to publish or send: topic, body, message_id, headers
Handler = Callable[[Delivery], Awaitable[None]]
BatchHandler = Callable[[list[Delivery]], Awaitable[None]]


def one_by_one(handler: Handler) -> BatchHandler:
    """The batch handler that ``subscribe`` consumes with (``max_batch=1``): hands each delivery to ``handler``."""

    async def handle(deliveries: list[Delivery]) -> None:
        (delivery,) = deliveries
        await handler(delivery)

    return handle


class Bus(Protocol):
    async def start(self) -> None:
        """Open or start connecting; never fails because a broker is unreachable (``connected`` tells)."""
        ...

    async def close(self) -> None: ...

    @property
    def connected(self) -> bool:
        """True when ``publish`` can succeed now; False while a broker is unreachable (``publish`` then raises)."""
        ...

    def state(self) -> dict[str, Any]:
        """For /health: ``backend``, ``connected``, ``since`` (ISO 8601 UTC), ``last_error`` (type name or None)."""
        ...

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until ``connected`` (starting if needed); ``ConnectionError`` after ``timeout`` seconds."""
        ...

    async def publish(self, topic: str, body: bytes, *, message_id: str, headers: dict[str, str] | None = None) -> None:
        """Publish durably; returns after the broker confirmed (or the row is committed)."""
        ...

    async def publish_many(self, items: Sequence[Item]) -> None:
        """Publish ``items`` as ``publish`` would each, in one go (one transaction / confirms awaited together);
        returns once all are durable. A failure may leave some of them published on RabbitMQ: publishing them again
        may duplicate them, as a publish retried may."""
        ...

    async def send(self, queue: str, items: Sequence[Item]) -> None:
        """Put ``items`` on ``queue`` only (not routed by their topics), in order; returns once they are durable
        (committed in one transaction / each confirmed by the broker). ``queue`` must have been declared
        (``declare``, ``subscribe``): ``LookupError`` otherwise, nothing delivered. A failure may leave some of
        ``items`` delivered on RabbitMQ: sending them again may duplicate them, as a publish retried may."""
        ...

    async def declare(self, queue: str, topics: list[str]) -> None:
        """Create the durable queue and its bindings without consuming: matching messages are kept from now on."""
        ...

    async def subscribe(self, queue: str, topics: list[str], handler: Handler, *, max_attempts: int = 5) -> None:
        """Declare a durable queue bound to ``topics`` and start consuming it with ``handler``."""
        ...

    async def subscribe_batch(
        self, queue: str, topics: list[str], handler: BatchHandler, *, max_attempts: int = 5, max_batch: int = 100
    ) -> None:
        """Like ``subscribe``, with ``handler`` receiving lists of up to ``max_batch`` deliveries (see above)."""
        ...

    async def dead_letters(self, queue: str, limit: int = 100) -> list[Delivery]:
        """Messages parked in ``<queue>.dlq`` (for inspection and replay)."""
        ...

    async def replay_dead_letter(self, queue: str, message_id: str) -> bool:
        """Move a dead letter back onto ``queue`` as a fresh delivery; False when there is none by that id."""
        ...

    async def discard_dead_letter(self, queue: str, message_id: str) -> bool:
        """Remove the dead letter(s) with ``message_id`` from ``<queue>.dlq`` for good (an operator decided it is not
        to be delivered; keeping what it was is the caller's business); False when there is none by that id."""
        ...

    async def depth(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting in-flight ones)."""
        ...


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def topic_matches(pattern: str, topic: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    return _match(pattern.split("."), topic.split("."))


def _match(pat: list[str], words: list[str]) -> bool:
    if not pat:
        return not words
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])
