"""Canonical model → FHIR R4 JSON (ServiceRequest, Patient), driven by ``mappings/fhir.yaml``.

The mapping file gives the identifier systems (per kind, per issuer, or ``urn:oid:`` from the identifier's OID),
the code systems (``tables/fhir_code_systems.csv``) and the value maps (request status, priority, gender). All
of it is checked at load: a wrong key, URI, regex, time zone or a table value that is not a code of the FHIR value
set fails with ``file:line: reason``.

Resource ids are derived from identifiers (a hash of ``system|value``), so a redelivered or updated order writes
the same resource. ``merge_patient`` lays a message's view of a Patient over the stored one (identifiers a union,
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
from traboule.mapping import MAPPINGS_DIR, CodeTable, MappingError, Node, line_of, load_tables, load_yaml

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
REQUEST_STATUS = {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
REQUEST_PRIORITY = {"routine", "urgent", "asap", "stat"}
GENDER = {"male", "female", "other", "unknown"}
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


def resource_id(*parts: str) -> str:
    """A FHIR id (``[A-Za-z0-9.-]{1,64}``) derived from identifying text: the same input, the same id."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def key_identifier(resource: dict[str, Any]) -> dict[str, Any] | None:
    """The identifier a resource's id derives from: what a FHIR server is asked to match it on (conditional update).

    ImagingStudy: its ``urn:dicom:uid``. Patient and ServiceRequest: the identifier whose hash is the id; a Patient
    whose local identifier took its assigning authority's system later (its id stays) is matched on that identifier.
    """
    rtype, rid = resource["resourceType"], resource.get("id", "")
    for ident in resource.get("identifier") or []:
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
    """A FHIR Patient identifier made from an INS (`FHIRMapping.patient_identifier` gives it ``use: official``)."""
    return ident.get("use") == "official"


