"""HL7 v2 → canonical model, driven by a mapping file (``mappings/hl7_inbound.yaml``).

Field paths (the only place HL7 positions appear besides the tokenizer):

* ``OBR-18`` — field 18 of the first OBR in scope (first repetition, first component/subcomponent)
* ``PID-5.2`` / ``PID-3.4.2`` — component / subcomponent
* ``PID-3[2].1`` — second repetition; ``PID-3(5=INS).1`` — the repetition whose component 5 is ``INS``
* ``OBX(3.1=29463-7)-5`` — the first OBX whose field 3.1 is ``29463-7``
* ``.4.2`` — relative to the repetition being iterated by an ``each:`` block

A source may end with filters: ``OBR-4.1 | procedure_modality | upper``. A field lists sources, first non-empty
wins. Scope: inside an order group (ORC and the segments up to the next ORC) group segments are seen first, then
the message-level ones (MSH, PID, PV1...).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import linecache
import re
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

from traboule import model
from traboule.errors import CDAError, HL7Error, MappingError, MappingFailure
from traboule.formats.hl7 import Message, Segment, Separators, unescape
from traboule.translate.mapping import (
    MAPPINGS_DIR,
    CodeTable,
    Node,
    compile_filters,
    line_of,
    load_tables,
    load_yaml,
    shape,
)

Scope = dict[str, list[Segment]]
Getter = Callable[[Scope, Separators, str], str]  # (scope, separators, current repetition) -> value

_PATH = re.compile(
    r"""^(?P<seg>[A-Z][A-Z0-9]{2})
        (?:\((?P<sf>\d+)(?:\.(?P<sc>\d+))?=(?P<sv>[^)]*)\)|\[(?P<si>\d+)\])?
        -(?P<field>\d+)
        (?:\[(?P<rep>\d+)\]|\((?P<rc>\d+)=(?P<rv>[^)]*)\))?
        (?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?$""",
    re.X,
)
_RELATIVE = re.compile(r"^\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?$")

EVENT_KINDS = ("order", "patient-update", "patient-merge", "report")

CHECKS = {
    "uid": model.is_uid,  # PS3.5 9.1
}


def _pick(value: str, sep: str, index: int) -> str:
    if sep not in value:
        return value if index == 1 else ""
    parts = value.split(sep)
    return parts[index - 1] if index <= len(parts) else ""


def _leaf(rep: str, comp: int, sub: int, seps: Separators) -> str:
    if not rep:
        return rep
    c = _pick(rep, seps.component, comp or 1)
    return unescape(_pick(c, seps.subcomponent, sub or 1), seps) if c else c


# The HL7 versions hl7apy defines, v2.5 (the version of the messages traboule reads) first.
HL7_VERSIONS = ("2_5", "2_5_1", "2_3_1", "2_4", "2_6", "2_7", "2_8", "2_8_1", "2_8_2", "2_3", "2_2", "2_1")


@functools.cache
def _segments(version: str) -> frozenset[str]:
    module = importlib.import_module(f"hl7apy.v{version}.segments")
    return frozenset(name for name in module.SEGMENTS if len(name) == 3)


def _common_start(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_segment(name: str, file: Path, line: int) -> None:
    """A segment a mapping reads must exist: one of HL7 v2.5 (or of another version hl7apy defines), or a site's
    own Z-segment. ``PVI-3`` would read nothing forever; it is refused at load with the closest names."""
    if name.startswith("Z") or any(name in _segments(v) for v in HL7_VERSIONS):
        return
    known = sorted(set().union(*(_segments(v) for v in HL7_VERSIONS)))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    # Closest first; among equals, the longest common beginning (PVI: PV1 before PID), then name order.
    close.sort(key=lambda c: (-difflib.SequenceMatcher(None, name, c).ratio(), -_common_start(name, c), c))
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise MappingError(file, line, f"{name} is not an HL7 v2 segment{hint}; a site's own segments start with Z")


def compile_path(text: str, file: Path, line: int) -> tuple[Getter, str]:
    """Compile one path into a getter; returns it with the location (``SEG-n``) used in error reports."""
    rel = _RELATIVE.match(text)
    if rel:
        comp, sub = int(rel["comp"]), int(rel["sub"] or 0)

        def relative(scope: Scope, seps: Separators, current: str) -> str:
            return _leaf(current, comp, sub, seps)

        return relative, text  # `_each` puts the repeated field's path in front
    m = _PATH.match(text)
    if not m:
        raise MappingError(file, line, f"{text!r} is not an HL7 field path (e.g. OBR-18, PID-3(5=INS).1, IPC-1.1)")
    seg, fld = m["seg"], int(m["field"])
    check_segment(seg, file, line)
    comp, sub = int(m["comp"] or 0), int(m["sub"] or 0)
    seg_index = int(m["si"] or 1) - 1
    seg_filter = (int(m["sf"]), int(m["sc"] or 0), m["sv"]) if m["sf"] else None
    rep_index = int(m["rep"] or 1) - 1
    rep_filter = (int(m["rc"]), m["rv"]) if m["rc"] else None

    if not seg_filter and not rep_filter and not (seg == "MSH" and fld <= 2):
        # The common case, kept lean: it runs some 70 times per message on the ingest path.
        def plain(scope: Scope, seps: Separators, current: str) -> str:
            segments = scope.get(seg)
            if not segments or seg_index >= len(segments):
                return ""
            fields = segments[seg_index].fields
            raw = fields[fld] if fld < len(fields) else ""
            if not raw:
                return ""
            rep = raw if rep_index == 0 and seps.repetition not in raw else _pick(raw, seps.repetition, rep_index + 1)
            return _leaf(rep, comp, sub, seps)

        return plain, f"{seg}-{fld}" + (f".{comp}" if comp else "")

    def getter(scope: Scope, seps: Separators, current: str) -> str:
        segments = scope.get(seg)
        if not segments:
            return ""
        if seg_filter:
            f, c, v = seg_filter
            found = next((s for s in segments if _leaf(s.field(f), c, 0, seps) == v), None)
        else:
            found = segments[seg_index] if seg_index < len(segments) else None
        if found is None:
            return ""
        raw = found.field(fld)
        if seg == "MSH" and fld <= 2:
            return raw
        if rep_filter:
            rc, rv = rep_filter
            rep = next((r for r in raw.split(seps.repetition) if _leaf(r, rc, 0, seps) == rv), "")
        else:
            rep = _pick(raw, seps.repetition, rep_index + 1)
        return _leaf(rep, comp, sub, seps)

    return getter, f"{seg}-{fld}" + (f".{comp}" if comp else "")


class PathSpec(NamedTuple):
    """A field path taken apart, for the compiled form (``seg`` empty: relative to the iterated repetition)."""

    seg: str
    seg_index: int  # 0-based
    seg_filter: tuple[int, int, str] | None  # OBX(3.1=X): field, component (1-based), value
    field: int
    rep_index: int  # 0-based
    rep_filter: tuple[int, str] | None  # (5=INS): component (1-based), value
    comp: int  # 1-based
    sub: int  # 1-based
    inline: bool  # False: read through the getter (MSH-1/MSH-2, index 0)


def path_spec(text: str) -> PathSpec:
    """``text`` taken apart (a path ``compile_path`` accepted)."""
    rel = _RELATIVE.match(text)
    if rel:
        return PathSpec("", 0, None, 0, 0, None, int(rel["comp"]) or 1, int(rel["sub"] or 0) or 1, True)
    m = _PATH.match(text)
    assert m is not None
    seg, fld = m["seg"], int(m["field"])
    seg_index, rep_index = int(m["si"] or 1) - 1, int(m["rep"] or 1) - 1
    seg_filter = (int(m["sf"]), int(m["sc"] or 0) or 1, m["sv"]) if m["sf"] else None
    rep_filter = (int(m["rc"]) or 1, m["rv"]) if m["rc"] else None
    # Index 0 ("PID-3[0]") reads the last one through the getter's negative index: left to the getter.
    inline = not ((seg == "MSH" and fld <= 2) or seg_index < 0 or rep_index < 0)
    comp, sub = int(m["comp"] or 0) or 1, int(m["sub"] or 0) or 1
    return PathSpec(seg, seg_index, seg_filter, fld, rep_index, rep_filter, comp, sub, inline)


@dataclass
class Source:
    getter: Getter
    location: str
    filters: list[Callable[[str], str]]
    spec: PathSpec | None = None

    def read(self, scope: Scope, seps: Separators, current: str) -> str:
        value = self.getter(scope, seps, current)
        if not value:
            return value
        value = value.strip()
        for f in self.filters:
            if not value:
                break
            value = f(value)
        return value


@dataclass
class FieldRule:
    """One target attribute: sources (first non-empty wins) or a composite-key table lookup."""

    target: list[str]
    sources: list[Source]
    required: bool
    default: str
    line: int
    keys: list[Source] | None = None
    table: CodeTable | None = None
    column: str = ""
    check: str = ""  # a CHECKS name: a value that fails it is refused (AE) rather than passed on
    max_length: int = 0  # characters; 0: no limit
    too_long: str = "refuse"  # TOO_LONG: what a longer value gets

    def value(self, scope: Scope, seps: Separators, current: str = "", notes: list[str] | None = None) -> str:
        if self.keys is not None and self.table is not None:
            key = tuple(k.read(scope, seps, current) for k in self.keys)
            found = self.table.lookup(key, self.column)
            value = found or ""
            if found is None and any(key) and self.required:
                where = "/".join(k.location for k in self.keys)
                raise MappingFailure(
                    f"{where} value {'/'.join(key)!r} is not in table {self.table.name}",
                    self.keys[0].location,
                    code="103",
                )
        else:
            value = ""
            for source in self.sources:
                value = source.read(scope, seps, current)
                if value:
                    if self.check and not CHECKS[self.check](value):
                        reason = f"{source.location} value {value[:70]!r} is not a valid {self.check}"
                        raise MappingFailure(reason, source.location, "102")
                    if self.max_length and len(value) > self.max_length:
                        value = self._too_long(value, source.location, notes)
                    break
        if not value and self.required:
            where = (self.keys or self.sources)[0].location if (self.keys or self.sources) else ""
            tried = ", ".join(s.location for s in (self.keys or self.sources) if s.location)
            raise MappingFailure(f"{'.'.join(self.target)} is required: {tried} empty or unmapped", where)
        return value or self.default

    def _too_long(self, value: str, location: str, notes: list[str] | None) -> str:
        """A value longer than ``max``: refused (AE naming the field and the limit), or cut with a note."""
        what = f"{location}: {len(value)} characters, more than the {self.max_length} of {'.'.join(self.target)}"
        if self.too_long == "refuse":
            # An identifier cut to fit would be another identifier (two accession numbers becoming one).
            raise MappingFailure(what, location, "102")
        if notes is not None:
            notes.append(f"{what}: cut")
        return value[: self.max_length]


# What a value longer than a rule's ``max`` gets: ``refuse`` (AE) or ``cut`` (shortened, noted in the journal).
TOO_LONG = ("refuse", "cut")


@dataclass
class EachRule:
    """A list target filled once per repetition (``each: PID-3``) or per segment (``each: IPC``)."""

    target: str
    over: str
    item_type: type
    rules: list[FieldRule]
    required: bool
    line: int
    getter: Getter | None = None  # for repetitions of a field


def _target_type(cls: type, path: list[str], file: Path, line: int) -> Any:
    """Resolve a dotted target against the canonical dataclasses; errors name the bad part."""
    current: Any = cls
    for i, part in enumerate(path):
        if not is_dataclass(current):
            raise MappingError(file, line, f"{'.'.join(path[:i])} has no attribute {part!r}")
        hints = typing.get_type_hints(current)
        names = [f.name for f in fields(current)]
        if part not in names:
            raise MappingError(file, line, f"{cls.__name__} target {'.'.join(path)!r}: {part!r} not one of {names}")
        current = hints[part]
    return current


def _set(obj: Any, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        obj = getattr(obj, part)
    setattr(obj, path[-1], value)


class HL7InboundMapping:
    """Compiled ``hl7_inbound.yaml``: turns a tokenized message into a canonical payload.

    The rules are checked, then compiled at load into one Python function per section (``_Compiler``).
    ``compiled=False`` keeps the rule-by-rule interpreter instead: the reference the compiled form is tested against.
    A rule's ``too_long`` is read per message; anything else changed in the rules after load is not seen."""

    def __init__(self, path: Path | str | None = None, *, compiled: bool = True):
        self.path = Path(path) if path else MAPPINGS_DIR / "hl7_inbound.yaml"
        doc = load_yaml(self.path)
        file = self.path
        if not isinstance(doc, Node):
            raise MappingError(file, 1, "expected a mapping with 'accept', 'patient', 'order', 'steps'")
        known = {
            "kind",
            "version",
            "description",
            "accept",
            "tables",
            "patient",
            "order",
            "steps",
            "merge",
            "report",
            "report_text",
        }
        for key in doc:
            if key not in known:
                raise MappingError(file, line_of(doc, key), f"unknown section {key!r} (expected {sorted(known)})")
            if key in ("kind", "version", "description") and not isinstance(doc[key], str):
                raise MappingError(file, line_of(doc, key), f"{key}: expected text, not {shape(doc[key])}")
        self.tables = load_tables(doc.get("tables"), self.path.parent, file, line_of(doc, "tables"))
        accept = doc.get("accept")
        if not isinstance(accept, Node) or not accept:
            raise MappingError(file, line_of(doc, "accept"), "'accept' must map message types to event kinds")
        for mtype, kind in accept.items():
            if kind not in EVENT_KINDS:
                raise MappingError(file, line_of(accept, mtype), f"{mtype}: kind {kind!r} not in {EVENT_KINDS}")
            if not re.fullmatch(r"[A-Z0-9]{3}\^[A-Z0-9]{3}", mtype):
                raise MappingError(file, line_of(accept, mtype), f"{mtype!r} is not a message type like ORM^O01")
        self.accept: dict[str, str] = dict(accept)
        self.patient = self._section(doc, "patient", model.Patient, required=True)
        self.order = self._section(doc, "order", model.ImagingOrder, required="order" in self.accept.values())
        self.steps = self._steps(doc)
        self.merge = self._section(doc, "merge", model.PatientUpdate, required=False)
        self.report = self._section(doc, "report", model.Report, required="report" in self.accept.values())
        self.report_text = self._report_text(doc) if "report" in self.accept.values() else None
        self.program = _Compiler(self).program() if compiled else self._interpreted()

    # -- compile ---------------------------------------------------------------------------------------------

    def _source(self, text: Any, line: int) -> Source:
        if not isinstance(text, str):
            raise MappingError(self.path, line, f"expected an HL7 field path like PID-3.1, not {shape(text)}")
        path, *filters = (p.strip() for p in text.split("|"))
        getter, location = compile_path(path, self.path, line)
        return Source(getter, location, compile_filters(filters, self.tables, self.path, line), path_spec(path))

    def _rule(self, cls: type, target: str, spec: Any, line: int) -> FieldRule:
        parts = target.split(".")
        hint = _target_type(cls, parts, self.path, line)
        if hint is not str and typing.get_origin(hint) is not typing.Literal:
            raise MappingError(self.path, line, f"{target!r} is not a text attribute; map its parts instead")
        if isinstance(spec, str | list):
            spec = {"from": spec}
        if not isinstance(spec, dict):
            raise MappingError(self.path, line, f"{target}: expected a path, a list of paths or a mapping")
        unknown = set(spec) - {"from", "required", "default", "keys", "table", "column", "check", "max", "too_long"}
        if unknown:
            raise MappingError(self.path, line, f"{target}: unknown option(s) {sorted(unknown)}")
        for option in ("required", "default", "table", "column", "check", "max", "too_long"):
            if option in spec and not isinstance(spec[option], str):
                raise MappingError(self.path, line, f"{target}: {option} must be text, not {shape(spec[option])}")
        if not isinstance(spec.get("keys", []), list):
            raise MappingError(self.path, line, f"{target}: 'keys' must be a list of paths")
        required = str(spec.get("required", "")).lower() in ("true", "yes", "1")
        default = str(spec.get("default", ""))
        if "keys" in spec:
            table = self.tables.get(spec.get("table", ""))
            if table is None:
                raise MappingError(self.path, line, f"{target}: 'keys' needs 'table' naming a declared table")
            keys = [self._source(k, line) for k in spec["keys"]]
            if len(keys) != len(table.keys):
                raise MappingError(self.path, line, f"{target}: table {table.name} has key columns {table.keys}")
            column = spec.get("column") or next(c for c in table.columns if c not in table.keys)
            if column not in table.columns:
                raise MappingError(self.path, line, f"{target}: table {table.name} has no column {column!r}")
            return FieldRule(parts, [], required, default, line, keys, table, column)
        sources = spec.get("from")
        if not sources:
            raise MappingError(self.path, line, f"{target}: no 'from' source")
        if not isinstance(sources, str | list):
            raise MappingError(self.path, line, f"{target}: 'from' must be a path or a list of paths")
        sources = [sources] if isinstance(sources, str) else list(sources)
        compiled = [self._source(s, line) for s in sources]
        if "table" in spec:
            filters = compile_filters([spec["table"]], self.tables, self.path, line)
            for s in compiled:
                s.filters.extend(filters)
        check = str(spec.get("check", ""))
        if check and check not in CHECKS:
            raise MappingError(self.path, line, f"{target}: check {check!r} is not one of {sorted(CHECKS)}")
        max_text = str(spec.get("max", "0")).strip()
        if not max_text.isdigit() or not max_text.isascii():
            raise MappingError(self.path, line, f"{target}: max must be a positive number of characters")
        max_length = int(max_text)
        too_long = str(spec.get("too_long", "refuse"))
        if too_long not in TOO_LONG:
            raise MappingError(self.path, line, f"{target}: too_long {too_long!r} is not one of {list(TOO_LONG)}")
        return FieldRule(
            parts, compiled, required, default, line, check=check, max_length=max_length, too_long=too_long
        )

    def _rules(self, cls: type, node: Node) -> tuple[list[FieldRule], list[EachRule]]:
        rules: list[FieldRule] = []
        eaches: list[EachRule] = []
        for target, spec in node.items():
            line = line_of(node, target)
            if isinstance(spec, dict) and "each" in spec:
                eaches.append(self._each(cls, target, spec, line))
            else:
                rules.append(self._rule(cls, target, spec, line))
        return rules, eaches

    def _each(self, cls: type, target: str, spec: Node, line: int) -> EachRule:
        hint = _target_type(cls, target.split("."), self.path, line)
        if typing.get_origin(hint) is not list:
            raise MappingError(self.path, line, f"'each' needs a list target; {target!r} is not a list")
        (item_type,) = typing.get_args(hint)
        sub = spec.get("fields")
        if not isinstance(sub, Node):
            raise MappingError(self.path, line_of(spec, "fields"), f"{target}: 'each' needs 'fields'")
        rules, nested = self._rules(item_type, sub)
        if nested:
            raise MappingError(self.path, line, f"{target}: nested 'each' is not supported")
        for option in ("each", "required"):
            if not isinstance(spec.get(option, ""), str):
                where = line_of(spec, option)
                raise MappingError(self.path, where, f"{target}: {option} must be text, not {shape(spec[option])}")
        over = spec["each"]
        getter = None
        if "-" in over:
            getter, _ = compile_path(over, self.path, line_of(spec, "each"))
            for rule in rules:
                for source in [*rule.sources, *(rule.keys or [])]:
                    if source.location.startswith("."):  # relative to the repetition: PID-3 + .1 = PID-3.1
                        source.location = over + source.location
        elif not re.fullmatch(r"[A-Z][A-Z0-9]{2}", over):
            raise MappingError(
                self.path, line_of(spec, "each"), f"each: {over!r} is neither a segment name nor a field path"
            )
        else:
            check_segment(over, self.path, line_of(spec, "each"))
        required = str(spec.get("required", "")).lower() in ("true", "yes", "1")
        return EachRule(target, over, item_type, rules, required, line, getter)

    def _section(self, doc: Node, name: str, cls: type, *, required: bool) -> tuple[list, list]:
        node = doc.get(name)
        if node is None:
            if required:
                raise MappingError(self.path, doc.line, f"section {name!r} is missing")
            return [], []
        if not isinstance(node, Node):
            raise MappingError(self.path, line_of(doc, name), f"section {name!r} must be a mapping")
        return self._rules(cls, node)

    def _steps(self, doc: Node) -> EachRule | None:
        node = doc.get("steps")
        if node is None:
            return None
        line = line_of(doc, "steps")
        if not isinstance(node, Node) or "each" not in node:
            raise MappingError(self.path, line, "'steps' needs 'each: SEGMENT' and 'fields'")
        rule = self._each(model.ImagingOrder, "steps", node, line)
        return rule

    def _report_text(self, doc: Node) -> ReportText:
        node = doc.get("report_text")
        line = line_of(doc, "report_text") if node is not None else doc.line
        if not isinstance(node, Node):
            raise MappingError(self.path, line, "'report_text' is required with reports: {table: ..., default: ...}")
        unknown = set(node) - {"table", "default", "conclusion", "text_types"}
        if unknown:
            raise MappingError(self.path, line, f"report_text: unknown key(s) {sorted(unknown)}")
        for key in ("table", "default", "conclusion"):
            if not isinstance(node.get(key, ""), str):
                where = line_of(node, key)
                raise MappingError(self.path, where, f"report_text: {key} must be text, not {shape(node[key])}")
        table = self.tables.get(str(node.get("table", "")))
        if table is None or not {"section", "title"} <= set(table.columns):
            where = line_of(node, "table")
            raise MappingError(self.path, where, "report_text.table must name a declared table with 'section', 'title'")
        types = node.get("text_types", ["TX", "FT", "ST"])
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise MappingError(self.path, line, "report_text: text_types must be a list of HL7 data types")
        return ReportText(
            table, str(node.get("default", "")), str(node.get("conclusion", "19005-8")), [str(t) for t in types]
        )

    # -- apply -----------------------------------------------------------------------------------------------

    def kind_of(self, msg: Message) -> str | None:
        return self.accept.get(msg.message_type)

    def map(self, msg: Message, notes: list[str] | None = None) -> list[model.Payload]:
        """The canonical payload(s) of one message; raises ``MappingFailure`` or ``HL7Error``.

        ``notes`` receives what the mapping changed on the way (a text value cut to its ``max``)."""
        kind = self.kind_of(msg)
        if kind is None:
            raise HL7Error(
                f"message type {msg.message_type} is not accepted by this channel", location="MSH-9", code="200"
            )
        header, groups = _split_groups(msg)
        seps = msg.separators
        if kind == "report":
            return [self._report(msg, notes)]
        program = self.program
        patient = program.patient(header, seps, notes)
        _drop_invalid_ins(patient, notes)
        if kind != "order":
            if kind != "patient-merge":
                return [model.PatientUpdate(action="update", patient=patient)]
            update = program.merge(header, seps, notes, "merge", patient)
            if not update.merged_ids:
                raise MappingFailure("merge without the prior patient identifier", "MRG-1")
            return [update]
        if not groups:
            raise MappingFailure("order message without an ORC segment", "ORC", code="100")
        _bounded(len(groups), "ORC", "orders")
        orders = []
        for group in groups:
            order = program.order(_scope(header, group), seps, notes, patient)
            if not order.key:  # nothing would tie a later change or cancel to this order
                raise MappingFailure("order has no placer, filler or accession number", "ORC-2")
            orders.append(order)
        return orders

    def _report(self, msg: Message, notes: list[str] | None = None) -> model.Report:
        """One report per message; every segment is in scope (the first OBR, OBX... wins)."""
        scope: Scope = {}
        for seg in msg.segments:
            scope.setdefault(seg.name, []).append(seg)
        seps = msg.separators
        accessions = {seg.field(18).split(seps.component)[0] for seg in scope.get("OBR", [])} - {""}
        if len(accessions) > 1:  # several exams, several documents: one message per report, please
            raise MappingFailure(
                f"one report per message: the OBR segments carry {len(accessions)} accession numbers", "OBR-18"
            )
        patient = self.program.patient(scope, seps, notes)
        report = self.program.report(scope, seps, notes, patient)
        report.observations = [observation(seg, seps) for seg in scope.get("OBX", [])]
        assert self.report_text is not None
        self.report_text.apply(report)
        if report.attachment_type == "text/xml":
            _from_ready_document(report)
        check_report(report, self.report_text.conclusion)
        return report

    # -- the interpreted form (the reference of the compiled one) -----------------------------------------------

    def _interpreted(self) -> Program:
        def patient(scope: Scope, seps: Separators, notes: list[str] | None) -> model.Patient:
            return self._fill(model.Patient(), self.patient, scope, seps, notes)

        def order(scope: Scope, seps: Separators, notes: list[str] | None, patient: model.Patient) -> Any:
            order = self._fill(model.ImagingOrder(patient=patient), self.order, scope, seps, notes)
            if self.steps:
                order.steps = self._each_segments(self.steps, scope, seps, notes)
            return order

        def merge(scope: Scope, seps: Separators, notes: list[str] | None, action: str, patient: model.Patient) -> Any:
            update = model.PatientUpdate(action=action, patient=patient)  # type: ignore[arg-type]
            return self._fill(update, self.merge, scope, seps, notes)

        def report(scope: Scope, seps: Separators, notes: list[str] | None, patient: model.Patient) -> Any:
            return self._fill(model.Report(patient=patient), self.report, scope, seps, notes)

        return Program(patient, order, merge, report, "")

    def _fill(
        self, obj: Any, section: tuple[list, list], scope: Scope, seps: Separators, notes: list[str] | None = None
    ) -> Any:
        rules, eaches = section
        for rule in rules:
            value = rule.value(scope, seps, "", notes)
            if value:  # the objects are new: their attributes already hold the empty default
                _set(obj, rule.target, value)
        for each in eaches:
            _set(obj, each.target.split("."), self._each_items(each, scope, seps, notes))
        return obj

    def _each_items(self, each: EachRule, scope: Scope, seps: Separators, notes: list[str] | None = None) -> list[Any]:
        if each.getter is None:
            return self._each_segments(each, scope, seps, notes)
        # Repetitions of one field: read the raw field once, then each repetition as "current".
        seg_name, _, rest = each.over.partition("-")
        segments = scope.get(seg_name) or []
        if not segments:
            items: list[Any] = []
        else:
            raw = segments[0].field(int(re.match(r"\d+", rest)[0]))  # type: ignore[index]
            _bounded(raw.count(seps.repetition) + 1, each.over, "repetitions")
            items = []
            for rep in raw.split(seps.repetition):
                if not rep.strip(seps.component + seps.subcomponent + " "):
                    continue
                item = each.item_type()
                for rule in each.rules:
                    _set(item, rule.target, rule.value(scope, seps, rep, notes))
                items.append(item)
        if each.required and not items:
            raise MappingFailure(f"{each.over} is empty but required (maps to {each.target})", each.over)
        return items

    def _each_segments(
        self, each: EachRule, scope: Scope, seps: Separators, notes: list[str] | None = None
    ) -> list[Any]:
        segs = scope.get(each.over) or [None]  # no such segment: one item from the other sources
        _bounded(len(segs), each.over, "segments")
        items = []
        for seg in segs:
            sub_scope = dict(scope)
            if seg is not None:
                sub_scope[each.over] = [seg]
            item = each.item_type()
            for rule in each.rules:
                _set(item, rule.target, rule.value(sub_scope, seps, "", notes))
            items.append(item)
        return items


# Most repetitions (or segments) an `each` block maps: far above any real message (a patient's identifiers, an
# order's steps), far below what would hold the event loop (each costs some microseconds; a 16 MiB message of
# PID-3 repetitions took 13 s).
MAX_EACH = 1000


def _bounded(count: int, over: str, what: str) -> None:
    if count > MAX_EACH:
        raise MappingFailure(f"{over}: {count} {what}, more than the {MAX_EACH} a message may carry", over, "102")


def _split_groups(msg: Message) -> tuple[Scope, list[list[Segment]]]:
    """Message-level segments, and one group per ORC (ORC and what follows it up to the next ORC)."""
    header: Scope = {}
    groups: list[list[Segment]] = []
    for seg in msg.segments:
        if seg.name == "ORC":
            groups.append([seg])
        elif groups:
            groups[-1].append(seg)
        else:
            header.setdefault(seg.name, []).append(seg)
    return header, groups


def _scope(header: Scope, group: list[Segment]) -> Scope:
    scope: Scope = {}
    for seg in group:
        scope.setdefault(seg.name, []).append(seg)
    for name, segs in header.items():
        scope[name] = scope.get(name, []) + segs
    return scope


# -- the compiled form -----------------------------------------------------------------------------------------
#
# Each section becomes one generated Python function (source text compiled once at load with ``compile()``):
# every field read is a few bytecodes on local variables (the segment's field list fetched once per function, a
# field read by several rules split once), filters and table lookups are inlined, and the payload is built by one
# constructor call with keywords. Specialised closures were the alternative; they still pay a call per rule and
# per source and a setattr per value, the cost the interpreter spends its time on (bench/mapping.py measures both).
# The generated text holds only identifiers and integers of our own: attribute names (checked against the model's
# dataclass fields at load) and positions. Every value that comes from the mapping file (segment names, filter
# values, messages, locations, table contents) reaches the code as a constant of its namespace, never as source.


class Program(NamedTuple):
    """A mapping's sections as functions of ``(scope, separators, notes, ...)``."""

    patient: Callable[[Scope, Separators, list[str] | None], model.Patient]
    order: Callable[[Scope, Separators, list[str] | None, model.Patient], model.ImagingOrder]
    merge: Callable[[Scope, Separators, list[str] | None, str, model.Patient], model.PatientUpdate]
    report: Callable[[Scope, Separators, list[str] | None, model.Patient], model.Report]
    source: str  # the generated Python ("" for the interpreted form)


def _refuse_check(location: str, value: str, check: str) -> None:
    raise MappingFailure(f"{location} value {value[:70]!r} is not a valid {check}", location, "102")


def _not_in_table(where: str, key: tuple[str, ...], table: str, location: str) -> None:
    raise MappingFailure(f"{where} value {'/'.join(key)!r} is not in table {table}", location, code="103")


def _scan(rows: list[tuple[tuple[str, ...], str]], key: tuple[str, ...], known: dict, limit: int) -> str | None:
    """The value of the first '*' row ``key`` matches (``CodeTable.lookup`` past its exact rows), remembered in
    ``known`` (the rule's exact keys) for short keys while it holds fewer than ``limit``: ``NW`` with any status
    is looked up once."""
    for pattern, value in rows:
        if all(p == "*" or p == k for p, k in zip(pattern, key, strict=True)):
            if len(known) < limit and sum(map(len, key)) <= 64:
                known[key] = value
            return value
    return None


def _identifier(name: str) -> str:
    if not name.isidentifier():  # model field names: anything else never reaches the generated source
        raise ValueError(f"not an attribute name: {name!r}")
    return name


_UNSET = dataclasses.MISSING


def _leaf_default(f: dataclasses.Field) -> Any:
    if f.default is not _UNSET:
        return f.default
    return f.default_factory() if f.default_factory is not _UNSET else _UNSET


class _Frame:
    """Where the generated code reads segments: field lists fetched once at the top of the function, and in an
    ``each: SEGMENT`` loop the iterated segment's. A field read by several sources is split into components once
    (lazily: a fallback source may never be read)."""

    def __init__(
        self, c: _Compiler, sources: list[Source], base: int, parent: _Frame | None = None, over: str = ""
    ) -> None:
        self.c = c
        self.base = base  # the indentation of the function's (or the loop's) body: code there always runs
        self.parent = parent
        self.filled: set[str] = set()  # caches filled by code that always runs before what is written next
        self.over = over  # the segment of this loop ("" for the function's frame)
        self.setup: list[str] = []  # lines run first (at the function's top, or at each turn of the loop)
        self.fields: dict[tuple[str, int], str] = {}
        self.caches: dict[tuple[Any, ...], str] = {}
        self.item = c.name("_seg") if over else ""
        self.fields_var = c.name("_fi") if over else ""
        read = [s.spec for s in sources if s.spec and s.spec.inline and s.spec.seg]
        keys = Counter(_cache_key(spec) for spec in read)
        self.shared = {k for k, n in keys.items() if n > 1}
        self.needs: dict[tuple[Any, ...], set[tuple[int, int]]] = {}  # shared field → (component, sub) read
        for spec in read:
            if _cache_key(spec) in self.shared:
                self.needs.setdefault(_cache_key(spec), set()).add((spec.comp, spec.sub))
        self.lists: dict[str, str] = {}

    def owns(self, seg: str) -> bool:
        return self.parent is None or seg == self.over

    def fields_of(self, seg: str, index: int) -> str:
        if self.parent is not None and seg != self.over:
            return self.parent.fields_of(seg, index)
        if self.over:
            return self.fields_var if index == 0 else "_E"  # the loop's scope holds this one segment only
        var = self.fields.get((seg, index))
        if var is None:
            var = self.fields[(seg, index)] = self.c.name("_f")
            k = self.c.const(seg)
            cond = f"(_g := scope.get({k}))" + (f" and len(_g) > {index}" if index else "")
            self.setup.append(f"{var} = _g[{index}].fields if {cond} else _E")
            self.setup.append(f"{var}n = len({var})")
        return var

    def raw(self, seg: str, index: int, field: int) -> str:
        """Expression: the raw field (``Segment.field``)."""
        fields_var = self.fields_of(seg, index)
        if fields_var == "_E":
            return "''"
        return f"({fields_var}[{field}] if {fields_var}n > {field} else '')"

    def segments_of(self, seg: str) -> str:
        """Expression: the segments of that name in scope (a sequence, maybe empty)."""
        if self.parent is not None and seg != self.over:
            return self.parent.segments_of(seg)
        var = self.lists.get(seg)
        if var is None:
            var = self.lists[seg] = self.c.name("_l")
            if self.over:
                self.setup.append(f"{var} = ({self.item},) if {self.item} is not None else _E")
            else:
                self.setup.append(f"{var} = scope.get({self.c.const(seg)}) or _E")
        return var

    def cache_of(self, key: tuple[Any, ...]) -> tuple[str, set[tuple[int, int]], _Frame] | None:
        """For a field several sources read: the variable of its components (None until read), the
        (component, subcomponent) pairs read, each kept in ``{var}_{comp}_{sub}``, and the frame that owns it."""
        if not self.owns(key[0]):
            assert self.parent is not None
            return self.parent.cache_of(key)
        if key not in self.shared:
            return None
        var = self.caches.get(key)
        if var is None:
            var = self.caches[key] = self.c.name("_c")
            self.setup.append(f"{var} = None")
        return var, self.needs[key], self

    def scope_of(self, seg: str) -> str:
        """The scope a getter reads ``seg`` from (in an ``each: SEGMENT`` loop: the iterated segment alone)."""
        if self.over and seg == self.over:
            k = self.c.const(seg)
            return f"(scope if {self.item} is None else {{**scope, {k}: [{self.item}]}})"
        return self.parent.scope_of(seg) if self.parent is not None else "scope"


def _cache_key(spec: PathSpec | None) -> tuple[Any, ...]:
    """What a path reads before its component: paths alike there share one split."""
    assert spec is not None
    return (spec.seg, spec.seg_index, spec.seg_filter, spec.field, spec.rep_index, spec.rep_filter)


def _sources(rules: list[FieldRule]) -> list[Source]:
    return [s for rule in rules for s in (*rule.sources, *(rule.keys or []))]


# Generated source → its code object: a mapping loaded again (a reprocess, the console) skips compile() (~20 ms).
_COMPILED: dict[str, Any] = {}


class _Compiler:
    """Writes and compiles the functions of a ``Program``."""

    def __init__(self, mapping: HL7InboundMapping) -> None:
        self.mapping = mapping
        self.ns: dict[str, Any] = {
            "MappingFailure": MappingFailure,
            "_unescape": unescape,
            "_bounded": _bounded,
            "_refuse_check": _refuse_check,
            "_not_in_table": _not_in_table,
            "_scan": _scan,
            "_E": (),
            "_NONE": [None],
        }
        self._consts: dict[tuple[type, Any], str] = {}
        self._n = 0
        self.lines: list[str] = []

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def const(self, value: Any) -> str:
        """A name in the namespace holding ``value``."""
        try:
            key: tuple[type, Any] | None = (type(value), value)
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.name("_k")
        self.ns[name] = value
        if key is not None:
            self._consts[key] = name
        return name

    def emit(self, indent: int, text: str) -> None:
        self.lines.append("    " * indent + text)

    # -- program ---------------------------------------------------------------------------------------------

    def program(self) -> Program:
        m = self.mapping
        self.function("patient", model.Patient, m.patient, ())
        self.function("order", model.ImagingOrder, m.order, ("patient",), m.steps)
        self.function("merge", model.PatientUpdate, m.merge, ("action", "patient"))
        self.function("report", model.Report, m.report, ("patient",))
        source = "\n".join(self.lines) + "\n"
        code = _COMPILED.get(source)
        if code is None:
            if len(_COMPILED) >= 16:
                _COMPILED.clear()
            filename = f"<compiled {m.path.name} {hashlib.sha256(source.encode()).hexdigest()[:12]}>"
            code = _COMPILED[source] = compile(source, filename, "exec")
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)  # for tracebacks
        exec(code, self.ns)
        ns = self.ns
        return Program(ns["patient"], ns["order"], ns["merge"], ns["report"], source)

    def function(
        self, name: str, cls: type, section: tuple[list, list], presets: tuple[str, ...], steps: EachRule | None = None
    ) -> None:
        rules, eaches = section
        # What the function's frame reads: an `each: SEGMENT` loop reads its segment from its own frame.
        sources = _sources(rules)
        for each in [*eaches, *([steps] if steps else [])]:
            over = "" if each.getter is not None and each is not steps else each.over
            sources += [s for s in _sources(each.rules) if not (s.spec and s.spec.seg == over)]
        frame = _Frame(self, sources, 1)
        outer, self.lines = self.lines, []
        assigned: list[tuple[list[str], str, bool]] = []  # target, variable, set only when not empty
        for rule in rules:
            assigned.append((rule.target, self.rule(rule, frame, 1, None, None), True))
        for each in eaches:
            assigned.append((each.target.split("."), self.each(each, frame, 1), False))
        if steps is not None:
            assigned.append((["steps"], self.each(steps, frame, 1, segments=True), False))
        self.construct("_obj", cls, assigned, presets, 1)
        self.emit(1, "return _obj")
        body, self.lines = self.lines, outer
        params = "".join(f", {_identifier(p)}" for p in presets)
        self.emit(0, f"def {name}(scope, seps, notes{params}):")
        for line in ("_R = seps.repetition", "_C = seps.component", "_S = seps.subcomponent", "_X = seps.escape"):
            self.emit(1, line)
        for line in frame.setup:
            self.emit(1, line)
        self.lines.extend(body)
        self.emit(0, "")

    # -- building the payload ----------------------------------------------------------------------------------

    def construct(
        self, var: str, cls: type, assigned: list[tuple[list[str], str, bool]], presets: tuple[str, ...], ind: int
    ) -> None:
        """``var = cls(...)``: values go to the constructor; what must be set afterwards (an attribute given by the
        caller, a nested default that is not its class's plain instance) is set after, as ``_set`` would."""
        tree: dict[str, Any] = {}
        after: list[tuple[list[str], str, bool]] = []
        for target, value, conditional in assigned:
            if target[0] in presets:
                after.append((target, value, conditional))
                continue
            node = tree
            for part in target[:-1]:
                node = node.setdefault(part, {})
            node[target[-1]] = (value, conditional, target)
        args = [f"{_identifier(p)}={p}" for p in presets]
        args += self.arguments(cls, tree, after)
        self.emit(ind, f"{var} = {self.const(cls)}({', '.join(args)})")
        for target, value, conditional in after:
            attribute = ".".join(_identifier(p) for p in target)
            assignment = f"{var}.{attribute} = {value}"
            self.emit(ind, f"if {value}: {assignment}" if conditional else assignment)

    def arguments(self, cls: type, tree: dict[str, Any], after: list[tuple[list[str], str, bool]]) -> list[str]:
        declared = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        args = []
        for attr, node in tree.items():
            f = declared[attr]
            if isinstance(node, tuple):
                value, conditional, target = node
                default = _leaf_default(f)
                if not conditional or default == "":
                    args.append(f"{_identifier(attr)}={value}")
                elif default is _UNSET:
                    after.append((target, value, conditional))
                else:
                    args.append(f"{_identifier(attr)}={value} or {self.const(default)}")
                continue
            sub = hints[attr]
            factory = f.default_factory
            if factory is not _UNSET and is_dataclass(sub) and factory() == sub():  # type: ignore[misc,operator]
                inner = self.arguments(sub, node, after)  # type: ignore[arg-type]
                args.append(f"{_identifier(attr)}={self.const(sub)}({', '.join(inner)})")
            else:
                after.extend(_leaves(node))
        return args

    # -- rules -------------------------------------------------------------------------------------------------

    def rule(self, rule: FieldRule, frame: _Frame, ind: int, current: str | None, parts: str | None) -> str:
        """Code computing ``FieldRule.value``; returns the variable holding it."""
        v = self.name("_v")
        if rule.keys is not None and rule.table is not None:
            keys = []
            for source in rule.keys:
                k = self.name("_key")
                self.read(source, k, ind, frame, current, parts)
                keys.append(k)
            key = f"({', '.join(keys)},)"
            exact, scan = rule.table.index(rule.column)
            self.emit(ind, f"{v} = {self.const(exact)}.get({key})")
            self.emit(ind, f"if {v} is None:")
            if scan:
                limit = len(exact) + 1024
                self.emit(ind + 1, f"{v} = _scan({self.const(scan)}, {key}, {self.const(exact)}, {limit})")
                self.emit(ind + 1, f"if {v} is None:")
                ind += 1
            if rule.required:
                where = "/".join(k.location for k in rule.keys)
                args = f"{self.const(where)}, {key}, {self.const(rule.table.name)}, {self.const(rule.keys[0].location)}"
                self.emit(ind + 1, f"if {' or '.join(keys)}: _not_in_table({args})")
            self.emit(ind + 1, f"{v} = ''")
            ind -= 1 if scan else 0
        else:
            if not rule.sources:
                self.emit(ind, f"{v} = ''")
            for i, source in enumerate(rule.sources):
                at = ind
                if i:  # first non-empty wins (a value, once found, stays non-empty: checks raise, cuts keep max > 0)
                    self.emit(ind, f"if not {v}:")
                    at = ind + 1
                self.read(source, v, at, frame, current, parts)
                if rule.check or rule.max_length:
                    self.emit(at, f"if {v}:")
                    location = self.const(source.location)
                    if rule.check:
                        test, check = self.const(CHECKS[rule.check]), self.const(rule.check)
                        self.emit(at + 1, f"if not {test}({v}): _refuse_check({location}, {v}, {check})")
                    if rule.max_length:
                        cut = self.const(rule._too_long)  # reads the rule's too_long when called
                        self.emit(at + 1, f"if len({v}) > {int(rule.max_length)}: {v} = {cut}({v}, {location}, notes)")
        if rule.required:
            tried_sources = rule.keys or rule.sources
            where = tried_sources[0].location if tried_sources else ""
            tried = ", ".join(s.location for s in tried_sources if s.location)
            reason = f"{'.'.join(rule.target)} is required: {tried} empty or unmapped"
            self.emit(ind, f"if not {v}: raise MappingFailure({self.const(reason)}, {self.const(where)})")
        if rule.default:
            self.emit(ind, f"if not {v}: {v} = {self.const(rule.default)}")
        return v

    def read(self, source: Source, out: str, ind: int, frame: _Frame, current: str | None, parts: str | None) -> None:
        """Code computing ``Source.read`` into ``out``."""
        spec = source.spec
        if spec is None or not spec.inline:
            scope = frame.scope_of(spec.seg if spec else "")
            self.emit(ind, f"{out} = {self.const(source.getter)}({scope}, seps, {current or repr('')})")
            self.emit(ind, f"if {out}:")
            self.emit(ind + 1, f"{out} = {out}.strip()")
            self.filters(source, out, ind + 1)
            return
        k = spec.comp - 1
        cached = frame.cache_of(_cache_key(spec)) if spec.seg else None
        if cached is not None:  # split once, every part read made at once: then each read is one line
            cache, needs, owner = cached
            if cache not in owner.filled:
                self.emit(ind, f"if {cache} is None:")
                self.repetition(spec, frame, ind + 1)
                self.emit(ind + 1, f"{cache} = _x.split(_C)")
                self.emit(ind + 1, f"{cache}n = len({cache})")
                for comp, sub in sorted(needs):
                    part = f"{cache}[{comp - 1}] if {cache}n > {comp - 1} else ''" if comp > 1 else f"{cache}[0]"
                    self.emit(ind + 1, f"_x = {part}")
                    self.emit(ind + 1, "if _x:")
                    self.pick("_x", "_S", sub - 1, ind + 2)
                    self.emit(ind + 2, "_x = (_unescape(_x, seps) if _X in _x else _x).strip()")
                    self.emit(ind + 1, f"{cache}_{comp}_{sub} = _x")
                if ind == owner.base:
                    owner.filled.add(cache)
            self.emit(ind, f"{out} = {cache}_{spec.comp}_{spec.sub}")
            self.filters(source, out, ind)
            return
        self.emit(ind, f"{out} = ''")
        if not spec.seg:  # relative to the repetition iterated (outside an `each` over a field: always empty)
            if current is None:
                return
            if parts is not None:
                self.emit(ind, f"_x = {parts}[0]" if k == 0 else f"_x = {parts}[{k}] if len({parts}) > {k} else ''")
            else:
                self.emit(ind, f"_x = {current}")
                self.pick("_x", "_C", k, ind)
        else:
            self.repetition(spec, frame, ind)
            self.emit(ind, "if _x:")
            ind += 1
            self.pick("_x", "_C", k, ind)
        self.emit(ind, "if _x:")
        ind += 1
        self.pick("_x", "_S", spec.sub - 1, ind)
        self.emit(ind, f"{out} = (_unescape(_x, seps) if _X in _x else _x).strip()")
        self.filters(source, out, ind)

    def repetition(self, spec: PathSpec, frame: _Frame, ind: int) -> None:
        """``_x`` = the repetition a path reads (the getter's segment, field and repetition choice)."""
        if spec.seg_filter is None:
            self.emit(ind, f"_x = {frame.raw(spec.seg, spec.seg_index, spec.field)}")
        else:  # the first segment whose field f, component c is v
            f, c, v = spec.seg_filter
            self.emit(ind, "_x = ''")
            self.emit(ind, f"for _g in {frame.segments_of(spec.seg)}:")
            self.emit(ind + 1, f"_y = _g.fields[{f}] if len(_g.fields) > {f} else ''")
            self.leaf("_y", c, ind + 1)
            self.emit(ind + 1, f"if _y == {self.const(v)}:")
            self.emit(ind + 2, f"_x = _g.fields[{spec.field}] if len(_g.fields) > {spec.field} else ''")
            self.emit(ind + 2, "break")
        if spec.rep_filter is None:
            self.pick("_x", "_R", spec.rep_index, ind)
        else:  # the first repetition whose component c is v
            c, v = spec.rep_filter
            self.emit(ind, "_w = ''")
            self.emit(ind, "for _y in _x.split(_R):")
            self.emit(ind + 1, "_x = _y")
            self.leaf("_y", c, ind + 1)
            self.emit(ind + 1, f"if _y == {self.const(v)}:")
            self.emit(ind + 2, "_w = _x")
            self.emit(ind + 2, "break")
            self.emit(ind, "_x = _w")

    def leaf(self, var: str, comp: int, ind: int) -> None:
        """``var`` = its component ``comp`` (1-based), first subcomponent, unescaped (``_leaf`` without strip)."""
        self.pick(var, "_C", comp - 1, ind)
        self.emit(ind, f"if {var}:")
        self.pick(var, "_S", 0, ind + 1)
        self.emit(ind + 1, f"{var} = _unescape({var}, seps) if _X in {var} else {var}")

    def pick(self, var: str, sep: str, index: int, ind: int) -> None:
        """``var`` = its part ``index`` (0-based) split by ``sep``, "" past the end (``_pick``)."""
        if index == 0:
            self.emit(ind, f"if {sep} in {var}: {var} = {var}.partition({sep})[0]")
        else:
            self.emit(ind, f"{var} = {var}.split({sep})")
            self.emit(ind, f"{var} = {var}[{index}] if len({var}) > {index} else ''")

    def filters(self, source: Source, out: str, ind: int) -> None:
        for f in source.filters:
            self.emit(ind, f"if {out}:")
            spec = getattr(f, "table_filter", None)
            if spec is None:
                self.emit(ind + 1, f"{out} = {self.const(f)}({out})")
                continue
            table, column, strict = spec
            missing = "''" if strict else out
            if len(table.keys) != 1:  # a composite-key table as a filter finds nothing
                self.emit(ind + 1, f"{out} = {missing}")
                continue
            exact, scan = table.index(column)
            codes = {key[0]: value for key, value in exact.items()}
            fallback: str | None = None
            for key, value in scan:  # in file order: the first '*' row answers every code not listed before it
                if key[0] == "*":
                    fallback = value
                    break
                codes.setdefault(key[0], value)
            codes.update({key[0]: value for key, value in exact.items()})
            default = self.const(fallback) if fallback is not None else missing
            self.emit(ind + 1, f"{out} = {self.const(codes)}.get({out}, {default})")

    # -- each ----------------------------------------------------------------------------------------------------

    def each(self, each: EachRule, frame: _Frame, ind: int, segments: bool = False) -> str:
        """Code computing ``_each_items`` (``_each_segments`` with ``segments``, as ``steps`` is read whatever it
        names); returns the variable holding the list."""
        items = self.name("_items")
        self.emit(ind, f"{items} = []")
        if each.getter is not None and not segments:
            seg, _, rest = each.over.partition("-")
            number = re.match(r"\d+", rest)
            # `scope.get(seg)` finds nothing for anything but a segment name: no item then.
            if re.fullmatch(r"[A-Z][A-Z0-9]{2}", seg) and number:
                fields_var = frame.fields_of(seg, 0)
                n = int(number[0])
                raw, current = self.name("_raw"), self.name("_rep")
                self.emit(ind, f"if {fields_var}:")
                self.emit(ind + 1, f"{raw} = {frame.raw(seg, 0, n)}")
                self.emit(ind + 1, f"_bounded({raw}.count(_R) + 1, {self.const(each.over)}, 'repetitions')")
                self.emit(ind + 1, f"for {current} in {raw}.split(_R):")
                self.emit(ind + 2, f"if not {current}.strip(_C + _S + ' '): continue")
                parts = None
                if sum(1 for s in _sources(each.rules) if s.spec and s.spec.inline and not s.spec.seg) > 1:
                    parts = self.name("_parts")
                    self.emit(ind + 2, f"{parts} = {current}.split(_C)")
                values = [(r.target, self.rule(r, frame, ind + 2, current, parts), False) for r in each.rules]
                self.construct("_item", each.item_type, values, (), ind + 2)
                self.emit(ind + 2, f"{items}.append(_item)")
            if each.required:
                reason = f"{each.over} is empty but required (maps to {each.target})"
                self.emit(ind, f"if not {items}: raise MappingFailure({self.const(reason)}, {self.const(each.over)})")
            return items
        over = self.const(each.over)
        loop = _Frame(self, _sources(each.rules), ind + 1, frame, each.over)
        segments = self.name("_segs")
        self.emit(ind, f"{segments} = scope.get({over}) or _NONE")
        self.emit(ind, f"_bounded(len({segments}), {over}, 'segments')")
        self.emit(ind, f"for {loop.item} in {segments}:")
        self.emit(ind + 1, f"{loop.fields_var} = {loop.item}.fields if {loop.item} is not None else _E")
        self.emit(ind + 1, f"{loop.fields_var}n = len({loop.fields_var})")
        outer, self.lines = self.lines, []
        values = [(r.target, self.rule(r, loop, ind + 1, None, None), False) for r in each.rules]
        self.construct("_item", each.item_type, values, (), ind + 1)
        self.emit(ind + 1, f"{items}.append(_item)")
        body, self.lines = self.lines, outer
        for line in loop.setup:
            self.emit(ind + 1, line)
        self.lines.extend(body)
        return items


