"""Reports: HL7 ORU / MDM in → canonical Report → CI-SIS CR-IMG CDA, validated with the official ANS validators
(CDA_extended.xsd + schematrons) before the sender gets its ACK; versions, replacement, deletion; bad reports AE."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.conftest import ROOT
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from traboule import model
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.formats import hl7
from traboule.model import Envelope, Identifier, Instance, Patient, Series, Study
from traboule.translate.cda import CDAMapping, DocumentIds, read_header
from traboule.translate.hl7_mapping import HL7InboundMapping, MappingFailure, ins_key_ok

pytestmark = pytest.mark.timeout(180)

SHARED = ROOT.parent / "shared"
TCC = SHARED / "standards" / "ans-testcontenucda"
CORPUS = SHARED / "corpus" / "hl7v2"
ANS_MDM = SHARED / "standards" / "ans-hl7v2-exemples" / "Vague 2" / "Trans_Doc-CDA-HL7V2"
V3 = {"v3": "urn:hl7-org:v3", "ps3-20": "urn:dicom-org:ps3-20"}
STUDY_UID = "1.2.250.1.999.1.2.20261125.1"


def needs_validators() -> Path:
    if not TCC.is_dir():
        pytest.skip(f"the CI-SIS validators are not beside the project ({TCC}); a plain clone has no ../shared")
    return TCC


@pytest.fixture(scope="session")
def validator(cda_validator: Any) -> Any:
    return cda_validator


def report_of(data: bytes) -> model.Report:
    (report,) = HL7InboundMapping().map(hl7.parse(hl7.decode(data).text))
    assert isinstance(report, model.Report)
    return report


def study(accession: str = "ACC0001", uid: str = STUDY_UID) -> Study:
    return Study(
        uid,
        accession,
        Patient(ids=[Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1")]),
        "20261125093512",
        series=[
            Series(
                f"{uid}.1",
                "1",
                "CT",
                instances=[Instance(f"{uid}.1.{i}", "1.2.840.10008.5.1.4.1.1.2", str(i)) for i in (1, 2)],
            ),
            Series(f"{uid}.2", "2", "SR", instances=[Instance(f"{uid}.2.1", "1.2.840.10008.5.1.4.1.1.88.11", "1")]),
        ],
    )


# -- HL7 → canonical report -----------------------------------------------------------------------------------


def test_text_report_maps_sections_people_and_identifiers() -> None:
    report = report_of(fixture("oru_r01_report.hl7"))
    assert report.action == "publish" and report.status == "F"
    assert report.accession_number.value == "ACC0001" and report.placer_order_number.value == "PLC0001"
    assert report.procedure.code == "CTTAP" and report.exam_time == "20261125093512"
    assert report.author.id == "801234567890" and report.author.name.family == "BIDEAULT"
    sections = {s.code: s.text for s in report.sections}
    assert sections["55115-0"] == "Bilan d'extension d'un nodule pulmonaire."
    assert sections["59776-5"].splitlines() == [
        "Nodule de 6 mm du lobe supérieur droit, inchangé.",
        "Pas d'adénopathie. Foie, rate & pancréas sans anomalie (< 1 cm).",  # \T\ unescaped
    ]
    assert sections["19005-8"].startswith("Nodule pulmonaire stable")
    assert report.patient.ins is not None and report.patient.ins.value == "279035121518989"
    assert report.patient.birth_place_code == "69381"
    assert report_of(fixture("oru_r01_report_corrected.hl7")).action == "replace"
    assert report_of(fixture("oru_r01_report_deleted.hl7")).action == "delete"


def test_mdm_sharing_flags_and_ready_document() -> None:
    path = CORPUS / "ans_MDM_T02_CR-imagerie_INIT.er7"
    if not path.exists():
        pytest.skip(f"{path} is absent (no ../shared)")
    msg = hl7.parse(hl7.decode(path.read_bytes()).text)
    with pytest.raises(MappingFailure, match="not a CDA"):
        HL7InboundMapping().map(msg)  # the corpus copy carries a placeholder text where the CDA goes
    real = next(ANS_MDM.rglob("message_MDM_CR_Radio_INIT_N1_Base64.er7"), None)
    if real is None:
        pytest.skip("the ANS MDM example with its CDA is absent")
    report = report_of(real.read_bytes())
    assert report.attachment_type == "text/xml" and report.attachment
    assert report.flag("INVISIBLE_PATIENT") == "Y" and report.flag("MASQUE_PS") == "N"
    assert report.document_id == "1.2.250.1.71.4.2.2.120456789.71024000081"
    header = read_header(base64.b64decode(report.attachment))
    assert header.level == 1 and header.accession_number == "7252295367250056"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda t: t.replace("||ACC0001|", "|||"), "accession"),
        (
            lambda t: t.replace(
                "IPP0001^^^CHU-LYON&1.2.250.1.999.1.1&ISO^PI~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS",
                "",
            ),
            "PID-3 is empty",
        ),
        (lambda t: t.replace("279035121518989", "279035121518988"), "check key"),
        (lambda t: t.replace("Nodule pulmonaire stable. Contrôle dans 12 mois.", ""), "conclusion"),
        (lambda t: t.replace("|19005-8^Conclusion^LN|", "|18782-3^Résultats^LN|"), "conclusion"),
        (lambda t: t.replace("||||||F", "||||||P"), "report_action"),
    ],
)
def test_bad_reports_are_refused_with_the_reason(change: Any, reason: str) -> None:
    text = change(fixture("oru_r01_report.hl7").decode())
    with pytest.raises(MappingFailure) as raised:
        HL7InboundMapping().map(hl7.parse(text))
    assert reason in raised.value.reason


def test_ins_check_key() -> None:
    assert ins_key_ok("279035121518989")
    assert not ins_key_ok("279035121518988")
    corsica = "179032A123456"  # born in Corse-du-Sud: 2A counts as 19 in the key
    key = 97 - int("1790319123456") % 97
    assert ins_key_ok(f"{corsica}{key:02d}")
    assert not ins_key_ok(f"{corsica}{(key + 1) % 97:02d}")
    assert not ins_key_ok("27903512151898")  # 14 characters
    assert not ins_key_ok("2790351215189²²")  # digits, but not ASCII ones


# -- canonical report → CDA, through the official validators --------------------------------------------------


def test_level3_document_passes_every_validator(validator: Any) -> None:
    report = report_of(fixture("oru_r01_report.hl7"))
    report.study_instance_uid = STUDY_UID
    data = CDAMapping().build(report, DocumentIds("1.2.250.1.999.1.2.3.4.1.1", "1.2.250.1.999.1.2.3.4.1"), study())
    result = validator.validate(data)
    assert result.valid, result.summary()
    root = etree.fromstring(data)
    assert root.xpath("v3:templateId[@root='1.2.250.1.213.1.1.1.45']/@extension", namespaces=V3) == ["2024.01"]
    assert root.xpath("v3:inFulfillmentOf/v3:order/ps3-20:accessionNumber/@extension", namespaces=V3) == ["ACC0001"]
    assert root.xpath("v3:documentationOf/v3:serviceEvent/v3:id/@root", namespaces=V3) == [STUDY_UID]
    conclusion = root.xpath("//v3:section[v3:code/@code='19005-8']/v3:text/v3:paragraph/text()", namespaces=V3)
    assert conclusion == ["Nodule pulmonaire stable. Contrôle dans 12 mois."]
    findings = root.xpath("//v3:section[v3:code/@code='59776-5']/v3:text/v3:paragraph/text()", namespaces=V3)
    assert "Foie, rate & pancréas sans anomalie (< 1 cm)." in findings[1]  # escaped by the serializer
    assert b"rate &amp; pancr\xc3\xa9as sans anomalie (&lt; 1 cm)" in data


def test_level1_pdf_document_passes_every_validator(validator: Any) -> None:
    report = report_of(fixture("oru_r01_pdf.hl7"))
    data = CDAMapping().build(report, DocumentIds("1.2.250.1.999.1.2.3.4.2.1", "1.2.250.1.999.1.2.3.4.2"))
    result = validator.validate(data)
    assert result.valid, result.summary()
    root = etree.fromstring(data)
    assert root.xpath("v3:templateId/@root", namespaces=V3) == [
        "2.16.840.1.113883.2.8.2.1",
        "1.2.250.1.213.1.1.1.1",
        "1.3.6.1.4.1.19376.1.2.20",
    ]
    text = root.find("v3:component/v3:nonXMLBody/v3:text", V3)
    assert text is not None and text.get("mediaType") == "application/pdf"
    assert base64.b64decode(text.text or "").startswith(b"%PDF-")


def test_replacement_keeps_the_set_and_points_at_the_parent(validator: Any) -> None:
    report = report_of(fixture("oru_r01_report_corrected.hl7"))
    ids = DocumentIds("1.2.250.1.999.1.2.3.4.1.2", "1.2.250.1.999.1.2.3.4.1", 2, "1.2.250.1.999.1.2.3.4.1.1")
    data = CDAMapping().build(report, ids, study())
    result = validator.validate(data)
    assert result.valid, result.summary()
    header = read_header(data)
    assert (header.set_id, header.version, header.replaces) == (ids.set_id, 2, ids.replaces)


# -- end to end through the engine -----------------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path, validator: Any) -> AsyncIterator[tuple[Runtime, list[model.Document]]]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": True, "validators": str(TCC), "cache": str(validator.cache_dir)}
    runtime = Runtime(cfg)
    await runtime.start()
    documents: list[model.Document] = []

    async def probe(delivery: Delivery) -> None:
        payload = Envelope.from_json(delivery.body).payload
        assert isinstance(payload, model.Document)
        documents.append(payload)

    await runtime.bus.subscribe("probe", ["document.#"], probe)
    try:
        yield runtime, documents
    finally:
        await runtime.stop()


async def test_report_lifecycle_publish_replace_delete(engine: tuple[Runtime, list[model.Document]]) -> None:
    runtime, documents = engine
    (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
    assert ack_code(ack) == "AA"
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)

    acks = await send(runtime, fixture("oru_r01_report.hl7"), fixture("oru_r01_report.hl7"))
    assert [ack_code(a) for a in acks] == ["AA", "AA"]  # the resend is a duplicate: no second document
    (ack,) = await send(runtime, fixture("oru_r01_report_corrected.hl7"))
    assert ack_code(ack) == "AA"
    (ack,) = await send(runtime, fixture("oru_r01_report_deleted.hl7"))
    assert ack_code(ack) == "AA"
    await until(lambda: len(documents) >= 3)
    await asyncio.sleep(0.2)
    first, second, deleted = documents
    assert [d.action for d in documents] == ["publish", "replace", "delete"]
    assert (first.version, second.version, second.replaces) == (1, 2, first.id)
    assert first.set_id == second.set_id == deleted.set_id and deleted.id == second.id
    cda = base64.b64decode(second.content)
    assert len(cda) == second.size and read_header(cda).replaces == first.id
    assert b"Contr\xc3\xb4le dans 6 mois." in cda
    assert second.report.accession_number.value == "ACC0001" and not second.report.attachment
    (act,) = second.report.acts
    assert (act.code.code, act.ccam, act.modality) == ("87869-4", "ZCQK004", "CT")


async def test_bad_reports_get_ae_and_stay_in_the_journal(engine: tuple[Runtime, list[model.Document]]) -> None:
    runtime, documents = engine
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
    good = fixture("oru_r01_report.hl7").decode()
    bad = [
        good.replace("REP0001", "BAD1").replace("||ACC0001|", "|||"),
        good.replace("REP0001", "BAD2").replace("279035121518989", "279035121518988"),
        good.replace("REP0001", "BAD3").replace("Nodule pulmonaire stable. Contrôle dans 12 mois.", ""),
        good.replace("REP0001", "BAD5").replace("CTTAP^", "XXXX^"),  # a procedure without its LOINC act code
        good.replace("REP0001", "BAD6").replace("801234567890&", "&"),  # an author without RPPS
    ]
    acks = await send(runtime, *(m.encode() for m in bad))
    assert [ack_code(a) for a in acks] == ["AE"] * len(bad)
    reasons = [a.segment("MSA").field(3) or a.segment("ERR").field(8) for a in acks]  # type: ignore[union-attr]
    errors = [e.error for e in reversed(runtime.journal.recent(len(bad), "rejected"))]  # type: ignore[union-attr]
    for expected, error in zip(
        ["accession", "check key", "conclusion", "no LOINC act code", "practitioner"],  # no study: it waits
        errors,
        strict=True,
    ):
        assert expected in error
    assert all(reasons)
    await asyncio.sleep(0.3)
    assert documents == []


async def test_pdf_report_is_published_as_level_1(engine: tuple[Runtime, list[model.Document]]) -> None:
    runtime, documents = engine
    (ack,) = await send(runtime, fixture("oru_r01_pdf.hl7"))
    assert ack_code(ack) == "AA", ack.segment("ERR")
    await until(lambda: len(documents) == 1)
    (pdf,) = documents
    assert pdf.level == 1 and read_header(base64.b64decode(pdf.content)).level == 1


async def test_ans_mdm_examples_publish_replace_and_delete(
    engine: tuple[Runtime, list[model.Document]], tmp_path: Path
) -> None:
    """The ANS "Transmission de document CDA en HL7v2" MDM examples (ready level-1 CDAs, 2021): the current
    validators refuse them (no setId, name qualifiers of an older structuration minimale) and the AE says so;
    without validation they go through their lifecycle, in order."""
    runtime, _ = engine
    names = (
        "message_MDM_CR_Radio_INIT_N1_Base64.er7",
        "message_MDM_CR_Radio_RPLC_N1.er7",
        "message_MDM_CR_Radio_DEL_N1.er7",
    )
    paths = [next(ANS_MDM.rglob(name), None) for name in names]
    if not all(paths):
        pytest.skip(f"the ANS MDM examples are absent from {ANS_MDM}")
    messages = [p.read_bytes() for p in paths if p]
    (refused,) = await send(runtime, messages[0])
    assert ack_code(refused) == "AE" and "setId" in refused.segment("MSA").field(3)  # type: ignore[union-attr]

    cfg = engine_config(tmp_path / "unvalidated")
    cfg.channels[0]["reports"] = {"validate": False}
    other = Runtime(cfg)
    await other.start()
    documents: list[model.Document] = []

    async def probe(delivery: Delivery) -> None:
        documents.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await other.bus.subscribe("probe", ["document.#"], probe)
    try:
        acks = await send(other, *messages)
        assert [ack_code(a) for a in acks] == ["AA", "AA", "AA"], [a.segment("MSA").field(3) for a in acks]  # type: ignore[union-attr]
        await until(lambda: len(documents) == 3)
    finally:
        await other.stop()
    first, second, deleted = documents
    assert [d.action for d in documents] == ["publish", "replace", "delete"]
    assert first.id == "1.2.250.1.71.4.2.2.120456789.71024000081" and first.level == 1
    assert first.report.accession_number.value == "7252295367250056"  # read from the CDA's inFulfillmentOf
    assert second.id == "1.2.250.1.71.4.2.2.120456789.71024000082" and second.replaces == first.id
    assert deleted.id == second.id and deleted.set_id == first.set_id
    assert second.report.flag("CONNEXION_SECRETE") == "Y"


async def test_teleradiology_answer_is_not_a_report(engine: tuple[Runtime, list[model.Document]]) -> None:
    """The CI-SIS téléradiologie ORU^R01 answer carries a protocol, not a CR: refused with the reason."""
    runtime, documents = engine
    path = SHARED / "standards" / "ans-ig-hl7v2-teleradiologie" / "flux3_ORU_R01.hl7"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    (ack,) = await send(runtime, path.read_bytes())
    assert ack_code(ack) == "AE"
    assert documents == []


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("document_oid: 1.2.250.1.999.1.2.3.4", "document_oid: 1.2.250.x", "is not an OID"),
        ("timezone: Europe/Paris", "timezone: Europe/Lyon", "unknown time zone"),
        (
            "author_role: {code: G15_10/SM44, display: Médecin - Radio-diagnostic (SM)}",
            "author_role: G15",
            "author_role",
        ),
        ("image_link:", "image_links:", "unknown section 'image_links'"),
    ],
)
def test_broken_cda_mapping_names_file_and_line(tmp_path: Path, old: str, new: str, reason: str) -> None:
    import shutil

    from traboule.translate.mapping import MappingError

    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    path = tmp_path / "mappings" / "cda.yaml"
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")
    line = next(n for n, t in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if new.split(":")[0] in t)
    with pytest.raises(MappingError) as raised:
        CDAMapping(path)
    assert reason in str(raised.value) and f"cda.yaml:{line}" in str(raised.value)


async def test_the_same_report_on_two_connections_at_once(engine: tuple[Runtime, list[model.Document]]) -> None:
    """A resend racing its original (an ACK timeout on the sender's side), and a correction racing them: every
    message gets its ACK, one document per version, versions in a row."""
    runtime, documents = engine
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
    results = await asyncio.gather(
        send(runtime, fixture("oru_r01_report.hl7")),
        send(runtime, fixture("oru_r01_report.hl7")),
        send(runtime, fixture("oru_r01_report_corrected.hl7")),
    )
    assert [ack_code(acks[0]) for acks in results] == ["AA", "AA", "AA"]
    await until(lambda: len(documents) == 2)
    await asyncio.sleep(0.3)
    assert sorted(d.version for d in documents) == [1, 2]
    assert len({d.id for d in documents}) == 2
    assert runtime.journal is not None and runtime.journal.counts().get("duplicate") == 1


def _publisher(tmp_path: Path) -> Any:
    from traboule.stores.reports import ReportPublisher

    publisher = ReportPublisher(CDAMapping(), tmp_path / "reports.sqlite")
    publisher.remember_study(study())
    return publisher


def test_a_report_after_a_deletion_is_the_next_version(tmp_path: Path) -> None:
    publisher = _publisher(tmp_path)
    first = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    deleted = publisher.prepare(report_of(fixture("oru_r01_report_deleted.hl7")), "m2")
    again = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m3")
    assert (first.version, deleted.action, deleted.id) == (1, "delete", first.id)
    assert (again.action, again.version, again.set_id) == ("publish", 2, first.set_id)
    assert publisher.current(first.set_id).id == again.id  # type: ignore[union-attr]


def test_what_was_not_journaled_is_undone(tmp_path: Path) -> None:
    """The journal write failed (or the engine died) after the document was prepared: the version goes away,
    the one it superseded is current again, and the next report takes its number."""
    publisher = _publisher(tmp_path)
    first = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    second = publisher.prepare(report_of(fixture("oru_r01_report_corrected.hl7")), "m2")
    assert publisher.current(first.set_id).id == second.id  # type: ignore[union-attr]
    assert publisher.reconcile(lambda key: key == "m1") == 1  # m2 never reached the journal
    assert publisher.current(first.set_id).id == first.id  # type: ignore[union-attr]
    assert publisher.document(second.id) is None
    again = publisher.prepare(report_of(fixture("oru_r01_report_corrected.hl7")), "m3")
    assert (again.id, again.replaces) == (second.id, first.id)


async def test_odd_ins_characters_are_an_ae_not_a_dropped_connection(
    engine: tuple[Runtime, list[model.Document]],
) -> None:
    runtime, _ = engine
    text = fixture("oru_r01_report.hl7").decode().replace("279035121518989", "2790351215189²²")
    (ack,) = await send(runtime, text.encode())
    assert ack_code(ack) == "AE" and "check key" in ack.segment("MSA").field(3)  # type: ignore[union-attr]
    assert runtime.journal is not None and runtime.journal.recent(1)[0].status == "rejected"


def test_two_exams_in_one_message_are_refused_and_coded_rows_stay_out_of_the_text() -> None:
    text = fixture("oru_r01_report.hl7").decode()
    obr = next(line for line in text.split("\r") if line.startswith("OBR"))
    with pytest.raises(MappingFailure, match="one report per message"):
        HL7InboundMapping().map(hl7.parse(text.replace(obr, f"{obr}\r{obr.replace('ACC0001', 'ACC0002')}")))
    report = report_of((text + "\rOBX|6|ST|113014^DICOM Study^DCM||1.2.3.4||||||F").encode())
    assert "1.2.3.4" not in report.section("59776-5").text  # type: ignore[union-attr]
    assert report.study_instance_uid == "1.2.3.4"


def test_a_ready_document_with_a_doctype_is_refused() -> None:
    from traboule.translate.cda import CDAError

    evil = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    evil += b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&e;</title></ClinicalDocument>'
    with pytest.raises(CDAError, match="DOCTYPE"):
        read_header(evil)


def test_a_status_message_completes_the_order_summary_without_blanking_it(tmp_path: Path) -> None:
    publisher = _publisher(tmp_path)
    (order,) = HL7InboundMapping().map(hl7.parse(hl7.decode(fixture("orm_o01_nw_latin1.hl7")).text))
    publisher.remember([order])
    status = model.ImagingOrder(action="status", accession_number=Identifier("ACC0001"))
    publisher.remember([status])
    kept = publisher.order_for("ACC0001")
    assert kept is not None and kept.procedure.code == "CTTAP" and kept.study_instance_uid == STUDY_UID


def test_orders_of_one_batch_are_merged_in_the_order_received(tmp_path: Path) -> None:
    """One round of the channel hands over every order of half a second: an order, its status and a change of
    its procedure, with an order already kept for another accession number, merge as one at a time would."""
    publisher = _publisher(tmp_path)
    (order,) = HL7InboundMapping().map(hl7.parse(hl7.decode(fixture("orm_o01_nw_latin1.hl7")).text))
    (other,) = HL7InboundMapping().map(hl7.parse(hl7.decode(fixture("orm_o01_nw_latin1.hl7")).text))
    other.accession_number = Identifier("ACC0002")
    publisher.remember([other])
    status = model.ImagingOrder(action="status", accession_number=Identifier("ACC0001"))
    change = model.ImagingOrder(action="change", accession_number=Identifier("ACC0001"))
    change.procedure.code = "IRMGEN"
    other_status = model.ImagingOrder(action="status", accession_number=Identifier("ACC0002"))
    publisher.remember([order, status, change, other_status])
    kept = publisher.order_for("ACC0001")
    assert kept is not None and kept.procedure.code == "IRMGEN" and kept.study_instance_uid == STUDY_UID
    assert kept.placer_order_number.value == order.placer_order_number.value
    kept_other = publisher.order_for("ACC0002")
    assert kept_other is not None and kept_other.procedure.code == "CTTAP"


def test_the_message_that_made_a_document_is_found_by_an_index(tmp_path: Path) -> None:
    """The console's documents page asks, for each document shown, which message made it: an index look-up."""
    from traboule.app.console.worklist import ShownDocument, _made_by

    publisher = _publisher(tmp_path)
    publisher.remember([study()])
    made = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(made, model.Document)
    db = publisher.storage.db  # type: ignore[attr-defined]
    shown = {"ACC0001": [ShownDocument(made.id, "", 1, "current", "", "", [], [], [])]}
    assert _made_by(db, "", shown) == {made.id: "m1"}
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT document_id, message_key FROM messages WHERE document_id IN (?)", ("x",)
    )
    assert "USING INDEX messages_document" in " ".join(str(row[-1]) for row in plan)


