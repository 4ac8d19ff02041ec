"""Canonical report → CDA R2 "CR d'imagerie médicale" (CI-SIS volet IMG-CR-IMG 2024.01), driven by
``mappings/cda.yaml``; and the header of a ready CDA a RIS sends (``read_header``).

Level 3 (structured body) for a text report: Informations cliniques (Demande + Historique médical), one
Acte-imagerie section per act with its DICOM object catalog (the study as the archive holds it), Résultats,
Conclusion. Level 1 (PDF in ``nonXMLBody``, XDS-SD templateIds only) when the report carries a PDF. The header
follows the CI-SIS "structuration minimale" rules (INS and its traits, idNat of practitioners and organisations,
inFulfillmentOf with the accession number, serviceEvent with the Study Instance UID).

Built with lxml element by element: every value is escaped by the serializer, the output is UTF-8. No template
engine: the structure is fixed by the volet, the values come from the report and the mapping file.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from lxml import etree
from pydicom.uid import UID

from traboule import model
from traboule.errors import CDAError, MappingError
from traboule.translate.mapping import (
    MAPPINGS_DIR,
    CodeTable,
    Node,
    line_of,
    load_tables,
    load_yaml,
    shape,
)

V3 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
PS320 = "urn:dicom-org:ps3-20"
NSMAP = {None: V3, "xsi": XSI, "ps3-20": PS320}

LOINC = "2.16.840.1.113883.6.1"
DCM = "1.2.840.10008.2.16.4"
SNOMED = "2.16.840.1.113883.6.96"
CCAM = "1.2.250.1.215.300.1"
CCAM_OIDS = (CCAM, "1.2.250.1.213.2.5")  # the CDA examples' and the NOS tables' CCAM OIDs
CONFIDENTIALITY_SYSTEM = "2.16.840.1.113883.5.25"  # HL7 v3 Confidentiality (JDV_J08)
DCMUID = "1.2.840.10008.2.6.1"
IDNAT_PS = "1.2.250.1.71.4.2.1"
IDNAT_STRUCT = "1.2.250.1.71.4.2.2"
ROLE_SYSTEM = "1.2.250.1.213.1.1.4.5"
FACILITY_SYSTEM = "1.2.250.1.71.4.2.4"
PRACTICE_SYSTEM = "1.2.250.1.213.1.1.4.9"
REPORT_CODE = ("18748-4", "CR d'imagerie médicale")

HEADER_TEMPLATES = ("2.16.840.1.113883.2.8.2.1", "1.2.250.1.213.1.1.1.1")
LEVEL3_TEMPLATES = ("1.2.840.10008.9.1", "1.2.840.10008.9.20", "1.2.840.10008.9.21")
CR_IMG_TEMPLATE = ("1.2.250.1.213.1.1.1.45", "2024.01")
XDS_SD_TEMPLATE = "1.3.6.1.4.1.19376.1.2.20"


@dataclass(frozen=True)
class SectionTemplate:
    """A section of the volet: its templateIds, its code's display and system, its title (the display when empty)."""

    templates: tuple[str, ...]
    display: str
    title: str = ""
    system: str = LOINC


CLINICAL, REQUEST, HISTORY, TECHNIQUE, COMPLICATIONS = "55752-0", "55115-0", "11329-0", "55111-9", "55109-3"
CATALOG = "121181"  # DCM
TEXT_SECTIONS = ("18834-2", "59776-5", "19005-8", "55112-7")  # the report's text, in the body's order
# Every section the document holds: code → its template.
SECTIONS: dict[str, SectionTemplate] = {
    CLINICAL: SectionTemplate(("1.2.840.10008.9.2", "1.2.250.1.213.1.1.2.205"), "Informations cliniques"),
    REQUEST: SectionTemplate(
        ("1.2.840.10008.9.7", "1.2.250.1.213.1.1.2.211"), "Demande", "Justification de la demande d'examen"
    ),
    HISTORY: SectionTemplate(
        ("2.16.840.1.113883.10.20.22.2.39", "1.2.250.1.213.1.1.2.213"),
        "Historique médical",
        "Antécédents médicaux / Antécédents chirurgicaux",
    ),
    TECHNIQUE: SectionTemplate(
        ("1.2.840.10008.9.3", "1.2.250.1.213.1.1.2.206"), "Description de l'acte d'imagerie", "Technique d'imagerie"
    ),
    COMPLICATIONS: SectionTemplate(("2.16.840.1.113883.10.20.22.2.37", "1.2.250.1.213.1.1.2.214"), "Complications"),
    CATALOG: SectionTemplate(
        ("2.16.840.1.113883.10.20.6.1.1", "1.2.250.1.213.1.1.2.217"), "Catalogue d'objets DICOM", system=DCM
    ),
    "18834-2": SectionTemplate(("1.2.840.10008.9.4", "1.2.250.1.213.1.1.2.207"), "Examen comparatif"),
    "59776-5": SectionTemplate(
        ("2.16.840.1.113883.10.20.6.1.2", "1.2.250.1.213.1.1.2.208"), "Résultats de l'acte", "Résultats"
    ),
    "19005-8": SectionTemplate(("1.2.840.10008.9.5", "1.2.250.1.213.1.1.2.209"), "Conclusions", "Conclusion"),
    "55112-7": SectionTemplate(("1.2.250.1.213.1.1.2.73",), "Commentaire"),
}
# The entries' templateIds (DICOM / IHE, then CI-SIS).
ENTRY_TEMPLATES = {
    "procedure": ("1.2.840.10008.9.14", "1.2.250.1.213.1.1.3.153"),
    "history": ("2.16.840.1.113883.10.20.6.2.13", "1.2.250.1.213.1.1.3.150"),
    "study": ("1.2.840.10008.9.16", "1.2.250.1.213.1.1.3.155"),
    "series": ("1.2.840.10008.9.17", "1.2.250.1.213.1.1.3.156"),
    "instance": ("1.2.840.10008.9.18", "1.2.250.1.213.1.1.3.157"),
}
UNKNOWN = "Non renseigné"

