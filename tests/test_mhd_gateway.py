"""traboule's /fhir as a regional sharing gateway uses it: an IHE MHD Document Responder (ITI-67 Find Document
References, ITI-68 Retrieve Document) following the French PDSm profile.

A day of reports is published through the real engine (MLLP ORU^R01, as a RIS sends them): three patients, a report
corrected (two versions), a PDF report with masking instructions, a report deleted. Then the whole ITI-67 parameter
table is run by GET and by POST ``_search``, in JSON and in XML; ITI-68 retrieves the bytes (406 for an Accept it
cannot satisfy, 404 once deleted); unknown parameters are ignored (lenient) or refused (strict); the errors are
OperationOutcomes. Every served resource is validated with the fhir.resources R4B models, and the PDSm / MHD
constraints those models cannot check (cardinalities, value sets, slices, contained references) are checked here,
each with the profile's text it comes from. The DocumentReference agrees with the XDS metadata the DMP gets
(`traboule.translate.xds_metadata.document_entry` of the same document)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

from tests.conftest import SHARED
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_reports import report_of, study
from traboule import model
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.formats.fhir_xml import to_xml
from traboule.model import Envelope
from traboule.stores.fhir_store import FHIRStore
from traboule.translate.cda import read_header
from traboule.translate.document_ids import entry_uuid
from traboule.translate.fhir_mapping import is_deleted
from traboule.translate.xds_metadata import MetadataSettings, document_entry

PDSM = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-comprehensive-document-reference"
MHD = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/IHE.MHD.Comprehensive.DocumentReference"
IS_DELETED = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-ext-is-deleted"
TRE_A07 = "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.10"
FHIR_NS = "{http://hl7.org/fhir}"


def ins(nir13: str) -> str:
    """A NIR with its check key (97 - NIR mod 97): the engine refuses an INS whose key is wrong."""
    return f"{nir13}{97 - int(nir13) % 97:02d}"


# The day: (label, fixture, substitutions). Patient A is the fixtures' (INS 279035121518989).
A = {"ins": "279035121518989"}
B = {"ins": ins("1850769123456"), "ipp": "IPP0002", "family": "LEROUX", "given": "Paul"}
C = {"ins": ins("2920133123457"), "ipp": "IPP0003", "family": "NGUYEN", "given": "Linh"}
assert ins("2790351215189") == A["ins"]


def oru(name: str, control: str, patient: dict[str, str], accession: str, created: str, **more: str) -> bytes:
    """A fixture ORU^R01 for another control id, patient, accession number, report time (OBR-22), author."""
    text = fixture(name).decode()
    text = re.sub(r"\|REP\d{4}\|", f"|{control}|", text, count=1)
    if "ipp" in patient:
        text = text.replace("IPP0001", patient["ipp"]).replace("279035121518989", patient["ins"])
        text = text.replace("DUPONT^Hélène^Marie", f"{patient['family']}^{patient['given']}")
        text = text.replace("MARTIN^Hélène^Hélène Marie", f"{patient['family']}^{patient['given']}^{patient['given']}")
    for old in ("ACC0001", "ACC0002"):
        text = text.replace(old, accession)
    for old in ("PLC0001", "PLC0002"):
        text = text.replace(old, f"PLC{accession[3:]}")
    for old in ("FIL0001", "FIL0002"):
        text = text.replace(old, f"FIL{accession[3:]}")
    text = text.replace("|20261125111000|", f"|{created}|")
    if "exam" in more:
        text = text.replace("|20261125093512|", f"|{more['exam']}|")
    if "ended" in more:  # OBR-8, the exam's end
        segments = text.split("\r")
        for n, segment in enumerate(segments):
            if segment.startswith("OBR|"):
                fields = segment.split("|")
                fields[8] = more["ended"]
                segments[n] = "|".join(fields)
        text = "\r".join(segments)
    if "author" in more:
        text = text.replace("801234567890&BIDEAULT&Jacques", more["author"])
    for row in more.get("masks", "").split():
        text += f"\rOBX|9|CWE|{row}^{row}^MetaDMPMSS||Y^^expandedYes-NoIndicator||||||F"
    return text.encode()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, dict[str, dict[str, Any]]]]:
    """The engine with its FHIR API after a day of reports; the DocumentReferences by label."""
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}  # the CDA validation has its own tests (test_reports)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", timeout=10) as client:
            yield runtime, client, await publish_day(runtime)
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def publish_day(runtime: Runtime) -> dict[str, dict[str, Any]]:
    store: FHIRStore = runtime.channel("fhir").store  # type: ignore[attr-defined]
    assert [ack_code(a) for a in await send(runtime, fixture("orm_o01_nw_latin1.hl7"))] == ["AA"]  # ACC0001
    env = Envelope(study())  # its study archived: the report of an ordered exam waits for it
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    await until(lambda: store.count("ImagingStudy") == 1 and store.count("ServiceRequest") == 1)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
    day = [
        ("a1", oru("oru_r01_report.hl7", "REP0101", A, "ACC0001", "20261125111000")),
        (
            "b1",
            oru(
                *("oru_r01_pdf.hl7", "REP0102", B, "ACC0102", "20261125141000"),
                exam="20261125133000",
                ended="20261125135000",
                author="801234567891&LÉGER&Anne",
                masks="MASQUE_PS INVISIBLE_PATIENT",
            ),
        ),
        ("a2", oru("oru_r01_report_corrected.hl7", "REP0103", A, "ACC0001", "20261125111000")),
        (
            "c1",
            oru("oru_r01_pdf.hl7", "REP0104", C, "ACC0104", "20261125160000", author="801234567892&MOREAU&Jacques"),
        ),
    ]
    for label, message in day:
        before = store.count("DocumentReference")
        assert ack_code((await send(runtime, message))[0]) == "AA", label
        await until(lambda before=before: store.count("DocumentReference") == before + 1)
    c1 = _only(store, "ACC0104")
    deletion = oru("oru_r01_report_deleted.hl7", "REP0105", C, "ACC0104", "20261125160000")
    assert ack_code((await send(runtime, deletion))[0]) == "AA"
    await until(lambda: is_deleted(store.get("DocumentReference", c1["id"]) or {}))
    found = {label: _only(store, acc, n) for label, acc, n in (("a1", "ACC0001", 0), ("a2", "ACC0001", 1))}
    found |= {"b1": _only(store, "ACC0102"), "c1": store.get("DocumentReference", c1["id"]) or {}}
    return found


def _only(store: FHIRStore, accession: str, index: int = 0) -> dict[str, Any]:
    _, found = store.search("DocumentReference", {"related": accession}, 10, 0)
    if not found:  # a deleted entry is found by no search
        raise AssertionError(f"no DocumentReference for {accession}")
    return found[index]


# -- what fhir.resources cannot check: the MHD Comprehensive and PDSm constraints ----------------------------------


def j231_codes() -> set[str]:
    """JDV_J231 (referenceIdList identifier types the DMP allows), from the CI-SIS value set when it is at hand."""
    path = SHARED / "standards/ans-testcontenucda/jeuxDeValeurs/JDV_J231_XdsTypesIdentifiantsReferenceId_DMP.xml"
    if not path.exists():
        return {"urn:ihe:iti:xds:2013:accession", "urn:ihe:iti:xds:2013:order", "urn:ihe:iti:xds:2016:studyInstanceUID"}
    tree = etree.parse(str(path))
    return {c.get("code") for c in tree.iter("{urn:ihe:iti:svs:2008}Concept")}


def j08_visibility() -> set[str]:
    """The masking codes of JDV_J08 (OID 1.2.250.1.213.1.1.4.13), the same as TRE_A07 / JDV_J110 in PDSm."""
    path = SHARED / "standards/ans-testcontenucda/jeuxDeValeurs/JDV_J08_XdsConfidentialityCode_CISIS.xml"
    if not path.exists():
        return {"MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REPRESENTANTS_LEGAUX"}
    tree = etree.parse(str(path))
    concepts = tree.iter("{urn:ihe:iti:svs:2008}Concept")
    return {c.get("code") for c in concepts if c.get("codeSystem") == "1.2.250.1.213.1.1.4.13"}


def validate(resource: dict[str, Any]) -> None:
    """fhir.resources (R4B models: the same as R4 for every type served here), entries and contained too."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    for entry in resource.get("entry") or []:
        validate(entry["resource"])


