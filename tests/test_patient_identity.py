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
from traboule import model
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.formats import hl7
from traboule.model import Envelope
from traboule.stores.fhir_store import FHIRStore
from traboule.stores.patient_identity import Pair, PatientIdentities
from traboule.translate.hl7_mapping import MappingFailure

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

    # Another INS for the same IPP in an order: refused before the ACK, journaled, nothing changes.
    other_order = fixture("orm_o01_nw_latin1.hl7").replace(b"279035121518989", OTHER_INS.encode())
    (refused,) = await send(runtime, other_order.replace(b"MSG0001", b"MSG0021"))
    assert ack_code(refused) == "AE"
    err = refused.segment("ERR")
    assert err is not None and "PID^1^3" in "|".join(err.fields)  # ERR-1 of v2.3.1
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
        data = data.replace(b"20261125.1^", f"20261125.{int(n)}^".encode())  # its own study
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

    import traboule.stores.patient_identity

    monkeypatch.setattr(traboule.stores.patient_identity, "RESERVED", 0.05)
    ipp = model.Identifier("IPP0001", "CHU-LYON")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp, "279035121518989")])  # then refused later (say, its report): never recorded
    time.sleep(0.1)
    registry.check([patient(ipp, OTHER_INS)])
    registry.record([patient(ipp, OTHER_INS)])
    with pytest.raises(MappingFailure):
        registry.check([patient(ipp, "279035121518989")])
    registry.close()


