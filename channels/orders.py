"""Channel ``hl7-orders``: RIS HL7 v2 orders, ADT and reports over MLLP → journal → canonical events on the bus.

Per message: decode (MSH-18) → tokenize → map (``hl7_inbound.yaml``) → journal the raw bytes with the events
it produced (one transaction) → ACK. AA only once the journal write is on disk; AR for what cannot be read or is
not ours (MSH, message type, charset); AE for what the mapping finds wrong (missing mandatory field, unknown code).
Every message, accepted or not, is in the journal.

Reports (ORU^R01, MDM^T02/T10/T04) become documents before the answer (``traboule.stores.reports``): the CDA is built
(``mappings/cda.yaml``) and, when the CI-SIS validators are available, validated; a report that cannot make a valid
document is answered AE with the reason. Settings: ``reports = {cda_mapping = "mappings/cda.yaml", validate =
"auto", validators = "", cache = ""}`` (``validate``: true requires the validators, "auto" uses them when found,
false skips validation). The channel also consumes ``study.*`` and ``procedure.*`` (queue ``<name>.reports``) for
the DICOM object catalog of the reports (the archive's studies, the MPPS performed series), reads the archive on
demand when neither knows a report's study (``archive``: the archive channel's DICOMweb, ``archive_timeout``
seconds), and keeps the orders it receives (procedure code, identifiers a report may lack), written in batches
every half second off the ACK path. Reports of different document sets are prepared at once, on threads of
their own, up to ``reports.validation_processes`` (CDA validation processes); those of one set one at a time. A
structured report whose study is still unknown is accepted and waits for it (``wait_for_study``, default "24h"; 0
refuses it, AE; ``max_waiting``, default 5000: a warning above), see ``traboule.channels.waiting_reports``.

Patient identity (``traboule.stores.patient_identity``): a message giving an IPP another INS than the recorded one is
refused (AE, PID-3), unless it is a patient update (ADT^A08/A31) from an identity source, whose INS replaces it
(``identity_sources = [{application = "GAM", facility = "CHU-LYON"}]``, MSH-3.1 / MSH-4.1; not set: every sender of
ADT). An order naming an accession number, order number or Study UID of another patient is refused (AE, PID-3): a
patient change of an order is a merge in the identity system. At start, what the accepted messages after the registry's
mark said is recorded again (a crash may have lost it).

Topics published: ``order.<action>`` (new, change, cancel, status), ``patient.<action>`` (update, merge) and
``document.<action>`` (publish, replace, delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from traboule import audit, metrics
from traboule.adapters.mllp import MLLPListener, Refusal
from traboule.app.config import resolve, seconds
from traboule.app.tls_reload import start_watch
from traboule.channel import delivery_recorder, loggable_id
from traboule.channels.waiting_reports import (
    ARCHIVE_RECHECK,
    ARCHIVE_TIMEOUT,
    MAX_WAITING,
    ArchiveReader,
    WaitingReports,
    archive_settings,
)
from traboule.errors import ConfigError, MappingFailure, ReportRefused
from traboule.formats import hl7
from traboule.model import (
    Document,
    Envelope,
    ImagingOrder,
    PatientUpdate,
    Payload,
    PerformedStep,
    Report,
    Study,
    content_key,
    topic_of,
)
from traboule.stores import ReportStore
from traboule.stores.delivery_log import DeliveryRecord
from traboule.stores.factory import stores_of
from traboule.stores.journal import JournalEntry, OutboxEvent, Query
from traboule.stores.patient_identity import REBUILD_MARGIN, identity_sources, mark_authoritative
from traboule.stores.reports import Held
from traboule.tls import peer_subject
from traboule.translate.hl7_mapping import HL7InboundMapping

log = structlog.get_logger("traboule.channels.orders")


class OrdersChannel:
    """HL7 v2 orders in, canonical ImagingOrder / PatientUpdate events out."""

    kind = "hl7-orders"

    def __init__(self, config: dict[str, Any], runtime: Any):
        self.name: str = config["name"]
        self.config = config
        self.runtime = runtime
        self.mapping = HL7InboundMapping(resolve(runtime.config, config.get("mapping", "mappings/hl7_inbound.yaml")))

        def tls_refused(address: str, subject: str, reason: str) -> None:  # a client certificate refused: audited
            peer = audit.Actor(user_id=address or subject, address=address, cert_subject=subject)
            audit.trail_of(runtime).record(audit.node_authentication_failed(peer=peer, reason=reason))

        self.listener = MLLPListener.from_config(
            self.name,
            config.get("source"),
            self.handle,
            on_oversize=self.handle_oversize,
            on_refused=self.handle_refused,
            tls_defaults=runtime.config.tls,
            on_tls_refused=tls_refused,
        )
        self._log = log.bind(channel=self.name)
        self._counter = 0
        self._prefix = uuid.uuid4().hex[:8]
        self.reports: ReportStore | None = None
        if "report" in self.mapping.accept.values() and config.get("reports", {}) is not False:
            self.reports = make_publisher(config, runtime)
        # Reports wait here for their turn, not in the loop's default pool: as many prepared at once as the validator
        # has processes (reports of one document set still one at a time), one thread more for the catalog's writes.
        self._reports_thread = ThreadPoolExecutor(
            getattr(self.reports, "parallel", 1) + 1, thread_name_prefix=f"{self.name}-reports"
        )
        # The orders kept for the reports are written by one thread, in the order they were received: a report
        # waits behind every write taken before it (its own orders included), whichever report or round took them.
        self._orders_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-orders")
        self._orders: list[ImagingOrder] = []  # received, not yet written for the reports
        self._flusher: asyncio.Task[None] | None = None
        self._certificates: asyncio.Task[None] | None = None  # TLS: the listener's files reloaded when they change
        self.identities = stores_of(runtime).patients()  # INS accepted per IPP
        # Whose patient updates replace an IPP's INS (MSH-3/MSH-4); not set: every ADT^A08/A31 the channel accepts.
        self._identity_sources = identity_sources(config.get("identity_sources"), self.name)
        if self.reports is not None:  # a report's catalog is its patient's, merges followed
            self.reports.same_patient = self.identities.same_patient
        self._archive: ArchiveReader | None = None  # read on demand for a report's study
        self._waiting: WaitingReports | None = None  # publishes the reports that wait for their study
        self._held: set[str] = set()  # reports just held (waiting) by the message being handled, until journaled
        self._archive_recheck = ARCHIVE_RECHECK
        self._max_waiting = MAX_WAITING
        if self.reports is not None:
            settings = config.get("reports") or {}
            # Checked here, not in start(): `traboule check` builds the channel without starting it.
            self._archive_recheck = seconds(
                settings.get("archive_recheck", ARCHIVE_RECHECK), f"channel {self.name}: reports.archive_recheck"
            )
            self._max_waiting = settings.get("max_waiting", MAX_WAITING)
            if isinstance(self._max_waiting, bool) or not isinstance(self._max_waiting, int) or self._max_waiting < 0:
                raise ConfigError(
                    f"channel {self.name}: reports.max_waiting must be a whole number, not {self._max_waiting!r}"
                )
            archive = archive_settings(runtime.config, settings, self.name)
            if archive is not None:
                timeout = seconds(
                    settings.get("archive_timeout", ARCHIVE_TIMEOUT), f"channel {self.name}: reports.archive_timeout"
                )
                self._archive = ArchiveReader(archive, timeout)

    @classmethod
    def bindings(cls, config: dict[str, Any]) -> list[tuple[str, list[str]]]:
        return [] if config.get("reports", {}) is False else [(f"{config['name']}.reports", REPORT_TOPICS)]

    async def start(self) -> None:
        if self.runtime.journal is not None:  # before the listener opens: owners a crash kept from the registry
            rebuilt = self.identities.rebuild(self._journaled_since_mark(), self.name)
            self._log.info("identities.rebuilt", messages=rebuilt)
        if self.reports is not None and self.reports.validator is not None:
            # Compiling the schematrons takes seconds: at start, not on the first report (its sender would wait).
            await asyncio.to_thread(self.reports.validator.warm)
        if self.reports is not None and self.runtime.journal is not None:
            journal = self.runtime.journal
            discarded = self.reports.reconcile(journal.accepted)  # before the listener opens: nothing else runs
            if discarded:
                self._log.warning("reports.reconciled", discarded=discarded)
        if self.reports is not None:
            await self.runtime.bus.subscribe_batch(f"{self.name}.reports", REPORT_TOPICS, self._observe)
            self._flusher = asyncio.create_task(self._flush_orders(), name=f"{self.name}-orders")
            if self.runtime.journal is not None:
                self._waiting = WaitingReports(
                    self.name,
                    self.reports,
                    self.runtime.journal,
                    self._reports_thread,
                    self._archive,
                    archive_recheck=self._archive_recheck,
                    max_waiting=self._max_waiting,
                )
                self._waiting.start()
        await self.listener.start()
        if self.listener.tls is not None:
            interval = self.runtime.config.tls_reload_interval
            self._certificates = start_watch(self.name, self.listener.ssl, self.listener.tls, interval)

    def _journaled_since_mark(self) -> Any:
        """(journal id, reception time, payloads) of the channel's accepted messages after the registry's mark (less
        a group commit's worth: they may be recorded out of order), mapped again as at ingest."""
        journal = self.runtime.journal
        after = max(0, (self.identities.mark(self.name) or journal.last_id()) - REBUILD_MARGIN)
        query = Query(statuses=["accepted"], channels=[self.name])
        while batch := journal.select(query, after=after, limit=500):
            for entry in batch:
                after = entry.id
                try:
                    msg = hl7.parse(hl7.decode(entry.raw).text)
                    payloads = self.mapping.map(msg, [])
                except (hl7.HL7Error, MappingFailure):  # a mapping changed since: it cannot say more now
                    continue
                self.identities.resolve_merged(payloads)
                sender = (msg.header("sending_application", 1), msg.header("sending_facility", 1))
                mark_authoritative(payloads, self._identity_sources, sender)
                yield entry.id, entry.received, payloads

    async def stop(self) -> None:
        certificates, self._certificates = self._certificates, None
        if certificates is not None:
            certificates.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await certificates
        await self.listener.stop()
        self.identities.close()  # the owners of the last orders written
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._waiting is not None:
            await self._waiting.stop()
        elif self._archive is not None:
            await self._archive.close()
        if self.reports is not None:
            self._orders_thread.shutdown(wait=True)
            if self._orders:
                self.reports.remember(self._orders)
            self._reports_thread.shutdown(wait=True)
            # The publisher's file stays open: the bus stops after the channels, and its consumer of studies may
            # still hand one over. It closes with the channel object.

    async def _flush_orders(self) -> None:
        """Write the orders received meanwhile, one transaction every ``ORDER_FLUSH`` seconds."""
        assert self.reports is not None
        while True:
            await asyncio.sleep(ORDER_FLUSH)
            if self._orders:
                batch, self._orders = self._orders, []
                try:
                    await asyncio.get_running_loop().run_in_executor(self._orders_thread, self.reports.remember, batch)
                except Exception as exc:  # e.g. disk full: keep them for the next round
                    self._orders = batch + self._orders
                    self._log.warning("reports.orders_not_written", error=str(exc))

    async def _observe(self, deliveries: list[Any]) -> None:
        """Studies and performed steps on the bus, a batch per transaction: the DICOM object catalog of the reports;
        the reports waiting for one of them are looked at once it is written."""
        if self.reports is None:
            return
        payloads = [Envelope.from_json(d.body).payload for d in deliveries]
        await asyncio.to_thread(self.reports.remember, payloads)
        if self._waiting is not None:  # only the reports waiting for these studies are looked at
            studies = [p for p in payloads if isinstance(p, Study | PerformedStep)]
            self._waiting.wake([s.study_instance_uid for s in studies], [s.accession_number for s in studies])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": f"mllp://{self.listener.host}:{self.listener.port}",
            "mapping": str(self.mapping.path),
            "accepts": sorted(self.mapping.accept),
            "destinations": ["bus:order.*", "bus:patient.*"] + (["bus:document.*"] if self.reports else []),
            **({"validation": "on" if self.reports.validator else "off"} if self.reports else {}),
            **({"reports_waiting": self.reports.counts()["waiting"]} if self.reports else {}),  # for their study
        }

    def health(self) -> dict[str, Any]:
        """``ok``, with the reports waiting for their study and the dead letters (``traboule reports waiting``):
        an operator's work, not a fault of the engine (not among ``/health``'s problems)."""
        if self.reports is None:
            return {"state": "ok"}
        counts = self.reports.counts()
        over = {"over_max_waiting": True} if counts["waiting"] > self._max_waiting else {}
        return {"state": "ok", "reports": {**counts, "max_waiting": self._max_waiting, **over}}

    # -- message handling ------------------------------------------------------------------------------------

    def _next_control_id(self) -> str:
        self._counter += 1
        return f"{self._prefix}{self._counter}"

    async def handle(self, data: bytes, peer: str) -> bytes:
        """One MLLP message (or FHS/BHS batch) in, the ACK bytes out."""
        started = time.perf_counter()
        try:
            decoded = hl7.decode(data)
        except hl7.HL7Error as exc:
            reply = await self._reject(data, peer, exc, codec="latin-1")
            metrics.ack_seconds.labels(self.name).observe(time.perf_counter() - started)
            return reply
        if hl7.is_batch(decoded.text):
            replies = [await self._one(m.text.encode(m.codec), m, peer) for m in hl7.batch_messages(decoded)]
            reply = hl7.batch_ack(replies, decoded.codec, datetime.now().strftime("%Y%m%d%H%M%S"))
        else:
            reply = await self._one(data, decoded, peer)
        metrics.ack_seconds.labels(self.name).observe(time.perf_counter() - started)
        return reply

    async def _one(self, data: bytes, decoded: hl7.Decoded, peer: str) -> bytes:
        """One message in, its ACK out: tokenize → map and check → journal → answer.

        The lines logged meanwhile, by the channel or what it calls, carry the channel and the message's correlation
        id (bound once it is read) and, once it is journaled, its journal id (``message_id``).
        """
        now = datetime.now().strftime("%Y%m%d%H%M%S")
        it = _Handling(
            JournalEntry(
                channel=self.name, raw=data, status="accepted", peer=peer, warnings="\n".join(decoded.warnings)
            )
        )
        # A large message is tokenized and mapped on a thread: the loop keeps answering the other connections
        # meanwhile (the interpreter switches threads every few ms), where it would stall for as long (~1 s for
        # 16 MiB of tiny segments).
        large = len(data) > LARGE_MESSAGE
        try:
            await self._tokenize(it, decoded.text, large)
        except Exception as exc:
            self._refuse(it, exc)
        correlation_id = loggable_id(it.entry.correlation_id)
        with structlog.contextvars.bound_contextvars(channel=self.name, correlation_id=correlation_id):
            if it.msg is not None and it.error is None:
                try:
                    await self._translate(it, it.msg, large)
                except Exception as exc:
                    self._refuse(it, exc)
            self._settle(it)
            if await self._journal(it):
                with structlog.contextvars.bound_contextvars(message_id=it.entry.id):
                    await self._journaled(it)
                try:  # durable now: on the audit trail (which never raises; a fault here must not cost the ACK)
                    self._audit(it, peer)
                except Exception as exc:
                    self._log.error("audit.not_recorded", error=type(exc).__name__, control_id=it.entry.control_id)
        ack = hl7.build_ack(
            it.msg,
            it.code,
            control_id=self._next_control_id(),
            timestamp=now,
            error=it.error,
            header=None if it.msg else hl7.peek_for_ack(decoded.text),
        )
        return ack.encode(decoded.codec, "replace")

    async def _tokenize(self, it: _Handling, text: str, large: bool) -> None:
        """The message's segments, and its identifiers in the journal entry (correlation id: MSH-10, else the
        content's key)."""
        msg = it.msg = await asyncio.to_thread(hl7.parse, text) if large else hl7.parse(text)
        entry = it.entry
        entry.control_id = msg.control_id
        entry.message_type = msg.message_type
        entry.idempotency_key = _idempotency_key(msg)
        entry.correlation_id = msg.control_id or entry.idempotency_key

    async def _translate(self, it: _Handling, msg: hl7.Message, large: bool) -> None:
        """Map the message, check it against the patients' identities, make its documents: the events to publish."""
        entry = it.entry
        notes: list[str] = []
        mapped = await asyncio.to_thread(self.mapping.map, msg, notes) if large else self.mapping.map(msg, notes)
        it.mapped = mapped  # for the audit trail, once journaled
        await self._identities(self._check_identities, it, msg, mapped, notes)
        payloads = await self._prepare(mapped, entry.idempotency_key, notes)
        fresh = [p for p in payloads if not any(p is m for m in mapped)]  # the mapped ones are resolved already
        if fresh:  # a deletion names the deleted version's patient
            notes.extend(await self._identities(self.identities.resolve_merged, fresh))
        if notes:  # values the mapping cut to fit: said in the journal entry, beside the charset warnings
            entry.warnings = "\n".join([*filter(None, [entry.warnings]), *notes])
        for i, payload in enumerate(payloads):
            env = Envelope(
                payload,
                source=self.name,
                idempotency_key=f"{entry.idempotency_key}:{i}",
                correlation_id=entry.correlation_id,
            )
            it.events.append(OutboxEvent(topic_of(payload), env.id, env.to_json()))
        it.payloads = payloads

    async def _identities(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A call of the patient registry: on a thread when it waits for a database server (``off_loop``), so that
        the loop serves the other connections meanwhile; on the loop otherwise (SQLite: no hop)."""
        if self.identities.off_loop:
            return await asyncio.to_thread(call, *args, **kwargs)
        return call(*args, **kwargs)

    def _check_identities(self, it: _Handling, msg: hl7.Message, mapped: list[Payload], notes: list[str]) -> None:
        """Patient identity (warnings in ``notes``): a merged IPP becomes its survivor's; an IPP given another INS
        than the one it was accepted with is refused (AE, PID-3), unless an identity source's patient update says so
        (the INS replaced); a report or an order naming another patient's order, study or keys is refused (AE,
        PID-3). The registry's ``admit`` decides the usual message in one query (one round trip on PostgreSQL); when
        it declines, the full checks run."""
        sender = (msg.header("sending_application", 1), msg.header("sending_facility", 1))
        mark_authoritative(mapped, self._identity_sources, sender)  # (merges leave the payloads' kinds as they are)
        admit = getattr(self.identities, "admit", None)
        if admit is not None and admit(mapped):  # reserved and held: recorded or released like the checks'
            it.reserved = mapped
            return
        notes.extend(self.identities.resolve_merged(mapped))
        notes.extend(self.identities.check(mapped))
        it.reserved = mapped
        self.identities.check_report(mapped)
        self.identities.check_order(mapped)

    def _refuse(self, it: _Handling, exc: Exception) -> None:
        """The answer to a message a step could not take: AR or AE with the error for the ERR segment."""
        if isinstance(exc, hl7.HL7Error):
            it.code = "AR" if exc.reject else "AE"
            it.error = hl7.AckError(str(exc), exc.location, exc.code)
        elif isinstance(exc, MappingFailure | ReportRefused):
            it.code = "AE"
            it.error = hl7.AckError(exc.reason, exc.location, exc.code)
        else:  # a fault of ours: still journaled and answered (AR: the sender tries again)
            self._log.exception("message.failed", control_id=it.entry.control_id, error=type(exc).__name__)
            it.code = "AR"
            it.error = hl7.AckError(f"internal error ({type(exc).__name__}), send it again later", "", "207")

    def _settle(self, it: _Handling) -> None:
        """The journal entry's outcome; a refused message publishes nothing."""
        entry = it.entry
        it.held = entry.idempotency_key in self._held  # a report kept waiting for its study: undone if not journaled
        self._held.discard(entry.idempotency_key)
        it.prepared = it.held or any(e.topic.startswith("document.") for e in it.events)
        if it.error:
            entry.status = "rejected"
            entry.error = f"{it.error.location}: {it.error.reason}" if it.error.location else it.error.reason
            entry.ack_code = it.code
            it.events = []
        else:
            entry.ack_code = "AA"

    async def _journal(self, it: _Handling) -> bool:
        """Write the message with its events, one transaction. False when the journal cannot be written: what was
        made for the message is undone and the answer becomes AR (nothing is acknowledged)."""
        entry = it.entry
        try:
            await self.runtime.journal.append(entry, it.events)
        except BaseException as exc:  # the journal is not writable (or the engine stops)
            if it.prepared and self.reports is not None:  # a document nobody will hear of: undo it
                await asyncio.to_thread(self.reports.discard, entry.idempotency_key)
            await self._identities(self.identities.release, it.reserved)
            if not isinstance(exc, Exception):
                raise
            self._log.error("journal.write_failed", error=str(exc), control_id=entry.control_id)
            # AR, not AE: the message itself is fine, and senders resend after AR (many do not after AE).
            it.code = "AR"
            it.error = hl7.AckError("message not stored, send it again later", "", "207")
            return False
        return True

    async def _journaled(self, it: _Handling) -> None:
        """After the journal write: the patients' identities and the reports' listing follow it; counted, logged."""
        entry, error = it.entry, it.error
        if it.held and entry.status == "accepted" and self.reports is not None:  # for the operator's listing
            asyncio.get_running_loop().run_in_executor(
                self._reports_thread, self.reports.journaled, entry.idempotency_key, entry.id
            )
        if entry.status == "accepted":  # journaled: its IPP-INS pairs are now the patient's
            await self._identities(self.identities.record, it.reserved, channel=self.name, journal_id=entry.id)
        else:  # refused or a duplicate: its pairs hold nothing against the next messages
            await self._identities(self.identities.release, it.reserved)
        metrics.messages_received.labels(self.name, entry.status).inc()
        self._log.info(
            "message." + entry.status,
            control_id=entry.control_id,
            message_type=entry.message_type,
            ack=it.code,
            events=len(it.events),
            # Where and why, never the reason's text: it may quote the message's values (the journal and the
            # ACK carry it; the log is read by people who may not see patient data).
            **({"error_location": error.location, "error_code": error.code} if error else {}),
            **({"warnings": len(entry.warnings.splitlines())} if entry.warnings else {}),
        )
        self._record_reports(it)

    def _audit(self, it: _Handling, peer: str) -> None:
        """The journaled message on the audit trail (IHE ATNA): an Order Record (ORM/OMI) or a Patient Record
        (ADT, ORU/MDM) received, its action from the canonical events it made (a merge: D for the merged
        identifiers, U for the survivor); a refused one as a minor failure with its ACK and error codes only. Built
        from what the handling already holds: no parsing here."""
        msg = it.msg
        sender = f"{msg.header('sending_application', 1)}|{msg.header('sending_facility', 1)}" if msg else "|"
        source = audit.actor(sender, _address(peer), peer_subject.get())
        message = (audit.object_ref("message", it.entry.control_id),) if it.entry.control_id else ()
        trail = audit.trail_of(self.runtime)
        if it.error is not None:
            kind, action = _MESSAGE_KINDS.get(it.entry.message_type.split("^", 1)[0], ("order", "C"))
            patients = audit.patients_of(*(p.patient for p in it.mapped if hasattr(p, "patient")))
            trail.record(
                audit.message_received(
                    kind,
                    action,
                    source=source,
                    patients=patients,
                    objects=message,
                    outcome=audit.Outcome.MINOR_FAILURE,
                    description=_refusal(it.code, it.error.code),
                )
            )
            return
        for kind, action, patients, objects in _audited(it.mapped, it.payloads):
            trail.record(
                audit.message_received(kind, action, source=source, patients=patients, objects=(*message, *objects))
            )

    async def _prepare(self, payloads: list[Payload], message_key: str, notes: list[str]) -> list[Payload]:
        """Reports become documents (CDA built and validated) before the answer, or wait for their study (said in
        ``notes``, the journal entry's warnings); orders are remembered for them."""
        out: list[Payload] = []
        for payload in payloads:
            if isinstance(payload, Report):
                if self.reports is None:
                    raise MappingFailure("reports are not enabled on this channel", "MSH-9", code="200")
                loop = asyncio.get_running_loop()
                # The orders received before it: the report may need one of them. Those still here are written
                # now; those another report or the periodic round took are ahead in the same thread's queue.
                batch, self._orders = self._orders, []
                try:
                    await loop.run_in_executor(self._orders_thread, self.reports.remember, batch)
                except Exception as exc:  # kept for the next round; the report goes on without them
                    self._orders = batch + self._orders
                    self._log.warning("reports.orders_not_written", error=str(exc))
                if self._archive is not None:  # neither the archive's events nor the MPPS know its study: ask
                    missing = await loop.run_in_executor(self._reports_thread, self.reports.missing_study, payload)
                    study = await self._archive.study(*missing) if missing else None
                    if study is not None:
                        await loop.run_in_executor(self._reports_thread, self.reports.remember, [study])
                try:
                    result = await loop.run_in_executor(
                        self._reports_thread, self.reports.prepare, payload, message_key
                    )
                except ReportRefused:
                    raise
                except Exception as exc:  # a fault of ours or of the validator: the sender may try again later
                    self._log.exception("report.failed", error=type(exc).__name__)
                    raise hl7.HL7Error(
                        f"the report could not be processed, send it again later: {type(exc).__name__}",
                        location="",
                        code="207",
                        reject=True,
                    ) from exc
                if isinstance(result, Held):  # accepted, nothing to publish now: the journal entry says why
                    notes.append(result.note)
                    if result.new:
                        self._held.add(message_key)
                    continue
                payload = result
            elif isinstance(payload, ImagingOrder) and self.reports is not None:
                self._orders.append(payload)
            out.append(payload)
        return out

    async def _reject(self, data: bytes, peer: str, exc: hl7.HL7Error, *, codec: str, answered: bool = True) -> bytes:
        """Bytes that could not even be decoded: journal them raw, answer AR from what MSH we can split
        (``answered=False``: journaled without an ACK code, the caller sends nothing)."""
        entry = JournalEntry(
            channel=self.name,
            raw=data,
            status="rejected",
            peer=peer,
            ack_code="AR" if answered else "",
            error=f"{exc.location}: {exc}",
        )
        header = hl7.peek_for_ack(data.decode("latin-1").lstrip("\ufeff\r\n "))
        entry.control_id = header.control_id
        try:
            await self.runtime.journal.append(entry)
        except Exception as exc:  # still answer: the sender must learn that nothing was stored
            self._log.error("journal.write_failed", error=str(exc), control_id=entry.control_id)
        else:
            sender = f"{header.sending_application.split('^', 1)[0]}|{header.sending_facility.split('^', 1)[0]}"
            audit.trail_of(self.runtime).record(
                audit.message_received(
                    "order",
                    "C",
                    source=audit.actor(sender, _address(peer), peer_subject.get()),
                    patients=(),
                    objects=(audit.object_ref("message", entry.control_id),) if entry.control_id else (),
                    outcome=audit.Outcome.MINOR_FAILURE,
                    description=_refusal(entry.ack_code or "AR", exc.code),
                )
            )
        metrics.messages_received.labels(self.name, "rejected").inc()
        self._log.info(
            "message.rejected",
            message_id=entry.id,
            control_id=entry.control_id,
            ack=entry.ack_code or None,
            error_location=exc.location,
            error_code=exc.code,
        )
        ack = hl7.build_ack(
            None,
            "AR",
            control_id=self._next_control_id(),
            timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
            error=hl7.AckError(str(exc), exc.location, exc.code),
            header=header,
        )
        return ack.encode(codec, "replace")

    async def handle_oversize(self, head: bytes, peer: str) -> bytes:
        exc = hl7.HL7Error(f"message larger than {self.listener.max_message_size} bytes", location="MSH", code="102")
        return await self._reject(head, peer, exc, codec="latin-1")

    async def handle_refused(self, data: bytes, peer: str, why: Refusal) -> bytes | None:
        """Bytes the listener did not hand over as a message: journaled raw like any refused message, answered AR
        where the sender awaits an answer (not for bytes before a start block, nor a frame cut short by one: an
        answer would be read by the sender as the answer to its next message; nor a frame left unfinished by a
        closed connection: nobody to answer)."""
        reason, code = {
            "no_start_block": ("MLLP bytes without a start block (0x0B): send the message again, framed", "102"),
            "outside_frame": ("bytes outside any MLLP frame, not answered", "102"),
            "overloaded": ("the listener holds too many unfinished messages, send it again later", "207"),
            "frame_timeout": (f"message not complete within {self.listener.frame_timeout:g} s, send it again", "207"),
            "frame_interrupted": ("MLLP frame cut short by a start block (0x0B), not answered", "102"),
            "partial_frame": ("MLLP frame unfinished: the connection closed before its end block", "102"),
            "bad_end_block": ("MLLP end block 0x1C not followed by 0x0D: send the message again, framed", "102"),
        }[why]
        answered = why not in ("outside_frame", "frame_interrupted", "partial_frame")
        error = hl7.HL7Error(reason, location="MSH", code=code)
        reply = await self._reject(data, peer, error, codec="latin-1", answered=answered)
        return reply if answered else None

    def _record_reports(self, it: _Handling) -> None:
        """The delivery log of a journaled message with reports, keyed by its idempotency key (the console's message
        page): the CDA each report made (id, version, its CI-SIS validation), that it waits for its study, or why it
        was refused (codes and counts only). Handed to the recorder's thread: never waits, never raises."""
        try:
            reports = [p for p in it.mapped if isinstance(p, Report)]
            key, entry = it.entry.idempotency_key, it.entry
            recorder = delivery_recorder(self.runtime) if reports and key else None
            if recorder is None:
                return
            checked = "valid" if self.reports is not None and self.reports.validator is not None else "not validated"
            rows: list[tuple[str, str]] = []
            if it.error is not None:
                reason = it.error.reason.partition("CDA not valid: ")[2]
                count = f", CDA not valid: {reason.count('; ') + 1} error(s)" if reason else ""
                rows.append(("error", f"report refused ({it.code}, error code {it.error.code}){count}"))
            else:
                outcome = "duplicate" if entry.status == "duplicate" else "applied"
                documents = [p for p in it.payloads if isinstance(p, Document)]
                for doc in documents:
                    made = f"CDA {doc.id} version {doc.version} ({doc.action})"
                    rows.append((outcome, made if doc.action == "delete" else f"{made}; CI-SIS validation: {checked}"))
                for report in reports[len(documents) :]:  # held: nothing published now
                    waits = f"waiting for its study; CI-SIS validation: {checked}"
                    rows.append((outcome, "waiting versions withdrawn" if report.action == "delete" else waits))
            for outcome, detail in rows:
                recorder.add(DeliveryRecord(key, entry.correlation_id, self.name, outcome, detail))
        except Exception as exc:  # a log for people: never the message's outcome
            self._log.warning("delivery_log.record_failed", error=type(exc).__name__)


