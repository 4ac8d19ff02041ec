"""FR Core Patient from real PAM-FR messages: HL7 v2 → canonical model → FHIR R4 Patient (hl7.fhir.fr.core 2.1.0).

The FHIR R4 model (fhir.resources R4B: the Patient is the same as R4's) checks the base resource; what it cannot
check (FR Core's cardinalities, slices, value sets and extension URLs) is checked here, each rule quoting the profile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.patient import Patient

from tests.conftest import shared_path
from tests.test_flow import engine_config, fixture, send, until
from traboule import model
from traboule.adapters.fhir_client import FHIRClient, conditional_update, identifier_search
from traboule.app.runtime import Runtime
from traboule.formats import hl7
from traboule.stores.fhir_store import FHIRStore
from traboule.translate.fhir_mapping import FHIRMapping, merge_patient
from traboule.translate.hl7_mapping import HL7InboundMapping
from traboule.translate.mapping import MappingError

CORE = "https://hl7.fr/ig/fhir/core/"
PATIENT_PROFILE = CORE + "StructureDefinition/fr-core-patient|2.1.0"  # the version the checks below follow
INS_PROFILE = CORE + "StructureDefinition/fr-core-patient-ins|2.1.0"
RELIABILITY = CORE + "StructureDefinition/fr-core-identity-reliability"
BIRTH_LIST = CORE + "StructureDefinition/fr-core-patient-birth-list-given-name"
INSEE = CORE + "StructureDefinition/fr-core-address-insee-code"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
V2_0445 = CORE + "CodeSystem/fr-core-cs-v2-0445"
ID_TYPES = CORE + "CodeSystem/fr-core-cs-v2-0203"
COMMUNES = "https://mos.esante.gouv.fr/NOS/TRE_R13-CommuneOM/FHIR/TRE-R13-CommuneOM"
NIR, NIA = "urn:oid:1.2.250.1.213.1.4.8", "urn:oid:1.2.250.1.213.1.4.9"
INS_SLICES = {  # fr-core-patient-ins 2.1.0: system → (type code, use)
    NIR: ("INS-NIR", "official"),
    NIA: ("INS-NIA", "temp"),
    "urn:oid:1.2.250.1.213.1.4.10": ("INS-NIR-TEST", "official"),
    "urn:oid:1.2.250.1.213.1.4.11": ("INS-NIR-DEMO", "official"),
}


@pytest.fixture(scope="module")
def mapping() -> FHIRMapping:
    return FHIRMapping()


def patient_of(name: str) -> model.Patient:
    """The canonical patient of a fixture message, through the inbound mapping (mappings/hl7_inbound.yaml)."""
    (event,) = HL7InboundMapping().map(hl7.parse(hl7.decode(fixture(name)).text))
    assert isinstance(event, model.ImagingOrder | model.PatientUpdate)
    return event.patient


def extensions(resource: dict[str, Any], url: str) -> list[dict[str, Any]]:
    return [e for e in resource.get("extension") or [] if e.get("url") == url]


def codes(ident: dict[str, Any]) -> set[tuple[str, str]]:
    return {(c.get("system", ""), c.get("code", "")) for c in (ident.get("type") or {}).get("coding") or []}


def check_fr_core_patient_ins(patient: dict[str, Any]) -> None:
    """fr-core-patient-ins (2.1.0) and the fr-core-patient rules it inherits, checked on the resource."""
    Patient.model_validate(patient)  # FHIR R4 itself
    assert patient["meta"]["profile"] == [PATIENT_PROFILE, INS_PROFILE]

    # "extension[identityReliability] 1..*" with "extension[identityStatus]" a Coding "from
    # FRCoreValueSetIdentityReliability" (system fr-core-cs-v2-0445); the extension has no value[x] ("value[x] 0..0").
    (reliability,) = extensions(patient, RELIABILITY)
    assert "valueCoding" not in reliability and all(
        set(e) <= {"url", "valueCoding", "valueDate"} for e in reliability["extension"]
    )
    (status,) = [e["valueCoding"] for e in reliability["extension"] if e["url"] == "identityStatus"]
    assert status["system"] == V2_0445 and status["code"] in ("VALI", "QUAL")
    # validationDate / validationMode: a PAM-FR PID carries neither, so none is sent
    assert {e["url"] for e in reliability["extension"]} == {"identityStatus"}

    # "extension[birthPlace] 1..1" (patient-birthPlace, an Address) with ".valueAddress.extension[inseeCode] 1..1":
    # fr-core-address-insee-code, a Coding bound (required) to fr-core-vs-insee-code (TRE-R13-CommuneOM)
    (place,) = extensions(patient, BIRTH_PLACE)
    (insee,) = extensions(place["valueAddress"], INSEE)
    assert insee["valueCoding"]["system"] == COMMUNES and len(insee["valueCoding"]["code"]) == 5
    assert insee["valueCoding"]["code"] != "99999"  # fr-core-3: INSi never sends 99999 for a VALI identity

    # identifier slices: INS-NIR use official, type fr-core-cs-v2-0203#INS-NIR, system urn:oid:1.2.250.1.213.1.4.8;
    # INS-NIA use "= #temp", type #INS-NIA, system urn:oid:1.2.250.1.213.1.4.9; INS-NIR-TEST / -DEMO (.10 / .11)
    # "use = #official"; PI: type v2-0203#PI, "system 1..".
    ins = [i for i in patient["identifier"] if i.get("system") in INS_SLICES]
    assert ins, "fr-core-1: a VALI identity SHALL carry an INS-NIR, INS-NIA, INS-NIR-TEST or INS-NIR-DEMO"
    for ident in ins:
        kind, use = INS_SLICES[ident["system"]]
        assert codes(ident) == {(ID_TYPES, kind)} and ident["value"] and ident["use"] == use
    for ident in patient["identifier"]:
        if ("http://terminology.hl7.org/CodeSystem/v2-0203", "PI") in codes(ident):
            assert ident["system"] and ident["value"] and ident["use"] == "usual"
    # fr-core-2: "only one identifier of type official SHALL be present" (or an INS-NIA temp)
    official_ids = [i for i in patient["identifier"] if i.get("use") == "official"]
    assert len(official_ids) == 1 or any(i["use"] == "temp" for i in ins)

    # "name[officialName] 1..1" (use official): "family 1..1", "given 1..1" (the first given name at birth) and
    # "extension[birth-list-given-name] 1..1" (a string: every given name at birth, space-separated)
    (official,) = [n for n in patient["name"] if n["use"] == "official"]
    assert official["family"] and len(official["given"]) == 1
    (every,) = extensions(official, BIRTH_LIST)
    assert every["valueString"].split()[0] == official["given"][0]
    # "gender 1..1" from fr-core-vs-patient-gender-INS (male | female | unknown); "birthDate 1.."
    assert patient["gender"] in ("male", "female", "unknown") and patient["birthDate"]


def test_a_qualified_ins_identity_follows_fr_core_patient_ins(mapping: FHIRMapping) -> None:
    patient = mapping.patient(patient_of("orm_o01_ins_qualified.hl7"))
    check_fr_core_patient_ins(patient)
    (nir,) = [i for i in patient["identifier"] if i["system"] == NIR]
    assert nir["value"] == "279036912345659"
    assert extensions(patient, BIRTH_PLACE)[0]["valueAddress"]["extension"][0]["valueCoding"]["code"] == "69123"
    names = {n["use"]: n for n in patient["name"]}
    assert (names["usual"]["family"], names["usual"]["given"]) == ("BERNARD", ["Jeanne"])  # PID-5 type D
    assert (names["official"]["family"], names["official"]["given"]) == ("MARTIN", ["Jeanne"])  # PID-5 type L
    assert extensions(names["official"], BIRTH_LIST)[0]["valueString"] == "Jeanne Marie Louise"  # PID-5(L).3
    assert (patient["gender"], patient["birthDate"]) == ("female", "1979-03-15")


def test_the_ans_pam_fr_patient_follows_fr_core_patient_ins(mapping: FHIRMapping) -> None:
    """The PID of an ANS PAM-FR 2.11 ADT (shared corpus, verbatim) in an ADT^A08: PAT-TROIS DOMINIQUE, INS-NIR of
    test, PID-32 VALI, born in 63220."""
    raw = shared_path("corpus", "hl7v2", "ans_ADT_A01_PAMfr_consent-UTF8.er7").read_bytes().decode()
    (pid,) = [s for s in raw.replace("\r", "\n").split("\n") if s.startswith("PID|")]
    header = (
        "MSH|^~\\&|GAM|CHU-X|TRABOULE|CHU-X|20240306111154||ADT^A08^ADT_A01|3975|P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8"
    )
    (update,) = HL7InboundMapping().map(hl7.parse("\r".join([header, "EVN|A08|20240306111154", pid, "PV1|1|I"])))
    patient = mapping.patient(update.patient)
    check_fr_core_patient_ins(patient)
    (official,) = patient["name"]
    assert (official["family"], official["given"]) == ("PAT-TROIS", ["DOMINIQUE"])
    assert extensions(official, BIRTH_LIST)[0]["valueString"] == "DOMINIQUE"
    assert extensions(patient, BIRTH_PLACE)[0]["valueAddress"]["extension"][0]["valueCoding"]["code"] == "63220"
    (ins,) = [i for i in patient["identifier"] if i["system"] == "urn:oid:1.2.250.1.213.1.4.10"]
    assert (ins["value"], ins["use"]) == ("279035121518989", "official")


def test_an_ins_nia_is_a_temporary_identifier(mapping: FHIRMapping) -> None:
    patient = mapping.patient(patient_of("adt_a08_ins_nia.hl7"))
    check_fr_core_patient_ins(patient)
    (nia,) = [i for i in patient["identifier"] if i["system"] == NIA]
    assert (nia["use"], nia["value"]) == ("temp", "185057505607836")
    assert not [i for i in patient["identifier"] if i.get("use") == "official"]  # never official
    (official,) = patient["name"]  # PID-5 type L alone: the birth name, no name in use
    assert (official["use"], official["given"]) == ("official", ["Luis"])


def test_an_ins_c_is_secondary_and_an_ins_nia_is_never_swapped(mapping: FHIRMapping) -> None:
    ins_c = model.Identifier("1234567890123456789012", "ASIP-SANTE-INS-C", "1.2.250.1.213.1.4.2", "INS-C")
    known = patient_of("adt_a08_ins_nia.hl7")
    patient = mapping.patient(dataclasses.replace(known, ids=[*known.ids, ins_c]))
    Patient.model_validate(patient)
    (computed,) = [i for i in patient["identifier"] if i["system"] == "urn:oid:1.2.250.1.213.1.4.2"]
    # FR Core Patient's INS-C slice: "use = #secondary", type fr-core-cs-v2-0203#INS-C
    assert (computed["use"], codes(computed)) == ("secondary", {(ID_TYPES, "INS-C")})
    assert patient["meta"]["profile"] == [PATIENT_PROFILE, INS_PROFILE]
    # an INS-NIA is an INS although temp: another INS-NIA for the same Patient is refused, never swapped
    other = model.Identifier("185057505607935", "", "1.2.250.1.213.1.4.9", "INS")
    later = mapping.patient(dataclasses.replace(known, ids=[known.ids[0], other]))
    merged, refused = merge_patient(patient, later)
    assert [i["value"] for i in refused] == ["185057505607935"]
    assert [i["value"] for i in merged["identifier"] if i["system"] == NIA] == ["185057505607836"]


def test_an_identity_not_qualified_claims_fr_core_patient_only(mapping: FHIRMapping) -> None:
    qualified = patient_of("orm_o01_ins_qualified.hl7")
    for change in ({"identity_status": "PROV"}, {"identity_status": ""}, {"birth_place_code": ""}):
        patient = mapping.patient(dataclasses.replace(qualified, **change))
        Patient.model_validate(patient)
        assert patient["meta"]["profile"] == [PATIENT_PROFILE], change
    provisional = mapping.patient(dataclasses.replace(qualified, identity_status="PROV"))
    (reliability,) = extensions(provisional, RELIABILITY)
    assert reliability["extension"][0]["valueCoding"]["code"] == "PROV"
    # without the list of birth given names the birth name is not an INS one: FR Core Patient only
    no_list = mapping.patient(dataclasses.replace(qualified, birth_given_names=""))
    assert no_list["meta"]["profile"] == [PATIENT_PROFILE] and not extensions(no_list["name"][1], BIRTH_LIST)


def test_a_given_name_in_use_of_its_own_is_a_usual_name(mapping: FHIRMapping) -> None:
    """FR Core: "Le nom utilisé (usual) n'est transmis que s'il est défini"; PID-5 type D with the birth family name
    but another given name in use (prénom utilisé) is one."""
    (update,) = HL7InboundMapping().map(
        hl7.parse(
            hl7.decode(fixture("adt_a08_ins_update.hl7")).text.replace(
                "BERNARD-MARTIN^Jeanne^^^Mme^^D", "MARTIN^Jeannette^^^^^D~MARTIN^Jeanne^Jeanne Marie^^^^L"
            )
        )
    )
    patient = mapping.patient(update.patient)
    assert [(n["use"], n["family"], n["given"]) for n in patient["name"]] == [
        ("usual", "MARTIN", ["Jeannette"]),
        ("official", "MARTIN", ["Jeanne"]),
    ]
    same = mapping.patient(dataclasses.replace(update.patient, name=model.PersonName("MARTIN", "Jeanne")))
    assert [n["use"] for n in same["name"]] == ["official"]  # nothing of its own: no usual name


def test_values_that_are_not_codes_are_left_out(mapping: FHIRMapping) -> None:
    hostile = dataclasses.replace(
        patient_of("orm_o01_ins_qualified.hl7"), birth_place_code="../69123", identity_status="VALI OR 1=1"
    )
    patient = mapping.patient(hostile)
    Patient.model_validate(patient)
    assert not extensions(patient, BIRTH_PLACE) and not extensions(patient, RELIABILITY)
    assert patient["meta"]["profile"] == [PATIENT_PROFILE]
    for place, status in (("69123\n", "VALI\n"), ("6912", "VALI" * 5), ("2C004", "VA LI")):
        again = mapping.patient(dataclasses.replace(hostile, birth_place_code=place, identity_status=status))
        assert "extension" not in again, (place, status)
    corsica = mapping.patient(dataclasses.replace(hostile, birth_place_code="2A004"))
    assert extensions(corsica, BIRTH_PLACE)[0]["valueAddress"]["extension"][0]["valueCoding"]["code"] == "2A004"


def test_a_thinner_message_keeps_the_ins_traits(mapping: FHIRMapping) -> None:
    full = mapping.patient(patient_of("orm_o01_ins_qualified.hl7"))
    update = mapping.patient(patient_of("adt_a08_ins_update.hl7"))  # no PID-32, no INS, no type L name, no BDL
    assert "extension" not in update
    merged, refused = merge_patient(full, update)
    assert refused == []
    check_fr_core_patient_ins(merged)
    assert extensions(merged, RELIABILITY) == extensions(full, RELIABILITY)
    assert extensions(merged, BIRTH_PLACE) == extensions(full, BIRTH_PLACE)
    assert [(n["use"], n["family"]) for n in merged["name"]] == [("usual", "BERNARD-MARTIN"), ("official", "MARTIN")]
    # a later status replaces the known one; a later birth name with its traits keeps the name in use
    later = mapping.patient(dataclasses.replace(patient_of("orm_o01_ins_qualified.hl7"), identity_status="DOUT"))
    again, _ = merge_patient(merged, later)
    assert [e["valueCoding"]["code"] for x in extensions(again, RELIABILITY) for e in x["extension"]] == ["DOUT"]
    assert again["meta"]["profile"] == [PATIENT_PROFILE]
    birth_only = mapping.patient(patient_of("adt_a08_ins_nia.hl7"))
    kept, _ = merge_patient(merged, {**birth_only, "identifier": merged["identifier"]})
    assert [(n["use"], n["family"]) for n in kept["name"]] == [("usual", "BERNARD-MARTIN"), ("official", "GARCIA")]


def test_identifier_uses_are_mapping_data(tmp_path: Path) -> None:
    source = Path(FHIRMapping().path).read_text(encoding="utf-8")
    (tmp_path / "tables").symlink_to(Path(FHIRMapping().path).parent / "tables")
    path = tmp_path / "fhir.yaml"
    path.write_text(source.replace("1.2.250.1.213.1.4.9: temp", "1.2.250.1.213.1.4.9: official"), encoding="utf-8")
    patient = FHIRMapping(path).patient(patient_of("adt_a08_ins_nia.hl7"))
    assert [i["use"] for i in patient["identifier"] if i["system"] == NIA] == ["official"]
    assert patient["meta"]["profile"] == [PATIENT_PROFILE]  # not fr-core-patient-ins 2.1.0's INS-NIA slice
    path.write_text(source.replace("1.2.250.1.213.1.4.9: temp", "1.2.250.1.213.1.4.9: temporary"), encoding="utf-8")
    with pytest.raises(MappingError) as bad:
        FHIRMapping(path)
    line = next(n for n, text in enumerate(source.splitlines(), 1) if "1.2.250.1.213.1.4.9: temp" in text)
    assert f"fhir.yaml:{line}:" in str(bad.value) and "'temporary'" in str(bad.value)
    # a mapping written before the fr_core section: FR Core's systems
    path.write_text(source.split("\nfr_core:")[0], encoding="utf-8")
    check_fr_core_patient_ins(FHIRMapping(path).patient(patient_of("orm_o01_ins_qualified.hl7")))
    path.write_text(source.replace("  insee_code_system:", "  insee_system:"), encoding="utf-8")
    with pytest.raises(MappingError, match="fr_core: unknown key 'insee_system'"):
        FHIRMapping(path)


async def test_a_fhir_server_keeps_the_fr_core_patient_as_sent(fhir_server_url: str, mapping: FHIRMapping) -> None:
    """The FR Core Patient through a real FHIR R4 server (medplum, tests/fhir_server): accepted, and read back with
    its extensions, names, identifiers and profiles."""
    known = patient_of("adt_a08_ins_nia.hl7")
    ipp = dataclasses.replace(known.ids[0], value=f"IPP-{uuid.uuid4().hex[:12]}")  # the server lives for the session
    patient = mapping.patient(dataclasses.replace(known, ids=[ipp, *known.ids[1:]]))
    sent = {k: v for k, v in patient.items() if k != "id"}
    system = patient["identifier"][0]["system"]
    async with FHIRClient(fhir_server_url, timeout=10) as client:
        answer = await client.transaction([conditional_update(sent, identifier_search(system, ipp.value))])
        assert answer["entry"][0]["response"]["status"].startswith("201")
        found = await client.search("Patient", {"identifier": f"{system}|{ipp.value}"})
    (entry,) = found["entry"]
    stored = entry["resource"]
    check_fr_core_patient_ins(stored)
    for key in ("extension", "identifier", "name", "gender", "birthDate"):
        assert stored[key] == patient[key], key


async def test_the_fhir_channel_keeps_the_reliability_an_update_does_not_carry(tmp_path: Path) -> None:
    """An order for a qualified identity, then an ADT^A08 without PID-32 (nor INS, birth name, birthplace): the
    stored Patient keeps the identity status and the INS traits, and still claims fr-core-patient-ins."""
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    await runtime.start()
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]

    def names() -> list[str]:
        return [n["family"] for p in store.search("Patient", {})[1] for n in p.get("name") or []]

    try:
        await send(runtime, fixture("orm_o01_ins_qualified.hl7"))
        await until(lambda: "MARTIN" in names())
        await send(runtime, fixture("adt_a08_ins_update.hl7"))
        await until(lambda: "BERNARD-MARTIN" in names())
        await asyncio.sleep(0.1)
        (patient,) = store.search("Patient", {})[1]
        check_fr_core_patient_ins(patient)
        (reliability,) = extensions(patient, RELIABILITY)
        assert reliability["extension"][0]["valueCoding"]["code"] == "VALI"
        assert patient["meta"]["versionId"] == "2"
    finally:
        await runtime.stop()
