"""The compiled HL7 v2 inbound mapping gives exactly what the rule-by-rule interpreter gives.

For every message of the shared corpus, of fixtures/hl7/ and of mappings/tests/, and for the shipped mapping, variants
of it that cut or refuse long values, and a mapping written to reach every path form, filter and table rule: the same
payloads (their canonical JSON), the same notes, or the same refusal (type, reason, location, code). Then random
field values and repetitions injected into the fixtures, both ways again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, shared_path
from traboule import model
from traboule.errors import HL7Error, TrabouleError
from traboule.formats import hl7
from traboule.translate.hl7_mapping import HL7InboundMapping

MAPPINGS = ROOT / "mappings"
FIXTURES = ROOT / "fixtures" / "hl7"
SHIPPED = (MAPPINGS / "hl7_inbound.yaml").read_text(encoding="utf-8")

# Every path form (segment index and filter, repetition index and filter, both at once, index 0, MSH-1/MSH-2,
# relative paths), every filter, tables with '*' rows before and after exact ones, composite keys, checks, cuts and
# refusals, defaults over non-empty model defaults, attributes the caller presets (order.patient, merge.action),
# `each` over a field and over a segment with filtered paths into the iterated segment.
EXOTIC = """
kind: hl7-inbound
version: 1
accept:
  ORM^O01: order
  OMI^O23: order
  ADT^A08: patient-update
  ADT^A31: patient-update
  ADT^A40: patient-merge
  ORU^R01: report
  MDM^T02: report
  MDM^T04: report
tables:
  order_control: {file: tables/order_control.csv, keys: [order_control, order_status]}
  modality: tables/modality.csv
  sex: tables/sex.csv
  wild: tables/wild.csv
  wild_first: tables/wild_first.csv
  pair: {file: tables/pair.csv, keys: [a, b]}
  report_action: {file: tables/report_action.csv, keys: [trigger, status]}
  report_sections: tables/report_sections.csv
patient:
  ids:
    each: PID-3
    required: true
    fields:
      value: {from: [.1, PID-2.1], max: 12, too_long: cut}
      issuer: [.4.1 | upper, 'PID-3[2].4.1']
      issuer_oid: [.4.2, .4]
      type: .5 | wild
  name.family: {from: [PID-5(7=L).1, PID-5.1 | lower], max: 5, too_long: cut}
  name.given: PID-5[2].2 | trim
  name.middle: PID-5.3.2
  name.prefix: MSH-2
  name.suffix: MSH-1
  birth_name: PID-3[0].1
  birth_given_name: {from: PID-3(5=INS).4.2, default: none}
  birth_given_names: PID-11(7=BDL).9 | wild_first
  birth_date: PID-7 | time
  sex: {from: PID-8 | strict:sex, default: U}
  identity_status: [PID-7 | instant, PID-7 | datetime, PID-7 | date]
  birth_place_code: {keys: [PID-8, PID-32], table: pair, column: c, default: X}
order:
  action: {keys: [ORC-1, ORC-5], table: order_control, column: action, required: true}
  placer_order_number.value: {from: [ORC-2.1, OBR-2.1], max: 10}
  placer_order_number.issuer: ['ORC[2]-2.2', ORC-2.2 | lower]
  filler_order_number.value: [ORC-3, OBR-3.1.1]
  accession_number.value: [IPC-1.1, OBR-18, 'OBX[2]-5']
  study_instance_uid: {from: [ZDS-1.1, IPC-3.1, OBX(3=113014)-5], check: uid}
  procedure.code: OBR-4.1 | wild
  procedure.display: {from: [OBR-44.2, OBR-4.2], max: 12, too_long: cut}
  procedure.system: {from: OBR-4.3, table: wild_first}
  reason: OBR-31.2.2
  priority: {from: [OBR-27.6, OBR-5], table: wild}
  requesting_physician.id: OBR-16
  requesting_physician.name.family: {from: [OBR-16.2, ORC-12.2], max: 64, too_long: cut}
  referring_physician.name.given: PV1-8(2=RENARD).3
  patient_weight: OBX(3.1=29463-7)-5(2=kg).1
  patient_size: OBX(3.1=8302-2)-5 | height_m
  medical_alerts: {from: [OBR-13, MSH-9.1], required: true}
  institution: {from: ORC-21.1, max: 3, too_long: cut}
  admission_id: {keys: [PV1-2, PV1-3.1], table: pair}
  patient.birth_name: ORC-2.1
  patient.ids:
    each: PID-3
    fields:
      value: .1
      issuer: PID-3.4
