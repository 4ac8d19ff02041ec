"""The MLLP listener with the orders channel behind it: framing, batches, limits, charsets, corpus oddities."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.mllp import END, START, MLLPClient
from tests.test_flow import ack_code, engine_config, fixture, mllp_port
from traboule import hl7
from traboule.runtime import Runtime


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Runtime]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["source"].update(max_message_size=64 * 1024, idle_timeout=0.5)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.readuntil(END), read_timeout)
    finally:
        writer.close()


async def test_batch_gets_a_batch_of_acks(engine: Runtime) -> None:
    one = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
    batch = "FHS|^~\\&|RIS\rBHS|^~\\&|RIS\r" + one + one.replace("MSG0001", "MSG0009").replace("PLC0001", "PLC9")
    batch += "BTS|2\rFTS|1\r"
    async with MLLPClient("127.0.0.1", mllp_port(engine)) as client:
        reply = (await client.send(batch.encode("latin-1"))).decode("latin-1")
    lines = [line for line in reply.split("\r") if line]
    assert lines[0].startswith("BHS|")
    assert lines[-1] == "BTS|2"
    assert [line for line in lines if line.startswith("MSA")] == ["MSA|AA|MSG0001", "MSA|AA|MSG0009"]


async def test_oversize_message_is_refused_and_journaled(engine: Runtime) -> None:
    big = fixture("orm_o01_nw_latin1.hl7") + b"NTE|1||" + b"x" * 100_000 + b"\r"
    reply = await raw_exchange(mllp_port(engine), START + big + END)
    ack = hl7.parse(reply[1:-2].decode("latin-1"))
    assert ack_code(ack) == "AR"
    assert ack.segment("MSA").field(2) == "MSG0001"  # type: ignore[union-attr]
    assert engine.journal is not None
    (entry,) = engine.journal.recent(5, "rejected")
    assert "larger than" in entry.error


async def test_idle_connection_is_closed(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    data = await asyncio.wait_for(reader.read(100), 5)  # returns b"" once the listener closes the socket
    assert data == b""
    writer.close()


async def test_garbage_between_frames_is_skipped(engine: Runtime) -> None:
    reply = await raw_exchange(mllp_port(engine), b"\r\nnoise" + START + fixture("orm_o01_nw_latin1.hl7") + END)
    assert ack_code(hl7.parse(reply.split(START)[1][:-2].decode("latin-1"))) == "AA"


async def test_ack_is_in_the_senders_charset(engine: Runtime) -> None:
    async with MLLPClient("127.0.0.1", mllp_port(engine)) as client:
        latin = await client.send(fixture("orm_o01_nw_latin1.hl7"))
        utf8 = await client.send(fixture("omi_o23_nw_utf8.hl7"))
    assert latin.decode("latin-1").split("\r")[0].endswith("|8859/1")
    assert utf8.decode("utf-8").split("\r")[0].endswith("|UNICODE UTF-8")


async def test_corpus_quirks_bom_lf_empty_control_id(engine: Runtime) -> None:
    text = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
    bom_lf = b"\xef\xbb\xbf" + text.replace("\r", "\n").replace("Hélène", "Hélène").encode("utf-8")
    no_id = text.replace("|MSG0001|", "||").replace("PLC0001", "PLC0077").encode("latin-1")
    async with MLLPClient("127.0.0.1", mllp_port(engine)) as client:
        first = hl7.parse(hl7.decode(await client.send(bom_lf)).text)
        second = hl7.parse(hl7.decode(await client.send(no_id)).text)
    assert ack_code(first) == "AA"
    assert ack_code(second) == "AA"
    assert second.segment("MSA").field(2) == ""  # type: ignore[union-attr]
    assert engine.journal is not None
    warnings = [e.warnings for e in engine.journal.recent(5)]
    assert any("byte order mark" in w for w in warnings)
    assert any("bytes are UTF-8" in w for w in warnings)


async def test_unicode_declared_but_latin1_bytes_is_refused(engine: Runtime) -> None:
    text = fixture("omi_o23_nw_utf8.hl7").decode("utf-8").replace("ŁUKASIEWICZ^Zoë", "MULLER^Zoë")
    async with MLLPClient("127.0.0.1", mllp_port(engine)) as client:
        reply = await client.send(text.encode("latin-1"))
    ack = hl7.parse(reply.decode("latin-1"))
    assert ack_code(ack) == "AR"
    assert ack.segment("ERR").field(2) == "MSH^1^18"  # type: ignore[union-attr]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
async def test_fuzzed_orders_always_get_an_ack(engine: Runtime, data: st.DataObject) -> None:
    """Mutated orders (fields cut, bytes flipped, separators injected) are answered, never crash the channel."""
    base = bytearray(fixture("orm_o01_nw_latin1.hl7"))
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, len(base) - 1))
        if op == "flip":
            base[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del base[pos : pos + data.draw(st.integers(1, 40))]
        else:
            base[pos:pos] = data.draw(st.sampled_from([b"|", b"^", b"~", b"\\", b"&", b"\r", b"\x0b", b"\xc3"]))
        if not base:
            base = bytearray(b"X")
    channel = engine.channel("ris-orders")
    assert engine.journal is not None
    before = sum(engine.journal.counts().values())
    reply = await channel.handle(bytes(base).replace(b"\x1c\r", b""), "fuzz")  # type: ignore[attr-defined]
    ack = hl7.parse(reply.decode("latin-1"))  # answered with the sender's own delimiters, whatever they were
    assert ack.message_type.startswith("ACK")
    code = ack_code(ack)
    assert code in ("AA", "AE", "AR")
    (entry,) = engine.journal.recent(1)
    assert entry.id == before + 1  # every message is journaled, whatever its fate
    assert (entry.status in ("accepted", "duplicate")) == (code == "AA")


async def test_journal_failure_is_answered_ar(engine: Runtime) -> None:
    """Nothing stored, nothing acknowledged: AR, so that the RIS sends the message again."""
    assert engine.journal is not None
    engine.journal._db.close()  # the disk is gone
    async with MLLPClient("127.0.0.1", mllp_port(engine)) as client:
        reply = await client.send(fixture("orm_o01_nw_latin1.hl7"))
    ack = hl7.parse(reply.decode("latin-1"))
    assert ack_code(ack) == "AR"
    assert "not stored" in ack.segment("MSA").field(3)  # type: ignore[union-attr]
