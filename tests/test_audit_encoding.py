"""The DICOM audit message written as text (`traboule.audit.message.encode`) is byte for byte what the lxml tree
the engine first built gave (`tests.audit_reference`), for every event a constructor of `traboule.audit` makes and
for hostile values (control characters, markup, non-BMP characters, lone surrogates, very long values), and stays
valid against the schema of PS3.15 A.5.1; the trail's local file keeps its JSON line format."""

from __future__ import annotations

import json
import math
import os
import string
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from lxml import etree

from tests import audit_reference as reference
from tests.test_audit import HOSTILE, every_event, valid
from traboule import audit
from traboule.app.audit_trail import AuditTrail, _line
from traboule.app.config import Config
from traboule.audit import Actor, ObjectRef, Outcome, PatientRef
from traboule.audit.message import (
    MAX_MESSAGE,
    AuditSource,
    encode,
    escape_attribute,
    escape_text,
    event_time,
    patient_id,
)

# Text a peer may send: every plane, the characters XML cannot carry, the ones it must escape, HL7 delimiters.
SPECIAL = "\x00\x01\x08\t\n\x0b\x0c\r\x1b\x7f\x85\x9f\u2028\ufffe\uffff\ud800\udfff🩻\U0010ffff<>&\"'^~\\|] é"
HOSTILE_CHARS = st.sampled_from(list(SPECIAL)) | st.characters(codec=None, exclude_categories=())  # surrogates too
TEXT = st.text(HOSTILE_CHARS, max_size=20) | st.sampled_from(["", " ", "ITI-41", "RAD-5", "10.0.0.1", "::1"])
LONG_TEXT = st.builds(lambda t, n: (t or "x") * n, TEXT, st.integers(1, 300))
VALUE = TEXT | LONG_TEXT
KINDS = [*reference.OBJECT_TYPES, "query", "unknown-kind"]


def actors() -> st.SearchStrategy[Actor | None]:
    return st.none() | st.builds(Actor, VALUE, VALUE, VALUE, VALUE, VALUE)


EVENTS = st.builds(
    audit.AuditEvent,
    kind=st.sampled_from([*reference.EVENT_IDS, "unknown"]) | TEXT,
    action=st.sampled_from(["C", "R", "U", "D", "E", "Z", ""]),
    outcome=st.sampled_from(list(Outcome)),
    requestor=actors(),
    destination=actors(),
    patients=st.lists(st.builds(PatientRef, VALUE, VALUE | st.just("1.2.250.1.213.1.4.8")), max_size=4).map(tuple),
    objects=st.lists(
        st.builds(ObjectRef, st.sampled_from(KINDS) | TEXT, VALUE, st.binary(max_size=300), TEXT), max_size=5
    ).map(tuple),
    transaction=st.sampled_from(["", "RAD-2", "ITI-41", "XYZ-12"]) | TEXT,
    description=VALUE,
    subtype=st.sampled_from(["", "start", "stop", "login", "configuration", "node-authentication"]),
    at=st.floats(0, 253402300799.999) | st.sampled_from([math.nan, math.inf, -1.0, 1e300]),
)
SOURCE = AuditSource("engine-1", "CHU", "TRABOULE", "gw.example")
SOURCES = st.builds(AuditSource, VALUE, VALUE, VALUE, VALUE, VALUE) | st.just(AuditSource("engine-1"))


def same(event: audit.AuditEvent, source: AuditSource) -> bytes:
    """The message of ``event``, checked identical to the reference's (a time that is no time is "now": both are
    given the same one)."""
    if not isinstance(event.at, int | float) or not math.isfinite(event.at) or not 0 <= event.at < 253402300800:
        event = replace(event, at=1_700_000_000.123)
    xml = encode(event, source)
    assert xml == reference.encode(event, source)
    return xml


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS, SOURCES)
def test_hostile_events_encode_to_the_reference_bytes_and_a_valid_message(
    event: audit.AuditEvent, source: AuditSource
) -> None:
    xml = same(event, source)
    assert len(xml) < MAX_MESSAGE
    valid(xml)