def check_document_reference(doc: dict[str, Any], base: str) -> None:
    """The constraints of PDSm_ComprehensiveDocumentReference (ANS PDSm 3.1.0, parent IHE MHD 4.2
    ComprehensiveDocumentReference) that the base FHIR model does not carry."""
    validate(doc)
    assert doc["meta"]["profile"] == [PDSM, MHD]
    # MHD: "masterIdentifier 1..1" (DocumentEntry.uniqueId); "identifier 1..*", the entryUUID with use official.
    assert doc["masterIdentifier"]["value"]
    (entry_uuid,) = [i for i in doc["identifier"] if i.get("use") == "official"]
    assert entry_uuid["system"] == "urn:ietf:rfc:3986"
    uuid5 = r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid5, entry_uuid["value"])
    # MHD ComprehensiveDocumentReference: "docStatus 0..0" (XDS has no equivalent).
    assert "docStatus" not in doc
    assert doc["status"] in ("current", "superseded")
    # PDSm: "contained 1.. // author is mandatory", "author 1..", "custodian 1..", "date 1..", "subject 1..1".
    contained = {f"#{c['id']}": c for c in doc["contained"]}
    assert len(contained) == len(doc["contained"])  # ids unique
    assert doc["author"] and doc["custodian"] and doc["date"] and doc["subject"]["reference"].startswith("Patient/")
    # PDSm: "author only Reference(AsPractitioner or AsPractitionerRole or Device or FRCorePatient)";
    # "authenticator only Reference(AsPractitioner or AsPractitionerRole or AsOrganization)"; MHD: contained.
    for ref, allowed in [(a, {"Practitioner", "PractitionerRole", "Device", "Patient"}) for a in doc["author"]] + [
        (doc["authenticator"], {"Practitioner", "PractitionerRole", "Organization"}),
        (doc["custodian"], {"Organization"}),
    ]:
        assert contained[ref["reference"]]["resourceType"] in allowed
    # FHIR dom-3: every contained resource is referenced from elsewhere in the resource.
    text = str({k: v for k, v in doc.items() if k != "contained"}) + str(doc["contained"])
    for ref, resource in contained.items():
        assert text.count(f"'{ref}'") >= 1, ref
        if resource["resourceType"] == "Practitioner":  # the RPPS (FR Core system) beside the idNat_PS
            systems = {i["system"]: i["value"] for i in resource["identifier"]}
            assert systems["urn:oid:1.2.250.1.71.4.2.1"] == "8" + systems["http://rpps.fr"]
            assert re.fullmatch(r"[0-9]{11}", systems["http://rpps.fr"])
        if resource["resourceType"] == "Organization":  # idNat_Struct 1 + FINESS (FR Core system)
            systems = {i["system"]: i["value"] for i in resource["identifier"]}
            assert systems["urn:oid:1.2.250.1.71.4.2.2"] == "1" + systems["http://finess.sante.gouv.fr"]
    # PDSm securityLabel slices: "confidentiality 1..1" from v3-ConfidentialityClassification (required),
    # "visibilityStatus 0..*" from JDV_J110-StatutVisibiliteDocument-CISIS (required, TRE_A07); nothing else here.
    codings = [c for label in doc["securityLabel"] for c in label["coding"]]
    confidentiality = [c for c in codings if c["system"] == CONFIDENTIALITY]
    assert len(confidentiality) == 1 and confidentiality[0]["code"] in {"U", "L", "M", "N", "R", "V"}
    visibility = [c for c in codings if c["system"] == TRE_A07]
    assert {c["code"] for c in visibility} <= j08_visibility() and len(codings) == 1 + len(visibility)
    # PDSm content: "attachment.size 1..", "attachment.hash 1.." (SHA-1), "attachment.title 1..", language fr-FR;
    # "url ... dans le cas de la recherche, l'URL permettant d'accéder au document"; format from TRE_A11 (J10).
    (content,) = doc["content"]
    attachment = content["attachment"]
    assert attachment["size"] > 0 and len(base64.b64decode(attachment["hash"])) == 20 and attachment["title"]
    assert attachment["language"] == "fr-FR" and attachment["url"].startswith(f"{base}/Binary/")
    assert attachment["creation"] and content["format"]["system"] == "urn:oid:1.3.6.1.4.1.19376.1.2.3"
    # PDSm context: "period 1..", "period.start 1.."; sourcePatientInfo "Référence vers la ressource Patient
    # titulaire du dossier" (the subject); facilityType from TRE_R02 (1.2.250.1.71.4.2.4), practiceSetting J04.
    context = doc["context"]
    assert context["period"]["start"]
    if "end" in context["period"]:  # the exam's end (OBR-8, else its MPPS), never before its start
        assert datetime.fromisoformat(context["period"]["end"]) >= datetime.fromisoformat(context["period"]["start"])
    assert context["sourcePatientInfo"] == doc["subject"]
    assert context["facilityType"]["coding"][0]["system"] == "urn:oid:1.2.250.1.71.4.2.4"
    assert context["practiceSetting"]["coding"][0]["system"] == "urn:oid:1.2.250.1.213.1.1.4.9"
    # PDSm context.related[referenceIdList]: "identifier.value 1..1", "identifier.system 0..1",
    # "identifier.type.coding.system = urn:ietf:rfc:3986", code studyInstanceUID | order | accession (JDV_J231).
    reference_ids = [r["identifier"] for r in context["related"] if "identifier" in r]
    assert reference_ids
    for ident in reference_ids:
        (coding,) = ident["type"]["coding"]
        assert coding["system"] == "urn:ietf:rfc:3986" and coding["code"] in j231_codes() and ident["value"]
        if coding["code"].endswith("studyInstanceUID"):  # "ce champs n'est pas présent ... studyInstanceUID"
            assert "system" not in ident
    # PDSm: relatesTo "Cardinalité contrainte à [1..1] lorsque le flux ... correspond au remplacement".
    assert len(doc.get("relatesTo", [])) <= 1
    for relation in doc.get("relatesTo", []):
        assert relation["code"] == "replaces" and relation["target"]["reference"].startswith("DocumentReference/")


