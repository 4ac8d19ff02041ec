"""C-FIND attribute matching (DICOM PS3.4 C.2.2.2) of a query identifier against a stored item, no I/O.

`compile_query` parses the identifier once (wild cards to `WildcardPattern`s, ranges to integer bounds) so that a
worklist scan pays only for the comparisons; `matches` and `build_response` are one-shot conveniences around it.
A C-FIND that cannot be matched raises `QueryError`; a scan ended early by its bounds raises `ScanStopped`
(what the MWL SCP answers as failure statuses).

Conformance choices (the places where PS3.4 leaves room, or where we are lenient on purpose):
* PN single value and wild card matching are case-sensitive unless `case_insensitive_names`; PN values compare
  after dropping trailing spaces and trailing empty components (`DUPONT^^` equals `DUPONT`).
* A lone `*` is Universal Matching for every VR (C.2.2.2.4 note 1; some SCUs send it for dates too).
* A query value with several values (backslash) matches when any of them matches: List of UID Matching for UI
  (C.2.2.2.2), a lenient extension for the other VRs. A multi-valued stored attribute (e.g. Scheduled Station AE
  Title `CT01\\CT02`) matches when any of its values matches.
* DA/TM/DT values of reduced precision stand for the whole period they name: `-1200` includes 12:00:30 and
  `2024` in DT covers the year. A stored value matches when the period it names overlaps the query's.
* DT offsets from UTC are applied when present; values without an offset are compared as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from traboule.errors import QueryError

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
TIMEZONE_OFFSET_FROM_UTC = 0x00080201

# C.2.2.2.4 (2024 edition): Wild Card Matching applies to these VRs only; never to dates, times, UIDs or numbers.
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
# PS3.5 6.2: LT (10240 characters) is the longest bounded VR wild cards apply to. A longer pattern is no valid value
# of a matching key; refusing it bounds what one query costs to compile (~0.8 us per character) and to match.
MAX_PATTERN_LENGTH = 10240
# One matching key: at most this many values (backslash-separated) and bytes. A list of UIDs or codes of a real
# query has a few; thousands only cost time before the first item is examined.
MAX_KEY_VALUES = 256
MAX_KEY_BYTES = 64 * 1024
# PS3.5 6.2: leading and trailing spaces are not significant for these VRs ...
_STRIP_BOTH = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "SH", "TM"})
# ... and only trailing spaces for these.
_STRIP_TRAILING = frozenset({"LT", "PN", "ST", "UC", "UR", "UT"})
_TEXT_VRS = _STRIP_BOTH | _STRIP_TRAILING | {"UI"}

# C.2.2.2.5: pairs whose ranges are matched as one date-time range when both keys are ranges.
DATE_TIME_PAIRS: dict[int, int] = {
    0x00400002: 0x00400003,  # Scheduled Procedure Step Start Date / Time
    0x00400004: 0x00400005,  # Scheduled Procedure Step End Date / Time
    0x00400244: 0x00400245,  # Performed Procedure Step Start Date / Time
    0x00080020: 0x00080030,  # Study Date / Time
    0x00080021: 0x00080031,  # Series Date / Time
}

_DAY_US = 86_400_000_000
_EPOCH = datetime(1, 1, 1)
_TM_RE = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_DT_RE = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?([+-]\d{4})?")
_DT_BOUND = r"\d{4}[\d.]*(?:[+-]\d{4})?"
_DT_RANGE_RE = re.compile(rf"({_DT_BOUND})?-({_DT_BOUND})?")


class ScanStopped(Exception):
    """A C-FIND scan ended before its last candidate: `reason` is "max_examined", "deadline" or "stopped"
    (the caller's `should_stop` said so); `examined` is the number of items examined until then."""

    def __init__(self, reason: str, examined: int) -> None:
        super().__init__(f"scan stopped ({reason}) after {examined} items")
        self.reason = reason
        self.examined = examined


def normalize(value: str, vr: str) -> str:
    """A stored or query text value as compared: insignificant padding removed (PS3.5 6.2), PN tidied."""
    if vr in _STRIP_BOTH:
        return value.strip(" ")
    if vr == "PN":
        return normalize_pn(value)
    if vr in _STRIP_TRAILING:
        return value.rstrip(" ")
    if vr == "UI":
        return value.rstrip("\0 ")
    return value


def normalize_pn(value: str) -> str:
    """`DUPONT^Hélène^^ ` -> `DUPONT^Hélène`: trailing spaces and empty trailing components carry no meaning."""
    groups = [group.rstrip(" ").rstrip("^").rstrip(" ") for group in value.rstrip(" ").split("=")]
    return "=".join(groups).rstrip("=")


def fold_name(value: str) -> str:
    """Case folding for case-insensitive PN matching; the worklist index stores the same fold."""
    return value.upper()


def element_values(elem: DataElement) -> list[str]:
    """The values of a non-sequence element as text (empty list for a zero-length element)."""
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item.hex())
        else:
            out.append(str(item) if item is not None else "")
    return out


