"""MLLP over TLS, with real sockets and the real openssl: the orders channel's listener (TLS only, mutual TLS with an
allow-list of subjects, certificates renewed without a restart, its limits kept) and the sender (the server's
certificate checked)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.test_flow import ack_code, engine_config, fixture, mllp_port
from tests.tls_pki import PKI, Pair, make_pki
from traboule.adapters.mllp import END, START, AcceptRate, MLLPClient, MLLPListener, MLLPSender
from traboule.app.runtime import Runtime
from traboule.audit import AuditEvent, Outcome
from traboule.errors import NotAccepted
from traboule.formats import hl7
from traboule.stores.journal import Query
from traboule.tls import TLSSettings, client_context, peer_subject, server_context

OPENSSL = shutil.which("openssl")
ORDER = fixture("orm_o01_nw_latin1.hl7")
MESSAGE = b"MSH|^~\\&|TRABOULE|CHU|RIS|CHU|20261125100000||ORU^R01|MINE|P|2.5\rPID|1\r"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def client(pki: PKI, pair: Pair | None = None, **more: Any) -> ssl.SSLContext:
    if pair is not None:
        more.update(cert_file=str(pair.cert), key_file=str(pair.key))
    return client_context(TLSSettings(enabled=True, ca_file=str(pki.ca), **more))


@contextlib.asynccontextmanager
async def tls_engine(tmp_path: Path, pki: PKI, tls: Any = True, **source: Any) -> AsyncIterator[Runtime]:
    """The orders engine, its listener on TLS; ``[tls]`` defaults: a copy of the server certificate and key (the
    reload test replaces them) and the test CA, checked every 0.2 s."""
    cfg = engine_config(tmp_path)
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    cfg.tls = TLSSettings(cert_file=str(cert), key_file=str(key), ca_file=str(pki.ca))
    cfg.tls_reload_interval = 0.2
    cfg.channels[0]["source"].update(tls=tls, **source)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def send_order(port: int, ctx: ssl.SSLContext | None, message: bytes = ORDER) -> str:
    async with MLLPClient("127.0.0.1", port, timeout=10, ssl=ctx) as mllp:
        return ack_code(hl7.parse(hl7.decode(await mllp.send(message)).text))


def s_client(port: int, pki: PKI, *args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(pki.ca), "-brief", *args]
    return subprocess.run(command, input="", capture_output=True, text=True, timeout=30)


def refusals(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "connection.tls_refused"]


class Recording:
    """The engine's audit trail, with what is recorded on it also kept here."""

    def __init__(self, trail: Any) -> None:
        self.trail, self.events = trail, list[AuditEvent]()

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)
        self.trail.record(event)

    def __getattr__(self, name: str) -> Any:  # start, flush, close...
        return getattr(self.trail, name)

    def alerts(self) -> list[AuditEvent]:
        return [e for e in self.events if e.kind == "security-alert" and e.subtype == "node-authentication"]


def recording(engine: Runtime) -> Recording:
    trail = Recording(engine.audit)
    engine.audit = trail
    return trail


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_an_order_over_tls_is_answered_aa_and_plain_tcp_gets_nothing(tmp_path: Path, pki: PKI) -> None:
    async with tls_engine(tmp_path, pki) as engine:
        port = mllp_port(engine)
        trail = recording(engine)
        with structlog.testing.capture_logs() as logs:
            assert await send_order(port, client(pki)) == "AA"
            # A plain MLLP client: its frame is not a TLS handshake; no ACK, the connection is closed.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(START + ORDER.replace(b"MSG0001", b"PLAIN1") + END)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)  # the end of the stream, not an ACK
            writer.close()
            await until(lambda: refusals(logs))
        assert START not in answer and b"MSA" not in answer
        assert refusals(logs) == ["WRONG_VERSION_NUMBER"]  # OpenSSL's reason for bytes that are no TLS record
        (event,) = [e for e in logs if e["event"] == "connection.tls_refused"]
        assert event["peer"].startswith("127.0.0.1:") and "subject" not in event
        assert trail.alerts() == []  # not a certificate refused: logged, not audited (a port scan, a TCP check)
        assert engine.journal is not None
        # Only the TLS order: the plain one never reached the channel.
        assert engine.journal.count(Query(channels=["ris-orders"])) == 1


@pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
async def test_openssl_s_client_gets_tls_1_2_or_later_with_bcp195_ciphers_only(tmp_path: Path, pki: PKI) -> None:
    async with tls_engine(tmp_path, pki) as engine:
        port = mllp_port(engine)
        best = await asyncio.to_thread(s_client, port, pki)
        assert best.returncode == 0, best.stderr
        assert "Verification: OK" in best.stderr
        assert "Protocol version: TLSv1.3" in best.stderr
        v12 = await asyncio.to_thread(s_client, port, pki, "-tls1_2")
        assert v12.returncode == 0, v12.stderr
        assert "Protocol version: TLSv1.2" in v12.stderr
        suite = re.search(r"Ciphersuite: (\S+)", v12.stderr)
        assert suite and re.fullmatch(r"(ECDHE|DHE)-[A-Z0-9-]*(GCM|CHACHA20)[A-Z0-9-]*", suite.group(1)), v12.stderr
        with structlog.testing.capture_logs() as logs:
            # Not BCP 195: CBC without AEAD, and TLS 1.1 (the client lowered to security level 0 to offer it).
            cbc = await asyncio.to_thread(s_client, port, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA")
            old = await asyncio.to_thread(s_client, port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
            await until(lambda: len(refusals(logs)) == 2)
        assert cbc.returncode != 0 and "Ciphersuite" not in cbc.stderr
        assert old.returncode != 0 and "Protocol version" not in old.stderr
        assert refusals(logs) == ["NO_SHARED_CIPHER", "UNSUPPORTED_PROTOCOL"]


async def test_mutual_tls_admits_only_allowed_subjects_signed_by_the_ca(tmp_path: Path, pki: PKI) -> None:
    tls = {"client_certs": "required", "allowed_subjects": ["CN=ris.example", "CN=other.example,O=CHU"]}
    async with tls_engine(tmp_path, pki, tls) as engine:
        port = mllp_port(engine)
        trail = recording(engine)
        with structlog.testing.capture_logs() as logs:
            assert await send_order(port, client(pki, pki.ris)) == "AA"
            for pair in (None, pki.stranger, pki.expired, pki.modality):
                # TLS 1.3: the client's handshake ends before the server judged its certificate; the refusal comes
                # as an alert or the end of the stream, in place of the ACK.
                with pytest.raises((OSError, asyncio.IncompleteReadError)):
                    await send_order(port, client(pki, pair), ORDER.replace(b"MSG0001", b"REFUSED"))
            await until(lambda: len(refusals(logs)) == 4)
        events = [e for e in logs if e["event"] == "connection.tls_refused"]
        assert [e["reason"] for e in events] == [
            "PEER_DID_NOT_RETURN_A_CERTIFICATE",
            "unable to get local issuer certificate",
            "certificate has expired",
            "subject_not_allowed",
        ]
        assert events[3]["subject"] == "CN=ct01.example,O=traboule tests"  # the subject, nothing else of it
        assert not any("subject" in e for e in events[:3])
        assert engine.journal is not None and engine.journal.count(Query(channels=["ris-orders"])) == 1
        # Each certificate refused is a node-authentication failure on the audit trail, with a fixed text.
        alerts = trail.alerts()
        assert [e.description for e in alerts] == [
            "no client certificate",
            "client certificate refused: unable to get local issuer certificate",
            "client certificate refused: certificate has expired",
            "client certificate subject not allowed",
        ]
        assert all(e.outcome == Outcome.MINOR_FAILURE for e in alerts)
        peers = [(e.requestor.user_id, e.requestor.address, e.requestor.cert_subject) for e in alerts if e.requestor]
        assert peers == [("127.0.0.1", "127.0.0.1", "")] * 3 + [("127.0.0.1", "127.0.0.1", pki.modality.subject)]


def test_accept_rate_per_address_in_all_and_bounded_in_memory() -> None:
    rate = AcceptRate(per_address=2, burst=3, total=5)
    assert [rate.take("a", 0.0) for _ in range(4)] == ["", "", "", "max_handshakes_per_second"]
    assert rate.take("a", 0.5) == ""  # a token back every half second
    assert rate.take("a", 0.5) == "max_handshakes_per_second"
    assert [rate.take("a", 0.75) for _ in range(5)] == ["max_handshakes_per_second"] * 5  # refusals spend nothing:
    assert rate.take("a", 1.0) == ""  # the peer that waits gets in on time
    # In all: 5 a second, one second's worth at once, however many addresses share them.
    assert [rate.take(h, 1.0) for h in "bbbcc"] == ["", "", "", "", "max_handshakes_per_second_total"]
    assert rate.take("d", 1.25) == ""
    # Memory: at most max_addresses buckets; the most recent addresses keep theirs (spent tokens included).
    many = AcceptRate(per_address=2, burst=3, max_addresses=8)
    for i in range(100):
        assert many.take(f"h{i}", 0.0) == ""
    assert len(many) <= 8
    assert [many.take("h99", 0.0) for _ in range(3)] == ["", "", "max_handshakes_per_second"]


async def test_a_burst_of_handshakes_from_one_address_is_refused_while_a_paced_client_gets_in(
    tmp_path: Path, pki: PKI
) -> None:
    source = {"max_handshakes_per_second": 2, "handshake_burst": 3}
    async with tls_engine(tmp_path, pki, True, **source) as engine:
        port = mllp_port(engine)
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]

        async def handshake(local: str = "127.0.0.1") -> bool:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=client(pki), local_addr=(local, 0)), 5
                )
            except (OSError, asyncio.IncompleteReadError):  # closed before the handshake: reset, or EOF
                return False
            writer.close()
            return True

        with structlog.testing.capture_logs() as logs:
            admitted = sum(await asyncio.gather(*(handshake() for _ in range(12))))
            assert admitted in (3, 4)  # the burst (and a token back if the twelve took over half a second)
            assert listener.rate_refusals == 12 - admitted
            assert await handshake("127.0.0.2")  # another address has its own bucket
            for i in range(3):  # a client that keeps to the rate always gets in
                await asyncio.sleep(0.6)
                assert await send_order(port, client(pki), ORDER.replace(b"MSG0001", b"PACED%d" % i)) == "AA"
        assert "max_handshakes_per_second" in refusals(logs)
        assert listener.rate_refusals == 12 - admitted