def test_registry_knows_whose_each_order_is_and_follows_merges(tmp_path: Path) -> None:
    """An order's keys are its patient's (the latest order says); a report, step or study only fills a key no one
    gave. The same patient: the same IPP (an IPP without authority is the one held under any), or a common INS; a
    different INS of one kind is another person. A merged IPP's orders are its survivor's, merges followed."""
    chu = model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1", "PI")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    order = patient(chu, "279035121518989")
    order.accession_number, order.placer_order_number = model.Identifier("ACC1"), model.Identifier("PLC1", "RIS")
    order.study_instance_uid = "1.2.3.4"
    registry.record([order])
    assert [i.value for i in registry.owner("accession", "ACC1") or []] == ["IPP0001", "279035121518989"]

    def report(ipp: model.Identifier, *ins: str, **keys: Any) -> model.Report:
        return model.Report(patient=patient(ipp, *ins).patient, **keys)

    acc1 = {"accession_number": model.Identifier("ACC1")}
    for same in (
        report(model.Identifier("IPP0001"), **acc1),  # no authority: the one held
        report(model.Identifier("IPP0001", "CHU-LYON"), **acc1),
        report(model.Identifier("IPP7", "OTHER"), "279035121518989", **acc1),  # another IPP, the same INS
        report(model.Identifier("IPP9"), placer_order_number=model.Identifier("PLC2")),  # a key no one holds
    ):
        registry.check_report([same])
    for other, where in (
        (report(model.Identifier("IPP0002", "CHU-LYON"), **acc1), "accession number ACC1"),
        (report(model.Identifier("IPP0001", "OTHER", "1.2.250.1.999.9"), **acc1), "accession number ACC1"),
        (report(chu, OTHER_INS, **acc1), "accession number ACC1"),  # the same IPP, another person's INS
        (report(model.Identifier("IPP0002"), study_instance_uid="1.2.3.4"), "Study Instance UID 1.2.3.4"),
        (report(model.Identifier("IPP0002"), placer_order_number=model.Identifier("PLC1")), "placer order number"),
    ):
        with pytest.raises(MappingFailure) as refused:
            registry.check_report([other])
        assert refused.value.location == "PID-3" and where in refused.value.reason
        assert "belongs to patient IPP0001 (CHU-LYON)" in refused.value.reason
    step = model.PerformedStep(accession_number="ACC1", patient=model.Patient(ids=[model.Identifier("IPP0002")]))
    with pytest.raises(MappingFailure):
        registry.check_step(step)
    for issuer in ("CHU-LYON", "1.2.250.1.999.1.1", ""):  # DICOM's Issuer of Patient ID: the namespace or the OID
        step.patient = model.Patient(ids=[model.Identifier("IPP0001", issuer)])
        registry.check_step(step)
    step.patient = model.Patient(ids=[model.Identifier("IPP0001", "1.2.250.1.999.9")])
    with pytest.raises(MappingFailure):
        registry.check_step(step)
    with pytest.raises(MappingFailure):
        registry.check_study(model.Study("1.2.3.4", "", model.Patient(ids=[model.Identifier("IPP0002")])))

    # A report names a key first: it fills it, an order then takes it over.
    registry.record([report(model.Identifier("IPP0003"), accession_number=model.Identifier("ACC3"))])
    registry.record([report(model.Identifier("IPP0004"), accession_number=model.Identifier("ACC3"))])
    assert [i.value for i in registry.owner("accession", "ACC3") or []] == ["IPP0003"]
    moved = patient(model.Identifier("IPP0004"))
    moved.accession_number = model.Identifier("ACC3")
    registry.record([moved])
    assert [i.value for i in registry.owner("accession", "ACC3") or []] == ["IPP0004"]

    # IPP0001 merged into IPP0009, then IPP0009 into IPP0010: IPP0001's order is IPP0010's.
    def merge(survivor: str, merged: str) -> model.PatientUpdate:
        return model.PatientUpdate(
            "merge", model.Patient(ids=[model.Identifier(survivor, "CHU-LYON")]), [model.Identifier(merged, "CHU-LYON")]
        )

    registry.record([merge("IPP0009", "IPP0001"), merge("IPP0010", "IPP0009")])
    registry.close()
    registry = PatientIdentities(tmp_path / "patients.sqlite")  # all of it on disk
    # The survivor: its IPP and the INS the registry holds for it now (IPP0001's, given to it by the merges).
    assert [i.value for i in registry.survivor(model.Identifier("IPP0001")) or []] == ["IPP0010", "279035121518989"]
    registry.check_report([report(model.Identifier("IPP0010", "CHU-LYON"), **acc1)])
    late = report(model.Identifier("IPP0001", "CHU-LYON"), **acc1)
    (note,) = registry.resolve_merged([late, merge("IPP0001", "IPP0002")])  # a merge message is left as it is
    assert note == "patient IPP0001 (CHU-LYON) was merged into IPP0010 (CHU-LYON): applied to the surviving patient"
    assert [i.value for i in late.patient.ids] == ["IPP0010", "279035121518989"]
    assert registry.resolve_merged([report(model.Identifier("IPP0001", "OTHER"))]) == []  # another authority's
    # A merge the other way round makes IPP0009 a patient again (its own survivor no longer).
    registry.record([merge("IPP0009", "IPP0010")])
    assert registry.survivor(model.Identifier("IPP0009")) is None
    assert [i.value for i in registry.survivor(model.Identifier("IPP0001")) or []] == ["IPP0009", "279035121518989"]
    # A merged IPP's message with another INS than the survivor's: the INS is kept, so the message is refused.
    survivor = patient(model.Identifier("IPP0020", "CHU-LYON"), "279035121518989").patient
    registry.record([model.PatientUpdate("merge", survivor, [model.Identifier("IPP0021", "CHU-LYON")])])
    late = report(model.Identifier("IPP0021", "CHU-LYON"), OTHER_INS)
    assert len(registry.resolve_merged([late])) == 1
    assert [i.value for i in late.patient.ids] == ["IPP0020", "279035121518989", OTHER_INS]
    with pytest.raises(MappingFailure):
        registry.check([late])
    registry.close()


# -- corrections: the identity system's ADT, the operator ---------------------------------------------------------


