"""traboule's own FHIR R4 API (read-only, JSON and XML) under ``/fhir``, served from a `FHIRStore`: among others an
IHE MHD Document Responder (ITI-67 Find Document References, ITI-68 Retrieve Document) for the French PDSm profile.

* ``GET /fhir/metadata``: CapabilityStatement (what is really served: types, interactions, parameters, profiles).
* ``GET /fhir/{type}/{id}``: read (404 OperationOutcome when missing or not a FHIR id, 410 for a deleted
  DocumentReference and the entered-in-error DiagnosticReport of a deleted document set; ETag
  ``W/"version"``). ``Binary``: the document's bytes with their own media type (ITI-68), the Binary resource when
  FHIR JSON / XML is asked for, 406 for an Accept neither satisfies, 404 once the document was deleted.
* ``GET /fhir/{type}?...`` and ``POST /fhir/{type}/_search`` (form body, at most ``MAX_FORM_BYTES``): searchset
  Bundle with ``total``, paged by ``_count`` (default 20, at most 100) and ``_offset``, with ``self`` / ``next`` /
  ``previous`` links. A parameter the type does not support is ignored and left out of ``self`` (FHIR's default,
  ``Prefer: handling=lenient``); with ``Prefer: handling=strict`` it is a 400 OperationOutcome naming it. A
  modifier or chain the type does not declare, an empty value, a malformed value (a number, a date, more than 100
  values in one search) is a 400 either way. ``ALIASES``: other spellings of declared parameters; a reference
  parameter given as an absolute URL of this server is its ``Type/id``.
* JSON unless ``_format`` (``xml``, ``application/fhir+xml``...) or ``Accept: application/fhir+xml`` asks for XML.
* Anything else under ``/fhir``: 404 OperationOutcome, 405 for another method (read-only API).
* The store's database cannot answer now (PostgreSQL down or restarting, its connections all busy): 503
  OperationOutcome ``transient`` with ``Retry-After`` (`RETRY_AFTER_S`), never a 500.

Audit trail (IHE ATNA, `traboule.audit`): a search that answers is a Query (``ITI-67`` for DocumentReference) with
the query and the patients of the page's resources; a read a Patient Record read; a document retrieved (``Binary``)
an Export ``ITI-68`` naming the document's patient and unique id (from its DocumentReference). The requestor is the
bearer token's name and role (``anonymous`` without tokens) and the client's address: in a process the main one
forwards to, the ``X-Forwarded-For`` it sets, believed only on a request carrying this run's internal secret
(`traboule.app.http.InternalCalls`; anyone else's is ignored: the address recorded is the one connected from).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from traboule import audit
from traboule.bus.retry import database_unavailable
from traboule.errors import SearchError, Unavailable
from traboule.formats.fhir_xml import FHIR_XML, JSON_FORMATS, XML_FORMATS, to_xml
from traboule.stores import FHIRStore
from traboule.stores.fhir_store import MAX_OFFSET, SEARCH_PARAMS
from traboule.translate.fhir_mapping import MHD_DOCUMENT_REFERENCE, PDSM_DOCUMENT_REFERENCE, is_deleted

log = structlog.get_logger("traboule.app.fhir_api")

FHIR_JSON = "application/fhir+json"
RETRY_AFTER_S = 5  # what a 503 (the store's database out of reach) tells a client to wait before trying again
FORM = "application/x-www-form-urlencoded"
DEFAULT_COUNT = 20
MAX_COUNT = 100
MAX_FORM_BYTES = 16 * 1024  # a search's form body: as much as a long query string, far below the 1 MiB default
MAX_FORM_FIELDS = 200
IGNORED = {"_format", "_pretty"}  # _format chooses the answer's format; _pretty has no effect
PROFILES = {"DocumentReference": [PDSM_DOCUMENT_REFERENCE, MHD_DOCUMENT_REFERENCE]}
# ASCII digits only: int() also takes "1_000", " 7", "+3" and other scripts' digits, which no FHIR client sends.
_NUMBER = re.compile(r"[0-9]{1,10}", re.ASCII)
# What a Host header may hold (RFC 9110 7.2: host [":" port]); links are built from it, so anything else (a path,
# a quote, a space) would be served back inside the Bundles: the server's own address is used instead.
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?", re.ASCII)
# A FHIR id (R4 datatypes, id): anything else is no resource here, answered without being echoed.
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}", re.ASCII)
# What a parameter name may be for it to be named back in an OperationOutcome's expression.
_NAME = re.compile(r"[A-Za-z0-9_\-.:]{1,64}", re.ASCII)
# Other spellings of a declared parameter: the chain through ``subject``, a type modifier naming the only type the
# reference may point at (FHIR R4 search: chained parameters, the ``:[type]`` modifier).
ALIASES = {
    "subject.identifier": "patient.identifier",
    "subject:Patient.identifier": "patient.identifier",
    "patient:Patient.identifier": "patient.identifier",
    "subject:Patient": "subject",
    "patient:Patient": "patient",
    "basedon:ServiceRequest": "basedon",
}
PARAM_DOCS = {
    "identifier": "system|value, value, |value or system| (DocumentReference: entryUUID or uniqueId)",
    "status": "ServiceRequest / DocumentReference status (active, revoked, completed / current, superseded ...)",
    "subject": "Patient/{id}",
    "patient": "Patient/{id}",
    "patient.identifier": "the subject Patient's identifier (chained): system|value",
    "basedon": "ServiceRequest/{id}",
    "type": "system|code (DocumentReference: http://loinc.org|18748-4)",
    "category": "system|code (DocumentReference class code)",
    "date": "[eq|ge|le|gt|lt]YYYY-MM-DD[Thh:mm:ss+zz:zz] (DocumentReference date)",
    "related": "ServiceRequest/{id}, or system|value of a related identifier (accession number, order, study UID)",
    "code": "system|code (DiagnosticReport code)",
    "_tag": "system|code of meta.tag: urn:traboule:tags|unscheduled (steps performed without an order)",
    "creation": "[eq|ge|le|gt|lt]date: the document's creation (content.attachment.creation)",
    "author.given": "an author's given name (starts with, case and accents ignored)",
    "author.family": "an author's family name (starts with, case and accents ignored)",
    "setting": "system|code of the practice setting (context.practiceSetting)",
    "facility": "system|code of the facility type (context.facilityType)",
    "period": "[eq|ge|le|gt|lt]date against the act's period (context.period)",
    "event": "system|code of an event (modality, CCAM act)",
    "security-label": "system|code: confidentiality (N, R, V) or visibility (TRE_A07: MASQUE_PS ...)",
    "format": "system|code of the document format (content.format)",
}


def _shown(text: str) -> str:
    """A received name as diagnostics show it: quoted and escaped (``repr``), at most 80 characters."""
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def withdrawn(rtype: str, resource: dict[str, Any]) -> bool:
    """A resource no search finds and a read answers 410: a deleted DocumentReference (PDSm), the DiagnosticReport
    of a deleted document set (entered-in-error)."""
    if rtype == "DiagnosticReport":
        return resource.get("status") == "entered-in-error"
    return rtype == "DocumentReference" and is_deleted(resource)


class FHIRResponse(JSONResponse):
    media_type = FHIR_JSON


def answer(
    body: dict[str, Any], fmt: str = "json", status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` in the format asked for: FHIR JSON, or FHIR XML when ``fmt`` is ``xml``."""
    if fmt == "xml":
        return Response(to_xml(body), status_code=status, media_type=FHIR_XML, headers=headers)
    return FHIRResponse(body, status_code=status, headers=headers)