async def test_the_handler_reads_the_client_subject_and_the_sender_speaks_tls(pki: PKI) -> None:
    seen: list[str] = []

    async def answer(data: bytes, peer: str) -> bytes:
        seen.append(peer_subject.get())
        msg = hl7.parse(hl7.decode(data).text)
        return hl7.build_ack(msg, "AA", control_id="A1", timestamp="20261125100001").encode()

    settings = TLSSettings(
        enabled=True,
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        ca_file=str(pki.ca),
        client_certs="optional",
    )
    listener = MLLPListener(answer, port=0, name="tls", ssl=server_context(settings))
    await listener.start()
    port = listener.port

    def sender(**tls: Any) -> MLLPSender:
        return MLLPSender.from_config("results", {"host": "127.0.0.1", "port": port, "timeout": 5, "tls": tls})

    defaults = TLSSettings(ca_file=str(pki.ca), cert_file=str(pki.ris.cert), key_file=str(pki.ris.key))  # [tls]

    senders = [
        sender(ca_file=str(pki.ca)),
        sender(ca_file=str(pki.ca), cert_file=str(pki.ris.cert), key_file=str(pki.ris.key)),
        sender(ca_file=str(pki.ca), server_name="localhost"),
        MLLPSender.from_config("results", {"host": "127.0.0.1", "port": port, "tls": True}, defaults),
        sender(ca_file=str(pki.other_ca)),  # the server's certificate is not from this CA
        sender(ca_file=str(pki.ca), server_name="ris.example"),  # nor for this name
        MLLPSender("127.0.0.1", port, timeout=5),  # plain TCP
    ]
    try:
        assert senders[0].address == f"mllps://127.0.0.1:{port}"
        assert [await s.send(MESSAGE) for s in senders[:4]] == ["AA", "AA", "AA", "AA"]
        assert seen == ["", "CN=ris.example,O=traboule tests", "", "CN=ris.example,O=traboule tests"]
        with pytest.raises(NotAccepted, match=r"unreachable.*CERTIFICATE_VERIFY_FAILED"):
            await senders[4].send(MESSAGE)
        with pytest.raises(NotAccepted, match=r"unreachable.*Hostname mismatch"):
            await senders[5].send(MESSAGE)
        with pytest.raises(NotAccepted, match="unreachable or silent"):
            await senders[6].send(MESSAGE)
        assert len(seen) == 4 and listener.tls_refusals == 3
    finally:
        for s in senders:
            await s.close()
        await listener.stop()


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


