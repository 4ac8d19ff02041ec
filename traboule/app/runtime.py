"""Channel runtime: finds channel kinds through entry points, starts the configured channels around one journal
and one bus, and moves journaled events from the outbox to the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import structlog

from traboule import metrics, stores
from traboule.app.audit_trail import AuditTrail
from traboule.app.bus_backend import make_bus
from traboule.app.config import DEFAULT_CHANNELS, Config
from traboule.app.health import Probe, Probed
from traboule.app.leadership import while_leading
from traboule.bus import Bus
from traboule.bus.partition import partition_headers
from traboule.channel import Channel, ConsumesQueues, LimitsBodies, ReportsHealth, ServesHTTP
from traboule.errors import ConfigError, MappingError
from traboule.stores.factory import PostgresStores, SQLiteStores, StoreFactory

log = structlog.get_logger("traboule.app.runtime")

# Built-in kinds, also declared as entry points; listed here too so that they resolve even when the installed
# metadata is older than the source (an editable install made before a kind was added).
BUILTIN_CHANNELS = {
    "hl7-orders": "traboule.channels.orders:OrdersChannel",
    "worklist": "traboule.channels.worklist:WorklistChannel",
    "archive": "traboule.channels.archive:ArchiveChannel",
    "mpps": "traboule.channels.mpps:MPPSChannel",
    "hl7-status": "traboule.channels.hl7_status:HL7StatusChannel",
    "fhir": "traboule.channels.fhir:FHIRChannel",
    "hl7-documents": "traboule.channels.hl7_documents:HL7DocumentsChannel",
    "xds": "traboule.channels.xds:XDSChannel",
}
BUILTIN_ADAPTERS = {
    "mllp-listener": "traboule.adapters.mllp:MLLPListener",
    "mwl-scp": "traboule.adapters.dicom_mwl:WorklistSCP",
    "worklist-files": "traboule.adapters.worklist_files:WorklistFileWriter",
    "rabbitmq-bus": "traboule.adapters.rabbitmq:RabbitMQBus",
    "mpps-scp": "traboule.adapters.dicom_mpps:MPPSSCP",
    "mllp-sender": "traboule.adapters.mllp:MLLPClient",
    "dicomweb-client": "traboule.adapters.dicomweb:DICOMwebClient",
}


DISPATCH_PAUSE = 0.01  # seconds
DISPATCH_BATCH = 500
OUTBOX_POLL = 1.0  # seconds between two looks at an empty outbox: this process's own appends wake it at once
# The same on a database shared by several nodes: the events the other nodes journal cannot wake this one (an
# indexed look at an empty outbox, ten a second, on the leader only).
SHARED_OUTBOX_POLL = 0.1


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    mod = __import__(module, fromlist=[attr])
    return getattr(mod, attr)


def installed(group: str) -> dict[str, str]:
    """Installed plug-ins of a group (``traboule.channels`` / ``traboule.adapters``): name → ``module:attr``."""
    found = dict(BUILTIN_CHANNELS if group == "traboule.channels" else BUILTIN_ADAPTERS)
    for ep in entry_points(group=group):
        found[ep.name] = ep.value
    return found


def channel_class(kind: str) -> type:
    kinds = installed("traboule.channels")
    if kind not in kinds:
        raise ConfigError(f"channel kind {kind!r} is not installed (installed: {sorted(kinds)})")
    return _load(kinds[kind])


def process_of(channel_config: dict[str, Any]) -> str:
    return str(channel_config.get("process", "main"))


def channel_bindings(channel_config: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The bus queues a configured channel consumes (its class says, from its configuration)."""
    cls = channel_class(channel_config["kind"])
    return list(cls.bindings(channel_config)) if issubclass(cls, ConsumesQueues) else []


def make_stores(config: Config) -> StoreFactory:
    """The stores of the configuration: PostgreSQL when ``[database] url`` is set (the stores it implements; see
    `traboule.stores.factory`), else SQLite files in the data folder."""
    min_free = config.min_free_disk_mb * 1024 * 1024
    if config.database_url:
        return PostgresStores(config.database_url, config.data_dir, min_free_bytes=min_free)
    return SQLiteStores(config.data_dir, min_free_bytes=min_free)


def check_database(config: Config) -> None:
    """With ``[database] url``: the database answers (``ConnectionError``), none of its schemas is newer than this
    code and the configuration fits it (``ConfigError``), nothing written. The database holds one worklist and one
    FHIR store: two ``worklist`` (or ``fhir``) channels would share it, each applying part of the events."""
    if not config.database_url:
        return
    for kind in ("worklist", "fhir"):
        names = [str(c.get("name", "?")) for c in config.channels if c.get("kind") == kind]
        if len(names) > 1:
            raise ConfigError(
                f"channels {', '.join(names)}: with [database] url every {kind} channel shares the database's one"
                f" {kind} store; configure a single {kind} channel"
            )
    make_stores(config).check()


