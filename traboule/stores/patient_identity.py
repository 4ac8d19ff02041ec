"""Patient identity registry: the INS each local patient identifier (IPP) was accepted with, the patient each order,
accession number and study belongs to, and the merges.

*INS.* An order often arrives with the IPP alone; the INS (French national health identifier) is qualified later and
comes with an ADT or the report. The registry remembers, per IPP and INS kind (its OID: NIR, NIA, test, demo),
the INS value of the first accepted message that gave one. A later message that gives the same IPP another INS
of that kind is refused at ingest (`check` raises `MappingFailure`: AE naming PID-3, journaled as rejected): an
order, a report or a performed step never replaces an INS. The patient identity system does: a patient update
(ADT^A08/A31) from an identity source (``PatientUpdate.authoritative``, set by the inbound channel from its
``identity_sources``) gives the IPP its new INS, which replaces the recorded one (`check` returns the warning to
journal; the owners of the IPP's orders take the new INS). An operator removes a recorded INS with `forget`
(``traboule patients forget IPP``).

*Never a document on the wrong patient.* Each accepted order records, per key it carries (accession number,
placer and filler order numbers, Study Instance UID: their values), the patient it belongs to (IPP and INS); a
report, a performed step or a study records the keys no order gave yet. An order (`check_order`: a patient change of
an order comes through the identity system, a merge), a report (`check_report`), a performed step (`check_step`) or
a stable study (`check_study`) naming a key of another patient is refused, the reason naming both patients (for the
ACK and the journal, never the log). Two IPPs of one assigning authority with different values are two patients until
merged (`check` refuses a message giving an IPP the INS another IPP of its authority holds); otherwise two patients
are the same when they share an INS of a kind (an INS of that kind that differs says two persons, whatever the IPP),
else when their IPPs are the same.

*Merges.* An accepted ADT^A40 records each merged IPP → the surviving IPP (and gives the survivor the merged IPP's
recorded INS: one person). `resolve_merged` applies every later message naming a merged IPP to the survivor (its
patient's identifiers replaced by the surviving IPP and the INS the registry holds for it now, a warning for the
journal); the orders of a merged IPP belong to its survivor (merges are followed
when patients are compared).

Two IPPs are the same when their values are equal and their assigning authorities do not disagree (both OIDs
given and different, or both namespaces given and different): a message without authority is the same patient.

``check`` runs before the journal write and reserves what it let through (for `RESERVED` seconds), so that two
messages in flight with different INS for one IPP are not both accepted; ``record`` writes what a message says once
it is journaled (idempotent: a redelivery or a resend records nothing new), ``release`` frees what a message that was
not accepted (refused, a duplicate, not stored) reserved. ``admit`` decides the usual message (an order, patient
updates: no merge, no identity source, nothing to refuse or warn about) as ``resolve_merged``, ``check``,
``check_report`` and ``check_order`` would, with one query and what is held in memory, and declines (changing
nothing) anything else; its ``record`` reads none of its pairs again unless an INS was removed meanwhile (each removal
is an action: their count tells). SQLite ``<data_dir>/patients.sqlite``
(WAL), shared by the engine's inbound channels (orders, MPPS, archive) and processes. Merges, replaced INS and the
pairs of what no journal entry of the channel stands behind are committed with ``synchronous=FULL``; the new pairs of
a journaled message without an fsync of their own (the journal's answer waited for one; see `_record_pairs`), the
first mark each process writes for a channel with one. The owners of order keys, new with nearly every
order, are held in memory (the checks see them at once) and written together every `OWNERS_FLUSH` seconds by a
thread of the event loop's pool, on a connection of their own with ``synchronous=NORMAL``: off the ingest path's
core, no fsync per order; the owners of the last fraction of a second before a crash of the engine may be lost (a
report for such an order would be checked against nothing), so each flush also writes the highest journal id of
the orders channel whose owners it holds (`mark`), and the channel's start records again (`rebuild`) what the
accepted messages journaled after it said (pairs, merges, owners; a crash between a journal write and its record
loses them too): nothing the journal acknowledged is unknown to the checks.

`PatientIdentities` implements `traboule.stores.PatientRegistry` (whose docstring states the guarantees every
backend keeps).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import structlog

from traboule.errors import MappingFailure
from traboule.model import (
    INS_OIDS,
    Document,
    Identifier,
    ImagingOrder,
    Patient,
    PatientUpdate,
    PerformedStep,
    Report,
    Study,
)
from traboule.stores.sqlite import Durability, open_database
from traboule.translate.hl7_mapping import ins_key_ok

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
CREATE INDEX IF NOT EXISTS ins_by_value ON ins (ins_oid, ins);
CREATE TABLE IF NOT EXISTS owners (
    kind TEXT NOT NULL,          -- accession, placer, filler, study
    key TEXT NOT NULL,           -- its value
    patient TEXT NOT NULL,       -- JSON: the identifiers (IPP, INS) of the patient it belongs to
    source TEXT NOT NULL,        -- order, report, step, study: an order's word replaces the others'
    recorded TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS marks (
    channel TEXT PRIMARY KEY,    -- an inbound channel
    journal_id INTEGER NOT NULL  -- the highest journal id of its messages whose owners are written
);
CREATE TABLE IF NOT EXISTS actions (
    at TEXT NOT NULL,
    action TEXT NOT NULL,        -- ins-changed (an identity source's ADT), ins-forgotten (an operator)
    ipp TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS actions_by_ipp ON actions (ipp);
CREATE TABLE IF NOT EXISTS merges (
    ipp TEXT NOT NULL,
    ipp_oid TEXT NOT NULL,
    ipp_namespace TEXT NOT NULL,
    survivor TEXT NOT NULL,      -- JSON: the surviving IPP (its INS: the ins table's, read when resolved)
    recorded TEXT NOT NULL,
    PRIMARY KEY (ipp, ipp_oid, ipp_namespace)
);
"""
log = structlog.get_logger("traboule.stores.patient_identity")
RESERVED = 60.0  # seconds a checked pair holds until its message is journaled (a report's CDA takes seconds)
OWNERS_FLUSH = 0.05  # seconds the owners of order keys wait in memory to be written together
WRITTEN_KEPT = 100_000  # owners remembered as written (to skip rewriting them for each message of an order)
REBUILD_MARGIN = 512  # journal ids re-recorded before the mark: one group commit (messages may record out of order)
MAX_MERGE_CHAIN = 16  # merged into a patient later merged itself...: followed this far
# How long the merges' generation read from the file stays believed (`_merge_rows`): a merge recorded by another
# process is seen by the messages checked this long after it at most (a merge recorded in this process: at once).
MERGES_RECHECK_S = 0.05
_MERGES_WRITTEN: dict[str, int] = {}  # per registry file, the merges recorded by this process (its registries)
_MERGES_WRITTEN_LOCK = threading.Lock()  # registries of one file in several threads each count theirs
_INS_NAMES = {  # the namespace of an INS by its OID (PID-3.4.1)
    "1.2.250.1.213.1.4.8": "ASIP-SANTE-INS-NIR",
    "1.2.250.1.213.1.4.9": "ASIP-SANTE-INS-NIA",
    "1.2.250.1.213.1.4.10": "ASIP-SANTE-INS-NIR",
    "1.2.250.1.213.1.4.11": "ASIP-SANTE-INS-NIR",
}
KEY_NAMES = {
    "accession": "accession number",
    "placer": "placer order number",
    "filler": "filler order number",
    "study": "Study Instance UID",
}