def stored_texts(elem: DataElement, *, fold: bool = False) -> list[str]:
    """Normalized stored values, as the matcher compares them (also used to fill index columns)."""
    return normalized_texts(element_values(elem), elem.VR, fold=fold)


def normalized_texts(values: list[str], vr: str, *, fold: bool = False) -> list[str]:
    """`stored_texts` of an element of this VR whose `element_values` are ``values``."""
    if len(values) == 1:  # most elements: no intermediate lists (13 index columns for each item the worklist writes)
        text = normalize(values[0], vr)
        if fold:
            text = fold_name(text)
        return [text] if text != "" else []
    texts = [normalize(v, vr) for v in values]
    if fold:
        texts = [fold_name(t) for t in texts]
    return [t for t in texts if t != ""]


# --- date and time parsing: integer microseconds, (start, end) of the period a value names ---


def parse_da(text: str) -> str:
    """YYYYMMDD (legacy YYYY.MM.DD accepted); raises ValueError otherwise. DA text sorts chronologically."""
    if len(text) == 10 and text[4] == "." and text[7] == ".":
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"not a DA value: {text!r}")
    try:
        datetime(int(text[:4]), int(text[4:6]), int(text[6:]))  # validates month and day
    except ValueError as exc:
        raise ValueError(f"not a DA value: {text!r}") from exc
    return text


def parse_tm(text: str) -> tuple[int, int]:
    """HH[MM[SS[.F{1,6}]]] (legacy HH:MM:SS accepted) -> (first, last) microsecond of the day it names."""
    match = _TM_RE.fullmatch(text.replace(":", ""))
    if match is None:
        raise ValueError(f"not a TM value: {text!r}")
    hh, mm, ss, frac = match.groups()
    if int(hh) > 23 or (mm and int(mm) > 59) or (ss and int(ss) > 60):
        raise ValueError(f"not a TM value: {text!r}")
    start = (int(hh) * 3600 + int(mm or 0) * 60 + int(ss or 0)) * 1_000_000
    if frac is not None:
        unit = 10 ** (6 - len(frac))
        start += int(frac) * unit
    elif ss is not None:
        unit = 1_000_000
    elif mm is not None:
        unit = 60_000_000
    else:
        unit = 3_600_000_000
    return start, start + unit - 1