# -- the tests ------------------------------------------------------------------------------------------------------

Gateway = tuple[Runtime, httpx.AsyncClient, dict[str, dict[str, Any]]]


async def find(client: httpx.AsyncClient, params: dict[str, str], how: str = "GET") -> tuple[set[str], dict[str, Any]]:
    """ITI-67 by GET or by POST ``_search`` (form body): the ids found and the Bundle."""
    if how == "GET":
        response = await client.get("/DocumentReference", params=params)
    else:
        response = await client.post("/DocumentReference/_search", data=params)
    assert response.status_code == 200, (params, how, response.text)
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = response.json()
    validate(bundle)
    assert bundle["type"] == "searchset" and bundle["total"] == len(bundle.get("entry", []))
    return {e["resource"]["id"] for e in bundle.get("entry", [])}, bundle


async def test_the_whole_iti67_parameter_table_by_get_and_post(gateway: Gateway) -> None:
    _, client, day = gateway
    base = str(client.base_url).rstrip("/")
    a1, a2, b1, c1 = (day[k]["id"] for k in ("a1", "a2", "b1", "c1"))
    patient_a = day["a2"]["subject"]["reference"]
    request = next(r["reference"] for r in day["a2"]["context"]["related"] if "reference" in r)
    entry_uuid = next(i["value"] for i in day["a2"]["identifier"] if i.get("use") == "official")
    master = day["a2"]["masterIdentifier"]
    cur = {"status": "current"}
    table: list[tuple[dict[str, str], set[str]]] = [
        ({"patient.identifier": f"{INS_SYSTEM}|{A['ins']}", **cur}, {a2}),
        ({"patient.identifier": f"{INS_SYSTEM}|{A['ins']}", "status": "superseded"}, {a1}),
        ({"patient.identifier": f"{INS_SYSTEM}|{A['ins']}", "status": "current,superseded"}, {a1, a2}),
        ({"patient.identifier": f"{INS_SYSTEM}|{C['ins']}"}, set()),  # deleted: found by no search (PDSm)
        ({"patient": patient_a, **cur}, {a2}),
        ({"patient": patient_a.split("/")[1], **cur}, {a2}),
        (cur, {a2, b1}),
        ({"status": "entered-in-error"}, set()),
        ({"type": "http://loinc.org|18748-4", **cur}, {a2, b1}),
        ({"type": "http://loinc.org|11528-7", **cur}, set()),
        ({"category": "urn:oid:1.2.250.1.213.1.1.4.1|10", **cur}, {a2, b1}),
        ({"date": "ge2026-11-25T12:00:00+01:00", **cur}, {b1}),
        ({"date": "2026-11-25", **cur}, {a2, b1}),
        ({"creation": "lt2026-11-25T12:00:00+01:00", **cur}, {a2}),
        ({"creation": "2026-11-25T14:10:00+01:00", **cur}, {b1}),
        ({"creation": "2026-11-24", **cur}, set()),
        ({"identifier": entry_uuid}, {a2}),
        ({"identifier": f"urn:ietf:rfc:3986|{entry_uuid}"}, {a2}),
        ({"identifier": f"{master['system']}|{master['value']}"}, {a2}),
        ({"related": "ACC0001", **cur}, {a2}),
        ({"related": "urn:oid:1.2.250.1.999.1.4|ACC0001", **cur}, {a2}),
        ({"related": "PLC0001", **cur}, {a2}),
        ({"related": "1.2.250.1.999.1.2.20261125.1", **cur}, {a2}),
        ({"related": request, **cur}, {a2}),  # a reference search (ServiceRequest/{id})
        ({"related": f"{base}/{request}", **cur}, {a2}),
        ({"related": "ServiceRequest/unknown", **cur}, set()),
        ({"author.family": "bideault", **cur}, {a2}),
        ({"author.family": "BID", **cur}, {a2}),
        ({"author.family": "leger", **cur}, {b1}),  # LÉGER: case and accents ignored (FHIR string search)
        ({"author.given": "ANNE", **cur}, {b1}),
        ({"author.given": "jacques", **cur}, {a2}),  # MOREAU Jacques' report was deleted
        ({"author.given": "Jacques", "author.family": "Léger", **cur}, set()),
        ({"setting": "urn:oid:1.2.250.1.213.1.1.4.9|ETABLISSEMENT", **cur}, {a2, b1}),
        ({"setting": "urn:oid:1.2.250.1.213.1.1.4.9|AMBULATOIRE", **cur}, set()),
        ({"facility": "urn:oid:1.2.250.1.71.4.2.4|SA01", **cur}, {a2, b1}),
        ({"facility": "SA07", **cur}, set()),
        ({"period": "ge2026-11-25T12:00:00+01:00", **cur}, {b1}),
        ({"period": "lt2026-11-25T10:00:00+01:00", **cur}, {a2}),
        ({"period": "2026-11-25", **cur}, {a2, b1}),
        ({"period": "2026-11-26", **cur}, set()),
        ({"event": "http://dicom.nema.org/resources/ontology/DCM|CT", **cur}, {a2}),
        ({"event": "urn:oid:1.2.250.1.213.2.5|ZCQK004", **cur}, {a2, b1}),
        ({"security-label": f"{TRE_A07}|MASQUE_PS", **cur}, {b1}),
        ({"security-label": f"{CONFIDENTIALITY}|N", **cur}, {a2, b1}),
        ({"security-label": "INVISIBLE_REPRESENTANTS_LEGAUX", **cur}, set()),
        ({"format": "urn:oid:1.3.6.1.4.1.19376.1.2.3|urn:ihe:iti:xds-sd:pdf:2008", **cur}, {b1}),
        ({"format": "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013", **cur}, {a2}),
        ({"patient.identifier": f"{INS_SYSTEM}|{B['ins']}", "security-label": "INVISIBLE_PATIENT", **cur}, {b1}),
    ]
    for params, expected in table:
        found, bundle = await find(client, params)
        assert found == expected, (params, found, expected)
        posted, by_post = await find(client, params, "POST")
        assert posted == expected, params
        assert by_post["link"][0]["url"] == bundle["link"][0]["url"]  # self: the same search, as a GET URL
        for entry in bundle.get("entry", []):
            check_document_reference(entry["resource"], base)
            assert entry["fullUrl"] == f"{base}/DocumentReference/{entry['resource']['id']}"
    assert c1 not in {e for _, expected in table for e in expected}
    # a date range is two parameters; several values of one parameter are an OR
    found, _ = await find(client, {"creation": "ge2026-11-25T11:00:00+01:00", **cur})
    assert found == {a2, b1}
    response = await client.get(
        "/DocumentReference",
        params=[("creation", "ge2026-11-25T11:00:00+01:00"), ("creation", "le2026-11-25T12:00"), ("status", "current")],
    )
    assert {e["resource"]["id"] for e in response.json()["entry"]} == {a2}