def _leaves(node: dict[str, Any]) -> list[tuple[list[str], str, bool]]:
    out = []
    for value in node.values():
        if isinstance(value, tuple):
            out.append((value[2], value[0], value[1]))
        else:
            out.extend(_leaves(value))
    return out


# -- reports ---------------------------------------------------------------------------------------------------


@dataclass
class ReportText:
    """How OBX rows become report sections: ``table`` maps an OBX-3 code to a section code and title; text rows
    with unlisted codes go to ``default`` (dropped when empty); ``conclusion`` is the section a text report must
    carry."""

    table: CodeTable
    default: str
    conclusion: str
    text_types: list[str]

    def apply(self, report: model.Report) -> None:
        titles: dict[str, str] = {}
        texts: dict[str, list[str]] = {}
        for obs in report.observations:
            if obs.system == "MetaDMPMSS":
                report.sharing.append(model.SharingFlag(obs.code, obs.text if obs.value_type != "ED" else obs.data))
                continue
            if obs.value_type == "ED":
                if obs.media_type in ("application/pdf", "text/xml") and not report.attachment:
                    report.attachment_type, report.attachment = obs.media_type, obs.data
                continue
            if obs.value_type not in self.text_types:
                continue
            section = self.table.lookup((obs.code,), "section") if obs.code else None
            if section is None and obs.value_type == "ST":
                continue  # a short coded value (study UID, modality...), not report text, unless listed
            if section is None:
                section = self.default
                title = self.table.lookup((section,), "title") or ""
            else:
                title = self.table.lookup((obs.code,), "title") or ""
            if not section:
                continue
            titles.setdefault(section, title)
            texts.setdefault(section, []).append(obs.text)
        for code, lines in texts.items():
            text = "\n".join(lines).strip("\n")
            report.sections.append(model.ReportSection(code, titles[code], text))


