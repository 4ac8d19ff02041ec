"""Channel ``archive``: the image archive says a study is stable → traboule reads it over DICOMweb → canonical
``Study`` event on the bus (``study.stable``).

The archive notifies with ``POST {webhook}`` and a JSON body carrying at least ``StudyInstanceUID`` (Orthanc: a Lua
``OnStableStudy`` callback, see docs/operations.md; any archive or script can post the same). The notification is
journaled before the 202 answer, then read back from the journal's outbox: the channel's own consumer fetches the
study's metadata (WADO-RS ``/studies/{uid}/metadata``) and publishes the canonical study. An archive that is down
only delays it (bus retries with backoff, then the dead-letter queue). The body is checked before it is journaled
(`parse_notification`): a JSON object of at most 64 KiB whose ``StudyInstanceUID`` is a DICOM UID, since it goes
into the archive's URL; anything else is a 400 naming the field. Configuration::

    [[channels]]
    name = "archive"
    kind = "archive"
    dicomweb = "http://127.0.0.1:8042/dicom-web"   # any DICOMweb base URL
    webhook = "/archive/stable"                      # path on this process's HTTP port
    # username / password (basic auth) or token (bearer) when the archive asks for them
    # tls = { ca_file = "...", cert_file = "...", key_file = "..." }  # an https archive: over the [tls] defaults
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from traboule.adapters.dicomweb import DicomJSON, DICOMwebClient, value
from traboule.app.config import destination_tls
from traboule.app.health import DestinationHealth, channel_health
from traboule.bus import Delivery
from traboule.channel import ChannelRuntime, ConsumerChannel, Setting
from traboule.errors import MappingFailure, NotificationError, PermanentError
from traboule.model import Envelope, Identifier, Instance, Patient, PersonName, Series, Study, is_uid
from traboule.stores.factory import stores_of
from traboule.stores.journal import JournalEntry, OutboxEvent

log = structlog.get_logger("traboule.channels.archive")

NOTIFIED = "archive.stable"  # internal topic: a journaled notification waiting to be read from the archive
STABLE = "study.stable"  # the canonical study, for the channels that care (FHIR, reports)
WEBHOOK_MAX_BODY = 64 * 1024  # Orthanc's notification is ~200 bytes; room for archives that post more tags
MAX_ACCESSION = 64  # SH is 16 characters (PS3.5 6.2); lenient for archives that store longer ones, but bounded


@dataclass(frozen=True)
class Notification:
    study_instance_uid: str
    accession_number: str = ""


def parse_notification(raw: bytes) -> Notification:
    """The webhook body: a JSON object with a ``StudyInstanceUID`` string that is a DICOM UID (PS3.5 9.1) and an
    optional ``AccessionNumber`` string; other members (``event``, ``OrthancId``...) are ignored."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[...": deeper than the parser's stack
        raise NotificationError("body", "not JSON") from exc
    if not isinstance(body, dict):
        raise NotificationError("body", "expected a JSON object")
    uid = body.get("StudyInstanceUID")
    if uid is None:
        raise NotificationError("StudyInstanceUID", "missing")
    if not isinstance(uid, str):
        raise NotificationError("StudyInstanceUID", "expected a string")
    uid = uid.strip(" \0")  # DICOM pads UI values to an even length with NUL, some senders with a space
    if not is_uid(uid):
        raise NotificationError("StudyInstanceUID", "not a DICOM UID (digits and dots, at most 64 characters)")
    accession = body.get("AccessionNumber")
    if accession is None:
        accession = ""
    if not isinstance(accession, str):
        raise NotificationError("AccessionNumber", "expected a string")
    accession = accession.strip()
    if len(accession) > MAX_ACCESSION or not accession.isprintable():
        raise NotificationError("AccessionNumber", f"expected at most {MAX_ACCESSION} printable characters")
    return Notification(uid, accession)


