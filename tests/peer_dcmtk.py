"""Real DICOM peers from dcmtk (a pytest plugin, registered by conftest): wlmscpfs as a worklist SCP over `.wl`
files, findscu and echoscu as the modality. Tests skip with a clear reason when the binaries are absent.

findscu runs with `-W -X`: each response is written to `rspNNNN.dcm` and read back with pydicom, so tests assert
on the datasets a real modality received, bytes and character set included.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from tests import ports

HOST = "127.0.0.1"


def require_dcmtk(*tools: str) -> None:
    """Skip the test unless the dcmtk command-line tools are installed."""
    missing = [tool for tool in tools or ("findscu", "echoscu", "wlmscpfs") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"dcmtk not installed ({', '.join(missing)} not on PATH): apt-get install dcmtk")


free_port = ports.free_port  # one allocator for every test (tests/ports.py)


class DcmtkError(RuntimeError):
    """A dcmtk tool exited with an error; the message carries its output."""


@dataclass
class FindResult:
    """What one findscu run produced."""

    datasets: list[Dataset]
    files: list[bytes]  # the rspNNNN.dcm bytes, to check how values were encoded on the wire
    returncode: int
    output: str  # stdout + stderr (findscu logs to both)
    seconds: float  # wall time of the whole process, association included


def run_findscu(
    port: int,
    aec: str,
    keys: list[str],
    aet: str = "MODALITY1",
    *,
    host: str = HOST,
    timeout: float = 20.0,
    extra: list[str] | None = None,
) -> FindResult:
    """Run `findscu -W -X` with `-k` keys (dcmtk syntax, e.g. `ScheduledProcedureStepSequence[0].Modality=CT`)."""
    require_dcmtk("findscu")
    with tempfile.TemporaryDirectory(prefix="findscu-") as out:
        args = ["findscu", "-W", "-X", "-od", out, "-to", "5", "-ta", "10", "-td", "20", "-aet", aet, "-aec", aec]
        for key in keys:
            args += ["-k", key]
        args += [*(extra or []), host, str(port)]
        started = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        seconds = time.perf_counter() - started
        files = [path.read_bytes() for path in sorted(Path(out).glob("rsp*.dcm"))]
    datasets = [dcmread(BytesIO(data)) for data in files]
    return FindResult(datasets, files, proc.returncode, proc.stdout + proc.stderr, seconds)


def findscu(port: int, aec: str, keys: list[str], aet: str = "MODALITY1", **kwargs: object) -> list[Dataset]:
    """The response identifiers of a worklist C-FIND made by findscu; raises DcmtkError if findscu failed."""
    result = run_findscu(port, aec, keys, aet, **kwargs)  # type: ignore[arg-type]
    if result.returncode != 0:
        raise DcmtkError(f"findscu exited with {result.returncode}:\n{result.output}")
    return result.datasets


def echoscu(
    port: int, aec: str, aet: str = "MODALITY1", *, host: str = HOST, timeout: float = 10.0
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with echoscu (returncode 0 when the peer answered Success)."""
    require_dcmtk("echoscu")
    args = ["echoscu", "-to", "2", "-ta", "5", "-aet", aet, "-aec", aec, host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def wait_for_echo(port: int, aec: str, *, deadline_s: float = 10.0) -> float:
    """Repeat C-ECHO until the peer answers; returns the seconds it took. Raises DcmtkError on timeout."""
    started = time.perf_counter()
    while True:
        if echoscu(port, aec).returncode == 0:
            return time.perf_counter() - started
        if time.perf_counter() - started > deadline_s:
            raise DcmtkError(f"no C-ECHO answer from {aec}@{HOST}:{port} after {deadline_s} s")
        time.sleep(0.05)


@dataclass
class WlmServer:
    """A running wlmscpfs."""

    port: int
    aet: str
    folder: Path  # the called-AE folder holding the .wl files (<data_path>/<aet>)
    process: subprocess.Popen[bytes]
    log_path: Path


@pytest.fixture
def wlmscpfs(tmp_path: Path) -> Iterator[Callable[..., WlmServer]]:
    """Factory: `start(aet="WLMSCP", *, file_reject=True)` runs wlmscpfs on a free port over a fresh folder.

    File rejection stays ON by default (dcmtk's default): an item is served only if it carries every Type 1
    return key, which is how tests prove that the files we write are complete. `-csk` returns the file's
    (0008,0005) (the default `-cs0` strips it). `-s`: one process, so stopping its PID stops everything.
    """
    require_dcmtk("wlmscpfs", "echoscu", "findscu")
    servers: list[WlmServer] = []

    def start(aet: str = "WLMSCP", *, file_reject: bool = True) -> WlmServer:
        data_path = tmp_path / f"wlm-{len(servers)}"
        folder = data_path / aet
        folder.mkdir(parents=True)
        (folder / "lockfile").touch()
        port = free_port()
        log_path = tmp_path / f"wlmscpfs-{len(servers)}.log"
        args = ["wlmscpfs", "-v", "-s", "-dhl", "-csk", "-efr" if file_reject else "-dfr", "-dfp", str(data_path)]
        with log_path.open("wb") as log:
            process = subprocess.Popen([*args, str(port)], stdout=log, stderr=subprocess.STDOUT)
        server = WlmServer(port, aet, folder, process, log_path)
        servers.append(server)
        try:
            wait_for_echo(port, aet)
        except DcmtkError as exc:
            raise DcmtkError(f"{exc}\nwlmscpfs log:\n{log_path.read_text(errors='replace')}") from exc
        return server

    yield start
    for server in servers:
        server.process.terminate()  # SIGTERM to this PID only
        try:
            server.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)


