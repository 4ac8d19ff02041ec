"""The worklist as a modality sees it, and the report documents published for its exams (role ``read``).

The items are those a C-FIND with the page's filters (date, modality, scheduled station AE title, accession
number, patient id: the PS3.4 matching of `traboule.formats.dicom_match`, wildcards included) gets from each
``worklist`` channel's store. That store belongs to the channel's process (a worker in the default
configuration): on SQLite the console opens its file read-only (``Durability.READ_ONLY``, WAL: it reads beside
the writer and never writes); on PostgreSQL it reads the shared tables through the store, which only reads unless
asked to apply.

The documents are the versions the inbound channels' reports stores keep for each accession number shown (on
SQLite, read-only like `traboule.stores.published`), with the sender's sharing instructions, where an ``xds``
channel recorded it the DMP submission status, and from the delivery log what each ``hl7-documents`` channel (DRIMbox
feed) sent with the ACK and how often the ``/fhir`` API served it (MHD ITI-68, channel ``mhd``). Each CDA is shown
from its own narrative (section titles and text of the body, parsed with lxml without network or entities), never
as raw XML; every value is text for the templates to escape.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from lxml import etree
from pydicom.dataset import Dataset

from traboule import audit
from traboule.app.console.labels import LABELS, language
from traboule.formats.dicom_match import QueryError, ScanStopped, compile_query
from traboule.formats.worklist_item import decode_item
from traboule.model import plain
from traboule.stores.delivery_log import MAX_ROWS
from traboule.stores.sqlite import Durability, open_database
from traboule.stores.worklist import prefilter_sql

MAX_ITEMS = 200  # items listed at most
MAX_EXAMINED = 20_000  # items examined at most (beyond: `ScanStopped`, "refine the filters")
MAX_CDA = 5_000_000  # bytes of a CDA parsed at most
V3 = "{urn:hl7-org:v3}"
FIELD = re.compile(r"[^\\\r\n\x00-\x1f]{0,64}")  # a C-FIND value: no backslash (multi-value) nor control
BLOCKS = {"paragraph", "item", "tr", "caption", "br"}


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)
    depth: int = 0


@dataclass
class ShownDocument:
    id: str
    set_id: str
    version: int
    status: str
    created: str
    title: str
    flags: list[tuple[str, str]]
    shared: list[tuple[str, str]]  # (xds channel, status) where recorded
    sections: list[Section]
    problem: str = ""
    # (destination, what: not_shared | sent_ack | not_retrieved | retrieved_times | retrieved_many, its values)
    fed: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


def query_of(filters: dict[str, str]) -> Dataset:
    """The C-FIND identifier a modality would send with these filters (empty: universal matching)."""
    query = Dataset()
    for keyword in ("PatientName", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID"):
        setattr(query, keyword, "")
    query.PatientID = filters["patient"]
    query.AccessionNumber = filters["accession"]
    query.RequestedProcedureID = ""
    query.RequestedProcedureDescription = ""
    step = Dataset()
    step.Modality = filters["modality"]
    step.ScheduledStationAETitle = filters["station"]
    step.ScheduledProcedureStepStartDate = filters["date"].replace("-", "")
    for keyword in ("ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription"):
        setattr(step, keyword, "")
    step.ScheduledProcedureStepID = ""
    step.ScheduledProcedureStepStatus = ""
    query.ScheduledProcedureStepSequence = [step]
    return query


def filters_of(params: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The page's filters (today by default) and what is wrong with them."""
    errors = []
    filters = {k: params.get(k, "").strip() for k in ("date", "modality", "station", "accession", "patient")}
    if "date" not in params:
        filters["date"] = date.today().isoformat()
    if filters["date"]:
        try:
            date.fromisoformat(filters["date"])
        except ValueError:
            errors.append("date")
    for key in ("modality", "station", "accession", "patient"):
        if not FIELD.fullmatch(filters[key]):
            errors.append(key)
    return filters, errors


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def row_of(response: Dataset) -> dict[str, str]:
    steps = response.get("ScheduledProcedureStepSequence") or [Dataset()]
    step = steps[0]
    return {
        "date": _text(step, "ScheduledProcedureStepStartDate"),
        "time": _text(step, "ScheduledProcedureStepStartTime"),
        "modality": _text(step, "Modality"),
        "station": _text(step, "ScheduledStationAETitle"),
        "step": _text(step, "ScheduledProcedureStepDescription"),
        "status": _text(step, "ScheduledProcedureStepStatus"),
        "accession": _text(response, "AccessionNumber"),
        "patient_id": _text(response, "PatientID"),
        "issuer": _text(response, "IssuerOfPatientID"),
        "patient_name": _text(response, "PatientName"),
        "birth_date": _text(response, "PatientBirthDate"),
        "procedure": _text(response, "RequestedProcedureDescription"),
        "study_uid": _text(response, "StudyInstanceUID"),
    }


