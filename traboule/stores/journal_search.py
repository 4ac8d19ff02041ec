"""Searching the journal: by time, status, type, channel, MSH-10, accession number, patient identifier, free text.

The contract the operations console and the command line search through; each backend implements it (SQLite
files by default, PostgreSQL with ``[database] url``), reached as ``runtime.stores.journal_search()``
(`traboule.stores.journal_index.SQLiteJournalSearch`, `traboule.stores.postgres.journal_index.PostgresJournalSearch`).
The keys a message is searched by (MSH-10, accession numbers, patient identifiers) are kept in an index beside the
journal that the engine's indexer (`traboule.app.journal_indexer`: ``unindexed`` then ``index``) brings up to date
about half a second after each message is journaled; they come from its raw segments (a refused message is found
too) and from the canonical events its channel's mapping makes of it. The calls block: from the event loop, run
them in a thread (``asyncio.to_thread``); one object serves several threads (a lock serialises its calls).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from traboule.stores.journal import JournalEntry

__all__ = ["JournalSearch", "SearchPage", "SearchQuery", "extract_keys", "normalized"]

MIN_TEXT = 3  # characters: a free-text search shorter than this is refused (it would match nearly everything)
MAX_TEXT = 200  # characters: a longer free-text search is refused
MAX_LIMIT = 500  # entries per page at most
SCAN_BUDGET = 20_000  # entries whose raw message one free-text search call reads at most (then a partial page)
MAX_KEY = 64  # characters: a longer key value is not indexed (none of the identifiers searched for is longer)
MAX_KEYS = 32  # values of one kind indexed per message at most
KEY_PREFIX = 64 * 1024  # bytes of a raw message read for its keys (MSH, PID, MRG, ORC, OBR, IPC come first)
BATCH_BYTES = 8 * 1024 * 1024  # bytes of raw messages read at a time (a scan's batch, a page, an indexer's batch)
KINDS = ("accession", "patient")  # the key kinds a mapping gives (MSH-10 is indexed as ``control_id``)


@dataclass
class SearchQuery:
    """Which journal entries: every non-empty field must match (AND); empty fields match all.

    ``since`` / ``until``: ISO 8601 UTC bounds on the reception time (``since`` included, ``until`` excluded);
    ``statuses``, ``channels``: any of; ``types``: ``ORM^O01`` exactly or ``ORM`` for any trigger event;
    ``control_id``: MSH-10, exact; ``accession``: an accession number, exact; ``patient``: a patient identifier
    (IPP or INS) value, exact, whatever its assigning authority (a merged-away identifier finds its merge message);
    ``text``: a case-insensitive substring of the raw message, at least ``MIN_TEXT`` characters (the message read
    as UTF-8, else Latin-1, as the sender wrote it: HL7 escapes such as ``\\T\\`` are not undone).
    Accession numbers include the placer and filler order numbers and the requested procedure ids: an operator
    holding an exam's number finds its messages whichever of them it is."""

    since: str = ""
    until: str = ""
    statuses: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    control_id: str = ""
    accession: str = ""
    patient: str = ""
    text: str = ""


@dataclass
class SearchPage:
    """One page of results, newest first; ``next_before``: pass it as ``before`` for the next page (0: last page).

    A free-text search reads at most ``SCAN_BUDGET`` raw messages per call: its page may hold fewer than ``limit``
    entries (even none) with a ``next_before`` that is not 0: the search goes on from there (say "searched up to
    entry N, continue?"). A page also ends early, with its ``next_before``, once its entries' raw messages reach
    ``BATCH_BYTES`` (it always holds one entry at least): a page of large messages never holds them all at once."""

    entries: list[JournalEntry]
    next_before: int = 0


@runtime_checkable
class JournalSearch(Protocol):
    """The journal's search index (blocking calls: run them in a thread from the event loop)."""

    def search(self, query: SearchQuery, *, before: int = 0, limit: int = 50) -> SearchPage:
        """Entries matching ``query`` with an id below ``before`` (0: from the newest), at most ``limit``
        (bounded by ``MAX_LIMIT``), with their raw message. Only indexed entries are found (the indexer follows
        the journal within a second or so). Raises ValueError for a query it refuses (a too short text, a bad
        time)."""
        ...

    def keys_of(self, message_id: int) -> dict[str, list[str]]:
        """The keys indexed for one message: ``{"accession": [...], "patient": [...]}``, each sorted (empty until
        indexed)."""
        ...

    def unindexed(self, limit: int = 1000) -> list[JournalEntry]:
        """The oldest journal entries not indexed yet, at most ``limit`` and at most ``BATCH_BYTES`` of raw (one
        entry at least), in id order. Each entry's ``raw`` is the start of its message only (`keyed_prefix`: at
        most ``KEY_PREFIX`` bytes, whole segments), where its keys are: enough to index it, not to process it."""
        ...

    def index(self, done: list[tuple[int, dict[str, list[str]]]]) -> None:
        """Record the keys of these entries (message id, keys by kind: `extract_keys` bounds them) and mark them
        indexed, in one transaction; indexing an entry again changes nothing (several nodes may race). The entry's
        MSH-10, time, status, type and channel are read from the journal: ``done`` carries the keys only (an MSH-10
        longer than ``MAX_KEY`` characters is not indexed, as any other key)."""
        ...

    def skip(self, message_id: int) -> None:
        """Mark one entry indexed without any key (not even its MSH-10): found by time, status, type and channel
        only. For the entry whose keys the index refuses, so that the entries after it are indexed."""
        ...

    def lag(self) -> int:
        """How many journal ids are not indexed yet: the journal's last id less the last id indexed (0: up to
        date)."""
        ...

    def close(self) -> None: ...


