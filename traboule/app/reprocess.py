"""Reprocessing: journaled messages run again through today's mappings, their events delivered to chosen channels.

For a channel added after the messages came (backfill: orders received before the FHIR channel existed never
reached it) or a mapping fixed since. ``traboule journal reprocess`` selects journal entries (ids, ranges,
filters), maps each raw message again with the inbound mapping of the channel that received it, and delivers the
canonical events to the queues of the channels named with ``--to``.

Why it works this way:

* **Point to point.** The events go to the named channels' queues only, as a dead-letter replay does, not to
  their topics: the other subscribers (the worklist, the RIS status feed, a DMP) do not receive them again.
* **Durable without the engine.** The command sends to those queues itself (``Bus.send``) and checkpoints only
  once the bus confirmed; the queues are durable, so the engine need not run: its channels take the events when it
  starts (a channel added to the configuration, once the engine restarts with it). Not through the journal's
  outbox: its dispatcher publishes to topics, which would reach every subscriber.
* **Idempotency keys** ``<message key>:<index>~<generation>``: the generation hashes the event as today's
  inbound mapping makes it and the target channel's own mapping (its YAML file and tables). The same reprocess run
  twice, or resumed after a crash between a publish and its checkpoint, makes the same keys: consumers skip them
  as duplicates. A changed inbound or channel mapping makes new keys: the events are applied again.
* **Order.** Each event carries its message's journal id (``journal-id``), the sequence consumers order by: an
  event older than the latest one applied to the same order (a cancel received later, a performed step) is
  skipped as stale, so reprocessing an old message never brings back what a later one changed. Reprocess the
  whole range of an order's messages, not one in the middle.
* **Patient identity as at ingest.** Each message goes through the registry's checks again
  (``traboule.stores.patient_identity``): merges resolved (a merged IPP's events name its survivor), an IPP given
  another
  INS than the one recorded, or a report naming another patient's order, is refused (listed, nothing sent), an
  identity source's patient update replaces the INS; what is sent is recorded. Refused messages (``rejected``
  entries) are taken only when ``--status rejected`` says so, and are checked like the others.
* **Reports** are re-sent as the document events they made, read from the inbound channel's reports store; their
  CDA is not built again with today's ``cda.yaml``: a new CDA would be a new version of the shared document.
* **Dry run**: each message's events are applied, in order, to copies of the target channels' stores in a scratch
  folder (the channels' own code, without destinations); what changed is shown as unified diffs, next to the diff
  of the canonical event against the one the journal's outbox still holds (published events leave the outbox,
  so for most messages there is nothing left to compare the event with).
* **Resume**: ``<data_dir>/reprocess.json`` keeps the selection, the target channels, the highest journal id the
  run covers (what arrived later is not its business) and the last id done; for a run asked from the console,
  who asked (``operator``: the token's name) and why (``reason``). A run ends with the log line
  ``reprocess.run`` (operator, targets, counts; never the reason).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import structlog

from traboule.app.bus_backend import make_bus
from traboule.app.config import Config, resolve
from traboule.app.runtime import channel_bindings, channel_class, make_stores
from traboule.bus import Bus, Delivery, Item, topic_matches
from traboule.bus.partition import partition_headers
from traboule.channel import HasMapping, HasStore
from traboule.errors import MappingFailure, MessageFailed, MessageRefused, ReprocessError
from traboule.formats import hl7
from traboule.model import Document, Envelope, Payload, Report, content_key, plain, topic_of
from traboule.stores import Journal, PatientRegistry
from traboule.stores.factory import SQLiteStores, StoreFactory
from traboule.stores.journal import JournalEntry, Query
from traboule.stores.patient_identity import identity_sources, mark_authoritative
from traboule.stores.sqlite import Durability, open_database
from traboule.translate.hl7_mapping import HL7InboundMapping

log = structlog.get_logger("traboule.app.reprocess")

STATE_FILE = "reprocess.json"
REPROCESSABLE = ("accepted", "duplicate", "rejected")  # inbound messages; "undelivered" ones went out
BATCH = 100  # messages per publish (one bus transaction) and checkpoint


# -- selection --------------------------------------------------------------------------------------------------

_ID = re.compile(r"^(\d{1,12})(?:-(\d{1,12}))?$")


def parse_ids(texts: list[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """``12``, ``10-20`` and comma-separated lists of them → (ids, ranges)."""
    ids: list[int] = []
    ranges: list[tuple[int, int]] = []
    for text in (t for part in texts for t in part.split(",")):
        match = _ID.match(text.strip())
        if not match:
            raise ReprocessError(f"{text!r} is not a journal id or range (e.g. 12, 10-20)", 2)
        low = int(match[1])
        if match[2] is None:
            ids.append(low)
        elif int(match[2]) < low:
            raise ReprocessError(f"range {text!r} ends before it starts", 2)
        else:
            ranges.append((low, int(match[2])))
    return ids, ranges


def utc_bound(text: str, *, until: bool = False) -> str:
    """A ``--since`` / ``--until`` value (date or ISO 8601 date-time, UTC unless it says) as the journal writes
    reception times. A bare date given as ``until`` includes that whole day."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1 if until else 0)
        else:
            moment = datetime.fromisoformat(text)
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise ReprocessError(f"{text!r} is not a date (2026-11-25) or date-time (2026-11-25T08:00)", 2) from None
    return moment.isoformat(timespec="milliseconds")


