"""Channel ``fhir``: canonical order and patient events → FHIR R4 Patient and ServiceRequest, kept in a FHIR store
and served read-only under ``/fhir`` (``api = true``).

Rules:

* every message naming a patient (order, ADT, report, MPPS, study) updates its Patient the same way
  (``fhir_mapping.merge_patient``): identifiers are a union (an INS the Patient has under another value is kept, the
  new one logged and left out: the orders channel refuses such a message at ingest; but a patient update from the
  identity system, ``PatientUpdate.authoritative``, replaces it), demographics follow the latest
  message that carries them. One Patient per local identifier (IPP) whatever message names it: an IPP without
  assigning authority is the one the Patient already holds under a system; an authority named later replaces the
  mapping's default system (the Patient keeps its id).
* order (new / change / status / cancel): the Patient and the ServiceRequest are upserted. A cancel sets the
  status (``revoked`` by ``fhir_request_status.csv``), it deletes nothing. A status or cancel message often carries
  less than the order did: its non-empty elements are laid over the stored resource instead of replacing it.
* patient update (ADT^A08/A31): the Patient is upserted.
* merge (ADT^A40): the surviving Patient is upserted; each merged one is kept with ``active: false`` and a
  ``link`` of type ``replaced-by`` to the survivor.
* performed step (MPPS, ``procedure.*``): the ServiceRequest(s) of the step (by accession number, else placer /
  filler order number, else the ServiceRequest the study is based on) take the status the request-status table
  gives the step (COMPLETED → ``completed``, DISCONTINUED → ``revoked``). A step no order matches is *unscheduled*:
  a ServiceRequest is made for it (``intent: filler-order``, ``meta.tag`` ``urn:traboule:tags|unscheduled``). When
  the RIS later sends the order (same accession number or Study Instance UID, same Patient), the ordered
  ServiceRequest ``replaces`` it, takes its status if it was completed, the ImagingStudy is ``basedOn`` it, and the
  unscheduled one becomes ``revoked`` and tagged ``reconciled``.
* study stable in the archive (``study.*``): an ImagingStudy (``urn:dicom:uid`` identifier, series and instances,
  WADO-RS endpoint), ``basedOn`` the ServiceRequest(s) with its accession number, ``subject`` the Patient of the
  study's Patient ID (created from the study when no order brought it).

Idempotent: resource ids derive from identifiers and a redelivery changes nothing (no version bump for the same
content); an event older (journal sequence) than the one that last wrote a resource does not overwrite it. A batch
of events is one store transaction.

Configuration (typed settings, ``traboule.channel.Setting``): ``name``, ``mapping`` (default ``mappings/fhir.yaml``),
``topics`` (default ``order.#``, ``patient.#``, ``procedure.#``, ``study.#``, ``document.#``), ``max_attempts``,
``max_batch``, ``api`` (serve ``/fhir`` from this process), ``base_url`` (the public base URL of the API in links,
when behind a proxy).
``describe()`` counts the unscheduled ServiceRequests no order has taken over yet (``unscheduled``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from traboule import metrics
from traboule.app.config import resolve
from traboule.app.health import channel_health
from traboule.bus import Bus, Delivery
from traboule.channel import BatchConsumerChannel, ChannelRuntime, Setting
from traboule.channels.fhir_push import FHIRPush
from traboule.formats.fhir_push import Key, push_message, push_queue, push_topic
from traboule.model import (
    Document,
    Envelope,
    Identifier,
    ImagingOrder,
    Patient,
    PatientUpdate,
    PerformedStep,
    ScheduledStep,
    Study,
)
from traboule.stores.factory import stores_of
from traboule.translate.fhir_mapping import (
    RECONCILED,
    UNSCHEDULED,
    FHIRMapping,
    deleted_versions,
    is_ins,
    merge_patient,
    resource_id,
    with_profiles,
)

log = structlog.get_logger("traboule.channels.fhir")

# MPPS status → the scheduled-step status the request-status table is keyed on.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
STEP_STATUS = {"IN PROGRESS": "STARTED", "COMPLETED": "COMPLETED", "DISCONTINUED": "DISCONTINUED"}


class FHIRChannel(BatchConsumerChannel):
    kind = "fhir"
    topics = Setting(list, ["order.#", "patient.#", "procedure.#", "study.#", "document.#"])
    api = Setting(bool, False)
    base_url = Setting(str, "")
    mapping_file = Setting(str, "mappings/fhir.yaml", key="mapping")

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)
        self.mapping = FHIRMapping(resolve(runtime.config, self.mapping_file))
        self.store = stores_of(runtime).fhir(self.name, self.mapping.timezone)
        destination = config.get("destination")
        self.push = FHIRPush(self.name, destination, self.store, runtime, self.base_url) if destination else None
        self._touched: list[Key] = []
        self._log = log.bind(channel=self.name)

    @classmethod
    def bindings(cls, config: dict[str, Any]) -> list[tuple[str, list[str]]]:
        out = super().bindings(config)
        if config.get("destination"):
            out.append((push_queue(config["name"]), [push_topic(config["name"])]))
        return out

    async def start(self) -> None:
        if self.push is not None:
            await self.runtime.bus.declare(push_queue(self.name), [push_topic(self.name)])
        await super().start()
        if self.push is not None:
            await self.push.start()

    async def stop(self) -> None:
        if self.push is not None:
            await self.push.stop()
        self.store.close()

    def health(self) -> dict[str, Any]:
        return channel_health(*([self.push.destination] if self.push is not None else []))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mapping": str(self.mapping.path),
            "destinations": [f"fhir-store:{getattr(self.store, 'path', '') or 'postgresql'}"]
            + (["http:/fhir"] if self.api else [])
            + ([self.push.base_url] if self.push else []),
            "resources": self.store.count(),
            "unscheduled": self.store.count_tagged("ServiceRequest", UNSCHEDULED, without=RECONCILED),
            **({"unpushed": self.store.unpushed()} if self.push else {}),
        }

    def routes(self) -> list[Any]:
        if not self.api:
            return []
        from traboule.app.fhir_api import routes

        return routes(self.store, self.base_url, self.runtime)  # the runtime: its audit trail

    async def on_batch(self, envelopes: list[Envelope], deliveries: list[Delivery]) -> None:
        seqs = [int(d.headers.get("journal-id") or 0) for d in deliveries]
        results = await asyncio.to_thread(self._apply, envelopes, seqs)
        if self.push is not None:
            # Before the events are acknowledged: a crash in between redelivers them, naming the same resources.
            items = [
                (
                    push_topic(self.name),
                    push_message(touched),
                    f"{env.id}.push",
                    {
                        "correlation-id": env.correlation_id,
                        "idempotency-key": env.idempotency_key,
                        "journal-id": d.headers.get("journal-id", ""),
                    },
                )
                for d, env, (_, _, touched) in zip(deliveries, envelopes, results, strict=True)
                if touched
            ]
            await _publish_all(self.runtime.bus, items)
        for delivery, env, (outcome, changed, touched) in zip(deliveries, envelopes, results, strict=True):
            metrics.events_processed.labels(self.name, outcome).inc()
            kinds = ", ".join(sorted({k[0] for k in touched}))  # resource types: no id (an IPP may be one)
            self.note(env, f"{outcome}: {changed} resource(s) changed" + (f" ({kinds})" if kinds else ""))
            with self.bound(env):
                self._log.info(f"fhir.{outcome}", topic=delivery.topic, changed=changed, attempt=delivery.attempt)

    def _apply(self, envelopes: list[Envelope], seqs: list[int]) -> list[tuple[str, int, list[Key]]]:
        """Apply the events in one store transaction: per event (outcome, resources changed, resources concerned)."""
        results = []
        with self.store.transaction():
            for env, seq in zip(envelopes, seqs, strict=True):
                with self.bound(env):  # the warnings of an event's rules carry its ids
                    results.append(self._apply_one(env, seq))
        return results

    def _apply_one(self, env: Envelope, seq: int) -> tuple[str, int, list[Key]]:
        payload = env.payload
        self._touched = []
        if isinstance(payload, ImagingOrder):
            changed = self._order(payload, seq)
        elif isinstance(payload, PatientUpdate):
            changed = self._patient_update(payload, seq)
        elif isinstance(payload, PerformedStep):
            changed = self._performed(payload, seq)
        elif isinstance(payload, Study):
            changed = self._study(payload, seq)
        elif isinstance(payload, Document):
            changed = self._document(payload, seq)
        else:
            self._log.debug("fhir.ignored", kind=env.kind)
            return "ignored", 0, []
        return ("applied" if changed else "unchanged"), changed, list(dict.fromkeys(self._touched))

    def _write(self, resource: dict[str, Any], seq: int) -> int:
        """Upsert into the store; the resource counts as concerned by the event (pushed) even when unchanged."""
        self._touched.append((resource["resourceType"], resource["id"]))
        return int(self.store.upsert(resource, seq))

    def _patient(
        self, patient: Patient, seq: int, *, survivor: bool = False, replace_ins: bool = False
    ) -> tuple[str, int]:
        """The reference of the event's Patient (empty without an identifier) and whether it was written: the
        stored Patient updated by this message's view of it (`merge_patient`), or a new one. A merged Patient
        (inactive, ``replaced-by``: an event ingested before the merge) stands for its survivor, unchanged; the
        survivor of a merge (``survivor``) is made active again if an earlier merge had replaced it. ``replace_ins``:
        the identity system's update, whose INS replaces the Patient's (unless a later message was applied)."""
        primary = patient.primary_id
        if primary is None or not primary.value:
            return "", 0
        latest = self.mapping.patient(patient)
        stored = self._known_patient(primary, latest)
        if stored is None:
            return f"Patient/{latest['id']}", self._write(latest, seq)
        if survivor and stored.get("active") is False:
            stored = {k: v for k, v in stored.items() if k not in ("active", "link")}
        elif (replacing := self._replaced_by(stored)) is not None:
            self._log.info("fhir.merged_patient_followed", patient=stored["id"], survivor=replacing["id"])
            return f"Patient/{replacing['id']}", 0
        newer = self.store.seq_of("Patient", stored["id"])
        merged, refused = merge_patient(stored, latest, replace_ins=replace_ins and not (seq and newer > seq))
        if refused:  # the ingest check refuses such messages; one may predate it, or come from DICOM
            self._log.warning("fhir.ins_kept", patient=stored["id"], refused=len(refused))
        if seq and newer > seq:
            # An earlier message applied late (a report published once its study came, a redelivery): its
            # identifiers still join the union, whatever the order; the demographics stay the later message's,
            # and ``meta.profile`` names the FR Core profiles the result conforms to (as `merge_patient` does).
            merged = with_profiles(
                {k: v for k, v in stored.items() if k != "meta"} | {"identifier": merged["identifier"]}
            )
            seq = newer
        return f"Patient/{stored['id']}", self._write(merged, seq)

    def _known_patient(self, primary: Identifier, latest: dict[str, Any]) -> dict[str, Any] | None:
        """The stored Patient this IPP names, if any; aligns the IPP's system in ``latest`` or in the stored
        Patient so that the union of their identifiers holds it once.

        Same system and value: the same identifier (the id derives from it). Otherwise the IPP value held by one
        Patient under one system: a message without assigning authority means that one; a message naming its
        authority replaces the mapping's default system there (the default was assumed, not sent). Two named
        authorities are two identifiers: another Patient."""
        ipp = next((i for i in latest["identifier"] if not is_ins(i) and i["value"] == primary.value), None)
        if ipp is None:
            return None
        system, value = ipp.get("system", ""), primary.value
        stored = self.store.get("Patient", latest["id"])
        derived = stored is not None
        if stored is None:
            holders = {rid for rid, _ in self.store.holders("Patient", value)}
            found = [
                p for p in (self.store.get("Patient", rid) for rid in sorted(holders)) if p and _ipp_systems(p, value)
            ]
            if len(found) != 1:
                return None
            stored = found[0]
        systems = _ipp_systems(stored, value)
        if system in systems:
            return stored
        if len(systems) == 1:
            (held,) = systems
            if not self.mapping.patient_system_given(primary):
                _set_system(ipp, held)
                return stored
            if held == self.mapping.systems["patient"].system:
                for ident in stored.get("identifier") or []:
                    if not is_ins(ident) and ident.get("value") == value and ident.get("system", "") == held:
                        _set_system(ident, system)
                return stored
        return stored if derived else None

    def _order(self, order: ImagingOrder, seq: int) -> int:
        patient_ref, changed = self._patient(order.patient, seq)
        request = self.mapping.service_request(order, patient_ref)
        if not patient_ref:
            del request["subject"]
        stored = self.store.get("ServiceRequest", request["id"])
        if order.action in ("cancel", "status") and stored is not None:
            request = {**stored, **request}
        elif stored is not None and stored.get("replaces"):
            request["replaces"] = stored["replaces"]
        if order.action != "cancel":
            changed += self._reconcile(order, request, patient_ref, seq)
        changed += self._write(request, seq)
        return changed

    def _reconcile(self, order: ImagingOrder, request: dict[str, Any], patient_ref: str, seq: int) -> int:
        """The order of a step performed unscheduled (same accession number or Study Instance UID) takes its
        place: ``replaces`` it, its status if completed, its ImagingStudy; the unscheduled one is revoked and
        tagged reconciled. Only for the same Patient: a step is never moved to another patient."""
        ids: set[str] = set()
        if order.accession_number.value:
            ids.update(rid for rid, _ in self.store.holders("ServiceRequest", order.accession_number.value))
        if order.study_instance_uid:
            ids.update(rid for rid, _ in self.store.holders("ServiceRequest", f"urn:oid:{order.study_instance_uid}"))
        ids.discard(request["id"])
        changed = 0
        replaces = [r["reference"] for r in request.get("replaces", [])]
        for rid in sorted(ids):
            unscheduled = self.store.get("ServiceRequest", rid)
            if unscheduled is None or not _tagged(unscheduled, UNSCHEDULED) or _tagged(unscheduled, RECONCILED):
                continue
            subject = (unscheduled.get("subject") or {}).get("reference", "")
            if subject != patient_ref:
                self._log.warning("fhir.unscheduled_not_reconciled", service_request=rid, reason="another patient")
                continue
            if unscheduled.get("status") == "completed" and request.get("status") == "active":
                request["status"] = "completed"
            old = f"ServiceRequest/{rid}"
            replaces += [] if old in replaces else [old]
            revoked = _edit(unscheduled, status="revoked")
            revoked["meta"] = {"tag": [*revoked["meta"]["tag"], RECONCILED]}
            changed += self._write(revoked, seq)
            _, studies = self.store.search("ImagingStudy", {"basedon": old}, count=100)
            for study in studies:
                based = [b for b in study.get("basedOn", []) if b.get("reference") != old]
                based.append({"reference": f"ServiceRequest/{request['id']}"})
                changed += self._write(_edit(study, basedOn=based), seq)
        if replaces:
            request["replaces"] = [{"reference": r} for r in replaces]
        return changed

    def _study(self, study: Study, seq: int) -> int:
        patient_ref, changed = self._patient(study.patient, seq)
        based_on = self._based_on(study.accession_number, patient_ref)
        stored = self.store.get("ImagingStudy", resource_id("ImagingStudy", "urn:dicom:uid", study.study_instance_uid))
        if not based_on and stored is not None:  # e.g. a study performed unscheduled, then reconciled
            based_on = [b["reference"] for b in stored.get("basedOn", [])]
        resource = self.mapping.imaging_study(study, patient_ref, based_on)
        if not patient_ref:
            del resource["subject"]
        if stored is not None and stored.get("status") != "available":
            seq = 0  # what the archive holds replaces what a modality announced, whatever the event order
        return changed + self._write(resource, seq)

    def _document(self, doc: Document, seq: int) -> int:
        """A published report version: DocumentReference (the previous version superseded, a deleted one
        entered-in-error), the DiagnosticReport of the set, and the document's bytes (Binary, for ITI-68)."""
        patient_ref, changed = self._patient(doc.report.patient, seq)
        study_ref = ""
        if doc.report.study_instance_uid:
            study_id = resource_id("ImagingStudy", "urn:dicom:uid", doc.report.study_instance_uid)
            study_ref = f"ImagingStudy/{study_id}" if self.store.get("ImagingStudy", study_id) else ""
        reference, diagnostic, binary = self.mapping.document_resources(
            doc, patient_ref, self._based_on(doc.report.accession_number.value, patient_ref), study_ref
        )
        changed += int(self.store.upsert(binary, seq))  # served, not pushed (the server gets the attachment URL)
        changed += self._write(reference, seq)
        for relation in reference.get("relatesTo", []):
            old_id = relation["target"]["reference"].split("/", 1)[1]
            old = self.store.get("DocumentReference", old_id)
            if old is not None and old.get("status") == "current":
                changed += self._write(_edit(old, status="superseded"), seq)
        if doc.action == "delete":  # PDSm: the versions a deleted document replaced are deleted with it
            for old in deleted_versions(reference, self.store.get):
                changed += self._write(_edit(old), seq)
        return changed + self._write(diagnostic, seq)

    def _based_on(self, accession: str, subject: str) -> list[str]:
        return [f"ServiceRequest/{r['id']}" for r in self._requests(accession, "ACSN", subject)]

    def _requests(self, value: str, kind: str, subject: str) -> list[dict[str, Any]]:
        """The ServiceRequests holding ``value`` as identifier of type ``kind`` (ACSN, PLAC, FILL), but those an
        order took over (reconciled) and, when ``subject`` is given, those of another Patient."""
        if not value:
            return []
        found = []
        for rid in sorted({rid for rid, _ in self.store.holders("ServiceRequest", value)}):
            request = self.store.get("ServiceRequest", rid)
            if request is None or _tagged(request, RECONCILED):
                continue
            if subject and (request.get("subject") or {}).get("reference", subject) != subject:
                continue
            for ident in request.get("identifier") or []:
                codes = {c.get("code") for c in (ident.get("type") or {}).get("coding", [])}
                if ident.get("value") == value and kind in codes:
                    found.append(request)
                    break
        return found

    def _step_requests(self, step: PerformedStep, subject: str) -> list[dict[str, Any]]:
        """The ServiceRequests of ``subject`` a performed step matches: its accession number, else its placer /
        filler order number, else the ones its study is based on."""
        if step.accession_number:
            found = self._requests(step.accession_number, "ACSN", subject)
        else:
            found = self._requests(step.placer_order_number, "PLAC", subject) or self._requests(
                step.filler_order_number, "FILL", subject
            )
        if found:
            return found
        if step.study_instance_uid:
            study = self.store.get(
                "ImagingStudy", resource_id("ImagingStudy", "urn:dicom:uid", step.study_instance_uid)
            )
            for based_on in (study or {}).get("basedOn", []):
                rtype, _, rid = based_on.get("reference", "").partition("/")
                request = self.store.get("ServiceRequest", rid) if rtype == "ServiceRequest" else None
                if request is not None and not _tagged(request, RECONCILED):
                    found.append(request)
        return found

    def _performed(self, step: PerformedStep, seq: int) -> int:
        """What a modality performed: the ServiceRequest(s) of the step take the status the request-status table
        gives the step, an unscheduled one is made when no order matches; the ImagingStudy is announced
        (``registered``, ``cancelled`` when discontinued) until the archive reports the study (``available``,
        which a later step does not change)."""
        patient_ref, changed = self._patient(step.patient, seq)
        status = self.mapping.request_status(
            ImagingOrder(action="status", steps=[ScheduledStep(status=STEP_STATUS.get(step.status, "STARTED"))])
        )
        requests = self._step_requests(step, patient_ref)
        for request in requests:
            changed += self._write(_edit(request, status=status), seq)
        if not requests and patient_ref and (step.study_instance_uid or step.sop_instance_uid):
            unscheduled = self.mapping.unscheduled_request(step, patient_ref, status)
            requests = [unscheduled]
            changed += self._write(unscheduled, seq)
        if not step.study_instance_uid:
            return changed
        study = Study(
            study_instance_uid=step.study_instance_uid,
            accession_number=step.accession_number,
            patient=step.patient,
            started=step.started,
            description=step.description,
        )
        status = "cancelled" if step.status == "DISCONTINUED" else "registered"
        based_on = [f"ServiceRequest/{r['id']}" for r in requests]
        resource = self.mapping.imaging_study(study, patient_ref, based_on, status)
        if not patient_ref:
            del resource["subject"]
        if step.modality:
            resource["modality"] = [{"system": DCM, "code": step.modality}]
        stored = self.store.get("ImagingStudy", resource["id"])
        if stored is not None and stored.get("status") == "available":
            self._touched.append(("ImagingStudy", resource["id"]))
            return changed
        return changed + self._write(resource, seq)

    def _replaced_by(self, patient: dict[str, Any]) -> dict[str, Any] | None:
        """The Patient that replaces a merged one (``link`` ``replaced-by`` followed to an active Patient), or
        None when ``patient`` is not merged."""
        current, seen = patient, {patient["id"]}
        while current.get("active") is False and len(seen) <= 16:
            link = next((x for x in current.get("link") or [] if x.get("type") == "replaced-by"), {})
            rtype, _, rid = (link.get("other") or {}).get("reference", "").partition("/")
            found = self.store.get("Patient", rid) if rtype == "Patient" and rid not in seen else None
            if found is None:
                break
            current = found
            seen.add(rid)
        return None if current is patient else current

    def _patient_update(self, update: PatientUpdate, seq: int) -> int:
        survivor_ref, changed = self._patient(
            update.patient, seq, survivor=update.action == "merge", replace_ins=update.authoritative
        )
        if update.action != "merge" or not survivor_ref:
            return changed
        survivor = {"id": survivor_ref.split("/", 1)[1]}
        for ident in update.merged_ids:
            if not ident.value:
                continue
            known = self._known_patient(ident, self.mapping.patient(Patient(ids=[ident])))
            rid = known["id"] if known is not None else self.mapping.merged_patient_id(ident)
            if rid == survivor["id"]:
                continue
            merged = self.store.get("Patient", rid) or with_profiles(  # one never seen: the FR Core it conforms to
                {"resourceType": "Patient", "id": rid, "identifier": [self.mapping.patient_identifier(ident)]}
            )
            merged = _edit(merged)  # its tags and FR Core profiles kept
            merged["active"] = False
            merged["link"] = [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
            changed += self._write(merged, seq)
            changed += self._repoint(f"Patient/{rid}", f"Patient/{survivor['id']}", seq)
        return changed

    def _repoint(self, old: str, new: str, seq: int) -> int:
        """Orders, studies and reports of a merged Patient now belong to the survivor."""
        changed = 0
        for rtype in ("ServiceRequest", "ImagingStudy", "DocumentReference", "DiagnosticReport"):
            for subject in (old, new):  # the survivor's too: a redelivered merge must name them again (push)
                for resource in self._of_subject(rtype, subject):
                    changed += self._write(_edit(resource, subject={"reference": new}), seq)
        return changed

    def _of_subject(self, rtype: str, subject: str) -> list[dict[str, Any]]:
        """Every stored resource of ``rtype`` whose subject is ``subject``, those no search finds (a deleted
        DocumentReference) too: a merge moves them all."""
        return self.store.by_subject(rtype, subject, include_deleted=True)


def _edit(resource: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A stored resource with ``changes``, to write back: its ``meta`` is left to the store, but its tags and
    profiles."""
    out = {k: v for k, v in resource.items() if k != "meta"} | changes
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k in ("tag", "profile") and v}
    if meta:
        out["meta"] = meta
    return out


def _tagged(resource: dict[str, Any], tag: dict[str, str]) -> bool:
    return any(
        t.get("system") == tag["system"] and t.get("code") == tag["code"]
        for t in (resource.get("meta") or {}).get("tag") or []
    )


def _ipp_systems(patient: dict[str, Any], value: str) -> set[str]:
    """The systems under which a Patient holds ``value`` as a local identifier (not an INS)."""
    return {i.get("system", "") for i in patient.get("identifier") or [] if i.get("value") == value and not is_ins(i)}


def _set_system(ident: dict[str, Any], system: str) -> None:
    ident.pop("system", None)
    if system:  # keep FHIR's element order: system before value
        value = ident.pop("value")
        ident["system"], ident["value"] = system, value


async def _publish_all(bus: Bus, items: list[tuple[str, bytes, str, dict[str, str]]]) -> None:
    if not items:
        return
    await bus.publish_many(items)
