"""The patient identity registry on PostgreSQL: the INS per IPP, the owners of order keys and the merges of several
engine nodes in one database.

`PostgresPatientRegistry` implements `traboule.stores.PatientRegistry` with the rules of
`traboule.stores.patient_identity.PatientIdentities` (INS per IPP of an authority, conflicts refused, identity
sources, owners of accession / placer / filler numbers and Study Instance UIDs, merges, rebuild from the journal),
the helpers of that module doing the comparisons. What differs is where the state lives: with several nodes the
database is the truth, nothing is kept in memory.

* Tables ``patients_ins``, ``patients_owners``, ``patients_merges``, ``patients_marks``, ``patients_actions`` (as
  the SQLite tables) and ``patients_reserved`` / ``patients_keys_held``: what `check` and `check_order` reserve for
  a message in flight, per node (``node``: an id per registry), until `record` or `release`, or until it expires
  (`traboule.stores.patient_identity.RESERVED` seconds, the server's clock: a node that died holds nothing long).
  Created by the ``patients`` migrations (`traboule.stores.postgres.migrations`).
* Every check and every write is one transaction that first takes transaction advisory locks on what it decides
  about (the IPP value, the INS, each order key; merges one lock of their own), in a fixed order: two nodes
  checking conflicting INS for one IPP at the same moment are serialised, the second sees the first's reservation
  and is refused. `record` writes the pairs, the owners, the channel's `mark` and the merges and drops the
  message's reservations in one transaction, so a check on another node sees either the reservation or the row.
* Checks read the database: a few indexed look-ups, a transaction for those that reserve (``check``,
  ``check_order``, committed without waiting for the WAL flush: a reservation lost in a crash held a message that
  was not answered). On a local server with a loaded 2-core machine: ``check_report`` 0.3-1.2 ms, ``check``
  1-1.5 ms, ``check_order`` 2-3 ms, ``record`` of a known order 1-2 ms. Merges are looked up per IPP value, no
  cache between calls (only within one call): a merge committed by a node is applied by the next check of every
  node.
* Durability: a record that writes an INS pair, a change of INS or a merge commits with ``synchronous_commit`` on
  before it returns. A record that only writes owners (nearly every order) commits with ``synchronous_commit``
  off (no WAL flush of its own: the next durable commit of any node, the journal's, flushes it): a crash of the
  server may lose the last ones, and their channel's `mark` with them (same transaction), so the channel's
  `rebuild` records them again from the journal.
* PostgreSQL text cannot hold a NUL character: identifiers and keys are stored with ``\\`` and NUL escaped
  (``\\\\``, ``\\0``); the patients' identifiers are JSON (NUL escaped by JSON itself).
* Thread-safe: one connection per registry, its calls serialised.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import structlog

from traboule.errors import MappingFailure
from traboule.model import (
    INS_OIDS,
    Identifier,
    ImagingOrder,
    Patient,
    PatientUpdate,
)
from traboule.stores import patient_identity as sqlite_registry
from traboule.stores.patient_identity import (
    _INS_NAMES,
    _SOURCES,
    KEY_NAMES,
    MAX_MERGE_CHAIN,
    IdentityRules,
    Pair,
    _authoritative,
    _changed_note,
    _dump,
    _identity,
    _ins,
    _ipp,
    _is_ins,
    _load,
    _local,
    _now,
    _with_ins,
    describe,
    keys_of,
    pairs_of,
    patient_of,
    same_authority,
    same_ipp,
    same_patient,
)
from traboule.stores.postgres import connect, migrations, redact

COMPONENT = "patients"
LOCK_CLASS = 0x7061_7469  # "pati": the first key of the registry's advisory locks (the second: what is locked)

migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE patients_ins (
                ipp TEXT COLLATE "C" NOT NULL,
                ipp_oid TEXT COLLATE "C" NOT NULL,
                ipp_namespace TEXT COLLATE "C" NOT NULL,
                ins_oid TEXT COLLATE "C" NOT NULL,
                ins TEXT COLLATE "C" NOT NULL,
                recorded TEXT NOT NULL,
                PRIMARY KEY (ipp, ipp_oid, ipp_namespace, ins_oid)
            );
            CREATE INDEX patients_ins_by_value ON patients_ins (ins_oid, ins);
            CREATE TABLE patients_owners (
                kind TEXT COLLATE "C" NOT NULL,     -- accession, placer, filler, study
                key TEXT COLLATE "C" NOT NULL,      -- its value
                patient TEXT NOT NULL,              -- JSON: the identifiers (IPP, INS) of its patient
                source TEXT NOT NULL,               -- order, report, step, study: an order's word replaces
                recorded TEXT NOT NULL,
                PRIMARY KEY (kind, key)
            );
            CREATE TABLE patients_marks (
                channel TEXT COLLATE "C" PRIMARY KEY,
                journal_id BIGINT NOT NULL          -- the highest journal id whose owners are written
            );
            CREATE TABLE patients_actions (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at TEXT NOT NULL,
                action TEXT NOT NULL,               -- ins-changed, ins-forgotten
                ipp TEXT COLLATE "C" NOT NULL,
                detail TEXT NOT NULL
            );
            CREATE INDEX patients_actions_ipp ON patients_actions (ipp, at);
            CREATE INDEX patients_actions_at ON patients_actions (at);
            CREATE TABLE patients_merges (
                ipp TEXT COLLATE "C" NOT NULL,
                ipp_oid TEXT COLLATE "C" NOT NULL,
                ipp_namespace TEXT COLLATE "C" NOT NULL,
                survivor TEXT NOT NULL,             -- JSON: the surviving IPP
                recorded TEXT NOT NULL,
                PRIMARY KEY (ipp, ipp_oid, ipp_namespace)
            );
            CREATE TABLE patients_reserved (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                ipp TEXT COLLATE "C" NOT NULL,
                ipp_oid TEXT COLLATE "C" NOT NULL,
                ipp_namespace TEXT COLLATE "C" NOT NULL,
                ins_oid TEXT COLLATE "C" NOT NULL,
                ins TEXT COLLATE "C" NOT NULL,
                node TEXT NOT NULL,                 -- the registry that checked it
                expires TIMESTAMPTZ NOT NULL
            );
            CREATE INDEX patients_reserved_ipp ON patients_reserved (ipp);
            CREATE INDEX patients_reserved_ins ON patients_reserved (ins_oid, ins);
            CREATE TABLE patients_keys_held (
                kind TEXT COLLATE "C" NOT NULL,
                key TEXT COLLATE "C" NOT NULL,
                holder TEXT NOT NULL,               -- node and order in flight
                patient TEXT NOT NULL,              -- JSON: the order's patient
                expires TIMESTAMPTZ NOT NULL,
                PRIMARY KEY (kind, key, holder)
            );
            """,
        )
    ],
)
log = structlog.get_logger("traboule.stores.postgres.patient_identity")