async def served_certificate(port: int, pki: PKI) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client(pki))
    cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return cert  # type: ignore[no-any-return]


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path, pki: PKI) -> None:
    async with tls_engine(tmp_path, pki) as engine:
        port = mllp_port(engine)
        assert await served_certificate(port, pki) == der(pki.server.cert)
        async with MLLPClient("127.0.0.1", port, timeout=10, ssl=client(pki)) as before:
            await before.send(ORDER)  # a connection opened before the renewal
            renewed = pki.issue("renewed", "localhost", server=True, days=400)
            with structlog.testing.capture_logs() as logs:
                # A key that does not match the certificate (half-replaced): refused, the old pair kept.
                shutil.copy(renewed.key, tmp_path / "server.key")
                await until(lambda: any(e["event"] == "tls.reload_failed" for e in logs))
                assert await served_certificate(port, pki) == der(pki.server.cert)
                shutil.copy(renewed.cert, tmp_path / "server.pem")
                await until(lambda: any(e["event"] == "tls.reloaded" for e in logs))
            assert await served_certificate(port, pki) == der(renewed.cert)
            reply = await before.send(ORDER.replace(b"MSG0001", b"MSG0002"))  # it keeps its session
            assert ack_code(hl7.parse(hl7.decode(reply).text)) == "AA"
        assert await send_order(port, client(pki), ORDER.replace(b"MSG0001", b"MSG0003")) == "AA"
        (failed,) = [e for e in logs if e["event"] == "tls.reload_failed"][:1]
        assert failed["listener"] == "ris-orders" and "SSLError" in failed["error"]


async def test_the_limits_hold_over_tls(tmp_path: Path, pki: PKI) -> None:
    source = {"ssl_handshake_timeout": 1.5, "max_message_size": 64 * 1024, "max_connections_per_peer": 2}
    async with tls_engine(tmp_path, pki, True, **source) as engine:
        port = mllp_port(engine)
        listener: MLLPListener = engine.channel("ris-orders").listener  # type: ignore[attr-defined]
        with structlog.testing.capture_logs() as logs:
            # Silent peers: each closed once the handshake deadline passes; a third from the same address is refused
            # at once (the handshake budget per peer); none counts as a connection meanwhile.
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(silent[2][0].read(), 5) == b""
            assert asyncio.get_running_loop().time() - started < 1.0
            assert listener.handshakes == 2 and listener.connections == 0
            for reader, _ in silent[:2]:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 1.0 < asyncio.get_running_loop().time() - started < 5
            for _, writer in silent:
                writer.close()
            await until(lambda: listener.handshakes == 0 and len(refusals(logs)) == 3)
        assert refusals(logs) == ["handshakes_max_connections_per_peer", "handshake_timeout", "handshake_timeout"]
        # Oversize over TLS: AR, the connection closed.
        big = ORDER + b"NTE|1||" + b"x" * 100_000 + b"\r"
        async with MLLPClient("127.0.0.1", port, timeout=10, ssl=client(pki)) as mllp:
            assert ack_code(hl7.parse(hl7.decode(await mllp.send(big)).text)) == "AR"
        # Per peer: a third connection evicts an idle one (TLS established and idle), as in plain TCP.
        clients = [MLLPClient("127.0.0.1", port, timeout=10, ssl=client(pki)) for _ in range(3)]
        try:
            await clients[0].connect()
            await clients[1].connect()
            await until(lambda: listener.connections == 2)
            await asyncio.sleep(listener.evict_idle_after + 0.2)
            evictions = listener.evictions
            await clients[2].connect()
            assert await clients[2].send(ORDER) and listener.evictions == evictions + 1
            assert listener.connections == 2
        finally:
            for c in clients:
                await c.close()