def outcome(
    status: int,
    code: str,
    text: str,
    expression: str = "",
    headers: dict[str, str] | None = None,
    fmt: str = "json",
) -> Response:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": text}
    if expression and _NAME.fullmatch(expression):  # a received name is named back only when plainly a name
        issue["expression"] = [expression]
    return answer({"resourceType": "OperationOutcome", "issue": [issue]}, fmt, status, headers)


def capability_statement(base: str) -> dict[str, Any]:
    resources = []
    for rtype, params in SEARCH_PARAMS.items():
        entry: dict[str, Any] = {"type": rtype}
        if rtype in PROFILES:
            entry["supportedProfile"] = PROFILES[rtype]
        entry["interaction"] = [{"code": "read"}] + ([{"code": "search-type"}] if params else [])
        entry |= {"versioning": "versioned", "readHistory": False}
        if params:
            entry["searchParam"] = [{"name": "_id", "type": "token"}] + [
                {"name": name, "type": kind, "documentation": PARAM_DOCS.get(name, "")} for name, kind in params.items()
            ]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "traboule"},
        "implementation": {"description": "traboule FHIR API (read-only)", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json", "xml", FHIR_JSON, FHIR_XML],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Read-only. Search by GET [type]?... or POST [type]/_search (application/x-www-form-urlencoded). "
                    "Unsupported search parameters are ignored unless the request says Prefer: handling=strict; "
                    "an unsupported modifier or chain (name:modifier, name.chain) is refused either way. "
                    "DocumentReference: IHE MHD Find Document References [ITI-67] (PDSm flux 05-b); the document "
                    "at content.attachment.url: Retrieve Document [ITI-68]. A deleted document is found by no search."
                ),
                "resource": resources,
            }
        ],
    }


