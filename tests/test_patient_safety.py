"""Never a document on the wrong patient. A report, a performed step (MPPS) or an archived study naming another
patient's order is refused and journaled, never linked; after a merge (ADT^A40) every message naming the merged
identifier lands on the survivor, wherever the merge falls in the life of an exam. Real MLLP sockets, a pynetdicom
MPPS SCU against the mpps channel, a real Orthanc behind the archive channel, the FHIR store the /fhir API serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

from tests.peer_dcmtk import require_dcmtk
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_mpps import Modality
from tests.test_reports import report_of
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.formats import hl7
from traboule.model import Envelope, Identifier, ImagingOrder, Patient, Study
from traboule.stores.fhir_store import FHIRStore
from traboule.stores.journal import JournalEntry
from traboule.stores.patient_identity import patient_of

pytestmark = pytest.mark.timeout(600)

PID3_INS = b"~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS"
CHU = "^^^CHU-LYON&1.2.250.1.999.1.1&ISO^PI"
ORDER_STUDY_UID = b"1.2.250.1.999.1.2.20261125.1"  # ZDS-1 of the order fixture
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Engine:
    runtime: Runtime
    mpps_port: int
    orthanc: Any = None
    studies: list[Study] | None = None

    @property
    def fhir(self) -> FHIRStore:
        return self.runtime.channel("fhir").store  # type: ignore[attr-defined]

    def journal(self, n: int = 20) -> list[JournalEntry]:
        assert self.runtime.journal is not None
        return self.runtime.journal.recent(n)


async def start_engine(tmp_path: Path, archive: str = "") -> tuple[Runtime, int]:
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": False}  # validation is covered by test_reports
    mpps_port = free_port()
    cfg.channels.append({"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": mpps_port}]})
    if archive:
        cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": archive, "max_attempts": 3})
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    return runtime, mpps_port


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    runtime, mpps_port = await start_engine(tmp_path)
    try:
        yield Engine(runtime, mpps_port)
    finally:
        await runtime.stop()


@pytest.fixture
async def engine_with_archive(tmp_path: Path, orthanc: Any) -> AsyncIterator[Engine]:
    require_dcmtk("storescu")
    http_port = free_port()
    server = orthanc(f"http://127.0.0.1:{http_port}/archive/stable")
    runtime, mpps_port = await start_engine(tmp_path, server.dicomweb)
    studies: list[Study] = []

    async def probe(delivery: Delivery) -> None:
        studies.append(Envelope.from_json(delivery.body).payload)  # type: ignore[arg-type]

    await runtime.bus.subscribe("probe", ["study.#"], probe)
    http = await serve(create_app(runtime), "127.0.0.1", http_port)
    try:
        yield Engine(runtime, mpps_port, server, studies)
    finally:
        http.should_exit = True
        await http.task
        await runtime.stop()


def err_text(ack: hl7.Message) -> str:
    err = ack.segment("ERR")
    assert err is not None
    return hl7.unescape(err.field(8))


def step(accession: str, patient_id: str, study_uid: str = "") -> Dataset:
    """An MPPS N-CREATE (IN PROGRESS) for the order of ``accession``, performed on ``patient_id``."""
    ref = Dataset()
    ref.StudyInstanceUID = study_uid or generate_uid()
    ref.AccessionNumber = accession
    ref.RequestedProcedureID = ""
    ref.ScheduledProcedureStepID = ""
    ref.ReferencedStudySequence = []
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = [ref]
    ds.PatientName = "DUPONT^Hélène"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "CHU-LYON"
    ds.PatientBirthDate, ds.PatientSex = "19790328", "F"
    ds.PerformedProcedureStepID = "PPS0001"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20261125", "093512"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def completed() -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate, ds.PerformedProcedureStepEndTime = "20261125", "094801"
    return ds


async def store_study(engine: Engine, folder: Path, study_uid: str, accession: str, patient_id: str) -> None:
    """A two-image CT study sent to Orthanc with storescu; Orthanc's stable-study callback notifies the engine."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for i in (1, 2):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "DUPONT^Hélène", patient_id, "CHU-LYON"
        ds.PatientBirthDate, ds.PatientSex = "19790328", "F"
        ds.AccessionNumber, ds.StudyDate, ds.StudyTime = accession, "20261125", "093512"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes([i]) * 64
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"i{i}.dcm", enforce_file_format=True)
    files = sorted(str(p) for p in folder.glob("*.dcm"))
    sent = await asyncio.to_thread(
        subprocess.run,
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(engine.orthanc.dicom_port), *files],
        capture_output=True,
        text=True,
    )
    assert sent.returncode == 0, sent.stderr


