"""The FHIR resources traboule serves: SQLite (WAL, ``Durability.POWER_LOSS``), one row per resource plus an index
of token search parameters. `SQLiteFHIRStore` implements `traboule.stores.FHIRStore` (whose docstring states the
guarantees every backend keeps).

* ``resources(type, id, version_id, last_updated, seq, json)``: the current version of each resource. ``seq`` is
  the journal sequence of the event that wrote it: an older event (a retry arriving after a newer change) does not
  overwrite a newer state.
* ``tokens(type, name, system, value, id)``: ``identifier`` (system, value) of ServiceRequest and Patient,
  ``subject`` / ``patient`` (the reference ``Patient/{id}``) and ``status`` of ServiceRequest, ``_tag`` (the
  ``meta.tag`` codes, e.g. ``urn:traboule:tags|unscheduled``); for DocumentReference the IHE MHD ITI-67 parameters
  (``_document_tokens``), names folded for string search, and ``deleted`` (PDSm's logical deletion: such an entry
  is left out of every search, and its document is no longer served). A DiagnosticReport ``entered-in-error`` (the
  report of a deleted document set) is left out of every search too.

* ``remote(type, id, version_id, location, pushed_at)``: which version of a resource a FHIR server holds, and
  under which ``Type/id`` there (written by the channel's FHIR server destination).

``upsert`` bumps ``meta.versionId`` only when the content (everything but ``meta``) changed, so a redelivery
leaves the resource as it was. One connection behind a lock: safe to call from ``asyncio.to_thread``.
`search_where` (the search SQL) and ``_tokens`` are shared with the PostgreSQL store
(`traboule.stores.postgres.fhir_store`): both backends answer a search alike.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from traboule.errors import SearchError
from traboule.formats.fhir_codes import IS_DELETED, STUDY_UID_TYPE
from traboule.stores.sqlite import Durability, open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    json TEXT NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE TABLE IF NOT EXISTS tokens (
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_value ON tokens (type, name, value, system);
CREATE INDEX IF NOT EXISTS tokens_id ON tokens (type, id);
CREATE TABLE IF NOT EXISTS remote (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    location TEXT NOT NULL,
    pushed_at TEXT NOT NULL,
    PRIMARY KEY (type, id)
);
"""

# Search parameters per resource type (besides _id): name → kind. What the API and CapabilityStatement offer.
SEARCH_PARAMS: dict[str, dict[str, str]] = {
    "ServiceRequest": {
        "identifier": "token",
        "status": "token",
        "subject": "reference",
        "patient": "reference",
        "patient.identifier": "token",
        "_tag": "token",
    },
    "Patient": {"identifier": "token"},
    "ImagingStudy": {
        "identifier": "token",
        "subject": "reference",
        "patient": "reference",
        "patient.identifier": "token",
        "basedon": "reference",
    },
    "DocumentReference": {  # IHE MHD ITI-67 (French PDSm): the shared reports
        "identifier": "token",
        "status": "token",
        "type": "token",
        "category": "token",
        "date": "date",
        "related": "reference",  # a reference (ServiceRequest/{id}) or, as a token, a referenceIdList identifier
        "subject": "reference",
        "patient": "reference",
        "patient.identifier": "token",
        "creation": "date",
        "author.given": "string",
        "author.family": "string",
        "setting": "token",
        "facility": "token",
        "period": "date",
        "event": "token",
        "security-label": "token",
        "format": "token",
    },
    "DiagnosticReport": {
        "identifier": "token",
        "status": "token",
        "code": "token",
        "subject": "reference",
        "patient": "reference",
        "patient.identifier": "token",
        "basedon": "reference",
    },
    "Binary": {},  # read only: the documents' bytes (MHD ITI-68)
}
REFERENCE_TYPES = {"basedon": "ServiceRequest"}  # the resource a reference parameter points at, Patient otherwise
TOKENS_VERSION = 2  # PRAGMA user_version: a store indexed by an older version has its tokens rebuilt at open
_REFERENCE = re.compile(r"[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}", re.ASCII)
# Values in one search (every comma-separated value of every parameter): each is one SQL clause, and SQLite
# refuses an expression deeper than 1000 ("Expression tree is too large") -- a 500 for what is a bad request.
MAX_SEARCH_VALUES = 100
MAX_OFFSET = 10**9  # far beyond any store we hold, and well inside SQLite's 64-bit integers


