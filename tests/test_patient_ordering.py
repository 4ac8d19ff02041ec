"""Ordering per patient on a real three-node RabbitMQ cluster with partitioned subscribers (``[bus] partitions``):
one patient's events are applied in journal order by whichever engine node consumes them, patients go in
parallel, a failing event holds back its own patient only (a merge follows the merged-away patient's events), a
partition moving to another node leaves nothing stale behind, and killing a broker under load loses no confirmed
event and applies none twice."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import pytest

from tests.peer_rabbitmq import unique_name
from tests.peer_rabbitmq_cluster import RabbitMQCluster
from tests.test_flow import engine_config, fixture, send, store, until
from traboule.adapters.rabbitmq import RabbitMQBus, hash_exchange_name, partition_name
from traboule.app.runtime import Runtime
from traboule.bus import PARTITION_KEY, Delivery, PermanentError
from traboule.bus.partition import partition_headers, partition_key, patient_key
from traboule.errors import BusUnavailableError, ConfigError
from traboule.model import (
    Document,
    Envelope,
    Identifier,
    ImagingOrder,
    Patient,
    PatientUpdate,
    PersonName,
    Report,
    topic_of,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(150)]  # the first test may also start the cluster

T = TypeVar("T")
PARTITIONS = 4
TOPICS = ["order.*", "patient.*"]
WAIT = 20.0  # seconds: bounds waits that span a failover; a passing test is much faster
RECONNECT = "reconnect_interval=1"  # aio-pika's pace of reconnection attempts (default 5 s)

MakeBus = Callable[..., Awaitable[RabbitMQBus]]


@pytest.fixture
async def make_bus(rabbitmq_cluster: RabbitMQCluster) -> AsyncIterator[MakeBus]:
    """Opens partitioned buses on quorum queues, one exchange per test, connected to the brokers given in order."""
    exchange = unique_name("traboule-ordered")
    buses: list[RabbitMQBus] = []

    async def factory(urls: list[str], *, retry_backoff: float = 0.05, partitions: int = PARTITIONS) -> RabbitMQBus:
        bus = RabbitMQBus(
            [f"{url}?{RECONNECT}" for url in urls],
            exchange=exchange,
            queue_type="quorum",
            partitions=partitions,
            retry_backoff=retry_backoff,
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
    await remove(rabbitmq_cluster, exchange)


async def remove(cluster: RabbitMQCluster, exchange: str) -> None:
    """Delete a test's queues and exchanges: fewer quorum queues for the next test's node kill to elect anew."""
    queues = await asyncio.to_thread(listing, cluster, "list_queues")
    exchanges = await asyncio.to_thread(listing, cluster, "list_exchanges")
    connection = await aio_pika.connect(next(n.url for n in cluster.nodes if n.running))
    async with connection:
        channel = await connection.channel()
        for name in (q for q in queues if q.startswith(f"{exchange}.")):
            await channel.queue_delete(name)
        for name in (e for e in exchanges if e == exchange or e.startswith(f"{exchange}.")):
            await channel.exchange_delete(name)


async def eventually(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], wait: float = WAIT) -> T:
    deadline = time.monotonic() + wait
    while True:
        value = await probe()
        if accept(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def now(value: T) -> Awaitable[T]:
    return asyncio.sleep(0, value)


def rotated(urls: list[str], first: int) -> list[str]:
    return urls[first:] + urls[:first]


# -- a generated journal: per patient a new order, A08 updates, a change and a cancel, patients interleaved --------


@dataclass(frozen=True)
class Event:
    seq: int  # the journal's order
    patient: str
    topic: str
    message_id: str
    body: bytes

    def item(self) -> tuple[str, bytes, str, dict[str, str]]:
        """As the outbox relay publishes it: the journal id and the patient's partition key in headers."""
        return (self.topic, self.body, self.message_id, {"journal-id": str(self.seq), **partition_headers(self.body)})


def patient(pid: str, family: str) -> Patient:
    return Patient(ids=[Identifier(pid, "CHU-X", type="PI")], name=PersonName(family=family, given="Jo"))


