"""Contract tests of the message bus: the embedded SQLite bus and RabbitMQ (a real broker) must behave alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import aio_pika
import pytest
import structlog.testing

from tests.peer_rabbitmq import unique_name
from traboule.adapters.rabbitmq import RabbitMQBus
from traboule.bus import Delivery, PermanentError, one_by_one
from traboule.bus.embedded import EmbeddedBus

pytestmark = pytest.mark.timeout(30)  # the first RabbitMQ test also starts the broker (6-8 s)

AnyBus = EmbeddedBus | RabbitMQBus
T = TypeVar("T")
WAIT = 3.0  # seconds: generous for a loaded 2-core machine; a passing test takes milliseconds


@dataclass
class BusConfig:
    kind: str
    path: Path  # the embedded bus's file (the same for every bus of a test: "restarts" reopen it)
    url: str = ""
    exchange: str = ""


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def bus_config(request: pytest.FixtureRequest, tmp_path: Path) -> BusConfig:
    if request.param == "rabbitmq":
        # Resolved only here, so that the broker is started only when a RabbitMQ test runs.
        url = request.getfixturevalue("rabbitmq_url")
        return BusConfig("rabbitmq", tmp_path / "unused", url, request.getfixturevalue("rabbitmq_exchange"))
    return BusConfig("embedded", tmp_path / "bus.sqlite")


@pytest.fixture
async def make_bus(bus_config: BusConfig) -> AsyncIterator[Callable[[], Awaitable[AnyBus]]]:
    """Opens a new bus instance (same file, or new connection to the same exchange); all closed at the end."""
    buses: list[AnyBus] = []

    async def factory() -> AnyBus:
        bus: AnyBus
        if bus_config.kind == "rabbitmq":
            bus = RabbitMQBus(bus_config.url, exchange=bus_config.exchange, retry_backoff=0.05, close_timeout=2)
        else:
            bus = EmbeddedBus(str(bus_config.path), retry_backoff=0.05, close_timeout=2)
        await bus.start()
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close()


@pytest.fixture
async def bus(make_bus: Callable[[], Awaitable[AnyBus]]) -> AnyBus:
    return await make_bus()


class Inbox:
    """A handler that records deliveries, with a way to await them."""

    def __init__(self) -> None:
        self.received: list[Delivery] = []
        self._arrived = asyncio.Queue[Delivery]()

    async def __call__(self, delivery: Delivery) -> None:
        self.received.append(delivery)
        self._arrived.put_nowait(delivery)

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self._arrived.get(), WAIT)

    async def until(self, message_id: str) -> list[Delivery]:
        """Wait for ``message_id``; per-queue FIFO means everything routed before it has arrived too."""
        while (await self.next()).message_id != message_id:
            pass
        return self.received


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool]) -> T:
    """Poll ``probe`` until ``accept`` holds (for state that settles asynchronously, such as acks)."""
    deadline = time.monotonic() + WAIT
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.02)


async def test_publish_delivers_body_id_and_headers(bus: AnyBus) -> None:
    inbox = Inbox()
    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], inbox)
    body = b"MSH|^~\\&|\r\x00\xff binary-safe"
    await bus.publish("orders.new", body, message_id="m-1", headers={"source": "mllp", "charset": "8859/1"})

    got = await inbox.next()
    assert (got.topic, got.body, got.message_id) == ("orders.new", body, "m-1")
    assert got.headers == {"source": "mllp", "charset": "8859/1"}
    assert got.attempt == 1
    assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0


async def test_a_started_bus_says_it_is_connected_until_closed(bus: AnyBus) -> None:
    await bus.wait_connected(WAIT)
    state = bus.state()
    assert bus.connected
    assert (state["backend"], state["connected"], state["last_error"]) == (
        "rabbitmq" if isinstance(bus, RabbitMQBus) else "embedded",
        True,
        None,
    )
    assert datetime.fromisoformat(state["since"]).tzinfo is not None  # for /health: ISO 8601, UTC
    await bus.close()
    assert not bus.connected and not bus.state()["connected"]


async def test_topic_routing(bus: AnyBus) -> None:
    one_word, everything, results, overlapping = Inbox(), Inbox(), Inbox(), Inbox()
    await bus.subscribe(unique_name("one-word"), ["orders.*"], one_word)
    await bus.subscribe(unique_name("all"), ["#"], everything)
    await bus.subscribe(unique_name("results"), ["results.#"], results)
    await bus.subscribe(unique_name("overlap"), ["orders.*", "#"], overlapping)
    topics = ["orders.new.urgent", "orders", "results.final", "results", "orders.new", "adt.a08"]
    for n, topic in enumerate(topics):
        await bus.publish(topic, b"x", message_id=f"m{n}")
    # End markers: once a queue has its marker, every earlier message routed to it has been delivered.
    await bus.publish("orders.end", b"", message_id="end-orders")
    await bus.publish("results.end", b"", message_id="end-results")

    def topics_of(inbox: Inbox) -> list[str]:
        return [d.topic for d in inbox.received if not d.message_id.startswith("end-")]

    await one_word.until("end-orders")
    await results.until("end-results")
    await everything.until("end-results")
    await overlapping.until("end-results")
    assert topics_of(one_word) == ["orders.new"]
    assert topics_of(results) == ["results.final", "results"]
    assert topics_of(everything) == topics
    assert topics_of(overlapping) == topics  # one copy per queue, even when two of its bindings match


async def test_messages_are_kept_for_a_declared_queue_without_consumer(
    make_bus: Callable[[], Awaitable[AnyBus]],
) -> None:
    first = await make_bus()
    queue = unique_name("q")
    await first.publish("orders.new", b"lost", message_id="before-declare")  # nobody bound yet: dropped
    await first.declare(queue, ["orders.*"])
    await first.close()

    second = await make_bus()  # a restart: the binding must have been durable
    for n in range(3):
        await second.publish("orders.new", f"kept {n}".encode(), message_id=f"m{n}")
    assert await second.depth(queue) == 3
    inbox = Inbox()
    await second.subscribe(queue, ["orders.*"], inbox)
    received = await inbox.until("m2")
    assert [(d.message_id, d.body) for d in received] == [("m0", b"kept 0"), ("m1", b"kept 1"), ("m2", b"kept 2")]
    assert await eventually(lambda: second.depth(queue), lambda n: n == 0) == 0


async def test_failure_is_retried_then_succeeds(bus: AnyBus) -> None:
    attempts: list[int] = []

    async def flaky(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt < 3:
            raise ConnectionError("peer down")

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], flaky, max_attempts=5)
    await bus.publish("orders.new", b"x", message_id="m-1", headers={"k": "v"})
    assert await eventually(lambda: asyncio.sleep(0, attempts), lambda a: len(a) >= 3) == [1, 2, 3]
    await asyncio.sleep(0.2)  # a fourth delivery would show up now
    assert attempts == [1, 2, 3]
    assert await bus.dead_letters(queue) == []


async def test_failure_is_dead_lettered_after_max_attempts_and_can_be_replayed(bus: AnyBus) -> None:
    seen: list[Delivery] = []
    fail = True

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        if fail:
            raise ValueError(f"bad segment, attempt {delivery.attempt}")

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], handler, max_attempts=3)
    await bus.publish("orders.new", b"payload", message_id="m-1", headers={"k": "v"})

    dead = await eventually(lambda: bus.dead_letters(queue), bool)
    assert [d.attempt for d in seen] == [1, 2, 3]
    assert all(d.headers == {"k": "v"} for d in seen)  # bookkeeping headers are not shown to handlers
    assert len(dead) == 1
    letter = dead[0]
    assert (letter.topic, letter.body, letter.message_id, letter.attempt) == ("orders.new", b"payload", "m-1", 3)
    assert letter.headers == {"k": "v", "x-error": "ValueError: bad segment, attempt 3"}
    assert await bus.depth(queue) == 0
    assert await bus.depth(f"{queue}.dlq") == 1
    assert len(await bus.dead_letters(queue)) == 1  # inspecting does not consume

    fail = False
    assert await bus.replay_dead_letter(queue, "m-1")
    replayed = await eventually(lambda: asyncio.sleep(0, seen), lambda s: len(s) >= 4)
    assert (replayed[3].message_id, replayed[3].attempt, replayed[3].headers) == ("m-1", 1, {"k": "v"})
    assert await eventually(lambda: bus.dead_letters(queue), lambda d: not d) == []
    assert not await bus.replay_dead_letter(queue, "m-1")


async def test_a_permanent_error_is_dead_lettered_at_once(bus: AnyBus) -> None:
    seen: list[int] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        raise PermanentError("HTTP 422: invalid resource")

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], handler, max_attempts=5)
    await bus.publish("orders.new", b"payload", message_id="m-1")
    dead = await eventually(lambda: bus.dead_letters(queue), bool)
    await asyncio.sleep(0.2)  # a retry would show up now
    assert seen == [1]
    assert (dead[0].message_id, dead[0].attempt) == ("m-1", 1)
    assert dead[0].headers["x-error"] == "PermanentError: HTTP 422: invalid resource"


async def test_delivery_is_acked_only_after_the_handler_returned(
    make_bus: Callable[[], Awaitable[AnyBus]],
) -> None:
    first = await make_bus()
    queue = unique_name("q")
    crashed = asyncio.Event()

    async def crashing(delivery: Delivery) -> None:
        await first.close()  # the process "dies" mid-work: this handler never completes normally
        crashed.set()

    await first.subscribe(queue, ["orders.*"], crashing)
    await first.publish("orders.new", b"work", message_id="m-1")
    await asyncio.wait_for(crashed.wait(), WAIT)

    second = await make_bus()  # the restarted service: same file, or a new connection
    inbox = Inbox()
    await second.subscribe(queue, ["orders.*"], inbox)
    again = await inbox.next()
    assert (again.message_id, again.body) == ("m-1", b"work")


async def test_close_lets_the_in_flight_handler_finish_and_acks_it(
    make_bus: Callable[[], Awaitable[AnyBus]],
) -> None:
    first = await make_bus()
    queue = unique_name("q")
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def slow(delivery: Delivery) -> None:
        started.set()
        await release.wait()
        finished.append(delivery.message_id)

    await first.subscribe(queue, ["orders.*"], slow)
    await first.publish("orders.new", b"work", message_id="m-1")
    await asyncio.wait_for(started.wait(), WAIT)
    closing = asyncio.create_task(first.close())
    await asyncio.sleep(0.1)
    assert not closing.done()  # waits for the handler
    release.set()
    await asyncio.wait_for(closing, WAIT)
    assert finished == ["m-1"]

    second = await make_bus()
    inbox = Inbox()
    await second.subscribe(queue, ["orders.*"], inbox)
    await second.publish("orders.new", b"", message_id="marker")
    assert [d.message_id for d in await inbox.until("marker")] == ["marker"]  # m-1 was acked, not redelivered


async def test_publish_many_and_concurrent_publishes(bus: AnyBus) -> None:
    inbox = Inbox()
    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], inbox)
    batch = [("orders.new", f"b{n}".encode(), f"batch-{n}", {"n": str(n)}) for n in range(50)]
    await bus.publish_many(batch)
    # Concurrent single publishes (the embedded bus commits them together).
    await asyncio.gather(*(bus.publish("orders.new", b"c", message_id=f"conc-{n}") for n in range(50)))

    for _ in range(100):
        await inbox.next()
    by_id = {d.message_id: d for d in inbox.received}
    assert len(inbox.received) == 100 and len(by_id) == 100
    assert all(by_id[f"batch-{n}"].body == f"b{n}".encode() for n in range(50))
    assert all(by_id[f"batch-{n}"].headers == {"n": str(n)} for n in range(50))
    assert all(f"conc-{n}" in by_id for n in range(50))


async def test_send_puts_messages_on_one_queue_only_durably(make_bus: Callable[[], Awaitable[AnyBus]]) -> None:
    first = await make_bus()
    target, other = unique_name("q"), unique_name("q")
    await first.declare(target, ["orders.*"])
    await first.declare(other, ["orders.*"])  # bound to the same topic: a publish would reach it too
    items = [("orders.new", f"body {n}".encode(), f"sent-{n}", {"journal-id": str(n)}) for n in range(3)]
    await first.send(target, items)
    await first.close()

    second = await make_bus()  # a restart: what send returned for was durable
    assert (await second.depth(target), await second.depth(other)) == (3, 0)
    with pytest.raises(LookupError):
        await second.send(unique_name("never-declared"), [("orders.new", b"x", "lost", None)])
    attempts: list[int] = []

    async def fails_once(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.message_id == "sent-1" and delivery.attempt == 1:
            raise ConnectionError("peer down")

    inbox = Inbox()

    async def handler(delivery: Delivery) -> None:
        await fails_once(delivery)
        await inbox(delivery)

    await second.subscribe(target, ["orders.*"], handler, max_attempts=3)
    await inbox.until("sent-2")
    got = {d.message_id: d for d in await eventually(lambda: asyncio.sleep(0, inbox.received), lambda r: len(r) >= 3)}
    assert sorted(got) == ["sent-0", "sent-1", "sent-2"]
    for n in range(3):  # as published: topic, body, headers; a sent message is a first delivery, retried as any
        d = got[f"sent-{n}"]
        assert (d.topic, d.body, d.headers) == ("orders.new", f"body {n}".encode(), {"journal-id": str(n)})
    assert got["sent-1"].attempt == 2 and sorted(attempts) == [1, 1, 1, 2]
    assert await second.depth(other) == 0
    assert await eventually(lambda: second.depth(target), lambda n: n == 0) == 0


async def test_depth(bus: AnyBus) -> None:
    queue = unique_name("q")
    assert await bus.depth(unique_name("never-declared")) == 0
    await bus.declare(queue, ["orders.#"])
    await bus.publish_many([("orders.new", b"x", f"m{n}", None) for n in range(5)])
    await bus.publish("adt.a01", b"x", message_id="not-routed")
    assert await bus.depth(queue) == 5
    inbox = Inbox()
    await bus.subscribe(queue, ["orders.#"], inbox)
    await inbox.until("m4")
    assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0


class BatchInbox:
    """A batch handler that records every call (ids and attempts) and the deliveries it handled successfully."""

    def __init__(self, *, poison: str | None = None, first_call_delay: float = 0.0) -> None:
        self.poison = poison  # the handler raises whenever this message is in the list
        self.first_call_delay = first_call_delay
        self.calls: list[list[tuple[str, int]]] = []
        self.handled: list[Delivery] = []
        self._returned = asyncio.Queue[list[Delivery]]()

    async def __call__(self, deliveries: list[Delivery]) -> None:
        self.calls.append([(d.message_id, d.attempt) for d in deliveries])
        if len(self.calls) == 1 and self.first_call_delay:
            await asyncio.sleep(self.first_call_delay)  # lets the prefetch buffer fill behind the first message
        if any(d.message_id == self.poison for d in deliveries):
            raise ValueError(f"poison {self.poison}")
        self.handled.extend(deliveries)
        self._returned.put_nowait(deliveries)

    async def next(self) -> list[Delivery]:
        return await asyncio.wait_for(self._returned.get(), WAIT)

    async def until(self, message_id: str) -> list[Delivery]:
        while message_id not in [d.message_id for d in await self.next()]:
            pass
        return self.handled


async def test_batches_are_queue_ordered_lists_covering_every_message_once(bus: AnyBus) -> None:
    queue = unique_name("q")
    await bus.declare(queue, ["orders.*"])
    ids = [f"m{n:03d}" for n in range(250)]
    await bus.publish_many([("orders.new", f"b{n}".encode(), mid, {"n": str(n)}) for n, mid in enumerate(ids)])
    inbox = BatchInbox()
    await bus.subscribe_batch(queue, ["orders.*"], inbox, max_batch=40)

    handled = await inbox.until(ids[-1])
    assert [d.message_id for d in handled] == ids  # publish order, each exactly once
    assert all((d.body, d.headers, d.attempt) == (f"b{n}".encode(), {"n": str(n)}, 1) for n, d in enumerate(handled))
    sizes = [len(call) for call in inbox.calls]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 40, sizes
    assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0  # all acked
    await asyncio.sleep(0.1)
    assert len(inbox.handled) == 250  # nothing delivered again


async def test_a_failing_batch_is_handed_again_one_by_one_and_the_poison_message_dead_lettered(bus: AnyBus) -> None:
    queue = unique_name("q")
    await bus.declare(queue, ["orders.*"])
    ids = [f"m{n:02d}" for n in range(60)]
    poison = "m07"
    await bus.publish_many([("orders.new", b"x", mid, {"k": "v"}) for mid in ids])
    inbox = BatchInbox(poison=poison, first_call_delay=0.2)
    await bus.subscribe_batch(queue, ["orders.*"], inbox, max_attempts=3, max_batch=25)

    dead = await eventually(lambda: bus.dead_letters(queue), bool)
    others = [mid for mid in ids if mid != poison]
    handled = await eventually(lambda: asyncio.sleep(0, inbox.handled), lambda h: len(h) >= len(others))
    assert [d.message_id for d in handled] == others  # each once, in order
    assert len(dead) == 1
    letter = dead[0]
    assert (letter.message_id, letter.attempt) == (poison, 3)
    assert letter.headers == {"k": "v", "x-error": f"ValueError: poison {poison}"}
    failed_batches = [call for call in inbox.calls if len(call) > 1 and (poison, 1) in call]
    assert failed_batches, inbox.calls  # the poison message did come in a batch with others
    assert [call for call in inbox.calls if call[0][0] == poison and len(call) == 1] == [
        [(poison, 1)],
        [(poison, 2)],
        [(poison, 3)],
    ]  # isolated, then the normal per-delivery failure rules: attempts counted only when it fails alone
    assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0
    await asyncio.sleep(0.1)
    assert len(inbox.handled) == len(others)


async def test_a_single_message_is_handed_over_at_once_as_a_list_of_one(bus: AnyBus) -> None:
    queue = unique_name("q")
    inbox = BatchInbox()
    await bus.subscribe_batch(queue, ["orders.*"], inbox, max_batch=100)
    started = time.monotonic()
    await bus.publish("orders.new", b"alone", message_id="m-1")
    batch = await inbox.next()
    assert time.monotonic() - started < 1.0
    assert [(d.message_id, d.body) for d in batch] == [("m-1", b"alone")]
    assert inbox.calls == [[("m-1", 1)]]


async def test_one_by_one_hands_the_single_delivery_of_each_batch_to_the_handler() -> None:
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)

    batch_handler = one_by_one(handler)
    delivery = Delivery("orders.new", b"body", "m-1")
    await batch_handler([delivery])
    assert seen == [delivery]
    with pytest.raises(ValueError):  # subscribe consumes with max_batch=1: a longer list is a bug
        await batch_handler([delivery, delivery])
    assert seen == [delivery]


@pytest.mark.rabbitmq
async def test_a_dead_letter_the_broker_returns_is_not_lost(rabbitmq_url: str, rabbitmq_exchange: str) -> None:
    """RabbitMQ: with nothing bound for ``<queue>.dlq`` the dead letter comes back unroutable; the original stays
    unacked until the bus has bound the dead-letter queue again and parked it there (never acked and lost)."""
    bus = RabbitMQBus(rabbitmq_url, exchange=rabbitmq_exchange, retry_backoff=0.5, close_timeout=2)
    await bus.start()
    seen: list[int] = []

    async def refusing(delivery: Delivery) -> None:
        seen.append(delivery.attempt)
        raise PermanentError("HTTP 422: invalid resource")

    queue = unique_name("q")
    connection = await aio_pika.connect(rabbitmq_url)
    try:
        await bus.subscribe(queue, ["orders.*"], refusing)
        channel = await connection.channel()
        dlq = await channel.declare_queue(f"{bus.queue_name(queue)}.dlq", passive=True)
        await dlq.unbind(f"{rabbitmq_exchange}.dlx", routing_key=dlq.name)  # as an operator's mistake would
        with structlog.testing.capture_logs() as logs:
            await bus.publish("orders.new", b"payload", message_id="m-1")
            assert await eventually(lambda: asyncio.sleep(0, seen), bool) == [1]
            returned = "bus.dead_letter_returned"
            assert returned in await eventually(
                lambda: asyncio.sleep(0, [e["event"] for e in logs]), lambda events: returned in events
            )
            assert await bus.dead_letters(queue) == []  # returned, not parked yet: the original is still unacked
            dead = await eventually(lambda: bus.dead_letters(queue), bool)
        assert [(d.message_id, d.attempt, d.headers) for d in dead] == [
            ("m-1", 1, {"x-error": "PermanentError: HTTP 422: invalid resource"})
        ]
        assert "bus.dead_lettered" in [e["event"] for e in logs]
        assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0
        await asyncio.sleep(0.2)
        assert seen == [1]  # parked once, never handed again
    finally:
        await connection.close()
        await bus.close()
