"""DICOM TLS (PS3.15 Annex B, BCP 195) on the MWL and MPPS SCPs, against dcmtk's echoscu / findscu with client
certificates from a test PKI, and the audit events the two SCPs record (C-FIND, MPPS, certificates refused)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pydicom import dcmread
from pydicom.filereader import read_dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

from tests.peer_dcmtk import MWL_RETURN_KEYS, free_port, mwl_item, require_dcmtk, with_keys
from tests.test_flow import engine_config, fixture, send, store, until
from tests.test_mpps import completed, in_progress
from tests.tls_pki import (
    PKI,
    Pair,
    pki,  # noqa: F401 (fixture)
)
from traboule.adapters.dicom_mwl import WorklistSCP
from traboule.adapters.dicom_server import SCPLimits
from traboule.app.runtime import Runtime
from traboule.audit import AuditEvent, Outcome
from traboule.channels.mpps import MPPSChannel
from traboule.channels.worklist import WorklistChannel
from traboule.errors import ConfigError
from traboule.stores.worklist import WorklistStore
from traboule.tls import TLSSettings, client_context, server_context

pytestmark = pytest.mark.dcmtk

AET = "TRABOULE"
HOST = "127.0.0.1"


class RecordingTrail:
    """An audit trail that keeps what it is given (the trail protocol: ``record`` returns at once)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)

    def of(self, kind: str, subtype: str = "") -> list[AuditEvent]:
        return [e for e in self.events if e.kind == kind and (not subtype or e.subtype == subtype)]


class Tee(RecordingTrail):
    """The engine's own trail, with what is recorded on it also kept here."""

    def __init__(self, trail: Any) -> None:
        super().__init__()
        self.trail = trail

    def record(self, event: AuditEvent) -> None:
        super().record(event)
        self.trail.record(event)

    def __getattr__(self, name: str) -> Any:  # start, flush, stopping, close...
        return getattr(self.trail, name)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)
    return value


def base_tls(site: PKI, **changes: Any) -> TLSSettings:
    """The ``[tls]`` defaults of a site: the server certificate, the CA that signs the modalities' certificates."""
    settings = TLSSettings(
        cert_file=str(site.server.cert),
        key_file=str(site.server.key),
        ca_file=str(site.ca),
        client_certs="required",
    )
    return replace(settings, **changes)


def tls_args(site: PKI, client: Pair | None) -> list[str]:
    """dcmtk's TLS options: the client's key and certificate, the CA trusted for the server's, the BCP 195 profile."""
    if client is None:
        return []
    return ["+tls", str(client.key), str(client.cert), "+cf", str(site.ca), "+px"]


