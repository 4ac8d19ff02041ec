"""The DMP / XDS.b destination: a CR d'imagerie's metadata per the CI-SIS (the derived CSV, the ANS sample), the
SOAP/ebRIM against the XDS.b schema, and end to end through the engine to a loopback repository/registry over
mutual TLS: publish (ITI-41), replace (RPLC), delete (ITI-57), a refusal journaled and dead-lettered, an outage
retried."""

from __future__ import annotations

import asyncio
import base64
import csv
import dataclasses
import hashlib
import importlib.metadata
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from signxml import XMLVerifier

from tests.conftest import shared_path
from tests.test_flow import fixture, until
from tests.test_reports import STUDY_UID, V3, check_and_run, report_of, study
from tests.xds_endpoint import PKI, RIM, Received, Reply, XDSEndpoint, make_pki
from traboule import model
from traboule.adapters import xds
from traboule.app.config import Config, ConfigError
from traboule.app.runtime import Runtime
from traboule.formats.xds import DELETED
from traboule.model import Envelope, SharingFlag
from traboule.stores.reports import document_of
from traboule.translate.cda import CDAMapping, DocumentIds
from traboule.translate.document_ids import entry_uuid
from traboule.translate.xds_metadata import (
    Coded,
    MetadataError,
    MetadataSettings,
    StatusUpdate,
    Submission,
    deletion,
    document_entry,
    new_entry_uuid,
    submission,
    submission_set,
)

pytestmark = pytest.mark.timeout(60)

SET_ID = "1.2.250.1.999.1.2.3.4.1"
SOURCE_ID = "1.2.250.1.999.1.1.8121"
SETTINGS = MetadataSettings(source_id=SOURCE_ID)
NOW = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
INS = "279035121518989^^^&1.2.250.1.213.1.4.10&ISO^NH"
AUTHOR = "801234567890^BIDEAULT^Jacques^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"
EXAM_END = "20261125094800"  # OBR-8, Paris time (UTC+1 in November)
REGION = Coded("63337009", "1.2.250.1.213.1.1.5.695", "segment abdominopelvien du tronc")  # JDV_RegionAnatomique
CCAM_DISPLAY = "Scanographie du thorax, de l'abdomen et du pelvis, sans injection de produit de contraste"
INSTITUTION = "Hôpital exemple - Service de radiologie^^^^^&1.2.250.1.71.4.2.2&ISO^IDNST^^^1690781810"


def as_document(report: model.Report, data: bytes, ids: DocumentIds, level: int) -> model.Document:
    """The Document event the reports publisher makes of a CDA."""
    return document_of(CDAMapping(), report, data, ids, level=level)


def level3(version: int = 1, **report_changes: Any) -> model.Document:
    name = "oru_r01_report.hl7" if version == 1 else "oru_r01_report_corrected.hl7"
    report = report_of(fixture(name))
    report.study_instance_uid = STUDY_UID
    for key, value in report_changes.items():
        setattr(report, key, value)
    replaces = f"{SET_ID}.{version - 1}" if version > 1 else ""
    ids = DocumentIds(f"{SET_ID}.{version}", SET_ID, version, replaces)
    return as_document(report, CDAMapping().build(report, ids, study()), ids, 3)


def level1() -> model.Document:
    report = report_of(fixture("oru_r01_pdf.hl7"))
    ids = DocumentIds("1.2.250.1.999.1.2.3.4.2.1", "1.2.250.1.999.1.2.3.4.2")
    return as_document(report, CDAMapping().build(report, ids), ids, 1)


# -- metadata --------------------------------------------------------------------------------------------------


def test_level3_document_entry_carries_every_attribute_of_a_cr_img() -> None:
    doc = level3()
    uuid = entry_uuid(doc.id)  # what the channel gives it: stable, derived from the uniqueId
    entry, data = document_entry(doc, SETTINGS, uuid)
    assert data == base64.b64decode(doc.content)
    assert entry.entry_uuid == uuid and entry.unique_id == doc.id
    assert (entry.hash, entry.size) == (hashlib.sha1(data).hexdigest(), len(data)) == (doc.sha1, doc.size)
    assert entry.mime_type == "text/xml" and entry.language == "fr-FR"
    assert entry.type_code == Coded("18748-4", "2.16.840.1.113883.6.1", "CR d'imagerie médicale")
    assert entry.class_code == Coded("10", "1.2.250.1.213.1.1.4.1", "Compte rendu")
    assert entry.format_code.code == "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013"
    assert entry.format_code.scheme == "1.3.6.1.4.1.19376.1.2.3"
    assert entry.confidentiality == [Coded("N", "2.16.840.1.113883.5.25", "Normal")]
    assert entry.facility_type == Coded("SA01", "1.2.250.1.71.4.2.4", "Etablissement public de santé")
    assert entry.practice_setting == Coded("ETABLISSEMENT", "1.2.250.1.213.1.1.4.9", "Etablissement de santé")
    # OBR-22 20261125111000 and OBR-7 20261125093512, Paris time (UTC+1 in November) → UTC
    assert (entry.creation_time, entry.service_start, entry.service_stop) == ("20261125101000", "20261125083512", "")
    assert entry.patient_id == INS
    assert entry.source_patient_id == "IPP0001^^^&1.2.250.1.999.1.1&ISO^PI"
    assert entry.source_patient_info == ["PID-5|MARTIN^Hélène^^^^^L", "PID-7|19790328", "PID-8|F"]
    assert entry.legal_authenticator == AUTHOR
    (author,) = entry.authors
    assert author.person == AUTHOR and author.institutions == [INSTITUTION]
    assert author.specialties == ["G15_10/SM44^Médecin - Radio-diagnostic (SM)^1.2.250.1.213.1.1.4.5"]
    assert entry.title == doc.title == "CR d'imagerie médicale - CT thorax, abdomen et pelvis"
    assert entry.reference_ids == [
        "ACC0001^^^&1.2.250.1.999.1.4&ISO^urn:ihe:iti:xds:2013:accession",
        f"{STUDY_UID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",
        "PLC0001^^^&1.2.250.1.999.1.3&ISO^urn:ihe:iti:xds:2013:order",
    ]
    assert entry.event_codes == [  # what a DMP search filters on: act, modality, region (see test_region_...)
        Coded("ZCQK004", "1.2.250.1.213.2.5", CCAM_DISPLAY),
        Coded("CT", "1.2.250.1.213.1.1.5.618", "Tomodensitométrie"),
        REGION,
    ]

    ss = submission_set(entry, doc.report, SETTINGS, now=NOW)
    assert ss.source_id == SOURCE_ID and ss.submission_time == "20261125103000" and ss.patient_id == INS
    assert ss.content_type == Coded("07", "1.2.250.1.213.2.2", "Consultation Soins Externes")  # PV1-2 = O
    assert ss.authors[0].person == AUTHOR and ss.authors[0].institutions == [INSTITUTION]
    assert re.fullmatch(r"2\.25\.\d+", ss.unique_id) and ss.entry_uuid.startswith("urn:uuid:")


