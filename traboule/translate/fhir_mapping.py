"""Canonical model → FHIR R4 JSON (ServiceRequest, Patient), driven by ``mappings/fhir.yaml``.

The mapping file gives the identifier systems (per kind, per issuer, or ``urn:oid:`` from the identifier's OID),
the code systems (``tables/fhir_code_systems.csv``) and the value maps (request status, priority, gender). All
of it is checked at load: a wrong key, URI, regex, time zone or a table value that is not a code of the FHIR value
set fails with ``file:line: reason``.

Resource ids are derived from identifiers (a hash of ``system|value``), so a redelivered or updated order writes
the same resource. The Patient follows FR Core 2.1.0 (INS traits, identity status, ``meta.profile``:
`fr_core_profiles`). ``merge_patient`` lays a message's view of a Patient over the stored one (identifiers a union,
an INS never swapped, demographics from the latest message that has them).
"""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from traboule import model
from traboule.errors import CDAError, MappingError
from traboule.formats.fhir_codes import IS_DELETED, STUDY_UID_TYPE  # PDSm's deletion flag, referenceIdList type
from traboule.translate import cda
from traboule.translate.cda import CCAM_OIDS, FACILITY_SYSTEM, PRACTICE_SYSTEM, REPORT_CODE, read_header
from traboule.translate.document_ids import entry_uuid  # the DocumentEntry's entryUUID, the DMP's too
from traboule.translate.mapping import MAPPINGS_DIR, CodeTable, Node, line_of, load_tables, load_yaml
from traboule.translate.xds_metadata import (
    ACCESSION,
    CLASS_OF_TYPE,
    CLASS_SCHEME,
    FORMAT_OF_LEVEL,
    FORMAT_SCHEME,
    MASKING_SCHEME,
    ORDER,
)

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
REQUEST_STATUS = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
REQUEST_PRIORITY = {"routine", "urgent", "asap", "stat"}
GENDER = {"male", "female", "other", "unknown"}
IDENTIFIER_USE = {"usual", "official", "temp", "secondary", "old"}
ORDER_KINDS = {"placer": "PLAC", "filler": "FILL", "accession": "ACSN"}
ORDER_ATTRS = {"placer": "placer_order_number", "filler": "filler_order_number", "accession": "accession_number"}
ID_KINDS = (*ORDER_KINDS, "patient", "ins", "requester")
TABLES = {  # table name → (value column, allowed values)
    "code_systems": ("system", None),
    "request_status": ("status", REQUEST_STATUS),
    "priority": ("fhir", REQUEST_PRIORITY),
    "gender": ("gender", GENDER),
}
_URI = re.compile(r"^(urn:oid:[0-2](\.(0|[1-9]\d*))+|urn:uuid:[0-9a-f-]{36}|urn:[a-z0-9][a-z0-9-]*:\S+|https?://\S+)$")
_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
_LOCAL_SYSTEM = re.compile(r"^(L|99\w*|LOCAL)?$", re.IGNORECASE)


# FR Core (hl7.fhir.fr.core 2.1.0): the Patient profiles and the extensions they define. The URLs are the profile's;
# the code systems an integrator may change are in fhir.yaml (`fr_core`). ``meta.profile`` names the version the
# resource is built for: later versions moved (2.2.0: INS-NIA use official, identity status from its own code system).
FR_CORE = "https://hl7.fr/ig/fhir/core/StructureDefinition/"
FR_CORE_VERSION = "2.1.0"
FR_CORE_PATIENT = f"{FR_CORE}fr-core-patient|{FR_CORE_VERSION}"
FR_CORE_PATIENT_INS = f"{FR_CORE}fr-core-patient-ins|{FR_CORE_VERSION}"
IDENTITY_RELIABILITY = FR_CORE + "fr-core-identity-reliability"
BIRTH_LIST_GIVEN_NAME = FR_CORE + "fr-core-patient-birth-list-given-name"
INSEE_CODE = FR_CORE + "fr-core-address-insee-code"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
IDENTITY_STATUS_SYSTEM = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"  # fhir.yaml fr_core defaults
INSEE_CODE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R13-CommuneOM/FHIR/TRE-R13-CommuneOM"
# INS identifier slices of fr-core-patient-ins: OID → use. INS-NIR (and its test / demo forms) official, INS-NIA (an
# INS awaiting its NIR) temp; INS-C (computed from the Vitale card, FR Core Patient's slice) secondary.
INS_USES = {
    "1.2.250.1.213.1.4.8": "official",
    "1.2.250.1.213.1.4.9": "temp",
    "1.2.250.1.213.1.4.10": "official",
    "1.2.250.1.213.1.4.11": "official",
    "1.2.250.1.213.1.4.2": "secondary",
}
INS_CODES = {"INS-NIR", "INS-NIA", "INS-NIR-TEST", "INS-NIR-DEMO"}
INS_SYSTEMS = {f"urn:oid:{oid}" for oid in model.INS_OIDS}
# Identity statuses of a qualified identity, the only one that may carry the INS (FR Core Patient INS: "Le matricule
# INS ne peut être véhiculé que dans le cas d'une identité qualifiée"): VALI (FR Core's fr-core-1 ties it to the INS,
# and PAM-FR senders use it so) and QUAL (the RNIV's "identité qualifiée").
QUALIFIED = ("VALI", "QUAL")
_CODE = re.compile(r"^[A-Za-z0-9-]{1,16}$")
_INSEE = re.compile(r"^[0-9](?:[0-9]|[AB])[0-9]{3}$")  # COG: 5 characters, Corsica 2A / 2B


def resource_id(*parts: str) -> str:
    """A FHIR id (``[A-Za-z0-9.-]{1,64}``) derived from identifying text: the same input, the same id."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def key_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The identifier a resource's id derives from: what a FHIR server is asked to match it on (conditional update).

    ImagingStudy: its ``urn:dicom:uid``. Patient and ServiceRequest: the identifier whose hash is the id; a Patient
    whose local identifier took its assigning authority's system later (its id stays) is matched on that identifier.
    """
    rtype, rid = resource["resourceType"], resource.get("id", "")
    # DocumentReference: its id derives from the masterIdentifier (FHIR's identifier search covers it too).
    for ident in [
        *(resource.get("identifier") or []),
        *([resource["masterIdentifier"]] if "masterIdentifier" in resource else []),
    ]:
        system, value = ident.get("system", ""), ident.get("value", "")
        if not value:
            continue
        if rtype == "ImagingStudy" and system == "urn:dicom:uid":
            return ident
        if resource_id(rtype, system, value) == rid:
            return ident
    if rtype == "Patient":
        return next((i for i in resource.get("identifier") or [] if i.get("value") and not is_ins(i)), None)
    return None


def _is_ins(ident: model.Identifier) -> bool:
    return ident.type == "INS" or ident.issuer_oid in model.INS_OIDS


def is_ins(ident: dict[str, Any]) -> bool:
    """A FHIR Patient identifier made from an INS: ``use: official`` (INS-NIR), or an INS type or system (an INS-NIA
    is ``temp``). A local identifier (IPP) is ``usual``."""
    codes = {c.get("code") for c in (ident.get("type") or {}).get("coding") or []}
    return ident.get("use") == "official" or bool(codes & INS_CODES) or ident.get("system") in INS_SYSTEMS


