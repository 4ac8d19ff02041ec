"""The ordering key of the engine's events: a short digest of their patient, never the identifier itself.

The outbox relay puts it in each event's ``partition-key`` header (:data:`traboule.bus.PARTITION_KEY`), so that a
bus keeps the events of one patient in journal order while other patients go in parallel (see the bus contract).
The key is the patient's primary identifier (its first identifier that is not an INS), digested
to 16 bits: enough values to spread patients over any number of partitions, too few to tell which patient a key
stands for (with 8-digit identifiers, about 1,500 share each value). Patients sharing a key share an order, which is
harmless. The digest is not keyed: whoever reads the headers and knows an identifier can compute its key and find
that patient's events (among the ~1/65,536 of others sharing it); the body they travel with names the patient anyway.

A merge (ADT^A40, ``PatientUpdate`` with ``action="merge"``) is keyed by the identifier merged away
(``merged_ids``), not by the survivor: it then follows that identifier's earlier events, which it must not overtake
(their updates would land on a record merged away). The survivor's events published before the merge carry the
survivor's own key, and the survivor's events after it too: those are not ordered against the merge.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from traboule.bus import PARTITION_KEY
from traboule.model import INS_OIDS

KEY_BYTES = 2  # 16 bits: 65,536 keys


def patient_key(value: str) -> str:
    """The key of the patient whose primary identifier is ``value`` (4 hex digits)."""
    return hashlib.blake2b(value.encode("utf-8", "replace"), digest_size=KEY_BYTES, person=b"traboule-part").hexdigest()


def partition_key(body: bytes) -> str | None:
    """The key of an event published by the engine (``Envelope.to_json``); None when it names no patient
    (then the bus puts it with the other keyless events) or is not such an event."""
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    payload = envelope.get("payload") if isinstance(envelope, dict) else None
    if not isinstance(payload, dict):
        return None
    if payload.get("action") == "merge" and (merged := _primary_id(payload.get("merged_ids"))):
        return patient_key(merged)  # behind the merged-away patient's earlier events
    patient = payload.get("patient")
    if not isinstance(patient, dict):  # a document carries its report's patient
        report = payload.get("report")
        patient = report.get("patient") if isinstance(report, dict) else None
    value = _primary_id(patient.get("ids") if isinstance(patient, dict) else None)
    return patient_key(value) if value else None


def _primary_id(ids: Any) -> str:
    """The first identifier of ``Patient.ids`` (or ``merged_ids``, JSON) that is not an INS, else the first; "" when
    there is none."""
    if not isinstance(ids, list):
        return ""
    found = [i for i in ids if isinstance(i, dict) and isinstance(i.get("value"), str) and i["value"]]
    local = [i for i in found if i.get("type") != "INS" and i.get("issuer_oid") not in INS_OIDS]
    chosen = (local or found)[:1]
    return chosen[0]["value"] if chosen else ""


def partition_headers(body: bytes) -> dict[str, str]:
    """The ``partition-key`` header of an event (empty when it names no patient), for the outbox relay."""
    key = partition_key(body)
    return {PARTITION_KEY: key} if key else {}