def test_every_csv_attribute_of_a_cr_img_is_sent_or_listed_as_not_sent() -> None:
    rows = list(csv.DictReader(shared_path("standards", "derived", "xds_metadata_cr_img_dmp.csv").open()))
    entry, _ = document_entry(level3(), SETTINGS, new_entry_uuid())
    ss = submission_set(entry, level3().report, SETTINGS, now=NOW)
    sent = {
        "mimeType": entry.mime_type,
        "objectType": "stable",  # traboule.adapters.xds writes the stable DocumentEntry objectType
        "uniqueId": entry.unique_id,
        "typeCode": entry.type_code,
        "classCode": entry.class_code,
        "formatCode (CDA level 3 / IMG-CR-IMG 2024.01 body)": entry.format_code,
        "formatCode (CDA level 1 / PDF body)": document_entry(level1(), SETTINGS, new_entry_uuid())[0].format_code,
        "confidentialityCode[1]": entry.confidentiality[0],
        "confidentialityCode[2..n]": "see test_masked_document",
        "healthcareFacilityTypeCode": entry.facility_type,
        "practiceSettingCode": entry.practice_setting,
        "eventCodeList": entry.event_codes,
        "creationTime": entry.creation_time,
        "serviceStartTime / serviceStopTime": entry.service_start,
        "languageCode": entry.language,
        "legalAuthenticator": entry.legal_authenticator,
        "author.authorPerson": entry.authors[0].person,
        "author.authorInstitution": entry.authors[0].institutions,
        "author.authorSpecialty": entry.authors[0].specialties,
        "author.authorRole": "when the CDA has author/functionCode (traboule's CDA has none)",
        "patientId": entry.patient_id,
        "sourcePatientId": entry.source_patient_id,
        "sourcePatientInfo": entry.source_patient_info,
        "title": entry.title,
        "referenceIdList": entry.reference_ids,
        "hash / size": (entry.hash, entry.size),
        "contentTypeCode": ss.content_type,
        "author": ss.authors,
        "sourceId": ss.source_id,
        "uniqueId / submissionTime / title": (ss.unique_id, ss.submission_time),
        "delete": "see test_publish_replace_delete_reach_the_registry",
        "replace": "see test_publish_replace_delete_reach_the_registry",
    }
    not_sent = {"version": "XDS has no such DocumentEntry attribute in ITI-41; ITI-57 metadata updates are not done"}
    expected = {
        r["attribute"]
        for r in rows
        if r["object"] in ("DocumentEntry(CR-IMG)", "SubmissionSet", "Update (ITI-57)", "Replace (ITI-41)")
    }
    assert expected <= set(sent) | set(not_sent), expected - set(sent) - set(not_sent)
    assert all(v for v in sent.values())


def test_level1_pdf_document_has_the_xds_sd_format_code() -> None:
    doc = level1()
    entry, data = document_entry(doc, SETTINGS, new_entry_uuid())
    assert entry.format_code == Coded(
        "urn:ihe:iti:xds-sd:pdf:2008", "1.3.6.1.4.1.19376.1.2.3", entry.format_code.display
    )
    assert entry.mime_type == "text/xml" and entry.type_code.code == "18748-4" and entry.class_code.code == "10"
    assert entry.hash == hashlib.sha1(data).hexdigest() and entry.unique_id == doc.id


def test_masked_document_adds_the_dmp_confidentiality_codes() -> None:
    flags = [
        SharingFlag("MASQUE_PS", "Y"),
        SharingFlag("INVISIBLE_PATIENT", "Y^^expandedYes-NoIndicator"),
        SharingFlag("INVISIBLE_REP_LEGAUX", "Y"),
        SharingFlag("DESTDMP", "Y"),
    ]
    entry, _ = document_entry(level3(sharing=flags), SETTINGS, new_entry_uuid())
    assert [(c.code, c.scheme) for c in entry.confidentiality] == [
        ("N", "2.16.840.1.113883.5.25"),
        ("MASQUE_PS", "1.2.250.1.213.1.1.4.13"),
        ("INVISIBLE_PATIENT", "1.2.250.1.213.1.1.4.13"),
        ("INVISIBLE_REPRESENTANTS_LEGAUX", "1.2.250.1.213.1.1.4.13"),
    ]
    unmasked, _ = document_entry(level3(sharing=[SharingFlag("MASQUE_PS", "N")]), SETTINGS, new_entry_uuid())
    assert [c.code for c in unmasked.confidentiality] == ["N"]


