"""Study stable in the archive → ImagingStudy on the FHIR server: latency of traboule vs the same work by hand.

Starts the FHIR test server (medplum, tests/fhir_server), ``traboule run`` as a subprocess with two channels in its
main process (``archive``: webhook ``/archive/stable`` + WADO-RS; ``fhir`` with the server as destination) and
Orthanc (DICOMweb plugin, Lua ``OnStableStudy`` posting to the webhook, ``StableAge`` 1 s, the minimum). For each
of ``--studies`` studies (2 series x 50 instances of 8x8 secondary captures, written before timing, a patient and
accession number of its own), one at a time: ``storescu`` it into Orthanc, then wait for the ImagingStudy.

* t_stable: from the webhook request reaching traboule (the ``received`` time of its StudyStable journal entry) to
  the server's answer to the transaction holding the ImagingStudy (``pushed_at`` of its row in the channel's
  ``remote`` table, written when the response is in). Traboule's own latency: journal, outbox, bus, WADO-RS
  metadata read, mapping, store, push.
* end to end: from storescu's exit to the same moment (adds Orthanc's StableAge and its stable-study check).

Both are read from traboule's own files (journal, FHIR store), in the engine's clock: nothing polls the FHIR server
while it works. The stages come from its JSON log (info level). Each ImagingStudy is then read back from the
server (100 instances). Side by side, on a freshly started server: the same work by hand for the same studies, one
at a time and at the same pace (a pause of traboule's median end-to-end time before each: after an idle pause the
next requests are a few ms slower): httpx GET of the WADO-RS metadata from Orthanc, a hand-written mapping to
Patient + ImagingStudy, one POST of a transaction of two conditional updates (what traboule sends).

    .venv/bin/python bench/study_to_imagingstudy.py [--studies 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from tests.peer_fhir_server import SERVER_DIR, start_fhir_server, stop_fhir_server  # noqa: E402
from tests.peer_orthanc import LUA, ORTHANC, PLUGINS  # noqa: E402
from tests.test_archive import write_study  # noqa: E402
from traboule.adapters.fhir_client import FHIRClient, conditional_update, identifier_search, new_full_url  # noqa: E402
from traboule.translate.fhir_mapping import resource_id  # noqa: E402

SERIES, PER_SERIES = 2, 50
DCM = "http://dicom.nema.org/resources/ontology/DCM"
IPP_SYSTEM = "urn:oid:1.2.250.1.999.1.1"  # mappings/fhir.yaml: identifiers.patient.system
ACSN_SYSTEM = "urn:oid:1.2.250.1.999.1.4"  # mappings/fhir.yaml: identifiers.accession.system
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# dcmtk 3.6.7 (storescu, and Orthanc's DICOM server) leaves Nagle's algorithm on unless told: ~90 ms per instance
# on loopback (9 s per study) instead of < 1 ms. Outside what is timed, but it would make the run 10x longer.
NODELAY = dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, process: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start ({url})")


def stop(process: subprocess.Popen[bytes], group: bool = False) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
        process.wait(10)


def instant(text: str) -> float:
    """An ISO 8601 timestamp (``Z`` or ``+00:00``) as seconds since the epoch."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# -- peers and engine --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fhir_server(tmp: Path) -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        sys.exit("node and the FHIR test server's packages are needed: make fhir-peer")
    port = free_port()
    process = start_fhir_server(node, port, tmp / f"medplum-{port}.log")
    try:
        yield f"http://127.0.0.1:{port}/fhir/R4"
    finally:
        stop_fhir_server(process)


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"


