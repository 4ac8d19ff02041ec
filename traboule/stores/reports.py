"""Reports → published documents: identity and versions, the CDA, its validation, before the sender is answered.

An inbound HL7 channel with ``reports`` configured hands each canonical ``Report`` to ``ReportPublisher.prepare``
*before* journaling and acknowledging it. The result is a ``Document`` event (``document.publish`` /
``document.replace`` / ``document.delete``) carrying the CDA; a report that cannot make a valid document is
answered AE with the reason and journaled as rejected, so nothing is half-published.

* Versions: one document set per accession number. The first report publishes version 1; a correction (OBX-11 C,
  MDM^T10) publishes version n+1 with the same setId and ``relatedDocument`` RPLC to version n; a deletion (OBX-11
  D, MDM^T04) withdraws the current version. Ids traboule creates are OIDs: setId ``<document_oid>.<n>``, id
  ``<setId>.<version>``.
* A ready CDA in the message (ED OBX, level 1 or 3) is published as it is, with its own ids.
* Idempotent: the same message (same idempotency key) prepares the same document again, without a new version.
* Catalog: the DICOM object catalog of a level-3 report comes from the study the archive reported (``study.*``
  events), else from the performed series of the exam's MPPS (``procedure.*`` events), else from a read of the
  archive on demand (by the channel, before ``prepare``); the order (seen by the same channel) gives the procedure
  code and identifiers a report message may lack. Only the report's own study (its Study Instance UID when it has
  one, else its accession number) of the report's own patient (``same_patient``) is ever its catalog.
* Waiting for the study: a structured report whose study none of them knows yet is checked with a stand-in
  catalog (built and validated: whatever else is wrong is still an AE) and kept, durably, as *waiting*
  (``waiting`` table) before the sender gets its AA; it is published (``publish_waiting``) once its study is
  known, as if the study had come first. A later version of the same set supersedes it (it is never published); a
  deletion withdraws it. Past its deadline it is *expired*, and a CDA the validators refuse at that point is
  *invalid*: both are dead letters, published again on request (``request_publication``). Each outcome is written
  to the message's journal entry by the channel (``unnoted`` / ``noted``).

The rules live here once, in `ReportPublisher` (which implements `traboule.stores.ReportStore`, whose docstring
states the guarantees every backend keeps); the tables are behind `ReportStorage`: `SQLiteReportStorage`
(``<data_dir>/<channel>.reports.sqlite``, WAL, ``Durability.POWER_LOSS``: one node) or
`traboule.stores.postgres.reports.PostgresReportStorage` (one database shared by every node). Each write of a
set's outcome (a version, a deletion, a waiting report) is one storage transaction that checks the set's current
version is still the one the document was built on; when another node changed it meanwhile the storage raises
`ReportConflict` and the publisher prepares the report again from the new state (`RETRIES` times at most).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from traboule import model
from traboule.errors import CDAError, ReportConflict, ReportRefused
from traboule.stores.sqlite import Durability, open_database
from traboule.translate.cda import CDAMapping, DocumentIds, decode_attachment, placeholder_study, read_header

log = structlog.get_logger("traboule.stores.reports")

WAIT_FOR_STUDY = 24 * 3600.0  # seconds a structured report waits for its study by default
DEAD = ("expired", "invalid")  # dead letters: published again only on request
HELD = ("waiting", *DEAD)  # reports not published yet that a later version supersedes
MAX_REPORT_NUMBER = 2**63 - 1  # the largest row number SQLite (and a PostgreSQL bigint) has
# Preparations of one report when other nodes changed its set meanwhile (`ReportConflict`): each lost one means
# another node stored a version of the set, so a report loses as many times as versions are stored concurrently.
RETRIES = 10

# The columns of a held report as ``waiting``, ``held`` and the ``traboule reports`` command list it.
LISTED = ("n", "message_key", "status", "accession", "study_uid", "received", "deadline", "reason", "journal_id",
          "document_id", "superseded_by", "remark")  # fmt: skip
# The columns ``unnoted`` lists.
UNNOTED = ("n", "message_key", "status", "reason", "superseded_by", "document_id", "journal_id", "remark")


@dataclass
class Held:
    """A report that made no document now (nothing to publish yet); ``note`` goes into its journal entry."""

    note: str
    new: bool = True  # False when the same message was held before (a resend)


@dataclass
class Waiting(Held):
    """Accepted and kept until its study is known (row ``n`` of the ``waiting`` table)."""

    n: int = 0


@dataclass
class Withdrawn(Held):
    """A deletion of a set whose only versions were still waiting: they are withdrawn, nothing is published."""


@dataclass
class Discarded:
    """What `ReportStorage.discard` undid (all zero/empty: nothing was there)."""

    refused: int = 0  # the held report's row number when it has a recorded journal entry: nothing undone
    waiting: int = 0  # its own waiting row removed
    restored: int = 0  # waiting rows it had superseded, waiting again
    document_id: str = ""  # the version it made (removed), or deleted (current again)
    action: str = ""


class ReportStorage(Protocol):
    """The tables of a reports store: what `ReportPublisher` reads and writes, nothing it decides. Every method is
    one transaction (committed, durably, when it returns); thread-safe. Texts are given and returned as they are
    (a backend escapes what it cannot hold); ``deadline`` is epoch seconds, ``received`` ISO 8601 UTC."""

    path: str  # where it is, for messages (a file, a URL without password)

    def close(self) -> None: ...

    # -- catalog sources -----------------------------------------------------------------------------------------

    def remember(
        self,
        orders: list[tuple[str, dict[str, Any]]],
        studies: list[tuple[str, str, str]],
        steps: list[tuple[str, str, str, str]],
        merge: Callable[[Any, Any], Any],
    ) -> None:
        """Orders (accession, summary: ``merge(stored, new)`` over a stored one), studies (uid, accession, JSON:
        replaced) and performed steps (uid, study uid, accession, JSON: replaced), in one transaction."""
        ...

    def order(self, accession: str) -> dict[str, Any] | None: ...

    def sources(self, by: str, value: str) -> tuple[list[str], list[str]]:
        """The studies (JSON, the latest stored first) and the performed steps (JSON) whose ``by`` (``study``: the
        Study Instance UID, ``accession``) is ``value``."""
        ...

    # -- documents ---------------------------------------------------------------------------------------------

    def message(self, message_key: str) -> tuple[str, str] | None:
        """(document id, action) of what a message made."""
        ...

    def document(self, doc_id: str) -> model.Document | None: ...

    def current(self, set_id: str) -> model.Document | None: ...

    def set_of(self, set_key: str) -> str | None: ...

    def new_set(self, set_key: str, set_id: str, prefix: str) -> str:
        """The set id of ``set_key``, created when new with ``set_id`` (``""``: ``<prefix>.<n>``, ``n`` the set's
        number in this store); another writer's set when it created the same key first."""
        ...

    def last_version(self, set_id: str) -> int:
        """The highest version the set ever had (deleted ones included), 0 for none."""
        ...

    def store(self, doc: model.Document, message_key: str, *, current: str, supersede: str, withdraw: bool) -> None:
        """The version (``doc.action`` delete: the deleted one), in one transaction: the version it replaces
        superseded, the message that made it, the held versions of ``supersede`` (a set key) superseded (or
        ``withdraw``: withdrawn), the message's own waiting row published. ``ReportConflict`` (nothing written) when
        the set's current version is no longer ``current`` (its id, ``""``: none), the message's waiting row is no
        longer waiting, or the document id or the message key is taken."""
        ...

    # -- reports held --------------------------------------------------------------------------------------------

    def wait(
        self, message_key: str, set_key: str, accession: str, study_uid: str, deadline: float, report: str, remark: str
    ) -> tuple[int, int]:
        """Keep a report as waiting (superseding the held versions of its set) in one transaction: (its row number,
        how many it superseded). ``ReportConflict`` when the message key is held already."""
        ...

    def withdraw(self, set_key: str, message_key: str) -> int:
        """The held versions of a set withdrawn by a deletion (``message_key``); how many."""
        ...

    def held_again(self, message_key: str, deadline: float) -> tuple[int, str, float] | None:
        """(n, status, deadline) of the message's held report, a dead letter waiting again until ``deadline``."""
        ...

    def withdrawn_by(self, message_key: str) -> int: ...

    def waiting_report(self, message_key: str) -> tuple[str, str] | None:
        """(the report's JSON, status) of a held report."""
        ...

    def remark(self, message_key: str, remark: str) -> None:
        """Why a waiting report still waits (to note in its journal entry when it changed)."""
        ...

    def settle(self, message_key: str, status: str, reason: str) -> None:
        """A waiting report that can no longer be published: ``status`` (a dead letter) with the reason."""
        ...

    def rows(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]: ...

    def row(self, *, n: int = 0, message_key: str = "") -> dict[str, Any] | None: ...

    def waiting_for(self, study_uids: list[str], accessions: list[str]) -> list[str]: ...

    def scan(self, after: int, limit: int) -> list[tuple[int, str, str, str, bool]]: ...

    def counts(self) -> dict[str, int]: ...

    def expire(self, now: float) -> int: ...

    def request(self, n: int, deadline: float) -> str | None:
        """An operator's ask to publish report ``n`` (waiting again until ``deadline``); its status before."""
        ...

    def requested(self) -> list[str]: ...

    def unnoted(self) -> list[dict[str, Any]]: ...

    def noted(self, n: int, journal_id: int) -> None: ...

    def journaled(self, message_key: str, journal_id: int) -> None: ...

    def kept(self) -> set[str]:
        """Message keys whose journal entries must stay (held reports, outcomes not noted yet)."""
        ...

    # -- undo --------------------------------------------------------------------------------------------------

    def recent(self, limit: int) -> list[str]:
        """The message keys of the latest versions and of the latest waiting reports without a journal entry."""
        ...

    def discard(self, message_key: str) -> Discarded: ...