def _content(resource: dict[str, Any]) -> str:
    """What a version is made of: everything but ``meta``, except its tags (a workflow state, e.g. unscheduled)."""
    content = {k: v for k, v in resource.items() if k != "meta"}
    tags = (resource.get("meta") or {}).get("tag")
    if tags:
        content["meta.tag"] = tags
    return json.dumps(content, sort_keys=True, ensure_ascii=False)


def _tokens(resource: dict[str, Any]) -> list[tuple[str, str, str]]:
    rtype = resource["resourceType"]
    out = []
    idents = list(resource.get("identifier") or [])
    if resource.get("masterIdentifier"):
        idents.append(resource["masterIdentifier"])
    for ident in idents:
        if ident.get("value"):
            out.append(("identifier", ident.get("system", ""), ident["value"]))
    for tag in (resource.get("meta") or {}).get("tag") or []:
        if tag.get("code"):
            out.append(("_tag", tag.get("system", ""), tag["code"]))
    if rtype in ("ServiceRequest", "ImagingStudy", "DocumentReference", "DiagnosticReport"):
        ref = (resource.get("subject") or {}).get("reference", "")
        if ref:
            out.append(("subject", "", ref))
    if rtype in ("ServiceRequest", "DocumentReference", "DiagnosticReport") and resource.get("status"):
        out.append(("status", "", resource["status"]))
    if rtype in ("ImagingStudy", "DiagnosticReport"):
        for based_on in resource.get("basedOn") or []:
            if based_on.get("reference"):
                out.append(("basedon", "", based_on["reference"]))
    codings = {"type": resource.get("type"), "code": resource.get("code") if rtype == "DiagnosticReport" else None}
    for name, concept in codings.items():
        for coding in (concept or {}).get("coding", []) if rtype != "ServiceRequest" else []:
            out.append((name, coding.get("system", ""), coding.get("code", "")))
    if rtype == "DocumentReference":
        for category in resource.get("category") or []:
            for coding in category.get("coding", []):
                out.append(("category", coding.get("system", ""), coding.get("code", "")))
        if resource.get("date"):
            out.append(("date", "", utc_instant(resource["date"])))
        out += _document_tokens(resource)
    return out