def merge_patient(stored: dict[str, Any], latest: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A stored Patient updated by the latest message's view of it, and the INS identifiers refused.

    Identifiers are a union (same system and value: the latest's wording); an INS whose system the Patient already
    has under another value is refused, never swapped (the orders channel refuses such a message at ingest).
    Demographics (names, gender, birth date) follow the latest view where it has them; what it lacks is kept.
    The stored id, ``active`` and ``link`` (a merge) stay."""
    identifiers = [dict(i) for i in stored.get("identifier") or []]
    refused = []
    for ident in latest.get("identifier") or []:
        key = (ident.get("system", ""), ident.get("value", ""))
        at = next((n for n, i in enumerate(identifiers) if (i.get("system", ""), i.get("value", "")) == key), None)
        if at is not None:
            identifiers[at] = dict(ident)
        elif is_ins(ident) and any(is_ins(i) and i.get("system", "") == key[0] for i in identifiers):
            refused.append(ident)
        else:
            identifiers.append(dict(ident))
    merged = {k: v for k, v in stored.items() if k != "meta"} | {"identifier": identifiers}
    for key in ("gender", "birthDate"):
        if latest.get(key):
            merged[key] = latest[key]
    names, known = latest.get("name") or [], stored.get("name") or []
    if len(names) == 1 and any(n.get("use") == "usual" for n in known):
        # The name in use only (an MPPS, an ADT without PID-5 type L): the birth name known stays (an INS trait).
        merged["name"] = [{**names[0], "use": "usual"}, *(n for n in known if n.get("use") != "usual")]
    elif names:
        merged["name"] = names
    return merged, refused


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
        known = {"kind", "version", "description", "tables", "timezone", "identifiers", "codes"}
        for key in doc:
            if key not in known:
                raise MappingError(self.path, line_of(doc, key), f"unknown section {key!r} (expected {sorted(known)})")
        if doc.get("kind", "canonical-to-fhir") != "canonical-to-fhir":
            raise MappingError(self.path, line_of(doc, "kind"), "kind must be 'canonical-to-fhir'")
        self.tables = load_tables(doc.get("tables"), self.path.parent, self.path)
        for name, (column, allowed) in TABLES.items():
            table = self.tables.get(name)
            line = line_of(doc.get("tables"), name) if "tables" in doc else line_of(doc)
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
                {"type_system", "types"} if kind == "ins" else {"match"} if kind == "requester" else set()
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
                for oid in types:
                    if not _OID.match(oid):
                        raise MappingError(self.path, line_of(types, oid), f"identifiers.ins.types: {oid!r} not an OID")
                self.ins_types = dict(types)
            if kind == "requester":
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

    def patient_identifier(self, ident: model.Identifier) -> dict[str, Any]:
        if _is_ins(ident):
            out: dict[str, Any] = {"use": "official"}
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
        local = [i for i in p.ids if not _is_ins(i)]
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
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.patient_id(p),
            "meta": {"lastUpdated": now()},
            "identifier": self.patient_identifiers(p),
            "active": True,
        }
        names = []
        given = [g for g in (p.name.given, p.name.middle) if g]
        if p.birth_name and p.birth_name != p.name.family:
            names.append(_name("usual", p.name.family, given, p.name))
            names.append(_name("official", p.birth_name, given, p.name))
        elif not p.name.is_empty():
            names.append(_name("official", p.name.family, given, p.name))
        if names:
            resource["name"] = [n for n in names if len(n) > 1]
        gender = self.gender(p.sex) if p.sex else ""
        if gender:
            resource["gender"] = gender
        birth = self.date_time(p.birth_date[:8]) if p.birth_date else ""
        if birth:
            resource["birthDate"] = birth
        return {k: v for k, v in resource.items() if v not in ([], "", None)}

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
        dcm = "http://dicom.nema.org/resources/ontology/DCM"
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
            "modality": [{"system": dcm, "code": m} for m in study.modalities],
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
            item: dict[str, Any] = {"uid": s.uid, "modality": {"system": dcm, "code": s.modality or "OT"}}
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
        """DocumentReference (XDS-equivalent metadata), DiagnosticReport (one per document set) and Binary (the
        CDA bytes) of a published document version. Metadata the CDA holds (author, facility, practice setting)
        is read from the document itself, as an XDS source does."""
        data = base64.b64decode(doc.content)
        header = _cda_metadata(data)
        binary_id = resource_id("Binary", doc.id)
        attachment = {
            "contentType": doc.media_type,
            "language": "fr-FR",
            "url": f"Binary/{binary_id}",
            "size": doc.size or len(data),
            "hash": base64.b64encode(bytes.fromhex(doc.sha1)).decode() if doc.sha1 else "",
            "title": doc.title,
            "creation": self.date_time(doc.created),
        }
        attachment = {k: v for k, v in attachment.items() if v not in ("", None)}
        status = {"delete": "entered-in-error"}.get(doc.action, "current")
        report = doc.report
        related: list[dict[str, Any]] = []
        acc = report.accession_number
        if acc.value:
            system = f"urn:oid:{acc.issuer_oid}" if acc.issuer_oid else self.identifier_system("accession", acc)
            related.append(
                {"identifier": {"type": _v2_0203("ACSN"), **({"system": system} if system else {}), "value": acc.value}}
            )
        if report.study_instance_uid:
            related.append({"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_instance_uid}"}})
        related += [{"reference": ref} for ref in request_refs]
        context: dict[str, Any] = {"related": related}
        if report.modality:
            context["event"] = [{"coding": [{"system": DCM, "code": report.modality}]}]
        start = self.date_time(doc.service_start) if doc.service_start else ""
        if start:
            context["period"] = {"start": start}
        if header.get("facility"):
            context["facilityType"] = {"coding": [{"system": "urn:oid:1.2.250.1.71.4.2.4", **header["facility"]}]}
        if header.get("practice"):
            context["practiceSetting"] = {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.9", **header["practice"]}]}
        labels = [{"coding": [{"system": CONFIDENTIALITY, "code": header.get("confidentiality") or "N"}]}]
        for code in doc.confidentiality:  # the sender's masking instructions (tables/confidentiality.csv)
            coding = {"system": f"urn:oid:{code.system}", "code": code.code, "display": code.display}
            labels.append({"coding": [{k: v for k, v in coding.items() if v and v != "urn:oid:"}]})
        master = _document_identifier(doc.id)
        reference: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "id": resource_id("DocumentReference", master["system"], master["value"]),
            "meta": {"lastUpdated": now()},
            "masterIdentifier": master,
            "identifier": [{"use": "official", **master}],
            "status": status,
            "docStatus": "final",
            "type": {
                "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "CR d'imagerie médicale"}]
            },
            "category": [
                {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.1", "code": "10", "display": "Compte rendu"}]}
            ],
            "subject": {"reference": patient_ref},
            "date": self.date_time(doc.created) or now(),
            "author": [a for a in (header.get("author"), header.get("organization")) if a],
            "authenticator": header.get("authenticator"),
            "description": doc.title,
            "securityLabel": labels,
            "content": [
                {
                    "attachment": attachment,
                    "format": {"system": "urn:oid:1.3.6.1.4.1.19376.1.2.3", "code": FORMAT_CODES[doc.level]},
                }
            ],
            "context": context,
        }
        if doc.replaces:
            old = _document_identifier(doc.replaces)
            target = resource_id("DocumentReference", old["system"], old["value"])
            reference["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{target}"}}]
        if not patient_ref:
            del reference["subject"]
        reference = {k: v for k, v in reference.items() if v not in ([], "", None)}
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
            "resultsInterpreter": [header["author"]] if header.get("author") else [],
            "imagingStudy": [{"reference": study_ref}] if study_ref else [],
            "conclusion": conclusion.text if conclusion else "",
            "presentedForm": [attachment],
        }
        if not patient_ref:
            del diagnostic["subject"]
        diagnostic = {k: v for k, v in diagnostic.items() if v not in ([], "", None)}
        binary = {"resourceType": "Binary", "id": binary_id, "contentType": doc.media_type, "data": doc.content}
        return reference, diagnostic, binary

    def _requester(self, doctor: model.Practitioner) -> dict[str, Any]:
        out: dict[str, Any] = {}
        display = " ".join(x for x in (doctor.name.prefix, doctor.name.given, doctor.name.family) if x)
        if display:
            out["display"] = display
        system = self.systems["requester"].system
        if doctor.id and system and self.requester_match.match(doctor.id):
            out["identifier"] = {"system": system, "value": doctor.id}
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
FORMAT_CODES = {3: "urn:ihe:rad:CDA:ImagingReportStructuredHeadings:2013", 1: "urn:ihe:iti:xds-sd:pdf:2008"}


def _v2_0203(code: str) -> dict[str, Any]:
    return {"coding": [{"system": V2_0203, "code": code}]}


def _document_identifier(doc_id: str) -> dict[str, str]:
    """A CDA instance identifier as a FHIR Identifier: ``urn:oid:root`` (+ the extension as value when there is one)."""
    root, _, extension = doc_id.partition("^")
    if extension:
        return {"system": f"urn:oid:{root}", "value": extension}
    return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{root}"}


def _cda_metadata(data: bytes) -> dict[str, Any]:
    """Author, authenticator, organisation, facility type, practice setting and confidentiality from a CDA header."""
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
        name = " ".join(
            t.strip() for t in entity.xpath("v3:assignedPerson/v3:name/*/text()", namespaces=ns) if t.strip()
        )
        out: dict[str, Any] = {}
        if ident is not None and ident.get("extension"):
            out["identifier"] = {"system": f"urn:oid:{ident.get('root')}", "value": ident.get("extension")}
        if name:
            out["display"] = name
        return out or None

    def coded(path: str) -> dict[str, str] | None:
        found = root.find(path, ns)
        if found is None or not found.get("code"):
            return None
        return {
            "code": found.get("code", ""),
            **({"display": found.get("displayName")} if found.get("displayName") else {}),
        }

    out: dict[str, Any] = {
        "author": person("v3:author/v3:assignedAuthor"),
        "authenticator": person("v3:legalAuthenticator/v3:assignedEntity"),
        "facility": coded("v3:componentOf/v3:encompassingEncounter/v3:location/v3:healthCareFacility/v3:code"),
        "practice": coded(".//v3:performer/v3:assignedEntity/v3:representedOrganization/v3:standardIndustryClassCode"),
    }
    org = root.find("v3:author/v3:assignedAuthor/v3:representedOrganization", ns)
    if org is not None:
        ident = org.find("v3:id", ns)
        name = (org.findtext("v3:name", "", ns) or "").strip()
        out["organization"] = {
            **(
                {"identifier": {"system": f"urn:oid:{ident.get('root')}", "value": ident.get("extension")}}
                if ident is not None and ident.get("extension")
                else {}
            ),
            **({"display": name} if name else {}),
        } or None
    confidentiality = root.find("v3:confidentialityCode", ns)
    if confidentiality is not None:
        out["confidentiality"] = confidentiality.get("code", "N")
    return out
