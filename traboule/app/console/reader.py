"""What the console reads from the journal, off the event loop.

The console opens its own journal (``stores.journal()``: SQLite file or PostgreSQL) and its search index
(``stores.journal_search()``, `traboule.stores.journal_search`) in each of its `WORKERS` threads, and runs
every query (and renders every large page) there: a page never holds the loop that acknowledges messages, and a
SQLite connection stays on the thread that opened it. At most `QUEUED` jobs wait for a thread: beyond,
`ConsoleBusy` (the console answers 503 with Retry-After), so one operator's heavy requests cannot queue up
everyone else's forever. Until the store factory has a search index, `JournalScan` answers the same contract from the
journal itself (time, status, type, channel, MSH-10 and text; not accession or patient: those need the index).

On PostgreSQL every store the console opens (journal, search index, delivery log, worklist, reports, incidents) comes
from `Reader.stores`, `bounded_stores` of the engine's: its connections run each statement with the
``statement_timeout`` of ``[console] query_timeout`` (10 s by default), the engine's own connections keep theirs. A
query cancelled by it (`timed_out`) gets a page asking to narrow the search (HTTP 504), not a 500.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import structlog

from traboule.errors import ConsoleBusy
from traboule.stores.journal import JournalEntry, Query
from traboule.stores.journal_search import MAX_LIMIT, MIN_TEXT, SearchPage, SearchQuery

T = TypeVar("T")
log = structlog.get_logger("traboule.app.console")

STATUSES = ("accepted", "duplicate", "rejected", "undelivered")
SCAN_WINDOW = 2000  # journal ids read per query by `JournalScan`
SCAN_MAX = 100_000  # journal ids `JournalScan` looks through for one page at most (then it offers the next page)
LOCATION = re.compile(r"([A-Z][A-Z0-9]{2}(?:-\d{1,3}(?:\.\d{1,3}){0,2})?)(?::|$)")  # PID-3, MSH-9.2: an error's start
CODE = re.compile(r"[A-Z]{2}")  # an ACK code (AE, AR)
WORKERS = 2  # console threads
QUEUED = 8  # console jobs running or waiting at most (beyond: `ConsoleBusy`)
RETRY_AFTER = 5  # seconds a refused request is told to wait
QUERY_TIMEOUT = 10.0  # seconds a console query may run on PostgreSQL (``[console] query_timeout``)
QUERY_CANCELED = "57014"  # the SQLSTATE of a statement cancelled (by its statement_timeout)


def bounded_stores(stores: Any, timeout_s: float) -> Any:
    """``stores`` for the console: on PostgreSQL a copy whose connections run each statement with a
    ``statement_timeout`` of ``timeout_s`` (``-c statement_timeout=`` in the startup ``options`` of its URL, after
    the URL's own, so that it wins over them; `traboule.stores.postgres.connect` adds its own default only when the
    URL sets none); on SQLite ``stores`` itself. The engine's stores, and the connections of ingest, are untouched."""
    if getattr(stores, "backend", "") != "postgresql":
        return stores
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    own = str(conninfo_to_dict(stores.url).get("options") or "").strip()
    setting = f"-c statement_timeout={max(1, round(timeout_s * 1000))}"
    bounded = copy.copy(stores)
    bounded.url = make_conninfo(stores.url, options=f"{own} {setting}".strip())
    return bounded


