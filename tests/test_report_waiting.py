"""A structured report that arrives before its study: accepted (AA) and kept waiting durably, then published as soon
as the study is known (the modality's MPPS performed series, the archive's event, a DICOMweb read of the archive,
an operator's request), exactly as if the study had come first; later versions supersede a waiting one; dead
letters keep their reason; a kill -9 loses nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests.peer_dcmtk import require_dcmtk
from tests.test_engine import cli
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_mpps import Modality
from tests.test_reports import STUDY_UID, V3, report_of, study, validator  # noqa: F401 - the validator fixture
from tests.test_supervision import Engine, engine_env
from traboule import model
from traboule.app.config import seconds
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.channels.mpps import performed_step
from traboule.model import Envelope
from traboule.stores.reports import ReportPublisher, ReportRefused, Waiting, Withdrawn, request_publication
from traboule.translate.cda import CDAMapping

pytestmark = pytest.mark.timeout(180)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"


def mpps_datasets(study_uid: str = STUDY_UID, images: int = 2) -> tuple[Dataset, Dataset, list[str]]:
    """An N-CREATE (IN PROGRESS) and the N-SET that completes it with one performed series: its images (Referenced
    Image Sequence) and a key object (Referenced Non-Image Composite SOP Instance Sequence); the instance UIDs."""
    ref = Dataset()
    ref.StudyInstanceUID, ref.AccessionNumber = study_uid, "ACC0001"
    ref.RequestedProcedureID, ref.ScheduledProcedureStepID = "RP0001", "SPS0001"
    create = Dataset()
    create.ScheduledStepAttributesSequence = [ref]
    create.PatientName, create.PatientID = "DUPONT^Hélène", "IPP0001"
    create.SpecificCharacterSet = "ISO_IR 100"
    create.PerformedProcedureStepID, create.PerformedStationAETitle = "PPS0001", "CT01"
    create.PerformedProcedureStepStartDate, create.PerformedProcedureStepStartTime = "20261125", "093512"
    create.PerformedProcedureStepStatus, create.Modality = "IN PROGRESS", "CT"
    create.PerformedSeriesSequence = []
    uids = [generate_uid() for _ in range(images + 1)]
    series = Dataset()
    series.SeriesInstanceUID, series.SeriesDescription = generate_uid(), "TAP"
    series.ReferencedImageSequence = []
    for uid in uids[:images]:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_IMAGE, uid
        series.ReferencedImageSequence.append(item)
    key_object = Dataset()
    key_object.ReferencedSOPClassUID, key_object.ReferencedSOPInstanceUID = KEY_OBJECT, uids[-1]
    series.ReferencedNonImageCompositeSOPInstanceSequence = [key_object]
    done = Dataset()
    done.PerformedProcedureStepStatus = "COMPLETED"
    done.PerformedProcedureStepEndDate, done.PerformedProcedureStepEndTime = "20261125", "094801"
    done.PerformedSeriesSequence = [series]
    return create, done, uids


def catalog_instances(doc: model.Document) -> list[str]:
    root = etree.fromstring(base64.b64decode(doc.content))
    return root.xpath("//v3:observation[@classCode='DGIMG']/v3:id/@root", namespaces=V3)


# -- the canonical performed step -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_the_performed_series_carry_their_instances() -> None:
    create, done, uids = mpps_datasets()
    merged = create.copy()
    for elem in done:
        merged[elem.tag] = elem
    bad = Dataset()
    bad.SeriesInstanceUID = "1.2.03"
    merged.PerformedSeriesSequence.append(bad)
    step = performed_step("1.2.3.4", merged)
    (series,) = step.series  # the item without a valid UID is left out of the catalog source
    assert series.modality == "CT" and series.description == "TAP"
    assert [(i.uid, i.sop_class_uid) for i in series.instances] == [
        (uids[0], CT_IMAGE),
        (uids[1], CT_IMAGE),
        (uids[2], KEY_OBJECT),
    ]
    assert step.series_uids == [series.uid, "1.2.03"]  # as before: every series the modality named
    again = Envelope.from_json(Envelope(step).to_json()).payload
    assert again == step


# -- the publisher ---------------------------------------------------------------------------------------------


def publisher_at(tmp_path: Path, **kwargs: Any) -> ReportPublisher:
    return ReportPublisher(CDAMapping(), tmp_path / "reports.sqlite", **kwargs)


def completed_step(study_uid: str = STUDY_UID) -> tuple[model.PerformedStep, list[str]]:
    create, done, uids = mpps_datasets(study_uid)
    for elem in done:
        create[elem.tag] = elem
    return performed_step(generate_uid(), create), uids


def test_a_report_waits_and_the_mpps_series_make_its_catalog(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path)
    publisher.remember([model.ImagingOrder(accession_number=model.Identifier("ACC0001"), study_instance_uid=STUDY_UID)])
    held = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(held, Waiting) and held.new and "waiting for its study" in held.note
    assert publisher.publish_waiting("m1") is None  # nothing known yet: it keeps waiting
    again = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")  # the sender resends it
    assert isinstance(again, Waiting) and not again.new and again.n == held.n

    in_progress = model.PerformedStep(
        sop_instance_uid="1.2.9", study_instance_uid=STUDY_UID, accession_number="ACC0001"
    )
    publisher.remember([in_progress])  # no series: not a catalog
    assert publisher.publish_waiting("m1") is None
    step, uids = completed_step()
    publisher.remember([step])
    doc = publisher.publish_waiting("m1")
    assert doc is not None and (doc.action, doc.version) == ("publish", 1)
    assert catalog_instances(doc) == [uids[0]]  # the catalog's one instance: the first image of the CT series
    root = etree.fromstring(base64.b64decode(doc.content))
    assert root.xpath("v3:documentationOf/v3:serviceEvent/v3:id/@root", namespaces=V3) == [STUDY_UID]
    (row,) = publisher.unnoted()
    assert (row["status"], row["document_id"]) == ("published", doc.id)
    # The same message once more: the same document, no new version.
    assert publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1").id == doc.id  # type: ignore[union-attr]


def test_a_correction_supersedes_a_waiting_version_and_a_deletion_withdraws(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path)
    first = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    second = publisher.prepare(report_of(fixture("oru_r01_report_corrected.hl7")), "m2")
    assert isinstance(first, Waiting) and isinstance(second, Waiting) and "supersedes 1" in second.note
    assert [(r["message_key"], r["status"]) for r in publisher.waiting(("waiting", "superseded"))] == [
        ("m1", "superseded"),
        ("m2", "waiting"),
    ]
    publisher.remember([study()])
    assert publisher.publish_waiting("m1") is None  # superseded: never published
    doc = publisher.publish_waiting("m2")
    assert doc is not None and (doc.action, doc.version, doc.replaces) == ("publish", 1, "")
    assert b"Contr\xc3\xb4le dans 6 mois." in base64.b64decode(doc.content)

    # Another exam: its report waits, then is deleted before its study is known.
    other = fixture("oru_r01_report.hl7").decode().replace("ACC0001", "ACC0002").replace("REP0001", "REP0002")
    deleted = fixture("oru_r01_report_deleted.hl7").decode().replace("ACC0001", "ACC0002")
    assert isinstance(publisher.prepare(report_of(other.encode()), "m3"), Waiting)
    withdrawn = publisher.prepare(report_of(deleted.encode()), "m4")
    assert isinstance(withdrawn, Withdrawn) and "1 waiting report(s) withdrawn" in withdrawn.note
    assert publisher.waiting(("withdrawn",))[0]["message_key"] == "m3"
    # A journal write that failed after all: the deletion is undone, the report waits again.
    publisher.discard("m4")
    assert [r["message_key"] for r in publisher.waiting()] == ["m3"]


def test_deadline_dead_letter_and_request(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path, wait_for_study=60)
    held = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    assert isinstance(held, Waiting)
    assert publisher.expire(time.time() + 30) == 0
    assert publisher.expire(time.time() + 61) == 1
    (row,) = publisher.unnoted()
    assert row["status"] == "expired" and "before its deadline" in row["reason"]
    publisher.noted(row["n"], 7)
    assert request_publication(publisher.path, held.n + 1) is None  # no such report
    assert request_publication(publisher.path, held.n) == "expired"
    assert publisher.requested() == ["m1"] and publisher.requested() == []
    (row,) = publisher.waiting()
    assert row["journal_id"] == 7 and row["reason"] == ""
    assert seconds("24h", "x") == 86400 and seconds(90, "x") == 90 and seconds("1.5m", "x") == 90
    with pytest.raises(ValueError, match="duration"):
        seconds("tomorrow", "x")


def test_without_waiting_or_with_another_fault_it_is_still_an_ae(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with pytest.raises(ReportRefused, match="not known from the archive"):
        publisher_at(tmp_path / "a", wait_for_study=0).prepare(report_of(fixture("oru_r01_report.hl7")), "m1")
    (tmp_path / "b").mkdir()
    publisher = publisher_at(tmp_path / "b")
    bad = fixture("oru_r01_report.hl7").decode().replace("801234567890&", "&")  # an author without RPPS
    with pytest.raises(ReportRefused, match="practitioner"):
        publisher.prepare(report_of(bad.encode()), "m1")  # checked with a stand-in catalog: not kept waiting
    assert publisher.waiting() == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_cda_refused_once_the_study_is_known_is_a_dead_letter_with_the_findings(
    tmp_path: Path,
    validator: Any,  # noqa: F811
) -> None:
    publisher = publisher_at(tmp_path, validator=validator)
    assert isinstance(publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "m1"), Waiting)
    broken = study()
    for series in broken.series:
        for instance in series.instances:
            instance.sop_class_uid = "not a class"  # a code with spaces: the CDA schema refuses it
    publisher.remember([broken])
    with pytest.raises(ReportRefused, match="CDA not valid"):
        publisher.publish_waiting("m1")
    (row,) = publisher.unnoted()
    assert row["status"] == "invalid" and "XSD" in row["reason"]
    assert publisher.waiting(("invalid",))[0]["document_id"] == ""  # nothing stored, nothing published


# -- end to end, in process: MLLP, MPPS, the journal's outbox --------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[tuple[Runtime, list[model.Document], int]]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}
    mpps_port = free_port()
    cfg.channels.append({"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": mpps_port}]})
    runtime = Runtime(cfg)
    await runtime.start()
    documents: list[model.Document] = []

    async def probe(delivery: Delivery) -> None:
        documents.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await runtime.bus.subscribe("probe", ["document.#"], probe)
    try:
        yield runtime, documents, mpps_port
    finally:
        await runtime.stop()


async def test_reports_before_the_exam_are_published_after_the_mpps_in_order(
    engine: tuple[Runtime, list[model.Document], int],
) -> None:
    runtime, documents, mpps_port = engine
    journal = runtime.journal
    assert journal is not None
    assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"
    acks = await send(runtime, fixture("oru_r01_report.hl7"), fixture("oru_r01_report_corrected.hl7"))
    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    first, second = (journal.get(i) for i in (2, 3))
    assert first is not None and "waiting for its study" in first.warnings
    assert second is not None and "supersedes 1 waiting version" in second.warnings
    await asyncio.sleep(0.5)
    assert documents == []

    create, done, uids = mpps_datasets()
    modality = Modality(mpps_port)
    try:
        mpps_uid = generate_uid()
        assert await modality.create(mpps_uid, create) == 0x0000
        assert (await modality.set(mpps_uid, done)).Status == 0x0000
    finally:
        modality.close()
    await until(lambda: len(documents) == 1, timeout=20)
    await asyncio.sleep(0.5)
    (doc,) = documents  # the correction only: the first version was superseded before it could be published
    assert (doc.action, doc.version) == ("publish", 1)
    assert b"Contr\xc3\xb4le dans 6 mois." in base64.b64decode(doc.content)
    assert catalog_instances(doc) == [uids[0]]
    await until(lambda: "not published: superseded" in journal.get(2).warnings)  # type: ignore[union-attr]
    assert f"published once its study was known: document {doc.id}" in journal.get(3).warnings  # type: ignore[union-attr]
    assert journal.get(3).status == "accepted"  # type: ignore[union-attr]


async def test_the_archive_event_publishes_a_waiting_report(
    engine: tuple[Runtime, list[model.Document], int],
) -> None:
    runtime, documents, _ = engine
    (ack,) = await send(runtime, fixture("oru_r01_report.hl7"))
    assert ack_code(ack) == "AA"
    assert runtime.channel("ris-orders").describe()["reports_waiting"] == 1  # type: ignore[attr-defined]
    health = runtime.health()
    assert health["channels"]["ris-orders"]["reports"] == {"waiting": 1, "dead_letters": 0, "max_waiting": 5000}
    assert "problems" not in health
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    await until(lambda: len(documents) == 1)
    (doc,) = documents
    assert (doc.action, doc.version) == ("publish", 1) and catalog_instances(doc) == [f"{STUDY_UID}.1.1"]
    assert doc.report.study_instance_uid == STUDY_UID and doc.report.acts[0].modality == "CT"
    assert runtime.channel("ris-orders").describe()["reports_waiting"] == 0  # type: ignore[attr-defined]


# -- a kill -9 while a report waits ------------------------------------------------------------------------


def test_a_waiting_report_survives_kill_9_and_is_published_after_the_restart(tmp_path: Path) -> None:
    env = engine_env(tmp_path, TRABOULE_CDA_VALIDATORS="")
    engine = Engine(env)
    try:
        engine.wait_for("engine.ready", process="main")
        for name in ("orm_o01_nw_latin1.hl7", "oru_r01_report.hl7"):
            sent = cli("send", str(Path("fixtures/hl7") / name), env=env)
            assert "MSA|AA" in sent.stdout, sent.stdout + sent.stderr
        listed = cli("reports", "waiting", env=env)
        assert "1 report(s)" in listed.stdout and " waiting " in listed.stdout, listed.stdout + listed.stderr
    finally:
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(10)

    engine = Engine(env)
    try:
        engine.wait_for("engine.ready", process="main")
        asked = cli("reports", "publish", "1", "--wait", "3", env=env)  # the engine looks, the study is still unknown
        assert asked.returncode == 1 and "its study is not known yet" in asked.stdout, asked.stdout + asked.stderr
        create, done, _ = mpps_datasets()
        ae = AE(ae_title="CT01")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        assoc = ae.associate("127.0.0.1", int(env["TRABOULE_MPPS_PORT"]), ae_title="TRABOULE")
        assert assoc.is_established
        mpps_uid = generate_uid()
        assert assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)[0].Status == 0
        assert assoc.send_n_set(done, ModalityPerformedProcedureStep, mpps_uid)[0].Status == 0
        assoc.release()
        deadline = time.monotonic() + 30
        while " published " not in (listed := cli("reports", "waiting", "--all", env=env)).stdout:
            assert time.monotonic() < deadline, listed.stdout + "".join(engine.lines[-10:])
            time.sleep(0.3)
        shown = cli("journal", "show", "2", env=env).stdout
        assert "waiting for its study" in shown and "published once its study was known" in shown
        # The event went through the outbox to the other channels: the FHIR store serves the document.
        url = f"http://127.0.0.1:{env['TRABOULE_HTTP_PORT']}/fhir/DocumentReference"
        deadline = time.monotonic() + 20
        while not (bundle := httpx.get(url, timeout=5).json()).get("entry"):
            assert time.monotonic() < deadline, json.dumps(bundle)[:300]
            time.sleep(0.3)
        assert len(bundle["entry"]) == 1
    finally:
        assert engine.stop() == 0


# -- the archive read on demand (a real Orthanc, DICOMweb) ---------------------------------------------------


@pytest.fixture
async def engine_with_archive(tmp_path: Path, orthanc: Any) -> AsyncIterator[tuple[Runtime, list[model.Document], Any]]:
    require_dcmtk("storescu")
    server = orthanc(f"http://127.0.0.1:{free_port()}/nobody-listens")  # no webhook: only the on-demand read
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False, "archive_recheck": 3600}
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": server.dicomweb})
    runtime = Runtime(cfg)
    await runtime.start()
    documents: list[model.Document] = []

    async def probe(delivery: Delivery) -> None:
        documents.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await runtime.bus.subscribe("probe", ["document.#"], probe)
    try:
        yield runtime, documents, server
    finally:
        await runtime.stop()


async def store_study(server: Any, folder: Path, accession: str) -> str:
    from tests.test_archive import write_study

    folder.mkdir()
    study_uid = write_study(folder, accession=accession, series=1, per_series=2)
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    sent = await asyncio.to_thread(
        subprocess.run,
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port), *files],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stderr
    return study_uid


async def test_the_archive_is_read_on_demand_and_again_when_the_operator_asks(
    engine_with_archive: tuple[Runtime, list[model.Document], Any], tmp_path: Path
) -> None:
    runtime, documents, server = engine_with_archive
    study_uid = await store_study(server, tmp_path / "a", "ACC0001")
    (ack,) = await send(runtime, fixture("oru_r01_report.hl7"))  # no order, no event: QIDO by accession number
    assert ack_code(ack) == "AA" and not runtime.journal.get(1).warnings  # type: ignore[union-attr]
    await until(lambda: len(documents) == 1)
    root = etree.fromstring(base64.b64decode(documents[0].content))
    assert root.xpath("v3:documentationOf/v3:serviceEvent/v3:id/@root", namespaces=V3) == [study_uid]

    # The next exam's report comes before its images: it waits; the images come (no webhook); the operator asks.
    text = fixture("oru_r01_report.hl7").decode().replace("ACC0001", "ACC0002").replace("REP0001", "REP0002")
    (ack,) = await send(runtime, text.encode())
    assert ack_code(ack) == "AA" and "waiting for its study" in runtime.journal.get(2).warnings  # type: ignore[union-attr]
    await store_study(server, tmp_path / "b", "ACC0002")
    await asyncio.sleep(2.5)
    assert len(documents) == 1  # nobody told the engine, and the next read of the archive is an hour away
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    (row,) = publisher.waiting()
    assert request_publication(publisher.path, row["n"]) == "waiting"
    await until(lambda: len(documents) == 2, timeout=15)
    assert documents[1].report.accession_number.value == "ACC0002"


# -- the catalog never crosses patients ------------------------------------------------------------------------

OWN_UID = "1.2.826.0.1.3680043.10.1001.4300"
OTHER_UID = "1.2.826.0.1.3680043.10.1001.4399"


def step_of(patient_id: str, accession: str, study_uid: str) -> tuple[model.PerformedStep, list[str]]:
    """A completed MPPS of ``patient_id`` for this accession number and study, with its instance UIDs."""
    create, done, uids = mpps_datasets(study_uid)
    create.PatientID = patient_id
    create.ScheduledStepAttributesSequence[0].AccessionNumber = accession
    for elem in done:
        create[elem.tag] = elem
    return performed_step(generate_uid(), create), uids


def report_for(accession: str, study_uid: str = "") -> model.Report:
    """The fixture's report (patient IPP0001 of CHU-LYON, with an INS) for this accession number and Study UID."""
    report = report_of(fixture("oru_r01_report.hl7").decode().replace("ACC0001", accession).encode())
    report.study_instance_uid = study_uid
    return report


