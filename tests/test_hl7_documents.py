"""The DRIMbox feed: published documents go out as CI-SIS "Transmission de document CDA en HL7v2" messages (ORU^R01
v2.5 or MDM v2.6, CDA in base64, MSH-21 2.1^CISIS_CDA_HL7_V2) to a real MLLP receiver, ACK-checked and retried."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.test_flow import ack_code, engine_config, fixture, send, until
from tests.test_mpps import Ris
from tests.test_reports import report_of, study
from traboule import model
from traboule.adapters.mllp import MLLPListener
from traboule.app.runtime import Runtime
from traboule.model import Envelope
from traboule.translate.hl7_mapping import HL7InboundMapping


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[tuple[Runtime, Ris, Ris]]:
    oru, mdm = Ris(), Ris()
    for receiver in (oru, mdm):
        receiver.listener = MLLPListener(receiver.handle, port=0, name="drimbox")
        await receiver.listener.start()
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    for name, receiver, message in (("drimbox", oru, "ORU^R01"), ("drimbox-mdm", mdm, "MDM")):
        assert receiver.listener is not None
        destination = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": receiver.listener.port, "timeout": 5}
        cfg.channels.append({"name": name, "kind": "hl7-documents", "destination": destination, "message": message})
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime, oru, mdm
    finally:
        await runtime.stop()
        for receiver in (oru, mdm):
            assert receiver.listener is not None
            await receiver.listener.stop()


async def test_documents_reach_the_drimbox_as_oru_and_mdm(feed: tuple[Runtime, Ris, Ris]) -> None:
    runtime, oru, mdm = feed
    oru.script = ["AE"]  # the receiver refuses the first message once: retried, then delivered once
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
    for name in ("oru_r01_report.hl7", "oru_r01_report_corrected.hl7", "oru_r01_report_deleted.hl7"):
        (ack,) = await send(runtime, fixture(name))
        assert ack_code(ack) == "AA"
        await asyncio.sleep(0.05)  # keep the three events apart in time (each is a separate report message)
    await until(lambda: len(oru.accepted()) == 3 and len(mdm.accepted()) == 3, timeout=20)
    await asyncio.sleep(0.3)
    assert [code for code, _ in oru.received] == ["AE", "AA", "AA", "AA"]  # one retry, no duplicate

    first, replaced, deleted = oru.accepted()
    for msg in (first, replaced, deleted):
        assert msg.message_type == "ORU^R01" and msg.msh.field(12) == "2.5"
        assert msg.msh.field(21) == "2.1^CISIS_CDA_HL7_V2"
    obx = [m.segment("OBX") for m in (first, replaced, deleted)]
    assert [o.field(11) for o in obx if o] == ["F", "C", "D"]
    assert [m.segment("ORC").field(1) for m in (first, replaced, deleted)] == ["NW", "RO", "CA"]  # type: ignore[union-attr]
    pid = first.segment("PID")
    assert pid is not None and "279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS" in pid.field(3)
    assert pid.field(11).endswith("BDL^^69381")
    published = publisher.document("1.2.250.1.999.1.2.3.4.1.1")
    cda = base64.b64decode(obx[0].field(5).split("^")[4])  # type: ignore[union-attr]
    assert cda == base64.b64decode(published.content)

    # What traboule sends, traboule (or any TRV2 receiver) reads back: the ready CDA with its accession number.
    (back,) = HL7InboundMapping().map(first)
    assert isinstance(back, model.Report) and back.attachment_type == "text/xml"
    assert back.accession_number.value == "ACC0001" and back.document_id == "1.2.250.1.999.1.2.3.4.1.1"

    events = [m.message_type for m in mdm.accepted()]
    assert events == ["MDM^T02", "MDM^T10", "MDM^T04"]
    txa = [m.segment("TXA") for m in mdm.accepted()]
    assert [(t.field(12), t.field(13)) for t in txa if t] == [
        ("1.2.250.1.999.1.2.3.4.1.1", ""),
        ("1.2.250.1.999.1.2.3.4.1.2", "1.2.250.1.999.1.2.3.4.1.1"),
        ("1.2.250.1.999.1.2.3.4.1.2", "1.2.250.1.999.1.2.3.4.1.2"),
    ]
    assert all(m.msh.field(12) == "2.6" for m in mdm.accepted())


async def test_sharing_instructions_are_forwarded(feed: tuple[Runtime, Ris, Ris]) -> None:
    runtime, oru, _ = feed
    text = fixture("oru_r01_pdf.hl7").decode()
    text += "\rOBX|2|CWE|MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||Y^^expandedYes-NoIndicator||||||F"
    assert ack_code((await send(runtime, text.encode()))[0]) == "AA"
    await until(lambda: len(oru.accepted()) == 1)
    (msg,) = oru.accepted()
    flags = [s for s in msg.segments if s.name == "OBX" and s.field(3).endswith("^MetaDMPMSS")]
    assert [(f.field(3).split("^")[0], f.field(5)) for f in flags] == [("MASQUE_PS", "Y^^expandedYes-NoIndicator")]


async def test_a_later_version_waits_for_an_original_the_receiver_has_not_taken(
    tmp_path: Path,
) -> None:
    """The receiver refuses the original long enough for it to go back to the bus: its replacement, next in the
    queue, must not overtake it."""
    receiver = Ris(script=["AE"] * 3)
    receiver.listener = MLLPListener(receiver.handle, port=0, name="drimbox")
    await receiver.listener.start()
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    destination = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": receiver.listener.port, "timeout": 5}
    cfg.channels.append({"name": "drimbox", "kind": "hl7-documents", "destination": destination, "retry_window": 0.6})
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        env = Envelope(study())
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
        acks = await send(runtime, fixture("oru_r01_report.hl7"), fixture("oru_r01_report_corrected.hl7"))
        assert [ack_code(a) for a in acks] == ["AA", "AA"]
        await until(lambda: len(receiver.accepted()) == 2, timeout=20)
        first, second = receiver.accepted()
        assert [m.segment("ORC").field(1) for m in (first, second)] == ["NW", "RO"]  # type: ignore[union-attr]
    finally:
        await runtime.stop()
        await receiver.listener.stop()


async def test_an_ack_for_another_message_is_not_taken_as_this_one() -> None:
    from traboule.adapters.mllp import MLLPSender, NotAccepted
    from traboule.formats import hl7

    async def stale(data: bytes, peer: str) -> bytes:  # answers as if to an earlier message
        msg = hl7.parse(hl7.decode(data).text)
        return (
            hl7.build_ack(msg, "AA", control_id="X1", timestamp="20261125100000")
            .encode()
            .replace(f"MSA|AA|{msg.control_id}".encode(), b"MSA|AA|EARLIER")
        )

    listener = MLLPListener(stale, port=0, name="stale")
    await listener.start()
    sender = MLLPSender("127.0.0.1", listener.port, timeout=5)
    try:
        with pytest.raises(NotAccepted, match="EARLIER"):
            await sender.send(b"MSH|^~\\&|A|B|C|D|20261125||ORU^R01|MINE|P|2.5\rPID|1\r")
    finally:
        await sender.close()
        await listener.stop()