# -- a document, a step or a study on another patient's order -----------------------------------------------------


async def test_a_report_naming_another_patients_order_is_refused_and_never_linked(engine: Engine) -> None:
    runtime = engine.runtime
    # PLC0002 / ACC0002 are IPP0002's (the OMI fixture); the PDF report names them with IPP0001 and its INS.
    assert ack_code((await send(runtime, fixture("omi_o23_nw_utf8.hl7")))[0]) == "AA"
    await until(lambda: engine.fhir.count("ServiceRequest") == 1)
    with structlog.testing.capture_logs() as logs:
        (refused,) = await send(runtime, fixture("oru_r01_pdf.hl7"))
    assert ack_code(refused) == "AE"
    reason = err_text(refused)
    assert "PID^1^3" in refused.segment("ERR").field(2)  # type: ignore[union-attr]
    assert "patient mismatch" in reason and "IPP0002 (CHU-LYON)" in reason and "IPP0001 (CHU-LYON)" in reason
    assert "ACC0002" in reason or "PLC0002" in reason
    (entry,) = engine.journal(1)
    assert entry.status == "rejected" and entry.error.startswith("PID-3: patient mismatch")
    assert "IPP0001" in entry.error and "IPP0002" in entry.error
    assert not [e for e in logs if "IPP000" in repr(e) or "279035121518989" in repr(e)]  # no patient data logged
    assert [e["error_location"] for e in logs if e["event"] == "message.rejected"] == ["PID-3"]

    # The same report on the order's patient is published; nothing of the refused one ever was.
    await asyncio.sleep(0.3)
    assert engine.fhir.count("DocumentReference") == 0 and engine.fhir.count("DiagnosticReport") == 0
    right = fixture("oru_r01_pdf.hl7").replace(PID3_INS, b"").replace(b"IPP0001^", b"IPP0002^")
    assert ack_code((await send(runtime, right))[0]) == "AA"
    await until(lambda: engine.fhir.count("DocumentReference") == 1)
    (request,) = engine.fhir.search("ServiceRequest", {})[1]
    (reference,) = engine.fhir.search("DocumentReference", {})[1]
    assert reference["subject"] == request["subject"]
    (diagnostic,) = engine.fhir.search("DiagnosticReport", {})[1]
    assert diagnostic["subject"] == request["subject"]
    assert diagnostic["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]

    # A patient known by the same INS under an IPP of another authority is the same patient: the INS says so.
    registry = runtime.channel("ris-orders").identities  # type: ignore[attr-defined]
    order = fixture("orm_o01_nw_latin1.hl7").replace(b"0001", b"0005")  # IPP0005 with the INS, ACC0005
    assert ack_code((await send(runtime, order))[0]) == "AA"
    await until(lambda: registry.owner("accession", "ACC0005") is not None)
    same_ins = fixture("oru_r01_pdf.hl7").replace(b"PLC0002", b"PLC0005").replace(b"FIL0002", b"FIL0005")
    same_ins = same_ins.replace(b"ACC0002", b"ACC0005").replace(b"REP0010", b"REP0015")
    # Under another IPP of the same authority: two patients until merged, the INS one of them only.
    (ack,) = await send(runtime, same_ins)
    assert ack_code(ack) == "AE" and "INS already belongs to another IPP of this authority" in err_text(ack)
    hospital = same_ins.replace(CHU.replace("^PI", "").encode(), b"^^^HOP&1.2.250.1.71.4.2.1&ISO")
    hospital = hospital.replace(b"IPP0001^^^HOP", b"HX10001^^^HOP").replace(b"REP0015", b"REP0017")
    assert b"HX10001^^^HOP&1.2.250.1.71.4.2.1&ISO^PI" in hospital
    assert ack_code((await send(runtime, hospital))[0]) == "AA"
    # Another INS (a valid key: another person) under yet another IPP: refused.
    other = hospital.replace(b"HX10001^", b"HX10006^").replace(b"279035121518989", b"279035121519088")
    (ack,) = await send(runtime, other.replace(b"REP0017", b"REP0016"))
    assert ack_code(ack) == "AE" and "patient mismatch" in err_text(ack)


async def test_a_performed_step_on_another_patients_order_is_refused(engine: Engine) -> None:
    runtime = engine.runtime
    assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"  # ACC0001: IPP0001
    registry = runtime.channel("mpps").identities  # type: ignore[attr-defined]
    await until(lambda: registry.owner("accession", "ACC0001") is not None)
    modality = Modality(engine.mpps_port)
    try:
        wrong = generate_uid()
        with structlog.testing.capture_logs() as logs:
            status, _ = await asyncio.to_thread(modality.assoc.send_n_create, step("ACC0001", "IPP0002"), MPPS, wrong)
        # PS3.4 F.7.2.1: 0106H Invalid Attribute Value (the Patient ID is not the scheduled step's patient)
        assert int(status.Status) == 0x0106
        assert status.ErrorComment == "Patient ID is not the patient of the scheduled step"
        (entry,) = engine.journal(1)
        assert entry.status == "rejected" and entry.ack_code == "0x0106" and entry.control_id == wrong
        assert entry.error.startswith("patient mismatch: accession number ACC0001 belongs to patient IPP0001")
        assert "IPP0002 (CHU-LYON)" in entry.error
        assert not [e for e in logs if "IPP000" in repr(e)]
        # Never stored: an N-SET on it is an unknown instance, nothing reached the FHIR store.
        assert int((await modality.set(wrong, completed())).Status) == 0x0112
        right = generate_uid()
        assert await modality.create(right, step("ACC0001", "IPP0001")) == 0x0000
        assert int((await modality.set(right, completed())).Status) == 0x0000
    finally:
        modality.close()
    await until(lambda: engine.fhir.search("ServiceRequest", {"status": "completed"})[0] == 1)
    (imaging,) = engine.fhir.search("ImagingStudy", {})[1]
    (request,) = engine.fhir.search("ServiceRequest", {})[1]
    assert imaging["subject"] == request["subject"]


async def test_an_archived_study_of_another_patient_is_not_published_as_the_orders(
    engine_with_archive: Engine, tmp_path: Path
) -> None:
    engine = engine_with_archive
    runtime = engine.runtime
    assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"  # ACC0001: IPP0001
    registry = runtime.channel("archive").identities  # type: ignore[attr-defined]
    await until(lambda: registry.owner("accession", "ACC0001") is not None)

    wrong_uid = generate_uid()
    with structlog.testing.capture_logs() as logs:
        await store_study(engine, tmp_path / "wrong", wrong_uid, "ACC0001", "IPP0002")
        deadline = asyncio.get_running_loop().time() + 40
        while not (dead := await runtime.bus.dead_letters("archive")):
            assert asyncio.get_running_loop().time() < deadline, "not dead-lettered"
            await asyncio.sleep(0.05)
    (letter,) = dead
    assert letter.attempt == 1  # refused for good: reading it again cannot help
    assert "not the patient of its order" in letter.headers["x-error"] and "IPP" not in letter.headers["x-error"]
    rejected = [e for e in engine.journal() if e.status == "rejected"]
    assert [e.control_id for e in rejected] == [wrong_uid]
    assert rejected[0].error.startswith("PatientID: patient mismatch: accession number ACC0001 belongs to patient")
    assert "IPP0001" in rejected[0].error and "IPP0002" in rejected[0].error
    assert not [e for e in logs if "IPP000" in repr(e)]
    assert engine.studies == [] and engine.fhir.count("ImagingStudy") == 0

    # The order's patient's study is published, and based on the order.
    right_uid = generate_uid()
    await store_study(engine, tmp_path / "right", right_uid, "ACC0001", "IPP0001")
    await until(lambda: engine.fhir.count("ImagingStudy") == 1, timeout=40)
    assert [s.study_instance_uid for s in engine.studies] == [right_uid]
    (imaging,) = engine.fhir.search("ImagingStudy", {})[1]
    (request,) = engine.fhir.search("ServiceRequest", {})[1]
    assert imaging["subject"] == request["subject"]
    assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]