class WorklistReader:
    """What the worklist page reads (on the console's thread)."""

    def __init__(self, runtime: Any, stores: Any = None) -> None:
        """``stores``: the store factory read (the console's, `traboule.app.console.reader.Reader.stores`: its
        statement timeout); the engine's by default."""
        self.runtime = runtime
        self.stores = runtime.stores if stores is None else stores
        self.data_dir = Path(runtime.config.data_dir)
        self._local = threading.local()

    def _store(self, channel: str) -> Any:
        """This console thread's worklist store of ``channel`` (PostgreSQL), kept open: its cache of decoded items
        serves the next requests (a new store per request decoded every item again, ~1 ms each)."""
        stores = getattr(self._local, "stores", None)
        if stores is None:
            stores = self._local.stores = {}
        if channel not in stores:
            stores[channel] = self.stores.worklist(channel)
        return stores[channel]

    def channels(self) -> list[str]:
        return [str(c["name"]) for c in self.runtime.config.channels if c["kind"] == "worklist"]

    def items(self, channel: str, query: Dataset) -> tuple[list[dict[str, str]], bool]:
        """The items of ``channel`` matching ``query``, by date and time (at most `MAX_ITEMS`; True: more)."""
        compiled = compile_query(query)
        found: list[Dataset] = []
        if getattr(self.stores, "backend", "") == "postgresql":
            for response in self._store(channel).find(query, max_examined=MAX_EXAMINED):
                found.append(response)
                if len(found) > MAX_ITEMS:
                    break
        else:
            path = self.data_dir / f"{channel}.sqlite"
            if not path.is_file():
                return [], False
            db = open_database(path, Durability.READ_ONLY)
            try:
                sql, params = prefilter_sql(compiled)
                rowids = [r[0] for _, r in zip(range(MAX_EXAMINED + 1), db.execute(sql, params), strict=False)]
                if len(rowids) > MAX_EXAMINED:
                    raise ScanStopped("max_examined", MAX_EXAMINED)
                for start in range(0, len(rowids), 500):
                    batch = rowids[start : start + 500]
                    marks = ",".join("?" * len(batch))
                    for (blob,) in db.execute(f"SELECT dataset FROM items WHERE rowid IN ({marks})", batch):
                        item = decode_item(bytes(blob))
                        if compiled.matches(item):
                            found.append(compiled.response(item))
                            if len(found) > MAX_ITEMS:  # enough to say "more": decode no further
                                break
                    if len(found) > MAX_ITEMS:
                        break
            finally:
                db.close()
        rows = sorted((row_of(r) for r in found[:MAX_ITEMS]), key=lambda r: (r["date"], r["time"], r["accession"]))
        return rows, len(found) > MAX_ITEMS

    # -- documents ---------------------------------------------------------------------------------------------

    def documents(self, accessions: list[str]) -> dict[str, list[ShownDocument]]:
        """The document versions of each accession number, newest first, from every inbound channel's reports
        store: on SQLite its file read-only; on PostgreSQL the shared tables (the current version and those it
        replaced: a withdrawn set shows nothing)."""
        out: dict[str, list[ShownDocument]] = {}
        wanted = [a for a in dict.fromkeys(accessions) if a]
        xds = [str(c["name"]) for c in self.runtime.config.channels if c["kind"] == "xds"]
        made: dict[str, str] = {}  # document id → key of the message that made it
        postgres = getattr(self.stores, "backend", "") == "postgresql"
        for cfg in self.runtime.config.channels:
            if cfg["kind"] != "hl7-orders" or not wanted:
                continue
            if postgres:
                with contextlib.closing(self.stores.reports(cfg["name"], None)) as store:
                    for accession in wanted:
                        for status, event in _versions(store, accession):
                            out.setdefault(accession, []).append(self._shown(status, event, xds))
                    made.update(_made_by(store.storage, cfg["name"], out))
                continue
            path = self.data_dir / f"{cfg['name']}.reports.sqlite"
            if not path.is_file():
                continue
            db = open_database(path, Durability.READ_ONLY)
            try:
                for accession in wanted:
                    rows = db.execute(
                        "SELECT d.status, d.document FROM sets s JOIN documents d ON d.set_id = s.set_id "
                        "WHERE s.set_key = ? ORDER BY d.version DESC",
                        (f"acc:{accession}",),
                    ).fetchall()
                    for status, text in rows:
                        out.setdefault(accession, []).append(self._shown(status, json.loads(text), xds))
                made.update(_made_by(db, "", out))
            finally:
                db.close()
        self._fed(out, made)
        return out

    def _fed(self, documents: dict[str, list[ShownDocument]], made: dict[str, str]) -> None:
        """What the delivery log says of each document's other destinations: each ``hl7-documents`` channel (its
        last "sent, ACK" row among the rows of the message that made the document, ``made``: document id →
        message key) and, with a ``/fhir`` API, the MHD retrievals (rows of channel ``mhd`` keyed by the id)."""
        feeds = [str(c["name"]) for c in self.runtime.config.channels if c["kind"] == "hl7-documents"]
        mhd = any(c["kind"] == "fhir" and c.get("api") for c in self.runtime.config.channels)
        shown = [d for versions in documents.values() for d in versions]
        if not shown or not (feeds or mhd) or not hasattr(self.stores, "delivery_log"):
            return
        with contextlib.closing(self.stores.delivery_log()) as log:
            for doc in shown:
                rows = log.of(made[doc.id]) if doc.id in made else []
                for feed in feeds:
                    sent = [r for r in rows if r.channel == feed and f"document {doc.id} sent, ACK" in r.detail]
                    if sent:
                        ack = sent[-1].detail.rpartition("ACK ")[2][:4]
                        doc.fed.append((feed, "sent_ack", {"ack": ack, "at": sent[-1].at}))
                    else:
                        doc.fed.append((feed, "not_shared", {}))
                if mhd:
                    retrieved = [r for r in log.of(doc.id) if r.channel == "mhd" and r.key == doc.id]
                    if not retrieved:
                        doc.fed.append(("MHD", "not_retrieved", {}))
                    elif len(retrieved) >= MAX_ROWS:  # the log answers its oldest rows first, that many at most
                        doc.fed.append(("MHD", "retrieved_many", {"n": str(len(retrieved))}))
                    else:
                        doc.fed.append(("MHD", "retrieved_times", {"n": str(len(retrieved)), "at": retrieved[-1].at}))

    def _shown(self, status: str, event: dict[str, Any], xds: list[str]) -> ShownDocument:
        report = event.get("report") or {}
        flags = [(str(f.get("code", "")), str(f.get("value", ""))) for f in report.get("sharing") or []]
        doc_id = str(event.get("id", ""))
        shown = ShownDocument(
            doc_id,
            str(event.get("set_id", "")),
            int(event.get("version", 1)),
            status,
            str(event.get("created", "")),
            str(event.get("title", "")),
            flags,
            [(channel, self._submission(channel, doc_id)) for channel in xds],
            [],
        )
        content = base64.b64decode(event.get("content", "") or "")
        if event.get("media_type", "text/xml") != "text/xml" or not content:
            shown.problem = "not_xml"
        elif len(content) > MAX_CDA:
            shown.problem = "too_large"
        else:
            try:
                shown.sections = narrative(content)
            except etree.XMLSyntaxError as exc:
                shown.problem = str(exc)[:200]
        return shown

    def _submission(self, channel: str, doc_id: str) -> str:
        """The status the ``xds`` channel recorded for a document version ("" when none)."""
        if getattr(self.stores, "backend", "") == "postgresql":
            with contextlib.closing(self.stores.submissions(channel)) as store:
                found = store.get(doc_id)
            return found.status if found else ""
        path = self.data_dir / f"{channel}.sqlite"
        if not path.is_file():
            return ""
        with contextlib.closing(open_database(path, Durability.READ_ONLY)) as db:
            try:
                row = db.execute("SELECT status, updated FROM entries WHERE unique_id = ?", (doc_id,)).fetchone()
            except sqlite3.OperationalError:  # the channel has not made its table yet
                return ""
        return f"{row[0]} ({row[1]})" if row else ""


