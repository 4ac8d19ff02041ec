"""The patient registry's pairs of a journaled message are committed without an fsync of their own (the journal's
answer waited for one, and `rebuild` records them again after a power loss); every other write keeps its fsync.
A process killed right after such a commit loses nothing (real SQLite files, a real ``kill -9``)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from traboule import model
from traboule.stores.patient_identity import PatientIdentities

INS = "279035121518989"  # a test INS-NIR with its key
OTHER_INS = "185057512345673"


def order(ipp: str, accession: str, ins: str = INS) -> model.ImagingOrder:
    return model.ImagingOrder(
        patient=model.Patient(
            ids=[
                model.Identifier(ipp, "CHU-LYON", "1.2.250.1.999.1.1", "PI"),
                model.Identifier(ins, "ASIP-SANTE-INS-NIR", "1.2.250.1.213.1.4.10", "INS"),
            ]
        ),
        accession_number=model.Identifier(accession, "CHU-LYON"),
    )


def statements(registry: PatientIdentities, call) -> list[str]:
    seen: list[str] = []
    registry._db.set_trace_callback(seen.append)
    try:
        call()
    finally:
        registry._db.set_trace_callback(None)
    return seen


def test_journaled_pairs_commit_without_fsync_others_with(tmp_path: Path) -> None:
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    try:
        journaled = [order("IPP1", "ACC1")]
        assert registry.admit(journaled)
        seen = statements(registry, lambda: registry.record(journaled, channel="ris", journal_id=7))
        insert = next(i for i, s in enumerate(seen) if s.startswith("INSERT OR IGNORE INTO ins"))
        assert "PRAGMA synchronous = NORMAL" in seen[:insert]
        assert seen[-1] == "PRAGMA synchronous = FULL"
        not_journaled = [
            order("IPP2", "ACC2", OTHER_INS)
        ]  # a study or a step: no journal entry of the channel behind it
        assert registry.admit(not_journaled)
        seen = statements(registry, lambda: registry.record(not_journaled))
        assert any(s.startswith("INSERT OR IGNORE INTO ins") for s in seen)
        assert not any(s.startswith("PRAGMA synchronous") for s in seen)
        assert registry._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL for the next writes
    finally:
        registry.close()
    with sqlite3.connect(tmp_path / "patients.sqlite") as db:
        assert sorted(r[0] for r in db.execute("SELECT ipp FROM ins")) == ["IPP1", "IPP2"]


def test_journaled_pairs_survive_a_killed_process(tmp_path: Path) -> None:
    path = tmp_path / "patients.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
        from test_identity_durability import order
        from traboule.stores.patient_identity import PatientIdentities
        registry = PatientIdentities({str(path)!r})
        payloads = [order("IPP9", "ACC9")]
        assert registry.admit(payloads)
        registry.record(payloads, channel="ris", journal_id=1)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: what the WAL holds is all there is
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert os.path.exists(f"{path}-wal")
    registry = PatientIdentities(path)
    try:
        assert [p.ipp for p in registry.known(registry_pair("IPP9"))] == ["IPP9"]
    finally:
        registry.close()


def registry_pair(ipp: str):
    from traboule.stores.patient_identity import Pair

    return Pair(ipp, "1.2.250.1.999.1.1", "CHU-LYON", "1.2.250.1.213.1.4.10", INS)