class ArchiveChannel(ConsumerChannel):
    kind = "archive"
    accepts = (Study,)
    max_attempts = Setting(int, 8, minimum=1)
    webhook = Setting(str, "/archive/stable")

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)
        auth = (config["username"], config.get("password", "")) if config.get("username") else None
        tls = destination_tls(config, f"channel {self.name}", getattr(runtime.config, "tls", None))
        self.client = DICOMwebClient(config["dicomweb"], auth=auth, token=config.get("token", ""), tls=tls)
        self.archive = DestinationHealth(self.client.base_url)
        self.identities = stores_of(runtime).patients()  # whose each order is; merges
        self._log = log.bind(channel=self.name)

    @classmethod
    def topics_of(cls, config: Mapping[str, Any]) -> list[str]:
        """Its own internal topic, whatever the configuration says: the notifications its webhook journaled."""
        return [NOTIFIED]

    async def stop(self) -> None:
        await self.client.close()
        self.identities.close()

    def health(self) -> dict[str, Any]:
        return channel_health(self.archive)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": [f"http:POST {self.webhook}", f"dicomweb:{self.client.base_url}"],
            "destinations": [f"bus:{STABLE}"],
        }

    def routes(self) -> list[Route]:
        return [Route(self.webhook, self.notified, methods=["POST"])]

    def body_limits(self) -> dict[str, int]:
        """The webhook's request body limit (``traboule.app.http``): a notification is a few hundred bytes."""
        return {self.webhook: WEBHOOK_MAX_BODY}

    async def notified(self, request: Request) -> JSONResponse:
        """The archive's notification: journaled (and so acknowledged) before anything is read from it."""
        raw = await request.body()
        try:
            notice = parse_notification(raw)
        except NotificationError as exc:
            # The field and the reason only: the value came from whoever could reach the port.
            self._log.warning("study.notification_refused", field=exc.field, reason=exc.reason)
            return JSONResponse({"error": f"{exc.field}: {exc.reason}", "field": exc.field}, status_code=400)
        study_uid = notice.study_instance_uid
        peer = request.client.host if request.client else ""
        entry = JournalEntry(
            channel=self.name,
            raw=raw,
            status="accepted",
            peer=peer,
            message_type="StudyStable",
            control_id=study_uid,
            correlation_id=study_uid,
        )
        env = Envelope(
            Study(study_instance_uid=study_uid, accession_number=notice.accession_number),
            source=self.name,
            correlation_id=study_uid,
        )
        env.idempotency_key = env.id  # each notification is read again: a study may have grown since the last one
        try:
            await self.runtime.journal.append(entry, [OutboxEvent(NOTIFIED, env.id, env.to_json())])
        except OSError as exc:  # disk full or failing: nothing stored, the archive may post again later
            self._log.error("journal.write_failed", error=type(exc).__name__, correlation_id=study_uid)
            body = {"error": "not stored, send it again later"}
            return JSONResponse(body, status_code=503, headers={"Retry-After": "30"})
        self._log.info("study.notified", message_id=entry.id, correlation_id=study_uid)
        return JSONResponse({"accepted": study_uid, "journal": entry.id}, status_code=202)

    async def on_event(self, notice: Envelope, delivery: Delivery) -> None:
        """Read the notified study from the archive and publish it (an exception makes the bus retry)."""
        assert isinstance(notice.payload, Study)
        uid = notice.payload.study_instance_uid
        if not is_uid(uid):  # journaled before the webhook checked it: reading it again cannot help
            raise PermanentError("the notified StudyInstanceUID is not a DICOM UID")
        try:
            metadata = await self.client.study_metadata(uid)
        except Exception as exc:
            self.archive.failed(exc)
            raise
        self.archive.succeeded()
        if not metadata:
            raise LookupError(f"study {uid} has no instances in the archive (yet)")
        study = study_from_metadata(metadata, endpoint=self.client.retrieve_url(uid))
        instances = sorted(i.uid for s in study.series for i in s.instances)
        env = Envelope(
            study,
            source=self.name,
            correlation_id=notice.correlation_id,
            idempotency_key="study:" + hashlib.sha256("|".join([uid, *instances]).encode()).hexdigest()[:32],
        )
        await self._check_patient(study, env, delivery)
        await self.runtime.bus.publish(STABLE, env.to_json(), message_id=env.id)
        self.identities.record([study])  # its keys are its patient's, when no order said whose they are
        self._log.info(
            "study.read",
            message_id=env.id,  # the published event's (the notification's is bound)
            series=len(study.series),
            instances=len(instances),
            attempt=delivery.attempt,
        )

    async def _check_patient(self, study: Study, env: Envelope, delivery: Delivery) -> None:
        """A study whose Patient ID was merged is published on the survivor (journaled with a warning); one whose
        patient is not the patient of the order of its accession number (or of its Study Instance UID) is not
        published: journaled as rejected with both patients, dead-lettered (`PermanentError`, no patient data)."""
        uid = study.study_instance_uid
        entry = JournalEntry(
            channel=self.name,
            raw=delivery.body,
            status="accepted",
            message_type="StudyRead",
            control_id=uid,
            correlation_id=env.correlation_id,
            idempotency_key=env.idempotency_key + ":merged",
        )
        entry.warnings = "\n".join(self.identities.resolve_merged([study]))
        try:
            self.identities.check_study(study)
        except MappingFailure as exc:
            entry.status, entry.error, entry.idempotency_key = "rejected", f"{exc.location}: {exc.reason}", ""
        if entry.status == "accepted" and not entry.warnings:
            return
        await self.runtime.journal.append(entry)
        if entry.status == "rejected":
            self._log.warning("study.patient_mismatch", message_id=entry.id)
            raise PermanentError(f"the study's patient is not the patient of its order (journal entry {entry.id})")
        self._log.warning("study.patient_merged", message_id=entry.id)


