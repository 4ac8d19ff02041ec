"""Patient identity registry: the INS each local patient identifier (IPP) was accepted with.

An order often arrives with the IPP alone; the INS (French national health identifier) is qualified later and
comes with an ADT or the report. The registry remembers, per IPP and INS kind (its OID: NIR, NIA, test, demo),
the INS value of the first accepted message that gave one. A later message that gives the same IPP another INS
of that kind is refused at ingest (`check` raises `MappingFailure`: AE naming PID-3, journaled as rejected): an
INS is added, never silently replaced. Resolving such a conflict is the patient identity system's work (a
merge or a correction), not the imaging engine's.

Two IPPs are the same when their values are equal and their assigning authorities do not disagree (both OIDs
given and different, or both namespaces given and different): a message without authority is the same patient.

``check`` runs before the journal write and reserves what it let through (for `RESERVED` seconds), so that two
messages in flight with different INS for one IPP are not both accepted; ``record`` writes the pairs once the
message is journaled (idempotent: a redelivery or a resend records nothing new). SQLite ``<data_dir>/
patients.sqlite`` (WAL, synchronous FULL), shared by the engine's inbound channels.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from traboule.hl7_mapping import MappingFailure, ins_key_ok
from traboule.model import INS_OIDS, Patient

SCHEMA = """
CREATE TABLE IF NOT EXISTS ins (
    ipp TEXT NOT NULL,
    ipp_oid TEXT NOT NULL,
    ipp_namespace TEXT NOT NULL,
    ins_oid TEXT NOT NULL,
    ins TEXT NOT NULL,
    recorded TEXT NOT NULL,
    PRIMARY KEY (ipp, ipp_oid, ipp_namespace, ins_oid)
);
"""
log = structlog.get_logger("traboule.patient_identity")
RESERVED = 60.0  # seconds a checked pair holds until its message is journaled (a report's CDA takes seconds)


@dataclass(frozen=True)
class Pair:
    """An IPP (value and assigning authority) and one INS given with it."""

    ipp: str
    ipp_oid: str
    ipp_namespace: str
    ins_oid: str
    ins: str

    def same_ipp(self, other: Pair) -> bool:
        if self.ipp != other.ipp or self.ins_oid != other.ins_oid:
            return False
        if self.ipp_oid and other.ipp_oid:
            return self.ipp_oid == other.ipp_oid
        if self.ipp_namespace and other.ipp_namespace:
            return self.ipp_namespace == other.ipp_namespace
        return True


def pairs_of(payloads: Iterable[Any]) -> list[Pair]:
    """The (IPP, INS) pairs the patients of canonical payloads carry. An INS with a wrong check key is not one:
    orders and ADT leave it out, reports are refused for it."""
    out: list[Pair] = []
    for payload in payloads:
        patient = getattr(payload, "patient", None)
        if patient is None:
            patient = getattr(getattr(payload, "report", None), "patient", None)
        if not isinstance(patient, Patient):
            continue
        ipp = patient.primary_id
        if ipp is None or not ipp.value or _is_ins(ipp):
            continue
        for ident in patient.ids:
            if _is_ins(ident) and ident.value and ins_key_ok(ident.value):
                out.append(Pair(ipp.value, ipp.issuer_oid, ipp.issuer, ident.issuer_oid, ident.value.upper()))
    return out


def _is_ins(ident: Any) -> bool:
    return bool(ident.type == "INS" or ident.issuer_oid in INS_OIDS)


class PatientIdentities:
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._reserved: dict[str, dict[Pair, float]] = {}  # by IPP value: pairs checked, not yet recorded
        self._pruned = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def known(self, pair: Pair) -> list[Pair]:
        """The recorded INS of this kind for the same IPP."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM ins WHERE ipp = ? AND ins_oid = ?",
                (pair.ipp, pair.ins_oid),
            ).fetchall()
        return [p for p in (Pair(*row) for row in rows) if p.same_ipp(pair)]

    def check(self, payloads: Iterable[Any]) -> None:
        """Refuse (`MappingFailure`, PID-3) a message giving an IPP another INS than the one it was accepted
        with; otherwise reserve its pairs until `record`."""
        pairs = pairs_of(payloads)
        if not pairs:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._pruned > RESERVED:  # expired reservations (messages refused later, or never stored)
                self._pruned = now
                self._reserved = {
                    ipp: fresh
                    for ipp, held in self._reserved.items()
                    if (fresh := {p: at for p, at in held.items() if now - at < RESERVED})
                }
            held = [p for pair in pairs for p, at in self._reserved.get(pair.ipp, {}).items() if now - at < RESERVED]
        for pair in pairs:
            others = [p for p in [*self.known(pair), *held, *pairs] if p.same_ipp(pair) and p.ins != pair.ins]
            if others:
                kind = INS_OIDS.get(pair.ins_oid, "INS")
                raise MappingFailure(
                    f"identity conflict: this patient identifier was accepted with another {kind}; the INS is "
                    "not replaced (correct the identity, or merge, in the patient identity system)",
                    "PID-3",
                    code="205",
                )
        with self._lock:
            for pair in pairs:
                self._reserved.setdefault(pair.ipp, {})[pair] = now

    def record(self, payloads: Iterable[Any]) -> None:
        """Remember the pairs of a journaled (accepted) message. Only a new pair is a write (one commit, ~0.3 ms
        here): the messages of a known patient cost a read."""
        given = pairs_of(payloads)
        pairs = [p for p in given if p not in self.known(p)]
        recorded = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._lock:
            if not pairs:
                self._release(given)
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO ins VALUES (?, ?, ?, ?, ?, ?)",
                        [(p.ipp, p.ipp_oid, p.ipp_namespace, p.ins_oid, p.ins, recorded) for p in pairs],
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:  # the message is journaled and must be answered: its pairs stay reserved
                log.warning("identities.not_recorded", error=str(exc), pairs=len(pairs))
                return
            self._release(given)

    def _release(self, pairs: list[Pair]) -> None:
        for pair in pairs:
            held = self._reserved.get(pair.ipp)
            if held is not None:
                held.pop(pair, None)
                if not held:
                    del self._reserved[pair.ipp]
