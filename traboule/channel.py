"""What a channel is to the engine.

* `Channel`: what the runtime builds from a ``[[channels]]`` table and runs (``name``, ``start``, ``stop``,
  ``describe``), given a `ChannelRuntime`.
* The optional capabilities the engine looks for, each a small protocol checked with ``isinstance`` /
  ``issubclass``: `ConsumesQueues` (``bindings``: the queues the main process declares before it publishes),
  `ServesHTTP` (``routes``), `LimitsBodies` (``body_limits``), `ReportsHealth` (``health``), `HasMapping`
  (``mapping``: hashed by ``traboule reprocess``), `HasStore` (``store``: closed after a reprocess dry run).
* `Setting`: a channel's settings declared on its class (type, default, allowed values, bounds) and read when it is
  built; a wrong value is a `ConfigError` naming the channel and the setting (``traboule check`` prints it).
* `ConsumerChannel` / `BatchConsumerChannel`: the base of a channel that consumes bus topics (its queue is named
  after it, bound to its ``topics`` setting, consumed with ``max_attempts``); each delivery is decoded and handled
  with the channel, the message id and the correlation id bound to every log line (structlog contextvars), and its
  outcome recorded in the delivery log (`traboule.stores.delivery_log`: applied, duplicate, error, dead_letter),
  with the short detail the channel gave with `note`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, overload, runtime_checkable

import structlog

from traboule import metrics
from traboule.bus import Bus, Delivery
from traboule.bus.retry import DeadLetter, RetryPolicy
from traboule.errors import ConfigError
from traboule.model import Envelope
from traboule.stores.delivery_log import DeliveryRecord, DeliveryRecorder

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from traboule.stores import Journal
    from traboule.stores.factory import StoreFactory
    from traboule.translate.mapping import CodeTable

T = TypeVar("T")


class ChannelRuntime(Protocol):
    """What a channel may use of the engine process that runs it. At the start-up check (``traboule check``, and
    ``traboule run`` before anything listens) a channel is built against a scratch ``data_dir`` where ``bus`` and
    ``journal`` are None and ``stores`` opens SQLite files in that folder: read settings and open stores in
    ``__init__``, connect and listen in ``start``."""

    config: Any  # the whole configuration (``traboule.app.config.Config``: the core does not import the app)
    data_dir: Path  # the channel's files go here, named after the channel (``<name>.sqlite``)
    process: str | None  # the process name; None when every channel runs in one process
    journal: Journal | None  # in the main process only
    bus: Bus
    processes: dict[str, Any]
    stores: StoreFactory  # where the channel's stores are (SQLite files or PostgreSQL): open them through it


class Channel(Protocol):
    """What the runtime needs of a channel. A channel is built from its ``[[channels]]`` table."""

    name: str

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


# -- optional capabilities --------------------------------------------------------------------------------------


@runtime_checkable
class ConsumesQueues(Protocol):
    """A channel class that names the bus queues it consumes and their topics: ``[(queue, topics)]``. The main
    process declares them before it publishes anything, so a channel of another process misses nothing."""

    @classmethod
    def bindings(cls, config: dict[str, Any]) -> list[tuple[str, list[str]]]: ...


@runtime_checkable
class ServesHTTP(Protocol):
    """A channel that serves HTTP routes (an API, a webhook) on the engine's HTTP port."""

    def routes(self) -> list[BaseRoute]: ...


@runtime_checkable
class LimitsBodies(Protocol):
    """A channel whose routes take request bodies of their own size limit: path → bytes."""

    def body_limits(self) -> dict[str, int]: ...


@runtime_checkable
class ReportsHealth(Protocol):
    """A channel that reports its destinations' state for ``/health`` (``traboule.app.health.channel_health``):
    a ``state`` other than ``ok`` or ``unknown`` makes the process ``degraded``."""

    def health(self) -> dict[str, Any]: ...


class MappingFile(Protocol):
    """A loaded mapping file: where it is and the code tables it loaded."""

    path: Path
    tables: dict[str, CodeTable]


@runtime_checkable
class HasMapping(Protocol):
    """A channel rendering through a mapping file: ``traboule reprocess`` tells its output apart by its hash."""

    mapping: MappingFile


class Store(Protocol):
    """A channel's own store: its file and how to close it."""

    path: str

    def close(self) -> None: ...