def merge_patient(
    stored: dict[str, Any], latest: dict[str, Any], *, replace_ins: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stored Patient updated by the latest message's view of it, and the INS identifiers refused.

    Identifiers are a union (same system and value: the latest's wording); an INS whose system the Patient already
    has under another value is refused, never swapped (the orders channel refuses such a message at ingest), unless
    ``replace_ins`` (a patient update from the identity system: ``PatientUpdate.authoritative``): then it replaces
    the Patient's INS of that system.
    Demographics (names, gender, birth date, identity status, birthplace) follow the latest view where it has
    them; what it lacks is kept. The stored id, ``active`` and ``link`` (a merge) stay; ``meta.profile`` is the
    merged Patient's."""
    identifiers = [dict(i) for i in stored.get("identifier") or []]
    refused = []
    for ident in latest.get("identifier") or []:
        key = (ident.get("system", ""), ident.get("value", ""))
        at = next((n for n, i in enumerate(identifiers) if (i.get("system", ""), i.get("value", "")) == key), None)
        if at is not None:
            identifiers[at] = dict(ident)
        elif is_ins(ident) and any(is_ins(i) and i.get("system", "") == key[0] for i in identifiers):
            if not replace_ins:
                refused.append(ident)
                continue
            identifiers = [i for i in identifiers if not (is_ins(i) and i.get("system", "") == key[0])]
            identifiers.append(dict(ident))
        else:
            identifiers.append(dict(ident))
    merged = {k: v for k, v in stored.items() if k != "meta"} | {"identifier": identifiers}
    extensions = _merged_extensions(stored.get("extension") or [], latest.get("extension") or [])
    if extensions:
        merged["extension"] = extensions
    for key in ("gender", "birthDate"):
        if latest.get(key):
            merged[key] = latest[key]
    names, known = latest.get("name") or [], stored.get("name") or []
    if len(names) == 1 and _has_birth_list(names[0]):
        # The birth name with its INS traits only (PID-5 type L alone): the name in use known stays.
        merged["name"] = [*(n for n in known if n.get("use") == "usual"), names[0]]
    elif len(names) == 1 and any(n.get("use") == "usual" for n in known):
        # The name in use only (an MPPS, an ADT without PID-5 type L): the birth name known stays (an INS trait).
        merged["name"] = [{**names[0], "use": "usual"}, *(n for n in known if n.get("use") != "usual")]
    elif names:
        merged["name"] = names
    return with_profiles(merged), refused


def _merged_extensions(known: list[dict[str, Any]], latest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Extensions by URL: the latest message's where it has them (identity status, birthplace), the known ones
    otherwise, in their place."""
    given = {e.get("url") for e in latest}
    out: list[dict[str, Any]] = []
    placed: set[Any] = set()
    for ext in known:
        url = ext.get("url")
        if url not in given:
            out.append(ext)
        elif url not in placed:
            out += [e for e in latest if e.get("url") == url]
            placed.add(url)
    return out + [e for e in latest if e.get("url") not in placed]


def _has_birth_list(name: dict[str, Any]) -> bool:
    return any(e.get("url") == BIRTH_LIST_GIVEN_NAME for e in name.get("extension") or [])


def with_profiles(patient: dict[str, Any]) -> dict[str, Any]:
    """The Patient with ``meta.profile`` naming the FR Core profiles it conforms to (none: no ``meta.profile``)."""
    meta = {k: v for k, v in (patient.get("meta") or {}).items() if k != "profile"}
    profiles = fr_core_profiles(patient)
    if profiles:
        meta["profile"] = profiles
    if meta:
        return {**patient, "meta": meta}
    return {k: v for k, v in patient.items() if k != "meta"}


def fr_core_profiles(patient: dict[str, Any]) -> list[str]:
    """The FR Core profiles a Patient resource conforms to, checked on the resource (what the FHIR R4 model does not
    check: cardinalities, slices, bindings of hl7.fhir.fr.core 2.1.0). ``fr-core-patient`` wants an official name
    (the birth name) with a family name and a given name, a system on every local identifier (PI), a gender of
    its value set (male, female, unknown). ``fr-core-patient-ins`` adds the INS: a qualified identity status
    (`QUALIFIED`), an INS identifier of its slices (INS-NIR official, INS-NIA temp), one official name whose
    ``given`` is the first given name and whose birth-list-given-name extension lists every given name at birth,
    gender, birth date and the birthplace with its INSEE code."""
    names = patient.get("name") or []
    official = [n for n in names if n.get("use") == "official"]
    if any(not n.get("family") or not n.get("given") for n in official):
        return []
    if patient.get("gender") not in (None, "male", "female", "unknown"):
        return []
    for ident in patient.get("identifier") or []:
        codes = {c.get("code") for c in (ident.get("type") or {}).get("coding") or [] if c.get("system") == V2_0203}
        if "PI" in codes and not (ident.get("system") and ident.get("value")):
            return []
    return [FR_CORE_PATIENT, FR_CORE_PATIENT_INS] if _fr_core_ins(patient, official) else [FR_CORE_PATIENT]


def _fr_core_ins(patient: dict[str, Any], official: list[dict[str, Any]]) -> bool:
    extensions = patient.get("extension") or []
    statuses = [
        (sub.get("valueCoding") or {}).get("code")
        for ext in extensions
        if ext.get("url") == IDENTITY_RELIABILITY
        for sub in ext.get("extension") or []
        if sub.get("url") == "identityStatus"
    ]
    if not any(s in QUALIFIED for s in statuses):
        return False
    ins = [i for i in patient.get("identifier") or [] if _ins_slice(i)]
    if not ins:
        return False
    uses = [i.get("use") for i in patient.get("identifier") or []]
    nia = any(i.get("system") == "urn:oid:1.2.250.1.213.1.4.9" for i in ins)
    if "VALI" in statuses and uses.count("official") != 1 and not nia:  # fr-core-2
        return False
    places = [e for e in extensions if e.get("url") == BIRTH_PLACE]
    inseecodes = [
        e for p in places for e in (p.get("valueAddress") or {}).get("extension") or [] if e.get("url") == INSEE_CODE
    ]
    if len(places) != 1 or len(inseecodes) != 1 or not (inseecodes[0].get("valueCoding") or {}).get("code"):
        return False
    if patient.get("gender") not in ("male", "female", "unknown") or not patient.get("birthDate"):
        return False
    if len(official) != 1 or len(official[0].get("given") or []) != 1:
        return False
    lists = [e for e in official[0].get("extension") or [] if e.get("url") == BIRTH_LIST_GIVEN_NAME]
    return len(lists) == 1 and bool(lists[0].get("valueString"))


def _ins_slice(ident: dict[str, Any]) -> bool:
    """An identifier of one of fr-core-patient-ins's INS slices: its system, type code and use."""
    system, value = ident.get("system", ""), ident.get("value")
    oid = system.removeprefix("urn:oid:")
    codes = {c.get("code") for c in (ident.get("type") or {}).get("coding") or []}
    expected = {"1.2.250.1.213.1.4.9": "temp"}.get(oid, "official")
    return system in INS_SYSTEMS and bool(value and codes & INS_CODES) and ident.get("use") == expected


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class IdentifierSystems:
    """How one kind of identifier gets its FHIR system."""

    def __init__(self, system: str = "", issuers: dict[str, str] | None = None):
        self.system = system
        self.issuers = issuers or {}

    def of(self, ident: model.Identifier) -> str:
        if ident.issuer_oid and _OID.match(ident.issuer_oid):
            return f"urn:oid:{ident.issuer_oid}"
        return self.issuers.get(ident.issuer, "") or self.system

    def given(self, ident: model.Identifier) -> bool:
        """Whether the system comes from the identifier's own assigning authority (an OID, or a namespace listed
        under ``issuers``), not from the kind's default ``system``."""
        return bool(ident.issuer_oid and _OID.match(ident.issuer_oid)) or bool(self.issuers.get(ident.issuer))


class FHIRMapping:
    """Compiled ``fhir.yaml``: ``patient`` and ``service_request`` build FHIR R4 resources as JSON dicts."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else MAPPINGS_DIR / "fhir.yaml"
        doc = load_yaml(self.path)
        if not isinstance(doc, Node):
            raise MappingError(self.path, getattr(doc, "line", 1), "expected a mapping of sections")
        known = {"kind", "version", "description", "tables", "timezone", "identifiers", "codes", "fr_core"}
        for key in doc:
            if key not in known:
                raise MappingError(self.path, line_of(doc, key), f"unknown section {key!r} (expected {sorted(known)})")
        if doc.get("kind", "canonical-to-fhir") != "canonical-to-fhir":
            raise MappingError(self.path, line_of(doc, "kind"), "kind must be 'canonical-to-fhir'")
        self.tables = load_tables(doc.get("tables"), self.path.parent, self.path, line_of(doc, "tables"))
        for name, (column, allowed) in TABLES.items():
            table = self.tables.get(name)
            line = line_of(doc.get("tables"), name) or line_of(doc, "tables")
            if table is None:
                raise MappingError(self.path, line, f"tables: {name!r} is required")
            self._check_table(table, column, allowed, line)
        self.timezone = self._timezone(doc)
        self.systems = self._identifiers(doc.get("identifiers") or Node(), line_of(doc, "identifiers"))
        codes = doc.get("codes") or Node()
        if not isinstance(codes, Node):
            raise MappingError(self.path, line_of(doc, "codes"), "'codes' must be a mapping")
        for key in codes:
            if key != "local":
                raise MappingError(self.path, line_of(codes, key), f"codes: unknown key {key!r} (expected 'local')")
        self.local_code_system = self._uri(codes.get("local", ""), line_of(codes, "local"), "codes.local")
        self._fr_core(doc.get("fr_core") or Node(), line_of(doc, "fr_core"))

    # -- load-time checks ------------------------------------------------------------------------------------

    def _check_table(self, table: CodeTable, column: str, allowed: set[str] | None, line: int) -> None:
        if column not in table.columns:
            raise MappingError(self.path, line, f"table {table.name!r} needs a column {column!r} ({table.columns})")
        for row in table.rows:
            value = row.get(column, "")
            bad = (value not in allowed) if allowed is not None else not _URI.match(value)
            if bad:
                expected = f"one of {sorted(allowed)}" if allowed else "a URI (http(s)://... or urn:oid:...)"
                raise MappingError(
                    self._table_file(table.name), self._row_line(table.name, row), f"{value!r} is not {expected}"
                )

    def _table_file(self, name: str) -> Path:
        doc = load_yaml(self.path)
        spec = doc["tables"][name]
        return (self.path.parent / (spec if isinstance(spec, str) else spec["file"])).resolve()

    def _row_line(self, name: str, row: dict[str, str]) -> int:
        """The CSV line of a row (same line filtering as ``load_table``: blank and ``#`` lines are skipped)."""
        data_lines = [
            n
            for n, text in enumerate(self._table_file(name).read_text(encoding="utf-8").splitlines(), start=1)
            if text.strip() and not text.lstrip().startswith("#")
        ]
        index = self.tables[name].rows.index(row) + 1  # + header
        return data_lines[index] if index < len(data_lines) else 0

    def _timezone(self, doc: Node) -> ZoneInfo | None:
        name = doc.get("timezone", "")
        if not name:
            return None
        if not isinstance(name, str):
            raise MappingError(self.path, line_of(doc, "timezone"), "timezone: expected a time zone name")
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise MappingError(self.path, line_of(doc, "timezone"), f"unknown time zone {name!r}") from exc

    def _uri(self, value: Any, line: int, what: str) -> str:
        if not isinstance(value, str):
            raise MappingError(self.path, line, f"{what}: expected a URI")
        if value and not _URI.match(value):
            raise MappingError(self.path, line, f"{what}: {value!r} is not a URI (http(s)://... or urn:oid:...)")
        return value

    def _fr_core(self, node: Any, line: int) -> None:
        """The code systems of FR Core's Patient extensions: the identity status (PID-32) and the INSEE code of the
        birthplace."""
        if not isinstance(node, Node):
            raise MappingError(self.path, line, "'fr_core' must be a mapping")
        for key in node:
            if key not in ("identity_status_system", "insee_code_system"):
                raise MappingError(
                    self.path,
                    line_of(node, key),
                    f"fr_core: unknown key {key!r} (expected identity_status_system, insee_code_system)",
                )
        lines = {key: line_of(node, key) for key in node}  # a section left out has no lines: FR Core's systems
        self.identity_status_system = self._uri(
            node.get("identity_status_system", IDENTITY_STATUS_SYSTEM),
            lines.get("identity_status_system", line),
            "fr_core",
        )
        self.insee_code_system = self._uri(
            node.get("insee_code_system", INSEE_CODE_SYSTEM), lines.get("insee_code_system", line), "fr_core"
        )

    def _identifiers(self, node: Any, line: int) -> dict[str, IdentifierSystems]:
        if not isinstance(node, Node):
            raise MappingError(self.path, line, "'identifiers' must be a mapping")
        out: dict[str, IdentifierSystems] = {}
        for kind in node:
            if kind not in ID_KINDS:
                raise MappingError(self.path, line_of(node, kind), f"identifiers: unknown kind {kind!r} {ID_KINDS}")
        for kind in ID_KINDS:
            spec = node.get(kind) or Node()
            if not isinstance(spec, Node):
                raise MappingError(self.path, line_of(node, kind), f"identifiers.{kind}: expected a mapping")
            allowed = {"system", "issuers"} | (
                {"type_system", "types", "uses"} if kind == "ins" else {"match"} if kind == "requester" else set()
            )
            for key in spec:
                if key not in allowed:
                    raise MappingError(
                        self.path, line_of(spec, key), f"identifiers.{kind}: unknown key {key!r} ({sorted(allowed)})"
                    )
            system = self._uri(spec.get("system", ""), line_of(spec, "system"), f"identifiers.{kind}.system")
            issuers = spec.get("issuers") or Node()
            if not isinstance(issuers, Node):
                raise MappingError(self.path, line_of(spec, "issuers"), f"identifiers.{kind}.issuers: map issuers")
            out[kind] = IdentifierSystems(
                system,
                {k: self._uri(v, line_of(issuers, k), f"identifiers.{kind}.issuers.{k}") for k, v in issuers.items()},
            )
            if kind == "ins":
                self.ins_type_system = self._uri(
                    spec.get("type_system", ""), line_of(spec, "type_system"), "identifiers.ins.type_system"
                )
                types = spec.get("types") or Node()
                if not isinstance(types, Node):
                    raise MappingError(self.path, line_of(spec, "types"), "identifiers.ins.types: map OID → code")
                for oid, code in types.items():
                    if not _OID.match(oid) or not isinstance(code, str):
                        raise MappingError(
                            self.path,
                            line_of(types, oid),
                            f"identifiers.ins.types: map an OID to a type code ({oid!r})",
                        )
                self.ins_types = dict(types)
                uses = spec.get("uses") or Node()
                if not isinstance(uses, Node):
                    raise MappingError(self.path, line_of(spec, "uses"), "identifiers.ins.uses: map OID → use")
                for oid, use in uses.items():
                    if oid not in self.ins_types or not isinstance(use, str) or use not in IDENTIFIER_USE:
                        raise MappingError(
                            self.path,
                            line_of(uses, oid),
                            f"identifiers.ins.uses: {oid!r} must be listed under types and {use!r} one of "
                            f"{sorted(IDENTIFIER_USE)}",
                        )
                self.ins_uses = {**INS_USES, **dict(uses)}
            if kind == "requester":
                if not isinstance(spec.get("match", ""), str):
                    raise MappingError(self.path, line_of(spec, "match"), "requester.match: expected a regex")
                try:
                    self.requester_match = re.compile(spec.get("match", "") or "^$")
                except re.error as exc:
                    raise MappingError(self.path, line_of(spec, "match"), f"requester.match: bad regex: {exc}") from exc
        return out

    # -- values ----------------------------------------------------------------------------------------------

    def code_system(self, hl7_system: str) -> str:
        found = self.tables["code_systems"].lookup((hl7_system,), "system")
        if found:
            return found
        if _OID.match(hl7_system):
            return f"urn:oid:{hl7_system}"
        if hl7_system.startswith(("http://", "https://", "urn:")):
            return hl7_system
        return self.local_code_system  # L, 99xxx, empty, or unknown to the table

    def request_status(self, order: model.ImagingOrder) -> str:
        step_status = order.steps[0].status if order.steps else "SCHEDULED"
        statuses = {s.status for s in order.steps} or {step_status}
        # All steps finished the same way → that status; otherwise the first step's.
        if len(statuses) == 1:
            step_status = next(iter(statuses))
        return self.tables["request_status"].lookup((order.action, step_status), "status") or "unknown"

    def priority(self, value: str) -> str:
        return self.tables["priority"].lookup((value.upper(),), "fhir") or ""

    def gender(self, sex: str) -> str:
        return self.tables["gender"].lookup((sex.upper(),), "gender") or ""

    def date_time(self, dtm: str) -> str:
        """HL7 DTM (YYYY[MM[DD[HH[MM[SS]]]]], zone-less after the inbound mapping) → FHIR dateTime with the same
        precision. A time is sent only with `timezone` configured (FHIR requires a zone with a time); the offset
        is that zone's on that date. A zone in the DTM itself (+HHMM) is kept."""
        text = dtm.strip()
        match = re.match(r"^(\d{4,14})(?:\.\d+)?([+-]\d{4})?$", text)
        if not match:
            return ""
        digits, zone = match.group(1), match.group(2) or ""
        if len(digits) not in (4, 6, 8, 10, 12, 14):
            return ""
        parts = [digits[0:4], digits[4:6], digits[6:8], digits[8:10], digits[10:12], digits[12:14]]
        try:
            if len(digits) <= 8:
                year, month, day = parts[:3]
                datetime(int(year), int(month or 1), int(day or 1))  # validates
                return "-".join(p for p in (year, month, day) if p)
            stamp = datetime(*(int(p or 0) for p in parts))  # type: ignore[misc]
        except ValueError:
            return ""
        if zone:
            return stamp.isoformat() + f"{zone[:3]}:{zone[3:]}"
        if self.timezone is None:
            return stamp.date().isoformat()
        return stamp.replace(tzinfo=self.timezone).isoformat()

    # -- identifiers -----------------------------------------------------------------------------------------

    def identifier_system(self, kind: str, ident: model.Identifier) -> str:
        return self.systems[kind].of(ident)

    def patient_system_given(self, ident: model.Identifier) -> bool:
        """Whether a local patient identifier names its assigning authority (else it gets the default system)."""
        return self.systems["patient"].given(ident)

    def national(self, ident: model.Identifier) -> bool:
        """An INS (type INS or an INS OID), or another national identifier ``identifiers.ins.types`` lists (INS-C)."""
        return _is_ins(ident) or ident.issuer_oid in self.ins_types

    def patient_identifier(self, ident: model.Identifier) -> dict[str, Any]:
        if self.national(ident):
            # FR Core Patient INS slices: INS-NIR official, INS-NIA temp; FR Core Patient's INS-C: secondary.
            out: dict[str, Any] = {"use": self.ins_uses.get(ident.issuer_oid, "official")}
            code = self.ins_types.get(ident.issuer_oid)
            if code and self.ins_type_system:
                out["type"] = {"coding": [{"system": self.ins_type_system, "code": code}]}
            out["system"] = self.systems["ins"].of(ident)
        else:
            out = {"use": "usual"}
            if ident.type:
                out["type"] = {"coding": [{"system": V2_0203, "code": ident.type}]}
            out["system"] = self.systems["patient"].of(ident)
        if not out["system"]:
            del out["system"]
        out["value"] = ident.value
        return out

    def patient_id(self, p: model.Patient) -> str:
        primary = p.primary_id
        if primary is None or not primary.value:
            raise ValueError("patient without identifier")
        ident = next((i for i in self.patient_identifiers(p) if i["value"] == primary.value), None)
        ident = ident or self.patient_identifier(primary)
        return resource_id("Patient", ident.get("system", ""), ident["value"])

    def patient_identifiers(self, p: model.Patient) -> list[dict[str, Any]]:
        """The FHIR identifiers of a patient, each once: an IPP repeated in PID-3 without its assigning authority
        (the default system) beside the same value with it is the same identifier."""
        out: list[dict[str, Any]] = []
        local = [i for i in p.ids if not self.national(i)]
        named = {i.value for i in local if self.patient_system_given(i)}
        for ident in p.ids:
            if not ident.value or (ident in local and ident.value in named and not self.patient_system_given(ident)):
                continue
            fhir_ident = self.patient_identifier(ident)
            if not any(o.get("system") == fhir_ident.get("system") and o["value"] == ident.value for o in out):
                out.append(fhir_ident)
        return out

    def merged_patient_id(self, ident: model.Identifier) -> str:
        fhir_ident = self.patient_identifier(ident)
        return resource_id("Patient", fhir_ident.get("system", ""), fhir_ident["value"])

    def order_identifiers(self, order: model.ImagingOrder) -> list[dict[str, Any]]:
        out = []
        for kind, code in ORDER_KINDS.items():
            ident: model.Identifier = getattr(order, ORDER_ATTRS[kind])
            if not ident.value:
                continue
            entry: dict[str, Any] = {"use": "official" if kind == "accession" else "usual"}
            entry["type"] = {"coding": [{"system": V2_0203, "code": code}]}
            system = self.identifier_system(kind, ident)
            if system:
                entry["system"] = system
            entry["value"] = ident.value
            out.append(entry)
        return out

    def service_request_id(self, order: model.ImagingOrder) -> str:
        idents = self.order_identifiers(order)
        if not idents:
            raise ValueError("order without placer, filler or accession number")
        first = idents[0]
        return resource_id("ServiceRequest", first.get("system", ""), first["value"])

    # -- resources -------------------------------------------------------------------------------------------

    def patient(self, p: model.Patient) -> dict[str, Any]:
        """A FR Core Patient: the INS traits (birth name, first and every given name at birth, birth date, sex,
        birthplace) and the identity status as FR Core lays them out; ``meta.profile`` names the FR Core profiles
        the resource conforms to (`fr_core_profiles`)."""
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.patient_id(p),
            "meta": {"lastUpdated": now()},
            "extension": self._patient_extensions(p),
            "identifier": self.patient_identifiers(p),
            "active": True,
        }
        names = []
        given = [g for g in (p.name.given, p.name.middle) if g]
        other_given = bool(p.birth_given_name and p.name.given and p.name.given != p.birth_given_name)
        if p.birth_name and (p.birth_name != p.name.family or other_given):  # a name in use of its own (type D)
            names.append(_name("usual", p.name.family, given, p.name))
            names.append(_official_name(p, p.birth_name, given))
        elif not p.name.is_empty() or p.birth_name:
            names.append(_official_name(p, p.birth_name or p.name.family, given))
        if names:
            resource["name"] = [n for n in names if len(n) > 1]
        gender = self.gender(p.sex) if p.sex else ""
        if gender:
            resource["gender"] = gender
        birth = self.date_time(p.birth_date[:8]) if p.birth_date else ""
        if birth:
            resource["birthDate"] = birth
        resource = {k: v for k, v in resource.items() if v not in ([], "", None)}
        return with_profiles(resource)

    def _patient_extensions(self, p: model.Patient) -> list[dict[str, Any]]:
        """FR Core Patient's extensions: the birthplace (the standard ``patient-birthPlace``, an Address carrying
        the INSEE code of the commune) and the identity reliability (its ``identityStatus`` from PID-32). A value
        that is not a code (5-character INSEE code; status letters) is left out rather than sent on."""
        out: list[dict[str, Any]] = []
        if _INSEE.fullmatch(p.birth_place_code):
            coding = {"system": self.insee_code_system, "code": p.birth_place_code}
            insee = {"url": INSEE_CODE, "valueCoding": {k: v for k, v in coding.items() if v}}
            out.append({"url": BIRTH_PLACE, "valueAddress": {"extension": [insee]}})
        status = p.identity_status.upper()
        if _CODE.fullmatch(status):
            coding = {"system": self.identity_status_system, "code": status}  # no display: the code system's own
            value = {k: v for k, v in coding.items() if v}
            out.append({"url": IDENTITY_RELIABILITY, "extension": [{"url": "identityStatus", "valueCoding": value}]})
        return out

    def service_request(self, order: model.ImagingOrder, patient_ref: str) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "id": self.service_request_id(order),
            "meta": {"lastUpdated": now()},
            "identifier": self.order_identifiers(order),
            "status": self.request_status(order),
            "intent": "order",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
        }
        priority = self.priority(order.priority) if order.priority else ""
        if priority:
            resource["priority"] = priority
        proc = order.procedure
        if proc.code or proc.display:
            code: dict[str, Any] = {}
            if proc.code:
                coding = {"system": self.code_system(proc.system), "code": proc.code}
                if not coding["system"]:
                    del coding["system"]
                if proc.display:
                    coding["display"] = proc.display
                code["coding"] = [coding]
            if proc.display:
                code["text"] = proc.display
            resource["code"] = code
        resource["subject"] = {"reference": patient_ref}
        start = order.steps[0].start if order.steps else ""
        occurrence = self.date_time(start) if start else ""
        if occurrence:
            resource["occurrenceDateTime"] = occurrence
        requester = self._requester(order.requesting_physician)
        if requester:
            resource["requester"] = requester
        if order.reason:
            resource["reasonCode"] = [{"text": order.reason}]
        if order.medical_alerts:
            resource["note"] = [{"text": order.medical_alerts}]
        return resource

    def unscheduled_request(self, step: model.PerformedStep, patient_ref: str, status: str) -> dict[str, Any]:
        """The ServiceRequest of a step a modality performed without an order (IHE Radiology's unscheduled case):
        identified by its study (``urn:dicom:uid``; the MPPS instance when the study is unknown), ``intent``
        ``filler-order`` (the department acted; no placer order exists) and tagged ``unscheduled``."""
        uid = f"urn:oid:{step.study_instance_uid or step.sop_instance_uid}"
        identifiers: list[dict[str, Any]] = [{"system": "urn:dicom:uid", "value": uid}]
        if step.accession_number:
            acsn = self.identifier_system("accession", model.Identifier(step.accession_number))
            identifiers.append(
                {"type": _v2_0203("ACSN"), **({"system": acsn} if acsn else {}), "value": step.accession_number}
            )
        resource: dict[str, Any] = {
            "resourceType": "ServiceRequest",
            "id": resource_id("ServiceRequest", "urn:dicom:uid", uid),
            "meta": {"lastUpdated": now(), "tag": [UNSCHEDULED]},
            "identifier": identifiers,
            "status": status,
            "intent": "filler-order",
            "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005", "display": "Imaging"}]}],
            "code": {"text": step.description} if step.description else None,
            "subject": {"reference": patient_ref} if patient_ref else None,
            "occurrenceDateTime": self.date_time(step.started) if step.started else "",
        }
        return {k: v for k, v in resource.items() if v not in ([], "", None)}

    def imaging_study(
        self, study: model.Study, patient_ref: str, based_on: list[str], status: str = "available"
    ) -> dict[str, Any]:
        """ImagingStudy from the archive's view of a study (identifier ``urn:dicom:uid``, as FHIR R4 asks).

        ``status``: ``available`` for a study the archive holds; ``registered`` / ``cancelled`` for one a modality
        announced (MPPS) before any image reached the archive."""
        identifiers: list[dict[str, Any]] = [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"}
        ]
        if study.accession_number:
            acsn = self.identifier_system("accession", model.Identifier(study.accession_number))
            identifiers.append(
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    **({"system": acsn} if acsn else {}),
                    "value": study.accession_number,
                }
            )
        resource: dict[str, Any] = {
            "resourceType": "ImagingStudy",
            "id": resource_id("ImagingStudy", "urn:dicom:uid", study.study_instance_uid),
            "meta": {"lastUpdated": now()},
            "identifier": identifiers,
            "status": status,
            "modality": [{"system": DCM, "code": m} for m in study.modalities],
            "subject": {"reference": patient_ref},
            "basedOn": [{"reference": ref} for ref in based_on],
            "numberOfSeries": len(study.series) if study.series else None,
            "numberOfInstances": study.number_of_instances if study.series else None,
            "description": study.description,
        }
        started = self.date_time(study.started) if study.started else ""
        if started:
            resource["started"] = started
        if study.endpoint:
            resource["contained"] = [
                {
                    "resourceType": "Endpoint",
                    "id": "wado",
                    "status": "active",
                    "connectionType": {
                        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                        "code": "dicom-wado-rs",
                    },
                    "payloadType": [{"text": "DICOM WADO-RS"}],
                    "address": study.endpoint,
                }
            ]
            resource["endpoint"] = [{"reference": "#wado"}]
        series = []
        for s in study.series:
            item: dict[str, Any] = {"uid": s.uid, "modality": {"system": DCM, "code": s.modality or "OT"}}
            if s.number.isdigit():
                item["number"] = int(s.number)
            if s.description:
                item["description"] = s.description
            if s.body_site:
                item["bodySite"] = {"display": s.body_site}
            item["numberOfInstances"] = len(s.instances)
            item["instance"] = [
                {
                    "uid": i.uid,
                    "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{i.sop_class_uid}"},
                    **({"number": int(i.number)} if i.number.isdigit() else {}),
                }
                for i in s.instances
            ]
            series.append(item)
        resource["series"] = series
        return {k: v for k, v in resource.items() if v not in ([], "", None)}

    # -- shared documents (IHE MHD / French PDSm) ------------------------------------------------------------

    def document_resources(
        self, doc: model.Document, patient_ref: str, request_refs: list[str], study_ref: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """DocumentReference (IHE MHD Comprehensive, French PDSm: the XDS DocumentEntry's metadata), DiagnosticReport
        (one per document set) and Binary (the CDA bytes) of a published document version. Metadata the CDA holds
        (authors, authenticator, custodian, facility, practice setting, reference ids) is read from the document
        itself, as an XDS source does (`traboule.translate.xds_metadata` reads the same elements for the DMP)."""
        data = base64.b64decode(doc.content)
        header = _cda_metadata(data)
        binary_id = resource_id("Binary", doc.id)
        attachment = self._attachment(doc, data, binary_id)
        reference = self._document_reference(doc, header, attachment, patient_ref, request_refs)
        diagnostic = self._diagnostic_report(doc, header, attachment, patient_ref, request_refs, study_ref)
        binary = {"resourceType": "Binary", "id": binary_id, "contentType": doc.media_type, "data": doc.content}
        return reference, diagnostic, binary

    def _attachment(self, doc: model.Document, data: bytes, binary_id: str) -> dict[str, Any]:
        """The document as an Attachment pointing at its Binary (DocumentReference.content, presentedForm)."""
        attachment = {
            "contentType": doc.media_type,
            "language": "fr-FR",
            "url": f"Binary/{binary_id}",
            "size": doc.size or len(data),
            "hash": base64.b64encode(bytes.fromhex(doc.sha1)).decode() if doc.sha1 else "",
            "title": doc.title,
            "creation": self.date_time(doc.created),
        }
        return {k: v for k, v in attachment.items() if v not in ("", None)}

    def _document_reference(
        self,
        doc: model.Document,
        header: dict[str, Any],
        attachment: dict[str, Any],
        patient_ref: str,
        request_refs: list[str],
    ) -> dict[str, Any]:
        """The DocumentReference: the DocumentEntry's metadata, its participants contained; PDSm's deleted mark for a
        deleted version."""
        contained, refs = _participants(header)
        master = _document_identifier(doc.id)
        class_code, class_display = CLASS_OF_TYPE[REPORT_CODE[0]]
        reference: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "id": resource_id("DocumentReference", master["system"], master["value"]),
            "meta": {"lastUpdated": now(), "profile": [PDSM_DOCUMENT_REFERENCE, MHD_DOCUMENT_REFERENCE]},
            "contained": contained,
            "masterIdentifier": master,
            # MHD: the entryUUID is an identifier with use official (the uniqueId is the masterIdentifier).
            "identifier": [{"use": "official", "system": "urn:ietf:rfc:3986", "value": entry_uuid(doc.id)}],
            "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": REPORT_CODE[0], "display": REPORT_CODE[1]}]},
            "category": [
                {"coding": [{"system": f"urn:oid:{CLASS_SCHEME}", "code": class_code, "display": class_display}]}
            ],
            "subject": {"reference": patient_ref},
            "date": self.date_time(doc.created) or now(),
            "author": refs.get("author"),
            "authenticator": refs.get("authenticator"),
            "custodian": refs.get("custodian"),
            "description": doc.title,
            "securityLabel": _security_labels(header.get("confidentiality") or "N", doc.confidentiality),
            "content": [
                {
                    "attachment": attachment,
                    "format": {"system": f"urn:oid:{FORMAT_SCHEME}", "code": FORMAT_OF_LEVEL[doc.level][0]},
                }
            ],
            "context": self._document_context(doc, header, patient_ref, request_refs),
        }
        if doc.replaces:
            old = _document_identifier(doc.replaces)
            target = resource_id("DocumentReference", old["system"], old["value"])
            reference["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{target}"}}]
        if not patient_ref:
            del reference["subject"]
        reference = {k: v for k, v in reference.items() if v not in ([], "", None)}
        return deleted(reference) if doc.action == "delete" else reference

    def _document_context(
        self, doc: model.Document, header: dict[str, Any], patient_ref: str, request_refs: list[str]
    ) -> dict[str, Any]:
        """DocumentReference.context: reference ids and orders, events (modality, CCAM acts), the act's period,
        facility type, practice setting, source patient."""
        context: dict[str, Any] = {"related": self._related(doc, header, request_refs)}
        modality = doc.report.modality
        events = [{"coding": [{"system": DCM, "code": modality}]}] if modality else []
        events += [{"coding": [{"system": CCAM, **act}]} for act in header.get("acts", [])]
        if events:
            context["event"] = events
        period = {
            "start": self.date_time(doc.service_start) if doc.service_start else "",
            "end": self.date_time(doc.service_stop) if doc.service_stop else "",
        }
        if any(period.values()):
            context["period"] = {k: v for k, v in period.items() if v}
        if header.get("facility"):
            context["facilityType"] = {"coding": [{"system": f"urn:oid:{FACILITY_SYSTEM}", **header["facility"]}]}
        if header.get("practice"):
            context["practiceSetting"] = {"coding": [{"system": f"urn:oid:{PRACTICE_SYSTEM}", **header["practice"]}]}
        if patient_ref:  # PDSm: the same Patient as subject (MHD: the patient as the source knows it)
            context["sourcePatientInfo"] = {"reference": patient_ref}
        return context

    def _diagnostic_report(
        self,
        doc: model.Document,
        header: dict[str, Any],
        attachment: dict[str, Any],
        patient_ref: str,
        request_refs: list[str],
        study_ref: str,
    ) -> dict[str, Any]:
        """The DiagnosticReport of the document set: its status follows the version's action; a withdrawn one keeps
        neither the deleted text nor a link to its (no longer served) bytes."""
        report = doc.report
        set_ident = _document_identifier(doc.set_id)
        conclusion = report.section("19005-8")
        diagnostic: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "id": resource_id("DiagnosticReport", set_ident["system"], set_ident["value"]),
            "meta": {"lastUpdated": now()},
            "identifier": [set_ident],
            "basedOn": [{"reference": ref} for ref in request_refs],
            "status": {"publish": "final", "replace": "amended", "delete": "entered-in-error"}[doc.action],
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]
            },
            "subject": {"reference": patient_ref},
            "effectiveDateTime": self.date_time(report.exam_time) if report.exam_time else "",
            "issued": self.date_time(doc.created) if len(doc.created) > 8 else "",
            "resultsInterpreter": [_display_reference(header["author"])] if header.get("author") else [],
            "imagingStudy": [{"reference": study_ref}] if study_ref else [],
            "conclusion": conclusion.text if conclusion else "",
            "presentedForm": [attachment],
        }
        if not patient_ref:
            del diagnostic["subject"]
        if doc.action == "delete":
            del diagnostic["conclusion"], diagnostic["presentedForm"]
        return {k: v for k, v in diagnostic.items() if v not in ([], "", None)}

    def _related(self, doc: model.Document, header: dict[str, Any], request_refs: list[str]) -> list[dict[str, Any]]:
        """``context.related``: the XDS referenceIdList as PDSm slices it (accession number, order, Study Instance
        UID, each typed by its CXi.5 URN), the same values `traboule.translate.xds_metadata` sends, then the orders."""
        report = doc.report
        related: list[dict[str, Any]] = []
        acc, acc_oid = header.get("accession") or report.accession_number.value, header.get("accession_oid", "")
        acc_oid = acc_oid or report.accession_number.issuer_oid
        if acc:
            system = f"urn:oid:{acc_oid}" if acc_oid else self.identifier_system("accession", report.accession_number)
            related.append(_reference_id(ACCESSION_TYPE, acc, system))
        placer, placer_oid = header.get("placer") or report.placer_order_number.value, header.get("placer_oid", "")
        placer_oid = placer_oid or report.placer_order_number.issuer_oid
        if placer and _OID.match(placer_oid or ""):
            related.append(_reference_id(ORDER_TYPE, placer, f"urn:oid:{placer_oid}"))
        study = header.get("study") or report.study_instance_uid
        if study:  # a UID is globally unique: no assigning authority (PDSm: no system)
            related.append(_reference_id(STUDY_UID_TYPE, study, ""))
        return related + [{"reference": ref} for ref in request_refs]

    def _requester(self, doctor: model.Practitioner) -> dict[str, Any]:
        out: dict[str, Any] = {}
        display = " ".join(x for x in (doctor.name.prefix, doctor.name.given, doctor.name.family) if x)
        if display:
            out["display"] = display
        system = self.systems["requester"].system
        if doctor.id and system and self.requester_match.match(doctor.id):
            out["identifier"] = {"system": system, "value": doctor.id}
        return out


