"""HTTPS on the engine's HTTP API (``[http] tls``): served by uvicorn with the engine's TLS profile, client
certificates and their allowed subjects, and the engine's own processes calling each other over it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT
from tests.test_engine import engine_ports
from tests.test_flow import engine_config, free_port
from tests.tls_pki import PKI, Pair, pki  # noqa: F401 (fixture)
from traboule.app import config as config_mod
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.tls import TLSSettings

TOKEN = "https-admin-token-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Trail:
    """An audit trail that keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def record(self, event: Any) -> None:
        self.events.append(event)


@contextlib.asynccontextmanager
async def https_engine(tmp_path: Path, tls: TLSSettings, **limits: Any) -> AsyncIterator[tuple[Runtime, int]]:
    cfg = engine_config(tmp_path)
    cfg.api_tokens = [TOKEN]
    cfg.http_tls = tls
    for name, value in limits.items():  # [http] limits
        setattr(cfg.http_limits, name, value)
    runtime = Runtime(cfg)
    runtime.audit = Trail()  # type: ignore[attr-defined]
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        yield runtime, port
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


def client_ssl(pki: PKI, pair: Pair | None = None, ca: Path | None = None) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.create_default_context(cafile=str(ca or pki.ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def server_tls(pki: PKI, **more: Any) -> TLSSettings:  # noqa: F811
    return TLSSettings(enabled=True, cert_file=str(pki.server.cert), key_file=str(pki.server.key), **more)


def test_http_tls_is_read_from_the_file_over_the_tls_defaults(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    path = tmp_path / "traboule.toml"
    path.write_text(
        f'[tls]\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\nca_file = "{pki.ca}"\n'
        f'[http]\ntls = {{ client_certs = "required", allowed_subjects = ["CN=ris.example"] }}\n'
    )
    cfg = config_mod.load(str(path), env={})
    assert cfg.http_tls.enabled and cfg.http_tls.cert_file == str(pki.server.cert)
    assert cfg.http_tls.client_certs == "required" and cfg.http_tls.allowed_subjects == ("CN=ris.example",)
    assert cfg.api_scheme == "https"
    assert not cfg.tls.enabled  # the defaults alone turn nothing on
    path.write_text(f'[tls]\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\n[http]\ntls = true\n')
    assert config_mod.load(str(path), env={}).http_tls.key_file == str(pki.server.key)
    path.write_text("[http]\ntls = true\n")
    with pytest.raises(config_mod.ConfigError, match="cert_file"):
        config_mod.load(str(path), env={})
    assert config_mod.load(env={}).api_scheme == "http"
    # HTTPS is no access control: a non-loopback address still needs tokens.
    path.write_text(
        f'[http]\nhost = "0.0.0.0"\ntls = {{ cert_file = "{pki.server.cert}", key_file = "{pki.server.key}" }}\n'
    )
    with pytest.raises(config_mod.ConfigError, match="without access control"):
        config_mod.load(str(path), env={})


async def test_https_serves_and_plain_http_to_its_port_fails(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    async with https_engine(tmp_path, server_tls(pki)) as (_runtime, port):
        async with httpx.AsyncClient(verify=client_ssl(pki), timeout=10) as client:
            answer = await client.get(f"https://127.0.0.1:{port}/health/live", headers=BEARER)
            assert answer.status_code == 200 and answer.json()["pid"] == os.getpid()
            assert (await client.get(f"https://localhost:{port}/channels", headers=BEARER)).status_code == 200
            assert (await client.get(f"https://127.0.0.1:{port}/channels")).status_code == 401  # tokens still asked
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/health/live", headers=BEARER)
        # A client that does not trust the engine's CA does not talk to it.
        async with httpx.AsyncClient(verify=client_ssl(pki, ca=pki.other_ca), timeout=5) as stranger:
            with pytest.raises(httpx.ConnectError):
                await stranger.get(f"https://127.0.0.1:{port}/health/live")


async def test_client_certificates_and_allowed_subjects(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    tls = server_tls(pki, ca_file=str(pki.ca), client_certs="required", allowed_subjects=("CN=ris.example",))
    async with https_engine(tmp_path, tls) as (runtime, port):
        url = f"https://127.0.0.1:{port}/channels"
        async with httpx.AsyncClient(verify=client_ssl(pki, pki.ris), timeout=10) as ris:
            answer = await ris.get(url, headers=BEARER)
            assert answer.status_code == 200, answer.text
        for refused in (pki.stranger, pki.expired, None):  # another CA, expired, no certificate: no handshake
            async with httpx.AsyncClient(verify=client_ssl(pki, refused), timeout=5) as client:
                with pytest.raises(httpx.HTTPError):
                    (await client.get(url, headers=BEARER)).raise_for_status()
        # A certificate from the CA whose subject is not in the list: the handshake passes, the request is refused.
        async with httpx.AsyncClient(verify=client_ssl(pki, pki.modality), timeout=10) as modality:
            answer = await modality.get(url, headers=BEARER)
            assert answer.status_code == 403 and "not allowed" in answer.json()["error"]
            fhir = await modality.get(f"https://127.0.0.1:{port}/fhir/metadata", headers=BEARER)
            assert fhir.status_code == 403 and fhir.json()["resourceType"] == "OperationOutcome"
        refusals = [e for e in runtime.audit.events if e.kind == "user-authentication"]  # type: ignore[attr-defined]
        assert refusals and all(e.requestor.cert_subject == "CN=ct01.example,O=traboule tests" for e in refusals)
        assert refusals[0].description == "client certificate subject not allowed"


async def test_tls_1_1_is_refused(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    async with https_engine(tmp_path, server_tls(pki)) as (_runtime, port):

        def s_client(*version: str) -> subprocess.CompletedProcess[str]:
            command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.ca), *version]
            return subprocess.run(command, input="", capture_output=True, text=True, timeout=20)

        import asyncio

        old = await asyncio.to_thread(s_client, "-tls1_1")
        assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout + old.stderr
        current = await asyncio.to_thread(s_client, "-tls1_2")
        assert current.returncode == 0 and "Verify return code: 0 (ok)" in current.stdout


def dual_use_certificate(pki: PKI, name: str) -> Pair:  # noqa: F811
    """A server certificate for 127.0.0.1 that may also authenticate as a client (both extended key usages): what
    the engine shows its own ports when they require client certificates."""
    return pki.issue(name, name, server=True, client_too=True)


def test_a_running_engine_over_https_collects_its_children_metrics(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """The default engine (main, worker, fhir processes) with HTTPS and client certificates required, only the RIS
    subject allowed: the main process supervises its children, gathers their /metrics and forwards /fhir to the
    fhir process, all over HTTPS with its own certificate. Renewed on disk with another subject, that certificate
    is reloaded by every process, as a server and as the client of the others: the calls between them go on."""
    import shutil

    first = dual_use_certificate(pki, "engine.example")
    renewed = dual_use_certificate(pki, "engine-renewed.example")
    engine = Pair(tmp_path / "engine.pem", tmp_path / "engine.key", first.subject)
    shutil.copy(first.cert, engine.cert)
    shutil.copy(first.key, engine.key)
    config = tmp_path / "traboule.toml"
    config.write_text(
        f'[tls]\nca_file = "{pki.ca}"\nreload_interval = 0.2\n'
        f'[http]\ntokens = ["{TOKEN}"]\n'
        f'tls = {{ cert_file = "{engine.cert}", key_file = "{engine.key}", client_certs = "required", '
        'allowed_subjects = ["CN=ris.example"] }\n'
    )
    ports = engine_ports()
    env = dict(
        os.environ, TRABOULE_CONFIG=str(config), TRABOULE_DATA_DIR=str(tmp_path / "var"), TRABOULE_LOG_FORMAT="json"
    )
    env.update(ports)
    log = tmp_path / "engine.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "traboule.app.cli", "run"], env=env, cwd=ROOT, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while not any(
            '"engine.ready"' in line and json.loads(line).get("process") == "main"
            for line in log.read_text().splitlines()
            if line.startswith("{")
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        base = f"https://127.0.0.1:{ports['TRABOULE_HTTP_PORT']}"
        with httpx.Client(verify=client_ssl(pki, pki.ris), timeout=10, headers=BEARER) as client:
            metrics = client.get(f"{base}/metrics")
            assert metrics.status_code == 200
            assert 'traboule_process_up{process="worker"} 1.0' in metrics.text
            assert 'traboule_process_up{process="fhir"} 1.0' in metrics.text
            assert 'process="worker"' in metrics.text.replace('traboule_process_up{process="worker"}', "")
            health = client.get(f"{base}/health").json()
            assert {p["status"] for p in health["processes"].values()} == {"ok"}, health
            metadata = client.get(f"{base}/fhir/metadata")  # forwarded to the fhir process over HTTPS
            assert metadata.status_code == 200 and metadata.json()["resourceType"] == "CapabilityStatement"
        # The children's own ports are HTTPS too, and refuse a subject not allowed.
        worker = f"https://127.0.0.1:{int(ports['TRABOULE_HTTP_PORT']) + 1}/health/live"
        with httpx.Client(verify=client_ssl(pki, pki.modality), timeout=10, headers=BEARER) as modality:
            assert modality.get(worker).status_code == 403
        with httpx.Client(timeout=5) as plain, pytest.raises(httpx.HTTPError):
            plain.get(worker.replace("https:", "http:"))

        def reloads(listener: str) -> int:
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
            return sum(1 for e in lines if e.get("event") == "tls.reloaded" and e.get("listener") == listener)

        shutil.copy(renewed.key, engine.key)
        shutil.copy(renewed.cert, engine.cert)
        deadline = time.monotonic() + 20
        while reloads("http") < 3 or reloads("http-client") < 3:  # main, worker, fhir: server and client contexts
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        with httpx.Client(verify=client_ssl(pki, pki.ris), timeout=10, headers=BEARER) as client:
            metrics = client.get(f"{base}/metrics")
            assert 'traboule_process_up{process="fhir"} 1.0' in metrics.text
            health = client.get(f"{base}/health").json()
            assert {p["status"] for p in health["processes"].values()} == {"ok"}, health
            assert client.get(f"{base}/fhir/metadata").status_code == 200
        # The engine's own subject is the renewed one now: admitted by a child, the former one no more.
        with httpx.Client(verify=client_ssl(pki, renewed), timeout=10, headers=BEARER) as now:
            assert now.get(worker).status_code == 200
        with httpx.Client(verify=client_ssl(pki, first), timeout=10, headers=BEARER) as before:
            assert before.get(worker).status_code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


async def test_an_alert_webhook_uses_its_tls_settings(pki: PKI) -> None:  # noqa: F811
    """``[alerts.notify.<name>] tls = { ca_file }`` over the ``[tls]`` defaults: the https webhook of that CA gets
    the notification; trusting another CA, the delivery fails (and is retried later by the engine)."""
    import asyncio

    from traboule.app.alerts import parse
    from traboule.tls import server_context

    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1]
            )
            received.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server_tls(pki)))
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}/hook"
    try:
        notify = {"ok": {"kind": "webhook", "url": url}, "wrong": {"kind": "webhook", "url": url}}
        notify["wrong"]["tls"] = {"ca_file": str(pki.other_ca)}
        defaults = TLSSettings(ca_file=str(pki.ca))
        notifiers = parse({"notify": notify}, [], env={}, tls=defaults).notifiers
        async with httpx.AsyncClient() as shared:
            await notifiers["ok"].send({"incident": 1}, shared)
            assert json.loads(received[0]) == {"incident": 1}
            with pytest.raises(httpx.ConnectError):
                await notifiers["wrong"].send({"incident": 2}, shared)
        assert len(received) == 1
    finally:
        server.close()


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    import asyncio
    import shutil

    cert, key = tmp_path / "engine.pem", tmp_path / "engine.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    renewed = pki.issue("renewed", "localhost", server=True)
    cfg = engine_config(tmp_path)
    cfg.http_tls = TLSSettings(enabled=True, cert_file=str(cert), key_file=str(key))
    cfg.tls_reload_interval = 0.1
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)

    def served() -> str:
        return ssl.get_server_certificate(("127.0.0.1", port), ca_certs=str(pki.ca))

    def same(pem: str, path: Path) -> bool:
        return ssl.PEM_cert_to_DER_cert(pem) == ssl.PEM_cert_to_DER_cert(path.read_text())

    try:
        assert same(await asyncio.to_thread(served), pki.server.cert)
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        for _ in range(50):
            if same(await asyncio.to_thread(served), renewed.cert):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the renewed certificate was never served")
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


