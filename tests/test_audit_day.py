"""A department's day on one engine with TLS on every listener, audited to a real audit record repository (rsyslog
over TLS, RFC 5425) that goes down in the middle of the day.

The engine runs the default channels configured by a file: the MLLP listener, the MWL and MPPS SCPs and the HTTP API
over TLS with client certificates (``[tls]`` defaults), CDA reports, the DMP (``xds`` channel to the loopback
XDS.b endpoint) and ``[audit] repository``. The RIS orders over MLLP-TLS, the modality queries its worklist with
dcmtk ``findscu +tls``; then the repository stops; the modality performs the step (MPPS over TLS, pynetdicom), the
RIS sends the report, the engine submits its CDA to the DMP, a gateway searches and retrieves it over MHD (HTTPS, a
bearer token); then the repository comes back on the same port. What it received is checked: every kind of event of
the day with its participants, patients and objects, each message valid against the schema of PS3.15 A.5.1, and
every message of the engine's local ``audit.log`` there at least once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from pydicom.dataset import Dataset

from tests.conftest import shared_path
from tests.peer_dcmtk import require_dcmtk, with_keys
from tests.peer_rsyslog import RSyslog, free_port, require_rsyslog
from tests.test_audit import SCHEMA
from tests.test_dicom_tls import Modality, find
from tests.test_flow import ack_code, fixture
from tests.test_mpps import completed, in_progress
from tests.test_reports import report_of
from tests.test_xds import channel_config
from tests.tls_pki import PKI, pki  # noqa: F401 (fixture)
from tests.xds_endpoint import XDSEndpoint
from tests.xds_endpoint import make_pki as make_dmp_pki
from traboule.adapters.mllp import MLLPClient
from traboule.adapters.syslog import BOM
from traboule.app import audit_trail
from traboule.app.config import load
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.formats import hl7
from traboule.stores.audit_queue import AuditQueue
from traboule.tls import TLSSettings, client_context

pytestmark = pytest.mark.timeout(120)

GATEWAY = "pacs-gateway-token-0123456789abcdef"
IPP = "IPP0001^^^&1.2.250.1.999.1.1&ISO"  # PID-3 of the order and the report, as a CX with its OID
INS = "279035121518989^^^&1.2.250.1.213.1.4.10&ISO"  # the INS the report carries
ACCESSION = "ACC0001"
RIS = "RIS|CHU-LYON"  # MSH-3|MSH-4 of the order and the report (ITI-8 style)
PERFORMED = "1.2.826.0.1.3680043.8.498.4242"  # the MPPS SOP Instance UID (its images: .1, .2)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ACSN, DOCUMENT_ID, MPPS, URI = "ACSN", "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab", "MPPS", "12"  # ID type codes

CONFIG = """\
[engine]
data_dir = "{data}"

[tls]
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{ca}"
client_certs = "required"

[http]
tls = true
tokens = [{{ name = "pacs-gateway", token = "{token}", role = "read" }}]

[audit]
repository = "127.0.0.1:{arr}"
tls = {{ server_name = "localhost" }}
source_id = "traboule-day"
enterprise_site_id = "CHU-TEST"

[[channels]]
name = "ris-orders"
source = {{ port = {mllp}, tls = true }}
reports = {{ validate = false }}

[[channels]]
name = "worklist"
destinations = [{{ adapter = "mwl-scp", host = "127.0.0.1", port = {mwl}, ae_title = "TRABOULE", tls = true }}]

[[channels]]
name = "mpps"
destinations = [{{ adapter = "mpps-scp", host = "127.0.0.1", port = {mpps}, ae_title = "TRABOULE", tls = true }}]
"""


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay retries the repository every 0.2 to 0.5 s (1 to 30 s in service)."""
    monkeypatch.setattr(audit_trail, "MIN_BACKOFF_S", 0.2)
    monkeypatch.setattr(audit_trail, "MAX_BACKOFF_S", 0.5)


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        await asyncio.sleep(0.05)
    return value


# -- what the repository received ----------------------------------------------------------------------------------


def received(server: RSyslog) -> dict[bytes, etree._Element]:
    """The audit messages the repository received (its XML → the parsed message), each checked: RFC 5424 header
    with the IHE MSGID, BOM, XML valid against the schema of PS3.15 A.5.1."""
    found: dict[bytes, etree._Element] = {}
    for raw in server.messages():
        header, sep, xml = raw.partition(BOM)
        assert sep, raw[:200]
        pri_version, _ts, _host, app, _pid, msgid, sd, rest = header.decode("ascii").split(" ")
        assert (pri_version, app, msgid, sd, rest) == ("<85>1", "traboule", "IHE+RFC-3881", "-", ""), header
        root = etree.fromstring(xml)
        assert SCHEMA.validate(root), (SCHEMA.error_log, xml[:500])
        found[xml] = root
    return found


def code(root: etree._Element, path: str) -> str:
    element = root.find(path)
    return "" if element is None else str(element.get("csd-code"))