def _document_tokens(resource: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The IHE MHD ITI-67 parameters of a DocumentReference beyond the common ones (see ``SEARCH_PARAMS``)."""
    out: list[tuple[str, str, str]] = []
    context = resource.get("context") or {}
    for related in context.get("related") or []:
        ident = related.get("identifier") or {}
        if ident.get("value"):
            out.append(("related", ident.get("system", ""), ident["value"]))
            if _related_kind(ident) == STUDY_UID_TYPE:  # also as FHIR's ImagingStudy identifier: urn:dicom:uid
                out.append(("related", "urn:dicom:uid", f"urn:oid:{ident['value']}"))
        if related.get("reference"):
            out.append(("related.reference", "", related["reference"]))
    concepts = {
        "setting": [context.get("practiceSetting")],
        "facility": [context.get("facilityType")],
        "event": context.get("event") or [],
        "security-label": resource.get("securityLabel") or [],
        "format": [c.get("format") for c in resource.get("content") or [] if c.get("format")],
    }
    for name, values in concepts.items():
        for concept in values:
            codings = concept.get("coding", []) if concept and "coding" in concept else [concept] if concept else []
            out += [(name, c.get("system", ""), c["code"]) for c in codings if c.get("code")]
    for content in resource.get("content") or []:
        attachment = content.get("attachment") or {}
        if attachment.get("creation"):
            out.append(("creation", "", utc_instant(attachment["creation"])))
        url = attachment.get("url", "")
        if url.startswith("Binary/"):
            out.append(("binary", "", url.split("/", 1)[1]))
    period = context.get("period") or {}
    if period.get("start") or period.get("end"):
        # A Period is a range: its start and end (the start when open-ended: an act is an instant here).
        out.append(("period", "", utc_instant(period.get("start") or period["end"])))
        out.append(("period.end", "", utc_instant(period.get("end") or period["start"])))
    contained = {f"#{c.get('id')}": c for c in resource.get("contained") or []}
    for author in resource.get("author") or []:
        for person in _people(contained, author.get("reference", "")):
            for name in person.get("name") or []:
                for given in name.get("given") or []:
                    out.append(("author.given", "", fold(given)))
                if name.get("family"):
                    out.append(("author.family", "", fold(name["family"])))
    if any(e.get("url") == IS_DELETED and e.get("valueBoolean") for e in resource.get("extension") or []):
        out.append(("deleted", "", "true"))
    return out


def _related_kind(ident: dict[str, Any]) -> str:
    return next((c.get("code", "") for c in (ident.get("type") or {}).get("coding") or []), "")


def _people(contained: dict[str, dict[str, Any]], ref: str) -> list[dict[str, Any]]:
    """The Practitioner (or Patient) an author reference names among the contained resources, through a
    PractitionerRole when it points at one."""
    found = contained.get(ref)
    if found is None:
        return []
    if found.get("resourceType") == "PractitionerRole":
        found = contained.get((found.get("practitioner") or {}).get("reference", ""))
    return [found] if found is not None and found.get("resourceType") in ("Practitioner", "Patient") else []


def fold(text: str) -> str:
    """A string as FHIR string search compares it: case and accents ignored (NFKD, combining marks dropped)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def utc_instant(value: str) -> str:
    """A FHIR date/dateTime/instant as ``YYYY-MM-DDTHH:MM:SS`` in UTC (dates stay dates): sortable text."""
    if len(value) <= 10:
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S")


class SQLiteFHIRStore:
    """The FHIR resources of one ``fhir`` channel (`traboule.stores.FHIRStore`)."""

    def __init__(self, path: str, timezone: Any = None):
        """``timezone``: how a date or a zone-less time in a date search is read (local days); UTC when None."""
        self.path = path
        self.timezone = timezone or UTC
        self._lock = threading.RLock()
        self._depth = 0
        self._db = open_database(path, Durability.POWER_LOSS, threads=True, busy_timeout_s=5.0)
        self._db.executescript(SCHEMA)
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the search index of a store written by an older traboule (new search parameters)."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version >= TOKENS_VERSION:
            return
        with self.transaction():
            self._db.execute("DELETE FROM tokens")
            for (text,) in self._db.execute("SELECT json FROM resources").fetchall():
                resource = json.loads(text)
                rtype, rid = resource["resourceType"], resource["id"]
                self._db.executemany(
                    "INSERT INTO tokens (type, name, system, value, id) VALUES (?, ?, ?, ?, ?)",
                    [(rtype, name, system, value, rid) for name, system, value in _tokens(resource)],
                )
            self._db.execute(f"PRAGMA user_version = {TOKENS_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One SQLite transaction for everything done inside (nests; the lock is held throughout)."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._db.execute("COMMIT")

    def upsert(self, resource: dict[str, Any], seq: int = 0) -> bool:
        """Store ``resource`` (its ``resourceType`` and ``id`` say where); True when it was created or changed.
        ``seq``: the journal sequence of the event; a resource written by a later event is left alone."""
        rtype, rid = resource["resourceType"], resource["id"]
        with self.transaction():
            row = self._db.execute(
                "SELECT version_id, seq, json FROM resources WHERE type=? AND id=?", (rtype, rid)
            ).fetchone()
            if row is not None:
                version, stored_seq, stored = row
                if seq and stored_seq and seq < stored_seq:
                    return False
                if _content(json.loads(stored)) == _content(resource):
                    if seq > stored_seq:
                        self._db.execute("UPDATE resources SET seq=? WHERE type=? AND id=?", (seq, rtype, rid))
                    return False
                version += 1
            else:
                version = 1
            updated = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            out = dict(resource)
            out["meta"] = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": updated}
            text = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
            self._db.execute(
                "INSERT INTO resources (type, id, version_id, last_updated, seq, json) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (type, id) DO UPDATE SET version_id=excluded.version_id, "
                "last_updated=excluded.last_updated, seq=MAX(resources.seq, excluded.seq), json=excluded.json",
                (rtype, rid, version, updated, seq, text),
            )
            self._db.execute("DELETE FROM tokens WHERE type=? AND id=?", (rtype, rid))
            self._db.executemany(
                "INSERT INTO tokens (type, name, system, value, id) VALUES (?, ?, ?, ?, ?)",
                [(rtype, name, system, value, rid) for name, system, value in _tokens(out)],
            )
            return True

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT json FROM resources WHERE type=? AND id=?", (rtype, rid)).fetchone()
        return None if row is None else json.loads(row[0])

    def seq_of(self, rtype: str, rid: str) -> int:
        """The journal sequence of the latest event that wrote the resource (0: none, or unknown)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM resources WHERE type=? AND id=?", (rtype, rid)).fetchone()
        return int(row[0] or 0) if row else 0

    def get_with_remote(self, rtype: str, rid: str) -> tuple[dict[str, Any] | None, tuple[int, str] | None]:
        """A resource and its pushed copy (``remote``), in one query."""
        with self._lock:
            row = self._db.execute(
                "SELECT r.json, p.version_id, p.location FROM resources r LEFT JOIN remote p "
                "ON p.type = r.type AND p.id = r.id WHERE r.type=? AND r.id=?",
                (rtype, rid),
            ).fetchone()
        if row is None:
            return None, None
        return json.loads(row[0]), (int(row[1]), str(row[2])) if row[1] is not None else None

    def remote(self, rtype: str, rid: str) -> tuple[int, str] | None:
        """(version pushed, ``Type/id`` on the FHIR server) of a resource, None when never pushed."""
        with self._lock:
            row = self._db.execute(
                "SELECT version_id, location FROM remote WHERE type=? AND id=?", (rtype, rid)
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def set_remote(self, rows: list[tuple[str, str, int, str]]) -> None:
        """Record pushed copies: (type, id, version pushed, ``Type/id`` on the server)."""
        pushed_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        with self.transaction():
            self._db.executemany(
                "INSERT INTO remote (type, id, version_id, location, pushed_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (type, id) DO UPDATE SET version_id=MAX(remote.version_id, excluded.version_id), "
                "location=excluded.location, pushed_at=excluded.pushed_at",
                [(t, i, v, loc, pushed_at) for t, i, v, loc in rows],
            )

    def forget_remote(self) -> list[tuple[str, str]]:
        """Forget every pushed copy (the server was restored or wiped); returns every resource, to push again."""
        with self.transaction():
            self._db.execute("DELETE FROM remote")
            rows = self._db.execute("SELECT type, id FROM resources ORDER BY rowid").fetchall()
        return [(str(t), str(i)) for t, i in rows]

    def unpushed(self) -> int:
        """Resources whose current version no FHIR server has been sent yet."""
        with self._lock:
            (n,) = self._db.execute(
                "SELECT count(*) FROM resources r LEFT JOIN remote p ON p.type = r.type AND p.id = r.id "
                "WHERE p.version_id IS NULL OR p.version_id < r.version_id"
            ).fetchone()
        return int(n)

    def holders(self, rtype: str, value: str) -> list[tuple[str, str]]:
        """(id, system) of every identifier of ``rtype`` with this exact value, whatever its system."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, system FROM tokens WHERE type = ? AND name = 'identifier' AND value = ?", (rtype, value)
            ).fetchall()
        return [(str(i), str(s)) for i, s in rows]

    def by_subject(self, rtype: str, subject: str, include_deleted: bool = True) -> list[dict[str, Any]]:
        """Every resource of ``rtype`` whose subject is the reference ``subject`` (``Patient/id``), in insertion
        order; with ``include_deleted`` those no search finds too (a deleted DocumentReference): a merge moves
        them all."""
        sql = (
            "SELECT r.json FROM resources r WHERE r.type = ? AND r.id IN "
            "(SELECT id FROM tokens WHERE type = ? AND name = 'subject' AND value = ?)"
        )
        if not include_deleted:
            sql += " AND r.id NOT IN (SELECT id FROM tokens WHERE type = ? AND name = 'deleted')"
        args = [rtype, rtype, subject] + ([] if include_deleted else [rtype])
        with self._lock:
            rows = self._db.execute(f"{sql} ORDER BY r.rowid", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count_tagged(self, rtype: str, tag: dict[str, str], without: dict[str, str] | None = None) -> int:
        """Resources of ``rtype`` carrying the ``meta.tag`` ``tag`` (and not ``without``)."""
        tagged = "SELECT id FROM tokens WHERE type = ? AND name = '_tag' AND system = ? AND value = ?"
        sql = f"SELECT count(DISTINCT id) FROM ({tagged})"
        args = [rtype, tag["system"], tag["code"]]
        if without is not None:
            sql += f" WHERE id NOT IN ({tagged})"
            args += [rtype, without["system"], without["code"]]
        with self._lock:
            return int(self._db.execute(sql, args).fetchone()[0])

    def count(self, rtype: str | None = None) -> int:
        with self._lock:
            if rtype is None:
                return self._db.execute("SELECT count(*) FROM resources").fetchone()[0]
            return self._db.execute("SELECT count(*) FROM resources WHERE type=?", (rtype,)).fetchone()[0]

    def search(
        self, rtype: str, params: dict[str, str | list[str]], count: int = 20, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]:
        """Resources of ``rtype`` matching every parameter (a comma in a value means "or"; a parameter given
        several times, as a list, means "and", e.g. a date range); in insertion order.
        Tokens: ``system|value``, ``value`` (any system), ``|value`` (no system), ``system|`` (any value)."""
        sql_where, args = search_where(rtype, params, count, offset, self.timezone)
        with self._lock:
            total = self._db.execute(f"SELECT count(*) FROM resources r WHERE {sql_where}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT r.json FROM resources r WHERE {sql_where} ORDER BY r.rowid LIMIT ? OFFSET ?",
                [*args, count, offset],
            ).fetchall()
        return total, [json.loads(r[0]) for r in rows]

    def withdrawn_binary(self, binary_id: str) -> bool:
        """Whether the document a Binary holds was deleted (PDSm: the document itself is no longer served)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM tokens b JOIN tokens d ON d.type = b.type AND d.id = b.id AND d.name = 'deleted' "
                "WHERE b.type = 'DocumentReference' AND b.name = 'binary' AND b.value = ? LIMIT 1",
                (binary_id,),
            ).fetchone()
        return row is not None

    def document_of_binary(self, binary_id: str) -> dict[str, Any] | None:
        """The DocumentReference whose attachment is ``Binary/<binary_id>`` (the newest when several; deleted or
        not), None when none is: the ``binary`` token (indexed), then the resource by its key."""
        with self._lock:
            row = self._db.execute(
                "SELECT r.json FROM tokens b JOIN resources r ON r.type = b.type AND r.id = b.id "
                "WHERE b.type = 'DocumentReference' AND b.name = 'binary' AND b.value = ? "
                "ORDER BY r.rowid DESC LIMIT 1",
                (binary_id,),
            ).fetchone()
        return None if row is None else json.loads(row[0])


FHIRStore = SQLiteFHIRStore  # the name the fhir channel and the command line construct today


def search_where(
    rtype: str,
    params: dict[str, str | list[str]],
    count: int,
    offset: int,
    zone: Any,
    encode: Callable[[str], str] = str,
) -> tuple[str, list[Any]]:
    """The SQL condition (on ``resources r`` and the token table ``tokens``, ``?`` placeholders) and its arguments
    for a search (see `SQLiteFHIRStore.search`); raises ``SearchError`` for a search the store does not serve.
    ``encode``: how a backend stores token text (applied to every text argument; PostgreSQL escapes NUL)."""
    supported = SEARCH_PARAMS.get(rtype)
    if supported is None:
        raise SearchError("", f"resource type {rtype!r} is not served")
    for param, number in (("_count", count), ("_offset", offset)):
        if not 0 <= number <= MAX_OFFSET:
            raise SearchError(param, f"{param} must be an integer from 0 to {MAX_OFFSET}", "invalid")
    where, args = ["r.type = ?"], [rtype]
    values = 0
    for name, given in params.items():
        for raw in [given] if isinstance(given, str) else given:
            ors: list[str] = []
            values += raw.count(",") + 1
            if values > MAX_SEARCH_VALUES:
                raise SearchError(name, f"at most {MAX_SEARCH_VALUES} values in one search", "too-costly")
            for value in raw.split(","):
                clause, clause_args = _clause(rtype, name, value, supported, zone, encode)
                ors.append(clause)
                args.extend(clause_args)
            where.append("(" + " OR ".join(ors) + ")")
    if rtype == "DocumentReference":  # PDSm: a deleted entry is found by no search
        where.append("r.id NOT IN (SELECT id FROM tokens WHERE type = 'DocumentReference' AND name = 'deleted')")
    if rtype == "DiagnosticReport":  # nor the report of a deleted document set (entered-in-error)
        where.append(
            "r.id NOT IN (SELECT id FROM tokens WHERE type = 'DiagnosticReport' AND name = 'status' "
            "AND value = 'entered-in-error')"
        )
    sql_where = " AND ".join(where)
    return sql_where, [encode(a) if isinstance(a, str) else a for a in args]


def _clause(
    rtype: str, name: str, value: str, supported: dict[str, str], zone: Any, encode: Callable[[str], str]
) -> tuple[str, list[str]]:
    if name == "_id":
        return "r.id = ?", [value]
    kind = supported.get(name)
    if kind is None:
        raise SearchError(name, f"search parameter {name!r} is not supported for {rtype}")
    if name == "related":
        return _related(rtype, value)
    if kind == "string":  # FHIR string search: starts with, case and accents ignored
        folded = fold(value)
        if not folded:  # an empty prefix would match every resource with the element
            raise SearchError(name, f"{name}: a value is required", "invalid")
        return (
            "r.id IN (SELECT p.id FROM tokens p WHERE p.type = ? AND p.name = ? "
            f"AND substr(p.value, 1, {len(encode(folded))}) = ?)",
            [rtype, name, folded],
        )
    if kind == "reference":
        target = REFERENCE_TYPES.get(name, "Patient")
        ref = value if "/" in value else f"{target}/{value}"
        if not ref.startswith(f"{target}/"):
            raise SearchError(name, f"{name}: only {target} references are supported")
        token = "basedon" if name == "basedon" else "subject"
        return (
            f"r.id IN (SELECT id FROM tokens WHERE type = ? AND name = '{token}' AND value = ?)",
            [rtype, ref],
        )
    if kind == "date" and name == "period":
        return _period_clause(rtype, value, zone)
    if kind == "date":
        return _date_clause(rtype, name, value, zone)
    token_sql, token_args = _token(value)
    if name == "patient.identifier":
        return (
            "r.id IN (SELECT s.id FROM tokens s JOIN tokens p ON p.type = 'Patient' AND p.name = 'identifier' "
            f"AND s.value = 'Patient/' || p.id WHERE s.type = ? AND s.name = 'subject' AND {token_sql})",
            [rtype, *token_args],
        )
    return (
        f"r.id IN (SELECT p.id FROM tokens p WHERE p.type = ? AND p.name = ? AND {token_sql})",
        [rtype, name, *token_args],
    )


def _related(rtype: str, value: str) -> tuple[str, list[str]]:
    """``related``: a reference (``ServiceRequest/{id}``, or an absolute URL ending so) to a related resource,
    else a token on the related identifiers (accession number, order, study UID)."""
    tail = "/".join(value.rsplit("/", 2)[-2:]) if "://" in value and "|" not in value else value
    if "|" not in tail and _REFERENCE.fullmatch(tail):
        return (
            "r.id IN (SELECT id FROM tokens WHERE type = ? AND name = 'related.reference' AND value = ?)",
            [rtype, tail],
        )
    token_sql, token_args = _token(value)
    return (
        f"r.id IN (SELECT p.id FROM tokens p WHERE p.type = ? AND p.name = 'related' AND {token_sql})",
        [rtype, *token_args],
    )


def _token(value: str) -> tuple[str, list[str]]:
    """SQL on the token row aliased ``p`` for a token search value."""
    if "|" not in value:
        return "p.value = ?", [value]
    system, _, code = value.partition("|")
    if not code:
        return "p.system = ?", [system]
    return "p.system = ? AND p.value = ?", [system, code]


_DATE_PREFIXES = ("eq", "ne", "ge", "le", "gt", "lt", "sa", "eb", "ap")


def _date_clause(rtype: str, name: str, value: str, zone: Any) -> tuple[str, list[str]]:
    """``date=[prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]``: the value stands for the whole interval of its precision
    (a day is a local day in ``zone``; a time without a zone is local too); eq matches within it, ge/gt/le/lt compare
    with its start or end. Stored values are UTC ``YYYY-MM-DDTHH:MM:SS``."""
    prefix = value[:2] if value[:2] in _DATE_PREFIXES else "eq"
    moment = value[2:] if value[:2] in _DATE_PREFIXES else value
    if prefix not in ("eq", "ge", "le", "gt", "lt"):
        raise SearchError(name, f"{name}: prefix {prefix!r} is not supported (eq, ge, le, gt, lt)")
    try:
        low, high = _interval(moment, zone)
    except (ValueError, OverflowError) as exc:  # OverflowError: 0001-01-01 or 9999-12-31 moved to UTC
        raise SearchError(name, f"{name}: {value!r} is not a FHIR date ({exc})", "invalid") from exc
    sql, args = {
        "eq": ("p.value >= ? AND p.value < ?", [low, high]),
        "ge": ("p.value >= ?", [low]),
        "gt": ("p.value >= ?", [high]),
        "le": ("p.value < ?", [high]),
        "lt": ("p.value < ?", [low]),
    }[prefix]
    return (
        f"r.id IN (SELECT p.id FROM tokens p WHERE p.type = ? AND p.name = ? AND {sql})",
        [rtype, name, *args],
    )


def _period_clause(rtype: str, value: str, zone: Any) -> tuple[str, list[str]]:
    """``period``: the searched interval against the Period's range [start, end] (FHIR search on a range: eq when
    the range lies within the interval, ge / gt / le / lt when it reaches beyond its start / end)."""
    prefix = value[:2] if value[:2] in _DATE_PREFIXES else "eq"
    moment = value[2:] if value[:2] in _DATE_PREFIXES else value
    if prefix not in ("eq", "ge", "le", "gt", "lt"):
        raise SearchError("period", f"period: prefix {prefix!r} is not supported (eq, ge, le, gt, lt)")
    try:
        low, high = _interval(moment, zone)
    except (ValueError, OverflowError) as exc:
        raise SearchError("period", f"period: {value!r} is not a FHIR date ({exc})", "invalid") from exc
    sql, args = {
        "eq": ("p.value >= ? AND q.value < ?", [low, high]),
        "ge": ("q.value >= ?", [low]),
        "gt": ("q.value >= ?", [high]),
        "le": ("p.value < ?", [high]),
        "lt": ("p.value < ?", [low]),
    }[prefix]
    return (
        "r.id IN (SELECT p.id FROM tokens p JOIN tokens q ON q.type = p.type AND q.id = p.id AND q.name = 'period.end' "
        f"WHERE p.type = ? AND p.name = 'period' AND {sql})",
        [rtype, *args],
    )


def _interval(moment: str, zone: Any) -> tuple[str, str]:
    """[start, end) in UTC text of a FHIR date / dateTime at its own precision."""
    m = re.fullmatch(
        r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
        moment,
        re.ASCII,  # \d would accept other scripts' digits (Arabic-Indic, full width), which FHIR dates do not
    )
    if not m:
        raise ValueError("expected YYYY[-MM[-DD[Thh:mm[:ss][zone]]]]")
    year, month, day, hour, minute, second, offset = m.groups()
    tz = zone
    if offset:
        tz = UTC if offset == "Z" else timezone(timedelta(hours=int(offset[:3]), minutes=int(offset[0] + offset[4:])))
    start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    if second:
        end = start + timedelta(seconds=1)
    elif minute:
        end = start + timedelta(minutes=1)
    elif day:
        end = start + timedelta(days=1)
    elif month:
        end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    else:
        end = start.replace(year=start.year + 1)

    def utc(moment: datetime) -> str:
        return moment.replace(tzinfo=tz).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")

    return utc(start), utc(end)
