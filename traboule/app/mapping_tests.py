"""Mapping tests as files, for integrators: an input message and the values expected from it.

``mappings/tests/NAME.expected.yaml`` beside ``NAME.hl7``::

    input: NAME.hl7                 # optional, defaults to the same stem
    ack: AA                         # AA, or AE/AR with 'error' containing a text
    canonical:                      # paths into the first payload; "[1].x" for the second one
      accession_number.value: ACC0001
      steps[0].modality: CT
    dicom:                          # the MWL item of the first order's first step
      AccessionNumber: ACC0001
      ScheduledProcedureStepSequence[0].Modality: CT

``NAME.fhir.yaml``: canonical events in (HL7 files mapped as the inbound channel does, reports made documents, and
events written as YAML), the FHIR channel's resources out, checked by JSON pointer or a small FHIRPath::

    input:                          # in order; a file is an HL7 message, a mapping is a canonical event
      - orm_o01_nw_latin1.hl7
      - {kind: Study, payload: {study_instance_uid: 1.2.3, accession_number: ACC0001}}
    ack: AA                         # of the last HL7 input (the others must be AA); 'error' as above
    resources:
      Patient:                      # the first Patient ('Patient[1]': the second), JSON pointers into it
        /identifier/0/system: urn:oid:1.2.250.1.999.1.1
      ServiceRequest.status: active                         # FHIRPath subset, over every resource of the type
      Patient.identifier.where(system='urn:oid:1.2.250.1.213.1.4.10').value: '279035121518989'

``NAME.cda.yaml``: the same inputs; the CDA of the last document they published, checked by XPath (prefixes
``hl7``/``cda`` (urn:hl7-org:v3), ``xsi``, ``sdtc``, ``ps3-20``), and by the CI-SIS validators when
``TRABOULE_CDA_VALIDATORS`` names them (``valid: true``; skipped with a note otherwise)::

    xpath:
      /hl7:ClinicalDocument/hl7:code/hl7:translation/@code: 87869-4
      count(//hl7:section): '5'
    valid: true

Run with ``traboule test [PATH]``; the test suite runs the same files. The cases run the engine's parts as its
channels do (the inbound mapping, the report publisher, the ``fhir`` channel's rules in a temporary store), so this
runner sits with the command line, above the channels.
"""

from __future__ import annotations

import asyncio
import base64
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lxml import etree

from traboule import model
from traboule.errors import MappingError, MappingFailure, ReportRefused
from traboule.formats import hl7
from traboule.model import ImagingOrder
from traboule.translate.dicom_mapping import MWLMapping
from traboule.translate.hl7_mapping import HL7InboundMapping
from traboule.translate.mapping import Node, line_of, load_yaml

SUFFIXES = (".expected.yaml", ".fhir.yaml", ".cda.yaml")
XPATH_NAMESPACES = {
    "hl7": "urn:hl7-org:v3",
    "cda": "urn:hl7-org:v3",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
    "sdtc": "urn:hl7-org:sdtc",
    "ps3-20": "urn:dicom-org:ps3-20",
}


@dataclass
class CaseResult:
    file: Path
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks that could not run here (no CDA validators)

    @property
    def ok(self) -> bool:
        return not self.failures


