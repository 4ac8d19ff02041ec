"""The whole imaging loop as a department runs it, with no configuration at all: an order over MLLP, a modality
(worklist C-FIND with findscu, MPPS with its performed series), a structured ORU report; the item is on the
worklist then gone, the ServiceRequest completed, the CR d'imagerie validated by the CI-SIS validators and found on
the pull API (MHD) by the INS that only the report carried. Then the same with an archive (a real Orthanc), the
report before or after the study. The loop runs on each store backend (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from tests.conftest import ROOT, database_url_of
from tests.peer_dcmtk import findscu, require_dcmtk
from tests.peer_orthanc import orthanc  # noqa: F401 - the fixture
from tests.test_engine import cli, engine_ports
from tests.test_mpps import completed, in_progress
from tests.test_reports import TCC, V3

pytestmark = pytest.mark.timeout(300)
INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"
INS_REPETITION = "~279035121518989^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.10&ISO^INS"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ORDER_STUDY = "1.2.250.1.999.1.2.20261125.1"  # the order fixture's Study Instance UID (ZDS-1)
WORKLIST_KEYS = [
    "AccessionNumber",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
]


def order_with_ipp_only(folder: Path) -> Path:
    """The order fixture without the INS: the RIS knows only the IPP when it orders the exam."""
    text = (ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1")
    assert INS_REPETITION in text
    path = folder / "order.hl7"
    path.write_bytes(text.replace(INS_REPETITION, "").encode("latin-1"))
    return path


REPORT = ROOT / "fixtures" / "hl7" / "oru_r01_report.hl7"  # PID-3 carries the IPP and the qualified INS


@pytest.fixture
def start_engine(tmp_path: Path) -> Iterator[Callable[..., dict[str, str]]]:
    """``traboule run`` with the defaults (plus an optional file and a database URL), the CI-SIS validators found by
    the environment."""
    if not TCC.is_dir():
        pytest.skip(f"the CI-SIS validators are not beside the project ({TCC})")
    procs: list[subprocess.Popen[str]] = []

    def start(config: str = "", ports: dict[str, str] | None = None, database_url: str = "") -> dict[str, str]:
        env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "var"), TRABOULE_LOG_FORMAT="json")
        env.update(ports or engine_ports())
        env["TRABOULE_CDA_VALIDATORS"] = str(TCC)
        env.pop("TRABOULE_CONFIG", None)
        env.pop("TRABOULE_DATABASE_URL", None)
        if database_url:  # every process of the engine (and each `traboule` command of the test) on PostgreSQL
            env["TRABOULE_DATABASE_URL"] = database_url
        args = [sys.executable, "-m", "traboule.app.cli"]
        if config:
            (tmp_path / "traboule.toml").write_text(config, encoding="utf-8")
            args += ["--config", str(tmp_path / "traboule.toml")]
        proc = subprocess.Popen([*args, "run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stderr is not None
        deadline = time.monotonic() + 120  # the validators compile their schematrons at start
        for line in proc.stderr:
            if '"engine.ready"' in line and '"process": "main"' in line:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"engine did not start: {line}")
        else:
            raise AssertionError("the engine exited before it was ready")
        with open(tmp_path / f"engine-{len(procs)}.log", "w") as log:  # the rest of the log, read on failure
            subprocess.Popen(["cat"], stdin=proc.stderr, stdout=log)
        return env

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def search(http: httpx.Client, rtype: str, **params: str) -> list[dict[str, Any]]:
    answer = http.get(f"/fhir/{rtype}", params=params)
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def send(path: Path, env: dict[str, str]) -> str:
    sent = cli("send", str(path), env=env)
    assert sent.returncode == 0 and ": AA" in sent.stdout, sent.stdout + sent.stderr
    return sent.stdout


def perform(env: dict[str, str], item: Dataset, images: int = 3) -> list[str]:
    """The modality performs the item: MPPS IN PROGRESS, then COMPLETED with a performed series and its images
    (Referenced Image Sequence); returns the images' SOP Instance UIDs."""
    done = completed()
    uids = [generate_uid() for _ in range(images)]
    refs = []
    for uid in uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CT_IMAGE, uid
        refs.append(ref)
    done.PerformedSeriesSequence[0].ReferencedImageSequence = refs
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", int(env["TRABOULE_MPPS_PORT"]), ae_title="TRABOULE")
    assert assoc.is_established
    try:
        uid = generate_uid()
        created, _ = assoc.send_n_create(in_progress(item), ModalityPerformedProcedureStep, uid)
        finished, _ = assoc.send_n_set(done, ModalityPerformedProcedureStep, uid)
        assert (int(created.Status), int(finished.Status)) == (0, 0)
    finally:
        assoc.release()
    return uids