@contextlib.contextmanager
def orthanc(webhook: str, tmp: Path, http_port: int, dicom_port: int) -> Iterator[Orthanc]:
    """Orthanc as tests/peer_orthanc.py runs it: DICOMweb plugin, Lua OnStableStudy → ``webhook``, StableAge 1."""
    if not Path(ORTHANC).exists() or not (PLUGINS / "libOrthancDicomWeb.so").exists():
        sys.exit("Orthanc with its DICOMweb plugin is needed (apt-get install orthanc orthanc-dicomweb)")
    base = tmp / "orthanc"
    (base / "db").mkdir(parents=True)
    (base / "log").mkdir()
    lua = base / "notify.lua"
    lua.write_text(LUA % {"webhook": webhook})
    config = {
        "Name": "traboule-bench",
        "StorageDirectory": str(base / "db"),
        "IndexDirectory": str(base / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "StableAge": 1,
        "SaveJobs": False,
        "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}"},
        "LuaScripts": [str(lua)],
    }
    (base / "orthanc.json").write_text(json.dumps(config))
    process = subprocess.Popen(
        [ORTHANC, f"--logdir={base / 'log'}", str(base / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=NODELAY,
    )
    try:
        wait_http(f"http://127.0.0.1:{http_port}/system", process, "Orthanc")
        yield Orthanc(http_port, dicom_port)
    finally:
        stop(process)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


@dataclass
class Engine:
    data: Path
    log: Path

    @property
    def store(self) -> Path:
        return self.data / "fhir.sqlite"

    @property
    def journal(self) -> Path:
        return self.data / "journal.sqlite"


@contextlib.contextmanager
def traboule(fhir_url: str, dicomweb: str, http_port: int, tmp: Path) -> Iterator[Engine]:
    """``traboule run`` with the archive and fhir channels (both in the main process), JSON log at info level."""
    channels = [
        {"name": "archive", "kind": "archive", "dicomweb": dicomweb, "webhook": "/archive/stable"},
        {"name": "fhir", "kind": "fhir", "destination": {"base_url": fhir_url}},
    ]
    config = tmp / "traboule.toml"  # these two channels alone, not over the engine's defaults
    config.write_text(
        "[engine]\ndefaults = false\n\n"
        + "\n".join("[[channels]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in c.items()) for c in channels)
    )
    engine = Engine(tmp / "data", tmp / "traboule.log")
    env = dict(
        os.environ,
        TRABOULE_DATA_DIR=str(engine.data),
        TRABOULE_HTTP_PORT=str(http_port),
        TRABOULE_LOG_LEVEL="info",
        TRABOULE_LOG_FORMAT="json",
    )
    command = [str(ROOT / ".venv" / "bin" / "traboule"), "--config", str(config), "run"]
    with engine.log.open("wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{http_port}/health", process, "traboule")
        yield engine
    finally:
        stop(process, group=True)


# -- traboule's latencies ------------------------------------------------------------------------------------


@dataclass
class Study:
    uid: str
    files: list[str]
    sent: float = 0.0  # storescu exited (epoch seconds)
    received: float = 0.0  # the webhook reached traboule
    pushed: float = 0.0  # the server answered the transaction with the ImagingStudy
    notices: int = 0  # StudyStable journal entries for the study
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def imaging_study_id(self) -> str:
        return resource_id("ImagingStudy", "urn:dicom:uid", self.uid)


def prepare(tmp: Path, count: int) -> list[Study]:
    tag = str(uuid.uuid4().int % 10**8)
    studies = []
    for k in range(count):
        folder = tmp / "studies" / str(k)
        folder.mkdir(parents=True)
        uid = write_study(
            folder, accession=f"ACC-{tag}-{k}", patient_id=f"IPP-{tag}-{k}", series=SERIES, per_series=PER_SERIES
        )
        studies.append(Study(uid, sorted(str(p) for p in folder.glob("*.dcm"))))
    return studies


def storescu(archive: Orthanc, files: list[str]) -> None:
    done = subprocess.run(
        ["storescu", "-aec", "ORTHANC", "127.0.0.1", str(archive.dicom_port), *files],
        capture_output=True,
        text=True,
        env=NODELAY,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")


async def pushed_at(store: sqlite3.Connection, study: Study, timeout: float = 60) -> float:
    """When the ImagingStudy's transaction was answered (its row in the fhir channel's ``remote`` table, which
    ``FHIRStore`` writes and has no accessor for), polled every 20 ms."""
    deadline = time.monotonic() + timeout
    while True:
        row = store.execute(
            "SELECT pushed_at FROM remote WHERE type = 'ImagingStudy' AND id = ?", (study.imaging_study_id,)
        ).fetchone()
        if row is not None:
            return instant(row[0])
        if time.monotonic() > deadline:
            raise TimeoutError(f"study {study.uid}: no ImagingStudy pushed after {timeout:.0f} s")
        await asyncio.sleep(0.02)


def notices(journal: Path, uid: str) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT received FROM messages WHERE message_type = 'StudyStable' AND control_id = ? ORDER BY id", (uid,)
        ).fetchall()
    return [r[0] for r in rows]


def stages(log: Path, studies: list[Study]) -> None:
    """Per study, from the engine's JSON log: when the study was read (WADO-RS), applied (FHIR store) and pushed,
    and the transaction's own round trip (``ms`` of ``fhir.pushed``)."""
    by_uid = {s.uid: s for s in studies}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        study = by_uid.get(event.get("correlation_id", ""))
        if study is None:
            continue
        name = event.get("event", "")
        at = instant(event["timestamp"])
        if name == "study.read":
            study.stages.setdefault("read", at)
        elif name == "fhir.applied" and event.get("channel") == "fhir":
            study.stages.setdefault("applied", at)
        elif name == "fhir.pushed":
            study.stages.setdefault("pushed_log", at)
            study.stages.setdefault("transaction_ms", float(event.get("ms", 0)))


async def run_traboule(tmp: Path, archive: Orthanc, http_port: int, studies: list[Study]) -> list[dict[str, Any]]:
    """Store each study in Orthanc and time it to the server; returns the ImagingStudies read back from it."""
    read_back: list[dict[str, Any]] = []
    with fhir_server(tmp) as fhir_url, traboule(fhir_url, archive.dicomweb, http_port, tmp) as engine:
        while not engine.store.exists():
            await asyncio.sleep(0.05)
        with contextlib.closing(sqlite3.connect(engine.store)) as store:
            for n, study in enumerate(studies, 1):
                await asyncio.to_thread(storescu, archive, study.files)
                study.sent = time.time()
                study.pushed = await pushed_at(store, study)
                study.received = instant(notices(engine.journal, study.uid)[0])
                print(f"study {n}/{len(studies)}: {study.pushed - study.received:.3f} s", file=sys.stderr)
        await asyncio.sleep(1.5)  # a second notification of a study would show up by now
        for study in studies:
            study.notices = len(notices(engine.journal, study.uid))
        async with FHIRClient(fhir_url, timeout=60) as client:
            for study in studies:
                found = await client.search("ImagingStudy", {"identifier": f"urn:dicom:uid|urn:oid:{study.uid}"})
                read_back.extend(e["resource"] for e in found.get("entry", []))
    stages(engine.log, studies)
    return read_back


# -- by hand ---------------------------------------------------------------------------------------------------


def first(obj: dict[str, Any], tag: str) -> Any:
    values = (obj.get(tag) or {}).get("Value") or [None]
    value = values[0]
    return value.get("Alphabetic", "") if isinstance(value, dict) else value


def by_hand(metadata: list[dict[str, Any]], dicomweb: str) -> list[dict[str, Any]]:
    """WADO-RS metadata → a transaction of Patient + ImagingStudy conditional updates, written for the purpose."""
    head = metadata[0]
    uid = first(head, "0020000D")
    family, _, given = (first(head, "00100010") or "").partition("^")
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": V2_0203, "code": "PI"}]},
                "system": IPP_SYSTEM,
                "value": first(head, "00100020"),
            }
        ],
        "active": True,
        "name": [{"use": "official", "family": family, "given": [g for g in given.split("^") if g]}],
        "gender": {"F": "female", "M": "male"}.get(first(head, "00100040"), "unknown"),
    }
    birth = first(head, "00100030") or ""
    if len(birth) == 8:
        patient["birthDate"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    series: dict[str, dict[str, Any]] = {}
    for obj in metadata:
        s = series.setdefault(
            first(obj, "0020000E"),
            {
                "uid": first(obj, "0020000E"),
                "number": int(first(obj, "00200011") or 0),
                "modality": {"system": DCM, "code": first(obj, "00080060") or "OT"},
                "bodySite": {"display": first(obj, "00180015") or ""},
                "instance": [],
            },
        )
        s["instance"].append(
            {
                "uid": first(obj, "00080018"),
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{first(obj, '00080016')}"},
                "number": int(first(obj, "00200013") or 0),
            }
        )
    ordered = sorted(series.values(), key=lambda s: s["number"])
    for s in ordered:
        s["instance"].sort(key=lambda i: i["number"])
        s["numberOfInstances"] = len(s["instance"])
    date, time_ = first(head, "00080020") or "", (first(head, "00080030") or "").split(".")[0]
    patient_url = new_full_url()
    study = {
        "resourceType": "ImagingStudy",
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                "system": ACSN_SYSTEM,
                "value": first(head, "00080050"),
            },
        ],
        "status": "available",
        "modality": [{"system": DCM, "code": m} for m in dict.fromkeys(s["modality"]["code"] for s in ordered)],
        "subject": {"reference": patient_url},
        "numberOfSeries": len(ordered),
        "numberOfInstances": len(metadata),
        "description": first(head, "00081030") or "",
        "started": f"{date[:4]}-{date[4:6]}-{date[6:8]}T{time_[:2]}:{time_[2:4]}:{time_[4:6]}+01:00",
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "wado",
                "status": "active",
                "connectionType": {
                    "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                    "code": "dicom-wado-rs",
                },
                "payloadType": [{"text": "DICOM WADO-RS"}],
                "address": f"{dicomweb}/studies/{uid}",
            }
        ],
        "endpoint": [{"reference": "#wado"}],
        "series": ordered,
    }
    ipp = identifier_search(IPP_SYSTEM, patient["identifier"][0]["value"])
    return [
        conditional_update(patient, f"Patient?{ipp}", full_url=patient_url),
        conditional_update(study, f"ImagingStudy?{identifier_search('urn:dicom:uid', f'urn:oid:{uid}')}"),
    ]