# -- an order naming another patient's exam -------------------------------------------------------------------------


def _reason(ack: hl7.Message) -> str:
    """The error text of an ACK: ERR-8 (v2.5), else MSA-3 (v2.3.1)."""
    msa = ack.segment("MSA")
    return err_text(ack) or hl7.unescape(msa.field(3) if msa is not None else "")


def _kim(name: str, ipp: str, control: str, n: int = 1000) -> bytes:
    """A fixture for the exam whose numbers are ACC<n>, PLC<n>, FIL<n> and Study UID 1.2.3.<n>, on patient ``ipp``
    (IPP only), sent as message ``control``."""
    data = fixture(name).replace(PID3_INS, b"").replace(b"IPP0001^", f"{ipp}^".encode())
    data = data.replace(ORDER_STUDY_UID, f"1.2.3.{n}".encode())
    for old in (b"PLC0001", b"FIL0001", b"ACC0001"):
        data = data.replace(old, old[:3] + str(n).encode())
    msh, rest = data.split(b"\r", 1)
    fields = msh.split(b"|")
    fields[9] = control.encode()
    return b"|".join(fields) + b"\r" + rest


async def test_an_order_never_moves_another_patients_exam_to_a_new_patient(engine: Engine) -> None:
    """Kim's exam (order, performed step, report) stays Kim's: an order (XO or NW) naming its accession number, order
    numbers or Study UID for another patient is refused (AE, PID-3, both patients named in the ACK and the journal
    only); the same patient's messages, a merged IPP's (its survivor's) and an order of new numbers go through."""
    runtime = engine.runtime
    registry = runtime.channel("ris-orders").identities  # type: ignore[attr-defined]
    nw = "orm_o01_nw_latin1.hl7"
    assert ack_code((await send(runtime, _kim(nw, "IPP1000", "K1")))[0]) == "AA"
    await until(lambda: registry.owner("accession", "ACC1000") is not None)
    modality = Modality(engine.mpps_port)
    try:
        performed = generate_uid()
        assert await modality.create(performed, step("ACC1000", "IPP1000", "1.2.3.1000")) == 0x0000
        assert int((await modality.set(performed, completed())).Status) == 0x0000
    finally:
        modality.close()
    assert ack_code((await send(runtime, _kim("oru_r01_report.hl7", "IPP1000", "K2")))[0]) == "AA"
    await until(lambda: engine.fhir.count("ServiceRequest") == 1 and engine.fhir.count("Patient") == 1)

    with structlog.testing.capture_logs() as logs:
        for name, control in (("orm_o01_xo_change.hl7", "K3"), (nw, "K4")):
            (refused,) = await send(runtime, _kim(name, "IPP1100", control))
            assert ack_code(refused) == "AE"
            err = refused.segment("ERR")
            assert err is not None and "PID^1^3" in "|".join(err.fields) and "205" in "|".join(err.fields)
            reason = _reason(refused)
            assert "patient mismatch" in reason and "IPP1000 (CHU-LYON)" in reason and "IPP1100 (CHU-LYON)" in reason
            (entry,) = engine.journal(1)
            assert entry.status == "rejected" and entry.error.startswith("PID-3: patient mismatch")
            assert "through the patient identity system" in entry.error
            assert "IPP1000" in entry.error and "IPP1100" in entry.error
        # New numbers but Kim's Study UID: refused too.
        study_only = _kim(nw, "IPP1100", "K5", 1101).replace(b"1.2.3.1101", b"1.2.3.1000")
        (refused,) = await send(runtime, study_only)
        assert ack_code(refused) == "AE" and "Study Instance UID 1.2.3.1000 belongs to" in _reason(refused)
    assert not [e for e in logs if "IPP1" in repr(e)]  # no patient data logged
    assert [e["error_location"] for e in logs if e["event"] == "message.rejected"] == ["PID-3"] * 3

    # Nothing moved: the worklist, the ServiceRequest and the owners are Kim's; Kim's corrected report is taken.
    await asyncio.sleep(0.3)
    worklist = runtime.channel("worklist").store  # type: ignore[attr-defined]
    assert not [ds for _, ds in worklist.all() if ds.PatientID == "IPP1100"]  # Kim's exam was performed
    assert engine.fhir.count("Patient") == 1
    (request,) = engine.fhir.search("ServiceRequest", {})[1]
    subject = request["subject"]
    assert [i.value for i in registry.owner("study", "1.2.3.1000") or []] == ["IPP1000"]
    assert ack_code((await send(runtime, _kim("oru_r01_report_corrected.hl7", "IPP1000", "K6")))[0]) == "AA"

    # The same patient re-sends (NW again, XO); an order of numbers nobody owns; a merge then the merged IPP's
    # and the survivor's orders; the cancel.
    assert ack_code((await send(runtime, _kim(nw, "IPP1000", "K7")))[0]) == "AA"
    assert ack_code((await send(runtime, _kim("orm_o01_xo_change.hl7", "IPP1000", "K8")))[0]) == "AA"
    assert ack_code((await send(runtime, _kim(nw, "IPP1100", "K9", 1101)))[0]) == "AA"
    merge = fixture("adt_a40_merge.hl7").replace(b"MSG0030", b"K10").replace(b"IPP0009^", b"IPP1200^")
    assert ack_code((await send(runtime, merge.replace(b"MRG|IPP0001^", b"MRG|IPP1000^")))[0]) == "AA"
    assert ack_code((await send(runtime, _kim("orm_o01_xo_change.hl7", "IPP1000", "K11")))[0]) == "AA"
    assert "was merged into IPP1200 (CHU-LYON)" in engine.journal(1)[0].warnings
    assert ack_code((await send(runtime, _kim("orm_o01_xo_change.hl7", "IPP1200", "K12")))[0]) == "AA"
    (refused,) = await send(runtime, _kim("orm_o01_xo_change.hl7", "IPP1100", "K13"))
    assert ack_code(refused) == "AE" and "IPP1200 (CHU-LYON)" in _reason(refused)
    assert ack_code((await send(runtime, _kim("orm_o01_ca.hl7", "IPP1200", "K14")))[0]) == "AA"
    await until(lambda: engine.fhir.count("ServiceRequest") == 2)
    _, requests = engine.fhir.search("ServiceRequest", {})
    assert subject != next(r["subject"] for r in requests if "ACC1101" in json.dumps(r))  # IPP1100's own order


