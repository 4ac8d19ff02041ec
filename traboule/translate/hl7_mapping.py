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

import difflib
import functools
import importlib
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Source:
    getter: Getter
    location: str
    filters: list[Callable[[str], str]]

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
    """Compiled ``hl7_inbound.yaml``: turns a tokenized message into a canonical payload."""

    def __init__(self, path: Path | str | None = None):
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

    # -- compile ---------------------------------------------------------------------------------------------

    def _source(self, text: Any, line: int) -> Source:
        if not isinstance(text, str):
            raise MappingError(self.path, line, f"expected an HL7 field path like PID-3.1, not {shape(text)}")
        path, *filters = (p.strip() for p in text.split("|"))
        getter, location = compile_path(path, self.path, line)
        return Source(getter, location, compile_filters(filters, self.tables, self.path, line))

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
        patient = self._fill(model.Patient(), self.patient, header, seps, notes)
        _drop_invalid_ins(patient, notes)
        if kind != "order":
            update = model.PatientUpdate(action="merge" if kind == "patient-merge" else "update", patient=patient)
            if kind == "patient-merge":
                self._fill(update, self.merge, header, seps, notes)
                if not update.merged_ids:
                    raise MappingFailure("merge without the prior patient identifier", "MRG-1")
            return [update]
        if not groups:
            raise MappingFailure("order message without an ORC segment", "ORC", code="100")
        _bounded(len(groups), "ORC", "orders")
        orders = []
        for group in groups:
            scope = _scope(header, group)
            order = self._fill(model.ImagingOrder(patient=patient), self.order, scope, seps, notes)
            if self.steps:
                order.steps = self._each_segments(self.steps, scope, seps, notes)
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
        patient = self._fill(model.Patient(), self.patient, scope, seps, notes)
        report = self._fill(model.Report(patient=patient), self.report, scope, seps, notes)
        report.observations = [observation(seg, seps) for seg in scope.get("OBX", [])]
        assert self.report_text is not None
        self.report_text.apply(report)
        if report.attachment_type == "text/xml":
            _from_ready_document(report)
        check_report(report, self.report_text.conclusion)
        return report

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
    value_type = seg.field(2).strip()
    code = seg.field(3)
    obs = model.Observation(
        value_type=value_type,
        code=_leaf(code, 1, 0, seps),
        display=_leaf(code, 2, 0, seps),
        system=_leaf(code, 3, 0, seps),
        sub_id=seg.field(4),
        status=seg.field(11).strip(),
    )
    raw = seg.field(5)
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


MEDIA_TYPES = {
    ("application", "pdf"): "application/pdf",
    ("text", "xml"): "text/xml",
    ("application", "xml"): "text/xml",
    ("multipart", "xml"): "text/xml",
}


_INS = re.compile(r"^[0-9]{5}(?:[0-9]{2}|2[AB])[0-9]{8}$")


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