def parse_dt(text: str) -> tuple[int, int]:
    """YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX] -> (first, last) microsecond since 0001-01-01, in UTC if offset."""
    match = _DT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a DT value: {text!r}")
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError as exc:
        raise ValueError(f"not a DT value: {text!r}") from exc
    try:
        if month is None:
            end = start.replace(year=start.year + 1)
        elif day is None:
            end = (
                start.replace(year=start.year + 1, month=1)
                if start.month == 12
                else start.replace(month=start.month + 1)
            )
        elif hour is None:
            end = start + timedelta(days=1)
        elif minute is None:
            end = start + timedelta(hours=1)
        elif second is None:
            end = start + timedelta(minutes=1)
        else:
            end = start + timedelta(seconds=1)
        last = (end - _EPOCH) // timedelta(microseconds=1) - 1
    except (ValueError, OverflowError):  # the period ends after 9999-12-31
        last = (datetime.max - _EPOCH) // timedelta(microseconds=1)
    first = (start - _EPOCH) // timedelta(microseconds=1)
    if frac is not None:
        unit = 10 ** (6 - len(frac))
        first += int(frac) * unit
        last = first + unit - 1
    if offset is not None:
        sign = 1 if offset[0] == "+" else -1
        shift = sign * (int(offset[1:3]) * 60 + int(offset[3:5])) * 60_000_000
        first, last = first - shift, last - shift
    return first, last


def _da_us(text: str) -> int:
    return (datetime(int(text[:4]), int(text[4:6]), int(text[6:8])) - _EPOCH) // timedelta(microseconds=1)


def _period(vr: str, text: str) -> tuple[int, int] | tuple[str, str] | None:
    """The (first, last) instant of a stored DA/TM/DT value; None when it is not valid (it then never matches)."""
    try:
        if vr == "DA":
            day = parse_da(text)
            return day, day
        return parse_tm(text) if vr == "TM" else parse_dt(text)
    except ValueError:
        return None


# --- conditions ---


class Condition:
    """A compiled matching rule for one key; `matches` receives the normalized stored values."""

    def matches(self, values: Sequence[str]) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Single(Condition):
    """C.2.2.2.1 Single Value Matching (and C.2.2.2.2 List of UID Matching when several values)."""

    values: frozenset[str]

    def matches(self, values: Sequence[str]) -> bool:
        return any(v in self.values for v in values)


