"""The audit trail's events (IHE ATNA, `traboule.audit`) where the engine handles patient data: HL7 messages received
over real MLLP (orders, cancels, merges, refusals), FHIR / MHD searches, reads and retrieves over real HTTP, the
console's pages, a DMP submission to the loopback XDS.b endpoint, a document fed to a DRIMbox over MLLP.

The events are taken by a recording trail set as the runtime's ``audit`` attribute once it has started (the seam
`traboule.audit.trail_of` reads at each record), and checked to survive the durable queue's JSON round trip."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import shared_path
from tests.test_console import READER, found, login, open_console
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_mpps import Ris
from tests.test_reports import report_of, study
from tests.test_xds import channel_config, level3
from tests.xds_endpoint import PKI, Reply, XDSEndpoint, make_pki
from traboule import audit
from traboule.adapters.mllp import MLLPListener
from traboule.app.config import ApiToken, Config
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.model import Envelope

pytestmark = pytest.mark.timeout(90)

IPP = audit.PatientRef("IPP0001", "1.2.250.1.999.1.1")
INS = audit.PatientRef("279035121518989", "1.2.250.1.213.1.4.10")
GATEWAY = "gateway-token-0123456789abcdef"


class Recording:
    """A trail that keeps what it is given, each event checked to survive the durable queue's JSON."""

    def __init__(self) -> None:
        self.events: list[audit.AuditEvent] = []

    def record(self, event: audit.AuditEvent) -> None:
        data = json.loads(json.dumps(event.as_dict()))
        assert audit.AuditEvent.from_dict(data) == event
        self.events.append(event)

    def of(self, kind: str, **fields: Any) -> list[audit.AuditEvent]:
        return [e for e in self.events if e.kind == kind and all(getattr(e, k) == v for k, v in fields.items())]


@contextlib.contextmanager
def recording(runtime: Runtime) -> Iterator[Recording]:
    """The runtime's trail replaced by a `Recording` (after start: a runtime may make its own there), then put
    back for its stop."""
    before = getattr(runtime, "audit", None)
    trail = Recording()
    runtime.audit = trail  # type: ignore[attr-defined]
    try:
        yield trail
    finally:
        runtime.audit = before  # type: ignore[attr-defined]


def objects(event: audit.AuditEvent) -> set[tuple[str, str]]:
    return {(o.kind, o.value) for o in event.objects}


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


# -- HL7 messages received ------------------------------------------------------------------------------------------


async def test_an_order_its_cancel_and_a_merge_are_recorded_with_their_patients(engine: Runtime) -> None:
    with recording(engine) as trail:
        assert [ack_code(a) for a in await send(engine, fixture("orm_o01_nw_latin1.hl7"))] == ["AA"]
        (new,) = trail.of("order-record")
        assert new.action == "C" and new.outcome == audit.Outcome.SUCCESS
        assert new.requestor is not None
        assert (new.requestor.user_id, new.requestor.address) == ("RIS|CHU-LYON", "127.0.0.1")
        assert new.requestor.cert_subject == ""  # plain TCP: no client certificate
        assert {IPP, INS} <= set(new.patients)
        assert {("message", "MSG0001"), ("accession", "ACC0001"), ("order", "PLC0001"), ("order", "FIL0001")} <= (
            objects(new)
        )

        assert [ack_code(a) for a in await send(engine, fixture("orm_o01_ca.hl7"))] == ["AA"]
        cancel = trail.of("order-record")[1]
        assert cancel.action == "D" and ("message", "MSG0002") in objects(cancel) and IPP in cancel.patients

        assert [ack_code(a) for a in await send(engine, fixture("adt_a40_merge.hl7"))] == ["AA"]
        merged, survivor = trail.of("patient-record")
        assert merged.action == "D" and merged.patients == (IPP,)
        assert survivor.action == "U" and audit.PatientRef("IPP0009", "1.2.250.1.999.1.1") in survivor.patients
        assert merged.requestor is not None and merged.requestor.user_id == "GAM|CHU-LYON"