@pytest.mark.parametrize("text", HOSTILE, ids=["long", "control", "markup", "names", "empty", "blank"])
def test_every_constructor_encodes_to_the_reference_bytes(text: str) -> None:
    sources = [AuditSource(text, text, text, text), AuditSource("", "", "", ""), AuditSource("s", process=text)]
    count = 0
    for event in every_event(text):
        for source in sources:
            valid(same(event, source))
            count += 1
    assert count == 3 * 27


@pytest.mark.parametrize("char", list(SPECIAL), ids=[f"U+{ord(c):04X}" for c in SPECIAL])
def test_each_special_character_in_each_field_encodes_to_the_reference_bytes(char: str) -> None:
    text = f"a{char}b{char}"
    sources = [AuditSource(text, text, text, text, text), AuditSource("", "", "", "", text)]
    for event in every_event(text):
        for source in sources:
            valid(same(event, source))


def test_a_message_over_the_bound_loses_its_last_objects_as_the_reference_did() -> None:
    # Forty patients and forty objects of long non-BMP values: well over MAX_MESSAGE before the cut.
    big = "🩻" * 256
    event = audit.read(
        requestor=Actor("u"),
        patients=[PatientRef(f"{big}{i}", "NS") for i in range(40)],
        objects=[ObjectRef("study", f"{big}{i}", b"d" * 256) for i in range(40)],
    )
    xml = same(event, AuditSource("engine-1"))
    assert MAX_MESSAGE - 4096 < len(xml) < MAX_MESSAGE
    root = valid(xml)
    assert 0 < len(root.findall("ParticipantObjectIdentification")) < 80


@given(st.text(HOSTILE_CHARS, max_size=60))
def test_escaping_is_what_libxml2_writes(text: str) -> None:
    text = reference.clean(text, 10_000)
    element = etree.Element("E", {"a": text})
    element.text = text
    assert (
        etree.tostring(element, encoding="UTF-8") == f'<E a="{escape_attribute(text)}">{escape_text(text)}</E>'.encode()
    )
    assert escape_attribute("a&<>\"'\t\n\r") == "a&amp;&lt;&gt;&quot;'&#9;&#10;&#13;"
    assert escape_text("a&<>\"'\t\n\r") == "a&amp;&lt;&gt;\"'\t\n&#13;"


@given(st.builds(PatientRef, VALUE, VALUE | st.sampled_from(["1.2.250.1.213.1.4.8", " 1.2.3 ", "NS"])))
def test_patient_identifiers_are_the_reference_cx(patient: PatientRef) -> None:
    assert patient_id(patient) == reference.patient_id(patient)


# Times within a microsecond of the next second: datetime.fromtimestamp rounds some of them up to it.
NEAR_A_SECOND = st.builds(lambda n, f: n + f, st.integers(0, 2**35), st.floats(0.999998, 0.99999999999))


@settings(max_examples=500)
@given(st.floats(0, 253402300799.999) | st.integers(0, 253402300799) | NEAR_A_SECOND)
@example(1_700_000_000.9999996)  # rounds up to the next second in datetime.fromtimestamp
@example(1_700_000_000.9999994)
def test_event_time_is_the_reference_time(at: float) -> None:
    assert event_time(at) == reference.event_time(at)
    assert event_time(at) == event_time(at)  # from the cache, the same


def test_event_time_of_what_is_no_time_is_now() -> None:
    for at in (math.nan, math.inf, -1.0, 1e300, "x"):
        text = event_time(at)  # type: ignore[arg-type]
        stamp = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
        assert abs(stamp - datetime.now(UTC).timestamp()) < 5