def observation(seg: Segment, seps: Separators) -> model.Observation:
    """An OBX row: OBX-5 repetitions joined line by line (FT/TX formatting ``\\.br\\`` as newlines); for ED, the
    media type from type/subtype and the data as received."""
    fields = seg.fields
    n = len(fields)
    value_type = fields[2].strip() if n > 2 else ""
    code = (fields[3] if n > 3 else "").split(seps.component)  # CE/CWE: code ^ text ^ system, as `_leaf` reads
    code_value, display, system = (_first_sub(code[i], seps) if i < len(code) else "" for i in range(3))
    obs = model.Observation(
        value_type=value_type,
        code=code_value,
        display=display,
        system=system,
        sub_id=fields[4] if n > 4 else "",
        status=fields[11].strip() if n > 11 else "",
    )
    raw = fields[5] if n > 5 else ""
    if value_type == "ED":
        parts = raw.split(seps.repetition)[0].split(seps.component)
        part = lambda i: parts[i].strip() if len(parts) > i else ""  # noqa: E731
        kind, subtype = part(1).lower(), part(2).lower()
        obs.media_type = MEDIA_TYPES.get((kind, subtype), f"{kind}/{subtype}" if kind and subtype else "")
        obs.encoding = part(3)
        obs.data = "".join(parts[4:]).strip()
        return obs
    lines = []
    for rep in raw.split(seps.repetition):
        if value_type in ("CWE", "CE", "CNE"):
            lines.append(_leaf(rep, 1, 0, seps))
            continue
        lines.append(unescape(rep, seps))  # \\.br\\ becomes a newline
    obs.text = "\n".join(lines)
    return obs