async def run_by_hand(
    tmp: Path, archive: Orthanc, studies: list[Study], pause: float
) -> tuple[list[float], list[float], int]:
    """Per study, after ``pause`` seconds: GET metadata + map + POST; returns the totals, the POST times, and the
    size of one Bundle."""
    totals: list[float] = []
    posts: list[float] = []
    size = 0
    with fhir_server(tmp) as fhir_url:
        async with (
            httpx.AsyncClient(timeout=60, headers={"Accept": "application/dicom+json"}) as wado,
            FHIRClient(fhir_url, timeout=60) as fhir,
        ):
            for study in studies:
                await asyncio.sleep(pause)
                started = time.perf_counter()
                response = await wado.get(f"{archive.dicomweb}/studies/{study.uid}/metadata")
                response.raise_for_status()
                entries = by_hand(response.json(), archive.dicomweb)
                posting = time.perf_counter()
                await fhir.transaction(entries)
                ended = time.perf_counter()
                totals.append(ended - started)
                posts.append(ended - posting)
                size = len(json.dumps({"entry": entries}))
            found = await fhir.search("ImagingStudy", {"_summary": "count"})
            if found["total"] != len(studies):
                print(f"WARNING: by hand, the server holds {found['total']} ImagingStudies", file=sys.stderr)
    return totals, posts, size