@pytest.mark.parametrize(("klass", "code"), [("I", "03"), ("E", "07"), ("R", "19"), ("", "07"), ("X", "07")])
def test_encounter_class_gives_the_content_type(klass: str, code: str) -> None:
    doc = level3(encounter_class=klass)
    entry, _ = document_entry(doc, SETTINGS, new_entry_uuid())
    assert submission_set(entry, doc.report, SETTINGS).content_type.code == code


def test_documents_that_cannot_make_dmp_metadata_are_refused_with_the_reason() -> None:
    doc = level3()
    with pytest.raises(MetadataError, match="SHA-1"):
        document_entry(model.Document(id=doc.id, content=doc.content, sha1="0" * 40), SETTINGS, new_entry_uuid())
    data = base64.b64decode(doc.content).replace(b'root="1.2.250.1.213.1.4.10"', b'root="1.2.250.1.999.9"')
    with pytest.raises(MetadataError, match="no INS"):
        document_entry(model.Document(id=doc.id, content=base64.b64encode(data).decode()), SETTINGS, new_entry_uuid())
    with pytest.raises(MetadataError, match="replaced entryUUID"):
        submission(level3(2), SETTINGS, new_entry_uuid())
    with pytest.raises(ValueError, match="source_id"):
        MetadataSettings(source_id="not-an-oid")


# -- SOAP / ebRIM / VIHF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("xds-pki"))


@pytest.fixture(scope="session")
def schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(shared_path("standards", "xds", "xds-b-offline.xsd"))))


def vihf_for(entry_patient: str, **changes: Any) -> xds.VIHF:
    return xds.VIHF(
        subject_id="801234567890",
        subject_name="Jacques BIDEAULT",
        structure_id="1690781810",
        secteur_activite="SA01^1.2.250.1.71.4.2.4",
        patient_id=entry_patient,
        roles=[Coded("10", "1.2.250.1.71.1.2.7", "Médecin"), Coded("SM44", "1.2.250.1.71.4.2.5", "Radio-diagnostic")],
        lps_id="TRABOULE-TEST",
        lps_version="0.1.0",
        lps_homologation="HOMOL-TEST",
        **changes,
    )


def de_xop(envelope: bytes, parts: dict[str, bytes]) -> etree._Element:
    body = etree.fromstring(envelope).find(f"{{{xds.SOAP12}}}Body/*")
    assert body is not None
    for include in list(body.iter(f"{{{xds.XOP}}}Include")):
        document = include.getparent()
        document.remove(include)
        document.text = base64.b64encode(parts[include.get("href", "").removeprefix("cid:")]).decode()
    return body


def test_requests_validate_against_the_xds_b_schema_and_carry_a_signed_vihf(pki: PKI, schema: Any) -> None:
    signer = xds.AssertionSigner(pki.seal_cert, pki.seal_key)
    old_uuid = new_entry_uuid()
    replacement: Submission = submission(level3(2), SETTINGS, new_entry_uuid(), replaces=old_uuid)
    request = xds.provide_and_register_request(
        "https://dmp.test/repository", replacement, vihf_for(INS), signer, now=NOW
    )
    (root, envelope), (attachment, content) = xds.split_multipart(request.content_type, request.body)
    assert root["content-type"].startswith("application/xop+xml") and envelope == request.envelope
    assert content == replacement.documents[0].content  # the exact bytes, in binary (not base64)
    body = de_xop(request.envelope, {attachment["content-id"].strip("<>"): content})
    assert schema.validate(body), schema.error_log
    # ebRIM order: Slots first in every registry object (the ANS sample's referenceIdList after its
    # Classifications fails the schema; see shared/standards/xds/README.md)
    for obj in body.iter(f"{{{RIM}}}ExtrinsicObject", f"{{{RIM}}}RegistryPackage"):
        tags = [etree.QName(c).localname for c in obj]
        assert tags == sorted(tags, key=lambda t: t != "Slot"), tags
    (rplc,) = [a for a in body.iter(f"{{{RIM}}}Association") if a.get("associationType") == xds.RPLC]
    assert (rplc.get("sourceObject"), rplc.get("targetObject")) == (replacement.documents[0].entry.entry_uuid, old_uuid)

    delete: StatusUpdate = deletion(level3(2), SETTINGS, old_uuid)
    request = xds.update_document_set_request("https://dmp.test/registry", delete, vihf_for(INS), signer)
    assert xds.split_multipart(request.content_type, request.body)[0][1] == request.envelope
    body = de_xop(request.envelope, {})
    assert schema.validate(body), schema.error_log
    (update,) = body.iter(f"{{{RIM}}}Association")
    assert update.get("associationType") == "urn:ihe:iti:2010:AssociationType:UpdateAvailabilityStatus"
    assert update.get("targetObject") == old_uuid
    slots = {s.get("name"): s.findtext(f".//{{{RIM}}}Value") for s in update.iter(f"{{{RIM}}}Slot")}
    assert slots == {"OriginalStatus": "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved", "NewStatus": DELETED}

    envelope = etree.fromstring(request.envelope)
    assertion = envelope.find(f".//{{{xds.WSSE}}}Security/{{{xds.SAML}}}Assertion")
    assert assertion is not None
    XMLVerifier().verify(assertion, x509_cert=pki.seal_cert.read_text(), id_attribute="ID")
    assertion.find(f".//{{{xds.SAML}}}NameID").text = "899999999999"  # type: ignore[union-attr]
    with pytest.raises(Exception, match=r"[Dd]igest|[Ss]ignature"):
        XMLVerifier().verify(assertion, x509_cert=pki.seal_cert.read_text(), id_attribute="ID")


