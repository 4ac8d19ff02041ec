"""C-FIND matching (PS3.4 C.2.2.2): properties against independent oracles, and one example per rule."""

from __future__ import annotations

import fnmatch
import re
import time
from datetime import date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from tests.peer_dcmtk import mwl_item
from traboule.formats.dicom_match import (
    MAX_PATTERN_LENGTH,
    QueryError,
    WildcardPattern,
    build_response,
    compile_query,
    matches,
)

# Range and wild card query values are not valid DA/UI/DT values: pydicom warns when a test builds them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def query(**keys: object) -> Dataset:
    """A query identifier; keys prefixed `sps_` go into the single Scheduled Procedure Step item."""
    ds, step = Dataset(), Dataset()
    for keyword, value in keys.items():
        if keyword.startswith("sps_"):
            setattr(step, keyword[4:], value)
        else:
            setattr(ds, keyword, value)
    if len(step):
        ds.ScheduledProcedureStepSequence = [step]
    return ds


# -- properties ------------------------------------------------------------------------------------------------

# No space (LO strips it), no backslash (the value separator): everything else, regex metacharacters included.
TEXT = st.text(alphabet="ab.+()[]^$|{}éZ", max_size=6)
PATTERN = st.text(alphabet="ab.+()[]^$|{}éZ*?", min_size=1, max_size=6).filter(lambda p: "*" in p or "?" in p)


