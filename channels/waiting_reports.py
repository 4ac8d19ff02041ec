"""Reports waiting for their study, the channel's side: settings, the archive read on demand, and the task that
publishes them through the journal's outbox once their study is known.

A structured report needs its study's DICOM object catalog. ``traboule.stores.reports`` keeps a report whose study
is not
known yet as *waiting* (durably, before the AA); this task then, on the engine's event loop:

* publishes every waiting report whose study became known: a batch of archive ``study.*`` or MPPS ``procedure.*``
  events wakes it with their Study UIDs and accession numbers, and only the waiting reports of those are looked at
  (indexed lookups: the cost of a wake does not grow with the number of waiting reports). A rescan, page by page
  (``RESCAN_BATCH`` rows per ``TICK``, in SQL, reading only the reports a catalog source names), catches what a wake
  missed; it runs at start, then every ``RESCAN`` seconds only if a catalog source was written meanwhile (or an
  archive is configured: it also reads the archive again for each waiting report every ``archive_recheck``, at
  most ``ARCHIVE_READS`` reads per tick). The document is stored, then its ``document.*`` event is added to the
  report message's journal entry (``Journal.append_events``) at once, so it goes through the outbox like any
  document and before any later version of the same set;
* moves those past their deadline to the dead letters (``expired``);
* writes every outcome (published, superseded, withdrawn, expired, invalid; a study of another patient left out)
  into the message's journal entry; a report whose entry was pruned gets a new one (never dropped);
* serves the operator's ``traboule reports publish N`` (a flag in the reports store, looked at every ``TICK``);
* warns (``report.waiting_over_cap``) while more than ``max_waiting`` reports wait.

Everything it works from is in the reports store and the journal: a restart (or kill -9) resumes where it was. A
document stored but not yet in the journal when the engine died is written on the next pass (with the same event
id: a consumer that saw it already knows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any

import structlog

from traboule.adapters.dicomweb import DICOMwebClient, value
from traboule.errors import ConfigError, ReportRefused
from traboule.model import Envelope, Study, content_key, is_uid
from traboule.stores import Journal, ReportStore
from traboule.stores.journal import JournalEntry, OutboxEvent

log = structlog.get_logger("traboule.channels.waiting_reports")

TICK = 2.0  # seconds between two looks at operator requests, deadlines and outcomes to journal
RESCAN = 30.0  # seconds between two looks at every waiting report without a wake-up (when a catalog source changed)
RESCAN_BATCH = 1000  # waiting reports looked at per tick by a rescan (SQL; only those a catalog source names are read)
ARCHIVE_READS = 10  # reads of the archive per tick at most (a rescan goes on from there on the next one)
MAX_WAITING = 5000  # waiting reports above which a warning is logged (reports.max_waiting)
CAP_WARNING_EVERY = 600.0  # seconds between two warnings while above it
ARCHIVE_TIMEOUT = 5.0  # seconds an on-demand read of the archive may take (search + metadata)
ARCHIVE_RECHECK = 300.0  # seconds between two reads of the archive for the same waiting report
UNJOURNALED = 60.0  # seconds an outcome may wait for its message's journal entry before the report is dropped
MAX_ACCESSION = 64


class ArchiveReader:
    """Reads a study from the archive on demand: QIDO-RS search (Study Instance UID, else accession number), then
    WADO-RS metadata, within ``timeout`` seconds. Received values reach the URL only as checked query parameters
    (a UID, or an accession number without wildcards) and checked path segments (the client's)."""

    def __init__(self, archive: dict[str, Any], timeout: float = ARCHIVE_TIMEOUT) -> None:
        auth = (archive["username"], archive.get("password", "")) if archive.get("username") else None
        self.name = str(archive["name"])
        self.timeout = timeout
        self.client = DICOMwebClient(archive["dicomweb"], timeout=timeout, auth=auth, token=archive.get("token", ""))

    async def close(self) -> None:
        await self.client.close()

    async def study(self, study_uid: str, accession: str) -> Study | None:
        """The study, or None when the archive does not have it (yet), is ambiguous, or cannot be read in time."""
        try:
            return await asyncio.wait_for(self._study(study_uid, accession), self.timeout)
        except Exception as exc:  # the archive is down or slow: the report waits
            log.warning("report.archive_unread", archive=self.name, error=type(exc).__name__)
            return None

    async def _study(self, study_uid: str, accession: str) -> Study | None:
        from traboule.channels.archive import study_from_metadata

        if is_uid(study_uid):
            match = {"StudyInstanceUID": study_uid}
        elif accession and _plain_accession(accession):
            match = {"AccessionNumber": accession}
        else:
            return None
        found = await self.client.search_studies(**match)
        uids = {value(r, "0020000D") for r in found if _same(r, match)}
        uids = {u for u in uids if isinstance(u, str) and is_uid(u)}
        if len(uids) != 1:  # none yet, or two studies for one accession number: not ours to choose
            return None
        (uid,) = uids
        metadata = await self.client.study_metadata(uid)
        if not metadata:
            return None
        return study_from_metadata(metadata, endpoint=self.client.retrieve_url(uid))


def _plain_accession(accession: str) -> bool:
    """An accession number that matches only itself in QIDO-RS (no wildcard, no value separator)."""
    return len(accession) <= MAX_ACCESSION and accession.isprintable() and not any(c in accession for c in "*?\\")


def _same(result: dict[str, Any], match: dict[str, str]) -> bool:
    """Archives may match loosely (case, padding): keep only the exact answers."""
    tags = {"StudyInstanceUID": "0020000D", "AccessionNumber": "00080050"}
    return all(str(value(result, tags[k]) or "").strip() == v for k, v in match.items())


def archive_settings(runtime_config: Any, settings: dict[str, Any], channel: str) -> dict[str, Any] | None:
    """The archive channel a reports channel reads on demand: ``reports.archive`` names it (false: none), by default
    the first ``archive`` channel configured."""
    wanted = settings.get("archive", True)
    if wanted is False:
        return None
    archives = [c for c in getattr(runtime_config, "channels", []) if c.get("kind") == "archive"]
    if wanted is True:
        return archives[0] if archives else None
    found = next((c for c in archives if c.get("name") == wanted), None)
    if found is None:
        raise ConfigError(f"channel {channel}: reports.archive {wanted!r} is not an archive channel")
    return found


class WaitingReports:
    """The task that publishes a channel's waiting reports (see the module docstring)."""

    def __init__(
        self,
        channel: str,
        publisher: ReportStore,
        journal: Journal,
        executor: Executor,
        archive: ArchiveReader | None = None,
        *,
        archive_recheck: float = ARCHIVE_RECHECK,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.channel = channel
        self.publisher = publisher
        self.journal = journal
        self.executor = executor
        self.archive = archive
        self.archive_recheck = archive_recheck
        self.max_waiting = max_waiting
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._uids: set[str] = set()  # studies and accession numbers of the catalog events since the last look
        self._accessions: set[str] = set()
        self._cursor = 0  # the rescan in progress: the last row looked at (0: none in progress)
        self._scan_changes = -1  # the publisher's ``changes`` when the running (or last) rescan started
        self._scanned = float("-inf")  # when the last rescan ended
        self._counted = float("-inf")  # when the number of waiting reports was last compared with the cap
        self._over_cap = False
        self._warned = float("-inf")  # when the last warning about it was logged
        self._read: dict[str, float] = {}  # message key → when the archive was last read for it
        self._unjournaled: dict[str, float] = {}  # message key → since when its journal entry is looked for
        self._log = log.bind(channel=channel)

    def start(self) -> None:
        self._wake.set()  # a first pass at once: what waited before a restart (the rescan is due)
        self._task = asyncio.create_task(self._run(), name=f"{self.channel}-waiting-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.archive is not None:
            await self.archive.close()

    def wake(self, study_uids: Iterable[str] = (), accessions: Iterable[str] = ()) -> None:
        """Studies (or performed series) became known: look at the reports waiting for them now."""
        self._uids.update(u for u in study_uids if u)
        self._accessions.update(a for a in accessions if a)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK)
            self._wake.clear()
            try:
                await self.run_woken()
                for key in await self._call(self.publisher.requested):
                    await self._requested(key)
                if self.scan_due(time.monotonic()):
                    await self.rescan_batch()
                await self._settle()
                await self._watch()
            except Exception as exc:  # a store or journal error: try again on the next tick
                self._log.error("report.waiting_failed", error=type(exc).__name__)

    async def run_woken(self) -> int:
        """Publish the waiting reports of the studies and accession numbers named since the last look (indexed
        lookups: a wake costs what its studies concern, not the number of waiting reports); returns how many were
        published."""
        uids, accessions = self._uids, self._accessions
        self._uids, self._accessions = set(), set()
        published = 0
        if uids or accessions:
            for key in await self._call(self.publisher.waiting_for, uids, accessions):
                published += await self._publish(key)
        return published

    def scan_due(self, now: float) -> bool:
        """Whether to look at a page of every waiting report now: a rescan is in progress, or ``RESCAN`` seconds
        passed since the last one and a catalog source was written since it started (or an archive can be read: it
        may hold studies nobody told the engine about). The first one runs at start (what waited before)."""
        if self._cursor:
            return True
        if now - self._scanned < RESCAN:
            return False
        return self.archive is not None or self.publisher.changes != self._scan_changes

    async def rescan_batch(self) -> int:
        """One page of the rescan (``RESCAN_BATCH`` rows from the cursor): publish those a catalog source names (the
        SQL says which, without reading the others), read the archive for those due (at most ``ARCHIVE_READS``: the
        page then ends there). Returns how many were published."""
        if not self._cursor:
            self._scan_changes = self.publisher.changes
        rows = await self._call(self.publisher.scan, self._cursor, RESCAN_BATCH)
        published = reads = 0
        last = self._cursor
        for n, key, study_uid, accession, candidate in rows:
            if candidate and await self._publish(key):
                published += 1
            elif self.archive is not None and self._due(key):
                if reads == ARCHIVE_READS:
                    break  # the next tick goes on from here
                reads += 1
                published += await self._read_archive(key, study_uid, accession)
            last = n
        else:
            if len(rows) < RESCAN_BATCH:  # the end: the next rescan when something changes
                last = 0
                self._scanned = time.monotonic()
        self._cursor = last
        return published

    async def run_once(self, requested: set[str] | None = None) -> int:
        """A whole pass (the rescan from its start to its end, the operator's requests), then the outcomes; returns
        how many reports were published."""
        published = 0
        for key in requested or ():
            published += await self._requested(key)
        self._cursor = 0
        published += await self.rescan_batch()
        while self._cursor:
            published += await self.rescan_batch()
        await self._settle()
        return published

    def _due(self, key: str) -> bool:
        return time.monotonic() - self._read.get(key, float("-inf")) >= self.archive_recheck

    async def _read_archive(self, key: str, study_uid: str, accession: str) -> bool:
        assert self.archive is not None
        self._read[key] = time.monotonic()
        study = await self.archive.study(study_uid, accession)
        if study is None:
            return False
        await self._call(self.publisher.remember, [study])
        return await self._publish(key)

    async def _requested(self, key: str) -> bool:
        """An operator asked: publish it now if its study is known, else read the archive for it at once."""
        if await self._publish(key):
            return True
        row = await self._call(self.publisher.held, key)
        if self.archive is None or row is None or row["status"] != "waiting":
            return False
        return await self._read_archive(key, row["study_uid"], row["accession"])

    async def _settle(self) -> None:
        expired = await self._call(self.publisher.expire)
        if expired:
            self._log.warning("report.wait_expired", reports=expired)
        for row in await self._call(self.publisher.unnoted):
            await self._note(row)

    async def _watch(self) -> None:
        """Every ``RESCAN`` seconds: a warning while more reports wait than ``max_waiting`` (nothing is refused)."""
        now = time.monotonic()
        if now - self._counted < RESCAN:
            return
        self._counted = now
        counts = await self._call(self.publisher.counts)
        over = counts["waiting"] > self.max_waiting
        if over and (not self._over_cap or now - self._warned >= CAP_WARNING_EVERY):
            self._warned = now
            self._log.warning("report.waiting_over_cap", waiting=counts["waiting"], max_waiting=self.max_waiting)
        self._over_cap = over

    async def _publish(self, key: str) -> bool:
        try:
            doc = await self._call(self.publisher.publish_waiting, key)
        except ReportRefused:
            self._log.error("report.invalid_after_wait", message_key=key)
            return False
        if doc is None:
            return False
        # At once, with no await before it: the event is in the outbox before a later version of the set, whose
        # preparation waits behind this one on the same executor, can be journaled.
        for row in self.publisher.unnoted():
            if row["message_key"] == key:
                await self._note(row)
        self._read.pop(key, None)
        return True

    async def _note(self, row: dict[str, Any]) -> None:
        """Write one outcome into the journal entry of its message (the document event with it, when published).
        A report whose entry was recorded (``journal_id``) but is gone (``journal prune``) gets a new entry with the
        same idempotency key, the outcome and its event: a journaled report is never dropped."""
        key, status = row["message_key"], row["status"]
        events: list[OutboxEvent] = []
        if status == "published":
            doc = self.publisher.document(row["document_id"])
            if doc is None:
                return
            env = Envelope(doc, source=self.channel, idempotency_key=f"{key}:0", correlation_id=key)
            env.id = content_key("published-late", key, doc.id)  # the same event if written again after a crash
            events.append(OutboxEvent(f"document.{doc.action}", env.id, env.to_json()))
            note = f"published once its study was known: document {doc.id} (version {doc.version})"
        elif status in ("superseded", "withdrawn"):
            if not self.journal.accepted(row["superseded_by"]):  # the later message is not journaled (yet)
                return
            note = f"not published: {status} by a later message before its study was known"
        elif status == "waiting":
            note = f"still waiting for its study: {row['remark']}"
        else:
            note = f"not published ({status}: dead letter, traboule reports publish {row['n']}): {row['reason']}"
        journal_id = self.journal.append_events(key, events, note)
        if not journal_id and row.get("journal_id"):
            journal_id = await self._journal_again(row, events, note)
        if not journal_id:
            # Its message is being journaled (the study came while it was answered): the next tick writes it. Still
            # not there a minute later, it was not accepted after all: nothing of it may be published (``discard``
            # keeps it if its entry was recorded meanwhile).
            since = self._unjournaled.setdefault(key, time.monotonic())
            if time.monotonic() - since > UNJOURNALED:
                self._log.error("report.unjournaled", waiting=row["n"], status=status)
                await self._call(self.publisher.discard, key)
                self._unjournaled.pop(key, None)
            return
        self._unjournaled.pop(key, None)
        if status not in ("waiting", "published"):
            self._read.pop(key, None)
        await self._call(self.publisher.noted, row["n"], journal_id)
        self._log.info("report.settled", waiting=row["n"], status=status, message_id=journal_id, events=len(events))

    async def _journal_again(self, row: dict[str, Any], events: list[OutboxEvent], note: str) -> int:
        """A new journal entry for a report whose entry was pruned: no raw bytes (gone with the entry), its
        idempotency key (a resend of the message is then a duplicate, and later outcomes are written here)."""
        entry = JournalEntry(
            channel=self.channel,
            raw=b"",
            status="accepted",
            warnings=f"journal entry {row['journal_id']} of this report was pruned before its outcome: {note}",
            idempotency_key=row["message_key"],
            correlation_id=row["message_key"],
        )
        written = await self.journal.append(entry, events)
        if written.status != "accepted":  # accepted again meanwhile (a resend): the next tick writes there
            return 0
        self._log.warning("report.journaled_again", waiting=row["n"], pruned=row["journal_id"], message_id=written.id)
        return int(written.id)

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