def inbound_channels(cfg: Config) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cfg.channels if c["kind"] == "hl7-orders"}


@dataclass
class Target:
    """A channel events are delivered to: its queue and the topics it takes."""

    name: str
    kind: str
    queue: str
    topics: list[str]
    fingerprint: str = ""  # of its own mapping: part of the events' idempotency keys

    def takes(self, topic: str) -> bool:
        return any(topic_matches(pattern, topic) for pattern in self.topics)


def targets(cfg: Config, names: list[str]) -> list[Target]:
    """The ``--to`` channels: configured, consuming a queue of their own."""
    if not names:
        raise ReprocessError("say where the events go: --to CHANNEL[,CHANNEL...]", 2)
    found: list[Target] = []
    takers = {}
    for ch in cfg.channels:
        own = [b for b in channel_bindings(ch) if b[0] == ch["name"]]
        if own and ch["kind"] != "hl7-orders":
            takers[ch["name"]] = (ch["kind"], own[0])
    for name in dict.fromkeys(names):
        if name not in takers:
            raise ReprocessError(
                f"unknown channel {name!r}: the configured channels that take events are {sorted(takers) or 'none'}"
            )
        kind, (queue, topics) = takers[name]
        found.append(Target(name, kind, queue, list(topics)))
    return found


@dataclass
class State:
    """A run, as ``reprocess.json`` keeps it between interruptions."""

    query: dict[str, Any]
    to: list[str]
    after: int = 0  # last journal id done
    done: int = 0
    failed: int = 0
    refused: int = 0  # by the patient identity checks (counted among the failed too)
    events: int = 0
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    finished: str = ""
    operator: str = ""  # who asked: the console token's name ("" from the command line)
    reason: str = ""  # why, as they said it (not logged: it may name a patient)

    @classmethod
    def load(cls, path: Path) -> State | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ReprocessError(f"{path}: unreadable ({exc}); delete it to start afresh", 2) from exc

    def save(self, path: Path) -> None:
        """Atomically (a crash leaves the previous checkpoint), and on disk before the next batch goes out."""
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(dataclasses.asdict(self), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)


def query_of(data: dict[str, Any]) -> Query:
    return Query(**{**data, "ranges": [tuple(r) for r in data.get("ranges", [])]})


@dataclass
class Plan:
    """What a run covers: the selection (bounded by the journal's last id when it started), where to, from where."""

    query: Query
    targets: list[Target]
    state: State
    total: int  # entries left to do


