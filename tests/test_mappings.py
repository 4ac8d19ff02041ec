"""Mapping files: the shipped ones and their file tests, and what a broken file reports."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, shared_path
from traboule.app.mapping_tests import fhirpath, json_pointer, run
from traboule.formats import hl7
from traboule.model import ImagingOrder
from traboule.translate.cda import CDAMapping
from traboule.translate.dicom_mapping import MWLMapping
from traboule.translate.fhir_mapping import IDENTITY_STATUS_SYSTEM, INS_USES, FHIRMapping
from traboule.translate.hl7_mapping import HL7InboundMapping, MappingFailure
from traboule.translate.mapping import MappingError

MAPPINGS = ROOT / "mappings"


def test_shipped_mapping_tests_pass() -> None:
    results = run(MAPPINGS / "tests")
    assert len(results) >= 5
    assert [f for r in results for f in r.failures] == []
    names = [r.file.name for r in results]
    assert sum(n.endswith(".fhir.yaml") for n in names) >= 3 and sum(n.endswith(".cda.yaml") for n in names) >= 2
    # Without validators, a 'valid' check is a note, not a pass.
    assert [n for r in results for n in r.notes if "'valid' not checked: no CI-SIS validators" in n]


def test_cda_cases_are_checked_by_the_ci_sis_validators(tmp_path: Path, cda_validator: Any) -> None:
    """The shipped CDA cases pass the ANS validators; a case whose document fails them fails with their message."""
    from traboule.formats.cda_validation import CDAValidator

    cases = tmp_path / "cases"
    shutil.copytree(MAPPINGS / "tests", cases)
    skeleton = shared_path("standards", "derived", "skeleton_IMG-CR-IMG_N1_minimal.xml").read_text(encoding="utf-8")
    start, end = skeleton.index("<legalAuthenticator>"), skeleton.index("</legalAuthenticator>")
    broken = skeleton[:start] + skeleton[end + len("</legalAuthenticator>") :]
    attachment = base64.b64encode(broken.encode()).decode()
    (cases / "ready_cda.cda.yaml").write_text(
        "input:\n"
        "  - kind: Report                  # a ready CDA sent by the RIS: published as it is\n"
        f"    payload: {{accession_number: {{value: ACC0300}}, attachment_type: text/xml, attachment: {attachment}}}\n"
        "valid: true\n"
    )
    made: list[CDAValidator] = []

    def validator() -> CDAValidator:
        made.append(cda_validator)  # the run's one validator: compiling the schematrons takes seconds
        return made[-1]

    results = {r.file.name: r for r in run(cases, validator=validator)}
    assert len(made) == 1  # made on first use, once for the run
    bad = results.pop("ready_cda.cda.yaml")
    (failure,) = bad.failures
    assert failure.startswith(f"{cases / 'ready_cda.cda.yaml'}:4: not valid: FAIL ready_cda.cda.yaml (")
    assert "hl7:legalAuthenticator[hl7:signatureCode[@code = 'S']] is required" in failure
    assert [f for r in results.values() for f in r.failures] == []
    assert [n for r in results.values() for n in r.notes] == []
    assert len([n for n in results if n.endswith(".cda.yaml")]) >= 2


def test_fhir_and_cda_cases_report_the_failing_check_with_file_and_line(tmp_path: Path) -> None:
    for name in ("orm_o01_nw_latin1.hl7", "oru_r01_pdf.hl7"):
        shutil.copy(MAPPINGS / "tests" / name, tmp_path / name)
    (tmp_path / "case.fhir.yaml").write_text(
        "input: [orm_o01_nw_latin1.hl7]\n"
        "resources:\n"
        "  Patient:\n"
        "    /gender: male\n"
        "  ServiceRequest.status: revoked\n"
        "  Patient.identifier.where(system='urn:oid:1.2.250.1.999.1.1').value: IPP0001\n"
        "  Patient.name.select(family): x\n"
        "  ImagingStudy[0]:\n"
        "    /status: available\n"
    )
    (tmp_path / "case.cda.yaml").write_text(
        "input:\n"
        "  - oru_r01_pdf.hl7\n"
        "xpath:\n"
        "  //hl7:nonXMLBody/hl7:text/@mediaType: text/plain\n"
        "  //hl7:inFulfillmentOf//ps3-20:accessionNumber/@extension: ACC0002\n"
        "  //hl7:title[: x\n"
        "valid: true\n"
    )
    (tmp_path / "missing.cda.yaml").write_text("input: [nowhere.hl7]\nxpath: {count(//*): '1'}\n")
    env = {k: v for k, v in os.environ.items() if k != "TRABOULE_CDA_VALIDATORS"}
    out = subprocess.run(
        [sys.executable, "-m", "traboule.app.cli", "test", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 1
    fhir, cda = tmp_path / "case.fhir.yaml", tmp_path / "case.cda.yaml"
    assert f"FAIL {fhir}" in out.stdout and f"FAIL {cda}" in out.stdout
    assert f"{fhir}:4: Patient /gender = 'female', expected 'male'" in out.stdout
    assert f"{fhir}:5: ServiceRequest.status = 'active', expected 'revoked'" in out.stdout
    assert "Patient.identifier.where" not in out.stdout  # that check passes
    assert f"{fhir}:7: Patient.name.select(family): function select() is not supported" in out.stdout
    assert f"{fhir}:8: ImagingStudy[0]: the case made 0 ImagingStudy resource(s)" in out.stdout
    assert f"{cda}:4: //hl7:nonXMLBody/hl7:text/@mediaType = 'application/pdf', expected 'text/plain'" in out.stdout
    assert "accessionNumber" not in out.stdout
    assert f"{cda}:6: //hl7:title[: not an XPath 1.0 expression" in out.stdout
    assert f"note: {cda}:7: 'valid' not checked: no CI-SIS validators" in out.stdout
    assert f"{tmp_path / 'missing.cda.yaml'}:1: ack AE (input nowhere.hl7: cannot read" in out.stdout
    assert "0 passed, 3 failed" in out.stdout
    assert "fhir.applied" not in out.stdout  # the channel's log lines stay off the results


def test_fhirpath_subset() -> None:
    resources = {
        "Patient": [
            {"identifier": [{"system": "a", "value": "1"}, {"system": "b", "value": "2"}], "active": False},
            {"identifier": [{"system": "a", "value": "3"}], "active": True},
        ]
    }
    assert fhirpath(resources, "Patient.identifier.where(system='b').value") == ["2"]
    assert fhirpath(resources, "Patient.identifier.where(system != 'b').value") == ["1", "3"]
    assert fhirpath(resources, "Patient.where(identifier.value='3').active") == [True]
    assert fhirpath(resources, "Patient.identifier.value.first()") == ["1"]
    assert fhirpath(resources, "Patient.identifier.count()") == [3]
    assert fhirpath(resources, "Patient[1].identifier.value") == ["3"]  # [n] indexes the collection it follows
    assert fhirpath(resources, "Patient.identifier[2].value") == ["3"]
    assert fhirpath(resources, "ServiceRequest.exists()") == [False]
    assert json_pointer(resources["Patient"][0], "/identifier/1/value") == "2"
    with pytest.raises(ValueError, match="starts with a resource type"):
        fhirpath(resources, "identifier.value")


def test_traboule_test_command_reports_failures_with_file_and_line(tmp_path: Path) -> None:
    shutil.copy(MAPPINGS / "tests" / "orm_o01_nw_latin1.hl7", tmp_path / "case.hl7")
    (tmp_path / "case.expected.yaml").write_text("ack: AA\ncanonical:\n  accession_number.value: WRONG\n")
    out = subprocess.run(
        [sys.executable, "-m", "traboule.app.cli", "test", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 1
    assert "case.expected.yaml:3: accession_number.value = 'ACC0001', expected 'WRONG'" in out.stdout
    assert "0 passed, 1 failed" in out.stdout


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    target = tmp_path / "hl7_inbound.yaml"
    shutil.copytree(MAPPINGS / "tables", tmp_path / "tables")
    text = (MAPPINGS / "hl7_inbound.yaml").read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    return target


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("value: {from: [IPC-1.1, OBR-18]", "value: {from: [IPC-1.1, OBR18]", "not an HL7 field"),
        ("requested_procedure_id:", "requested_procedure_idd:", "not one of"),
        ("birth_date: PID-7 | date", "birth_date: PID-7 | dat", "unknown filter or table"),
        ("sex: PID-8 | sex", "sex: {from: PID-8, tabel: sex}", "unknown option"),
        ("ORM^O01: order", "ORM^O01: orders", "kind 'orders'"),
    ],
)
def test_broken_inbound_mapping_names_file_line_and_reason(tmp_path: Path, old: str, new: str, reason: str) -> None:
    path = _broken(tmp_path, old, new)
    with pytest.raises(MappingError) as exc:
        HL7InboundMapping(path)
    assert exc.value.file == str(path)
    assert exc.value.line == _line_of(path, new)
    assert reason in exc.value.reason


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = _broken(tmp_path, "  name.given: {from: PID-5.2,", "  name.given: {from: [PID-5.2,")
    with pytest.raises(MappingError) as exc:
        HL7InboundMapping(path)
    assert "YAML syntax" in exc.value.reason
    assert exc.value.line >= _line_of(path, "name.given")


def test_broken_table_csv_names_the_csv(tmp_path: Path) -> None:
    path = _broken(tmp_path, "x", "x")
    (tmp_path / "tables" / "priority.csv").write_text("hl7,dicom\nS,STAT,EXTRA\n")
    with pytest.raises(MappingError) as exc:
        HL7InboundMapping(path)
    assert exc.value.file.endswith("priority.csv") and exc.value.line == 2


def test_bad_dicom_keyword_in_mwl_mapping(tmp_path: Path) -> None:
    text = (MAPPINGS / "mwl.yaml").read_text().replace("AccessionNumber:", "AccesionNumber:", 1)
    path = tmp_path / "mwl.yaml"
    path.write_text(text)
    with pytest.raises(MappingError) as exc:
        MWLMapping(path)
    assert "not a DICOM keyword" in exc.value.reason
    assert exc.value.line == _line_of(path, "AccesionNumber:")


def test_bad_canonical_path_in_mwl_mapping(tmp_path: Path) -> None:
    text = (MAPPINGS / "mwl.yaml").read_text().replace("order.accession_number.value", "order.accesion.value", 1)
    path = tmp_path / "mwl.yaml"
    path.write_text(text)
    with pytest.raises(MappingError) as exc:
        MWLMapping(path)
    assert "has no attribute 'accesion'" in exc.value.reason


def test_integrator_moves_accession_number_to_orc2(tmp_path: Path) -> None:
    path = _broken(
        tmp_path, "accession_number.value: {from: [IPC-1.1, OBR-18], max: 16}", "accession_number.value: ORC-2.1"
    )
    mapping = HL7InboundMapping(path)
    msg = hl7.parse(hl7.decode((MAPPINGS / "tests" / "orm_o01_nw_latin1.hl7").read_bytes()).text)
    (order,) = mapping.map(msg)
    assert isinstance(order, ImagingOrder)
    assert order.accession_number.value == "PLC0001"


def test_integrator_maps_local_procedure_code_to_modality(tmp_path: Path) -> None:
    path = _broken(tmp_path, "x", "x")
    (tmp_path / "tables" / "procedure_modality.csv").write_text("procedure_code,modality\nCTTAP,CT\n")
    mapping = HL7InboundMapping(path)
    text = (MAPPINGS / "tests" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1")
    text = text.replace("|CT|||1^once", "||||1^once")  # no OBR-24: the procedure code decides
    (order,) = mapping.map(hl7.parse(text))
    assert order.steps[0].modality == "CT"


def test_unknown_order_control_is_ae_with_table_error() -> None:
    mapping = HL7InboundMapping()
    text = (MAPPINGS / "tests" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1").replace("ORC|NW|", "ORC|ZZ|")
    with pytest.raises(MappingFailure) as exc:
        mapping.map(hl7.parse(text))
    assert exc.value.code == "103" and exc.value.location == "ORC-1"


def test_corpus_orders_map_to_worklist_items() -> None:
    """Every corpus order the default mapping accepts renders to a worklist item; the refusals are the expected
    ones (ORC-1 SN, "send order number", is not an order the worklist can act on; an identifier too long for DICOM)."""
    mapping, mwl = HL7InboundMapping(), MWLMapping()
    rendered, refused = 0, {}
    for path in sorted(shared_path("corpus", "hl7v2").iterdir()):
        msg = hl7.parse(hl7.decode(path.read_bytes()).text)
        if mapping.kind_of(msg) != "order":
            continue
        try:
            payloads = mapping.map(msg)
        except MappingFailure as exc:
            refused[path.name] = exc.location
            continue
        for order in payloads:
            for _, ds in mwl.items(order):
                assert ds.PlacerOrderNumberImagingServiceRequest or ds.AccessionNumber, path.name
                assert ds.SpecificCharacterSet in ("ISO_IR 100", "ISO_IR 192")
                rendered += 1
    # dcm4che's sample fills IPC-4 (a step id, DICOM SH) with the 19-character "ScheduledProcStepID": a cut id
    # could be another step's, so it is refused.
    assert refused == {"lfh_ORM_O01_v23_DWI_LF.hl7": "ORC-1", "dcm4che_OMI_O23-ImagingOrder.hl7": "IPC-4.1"}
    assert rendered == 7


# -- optional sections --------------------------------------------------------------------------------------------


def _without(text: str, key: str, replacement: str = "") -> str:
    """A mapping file's text with its top-level section ``key`` (its line and the lines under it) replaced."""
    lines = text.splitlines(keepends=True)
    start = next(n for n, line in enumerate(lines) if line.startswith(f"{key}:"))
    end = next((n for n in range(start + 1, len(lines)) if lines[n][:1].isalpha()), len(lines))
    return "".join([*lines[:start], replacement, *lines[end:]])