def _official_name(p: model.Patient, family: str, given: list[str]) -> dict[str, Any]:
    """The birth name (FR Core ``officialName``). With the INS traits: ``given`` holds the first given name at birth
    only (fr-core-patient-ins: given 1..1) and the birth-list-given-name extension every given name at birth."""
    every = p.birth_given_names.strip()
    first = p.birth_given_name or (every.split()[0] if every else "")
    if every:
        given = [first]
    elif first and first != p.name.given:
        given = [first]  # the given names in use differ from the birth ones: the birth one only
    out = _name("official", family, given, p.name)
    if every:
        out = {"extension": [{"url": BIRTH_LIST_GIVEN_NAME, "valueString": every}], **out}
    return out


def _name(use: str, family: str, given: list[str], name: model.PersonName) -> dict[str, Any]:
    out: dict[str, Any] = {"use": use}
    if family:
        out["family"] = family
    if given:
        out["given"] = given
    if name.prefix:
        out["prefix"] = [name.prefix]
    if name.suffix:
        out["suffix"] = [name.suffix]
    return out


DCM = "http://dicom.nema.org/resources/ontology/DCM"
TAGS = "urn:traboule:tags"  # meta.tag codes of traboule's workflow (searchable: ServiceRequest?_tag=system|code)
UNSCHEDULED = {"system": TAGS, "code": "unscheduled", "display": "Performed without a scheduled step"}
RECONCILED = {"system": TAGS, "code": "reconciled", "display": "Replaced by the order sent later"}
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def _v2_0203(code: str) -> dict[str, Any]:
    return {"coding": [{"system": V2_0203, "code": code}]}


