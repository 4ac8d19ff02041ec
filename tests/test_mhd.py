"""The pull API for sharing gateways (IHE MHD ITI-67 / ITI-68, French PDSm): reports published by the engine are
found as DocumentReference, their bytes retrieved identical, replacements supersede, deletions are entered-in-error;
one DiagnosticReport per report; deletions as PDSm has them (superseded and PDSm_IsDeleted, found no more, their
bytes no longer served). Everything served parses with the fhir.resources R4B models. The whole ITI-67 parameter
table, XML and POST search: tests/test_mhd_gateway.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference

from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_reports import study
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.model import Envelope
from traboule.stores.fhir_store import FHIRStore
from traboule.translate.fhir_mapping import is_deleted

INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"
LOINC_CR = "http://loinc.org|18748-4"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}  # validation is covered by test_reports
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=10) as client:
            yield runtime, client
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def search(client: httpx.AsyncClient, rtype: str, **params: str) -> list[dict[str, Any]]:
    response = await client.get(f"/{rtype}", params=params)
    assert response.status_code == 200, response.text
    bundle = response.json()
    Bundle.model_validate(bundle)
    return [e["resource"] for e in bundle.get("entry", [])]


async def test_reports_are_found_retrieved_superseded_and_withdrawn(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = api
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    assert [ack_code(a) for a in await send(runtime, fixture("orm_o01_nw_latin1.hl7"))] == ["AA"]
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    await until(lambda: store.count("ImagingStudy") == 1 and store.count("ServiceRequest") == 1)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(_report()) is not None)

    assert ack_code((await send(runtime, fixture("oru_r01_report.hl7")))[0]) == "AA"
    await until(lambda: store.count("DocumentReference") == 1)
    query = {"patient.identifier": INS, "status": "current", "type": LOINC_CR, "date": "ge2026-11-25"}
    (first,) = await search(client, "DocumentReference", **query)
    DocumentReference.model_validate(first)
    assert await search(client, "DocumentReference", **{**query, "date": "lt2026-11-25"}) == []
    assert len(await search(client, "DocumentReference", related="ACC0001")) == 1
    attachment = first["content"][0]["attachment"]
    assert attachment["url"].startswith(str(client.base_url)) and attachment["contentType"] == "text/xml"
    assert first["content"][0]["format"]["code"] == "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013"
    assert {c["code"] for label in first["securityLabel"] for c in label["coding"]} == {"N"}
    related = first["context"]["related"]
    study_type = {"coding": [{"system": "urn:ietf:rfc:3986", "code": "urn:ihe:iti:xds:2016:studyInstanceUID"}]}
    assert {"identifier": {"type": study_type, "value": "1.2.250.1.999.1.2.20261125.1"}} in related
    assert any(r.get("reference", "").startswith("ServiceRequest/") for r in related)
    contained = {f"#{c['id']}": c for c in first["contained"]}
    role = contained[first["author"][0]["reference"]]
    practitioner = contained[role["practitioner"]["reference"]]
    assert {"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "801234567890"} in practitioner["identifier"]
    assert {"system": "http://rpps.fr", "value": "01234567890"} in practitioner["identifier"]
    for by_study in ("urn:dicom:uid|urn:oid:1.2.250.1.999.1.2.20261125.1", "1.2.250.1.999.1.2.20261125.1"):
        assert [r["id"] for r in await search(client, "DocumentReference", related=by_study)] == [first["id"]]

    retrieved = await client.get(attachment["url"])  # ITI-68: the bytes, as published
    assert retrieved.status_code == 200 and retrieved.headers["content-type"].startswith("text/xml")
    assert len(retrieved.content) == attachment["size"]
    assert base64.b64encode(hashlib.sha1(retrieved.content).digest()).decode() == attachment["hash"]
    assert retrieved.content.startswith(b"<?xml") and b"Contr\xc3\xb4le dans 12 mois." in retrieved.content

    (report,) = await search(client, "DiagnosticReport", **{"patient.identifier": INS})
    DiagnosticReport.model_validate(report)
    assert report["status"] == "final" and report["conclusion"].startswith("Nodule pulmonaire stable")
    assert report["imagingStudy"][0]["reference"].startswith("ImagingStudy/")
    assert report["basedOn"][0]["reference"].startswith("ServiceRequest/")

    assert ack_code((await send(runtime, fixture("oru_r01_report_corrected.hl7")))[0]) == "AA"
    await until(lambda: store.count("DocumentReference") == 2)
    await asyncio.sleep(0.1)
    (current,) = await search(client, "DocumentReference", **query)
    assert current["id"] != first["id"]
    assert current["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{first['id']}"}}]
    (old,) = await search(client, "DocumentReference", **{**query, "status": "superseded"})
    assert old["id"] == first["id"]
    (amended,) = await search(client, "DiagnosticReport", **{"patient.identifier": INS})
    assert amended["status"] == "amended" and "6 mois" in amended["conclusion"]

    assert ack_code((await send(runtime, fixture("oru_r01_report_deleted.hl7")))[0]) == "AA"
    # PDSm (suppression logique): status superseded and PDSm_IsDeleted true, the versions it replaced too; found by
    # no search, read 410 Gone, and its document no longer served (404, MHD ITI-68: not available).
    await until(lambda: is_deleted(store.get("DocumentReference", current["id"]) or {}))
    await until(lambda: is_deleted(store.get("DocumentReference", first["id"]) or {}))
    assert store.get("DocumentReference", current["id"])["status"] == "superseded"  # type: ignore[index]
    for status in ("current", "superseded", "entered-in-error"):
        assert await search(client, "DocumentReference", **{**query, "status": status}) == []
    assert (await client.get(f"/DocumentReference/{current['id']}")).status_code == 410
    gone = await client.get(current["content"][0]["attachment"]["url"])
    assert gone.status_code == 404 and gone.json()["issue"][0]["code"] == "not-found"
    # the report of the deleted set: entered-in-error, without the withdrawn text or a link to its bytes; found by
    # no search, read 410 Gone, as the DocumentReference
    await until(lambda: (store.get("DiagnosticReport", amended["id"]) or {}).get("status") == "entered-in-error")
    assert await search(client, "DiagnosticReport", **{"patient.identifier": INS}) == []
    assert await search(client, "DiagnosticReport", status="entered-in-error") == []
    withdrawn = store.get("DiagnosticReport", amended["id"]) or {}
    assert withdrawn["status"] == "entered-in-error"
    assert "conclusion" not in withdrawn and "presentedForm" not in withdrawn
    DiagnosticReport.model_validate(withdrawn)
    gone_report = await client.get(f"/DiagnosticReport/{amended['id']}")
    assert gone_report.status_code == 410 and gone_report.json()["issue"][0]["code"] == "deleted"


async def test_masked_report_carries_its_security_labels(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    runtime, client = api
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    text = fixture("oru_r01_pdf.hl7").decode()
    text += "\rOBX|2|CWE|MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||Y^^expandedYes-NoIndicator||||||F"
    text += "\rOBX|3|CWE|INVISIBLE_PATIENT^Non visible par le patient^MetaDMPMSS||Y^^expandedYes-NoIndicator||||||F"
    assert ack_code((await send(runtime, text.encode()))[0]) == "AA"
    await until(lambda: store.count("DocumentReference") == 1)
    (reference,) = await search(client, "DocumentReference", **{"patient.identifier": INS})
    codes = {c["code"] for label in reference["securityLabel"] for c in label["coding"]}
    assert codes == {"N", "MASQUE_PS", "INVISIBLE_PATIENT"}
    assert reference["content"][0]["format"]["code"] == "urn:ihe:iti:xds-sd:pdf:2008"


def _report() -> Any:
    from tests.test_reports import report_of

    return report_of(fixture("oru_r01_report.hl7"))


async def test_retrieving_an_unknown_or_malformed_document_is_a_404_outcome(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = api
    for rid in ("nope", "..%2F..%2Fhealth", "%00", "%FF%FE", "x" * 2000, "Patient%2F1"):
        for accept in ("*/*", "application/fhir+json"):
            response = await client.get(f"/Binary/{rid}", headers={"Accept": accept})
            assert response.status_code == 404, (rid, response.text)
            assert response.json()["issue"][0]["code"] == "not-found"
    # a read-only API: a write is refused as FHIR clients understand it (not Starlette's plain text)
    refused = await client.put("/Binary/nope", content=b"%PDF")
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert refused.json()["issue"][0]["code"] == "not-supported"