class Pair(NamedTuple):
    """An IPP (value and assigning authority) and one INS given with it. A named tuple: made, hashed and compared
    in C, several times per message (a frozen dataclass cost a few µs each)."""

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


_PAIR = "ipp, ipp_oid, ipp_namespace, ins_oid, ins"  # a Pair's columns


@dataclass(frozen=True)
class _Admitted:
    """What `PatientIdentities.admit` read for a message in flight: its payloads (the very objects) and pairs, those
    recorded then, and how many pairs were ever removed then (the last action's rowid: each removal records one)."""

    payloads: list[Any]
    pairs: list[Pair]
    recorded: frozenset[Pair]
    version: int
    at: float


def same_ipp(a: Identifier, b: Identifier) -> bool:
    """Same value, assigning authorities that do not disagree: the same OID when both have one; else, when both
    name one, a common name (DICOM's single Issuer of Patient ID may hold the HL7 namespace or the OID)."""
    if a.value != b.value:
        return False
    if a.issuer_oid and b.issuer_oid:
        return a.issuer_oid == b.issuer_oid
    names_a, names_b = {a.issuer, a.issuer_oid} - {""}, {b.issuer, b.issuer_oid} - {""}
    return not (names_a and names_b) or bool(names_a & names_b)


def same_authority(a: Identifier, b: Identifier) -> bool:
    """Whether two local identifiers come from one assigning authority (`same_ipp`, whatever their values)."""
    return same_ipp(Identifier("-", a.issuer, a.issuer_oid), Identifier("-", b.issuer, b.issuer_oid))


def patient_of(payload: Any) -> Patient | None:
    """The patient a canonical payload names (a document's is its report's)."""
    if isinstance(payload, Document):
        payload = payload.report
    patient = getattr(payload, "patient", None)
    return patient if isinstance(patient, Patient) else None


def pairs_of(payloads: Iterable[Any]) -> list[Pair]:
    """The (IPP, INS) pairs the patients of canonical payloads carry. An INS with a wrong check key is not one:
    orders and ADT leave it out, reports are refused for it."""
    out: list[Pair] = []
    for payload in payloads:
        patient = patient_of(payload)
        if patient is None:
            continue
        ipp = _ipp(patient)
        if ipp is None:
            continue
        for ident in _ins(patient):
            out.append(Pair(ipp.value, ipp.issuer_oid, ipp.issuer, ident.issuer_oid, ident.value.upper()))
    return out


def keys_of(payload: Any) -> list[tuple[str, str]]:
    """The order keys a payload names: (kind, value) for its accession number, placer and filler order numbers and
    Study Instance UID."""
    if isinstance(payload, Document):
        payload = payload.report
    if isinstance(payload, Study):
        found = [("accession", payload.accession_number), ("study", payload.study_instance_uid)]
    elif isinstance(payload, _KEYED):
        found = [
            ("accession", _value(payload.accession_number)),
            ("placer", _value(payload.placer_order_number)),
            ("filler", _value(payload.filler_order_number)),
            ("study", payload.study_instance_uid),
        ]
    else:
        return []
    return [(kind, value.strip()) for kind, value in found if value and value.strip()]


_KEYED = (ImagingOrder, Report, PerformedStep)
_SOURCES = {ImagingOrder: "order", PerformedStep: "step", Study: "study"}


def describe(ids: list[Identifier]) -> str:
    """A patient's identifiers as the journal and the ACK name them: ``IPP0001 (CHU-LYON), INS-NIR 1790...``."""
    out = []
    for ident in ids:
        if _is_ins(ident):
            out.append(f"{INS_OIDS.get(ident.issuer_oid, 'INS')} {ident.value}")
        else:
            authority = ident.issuer or ident.issuer_oid
            out.append(f"{ident.value} ({authority})" if authority else ident.value)
    return ", ".join(out) or "no identifier"


def _value(ident: Any) -> str:
    return str(ident.value if isinstance(ident, Identifier) else ident or "")


def _is_ins(ident: Any) -> bool:
    return bool(ident.type == "INS" or ident.issuer_oid in INS_OIDS)


def _ipp(patient: Patient) -> Identifier | None:
    ipp = patient.primary_id
    return None if ipp is None or not ipp.value or _is_ins(ipp) else ipp


def _ins(patient: Patient) -> list[Identifier]:
    return [i for i in patient.ids if _is_ins(i) and i.value and ins_key_ok(i.value)]


def _local(patient: Patient) -> list[Identifier]:
    """Its local identifiers (not INS), the primary one first."""
    ipp = _ipp(patient)
    return ([ipp] if ipp else []) + [i for i in patient.ids if i.value and not _is_ins(i) and i is not ipp]


def _identity(patient: Patient) -> list[Identifier]:
    """What identifies a patient here: its IPP, then its valid INS."""
    ipp = _ipp(patient)
    return ([ipp] if ipp else []) + _ins(patient)


def _dump(ids: list[Identifier]) -> str:
    return json.dumps([[i.value, i.issuer, i.issuer_oid, i.type] for i in ids], ensure_ascii=False)


def _load(text: str) -> list[Identifier]:
    return [Identifier(*row) for row in json.loads(text)]


def same_patient(a: list[Identifier], b: list[Identifier]) -> bool:
    """Whether two identities name one patient: two IPPs of one assigning authority with different values say not
    (two patients until merged), a common INS says so and a different INS of one kind says not; else the same
    IPP."""
    ipp_a, ipp_b = next((i for i in a if not _is_ins(i)), None), next((i for i in b if not _is_ins(i)), None)
    if ipp_a and ipp_b and ipp_a.value != ipp_b.value and same_authority(ipp_a, ipp_b):
        return False
    ins_a = {i.issuer_oid: i.value.upper() for i in a if _is_ins(i)}
    ins_b = {i.issuer_oid: i.value.upper() for i in b if _is_ins(i)}
    common = ins_a.keys() & ins_b.keys()
    if common:
        return all(ins_a[k] == ins_b[k] for k in common)
    ipps_a = [i for i in a if not _is_ins(i)]
    return any(same_ipp(x, y) for x in ipps_a for y in b if not _is_ins(y))


class IdentityRules:
    """The registry's rules that read only its lookups (``survivor``, ``_refuse``): the same on every backend."""

    off_loop = False  # see `traboule.stores.PatientRegistry`

    def survivor(self, ipp: Identifier) -> list[Identifier] | None:
        raise NotImplementedError

    def _refuse(self, payloads: Iterable[Any], what: str, location: str) -> None:
        raise NotImplementedError

    def resolve_merged(self, payloads: Iterable[Any]) -> list[str]:
        """Apply to the surviving patient the payloads naming a merged IPP: their patient's identifiers become the
        survivor's (with the message's INS the survivor does not have). Returns the warnings to journal, one per
        payload changed. A merge message itself is left as it is."""
        notes = []
        for payload in payloads:
            if isinstance(payload, PatientUpdate) and payload.action == "merge":
                continue
            patient = patient_of(payload)
            ipp = _ipp(patient) if patient is not None else None
            if patient is None or ipp is None:
                continue
            survivor = self.survivor(ipp)
            if not survivor:
                continue
            # The message's INS stays unless the survivor has it: another of a kind the survivor has is refused
            # (`check`: one patient, one INS of a kind), never dropped.
            held = {(i.issuer_oid, i.value.upper()) for i in survivor if _is_ins(i)}
            extra = [i for i in _ins(patient) if (i.issuer_oid, i.value.upper()) not in held]
            patient.ids = [Identifier(i.value, i.issuer, i.issuer_oid, i.type) for i in survivor] + extra
            notes.append(
                f"patient {describe([ipp])} was merged into {describe(survivor[:1])}: applied to the surviving patient"
            )
        return notes

    def current(self, ids: list[Identifier]) -> list[Identifier]:
        """The identifiers of the patient ``ids`` is now: the survivor's when its IPP was merged."""
        ipp = next((i for i in ids if not _is_ins(i)), None)
        survivor = self.survivor(ipp) if ipp is not None else None
        return survivor or ids

    def check_report(self, payloads: Iterable[Any]) -> None:
        """Refuse (`MappingFailure`, PID-3) a report or document naming an order, accession number or study of
        another patient."""
        self._refuse((p for p in payloads if isinstance(p, Report | Document)), "report", "PID-3")

    def check_step(self, step: PerformedStep) -> None:
        """Refuse (`MappingFailure`) a performed step whose patient is not the one of the order it names."""
        self._refuse([step], "performed step", "PatientID")

    def check_study(self, study: Study) -> None:
        """Refuse (`MappingFailure`) a study whose patient is not the one of the order of its accession number or
        Study Instance UID."""
        self._refuse([study], "study", "PatientID")