def test_same_slots_classifications_and_identifiers_as_the_ans_dmp_sample(pki: PKI) -> None:
    """Against ``Validateur XDS/XDS.xml`` (ANS DRIM-M_DATA, an ITI-41 to the DMP test platform). Its DocumentEntry
    is a KOS; the attributes a CR-IMG shares with it must all be there. Deliberate differences are listed."""
    sample = etree.parse(
        str(shared_path("standards", "ans-drim-m-data", "Echantillons validateurs", "Validateur XDS", "XDS.xml"))
    ).getroot()
    signer = xds.AssertionSigner(pki.seal_cert, pki.seal_key)
    ours = etree.fromstring(
        xds.provide_and_register_request(
            "https://dmp.test/repository",
            submission(level3(ended=EXAM_END), SETTINGS, new_entry_uuid()),
            vihf_for(INS),
            signer,
        ).envelope
    )

    def shape(root: etree._Element, tag: str, which: int = 0) -> dict[str, set[str]]:
        obj = list(root.iter(f"{{{RIM}}}{tag}"))[which]
        return {
            "slots": {s.get("name", "") for s in obj.findall(f"{{{RIM}}}Slot")},
            "classifications": {
                c.get("classificationScheme") or c.get("classificationNode", "")
                for c in obj.findall(f"{{{RIM}}}Classification")
            },
            "identifiers": {e.get("identificationScheme", "") for e in obj.findall(f"{{{RIM}}}ExternalIdentifier")},
        }

    theirs_doc, our_doc = shape(sample, "ExtrinsicObject"), shape(ours, "ExtrinsicObject")
    # URI: an XDM/XDR slot, meaningless in ITI-41; submissionTime belongs to the SubmissionSet, not the entry.
    assert theirs_doc["slots"] - our_doc["slots"] == {"URI", "submissionTime"}
    assert our_doc["slots"] - theirs_doc["slots"] == set()
    assert our_doc["classifications"] == theirs_doc["classifications"]  # incl. eventCodeList
    assert our_doc["identifiers"] == theirs_doc["identifiers"]
    assert shape(ours, "RegistryPackage") == shape(sample, "RegistryPackage")
    # Associations: HasMember (SubmissionSetStatus Original) as in the sample; the sample's signature document
    # (Signature01 + "signs") is not produced (see channels/xds.py and the report).
    assert {a.get("associationType") for a in ours.iter(f"{{{RIM}}}Association")} == {xds.HAS_MEMBER}
    assert {a.get("associationType") for a in sample.iter(f"{{{RIM}}}Association")} == {
        xds.HAS_MEMBER,
        "urn:ihe:iti:2007:AssociationType:signs",
    }
    # Value formats as in the sample.
    our_values = {s.get("name"): s.findtext(f".//{{{RIM}}}Value") for s in ours.iter(f"{{{RIM}}}Slot")}
    their_values = {s.get("name"): s.findtext(f".//{{{RIM}}}Value") for s in sample.iter(f"{{{RIM}}}Slot")}
    for name in ("legalAuthenticator", "authorInstitution", "sourcePatientId", "creationTime", "serviceStopTime"):
        assert _format(our_values[name]) == _format(their_values[name]), name
    # VIHF: the sample's attributes, the same names.
    saml = f"{{{xds.SAML}}}"
    names = {a.get("Name") for a in ours.iter(f"{saml}Attribute")}
    assert names == {a.get("Name") for a in sample.iter(f"{saml}Attribute")}
    for header in ("Action", "MessageID", "To"):
        assert ours.find(f".//{{{xds.WSA}}}{header}") is not None


def _format(value: str | None) -> str:
    """A value's shape: its HL7 delimiters (``801234567890^BIDEAULT^…`` ~ ``899700367909^DOC0036790^…``)."""
    return re.sub(r"[\w' .-]+", "x", value or "")


def test_registry_answers_are_read_with_what_a_retry_can_change() -> None:
    ihe = shared_path("standards", "xds", "ihe-iti-info", "examples", "XDS.b")
    answer = xds.read_response(
        200, "application/soap+xml", (ihe / "ProvideAndRegisterDocumentSet-bResponse_SOAP.xml").read_bytes()
    )
    assert answer.status == xds.SUCCESS
    # a CXF MTOM answer as captured at the Swiss EPR projectathon (an HTTP dump: headers, blank line, LF endings)
    raw = shared_path("standards", "xds", "ehealthsuisse-epr-by-example", "samples", "ITI-41_response_raw.xml")
    head, _, body = raw.read_bytes().partition(b"\n\n")
    content_type = next(
        h.partition(b":")[2].strip() for h in head.split(b"\n") if h.lower().startswith(b"content-type")
    )
    assert xds.read_response(200, content_type.decode(), body.replace(b"\n", b"\r\n")).status == xds.SUCCESS

    def failure(*codes: str) -> bytes:
        errors = "".join(
            f'<rs:RegistryError errorCode="{c}" codeContext="why {c}" severity="{xds.ERROR_SEVERITY}"/>' for c in codes
        )
        return (
            f'<s:Envelope xmlns:s="{xds.SOAP12}"><s:Body><rs:RegistryResponse xmlns:rs="{xds.RS}" '
            f'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"><rs:RegistryErrorList>{errors}'
            "</rs:RegistryErrorList></rs:RegistryResponse></s:Body></s:Envelope>"
        ).encode()

    def fault(code: str) -> bytes:
        return (
            f'<e:Envelope xmlns:e="{xds.SOAP12}"><e:Body><e:Fault><e:Code><e:Value>e:{code}</e:Value></e:Code>'
            f'<e:Reason><e:Text xml:lang="en">because</e:Text></e:Reason></e:Fault></e:Body></e:Envelope>'
        ).encode()

    cases = [
        (200, failure("XDSRegistryMetadataError"), False, ["XDSRegistryMetadataError"]),
        (
            200,
            failure("XDSPatientIdDoesNotMatch", "XDSRegistryBusy"),
            False,
            ["XDSPatientIdDoesNotMatch", "XDSRegistryBusy"],
        ),
        (200, failure("XDSRepositoryBusy"), True, ["XDSRepositoryBusy"]),
        (500, fault("Receiver"), True, ["Receiver"]),
        (500, fault("Sender"), False, ["Sender"]),  # a 500 whose fault blames the request: not retried
        (502, b"<html>Bad gateway</html>", True, []),
        (404, b"not here", False, []),
    ]
    for status, body, retryable, codes in cases:
        with pytest.raises(xds.XDSError) as raised:
            xds.read_response(status, "application/soap+xml", body)
        assert (raised.value.retryable, raised.value.codes) == (retryable, codes), body