def journal(patients: int = 40, seed: int = 7) -> list[Event]:
    """Each patient's story in its own order, the stories interleaved at random (seeded) as a journal would."""
    stories: dict[str, list[Any]] = {}
    for n in range(patients):
        pid = f"IPP{n:05d}"
        order = ImagingOrder(
            action="new", placer_order_number=Identifier(f"PO{n}", "RIS"), patient=patient(pid, f"NAME{n}-0")
        )
        stories[pid] = [
            order,
            PatientUpdate(patient=patient(pid, f"NAME{n}-1")),  # A08
            PatientUpdate(patient=patient(pid, f"NAME{n}-2")),
            ImagingOrder(action="change", placer_order_number=order.placer_order_number, patient=patient(pid, "")),
            PatientUpdate(patient=patient(pid, f"NAME{n}-3")),
            ImagingOrder(action="cancel", placer_order_number=order.placer_order_number, patient=patient(pid, "")),
        ]
    rng = random.Random(seed)
    events: list[Event] = []
    while stories:
        pid = rng.choice(sorted(stories))
        payload = stories[pid].pop(0)
        if not stories[pid]:
            del stories[pid]
        envelope = Envelope(payload, source="ris-orders")
        events.append(Event(len(events) + 1, pid, topic_of(payload), envelope.id, envelope.to_json()))
    return events


def apply(state: dict[str, str], body: bytes) -> dict[str, str]:
    """A patient's state after one event: its name (A08, orders) and its order's status."""
    envelope = json.loads(body)
    payload = envelope["payload"]
    state = dict(state)
    if payload["patient"]["name"]["family"]:
        state["name"] = payload["patient"]["name"]["family"]
    if envelope["kind"] == "ImagingOrder":
        state["order"] = {"new": "scheduled", "change": "changed", "cancel": "cancelled"}[payload["action"]]
    return state