@pytest.fixture
async def sourced(tmp_path: Path) -> AsyncIterator[Runtime]:
    """An engine whose inbound channel takes identity corrections from the GAM of CHU-LYON only."""
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    cfg.channels[0]["identity_sources"] = [{"application": "GAM", "facility": "CHU-LYON"}]
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def test_the_identity_system_corrects_an_ins_and_everything_follows(sourced: Runtime) -> None:
    """The INS an IPP was accepted with is replaced by the identity source's ADT^A08 only: the registry (and the
    owners of the IPP's orders) and the FHIR Patient take the new INS, the old one is refused from then on."""
    runtime, store = sourced, fhir_store(sourced)
    orders = runtime.channel("ris-orders")
    assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"
    await until(lambda: store.count("Patient") == 1)
    corrected = adt(ins=OTHER_INS, control="MSG0031")

    # The same correction from the RIS (not an identity source): refused.
    (refused,) = await send(runtime, corrected.replace(b"|GAM|", b"|RIS|"))
    assert ack_code(refused) == "AE" and "identity conflict" in hl7.unescape(refused.segment("ERR").field(8))
    # From the GAM: accepted, the change journaled as a warning.
    (accepted,) = await send(runtime, corrected)
    assert ack_code(accepted) == "AA"
    assert runtime.journal is not None
    (entry,) = runtime.journal.recent(1)
    assert entry.status == "accepted"
    assert "INS of IPP IPP0001 changed by ADT" in entry.warnings and f"replaced by {OTHER_INS}" in entry.warnings
    known = orders.identities.known(Pair("IPP0001", "", "", "1.2.250.1.213.1.4.10", ""))
    assert [p.ins for p in known] == [OTHER_INS]
    assert [i.value for i in orders.identities.owner("accession", "ACC0001") or []] == ["IPP0001", OTHER_INS]

    def ins_of_patient() -> list[str]:
        _, (found,) = store.search("Patient", {})
        return [i["value"] for i in found["identifier"] if i["system"] == "urn:oid:1.2.250.1.213.1.4.10"]

    await until(lambda: ins_of_patient() == [OTHER_INS])

    # From then on: the new INS is the patient's, the old one refused; the order's report with the new INS fits.
    new_order = fixture("orm_o01_nw_latin1.hl7").replace(b"279035121518989", OTHER_INS.encode())
    assert ack_code((await send(runtime, new_order.replace(b"MSG0001", b"MSG0032")))[0]) == "AA"
    old = fixture("orm_o01_nw_latin1.hl7").replace(b"MSG0001", b"MSG0033").replace(b"ACC0001", b"ACC0009")
    assert ack_code((await send(runtime, old))[0]) == "AE"
    report = report_of(fixture("oru_r01_report.hl7").replace(b"279035121518989", OTHER_INS.encode()))
    report.accession_number = model.Identifier("ACC0001")
    orders.identities.check_report([report])
    assert ins_of_patient() == [OTHER_INS] and store.count("Patient") == 1


async def test_without_identity_sources_any_adt_corrects_and_orders_and_reports_never_do(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"
        other_order = fixture("orm_o01_nw_latin1.hl7").replace(b"279035121518989", OTHER_INS.encode())
        assert ack_code((await send(runtime, other_order.replace(b"MSG0001", b"MSG0041")))[0]) == "AE"
        correction = adt(ins=OTHER_INS, control="MSG0042").replace(b"|GAM|", b"|RIS|")  # whoever sends it
        assert ack_code((await send(runtime, correction))[0]) == "AA"
        assert runtime.journal is not None and runtime.journal.recent(1)[0].ack_code == "AA"
        assert ack_code((await send(runtime, other_order.replace(b"MSG0001", b"MSG0043")))[0]) == "AA"
    finally:
        await runtime.stop()


def test_identity_sources_must_be_a_list_of_applications() -> None:
    from traboule.stores.patient_identity import identity_sources

    assert identity_sources(None, "x") is None
    assert identity_sources([{"application": "GAM"}], "x") == [("GAM", "")]
    for wrong in ("GAM", [{"facility": "CHU"}], [{"application": "GAM", "other": 1}], ["GAM"]):
        with pytest.raises(ValueError, match="identity_sources"):
            identity_sources(wrong, "x")


def test_a_refused_or_duplicate_message_stops_holding_its_ins_at_once(tmp_path: Path) -> None:
    """`release`: what a message that was not accepted reserved holds nothing; another message in flight with the
    same pair still holds it."""
    ipp = model.Identifier("IPP0777", "CHU-LYON")
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(ipp, "279035121518989")])  # refused later (say, its act code): released
    registry.release([patient(ipp, "279035121518989")])
    registry.check([patient(ipp, OTHER_INS)])  # message A, in flight
    registry.check([patient(ipp, OTHER_INS)])  # message B, the same pair, then refused
    registry.release([patient(ipp, OTHER_INS)])
    with pytest.raises(MappingFailure):  # A still holds it
        registry.check([patient(ipp, "279035121518989")])
    registry.release([patient(ipp, OTHER_INS)])  # A refused too
    registry.check([patient(ipp, "279035121518989")])
    registry.close()


