"""The patient registry's pairs of a journaled message are committed without an fsync of their own (the journal's
answer waited for one, and `rebuild` records them again after a power loss); every other write keeps its fsync.
A process killed right after such a commit loses nothing (real SQLite files, a real ``kill -9``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from traboule import model
from traboule.errors import MappingFailure
from traboule.stores.patient_identity import REBUILD_MARGIN, Pair, PatientIdentities, _now

INS = "279035121518989"  # a test INS-NIR with its key
OTHER_INS = "185057512345673"
THIRD_INS = "201017500012347"
NIA = "185057512345673"  # (a NIA has the same form)
NIA_OID = "1.2.250.1.213.1.4.9"


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


def registry_pair(ipp: str) -> Pair:
    return Pair(ipp, "1.2.250.1.999.1.1", "CHU-LYON", "1.2.250.1.213.1.4.10", INS)


class PowerLoss:
    """What a power loss leaves of a registry file: the database file as it is (no checkpoint runs: the test turns
    them off) and its write-ahead log up to the end of the last commit made with ``synchronous=FULL``, on either of
    the registry's connections. Traced statement by statement (a trace comes before its statement runs: the size
    read at the statement after a full commit includes that commit)."""

    def __init__(self, registry: PatientIdentities) -> None:
        self.wal = Path(f"{registry.path}-wal")
        self.modes: dict[int, str] = {}
        for conn in (registry._db, registry._writer):
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.modes[id(conn)] = {2: "FULL", 1: "NORMAL"}[conn.execute("PRAGMA synchronous").fetchone()[0]]
            conn.set_trace_callback(lambda statement, conn=conn: self.trace(conn, statement))
        self.durable = self.wal.stat().st_size  # the test starts from a synced file
        self.committing = False

    def trace(self, conn: sqlite3.Connection, statement: str) -> None:
        self.settle()
        if statement.startswith("PRAGMA synchronous = "):
            self.modes[id(conn)] = statement.rsplit(" ", 1)[1]
        elif statement == "COMMIT" and self.modes[id(conn)] == "FULL":
            self.committing = True

    def settle(self) -> None:
        if self.committing:
            self.durable, self.committing = self.wal.stat().st_size, False

    def copy(self, registry: PatientIdentities, to: Path) -> Path:
        """The file as the power loss left it, in ``to`` (the registry is closed)."""
        self.settle()
        path = to / "patients.sqlite"
        shutil.copy(registry.path, path)
        path.with_name("patients.sqlite-wal").write_bytes(self.wal.read_bytes()[: self.durable])
        registry.close()
        return path


def restarted(path: Path, journal: list[tuple[int, str, list[Any]]]) -> PatientIdentities:
    """The registry after a restart: the orders channel's `rebuild` from its mark (less the margin), as at start."""
    registry = PatientIdentities(path)
    after = max(0, (registry.mark("ris") or journal[-1][0]) - REBUILD_MARGIN)
    registry.rebuild([entry for entry in journal if entry[0] > after], "ris")
    return registry


def ins_of(registry: PatientIdentities, ipp: str) -> list[str]:
    return [p.ins for p in registry.known(Pair(ipp, "1.2.250.1.999.1.1", "CHU-LYON", "1.2.250.1.213.1.4.10", ""))]


def journaled(registry: PatientIdentities, journal: list[tuple[int, str, list[Any]]], payloads: list[Any]) -> None:
    """A message accepted: journaled (the journal's fsync), then recorded as the orders channel records it."""
    journal.append((len(journal) + 1, _now(), payloads))
    if not registry.admit(payloads):
        registry.resolve_merged(payloads)
        registry.check(payloads)
    registry.record(payloads, channel="ris", journal_id=len(journal))


def test_a_power_loss_loses_no_journaled_pair_and_no_replaced_ins(tmp_path: Path) -> None:
    """New patients' pairs committed without their own fsync come back by `rebuild`; an identity source's new INS
    (its old pair removed, fsynced) is not left to a replay that would skip it."""
    (tmp_path / "lost").mkdir()
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    journal: list[tuple[int, str, list[Any]]] = []
    journaled(registry, journal, [order("IPP1", "ACC1")])  # the first mark of the channel: fsynced
    power = PowerLoss(registry)
    update = model.PatientUpdate(patient=order("IPP1", "ACC0", THIRD_INS).patient, authoritative=True)
    journaled(registry, journal, [update])
    journaled(registry, journal, [order("IPP2", "ACC2", OTHER_INS)])  # after every fsync: lost, then rebuilt
    assert ins_of(registry, "IPP1") == [THIRD_INS] and ins_of(registry, "IPP2") == [OTHER_INS]
    lost = power.copy(registry, tmp_path / "lost")
    with contextlib.closing(PatientIdentities(lost)) as before_rebuild:
        assert ins_of(before_rebuild, "IPP2") == []  # what the power loss took
    after = restarted(lost, journal)
    try:
        assert ins_of(after, "IPP1") == [THIRD_INS] and ins_of(after, "IPP2") == [OTHER_INS]
        with pytest.raises(MappingFailure, match="another"):  # the replaced INS is refused, as before the loss
            after.check([order("IPP1", "ACC3")])
    finally:
        after.close()