def test_another_patients_study_is_never_a_reports_catalog(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path)
    # The modality performed ACC0043 for another patient, in another study than the one the report names.
    other, _ = step_of("OTHERPID2", "ACC0043", OTHER_UID)
    publisher.remember([other])
    held = publisher.prepare(report_for("ACC0043", OWN_UID), "m1")
    assert isinstance(held, Waiting)  # its own study is not known: it waits (before: published with OTHERPID2's)
    assert "not of the report's patient" not in held.note  # by its Study UID only: the other study is no candidate
    # The archive reports a study with the report's own UID, but of another patient: still not its catalog.
    theirs = study("ACC0043", OWN_UID)
    theirs.patient = model.Patient(ids=[model.Identifier("OTHERPID2", "CHU-LYON")])
    publisher.remember([theirs])
    assert publisher.catalog_for(report_for("ACC0043", OWN_UID)) is None
    assert publisher.publish_waiting("m1") is None
    (row,) = publisher.unnoted()  # the journal entry will say why it still waits (no patient data in it)
    assert (
        row["status"] == "waiting"
        and "not of the report's patient" in row["remark"]
        and "OTHERPID2" not in row["remark"]
    )
    publisher.noted(row["n"], 1)
    assert publisher.publish_waiting("m1") is None and publisher.unnoted() == []  # said once
    # Its own patient's exam: published with that study, its UID the report's.
    mine, uids = step_of("IPP0001", "ACC0043", OWN_UID)
    publisher.remember([mine])
    doc = publisher.publish_waiting("m1")
    assert doc is not None and catalog_instances(doc) == [uids[0]] and doc.report.study_instance_uid == OWN_UID

    # Without a Study UID, the accession number finds the study, of the same patient only.
    publisher.remember([step_of("OTHERPID2", "ACC0044", OTHER_UID)[0]])
    held = publisher.prepare(report_for("ACC0044"), "m2")
    assert isinstance(
        held, Waiting
    ) and "a study performed (MPPS) with its accession number is not of the report's patient" in (held.note)
    # A patient ID from another issuer is another patient; none at all cannot be shown to be the report's.
    elsewhere, _ = step_of("IPP0001", "ACC0044", "1.2.826.0.1.3680043.10.1001.4401")
    elsewhere.patient.ids[0].issuer = "CHU-PARIS"
    nobody, _ = step_of("", "ACC0044", "1.2.826.0.1.3680043.10.1001.4402")
    publisher.remember([elsewhere, nobody])
    assert publisher.publish_waiting("m2") is None
    mine, uids = step_of("IPP0001", "ACC0044", "1.2.826.0.1.3680043.10.1001.4403")
    mine.patient.ids[0].issuer = "CHU-LYON"  # the same issuer as the report's (its namespace)
    publisher.remember([mine])
    doc = publisher.publish_waiting("m2")
    assert doc is not None and catalog_instances(doc) == [uids[0]]
    assert doc.report.study_instance_uid == "1.2.826.0.1.3680043.10.1001.4403"


