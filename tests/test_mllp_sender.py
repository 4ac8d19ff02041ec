"""The MLLP sender against a real listener: framing and connections here, each answer judged by a callable
(`traboule.formats.hl7.read_ack` by default)."""

from __future__ import annotations

import pytest

from traboule.adapters.mllp import MLLPListener, MLLPSender
from traboule.errors import NotAccepted
from traboule.formats import hl7

MESSAGE = b"MSH|^~\\&|TRABOULE|CHU|RIS|CHU|20261125100000||ORU^R01|MINE|P|2.5\rPID|1\r"


async def test_a_refusal_is_raised_with_the_receivers_reason() -> None:
    async def refuse(data: bytes, peer: str) -> bytes:
        msg = hl7.parse(hl7.decode(data).text)
        error = hl7.AckError("OBX-5 empty", "OBX-5", "101")
        return hl7.build_ack(msg, "AE", control_id="R1", timestamp="20261125100001", error=error).encode()

    listener = MLLPListener(refuse, port=0, name="refuse")
    await listener.start()
    sender = MLLPSender("127.0.0.1", listener.port, timeout=5)
    try:
        with pytest.raises(NotAccepted, match=r"^receiver answered AE OBX-5 empty$"):
            await sender.send(MESSAGE)
    finally:
        await sender.close()
        await listener.stop()


async def test_the_sender_judges_with_the_callable_it_is_given_and_reconnects_when_out_of_step() -> None:
    peers: list[str] = []

    async def answer(data: bytes, peer: str) -> bytes:
        peers.append(peer)
        return b"MSA|" + data.split(b"|")[1]  # not HL7: only the judge below knows how to read it

    judged: list[tuple[bytes, bytes]] = []

    def judge(sent: bytes, reply: bytes) -> hl7.AckReading:
        judged.append((sent, reply))
        code = reply.removeprefix(b"MSA|").decode()
        return hl7.AckReading(code, code == "OK", f"said {code}", out_of_step=code == "LATE")

    listener = MLLPListener(answer, port=0, name="judged")
    await listener.start()
    sender = MLLPSender("127.0.0.1", listener.port, timeout=5, judge=judge)
    try:
        assert await sender.send(b"X|OK") == "OK"
        with pytest.raises(NotAccepted, match="said NO"):
            await sender.send(b"X|NO")
        assert await sender.send(b"X|OK") == "OK"
        assert len(set(peers)) == 1  # a refusal keeps the connection
        with pytest.raises(NotAccepted, match="said LATE"):
            await sender.send(b"X|LATE")
        assert await sender.send(b"X|OK") == "OK"
        assert len(set(peers)) == 2 and peers[-1] != peers[-2]  # out of step: a new connection
        assert judged[0] == (b"X|OK", b"MSA|OK")
    finally:
        await sender.close()
        await listener.stop()
