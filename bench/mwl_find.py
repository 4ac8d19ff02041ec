"""MWL C-FIND latency: traboule's SCP vs dcmtk wlmscpfs serving the same items, with the same findscu query.

Items are built by the real mapping (``mwl.yaml``) from synthetic orders spread over 100 days, 8 modalities and
enough stations per modality that "today + CT + station AE" returns about 10-20 items at every size. Each size
is loaded into traboule's worklist store and written as .wl files for wlmscpfs (file reject on, as shipped).
Timings are whole findscu / echoscu runs (process start + association + query), median of ``--runs``.

    .venv/bin/python bench/mwl_find.py [--sizes 1000 10000 100000] [--runs 15]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from traboule import model  # noqa: E402
from traboule.adapters.dicom_mwl import WorklistSCP  # noqa: E402
from traboule.adapters.worklist_files import WorklistFileWriter  # noqa: E402
from traboule.stores.worklist import WorklistStore  # noqa: E402
from traboule.translate.dicom_mapping import MWLMapping  # noqa: E402

MODALITIES = ["CT", "MR", "US", "DX", "MG", "NM", "PT", "XA"]
DAYS = 100
TODAY = date(2026, 11, 25)
KEYS = [
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
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepDescription",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stations_per_modality(size: int) -> int:
    per_modality_day = size / DAYS / len(MODALITIES)
    return max(1, round(per_modality_day / 15))


def order(i: int, stations: int) -> model.ImagingOrder:
    modality = MODALITIES[i % len(MODALITIES)]
    day = TODAY - timedelta(days=DAYS // 2) + timedelta(days=(i // len(MODALITIES)) % DAYS)
    station = f"{modality}{(i // (len(MODALITIES) * DAYS)) % stations + 1:02d}"
    minute = (i * 7) % 600
    start = f"{day:%Y%m%d}{8 + minute // 60:02d}{minute % 60:02d}00"
    return model.ImagingOrder(
        placer_order_number=model.Identifier(f"PLC{i:07d}", "RIS"),
        accession_number=model.Identifier(f"ACC{i:07d}"),
        requested_procedure_id=f"RP{i:07d}",
        study_instance_uid=f"1.2.826.0.1.3680043.10.543.{i}",
        procedure=model.Code("ZBQK002", "Scanner thoracique", "CCAM"),
        patient=model.Patient(
            ids=[model.Identifier(f"IPP{i % 40000:06d}", "CHU-X", type="PI")],
            name=model.PersonName("DUPONT", "Hélène" if i % 3 else "Zoë"),
            birth_date="19700101",
            sex="F",
        ),
        steps=[
            model.ScheduledStep(
                step_id=f"SPS{i:07d}",
                modality=modality,
                station_aet=station,
                start=start,
                description="Scanner thoracique",
                protocol=model.Code("P1", "Protocole", "L"),
            )
        ],
    )


def load(store: WorklistStore, writer: WorklistFileWriter, mapping: MWLMapping, start: int, end: int, stations: int):
    batch = []
    for i in range(start, end):
        o = order(i, stations)
        ((step, ds),) = mapping.items(o)
        key = f"{o.key}#{step.step_id}"
        writer.write(key, ds)
        batch.append((key, ds))
        if len(batch) == 1000:
            store.apply(batch, [])
            batch = []
    if batch:
        store.apply(batch, [])


def timed(cmd: list[str], runs: int) -> tuple[float, str]:
    times = []
    out = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        times.append(time.perf_counter() - t0)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {out[-500:]}")
    return statistics.median(times), out


def findscu_cmd(port: int, aec: str, stations: int) -> list[str]:
    cmd = ["findscu", "-v", "-W", "-aet", "MODALITY1", "-aec", aec, "127.0.0.1", str(port)]
    query = [
        "ScheduledProcedureStepSequence[0].Modality=CT",
        "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01",
        f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={TODAY:%Y%m%d}",
    ]
    for key in KEYS + query:
        cmd += ["-k", key]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if not shutil.which("wlmscpfs"):
        sys.exit("dcmtk is not installed (apt-get install dcmtk)")
    mapping = MWLMapping()
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            folder = base / "wl" / "WLMSCP"
            writer = WorklistFileWriter(str(folder), durable=False)
            store = WorklistStore(str(base / "worklist.sqlite"))
            stations = stations_per_modality(size)
            t0 = time.perf_counter()
            load(store, writer, mapping, 0, size, stations)
            loaded = time.perf_counter() - t0
            scp_port, wlm_port = free_port(), free_port()
            scp = WorklistSCP(store.find, ae_title="TRABOULE", port=scp_port)
            scp.start()
            wlm = subprocess.Popen(
                ["wlmscpfs", "-s", "-csk", "-dfp", str(base / "wl"), str(wlm_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(0.5)
                timed(findscu_cmd(scp_port, "TRABOULE", stations), 2)  # warm-up
                ours, out_ours = timed(findscu_cmd(scp_port, "TRABOULE", stations), args.runs)
                theirs, out_theirs = timed(findscu_cmd(wlm_port, "WLMSCP", stations), max(3, args.runs // 3))
                echo, _ = timed(["echoscu", "-aec", "TRABOULE", "127.0.0.1", str(scp_port)], args.runs)
            finally:
                scp.stop()
                wlm.terminate()
                wlm.wait(10)
                store.close()
            n_ours = out_ours.count("(Pending)")
            n_theirs = out_theirs.count("(Pending)")
            rows.append((size, stations, n_ours, n_theirs, ours, theirs, echo, loaded))
            print(f"size {size}: loaded in {loaded:.1f} s", file=sys.stderr)

    print(
        f"{'items':>7} {'matches':>8} {'traboule ms':>12} {'wlmscpfs ms':>12} {'echoscu ms':>11} "
        f"{'wlmscpfs/traboule':>18} {'traboule/echoscu':>17}"
    )
    for size, _, n_ours, n_theirs, ours, theirs, echo, _ in rows:
        matches = f"{n_ours}/{n_theirs}"
        print(
            f"{size:>7} {matches:>8} {ours * 1000:>12.1f} {theirs * 1000:>12.1f} {echo * 1000:>11.1f} "
            f"{theirs / ours:>18.1f} {ours / echo:>17.2f}"
        )


if __name__ == "__main__":
    main()
