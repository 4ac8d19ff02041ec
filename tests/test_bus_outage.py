"""The engine starts and takes orders while RabbitMQ is down, and catches up once the broker is back.

Outages are real: the session broker's rabbit application is stopped (``rabbitmqctl stop_app``: the AMQP port
closes, about 0.5 s) and started again (``start_app``, about 1 s), or the bus is pointed at a port where nothing
answers AMQP.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.peer_dcmtk import free_port
from tests.peer_rabbitmq import RabbitMQNode, unique_name
from tests.test_bus import Inbox
from tests.test_flow import ack_code, engine_config, fixture, send, store, until
from traboule.adapters.rabbitmq import BusUnavailableError, RabbitMQBus
from traboule.app.runtime import Runtime

pytestmark = pytest.mark.timeout(120)

PROMPT = 1.0  # seconds: "at once" on a loaded 2-core machine; each of these calls takes milliseconds
RECONNECT = 40.0  # the first-connection backoff reaches 16-30 s between attempts; the broker boots in ~1 s


class Broker:
    """The session broker, whose rabbit application a test stops and starts; always started again after."""

    def __init__(self, node: RabbitMQNode) -> None:
        self.node = node
        self.url = node.url

    def _ctl(self, action: str) -> None:
        result = self.node.ctl(action)
        assert result.returncode == 0, f"rabbitmqctl {action}: {result.stdout}{result.stderr}"

    async def stop(self) -> None:
        await asyncio.to_thread(self._ctl, "stop_app")

    async def start(self) -> None:
        await asyncio.to_thread(self._ctl, "start_app")


@pytest.fixture
def broker(rabbitmq_node: RabbitMQNode) -> Iterator[Broker]:
    broker = Broker(rabbitmq_node)
    try:
        yield broker
    finally:
        broker._ctl("start_app")  # a no-op when running: the session's other tests need the broker


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) but never speaks AMQP: a hung broker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


@pytest.fixture
async def buses() -> AsyncIterator[list[RabbitMQBus]]:
    """Buses made by a test, closed at the end even when it failed."""
    made: list[RabbitMQBus] = []
    yield made
    for bus in made:
        await bus.close()


async def timed(awaitable: Awaitable[object]) -> float:
    started = time.monotonic()
    await awaitable
    return time.monotonic() - started


@pytest.mark.rabbitmq
async def test_a_bus_started_while_the_broker_is_down_consumes_once_it_is_up_and_after_a_later_outage(
    broker: Broker, buses: list[RabbitMQBus]
) -> None:
    await broker.stop()
    bus = RabbitMQBus(broker.url, exchange=unique_name("outage"))
    buses.append(bus)
    assert await timed(bus.start()) < PROMPT
    assert not bus.connected
    state = bus.state()
    assert (state["backend"], state["connected"], state["last_error"]) == ("rabbitmq", False, "ConnectionRefusedError")

    inbox, kept = Inbox(), unique_name("kept")
    assert await timed(bus.subscribe(unique_name("q"), ["order.*"], inbox)) < PROMPT  # recorded
    assert await timed(bus.declare(kept, ["order.*"])) < PROMPT  # recorded
    with pytest.raises(BusUnavailableError, match=r"not connected.*ConnectionRefusedError"):
        await asyncio.wait_for(bus.publish("order.new", b"x", message_id="too-early"), PROMPT)
    with pytest.raises(BusUnavailableError):
        await asyncio.wait_for(bus.depth(kept), PROMPT)

    await broker.start()
    await bus.wait_connected(RECONNECT)
    assert bus.connected and bus.state()["connected"]
    await bus.publish("order.new", b"first", message_id="m-1")
    assert (await inbox.next()).message_id == "m-1"  # the recorded subscription consumes
    assert await bus.depth(kept) == 1  # the recorded declaration was applied before the publish went through

    # Later outages are aio-pika's robust reconnection, as before; the recorded subscription is restored too.
    await broker.stop()
    await until(lambda: not bus.connected)
    with pytest.raises(BusUnavailableError):  # not waiting for the reconnection
        await asyncio.wait_for(bus.publish("order.new", b"x", message_id="during"), PROMPT)
    await broker.start()
    await bus.wait_connected(RECONNECT)
    await bus.publish("order.new", b"second", message_id="m-2")
    assert (await inbox.next()).message_id == "m-2"


@pytest.mark.rabbitmq
async def test_an_engine_started_while_the_broker_is_down_accepts_orders_and_delivers_them_when_it_is_up(
    broker: Broker, tmp_path: Path
) -> None:
    await broker.stop()
    runtime = Runtime(engine_config(tmp_path, broker.url, unique_name("traboule-outage")))
    await runtime.start()  # main: "cannot start: [Errno 111]"
    try:
        assert not runtime.bus.connected
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack_code(ack) == "AA"
        assert runtime.journal is not None
        assert runtime.journal.counts() == {"accepted": 1}
        assert runtime.journal.pending_events(10)  # held by the outbox
        assert store(runtime).count() == 0

        await broker.start()
        await until(lambda: store(runtime).count() == 1, timeout=RECONNECT)  # the outbox drained
        await runtime.wait_idle()
    finally:
        await runtime.stop()


async def test_close_of_a_never_connected_bus_returns_promptly(silent_port: int, buses: list[RabbitMQBus]) -> None:
    refused = RabbitMQBus(f"amqp://guest:guest@127.0.0.1:{free_port()}/", exchange=unique_name("x"))
    assert await timed(refused.start()) < PROMPT  # then waiting in its backoff
    await refused.subscribe(unique_name("q"), ["#"], Inbox())
    assert await timed(refused.close()) < PROMPT
    assert not refused.connected

    # A peer that never answers: start() returns after connect_timeout, close() interrupts the attempt under way.
    hung = RabbitMQBus(f"amqp://guest:guest@127.0.0.1:{silent_port}/", exchange=unique_name("x"), connect_timeout=1)
    buses.append(hung)
    assert await timed(hung.start()) < 1 + 1 + PROMPT
    assert not hung.connected
    await asyncio.sleep(1.1)  # the backoff is over: the second attempt is under way
    assert await timed(hung.close()) < PROMPT
    with pytest.raises(BusUnavailableError, match="closed"):
        await hung.publish("order.new", b"x", message_id="after-close")


async def test_failed_attempts_are_logged_with_a_capped_backoff_and_no_password(buses: list[RabbitMQBus]) -> None:
    port = free_port()
    url = f"amqp://traboule:s3cr3t-pw@127.0.0.1:{port}/?keyfile=/etc/traboule/key.pem"
    bus = RabbitMQBus(url, exchange=unique_name("x"), reconnect_min=0.05, reconnect_max=0.2)
    buses.append(bus)
    with structlog.testing.capture_logs() as logs:
        await bus.start()
        await asyncio.sleep(1.0)
        with pytest.raises(BusUnavailableError) as raised:
            await bus.wait_connected(0.1)
    delays = [event["retry_in"] for event in logs if event["event"] == "rabbitmq.unreachable"]
    assert delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]  # doubled, then capped
    assert len(delays) <= 1.0 / 0.2 + 4  # one line per attempt, and attempts are rate-bounded
    for text in (repr(logs), str(raised.value), repr(bus.state())):
        assert "s3cr3t" not in text and "key.pem" not in text
    assert f"amqp://traboule@127.0.0.1:{port}/" in str(raised.value)  # the address, to know which broker