def discover(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.yaml") if p.name.endswith(SUFFIXES))


def run_case(file: Path, inbound: HL7InboundMapping, mwl: MWLMapping) -> CaseResult:
    result = CaseResult(file)
    try:
        spec = load_yaml(file)
    except MappingError as exc:
        result.failures.append(str(exc))
        return result
    if not isinstance(spec, Node):
        result.failures.append(f"{file}:1: expected a mapping with input/ack/canonical/dicom")
        return result
    source = file.parent / spec.get("input", file.name.replace(".expected.yaml", ".hl7"))
    if not source.exists():
        result.failures.append(f"{file}:{line_of(spec, 'input')}: input {source.name} not found")
        return result
    ack, error, payloads = "AA", "", []
    try:
        msg = hl7.parse(hl7.decode(source.read_bytes()).text)
        payloads = inbound.map(msg)
    except hl7.HL7Error as exc:
        ack, error = ("AR" if exc.reject else "AE"), str(exc)
    except MappingFailure as exc:
        ack, error = "AE", f"{exc.location}: {exc.reason}"
    want_ack = spec.get("ack", "AA")
    if want_ack != ack:
        result.failures.append(f"{file}:{line_of(spec, 'ack')}: ack {ack} ({error or 'no error'}), expected {want_ack}")
    if "error" in spec and spec["error"] not in error:
        result.failures.append(f"{file}:{line_of(spec, 'error')}: error {error!r} lacks {spec['error']!r}")
    canonical = spec.get("canonical") or {}
    for path, want in canonical.items():
        got = _canonical_value(payloads, path)
        if str(got) != str(want):
            result.failures.append(f"{file}:{line_of(canonical, path)}: {path} = {got!r}, expected {want!r}")
    dicom = spec.get("dicom") or {}
    if dicom:
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        if not orders:
            result.failures.append(f"{file}:{line_of(spec, 'dicom')}: no order to render as a worklist item")
            return result
        _, ds = mwl.items(orders[0])[0]
        for path, want in dicom.items():
            got = _dicom_value(ds, path)
            if str(got) != str(want):
                result.failures.append(f"{file}:{line_of(dicom, path)}: {path} = {got!r}, expected {want!r}")
    return result


_STEP = re.compile(r"^(\w+)(?:\[(\d+)\])?$")


def _walk(obj: Any, path: str) -> Any:
    for part in path.split("."):
        m = _STEP.match(part)
        if not m:
            return f"<bad path part {part!r}>"
        obj = getattr(obj, m[1], None) if not isinstance(obj, dict) else obj.get(m[1])
        if m[2] is not None:
            try:
                obj = obj[int(m[2])]
            except (IndexError, TypeError, KeyError):
                return None
        if obj is None:
            return None
    return obj


def _canonical_value(payloads: list[Any], path: str) -> Any:
    index = 0
    m = re.match(r"^\[(\d+)\]\.(.*)$", path)
    if m:
        index, path = int(m[1]), m[2]
    if index >= len(payloads):
        return None
    return _walk(payloads[index], path)


def _dicom_value(ds: Any, path: str) -> Any:
    value = _walk(ds, path)
    if value is None:
        return None
    return str(value) if not isinstance(value, str) else value


def run(
    path: Path,
    inbound_path: Path | None = None,
    mwl_path: Path | None = None,
    fhir_path: Path | None = None,
    cda_path: Path | None = None,
    validator: Callable[[], Any] | None = None,
) -> list[CaseResult]:
    """Every case under ``path``. ``validator`` makes the CDA validator on first use (None: ``valid`` checks are
    skipped with a note)."""
    inbound = HL7InboundMapping(inbound_path)
    mwl = MWLMapping(mwl_path)
    files = discover(path)
    env = _Mappings(inbound, fhir_path, cda_path, validator)
    results = []
    for f in files:
        if f.name.endswith(".fhir.yaml"):
            results.append(run_fhir_case(f, env))
        elif f.name.endswith(".cda.yaml"):
            results.append(run_cda_case(f, env))
        else:
            results.append(run_case(f, inbound, mwl))
    return results


class _Mappings:
    """The mappings the FHIR and CDA cases need, loaded on first use (a broken one fails at load, file:line)."""

    def __init__(
        self,
        inbound: HL7InboundMapping,
        fhir_path: Path | None,
        cda_path: Path | None,
        validator: Callable[[], Any] | None,
    ) -> None:
        self.inbound = inbound
        self.fhir_path = fhir_path
        self.cda_path = cda_path
        self._validator_factory = validator
        self._validator: Any = None
        self._cda: Any = None

    @property
    def cda(self) -> Any:
        from traboule.translate.cda import CDAMapping

        if self._cda is None:
            self._cda = CDAMapping(self.cda_path)
        return self._cda

    def validator(self) -> Any:
        if self._validator is None and self._validator_factory is not None:
            self._validator = self._validator_factory()
        return self._validator


# -- the inbound side, as the engine runs it ----------------------------------------------------------------------


class _Inbound:
    """HL7 inputs mapped as the inbound channel maps them; reports made documents with the orders and studies seen
    before (the report publisher in a temporary store, without validation)."""

    def __init__(self, env: _Mappings, workdir: Path) -> None:
        from traboule.stores.reports import ReportPublisher

        self.env = env
        self.publisher = ReportPublisher(env.cda, workdir / "reports.sqlite")
        self.events: list[Any] = []
        self.held: list[str] = []  # why reports made no document (yet)

    def close(self) -> None:
        self.publisher.close()

    def feed(self, case: Path, item: Any) -> tuple[str, str]:
        """One input; returns (ack, error) as the channel would answer it."""
        if isinstance(item, dict):
            kind = str(item.get("kind", ""))
            if kind not in model.PAYLOAD_TYPES:
                return "AE", f"event kind {kind!r} is not one of {sorted(model.PAYLOAD_TYPES)}"
            payload = model.from_dict(model.PAYLOAD_TYPES[kind], dict(item.get("payload") or {}))
            return self._accept([payload], f"event-{len(self.events)}")
        source = case.parent / str(item)
        try:
            raw = source.read_bytes()
        except OSError as exc:
            return "AE", f"input {item}: cannot read: {exc.strerror}"
        try:
            text = hl7.decode(raw).text
            payloads = self.env.inbound.map(hl7.parse(text))
        except hl7.HL7Error as exc:
            return ("AR" if exc.reject else "AE"), str(exc)
        except MappingFailure as exc:
            return "AE", f"{exc.location}: {exc.reason}"
        return self._accept(payloads, model.content_key(str(item), text))

    def _accept(self, payloads: list[Any], key: str) -> tuple[str, str]:
        try:
            self._publish(payloads, key)
        except ReportRefused as exc:
            return "AE", f"{exc.location}: {exc.reason}" if exc.location else exc.reason
        return "AA", ""

    def _publish(self, payloads: list[Any], key: str) -> None:
        out = []
        for payload in payloads:
            if isinstance(payload, model.Report):
                payload = self.publisher.prepare(payload, key)
                if not isinstance(payload, model.Document):  # accepted, held (e.g. waiting for its study)
                    self.held.append(str(getattr(payload, "note", "") or type(payload).__name__))
                    continue
            else:
                self.publisher.remember([payload])
            out.append(payload)
        self.events.extend(out)


def _feed_all(file: Path, spec: Node, inbound: _Inbound, result: CaseResult) -> bool:
    """Every input in turn; the last one's answer is checked against ``ack`` / ``error``, the others must be AA.
    False when the case cannot go on."""
    items = spec.get("input")
    if not isinstance(items, list) or not items:
        result.failures.append(f"{file}:{line_of(spec, 'input')}: 'input' must list HL7 files and/or events")
        return False
    ack, error = "AA", ""
    for i, item in enumerate(items):
        ack, error = inbound.feed(file, item)
        if i < len(items) - 1 and ack != "AA":
            result.failures.append(f"{file}:{line_of(spec, 'input')}: input {i + 1} answered {ack}: {error}")
            return False
    want_ack = spec.get("ack", "AA")
    if want_ack != ack:
        result.failures.append(f"{file}:{line_of(spec, 'ack')}: ack {ack} ({error or 'no error'}), expected {want_ack}")
    if "error" in spec and spec["error"] not in error:
        result.failures.append(f"{file}:{line_of(spec, 'error')}: error {error!r} lacks {spec['error']!r}")
    return True


def _load_case(file: Path, result: CaseResult) -> Node | None:
    try:
        spec = load_yaml(file)
    except MappingError as exc:
        result.failures.append(str(exc))
        return None
    if not isinstance(spec, Node):
        result.failures.append(f"{file}:1: expected a mapping with input and checks")
        return None
    return spec


# -- FHIR -----------------------------------------------------------------------------------------------------


def run_fhir_case(file: Path, env: _Mappings) -> CaseResult:
    """HL7 inputs and events → the FHIR channel (its own store in a temporary folder) → checks on its resources."""
    from traboule.bus import Delivery
    from traboule.channels.fhir import FHIRChannel
    from traboule.stores.fhir_store import SEARCH_PARAMS

    result = CaseResult(file)
    spec = _load_case(file, result)
    if spec is None:
        return result
    with tempfile.TemporaryDirectory(prefix="traboule-test-") as tmp:
        inbound = _Inbound(env, Path(tmp))
        try:
            if not _feed_all(file, spec, inbound, result):
                return result
            events = inbound.events
        finally:
            inbound.close()
        mapping = str(Path(env.fhir_path).resolve()) if env.fhir_path else "mappings/fhir.yaml"
        runtime = SimpleNamespace(config=SimpleNamespace(path=""), data_dir=Path(tmp))
        channel = FHIRChannel({"name": "fhir-test", "kind": "fhir", "mapping": mapping}, runtime)
        try:
            deliveries = [
                Delivery(
                    f"{type(p).__name__.lower()}.test", model.Envelope(p).to_json(), f"e{i}", {"journal-id": str(i)}
                )
                for i, p in enumerate(events, start=1)
            ]
            if deliveries:
                asyncio.run(channel.handle(deliveries))
            resources: dict[str, list[dict[str, Any]]] = {}
            for rtype in SEARCH_PARAMS:
                resources[rtype] = channel.store.search(rtype, {}, count=1000)[1]
        finally:
            channel.store.close()
    checks = spec.get("resources") or {}
    if not isinstance(checks, dict):
        result.failures.append(f"{file}:{line_of(spec, 'resources')}: 'resources' must be a mapping")
        return result
    for key, want in checks.items():
        where = f"{file}:{line_of(checks, key)}"
        if isinstance(want, dict):
            m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", key)
            if not m:
                result.failures.append(f"{where}: {key!r}: expected a resource type, e.g. Patient or Patient[1]")
                continue
            found = resources.get(m[1], [])
            index = int(m[2] or 0)
            if index >= len(found):
                result.failures.append(f"{where}: {key}: the case made {len(found)} {m[1]} resource(s)")
                continue
            for pointer, value in want.items():
                got = json_pointer(found[index], pointer)
                if not _same(got, value):
                    line = line_of(want, pointer)
                    result.failures.append(f"{file}:{line}: {key} {pointer} = {_shown(got)}, expected {value!r}")
            continue
        try:
            got = fhirpath(resources, key)
        except ValueError as exc:
            result.failures.append(f"{where}: {key}: {exc}")
            continue
        if not _same(got, want):
            result.failures.append(f"{where}: {key} = {_shown(got)}, expected {want!r}")
    return result


_MISSING = object()


def json_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901: ``/identifier/0/system``; a missing element gives ``_MISSING``."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        return _MISSING
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and token in doc:
            doc = doc[token]
        elif isinstance(doc, list) and token.isdigit() and int(token) < len(doc):
            doc = doc[int(token)]
        else:
            return _MISSING
    return doc


_FUNCTIONS = {"first", "last", "count", "exists", "empty"}


def fhirpath(resources: dict[str, list[dict[str, Any]]], expression: str) -> list[Any]:
    """A small FHIRPath subset: ``Type.element.element``, ``[n]`` (``Type[n]``: the n-th resource),
    ``where(path = 'literal')`` (``!=`` too), ``first()``, ``last()``, ``count()``, ``exists()``, ``empty()``.
    Raises ``ValueError`` for anything else."""
    parts = _split(expression)
    root = re.fullmatch(r"([A-Z]\w*)(?:\[(\d+)\])?", parts[0]) if parts else None
    if root is None:
        raise ValueError("a FHIRPath here starts with a resource type (Patient.identifier...)")
    collection: list[Any] = list(resources.get(root[1], []))
    if root[2] is not None:
        collection = collection[int(root[2]) : int(root[2]) + 1]
    for part in parts[1:]:
        collection = _step(collection, part)
    return collection


def _split(expression: str) -> list[str]:
    """Split on dots outside quotes and parentheses."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(expression):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "." and depth == 0:
            parts.append(expression[start:i])
            start = i + 1
    parts.append(expression[start:])
    return [p.strip() for p in parts]


def _step(collection: list[Any], part: str) -> list[Any]:
    m = re.fullmatch(r"where\((.+?)\s*(!=|=)\s*('[^']*'|\"[^\"]*\"|[\w.+-]+)\s*\)", part)
    if m:
        path, op, literal = m[1].strip(), m[2], m[3].strip("'\"")
        kept = []
        for item in collection:
            values = [item]
            for name in _split(path):
                values = _step(values, name)
            hit = any(_same(v, literal) for v in values)
            if hit == (op == "="):
                kept.append(item)
        return kept
    m = re.fullmatch(r"(\w+)\((.*)\)", part)
    if m:
        if m[1] not in _FUNCTIONS or m[2].strip():
            supported = ", ".join(f"{f}()" for f in sorted(_FUNCTIONS))
            raise ValueError(f"function {m[1]}() is not supported (only where(path = 'value'), {supported})")
        return {
            "first": collection[:1],
            "last": collection[-1:],
            "count": [len(collection)],
            "exists": [bool(collection)],
            "empty": [not collection],
        }[m[1]]
    m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
    if not m:
        raise ValueError(f"{part!r} is not supported (elements, [n], where(path = 'value'), first(), count()...)")
    out: list[Any] = []
    for item in collection:
        value = item.get(m[1]) if isinstance(item, dict) else None
        if isinstance(value, list):
            out.extend(value)
        elif value is not None:
            out.append(value)
    if m[2] is not None:
        index = int(m[2])
        out = out[index : index + 1]
    return out


def _render(value: Any) -> str:
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _same(got: Any, want: Any) -> bool:
    """``got`` (a value, or a collection of them) equals the YAML text ``want``; empty matches '' (or null)."""
    if isinstance(got, list) and not isinstance(want, list):
        if len(got) > 1:
            return False
        got = got[0] if got else _MISSING
    if isinstance(want, list):
        items = got if isinstance(got, list) else [got]
        return len(items) == len(want) and all(_same(g, w) for g, w in zip(items, want, strict=True))
    if isinstance(got, dict | list):
        return False
    return _render(got) == str(want)


def _shown(got: Any) -> str:
    if got is _MISSING:
        return "(absent)"
    if isinstance(got, list):
        if not got:
            return "(empty)"
        if len(got) == 1:
            return repr(_render(got[0]) if not isinstance(got[0], dict | list) else got[0])
        return repr([_render(g) if not isinstance(g, dict | list) else g for g in got])
    return repr(_render(got)) if not isinstance(got, dict) else repr(got)


# -- CDA ------------------------------------------------------------------------------------------------------


def run_cda_case(file: Path, env: _Mappings) -> CaseResult:
    """HL7 inputs and events → the report publisher → XPath checks on the last published CDA (+ the validators)."""
    result = CaseResult(file)
    spec = _load_case(file, result)
    if spec is None:
        return result
    with tempfile.TemporaryDirectory(prefix="traboule-test-") as tmp:
        inbound = _Inbound(env, Path(tmp))
        try:
            if not _feed_all(file, spec, inbound, result):
                return result
            documents = [e for e in inbound.events if isinstance(e, model.Document)]
            held = inbound.held
        finally:
            inbound.close()
    checks = spec.get("xpath") or {}
    wants_valid = str(spec.get("valid", "")).lower() == "true"
    if not documents:
        if checks or wants_valid:
            why = f" (held: {'; '.join(held)})" if held else ""
            result.failures.append(f"{file}:{line_of(spec, 'input')}: the inputs published no document{why}")
        return result
    data = base64.b64decode(documents[-1].content)
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    if not isinstance(checks, dict):
        result.failures.append(f"{file}:{line_of(spec, 'xpath')}: 'xpath' must be a mapping")
        checks = {}
    for expression, want in checks.items():
        where = f"{file}:{line_of(checks, expression)}"
        try:
            got = root.xpath(expression, namespaces=XPATH_NAMESPACES)
        except etree.XPathError as exc:
            result.failures.append(f"{where}: {expression}: not an XPath 1.0 expression ({exc})")
            continue
        if isinstance(got, list):
            got = [" ".join("".join(g.itertext()).split()) if isinstance(g, etree._Element) else str(g) for g in got]
        if not _same(got, want):
            result.failures.append(f"{where}: {expression} = {_shown(got)}, expected {want!r}")
    if wants_valid:
        validator = env.validator()
        if validator is None:
            result.notes.append(
                f"{file}:{line_of(spec, 'valid')}: 'valid' not checked: no CI-SIS validators "
                "(set TRABOULE_CDA_VALIDATORS to a testContenuCDA tree)"
            )
        else:
            report = validator.validate(data, source=f"{file.name} ({documents[-1].id})")
            if not report.valid:
                problems = report.summary().splitlines()
                result.failures.append(f"{file}:{line_of(spec, 'valid')}: not valid: " + "; ".join(problems[:6]))
    return result