def test_a_replacement_of_an_unknown_or_older_version_is_refused(tmp_path: Path) -> None:
    from traboule.stores.reports import ReportRefused

    publisher = _publisher(tmp_path)
    first = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    publisher.prepare(report_of(fixture("oru_r01_report_corrected.hl7")), "m2")
    data = CDAMapping().build(
        report_of(fixture("oru_r01_report_corrected.hl7")),
        DocumentIds("1.2.250.1.999.7.3", "1.2.250.1.999.7", 3, first.id),
        study(),
    )
    for replaced, reason in ((first.id, "not the current version"), ("1.2.250.1.999.404", "not published here")):
        report = report_of(fixture("oru_r01_report_corrected.hl7"))
        report.attachment_type, report.attachment = "text/xml", base64.b64encode(data).decode()
        report.replaced_document_id = replaced
        with pytest.raises(ReportRefused, match=reason):
            publisher.prepare(report, f"m-{replaced}")


# -- the exam's end -------------------------------------------------------------------------------------------


def with_exam_end(name: str, end: str) -> bytes:
    """A fixture message with OBR-8 (the exam's end) set."""
    data = fixture(name)
    assert data.count(b"|||20261125093512|||") == 1
    return data.replace(b"|||20261125093512|||", f"|||20261125093512|{end}||".encode())