@dataclass
class Applier:
    """The engine nodes' side: an idempotent consumer (by message id, as the engine's applied keys) applying each
    event to its patient's state; raw deliveries and duplicates counted apart."""

    state: dict[str, dict[str, str]]
    applied: dict[str, list[int]]  # per patient, the journal order of the events applied, in applying order
    done: set[str]  # message ids applied
    deliveries: dict[str, int]  # per message id, every delivery (duplicates included)
    by_node: dict[str, int]

    @classmethod
    def new(cls) -> Applier:
        return cls(defaultdict(dict), defaultdict(list), set(), defaultdict(int), defaultdict(int))

    def handler(self, node: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            await asyncio.sleep(0.002)  # some work: deliveries are in flight when a broker dies
            self.deliveries[delivery.message_id] += 1
            if delivery.message_id in self.done:
                return  # a duplicate (redelivered, or published twice): skipped, as the engine does
            pid = json.loads(delivery.body)["payload"]["patient"]["ids"][0]["value"]
            self.state[pid] = apply(self.state[pid], delivery.body)
            self.applied[pid].append(int(delivery.headers["journal-id"]))
            self.done.add(delivery.message_id)
            self.by_node[node] += 1

        return handle


# -- the partition key ----------------------------------------------------------------------------------------


def test_the_partition_key_is_the_patients_digest_and_never_its_identifier() -> None:
    ipp = Identifier("8812345", "CHU-X", type="PI")
    ins = Identifier("1840512345678", issuer_oid="1.2.250.1.213.1.4.8", type="INS")
    order = Envelope(ImagingOrder(patient=Patient(ids=[ins, ipp]))).to_json()
    update = Envelope(PatientUpdate(patient=Patient(ids=[ipp]))).to_json()
    document = Envelope(Document(report=Report(patient=Patient(ids=[ipp, ins])))).to_json()
    key = partition_key(order)
    assert key == partition_key(update) == partition_key(document) == patient_key("8812345")  # the IPP, not the INS
    assert len(key) == 4 and "8812345" not in key
    assert partition_key(Envelope(PatientUpdate(patient=Patient(ids=[Identifier("8812346")]))).to_json()) != key
    headers = partition_headers(order)
    assert headers == {PARTITION_KEY: key} and "8812345" not in json.dumps(headers)
    assert partition_key(Envelope(ImagingOrder()).to_json()) is None  # no patient: no key
    assert partition_headers(b"not json") == {} and partition_key(b'{"payload": 3}') is None
    old = Identifier("8800001", "CHU-X", type="PI")
    merge = PatientUpdate(action="merge", patient=Patient(ids=[ins, ipp]), merged_ids=[old])
    assert partition_key(Envelope(merge).to_json()) == patient_key("8800001")  # behind the merged-away patient


# -- topology ---------------------------------------------------------------------------------------------------


def listing(cluster: RabbitMQCluster, what: str, *columns: str) -> dict[str, list[str]]:
    result = cluster.ctl(what, "--quiet", "--no-table-headers", "name", *columns)
    rows = (line.split("\t") for line in result.stdout.splitlines())
    return {row[0]: [c.strip() for c in row[1:]] for row in rows if len(row) == len(columns) + 1}


async def test_a_partitioned_subscriber_is_quorum_queues_behind_a_consistent_hash_exchange(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """Each partition is a quorum queue with one active consumer; patients spread over the partitions, and the
    events without a patient all go to one of them."""
    bus = await make_bus(rabbitmq_cluster.urls())
    queue = unique_name("q")
    await bus.declare(queue, TOPICS)
    name = bus.queue_name(queue)
    partitions = [partition_name(name, p) for p in range(PARTITIONS)]
    queues = await asyncio.to_thread(listing, rabbitmq_cluster, "list_queues", "type", "arguments")
    assert {q: queues[q][0] for q in [*partitions, f"{name}.dlq"]} == dict.fromkeys(
        [*partitions, f"{name}.dlq"], "quorum"
    )
    assert all("x-single-active-consumer" in queues[q][1] for q in partitions)
    assert name not in queues  # no single queue besides the partitions
    exchanges = await asyncio.to_thread(listing, rabbitmq_cluster, "list_exchanges", "type")
    assert exchanges[hash_exchange_name(name)] == ["x-consistent-hash"]

    patients = journal(patients=40)[:120]
    await bus.publish_many([e.item() for e in patients])
    await bus.publish_many([("order.new", b"{}", f"keyless-{n}", None) for n in range(12)])

    def depths() -> dict[str, int]:
        rows = listing(rabbitmq_cluster, "list_queues", "messages")
        return {q: int(rows[q][0]) for q in partitions}

    counts = await eventually(lambda: asyncio.to_thread(depths), lambda d: sum(d.values()) == 132)
    assert sum(counts.values()) == 132 and await bus.depth(queue) == 132
    assert sum(1 for n in counts.values() if n) >= 3, counts  # the patients are spread

    # Drain, then the keyless events again: all in one partition.
    drained: list[str] = []

    async def take(delivery: Delivery) -> None:
        drained.append(delivery.message_id)

    consumer = await make_bus(rabbitmq_cluster.urls())
    await consumer.subscribe(queue, TOPICS, take)
    assert await eventually(lambda: now(len(drained)), lambda n: n == 132) == 132
    await consumer.close()
    await bus.publish_many([("order.new", b"{}", f"keyless-again-{n}", None) for n in range(10)])
    counts = await eventually(lambda: asyncio.to_thread(depths), lambda d: sum(d.values()) == 10)
    assert sorted(counts.values()) == [0] * (PARTITIONS - 1) + [10], counts


# -- a failing event holds its patient only ---------------------------------------------------------------------


async def test_a_failing_event_holds_back_its_patient_only_then_the_rest_follows_in_order(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """Patient 0's first event fails twice: its later events wait behind it (not overtaking it, as a retry at
    the queue's tail would), while the other patients, including those of its partition, are applied meanwhile.
    Patient 1's second event is refused (a permanent error): dead-lettered, its later events go on, and a replay
    brings it back through its partition."""
    urls = rabbitmq_cluster.urls()
    publisher = await make_bus(urls)
    consumer = await make_bus(urls, retry_backoff=0.4)  # patient 0 is held for 0.4 + 0.8 s
    queue = unique_name("q")
    events = journal(patients=16, seed=3)
    stuck = next(e for e in events if e.patient == "IPP00000")
    refused = [e for e in events if e.patient == "IPP00001"][1]
    applier = Applier.new()
    apply_event = applier.handler("node")
    attempts: dict[str, list[int]] = defaultdict(list)
    when: dict[str, float] = {}
    replayed = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        attempts[delivery.message_id].append(delivery.attempt)
        if delivery.message_id == stuck.message_id and delivery.attempt < 3:
            raise ConnectionError("peer down")
        if delivery.message_id == refused.message_id and not replayed.is_set():
            raise PermanentError("refused")
        await apply_event(delivery)
        when[delivery.message_id] = time.monotonic()

    await consumer.subscribe(queue, TOPICS, handle, max_attempts=5)
    await publisher.publish_many([e.item() for e in events])
    expected = {pid: [e.seq for e in events if e.patient == pid] for pid in {e.patient for e in events}}
    expected["IPP00001"] = [s for s in expected["IPP00001"] if s != refused.seq]
    assert await eventually(lambda: now(dict(applier.applied)), lambda a: a == expected) == expected
    assert attempts[stuck.message_id] == [1, 2, 3]  # retried in place, attempt numbers kept
    others = [e for e in events if e.patient != "IPP00000" and e.message_id != refused.message_id]
    # Everyone else was applied while patient 0 waited (16 patients on 4 partitions: some share its partition).
    assert max(when[e.message_id] for e in others) < when[stuck.message_id]

    dead = await consumer.dead_letters(queue)
    assert [d.message_id for d in dead] == [refused.message_id]
    assert dead[0].headers[PARTITION_KEY] == partition_key(refused.body)
    assert dead[0].headers["x-error"] == "PermanentError: refused"
    replayed.set()
    assert await consumer.replay_dead_letter(queue, refused.message_id)
    got = await eventually(lambda: now(applier.applied["IPP00001"]), lambda a: refused.seq in a)
    assert got[-1] == refused.seq  # a replay comes after the patient's later events (the contract says so)
    assert await consumer.dead_letters(queue) == []
    assert await eventually(lambda: consumer.depth(queue), lambda n: n == 0) == 0


async def test_a_merge_is_applied_after_the_earlier_events_of_the_patient_merged_away(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """An A08 of the old identifier fails once and waits for its retry; the A40 merging it into another patient,
    published after it, is keyed by the old identifier: it waits behind it, not applied first."""
    urls = rabbitmq_cluster.urls()
    consumer = await make_bus(urls, retry_backoff=0.3)
    queue = unique_name("q")
    update = Envelope(PatientUpdate(patient=patient("OLD0001", "BEFORE-MERGE")), source="adt")
    survivor = patient("NEW0001", "SURVIVOR")
    merge = Envelope(PatientUpdate(action="merge", patient=survivor, merged_ids=[Identifier("OLD0001", "CHU-X")]))
    applied: list[str] = []

    async def handle(delivery: Delivery) -> None:
        if delivery.message_id == update.id and delivery.attempt == 1:
            raise ConnectionError("peer down")
        applied.append(delivery.message_id)

    await consumer.subscribe(queue, TOPICS, handle)
    items = [(topic_of(e.payload), e.to_json(), e.id, partition_headers(e.to_json())) for e in (update, merge)]
    await consumer.publish_many(items)
    assert await eventually(lambda: now(list(applied)), lambda a: len(a) == 2) == [update.id, merge.id]


async def test_a_partition_whose_channel_closed_is_forgotten_and_its_new_owner_applies_it_alone(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """Node A holds a failing event (and its patient's later ones) when the broker closes that partition's channel
    alone (as ``consumer_timeout`` or a channel error does): the partition goes to node B, which applies the three
    in order, and A hands nothing over when its backoff ends (no stale event applied again, out of order)."""
    urls = rabbitmq_cluster.urls()
    node_a = await make_bus(urls, retry_backoff=1.0)
    node_b = await make_bus(rotated(urls, 1))
    queue = unique_name("q")
    calls: list[tuple[str, str, int]] = []

    def handler(node: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            calls.append((node, delivery.message_id, delivery.attempt))
            if node == "A" and delivery.message_id == "m1":
                raise ConnectionError("peer down")  # held on A for 1 s

        return handle

    await node_a.subscribe(queue, TOPICS, handler("A"))
    await node_b.subscribe(queue, TOPICS, handler("B"))  # standing by on every partition
    await node_a.publish_many([("order.new", b"{}", f"m{n}", {PARTITION_KEY: "abcd"}) for n in (1, 2, 3)])
    await eventually(lambda: now(list(calls)), lambda c: c == [("A", "m1", 1)])
    held = next(sub for sub in node_a._subscriptions if sub.blocked)
    assert held.queue is not None
    underlay = await held.queue.channel.get_underlay_channel()
    await underlay.basic_ack(delivery_tag=99999)  # unknown tag: the broker closes this channel, not the connection
    expected = [("A", "m1", 1), ("B", "m1", 1), ("B", "m2", 1), ("B", "m3", 1)]
    assert await eventually(lambda: now(list(calls)), lambda c: c == expected) == expected
    await asyncio.sleep(1.5)  # A's backoff is over
    assert calls == expected
    assert not held.blocked and held.held is None
    assert await node_b.depth(queue) == 0


async def test_an_event_that_could_not_be_settled_holds_its_patient_until_it_is(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first event of a patient is refused and its dead-lettering fails (the broker's publishing channel
    unusable for a moment): it is tried again in place, before its patient's later events, which a requeue would
    let overtake it."""
    consumer = await make_bus(rabbitmq_cluster.urls(), retry_backoff=0.2)
    queue = unique_name("q")
    await consumer.declare(queue, TOPICS)
    await consumer.publish_many([("order.new", b"{}", f"m{n}", {PARTITION_KEY: "abcd"}) for n in (1, 2, 3)])
    dead_letter = consumer._dead_letter
    failures = [BusUnavailableError("publishing channel closed")]

    async def failing_once(*args: Any) -> None:
        if failures:
            raise failures.pop()
        await dead_letter(*args)

    monkeypatch.setattr(consumer, "_dead_letter", failing_once)
    handled: list[str] = []

    async def handle(delivery: Delivery) -> None:
        if delivery.message_id == "m1" and failures:
            raise PermanentError("refused")  # refused while the dead letter cannot be published
        handled.append(delivery.message_id)

    await consumer.subscribe(queue, TOPICS, handle)
    assert await eventually(lambda: now(list(handled)), lambda h: len(h) == 3) == ["m1", "m2", "m3"]


async def test_a_subscriber_left_in_the_other_mode_is_refused(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """A node with partitions finding the subscriber's one queue (or one without finding its partitions) refuses
    it: both would be bound and every event consumed twice."""
    urls = rabbitmq_cluster.urls()
    single = await make_bus(urls, partitions=1)
    partitioned = await make_bus(urls)
    one, split = unique_name("one"), unique_name("split")
    await single.declare(one, TOPICS)
    await partitioned.declare(split, TOPICS)

    async def nothing(delivery: Delivery) -> None:
        raise AssertionError("nothing is consumed")

    with pytest.raises(ConfigError, match="partitions"):
        await partitioned.subscribe(one, TOPICS, nothing)
    with pytest.raises(ConfigError, match="partitions"):
        await single.declare(split, TOPICS)
    with pytest.raises(ConfigError, match="partitions"):
        await single.subscribe(split, TOPICS, nothing)
    queues = await asyncio.to_thread(listing, rabbitmq_cluster, "list_queues")
    assert partition_name(partitioned.queue_name(one), 0) not in queues
    assert single.queue_name(split) not in queues


async def test_sending_and_counting_open_few_channels(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partitioned subscriber's hash exchange is checked once, not at every send; its depth is read over one
    channel, not one per partition (each channel costs the broker a round trip and a process)."""
    bus = await make_bus(rabbitmq_cluster.urls())
    queue = unique_name("q")
    await bus.declare(queue, TOPICS)
    assert bus._connection is not None
    opened = 0
    channel = bus._connection.channel

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal opened
        opened += 1
        return channel(*args, **kwargs)

    monkeypatch.setattr(bus._connection, "channel", counting)
    for n in range(3):
        await bus.send(queue, [("order.new", b"{}", f"s{n}", {PARTITION_KEY: f"{n:04x}"})])
    assert opened == 1
    assert await eventually(lambda: bus.depth(queue), lambda d: d == 3) == 3
    opened = 0
    await bus.depth(queue)
    assert opened == 1


# -- a broker node killed under load ----------------------------------------------------------------------------


async def test_killing_a_broker_under_load_keeps_each_patients_order_and_loses_nothing(
    rabbitmq_cluster: RabbitMQCluster, make_bus: MakeBus
) -> None:
    """240 events of 40 patients published in journal order while the node holding the partitions' leaders
    (and the connections of the publisher and of the active engine node) is killed -9, then started again: each
    patient's events are applied exactly once, in journal order, on either engine node, and each patient ends in
    the state its last event gives."""
    urls = rabbitmq_cluster.urls()
    queue = unique_name("q")
    declarer = await make_bus(urls)
    await declarer.declare(queue, TOPICS)
    name = declarer.queue_name(queue)
    leaders = {rabbitmq_cluster.leader(partition_name(name, p)) for p in range(PARTITIONS)}
    victim = min(leaders)  # queues are led by the declaring client's node: every partition is on it
    publisher = await make_bus(rotated(urls, victim))
    first = await make_bus(rotated(urls, victim))  # the active consumer of every partition, on the victim
    second = await make_bus(rotated(urls, (victim + 1) % len(urls)))  # standing by, on a node that survives
    applier = Applier.new()
    await first.subscribe(queue, TOPICS, applier.handler("first"))
    await second.subscribe(queue, TOPICS, applier.handler("second"))

    events = journal(patients=40)
    confirmed: list[str] = []
    failures = 0
    killed = asyncio.Event()

    async def relay() -> None:
        """The outbox relay's way: batches in journal order, a failed batch published again whole (at least once)."""
        nonlocal failures
        for start in range(0, len(events), 5):
            batch = events[start : start + 5]
            while True:
                try:
                    await publisher.publish_many([e.item() for e in batch])
                    break
                except Exception:  # not confirmed: some may have arrived (published again: duplicates)
                    failures += 1
                    await asyncio.sleep(0.2)
            confirmed.extend(e.message_id for e in batch)
            await asyncio.sleep(0.05 if killed.is_set() else 0.02)

    began = time.monotonic()
    publishing = asyncio.create_task(relay())
    restarting: asyncio.Future[None] | None = None
    try:
        await eventually(lambda: now(len(confirmed)), lambda n: n >= 80)
        assert applier.by_node["first"] > 0 and applier.by_node["second"] == 0
        await asyncio.to_thread(rabbitmq_cluster.kill, victim)
        killed.set()
        await asyncio.sleep(1.0)
        restarting = asyncio.ensure_future(asyncio.to_thread(rabbitmq_cluster.start, victim))  # under load too
        await asyncio.wait_for(publishing, WAIT * 2)
        assert len(confirmed) == len(events)
        missing = await eventually(lambda: now(set(confirmed) - applier.done), lambda left: not left, wait=WAIT * 2)
        assert not missing, f"{len(missing)} confirmed events never applied ({failures} publishes failed)"
        await restarting

        expected_order = {pid: [e.seq for e in events if e.patient == pid] for pid in {e.patient for e in events}}
        assert dict(applier.applied) == expected_order  # each once, in journal order, per patient
        final: dict[str, dict[str, str]] = defaultdict(dict)
        for event in events:
            final[event.patient] = apply(final[event.patient], event.body)
        assert dict(applier.state) == dict(final)
        assert all(state["order"] == "cancelled" for state in final.values())
        assert applier.by_node["second"] > 0  # the standby took over the partitions
        assert publisher.url != f"{urls[victim]}?{RECONNECT}"
        duplicates = sum(n - 1 for n in applier.deliveries.values())
        print(
            f"ordered stream: {failures} publishes failed, {duplicates} duplicate deliveries skipped, "
            f"{time.monotonic() - began:.1f} s"
        )
        assert await second.dead_letters(queue) == []
        assert await eventually(lambda: second.depth(queue), lambda n: n == 0) == 0
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        if restarting is not None:
            await asyncio.gather(restarting, return_exceptions=True)
        await asyncio.to_thread(rabbitmq_cluster.start, victim)


# -- the engine ---------------------------------------------------------------------------------------------------


async def test_the_engine_publishes_each_patients_key_and_consumes_its_channels_by_partition(
    rabbitmq_cluster: RabbitMQCluster, tmp_path: Path
) -> None:
    """``[bus] partitions`` on a running engine: the outbox relay puts the patient's key on every event (the same
    for an order, its patient's A08 and its cancel), the worklist channel consumes its partitions, and the orders
    end as the journal says."""
    cfg = engine_config(tmp_path, ",".join(f"{u}?{RECONNECT}" for u in rabbitmq_cluster.urls()), unique_name("eng"))
    cfg.queue_type, cfg.partitions = "quorum", PARTITIONS
    spy = RabbitMQBus(rabbitmq_cluster.urls(), exchange=cfg.exchange, queue_type="quorum", partitions=PARTITIONS)
    seen: list[Delivery] = []

    async def keep(delivery: Delivery) -> None:
        seen.append(delivery)

    await spy.subscribe("spy", ["#"], keep)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        messages = ["orm_o01_nw_latin1.hl7", "omi_o23_nw_utf8.hl7", "adt_a08_update.hl7", "orm_o01_ca.hl7"]
        await send(runtime, *(fixture(m) for m in messages))
        await until(lambda: len(seen) == 4, timeout=WAIT)
        await until(lambda: store(runtime).count() == 1, timeout=WAIT)  # IPP0001's order cancelled, IPP0002's kept
        keys = {d.topic: d.headers.get(PARTITION_KEY) for d in seen}
        assert all(d.headers.get(PARTITION_KEY) == partition_key(d.body) for d in seen)
        assert keys["order.new"] is not None and keys["patient.update"] == keys["order.cancel"]
        assert {patient_key("IPP0001"), patient_key("IPP0002")} == set(keys.values())
        assert not any("IPP000" in json.dumps(d.headers) for d in seen)
        name = runtime.bus.queue_name("worklist")  # type: ignore[attr-defined]
        result = await asyncio.to_thread(
            rabbitmq_cluster.ctl, "list_consumers", "--quiet", "--no-table-headers", "queue_name", "active"
        )
        consumers = [line.split("\t") for line in result.stdout.splitlines() if line.startswith(f"{name}.")]
        assert sorted((q, active.strip()) for q, active in consumers) == [
            (partition_name(name, p), "true") for p in range(PARTITIONS)
        ], result.stdout
    finally:
        await runtime.stop()
        await spy.close()
        await remove(rabbitmq_cluster, cfg.exchange)


async def test_every_node_keys_its_events_whatever_its_own_partitions_setting(tmp_path: Path) -> None:
    """A node without partitions (here on the embedded bus) still puts the patient's key on what its relay
    publishes: were it the leader of a site whose other nodes consume partitioned, nothing would go keyless."""
    runtime = Runtime(engine_config(tmp_path))
    assert runtime.config.partitions == 1
    seen: list[Delivery] = []

    async def keep(delivery: Delivery) -> None:
        seen.append(delivery)

    await runtime.start()
    try:
        await runtime.bus.subscribe("spy", ["#"], keep)
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: len(seen) == 1, timeout=WAIT)
        assert seen[0].headers[PARTITION_KEY] == partition_key(seen[0].body) == patient_key("IPP0001")
    finally:
        await runtime.stop()