def absolute_urls(resource: dict[str, Any], base: str) -> dict[str, Any]:
    """Attachment URLs are stored relative to the API (``Binary/{id}``): served absolute, as MHD consumers expect."""
    attachments = [c.get("attachment") or {} for c in resource.get("content") or []]
    attachments += list(resource.get("presentedForm") or [])
    if not any(a.get("url", "").startswith("Binary/") for a in attachments):
        return resource
    out = {**resource}
    if "content" in out:
        out["content"] = [{**c, "attachment": _absolute(c.get("attachment") or {}, base)} for c in out["content"]]
    if "presentedForm" in out:
        out["presentedForm"] = [_absolute(a, base) for a in out["presentedForm"]]
    return out


def _absolute(attachment: dict[str, Any], base: str) -> dict[str, Any]:
    url = attachment.get("url", "")
    return {**attachment, "url": f"{base}/{url}"} if url.startswith("Binary/") else attachment


def media_ranges(accept: str) -> list[tuple[str, float]]:
    """The media ranges of an Accept header with their quality (RFC 9110 12.5.1), lowercased; at most 32."""
    out = []
    for part in accept.split(",")[:32]:
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = 0.0
        if media:
            out.append((media.lower(), quality))
    return out


def quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """How much ``media_type`` is accepted: the quality of the most specific range matching it, 0 when none."""
    kind = media_type.split("/", 1)[0]
    best = (-1, 0.0)
    for media, q in ranges:
        rank = 2 if media == media_type else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
        if rank > best[0]:
            best = (rank, q)
    return best[1]


def preferred_format(request: Request, form_format: str = "") -> str | None:
    """``json`` or ``xml`` from ``_format`` (query or form), else from Accept (JSON unless FHIR XML is preferred);
    None for a ``_format`` that is neither."""
    given = form_format or request.query_params.get("_format", "")
    if given:
        value = given.split(";")[0].strip().lower()
        return "xml" if value in XML_FORMATS else "json" if value in JSON_FORMATS else None
    ranges = media_ranges(request.headers.get("accept", ""))
    xml = max((q for m, q in ranges if m in XML_FORMATS), default=0.0)
    json = max((q for m, q in ranges if m in JSON_FORMATS), default=0.0)
    return "xml" if xml > json else "json"


def strict_handling(request: Request) -> bool:
    """``Prefer: handling=strict`` (RFC 7240; FHIR search 3.1.1.4)."""
    prefer = request.headers.get("prefer", "")[:256].lower()
    return any(p.strip().replace(" ", "") == "handling=strict" for p in re.split(r"[,;]", prefer))