async def test_unknown_parameters_are_ignored_unless_strict(gateway: Gateway) -> None:
    _, client, day = gateway
    extra = {"_sort": "-date", "_include": "DocumentReference:subject", "_summary": "count", "foo": "1"}
    found, bundle = await find(client, {"status": "current", **extra})
    assert found == {day["a2"]["id"], day["b1"]["id"]}
    self_link = bundle["link"][0]["url"]
    assert "status=current" in self_link and not any(name in self_link for name in extra)
    posted, by_post = await find(client, {"status": "current", **extra}, "POST")
    assert posted == found and by_post["link"][0]["url"] == self_link
    strict = {"Prefer": "handling=strict"}
    for rtype in ("DocumentReference", "ServiceRequest", "Patient", "ImagingStudy", "DiagnosticReport"):
        assert (await client.get(f"/{rtype}", params={"_sort": "x"})).status_code == 200
        refused = await client.get(f"/{rtype}", params={"_sort": "x"}, headers=strict)
        assert refused.status_code == 400 and refused.json()["issue"][0]["expression"] == ["_sort"], rtype
        validate(refused.json())
    refused = await client.post("/DocumentReference/_search", data={"foo": "1"}, headers=strict)
    assert refused.status_code == 400 and refused.json()["issue"][0]["code"] == "not-supported"