async def test_a_report_refused_for_its_act_code_leaves_its_ins_free(tmp_path: Path) -> None:
    """A report for IPP0777 refused (AE, an unmapped act code), then within seconds an order for IPP0777 with
    another INS: accepted, nothing was recorded."""
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        report = fixture("oru_r01_report.hl7").replace(b"IPP0001", b"IPP0777").replace(b"ACC0001", b"ACC0099")
        act = b"CTTAP^Scanner thoraco-abdomino-pelvien^L"
        assert act in report
        (refused,) = await send(runtime, report.replace(act, b"XRTHO^Radiographie du thorax^L"))  # unmapped
        assert ack_code(refused) == "AE"
        assert runtime.journal is not None and "PID-3" not in runtime.journal.recent(1)[0].error
        order = fixture("orm_o01_nw_latin1.hl7").replace(b"IPP0001", b"IPP0777").replace(b"ACC0001", b"ACC0777")
        order = order.replace(b"279035121518989", OTHER_INS.encode())
        assert ack_code((await send(runtime, order))[0]) == "AA"
        registry = runtime.channel("ris-orders").identities
        assert [p.ins for p in registry.known(Pair("IPP0777", "", "", "1.2.250.1.213.1.4.10", ""))] == [OTHER_INS]
    finally:
        await runtime.stop()