def test_region_event_code_and_exam_end_reach_the_cda_and_the_metadata(
    pki: PKI, schema: Any, cda_validator: Any
) -> None:
    """The act's anatomical region (tables/cda_acts.csv → the serviceEvent's SNOMED CT translation) is an eventCode
    under JDV_RegionAnatomique_CISIS (the scheme the DRIMbox searches regions by) with its display, beside the CCAM
    act with its display; the exam's end (OBR-8) is the serviceEvent's effectiveTime/high and the serviceStopTime."""
    doc = level3(ended=EXAM_END)
    data = base64.b64decode(doc.content)
    result = cda_validator.validate(data)  # CDA_extended.xsd + the CI-SIS schematrons
    assert result.valid, result.summary()
    event = etree.fromstring(data).find("v3:documentationOf/v3:serviceEvent", V3)
    assert event is not None
    times = [(etree.QName(t).localname, t.get("value")) for t in event.findall("v3:effectiveTime/*", V3)]
    assert times == [("low", "20261125093512+0100"), ("high", "20261125094800+0100")]
    ccam = event.find("v3:code/v3:translation[@codeSystem='1.2.250.1.215.300.1']", V3)
    assert ccam is not None and (ccam.get("code"), ccam.get("displayName")) == ("ZCQK004", CCAM_DISPLAY)
    assert doc.service_stop == "20261125094800+0100"

    entry, _ = document_entry(doc, SETTINGS, new_entry_uuid())
    assert (entry.service_start, entry.service_stop) == ("20261125083512", "20261125084800")  # UTC
    assert entry.event_codes[-1] == REGION and entry.event_codes[0].display == CCAM_DISPLAY
    assert document_entry(doc, dataclasses.replace(SETTINGS, event_codes=False), new_entry_uuid())[0].event_codes == []

    # As ebRIM: schema-valid, one eventCodeList Classification per code, its codingScheme slot and its name.
    signer = xds.AssertionSigner(pki.seal_cert, pki.seal_key)
    sub = submission(doc, SETTINGS, new_entry_uuid())
    request = xds.provide_and_register_request("https://dmp.test/repository", sub, vihf_for(INS), signer, now=NOW)
    body = de_xop(request.envelope, {k: sub.documents[0].content for k in _content_ids(request)})
    assert schema.validate(body), schema.error_log
    (eo,) = body.iter(f"{{{RIM}}}ExtrinsicObject")
    assert slot(eo, "serviceStartTime") == ["20261125083512"] and slot(eo, "serviceStopTime") == ["20261125084800"]
    events = {
        c.get("nodeRepresentation"): (slot(c, "codingScheme"), c.find(f"{{{RIM}}}Name/{{{RIM}}}LocalizedString"))
        for c in eo.iter(f"{{{RIM}}}Classification")
        if c.get("classificationScheme") == xds.DE_EVENT
    }
    assert {code: (scheme, name.get("value")) for code, (scheme, name) in events.items()} == {  # type: ignore[union-attr]
        "ZCQK004": (["1.2.250.1.213.2.5"], CCAM_DISPLAY),
        "CT": (["1.2.250.1.213.1.1.5.618"], "Tomodensitométrie"),
        "63337009": (["1.2.250.1.213.1.1.5.695"], "segment abdominopelvien du tronc"),
    }


def test_an_exam_end_before_its_start_is_left_out() -> None:
    doc = level3(ended="20261125080000")  # before OBR-7 (09:35:12): a sender's error, the start wins
    event = etree.fromstring(base64.b64decode(doc.content)).find("v3:documentationOf/v3:serviceEvent", V3)
    assert event is not None and event.find("v3:effectiveTime/v3:high", V3) is None
    assert doc.service_stop == "" and document_entry(doc, SETTINGS, new_entry_uuid())[0].service_stop == ""


def _content_ids(request: xds.Request) -> list[str]:
    return [h["content-id"].strip("<>") for h, _ in xds.split_multipart(request.content_type, request.body)[1:]]


# -- end to end --------------------------------------------------------------------------------------------------


