"""Canonical ImagingOrder → DICOM Modality Worklist items, driven by ``mappings/mwl.yaml``.

An attribute is written as ``Keyword: source``, where the source is a canonical path (``order.patient.name``,
``step.start | date``), a literal (``=ISO``), or for a sequence a list of item mappings (an item with ``if: path``
is left out when that path is empty). Values are rendered for the attribute's VR (PN from a name, DA/TM from a
date-time) and cut to the VR's maximum length. Every keyword is checked against the DICOM dictionary at load,
and against where PS3.4 Table K.6-1 puts it (in the Scheduled Procedure Step item or at the top level).

Rendering produces an element tree (``(tag, VR, value)``, tags and VRs resolved at load), not a pydicom Dataset:
`encoded_items`, the worklist consumer's path, encodes the tree with `traboule.formats.dicom_encoding` and reads the
store's index columns from it, which costs a fraction of building and writing a Dataset (pydicom assigns and
validates each attribute). `item` builds the Dataset from the same tree; both give the same bytes, and an item
the fast encoder cannot write exactly goes through pydicom.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import structlog
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from traboule import model
from traboule.errors import EncodingError, MappingError
from traboule.formats.dicom_encoding import UNSPLIT_VRS, Element, encode, to_dataset
from traboule.formats.worklist_item import EncodedItem, dataset_columns, encode_item, item_columns
from traboule.translate.mapping import (
    MAPPINGS_DIR,
    Node,
    compile_filters,
    line_of,
    load_tables,
    load_yaml,
    shape,
)

_log = structlog.get_logger("traboule.translate.dicom_mapping")

# PS3.5 Table 6.2-1 maximum lengths (characters) for the string VRs we write.
MAX_LENGTH = {
    "AE": 16,
    "CS": 16,
    "SH": 16,
    "LO": 64,
    "PN": 64,  # per component group; we write the alphabetic group only
    "UI": 64,
    "DA": 8,
    "TM": 16,
    "DT": 26,
    "AS": 4,
    "DS": 16,
    "IS": 12,
    "LT": 10240,
    "ST": 1024,
}

ROOTS = ("order", "step")
NUMBER_VRS = {"DS", "IS"}
_DS = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_IS = re.compile(r"^[+-]?\d{1,11}$")


def _number(text: str, vr: str) -> str:
    """A DS/IS value as DICOM wants it, or empty: senders write ``72,5`` or ``72 kg`` (the item must still be
    served; a value a modality cannot parse would make the whole item unusable)."""
    value = text.strip().replace(",", ".")
    if vr == "DS":
        return value if _DS.match(value) and len(value) <= 16 else ""
    return value if _IS.match(value) else ""


# Where an attribute goes in a worklist item: PS3.4 Table K.6-1 (Modality Worklist Information Model return
# keys) puts the Scheduled Procedure Step module's attributes (PS3.3 C.4.10) in the items of the Scheduled
# Procedure Step Sequence and every other module's at the top level. An SPS item holds these and nothing else; a
# top-level attribute may be any other (the table's patient, visit, request and procedure keys, or a site's own).
SPS_SEQUENCE = "ScheduledProcedureStepSequence"
SPS_ITEM = frozenset(
    {
        "ScheduledStationAETitle",  # (0040,0001)
        "ScheduledProcedureStepStartDate",  # (0040,0002)
        "ScheduledProcedureStepStartTime",  # (0040,0003)
        "ScheduledProcedureStepEndDate",  # (0040,0004)
        "ScheduledProcedureStepEndTime",  # (0040,0005)
        "ScheduledPerformingPhysicianName",  # (0040,0006)
        "ScheduledProcedureStepDescription",  # (0040,0007)
        "ScheduledProtocolCodeSequence",  # (0040,0008)
        "ScheduledProcedureStepID",  # (0040,0009)
        "ScheduledPerformingPhysicianIdentificationSequence",  # (0040,000B)
        "ScheduledStationName",  # (0040,0010)
        "ScheduledProcedureStepLocation",  # (0040,0011)
        "PreMedication",  # (0040,0012)
        "ScheduledProcedureStepStatus",  # (0040,0020)
        "CommentsOnTheScheduledProcedureStep",  # (0040,0400)
        "ScheduledProcedureStepModificationDateTime",  # (0040,4010)
        "Modality",  # (0008,0060)
        "RequestedContrastAgent",  # (0032,1070)
        "AnatomicalOrientationType",  # (0010,2210)
        "ReferencedDefinedProtocolSequence",  # (0018,990C)
    }
)


def _suggest(word: str, *candidate_sets: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` with the closest candidate of the first set that has one, or nothing."""
    for candidates in candidate_sets:
        close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
        if close:
            return f" (did you mean {close[0]!r}?)"
    return ""


