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
* Round trips: the usual message's checks are one statement, `admit` (``patients_admit``, migration 3): what
  `resolve_merged`, `check`, `check_report` and `check_order` would decide of a message of orders and patient
  updates naming no merged IPP, whose pairs and keys are its patient's or nobody's, with all their locks at once;
  it declines (writes nothing) otherwise, and the channel makes those calls. A key whose recorded owner is this
  very patient is not held (another patient's order naming it is refused by the owner already). Otherwise one
  statement per call, a function of the schema (``patients_*``, migration
  2) that takes the locks, reads and writes in its own transaction (each statement of a volatile function sees
  what committed before it, the locks taken first): `check` of pairs recorded or reserved exactly as the message
  gives them, or nowhere (``patients_reserve``); `check_order` of one order whose keys no other patient's
  identifiers name, recorded or held (``patients_hold``); `record` without an identity source's update or a merge
  (``patients_record``, a group commit: the records other threads make while one is in flight share the next
  statement, and the marks' row is updated once for them); `resolve_merged` reads the merges of every IPP named in
  one statement. The two check functions write nothing and answer false when they see anything else (another INS,
  another patient's identifiers, a merge): the check then runs in full, in a pipelined transaction (its reads sent
  together: two round trips) with the decision made in Python, like the other calls (merges, corrections,
  `forget`, `rebuild`). Merges are looked up per IPP value, no cache between calls (only within one call): a merge
  committed by a node is applied by the next check of every node.
* Checks committed without waiting for the WAL flush: a reservation lost in a crash held a message that was not
  answered.
* Durability: a record that writes an INS pair, a change of INS or a merge commits with ``synchronous_commit`` on
  before it returns. A record that only writes owners (nearly every order) commits with ``synchronous_commit``
  off (no WAL flush of its own: the next durable commit of any node, the journal's, flushes it): a crash of the
  server may lose the last ones, and their channel's `mark` with them (same transaction), so the channel's
  `rebuild` records them again from the journal.
* PostgreSQL text cannot hold a NUL character: identifiers and keys are stored with ``\\`` and NUL escaped
  (``\\\\``, ``\\0``); the patients' identifiers are JSON (NUL escaped by JSON itself).
* Thread-safe, with a pool of connections (`POOL_SIZE`, opened as needed): a call takes one for its duration, so
  calls from several threads run at once (``off_loop``: the channels make them on threads, never on the event
  loop, which serves the other connections meanwhile).
"""

from __future__ import annotations

import contextlib
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
from psycopg.pq import TransactionStatus

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
POOL_SIZE = 8  # connections per registry: the calls of as many threads at once

# The usual message in one statement each (one round trip, one implicit transaction; the statements of a volatile
# function each see what committed before them, the advisory locks taken first): `check` of pairs all known or
# reserved as they are, `check_order` of keys no other patient names, `record` without an identity source's
# update or a merge. The first two answer false, writing nothing, when they see anything else: the checks then run
# in full (`PostgresPatientRegistry._check_all`, `_check_order_all`).
_FUNCTIONS = """
CREATE FUNCTION patients_reserve(
    lock_class int4, locks int4[], p_ipp text[], p_ipp_oid text[], p_ipp_ns text[], p_ins_oid text[], p_ins text[],
    p_node text, p_seconds float8
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(locks) AS k;
    IF EXISTS (
        SELECT 1 FROM (
            SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM patients_reserved
            WHERE (ipp = ANY(p_ipp) OR (ins_oid = ANY(p_ins_oid) AND ins = ANY(p_ins))) AND expires > now()
            UNION ALL
            SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM patients_ins
            WHERE ipp = ANY(p_ipp) OR (ins_oid = ANY(p_ins_oid) AND ins = ANY(p_ins))
        ) AS seen
        WHERE (ipp, ipp_oid, ipp_namespace, ins_oid, ins) NOT IN (
            SELECT * FROM unnest(p_ipp, p_ipp_oid, p_ipp_ns, p_ins_oid, p_ins))
    ) THEN
        RETURN false;
    END IF;
    INSERT INTO patients_reserved (ipp, ipp_oid, ipp_namespace, ins_oid, ins, node, expires)
        SELECT u.*, p_node, now() + p_seconds * interval '1 second'
        FROM unnest(p_ipp, p_ipp_oid, p_ipp_ns, p_ins_oid, p_ins) AS u;
    RETURN true;
END $$;

CREATE FUNCTION patients_hold(
    lock_class int4, locks int4[], p_kind text[], p_key text[], p_holder text, p_patient text, p_ipp text,
    p_seconds float8
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(locks) AS k;
    IF EXISTS (SELECT 1 FROM patients_merges WHERE ipp = p_ipp)
        OR EXISTS (
            SELECT 1 FROM patients_owners o JOIN unnest(p_kind, p_key) AS u(kind, key)
                ON o.kind = u.kind AND o.key = u.key
            WHERE o.patient <> p_patient)
        OR EXISTS (
            SELECT 1 FROM patients_keys_held h JOIN unnest(p_kind, p_key) AS u(kind, key)
                ON h.kind = u.kind AND h.key = u.key
            WHERE h.expires > now() AND h.holder <> p_holder AND h.patient <> p_patient)
    THEN
        RETURN false;
    END IF;
    INSERT INTO patients_keys_held
        SELECT u.kind, u.key, p_holder, p_patient, now() + p_seconds * interval '1 second'
        FROM unnest(p_kind, p_key) AS u(kind, key)
        ON CONFLICT (kind, key, holder) DO UPDATE SET patient = excluded.patient, expires = excluded.expires;
    RETURN true;
END $$;

CREATE FUNCTION patients_record(
    lock_class int4, locks int4[], p_ipp text[], p_ipp_oid text[], p_ipp_ns text[], p_ins_oid text[], p_ins text[],
    p_node text, p_recorded text, o_kind text[], o_key text[], o_patient text[], o_source text[], m_channel text[],
    m_id bigint[], r_holder text[], r_kind text[], r_key text[]
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    added bigint := 0;
    n bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(locks) AS k;
    FOR i IN 1 .. coalesce(array_length(p_ipp, 1), 0) LOOP
        INSERT INTO patients_ins (ipp, ipp_oid, ipp_namespace, ins_oid, ins, recorded)
            VALUES (p_ipp[i], p_ipp_oid[i], p_ipp_ns[i], p_ins_oid[i], p_ins[i], p_recorded) ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        added := added + n;
        DELETE FROM patients_reserved WHERE id = (
            SELECT id FROM patients_reserved WHERE ipp = p_ipp[i] AND ipp_oid = p_ipp_oid[i]
                AND ipp_namespace = p_ipp_ns[i] AND ins_oid = p_ins_oid[i] AND ins = p_ins[i] AND node = p_node
            LIMIT 1);
    END LOOP;
    -- durable (the commit waits for the WAL flush) when it wrote a pair; owners only: see the module docstring
    PERFORM set_config('synchronous_commit', CASE WHEN added > 0 THEN 'on' ELSE 'off' END, true);
    FOR i IN 1 .. coalesce(array_length(o_kind, 1), 0) LOOP
        INSERT INTO patients_owners VALUES (o_kind[i], o_key[i], o_patient[i], o_source[i], p_recorded)
            ON CONFLICT (kind, key) DO UPDATE SET
                patient = excluded.patient, source = excluded.source, recorded = excluded.recorded
            WHERE excluded.source = 'order' AND patients_owners.patient <> excluded.patient;
    END LOOP;
    INSERT INTO patients_marks
        SELECT channel, max(id) FROM unnest(m_channel, m_id) AS m(channel, id) GROUP BY channel ORDER BY channel
        ON CONFLICT (channel) DO UPDATE SET journal_id = GREATEST(patients_marks.journal_id, excluded.journal_id);
    DELETE FROM patients_keys_held h USING unnest(r_holder, r_kind, r_key) AS r(holder, kind, key)
        WHERE h.holder = r.holder AND h.kind = r.kind AND h.key = r.key;
    RETURN added > 0;
END $$;
"""

# The usual message's checks in one statement (`PostgresPatientRegistry.admit`): what `resolve_merged`, `check` and
# `check_order` decide of a message naming no merged IPP, whose pairs and order keys are the patient's or nobody's,
# with every lock of the three taken at once (one order). Answers false, writing nothing, otherwise: the channel then
# makes the three calls. A key whose owner is recorded as this very patient is not held (another patient's order
# naming it is refused by that owner already, and an owner is only ever replaced by the same patient's).
_ADMIT = """
CREATE FUNCTION patients_admit(
    lock_class int4, locks int4[], p_merged text[], p_ipp text[], p_ipp_oid text[], p_ipp_ns text[],
    p_ins_oid text[], p_ins text[], p_node text, p_kind text[], p_key text[], p_holder text, p_patient text,
    p_seconds float8
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    owner text;
    owned boolean[] := '{}';
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(lock_class, k) FROM unnest(locks) AS k;
    IF EXISTS (SELECT 1 FROM patients_merges WHERE ipp = ANY(p_merged)) THEN
        RETURN false;
    END IF;
    IF cardinality(p_ipp) > 0 AND EXISTS (
        SELECT 1 FROM (
            SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM patients_reserved
            WHERE (ipp = ANY(p_ipp) OR (ins_oid = ANY(p_ins_oid) AND ins = ANY(p_ins))) AND expires > now()
            UNION ALL
            SELECT ipp, ipp_oid, ipp_namespace, ins_oid, ins FROM patients_ins
            WHERE ipp = ANY(p_ipp) OR (ins_oid = ANY(p_ins_oid) AND ins = ANY(p_ins))
        ) AS seen
        WHERE (ipp, ipp_oid, ipp_namespace, ins_oid, ins) NOT IN (
            SELECT * FROM unnest(p_ipp, p_ipp_oid, p_ipp_ns, p_ins_oid, p_ins))
    ) THEN
        RETURN false;
    END IF;
    -- key by key (a handful): index lookups whatever the tables' sizes
    FOR i IN 1 .. coalesce(cardinality(p_kind), 0) LOOP
        SELECT patient INTO owner FROM patients_owners WHERE kind = p_kind[i] AND key = p_key[i];
        IF FOUND AND owner <> p_patient THEN
            RETURN false;
        END IF;
        owned := owned || FOUND;
        IF EXISTS (
            SELECT 1 FROM patients_keys_held WHERE kind = p_kind[i] AND key = p_key[i] AND expires > now()
                AND holder <> p_holder AND patient <> p_patient
        ) THEN
            RETURN false;
        END IF;
    END LOOP;
    INSERT INTO patients_reserved (ipp, ipp_oid, ipp_namespace, ins_oid, ins, node, expires)
        SELECT u.*, p_node, now() + p_seconds * interval '1 second'
        FROM unnest(p_ipp, p_ipp_oid, p_ipp_ns, p_ins_oid, p_ins) AS u;
    INSERT INTO patients_keys_held
        SELECT u.kind, u.key, p_holder, p_patient, now() + p_seconds * interval '1 second'
        FROM unnest(p_kind, p_key, owned) AS u(kind, key, owned) WHERE NOT u.owned
        ON CONFLICT (kind, key, holder) DO UPDATE SET patient = excluded.patient, expires = excluded.expires;
    RETURN true;
END $$;
"""

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
        ),
        (2, _FUNCTIONS),
        (3, _ADMIT),
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
_RESERVE_CALL = (
    "SELECT patients_reserve(%s, %b::int4[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %s, %s)"
)
_ADMIT_CALL = (
    "SELECT patients_admit(%s, %b::int4[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],"
    " %s, %b::text[], %b::text[], %s, %s, %s)"
)
_HOLD_CALL = "SELECT patients_hold(%s, %b::int4[], %b::text[], %b::text[], %s, %s, %s, %s)"
_RECORD_CALL = (
    "SELECT patients_record(%s, %b::int4[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %s, %s,"
    " %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[], %b::text[], %b::text[])"
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


def _ask_owners(db: psycopg.Connection, keys: list[tuple[str, str]]) -> psycopg.Cursor[Any] | None:
    """Ask for the recorded owners of these order keys (read by `_owners_read`; in a pipeline, no round trip yet)."""
    if not keys:
        return None
    return db.execute(
        "SELECT kind, key, patient FROM patients_owners WHERE key = ANY(%s) AND kind = ANY(%s)",
        ([_e(k) for _, k in keys], sorted({_e(kind) for kind, _ in keys})),
    )


def _owners_read(asked: psycopg.Cursor[Any] | None, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The owners `_ask_owners` asked for: their patients' identifiers (JSON) by key."""
    if asked is None:
        return {}
    wanted = set(keys)
    return {(k, v): text for kind, key, text in asked.fetchall() if (k := _d(kind), v := _d(key)) in wanted}


def _owner_rows(payloads: list[Any]) -> list[tuple[str, str, str, str]]:
    """(kind, key, patient, source) of the owners of the keys the payloads name."""
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
        rows += [(_e(kind), _e(key), text, source) for kind, key in keys_of(payload)]
    return rows


def _lock_keys(names: Iterable[str]) -> list[int]:
    """The advisory lock keys of these names, in the one order every node takes them."""
    return sorted({_lock_id(name) for name in names})


def _raise_mismatch(
    found: tuple[str, str, list[Identifier], list[Identifier]] | None, what: str, location: str, remedy: str = ""
) -> None:
    """Refuse (`MappingFailure`) what names a key of another patient (``found``: `mismatch`'s answer)."""
    if found is not None:
        kind, key, theirs, mine = found
        raise MappingFailure(
            f"patient mismatch: {KEY_NAMES[kind]} {key} belongs to patient {describe(theirs)}, this {what} "
            f"names patient {describe(mine)}; "
            + (remedy or "not linked (correct the patient or the order identifiers)"),
            location,
            code="205",
        )


class _Recording:
    """One `record` waiting for its group commit: the rows it writes (stored form), its outcome."""

    __slots__ = ("done", "error", "held", "lead", "locks", "marks", "owners", "pairs")

    def __init__(
        self,
        locks: list[str],
        pairs: list[tuple[str, ...]],
        owners: list[tuple[str, str, str, str]],
        marks: list[tuple[str, int]],
        held: list[tuple[str, str, str]],
    ) -> None:
        self.locks, self.pairs, self.owners, self.marks, self.held = locks, pairs, owners, marks, held
        self.done = threading.Event()
        self.lead = False  # woken to write the next group commit
        self.error: Exception | None = None


def _record_args(batch: list[_Recording], node: str) -> tuple[Any, ...]:
    """The arguments of ``patients_record`` for these records (one transaction)."""

    def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
        return [list(c) for c in zip(*rows, strict=True)] or [[] for _ in range(width)]

    return (
        LOCK_CLASS,
        _lock_keys(name for r in batch for name in r.locks),
        *columns([p for r in batch for p in r.pairs], 5),
        node,
        _now(),
        *columns([o for r in batch for o in r.owners], 4),
        *columns([m for r in batch for m in r.marks], 2),
        *columns([h for r in batch for h in r.held], 3),
    )


class _Session:
    """One call's connection (from the registry's pool) and the survivors it looked up."""

    __slots__ = ("db", "survivors")

    def __init__(self, db: psycopg.Connection) -> None:
        self.db = db
        self.survivors: dict[tuple[str, str, str], list[Identifier] | None] = {}


class PostgresPatientRegistry(IdentityRules):
    """The patient identity registry of every node on the database at ``url`` (`traboule.stores.PatientRegistry`).
    The schema is created or upgraded when it opens."""

    off_loop = True  # its calls wait for the server: the channels make them on a thread, not the event loop

    def __init__(self, url: str, *, connections: int = POOL_SIZE) -> None:
        self.url = url
        self._node = uuid.uuid4().hex[:16]  # what this registry reserves is its own
        self._size = max(1, connections)
        self._free = threading.Condition()  # guards the pool: ``_idle``, ``_open``, ``_closed``
        self._idle: list[psycopg.Connection] = []
        self._open = 1
        self._closed = False
        self._local = threading.local()  # the session of the call running on each thread
        db = self._connect()
        try:
            migrations.check(db, COMPONENT)
        except BaseException:
            db.close()
            raise
        self._idle.append(db)
        self._pruned = time.monotonic()
        self._queue_lock = threading.Lock()  # guards ``_queue`` and ``_writing`` (`_record_together`)
        self._queue: list[_Recording] = []
        self._writing = False

    def _connect(self) -> psycopg.Connection:
        try:
            return connect(self.url)
        except psycopg.OperationalError as exc:  # an OSError: the engine says "cannot start" with the reason
            raise ConnectionError(f"database {redact(self.url)}: {exc}".strip()) from exc

    def _acquire(self) -> psycopg.Connection:
        """A connection of the pool for one call: an idle one, a new one below the pool's size, or the next one
        given back."""
        with self._free:
            while True:
                if self._closed:
                    raise RuntimeError("the patient registry is closed")
                if self._idle:
                    db: psycopg.Connection | None = self._idle.pop()
                    break
                if self._open < self._size:
                    self._open += 1
                    db = None
                    break
                self._free.wait()
        if db is not None and not db.broken and not db.closed:
            return db
        if db is not None:  # the server restarted: a new session
            with contextlib.suppress(Exception):
                db.close()
        try:
            return self._connect()
        except BaseException:
            with self._free:
                self._open -= 1
                self._free.notify()
            raise

    def _give_back(self, db: psycopg.Connection) -> None:
        healthy = not db.broken and not db.closed and db.info.transaction_status == TransactionStatus.IDLE
        with self._free:
            if healthy and not self._closed:
                self._idle.append(db)
            else:
                self._open -= 1
                with contextlib.suppress(Exception):
                    db.close()
            self._free.notify()

    @contextmanager
    def _session(self) -> Iterator[_Session]:
        """The connection and the merges' memo of the call running on this thread (one per outermost call: the
        survivors looked up during a call are remembered until it returns, the next call reads the database
        again)."""
        session: _Session | None = getattr(self._local, "session", None)
        if session is not None:
            yield session
            return
        session = self._local.session = _Session(self._acquire())
        try:
            yield session
        finally:
            self._local.session = None
            self._give_back(session.db)

    def _memo(self) -> dict[tuple[str, str, str], list[Identifier] | None] | None:
        session: _Session | None = getattr(self._local, "session", None)
        return session.survivors if session is not None else None

    def _rows(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._session() as session:
            return session.db.execute(sql, params).fetchall()

    @contextmanager
    def _transaction(self, locks: Iterable[str] = (), *, durable: bool = True) -> Iterator[psycopg.Connection]:
        """One transaction holding the advisory locks of ``locks`` (taken in one order on every node, in one
        statement), in pipeline mode: its statements go out together, a round trip only where a result is read;
        the reads made meanwhile (`known`, `current`...) run in it, merges looked up once per IPP. ``durable``
        False: committed without waiting for the server's WAL flush (what a crash may lose)."""
        with self._session() as session:
            db = session.db
            with db.pipeline(), db.transaction():
                keys = _lock_keys(locks)
                if keys or not durable:  # a function scan yields its rows in order: the locks are taken in that order
                    db.execute(
                        "SELECT set_config('synchronous_commit', %s, true),"
                        " (SELECT count(pg_advisory_xact_lock(%s, k)) FROM unnest(%s::int4[]) AS k)",
                        ("on" if durable else "off", LOCK_CLASS, keys),
                    )
                yield db

    def close(self) -> None:
        """Close the connections (everything is written already; one in use closes when its call returns)."""
        with self._free:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._free.notify_all()
        for db in idle:
            with contextlib.suppress(Exception):
                db.close()

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
        returns the warnings to journal, one per INS it changes. A message whose pairs are all recorded or
        reserved as they are (or nowhere), not from an identity source: one statement (``patients_reserve``)."""
        payloads = list(payloads)
        pairs = pairs_of(payloads)
        if not pairs:
            return []
        if not any(_authoritative(p) for p in payloads):
            self._judge(pairs, set(), [], [])  # the message against itself
            self._prune_now_and_then()
            rows = [_pair_row(p) for p in pairs]
            columns = [list(c) for c in zip(*rows, strict=True)]
            args = (LOCK_CLASS, _lock_keys(_locks(payloads)), *columns, self._node, float(sqlite_registry.RESERVED))
            if self._call(_RESERVE_CALL, args):
                return []
        return self._check_all(payloads, pairs)

    def admit(self, payloads: Iterable[Any]) -> bool:
        """`resolve_merged`, `check`, `check_report` and `check_order` of the usual message in one statement
        (``patients_admit``): a message of orders (one at most, with its IPP and keys) and patient updates, from
        no identity source, naming no merged IPP, whose pairs are recorded or reserved as they are (or nowhere) and
        whose order keys are its patient's or nobody's: its pairs reserved and its keys held, True. False, having
        written nothing, for anything else: the caller makes the four calls (in that order), which decide."""
        payloads = list(payloads)
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        usual = all(
            isinstance(p, ImagingOrder)
            or (isinstance(p, PatientUpdate) and p.action != "merge" and not _authoritative(p))
            for p in payloads
        )
        if not usual or len(orders) > 1:
            return False
        keys: list[tuple[str, str]] = []
        holder = patient = ""
        if orders:
            if _ipp(orders[0].patient) is None or not (keys := keys_of(orders[0])):
                return False
            holder, patient = self._holder(orders[0]), _dump(_identity(orders[0].patient))
        pairs = pairs_of(payloads)
        try:
            self._judge(pairs, set(), [], [])  # the message against itself
        except MappingFailure:
            return False  # said by `check`, after `resolve_merged`
        ipps = sorted({_e(ipp.value) for p in payloads if (q := patient_of(p)) is not None and (ipp := _ipp(q))})
        if not ipps and not pairs and not keys:
            return True  # nothing the four calls would look at
        self._prune_now_and_then()
        rows = [_pair_row(p) for p in pairs]
        columns = [list(c) for c in zip(*rows, strict=True)] or [[] for _ in range(5)]
        args = (
            LOCK_CLASS,
            _lock_keys(_locks(payloads)),
            ipps,
            *columns,
            self._node,
            [_e(kind) for kind, _ in keys],
            [_e(key) for _, key in keys],
            holder,
            patient,
            float(sqlite_registry.RESERVED),
        )
        return self._call(_ADMIT_CALL, args)

    def _check_all(self, payloads: list[Any], pairs: list[Pair]) -> list[str]:
        """`check` with everything it may need read: the recorded and reserved pairs of its IPPs and INS."""
        ruling = set(pairs_of(p for p in payloads if _authoritative(p)))
        with self._transaction(_locks(payloads), durable=False) as db:  # a reservation lost in a crash: its
            self._prune(db)  # message was not answered either
            given = {(p.ins_oid, p.ins) for p in pairs}
            by = ([_e(p.ipp) for p in pairs], [_e(o) for o, _ in given], [_e(i) for _, i in given])  # the indexes
            asked = db.execute(  # both reads in one round trip (pipeline)
                f"SELECT {_PAIR} FROM patients_reserved WHERE (ipp = ANY(%s) OR (ins_oid = ANY(%s) AND ins = ANY(%s)))"
                " AND expires > now()",
                by,
            )
            ins_rows = db.execute(
                f"SELECT {_PAIR} FROM patients_ins WHERE ipp = ANY(%s) OR (ins_oid = ANY(%s) AND ins = ANY(%s))", by
            )
            reserved = list(map(_pair, asked.fetchall()))
            recorded = list(map(_pair, ins_rows.fetchall()))
            notes = self._judge(pairs, ruling, reserved, recorded)
            with db.cursor() as cur:
                cur.executemany(_RESERVE, [(*_pair_row(p), self._node, float(sqlite_registry.RESERVED)) for p in pairs])
        return notes

    def _judge(self, pairs: list[Pair], ruling: set[Pair], reserved: list[Pair], recorded: list[Pair]) -> list[str]:
        """`check`'s verdict on a message's ``pairs`` (``ruling``: an identity source's) against the pairs
        ``reserved`` for messages in flight and ``recorded`` for their IPPs and INS: refused (`MappingFailure`), or
        the warnings of the INS it changes."""
        given = {(p.ins_oid, p.ins) for p in pairs}
        ipps = {p.ipp for p in pairs}
        held = [p for p in reserved if p.ipp in ipps]
        elsewhere = [p for p in reserved if (p.ins_oid, p.ins) in given]  # other IPPs in flight
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
        return notes

    def _call(self, sql: str, args: tuple[Any, ...]) -> bool:
        """One statement (a function of the schema: its own transaction), its boolean answer."""
        with self._session() as session:
            row = session.db.execute(sql, args).fetchone()
        return bool(row and row[0])

    def _prune_now_and_then(self) -> None:
        if time.monotonic() - self._pruned > sqlite_registry.RESERVED:
            with self._session() as session:
                self._prune(session.db)

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
        memo, key = self._memo(), (ipp.value, ipp.issuer, ipp.issuer_oid)
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

    def resolve_merged(self, payloads: Iterable[Any]) -> list[str]:
        """`IdentityRules.resolve_merged`, the merges of the payloads' IPPs read in one statement."""
        payloads = list(payloads)
        with self._session() as session:
            ipps = [ipp for p in payloads if (patient := patient_of(p)) is not None and (ipp := _ipp(patient))]
            self._no_merges(self._ask_merges(session.db, ipps), ipps)
            return super().resolve_merged(payloads)

    @staticmethod
    def _ask_merges(db: psycopg.Connection, ipps: list[Identifier]) -> psycopg.Cursor[Any] | None:
        """Ask for the merges naming these IPP values (read by `_no_merges`; in a pipeline, no round trip yet)."""
        values = sorted({_e(i.value) for i in ipps})
        if not values:
            return None
        return db.execute("SELECT ipp, ipp_namespace, ipp_oid FROM patients_merges WHERE ipp = ANY(%s)", (values,))

    def _no_merges(self, asked: psycopg.Cursor[Any] | None, ipps: list[Identifier]) -> None:
        """The IPPs no merge names have no survivor: remembered for the call (`survivor` looks up the others)."""
        memo = self._memo()
        if asked is None or memo is None:
            return
        merged = [Identifier(*map(_d, row)) for row in asked.fetchall()]
        for ipp in ipps:
            if not any(same_ipp(m, ipp) for m in merged):
                memo[(ipp.value, ipp.issuer, ipp.issuer_oid)] = None

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
        with self._session() as session:
            return _owners_read(_ask_owners(session.db, keys), keys)

    def same_patient(self, a: Patient, b: Patient) -> bool:
        """Whether two canonical patients are one, merges followed: a merged IPP is its survivor."""
        ids_a, ids_b = _local(a) + _ins(a), _local(b) + _ins(b)
        with self._session():
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
        """`mismatch` with the owners of the payload's keys read already."""
        keys = keys_of(payload)
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
        with self._session():
            found = next((f for f in map(self.mismatch, payloads) if f is not None), None)
        _raise_mismatch(found, what, location, remedy)

    def _holder(self, order: Any) -> str:
        return f"{self._node}:{id(order)}"

    def check_order(self, payloads: Iterable[Any]) -> None:
        """Refuse (`MappingFailure`, PID-3) an order whose keys belong to another patient, recorded or named by an
        order in flight on any node; otherwise its keys are held for its patient until `record` (or `release`).
        Two round trips: the locks, the owners, merges and holds of its keys and IPP asked at once, then the holds
        written and committed."""
        remedy = (
            "not applied (a patient change of an order comes through the patient identity system: merge the "
            "patients there)"
        )
        orders = [p for p in payloads if isinstance(p, ImagingOrder)]
        if not orders:
            return
        if len(orders) == 1 and (ipp := _ipp(orders[0].patient)) is not None and (keys := keys_of(orders[0])):
            # keys no other patient names, its IPP merged nowhere: one statement (``patients_hold``)
            self._prune_now_and_then()
            args = (
                LOCK_CLASS,
                _lock_keys(_locks(orders)),
                [_e(kind) for kind, _ in keys],
                [_e(key) for _, key in keys],
                self._holder(orders[0]),
                _dump(_identity(orders[0].patient)),
                _e(ipp.value),
                float(sqlite_registry.RESERVED),
            )
            if self._call(_HOLD_CALL, args):
                return
        self._check_order_all(orders, remedy)

    def _check_order_all(self, orders: list[ImagingOrder], remedy: str) -> None:
        """`check_order` with everything it may need read: owners and holds of the keys, merges of the IPPs."""
        keys = list(dict.fromkeys(k for order in orders for k in keys_of(order)))
        ipps = [ipp for order in orders if (ipp := _ipp(order.patient)) is not None]
        with self._transaction(_locks(orders), durable=False) as db:  # a hold lost in a crash: its message too
            self._prune(db)
            asked_owners = _ask_owners(db, keys)
            asked_merges = self._ask_merges(db, ipps)
            asked_holds = (
                db.execute(
                    "SELECT kind, key, holder, patient FROM patients_keys_held WHERE kind = ANY(%s) AND key = ANY(%s)"
                    " AND expires > now()",
                    (sorted({_e(kind) for kind, _ in keys}), [_e(k) for _, k in keys]),
                )
                if keys
                else None
            )
            owners = _owners_read(asked_owners, keys)
            self._no_merges(asked_merges, ipps)
            held = [(_d(kind), _d(key), holder, text) for kind, key, holder, text in asked_holds or ()]
            found = None
            for order in orders:
                ids = _identity(order.patient)
                if ids and (found := self._mismatch(order, ids, owners)) is not None:
                    break
            _raise_mismatch(found, "order", "PID-3", remedy)
            holds = []
            for order in orders:
                ids = _identity(order.patient)
                mine_keys = keys_of(order)
                if not ids or not mine_keys:
                    continue
                mine = self.current(ids)
                for kind, key, holder, text in held:
                    if (kind, key) not in mine_keys or holder == self._holder(order):
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
                holds += [(_e(kind), _e(key), self._holder(order), text, reserved) for kind, key in mine_keys]
            if holds:
                with db.cursor() as cur:
                    cur.executemany(_HOLD, holds)

    def _held_rows(self, payloads: list[Any]) -> list[tuple[str, str, str]]:
        """(holder, kind, key) of what `check_order` held on this node for these orders."""
        return [
            (self._holder(p), _e(kind), _e(key))
            for p in payloads
            if isinstance(p, ImagingOrder)
            for kind, key in keys_of(p)
        ]

    def _release_keys(self, db: psycopg.Connection, payloads: list[Any]) -> None:
        """The keys `check_order` held on this node for these orders: recorded (or refused), they hold nothing."""
        rows = self._held_rows(payloads)
        if rows:
            with db.cursor() as cur:
                cur.executemany("DELETE FROM patients_keys_held WHERE holder = %s AND kind = %s AND key = %s", rows)

    # -- recording ----------------------------------------------------------------------------------------------

    def record(self, payloads: Iterable[Any], *, channel: str = "", journal_id: int = 0) -> None:
        """Remember what a journaled (accepted) message says, in one transaction: its IPP-INS pairs (an identity
        source's replacing the recorded ones), the owners of the order keys it names (an order's replaces what a
        report, step or study recorded; those only fill a key no one gave), the channel's `mark`, its merges; the
        message's reservations end with it. Without an identity source's update or a merge (nearly every message):
        one statement (``patients_record``), shared by the records of the other threads arriving meanwhile (a group
        commit: they return together once it committed), durable when it adds a pair."""
        payloads = list(payloads)
        mark = (channel, journal_id) if channel and journal_id else None
        if not any(_authoritative(p) or (isinstance(p, PatientUpdate) and p.action == "merge") for p in payloads):
            self._record_together(
                _Recording(
                    _locks(payloads),
                    list(map(_pair_row, pairs_of(payloads))),
                    _owner_rows(payloads),
                    [(_e(mark[0]), mark[1])] if mark else [],
                    self._held_rows(payloads),
                )
            )
            return
        with self._transaction(_locks(payloads)) as db:
            durable = self._record_pairs(db, payloads)
            self._record_owners(db, payloads, mark)
            self._release_keys(db, payloads)  # their owners are seen now
            durable = self._record_merges(db, payloads) or durable
            if not durable:  # owners only: see the module docstring
                db.execute("SET LOCAL synchronous_commit = off")

    def _record_together(self, mine: _Recording) -> None:
        """Write ``mine`` with the records queued meanwhile, in one statement: the first thread to find no commit in
        flight writes what is queued, the others wait for it; then it hands the queue to the next one waiting."""
        with self._queue_lock:
            self._queue.append(mine)
            lead = not self._writing
            self._writing = True
        if not lead:
            mine.done.wait()
            if not mine.lead:
                if mine.error is not None:
                    raise mine.error
                return
        with self._queue_lock:  # leading: what queued up to now, its own record among them
            batch, self._queue = self._queue, []
        try:
            self._write_records(batch)
        except BaseException:  # interrupted: the others were not written either
            for recording in batch:
                recording.error = recording.error or RuntimeError("the record was interrupted")
            raise
        finally:
            with self._queue_lock:
                if self._queue:
                    self._queue[0].lead = True  # the next commit is the first waiter's
                    self._queue[0].done.set()
                else:
                    self._writing = False
            for recording in batch:
                if recording is not mine:
                    recording.done.set()
        if mine.error is not None:
            raise mine.error

    def _write_records(self, batch: list[_Recording]) -> None:
        """One statement for them all; when it fails with more than one, each alone (only its own caller gets the
        error)."""
        try:
            self._call(_RECORD_CALL, _record_args(batch, self._node))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                return
            for recording in batch:
                try:
                    self._call(_RECORD_CALL, _record_args([recording], self._node))
                except Exception as one:
                    recording.error = one

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
        if (pairs or replaced) and (memo := self._memo()):
            memo.clear()  # a survivor's INS may have changed
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
        rows = [(*row, recorded) for row in _owner_rows(payloads)]
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
        if merges and (memo := self._memo()):
            memo.clear()
        return bool(merges)