async def test_xml_answers(gateway: Gateway) -> None:
    _, client, day = gateway
    params = {"patient.identifier": f"{INS_SYSTEM}|{B['ins']}", "status": "current"}
    _, as_json = await find(client, params)
    by_format = await client.get("/DocumentReference", params={**params, "_format": "xml"})
    by_accept = await client.get("/DocumentReference", params=params, headers={"Accept": "application/fhir+xml"})
    by_post = await client.post("/DocumentReference/_search", data={**params, "_format": "application/fhir+xml"})
    bundle_model = get_fhir_model_class("Bundle")
    for response in (by_format, by_accept, by_post):
        assert response.status_code == 200 and response.headers["content-type"].startswith("application/fhir+xml")
        root = etree.fromstring(response.content)
        assert root.tag == f"{FHIR_NS}Bundle"
        # FHIR XML: primitives as value attributes, arrays as repeated elements, resources inside their container
        assert root.find(f"{FHIR_NS}type").get("value") == "searchset"
        (doc,) = root.findall(f"{FHIR_NS}entry/{FHIR_NS}resource/{FHIR_NS}DocumentReference")
        labels = doc.findall(f"{FHIR_NS}securityLabel")
        assert len(labels) == 3 and labels[1].find(f"{FHIR_NS}coding/{FHIR_NS}code").get("value") == "MASQUE_PS"
        assert doc.find(f"{FHIR_NS}contained/{FHIR_NS}Practitioner/{FHIR_NS}name/{FHIR_NS}family") is not None
        assert doc.find(f"{FHIR_NS}status").get("value") == "current"
        # the same Bundle as the JSON answer (but for the links' _format)
        parsed = bundle_model.model_validate_xml(response.content).model_dump(mode="json")
        expected = bundle_model.model_validate(as_json).model_dump(mode="json")
        parsed.pop("link"), expected.pop("link")
        assert parsed == expected
    read = await client.get(f"/DocumentReference/{day['b1']['id']}", params={"_format": "xml"})
    assert read.status_code == 200 and etree.fromstring(read.content).tag == f"{FHIR_NS}DocumentReference"
    metadata = await client.get("/metadata", headers={"Accept": "application/fhir+xml"})
    assert etree.fromstring(metadata.content).tag == f"{FHIR_NS}CapabilityStatement"
    bad = await client.get(
        "/DocumentReference", params={"date": "2026-13-45"}, headers={"Accept": "application/fhir+xml"}
    )
    assert bad.status_code == 400 and etree.fromstring(bad.content).tag == f"{FHIR_NS}OperationOutcome"
    assert (await client.get("/DocumentReference", params={"_format": "html"})).status_code == 406
    # an extension (the deleted entry's PDSm_IsDeleted): an element with its url, the value[x] inside
    deleted = etree.fromstring(to_xml(day["c1"]))
    (extension,) = deleted.findall(f"{FHIR_NS}extension")
    assert extension.get("url") == IS_DELETED and extension.find(f"{FHIR_NS}valueBoolean").get("value") == "true"
    assert [e.tag for e in deleted][:4] == [f"{FHIR_NS}{t}" for t in ("id", "meta", "contained", "contained")]


