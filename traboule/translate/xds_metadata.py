"""Canonical ``Document`` → IHE XDS.b metadata for the DMP (CI-SIS volet "Partage de documents de santé"): the
DocumentEntry and SubmissionSet of a CR d'imagerie (ITI-41), its replacement (RPLC) and its deletion (ITI-57).

Every DocumentEntry value is read from the CDA the document carries, because the DMP checks that the metadata and
the document agree, and a ready CDA sent by a RIS is published as it is. The values the CDA does not hold come from
the canonical report and the settings:

* the masking codes of the sender's sharing instructions (``Document.confidentiality``, made from the HL7
  ``MetaDMPMSS`` rows by ``mappings/tables/confidentiality.csv``) add confidentialityCodes (1.2.250.1.213.1.1.4.13);
* the encounter class (PV1-2) → SubmissionSet contentTypeCode (TRE_R209, TRV2 mapping I→03, O→07, R→19, N→97,
  E→07);
* the submitting system: ``source_id`` (SubmissionSet.sourceId), the SubmissionSet author (the document's author
  unless configured).

The attributes follow the DMP's CR-IMG DocumentEntry as the CI-SIS volets describe it (type, class, format by CDA
level, confidentiality with masking, facility and practice setting, reference ids). serviceStartTime and
serviceStopTime are the serviceEvent's ``effectiveTime/low`` and ``high`` in UTC. eventCodeList holds what a DMP
search filters on, from the serviceEvent's code translations: the CCAM act (``ccam_scheme``), the modality
(JDV_ModaliteAcquisition_CISIS 1.2.250.1.213.1.1.5.618, as in the ANS DMP sample) and the anatomical region (the
SNOMED CT translation from JDV_RegionAnatomique_CISIS, under that value set's OID 1.2.250.1.213.1.1.5.695: the
scheme the ANS DRIMbox's FindDocuments searches regions by; ``region_scheme``). The metadata made is
`traboule.formats.xds`'s plain values, which ``traboule.adapters.xds`` encodes as ebRIM.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lxml import etree

from traboule import model
from traboule.errors import CDAError, MetadataError
from traboule.formats import hl7
from traboule.formats.xds import (
    Author,
    Coded,
    DocumentEntry,
    StatusUpdate,
    Submission,
    SubmissionSet,
    SubmittedDocument,
)
from traboule.translate.cda import (
    CCAM_OIDS,
    CONFIDENTIALITY_SYSTEM,
    DCM,
    IDNAT_PS,
    IDNAT_STRUCT,
    SNOMED,
    CDAHeader,
    read_header,
)
from traboule.translate.cda import V3 as V3_NAMESPACE

V3 = {"v3": V3_NAMESPACE}

# The DocumentEntry's vocabulary (the MHD DocumentReference of `traboule.translate.fhir_mapping` carries the same).
CLASS_SCHEME = "1.2.250.1.213.1.1.4.1"  # TRE_A03-ClasseDocument-CISIS
FORMAT_SCHEME = "1.3.6.1.4.1.19376.1.2.3"  # TRE_A11-IheFormatCode
CONFIDENTIALITY_SCHEME = CONFIDENTIALITY_SYSTEM  # the CDA's confidentialityCode
MASKING_SCHEME = "1.2.250.1.213.1.1.4.13"  # the masking codes of the sharing instructions (JDV_J08)
CONTENT_TYPE_SCHEME = "1.2.250.1.213.2.2"  # TRE_R209-TypeActivite
MODALITY_SCHEME = "1.2.250.1.213.1.1.5.618"  # JDV_ModaliteAcquisition_CISIS, as in the ANS DMP sample
# JDV_RegionAnatomique_CISIS: the scheme the DRIMbox (ANS PoC, FindDocuments) searches regions by; the CDA
# serviceEvent's region translation is SNOMED CT.
REGION_SCHEME = "1.2.250.1.213.1.1.5.695"

# typeCode → classCode (NOS ASS_X04; 18748-4 → 10 from the DRIMbox PoC and the ANS XDM sample).
CLASS_OF_TYPE = {"18748-4": ("10", "Compte rendu")}
FORMAT_OF_LEVEL = {  # CDA level → formatCode: ASS_A11 (IMG-CR-IMG), ASS_A12 (PDF body)
    3: ("urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013", "CDA Imaging Report with Structured Headings"),
    1: ("urn:ihe:iti:xds-sd:pdf:2008", "Document à corps non structuré en Pdf/A-1"),
}
CONFIDENTIALITY = {"N": "Normal", "R": "Restreint", "V": "Très restreint"}  # JDV_J08
# TRE_R209-TypeActivite displays of the codes TRV2 maps PV1-2 to (NOS JDV_J138 FHIR value set).
ACTIVITY_TYPES = {
    "03": "Hospitalisation complète (non compris hospitalisation de semaine)",
    "04": "Hospitalisation de Jour",
    "07": "Consultation Soins Externes",
    "19": "Traitement et Cure Ambulatoire",
    "97": "Type d'activité indifférencié",
}
CONTENT_TYPE_OF_CLASS = {"I": "03", "O": "07", "R": "19", "N": "97", "E": "07"}  # TRV2 mapping.md

ACCESSION = "urn:ihe:iti:xds:2013:accession"
STUDY = "urn:ihe:iti:xds:2016:studyInstanceUID"
ORDER = "urn:ihe:iti:xds:2013:order"


# -- settings ----------------------------------------------------------------------------------------------------


_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


@dataclass
class MetadataSettings:
    """What the CDA does not say: the submitting system, the encounter class mapping, the local time zone."""

    source_id: str
    content_types: dict[str, Coded] = field(default_factory=dict)  # PV1-2 → contentTypeCode
    default_content_type: str = "O"  # the encounter class assumed when the report gives none
    submission_author: Author | None = None  # None: the document's author
    timezone: tzinfo = field(default_factory=lambda: ZoneInfo("Europe/Paris"))  # CDA times without an offset
    ccam_scheme: str = "1.2.250.1.213.2.5"  # CCAM codingScheme in eventCodeList (NOS OID)
    region_scheme: str = REGION_SCHEME  # anatomical region codingScheme in eventCodeList
    event_codes: bool = True  # CCAM act, modality and anatomical region from serviceEvent in eventCodeList

    def __post_init__(self) -> None:
        if not _OID.match(self.source_id):
            raise ValueError(f"source_id: {self.source_id!r} is not an OID (the submitting system's OID)")
        if not self.content_types:
            self.content_types = {
                k: Coded(v, CONTENT_TYPE_SCHEME, ACTIVITY_TYPES[v]) for k, v in CONTENT_TYPE_OF_CLASS.items()
            }
        if self.default_content_type not in self.content_types:
            raise ValueError(f"default_content_type: {self.default_content_type!r} is not in content_types")
        for key in ("ccam_scheme", "region_scheme"):
            if not _OID.match(getattr(self, key)):
                raise ValueError(f"{key}: {getattr(self, key)!r} is not an OID (an eventCodeList codingScheme)")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MetadataSettings:
        """From a channel's table: ``source_id``, ``content_types`` (``{I = "03"}`` or ``{I = {code, display}}``),
        ``default_content_type``, ``submission_author = {person, institution}``, ``timezone``, ``ccam_scheme``,
        ``region_scheme``, ``event_codes``."""
        types: dict[str, Coded] = {}
        for klass, value in (config.get("content_types") or {}).items():
            if isinstance(value, dict):
                code, display = str(value.get("code", "")), str(value.get("display", ""))
            else:
                code, display = str(value), ""
            display = display or ACTIVITY_TYPES.get(code, "")
            if not code or not display:
                raise ValueError(f"content_types.{klass}: give {{code = ..., display = ...}} for code {code!r}")
            types[str(klass)] = Coded(code, CONTENT_TYPE_SCHEME, display)
        author = config.get("submission_author")
        submission_author = None
        if isinstance(author, dict) and author.get("person"):
            institution = str(author.get("institution", ""))
            submission_author = Author(str(author["person"]), [institution] if institution else [])
        try:
            zone = ZoneInfo(str(config.get("timezone", "Europe/Paris")))
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone: unknown time zone {config.get('timezone')!r}") from exc
        return cls(
            source_id=str(config.get("source_id", "")),
            content_types=types,
            default_content_type=str(config.get("default_content_type", "O")),
            submission_author=submission_author,
            timezone=zone,
            ccam_scheme=str(config.get("ccam_scheme", "1.2.250.1.213.2.5")),
            region_scheme=str(config.get("region_scheme", REGION_SCHEME)),
            event_codes=bool(config.get("event_codes", True)),
        )


# -- building ------------------------------------------------------------------------------------------------------


def new_entry_uuid() -> str:
    """A random entryUUID: a SubmissionSet's (each submission is a new one). A DocumentEntry's is stable,
    ``traboule.translate.document_ids.entry_uuid`` of its uniqueId (the MHD DocumentReference's too)."""
    return f"urn:uuid:{uuid.uuid4()}"


def new_oid() -> str:
    """A fresh OID with no registration needed (ITU-T X.667: ``2.25.<UUID as an integer>``)."""
    return f"2.25.{uuid.uuid4().int}"


def content_of(doc: model.Document) -> bytes:
    """The document's bytes; raises ``MetadataError`` when they are missing or disagree with its hash and size."""
    try:
        data = base64.b64decode(doc.content, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MetadataError(f"document {doc.id}: content is not base64: {exc}") from exc
    if not data:
        raise MetadataError(f"document {doc.id}: no content")
    if doc.sha1 and hashlib.sha1(data).hexdigest() != doc.sha1.lower():
        raise MetadataError(f"document {doc.id}: content does not match its SHA-1 {doc.sha1}")
    if doc.size and len(data) != doc.size:
        raise MetadataError(f"document {doc.id}: content is {len(data)} bytes, not {doc.size}")
    return data


def document_entry(doc: model.Document, settings: MetadataSettings, entry_uuid: str) -> tuple[DocumentEntry, bytes]:
    """The DocumentEntry of ``doc`` and the bytes it describes."""
    data = content_of(doc)
    try:
        header = read_header(data)
    except CDAError as exc:
        raise MetadataError(f"document {doc.id}: {exc}") from exc
    if doc.id and header.id != doc.id:
        raise MetadataError(f"document {doc.id}: the CDA's id is {header.id}")
    cda = _CDA(etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True)), doc.id)
    tz = settings.timezone

    type_code = cda.coded("v3:code", "typeCode (ClinicalDocument/code)")
    if type_code.code not in CLASS_OF_TYPE:
        raise MetadataError(f"document {doc.id}: no classCode known for typeCode {type_code.code}")
    class_code = Coded(CLASS_OF_TYPE[type_code.code][0], CLASS_SCHEME, CLASS_OF_TYPE[type_code.code][1])
    fmt = FORMAT_OF_LEVEL[1 if header.level == 1 else 3]
    format_code = Coded(fmt[0], FORMAT_SCHEME, fmt[1])

    confidentiality = []
    conf = cda.attr("v3:confidentialityCode", "code") or "N"
    confidentiality.append(Coded(conf, CONFIDENTIALITY_SCHEME, CONFIDENTIALITY.get(conf, conf)))
    for code in doc.confidentiality:  # the masking codes of the sharing instructions (tables/confidentiality.csv)
        if all(c.code != code.code for c in confidentiality):
            confidentiality.append(Coded(code.code, code.system or MASKING_SCHEME, code.display))

    patient_id, source_patient_id = cda.patient_ids()
    created = utc(header.effective_time, tz)
    if not created:
        raise MetadataError(f"document {doc.id}: no creationTime (ClinicalDocument/effectiveTime)")
    entry = DocumentEntry(
        entry_uuid=entry_uuid,
        unique_id=header.id,
        hash=hashlib.sha1(data).hexdigest(),  # the XDS hash is SHA-1 by definition
        size=len(data),
        title=header.title or doc.title,
        creation_time=created,
        patient_id=patient_id,
        source_patient_id=source_patient_id,
        class_code=class_code,
        type_code=type_code,
        format_code=format_code,
        facility_type=cda.coded(
            "v3:componentOf/v3:encompassingEncounter/v3:location/v3:healthCareFacility/v3:code",
            "healthcareFacilityTypeCode (encompassingEncounter/location/healthCareFacility/code)",
        ),
        practice_setting=cda.coded(
            "v3:documentationOf/v3:serviceEvent/v3:performer/v3:assignedEntity/v3:representedOrganization"
            "/v3:standardIndustryClassCode",
            "practiceSettingCode (serviceEvent/performer/…/standardIndustryClassCode)",
        ),
        confidentiality=confidentiality,
        authors=[cda.author()],
        legal_authenticator=cda.person("v3:legalAuthenticator/v3:assignedEntity"),
        mime_type="text/xml",  # a CDA, level 1 or 3 (the PDF travels inside it)
        language=cda.attr("v3:languageCode", "code") or "fr-FR",
        service_start=utc(cda.attr("v3:documentationOf/v3:serviceEvent/v3:effectiveTime/v3:low", "value"), tz),
        service_stop=utc(cda.attr("v3:documentationOf/v3:serviceEvent/v3:effectiveTime/v3:high", "value"), tz),
        source_patient_info=cda.patient_info(),
        event_codes=cda.event_codes(settings.ccam_scheme, settings.region_scheme) if settings.event_codes else [],
        reference_ids=_reference_ids(header, doc.report),
    )
    if not entry.legal_authenticator:
        raise MetadataError(f"document {doc.id}: no legalAuthenticator with an idNat_PS")
    return entry, data


