"""One journaled message for a person: decoded with its declared charset, laid out as segments and fields named
after the HL7 v2 reference (hl7apy's tables), and mapped again to the canonical events it produces today.

Everything here is received data: it is only ever returned as text, for the templates to escape.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from traboule.app.config import Config, resolve
from traboule.errors import HL7Error, MappingFailure
from traboule.formats import hl7
from traboule.model import plain, topic_of
from traboule.stores.journal import JournalEntry

REFERENCE_VERSIONS = ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8", "2.8.1", "2.8.2")
DEFAULT_VERSION = "2.5"  # field names for a message whose MSH-12 hl7apy does not know
MAX_SHOWN = 256 * 1024  # characters of a raw message shown at most (the whole: downloaded)
MAX_SEGMENTS = 500  # segments laid out at most
MAX_FIELDS = 200 * 1024  # characters of field values laid out at most, over all segments
MAX_VALUE = 2000  # characters of one field value shown at most
MAX_EVENTS = 50  # canonical events shown at most
MAX_EVENT = 100_000  # characters of one event's JSON shown at most
MAX_PATIENT_IDS = 20  # PID-3 repetitions read for the audit trail at most


@dataclass
class FieldView:
    number: str  # "PID-5"
    name: str  # "Patient Name", "" when the reference does not know the field (a Z segment)
    value: str  # as received (HL7-escaped)


@dataclass
class SegmentView:
    name: str
    fields: list[FieldView]


@dataclass
class EventView:
    topic: str
    body: str  # pretty JSON


@dataclass
class MessageView:
    text: str
    codec: str = ""
    declared: str = ""
    decode_warnings: list[str] = field(default_factory=list)
    version: str = ""
    segments: list[SegmentView] = field(default_factory=list)
    problem: str = ""  # why it could not be read or mapped
    events: list[EventView] = field(default_factory=list)
    mapped: bool = False
    hidden_segments: int = 0  # segments not laid out (`MAX_SEGMENTS`, `MAX_FIELDS`)
    hidden_text: int = 0  # characters of the raw text not shown (`MAX_SHOWN`)
    hidden_events: int = 0
    patients: list[tuple[str, str]] = field(default_factory=list)  # PID-3: (id, authority), for the audit trail


@functools.lru_cache(maxsize=512)
def field_names(segment: str, version: str) -> tuple[str, ...]:
    """The field names of ``segment`` in HL7 ``version`` (index 0 is field 1), from hl7apy's reference; empty for
    a segment it does not know."""
    from hl7apy import load_reference

    if version not in REFERENCE_VERSIONS:
        version = DEFAULT_VERSION
    try:
        reference = load_reference(segment, "Segment", version)
    except Exception:  # hl7apy's ChildNotFound and friends: a Z segment, a segment of another version
        return ()
    names = []
    for child in reference[1]:
        try:
            names.append(str(child[1][3]).replace("_", " ").title())
        except (IndexError, TypeError):
            names.append("")
    return tuple(names)


def lay_out(entry: JournalEntry) -> MessageView:
    """The message decoded and split into named fields; on a message that does not decode or parse, its bytes
    read as Latin-1 (one character a byte) with the reason."""
    try:
        decoded = hl7.decode(entry.raw)
        message = hl7.parse(decoded.text)
    except HL7Error as exc:
        view = MessageView(entry.raw[:MAX_SHOWN].decode("latin-1"), problem=str(exc))
        view.hidden_text = max(0, len(entry.raw) - MAX_SHOWN)
        return view
    view = MessageView(decoded.text[:MAX_SHOWN], decoded.codec, decoded.declared, decoded.warnings)
    view.hidden_text = max(0, len(decoded.text) - MAX_SHOWN)
    view.version = message.version
    view.patients = patient_ids(message)
    budget = MAX_FIELDS
    for shown, segment in enumerate(message.segments):
        if shown >= MAX_SEGMENTS or budget <= 0:
            view.hidden_segments = len(message.segments) - shown
            break
        names = field_names(segment.name, message.version) if segment.name.isalnum() else ()
        fields = []
        for n in range(1, len(segment.fields)):
            value = segment.fields[n]
            if value == "":
                continue
            name = names[n - 1] if n - 1 < len(names) else ""
            if budget <= 0:
                break
            cut = min(MAX_VALUE, budget)
            value = value[:cut] + "…" if len(value) > cut else value
            budget -= len(value)
            fields.append(FieldView(f"{segment.name}-{n}", name, value))
        view.segments.append(SegmentView(segment.name, fields))
    return view


def patient_ids(message: hl7.Message) -> list[tuple[str, str]]:
    """PID-3 as (id, assigning authority: PID-3.4's universal id, else its namespace), `MAX_PATIENT_IDS` at most."""
    pid = message.segment("PID")
    if pid is None:
        return []
    seps = message.separators
    out = []
    for repetition in pid.field(3).split(seps.repetition, MAX_PATIENT_IDS)[:MAX_PATIENT_IDS]:
        parts = repetition.split(seps.component, 4)
        authority = (parts[3] if len(parts) > 3 else "").split(seps.subcomponent, 2)
        if parts[0]:
            chosen = authority[1] if len(authority) > 1 and authority[1] else authority[0]
            out.append((hl7.unescape(parts[0], seps), hl7.unescape(chosen, seps)))
    return out


class Mapper:
    """Today's inbound mapping of each inbound HL7 channel (as ``traboule journal reprocess`` maps messages)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._mappings: dict[str, Any] = {}

    def events(self, entry: JournalEntry, view: MessageView) -> None:
        """Fill ``view.events`` with the canonical events ``entry`` maps to today, or ``view.problem``."""
        from traboule.stores.patient_identity import identity_sources, mark_authoritative
        from traboule.translate.hl7_mapping import HL7InboundMapping

        channel = next(
            (c for c in self.config.channels if c["name"] == entry.channel and c["kind"] == "hl7-orders"), None
        )
        if channel is None or view.problem:
            return
        mapping = self._mappings.get(entry.channel)
        try:
            if mapping is None:
                path = resolve(self.config, channel.get("mapping", "mappings/hl7_inbound.yaml"))
                mapping = self._mappings[entry.channel] = HL7InboundMapping(path)
            message = hl7.parse(hl7.decode(entry.raw).text)
            payloads = mapping.map(message, [])
        except HL7Error as exc:
            view.problem = f"{exc.location}: {exc}" if exc.location else str(exc)
            return
        except MappingFailure as exc:
            view.problem = f"{exc.location}: {exc.reason}" if exc.location else exc.reason
            return
        except Exception as exc:  # a mapping file that no longer loads, a mapping bug: said on the page, not a 500
            view.problem = f"{type(exc).__name__}: {exc}"[:500]
            return
        sources = identity_sources(channel.get("identity_sources"), entry.channel)
        sender = (message.header("sending_application", 1), message.header("sending_facility", 1))
        mark_authoritative(payloads, sources, sender)
        view.mapped = True
        view.hidden_events = max(0, len(payloads) - MAX_EVENTS)
        for payload in payloads[:MAX_EVENTS]:
            body = json.dumps(plain(payload), indent=2, ensure_ascii=False, default=str)
            body = body[:MAX_EVENT] + ("\n…" if len(body) > MAX_EVENT else "")
            try:
                topic = topic_of(payload)
            except TypeError:  # a report: published as the CDA document its reception made
                topic = f"report ({type(payload).__name__})"
            view.events.append(EventView(topic, body))