class ReportPublisher:
    """Prepares the documents of one inbound channel (blocking calls: run them in a thread): the
    `traboule.stores.ReportStore`, on the SQLite file at ``path`` or on a `ReportStorage` given instead.

    ``wait_for_study``: seconds a structured report waits for its study (0: refused at once, AE, as before)."""

    def __init__(
        self,
        mapping: CDAMapping,
        path: Path | str | ReportStorage,
        validator: Any = None,
        *,
        wait_for_study: float = WAIT_FOR_STUDY,
    ) -> None:
        self.mapping = mapping
        self.validator = validator
        self.wait_for_study = wait_for_study
        self.storage: ReportStorage = SQLiteReportStorage(path) if isinstance(path, (str, Path)) else path
        self.path = self.storage.path
        # One report of a set at a time on this node: two versions of a set (or the same message on two
        # connections) must not interleave between reading the set's current version and storing the next; reports
        # of other sets are prepared at once (their validations run in parallel, see `parallel`). What the keys do
        # not catch (another node's writes, a ready CDA naming another set) is caught by the storage: `ReportConflict`.
        self._locks = _KeyLocks()
        self.changes = 0  # catalog sources written (studies, performed steps): the waiting task rescans on a change
        # Whether a catalog source is of the report's patient; the orders channel gives its identity registry's
        # (`PatientIdentities.same_patient`: merges followed, a study of a merged IPP is its survivor's).
        self.same_patient: Callable[[model.Patient, model.Patient], bool] = same_patient

    @property
    def parallel(self) -> int:
        """How many reports are worth preparing at once: the validator's processes (1 without one)."""
        processes = getattr(self.validator, "processes", 1)
        return processes if isinstance(processes, int) and processes > 0 else 1

    @property
    def _db(self) -> sqlite3.Connection:
        """The SQLite connection (what a benchmark fills directly)."""
        return self.storage.db  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        self.storage.close()

    # -- what the channel sees besides reports ---------------------------------------------------------------

    def remember(self, payloads: list[Any]) -> None:
        """Orders (by accession number: their procedure code and identifiers complete a terse report) and studies
        the archive holds (the DICOM object catalog), in one transaction."""
        orders = [
            (p.accession_number.value, _order_summary(p))
            for p in payloads
            if isinstance(p, model.ImagingOrder) and p.accession_number.value
        ]
        studies = [
            (p.study_instance_uid, p.accession_number, json.dumps(model.plain(p), ensure_ascii=False))
            for p in payloads
            if isinstance(p, model.Study) and p.study_instance_uid
        ]
        # Performed steps that reference instances (an N-SET without them never blanks what an earlier one said).
        steps = [
            (
                p.sop_instance_uid,
                p.study_instance_uid,
                p.accession_number,
                json.dumps(model.plain(p), ensure_ascii=False),
            )
            for p in payloads
            if isinstance(p, model.PerformedStep) and p.sop_instance_uid and any(s.instances for s in p.series)
        ]
        if not orders and not studies and not steps:
            return
        if studies or steps:
            self.changes += 1
        self.storage.remember(orders, studies, steps, _overlay)  # a status message completes, never blanks

    def remember_order(self, order: model.ImagingOrder) -> None:
        self.remember([order])

    def remember_study(self, study: model.Study) -> None:
        self.remember([study])

    def study_for(self, report: model.Report) -> model.Study | None:
        found = self.catalog_for(report)
        return found[0] if found else None

    def catalog_for(self, report: model.Report) -> tuple[model.Study, str] | None:
        """The study of a report's DICOM object catalog and where it comes from (``archive``, ``mpps``): the study
        the archive reported, else the series and instances the modality reported performed (MPPS); only of the
        report's own study and patient (``_sources``)."""
        return self._catalog(report)[0]

    def _catalog(self, report: model.Report) -> tuple[tuple[model.Study, str] | None, str]:
        """The catalog (as ``catalog_for``) and, when there is none, why a known study was not taken ("" else)."""
        studies, steps, refused = self._sources(report)
        if studies:
            return (studies[0], "archive"), ""
        study = _performed_study(steps)
        return ((study, "mpps") if study is not None else None), refused

    def _sources(
        self, report: model.Report, *, unidentified: bool = False
    ) -> tuple[list[model.Study], list[model.PerformedStep], str]:
        """The archive's studies (latest first) and the performed steps (MPPS) that may make the report's catalog:
        those of its Study Instance UID when it has one (as sent, or its order's), else of its accession number;
        of them, only those of the report's patient (``same_patient``; ``unidentified``: and the steps that name no
        patient at all). Also says what was left out ("" when nothing was), without patient data: it goes into the
        journal entry.

        A report with a Study Instance UID is never matched by its accession number: one accession number may cover
        several requested procedures, each its own study (IHE's grouped procedures), and a sibling's images are not
        this report's. A modality that gives the exam a new Study Instance UID instead of the worklist's leaves the
        report waiting until its deadline, then a dead letter an operator sees."""
        uid, accession = report.study_instance_uid, report.accession_number.value
        if uid:
            key, found = "Study Instance UID", self.storage.sources("study", uid)
        elif accession:
            key, found = "accession number", self.storage.sources("accession", accession)
        else:
            return [], [], ""
        studies = [model.from_dict(model.Study, json.loads(text)) for text in found[0]]
        steps = [model.from_dict(model.PerformedStep, json.loads(text)) for text in found[1]]
        mine = [s for s in studies if self.same_patient(report.patient, s.patient)]
        mine_performed = [
            s
            for s in steps
            if self.same_patient(report.patient, s.patient)
            or (unidentified and not any(i.value for i in s.patient.ids))
        ]
        what = [
            w
            for w, left in (
                ("a study of the archive", len(studies) > len(mine)),
                ("a study performed (MPPS)", len(steps) > len(mine_performed)),
            )
            if left
        ]
        refused = (
            f"{' and '.join(what)} with its {key} is not of the report's patient (another patient, or no patient"
            " identifier): not taken as its catalog"
            if what
            else ""
        )
        return mine, mine_performed, refused

    def missing_study(self, report: model.Report) -> tuple[str, str] | None:
        """(Study Instance UID, accession number) of a structured report whose study no catalog source knows yet
        (the channel may then read the archive before ``prepare``), else None."""
        if report.action == "delete" or report.attachment_type in ("application/pdf", "text/xml"):
            return None
        probe = model.from_dict(model.Report, model.plain(report))
        self._complete(probe)
        if self.catalog_for(probe) is not None:
            return None
        return probe.study_instance_uid, probe.accession_number.value  # what the archive gives is checked as well

    def performed_end(self, report: model.Report) -> str:
        """When the exam ended as its MPPS said (the latest end of the performed steps of the report's study, else
        of its accession number, among those kept for the catalog: the steps that reported their instances), or "".
        A time only, never images: a step that names no patient counts, one of another patient does not."""
        ends = [step.ended for step in self._sources(report, unidentified=True)[1]]
        return max((e for e in ends if e[:8].isdigit()), default="")

    def order_for(self, accession: str) -> model.ImagingOrder | None:
        found = self.storage.order(accession)
        return model.from_dict(model.ImagingOrder, found) if found is not None else None

    # -- documents -------------------------------------------------------------------------------------------

    def document(self, doc_id: str) -> model.Document | None:
        return self.storage.document(doc_id)

    def current(self, set_id: str) -> model.Document | None:
        return self.storage.current(set_id)

    def prepare(self, report: model.Report, message_key: str) -> model.Document | Held:
        """The document event for ``report``, or ``Held`` when there is nothing to publish yet (the report waits for
        its study, or a deletion withdrew waiting versions); raises ``ReportRefused`` (AE) when it cannot be
        published."""
        pristine = model.plain(report)
        with self._locks.hold(f"message:{message_key}", _set_lock(report.accession_number.value)):
            for attempt in range(1, RETRIES + 1):
                try:
                    return self._prepare(report, message_key)
                except ReportConflict:
                    if attempt == RETRIES:
                        raise
                    log.info("report.conflict", attempt=attempt)  # another node wrote the set: again, from it
                    _pause(attempt)
                    report = model.from_dict(model.Report, pristine)
        raise AssertionError("unreachable")  # pragma: no cover

    def _prepare(self, report: model.Report, message_key: str) -> model.Document | Held:
        row = self.storage.message(message_key)
        if row is not None:  # the same message again: the same document, no new version
            again = self.document(row[0])
            if again is not None:
                again.action = row[1]
                again.report.action = row[1]
                return again
        held = self._held_again(message_key)
        if held is not None:
            return held
        self._complete(report)
        if not report.ended:  # OBR-8 empty: the end of the exam as the modality reported it (MPPS)
            report.ended = self.performed_end(report)
        try:
            if report.action == "delete":
                return self._delete(report, message_key)
            if report.attachment_type == "text/xml":
                return self._ready(report, message_key)
            return self._generated(report, message_key)
        except CDAError as exc:
            raise ReportRefused(str(exc)) from exc

    def _complete(self, report: model.Report) -> None:
        """Fill what the report message lacks from the order with the same accession number."""
        order = self.order_for(report.accession_number.value) if report.accession_number.value else None
        if order is None:
            return
        for attr in ("placer_order_number", "filler_order_number"):
            if not getattr(report, attr).value:
                setattr(report, attr, getattr(order, attr))
        if not report.accession_number.issuer_oid:
            report.accession_number = order.accession_number
        if not report.study_instance_uid:
            report.study_instance_uid = order.study_instance_uid
        unmapped = not report.procedure.code or self.mapping.acts.lookup((report.procedure.code,), "loinc") is None
        if unmapped and order.procedure.code:
            report.procedure = order.procedure
        if not report.modality and order.steps:
            report.modality = order.steps[0].modality

    def _set_for(self, key: str, set_id: str = "") -> tuple[str, model.Document | None]:
        """The document set of ``key`` (created when new, in one transaction) and its current version."""
        found = self.storage.set_of(key)
        if found is None:
            found = self.storage.new_set(key, set_id, self.mapping.document_oid)
        return found, self.current(found)

    def _next_version(self, set_id: str) -> int:
        """After every version the set ever had, deleted ones included (their ids stay taken)."""
        return self.storage.last_version(set_id) + 1

    def _generated(self, report: model.Report, message_key: str) -> model.Document | Held:
        key = _set_key(report)
        set_id, current = self._set_for(key)
        version, replaces = self._next_version(set_id), current.id if current is not None else ""
        ids = DocumentIds(f"{set_id}.{version}", set_id, version, replaces)
        level = 1 if report.attachment_type == "application/pdf" else 3
        found, refused = self._catalog(report) if level == 3 else (None, "")
        study = found[0] if found else None
        if level == 3 and study is None and self.wait_for_study > 0:
            return self._wait(report, message_key, ids, refused)
        if study is None and refused:  # not waiting: the AE says why the study known for it is not its catalog
            raise ReportRefused(refused, "PID-3", code="205")
        if current is None and report.action == "replace":
            log.warning("report.replaces_nothing", accession=report.accession_number.value, set_id=set_id)
        if study is not None:  # the same UID, or the study's (found by accession number: the report had none)
            report.study_instance_uid = study.study_instance_uid
        report.acts = [self.mapping.act_of(report, study)]
        data = self.mapping.build(report, ids, study)
        self._check(data)
        doc = document_of(self.mapping, report, data, ids, level=level)
        self.storage.store(doc, message_key, current=replaces, supersede=key, withdraw=False)
        return doc

    # -- reports waiting for their study ---------------------------------------------------------------------

    def _wait(self, report: model.Report, message_key: str, ids: DocumentIds, remark: str = "") -> Waiting:
        """Check everything but the catalog now (a stand-in one: AE for what the sender can fix), then keep the
        report as waiting, superseding the versions of its set still waiting, in one transaction. ``remark``: why a
        study known for it is not its catalog (said in the note)."""
        kept = json.dumps(model.plain(report), ensure_ascii=False)
        report.acts = [act := self.mapping.act_of(report, None)]
        self._check(self.mapping.build(report, ids, placeholder_study(report, act)))
        deadline = time.time() + self.wait_for_study
        n, superseded = self.storage.wait(
            message_key,
            _set_key(report),
            report.accession_number.value,
            report.study_instance_uid,
            deadline,
            kept,
            remark,
        )
        log.info("report.waiting", waiting=n, superseded=superseded, other_patient=bool(remark))
        return Waiting(_waiting_note(n, deadline, superseded) + (f"; {remark}" if remark else ""), n=n)

    def _held_again(self, message_key: str) -> Held | None:
        """The same message again, held before: the same answer (an expired one waits again, from now)."""
        row = self.storage.held_again(message_key, time.time() + self.wait_for_study)
        if row is None:
            withdrew = self.storage.withdrawn_by(message_key)
            return Withdrawn(_withdrawn_note(withdrew), new=False) if withdrew else None
        n, status, deadline = row
        if status == "waiting":
            return Waiting(_waiting_note(n, deadline, 0), new=False, n=n)
        return Held(f"report already held ({status}), see traboule reports waiting --all", new=False)

    def waiting(self, statuses: tuple[str, ...] = ("waiting",)) -> list[dict[str, Any]]:
        """Rows of the ``waiting`` table with these statuses, oldest first (without the report)."""
        return self.storage.rows(statuses)

    def publish_waiting(self, message_key: str) -> model.Document | None:
        """Publish a waiting report whose study is known now: the same document as if the study had come first (the
        row becomes ``published`` in the document's transaction; ``unnoted`` then lists it until its event is in the
        journal). None when it still waits (or waits no more: another node may have published it); ``ReportRefused``
        when the CDA cannot be made or is not valid: the row is then ``invalid`` (a dead letter) with the reason."""
        row = self.storage.row(message_key=message_key)
        accession = str(row.get("accession") or "") if row else ""
        with self._locks.hold(f"message:{message_key}", _set_lock(accession)):
            for attempt in range(1, RETRIES + 1):
                try:
                    return self._publish_waiting(message_key)
                except ReportConflict:
                    if attempt == RETRIES:
                        raise
                    log.info("report.conflict", attempt=attempt)
                    _pause(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _publish_waiting(self, message_key: str) -> model.Document | None:
        row = self.storage.waiting_report(message_key)
        if row is None or row[1] != "waiting":
            return None
        report = model.from_dict(model.Report, json.loads(row[0]))
        self._complete(report)
        found, refused = self._catalog(report)
        if found is None:
            if refused:  # said once in its journal entry (``unnoted``), each time the reason changes
                self.storage.remark(message_key, refused)
            return None
        try:
            doc = self._generated(report, message_key)
        except (CDAError, ReportRefused) as exc:
            reason = exc.reason if isinstance(exc, ReportRefused) else str(exc)
            self.storage.settle(message_key, "invalid", reason[:2000])
            raise ReportRefused(reason) from exc
        assert isinstance(doc, model.Document)
        return doc

    def waiting_for(self, study_uids: Any, accessions: Any) -> list[str]:
        """Message keys of the waiting reports of these studies or accession numbers (indexed: what a batch of
        catalog events may publish), oldest first."""
        return self.storage.waiting_for(sorted(set(study_uids) - {""}), sorted(set(accessions) - {""}))

    def scan(self, after: int, limit: int) -> list[tuple[int, str, str, str, bool]]:
        """A page of the waiting reports (``n`` above ``after``, at most ``limit``): (n, message key, Study UID,
        accession number, whether a catalog source names its study), in SQL, without reading the reports."""
        return self.storage.scan(after, limit)

    def held(self, message_key: str) -> dict[str, Any] | None:
        """The row of a held report (as ``waiting`` lists it), or None."""
        return self.storage.row(message_key=message_key)

    def counts(self) -> dict[str, int]:
        """How many reports wait for their study, and how many are dead letters (indexed counts: cheap)."""
        return self.storage.counts()

    def expire(self, now: float | None = None) -> int:
        """Waiting reports past their deadline become dead letters (``expired``); returns how many."""
        return self.storage.expire(time.time() if now is None else now)

    def requested(self) -> list[str]:
        """Message keys of the reports an operator asked to publish now (``request_publication``); clears the asks
        (each ask is handed to one caller, on one node)."""
        return self.storage.requested()

    def unnoted(self) -> list[dict[str, Any]]:
        """Outcomes not yet written to the journal entries of their messages (published, superseded, withdrawn,
        dead letters; why a waiting report still waits: ``remark``), with the entry's id when it is known."""
        return self.storage.unnoted()

    def noted(self, n: int, journal_id: int = 0) -> None:
        self.storage.noted(n, journal_id)

    def journaled(self, message_key: str, journal_id: int) -> None:
        """The journal entry of a waiting report's message (for the operator's listing)."""
        self.storage.journaled(message_key, journal_id)

    def _ready(self, report: model.Report, message_key: str) -> model.Document:
        data = decode_attachment(report)
        header = read_header(data)
        if not header.id:
            raise ReportRefused("the attached CDA has no id", "OBX-5")
        report.accession_number.value = report.accession_number.value or header.accession_number
        report.accession_number.issuer_oid = report.accession_number.issuer_oid or header.accession_oid
        report.study_instance_uid = report.study_instance_uid or header.study_instance_uid
        if not report.placer_order_number.value and header.placer_order_number:
            report.placer_order_number = model.Identifier(header.placer_order_number, "", header.placer_oid)
        if not report.accession_number.value:
            raise ReportRefused("report without an accession number (OBR-18, or the CDA's inFulfillmentOf)", "OBR-18")
        if self.document(header.id) is not None:
            raise ReportRefused(f"document {header.id} was already published; a new version needs a new id", "OBX-5")
        # The replaced version: as the message says (TXA-13), else as the CDA says (RPLC), else the set's current one.
        named = next((c for c in (report.replaced_document_id, header.replaces) if c and c != header.id), "")
        replaced = self.document(named) if named else None
        if named and replaced is None:
            raise ReportRefused(f"the document it replaces ({named}) was not published here", "TXA-13")
        if replaced is not None:
            latest = self.current(replaced.set_id)
            if latest is not None and latest.id != replaced.id:
                raise ReportRefused(f"it replaces {named}, which is not the current version ({latest.id})", "TXA-13")
        # The set: the CDA's setId, else the replaced version's set, else (a first version) its own id.
        set_key = header.set_id or (replaced.set_id if replaced else header.id)
        set_id, current = self._set_for(set_key, set_key)
        replaces = replaced.id if replaced else (current.id if current else "")
        if report.action == "replace" and not replaces:
            log.warning("report.replaces_nothing", set_id=set_id)
        ids = DocumentIds(header.id, set_id, header.version, replaces)
        self._check(data)
        doc = document_of(self.mapping, report, data, ids, level=header.level, header=header)
        if report.action == "publish" and replaces:
            doc.action = "replace"
        self.storage.store(doc, message_key, current=current.id if current else "", supersede="", withdraw=False)
        return doc

    def _delete(self, report: model.Report, message_key: str) -> model.Document | Held:
        current = None
        for doc_id in (report.replaced_document_id, report.document_id):
            found = self.document(doc_id) if doc_id else None
            if found is not None:
                current = self.current(found.set_id)
                break
        if current is None and report.attachment_type == "text/xml":
            header = read_header(decode_attachment(report))
            found = self.document(header.id)
            current = self.current(found.set_id) if found else self.current(header.set_id)
        if current is None and report.accession_number.value:
            set_id = self.storage.set_of(_set_key(report))
            current = self.current(set_id) if set_id is not None else None
        if current is None:
            if report.accession_number.value:  # versions still waiting for their study: withdrawn, in order
                withdrawn = self.storage.withdraw(_set_key(report), message_key)  # one statement
                if withdrawn:
                    return Withdrawn(_withdrawn_note(withdrawn))
            raise ReportRefused("no published document to delete for this report", "OBR-18")
        doc = model.from_dict(model.Document, model.plain(current))
        doc.action = "delete"
        doc.report.action = "delete"
        self.storage.store(doc, message_key, current=current.id, supersede=_set_key(doc.report), withdraw=True)
        return doc

    def discard(self, message_key: str) -> bool:
        """Undo what ``prepare`` stored for a message that was not journaled after all (the journal write failed,
        the engine stopped in between): the version goes, the one it superseded or deleted is current again.

        Never for a report held with a recorded journal entry (``journal_id``): it was journaled and answered AA, so
        an entry not found means pruned, not unjournaled; nothing of it goes (returns False)."""
        with self._locks.hold(f"message:{message_key}"):
            undone = self.storage.discard(message_key)
        if undone.refused:
            log.warning("report.discard_refused", waiting=undone.refused, reason="journaled")
            return False
        if undone.waiting or undone.restored:
            log.warning("report.discarded", waiting=undone.waiting, restored=undone.restored)
        if undone.document_id:
            log.warning("report.discarded", document_id=undone.document_id, action=undone.action)
        return bool(undone.waiting or undone.restored or undone.document_id)

    def reconcile(self, journaled: Any, recent: int = 100) -> int:
        """At start: discard what was prepared for messages the journal does not hold as accepted (a crash between
        the two writes can only concern the last ones: ``recent``), except reports with a recorded journal entry
        (pruned since: kept, see ``discard``). ``journaled(message_key) -> bool``. Returns how many were."""
        return sum(self.discard(key) for key in self.storage.recent(recent) if not journaled(key))

    def _check(self, data: bytes) -> None:
        if self.validator is None:
            return
        result = self.validator.validate(data)
        if not result.valid:
            problems = [result.xml_error] if result.xml_error else []
            problems += [f"XSD line {e.line}: {e.message}" for e in result.xsd_errors]
            problems += [f"{Path(f.schematron).stem}: {f.text}" for f in result.errors]
            raise ReportRefused(f"CDA not valid: {'; '.join(problems)}"[:900], "OBX", code="101")


SCHEMA = """
CREATE TABLE IF NOT EXISTS sets (
    n INTEGER PRIMARY KEY,
    set_key TEXT NOT NULL UNIQUE,      -- accession number (issuer|value), or the set id of a ready CDA
    set_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    set_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,              -- current | superseded | deleted
    created TEXT NOT NULL,
    document TEXT NOT NULL             -- the Document event (JSON)
);
CREATE INDEX IF NOT EXISTS documents_set ON documents (set_id, version);
CREATE TABLE IF NOT EXISTS messages (
    message_key TEXT PRIMARY KEY,      -- idempotency key of a report message
    document_id TEXT NOT NULL,         -- the document version it made
    action TEXT NOT NULL               -- publish | replace | delete
);
CREATE TABLE IF NOT EXISTS studies (uid TEXT PRIMARY KEY, accession TEXT NOT NULL, study TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS studies_accession ON studies (accession);
CREATE TABLE IF NOT EXISTS orders (accession TEXT PRIMARY KEY, orders TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS performed (      -- MPPS instances with performed series and instances
    uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    accession TEXT NOT NULL,
    step TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS performed_study ON performed (study_uid);
CREATE INDEX IF NOT EXISTS performed_accession ON performed (accession);
CREATE TABLE IF NOT EXISTS waiting (
    n INTEGER PRIMARY KEY,
    message_key TEXT NOT NULL UNIQUE,  -- idempotency key of the report message (its journal entry)
    set_key TEXT NOT NULL,
    accession TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    received TEXT NOT NULL,            -- ISO 8601 UTC
    deadline REAL NOT NULL,            -- epoch seconds: expired after
    status TEXT NOT NULL,              -- waiting | published | superseded | withdrawn | expired | invalid
    reason TEXT NOT NULL DEFAULT '',
    superseded_by TEXT NOT NULL DEFAULT '', -- message key of the report that superseded or withdrew it
    document_id TEXT NOT NULL DEFAULT '',
    journal_id INTEGER NOT NULL DEFAULT 0,
    noted INTEGER NOT NULL DEFAULT 0,  -- its last outcome is written to its journal entry
    requested INTEGER NOT NULL DEFAULT 0, -- an operator asked for it to be published now
    report TEXT NOT NULL,              -- the canonical Report (JSON)
    remark TEXT NOT NULL DEFAULT ''    -- why a waiting report still waits (a study of another patient), for its entry
);
CREATE INDEX IF NOT EXISTS waiting_status ON waiting (status, n);
CREATE INDEX IF NOT EXISTS waiting_set ON waiting (set_key, status);
"""
# Created after the migration (``remark`` may be missing from an older file): what the waiting task looks up often
# only goes through the rows it concerns.
INDEXES = """
CREATE INDEX IF NOT EXISTS waiting_by_accession ON waiting (status, accession);
CREATE INDEX IF NOT EXISTS waiting_by_study ON waiting (status, study_uid);
CREATE INDEX IF NOT EXISTS waiting_by_deadline ON waiting (status, deadline);
CREATE INDEX IF NOT EXISTS waiting_to_note ON waiting (n) WHERE noted = 0 AND (status != 'waiting' OR remark != '');
CREATE INDEX IF NOT EXISTS waiting_requested ON waiting (n) WHERE requested = 1;
CREATE INDEX IF NOT EXISTS messages_document ON messages (document_id);
"""

# Outcomes to write into journal entries, and the entries ``traboule journal prune`` keeps (both backends).
KEPT = (
    "SELECT message_key FROM {waiting} WHERE {scope}(status IN ('waiting', 'expired', 'invalid') OR noted = 0)"
    " UNION SELECT superseded_by FROM {waiting} WHERE {scope}noted = 0 AND superseded_by != ''"
)


class SQLiteReportStorage:
    """`ReportStorage` in a SQLite file (WAL, ``Durability.POWER_LOSS``): the store of one node. One connection,
    serialised; a transaction per write (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self.db = open_database(self.path, Durability.POWER_LOSS, threads=True, busy_timeout_s=busy_timeout_s)
        _create(self.db)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        with self._lock:
            return self.db.execute(sql, tuple(params)).fetchone()

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            return self.db.execute(sql, tuple(params)).fetchall()

    def _run(self, sql: str, params: Iterable[Any] = ()) -> int:
        with self._lock:
            return int(self.db.execute(sql, tuple(params)).rowcount or 0)

    # -- catalog sources -----------------------------------------------------------------------------------------

    def remember(
        self,
        orders: list[tuple[str, dict[str, Any]]],
        studies: list[tuple[str, str, str]],
        steps: list[tuple[str, str, str, str]],
        merge: Callable[[Any, Any], Any],
    ) -> None:
        with self._transaction() as db:
            # The orders already kept, read in one query per chunk (a batch is every order of half a second), then
            # each merged in the order received: a statement per batch rather than two per order.
            asked = list(dict.fromkeys(accession for accession, _ in orders))
            kept: dict[str, Any] = {}
            for start in range(0, len(asked), ORDERS_CHUNK):
                chunk = asked[start : start + ORDERS_CHUNK]
                marks = ",".join("?" * len(chunk))
                kept.update(db.execute(f"SELECT accession, orders FROM orders WHERE accession IN ({marks})", chunk))
            merged: dict[str, Any] = {}
            for accession, summary in orders:
                prior = merged[accession] if accession in merged else kept.get(accession)
                if isinstance(prior, str):
                    prior = json.loads(prior)
                merged[accession] = merge(prior, summary) if prior is not None else summary
            db.executemany(
                "INSERT OR REPLACE INTO orders VALUES (?, ?)",
                [(accession, orjson.dumps(summary).decode()) for accession, summary in merged.items()],
            )
            db.executemany(
                "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
                "accession = excluded.accession, study = excluded.study",
                studies,
            )
            db.executemany("INSERT OR REPLACE INTO performed VALUES (?, ?, ?, ?)", steps)

    def order(self, accession: str) -> dict[str, Any] | None:
        row = self._one("SELECT orders FROM orders WHERE accession = ?", (accession,))
        return json.loads(row[0]) if row else None

    def sources(self, by: str, value: str) -> tuple[list[str], list[str]]:
        study, step = {"study": ("uid", "study_uid"), "accession": ("accession", "accession")}[by]
        with self._lock:
            studies = self.db.execute(f"SELECT study FROM studies WHERE {study} = ? ORDER BY rowid DESC", (value,))
            found = [r[0] for r in studies.fetchall()]
            steps = self.db.execute(f"SELECT step FROM performed WHERE {step} = ?", (value,))
            return found, [r[0] for r in steps.fetchall()]

    # -- documents ---------------------------------------------------------------------------------------------

    def message(self, message_key: str) -> tuple[str, str] | None:
        row = self._one("SELECT document_id, action FROM messages WHERE message_key = ?", (message_key,))
        return (str(row[0]), str(row[1])) if row else None

    def document(self, doc_id: str) -> model.Document | None:
        row = self._one("SELECT document FROM documents WHERE id = ?", (doc_id,))
        return _document(row[0]) if row else None

    def current(self, set_id: str) -> model.Document | None:
        row = self._one(
            "SELECT document FROM documents WHERE set_id = ? AND status = 'current' ORDER BY version DESC LIMIT 1",
            (set_id,),
        )
        return _document(row[0]) if row else None

    def set_of(self, set_key: str) -> str | None:
        row = self._one("SELECT set_id FROM sets WHERE set_key = ?", (set_key,))
        return str(row[0]) if row else None

    def new_set(self, set_key: str, set_id: str, prefix: str) -> str:
        with self._transaction() as db:
            row = db.execute("SELECT set_id FROM sets WHERE set_key = ?", (set_key,)).fetchone()
            if row is not None:
                return str(row[0])
            (n,) = db.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM sets").fetchone()
            set_id = set_id or f"{prefix}.{n}"
            db.execute("INSERT INTO sets (n, set_key, set_id) VALUES (?, ?, ?)", (n, set_key, set_id))
        return set_id

    def last_version(self, set_id: str) -> int:
        (last,) = self._one("SELECT MAX(version) FROM documents WHERE set_id = ?", (set_id,))
        return int(last or 0)

    def store(self, doc: model.Document, message_key: str, *, current: str, supersede: str, withdraw: bool) -> None:
        text = _json(doc)
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM documents WHERE set_id = ? AND status = 'current' ORDER BY version DESC LIMIT 1",
                (doc.set_id,),
            ).fetchone()
            if (row[0] if row else "") != current:
                raise ReportConflict(f"set {doc.set_id}: its current version changed")
            if db.execute(
                "SELECT 1 FROM waiting WHERE message_key = ? AND status != 'waiting'", (message_key,)
            ).fetchone():
                raise ReportConflict("the report waits no more")
            if supersede:
                _supersede(db, supersede, message_key, "withdrawn" if withdraw else "superseded")
            db.execute(
                "UPDATE waiting SET status = 'published', document_id = ?, reason = '', noted = 0"
                " WHERE message_key = ? AND status = 'waiting'",
                (doc.id, message_key),
            )
            if doc.action == "delete":
                db.execute("UPDATE documents SET status = 'deleted', document = ? WHERE id = ?", (text, doc.id))
            else:
                if doc.replaces:
                    db.execute("UPDATE documents SET status = 'superseded' WHERE id = ?", (doc.replaces,))
                try:
                    db.execute(
                        "INSERT INTO documents (id, set_id, version, status, created, document) "
                        "VALUES (?, ?, ?, 'current', ?, ?)",
                        (doc.id, doc.set_id, doc.version, datetime.now().isoformat(timespec="seconds"), text),
                    )
                except sqlite3.IntegrityError as exc:
                    raise ReportConflict(f"document {doc.id} exists") from exc
            db.execute("INSERT OR REPLACE INTO messages VALUES (?, ?, ?)", (message_key, doc.id, doc.action))

    # -- reports held --------------------------------------------------------------------------------------------

    def wait(
        self, message_key: str, set_key: str, accession: str, study_uid: str, deadline: float, report: str, remark: str
    ) -> tuple[int, int]:
        with self._transaction() as db:
            superseded = _supersede(db, set_key, message_key, "superseded")
            try:
                cur = db.execute(
                    "INSERT INTO waiting (message_key, set_key, accession, study_uid, received, deadline, status,"
                    " report, remark, noted) VALUES (?, ?, ?, ?, ?, ?, 'waiting', ?, ?, 1)",
                    (message_key, set_key, accession, study_uid, _received(), deadline, report, remark),
                )
            except sqlite3.IntegrityError as exc:
                raise ReportConflict("the report is held already") from exc
        return int(cur.lastrowid or 0), superseded

    def withdraw(self, set_key: str, message_key: str) -> int:
        with self._lock:
            return _supersede(self.db, set_key, message_key, "withdrawn")  # one statement

    def held_again(self, message_key: str, deadline: float) -> tuple[int, str, float] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT n, status, deadline FROM waiting WHERE message_key = ?", (message_key,)
            ).fetchone()
            if row is None:
                return None
            if row[1] in DEAD:
                self.db.execute(
                    "UPDATE waiting SET status = 'waiting', deadline = ?, reason = '', noted = 1 WHERE n = ?",
                    (deadline, row[0]),
                )
                return int(row[0]), "waiting", deadline
        return int(row[0]), str(row[1]), float(row[2])

    def withdrawn_by(self, message_key: str) -> int:
        row = self._one("SELECT count(*) FROM waiting WHERE superseded_by = ? AND status = 'withdrawn'", (message_key,))
        return int(row[0])

    def waiting_report(self, message_key: str) -> tuple[str, str] | None:
        row = self._one("SELECT report, status FROM waiting WHERE message_key = ?", (message_key,))
        return (str(row[0]), str(row[1])) if row else None

    def remark(self, message_key: str, remark: str) -> None:
        self._run(
            "UPDATE waiting SET remark = ?, noted = 0 WHERE message_key = ? AND status = 'waiting' AND remark != ?",
            (remark, message_key, remark),
        )

    def settle(self, message_key: str, status: str, reason: str) -> None:
        self._run(
            "UPDATE waiting SET status = ?, reason = ?, noted = 0 WHERE message_key = ? AND status = 'waiting'",
            (status, reason, message_key),
        )

    def rows(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        marks = ", ".join("?" * len(statuses))
        rows = self._all(f"SELECT {', '.join(LISTED)} FROM waiting WHERE status IN ({marks}) ORDER BY n", statuses)
        return [dict(zip(LISTED, r, strict=True)) for r in rows]

    def row(self, *, n: int = 0, message_key: str = "") -> dict[str, Any] | None:
        where, value = ("n", n) if n else ("message_key", message_key)
        row = self._one(f"SELECT {', '.join(LISTED)} FROM waiting WHERE {where} = ?", (value,))
        return dict(zip(LISTED, row, strict=True)) if row else None

    def waiting_for(self, study_uids: list[str], accessions: list[str]) -> list[str]:
        keys: set[tuple[int, str]] = set()
        for column, values in (("study_uid", study_uids), ("accession", accessions)):
            for i in range(0, len(values), 500):
                chunk = values[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                rows = self._all(
                    f"SELECT n, message_key FROM waiting WHERE status = 'waiting' AND {column} IN ({marks})", chunk
                )
                keys.update((int(r[0]), str(r[1])) for r in rows)
        return [key for _, key in sorted(keys)]

    def scan(self, after: int, limit: int) -> list[tuple[int, str, str, str, bool]]:
        rows = self._all(
            "SELECT n, message_key, study_uid, accession, CASE WHEN study_uid != '' THEN"
            " EXISTS (SELECT 1 FROM studies WHERE uid = w.study_uid)"
            " OR EXISTS (SELECT 1 FROM performed WHERE study_uid = w.study_uid)"
            " ELSE accession != '' AND (EXISTS (SELECT 1 FROM studies WHERE accession = w.accession)"
            " OR EXISTS (SELECT 1 FROM performed WHERE accession = w.accession)) END"
            " FROM waiting AS w WHERE status = 'waiting' AND n > ? ORDER BY n LIMIT ?",
            (after, limit),
        )
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), bool(r[4])) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._all(
            "SELECT status, count(*) FROM waiting WHERE status IN ('waiting', 'expired', 'invalid') GROUP BY status"
        )
        return _counts(dict(rows))

    def expire(self, now: float) -> int:
        return self._run(
            "UPDATE waiting SET status = 'expired', noted = 0, requested = 0,"
            " reason = 'no study known for it before its deadline' WHERE status = 'waiting' AND deadline < ?",
            (now,),
        )

    def request(self, n: int, deadline: float) -> str | None:
        with self._transaction() as db:
            row = db.execute("SELECT status FROM waiting WHERE n = ?", (n,)).fetchone()
            if row is None or row[0] not in HELD:
                return None if row is None else str(row[0])
            db.execute(
                "UPDATE waiting SET status = 'waiting', requested = 1, reason = '', noted = 1, deadline = ?"
                " WHERE n = ?",
                (deadline, n),
            )
        return str(row[0])

    def requested(self) -> list[str]:
        with self._lock:
            rows = self.db.execute("SELECT n, message_key FROM waiting WHERE requested = 1").fetchall()
            if rows:  # looked at every few seconds: written only when an operator asked
                self.db.executemany("UPDATE waiting SET requested = 0 WHERE n = ?", [(r[0],) for r in rows])
        return [r[1] for r in rows]

    def unnoted(self) -> list[dict[str, Any]]:
        rows = self._all(
            f"SELECT {', '.join(UNNOTED)} FROM waiting WHERE noted = 0 AND (status != 'waiting' OR remark != '')"
            " ORDER BY n"
        )
        return [dict(zip(UNNOTED, r, strict=True)) for r in rows]

    def noted(self, n: int, journal_id: int) -> None:
        self._run(
            "UPDATE waiting SET noted = 1, journal_id = CASE WHEN ? THEN ? ELSE journal_id END WHERE n = ?",
            (journal_id, journal_id, n),
        )

    def journaled(self, message_key: str, journal_id: int) -> None:
        self._run("UPDATE waiting SET journal_id = ? WHERE message_key = ?", (journal_id, message_key))

    def kept(self) -> set[str]:
        return {str(r[0]) for r in self._all(KEPT.format(waiting="waiting", scope=""))}

    # -- undo --------------------------------------------------------------------------------------------------

    def recent(self, limit: int) -> list[str]:
        keys = [r[0] for r in self._all("SELECT message_key FROM messages ORDER BY rowid DESC LIMIT ?", (limit,))]
        rows = self._all(
            "SELECT message_key FROM waiting WHERE status = 'waiting' AND journal_id = 0 ORDER BY n DESC LIMIT ?",
            (limit,),
        )
        return keys + [r[0] for r in rows if r[0] not in keys]

    def discard(self, message_key: str) -> Discarded:
        with self._transaction() as db:
            journaled = db.execute(
                "SELECT n FROM waiting WHERE message_key = ? AND journal_id != 0", (message_key,)
            ).fetchone()
            if journaled is not None:
                return Discarded(refused=int(journaled[0]))
            undone = Discarded(
                restored=db.execute(
                    "UPDATE waiting SET status = CASE WHEN reason = '' THEN 'waiting' ELSE 'expired' END,"
                    " superseded_by = '', noted = 1 WHERE superseded_by = ?",
                    (message_key,),
                ).rowcount,
                waiting=db.execute("DELETE FROM waiting WHERE message_key = ?", (message_key,)).rowcount,
            )
            row = db.execute(
                "SELECT document_id, action FROM messages WHERE message_key = ?", (message_key,)
            ).fetchone()
            if row is None:
                return undone
            undone.document_id, undone.action = row
            found = db.execute("SELECT document, status FROM documents WHERE id = ?", (undone.document_id,)).fetchone()
            if undone.action == "delete":
                if found is not None:
                    doc = _undeleted(_document(found[0]))
                    db.execute(
                        "UPDATE documents SET status = 'current', document = ? WHERE id = ?", (_json(doc), doc.id)
                    )
            else:
                # The version it replaced is current again, unless a later version replaced this one meanwhile.
                replaced = _document(found[0]).replaces if found is not None and found[1] == "current" else ""
                db.execute("DELETE FROM documents WHERE id = ?", (undone.document_id,))
                if replaced:
                    db.execute(
                        "UPDATE documents SET status = 'current' WHERE id = ? AND status = 'superseded'", (replaced,)
                    )
            db.execute("DELETE FROM messages WHERE message_key = ?", (message_key,))
        return undone


def _supersede(db: sqlite3.Connection, set_key: str, message_key: str, status: str) -> int:
    """In the caller's transaction: the versions of the set not published yet (waiting, or dead letters) are
    superseded (or withdrawn) by ``message_key``; returns how many."""
    cur = db.execute(
        "UPDATE waiting SET status = ?, superseded_by = ?, noted = 0, requested = 0 WHERE set_key = ?"
        " AND message_key != ? AND status IN ('waiting', 'expired', 'invalid')",
        (status, message_key, set_key, message_key),
    )
    return int(cur.rowcount or 0)


def _create(db: sqlite3.Connection) -> None:
    """The schema, on a new file or one written by an earlier version (its ``waiting`` table without ``remark``)."""
    db.executescript(SCHEMA)
    columns = {r[1] for r in db.execute("PRAGMA table_info(waiting)")}
    if "remark" not in columns:
        db.execute("ALTER TABLE waiting ADD COLUMN remark TEXT NOT NULL DEFAULT ''")
    db.executescript(INDEXES)


# -- what operator commands ask of a channel's reports store (another process than the engine's) ----------------


@contextlib.contextmanager
def _storage(where: Path | str | ReportPublisher | ReportStorage) -> Iterator[ReportStorage]:
    """The storage of a store given as its SQLite file (opened for the call) or as an open store (left open)."""
    if isinstance(where, ReportPublisher):
        yield where.storage
    elif isinstance(where, (str, Path)):
        storage = SQLiteReportStorage(where, busy_timeout_s=30.0)
        try:
            yield storage
        finally:
            storage.close()
    else:
        yield where


def held_report(where: Path | str | ReportPublisher | ReportStorage, n: int) -> dict[str, Any] | None:
    """Report ``n`` of the waiting table of a reports store (its SQLite file, or an open store: a PostgreSQL one
    from `traboule.stores.factory`), from another process (None: no such report)."""
    if not 0 < n <= MAX_REPORT_NUMBER:
        return None
    with _storage(where) as storage:
        return storage.row(n=n)


def held_reports(
    where: Path | str | ReportPublisher | ReportStorage, statuses: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The waiting table of a reports store, from another process (the ``traboule reports`` command)."""
    with _storage(where) as storage:
        return storage.rows(statuses)


def request_publication(
    where: Path | str | ReportPublisher | ReportStorage, n: int, wait_for_study: float = WAIT_FOR_STUDY
) -> str | None:
    """Ask the running engine to publish report ``n`` now (waiting, or a dead letter: it waits again, with a new
    deadline, and is published as soon as its study is known); returns its status before, or None when there is
    no such report or it is not held any more."""
    if not 0 < n <= MAX_REPORT_NUMBER:
        return None
    with _storage(where) as storage:
        return storage.request(n, time.time() + wait_for_study)


def document_made(where: Path | str | ReportPublisher | ReportStorage, message_key: str) -> model.Document | None:
    """The document event a report message made when it was received (its version, its CDA, the action it was
    published with), or None (it made none: refused, or held)."""
    with _storage(where) as storage:
        made = storage.message(message_key)
        doc = storage.document(made[0]) if made is not None else None
    if doc is None or made is None:
        return None
    doc.action = doc.report.action = made[1]
    return doc


def kept_messages(where: Path | str | ReportPublisher | ReportStorage) -> set[str]:
    """Idempotency keys of the report messages whose journal entries ``traboule journal prune`` must keep: reports
    still held (waiting for their study, or dead letters an operator may publish) and outcomes not yet written into
    their entries."""
    with _storage(where) as storage:
        return storage.kept()


def _order_summary(order: model.ImagingOrder) -> dict[str, Any]:
    """What a report may take from its order (kept small: written for every order the channel receives). As
    `model.plain` would make it, through orjson (which walks the dataclasses in C: `plain` took 5% of the ingest
    process's time here)."""
    summary = {
        "placer_order_number": order.placer_order_number,
        "filler_order_number": order.filler_order_number,
        "accession_number": order.accession_number,
        "study_instance_uid": order.study_instance_uid,
        "procedure": order.procedure,
        "steps": [{"modality": step.modality} for step in order.steps[:1]],
    }
    return orjson.loads(orjson.dumps(summary))  # type: ignore[no-any-return]


def document_of(
    mapping: CDAMapping, report: model.Report, data: bytes, ids: DocumentIds, *, level: int, header: Any = None
) -> model.Document:
    """The Document event of a CDA made for (or sent with) ``report``: ids, bytes, hash and size, title and date
    from the CDA header (``header`` when the caller has read it already), masking codes from the report."""
    header = header if header is not None else read_header(data)
    clean = model.from_dict(model.Report, model.plain(report))
    clean.attachment = ""  # the document carries the bytes once
    clean.observations = []
    return model.Document(
        action="replace" if ids.replaces else "publish",
        id=ids.id,
        set_id=ids.set_id,
        version=ids.version,
        replaces=ids.replaces,
        level=level,
        content=base64.b64encode(data).decode("ascii"),
        sha1=hashlib.sha1(data).hexdigest(),  # the XDS hash is SHA-1 by definition
        size=len(data),
        title=header.title,
        created=header.effective_time,
        service_start=mapping.ts(report.exam_time),
        service_stop=mapping.service_end(report, mapping.ts(report.exam_time)),
        confidentiality=mapping.confidentiality(report),
        report=clean,
    )


ORDERS_CHUNK = 500  # accession numbers per query of the orders kept (SQLite allows 32,766 parameters)


def _overlay(old: Any, new: Any) -> Any:
    """``new`` over ``old``, where empty values of ``new`` keep the old ones."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _overlay(old.get(k), new.get(k)) for k in {*old, *new}}
    return new if new not in ("", [], {}, None) else old


class _KeyLocks:
    """Locks by name, made when first held and dropped once free: ``hold(a, b)`` takes both (in name order: two
    holders never wait for each other crosswise)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}  # name → (lock, [holders and waiters])

    @contextlib.contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        wanted = sorted({n for n in names if n})
        with self._mutex:
            entries = [self._locks.setdefault(n, (threading.Lock(), [0])) for n in wanted]
            for _, users in entries:
                users[0] += 1
        taken: list[threading.Lock] = []
        try:
            for lock, _ in entries:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()
            with self._mutex:
                for name, (_, users) in zip(wanted, entries, strict=True):
                    users[0] -= 1
                    if not users[0]:
                        del self._locks[name]


