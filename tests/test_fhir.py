"""Canonical → FHIR R4 (mapping, store, channel, /fhir API). Everything emitted or served is parsed with the
fhir.resources R4B models (the package's top level is R5)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.servicerequest import ServiceRequest

from tests.conftest import ROOT
from tests.test_flow import engine_config, fixture, free_port, send, until
from traboule import model
from traboule.adapters.fhir_client import FHIRClient, FHIRServerError
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.formats import hl7
from traboule.stores.fhir_store import FHIRStore
from traboule.translate.fhir_mapping import FR_CORE_PATIENT, FHIRMapping
from traboule.translate.hl7_mapping import HL7InboundMapping
from traboule.translate.mapping import MappingError

INS_TEST = "urn:oid:1.2.250.1.213.1.4.10"
ACCESSION = "urn:oid:1.2.250.1.999.1.4"
PARSERS = {
    "Patient": Patient,
    "ServiceRequest": ServiceRequest,
    "Bundle": Bundle,
    "OperationOutcome": OperationOutcome,
    "CapabilityStatement": CapabilityStatement,
    "ImagingStudy": ImagingStudy,
    "DocumentReference": DocumentReference,
    "DiagnosticReport": DiagnosticReport,
}


def r4(resource: dict[str, Any]) -> Any:
    return PARSERS[resource["resourceType"]].model_validate(resource)


def order_of(name: str) -> model.ImagingOrder:
    msg = hl7.parse(hl7.decode(fixture(name)).text)
    (order,) = HL7InboundMapping().map(msg)
    assert isinstance(order, model.ImagingOrder)
    return order


@pytest.fixture(scope="module")
def mapping() -> FHIRMapping:
    return FHIRMapping()


def test_patient_with_ins(mapping: FHIRMapping) -> None:
    patient = mapping.patient(order_of("orm_o01_nw_latin1.hl7").patient)
    r4(patient)
    ipp, ins = patient["identifier"]
    assert (ipp["system"], ipp["value"], ipp["type"]["coding"][0]["code"]) == (
        "urn:oid:1.2.250.1.999.1.1",
        "IPP0001",
        "PI",
    )
    assert (ins["system"], ins["value"], ins["use"]) == (INS_TEST, "279035121518989", "official")
    assert ins["type"]["coding"][0]["code"] == "INS-NIR-TEST"
    assert patient["gender"] == "female" and patient["birthDate"] == "1979-03-28"
    official = next(n for n in patient["name"] if n["use"] == "official")
    assert official["family"] == "MARTIN" and official["given"] == ["Hélène", "Marie"]  # birth name (PID-5 type L)
    assert patient["meta"]["lastUpdated"]
    assert mapping.patient(order_of("orm_o01_ca.hl7").patient)["id"] == patient["id"]  # deterministic


def test_service_request_new_and_cancel(mapping: FHIRMapping) -> None:
    order = order_of("orm_o01_nw_latin1.hl7")
    request = mapping.service_request(order, "Patient/x")
    r4(request)
    assert request["status"] == "active" and request["intent"] == "order"
    types = {i["type"]["coding"][0]["code"]: (i["system"], i["value"]) for i in request["identifier"]}
    assert types == {
        "PLAC": ("urn:oid:1.2.250.1.999.1.3", "PLC0001"),  # issuer RIS listed under identifiers.placer.issuers
        "FILL": ("urn:oid:1.2.250.1.999.1.6", "FIL0001"),
        "ACSN": (ACCESSION, "ACC0001"),  # no issuer in OBR-18: the configured default
    }
    assert request["code"]["coding"][0] == {
        "system": "urn:oid:1.2.250.1.999.1.9",  # coding system L → the local system
        "code": "CTTAP",
        "display": "Scanner thoraco-abdomino-pelvien",
    }
    assert request["subject"] == {"reference": "Patient/x"}
    assert request["requester"]["display"] == "Paul RENARD"
    assert "identifier" not in request["requester"]  # 1234 is not an RPPS-like id
    assert request["occurrenceDateTime"] == "2026-11-25T09:30:00+01:00"  # Europe/Paris in November
    assert request["priority"] == "routine"

    cancel = mapping.service_request(order_of("orm_o01_ca.hl7"), "Patient/x")
    r4(cancel)
    assert cancel["status"] == "revoked" and cancel["id"] == request["id"]


def test_codes_requester_and_dates(mapping: FHIRMapping) -> None:
    order = order_of("omi_o23_nw_utf8.hl7")
    order.procedure = model.Code("24627-2", "CT Chest", "LN")
    order.priority = "STAT"
    order.requesting_physician = model.Practitioner("810001234567", model.PersonName("MARTIN", "Jean"))
    order.steps[0].status = "COMPLETED"
    request = mapping.service_request(order, "Patient/y")
    r4(request)
    assert request["code"]["coding"][0]["system"] == "http://loinc.org"
    assert request["priority"] == "stat" and request["status"] == "completed"
    assert request["requester"]["identifier"] == {"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "810001234567"}
    acsn = next(i for i in request["identifier"] if i["type"]["coding"][0]["code"] == "ACSN")
    assert acsn["system"] == "urn:oid:1.2.250.1.999.1.4"  # from the identifier's own OID (IPC-1.3)
    assert mapping.code_system("1.2.250.1.213.2.5") == "urn:oid:1.2.250.1.213.2.5"
    assert mapping.code_system("CCAM") == "urn:oid:1.2.250.1.213.2.5"
    assert mapping.code_system("SCT") == "http://snomed.info/sct"
    assert mapping.date_time("20260715") == "2026-07-15"
    assert mapping.date_time("202607151230") == "2026-07-15T12:30:00+02:00"  # summer time
    assert mapping.date_time("20260715123000+0000") == "2026-07-15T12:30:00+00:00"
    assert mapping.date_time("20261341") == ""


def test_without_timezone_only_the_date_is_sent(tmp_path: Path) -> None:
    path = _broken(tmp_path, "timezone: Europe/Paris", "timezone:")
    assert FHIRMapping(path).date_time("202611250930") == "2026-11-25"


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    source = ROOT / "mappings" / "fhir.yaml"
    text = source.read_text(encoding="utf-8")
    assert old in text
    (tmp_path / "tables").mkdir(exist_ok=True)
    for csv in (ROOT / "mappings" / "tables").glob("fhir_*.csv"):
        (tmp_path / "tables" / csv.name).write_text(csv.read_text(encoding="utf-8"), encoding="utf-8")
    path = tmp_path / "fhir.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def _line(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "needle", "reason"),
    [
        ("timezone: Europe/Paris", "timezone: Europe/Lyon", "timezone:", "unknown time zone"),
        ("    system: urn:oid:1.2.250.1.999.1.4", "    system: 1.2.250.1.999.1.4", "1.2.250.1.999.1.4", "not a URI"),
        ("  accession:", "  acession:", "acession", "unknown kind"),
        ("  local: urn:oid:1.2.250.1.999.1.9", "  locale: x", "locale", "unknown key"),
        ("'^(8\\d{11}|\\d{11})$'", "'^(8'", "match:", "bad regex"),
    ],
)
def test_broken_fhir_mapping_names_file_and_line(tmp_path: Path, old: str, new: str, needle: str, reason: str) -> None:
    path = _broken(tmp_path, old, new)
    with pytest.raises(MappingError) as err:
        FHIRMapping(path)
    assert err.value.file == str(path) and err.value.line == _line(path, needle)
    assert reason in str(err.value) and str(err.value).startswith(f"{path}:{err.value.line}:")


def test_bad_table_value_names_the_csv_line(tmp_path: Path) -> None:
    path = _broken(tmp_path, "x", "x")
    csv = tmp_path / "tables" / "fhir_gender.csv"
    csv.write_text(csv.read_text().replace("F,female", "F,femme"))
    with pytest.raises(MappingError) as err:
        FHIRMapping(path)
    assert err.value.file == str(csv.resolve()) and err.value.line == _line(csv, "femme")
    assert "'femme' is not one of" in str(err.value)


def test_store_versions_and_search(tmp_path: Path, mapping: FHIRMapping) -> None:
    store = FHIRStore(str(tmp_path / "fhir.sqlite"))
    order = order_of("orm_o01_nw_latin1.hl7")
    patient = mapping.patient(order.patient)
    request = mapping.service_request(order, f"Patient/{patient['id']}")
    assert store.upsert(patient, 1) and store.upsert(request, 1)
    assert not store.upsert(mapping.service_request(order, f"Patient/{patient['id']}"), 1)  # same content
    assert store.get("ServiceRequest", request["id"])["meta"]["versionId"] == "1"
    cancel = mapping.service_request(order_of("orm_o01_ca.hl7"), f"Patient/{patient['id']}")
    assert store.upsert(cancel, 3)
    assert not store.upsert(request, 2)  # an older event does not bring the order back
    stored = store.get("ServiceRequest", request["id"])
    assert stored["meta"]["versionId"] == "2" and stored["status"] == "revoked"
    for params in (
        {"identifier": f"{ACCESSION}|ACC0001"},
        {"identifier": "ACC0001"},
        {"patient.identifier": f"{INS_TEST}|279035121518989"},
        {"subject": f"Patient/{patient['id']}"},
        {"patient": patient["id"], "status": "revoked,active"},
    ):
        total, found = store.search("ServiceRequest", params)
        assert total == 1 and found[0]["id"] == request["id"], params
    assert store.search("ServiceRequest", {"identifier": "other|ACC0001"})[0] == 0
    assert store.search("Patient", {"identifier": f"{INS_TEST}|"})[0] == 1
    store.close()


async def test_engine_serves_fhir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import traboule.app.runtime

    monkeypatch.setitem(traboule.app.runtime.BUILTIN_CHANNELS, "fhir", "traboule.channels.fhir:FHIRChannel")
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}/fhir"
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))
        await send(runtime, fixture("orm_o01_ca.hl7"))
        await until(lambda: _statuses(store) == ["revoked", "active"])
        async with httpx.AsyncClient(timeout=10) as client:

            async def get(url: str, status: int = 200) -> dict[str, Any]:
                response = await client.get(url)
                assert response.status_code == status, response.text
                assert response.headers["content-type"].startswith("application/fhir+json")
                body = response.json()
                r4(body)
                for entry in body.get("entry", []):
                    r4(entry["resource"])
                return body

            bundle = await get(f"{base}/ServiceRequest?identifier={ACCESSION}|ACC0001")
            assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["status"] == "revoked"
            assert bundle["entry"][0]["search"]["mode"] == "match"
            assert bundle["entry"][0]["fullUrl"].startswith(f"{base}/ServiceRequest/")

            patients = await get(f"{base}/Patient?identifier={INS_TEST}|279035121518989")
            assert patients["total"] == 1
            patient = patients["entry"][0]["resource"]
            assert patient["name"][0]["family"] == "DUPONT"
            assert (await get(f"{base}/Patient/{patient['id']}"))["id"] == patient["id"]

            first = await get(f"{base}/ServiceRequest?_count=1")
            assert first["total"] == 2 and len(first["entry"]) == 1
            next_url = next(link["url"] for link in first["link"] if link["relation"] == "next")
            second = await get(next_url)
            assert len(second["entry"]) == 1 and not any(link["relation"] == "next" for link in second["link"])
            assert second["entry"][0]["resource"]["id"] != first["entry"][0]["resource"]["id"]

            ignored = await get(f"{base}/ServiceRequest?foo=bar")  # lenient by default: ignored, not in self
            assert ignored["total"] == 2 and "foo" not in ignored["link"][0]["url"]
            strict = await client.get(f"{base}/ServiceRequest?foo=bar", headers={"Prefer": "handling=strict"})
            bad = strict.json()
            assert strict.status_code == 400 and bad["issue"][0]["expression"] == ["foo"]
            assert "foo" in bad["issue"][0]["diagnostics"]
            assert (await get(f"{base}/Observation?code=x", 404))["resourceType"] == "OperationOutcome"
            assert (await get(f"{base}/Patient/nope", 404))["issue"][0]["code"] == "not-found"
            assert (await get(f"{base}/ServiceRequest?_count=x", 400))["issue"][0]["expression"] == ["_count"]

            metadata = await get(f"{base}/metadata")
            assert metadata["fhirVersion"] == "4.0.1"
            served = {r["type"]: {p["name"] for p in r.get("searchParam", [])} for r in metadata["rest"][0]["resource"]}
            assert "patient.identifier" in served["ServiceRequest"] and "identifier" in served["Patient"]
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_merge_deactivates_the_merged_patient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import traboule.app.runtime

    monkeypatch.setitem(traboule.app.runtime.BUILTIN_CHANNELS, "fhir", "traboule.channels.fhir:FHIRChannel")
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), fixture("adt_a40_merge.hl7"))
        await until(lambda: store.count("Patient") == 2 and _merged(store))
        await asyncio.sleep(0.1)
        _, patients = store.search("Patient", {})
        by_value = {p["identifier"][0]["value"]: p for p in patients}
        old, new = by_value["IPP0001"], by_value["IPP0009"]
        assert old["active"] is False and old["link"][0]["type"] == "replaced-by"
        assert old["link"][0]["other"]["reference"] == f"Patient/{new['id']}"
        assert new["active"] is True
        for p in patients:
            r4(p)
        (request,) = store.search("ServiceRequest", {})[1]
        assert request["subject"] == {"reference": f"Patient/{new['id']}"}  # the order follows the survivor
    finally:
        await runtime.stop()


def _statuses(store: FHIRStore) -> list[str]:
    return [r["status"] for r in store.search("ServiceRequest", {})[1]]


def _merged(store: FHIRStore) -> bool:
    return any(p.get("active") is False for p in store.search("Patient", {})[1])


async def test_performed_step_completes_the_service_request(tmp_path: Path) -> None:
    """An MPPS COMPLETED event (procedure.completed) sets the ServiceRequest of that accession to completed."""
    from traboule.model import Envelope, PerformedStep

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: _statuses(store) == ["active"])
        done = Envelope(PerformedStep(status="COMPLETED", accession_number="ACC0001"), idempotency_key="mpps-1")
        await runtime.bus.publish("procedure.completed", done.to_json(), message_id=done.id)
        await until(lambda: _statuses(store) == ["completed"])
        r4(store.search("ServiceRequest", {})[1][0])
    finally:
        await runtime.stop()


async def test_stable_study_becomes_an_imaging_study_based_on_the_order(tmp_path: Path) -> None:
    """study.stable → ImagingStudy (series, instances), basedOn the order's ServiceRequest, served on /fhir."""
    from traboule.model import Envelope, Identifier, Instance, Patient, Series, Study

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: _statuses(store) == ["active"])
        study = Study(
            study_instance_uid="1.2.250.1.999.1.2.20261125.1",
            accession_number="ACC0001",
            patient=Patient(ids=[Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1")]),
            started="20261125093512",
            series=[
                Series(
                    uid="1.2.3.1",
                    number="1",
                    modality="CT",
                    body_site="CHEST",
                    instances=[
                        Instance("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "1"),
                        Instance("1.2.3.1.2", "1.2.840.10008.5.1.4.1.1.2", "2"),
                    ],
                ),
                Series(
                    uid="1.2.3.2",
                    number="2",
                    modality="SR",
                    instances=[Instance("1.2.3.2.1", "1.2.840.10008.5.1.4.1.1.88.11", "1")],
                ),
            ],
            endpoint="http://archive.example/dicom-web/studies/1.2.250.1.999.1.2.20261125.1",
        )
        env = Envelope(study, idempotency_key="study-1")
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        await until(lambda: store.count("ImagingStudy") == 1)
        (request,) = store.search("ServiceRequest", {})[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir") as client:
            by_order = (await client.get("/ImagingStudy", params={"basedon": f"ServiceRequest/{request['id']}"})).json()
            by_uid = (
                await client.get(
                    "/ImagingStudy", params={"identifier": "urn:dicom:uid|urn:oid:1.2.250.1.999.1.2.20261125.1"}
                )
            ).json()
            by_ins = (
                await client.get(
                    "/ImagingStudy", params={"patient.identifier": "urn:oid:1.2.250.1.213.1.4.10|279035121518989"}
                )
            ).json()
        assert by_order["total"] == by_uid["total"] == by_ins["total"] == 1
        imaging = by_order["entry"][0]["resource"]
        assert imaging["numberOfSeries"] == 2 and imaging["numberOfInstances"] == 3
        assert imaging["subject"] == request["subject"]
        assert [m["code"] for m in imaging["modality"]] == ["CT", "SR"]
        assert imaging["contained"][0]["address"].endswith("/studies/1.2.250.1.999.1.2.20261125.1")
        r4(imaging)
        r4(by_order)
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_imaging_study_status_follows_the_modality_then_the_archive(tmp_path: Path) -> None:
    """MPPS announces the study (registered, cancelled when discontinued); the archive's study makes it available,
    and a later performed step does not take that back."""
    from traboule.model import Envelope, Identifier, Instance, Patient, PerformedStep, Series, Study

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    uid = "1.2.250.1.999.1.2.20261125.1"
    patient = Patient(ids=[Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1")])

    async def step(status: str, n: int) -> None:
        env = Envelope(
            PerformedStep(
                status=status,
                study_instance_uid=uid,
                accession_number="ACC0001",
                patient=patient,
                modality="CT",
                started="20261125093512",
            ),
            idempotency_key=f"mpps-{n}",
        )
        await runtime.bus.publish("procedure.x", env.to_json(), message_id=env.id)

    def imaging_status() -> str:
        found = store.search("ImagingStudy", {})[1]
        return found[0]["status"] if found else ""

    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: _statuses(store) == ["active"])
        await step("IN PROGRESS", 1)
        await until(lambda: imaging_status() == "registered")
        (registered,) = store.search("ImagingStudy", {})[1]
        r4(registered)
        assert registered["modality"][0]["code"] == "CT" and "series" not in registered
        assert registered["basedOn"] == [
            {"reference": f"ServiceRequest/{store.search('ServiceRequest', {})[1][0]['id']}"}
        ]
        await step("DISCONTINUED", 2)
        await until(lambda: imaging_status() == "cancelled")
        assert _statuses(store) == ["revoked"]
        study = Study(
            study_instance_uid=uid,
            accession_number="ACC0001",
            patient=patient,
            series=[Series("1.2.3.1", "1", "CT", instances=[Instance("1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "1")])],
        )
        env = Envelope(study, idempotency_key="study-1")
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        await until(lambda: imaging_status() == "available")
        await step("COMPLETED", 3)
        await until(lambda: _statuses(store) == ["completed"])
        await asyncio.sleep(0.1)
        assert imaging_status() == "available" and store.count("ImagingStudy") == 1
    finally:
        await runtime.stop()


@pytest.mark.parametrize(
    ("query", "found"),
    [
        (["2026-03-15"], True),  # a local day (Europe/Paris): 00:30 local is 23:30 UTC the day before
        (["2026-03-14"], False),
        (["2026-03-15T00:30+01:00"], True),  # minute precision: 00:30:45 is within it
        (["2026-03-15T00:30"], True),  # no zone: local time
        (["2026-03-14T23:30:45Z"], True),
        (["ge2026-03-15", "le2026-03-15"], True),  # a range: both must hold
        (["ge2026-03-16", "le2026-03-20"], False),
        (["gt2026-03-15"], False),
        (["lt2026-03-15T00:31+01:00"], True),
        (["2026-03"], True),
        (["2027"], False),
    ],
)
def test_date_search_covers_the_precision_given(tmp_path: Path, query: list[str], found: bool) -> None:
    from zoneinfo import ZoneInfo

    store = FHIRStore(str(tmp_path / "s.sqlite"), ZoneInfo("Europe/Paris"))
    store.upsert(
        {"resourceType": "DocumentReference", "id": "d1", "status": "current", "date": "2026-03-15T00:30:45+01:00"}
    )
    total, _ = store.search("DocumentReference", {"date": query if len(query) > 1 else query[0]})
    assert total == (1 if found else 0)


# Search parameters that were a 500 (with a traceback in the log) or matched what they should not: each is a 400
# OperationOutcome naming the parameter. (query, issue code, expression)
BAD_SEARCHES = [
    ("ServiceRequest?_offset=99999999999999999999999", "invalid", "_offset"),  # beyond SQLite's integers
    ("ServiceRequest?_count=-1", "invalid", "_count"),
    ("ServiceRequest?_count=1_0", "invalid", "_count"),  # int() reads 10
    ("ServiceRequest?_count=%EF%BC%91", "invalid", "_count"),  # a full-width 1
    ("DocumentReference?date=0001-01-01T00:00%2B01:00", "invalid", "date"),  # before year 1 in UTC
    ("DocumentReference?date=9999-12-31", "invalid", "date"),  # its end is in year 10000
    ("DocumentReference?date=%D9%A2%D9%A0%D9%A2%D9%A6", "invalid", "date"),  # 2026 in Arabic-Indic digits
    ("DocumentReference?date=2026-11-25T10:00%2B99:00", "invalid", "date"),
    ("DocumentReference?date=ap2026", "not-supported", "date"),
    ("Patient?identifier=" + ",".join(["a"] * 101), "too-costly", "identifier"),  # SQLite expression depth
    ("Patient?" + "&".join(["identifier=a"] * 101), "too-costly", "identifier"),
    ("ServiceRequest?subject=Observation/1", "not-supported", "subject"),
    ("ServiceRequest?_sort=date", "not-supported", "_sort"),  # with Prefer: handling=strict (else ignored)
]


async def test_bad_search_parameters_are_400_operation_outcomes(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=10) as client:
            for query, code, expression in BAD_SEARCHES:
                response = await client.get(f"/{query}", headers={"Prefer": "handling=strict"})
                assert response.status_code == 400, (query, response.text)
                assert response.headers["content-type"].startswith("application/fhir+json")
                (issue,) = r4(response.json()).issue
                assert (issue.code, issue.expression) == (code, [expression]), query
            assert (await client.get("/ServiceRequest?_offset=1000000000&_count=0")).status_code == 200
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_links_are_built_from_a_host_header_only_when_it_is_a_host(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=10) as client:

            async def self_link(host: str) -> str:
                bundle = (await client.get("/Patient?_count=1", headers={"Host": host})).json()
                return bundle["link"][0]["url"]

            assert (
                await self_link("fhir.example.org:8443")
                == "http://fhir.example.org:8443/fhir/Patient?_count=1&_offset=0"
            )
            assert await self_link("[::1]:8080") == "http://[::1]:8080/fhir/Patient?_count=1&_offset=0"
            for hostile in ('evil.example/x?"', "[", "a b", "evil.example@x"):
                assert await self_link(hostile) == f"http://127.0.0.1:{port}/fhir/Patient?_count=1&_offset=0"
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_fhir_client_puts_only_types_and_ids_in_its_paths(fhir_server_url: str) -> None:
    async with FHIRClient(fhir_server_url, timeout=10) as client:
        for rtype, rid in (
            ("Patient", "../metadata"),
            ("Patient", ".."),
            ("Patient", "x?_format=xml"),
            ("Patient", ""),
        ):
            with pytest.raises(ValueError, match="not a FHIR resource id"):
                await client.read(rtype, rid)
        for rtype in ("Patient/../metadata", "Patient?x=1", "patient", ""):
            with pytest.raises(ValueError, match="not a FHIR resource type"):
                await client.read(rtype, "1")
            with pytest.raises(ValueError, match="not a FHIR resource type"):
                await client.search(rtype)
        # what is allowed still reaches the server: a read of an id it does not have is its 404
        with pytest.raises(FHIRServerError) as missing:
            await client.read("Patient", "traboule-no-such-id")
        assert missing.value.status == 404
        # search values travel percent-encoded: "&" and "#" stay in the value
        bundle = await client.search("Patient", {"identifier": "urn:x|a&_id=1#b"})
        assert bundle.get("total", 0) == 0 and not bundle.get("entry")


def test_a_thinner_message_keeps_what_is_known_and_an_ins_is_never_swapped(mapping: FHIRMapping) -> None:
    from traboule.translate.fhir_mapping import merge_patient

    full = mapping.patient(order_of("orm_o01_nw_latin1.hl7").patient)
    ipp_only = model.Patient(ids=[model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1", "PI")])
    ipp_only.name = model.PersonName("DUPONT-MOREL", "Hélène")  # a new name, no birth date, no sex, no INS
    merged, refused = merge_patient(full, mapping.patient(ipp_only))
    r4(merged)
    assert refused == [] and merged["identifier"] == full["identifier"] and merged["id"] == full["id"]
    assert [(n["use"], n["family"]) for n in merged["name"]] == [("usual", "DUPONT-MOREL"), ("official", "MARTIN")]
    assert (merged["birthDate"], merged["gender"]) == ("1979-03-28", "female")

    other = model.Patient(ids=[*ipp_only.ids, model.Identifier("279035121519088", "", "1.2.250.1.213.1.4.10", "INS")])
    merged, refused = merge_patient(full, mapping.patient(other))
    assert [i["value"] for i in merged["identifier"]] == ["IPP0001", "279035121518989"]
    assert [i["value"] for i in refused] == ["279035121519088"]
    nir = model.Patient(ids=[*ipp_only.ids, model.Identifier("279035121518989", "", "1.2.250.1.213.1.4.8", "INS")])
    merged, refused = merge_patient(full, mapping.patient(nir))  # another kind of INS: added
    assert refused == [] and len(merged["identifier"]) == 3


def test_an_ipp_repeated_without_its_authority_is_one_identifier(mapping: FHIRMapping) -> None:
    named = model.Identifier("HX10002", "HOP", "1.2.250.1.71.4.2.1", "PI")
    for ids in ([model.Identifier("HX10002", "CHU-X", "", "PI"), named], [named, model.Identifier("HX10002")]):
        patient = mapping.patient(model.Patient(ids=ids))
        r4(patient)
        assert [(i["system"], i["value"]) for i in patient["identifier"]] == [("urn:oid:1.2.250.1.71.4.2.1", "HX10002")]
        assert patient["id"] == mapping.patient(model.Patient(ids=[named]))["id"]


async def test_unscheduled_steps_are_reconciled_by_accession_for_the_same_patient_only(tmp_path: Path) -> None:
    """A performed step whose accession number no order has gets an unscheduled ServiceRequest; the order with that
    accession number replaces it when it names the same patient, and leaves it to be reconciled otherwise."""
    from traboule.model import Envelope, Identifier, Patient, PerformedStep

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    fhir: Any = runtime.channel("fhir")
    store: FHIRStore = fhir.store
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)

    async def performed(status: str, accession: str, ipp: str, uid: str) -> None:
        patient = Patient(ids=[Identifier(ipp, "CHU-LYON")])
        step = PerformedStep(uid, status, uid, accession, patient=patient, modality="CT", started="20261125093512")
        env = Envelope(step, idempotency_key=f"{uid}-{status}")
        await runtime.bus.publish("procedure.x", env.to_json(), message_id=env.id)

    try:
        await performed("IN PROGRESS", "ACC0001", "IPP0001", "1.2.3.1")
        await performed("IN PROGRESS", "ACC0002", "IPP0001", "1.2.3.2")  # the order will be another patient's
        await until(lambda: store.count("ImagingStudy") == 2)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=10) as client:
            listed = (await client.get("/ServiceRequest", params={"_tag": "urn:traboule:tags|unscheduled"})).json()
        r4(listed)
        assert listed["total"] == 2 and fhir.describe()["unscheduled"] == 2
        for entry in listed["entry"]:
            acsn = [i for i in entry["resource"]["identifier"] if i.get("type")]
            assert [(i["system"], i["value"]) for i in acsn] in ([(ACCESSION, "ACC0001")], [(ACCESSION, "ACC0002")])

        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))  # IPP0001, IPP0002
        await until(lambda: store.count("ServiceRequest") == 4)
        (ordered,) = store.search("ServiceRequest", {"identifier": "PLC0001"})[1]
        (first,) = store.search("ServiceRequest", {"identifier": "urn:dicom:uid|urn:oid:1.2.3.1"})[1]
        assert ordered["replaces"] == [{"reference": f"ServiceRequest/{first['id']}"}] and first["status"] == "revoked"
        (other,) = store.search("ServiceRequest", {"identifier": "PLC0002"})[1]
        assert "replaces" not in other  # IPP0002's order: the step of IPP0001 is not moved to another patient
        assert fhir.describe()["unscheduled"] == 1
        studies = {s["identifier"][0]["value"]: s for s in store.search("ImagingStudy", {})[1]}
        assert studies["urn:oid:1.2.3.1"]["basedOn"] == [{"reference": f"ServiceRequest/{ordered['id']}"}]
        assert studies["urn:oid:1.2.3.2"]["basedOn"][0]["reference"] != f"ServiceRequest/{other['id']}"

        await performed("COMPLETED", "ACC0001", "IPP0001", "1.2.3.1")
        await until(lambda: store.get("ServiceRequest", ordered["id"])["status"] == "completed")  # type: ignore[index]
        assert store.get("ServiceRequest", first["id"])["status"] == "revoked"  # type: ignore[index]
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_a_merged_patient_keeps_its_fr_core_profiles(tmp_path: Path) -> None:
    """A Patient merged into another (inactive, ``replaced-by``) is still the FR Core Patient it was: its
    ``meta.profile`` stays, along a chain of merges too; a merged IPP never seen before claims the profile its
    resource conforms to."""
    from traboule.model import Envelope, Identifier, Patient, PatientUpdate

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]

    def by_ipp() -> dict[str, dict[str, Any]]:
        return {p["identifier"][0]["value"]: p for p in store.search("Patient", {}, count=100)[1]}

    async def merge(survivor: str, merged: str) -> None:
        update = PatientUpdate(
            "merge", Patient(ids=[Identifier(survivor, "CHU-LYON")]), [Identifier(merged, "CHU-LYON")]
        )
        env = Envelope(update, idempotency_key=f"merge-{merged}")
        await runtime.bus.publish("patient.merge", env.to_json(), message_id=env.id)
        await until(lambda: by_ipp().get(merged, {}).get("active") is False)

    try:
        await send(runtime, fixture("orm_o01_ins_qualified.hl7"))  # IPP0101: a qualified INS identity
        await until(lambda: "IPP0101" in by_ipp())
        profiles = by_ipp()["IPP0101"]["meta"]["profile"]
        assert any("fr-core-patient-ins" in p for p in profiles)
        await merge("IPP0102", "IPP0101")
        await merge("IPP0103", "IPP0102")  # the survivor merged in turn
        await merge("IPP0103", "IPP0177")  # an IPP this store never saw
        patients = by_ipp()
        assert patients["IPP0101"]["meta"]["profile"] == profiles and patients["IPP0101"]["active"] is False
        assert patients["IPP0101"]["link"][0]["other"]["reference"] == f"Patient/{patients['IPP0102']['id']}"
        for ipp in ("IPP0102", "IPP0177"):
            assert patients[ipp]["active"] is False
            assert patients[ipp]["meta"].get("profile") == [FR_CORE_PATIENT], ipp
        for p in patients.values():
            r4(p)
    finally:
        await runtime.stop()


def test_by_subject_finds_deleted_document_references_too(tmp_path: Path) -> None:
    """What a merge moves: every resource of a subject, a deleted DocumentReference (found by no search) too."""
    from traboule.translate.fhir_mapping import deleted

    store = FHIRStore(str(tmp_path / "fhir.sqlite"))
    try:
        for rid, subject in (("a", "Patient/1"), ("b", "Patient/1"), ("c", "Patient/2")):
            reference = {"resourceType": "DocumentReference", "id": rid, "status": "current"}
            store.upsert({**reference, "subject": {"reference": subject}})
        store.upsert(deleted(store.get("DocumentReference", "b") or {}))
        assert store.search("DocumentReference", {"subject": "Patient/1"})[0] == 1  # PDSm: deleted, not found
        assert [r["id"] for r in store.by_subject("DocumentReference", "Patient/1")] == ["a", "b"]
        assert [r["id"] for r in store.by_subject("DocumentReference", "Patient/1", include_deleted=False)] == ["a"]
        assert store.by_subject("ServiceRequest", "Patient/1") == []
        assert store.by_subject("DocumentReference", "Patient/3") == []
    finally:
        store.close()


async def test_fhir_paths_are_operation_outcomes_without_an_api(tmp_path: Path) -> None:
    """``api = false``: no /fhir route, yet a FHIR client asking there gets an OperationOutcome (404 / 405), not
    Starlette's plain text; other paths keep their plain answers."""
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": False})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for method, path in (
                ("GET", "/fhir/metadata"),
                ("GET", "/fhir/Patient?identifier=x"),
                ("POST", "/fhir/Patient"),
                ("GET", "/fhir"),
                ("DELETE", "/fhir/Patient/1"),
            ):
                response = await client.request(method, path)
                assert response.status_code == 404, (method, path, response.text)
                assert response.headers["content-type"].startswith("application/fhir+json")
                (issue,) = r4(response.json()).issue
                assert issue.code == "not-found" and issue.severity == "error"
            elsewhere = await client.get("/nothing-here")
            assert elsewhere.status_code == 404 and elsewhere.text == "Not Found"
            wrong_method = await client.post("/health")
            assert wrong_method.status_code == 405 and set(wrong_method.headers["allow"].split(", ")) == {"GET", "HEAD"}
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_an_earlier_patient_event_applied_late_keeps_the_fr_core_profiles(tmp_path: Path) -> None:
    """An earlier message applied after a later one (a redelivery): its identifiers join the union, the demographics
    stay the later message's, and the Patient still names the FR Core profiles it conforms to."""
    import dataclasses

    from traboule.model import Envelope, PatientUpdate

    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    channel = runtime.channel("fhir")
    store: FHIRStore = channel.store  # type: ignore[attr-defined]
    try:
        later = order_of("orm_o01_ins_qualified.hl7").patient
        earlier = dataclasses.replace(
            later,
            ids=[*later.ids, dataclasses.replace(later.ids[0], value="IPP9101")],
            name=dataclasses.replace(later.name, family="ANCIEN"),
        )
        channel._apply([Envelope(PatientUpdate("update", later))], [20])  # type: ignore[attr-defined]
        (stored,) = store.search("Patient", {})[1]
        profiles = stored["meta"]["profile"]
        assert any("fr-core-patient-ins" in p for p in profiles)
        channel._apply([Envelope(PatientUpdate("update", earlier))], [10])  # type: ignore[attr-defined]
        (patient,) = store.search("Patient", {})[1]
        assert patient["meta"]["versionId"] == "2"  # the earlier message's identifier was added
        assert "IPP9101" in [i["value"] for i in patient["identifier"]]
        assert patient["name"] == stored["name"]  # the later message's demographics
        assert patient["meta"]["profile"] == profiles
        assert store.seq_of("Patient", patient["id"]) == 20
        r4(patient)
    finally:
        await runtime.stop()
