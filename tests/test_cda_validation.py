"""CDA validation with the ANS testContenuCDA validators: the official examples and our skeletons pass, broken
documents fail with the validator's own message, and ``traboule cda validate`` exits accordingly.

The tests of content share the run's one validator on the ANS tree (``cda_validator``, tests/conftest.py):
compiling its schematrons costs ~10 s. The tests of the command's exit codes and of the validation server (kept
between runs, idle connections, idle exit, whom it answers) are about processes and sockets: they run on a small
tree laid out as the ANS one (its XSD and Schematron engine, one-rule schematrons at the paths the validator runs),
which a server compiles in well under a second.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import ROOT, SHARED, shared_path
from traboule.formats.cda_validation import (
    PROFILES,
    REQUEST_TIMEOUT,
    SERVER_IDLE,
    UPSTREAM_REPO,
    CDAValidator,
    CDAValidatorError,
    ServedValidator,
    _report_from,
    default_cache_dir,
    default_tree,
    detect,
    schematrons_for,
    server_address,
    server_idle,
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


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short temporary folder: a validation server's socket lives under the cache folders the tests make in it, and
    a Unix socket's path has 108 bytes at most (pytest's own folders are longer under a parallel run)."""
    path = Path(tempfile.mkdtemp(prefix="cda-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tree() -> Path:
    return shared_path("standards", "ans-testcontenucda")


@pytest.fixture(scope="session")
def validator(cda_validator: CDAValidator) -> CDAValidator:
    """The run's one validator on the ANS tree, every schematron compiled."""
    cda_validator.compile_all()
    return cda_validator


@pytest.fixture(scope="session")
def cache(validator: CDAValidator) -> Path:
    return validator.cache_dir


# One-rule schematrons for the small tree: the volet's is the ANS one's FR-DICOM-Conclusion rule, with its message.
MINI_SCH = """<?xml version="1.0" encoding="UTF-8"?>
<schema xmlns="http://purl.oclc.org/dsdl/schematron" xmlns:cda="urn:hl7-org:v3" queryBinding="xslt2">
  <ns prefix="cda" uri="urn:hl7-org:v3"/>
  <pattern id="mini">{rule}</pattern>
</schema>
"""
MINI_PROFILE_RULE = '<rule context="cda:ClinicalDocument"><assert test="cda:id">an identifier</assert></rule>'
MINI_VOLET_RULE = """
    <rule context="cda:ClinicalDocument/cda:component/cda:structuredBody">
      <assert test="count(cda:component/cda:section[cda:templateId/@root='1.2.250.1.213.1.1.2.209'])=1">
        [CI-SIS_IMG-CR-IMG] Erreur de conformité au modèle : La section "FR-DICOM-Conclusion"
        (1.2.250.1.213.1.1.2.209) doit être présente.
      </assert>
    </rule>"""


@pytest.fixture(scope="session")
def mini_tree(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree laid out as the ANS one (its ``infrastructure/`` XSD and ``schematrons/moteur/``) whose schematrons,
    at the paths of ``PROFILES`` and ``VOLETS``, hold one rule each: for the processes, not the content."""
    root = tmp_path_factory.mktemp("mini-tree")
    shutil.copytree(tree / "infrastructure", root / "infrastructure")
    shutil.copytree(tree / "schematrons" / "moteur", root / "schematrons" / "moteur")
    for sch in PROFILES:
        (root / "schematrons" / sch).parent.mkdir(parents=True, exist_ok=True)
        (root / "schematrons" / sch).write_text(MINI_SCH.format(rule=MINI_PROFILE_RULE), encoding="utf-8")
    (root / "schematrons" / CR_IMG_SCH).write_text(MINI_SCH.format(rule=MINI_VOLET_RULE), encoding="utf-8")
    return root


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
    drop = {"TRABOULE_CDA_VALIDATORS", "TRABOULE_CDA_SERVER_IDLE"}
    env = {k: v for k, v in os.environ.items() if k not in drop} | (env or {})
    command = [sys.executable, "-m", "traboule.app.cli", "cda", "validate", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=100, check=False)


def test_cli_exit_codes(mini_tree: Path, tmp_path: Path) -> None:
    # In this process: each run compiles the schematrons again (~7 s on the ANS tree, hence the small one).
    tree, cache = mini_tree, tmp_path / "cache"
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


def test_cli_keeps_compiled_schematrons_in_a_server_between_runs(mini_tree: Path, tmp_path: Path) -> None:
    tree, cache = mini_tree, tmp_path / "cache"
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
        assert took < 5.0
        # The second run's documents went to the first run's server, which compiled each schematron once, at start.
        compiled = (cache / "validation-server.log").read_text().count("cda.schematron.compiled")
        assert compiled == len(PROFILES) + 1, compiled
        assert served.running()
        stop = _cli("--stop", "--validators", tree, "--cache", cache)
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.strip() == f"stopped the validation server of {tree}"
        assert not served.running()  # stop waits for the process to end
        again = _cli("--stop", "--validators", tree, "--cache", cache)
        assert again.stdout.strip() == f"no validation server of {tree}"
    finally:
        served.stop()
    assert not served.stop()  # it is gone


def test_a_changed_schematron_gets_another_server(tmp_path: Path) -> None:
    sch = tmp_path / "schematrons" / "a.sch"
    sch.parent.mkdir()
    sch.write_text("<schema/>")
    before = server_address(tmp_path, tmp_path / "cache")
    assert before is not None and Path(before).parent == tmp_path / "cache" / "servers"
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


# -- the validation server: who it talks to, idle connections, idle exit -----------------------------------------

NOBODY = 65534
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as another user (nobody) needs root")
# What the squatter of the review answered: no document, no error. A pass, had the client believed it.
NOT_PARSED = {"document": None, "xml_error": "", "xsd_errors": [], "findings": [], "schematrons": [], "timings": {}}


@pytest.fixture(scope="module")
def served(mini_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedValidator]:
    """A validation server of the small tree, stopped at the end (and checked gone)."""
    server = ServedValidator(mini_tree, tmp_path_factory.mktemp("served-cache"), idle=120)
    yield server
    server.stop()
    assert not server.running()


@pytest.fixture
def open_cache(mini_tree: Path) -> Iterator[Path]:
    """A cache another user can traverse (pytest's own temp dirs are root's alone), for a server of the small tree."""
    path = Path(tempfile.mkdtemp(prefix="cda-open-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    ServedValidator(mini_tree, path).stop()
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/usr/bin/python3", "-c", code, *args], user=NOBODY, group=NOBODY, stdout=subprocess.PIPE, text=True
    )


class FakeServer:
    """Something else listening on a validation server's socket (same user): answers every request with ``answer``.
    ``key``: "none" (no key file beside the socket), "known" (it wrote the key and proves its answers with it),
    "unknown" (there is a key, not the one its answers are proved with)."""

    def __init__(self, address: str, answer: dict[str, object], *, key: str = "none") -> None:
        self.path = Path(address)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.secret = os.urandom(32)
        if key != "none":
            key_file = self.path.with_suffix(".key")
            key_file.write_bytes(self.secret if key == "known" else os.urandom(32))
            key_file.chmod(0o600)
        self.answer = answer
        self.received: list[bytes] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import hashlib
        import hmac

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ValueError, struct.error):
                (size,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
                request = json.loads(conn.recv(size, socket.MSG_WAITALL))
                self.received.append(base64.b64decode(request.get("data", "")))
                proof = hmac.new(self.secret, request["nonce"].encode(), hashlib.sha256).hexdigest()
                body = json.dumps({**self.answer, "proof": proof}).encode()
                conn.sendall(struct.pack(">I", len(body)) + body)

    def close(self) -> None:
        self.listener.close()
        for path in (self.path, self.path.with_suffix(".key")):
            path.unlink(missing_ok=True)


def test_a_fake_server_on_the_socket_is_not_believed(tree: Path, tmp_path: Path) -> None:
    """The review's squatter, on the socket itself: it answers "not parsed, no error" without the server's key."""
    broken = tmp_path / "broken.xml"
    broken.write_bytes(b"<ClinicalDocument><title></ClinicalDocument>")
    address = str(server_address(tree, tmp_path / "cache"))
    fake = FakeServer(address, {"report": NOT_PARSED})
    try:
        proc = _cli(broken, "--validators", tree, "--cache", tmp_path / "cache")
    finally:
        fake.close()
    assert fake.received == []  # no key beside the socket: nothing sent
    assert proc.returncode == 2, proc.stdout
    assert "OK" not in proc.stdout
    assert "no key beside the socket, nothing sent: not this user's validation server" in proc.stderr
    fake = FakeServer(address, {"report": NOT_PARSED}, key="unknown")
    try:
        proc = _cli(broken, "--validators", tree, "--cache", tmp_path / "cache")
    finally:
        fake.close()
    assert proc.returncode == 2, proc.stdout
    assert "OK" not in proc.stdout
    assert "the answer is not from this user's validation server" in proc.stderr


def test_an_answer_without_a_parsed_document_is_never_a_pass(tree: Path, tmp_path: Path) -> None:
    """Even from a peer holding the key, a report that says less than a validation does is an error."""
    cache = tmp_path / "cache"
    address = str(server_address(tree, cache))
    fake = FakeServer(address, {"report": NOT_PARSED}, key="known")
    try:
        with pytest.raises(CDAValidatorError, match="incomplete, not trusted: no parsed document and no XML error"):
            ServedValidator(tree, cache).validate(b"<ClinicalDocument/>")
    finally:
        fake.close()
    lazy = {**NOT_PARSED, "document": {"name": "IMG-CR-IMG", "level": 1, "template_ids": [], "code": ""}}
    fake = FakeServer(
        address, {"report": {**lazy, "schematrons": list(PROFILES), "timings": {"xsd": 0.1}}}, key="known"
    )
    try:
        with pytest.raises(CDAValidatorError, match="a validation step did not run"):
            ServedValidator(tree, cache).validate(b"<ClinicalDocument/>")
    finally:
        fake.close()
    for answer in ({}, {"report": None}, {"report": {**lazy, "schematrons": []}}, {"report": {"document": None}}):
        with pytest.raises((KeyError, TypeError, ValueError)):
            _report_from(answer.get("report"), "x.xml")


def test_a_genuine_report_reads_back_whole(validator: CDAValidator) -> None:
    import dataclasses

    report = validator.validate(cut("<!-- FR-DICOM-Conclusion", "</component>"))
    again = _report_from(json.loads(json.dumps(dataclasses.asdict(report))), "no-conclusion.xml")
    assert again.errors == report.errors and again.schematrons == report.schematrons
    assert again.summary().startswith("FAIL no-conclusion.xml (IMG-CR-IMG level 3;")


@needs_root
def test_a_socket_of_another_user_is_sent_nothing(tree: Path, tmp_path: Path) -> None:
    """A process of another user's listening at the server's path (here: bound elsewhere, then moved there)."""
    cache = tmp_path / "cache"
    address = Path(str(server_address(tree, cache)))
    address.parent.mkdir(mode=0o700, parents=True)
    elsewhere = Path(tempfile.mkdtemp(dir="/tmp"))
    elsewhere.chmod(0o777)
    squatter = _as_nobody(
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4); print('ready', flush=True)\n"
        "s.settimeout(30); c, _ = s.accept(); c.settimeout(5); got = b''\n"
        "try:\n"
        "    while chunk := c.recv(65536): got += chunk\n"
        "except OSError: pass\n"
        "print('got', len(got), flush=True)\n",
        str(elsewhere / "s.sock"),
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == "ready\n"
        (elsewhere / "s.sock").rename(address)
        with pytest.raises(CDAValidatorError, match=f"not this user's \\(uid {NOBODY}\\): nothing sent to it"):
            ServedValidator(tree, cache).validate(b"<ClinicalDocument>secret</ClinicalDocument>")
        out, _ = squatter.communicate(timeout=30)
        assert out == "got 0\n"
    finally:
        squatter.kill()
        squatter.wait()
        shutil.rmtree(elsewhere)


def test_a_socket_directory_others_can_reach_is_refused(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    servers = Path(str(server_address(tree, cache))).parent
    servers.mkdir(mode=0o700, parents=True)
    servers.chmod(0o755)
    with pytest.raises(CDAValidatorError, match=r"not a directory of this user's with mode 0700 .*mode 755"):
        ServedValidator(tree, cache).validate(b"<ClinicalDocument/>")
    if os.getuid() == 0:
        servers.chmod(0o700)
        os.chown(servers, NOBODY, NOBODY)
        with pytest.raises(CDAValidatorError, match=f"owner uid {NOBODY}"):
            ServedValidator(tree, cache).validate(b"<ClinicalDocument/>")
    assert not list(servers.iterdir())  # no server was started there


def test_an_idle_connection_does_not_hold_up_the_server(served: ServedValidator) -> None:
    data = standard(*N1).read_bytes()
    assert served.validate(data, source="n1.xml").valid  # started and compiled
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with idle, partial:
        idle.connect(served.address)
        partial.connect(served.address)
        partial.sendall(struct.pack(">I", 1000) + b'{"op"')  # a frame that never ends
        start = time.monotonic()
        report = served.validate(data, source="n1.xml")
        assert time.monotonic() - start < 3.0  # not after the idle ones' deadline
        assert report.valid and report.summary().startswith("OK n1.xml (IMG-CR-IMG level 1;")
        for conn in (idle, partial):  # dropped by the server after REQUEST_TIMEOUT
            conn.settimeout(REQUEST_TIMEOUT + 5)
            assert conn.recv(1) == b""
        assert time.monotonic() - start < REQUEST_TIMEOUT + 3


def test_clients_are_served_concurrently(served: ServedValidator) -> None:
    data = standard(*N1).read_bytes()
    bad = cut("<!-- FR-DICOM-Conclusion", "</component>")
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda d: served.validate(d), [data, bad, data, bad]))
    assert [r.valid for r in reports] == [True, False, True, False]
    assert reports[1].errors[0].schematron == CR_IMG_SCH


@needs_root
def test_the_server_answers_only_its_user(mini_tree: Path, open_cache: Path) -> None:
    served = ServedValidator(mini_tree, open_cache, idle=60)
    assert served.validate(standard(*N1).read_bytes()).valid
    servers = Path(served.address).parent
    try:
        servers.chmod(0o711)  # let nobody reach the socket: the server must still not answer
        Path(served.address).chmod(0o666)
        client = _as_nobody(
            "import json, socket, struct, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(10)\n"
            "body = json.dumps({'op': 'validate', 'data': '', 'nonce': '0' * 32}).encode()\n"
            "try:\n"
            "    s.sendall(struct.pack('>I', len(body)) + body); print('answer', len(s.recv(65536)))\n"
            "except OSError as exc: print('closed', type(exc).__name__)\n",
            served.address,
        )
        out, _ = client.communicate(timeout=30)
    finally:
        servers.chmod(0o700)
    assert out in ("answer 0\n", "closed ConnectionResetError\n", "closed BrokenPipeError\n")
    assert (
        "cda.server.refused" in (open_cache / "validation-server.log").read_text()
        and f"uid={NOBODY}" in (open_cache / "validation-server.log").read_text()
    )
    assert served.validate(standard(*N1).read_bytes()).valid  # and goes on serving its user
    assert served.stop() and not served.running()


def test_server_idle_time_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRABOULE_CDA_SERVER_IDLE", raising=False)
    assert server_idle() == SERVER_IDLE == 600
    monkeypatch.setenv("TRABOULE_CDA_SERVER_IDLE", "30")
    assert server_idle() == 30
    monkeypatch.setenv("TRABOULE_CDA_SERVER_IDLE", "0")
    assert server_idle() == 0
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv("TRABOULE_CDA_SERVER_IDLE", bad)
        assert server_idle() == SERVER_IDLE


def test_the_server_exits_after_the_idle_time_of_the_environment(mini_tree: Path, open_cache: Path) -> None:
    good, tree = standard(*N1), mini_tree
    proc = _cli(good, "--validators", tree, "--cache", open_cache, env={"TRABOULE_CDA_SERVER_IDLE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "cda.server.started" in proc.stderr and "idle=1.0" in proc.stderr
    served = ServedValidator(tree, open_cache)
    deadline = time.monotonic() + 15
    while served.running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not served.running()
    assert "cda.server.idle_exit" in (open_cache / "validation-server.log").read_text()
    assert not list(Path(served.address).parent.glob("*.sock"))  # its socket and key went with it
    assert not list(Path(served.address).parent.glob("*.key"))
    no_server = _cli(good, "--validators", tree, "--cache", open_cache, env={"TRABOULE_CDA_SERVER_IDLE": "0"})
    assert no_server.returncode == 0 and "cda.server" not in no_server.stderr
