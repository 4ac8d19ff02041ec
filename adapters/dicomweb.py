"""DICOMweb client (QIDO-RS / WADO-RS metadata) over httpx. Protocol I/O only.

Works with any DICOMweb archive (Orthanc's plugin, dcm4chee-arc, a VNA): a base URL and optional auth.
Attributes come back as the DICOM JSON model (PS3.18 F.2): ``{"0020000D": {"vr": "UI", "Value": ["1.2..."]}}``.
"""

from __future__ import annotations

from typing import Any

import httpx

from traboule.errors import DICOMwebError
from traboule.model import is_uid
from traboule.tls import TLSSettings, http_client_options

DicomJSON = dict[str, dict[str, Any]]


class DICOMwebClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 30.0,
        auth: tuple[str, str] | None = None,
        token: str = "",
        tls: TLSSettings | None = None,
    ) -> None:
        """``tls``: the archive's TLS settings for an https base URL (`traboule.tls.http_client_options`: the
        engine's TLS profile, the CAs trusted, a client certificate, the ``server_name`` sent and checked); the
        system's CAs without it."""
        self.base_url = base_url.rstrip("/")
        headers = {"Accept": "application/dicom+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        options = http_client_options(tls or TLSSettings())
        self._client = httpx.AsyncClient(timeout=timeout, auth=auth, headers=headers, **options)

    async def close(self) -> None:
        await self._client.aclose()

    async def _get(self, path: str, params: dict[str, str] | None = None) -> list[DicomJSON]:
        url = f"{self.base_url}/{path.lstrip('/')}"
        try:
            response = await self._client.get(url, params=params)
        except httpx.HTTPError as exc:
            raise DICOMwebError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 204:
            return []
        if response.status_code >= 400:
            raise DICOMwebError(
                f"GET {url}: HTTP {response.status_code}",
                status=response.status_code,
                retryable=response.status_code >= 500 or response.status_code == 429,
            )
        body = response.json()
        if not isinstance(body, list):
            raise DICOMwebError(f"GET {url}: expected a JSON array, got {type(body).__name__}", retryable=False)
        return body

    async def search_studies(self, **match: str) -> list[DicomJSON]:
        """QIDO-RS ``GET /studies?key=value``."""
        return await self._get("studies", dict(match))

    async def study_metadata(self, study_uid: str) -> list[DicomJSON]:
        """WADO-RS ``GET /studies/{uid}/metadata``: one object per instance, with its study and series attributes."""
        return await self._get(f"studies/{_segment(study_uid)}/metadata")

    def retrieve_url(self, study_uid: str) -> str:
        return f"{self.base_url}/studies/{_segment(study_uid)}"


def _segment(uid: str) -> str:
    """The UID as a path segment; refused (not retryable) when it is not a UID. The channel validates at its
    boundary already; this guards every other caller (a journal entry replayed from before that check)."""
    if not is_uid(uid):
        raise DICOMwebError("study UID is not a DICOM UID (PS3.5 9.1)", retryable=False)
    return uid


def value(obj: DicomJSON, tag: str) -> Any:
    """First value of an attribute in the DICOM JSON model, or None. PN values are returned as their
    Alphabetic group string."""
    element = obj.get(tag)
    if not element:
        return None
    values = element.get("Value")
    if not values:
        return None
    first = values[0]
    if isinstance(first, dict) and element.get("vr") == "PN":
        return first.get("Alphabetic", "")
    return first
