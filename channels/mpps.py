"""Channel ``mpps``: DICOM MPPS N-CREATE / N-SET from modalities → journal → ``procedure.*`` events on the bus.

Configuration::

    [[channels]]
    name = "mpps"
    kind = "mpps"                      # runs in the main process: it journals
    destinations = [{adapter = "mpps-scp", host = "127.0.0.1", port = 11113, ae_title = "TRABOULE"}]
    request_timeout = 20               # seconds a DICOM request waits for its journal write

The ``mpps-scp`` entry also takes the SCP limits of ``traboule.adapters.dicom_server.SCPLimits`` (``max_associations``,
``max_associations_per_peer``, ``acse_timeout``, ``dimse_timeout``, ``network_timeout``, ``tls_handshake_timeout``),
``tls`` and ``ae_certificates`` (DICOM TLS: `traboule.channels.dicom_security`). Each request accepted is recorded on
the audit trail (RAD-6 / RAD-7 Procedure Record: the calling AE, the patient, the MPPS instance and its study).

Per request: check it against the instance's known state → merge (an N-SET carries only the changed attributes;
the last known attribute list of each MPPS instance is kept in the ``mpps_states`` store: ``<data_dir>/<name>.sqlite``,
or the PostgreSQL database every node shares, so an N-SET may reach another node than its N-CREATE) → canonical
``PerformedStep`` → journal the raw attribute list (Explicit VR Little Endian) with its event in one transaction
→ save the instance's new state → only then answer Success. Every request is journaled, refused ones as
``rejected`` with the reason. The instance is held from the check to the save (`traboule.stores.MPPSStates.hold`):
two requests for one instance, on one node or two, never both apply. A hold waits for another node's a few seconds
at most (PostgreSQL: 5 s), then the request is answered 0110H (the modality sends it again); a request past
``request_timeout`` is answered 0110H too, and the next request of the channel starts only once its hold has ended
(the state store's waits, save and commit run off the event loop).

Rules (PS3.4 F.7.2): N-CREATE of a known instance → 0111H duplicate SOP instance; N-CREATE not IN PROGRESS →
0106H; N-SET of an unknown instance → 0112H; N-SET of an instance already COMPLETED or DISCONTINUED → 0110H with
Error ID A710H "Performed Procedure Step object may no longer be updated"; journal not writable → 0110H.

Topics published: ``procedure.in-progress``, ``procedure.completed``, ``procedure.discontinued``. The idempotency
key is the MPPS instance + status: an N-SET that leaves the status IN PROGRESS (e.g. adds series) is journaled as
a duplicate and publishes nothing, so consumers see one event per status.
"""

from __future__ import annotations

import asyncio
from io import BytesIO
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from traboule import metrics
from traboule.adapters.dicom_mpps import (
    DUPLICATE_SOP_INSTANCE,
    INVALID_ATTRIBUTE_VALUE,
    MAY_NO_LONGER_BE_UPDATED,
    MPPSSCP,
    NO_SUCH_SOP_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    HandlerResult,
)
from traboule.adapters.dicom_server import Peer, SCPLimits
from traboule.audit import ObjectRef, PatientRef, trail_of
from traboule.audit import performed_step as audited_step
from traboule.channel import ChannelRuntime, Setting, delivery_recorder, read_settings
from traboule.channels.dicom_security import SCPCertificates, actor_of
from traboule.errors import ConfigError, MappingFailure
from traboule.model import Envelope, Identifier, Instance, Patient, PerformedStep, PersonName, Series, is_uid
from traboule.stores.delivery_log import DeliveryRecord
from traboule.stores.factory import stores_of
from traboule.stores.journal import JournalEntry, OutboxEvent
from traboule.stores.mpps_state import HeldInstance

log = structlog.get_logger("traboule.channels.mpps")

FINAL_STATUSES = {"COMPLETED", "DISCONTINUED"}
STATUSES = {"IN PROGRESS", *FINAL_STATUSES}


def encode(ds: Dataset) -> bytes:
    """An attribute list as Explicit VR Little Endian bytes (no preamble, no file meta)."""
    buffer = DicomFileLike(BytesIO())
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.parent.getvalue()  # type: ignore[attr-defined]