_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


@dataclass
class DocumentIds:
    """Identity of one version of a document: ``id`` and ``set_id`` are OIDs; ``replaces`` the parent's id."""

    id: str
    set_id: str
    version: int = 1
    replaces: str = ""


@dataclass
class Org:
    id: str
    name: str


@dataclass
class CodedValue:
    code: str
    display: str


class CDAMapping:
    """Compiled ``cda.yaml``: ``build`` makes a CR d'imagerie from a report."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else MAPPINGS_DIR / "cda.yaml"
        doc = load_yaml(self.path)
        if not isinstance(doc, Node):
            raise MappingError(self.path, 1, "expected a mapping of sections")
        known = {
            "kind",
            "version",
            "description",
            "tables",
            "document_oid",
            "timezone",
            "identifiers",
            "organization",
            "custodian",
            "author_role",
            "practitioner_id",
            "image_link",
        }
        text = {"kind", "version", "description", "document_oid", "timezone", "practitioner_id", "image_link"}
        for key in doc:
            if key not in known:
                raise MappingError(self.path, line_of(doc, key), f"unknown section {key!r} (expected {sorted(known)})")
            if key in text and not isinstance(doc[key], str):
                raise MappingError(self.path, line_of(doc, key), f"{key}: expected text, not {shape(doc[key])}")
        if doc.get("kind", "canonical-to-cda") != "canonical-to-cda":
            raise MappingError(self.path, line_of(doc, "kind"), "kind must be 'canonical-to-cda'")
        self.tables = load_tables(doc.get("tables"), self.path.parent, self.path, line_of(doc, "tables"))
        required_columns = {
            "acts": {"loinc", "loinc_display", "ccam", "ccam_display", "modality", "site_code", "site_display"},
            "modalities": {"display"},
            "encounter": {"code", "display"},
            "confidentiality": {"code", "system", "display"},
        }
        for name, columns in required_columns.items():
            table = self.tables.get(name)
            line = line_of(doc.get("tables"), name) or line_of(doc, "tables")
            if table is None:
                raise MappingError(self.path, line, f"tables: {name!r} is required")
            missing = columns - set(table.columns)
            if missing:
                raise MappingError(self.path, line, f"table {name!r} needs the column(s) {sorted(missing)}")
        self.acts: CodeTable = self.tables["acts"]
        self.modalities: CodeTable = self.tables["modalities"]
        self.encounter: CodeTable = self.tables["encounter"]
        self.confidentiality_table: CodeTable = self.tables["confidentiality"]
        self.document_oid = self._oid(doc, "document_oid")
        self.timezone = self._timezone(doc)
        ids = self._section(doc, "identifiers", "patient, placer and accession OIDs")
        self.patient_oid = self._oid(ids, "patient")
        self.placer_oid = self._oid(ids, "placer")
        self.accession_oid = self._oid(ids, "accession")
        org = self._section(doc, "organization", "id, name, facility_type and practice_setting")
        self.organization = self._org(org, "organization")
        custodian = self._section(doc, "custodian", "id and name") if doc.get("custodian") else org
        self.custodian = self._org(custodian, "custodian")
        self.facility_type = self._coded(org, "facility_type")
        self.practice_setting = self._coded(org, "practice_setting")
        self.author_role = self._coded(doc, "author_role")
        pattern = doc.get("practitioner_id", r"^8?\d{11}$")
        if not pattern:  # an empty pattern would take any id for an RPPS
            raise MappingError(self.path, line_of(doc, "practitioner_id"), "practitioner_id: give a regular expression")
        try:
            self.practitioner_id = re.compile(pattern)
        except re.error as exc:
            raise MappingError(self.path, line_of(doc, "practitioner_id"), f"practitioner_id: {exc}") from exc
        self.image_link = str(doc.get("image_link", "") or "")

    # -- load-time checks ------------------------------------------------------------------------------------

    def _section(self, doc: Node, key: str, what: str) -> Node:
        """A section that maps names to values: missing, empty or a plain value is refused at its line."""
        node = doc.get(key)
        if not isinstance(node, Node) or not node:
            raise MappingError(self.path, line_of(doc, key), f"{key}: a mapping of {what} is required")
        return node

    def _oid(self, node: Any, key: str) -> str:
        value = str(node.get(key, "") if isinstance(node, dict) else "")
        if not _OID.match(value):
            raise MappingError(self.path, line_of(node, key), f"{key}: {value!r} is not an OID")
        return value

    def _timezone(self, doc: Node) -> ZoneInfo:
        name = str(doc.get("timezone", "Europe/Paris"))
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise MappingError(self.path, line_of(doc, "timezone"), f"unknown time zone {name!r}") from exc

    def _org(self, node: Any, what: str) -> Org:
        for key in ("id", "name"):
            value = node.get(key) if isinstance(node, dict) else None
            if not isinstance(value, str) or not value.strip():
                line = line_of(node, key)
                raise MappingError(self.path, line, f"{what}: 'id' (idNat_Struct) and 'name' are required, as text")
        return Org(str(node["id"]), str(node["name"]))

    def _coded(self, node: Any, key: str) -> CodedValue:
        value = node.get(key) if isinstance(node, dict) else None
        texts = [value.get(k) for k in ("code", "display")] if isinstance(value, dict) else [None]
        if not all(isinstance(t, str) and t for t in texts):
            raise MappingError(self.path, line_of(node, key), f"{key}: {{code: ..., display: ...}} is required")
        return CodedValue(str(value["code"]), str(value["display"]))

    # -- values ------------------------------------------------------------------------------------------------

    def ts(self, value: str) -> str:
        """HL7 DTM → CDA TS: a date stays a date; a time gets seconds and the zone offset."""
        digits = re.sub(r"[^0-9+-]", "", value or "")
        m = re.match(r"^(\d{8})(\d{2})?(\d{2})?(\d{2})?", digits)
        if not m:
            return ""
        if not m.group(2):
            return m.group(1)
        if re.search(r"[+-]\d{4}$", digits):
            return f"{m.group(1)}{m.group(2)}{m.group(3) or '00'}{m.group(4) or '00'}{digits[-5:]}"
        local = datetime.strptime(f"{m.group(1)}{m.group(2)}{m.group(3) or '00'}{m.group(4) or '00'}", "%Y%m%d%H%M%S")
        return local.replace(tzinfo=self.timezone).strftime("%Y%m%d%H%M%S%z")

    def confidentiality(self, report: model.Report) -> list[model.Code]:
        """Confidentiality codes the sender's sharing instructions ask for (``tables/confidentiality.csv``)."""
        out: list[model.Code] = []
        for flag in report.sharing:
            yes = flag.value.split("^", 1)[0].strip().upper() == "Y"  # Y, or the coded Y^^expandedYes-NoIndicator
            code = self.confidentiality_table.lookup((flag.code,), "code") if yes else None
            if code and all(c.code != code for c in out):
                table = self.confidentiality_table
                out.append(
                    model.Code(
                        code, table.lookup((flag.code,), "display") or "", table.lookup((flag.code,), "system") or ""
                    )
                )
        return out

    def idnat_ps(self, practitioner: model.Practitioner, what: str) -> str:
        value = practitioner.id.strip()
        if not value or not self.practitioner_id.match(value):
            raise CDAError(f"{what} has no national practitioner id (8 + RPPS): {value!r}")
        return value if len(value) == 12 else f"8{value}"

    def act_of(self, report: model.Report, study: model.Study | None) -> model.ReportAct:
        """The act from the procedure code (tables/cda_acts.csv); the modality from the message or the study."""
        code = report.procedure.code
        loinc = self.acts.lookup((code,), "loinc") if code else None
        if not loinc:
            raise CDAError(
                f"procedure code {code!r} ({report.procedure.display}) has no LOINC act code in "
                f"{self.acts.name} (JDV_CodesDocumentImagerie_CISIS)"
            )
        modality = report.modality or (study.modalities[0] if study and study.modalities else "")
        modality = modality or self.acts.lookup((code,), "modality") or ""
        return model.ReportAct(
            code=model.Code(loinc, self.acts.lookup((code,), "loinc_display") or "", LOINC),
            ccam=self.acts.lookup((code,), "ccam") or "",
            modality=modality,
            region=model.Code(
                self.acts.lookup((code,), "region_code") or "", self.acts.lookup((code,), "region_display") or ""
            ),
        )

    # -- the document ------------------------------------------------------------------------------------------

    def build(
        self, report: model.Report, ids: DocumentIds, study: model.Study | None = None, *, now: datetime | None = None
    ) -> bytes:
        """The CDA document (UTF-8 bytes with an XML declaration); raises ``CDAError`` for a report that cannot
        make one (missing practitioner id, unknown procedure code, no study for a level-3 catalog...)."""
        pdf = report.attachment if report.attachment_type == "application/pdf" else ""
        act = self.act_of(report, study)
        if not pdf and (study is None or not study.series):
            raise CDAError(
                f"study {report.study_instance_uid or '(no Study Instance UID)'} is not known from the archive: "
                "the DICOM object catalog of a structured report needs its series and instances"
            )
        created = self.ts(report.report_time) or (now or datetime.now(self.timezone)).strftime("%Y%m%d%H%M%S%z")
        root = etree.Element(f"{{{V3}}}ClinicalDocument", nsmap=NSMAP)
        b = _Builder(root)
        b.add(root, "realmCode", code="FR")
        b.add(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
        b.templates(root, HEADER_TEMPLATES)
        if pdf:
            b.add(root, "templateId", root=XDS_SD_TEMPLATE)
        else:
            b.templates(root, LEVEL3_TEMPLATES)
            b.add(root, "templateId", root=CR_IMG_TEMPLATE[0], extension=CR_IMG_TEMPLATE[1])
        b.add(root, "id", root=ids.id)
        code = b.add(root, "code", code=REPORT_CODE[0], displayName=REPORT_CODE[1], codeSystem=LOINC)
        code.set("codeSystemName", "LOINC")
        b.add(code, "translation", code=act.code.code, displayName=act.code.display, codeSystem=LOINC)
        title = report.title or f"CR d'imagerie médicale - {act.code.display or report.procedure.display}"
        b.text(root, "title", title)
        b.add(root, "effectiveTime", value=created)
        b.add(root, "confidentialityCode", code="N", displayName="Normal", codeSystem=CONFIDENTIALITY_SYSTEM)
        b.add(root, "languageCode", code="fr-FR")
        b.add(root, "setId", root=ids.set_id)
        b.add(root, "versionNumber", value=str(ids.version))
        self._record_target(b, root, report.patient)
        self._author(b, root, report, created)
        custodian = b.path(root, "custodian", "assignedCustodian", "representedCustodianOrganization")
        b.add(custodian, "id", root=IDNAT_STRUCT, extension=self.custodian.id)
        b.text(custodian, "name", self.custodian.name)
        legal = b.add(root, "legalAuthenticator")
        b.add(legal, "time", value=created)
        b.add(legal, "signatureCode", code="S")
        entity = b.add(legal, "assignedEntity")
        authenticator = report.legal_authenticator if report.legal_authenticator.id else report.author
        b.add(entity, "id", root=IDNAT_PS, extension=self.idnat_ps(authenticator, "the legal authenticator"))
        b.add(entity, "code", code=self.author_role.code, displayName=self.author_role.display, codeSystem=ROLE_SYSTEM)
        self._person(b, entity, "assignedPerson", authenticator.name)
        self._order(b, root, report)
        self._service_event(b, root, report, act, study)
        if ids.replaces:  # after documentationOf: the CDA schema's order
            related = b.add(root, "relatedDocument", typeCode="RPLC")
            b.add(b.add(related, "parentDocument"), "id", root=ids.replaces)
        self._encounter(b, root, report)
        body = b.add(root, "component")
        if pdf:
            text = b.text(b.add(body, "nonXMLBody"), "text", pdf)
            text.set("mediaType", "application/pdf")
            text.set("representation", "B64")
        else:
            assert study is not None
            self._structured_body(b, b.add(body, "structuredBody"), report, act, study, ids)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)

    # -- header parts --------------------------------------------------------------------------------------

    def _record_target(self, b: _Builder, root: etree._Element, p: model.Patient) -> None:
        role = b.path(root, "recordTarget", "patientRole")
        ins = p.ins
        if ins is not None and ins.value:
            b.add(role, "id", root=ins.issuer_oid or "1.2.250.1.213.1.4.8", extension=ins.value)
        for ident in p.ids:
            if ident is ins or not ident.value:
                continue
            oid = ident.issuer_oid if _OID.match(ident.issuer_oid or "") else self.patient_oid
            b.add(role, "id", root=oid, extension=ident.value)
        patient = b.add(role, "patient")
        name = b.add(patient, "name")
        birth_family = p.birth_name or p.name.family
        if not birth_family:
            raise CDAError("patient without a family name (PID-5)")
        b.text(name, "family", birth_family).set("qualifier", "BR")
        if p.name.family and p.name.family != birth_family:
            b.text(name, "family", p.name.family).set("qualifier", "CL")
        first = p.name.given
        every = p.name.middle if p.name.middle and first and p.name.middle.startswith(first) else first
        if p.name.middle and every == first and p.name.middle != first:
            every = f"{first} {p.name.middle}"
        if every:
            b.text(name, "given", every)
        if first:
            b.text(name, "given", first).set("qualifier", "BR")
        gender = {"M": ("M", "Masculin"), "F": ("F", "Féminin")}.get(p.sex, ("U", "Inconnu"))
        b.add(
            patient,
            "administrativeGenderCode",
            code=gender[0],
            displayName=gender[1],
            codeSystem="2.16.840.1.113883.5.1",
        )
        if not p.birth_date:
            raise CDAError("patient without a birth date (PID-7)")
        b.add(patient, "birthTime", value=p.birth_date[:8])
        if ins is not None and ins.value:
            if not p.birth_place_code:
                raise CDAError("an INS needs the birthplace among its traits (PID-11 of type BDL, INSEE code)")
            b.text(b.path(patient, "birthplace", "place", "addr"), "county", p.birth_place_code)

    def _author(self, b: _Builder, root: etree._Element, report: model.Report, created: str) -> None:
        author = b.add(root, "author")
        b.add(author, "time", value=created)
        assigned = b.add(author, "assignedAuthor")
        b.add(assigned, "id", root=IDNAT_PS, extension=self.idnat_ps(report.author, "the author"))
        b.add(
            assigned, "code", code=self.author_role.code, displayName=self.author_role.display, codeSystem=ROLE_SYSTEM
        )
        self._person(b, assigned, "assignedPerson", report.author.name)
        self._organization(b, assigned)

    def _organization(self, b: _Builder, parent: etree._Element) -> etree._Element:
        """The organisation the author acts for (idNat_Struct and name), as ``parent``'s representedOrganization."""
        org = b.add(parent, "representedOrganization")
        b.add(org, "id", root=IDNAT_STRUCT, extension=self.organization.id)
        b.text(org, "name", self.organization.name)
        return org

    def _person(self, b: _Builder, parent: etree._Element, tag: str, name: model.PersonName) -> None:
        if not name.family:
            raise CDAError("a practitioner without a family name")
        person = b.add(b.add(parent, tag), "name")
        if name.given:
            b.text(person, "given", name.given)
        b.text(person, "family", name.family)

    def _order(self, b: _Builder, root: etree._Element, report: model.Report) -> None:
        order = b.path(root, "inFulfillmentOf", "order")
        placer = report.placer_order_number
        if placer.value:
            oid = placer.issuer_oid if _OID.match(placer.issuer_oid or "") else self.placer_oid
            b.add(order, "id", root=oid, extension=placer.value)
        else:
            b.add(order, "id", nullFlavor="UNK")
        acc = report.accession_number
        oid = acc.issuer_oid if _OID.match(acc.issuer_oid or "") else self.accession_oid
        number = etree.SubElement(order, f"{{{PS320}}}accessionNumber")
        number.set("root", oid)
        number.set("extension", acc.value)

    def _service_event(
        self, b: _Builder, root: etree._Element, report: model.Report, act: model.ReportAct, study: model.Study | None
    ) -> None:
        event = b.path(root, "documentationOf", "serviceEvent")
        event.set("classCode", "ACT")
        uid = report.study_instance_uid or (study.study_instance_uid if study else "")
        if uid:
            b.add(event, "id", root=uid)
        code = b.add(event, "code", code=act.code.code, displayName=act.code.display, codeSystem=LOINC)
        if act.ccam:
            ccam = b.add(code, "translation", code=act.ccam, codeSystem=CCAM)
            ccam_display = self.acts.lookup((report.procedure.code,), "ccam_display") or ""
            if ccam_display:
                ccam.set("displayName", ccam_display)
        if act.modality:
            modality = b.add(
                code, "translation", code=act.modality, displayName=self._modality(act.modality), codeSystem=DCM
            )
            b.add(b.add(modality, "qualifier"), "name", code="121139", displayName="Modalité", codeSystem=DCM)
        if act.region.code:
            region = b.add(code, "translation", code=act.region.code, displayName=act.region.display, codeSystem=SNOMED)
            qualifier = b.add(region, "qualifier")
            b.add(qualifier, "name", code="39111-0", displayName="localisation anatomique", codeSystem=LOINC)
        started = self.ts(report.exam_time or (study.started if study else "")) or self.ts(report.report_time)
        if not started:
            raise CDAError("no exam time (OBR-7) to date the service event")
        times = b.add(event, "effectiveTime")
        b.add(times, "low", value=started)
        ended = self.service_end(report, started)
        if ended:
            b.add(times, "high", value=ended)
        performer = b.add(event, "performer", typeCode="PRF")
        entity = b.add(performer, "assignedEntity")
        b.add(entity, "id", root=IDNAT_PS, extension=self.idnat_ps(report.author, "the author"))
        self._person(b, entity, "assignedPerson", report.author.name)
        b.add(
            self._organization(b, entity),
            "standardIndustryClassCode",
            code=self.practice_setting.code,
            displayName=self.practice_setting.display,
            codeSystem=PRACTICE_SYSTEM,
        )

    def service_end(self, report: model.Report, started: str) -> str:
        """The serviceEvent's end (``effectiveTime/high``, XDS serviceStopTime): the exam's end (OBR-8, else the end
        of its MPPS) as a CDA TS; empty when unknown or before ``started`` (a sender's error: the start wins)."""
        ended = self.ts(report.ended)
        if not ended or not started:
            return ended
        return ended if _not_before(ended, started) else ""

    def _encounter(self, b: _Builder, root: etree._Element, report: model.Report) -> None:
        encounter = b.path(root, "componentOf", "encompassingEncounter")
        key = (report.encounter_class or "O",)
        b.add(
            encounter,
            "code",
            code=self.encounter.lookup(key, "code") or "AMB",
            displayName=self.encounter.lookup(key, "display") or "Ambulatoire",
            codeSystem="2.16.840.1.113883.5.4",
        )
        started = self.ts(report.exam_time) or self.ts(report.report_time)
        b.add(b.add(encounter, "effectiveTime"), "low", value=started)
        facility = b.path(encounter, "location", "healthCareFacility")
        b.add(
            facility,
            "code",
            code=self.facility_type.code,
            displayName=self.facility_type.display,
            codeSystem=FACILITY_SYSTEM,
        )

    def _modality(self, modality: str) -> str:
        return self.modalities.lookup((modality,), "display") or modality

    # -- body ----------------------------------------------------------------------------------------------

    def _structured_body(
        self,
        b: _Builder,
        body: etree._Element,
        report: model.Report,
        act: model.ReportAct,
        study: model.Study,
        ids: DocumentIds,
    ) -> None:
        """Informations cliniques, the act's section, then the report's text; section and entry ids are sub-OIDs of
        the document's id, numbered in the document's order."""
        counter = iter(range(1, 10_000))

        def section_id() -> str:
            return f"{ids.id}.{next(counter)}"

        self._clinical_information(b, body, report, section_id)
        self._imaging_act(b, body, report, act, study, section_id)
        for code in TEXT_SECTIONS:  # Examen comparatif, Résultats, Conclusion, Commentaire
            found = report.section(code)
            if found is not None and found.text.strip():
                b.narrative(b.section(body, code, section_id(), title=found.title), found.text)

    def _clinical_information(
        self, b: _Builder, body: etree._Element, report: model.Report, section_id: Callable[[], str]
    ) -> None:
        """Informations cliniques: Demande and Historique médical (both required inside it)."""
        clinical = b.section(body, CLINICAL, section_id())
        b.add(clinical, "text")
        request = report.section(REQUEST)
        demand = b.section(clinical, REQUEST, section_id())
        demand.set("classCode", "DOCSECT")
        demand.set("moodCode", "EVN")
        b.narrative(demand, request.text if request and request.text.strip() else UNKNOWN)
        self._history(b, clinical, report, section_id)

    def _imaging_act(
        self,
        b: _Builder,
        body: etree._Element,
        report: model.Report,
        act: model.ReportAct,
        study: model.Study,
        section_id: Callable[[], str],
    ) -> None:
        """One Acte-imagerie section per act (one act per report here): its narrative, its procedure entry, the
        complications, the DICOM object catalog."""
        section = b.section(body, TECHNIQUE, section_id())
        site = (
            self.acts.lookup((report.procedure.code,), "site_code") or "",
            self.acts.lookup((report.procedure.code,), "site_display") or "",
        )
        self._act_narrative(b, section, report, act, site[1])
        started = self.ts(report.exam_time or study.started) or self.ts(report.report_time)
        self._procedure(b, section, act, site, started, section_id)
        complications = report.section(COMPLICATIONS)
        if complications and complications.text.strip():
            b.narrative(b.section(section, COMPLICATIONS, section_id()), complications.text)
        self._catalog(b, section, report, study, section_id, started, act.modality)

    def _act_narrative(
        self, b: _Builder, section: etree._Element, report: model.Report, act: model.ReportAct, site_display: str
    ) -> None:
        """The act (code, modality, site: the targets of the entry's references), then the technique's text."""
        text = b.add(section, "text")
        line = b.add(text, "paragraph")
        b.text(line, "content", f"[LOINC {act.code.code}] {act.code.display}").set("ID", "acte-1")
        if act.modality:
            _append_text(line, " - ")
            b.text(line, "content", self._modality(act.modality)).set("ID", "acte-1-modalite")
        if site_display:
            _append_text(line, " - ")
            b.text(line, "content", site_display).set("ID", "acte-1-localisation")
        technique = report.section(TECHNIQUE)
        if technique and technique.text.strip():
            for paragraph in _lines(technique.text):
                b.text(text, "paragraph", paragraph)

    def _procedure(
        self,
        b: _Builder,
        section: etree._Element,
        act: model.ReportAct,
        site: tuple[str, str],
        started: str,
        section_id: Callable[[], str],
    ) -> None:
        """The act's procedure entry: LOINC code with its CCAM translation, the modality, the target site."""
        procedure = b.add(b.add(section, "entry"), "procedure", classCode="PROC", moodCode="EVN")
        b.templates(procedure, ENTRY_TEMPLATES["procedure"])
        b.add(procedure, "id", root=section_id())
        code = b.add(procedure, "code", code=act.code.code, displayName=act.code.display, codeSystem=LOINC)
        b.add(b.add(code, "originalText"), "reference", value="#acte-1")
        if act.ccam:
            b.add(code, "translation", code=act.ccam, codeSystem=CCAM)
        b.add(procedure, "effectiveTime", value=started)
        if act.modality:
            method = b.add(
                procedure, "methodCode", code=act.modality, displayName=self._modality(act.modality), codeSystem=DCM
            )
            b.add(b.add(method, "originalText"), "reference", value="#acte-1-modalite")
        else:
            b.add(procedure, "methodCode", nullFlavor="UNK")
        site_code, site_display = site
        if site_code:
            target = b.add(procedure, "targetSiteCode", code=site_code, displayName=site_display, codeSystem=SNOMED)
            b.add(b.add(target, "originalText"), "reference", value="#acte-1-localisation")
        else:
            b.add(procedure, "targetSiteCode", nullFlavor="UNK")

    def _history(
        self, b: _Builder, clinical: etree._Element, report: model.Report, section_id: Callable[[], str]
    ) -> None:
        history = report.section(HISTORY)
        text = history.text if history and history.text.strip() else UNKNOWN
        sec = b.section(clinical, HISTORY, section_id())
        narrative = b.add(sec, "text")
        for ref, value in (("atcd-med", text), ("atcd-chir", UNKNOWN), ("ci", UNKNOWN)):
            b.text(b.add(narrative, "paragraph"), "content", value).set("ID", ref)
        for ref, code, display in (
            ("atcd-med", "11348-0", "Antécédents médicaux"),
            ("atcd-chir", "47519-4", "Antécédents chirurgicaux"),
            ("ci", "64100-1", "Contre-indications"),
        ):
            obs = b.add(b.add(sec, "entry"), "observation", classCode="OBS", moodCode="EVN")
            b.templates(obs, ENTRY_TEMPLATES["history"])
            b.add(obs, "id", root=section_id())
            b.add(obs, "code", code=code, displayName=display, codeSystem=LOINC)
            b.add(b.add(obs, "text"), "reference", value=f"#{ref}")
            b.add(obs, "statusCode", code="completed")
            if code == "64100-1":  # coded from JDV_Contre_indications, or free text (ST)
                value = b.text(obs, "value", UNKNOWN)
                value.set(f"{{{XSI}}}type", "ST")
            else:
                value = b.add(obs, "value")
                value.set(f"{{{XSI}}}type", "CD")
                b.add(b.add(value, "originalText"), "reference", value=f"#{ref}")
            b.add(obs, "targetSiteCode", nullFlavor="MSK")

    def _catalog(
        self,
        b: _Builder,
        parent: etree._Element,
        report: model.Report,
        study: model.Study,
        section_id: Callable[[], str],
        started: str,
        modality_hint: str,
    ) -> None:
        """The DICOM object catalog: the study, one series, one instance (the link to the images)."""
        sec = b.section(parent, CATALOG, section_id())
        sec.set("classCode", "DOCSECT")
        sec.set("moodCode", "EVN")
        # The catalog points at the study rather than listing it: one series and one SOP instance carrying the
        # link to the images. The CI-SIS 2024.01 schematrons assert exactly one series per study act and one
        # instance per series (count() = 1), as in the ANS example, and the STD describes one "generic" series
        # with the viewer (IHE Invoke Image Display) URL. The narrative lists the whole study for the reader.
        series = _catalog_series(study, modality_hint)
        modality = series.modality if series.modality in _CATALOG_MODALITIES else modality_hint or series.modality
        sop_name = _sop_class_name(series.instances[0].sop_class_uid)
        self._catalog_narrative(b, b.add(sec, "text"), study, modality, sop_name)
        link = ""
        if self.image_link:
            link = self.image_link.replace("{study}", study.study_instance_uid).replace(
                "{accession}", report.accession_number.value
            )
        study_act = b.add(b.add(sec, "entry"), "act", classCode="ACT", moodCode="EVN")
        b.templates(study_act, ENTRY_TEMPLATES["study"])
        b.add(study_act, "id", root=study.study_instance_uid)
        b.add(study_act, "code", code="113014", displayName="Examen", codeSystem=DCM)
        b.add(study_act, "effectiveTime", value=started)
        self._catalog_series_entry(b, study_act, series, modality, sop_name, started, link)

    def _catalog_narrative(
        self, b: _Builder, text: etree._Element, study: model.Study, modality: str, sop_name: str
    ) -> None:
        """The whole study for the reader, then the modality and SOP class the entries refer to."""
        b.text(
            text,
            "paragraph",
            f"Examen {study.study_instance_uid} : {len(study.series)} série(s), {study.number_of_instances} objet(s)",
        )
        for s_index, item in enumerate(study.series, start=1):
            b.text(
                text,
                "paragraph",
                f"Série {item.number or s_index} ({item.uid}) : {self._modality(item.modality or 'OT')}, "
                f"{len(item.instances)} objet(s)" + (f" - {item.description}" if item.description else ""),
            )
        line = b.add(text, "paragraph")
        b.text(line, "content", self._modality(modality)).set("ID", "catalogue-modalite")
        _append_text(line, " : ")
        b.text(line, "content", sop_name).set("ID", "catalogue-sop")

    def _catalog_series_entry(
        self,
        b: _Builder,
        study_act: etree._Element,
        series: model.Series,
        modality: str,
        sop_name: str,
        started: str,
        link: str,
    ) -> None:
        """The series act of the study act, with its one instance observation (carrying ``link`` when set)."""
        instance = series.instances[0]
        series_act = b.add(
            b.add(study_act, "entryRelationship", typeCode="COMP"), "act", classCode="ACT", moodCode="EVN"
        )
        b.templates(series_act, ENTRY_TEMPLATES["series"])
        b.add(series_act, "id", root=series.uid)
        code = b.add(series_act, "code", code="113015", displayName="Séries", codeSystem=DCM)
        qualifier = b.add(code, "qualifier")
        b.add(qualifier, "name", code="121139", displayName="Modalité", codeSystem=DCM)
        value = b.add(qualifier, "value", code=modality, displayName=self._modality(modality), codeSystem=DCM)
        b.add(b.add(value, "originalText"), "reference", value="#catalogue-modalite")
        obs = b.add(
            b.add(series_act, "entryRelationship", typeCode="COMP"), "observation", classCode="DGIMG", moodCode="EVN"
        )
        b.templates(obs, ENTRY_TEMPLATES["instance"])
        b.add(obs, "id", root=instance.uid)
        sop = b.add(obs, "code", code=instance.sop_class_uid, displayName=sop_name, codeSystem=DCMUID)
        b.add(b.add(sop, "originalText"), "reference", value="#catalogue-sop")
        if link:
            b.add(b.add(obs, "text", mediaType="application/dicom"), "reference", value=link)
        b.add(obs, "effectiveTime", value=started)