# -- test data ---------------------------------------------------------------------------------------------------


def mwl_item(
    *,
    charset: str = "ISO_IR 100",
    patient_name: str = "DUPONT^Hélène",
    patient_id: str = "PID12345",
    issuer: str = "CHU-X",
    accession: str = "ACC0001",
    study_uid: str = "1.2.826.0.1.3680043.8.498.1001",
    requested_procedure_id: str = "RP0001",
    description: str = "Scanner thoracique",
    modality: str = "CT",
    station_aet: str | list[str] = "CT01",
    start_date: str = "20240315",
    start_time: str = "093000",
    sps_id: str = "SPS0001",
    status: str = "SCHEDULED",
) -> Dataset:
    """A complete MWL item, as the order mapping produces it: every IHE SWF return key present (empty when
    unknown), and the Type 1 keys dcmtk's file reject checks filled."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.AccessionNumber = accession
    ds.ReferringPhysicianName = "MARTIN^Paul"
    ds.ReferencedStudySequence = Sequence()
    ds.ReferencedPatientSequence = Sequence()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientWeight = None
    ds.MedicalAlerts = ""
    ds.Allergies = ""
    ds.PregnancyStatus = None
    ds.StudyInstanceUID = study_uid
    ds.RequestingPhysician = ""
    ds.RequestedProcedureDescription = description
    code = Dataset()
    code.CodeValue = "ZBQK002"
    code.CodingSchemeDesignator = "CCAM"
    code.CodeMeaning = description
    ds.RequestedProcedureCodeSequence = Sequence([code])
    ds.AdmissionID = ""
    sps = Dataset()
    sps.Modality = modality
    sps.ScheduledStationAETitle = station_aet
    sps.ScheduledProcedureStepStartDate = start_date
    sps.ScheduledProcedureStepStartTime = start_time
    sps.ScheduledPerformingPhysicianName = ""
    sps.ScheduledProcedureStepDescription = description
    # No empty Scheduled Protocol Code Sequence: dcmtk 3.6.7's file reject refuses an empty one.
    sps.ScheduledProcedureStepID = sps_id
    sps.ScheduledStationName = ""
    sps.ScheduledProcedureStepLocation = ""
    sps.ScheduledProcedureStepStatus = status
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    ds.RequestedProcedureID = requested_procedure_id
    ds.RequestedProcedurePriority = "ROUTINE"
    return ds


# The return keys a modality typically asks for (findscu -k syntax), with no matching value.
MWL_RETURN_KEYS = [
    "SpecificCharacterSet",
    "AccessionNumber",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureID",
    "RequestedProcedureDescription",
    "ScheduledProcedureStepSequence[0].Modality",
    "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
]


def with_keys(*overrides: str) -> list[str]:
    """MWL_RETURN_KEYS with some keys given a matching value, e.g. `with_keys("PatientName=DUP*")`."""
    names = {o.split("=", 1)[0] for o in overrides}
    return [k for k in MWL_RETURN_KEYS if k not in names] + list(overrides)