def test_patients_show_and_forget(tmp_path: Path) -> None:
    """`traboule patients show IPP` prints the registry's INS, orders and merges of an IPP; `forget` removes its
    INS (the owners keep the IPP alone), recorded among the registry's actions: the next INS is accepted."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    var = tmp_path / "var"
    var.mkdir()
    config = tmp_path / "traboule.toml"
    config.write_text(f'[engine]\ndefaults = false\ndata_dir = "{var}"\n')
    chu = model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1", "PI")
    registry = PatientIdentities(var / "patients.sqlite")
    order = patient(chu, "279035121518989")
    order.accession_number = model.Identifier("ACC1")
    registry.record([order])
    registry.record([model.PatientUpdate("merge", model.Patient(ids=[chu]), [model.Identifier("IPP0002", "CHU-LYON")])])
    registry.close()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        command = [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "patients", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

    shown = cli("show", "IPP0001")
    assert shown.returncode == 0, shown.stderr
    assert "279035121518989" in shown.stdout and "accession number ACC1" in shown.stdout
    assert "IPP0002 (CHU-LYON) was merged into it" in shown.stdout
    assert "merged into IPP0001" in cli("show", "IPP0002").stdout
    assert cli("show", "IPP9999").returncode == 1

    forgotten = cli("forget", "IPP0001")
    assert forgotten.returncode == 0, forgotten.stderr
    assert "279035121518989" in forgotten.stdout and "patients.ins_forgotten" in forgotten.stderr
    assert "279035121518989" not in forgotten.stderr and "IPP0001" not in forgotten.stderr  # no patient data logged
    assert cli("forget", "IPP0001").returncode == 1
    shown = cli("show", "IPP0001")
    assert "no INS recorded" in shown.stdout and "ins-forgotten" in shown.stdout

    registry = PatientIdentities(var / "patients.sqlite")
    assert [i.value for i in registry.owner("accession", "ACC1") or []] == ["IPP0001"]
    registry.check([patient(chu, OTHER_INS)])  # the next INS is the IPP's
    registry.close()


def test_the_rebuild_fills_what_a_crash_lost_and_leaves_a_later_correction(tmp_path: Path) -> None:
    """`rebuild` (the orders channel's start): the accepted messages after the mark are recorded again (pairs,
    owners, merges), in journal order; an INS forgotten or changed after a message came is not brought back."""
    from traboule.stores.patient_identity import _now

    ipp = model.Identifier("IPP0001", "CHU-LYON")
    order = patient(ipp, "279035121518989")
    order.accession_number = model.Identifier("ACC1")
    received = _now()
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    assert registry.rebuild([(7, received, [order])], "ris-orders") == 1
    assert registry.mark("ris-orders") == 7
    assert [p.ins for p in registry.known(Pair("IPP0001", "", "", "1.2.250.1.213.1.4.10", ""))] == ["279035121518989"]
    assert [i.value for i in registry.owner("accession", "ACC1") or []] == ["IPP0001", "279035121518989"]

    registry.forget("IPP0001")  # the operator, after the message came
    registry.rebuild([(7, received, [patient(ipp, "279035121518989")])], "ris-orders")
    assert registry.known(Pair("IPP0001", "", "", "1.2.250.1.213.1.4.10", "")) == []
    # An identity source's correction (recorded), then the older order replayed: the owner takes the new INS.
    update = model.PatientUpdate(patient=patient(ipp, OTHER_INS).patient, authoritative=True)
    registry.record([update])
    registry.rebuild([(8, received, [order])], "ris-orders")
    assert [p.ins for p in registry.known(Pair("IPP0001", "", "", "1.2.250.1.213.1.4.10", ""))] == [OTHER_INS]
    assert [i.value for i in registry.owner("accession", "ACC1") or []] == ["IPP0001", OTHER_INS]
    registry.close()


async def test_a_merged_ipp_takes_its_survivors_ins_as_the_identity_system_last_gave_it(sourced: Runtime) -> None:
    """A08 gives IPP1300 an INS, A40 merges IPP1200 into IPP1300, then the identity system corrects IPP1300's INS:
    an order for IPP1200 without INS lands on IPP1300 with the corrected INS (the merge holds the surviving IPP,
    not the INS it had then)."""
    runtime = sourced
    registry = runtime.channel("ris-orders").identities
    first = adt(ins="279035121518989", control="MSG1301").replace(b"IPP0001^", b"IPP1300^")
    assert ack_code((await send(runtime, first))[0]) == "AA"
    merge = fixture("adt_a40_merge.hl7").replace(b"MSG0030", b"MSG1302").replace(b"IPP0009^", b"IPP1300^")
    assert ack_code((await send(runtime, merge.replace(b"MRG|IPP0001^", b"MRG|IPP1200^")))[0]) == "AA"
    corrected = adt(ins=OTHER_INS, control="MSG1303").replace(b"IPP0001^", b"IPP1300^")
    assert ack_code((await send(runtime, corrected))[0]) == "AA"

    order = order_with_ipp_only().replace(b"IPP0001^", b"IPP1200^").replace(b"MSG0001", b"MSG1304")
    (ack,) = await send(runtime, order)
    assert ack_code(ack) == "AA"
    assert runtime.journal is not None
    (entry,) = runtime.journal.recent(1)
    assert "patient IPP1200 (CHU-LYON) was merged into IPP1300 (CHU-LYON)" in entry.warnings
    await until(lambda: registry.owner("accession", "ACC0001") is not None)
    assert [i.value for i in registry.owner("accession", "ACC0001") or []] == ["IPP1300", OTHER_INS]
    # The old INS is no one's now; the corrected one is IPP1200's (IPP1300's) too.
    old = order.replace(b"&ISO^PI|", b"&ISO^PI" + PID3_INS + b"|").replace(b"MSG1304", b"MSG1305")
    assert b"279035121518989" in old
    assert ack_code((await send(runtime, old))[0]) == "AE"
    new = old.replace(b"279035121518989", OTHER_INS.encode()).replace(b"MSG1305", b"MSG1306")
    assert ack_code((await send(runtime, new))[0]) == "AA"


async def test_two_ipps_of_one_authority_never_share_an_ins_until_merged(tmp_path: Path) -> None:
    """IPP0810 and IPP0910 of CHU-LYON are two patients: a message giving IPP0910 the INS IPP0810 holds is refused
    (AE, PID-3), be it a report or an order; once the identity system merged them, IPP0910's messages are
    IPP0810's."""
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        registry = runtime.channel("ris-orders").identities
        order = fixture("orm_o01_nw_latin1.hl7").replace(b"IPP0001^", b"IPP0810^")
        assert ack_code((await send(runtime, order))[0]) == "AA"
        report = fixture("oru_r01_report.hl7").replace(b"IPP0001^", b"IPP0910^")
        for old in (b"PLC0001", b"FIL0001", b"ACC0001"):
            report = report.replace(old, old[:3] + b"0910")
        (refused,) = await send(runtime, report)
        assert ack_code(refused) == "AE"
        reason = hl7.unescape(refused.segment("ERR").field(8))  # type: ignore[union-attr]
        assert reason.startswith("identity conflict: INS already belongs to another IPP of this authority")
        assert "merge them in the patient identity system first" in reason
        assert runtime.journal is not None
        (entry,) = runtime.journal.recent(1)
        assert entry.status == "rejected" and entry.error.startswith("PID-3: identity conflict")
        assert registry.known(Pair("IPP0910", "", "", "1.2.250.1.213.1.4.10", "")) == []
        second = order.replace(b"IPP0810^", b"IPP0910^").replace(b"0001", b"0911")  # its own numbers
        second = second.replace(b"20261125.1^", b"20261125.911^")
        assert ack_code((await send(runtime, second))[0]) == "AE"
        assert ack_code((await send(runtime, second.replace(PID3_INS, b"")))[0]) == "AA"  # without INS: its own

        merge = fixture("adt_a40_merge.hl7").replace(b"MSG0030", b"MSG0912").replace(b"IPP0009^", b"IPP0810^")
        assert ack_code((await send(runtime, merge.replace(b"MRG|IPP0001^", b"MRG|IPP0910^")))[0]) == "AA"
        assert ack_code((await send(runtime, report.replace(b"REP0001", b"REP0913")))[0]) == "AA"
    finally:
        await runtime.stop()