def echo(site: PKI, port: int, client: Pair | None, aet: str = "MODALITY1") -> subprocess.CompletedProcess[str]:
    require_dcmtk("echoscu")
    args = ["echoscu", "-to", "5", "-ta", "5", *tls_args(site, client), "-aet", aet, "-aec", AET, HOST, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def find(site: PKI, port: int, client: Pair, keys: list[str], aet: str = "MODALITY1") -> tuple[int, list[Any], str]:
    """findscu -W over TLS: (exit code, the response identifiers, the output)."""
    require_dcmtk("findscu")
    with tempfile.TemporaryDirectory(prefix="findscu-tls-") as folder:
        out = Path(folder)
        args = ["findscu", "-W", "-X", "-od", str(out), "-to", "5", "-ta", "10", "-td", "20"]
        args += [*tls_args(site, client), "-aet", aet, "-aec", AET]
        for key in keys:
            args += ["-k", key]
        proc = subprocess.run([*args, HOST, str(port)], capture_output=True, text=True, timeout=60, check=False)
        datasets = [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]
    return proc.returncode, datasets, proc.stdout + proc.stderr


# -- the worklist channel's SCP over TLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trail() -> RecordingTrail:
    return RecordingTrail()


@pytest.fixture(scope="module")
def worklist(
    pki: PKI,  # noqa: F811
    trail: RecordingTrail,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorklistChannel]:
    """The worklist channel's MWL SCP, configured as a site would: ``tls = true`` over the ``[tls]`` defaults, CT01
    bound to the modality's certificate; one item in its store."""
    require_dcmtk("echoscu", "findscu")
    runtime = SimpleNamespace(
        config=SimpleNamespace(path=None, tls=base_tls(pki), tls_reload_interval=60.0),
        data_dir=tmp_path_factory.mktemp("tls-worklist"),
        audit=trail,
    )
    entry = {
        "adapter": "mwl-scp",
        "port": free_port(),
        "tls": True,
        "ae_certificates": {"CT01": "CN=ct01.example"},
        "tls_handshake_timeout": 1,
    }
    channel = WorklistChannel({"name": "worklist", "destinations": [entry]}, runtime)
    channel.store.apply([("o1#1", mwl_item())], [])
    [scp] = channel.scps
    scp.start()
    yield channel
    scp.stop()
    channel.store.close()


@pytest.fixture
def events(trail: RecordingTrail) -> RecordingTrail:
    trail.events.clear()
    return trail


def scp_port(channel: WorklistChannel) -> int:
    return channel.scps[0].port


def test_echo_over_tls_with_a_client_certificate(pki: PKI, worklist: WorklistChannel) -> None:  # noqa: F811
    result = echo(pki, scp_port(worklist), pki.ris)
    assert result.returncode == 0, result.stdout + result.stderr


def test_findscu_over_tls_gets_the_worklist_and_the_query_is_audited(
    pki: PKI,  # noqa: F811
    worklist: WorklistChannel,
    events: RecordingTrail,
) -> None:
    code, datasets, output = find(pki, scp_port(worklist), pki.ris, with_keys("AccessionNumber=ACC0001"))
    assert code == 0, output
    [ds] = datasets
    assert (ds.AccessionNumber, ds.PatientID, ds.PatientName) == ("ACC0001", "PID12345", "DUPONT^Hélène")

    [event] = wait_for(lambda: events.of("query"))
    assert event.transaction == "RAD-5" and event.outcome == Outcome.SUCCESS
    assert [(p.value, p.authority) for p in event.patients] == [("PID12345", "CHU-X")]
    requestor = event.requestor
    assert requestor is not None
    assert (requestor.ae_title, requestor.user_id, requestor.address) == ("MODALITY1", "MODALITY1", HOST)
    assert requestor.cert_subject == pki.ris.subject
    # The query itself: the identifier the modality sent, as it sent it (findscu: Implicit VR Little Endian).
    [query] = event.objects
    assert query.kind == "query"
    identifier = read_dataset(BytesIO(query.detail), is_implicit_VR=True, is_little_endian=True)
    assert identifier.AccessionNumber == "ACC0001"
    assert identifier.PatientName == "" and "ScheduledProcedureStepSequence" in identifier


def test_a_query_that_returns_nothing_is_audited_without_patients(
    pki: PKI,  # noqa: F811
    worklist: WorklistChannel,
    events: RecordingTrail,
) -> None:
    code, datasets, output = find(pki, scp_port(worklist), pki.modality, with_keys("AccessionNumber=NOPE"), "CT01")
    assert code == 0 and datasets == [], output
    [event] = wait_for(lambda: events.of("query"))
    assert event.patients == ()
    assert event.requestor is not None and event.requestor.cert_subject == pki.modality.subject


def test_plain_tcp_is_refused_by_a_tls_listener(pki: PKI, worklist: WorklistChannel, events: RecordingTrail) -> None:  # noqa: F811
    result = echo(pki, scp_port(worklist), None)
    assert result.returncode != 0
    assert "Association Request Failed" in result.stdout + result.stderr
    assert echo(pki, scp_port(worklist), pki.ris).returncode == 0  # the listener still serves TLS peers
    # Not a certificate refused: logged, not audited (a load balancer's TCP check would flood the trail).
    assert events.of("security-alert") == []


@pytest.mark.parametrize("who", ["stranger", "expired"])
def test_a_client_certificate_from_another_ca_or_expired_is_refused_and_audited(
    pki: PKI,  # noqa: F811
    worklist: WorklistChannel,
    events: RecordingTrail,
    who: str,
) -> None:
    result = echo(pki, scp_port(worklist), getattr(pki, who))
    assert result.returncode != 0
    [event] = wait_for(lambda: events.of("security-alert", "node-authentication"))
    assert event.outcome == Outcome.MINOR_FAILURE
    expected = "unable to get local issuer certificate" if who == "stranger" else "certificate has expired"
    assert event.description == f"client certificate refused: {expected}"
    assert event.requestor is not None and event.requestor.address == HOST


def test_tls_without_a_client_certificate_is_refused_and_audited(
    pki: PKI,  # noqa: F811
    worklist: WorklistChannel,
    events: RecordingTrail,
) -> None:
    require_dcmtk("echoscu")
    args = ["echoscu", "-to", "5", "-ta", "5", "+tla", "+cf", str(pki.ca), "+px", "-aet", "MODALITY1", "-aec", AET]
    result = subprocess.run([*args, HOST, str(scp_port(worklist))], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    [event] = wait_for(lambda: events.of("security-alert", "node-authentication"))
    assert event.description == "no client certificate" and event.outcome == Outcome.MINOR_FAILURE
    assert event.requestor is not None and (event.requestor.address, event.requestor.cert_subject) == (HOST, "")


def test_an_ae_title_bound_to_a_certificate_is_accepted_with_it_only(
    pki: PKI,  # noqa: F811
    worklist: WorklistChannel,
    events: RecordingTrail,
) -> None:
    assert echo(pki, scp_port(worklist), pki.modality, aet="CT01").returncode == 0
    assert events.of("security-alert") == []

    refused = echo(pki, scp_port(worklist), pki.ris, aet="CT01")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "Rejected Permanent" in output and "Calling AE Title Not Recognized" in output
    [event] = wait_for(lambda: events.of("security-alert", "node-authentication"))
    assert event.requestor is not None
    assert (event.requestor.ae_title, event.requestor.cert_subject) == ("CT01", pki.ris.subject)
    assert event.description == "calling AE title not bound to the client certificate"
    # An AE title bound to nothing keeps any certificate the CA signed.
    assert echo(pki, scp_port(worklist), pki.modality, aet="CT02").returncode == 0


def test_a_silent_connection_neither_blocks_the_others_nor_stays(pki: PKI, worklist: WorklistChannel) -> None:  # noqa: F811
    """The handshake runs in the connection's own thread, bounded by tls_handshake_timeout (1 s here)."""
    with socket.create_connection((HOST, scp_port(worklist))) as silent:
        started = time.perf_counter()
        result = echo(pki, scp_port(worklist), pki.ris)
        assert result.returncode == 0 and time.perf_counter() - started < 3
        silent.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""
        assert time.perf_counter() - started < 5


# -- the adapter on its own ---------------------------------------------------------------------------------------


def test_allowed_subjects_admit_only_those_certificates(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    require_dcmtk("echoscu")
    store = WorklistStore(str(tmp_path / "worklist.sqlite"))
    refused: list[tuple[Any, str]] = []
    context = server_context(base_tls(pki, enabled=True, allowed_subjects=("CN=ct01.example",)))
    scp = WorklistSCP(
        store.find,
        ae_title=AET,
        port=free_port(),
        ssl_context=context,
        allowed_subjects=("CN=ct01.example",),
        on_peer_refused=lambda peer, reason: refused.append((peer, reason)),
    )
    scp.start()
    try:
        assert echo(pki, scp.port, pki.modality).returncode == 0
        assert echo(pki, scp.port, pki.ris).returncode != 0
        [(peer, reason)] = wait_for(lambda: refused)
        assert (peer.cert_subject, reason) == (pki.ris.subject, "client certificate subject not allowed")
    finally:
        scp.stop()
        store.close()


def test_a_burst_of_connections_from_one_address_is_closed_before_its_handshake(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    require_dcmtk("echoscu")
    store = WorklistStore(str(tmp_path / "worklist.sqlite"))
    limits = SCPLimits(max_handshakes_per_second=0.5, handshake_burst=2, tls_handshake_timeout=5)
    context = server_context(base_tls(pki, enabled=True))
    scp = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=limits, ssl_context=context)
    scp.start()
    started = time.monotonic()
    sockets = [socket.create_connection((HOST, scp.port)) for _ in range(4)]
    try:
        assert echo(pki, scp.port, pki.ris).returncode != 0  # no token left for this address

        def closed_at_once(sock: socket.socket) -> bool:
            sock.settimeout(0.5)
            try:
                return sock.recv(1) == b""
            except ConnectionResetError:
                return True
            except TimeoutError:  # waiting for its handshake
                return False

        # The burst (two) wait for their handshake; the next ones are closed on accept.
        assert [closed_at_once(s) for s in sockets] == [False, False, True, True]
        time.sleep(max(0.0, started + 2.2 - time.monotonic()))  # one token back
        assert echo(pki, scp.port, pki.ris).returncode == 0
    finally:
        for sock in sockets:
            sock.close()
        scp.stop()
        store.close()


async def test_renewed_scp_certificates_are_served_without_a_restart(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    cert, key = tmp_path / "scp.pem", tmp_path / "scp.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    tls = base_tls(pki, cert_file=str(cert), key_file=str(key))
    runtime = SimpleNamespace(config=SimpleNamespace(path=None, tls=tls, tls_reload_interval=0.1), data_dir=tmp_path)
    entry = {"adapter": "mwl-scp", "port": free_port(), "tls": True}
    channel = WorklistChannel({"name": "worklist", "destinations": [entry]}, runtime)
    [scp] = channel.scps
    context = client_context(TLSSettings(cert_file=str(pki.ris.cert), key_file=str(pki.ris.key), ca_file=str(pki.ca)))

    def served() -> bytes:
        with (
            socket.create_connection((HOST, scp.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            return sock.getpeercert(binary_form=True) or b""

    scp.start()
    channel.certificates.start()
    try:
        before = await asyncio.to_thread(served)
        renewed = pki.issue("scp-renewed", "localhost", server=True, days=400)
        shutil.copy(renewed.key, key)
        shutil.copy(renewed.cert, cert)
        deadline = time.monotonic() + 5
        while (after := await asyncio.to_thread(served)) == before:
            assert time.monotonic() < deadline, "the renewed certificate is not served"
            await asyncio.sleep(0.1)
        assert after == x509.load_pem_x509_certificate(renewed.cert.read_bytes()).public_bytes(Encoding.DER)
    finally:
        await channel.certificates.stop()
        scp.stop()
        channel.store.close()


def test_tls_settings_of_an_scp_entry_are_checked(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    def build(entry: dict[str, Any], tls: TLSSettings) -> None:
        runtime = SimpleNamespace(config=SimpleNamespace(path=None, tls=tls), data_dir=tmp_path)
        channel = WorklistChannel({"name": "worklist", "destinations": [{"adapter": "mwl-scp", **entry}]}, runtime)
        channel.store.close()

    with pytest.raises(ConfigError, match=r"mwl-scp: ae_certificates needs tls"):
        build({"ae_certificates": {"CT01": "CN=ct01.example"}}, base_tls(pki))
    with pytest.raises(ConfigError, match=r"mwl-scp: ae_certificates needs tls"):
        build({"tls": {"client_certs": "none"}, "ae_certificates": {"CT01": "CN=ct01.example"}}, base_tls(pki))
    with pytest.raises(ConfigError, match=r"mwl-scp: a TLS listener needs tls.cert_file"):
        build({"tls": True}, TLSSettings())
    with pytest.raises(ConfigError, match=r"ae_certificates.CT01 must be a subject"):
        build({"tls": True, "ae_certificates": {"CT01": "ct01"}}, base_tls(pki))
    build({"tls": {"min_version": "1.3"}}, base_tls(pki))  # a table overrides the [tls] defaults


# -- the engine: worklist and MPPS over TLS, audited ---------------------------------------------------------------


class Modality:
    """A pynetdicom MPPS SCU over TLS with a client certificate (dcmtk has no MPPS SCU)."""

    def __init__(self, site: PKI, port: int, client: Pair, aet: str = "CT01") -> None:
        context = client_context(
            TLSSettings(cert_file=str(client.cert), key_file=str(client.key), ca_file=str(site.ca))
        )
        ae = AE(ae_title=aet)
        ae.add_requested_context(ModalityPerformedProcedureStep)
        ae.add_requested_context(Verification)
        self.assoc = ae.associate(HOST, port, ae_title=AET, tls_args=(context, "localhost"))

    def send(self, kind: str, uid: str, ds: Any) -> int:
        if kind == "create":
            status, _ = self.assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
        else:
            status, _ = self.assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
        return int(status.Status)

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


async def test_worklist_and_mpps_over_tls_are_audited(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    require_dcmtk("findscu")
    cfg = engine_config(tmp_path)
    cfg.tls = base_tls(pki)
    wl_port = cfg.channels[1]["destinations"][0]["port"]
    cfg.channels[1]["destinations"][0]["tls"] = True
    mpps_port = free_port()
    cfg.channels.append(
        {
            "name": "mpps",
            "kind": "mpps",
            "destinations": [
                {"adapter": "mpps-scp", "port": mpps_port, "tls": True, "ae_certificates": {"CT01": "CN=ct01.example"}}
            ],
        }
    )
    runtime = Runtime(cfg)
    await runtime.start()
    assert runtime.audit is not None
    trail = Tee(runtime.audit)
    runtime.audit = trail  # type: ignore[assignment]
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: store(runtime).count() == 1)
        ((_, item),) = list(store(runtime).all())

        code, datasets, output = await asyncio.to_thread(find, pki, wl_port, pki.modality, MWL_RETURN_KEYS, "CT01")
        assert code == 0, output
        assert [ds.AccessionNumber for ds in datasets] == [item.AccessionNumber]
        [query] = trail.of("query")
        assert [p.value for p in query.patients] == [item.PatientID]

        modality = await asyncio.to_thread(Modality, pki, mpps_port, pki.modality)
        assert modality.assoc.is_established
        uid = "1.2.826.0.1.3680043.8.498.77"
        try:
            assert await asyncio.to_thread(modality.send, "create", uid, in_progress(item)) == 0x0000
            assert await asyncio.to_thread(modality.send, "set", uid, completed()) == 0x0000
        finally:
            await asyncio.to_thread(modality.close)

        created, updated = trail.of("procedure-record")
        assert (created.action, created.transaction, updated.action, updated.transaction) == (
            "C",
            "RAD-6",
            "U",
            "RAD-7",
        )
        for event in (created, updated):
            assert event.requestor is not None
            assert (event.requestor.ae_title, event.requestor.cert_subject) == ("CT01", pki.modality.subject)
            assert [(p.value, p.authority) for p in event.patients] == [
                (item.PatientID, item.get("IssuerOfPatientID", ""))
            ]
            objects = {o.kind: o.value for o in event.objects}
            assert objects["mpps"] == uid and objects["study"] == item.StudyInstanceUID

        # The CT01 AE title with another certificate: rejected, audited, nothing recorded as performed.
        impostor = await asyncio.to_thread(Modality, pki, mpps_port, pki.ris)
        assert impostor.assoc.is_rejected
        await until(lambda: trail.of("security-alert", "node-authentication"))
        assert len(trail.of("procedure-record")) == 2

        # The engine's trail wrote them, as DICOM audit messages, to its local file.
        assert await asyncio.to_thread(trail.flush)
        lines = [json.loads(line) for line in trail.path.read_text().splitlines()]
        mine = {(r["kind"], r["transaction"]): r["xml"] for r in lines if r["kind"] != "application-activity"}
        assert {"RAD-5", "RAD-6", "RAD-7"} <= {transaction for _, transaction in mine}
        for kind, transaction in (("query", "RAD-5"), ("procedure-record", "RAD-6"), ("procedure-record", "RAD-7")):
            xml = mine[(kind, transaction)]
            assert item.PatientID in xml and "CT01" in xml
        assert uid in mine[("procedure-record", "RAD-7")]
    finally:
        await runtime.stop()


def test_mpps_channel_reads_its_tls_entry(pki: PKI, tmp_path: Path) -> None:  # noqa: F811
    runtime = SimpleNamespace(config=SimpleNamespace(tls=base_tls(pki)), data_dir=tmp_path)
    entry = {"adapter": "mpps-scp", "port": free_port(), "tls": {"allowed_subjects": ["CN=ct01.example"]}}
    channel = MPPSChannel({"name": "mpps", "destinations": [entry]}, runtime)
    try:
        [scp] = channel.scps
        assert scp.ssl_context is not None and scp.allowed_subjects == ("CN=ct01.example",)
        assert list(channel.certificates.watched) == [f"mpps:mpps-scp:{entry['port']}"]
    finally:
        channel.states.close()
        channel.identities.close()
