"""/health never holds the event loop: its database queries run off the loop (`traboule.app.health.Probe`), one at
a time, awaited at most ``PROBE_DEADLINE_S``, their answer kept ``PROBE_TTL_S``. Shown with a database host that
drops packets (a TCP proxy of the test turned into a black hole) while /health is flooded: /health answers
within its deadline, saying the database is ``unknown``, and the same loop keeps answering /health/live and MLLP
(AR: the journal cannot commit) in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.peer_dcmtk import require_dcmtk, run_findscu
from tests.test_flow import CT_QUERY, ack_code, engine_config, fixture, free_port, mllp_port, mwl_port, send
from traboule.adapters.mllp import MLLPClient
from traboule.app.health import Probe
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.formats import hl7

pytestmark = pytest.mark.timeout(120)


class BlackHole:
    """A TCP proxy to PostgreSQL on loopback that the test turns into a black hole: `silence` stops forwarding
    (the open sessions get no answer, a new connection is accepted and never answered: a host that drops
    packets); `cut` then closes the open sessions too (what TCP keepalives end up doing to them)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.silent = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, dbname: str) -> str:
        # A short connect timeout (the engine's default is 10 s) keeps the test short; what it shows is the same.
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}?connect_timeout=3"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
                if self.silent:
                    continue  # accepted, never answered
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._sockets.append(upstream)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not self.silent:
                    dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def silence(self) -> None:
        self.silent = True

    def cut(self) -> None:
        with self._lock:
            held, self._sockets = self._sockets, []
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()
        self.cut()


async def mllp(port: int, message: bytes) -> bytes:
    """One message sent, its answer (waited for up to 60 s)."""
    async with MLLPClient("127.0.0.1", port, timeout=60) as client:
        return await client.send(message)


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[BlackHole]:
    hole = BlackHole(port)
    try:
        yield hole
    finally:
        hole.close()


async def test_a_probe_runs_one_at_a_time_within_its_deadline_and_its_answer_is_kept() -> None:
    release, runs = threading.Event(), []

    def check() -> int:
        runs.append(time.monotonic())
        release.wait(10)
        return len(runs)

    probe = Probe(check, deadline=0.3, ttl=0.5)
    started = time.monotonic()
    answers = await asyncio.gather(*(probe.get() for _ in range(20)))  # a flood while the check blocks
    assert time.monotonic() - started < 1.0 and all(a.timed_out and a.value is None for a in answers)
    assert (await probe.get()).timed_out and len(runs) == 1  # still the one run: no second one meanwhile
    release.set()
    await asyncio.sleep(0.1)
    assert (await probe.get()).value == 1  # its answer, once it came, serves the next callers
    assert (await probe.get()).value == 1 and len(runs) == 1
    await asyncio.sleep(0.6)
    assert (await probe.get()).value == 2  # older than ttl: asked again

    def failing() -> int:
        raise ConnectionRefusedError

    assert (await Probe(failing).get()).error == "ConnectionRefusedError"


async def test_a_probe_answers_in_time_while_the_default_executor_is_saturated() -> None:
    """The flows' blocking calls (the patient registry waiting for a group commit) may fill the loop's default
    executor under load: the probe runs in a thread of its own, so it answers within its deadline all the same."""
    loop, release = asyncio.get_running_loop(), threading.Event()
    blockers = [loop.run_in_executor(None, release.wait, 10) for _ in range(64)]  # more than the executor's threads
    try:
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(asyncio.to_thread(lambda: "queued"))
        probe = Probe(threading.get_ident, deadline=0.5, ttl=0.2)
        started = time.monotonic()
        answer = await probe.get()
        assert not answer.timed_out and answer.error == "", answer
        assert time.monotonic() - started < 0.5
        assert answer.value != threading.get_ident()  # off the loop's thread
        assert not waiting.done()  # the default executor is still saturated: nothing of it ran
        probe.close()
        await asyncio.sleep(0.3)  # older than the ttl: asked again, but closed
        assert (await probe.get()).error == "ProbeClosed"
    finally:
        release.set()
        await asyncio.gather(*blockers)
    assert await waiting == "queued"


async def test_health_answers_within_its_deadline_and_mllp_goes_on_while_the_database_drops_packets(
    tmp_path: Path, postgres_server: object, pg_url: str
) -> None:
    from tests.peer_postgres import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    require_dcmtk("findscu")
    with black_hole(postgres_server.port) as hole:
        cfg = engine_config(tmp_path, database_url=hole.url(pg_url.rsplit("/", 1)[1]))
        runtime = Runtime(cfg)
        await runtime.start()
        port = free_port()
        server = await serve(create_app(runtime), "127.0.0.1", port)
        try:
            (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
            assert ack_code(ack) == "AA"
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                assert (await client.get("/health")).json()["status"] == "ok"
                hole.silence()  # the open sessions get no answer, a new connection hangs (connect_timeout: 3 s)
                await asyncio.sleep(1.1)  # the last probe's answer is older than its ttl
                started = time.monotonic()
                flood = [asyncio.create_task(client.get("/health")) for _ in range(50)]
                live = []
                for _ in range(10):  # meanwhile the loop answers at once
                    t0 = time.monotonic()
                    assert (await client.get("/health/live")).status_code == 200
                    live.append(time.monotonic() - t0)
                    await asyncio.sleep(0.2)
                answers = await asyncio.gather(*flood)
                took = time.monotonic() - started
                assert max(live) < 1.0, live
                assert took < 5.0
                for answer in answers:
                    body = answer.json()
                    assert answer.status_code == 503 and body["status"] == "degraded"
                    assert "database" in body["problems"] and body["database"]["connected"] == "unknown"
                # What keepalives end up doing to the open sessions: cut. A message is answered AR (the journal
                # cannot commit: a new connection gives up after connect_timeout), a C-FIND gets a failure status,
                # and the loop answers /health meanwhile.
                hole.cut()
                t0 = time.monotonic()
                message = fixture("orm_o01_nw_latin1.hl7").replace(b"MSG0001", b"MSG0002")
                sent = asyncio.create_task(mllp(mllp_port(runtime), message))
                found = asyncio.create_task(
                    asyncio.to_thread(run_findscu, mwl_port(runtime), "TRABOULE", CT_QUERY, extra=["-v"])
                )
                while not (sent.done() and found.done()):
                    t1 = time.monotonic()
                    health = await client.get("/health")
                    assert time.monotonic() - t1 < 3.0 and health.status_code == 503
                    await asyncio.sleep(0.5)
                assert ack_code(hl7.parse(hl7.decode(await sent).text)) == "AR"
                answered = time.monotonic() - t0
                result = await found
                print(f"AR after {answered:.1f} s, C-FIND answered after {result.seconds:.1f} s")
                assert answered < 25.0 and result.seconds < 25.0
                assert result.datasets == [] and "Final Find Response (Failed: UnableToProcess)" in result.output
        finally:
            server.should_exit = True
            await runtime.stop()