async def form_pairs(request: Request) -> list[tuple[str, str]] | Response:
    """The parameters of a ``POST [type]/_search`` form body, read up to ``MAX_FORM_BYTES``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM:
        return outcome(415, "not-supported", f"a search by POST takes a {FORM} body")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return outcome(413, "too-long", f"a search form body is at most {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("ascii")
        return parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return outcome(400, "invalid", f"the form body is not {FORM} (UTF-8, at most {MAX_FORM_FIELDS} fields)")


@dataclass
class Search:
    """A search as this API runs it: the declared parameters kept (a repeated one as a list: every occurrence must
    match), the page asked for, and the ``_format`` given among them (kept in the paging links)."""

    rtype: str
    params: dict[str, str | list[str]] = field(default_factory=dict)
    count: int = DEFAULT_COUNT
    offset: int = 0
    form_format: str = ""


def parse_search(rtype: str, pairs: list[tuple[str, str]], base: str, *, strict: bool) -> Search:
    """The search ``pairs`` ask for ``rtype``: aliases resolved, ``_count`` / ``_offset`` read, a reference given as
    this server's URL cut to its ``Type/id``, an unknown plain name dropped (unless ``strict``). Raises
    ``SearchError`` (a 400) for a malformed page, an empty value, an undeclared modifier or chain."""
    declared = SEARCH_PARAMS[rtype]
    search = Search(rtype, form_format=next((v for k, v in pairs if k == "_format"), ""))
    for name, value in pairs:
        if name in IGNORED:
            continue
        name = ALIASES[name] if ALIASES.get(name) in declared else name
        if name in ("_count", "_offset"):
            if _NUMBER.fullmatch(value) is None or int(value) > MAX_OFFSET:
                raise SearchError(name, f"{name} must be an integer from 0 to {MAX_OFFSET}", "invalid")
            if name == "_count":
                search.count = min(int(value), MAX_COUNT)
            else:
                search.offset = int(value)
            continue
        if name != "_id" and name not in declared:
            # FHIR R4 search, Modifiers: a server SHALL reject a search holding a parameter with a modifier it
            # does not support (the specification's OperationOutcome example "searchfail": name:exact); an
            # unsupported chain is refused alike: ignoring either would widen the search to every patient's
            # resources. Only an unknown plain name is ignored (lenient, FHIR's default).
            if strict or ":" in name or "." in name:
                raise SearchError(name, f"search parameter {_shown(name)} is not supported for {rtype}")
            continue  # lenient (FHIR's default): ignored, and left out of the self link
        if "" in (v.strip() for v in value.split(",")):  # an empty value would match nothing or everything
            raise SearchError(name, f"{name}: a value is required", "invalid")
        if declared.get(name) == "reference" and name != "related":  # this server's URL: its Type/id tail
            value = ",".join(v.removeprefix(f"{base}/") for v in value.split(","))
        previous = search.params.get(name)
        if previous is None:
            search.params[name] = value
        else:  # repeated: every occurrence must match (a date range: date=ge...&date=le...)
            search.params[name] = [*([previous] if isinstance(previous, str) else previous), value]
    return search


def page_url(base: str, search: Search, offset: int) -> str:
    """The search's URL for the page at ``offset``: its kept parameters, ``_count``, ``_offset`` (and ``_format``)."""
    kept = [(k, x) for k, v in search.params.items() for x in ([v] if isinstance(v, str) else v)]
    query = [*kept, ("_count", str(search.count)), ("_offset", str(offset))]
    if search.form_format:
        query.append(("_format", search.form_format))
    return f"{base}/{search.rtype}?{urlencode(query)}"