def test_a_report_with_a_study_uid_is_matched_by_it_only(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path, wait_for_study=0)
    same_patient_other_study, _ = step_of("IPP0001", "ACC0045", OTHER_UID)
    publisher.remember([same_patient_other_study])
    with pytest.raises(ReportRefused, match="not known"):
        publisher.prepare(report_for("ACC0045", OWN_UID), "m1")  # not by its accession number
    doc = publisher.prepare(report_for("ACC0045"), "m2")  # no UID: by accession number
    assert isinstance(doc, model.Document) and doc.report.study_instance_uid == OTHER_UID
    publisher.remember([step_of("OTHERPID2", "ACC0046", OTHER_UID)[0]])
    with pytest.raises(ReportRefused, match="not of the report's patient") as refused:
        publisher.prepare(report_for("ACC0046"), "m3")  # not waiting: the reason is the AE's
    assert refused.value.location == "PID-3"


async def test_over_mllp_and_mpps_a_waiting_report_never_takes_another_patients_exam(
    engine: tuple[Runtime, list[model.Document], int],
) -> None:
    runtime, documents, mpps_port = engine
    journal = runtime.journal
    assert journal is not None
    lines = fixture("oru_r01_report.hl7").decode().replace("ACC0001", "ACC0043").replace("REP0001", "REP0043")
    lines = lines.replace("\rOBX|1|", f"\rZDS|{OWN_UID}^RIS^Application^DICOM\rOBX|1|", 1)
    (ack,) = await send(runtime, lines.encode())
    assert ack_code(ack) == "AA" and "waiting for its study" in journal.get(1).warnings  # type: ignore[union-attr]

    async def perform(patient_id: str, study_uid: str) -> tuple[int, list[str]]:
        create, done, uids = mpps_datasets(study_uid)
        create.PatientID = patient_id
        create.ScheduledStepAttributesSequence[0].AccessionNumber = "ACC0043"
        modality = Modality(mpps_port)
        try:
            mpps_uid = generate_uid()
            status = await modality.create(mpps_uid, create)
            if status == 0x0000:
                status = (await modality.set(mpps_uid, done)).Status
        finally:
            modality.close()
        return status, uids

    await perform("OTHERPID2", OTHER_UID)  # the same accession number, another patient and study (refused or not)
    theirs = study("ACC0043", OWN_UID)  # the archive names the report's study UID, for another patient
    theirs.patient = model.Patient(ids=[model.Identifier("OTHERPID2", "CHU-LYON")])
    env = Envelope(theirs)
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    still = "still waiting for its study: a study of the archive with its Study Instance UID is not of the report's"
    await until(lambda: still in journal.get(1).warnings)  # type: ignore[union-attr]
    assert "OTHERPID2" not in journal.get(1).warnings  # type: ignore[union-attr]
    assert documents == []  # before: published with the other patient's images
    status, uids = await perform("IPP0001", OWN_UID)  # its own exam
    assert status == 0x0000
    await until(lambda: len(documents) == 1, timeout=20)
    (doc,) = documents
    assert catalog_instances(doc) == [uids[0]] and doc.report.study_instance_uid == OWN_UID