def test_the_operations_guide_https_example_loads(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    text = (ROOT / "docs" / "operations.md").read_text().split("### HTTPS", 1)[1]
    example = text.split("```toml", 1)[1].split("```", 1)[0]
    for name, path in (("ca.pem", pki.ca), ("engine.pem", pki.server.cert), ("engine.key", pki.server.key)):
        example = example.replace(f"/etc/traboule/tls/{name}", str(path))
    config = tmp_path / "t.toml"
    config.write_text(example)
    cfg = config_mod.load(str(config), env={})
    assert cfg.http_tls.enabled and cfg.http_tls.ca_file == str(pki.ca) and cfg.http_tls.client_certs == "required"
    assert cfg.http_tls.allowed_subjects == ("CN=ris.example,O=CHU", "CN=prometheus.example")


def test_an_smtp_notifier_takes_a_tls_table(pki: PKI) -> None:  # noqa: F811
    from traboule.app.alerts import parse

    mail = {"kind": "smtp", "host": "smtp.example.org", "from": "t@example.org", "to": "ops@example.org"}
    defaults = TLSSettings(min_version="1.3")

    def notifier(**more: Any) -> Any:
        return parse({"notify": {"m": {**mail, **more}}}, [], env={}, tls=defaults).notifiers["m"]

    upgraded = notifier(port=587, starttls=True, tls={"ca_file": str(pki.ca)})
    assert (upgraded.starttls, upgraded.tls) == (True, False)
    assert (upgraded.tls_settings.ca_file, upgraded.tls_settings.min_version) == (str(pki.ca), "1.3")
    implicit = notifier(port=465, tls={"ca_file": str(pki.ca)})
    assert (implicit.starttls, implicit.tls, implicit.tls_settings.ca_file) == (False, True, str(pki.ca))
    assert notifier(port=25).tls_settings.min_version == "1.3"  # the [tls] defaults
    with pytest.raises(config_mod.ConfigError, match="unknown tls setting"):
        notifier(port=465, tls={"cafile": str(pki.ca)})


async def test_silent_tls_peers_are_closed_after_the_header_timeout(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """TCP connections that never start their handshake hold a descriptor for ``header_timeout`` at most (not
    asyncio's 60 s), a normal client is served meanwhile, and one address cannot hold more handshakes than its
    share of ``max_connections`` (a tenth): beyond, its connections are closed at once."""
    import asyncio

    async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(reader.read(1), seconds) == b""
        return True

    async with https_engine(tmp_path, server_tls(pki), header_timeout=2.0, max_connections=50) as (_runtime, port):
        started = time.monotonic()
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        async with httpx.AsyncClient(verify=client_ssl(pki), timeout=5) as client:
            answer = await client.get(f"https://127.0.0.1:{port}/health/live", headers=BEARER)
            assert answer.status_code == 200
        assert time.monotonic() - started < 2.0  # served while the silent ones were held
        for reader, _writer in silent:
            assert await closed_within(reader, 5.0)
        assert time.monotonic() - started < 8.0  # the header timeout, not asyncio's 60 s
        # Five handshakes per address (a tenth of 50): the sixth silent connection is closed at once.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        await asyncio.sleep(0.2)
        reader, _writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_within(reader, 0.5)
        for _reader, writer in [*silent, *held]:
            writer.close()


async def test_the_internal_client_shows_the_renewed_certificate(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """Client certificates required: the engine's processes call each other with its own certificate. Renewed on
    disk (another subject), the internal client context is reloaded with the server's: the next internal
    connection shows the new one, and calls between processes go on."""
    import asyncio
    import shutil

    from traboule.app.http import internal_client, internal_context, internal_url
    from traboule.tls import server_context

    first, renewed = dual_use_certificate(pki, "engine-a.example"), dual_use_certificate(pki, "engine-b.example")
    cert, key = tmp_path / "engine.pem", tmp_path / "engine.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    tls = TLSSettings(
        enabled=True,
        cert_file=str(cert),
        key_file=str(key),
        ca_file=str(pki.ca),
        client_certs="required",
        allowed_subjects=("CN=ris.example",),
    )
    # A peer of the engine's internal client that says which certificate it was shown.
    shown: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from traboule.tls import subject_of

        shown.append(subject_of(writer.get_extra_info("peercert")))
        writer.close()

    peer = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(tls))
    peer_port = peer.sockets[0].getsockname()[1]

    async def subject_shown() -> str:
        _reader, writer = await asyncio.open_connection("127.0.0.1", peer_port, ssl=internal_context(tls))
        writer.close()
        for _ in range(50):
            if shown:
                return shown.pop()
            await asyncio.sleep(0.02)
        raise AssertionError("the peer saw no connection")

    cfg = engine_config(tmp_path)
    cfg.api_tokens = [TOKEN]
    cfg.http_tls = tls
    cfg.tls_reload_interval = 0.1
    cfg.http_port = free_port()
    runtime = Runtime(cfg)
    await runtime.start()
    server = await serve(create_app(runtime), "127.0.0.1", cfg.http_port)
    try:
        assert await subject_shown() == first.subject
        async with internal_client(cfg, timeout=5, headers=BEARER) as client:
            assert (await client.get(internal_url(cfg, cfg.http_port, "/channels"))).status_code == 200
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        for _ in range(50):
            if await subject_shown() == renewed.subject:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the internal client never showed the renewed certificate")
        async with internal_client(cfg, timeout=5, headers=BEARER) as client:
            assert (await client.get(internal_url(cfg, cfg.http_port, "/channels"))).status_code == 200
        # The renewed subject is the engine's own now: admitted without the internal secret too.
        async with httpx.AsyncClient(verify=client_ssl(pki, renewed), timeout=5, headers=BEARER) as engine:
            assert (await engine.get(f"https://127.0.0.1:{cfg.http_port}/channels")).status_code == 200
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()
        peer.close()


async def test_refused_certificate_subjects_are_counted_like_bad_tokens(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """An address that keeps presenting a subject not allowed gets 429 after ``max_auth_failures`` refusals (not
    audited any more), like one guessing tokens; the RIS, another subject from the same address, is blocked with it
    (the count is the address's), and an internal call carrying the run's secret is not."""
    from traboule.app.http import INTERNAL_HEADER, internal_secret

    tls = server_tls(pki, ca_file=str(pki.ca), client_certs="required", allowed_subjects=("CN=ris.example",))
    async with https_engine(tmp_path, tls, max_auth_failures=3) as (runtime, port):
        url = f"https://127.0.0.1:{port}/channels"
        async with httpx.AsyncClient(verify=client_ssl(pki, pki.modality), timeout=10, headers=BEARER) as modality:
            assert [(await modality.get(url)).status_code for _ in range(4)] == [403, 403, 403, 429]
            internal = {INTERNAL_HEADER.decode(): internal_secret()}
            assert (await modality.get(url, headers=internal)).status_code == 200
            forged = {INTERNAL_HEADER.decode(): "not-the-secret"}
            assert (await modality.get(url, headers=forged)).status_code == 429
        async with httpx.AsyncClient(verify=client_ssl(pki, pki.ris), timeout=10, headers=BEARER) as ris:
            answer = await ris.get(url)
            assert answer.status_code == 429 and 0 < int(answer.headers["retry-after"]) <= 61
        refusals = [e for e in runtime.audit.events if e.kind == "user-authentication"]  # type: ignore[attr-defined]
        assert len(refusals) == 3


async def test_tls_connections_are_taken_on_at_a_bounded_rate(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Beyond its burst, an address's next connections are closed on accept, before any handshake; it gets in
    again at the rate (here 2 a second after a burst of 3)."""
    import asyncio

    from traboule.app import http

    monkeypatch.setattr(http, "HANDSHAKE_RATE", (2.0, 3, 0.0))
    async with https_engine(tmp_path, server_tls(pki), header_timeout=5.0) as (_runtime, port):
        for _ in range(3):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(1), 1.0) == b""  # not the 5 s handshake timeout
        writer.close()
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(verify=client_ssl(pki), timeout=5) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/health/live", headers=BEARER)).status_code == 200