def plan(
    cfg: Config,
    journal: Journal,
    *,
    ids: list[str],
    types: list[str],
    statuses: list[str],
    channels: list[str],
    since: str,
    until: str,
    to: list[str],
    resume: bool,
    operator: str = "",
    reason: str = "",
) -> Plan:
    """Check the selection and the targets and say what a run (or the resumed one) covers."""
    inbound = inbound_channels(cfg)
    for name in channels:
        if name not in inbound:
            raise ReprocessError(f"unknown channel {name!r}: the inbound HL7 channels are {sorted(inbound) or 'none'}")
    wanted_ids, ranges = parse_ids(ids)
    for status in statuses:
        if status not in REPROCESSABLE:
            raise ReprocessError(f"cannot reprocess {status!r} entries (only {', '.join(REPROCESSABLE)})", 2)
    query = Query(
        ids=wanted_ids,
        ranges=ranges,
        # A refused message only when asked by name: its events never went anywhere.
        statuses=list(statuses) or (["accepted", "duplicate"] if wanted_ids or ranges else ["accepted"]),
        types=list(types),
        channels=list(channels) or sorted(inbound),
        since=utc_bound(since) if since else "",
        until=utc_bound(until, until=True) if until else "",
    )
    state_path = Path(cfg.data_dir) / STATE_FILE
    selected = bool(ids or types or statuses or channels or since or until)
    if resume:
        state = State.load(state_path)
        if state is None or state.finished:
            raise ReprocessError(f"nothing to resume: no interrupted run in {state_path}")
        stored = query_of(state.query)
        if selected and dataclasses.replace(query, upto=0) != dataclasses.replace(stored, upto=0):
            raise ReprocessError("the interrupted run selected other messages: resume it without a selection", 2)
        query = stored
        if to and list(dict.fromkeys(to)) != state.to:
            raise ReprocessError(f"the interrupted run delivers to {','.join(state.to)}: resume it without --to", 2)
        found = targets(cfg, state.to)
    else:
        if not selected:
            raise ReprocessError(
                "say which messages: journal ids (12, 10-20) or filters (--type, --since, --until, --status, "
                "--channel)",
                2,
            )
        if not inbound:
            raise ReprocessError("no inbound HL7 channel (kind hl7-orders) in the configuration")
        found = targets(cfg, to)
        for entry_id in wanted_ids:
            _check_named(journal, entry_id, inbound, query.statuses)
        query.upto = journal.last_id()
        state = State(query=dataclasses.asdict(query), to=[t.name for t in found], operator=operator, reason=reason)
    total = journal.count(query, after=state.after)
    if total == 0 and not resume:
        raise ReprocessError("no journal entry matches the selection")
    return Plan(query, found, state, total)


def _check_named(journal: Journal, entry_id: int, inbound: dict[str, Any], statuses: list[str]) -> None:
    """An id given alone must name an inbound HL7 message of a configured channel, of a selected status: said now,
    before any work."""
    entry = journal.get(entry_id)
    if entry is None:
        raise ReprocessError(f"no journal entry {entry_id}")
    if entry.status not in REPROCESSABLE:
        raise ReprocessError(f"journal entry {entry_id} is {entry.status} (an outbound message): nothing to reprocess")
    if entry.status not in statuses:
        raise ReprocessError(
            f"journal entry {entry_id} was {entry.status} when received ({entry.ack_code or 'no ACK'}): it is "
            f"reprocessed only with --status {entry.status}, and checked again then",
            2,
        )
    if entry.channel not in inbound:
        raise ReprocessError(
            f"journal entry {entry_id} was received by channel {entry.channel!r}, which is not an inbound HL7 channel "
            f"of the configuration ({', '.join(sorted(inbound))}): its mapping is unknown"
        )


# -- today's events of a message --------------------------------------------------------------------------------