def test_a_store_indexed_by_an_older_version_is_reindexed(tmp_path: Path) -> None:
    """New search parameters apply to the documents already published: the index is rebuilt at open."""
    store = FHIRStore(str(tmp_path / "fhir.sqlite"))
    reference = {
        "resourceType": "DocumentReference",
        "id": "d1",
        "status": "current",
        "content": [{"attachment": {"url": "Binary/b1", "creation": "2026-11-25T11:10:00+01:00"}}],
        "context": {"practiceSetting": {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.9", "code": "E"}]}},
    }
    store.upsert(reference)
    store._db.execute("DELETE FROM tokens WHERE name IN ('creation', 'setting')")  # as an older version left it
    store._db.execute("PRAGMA user_version = 1")
    assert store.search("DocumentReference", {"setting": "E"})[0] == 0
    store.close()
    reopened = FHIRStore(str(tmp_path / "fhir.sqlite"))
    assert reopened.search("DocumentReference", {"setting": "E", "creation": "2026-11-25T10:10:00Z"})[0] == 1
    reopened.close()


async def test_retrieve_document(gateway: Gateway) -> None:
    _, client, day = gateway
    for label in ("a1", "a2", "b1"):  # current and superseded versions are retrieved
        attachment = day[label]["content"][0]["attachment"]
        url = f"/{attachment['url']}"  # as stored (Binary/{id}); served absolute
        retrieved = await client.get(url)
        assert retrieved.status_code == 200 and retrieved.headers["content-type"].startswith("text/xml"), label
        assert len(retrieved.content) == attachment["size"]
        assert base64.b64encode(hashlib.sha1(retrieved.content).digest()).decode() == attachment["hash"]
        for accept in ("text/xml", "text/*", "*/*;q=0.1, application/pdf", "text/xml;q=0.5"):
            assert (await client.get(url, headers={"Accept": accept})).status_code == 200, accept
        # MHD ITI-68: "The only MIME type assured to be returned is the MIME type indicated in the
        # DocumentReference"; another one cannot be satisfied (no conversion here): 406.
        for accept in ("application/pdf", "application/json", "text/xml;q=0"):
            refused = await client.get(url, headers={"Accept": accept})
            assert refused.status_code == 406 and refused.json()["resourceType"] == "OperationOutcome", accept
        as_resource = await client.get(url, headers={"Accept": "application/fhir+json"})
        validate(as_resource.json())
        assert base64.b64decode(as_resource.json()["data"]) == retrieved.content
        as_xml = await client.get(url, headers={"Accept": "application/fhir+xml"})
        assert etree.fromstring(as_xml.content).tag == f"{FHIR_NS}Binary"
    # deleted: PDSm "Le document lui-même n'est plus consultable"; MHD ITI-68: 404 for a document not available
    deleted = day["c1"]
    assert is_deleted(deleted) and deleted["status"] == "superseded"
    gone = await client.get(f"/{deleted['content'][0]['attachment']['url']}")
    assert gone.status_code == 404 and gone.json()["issue"][0]["code"] == "not-found"
    read = await client.get(f"/DocumentReference/{deleted['id']}")
    assert read.status_code == 410 and read.json()["issue"][0]["code"] == "deleted"


async def test_errors_are_operation_outcomes(gateway: Gateway) -> None:
    _, client, _ = gateway
    cases = [
        ("GET", "/Nope/1", 404),
        ("GET", "/DocumentReference/unknown", 404),
        ("GET", "/Binary/unknown", 404),
        ("GET", "/Binary?_id=1", 404),  # Binary is read only: no search
        ("GET", "/DocumentReference/1/_history", 404),
        ("GET", "/", 404),
        ("DELETE", "/DocumentReference/1", 405),
        ("PUT", "/DocumentReference", 405),
        ("POST", "/DocumentReference", 405),
        ("PATCH", "/DocumentReference/_search", 405),
        ("POST", "/metadata", 405),
        ("POST", "/Binary/_search", 404),
    ]
    for method, path, status in cases:
        response = await client.request(method, path, data={"a": "b"} if method == "POST" else None)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/fhir+json"), (method, path)
        validate(response.json())
        if status == 405:
            assert response.headers["allow"] == ("POST" if path.endswith("/_search") else "GET, HEAD")
    for name in ("date", "creation", "period"):
        for value in ("2026-13-45", "ge", "2026-02-30T25:61", "٢٠٢٦"):
            bad = await client.get("/DocumentReference", params={name: value})
            assert bad.status_code == 400 and bad.json()["issue"][0]["code"] == "invalid", (name, value)
    wrong_type = await client.post("/DocumentReference/_search", content=b'{"status": "current"}')
    assert wrong_type.status_code == 415 and wrong_type.json()["resourceType"] == "OperationOutcome"
    too_long = await client.post("/DocumentReference/_search", data={"status": "current", "x": "y" * 20_000})
    assert too_long.status_code == 413 and too_long.json()["issue"][0]["code"] == "too-long"
    not_utf8 = await client.post(
        "/DocumentReference/_search",
        content=b"status=\xff",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert not_utf8.status_code == 400


async def test_capability_statement_declares_what_is_served(gateway: Gateway) -> None:
    _, client, _ = gateway
    statement = (await client.get("/metadata")).json()
    validate(statement)
    assert {"json", "xml"} <= set(statement["format"])
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert [i["code"] for i in resources["Binary"]["interaction"]] == ["read"] and "searchParam" not in resources[
        "Binary"
    ]
    assert resources["DocumentReference"]["supportedProfile"] == [PDSM, MHD]
    declared = {p["name"]: p["type"] for p in resources["DocumentReference"]["searchParam"]}
    iti67 = ["patient", "patient.identifier", "status", "type", "category", "date", "identifier", "related"]
    iti67 += ["creation", "author.given", "author.family", "setting", "facility", "period", "event"]
    iti67 += ["security-label", "format"]
    assert set(iti67) <= set(declared) and declared["author.family"] == "string" and declared["related"] == "reference"
    sample = {"token": "x", "reference": "Patient/x", "date": "2026", "string": "x"}
    strict = {"Prefer": "handling=strict"}
    for rtype, resource in resources.items():  # every declared parameter is served (strict: none is refused)
        for param in resource.get("searchParam", []):
            value = sample[param["type"]] if param["name"] != "basedon" else "ServiceRequest/x"
            response = await client.get(f"/{rtype}", params={param["name"]: value}, headers=strict)
            assert response.status_code == 200, (rtype, param, response.text)


async def test_document_reference_agrees_with_the_xds_metadata(gateway: Gateway) -> None:
    """The DMP's DocumentEntry (translate.xds_metadata) and the DocumentReference of the same document version."""
    _, client, day = gateway
    settings = MetadataSettings(source_id="1.2.250.1.999.9")
    assert day["b1"]["context"]["period"] == {"start": "2026-11-25T13:30:00+01:00", "end": "2026-11-25T13:50:00+01:00"}
    assert "end" not in day["a2"]["context"]["period"]  # no OBR-8, no MPPS: the end is unknown
    for label in ("a2", "b1"):
        reference = day[label]
        data = (await client.get(f"/{reference['content'][0]['attachment']['url']}")).content
        header = read_header(data)
        masks = [
            model.Code(c["code"], c.get("display", ""), "1.2.250.1.213.1.1.4.13")
            for label_ in reference["securityLabel"]
            for c in label_["coding"]
            if c["system"] == TRE_A07
        ]
        doc = model.Document(
            id=header.id, content=base64.b64encode(data).decode(), size=len(data), confidentiality=masks
        )
        entry, _ = document_entry(doc, settings, "urn:uuid:00000000-0000-0000-0000-000000000000")
        master = reference["masterIdentifier"]
        unique_id = master["value"].removeprefix("urn:oid:")
        if master["system"] != "urn:ietf:rfc:3986":
            unique_id = f"{master['system'].removeprefix('urn:oid:')}^{master['value']}"
        assert entry.unique_id == unique_id
        # one identity on both sides: the entryUUID the DMP channel registers (uuid5 of the uniqueId)
        (official,) = [i["value"] for i in reference["identifier"] if i.get("use") == "official"]
        assert official == entry_uuid(entry.unique_id)
        # context.period: serviceStartTime / serviceStopTime (the exam's start and end)
        period = reference["context"]["period"]
        assert entry.service_start == _utc_dtm(period["start"])
        assert entry.service_stop == (_utc_dtm(period["end"]) if "end" in period else "")
        attachment = reference["content"][0]["attachment"]
        assert base64.b64decode(attachment["hash"]).hex() == entry.hash and attachment["size"] == entry.size
        assert reference["content"][0]["format"]["code"] == entry.format_code.code
        assert reference["type"]["coding"][0]["code"] == entry.type_code.code
        assert reference["category"][0]["coding"][0]["code"] == entry.class_code.code
        assert reference["context"]["facilityType"]["coding"][0]["code"] == entry.facility_type.code
        assert reference["context"]["practiceSetting"]["coding"][0]["code"] == entry.practice_setting.code
        labels = {c["code"] for label_ in reference["securityLabel"] for c in label_["coding"]}
        assert labels == {c.code for c in entry.confidentiality}
        # referenceIdList (CXi: value^^^&OID&ISO^type) and context.related: the same identifiers
        related = {
            (
                r["identifier"]["value"],
                r["identifier"].get("system", "").removeprefix("urn:oid:"),
                r["identifier"]["type"]["coding"][0]["code"],
            )
            for r in reference["context"]["related"]
            if "identifier" in r
        }
        cxi = set()
        for ref in entry.reference_ids:
            value, _, _, authority, kind = ref.split("^")
            cxi.add((value, authority.split("&")[1] if authority else "", kind))
        assert related == cxi, label
        creation = attachment["creation"]
        assert entry.creation_time == _utc_dtm(creation)
        contained = {f"#{c['id']}": c for c in reference["contained"]}
        practitioner = contained[contained[reference["author"][0]["reference"]]["practitioner"]["reference"]]
        id_nat = next(i["value"] for i in practitioner["identifier"] if i["system"] == "urn:oid:1.2.250.1.71.4.2.1")
        person = entry.authors[0].person.split("^")
        assert (person[0], person[1], person[2]) == (
            id_nat,
            practitioner["name"][0]["family"],
            practitioner["name"][0]["given"][0],
        )


def _utc_dtm(value: str) -> str:
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y%m%d%H%M%S")


async def test_modifiers_chains_and_empty_values_are_refused_not_ignored(gateway: Gateway) -> None:
    """Ignoring a modifier or a chain (lenient handling) would answer every patient's documents: a 400 instead, by
    GET and POST; the chain through ``subject`` and the ``:Patient`` type modifier are the declared
    ``patient.identifier``. An empty value is a 400 too (a string search on "" would match every author)."""
    _, client, day = gateway
    a2 = day["a2"]["id"]
    ins_a = f"{INS_SYSTEM}|{A['ins']}"
    cur = {"status": "current"}
    refused = [
        ({"patient.identifier:missing": "true"}, "not-supported"),
        ({"related:identifier": "ACC0001"}, "not-supported"),
        ({"author.family:exact": "BIDEAULT"}, "not-supported"),
        ({"author.family:contains": "EAU"}, "not-supported"),
        ({"identifier:of-type": "x"}, "not-supported"),
        ({"status:not": "current"}, "not-supported"),
        ({"subject.name": "x"}, "not-supported"),
        ({"_has:Observation:subject:code": "x"}, "not-supported"),
        ({"author.family": ""}, "invalid"),
        ({"author.family": " "}, "invalid"),
        ({"author.family": "bid,"}, "invalid"),
        ({"patient.identifier": ""}, "invalid"),
        ({"related": ""}, "invalid"),
        ({"_id": ""}, "invalid"),
    ]
    for params, code in refused:
        for how in ("GET", "POST"):
            response = (
                await client.get("/DocumentReference", params={**params, **cur})
                if how == "GET"
                else await client.post("/DocumentReference/_search", data={**params, **cur})
            )
            assert response.status_code == 400, (params, how, response.text)
            issue = response.json()["issue"][0]
            assert issue["code"] == code and issue["expression"] == list(params), (params, how)
            validate(response.json())
    for rtype in ("DiagnosticReport", "ServiceRequest", "ImagingStudy"):
        response = await client.get(f"/{rtype}", params={"patient.identifier:missing": "true"})
        assert response.status_code == 400, rtype
    for alias in ("subject.identifier", "patient:Patient.identifier", "subject:Patient.identifier"):
        found, bundle = await find(client, {alias: ins_a, **cur})
        assert found == {a2}, alias
        assert "patient.identifier=" in bundle["link"][0]["url"]
        posted, _ = await find(client, {alias: ins_a, **cur}, "POST")
        assert posted == {a2}, alias
    found, _ = await find(client, {"subject:Patient": day["a2"]["subject"]["reference"].split("/")[1], **cur})
    assert found == {a2}
    (report,) = (await client.get("/DiagnosticReport", params={"subject.identifier": ins_a})).json()["entry"]
    assert report["resource"]["status"] == "amended"
    assert (await client.get("/Patient", params={"subject.identifier": ins_a})).status_code == 400  # not on Patient
    # the parameters that only shape the answer still work beside them
    response = await client.get(
        "/DocumentReference",
        params={"subject.identifier": ins_a, **cur, "_count": "1", "_offset": "0", "_format": "xml"},
    )
    assert response.status_code == 200 and etree.fromstring(response.content).tag == f"{FHIR_NS}Bundle"


async def test_this_servers_absolute_references(gateway: Gateway) -> None:
    """``patient`` / ``subject`` given as an absolute URL of this server: its ``Type/id`` tail is searched."""
    _, client, day = gateway
    base = str(client.base_url).rstrip("/")
    a2, patient_a = day["a2"]["id"], day["a2"]["subject"]["reference"]
    for name in ("patient", "subject"):
        found, bundle = await find(client, {name: f"{base}/{patient_a}", "status": "current"})
        assert found == {a2}, name
        assert f"{base}/{patient_a}" not in bundle["link"][0]["url"]
        found, _ = await find(client, {name: f"{base}/{patient_a},{base}/Patient/unknown", "status": "current"})
        assert found == {a2}, name
    (report,) = (await client.get("/DiagnosticReport", params={"subject": f"{base}/{patient_a}"})).json()["entry"]
    assert report["resource"]["subject"]["reference"] == patient_a
    elsewhere = await client.get("/DocumentReference", params={"patient": f"http://elsewhere.example/fhir/{patient_a}"})
    assert elsewhere.status_code == 400


async def test_answers_never_carry_what_xml_cannot(gateway: Gateway) -> None:
    """Characters XML 1.0 cannot carry in an id or a parameter name: a well-formed XML OperationOutcome (ids that
    are no FHIR id are not looked up nor echoed), never a 500."""
    _, client, _ = gateway
    strict = {"Prefer": "handling=strict"}
    cases = [
        ("/Patient/a%0Bb?_format=xml", {}, 404),
        ("/DocumentReference/a%01b?_format=xml", {}, 404),
        ("/Patient/%EF%BF%BE?_format=xml", {}, 404),
        ("/Binary/a%01b?_format=xml", {}, 404),
        ("/DocumentReference/" + "a" * 65 + "?_format=xml", {}, 404),
        ("/DocumentReference?a%01b=1&_format=xml", strict, 400),
        ("/DocumentReference?a%01b.c=1&_format=xml", {}, 400),
        ("/DocumentReference?date=%01&_format=xml", {}, 400),
        ("/DocumentReference?identifier=%01&_format=xml", {}, 200),
        ("/DocumentReference?identifier=%ED%B3%BF&_format=xml", {}, 200),
        ("/%01?_format=xml", {}, 404),
    ]
    for path, headers, status in cases:
        response = await client.get(path, headers=headers)
        assert response.status_code == status, (path, response.text)
        root = etree.fromstring(response.content)  # well-formed
        assert root.tag == f"{FHIR_NS}{'Bundle' if status == 200 else 'OperationOutcome'}", path
        if status != 200:
            assert b"a\x01b" not in response.content and b"a\x0bb" not in response.content
            for expression in root.findall(f"{FHIR_NS}issue/{FHIR_NS}expression"):  # a name, only when plainly one
                assert re.fullmatch(r"[A-Za-z0-9_.:\-]+", expression.get("value")), path
    unknown = await client.get("/DocumentReference/a%01b")
    assert unknown.status_code == 404 and "a\x01b" not in unknown.text and "\\x01" not in unknown.text
    named = await client.get("/DocumentReference", params={"a\x01b": "1"}, headers=strict)
    assert named.status_code == 400 and "expression" not in named.json()["issue"][0]
    assert (
        to_xml(
            {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid", "diagnostics": "a\x01b\ufffe\udcffc"}],
            }
        ).count("\ufffd".encode())
        == 3
    )
