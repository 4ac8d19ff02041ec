"""Canonical model: the one shape every format is translated to and from.

Formats meet here (HL7 v2, DICOM, FHIR, CDA) instead of being converted pairwise. Attributes are named for what
they mean; field paths of a given format appear only in mapping files and in that format's parser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

INS_OIDS = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR (test)",
    "1.2.250.1.213.1.4.11": "INS-NIR (demo)",
}

OrderAction = Literal["new", "change", "cancel", "status"]
StepStatus = Literal["SCHEDULED", "ARRIVED", "READY", "STARTED", "COMPLETED", "DISCONTINUED", "CANCELLED"]

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", re.ASCII)


def is_uid(text: str) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, no leading zero in a component, at most 64 characters. What may
    go into a DICOMweb path segment or a worklist: anything else (``../tools/reset?x=1#``) is refused."""
    return len(text) <= 64 and _UID.fullmatch(text) is not None


@dataclass
class Identifier:
    """An identifier with its assigning authority (HL7 CX / DICOM ID + issuer / FHIR Identifier)."""

    value: str = ""
    issuer: str = ""  # namespace id, e.g. CHU-X or ASIP-SANTE-INS-NIR
    issuer_oid: str = ""  # universal id (OID) of the issuer
    type: str = ""  # PI, INS, AN, VN ...


@dataclass
class PersonName:
    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    def is_empty(self) -> bool:
        return not any((self.family, self.given, self.middle, self.prefix, self.suffix))


@dataclass
class Practitioner:
    id: str = ""
    name: PersonName = field(default_factory=PersonName)


@dataclass
class Code:
    code: str = ""
    display: str = ""
    system: str = ""


@dataclass
class Patient:
    """A patient as known by the ordering system; ``ids[0]`` is the primary (local) identifier."""

    ids: list[Identifier] = field(default_factory=list)
    name: PersonName = field(default_factory=PersonName)
    birth_name: str = ""
    birth_given_name: str = ""  # first given name at birth (INS trait)
    birth_given_names: str = ""  # every given name at birth, space-separated as INSi returns them (INS trait)
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, O, U
    identity_status: str = ""  # identity reliability, PID-32 (table 0445: VIDE, PROV, VALI, DOUT, FICT...)
    birth_place_code: str = ""  # INSEE COG of the birthplace (INS trait)

    @property
    def primary_id(self) -> Identifier | None:
        return next((i for i in self.ids if i.type != "INS"), self.ids[0] if self.ids else None)

    @property
    def ins(self) -> Identifier | None:
        return next((i for i in self.ids if i.type == "INS" or i.issuer_oid in INS_OIDS), None)


@dataclass
class ScheduledStep:
    """One scheduled procedure step (a DICOM MWL item's SPS)."""

    step_id: str = ""
    modality: str = ""
    station_aet: str = ""
    station_name: str = ""
    location: str = ""
    start: str = ""  # YYYYMMDD[HHMM[SS]]
    description: str = ""
    protocol: Code = field(default_factory=Code)
    performing_physician: PersonName = field(default_factory=PersonName)
    status: StepStatus = "SCHEDULED"