def submission_set(
    entry: DocumentEntry, report: model.Report, settings: MetadataSettings, *, now: datetime | None = None
) -> SubmissionSet:
    """The SubmissionSet carrying ``entry`` (or updating it, for ITI-57)."""
    klass = report.encounter_class if report.encounter_class in settings.content_types else ""
    content_type = settings.content_types[klass or settings.default_content_type]
    if settings.submission_author is not None:
        author = settings.submission_author
    else:
        first = entry.authors[0]
        author = Author(first.person, list(first.institutions))
    return SubmissionSet(
        entry_uuid=new_entry_uuid(),
        unique_id=new_oid(),
        source_id=settings.source_id,
        submission_time=(now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S"),
        patient_id=entry.patient_id,
        content_type=content_type,
        authors=[author],
    )


def submission(
    doc: model.Document,
    settings: MetadataSettings,
    entry_uuid: str,
    *,
    replaces: str = "",
    now: datetime | None = None,
) -> Submission:
    """ITI-41 for ``doc``; ``replaces``: the entryUUID of the version it supersedes (an RPLC association)."""
    if doc.replaces and not replaces:
        raise MetadataError(f"document {doc.id} replaces {doc.replaces}: the replaced entryUUID is needed")
    entry, data = document_entry(doc, settings, entry_uuid)
    return Submission(submission_set(entry, doc.report, settings, now=now), [SubmittedDocument(entry, data, replaces)])


def deletion(
    doc: model.Document, settings: MetadataSettings, entry_uuid: str, *, now: datetime | None = None
) -> StatusUpdate:
    """ITI-57 withdrawing ``doc`` (the DocumentEntry ``entry_uuid``): availabilityStatus Approved → Deleted."""
    entry, _ = document_entry(doc, settings, entry_uuid)
    return StatusUpdate(submission_set(entry, doc.report, settings, now=now), entry_uuid, entry=entry)


# -- reading the CDA ---------------------------------------------------------------------------------------------


class _CDA:
    """XPath reads over a CDA header, raising ``MetadataError`` that names the missing element."""

    def __init__(self, root: etree._Element, doc_id: str) -> None:
        self.root = root
        self.doc_id = doc_id

    def first(self, path: str) -> etree._Element | None:
        return self.root.find(path, V3)

    def attr(self, path: str, name: str) -> str:
        found = self.first(path)
        return (found.get(name) or "").strip() if found is not None else ""

    def coded(self, path: str, what: str) -> Coded:
        found = self.first(path)
        code = found.get("code", "") if found is not None else ""
        if found is None or not code:
            raise MetadataError(f"document {self.doc_id}: no {what}")
        return Coded(code, found.get("codeSystem", ""), found.get("displayName") or code)

    def person(self, path: str) -> str:
        """XCN ``idNat^FAMILY^Given^^^^^^&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS`` of an assignedEntity/Author."""
        entity = self.first(path)
        if entity is None:
            return ""
        ident = entity.find(f"v3:id[@root='{IDNAT_PS}']", V3)
        if ident is None or not ident.get("extension"):
            return ""
        name = entity.find("v3:assignedPerson/v3:name", V3)
        family = _text(name, "v3:family") if name is not None else ""
        given = _text(name, "v3:given") if name is not None else ""
        e = hl7.escape
        return f"{e(ident.get('extension', ''))}^{e(family)}^{e(given)}^^^^^^&{IDNAT_PS}&ISO^D^^^IDNPS"

    def author(self) -> Author:
        path = "v3:author/v3:assignedAuthor"
        person = self.person(path)
        if not person:
            raise MetadataError(f"document {self.doc_id}: no author with an idNat_PS (author/assignedAuthor/id)")
        author = Author(person)
        org = self.first(f"{path}/v3:representedOrganization")
        if org is not None:
            ident = org.find(f"v3:id[@root='{IDNAT_STRUCT}']", V3)
            name = _text(org, "v3:name")
            if ident is not None and ident.get("extension"):
                e = hl7.escape
                author.institutions.append(f"{e(name)}^^^^^&{IDNAT_STRUCT}&ISO^IDNST^^^{e(ident.get('extension', ''))}")
        code = self.first(f"{path}/v3:code")
        if code is not None and code.get("code"):
            display = code.get("displayName") or code.get("code", "")
            e = hl7.escape
            author.specialties.append(f"{e(code.get('code', ''))}^{e(display)}^{e(code.get('codeSystem', ''))}")
        function = self.attr("v3:author/v3:functionCode", "displayName")
        if function:
            author.roles.append(hl7.escape(function))
        return author

    def patient_ids(self) -> tuple[str, str]:
        """(patientId: the INS, sourcePatientId: the local id, or the INS when there is none)."""
        ins, local = "", ""
        for ident in self.root.findall("v3:recordTarget/v3:patientRole/v3:id", V3):
            root, ext = ident.get("root", ""), ident.get("extension", "")
            if not ext:
                continue
            if root in model.INS_OIDS and not ins:
                ins = f"{hl7.escape(ext)}^^^&{root}&ISO^NH"
            elif root not in model.INS_OIDS and not local:
                local = f"{hl7.escape(ext)}^^^&{root}&ISO^PI"
        if not ins:
            raise MetadataError(
                f"document {self.doc_id}: the patient has no INS (recordTarget/patientRole/id with an INS OID); "
                "the DMP files documents by INS"
            )
        return ins, local or ins.replace("^NH", "^PI")

    def patient_info(self) -> list[str]:
        patient = self.first("v3:recordTarget/v3:patientRole/v3:patient")
        if patient is None:
            return []
        name = patient.find("v3:name", V3)
        out = []
        if name is not None:
            family = _text(name, "v3:family[@qualifier='BR']") or _text(name, "v3:family")
            given = _text(name, "v3:given[@qualifier='BR']") or _text(name, "v3:given")
            out.append(f"PID-5|{hl7.escape(family)}^{hl7.escape(given)}^^^^^L")
        birth = patient.find("v3:birthTime", V3)
        if birth is not None and birth.get("value"):
            out.append(f"PID-7|{birth.get('value', '')[:8]}")
        sex = patient.find("v3:administrativeGenderCode", V3)
        if sex is not None and sex.get("code"):
            out.append(f"PID-8|{sex.get('code')}")
        return out

    def event_codes(self, ccam_scheme: str, region_scheme: str = REGION_SCHEME) -> list[Coded]:
        """The serviceEvents' CCAM acts, modalities (JDV_ModaliteAcquisition_CISIS) and anatomical regions
        (JDV_RegionAnatomique_CISIS: the SNOMED CT translation qualified 39111-0 "localisation anatomique"), each
        once."""
        out: list[Coded] = []
        for t in self.root.findall("v3:documentationOf/v3:serviceEvent/v3:code/v3:translation", V3):
            code, system = (t.get("code") or "").strip(), t.get("codeSystem", "")
            if not code:
                continue
            if system in (DCM, MODALITY_SCHEME):
                scheme = MODALITY_SCHEME
            elif system in CCAM_OIDS:
                scheme = ccam_scheme
            elif system in (SNOMED, REGION_SCHEME):
                scheme = region_scheme
            else:
                continue
            coded = Coded(code, scheme, t.get("displayName") or code)
            if all((c.code, c.scheme) != (coded.code, coded.scheme) for c in out):
                out.append(coded)
        return out


def _reference_ids(header: CDAHeader, report: model.Report) -> list[str]:
    """referenceIdList (CXi, JDV_J231): the accession number, the Study Instance UID, the placer order number."""
    e = hl7.escape
    out = []
    accession = header.accession_number or report.accession_number.value
    accession_oid = header.accession_oid or report.accession_number.issuer_oid
    if accession and _OID.match(accession_oid or ""):
        out.append(f"{e(accession)}^^^&{accession_oid}&ISO^{ACCESSION}")
    study = header.study_instance_uid or report.study_instance_uid
    if study:
        out.append(f"{study}^^^^{STUDY}")  # a UID is globally unique: no assigning authority
    placer = header.placer_order_number or report.placer_order_number.value
    placer_oid = header.placer_oid or report.placer_order_number.issuer_oid
    if placer and _OID.match(placer_oid or ""):
        out.append(f"{e(placer)}^^^&{placer_oid}&ISO^{ORDER}")
    return out


def _text(parent: etree._Element, path: str) -> str:
    found = parent.find(path, V3)
    return (found.text or "").strip() if found is not None else ""


_TS = re.compile(r"^(\d{4,14})(?:\.\d+)?([+-]\d{4})?$")


def utc(value: str, tz: tzinfo) -> str:
    """HL7 TS → XDS DTM in UTC. A date alone stays a date; a time without an offset is local time in ``tz``."""
    m = _TS.match((value or "").strip())
    if not m:
        return ""
    digits, offset = m.groups()
    if len(digits) <= 8:
        return digits
    local = datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")
    if offset:
        sign = -1 if offset[0] == "-" else 1
        zone: tzinfo = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5])))
    else:
        zone = tz
    return local.replace(tzinfo=zone).astimezone(UTC).strftime("%Y%m%d%H%M%S")