def _document_identifier(doc_id: str) -> dict[str, str]:
    """A CDA instance identifier as a FHIR Identifier: ``urn:oid:root`` (+ the extension as value when there is one)."""
    root, _, extension = doc_id.partition("^")
    if extension:
        return {"system": f"urn:oid:{root}", "value": extension}
    return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{root}"}


def _cda_metadata(data: bytes) -> dict[str, Any]:
    """From a CDA header: author (with its organisation and specialty), legal authenticator, custodian, facility
    type, practice setting, CCAM acts, reference ids and confidentiality."""
    from lxml import etree

    ns = {"v3": "urn:hl7-org:v3"}
    try:
        root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True))
    except etree.XMLSyntaxError:
        return {}
    if root.getroottree().docinfo.doctype:
        return {}

    def person(path: str) -> dict[str, Any] | None:
        entity = root.find(path, ns)
        if entity is None:
            return None
        ident = entity.find("v3:id", ns)
        name = entity.find("v3:assignedPerson/v3:name", ns)
        out: dict[str, Any] = {}
        if ident is not None and ident.get("extension"):
            out["identifier"] = {"system": f"urn:oid:{ident.get('root')}", "value": ident.get("extension")}
        if name is not None:
            family = " ".join(t.strip() for t in name.xpath("v3:family/text()", namespaces=ns) if t.strip())
            given = [t.strip() for t in name.xpath("v3:given/text()", namespaces=ns) if t.strip()]
            prefix = [t.strip() for t in name.xpath("v3:prefix/text()", namespaces=ns) if t.strip()]
            out["name"] = {k: v for k, v in (("family", family), ("given", given), ("prefix", prefix)) if v}
        code = coded_at(entity, "v3:code")
        if code:
            out["specialty"] = {"system": f"urn:oid:{code.pop('codeSystem')}", **code} if "codeSystem" in code else code
        return out or None

    def coded_at(element: Any, path: str) -> dict[str, str] | None:
        found = element.find(path, ns)
        if found is None or not found.get("code"):
            return None
        return {
            "code": found.get("code", ""),
            **({"display": found.get("displayName")} if found.get("displayName") else {}),
            **({"codeSystem": found.get("codeSystem")} if found.get("codeSystem") else {}),
        }

    def coded(path: str) -> dict[str, str] | None:
        found = coded_at(root, path)
        if found:
            found.pop("codeSystem", None)
        return found

    def organization(path: str) -> dict[str, Any] | None:
        org = root.find(path, ns)
        if org is None:
            return None
        ident = org.find("v3:id", ns)
        name = (org.findtext("v3:name", "", ns) or "").strip()
        out: dict[str, Any] = {}
        if ident is not None and ident.get("extension") and ident.get("root"):
            out["identifier"] = {"system": f"urn:oid:{ident.get('root')}", "value": ident.get("extension")}
        if name:
            out["display"] = name
        return out or None

    acts = []
    for t in root.findall("v3:documentationOf/v3:serviceEvent/v3:code/v3:translation", ns):
        if t.get("code") and t.get("codeSystem") in CCAM_OIDS:
            acts.append({"code": t.get("code"), **({"display": t.get("displayName")} if t.get("displayName") else {})})
    out: dict[str, Any] = {
        "author": person("v3:author/v3:assignedAuthor"),
        "authenticator": person("v3:legalAuthenticator/v3:assignedEntity"),
        "organization": organization("v3:author/v3:assignedAuthor/v3:representedOrganization"),
        "custodian": organization("v3:custodian/v3:assignedCustodian/v3:representedCustodianOrganization"),
        "facility": coded("v3:componentOf/v3:encompassingEncounter/v3:location/v3:healthCareFacility/v3:code"),
        "practice": coded(".//v3:performer/v3:assignedEntity/v3:representedOrganization/v3:standardIndustryClassCode"),
        "acts": acts,
    }
    try:  # the reference ids as `traboule.translate.xds_metadata` reads them for the DMP's referenceIdList
        cda = read_header(data)
    except CDAError:
        cda = None
    if cda is not None:
        out |= {
            "accession": cda.accession_number,
            "accession_oid": cda.accession_oid,
            "placer": cda.placer_order_number,
            "placer_oid": cda.placer_oid,
            "study": cda.study_instance_uid,
        }
    confidentiality = root.find("v3:confidentialityCode", ns)
    if confidentiality is not None:
        out["confidentiality"] = confidentiality.get("code", "N")
    return out