async def test_refused_messages_are_minor_failures_without_patient_data(engine: Runtime) -> None:
    with recording(engine) as trail:
        acks = await send(
            engine, fixture("orm_o01_no_pid3.hl7"), b"THIS IS NOT HL7", fixture("orm_o01_missing_orc2.hl7")
        )
        assert [ack_code(a) for a in acks] == ["AE", "AR", "AE"]
        failures = [e for e in trail.events if e.outcome == audit.Outcome.MINOR_FAILURE]
        assert len(failures) == 3
        for event in failures:
            assert re.fullmatch(r"message refused: A[ER](, HL7 error \d{1,4})?", event.description), event.description
        assert [e.description.split(":")[1][:3] for e in failures] == [" AE", " AR", " AE"]
        assert ("message", "MSG0040") in objects(failures[2])


async def test_hostile_identifiers_are_bounded_and_recorded(engine: Runtime) -> None:
    text = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
    hostile = text.replace("IPP0001^^^", "I" * 10_000 + "\x07\x1b[31m^^^").replace("MSG0001", "M\x01" * 300)
    with recording(engine) as trail:
        (ack,) = await send(engine, hostile.encode("latin-1"))
        assert ack_code(ack) in ("AA", "AE")
        (event,) = trail.events
        values = [p.value for p in event.patients] + [o.value for o in event.objects]
        values += [event.requestor.user_id] if event.requestor else []
        assert values and all(len(v) <= audit.MAX_VALUE and v.isprintable() for v in values)
        assert ("message", "M?" * (audit.MAX_VALUE // 2)) in objects(event)  # MSH-10 cut, control characters out
    assert audit.bounded("a\x00b\x7fc\x9f" + "x" * 1000) == "a?b?c?" + "x" * (audit.MAX_VALUE - 6)
    refs = audit.patient_refs([("I" * 10_000, "\x1b&ISO")] * 3 + [(str(n), "") for n in range(500)])
    assert refs[0] == audit.PatientRef("I" * audit.MAX_VALUE, "?&ISO") and len(refs) == audit.MAX_REFS


# -- FHIR and MHD over HTTP -----------------------------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    cfg.named_tokens = [ApiToken("pacs-gateway", "read", token=GATEWAY)]
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    headers = {"Authorization": f"Bearer {GATEWAY}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/fhir", headers=headers, timeout=10) as client:
            yield runtime, client
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_fhir_search_read_and_mhd_retrieve_name_the_token_and_the_client(
    api: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = api
    store = runtime.channel("fhir").store  # type: ignore[attr-defined]
    with recording(runtime) as trail:
        assert [ack_code(a) for a in await send(runtime, fixture("orm_o01_nw_latin1.hl7"))] == ["AA"]
        env = Envelope(study())
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        await until(lambda: store.count("ServiceRequest") == 1 and store.count("ImagingStudy") == 1)
        publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
        assert [ack_code(a) for a in await send(runtime, fixture("oru_r01_report.hl7"))] == ["AA"]
        (report,) = [e for e in trail.of("patient-record") if e.requestor and e.requestor.user_id.startswith("RIS")]
        assert report.action == "C" and ("document", "1.2.250.1.999.1.2.3.4.1.1") in objects(report)
        await until(lambda: store.count("DocumentReference") == 1)

        response = await client.get("/ServiceRequest", params={"patient.identifier": "IPP0001"})
        assert response.status_code == 200 and response.json()["total"] == 1
        (query,) = trail.of("query")
        assert query.requestor == audit.Actor("pacs-gateway", "127.0.0.1", user_name="read")
        assert query.transaction == "" and IPP in query.patients and INS in query.patients
        assert b"patient.identifier=IPP0001" in query.objects[0].detail

        request_id = response.json()["entry"][0]["resource"]["id"]
        assert (await client.get(f"/ServiceRequest/{request_id}")).status_code == 200
        (read,) = trail.of("patient-record", action="R")
        assert read.requestor is not None and read.requestor.user_id == "pacs-gateway"
        assert IPP in read.patients and ("resource", f"ServiceRequest/{request_id}") in objects(read)

        found_docs = await client.get("/DocumentReference", params={"patient.identifier": "IPP0001"})
        (reference,) = [e["resource"] for e in found_docs.json()["entry"]]
        assert trail.of("query")[-1].transaction == "ITI-67" and INS in trail.of("query")[-1].patients
        retrieved = await client.get(reference["content"][0]["attachment"]["url"])
        assert retrieved.status_code == 200 and retrieved.content.startswith(b"<?xml")
        (export,) = trail.of("export")
        assert export.transaction == "ITI-68" and export.requestor == export.destination
        assert export.requestor is not None and export.requestor.user_id == "pacs-gateway"
        binary = ("resource", reference["content"][0]["attachment"]["url"].rsplit("/fhir/", 1)[1])
        assert objects(export) == {binary, ("document", "1.2.250.1.999.1.2.3.4.1.1")}  # from its DocumentReference
        assert {IPP, INS} <= set(export.patients)

        assert (await client.get("/ServiceRequest", params={"patient.identifier": "nobody"})).json()["total"] == 0
        assert trail.of("query")[-1].patients == ()  # nothing shown: no patient named


# -- the console ----------------------------------------------------------------------------------------------------


async def test_a_refused_console_login_is_an_authentication_failure_without_the_token(tmp_path: Path) -> None:
    async with open_console(tmp_path) as (runtime, client):
        with recording(runtime) as trail:
            refused = await login(client, "not-a-token-of-this-engine")
            assert refused.status_code == 401
            (failed,) = trail.of("user-authentication")
            assert failed.outcome == audit.Outcome.MINOR_FAILURE and failed.description == "console login refused"
            assert failed.requestor == audit.Actor("anonymous", "127.0.0.1")
            assert "not-a-token" not in repr(failed.as_dict())


async def test_console_message_page_and_search_name_the_operator(tmp_path: Path) -> None:
    async with open_console(tmp_path) as (runtime, client):
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        with recording(runtime) as trail:
            await login(client, READER)
            link = await found(client, {"control_id": "MSG0001"})
            searched = trail.of("query")[-1]
            assert searched.requestor == audit.Actor("ris-team", "127.0.0.1", user_name="read")
            assert b"control_id=MSG0001" in searched.objects[0].detail
            page = await client.get(f"/console/messages/{link.group(1)}")
            assert page.status_code == 200
            (read,) = trail.of("patient-record", action="R")
            assert read.requestor == audit.Actor("ris-team", "127.0.0.1", user_name="read")
            assert {IPP, INS} <= set(read.patients) and objects(read) == {("message", "MSG0001")}

            worklist = runtime.channel("worklist").store  # type: ignore[attr-defined]
            await until(lambda: worklist.count() == 1)
            shown = await client.get("/console/worklist", params={"date": ""})
            assert shown.status_code == 200 and "ACC0001" in shown.text
            listed = trail.of("query")[-1]
            assert listed.patients == (audit.PatientRef("IPP0001", "CHU-LYON"),)
            assert b"accession" not in listed.objects[0].detail and b"channel=worklist" in listed.objects[0].detail

            # A message with a PID-3 of 10,000 characters and control characters (refused, journaled): its page is
            # read with the identifiers cut.
            text = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
            hostile = text.replace("IPP0001^^^", "I" * 10_000 + "\x07\x1b[31m^^^").replace("MSG0001", "MSG0666")
            assert [ack_code(a) for a in await send(runtime, hostile.encode("latin-1"))] == ["AE"]
            link = await found(client, {"control_id": "MSG0666"})
            assert (await client.get(f"/console/messages/{link.group(1)}")).status_code == 200
            cut = trail.of("patient-record", action="R")[-1]
            assert audit.PatientRef("I" * audit.MAX_VALUE, "1.2.250.1.999.1.1") in cut.patients and INS in cut.patients


# -- exports --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("audit-pki"))


@pytest.fixture
def endpoint(pki: PKI) -> Iterator[XDSEndpoint]:
    server = XDSEndpoint(pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_dmp_submission_is_an_iti41_export_to_the_repository_host(
    tmp_path: Path, pki: PKI, endpoint: XDSEndpoint
) -> None:
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[channel_config(pki, endpoint, max_attempts=3)]))
    await runtime.start()
    try:
        with recording(runtime) as trail:
            doc = level3()
            env = Envelope(doc, source="test")
            await runtime.bus.publish("document.publish", env.to_json(), message_id=env.id)
            await until(lambda: bool(trail.of("export")))
            (export,) = trail.of("export")
            assert export.transaction == "ITI-41" and export.outcome == audit.Outcome.SUCCESS
            assert export.destination is not None and export.destination.user_id == "127.0.0.1"
            assert ("document", doc.id) in objects(export)
            assert [o.kind for o in export.objects] == ["document", "submission-set"] and export.objects[1].value
            assert INS in export.patients

            endpoint.replies.append(Reply("failure", "XDSRegistryMetadataError"))
            other = level3(2)  # its replacement, refused by the registry
            env = Envelope(other, source="test")
            await runtime.bus.publish("document.publish", env.to_json(), message_id=env.id)
            await until(lambda: len(trail.of("export")) == 2)
            refused = trail.of("export")[1]
            assert refused.outcome == audit.Outcome.SERIOUS_FAILURE and ("document", other.id) in objects(refused)
            assert refused.description == "ITI-41 not registered: HTTP 200, XDSRegistryMetadataError"
    finally:
        await runtime.stop()


async def test_a_document_fed_to_a_drimbox_is_an_export_to_its_host(tmp_path: Path) -> None:
    receiver = Ris()
    receiver.listener = MLLPListener(receiver.handle, port=0, name="drimbox")
    await receiver.listener.start()
    destination = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": receiver.listener.port, "timeout": 5}
    channel = {"name": "drimbox", "kind": "hl7-documents", "destination": destination, "retry_window": 0}
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[channel]))
    await runtime.start()
    try:
        with recording(runtime) as trail:
            doc = level3()
            env = Envelope(doc, source="test")
            await runtime.bus.publish("document.publish", env.to_json(), message_id=env.id)
            await until(lambda: bool(trail.of("export")))
            (export,) = trail.of("export")
            assert export.transaction == "" and export.outcome == audit.Outcome.SUCCESS
            assert export.destination == audit.Actor("127.0.0.1", "127.0.0.1", user_name="DRIMBOX|")
            assert ("document", doc.id) in objects(export) and INS in export.patients
            (sent,) = receiver.accepted()
            assert ("message", sent.control_id) in objects(export)
    finally:
        await runtime.stop()
        await receiver.listener.stop()


