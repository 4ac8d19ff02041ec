"""The journal's indexer: the keys each journaled message is searched by, written to the search index shortly after
the message is journaled (`traboule.stores.journal_search`).

A message's keys are its accession numbers (with the placer and filler order numbers and the requested procedure
ids) and its patient identifiers (every PID-3 repetition: IPP and INS; MRG-1: the identifiers a merge took away),
read twice and united:

* from the raw HL7 segments, the fields the shipped mappings read (``PID-3``, ``MRG-1``, ``IPC-1``, ``IPC-2``,
  ``OBR-2``/``3``/``18``/``19``, ``ORC-2``/``3``): a message that was refused (it did not map) is found too;
* from the canonical events the receiving channel's mapping makes of it today (an integrator's mapping may read
  the accession number elsewhere), for the messages of ``hl7-orders`` channels that still map, unless the channel
  runs the shipped mapping (it reads the keys from those very fields).

The indexer runs as a background task of one process (`traboule.app.runtime.indexing_process`: the second process
of the configuration when there are several, off the one that answers the senders; else main): it wakes every
`POLL` seconds, reads the entries not indexed yet and indexes them in a worker thread (never on the event loop), at
most half of one core while it catches up (an upgrade on a large journal: it sleeps as long as each batch took).
On a database shared by several nodes one of them indexes at a time (the ``journal-index`` lease); indexing twice
changes nothing. Keys are read from the first ``KEY_PREFIX`` bytes of each message (`JournalSearch.unindexed`; the
keyed segments come first), by batches of at most ``BATCH_BYTES``. An entry the index refuses is indexed without keys
and logged (``journal_index.entry_skipped``: its id and the error's type), never retried forever; a database that
fails is retried. The gauge ``traboule_journal_index_lag`` (journal ids not indexed yet) shows an index that stands
still.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from traboule import metrics
from traboule.app.config import Config, resolve
from traboule.app.leadership import while_leading
from traboule.formats import hl7
from traboule.model import Identifier
from traboule.stores.journal import JournalEntry
from traboule.stores.journal_search import MAX_KEYS, JournalSearch, extract_keys

log = structlog.get_logger("traboule.app.journal_indexer")

POLL = 0.5  # seconds between two looks at the journal when nothing new came
BATCH = 500  # entries indexed per transaction
MAX_SEGMENTS = 2_000  # segments of one raw message read for keys (a long report has many OBX; keys come first)

# (segment, field) → kind: where the shipped mappings (mappings/hl7_inbound.yaml) read the keys
RAW_FIELDS: dict[str, tuple[tuple[int, str], ...]] = {
    "PID": ((3, "patient"),),
    "MRG": ((1, "patient"),),
    "IPC": ((1, "accession"), (2, "accession")),
    "OBR": ((2, "accession"), (3, "accession"), (18, "accession"), (19, "accession")),
    "ORC": ((2, "accession"), (3, "accession")),
}
SHIPPED = "mappings/hl7_inbound.yaml"  # the inbound mapping traboule ships: its keys are the fields of RAW_FIELDS
ACCESSION_FIELDS = ("accession_number", "placer_order_number", "filler_order_number", "requested_procedure_id")


def raw_keys(raw: bytes) -> dict[str, list[str]]:
    """The keys in a raw HL7 message's segments (first component of each repetition), bounded; none for bytes that
    are not HL7."""
    keys: dict[str, set[str]] = {"accession": set(), "patient": set()}
    try:
        msg = hl7.parse(hl7.decode(raw).text)
    except Exception:  # not HL7, or HL7 the tokenizer refuses: no keys (one message never stops the indexer)
        return {k: [] for k in keys}
    seps = msg.separators
    for segment in msg.segments[:MAX_SEGMENTS]:
        for n, kind in RAW_FIELDS.get(segment.name, ()):
            for repetition in segment.field(n).split(seps.repetition, MAX_KEYS * 2)[: MAX_KEYS * 2]:
                value = hl7.unescape(repetition.split(seps.component)[0].split(seps.subcomponent)[0], seps)
                if value.strip() and len(keys[kind]) < MAX_KEYS * 2:
                    keys[kind].add(value)
    return extract_keys({k: list(v) for k, v in keys.items()})


def payload_keys(payloads: list[Any]) -> dict[str, list[str]]:
    """The keys of canonical events: accession and order numbers, patient identifiers and merged-away ones."""
    keys: dict[str, list[str]] = {"accession": [], "patient": []}

    def value(x: Any) -> str:
        return x.value if isinstance(x, Identifier) else x if isinstance(x, str) else ""

    for payload in payloads:
        for name in ACCESSION_FIELDS:
            keys["accession"].append(value(getattr(payload, name, "")))
        patient = getattr(payload, "patient", None)
        keys["patient"] += [value(i) for i in getattr(patient, "ids", [])]
        keys["patient"] += [value(i) for i in getattr(payload, "merged_ids", [])]
    return extract_keys(keys)


class KeyReader:
    """The keys of journal entries: raw segments, united with what the receiving channel's mapping makes when it is
    not the shipped one (whose keys are the raw fields read above: mapping every message again would only cost the
    ingest process CPU)."""

    def __init__(self, cfg: Config | None) -> None:
        self.channels = {c["name"]: c for c in (cfg.channels if cfg else []) if c["kind"] == "hl7-orders"}
        self.cfg = cfg
        self._mappings: dict[str, Any] = {}  # channel → its mapping, or None: the shipped one (raw keys suffice)

    def keys(self, entry: JournalEntry) -> dict[str, list[str]]:
        keys = raw_keys(entry.raw)
        mapped = self._mapped(entry)
        if mapped is not None:
            keys = extract_keys({k: keys.get(k, []) + mapped.get(k, []) for k in keys})
        return keys

    def _mapping(self, name: str) -> Any:
        if name not in self._mappings:
            from traboule.translate.hl7_mapping import HL7InboundMapping

            assert self.cfg is not None
            path = resolve(self.cfg, self.channels[name].get("mapping", SHIPPED))
            shipped = Path(__file__).resolve().parents[2] / SHIPPED
            try:
                same = path.read_bytes() == shipped.read_bytes()
            except OSError:
                same = False
            self._mappings[name] = None
            if not same:
                try:
                    self._mappings[name] = HL7InboundMapping(path)
                except Exception as exc:  # the engine refuses to start with it; a command line may see one
                    log.warning("journal_index.mapping_unusable", channel=name, error=type(exc).__name__)
        return self._mappings[name]

    def _mapped(self, entry: JournalEntry) -> dict[str, list[str]] | None:
        if entry.channel not in self.channels or self.cfg is None or entry.status == "undelivered":
            return None
        try:
            mapping = self._mapping(entry.channel)
            if mapping is None:
                return None
            payloads = mapping.map(hl7.parse(hl7.decode(entry.raw).text), [])
        except Exception:  # a message that does not map (refused when received, or a mapping changed since)
            return None
        return payload_keys(payloads)


def index_batch(search: JournalSearch, reader: KeyReader, limit: int = BATCH) -> int:
    """Index the next entries not indexed yet (blocking); returns how many.

    One entry never stops the index: when the batch's transaction fails, its entries are indexed one by one and
    one that fails twice while the index still takes writes (`JournalSearch.skip` succeeds) is indexed without
    keys, logged by id and error type (its text may quote a value). When even that fails the database is what
    fails (connection lost, disk full): the error goes up and the batch is tried again later."""
    entries = search.unindexed(limit)
    done = [(e.id, _keys(reader, e)) for e in entries]
    del entries  # their raw messages: not held while writing
    if not done:
        return 0
    try:
        search.index(done)
    except Exception:
        for message_id, keys in done:
            _index_one(search, message_id, keys)
    return len(done)


def _keys(reader: KeyReader, entry: JournalEntry) -> dict[str, list[str]]:
    try:
        return reader.keys(entry)
    except Exception as exc:  # a message the key reader chokes on: indexed without keys of its own
        log.warning("journal_index.keys_failed", message_id=entry.id, error=type(exc).__name__)
        return {}


def _index_one(search: JournalSearch, message_id: int, keys: dict[str, list[str]]) -> None:
    error = ""
    for _ in range(2):  # twice: a transient error that passed does not cost the entry its keys
        try:
            search.index([(message_id, keys)])
            return
        except Exception as exc:
            error = type(exc).__name__
    search.skip(message_id)  # raises when the database is what fails
    log.warning("journal_index.entry_skipped", message_id=message_id, error=error)


def catch_up(search: JournalSearch, reader: KeyReader, *, progress: Callable[[int], None] | None = None) -> int:
    """Index every entry not indexed yet (blocking: the command line, when the engine is not running)."""
    total = 0
    while n := index_batch(search, reader):
        total += n
        if progress:
            progress(total)
    return total


class JournalIndexer:
    """The background task that keeps the search index up to date (`start` / `stop`)."""

    def __init__(self, stores: Any, cfg: Config | None, *, poll: float = POLL) -> None:
        self.stores = stores
        self.reader = KeyReader(cfg)
        self.poll = poll
        self.search: JournalSearch | None = None
        self.lease: Any = None
        self._task: asyncio.Task[None] | None = None
        self.indexed = 0

    def start(self) -> None:
        self.lease = self.stores.lease("journal-index")
        self._task = asyncio.create_task(self._lead(), name="journal-indexer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self.lease is not None:
            with contextlib.suppress(Exception):
                await self.lease.release()
        if self.search is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.search.close)
            self.search = None

    async def _lead(self) -> None:
        """Index while this node holds the lease (always on SQLite)."""
        await while_leading(self.lease, self._run, "journal_index")

    async def _run(self) -> None:
        while True:
            try:
                if self.search is None:
                    self.search = await asyncio.to_thread(self.stores.journal_search)
                started = time.monotonic()
                n = await asyncio.to_thread(index_batch, self.search, self.reader)
                self.indexed += n
                metrics.journal_index_lag.set(await asyncio.to_thread(self.search.lag))
                # Catching up: as long a pause as the batch took (half a core at most); else poll.
                await asyncio.sleep(time.monotonic() - started if n else self.poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database does not answer, the disk is full: try again later
                log.warning("journal_index.failed", error=type(exc).__name__)  # its text may quote a value
                if self.search is not None:
                    with contextlib.suppress(Exception):  # the index stands still: its lag grows on /metrics
                        metrics.journal_index_lag.set(await asyncio.to_thread(self.search.lag))
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.search.close)
                    self.search = None
                await asyncio.sleep(5.0)
