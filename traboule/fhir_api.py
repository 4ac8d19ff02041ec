"""traboule's own FHIR R4 API (read-only, JSON) under ``/fhir``, served from a `FHIRStore`.

* ``GET /fhir/metadata``: CapabilityStatement (what is really supported: types, read, search-type, parameters).
* ``GET /fhir/{type}/{id}``: read (404 OperationOutcome when missing; ETag ``W/"version"``).
* ``GET /fhir/{type}?...``: searchset Bundle with ``total``, paged by ``_count`` (default 20, at most 100) and
  ``_offset``, with ``self`` / ``next`` / ``previous`` links. Unsupported or malformed parameters (a number, a date
  out of range, more than 100 values in one search): 400 OperationOutcome naming them; unsupported type: 404.
* Anything else under ``/fhir``: 404 OperationOutcome, 405 for another method than GET (read-only API).
"""

from __future__ import annotations

import asyncio
import base64
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from traboule.fhir_store import MAX_OFFSET, SEARCH_PARAMS, FHIRStore, SearchError

FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT = 20
MAX_COUNT = 100
IGNORED = {"_format", "_pretty"}  # accepted, no effect (always JSON)
# ASCII digits only: int() also takes "1_000", " 7", "+3" and other scripts' digits, which no FHIR client sends.
_NUMBER = re.compile(r"[0-9]{1,10}", re.ASCII)
# What a Host header may hold (RFC 9110 7.2: host [":" port]); links are built from it, so anything else (a path,
# a quote, a space) would be served back inside the Bundles: the server's own address is used instead.
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?", re.ASCII)
PARAM_DOCS = {
    "identifier": "system|value, value, |value or system|",
    "status": "ServiceRequest status (active, revoked, completed ...)",
    "subject": "Patient/{id}",
    "patient": "Patient/{id}",
    "patient.identifier": "the subject Patient's identifier (chained): system|value",
    "basedon": "ServiceRequest/{id}",
    "type": "system|code (DocumentReference: http://loinc.org|18748-4)",
    "category": "system|code (DocumentReference class code)",
    "date": "[eq|ge|le|gt|lt]YYYY-MM-DD[Thh:mm:ss+zz:zz] (DocumentReference date)",
    "related": "system|value of a related identifier (accession number, urn:dicom:uid study UID)",
    "code": "system|code (DiagnosticReport code)",
    "_tag": "system|code of meta.tag: urn:traboule:tags|unscheduled (steps performed without an order)",
}


class FHIRResponse(JSONResponse):
    media_type = FHIR_JSON


def outcome(
    status: int, code: str, text: str, expression: str = "", headers: dict[str, str] | None = None
) -> FHIRResponse:
    issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": text}
    if expression:
        issue["expression"] = [expression]
    return FHIRResponse({"resourceType": "OperationOutcome", "issue": [issue]}, status_code=status, headers=headers)