# -- IHE MHD / PDSm DocumentReference pieces ----------------------------------------------------------------------

PDSM_DOCUMENT_REFERENCE = (
    "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-comprehensive-document-reference"
)
MHD_DOCUMENT_REFERENCE = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/IHE.MHD.Comprehensive.DocumentReference"
# TRE_A07-StatutVisibiliteDocument (JDV_J110 in PDSm's securityLabel[visibilityStatus]; OID 1.2.250.1.213.1.1.4.13 in
# XDS, JDV_J08): the masking codes of the sender's sharing instructions.
VISIBILITY = "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
VISIBILITY_OID = MASKING_SCHEME
VISIBILITY_CODES = {
    "MASQUE_PS": "Masqué aux professionnels de santé",
    "INVISIBLE_PATIENT": "Non visible par le patient",
    "INVISIBLE_REPRESENTANTS_LEGAUX": "Non visible par les représentants légaux du patient",
}
CONFIDENTIALITY_DISPLAY = {"N": "normal", "R": "restricted", "V": "very restricted"}  # v3-ConfidentialityClassification
ACCESSION_TYPE, ORDER_TYPE = ACCESSION, ORDER  # the CXi.5 identifier types PDSm and the DMP allow (JDV_J231)
CCAM = "urn:oid:1.2.250.1.213.2.5"
IDNAT_PS = f"urn:oid:{cda.IDNAT_PS}"  # idNat_PS: 8 + RPPS (0 + ADELI ...)
IDNAT_STRUCT = f"urn:oid:{cda.IDNAT_STRUCT}"  # idNat_Struct: 1 + FINESS, 3 + SIRET ...
RPPS, FINESS, SIRET = "http://rpps.fr", "http://finess.sante.gouv.fr", "https://sirene.fr"  # FR Core systems


