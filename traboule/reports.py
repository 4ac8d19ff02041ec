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
* Catalog: the study the archive reported (``study.*`` events) gives the DICOM object catalog of a level-3 report;
  the order (seen by the same channel) gives the procedure code and identifiers a report message may lack.

State lives in ``<data_dir>/reports.sqlite`` (WAL): sets, documents (with their bytes), known studies and orders.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from traboule import model
from traboule.cda import CDAError, CDAMapping, DocumentIds, decode_attachment, read_header

log = structlog.get_logger("traboule.reports")

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
"""


class ReportRefused(Exception):
    """The report cannot be published; ``reason`` goes into the AE, ``location`` names the HL7 field."""

    def __init__(self, reason: str, location: str = "", code: str = "101"):
        super().__init__(reason)
        self.reason = reason
        self.location = location
        self.code = code


class ReportPublisher:
    """Prepares the documents of one inbound channel (blocking calls: run them in a thread)."""

    def __init__(self, mapping: CDAMapping, path: Path | str, validator: Any = None) -> None:
        self.mapping = mapping
        self.validator = validator
        self.path = str(path)
        self._lock = threading.Lock()
        # One report at a time: two versions of a set (or the same message on two connections) must not interleave
        # between reading the set's current version and storing the next. Validation is serial anyway.
        self._prepare_lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
        if not orders and not studies:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for accession, summary in orders:  # a status message carries less: it completes, never blanks
                    row = self._db.execute("SELECT orders FROM orders WHERE accession = ?", (accession,)).fetchone()
                    merged = _overlay(json.loads(row[0]), summary) if row else summary
                    text = json.dumps(merged, ensure_ascii=False)
                    self._db.execute("INSERT OR REPLACE INTO orders VALUES (?, ?)", (accession, text))
                self._db.executemany(
                    "INSERT INTO studies VALUES (?, ?, ?) ON CONFLICT (uid) DO UPDATE SET "
                    "accession = excluded.accession, study = excluded.study",
                    studies,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def remember_order(self, order: model.ImagingOrder) -> None:
        self.remember([order])

    def remember_study(self, study: model.Study) -> None:
        self.remember([study])

    def study_for(self, report: model.Report) -> model.Study | None:
        with self._lock:
            row = None
            if report.study_instance_uid:
                row = self._db.execute(
                    "SELECT study FROM studies WHERE uid = ?", (report.study_instance_uid,)
                ).fetchone()
            if row is None and report.accession_number.value:
                row = self._db.execute(
                    "SELECT study FROM studies WHERE accession = ? ORDER BY rowid DESC LIMIT 1",
                    (report.accession_number.value,),
                ).fetchone()
        return model.from_dict(model.Study, json.loads(row[0])) if row else None

    def order_for(self, accession: str) -> model.ImagingOrder | None:
        with self._lock:
            row = self._db.execute("SELECT orders FROM orders WHERE accession = ?", (accession,)).fetchone()
        return model.from_dict(model.ImagingOrder, json.loads(row[0])) if row else None

    # -- documents -------------------------------------------------------------------------------------------

    def document(self, doc_id: str) -> model.Document | None:
        with self._lock:
            row = self._db.execute("SELECT document FROM documents WHERE id = ?", (doc_id,)).fetchone()
        return _document(row[0]) if row else None

    def current(self, set_id: str) -> model.Document | None:
        with self._lock:
            row = self._db.execute(
                "SELECT document FROM documents WHERE set_id = ? AND status = 'current' ORDER BY version DESC LIMIT 1",
                (set_id,),
            ).fetchone()
        return _document(row[0]) if row else None

    def prepare(self, report: model.Report, message_key: str) -> model.Document:
        """The document event for ``report``; raises ``ReportRefused`` (AE) when it cannot be published."""
        with self._prepare_lock:
            return self._prepare(report, message_key)

    def _prepare(self, report: model.Report, message_key: str) -> model.Document:
        with self._lock:
            row = self._db.execute(
                "SELECT document_id, action FROM messages WHERE message_key = ?", (message_key,)
            ).fetchone()
        if row is not None:  # the same message again: the same document, no new version
            again = self.document(row[0])
            if again is not None:
                again.action = row[1]
                again.report.action = row[1]
                return again
        self._complete(report)
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
        with self._lock:
            row = self._db.execute("SELECT set_id FROM sets WHERE set_key = ?", (key,)).fetchone()
            if row is None:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    (n,) = self._db.execute("SELECT COALESCE(MAX(n), 0) + 1 FROM sets").fetchone()
                    set_id = set_id or f"{self.mapping.document_oid}.{n}"
                    self._db.execute("INSERT INTO sets (n, set_key, set_id) VALUES (?, ?, ?)", (n, key, set_id))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            else:
                set_id = row[0]
        return set_id, self.current(set_id)

    def _next_version(self, set_id: str) -> int:
        """After every version the set ever had, deleted ones included (their ids stay taken)."""
        with self._lock:
            (last,) = self._db.execute("SELECT MAX(version) FROM documents WHERE set_id = ?", (set_id,)).fetchone()
        return int(last or 0) + 1

    def _generated(self, report: model.Report, message_key: str) -> model.Document:
        key = _set_key(report)
        set_id, current = self._set_for(key)
        version, replaces = self._next_version(set_id), current.id if current is not None else ""
        if current is None and report.action == "replace":
            log.warning("report.replaces_nothing", accession=report.accession_number.value, set_id=set_id)
        ids = DocumentIds(f"{set_id}.{version}", set_id, version, replaces)
        study = self.study_for(report)
        if study is not None:  # the archive's UID (found by accession number, it may differ from the order's)
            report.study_instance_uid = study.study_instance_uid
        report.acts = [self.mapping.act_of(report, study)]
        data = self.mapping.build(report, ids, study)
        self._check(data)
        level = 1 if report.attachment_type == "application/pdf" else 3
        doc = document_of(self.mapping, report, data, ids, level=level)
        self._store(doc, message_key)
        return doc

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
        self._store(doc, message_key)
        return doc

    def _delete(self, report: model.Report, message_key: str) -> model.Document:
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
            with self._lock:
                row = self._db.execute("SELECT set_id FROM sets WHERE set_key = ?", (_set_key(report),)).fetchone()
            current = self.current(row[0]) if row else None
        if current is None:
            raise ReportRefused("no published document to delete for this report", "OBR-18")
        doc = model.from_dict(model.Document, model.plain(current))
        doc.action = "delete"
        doc.report.action = "delete"
        self._store(doc, message_key)
        return doc

    def discard(self, message_key: str) -> None:
        """Undo what ``prepare`` stored for a message that was not journaled after all (the journal write failed,
        the engine stopped in between): the version goes, the one it superseded or deleted is current again."""
        with self._prepare_lock, self._lock:
            row = self._db.execute(
                "SELECT document_id, action FROM messages WHERE message_key = ?", (message_key,)
            ).fetchone()
            if row is None:
                return
            doc_id, action = row
            found = self._db.execute("SELECT document FROM documents WHERE id = ?", (doc_id,)).fetchone()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if action == "delete":
                    if found is not None:
                        doc = _document(found[0])
                        doc.action = "replace" if doc.replaces else "publish"
                        self._db.execute(
                            "UPDATE documents SET status = 'current', document = ? WHERE id = ?", (_json(doc), doc_id)
                        )
                else:
                    replaced = _document(found[0]).replaces if found is not None else ""
                    self._db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
                    if replaced:
                        self._db.execute(
                            "UPDATE documents SET status = 'current' WHERE id = ? AND status = 'superseded'",
                            (replaced,),
                        )
                self._db.execute("DELETE FROM messages WHERE message_key = ?", (message_key,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.warning("report.discarded", document_id=doc_id, action=action)

    def reconcile(self, journaled: Any, recent: int = 100) -> int:
        """At start: discard what was prepared for messages the journal does not hold as accepted (a crash between
        the two writes can only concern the last ones: ``recent``). ``journaled(message_key) -> bool``."""
        with self._lock:
            rows = self._db.execute("SELECT message_key FROM messages ORDER BY rowid DESC LIMIT ?", (recent,))
            keys = [r[0] for r in rows]
        missing = [k for k in keys if not journaled(k)]
        for key in missing:
            self.discard(key)
        return len(missing)

    def _check(self, data: bytes) -> None:
        if self.validator is None:
            return
        result = self.validator.validate(data)
        if not result.valid:
            problems = [result.xml_error] if result.xml_error else []
            problems += [f"XSD line {e.line}: {e.message}" for e in result.xsd_errors]
            problems += [f"{Path(f.schematron).stem}: {f.text}" for f in result.errors]
            raise ReportRefused(f"CDA not valid: {'; '.join(problems)}"[:900], "OBX", code="101")

    def _store(self, doc: model.Document, message_key: str) -> None:
        """One transaction: the version (current, or deleted), the superseded one, the message that made it."""
        text = _json(doc)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if doc.action == "delete":
                    self._db.execute(
                        "UPDATE documents SET status = 'deleted', document = ? WHERE id = ?", (text, doc.id)
                    )
                else:
                    if doc.replaces:
                        self._db.execute("UPDATE documents SET status = 'superseded' WHERE id = ?", (doc.replaces,))
                    self._db.execute(
                        "INSERT INTO documents (id, set_id, version, status, created, document) "
                        "VALUES (?, ?, ?, 'current', ?, ?)",
                        (doc.id, doc.set_id, doc.version, datetime.now().isoformat(timespec="seconds"), text),
                    )
                self._db.execute("INSERT OR REPLACE INTO messages VALUES (?, ?, ?)", (message_key, doc.id, doc.action))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise


def _order_summary(order: model.ImagingOrder) -> dict[str, Any]:
    """What a report may take from its order (kept small: written for every order the channel receives)."""
    return {
        "placer_order_number": model.plain(order.placer_order_number),
        "filler_order_number": model.plain(order.filler_order_number),
        "accession_number": model.plain(order.accession_number),
        "study_instance_uid": order.study_instance_uid,
        "procedure": model.plain(order.procedure),
        "steps": [{"modality": step.modality} for step in order.steps[:1]],
    }


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
        confidentiality=mapping.confidentiality(report),
        report=clean,
    )


def _overlay(old: Any, new: Any) -> Any:
    """``new`` over ``old``, where empty values of ``new`` keep the old ones."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _overlay(old.get(k), new.get(k)) for k in {*old, *new}}
    return new if new not in ("", [], {}, None) else old


def _set_key(report: model.Report) -> str:
    """One document set per accession number (unique within the facility that issues them)."""
    return f"acc:{report.accession_number.value}"


def _json(doc: model.Document) -> str:
    return json.dumps(model.plain(doc), ensure_ascii=False)


def _document(text: str) -> model.Document:
    return model.from_dict(model.Document, json.loads(text))