def service_times(doc: model.Document) -> list[tuple[str, str]]:
    root = etree.fromstring(base64.b64decode(doc.content))
    times = root.findall("v3:documentationOf/v3:serviceEvent/v3:effectiveTime/*", V3)
    return [(etree.QName(t).localname, t.get("value", "")) for t in times]


def test_the_exam_end_is_obr8_else_the_end_of_its_mpps(tmp_path: Path, validator: Any) -> None:
    """The serviceEvent's effectiveTime/high (and the document's service_stop): OBR-8 when the report gives it, else
    the end of the exam's performed step as the modality reported it (MPPS, by study or accession number)."""
    (tmp_path / "alone").mkdir()
    alone = _publisher(tmp_path / "alone").prepare(report_of(fixture("oru_r01_report.hl7")), "m0")
    assert isinstance(alone, model.Document)
    assert service_times(alone) == [("low", "20261125093512+0100")] and alone.service_stop == ""

    publisher = _publisher(tmp_path)
    uid = STUDY_UID
    series = Series(f"{uid}.1", "1", "CT", instances=[Instance(f"{uid}.1.1", "1.2.840.10008.5.1.4.1.1.2", "1")])
    steps = [
        model.PerformedStep("1.2.250.1.999.9.1", "COMPLETED", uid, "ACC0001", started="20261125093000",
                            ended="20261125095500", series=[series]),
        model.PerformedStep("1.2.250.1.999.9.2", "COMPLETED", uid, "ACC0001", started="20261125093000",
                            ended="20261125094000", series=[series]),  # an earlier step of the same exam
    ]  # fmt: skip
    publisher.remember(steps)
    from_mpps = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(from_mpps, model.Document)
    assert from_mpps.report.ended == "20261125095500"  # the last end of the exam's steps
    assert service_times(from_mpps) == [("low", "20261125093512+0100"), ("high", "20261125095500+0100")]
    assert from_mpps.service_stop == "20261125095500+0100"
    result = validator.validate(base64.b64decode(from_mpps.content))
    assert result.valid, result.summary()

    from_obr8 = publisher.prepare(report_of(with_exam_end("oru_r01_report_corrected.hl7", "20261125094800")), "m2")
    assert isinstance(from_obr8, model.Document) and from_obr8.replaces == from_mpps.id
    assert service_times(from_obr8) == [("low", "20261125093512+0100"), ("high", "20261125094800+0100")]
    result = validator.validate(base64.b64decode(from_obr8.content))
    assert result.valid, result.summary()


