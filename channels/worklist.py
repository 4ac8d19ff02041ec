"""Channel ``worklist``: canonical order and patient events → DICOM Modality Worklist.

Consumes ``order.*`` and ``patient.*`` from the bus, renders items with ``mwl.yaml``, keeps them in the worklist
store (served by the MWL C-FIND SCP destination) and, when configured, mirrors them as ``.wl`` files for dcmtk
wlmscpfs or Orthanc. Rules (the business part, kept here and not in the adapters):

* new / change: the order's items are written (one per scheduled step); steps no longer in the order go away.
* cancel, discontinue, completed: the order's items leave the worklist.
* started (ORC-5 IP): the item stays, with status STARTED, unless ``offer_started = false``.
* performed step (MPPS, ``procedure.*``): IN PROGRESS → the item's step becomes STARTED (removed when
  ``offer_started = false``); COMPLETED / DISCONTINUED → removed. Items are found by accession number (+ SPS ID
  when the modality reports it).
* patient update (ADT^A08): pending items of that patient get the new demographics.
* merge (ADT^A40): pending items of the merged identifier move to the surviving patient.
* identifiers the order lacks are assigned as the IHE Department System Scheduler does (``assign_missing_ids``):
  Study Instance UID, Requested Procedure ID, Scheduled Procedure Step ID, derived from the order key so that a
  change or a resend gets the same values. Worklist servers (wlmscpfs) skip items without them.

Each event is applied once (idempotent consumer keyed on the event's idempotency key), in the same
transaction as the change, so a redelivery changes nothing. Events come in batches (in order) and a batch is one
transaction: each event's changes are computed on the store as the earlier events of the batch leave it.

An ``mwl-scp`` destination may speak DICOM TLS (``tls``, ``ae_certificates``: `traboule.channels.dicom_security`);
each C-FIND it answers is recorded on the audit trail (RAD-5: the caller, the query, the patients returned).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import hashlib
import logging
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset

from traboule import metrics, stores
from traboule.adapters.dicom_mwl import WorklistSCP
from traboule.adapters.dicom_server import Peer, SCPLimits
from traboule.adapters.worklist_files import WorklistFileWriter
from traboule.app.config import resolve
from traboule.audit import IMPLICIT_VR_LITTLE_ENDIAN, MAX_REFS, Outcome, PatientRef, queried, trail_of
from traboule.bus import Delivery
from traboule.channel import BatchConsumerChannel, ChannelRuntime, Setting
from traboule.channels.dicom_security import SCPCertificates, actor_of
from traboule.errors import ConfigError
from traboule.model import Envelope, ImagingOrder, Patient, PatientUpdate, PerformedStep, ScheduledStep
from traboule.stores.factory import stores_of
from traboule.stores.worklist import Change, as_dataset
from traboule.translate.dicom_mapping import MWLMapping, character_set

log = structlog.get_logger("traboule.channels.worklist")

REMOVED_STATUSES = {"CANCELLED", "DISCONTINUED", "COMPLETED"}


_LOGGED = {"duplicate": "duplicate"}  # a worklist outcome → the delivery log's (stale: applied, as a no-op)
# A C-FIND's outcome (adapters/dicom_mwl.py) → the audit's; the others are a success.
_QUERY_OUTCOMES = {
    "invalid_query": Outcome.MINOR_FAILURE,
    "out_of_resources": Outcome.SERIOUS_FAILURE,
    "error": Outcome.SERIOUS_FAILURE,
}
MWL_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND (the audited query's object)


class WorklistChannel(BatchConsumerChannel):
    kind = "worklist"
    topics = Setting(list, ["order.#", "patient.#", "procedure.#"])
    offer_started = Setting(bool, True)
    assign_ids = Setting(bool, True, key="assign_missing_ids")
    mapping_file = Setting(str, "mappings/mwl.yaml", key="mapping")

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)
        self.mapping = MWLMapping(resolve(runtime.config, self.mapping_file))
        self.store = stores_of(runtime).worklist(self.name)
        self.scps: list[WorklistSCP] = []
        self.certificates = SCPCertificates(runtime)  # TLS: each SCP's context, its files reloaded
        self.files: list[WorklistFileWriter] = []
        for dest in config.get("destinations", []):
            adapter = dest.get("adapter")
            if adapter == "mwl-scp":
                self.scps.append(
                    WorklistSCP(
                        self.store.find,
                        ae_title=dest.get("ae_title", "TRABOULE"),
                        host=dest.get("host", "127.0.0.1"),
                        port=int(dest.get("port", 11112)),
                        case_insensitive_names=bool(dest.get("case_insensitive_names", False)),
                        max_results=int(dest.get("max_results", 0)),
                        max_examined=int(dest.get("max_examined", 50_000)),
                        query_timeout=float(dest.get("query_timeout", 10.0)),
                        limits=SCPLimits.from_config(dest, f"channel {self.name}: mwl-scp"),
                        on_query=self._audit_query,
                        **self.certificates.security(
                            dest, f"channel {self.name}: mwl-scp", f"{self.name}:mwl-scp:{dest.get('port', 11112)}"
                        ),
                    )
                )
            elif adapter == "worklist-files":
                self.files.append(WorklistFileWriter(str(Path(dest["folder"]).absolute())))
            else:
                raise ConfigError(f"channel {self.name}: destination adapter {adapter!r} not supported here")
        self._log = log.bind(channel=self.name)

    def _audit_query(
        self,
        peer: Peer,
        identifier: bytes,
        patients: list[tuple[str, str]],
        outcome: str,
        *,
        sop_class: str = MWL_FIND,
        transfer_syntax: str = "",
    ) -> None:
        """IHE RAD-5 (Modality Worklist Provided): who asked, the query in the DICOM form of PS3.15 A.5.3.12 (the
        SOP Class UID, the identifier's bytes and the transfer syntax they are encoded in; a query over
        `traboule.audit.MAX_QUERY` bytes is described, not kept) and the patients of the items returned (the first
        `traboule.audit.MAX_REFS`). Called in the SCP's thread; recording never blocks."""
        trail_of(self.runtime).record(
            queried(
                requestor=actor_of(peer),
                query=identifier,
                patients=[PatientRef(value, issuer) for value, issuer in patients[:MAX_REFS] if value],
                transaction="RAD-5",
                outcome=_QUERY_OUTCOMES.get(outcome, Outcome.SUCCESS),
                description="" if outcome in ("success", "truncated") else outcome,
                sop_class=sop_class or MWL_FIND,
                transfer_syntax=transfer_syntax or IMPLICIT_VR_LITTLE_ENDIAN,
            )
        )

    async def start(self) -> None:
        for scp in self.scps:
            scp.start()
        self.certificates.start()
        for writer in self.files:
            await asyncio.to_thread(writer.sync, list(self.store.all()))
        await super().start()
        metrics.worklist_items.set(self.store.count())

    async def stop(self) -> None:
        for scp in self.scps:
            scp.stop()
        await self.certificates.stop()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "mapping": str(self.mapping.path),
            "destinations": [f"mwl-scp://{s.ae_title}@{s.host}:{s.port}" for s in self.scps]
            + [f"worklist-files:{w.folder}" for w in self.files],
            "items": self.store.count(),
        }

    async def on_batch(self, envelopes: list[Envelope], deliveries: list[Delivery]) -> None:
        """Apply a batch of events in order, in one store transaction (one fsync for the batch)."""
        # The journal id the dispatcher put on each event: the order in which the RIS messages were received.
        seqs = [int(d.headers.get("journal-id") or 0) for d in deliveries]
        results = await asyncio.to_thread(self._apply, envelopes, seqs)
        # Each event's ids are bound for its log line only when the line is written: binding costs more than the
        # rest of an event's bookkeeping here. The metric is counted once a batch and outcome.
        logged = _writes(self._log, logging.INFO)
        outcomes: collections.Counter[str] = collections.Counter()
        for delivery, env, (outcome, upserts, deletes) in zip(deliveries, envelopes, results, strict=True):
            outcomes[outcome] += 1
            self.note(env, f"{outcome}: {upserts} item(s) written, {deletes} removed", _LOGGED.get(outcome, "applied"))
            if logged:
                with self.bound(env):
                    self._log.info(
                        f"worklist.{outcome}",
                        topic=delivery.topic,
                        upserts=upserts,
                        deletes=deletes,
                        attempt=delivery.attempt,
                    )
        for outcome, count in outcomes.items():
            metrics.events_processed.labels(self.name, outcome).inc(count)
        # Off the loop: the store's database may be slow to answer; the batch is applied whatever a metric says.
        with contextlib.suppress(Exception):
            metrics.worklist_items.set(await asyncio.to_thread(self.store.count))

    def _apply(self, envelopes: list[Envelope], seqs: list[int]) -> list[tuple[str, int, int]]:
        """Compute every event's changes against the store as the earlier events of the batch leave it, mirror
        them to the worklist files, then commit them together.

        An event older than the latest one applied to the same order or patient (a retry or a replayed dead
        letter arriving after a newer change, cancel or update) is skipped as ``stale``: it must not bring a
        cancelled order back or put old demographics over new ones.
        Files are written before the commit: if that fails nothing is marked applied and the retry writes them
        again; a crash in between is reconciled by the full sync at start-up.
        """
        done = self.store.applied([e.idempotency_key for e in envelopes])
        latest = self.store.order_seqs([k for e in envelopes if (k := sequence_key(e.payload))])
        view = _View(self.store)
        view.prefetch([e.payload.key + "#" for e in envelopes if isinstance(e.payload, ImagingOrder)])
        changes: list[Change] = []
        results: list[tuple[str, int, int]] = []
        for env, seq in zip(envelopes, seqs, strict=True):
            if env.idempotency_key and env.idempotency_key in done:
                results.append(("duplicate", 0, 0))
                continue
            done.add(env.idempotency_key)
            seq_key = sequence_key(env.payload)
            if seq_key and seq:
                if seq < latest.get(seq_key, 0):
                    changes.append(([], [], env.idempotency_key))
                    results.append(("stale", 0, 0))
                    continue
                latest[seq_key] = seq
            upserts, deletes = self._changes(env, view)
            if seq and isinstance(env.payload, PerformedStep):
                _mark_orders(latest, upserts, deletes, seq)
            view.apply(upserts, deletes)
            changes.append((upserts, deletes, env.idempotency_key))
            results.append(("applied", len(upserts), len(deletes)))
        for writer in self.files:
            for upserts, deletes, _ in changes:
                for key, ds in upserts:
                    writer.write(key, as_dataset(ds))
                for key in deletes:
                    writer.remove(key)
        if changes:
            self.store.apply_batch(changes, latest)
        return results

    # -- rules -----------------------------------------------------------------------------------------------

    def _changes(self, env: Envelope, view: _View) -> tuple[list[tuple[str, Dataset]], list[str]]:
        payload = env.payload
        if isinstance(payload, ImagingOrder):
            return self._order_changes(payload, view)
        if isinstance(payload, PerformedStep):
            return self._procedure_changes(payload, view)
        assert isinstance(payload, PatientUpdate)
        return self._patient_changes(payload, view)

    def _order_changes(self, order: ImagingOrder, view: _View) -> tuple[list[tuple[str, Dataset]], list[str]]:
        prefix = order.key + "#"
        existing = set(view.keys_with_prefix(prefix))
        steps_status = {s.status for s in order.steps} or {"SCHEDULED"}
        if order.action == "cancel" or steps_status <= REMOVED_STATUSES:
            return [], sorted(existing)
        if order.action == "status" and "STARTED" in steps_status and not self.offer_started:
            return [], sorted(existing)
        if self.assign_ids:
            assign_missing_ids(order)
        upserts = []
        for i, (step, ds) in enumerate(self.mapping.encoded_items(order), start=1):
            upserts.append((f"{prefix}{step.step_id or i}", ds))
        if order.action == "status":
            # A status message may carry no full order: keep the item, change only its step status.
            kept = []
            for key in existing:
                ds = view.get(key)
                if ds is not None and ds.get("ScheduledProcedureStepSequence"):
                    ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = order.steps[0].status
                    kept.append((key, ds))
            return kept or upserts, []
        new_keys = {k for k, _ in upserts}
        return upserts, sorted(existing - new_keys)

    def _procedure_changes(self, step: PerformedStep, view: _View) -> tuple[list[tuple[str, Dataset]], list[str]]:
        """The items a performed step reports on: found by accession number, narrowed by SPS ID if given."""
        keys = view.keys_for_accession(step.accession_number) if step.accession_number else []
        matched: list[tuple[str, Dataset]] = []
        for key in keys:
            ds = view.get(key)
            sps = ds.get("ScheduledProcedureStepSequence") if ds is not None else None
            if ds is None or not sps:
                continue
            if step.scheduled_step_id and sps[0].get("ScheduledProcedureStepID", "") != step.scheduled_step_id:
                continue
            matched.append((key, ds))
        if step.status != "IN PROGRESS" or not self.offer_started:
            return [], [key for key, _ in matched]
        for _, ds in matched:
            ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = "STARTED"
        return matched, []

    def _patient_changes(self, update: PatientUpdate, view: _View) -> tuple[list[tuple[str, Dataset]], list[str]]:
        ids = update.merged_ids if update.action == "merge" else update.patient.ids
        keys: set[str] = set()
        for ident in ids:
            keys.update(view.keys_for_patient(ident.value, ident.issuer))
        patient_ds = self._patient_dataset(update.patient)
        patient_keywords = self.mapping.patient_keywords()
        upserts = []
        for key in sorted(keys):
            ds = view.get(key)
            if ds is None:
                continue
            for keyword in patient_keywords:  # what the new identity lacks must not survive (e.g. the old INS)
                if keyword not in patient_ds and keyword in ds:
                    del ds[keyword]
            for elem in patient_ds:
                if elem.keyword != "SpecificCharacterSet":
                    ds[elem.tag] = elem
            ds.SpecificCharacterSet = character_set(ds)
            upserts.append((key, ds))
        return upserts, []

    def _patient_dataset(self, patient: Patient) -> Dataset:
        """The patient-level attributes as the MWL mapping renders them for this patient."""
        full = self.mapping.item(ImagingOrder(patient=patient), ScheduledStep())
        out = Dataset()
        for keyword in self.mapping.patient_keywords():
            if keyword in full:
                out[keyword] = full[keyword]
        return out


