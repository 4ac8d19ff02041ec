"""The DICOM audit message (PS3.15 Annex A.5, from RFC 3881) of an `AuditEvent`: `encode`.

One ``AuditMessage`` per event, as the schema of PS3.15 A.5.1 orders it: ``EventIdentification`` (the DCM event
code, the action, the time in UTC, the outcome, the IHE transaction as ``EventTypeCode``), the ``ActiveParticipant``
elements (who asked, the engine, where data went), ``AuditSourceIdentification`` (the engine's identity, type 4
"Application Server"), then one ``ParticipantObjectIdentification`` per patient and per other object. Coded values
use the current attribute names (``csd-code``, ``codeSystemName``, ``originalText``).

Every value comes from the network in the end (a calling AE title, a sending application, a query): characters XML
cannot carry are replaced by U+FFFD, each value is cut to a bound (`MAX_VALUE`, `MAX_TEXT`, `MAX_QUERY`) and an
event names at most `MAX_PARTICIPANTS` patients and objects, so that a message stays under `MAX_MESSAGE` bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from lxml import etree

from traboule.audit import MAX_QUERY, MAX_REFS, MAX_TEXT, MAX_VALUE, Actor, AuditEvent, ObjectRef, PatientRef

# MAX_VALUE: characters of an identifier, a name, a code; MAX_TEXT: of an outcome description; MAX_QUERY: bytes of
# a query kept, before base64 (of another object's detail: MAX_VALUE). The events are bounded the same way when
# they are made (`traboule.audit.AuditEvent`): what an event holds is what the repository receives.
MAX_PARTICIPANTS = MAX_REFS  # patients, and other objects, named by one message (each)
MAX_MESSAGE = 64 * 1024  # bytes an encoded message stays under (what an audit repository must accept)


class Code(NamedTuple):
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    system: str
    text: str


def dcm(code: str, text: str) -> Code:
    return Code(code, "DCM", text)


LOCAL = "99TRABOULE"  # the code system of the engine's own codes (the 99 prefix marks a local system in HL7)

EVENT_IDS = {
    "application-activity": dcm("110100", "Application Activity"),
    "export": dcm("110106", "Export"),
    "import": dcm("110107", "Import"),
    "order-record": dcm("110109", "Order Record"),
    "patient-record": dcm("110110", "Patient Record"),
    "procedure-record": dcm("110111", "Procedure Record"),
    "query": dcm("110112", "Query"),
    "security-alert": dcm("110113", "Security Alert"),
    "user-authentication": dcm("110114", "User Authentication"),
}

# EventTypeCode of an event's ``subtype``.
SUBTYPES = {
    ("application-activity", "start"): dcm("110120", "Application Start"),
    ("application-activity", "stop"): dcm("110121", "Application Stop"),
    ("security-alert", "node-authentication"): dcm("110126", "Node Authentication"),
    ("security-alert", "network-configuration"): dcm("110128", "Network Configuration"),
    ("security-alert", "configuration"): dcm("110129", "Security Configuration"),
    ("security-alert", "software-configuration"): dcm("110131", "Software Configuration"),
    ("security-alert", "restricted-function"): dcm("110132", "Use of Restricted Function"),
    ("user-authentication", "login"): dcm("110122", "Login"),
    ("user-authentication", "logout"): dcm("110123", "Logout"),
}

TRANSACTIONS = {
    "RAD-1": "Patient Registration",
    "RAD-2": "Placer Order Management",
    "RAD-3": "Filler Order Management",
    "RAD-4": "Procedure Scheduled",
    "RAD-5": "Query Modality Worklist",
    "RAD-6": "Modality Procedure Step In Progress",
    "RAD-7": "Modality Procedure Step Completed/Discontinued",
    "RAD-12": "Patient Update",
    "RAD-13": "Procedure Update",
    "RAD-28": "Structured Report Export",
    "RAD-128": "Report Results",
    "ITI-8": "Patient Identity Feed",
    "ITI-20": "Record Audit Event",
    "ITI-30": "Patient Identity Management",
    "ITI-41": "Provide and Register Document Set-b",
    "ITI-43": "Retrieve Document Set",
    "ITI-65": "Provide Document Bundle",
    "ITI-66": "Find Document Lists",
    "ITI-67": "Find Document References",
    "ITI-68": "Retrieve Document",
    "ITI-78": "Mobile Patient Demographics Query",
}

SOURCE = dcm("110153", "Source Role ID")
DESTINATION = dcm("110152", "Destination Role ID")
APPLICATION = dcm("110150", "Application")
LAUNCHER = dcm("110151", "Application Launcher")

PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")


class ObjectType(NamedTuple):
    """How an `ObjectRef` kind is identified: ParticipantObjectTypeCode, its role ("" = none), its ID type code."""

    type_code: str
    role: str
    id_type: Code


XDS = "IHE XDS Metadata"
OBJECT_TYPES = {
    "order": ObjectType("2", "20", Code("ORDER", LOCAL, "Order Number")),  # role 20: Job
    "accession": ObjectType("2", "3", Code("ACSN", "HL7v2-0203", "Accession ID")),  # role 3: Report
    "study": ObjectType("2", "3", dcm("110180", "Study Instance UID")),
    "document": ObjectType(
        "2", "3", Code("urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab", XDS, "XDSDocumentEntry.uniqueId")
    ),
    "submission-set": ObjectType(
        "2", "20", Code("urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd", XDS, "submission set classificationNode")
    ),
    "message": ObjectType("2", "", Code("MSH-10", LOCAL, "HL7 Message Control ID")),
    "resource": ObjectType("2", "", Code("12", "RFC-3881", "URI")),
    "mpps": ObjectType("2", "20", Code("MPPS", LOCAL, "MPPS SOP Instance UID")),
    "configuration": ObjectType("2", "13", Code("CONFIG", LOCAL, "Configuration")),  # role 13: Security Resource
    "journal-entry": ObjectType("2", "", Code("JOURNAL", LOCAL, "Journal Entry Ids")),
    "bus-message": ObjectType("2", "", Code("BUSMSG", LOCAL, "Bus Message Id")),
}
QUERY_ROLE = "24"  # ParticipantObjectTypeCodeRole: Query
REPORT_ROLE = "3"  # ParticipantObjectTypeCodeRole: Report (a DICOM query's object, PS3.15 A.5.3.12)
SOP_CLASS_UID = dcm("110181", "SOP Class UID")

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# What XML 1.0 cannot carry: C0 controls but tab, newline and carriage return, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class AuditSource:
    """The engine as the audit names it: ``source_id`` (AuditSourceID), ``enterprise_site_id``
    (AuditEnterpriseSiteID, "" = none), ``ae_title`` (the engine's DICOM AE title: its participant's UserID, else
    ``process``), ``host_name`` (its NetworkAccessPointID)."""

    source_id: str
    enterprise_site_id: str = ""
    ae_title: str = ""
    host_name: str = ""
    process: str = "traboule"


def clean(value: object, limit: int = MAX_VALUE) -> str:
    """``value`` as text XML can carry, at most ``limit`` characters."""
    text = value if isinstance(value, str) else str(value)
    text = text[:limit]
    return _NOT_XML.sub("\ufffd", text)


def hl7_escape(value: str) -> str:
    """A CX component: the HL7 v2 delimiters in ``value`` escaped."""
    out = value.replace("\\", "\\E\\")
    for char, escape in (("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        out = out.replace(char, escape)
    return out


def patient_id(patient: PatientRef) -> str:
    """The patient's identifier as a CX: ``value^^^&authority&ISO`` for an OID authority, ``value^^^authority`` for
    a namespace, ``value`` alone without one."""
    value = hl7_escape(clean(patient.value))
    authority = clean(patient.authority).strip()
    if not authority:
        return value[:MAX_VALUE]
    if _OID.fullmatch(authority):
        return f"{value}^^^&{authority}&ISO"[: MAX_VALUE * 2]
    return f"{value}^^^{hl7_escape(authority)}"[: MAX_VALUE * 2]


def event_time(at: float) -> str:
    """EventDateTime (xs:dateTime, UTC, milliseconds); a time that cannot be one is now."""
    if not isinstance(at, int | float) or not math.isfinite(at) or not 0 <= at < 253402300800:
        at = time.time()
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(at * 1000) % 1000:03d}Z"


def _code(parent: etree._Element, tag: str, code: Code) -> etree._Element:
    return etree.SubElement(
        parent,
        tag,
        {"csd-code": clean(code.code), "codeSystemName": clean(code.system), "originalText": clean(code.text)},
    )


def _address_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _participant(
    root: etree._Element, actor: Actor, *, requestor: bool, roles: tuple[Code, ...] = ()
) -> etree._Element:
    attrs = {"UserID": clean(actor.user_id or actor.address or actor.ae_title or "unknown")}
    if actor.ae_title:
        attrs["AlternativeUserID"] = "AETITLES=" + clean(actor.ae_title)
    name = actor.user_name or actor.cert_subject
    if name:
        attrs["UserName"] = clean(name)
    attrs["UserIsRequestor"] = "true" if requestor else "false"
    address = clean(actor.address).strip()
    if address:
        attrs["NetworkAccessPointID"] = address
        attrs["NetworkAccessPointTypeCode"] = _address_type(address)
    element = etree.SubElement(root, "ActiveParticipant", attrs)
    for role in roles:
        _code(element, "RoleIDCode", role)
    return element


def _engine(root: etree._Element, source: AuditSource, *, requestor: bool, roles: tuple[Code, ...]) -> None:
    attrs = {
        "UserID": clean(source.ae_title or source.process or "traboule"),
        "AlternativeUserID": str(os.getpid()),
        "UserIsRequestor": "true" if requestor else "false",
    }
    host = clean(source.host_name).strip()
    if host:
        attrs["NetworkAccessPointID"] = host
        attrs["NetworkAccessPointTypeCode"] = _address_type(host)
    element = etree.SubElement(root, "ActiveParticipant", attrs)
    for role in roles:
        _code(element, "RoleIDCode", role)


def _participants(root: etree._Element, event: AuditEvent, source: AuditSource) -> None:
    """Who took part, with the roles PS3.15 A.5.3 gives them for the event's kind."""
    requestor, destination = event.requestor, event.destination
    if event.kind == "application-activity":
        _engine(root, source, requestor=requestor is None, roles=(APPLICATION,))
        if requestor is not None:
            _participant(root, requestor, requestor=True, roles=(LAUNCHER,))
        return
    if event.kind in ("security-alert", "user-authentication"):
        if requestor is not None:
            _participant(root, requestor, requestor=True)
        _engine(root, source, requestor=requestor is None, roles=(APPLICATION,))
        return
    if event.kind == "export" or (event.kind == "patient-record" and event.action == "R"):
        # Data left the engine: the engine is the source, the peer it went to the destination.
        _engine(root, source, requestor=requestor is None, roles=(SOURCE,))
        target = destination or requestor
        if target is not None:
            _participant(root, target, requestor=target == requestor, roles=(DESTINATION,))
        if requestor is not None and requestor != target:
            _participant(root, requestor, requestor=True)
        return
    # Data came in (a message, an MPPS, an import) or a query was asked: the peer is the source.
    if requestor is not None:
        _participant(root, requestor, requestor=True, roles=(SOURCE,))
    _engine(root, source, requestor=requestor is None, roles=() if destination else (DESTINATION,))
    if destination is not None:
        _participant(root, destination, requestor=False, roles=(DESTINATION,))


