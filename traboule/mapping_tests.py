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

Run with ``traboule test [PATH]``; the test suite runs the same files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traboule import hl7
from traboule.dicom_mapping import MWLMapping
from traboule.hl7_mapping import HL7InboundMapping, MappingFailure
from traboule.mapping import MappingError, Node, line_of, load_yaml
from traboule.model import ImagingOrder


@dataclass
class CaseResult:
    file: Path
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def discover(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("*.expected.yaml"))


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


def run(path: Path, inbound_path: Path | None = None, mwl_path: Path | None = None) -> list[CaseResult]:
    inbound = HL7InboundMapping(inbound_path)
    mwl = MWLMapping(mwl_path)
    return [run_case(f, inbound, mwl) for f in discover(path)]