@dataclass
class _Handling:
    """One message on its way through `OrdersChannel._one`: what each step found."""

    entry: JournalEntry
    msg: hl7.Message | None = None  # None: it could not be tokenized (the ACK echoes what its MSH says)
    events: list[OutboxEvent] = field(default_factory=list)
    reserved: list[Payload] = field(default_factory=list)  # let through by the identity check: recorded or released
    code: str = "AA"
    error: hl7.AckError | None = None
    held: bool = False  # a report kept waiting for its study, by this message
    prepared: bool = False  # a document was made (or held): undone if the message is not journaled
    mapped: list[Payload] = field(default_factory=list)  # what the mapping made of it (the audit's patients)
    payloads: list[Payload] = field(default_factory=list)  # what it publishes (documents made of reports)


# One validator per validator tree and cache in a process: its compiled schematrons (seconds to build) are shared by
# the channels and engine restarts of the process.
_VALIDATORS: dict[tuple[str, str, int], Any] = {}


REPORT_TOPICS = ["study.#", "procedure.#"]  # the catalog sources: the archive's studies, the MPPS performed series
LARGE_MESSAGE = 256 * 1024  # bytes: above, parsing and mapping leave the event loop
ORDER_FLUSH = 0.5  # seconds between two writes of the orders the reports may need