class PatientIdentities(IdentityRules):
    """The patient identity registry of the engine's inbound channels (`traboule.stores.PatientRegistry`)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = open_database(self.path, Durability.POWER_LOSS, threads=True, busy_timeout_s=10.0)
        self._db.executescript(SCHEMA)
        self._reserved: dict[str, dict[Pair, float]] = {}  # by IPP value: pairs checked, not yet recorded
        self._holders: dict[Pair, int] = {}  # how many messages in flight hold each reserved pair
        # The keys of orders checked, not yet recorded: by key, per order in flight (its id), its patient and when.
        self._keys_held: dict[tuple[str, str], dict[int, tuple[list[Identifier], float]]] = {}
        self._keys_pruned = time.monotonic()
        # The owners of order keys are written by a thread of the event loop's pool on a connection of their own
        # (SQLite works without the interpreter lock: beside the ingest, not on its core), without an fsync each.
        self._writer = open_database(self.path, Durability.CRASH, threads=True, busy_timeout_s=10.0)
        self._write_lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[str, str]] = {}  # owners recorded, not yet written: text, source
        self._flushing: dict[tuple[str, str], tuple[str, str]] = {}  # being written
        self._flush_at: asyncio.TimerHandle | None = None
        self._merges: dict[str, list[tuple[str, str, str, str]]] | None = None  # by IPP value (`_merge_rows`)
        self._merges_version = -1
        self._merges_checked = float("-inf")  # when the file's generation was last read (monotonic)
        self._merges_local = 0  # `_MERGES_WRITTEN` of this file as it was then
        self._file = os.path.realpath(self.path)
        self._written: dict[tuple[str, str], str] = {}  # the owners written for orders here, not to write again
        self._pruned = time.monotonic()
        self._marks: dict[str, int] = {}  # per channel, the highest journal id recorded (`mark`)
        self._marked: dict[str, int] = {}  # ... and written
        self._mark_caps: dict[str, int] = {}  # per channel, below the first message whose pairs were not written
        self._admitted: dict[tuple[int, ...], _Admitted] = {}  # by its payloads' ids: what `admit` read
        self._admitted_pruned = time.monotonic()

    def close(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
        self.flush()
        with self._write_lock, self._lock:
            self._writer.close()
            self._db.close()

    def known(self, pair: Pair) -> list[Pair]:
        """The recorded INS of this kind for the same IPP."""
        with self._lock:
            rows = self._db.execute(
                # (the primary key by IPP: without statistics SQLite would take the INS index, every INS of a kind)
                "SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM ins WHERE ipp = ? AND +ins_oid = ?",
                (pair.ipp, pair.ins_oid),
            ).fetchall()
        return [p for p in (Pair(*row) for row in rows) if p.same_ipp(pair)]

    def check(self, payloads: Iterable[Any]) -> list[str]:
        """Refuse (`MappingFailure`, PID-3) a message giving an IPP another INS than the one it was accepted
        with; otherwise reserve its pairs until `record` (or `release`). A patient update from an identity source
        (``authoritative``) replaces the INS instead: returns the warnings to journal, one per INS it changes."""
        payloads = list(payloads)
        pairs = pairs_of(payloads)
        if not pairs:
            return []
        ruling = set(pairs_of(p for p in payloads if _authoritative(p)))
        now = time.monotonic()
        with self._lock:
            held, elsewhere = self._in_flight(pairs, now)
        notes = self._judge(pairs, ruling, held, elsewhere, self.known, self._ins_holders)
        with self._lock:
            self._reserve(pairs, now)
        return notes

    def _in_flight(self, pairs: list[Pair], now: float) -> tuple[list[Pair], list[Pair]]:
        """(lock held) The pairs reserved by messages in flight for the IPPs of ``pairs``, and those reserved with
        their INS (for other IPPs); expired reservations dropped now and then."""
        if now - self._pruned > RESERVED:  # expired reservations (messages refused later, or never stored)
            self._pruned = now
            self._reserved = {
                ipp: fresh
                for ipp, held in self._reserved.items()
                if (fresh := {p: at for p, at in held.items() if now - at < RESERVED})
            }
            self._holders = {p: n for p, n in self._holders.items() if p in self._reserved.get(p.ipp, {})}
        held = [p for pair in pairs for p, at in self._reserved.get(pair.ipp, {}).items() if now - at < RESERVED]
        # The INS reserved for other IPPs (messages in flight: a few, released once recorded).
        given = {(p.ins_oid, p.ins) for p in pairs}
        elsewhere = [
            p
            for by_ipp in self._reserved.values()
            for p, at in by_ipp.items()
            if (p.ins_oid, p.ins) in given and now - at < RESERVED
        ]
        return held, elsewhere

    def _judge(
        self,
        pairs: list[Pair],
        ruling: set[Pair],
        held: list[Pair],
        elsewhere: list[Pair],
        known: Callable[[Pair], list[Pair]],
        holders: Callable[[Pair], list[Pair]],
    ) -> list[str]:
        """`check`'s verdict on a message's ``pairs`` (``ruling``: an identity source's), against the pairs
        reserved in flight for their IPPs (``held``) and for their INS (``elsewhere``), ``known(pair)`` the recorded
        INS of its kind for its IPP, ``holders(pair)`` the recorded IPPs of its INS: refused (`MappingFailure`),
        or the warnings of the INS it changes."""
        notes = []
        for pair in pairs:
            recorded = known(pair)
            if pair in ruling:  # the identity system's word: only the message itself may not contradict it
                changed = [p for p in recorded if p.ins != pair.ins]
                if changed:
                    notes.append(_changed_note(pair, changed))
                recorded, against = [], pairs
            else:
                against = [*held, *pairs]
            others = [p for p in [*recorded, *against] if p.same_ipp(pair) and p.ins != pair.ins]
            if others:
                kind = INS_OIDS.get(pair.ins_oid, "INS")
                raise MappingFailure(
                    f"identity conflict: this patient identifier was accepted with another {kind}; the INS is "
                    "not replaced (correct the identity, or merge, in the patient identity system)",
                    "PID-3",
                    code="205",
                )
            if self._held_by_another_ipp(pair, [*elsewhere, *pairs], holders(pair)):
                raise MappingFailure(
                    "identity conflict: INS already belongs to another IPP of this authority; merge them in the "
                    "patient identity system first",
                    "PID-3",
                    code="205",
                )
        return notes

    def _reserve(self, pairs: list[Pair], now: float) -> None:
        """(lock held) A checked message's pairs held until its `record` (or `release`)."""
        for pair in pairs:
            self._reserved.setdefault(pair.ipp, {})[pair] = now
            self._holders[pair] = self._holders.get(pair, 0) + 1

    def _ins_holders(self, pair: Pair) -> list[Pair]:
        """The recorded pairs of the pair's INS (any IPP)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM ins WHERE ins_oid = ? AND ins = ?",
                (pair.ins_oid, pair.ins),
            ).fetchall()
        return [Pair(*row) for row in rows]

    def _held_by_another_ipp(self, pair: Pair, held: list[Pair], recorded: list[Pair]) -> bool:
        """Whether another IPP of the pair's assigning authority holds its INS (``recorded``: the recorded pairs of
        its INS, or reserved by a message in flight), the two not merged into one another."""
        mine = Identifier(pair.ipp, pair.ipp_namespace, pair.ipp_oid)
        for other in [*recorded, *(p for p in held if p.ins == pair.ins)]:
            if other.ins_oid != pair.ins_oid or other.ipp == pair.ipp:
                continue
            theirs = Identifier(other.ipp, other.ipp_namespace, other.ipp_oid)
            if not same_authority(mine, theirs):
                continue
            if not same_patient(self.current([mine]), self.current([theirs])):
                return True
        return False

    def release(self, payloads: Iterable[Any]) -> None:
        """Stop holding the pairs `check` reserved for a message that was not accepted (refused, a duplicate, not
        stored): they hold nothing against the next messages."""
        payloads = list(payloads)
        self._admitted_of(payloads)
        self._release_keys(payloads)
        pairs = pairs_of(payloads)
        if pairs:
            with self._lock:
                self._release(pairs)

    # -- merges ------------------------------------------------------------------------------------------------

    def survivor(self, ipp: Identifier) -> list[Identifier] | None:
        """The identifiers of the patient a merged IPP now is (merges followed to the last): the surviving IPP and
        the INS the registry holds for it now; or None."""
        head = self._surviving_ipp(ipp)
        if head is None:
            return None
        ins = []
        with self._lock:
            rows = self._db.execute(
                "SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM ins WHERE ipp = ? ORDER BY ins_oid",
                (head.value,),
            ).fetchall()
        for row in rows:
            if same_ipp(Identifier(row[0], row[2], row[1]), head):
                ins.append(Identifier(row[4], _INS_NAMES.get(row[3], ""), row[3], "INS"))
        return [head, *ins]

    def _surviving_ipp(self, ipp: Identifier) -> Identifier | None:
        """The IPP a merged IPP now is (merges followed to the last), or None. A merge recorded before the survivor
        was kept as its IPP alone holds the survivor's INS of that time: only its IPP is read."""
        found: Identifier | None = None
        seen: set[tuple[str, str, str]] = set()
        current = ipp
        for _ in range(MAX_MERGE_CHAIN):
            rows = self._merge_rows(current.value)
            row = next((r for r in rows if same_ipp(Identifier(r[0], r[1], r[2]), current)), None)
            if row is None or (row[0], row[1], row[2]) in seen:
                break
            seen.add((row[0], row[1], row[2]))
            nxt = next((i for i in _load(row[3]) if not _is_ins(i)), None)
            if nxt is None:
                break
            found = current = nxt
        return found

    def _merge_rows(self, value: str) -> list[tuple[str, str, str, str]]:
        """The merges of an IPP value (ipp, namespace, OID, survivor), latest first, from a copy of the table kept
        in memory (asked for every message) and read again when a merge was recorded (the file's user_version
        counts them, whoever wrote them)."""
        with self._lock:
            now = time.monotonic()
            local = _MERGES_WRITTEN.get(self._file, 0)
            # The file's generation is a query: read once per MERGES_RECHECK_S (every message asks several
            # times), at once when this process recorded a merge since.
            fresh = now - self._merges_checked < MERGES_RECHECK_S
            if self._merges is not None and local == self._merges_local and fresh:
                return self._merges.get(value, [])
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            self._merges_checked, self._merges_local = now, local
            if self._merges is None or version != self._merges_version:
                rows = self._db.execute(
                    "SELECT ipp, ipp_namespace, ipp_oid, survivor FROM merges ORDER BY recorded DESC, rowid DESC"
                ).fetchall()
                self._merges, self._merges_version = {}, version
                for row in rows:
                    self._merges.setdefault(row[0], []).append(row)
            return self._merges.get(value, [])

    # -- owners of order keys -----------------------------------------------------------------------------------

    def owner(self, kind: str, key: str) -> list[Identifier] | None:
        """The identifiers of the patient an order key belongs to, as recorded (merges not followed)."""
        text = self._owner_text(kind, key)
        return _load(text) if text is not None else None

    def _owner_text(self, kind: str, key: str) -> str | None:
        return self._owner_texts([(kind, key)]).get((kind, key))

    def _owner_texts(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The recorded owners (JSON) of the keys that have one: those held in memory, the others in one query."""
        if not keys:
            return {}
        with self._lock:
            found, pending, asked = self._owners_held(keys)
            if asked:
                terms = " OR ".join(["(kind = ? AND key = ?)"] * len(asked))  # each term an index look-up
                rows = self._db.execute(
                    f"SELECT kind, key, patient FROM owners WHERE {terms}", [part for k in asked for part in k]
                ).fetchall()
                found.update({(kind, key): text for kind, key, text in rows})
        return _owners_found(found, pending)

    def _owners_held(
        self, keys: list[tuple[str, str]]
    ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str], list[tuple[str, str]]]:
        """(lock held) What the owners held in memory say of ``keys``: an order's word by key, the others' (latest
        first, `_owners_found`), and the keys to read from the table."""
        held = [(k, h) for k in keys for h in (self._pending.get(k), self._flushing.get(k)) if h is not None]
        found: dict[tuple[str, str], str] = {}
        for k, (text, source) in held:  # an order's word, the latest first
            if source == "order":
                found.setdefault(k, text)
        pending = {k: text for k, (text, _) in dict(reversed(held)).items()}  # the latest first
        return found, pending, [k for k in keys if k not in found]

    def same_patient(self, a: Patient, b: Patient) -> bool:
        """Whether two canonical patients are one (`same_patient`), merges followed: a merged IPP is its
        survivor. A patient without identifier is no one's."""
        ids_a, ids_b = _local(a) + _ins(a), _local(b) + _ins(b)
        return bool(ids_a and ids_b) and same_patient(self.current(ids_a), self.current(ids_b))

    def mismatch(self, payload: Any) -> tuple[str, str, list[Identifier], list[Identifier]] | None:
        """The first key of ``payload`` that belongs to another patient: (kind, value, its patient, this one)."""
        patient = patient_of(payload)
        if patient is None:
            return None
        ids = _identity(patient)
        if not ids:
            return None
        return self._mismatch(payload, ids, self._owner_texts(keys_of(payload)))

    def _mismatch(
        self, payload: Any, ids: list[Identifier], owners: dict[tuple[str, str], str]
    ) -> tuple[str, str, list[Identifier], list[Identifier]] | None:
        """`mismatch` with the recorded ``owners`` of its keys read."""
        if not owners:
            return None
        mine = self.current(ids)
        for kind, key in keys_of(payload):
            if (kind, key) not in owners:
                continue
            theirs = self.current(_load(owners[(kind, key)]))
            if not same_patient(mine, theirs):
                return kind, key, theirs, mine
        return None

    def _refuse(self, payloads: Iterable[Any], what: str, location: str, remedy: str = "") -> None:
        for payload in payloads:
            found = self.mismatch(payload)
            if found is None:
                continue
            kind, key, theirs, mine = found
            raise MappingFailure(
                f"patient mismatch: {KEY_NAMES[kind]} {key} belongs to patient {describe(theirs)}, this {what} "
                f"names patient {describe(mine)}; "
                + (remedy or "not linked (correct the patient or the order identifiers)"),
                location,
                code="205",
            )

    def check_order(self, payloads: Iterable[Any]) -> None:
        """Refuse (`MappingFailure`, PID-3) an order (new, change, cancel, status) whose accession number, placer or
        filler order number or Study Instance UID belongs to another patient, recorded or named by an order in
        flight: an order never moves an exam to another patient; the patient identity system does (a merge).
        Otherwise its keys are held for its patient until `record` (or `release`)."""
        remedy = (
            "not applied (a patient change of an order comes through the patient identity system: merge the "
            "patients there)"
        )
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        self._refuse(orders, "order", "PID-3", remedy)
        now = time.monotonic()
        for order in orders:
            ids = _identity(order.patient)
            if not ids:
                continue
            with self._lock:
                held = self._keys_in_flight(order, now)
            found = self._in_flight_mismatch(ids, held)
            if found is not None:
                kind, key, theirs, mine = found
                raise MappingFailure(
                    f"patient mismatch: {KEY_NAMES[kind]} {key} belongs to patient {describe(theirs)}, this "
                    f"order names patient {describe(mine)}; {remedy}",
                    "PID-3",
                    code="205",
                )
        with self._lock:
            self._hold(orders, now)

    def _keys_in_flight(
        self, order: ImagingOrder, now: float, keys: list[tuple[str, str]] | None = None
    ) -> list[tuple[tuple[str, str], list[Identifier]]]:
        """(lock held) The keys of ``order`` (``keys``: `keys_of` it) other orders in flight hold, with their
        patients."""
        return [
            (key, theirs)
            for key in (keys_of(order) if keys is None else keys)
            for holder, (theirs, at) in self._keys_held.get(key, {}).items()
            if holder != id(order) and now - at < RESERVED
        ]

    def _in_flight_mismatch(
        self, ids: list[Identifier], held: list[tuple[tuple[str, str], list[Identifier]]]
    ) -> tuple[str, str, list[Identifier], list[Identifier]] | None:
        """The first key of ``held`` (`_keys_in_flight`) an order of another patient than ``ids`` holds: (kind,
        value, its patient, this one)."""
        mine = self.current(ids) if held else ids
        for (kind, key), theirs in held:
            theirs = self.current(theirs)
            if not same_patient(mine, theirs):
                return kind, key, theirs, mine
        return None

    def _hold(
        self,
        orders: list[ImagingOrder],
        now: float,
        given: tuple[list[Identifier], list[tuple[str, str]]] | None = None,
    ) -> None:
        """(lock held) The keys of checked orders held for their patients until `record` (or `release`);
        ``given``: the only order's `_identity` and `keys_of`."""
        if now - self._keys_pruned > RESERVED:  # orders never recorded nor released (a fault of ours)
            self._keys_pruned = now
            self._keys_held = {
                k: fresh
                for k, by in self._keys_held.items()
                if (fresh := {h: v for h, v in by.items() if now - v[1] < RESERVED})
            }
        for order in orders:
            ids, keys = given or (_identity(order.patient), keys_of(order))
            for key in keys if ids else []:
                self._keys_held.setdefault(key, {})[id(order)] = (ids, now)

    # -- the usual message -------------------------------------------------------------------------------------

    def admit(self, payloads: Iterable[Any]) -> bool:
        """`resolve_merged`, `check`, `check_report` and `check_order` of the usual message with one query: a
        message of orders (one at most, with its IPP and keys) and patient updates, from no identity source,
        naming no merged IPP, that these calls would let through without a warning: its pairs reserved and its
        keys held as theirs would be, True. False, having changed nothing, for anything else (what they would
        refuse among it): the caller makes the four calls (in that order), which decide. One statement reads what
        the rules need beside what is held in memory (the recorded INS of its IPPs and IPPs of its INS, the owners
        of its keys, how many pairs were ever removed): `record` then knows which of its pairs are recorded."""
        payloads = list(payloads)
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        if len(orders) > 1 or not all(
            isinstance(p, ImagingOrder)
            or (isinstance(p, PatientUpdate) and p.action != "merge" and not _authoritative(p))
            for p in payloads
        ):
            return False
        order = orders[0] if orders else None
        keys: list[tuple[str, str]] = []
        ids: list[Identifier] = []
        if order is not None:
            if _ipp(order.patient) is None or not (keys := keys_of(order)):
                return False
            ids = _identity(order.patient)
        for payload in payloads:  # `resolve_merged` would change nothing
            patient = patient_of(payload)
            ipp = _ipp(patient) if patient is not None else None
            if ipp is not None and self._merge_rows(ipp.value):
                return False
        pairs = pairs_of(payloads)
        terms, params = [], []
        for ipp_value, ins_oid in dict.fromkeys((p.ipp, p.ins_oid) for p in pairs):  # `known`
            terms.append(f"SELECT 0, {_PAIR} FROM ins WHERE ipp = ? AND +ins_oid = ?")  # (by IPP: `known`)
            params += [ipp_value, ins_oid]
        for ins_oid, ins in dict.fromkeys((p.ins_oid, p.ins) for p in pairs):  # `_ins_holders`
            terms.append(f"SELECT 0, {_PAIR} FROM ins WHERE ins_oid = ? AND ins = ?")
            params += [ins_oid, ins]
        if pairs:  # the pairs removed so far (each with its action): `record`
            terms.append("SELECT 2, max(rowid), '', '', '', '' FROM actions")
        now = time.monotonic()
        with self._lock:
            held, elsewhere = self._in_flight(pairs, now) if pairs else ([], [])
            found, pending, asked = self._owners_held(keys)
            in_flight = self._keys_in_flight(order, now, keys) if order is not None else []
            for kind, key in asked:
                terms.append("SELECT 1, kind, key, patient, '', '' FROM owners WHERE kind = ? AND key = ?")
                params += [kind, key]
            rows = self._db.execute(" UNION ALL ".join(terms), params).fetchall() if terms else []
        recorded = [Pair(*row) for row in dict.fromkeys(row[1:] for row in rows if row[0] == 0)]
        try:
            self._judge(
                pairs,
                set(),
                held,
                elsewhere,
                lambda pair: [p for p in recorded if p.same_ipp(pair)],
                lambda pair: [p for p in recorded if p.ins_oid == pair.ins_oid and p.ins == pair.ins],
            )
        except MappingFailure:
            return False
        if order is not None:
            found.update({(row[1], row[2]): row[3] for row in rows if row[0] == 1})
            if self._mismatch(order, ids, _owners_found(found, pending)) is not None:
                return False
            if self._in_flight_mismatch(ids, in_flight) is not None:
                return False
        version = next((row[1] or 0 for row in rows if row[0] == 2), None)
        with self._lock:
            self._reserve(pairs, now)
            self._hold(orders, now, (ids, keys) if order is not None else None)
            if now - self._admitted_pruned > RESERVED:  # never recorded nor released (a fault of ours)
                self._admitted_pruned = now
                self._admitted = {k: a for k, a in self._admitted.items() if now - a.at < RESERVED}
            if pairs and version is not None:
                there = frozenset(p for p in recorded if p in pairs)
                self._admitted[tuple(map(id, payloads))] = _Admitted(payloads, pairs, there, version, now)
        return True

    def _admitted_of(self, payloads: list[Any]) -> _Admitted | None:
        """What `admit` read of these very payloads (forgotten now: recorded or released)."""
        with self._lock:
            admitted = self._admitted.pop(tuple(map(id, payloads)), None) if self._admitted else None
        if admitted is None or any(a is not b for a, b in zip(admitted.payloads, payloads, strict=True)):
            return None
        return admitted

    def _release_keys(self, payloads: list[Any]) -> None:
        """The keys `check_order` held for these orders: recorded (or refused), they hold nothing more."""
        with self._lock:
            for payload in payloads:
                if not isinstance(payload, ImagingOrder):
                    continue
                for key in keys_of(payload):
                    by = self._keys_held.get(key)
                    if by is not None:
                        by.pop(id(payload), None)
                        if not by:
                            del self._keys_held[key]

    # -- recording ----------------------------------------------------------------------------------------------

    def record(self, payloads: Iterable[Any], *, channel: str = "", journal_id: int = 0) -> None:
        """Remember what a journaled (accepted) message says: its IPP-INS pairs (an identity source's replacing
        the recorded ones), the patient of the order keys it names (an order's replaces what a report, step or
        study recorded; those only fill a key no one gave), its merges. Only what is new is a write: the messages
        of a known patient and order cost reads. ``channel`` and ``journal_id``: the message's journal entry,
        written with the owners as the channel's `mark`; its pairs are then committed without an fsync of their own
        (`rebuild` records them again from the journal after a power loss, see `_record_pairs`)."""
        payloads = list(payloads)
        journaled = bool(channel and journal_id)
        try:
            written = self._record_pairs(payloads, self._admitted_of(payloads), fsync=not journaled)
        except sqlite3.Error as exc:  # an INS replaced (`_rewrite`): the database refused it
            log.warning("identities.not_recorded", error=str(exc))
            written = False
        written = self._record_merges(payloads) and written
        if not written and journaled:
            self._hold_mark(channel, journal_id)
        self._record_owners(payloads, mark=(channel, journal_id) if journaled else None)
        self._release_keys(payloads)  # their owners are seen now

    def _hold_mark(self, channel: str, journal_id: int) -> None:
        """A journaled message whose pairs or merges the database refused: the channel's mark stays below it for as
        long as this process runs, so that the next start's `rebuild` records it again."""
        with self._lock:
            self._mark_caps[channel] = min(journal_id - 1, self._mark_caps.get(channel, journal_id))
        log.warning("identities.mark_held", channel=channel, journal_id=journal_id)

    def _record_pairs(self, payloads: list[Any], admitted: _Admitted | None = None, *, fsync: bool = True) -> bool:
        """The pairs of the payloads; ``admitted``: what `admit` read of them (the pairs it found recorded are not
        read again when no pair was removed since: the last action is the same).

        ``fsync=False``, for a journaled message whose channel's `mark` follows it: the commit waits for no disk
        flush (``synchronous=NORMAL``: a process crash loses nothing, a power loss may lose the last commits). The
        write-ahead log keeps commits in order, so a power loss that takes these pairs takes the later mark with
        them, and `rebuild` records them again from the journal, which the message's answer waited for. An order of
        a new patient on the event loop otherwise paid a second fsync beside the journal's (~0.2 ms, serialised).
        An identity source's new INS keeps its fsync: the old pair's removal is an action, fsynced, and `rebuild`
        does not replay a message for an IPP acted on after it (the new pair would be lost with no old one left).
        False when the pairs could not be written (they stay reserved)."""
        given = pairs_of(payloads)
        if not given:
            return True
        ruling = set(pairs_of(p for p in payloads if _authoritative(p)))
        replaced = [(p, old) for p in given if p in ruling for old in self.known(p) if old.ins != p.ins]
        if replaced:
            self._replace(replaced)
            fsync = True
        there: frozenset[Pair] | None = None
        if admitted is not None and admitted.pairs == given and not ruling:
            with self._lock:
                (version,) = self._db.execute("SELECT max(rowid) FROM actions").fetchone()
            if (version or 0) == admitted.version:
                there = admitted.recorded
        # What `admit` read stands (no pair removed since): the others are new, or recorded meanwhile by another
        # message (the insert ignores them), without a look-up each.
        if there is not None:
            pairs = [p for p in given if p not in there]
        else:
            pairs = [p for p in given if p not in self.known(p)]
        recorded = _now()
        with self._lock:
            if not pairs:
                self._release(given)
                return True
            if not fsync:
                # An IPP acted on (an INS replaced or forgotten) is not replayed by `rebuild` for messages received
                # before the action: its pairs, whenever recorded, keep their fsync (actions are rare).
                ipps = sorted({p.ipp for p in pairs})
                acted = self._db.execute(
                    f"SELECT 1 FROM actions WHERE ipp IN ({','.join('?' * len(ipps))}) LIMIT 1", ipps
                ).fetchone()
                fsync = acted is not None
            try:
                if not fsync:
                    self._db.execute("PRAGMA synchronous = NORMAL")
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
                return False
            finally:
                if not fsync:  # the connection's other writes (merges, replaced INS) keep their fsync
                    self._db.execute(f"PRAGMA synchronous = {Durability.POWER_LOSS.value}")
            self._release(given)
        return True

    def _replace(self, replaced: list[tuple[Pair, Pair]]) -> None:
        """An identity source's new INS for an IPP: the old pair removed (the new one is inserted next), the
        owners of the IPP's keys given the new INS, the change kept among the registry's actions."""
        for new, old in replaced:
            self._rewrite(old, new.ins, "ins-changed", f"{INS_OIDS.get(old.ins_oid, 'INS')} {old.ins} -> {new.ins}")
            log.warning("identities.ins_changed", kind=INS_OIDS.get(old.ins_oid, "INS"))

    def _rewrite(self, old: Pair, ins: str, action: str, detail: str) -> None:
        """Remove the pair ``old`` and give the owners naming it ``ins`` instead (none: the IPP alone), in one
        transaction with the action's record; the owners held in memory too."""
        with self._write_lock, self._lock:  # no flush of owners meanwhile: it could write the old INS again
            rows = self._db.execute(
                "SELECT kind, key, patient FROM owners WHERE patient LIKE ?", (f"%{json.dumps(old.ins)[1:-1]}%",)
            ).fetchall()
            changes = []
            for kind, key, text in rows:
                new = _with_ins(text, old, ins)
                if new != text:
                    changes.append((new, kind, key))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "DELETE FROM ins WHERE ipp = ? AND ipp_oid = ? AND ipp_namespace = ? AND ins_oid = ? AND ins = ?",
                    (old.ipp, old.ipp_oid, old.ipp_namespace, old.ins_oid, old.ins),
                )
                self._db.executemany("UPDATE owners SET patient = ? WHERE kind = ? AND key = ?", changes)
                self._db.execute("INSERT INTO actions VALUES (?, ?, ?, ?)", (_now(), action, old.ipp, detail))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            for held in (self._pending, self._flushing):
                for k, (text, source) in list(held.items()):
                    held[k] = (_with_ins(text, old, ins), source)
            self._written.clear()

    def forget(self, ipp: str) -> list[Pair]:
        """An operator's way out: the INS recorded for this IPP value (any authority, any kind) removed, the owners
        of its keys keeping the IPP alone. Returns the pairs removed (recorded among the registry's actions)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM ins WHERE ipp = ?", (ipp,)
            ).fetchall()
        pairs = [Pair(*row) for row in rows]
        for pair in pairs:
            self._rewrite(pair, "", "ins-forgotten", f"{INS_OIDS.get(pair.ins_oid, 'INS')} {pair.ins} (operator)")
        return pairs

    def show(self, ipp: str) -> dict[str, Any]:
        """What the registry holds about an IPP value: its INS, the order keys it owns, its merges (merged into,
        merged in), the changes of its INS. For an operator's terminal (patient data)."""
        self.flush()
        with self._lock:
            ins = self._db.execute(
                "SELECT ipp_namespace, ipp_oid, ins_oid, ins, recorded FROM ins WHERE ipp = ? ORDER BY recorded",
                (ipp,),
            ).fetchall()
            owners = self._db.execute(
                "SELECT kind, key, patient, source, recorded FROM owners WHERE patient LIKE ? ORDER BY recorded",
                (f"%{json.dumps(ipp)[1:-1]}%",),
            ).fetchall()
            merged_into = self._db.execute(
                "SELECT ipp_namespace, ipp_oid, survivor, recorded FROM merges WHERE ipp = ?", (ipp,)
            ).fetchall()
            merged_in = self._db.execute(
                "SELECT ipp, ipp_namespace, ipp_oid, survivor, recorded FROM merges WHERE survivor LIKE ?",
                (f"%{json.dumps(ipp)[1:-1]}%",),
            ).fetchall()
            actions = self._db.execute(
                "SELECT at, action, detail FROM actions WHERE ipp = ? ORDER BY at", (ipp,)
            ).fetchall()

        def names(ids: list[Identifier]) -> bool:
            return any(i.value == ipp and not _is_ins(i) for i in ids)

        return {
            "ins": [
                {"authority": ns or oid, "kind": INS_OIDS.get(kind, "INS"), "ins": value, "recorded": at}
                for ns, oid, kind, value, at in ins
            ],
            "owners": [
                {"kind": KEY_NAMES[kind], "key": key, "patient": describe(ids), "source": source, "recorded": at}
                for kind, key, text, source, at in owners
                if names(ids := _load(text))
            ],
            "merged_into": [
                {"authority": ns or oid, "survivor": describe(_load(text)), "recorded": at}
                for ns, oid, text, at in merged_into
            ],
            "merged_in": [
                {"ipp": describe([Identifier(value, ns, oid)]), "recorded": at}
                for value, ns, oid, text, at in merged_in
                if names(_load(text)[:1])
            ],
            "actions": [{"at": at, "action": action, "detail": detail} for at, action, detail in actions],
        }

    def mark(self, channel: str) -> int:
        """The highest journal id of ``channel`` whose owners are written (0: none)."""
        with self._lock:
            row = self._db.execute("SELECT journal_id FROM marks WHERE channel = ?", (channel,)).fetchone()
        return int(row[0]) if row else 0

    def rebuild(self, entries: Iterable[tuple[int, str, list[Any]]], channel: str) -> int:
        """At start: record again what accepted messages journaled after the channel's `mark` said (a crash may
        have come between a journal write and its record, and the owners of the last fraction of a second may not
        be written), in journal order. ``entries``: (journal id, reception time, payloads) as the journal holds
        them. Their pairs fill what the registry lacks (an IPP's INS changed or forgotten since the message came is
        left as it is now), their merges are applied again, their owners take the INS the registry holds now for
        their IPP. Written before it returns; returns how many messages were looked at."""
        n = 0
        for journal_id, received, payloads in entries:
            n += 1
            with self._lock:
                acted = {r[0] for r in self._db.execute("SELECT ipp FROM actions WHERE at >= ?", (received,))}
            fill = []
            for payload in payloads:
                patient = patient_of(payload)
                ipp = _ipp(patient) if patient is not None else None
                if ipp is None or ipp.value in acted:
                    continue
                mine = pairs_of([payload])
                if _authoritative(payload) or not any(k.ins != p.ins for p in mine for k in self.known(p)):
                    fill.append(payload)
            pairs_written = self._record_pairs(fill)
            if not (self._record_merges(payloads) and pairs_written):
                self._hold_mark(channel, journal_id)
            for payload in payloads:
                patient = patient_of(payload)
                if patient is not None:
                    self._current_ins(patient)
            self._record_owners(payloads, mark=(channel, journal_id), write=False)
        self.flush()
        return n

    def _current_ins(self, patient: Patient) -> None:
        """A patient's INS as the registry holds them now for its IPP (a message older than a correction)."""
        ipp = _ipp(patient)
        for ident in _ins(patient) if ipp is not None else []:
            pair = Pair(ipp.value, ipp.issuer_oid, ipp.issuer, ident.issuer_oid, ident.value.upper())
            known = self.known(pair)
            if known and all(k.ins != pair.ins for k in known):
                for ident in patient.ids:
                    if _is_ins(ident) and ident.issuer_oid == pair.ins_oid and ident.value.upper() == pair.ins:
                        ident.value = known[0].ins

    def _record_owners(self, payloads: list[Any], *, mark: tuple[str, int] | None = None, write: bool = True) -> None:
        """The owners of the keys the payloads name, held in memory (lookups see them at once) until `flush` (off
        the event loop, every `OWNERS_FLUSH` seconds; at once when called off a loop). A commit per order, on the
        loop, cost about 0.1 ms where the whole ingest of an order takes 0.5 ms."""
        added = False
        for payload in payloads:
            if isinstance(payload, PatientUpdate):
                continue
            patient = patient_of(payload)
            ids = _identity(patient) if patient is not None else []
            if not ids:
                continue
            source = _SOURCES.get(type(payload), "report")
            text = _dump(ids)
            with self._lock:  # the table decides at the write (an order's word replaces; the others fill)
                for key in keys_of(payload):
                    if source != "order":
                        if key not in self._pending and key not in self._flushing:
                            self._pending[key] = (text, source)
                            added = True
                    elif self._written.get(key) != text or key in self._pending or key in self._flushing:
                        self._pending[key] = (text, source)
                        added = True
        if mark is not None:  # after its owners: a flush that writes the mark writes them
            with self._lock:
                journal_id = min(mark[1], self._mark_caps.get(mark[0], mark[1]))
                self._marks[mark[0]] = max(journal_id, self._marks.get(mark[0], 0))
        elif not added:
            return
        if not write:  # the caller flushes
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off an event loop: written now
            self.flush()
            return
        if self._flush_at is None:
            self._flush_at = loop.call_later(OWNERS_FLUSH, self._flush_off_loop, loop)

    def _flush_off_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_at = None
        loop.run_in_executor(None, self.flush)

    def flush(self) -> None:
        """Write the owners held in memory, in one transaction (kept for the next flush if it fails). Lookups see
        them meanwhile."""
        with self._write_lock:
            with self._lock:
                marks = {c: n for c, n in self._marks.items() if n > self._marked.get(c, 0)}
                if not self._pending and not marks:
                    return
                rows, self._pending = self._pending, {}
                self._flushing = rows
            recorded = _now()
            # The first mark of a channel this process writes is fsynced, and with it every commit before it in the
            # write-ahead log (the pairs of journaled messages are not): a power loss then leaves a mark `rebuild`
            # can start from, not none (from which it would replay only the journal's last messages).
            first = any(channel not in self._marked for channel in marks)
            try:
                if first:
                    self._writer.execute(f"PRAGMA synchronous = {Durability.POWER_LOSS.value}")
                self._writer.execute("BEGIN IMMEDIATE")
                try:
                    self._writer.executemany(
                        "INSERT INTO owners VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key) DO UPDATE SET"
                        " patient = excluded.patient, source = excluded.source, recorded = excluded.recorded"
                        " WHERE excluded.source = 'order' AND patient != excluded.patient",  # the others fill
                        [(kind, key, text, source, recorded) for (kind, key), (text, source) in rows.items()],
                    )
                    self._writer.executemany(
                        "INSERT INTO marks VALUES (?, ?) ON CONFLICT (channel) DO UPDATE SET journal_id ="
                        " max(journal_id, excluded.journal_id)",
                        list(marks.items()),
                    )
                except BaseException:
                    self._writer.execute("ROLLBACK")
                    raise
                self._writer.execute("COMMIT")
            except sqlite3.Error as exc:  # journaled already: kept in memory, written with the next ones
                with self._lock:
                    self._pending = rows | self._pending
                    self._flushing = {}
                log.warning("identities.owners_not_recorded", error=str(exc), keys=len(rows))
                return
            finally:
                if first:
                    self._writer.execute(f"PRAGMA synchronous = {Durability.CRASH.value}")
            with self._lock:
                self._flushing = {}
                self._marked.update(marks)
                if len(self._written) > WRITTEN_KEPT:
                    self._written.clear()
                self._written.update({k: text for k, (text, source) in rows.items() if source == "order"})

    def _record_merges(self, payloads: list[Any]) -> bool:
        """The merges among the payloads; False when the database refused them (logged)."""
        merges = [p for p in payloads if isinstance(p, PatientUpdate) and p.action == "merge"]
        if not merges:
            return True
        recorded = _now()
        written = True
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for update in merges:
                        survivor = _identity(update.patient)
                        head = survivor[0] if survivor and not _is_ins(survivor[0]) else None
                        if head is None:
                            continue
                        # The survivor is a patient again (a merge the other way round undoes an earlier one).
                        for row in self._db.execute(
                            "SELECT ipp, ipp_namespace, ipp_oid FROM merges WHERE ipp = ?", (head.value,)
                        ).fetchall():
                            if same_ipp(Identifier(*row), head):
                                self._db.execute(
                                    "DELETE FROM merges WHERE ipp = ? AND ipp_namespace = ? AND ipp_oid = ?", row
                                )
                        for merged in update.merged_ids:
                            if not merged.value or same_ipp(merged, head):
                                continue
                            self._db.execute(
                                "INSERT INTO merges VALUES (?, ?, ?, ?, ?) ON CONFLICT (ipp, ipp_oid, ipp_namespace)"
                                " DO UPDATE SET survivor = excluded.survivor, recorded = excluded.recorded",
                                (merged.value, merged.issuer_oid, merged.issuer, _dump([head]), recorded),
                            )
                            # The merged IPP's INS are the survivor's (one person): a later message of either
                            # IPP with another INS is refused, not recorded for the survivor.
                            for row in self._db.execute(
                                "SELECT ipp, ipp_namespace, ipp_oid, ins_oid, ins FROM ins WHERE ipp = ?",
                                (merged.value,),
                            ).fetchall():
                                if same_ipp(Identifier(*row[:3]), merged):
                                    self._db.execute(
                                        "INSERT OR IGNORE INTO ins VALUES (?, ?, ?, ?, ?, ?)",
                                        (head.value, head.issuer_oid, head.issuer, row[3], row[4], recorded),
                                    )
                    (version,) = self._db.execute("PRAGMA user_version").fetchone()
                    self._db.execute(f"PRAGMA user_version = {int(version) + 1}")  # the merges' generation
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                log.warning("identities.merge_not_recorded", error=str(exc))
                written = False
            self._merges = None  # read again
            with _MERGES_WRITTEN_LOCK:  # read again by this file's other registries too
                _MERGES_WRITTEN[self._file] = _MERGES_WRITTEN.get(self._file, 0) + 1
        return written

    def _release(self, pairs: list[Pair]) -> None:
        """One message's hold on its pairs ended: a pair no other message in flight holds is free again."""
        for pair in pairs:
            left = self._holders.get(pair, 0) - 1
            if left > 0:
                self._holders[pair] = left
                continue
            self._holders.pop(pair, None)
            held = self._reserved.get(pair.ipp)
            if held is not None:
                held.pop(pair, None)
                if not held:
                    del self._reserved[pair.ipp]