# -- a merge anywhere in the life of an exam -------------------------------------------------------------------------


STEPS = ["order", "mpps", "study", "report v1", "report v2", "deletion"]


def _exam(data: bytes, n: int, ipp: str) -> bytes:
    """A fixture for exam ``n`` of patient ``ipp`` (IPP only: each exam has its own patients)."""
    data = data.replace(PID3_INS, b"").replace(b"IPP0001^", f"{ipp}^".encode())
    data = data.replace(ORDER_STUDY_UID, _study_uid(n).encode())
    for old in (b"PLC0001", b"FIL0001", b"ACC0001"):
        data = data.replace(old, old[:3] + f"9{n}01".encode())
    return data.replace(b"|MSG0001|", f"|MSG9{n}01|".encode())


def _study_uid(n: int) -> str:
    return f"1.2.250.1.999.1.2.20261125.9{n}"


def _merge(n: int) -> bytes:
    data = fixture("adt_a40_merge.hl7").replace(b"MSG0030", f"MSG9{n}30".encode())
    return data.replace(b"IPP0009^", f"SRV{n}^".encode()).replace(b"MRG|IPP0001^", f"MRG|OLD{n}^".encode())


def _on(resource: dict[str, Any], n: int) -> bool:
    """Whether a resource names exam ``n``'s accession number or study (any resource for -1)."""
    text = json.dumps(resource)
    if n < 0:
        return True
    return f"ACC9{n}01" in text or _study_uid(n) in text


