"""The hand-written encoder and the MWL fast path give what pydicom gives, or refuse (and pydicom takes over)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset

from tests.conftest import ROOT, shared_path
from traboule import model
from traboule.channels.worklist import assign_missing_ids
from traboule.formats import hl7
from traboule.formats.dicom_encoding import SUPPORTED_VRS, UNSPLIT_VRS, Element, EncodingError, encode, to_dataset
from traboule.formats.dicom_match import element_values, normalize
from traboule.formats.worklist_item import (
    ACCESSION_NUMBER,
    ISSUER_OF_PATIENT_ID,
    MODALITY,
    PATIENT_ID,
    PATIENT_NAME,
    REQUESTED_PROCEDURE_ID,
    SPS_SEQUENCE,
    SPS_START_DATE,
    SPS_START_TIME,
    SPS_STATUS,
    STATION_AET,
    STUDY_INSTANCE_UID,
    dataset_columns,
    decode_item,
    encode_item,
    item_columns,
)
from traboule.stores.worklist import _fully_converted
from traboule.translate import dicom_mapping
from traboule.translate.dicom_mapping import MWLMapping
from traboule.translate.hl7_mapping import HL7InboundMapping, MappingFailure

pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR", "ignore:The value length", "ignore:The number of PN components"
)

# -- random element trees: the encoder against pydicom -----------------------------------------------------------

TAGS: dict[str, list[int]] = {}
for _tag, (_vr, *_) in sorted(DicomDictionary.items()):
    if _vr in SUPPORTED_VRS and _tag >> 16 not in (0x0002, 0xFFFE) and _tag & 0xFFFF and _tag != 0x00080005:
        TAGS.setdefault(_vr, []).append(_tag)

LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF)
BEYOND_LATIN1 = st.one_of(st.sampled_from("ŁłŒœλЖ中文한😀€"), st.characters(codec="utf-8", min_codepoint=0x100))
SEPARATORS = st.sampled_from(" \\^=")  # value, component and group separators, padding
CHARSETS = ["ISO_IR 100", "ISO_IR 192", "", None]


def text(alphabet: st.SearchStrategy[str], max_size: int = 12) -> st.SearchStrategy[str]:
    return st.text(st.one_of(alphabet, SEPARATORS), max_size=max_size)


def multi(value: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(value, min_size=1, max_size=3).map("\\".join)


DS = st.from_regex(r"[+-]?(?:[0-9]{1,6}(?:\.[0-9]{0,4})?|\.[0-9]{1,5})(?:[eE][+-]?[0-9]{1,2})?", fullmatch=True)
IS = st.from_regex(r"[+-]?[0-9]{1,10}", fullmatch=True)
UI = st.from_regex(r"[0-9]{1,5}(?:\.[0-9]{1,5}){0,6}", fullmatch=True)


def value_for(vr: str, charset: str | None) -> st.SearchStrategy[str | None]:
    if vr in ("FD", "FL", "SL", "SS", "SV", "UL", "US", "UV"):
        return st.none()
    if vr in ("PN", "LO", "SH", "LT", "ST", "UT", "UC"):  # the character set's repertoire
        wide = LATIN1 if charset != "ISO_IR 192" else st.one_of(BEYOND_LATIN1, LATIN1)
        value = text(wide, 64 if vr in ("LT", "ST", "UT", "UC") else 12)
    elif vr == "DS":
        value = multi(DS)
    elif vr == "IS":
        value = multi(IS)
    elif vr == "UI":
        value = multi(UI)
    else:  # AE AS CS DA DT TM UR: Latin-1 whatever the character set
        value = text(LATIN1)
    return st.one_of(st.sampled_from([None, ""]), value)


def elements(charset: str | None, depth: int) -> st.SearchStrategy[list[Element]]:
    vrs = sorted(vr for vr in TAGS if vr != "SQ") + (["SQ"] * 8 if depth < 3 else [])  # nest often, 3 deep at most

    def element(vr: str) -> st.SearchStrategy[Element]:
        tag = st.sampled_from(TAGS[vr])
        if vr == "SQ":
            items = st.lists(elements(charset, depth + 1), max_size=2)
            return st.tuples(tag, st.just(vr), st.one_of(st.none(), items))
        return st.tuples(tag, st.just(vr), value_for(vr, charset))

    return st.lists(st.sampled_from(vrs).flatmap(element), max_size=8 if depth == 0 else 3, unique_by=lambda e: e[0])


TREES = st.sampled_from(CHARSETS).flatmap(lambda cs: st.tuples(st.just(cs), elements(cs, 0)))


def flattened(ds: Dataset, prefix: tuple[int, ...] = ()) -> list[tuple[tuple[int, ...], str, list[str]]]:
    """Every element as (tag path, VR, values as the matcher compares them). Values are split on backslashes here
    and stripped of any white space, as pydicom reads some values unlike it assigns them: a UR is one value when
    read but split when assigned, a no-break space around an AE title is stripped when read."""
    out = []
    for elem in ds:
        path = (*prefix, int(elem.tag))
        if elem.VR == "SQ":
            out.append((path, "SQ", [str(len(elem.value))]))
            for i, item in enumerate(elem.value):
                out += flattened(item, (*path, i))
        else:
            joined = "\\".join(element_values(elem))
            values = [joined] if elem.VR in UNSPLIT_VRS else joined.split("\\")
            out.append((path, elem.VR, [normalize(v, elem.VR).strip() for v in values]))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_encode_gives_the_bytes_pydicom_writes(case: tuple[str | None, list[Element]]) -> None:
    charset, tree = case
    ours = encode(tree, charset)
    expected = to_dataset(tree, charset)
    assert ours == encode_item(expected)
    assert flattened(_fully_converted(decode_item(ours))) == flattened(expected)


def test_nested_sequences_and_empty_values() -> None:
    tree: list[Element] = [
        (0x00100010, "PN", "ŁUKASZ^Jan=="),
        (0x00400100, "SQ", [[(0x00080060, "CS", "CT"), (0x00400008, "SQ", [[], [(0x00080100, "SH", "X")]])], []]),
        (0x00081110, "SQ", []),
        (0x0020000D, "UI", "1.2.3"),
        (0x001021C0, "US", None),
        (0x00102000, "LO", ""),
    ]
    data = encode(tree, "ISO_IR 192")
    assert data == encode_item(to_dataset(tree, "ISO_IR 192"))
    assert data.startswith(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 192")


@pytest.mark.parametrize(
    ("tree", "charset", "reason"),
    [
        ([(0x00100010, "PN", "Łukasz")], "ISO_IR 100", "codec"),  # pydicom would write '?'
        ([(0x00100040, "CS", "Ł")], "ISO_IR 192", "codec"),  # CS is written in Latin-1 whatever the charset
        ([(0x001021C0, "US", "1")], "ISO_IR 100", "only an empty value"),
        ([(0x001021C0, "US", "")], "ISO_IR 100", "only an empty value"),
        ([(0x00420011, "OB", "x")], "ISO_IR 100", "not supported"),
        ([(0x00100010, "PN", "A")], "ISO 2022 IR 87", "character set"),
        ([(0x0020000D, "UI", " 1.2")], "ISO_IR 100", "white space"),
        ([(0x00101030, "DS", " 70")], "ISO_IR 100", "plain DS"),
        ([(0x00101030, "DS", "70kg")], "ISO_IR 100", "plain DS"),
        ([(0x00102000, "LO", 70)], "ISO_IR 100", "expected a str"),
        ([(0x00104000, "LT", "x" * 0x10000)], "ISO_IR 100", "2-byte length"),
        ([(0x00100020, "LO", "A"), (0x00100020, "LO", "B")], "ISO_IR 100", "twice"),
        ([(0x00080005, "CS", "ISO_IR 100")], None, "character set to encode"),
        ([(0x00100000, "UL", None)], None, "not an element"),
        ([(0x00400100, "SQ", "x")], None, "list of items"),
    ],
)
def test_what_the_encoder_refuses(tree: list[Element], charset: str | None, reason: str) -> None:
    with pytest.raises(EncodingError, match=reason):
        encode(tree, charset)


def test_long_text_vrs_take_a_4_byte_length() -> None:
    tree: list[Element] = [(0x00400031, "UT", "x" * 0x10001), (0x00081190, "UR", "http://x")]
    assert encode(tree, "ISO_IR 100") == encode_item(to_dataset(tree, "ISO_IR 100"))


# -- index columns read on the tree equal those read on the Dataset ----------------------------------------------

COLUMN_TEXT = st.text(st.sampled_from("Ab é\\=^.0"), max_size=6)
DATES = st.sampled_from(["20240315", "2024.03.15", "20241315", " 20240315 ", "x", "20240315\\20240316"])
TOP_COLUMNS = [
    (PATIENT_ID, "LO", COLUMN_TEXT),
    (ISSUER_OF_PATIENT_ID, "LO", COLUMN_TEXT),
    (PATIENT_NAME, "PN", COLUMN_TEXT),
    (ACCESSION_NUMBER, "SH", COLUMN_TEXT),
    (REQUESTED_PROCEDURE_ID, "SH", COLUMN_TEXT),
    (STUDY_INSTANCE_UID, "UI", st.sampled_from(["1.2.3", " 1.2.3 ", "1.2\\3.4", "1.2.3\0"])),
]
SPS_COLUMNS = [
    (MODALITY, "CS", COLUMN_TEXT),
    (STATION_AET, "AE", COLUMN_TEXT),
    (SPS_START_DATE, "DA", DATES),
    (SPS_START_TIME, "TM", COLUMN_TEXT),
    (SPS_STATUS, "CS", st.sampled_from(["SCHEDULED", " STARTED", "", "A\\B"])),
]


def some_of(columns: list) -> st.SearchStrategy[list[Element]]:
    present = st.lists(st.sampled_from(columns), unique_by=lambda c: c[0], max_size=len(columns))
    return present.flatmap(
        lambda cs: st.tuples(*(st.tuples(st.just(t), st.just(vr), st.one_of(st.none(), v)) for t, vr, v in cs))
    ).map(list)


MWL_TREES = st.tuples(
    some_of(TOP_COLUMNS), st.one_of(st.none(), st.lists(some_of(SPS_COLUMNS), max_size=2)), st.booleans()
).map(lambda t: t[0] + ([(SPS_SEQUENCE, "SQ", t[1])] if t[2] else []))


@settings(max_examples=300, deadline=None)
@given(MWL_TREES)
def test_item_columns_equal_the_dataset_columns(tree: list[Element]) -> None:
    assert item_columns(tree) == dataset_columns(to_dataset(tree, "ISO_IR 100"))


# -- the MWL mapping: fast path (tree + encoder) against the Dataset path -----------------------------------------


def orders_from(paths: list[Path]) -> tuple[list[tuple[str, model.ImagingOrder]], list[Path]]:
    """The orders of these messages (each also with its ids assigned), and the order messages that fail to map.

    Values too long for the worklist are cut rather than refused here: the encoders must agree on them too."""
    mapping = HL7InboundMapping()
    for section in (mapping.patient, mapping.order, ([], [mapping.steps] if mapping.steps else [])):
        rules, eaches = section
        for rule in [*rules, *(r for each in eaches for r in each.rules)]:
            rule.too_long = "cut"
    out = []
    failed = []
    for path in paths:
        msg = hl7.parse(hl7.decode(path.read_bytes()).text)
        if mapping.kind_of(msg) != "order":
            continue
        try:
            payloads = mapping.map(msg)
        except MappingFailure:
            failed.append(path)
            continue
        for order in payloads:
            assert isinstance(order, model.ImagingOrder)
            out.append((path.name, order))
            with_ids = copy.deepcopy(order)
            assign_missing_ids(with_ids)  # as the worklist consumer renders them
            out.append((path.name + " (ids assigned)", with_ids))
    return out, failed


def assert_fast_path_equals_slow_path(orders: list[tuple[str, model.ImagingOrder]]) -> None:
    mwl = MWLMapping()
    for name, order in orders:
        slow = mwl.items(order)
        fast = mwl.encoded_items(order)
        assert [s for s, _ in fast] == [s for s, _ in slow], name
        for (_, ds), (_, item) in zip(slow, fast, strict=True):
            assert item.data == encode_item(ds), name
            assert item.columns == dataset_columns(ds), name
            assert item.dataset == ds, name


def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the fast path must not hand an item to pydicom (`encode_item` in the test stays pydicom's)."""

    def fail(ds: Dataset) -> bytes:
        raise AssertionError("the fast path fell back to pydicom")

    monkeypatch.setattr(dicom_mapping, "encode_item", fail)