def study_from_metadata(metadata: list[DicomJSON], *, endpoint: str = "") -> Study:
    """The canonical study from WADO-RS metadata (one DICOM JSON object per instance)."""
    first = metadata[0]
    issuer = value(first, "00100021") or ""
    study = Study(
        study_instance_uid=value(first, "0020000D") or "",
        accession_number=value(first, "00080050") or "",
        patient=Patient(
            ids=[Identifier(value(first, "00100020") or "", issuer)],
            name=_name(value(first, "00100010") or ""),
            birth_date=value(first, "00100030") or "",
            sex=value(first, "00100040") or "",
        ),
        started=(value(first, "00080020") or "") + (value(first, "00080030") or "").split(".")[0],
        description=value(first, "00081030") or "",
        referring_physician=_name(value(first, "00080090") or ""),
        endpoint=endpoint,
    )
    by_uid: dict[str, Series] = {}
    for obj in metadata:
        series_uid = value(obj, "0020000E") or ""
        series = by_uid.get(series_uid)
        if series is None:
            series = by_uid[series_uid] = Series(
                uid=series_uid,
                number=str(value(obj, "00200011") or ""),
                modality=value(obj, "00080060") or "",
                description=value(obj, "0008103E") or "",
                body_site=value(obj, "00180015") or "",
            )
        series.instances.append(
            Instance(
                uid=value(obj, "00080018") or "",
                sop_class_uid=value(obj, "00080016") or "",
                number=str(value(obj, "00200013") or ""),
            )
        )
    for series in by_uid.values():
        series.instances.sort(key=lambda i: (_number(i.number), i.uid))
    study.series = sorted(by_uid.values(), key=lambda s: (_number(s.number), s.uid))
    return study


def _number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 1 << 30


def _name(pn: str) -> PersonName:
    parts = (pn.split("^") + [""] * 5)[:5]
    return PersonName(family=parts[0], given=parts[1], middle=parts[2], prefix=parts[3], suffix=parts[4])