def _set_lock(accession: str) -> str:
    """The lock of the reports of one accession number (one document set, ``_set_key``); none without one."""
    return f"set:{accession}" if accession else ""


def _set_key(report: model.Report) -> str:
    """One document set per accession number (unique within the facility that issues them)."""
    return f"acc:{report.accession_number.value}"


def _json(doc: model.Document) -> str:
    return json.dumps(model.plain(doc), ensure_ascii=False)


def _document(text: str) -> model.Document:
    return model.from_dict(model.Document, json.loads(text))


def _performed_study(steps: list[model.PerformedStep]) -> model.Study | None:
    """The study as the modality reported performing it (MPPS): its series with the instances they reference, every
    step of the same study merged (a study may be performed in several steps)."""
    steps = [s for s in steps if model.is_uid(s.study_instance_uid)]
    if not steps:
        return None
    uid = steps[0].study_instance_uid
    series: dict[str, model.Series] = {}
    for step in sorted((s for s in steps if s.study_instance_uid == uid), key=lambda s: s.started):
        for item in step.series:
            if not item.instances:
                continue
            known = series.setdefault(item.uid, model.Series(item.uid, item.number, item.modality, item.description))
            seen = {i.uid for i in known.instances}
            known.instances += [i for i in item.instances if i.uid not in seen]
    if not series:
        return None
    first = steps[0]
    return model.Study(
        study_instance_uid=uid,
        accession_number=first.accession_number,
        patient=first.patient,
        started=min((s.started for s in steps if s.started), default=""),
        description=first.description,
        series=list(series.values()),
    )


