"""Channel ``hl7-status``: ``procedure.*`` events (MPPS) → HL7 v2 order status message to the RIS over MLLP.

Configuration::

    [[channels]]
    name = "ris-status"
    kind = "hl7-status"
    destination = {adapter = "mllp-sender", host = "ris.example", port = 2576, timeout = 10}
    message = "ORM^O01"                # or "OMI^O23"
    status_table = "mappings/tables/procedure_status.csv"   # MPPS status → ORC-5
    sending_application = "TRABOULE"
    sending_facility = ""
    receiving_application = "RIS"
    receiving_facility = ""
    max_attempts = 5                   # then the event goes to the dead-letter queue <name>.dlq
    topics = ["procedure.#", "order.#"]

Per performed-step event: ORM^O01 v2.5 (MSH, PID, ORC, OBR, ZDS) or OMI^O23 v2.5 (MSH, PID, ORC, TQ1, OBR, IPC)
with ORC-1 SC and ORC-5 IP / CM / DC, sent over one kept MLLP connection. ACK AA/CA → done; AE/AR, no answer in
``timeout`` or a broken connection → the handler raises ``NotAccepted`` (the connection is dropped and reopened
next time) and the bus retries with backoff, then dead-letters after ``max_attempts``.

A modality reports what the worklist gave it: accession number, Requested Procedure ID, SPS ID, often the placer
order number without its issuer. So the channel also consumes ``order.*`` and keeps, per accession number, the
order's placer / filler numbers with their issuers and the patient identifier (the channel's
`traboule.stores.SenderState`: ``<data_dir>/<name>.sqlite``, or the PostgreSQL database every node shares), to
fill ORC-2 / ORC-3 / PID-3 as the RIS knows them. Status messages already accepted by the RIS are remembered by
idempotency key (``traboule.stores.idempotency``, with the control id sent), so a redelivered event is not sent
twice.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from traboule import metrics
from traboule.app.config import resolve
from traboule.bus import Delivery
from traboule.channel import ChannelRuntime, Setting
from traboule.channels.hl7_sender import HL7SenderChannel
from traboule.errors import NotAccepted
from traboule.formats import hl7
from traboule.model import Envelope, Identifier, ImagingOrder, PerformedStep
from traboule.stores.idempotency import Legacy
from traboule.stores.sender_state import KnownOrder
from traboule.translate.mapping import load_table

log = structlog.get_logger("traboule.channels.hl7_status")

# The status messages the RIS accepted, as kept before the idempotent-consumer table: moved into it at start.
_SENT = Legacy("sent", key="idempotency_key", at="sent_at", detail="control_id")


class HL7StatusChannel(HL7SenderChannel):
    kind = "hl7-status"
    receiver = "RIS"
    legacy_sent = _SENT
    topics = Setting(list, ["procedure.#", "order.#"])
    accepts = (ImagingOrder, PerformedStep)
    message = Setting(str, "ORM^O01", choices=("ORM^O01", "OMI^O23"))
    status_table_file = Setting(str, "mappings/tables/procedure_status.csv", key="status_table")

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)
        table_path = resolve(runtime.config, self.status_table_file)
        self.status_table = load_table("procedure_status", str(table_path), table_path.parent, table_path, 0)
        self._log = log.bind(channel=self.name)

    # -- events ----------------------------------------------------------------------------------------------

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        if isinstance(env.payload, ImagingOrder):
            await self._remember(env.payload)
            self.note(env, "order remembered for the status messages")
            return
        assert isinstance(env.payload, PerformedStep)
        key = env.idempotency_key or env.id
        if await self.state_call(self.state.is_done, key):
            metrics.events_processed.labels(self.name, "duplicate").inc()
            self.note(env, "status message already sent", "duplicate")
            return
        control_id = self.sender.next_control_id("S")
        known = await self.state_call(self.state.known_order, env.payload.accession_number) or KnownOrder()
        text = self.build(env.payload, control_id, datetime.now().strftime("%Y%m%d%H%M%S"), known)
        try:
            code = await self.sender.send(text.encode("utf-8"))
        except NotAccepted as exc:  # the bus retries, then dead-letters
            self.destination.failed(exc)
            raise
        self.destination.succeeded()
        await self.state_call(self.state.mark_done, key, control_id)
        metrics.events_processed.labels(self.name, "sent").inc()
        self.note(env, f"{self.message} {env.payload.status} sent, ACK {code}")
        self._log.info(
            "status.sent", control_id=control_id, status=env.payload.status, ack=code, attempt=delivery.attempt
        )

    async def _remember(self, order: ImagingOrder) -> None:
        accession = order.accession_number.value
        if not accession:
            return
        primary = order.patient.primary_id
        known = KnownOrder(
            _ei(order.placer_order_number),
            _ei(order.filler_order_number),
            _cx(primary) if primary else "",
            order.study_instance_uid,
        )
        await self.state_call(self.state.remember_order, accession, known)

    # -- message ---------------------------------------------------------------------------------------------

    def build(self, step: PerformedStep, control_id: str, timestamp: str, known: KnownOrder | None = None) -> str:
        """The status message, built by hand: its shape is fixed and it is sent for every performed step
        (hl7apy would cost a parse-validate round per message for no gain); values go through ``hl7.escape``.
        ``known``: what the RIS said of the step's order (read from the state when not given)."""
        e = hl7.escape
        if known is None:
            known = self.state.known_order(step.accession_number) or KnownOrder()
        placer, filler, patient_id, study_uid = known.placer, known.filler, known.patient_id, known.study_uid
        placer = placer or e(step.placer_order_number)
        filler = filler or e(step.filler_order_number)
        primary = step.patient.primary_id
        patient_id = patient_id or (_cx(primary) if primary else "")
        study_uid = e(step.study_instance_uid) or study_uid
        orc5 = self.status_table.lookup((step.status,), "orc5") or ""
        name = step.patient.name
        pid5 = "^".join(e(p) for p in (name.family, name.given, name.middle, name.suffix, name.prefix)).rstrip("^")
        when = step.ended or step.started
        accession, rp_id, sps_id = e(step.accession_number), e(step.requested_procedure_id), e(step.scheduled_step_id)
        procedure = f"^{e(step.description)}" if step.description else ""
        trigger = self.message.replace("^", "_")
        segments = [
            self.parties.msh(f"{self.message}^{trigger}", control_id, timestamp, "2.5"),
            f"PID|1||{patient_id}||{pid5}",
            f"ORC|SC|{placer}|{filler}||{orc5}||||{timestamp}",
        ]
        if self.message == "OMI^O23":
            segments.append(f"TQ1|1||||||{e(step.started)}|{e(step.ended)}")
        obr = ["OBR", "1", placer, filler, procedure] + [""] * 13 + [accession, rp_id, sps_id]
        obr += ["", when, "", e(step.modality)]  # OBR-22 status change time, OBR-24 modality
        segments.append("|".join(obr))
        if self.message == "OMI^O23":
            segments.append(f"IPC|{accession}|{rp_id}|{study_uid}|{sps_id}|{e(step.modality)}")
        else:
            segments.append(f"ZDS|{study_uid}^{e(self.parties.sending_application)}^Application^DICOM")
        return "\r".join(segments) + "\r"


def _ei(ident: Identifier) -> str:
    """An entity identifier (EI): value ^ namespace id, escaped."""
    if not ident.value:
        return ""
    return hl7.escape(ident.value) + (f"^{hl7.escape(ident.issuer)}" if ident.issuer else "")


def _cx(ident: Identifier) -> str:
    """A patient identifier (CX): value ^^^ assigning authority ^ type, escaped."""
    if not ident.value:
        return ""
    return f"{hl7.escape(ident.value)}^^^{hl7.escape(ident.issuer)}^{hl7.escape(ident.type or 'PI')}"