@pytest.fixture
def endpoint(pki: PKI) -> Iterator[XDSEndpoint]:
    server = XDSEndpoint(pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    try:
        yield server
    finally:
        server.stop()


def channel_config(pki: PKI, endpoint: XDSEndpoint, **extra: Any) -> dict[str, Any]:
    return {
        "name": "dmp",
        "kind": "xds",
        "repository": endpoint.url("/repository"),
        "registry": endpoint.url("/registry"),
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
        "source_id": SOURCE_ID,
        "timeout": 5,
        "vihf": {
            "cert_file": str(pki.seal_cert),
            "key_file": str(pki.seal_key),
            "structure_id": "1690781810",
            "secteur_activite": "SA01^1.2.250.1.71.4.2.4",
            "lps_id": "TRABOULE-TEST",
            "lps_version": "0.1.0",
            "lps_homologation": "HOMOL-TEST",
        },
        **extra,
    }


def test_a_missing_setting_is_a_configuration_error_naming_it(tmp_path: Path, pki: PKI, endpoint: XDSEndpoint) -> None:
    config = channel_config(pki, endpoint)
    del config["vihf"]["structure_id"]
    with pytest.raises(ConfigError, match=r"channel dmp: vihf\.structure_id is needed"):
        Runtime(Config(data_dir=str(tmp_path), channels=[config]))
    config = channel_config(pki, endpoint, cert_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"channel dmp: .*(missing\.pem|No such file)"):
        Runtime(Config(data_dir=str(tmp_path), channels=[config]))


def test_the_vihf_software_identity_is_required(tmp_path: Path, pki: PKI, endpoint: XDSEndpoint) -> None:
    """LPS_ID and LPS_ID_HOMOLOGATION_DMP must be configured (the DMP requires them); LPS_Version defaults to
    traboule's version."""
    for key, attribute in (("lps_id", "LPS_ID"), ("lps_homologation", "LPS_ID_HOMOLOGATION_DMP")):
        config = channel_config(pki, endpoint)
        config["vihf"][key] = ""
        with pytest.raises(ConfigError, match=rf"channel dmp: vihf\.{key} \({attribute}\) is needed"):
            Runtime(Config(data_dir=str(tmp_path), channels=[config]))
    config = channel_config(pki, endpoint)
    del config["vihf"]["lps_id"], config["vihf"]["lps_homologation"]
    with pytest.raises(ConfigError, match=r"vihf\.lps_id \(LPS_ID\), vihf\.lps_homologation .* are needed"):
        Runtime(Config(data_dir=str(tmp_path), channels=[config]))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: c.pop("cert_file"), "channel dmp: cert_file is needed"),
        (
            lambda c: c.update(repository="http://dmp.example.org/repository"),
            "channel dmp: repository must be the https URL",
        ),
        (lambda c: c["vihf"].pop("lps_id"), "channel dmp: vihf.lps_id (LPS_ID) is needed"),
        (lambda c: c["vihf"].pop("lps_homologation"), "vihf.lps_homologation (LPS_ID_HOMOLOGATION_DMP) is needed"),
    ],
)
def test_check_refuses_what_run_refuses_and_says_the_same(
    tmp_path: Path, pki: PKI, endpoint: XDSEndpoint, change: Any, reason: str
) -> None:
    channel = channel_config(pki, endpoint)
    change(channel)
    checked, ran = check_and_run(tmp_path, channel)
    assert checked == ran and reason in checked


@pytest.fixture
async def engine(tmp_path: Path, pki: PKI, endpoint: XDSEndpoint) -> AsyncIterator[Runtime]:
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[channel_config(pki, endpoint, max_attempts=3)]))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def publish(runtime: Runtime, doc: model.Document) -> None:
    env = Envelope(doc, source="test", correlation_id=f"corr-{doc.id}")
    await runtime.bus.publish(f"document.{doc.action}", env.to_json(), message_id=env.id)


async def answered(endpoint: XDSEndpoint, count: int) -> list[Received]:
    await until(lambda: len(endpoint.received) >= count and all(r.answered for r in endpoint.received))
    return endpoint.received


def slot(obj: etree._Element, name: str) -> list[str]:
    found = obj.find(f"{{{RIM}}}Slot[@name='{name}']")
    return [v.text or "" for v in found.iter(f"{{{RIM}}}Value")] if found is not None else []