@runtime_checkable
class HasStore(Protocol):
    """A channel keeping its output in a store of its own (``<data_dir>/<name>.sqlite``)."""

    store: Store


# -- settings ---------------------------------------------------------------------------------------------------

_KINDS: dict[type, str] = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    list: "a list of text values",
}


class Setting(Generic[T]):
    """One setting of a channel's ``[[channels]]`` table, declared on the channel's class::

        class HL7StatusChannel(ConsumerChannel):
            message = Setting(str, "ORM^O01", choices=("ORM^O01", "OMI^O23"))
            retry_window = Setting(float, 60.0, minimum=0)

    `read_settings` (called by the consumer bases) reads every declared setting into the instance: an absent key
    takes ``default``; a value of another type, outside ``choices`` or the bounds is a `ConfigError`
    ``channel NAME: KEY must be …, not VALUE``. Types: ``bool`` (true/false only), ``int`` (also a whole number
    written as text, as an environment variable gives it), ``float``, ``str``, ``list`` (of non-empty text).
    ``key``: the table's key when it is not the attribute's name (``vihf.lifetime``: a key of a sub-table)."""

    def __init__(
        self,
        kind: type[T],
        default: T,
        *,
        choices: Sequence[T] = (),
        minimum: float | None = None,
        maximum: float | None = None,
        key: str = "",
    ) -> None:
        if kind not in _KINDS:
            raise TypeError(f"a setting is one of {[k.__name__ for k in _KINDS]}, not {kind!r}")
        self.kind = kind
        self.default = default
        self.choices = tuple(choices)
        self.minimum = minimum
        self.maximum = maximum
        self.key = key
        self.name = key

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.key = self.key or name

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Setting[T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> Setting[T] | T:
        if obj is None:
            return self
        # Reached only before `read_settings` put the value in the instance (a non-data descriptor yields to it).
        raise AttributeError(f"setting {self.name!r} is read by read_settings() in the channel's __init__")

    def read(self, config: Mapping[str, Any], channel: str) -> T:
        """The setting's value in ``config`` (the channel's table), checked; ``ConfigError`` naming it. A dotted
        key (``vihf.lifetime``) names a key of a sub-table."""
        node: Any = config
        *tables, last = self.key.split(".")
        for depth, table in enumerate(tables):
            node = node.get(table)
            if node is None:
                return copy.copy(self.default)
            if not isinstance(node, Mapping):
                raise ConfigError(f"channel {channel}: {'.'.join(tables[: depth + 1])} must be a table, not {node!r}")
        if last not in node:
            return copy.copy(self.default)
        raw = node[last]
        value = self._typed(raw, channel)
        if self.choices and value not in self.choices:
            allowed = [str(c) for c in self.choices]
            said = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            raise self.error(channel, f"must be {said}, not {raw!r}")
        if self.minimum is not None and value < self.minimum:  # type: ignore[operator]
            raise self.error(channel, f"must be at least {_number(self.minimum)}, not {raw!r}")
        if self.maximum is not None and value > self.maximum:  # type: ignore[operator]
            raise self.error(channel, f"must be at most {_number(self.maximum)}, not {raw!r}")
        return value

    def error(self, channel: str, text: str) -> ConfigError:
        """``channel NAME: KEY text``: the error of a value this setting refuses."""
        return ConfigError(f"channel {channel}: {self.key} {text}")

    def _typed(self, raw: Any, channel: str) -> T:
        wrong = self.error(channel, f"must be {_KINDS[self.kind]}, not {raw!r}")
        if self.kind is bool:
            if not isinstance(raw, bool):
                raise wrong
            return raw  # type: ignore[return-value]
        if self.kind is str:
            if not isinstance(raw, str):
                raise wrong
            return raw  # type: ignore[return-value]
        if self.kind is list:
            if not isinstance(raw, list | tuple) or not all(isinstance(v, str) and v for v in raw):
                raise wrong
            return list(raw)  # type: ignore[return-value]
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise wrong
        try:
            number = float(raw)
        except ValueError:
            raise wrong from None
        if not math.isfinite(number):
            raise wrong
        if self.kind is int:
            if not number.is_integer():
                raise wrong
            return int(number)  # type: ignore[return-value]
        return number  # type: ignore[return-value]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def settings_of(cls: type) -> dict[str, Setting[Any]]:
    """The settings a channel class declares (its own and its bases'; a subclass's declaration wins)."""
    found: dict[str, Setting[Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, attr in vars(klass).items():
            if isinstance(attr, Setting):
                found[name] = attr
            elif name in found:  # a subclass replaced the setting by a plain attribute
                del found[name]
    return found


def read_settings(channel: object, config: Mapping[str, Any], name: str) -> None:
    """Read every setting ``channel``'s class declares from ``config`` into the instance (``channel.KEY``)."""
    for attribute, setting in settings_of(type(channel)).items():
        vars(channel)[attribute] = setting.read(config, name)


# -- consumers --------------------------------------------------------------------------------------------------


_PLAIN_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,64}")


def loggable_id(value: str) -> str:
    """An identifier a sender chose (MSH-10, an event id), as a log line may carry it: itself when short and plain,
    else a digest of it, so that a hostile value never reaches the log as it came (length, control characters)."""
    if not value or _PLAIN_ID.fullmatch(value):
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@contextmanager
def delivery_context(channel: str, env: Envelope | None = None) -> Iterator[None]:
    """Bind the channel (and the event's message id and correlation id) to every log line written inside."""
    if env is None:
        with structlog.contextvars.bound_contextvars(channel=channel):
            yield
        return
    ids = {"message_id": loggable_id(env.id), "correlation_id": loggable_id(env.correlation_id)}
    with structlog.contextvars.bound_contextvars(channel=channel, **ids):
        yield


_RECORDER_LOCK = threading.Lock()


def delivery_recorder(runtime: Any) -> DeliveryRecorder | None:
    """The recorder writing to the delivery log of ``runtime``'s stores (one per store factory: per process), None
    when its stores have no delivery log (a tool or a test double)."""
    stores = getattr(runtime, "stores", None)
    if stores is None or not hasattr(stores, "delivery_log"):
        return None
    with _RECORDER_LOCK:
        recorder = getattr(stores, "_delivery_recorder", None)
        if recorder is None:
            recorder = DeliveryRecorder(stores.delivery_log)
            try:
                stores._delivery_recorder = recorder
            except AttributeError:  # a factory that takes no attribute: no log
                return None
        return recorder


def record_deliveries(
    runtime: Any,
    channel: str,
    items: Sequence[tuple[str, str, int]],
    notes: dict[str, tuple[str, str]],
    error: BaseException | None,
    max_attempts: int,
) -> None:
    """Record the outcome of deliveries ``[(key, correlation id, attempt)]`` handled by ``channel`` (never raises):
    ``applied`` or what the channel noted (``notes``: key → (outcome, detail), taken out), else ``error`` with the
    exception's class, ``dead_letter`` when the bus dead-letters a single delivery after this failure."""
    try:
        recorder = delivery_recorder(runtime)
        for key, correlation_id, attempt in items:
            outcome, detail = notes.pop(key, ("applied", ""))
            if error is not None:
                final = (
                    len(items) == 1
                    and isinstance(error, Exception)
                    and isinstance(RetryPolicy(max_attempts).after_failure(error, attempt), DeadLetter)
                )
                outcome = "dead_letter" if final else "error"
                detail = f"{type(error).__name__} (attempt {attempt})" + (f"; {detail}" if detail else "")
            if recorder is not None:
                recorder.add(DeliveryRecord(key, correlation_id, channel, outcome, detail))
    except Exception as exc:  # a log for people: never the delivery's outcome
        structlog.get_logger("traboule.channel").warning("delivery_log.record_failed", error=type(exc).__name__)


@contextmanager
def recording(
    runtime: Any,
    channel: str,
    items: Sequence[tuple[str, str, int]],
    notes: dict[str, tuple[str, str]],
    max_attempts: int,
) -> Iterator[None]:
    """`record_deliveries` of what the block does (the engine stopping is no outcome)."""
    try:
        yield
    except asyncio.CancelledError:
        for key, _, _ in items:
            notes.pop(key, None)
        raise
    except BaseException as exc:
        record_deliveries(runtime, channel, items, notes, exc, max_attempts)
        raise
    record_deliveries(runtime, channel, items, notes, None, max_attempts)


class _BusConsumer:
    """What the two consumer bases share: settings, topics, the queue's bindings, describe, `note`."""

    kind: ClassVar[str] = ""
    # A kind declares its own default topics; none is no default: "#" would also bind the engine's internal messages
    # (a fhir channel's push messages...), which are not events and would end in the dead letters.
    topics = Setting(list, [])
    max_attempts = Setting(int, 5, minimum=1)

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime) -> None:
        """Reads and checks every declared setting (`ConfigError` naming the one refused)."""
        self.name: str = str(config["name"])
        self.config = config
        self.runtime = runtime
        read_settings(self, config, self.name)
        self.topics = self.topics_of(config)
        self._notes: dict[str, tuple[str, str]] = {}

    @classmethod
    def topics_of(cls, config: Mapping[str, Any]) -> list[str]:
        """The topics the channel's queue is bound to: its ``topics`` setting, else the kind's default."""
        name = str(config.get("name", "?"))
        topics = cls.topics.read(config, name)
        if not topics:
            raise ConfigError(f'channel {name}: topics must name what to consume (e.g. ["order.#"])')
        return topics

    @classmethod
    def bindings(cls, config: dict[str, Any]) -> list[tuple[str, list[str]]]:
        """The queue this channel consumes: its name, bound to its topics."""
        return [(str(config["name"]), cls.topics_of(config))]

    async def stop(self) -> None:
        """Close what ``__init__`` and ``start`` opened (nothing here)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": [f"bus:{t}" for t in self.topics]}

    def bound(self, env: Envelope) -> AbstractContextManager[None]:
        """The log context of one event (for a batch consumer's per-event work)."""
        return delivery_context(self.name, env)

    def note(self, env: Envelope, detail: str, outcome: str = "applied") -> None:
        """What the delivery log says of ``env`` once handled: a short ``detail`` (kinds, counts, versions, codes;
        never patient data) and the ``outcome`` (``applied`` or ``duplicate``; a raised exception makes it an
        error whatever was noted)."""
        self._notes[env.idempotency_key] = (outcome, detail)

    def recording(self, envelopes: Sequence[Envelope], deliveries: Sequence[Delivery]) -> AbstractContextManager[None]:
        items = [(e.idempotency_key, e.correlation_id, d.attempt) for e, d in zip(envelopes, deliveries, strict=True)]
        return recording(self.runtime, self.name, items, self._notes, self.max_attempts)


class ConsumerChannel(_BusConsumer):
    """A channel consuming its topics one delivery at a time (``bus.subscribe``).

    A kind sets ``kind``, its default ``topics`` (``topics = Setting(list, ["document.#"])``), the payload types
    it handles (``accepts``: other events are acknowledged and left) and implements `on_event`. The bus handler
    `handle` decodes the envelope and calls `on_event` with the channel, message id and correlation id bound to
    every log line. An exception makes the bus retry (then dead-letter after ``max_attempts``); raise
    ``traboule.bus.PermanentError`` when a retry cannot help."""

    accepts: ClassVar[tuple[type, ...]] = ()  # empty: every payload

    async def start(self) -> None:
        await self.runtime.bus.subscribe(self.name, self.topics, self.handle, max_attempts=self.max_attempts)

    async def handle(self, delivery: Delivery) -> None:
        env = Envelope.from_json(delivery.body)
        if self.accepts and not isinstance(env.payload, self.accepts):
            return
        with delivery_context(self.name, env), metrics.delivering(self.name), self.recording([env], [delivery]):
            await self.on_event(env, delivery)

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        raise NotImplementedError


class BatchConsumerChannel(_BusConsumer):
    """A channel consuming lists of up to ``max_batch`` deliveries (``bus.subscribe_batch``), to apply them in one
    transaction. `handle` decodes them and calls `on_batch` with the channel bound to every log line; the kind
    binds each event's ids around its own work with `bound`."""

    max_batch = Setting(int, 100, minimum=1)

    async def start(self) -> None:
        await self.runtime.bus.subscribe_batch(
            self.name, self.topics, self.handle, max_attempts=self.max_attempts, max_batch=self.max_batch
        )

    async def handle(self, deliveries: list[Delivery]) -> None:
        envelopes = [Envelope.from_json(d.body) for d in deliveries]
        with (
            delivery_context(self.name),
            metrics.delivering(self.name, len(deliveries)),
            self.recording(envelopes, deliveries),
        ):
            await self.on_batch(envelopes, deliveries)

    async def on_batch(self, envelopes: list[Envelope], deliveries: list[Delivery]) -> None:
        raise NotImplementedError