# -- main ------------------------------------------------------------------------------------------------------


def line(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name:46} {len(ms):>4} {statistics.median(ms):>9.0f} {percentile(ms, 99):>9.0f} {max(ms):>9.0f} "
        f"{min(ms):>9.0f}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=20)
    args = parser.parse_args()
    if not shutil.which("storescu"):
        sys.exit("dcmtk is not installed (apt-get install dcmtk)")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before the run: the machine is not idle", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        studies = prepare(tmp, args.studies)
        http_port = free_port()
        webhook = f"http://127.0.0.1:{http_port}/archive/stable"
        with orthanc(webhook, tmp, free_port(), free_port()) as archive:
            read_back = await run_traboule(tmp, archive, http_port, studies)
            pause = statistics.median(s.pushed - s.sent for s in studies)
            totals, posts, size = await run_by_hand(tmp, archive, studies, pause)

    stable = [s.pushed - s.received for s in studies]
    e2e = [s.pushed - s.sent for s in studies]
    print(f"{'latency (ms)':46} {'n':>4} {'p50':>9} {'p99':>9} {'max':>9} {'min':>9}")
    print(line("traboule t_stable (webhook → on the server)", stable))
    staged = [s for s in studies if {"read", "applied", "pushed_log", "transaction_ms"} <= s.stages.keys()]
    if staged:
        spans = {
            "  webhook → study read (journal, bus, WADO-RS)": ("received", "read"),
            "  read → applied (bus, mapping, store)": ("read", "applied"),
            "  applied → pushed (bus, Bundle, POST)": ("applied", "pushed_log"),
        }
        for name, (start, end) in spans.items():
            print(
                line(name, [s.stages[end] - (s.received if start == "received" else s.stages[start]) for s in staged])
            )
        print(line("  of which the POST (server round trip)", [s.stages["transaction_ms"] / 1000 for s in staged]))
    print(line("traboule end to end (storescu exit → server)", e2e))
    print(line("by hand: GET metadata + map + POST", totals))
    print(line("  GET metadata + map", [t - p for t, p in zip(totals, posts, strict=True)]))
    print(line("  POST (server round trip)", posts))
    print(f"ratio traboule t_stable / by hand: p50 {statistics.median(stable) / statistics.median(totals):.2f}")
    ours = read_back[0] if read_back else {}
    print(
        f"on the server: {len(read_back)}/{len(studies)} ImagingStudies from traboule, "
        f"{ours.get('numberOfSeries')} series / {ours.get('numberOfInstances')} instances in the first; "
        f"a by-hand Bundle is {size / 1024:.0f} KiB, traboule's ImagingStudy {len(json.dumps(ours)) / 1024:.0f} KiB"
    )
    repeated = [s.uid for s in studies if s.notices != 1]
    if repeated:
        print(f"WARNING: {len(repeated)} studies were notified more than once (or never): {repeated[:3]}")
    load = os.getloadavg()[0]
    if load > 1.5:
        print(f"WARNING: load average {load:.2f} after the run", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
