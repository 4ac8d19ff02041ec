"""FHIRClient against a real FHIR R4 server (medplum's in-memory router, tests/fhir_server) and canned failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.peer_dcmtk import free_port
from tests.tls_pki import PKI, pki  # noqa: F401 (fixture)
from traboule.adapters.fhir_client import (
    FHIRClient,
    FHIRServerError,
    conditional_create,
    conditional_update,
    identifier_search,
    new_full_url,
    outcome_text,
)
from traboule.app.config import destination_tls
from traboule.tls import TLSSettings, server_context

INS_SYSTEM = "urn:oid:1.2.250.1.213.1.4.10"  # French national health identifier (INS-NIR)
INS_VALUE = str(uuid.uuid4().int)[:15]  # unique per run: the test server is shared by the session
ACCESSION_SYSTEM = "urn:oid:1.2.250.1.999.1.1.1"


def order_entries(accession: str, status: str, *, ins: str = INS_VALUE) -> list[dict]:
    """A Patient (conditional create on its INS) and its ServiceRequest (conditional update on the accession)."""
    patient_url = new_full_url()
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": INS_SYSTEM, "value": ins}],
        "name": [{"family": "DUPONT", "given": ["Marie"]}],
        "gender": "female",
        "birthDate": "1979-03-15",
    }
    order = {
        "resourceType": "ServiceRequest",
        "identifier": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "system": ACCESSION_SYSTEM,
                "value": accession,
            }
        ],
        "status": status,
        "intent": "order",
        "code": {"text": "IRM genou droit"},
        "subject": {"reference": patient_url},
    }
    return [
        conditional_create(patient, identifier_search(INS_SYSTEM, ins), full_url=patient_url),
        conditional_update(order, f"ServiceRequest?{identifier_search(ACCESSION_SYSTEM, accession)}"),
    ]


@pytest.fixture
async def fhir(fhir_server_url: str) -> AsyncIterator[FHIRClient]:
    async with FHIRClient(fhir_server_url, timeout=5.0) as client:
        yield client


async def test_redelivered_transaction_creates_once_then_updates(fhir: FHIRClient) -> None:
    accession = f"ACC-{uuid.uuid4().hex[:10]}"
    first = await fhir.transaction(order_entries(accession, "active"))
    assert first["type"] == "transaction-response"
    assert [e["response"]["status"][:3] for e in first["entry"]] == ["201", "201"]
    patient_id = first["entry"][0]["resource"]["id"]
    order_id = first["entry"][1]["resource"]["id"]
    # the urn:uuid: reference was rewritten to the Patient created in the same transaction
    assert first["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"

    second = await fhir.transaction(order_entries(accession, "revoked"))
    assert [e["response"]["status"][:3] for e in second["entry"]] == ["200", "200"]
    assert second["entry"][0]["resource"]["id"] == patient_id
    assert second["entry"][1]["resource"]["id"] == order_id

    patients = await fhir.search("Patient", {"identifier": f"{INS_SYSTEM}|{INS_VALUE}"})
    assert patients["total"] == 1
    orders = await fhir.search("ServiceRequest", {"identifier": f"{ACCESSION_SYSTEM}|{accession}"})
    assert orders["total"] == 1
    order = await fhir.read("ServiceRequest", order_id)
    assert order["status"] == "revoked"
    assert order["subject"]["reference"] == f"Patient/{patient_id}"
    assert (await fhir.read("Patient", patient_id))["identifier"][0]["value"] == INS_VALUE


async def test_invalid_resource_is_a_permanent_error_with_the_operation_outcome(fhir: FHIRClient) -> None:
    ins = uuid.uuid4().hex
    entries = order_entries(f"ACC-{uuid.uuid4().hex[:10]}", "active", ins=ins)
    entries[0]["resource"]["birthDate"] = "15/03/1979"
    with pytest.raises(FHIRServerError) as caught:
        await fhir.transaction(entries)
    error = caught.value
    assert 400 <= error.status < 500
    assert error.retryable is False
    assert error.operation_outcome is not None
    assert error.operation_outcome["resourceType"] == "OperationOutcome"
    assert error.operation_outcome["issue"][0]["severity"] == "error"
    assert "birthDate" in outcome_text(error.operation_outcome)
    # nothing was written
    assert (await fhir.search("Patient", {"identifier": f"{INS_SYSTEM}|{ins}"}))["total"] == 0


async def test_read_of_a_missing_resource_is_not_retryable(fhir: FHIRClient) -> None:
    with pytest.raises(FHIRServerError) as caught:
        await fhir.read("Patient", str(uuid.uuid4()))
    assert caught.value.status == 404
    assert caught.value.retryable is False
    assert caught.value.operation_outcome is not None


async def test_server_down_is_retryable() -> None:
    async with FHIRClient(f"http://127.0.0.1:{free_port()}/fhir/R4", timeout=2.0) as client:
        with pytest.raises(FHIRServerError) as caught:
            await client.transaction(order_entries("ACC-DOWN", "active"))
    assert caught.value.retryable is True
    assert caught.value.status == 0


async def _canned_server(respond: Callable[[], bytes | None]) -> tuple[asyncio.Server, str]:
    """A loopback HTTP server answering every request with ``respond()`` (None: no answer until the client hangs up)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        answer = respond()
        if answer is None:
            await reader.read()  # until the client gives up and closes
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/fhir/R4"