def preflight(config: Config, *, database: bool = True) -> list[str]:
    """Build every configured channel, whichever process runs it, against a scratch data folder: a mapping,
    table, certificate or setting error stops the engine before anything listens (a worker that cannot start
    would otherwise restart in a loop behind a main process answering AA). Returns the channels checked.

    The channels' stores are SQLite files in the scratch folder whatever the backend: the check never writes into
    the engine's database; `check_database` reaches it (connection and schema versions) instead, unless
    ``database`` is False (the caller reaches it itself).

    Raises `MappingError` (file and line) or `ConfigError` naming the channel; ``ConnectionError`` when the
    configured database cannot be reached."""
    checked = []
    if database:
        check_database(config)
    with tempfile.TemporaryDirectory(prefix="traboule-check-") as scratch:
        scratch_config = copy.deepcopy(config)
        scratch_config.data_dir = scratch
        probe = _Probe(scratch_config, Path(scratch))
        for channel_config in config.channels:
            name = channel_config.get("name", "?")
            cls = channel_class(channel_config["kind"])
            try:
                # Built and dropped: nothing listens before start(); its files are in the scratch folder.
                cls(copy.deepcopy(channel_config), probe)
            except (MappingError, ConfigError):
                raise
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise ConfigError(f"channel {name}: {exc}") from exc
            checked.append(f"{name} ({channel_config['kind']}, process {process_of(channel_config)})")
    check_listeners(config)
    return checked


# The adapters that listen, with the port they take when the configuration names none (their own defaults).
LISTENERS = {"mllp-listener": ("MLLP", 2575), "mwl-scp": ("MWL", 11112), "mpps-scp": ("MPPS", 11113)}
WILDCARDS = {"", "0.0.0.0", "::"}


def check_listeners(config: Config) -> None:
    """Refuse (``ConfigError``) two listeners on one address: MLLP listeners, DICOM SCPs and the processes' HTTP
    ports, whichever channels and processes they belong to (a wildcard host overlaps every host). Only the first
    would bind; the process of the other would stop with "address already in use" after the check said ok."""
    # (host, port, what listens, the channel's name or "" for a process's HTTP port)
    listening: list[tuple[str, int, str, str]] = [
        (config.http_host, config.http_port_of(p), f"the HTTP port of process {p}", "") for p in config.processes()
    ]
    for channel_config in config.channels:
        name = str(channel_config.get("name", "?"))
        destinations = channel_config.get("destinations")
        for endpoint in [channel_config.get("source"), *(destinations if isinstance(destinations, list) else [])]:
            if not isinstance(endpoint, dict) or endpoint.get("adapter") not in LISTENERS:
                continue
            what, default_port = LISTENERS[endpoint["adapter"]]
            try:
                port = int(endpoint.get("port", default_port))
            except (TypeError, ValueError):
                continue  # the channel's own check says what is wrong with it
            listening.append((str(endpoint.get("host", "127.0.0.1")), port, f"channel {name} ({what})", name))
    defaults = {c["name"] for c in DEFAULT_CHANNELS}
    clashes, with_default = [], []
    for n, (host, port, owner, channel) in enumerate(listening):
        for other_host, other_port, other, other_channel in listening[:n]:
            same_host = host == other_host or host in WILDCARDS or other_host in WILDCARDS
            if port != other_port or port == 0 or not same_host:
                continue
            clashes.append(f"{other} and {owner} both listen on {other_host}:{port}")
            if channel and other_channel and channel != other_channel:
                with_default += [c for c in (other_channel, channel) if c in defaults and c not in with_default]
    if not clashes:
        return
    text = "; ".join(clashes) + ": only one can bind an address, give one of them another port"
    if with_default:
        text += (
            f". {', '.join(with_default)}: default channel(s); a configuration written for the former defaults"
            " sets `[engine] defaults = false` (only its own channels), or names its channel as the default one"
            " to change that one rather than add another"
        )
    raise ConfigError(text)


@dataclass(frozen=True)
class RemoteRoute:
    """An HTTP route a channel of another process serves: the main process forwards it to that process's port."""

    path: str  # the route's template, e.g. /fhir/{type}/{id}
    methods: frozenset[str] | None  # None: every method
    process: str