class WildcardPattern:
    """A C.2.2.2.4 wild card pattern (`*` any sequence, also empty; `?` exactly one character; all else literal),
    matched in O(len(pattern) x len(value)) time whatever its shape.

    A backtracking regex (`.*` per `*`) takes exponential time on patterns like `*?*?*?*?*?*?*?*?*?*?Z`: measured
    x5 per `*?` pair, 32 s of CPU for one query over 38 items, with the GIL held all along. A glob needs no
    backtracking: split on `*` into fixed-length segments; the first is anchored at the start, the last at the end,
    and each one in between is taken at its leftmost occurrence after the previous one, which leaves the most room
    for the rest (so if leftmost fails, every placement fails).
    """

    __slots__ = ("_head", "_middle", "_min_length", "_star", "_tail", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        segments = pattern.split("*")
        self._star = len(segments) > 1
        self._head = _Segment(segments[0])
        self._tail = _Segment(segments[-1] if self._star else "")
        self._middle = tuple(_Segment(s) for s in segments[1:-1] if s)
        self._min_length = len(pattern) - pattern.count("*")

    def fullmatch(self, value: str) -> bool:
        """True when the whole of `value` matches the pattern."""
        if not self._star:
            return len(value) == self._head.length and self._head.at(value, 0)
        end = len(value) - self._tail.length  # where the tail must start
        if len(value) < self._min_length or not self._head.at(value, 0) or not self._tail.at(value, end):
            return False
        pos = self._head.length
        for segment in self._middle:
            found = segment.find(value, pos, end)
            if found < 0:
                return False
            pos = found + segment.length
        return True

    def __repr__(self) -> str:
        return f"WildcardPattern({self.pattern!r})"


class _Segment:
    """A run of literal characters and `?` between two `*`: it always matches exactly `length` characters."""

    __slots__ = ("_literal", "_regex", "length")

    def __init__(self, text: str) -> None:
        self.length = len(text)
        # Literal only: string search. Literal and `?`: a regex without quantifier or alternative, which cannot
        # backtrack (each start position costs O(length)). `?` only: any `length` characters (both None).
        self._literal: str | None = text if "?" not in text else None
        self._regex: re.Pattern[str] | None = None
        if self._literal is None and text.strip("?"):
            self._regex = re.compile("".join("." if ch == "?" else re.escape(ch) for ch in text), re.DOTALL)

    def at(self, value: str, pos: int) -> bool:
        """True when the segment matches `value` at `pos`."""
        if self._literal is not None:
            return value.startswith(self._literal, pos)
        if self._regex is not None:
            return self._regex.match(value, pos) is not None
        return pos + self.length <= len(value)

    def find(self, value: str, start: int, end: int) -> int:
        """The leftmost position in [start, end - length] where the segment matches, or -1."""
        if self._literal is not None:
            return value.find(self._literal, start, end)
        if self._regex is not None:
            found = self._regex.search(value, start, end)
            return -1 if found is None else found.start()
        return start if start + self.length <= end else -1


@dataclass(frozen=True)
class Wildcard(Condition):
    """C.2.2.2.4 Wild Card Matching: `*` any sequence (also empty), `?` exactly one character."""

    pattern: str
    compiled: WildcardPattern = field(compare=False)

    def matches(self, values: Sequence[str]) -> bool:
        return any(self.compiled.fullmatch(v) for v in values)


@dataclass(frozen=True)
class Range(Condition):
    """C.2.2.2.5 Range Matching on DA (bounds are YYYYMMDD text), TM or DT (bounds are microseconds).

    A bound of None is open. Single Value Matching on a date or time is the range [value, value].
    """

    vr: str
    low: int | str | None
    high: int | str | None
    is_range: bool  # True when the query used `-`: only then may it combine with its date/time partner

    def matches(self, values: Sequence[str]) -> bool:
        for text in values:
            period = _period(self.vr, text)
            if period is None:
                continue
            # A stored value is a period too (`09` is the whole hour): it matches when the periods overlap.
            if self.low is not None and period[1] < self.low:  # type: ignore[operator]
                continue
            if self.high is not None and period[0] > self.high:  # type: ignore[operator]
                continue
            return True
        return False


@dataclass(frozen=True)
class AnyOf(Condition):
    """Several query values: the key matches when one of them does."""

    conditions: tuple[Condition, ...]

    def matches(self, values: Sequence[str]) -> bool:
        return any(c.matches(values) for c in self.conditions)


@dataclass(frozen=True)
class DateTimeRange:
    """C.2.2.2.5 combined date-time range: `<d1>-<d2>` with `<t1>-<t2>` means from d1 t1 to d2 t2."""

    date_tag: int
    time_tag: int
    low: int | None
    high: int | None

    def matches(self, item: Dataset) -> bool:
        date_elem, time_elem = item.get(self.date_tag), item.get(self.time_tag)
        if date_elem is None or time_elem is None:
            return False
        for date_text in stored_texts(date_elem):
            for time_text in stored_texts(time_elem):
                try:
                    day = _da_us(parse_da(date_text))
                    first, last = parse_tm(time_text)
                except ValueError:
                    continue
                if (self.low is None or day + last >= self.low) and (self.high is None or day + first <= self.high):
                    return True
        return False


def _parse_bounds(vr: str, text: str, tag: int) -> Range:
    """A DA/TM/DT query value: a single value (the period it names) or a range `a-b`, `-b`, `a-`."""

    def one(bound: str, end: bool) -> int | str | None:
        bound = bound.strip(" ")
        if bound == "":
            return None
        try:
            if vr == "DA":
                return parse_da(bound)
            period = parse_tm(bound) if vr == "TM" else parse_dt(bound)
        except ValueError as exc:
            raise QueryError(f"{Tag(tag)}: {exc}", tag) from exc
        return period[1] if end else period[0]

    text = text.strip(" ")
    if "-" not in text or (vr == "DT" and _DT_RE.fullmatch(text)):
        # A DT single value may hold a "-ZZXX" offset: it is a range only if it is not a valid DT.
        return Range(vr, one(text, False), one(text, True), False)
    if vr == "DT":
        match = _DT_RANGE_RE.fullmatch(text)
        if match is None:
            raise QueryError(f"{Tag(tag)}: not a DT range: {text!r}", tag)
        low_text, high_text = match.group(1) or "", match.group(2) or ""
    else:
        low_text, _, high_text = text.partition("-")
    if low_text == "" and high_text == "":
        raise QueryError(f"{Tag(tag)}: empty range {text!r}", tag)
    low, high = one(low_text, False), one(high_text, True)
    # A TM range ending before it starts is valid as part of a combined date-time range (overnight);
    # compile_query rejects it otherwise.
    if vr != "TM" and low is not None and high is not None and low > high:  # type: ignore[operator]
        raise QueryError(f"{Tag(tag)}: range {text!r} ends before it starts", tag)
    return Range(vr, low, high, True)


def _value_condition(vr: str, text: str, tag: int, fold: bool) -> Condition | None:
    """The condition of one query value; None for universal."""
    if vr in ("DA", "TM", "DT"):
        return _parse_bounds(vr, text, tag)
    if vr in WILDCARD_VRS and ("*" in text or "?" in text):
        pattern = text.rstrip(" ") if vr not in _STRIP_BOTH else text.strip(" ")
        if fold and vr == "PN":
            pattern = fold_name(pattern)
        if pattern.strip("*") == "":
            return None  # C.2.2.2.4 note 1: "*" is Universal Matching
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise QueryError(f"{Tag(tag)}: wild card pattern longer than {MAX_PATTERN_LENGTH} characters", tag)
        return Wildcard(pattern, WildcardPattern(pattern))
    value = normalize(text, vr)
    if fold and vr == "PN":
        value = fold_name(value)
    return Single(frozenset({value}))


def key_condition(elem: DataElement, *, fold_names: bool = False) -> Condition | None:
    """The condition for a non-sequence query key; None means Universal Matching (C.2.2.2.3)."""
    if elem.VR not in _TEXT_VRS:
        # Numbers and binary values: Single Value Matching on their text form (rare in worklist queries).
        values = element_values(elem)
        return Single(frozenset(values)) if values else None
    texts = element_values(elem)
    if len(texts) > MAX_KEY_VALUES:
        raise QueryError(f"{Tag(elem.tag)}: more than {MAX_KEY_VALUES} values in one matching key", elem.tag)
    if not texts or all(t.strip(" \0") in ("", "*") for t in texts):
        # C.2.2.2.3 Universal Matching: zero-length value; a lone "*" is treated alike for every VR.
        return None
    fold = fold_names and elem.VR == "PN"
    conditions = [_value_condition(elem.VR, t, elem.tag, fold) for t in texts if t.strip(" \0") != ""]
    if any(c is None for c in conditions):
        return None
    parsed = [c for c in conditions if c is not None]
    singles = [c for c in parsed if isinstance(c, Single)]
    others = [c for c in parsed if not isinstance(c, Single)]
    if singles:
        others.insert(0, Single(frozenset().union(*(s.values for s in singles))))
    return others[0] if len(others) == 1 else AnyOf(tuple(others))


@dataclass(frozen=True)
class ReturnKey:
    """One requested attribute of the response, prepared once per query."""

    tag: BaseTag
    vr: str
    whole: bool = False  # a sequence asked without item keys: the entire stored sequence
    item: CompiledQuery | None = None  # a sequence with item keys: match and restrict each stored item


@dataclass
class CompiledQuery:
    """A query identifier ready to be applied to many items."""

    conditions: dict[int, Condition]
    sequences: dict[int, CompiledQuery]
    date_times: list[DateTimeRange]
    returns: tuple[ReturnKey, ...]
    fold_names: bool

    def matches(self, item: Dataset) -> bool:
        """True when the item satisfies every non-universal key (C.2.2.2)."""
        for tag, condition in self.conditions.items():
            elem = item.get(tag)
            if elem is None or elem.VR == "SQ":
                # Absent or empty stored attribute: only Universal Matching succeeds (C.2.2.2.3).
                return False
            if not condition.matches(stored_texts(elem, fold=self.fold_names and elem.VR == "PN")):
                return False
        for date_time in self.date_times:
            if not date_time.matches(item):
                return False
        for tag, sub in self.sequences.items():
            elem = item.get(tag)
            # C.2.2.2.6: the same stored item must satisfy all the keys of the query item.
            if elem is None or elem.VR != "SQ" or not any(sub.matches(i) for i in elem.value):
                return False
        return True

    def response(self, item: Dataset) -> Dataset:
        """The C-FIND response identifier: exactly the requested keys, plus the item's Specific Character Set."""
        out: dict[BaseTag, DataElement] = {}
        charset = item.get(SPECIFIC_CHARACTER_SET)
        if charset is not None and charset.value:
            # C.2.2.2: (0008,0005) is never matched but says how the returned values are encoded.
            out[charset.tag] = _copy_element(charset)
        self._fill(out, item)
        return Dataset(out)

    def _fill(self, out: dict[BaseTag, DataElement], item: Dataset) -> None:
        for key in self.returns:
            stored = item.get(key.tag)
            if key.vr == "SQ":
                out[key.tag] = DataElement(key.tag, "SQ", _sequence_response(key, stored))
            elif stored is None:
                # Requested but unknown: returned zero-length (C.2.2.1.2 return keys, Type 2 behaviour).
                out[key.tag] = DataElement(key.tag, key.vr, empty_value_for_VR(key.vr), validation_mode=config.IGNORE)
            else:
                out[key.tag] = _copy_element(stored)


def _sequence_response(key: ReturnKey, stored: DataElement | None) -> DicomSequence:
    if stored is None or stored.VR != "SQ" or not stored.value:
        return DicomSequence()
    if key.whole or key.item is None:
        # C.2.2.2.6: a sequence key without item keys asks for the entire sequence.
        return DicomSequence([_copy_dataset(i) for i in stored.value])
    out = DicomSequence()
    for stored_item in stored.value:
        # "A sequence of matching Items containing only the requested Attributes is returned" (C.2.2.2.6).
        if key.item.matches(stored_item):
            part: dict[BaseTag, DataElement] = {}
            key.item._fill(part, stored_item)
            out.append(Dataset(part))
    return out


def compile_query(query: Dataset, *, case_insensitive_names: bool = False) -> CompiledQuery:
    """Parse a C-FIND identifier; raises QueryError when a key cannot be matched."""
    conditions: dict[int, Condition] = {}
    sequences: dict[int, CompiledQuery] = {}
    returns: list[ReturnKey] = []
    for tag in sorted(query.keys()):  # tags, not elements: iterating a Dataset would decode every value here
        if tag.element == 0 or tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL):
            continue  # C.2.2.2: Specific Character Set is never matched nor echoed; group lengths are not keys
        elem = _decoded(query, tag)
        if elem.VR == "SQ":
            items = list(elem.value or [])
            if len(items) > 1:
                raise QueryError(f"{tag}: a sequence key must hold a single item (C.2.2.2.6)", tag)
            keys = set(items[0].keys()) - {SPECIFIC_CHARACTER_SET} if items else set()
            if not keys:
                returns.append(ReturnKey(tag, "SQ", whole=True))
                continue
            sub = compile_query(items[0], case_insensitive_names=case_insensitive_names)
            returns.append(ReturnKey(tag, "SQ", item=sub))
            if sub.conditions or sub.sequences or sub.date_times:
                sequences[tag] = sub
            continue
        returns.append(ReturnKey(tag, elem.VR))
        if tag.is_private or tag == TIMEZONE_OFFSET_FROM_UTC:
            continue  # returned when present but never matched
        condition = key_condition(elem, fold_names=case_insensitive_names)
        if condition is not None:
            conditions[tag] = condition
    date_times = _combine_date_times(conditions)
    for tag, condition in conditions.items():
        if isinstance(condition, Range) and condition.vr == "TM" and _inverted(condition):
            # C.2.2.2.5: "Range Matching crossing midnight is not supported" for a time alone.
            raise QueryError(f"{Tag(tag)}: time range ends before it starts (crossing midnight)", tag)
    return CompiledQuery(conditions, sequences, date_times, tuple(returns), case_insensitive_names)


