"""CDA validation with the official French CI-SIS validators: CDA_extended.xsd, then the ISO schematrons.

The validator tree is the ANS testContenuCDA repository,
``ansforge/interop-outil-cda-testcontenucda3.0-outil-validation-documents-cda`` (``infrastructure/cda/``,
``schematrons/``, ``jeuxDeValeurs/``). It is **not shipped with traboule**: point :class:`CDAValidator` at a
checkout. Upstream misses two files its schematrons need (the J07 value set the structuration minimale reads as
``include/voc-1.2.250.1.213.1.1.5.471-DYNAMIC.xml``, and the ``E_directiveAnticipee_int`` pattern IHE.sch
includes): the validator writes them into its working copy, from ``jeuxDeValeurs/JDV_J07_XdsTypeCode_CISIS.xml``
and as an empty pattern.

Which schematrons run is chosen from the document's ``templateId``s: the four cross-document profiles
(structuration minimale, IHE, ModelesDeContenusCDA, Modeles_ANS) for every document, plus the volet schematron
for a CR d'imagerie level 3 (``1.2.250.1.213.1.1.1.45``). The volet schematron is not run on level 1 (XDS-SD,
``nonXMLBody``): it asserts the level-3 templateIds.

Schematrons are turned into XSLT once (ISO skeleton: include → abstract expand → SVRL) in a copy of the tree
under the cache directory, because the compiled XSLT must sit next to its ``.sch`` for the relative
``doc('../jeuxDeValeurs/...')`` look-ups. The copy is keyed by the tree's paths, sizes and mtimes and the saxonche
version, so a changed tree gets a new copy. Saxon then compiles each XSLT once per validator: the structuration
minimale one is 10 MB of XSLT and takes ~7 s to compile, so keep one validator for the life of the process.

Saxon (saxonche) holds the GIL while it transforms: a validation run in a thread still stalls an asyncio loop
for its whole duration. Run it in another process when latency matters. Validations on one validator are
serialized by a lock (compiled Saxon executables are not thread-safe).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import importlib.metadata
import json
import multiprocessing
import os
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from lxml import etree
from saxonche import PySaxonApiError, PySaxonProcessor, PyXdmNode, PyXsltExecutable

from traboule.errors import CDAValidatorError, ConfigError

log = structlog.get_logger("traboule.translate.cda")

UPSTREAM_REPO = "ansforge/interop-outil-cda-testcontenucda3.0-outil-validation-documents-cda"
CDA_NS = "urn:hl7-org:v3"
SVRL_NS = "http://purl.oclc.org/dsdl/svrl"

TEMPLATE_XDS_SD = "1.3.6.1.4.1.19376.1.2.20"
TEMPLATE_CR_IMG = "1.2.250.1.213.1.1.1.45"
LOINC_CR_IMG = "18748-4"

#: Cross-document profiles, run on every CDA (paths under ``schematrons/``).
PROFILES: tuple[str, ...] = (
    "profils/structurationMinimale/ASIP-STRUCT-MIN-StrucMin.sch",
    "profils/IHE.sch",
    "profils/CI-SIS_ModelesDeContenusCDA.sch",
    "profils/CI-SIS_Modeles_ANS.sch",
)
#: Volet schematrons by document templateId, run on top of :data:`PROFILES` on structured documents.
VOLETS: dict[str, str] = {TEMPLATE_CR_IMG: "CI-SIS_IMG-CR-IMG_2024.01.sch"}

XSD = "infrastructure/cda/CDA_extended.xsd"
# The ISO Schematron XSLT2 skeleton, in the order it is applied.
ENGINE = ("iso_dsdl_include.xsl", "iso_abstract_expand.xsl", "iso_svrl_for_xslt2.xsl")
# Only these parts of the tree are copied and hashed (examples and docs do not change what a validation says).
TREE_PARTS = ("schematrons", "jeuxDeValeurs", "infrastructure")
# Beside the .sch, with a name no upstream file has (upstream ships some stale compiled .xsl).
COMPILED_SUFFIX = ".traboule.xsl"
# Bump when the way schematrons are compiled changes, so old caches are not reused.
CACHE_FORMAT = "1"
WARNING_ROLES = frozenset({"warning", "warn", "info", "information"})
ERROR_ROLES = frozenset({"error", "fatal"})


@dataclass(frozen=True)
class DocumentType:
    """What a CDA says it is: ``name`` is ``IMG-CR-IMG`` or ``CDA``; ``level`` 1 (nonXMLBody) or 3 (structured)."""

    name: str
    level: int | None
    template_ids: tuple[str, ...] = ()
    code: str = ""

    def __str__(self) -> str:
        return f"{self.name} level {self.level}" if self.level else self.name


@dataclass(frozen=True)
class XSDError:
    line: int
    message: str


@dataclass(frozen=True)
class SchematronFinding:
    """One SVRL result: a failed assert, a successful report, or a schematron that could not run on the document."""

    schematron: str
    kind: str  # "failed-assert" | "successful-report" | "engine-error"
    text: str
    location: str = ""
    role: str = ""
    flag: str = ""
    id: str = ""

    @property
    def is_error(self) -> bool:
        """Failed asserts are errors unless their role says warning/info; reports only when their role says error."""
        role = self.role.lower()
        if self.kind == "successful-report":
            return role in ERROR_ROLES
        return role not in WARNING_ROLES

    def __str__(self) -> str:
        where = f" @ {self.location}" if self.location else ""
        role = f" [{self.role}]" if self.role else ""
        return f"{Path(self.schematron).name}{role}: {self.text}{where}"


@dataclass
class CDAValidationReport:
    """The outcome of one validation. ``valid`` is true when the XML is well formed, the XSD passes and no
    schematron finding is an error."""

    source: str = ""
    document: DocumentType | None = None
    xml_error: str = ""
    xsd_errors: list[XSDError] = field(default_factory=list)
    findings: list[SchematronFinding] = field(default_factory=list)
    schematrons: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[SchematronFinding]:
        return [f for f in self.findings if f.is_error]

    @property
    def warnings(self) -> list[SchematronFinding]:
        return [f for f in self.findings if not f.is_error]

    @property
    def failed_asserts(self) -> list[SchematronFinding]:
        return [f for f in self.findings if f.kind == "failed-assert"]

    @property
    def valid(self) -> bool:
        return not self.xml_error and not self.xsd_errors and not self.errors

    def summary(self) -> str:
        """One status line, then one line per problem (XSD errors with their line, then schematron findings)."""
        what = str(self.document) if self.document else "not parsed"
        total = sum(self.timings.values())
        head = (
            f"{'OK' if self.valid else 'FAIL'} {self.source or 'document'} ({what}; "
            f"{len(self.xsd_errors)} XSD error(s), {len(self.errors)} schematron error(s), "
            f"{len(self.warnings)} warning(s); {total:.2f} s)"
        )
        lines = [head]
        if self.xml_error:
            lines.append(f"  XML: {self.xml_error}")
        lines += [f"  XSD line {e.line}: {e.message}" for e in self.xsd_errors]
        lines += [f"  {f}" for f in self.errors]
        lines += [f"  warning {f}" for f in self.warnings]
        return "\n".join(lines)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/traboule/cda-validators``, else ``~/.cache/traboule/cda-validators``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "traboule" / "cda-validators"


def default_tree() -> Path | None:
    """``$TRABOULE_CDA_VALIDATORS``, or None."""
    value = os.environ.get("TRABOULE_CDA_VALIDATORS", "")
    return Path(value) if value else None


def detect(root: etree._Element) -> DocumentType:
    """The document type from the root element, its templateIds, its code and its body."""
    if root.tag != f"{{{CDA_NS}}}ClinicalDocument":
        return DocumentType(name=f"not a CDA ClinicalDocument ({etree.QName(root).localname})", level=None)
    ids = tuple(t.get("root", "") for t in root.findall(f"{{{CDA_NS}}}templateId"))
    code_el = root.find(f"{{{CDA_NS}}}code")
    code = code_el.get("code", "") if code_el is not None else ""
    body = root.find(f"{{{CDA_NS}}}component/*")
    body_name = etree.QName(body).localname if body is not None else ""
    if TEMPLATE_CR_IMG in ids:
        level: int | None = 3
    elif TEMPLATE_XDS_SD in ids or body_name == "nonXMLBody":
        level = 1
    else:
        level = 3 if body_name == "structuredBody" else None
    name = "IMG-CR-IMG" if TEMPLATE_CR_IMG in ids or code == LOINC_CR_IMG else "CDA"
    return DocumentType(name=name, level=level, template_ids=ids, code=code)


def schematrons_for(document: DocumentType) -> tuple[str, ...]:
    """The schematrons (paths under ``schematrons/``) that apply to a document."""
    volets = [] if document.level == 1 else [VOLETS[t] for t in document.template_ids if t in VOLETS]
    return (*PROFILES, *dict.fromkeys(volets))


def tree_key(tree: Path) -> str:
    """A hash of the tree's validation files (paths, sizes, mtimes) and of the Saxon version that compiles them."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{_saxonche_version()}\0".encode())
    for part in TREE_PARTS:
        for path in sorted((tree / part).rglob("*")):
            if path.is_file():
                st = path.stat()
                digest.update(f"{path.relative_to(tree).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _saxonche_version() -> str:
    try:
        return importlib.metadata.version("saxonche")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source build of saxonche
        return "unknown"


class CDAValidator:
    """Validates CDA documents against a testContenuCDA tree (see the module docstring).

    ``tree`` is the root of the ANS testContenuCDA checkout; ``cache_dir`` (default :func:`default_cache_dir`)
    receives ``<key>/``, a copy of the tree holding the compiled schematrons (copies of older trees are left
    there; the directory can be deleted at any time). Building the validator checks the tree and loads the XSD;
    schematrons are compiled on first use, or all at once with :meth:`compile_all` (at start-up, say).
    """

    def __init__(self, tree: str | Path, cache_dir: str | Path | None = None) -> None:
        self.tree = Path(tree).resolve()
        _check_tree(self.tree)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.work = _prepare_copy(self.tree, self.cache_dir)
        self._lock = threading.RLock()
        self._parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
        self._xsd = etree.XMLSchema(etree.parse(str(self.work / XSD)))
        self._saxon = PySaxonProcessor(license=False)
        self._xslt = self._saxon.new_xslt30_processor()
        self._engine: list[PyXsltExecutable] = []
        self._executables: dict[str, PyXsltExecutable] = {}

    @property
    def compiled(self) -> tuple[str, ...]:
        """The schematrons already compiled by this validator."""
        return tuple(self._executables)

    def compile_all(self, schematrons: Iterable[str] = (*PROFILES, *VOLETS.values())) -> dict[str, float]:
        """Compile the schematrons now rather than on first use; returns the seconds each took (0 if done)."""
        timings = {}
        for sch in schematrons:
            start = time.perf_counter()
            self._executable(sch)
            timings[sch] = time.perf_counter() - start
        return timings

    def warm(self) -> None:
        """Compile every schematron and run them once (their value sets load on first use): the first real
        document then costs what the others do."""
        self.compile_all()
        self.validate(WARM_DOCUMENT, source="warm-up")

    def validate_file(self, path: str | Path) -> CDAValidationReport:
        return self.validate(Path(path).read_bytes(), source=str(path))

    def validate(self, data: bytes, source: str = "") -> CDAValidationReport:
        """XSD, then the schematrons that apply. Never raises for a bad document (only for a broken tree)."""
        report = CDAValidationReport(source=source)
        start = time.perf_counter()
        try:
            doc = etree.fromstring(data, self._parser).getroottree()
        except (etree.XMLSyntaxError, ValueError) as exc:  # ValueError: str with an encoding declaration
            report.xml_error = f"not well-formed XML: {exc}"
            return report
        if doc.docinfo.doctype:
            # A CDA has no DOCTYPE; refusing it keeps entity expansion and external fetches out of both parsers.
            report.xml_error = f"DOCTYPE not allowed in a CDA document: {doc.docinfo.doctype}"
            return report
        report.timings["parse"] = time.perf_counter() - start
        report.document = detect(doc.getroot())
        report.schematrons = schematrons_for(report.document)
        with self._lock:
            start = time.perf_counter()
            if not self._xsd.validate(doc):
                report.xsd_errors = [XSDError(e.line, e.message) for e in self._xsd.error_log]
            report.timings["xsd"] = time.perf_counter() - start
            start = time.perf_counter()
            try:
                node = self._saxon.parse_xml(xml_text=_text(data, doc), encoding="UTF-8")
            except PySaxonApiError as exc:
                report.findings.append(
                    SchematronFinding("(Saxon parser)", "engine-error", f"cannot read the document: {exc}")
                )
                return report
            report.timings["saxon-parse"] = time.perf_counter() - start
            for sch in report.schematrons:
                executable = self._executable(sch)
                start = time.perf_counter()
                report.findings += _run(executable, node, sch)
                report.timings[sch] = time.perf_counter() - start
        return report

    def _executable(self, sch: str) -> PyXsltExecutable:
        with self._lock:
            if sch not in self._executables:
                xsl = self._generated(sch)
                start = time.perf_counter()
                try:
                    self._executables[sch] = self._xslt.compile_stylesheet(stylesheet_file=str(xsl))
                except PySaxonApiError as exc:
                    raise CDAValidatorError(f"{xsl}: Saxon cannot compile it: {exc}") from exc
                log.info("cda.schematron.compiled", schematron=sch, seconds=round(time.perf_counter() - start, 3))
            return self._executables[sch]

    def _generated(self, sch: str) -> Path:
        """The XSLT of a schematron in the cache copy, generated (atomically) if absent."""
        src = self.work / "schematrons" / sch
        if not src.is_file():
            raise CDAValidatorError(f"{self.tree / 'schematrons' / sch}: schematron missing from the validator tree")
        out = src.with_name(src.name.removesuffix(".sch") + COMPILED_SUFFIX)
        if out.exists():
            return out
        start = time.perf_counter()
        if not self._engine:
            moteur = self.work / "schematrons" / "moteur"
            self._engine = [self._xslt.compile_stylesheet(stylesheet_file=str(moteur / n)) for n in ENGINE]
        try:
            text = self._engine[0].transform_to_string(source_file=str(src))
            for step in self._engine[1:]:
                node = self._saxon.parse_xml(xml_text=text, encoding="UTF-8")
                text = step.transform_to_string(xdm_node=node)
        except PySaxonApiError as exc:
            raise CDAValidatorError(f"{self.tree / 'schematrons' / sch}: cannot be turned into XSLT: {exc}") from exc
        # Another process may be generating the same file: each writes its own temp file, the rename is atomic.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
        log.info("cda.schematron.generated", schematron=sch, seconds=round(time.perf_counter() - start, 3))
        return out


def _text(data: bytes, doc: etree._ElementTree) -> str:
    """The document as text for Saxon (which takes ``str``), decoded as its XML declaration says."""
    try:
        return data.decode(doc.docinfo.encoding or "utf-8").lstrip("\ufeff")
    except (LookupError, UnicodeDecodeError):
        return etree.tostring(doc, encoding="unicode")


def _run(executable: PyXsltExecutable, node: PyXdmNode, sch: str) -> list[SchematronFinding]:
    try:
        svrl = executable.transform_to_string(xdm_node=node)
    except PySaxonApiError as exc:
        return [SchematronFinding(sch, "engine-error", f"the schematron could not run: {' '.join(str(exc).split())}")]
    findings = []
    root = etree.fromstring(svrl.encode("utf-8"))
    for el in root.iter(f"{{{SVRL_NS}}}failed-assert", f"{{{SVRL_NS}}}successful-report"):
        text_el = el.find(f"{{{SVRL_NS}}}text")
        text = " ".join("".join(text_el.itertext()).split()) if text_el is not None else ""
        findings.append(
            SchematronFinding(
                schematron=sch,
                kind=etree.QName(el).localname,
                text=text,
                location=el.get("location", ""),
                role=el.get("role", ""),
                flag=el.get("flag", ""),
                id=el.get("id", ""),
            )
        )
    return findings


def _check_tree(tree: Path) -> None:
    needed = [XSD, *(f"schematrons/moteur/{n}" for n in ENGINE), *(f"schematrons/{s}" for s in PROFILES)]
    missing = [n for n in needed if not (tree / n).is_file()]
    if missing:
        raise CDAValidatorError(
            f"{tree} is not a testContenuCDA tree (missing {', '.join(missing)}): use a checkout of {UPSTREAM_REPO}"
        )


def _prepare_copy(tree: Path, cache_dir: Path) -> Path:
    """``<cache_dir>/<key>/``: a writable copy of the tree's validation parts, made once per key."""
    work = cache_dir / tree_key(tree)
    if work.is_dir():
        return work
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{work.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    start = time.perf_counter()
    try:
        for part in TREE_PARTS:
            for dirpath, _, files in os.walk(tree / part):
                target = tmp / Path(dirpath).relative_to(tree)
                target.mkdir(parents=True, exist_ok=True)
                for name in files:
                    # copyfile, not copy2: the source may be read-only and the copy must take compiled files.
                    shutil.copyfile(Path(dirpath) / name, target / name)
        _fill_upstream_gaps(tmp)
        try:
            tmp.rename(work)
        except OSError:
            if not work.is_dir():  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cda.validators.copied", tree=str(tree), copy=str(work), seconds=round(time.perf_counter() - start, 3))
    return work


J07_VOC = "schematrons/profils/structurationMinimale/include/voc-1.2.250.1.213.1.1.5.471-DYNAMIC.xml"
J07_SVS = "jeuxDeValeurs/JDV_J07_XdsTypeCode_CISIS.xml"
DIRECTIVE_STUB = "schematrons/include/entrees/E_directiveAnticipee_int.sch"


def _fill_upstream_gaps(work: Path) -> None:
    """Write, when absent, the two files upstream testContenuCDA references without shipping them."""
    voc = work / J07_VOC
    if not voc.exists() and (work / J07_SVS).is_file():
        # The ART-DECOR vocabulary file the structuration-minimale schematron reads with doc(): the J07 value set
        # (typeCode of documents) converted from its IHE SVS form.
        svs = etree.parse(str(work / J07_SVS))
        ns = {"svs": "urn:ihe:iti:svs:2008"}
        value_set = svs.find(".//svs:ValueSet", ns)
        root = etree.Element("{urn:hl7-org:v3}valueSets", nsmap={None: "urn:hl7-org:v3", "hl7": "urn:hl7-org:v3"})
        out = etree.SubElement(root, "valueSet", nsmap={None: ""})
        if value_set is not None:
            for key in ("displayName", "id"):
                out.set(key, value_set.get(key, ""))
            out.set("name", value_set.get("displayName", ""))
        concepts = etree.SubElement(out, "conceptList")
        for concept in svs.iterfind(".//svs:Concept", ns):
            item = etree.SubElement(concepts, "concept")
            for key in ("code", "codeSystem", "displayName"):
                item.set(key, concept.get(key, ""))
            item.set("level", "0")
            item.set("type", "L")
        voc.parent.mkdir(parents=True, exist_ok=True)
        voc.write_bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))
    stub = work / DIRECTIVE_STUB
    if not stub.exists():
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text(
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            "<!-- Written by traboule: IHE.sch includes this pattern, which upstream does not ship. -->\n"
            '<pattern xmlns="http://purl.oclc.org/dsdl/schematron" id="E_directiveAnticipee_int"/>\n',
            encoding="utf-8",
        )