@dataclass
class ImagingOrder:
    """An imaging order (requested procedure) and its scheduled steps."""

    action: OrderAction = "new"
    placer_order_number: Identifier = field(default_factory=lambda: Identifier(""))
    filler_order_number: Identifier = field(default_factory=lambda: Identifier(""))
    accession_number: Identifier = field(default_factory=lambda: Identifier(""))
    requested_procedure_id: str = ""
    study_instance_uid: str = ""
    procedure: Code = field(default_factory=Code)
    reason: str = ""
    priority: str = "ROUTINE"  # DICOM Requested Procedure Priority
    requesting_physician: Practitioner = field(default_factory=Practitioner)
    referring_physician: Practitioner = field(default_factory=Practitioner)
    admission_id: str = ""
    medical_alerts: str = ""
    patient_weight: str = ""
    patient_size: str = ""
    institution: str = ""
    patient: Patient = field(default_factory=Patient)
    steps: list[ScheduledStep] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Stable key of the order across new/change/cancel messages."""
        for ident in (self.placer_order_number, self.filler_order_number, self.accession_number):
            if ident.value:
                return f"{ident.issuer or ident.issuer_oid}|{ident.value}"
        return ""


@dataclass
class PatientUpdate:
    """Demographics update (ADT^A08) or merge (ADT^A40: ``merged_ids`` now belong to ``patient``).

    ``authoritative``: an update from the patient identity system (an identity source of the inbound channel): its
    INS replaces the one recorded for the IPP (the FHIR Patient's too), where other messages only add one."""

    action: Literal["update", "merge"] = "update"
    patient: Patient = field(default_factory=Patient)
    merged_ids: list[Identifier] = field(default_factory=list)
    authoritative: bool = False


ProcedureStatus = Literal["IN PROGRESS", "COMPLETED", "DISCONTINUED"]


@dataclass
class PerformedStep:
    """A performed procedure step reported by a modality (DICOM MPPS N-CREATE / N-SET)."""

    sop_instance_uid: str = ""  # the MPPS instance
    status: ProcedureStatus = "IN PROGRESS"
    study_instance_uid: str = ""
    accession_number: str = ""
    requested_procedure_id: str = ""
    scheduled_step_id: str = ""
    placer_order_number: str = ""
    filler_order_number: str = ""
    patient: Patient = field(default_factory=Patient)
    modality: str = ""
    station_aet: str = ""
    started: str = ""  # YYYYMMDDHHMMSS
    ended: str = ""
    description: str = ""
    series_uids: list[str] = field(default_factory=list)  # the performed series (also in ``series``)
    series: list[Series] = field(default_factory=list)  # with their instances (SOP class + instance UIDs)


@dataclass
class Instance:
    uid: str = ""
    sop_class_uid: str = ""
    number: str = ""


@dataclass
class Series:
    uid: str = ""
    number: str = ""
    modality: str = ""
    description: str = ""
    body_site: str = ""
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Study:
    """A study as the archive holds it (read through DICOMweb when it becomes stable)."""

    study_instance_uid: str = ""
    accession_number: str = ""
    patient: Patient = field(default_factory=Patient)
    started: str = ""  # YYYYMMDD[HHMMSS]
    description: str = ""
    referring_physician: PersonName = field(default_factory=PersonName)
    series: list[Series] = field(default_factory=list)
    endpoint: str = ""  # the archive's DICOMweb (WADO-RS) base URL for this study

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series if s.modality})

    @property
    def number_of_instances(self) -> int:
        return sum(len(s.instances) for s in self.series)


ReportAction = Literal["publish", "replace", "delete"]


@dataclass
class Observation:
    """One result row of a report message (HL7 OBX) as received: coded, with its text or encapsulated data."""

    value_type: str = ""  # TX, FT, ST, CWE, ED, RP ...
    code: str = ""
    display: str = ""
    system: str = ""
    sub_id: str = ""
    text: str = ""  # every repetition, unescaped, one line each (FT .br. breaks become newlines)
    status: str = ""  # F final, C corrected, D deleted, P preliminary ...
    media_type: str = ""  # ED: e.g. application/pdf, text/xml
    encoding: str = ""  # ED: Base64, A (ASCII) ...
    data: str = ""  # ED: the encapsulated data as received (base64 text)


@dataclass
class ReportSection:
    """A section of the report's text: LOINC code (18782-3 findings, 19005-8 conclusion...), title, text."""

    code: str = ""
    title: str = ""
    text: str = ""


@dataclass
class ReportAct:
    """An imaging act the report covers: LOINC code of the CI-SIS value set, CCAM code, modality, region."""

    code: Code = field(default_factory=Code)
    ccam: str = ""
    modality: str = ""
    region: Code = field(default_factory=Code)