class Remapper:
    """Today's inbound mapping of each inbound HL7 channel, and the documents their reports made."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.channels = inbound_channels(cfg)
        self._mappings: dict[str, HL7InboundMapping] = {}
        self._reports: dict[str, Any] = {}  # the reports store of each inbound channel, opened once (see close)

    def close(self) -> None:
        """Close the reports stores opened for the documents."""
        stores, self._reports = self._reports, {}
        for store in stores.values():
            with contextlib.suppress(Exception):
                store.close()

    def events(self, entry: JournalEntry) -> list[tuple[int, Payload]]:
        """(index in the message's events, payload), as the channel would journal them today."""
        channel = self.channels.get(entry.channel)
        if channel is None:
            raise MessageFailed(
                f"received by channel {entry.channel!r}, not an inbound HL7 channel of the configuration"
            )
        mapping = self._mappings.get(entry.channel)
        if mapping is None:
            path = resolve(self.cfg, channel.get("mapping", "mappings/hl7_inbound.yaml"))
            mapping = self._mappings[entry.channel] = HL7InboundMapping(path)
        try:
            msg = hl7.parse(hl7.decode(entry.raw).text)
            payloads = mapping.map(msg, [])
        except hl7.HL7Error as exc:
            raise MessageFailed(f"{exc.location}: {exc}" if exc.location else str(exc)) from None
        except MappingFailure as exc:
            raise MessageFailed(f"{exc.location}: {exc.reason}" if exc.location else exc.reason) from None
        sources = identity_sources(channel.get("identity_sources"), entry.channel)
        mark_authoritative(payloads, sources, (msg.header("sending_application", 1), msg.header("sending_facility", 1)))
        return [(i, self._document(entry) if isinstance(p, Report) else p) for i, p in enumerate(payloads)]

    def _document(self, entry: JournalEntry) -> Document:
        """The document event the report made when it was received (its version, its CDA), from the channel's
        reports store on either backend."""
        from traboule.stores.reports import document_made

        store = self._reports.get(entry.channel)
        if store is None:  # no CDA mapping: only what the reports made is read
            store = self._reports[entry.channel] = make_stores(self.cfg).reports(entry.channel, None)
        doc = document_made(store, entry.idempotency_key)
        if doc is None:
            raise MessageFailed("the report made no document (refused when received?): send it again instead")
        return doc


def checked(identities: PatientRegistry, events: list[tuple[int, Payload]]) -> list[Payload]:
    """A message's events through the patient identity checks of its ingest: merges resolved (in place); an IPP
    given another INS, a report naming another patient's order or an order taking another patient's exam refused
    (`MessageRefused`); its pairs are held until `PatientIdentities.record` (or `release`). Returns the payloads to
    record once sent."""
    payloads = [p for _, p in events]
    identities.resolve_merged(payloads)
    try:
        identities.check(payloads)
    except MappingFailure as exc:
        raise MessageRefused(f"{exc.location}: {exc.reason}" if exc.location else exc.reason) from None
    try:
        identities.check_report(payloads)
        identities.check_order(payloads)
    except MappingFailure as exc:
        identities.release(payloads)
        raise MessageRefused(f"{exc.location}: {exc.reason}" if exc.location else exc.reason) from None
    return payloads


def fingerprint(channel: Any) -> str:
    """A channel's own mapping (YAML file and loaded tables), hashed; empty for a channel without one."""
    if not isinstance(channel, HasMapping):
        return ""
    mapping = channel.mapping
    digest = hashlib.sha256(Path(mapping.path).read_bytes())
    for name, table in sorted(mapping.tables.items()):
        digest.update(json.dumps([name, table.keys, table.columns, table.rows], default=str).encode())
    return digest.hexdigest()[:16]


def envelope(entry: JournalEntry, index: int, payload: Payload, target: Target) -> Envelope:
    """The event for ``target``: same content and sequence as a fresh one, a key of its generation (see above)."""
    content = json.dumps(plain(payload), sort_keys=True, ensure_ascii=False)
    generation = content_key(content, target.fingerprint)[:12]
    key = f"{entry.idempotency_key or f'journal-{entry.id}'}:{index}~{generation}"
    return Envelope(
        payload,
        source=entry.channel,
        idempotency_key=key,
        correlation_id=entry.correlation_id,
        id=content_key(key, target.name),
    )


def deliveries(entry: JournalEntry, events: list[tuple[int, Payload]], target: Target) -> list[Delivery]:
    """What ``target`` gets of a message's events: those of the topics it takes, in order."""
    out = []
    for index, payload in events:
        topic = topic_of(payload)
        if target.takes(topic):
            env = envelope(entry, index, payload, target)
            body = env.to_json()
            headers = {"journal-id": str(entry.id), "reprocess": "1", **partition_headers(body)}  # its patient's order
            out.append(Delivery(topic, body, env.id, headers))
    return out


# -- live run -------------------------------------------------------------------------------------------------


async def send_to_queues(bus: Bus, items: list[tuple[str, Delivery]]) -> None:
    """Put deliveries on named queues (not on their topics), durably: returns once the bus confirmed them all."""
    by_queue: dict[str, list[Item]] = {}
    for queue, d in items:
        by_queue.setdefault(queue, []).append((d.topic, d.body, d.message_id, d.headers))
    for queue, messages in by_queue.items():
        await bus.send(queue, messages)


@contextlib.contextmanager
def exclusive(data_dir: str | Path) -> Iterator[None]:
    """One live run at a time per data folder (they would share the checkpoint)."""
    path = Path(data_dir) / "reprocess.lock"
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReprocessError("another reprocess runs on this data folder", 2) from None
        yield


PROGRESS_EVERY = 5.0  # seconds between two progress lines when the progress stream is not a terminal


class Progress:
    """Messages done out of a total, shown on ``stream`` (None: not shown): a tqdm bar on a terminal, else a line
    every ``every`` seconds (done/total, rate, time left). The report's own lines go through :meth:`write` (above
    the bar). ``initial``: done by an earlier, interrupted run (not counted in the rate)."""

    def __init__(self, total: int, initial: int = 0, stream: TextIO | None = None, every: float = PROGRESS_EVERY):
        self.total = total + initial
        self.initial = self.done = initial
        self.stream = stream
        self.every = every
        self.started = self._shown = time.monotonic()
        self.bar: Any = None
        if stream is not None and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, unit="msg", dynamic_ncols=True, file=stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def write(self, text: str, file: TextIO) -> None:
        if self.bar is not None:
            self.bar.write(text, file=file)
        else:
            print(text, file=file)

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if self.stream is not None and now - self._shown >= self.every:
            self._shown = now
            print(self.line(), file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        """Messages per second of this run."""
        return (self.done - self.initial) / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        """``done/total message(s) (percent), rate, time left``."""
        percent = f" ({self.done / self.total:.0%})" if self.total else ""
        left = (self.total - self.done) / self.rate if self.rate > 0 else None
        eta = f"{_duration(left)} left" if left is not None else "time left unknown"
        return f"{self.done}/{self.total} message(s){percent}, {self.rate:.1f}/s, {eta}"

    def summary(self) -> str:
        """How long this run took and its rate, for the final line."""
        return f"{self.done - self.initial} message(s) in {_duration(self.elapsed)} ({self.rate:.1f}/s)"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


async def run(
    cfg: Config,
    journal: Journal,
    chosen: Plan,
    *,
    limit: int = 0,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """Deliver the events of the planned messages to the target channels' queues, checkpointing each batch once
    the bus confirmed it; the progress on ``progress`` (see `Progress`). Returns the exit code: 0, or 1 when a
    message failed (reported and skipped)."""
    out = out or sys.stdout
    state, state_path = chosen.state, Path(cfg.data_dir) / STATE_FILE
    remapper = Remapper(cfg)
    identities = make_stores(cfg).patients()
    with _built(cfg, chosen.targets, copy_from=None) as built:
        for target in chosen.targets:
            target.fingerprint = fingerprint(built[target.name])
    with exclusive(cfg.data_dir):
        bus = make_bus(
            cfg.amqp_url, cfg.data_dir, exchange=cfg.exchange, queue_type=cfg.queue_type, partitions=cfg.partitions
        )
        await bus.start()
        try:
            try:
                await bus.wait_connected(10.0)
            except ConnectionError as exc:
                raise ReprocessError(f"cannot reach the bus: {exc}", 2) from None
            for target in chosen.targets:  # RabbitMQ drops what no queue takes: a channel that never ran has none
                await bus.declare(target.queue, target.topics)
            state.save(state_path)
            this_run = 0
            with Progress(min(limit, chosen.total) if limit else chosen.total, state.done, progress) as bar:
                while not limit or this_run < limit:
                    size = min(BATCH, limit - this_run) if limit else BATCH
                    entries = journal.select(chosen.query, after=state.after, limit=size)
                    if not entries:
                        break
                    items: list[tuple[str, Delivery]] = []
                    sent: list[list[Payload]] = []
                    for entry in entries:
                        try:
                            events = remapper.events(entry)
                            sent.append(checked(identities, events))
                        except MessageRefused as exc:
                            state.failed += 1
                            state.refused += 1
                            bar.write(f"journal entry {entry.id}: refused: {exc}", file=out)
                            continue
                        except MessageFailed as exc:
                            state.failed += 1
                            bar.write(f"journal entry {entry.id}: not reprocessed: {exc}", file=out)
                            continue
                        items += [(t.queue, d) for t in chosen.targets for d in deliveries(entry, events, t)]
                    await send_to_queues(bus, items)
                    for payloads in sent:  # sent: their pairs, owners and merges are the registry's
                        identities.record(payloads)
                    state.after = entries[-1].id
                    state.done += len(entries)
                    state.events += len(items)
                    this_run += len(entries)
                    state.save(state_path)
                    bar.update(len(entries))
            if not journal.count(chosen.query, after=state.after):
                state.finished = datetime.now(UTC).isoformat(timespec="seconds")
                state.save(state_path)
        finally:
            await bus.close()
            identities.close()
            remapper.close()
    log.info(
        "reprocess.run",
        operator=state.operator or "command line",
        to=state.to,
        done=state.done,
        failed=state.failed,
        refused=state.refused,
        events=state.events,
        finished=bool(state.finished),
    )
    print(
        f"{state.done - state.failed} message(s) reprocessed into {', '.join(t.name for t in chosen.targets)}: "
        f"{state.events} event(s) queued; {state.failed} not reprocessed"
        + (f" ({state.refused} refused by the patient identity checks)" if state.refused else "")
        + ("" if state.finished else f"; stopped after journal entry {state.after}: --resume continues")
        + f"; {bar.summary()}",
        file=out,
    )
    return 1 if state.failed else 0


# -- dry run ----------------------------------------------------------------------------------------------------

# kind → (table, key columns, content column): where a channel's store keeps what the dry run compares.
OUTPUTS = {"worklist": ("items", ("key",), "dataset"), "fhir": ("resources", ("type", "id"), "json")}


@dataclass
class _ShadowRuntime:
    """What a channel's constructor and handler read of their runtime: a scratch folder, no bus, no journal."""

    config: Config
    data_dir: Path
    process: str | None = None
    journal: Any = None
    bus: Any = None
    processes: dict[str, Any] = field(default_factory=dict)
    stores: StoreFactory = field(init=False)

    def __post_init__(self) -> None:
        self.stores = SQLiteStores(self.data_dir)  # the scratch copies: never the engine's stores


@contextlib.contextmanager
def _built(cfg: Config, chosen: list[Target], copy_from: Path | None) -> Iterator[dict[str, Any]]:
    """The target channels built in a scratch folder without destinations (nothing listens or is sent), on copies
    of their stores when ``copy_from`` is given; removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix="traboule-reprocess-"))
    try:
        shadow_cfg = copy.deepcopy(cfg)
        shadow_cfg.data_dir = str(scratch)
        runtime = _ShadowRuntime(shadow_cfg, scratch)
        built: dict[str, Any] = {}
        for target in chosen:
            source = copy_from / f"{target.name}.sqlite" if copy_from else None
            if source is not None and target.kind in OUTPUTS and source.is_file():
                _copy_store(source, scratch / f"{target.name}.sqlite")
            settings = copy.deepcopy(cfg.channel(target.name))
            if copy_from is not None and target.kind in OUTPUTS:  # computed here, never sent anywhere
                settings = {k: v for k, v in settings.items() if k not in ("destination", "destinations", "api")}
            built[target.name] = channel_class(target.kind)(settings, runtime)
            if target.kind in OUTPUTS:
                _watch(scratch / f"{target.name}.sqlite", *OUTPUTS[target.kind])
        yield built
        for channel in built.values():
            if isinstance(channel, HasStore):
                with contextlib.suppress(Exception):
                    channel.store.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _copy_store(source: Path, copy_to: Path) -> None:
    """A consistent copy of a live SQLite store (online backup: the engine may be writing)."""
    src = open_database(source, Durability.READ_ONLY, busy_timeout_s=30.0)
    dst = open_database(copy_to, Durability.CRASH)  # a scratch copy, rebuilt from the store at every run
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


def _watch(path: Path, table: str, keys: tuple[str, ...], content: str) -> None:
    """Triggers that keep the first content of every row a change touches (until `_changes` reads them)."""
    new_key = "json_array(" + ", ".join(f"NEW.{k}" for k in keys) + ")"
    old_key = "json_array(" + ", ".join(f"OLD.{k}" for k in keys) + ")"
    same = " AND ".join(f"{k} = NEW.{k}" for k in keys)
    db = open_database(path, Durability.CRASH)
    try:
        # NOT EXISTS, not INSERT OR IGNORE: the conflict policy of the statement that fires a trigger overrides
        # the trigger's own (the stores' upserts would fail on a second change to the same row).
        first = "WHERE NOT EXISTS (SELECT 1 FROM reprocess_before WHERE key = {key})"
        db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS reprocess_before (key TEXT PRIMARY KEY, content BLOB);
            CREATE TRIGGER reprocess_insert BEFORE INSERT ON {table} BEGIN
                INSERT INTO reprocess_before SELECT {new_key}, (SELECT {content} FROM {table} WHERE {same})
                {first.format(key=new_key)};
            END;
            CREATE TRIGGER reprocess_update BEFORE UPDATE OF {content} ON {table} BEGIN
                INSERT INTO reprocess_before SELECT {old_key}, OLD.{content} {first.format(key=old_key)};
            END;
            CREATE TRIGGER reprocess_delete BEFORE DELETE ON {table} BEGIN
                INSERT INTO reprocess_before SELECT {old_key}, OLD.{content} {first.format(key=old_key)};
            END;
            """
        )
    finally:
        db.close()


def _changes(path: Path, kind: str) -> list[tuple[str, Any, Any]]:
    """(what, before, after) of every row changed since the last call, as plain data (None: absent)."""
    table, keys, content = OUTPUTS[kind]
    db = open_database(path, Durability.CRASH)
    try:
        found = []
        for key, old in db.execute("SELECT key, content FROM reprocess_before ORDER BY key").fetchall():
            parts = json.loads(key)
            row = db.execute(
                f"SELECT {content} FROM {table} WHERE " + " AND ".join(f"{k} = ?" for k in keys), parts
            ).fetchone()
            before, after = _readable(kind, old), _readable(kind, row[0] if row else None)
            if before != after:
                found.append(("/".join(str(p) for p in parts), before, after))
        db.execute("DELETE FROM reprocess_before")
        db.commit()
        return found
    finally:
        db.close()


def _readable(kind: str, content: Any) -> Any:
    """A stored worklist item (DICOM) or FHIR resource as JSON-able data; what changes with every write (FHIR
    ``meta``) left out."""
    if content is None:
        return None
    if kind == "fhir":
        return {k: v for k, v in json.loads(content).items() if k != "meta"}
    from traboule.stores.worklist import decode_item

    return _dataset(decode_item(bytes(content)))


def _dataset(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for elem in ds:
        name = elem.keyword or str(elem.tag)
        if elem.VR == "SQ":
            out[name] = [_dataset(item) for item in elem.value]
        elif isinstance(elem.value, bytes | bytearray):
            out[name] = f"<{len(elem.value)} bytes>"
        elif isinstance(elem.value, list | tuple) or type(elem.value).__name__ == "MultiValue":
            out[name] = [str(v) for v in elem.value]
        else:
            out[name] = "" if elem.value is None else str(elem.value)
    return out


def unified(before: Any, after: Any, what: str) -> str:
    """A unified diff of pretty JSON ("" when equal)."""
    old = [] if before is None else json.dumps(before, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    new = [] if after is None else json.dumps(after, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    lines = difflib.unified_diff(
        old,
        new,
        f"{what} (now)" if before is not None else "/dev/null",
        f"{what} (reprocessed)" if after is not None else "/dev/null",
        lineterm="",
    )
    return "\n".join(lines)


async def dry_run(
    cfg: Config,
    journal: Journal,
    chosen: Plan,
    *,
    limit: int = 0,
    out: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """Print, per message, what a run would change; change nothing (the progress on ``progress``, see `Progress`).
    Returns 1 when a message would fail."""
    out = out or sys.stdout
    remapper = Remapper(cfg)
    identities = make_stores(cfg).patients()  # checked, nothing recorded
    counts = {"messages": 0, "changing": 0, "failed": 0}
    with _built(cfg, chosen.targets, copy_from=Path(cfg.data_dir)) as built:
        for target in chosen.targets:
            target.fingerprint = fingerprint(built[target.name])
        after = 0
        with Progress(chosen.total if not limit else min(limit, chosen.total), 0, progress) as bar:

            def say(text: str) -> None:
                bar.write(text, file=out)

            while not limit or counts["messages"] < limit:
                size = min(BATCH, limit - counts["messages"]) if limit else BATCH
                entries = journal.select(chosen.query, after=after, limit=size)
                if not entries:
                    break
                for entry in entries:
                    counts["messages"] += 1
                    changed = await _preview(entry, remapper, identities, journal, chosen.targets, built, say)
                    if changed is None:
                        counts["failed"] += 1
                    elif changed:
                        counts["changing"] += 1
                    bar.update(1)
                after = entries[-1].id
    identities.close()
    remapper.close()
    print(
        f"dry run: {counts['messages']} message(s), {counts['changing']} would change "
        f"{', '.join(t.name for t in chosen.targets)}, {counts['failed']} would fail; nothing was sent; "
        + bar.summary(),
        file=out,
    )
    return 1 if counts["failed"] else 0


async def _preview(
    entry: JournalEntry,
    remapper: Remapper,
    identities: PatientRegistry,
    journal: Journal,
    chosen: list[Target],
    built: dict[str, Any],
    say: Any,
) -> bool | None:
    """One message of a dry run: its event diffs and each target's output diffs. True when something changes,
    None when it would fail."""
    say(f"journal entry {entry.id}  {entry.message_type}  {entry.status}  {entry.received}  {entry.channel}")
    try:
        events = remapper.events(entry)
        checked(identities, events)
    except MessageRefused as exc:
        say(f"  refused: {exc}")
        return None
    except MessageFailed as exc:
        say(f"  fails: {exc}")
        return None
    recorded = {i: e for i, e in enumerate(journal.outbox_of(entry.id))}
    for index, payload in events:
        what = f"event {index} {topic_of(payload)}"
        if index in recorded:
            diff = unified(plain(Envelope.from_json(recorded[index].body).payload), plain(payload), what)
            say(f"  {what}: {'unchanged' if not diff else 'changed'} (against the event in the outbox)")
            if diff:
                say(diff)
        else:
            say(f"  {what}: the event as received is not kept (published events leave the outbox)")
    changing = False
    for target in chosen:
        given = deliveries(entry, events, target)
        if not given:
            say(f"  {target.name}: takes none of these events")
            continue
        if target.kind not in OUTPUTS:
            say(f"  {target.name}: its output is not computed offline (kind {target.kind})")
            continue
        channel = built[target.name]
        await channel.handle(given)
        changes = _changes(Path(channel.store.path), target.kind)
        if not changes:
            say(f"  {target.name}: no change")
        for what, before, after in changes:
            changing = True
            state = "new" if before is None else "removed" if after is None else "changed"
            say(f"  {target.name}: {what} {state}")
            say(unified(before, after, f"{target.name} {what}"))
    return changing