def test_a_power_loss_on_a_fresh_registry_leaves_its_first_mark_to_rebuild_from(tmp_path: Path) -> None:
    """A fresh registry beside a journal: more than `REBUILD_MARGIN` messages recorded after its first mark (which
    is fsynced, unlike the marks after it), then the power goes: every patient comes back."""
    (tmp_path / "lost").mkdir()
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    power = PowerLoss(registry)
    journal: list[tuple[int, str, list[Any]]] = []
    count = REBUILD_MARGIN + 88
    for n in range(count):
        journaled(registry, journal, [order(f"IPP{n:05d}", f"ACC{n}", nir(n))])
    after = restarted(power.copy(registry, tmp_path / "lost"), journal)
    try:
        assert all(ins_of(after, f"IPP{n:05d}") == [nir(n)] for n in range(count))
    finally:
        after.close()


def nir(n: int) -> str:
    body = f"{1790375000000 + n:013d}"
    return f"{body}{97 - int(body) % 97:02d}"


def test_an_ipp_acted_on_keeps_the_fsync_of_pairs_recorded_after_the_action(tmp_path: Path) -> None:
    """An order received before an identity source's INS change but recorded after it (both in flight together) adds
    an INS of another kind: `rebuild` does not replay a message received before an action on its IPP, so that pair
    is fsynced, and a power loss does not take it."""
    (tmp_path / "lost").mkdir()
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    journal: list[tuple[int, str, list[Any]]] = []
    journaled(registry, journal, [order("IPP1", "ACC1")])
    power = PowerLoss(registry)
    early = order("IPP1", "ACC2", THIRD_INS)  # the new NIR, and an NIA IPP1 did not have
    early.patient.ids.append(model.Identifier(NIA, "ASIP-SANTE-INS-NIA", "1.2.250.1.213.1.4.9", "INS"))
    received = _now()
    update = model.PatientUpdate(patient=order("IPP1", "ACC0", THIRD_INS).patient, authoritative=True)
    journaled(registry, journal, [update])  # the action, after the order's reception
    journal.append((len(journal) + 1, received, [early]))
    registry.resolve_merged([early])
    registry.check([early])
    registry.record([early], channel="ris", journal_id=len(journal))
    assert sorted(p.ins for p in registry.known(Pair("IPP1", "1.2.250.1.999.1.1", "CHU-LYON", NIA_OID, ""))) == [NIA]
    after = restarted(power.copy(registry, tmp_path / "lost"), sorted(journal, key=lambda e: e[0]))
    try:
        assert [p.ins for p in after.known(Pair("IPP1", "1.2.250.1.999.1.1", "CHU-LYON", NIA_OID, ""))] == [NIA]
        assert ins_of(after, "IPP1") == [THIRD_INS]
    finally:
        after.close()


def test_a_mark_never_passes_a_message_whose_pairs_were_not_written(tmp_path: Path) -> None:
    """The database refuses a journaled message's pairs (logged, they stay reserved): the channel's mark stays below
    it while the process runs, so that the next start's `rebuild` records them."""
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    journal: list[tuple[int, str, list[Any]]] = []
    try:
        journaled(registry, journal, [order("IPP1", "ACC1")])
        assert registry.mark("ris") == 1
        registry._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON ins BEGIN SELECT RAISE(ABORT, 'no room'); END")
        journaled(registry, journal, [order("IPP2", "ACC2", OTHER_INS)])
        registry._db.execute("DROP TRIGGER refuse")
        journaled(registry, journal, [order("IPP3", "ACC3", THIRD_INS)])
        assert ins_of(registry, "IPP2") == [] and ins_of(registry, "IPP3") == [THIRD_INS]
        assert registry.mark("ris") == 1
    finally:
        registry.close()
    after = restarted(tmp_path / "patients.sqlite", journal)
    try:
        assert ins_of(after, "IPP2") == [OTHER_INS]
    finally:
        after.close()
