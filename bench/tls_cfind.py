"""MWL C-FIND latency with and without DICOM TLS, side by side in one run.

One worklist store (``--items`` items, the query returns ``--matches`` of them) is served by two WorklistSCPs at
once: plain TCP and TLS (the engine's BCP 195 context, client certificate required, ECDSA P-256 certificates from a
throwaway test PKI). Each is queried the same way, in turn:

* ``pynetdicom, association per query``: an in-process SCU opens an association (TCP + TLS handshake + A-ASSOCIATE),
  sends one C-FIND, releases; what a modality that connects for each worklist refresh costs.
* ``pynetdicom, one association``: one association, ``--queries`` C-FINDs on it: the cost of TLS on the data alone.
* ``findscu, process per query`` (dcmtk, when installed): whole runs, process start included, as the modality's
  operator sees it.

Prints p50 / p99 per mode in milliseconds and the TLS / plain ratios.

    .venv/bin/python bench/tls_cfind.py [--queries 300] [--findscu-runs 40] [--items 2000] [--matches 10]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import ModalityWorklistInformationFind  # noqa: E402

from tests.peer_dcmtk import mwl_item  # noqa: E402
from tests.tls_pki import PKI, make_pki  # noqa: E402
from traboule.adapters.dicom_mwl import WorklistSCP  # noqa: E402
from traboule.stores.worklist import WorklistStore  # noqa: E402
from traboule.tls import TLSSettings, client_context, server_context  # noqa: E402

HOST = "127.0.0.1"
AET = "TRABOULE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def fill(store: WorklistStore, items: int, matches: int) -> None:
    rows = []
    for i in range(items):
        station = "CT01" if i < matches else f"ST{i % 97:02d}"
        rows.append((f"o{i}#1", mwl_item(accession=f"ACC{i:06d}", patient_id=f"PID{i:06d}", station_aet=station)))
    store.apply(rows, [])


def query() -> Dataset:
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyInstanceUID"):
        setattr(ds, keyword, "")
    sps = Dataset()
    sps.ScheduledStationAETitle = "CT01"
    sps.Modality = ""
    sps.ScheduledProcedureStepStartDate = ""
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


class Client:
    """A pynetdicom MWL SCU, with or without TLS."""

    def __init__(self, port: int, pki: PKI | None) -> None:
        self.port = port
        self.tls = None
        if pki is not None:
            settings = TLSSettings(
                cert_file=str(pki.modality.cert), key_file=str(pki.modality.key), ca_file=str(pki.ca)
            )
            self.tls = (client_context(settings), "localhost")
        self.ae = AE(ae_title="CT01")
        self.ae.add_requested_context(ModalityWorklistInformationFind)
        self.identifier = query()

    def associate(self) -> object:
        assoc = self.ae.associate(HOST, self.port, ae_title=AET, tls_args=self.tls)
        if not assoc.is_established:
            raise RuntimeError(f"no association with {HOST}:{self.port}")
        return assoc

    def find(self, assoc: object, expected: int) -> None:
        found = 0
        for status, identifier in assoc.send_c_find(self.identifier, ModalityWorklistInformationFind):  # type: ignore[attr-defined]
            if status and status.Status == 0xFF00 and identifier is not None:
                found += 1
        if found != expected:
            raise RuntimeError(f"{found} matches, expected {expected}")

    def per_query(self, expected: int) -> None:
        assoc = self.associate()
        self.find(assoc, expected)
        assoc.release()  # type: ignore[attr-defined]


def timed(runs: int, once: Callable[[], None], warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        once()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        once()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def findscu_args(port: int, pki: PKI | None) -> list[str]:
    args = ["findscu", "-W", "-aet", "CT01", "-aec", AET, "-k", "PatientID", "-k", "AccessionNumber"]
    args += ["-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01"]
    if pki is not None:
        args += ["+tls", str(pki.modality.key), str(pki.modality.cert), "+cf", str(pki.ca), "+px"]
    return [*args, HOST, str(port)]


def run_findscu(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=300, help="C-FINDs per pynetdicom mode and transport")
    parser.add_argument("--findscu-runs", type=int, default=40, help="findscu runs per transport (0: none)")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--matches", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tls-cfind-") as folder:
        pki = make_pki(Path(folder) / "pki")
        store = WorklistStore(str(Path(folder) / "worklist.sqlite"))
        fill(store, args.items, args.matches)
        settings = TLSSettings(
            enabled=True,
            cert_file=str(pki.server.cert),
            key_file=str(pki.server.key),
            ca_file=str(pki.ca),
            client_certs="required",
        )
        plain = WorklistSCP(store.find, ae_title=AET, port=free_port())
        secure = WorklistSCP(store.find, ae_title=AET, port=free_port(), ssl_context=server_context(settings))
        plain.start()
        secure.start()
        results: dict[str, dict[str, list[float]]] = {}
        try:
            clients = {"plain": Client(plain.port, None), "TLS": Client(secure.port, pki)}
            for name, client in clients.items():
                assoc = client.associate()
                try:
                    many = timed(args.queries, lambda c=client, a=assoc: c.find(a, args.matches))
                finally:
                    assoc.release()  # type: ignore[attr-defined]
                results.setdefault("pynetdicom, one association", {})[name] = many
                per = timed(args.queries, lambda c=client: c.per_query(args.matches))
                results.setdefault("pynetdicom, association per query", {})[name] = per
            if args.findscu_runs and shutil.which("findscu"):
                for name, server in (("plain", plain), ("TLS", secure)):
                    command = findscu_args(server.port, pki if name == "TLS" else None)
                    samples = timed(args.findscu_runs, lambda c=command: run_findscu(c), warmup=2)
                    results.setdefault("findscu, process per query", {})[name] = samples
        finally:
            plain.stop()
            secure.stop()
            store.close()
    print(
        f"C-FIND, {args.items} items, {args.matches} matches per query; "
        f"{args.queries} queries per pynetdicom mode, {args.findscu_runs} findscu runs (ms)"
    )
    header = f"{'mode':<36} {'plain p50':>10} {'plain p99':>10} {'TLS p50':>9} {'TLS p99':>9} {'p50 x':>6} {'p99 x':>6}"
    print(header)
    print("-" * len(header))
    for mode, by in results.items():
        a, b = by["plain"], by["TLS"]
        print(
            f"{mode:<36} {p(a, 0.5):>10.2f} {p(a, 0.99):>10.2f} {p(b, 0.5):>9.2f} {p(b, 0.99):>9.2f} "
            f"{p(b, 0.5) / p(a, 0.5):>6.2f} {p(b, 0.99) / p(a, 0.99):>6.2f}"
        )


if __name__ == "__main__":
    main()