def normalized(query: SearchQuery) -> SearchQuery:
    """``query`` checked and in the form the stores compare: times as the journal writes them (ISO 8601 UTC with
    milliseconds; a time without zone is UTC, a date is its midnight), text and keys stripped. Raises ValueError
    for a text shorter than ``MIN_TEXT`` (or longer than ``MAX_TEXT``) characters, a key (MSH-10, accession number,
    patient identifier) longer than ``MAX_KEY`` characters (the index keeps none) or a time that is not ISO 8601."""
    text = query.text.strip()
    if text and len(text) < MIN_TEXT:
        raise ValueError(f"a text search needs at least {MIN_TEXT} characters")
    if len(text) > MAX_TEXT:
        raise ValueError(f"a text search takes at most {MAX_TEXT} characters")
    for name in ("control_id", "accession", "patient"):
        if len(getattr(query, name).strip()) > MAX_KEY:
            raise ValueError(f"{name}: at most {MAX_KEY} characters")
    return dataclasses.replace(
        query,
        since=_time(query.since, "since"),
        until=_time(query.until, "until"),
        statuses=[s.strip() for s in query.statuses if s.strip()],
        types=[t.strip() for t in query.types if t.strip()],
        channels=[c.strip() for c in query.channels if c.strip()],
        control_id=query.control_id.strip(),
        accession=query.accession.strip(),
        patient=query.patient.strip(),
        text=text,
    )


def _time(value: str, name: str) -> str:
    value = value.strip()
    if not value:
        return ""
    try:
        at = datetime.fromisoformat(value[:40])
    except ValueError:
        raise ValueError(f"{name}: not an ISO 8601 time (2026-03-01 or 2026-03-01T08:00:00Z)") from None
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return at.isoformat(timespec="milliseconds")


def text_matches(raw: bytes, text: str) -> bool:
    """Whether the raw message holds ``text`` (already `normalized`), whatever the case: read as UTF-8, else as
    Latin-1 (the two character sets senders use), both case-folded."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")
    return text.casefold() in decoded.casefold()


def extract_keys(keys: dict[str, list[str]]) -> dict[str, list[str]]:
    """``keys`` bounded as the index keeps them: the known kinds, values stripped, non-empty, at most ``MAX_KEY``
    characters, without control characters, at most ``MAX_KEYS`` distinct values a kind, sorted."""
    bounded: dict[str, list[str]] = {}
    for kind in KINDS:
        values = {v.strip() for v in keys.get(kind, [])}
        kept = sorted(v for v in values if v and len(v) <= MAX_KEY and v.isprintable())
        bounded[kind] = kept[:MAX_KEYS]
    return bounded


def keyed_prefix(raw: bytes, length: int) -> bytes:
    """The start of a raw message read for its keys (``raw``: its first bytes, ``length``: its whole size), cut
    after its last whole segment when it was cut short (no half segment, no half UTF-8 character)."""
    if len(raw) >= length:
        return raw
    end = max(raw.rfind(b"\r"), raw.rfind(b"\n"))
    return raw[: end + 1] if end > 0 else raw


def byte_batches(sizes: list[tuple[int, int]], budget: int = BATCH_BYTES) -> Iterator[list[int]]:
    """The ids of ``sizes`` ((id, bytes) in order) in consecutive batches of at most ``budget`` bytes (an entry
    larger than that alone)."""
    batch: list[int] = []
    used = 0
    for message_id, size in sizes:
        if batch and used + size > budget:
            yield batch
            batch, used = [], 0
        batch.append(message_id)
        used += size
    if batch:
        yield batch


def page_ids(ids: list[int], sizes: dict[int, int], room: int, used: int) -> tuple[list[int], bool]:
    """Which of ``ids`` (in order; those without a size are gone from the journal) a page takes: at most ``room``
    entries while the page's raw messages stay within ``BATCH_BYTES`` (``used`` already; one entry at least), and
    whether it stopped with ids left."""
    taken: list[int] = []
    for at, message_id in enumerate(ids):
        if message_id not in sizes:
            continue
        if len(taken) == room or ((taken or used) and used + sizes[message_id] > BATCH_BYTES):
            return taken, any(i in sizes for i in ids[at:])
        taken.append(message_id)
        used += sizes[message_id]
    return taken, False