async def test_every_resource_of_an_exam_ends_on_the_survivor_wherever_the_merge_falls(
    engine_with_archive: Engine, tmp_path: Path
) -> None:
    engine = engine_with_archive
    runtime, fhir = engine.runtime, engine.fhir
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    registry = runtime.channel("ris-orders").identities  # type: ignore[attr-defined]

    def exam(rtype: str, n: int) -> list[dict[str, Any]]:
        """Every stored resource of the type for exam ``n``, those no search finds (a deleted report) too."""
        with contextlib.closing(sqlite3.connect(f"file:{fhir.path}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT json FROM resources WHERE type = ?", (rtype,)).fetchall()
        return [r for r in (json.loads(text) for (text,) in rows) if _on(r, n)]

    def patient(value: str) -> dict[str, Any] | None:
        found = fhir.search("Patient", {"identifier": value})[1]
        return found[0] if found else None

    published: dict[str, list[str]] = {}  # correlation id → the IPP of each event published for it

    async def probe(delivery: Delivery) -> None:
        env = Envelope.from_json(delivery.body)
        ipp = (patient_of(env.payload) or Patient()).primary_id
        published.setdefault(env.correlation_id, []).append(ipp.value if ipp else "")

    await runtime.bus.subscribe("probe-exam", ["order.#", "procedure.#", "study.#", "document.#"], probe)
    positions = range(len(STEPS) + 1)  # the merge before the first step, between each pair, after the last
    modalities = [Modality(engine.mpps_port) for _ in positions]
    # One MPPS call at a time: each blocks a thread of the default executor (6 on 2 cores) until the SCP answers,
    # and the SCP's own work needs one of them.
    mpps_turn = asyncio.Lock()
    try:

        async def walk(n: int) -> None:
            """Exam ``n`` with the merge before its step ``n``, then the checks: each exam on patients of its own."""
            modality = modalities[n]
            old, new, mpps_uid = f"OLD{n}", f"SRV{n}", generate_uid()
            sequence = [*STEPS[:n], "merge", *STEPS[n:]]
            correlation = {
                "order": f"MSG9{n}01",
                "mpps": mpps_uid,
                "study": _study_uid(n),
                "report v1": f"REP9{n}1",
                "report v2": f"REP9{n}2",
                "deletion": f"REP9{n}3",
            }
            for what in sequence:
                if what == "merge":
                    assert ack_code((await send(runtime, _merge(n)))[0]) == "AA"
                    await until(lambda: (patient(old) or {}).get("active") is False)
                elif what == "order":
                    assert ack_code((await send(runtime, _exam(fixture("orm_o01_nw_latin1.hl7"), n, old)))[0]) == "AA"
                    await until(lambda: len(exam("ServiceRequest", n)) == 1)
                elif what == "mpps":
                    async with mpps_turn:
                        assert await modality.create(mpps_uid, step(f"ACC9{n}01", old, _study_uid(n))) == 0x0000
                        assert int((await modality.set(mpps_uid, completed())).Status) == 0x0000
                    await until(lambda: [r["status"] for r in exam("ServiceRequest", n)] == ["completed"])
                elif what == "study":
                    await store_study(engine, tmp_path / f"study{n}", _study_uid(n), f"ACC9{n}01", old)
                    await until(
                        lambda: [s["status"] for s in exam("ImagingStudy", n)] == ["available"],
                        timeout=40,
                    )
                    v1 = report_of(_exam(fixture("oru_r01_report.hl7"), n, old))
                    registry.resolve_merged([v1])  # as ingest does: the catalog is the report's patient's
                    await until(lambda: publisher.study_for(v1) is not None)  # noqa: B023
                else:
                    name = {"report v1": "", "report v2": "_corrected", "deletion": "_deleted"}[what]
                    message = _exam(fixture(f"oru_r01_report{name}.hl7"), n, old)
                    message = message.replace(b"|REP000", f"|REP9{n}".encode())
                    (ack,) = await send(runtime, message)
                    assert ack_code(ack) == "AA", (sequence, what, err_text(ack) if ack.segment("ERR") else "")
                    versions = {"report v1": 1, "report v2": 2, "deletion": 2}[what]
                    await until(lambda: len(exam("DocumentReference", n)) == versions)  # noqa: B023
                    if what == "deletion":
                        await until(lambda: "current" not in {d["status"] for d in exam("DocumentReference", n)})
            # Every resource of the exam is on the survivor; the merged Patient is inactive, replaced by it.
            await asyncio.sleep(0.2)  # let anything still in flight land
            survivor, merged = patient(new), patient(old)
            assert survivor is not None and merged is not None, sequence
            assert survivor.get("active", True) is True and merged["active"] is False
            assert merged["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
            counts = {t: len(exam(t, n)) for t in ("ServiceRequest", "ImagingStudy", "DocumentReference")}
            assert counts == {"ServiceRequest": 1, "ImagingStudy": 1, "DocumentReference": 2}, sequence
            resources = [r for t in ("ServiceRequest", "ImagingStudy", "DocumentReference") for r in exam(t, n)]
            requests = {f"ServiceRequest/{r['id']}" for r in exam("ServiceRequest", n)}
            (diagnostic,) = [
                r for r in exam("DiagnosticReport", -1) if {b["reference"] for b in r.get("basedOn", [])} & requests
            ]
            resources.append(diagnostic)
            subjects = {r["subject"]["reference"] for r in resources}
            assert subjects == {f"Patient/{survivor['id']}"}, (sequence, [r["resourceType"] for r in resources])
            assert "current" not in {d["status"] for d in exam("DocumentReference", n)}, sequence  # deleted
            # Every event ingested after the merge names the survivor (the merged IPP never travels), and the
            # journal says so.
            after = [correlation[s] for s in STEPS[n:]]
            await until(lambda: all(c in published for c in after))
            assert {c: set(published[c]) for c in after} == {c: {new} for c in after}, sequence
            warned = [e for e in engine.journal(500) if f"patient {old} (CHU-LYON) was merged into" in e.warnings]
            assert len(warned) == len(after) + ("mpps" in STEPS[n:]), sequence  # N-CREATE and N-SET

        # Every position at once: Orthanc's stable-study delay, most of each walk's time, is waited once for all.
        await asyncio.gather(*(walk(n) for n in positions))
    finally:
        for modality in modalities:
            modality.close()

    # An event already in flight for the merged patient when the merge was applied (ingested before it) lands on
    # the survivor: the FHIR channel follows the merged Patient's replaced-by link.
    late = ImagingOrder(patient=Patient(ids=[Identifier("OLD0", "CHU-LYON", "1.2.250.1.999.1.1", "PI")]))
    late.placer_order_number = Identifier("PLC99901", "RIS")
    late.accession_number = Identifier("ACC99901", "RIS")
    env = Envelope(late, source="ris-orders", correlation_id="late")
    await runtime.bus.publish("order.new", env.to_json(), message_id=env.id)
    await until(lambda: len(exam("ServiceRequest", 99)) == 1)
    (request,) = exam("ServiceRequest", 99)
    assert request["subject"] == {"reference": f"Patient/{patient('SRV0')['id']}"}  # type: ignore[index]
    assert patient("OLD0")["active"] is False  # type: ignore[index]  # and left as it was


# -- a crash right after an order ---------------------------------------------------------------------------------


def test_after_a_kill_9_the_owners_of_the_last_orders_are_rebuilt_from_the_journal(tmp_path: Path) -> None:
    """The owners of order keys are written in batches, the INS after the journal write: a kill -9 right after an
    order's ACK may leave them unwritten (simulated for certain: the rows and the registry's mark removed from the
    file, as a crash before the writes leaves it). The engine's start records them again from the journal: another
    patient's report naming the order is still refused, and so is another INS for its IPP."""
    import os
    import signal

    from tests.test_engine import cli
    from tests.test_supervision import Engine, engine_env

    env = engine_env(tmp_path, TRABOULE_CDA_VALIDATORS="")
    registry = tmp_path / "var" / "patients.sqlite"
    engine = Engine(env)
    try:
        engine.wait_for("engine.ready", process="main")
        sent = cli("send", str(Path("fixtures/hl7") / "orm_o01_nw_latin1.hl7"), env=env)
        assert "MSA|AA" in sent.stdout, sent.stdout + sent.stderr
    finally:
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(10)
    db = sqlite3.connect(str(registry))
    try:
        db.execute("DELETE FROM owners")
        db.execute("DELETE FROM marks")
        db.execute("DELETE FROM ins")
        db.commit()
    finally:
        db.close()

    wrong = fixture("oru_r01_report.hl7").replace(b"IPP0001", b"IPP0002").replace(PID3_INS, b"")
    assert b"ACC0001" in wrong
    path = tmp_path / "wrong_patient.hl7"
    path.write_bytes(wrong)
    engine = Engine(env)
    try:
        engine.wait_for("engine.ready", process="main")
        refused = cli("send", str(path), env=env)
        assert "MSA|AE" in refused.stdout and "patient mismatch" in refused.stdout, refused.stdout + refused.stderr
        assert "accession number ACC0001 belongs to patient IPP0001" in refused.stdout
        other = fixture("orm_o01_nw_latin1.hl7").replace(b"279035121518989", b"279035121519088")
        path.write_bytes(other.replace(b"MSG0001", b"MSG0002").replace(b"ACC0001", b"ACC0002"))
        refused = cli("send", str(path), env=env)
        assert "MSA|AE" in refused.stdout and "identity conflict" in refused.stdout, refused.stdout + refused.stderr
        db = sqlite3.connect(str(registry))
        try:
            assert db.execute("SELECT COUNT(*) FROM owners WHERE key = 'ACC0001'").fetchone() == (1,)
            assert db.execute("SELECT journal_id FROM marks WHERE channel = 'ris-orders'").fetchone() == (1,)
        finally:
            db.close()
    finally:
        assert engine.stop() == 0