def catalog(cda: bytes) -> tuple[list[str], list[str], str]:
    """The serviceEvent's study UID(s), the SOP instance UIDs of the CDA's DICOM object catalog (one per series:
    the CI-SIS schematrons want exactly one) and the catalog's narrative (which counts the whole study)."""
    root = etree.fromstring(cda)
    studies = root.xpath("v3:documentationOf/v3:serviceEvent/v3:id/@root", namespaces=V3)
    instances = root.xpath("//v3:observation[@classCode='DGIMG']/v3:id/@root", namespaces=V3)
    narrative = " ".join(root.xpath("//v3:section[v3:code/@code='121181']/v3:text//text()", namespaces=V3))
    return studies, instances, narrative


def the_report_on_mhd(http: httpx.Client) -> bytes:
    """The gateway's query, by the INS that only the report carried: one current CR d'imagerie, its bytes."""
    (reference,) = until(lambda: search(http, "DocumentReference", **{"patient.identifier": INS, "status": "current"}))
    assert reference["type"]["coding"][0]["code"] == "18748-4"
    binary = http.get(reference["content"][0]["attachment"]["url"])
    assert binary.status_code == 200 and b"<ClinicalDocument" in binary.content
    return binary.content


# Both arrival orders on SQLite; on PostgreSQL the exam first: which order the report came in is a rule of the
# reports' logic, one for every backend, and a report held in PostgreSQL until its study comes is
# tests/test_reports_postgres.py's (the engine's stores there, with an operator's `traboule reports waiting`).
@pytest.mark.parametrize(
    ("backend", "report_first"),
    [("sqlite", False), ("sqlite", True), ("postgresql", False)],
    ids=["sqlite-exam-then-report", "sqlite-report-then-exam", "postgresql-exam-then-report"],
)
def test_order_worklist_mpps_report_with_no_configuration(
    start_engine: Callable[..., dict[str, str]],
    tmp_path: Path,
    report_first: bool,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """The loop on each store backend: SQLite files in the data folder, or a PostgreSQL database (``[database] url``,
    the embedded bus) that every process of the engine and each ``traboule`` command reaches."""
    require_dcmtk("findscu")
    database_url = database_url_of(backend, request)
    env = start_engine(database_url=database_url)
    with httpx.Client(base_url=f"http://127.0.0.1:{env['TRABOULE_HTTP_PORT']}", timeout=10, trust_env=False) as http:
        channels = {c["name"]: c for c in http.get("/channels").json()}
        assert channels["ris-orders"]["validation"] == "on"  # every CDA passes the validators or is not published

        send(order_with_ipp_only(tmp_path), env)
        (item,) = until(lambda: findscu(int(env["TRABOULE_MWL_PORT"]), "TRABOULE", WORKLIST_KEYS))
        assert item.AccessionNumber == "ACC0001" and item.PatientID == "IPP0001"
        (request,) = until(lambda: search(http, "ServiceRequest", identifier="ACC0001"))
        assert request["status"] == "active"
        assert search(http, "Patient", identifier=INS) == []  # nobody told the engine the INS yet

        if report_first:  # the report comes before the images: accepted, waiting for its study
            send(REPORT, env)
            shown = cli("journal", "list", env=env).stdout
            assert "ORU^R01" in shown
            assert search(http, "DocumentReference", **{"patient.identifier": INS}) == []

        images = perform(env, item)
        until(lambda: findscu(int(env["TRABOULE_MWL_PORT"]), "TRABOULE", WORKLIST_KEYS) == [])
        until(lambda: search(http, "ServiceRequest", identifier="ACC0001")[0]["status"] == "completed")

        if not report_first:
            send(REPORT, env)
        cda = the_report_on_mhd(http)
        studies, instances, narrative = catalog(cda)
        assert studies == [str(item.StudyInstanceUID)]  # the catalog is the modality's performed series
        assert len(instances) == 1 and instances[0] in images
        assert "1 série(s), 3 objet(s)" in narrative
        # The order, the study and the report are one patient's, found by the INS and by the IPP alike.
        (patient,) = search(http, "Patient", identifier=INS)
        assert {i["value"] for i in patient["identifier"]} == {"IPP0001", "279035121518989"}
        assert [r["id"] for r in search(http, "ServiceRequest", **{"patient.identifier": INS})] == [request["id"]]
        assert len(search(http, "ImagingStudy", **{"patient.identifier": "IPP0001"})) == 1
    # Where the stores are: SQLite files in the data folder, or every one in PostgreSQL (the embedded bus's file only).
    files = sorted(p.name for p in (tmp_path / "var").glob("*.sqlite"))
    assert (files == ["bus.sqlite"]) if database_url else ("journal.sqlite" in files), files


# On SQLite only: the loop above already runs every store on PostgreSQL; what this test adds is the archive (Orthanc,
# its webhook, the DICOMweb study), which goes through the same stores. On PostgreSQL too it would add ~30 s.
@pytest.mark.parametrize("report_first", [False, True], ids=["study-then-report", "report-then-study"])
def test_with_an_archive_in_either_arrival_order(
    start_engine: Callable[..., dict[str, str]],
    orthanc: Any,  # noqa: F811 - the fixture
    tmp_path: Path,
    report_first: bool,
) -> None:
    from tests.test_archive import write_study

    require_dcmtk("storescu")
    ports = engine_ports()
    server = orthanc(f"http://127.0.0.1:{ports['TRABOULE_HTTP_PORT']}/archive/stable")  # the webhook, on 8080
    env = start_engine(
        f'[[channels]]\nname = "archive"\nkind = "archive"\ndicomweb = "{server.dicomweb}"\n', ports=ports
    )
    folder = tmp_path / "study"
    folder.mkdir()
    # The modality performs the worklist item: the order's Study Instance UID (ZDS-1), accession and patient.
    study_uid = write_study(
        folder, accession="ACC0001", patient_id="IPP0001", series=1, per_series=2, study_uid=ORDER_STUDY
    )

    def store_the_study() -> None:
        files = sorted(str(p) for p in folder.glob("*.dcm"))
        sent = subprocess.run(
            ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port), *files],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sent.returncode == 0, sent.stderr

    with httpx.Client(base_url=f"http://127.0.0.1:{env['TRABOULE_HTTP_PORT']}", timeout=10, trust_env=False) as http:
        send(order_with_ipp_only(tmp_path), env)
        until(lambda: search(http, "ServiceRequest", identifier="ACC0001"))
        if report_first:
            send(REPORT, env)
            store_the_study()
        else:
            store_the_study()
            until(
                lambda: [
                    s
                    for s in search(http, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
                    if s["status"] == "available"
                ]
            )
            send(REPORT, env)
        cda = the_report_on_mhd(http)
        studies, instances, narrative = catalog(cda)
        assert studies == [study_uid]  # the archive's study, as the archive holds it
        assert len(instances) == 1 and "1 série(s), 2 objet(s)" in narrative
        listed = json.loads(http.get("/channels").text)
        assert any(c["name"] == "archive" for c in listed)
