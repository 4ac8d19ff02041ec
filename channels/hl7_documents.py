"""Channel ``hl7-documents``: published report documents (``document.*``) → HL7 v2 over MLLP, the way the CI-SIS
volet "Transmission de document(s) CDA en HL7v2" carries them, to feed a DRIMbox Source or any CDA consumer.

Per document event, one message with the CDA in base64 in an ED OBX and ``MSH-21 = 2.1^CISIS_CDA_HL7_V2``:

* ``message = "ORU^R01"`` (default, HL7 v2.5): ORC-1 NW / RO / CA, OBR-4 ``18748-4``, OBR-18 the accession number,
  ``OBX|1|ED|18748-4^CR d'imagerie médicale^LN||^TEXT^XML^Base64^…`` with OBX-11 F (publish), C (replace) or D
  (delete);
* ``message = "MDM"`` (HL7 v2.6): MDM^T02 / T10 / T04 with TXA-12 the document id and TXA-13 the one it replaces.

The sender's sharing instructions (``MetaDMPMSS`` rows: masking, DMP destination...) follow as CWE OBX rows. Sent
over one kept connection, ACK-checked (AA/CA). Order matters (a replacement must not overtake its original): a
message the receiver does not accept (AE/AR, silence, a broken connection) is retried in place, with backoff from
0.5 s doubling to 30 s, for ``retry_window`` seconds while the next ones wait; then the attempt counts (the event
goes back to the bus, and a later version of that document waits for it), and after ``max_attempts`` the event is
dead-lettered and the feed moves on. Messages the receiver accepted are remembered by
event id (``traboule.stores.idempotency``, with the control id sent), so a redelivered event is not sent twice.

Configuration::

    [[channels]]
    name = "drimbox"
    kind = "hl7-documents"
    destination = {adapter = "mllp-sender", host = "drimbox.example", port = 2575, timeout = 10}
    message = "ORU^R01"                # or "MDM"
    sending_application = "TRABOULE"
    sending_facility = ""
    receiving_application = "DRIMBOX"
    receiving_facility = ""
    retry_window = 60                  # seconds a refused message is retried in place, in order
    max_attempts = 10
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import structlog

from traboule import audit, metrics
from traboule.bus import Delivery
from traboule.channel import ChannelRuntime, Setting
from traboule.channels.hl7_sender import HL7SenderChannel
from traboule.errors import NotAccepted
from traboule.formats import hl7
from traboule.model import Document, Envelope, Identifier, Patient
from traboule.stores.idempotency import Legacy

log = structlog.get_logger("traboule.channels.hl7_documents")

# The messages the receiver accepted, as kept before the idempotent-consumer table: moved into it at start.
_SENT = Legacy("sent", key="event_id", at="sent_at", detail="control_id")
CISIS_CDA_PROFILE = "2.1^CISIS_CDA_HL7_V2"  # MSH-21 of the volet "Transmission de document(s) CDA en HL7v2"
ORC = {"publish": "NW", "replace": "RO", "delete": "CA"}
OBX_STATUS = {"publish": "F", "replace": "C", "delete": "D"}
MDM_EVENT = {"publish": "T02", "replace": "T10", "delete": "T04"}
# Display names of the CI-SIS sharing instructions (OBX-3.2 when the row is re-emitted).
SHARING = {
    "MASQUE_PS": "Masqué aux professionnels de Santé",
    "INVISIBLE_PATIENT": "Document Non Visible par le patient",
    "INVISIBLE_REP_LEGAUX": "Non visible par les représentants Légaux du patient",
    "CONNEXION_SECRETE": "Connexion Secrete",
    "MODIF_CONF_CODE": "Modification Confidentiality Code",
    "DESTDMP": "Destinataire DMP",
    "DESTMSSANTEPS": "Destinataire (Professionnel de Santé, organisation ou BAL applicative)",
    "DESTMSSANTEPAT": "Destinataire Patient",
    "ACK_RECEPTION": "Accusé de réception",
    "ACK_LECTURE_MSS": "Accusé de lecture",
}


class HL7DocumentsChannel(HL7SenderChannel):
    kind = "hl7-documents"
    receiver = "DRIMBOX"
    legacy_sent = _SENT
    topics = Setting(list, ["document.#"])
    accepts = (Document,)
    max_attempts = Setting(int, 10, minimum=1)
    retry_window = Setting(float, 60.0, minimum=0)
    message = Setting(str, "ORU^R01", choices=("ORU^R01", "MDM"))

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        super().__init__(config, runtime)  # marks keyed by event id
        self._log = log.bind(channel=self.name)

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        assert isinstance(env.payload, Document)
        if await self.state_call(self.state.is_done, env.id):
            metrics.events_processed.labels(self.name, "duplicate").inc()
            self.note(env, "document message already sent", "duplicate")
            return
        doc = env.payload
        waits_for = doc.replaces if doc.action == "replace" else doc.id if doc.action == "delete" else ""
        # A document whose message the receiver has not taken yet (back on the bus) holds its later versions back.
        if waits_for and await self.state_call(self.state.is_pending, waits_for):
            raise NotAccepted(f"{doc.action} of {doc.id} waits for {waits_for}, not taken by the receiver yet")
        control_id = self.sender.next_control_id("D")
        text = self.build(doc, control_id, datetime.now().strftime("%Y%m%d%H%M%S"))
        try:
            code = await self._send_in_order(text.encode("utf-8"))
        except NotAccepted as exc:
            self._audit(doc, control_id, type(exc).__name__)
            if doc.action != "delete":
                await self.state_call(self.state.set_pending, doc.id)
            raise
        self._audit(doc, control_id)
        await self.state_call(self.state.mark_done, env.id, control_id, clear_pending=doc.id)  # one transaction
        metrics.events_processed.labels(self.name, "sent").inc()
        self.note(env, f"{doc.action} of document {doc.id} sent, ACK {code}")
        self._log.info(
            "document.sent",
            control_id=control_id,
            action=env.payload.action,
            document_id=env.payload.id,
            ack=code,
            attempt=delivery.attempt,
        )

    def _audit(self, doc: Document, control_id: str, failure: str = "") -> None:
        """The document sent on the audit trail (Export, no IHE transaction: the CI-SIS volet "Transmission de
        document(s) CDA en HL7v2" names none), to the receiver's host; not accepted within ``retry_window``: a minor
        failure (the bus retries it) naming the error's class only."""
        host = self.sender.client.host
        receiver = f"{self.parties.receiving_application}|{self.parties.receiving_facility}"
        audit.trail_of(self.runtime).record(
            audit.exported(
                destination=audit.actor(host, host, user_name=receiver),
                patients=audit.patients_of(doc.report.patient),
                objects=(
                    audit.object_ref("document", doc.id),
                    audit.object_ref("message", control_id),
                    *(
                        [audit.object_ref("accession", doc.report.accession_number.value)]
                        if doc.report.accession_number.value
                        else []
                    ),
                ),
                transaction="",
                outcome=audit.Outcome.MINOR_FAILURE if failure else audit.Outcome.SUCCESS,
                description=f"not accepted: {failure}" if failure else "",
            )
        )

    async def _send_in_order(self, data: bytes) -> str:
        """Send, retrying in place for ``retry_window``; then raise ``NotAccepted`` (the bus counts an attempt)."""
        deadline = time.monotonic() + self.retry_window
        backoff = 0.5
        while True:
            try:
                code = await self.sender.send(data)
                self.destination.succeeded()
                return code
            except NotAccepted as exc:
                self.destination.failed(exc)
                if time.monotonic() + backoff > deadline:
                    raise
                # Not the text: a receiver's ERR may quote the message's values.
                self._log.warning("document.retry", error=type(exc).__name__, wait_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    def build(self, doc: Document, control_id: str, timestamp: str) -> str:
        """The message, built by hand: a fixed shape per the volet; every value goes through ``hl7.escape``."""
        e = hl7.escape
        report = doc.report
        mdm = self.message == "MDM"
        version = "2.6" if mdm else "2.5"
        message_type = f"MDM^{MDM_EVENT[doc.action]}^MDM_T02" if mdm else "ORU^R01^ORU_R01"
        msh = self.parties.msh(message_type, control_id, timestamp, version, country="FRA", profile=CISIS_CDA_PROFILE)
        segments = [msh]
        if mdm:
            segments.append(f"EVN||{timestamp}")
        segments.append(_pid(report.patient))
        segments.append(f"PV1|1|{e(report.encounter_class or 'O')}")
        placer, filler = _ei(report.placer_order_number), _ei(report.filler_order_number)
        segments.append(f"ORC|{ORC[doc.action]}|{placer}|{filler}")
        obr = ["OBR", "1", placer, filler, "18748-4^CR d'imagerie médicale^LN", "", "", e(report.exam_time)]
        obr += [""] * 10 + [e(report.accession_number.value)]
        segments.append("|".join(obr))
        if mdm:
            replaced = doc.replaces if doc.action == "replace" else (doc.id if doc.action == "delete" else "")
            current = doc.id if doc.action != "delete" else ""
            segments.append(
                f"TXA|1|18748-4|TEXT|{e(doc.created[:14])}||||||||{e(current or doc.id)}|{e(replaced)}||||AU"
            )
        kind = "text" if mdm else "TEXT"
        status = OBX_STATUS[doc.action]
        segments.append(f"OBX|1|ED|18748-4^CR d'imagerie médicale^LN||^{kind}^XML^Base64^{doc.content}||||||{status}")
        for n, flag in enumerate(report.sharing, start=2):
            display = e(SHARING.get(flag.code, ""))
            if flag.value in ("Y", "N"):
                value = f"{flag.value}^^expandedYes-NoIndicator"
                segments.append(f"OBX|{n}|CWE|{e(flag.code)}^{display}^MetaDMPMSS||{value}||||||F")
            else:  # a mail body: ED base64 as received
                value = e(flag.value)
                segments.append(f"OBX|{n}|ED|{e(flag.code)}^{display}^MetaDMPMSS||^text^^Base64^{value}||||||F")
        return "\r".join(segments) + "\r"


def _pid(patient: Patient) -> str:
    """PID per PAM-FR: INS (CX-5 INS) and local ids, birth name (type L), birth date, sex, birthplace (BDL)."""
    e = hl7.escape
    ids = []
    for ident in patient.ids:
        if not ident.value:
            continue
        kind = "INS" if ident is patient.ins else (ident.type or "PI")
        authority = e(ident.issuer) + (f"&{e(ident.issuer_oid)}&ISO" if ident.issuer_oid else "")
        ids.append(f"{e(ident.value)}^^^{authority}^{e(kind)}")
    name = patient.name
    family = patient.birth_name or name.family
    given = e(name.given)
    names = f"{e(family)}^{given}^{e(name.middle)}^^^^L"
    if name.family and name.family != family:
        names += f"~{e(name.family)}^{given}^^^^^D"
    birthplace = f"^^^^^^BDL^^{e(patient.birth_place_code)}" if patient.birth_place_code else ""
    return f"PID|||{'~'.join(ids)}||{names}||{e(patient.birth_date)}|{e(patient.sex)}|||{birthplace}"


def _ei(ident: Identifier) -> str:
    if not ident.value:
        return ""
    return hl7.escape(ident.value) + (f"^{hl7.escape(ident.issuer)}" if ident.issuer else "")