@dataclass
class SharingFlag:
    """A sharing instruction from the sender (CI-SIS ``MetaDMPMSS`` rows: MASQUE_PS, DESTDMP...): code, Y/N or text."""

    code: str = ""
    value: str = ""


@dataclass
class Report:
    """An imaging report (compte rendu): what to publish, replace or delete, with everything the CDA needs."""

    action: ReportAction = "publish"
    document_id: str = ""  # the sender's document id (TXA-12), when it gives one
    replaced_document_id: str = ""  # TXA-13: the document a replacement supersedes
    status: str = ""  # the report's result status (OBX-11 / TXA-17)
    title: str = ""
    patient: Patient = field(default_factory=Patient)
    author: Practitioner = field(default_factory=Practitioner)
    legal_authenticator: Practitioner = field(default_factory=Practitioner)
    organization_id: str = ""  # idNat of the producing organisation (1 + FINESS)
    organization_name: str = ""
    placer_order_number: Identifier = field(default_factory=lambda: Identifier(""))
    filler_order_number: Identifier = field(default_factory=lambda: Identifier(""))
    accession_number: Identifier = field(default_factory=lambda: Identifier(""))
    study_instance_uid: str = ""
    procedure: Code = field(default_factory=Code)
    modality: str = ""
    exam_time: str = ""  # when the exam was performed (OBR-7)
    ended: str = ""  # when the exam ended (OBR-8; else the end of its MPPS)
    report_time: str = ""  # when the report was written/validated (OBR-22, TXA-4)
    encounter_class: str = ""  # PV1-2: I, O, E ...
    observations: list[Observation] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)
    acts: list[ReportAct] = field(default_factory=list)
    sharing: list[SharingFlag] = field(default_factory=list)
    attachment_type: str = ""  # a ready document in the message: application/pdf or text/xml (a CDA)
    attachment: str = ""  # base64

    def section(self, code: str) -> ReportSection | None:
        return next((s for s in self.sections if s.code == code), None)

    def flag(self, code: str) -> str:
        return next((f.value for f in self.sharing if f.code == code), "")


@dataclass
class Document:
    """A published version of a report document (the CDA), ready for sharing: XDS, MHD, DRIMbox feeds.

    ``action``: publish (first version), replace (``replaces`` is the superseded version's id) or delete (this
    version is withdrawn). Ids are CDA instance identifiers: ``root`` or ``root^extension``.
    """

    action: ReportAction = "publish"
    id: str = ""
    set_id: str = ""
    version: int = 1
    replaces: str = ""
    level: int = 3  # CDA level: 3 structured, 1 PDF in nonXMLBody
    media_type: str = "text/xml"
    content: str = ""  # base64 of the CDA bytes
    sha1: str = ""  # hex SHA-1 of the CDA bytes (XDS hash)
    size: int = 0
    title: str = ""
    created: str = ""  # the CDA effectiveTime (YYYYMMDDHHMMSS+ZZZZ)
    service_start: str = ""
    service_stop: str = ""
    confidentiality: list[Code] = field(default_factory=list)  # masking codes beyond the CDA's N (system = OID)
    report: Report = field(default_factory=Report)


Payload = ImagingOrder | PatientUpdate | PerformedStep | Study | Report | Document

PAYLOAD_TYPES: dict[str, type] = {
    "ImagingOrder": ImagingOrder,
    "PatientUpdate": PatientUpdate,
    "PerformedStep": PerformedStep,
    "Study": Study,
    "Report": Report,
    "Document": Document,
}


