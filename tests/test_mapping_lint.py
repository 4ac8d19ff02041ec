"""Mapping files are checked at load for what would otherwise fail silently at every message: a segment no HL7
version defines, a misspelt DICOM keyword, an attribute in the wrong level of a worklist item (PS3.4 K.6-1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from traboule.translate.cda import CDAMapping
from traboule.translate.dicom_mapping import SPS_ITEM, MWLMapping
from traboule.translate.hl7_mapping import HL7InboundMapping
from traboule.translate.mapping import MappingError


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
        command = [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "check"]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=60)

    out = check()
    assert out.returncode == 2
    assert f"mapping error: {inbound}:{in_line}: PVI is not an HL7 v2 segment" in out.stderr
    edit(inbound, "PVI-19", "PV1-19")
    sps_line = edit(mwl, "      ScheduledStationName:", "      StationName:")
    out = check()
    assert out.returncode == 2
    assert f"mapping error: {mwl}:{sps_line}: StationName is not a Scheduled Procedure Step attribute" in out.stderr


# --- values of the wrong shape: each is a MappingError naming file and line, never another exception ------------

WRONG_SHAPES = {"a list": "[1]", "a mapping": "{a: 1}", "a number": "7", "null": "~"}
_ENTRY = re.compile(r"^(?P<lead> *(?:- )?)(?P<key>[A-Za-z_]\w*):(?: |$)")


def entries(text: str, *, within: str = "", top_level: bool = False) -> list[tuple[int, str]]:
    """(line, key) of every ``key:`` of a YAML file (after the top-level ``within:`` line when given)."""
    lines = text.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(f"{within}:")) + 1 if within else 0
    found = [(n + 1, m) for n, line in enumerate(lines) if n >= start and (m := _ENTRY.match(line))]
    return [(n, m["key"]) for n, m in found if not (top_level and m["lead"])]


def replace_entry(text: str, line: int, value: str) -> str:
    """The file with the value of the entry at ``line`` (the lines indented under it too) replaced by ``value``,
    on that line: every line after it keeps its place relative to the next entry."""
    lines = text.splitlines()
    match = _ENTRY.match(lines[line - 1])
    assert match is not None
    end, column = line, len(match["lead"])
    while end < len(lines) and (
        not lines[end].strip()
        or lines[end].lstrip().startswith("#")
        or len(lines[end]) - len(lines[end].lstrip()) > column
    ):
        end += 1
    return "\n".join([*lines[: line - 1], f"{match['lead']}{match['key']}: {value}", *lines[end:]]) + "\n"


def shape_errors(
    loader: type, path: Path, targets: list[tuple[int, str]]
) -> dict[tuple[str, int, str], MappingError | None]:
    """Load the file once per entry and wrong shape: (key, line, shape) → the MappingError, or None if it loaded."""
    text = path.read_text(encoding="utf-8")
    out: dict[tuple[str, int, str], MappingError | None] = {}
    try:
        for line, key in targets:
            for shape, value in WRONG_SHAPES.items():
                path.write_text(replace_entry(text, line, value), encoding="utf-8")
                try:
                    loader(path)
                    out[(key, line, shape)] = None
                except MappingError as exc:  # anything else fails the test with its traceback
                    assert exc.file == str(path) and exc.line > 0, (key, shape, exc)
                    out[(key, line, shape)] = exc
    finally:
        path.write_text(text, encoding="utf-8")
    return out


def test_every_mwl_rule_of_the_wrong_shape_is_refused_at_its_line(mappings: Path) -> None:
    """A list, a mapping, a number or null where ``mwl.yaml`` wants a path, a literal or a list of items (``if:
    [1]`` among them) is refused on that entry's line."""
    mwl = mappings / "mwl.yaml"
    targets = entries(mwl.read_text(encoding="utf-8"), within="attributes")
    assert len(targets) > 50 and sum(key == "if" for _, key in targets) >= 4
    errors = shape_errors(MWLMapping, mwl, targets)
    assert [k for k, e in errors.items() if e is None] == []
    assert [(k, e.line) for k, e in errors.items() if e and e.line != k[1]] == []
    first_if = next(line for line, key in targets if key == "if")
    error = errors[("if", first_if, "a list")]
    assert error and error.reason == "expected a canonical path (order.* or step.*), not a list"


