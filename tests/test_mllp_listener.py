"""The MLLP listener with the orders channel behind it: framing, batches, limits, charsets, corpus oddities, and
peers that misbehave (unframed bytes, too many connections or bytes, slow senders, peers that do not read)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_flow import ack_code, engine_config, fixture, mllp_port
from traboule.adapters.mllp import (
    END,
    EVICTION_LOG_BURST,
    MAX_UNFRAMED,
    MAX_UNFRAMED_RUNS,
    START,
    MLLPClient,
    MLLPListener,
)
from traboule.app.runtime import Runtime
from traboule.formats import hl7


@contextlib.asynccontextmanager
async def engine_with(tmp_path: Path, **source: Any) -> AsyncIterator[Runtime]:
    """An engine whose orders listener has these source settings."""
    cfg = engine_config(tmp_path)
    cfg.channels[0]["source"].update(source)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with engine_with(tmp_path, max_message_size=64 * 1024, idle_timeout=0.5) as runtime:
        yield runtime


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


async def test_garbage_before_a_start_block_is_journaled_and_the_message_served(engine: Runtime) -> None:
    reply = await raw_exchange(mllp_port(engine), b"\r\nnoise" + START + fixture("orm_o01_nw_latin1.hl7") + END)
    assert ack_code(hl7.parse(reply.split(START)[1][:-2].decode("latin-1"))) == "AA"  # the only answer
    assert engine.journal is not None
    (entry,) = engine.journal.recent(5, "rejected")
    assert entry.raw == b"noise"
    assert "outside any MLLP frame" in entry.error


async def test_end_block_without_start_block_is_answered_ar_and_journaled(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        writer.write(fixture("orm_o01_nw_latin1.hl7") + END)  # the sender forgot the start block
        reply = await asyncio.wait_for(reader.readuntil(END), 5)
        ack = hl7.parse(reply[1:-2].decode("latin-1"))
        assert ack_code(ack) == "AR"
        assert ack.segment("MSA").field(2) == "MSG0001"  # type: ignore[union-attr]
        writer.write(START + fixture("omi_o23_nw_utf8.hl7") + END)  # the connection still serves
        reply = await asyncio.wait_for(reader.readuntil(END), 5)
        assert ack_code(hl7.parse(hl7.decode(reply[1:-2]).text)) == "AA"
    finally:
        writer.close()
    assert engine.journal is not None
    (entry,) = engine.journal.recent(5, "rejected")
    assert entry.raw == fixture("orm_o01_nw_latin1.hl7")  # replayable as it came: `journal replay` frames it
    assert entry.control_id == "MSG0001" and entry.ack_code == "AR"
    assert "without a start block" in entry.error


async def test_endless_tiny_unframed_blocks_are_answered_then_the_connection_closed(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    answers = 0
    try:
        for _ in range(100):
            writer.write(b"x" + END)
            reply = await asyncio.wait_for(reader.readuntil(END), 5)
            assert b"MSA|AR" in reply
            answers += 1
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # closed
    finally:
        writer.close()
    assert answers == MAX_UNFRAMED_RUNS
    assert engine.journal is not None
    assert engine.journal.counts() == {"rejected": MAX_UNFRAMED_RUNS}


async def test_a_flood_of_unframed_bytes_is_answered_journaled_and_closed(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                writer.write(b"garbage " * 2048)  # 16 kB, never a start or end block
                await writer.drain()
        reply = await asyncio.wait_for(reader.readuntil(END), 5)
        assert b"MSA|AR" in reply
        assert await asyncio.wait_for(reader.read(100), 5) == b""
    finally:
        writer.close()
    assert engine.journal is not None
    (entry,) = engine.journal.recent(5)
    assert entry.status == "rejected" and entry.raw.startswith(b"garbage") and len(entry.raw) <= 2 * MAX_UNFRAMED


async def served(port: int, message: bytes, *, source: tuple[str, int] | None = None) -> str:
    """The ACK code of ``message`` sent on a new connection (from ``source``), or "closed" if closed unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=source)
    try:
        writer.write(START + message + END)
        reply = await asyncio.wait_for(reader.readuntil(END), 5)
        return ack_code(hl7.parse(reply[1:-2].decode("latin-1")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    finally:
        writer.close()


async def closed_at_once(port: int, source: tuple[str, int] | None = None) -> bool:
    """Whether a new connection (from ``source``) is closed by the listener without a word."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=source)
    try:
        return await asyncio.wait_for(reader.read(100), 2) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def test_connections_beyond_the_caps_are_closed_at_once_and_the_others_served(tmp_path: Path) -> None:
    order = fixture("orm_o01_nw_latin1.hl7")
    async with engine_with(tmp_path, max_connections=3, max_connections_per_peer=2) as engine:
        port = mllp_port(engine)
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        assert await closed_at_once(port)  # a third from the same address
        clients.append(await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)))
        # A fourth in all, from an address holding one: no connection idle for evict_idle_after (2 s), and no
        # peer holding more than it would (a newcomer from a third address would evict one of 127.0.0.1's)
        assert await closed_at_once(port, ("127.0.0.2", 0))
        for reader, writer in clients:  # those admitted are served, before and after the refusals
            writer.write(START + order + END)
            assert b"MSA|AA" in await asyncio.wait_for(reader.readuntil(END), 5)
        clients.pop()[1].close()
        deadline = time.monotonic() + 5
        while (code := await served(port, order, source=("127.0.0.3", 0))) == "closed" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the listener notices the close
        assert code == "AA"
        for _, writer in clients:
            writer.close()


def rss() -> int:
    """Resident memory of this process (the engine runs in it), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_bytes_buffered_across_connections_are_capped(tmp_path: Path) -> None:
    """24 peers each send 1 MiB of a frame that never ends: the listener holds at most max_buffered_bytes, refuses
    (AR, journaled) the connections beyond it, and still serves a normal message."""
    cap = 4 * 1024 * 1024
    partial = START + fixture("orm_o01_nw_latin1.hl7") + b"NTE|1||" + b"x" * (1024 * 1024)  # no end block
    loop = asyncio.get_running_loop()
    async with engine_with(tmp_path, max_message_size=8 * 1024 * 1024, max_buffered_bytes=cap) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        baseline, peak_rss, peak_held = rss(), 0, 0

        async def sample() -> None:
            nonlocal peak_rss, peak_held
            while True:
                peak_rss, peak_held = max(peak_rss, rss()), max(peak_held, listener.buffered)
                await asyncio.sleep(0.005)

        async def flood(n: int) -> socket.socket:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.0.{2 + n % 3}", 0))  # 8 from each of three addresses: under max_connections_per_peer
            await loop.sock_connect(sock, ("127.0.0.1", mllp_port(engine)))
            with contextlib.suppress(ConnectionError):
                await loop.sock_sendall(sock, partial)  # from the one bytes object: no copy on this side
            return sock

        sampler = asyncio.create_task(sample())
        socks = await asyncio.gather(*(flood(n) for n in range(24)))
        await asyncio.sleep(0.3)
        assert await served(mllp_port(engine), fixture("omi_o23_nw_utf8.hl7")) == "AA"
        sampler.cancel()
        assert peak_held <= cap
        assert peak_rss - baseline < 16 * 1024 * 1024  # 24 MiB were sent
        assert engine.journal is not None
        refused = [e for e in engine.journal.recent(50, "rejected") if "too many unfinished" in e.error]
        assert refused and all(e.control_id == "MSG0001" and e.ack_code == "AR" for e in refused)
        for sock in socks:
            sock.close()


async def test_frame_trickled_byte_by_byte_is_refused_after_frame_timeout(tmp_path: Path) -> None:
    async with engine_with(tmp_path, frame_timeout=0.5, idle_timeout=30) as engine:
        reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in START + fixture("orm_o01_nw_latin1.hl7") * 10:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            reply = await asyncio.wait_for(reader.readuntil(END), 3)
            assert await asyncio.wait_for(reader.read(100), 3) == b""  # then closed
        finally:
            sender.cancel()
            writer.close()
        assert time.monotonic() - started < 2
        assert ack_code(hl7.parse(reply[1:-2].decode("latin-1"))) == "AR"
        assert engine.journal is not None
        (entry,) = engine.journal.recent(5, "rejected")
        assert "not complete within 0.5 s" in entry.error


async def test_peer_that_does_not_read_its_acks_is_cut_off_and_others_served() -> None:
    big_reply = b"MSA|AA|X\r" + b"N" * 256 * 1024

    async def handler(data: bytes, peer: str) -> bytes:
        return big_reply

    listener = MLLPListener(handler, port=0, write_timeout=0.5, name="test")
    await listener.start()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", listener.port))
        stuck = asyncio.create_task(loop.sock_sendall(sock, frame_many(40)))
        await asyncio.sleep(0.2)
        async with MLLPClient("127.0.0.1", listener.port, timeout=2) as other:
            for _ in range(5):
                started = time.monotonic()
                assert (await other.send(b"MSH|^~\\&|x")).startswith(b"MSA|AA")
                assert time.monotonic() - started < 0.5
        await asyncio.sleep(1.0)  # past write_timeout: the listener gave up on it
        received, deadline = 0, time.monotonic() + 5
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), deadline - time.monotonic()):
                received += len(chunk)
        assert received < 40 * len(big_reply)  # cut off, not all answered
        stuck.cancel()
        with contextlib.suppress(BaseException):
            await stuck
    finally:
        sock.close()
        await listener.stop()