def _writes(logger: Any, level: int) -> bool:
    """Whether ``logger`` writes lines of ``level`` (a logger that cannot say is taken to write them)."""
    enabled = getattr(logger, "is_enabled_for", None)
    return enabled is None or bool(enabled(level))


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root (PS3.5 B.2) from a hash: the same order always gets the same UID."""
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


def assign_missing_ids(order: ImagingOrder) -> None:
    """Fill the identifiers a worklist item needs and the RIS did not send (IHE RAD TF-1 SWF: DSS/OF role)."""
    if not order.study_instance_uid:
        order.study_instance_uid = derived_uid("study", order.key)
    if not order.requested_procedure_id:
        source = order.accession_number.value or order.placer_order_number.value or order.filler_order_number.value
        order.requested_procedure_id = source[:16]
    for i, step in enumerate(order.steps, start=1):
        if not step.step_id:
            rp = order.requested_procedure_id
            step.step_id = rp if len(order.steps) == 1 else f"{rp[:13]}-{i}"


class _View:
    """The store as the events computed so far in a batch will leave it (their changes are not committed yet)."""

    def __init__(self, store: stores.WorklistStore):
        self.store = store
        self.changed: dict[str, Dataset | None] = {}  # None: deleted
        self.prefixed: dict[str, list[str]] = {}  # the store's keys per prefix, read for the whole batch

    def prefetch(self, prefixes: list[str]) -> None:
        """Read the store's keys of these prefixes at once (a store with ``keys_with_prefixes``: one statement)."""
        many = getattr(self.store, "keys_with_prefixes", None)
        if many is not None and prefixes:
            self.prefixed = many(prefixes)

    def apply(self, upserts: list[tuple[str, Dataset]], deletes: list[str]) -> None:
        for key, ds in upserts:
            self.changed[key] = ds
        for key in deletes:
            self.changed[key] = None

    def get(self, key: str) -> Dataset | None:
        if key in self.changed:
            ds = self.changed[key]
            return None if ds is None else copy.deepcopy(as_dataset(ds))
        return self.store.get(key)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        stored = self.prefixed.get(prefix)
        keys = set(self.store.keys_with_prefix(prefix) if stored is None else stored)
        for key, ds in self.changed.items():
            if key.startswith(prefix):
                (keys.add if ds is not None else keys.discard)(key)
        return sorted(keys)

    def keys_for_accession(self, accession: str) -> list[str]:
        keys = set(self.store.keys_for_accession(accession))
        for key, item in self.changed.items():
            ds = None if item is None else as_dataset(item)
            if ds is not None and ds.get("AccessionNumber", "") == accession:
                keys.add(key)
            else:
                keys.discard(key)
        return sorted(keys)

    def keys_for_patient(self, patient_id: str, issuer: str) -> list[str]:
        keys = set(self.store.keys_for_patient(patient_id, issuer))
        for key, item in self.changed.items():
            ds = None if item is None else as_dataset(item)
            if ds is not None and ds.get("PatientID", "") == patient_id and ds.get("IssuerOfPatientID", "") == issuer:
                keys.add(key)
            else:
                keys.discard(key)
        return sorted(keys)


def _mark_orders(latest: dict[str, int], upserts: list[tuple[str, Dataset]], deletes: list[str], seq: int) -> None:
    """A performed step counts as the latest event of the orders whose items it changed: an order message
    received before it and redelivered after it (retry, replayed dead letter) is then stale and cannot bring a
    completed step back to the worklist."""
    for key in [k for k, _ in upserts] + deletes:
        order_key = key.rpartition("#")[0]
        if order_key:
            latest[order_key] = max(latest.get(order_key, 0), seq)


def sequence_key(payload: ImagingOrder | PatientUpdate | PerformedStep) -> str:
    """What an event's journal sequence is compared on: its order, the patient whose items it rewrites, or the
    MPPS instance (an IN PROGRESS redelivered after COMPLETED is stale)."""
    if isinstance(payload, ImagingOrder):
        return payload.key
    if isinstance(payload, PerformedStep):
        return f"mpps|{payload.sop_instance_uid}" if payload.sop_instance_uid else ""
    primary = payload.patient.primary_id
    return f"patient|{primary.issuer}|{primary.value}" if primary and primary.value else ""