def decode(data: bytes) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


def topic_of(status: str) -> str:
    return "procedure." + status.lower().replace(" ", "-")


UNSCHEDULED = "unscheduled: no scheduled step or accession number"


def references_order(step: PerformedStep) -> bool:
    """Whether the Scheduled Step Attributes Sequence names an order (accession number, requested procedure or
    scheduled step id, placer or filler order number); a Study Instance UID alone does not."""
    return any(
        (
            step.accession_number,
            step.requested_procedure_id,
            step.scheduled_step_id,
            step.placer_order_number,
            step.filler_order_number,
        )
    )


class MPPSChannel:
    kind = "mpps"
    request_timeout = Setting(float, 20.0, minimum=0)

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        self.name: str = config["name"]
        self.config = config
        self.runtime = runtime
        read_settings(self, config, self.name)
        if str(config.get("process", "main")) != "main":
            raise ConfigError(f"channel {self.name}: an mpps channel journals, it runs in the main process")
        self.scps: list[MPPSSCP] = []
        self.certificates = SCPCertificates(runtime)  # TLS: each SCP's context, its files reloaded
        for dest in config.get("destinations", []):
            if dest.get("adapter") != "mpps-scp":
                raise ConfigError(f"channel {self.name}: destination adapter {dest.get('adapter')!r} not supported")
            self.scps.append(
                MPPSSCP(
                    self.handle,
                    ae_title=dest.get("ae_title", "TRABOULE"),
                    host=dest.get("host", "127.0.0.1"),
                    port=int(dest.get("port", 11113)),
                    limits=SCPLimits.from_config(dest, f"channel {self.name}: mpps-scp"),
                    **self.certificates.security(
                        dest, f"channel {self.name}: mpps-scp", f"{self.name}:mpps-scp:{dest.get('port', 11113)}"
                    ),
                )
            )
        # The state of each MPPS instance decides how the next request is answered: it must survive a power cut.
        self.states = stores_of(runtime).mpps_states(self.name)
        self.identities = stores_of(runtime).patients()  # whose each order is; merges
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._log = log.bind(channel=self.name)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        for scp in self.scps:
            scp.start()
        self.certificates.start()

    async def stop(self) -> None:
        for scp in self.scps:
            scp.stop()
        await self.certificates.stop()
        self.states.close()
        self.identities.close()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": [f"mpps-scp://{s.ae_title}@{s.host}:{s.port}" for s in self.scps],
            "destinations": ["bus:procedure.*"],
        }

    # -- requests (called in pynetdicom's threads) -----------------------------------------------------------

    def handle(self, kind: str, uid: str, attributes: Dataset, peer: Peer | None = None) -> HandlerResult:
        """Hand the request to the event loop (the journal lives there) and wait for its answer."""
        if self._loop is None:
            return PROCESSING_FAILURE, "not started"
        future = asyncio.run_coroutine_threadsafe(self.process(kind, uid, attributes, peer), self._loop)
        try:
            return future.result(self.request_timeout)
        except Exception as exc:
            future.cancel()
            self._log.error("mpps.failed", sop_instance_uid=uid, error=type(exc).__name__)
            return PROCESSING_FAILURE, "the request could not be stored"

    async def process(self, kind: str, uid: str, attributes: Dataset, peer: Peer | None = None) -> HandlerResult:
        assert self._lock is not None
        # One request at a time: state check, journal write and state update together; and the instance held for
        # this request on every node.
        async with self._lock, self.states.hold(uid) as held:
            result, step = await self._process(kind, uid, attributes, held)
        if step is not None:  # accepted, journaled and its state committed
            self._audit(kind, uid, step, peer)
        return result

    def _audit(self, kind: str, uid: str, step: PerformedStep, peer: Peer | None) -> None:
        """RAD-6 (N-CREATE) / RAD-7 (N-SET) accepted: a Procedure Record event on the audit trail."""
        objects = [ObjectRef("mpps", uid)]
        if step.study_instance_uid:
            objects.append(ObjectRef("study", step.study_instance_uid))
        if step.accession_number:
            objects.append(ObjectRef("accession", step.accession_number))
        trail_of(self.runtime).record(
            audited_step(
                "C" if kind == "create" else "U",
                source=actor_of(peer or Peer("", "")),
                patients=[PatientRef(i.value, i.issuer) for i in step.patient.ids if i.value],
                objects=objects,
            )
        )

    async def _process(
        self, kind: str, uid: str, attributes: Dataset, held: HeldInstance
    ) -> tuple[HandlerResult, PerformedStep | None]:
        """The answer to one request, and its performed step when it was accepted."""
        raw = encode(attributes)
        entry = JournalEntry(
            channel=self.name, raw=raw, status="accepted", control_id=uid, message_type=f"N-{kind.upper()}"
        )
        row = held.current
        refusal: tuple[int, str, int | None] | None = None
        merged = attributes
        if kind == "create":
            status = str(attributes.get("PerformedProcedureStepStatus", "") or "")
            if row is not None:
                refusal = (DUPLICATE_SOP_INSTANCE, "MPPS instance already exists", None)
            elif status != "IN PROGRESS":
                refusal = (INVALID_ATTRIBUTE_VALUE, "N-CREATE status must be IN PROGRESS", None)
        elif row is None:
            refusal = (NO_SUCH_SOP_INSTANCE, "unknown MPPS instance", None)
        elif row.status in FINAL_STATUSES:
            refusal = (
                PROCESSING_FAILURE,
                "Performed Procedure Step object may no longer be updated",
                MAY_NO_LONGER_BE_UPDATED,
            )
        else:
            merged = decode(row.dataset)
            for elem in attributes:  # N-SET replaces whole attributes (sequences included)
                merged[elem.tag] = elem
        status = str(merged.get("PerformedProcedureStepStatus", "") or "")
        if refusal is None and status not in STATUSES:
            refusal = (INVALID_ATTRIBUTE_VALUE, f"unknown status {status[:30]!r}", None)
        events: list[OutboxEvent] = []
        step: PerformedStep | None = None
        mismatch, merged_notes = "", []
        if refusal is None:
            step = performed_step(uid, merged)
            merged_notes = self.identities.resolve_merged([step])  # a merged Patient ID: its survivor's
            try:  # never a step on another patient's order (the reason names both: journal only)
                self.identities.check_step(step)
            except MappingFailure as exc:
                mismatch = exc.reason
                refusal = (INVALID_ATTRIBUTE_VALUE, "Patient ID is not the patient of the scheduled step", None)
        if refusal is not None:
            entry.status = "rejected"
            entry.error = mismatch or refusal[1]
            entry.ack_code = f"0x{refusal[0]:04X}"
        else:
            assert step is not None
            entry.idempotency_key = f"mpps|{uid}|{step.status}"
            entry.correlation_id = uid
            entry.ack_code = "0x0000"
            if kind == "create" and not references_order(step):  # IHE unscheduled case: accepted, journaled as such
                entry.warnings = UNSCHEDULED
            entry.warnings = "\n".join([*filter(None, [entry.warnings]), *merged_notes])
            env = Envelope(step, source=self.name, idempotency_key=entry.idempotency_key, correlation_id=uid)
            events.append(OutboxEvent(topic_of(step.status), env.id, env.to_json()))
        try:
            await self.runtime.journal.append(entry, events)
        except Exception as exc:
            self._log.error("journal.write_failed", error=str(exc), sop_instance_uid=uid)
            return (PROCESSING_FAILURE, "request not stored, send it again later"), None
        metrics.messages_received.labels(self.name, entry.status).inc()
        self._log.info(
            "mpps." + entry.status,
            message_id=entry.id,
            sop_instance_uid=uid,
            request=entry.message_type,
            status=status,
            answer=entry.ack_code,
            **({"error_status": entry.ack_code} if entry.error else {}),
            **({"unscheduled": True} if UNSCHEDULED in entry.warnings.splitlines() else {}),
        )
        if refusal is not None:
            code, comment, error_id = refusal
            return ((code, comment) if error_id is None else (code, comment, error_id)), None
        if step is not None:  # the keys it names now belong to its patient, when no order said whose they are
            self.identities.record([step])
        await asyncio.to_thread(held.save, status, encode(merged))  # a statement: off the event loop
        self._record(entry, status)
        return SUCCESS, step

    def _record(self, entry: JournalEntry, status: str) -> None:
        """The delivery log of an accepted request, keyed as its journal entry (the console's message page): the
        request, the step's status and the answer; a duplicate status published nothing. Handed to the recorder's
        thread: never waits, never raises."""
        try:
            recorder = delivery_recorder(self.runtime)
            if recorder is None or not entry.idempotency_key:
                return
            duplicate = entry.status == "duplicate"
            detail = f"{entry.message_type} {status}, answered {entry.ack_code}"
            detail += ", status unchanged: nothing published" if duplicate else f", published {topic_of(status)}"
            if UNSCHEDULED in entry.warnings.splitlines():
                detail += ", unscheduled"
            outcome = "duplicate" if duplicate else "applied"
            recorder.add(DeliveryRecord(entry.idempotency_key, entry.correlation_id, self.name, outcome, detail))
        except Exception as exc:  # a log for people: never the request's answer
            self._log.warning("delivery_log.record_failed", error=type(exc).__name__)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def performed_step(uid: str, ds: Dataset) -> PerformedStep:
    """The canonical performed step of an MPPS instance's (merged) attribute list."""
    sps = ds.get("ScheduledStepAttributesSequence") or [Dataset()]
    ref = sps[0]
    patient = Patient()
    if _text(ds, "PatientID"):
        patient.ids.append(Identifier(_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID"), type="PI"))
    name = ds.get("PatientName")
    if name:
        patient.name = PersonName(
            family=name.family_name,
            given=name.given_name,
            middle=name.middle_name,
            prefix=name.name_prefix,
            suffix=name.name_suffix,
        )
    patient.birth_date = _text(ds, "PatientBirthDate")
    patient.sex = _text(ds, "PatientSex")
    series = _performed_series(ds)
    return PerformedStep(
        sop_instance_uid=uid,
        status=_text(ds, "PerformedProcedureStepStatus"),  # type: ignore[arg-type]
        study_instance_uid=_text(ref, "StudyInstanceUID"),
        accession_number=_text(ref, "AccessionNumber"),
        requested_procedure_id=_text(ref, "RequestedProcedureID"),
        scheduled_step_id=_text(ref, "ScheduledProcedureStepID"),
        placer_order_number=_text(ref, "PlacerOrderNumberImagingServiceRequest"),
        filler_order_number=_text(ref, "FillerOrderNumberImagingServiceRequest"),
        patient=patient,
        modality=_text(ds, "Modality"),
        station_aet=_text(ds, "PerformedStationAETitle"),
        started=_text(ds, "PerformedProcedureStepStartDate") + _text(ds, "PerformedProcedureStepStartTime")[:6],
        ended=_text(ds, "PerformedProcedureStepEndDate") + _text(ds, "PerformedProcedureStepEndTime")[:6],
        description=_text(ds, "PerformedProcedureStepDescription"),
        series_uids=[u for u in (_text(s, "SeriesInstanceUID") for s in ds.get("PerformedSeriesSequence") or []) if u],
        series=series,
    )


def _performed_series(ds: Dataset) -> list[Series]:
    """The Performed Series Sequence: each series with the instances it references (Referenced Image Sequence and
    Referenced Non-Image Composite SOP Instance Sequence: SOP class and instance UIDs), of the step's modality.
    Items without a valid UID are left out (they cannot be referenced in a catalog)."""
    modality = _text(ds, "Modality")
    out: list[Series] = []
    for item in ds.get("PerformedSeriesSequence") or []:
        uid = _text(item, "SeriesInstanceUID")
        if not is_uid(uid):
            continue
        instances = [
            Instance(uid=_text(ref, "ReferencedSOPInstanceUID"), sop_class_uid=_text(ref, "ReferencedSOPClassUID"))
            for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence")
            for ref in item.get(key) or []
        ]
        out.append(
            Series(
                uid=uid,
                modality=modality,
                description=_text(item, "SeriesDescription"),
                instances=[i for i in instances if is_uid(i.uid) and is_uid(i.sop_class_uid)],
            )
        )
    return out
