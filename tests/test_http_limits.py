"""What a client can make the HTTP server hold, and what an error shows: request bodies (413 up front or while
streaming, 408 when too slow), request headers (size, deadline), connections, idle keep-alive, and the 500 answer
of an exception in a route. Against the engine served by uvicorn on 127.0.0.1, with raw sockets: what is checked
is what a client library would not send."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.test_flow import engine_config, free_port
from traboule.app import config as config_mod
from traboule.app.config import HTTPLimits
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime

WEBHOOK = "/archive/stable"


@contextlib.asynccontextmanager
async def served(tmp_path: Path, **limits: Any) -> AsyncIterator[tuple[Runtime, int]]:
    """The engine with the FHIR API and the archive webhook, its HTTP app bounded by ``limits``."""
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    dicomweb = f"http://127.0.0.1:{free_port()}/dicom-web"  # never read: nothing here passes the webhook
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": dicomweb, "max_attempts": 1})
    cfg.http_limits = HTTPLimits(**limits)
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        yield runtime, port
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return Answer(int(status_line.split()[1]), headers, body)


async def exchange(port: int, raw: bytes) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """How long until the server closed the connection (it must within ``seconds``)."""
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), seconds) == b""
    return time.monotonic() - started


# -- request bodies -------------------------------------------------------------------------------------------


async def test_a_body_declared_larger_than_the_webhook_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    async with served(tmp_path) as (runtime, port):
        # 200 MB announced, none sent: the answer cannot have waited for the body.
        answer = await exchange(port, head("POST", WEBHOOK, "Content-Length: 209715200"))
        assert answer.status == 413 and answer.headers["connection"] == "close"
        assert answer.json() == {"error": "request body larger than 65536 bytes"}
        assert runtime.journal.recent(5) == []


async def test_a_chunked_body_is_refused_once_past_the_limit_not_at_its_end(tmp_path: Path) -> None:
    chunk = b"x" * 16384
    async with served(tmp_path) as (runtime, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = b'{"StudyInstanceUID":"1.2","x":"'
        writer.write(head("POST", WEBHOOK, "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (len(start), start))
        sent = 0
        answer: Answer | None = None
        while sent < 200 * 1024 * 1024 and answer is None:  # what was journaled whole before
            with contextlib.suppress(ConnectionError):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
            with contextlib.suppress(TimeoutError):
                answer = await read_answer(reader, timeout=0.01)
        writer.close()
        assert answer is not None and answer.status == 413, answer
        assert sent < 256 * 1024  # the limit (64 KiB) and what was in flight, not 200 MB
        assert runtime.journal.recent(5) == []


async def test_other_routes_have_the_default_limit_with_their_own_error_format(tmp_path: Path) -> None:
    async with served(tmp_path, max_body_bytes=1000) as (_, port):
        with structlog.testing.capture_logs() as logs:
            fhir = await exchange(port, head("GET", "/fhir/Patient/IPP-279035121518989", "Content-Length: 1001"))
            other = await exchange(port, head("GET", "/channels", "Content-Length: 5000"))
        assert fhir.status == 413 and fhir.headers["content-type"] == "application/fhir+json"
        assert fhir.json()["issue"][0]["code"] == "too-long"
        assert other.status == 413 and other.json() == {"error": "request body larger than 1000 bytes"}
        # the log names the route, not the path the client sent (an identifier here)
        assert [(e["event"], e["route"], e["status"]) for e in logs] == [
            ("http.request_refused", "/fhir/{type}/{id}", 413),
            ("http.request_refused", "/channels", 413),
        ]
        # the webhook keeps its own limit, above the default
        notice = json.dumps({"StudyInstanceUID": "1.2.3", "pad": "x" * 2000}).encode()
        ok = await exchange(port, head("POST", WEBHOOK, f"Content-Length: {len(notice)}") + notice)
        assert ok.status == 202


async def test_limits_per_route_from_the_configuration_replace_the_routes_own(tmp_path: Path) -> None:
    async with served(tmp_path, body_limits={WEBHOOK: 100}) as (_, port):
        notice = json.dumps({"StudyInstanceUID": "1.2.3", "pad": "x" * 100}).encode()
        answer = await exchange(port, head("POST", WEBHOOK, f"Content-Length: {len(notice)}") + notice)
        assert answer.status == 413


async def test_a_body_not_received_in_time_gets_408(tmp_path: Path) -> None:
    async with served(tmp_path, body_timeout=0.5) as (runtime, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("POST", WEBHOOK, "Content-Length: 100") + b'{"StudyInstanceUID"')
        started = time.monotonic()
        answer = await read_answer(reader)
        writer.close()
        assert answer.status == 408 and answer.headers["connection"] == "close"
        assert 0.4 < time.monotonic() - started < 3
        assert runtime.journal.recent(5) == []


# -- headers, connections --------------------------------------------------------------------------------------


async def test_request_targets_and_headers_beyond_max_header_bytes_are_refused(tmp_path: Path) -> None:
    async with served(tmp_path, max_header_bytes=4096) as (_, port):
        assert (await exchange(port, head("GET", "/health", "X-Pad: " + "x" * 3000))).status == 200
        assert (await exchange(port, head("GET", "/health", "X-Pad: " + "x" * 5000))).status == 431
        assert (await exchange(port, head("GET", "/fhir/Patient?identifier=" + "x" * 5000))).status == 414
        # In pieces, h11 itself refuses to buffer more of an unfinished head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"x" * 5000)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"\r\n\r\n")
        assert (await read_answer(reader)).status == 400
        writer.close()


async def test_a_request_whose_headers_never_complete_is_closed(tmp_path: Path) -> None:
    async with served(tmp_path, header_timeout=0.5) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a byte at a time would do the same
        assert 0.4 < await closed_within(reader, 3) < 3
        writer.close()


async def test_idle_sockets_do_not_hold_the_connection_slots_for_ever(tmp_path: Path) -> None:
    async with served(tmp_path, max_connections=4, header_timeout=0.5) as (_, port):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await asyncio.sleep(0.1)
        assert (await exchange(port, head("GET", "/health", "Connection: close"))).status == 503
        await asyncio.sleep(1.0)  # the idle ones are closed by their header deadline
        assert (await exchange(port, head("GET", "/health", "Connection: close"))).status == 200
        for _, writer in idle:
            writer.close()


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with served(tmp_path, keep_alive_timeout=1) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("GET", "/health"))
        assert (await read_answer(reader)).status == 200
        assert 0.8 < await closed_within(reader, 4) < 4
        writer.close()


def test_limits_from_the_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text(
        "[http]\nmax_body_bytes = 2048\nbody_timeout = 5\nheader_timeout = 2.5\nmax_connections = 20\n"
        'keep_alive_timeout = 3\nmax_header_bytes = 8192\nbody_limits = {"/archive/stable" = 512}\n'
    )
    limits = config_mod.load(str(path), env={}).http_limits
    assert limits == HTTPLimits(2048, {"/archive/stable": 512}, 2.5, 5.0, 20, 3, 8192)
    assert config_mod.load(env={}).http_limits == HTTPLimits()
    for bad, reason in (
        ("max_body_bytes = 0", "max_body_bytes must be a positive int"),
        ("max_connections = 2.5", "max_connections must be a positive int"),
        ('body_timeout = "30"', "body_timeout must be a positive float"),
        ("body_limits = {archive = 10}", "body_limits maps route paths to bytes"),
    ):
        path.write_text(f"[http]\n{bad}\n")
        with pytest.raises(config_mod.ConfigError, match=reason):
            config_mod.load(str(path), env={})


# -- errors --------------------------------------------------------------------------------------------------------


async def test_an_exception_in_a_route_is_a_500_without_detail_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with served(tmp_path) as (runtime, port):
        runtime.channel("fhir").store.close()  # type: ignore[attr-defined]  # every read now raises
        with structlog.testing.capture_logs() as logs, caplog.at_level(logging.DEBUG):
            fhir = await exchange(port, head("GET", "/fhir/Patient?identifier=x", "Connection: close"))
            other = await exchange(port, head("GET", "/channels", "Connection: close"))
        assert fhir.status == 500 and fhir.json() == {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "exception", "diagnostics": "internal error"}],
        }
        assert other.status == 500 and other.json() == {"error": "internal error"}
        errors = [e for e in logs if e["event"] == "http.error"]
        assert errors == [
            {"event": "http.error", "log_level": "error", "route": route, "method": "GET", "error_type": kind}
            for route, kind in (("/fhir/{type}", "ProgrammingError"), ("/channels", "ProgrammingError"))
        ]
        # nothing reached uvicorn's error logger (its traceback is what broke the JSON log)
        assert [r for r in caplog.records if r.name.startswith("uvicorn")] == []
        assert (await exchange(port, head("GET", "/health", "Connection: close"))).status == 200