steps:
  each: OBR
  fields:
    step_id: {from: [OBR-20, 'OBR[2]-20', IPC-4.1], max: 4, too_long: cut}
    modality: [OBR-24 | strict:modality, OBX(3.1=MODALITE_IMAGERIE)-5 | strict:modality, OBR(24=CT)-24, .1]
    station_aet: OBR(4.1=CTTAP)-4.2
    station_name: OBR(4.1=IRMGEN)-4(1=IRMGEN).2
    start: [OBR-7 | datetime, OBR-27.4 | date]
    description: {from: [OBR-4.2, OBR-4.5], max: 10, too_long: cut}
    protocol.code: {keys: [OBR-4.1], table: wild, column: v}
    protocol.system: PID-5.1
    performing_physician.family: OBR-34.1.2
    status: {keys: [OBR-24, ORC-5], table: pair}
merge:
  action: EVN-1 | lower
  merged_ids:
    each: MRG-1
    required: true
    fields:
      value: .1
      issuer: [.4.1, MRG-1.4]
      type: {from: .5, default: PI}
report:
  action: {keys: [MSH-9.2, OBX-11], table: report_action, column: action, required: true}
  document_id: {from: [TXA-12.1, OBR-3.1], max: 6}
  status: [OBX-11, TXA-17]
  accession_number.value: [IPC-1.1, OBR-18]
  study_instance_uid: {from: [IPC-3.1, ZDS-1.1, OBX(3.1=113014)-5], check: uid}
  modality: [OBR-24 | strict:modality, OBX(3.1=MODALITE_IMAGERIE)-5 | strict:modality]
  exam_time: [OBR-7 | instant, TXA-4 | instant]
  report_time: [OBR-22 | instant, MSH-7 | instant]
  author.id: [OBR-32.1.1, TXA-5.1, PRT(4.1=SB)-5.1]
  author.name.family: {from: [OBR-32.1.2, TXA-5.2, PRT(4.1=SB)-5.2], max: 4, too_long: cut}
  organization_id: [PRT(4.1=SB)-8.10, ORC-21.10]
report_text:
  table: report_sections
  default: 59776-5
  conclusion: 19005-8