def _waiting_note(n: int, deadline: float, superseded: int) -> str:
    until = datetime.fromtimestamp(deadline, UTC).isoformat(timespec="minutes")
    note = f"report waiting for its study (traboule reports waiting: {n}); published when it is known, until {until}"
    return note + (f"; supersedes {superseded} waiting version(s)" if superseded else "")


def _withdrawn_note(withdrawn: int) -> str:
    return f"deletion of versions not published yet: {withdrawn} waiting report(s) withdrawn, nothing to publish"


def _pause(attempt: int) -> None:
    """A short random wait before preparing again after a conflict (two nodes retrying in step would collide again)."""
    time.sleep(random.uniform(0.0, 0.02) * attempt)


def _undeleted(doc: model.Document) -> model.Document:
    """A deleted version current again (its deletion was not journaled): the event it was published with."""
    doc.action = "replace" if doc.replaces else "publish"
    return doc


def _received() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _counts(found: dict[str, int]) -> dict[str, int]:
    """``counts`` from the number of held reports per status."""
    return {"waiting": int(found.get("waiting", 0)), "dead_letters": sum(int(found.get(d, 0)) for d in DEAD)}


def same_patient(report: model.Patient, source: model.Patient) -> bool:
    """Whether a study (the archive's, an MPPS) is of the report's patient, so may make its catalog.

    The identifiers decide, never the names: an INS both carry (same OID) must be the same, and then suffices; else
    one patient identifier (IPP) of each must have the same value with assigning authorities that agree (the same
    OID when both have one; else, when both name one, a common name: DICOM's single Issuer of Patient ID may hold
    the HL7 namespace or the OID). A report or a study without any patient identifier matches nothing: it cannot be
    shown to be the same patient (such a report waits, then is a dead letter an operator looks at)."""
    mine = [i for i in report.ids if i.value]
    theirs = [i for i in source.ids if i.value]
    ins_mine = {i.issuer_oid: i.value.upper() for i in mine if _is_ins(i)}
    ins_theirs = {i.issuer_oid: i.value.upper() for i in theirs if _is_ins(i)}
    common = ins_mine.keys() & ins_theirs.keys()
    if common:
        return all(ins_mine[k] == ins_theirs[k] for k in common)
    return any(
        a.value == b.value and _authorities_agree(a, b)
        for a in mine
        if not _is_ins(a)
        for b in theirs
        if not _is_ins(b)
    )


def _is_ins(ident: model.Identifier) -> bool:
    return ident.type == "INS" or ident.issuer_oid in model.INS_OIDS


def _authorities_agree(a: model.Identifier, b: model.Identifier) -> bool:
    if a.issuer_oid and b.issuer_oid:
        return a.issuer_oid == b.issuer_oid
    names_a, names_b = {a.issuer, a.issuer_oid} - {""}, {b.issuer, b.issuer_oid} - {""}
    return not (names_a and names_b) or bool(names_a & names_b)