async def test_publish_replace_delete_reach_the_registry(engine: Runtime, endpoint: XDSEndpoint, pki: PKI) -> None:
    channel = engine.channel("dmp")
    first, second = level3(1), level3(2)
    await publish(engine, first)
    (received,) = await answered(endpoint, 1)
    assert received.errors == [] and received.answered == "success"
    assert received.path == "/repository" and received.action == xds.ITI41
    (entry,) = received.objects("ExtrinsicObject")
    first_uuid = entry.get("id")
    assert received.documents == {first_uuid: base64.b64decode(first.content)}  # the exact CDA bytes
    assert slot(entry, "hash") == [first.sha1] and slot(entry, "size") == [str(first.size)]
    assert channel.entry(first.id).entry_uuid == first_uuid  # type: ignore[attr-defined]
    assert first_uuid == entry_uuid(first.id)  # stable: the entryUUID the MHD DocumentReference carries
    # VIHF: signed by the seal certificate, the author as subject, the patient's INS as the resource
    assert received.signature_valid and received.vihf_subject == "801234567890"
    assert received.vihf["urn:oasis:names:tc:xacml:2.0:resource:resource-id"] == [INS]
    assert received.vihf["urn:oasis:names:tc:xacml:2.0:subject:role"] == ["10", "SM44"]
    assert received.vihf["urn:oasis:names:tc:xspa:1.0:subject:subject-id"] == ["Jacques BIDEAULT"]
    assert received.vihf["Identifiant_Structure"] == ["1690781810"] and received.vihf["VIHF_Version"] == ["3.0"]

    await publish(engine, first)  # a redelivered event: registered already, not sent again
    await publish(engine, second)
    replaced = (await answered(endpoint, 2))[1]
    assert replaced.errors == [] and replaced.answered == "success"
    (new_entry,) = replaced.objects("ExtrinsicObject")
    (rplc,) = [a for a in replaced.objects("Association") if a.get("associationType") == xds.RPLC]
    assert (rplc.get("sourceObject"), rplc.get("targetObject")) == (new_entry.get("id"), first_uuid)
    assert replaced.documents[new_entry.get("id", "")] == base64.b64decode(second.content)
    assert new_entry.get("id") == entry_uuid(second.id) != first_uuid  # a new version, its own entryUUID
    # SubmissionSet and Association ids stay random: every submission is a new one
    (first_set,), (second_set,) = received.objects("RegistryPackage"), replaced.objects("RegistryPackage")
    assert first_set.get("id") != second_set.get("id")
    assert first_set.get("id") not in (entry_uuid(first.id), entry_uuid(second.id))
    associations = [{a.get("id") for a in r.objects("Association")} for r in (received, replaced)]
    assert not associations[0] & associations[1]

    await publish(engine, dataclasses.replace(second, action="delete"))
    deleted = (await answered(endpoint, 3))[2]
    assert deleted.errors == [] and deleted.answered == "success"
    assert deleted.path == "/registry" and deleted.action == xds.ITI57 and deleted.documents == {}
    (update,) = deleted.objects("Association")
    assert update.get("targetObject") == new_entry.get("id")
    assert slot(update, "NewStatus") == ["urn:asip:ci-sis:2010:StatusType:Deleted"]
    assert deleted.signature_valid
    await asyncio.sleep(0.3)
    assert len(endpoint.received) == 3
    assert [channel.entry(d.id).status for d in (first, second)] == ["replaced", "deleted"]  # type: ignore[attr-defined]
    assert await engine.bus.dead_letters("dmp") == []

    # Mutual TLS: a client without the authentication certificate is refused by the endpoint.
    refused = endpoint.refused_handshakes
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=5) as anonymous:
        with pytest.raises((httpx.TransportError, ssl.SSLError)):  # the alert surfaces either way
            await anonymous.post(endpoint.url("/repository"), content=b"<x/>")
    await until(lambda: endpoint.refused_handshakes > refused)
    assert len(endpoint.received) == 3


async def test_the_registry_gets_the_region_the_exam_end_and_the_software_identity(
    tmp_path: Path, pki: PKI, endpoint: XDSEndpoint
) -> None:
    """What the loopback repository captures of a submission: the region event code searchable as the DRIMbox
    searches it, the serviceStopTime, and the VIHF's LPS attributes (LPS_Version: traboule's version by default)."""
    config = channel_config(pki, endpoint)
    del config["vihf"]["lps_version"]
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[config]))
    await runtime.start()
    try:
        await publish(runtime, level3(ended=EXAM_END))
        (received,) = await answered(endpoint, 1)
    finally:
        await runtime.stop()
    assert received.errors == [] and received.answered == "success"  # schema-valid, hash-checked, signed
    (entry,) = received.objects("ExtrinsicObject")
    assert slot(entry, "serviceStopTime") == ["20261125084800"]
    regions = [
        c
        for c in entry.iter(f"{{{RIM}}}Classification")
        if c.get("classificationScheme") == xds.DE_EVENT and slot(c, "codingScheme") == [REGION.scheme]
    ]
    assert [c.get("nodeRepresentation") for c in regions] == [REGION.code]
    assert regions[0].find(f"{{{RIM}}}Name/{{{RIM}}}LocalizedString").get("value") == REGION.display  # type: ignore[union-attr]
    assert received.vihf["LPS_ID"] == ["TRABOULE-TEST"]
    assert received.vihf["LPS_ID_HOMOLOGATION_DMP"] == ["HOMOL-TEST"]
    assert received.vihf["LPS_Version"] == [importlib.metadata.version("traboule")]


async def test_the_dmp_and_the_mhd_gateway_see_one_document_entry(
    tmp_path: Path, pki: PKI, endpoint: XDSEndpoint
) -> None:
    """One engine publishing to the DMP and serving /fhir (MHD): the DocumentReference's entryUUID (identifier, use
    official) is the registered DocumentEntry's id, and its context.period is the entry's service start and stop
    times (the exam's start, OBR-7, and end, OBR-8)."""
    channels = [channel_config(pki, endpoint), {"name": "fhir", "kind": "fhir"}]
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=channels))
    await runtime.start()
    store = runtime.channel("fhir").store  # type: ignore[attr-defined]
    try:
        doc = level3(ended=EXAM_END)
        await publish(runtime, doc)
        (received,) = await answered(endpoint, 1)
        await until(lambda: store.count("DocumentReference") == 1)
        (reference,) = store.search("DocumentReference", {})[1]
    finally:
        await runtime.stop()
    assert received.errors == [] and received.answered == "success"
    (entry,) = received.objects("ExtrinsicObject")
    (official,) = [i for i in reference["identifier"] if i.get("use") == "official"]
    assert official == {"use": "official", "system": "urn:ietf:rfc:3986", "value": entry.get("id")}
    assert entry.get("id") == entry_uuid(doc.id)
    period = reference["context"]["period"]
    assert period == {"start": "2026-11-25T09:35:12+01:00", "end": "2026-11-25T09:48:00+01:00"}
    as_utc = {k: datetime.fromisoformat(v).astimezone(UTC).strftime("%Y%m%d%H%M%S") for k, v in period.items()}
    assert [as_utc["start"], as_utc["end"]] == slot(entry, "serviceStartTime") + slot(entry, "serviceStopTime")