def _object(
    root: etree._Element,
    object_id: str,
    type_code: str,
    role: str,
    id_type: Code,
    *,
    name: str = "",
    query: bytes | None = None,
    details: tuple[tuple[str, bytes], ...] = (),
    mpps: str = "",
) -> None:
    attrs = {"ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code}
    if role:
        attrs["ParticipantObjectTypeCodeRole"] = role
    element = etree.SubElement(root, "ParticipantObjectIdentification", attrs)
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        etree.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode("ascii")
    else:  # the schema of A.5.1 asks for a name or a query
        etree.SubElement(element, "ParticipantObjectName").text = name or object_id
    for kind, value in details:
        etree.SubElement(
            element, "ParticipantObjectDetail", {"type": clean(kind), "value": base64.b64encode(value).decode("ascii")}
        )
    if mpps:
        description = etree.SubElement(element, "ParticipantObjectDescription")
        etree.SubElement(description, "MPPS", {"UID": mpps})


def _other(root: etree._Element, ref: ObjectRef, event: AuditEvent) -> None:
    value = clean(ref.value)
    detail = bytes(ref.detail[: MAX_QUERY if ref.kind == "query" else MAX_VALUE])
    if ref.kind == "query" and ref.transfer_syntax:  # a DICOM query (PS3.15 A.5.3.12): the SOP class, its dataset
        syntax = clean(ref.transfer_syntax, 64).encode("ascii", "replace")
        _object(root, value, "2", REPORT_ROLE, SOP_CLASS_UID, query=detail, details=(("TransferSyntax", syntax),))
        return
    if ref.kind == "query":
        transaction = clean(event.transaction or ref.value)
        id_type = (
            Code(transaction, "IHE Transactions", TRANSACTIONS.get(transaction, transaction))
            if transaction in TRANSACTIONS or re.fullmatch(r"[A-Z]{2,5}-\d{1,4}", transaction)
            else Code("10", "RFC-3881", "Search Criteria")
        )
        _object(root, value, "2", QUERY_ROLE, id_type, query=detail)
        return
    kind = OBJECT_TYPES.get(ref.kind) or ObjectType("2", "", Code(clean(ref.kind) or "object", LOCAL, "Object"))
    details = ((("sha256" if ref.kind == "configuration" else "detail"), detail),) if detail else ()
    _object(
        root, value, kind.type_code, kind.role, kind.id_type, details=details, mpps=value if ref.kind == "mpps" else ""
    )


def build(event: AuditEvent, source: AuditSource) -> etree._Element:
    """The ``AuditMessage`` element of ``event`` (see `encode`)."""
    root = etree.Element("AuditMessage")
    identification = etree.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action if event.action in ("C", "R", "U", "D", "E") else "E",
            "EventDateTime": event_time(event.at),
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _code(identification, "EventID", EVENT_IDS.get(event.kind, dcm("110113", "Security Alert")))
    subtype = SUBTYPES.get((event.kind, event.subtype))
    if subtype is not None:
        _code(identification, "EventTypeCode", subtype)
    transaction = clean(event.transaction, 32).strip()
    if transaction:
        _code(
            identification,
            "EventTypeCode",
            Code(transaction, "IHE Transactions", TRANSACTIONS.get(transaction, transaction)),
        )
    if event.description:
        etree.SubElement(identification, "EventOutcomeDescription").text = clean(event.description, MAX_TEXT)
    _participants(root, event, source)
    attrs = {"AuditSourceID": clean(source.source_id or source.host_name or "traboule")}
    if source.enterprise_site_id:
        attrs = {"AuditEnterpriseSiteID": clean(source.enterprise_site_id), **attrs}
    audit_source = etree.SubElement(root, "AuditSourceIdentification", attrs)
    etree.SubElement(audit_source, "AuditSourceTypeCode", {"csd-code": "4"})  # Application Server process
    # The HL7 v2 message an event is about (MSH-10) also on each patient's object (ITI-8 / ITI-30 style).
    msh10 = tuple(
        ("MSH-10", clean(ref.value).encode("utf-8", "replace"))
        for ref in event.objects[:MAX_PARTICIPANTS]
        if ref.kind == "message" and ref.value
    )[:1]
    for patient in event.patients[:MAX_PARTICIPANTS]:
        _object(root, patient_id(patient), "1", "1", PATIENT_NUMBER, details=msh10)
    for ref in event.objects[:MAX_PARTICIPANTS]:
        _other(root, ref, event)
    return root


def encode(event: AuditEvent, source: AuditSource) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of ``event`` reported by ``source``: UTF-8 XML, no declaration, under
    `MAX_MESSAGE` bytes (the last participant objects are left out of a message that would be larger)."""
    root = build(event, source)
    xml = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    objects = root.findall("ParticipantObjectIdentification")
    while len(xml) >= MAX_MESSAGE and objects:
        root.remove(objects.pop())
        xml = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    return xml