def _mapping_copy(tmp_path: Path, name: str, text: str) -> Path:
    if not (tmp_path / "tables").exists():
        shutil.copytree(MAPPINGS / "tables", tmp_path / "tables")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


LOADERS = {
    "fhir.yaml": FHIRMapping,
    "cda.yaml": CDAMapping,
    "hl7_inbound.yaml": HL7InboundMapping,
    "mwl.yaml": MWLMapping,
}
OPTIONAL = [
    *(("fhir.yaml", k) for k in ("kind", "version", "timezone", "identifiers", "codes", "fr_core")),
    *(("cda.yaml", k) for k in ("kind", "version", "timezone", "custodian", "practitioner_id", "image_link")),
    *(("hl7_inbound.yaml", k) for k in ("kind", "version", "steps", "merge")),
    *(("mwl.yaml", k) for k in ("kind", "version")),
]


def test_a_minimal_fhir_mapping_is_its_tables_alone(tmp_path: Path) -> None:
    """Every section of fhir.yaml but ``tables`` is optional: left out, its defaults apply."""
    text = (MAPPINGS / "fhir.yaml").read_text(encoding="utf-8")
    tables = text[text.index("tables:") :].split("\n\n")[0]
    mapping = FHIRMapping(_mapping_copy(tmp_path, "fhir.yaml", tables + "\n"))
    assert mapping.timezone is None and mapping.local_code_system == ""
    assert mapping.identity_status_system == IDENTITY_STATUS_SYSTEM and mapping.ins_uses == INS_USES
    message = hl7.parse(hl7.decode((ROOT / "fixtures/hl7/orm_o01_nw_latin1.hl7").read_bytes()).text)
    (order,) = HL7InboundMapping().map(message)
    assert isinstance(order, ImagingOrder)
    patient = mapping.patient(order.patient)
    assert patient["identifier"][0]["value"] == "IPP0001" and patient["meta"]["profile"]
    assert mapping.service_request(order, f"Patient/{patient['id']}")["status"] == "active"