def make_publisher(config: dict[str, Any], runtime: Any) -> ReportStore:
    """The report publisher of an inbound channel, from its ``reports`` settings."""
    from traboule.translate.cda import CDAMapping

    settings = config.get("reports") or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"channel {config['name']}: reports must be a table or false")
    mapping = CDAMapping(resolve(runtime.config, settings.get("cda_mapping", "mappings/cda.yaml")))
    validate = settings.get("validate", "auto")
    validator = None
    if validate is not False and str(validate).lower() != "false":
        from traboule.formats.cda_validation import ProcessValidator, default_processes, processes_setting

        configured = str(settings.get("validators", "") or os.environ.get("TRABOULE_CDA_VALIDATORS", ""))
        tree = resolve(runtime.config, configured) if configured else None
        if tree is not None and not tree.is_dir():
            raise ConfigError(f"channel {config['name']}: reports.validators {tree} is not a directory")
        if tree is None and validate is True:
            raise ConfigError(
                f"channel {config['name']}: reports.validate is true but the CI-SIS validators were not found "
                "(set reports.validators or TRABOULE_CDA_VALIDATORS to a testContenuCDA tree)"
            )
        processes = settings.get("validation_processes")  # default: $TRABOULE_CDA_PROCESSES, else one per core
        where = f"channel {config['name']}: reports.validation_processes"
        processes = default_processes() if processes in (None, "") else processes_setting(processes, where)
        if tree is not None:
            key = (str(tree), str(settings.get("cache") or ""), processes)  # channels asking for as many share it
            validator = _VALIDATORS.get(key)
            if validator is None:
                validator = _VALIDATORS[key] = ProcessValidator(tree, key[1] or None, processes)
        else:
            log.warning("reports.unvalidated", channel=config["name"], reason="CI-SIS validators not found")
    wait = seconds(settings.get("wait_for_study", "24h"), f"channel {config['name']}: reports.wait_for_study")
    return stores_of(runtime).reports(config["name"], mapping, validator, wait_for_study=wait)