def deleted(reference: dict[str, Any]) -> dict[str, Any]:
    """A DocumentReference as PDSm marks a deleted entry: status superseded and ``PDSm_IsDeleted`` true."""
    others = [e for e in reference.get("extension") or [] if e.get("url") != IS_DELETED]
    return {**reference, "status": "superseded", "extension": [*others, {"url": IS_DELETED, "valueBoolean": True}]}


def is_deleted(reference: dict[str, Any]) -> bool:
    return any(e.get("url") == IS_DELETED and e.get("valueBoolean") for e in reference.get("extension") or [])


def _reference_id(kind: str, value: str, system: str) -> dict[str, Any]:
    """A PDSm ``context.related[referenceIdList]``: the identifier typed by its XDS CXi.5 URN."""
    ident: dict[str, Any] = {"type": {"coding": [{"system": "urn:ietf:rfc:3986", "code": kind}]}}
    if system:
        ident["system"] = system
    return {"identifier": {**ident, "value": value}}


def _security_labels(confidentiality: str, masks: list[model.Code]) -> list[dict[str, Any]]:
    """PDSm's two securityLabel slices: the confidentiality (1..1) then the visibility status (TRE_A07, 0..*)."""
    labels = [{"coding": [{"system": CONFIDENTIALITY, "code": confidentiality}]}]
    if confidentiality in CONFIDENTIALITY_DISPLAY:
        labels[0]["coding"][0]["display"] = CONFIDENTIALITY_DISPLAY[confidentiality]
    seen = set()
    for code in masks:  # the sender's masking instructions (tables/confidentiality.csv)
        if code.system in ("", VISIBILITY_OID) and code.code in VISIBILITY_CODES:
            coding = {"system": VISIBILITY, "code": code.code, "display": VISIBILITY_CODES[code.code]}
        else:
            coding = {"system": f"urn:oid:{code.system}" if code.system else "", "code": code.code}
            coding = {k: v for k, v in (coding | {"display": code.display}).items() if v}
        if coding.get("code") and (coding.get("system"), coding["code"]) not in seen:
            seen.add((coding.get("system"), coding["code"]))
            labels.append({"coding": [coding]})
    return labels