def indexing_process(config: Config) -> str:
    """The process that keeps the journal's search index: the second of the configuration when there are several
    (reading every message's keys is work of its own: off the receiving process's core and interpreter, which
    answer the senders), else main. It reads the journal's file (or database) as any reader does."""
    names = config.processes()
    return names[1] if len(names) > 1 else "main"


def remote_routes(config: Config, process: str | None) -> tuple[list[RemoteRoute], dict[str, int]]:
    """The routes (and their request body limits) that channels of the other processes serve, for the main
    process to answer them on its own port. Learnt as `preflight` does, by building those channels against a
    scratch folder (nothing listens), so a channel declares its routes once, in its ``routes()``."""
    if process != "main":
        return [], {}
    remote = [
        c for c in config.channels if process_of(c) != "main" and issubclass(channel_class(c["kind"]), ServesHTTP)
    ]
    found: list[RemoteRoute] = []
    limits: dict[str, int] = {}
    if not remote:
        return found, limits
    with tempfile.TemporaryDirectory(prefix="traboule-routes-") as scratch:
        scratch_config = copy.deepcopy(config)
        scratch_config.data_dir = scratch
        probe = _Probe(scratch_config, Path(scratch))
        for channel_config in remote:
            channel = channel_class(channel_config["kind"])(copy.deepcopy(channel_config), probe)
            for route in channel.routes():
                methods = getattr(route, "methods", None)
                where = process_of(channel_config)
                found.append(RemoteRoute(route.path, frozenset(methods) if methods else None, where))
            if isinstance(channel, LimitsBodies):
                limits.update(channel.body_limits())
    return found, limits


@dataclass
class _Probe:
    """What a channel's constructor may read of its runtime, for `preflight`: its stores in the scratch folder."""

    config: Config
    data_dir: Path
    process: str | None = None
    journal: Any = None
    bus: Any = None
    processes: dict[str, Any] = field(default_factory=dict)
    stores: StoreFactory = field(init=False)

    def __post_init__(self) -> None:
        self.stores = SQLiteStores(self.data_dir)


@dataclass
class ProcessState:
    """A child process as its supervisor sees it (reported by the main process's /health)."""

    name: str
    port: int
    state: str = "starting"  # starting | ready | restarting | stopped
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def set(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.since = datetime.now(UTC).isoformat(timespec="seconds")

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "since": self.since,
        }