def test_tls_under_uvloop(pki: PKI) -> None:
    """The engine runs on uvloop: the handshake, the subject check and the refusals there too."""

    async def main() -> None:
        async def answer(data: bytes, peer: str) -> bytes:
            return peer_subject.get().encode()

        settings = TLSSettings(
            enabled=True,
            cert_file=str(pki.server.cert),
            key_file=str(pki.server.key),
            ca_file=str(pki.ca),
            client_certs="required",
        )
        listener = MLLPListener(
            answer, port=0, ssl=server_context(settings), allowed_subjects=("CN=ris.example",), name="uv"
        )
        await listener.start()
        try:
            async with MLLPClient("127.0.0.1", listener.port, timeout=5, ssl=client(pki, pki.ris)) as mllp:
                assert await mllp.send(b"MSH|x") == b"CN=ris.example,O=traboule tests"
            with pytest.raises((OSError, asyncio.IncompleteReadError)):
                async with MLLPClient("127.0.0.1", listener.port, timeout=5, ssl=client(pki, pki.modality)) as mllp:
                    await mllp.send(b"MSH|x")
            with pytest.raises((OSError, asyncio.IncompleteReadError)):
                async with MLLPClient("127.0.0.1", listener.port, timeout=5) as mllp:
                    await mllp.send(b"MSH|x")
            await until(lambda: listener.tls_refusals == 2)
        finally:
            await listener.stop()

    uvloop.run(main())


def cli_config(path: Path, data_dir: Path, port: int, pki: PKI, listener_tls: dict[str, Any] | None) -> Path:
    """A configuration naming the engine's listener as the ``send`` and ``journal replay`` commands read it."""
    table = ""
    if listener_tls is not None:
        table = ", tls = {" + ", ".join(f'{k} = "{v}"' for k, v in listener_tls.items()) + "}"
    path.write_text(
        f"""
[engine]
defaults = false
data_dir = "{data_dir}"

[tls]
ca_file = "{pki.ca}"

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{adapter = "mllp-listener", host = "127.0.0.1", port = {port}{table}}}
"""
    )
    return path


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "traboule.app.cli", *args]
    root = Path(__file__).resolve().parent.parent
    return await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, cwd=root, timeout=60)


async def test_send_and_replay_speak_tls_to_the_configured_listener(tmp_path: Path, pki: PKI) -> None:
    """`traboule send` and `journal replay` without --to: TLS as the listener has it, its certificate checked
    against the site CA, the listener's own (dual-use) certificate presented where it asks for client ones."""
    dual = pki.issue("dual", "localhost", server=True, client_too=True)
    listener = {"client_certs": "required", "cert_file": str(dual.cert), "key_file": str(dual.key)}
    async with tls_engine(tmp_path, pki, tls=dict(listener)) as engine:
        port = mllp_port(engine)
        config = cli_config(tmp_path / "cli.toml", tmp_path, port, pki, listener)
        order = tmp_path / "order.hl7"
        order.write_bytes(ORDER)
        sent = await run_cli("--config", str(config), "send", str(order))
        assert sent.returncode == 0, sent.stderr
        assert "over TLS" in sent.stderr and ": AA" in sent.stdout
        assert engine.journal is not None
        (entry,) = engine.journal.recent(1)
        replayed = await run_cli("--config", str(config), "journal", "replay", str(entry.id))
        assert replayed.returncode == 0, replayed.stderr
        assert "over TLS" in replayed.stderr and f"journal entry {entry.id}: AA" in replayed.stdout
        assert [e.status for e in engine.journal.recent(2)] == ["duplicate", "accepted"]


