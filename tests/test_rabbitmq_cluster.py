"""The RabbitMQ bus on a real three-node cluster with quorum queues: the bus contract holds, and neither a node
crash nor a consumer reconnection loses a confirmed message or counts as a failed attempt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aio_pika
import pytest

from tests.peer_rabbitmq import _free_port, unique_name
from tests.peer_rabbitmq_cluster import RabbitMQCluster
from traboule.adapters.rabbitmq import RabbitMQBus, quorum_arguments
from traboule.app import bus_backend, config
from traboule.bus import Delivery
from traboule.errors import ConfigError

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(90)]  # the first test also starts the cluster (~12 s)

T = TypeVar("T")
WAIT = 20.0  # seconds: bounds waits that span a failover (election + reconnection); a passing test is faster
RECONNECT = "reconnect_interval=1"  # aio-pika's pace of reconnection attempts (default 5 s)

MakeBus = Callable[[list[str]], Awaitable[RabbitMQBus]]


@pytest.fixture
async def make_bus(rabbitmq_cluster: RabbitMQCluster) -> AsyncIterator[MakeBus]:
    """Opens buses on quorum queues, one exchange per test, connected to the brokers given (in that order)."""
    exchange = unique_name("traboule-cluster")
    buses: list[RabbitMQBus] = []

    async def factory(urls: list[str]) -> RabbitMQBus:
        bus = RabbitMQBus(
            [f"{url}?{RECONNECT}" for url in urls],
            exchange=exchange,
            queue_type="quorum",
            retry_backoff=0.05,
            close_timeout=2,
            publish_timeout=10,
        )
        await bus.start()
        await bus.wait_connected(WAIT)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.close()


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], wait: float = WAIT) -> T:
    deadline = time.monotonic() + wait
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def rotated(urls: list[str], first: int) -> list[str]:
    """The cluster's brokers, starting with node ``first``."""
    return urls[first:] + urls[:first]


def queue_types(cluster: RabbitMQCluster, prefix: str) -> dict[str, str]:
    result = cluster.ctl("list_queues", "--quiet", "--no-table-headers", "name", "type")
    rows = (line.split("\t") for line in result.stdout.splitlines())
    return {row[0]: row[1].strip() for row in rows if len(row) == 2 and row[0].startswith(prefix)}


async def test_publish_consume_ack_on_quorum_queues(rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus) -> None:
    startup = rabbitmq_cluster.startup_seconds
    assert 0 < startup < 60, f"cluster start-up took {startup:.1f} s"
    bus = await make_bus(rabbitmq_cluster.urls())
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], handler)
    await bus.publish("orders.new", b"MSH|x", message_id="m-1", headers={"source": "mllp"})
    got = await asyncio.wait_for(received.get(), WAIT)
    assert (got.topic, got.body, got.message_id, got.headers, got.attempt) == (
        "orders.new",
        b"MSH|x",
        "m-1",
        {"source": "mllp"},
        1,
    )
    assert await eventually(lambda: bus.depth(queue), lambda n: n == 0) == 0
    name = bus.queue_name(queue)
    assert queue_types(rabbitmq_cluster, name) == {name: "quorum", f"{name}.dlq": "quorum"}
    assert bus.broker_version[:2] == (3, 10)  # the installed broker: no x-delivery-limit (see below)
    arguments = queue_arguments(rabbitmq_cluster, name)
    assert "x-delivery-limit" not in arguments[name] and "x-delivery-limit" not in arguments[f"{name}.dlq"]
    for argument in ("x-single-active-consumer", "x-dead-letter-strategy", "x-overflow"):
        assert argument in arguments[name] and argument not in arguments[f"{name}.dlq"]


def queue_arguments(cluster: RabbitMQCluster, prefix: str) -> dict[str, str]:
    """Each queue's arguments as rabbitmqctl prints them (one text per queue)."""
    result = cluster.ctl("list_queues", "--quiet", "--no-table-headers", "name", "arguments")
    rows = (line.split("\t", 1) for line in result.stdout.splitlines())
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0].startswith(prefix)}