def test_mwl_fast_path_on_the_project_fixtures(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = sorted((ROOT / "fixtures" / "hl7").glob("*.hl7")) + sorted((ROOT / "mappings" / "tests").glob("*.hl7"))
    orders, failed = orders_from(paths)
    assert sorted(p.relative_to(ROOT).as_posix() for p in failed) == [
        "fixtures/hl7/orm_o01_missing_orc2.hl7",
        "fixtures/hl7/orm_o01_no_pid3.hl7",
        "mappings/tests/orm_o01_bad_study_uid.hl7",
        "mappings/tests/orm_o01_no_pid3.hl7",
    ]
    assert len(orders) >= 10
    no_fallback(monkeypatch)
    assert_fast_path_equals_slow_path(orders)


def test_mwl_fast_path_on_the_shared_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shared_path("corpus", "hl7v2")
    paths = sorted(p for p in folder.iterdir() if p.name.startswith(("ans_", "dcm4che_")))
    orders, failed = orders_from(paths)
    assert failed == []
    assert orders, "no ANS/dcm4che order in the corpus"
    no_fallback(monkeypatch)
    assert_fast_path_equals_slow_path(orders)


def an_order(**changes: str) -> model.ImagingOrder:
    order = model.ImagingOrder(
        accession_number=model.Identifier("ACC1", "CHU-X"),
        patient=model.Patient(ids=[model.Identifier("P1", "CHU-X")], name=model.PersonName("DUPONT", "Hélène")),
        steps=[model.ScheduledStep(step_id="S1", modality="CT", station_aet="CT01", start="202403150930")],
    )
    for path, value in changes.items():
        target: object = order
        *parents, leaf = path.split("__")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return order


@pytest.mark.filterwarnings("ignore:Failed to encode value")
@pytest.mark.parametrize(
    "changes",
    [
        {"patient_weight": " 70"},  # pydicom strips DS values: the encoder leaves it to pydicom
        {"medical_alerts": "Łatex\\iodine"},  # multi-valued, unseen by character_set: pydicom writes '?'
        {"study_instance_uid": "1.2.3 "},
    ],
)
def test_values_the_encoder_refuses_go_through_pydicom(changes: dict[str, str]) -> None:
    mwl = MWLMapping()
    order = an_order(**changes)
    expected = [(encode_item(ds), dataset_columns(ds)) for _, ds in mwl.items(order)]
    assert [(item.data, item.columns) for _, item in mwl.encoded_items(order)] == expected


def test_an_item_pydicom_cannot_encode_fails_on_the_fast_path_too() -> None:
    order = an_order(patient__sex="Ł")  # not Latin-1, in a CS
    [(_, ds)] = MWLMapping().items(order)
    with pytest.raises(TypeError):
        encode_item(ds)
    with pytest.raises(TypeError):
        MWLMapping().encoded_items(order)


def test_character_set_follows_the_values() -> None:
    mwl = MWLMapping()
    for name, charset in (("DUPONT", "ISO_IR 100"), ("DUPONT^Hélène", "ISO_IR 100"), ("KOWALSKI^Łukasz", "ISO_IR 192")):
        order = an_order(patient__name__family=name, patient__name__given="")
        [(_, item)] = mwl.encoded_items(order)
        [(_, ds)] = mwl.items(order)
        assert ds.SpecificCharacterSet == charset
        assert item.data == encode_item(ds)
        assert item.columns[3] == name  # patient_name column


def test_encoded_item_builds_its_dataset_lazily_once() -> None:
    [(_, item)] = MWLMapping().encoded_items(an_order())
    assert item._dataset is None
    ds = item.dataset
    assert item.dataset is ds and ds.AccessionNumber == "ACC1"