def _decoded(query: Dataset, tag: BaseTag) -> DataElement:
    """An element of a received identifier, its value decoded now (a sequence's items are parsed, their elements
    stay raw until compile_query reads them, through here too): a value pydicom cannot decode (a length that does
    not fit its VR, a malformed item...) is a QueryError naming it, not an error of ours."""
    raw = query.get_item(tag)
    value = getattr(raw, "value", None)
    vr = getattr(raw, "VR", None)
    if vr is None:  # implicit VR: the dictionary's
        with suppress(KeyError):
            vr = dictionary_VR(tag)
    if isinstance(value, bytes) and vr != "SQ":
        # Checked on the raw bytes, before pydicom decodes (and validates, and logs about) each value: 55,000
        # wild card values in one key cost 10 s of CPU before the query's time budget could apply.
        if len(value) > MAX_KEY_BYTES:
            raise QueryError(f"{Tag(tag)}: a matching key longer than {MAX_KEY_BYTES} bytes", tag)
        if value.count(b"\\") >= MAX_KEY_VALUES:
            raise QueryError(f"{Tag(tag)}: more than {MAX_KEY_VALUES} values in one matching key", tag)
    try:
        return query[tag]
    except Exception as exc:
        raise QueryError(f"{Tag(tag)}: value cannot be decoded ({type(exc).__name__})", tag) from exc


