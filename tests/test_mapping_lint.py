"""Mapping files are checked at load for what would otherwise fail silently at every message: a segment no HL7
version defines, a misspelt DICOM keyword, an attribute in the wrong level of a worklist item (PS3.4 K.6-1)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from traboule.dicom_mapping import SPS_ITEM, MWLMapping
from traboule.hl7_mapping import HL7InboundMapping
from traboule.mapping import MappingError


@pytest.fixture
def mappings(tmp_path: Path) -> Path:
    """A copy of the shipped mappings (their tables beside them) to break."""
    return Path(shutil.copytree(ROOT / "mappings", tmp_path / "mappings"))


def edit(path: Path, old: str, new: str) -> int:
    """Replace the first ``old`` in the file; the line it was on (1-based)."""
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return line


def load_error(loader: type, path: Path) -> MappingError:
    with pytest.raises(MappingError) as caught:
        loader(path)
    return caught.value


def test_shipped_mappings_pass_the_lint() -> None:
    HL7InboundMapping()
    MWLMapping()


def test_unknown_segment_is_refused_with_the_closest_names(mappings: Path) -> None:
    inbound = mappings / "hl7_inbound.yaml"
    line = edit(inbound, "PV1-19", "PVI-19")
    error = load_error(HL7InboundMapping, inbound)
    assert (error.file, error.line) == (str(inbound), line)
    assert (
        error.reason
        == "PVI is not an HL7 v2 segment (did you mean PV1 or PV2 or PID?); a site's own segments start with Z"
    )


def test_unknown_segment_in_an_each_block_is_refused(mappings: Path) -> None:
    inbound = mappings / "hl7_inbound.yaml"
    line = edit(inbound, "each: IPC", "each: IPX")
    error = load_error(HL7InboundMapping, inbound)
    assert error.line == line and error.reason.startswith("IPX is not an HL7 v2 segment")


def test_z_segments_and_segments_of_other_versions_are_accepted(mappings: Path) -> None:
    inbound = mappings / "hl7_inbound.yaml"
    edit(inbound, "PV1-19", "ZPV-19")  # a site's own segment
    edit(inbound, "PV1-2", "PRT-2")  # Participation Information: HL7 v2.7, not v2.5
    loaded = HL7InboundMapping(inbound)
    sources = [s.location for rule in loaded.report[0] for s in rule.sources]
    assert "PRT-2" in sources


def test_misspelt_dicom_keyword_gets_a_suggestion(mappings: Path) -> None:
    mwl = mappings / "mwl.yaml"
    line = edit(mwl, "  PatientBirthDate:", "  PatientBirthDat:")
    error = load_error(MWLMapping, mwl)
    assert error.line == line
    assert error.reason == "'PatientBirthDat' is not a DICOM keyword (did you mean 'PatientBirthDate'?)"


def test_misspelt_keyword_in_the_step_item_suggests_a_step_attribute(mappings: Path) -> None:
    mwl = mappings / "mwl.yaml"
    edit(mwl, "      ScheduledStationName:", "      ScheduledStatoinName:")
    error = load_error(MWLMapping, mwl)
    assert error.reason == "'ScheduledStatoinName' is not a DICOM keyword (did you mean 'ScheduledStationName'?)"


def test_top_level_attribute_inside_the_step_item_is_refused(mappings: Path) -> None:
    mwl = mappings / "mwl.yaml"
    line = edit(mwl, "      ScheduledStationName:", "      StationName:")
    error = load_error(MWLMapping, mwl)
    assert error.line == line
    assert error.reason == (
        "StationName is not a Scheduled Procedure Step attribute: it does not go in a ScheduledProcedureStepSequence "
        "item (did you mean 'ScheduledStationName'?) (PS3.4 Table K.6-1)"
    )


def test_step_attribute_at_the_top_level_is_refused(mappings: Path) -> None:
    mwl = mappings / "mwl.yaml"
    line = edit(
        mwl, "  InstitutionName: order.institution\n", "  InstitutionName: order.institution\n  Modality: =CT\n"
    )
    error = load_error(MWLMapping, mwl)
    assert error.line == line + 1
    assert error.reason.startswith("Modality is a Scheduled Procedure Step attribute: put it in the")


def test_nested_sequences_of_the_step_item_are_not_held_to_its_list(mappings: Path) -> None:
    """CodeValue is no step attribute, but inside ScheduledProtocolCodeSequence it is where it belongs."""
    loaded = MWLMapping(mappings / "mwl.yaml")
    (sps,) = [rule for rule in loaded.attrs if rule.keyword == "ScheduledProcedureStepSequence"]
    (protocol,) = [rule for rule in sps.items[0].attrs if rule.keyword == "ScheduledProtocolCodeSequence"]
    assert "CodeValue" not in SPS_ITEM
    assert [a.keyword for a in protocol.items[0].attrs] == ["CodeValue", "CodingSchemeDesignator", "CodeMeaning"]


def test_step_item_keywords_are_dicom_keywords() -> None:
    from pydicom.datadict import tag_for_keyword

    assert all(tag_for_keyword(k) is not None for k in SPS_ITEM)


def test_traboule_check_reports_file_and_line(mappings: Path, tmp_path: Path) -> None:
    inbound, mwl = mappings / "hl7_inbound.yaml", mappings / "mwl.yaml"
    in_line = edit(inbound, "PV1-19", "PVI-19")
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path / "var"}"

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{adapter = "mllp-listener", host = "127.0.0.1", port = 0}}
mapping = "{inbound}"

[[channels]]
name = "worklist"
kind = "worklist"
mapping = "{mwl}"
destinations = []
"""
    )

    def check() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "traboule.cli", "--config", str(config), "check"]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=60)

    out = check()
    assert out.returncode == 2
    assert f"mapping error: {inbound}:{in_line}: PVI is not an HL7 v2 segment" in out.stderr
    edit(inbound, "PVI-19", "PV1-19")
    sps_line = edit(mwl, "      ScheduledStationName:", "      StationName:")
    out = check()
    assert out.returncode == 2
    assert f"mapping error: {mwl}:{sps_line}: StationName is not a Scheduled Procedure Step attribute" in out.stderr