# A document that selects every schematron (the CR-IMG level-3 templateId): validating it loads their value sets.
WARM_DOCUMENT = (
    b'<ClinicalDocument xmlns="urn:hl7-org:v3"><templateId root="1.2.250.1.213.1.1.1.45" extension="2024.01"/>'
    b"</ClinicalDocument>"
)


# -- a validator kept between command-line runs --------------------------------------------------------------

SERVER_IDLE = 600.0  # seconds a validation server waits for its next document before it exits
SERVER_IDLE_ENV = "TRABOULE_CDA_SERVER_IDLE"  # overrides SERVER_IDLE (0: validate in the command's own process)
MAX_FRAME = 128 * 1024 * 1024  # bytes: a request or answer larger than this is refused (a CDA with a big PDF fits)
MAX_SERVER_LOG = 1024 * 1024  # bytes: the server's log is started afresh beyond
REQUEST_TIMEOUT = 5.0  # seconds for a client's whole request to arrive once it is connected
MAX_CLIENTS = 8  # connections a server reads at once; more wait in its listen queue
STOP_GRACE = 30.0  # seconds a stopping server waits for the validations under way
SOCKET_DIR = "servers"  # under the cache directory, mode 0700: only its owner reaches the sockets in it
MAX_SOCKET_PATH = 108  # bytes of sun_path, a Unix socket path with its terminating NUL
SECRET_SIZE = 32  # bytes of a server's secret (its .key file): each answer proves the server holds it