def _participants(header: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The contained resources MHD Comprehensive asks for (author and authenticator as PractitionerRole of a
    Practitioner with the RPPS, their Organization with the FINESS / SIRET, the custodian) and the references."""
    contained: list[dict[str, Any]] = []
    refs: dict[str, Any] = {}
    organization = header.get("organization")
    if organization:
        contained.append(_organization("organization", organization))
    for role in ("author", "authenticator"):
        person = header.get(role)
        if not person:
            continue
        practitioner: dict[str, Any] = {"resourceType": "Practitioner", "id": f"{role}-practitioner"}
        ident = person.get("identifier")
        if ident:
            practitioner["identifier"] = _practitioner_identifiers(ident)
        if person.get("name"):
            practitioner["name"] = [person["name"]]
        practitioner_role: dict[str, Any] = {
            "resourceType": "PractitionerRole",
            "id": role,
            "practitioner": {"reference": f"#{role}-practitioner"},
        }
        if organization and role == "author":
            practitioner_role["organization"] = {"reference": "#organization"}
        if person.get("specialty"):
            practitioner_role["specialty"] = [{"coding": [person["specialty"]]}]
        contained += [practitioner_role, practitioner]
        refs[role] = [{"reference": f"#{role}"}] if role == "author" else {"reference": f"#{role}"}
    custodian = header.get("custodian")
    if custodian:
        contained.append(_organization("custodian", custodian))
        refs["custodian"] = {"reference": "#custodian"}
    elif organization:
        refs["custodian"] = {"reference": "#organization"}
    return contained, refs


def _practitioner_identifiers(ident: dict[str, str]) -> list[dict[str, Any]]:
    out = [dict(ident)]
    if ident.get("system") == IDNAT_PS and ident["value"].startswith("8") and len(ident["value"]) == 12:
        out.append({"system": RPPS, "value": ident["value"][1:]})  # idNat_PS 8 + RPPS (11 digits)
    return out


def _organization(rid: str, found: dict[str, Any]) -> dict[str, Any]:
    org: dict[str, Any] = {"resourceType": "Organization", "id": rid}
    ident = found.get("identifier")
    if ident:
        org["identifier"] = [dict(ident)]
        value = ident["value"]
        if ident.get("system") == IDNAT_STRUCT and value[:1] in ("1", "3") and len(value) > 1:
            org["identifier"].append({"system": FINESS if value[0] == "1" else SIRET, "value": value[1:]})
    if found.get("display"):
        org["name"] = found["display"]
    return org


def _display_reference(person: dict[str, Any]) -> dict[str, Any]:
    """A logical reference to a person (identifier and name), for DiagnosticReport.resultsInterpreter."""
    out: dict[str, Any] = {}
    if person.get("identifier"):
        out["identifier"] = person["identifier"]
    name = person.get("name") or {}
    display = " ".join([*name.get("prefix", []), *name.get("given", []), name.get("family", "")]).strip()
    if display:
        out["display"] = display
    return out


def deleted_versions(reference: dict[str, Any], get: Any) -> list[dict[str, Any]]:
    """The versions a deleted DocumentReference replaced, as PDSm marks them (its deletion deletes them too):
    the ``relatesTo`` chain followed through ``get(type, id)``, each not yet marked returned marked."""
    out, seen = [], {reference.get("id")}
    pending = [r["target"]["reference"] for r in reference.get("relatesTo") or [] if r.get("code") == "replaces"]
    while pending:
        rtype, _, rid = pending.pop().partition("/")
        old = get(rtype, rid) if rtype == "DocumentReference" and rid not in seen else None
        if old is None:
            continue
        seen.add(rid)
        if not is_deleted(old):
            out.append(deleted(old))
        pending += [r["target"]["reference"] for r in old.get("relatesTo") or [] if r.get("code") == "replaces"]
    return out