def _made_by(db: Any, channel: str, documents: dict[str, list[ShownDocument]]) -> dict[str, str]:
    """Document id → idempotency key of the message that made it, for the documents shown: from a reports file
    (``channel`` empty) or the PostgreSQL reports storage of ``channel``."""
    ids = [d.id for versions in documents.values() for d in versions if d.id]
    if not ids:
        return {}
    if channel:
        sql = "SELECT document_id, message_key FROM report_messages WHERE channel = %s AND document_id = ANY(%s)"
        return {str(i): str(k) for i, k in db._all(sql, (channel, ids))}
    marks = ",".join("?" * len(ids))
    sql = f"SELECT document_id, message_key FROM messages WHERE document_id IN ({marks})"
    return {str(i): str(k) for i, k in db.execute(sql, ids).fetchall()}


def _versions(store: Any, accession: str) -> list[tuple[str, dict[str, Any]]]:
    """(status, document event) of an accession number's set through the reports store protocol: the current
    version, then the versions it replaced."""
    set_id = store.storage.set_of(f"acc:{accession}")
    doc = store.current(set_id) if set_id else None
    found: list[tuple[str, dict[str, Any]]] = []
    while doc is not None and len(found) < 20:
        found.append(("current" if not found else "superseded", plain(doc)))
        doc = store.document(doc.replaces) if doc.replaces else None
    return found