def _first_sub(component: str, seps: Separators) -> str:
    """A component's first subcomponent, unescaped (``_leaf`` of an already picked component)."""
    if not component:
        return component
    if seps.subcomponent in component:
        component = component.partition(seps.subcomponent)[0]
    return unescape(component, seps) if seps.escape in component else component


MEDIA_TYPES = {
    ("application", "pdf"): "application/pdf",
    ("text", "xml"): "text/xml",
    ("application", "xml"): "text/xml",
    ("multipart", "xml"): "text/xml",
}


_INS = re.compile(r"^[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{8}$")


@functools.lru_cache(maxsize=4096)  # asked several times per message for the same INS (mapping, registry)
def ins_key_ok(value: str) -> bool:
    """INS-NIR / NIA check: 13 characters (Corsica: department 2A / 2B counted as 19 / 18) then a 2-digit key
    = 97 - (the 13 as a number) mod 97."""
    value = value.upper()
    if not _INS.match(value):
        return False
    body = value[:5] + value[5:7].replace("2A", "19").replace("2B", "18") + value[7:13]
    return 97 - int(body) % 97 == int(value[13:])


def _from_ready_document(report: model.Report) -> None:
    """A ready CDA in the message: what the message lacks (accession, study, order, id) is read from its header."""
    from traboule.translate.cda import decode_attachment, read_header

    try:
        header = read_header(decode_attachment(report))
    except CDAError as exc:
        raise MappingFailure(f"the document in the ED OBX is not a CDA: {exc}", "OBX-5", code="102") from exc
    acc = report.accession_number
    if not acc.value:
        report.accession_number = model.Identifier(header.accession_number, "", header.accession_oid)
    report.study_instance_uid = report.study_instance_uid or header.study_instance_uid
    if not report.placer_order_number.value and header.placer_order_number:
        report.placer_order_number = model.Identifier(header.placer_order_number, "", header.placer_oid)
    report.document_id = report.document_id or header.id
    report.title = report.title or header.title


