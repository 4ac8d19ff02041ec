"""Patient identity follows the latest message: an order with the IPP alone, then the report with the INS the
identity was qualified with → one Patient with both, and its orders, studies and reports found by either; another
INS for the same IPP is refused at ingest (AE naming PID-3, journaled); the IPP is held once whatever assigning
authority a message names. Real MLLP sockets, the real engine, the /fhir API over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.patient import Patient as FHIRPatient

from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_reports import report_of, study
from traboule import hl7, model
from traboule.fhir_store import FHIRStore
from traboule.hl7_mapping import MappingFailure
from traboule.http import create_app, serve
from traboule.model import Envelope
from traboule.patient_identity import Pair, PatientIdentities
from traboule.runtime import Runtime

IPP = "urn:oid:1.2.250.1.999.1.1|IPP0001"
INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"
OTHER_INS = "279035121519088"  # a valid check key too: another person's
PID3_INS = b"~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS"


def order_with_ipp_only() -> bytes:
    data = fixture("orm_o01_nw_latin1.hl7")
    assert PID3_INS in data
    return data.replace(PID3_INS, b"")


def adt(*, ins: str = "", birth_date: str = "19790328", control: str = "MSG0020") -> bytes:
    data = fixture("adt_a08_update.hl7").replace(b"MSG0020", control.encode())
    if ins:
        data = data.replace(b"&ISO^PI|", f"&ISO^PI~{ins}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS|".encode())
    return data.replace(b"||19790328|F", f"||{birth_date}|F".encode())


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


def fhir_store(runtime: Runtime) -> FHIRStore:
    return runtime.channel("fhir").store  # type: ignore[attr-defined]


async def test_the_report_adds_the_ins_and_everything_is_found_by_either_identifier(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = api
    store = fhir_store(runtime)
    assert ack_code((await send(runtime, order_with_ipp_only()))[0]) == "AA"
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    await until(lambda: store.count("ImagingStudy") == 1 and store.count("ServiceRequest") == 1)
    assert await search(client, "ServiceRequest", **{"patient.identifier": INS}) == []  # not known yet
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)

    assert ack_code((await send(runtime, fixture("oru_r01_report.hl7")))[0]) == "AA"
    await until(lambda: store.count("DocumentReference") == 1)
    (patient,) = await search(client, "Patient", identifier=INS)
    FHIRPatient.model_validate(patient)
    assert [(i.get("system"), i["value"]) for i in patient["identifier"]] == [
        ("urn:oid:1.2.250.1.999.1.1", "IPP0001"),
        ("urn:oid:1.2.250.1.213.1.4.10", "279035121518989"),
    ]
    assert store.count("Patient") == 1
    for identifier in (INS, IPP):
        (doc,) = await search(client, "DocumentReference", **{"patient.identifier": identifier})
        assert doc["subject"] == {"reference": f"Patient/{patient['id']}"}
        assert len(await search(client, "ServiceRequest", **{"patient.identifier": identifier})) == 1
        assert len(await search(client, "ImagingStudy", **{"patient.identifier": identifier})) == 1
        assert len(await search(client, "DiagnosticReport", **{"patient.identifier": identifier})) == 1

    # Another INS for the same IPP: refused before the ACK, journaled, nothing changes.
    (refused,) = await send(runtime, adt(ins=OTHER_INS, control="MSG0021"))
    assert ack_code(refused) == "AE"
    err = refused.segment("ERR")
    assert err is not None and "PID^1^3" in err.field(2) and "identity conflict" in hl7.unescape(err.field(8))
    assert runtime.journal is not None
    (entry,) = runtime.journal.recent(1)
    assert entry.status == "rejected" and entry.error.startswith("PID-3: identity conflict")
    corrected = fixture("oru_r01_report_corrected.hl7").replace(b"279035121518989", OTHER_INS.encode())
    assert ack_code((await send(runtime, corrected))[0]) == "AE"  # a report too: nothing published

    # Fewer traits: the name follows the latest message, the birth date it lacks is kept, so is the INS.
    assert ack_code((await send(runtime, adt(birth_date="", control="MSG0022")))[0]) == "AA"
    await until(lambda: _family(store.get("Patient", patient["id"])) == "DUPONT-MOREL")
    updated = store.get("Patient", patient["id"])
    assert updated is not None and updated["birthDate"] == "1979-03-28"
    assert [i["value"] for i in updated["identifier"]] == ["IPP0001", "279035121518989"]
    assert store.count("Patient") == 1 and store.count("DocumentReference") == 1


def _family(patient: dict[str, Any] | None) -> str:
    names = (patient or {}).get("name") or [{}]
    return str(names[0].get("family", ""))


async def test_an_ipp_is_held_once_whatever_authority_names_it(api: tuple[Runtime, httpx.AsyncClient]) -> None:
    """PID-3's assigning authority wins; the mapping's default system is for an IPP sent without one, and such an
    IPP is the one the Patient already holds: one Patient, one IPP, in either order of arrival."""
    runtime, client = api
    store = fhir_store(runtime)

    def order(ipp: str, n: str) -> bytes:
        data = order_with_ipp_only().replace(b"IPP0001^^^CHU-LYON&1.2.250.1.999.1.1&ISO^PI", ipp.encode())
        return data.replace(b"0001", n.encode())  # another order (placer, filler, accession, steps)

    async def stable(ipp: str, uid: str) -> None:
        env = Envelope(model.Study(uid, "", model.Patient(ids=[model.Identifier(ipp)]), "20261125093512"))
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)

    # The order names its authority first, the archive's study (no IssuerOfPatientID) follows.
    assert ack_code((await send(runtime, order("HX10002^^^HOP&1.2.250.1.71.4.2.1&ISO^PI", "0002")))[0]) == "AA"
    await stable("HX10002", "1.2.250.1.999.1.2.7")
    # The archive's study comes first, the order naming its authority follows.
    await stable("HX10003", "1.2.250.1.999.1.2.8")
    await until(lambda: store.count("ImagingStudy") == 2)
    (before,) = await search(client, "Patient", identifier="urn:oid:1.2.250.1.999.1.1|HX10003")  # the default
    assert ack_code((await send(runtime, order("HX10003^^^HOP&1.2.250.1.71.4.2.1&ISO^PI", "0003")))[0]) == "AA"
    await until(lambda: store.count("ServiceRequest") == 2)

    _, patients = store.search("Patient", {})
    assert len(patients) == 2
    for value in ("HX10002", "HX10003"):
        (patient,) = await search(client, "Patient", identifier=f"urn:oid:1.2.250.1.71.4.2.1|{value}")
        assert [(i["system"], i["value"]) for i in patient["identifier"]] == [("urn:oid:1.2.250.1.71.4.2.1", value)]
        ref = {"reference": f"Patient/{patient['id']}"}
        by_ipp = {"patient.identifier": f"urn:oid:1.2.250.1.71.4.2.1|{value}"}
        ((request,), (imaging,)) = [await search(client, t, **by_ipp) for t in ("ServiceRequest", "ImagingStudy")]
        assert request["subject"] == imaging["subject"] == ref
    assert patient["id"] == before["id"]  # the Patient kept its id when the authority was named
    assert await search(client, "Patient", identifier="urn:oid:1.2.250.1.999.1.1|HX10003") == []


# -- the registry itself -----------------------------------------------------------------------------------------


def patient(ipp: model.Identifier, *ins: str) -> model.ImagingOrder:
    ids = [ipp, *(model.Identifier(v, "ASIP-SANTE-INS-NIR", "1.2.250.1.213.1.4.10", "INS") for v in ins)]
    return model.ImagingOrder(patient=model.Patient(ids=ids))


def test_registry_refuses_another_ins_for_a_recorded_ipp_after_a_restart(tmp_path: Path) -> None:
    ipp = model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1", "PI")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp)])  # no INS yet: nothing to hold
    registry.check([patient(ipp, "279035121518989")])
    registry.record([patient(ipp, "279035121518989")])
    registry.close()

    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp, "279035121518989")])  # the same again: fine
    with pytest.raises(MappingFailure):  # two INS of one kind in one message: no patient has two
        registry.check([patient(model.Identifier("IPP0002"), "279035121518989", "185057512345673")])
    for same_ipp in (ipp, model.Identifier("IPP0001"), model.Identifier("IPP0001", "CHU-LYON")):
        with pytest.raises(MappingFailure) as refused:
            registry.check([patient(same_ipp, OTHER_INS)])
        assert refused.value.location == "PID-3" and refused.value.code == "205"
    # Another authority, another patient; an INS with a wrong check key is no identity (it is left out upstream).
    registry.check([patient(model.Identifier("IPP0001", "OTHER", "1.2.250.1.999.9"), OTHER_INS)])
    registry.check([patient(ipp, "279035121519000")])
    registry.close()


def test_registry_holds_a_checked_pair_until_its_message_is_journaled(tmp_path: Path) -> None:
    """Two messages in flight for one IPP with different INS: the second is refused although the first is not
    recorded yet; a pair recorded twice (redelivery) is one row."""
    ipp = model.Identifier("IPP0001", "", "1.2.250.1.999.1.1")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp, "279035121518989")])
    with pytest.raises(MappingFailure):
        registry.check([patient(ipp, OTHER_INS)])
    registry.record([patient(ipp, "279035121518989")])
    registry.record([patient(ipp, "279035121518989")])
    assert registry.known(Pair("IPP0001", "", "", "1.2.250.1.213.1.4.10", "")) == [
        Pair("IPP0001", "1.2.250.1.999.1.1", "", "1.2.250.1.213.1.4.10", "279035121518989")
    ]
    registry.close()


def test_a_pair_whose_message_was_never_journaled_stops_holding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    import traboule.patient_identity

    monkeypatch.setattr(traboule.patient_identity, "RESERVED", 0.05)
    ipp = model.Identifier("IPP0001", "CHU-LYON")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp, "279035121518989")])  # then refused later (say, its report): never recorded
    time.sleep(0.1)
    registry.check([patient(ipp, OTHER_INS)])
    registry.record([patient(ipp, OTHER_INS)])
    with pytest.raises(MappingFailure):
        registry.check([patient(ipp, "279035121518989")])
    registry.close()
