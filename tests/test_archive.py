"""The archive channel against a real Orthanc: storescu a study → stable-study webhook → DICOMweb → Study event."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.peer_dcmtk import free_port, require_dcmtk
from tests.test_flow import engine_config, until
from traboule.adapters.dicomweb import DICOMwebClient, DICOMwebError
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.model import Envelope, Study

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_study(
    folder: Path,
    *,
    accession: str = "ACC0001",
    patient_id: str = "IPP0001",
    series: int = 2,
    per_series: int = 3,
    study_uid: str = "",
) -> str:
    """A small study (8x8 secondary captures) as Part 10 files; returns its Study Instance UID (``study_uid``, as
    a modality takes it from the worklist, else a new one)."""
    study_uid = study_uid or generate_uid()
    for s in range(1, series + 1):
        series_uid = generate_uid()
        for i in range(1, per_series + 1):
            ds = Dataset()
            ds.SOPClassUID = SECONDARY_CAPTURE
            ds.SOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "DUPONT^Hélène", patient_id, "CHU-LYON"
            ds.PatientBirthDate, ds.PatientSex = "19790328", "F"
            ds.AccessionNumber, ds.StudyDate, ds.StudyTime = accession, "20261125", "093512"
            ds.StudyDescription, ds.ReferringPhysicianName = "Scanner TAP", "RENARD^Paul"
            ds.Modality = "CT" if s == 1 else "OT"
            ds.SeriesNumber, ds.InstanceNumber = s, i
            ds.BodyPartExamined = "CHEST"
            ds.Rows = ds.Columns = 8
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.PixelData = bytes([i * 10 % 256]) * 64
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.save_as(folder / f"s{s}i{i}.dcm", enforce_file_format=True)
    return study_uid


@pytest.fixture
async def engine_with_archive(tmp_path: Path, orthanc: Any) -> Any:
    require_dcmtk("storescu")
    http_port = free_port()
    server = orthanc(f"http://127.0.0.1:{http_port}/archive/stable")
    cfg = engine_config(tmp_path)
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": server.dicomweb, "max_attempts": 3})
    cfg.channels.append({"name": "fhir", "kind": "fhir"})
    runtime = Runtime(cfg)
    studies: list[Study] = []

    async def probe(delivery: Delivery) -> None:
        studies.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await runtime.start()
    await runtime.bus.subscribe("probe", ["study.#"], probe)
    http = await serve(create_app(runtime), "127.0.0.1", http_port)
    try:
        yield runtime, server, studies, http_port
    finally:
        http.should_exit = True
        await http.task
        await runtime.stop()


async def test_stable_study_becomes_a_canonical_study(engine_with_archive: Any, tmp_path: Path) -> None:
    runtime, server, studies, _ = engine_with_archive
    folder = tmp_path / "study"
    folder.mkdir()
    study_uid = write_study(folder)
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    sent = await asyncio.to_thread(
        subprocess.run,
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port), *files],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stderr
    await until(lambda: bool(studies), timeout=30)
    (study,) = studies
    assert study.study_instance_uid == study_uid
    assert study.accession_number == "ACC0001"
    assert study.patient.ids[0].value == "IPP0001" and study.patient.name.given == "Hélène"
    assert [s.modality for s in study.series] == ["CT", "OT"]
    assert [len(s.instances) for s in study.series] == [3, 3]
    assert [i.number for i in study.series[0].instances] == ["1", "2", "3"]
    assert study.series[0].body_site == "CHEST"
    assert study.started == "20261125093512"
    assert study.endpoint == f"{server.dicomweb}/studies/{study_uid}"
    assert runtime.journal.recent(5)[0].message_type == "StudyStable"
    # and the FHIR channel made it an ImagingStudy (the same event, consumed by another channel)
    fhir_store = runtime.channel("fhir").store
    await until(lambda: fhir_store.count("ImagingStudy") == 1)
    (imaging,) = fhir_store.search("ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"})[1]
    assert imaging["numberOfSeries"] == 2 and imaging["numberOfInstances"] == 6
    assert imaging["contained"][0]["address"] == study.endpoint


async def test_bad_notification_is_refused(engine_with_archive: Any) -> None:
    _, _, _, http_port = engine_with_archive
    async with httpx.AsyncClient() as client:
        bad = await client.post(f"http://127.0.0.1:{http_port}/archive/stable", content=b"{}")
        unknown = await client.post(
            f"http://127.0.0.1:{http_port}/archive/stable", json={"StudyInstanceUID": "1.2.3.999"}
        )
    assert bad.status_code == 400
    assert unknown.status_code == 202  # journaled; the read fails, is retried, then dead-lettered


# What anyone who reaches the port can post: each is refused with the field at fault, before anything is journaled.
HOSTILE_NOTIFICATIONS = [
    (b'{"StudyInstanceUID": "../../../tools/reset?x=1#"}', "StudyInstanceUID"),  # was 202, then GET /tools/reset
    (b'{"StudyInstanceUID": "1.2.3/../../../tools/reset"}', "StudyInstanceUID"),
    (b'{"StudyInstanceUID": "1.02.3"}', "StudyInstanceUID"),  # a leading zero (PS3.5 9.1)
    (b'{"StudyInstanceUID": "1.2.3\\n"}', "StudyInstanceUID"),
    (b'{"StudyInstanceUID": "' + b"1." * 32 + b'1"}', "StudyInstanceUID"),  # 65 characters
    (b'{"StudyInstanceUID": 1.5}', "StudyInstanceUID"),  # a number: 1.50 would be 1.5
    (b'{"StudyInstanceUID": "1.2.3", "AccessionNumber": ["ACC"]}', "AccessionNumber"),
    (b'{"a": 1}', "StudyInstanceUID"),
    (b"null", "body"),
    (b"[1]", "body"),
    (b"[" * 5000, "body"),  # deeper than the JSON parser's stack
    (b"\xff\xfe{", "body"),
]


async def test_bad_notifications_are_refused_naming_the_field_not_the_value(engine_with_archive: Any) -> None:
    runtime, _, _, http_port = engine_with_archive
    url = f"http://127.0.0.1:{http_port}/archive/stable"
    async with httpx.AsyncClient() as client:
        with structlog.testing.capture_logs() as logs:
            for body, field in HOSTILE_NOTIFICATIONS:
                answer = await client.post(url, content=body)
                assert answer.status_code == 400, body
                assert answer.json()["field"] == field and "reset" not in answer.text, body
        padded = await client.post(url, json={"StudyInstanceUID": "1.2.840.99\0", "AccessionNumber": " ACC9 "})
    assert [e["field"] for e in logs if e["event"] == "study.notification_refused"] == [
        field for _, field in HOSTILE_NOTIFICATIONS
    ]
    assert not [e for e in logs if "reset" in repr(e) or "1.02.3" in repr(e)]  # the values are not logged
    # DICOM pads a UID to an even length with NUL: accepted without it
    assert padded.status_code == 202 and padded.json()["accepted"] == "1.2.840.99"
    (entry,) = runtime.journal.recent(5)  # only the good one was journaled
    assert entry.control_id == "1.2.840.99"


async def test_dicomweb_client_puts_only_uids_in_its_paths() -> None:
    client = DICOMwebClient("http://127.0.0.1:9/dicom-web")  # never contacted: refused before any request
    try:
        for uid in ("../../tools/reset?x=1#", "1.2/../../..", "1.2.3%2F..", "", "1.2.3 "):
            with pytest.raises(DICOMwebError, match="not a DICOM UID") as refused:
                await client.study_metadata(uid)
            assert not refused.value.retryable
            with pytest.raises(DICOMwebError):
                client.retrieve_url(uid)
        assert client.retrieve_url("1.2.840.10008") == "http://127.0.0.1:9/dicom-web/studies/1.2.840.10008"
    finally:
        await client.close()


async def test_a_notification_journaled_before_the_check_is_dead_lettered_at_once(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    dicomweb = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: a request would fail and be retried
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": dicomweb, "max_attempts": 5})
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        # What a journal replay of a notification accepted before the webhook checked its UID publishes.
        env = Envelope(Study(study_instance_uid="../../../tools/reset?x=1#"))
        await runtime.bus.publish("archive.stable", env.to_json(), message_id=env.id)
        deadline = asyncio.get_running_loop().time() + 5  # a retry would wait the bus backoff first
        while not (dead := await runtime.bus.dead_letters("archive")):
            assert asyncio.get_running_loop().time() < deadline, "not dead-lettered"
            await asyncio.sleep(0.02)
        (letter,) = dead
        assert letter.attempt == 1  # PermanentError: not retried
        assert "not a DICOM UID" in letter.headers["x-error"]
    finally:
        await runtime.stop()
