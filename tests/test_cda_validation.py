"""CDA validation with the ANS testContenuCDA validators: the official examples and our skeletons pass, broken
documents fail with the validator's own message, and ``traboule cda validate`` exits accordingly.

One validator for the whole module (its cache in the session's temp dir): compiling the schematrons costs ~10 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import ROOT, SHARED, shared_path
from traboule.cda_validation import (
    PROFILES,
    UPSTREAM_REPO,
    CDAValidator,
    CDAValidatorError,
    ServedValidator,
    default_cache_dir,
    default_tree,
    detect,
    schematrons_for,
    server_address,
    tree_key,
)

pytestmark = [pytest.mark.shared, pytest.mark.timeout(120)]

CR_IMG_SCH = "CI-SIS_IMG-CR-IMG_2024.01.sch"
STRUC_MIN_SCH = "profils/structurationMinimale/ASIP-STRUCT-MIN-StrucMin.sch"
N3 = ("derived", "skeleton_IMG-CR-IMG_2024.01_N3_minimal.xml")
N1 = ("derived", "skeleton_IMG-CR-IMG_N1_minimal.xml")
EXAMPLES_DIR = SHARED / "standards" / "ans-testcontenucda" / "ExemplesCDA"
# The ANS CR-IMG examples, as they are in the tree (both known ones when ../shared is absent: they skip then).
EXAMPLES = sorted(p.name for p in EXAMPLES_DIR.glob("IMG_CR_IMG_2024.01*.xml")) or [
    "IMG_CR_IMG_2024.01.xml",
    "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml",
]


@pytest.fixture(scope="session")
def tree() -> Path:
    return shared_path("standards", "ans-testcontenucda")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cda-validators")


@pytest.fixture(scope="session")
def validator(tree: Path, cache: Path) -> CDAValidator:
    v = CDAValidator(tree, cache)
    v.compile_all()
    return v


def standard(*parts: str) -> Path:
    return shared_path("standards", *parts)


def n3_text() -> str:
    return standard(*N3).read_text(encoding="utf-8")


def edited(old: str, new: str) -> bytes:
    text = n3_text()
    assert old in text
    return text.replace(old, new, 1).encode("utf-8")


def cut(start: str, end: str) -> bytes:
    """The level-3 skeleton without the text from ``start`` up to and including ``end``."""
    text = n3_text()
    i = text.index(start)
    j = text.index(end, i) + len(end)
    return (text[:i] + text[j:]).encode("utf-8")


@pytest.mark.parametrize("parts", [N3, N1], ids=["skeleton-N3", "skeleton-N1"])
def test_derived_skeletons_pass(validator: CDAValidator, parts: tuple[str, str]) -> None:
    report = validator.validate_file(standard(*parts))
    assert report.valid, report.summary()
    assert report.findings == []


@pytest.mark.parametrize("name", EXAMPLES)
def test_ans_cr_img_examples_pass(validator: CDAValidator, name: str) -> None:
    report = validator.validate_file(standard("ans-testcontenucda", "ExemplesCDA", name))
    assert report.valid, report.summary()
    assert report.xsd_errors == []
    assert report.failed_asserts == []


def test_both_ans_cr_img_examples_are_in_the_tree(tree: Path) -> None:
    assert EXAMPLES == ["IMG_CR_IMG_2024.01.xml", "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"]


def test_level3_runs_the_volet_schematron_and_level1_does_not(validator: CDAValidator) -> None:
    n3 = validator.validate_file(standard(*N3))
    n1 = validator.validate_file(standard(*N1))
    assert n3.schematrons == (*PROFILES, CR_IMG_SCH)
    assert n1.schematrons == PROFILES
    assert set(n3.timings) >= {"xsd", *n3.schematrons}


def test_level3_without_conclusion_fails_with_the_cr_img_assert(validator: CDAValidator) -> None:
    report = validator.validate(cut("<!-- FR-DICOM-Conclusion", "</component>"), source="no-conclusion.xml")
    assert not report.valid
    assert report.xsd_errors == []
    (finding,) = report.errors
    assert finding.schematron == CR_IMG_SCH
    assert finding.kind == "failed-assert"
    assert 'La section "FR-DICOM-Conclusion" (1.2.250.1.213.1.1.2.209) doit être présente' in finding.text
    assert finding.location == "/ClinicalDocument/component/structuredBody"
    assert f"{CR_IMG_SCH}: {finding.text} @ {finding.location}" in report.summary()
    assert report.summary().startswith("FAIL no-conclusion.xml (IMG-CR-IMG level 3;")


def test_without_legal_authenticator_fails_with_the_structuration_minimale_message(validator: CDAValidator) -> None:
    report = validator.validate(cut("<legalAuthenticator>", "</legalAuthenticator>"))
    assert not report.valid
    (finding,) = report.errors
    assert finding.schematron == STRUC_MIN_SCH
    assert finding.role == "error"
    assert "element hl7:legalAuthenticator[hl7:signatureCode[@code = 'S']] is required [min 1x]" in finding.text
    assert finding.location == "/ClinicalDocument"


def test_unknown_element_is_an_xsd_error_with_its_line(validator: CDAValidator) -> None:
    line = next(i for i, t in enumerate(n3_text().splitlines(), 1) if "<title>Conclusion</title>" in t)
    report = validator.validate(edited("<title>Conclusion</title>", "<title>Conclusion</title><unknownElement/>"))
    assert not report.valid
    (error,) = report.xsd_errors
    assert error.line == line
    assert "'{urn:hl7-org:v3}unknownElement': This element is not expected" in error.message
    assert f"XSD line {line}: " in report.summary()


@pytest.mark.parametrize("encoding", ["ISO-8859-1", "UTF-8-SIG", "UTF-16"])
def test_document_is_read_as_its_declaration_says(validator: CDAValidator, encoding: str) -> None:
    declared = encoding.removesuffix("-SIG")
    text = n3_text().replace('encoding="UTF-8"', f'encoding="{declared}"', 1)
    report = validator.validate(text.encode(encoding))
    assert report.valid, report.summary()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"<ClinicalDocument><title></ClinicalDocument>", "not well-formed XML: Opening and ending tag mismatch"),
        (b"", "not well-formed XML"),
        (
            b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><ClinicalDocument xmlns="urn:hl7-org:v3">'
            b"&e;</ClinicalDocument>",
            "DOCTYPE not allowed",
        ),
    ],
    ids=["mismatched-tag", "empty", "doctype"],
)
def test_malformed_xml_is_an_error_result(validator: CDAValidator, data: bytes, message: str) -> None:
    report = validator.validate(data, source="bad.xml")
    assert not report.valid
    assert message in report.xml_error
    assert report.findings == [] and report.document is None
    assert report.summary().startswith("FAIL bad.xml (not parsed;")


def test_a_document_that_is_not_a_cda_fails_the_xsd(validator: CDAValidator) -> None:
    report = validator.validate(b"<report/>")
    assert not report.valid
    assert report.document is not None and report.document.level is None
    assert "No matching global declaration" in report.xsd_errors[0].message


@pytest.mark.parametrize(
    ("parts", "name", "level", "volet"),
    [
        (N3, "IMG-CR-IMG", 3, True),
        (N1, "IMG-CR-IMG", 1, False),
        (("ans-testcontenucda", "ExemplesCDA", "IMG_CR_IMG_2024.01.xml"), "IMG-CR-IMG", 3, True),
        (("ans-testcontenucda", "ExemplesCDA", "IMG_CR_IMG_2024.01_CDA-R2-Niveau-1.xml"), "IMG-CR-IMG", 1, False),
        (("ans-testcontenucda", "ExemplesCDA", "DOC_NON_STRUCTURE_CDA-R2-N1.xml"), "CDA", 1, False),
        (
            ("ans-testcontenucda", "ExemplesCDA", "IMG-DA-IMG_2024.01_Scanner_Crane_ThoraxAbdomenPelvis.xml"),
            "CDA",
            3,
            False,
        ),
    ],
    ids=["skeleton-N3", "skeleton-N1", "ans-N3", "ans-N1", "ans-non-structure", "ans-da-img"],
)
def test_level_detection(parts: tuple[str, ...], name: str, level: int, volet: bool) -> None:
    document = detect(etree.parse(str(standard(*parts))).getroot())
    assert (document.name, document.level) == (name, level)
    assert schematrons_for(document) == ((*PROFILES, CR_IMG_SCH) if volet else PROFILES)


def test_validations_from_two_threads_agree(validator: CDAValidator) -> None:
    data = standard(*N1).read_bytes()
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda _: validator.validate(data), range(4)))
    assert [r.valid for r in reports] == [True] * 4


def test_a_second_validator_reuses_the_cached_copy(validator: CDAValidator, tree: Path, cache: Path) -> None:
    again = CDAValidator(tree, cache)
    assert again.work == validator.work
    assert [p.name for p in cache.iterdir()] == [validator.work.name]
    assert (validator.work / "schematrons" / "CI-SIS_IMG-CR-IMG_2024.01.traboule.xsl").is_file()
    assert not (tree / "schematrons" / "CI-SIS_IMG-CR-IMG_2024.01.traboule.xsl").exists()


def test_cache_key_follows_the_tree(tmp_path: Path) -> None:
    sch = tmp_path / "schematrons" / "a.sch"
    sch.parent.mkdir()
    sch.write_text("<schema/>")
    (tmp_path / "ExemplesCDA").mkdir()
    before = tree_key(tmp_path)
    (tmp_path / "ExemplesCDA" / "x.xml").write_text("<x/>")
    assert tree_key(tmp_path) == before  # examples do not change what a validation says
    sch.write_text("<schema></schema>")
    assert tree_key(tmp_path) != before


def test_an_incomplete_tree_is_refused_with_the_upstream_name(tmp_path: Path) -> None:
    with pytest.raises(CDAValidatorError, match=UPSTREAM_REPO):
        CDAValidator(tmp_path, tmp_path / "cache")


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "traboule" / "cda-validators"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "traboule" / "cda-validators"


def test_default_tree_is_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRABOULE_CDA_VALIDATORS", str(tmp_path))
    assert default_tree() == tmp_path
    monkeypatch.delenv("TRABOULE_CDA_VALIDATORS")
    assert default_tree() is None


def _cli(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRABOULE_CDA_VALIDATORS"} | (env or {})
    command = [sys.executable, "-m", "traboule.cli", "cda", "validate", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=100, check=False)


def test_cli_exit_codes(validator: CDAValidator, tree: Path, cache: Path, tmp_path: Path) -> None:
    # In this process: each run compiles the schematrons again (~7 s).
    bad = tmp_path / "no-conclusion.xml"
    bad.write_bytes(cut("<!-- FR-DICOM-Conclusion", "</component>"))
    good = standard(*N1)
    passing = _cli(good, "--validators", tree, "--cache", cache, "--keep", "0")
    assert passing.returncode == 0, passing.stderr
    assert passing.stdout.startswith(f"OK {good} (IMG-CR-IMG level 1;")
    assert "cda.schematron.compiled" in passing.stderr and "cda.server" not in passing.stderr
    failing = _cli(good, bad, "--cache", cache, "--keep", "0", env={"TRABOULE_CDA_VALIDATORS": str(tree)})
    assert failing.returncode == 1, failing.stderr
    assert f"OK {good} " in failing.stdout
    assert f"FAIL {bad} (IMG-CR-IMG level 3;" in failing.stdout
    assert f"  {CR_IMG_SCH}: " in failing.stdout and "FR-DICOM-Conclusion" in failing.stdout
    assert "@ /ClinicalDocument/component/structuredBody" in failing.stdout


def test_cli_keeps_compiled_schematrons_in_a_server_between_runs(tree: Path, cache: Path, tmp_path: Path) -> None:
    served = ServedValidator(tree, cache)
    served.stop()  # none left by an earlier run
    bad = tmp_path / "no-conclusion.xml"
    bad.write_bytes(cut("<!-- FR-DICOM-Conclusion", "</component>"))
    good = standard(*N3)
    try:
        first = _cli(good, "--validators", tree, "--cache", cache, "--keep", "60")
        assert first.returncode == 0, first.stderr
        assert "cda.server.started" in first.stderr
        start = time.monotonic()
        second = _cli(good, bad, "--validators", tree, "--cache", cache, "--keep", "60")
        took = time.monotonic() - start
        assert second.returncode == 1, second.stderr
        assert "cda.server.started" not in second.stderr and "cda.schematron.compiled" not in second.stderr
        assert f"OK {good} (IMG-CR-IMG level 3;" in second.stdout
        assert f"FAIL {bad} (IMG-CR-IMG level 3;" in second.stdout and "FR-DICOM-Conclusion" in second.stdout
        assert took < 5.0  # compiling alone takes ~7 s
    finally:
        assert served.stop()
    assert not served.stop()  # it is gone


def test_a_changed_schematron_gets_another_server(tmp_path: Path) -> None:
    sch = tmp_path / "schematrons" / "a.sch"
    sch.parent.mkdir()
    sch.write_text("<schema/>")
    before = server_address(tmp_path, tmp_path / "cache")
    assert before == server_address(tmp_path, tmp_path / "cache")
    assert before != server_address(tmp_path, tmp_path / "other-cache")
    sch.write_text("<schema></schema>")
    assert server_address(tmp_path, tmp_path / "cache") != before


def test_cli_without_a_validator_tree_says_how_to_get_one(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    proc = _cli(tmp_path / "doc.xml", cwd=tmp_path / "work")
    assert proc.returncode == 2
    assert "--validators PATH or set TRABOULE_CDA_VALIDATORS" in proc.stderr and UPSTREAM_REPO in proc.stderr


def test_cli_with_a_broken_tree_exits_2(tmp_path: Path) -> None:
    proc = _cli(tmp_path / "doc.xml", "--validators", tmp_path, "--cache", tmp_path / "cache")
    assert proc.returncode == 2
    assert "is not a testContenuCDA tree" in proc.stderr