@pytest.mark.parametrize(("name", "key"), OPTIONAL)
def test_an_optional_section_may_be_left_out(tmp_path: Path, name: str, key: str) -> None:
    text = (MAPPINGS / name).read_text(encoding="utf-8")
    LOADERS[name](_mapping_copy(tmp_path, name, _without(text, key)))
    if name == "fhir.yaml" and key != "kind":  # fhir.yaml: an empty section is one left out
        FHIRMapping(_mapping_copy(tmp_path, name, _without(text, key, f"{key}:\n")))


@pytest.mark.parametrize(
    ("name", "key", "at_its_line"),
    [
        *(("fhir.yaml", k, True) for k in ("tables", "timezone", "identifiers", "codes", "fr_core")),
        ("cda.yaml", "timezone", True),
        *(("hl7_inbound.yaml", k, True) for k in ("steps", "merge")),
        # a scalar has no line of its own: these loaders name the file
        *(("cda.yaml", k, False) for k in ("tables", "custodian")),
        ("hl7_inbound.yaml", "tables", False),
    ],
)
def test_a_section_of_the_wrong_shape_is_a_mapping_error(
    tmp_path: Path, name: str, key: str, at_its_line: bool
) -> None:
    text = (MAPPINGS / name).read_text(encoding="utf-8")
    for wrong in ("[1, 2]", "7"):
        path = _mapping_copy(tmp_path, name, _without(text, key, f"{key}: {wrong}\n"))
        with pytest.raises(MappingError) as exc:
            LOADERS[name](path)
        assert exc.value.file == str(path), exc.value
        if at_its_line:
            assert exc.value.line == _line_of(path, f"{key}: {wrong}"), exc.value


def test_check_reports_a_wrong_fhir_section_with_file_and_line(tmp_path: Path) -> None:
    """``traboule check`` loads a minimal fhir.yaml; a section of the wrong shape is one line naming file and line,
    never a traceback."""
    text = (MAPPINGS / "fhir.yaml").read_text(encoding="utf-8")
    path = _mapping_copy(tmp_path, "fhir.yaml", _without(text, "codes"))
    config = tmp_path / "traboule.toml"
    config.write_text(f'[engine]\ndefaults = false\n\n[[channels]]\nname = "fhir"\nkind = "fhir"\nmapping = "{path}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    env["TRABOULE_DATA_DIR"] = str(tmp_path / "var")
    command = [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "check"]
    ok = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "fhir" in ok.stdout
    for broken in ("codes: [1, 2]\n", "fr_core: ~\ntimezone: [Europe/Paris]\n"):
        path.write_text(_without(text, "codes", broken), encoding="utf-8")
        refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        needle = broken.splitlines()[-1]
        assert f"{path}:{_line_of(path, needle)}: " in refused.stderr, refused.stderr