def test_mwl_sections_of_the_wrong_shape_are_refused_at_their_line(mappings: Path) -> None:
    mwl = mappings / "mwl.yaml"
    text = mwl.read_text(encoding="utf-8")
    line = edit(mwl, "version: 1", "version: [1]")
    assert load_error(MWLMapping, mwl).line == line
    mwl.write_text(text.replace("version: 1", "version: 1\ntables: 7"), encoding="utf-8")
    error = load_error(MWLMapping, mwl)
    assert (error.line, error.reason) == (line + 1, "'tables' must map names to CSV files")


# What a plain value may mean where the loader takes it: a version is any text, an empty custodian is the
# organization, a number is a (strange) pattern or link, an empty image link is no link.
CDA_LOADS = {
    ("version", "a number"),
    ("version", "null"),
    ("custodian", "null"),
    ("practitioner_id", "a number"),
    ("image_link", "a number"),
    ("image_link", "null"),
}
HL7_LOADS = {("kind", "a number"), ("kind", "null"), ("version", "a number"), ("version", "null")}


@pytest.mark.parametrize(
    ("name", "loader", "loads", "elsewhere"),
    [
        ("cda.yaml", CDAMapping, CDA_LOADS, {}),
        # No tables: the first rule naming one is refused, on its own line.
        ("hl7_inbound.yaml", HL7InboundMapping, HL7_LOADS, {("tables", "null"): "unknown filter or table 'sex'"}),
    ],
)
def test_top_level_sections_of_the_wrong_shape_are_refused_at_their_line(
    mappings: Path, name: str, loader: type, loads: set[tuple[str, str]], elsewhere: dict[tuple[str, str], str]
) -> None:
    path = mappings / name
    targets = entries(path.read_text(encoding="utf-8"), top_level=True)
    assert len(targets) >= 10
    errors = shape_errors(loader, path, targets)
    assert {(key, shape) for (key, _, shape), e in errors.items() if e is None} == loads
    for (key, line, shape), error in errors.items():
        if error is None:
            continue
        if (key, shape) in elsewhere:
            assert error.reason.startswith(elsewhere[(key, shape)]) and error.line != line
        else:
            assert error.line == line, (key, shape, error)


@pytest.mark.parametrize(("name", "loader"), [("cda.yaml", CDAMapping), ("hl7_inbound.yaml", HL7InboundMapping)])
def test_no_entry_of_the_wrong_shape_breaks_the_loader(mappings: Path, name: str, loader: type) -> None:
    """Every entry below the top level (the top level's are the test above's, each at its line): the file loads, or
    is refused with its file and line (`shape_errors`)."""
    path = mappings / name
    text = path.read_text(encoding="utf-8")
    top = set(entries(text, top_level=True))
    targets = [t for t in entries(text) if t not in top]
    assert len(targets) > 10 and top
    errors = shape_errors(loader, path, targets)
    assert sum(e is not None for e in errors.values()) > len(errors) / 2


def test_cda_sections_missing_or_plain_name_their_line(mappings: Path) -> None:
    cda = mappings / "cda.yaml"
    text = cda.read_text(encoding="utf-8")
    top = {key: line for line, key in entries(text, top_level=True)}
    for section, what in (("tables", "CSV"), ("identifiers", "OIDs"), ("organization", "name"), ("custodian", "name")):
        cda.write_text(replace_entry(text, top[section], "plain text"), encoding="utf-8")
        error = load_error(CDAMapping, cda)
        assert error.line == top[section] and what in error.reason, error
    # A section left out: the document's first line (where it would go), never line 0.
    for section, reason in (("identifiers", "identifiers: a mapping of"), ("tables", "tables: 'acts' is required")):
        cda.write_text(re.sub(rf"(?m)^{section}:\n(  .*\n)+", "", text), encoding="utf-8")
        error = load_error(CDAMapping, cda)
        assert error.line == top["kind"] and error.reason.startswith(reason), error
    cda.write_text(text, encoding="utf-8")
    line = edit(cda, "practitioner_id: '^8?\\d{11}$'", "practitioner_id: ['^8?\\d{11}$']")
    error = load_error(CDAMapping, cda)
    assert (error.line, error.reason) == (line, "practitioner_id: expected text, not a list")
    cda.write_text(text, encoding="utf-8")
    line = edit(cda, "image_link: https", "image_link:\n  - https")
    error = load_error(CDAMapping, cda)
    assert (error.line, error.reason) == (line, "image_link: expected text, not a list")