def test_an_ins_reserved_for_an_ipp_is_refused_to_another_of_its_authority(tmp_path: Path) -> None:
    """Two messages in flight giving one INS to two IPPs of one authority: the second is refused; an IPP of
    another authority with that INS is not concerned."""
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    registry.check([patient(model.Identifier("IPP0810", "CHU-LYON"), "279035121518989")])
    with pytest.raises(MappingFailure, match="INS already belongs to another IPP of this authority"):
        registry.check([patient(model.Identifier("IPP0910", "CHU-LYON"), "279035121518989")])
    registry.check([patient(model.Identifier("HX10910", "HOP"), "279035121518989")])
    registry.close()


def test_two_orders_in_flight_never_give_one_exam_to_two_patients(tmp_path: Path) -> None:
    """`check_order`: an order's keys are held for its patient from its check to its record; another patient's
    order naming them meanwhile is refused, the same patient's goes through; released, they hold nothing."""
    registry = PatientIdentities(tmp_path / "patients.sqlite")

    def order(ipp: str, accession: str) -> model.ImagingOrder:
        found = patient(model.Identifier(ipp, "CHU-LYON"))
        found.accession_number = model.Identifier(accession)
        return found

    first = order("IPP1000", "ACC1000")
    registry.check_order([first])  # in flight: its journal write not done
    with pytest.raises(MappingFailure, match="accession number ACC1000 belongs to patient IPP1000") as refused:
        registry.check_order([order("IPP1100", "ACC1000")])
    assert refused.value.location == "PID-3" and "IPP1100 (CHU-LYON)" in refused.value.reason
    again = order("IPP1000", "ACC1000")
    registry.check_order([again])
    registry.release([again])
    registry.record([first])  # journaled: the owner is recorded
    with pytest.raises(MappingFailure, match="patient identity system"):
        registry.check_order([order("IPP1100", "ACC1000")])
    refused_later = order("IPP1100", "ACC1101")
    registry.check_order([refused_later])  # a key no one owns
    registry.release([refused_later])  # not accepted after all: another patient may take it
    registry.check_order([order("IPP1200", "ACC1101")])
    registry.close()