def _http(status: int, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/fhir+json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + payload


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (500, True), (429, True), (422, False), (409, False)])
async def test_status_classification(status: int, retryable: bool) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
    server, url = await _canned_server(lambda: _http(status, outcome))
    try:
        async with FHIRClient(url, timeout=2.0) as client:
            with pytest.raises(FHIRServerError) as caught:
                await client.transaction(order_entries("ACC-CANNED", "active"))
    finally:
        server.close()
    assert caught.value.status == status
    assert caught.value.retryable is retryable
    assert caught.value.operation_outcome == outcome


async def test_timeout_is_retryable() -> None:
    server, url = await _canned_server(lambda: None)
    try:
        async with FHIRClient(url, timeout=0.3) as client:
            with pytest.raises(FHIRServerError) as caught:
                await client.search("Patient", {"identifier": "x|y"})
    finally:
        server.close()
    assert caught.value.retryable is True
    assert "timeout" in str(caught.value)


async def _tls_front(url: str, settings: TLSSettings) -> tuple[asyncio.Server, str]:
    """A TLS front for the FHIR test server at ``url`` (which serves plain HTTP): the bytes of each TLS connection
    piped to it. Returns the server and the https base URL."""
    target = httpx.URL(url)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.host, target.port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(settings))
    port = server.sockets[0].getsockname()[1]
    return server, f"https://localhost:{port}{target.path}"


async def test_tls_settings_of_the_destination(fhir_server_url: str, pki: PKI) -> None:  # noqa: F811
    """``tls = { ca_file }`` of the destination (over the ``[tls]`` defaults) reaches a server of that CA and
    refuses one of another; the older ``ca_file`` key of the destination still works."""
    served = TLSSettings(enabled=True, cert_file=str(pki.server.cert), key_file=str(pki.server.key))
    server, url = await _tls_front(fhir_server_url, served)
    try:
        for destination in ({"tls": {"ca_file": str(pki.ca)}}, {"ca_file": str(pki.ca)}):
            tls = destination_tls({"base_url": url, **destination}, "channel fhir: destination", TLSSettings())
            async with FHIRClient(url, timeout=5.0, tls=tls) as client:
                found = await client.search("Patient", {"identifier": f"urn:oid:1.2.3|{uuid.uuid4().hex}"})
                assert found["resourceType"] == "Bundle"
        trusting_another = destination_tls({"tls": {"ca_file": str(pki.other_ca)}}, "destination", TLSSettings())
        async with FHIRClient(url, timeout=5.0, tls=trusting_another) as client:
            with pytest.raises(FHIRServerError) as caught:
                await client.search("Patient", {"identifier": "x|y"})
            assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value) or "ConnectError" in str(caught.value)
        # Nothing on the destination: the [tls] defaults' CA.
        defaults = TLSSettings(ca_file=str(pki.ca))
        async with FHIRClient(url, timeout=5.0, tls=destination_tls({}, "destination", defaults)) as client:
            assert (await client.search("Patient", {"identifier": "x|y"}))["resourceType"] == "Bundle"
    finally:
        server.close()