def identity_sources(setting: Any, channel: str) -> list[tuple[str, str]] | None:
    """An inbound channel's ``identity_sources`` (``[{application = "GAM", facility = "CHU-LYON"}]``, MSH-3 and
    MSH-4 as sent, ``facility`` optional) as (application, facility) pairs; None when not set: every patient update
    the channel accepts is the identity system's word."""
    if setting is None:
        return None
    if not isinstance(setting, list):
        raise ValueError(f"channel {channel}: identity_sources must be a list of {{application, facility}} tables")
    out = []
    for item in setting:
        if not isinstance(item, dict) or not set(item) <= {"application", "facility"} or not item.get("application"):
            raise ValueError(
                f'channel {channel}: each identity_sources entry is {{application = "...", facility = "..."}}'
                f" (facility optional), not {item!r}"
            )
        out.append((str(item["application"]).strip(), str(item.get("facility") or "").strip()))
    return out


def mark_authoritative(payloads: Iterable[Any], sources: list[tuple[str, str]] | None, msh: tuple[str, str]) -> None:
    """Mark the patient updates of a message from an identity source (``msh``: its MSH-3.1 and MSH-4.1; every
    sender when ``sources`` is None) as ``authoritative``; an order, a report or a merge never is."""
    application, facility = (part.strip() for part in msh)
    trusted = sources is None or any(a == application and f in ("", facility) for a, f in sources)
    for payload in payloads:
        if isinstance(payload, PatientUpdate) and payload.action == "update":
            payload.authoritative = trusted