async def test_send_to_a_tls_listener_with_the_wrong_trust_says_what_to_give(tmp_path: Path, pki: PKI) -> None:
    async with tls_engine(tmp_path, pki, tls={"client_certs": "required"}) as engine:
        port = mllp_port(engine)
        config = cli_config(tmp_path / "cli.toml", tmp_path, port, pki, None)  # the listener as a plain one
        order = tmp_path / "order.hl7"
        order.write_bytes(ORDER)
        to = ["--to", f"127.0.0.1:{port}"]
        ok = await run_cli(
            "--config", str(config), "send", str(order), *to, "--cert", str(pki.ris.cert), "--key", str(pki.ris.key)
        )
        assert ok.returncode == 0 and ": AA" in ok.stdout, ok.stderr  # the [tls] CA checks the listener
        untrusted = await run_cli("--config", str(config), "send", str(order), *to, "--ca", str(pki.other_ca))
        assert untrusted.returncode == 2 and "Traceback" not in untrusted.stderr
        assert "over TLS" in untrusted.stderr and "give --ca" in untrusted.stderr
        no_cert = await run_cli("--config", str(config), "send", str(order), *to, "--tls")
        assert no_cert.returncode == 2 and "Traceback" not in no_cert.stderr
        assert "cannot send to" in no_cert.stderr and "give --cert and --key" in no_cert.stderr
        half = await run_cli("--config", str(config), "send", str(order), *to, "--cert", str(pki.ris.cert))
        assert half.returncode == 2 and "--cert and --key go together" in half.stderr
        plain = await run_cli("--config", str(config), "send", str(order), *to)  # no TLS asked: plain MLLP
        assert plain.returncode == 2 and "over TLS" not in plain.stderr and "Traceback" not in plain.stderr
        assert "--tls" in plain.stderr
        assert engine.journal is not None and engine.journal.count(Query(channels=["ris-orders"])) == 1


async def test_send_with_tls_to_a_plain_listener_says_to_leave_tls_out(tmp_path: Path, pki: PKI) -> None:
    async with tls_engine(tmp_path, pki, tls=False) as engine:
        port = mllp_port(engine)
        config = cli_config(tmp_path / "cli.toml", tmp_path, port, pki, None)
        order = tmp_path / "order.hl7"
        order.write_bytes(ORDER)
        to = ["--to", f"127.0.0.1:{port}", "--timeout", "3"]
        sent = await run_cli("--config", str(config), "send", str(order), *to, "--tls")
        assert sent.returncode == 2 and "Traceback" not in sent.stderr
        # The listener answers the handshake's bytes as a refused frame (not TLS), or waits for a frame: either way
        # the command says to speak in clear.
        assert "leave out --tls" in sent.stderr
        assert "WRONG_VERSION_NUMBER" in sent.stderr or "no answer within 3 s" in sent.stderr
        plain = await run_cli("--config", str(config), "send", str(order))  # the configured listener: in clear
        assert plain.returncode == 0 and "over TLS" not in plain.stderr and ": AA" in plain.stdout


def test_the_name_checked_is_the_certificates_first_dns_name_else_its_cn(pki: PKI, tmp_path: Path) -> None:
    from traboule.app.cli import _certificate_name

    assert _certificate_name(str(pki.server.cert)) == "localhost"  # DNS:localhost, IP:127.0.0.1
    assert _certificate_name(str(pki.ris.cert)) == "ris.example"  # no alternative name: the CN
    assert _certificate_name(str(tmp_path / "missing.pem")) == ""


async def test_send_presents_no_certificate_to_a_listener_where_client_ones_are_optional(
    tmp_path: Path, pki: PKI
) -> None:
    """Its own certificate (a server one here, no clientAuth) would fail a handshake the listener lets through
    without one."""
    listener = {"client_certs": "optional", "cert_file": str(pki.server.cert), "key_file": str(pki.server.key)}
    async with tls_engine(tmp_path, pki, tls=dict(listener)) as engine:
        config = cli_config(tmp_path / "cli.toml", tmp_path, mllp_port(engine), pki, listener)
        order = tmp_path / "order.hl7"
        order.write_bytes(ORDER)
        sent = await run_cli("--config", str(config), "send", str(order))
        assert sent.returncode == 0 and ": AA" in sent.stdout and "over TLS" in sent.stderr, sent.stderr