@dataclass
class Envelope:
    """An event on the bus: a canonical payload with its tracing and idempotency data."""

    payload: Payload
    source: str = ""  # channel name that produced it
    idempotency_key: str = ""
    correlation_id: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))

    @property
    def kind(self) -> str:
        return type(self.payload).__name__

    def to_json(self) -> bytes:
        body = {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "idempotency_key": self.idempotency_key,
            "correlation_id": self.correlation_id,
            "created": self.created,
            "payload": self.payload,
        }
        # orjson walks the dataclasses itself: the same bytes as json.dumps(ensure_ascii=False, compact separators),
        # ~10x faster (the stdlib encoder called back into Python for every dataclass: a tenth of an order's time).
        return orjson.dumps(body, default=_fields)

    @classmethod
    def from_json(cls, data: bytes | str) -> Envelope:
        body = orjson.loads(data)
        payload = from_dict(PAYLOAD_TYPES[body["kind"]], body["payload"])
        return cls(
            payload=payload,
            source=body.get("source", ""),
            idempotency_key=body.get("idempotency_key", ""),
            correlation_id=body.get("correlation_id", ""),
            id=body["id"],
            created=body.get("created", ""),
        )


def topic_of(payload: Payload) -> str:
    """The bus topic of a canonical event, the one subscribers bind to: ``order.<action>``, ``patient.<action>``,
    ``document.<action>``, ``procedure.<status>`` (``in-progress``, ``completed``, ``discontinued``) and
    ``study.stable`` (the archive publishes a study once stable). A report travels as its document."""
    if isinstance(payload, ImagingOrder):
        return f"order.{payload.action}"
    if isinstance(payload, PatientUpdate):
        return f"patient.{payload.action}"
    if isinstance(payload, Document):
        return f"document.{payload.action}"
    if isinstance(payload, PerformedStep):
        return "procedure." + payload.status.lower().replace(" ", "-")
    if isinstance(payload, Study):
        return "study.stable"
    raise TypeError(f"a {type(payload).__name__} is not published as such (a report travels as its document)")


def plain(obj: Any) -> Any:
    """A dataclass tree as dicts and lists; ``dataclasses.asdict`` does the same five times slower (deep copies),
    which shows on the ingest path."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: plain(v) for k, v in obj.__dict__.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def _fields(obj: Any) -> dict[str, Any]:
    """The JSON encoder's hook for a dataclass: its fields as they are, the encoder (C) walks them; the same output
    as `plain`, a third faster on the ingest path."""
    if hasattr(obj, "__dataclass_fields__"):
        return obj.__dict__
    raise TypeError(f"a {type(obj).__name__} is not JSON serializable")


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) dataclass from ``plain`` output; unknown keys are ignored."""
    reader = _READERS.get(cls)
    if reader is None:
        reader = _READERS[cls] = _reader(cls)
    return reader(data)


_READERS: dict[type, Callable[[dict[str, Any]], Any]] = {}


def _reader(cls: type) -> Callable[[dict[str, Any]], Any]:
    """How to rebuild a ``cls`` from its dict, made once per class: resolving type hints on every event cost more
    than the rest of the decoding, and a class of plain fields (most: identifiers, codes) takes one comprehension."""
    import typing

    builders = {name: _builder(hint) for name, hint in typing.get_type_hints(cls).items()}
    plain_fields = frozenset(name for name, build in builders.items() if build is None)
    nested = {name: build for name, build in builders.items() if build is not None}
    if not nested:
        return lambda data: cls(**{k: v for k, v in data.items() if k in plain_fields})

    def read(data: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in plain_fields:
                kwargs[name] = value
            else:
                build = nested.get(name)
                if build is not None:
                    kwargs[name] = build(value)
        return cls(**kwargs)

    return read


def _builder(hint: Any) -> Any:
    import typing

    if dataclasses.is_dataclass(hint):
        return lambda value: from_dict(hint, value) if isinstance(value, dict) else value  # type: ignore[arg-type]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        inner = _builder(item)
        if inner is None:
            return None
        return lambda value: [inner(v) for v in value] if isinstance(value, list) else value
    return None


def content_key(*parts: str) -> str:
    """A short stable hash used as an idempotency key when the sender gives none."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]