def server_idle() -> float:
    """``$TRABOULE_CDA_SERVER_IDLE`` seconds (0: no server), else :data:`SERVER_IDLE`."""
    value = os.environ.get(SERVER_IDLE_ENV, "").strip()
    if not value:
        return SERVER_IDLE
    try:
        idle = float(value)
    except ValueError:
        idle = -1.0
    if not (0 <= idle < float("inf")):
        log.warning("cda.server.bad_idle", variable=SERVER_IDLE_ENV, default=SERVER_IDLE)
        return SERVER_IDLE
    return idle


def server_address(tree: str | Path, cache_dir: str | Path | None = None) -> str | None:
    """The socket of the validation server for a tree and cache, ``<cache>/servers/<hash>.sock``, keyed by
    :func:`tree_key`: a changed tree or schematron, or another Saxon, gets another server. ``servers/`` is this
    user's own (mode 0700, checked before each use). None off Linux (no ``SO_PEERCRED``) or when the path is too
    long for a Unix socket (then validate in the process)."""
    if not sys.platform.startswith("linux"):
        return None
    tree = Path(tree).resolve()
    cache = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir().resolve()
    digest = hashlib.sha256(f"{os.getuid()}\0{tree}\0{cache}\0{tree_key(tree)}".encode()).hexdigest()[:24]
    path = cache / SOCKET_DIR / f"{digest}.sock"
    return str(path) if len(os.fsencode(path)) < MAX_SOCKET_PATH else None