def capability_statement(base: str) -> dict[str, Any]:
    resources = []
    for rtype, params in SEARCH_PARAMS.items():
        search = [{"name": "_id", "type": "token"}] + [
            {"name": name, "type": kind, "documentation": PARAM_DOCS.get(name, "")} for name, kind in params.items()
        ]
        resources.append(
            {
                "type": rtype,
                "interaction": [{"code": "read"}, {"code": "search-type"}],
                "versioning": "versioned",
                "readHistory": False,
                "searchParam": search,
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).date().isoformat(),
        "kind": "instance",
        "software": {"name": "traboule"},
        "implementation": {"description": "traboule FHIR API (read-only)", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "rest": [{"mode": "server", "resource": resources}],
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


def routes(store: FHIRStore, base_url: str = "") -> list[Route]:
    """The ``/fhir`` routes. ``base_url``: the public base (behind a proxy); default: from the request."""

    def base_of(request: Request) -> str:
        if base_url:
            return base_url.rstrip("/")
        host = request.headers.get("host", "")
        if _HOST.fullmatch(host) is None:
            server_host, port = request.scope.get("server") or ("127.0.0.1", 80)
            host = f"[{server_host}]:{port}" if ":" in server_host else f"{server_host}:{port}"
        return f"{request.scope.get('scheme', 'http')}://{host}{request.scope.get('root_path', '')}/fhir"

    async def metadata(request: Request) -> FHIRResponse:
        return FHIRResponse(capability_statement(base_of(request)))

    async def read(request: Request) -> FHIRResponse:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        if rtype not in SEARCH_PARAMS:
            return outcome(404, "not-supported", f"resource type {rtype!r} is not served here")
        resource = await asyncio.to_thread(store.get, rtype, rid)
        if resource is None:
            return outcome(404, "not-found", f"{rtype}/{rid} is not known")
        headers = {"ETag": f'W/"{resource.get("meta", {}).get("versionId", "1")}"'}
        if rtype == "Binary" and "fhir+json" not in request.headers.get("accept", ""):
            # MHD ITI-68: the document itself, byte for byte, with its own media type.
            return Response(base64.b64decode(resource["data"]), media_type=resource["contentType"], headers=headers)
        return FHIRResponse(absolute_urls(resource, base_of(request)), headers=headers)

    async def search(request: Request) -> FHIRResponse:
        rtype = request.path_params["type"]
        if rtype not in SEARCH_PARAMS or not SEARCH_PARAMS[rtype]:
            return outcome(404, "not-supported", f"search of {rtype!r} is not served here")
        params: dict[str, str | list[str]] = {}
        count, offset = DEFAULT_COUNT, 0
        for name, value in request.query_params.multi_items():
            if name in IGNORED:
                continue
            if name in ("_count", "_offset"):
                if _NUMBER.fullmatch(value) is None or int(value) > MAX_OFFSET:
                    return outcome(400, "invalid", f"{name} must be an integer from 0 to {MAX_OFFSET}", name)
                number = int(value)
                if name == "_count":
                    count = min(number, MAX_COUNT)
                else:
                    offset = number
                continue
            if name != "_id" and name not in SEARCH_PARAMS[rtype]:
                return outcome(400, "not-supported", f"search parameter {name!r} is not supported for {rtype}", name)
            if name in params:  # repeated: every occurrence must match (a date range: date=ge...&date=le...)
                previous = params[name]
                params[name] = [*([previous] if isinstance(previous, str) else previous), value]
            else:
                params[name] = value
        try:
            total, found = await asyncio.to_thread(store.search, rtype, params, count, offset)
        except SearchError as exc:
            return outcome(400, exc.code, str(exc), exc.param)
        base = base_of(request)

        def page(at: int) -> str:
            pairs = [(k, x) for k, v in params.items() for x in ([v] if isinstance(v, str) else v)]
            query = [*pairs, ("_count", str(count)), ("_offset", str(at))]
            return f"{base}/{rtype}?{urlencode(query)}"

        links = [{"relation": "self", "url": page(offset)}]
        if count and offset + count < total:
            links.append({"relation": "next", "url": page(offset + count)})
        if offset > 0:
            links.append({"relation": "previous", "url": page(max(0, offset - count))})
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": links,
            "entry": [
                {
                    "fullUrl": f"{base}/{rtype}/{r['id']}",
                    "resource": absolute_urls(r, base),
                    "search": {"mode": "match"},
                }
                for r in found
            ],
        }
        if not bundle["entry"]:
            del bundle["entry"]
        return FHIRResponse(bundle)

    return [
        Route("/fhir/metadata", metadata, methods=["GET"]),
        Route("/fhir/{type}/{id}", read, methods=["GET"]),
        Route("/fhir/{type}", search, methods=["GET"]),
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
            response = outcome(405, "not-supported", "this FHIR API is read-only", headers={"Allow": "GET, HEAD"})
        await response(scope, receive, send)
