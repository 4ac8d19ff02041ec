"""What every mapping file shares: YAML with line numbers, load errors that name file and line, code tables
and value filters.

Mapping files are data an integrator edits; anything wrong in them must fail at start-up with
``file:line: reason`` rather than at the first message.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from traboule.errors import MappingError

MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"


class Node(dict):
    """A YAML mapping that remembers the line of each key (1-based) and of itself. A ``Node()`` made in code (the
    default of a section left out) has line 0 and no key lines: ``line_of`` answers 0 for it, never fails."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.line = 0
        self.lines: dict[str, int] = {}


class NodeList(list):
    line: int = 0


# libyaml's loader when PyYAML has it: ~8x faster on the shipped mappings (every engine process loads them).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Any:
    """Load a YAML file keeping line numbers (``Node.lines``); syntax errors become ``MappingError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(path, 0, f"cannot read: {exc.strerror}") from exc
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise MappingError(path, (mark.line + 1) if mark else 0, f"YAML syntax: {exc}") from exc
    if root is None:
        raise MappingError(path, 1, "file is empty")
    return _build(root)


def _build(node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = Node()
        out.line = node.start_mark.line + 1
        out.lines = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[key] = _build(value_node)
            out.lines[key] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        seq = NodeList(_build(v) for v in node.value)
        seq.line = node.start_mark.line + 1
        return seq
    # Scalars stay text as written (".1" is a component path, not the float 0.1); "~"/"null" mean empty.
    if node.tag == "tag:yaml.org,2002:null" and not node.style:
        return ""
    return str(node.value)


def line_of(node: Any, key: str | None = None) -> int:
    if key is not None and isinstance(node, Node):
        return node.lines.get(key, node.line)
    return getattr(node, "line", 0)


def shape(value: Any) -> str:
    """What a YAML value is, for an error that expected text."""
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else repr(value)


@dataclass
class CodeTable:
    """A CSV code table: key column(s) → value column(s). ``*`` in a key column matches any value."""

    name: str
    keys: list[str]
    columns: list[str]
    rows: list[dict[str, str]] = field(default_factory=list)
    _exact: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)

    def lookup(self, key: tuple[str, ...], column: str) -> str | None:
        row = self._exact.get(key)
        if row is None:
            row = next(
                (r for r in self.rows if all(r[k] in ("*", v) for k, v in zip(self.keys, key, strict=True))),
                None,
            )
        return None if row is None else row.get(column, "")

    def index(self, column: str) -> tuple[dict[tuple[str, ...], str], list[tuple[tuple[str, ...], str]]]:
        """``lookup`` precomputed for one column: the exact keys' values, and in file order the rows a key without an
        exact row may still match (those with a ``*``). Read once when a mapping is compiled."""
        exact = {key: row.get(column, "") for key, row in self._exact.items()}
        keyed = ((tuple(row[k] for k in self.keys), row) for row in self.rows)
        scan = [(key, row.get(column, "")) for key, row in keyed if key not in exact]
        return exact, scan


def load_table(name: str, spec: Any, base: Path, file: Path, line: int) -> CodeTable:
    """``spec`` is a CSV path, or ``{file: path, keys: [col, ...]}``; default key is the first column."""
    if isinstance(spec, str):
        spec = {"file": spec}
    if not isinstance(spec, dict) or "file" not in spec:
        raise MappingError(file, line, f"table {name!r}: give a CSV path or {{file: ..., keys: [...]}}")
    path = (base / spec["file"]).resolve()
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            lines = [row for row in fh if row.strip() and not row.lstrip().startswith("#")]
    except OSError as exc:
        raise MappingError(file, line, f"table {name!r}: cannot read {path}: {exc.strerror}") from exc
    reader = csv.DictReader(lines)
    columns = [c.strip() for c in reader.fieldnames or []]
    keys = list(spec.get("keys") or columns[:1])
    if len(columns) < 2:
        raise MappingError(path, 1, f"table {name!r} needs a header with at least two columns")
    for k in keys:
        if k not in columns:
            raise MappingError(file, line, f"table {name!r}: key column {k!r} not in {path.name} ({columns})")
    table = CodeTable(name, keys, columns)
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            raise MappingError(path, n, "more values than header columns")
        table.rows.append(row)
        key = tuple(row[k] for k in keys)
        if "*" not in key:
            table._exact.setdefault(key, row)
    return table


def load_tables(node: Any, base: Path, file: Path, line: int = 0) -> dict[str, CodeTable]:
    """The ``tables`` section (``line``: where it is, for a section that is a scalar, which has no line)."""
    if not node:
        return {}
    if not isinstance(node, dict):
        raise MappingError(file, line_of(node) or line, "'tables' must map names to CSV files")
    return {name: load_table(name, spec, base, file, line_of(node, name)) for name, spec in node.items()}


# --- value filters (``SOURCE | filter | table``) ---------------------------------------------------------------


def _valid_date(v: str) -> bool:
    """YYYYMMDD that could be a date (senders put MMDDYYYY or free text in DTM fields)."""
    return (
        len(v) >= 8
        and v[:8].isdigit()
        and "1800" <= v[:4] <= "2999"
        and "01" <= v[4:6] <= "12"
        and ("01" <= v[6:8] <= "31")
    )


def _date(v: str) -> str:
    return v[:8] if _valid_date(v) else ""


def _time(v: str) -> str:
    t = v[8:].split("+")[0].split("-")[0]
    return t[:6] if _valid_date(v) and t[:4].isdigit() else ""


def _datetime(v: str) -> str:
    return v.split("+")[0].split("-")[0][:14] if _valid_date(v) else ""


def _instant(v: str) -> str:
    """HL7 DTM with its zone kept when it has one: ``YYYYMMDDHHMMSS[+-ZZZZ]`` (fractions dropped)."""
    if not _valid_date(v):
        return ""
    m = re.match(r"^(\d{8,14})(?:\.\d+)?([+-]\d{4})?$", v.strip())
    return (m.group(1) + (m.group(2) or "")) if m else _datetime(v)


def _height_m(v: str) -> str:
    """A height in metres (DICOM PatientSize). LOINC 8302-2 is sent in cm: a value above 3 is taken as cm."""
    try:
        number = float(v.strip().replace(",", "."))
    except ValueError:
        return ""
    return f"{number / 100:.2f}" if number > 3 else f"{number:g}"


FILTERS: dict[str, Callable[[str], str]] = {
    "height_m": _height_m,
    "date": _date,  # HL7 DTM → DICOM DA
    "time": _time,  # HL7 DTM → DICOM TM (no zone)
    "datetime": _datetime,  # HL7 DTM without zone
    "instant": _instant,  # HL7 DTM with its zone, when it has one
    "upper": str.upper,
    "lower": str.lower,
    "trim": str.strip,
}


def compile_filters(
    names: list[str], tables: dict[str, CodeTable], file: Path, line: int
) -> list[Callable[[str], str]]:
    """Filters are builtin names or ``table`` / ``table:column`` lookups: an unlisted code passes through
    unchanged, or becomes empty with ``strict:table``."""
    out: list[Callable[[str], str]] = []
    for name in names:
        name = name.strip()
        if name in FILTERS:
            out.append(FILTERS[name])
            continue
        strict = name.startswith("strict:")
        table_name, _, column = name.removeprefix("strict:").partition(":")
        table = tables.get(table_name)
        if table is None:
            raise MappingError(file, line, f"unknown filter or table {name!r} (filters: {sorted(FILTERS)})")
        col = column or next(c for c in table.columns if c not in table.keys)
        if col not in table.columns:
            raise MappingError(file, line, f"table {table_name!r} has no column {col!r}")
        out.append(_table_filter(table, col, strict))
    return out


def _table_filter(table: CodeTable, column: str, strict: bool) -> Callable[[str], str]:
    def apply(value: str) -> str:
        found = table.lookup((value,), column) if len(table.keys) == 1 else None
        if found is None:
            return "" if strict else value
        return found

    apply.table_filter = (table, column, strict)  # type: ignore[attr-defined]  # what a compiled mapping inlines
    return apply