def events(messages: dict[bytes, etree._Element], event_id: str, action: str = "", type_code: str = "") -> list[Any]:
    """The messages of one event (EventID), action and event type (an IHE transaction, a subtype) if given."""
    return [
        m
        for m in messages.values()
        if code(m, "EventIdentification/EventID") == event_id
        and (not action or m.find("EventIdentification").get("EventActionCode") == action)
        and (not type_code or type_code in m.xpath("EventIdentification/EventTypeCode/@csd-code"))
    ]


def one(found: list[etree._Element], what: str) -> etree._Element:
    assert len(found) == 1, f"{what}: {len(found)} messages"
    return found[0]


def requestor(root: etree._Element) -> dict[str, str]:
    (participant,) = root.xpath("ActiveParticipant[@UserIsRequestor='true']")
    return dict(participant.attrib)


def patients(root: etree._Element) -> set[str]:
    return set(root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']/@ParticipantObjectID"))


def objects(root: etree._Element, id_type: str) -> set[str]:
    """The ParticipantObjectIDs of the objects whose ID type code is ``id_type``."""
    path = f"ParticipantObjectIdentification[ParticipantObjectIDTypeCode/@csd-code='{id_type}']/@ParticipantObjectID"
    return set(root.xpath(path))


# -- the peers' side ---------------------------------------------------------------------------------------------


def client_tls(site: PKI, who: str) -> ssl.SSLContext:
    pair = getattr(site, who)
    return client_context(
        TLSSettings(enabled=True, ca_file=str(site.ca), cert_file=str(pair.cert), key_file=str(pair.key))
    )


async def send_mllp(port: int, context: ssl.SSLContext, message: bytes) -> str:
    async with MLLPClient("127.0.0.1", port, timeout=10, ssl=context) as mllp:
        return ack_code(hl7.parse(hl7.decode(await mllp.send(message)).text))


def perform(site: PKI, port: int, item: Any) -> None:
    """The modality (CT01, its certificate) performs the item: N-CREATE IN PROGRESS, N-SET COMPLETED with a series
    of two images (what the report's DICOM object catalog is made of)."""
    done = completed()
    images = []
    for n in (1, 2):
        image = Dataset()
        image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID = CT_IMAGE, f"{PERFORMED}.{n}"
        images.append(image)
    done.PerformedSeriesSequence[0].ReferencedImageSequence = images
    modality = Modality(site, port, site.modality)
    assert modality.assoc.is_established
    try:
        assert modality.send("create", PERFORMED, in_progress(item)) == 0x0000
        assert modality.send("set", PERFORMED, done) == 0x0000
    finally:
        modality.close()


async def stopped(http: Any) -> None:
    http.should_exit = True
    await http.task


# -- the day -------------------------------------------------------------------------------------------------------


async def test_a_day_is_on_the_audit_repository_after_its_outage(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    require_rsyslog()
    require_dcmtk("findscu")
    (tmp_path / "dmp-pki").mkdir()
    dmp_pki = make_dmp_pki(tmp_path / "dmp-pki")
    dmp = XDSEndpoint(dmp_pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    repository = RSyslog(tmp_path / "rsyslog", free_port(), pki)
    ports = {"mllp": free_port(), "mwl": free_port(), "mpps": free_port()}
    path = tmp_path / "traboule.toml"
    data = tmp_path / "var"
    path.write_text(
        CONFIG.format(
            data=data, cert=pki.server.cert, key=pki.server.key, ca=pki.ca, token=GATEWAY, arr=repository.port, **ports
        )
    )
    cfg = load(str(path), env={})
    cfg.channels.append(channel_config(dmp_pki, dmp))  # the DMP (its own PKI; the file's tables are test_xds's)
    http_port = free_port()
    async with contextlib.AsyncExitStack() as running:
        running.callback(dmp.stop)
        repository.start()
        running.callback(repository.stop)
        runtime = Runtime(cfg)
        await runtime.start()
        running.push_async_callback(runtime.stop)
        http = await serve(create_app(runtime), "127.0.0.1", http_port)
        running.push_async_callback(stopped, http)
        await until(lambda: events(received(repository), "110100", type_code="110120"), what="application start")

        # The RIS orders over MLLP-TLS (its certificate), the modality finds the item over DICOM TLS.
        assert await send_mllp(ports["mllp"], client_tls(pki, "ris"), fixture("orm_o01_nw_latin1.hl7")) == "AA"

        async def worklist() -> list[Any]:
            status, items, output = await asyncio.to_thread(
                find, pki, ports["mwl"], pki.modality, with_keys(f"AccessionNumber={ACCESSION}"), "CT01"
            )
            assert status == 0, output
            return items

        deadline = time.monotonic() + 15
        while not (items := await worklist()):
            assert time.monotonic() < deadline, "the order never reached the worklist"
        (item,) = items
        assert (item.AccessionNumber, item.PatientID) == (ACCESSION, "IPP0001")
        # The queries that found nothing are audited too; the one that found the item is on the repository.
        await until(
            lambda: [q for q in events(received(repository), "110112", type_code="RAD-5") if patients(q)],
            what="the RAD-5 query on the repository",
        )

        # The repository goes down; the day goes on.
        repository.stop()
        before_outage = len(repository.messages())
        await asyncio.to_thread(perform, pki, ports["mpps"], item)
        publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))), what="the MPPS study")
        assert await send_mllp(ports["mllp"], client_tls(pki, "ris"), fixture("oru_r01_report.hl7")) == "AA"
        (submitted,) = await until(dmp.accepted, timeout=20, what="the DMP submission")
        assert submitted.errors == [] and submitted.signature_valid

        gateway = ssl.create_default_context(cafile=str(pki.ca))
        gateway.load_cert_chain(str(pki.ris.cert), str(pki.ris.key))
        bearer = {"Authorization": f"Bearer {GATEWAY}"}
        base = f"https://127.0.0.1:{http_port}/fhir"
        async with httpx.AsyncClient(base_url=base, headers=bearer, verify=gateway, timeout=10) as mhd:
            # One search, once the document is served (a search that finds nothing would be audited too).
            store = runtime.channel("fhir").store  # type: ignore[attr-defined]
            await until(lambda: store.count("DocumentReference") == 1, what="the report on the MHD API")
            answer = await mhd.get("/DocumentReference", params={"patient.identifier": "IPP0001"})
            assert answer.status_code == 200, answer.text
            (reference,) = [e["resource"] for e in answer.json()["entry"]]
            document_id = reference["masterIdentifier"]["value"].removeprefix("urn:oid:")
            url = reference["content"][0]["attachment"]["url"]
            assert url.startswith(f"{base}/Binary/")
            retrieved = await mhd.get(url)
            assert retrieved.status_code == 200
            assert retrieved.content in submitted.documents.values()  # what the DMP got, byte for byte

        await until(lambda: runtime.audit.repository_down, what="the outage noticed")
        assert await asyncio.to_thread(runtime.audit.flush)
        queue = AuditQueue(data / "audit.sqlite")
        try:
            assert queue.depth() > 0  # waiting for the repository
        finally:
            queue.close()
        assert len(repository.messages()) == before_outage

        # Back on the same port: every message of the local file reaches it.
        repository.start()
        local = [json.loads(line) for line in (data / "audit.log").read_text(encoding="utf-8").splitlines()]
        assert all(line["xml"] for line in local)
        written = {line["xml"].encode("utf-8") for line in local}
        await until(lambda: written <= set(received(repository)), timeout=20, what="the local file on the repository")
        await until(lambda: not runtime.audit.repository_down, what="the repository back")

    messages = received(repository)
    assert len(messages) > before_outage
    ris = {"UserID": RIS, "UserName": pki.ris.subject, "NetworkAccessPointID": "127.0.0.1"}
    ct01 = {"UserID": "CT01", "AlternativeUserID": "AETITLES=CT01", "UserName": pki.modality.subject}

    start = one(events(messages, "110100", type_code="110120"), "application start")
    assert start.find("AuditSourceIdentification").get("AuditSourceID") == "traboule-day"
    assert start.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "CHU-TEST"

    order = one(events(messages, "110109", "C"), "order record")  # over MLLP-TLS: the RIS's certificate
    assert ris.items() <= requestor(order).items()
    assert IPP in patients(order) and INS in patients(order) and objects(order, ACSN) == {ACCESSION}

    (query,) = [q for q in events(messages, "110112", type_code="RAD-5") if patients(q)]
    assert ct01.items() <= requestor(query).items()  # the calling AE title and its certificate's subject
    assert {p.split("^")[0] for p in patients(query)} == {"IPP0001"}
    assert base64.b64decode(query.findtext("ParticipantObjectIdentification/ParticipantObjectQuery") or "")

    for action, transaction in (("C", "RAD-6"), ("U", "RAD-7")):
        step = one(events(messages, "110111", action, transaction), transaction)
        assert ct01.items() <= requestor(step).items()
        assert {p.split("^")[0] for p in patients(step)} == {"IPP0001"}
        assert objects(step, MPPS) == {PERFORMED}

    report = one([r for r in events(messages, "110110", "C") if requestor(r)["UserID"] == RIS], "report record")
    assert ris.items() <= requestor(report).items()
    assert {IPP, INS} <= patients(report) and objects(report, DOCUMENT_ID) == {document_id}

    submission = one(events(messages, "110106", type_code="ITI-41"), "ITI-41 export")
    assert submission.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert INS in patients(submission) and objects(submission, DOCUMENT_ID) == {document_id}
    assert submission.xpath("ActiveParticipant[RoleIDCode/@csd-code='110152']/@UserID") == ["127.0.0.1"]

    search = one(events(messages, "110112", type_code="ITI-67"), "ITI-67 query")
    assert requestor(search)["UserID"] == "pacs-gateway" and {IPP, INS} <= patients(search)

    export = one(events(messages, "110106", type_code="ITI-68"), "ITI-68 export")
    assert requestor(export)["UserID"] == "pacs-gateway"
    assert {IPP, INS} <= patients(export)  # the Binary's DocumentReference names its patient
    assert objects(export, DOCUMENT_ID) == {document_id}
    assert objects(export, URI) == {url.rsplit("/fhir/", 1)[1]}
