"""The DICOM audit message (PS3.15 Annex A.5, from RFC 3881) of an `AuditEvent`: `encode`.

One ``AuditMessage`` per event, as the schema of PS3.15 A.5.1 orders it: ``EventIdentification`` (the DCM event
code, the action, the time in UTC, the outcome, the IHE transaction as ``EventTypeCode``), the ``ActiveParticipant``
elements (who asked, the engine, where data went), ``AuditSourceIdentification`` (the engine's identity, type 4
"Application Server"), then one ``ParticipantObjectIdentification`` per patient and per other object. Coded values
use the current attribute names (``csd-code``, ``codeSystemName``, ``originalText``).

Every value comes from the network in the end (a calling AE title, a sending application, a query): characters XML
cannot carry are replaced by U+FFFD, each value is cut to a bound (`MAX_VALUE`, `MAX_TEXT`, `MAX_QUERY`) and an
event names at most `MAX_PARTICIPANTS` patients and objects, so that a message stays under `MAX_MESSAGE` bytes.

The message is written as text (`render`), escaped as libxml2 escapes (`escape_attribute`, `escape_text`): the
bytes of the lxml tree it replaced, for a fraction of the cost (bench/audit_encode.py); the parts that depend only
on the engine and on constant codes are kept once made.
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
from functools import lru_cache
from typing import NamedTuple

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

SECURITY_ALERT = EVENT_IDS["security-alert"]  # the EventID of an event of an unknown kind
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

_HL7_DELIMITERS = re.compile(r"[\\|^&~]")
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
    if _HL7_DELIMITERS.search(value) is None:
        return value
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


_second: tuple[int, str] = (-1, "")  # the last second `event_time` wrote, and its text up to the milliseconds


def event_time(at: float) -> str:
    """EventDateTime (xs:dateTime, UTC, milliseconds); a time that cannot be one is now."""
    global _second
    plain = type(at) is float and 0.0 <= at < 253402300800.0  # (NaN fails the comparison)
    if not plain and (not isinstance(at, int | float) or not math.isfinite(at) or not 0 <= at < 253402300800):
        at = time.time()
    # The second as `datetime.fromtimestamp` gives it (the time rounded to the microsecond, half to even): its text
    # is made once a second.
    second = int(at)
    if at - second >= 0.999999:
        fraction, whole = math.modf(at)
        second = int(whole) + (round(fraction * 1e6) >= 1_000_000)
    cached = _second
    if cached[0] != second:
        cached = _second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S."))
    return f"{cached[1]}{int(at * 1000) % 1000:03d}Z"


# The message is written as text, not built as an lxml tree and serialised: building the elements was nearly all
# of an event's cost (~100 µs, on the ingest process's interpreter). The escaping below is what libxml2 writes
# (attribute values: & < > " and tab, newline, carriage return as references; text: & < > and carriage return), so
# that the bytes are the ones the tree gave (tests/test_audit_encoding.py checks them against it).
_ATTR_SPECIAL = re.compile('[&<>"\t\n\r]')
_TEXT_SPECIAL = re.compile("[&<>\r]")
# A value that needs neither `clean` nor escaping (the common case: one search, then the value as it is).
_ATTR_PLAIN = re.compile('[^\x00-\x1f&<>"\ud800-\udfff\ufffe\uffff]*')


def escape_attribute(text: str) -> str:
    """``text`` (XML characters) as an attribute value between double quotes, as libxml2 writes it."""
    if _ATTR_SPECIAL.search(text) is None:
        return text
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return text.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")


def escape_text(text: str) -> str:
    """``text`` (XML characters) as element content, as libxml2 writes it."""
    if _TEXT_SPECIAL.search(text) is None:
        return text
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _attr(value: object, limit: int = MAX_VALUE) -> str:
    """A received value `clean` and escaped as an attribute value."""
    if type(value) is str and len(value) <= limit and _ATTR_PLAIN.fullmatch(value) is not None:
        return value
    return escape_attribute(clean(value, limit))


@lru_cache(maxsize=1024)
def _code(tag: str, code: Code) -> str:
    system, text = _attr(code.system), _attr(code.text)
    return f'<{tag} csd-code="{_attr(code.code)}" codeSystemName="{system}" originalText="{text}"/>'


def _address_type(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"  # machine name
    return "2"  # IP address


def _element(tag: str, attrs: str, children: str) -> str:
    return f"<{tag}{attrs}>{children}</{tag}>" if children else f"<{tag}{attrs}/>"


def _access_point(address: str) -> str:
    """NetworkAccessPointID and its type code (a `clean`, stripped, non-empty address) as attributes."""
    return f' NetworkAccessPointID="{escape_attribute(address)}" NetworkAccessPointTypeCode="{_address_type(address)}"'


@lru_cache(maxsize=1024)
def _participant(actor: Actor, requestor: bool, roles: tuple[Code, ...] = ()) -> str:
    attrs = f' UserID="{_attr(actor.user_id or actor.address or actor.ae_title or "unknown")}"'
    if actor.ae_title:
        attrs += f' AlternativeUserID="{escape_attribute("AETITLES=" + clean(actor.ae_title))}"'
    name = actor.user_name or actor.cert_subject
    if name:
        attrs += f' UserName="{_attr(name)}"'
    attrs += ' UserIsRequestor="true"' if requestor else ' UserIsRequestor="false"'
    address = clean(actor.address).strip()
    if address:
        attrs += (
            f' NetworkAccessPointID="{escape_attribute(address)}" NetworkAccessPointTypeCode="{_address_type(address)}"'
        )
    return _element("ActiveParticipant", attrs, "".join(_code("RoleIDCode", role) for role in roles))


@lru_cache(maxsize=64)
def _engine(source: AuditSource, requestor: bool, roles: tuple[Code, ...], pid: int) -> str:
    attrs = f' UserID="{_attr(source.ae_title or source.process or "traboule")}" AlternativeUserID="{pid}"'
    attrs += ' UserIsRequestor="true"' if requestor else ' UserIsRequestor="false"'
    host = clean(source.host_name).strip()
    if host:
        attrs += _access_point(host)
    return _element("ActiveParticipant", attrs, "".join(_code("RoleIDCode", role) for role in roles))


def _participants(out: list[str], event: AuditEvent, source: AuditSource) -> None:
    """Who took part, with the roles PS3.15 A.5.3 gives them for the event's kind."""
    requestor, destination = event.requestor, event.destination
    pid = os.getpid()
    if event.kind == "application-activity":
        out.append(_engine(source, requestor is None, (APPLICATION,), pid))
        if requestor is not None:
            out.append(_participant(requestor, True, (LAUNCHER,)))
        return
    if event.kind in ("security-alert", "user-authentication"):
        if requestor is not None:
            out.append(_participant(requestor, True))
        out.append(_engine(source, requestor is None, (APPLICATION,), pid))
        return
    if event.kind == "export" or (event.kind == "patient-record" and event.action == "R"):
        # Data left the engine: the engine is the source, the peer it went to the destination.
        out.append(_engine(source, requestor is None, (SOURCE,), pid))
        target = destination or requestor
        if target is not None:
            out.append(_participant(target, target == requestor, (DESTINATION,)))
        if requestor is not None and requestor != target:
            out.append(_participant(requestor, True))
        return
    # Data came in (a message, an MPPS, an import) or a query was asked: the peer is the source.
    if requestor is not None:
        out.append(_participant(requestor, True, (SOURCE,)))
    out.append(_engine(source, requestor is None, () if destination else (DESTINATION,), pid))
    if destination is not None:
        out.append(_participant(destination, False, (DESTINATION,)))