_PAIR = "ipp, ipp_oid, ipp_namespace, ins_oid, ins"
_SAME_PAIR = "ipp = %s AND ipp_oid = %s AND ipp_namespace = %s AND ins_oid = %s AND ins = %s"
_RESERVE = (
    f"INSERT INTO patients_reserved ({_PAIR}, node, expires)"
    " VALUES (%s, %s, %s, %s, %s, %s, now() + %s * interval '1 second')"
)
_UNRESERVE = (
    "DELETE FROM patients_reserved WHERE id = "
    f"(SELECT id FROM patients_reserved WHERE {_SAME_PAIR} AND node = %s LIMIT 1)"
)
_OWNER = (
    "INSERT INTO patients_owners VALUES (%s, %s, %s, %s, %s) ON CONFLICT (kind, key) DO UPDATE SET"
    " patient = excluded.patient, source = excluded.source, recorded = excluded.recorded"
    " WHERE excluded.source = 'order' AND patients_owners.patient <> excluded.patient"  # the others fill
)
_MARK = (
    "INSERT INTO patients_marks VALUES (%s, %s) ON CONFLICT (channel) DO UPDATE SET"
    " journal_id = GREATEST(patients_marks.journal_id, excluded.journal_id)"
)
_HOLD = (
    "INSERT INTO patients_keys_held VALUES (%s, %s, %s, %s, now() + %s * interval '1 second')"
    " ON CONFLICT (kind, key, holder) DO UPDATE SET patient = excluded.patient, expires = excluded.expires"
)
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def _e(text: str) -> str:
    """``text`` as stored: ``\\`` and NUL escaped (PostgreSQL text has no NUL)."""
    return text.replace("\\", "\\\\").replace("\x00", "\\0") if "\\" in text or "\x00" in text else text


def _d(text: str) -> str:
    """What `_e` stored."""
    return _ESCAPED.sub(lambda m: "\x00" if m.group(1) == "0" else m.group(1), text) if "\\" in text else text


def _pair_row(p: Pair) -> tuple[str, str, str, str, str]:
    return (_e(p.ipp), _e(p.ipp_oid), _e(p.ipp_namespace), _e(p.ins_oid), _e(p.ins))


