"""Channel ``fhir``: canonical order and patient events → FHIR R4 Patient and ServiceRequest, kept in a FHIR store
and served read-only under ``/fhir`` (``api = true``).

Rules:

* order (new / change / status / cancel): the Patient and the ServiceRequest are upserted. A cancel sets the
  status (``revoked`` by ``fhir_request_status.csv``), it deletes nothing. A status or cancel message often carries
  less than the order did: its non-empty elements are laid over the stored resource instead of replacing it.
* patient update (ADT^A08/A31): the Patient is upserted.
* merge (ADT^A40): the surviving Patient is upserted; each merged one is kept with ``active: false`` and a
  ``link`` of type ``replaced-by`` to the survivor.
* performed step (MPPS, ``procedure.*``): the ServiceRequest with that accession number takes the status the
  request-status table gives the step (COMPLETED → ``completed``, DISCONTINUED → ``revoked``).
* study stable in the archive (``study.*``): an ImagingStudy (``urn:dicom:uid`` identifier, series and instances,
  WADO-RS endpoint), ``basedOn`` the ServiceRequest(s) with its accession number, ``subject`` the Patient of the
  study's Patient ID (created from the study when no order brought it).

Idempotent: resource ids derive from identifiers and a redelivery changes nothing (no version bump for the same
content); an event older (journal sequence) than the one that last wrote a resource does not overwrite it. A batch
of events is one store transaction.

Configuration: ``name``, ``mapping`` (default ``mappings/fhir.yaml``), ``topics`` (default ``order.#`` and
``patient.#``), ``max_attempts``, ``max_batch``, ``api`` (serve ``/fhir`` from this process), ``base_url`` (the
public base URL of the API in links, when behind a proxy).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from channels.fhir_push import FHIRPush, Key, push_message, push_queue, push_topic
from traboule import metrics
from traboule.bus import Bus, Delivery
from traboule.config import resolve
from traboule.fhir_mapping import FHIRMapping, resource_id
from traboule.fhir_store import FHIRStore
from traboule.health import channel_health
from traboule.model import Document, Envelope, ImagingOrder, Patient, PatientUpdate, PerformedStep, ScheduledStep, Study

log = structlog.get_logger("traboule.channels.fhir")

DEFAULT_TOPICS = ["order.#", "patient.#", "procedure.#", "study.#", "document.#"]
# MPPS status → the scheduled-step status the request-status table is keyed on.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
STEP_STATUS = {"IN PROGRESS": "STARTED", "COMPLETED": "COMPLETED", "DISCONTINUED": "DISCONTINUED"}


class FHIRChannel:
    kind = "fhir"

    def __init__(self, config: dict[str, Any], runtime: Any):
        self.name: str = config["name"]
        self.config = config
        self.runtime = runtime
        self.topics: list[str] = list(config.get("topics", DEFAULT_TOPICS))
        self.max_attempts = int(config.get("max_attempts", 5))
        self.max_batch = int(config.get("max_batch", 100))
        self.api = bool(config.get("api", False))
        self.base_url = str(config.get("base_url", ""))
        self.mapping = FHIRMapping(resolve(runtime.config, config.get("mapping", "mappings/fhir.yaml")))
        self.store = FHIRStore(str(runtime.data_dir / f"{self.name}.sqlite"), self.mapping.timezone)
        destination = config.get("destination")
        self.push = FHIRPush(self.name, destination, self.store, runtime, self.base_url) if destination else None
        self._touched: list[Key] = []
        self._log = log.bind(channel=self.name)

    @classmethod
    def bindings(cls, config: dict[str, Any]) -> list[tuple[str, list[str]]]:
        out = [(config["name"], list(config.get("topics", DEFAULT_TOPICS)))]
        if config.get("destination"):
            out.append((push_queue(config["name"]), [push_topic(config["name"])]))
        return out

    async def start(self) -> None:
        if self.push is not None:
            await self.runtime.bus.declare(push_queue(self.name), [push_topic(self.name)])
        await self.runtime.bus.subscribe_batch(
            self.name, self.topics, self.handle, max_attempts=self.max_attempts, max_batch=self.max_batch
        )
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
            "kind": self.kind,
            "source": [f"bus:{t}" for t in self.topics],
            "mapping": str(self.mapping.path),
            "destinations": [f"fhir-store:{self.store.path}"]
            + (["http:/fhir"] if self.api else [])
            + ([self.push.base_url] if self.push else []),
            "resources": self.store.count(),
            **({"unpushed": self.store.unpushed()} if self.push else {}),
        }

    def routes(self) -> list[Any]:
        if not self.api:
            return []
        from traboule.fhir_api import routes

        return routes(self.store, self.base_url)

    async def handle(self, deliveries: list[Delivery]) -> None:
        envelopes = [Envelope.from_json(d.body) for d in deliveries]
        seqs = [int(d.headers.get("journal-id") or 0) for d in deliveries]
        results = await asyncio.to_thread(self._apply, envelopes, seqs)
        if self.push is not None:
            # Before the events are acknowledged: a crash in between redelivers them, naming the same resources.
            items = [
                (
                    push_topic(self.name),
                    push_message(touched),
                    f"{env.id}.push",
                    {"correlation-id": env.correlation_id, "journal-id": d.headers.get("journal-id", "")},
                )
                for d, env, (_, _, touched) in zip(deliveries, envelopes, results, strict=True)
                if touched
            ]
            await _publish_all(self.runtime.bus, items)
        for delivery, env, (outcome, changed, _) in zip(deliveries, envelopes, results, strict=True):
            metrics.events_processed.labels(self.name, outcome).inc()
            self._log.info(
                f"fhir.{outcome}",
                message_id=env.id,
                correlation_id=env.correlation_id,
                topic=delivery.topic,
                changed=changed,
                attempt=delivery.attempt,
            )

    def _apply(self, envelopes: list[Envelope], seqs: list[int]) -> list[tuple[str, int, list[Key]]]:
        """Apply the events in one store transaction: per event (outcome, resources changed, resources concerned)."""
        results = []
        with self.store.transaction():
            for env, seq in zip(envelopes, seqs, strict=True):
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
                    self._log.debug("fhir.ignored", kind=env.kind, message_id=env.id)
                    results.append(("ignored", 0, []))
                    continue
                results.append(("applied" if changed else "unchanged", changed, list(dict.fromkeys(self._touched))))
        return results

    def _write(self, resource: dict[str, Any], seq: int) -> int:
        """Upsert into the store; the resource counts as concerned by the event (pushed) even when unchanged."""
        self._touched.append((resource["resourceType"], resource["id"]))
        return int(self.store.upsert(resource, seq))

    def _patient(self, patient: Patient, seq: int, *, replace: bool) -> tuple[str, int]:
        """The reference of the event's Patient (empty without an identifier) and whether it was written:
        ``replace`` for an order (its Patient is the richest view), else only when the store has none yet."""
        if patient.primary_id is None or not patient.primary_id.value:
            return "", 0
        resource = self.mapping.patient(patient)
        if not replace and self.store.get("Patient", resource["id"]) is not None:
            return f"Patient/{resource['id']}", 0
        return f"Patient/{resource['id']}", self._write(resource, seq)

    def _order(self, order: ImagingOrder, seq: int) -> int:
        patient_ref, changed = self._patient(order.patient, seq, replace=True)
        request = self.mapping.service_request(order, patient_ref)
        if not patient_ref:
            del request["subject"]
        if order.action in ("cancel", "status"):
            stored = self.store.get("ServiceRequest", request["id"])
            if stored is not None:
                request = {**stored, **request}
        changed += self._write(request, seq)
        return changed

    def _study(self, study: Study, seq: int) -> int:
        patient_ref, changed = self._patient(study.patient, seq, replace=False)  # the order's Patient is richer
        resource = self.mapping.imaging_study(study, patient_ref, self._based_on(study.accession_number))
        if not patient_ref:
            del resource["subject"]
        stored = self.store.get("ImagingStudy", resource["id"])
        if stored is not None and stored.get("status") != "available":
            seq = 0  # what the archive holds replaces what a modality announced, whatever the event order
        return changed + self._write(resource, seq)

    def _document(self, doc: Document, seq: int) -> int:
        """A published report version: DocumentReference (the previous version superseded, a deleted one
        entered-in-error), the DiagnosticReport of the set, and the document's bytes (Binary, for ITI-68)."""
        patient_ref, changed = self._patient(doc.report.patient, seq, replace=False)
        study_ref = ""
        if doc.report.study_instance_uid:
            study_id = resource_id("ImagingStudy", "urn:dicom:uid", doc.report.study_instance_uid)
            study_ref = f"ImagingStudy/{study_id}" if self.store.get("ImagingStudy", study_id) else ""
        reference, diagnostic, binary = self.mapping.document_resources(
            doc, patient_ref, self._based_on(doc.report.accession_number.value), study_ref
        )
        changed += int(self.store.upsert(binary, seq))  # served, not pushed (the server gets the attachment URL)
        changed += self._write(reference, seq)
        for relation in reference.get("relatesTo", []):
            old_id = relation["target"]["reference"].split("/", 1)[1]
            old = self.store.get("DocumentReference", old_id)
            if old is not None and old.get("status") == "current":
                changed += self._write({k: v for k, v in old.items() if k != "meta"} | {"status": "superseded"}, seq)
        return changed + self._write(diagnostic, seq)

    def _based_on(self, accession: str) -> list[str]:
        if not accession:
            return []
        _, requests = self.store.search("ServiceRequest", {"identifier": accession}, count=100)
        return [f"ServiceRequest/{r['id']}" for r in requests]

    def _performed(self, step: PerformedStep, seq: int) -> int:
        """What a modality performed: the ServiceRequest (by accession number) takes the status the request-status
        table gives the step; the ImagingStudy is announced (``registered``, ``cancelled`` when discontinued)
        until the archive reports the study (``available``, which a later step does not change)."""
        changed = 0
        if step.accession_number:
            status = self.mapping.request_status(
                ImagingOrder(action="status", steps=[ScheduledStep(status=STEP_STATUS.get(step.status, "STARTED"))])
            )
            _, requests = self.store.search("ServiceRequest", {"identifier": step.accession_number}, count=100)
            for request in requests:
                changed += self._write({k: v for k, v in request.items() if k != "meta"} | {"status": status}, seq)
        if not step.study_instance_uid:
            return changed
        patient_ref, written = self._patient(step.patient, seq, replace=False)
        changed += written
        study = Study(
            study_instance_uid=step.study_instance_uid,
            accession_number=step.accession_number,
            patient=step.patient,
            started=step.started,
            description=step.description,
        )
        status = "cancelled" if step.status == "DISCONTINUED" else "registered"
        resource = self.mapping.imaging_study(study, patient_ref, self._based_on(step.accession_number), status)
        if not patient_ref:
            del resource["subject"]
        if step.modality:
            resource["modality"] = [{"system": DCM, "code": step.modality}]
        stored = self.store.get("ImagingStudy", resource["id"])
        if stored is not None and stored.get("status") == "available":
            self._touched.append(("ImagingStudy", resource["id"]))
            return changed
        return changed + self._write(resource, seq)

    def _patient_update(self, update: PatientUpdate, seq: int) -> int:
        survivor = self.mapping.patient(update.patient)
        changed = int(self._write(survivor, seq))
        if update.action != "merge":
            return changed
        for ident in update.merged_ids:
            if not ident.value:
                continue
            rid = self.mapping.merged_patient_id(ident)
            if rid == survivor["id"]:
                continue
            merged = self.store.get("Patient", rid) or {
                "resourceType": "Patient",
                "id": rid,
                "identifier": [self.mapping.patient_identifier(ident)],
            }
            merged = {k: v for k, v in merged.items() if k != "meta"}
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
                _, found = self.store.search(rtype, {"subject": subject}, count=10_000)
                for resource in found:
                    updated = {k: v for k, v in resource.items() if k != "meta"} | {"subject": {"reference": new}}
                    changed += self._write(updated, seq)
        return changed


async def _publish_all(bus: Bus, items: list[tuple[str, bytes, str, dict[str, str]]]) -> None:
    if not items:
        return
    publish_many = getattr(bus, "publish_many", None)
    if publish_many is not None:
        await publish_many(items)
        return
    for topic, body, message_id, headers in items:
        await bus.publish(topic, body, message_id=message_id, headers=headers)