@lru_cache(maxsize=256)
def _object_type(type_code: str, role: str, id_type: Code) -> str:
    """What follows a ParticipantObjectID: the type code, the role, the ID type code element."""
    role_attr = f' ParticipantObjectTypeCodeRole="{role}"' if role else ""
    return f' ParticipantObjectTypeCode="{type_code}"{role_attr}>{_code("ParticipantObjectIDTypeCode", id_type)}'


def _object(
    object_id: str,
    type_code: str,
    role: str,
    id_type: Code,
    *,
    query: bytes | None = None,
    details: str = "",
    mpps: bool = False,
) -> str:
    """A ParticipantObjectIdentification; ``object_id`` is `clean` (the name when there is no query, the MPPS UID
    of its description for ``mpps``), ``details`` the ParticipantObjectDetail elements already written."""
    escaped = escape_attribute(object_id)
    if query is not None:
        named = f"<ParticipantObjectQuery>{base64.b64encode(query).decode('ascii')}</ParticipantObjectQuery>"
    else:  # the schema of A.5.1 asks for a name or a query (text escapes less than an attribute: maybe nothing)
        name = object_id if escaped is object_id else escape_text(object_id)
        named = f"<ParticipantObjectName>{name}</ParticipantObjectName>"
    description = (
        f'<ParticipantObjectDescription><MPPS UID="{escaped}"/></ParticipantObjectDescription>'
        if mpps and object_id
        else ""
    )
    return (
        f'<ParticipantObjectIdentification ParticipantObjectID="{escaped}"{_object_type(type_code, role, id_type)}'
        f"{named}{details}{description}</ParticipantObjectIdentification>"
    )


def _detail(kind: str, value: bytes) -> str:
    return f'<ParticipantObjectDetail type="{_attr(kind)}" value="{base64.b64encode(value).decode("ascii")}"/>'