def frame_many(n: int) -> bytes:
    return b"".join(START + b"MSH|^~\\&|x|" + str(i).encode() + END for i in range(n))


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


# -- a full listener makes room: idle connections are evicted, busy ones never ----------------------------------

ORDER = fixture("orm_o01_nw_latin1.hl7")  # MSH-10 MSG0001
OTHER = fixture("omi_o23_nw_utf8.hl7")  # MSH-10 MSG0010


async def opened(listener: MLLPListener, count: int, *hosts: str) -> list[tuple[asyncio.StreamReader, Any]]:
    """``count`` connections from each of ``hosts`` (loopback is all of 127/8), once the listener holds them (each
    admitted, another closed to make room or not)."""
    admitted = listener.connections + listener.evictions
    conns = [
        await asyncio.open_connection("127.0.0.1", listener.port, local_addr=(host, 0))
        for host in hosts
        for _ in range(count)
    ]
    deadline = time.monotonic() + 5
    while listener.connections + listener.evictions < admitted + len(conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert listener.connections + listener.evictions == admitted + len(conns)
    return conns


async def is_closed(reader: asyncio.StreamReader, wait: float = 2.0) -> bool:
    """Whether the listener closed this connection (EOF or reset) within ``wait`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(100), wait) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_idle_connections_filling_the_listener_do_not_lock_out_a_new_peer(tmp_path: Path) -> None:
    """The attack: two addresses fill the listener with idle connections (each under its per-peer cap); a RIS from a
    third address still gets its order answered AA: the connection idle the longest is closed to make room. (The
    former defaults, 64 and 32 per peer: two addresses fill it.)"""
    limits = {"max_connections": 64, "max_connections_per_peer": 32, "evict_idle_after": 0.2}
    async with engine_with(tmp_path, **limits) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        idle = await opened(listener, 32, "127.0.0.2", "127.0.0.3")
        await asyncio.sleep(0.3)  # past evict_idle_after
        with structlog.testing.capture_logs() as logs:
            assert await served(listener.port, ORDER, source=("127.0.0.4", 0)) == "AA"
        evicted = [e for e in logs if e["event"] == "connection.evicted"]
        assert len(evicted) == 1 and evicted[0]["peer"].startswith("127.0.0.2:")  # the first opened: idle longest
        assert evicted[0]["idle"] >= 0.2 and evicted[0]["limit"] == "max_connections"
        assert await asyncio.gather(*(is_closed(reader, 0.3) for reader, _ in idle)) == [True] + [False] * 63
        for _, writer in idle:
            writer.close()


async def test_busy_connections_are_never_evicted(tmp_path: Path) -> None:
    """Connections with a frame in progress stay: a new peer is refused while all are busy; with one idle among
    them, that one makes room and every busy one still gets its answer."""
    async with engine_with(tmp_path, max_connections=4, max_connections_per_peer=2, evict_idle_after=0.1) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        busy = await opened(listener, 2, "127.0.0.2", "127.0.0.3")
        for _, writer in busy:
            writer.write(START + ORDER[:100])  # a frame begun, not finished
        await asyncio.sleep(0.3)
        assert await closed_at_once(listener.port, ("127.0.0.4", 0))
        busy.pop()[1].close()  # one leaves (its partial frame is journaled)
        while listener.connections > 3:
            await asyncio.sleep(0.01)
        (idle_reader, idle_writer), *_ = await opened(listener, 1, "127.0.0.3")
        await asyncio.sleep(0.3)
        assert await served(listener.port, OTHER, source=("127.0.0.4", 0)) == "AA"  # the idle one made room
        assert await is_closed(idle_reader)
        for reader, writer in busy:  # the busy ones finish their frames and are answered
            writer.write(ORDER[100:] + END)
            assert b"MSA|AA" in await asyncio.wait_for(reader.readuntil(END), 5)
            writer.close()
        idle_writer.close()


async def test_a_peer_holding_more_connections_loses_one_even_within_the_grace(tmp_path: Path) -> None:
    """Fair share: a newcomer may close at once an idle connection of a peer holding more connections than its own
    would; among peers holding no more, only connections idle for evict_idle_after. So an attacker reopening its
    connections as fast as it likes evicts its own, not the RIS's fresh one."""
    async with engine_with(tmp_path, max_connections=4, max_connections_per_peer=4, evict_idle_after=30) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        hog = await opened(listener, 4, "127.0.0.2")  # fresh: well within the 30 s grace
        (ris_reader, ris_writer), *_ = await opened(listener, 1, "127.0.0.4")  # one of the hog's made room
        assert await closed_at_once(listener.port, ("127.0.0.2", 0))  # the hog (3) may not take it back from the RIS
        others = await opened(listener, 1, "127.0.0.5", "127.0.0.6")  # each evicts the hog's: 3 > 0 + 1, 2 > 0 + 1
        assert [await is_closed(reader, 0.2) for reader, _ in hog] == [True, True, True, False]
        assert await closed_at_once(listener.port, ("127.0.0.7", 0))  # one each now: the grace protects them all
        ris_writer.write(START + ORDER + END)
        assert b"MSA|AA" in await asyncio.wait_for(ris_reader.readuntil(END), 5)
        for _, writer in [*hog, *others, (ris_reader, ris_writer)]:
            writer.close()


async def test_a_peer_at_its_cap_makes_room_by_closing_its_own_idle_connection(tmp_path: Path) -> None:
    async with engine_with(tmp_path, max_connections=8, max_connections_per_peer=2, evict_idle_after=0.1) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        own = await opened(listener, 2, "127.0.0.2")
        await asyncio.sleep(0.2)
        assert await served(listener.port, ORDER, source=("127.0.0.2", 0)) == "AA"
        assert [await is_closed(reader, 0.2) for reader, _ in own] == [True, False]
        for _, writer in own:
            writer.close()


async def test_evictions_are_logged_at_a_bounded_rate(tmp_path: Path) -> None:
    async with engine_with(tmp_path, max_connections=2, max_connections_per_peer=2, evict_idle_after=0.01) as engine:
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        conns = await opened(listener, 2, "127.0.0.2")
        with structlog.testing.capture_logs() as logs:
            for n in range(40):
                await asyncio.sleep(0.02)
                conns += await opened(listener, 1, f"127.0.0.{3 + n % 2}")
        assert listener.evictions == 40
        lines = [e for e in logs if e["event"] == "connection.evicted"]
        assert 1 <= len(lines) <= EVICTION_LOG_BURST
        for _, writer in conns:
            writer.close()


def test_eviction_grace_is_a_source_setting() -> None:
    async def handler(data: bytes, peer: str) -> bytes:
        return b""

    listener = MLLPListener.from_config("c", {"evict_idle_after": "0.5"}, handler)
    assert listener.evict_idle_after == 0.5
    assert MLLPListener.from_config("c", {}, handler).max_connections_per_peer * 2 < listener.max_connections
    with pytest.raises(ValueError, match="evict_idle_after"):
        MLLPListener.from_config("c", {"evict_idle_after": 0}, handler)


# -- framing: a start block inside a frame, a frame left unfinished, an end block without its 0x0D --------------


def msa(reply: bytes) -> tuple[str, str, str]:
    """MSA-1, MSA-2, MSA-3 of a framed ACK."""
    segment = hl7.parse(hl7.decode(reply[reply.index(START) + 1 : -2]).text).segment("MSA")
    assert segment is not None
    return segment.field(1), segment.field(2), segment.field(3)


async def test_a_start_block_inside_a_frame_starts_a_new_frame(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        writer.write(START + ORDER[:120] + START + OTHER + END)  # a frame cut short, then a whole one
        assert msa(await asyncio.wait_for(reader.readuntil(END), 5))[:2] == ("AA", "MSG0010")  # the only answer
        writer.write(START + START + ORDER + END)  # a doubled start block
        assert msa(await asyncio.wait_for(reader.readuntil(END), 5))[:2] == ("AA", "MSG0001")
    finally:
        writer.close()
    assert engine.journal is not None
    (entry,) = engine.journal.recent(5, "rejected")  # the cut frame, not answered
    assert entry.raw == ORDER[:120] and entry.ack_code == ""
    assert "cut short by a start block" in entry.error


async def test_a_frame_left_unfinished_at_the_close_is_journaled(engine: Runtime) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    writer.write(START + ORDER[:150])
    await writer.drain()
    writer.close()
    assert engine.journal is not None
    deadline = time.monotonic() + 5
    while not engine.journal.recent(5, "rejected") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    (entry,) = engine.journal.recent(5, "rejected")
    assert entry.raw == ORDER[:150] and entry.ack_code == "" and entry.control_id == "MSG0001"
    assert "closed before its end block" in entry.error


async def test_an_end_block_without_its_carriage_return_is_answered_ar_soon(tmp_path: Path) -> None:
    """0x1C not followed by 0x0D (MLLP frames end with 0x1C 0x0D): a sender waiting for its answer gets AR naming the
    missing byte within seconds, not after frame_timeout; the message is journaled whole."""
    async with engine_with(tmp_path, frame_timeout=60) as engine:
        reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
        started = time.monotonic()
        try:
            writer.write(START + ORDER + b"\x1c")
            code, control_id, text = msa(await asyncio.wait_for(reader.readuntil(END), 5))
            assert await is_closed(reader, 5)  # where the frame ended was a guess: the stream is not trusted further
        finally:
            writer.close()
        assert time.monotonic() - started < 3
        assert (code, control_id) == ("AR", "MSG0001") and "0x0D" in text
        assert engine.journal is not None
        (entry,) = engine.journal.recent(5, "rejected")
        assert entry.raw == ORDER and entry.ack_code == "AR"


async def test_an_end_block_without_its_carriage_return_then_a_start_block(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        writer.write(START + ORDER + b"\x1c" + START + OTHER + END)
        code, control_id, text = msa(await asyncio.wait_for(reader.readuntil(END), 5))
        assert (code, control_id) == ("AR", "MSG0001") and "0x0D" in text
        assert msa(await asyncio.wait_for(reader.readuntil(END), 5))[:2] == ("AA", "MSG0010")
    finally:
        writer.close()


async def test_an_end_block_byte_inside_a_message_is_refused_and_the_connection_kept(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        writer.write(START + ORDER[:200] + b"\x1cX" + ORDER[200:] + END)
        code, control_id, text = msa(await asyncio.wait_for(reader.readuntil(END), 5))
        assert (code, control_id) == ("AR", "MSG0001") and "0x0D" in text  # one frame, one answer
        writer.write(START + OTHER + END)
        assert msa(await asyncio.wait_for(reader.readuntil(END), 5))[:2] == ("AA", "MSG0010")
    finally:
        writer.close()


async def test_an_end_block_split_across_slow_writes_is_still_one(engine: Runtime) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(engine))
    try:
        writer.write(START + ORDER + b"\x1c")
        await asyncio.sleep(0.3)  # Nagle and delayed ACKs can hold the 0x0D this long
        writer.write(b"\x0d")
        assert msa(await asyncio.wait_for(reader.readuntil(END), 5))[:2] == ("AA", "MSG0001")
    finally:
        writer.close()