# -- `traboule check` and `traboule run` agree -------------------------------------------------------------------


def toml_config(data_dir: Path, channel: dict[str, Any]) -> str:
    """A configuration file with only ``channel`` (its tables as ``[channels.NAME]``)."""

    def lines(table: dict[str, Any]) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items() if not isinstance(v, dict))

    text = f"[engine]\ndefaults = false\ndata_dir = {json.dumps(str(data_dir))}\n\n[[channels]]\n{lines(channel)}"
    return text + "".join(f"\n[channels.{k}]\n{lines(v)}" for k, v in channel.items() if isinstance(v, dict))


def check_and_run(tmp_path: Path, channel: dict[str, Any]) -> tuple[str, str]:
    """The reasons `traboule check` and `traboule run` give for refusing ``channel`` (each exits 2)."""
    path = tmp_path / "traboule.toml"
    path.write_text(toml_config(tmp_path / "var", channel))
    env = dict(os.environ, TRABOULE_HTTP_PORT=str(free_port()), TRABOULE_LOG_FORMAT="console")
    reasons = []
    for command in ("check", "run"):
        done = subprocess.run(
            [sys.executable, "-m", "traboule.app.cli", "--config", str(path), command],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,  # a run that does not refuse would serve until killed: the test fails on the timeout
            check=False,
        )
        found = re.search(r"^(?:configuration error|cannot start): (channel .*)$", done.stderr, re.MULTILINE)
        assert done.returncode == 2 and found, (command, done.returncode, done.stderr)
        reasons.append(found.group(1))
    return reasons[0], reasons[1]


def test_check_refuses_a_reports_setting_run_refuses(tmp_path: Path) -> None:
    """A setting read when the channel starts was missed by `traboule check` (it builds channels, never starts
    them): every setting is read in the constructor."""
    channel = {
        "name": "ris-orders",
        "kind": "hl7-orders",
        "source": {"adapter": "mllp-listener", "host": "127.0.0.1", "port": free_port()},
        "reports": {"archive_recheck": "soon"},
    }
    checked, ran = check_and_run(tmp_path, channel)
    assert checked == ran and "reports.archive_recheck" in checked and "'soon'" in checked