def narrative(cda: bytes) -> list[Section]:
    """The sections of a CDA body (nested ones too, with their depth): title and narrative text as lines."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    root = etree.fromstring(cda, parser)
    sections = []
    for section in root.iter(f"{V3}section"):
        depth = sum(1 for a in section.iterancestors(f"{V3}section"))
        title = section.find(f"{V3}title")
        shown = Section(_flat(title) if title is not None else "", depth=depth)
        text = section.find(f"{V3}text")
        if text is not None:
            shown.lines = _lines(text)
        sections.append(shown)
    return sections


def _flat(element: Any) -> str:
    return " ".join("".join(element.itertext()).split())


def _lines(text: Any) -> list[str]:
    """A narrative block as lines: a paragraph, a list item, a table row (cells separated by ' | ') each."""
    lines: list[str] = []
    current: list[str] = []

    def flush() -> None:
        line = " ".join(" ".join(current).split())
        if line:
            lines.append(line)
        current.clear()

    def walk(element: Any) -> None:
        name = etree.QName(element).localname if isinstance(element.tag, str) else ""
        if name in BLOCKS:
            flush()
        if element.text and name:
            current.append(element.text)
        for child in element:
            walk(child)
            if etree.QName(child).localname in ("td", "th") if isinstance(child.tag, str) else False:
                current.append("|")
            if child.tail:
                current.append(child.tail)
        if name in BLOCKS:
            if current and current[-1] == "|":
                current.pop()
            flush()

    walk(text)
    flush()
    return lines


class WorklistPage:
    """``/console/worklist``: the filters, the items of each worklist channel, the documents of their exams."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.reader = WorklistReader(console.runtime, console.reader.stores)

    def _read(self, channel: str, filters: dict[str, str]) -> tuple[list[dict[str, str]], bool, dict[str, Any]]:
        rows, more = self.reader.items(channel, query_of(filters))
        return rows, more, self.reader.documents([r["accession"] for r in rows])

    def _audit(
        self,
        request: Any,
        identity: Any,
        channel: str,
        filters: dict[str, str],
        rows: list[dict[str, str]],
        documents: dict[str, list[ShownDocument]],
    ) -> None:
        """The page on the audit trail: the worklist query with the patients of its items; the documents shown, a
        read of each one's patient(s) and ids."""
        who = self.console.requestor(request, identity)
        query = urlencode({"channel": channel, **{k: v for k, v in filters.items() if v}})
        patients = audit.patient_refs((r["patient_id"], r["issuer"]) for r in rows)
        self.console.record(audit.queried(requestor=who, query=query, patients=patients))
        if not documents:
            return
        owners = audit.patient_refs((r["patient_id"], r["issuer"]) for r in rows if r["accession"] in documents)
        shown = [audit.object_ref("document", d.id) for versions in documents.values() for d in versions]
        self.console.record(audit.read(requestor=who, patients=owners, objects=shown[: audit.MAX_REFS]))

    async def page(self, request: Any) -> Any:
        identity = self.console.sessions.identity(request)
        if identity is None:
            return self.console.to_login(request)
        params = {k: v[:200] for k, v in request.query_params.items()}
        filters, errors = filters_of(params)
        channels = self.reader.channels()
        channel = params.get("channel", "")
        channel = channel if channel in channels else (channels[0] if channels else "")
        rows: list[dict[str, str]] = []
        more = False
        documents: dict[str, Any] = {}
        if channel and not errors:
            try:
                rows, more, documents = await self.console.reader.run(self._read, channel, filters)
            except QueryError as exc:
                errors.append(str(exc))
            except ScanStopped:  # more candidates than MAX_EXAMINED: said on the form
                errors.append(LABELS[language(request)]["too_many_candidates"])
        if rows:
            self._audit(request, identity, channel, filters, rows, documents)
        return self.console.render(
            request,
            "worklist.html",
            identity,
            status=400 if errors else 200,
            filters=filters,
            errors=errors,
            channels=channels,
            channel=channel,
            rows=rows,
            more=more,
            limit=MAX_ITEMS,
            documents=documents,
        )