def _authoritative(payload: Any) -> bool:
    return isinstance(payload, PatientUpdate) and payload.action == "update" and payload.authoritative


def _changed_note(pair: Pair, old: list[Pair]) -> str:
    kind = INS_OIDS.get(pair.ins_oid, "INS")
    return (
        f"INS of IPP {pair.ipp} changed by ADT from the patient identity system: {kind} "
        f"{', '.join(p.ins for p in old)} replaced by {pair.ins}"
    )


def _with_ins(text: str, old: Pair, ins: str) -> str:
    """An owner's identifiers (JSON) with the INS ``old`` gave its IPP replaced by ``ins`` (none: removed)."""
    ids = _load(text)
    ipp = next((i for i in ids if not _is_ins(i)), None)
    if ipp is None or ipp.value != old.ipp:
        return text
    if not old.same_ipp(Pair(ipp.value, ipp.issuer_oid, ipp.issuer, old.ins_oid, old.ins)):
        return text
    out = []
    for ident in ids:
        if _is_ins(ident) and ident.issuer_oid == old.ins_oid and ident.value.upper() == old.ins:
            if ins:
                out.append(Identifier(ins, ident.issuer, ident.issuer_oid, ident.type))
        else:
            out.append(ident)
    return _dump(out)


def _owners_found(found: dict[tuple[str, str], str], pending: dict[tuple[str, str], str]) -> dict[tuple[str, str], str]:
    """The owners of keys: an order's word held in memory or the table's (``found``), else a report's, step's or
    study's held in memory (``pending``: it only fills a key the table does not hold yet)."""
    found.update({k: text for k, text in pending.items() if k not in found})
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
