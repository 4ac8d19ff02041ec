"""The audit trail: who did what with which patient's data, as IHE ATNA / DICOM PS3.15 Annex A.5 audit messages.

Code that handles patient data records an `AuditEvent` made by one of the constructors below on the engine's
`AuditTrail` (``trail_of(runtime).record(event)``). Recording never blocks and never raises: the trail writes the
event to a local append-only file and a durable queue, from which the engine sends it to the audit record
repository (syslog over TLS, RFC 5424 / RFC 5425) when one is configured, later if the repository is down.

The constructors speak of what happened (an order received, a document exported, a query answered); the encoding
into the DICOM audit message (event codes, participant roles, object type codes) is `traboule.audit.message`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import islice
from typing import Any, Literal, Protocol

Action = Literal["C", "R", "U", "D", "E"]  # create, read, update, delete, execute (PS3.15 EventActionCode)


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # e.g. a message refused (AE/AR), an authentication that failed
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True, slots=True)
class Actor:
    """A participant: a peer system or person, or the engine itself.

    ``user_id``: what the peer calls itself (the token's name, the calling AE title, the sending application
    ``MSH-3|MSH-4``, a destination's host). ``address``: its IP address (or host name). ``cert_subject``: the subject
    of its TLS client certificate, when it showed one. ``user_name``: a readable name or role (``operate``)."""

    user_id: str
    address: str = ""
    cert_subject: str = ""
    user_name: str = ""
    ae_title: str = ""


@dataclass(frozen=True, slots=True)
class PatientRef:
    """One identifier of a patient: the value and its assigning authority (PID-3.4: an OID or a namespace)."""

    value: str
    authority: str = ""


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Another object the event is about: ``kind`` is ``order`` (placer/filler order number), ``accession``,
    ``study`` (Study Instance UID), ``document`` (a document's unique id), ``submission-set``, ``message``
    (MSH-10), ``query`` (``detail`` = the query's text or bytes), ``resource`` (a FHIR ``Type/id``), ``mpps``
    (the SOP Instance UID) or ``configuration`` (a file or a setting). A DICOM query (C-FIND) is a ``query`` whose
    ``value`` is the SOP Class UID and ``transfer_syntax`` the UID its identifier (``detail``) is encoded in."""

    kind: str
    value: str
    detail: bytes = b""
    transfer_syntax: str = ""


@dataclass(frozen=True)
class AuditEvent:
    """One audited event, before encoding. ``kind``: ``patient-record``, ``order-record``, ``export``, ``import``,
    ``query``, ``application-activity``, ``security-alert``, ``user-authentication``. ``transaction``: the IHE
    transaction when there is one (``RAD-2``, ``RAD-5``, ``ITI-41``, ``ITI-67``, ``ITI-68``...)."""

    kind: str
    action: Action
    outcome: Outcome = Outcome.SUCCESS
    requestor: Actor | None = None  # who asked (the source of a message, the querier, the token holder)
    destination: Actor | None = None  # where data went (an export's repository), when it is not the engine
    patients: tuple[PatientRef, ...] = ()
    objects: tuple[ObjectRef, ...] = ()
    transaction: str = ""
    description: str = ""  # EventOutcomeDescription: why it failed (no patient data)
    subtype: str = ""  # application-activity: start / stop; security-alert: what (configuration, node-auth...)
    at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        # Bounded here, whoever builds the event (a constructor, a caller, `from_dict`, `dataclasses.replace`):
        # values to MAX_VALUE characters, patients and objects to MAX_REFS each, a query's detail to MAX_QUERY
        # bytes and another object's to MAX_VALUE. What is kept is what the repository receives (the encoder uses
        # the same limits).
        setattr_ = object.__setattr__
        setattr_(self, "kind", bounded(self.kind, 64))
        setattr_(self, "requestor", _bounded_actor(self.requestor))
        setattr_(self, "destination", _bounded_actor(self.destination))
        setattr_(self, "patients", tuple(_bounded_patient(p) for p in tuple(self.patients)[:MAX_REFS]))
        setattr_(self, "objects", tuple(_bounded_object(o) for o in tuple(self.objects)[:MAX_REFS]))
        setattr_(self, "transaction", bounded(self.transaction, 32))
        setattr_(self, "description", bounded(self.description, MAX_TEXT))
        setattr_(self, "subtype", bounded(self.subtype, 64))

    def as_dict(self) -> dict[str, Any]:
        """The event as JSON-able data (what the durable queue keeps before encoding)."""
        return {
            "kind": self.kind,
            "action": self.action,
            "outcome": int(self.outcome),
            "requestor": _actor(self.requestor),
            "destination": _actor(self.destination),
            "patients": [[p.value, p.authority] for p in self.patients],
            "objects": [[o.kind, o.value, o.detail.hex(), o.transfer_syntax] for o in self.objects],
            "transaction": self.transaction,
            "description": self.description,
            "subtype": self.subtype,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEvent:
        return cls(
            kind=data["kind"],
            action=data["action"],
            outcome=Outcome(data["outcome"]),
            requestor=Actor(**data["requestor"]) if data.get("requestor") else None,
            destination=Actor(**data["destination"]) if data.get("destination") else None,
            patients=tuple(PatientRef(v, a) for v, a in data.get("patients", ())),
            objects=tuple(ObjectRef(o[0], o[1], bytes.fromhex(o[2]), *o[3:4]) for o in data.get("objects", ())),
            transaction=data.get("transaction", ""),
            description=data.get("description", ""),
            subtype=data.get("subtype", ""),
            at=data.get("at", time.time()),
        )


def _actor(actor: Actor | None) -> dict[str, str] | None:
    if actor is None:
        return None
    return {
        "user_id": actor.user_id,
        "address": actor.address,
        "cert_subject": actor.cert_subject,
        "user_name": actor.user_name,
        "ae_title": actor.ae_title,
    }


# -- constructors: what happened ---------------------------------------------------------------------------------


def message_received(
    kind: Literal["order", "patient", "report"],
    action: Action,
    *,
    source: Actor,
    patients: Sequence[PatientRef],
    objects: Sequence[ObjectRef] = (),
    outcome: Outcome = Outcome.SUCCESS,
    transaction: str = "",
    description: str = "",
) -> AuditEvent:
    """An HL7 message received: an order (ORM/OMI: Order Record), a patient update or merge (ADT: Patient
    Record), a report (ORU/MDM: Patient Record, the report's ids as objects). ``objects`` name the message (MSH-10)
    and its order, accession, study or document ids."""
    event_kind = "order-record" if kind == "order" else "patient-record"
    return AuditEvent(
        kind=event_kind,
        action=action,
        outcome=outcome,
        requestor=source,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=tuple(islice(objects, MAX_REFS)),
        transaction=transaction,
        description=description,
    )


def exported(
    *,
    destination: Actor,
    patients: Sequence[PatientRef],
    objects: Sequence[ObjectRef],
    transaction: str,
    requestor: Actor | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditEvent:
    """Documents or data that left the engine: a DMP / XDS.b submission (ITI-41), a document fed to a DRIMbox, a
    document retrieved through MHD (ITI-68: ``requestor`` is who retrieved it, ``destination`` the same peer)."""
    return AuditEvent(
        kind="export",
        action="R",
        outcome=outcome,
        requestor=requestor,
        destination=destination,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=tuple(islice(objects, MAX_REFS)),
        transaction=transaction,
        description=description,
    )


def queried(
    *,
    requestor: Actor,
    query: bytes | str,
    patients: Sequence[PatientRef] = (),
    transaction: str = "",
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
    sop_class: str = "",
    transfer_syntax: str = "",
) -> AuditEvent:
    """A query that may return patient data (an MWL C-FIND, a FHIR search, a console search): the query itself
    and the patients of what was returned (the first `MAX_REFS`). A DICOM query gives its ``sop_class`` (the
    C-FIND's SOP Class UID) and the ``transfer_syntax`` of its identifier (``query``, the identifier's bytes;
    default Implicit VR Little Endian): the repository can decode it (PS3.15 A.5.3.12). A query over `MAX_QUERY`
    bytes is kept as a description of itself (its size), not cut."""
    text = query.encode(errors="backslashreplace") if isinstance(query, str) else bytes(query)
    if len(text) > MAX_QUERY:
        what = "C-FIND identifier" if sop_class else "query"
        text = f"{what} of {len(text)} bytes (over {MAX_QUERY}: not kept)".encode()
        sop_class = transfer_syntax = ""  # no longer the dataset: the text form
    if sop_class:
        ref = ObjectRef("query", sop_class, text, transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN)
    else:
        ref = ObjectRef("query", transaction or "query", text)
    return AuditEvent(
        kind="query",
        action="E",
        outcome=outcome,
        requestor=requestor,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=(ref,),
        transaction=transaction,
        description=description,
    )


def read(
    *,
    requestor: Actor,
    patients: Sequence[PatientRef],
    objects: Sequence[ObjectRef] = (),
    transaction: str = "",
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    """One object with patient data read: a FHIR read, a message opened in the console (Patient Record, R)."""
    return AuditEvent(
        kind="patient-record",
        action="R",
        outcome=outcome,
        requestor=requestor,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=tuple(islice(objects, MAX_REFS)),
        transaction=transaction,
    )


def performed_step(
    action: Action,
    *,
    source: Actor,
    patients: Sequence[PatientRef],
    objects: Sequence[ObjectRef],
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditEvent:
    """An MPPS N-CREATE / N-SET received from a modality (Procedure Record, RAD-6 / RAD-7)."""
    return AuditEvent(
        kind="procedure-record",
        action=action,
        outcome=outcome,
        requestor=source,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=tuple(islice(objects, MAX_REFS)),
        transaction="RAD-6" if action == "C" else "RAD-7",
        description=description,
    )


def application_activity(subtype: Literal["start", "stop"], *, by: Actor | None = None) -> AuditEvent:
    """The engine (or one of its processes) started or stopped."""
    return AuditEvent(kind="application-activity", action="E", requestor=by, subtype=subtype)


def configuration_changed(*, by: Actor | None, what: str, outcome: Outcome = Outcome.SUCCESS) -> AuditEvent:
    """The configuration, a mapping or a certificate changed (Security Alert)."""
    return AuditEvent(
        kind="security-alert",
        action="E",
        outcome=outcome,
        requestor=by,
        objects=(ObjectRef("configuration", what),),
        subtype="configuration",
    )


def authentication_failed(*, user: Actor, reason: str) -> AuditEvent:
    """A login or bearer token refused, a TLS peer refused (wrong CA, expired, subject not allowed) — ``reason`` is
    a fixed text, never the presented secret."""
    return AuditEvent(
        kind="user-authentication",
        action="E",
        outcome=Outcome.MINOR_FAILURE,
        requestor=user,
        description=reason,
        subtype="login",
    )


def node_authentication_failed(*, peer: Actor, reason: str) -> AuditEvent:
    """A TLS handshake or a certificate refused (Security Alert, node authentication)."""
    return AuditEvent(
        kind="security-alert",
        action="E",
        outcome=Outcome.MINOR_FAILURE,
        requestor=peer,
        description=reason,
        subtype="node-authentication",
    )


def operator_action(
    action: Action,
    *,
    operator: Actor,
    what: Literal["reprocess", "dead-letter-replay", "dead-letter-discard"],
    objects: Sequence[ObjectRef],
    patients: Sequence[PatientRef] = (),
    outcome: Outcome = Outcome.SUCCESS,
    description: str = "",
) -> AuditEvent:
    """An operator's action on received data (Patient Record, ``subtype`` = ``what``): journaled messages
    reprocessed (U; objects ``journal-entry``: the journal ids, ``1-3,7``), a dead letter replayed (U) or discarded
    (D; objects ``bus-message``: the bus message id). ``description``: the operator's reason is not put here (it may
    name a patient)."""
    return AuditEvent(
        kind="patient-record",
        action=action,
        outcome=outcome,
        requestor=operator,
        patients=tuple(islice(patients, MAX_REFS)),
        objects=tuple(islice(objects, MAX_REFS)),
        description=description,
        subtype=what,
    )


# -- received values, bounded -------------------------------------------------------------------------------------

MAX_VALUE = 256  # characters of one identifier or actor field an event keeps (received values are hostile)
MAX_TEXT = 1024  # characters of an outcome description
MAX_QUERY = 4096  # bytes of a query kept (a larger one: described by its size); of another object's detail: MAX_VALUE
MAX_DETAIL = MAX_QUERY  # (the former name)
MAX_REFS = 40  # patients, and other objects, an event names at most (each): what the repository receives
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def bounded(value: Any, limit: int = MAX_VALUE) -> str:
    """A received value as an event keeps it: text, at most ``limit`` characters, control characters as ``?``."""
    text = value if isinstance(value, str) else str(value)
    text = text[:limit]
    return text if text.isprintable() else _CONTROL.sub("?", text)


def actor(user_id: Any, address: Any = "", cert_subject: Any = "", user_name: Any = "", ae_title: Any = "") -> Actor:
    """An `Actor` of received values, each `bounded`."""
    return Actor(bounded(user_id), bounded(address), bounded(cert_subject), bounded(user_name), bounded(ae_title))


def object_ref(kind: str, value: Any, detail: bytes = b"") -> ObjectRef:
    """An `ObjectRef` of a received id (`bounded`; ``detail`` cut to `MAX_QUERY` bytes for a query, `MAX_VALUE`
    for another object)."""
    return ObjectRef(kind, bounded(value), bytes(detail[: MAX_QUERY if kind == "query" else MAX_VALUE]))


def _fits(fields: tuple[Any, ...], limit: int = MAX_VALUE) -> bool:
    """Whether each of ``fields`` is text of at most ``limit`` printable characters (what `bounded` keeps as it is).
    One join and one test rather than one per field: every event made checks its actors, patients and objects."""
    try:
        return "".join(fields).isprintable() and max(map(len, fields)) <= limit
    except TypeError:  # not text
        return False


def _bounded_actor(who: Actor | None) -> Actor | None:
    if who is None:
        return None
    fields = (who.user_id, who.address, who.cert_subject, who.user_name, who.ae_title)
    return who if _fits(fields) else actor(*fields)


def _bounded_patient(patient: PatientRef) -> PatientRef:
    value, authority = patient.value, patient.authority
    return patient if _fits((value, authority)) else PatientRef(bounded(value), bounded(authority))


def _bounded_object(ref: ObjectRef) -> ObjectRef:
    limit = MAX_QUERY if ref.kind == "query" else MAX_VALUE
    if len(ref.detail) <= limit and _fits((ref.kind, ref.value, ref.transfer_syntax)):
        return ref
    return ObjectRef(
        bounded(ref.kind, 64), bounded(ref.value), bytes(ref.detail[:limit]), bounded(ref.transfer_syntax, 64)
    )


def patient_refs(ids: Iterable[tuple[Any, Any]]) -> tuple[PatientRef, ...]:
    """(value, authority) pairs as `PatientRef` s: `bounded`, empty values left out, each once, `MAX_REFS` at
    most."""
    out: dict[PatientRef, None] = {}
    for value, authority in ids:
        if value:
            out.setdefault(PatientRef(bounded(value), bounded(authority or "")))
            if len(out) >= MAX_REFS:
                break
    return tuple(out)


def patients_of(*patients: Any) -> tuple[PatientRef, ...]:
    """The identifiers of canonical patients (``traboule.model.Patient``: ``ids`` with ``value``, ``issuer``,
    ``issuer_oid``) as `PatientRef` s: the authority is the issuer's OID, else its namespace."""
    return patient_refs((i.value, i.issuer_oid or i.issuer) for p in patients for i in p.ids)


# -- the trail -------------------------------------------------------------------------------------------------


class AuditTrail(Protocol):
    """Where events are recorded. ``record`` returns at once and never raises."""

    def record(self, event: AuditEvent) -> None: ...


class NullTrail:
    """The trail of code run without an engine (tests of one component, commands that audit nothing)."""

    def record(self, event: AuditEvent) -> None:
        return None


NULL_TRAIL = NullTrail()


def trail_of(owner: Any) -> AuditTrail:
    """The audit trail of a runtime (its ``audit`` attribute), or one that records nothing."""
    return getattr(owner, "audit", None) or NULL_TRAIL
