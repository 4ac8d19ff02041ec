"""The fhir channel's FHIR server destination against a real FHIR R4 server (medplum's in-memory router,
tests/fhir_server): HL7 orders, merges, MPPS and archived studies end up on the server once each, survive a server
outage, and a refusal is dead-lettered with the server's OperationOutcome in the journal."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.peer_dcmtk import free_port, require_dcmtk
from tests.peer_fhir_server import require_fhir_server, start_fhir_server, stop_fhir_server
from tests.test_archive import write_study
from tests.test_fhir import ACCESSION, INS_TEST, r4
from tests.test_flow import engine_config, fixture, send, until
from traboule.adapters.fhir_client import FHIRClient
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.model import Envelope, Identifier, Patient, PerformedStep
from traboule.stores.fhir_store import FHIRStore

pytestmark = pytest.mark.timeout(120)

IPP = "urn:oid:1.2.250.1.999.1.1"
IDS = ("IPP0001", "IPP0009", "PLC0001", "FIL0001", "ACC0001", "RP0001", "SPS0001", "1.2.250.1.999.1.2.20261125.1")


def message(name: str, tag: str, *, ins: bool = True) -> bytes:
    """A fixture message with its identifiers made unique to the test (the FHIR server lives for the session);
    ``ins=False``: without the INS (one INS is one patient: several tagged patients cannot share it)."""
    text = fixture(name).decode("latin-1")
    if not ins:
        text = text.replace("~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS", "")
    for ident in IDS:
        text = text.replace(ident, f"{ident}.{tag}" if ident[0].isdigit() else f"{ident}-{tag}")
    return text.encode("latin-1")


def new_tag() -> str:
    return str(uuid.uuid4().int % 10**8)


async def start_engine(tmp_path: Path, destination: dict[str, Any], **channel: Any) -> Runtime:
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "destination": destination, **channel})
    runtime = Runtime(cfg)
    await runtime.start()
    return runtime


def fhir_store(runtime: Runtime) -> FHIRStore:
    return runtime.channel("fhir").store  # type: ignore[attr-defined]


@pytest.fixture
async def fhir(fhir_server_url: str) -> AsyncIterator[FHIRClient]:
    async with FHIRClient(fhir_server_url, timeout=10) as client:
        yield client


async def found(fhir: FHIRClient, rtype: str, identifier: str, *, until_: Any = None, timeout: float = 20) -> list:
    """The resources matching ``identifier`` on the server, polled until ``until_(resources)`` holds."""
    check = until_ or (lambda rs: len(rs) >= 1)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        bundle = await fhir.search(rtype, {"identifier": identifier})
        resources = [e["resource"] for e in bundle.get("entry", [])]
        if check(resources):
            return resources
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{rtype}?identifier={identifier}: {resources}")
        await asyncio.sleep(0.05)


async def test_orders_cancel_and_merge_reach_the_server_once_each(
    tmp_path: Path, fhir_server_url: str, fhir: FHIRClient
) -> None:
    tag = new_tag()
    runtime = await start_engine(tmp_path, {"base_url": fhir_server_url, "max_bundle": 8})
    try:
        await send(runtime, message("orm_o01_nw_latin1.hl7", tag))
        (request,) = await found(fhir, "ServiceRequest", f"{ACCESSION}|ACC0001-{tag}")
        r4(request)
        assert request["status"] == "active"
        assert {i["value"] for i in request["identifier"]} == {f"PLC0001-{tag}", f"FIL0001-{tag}", f"ACC0001-{tag}"}
        patient = await fhir.read(*request["subject"]["reference"].split("/"))
        r4(patient)
        assert {(i.get("system"), i["value"]) for i in patient["identifier"]} == {
            (IPP, f"IPP0001-{tag}"),
            (INS_TEST, "279035121518989"),
        }

        await send(runtime, message("orm_o01_nw_latin1.hl7", tag))  # a resend: nothing new
        await send(runtime, message("orm_o01_ca.hl7", tag))
        (revoked,) = await found(
            fhir, "ServiceRequest", f"{ACCESSION}|ACC0001-{tag}", until_=lambda rs: rs[0]["status"] == "revoked"
        )
        assert revoked["id"] == request["id"]  # updated, not duplicated
        history = await fhir.history("ServiceRequest", request["id"])
        assert len(history["entry"]) == 2  # created, revoked: the resend changed nothing

        await send(runtime, message("adt_a40_merge.hl7", tag))
        (survivor,) = await found(fhir, "Patient", f"{IPP}|IPP0009-{tag}")
        (moved,) = await found(
            fhir,
            "ServiceRequest",
            f"{ACCESSION}|ACC0001-{tag}",
            until_=lambda rs: rs[0]["subject"]["reference"] == f"Patient/{survivor['id']}",
        )
        r4(moved)
        (merged,) = await found(fhir, "Patient", f"{IPP}|IPP0001-{tag}")
        assert merged["id"] == patient["id"] and merged["active"] is False
        assert merged["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
        await until(lambda: fhir_store(runtime).unpushed() == 0)
        assert await runtime.bus.dead_letters("fhir.push") == []

        # After a restore of the server, `traboule fhir resend` sends everything again; nothing is duplicated.
        config = tmp_path / "traboule.toml"
        config.write_text(
            f'[engine]\ndata_dir = "{tmp_path}"\n\n[[channels]]\nname = "fhir"\nkind = "fhir"\n'
            f'destination = {{base_url = "{fhir_server_url}"}}\n'
        )
        resend = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "fhir", "resend"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert resend.returncode == 0, resend.stderr
        assert "3 resource(s) queued" in resend.stdout  # the survivor, the merged Patient, the ServiceRequest
        await until(lambda: fhir_store(runtime).remote("Patient", survivor_local(runtime)) is not None, timeout=10)
        await until(lambda: fhir_store(runtime).unpushed() == 0)
        assert len(await found(fhir, "ServiceRequest", f"{ACCESSION}|ACC0001-{tag}")) == 1
    finally:
        await runtime.stop()


def survivor_local(runtime: Runtime) -> str:
    return next(p["id"] for p in fhir_store(runtime).search("Patient", {})[1] if p.get("active"))


async def test_server_down_then_back_gets_every_resource_once(
    tmp_path: Path, fhir: FHIRClient, fhir_server_url: str
) -> None:
    node = require_fhir_server()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir/R4"
    runtime = await start_engine(
        tmp_path, {"base_url": base_url, "max_bundle": 8, "retry_window": 0.5, "max_attempts": 1000, "timeout": 2}
    )
    server = None
    tags = [new_tag() for _ in range(3)]
    try:
        for tag in tags:
            await send(runtime, message("orm_o01_nw_latin1.hl7", tag, ins=False))
        await send(runtime, message("orm_o01_ca.hl7", tags[0], ins=False))
        store = fhir_store(runtime)
        await until(lambda: store.count("ServiceRequest") == 3 and "revoked" in _statuses(store))
        await asyncio.sleep(1.5)  # the destination is refused, retries, waits
        assert store.unpushed() == 6  # 3 Patients + 3 ServiceRequests
        assert await runtime.bus.dead_letters("fhir.push") == []

        server = await asyncio.to_thread(start_fhir_server, node, port, tmp_path / "fhir-server.log")
        async with FHIRClient(base_url, timeout=10) as late:
            for tag, status in zip(tags, ("revoked", "active", "active"), strict=True):
                await found(
                    late, "ServiceRequest", f"{ACCESSION}|ACC0001-{tag}", until_=lambda rs, s=status: _is(rs, s)
                )
                assert len(await found(late, "Patient", f"{IPP}|IPP0001-{tag}")) == 1
            await until(lambda: store.unpushed() == 0, timeout=20)
            await asyncio.sleep(0.5)
            total = await late.search("ServiceRequest", {"_summary": "count"})
            assert total["total"] == 3  # once each, although the revoked one changed while the server was down
            patients = await late.search("Patient", {"_summary": "count"})
            assert patients["total"] == 3
    finally:
        await runtime.stop()
        if server is not None:
            await asyncio.to_thread(stop_fhir_server, server)


def _is(resources: list[dict[str, Any]], status: str) -> bool:
    return len(resources) == 1 and resources[0]["status"] == status


def _statuses(store: FHIRStore) -> list[str]:
    return [r["status"] for r in store.search("ServiceRequest", {})[1]]


async def test_a_refused_bundle_is_dead_lettered_with_the_operation_outcome_journaled(
    tmp_path: Path, fhir_server_url: str, fhir: FHIRClient
) -> None:
    tag = new_tag()
    # Two Patients with the same IPP on the server: the conditional update cannot choose (HTTP 412, or 400 for
    # the whole transaction as this server answers).
    for _ in range(2):
        await fhir.transaction(
            [
                {
                    "resource": {"resourceType": "Patient", "identifier": [{"system": IPP, "value": f"IPP0001-{tag}"}]},
                    "request": {"method": "POST", "url": "Patient"},
                }
            ]
        )
    runtime = await start_engine(tmp_path, {"base_url": fhir_server_url, "max_bundle": 8})
    try:
        await send(runtime, message("orm_o01_nw_latin1.hl7", tag))
        deadline = asyncio.get_running_loop().time() + 20
        while not (dead := await runtime.bus.dead_letters("fhir.push")):
            assert asyncio.get_running_loop().time() < deadline, "not dead-lettered"
            await asyncio.sleep(0.05)
        (letter,) = dead
        assert letter.attempt == 1  # not retried: a 4xx is final
        assert "HTTP 4" in letter.headers["x-error"] and "multiple" in letter.headers["x-error"]
        assert runtime.journal is not None
        (entry,) = runtime.journal.recent(1, "undelivered")
        assert entry.channel == "fhir.push" and entry.ack_code.startswith("4") and entry.peer == fhir_server_url
        outcome = json.loads(entry.error.partition("\n")[2])
        assert outcome["resourceType"] == "OperationOutcome"
        r4(outcome)
        sent = json.loads(entry.raw)
        assert [e["request"]["method"] for e in sent["entry"]] == ["PUT", "PUT"]
        assert sent["entry"][0]["request"]["url"] == f"Patient?identifier={IPP}|IPP0001-{tag}"
        # the local store and API are not held up by the remote refusal
        assert fhir_store(runtime).count("ServiceRequest") == 1
    finally:
        await runtime.stop()


async def test_mpps_and_the_archived_study_become_one_imaging_study_on_the_server(
    tmp_path: Path, fhir_server_url: str, fhir: FHIRClient, orthanc: Any
) -> None:
    """Order → ServiceRequest; MPPS IN PROGRESS → ImagingStudy registered; storescu into Orthanc → the same
    ImagingStudy available with its series and instances, basedOn the ServiceRequest, on the server."""
    require_dcmtk("storescu")
    tag = new_tag()
    http_port = free_port()
    archive = orthanc(f"http://127.0.0.1:{http_port}/archive/stable")
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": archive.dicomweb})
    cfg.channels.append({"name": "fhir", "kind": "fhir", "destination": {"base_url": fhir_server_url}})
    runtime = Runtime(cfg)
    await runtime.start()
    http = await serve(create_app(runtime), "127.0.0.1", http_port)
    try:
        await send(runtime, message("orm_o01_nw_latin1.hl7", tag))
        (request,) = await found(fhir, "ServiceRequest", f"{ACCESSION}|ACC0001-{tag}")

        folder = tmp_path / "study"
        folder.mkdir()
        study_uid = write_study(folder, accession=f"ACC0001-{tag}", patient_id=f"IPP0001-{tag}")
        started = Envelope(
            PerformedStep(
                status="IN PROGRESS",
                study_instance_uid=study_uid,
                accession_number=f"ACC0001-{tag}",
                patient=Patient(ids=[Identifier(f"IPP0001-{tag}", "CHU-LYON", "1.2.250.1.999.1.1")]),
                modality="CT",
                started="20261125093512",
            ),
            idempotency_key=f"mpps-{tag}",
        )
        await runtime.bus.publish("procedure.in-progress", started.to_json(), message_id=started.id)
        (registered,) = await found(fhir, "ImagingStudy", f"urn:dicom:uid|urn:oid:{study_uid}")
        assert registered["status"] == "registered"
        assert registered["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]
        r4(registered)

        files = sorted(str(p) for p in folder.glob("*.dcm"))
        sent = await asyncio.to_thread(
            subprocess.run,
            ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(archive.dicom_port), *files],
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stderr
        (study,) = await found(
            fhir,
            "ImagingStudy",
            f"urn:dicom:uid|urn:oid:{study_uid}",
            until_=lambda rs: rs and rs[0]["status"] == "available",
            timeout=40,
        )
        r4(study)
        assert study["id"] == registered["id"]
        assert study["subject"] == request["subject"]
        assert study["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]
        assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 6
        assert sorted(len(s["instance"]) for s in study["series"]) == [3, 3]
        assert study["contained"][0]["address"] == f"{archive.dicomweb}/studies/{study_uid}"
    finally:
        http.should_exit = True
        await http.task
        await runtime.stop()


async def test_reports_reach_the_server_with_absolute_attachment_urls(
    tmp_path: Path, fhir_server_url: str, fhir: FHIRClient
) -> None:
    """A published report: DocumentReference and DiagnosticReport on the server, the attachment pointing at
    traboule's own Binary (the public base of its /fhir)."""
    from tests.test_reports import report_of, study

    tag = new_tag()
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    cfg.channels.append(
        {
            "name": "fhir",
            "kind": "fhir",
            "base_url": "https://traboule.example/fhir",
            "destination": {"base_url": fhir_server_url, "max_bundle": 8},
        }
    )
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        accession = f"ACC0001-{tag}"
        uid = f"1.2.250.1.999.1.2.20261125.1.{tag}"
        archived = study(accession, uid)
        archived.patient.ids[0].value = f"IPP0001-{tag}"  # the report's patient: a study of another is not taken
        env = Envelope(archived)
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        report = message("oru_r01_report.hl7", tag)
        await until(lambda: publisher.study_for(report_of(report)) is not None)
        await send(runtime, message("orm_o01_nw_latin1.hl7", tag), report)
        (request,) = await found(fhir, "ServiceRequest", f"{ACCESSION}|{accession}")
        store = fhir_store(runtime)
        await until(lambda: store.count("DocumentReference") == 1 and store.unpushed() <= 1)  # Binary stays local
        (local,) = store.search("DocumentReference", {})[1]
        master = local["masterIdentifier"]
        (remote,) = await found(fhir, "DocumentReference", f"{master['system']}|{master['value']}")
        r4(remote)
        url = remote["content"][0]["attachment"]["url"]
        assert url.startswith("https://traboule.example/fhir/Binary/")
        assert remote["subject"]["reference"].startswith("Patient/")
        bundle = await fhir.search("DiagnosticReport", {"based-on": f"ServiceRequest/{request['id']}"})
        (diagnostic,) = [e["resource"] for e in bundle.get("entry", [])]
        r4(diagnostic)
        assert diagnostic["presentedForm"][0]["url"] == url
        assert diagnostic["conclusion"].startswith("Nodule pulmonaire stable")
    finally:
        await runtime.stop()