"""

TABLES = {
    "wild.csv": "k,v\nCT,scanner\nR,routine-r\n*,any\nMR,irm\nPI,patient\n",
    "wild_first.csv": "k,v\n*,first\nL,local\n",
    "pair.csv": "a,b,c\nM,*,male\n*,VALI,valid\nF,PROV,fp\nO,,empty\n",
}


def message_files() -> list[Path]:
    corpus = shared_path("corpus")
    files = [*sorted(FIXTURES.glob("*.hl7")), *sorted((MAPPINGS / "tests").glob("*.hl7"))]
    for path in sorted(corpus.rglob("*")):
        if path.is_file() and path.suffix in (".hl7", ".txt", ".er7") and path.read_bytes().lstrip()[:3] == b"MSH":
            files.append(path)
    return files


def variants(folder: Path) -> dict[str, Path]:
    """The shipped mapping, a copy cutting every limited value to a few characters, one refusing them, one whose
    steps name a field (read as a segment name all the same), the exotic one; written in ``folder`` beside a copy
    of the tables."""
    if not (folder / "tables").exists():
        shutil.copytree(MAPPINGS / "tables", folder / "tables")
        for name, text in TABLES.items():
            (folder / "tables" / name).write_text(text, encoding="utf-8")
    plain = SHIPPED.replace(", too_long: cut", "")
    texts = {
        "cut.yaml": re.sub(r"max: \d+", "max: 5, too_long: cut", plain),
        "refuse.yaml": re.sub(r"max: \d+", "max: 9", plain),
        "steps_over_a_field.yaml": SHIPPED.replace("each: IPC ", "each: PID-3 ").replace("[IPC-9,", "[.1, IPC-9,"),
        "exotic.yaml": EXOTIC,
    }
    paths = {"shipped": MAPPINGS / "hl7_inbound.yaml"}
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths[name.removesuffix(".yaml")] = folder / name
    return paths


def outcome(mapping: HL7InboundMapping, msg: hl7.Message) -> tuple[Any, ...]:
    """What mapping ``msg`` gives: each payload's canonical JSON and the notes, or the exception (a refusal, or any
    other) and the notes."""
    notes: list[str] = []
    try:
        payloads = mapping.map(msg, notes)
    except Exception as exc:
        kind = "refused" if isinstance(exc, TrabouleError) else "raised"
        return (kind, type(exc).__name__, str(exc), getattr(exc, "location", ""), getattr(exc, "code", ""), notes)
    return ("mapped", [model.Envelope(p, id="0", created="0").to_json() for p in payloads], notes)


@pytest.fixture(scope="module")
def mappings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[HL7InboundMapping, HL7InboundMapping]]:
    """Each variant as (compiled, reference)."""
    folder = tmp_path_factory.mktemp("mappings")
    return {
        name: (HL7InboundMapping(path), HL7InboundMapping(path, compiled=False))
        for name, path in variants(folder).items()
    }


@pytest.mark.parametrize("variant", ["shipped", "cut", "refuse", "steps_over_a_field", "exotic"])
def test_every_message_maps_alike_both_ways(variant: str, mappings: dict[str, Any]) -> None:
    compiled, reference = mappings[variant]
    assert compiled.program.source and not reference.program.source  # the engine's default is the compiled form
    files = message_files()
    assert len(files) >= 40
    kinds: dict[str, int] = {}
    differing = []
    for path in files:
        try:
            msg = hl7.parse(hl7.decode(path.read_bytes()).text)
        except HL7Error:
            continue
        expected = outcome(reference, msg)
        if outcome(compiled, msg) != expected:
            differing.append(path.name)
        kinds[expected[0]] = kinds.get(expected[0], 0) + 1
        if expected[-1]:
            kinds["noted"] = kinds.get("noted", 0) + 1
    assert differing == []
    # Both outcomes are compared: the corpus has messages each variant maps and messages it refuses.
    assert kinds.get("mapped", 0) >= 3 and kinds.get("refused", 0) >= 3, kinds
    if variant == "cut":
        assert kinds.get("noted", 0) >= 10, kinds


def test_a_refusal_names_the_same_field_both_ways(mappings: dict[str, Any]) -> None:
    """The refusals are the reference's, word for word: a long accession number, a bad UID, an unknown order
    control, a missing identifier."""
    compiled, reference = mappings["shipped"]
    text = hl7.decode((FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes()).text
    cases = [  # pattern, replacement, expected location and code
        (r"ACC0001", "ACC" + "9" * 20, "OBR-18", "102"),
        (r"1\.2\.250\.1\.999\.1\.2\.20261125\.1", "1.2.03", "ZDS-1.1", "102"),
        (r"ORC\|NW\|", "ORC|ZZ|", "ORC-1", "103"),
        (r"PID\|1\|\|[^|]*", "PID|1||", "PID-3", "101"),
    ]
    for pattern, new, location, code in cases:
        msg = hl7.parse(re.sub(pattern, lambda _, new=new: new, text))
        expected = outcome(reference, msg)
        assert outcome(compiled, msg) == expected
        assert expected[0] == "refused" and expected[3:5] == (location, code), expected


# -- random values and repetitions -------------------------------------------------------------------------------

TOKENS = [
    *("INS", "PI", "L", "D", "BDL", "SB", "kg", "CTTAP", "IRMGEN", "RENARD", "CT", "MR", "US", "XX", "*"),
    *("NW", "SC", "XO", "CA", "CM", "IP", "F", "C", "D", "P", "M", "O", "U", "VALI", "PROV", "R", "S", "A"),
    *("29463-7", "8302-2", "113014", "MODALITE_IMAGERIE", "19005-8", "18782-3", "A40", "R01", "T02"),
    *("20261125093000", "20261125093000+0100", "20261125093000.123-0500", "19790328", "0328197", "175", "1,80"),
    *("1.2.250.1.999", "1.2.03", "279035121518989", "IPP0001", "ACC0001", "ACC" + "9" * 20, "x" * 70),
    *("\\T\\", "\\S\\", "\\R\\", "\\E\\", "\\F\\", "\\X41\\", "\\Xe9\\", "\\.br\\", "\\H\\", "\\", "  ", ""),
]
ATOM = st.sampled_from(TOKENS) | st.text(alphabet="aZ09 .-*&^~\\é", max_size=8)
VALUE = st.lists(st.tuples(ATOM, st.sampled_from(["^", "~", "&", "^^", "~^", ""])), max_size=6).map(
    lambda parts: "".join(a + sep for a, sep in parts)
)
# What the mappings read: (segment, field) of every path, and the (component, value) of every filter, so that
# edits land where a rule looks and repetitions or segments carry the value a filter picks, at its component.
_MAPPED = SHIPPED + EXOTIC
_SEGMENT_FILTERS = re.findall(r"\b([A-Z][A-Z0-9]{2})\((\d+)(?:\.(\d+))?=([^)]*)\)", _MAPPED)
PATHS = sorted(
    {(m[1], int(m[2])) for m in re.finditer(r"\b([A-Z][A-Z0-9]{2})(?:\([^)]*\)|\[\d+\])?-(\d+)", _MAPPED)}
    | {(seg, int(f)) for seg, f, _, _ in _SEGMENT_FILTERS}
)
FILTERS = sorted(
    {(int(c or 1), v) for _, _, c, v in _SEGMENT_FILTERS}
    | {(int(c), v) for c, v in re.findall(r"-\d+\((\d+)=([^)]*)\)", _MAPPED)}
)
PICKED = st.tuples(st.sampled_from(FILTERS), st.lists(ATOM, min_size=12, max_size=12)).map(
    lambda f: "^".join([*f[1][: f[0][0] - 1], f[0][1], *f[1][f[0][0] :]]).rstrip("^")
)
# Two segments (or two repetitions) a filter picks alike, differing elsewhere: the first must win.
SEGMENT_PICKS = sorted(set(re.findall(r"\b([A-Z][A-Z0-9]{2})\((\d+)(?:\.(\d+))?=([^)]*)\)-(\d+)", _MAPPED)))
REPETITION_PICKS = sorted(
    set(re.findall(r"\b([A-Z][A-Z0-9]{2})(?:\([^)]*\)|\[\d+\])?-(\d+)\((\d+)=([^)]*)\)", _MAPPED))
)
EDIT = st.tuples(
    st.sampled_from(["set", "append", "copy segment"]),
    st.integers(0, 40),
    st.sampled_from(PATHS) | st.tuples(st.sampled_from(["", "PID", "OBX", "ORC"]), st.integers(1, 45)),
    VALUE | PICKED,
)
TWINS = st.tuples(
    st.just("twin segments"), st.integers(0, 40), st.sampled_from(SEGMENT_PICKS), st.tuples(ATOM, ATOM)
) | st.tuples(st.just("twin repetitions"), st.integers(0, 40), st.sampled_from(REPETITION_PICKS), st.tuples(ATOM, ATOM))
FIXTURE_TEXTS = [
    hl7.decode((FIXTURES / name).read_bytes()).text
    for name in (
        "orm_o01_nw_latin1.hl7",
        "omi_o23_nw_utf8.hl7",
        "orm_o01_ins_qualified.hl7",
        "orm_o01_xo_change.hl7",
        "adt_a08_ins_update.hl7",
        "adt_a40_merge.hl7",
        "oru_r01_report.hl7",
        "oru_r01_pdf.hl7",
    )
]


def edited(text: str, edits: list[tuple[str, int, tuple[str, int], str]]) -> str:
    """``text`` with values set or appended as repetitions into fields, or segments repeated (MSH-1/MSH-2 kept).
    An edit names a segment (one of that name, by ``n``; a new one at the end when there is none) or only a field
    (of segment ``n``)."""
    segments = [line.split("|") for line in re.split(r"\r\n|\r|\n", text) if line]
    for op, n, target, value in edits:
        if op == "twin segments":
            name, f, c, v, t = target
            twin = [name] + [""] * max(int(f), int(t))
            twin[int(f)] = "^" * (int(c or 1) - 1) + v
            segments[1 + n % len(segments) : 1] = [[*twin[: int(t)], x, *twin[int(t) + 1 :]] for x in value]
            continue
        if op == "twin repetitions":
            name, t, c, v = target
            reps = [[f"{x}{i}" for i in range(10)] for x in value]
            for rep in reps:
                rep[int(c) - 1] = v
            target, value = (name, int(t)), "~".join("^".join(rep) for rep in reps)
        name, f = target
        found = [i for i, fields in enumerate(segments) if fields[0] == name] if name else list(range(len(segments)))
        if not found:
            segments.append([name])
            found = [len(segments) - 1]
        s = found[n % len(found)]
        if op == "copy segment":
            segments.insert(s + 1, list(segments[s]))
            s += 1
        fields = segments[s]
        if fields[0] == "MSH" and f < 2:
            continue
        while len(fields) <= f:
            fields.append("")
        fields[f] = f"{fields[f]}~{value}" if op == "append" else value
    return "\r".join("|".join(fields) for fields in segments)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(FIXTURE_TEXTS), st.lists(EDIT | TWINS, min_size=1, max_size=8))
def test_random_values_map_alike_both_ways(mappings: dict[str, Any], text: str, edits: list[Any]) -> None:
    try:
        msg = hl7.parse(edited(text, edits))
    except HL7Error:
        return
    for compiled, reference in mappings.values():
        assert outcome(compiled, msg) == outcome(reference, msg)


def test_mapping_file_text_never_becomes_code(tmp_path: Path) -> None:
    """A filter value or a default written to look like Python stays a value: it is a constant of the generated
    code's namespace, never part of its source, and it maps as the interpreter maps it."""
    picked = "';import os;os.system;#"  # a filter value cannot hold ')'
    default = "');__import__('os').system('exit 3');('"
    text = SHIPPED.replace("birth_given_name: PID-5(7=L).2", f'birth_given_name: "PID-3(5={picked}).1"').replace(
        "identity_status: PID-32", f'identity_status: {{from: PID-32, default: "{default}"}}'
    )
    assert picked in text and default in text
    variants(tmp_path)  # the tables beside it
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    compiled, reference = HL7InboundMapping(path), HL7InboundMapping(path, compiled=False)
    assert not any(t in compiled.program.source for t in ("import", "os.system", "exit 3"))
    source = hl7.decode((FIXTURES / "adt_a08_update.hl7").read_bytes()).text
    msg = hl7.parse(source.replace("^PI|", f"^PI~OTHER^^^^{picked}|", 1))
    expected = outcome(reference, msg)
    assert outcome(compiled, msg) == expected
    (update,) = compiled.map(msg)
    assert update.patient.identity_status == default  # as written
    assert update.patient.birth_given_name == "OTHER"  # the repetition the filter value picked