@pytest.mark.parametrize(
    ("reply", "code"),
    [(Reply("failure", "XDSRegistryMetadataError"), "XDSRegistryMetadataError"), (Reply("fault", "Sender"), "Sender")],
)
async def test_a_refusal_is_journaled_and_dead_lettered_after_one_attempt(
    engine: Runtime, endpoint: XDSEndpoint, reply: Reply, code: str
) -> None:
    endpoint.replies.append(reply)
    doc = level3()
    await publish(engine, doc)
    deadline = asyncio.get_running_loop().time() + 10
    while not (dead := await engine.bus.dead_letters("dmp")):
        assert asyncio.get_running_loop().time() < deadline, "not dead-lettered"
        await asyncio.sleep(0.05)
    (letter,) = dead
    assert letter.attempt == 1 and code in letter.headers["x-error"]
    assert len(endpoint.received) == 1 and endpoint.received[0].errors == []
    assert engine.journal is not None
    (entry,) = engine.journal.recent(1, "undelivered")
    assert entry.channel == "dmp" and entry.message_type == "ITI-41" and entry.ack_code == code
    assert entry.peer == endpoint.url("/repository") and code in entry.error
    assert entry.correlation_id == f"corr-{doc.id}"
    sent = etree.fromstring(entry.raw)  # the SOAP envelope that was refused
    assert sent.find(f".//{{{xds.XDSB}}}ProvideAndRegisterDocumentSetRequest") is not None


async def test_a_server_error_is_retried_and_the_document_registered_once(
    engine: Runtime, endpoint: XDSEndpoint
) -> None:
    endpoint.replies.extend([Reply("http", status=500), Reply("fault", "Receiver")])
    doc = level3()
    await publish(engine, doc)
    received = await answered(endpoint, 3)
    assert [r.answered for r in received] == ["http:500", "fault:Receiver", "success"]
    assert all(r.errors == [] for r in received)
    # every attempt sends the same DocumentEntry (the entryUUID of its uniqueId), so it is registered once
    assert {r.objects("ExtrinsicObject")[0].get("id") for r in received} == {entry_uuid(doc.id)}
    await asyncio.sleep(0.3)
    assert len(endpoint.accepted()) == 1 and len(endpoint.received) == 3
    assert engine.channel("dmp").entry(doc.id).status == "registered"  # type: ignore[attr-defined]
    assert await engine.bus.dead_letters("dmp") == []
    assert engine.journal is not None and engine.journal.recent(5, "undelivered") == []


async def test_a_document_not_for_the_dmp_is_not_sent(engine: Runtime, endpoint: XDSEndpoint) -> None:
    await publish(engine, level3(sharing=[SharingFlag("DESTDMP", "N")]))
    await publish(engine, level1())
    (received,) = await answered(endpoint, 1)
    assert received.documents and received.errors == []
    (entry,) = received.objects("ExtrinsicObject")
    assert entry.find(f"{{{RIM}}}Classification[@nodeRepresentation='urn:ihe:iti:xds-sd:pdf:2008']") is not None
    await asyncio.sleep(0.3)
    assert len(endpoint.received) == 1


async def test_a_replacement_arriving_before_its_original_waits_for_it(engine: Runtime, endpoint: XDSEndpoint) -> None:
    first, second = level3(1), level3(2)
    await publish(engine, second)  # its original is still on its way (e.g. in retry): the bus retries it
    await asyncio.sleep(0.1)
    await publish(engine, first)
    received = await answered(endpoint, 2)
    assert [r.errors for r in received] == [[], []]
    original, replacement = sorted(received, key=lambda r: len(r.objects("Association")))
    (rplc,) = [a for a in replacement.objects("Association") if a.get("associationType") == xds.RPLC]
    assert rplc.get("targetObject") == original.objects("ExtrinsicObject")[0].get("id")
    assert await engine.bus.dead_letters("dmp") == []


async def test_a_correction_of_a_document_kept_out_of_the_dmp_is_sent_as_a_first_version(
    engine: Runtime, endpoint: XDSEndpoint
) -> None:
    await publish(engine, level3(sharing=[SharingFlag("DESTDMP", "N")]))
    await publish(engine, level3(2))
    (received,) = await answered(endpoint, 1)
    assert received.errors == [] and received.answered == "success"
    assert not [a for a in received.objects("Association") if a.get("associationType") == xds.RPLC]
    channel: Any = engine.channel("dmp")
    await until(lambda: channel.entry(f"{SET_ID}.2").status == "registered")
    assert await engine.bus.dead_letters("dmp") == []


async def test_an_outage_longer_than_the_bus_backoff_is_waited_out_in_place(
    engine: Runtime, endpoint: XDSEndpoint
) -> None:
    endpoint.replies.extend([Reply("http", status=503)] * 4)  # longer than the 3 bus attempts would last
    await publish(engine, level3())
    await until(lambda: len(endpoint.accepted()) == 1, timeout=40)
    assert [r.answered for r in endpoint.received] == ["http:503"] * 4 + ["success"]
    assert await engine.bus.dead_letters("dmp") == []


async def test_the_tls_table_and_the_tls_defaults_configure_the_dmp_client(
    tmp_path: Path, pki: PKI, endpoint: XDSEndpoint
) -> None:
    """``tls = { cert_file, key_file }`` on the channel, the CA from the ``[tls]`` defaults: the same mutual TLS as
    the older top-level keys."""
    from traboule.tls import TLSSettings

    config = channel_config(pki, endpoint)
    for key in ("ca_file", "cert_file", "key_file"):
        del config[key]
    config["tls"] = {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[config], tls=TLSSettings(ca_file=str(pki.ca))))
    await runtime.start()
    try:
        await publish(runtime, level3(1))
        (received,) = await answered(endpoint, 1)
    finally:
        await runtime.stop()
    assert received.errors == [] and received.answered == "success" and received.signature_valid
