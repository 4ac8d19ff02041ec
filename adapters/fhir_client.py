"""FHIR R4 REST client (transaction Bundles, read, search) over httpx. Protocol I/O only; no mapping here.

Idempotent delivery relies on conditional interactions keyed on business identifiers, so that a redelivered
transaction never duplicates a resource:

* :func:`conditional_create` gives ``POST Type`` with ``ifNoneExist: identifier=system|value``;
* :func:`conditional_update` gives ``PUT Type?identifier=system|value`` (update the match, or create when none).

Errors raise :class:`FHIRServerError`: ``retryable`` for 5xx, 429, timeouts and connection errors (retry with
backoff); not retryable for other 4xx (dead-letter), with the server's ``OperationOutcome`` kept on the exception.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import quote

import httpx

from traboule.errors import FHIRServerError
from traboule.tls import TLSSettings, http_client_options

FHIR_JSON = "application/fhir+json"

Resource = dict[str, Any]

_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}", re.ASCII)
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}", re.ASCII)  # the FHIR id datatype (R4 datatypes.html#id)


def identifier_search(system: str, value: str) -> str:
    """``identifier=system|value`` (token search); ``|`` and ``,``/``$`` in the parts are escaped per FHIR."""

    def esc(part: str) -> str:
        # FHIR's own escapes first, then percent-encoding: "+", "&", "#", spaces would otherwise change the value
        # the server searches for (and a conditional update would create a duplicate).
        fhir = part.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,").replace("$", "\\$")
        return quote(fhir, safe="\\:/.-_~")

    return f"identifier={esc(system)}|{esc(value)}" if system else f"identifier={esc(value)}"


def new_full_url() -> str:
    """A fresh ``urn:uuid:`` fullUrl, to reference an entry from other entries of the same Bundle."""
    return f"urn:uuid:{uuid.uuid4()}"


def conditional_create(resource: Resource, identifier_query: str, *, full_url: str | None = None) -> dict[str, Any]:
    """A transaction entry creating ``resource`` unless a resource matches ``identifier_query`` (``ifNoneExist``).

    ``identifier_query`` is a search query without the type, e.g. ``identifier=urn:oid:1.2.3|42``.
    """
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], "ifNoneExist": identifier_query},
    }
    if full_url:
        entry = {"fullUrl": full_url, **entry}
    return entry


def conditional_update(resource: Resource, search_url: str, *, full_url: str | None = None) -> dict[str, Any]:
    """A transaction entry ``PUT Type?query``: updates the single match, creates when none matches.

    ``search_url`` is either a full conditional URL (``ServiceRequest?identifier=sys|val``) or just the query
    (``identifier=sys|val``), to which the resource type is prefixed. The resource must carry no ``id``.
    """
    url = search_url if "?" in search_url else f"{resource['resourceType']}?{search_url}"
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "PUT", "url": url}}
    if full_url:
        entry = {"fullUrl": full_url, **entry}
    return entry


def transaction_bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _outcome(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return body
    return None


def outcome_text(outcome: dict[str, Any] | None) -> str:
    """A one-line summary of an OperationOutcome's issues (for logs and journals)."""
    if not outcome:
        return ""
    parts = []
    for issue in outcome.get("issue", []):
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code", "")
        where = ",".join(issue.get("expression", []) or issue.get("location", []))
        parts.append(f"{issue.get('severity', '?')}: {text}" + (f" ({where})" if where else ""))
    return "; ".join(parts)


class FHIRClient:
    """Async FHIR R4 REST client against ``base_url`` (e.g. ``https://fhir.example.org/fhir/R4``)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        tls: TLSSettings | None = None,
    ) -> None:
        """``tls``: the destination's TLS settings (`traboule.tls.http_client_options`: the engine's TLS profile, the
        CAs trusted, the client certificate for mutual TLS, the ``server_name`` sent and checked); without it,
        ``ca_file`` (the CA bundle to trust, system CAs otherwise) and ``cert_file`` (+ ``key_file``, the client
        certificate) make them."""
        self.base_url = base_url.rstrip("/")
        all_headers = {"Accept": FHIR_JSON, **(headers or {})}
        tls = tls or TLSSettings(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._client = httpx.AsyncClient(timeout=timeout, headers=all_headers, auth=auth, **http_client_options(tls))

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FHIRClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        url = f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url
        headers = {"Content-Type": FHIR_JSON} if json is not None else None
        try:
            response = await self._client.request(method, url, json=json, params=params, headers=headers)
        except httpx.TimeoutException as exc:
            raise FHIRServerError(f"{method} {url}: timeout ({type(exc).__name__})", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise FHIRServerError(f"{method} {url}: {type(exc).__name__}: {exc}", retryable=True) from exc
        status = response.status_code
        if status >= 400:
            outcome = _outcome(response)
            detail = outcome_text(outcome) or response.text[:200]
            raise FHIRServerError(
                f"{method} {url}: HTTP {status}: {detail}",
                status=status,
                operation_outcome=outcome,
                retryable=status >= 500 or status == 429,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise FHIRServerError(
                f"{method} {url}: HTTP {status} with a body that is not JSON", status=status, retryable=False
            ) from exc
        if not isinstance(body, dict):
            raise FHIRServerError(
                f"{method} {url}: expected a JSON object, got {type(body).__name__}", status=status, retryable=False
            )
        return body

    async def transaction(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """POST a transaction Bundle of ``entries`` to the base URL; returns the transaction-response Bundle."""
        return await self._request("POST", "", json=transaction_bundle(entries))

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET ``Type/id``. Both must be what FHIR allows there (``ValueError`` otherwise): a value such as
        ``x/../../metadata`` or ``x?_format=xml`` would read something else."""
        if _ID.fullmatch(resource_id) is None or not resource_id.strip("."):  # "..": a dot segment, not an id
            raise ValueError("not a FHIR resource id ([A-Za-z0-9-.], 1 to 64 characters)")
        return await self._request("GET", f"{_type(resource_type)}/{resource_id}")

    async def history(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET ``Type/id/_history``: the history Bundle of one resource."""
        if _ID.fullmatch(resource_id) is None or not resource_id.strip("."):
            raise ValueError("not a FHIR resource id ([A-Za-z0-9-.], 1 to 64 characters)")
        return await self._request("GET", f"{_type(resource_type)}/{resource_id}/_history")

    async def search(self, resource_type: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET ``Type?params``; returns the searchset Bundle (values may be lists for repeated parameters).
        The parameters are percent-encoded by httpx."""
        return await self._request("GET", _type(resource_type), params=params or {})


def _type(resource_type: str) -> str:
    if _TYPE.fullmatch(resource_type) is None:
        raise ValueError("not a FHIR resource type name")
    return resource_type