class ServedValidator:
    """``validate`` through a validation server that keeps the compiled schematrons between runs.

    Saxon-HE cannot save a compiled stylesheet (exporting one needs Saxon-EE) and its fast compilation fails at run
    time on these schematrons, so compiling them (~7 s, the structuration minimale's 10 MB of XSLT) cannot be
    cached on disk. The first run starts ``python -m traboule.formats.cda_validation serve`` in the background;
    later runs
    hand their documents to it and get the report back in a fraction of a second. The server compiles in its own
    process and exits after ``idle`` seconds without a document (default :func:`server_idle`).

    Its socket is in a directory of this user's with mode 0700 (checked before use). The client sends nothing to a
    socket whose process is not this user's (``SO_PEERCRED``), and the server answers only its own user. Each
    answer carries an HMAC of the request's nonce keyed with the server's secret (a 0600 file beside the socket),
    and a report that does not show a parsed document run through the XSD and every schematron it selects is an
    error, never a pass.
    """

    def __init__(self, tree: str | Path, cache_dir: str | Path | None = None, idle: float | None = None) -> None:
        self.tree = Path(tree).resolve()
        _check_tree(self.tree)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.idle = server_idle() if idle is None else idle
        address = server_address(self.tree, self.cache_dir)
        if address is None:
            raise CDAValidatorError("a validation server needs Linux and a cache path short enough for a socket")
        self.address = address
        self.started = False  # whether this object started the server

    def validate(self, data: bytes, source: str = "") -> CDAValidationReport:
        request = {"op": "validate", "data": base64.b64encode(data).decode("ascii")}
        answer = self._call(request) or {}
        try:
            return _report_from(answer.get("report"), source)
        except (KeyError, TypeError, ValueError) as exc:
            raise CDAValidatorError(f"the validation server's report is incomplete, not trusted: {exc}") from None

    def running(self) -> bool:
        """Whether a server runs (or starts) for this tree and cache: it holds the lock beside its socket."""
        lock = _server_files(self.address)[2]
        if not _private_dir(lock.parent):
            return False
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def stop(self, wait: float = STOP_GRACE + 5) -> bool:
        """Ask the server to exit and wait (up to ``wait`` s) until it has; False when none runs."""
        if self._call({"op": "stop"}, start=False) is None:
            return False
        deadline = time.monotonic() + wait
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def _call(self, request: dict[str, Any], *, start: bool = True) -> dict[str, Any] | None:
        """The server's answer; None when none runs and ``start`` is false."""
        deadline = time.monotonic() + START_TIMEOUT
        child: subprocess.Popen[bytes] | None = None
        retried = False
        while True:
            sock = self._connect()
            if sock is None:
                if not start:
                    return None
                code = child.poll() if child is not None else 0
                if code == 0:  # none started yet, or the one started found another server (gone since)
                    child = self._spawn()
                elif code is not None:
                    raise CDAValidatorError(f"the validation server did not start: {self._log_tail()}")
                if time.monotonic() > deadline:
                    raise CDAValidatorError(f"the validation server did not answer within {START_TIMEOUT:g} s")
                time.sleep(0.1)
                continue
            try:
                with sock:
                    return self._exchange(sock, request, deadline)
            except _NoAnswer as exc:
                # A server exiting (idle) as we connected, or one that died on the document: once more.
                if retried or not start:
                    raise CDAValidatorError(str(exc)) from None
                retried = True

    def _connect(self) -> socket.socket | None:
        """A connection to the server's socket, None when none listens there."""
        if not _private_dir(Path(self.address).parent):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.address)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise CDAValidatorError(f"{self.address}: cannot connect: {exc.strerror}") from None
        return sock

    def _exchange(self, sock: socket.socket, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send the request once the peer is known to be this user's server (_NoAnswer: it closed without one)."""
        uid = _peer_uid(sock)
        if uid != os.getuid():
            raise CDAValidatorError(
                f"{self.address}: the process listening there is not this user's (uid {uid}): nothing sent to it"
            )
        secret = _read_secret(_server_files(self.address)[1])
        if secret is None:  # a server stopping between our connect and now, or not a server of ours
            raise _NoAnswer(
                f"{self.address}: no key beside the socket, nothing sent: not this user's validation server"
            )
        nonce = secrets.token_hex(16)
        try:
            _send(sock, {**request, "nonce": nonce}, deadline)
            answer = _receive(sock, deadline)
        except (ConnectionResetError, BrokenPipeError):
            answer = None
        except (OSError, ValueError) as exc:
            raise CDAValidatorError(f"the validation server's answer cannot be read: {exc}") from None
        if answer is None:
            raise _NoAnswer(f"the validation server stopped without an answer: {self._log_tail()}")
        if not hmac.compare_digest(str(answer.get("proof", "")), _proof(secret, nonce)):
            raise CDAValidatorError(f"{self.address}: the answer is not from this user's validation server")
        if "error" in answer:
            raise CDAValidatorError(f"the validation server: {str(answer['error'])[:500]}")
        return answer

    def _spawn(self) -> subprocess.Popen[bytes]:
        if not self.idle > 0:
            raise CDAValidatorError("a validation server needs an idle time above 0 s")
        _private_dir(Path(self.address).parent, create=True)
        module = "traboule.formats.cda_validation"
        command = [sys.executable, "-m", module, "serve", str(self.tree), str(self.cache_dir)]
        log_path = self._log_path()
        with contextlib.suppress(OSError):
            if log_path.stat().st_size > MAX_SERVER_LOG:
                log_path.unlink()
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(
                [*command, "--idle", str(self.idle)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,  # not stopped by the terminal's Ctrl-C: it outlives this run on purpose
            )
        self.started = True
        log.info("cda.server.started", pid=child.pid, idle=self.idle)
        return child

    def _log_path(self) -> Path:
        return self.cache_dir / "validation-server.log"

    def _log_tail(self) -> str:
        try:
            lines = self._log_path().read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"


class _NoAnswer(Exception):
    """The server closed the connection without answering (or left no key): worth one more try."""


def serve(tree: str | Path, cache_dir: str | Path | None, idle: float = SERVER_IDLE) -> int:
    """The validation server (see :class:`ServedValidator`); returns when idle for ``idle`` seconds, when asked to
    stop, or at once when another server holds the lock of the address."""
    address = server_address(tree, cache_dir)
    if address is None:
        raise CDAValidatorError("a validation server needs Linux and a cache path short enough for a socket")
    sock_path, key_path, lock_path = _server_files(address)
    _private_dir(sock_path.parent, create=True)
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another server runs: the client talks to it
            return 0
        for stale in (sock_path, key_path):  # left by a server that was killed
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        secret = secrets.token_bytes(SECRET_SIZE)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(secret)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen(64)  # clients wait here while the schematrons compile
            _Server(CDAValidator(tree, cache_dir), listener, sock_path, secret, idle).run()
        finally:
            listener.close()
            for path in (sock_path, key_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    finally:
        os.close(lock_fd)  # releases the lock: the server is gone
    return 0


class _Server:
    """The accept loop and a thread per connection: reading a request is bounded by :data:`REQUEST_TIMEOUT`
    outside any lock, so an idle connection holds up no one; validations run one at a time."""

    def __init__(
        self, validator: CDAValidator, listener: socket.socket, path: Path, secret: bytes, idle: float
    ) -> None:
        self.validator = validator
        self.listener = listener
        self.path = path
        self.secret = secret
        self.idle = idle
        self._validating = threading.Lock()  # compiled Saxon executables are not thread-safe
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._state = threading.Condition()
        self._active = 0
        self._last = time.monotonic()
        self._stop = threading.Event()

    def run(self) -> None:
        self.validator.compile_all()
        log.info("cda.server.ready", pid=os.getpid(), idle=self.idle)
        self._last = time.monotonic()
        while not self._stop.is_set():
            with self._state:
                if not self._active and time.monotonic() - self._last >= self.idle:
                    log.info("cda.server.idle_exit", pid=os.getpid())
                    break
            if not self._slots.acquire(timeout=0.5):
                continue
            self.listener.settimeout(0.5)
            try:
                conn, _ = self.listener.accept()
            except OSError:  # TimeoutError: look at the idle time and the stop request again
                self._slots.release()
                continue
            with self._state:
                self._active += 1
            threading.Thread(target=self._handle, args=(conn,), name="cda-client", daemon=True).start()
        with self._state:
            self._state.wait_for(lambda: not self._active, timeout=STOP_GRACE)

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                uid = _peer_uid(conn)
                if uid != os.getuid():
                    log.warning("cda.server.refused", uid=uid)
                    return
                request = _receive(conn, time.monotonic() + REQUEST_TIMEOUT)
                nonce = request.get("nonce") if request else None
                if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
                    return
                answer = self._answer(request or {})
                answer["proof"] = _proof(self.secret, nonce)
                _send(conn, answer, time.monotonic() + REQUEST_TIMEOUT)
        except (OSError, ValueError) as exc:  # a client gone, too slow, or a malformed request: the next one
            log.info("cda.server.request_dropped", error=type(exc).__name__)
        finally:
            with self._state:
                self._active -= 1
                self._last = time.monotonic()
                self._state.notify_all()
            self._slots.release()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "stop":
            self._stop.set()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # no new client from now on
            return {"stopped": True}
        if request.get("op") != "validate":
            return {"error": "bad request: unknown op"}
        try:
            data = base64.b64decode(str(request.get("data", "")), validate=True)
        except ValueError:
            return {"error": "bad request: data is not base64"}
        try:
            with self._validating:
                report = self.validator.validate(data)
        except CDAValidatorError as exc:
            return {"error": str(exc)}
        return {"report": dataclasses.asdict(report)}


def _server_files(address: str) -> tuple[Path, Path, Path]:
    """A server's socket, secret (``.key``) and lock (``.lock``, held while it runs)."""
    sock = Path(address)
    return sock, sock.with_suffix(".key"), sock.with_suffix(".lock")


def _private_dir(path: Path, *, create: bool = False) -> bool:
    """Whether ``path`` exists (made, mode 0700, with ``create``); CDAValidatorError when it is not a directory of
    this user's with mode 0700: another user could then reach or replace what is in it."""
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CDAValidatorError(
            f"{path}: not a directory of this user's with mode 0700 (owner uid {st.st_uid}, "
            f"mode {stat.S_IMODE(st.st_mode):o}): remove it"
        )
    return True


def _read_secret(path: Path) -> bytes | None:
    """A server's secret, None when absent; CDAValidatorError when the file is not this user's alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CDAValidatorError(f"{path}: cannot read the validation server's key: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as key_file:
        st = os.fstat(key_file.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise CDAValidatorError(f"{path}: the validation server's key is not this user's alone")
        secret = key_file.read(SECRET_SIZE + 1)
    return secret if len(secret) == SECRET_SIZE else None


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _proof(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode("ascii", "replace"), hashlib.sha256).hexdigest()


def _send(sock: socket.socket, body: dict[str, Any], deadline: float) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sock.sendall(struct.pack(">I", len(data)) + data)


def _receive(sock: socket.socket, deadline: float) -> dict[str, Any] | None:
    """One frame, all of it before ``deadline`` (else TimeoutError); None when the peer closed before it."""
    head = _read_exactly(sock, 4, deadline)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    data = _read_exactly(sock, size, deadline)
    if data is None:
        return None
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    parts, left = [], size
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the frame did not arrive in time")
        sock.settimeout(remaining)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


FINDING_KINDS = frozenset({"failed-assert", "successful-report", "engine-error"})


def _report_from(body: Any, source: str) -> CDAValidationReport:
    """A report from a server's answer, refused (ValueError, KeyError, TypeError) when it is not one a validation
    makes: a pass needs a parsed document, its XSD run and every schematron it selects run."""
    body = _typed(body, dict)
    document = None
    if body["document"] is not None:
        doc = _typed(body["document"], dict)
        level = doc["level"]
        if level is not None and (type(level) is not int or level not in (1, 3)):
            raise ValueError(f"document level {level!r}")
        document = DocumentType(
            name=_typed(doc["name"], str),
            level=level,
            template_ids=tuple(_typed(t, str) for t in _typed(doc["template_ids"], list)),
            code=_typed(doc["code"], str),
        )
    findings = []
    for item in _typed(body["findings"], list):
        item = _typed(item, dict)
        finding = SchematronFinding(
            **{f.name: _typed(item[f.name], str) for f in dataclasses.fields(SchematronFinding)}
        )
        if finding.kind not in FINDING_KINDS:
            raise ValueError(f"finding kind {finding.kind!r}")
        findings.append(finding)
    report = CDAValidationReport(
        source=source,
        document=document,
        xml_error=_typed(body["xml_error"], str),
        xsd_errors=[
            XSDError(_typed(e["line"], int), _typed(e["message"], str)) for e in _typed(body["xsd_errors"], list)
        ],
        findings=findings,
        schematrons=tuple(_typed(s, str) for s in _typed(body["schematrons"], list)),
        timings={_typed(k, str): float(_typed(v, (int, float))) for k, v in _typed(body["timings"], dict).items()},
    )
    if report.document is None:
        if not report.xml_error:
            raise ValueError("no parsed document and no XML error")
        return report
    if report.schematrons != schematrons_for(report.document):
        raise ValueError("not the schematrons the document selects")
    engine_error = any(f.kind == "engine-error" for f in report.findings)
    if "xsd" not in report.timings or not (engine_error or all(s in report.timings for s in report.schematrons)):
        raise ValueError("a validation step did not run")
    return report


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"unexpected {type(value).__name__}")
    return value


START_TIMEOUT = 600.0  # seconds for the worker to start and compile (a cold cache on a slow disk included)
VALIDATE_TIMEOUT = 120.0  # seconds for one document (~0.1 s for a report, ~1.5 s for a large one)
PROCESSES_ENV = "TRABOULE_CDA_PROCESSES"  # validation processes when the channel does not say
MAX_DEFAULT_PROCESSES = 4  # the default (one per core) stops here: each process holds ~0.7 GB of compiled schematrons
MAX_PROCESSES = 64  # what a setting may ask for


def processes_setting(value: Any, where: str) -> int:
    """A number of validation processes from a setting: a whole number from 1 to :data:`MAX_PROCESSES`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROCESSES:
        raise ConfigError(f"{where} must be a whole number from 1 to {MAX_PROCESSES}, not {value!r}")
    return value


def default_processes() -> int:
    """``$TRABOULE_CDA_PROCESSES``, else one per core this process may run on (``sched_getaffinity``), at most
    :data:`MAX_DEFAULT_PROCESSES`."""
    value = os.environ.get(PROCESSES_ENV, "").strip()
    if value:
        try:
            return processes_setting(value, PROCESSES_ENV)
        except ConfigError:
            log.warning("cda.processes.bad_setting", variable=PROCESSES_ENV)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_PROCESSES))


class _Worker:
    """One worker process holding a :class:`CDAValidator`, started on first use, started anew when it died."""

    def __init__(self, tree: Path, cache_dir: Path) -> None:
        self.tree = tree
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._pool: Any = None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        pool = self._pool
        processes = list(getattr(pool, "_processes", None) or {})
        return processes[0] if processes else None

    @property
    def started(self) -> bool:
        return self._pool is not None

    def _kill(self, pool: Any) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        for process in list(getattr(pool, "_processes", {}).values()):  # no public API to stop a busy worker
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn: Any, *args: Any, timeout: float | None = None) -> Any:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        for attempt in (1, 2):
            with self._lock:
                if self._pool is None:
                    context = multiprocessing.get_context("spawn")
                    self._pool = ProcessPoolExecutor(
                        1, mp_context=context, initializer=_worker_start, initargs=(str(self.tree), str(self.cache_dir))
                    )
                pool = self._pool
            try:
                return pool.submit(fn, *args).result(timeout=timeout)
            except TimeoutError:
                # A worker stuck in a transform would hold every report behind it: end it, the next call starts anew.
                self._kill(pool)
                raise
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class ProcessValidator:
    """:class:`CDAValidator` s in worker processes of their own, with the same ``validate`` / ``compile_all``.

    Saxon holds the GIL while it transforms: validating in the engine's process would stall its event loop (every
    connection's ACK) for the length of each validation, and validate one document at a time. Here the calling
    thread only waits on a worker, and ``processes`` workers (default :func:`default_processes`) validate that many
    documents at once, one each: a call takes an idle worker (one already started first) or waits for one. Workers
    are started with ``spawn`` (no forked copy of the engine's threads), on first use or all at once by
    :meth:`warm`; one that died is started anew by the next call it gets, one stuck past ``VALIDATE_TIMEOUT`` is
    ended. :meth:`close` stops them all.
    """

    def __init__(self, tree: str | Path, cache_dir: str | Path | None = None, processes: int | None = None) -> None:
        self.tree = Path(tree).resolve()
        _check_tree(self.tree)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.processes = default_processes() if processes is None else processes_setting(processes, "processes")
        self._workers = [_Worker(self.tree, self.cache_dir) for _ in range(self.processes)]
        self._idle = list(reversed(self._workers))  # a stack: the worker used last (started, warm) is taken first
        self._free = threading.Condition()
        atexit.register(self.close)  # stop the workers before the interpreter tears down

    @property
    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [pid for w in self._workers if (pid := w.pid) is not None]

    @contextlib.contextmanager
    def _worker(self) -> Any:
        with self._free:
            self._free.wait_for(lambda: bool(self._idle))
            # A running one first (used last: warm), one to start (never started, or ended) only when none is idle.
            worker = next((w for w in reversed(self._idle) if w.pid is not None), self._idle[-1])
            self._idle.remove(worker)
        try:
            yield worker
        finally:
            with self._free:
                self._idle.append(worker)
                self._free.notify()

    def _each(self, fn: Any) -> list[Any]:
        """``fn`` run on every worker at once (started when needed); the first error is raised once all ended."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.processes, thread_name_prefix="cda-start") as threads:
            futures = [threads.submit(w.submit, fn, timeout=START_TIMEOUT) for w in self._workers]
        return [f.result() for f in futures]

    def compile_all(self) -> dict[str, float]:
        """Start every worker and compile its schematrons; the seconds each schematron took (the slowest worker)."""
        timings: dict[str, float] = {}
        for found in self._each(_worker_compile):
            for sch, seconds in found.items():
                timings[sch] = max(seconds, timings.get(sch, 0.0))
        return timings

    def warm(self) -> None:
        """Start every worker, compile and run every schematron once in each (see ``CDAValidator.warm``)."""
        self._each(_worker_warm)

    def validate(self, data: bytes, source: str = "") -> CDAValidationReport:
        """Raises ``TimeoutError`` after ``VALIDATE_TIMEOUT`` (the worker is then replaced)."""
        with self._worker() as worker:
            return worker.submit(_worker_validate, data, source, timeout=VALIDATE_TIMEOUT)  # type: ignore[no-any-return]

    def close(self) -> None:
        for worker in self._workers:
            worker.close()


_WORKER: CDAValidator | None = None


def _worker_start(tree: str, cache_dir: str) -> None:
    global _WORKER
    _WORKER = CDAValidator(tree, cache_dir)


def _worker_compile() -> dict[str, float]:
    assert _WORKER is not None
    return _WORKER.compile_all()


def _worker_warm() -> None:
    assert _WORKER is not None
    _WORKER.warm()


def _worker_validate(data: bytes, source: str) -> CDAValidationReport:
    assert _WORKER is not None
    return _WORKER.validate(data, source)


def _main(argv: list[str] | None = None) -> int:
    """``python -m traboule.formats.cda_validation serve TREE CACHE [--idle SECONDS]``: the validation server."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m traboule.formats.cda_validation")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve", help="keep compiled schematrons for the command line's validations")
    server.add_argument("tree", type=Path)
    server.add_argument("cache", type=Path)
    server.add_argument("--idle", type=float, default=SERVER_IDLE)
    args = parser.parse_args(argv)
    try:
        return serve(args.tree, args.cache, args.idle)
    except CDAValidatorError as exc:
        print(f"CDA validators: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