async def test_dead_letters_replayed_and_discarded_are_operator_actions(tmp_path: Path) -> None:
    from tests.test_console import csrf_of
    from tests.test_console_actions import OPERATOR, dead_letters, with_tokens
    from tests.test_console_actions import engine as actions_engine
    from tests.test_console_actions import login as operator_login
    from tests.test_reprocess import write_config

    async with actions_engine(with_tokens(write_config(tmp_path, fhir=False))) as (runtime, client):
        await runtime.bus.send("worklist", [("order.new", b"{}", "dl-1", {}), ("order.new", b"\xff", "dl-2", {})])
        await dead_letters(runtime, 2)
        with recording(runtime) as trail:
            await operator_login(client, OPERATOR)
            csrf = csrf_of(await client.get("/console/dead-letters/worklist"))
            replay = {"csrf": csrf, "message_id": "dl-1", "reason": "fixed"}
            assert (await client.post("/console/dead-letters/worklist/replay", data=replay)).status_code == 303
            discard = {"csrf": csrf, "message_id": "dl-2", "reason": "garbage"}
            assert (await client.post("/console/dead-letters/worklist/discard", data=discard)).status_code == 303
            replayed, discarded = trail.of("patient-record")
            operator = audit.Actor("night-shift", "127.0.0.1", user_name="operate")
            assert (replayed.action, replayed.subtype, replayed.requestor) == ("U", "dead-letter-replay", operator)
            assert (discarded.action, discarded.subtype, discarded.requestor) == ("D", "dead-letter-discard", operator)
            assert objects(replayed) == {("bus-message", "worklist/dl-1")}
            assert objects(discarded) == {("bus-message", "worklist/dl-2")} and discarded.patients == ()
            assert "fixed" not in replayed.description and "garbage" not in discarded.description