def _other(ref: ObjectRef, event: AuditEvent) -> str:
    value = clean(ref.value)
    detail = bytes(ref.detail[: MAX_QUERY if ref.kind == "query" else MAX_VALUE])
    if ref.kind == "query" and ref.transfer_syntax:  # a DICOM query (PS3.15 A.5.3.12): the SOP class, its dataset
        syntax = clean(ref.transfer_syntax, 64).encode("ascii", "replace")
        return _object(value, "2", REPORT_ROLE, SOP_CLASS_UID, query=detail, details=_detail("TransferSyntax", syntax))
    if ref.kind == "query":
        transaction = clean(event.transaction or ref.value)
        id_type = (
            Code(transaction, "IHE Transactions", TRANSACTIONS.get(transaction, transaction))
            if transaction in TRANSACTIONS or re.fullmatch(r"[A-Z]{2,5}-\d{1,4}", transaction)
            else Code("10", "RFC-3881", "Search Criteria")
        )
        return _object(value, "2", QUERY_ROLE, id_type, query=detail)
    kind = OBJECT_TYPES.get(ref.kind) or ObjectType("2", "", Code(clean(ref.kind) or "object", LOCAL, "Object"))
    details = _detail("sha256" if ref.kind == "configuration" else "detail", detail) if detail else ""
    return _object(value, kind.type_code, kind.role, kind.id_type, details=details, mpps=ref.kind == "mpps")


@lru_cache(maxsize=64)
def _audit_source(source: AuditSource) -> str:
    attrs = f' AuditSourceID="{_attr(source.source_id or source.host_name or "traboule")}"'
    if source.enterprise_site_id:
        attrs = f' AuditEnterpriseSiteID="{_attr(source.enterprise_site_id)}"' + attrs
    # AuditSourceTypeCode 4: Application Server process
    return f'<AuditSourceIdentification{attrs}><AuditSourceTypeCode csd-code="4"/></AuditSourceIdentification>'


def _identification(event: AuditEvent) -> str:
    action = event.action if event.action in ("C", "R", "U", "D", "E") else "E"
    parts = [
        f'<EventIdentification EventActionCode="{action}" EventDateTime="{event_time(event.at)}"'
        f' EventOutcomeIndicator="{int(event.outcome)}">',
        _code("EventID", EVENT_IDS.get(event.kind, SECURITY_ALERT)),
    ]
    subtype = SUBTYPES.get((event.kind, event.subtype))
    if subtype is not None:
        parts.append(_code("EventTypeCode", subtype))
    transaction = clean(event.transaction, 32).strip()
    if transaction:
        parts.append(
            _code("EventTypeCode", Code(transaction, "IHE Transactions", TRANSACTIONS.get(transaction, transaction)))
        )
    if event.description:
        parts.append(
            f"<EventOutcomeDescription>{escape_text(clean(event.description, MAX_TEXT))}</EventOutcomeDescription>"
        )
    parts.append("</EventIdentification>")
    return "".join(parts)


def render(event: AuditEvent, source: AuditSource) -> str:
    """The DICOM audit message of ``event`` as text (what `encode` gives, decoded)."""
    parts = ["<AuditMessage>", _identification(event)]
    _participants(parts, event, source)
    parts.append(_audit_source(source))
    head = len(parts)
    # The HL7 v2 message an event is about (MSH-10) also on each patient's object (ITI-8 / ITI-30 style).
    msh10 = next((ref.value for ref in event.objects[:MAX_PARTICIPANTS] if ref.kind == "message" and ref.value), None)
    details = _detail("MSH-10", clean(msh10).encode("utf-8", "replace")) if msh10 is not None else ""
    for patient in event.patients[:MAX_PARTICIPANTS]:
        parts.append(_object(patient_id(patient), "1", "1", PATIENT_NUMBER, details=details))
    for ref in event.objects[:MAX_PARTICIPANTS]:
        parts.append(_other(ref, event))
    parts.append("</AuditMessage>")
    text = "".join(parts)
    if len(text) * 4 < MAX_MESSAGE:  # under the bound however many bytes a character takes
        return text
    size = len(text.encode("utf-8"))
    while size >= MAX_MESSAGE and len(parts) > head + 1:  # the last participant objects left out
        size -= len(parts.pop(-2).encode("utf-8"))
    return "".join(parts)


def encode(event: AuditEvent, source: AuditSource) -> bytes:
    """The DICOM audit message (PS3.15 A.5.1) of ``event`` reported by ``source``: UTF-8 XML, no declaration, under
    `MAX_MESSAGE` bytes (the last participant objects are left out of a message that would be larger)."""
    return render(event, source).encode("utf-8")