# -- a journaled report is never dropped -------------------------------------------------------------------------


def test_discard_and_reconcile_keep_a_journaled_report_whose_entry_was_pruned(tmp_path: Path) -> None:
    publisher = publisher_at(tmp_path)
    assert isinstance(publisher.prepare(report_for("ACC0047"), "m1"), Waiting)
    publisher.journaled("m1", 12)
    assert isinstance(publisher.prepare(report_for("ACC0048"), "m2"), Waiting)  # its journal write failed
    assert publisher.discard("m1") is False
    assert publisher.reconcile(lambda key: False) == 1  # the journal has neither: only m2 goes
    assert [r["message_key"] for r in publisher.waiting()] == ["m1"]
    publisher.remember([study("ACC0047")])
    doc = publisher.publish_waiting("m1")
    assert doc is not None
    assert publisher.reconcile(lambda key: False) == 0 and publisher.discard("m1") is False
    assert publisher.document(doc.id) is not None and publisher.waiting(("published",))[0]["message_key"] == "m1"


async def test_an_outcome_whose_journal_entry_was_pruned_goes_out_with_a_fresh_entry(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from traboule.channels import waiting_reports
    from traboule.stores.journal import Journal, JournalEntry

    journal = Journal(tmp_path / "journal.sqlite")
    publisher = publisher_at(tmp_path)
    executor = ThreadPoolExecutor(1)
    raw = fixture("oru_r01_report.hl7")
    entry = await journal.append(JournalEntry("ris-orders", raw, "accepted", idempotency_key="m1", correlation_id="c"))
    later = await journal.append(JournalEntry("ris-orders", b"MSH|later", "accepted", idempotency_key="m9"))
    assert isinstance(publisher.prepare(report_for("ACC0001"), "m1"), Waiting)
    publisher.journaled("m1", entry.id)
    journal._db.execute("DELETE FROM messages WHERE id = ?", (entry.id,))  # what `journal prune` did
    task = waiting_reports.WaitingReports("ris-orders", publisher, journal, executor)
    old = waiting_reports.UNJOURNALED
    waiting_reports.UNJOURNALED = 0.0  # no grace: a journaled report is never dropped whatever the delay
    try:
        publisher.remember([study()])
        assert await task.run_once() == 1
        await task.run_once()
    finally:
        waiting_reports.UNJOURNALED = old
        executor.shutdown()
    fresh, _ = journal.recent()
    assert fresh.id > later.id and fresh.status == "accepted" and fresh.idempotency_key == "m1"
    assert f"journal entry {entry.id}" in fresh.warnings and "published once its study was known" in fresh.warnings
    assert journal.outbox_depth() == 1  # the document's event goes out
    (row,) = publisher.waiting(("published",))
    assert row["journal_id"] == fresh.id
    journal.close()


# -- the cost does not grow with the number of waiting reports -------------------------------------------------


class Counting(ReportPublisher):
    """The publisher, counting the waiting reports it is asked to publish."""

    looked: list[str]

    def publish_waiting(self, message_key: str) -> model.Document | None:
        self.looked.append(message_key)
        return super().publish_waiting(message_key)


async def test_a_wake_looks_only_at_the_reports_of_its_studies_and_the_rescan_only_when_something_changed(
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from traboule.channels import waiting_reports
    from traboule.stores.journal import Journal, JournalEntry

    journal = Journal(tmp_path / "journal.sqlite")
    publisher = Counting(CDAMapping(), tmp_path / "reports.sqlite")
    publisher.looked = []
    for i in range(40):
        key = f"m{i}"
        await journal.append(JournalEntry("ris-orders", b"x", "accepted", idempotency_key=key))
        assert isinstance(publisher.prepare(report_for(f"ACC1{i:03}"), key), Waiting)
    executor = ThreadPoolExecutor(1)
    task = waiting_reports.WaitingReports("ris-orders", publisher, journal, executor)
    try:
        mine, _ = step_of("IPP0001", "ACC1007", OWN_UID)
        publisher.remember([mine, step_of("IPP0001", "ACC9999", OTHER_UID)[0]])
        task.wake([OWN_UID, OTHER_UID], ["ACC1007", "ACC9999"])
        assert await task.run_woken() == 1
        assert publisher.looked == ["m7"]
        # The rescan: in batches, a report looked at only when a catalog source names its study; none once done.
        publisher.looked.clear()
        publisher.remember([step_of("OTHERPID2", "ACC1011", OTHER_UID)[0]])  # another patient: not published
        old = waiting_reports.RESCAN_BATCH
        waiting_reports.RESCAN_BATCH = 16
        try:
            assert task.scan_due(float("inf"))
            batches = 0
            while True:
                await task.rescan_batch()
                batches += 1
                if not task.scan_due(0.0):
                    break
        finally:
            waiting_reports.RESCAN_BATCH = old
        assert batches == 3 and publisher.looked == ["m11"]
        assert not task.scan_due(float("inf"))  # nothing changed since: no scan
        counts = publisher.counts()
        assert (counts["waiting"], counts["dead_letters"]) == (39, 0)
    finally:
        executor.shutdown()
        journal.close()


def test_reports_publish_checks_its_number(tmp_path: Path) -> None:
    env = engine_env(tmp_path, TRABOULE_CDA_VALIDATORS="")
    for bad in ("0", "-3", "99999999999999999999", "x"):
        done = cli("reports", "publish", bad, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "a report number" in done.stderr, done.stderr