def test_quorum_queue_arguments_follow_the_broker_version() -> None:
    """RabbitMQ 4.0 gives quorum queues a delivery limit of 20 by default (then drops the message): -1 lifts it;
    3.x has no default and drops a message at its first return under -1 (measured on 3.10.8), so it gets none."""
    for version in ((3, 10, 8), (3, 13, 7), ()):
        assert "x-delivery-limit" not in quorum_arguments("t", "t.q", version, dlq=False)
        assert quorum_arguments("t", "t.q", version, dlq=True) == {"x-queue-type": "quorum"}
    assert quorum_arguments("t", "t.q", (4, 0, 1), dlq=True) == {"x-queue-type": "quorum", "x-delivery-limit": -1}
    assert quorum_arguments("t", "t.q", (4, 1), dlq=False) == {
        "x-queue-type": "quorum",
        "x-delivery-limit": -1,
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": "t.dlx",
        "x-dead-letter-routing-key": "t.q.dlq",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert RabbitMQBus("amqp://a/").queue_arguments("t.q") == {}  # classic queues: no argument, as ever


async def test_one_active_consumer_per_queue_across_nodes_and_the_standby_takes_over_in_order(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """Two engine nodes run the same channel: only one consumes the queue at a time (no read-then-write race
    between nodes); when its connection dies the other takes over, in queue order, without a dead letter."""
    urls = rabbitmq_cluster.urls()
    publisher = await make_bus(urls[2:])
    first = await make_bus(urls[:1])  # the only engine connections on node 0
    second = await make_bus(urls[1:2])
    queue = unique_name("q")
    got: list[tuple[str, str]] = []
    held, release = asyncio.Event(), asyncio.Event()

    def handler(node: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            got.append((node, delivery.message_id))
            if node == "first" and delivery.message_id == "m-3":  # unacked when its connection dies
                held.set()
                await release.wait()

        return handle

    def ids(node: str) -> list[str]:
        return [message_id for who, message_id in got if who == node]

    await first.subscribe(queue, ["orders.*"], handler("first"))  # first to subscribe: the active consumer
    await second.subscribe(queue, ["orders.*"], handler("second"))
    try:
        await publisher.publish_many([("orders.new", b"x", f"m-{n}", None) for n in range(3)])
        await eventually(lambda: asyncio.sleep(0, len(got)), lambda n: n >= 3)
        await asyncio.sleep(0.5)  # a delivery to the standby would show up now
        assert got == [("first", "m-0"), ("first", "m-1"), ("first", "m-2")]

        await publisher.publish_many([("orders.new", b"x", f"m-{n}", None) for n in range(3, 8)])
        assert await eventually(lambda: asyncio.sleep(0, held.is_set()), bool), got
        since = first.state()["since"]
        result = await asyncio.to_thread(rabbitmq_cluster.nodes[0].ctl, "close_all_connections", "--global", "test")
        assert result.returncode == 0, result.stderr
        expected = [f"m-{n}" for n in range(3, 8)]
        assert await eventually(lambda: asyncio.sleep(0, ids("second")), lambda i: i == expected) == expected
        release.set()  # its ack cannot reach the broker: m-3 was handed to the standby already
        # The first node reconnects, now as the standby: the rest still goes to the second one.
        assert await eventually(lambda: asyncio.sleep(0, first.connected and first.state()["since"] != since), bool)
        await publisher.publish_many([("orders.new", b"x", f"m-{n}", None) for n in range(8, 10)])
        expected += ["m-8", "m-9"]
        assert await eventually(lambda: asyncio.sleep(0, ids("second")), lambda i: i == expected) == expected
        await asyncio.sleep(0.5)
        assert ids("first") == ["m-0", "m-1", "m-2", "m-3"] and ids("second") == expected
        assert await eventually(lambda: second.depth(queue), lambda n: n == 0) == 0
        assert await second.dead_letters(queue) == []
    finally:
        release.set()


async def test_what_the_broker_dead_letters_itself_lands_in_the_dead_letter_queue(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """The safety net of quorum queues: a message the broker drops (here rejected without requeue by another
    client; on RabbitMQ 4 also a delivery limit set by a policy) is dead-lettered to ``<queue>.dlq`` with its
    topic, shown and replayed as the engine's own dead letters."""
    urls = rabbitmq_cluster.urls()
    bus = await make_bus(urls)
    queue = unique_name("q")
    await bus.declare(queue, ["orders.*"])
    await bus.publish("orders.new", b"payload", message_id="m-1", headers={"k": "v"})
    connection = await aio_pika.connect(urls[1])
    try:
        channel = await connection.channel()
        other = await channel.declare_queue(bus.queue_name(queue), passive=True)
        async with other.iterator() as messages:
            async for message in messages:
                await message.reject(requeue=False)
                break
    finally:
        await connection.close()
    dead = await eventually(lambda: bus.dead_letters(queue), bool)
    assert [(d.topic, d.body, d.message_id, d.attempt) for d in dead] == [("orders.new", b"payload", "m-1", 1)]
    assert dead[0].headers == {"k": "v", "x-error": "dead-lettered by the broker: rejected"}
    received: asyncio.Queue[Delivery] = asyncio.Queue()

    async def handler(delivery: Delivery) -> None:
        received.put_nowait(delivery)

    await bus.subscribe(queue, ["orders.*"], handler)
    assert await bus.replay_dead_letter(queue, "m-1")
    got = await asyncio.wait_for(received.get(), WAIT)
    assert (got.topic, got.body, got.message_id, got.headers, got.attempt) == (
        "orders.new",
        b"payload",
        "m-1",
        {"k": "v"},
        1,
    )
    assert await eventually(lambda: bus.dead_letters(queue), lambda d: not d) == []


async def test_the_first_connection_skips_a_broker_that_is_down(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    nobody = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"  # nothing listens there
    bus = await make_bus([nobody, rabbitmq_cluster.urls()[1]])
    assert bus.connected and bus.url == f"{rabbitmq_cluster.urls()[1]}?{RECONNECT}"
    queue = unique_name("q")
    await bus.declare(queue, ["orders.*"])
    await bus.publish("orders.new", b"x", message_id="m-1")
    assert await bus.depth(queue) == 1


async def test_dead_letter_after_max_attempts_of_handler_failures(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    bus = await make_bus(rotated(rabbitmq_cluster.urls(), 1))
    attempts: list[int] = []

    async def failing(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError(f"bad segment, attempt {delivery.attempt}")

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], failing, max_attempts=3)
    await bus.publish("orders.new", b"x", message_id="m-1", headers={"k": "v"})
    dead = await eventually(lambda: bus.dead_letters(queue), lambda d: len(d) == 1)
    assert attempts == [1, 2, 3]
    assert [(d.message_id, d.attempt, d.topic) for d in dead] == [("m-1", 3, "orders.new")]
    assert dead[0].headers == {"k": "v", "x-error": "ValueError: bad segment, attempt 3"}


async def test_a_consumer_reconnection_does_not_count_as_an_attempt(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    urls = rabbitmq_cluster.urls()
    publisher = await make_bus(urls[:1])
    consumer = await make_bus(urls[2:])  # its connections are the only ones on node 2
    queue = unique_name("q")
    closes = 3  # more than max_attempts: had the broker's count been used, the messages would be dead letters
    seen: list[tuple[str, int]] = []
    held, release = asyncio.Event(), asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append((delivery.message_id, delivery.attempt))
        if len(seen) <= closes:  # the first deliveries stay unacked while the broker closes the connection
            held.set()
            await release.wait()

    await consumer.subscribe(queue, ["orders.*"], handler, max_attempts=2)
    await publisher.publish_many([("orders.new", b"x", f"m-{n}", None) for n in range(5)])
    for _ in range(closes):
        assert await eventually(lambda: asyncio.sleep(0, held.is_set()), bool), seen
        held.clear()
        since = consumer.state()["since"]
        result = await asyncio.to_thread(rabbitmq_cluster.nodes[2].ctl, "close_all_connections", "--global", "test")
        assert result.returncode == 0, result.stderr
        # Reconnected (at least 1 s after the loss, so ``since`` moved on) before the handler goes on.
        assert await eventually(
            lambda since=since: asyncio.sleep(0, consumer.connected and consumer.state()["since"] != since), bool
        )
        release.set()  # the handler returns: its ack cannot reach the broker over the closed connection
        await asyncio.sleep(0)
        release.clear()
    await eventually(lambda: asyncio.sleep(0, {m for m, _ in seen}), lambda ids: len(ids) == 5)
    assert {m for m, _ in seen} == {f"m-{n}" for n in range(5)}
    for held_id, _ in seen[:closes]:  # not acked (the connection was closed under it): delivered again
        assert sum(1 for m, _ in seen if m == held_id) >= 2, seen
    assert {attempt for _, attempt in seen} == {1}
    assert await eventually(lambda: consumer.depth(queue), lambda n: n == 0) == 0
    assert await consumer.dead_letters(queue) == []


async def test_a_batch_caught_by_a_connection_loss_is_not_handed_over_again_on_the_dead_channel(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """The connection is lost while a batch is being handled, and the batch then fails: its messages are not
    handed over one by one (they can no longer be acked, so handling them would only run them once more); they
    come again on the new connection, each handled once more."""
    urls = rabbitmq_cluster.urls()
    publisher = await make_bus(urls[:1])
    consumer = await make_bus(urls[2:])  # its connections are the only ones on node 2
    queue = unique_name("q")
    await consumer.declare(queue, ["orders.*"])
    await publisher.publish_many([("orders.new", b"x", f"m-{n}", None) for n in range(5)])
    calls: list[list[str]] = []
    held, release = asyncio.Event(), asyncio.Event()

    async def handler(deliveries: list[Delivery]) -> None:
        calls.append([d.message_id for d in deliveries])
        if len(calls) == 1:  # the first batch waits for the connection loss, then fails
            held.set()
            await release.wait()
            raise ConnectionError("peer down")

    await consumer.subscribe_batch(queue, ["orders.*"], handler)
    assert await eventually(lambda: asyncio.sleep(0, held.is_set()), bool)
    since = consumer.state()["since"]
    result = await asyncio.to_thread(rabbitmq_cluster.nodes[2].ctl, "close_all_connections", "--global", "test")
    assert result.returncode == 0, result.stderr
    assert await eventually(lambda: asyncio.sleep(0, consumer.connected and consumer.state()["since"] != since), bool)
    release.set()
    handled = await eventually(
        lambda: asyncio.sleep(0, [m for batch in calls[1:] for m in batch]), lambda ids: len(set(ids)) == 5
    )
    first = set(calls[0])
    assert first and sorted(handled) == sorted(f"m-{n}" for n in range(5)), calls
    await asyncio.sleep(0.5)
    counts = {m: sum(batch.count(m) for batch in calls) for m in (f"m-{n}" for n in range(5))}
    assert counts == {m: 2 if m in first else 1 for m in counts}, calls  # the failed batch, then once again
    assert await eventually(lambda: consumer.depth(queue), lambda n: n == 0) == 0


async def test_killing_the_queue_leader_under_publishes_loses_no_confirmed_message(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    urls = rabbitmq_cluster.urls()
    queue = unique_name("q")
    declarer = await make_bus(urls)
    await declarer.declare(queue, ["orders.*"])
    leader = rabbitmq_cluster.leader(declarer.queue_name(queue))
    # Both connected to the leader's node: publisher and consumer lose their connection and fail over.
    publisher = await make_bus(rotated(urls, leader))
    consumer = await make_bus(rotated(urls, leader))
    received: dict[str, list[int]] = {}

    async def handler(delivery: Delivery) -> None:
        received.setdefault(delivery.message_id, []).append(delivery.attempt)

    await consumer.subscribe(queue, ["orders.*"], handler, max_attempts=2)
    confirmed: list[str] = []
    failed = 0
    killed = asyncio.Event()

    async def stream() -> None:
        """Publish one message after the other until 50 more were confirmed after the kill."""
        nonlocal failed
        n, after_kill = 0, 0
        while after_kill < 50:
            n += 1
            try:
                await publisher.publish("orders.new", b"x", message_id=f"m-{n}")
            except Exception:  # not confirmed: it may arrive or not (at least once); not counted below
                failed += 1
                await asyncio.sleep(0.1)
                continue
            confirmed.append(f"m-{n}")
            after_kill += killed.is_set()
            await asyncio.sleep(0.01)

    publishing = asyncio.create_task(stream())
    try:
        await eventually(lambda: asyncio.sleep(0, len(confirmed)), lambda n: n >= 30)
        await asyncio.to_thread(rabbitmq_cluster.kill, leader)
        killed.set()
        await asyncio.wait_for(publishing, WAIT * 2)
        assert rabbitmq_cluster.leader(declarer.queue_name(queue)) != leader  # a new leader took over
        dead_broker = f"{urls[leader]}?{RECONNECT}"
        assert publisher.url != dead_broker and consumer.url != dead_broker  # both failed over to another node
        missing = await eventually(
            lambda: asyncio.sleep(0, set(confirmed) - set(received)), lambda left: not left, wait=WAIT * 2
        )
        assert not missing, f"{len(missing)} confirmed messages never consumed ({failed} publishes failed)"
        assert all(attempts == [1] * len(attempts) for attempts in received.values())  # never a failed attempt
        assert await consumer.dead_letters(queue) == []
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await asyncio.to_thread(rabbitmq_cluster.start, leader)


def test_the_cluster_settings_reach_the_bus(tmp_path: Path) -> None:
    """``[bus] amqp_url`` as a list and ``queue_type``, or the environment; classic stays the default."""
    toml = tmp_path / "traboule.toml"
    toml.write_text('[bus]\namqp_url = ["amqp://a:5672/", "amqp://b:5672/"]\nqueue_type = "quorum"\n')
    cfg = config.load(str(toml), env={})
    assert (cfg.amqp_url, cfg.queue_type) == ("amqp://a:5672/,amqp://b:5672/", "quorum")
    bus = bus_backend.make_bus(cfg.amqp_url, str(tmp_path), queue_type=cfg.queue_type)
    assert isinstance(bus, RabbitMQBus)
    assert (bus.urls, bus.url, bus.queue_type) == (["amqp://a:5672/", "amqp://b:5672/"], "amqp://a:5672/", "quorum")

    env = {"TRABOULE_AMQP_URL": "amqp://a/, amqp://b/", "TRABOULE_AMQP_QUEUE_TYPE": "quorum"}
    cfg = config.load(None, env=env)
    assert RabbitMQBus(cfg.amqp_url).urls == ["amqp://a/", "amqp://b/"] and cfg.queue_type == "quorum"
    assert config.load(None, env={"TRABOULE_AMQP_URL": "amqp://a/"}).queue_type == "classic"
    with pytest.raises(ConfigError, match="queue_type"):
        config.load(None, env={"TRABOULE_AMQP_QUEUE_TYPE": "mirrored"})
    toml.write_text('[bus]\namqp_url = ["amqp://a/,amqp://b/"]\n')
    with pytest.raises(ConfigError, match="list of URLs"):
        config.load(str(toml), env={})


def test_the_partitions_setting_reaches_the_bus(tmp_path: Path) -> None:
    """``[bus] partitions`` (or ``TRABOULE_AMQP_PARTITIONS``) gives each subscriber that many queues; 1, one queue
    per subscriber as before, stays the default; anything but a whole number from 1 to 64 is refused."""
    toml = tmp_path / "traboule.toml"
    toml.write_text('[bus]\namqp_url = "amqp://a/"\nqueue_type = "quorum"\npartitions = 8\n')
    cfg = config.load(str(toml), env={})
    bus = bus_backend.make_bus(cfg.amqp_url, str(tmp_path), queue_type=cfg.queue_type, partitions=cfg.partitions)
    assert isinstance(bus, RabbitMQBus) and (bus.partitions, bus.queue_type) == (8, "quorum")
    assert config.load(None, env={"TRABOULE_AMQP_PARTITIONS": "4"}).partitions == 4
    assert config.load(None, env={}).partitions == 1
    assert RabbitMQBus("amqp://a/").partitions == 1
    for bad in ("0", "65", "-2", "true", '"4"', "2.5"):
        toml.write_text(f"[bus]\npartitions = {bad}\n")
        with pytest.raises(ConfigError, match="partitions"):
            config.load(str(toml), env={})
    with pytest.raises(ConfigError, match="PARTITIONS"):
        config.load(None, env={"TRABOULE_AMQP_PARTITIONS": "many"})
    with pytest.raises(ValueError, match="partitions"):
        RabbitMQBus("amqp://a/", partitions=0)