def timed_out(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a statement the database cancelled (SQLSTATE 57014:
    its ``statement_timeout``)."""
    for _ in range(8):  # a store may wrap the driver's error once or twice
        if exc is None:
            return False
        if getattr(exc, "sqlstate", None) == QUERY_CANCELED:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class JournalScan:
    """`traboule.stores.journal_search.JournalSearch` over the journal alone, newest first, in windows of ids."""

    def __init__(self, journal: Any) -> None:
        self.journal = journal

    def search(self, query: SearchQuery, *, before: int = 0, limit: int = 50) -> SearchPage:
        if query.accession or query.patient:
            raise ValueError("searching by accession number or patient needs the journal's search index")
        text = query.text.strip().lower()
        if query.text and len(text) < MIN_TEXT:
            raise ValueError(f"a text search needs at least {MIN_TEXT} characters")
        limit = max(1, min(limit, MAX_LIMIT))
        high = (before - 1) if before > 0 else self.journal.last_id()
        found: list[JournalEntry] = []
        scanned = 0
        while high >= 1 and scanned < SCAN_MAX:
            low = max(1, high - SCAN_WINDOW + 1)
            selection = Query(
                ranges=[(low, high)],
                statuses=query.statuses,
                types=query.types,
                channels=query.channels,
                since=query.since,
                until=query.until,
            )
            for entry in reversed(self.journal.select(selection, after=low - 1, limit=SCAN_WINDOW)):
                if query.control_id and entry.control_id != query.control_id:
                    continue
                if text and text not in entry.raw.decode("latin-1").lower():
                    continue
                found.append(entry)
                if len(found) == limit:
                    return SearchPage(found, next_before=entry.id if entry.id > 1 else 0)
            scanned += high - low + 1
            high = low - 1
        return SearchPage(found, next_before=high + 1 if high >= 1 else 0)

    def keys_of(self, message_id: int) -> dict[str, list[str]]:
        return {}


class Reader:
    """The console's journal and search index, one of each per console thread (`run`)."""

    def __init__(self, runtime: Any, workers: int = WORKERS, queued: int = QUEUED) -> None:
        self.runtime = runtime
        self.timeout = float(getattr(runtime.config, "console_query_timeout", QUERY_TIMEOUT))
        self.stores = bounded_stores(runtime.stores, self.timeout)  # what every console read opens
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="console")
        self._local = threading.local()
        self.queued = queued
        self.pending = 0  # jobs submitted and not finished (a request gone does not end its job)
        self._lock = threading.Lock()
        self.indexed = hasattr(self.stores, "journal_search")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on a console thread; `ConsoleBusy` when `queued` jobs are already running or waiting."""
        with self._lock:
            if self.pending >= self.queued:
                raise ConsoleBusy()
            self.pending += 1
        context = contextvars.copy_context()

        def job() -> T:
            try:
                return context.run(work, *args)
            finally:
                with self._lock:
                    self.pending -= 1

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    @property
    def journal(self) -> Any:
        """This console thread's own journal connection (on a console thread only)."""
        journal = getattr(self._local, "journal", None)
        if journal is None:
            journal = self._local.journal = self.stores.journal()
        return journal

    @property
    def index(self) -> Any:
        """The search index, or `JournalScan` until the store factory has one (on a console thread only)."""
        search = getattr(self._local, "search", None)
        if search is None:
            search = self.stores.journal_search() if self.indexed else JournalScan(self.journal)
            self._local.search = search
        return search

    @property
    def deliveries(self) -> Any:
        """This console thread's delivery log (`traboule.stores.delivery_log`; on a console thread only)."""
        log = getattr(self._local, "deliveries", None)
        if log is None:
            log = self._local.deliveries = self.stores.delivery_log()
        return log

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- on the console's thread -------------------------------------------------------------------------------

    def search(self, query: SearchQuery, before: int, limit: int) -> SearchPage:
        return self.index.search(query, before=before, limit=limit)

    def entry(self, message_id: int) -> tuple[JournalEntry | None, dict[str, list[str]]]:
        entry = self.journal.get(message_id)
        keys = self.index.keys_of(message_id) if entry is not None else {}
        return entry, keys

    def destinations(self, entry: JournalEntry) -> list[Any] | None:
        """What each destination recorded of ``entry`` (`DeliveryLog.of`), None when the log cannot be read."""
        if not entry.idempotency_key or not hasattr(self.stores, "delivery_log"):
            return []
        try:
            return list(self.deliveries.of(entry.idempotency_key, entry.correlation_id))
        except Exception as exc:  # the page shows the message without it
            log.warning("console.delivery_log_unreadable", error=type(exc).__name__)
            return None

    def activity(self, channels: list[str]) -> dict[str, Any]:
        """Journal entries per channel and status, received in the last hour and in the last 24 hours, the outbox
        backlog and each channel's last rejection of the day (``rejected``). Each window starts at the first journal
        id received at or after its start (found by bisection on ids), so that every count is a range of the
        (status, id) index."""
        now = datetime.now(UTC)
        out: dict[str, Any] = {"outbox": self.journal.outbox_depth(), "windows": {}}
        last = self.journal.last_id()
        for window, delta in (("hour", timedelta(hours=1)), ("day", timedelta(days=1))):
            after = self._first_id_since((now - delta).isoformat(timespec="milliseconds"), last) - 1
            counts: dict[str, dict[str, int]] = {}
            for channel in channels:
                counts[channel] = {
                    s: self.journal.count(Query(statuses=[s], channels=[channel]), after=after) for s in STATUSES
                }
            out["windows"][window] = counts
        # The last day's most recent rejection per channel: where and which code, never the error's text (it may
        # quote the message's values); found by bisection on ids with the same counts.
        out["rejected"] = {
            channel: self._last_rejected(channel, after, last) for channel in channels if counts[channel]["rejected"]
        }
        return out

    def _last_rejected(self, channel: str, after: int, last: int) -> dict[str, Any] | None:
        """The id, time, HL7 location and ACK code of ``channel``'s last rejected entry with an id above ``after``."""

        def found(low: int, high: int) -> bool:
            return self.journal.count(Query(statuses=["rejected"], channels=[channel], upto=high), after=low - 1) > 0

        low, high = after + 1, last
        if low > high or not found(low, high):
            return None
        while low < high:  # the answer is in [low, high]
            middle = (low + high + 1) // 2
            if found(middle, high):
                low = middle
            else:
                high = middle - 1
        entry = self.journal.get(low)
        if entry is None:
            return None
        where = LOCATION.match(entry.error)
        return {
            "id": entry.id,
            "received": entry.received,
            "location": where.group(1) if where else "",
            "code": entry.ack_code if CODE.fullmatch(entry.ack_code) else "",
        }

    def _first_id_since(self, since: str, last: int) -> int:
        """The lowest journal id received at or after ``since`` (``last + 1`` when none)."""
        low, high = 0, last  # invariant: entries up to ``low`` are older; the answer is in (low, high + 1]
        while low < high:
            middle = (low + high) // 2
            following = self.journal.select(Query(), after=middle, limit=1)
            if not following or following[0].id > high or following[0].received >= since:
                high = middle
            else:
                low = following[0].id
        return low + 1