def paging_links(base: str, search: Search, total: int) -> list[dict[str, str]]:
    """A searchset's ``self`` link, then ``next`` and ``previous`` when there are such pages."""
    count, offset = search.count, search.offset
    links = [{"relation": "self", "url": page_url(base, search, offset)}]
    if count and offset + count < total:
        links.append({"relation": "next", "url": page_url(base, search, offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": page_url(base, search, max(0, offset - count))})
    return links


def searchset(base: str, search: Search, total: int, found: list[dict[str, Any]]) -> dict[str, Any]:
    """The searchset Bundle of a page: ``total``, the paging links, an entry per resource found (none: no entry)."""
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": paging_links(base, search, total),
        "entry": [
            {
                "fullUrl": f"{base}/{search.rtype}/{r['id']}",
                "resource": absolute_urls(r, base),
                "search": {"mode": "match"},
            }
            for r in found
        ],
    }
    if not bundle["entry"]:
        del bundle["entry"]
    return bundle


def store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store's database cannot answer now (a later attempt may), not that the request or
    the code is wrong."""
    return database_unavailable(exc) or isinstance(exc, Unavailable | ConnectionError | TimeoutError)


Endpoint = Callable[["FHIRApi", Request], Awaitable[Response]]


def transient_failures(endpoint: Endpoint) -> Endpoint:
    """``endpoint``, answering 503 ``transient`` with ``Retry-After`` when the store's database cannot answer."""

    @functools.wraps(endpoint)
    async def guarded(api: FHIRApi, request: Request) -> Response:
        try:
            return await endpoint(api, request)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            log.warning("fhir_api.store_unavailable", error=type(exc).__name__)
            return outcome(
                503,
                "transient",
                "the FHIR store cannot be reached now: try again later",
                headers={"Retry-After": str(RETRY_AFTER_S)},
                fmt=preferred_format(request) or "json",
            )

    return guarded


class FHIRApi:
    """The ``/fhir`` interactions over a `FHIRStore`. ``base_url``: the public base (behind a proxy); default: from
    the request."""

    def __init__(self, store: FHIRStore, base_url: str = "", runtime: Any = None) -> None:
        self.store = store
        self.base_url = base_url
        self.runtime = runtime  # its audit trail (`traboule.audit.trail_of`), read at each record

    def requestor(self, request: Request) -> audit.Actor:
        """Who asked, for the audit trail: the bearer token's name and role, the client's address."""
        token = getattr(request.state, "token", None)
        address = request.client.host if request.client else ""
        if getattr(request.state, "internal", False):
            # Forwarded by the main process (this run's secret: `traboule.app.http.InternalCalls`), which sets
            # X-Forwarded-For to the client it saw; from anyone else the header is not believed.
            forwarded = request.headers.get("x-forwarded-for", "").strip()
            with contextlib.suppress(ValueError):
                address = str(ipaddress.ip_address(forwarded))
        if token is None:
            return audit.actor("anonymous", address)
        return audit.actor(token.name, address, user_name=token.role)

    def record(self, event: audit.AuditEvent) -> None:
        audit.trail_of(self.runtime).record(event)

    def base_of(self, request: Request) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        host = request.headers.get("host", "")
        if _HOST.fullmatch(host) is None:
            server_host, port = request.scope.get("server") or ("127.0.0.1", 80)
            host = f"[{server_host}]:{port}" if ":" in server_host else f"{server_host}:{port}"
        return f"{request.scope.get('scheme', 'http')}://{host}{request.scope.get('root_path', '')}/fhir"

    async def metadata(self, request: Request) -> Response:
        fmt = preferred_format(request)
        if fmt is None:
            return outcome(406, "not-supported", "_format: json or xml")
        return answer(capability_statement(self.base_of(request)), fmt)

    @transient_failures
    async def read(self, request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        fmt = preferred_format(request)
        if fmt is None:
            return outcome(406, "not-supported", "_format: json or xml")
        if rtype not in SEARCH_PARAMS:
            return outcome(404, "not-supported", f"resource type {_shown(rtype)} is not served here", fmt=fmt)
        if _ID.fullmatch(rid) is None:  # not a FHIR id: no such resource (and the id is not echoed)
            return outcome(404, "not-found", f"no {rtype} has this id", fmt=fmt)
        resource = await asyncio.to_thread(self.store.get, rtype, rid)
        if resource is None:
            return outcome(404, "not-found", f"{rtype}/{rid} is not known", fmt=fmt)
        if withdrawn(rtype, resource):  # FHIR read of a deleted resource: 410
            return outcome(410, "deleted", f"{rtype}/{rid} was deleted", fmt=fmt)
        headers = {"ETag": f'W/"{resource.get("meta", {}).get("versionId", "1")}"'}
        if rtype == "Binary":
            response = await self.retrieve(request, resource, headers)
            if response.status_code == 200:  # MHD ITI-68: the document left the engine
                actor = self.requestor(request)
                patients, objects = await asyncio.to_thread(retrieved, self.store, rid)
                self.record(
                    audit.exported(
                        destination=actor, requestor=actor, patients=patients, objects=objects, transaction="ITI-68"
                    )
                )
                unique_id = next((o.value for o in objects if o.kind == "document"), "")
                record_retrieve(self.runtime, unique_id, rid)  # counted for the console's documents page
            return response
        patients = await asyncio.to_thread(patients_in, self.store, [resource])
        objects = (audit.object_ref("resource", f"{rtype}/{rid}"),)
        self.record(audit.read(requestor=self.requestor(request), patients=patients, objects=objects))
        return answer(absolute_urls(resource, self.base_of(request)), fmt, headers=headers)

    async def retrieve(self, request: Request, binary: dict[str, Any], headers: dict[str, str]) -> Response:
        """MHD ITI-68: the document itself, byte for byte, with its own media type; the Binary resource when FHIR
        JSON or XML is asked for (``_format`` or Accept)."""
        if await asyncio.to_thread(self.store.withdrawn_binary, binary["id"]):
            # PDSm (suppression logique): the document of a deleted entry is no longer served; MHD ITI-68
            # answers 404 Not Found for a document that is not available.
            return outcome(404, "not-found", f"Binary/{binary['id']} is not available: its document was deleted")
        ranges = media_ranges(request.headers.get("accept", ""))
        if request.query_params.get("_format"):
            return answer(binary, preferred_format(request) or "json", headers=headers)
        for fmt, media in (("json", FHIR_JSON), ("xml", FHIR_XML)):
            if any(m == media and q > 0 for m, q in ranges):
                return answer(binary, fmt, headers=headers)
        content_type = binary["contentType"].split(";")[0].strip().lower()
        if ranges and quality(ranges, content_type) <= 0:
            # MHD ITI-68: the only media type assured is the DocumentReference's contentType; no conversion here.
            return outcome(406, "not-supported", f"the document is {content_type} only", headers=headers)
        return Response(base64.b64decode(binary["data"]), media_type=binary["contentType"], headers=headers)

    @transient_failures
    async def search_get(self, request: Request) -> Response:
        return await self.search(request, list(request.query_params.multi_items()), request.path_params["type"])

    @transient_failures
    async def search_post(self, request: Request) -> Response:
        form = await form_pairs(request)
        if isinstance(form, Response):
            return form
        return await self.search(request, [*request.query_params.multi_items(), *form], request.path_params["type"])

    async def search(self, request: Request, pairs: list[tuple[str, str]], rtype: str) -> Response:
        fmt = preferred_format(request, next((v for k, v in pairs if k == "_format"), ""))
        if fmt is None:
            return outcome(406, "not-supported", "_format: json or xml", "_format")
        if rtype not in SEARCH_PARAMS or not SEARCH_PARAMS[rtype]:
            return outcome(404, "not-supported", f"search of {_shown(rtype)} is not served here", fmt=fmt)
        base = self.base_of(request)
        try:
            search = parse_search(rtype, pairs, base, strict=strict_handling(request))
            total, found = await asyncio.to_thread(self.store.search, rtype, search.params, search.count, search.offset)
        except SearchError as exc:
            return outcome(400, exc.code, str(exc), exc.param, fmt=fmt)
        patients = await asyncio.to_thread(patients_in, self.store, found) if found else ()
        self.record(
            audit.queried(
                requestor=self.requestor(request),
                query=page_url("", search, search.offset).lstrip("/")[: audit.MAX_DETAIL],
                patients=patients,
                transaction="ITI-67" if rtype == "DocumentReference" else "",
            )
        )
        return answer(searchset(base, search, total, found), fmt)


def patients_in(store: FHIRStore, resources: list[dict[str, Any]]) -> tuple[audit.PatientRef, ...]:
    """The patients of resources, for the audit trail: a Patient's identifiers, else those of the Patient a
    resource's ``subject`` names (read from the store, each once; its reference when it cannot be read)."""
    pairs: list[tuple[str, str]] = []
    references: dict[str, None] = {}
    for resource in resources:
        if resource.get("resourceType") == "Patient":
            pairs += _identifiers(resource)
            continue
        reference = str((resource.get("subject") or {}).get("reference") or "")
        if reference.startswith("Patient/"):
            references.setdefault(reference)
    for reference in list(references)[: audit.MAX_REFS]:
        try:
            patient = store.get("Patient", reference.removeprefix("Patient/"))
        except Exception:  # the store out of reach now: the answer was made; the trail names the reference
            patient = None
        pairs += _identifiers(patient) if patient else [(reference, "")]
    return audit.patient_refs(pairs)


def retrieved(store: FHIRStore, binary_id: str) -> tuple[tuple[audit.PatientRef, ...], tuple[audit.ObjectRef, ...]]:
    """What an ITI-68 retrieve of ``Binary/<binary_id>`` names: the patient of the DocumentReference that points at
    it and the document's unique id (`FHIRStore.document_of_binary`), with the Binary. When they cannot be read (no
    such DocumentReference, the store out of reach now), the Binary alone: the document was served already."""
    objects = [audit.object_ref("resource", f"Binary/{binary_id}")]
    try:
        reference = store.document_of_binary(binary_id)
        if reference is None:
            return (), tuple(objects)
        unique_id = document_unique_id(reference)
        if unique_id:
            objects.append(audit.object_ref("document", unique_id))
        return patients_in(store, [reference]), tuple(objects)
    except Exception:
        return (), tuple(objects)


def document_unique_id(reference: dict[str, Any]) -> str:
    """The XDS uniqueId of a DocumentReference's ``masterIdentifier``: ``urn:oid:`` taken off an OID (RFC 3986
    system), ``root^extension`` for an identifier under an OID system, the value otherwise."""
    master = reference.get("masterIdentifier")
    if not isinstance(master, dict):
        return ""
    system, value = str(master.get("system") or ""), str(master.get("value") or "")
    if system.startswith("urn:oid:") and value:
        return f"{system.removeprefix('urn:oid:')}^{value}"
    return value.removeprefix("urn:oid:")


def _identifiers(patient: dict[str, Any]) -> list[tuple[str, str]]:
    """(value, assigning authority) of a Patient's identifiers: the system, an OID without its ``urn:oid:``."""
    out = []
    for ident in patient.get("identifier") or []:
        if isinstance(ident, dict):
            out.append((str(ident.get("value") or ""), str(ident.get("system") or "").removeprefix("urn:oid:")))
    return out


def record_retrieve(runtime: Any, unique_id: str, binary_id: str) -> None:
    """An ITI-68 retrieve of the document ``unique_id`` (found by `retrieved`) in the delivery log (channel ``mhd``,
    keyed by that id, no correlation id): the console counts them per document. Hands the row to the process's
    recorder (written off the loop); never raises."""
    from traboule.channel import delivery_recorder
    from traboule.stores.delivery_log import DeliveryRecord

    try:
        recorder = delivery_recorder(runtime) if unique_id else None
        if recorder is not None:
            recorder.add(DeliveryRecord(unique_id, "", "mhd", "applied", f"retrieved Binary/{binary_id}"))
    except Exception as exc:  # a log for people: the document was served already
        structlog.get_logger("traboule.fhir").warning("delivery_log.record_failed", error=type(exc).__name__)


def routes(store: FHIRStore, base_url: str = "", runtime: Any = None) -> list[Route]:
    """The ``/fhir`` routes. ``base_url``: the public base (behind a proxy); default: from the request. ``runtime``:
    whose audit trail records the reads and searches (none: nothing recorded)."""
    api = FHIRApi(store, base_url, runtime)
    return [
        Route("/fhir/metadata", api.metadata, methods=["GET"]),
        Route("/fhir/{type}/_search", api.search_post, methods=["POST"]),
        Route("/fhir/{type}/{id}", api.read, methods=["GET"]),
        Route("/fhir/{type}", api.search_get, methods=["GET"]),
        Route("/fhir", Elsewhere()),  # last: every method of every path the routes above do not serve
        Route("/fhir/{rest:path}", Elsewhere()),
    ]


class Elsewhere:
    """Any other path or method under /fhir: an OperationOutcome, not Starlette's plain-text 404 / 405 (a FHIR
    client parses nothing else). An ASGI class, not a function: Starlette would route only GET to a function."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("method") in ("GET", "HEAD"):
            response = outcome(404, "not-found", "no FHIR interaction at this path (see /fhir/metadata)")
        else:
            allow = "POST" if str(scope.get("path", "")).endswith("/_search") else "GET, HEAD"
            response = outcome(405, "not-supported", "this FHIR API is read-only", headers={"Allow": allow})
        await response(scope, receive, send)