NUMERIC_VRS = {"US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"}
LATIN1 = "ISO_IR 100"
UTF8 = "ISO_IR 192"

Source = Callable[[model.ImagingOrder, model.ScheduledStep], Any]


@dataclass
class AttrRule:
    keyword: str
    vr: str
    line: int
    tag: int = 0
    path: list[str] = field(default_factory=list)
    literal: str | None = None
    filters: list = field(default_factory=list)
    items: list[ItemRule] = field(default_factory=list)  # for SQ
    source: Source | None = None  # reads `path`


@dataclass
class ItemRule:
    condition: list[str] | None
    attrs: list[AttrRule]
    source: Source | None = None  # reads `condition`


class MWLMapping:
    """Compiled ``mwl.yaml``: builds one worklist item dataset per scheduled step of an order."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else MAPPINGS_DIR / "mwl.yaml"
        doc = load_yaml(self.path)
        if not isinstance(doc, Node) or not isinstance(doc.get("attributes"), Node):
            line = line_of(doc, "attributes") if isinstance(doc, Node) else 1
            raise MappingError(self.path, line or 1, "expected 'attributes:' mapping keywords")
        known = {"kind", "version", "description", "tables", "attributes", "charset"}
        for key in doc:
            if key not in known:
                raise MappingError(self.path, line_of(doc, key), f"unknown section {key!r} (expected {sorted(known)})")
            if key in ("kind", "version", "description", "charset") and not isinstance(doc[key], str):
                raise MappingError(self.path, line_of(doc, key), f"{key}: expected text, not {shape(doc[key])}")
        self.tables = load_tables(doc.get("tables"), self.path.parent, self.path, line_of(doc, "tables"))
        self.attrs = self._attrs(doc["attributes"], "")

    def _attrs(self, node: Node, within: str) -> list[AttrRule]:
        """The rules of one level: ``within`` is the sequence whose item this is ("" for the top level)."""
        return [self._attr(kw, spec, line_of(node, kw), within) for kw, spec in node.items() if kw != "if"]

    def _attr(self, keyword: str, spec: Any, line: int, within: str = "") -> AttrRule:
        tag = tag_for_keyword(keyword)
        if tag is None:
            hint = (
                _suggest(keyword, SPS_ITEM, keyword_dict) if within == SPS_SEQUENCE else _suggest(keyword, keyword_dict)
            )
            raise MappingError(self.path, line, f"{keyword!r} is not a DICOM keyword{hint}")
        if within == SPS_SEQUENCE and keyword not in SPS_ITEM:
            raise MappingError(
                self.path,
                line,
                f"{keyword} is not a Scheduled Procedure Step attribute: it does not go in a {SPS_SEQUENCE} item"
                f"{_suggest(keyword, SPS_ITEM)} (PS3.4 Table K.6-1)",
            )
        if not within and keyword in SPS_ITEM:
            raise MappingError(
                self.path,
                line,
                f"{keyword} is a Scheduled Procedure Step attribute: put it in the {SPS_SEQUENCE} item "
                "(PS3.4 Table K.6-1)",
            )
        vr = dictionary_VR(tag)
        rule = AttrRule(keyword, vr, line, tag)
        if vr == "SQ":
            if not isinstance(spec, list):
                raise MappingError(self.path, line, f"{keyword} is a sequence: give a list of items")
            for item in spec:
                if not isinstance(item, Node):
                    raise MappingError(self.path, line, f"{keyword}: each item must map keywords to sources")
                cond = self._path(item["if"], line_of(item, "if")) if "if" in item else None
                rule.items.append(ItemRule(cond, self._attrs(item, keyword), _source(cond) if cond else None))
            return rule
        if not isinstance(spec, str):
            raise MappingError(
                self.path, line, f"{keyword}: expected a canonical path or '=literal', not {shape(spec)}"
            )
        if spec.startswith("="):
            rule.literal = spec[1:]
            return rule
        path_text, *filters = (p.strip() for p in spec.split("|"))
        rule.path = self._path(path_text, line)
        rule.source = _source(rule.path)
        rule.filters = compile_filters(filters, self.tables, self.path, line)
        return rule

    def _path(self, text: Any, line: int) -> list[str]:
        if not isinstance(text, str):
            raise MappingError(self.path, line, f"expected a canonical path (order.* or step.*), not {shape(text)}")
        parts = text.strip().split(".")
        if parts[0] not in ROOTS:
            raise MappingError(self.path, line, f"{text!r}: a source starts with one of {ROOTS} (or '=' literal)")
        probe: Any = model.ImagingOrder(patient=model.Patient(ids=[model.Identifier("x", type="INS")]))
        probe = {"order": probe, "step": model.ScheduledStep()}[parts[0]]
        for i, part in enumerate(parts[1:], start=1):
            if not hasattr(probe, part):
                raise MappingError(self.path, line, f"{'.'.join(parts[:i])} has no attribute {part!r}")
            probe = getattr(probe, part)
        return parts

    def patient_keywords(self) -> list[str]:
        """Top-level attributes fed from ``order.patient`` (what a patient update or merge rewrites)."""

        def from_patient(rule: AttrRule) -> bool:
            if rule.items:
                return any(from_patient(a) for item in rule.items for a in item.attrs) or any(
                    (item.condition or [])[:2] == ["order", "patient"] for item in rule.items
                )
            return rule.path[:2] == ["order", "patient"]

        return [rule.keyword for rule in self.attrs if from_patient(rule)]

    # -- apply -----------------------------------------------------------------------------------------------

    def items(self, order: model.ImagingOrder) -> list[tuple[model.ScheduledStep, Dataset]]:
        steps = order.steps or [model.ScheduledStep()]
        return [(step, self.item(order, step)) for step in steps]

    def item(self, order: model.ImagingOrder, step: model.ScheduledStep) -> Dataset:
        return _dataset(self._tree(self.attrs, order, step, []))

    def encoded_items(self, order: model.ImagingOrder) -> list[tuple[model.ScheduledStep, EncodedItem]]:
        """`items`, encoded for the worklist store (bytes and index columns); the Dataset is built on demand."""
        steps = order.steps or [model.ScheduledStep()]
        return [(step, self.encoded_item(order, step)) for step in steps]

    def encoded_item(self, order: model.ImagingOrder, step: model.ScheduledStep) -> EncodedItem:
        texts: list[str] = []
        tree = self._tree(self.attrs, order, step, texts)
        try:
            charset = _charset_of(texts)
            return EncodedItem(encode(tree, charset), item_columns(tree), lambda: _dataset(tree))
        except EncodingError:
            # A value our encoder does not write exactly as pydicom: let pydicom do all of it.
            ds = _dataset(tree)
            return EncodedItem(encode_item(ds), dataset_columns(ds), lambda: ds)

    def _tree(
        self, attrs: list[AttrRule], order: model.ImagingOrder, step: model.ScheduledStep, texts: list[str]
    ) -> list[Element]:
        """The attributes as an element tree. `texts` receives the values `character_set` looks at."""
        out: list[Element] = []
        for rule in attrs:
            vr = rule.vr
            if vr == "SQ":
                items = []
                for item_rule in rule.items:
                    if item_rule.source is not None and not _text(item_rule.source(order, step)):
                        continue
                    items.append(self._tree(item_rule.attrs, order, step, texts))
                if not items and rule.items:
                    # Every item was conditional and none applies: leave the sequence out. A present but empty
                    # code sequence makes dcmtk wlmscpfs skip the whole item; an absent one is fine (the
                    # description stands in for it), and C-FIND answers an absent key with an empty value.
                    continue
                out.append((rule.tag, vr, items))
                continue
            if rule.literal is not None:
                value: Any = rule.literal
            else:
                assert rule.source is not None
                value = rule.source(order, step)
            if rule.filters:  # filters say how to render (``step.start | time``): apply them to the raw text
                text = _render(value, "")
                for f in rule.filters:
                    if text:
                        text = f(text)
            elif value.__class__ is str and vr != "DA" and vr != "TM":
                text = value
            else:
                text = _render(value, vr)
            if vr in NUMBER_VRS:
                text = _number(text, vr)
            if not text:
                out.append((rule.tag, vr, None if vr in NUMERIC_VRS else text))
                continue
            limit = MAX_LENGTH.get(vr)
            if limit and len(text) > limit:
                # The inbound mapping's `max` normally refuses or cuts before the ACK; this is the last guard.
                _log.warning("mwl.value_cut", keyword=rule.keyword, vr=vr, length=len(text), limit=limit)
                text = text[:limit]
            out.append((rule.tag, vr, text))
            # `character_set` reads str values: pydicom holds DS/IS as numbers, and splits a value with a
            # backslash into several (a list, not read), except for PN (read as a whole) and the unsplit VRs.
            if vr != "DS" and vr != "IS" and ("\\" not in text or vr == "PN" or vr in UNSPLIT_VRS):
                texts.append(text)
        return out


def _dataset(tree: list[Element]) -> Dataset:
    ds = to_dataset(tree)
    ds.SpecificCharacterSet = character_set(ds)
    return ds


def _source(path: list[str]) -> Source:
    """Reads a canonical path on (order, step); "" when a part on the way is None or missing."""
    root = 0 if path[0] == "order" else 1
    if len(path) == 1:
        return (lambda order, step: order) if root == 0 else (lambda order, step: step)
    get = attrgetter(".".join(path[1:]))

    def source(order: model.ImagingOrder, step: model.ScheduledStep) -> Any:
        try:
            value = get(step if root else order)
        except AttributeError:
            return ""
        return "" if value is None else value

    return source


def _text(value: Any) -> str:
    if isinstance(value, model.PersonName):
        return "" if value.is_empty() else value.family
    if isinstance(value, model.Identifier):
        return value.value
    return "" if value is None else str(value)


def _render(value: Any, vr: str) -> str:
    if isinstance(value, model.PersonName):
        parts = [value.family, value.given, value.middle, value.prefix, value.suffix]
        return "^".join(parts).rstrip("^")
    if isinstance(value, model.Identifier):
        value = value.value
    text = "" if value is None else str(value)
    if vr == "DA":
        return text[:8] if text[:8].isdigit() and len(text) >= 8 else ""
    if vr == "TM":
        t = text[8:] if len(text) > 8 else ""
        return t[:6] if t[:4].isdigit() else ""
    return text


def character_set(ds: Dataset) -> str:
    """The Specific Character Set for the text values of `ds` (see `_charset_of`)."""
    return _charset_of(_strings(ds))


def _charset_of(texts: Iterable[str]) -> str:
    """ISO_IR 100 when Latin-1 holds every text, else ISO_IR 192 (UTF-8); plain ASCII gets ISO_IR 100 too, as
    modalities that predate UTF-8 handle it everywhere."""
    for text in texts:
        if text.isascii():
            continue
        try:
            text.encode("latin-1")
        except UnicodeEncodeError:
            return UTF8
    return LATIN1


def _strings(ds: Dataset):
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _strings(item)
        elif isinstance(elem.value, str):
            yield elem.value
        elif elem.VR == "PN" and elem.value is not None:
            yield str(elem.value)


__all__ = ["MWLMapping", "character_set", "keyword_for_tag"]
