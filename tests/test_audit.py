"""The audit trail (IHE ATNA): DICOM PS3.15 A.5 messages checked against the schema of A.5.1, the local file, the
durable queue, and delivery over syslog TLS to a real rsyslog through an outage and an engine restart."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.conftest import ROOT
from tests.peer_rsyslog import RSyslog, free_port, require_rsyslog
from tests.test_flow import engine_config
from tests.tls_pki import PKI, pki  # noqa: F401 (fixture)
from traboule import audit
from traboule.adapters.syslog import BOM, format_message, frame
from traboule.app import audit_trail as trail_module
from traboule.app.audit_trail import AuditTrail
from traboule.app.config import AuditConfig, Config, load
from traboule.app.runtime import Runtime
from traboule.audit import Actor, ObjectRef, Outcome, PatientRef
from traboule.audit.message import MAX_MESSAGE, AuditSource, encode, patient_id
from traboule.errors import ConfigError
from traboule.stores.audit_queue import AuditQueue
from traboule.tls import TLSSettings

SCHEMA = etree.RelaxNG(etree.parse(str(ROOT / "tests" / "data" / "dicom-audit" / "audit-message.rng")))

# Hostile values: very long, control characters, XML and HL7 delimiters, non-ASCII, a lone surrogate.
LONG = "x" * 20_000
CONTROL = "a\x00b\x01c\x1b[31md\x7f\n\r\te\ufffe\ud800"
MARKUP = "</AuditMessage><!-- & ' \" ]]> ^~\\&|"
NAMES = "Éloïse Ñúñez 漢字 🩻 Ω"
HOSTILE = [LONG, CONTROL, MARKUP, NAMES, "", " "]


def valid(xml: bytes) -> etree._Element:
    root = etree.fromstring(xml)
    assert SCHEMA.validate(root), SCHEMA.error_log
    return root


def actor(text: str) -> Actor:
    return Actor(text, address=text, cert_subject=text, user_name=text, ae_title=text)


def patients(text: str) -> list[PatientRef]:
    return [PatientRef(text, text), PatientRef(text, "1.2.250.1.213.1.4.8"), PatientRef(text)]


KINDS = ["order", "accession", "study", "document", "submission-set", "message", "query", "resource", "mpps",
         "configuration", "journal-entry", "bus-message", "unknown-kind"]  # fmt: skip


def objects(text: str) -> list[ObjectRef]:
    return [ObjectRef(kind, text, text.encode("utf-8", "surrogatepass")) for kind in KINDS]


def every_event(text: str) -> Iterator[audit.AuditEvent]:
    """One event (or several) from each constructor of `traboule.audit`, every argument ``text``."""
    for kind in ("order", "patient", "report"):
        for action in ("C", "U", "D"):
            yield audit.message_received(
                kind,  # type: ignore[arg-type]
                action,  # type: ignore[arg-type]
                source=actor(text),
                patients=patients(text),
                objects=objects(text),
                outcome=Outcome.MINOR_FAILURE,
                transaction=text,
                description=text,
            )
    yield audit.exported(
        destination=actor(text), patients=patients(text), objects=objects(text), transaction="ITI-41",
        requestor=actor(text + "r"), description=text,
    )  # fmt: skip
    yield audit.exported(destination=actor(text), patients=[], objects=[], transaction=text, requestor=actor(text))
    yield audit.queried(requestor=actor(text), query=text, patients=patients(text), transaction="RAD-5")
    yield audit.queried(requestor=actor(text), query=text.encode("utf-8", "surrogatepass"), transaction=text)
    yield audit.queried(
        requestor=actor(text), query=text.encode("utf-8", "surrogatepass"), patients=patients(text),
        transaction="RAD-5", sop_class=text, transfer_syntax=text,
    )  # fmt: skip
    yield audit.read(requestor=actor(text), patients=patients(text), objects=objects(text), transaction=text)
    yield audit.performed_step("C", source=actor(text), patients=patients(text), objects=objects(text))
    yield audit.performed_step("U", source=actor(text), patients=[], objects=[], description=text)
    yield audit.application_activity("start")
    yield audit.application_activity("stop", by=actor(text))
    yield audit.configuration_changed(by=actor(text), what=text)
    yield audit.configuration_changed(by=None, what=text, outcome=Outcome.SERIOUS_FAILURE)
    yield audit.authentication_failed(user=actor(text), reason=text)
    yield audit.node_authentication_failed(peer=actor(text), reason=text)
    for what in ("reprocess", "dead-letter-replay", "dead-letter-discard"):
        yield audit.operator_action(
            "U", operator=actor(text), what=what, objects=objects(text), patients=patients(text), description=text
        )
    yield replace(audit.application_activity("start"), at=float("nan"), kind=text, action="Z")  # type: ignore[arg-type]


CONSTRUCTORS_TESTED = {
    "message_received", "exported", "queried", "read", "performed_step", "application_activity",
    "configuration_changed", "authentication_failed", "node_authentication_failed", "operator_action",
}  # fmt: skip


def test_every_constructor_is_in_the_schema_test() -> None:
    constructors = {
        name
        for name, function in inspect.getmembers(audit, inspect.isfunction)
        if function.__module__ == audit.__name__
        and not name.startswith("_")
        and inspect.signature(function).return_annotation in ("AuditEvent", audit.AuditEvent)
    }
    assert constructors == CONSTRUCTORS_TESTED  # a new constructor: add it to every_event


@pytest.mark.parametrize("text", HOSTILE, ids=["long", "control", "markup", "names", "empty", "blank"])
def test_every_event_encodes_to_a_schema_valid_message(text: str) -> None:
    sources = [AuditSource(text, text, text, text), AuditSource("", "", "", "")]
    count = 0
    for event in every_event(text):
        for source in sources:
            xml = encode(event, source)
            assert len(xml) < MAX_MESSAGE
            valid(xml)
            count += 1
    assert count == 2 * 27


def test_an_order_message_names_its_participants_and_patient() -> None:
    ris = Actor("RIS^CHU", address="10.1.2.3")
    event = audit.message_received(
        "order",
        "C",
        source=ris,
        patients=[PatientRef("12^34", "1.2.250.1.213.1.4.8"), PatientRef("99", "HOSP")],
        objects=[ObjectRef("accession", "ACC1"), ObjectRef("study", "1.2.3.4"), ObjectRef("message", "MSG1")],
        transaction="RAD-2",
    )
    root = valid(encode(event, AuditSource("engine-1", "CHU-LYON", "TRABOULE", "ris-gw.example")))
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "C" and ident.get("EventOutcomeIndicator") == "0"
    assert ident.get("EventDateTime").endswith("Z")
    assert ident.find("EventID").attrib == {
        "csd-code": "110109",
        "codeSystemName": "DCM",
        "originalText": "Order Record",
    }
    assert ident.find("EventTypeCode").get("csd-code") == "RAD-2"
    assert ident.find("EventTypeCode").get("codeSystemName") == "IHE Transactions"
    source, engine = root.findall("ActiveParticipant")
    assert source.get("UserID") == "RIS^CHU" and source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointID") == "10.1.2.3" and source.get("NetworkAccessPointTypeCode") == "2"
    assert source.find("RoleIDCode").get("csd-code") == "110153"
    assert engine.get("UserID") == "TRABOULE" and engine.get("UserIsRequestor") == "false"
    assert engine.get("AlternativeUserID").isdigit()
    assert engine.get("NetworkAccessPointTypeCode") == "1"
    assert engine.find("RoleIDCode").get("csd-code") == "110152"
    audit_source = root.find("AuditSourceIdentification")
    assert audit_source.get("AuditSourceID") == "engine-1" and audit_source.get("AuditEnterpriseSiteID") == "CHU-LYON"
    assert audit_source.find("AuditSourceTypeCode").get("csd-code") == "4"
    objs = root.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objs] == [
        "12\\S\\34^^^&1.2.250.1.213.1.4.8&ISO", "99^^^HOSP", "ACC1", "1.2.3.4", "MSG1",
    ]  # fmt: skip
    assert [(o.get("ParticipantObjectTypeCode"), o.get("ParticipantObjectTypeCodeRole")) for o in objs[:2]] == [
        ("1", "1"),
        ("1", "1"),
    ]
    assert objs[0].find("ParticipantObjectIDTypeCode").get("csd-code") == "2"
    assert objs[3].find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"


def test_start_query_and_security_events_carry_their_codes() -> None:
    start = valid(encode(audit.application_activity("start"), AuditSource("s")))
    assert start.find("EventIdentification/EventID").get("csd-code") == "110100"
    assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
    assert start.find("ActiveParticipant/RoleIDCode").get("csd-code") == "110150"
    stop = valid(encode(audit.application_activity("stop"), AuditSource("s")))
    assert stop.find("EventIdentification/EventTypeCode").get("csd-code") == "110121"
    asked = audit.queried(requestor=Actor("CT01", "10.0.0.9"), query=b"\x00(0010,0010)=*", transaction="RAD-5")
    query = valid(encode(asked, AuditSource("s")))
    assert query.find("EventIdentification/EventID").get("csd-code") == "110112"
    obj = query.find("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectTypeCodeRole") == "24"
    assert base64.b64decode(obj.findtext("ParticipantObjectQuery")) == b"\x00(0010,0010)=*"
    config = valid(encode(audit.configuration_changed(by=None, what="/etc/traboule.toml"), AuditSource("s")))
    assert config.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert config.find("EventIdentification/EventTypeCode").get("csd-code") == "110129"
    refused = audit.node_authentication_failed(peer=Actor("x", "10.0.0.1"), reason="unknown CA")
    node = valid(encode(refused, AuditSource("s")))
    assert node.find("EventIdentification/EventTypeCode").get("csd-code") == "110126"
    assert node.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert node.findtext("EventIdentification/EventOutcomeDescription") == "unknown CA"
    login = valid(encode(audit.authentication_failed(user=Actor("bob"), reason="bad token"), AuditSource("s")))
    assert login.find("EventIdentification/EventID").get("csd-code") == "110114"
    assert login.find("EventIdentification/EventTypeCode").get("csd-code") == "110122"


def test_patient_ids_are_cx_with_an_iso_authority_only_for_an_oid() -> None:
    assert patient_id(PatientRef("123", "1.2.250.1.71.4.2.1")) == "123^^^&1.2.250.1.71.4.2.1&ISO"
    assert patient_id(PatientRef("123", "CHU")) == "123^^^CHU"
    assert patient_id(PatientRef("1&2", "")) == "1\\T\\2"


def test_syslog_messages_are_rfc5424_with_the_ihe_msgid_framed_by_octet_count() -> None:
    message = format_message(b"<AuditMessage/>", at=0.5, hostname="node 1\n", procid="42")
    assert message == b"<85>1 1970-01-01T00:00:00.500Z node1 traboule 42 IHE+RFC-3881 - " + BOM + b"<AuditMessage/>"
    assert format_message(b"<x/>", at=0, hostname="h", failed=True).startswith(b"<84>1 ")
    assert frame(b"ab\xc3\xa9") == b"4 ab\xc3\xa9"


def test_the_queue_keeps_messages_until_done_across_reopening(tmp_path: Path) -> None:
    queue = AuditQueue(tmp_path / "audit.sqlite")
    queue.put([(1.0, 0, b"<a/>"), (2.0, 4, b"<b/>"), (3.0, 0, b"<c/>")])
    first = queue.take(2)
    assert [(q.at, q.outcome, q.message) for q in first] == [(1.0, 0, b"<a/>"), (2.0, 4, b"<b/>")]
    assert queue.take(2)[0].message == b"<a/>"  # not done: taken again
    queue.done([first[0].id])
    queue.close()
    queue = AuditQueue(tmp_path / "audit.sqlite")
    assert queue.depth() == 2
    assert [q.message for q in queue.take(10)] == [b"<b/>", b"<c/>"]
    assert queue.prune(keep_s=3600) == 0  # delivered a moment ago: kept a while
    assert queue.prune(keep_s=0) == 1
    queue.close()


def test_the_audit_section_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        '[audit]\nrepository = "arr.example.org:6514"\nsource_id = "engine-1"\nenterprise_site_id = "CHU"\n'
        'tls = { server_name = "arr", min_version = "1.3" }\n'
    )
    cfg = load(str(path), env={})
    assert cfg.audit.address == ("arr.example.org", 6514)
    assert cfg.audit.tls.enabled and cfg.audit.tls.server_name == "arr" and cfg.audit.tls.min_version == "1.3"
    assert (cfg.audit.source_id, cfg.audit.enterprise_site_id, cfg.audit.file) == ("engine-1", "CHU", "audit.log")
    assert load(None, env={}).audit == AuditConfig()
    for bad in ('repository = "nohost"', 'transport = "udp"', 'file = "../x"', "colour = 1", "enabled = 1"):
        path.write_text(f"[audit]\n{bad}\n")
        with pytest.raises(ConfigError, match=r"\[audit\]"):
            load(str(path), env={})


def test_the_operations_guide_audit_example_loads(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    text = (ROOT / "docs" / "operations.md").read_text().split("## Audit trail (IHE ATNA)", 1)[1]
    example = text.split("```toml", 1)[1].split("```", 1)[0].replace("/etc/traboule/tls/arr-ca.pem", str(pki.ca))
    path = tmp_path / "t.toml"
    path.write_text(example)
    cfg = load(str(path), env={})
    assert cfg.audit.address == ("arr.example.org", 6514) and cfg.audit.tls.enabled
    assert cfg.audit.source_id == "traboule-node-1" and cfg.audit.file == "audit.log"


def read_file(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_without_a_repository_events_go_to_the_local_file_only(tmp_path: Path) -> None:
    trail = AuditTrail(Config(data_dir=str(tmp_path)), relay=True)
    await trail.start()
    for n in range(50):
        trail.record(audit.read(requestor=Actor(f"user-{n}"), patients=[PatientRef(str(n), "1.2.3")]))
    assert await asyncio.to_thread(trail.flush)
    (tmp_path / "audit.log").rename(tmp_path / "audit.log.1")  # rotated
    trail.record(audit.application_activity("stop"))
    await trail.close()
    assert [line["kind"] for line in read_file(tmp_path / "audit.log.1")] == ["patient-record"] * 50
    assert [line["kind"] for line in read_file(tmp_path / "audit.log")] == ["application-activity"]
    lines = read_file(tmp_path / "audit.log.1")
    assert len(lines) == 50
    assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600
    assert all(valid(line["xml"].encode()) is not None for line in lines)
    assert etree.fromstring(lines[7]["xml"].encode()).find("ActiveParticipant[@UserID='user-7']") is not None
    assert not (tmp_path / "audit.sqlite").exists()


async def test_a_start_with_another_configuration_is_a_security_alert(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    for _ in range(2):  # the first start, then the same configuration again
        trail = AuditTrail(cfg, relay=True)
        trail.started(cfg)
        await trail.close()
    cfg.channels[0]["source"]["port"] += 1
    trail = AuditTrail(cfg, relay=True)
    trail.started(cfg)
    await trail.close()
    kinds = [(line["kind"], etree.fromstring(line["xml"].encode())) for line in read_file(tmp_path / "audit.log")]
    assert [k for k, _ in kinds] == ["application-activity"] * 3 + ["security-alert"]
    alert = kinds[-1][1]
    assert alert.find("EventIdentification/EventTypeCode").get("csd-code") == "110129"
    assert (tmp_path / "audit-config.sha256").read_text().strip() == trail_module.config_digest(cfg)


async def test_an_edited_mapping_file_is_a_configuration_change(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    mapping = tmp_path / "mwl.yaml"
    mapping.write_text((ROOT / "mappings" / "mwl.yaml").read_text())
    worklist = next(ch for ch in cfg.channels if ch.get("kind") == "worklist")
    worklist["mapping"] = str(mapping)
    assert mapping in trail_module.mapping_files(cfg)
    before = trail_module.config_digest(cfg)
    assert trail_module.config_digest(cfg) == before  # stable
    mapping.write_text(mapping.read_text() + "\n# an integrator's edit\n")
    assert trail_module.config_digest(cfg) != before


# -- with a real rsyslog over TLS --------------------------------------------------------------------------------


@pytest.fixture
def rsyslog(tmp_path: Path, pki: PKI) -> Iterator[RSyslog]:  # noqa: F811
    require_rsyslog()
    server = RSyslog(tmp_path / "rsyslog", free_port(), pki)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trail_module, "MAX_BACKOFF_S", 0.5)
    monkeypatch.setattr(trail_module, "MIN_BACKOFF_S", 0.2)


def audited_config(data_dir: Path, port: int, pki: PKI) -> Config:  # noqa: F811
    cfg = engine_config(data_dir)
    cfg.audit = AuditConfig(
        repository=f"127.0.0.1:{port}",
        tls=TLSSettings(enabled=True, ca_file=str(pki.ca), server_name="localhost"),
        source_id="engine-under-test",
        enterprise_site_id="CHU-TEST",
    )
    return cfg


def audit_messages(server: RSyslog) -> list[etree._Element]:
    """The DICOM audit messages rsyslog received, each checked: RFC 5424 header, MSGID, BOM, schema-valid XML."""
    found = []
    for raw in server.messages():
        header, sep, xml = raw.partition(BOM)
        assert sep, raw[:200]
        pri_version, _ts, _host, app, _pid, msgid, sd, rest = header.decode("ascii").split(" ")
        assert (app, msgid, sd, rest) == ("traboule", "IHE+RFC-3881", "-", "")
        assert pri_version in ("<85>1", "<84>1")  # authpriv.notice, authpriv.warning
        found.append(valid(xml))
    return found


def event_ids(messages: list[etree._Element]) -> list[str]:
    return [m.find("EventIdentification/EventID").get("csd-code") for m in messages]


def users(messages: list[etree._Element]) -> list[str]:
    return [u for m in messages for u in m.xpath("ActiveParticipant[@UserIsRequestor='true']/@UserID")]


async def until(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_engine_start_and_stop_reach_rsyslog_over_tls(tmp_path: Path, rsyslog: RSyslog, pki: PKI) -> None:  # noqa: F811
    runtime = Runtime(audited_config(tmp_path / "engine", rsyslog.port, pki))
    await runtime.start()
    try:
        await until(lambda: "110100" in event_ids(audit_messages(rsyslog)))
        (start,) = audit_messages(rsyslog)
        assert start.find("EventIdentification/EventTypeCode").get("csd-code") == "110120"
        assert start.find("AuditSourceIdentification").get("AuditSourceID") == "engine-under-test"
        assert start.find("ActiveParticipant").get("UserID") == "TRABOULE"  # the worklist SCP's AE title
    finally:
        await runtime.stop()
    codes = [m.find("EventIdentification/EventTypeCode").get("csd-code") for m in audit_messages(rsyslog)]
    assert codes == ["110120", "110121"]  # the stop sent before the engine ended
    local = read_file(tmp_path / "engine" / "audit.log")
    assert [line["kind"] for line in local] == ["application-activity"] * 2


async def test_events_recorded_while_the_repository_is_down_all_arrive(
    tmp_path: Path,
    rsyslog: RSyslog,
    pki: PKI,  # noqa: F811
) -> None:
    runtime = Runtime(audited_config(tmp_path / "engine", rsyslog.port, pki))
    await runtime.start()
    try:
        queue = AuditQueue(tmp_path / "engine" / "audit.sqlite")
        await until(lambda: len(rsyslog.messages()) == 1 and queue.depth() == 0)  # the start, sent and done
        rsyslog.stop()
        for n in range(120):
            runtime.audit.record(audit.read(requestor=Actor(f"down-{n}"), patients=[PatientRef(str(n), "1.2.3")]))
            if n % 40 == 0:
                await asyncio.sleep(0.3)  # several batches, several failed attempts
        await until(lambda: runtime.audit.repository_down)
        assert await asyncio.to_thread(runtime.audit.flush)
        assert queue.depth() == 120
        rsyslog.start()
        await until(lambda: len(rsyslog.messages()) >= 121, timeout=30)
        await until(lambda: not runtime.audit.repository_down)
    finally:
        await runtime.stop()
    received = users(audit_messages(rsyslog))
    assert set(received) >= {f"down-{n}" for n in range(120)}  # none missing (at least once)
    local = read_file(tmp_path / "engine" / "audit.log")
    assert {u for line in local for u in users([etree.fromstring(line["xml"].encode())])} >= {
        f"down-{n}" for n in range(120)
    }
    assert len(local) == 122  # start, 120 reads, stop


async def test_the_queue_survives_an_engine_restart(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    require_rsyslog()
    port = free_port()
    data_dir = tmp_path / "engine"
    first = Runtime(audited_config(data_dir, port, pki))  # nothing listens on the port yet
    await first.start()
    for n in range(30):
        first.audit.record(audit.exported(destination=Actor("dmp"), patients=[], objects=[], transaction="ITI-41",
                                          requestor=Actor(f"queued-{n}")))  # fmt: skip
    await first.stop()
    assert AuditQueue(data_dir / "audit.sqlite").depth() == 32  # start, 30 exports, stop
    server = RSyslog(tmp_path / "rsyslog", port, pki)
    server.start()
    try:
        cfg = audited_config(data_dir, port, pki)
        second = Runtime(cfg)
        await second.start()
        try:
            await until(lambda: len(server.messages()) >= 33)  # the first run's 32, the second's start
        finally:
            await second.stop()
        messages = audit_messages(server)
    finally:
        server.stop()
    assert set(users(messages)) >= {f"queued-{n}" for n in range(30)}
    assert event_ids(messages)[:2] == ["110100", "110106"]  # in order: the first run's start, then its exports
    assert AuditQueue(data_dir / "audit.sqlite").depth() == 0


# -- bounds, query forms, floods, delivery ------------------------------------------------------------------------


def test_an_mwl_query_has_the_dicom_form_and_an_iti_query_the_transaction_form() -> None:
    identifier = b"\x10\x00\x10\x00\x00\x00\x00\x00"  # (0010,0010) empty, Implicit VR Little Endian
    event = audit.queried(
        requestor=Actor("CT01", "10.0.0.9", ae_title="CT01"),
        query=identifier,
        transaction="RAD-5",
        sop_class="1.2.840.10008.5.1.4.31",
        transfer_syntax="1.2.840.10008.1.2.1",
    )
    (obj,) = valid(encode(event, AuditSource("s"))).findall("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.31"
    assert (obj.get("ParticipantObjectTypeCode"), obj.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert obj.find("ParticipantObjectIDTypeCode").attrib == {
        "csd-code": "110181",
        "codeSystemName": "DCM",
        "originalText": "SOP Class UID",
    }
    assert base64.b64decode(obj.findtext("ParticipantObjectQuery")) == identifier
    (detail,) = obj.findall("ParticipantObjectDetail")
    assert detail.get("type") == "TransferSyntax"
    assert base64.b64decode(detail.get("value")) == b"1.2.840.10008.1.2.1"
    search = audit.queried(requestor=Actor("app"), query="Patient?identifier=1", transaction="ITI-78")
    (obj,) = valid(encode(search, AuditSource("s"))).findall("ParticipantObjectIdentification")
    assert obj.get("ParticipantObjectTypeCodeRole") == "24"
    assert obj.find("ParticipantObjectIDTypeCode").get("codeSystemName") == "IHE Transactions"


def test_events_are_bounded_when_made_to_what_the_repository_receives() -> None:
    many = [PatientRef(f"P{n}" + "x" * 1000, "1.2.3") for n in range(1000)]
    big = audit.queried(
        requestor=Actor("CT01"), query=b"\x00" * 16_384, patients=many, sop_class="1.2.840.10008.5.1.4.31"
    )
    assert len(big.patients) == audit.MAX_REFS and all(len(p.value) <= audit.MAX_VALUE for p in big.patients)
    (query,) = big.objects
    assert query.detail == b"C-FIND identifier of 16384 bytes (over 4096: not kept)" and not query.transfer_syntax
    direct = audit.AuditEvent(
        "patient-record", "R", requestor=Actor("u" * 10_000, "a\x00b"), patients=tuple(many),
        objects=tuple(ObjectRef("order", "o" * 5000, b"d" * 9000) for _ in range(500)),
        description="d" * 100_000,
    )  # fmt: skip
    assert len(direct.patients) == len(direct.objects) == audit.MAX_REFS
    assert direct.requestor == Actor("u" * audit.MAX_VALUE, "a?b")
    assert all(len(o.value) == audit.MAX_VALUE and len(o.detail) == audit.MAX_VALUE for o in direct.objects)
    assert len(direct.description) == audit.MAX_TEXT
    root = valid(encode(direct, AuditSource("s")))  # the encoder keeps them all: the same limit
    assert len(root.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")) == audit.MAX_REFS


def test_a_message_control_id_is_a_detail_of_each_patient() -> None:
    event = audit.message_received(
        "patient", "U", source=Actor("GAM|CHU"), patients=[PatientRef("1", "1.2.3"), PatientRef("2", "NS")],
        objects=[ObjectRef("message", "MSG-42")],
    )  # fmt: skip
    root = valid(encode(event, AuditSource("s")))
    patients = root.findall("ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']")
    assert len(patients) == 2
    for patient in patients:
        (detail,) = patient.findall("ParticipantObjectDetail")
        assert detail.get("type") == "MSH-10" and base64.b64decode(detail.get("value")) == b"MSG-42"
    assert root.find("ActiveParticipant[@UserIsRequestor='true']").get("UserID") == "GAM|CHU"


def test_the_throttle_passes_the_first_refusal_and_summarises_the_rest() -> None:
    throttle = trail_module.Throttle(interval=60, keys=2)
    refused = [audit.node_authentication_failed(peer=Actor("x", f"10.0.0.{n}"), reason="unknown CA") for n in range(4)]
    assert throttle.admit(refused[0], 0.0) == (True, [])
    for t in range(1, 100):
        assert throttle.admit(refused[0], float(t) / 10) == (False, [])
    assert throttle.admit(refused[1], 1.0) == (True, [])
    login = audit.authentication_failed(user=Actor("bob", "10.0.0.0"), reason="bad token")
    admitted, due = throttle.admit(login, 2.0)  # a third key: the oldest (10.0.0.0's refusals) summarised now
    assert admitted and [e.description for e in due] == [
        "99 more refusals of the same kind from this address: unknown CA"
    ]
    assert due[0].requestor == refused[0].requestor and due[0].subtype == "node-authentication"
    assert throttle.admit(login, 3.0)[0] is False
    assert [e.description for e in throttle.due(62.5)] == [
        "1 more refusals of the same kind from this address: bad token"
    ]
    assert throttle.admit(login, 63.0)[0] is True  # a new interval: the first passes again
    assert not trail_module.Throttle.applies(audit.configuration_changed(by=None, what="x"))  # a success: not
    assert not trail_module.Throttle.applies(audit.read(requestor=Actor("u"), patients=[]))


async def test_a_refusal_flood_is_summarised_and_never_pushes_out_patient_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trail_module, "MAX_PENDING", 100)
    monkeypatch.setattr(trail_module, "MAX_SECURITY_PENDING", 10)
    dropped_before = metrics_value("traboule_audit_dropped_total")
    trail = AuditTrail(Config(data_dir=str(tmp_path)), relay=False)
    trail._throttle = trail_module.Throttle(interval=0.5)
    for _ in range(500):  # one address, one reason: one event, then a summary
        trail.record(audit.node_authentication_failed(peer=Actor("x", "10.9.9.9"), reason="unknown CA"))
    assert await asyncio.to_thread(trail.flush)
    (tmp_path / "audit.log").rename(tmp_path / "first.log")
    (tmp_path / "audit.log").mkdir()  # the disk refuses: the buffer fills
    for n in range(2000):  # a flood from many addresses: not throttled, held to the security budget
        trail.record(audit.authentication_failed(user=Actor("x", f"10.1.{n // 250}.{n % 250}"), reason="bad token"))
    for n in range(40):
        trail.record(audit.read(requestor=Actor(f"user-{n}"), patients=[PatientRef(str(n), "1.2.3")]))
    # Held to the budget (10), give or take the batch the failing writer holds while new ones come (a few more).
    assert trail.dropped >= 2000 - 50 and trail.health()["state"] == "degraded"
    assert metrics_value("traboule_audit_dropped_total") - dropped_before >= trail.dropped
    (tmp_path / "audit.log").rmdir()  # the disk takes them again
    await asyncio.sleep(0.6)  # the first address's interval ended: its summary is due
    assert await asyncio.to_thread(trail.flush)
    await trail.close()
    dropped = trail.dropped
    trail.record(audit.application_activity("stop"))  # after close: counted as dropped
    assert trail.dropped == dropped + 1
    assert metrics_value("traboule_audit_dropped_total") - dropped_before >= trail.dropped
    first = [etree.fromstring(line["xml"].encode()) for line in read_file(tmp_path / "first.log")]
    later = [(line["kind"], etree.fromstring(line["xml"].encode())) for line in read_file(tmp_path / "audit.log")]
    assert len(first) == 1  # the first refusal only
    reads = [x for k, x in later if k == "patient-record"]
    assert {x.find("ActiveParticipant[@UserIsRequestor='true']").get("UserID") for x in reads} == {
        f"user-{n}" for n in range(40)
    }  # every patient-data event kept
    logins = [x for k, x in later if k == "user-authentication"]
    assert 1 <= len(logins) <= 50
    (summary,) = [x for k, x in later if k == "security-alert"]
    assert summary.findtext("EventIdentification/EventOutcomeDescription") == (
        "499 more refusals of the same kind from this address: unknown CA"
    )
    assert summary.find("ActiveParticipant").get("NetworkAccessPointID") == "10.9.9.9"


def metrics_value(name: str) -> float:
    from traboule.metrics import REGISTRY

    return REGISTRY.get_sample_value(name) or 0.0


def test_relay_batches_are_capped_in_bytes_and_the_depth_comes_from_the_ids(tmp_path: Path) -> None:
    queue = AuditQueue(tmp_path / "audit.sqlite")
    queue.put([(float(n), 0, b"x" * 100_000) for n in range(10)])
    assert len(queue.take(500, 256 * 1024)) == 2
    assert len(queue.take(500)) == 10
    queue.put([(11.0, 0, b"y" * 300_000)])
    first = queue.take(500, 256 * 1024)
    queue.done([q.id for q in queue.take(10)])
    assert queue.depth() == 1
    assert len(queue.take(500, 256 * 1024)) == 1  # one larger message goes alone
    queue.done([q.id for q in queue.take(500)])
    assert queue.depth() == 0 and len(first) == 2
    queue.close()


async def test_a_batch_counts_as_sent_only_once_the_receiver_acknowledged_it() -> None:
    """A receiver that takes the connection but never reads (as a host that stopped answering): before, the batch
    went into the kernel's buffer and counted as sent; now the sender waits for the peer's acknowledgement and
    fails after its timeout (the relay keeps the batch)."""
    from traboule.adapters.syslog import SyslogSender

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sender = SyslogSender("127.0.0.1", port, None, write_timeout=1.0)
    try:
        messages = [format_message(b"<AuditMessage/>" + b" " * 60_000, at=0, hostname="h")] * 16
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await sender.send(messages)
        assert time.monotonic() - started >= 1.0
        peer, _ = listener.accept()
        peer.close()
        got = bytearray()

        def read_all() -> None:
            conn, _ = listener.accept()
            with conn:
                while chunk := conn.recv(65536):
                    got.extend(chunk)

        reader = asyncio.get_running_loop().run_in_executor(None, read_all)
        await sender.send(messages[:4])  # a receiver that reads: acknowledged, sent
        await sender.close()
        await reader
        assert got == b"".join(frame(m) for m in messages[:4])
    finally:
        await sender.close()
        listener.close()


def test_a_worklist_c_find_is_audited_with_its_sop_class_and_transfer_syntax(tmp_path: Path) -> None:
    """A real C-FIND (pynetdicom SCU, Explicit VR Little Endian only) to the worklist SCP: the channel's audit event
    names the MWL FIND SOP class and the presentation context's transfer syntax, and decodes as sent."""
    from types import SimpleNamespace

    from pydicom.dataset import Dataset
    from pydicom.filereader import read_dataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityWorklistInformationFind

    from tests.peer_dcmtk import free_port as dicom_port
    from tests.peer_dcmtk import mwl_item
    from traboule.adapters.dicom_mwl import WorklistSCP
    from traboule.channels.worklist import WorklistChannel
    from traboule.stores.worklist import WorklistStore

    store = WorklistStore(str(tmp_path / "worklist.sqlite"))
    store.apply([("o1#1", mwl_item())], [])
    recorded: list[audit.AuditEvent] = []
    channel = SimpleNamespace(runtime=SimpleNamespace(audit=SimpleNamespace(record=recorded.append)))
    scp = WorklistSCP(
        store.find, ae_title="TRABOULE", port=dicom_port(), on_query=WorklistChannel._audit_query.__get__(channel)
    )
    scp.start()
    try:
        scu = AE(ae_title="CT01")
        scu.add_requested_context(ModalityWorklistInformationFind, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", scp.port, ae_title="TRABOULE")
        assert assoc.is_established
        query = Dataset()
        query.PatientName = ""
        query.PatientID = ""
        query.IssuerOfPatientID = ""
        answers = [status.Status for status, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)]
        assoc.release()
        assert answers[-1] == 0x0000 and answers.count(0xFF00) == 1
        deadline = time.monotonic() + 5
        while not recorded and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scp.stop()
        store.close()
    [event] = recorded
    [ref] = event.objects
    assert (ref.value, ref.transfer_syntax) == ("1.2.840.10008.5.1.4.31", ExplicitVRLittleEndian)
    assert len(event.patients) == 1
    (obj,) = valid(encode(event, AuditSource("s"))).findall(
        "ParticipantObjectIdentification[@ParticipantObjectTypeCode='2']"
    )
    assert obj.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.31"
    assert obj.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"
    detail = obj.find("ParticipantObjectDetail[@type='TransferSyntax']")
    assert base64.b64decode(detail.get("value")).decode() == ExplicitVRLittleEndian
    identifier = read_dataset(
        BytesIO(base64.b64decode(obj.findtext("ParticipantObjectQuery"))), is_implicit_VR=False, is_little_endian=True
    )
    assert "PatientID" in identifier and "IssuerOfPatientID" in identifier


async def test_a_close_that_stops_waiting_leaves_the_writer_its_own_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trail_module, "CLOSE_WAIT_S", 0.2)
    monkeypatch.setattr(trail_module, "CLOSE_FLUSH_S", 0.2)
    (tmp_path / "audit.log").mkdir()  # the disk refuses: the writer keeps its events and retries
    trail = AuditTrail(Config(data_dir=str(tmp_path)), relay=False)
    trail.record(audit.application_activity("stop"))
    await trail.close()
    thread = trail._thread
    assert thread is not None and thread.is_alive() and trail._abandoned
    (tmp_path / "audit.log").rmdir()  # the disk takes it again: the writer writes, closes its file, ends
    await asyncio.to_thread(thread.join, 5.0)
    assert not thread.is_alive() and trail._fd is None
    assert [line["kind"] for line in read_file(tmp_path / "audit.log")] == ["application-activity"]