def _drop_invalid_ins(patient: model.Patient, notes: list[str] | None) -> None:
    """An order or an ADT goes on with an INS whose check key is wrong left out (the exam must still happen), never
    propagated to the worklist or FHIR; the journal entry says so. A report is refused instead (`check_report`)."""
    kept = []
    for ident in patient.ids:
        is_ins = ident.type == "INS" or ident.issuer_oid in model.INS_OIDS
        if is_ins and ident.value and not ins_key_ok(ident.value):
            if notes is not None:
                notes.append("PID-3: an INS with a wrong check key was left out")
            continue
        kept.append(ident)
    patient.ids = kept


def check_report(report: model.Report, conclusion: str) -> None:
    """What a report needs before anything is published; raises ``MappingFailure`` (the sender gets an AE)."""
    if not any(i.value for i in report.patient.ids):
        raise MappingFailure("report without a patient identifier", "PID-3")
    ins = report.patient.ins
    if ins is not None and ins.value and not ins_key_ok(ins.value):
        raise MappingFailure(f"INS {ins.value!r} has a wrong check key", "PID-3", code="102")
    if report.action == "delete":
        return
    if not report.accession_number.value:
        raise MappingFailure("report without an accession number", "OBR-18")
    if not report.attachment:
        found = report.section(conclusion)
        if found is None or not found.text.strip():
            raise MappingFailure(f"report without a conclusion (section {conclusion})", "OBX", code="101")
