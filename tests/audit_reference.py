"""The DICOM audit message as the engine first built it, with lxml: the reference `traboule.audit.message.encode`
must give byte for byte (tests/test_audit_encoding.py, bench/audit_encode.py). The code tables are the engine's;
`clean`, `patient_id` and `event_time` are kept here as they were, so that the engine's own are checked too."""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import re
import time
from datetime import UTC, datetime

from lxml import etree

from traboule.audit import Actor, AuditEvent, ObjectRef, PatientRef
from traboule.audit.message import (
    APPLICATION,
    DESTINATION,
    EVENT_IDS,
    LAUNCHER,
    LOCAL,
    MAX_MESSAGE,
    MAX_PARTICIPANTS,
    MAX_QUERY,
    MAX_TEXT,
    MAX_VALUE,
    OBJECT_TYPES,
    PATIENT_NUMBER,
    QUERY_ROLE,
    REPORT_ROLE,
    SOP_CLASS_UID,
    SOURCE,
    SUBTYPES,
    TRANSACTIONS,
    AuditSource,
    Code,
    ObjectType,
    dcm,
)

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# What XML 1.0 cannot carry: C0 controls but tab, newline and carriage return, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


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