class _Builder:
    """Small helpers over lxml for the HL7 v3 namespace."""

    def __init__(self, root: etree._Element) -> None:
        self.root = root

    def add(self, parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
        element = etree.SubElement(parent, f"{{{V3}}}{tag}")
        for key, value in attrs.items():
            element.set(key, value)
        return element

    def text(self, parent: etree._Element, tag: str, value: str) -> etree._Element:
        element = self.add(parent, tag)
        element.text = _clean(value)
        return element

    def path(self, parent: etree._Element, *tags: str) -> etree._Element:
        for tag in tags:
            parent = self.add(parent, tag)
        return parent

    def templates(self, parent: etree._Element, roots: tuple[str, ...]) -> None:
        for root in roots:
            self.add(parent, "templateId", root=root)

    def section(self, parent: etree._Element, code: str, section_id: str, *, title: str = "") -> etree._Element:
        """The ``SECTIONS`` section ``code`` in a new ``component`` of ``parent``: its templateIds, id, code and
        title (``title``, else the template's)."""
        template = SECTIONS[code]
        sec = self.add(self.add(parent, "component"), "section")
        self.templates(sec, template.templates)
        self.add(sec, "id", root=section_id)
        self.add(sec, "code", code=code, displayName=template.display, codeSystem=template.system)
        self.text(sec, "title", title or template.title or template.display)
        return sec

    def narrative(self, section: etree._Element, text: str) -> None:
        narrative = self.add(section, "text")
        for line in _lines(text) or [UNKNOWN]:
            self.text(narrative, "paragraph", line)


def _not_before(end: str, start: str) -> bool:
    """Whether the CDA TS ``end`` is not before ``start`` (a date alone compares by day)."""
    if len(end) < 14 or len(start) < 14:
        return end[:8] >= start[:8]
    try:
        return datetime.strptime(end, "%Y%m%d%H%M%S%z") >= datetime.strptime(start, "%Y%m%d%H%M%S%z")
    except ValueError:
        return end >= start


def _append_text(parent: etree._Element, text: str) -> None:
    """Mixed content: ``text`` after the last child of ``parent`` (its tail), or as its text when it has none."""
    if len(parent):
        parent[-1].tail = (parent[-1].tail or "") + text
    else:
        parent.text = (parent.text or "") + text


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _clean(value: str) -> str:
    """XML 1.0 cannot carry C0 control characters (an HL7 text may): they are dropped."""
    return _CONTROL.sub("", value)


# Modalities of JDV_ModaliteAcquisition_CISIS that a catalog series may carry (SR, KO, PR are not acquisitions).
_CATALOG_MODALITIES = {
    "AR", "BDUS", "BI", "BMD", "CR", "CT", "DG", "DMS", "DX", "ECG", "EEG", "EMG", "EOG", "EPS", "ES", "GM", "HD",
    "IO", "IVOCT", "IVUS", "KER", "LEN", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV",
    "OPTENF", "OPV", "OSS", "POS", "PT", "PX", "RESP", "RF", "RG", "RTIMAGE", "SM", "SRF", "TG", "US", "VA", "XA",
    "XC",
}  # fmt: skip


def _catalog_series(study: model.Study, modality: str) -> model.Series:
    """The series that stands for the study: of the act's modality if any, else the first acquisition series."""
    with_instances = [s for s in study.series if s.instances]
    for candidates in (
        [s for s in with_instances if s.modality == modality],
        [s for s in with_instances if s.modality in _CATALOG_MODALITIES],
        with_instances,
    ):
        if candidates:
            return candidates[0]
    raise CDAError(f"study {study.study_instance_uid} has no instance to reference in the DICOM object catalog")


PLACEHOLDER_ROOT = "2.25.0"  # a syntactically valid UID root, never published: see ``placeholder_study``


def placeholder_study(report: model.Report, act: model.ReportAct) -> model.Study:
    """A stand-in catalog (one series, one instance of the act's modality) for checking every other part of a
    structured report's CDA while its study is not known yet: the document built with it is validated, never
    published."""
    uid = report.study_instance_uid if model.is_uid(report.study_instance_uid) else f"{PLACEHOLDER_ROOT}.1"
    modality = act.modality if act.modality in _CATALOG_MODALITIES else "OT"
    instance = model.Instance(f"{PLACEHOLDER_ROOT}.3", "1.2.840.10008.5.1.4.1.1.7", "1")  # Secondary Capture
    return model.Study(uid, report.accession_number.value, report.patient, report.exam_time, series=[
        model.Series(f"{PLACEHOLDER_ROOT}.2", "1", modality, instances=[instance])
    ])  # fmt: skip


def _sop_class_name(uid: str) -> str:
    try:
        name = UID(uid).name
    except Exception:  # pydicom raises on malformed UIDs
        return uid
    return name if name and name != uid else uid


# -- ready documents ---------------------------------------------------------------------------------------


@dataclass
class CDAHeader:
    """What traboule reads from a ready CDA: its identity, the order and study it fulfils, its level."""

    id: str = ""
    set_id: str = ""
    version: int = 1
    title: str = ""
    effective_time: str = ""
    accession_number: str = ""
    accession_oid: str = ""
    placer_order_number: str = ""
    placer_oid: str = ""
    study_instance_uid: str = ""
    level: int = 3
    replaces: str = ""


# huge_tree: a level-1 document carries its PDF as one base64 text node, past libxml2's 10 MB default. Entities are
# not resolved and a DOCTYPE is refused (below), so nothing expands.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True, remove_blank_text=False)


def read_header(data: bytes) -> CDAHeader:
    """The header of a CDA document; raises ``CDAError`` when ``data`` is not a CDA ClinicalDocument."""
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise CDAError(f"not well-formed XML: {exc}") from exc
    if root.getroottree().docinfo.doctype:
        raise CDAError("a CDA document has no DOCTYPE (refused: entity declarations)")
    if root.tag != f"{{{V3}}}ClinicalDocument":
        raise CDAError(f"not a CDA document: root element {root.tag!r}")
    ns = {"v3": V3, "ps3-20": PS320}

    def ii(path: str) -> str:
        found = root.find(path, ns)
        if found is None:
            return ""
        ext = found.get("extension", "")
        return f"{found.get('root', '')}^{ext}" if ext else found.get("root", "")

    header = CDAHeader(id=ii("v3:id"), set_id=ii("v3:setId"))
    version = root.find("v3:versionNumber", ns)
    if version is not None and (version.get("value") or "").isdigit():
        header.version = int(version.get("value", "1"))
    header.title = (root.findtext("v3:title", "", ns) or "").strip()
    effective = root.find("v3:effectiveTime", ns)
    header.effective_time = effective.get("value", "") if effective is not None else ""
    order = root.find("v3:inFulfillmentOf/v3:order", ns)
    if order is not None:
        acc = order.find("ps3-20:accessionNumber", ns)
        if acc is not None:
            header.accession_number, header.accession_oid = acc.get("extension", ""), acc.get("root", "")
        placer = order.find("v3:id", ns)
        if placer is not None:
            header.placer_order_number, header.placer_oid = placer.get("extension", ""), placer.get("root", "")
    event_id = root.find("v3:documentationOf/v3:serviceEvent/v3:id", ns)
    if event_id is not None:
        uid = event_id.get("root", "")
        header.study_instance_uid = uid if _OID.match(uid) else ""
    templates = {t.get("root") for t in root.findall("v3:templateId", ns)}
    header.level = 1 if XDS_SD_TEMPLATE in templates or root.find("v3:component/v3:nonXMLBody", ns) is not None else 3
    parent = root.find("v3:relatedDocument[@typeCode='RPLC']/v3:parentDocument/v3:id", ns)
    if parent is not None:
        header.replaces = parent.get("root", "") + (f"^{parent.get('extension')}" if parent.get("extension") else "")
    return header


def decode_attachment(report: model.Report) -> bytes:
    """The bytes of the report's attachment (base64 in the message)."""
    data = "".join(report.attachment.split())
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=False)  # senders drop the padding
    except (ValueError, TypeError) as exc:
        raise CDAError(f"the attached document is not valid base64: {exc}") from exc