def _pair(row: Any) -> Pair:
    return Pair(*(_d(v) for v in row[:5]))


def _lock_id(name: str) -> int:
    """A signed 32-bit advisory lock key for a name (a collision only serialises two unrelated checks)."""
    crc = zlib.crc32(name.encode("utf-8", "surrogatepass"))
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _locks(payloads: list[Any]) -> list[str]:
    """What deciding about these payloads locks: the IPP values and INS of their pairs, their order keys, and for
    merges every IPP they name and the merges themselves."""
    names = []
    for p in pairs_of(payloads):
        names += [f"ipp:{p.ipp}", f"ins:{p.ins_oid}|{p.ins}"]
    for payload in payloads:
        names += [f"key:{kind}|{key}" for kind, key in keys_of(payload)]
        if isinstance(payload, PatientUpdate) and payload.action == "merge":
            names += ["merges", *(f"ipp:{i.value}" for i in [*payload.patient.ids, *payload.merged_ids])]
    return names


class PostgresPatientRegistry(IdentityRules):
    """The patient identity registry of every node on the database at ``url`` (`traboule.stores.PatientRegistry`).
    The schema is created or upgraded when it opens."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._node = uuid.uuid4().hex[:16]  # what this registry reserves is its own
        self._lock = threading.RLock()
        self._db = self._connect()
        try:
            migrations.check(self._db, COMPONENT)
        except BaseException:
            self._db.close()
            raise
        self._pruned = time.monotonic()
        self._closed = False
        self._survivors: dict[tuple[str, str, str], list[Identifier] | None] | None = None  # `_memo`

    def _connect(self) -> psycopg.Connection:
        try:
            return connect(self.url)
        except psycopg.OperationalError as exc:  # an OSError: the engine says "cannot start" with the reason
            raise ConnectionError(f"database {redact(self.url)}: {exc}".strip()) from exc

    def _conn(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("the patient registry is closed")
        if self._db.broken or self._db.closed:
            self._db = self._connect()  # the server restarted: a new session
        return self._db

    def _rows(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn().execute(sql, params).fetchall()

    @contextmanager
    def _transaction(self, locks: Iterable[str] = (), *, durable: bool = True) -> Iterator[psycopg.Connection]:
        """One transaction holding the advisory locks of ``locks`` (taken in one order on every node, in one
        statement); the reads made meanwhile (`known`, `current`...) run in it, merges looked up once per IPP.
        ``durable`` False: committed without waiting for the server's WAL flush (what a crash may lose)."""
        with self._lock, self._memo():
            db = self._conn()
            with db.transaction():
                if not durable:
                    db.execute("SET LOCAL synchronous_commit = off")
                keys = sorted({_lock_id(name) for name in locks})
                if keys:  # a function scan yields its rows in order: the locks are taken in that order
                    db.execute(
                        "SELECT pg_advisory_xact_lock(%s, k) FROM unnest(%s::int4[]) AS k", (LOCK_CLASS, keys)
                    ).fetchall()
                yield db

    @contextmanager
    def _memo(self) -> Iterator[None]:
        """The survivors looked up during one call are remembered until it returns (a check asks for the same IPP
        several times); the next call reads the database again."""
        with self._lock:
            if self._survivors is not None:
                yield
                return
            self._survivors = {}
            try:
                yield
            finally:
                self._survivors = None

    def close(self) -> None:
        """Close the connection (everything is written already)."""
        with self._lock:
            self._closed = True
            self._db.close()

    def known(self, pair: Pair) -> list[Pair]:
        """The recorded INS of this kind for the same IPP."""
        rows = self._rows(
            f"SELECT {_PAIR} FROM patients_ins WHERE ipp = %s AND ins_oid = %s", (_e(pair.ipp), _e(pair.ins_oid))
        )
        return [p for p in map(_pair, rows) if p.same_ipp(pair)]

    # -- INS ---------------------------------------------------------------------------------------------------

    def check(self, payloads: Iterable[Any]) -> list[str]:
        """Refuse (`MappingFailure`, PID-3) a message giving an IPP another INS than the one it was accepted
        with or reserved for by a message in flight on any node; otherwise reserve its pairs until `record` (or
        `release`). A patient update from an identity source (``authoritative``) replaces the INS instead:
        returns the warnings to journal, one per INS it changes."""
        payloads = list(payloads)
        pairs = pairs_of(payloads)
        if not pairs:
            return []
        ruling = set(pairs_of(p for p in payloads if _authoritative(p)))
        with self._transaction(_locks(payloads), durable=False) as db:  # a reservation lost in a crash: its
            self._prune(db)  # message was not answered either
            given = {(p.ins_oid, p.ins) for p in pairs}
            by = ([_e(p.ipp) for p in pairs], [_e(o) for o, _ in given], [_e(i) for _, i in given])  # the indexes
            reserved = db.execute(
                f"SELECT {_PAIR} FROM patients_reserved WHERE (ipp = ANY(%s) OR (ins_oid = ANY(%s) AND ins = ANY(%s)))"
                " AND expires > now()",
                by,
            ).fetchall()
            recorded = list(
                map(
                    _pair,
                    db.execute(
                        f"SELECT {_PAIR} FROM patients_ins"
                        " WHERE ipp = ANY(%s) OR (ins_oid = ANY(%s) AND ins = ANY(%s))",
                        by,
                    ),
                )
            )
            ipps = {p.ipp for p in pairs}
            held = [p for p in map(_pair, reserved) if p.ipp in ipps]
            elsewhere = [p for p in map(_pair, reserved) if (p.ins_oid, p.ins) in given]  # other IPPs in flight
            notes = []
            for pair in pairs:
                known = [p for p in recorded if p.same_ipp(pair)]
                if pair in ruling:  # the identity system's word: only the message itself may not contradict it
                    changed = [p for p in known if p.ins != pair.ins]
                    if changed:
                        notes.append(_changed_note(pair, changed))
                    known, against = [], pairs
                else:
                    against = [*held, *pairs]
                if [p for p in [*known, *against] if p.same_ipp(pair) and p.ins != pair.ins]:
                    kind = INS_OIDS.get(pair.ins_oid, "INS")
                    raise MappingFailure(
                        f"identity conflict: this patient identifier was accepted with another {kind}; the INS is "
                        "not replaced (correct the identity, or merge, in the patient identity system)",
                        "PID-3",
                        code="205",
                    )
                holders = [p for p in recorded if (p.ins_oid, p.ins) == (pair.ins_oid, pair.ins)]
                if self._held_by_another_ipp(pair, [*holders, *elsewhere, *pairs]):
                    raise MappingFailure(
                        "identity conflict: INS already belongs to another IPP of this authority; merge them in the "
                        "patient identity system first",
                        "PID-3",
                        code="205",
                    )
            with db.cursor() as cur:
                cur.executemany(_RESERVE, [(*_pair_row(p), self._node, float(sqlite_registry.RESERVED)) for p in pairs])
        return notes

    def _prune(self, db: psycopg.Connection) -> None:
        """Forget expired reservations now and then (messages refused later or never stored, a node that died)."""
        now = time.monotonic()
        if now - self._pruned > sqlite_registry.RESERVED:
            self._pruned = now
            db.execute("DELETE FROM patients_reserved WHERE expires < now()")
            db.execute("DELETE FROM patients_keys_held WHERE expires < now()")

    def _held_by_another_ipp(self, pair: Pair, held: list[Pair]) -> bool:
        """Whether another IPP of the pair's assigning authority holds its INS (``held``: recorded, or reserved by
        a message in flight), the two not merged into one another."""
        mine = Identifier(pair.ipp, pair.ipp_namespace, pair.ipp_oid)
        for other in held:
            theirs = Identifier(other.ipp, other.ipp_namespace, other.ipp_oid)
            if other.ins_oid != pair.ins_oid or other.ins != pair.ins:
                continue
            if other.ipp == pair.ipp or not same_authority(mine, theirs):
                continue
            if not same_patient(self.current([mine]), self.current([theirs])):
                return True
        return False

    def release(self, payloads: Iterable[Any]) -> None:
        """Stop holding the pairs and order keys `check` and `check_order` reserved on this node for a message that
        was not accepted (refused, a duplicate, not stored)."""
        payloads = list(payloads)
        pairs = pairs_of(payloads)
        if not pairs and not any(isinstance(p, ImagingOrder) for p in payloads):
            return
        with self._transaction(durable=False) as db:  # lost in a crash: they expire
            self._release_keys(db, payloads)
            self._release(db, pairs)

    def _release(self, db: psycopg.Connection, pairs: list[Pair]) -> None:
        """One message's hold on its pairs ended: one reservation of this node per pair (another message in flight
        with the same pair still holds its own)."""
        if pairs:
            with db.cursor() as cur:
                cur.executemany(_UNRESERVE, [(*_pair_row(p), self._node) for p in pairs])

    # -- merges ------------------------------------------------------------------------------------------------

    def survivor(self, ipp: Identifier) -> list[Identifier] | None:
        """The identifiers of the patient a merged IPP now is (merges followed to the last): the surviving IPP and
        the INS the registry holds for it now; or None."""
        memo, key = self._survivors, (ipp.value, ipp.issuer, ipp.issuer_oid)
        if memo is not None and key in memo:
            found = memo[key]
            return None if found is None else [Identifier(i.value, i.issuer, i.issuer_oid, i.type) for i in found]
        head = self._surviving_ipp(ipp)
        result: list[Identifier] | None = None
        if head is not None:
            rows = self._rows(f"SELECT {_PAIR} FROM patients_ins WHERE ipp = %s ORDER BY ins_oid", (_e(head.value),))
            ins = []
            for p in map(_pair, rows):
                if same_ipp(Identifier(p.ipp, p.ipp_namespace, p.ipp_oid), head):
                    ins.append(Identifier(p.ins, _INS_NAMES.get(p.ins_oid, ""), p.ins_oid, "INS"))
            result = [head, *ins]
        if memo is not None:
            memo[key] = (
                None if result is None else [Identifier(i.value, i.issuer, i.issuer_oid, i.type) for i in result]
            )
        return result

    def _surviving_ipp(self, ipp: Identifier) -> Identifier | None:
        found: Identifier | None = None
        seen: set[tuple[str, str, str]] = set()
        current = ipp
        for _ in range(MAX_MERGE_CHAIN):
            rows = self._rows(
                "SELECT ipp, ipp_namespace, ipp_oid, survivor FROM patients_merges WHERE ipp = %s"
                " ORDER BY recorded DESC",
                (_e(current.value),),
            )
            rows = [(_d(a), _d(b), _d(c), s) for a, b, c, s in rows]
            row = next((r for r in rows if same_ipp(Identifier(r[0], r[1], r[2]), current)), None)
            if row is None or (row[0], row[1], row[2]) in seen:
                break
            seen.add((row[0], row[1], row[2]))
            nxt = next((i for i in _load(row[3]) if not _is_ins(i)), None)
            if nxt is None:
                break
            found = current = nxt
        return found

    # -- owners of order keys -----------------------------------------------------------------------------------

    def owner(self, kind: str, key: str) -> list[Identifier] | None:
        """The identifiers of the patient an order key belongs to, as recorded (merges not followed)."""
        text = self._owner_texts([(kind, key)]).get((kind, key))
        return _load(text) if text is not None else None

    def _owner_texts(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        if not keys:
            return {}
        rows = self._rows(
            "SELECT kind, key, patient FROM patients_owners WHERE key = ANY(%s) AND kind = ANY(%s)",
            ([_e(k) for _, k in keys], sorted({_e(kind) for kind, _ in keys})),
        )
        wanted = set(keys)
        return {(k, v): text for kind, key, text in rows if (k := _d(kind), v := _d(key)) in wanted}

    def same_patient(self, a: Patient, b: Patient) -> bool:
        """Whether two canonical patients are one, merges followed: a merged IPP is its survivor."""
        ids_a, ids_b = _local(a) + _ins(a), _local(b) + _ins(b)
        with self._memo():
            return bool(ids_a and ids_b) and same_patient(self.current(ids_a), self.current(ids_b))

    def mismatch(self, payload: Any) -> tuple[str, str, list[Identifier], list[Identifier]] | None:
        """The first key of ``payload`` that belongs to another patient: (kind, value, its patient, this one)."""
        patient = patient_of(payload)
        if patient is None:
            return None
        ids = _identity(patient)
        if not ids:
            return None
        keys = keys_of(payload)
        owners = self._owner_texts(keys)
        if not owners:
            return None
        mine = self.current(ids)
        for kind, key in keys:
            if (kind, key) not in owners:
                continue
            theirs = self.current(_load(owners[(kind, key)]))
            if not same_patient(mine, theirs):
                return kind, key, theirs, mine
        return None

    def _refuse(self, payloads: Iterable[Any], what: str, location: str, remedy: str = "") -> None:
        with self._memo():
            found = next((f for f in map(self.mismatch, payloads) if f is not None), None)
        if found is not None:
            kind, key, theirs, mine = found
            raise MappingFailure(
                f"patient mismatch: {KEY_NAMES[kind]} {key} belongs to patient {describe(theirs)}, this {what} "
                f"names patient {describe(mine)}; "
                + (remedy or "not linked (correct the patient or the order identifiers)"),
                location,
                code="205",
            )

    def _holder(self, order: Any) -> str:
        return f"{self._node}:{id(order)}"

    def check_order(self, payloads: Iterable[Any]) -> None:
        """Refuse (`MappingFailure`, PID-3) an order whose keys belong to another patient, recorded or named by an
        order in flight on any node; otherwise its keys are held for its patient until `record` (or `release`)."""
        remedy = (
            "not applied (a patient change of an order comes through the patient identity system: merge the "
            "patients there)"
        )
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        if not orders:
            return
        with self._transaction(_locks(orders), durable=False) as db:  # a hold lost in a crash: its message too
            self._prune(db)
            self._refuse(orders, "order", "PID-3", remedy)
            holds = []
            for order in orders:
                ids = _identity(order.patient)
                keys = keys_of(order)
                if not ids or not keys:
                    continue
                mine = self.current(ids)
                rows = db.execute(
                    "SELECT kind, key, holder, patient FROM patients_keys_held WHERE kind = ANY(%s) AND key = ANY(%s)"
                    " AND expires > now()",
                    (sorted({_e(kind) for kind, _ in keys}), [_e(k) for _, k in keys]),
                ).fetchall()
                for kind, key, holder, text in rows:
                    kind, key = _d(kind), _d(key)
                    if (kind, key) not in keys or holder == self._holder(order):
                        continue
                    theirs = self.current(_load(text))
                    if not same_patient(mine, theirs):
                        raise MappingFailure(
                            f"patient mismatch: {KEY_NAMES[kind]} {key} belongs to patient {describe(theirs)}, this "
                            f"order names patient {describe(mine)}; {remedy}",
                            "PID-3",
                            code="205",
                        )
                text = _dump(ids)
                reserved = float(sqlite_registry.RESERVED)
                holds += [(_e(kind), _e(key), self._holder(order), text, reserved) for kind, key in keys]
            if holds:
                with db.cursor() as cur:
                    cur.executemany(_HOLD, holds)

    def _release_keys(self, db: psycopg.Connection, payloads: list[Any]) -> None:
        """The keys `check_order` held on this node for these orders: recorded (or refused), they hold nothing."""
        rows = [
            (self._holder(p), _e(kind), _e(key))
            for p in payloads
            if isinstance(p, ImagingOrder)
            for kind, key in keys_of(p)
        ]
        if rows:
            with db.cursor() as cur:
                cur.executemany("DELETE FROM patients_keys_held WHERE holder = %s AND kind = %s AND key = %s", rows)

    # -- recording ----------------------------------------------------------------------------------------------

    def record(self, payloads: Iterable[Any], *, channel: str = "", journal_id: int = 0) -> None:
        """Remember what a journaled (accepted) message says, in one transaction: its IPP-INS pairs (an identity
        source's replacing the recorded ones), the owners of the order keys it names (an order's replaces what a
        report, step or study recorded; those only fill a key no one gave), the channel's `mark`, its merges; the
        message's reservations end with it."""
        payloads = list(payloads)
        mark = (channel, journal_id) if channel and journal_id else None
        with self._transaction(_locks(payloads)) as db:
            durable = self._record_pairs(db, payloads)
            self._record_owners(db, payloads, mark)
            self._release_keys(db, payloads)  # their owners are seen now
            durable = self._record_merges(db, payloads) or durable
            if not durable:  # owners only: see the module docstring
                db.execute("SET LOCAL synchronous_commit = off")

    def _record_pairs(self, db: psycopg.Connection, payloads: list[Any]) -> bool:
        """The pairs of the payloads (in the caller's transaction); whether one was written or changed."""
        given = pairs_of(payloads)
        if not given:
            return False
        ruling = set(pairs_of(p for p in payloads if _authoritative(p)))
        replaced = [(p, old) for p in given if p in ruling for old in self.known(p) if old.ins != p.ins]
        for new, old in replaced:
            kind = INS_OIDS.get(old.ins_oid, "INS")
            self._rewrite(db, old, new.ins, "ins-changed", f"{kind} {old.ins} -> {new.ins}")
            log.warning("identities.ins_changed", kind=kind)
        pairs = [p for p in given if p not in self.known(p)]
        if pairs:
            recorded = _now()
            with db.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO patients_ins ({_PAIR}, recorded) VALUES (%s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING",
                    [(*_pair_row(p), recorded) for p in pairs],
                )
        self._release(db, given)
        if (pairs or replaced) and self._survivors:
            self._survivors.clear()  # a survivor's INS may have changed
        return bool(pairs or replaced)

    def _rewrite(self, db: psycopg.Connection, old: Pair, ins: str, action: str, detail: str) -> None:
        """Remove the pair ``old`` and give the owners naming it ``ins`` instead (none: the IPP alone), with the
        action's record (in the caller's transaction)."""
        rows = db.execute(
            "SELECT kind, key, patient FROM patients_owners WHERE strpos(patient, %s) > 0 FOR UPDATE",
            (json.dumps(old.ins)[1:-1],),
        ).fetchall()
        changes = [(new, kind, key) for kind, key, text in rows if (new := _with_ins(text, old, ins)) != text]
        db.execute(f"DELETE FROM patients_ins WHERE {_SAME_PAIR}", _pair_row(old))
        if changes:
            with db.cursor() as cur:
                cur.executemany("UPDATE patients_owners SET patient = %s WHERE kind = %s AND key = %s", changes)
        db.execute(
            "INSERT INTO patients_actions (at, action, ipp, detail) VALUES (%s, %s, %s, %s)",
            (_now(), action, _e(old.ipp), _e(detail)),
        )

    def forget(self, ipp: str) -> list[Pair]:
        """An operator's way out: the INS recorded for this IPP value (any authority, any kind) removed, the owners
        of its keys keeping the IPP alone. Returns the pairs removed (recorded among the registry's actions)."""
        with self._transaction([f"ipp:{ipp}"]) as db:
            pairs = [
                _pair(r) for r in db.execute(f"SELECT {_PAIR} FROM patients_ins WHERE ipp = %s FOR UPDATE", (_e(ipp),))
            ]
            for pair in pairs:
                kind = INS_OIDS.get(pair.ins_oid, "INS")
                self._rewrite(db, pair, "", "ins-forgotten", f"{kind} {pair.ins} (operator)")
        return pairs

    def show(self, ipp: str) -> dict[str, Any]:
        """What the registry holds about an IPP value: its INS, the order keys it owns, its merges (merged into,
        merged in), the changes of its INS. For an operator's terminal (patient data)."""
        needle = json.dumps(ipp, ensure_ascii=False)[1:-1]
        ins = self._rows(
            "SELECT ipp_namespace, ipp_oid, ins_oid, ins, recorded FROM patients_ins WHERE ipp = %s ORDER BY recorded",
            (_e(ipp),),
        )
        owners = self._rows(
            "SELECT kind, key, patient, source, recorded FROM patients_owners WHERE strpos(patient, %s) > 0"
            " ORDER BY recorded",
            (needle,),
        )
        merged_into = self._rows(
            "SELECT ipp_namespace, ipp_oid, survivor, recorded FROM patients_merges WHERE ipp = %s", (_e(ipp),)
        )
        merged_in = self._rows(
            "SELECT ipp, ipp_namespace, ipp_oid, survivor, recorded FROM patients_merges"
            " WHERE strpos(survivor, %s) > 0",
            (needle,),
        )
        actions = self._rows(
            "SELECT at, action, detail FROM patients_actions WHERE ipp = %s ORDER BY at, id", (_e(ipp),)
        )

        def names(ids: list[Identifier]) -> bool:
            return any(i.value == ipp and not _is_ins(i) for i in ids)

        return {
            "ins": [
                {
                    "authority": _d(ns) or _d(oid),
                    "kind": INS_OIDS.get(_d(kind), "INS"),
                    "ins": _d(value),
                    "recorded": at,
                }
                for ns, oid, kind, value, at in ins
            ],
            "owners": [
                {
                    "kind": KEY_NAMES[_d(kind)],
                    "key": _d(key),
                    "patient": describe(ids),
                    "source": source,
                    "recorded": at,
                }
                for kind, key, text, source, at in owners
                if names(ids := _load(text))
            ],
            "merged_into": [
                {"authority": _d(ns) or _d(oid), "survivor": describe(_load(text)), "recorded": at}
                for ns, oid, text, at in merged_into
            ],
            "merged_in": [
                {"ipp": describe([Identifier(_d(value), _d(ns), _d(oid))]), "recorded": at}
                for value, ns, oid, text, at in merged_in
                if names(_load(text)[:1])
            ],
            "actions": [{"at": at, "action": action, "detail": _d(detail)} for at, action, detail in actions],
        }

    def mark(self, channel: str) -> int:
        """The highest journal id of ``channel`` whose owners are written (0: none)."""
        rows = self._rows("SELECT journal_id FROM patients_marks WHERE channel = %s", (_e(channel),))
        return int(rows[0][0]) if rows else 0

    def rebuild(self, entries: Iterable[tuple[int, str, list[Any]]], channel: str) -> int:
        """At start: record again what accepted messages journaled after the channel's `mark` said, in journal
        order (see `traboule.stores.patient_identity.PatientIdentities.rebuild`): their pairs fill what the
        registry lacks (an IPP's INS changed or forgotten since the message came is left as it is now), their
        merges are applied again, their owners take the INS the registry holds now for their IPP. One transaction
        per message; returns how many messages were looked at."""
        n = 0
        for journal_id, received, payloads in entries:
            n += 1
            with self._transaction(_locks(payloads)) as db:
                acted = {_d(r[0]) for r in db.execute("SELECT ipp FROM patients_actions WHERE at >= %s", (received,))}
                fill = []
                for payload in payloads:
                    patient = patient_of(payload)
                    ipp = _ipp(patient) if patient is not None else None
                    if ipp is None or ipp.value in acted:
                        continue
                    mine = pairs_of([payload])
                    if _authoritative(payload) or not any(k.ins != p.ins for p in mine for k in self.known(p)):
                        fill.append(payload)
                self._record_pairs(db, fill)
                self._record_merges(db, payloads)
                for payload in payloads:
                    patient = patient_of(payload)
                    if patient is not None:
                        self._current_ins(patient)
                self._record_owners(db, payloads, (channel, journal_id))
        return n

    def _current_ins(self, patient: Patient) -> None:
        """A patient's INS as the registry holds them now for its IPP (a message older than a correction)."""
        ipp = _ipp(patient)
        for ident in _ins(patient) if ipp is not None else []:
            pair = Pair(ipp.value, ipp.issuer_oid, ipp.issuer, ident.issuer_oid, ident.value.upper())
            known = self.known(pair)
            if known and all(k.ins != pair.ins for k in known):
                for other in patient.ids:
                    if _is_ins(other) and other.issuer_oid == pair.ins_oid and other.value.upper() == pair.ins:
                        other.value = known[0].ins

    def _record_owners(self, db: psycopg.Connection, payloads: list[Any], mark: tuple[str, int] | None) -> None:
        """The owners of the keys the payloads name, and the channel's mark (in the caller's transaction)."""
        recorded = _now()
        rows = []
        for payload in payloads:
            if isinstance(payload, PatientUpdate):
                continue
            patient = patient_of(payload)
            ids = _identity(patient) if patient is not None else []
            if not ids:
                continue
            source = _SOURCES.get(type(payload), "report")
            text = _dump(ids)
            rows += [(_e(kind), _e(key), text, source, recorded) for kind, key in keys_of(payload)]
        with db.cursor() as cur:
            if rows:
                cur.executemany(_OWNER, rows)
            if mark is not None:
                cur.execute(_MARK, (_e(mark[0]), mark[1]))

    def _record_merges(self, db: psycopg.Connection, payloads: list[Any]) -> bool:
        """The merges of the payloads (in the caller's transaction); whether there was one."""
        merges = [p for p in payloads if isinstance(p, PatientUpdate) and p.action == "merge"]
        recorded = _now()
        for update in merges:
            survivor = _identity(update.patient)
            head = survivor[0] if survivor and not _is_ins(survivor[0]) else None
            if head is None:
                continue
            # The survivor is a patient again (a merge the other way round undoes an earlier one).
            for row in db.execute(
                "SELECT ipp, ipp_namespace, ipp_oid FROM patients_merges WHERE ipp = %s", (_e(head.value),)
            ).fetchall():
                if same_ipp(Identifier(*map(_d, row)), head):
                    db.execute(
                        "DELETE FROM patients_merges WHERE ipp = %s AND ipp_namespace = %s AND ipp_oid = %s", row
                    )
            for merged in update.merged_ids:
                if not merged.value or same_ipp(merged, head):
                    continue
                db.execute(
                    "INSERT INTO patients_merges VALUES (%s, %s, %s, %s, %s) ON CONFLICT (ipp, ipp_oid, ipp_namespace)"
                    " DO UPDATE SET survivor = excluded.survivor, recorded = excluded.recorded",
                    (_e(merged.value), _e(merged.issuer_oid), _e(merged.issuer), _dump([head]), recorded),
                )
                # The merged IPP's INS are the survivor's (one person).
                rows = db.execute(f"SELECT {_PAIR} FROM patients_ins WHERE ipp = %s", (_e(merged.value),)).fetchall()
                for p in map(_pair, rows):
                    if same_ipp(Identifier(p.ipp, p.ipp_namespace, p.ipp_oid), merged):
                        db.execute(
                            f"INSERT INTO patients_ins ({_PAIR}, recorded) VALUES (%s, %s, %s, %s, %s, %s)"
                            " ON CONFLICT DO NOTHING",
                            (_e(head.value), _e(head.issuer_oid), _e(head.issuer), _e(p.ins_oid), _e(p.ins), recorded),
                        )
        if merges and self._survivors:
            self._survivors.clear()
        return bool(merges)