def test_the_file_keeps_one_json_line_per_event(tmp_path: Path) -> None:
    trail = AuditTrail(Config(data_dir=str(tmp_path)), relay=False)
    hostile = '"\\\u2028🩻</x>\x00'
    events = [
        audit.message_received(
            "order",
            "C",
            source=audit.actor(hostile, "10.1.2.3"),
            patients=[PatientRef(hostile, "1.2.3")],
            objects=[ObjectRef("message", hostile)],
            transaction="RAD-2",
        ),
        replace(audit.application_activity("start"), kind=hostile, transaction=hostile + "\ud800"),
        replace(audit.application_activity("stop"), action=("not", "text")),  # type: ignore[arg-type]
        audit.performed_step("C", source=Actor("CT"), patients=[], objects=[ObjectRef("mpps", "1.2.3")]),
    ]
    for event in events:
        trail.record(event)
    assert trail.flush(10)
    lines = (tmp_path / "audit.log").read_bytes().splitlines(keepends=True)
    assert len(lines) == len(events)
    for line, event in zip(lines, events, strict=True):
        record = json.loads(line)
        # What json.dumps of the record wrote (a lone surrogate as its JSON escape, not an error).
        expected = {
            "at": reference.event_time(event.at),
            "kind": event.kind,
            "action": event.action,
            "outcome": int(event.outcome),
            "transaction": event.transaction,
            "pid": os.getpid(),
            "xml": reference.encode(event, trail.source).decode(),
        }
        assert line == (json.dumps(expected, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        valid(record["xml"].encode())
    assert json.loads(lines[1])["transaction"] == events[1].transaction


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS)
def test_a_line_is_what_json_dumps_wrote(event: audit.AuditEvent) -> None:
    event = replace(event, at=1_700_000_000.25)
    xml = encode(event, SOURCE)
    record = {
        "at": event_time(event.at),
        "kind": event.kind,
        "action": event.action,
        "outcome": int(event.outcome),
        "transaction": event.transaction,
        "pid": 42,
        "xml": xml.decode(),
    }
    expected = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
    assert _line(event, xml, 42) == expected
    assert _line(event, b"", 42) == (
        json.dumps({**record, "xml": "", "event": event.as_dict()}, ensure_ascii=False) + "\n"
    ).encode("utf-8", "backslashreplace")  # no message (the encoder failed): the event as data


def test_printable_ascii_is_left_as_it_is() -> None:
    text = string.ascii_letters + string.digits + " !#$%()*+,-./:;=?@[]^_`{|}~'"
    assert escape_attribute(text) == text and escape_text(text + '"') == text + '"'


def kept(*fields: object) -> bool:
    """What an event kept as it was before (`traboule.audit` checked each field on its own)."""
    return all(isinstance(f, str) and len(f) <= audit.MAX_VALUE and f.isprintable() for f in fields)


@given(actors(), st.builds(PatientRef, VALUE, VALUE), st.builds(ObjectRef, TEXT, VALUE, st.binary(max_size=600), TEXT))
def test_an_event_bounds_its_values_as_it_did(who: Actor | None, patient: PatientRef, ref: ObjectRef) -> None:
    event = audit.AuditEvent("query", "E", requestor=who, patients=(patient,), objects=(ref,))
    if who is not None:
        fields = (who.user_id, who.address, who.cert_subject, who.user_name, who.ae_title)
        if kept(*fields):
            assert event.requestor is who
        else:
            assert event.requestor == audit.actor(*fields)
    assert event.patients[0] == (
        patient
        if kept(patient.value, patient.authority)
        else PatientRef(audit.bounded(patient.value), audit.bounded(patient.authority))
    )
    limit = audit.MAX_QUERY if ref.kind == "query" else audit.MAX_VALUE
    if len(ref.detail) <= limit and kept(ref.kind, ref.value, ref.transfer_syntax):
        assert event.objects[0] is ref
    else:
        assert event.objects[0] == ObjectRef(
            audit.bounded(ref.kind, 64),
            audit.bounded(ref.value),
            ref.detail[:limit],
            audit.bounded(ref.transfer_syntax, 64),
        )