def fill(pattern: str, data: st.DataObject) -> str:
    """A value built to match the pattern: each `*` becomes some text, each `?` one character."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(data.draw(TEXT))
        elif ch == "?":
            out.append(data.draw(st.sampled_from("ab.(é")))
        else:
            out.append(ch)
    return "".join(out)


def oracle(pattern: str, value: str) -> bool:
    """fnmatch, an independent wild card implementation (its `[` sets are escaped away: DICOM has none)."""
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


@SETTINGS
@given(pattern=PATTERN, data=st.data())
def test_wildcard_matching_agrees_with_fnmatch(pattern: str, data: st.DataObject) -> None:
    value = data.draw(st.one_of(TEXT, st.just(fill(pattern, data))))
    item = Dataset()
    item.PatientID = value
    expected = pattern.strip("*") == "" or (value != "" and oracle(pattern, value))
    assert matches(query(PatientID=pattern), item) is expected


# Regex metacharacters, `[` (fnmatch's set), non-ASCII and the line separators a `.` would not match.
GLOB_TEXT = st.text(alphabet="ab.+()[]^$|{}\\éŁ中\n\r\x00", max_size=8)
GLOB_PATTERN = st.text(alphabet="ab.+()[]^$|{}\\éŁ中\n\r\x00*?", max_size=8)


def backtracking_reference(pattern: str, value: str) -> bool:
    """The plain regex translation (the matcher before WildcardPattern): right, and fast on short strings."""
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern]
    return re.fullmatch("".join(parts), value, re.DOTALL) is not None


@settings(max_examples=500, deadline=None)
@given(pattern=GLOB_PATTERN, data=st.data())
def test_the_linear_matcher_agrees_with_a_backtracking_regex(pattern: str, data: st.DataObject) -> None:
    value = data.draw(st.one_of(GLOB_TEXT, st.just(fill(pattern, data))))
    assert WildcardPattern(pattern).fullmatch(value) is backtracking_reference(pattern, value)


def test_pathological_patterns_complete_in_linear_time() -> None:
    description = "SCANNER THORACO-ABDOMINO-PELVIEN AVEC INJECTION"  # 38 such items took 32 s of CPU
    cases = [  # (pattern, a value it does not match, one it matches)
        ("*?" * 10 + "Z", description, description + " Z"),  # x5 per `*?` pair with the backtracking regex
        ("*?" * 5000 + "Z", description * 200, description * 200 + "Z"),
        ("*a" * 3000 + "*b", "a" * 10000, "a" * 10000 + "b"),
        ("*" + "a?" * 5000 + "b*", "a" * 10240, "a" * 10000 + "b"),  # O(pattern x value): the worst allowed
    ]
    started = time.perf_counter()
    for pattern, other, matching in cases:
        assert len(pattern) <= MAX_PATTERN_LENGTH
        assert WildcardPattern(pattern).fullmatch(other) is False
        assert WildcardPattern(pattern).fullmatch(matching) is True
    assert time.perf_counter() - started < 2  # minutes, days or more for the backtracking regex


@pytest.mark.filterwarnings("ignore:The value length")
def test_a_wildcard_pattern_longer_than_any_valid_value_is_a_query_error() -> None:
    with pytest.raises(QueryError, match=r"\(0032,1060\): wild card pattern longer than 10240") as raised:
        compile_query(query(RequestedProcedureDescription="*?" * 6000))
    assert raised.value.tag == 0x00321060


def test_an_undecodable_value_is_a_query_error_naming_it() -> None:
    identifier = Dataset()
    # Accession Number sent as FD with 3 bytes: pydicom cannot read it as the SCP receives it.
    identifier[0x00080050] = RawDataElement(Tag(0x00080050), "FD", 3, b"ACC", 0, False, True)
    with pytest.raises(QueryError, match=r"\(0008,0050\): value cannot be decoded") as raised:
        compile_query(identifier)
    assert raised.value.tag == 0x00080050


DATES = st.dates(min_value=date(1900, 1, 2), max_value=date(2099, 12, 30))


@SETTINGS
@given(first=DATES, second=DATES)
def test_a_date_range_contains_its_bounds_and_not_the_days_around(first: date, second: date) -> None:
    low, high = sorted((first, second))
    text = lambda d: d.strftime("%Y%m%d")  # noqa: E731
    for form in (f"{text(low)}-{text(high)}", f"-{text(high)}", f"{text(low)}-"):
        compiled = compile_query(query(sps_ScheduledProcedureStepStartDate=form))
        for day in (low, high):
            assert compiled.matches(mwl_item(start_date=text(day))), (form, day)
    closed = compile_query(query(sps_ScheduledProcedureStepStartDate=f"{text(low)}-{text(high)}"))
    assert not closed.matches(mwl_item(start_date=text(low - timedelta(days=1))))
    assert not closed.matches(mwl_item(start_date=text(high + timedelta(days=1))))


def tm_text(micros: int, precision: int) -> str:
    """A TM value of the given precision (1 HH, 2 HHMM, 3 HHMMSS, 4 with fraction) for a time of day."""
    seconds, fraction = divmod(micros, 1_000_000)
    hh, rest = divmod(seconds, 3600)
    mm, ss = divmod(rest, 60)
    return [f"{hh:02d}", f"{hh:02d}{mm:02d}", f"{hh:02d}{mm:02d}{ss:02d}", f"{hh:02d}{mm:02d}{ss:02d}.{fraction:06d}"][
        precision - 1
    ]


TIMES = st.integers(min_value=0, max_value=86_400_000_000 - 1)


@SETTINGS
@given(first=TIMES, second=TIMES, p1=st.integers(1, 4), p2=st.integers(1, 4))
def test_a_time_range_contains_its_bounds_whatever_their_precision(first: int, second: int, p1: int, p2: int) -> None:
    low, high = sorted((first, second))
    low_text, high_text = tm_text(low, p1), tm_text(high, p2)
    compiled = compile_query(query(sps_ScheduledProcedureStepStartTime=f"{low_text}-{high_text}"))
    for bound in (low_text, high_text):
        assert compiled.matches(mwl_item(start_time=bound)), (low_text, high_text, bound)


@SETTINGS
@given(first=st.datetimes(datetime(1900, 1, 1), datetime(2099, 12, 31)), second=st.datetimes(datetime(1900, 1, 1)))
def test_a_datetime_range_contains_its_bounds(first: datetime, second: datetime) -> None:
    low, high = sorted((first, second))
    fmt = "%Y%m%d%H%M%S.%f"
    item_low, item_high = Dataset(), Dataset()
    item_low.AcquisitionDateTime = low.strftime(fmt)
    item_high.AcquisitionDateTime = high.strftime(fmt)
    compiled = compile_query(
        query(AcquisitionDateTime=f"{item_low.AcquisitionDateTime}-{item_high.AcquisitionDateTime}")
    )
    assert compiled.matches(item_low) and compiled.matches(item_high)


KEYWORDS = st.sampled_from(
    ["PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "PatientBirthDate", "IssuerOfPatientID"]
)


@SETTINGS
@given(
    keywords=st.sets(KEYWORDS),
    sps_keys=st.sets(st.sampled_from(["Modality", "ScheduledStationAETitle"])),
    star=st.booleans(),
)
def test_universal_matching_matches_every_item_even_without_the_attribute(
    keywords: set[str], sps_keys: set[str], star: bool
) -> None:
    keys: dict[str, object] = {k: "" for k in keywords}
    if star:
        keys.update({k: "*" for k in keywords if k in ("PatientName", "PatientID", "AccessionNumber")})
    keys.update({f"sps_{k}": "" for k in sps_keys})
    q = query(**keys)
    full, bare = mwl_item(), Dataset()
    bare.SpecificCharacterSet = "ISO_IR 192"
    assert matches(q, full)
    assert matches(q, bare)  # even a sequence key whose item keys are all universal


# -- examples, one per rule --------------------------------------------------------------------------------------


def test_single_value_matching_is_case_sensitive_and_ignores_padding() -> None:
    item = mwl_item(accession="ACC0001")
    assert matches(query(AccessionNumber="ACC0001 "), item)
    assert not matches(query(AccessionNumber="acc0001"), item)
    assert not matches(query(AccessionNumber="ACC000"), item)


def test_person_name_case_insensitive_only_when_asked() -> None:
    item = mwl_item(patient_name="DUPONT^Hélène")
    assert not matches(query(PatientName="dupont^hélène"), item)
    assert matches(query(PatientName="dupont^hélène"), item, case_insensitive_names=True)
    assert matches(query(PatientName="dup*"), item, case_insensitive_names=True)
    assert matches(query(PatientName="DUPONT^Hélène^^"), item)  # empty trailing components carry nothing


def test_wildcards_do_not_apply_to_dates_and_uids() -> None:
    item = mwl_item(study_uid="1.2.3")
    assert not matches(query(StudyInstanceUID="1.2.*"), item)  # literal for UI (C.2.2.2.4)
    with pytest.raises(QueryError):
        compile_query(query(sps_ScheduledProcedureStepStartDate="2024*"))


def test_list_of_uid_matching() -> None:
    item = mwl_item(study_uid="1.2.3")
    assert matches(query(StudyInstanceUID=["9.9", "1.2.3"]), item)
    assert not matches(query(StudyInstanceUID=["9.9", "1.2.4"]), item)


def test_time_ranges_of_reduced_precision_and_fractions() -> None:
    assert matches(query(sps_ScheduledProcedureStepStartTime="0800-1200"), mwl_item(start_time="120030"))
    assert not matches(query(sps_ScheduledProcedureStepStartTime="0800-1200"), mwl_item(start_time="120100"))
    assert not matches(query(sps_ScheduledProcedureStepStartTime="0930-"), mwl_item(start_time="092959"))
    fraction = query(sps_ScheduledProcedureStepStartTime="093000.5-093000.7")
    assert matches(fraction, mwl_item(start_time="093000.6"))
    assert not matches(fraction, mwl_item(start_time="093000.8"))
    assert matches(query(sps_ScheduledProcedureStepStartTime="09"), mwl_item(start_time="094500"))


def test_datetime_range_honours_utc_offsets() -> None:
    item = Dataset()
    item.AcquisitionDateTime = "20240315100000+0100"  # 09:00 UTC
    assert matches(query(AcquisitionDateTime="20240315085900+0000-20240315090100+0000"), item)
    assert not matches(query(AcquisitionDateTime="20240315093000+0000-"), item)


def test_combined_date_time_range_spans_days() -> None:
    # PS3.4 C.2.2.2.5: 15 March 20:00 to 16 March 06:00, an overnight window.
    q = query(sps_ScheduledProcedureStepStartDate="20240315-20240316", sps_ScheduledProcedureStepStartTime="2000-0600")
    assert matches(q, mwl_item(start_date="20240315", start_time="223000"))
    assert matches(q, mwl_item(start_date="20240316", start_time="053000"))
    assert not matches(q, mwl_item(start_date="20240315", start_time="193000"))
    assert not matches(q, mwl_item(start_date="20240316", start_time="063000"))


def test_a_time_range_alone_may_not_cross_midnight() -> None:
    with pytest.raises(QueryError) as error:
        compile_query(query(sps_ScheduledProcedureStepStartTime="2000-0600"))
    assert error.value.tag == 0x00400003


def test_empty_or_absent_stored_value_matches_only_universal() -> None:
    item = mwl_item(issuer="")
    assert not matches(query(IssuerOfPatientID="CHU-X"), item)
    assert not matches(query(IssuerOfPatientID="*X"), item)
    assert matches(query(IssuerOfPatientID=""), item)
    assert not matches(query(PatientAge="042Y"), item)  # absent from the item


def test_sequence_matching_needs_one_stored_item_satisfying_all_keys() -> None:
    item = mwl_item(modality="CT", station_aet="CT01")
    mr = Dataset()
    mr.Modality = "MR"
    mr.ScheduledStationAETitle = "MR01"
    item.ScheduledProcedureStepSequence.append(mr)
    assert matches(query(sps_Modality="MR", sps_ScheduledStationAETitle="MR01"), item)
    assert not matches(query(sps_Modality="CT", sps_ScheduledStationAETitle="MR01"), item)


def test_multi_valued_stored_attribute_matches_any_value() -> None:
    item = mwl_item(station_aet=["CT01", "CT02"])
    assert matches(query(sps_ScheduledStationAETitle="CT02"), item)
    assert not matches(query(sps_ScheduledStationAETitle="CT03"), item)


def test_a_sequence_key_holds_one_item() -> None:
    q = query(sps_Modality="CT")
    q.ScheduledProcedureStepSequence.append(Dataset())
    with pytest.raises(QueryError):
        compile_query(q)


def test_invalid_values_are_query_errors_naming_the_key() -> None:
    for bad in ("2024", "20240230", "20240301-20240201", "-"):
        with pytest.raises(QueryError) as error:
            compile_query(query(sps_ScheduledProcedureStepStartDate=bad))
        assert error.value.tag == 0x00400002


# -- responses ---------------------------------------------------------------------------------------------------


def test_response_holds_exactly_the_requested_keys_and_the_character_set() -> None:
    item = mwl_item(charset="ISO_IR 192")
    rsp = build_response(query(PatientName="", PatientAge="", sps_Modality=""), item)
    assert [e.keyword for e in rsp] == [
        "SpecificCharacterSet",
        "PatientName",
        "PatientAge",
        "ScheduledProcedureStepSequence",
    ]
    assert rsp.SpecificCharacterSet == "ISO_IR 192"
    assert rsp.PatientAge == "" and rsp["PatientAge"].VR == "AS"  # requested, unknown: zero length
    assert [e.keyword for e in rsp.ScheduledProcedureStepSequence[0]] == ["Modality"]


def test_response_sequence_without_item_keys_is_the_whole_sequence() -> None:
    item = mwl_item()
    empty_item = query()
    empty_item.ScheduledProcedureStepSequence = [Dataset()]
    no_item = query()
    no_item.ScheduledProcedureStepSequence = Sequence()
    for q in (empty_item, no_item):
        [step] = build_response(q, item).ScheduledProcedureStepSequence
        assert step.ScheduledProcedureStepID == "SPS0001" and step.Modality == "CT"
        assert len(step) == len(item.ScheduledProcedureStepSequence[0])


def test_response_sequence_keeps_only_matching_stored_items() -> None:
    item = mwl_item(modality="CT")
    mr = Dataset()
    mr.Modality = "MR"
    mr.ScheduledProcedureStepID = "SPS-MR"
    item.ScheduledProcedureStepSequence.append(mr)
    rsp = build_response(query(sps_Modality="MR", sps_ScheduledProcedureStepID=""), item)
    assert [s.ScheduledProcedureStepID for s in rsp.ScheduledProcedureStepSequence] == ["SPS-MR"]


def test_response_is_independent_of_the_stored_item() -> None:
    item = mwl_item(patient_name="DUPONT^Hélène", station_aet=["CT01", "CT02"])
    rsp = build_response(query(PatientName="", sps_ScheduledStationAETitle=""), item)
    rsp.PatientName = "CHANGED"
    rsp.ScheduledProcedureStepSequence[0].ScheduledStationAETitle.append("CT03")
    assert item.PatientName == "DUPONT^Hélène"
    assert list(item.ScheduledProcedureStepSequence[0].ScheduledStationAETitle) == ["CT01", "CT02"]


def test_a_key_with_too_many_values_is_refused_before_it_is_decoded() -> None:
    """55,000 wild card values in one key cost 10 s of CPU before the first item; 1,000 made the worklist's SQL
    prefilter fail (C001)."""
    from pydicom.dataelem import RawDataElement

    from traboule.formats.dicom_match import MAX_KEY_VALUES

    for count, refusal in ((5_000, f"more than {MAX_KEY_VALUES} values"), (55_000, "longer than 65536 bytes")):
        many = RawDataElement(Tag(0x00100010), "PN", 0, b"\\".join([b"S*c*a*n"] * count), 0, False, True)
        query = Dataset()
        query._dict[many.tag] = many  # as received: still raw
        with pytest.raises(QueryError, match=refusal):
            compile_query(query)
    ok = Dataset()
    ok.PatientName = "\\".join(["DUP*"] * MAX_KEY_VALUES)
    assert compile_query(ok).conditions