def _inverted(condition: Range) -> bool:
    return condition.low is not None and condition.high is not None and condition.low > condition.high  # type: ignore[operator]


def _combine_date_times(conditions: dict[int, Condition]) -> list[DateTimeRange]:
    combined: list[DateTimeRange] = []
    for date_tag, time_tag in DATE_TIME_PAIRS.items():
        date, time = conditions.get(date_tag), conditions.get(time_tag)
        if not (isinstance(date, Range) and isinstance(time, Range) and date.is_range and time.is_range):
            continue
        low = None if date.low is None else _da_us(str(date.low)) + int(time.low or 0)
        high = None
        if date.high is not None:
            high = _da_us(str(date.high)) + (int(time.high) if time.high is not None else _DAY_US - 1)
        # The date range stays as a condition (every combined match has its date in it, and the worklist
        # index uses it); the time range alone no longer applies.
        del conditions[time_tag]
        combined.append(DateTimeRange(BaseTag(date_tag), BaseTag(time_tag), low, high))
    return combined


def matches(query: Dataset, item: Dataset, *, case_insensitive_names: bool = False) -> bool:
    """True when `item` matches the C-FIND identifier `query`."""
    return compile_query(query, case_insensitive_names=case_insensitive_names).matches(item)


def build_response(query: Dataset, item: Dataset, *, case_insensitive_names: bool = False) -> Dataset:
    """The response identifier for a matching item: the requested keys only (absent ones zero-length)."""
    return compile_query(query, case_insensitive_names=case_insensitive_names).response(item)


def _copy_element(elem: DataElement) -> DataElement:
    """A new element sharing immutable values, so a caller may edit the response without touching the item."""
    if elem.VR == "SQ":
        return DataElement(elem.tag, "SQ", DicomSequence([_copy_dataset(i) for i in elem.value]))
    value = elem.value
    if isinstance(value, MultiValue):
        return DataElement(elem.tag, elem.VR, list(value), validation_mode=config.IGNORE)
    return DataElement(elem.tag, elem.VR, value, already_converted=True, validation_mode=config.IGNORE)


def _copy_dataset(ds: Dataset) -> Dataset:
    return Dataset({elem.tag: _copy_element(elem) for elem in ds})