# The audit's kind and action of a refused message, by MSH-9.1 (what a message of that type usually is).
_MESSAGE_KINDS: dict[str, tuple[Any, audit.Action]] = {
    "ORM": ("order", "C"),
    "OMI": ("order", "C"),
    "OMG": ("order", "C"),
    "ADT": ("patient", "U"),
    "ORU": ("report", "C"),
    "MDM": ("report", "C"),
}
_ORDER_ACTIONS: dict[str, audit.Action] = {"new": "C", "change": "U", "status": "U", "cancel": "D"}
_DOCUMENT_ACTIONS: dict[str, audit.Action] = {"publish": "C", "replace": "U", "delete": "D"}


def _audited(mapped: list[Payload], payloads: list[Payload]) -> list[tuple[Any, audit.Action, Any, Any]]:
    """(kind, action, patients, objects) of what an accepted message made, one per kind and action: its orders
    (accession, placer and filler numbers), patient updates and merges, reports (the documents made of them, or
    the report's own id while it waits for its study)."""
    # Per group, the objects in a dict (each once, in order) and at most MAX_REFS of them: an order of 1,000
    # procedures costs linear time before its ACK, and the event keeps only MAX_REFS anyway.
    groups: dict[tuple[str, audit.Action], tuple[list[Any], dict[audit.ObjectRef, None]]] = {}

    def add(kind: str, action: audit.Action, patient: Any, objects: list[audit.ObjectRef]) -> None:
        patients, refs = groups.setdefault((kind, action), ([], {}))
        if patient is not None:
            patients.append(patient)
        for o in objects:
            if len(refs) >= audit.MAX_REFS:
                break
            if o.value:
                refs.setdefault(o)

    documents = [p for p in payloads if isinstance(p, Document)]
    for payload in mapped:
        if isinstance(payload, ImagingOrder):
            add(
                "order",
                _ORDER_ACTIONS.get(payload.action, "U"),
                payload.patient,
                [
                    audit.object_ref("accession", payload.accession_number.value),
                    audit.object_ref("order", payload.placer_order_number.value),
                    audit.object_ref("order", payload.filler_order_number.value),
                ],
            )
        elif isinstance(payload, PatientUpdate):
            if payload.action == "merge":
                patients, _ = groups.setdefault(("patient", "D"), ([], {}))
                patients.append(payload.merged_ids)
            add("patient", "U", payload.patient, [])
        elif isinstance(payload, Report) and not documents:  # kept waiting for its study: no document yet
            add("report", "C", payload.patient, [audit.object_ref("document", payload.document_id)])
    for doc in documents:
        doc_objects = [
            audit.object_ref("document", doc.id),
            audit.object_ref("accession", doc.report.accession_number.value),
        ]
        add("report", _DOCUMENT_ACTIONS.get(doc.action, "U"), doc.report.patient, doc_objects)
    out = []
    for (kind, action), (patients, objects) in groups.items():
        ids = (i for p in patients for i in (p if isinstance(p, list) else p.ids))  # a patient's, or merged ids
        out.append((kind, action, audit.patient_refs((i.value, i.issuer_oid or i.issuer) for i in ids), tuple(objects)))
    return out


def _address(peer: str) -> str:
    """The address of an MLLP peer ``host:port``."""
    return peer.rsplit(":", 1)[0]


def _refusal(code: str, error_code: str) -> str:
    """A refusal as the audit trail describes it: the ACK code and the HL7 error code, never the reason's text (it
    may quote the message's values)."""
    error = error_code if error_code.isdigit() and len(error_code) <= 4 else ""
    return f"message refused: {code if code in ('AE', 'AR') else 'AR'}" + (f", HL7 error {error}" if error else "")


def _idempotency_key(msg: hl7.Message) -> str:
    """Same content → same key. MSH-7 (time sent) is left out so that a resend of the same order matches."""
    fields = list(msg.msh.fields)
    sent_at = hl7.MSH_FIELDS["date_time"]
    if len(fields) > sent_at:
        fields[sent_at] = ""
    body = "\r".join(s.name + "|" + "|".join(s.fields[1:]) for s in msg.segments[1:])
    return content_key("|".join(fields), body)