class Runtime:
    """One engine process: bus + the channels of this process (+ journal and outbox dispatcher in "main").

    ``process``: run only the channels whose ``process`` setting names it (``main`` by default); None runs every
    channel in this one process (tests, tools).
    """

    def __init__(self, config: Config, process: str | None = None):
        self.config = config
        self.process = process
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal: stores.Journal | None = None
        self.stores: StoreFactory = make_stores(config)
        shared = process is not None and len(config.processes()) > 1
        self.bus: Bus = make_bus(
            config.amqp_url,
            str(self.data_dir),
            exchange=config.exchange,
            shared=shared,
            queue_type=config.queue_type,
            partitions=config.partitions,
        )
        # The audit trail (`traboule.audit.trail_of(runtime)`): every process records; the main one sends.
        self._audit_trail = AuditTrail(config, relay=process in (None, "main")) if config.audit.enabled else None
        self.audit: Any = self._audit_trail  # what `trail_of` reads (a test may put another trail there)
        self.channels: list[Channel] = [
            channel_class(c["kind"])(c, self) for c in config.channels if process is None or process_of(c) == process
        ]
        self._dispatcher: asyncio.Task | None = None
        self.outbox_lease: Any = None  # the "outbox" lease of the journal's process (one dispatcher per database)
        self.journal_indexer: Any = None  # keeps the journal's search index (`stores.journal_search()`) up to date
        self.alerts: Any = None  # evaluates the [alerts] rules (`traboule.app.alerts.AlertEngine`)
        self._stopping = asyncio.Event()
        self.started = False
        self.processes: dict[str, ProcessState] = {}  # the children of the main process, filled by its supervisor
        self._health_probe: Probe[dict[str, Any]] = Probe(self._stores_state)  # /health's queries, off the loop

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite"

    def _open_journal(self) -> stores.Journal:
        """The journal of the store factory: on PostgreSQL when ``[database] url`` is set (its schema upgraded or,
        when newer than this code, refused), else the SQLite file of the data folder."""
        return self.stores.journal()

    @property
    def owns_journal(self) -> bool:
        """The process that receives messages keeps the journal and publishes its outbox (while it holds the
        "outbox" lease: one node of a shared database at a time)."""
        return self.process in (None, "main")

    async def start(self) -> None:
        if self.owns_journal:
            self.journal = self._open_journal()
        await self.bus.start()
        if self.owns_journal:
            # Every consuming channel's queue, in this process or another, exists before the first event is
            # published: an event published to a topic nobody has bound yet would be dropped.
            for cfg in self.config.channels:
                for queue, topics in channel_bindings(cfg):
                    await self.bus.declare(queue, topics)
        for channel in self.channels:
            await channel.start()
            log.info(
                "channel.started", channel=channel.name, process=self.process or "main", **_public(channel.describe())
            )
        if self.owns_journal:
            self.outbox_lease = self.stores.lease("outbox")
            self._dispatcher = asyncio.create_task(self._lead_outbox(), name="outbox-lease")
            if self.config.alerts is not None and self.config.alerts.rules:
                from traboule.app.alerts import AlertEngine

                self.alerts = AlertEngine(self, self.config.alerts)  # one node evaluates: the "alerts" lease
                self.alerts.start()
        if self.process is None or self.process == indexing_process(self.config):
            from traboule.app.journal_indexer import JournalIndexer

            self.journal_indexer = JournalIndexer(self.stores, self.config)  # the journal's search index
            self.journal_indexer.start()
        if self._audit_trail is not None:
            await self._audit_trail.start()
            if self.owns_journal:
                self._audit_trail.started(self.config)
        self.started = True

    async def stop(self) -> None:
        self._stopping.set()
        if self._audit_trail is not None and self.owns_journal and self.started:
            self._audit_trail.stopping()
        if self.alerts is not None:  # first: channels stopping are no incident
            await self.alerts.stop()
        for channel in reversed(self.channels):
            with contextlib.suppress(Exception):
                await channel.stop()
        if self._dispatcher:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._dispatcher
        if self.outbox_lease is not None:
            with contextlib.suppress(Exception):
                await self.outbox_lease.release()
        if self.journal_indexer is not None:
            await self.journal_indexer.stop()
        with contextlib.suppress(Exception):
            await self.bus.close()
        recorder = getattr(self.stores, "_delivery_recorder", None)  # what the consumers did: written now
        if recorder is not None:
            await asyncio.to_thread(recorder.close)
        self._health_probe.close()
        if self.journal:
            self.journal.close()
        if self._audit_trail is not None:  # last: what the channels recorded while stopping is written too
            await self._audit_trail.close()

    def health(self) -> dict[str, Any]:
        """This process's state: ``ok``, ``degraded`` (the bus or the journal's database unreachable, a destination
        failing) or ``starting``; the bus, the outbox backlog and each channel's destinations. The stores are asked
        here and now (blocking); /health asks `health_report`, which never holds the event loop."""
        return self._health_body(Probed(self._stores_state()))

    async def health_report(self) -> dict[str, Any]:
        """`health` for /health: on PostgreSQL the stores are asked off the event loop (`traboule.app.health.Probe`:
        one probe at a time, awaited at most ``PROBE_DEADLINE_S``, its answer kept ``PROBE_TTL_S``), so that a
        database host that does not answer never holds the ingest loop; past the deadline ``database`` is
        ``unknown`` and among the problems. SQLite's files are on the local disk: asked at once."""
        if getattr(self.stores, "backend", "") != "postgresql":
            return self.health()
        return self._health_body(await self._health_probe.get())

    def _stores_state(self) -> dict[str, Any]:
        """What /health asks the stores (blocking: queries to their database): the outbox backlog, each channel's
        health."""
        state: dict[str, Any] = {}
        if self.journal is not None:
            try:
                state["outbox_pending"] = self.journal.outbox_depth()
            except Exception as exc:  # the journal's database does not answer (PostgreSQL down): said, not a 500
                state["database"] = {"connected": False, "error": type(exc).__name__}
        channels: dict[str, Any] = {}
        for channel in self.channels:
            if not isinstance(channel, ReportsHealth):
                continue
            try:
                channels[channel.name] = channel.health()
            except Exception as exc:  # its store does not answer (the database down): said, not a 500
                channels[channel.name] = {"state": "down", "error": type(exc).__name__}
        state["channels"] = channels
        return state

    def _health_body(self, probed: Probed[dict[str, Any]]) -> dict[str, Any]:
        """The /health body from the stores' answer (`_stores_state`), or from its absence (no answer in time)."""
        bus = self.bus.state()
        body: dict[str, Any] = {"process": self.process or "main", "pid": os.getpid(), "bus": bus}
        problems = [] if bus.get("connected") else ["bus"]
        state = probed.value or {}
        if probed.value is None:  # the probe found no answer by its deadline (or failed as a whole)
            body["database"] = {"connected": "unknown", "error": probed.error or "timeout"}
            problems.append("database")
        if self.journal is not None:
            body["outbox"] = self.outbox_role
            if "outbox_pending" in state:
                body["outbox_pending"] = state["outbox_pending"]
            if "database" in state:
                body["database"] = state["database"]
                problems.append("database")
            free, reserve = self.journal.disk_free(), self.journal.min_free_bytes
            body["disk"] = {"free_bytes": free, "reserve_bytes": reserve}
            if free < reserve:
                problems.append("disk")
        channels: dict[str, Any] = state.get("channels", {})
        for name, channel_state in channels.items():
            if channel_state.get("state") not in (None, "ok", "unknown"):
                problems.append(name)
        if channels:
            body["channels"] = channels
        trail = getattr(self, "_audit_trail", None)
        if trail is not None:  # events dropped (a flood, a stalled disk): the audit trail is incomplete
            body["audit"] = trail.health()
            if body["audit"].get("state") != "ok":
                problems.append("audit")
        body["status"] = "starting" if not self.started else ("degraded" if problems else "ok")
        if problems:
            body["problems"] = problems
        return body

    def channel(self, name: str) -> Channel:
        return next(c for c in self.channels if c.name == name)

    @property
    def outbox_role(self) -> str:
        """``leader`` when this process publishes the outbox (it holds the "outbox" lease), else ``standby``."""
        lease = self.outbox_lease
        return "leader" if lease is not None and lease.held else "standby"

    async def _lead_outbox(self) -> None:
        """Run the outbox dispatcher while this node holds the "outbox" lease: one dispatcher per database, so each
        event is published once whatever the number of nodes. Losing the lease stops it at once; gaining it
        (again) starts it from the outbox as the database has it (``pending_events``)."""

        async def lead() -> None:
            log.info("outbox.leader")
            await self._dispatch_outbox()

        async def standby() -> None:
            log.warning("outbox.standby")

        await while_leading(self.outbox_lease, lead, "outbox", after=standby)

    async def _dispatch_outbox(self) -> None:
        """Publish journaled events in order; a bus outage only delays them (retried every second)."""
        assert self.journal is not None
        journal = self.journal
        shared = getattr(self.stores, "backend", "") == "postgresql"
        poll = SHARED_OUTBOX_POLL if shared else OUTBOX_POLL

        async def read(query: Callable[..., Any], *args: Any) -> Any:
            """A read of the journal: on PostgreSQL off the loop (a database host that stops answering must not
            hold the ingest loop); SQLite's local file is read at once."""
            return await asyncio.to_thread(query, *args) if shared else query(*args)

        failing = False
        while True:
            try:
                if not self.bus.connected:  # the bus says when it is back: no publish attempt (and log) per second
                    metrics.outbox_pending.set(await read(journal.outbox_depth))
                    await asyncio.sleep(0.5)
                    continue
                events = await read(journal.pending_events, DISPATCH_BATCH)
                metrics.outbox_pending.set(len(events))
                if not events:
                    journal.outbox_ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(journal.outbox_ready.wait(), poll)
                    # A short pause lets a burst accumulate: one bus commit for many events instead of one each.
                    await asyncio.sleep(DISPATCH_PAUSE)
                    continue
                # The patient's key, on every bus and setting: it routes to a partition wherever a node consumes
                # partitioned (RabbitMQ), whatever this node's own [bus] partitions says.
                items = [
                    (e.topic, e.body, e.event_id, {"journal-id": str(e.message_id), **partition_headers(e.body)})
                    for e in events
                ]
                if self.outbox_lease is not None and not await self.outbox_lease.confirm():
                    return  # another node may hold the lease now: it publishes these (see Lease.confirm)
                await self.bus.publish_many(items)
                await journal.events_published([e.id for e in events])
                if failing:
                    failing = False
                    log.info("outbox.publishing_again", pending=await read(journal.outbox_depth))
                if len(events) < DISPATCH_BATCH:
                    # Under a steady stream, gather for a moment: one bus commit for many events rather than one
                    # commit (and one thread hand-off) for each.
                    await asyncio.sleep(DISPATCH_PAUSE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not once per retry
                    log.warning("outbox.publish_failed", error=type(exc).__name__)
                    failing = True
                await asyncio.sleep(1.0)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the outbox is empty (tests and ``traboule send --wait``)."""
        assert self.journal is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while self.journal.pending_events(1):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("outbox not drained")
            await asyncio.sleep(0.02)


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, str | int | float | bool | list)}
