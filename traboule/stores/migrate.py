"""Move an embedded site (the SQLite files of a data folder) into a PostgreSQL database: ``traboule db migrate``.

One `Step` per table: it counts its source rows, counts its destination rows and copies one batch of rows after a
key. `migrate` runs every step of `STEPS` in order:

* the destination schemas are created or upgraded first (`traboule.stores.postgres.migrations.upgrade`); the
  source files are opened ``Durability.READ_ONLY`` and never written;
* rows are copied table to table, with explicit column lists, in key order (the SQLite ``rowid`` or the primary
  key), ``batch_size`` rows per PostgreSQL transaction (``executemany``). Each transaction also records, in the
  table ``traboule_migration``, the last key it copied: a run stopped anywhere (a crash, Ctrl-C, the server gone)
  loses at most its open transaction, and the same command again starts after the last committed key, so nothing
  is copied twice. A table that holds rows the migration did not write, or an id it is to copy, is refused
  (migrate into a new database). Each step's progress row keeps a digest of the source rows copied (`_chain`): a
  later run reads them again and refuses a source changed since. A run holds a session advisory lock
  (`LOCK_KEY`: one run at a time) and a progress row of its own (`RUN_STEP`), done once every step is: the
  PostgreSQL stores' start-up check refuses a database with a row not done;
* ids are kept: journal entries and outbox events keep their ids (the patient registry's marks name journal ids,
  readers page by id), worklist items and FHIR resources their insertion order (what a C-FIND and a search return
  first); each identity sequence then continues after the highest id copied;
* text goes through the same escapes as the PostgreSQL stores write (``encode_text`` for the journal and the FHIR
  store, the registry's own), and what those stores derive on write is derived the same way (a FHIR resource's
  search tokens, a worklist index value holding a NUL stored as NULL and its row inexact);
* at the end every step's source and destination counts are compared (`Report.mismatches`).

Rows are copied rather than replayed through the store APIs: an API writes the present (a new ``meta.versionId``
and ``lastUpdated`` per FHIR upsert, new ids, new ``recorded`` times), and a copy keeps what the site holds.

The embedded bus is not in the database: its queued deliveries stay in ``bus.sqlite`` (`pending_deliveries` says
how many: the command refuses while there are any, unless told to leave them), for a node that keeps the embedded
bus. The delivery log (``deliveries.sqlite``, an operator's log) is not moved: the database's starts empty. Every
other SQLite file of the folder no step reads is in `Report.unread` (the command fails on it).

A store that gets a PostgreSQL implementation adds its steps: `register` for a store kept in one file of the
folder, `register_per_channel` for one each channel keeps in a file of its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from traboule.errors import CommandError
from traboule.stores.journal import COLUMNS as JOURNAL_COLUMNS
from traboule.stores.sqlite import Durability, open_database

if TYPE_CHECKING:
    import psycopg

BATCH_SIZE = 2_000  # rows per destination transaction
PROGRESS_TABLE = "traboule_migration"
_PROGRESS_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (
    step TEXT PRIMARY KEY,
    source TEXT NOT NULL,          -- the SQLite file it is copied from
    after TEXT,                    -- the key of the last source row copied (NULL: none yet)
    copied BIGINT NOT NULL,        -- rows copied so far
    done BOOLEAN NOT NULL DEFAULT false
);
ALTER TABLE {PROGRESS_TABLE} ADD COLUMN IF NOT EXISTS fingerprint TEXT  -- digest of the source rows copied
"""
RUN_STEP = "*"  # the progress row of the whole run: done once every step is (a node refuses to start before)
LOCK_KEY = 0x6D69_6772_6174  # "migrat": the session advisory lock a run holds (one run at a time per database)
# Files of a data folder that are not a channel's worklist or FHIR store.
_NAMED = {"journal.sqlite", "patients.sqlite", "bus.sqlite", "deliveries.sqlite"}
DELIVERY_LOG = "deliveries.sqlite"  # an operator's log (`traboule.stores.delivery_log`): not moved, not reported


# The migration cannot go on (a destination holding other data, a source the database cannot hold): an operator
# command's error (`traboule.errors.CommandError`), under this module's name.
MigrationError = CommandError


Key = int | str | None


class Step(Protocol):
    """One table (or one group of tables copied together) of one store."""

    name: str  # e.g. "journal.messages": what progress and the count check print
    store: str  # its source: "journal", "patients", "worklist", "fhir", or "file:<name>" (`Sources.path`)

    def count_source(self, db: sqlite3.Connection) -> int: ...

    def count_destination(self, conn: psycopg.Connection) -> int: ...

    def copy_batch(self, db: sqlite3.Connection, conn: psycopg.Connection, after: Key, limit: int) -> tuple[int, Key]:
        """Copy up to ``limit`` source rows whose key follows ``after`` (None: from the first), inside the caller's
        transaction on ``conn``; returns how many rows were read and the key of the last one."""
        ...

    def finish(self, conn: psycopg.Connection) -> None:
        """Once every row is copied (in a transaction): e.g. move an identity sequence past the copied ids."""
        ...


Convert = Callable[[tuple[Any, ...]], tuple[Any, ...]]
Derive = Callable[["psycopg.Connection", list[tuple[Any, ...]]], None]


@dataclass
class TableCopy:
    """A SQLite table copied into a PostgreSQL table, row for row, in the order of ``key`` (``rowid`` or the text
    primary key of a ``WITHOUT ROWID`` table).

    ``columns``: the source columns after the key; ``target``: the destination columns (with ``keep_key``, the
    first is the source key, e.g. an identity column given the SQLite id: ``OVERRIDING SYSTEM VALUE``);
    ``convert`` turns a source row (key first) into the destination values; ``derive`` writes what the
    destination store derives from the rows (in the same transaction); ``identity``: the identity column whose
    sequence continues after the copied ids."""

    name: str
    store: str
    source_table: str
    key: str
    columns: Sequence[str]
    target_table: str
    target: Sequence[str]
    convert: Convert
    keep_key: bool = False
    identity: str = ""
    casts: dict[str, str] = field(default_factory=dict)  # destination column -> SQL type of its parameter
    on_conflict: bool = True  # ON CONFLICT DO NOTHING (False when derived rows must not follow a skipped one)
    derive: Derive | None = None
    scope: tuple[str, Any] | None = None  # (column, value): the destination rows that are this step's (a channel's)
    then: Callable[[psycopg.Connection], None] | None = None  # more to do once every row is copied
    chain: str = field(default="", init=False)  # the `_chain` of the source rows copied so far

    def rows_upto(self, db: sqlite3.Connection, last: Key) -> Iterator[tuple[Any, ...]]:
        """The source rows up to the key ``last`` (included), in key order, as `copy_batch` reads them."""
        if last is None or not _has_table(db, self.source_table):
            return iter(())
        return iter(
            db.execute(
                f"SELECT {self.key}, {', '.join(self.columns)} FROM {self.source_table} WHERE {self.key} <= ?"
                f" ORDER BY {self.key}",
                (last,),
            )
        )

    def count_source(self, db: sqlite3.Connection) -> int:
        if not _has_table(db, self.source_table):
            return 0
        return int(db.execute(f"SELECT count(*) FROM {self.source_table}").fetchone()[0])

    def count_destination(self, conn: psycopg.Connection) -> int:
        sql, args = f"SELECT count(*) FROM {self.target_table}", ()
        if self.scope is not None:
            sql, args = f"{sql} WHERE {self.scope[0]} = %s", (self.scope[1],)
        row = conn.execute(sql, args).fetchone()
        return int(row[0]) if row else 0

    def copy_batch(self, db: sqlite3.Connection, conn: psycopg.Connection, after: Key, limit: int) -> tuple[int, Key]:
        if not _has_table(db, self.source_table):
            return 0, after
        where, args = ("", ()) if after is None else (f" WHERE {self.key} > ?", (after,))
        rows = db.execute(
            f"SELECT {self.key}, {', '.join(self.columns)} FROM {self.source_table}{where} ORDER BY {self.key} LIMIT ?",
            (*args, limit),
        ).fetchall()
        if not rows:
            return 0, after
        self.chain = _chain(self.chain, rows)
        values = [self.convert(tuple(row)) for row in rows]
        marks = ", ".join(f"%s::{self.casts[c]}" if c in self.casts else "%s" for c in self.target)
        sql = (
            f"INSERT INTO {self.target_table} ({', '.join(self.target)})"
            + (" OVERRIDING SYSTEM VALUE" if self.keep_key else "")
            + f" VALUES ({marks})"
            + (" ON CONFLICT DO NOTHING" if self.on_conflict else "")
        )
        with conn.cursor() as cur:
            cur.executemany(sql, values)
            if self.keep_key and self.on_conflict and cur.rowcount != len(values):
                # an id of the source taken already: rows the migration did not write (a node ran on the database)
                raise MigrationError(
                    f"{self.name}: the database holds rows with ids this migration was to copy, which it did not"
                    " write: migrate into a new database (and start no engine on it before the migration ends)"
                )
        if self.derive is not None:
            self.derive(conn, values)
        return len(rows), rows[-1][0]

    def finish(self, conn: psycopg.Connection) -> None:
        if self.identity:
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence(%s, %s), COALESCE(max({self.identity}), 1),"
                f" max({self.identity}) IS NOT NULL) FROM {self.target_table}",
                (self.target_table, self.identity),
            )
        if self.then is not None:
            self.then(conn)


def _chain(chain: str, rows: Iterator[Any] | Sequence[Any]) -> str:
    """``chain`` followed by ``rows``: a digest of every source row copied, in order, whatever the batches."""
    for row in rows:
        chain = hashlib.sha256((chain + repr(tuple(row))).encode()).hexdigest()
    return chain


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


# -- the stores ------------------------------------------------------------------------------------------------


def _text(value: Any) -> Any:
    """A text value as the PostgreSQL journal and FHIR store write it (NUL and \\x01 escaped)."""
    from traboule.stores.postgres import encode_text

    return encode_text(value) if isinstance(value, str) else value


def _blob(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _registry_text(value: Any) -> Any:
    """A text value as the PostgreSQL patient registry writes it (backslash and NUL escaped)."""
    from traboule.stores.postgres.patient_identity import _e

    return _e(value) if isinstance(value, str) else value


def _no_nul(step: str, value: Any) -> Any:
    """A key PostgreSQL text must hold as it is (no escape on that column): a NUL in it stops the migration."""
    if isinstance(value, str) and "\x00" in value:
        raise MigrationError(f"{step}: a key holds a NUL character, which the PostgreSQL store cannot keep")
    return value


def _journal_message(row: tuple[Any, ...]) -> tuple[Any, ...]:
    *texts, raw = row[1:]
    return (row[0], *(_text(v) for v in texts), _blob(raw))


def _outbox_event(row: tuple[Any, ...]) -> tuple[Any, ...]:
    event_id, message_id, topic, event, body = row
    return (event_id, message_id, _no_nul("journal.outbox", topic), _no_nul("journal.outbox", event), _blob(body))


def _worklist_item(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """An item as `traboule.stores.postgres.worklist` stores it: an index value with a NUL becomes NULL (status
    ``''``) and the row inexact, so that the matcher decides on it."""
    rowid, key, *values, exact, updated, dataset = row
    _no_nul("worklist.items", key)
    exact = bool(exact)
    for i, value in enumerate(values):
        if isinstance(value, str) and "\x00" in value:
            values[i] = "" if i == 0 else None
            exact = False
    return (rowid, key, *values, exact, updated, _blob(dataset))


def _fhir_resource(row: tuple[Any, ...]) -> tuple[Any, ...]:
    rowid, rtype, rid, version, updated, seq, text = row
    return (rowid, _text(rtype), _text(rid), version, updated, seq or 0, text)


def _fhir_tokens(conn: psycopg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """The search tokens of the copied resources, as `PostgresFHIRStore` indexes a resource it stores."""
    from traboule.stores.postgres.fhir_store import _TOKEN_INSERT, _token_rows

    tokens = [token for row in rows for token in _token_rows(json.loads(row[-1]))]
    if tokens:
        with conn.cursor() as cur:
            cur.executemany(_TOKEN_INSERT, tokens)


def _escaped(count: int, convert: Callable[[Any], Any] = _registry_text) -> Convert:
    """A row whose first ``count`` columns after the key are escaped by ``convert``, the key dropped."""
    return lambda row: (*(convert(v) for v in row[1 : 1 + count]), *row[1 + count :])


_ITEM_COLUMNS = (
    "key",
    "status",
    "patient_id",
    "issuer_of_patient_id",
    "patient_name",
    "patient_name_upper",
    "accession_number",
    "requested_procedure_id",
    "study_uid",
    "modality",
    "station_aet",
    "start_date",
    "start_time",
    "exact",
    "updated",
    "dataset",
)

STEPS: list[Step] = [
    TableCopy(
        "journal.messages", "journal", "messages", "id", JOURNAL_COLUMNS,
        "journal_messages", ("id", *JOURNAL_COLUMNS), _journal_message, keep_key=True, identity="id",
    ),
    TableCopy(
        "journal.outbox", "journal", "outbox", "id", ("message_id", "topic", "event_id", "body"),
        "journal_outbox", ("id", "message_id", "topic", "event_id", "body"), _outbox_event,
        keep_key=True, identity="id",
    ),
    TableCopy(
        "worklist.items", "worklist", "items", "rowid", _ITEM_COLUMNS,
        "worklist_items", ("id", *_ITEM_COLUMNS), _worklist_item, keep_key=True, identity="id",
        casts={"updated": "timestamptz"},
    ),
    TableCopy(
        "worklist.applied", "worklist", "applied", "idempotency_key", ("applied_at",),
        "worklist_applied", ("idempotency_key", "applied_at"),
        lambda row: (_no_nul("worklist.applied", row[0]), row[1]), casts={"applied_at": "timestamptz"},
    ),
    TableCopy(
        "worklist.order_seq", "worklist", "order_seq", "order_key", ("seq",),
        "worklist_order_seq", ("order_key", "seq"), lambda row: (_no_nul("worklist.order_seq", row[0]), row[1]),
    ),
    TableCopy(
        "fhir.resources", "fhir", "resources", "rowid", ("type", "id", "version_id", "last_updated", "seq", "json"),
        "fhir_resources", ("row_id", "type", "id", "version_id", "last_updated", "seq", "json"), _fhir_resource,
        keep_key=True, identity="row_id", on_conflict=False, derive=_fhir_tokens,
    ),
    TableCopy(
        "fhir.remote", "fhir", "remote", "rowid", ("type", "id", "version_id", "location", "pushed_at"),
        "fhir_remote", ("type", "id", "version_id", "location", "pushed_at"),
        lambda row: (_text(row[1]), _text(row[2]), row[3], _text(row[4]), row[5]),
    ),
    TableCopy(
        "patients.ins", "patients", "ins", "rowid", ("ipp", "ipp_oid", "ipp_namespace", "ins_oid", "ins", "recorded"),
        "patients_ins", ("ipp", "ipp_oid", "ipp_namespace", "ins_oid", "ins", "recorded"), _escaped(5),
    ),
    TableCopy(
        "patients.owners", "patients", "owners", "rowid", ("kind", "key", "patient", "source", "recorded"),
        "patients_owners", ("kind", "key", "patient", "source", "recorded"), _escaped(2),
    ),
    TableCopy(
        "patients.merges", "patients", "merges", "rowid", ("ipp", "ipp_oid", "ipp_namespace", "survivor", "recorded"),
        "patients_merges", ("ipp", "ipp_oid", "ipp_namespace", "survivor", "recorded"), _escaped(3),
    ),
    TableCopy(
        "patients.marks", "patients", "marks", "rowid", ("channel", "journal_id"),
        "patients_marks", ("channel", "journal_id"), _escaped(1),
    ),
    TableCopy(
        "patients.actions", "patients", "actions", "rowid", ("at", "action", "ipp", "detail"),
        "patients_actions", ("id", "at", "action", "ipp", "detail"),
        lambda row: (row[0], row[1], row[2], _registry_text(row[3]), _registry_text(row[4])),
        keep_key=True, identity="id",
    ),
]  # fmt: skip


def register(step: Step) -> None:
    """Add the step of a store kept in one file of the folder (``store``: ``journal``, ``patients``, ``worklist``,
    ``fhir``: see `Sources`)."""
    if any(s.name == step.name for s in STEPS):
        raise ValueError(f"a migration step {step.name!r} is registered already")
    STEPS.append(step)


ChannelSteps = Callable[[str, Path], list[Step]]  # (channel name, its file) → the steps copying it


@dataclass(frozen=True)
class PerChannel:
    """The steps of a store each channel keeps in a file of its own: every ``<channel><suffix>`` file of the folder
    holding ``tables`` is copied by the steps ``make(channel, path)`` gives (their ``store`` is ``file:<name>``,
    their names must hold the channel's, e.g. ``mpps.instances[mpps]``)."""

    suffix: str
    tables: frozenset[str]
    make: ChannelSteps
    match: Callable[[set[str]], bool] | None = None  # instead of ``tables``: whether a file's tables are this store's

    def matches(self, tables: set[str]) -> bool:
        return self.match(tables) if self.match is not None else self.tables <= tables


PER_CHANNEL: list[PerChannel] = []


def register_per_channel(suffix: str, tables: set[str], make: ChannelSteps) -> None:
    """Add the steps of a per-channel store (`PerChannel`), e.g. ``register_per_channel(".sqlite", {"mpps"},
    lambda channel, path: [TableCopy(f"mpps.instances[{channel}]", f"file:{path.name}", ...)])``."""
    PER_CHANNEL.append(PerChannel(suffix, frozenset(tables), make))


def _mpps_steps(channel: str, path: Path) -> list[Step]:
    """An ``mpps`` channel's instances (`traboule.stores.mpps_state` → ``mpps_instances``)."""
    ch = _text(channel)
    return [
        TableCopy(
            f"mpps.instances[{channel}]", f"file:{path.name}", "mpps", "rowid", ("uid", "status", "dataset", "updated"),
            "mpps_instances", ("channel", "uid", "status", "dataset", "updated"),
            lambda row: (ch, _text(row[1]), _text(row[2]), _blob(row[3]), row[4]),
            casts={"updated": "timestamptz"}, scope=("channel", ch),
        )
    ]  # fmt: skip


@dataclass
class MarksCopy:
    """An HL7 sender channel's marks into ``applied_keys`` (the channel as consumer): the rows of ``applied`` and,
    from a file an earlier version wrote, those of its ``sent`` table (``legacy``: its key, time and detail
    columns) whose key ``applied`` does not hold, as `traboule.stores.idempotency.AppliedKeys` moves them on open.
    Either table may be absent; keys in text order."""

    name: str
    store: str
    channel: str
    applied: tuple[str, str] | None  # (time column, detail column or "''"), None: no ``applied`` table
    legacy: tuple[str, str, str] | None  # (key, time, detail) column expressions of ``sent``; None: no such table
    chain: str = field(default="", init=False)

    def rows_upto(self, db: sqlite3.Connection, last: Key) -> Iterator[tuple[Any, ...]]:
        if last is None:
            return iter(())
        return iter(db.execute(f"SELECT k, at, detail FROM ({self._union()}) WHERE k <= ? ORDER BY k", (last,)))

    def _union(self) -> str:
        parts = []
        if self.applied is not None:
            parts.append(
                f"SELECT idempotency_key AS k, {self.applied[0]} AS at, {self.applied[1]} AS detail FROM applied"
            )
        if self.legacy is not None:
            key, at, detail = self.legacy
            skip = f" AND {key} NOT IN (SELECT idempotency_key FROM applied)" if self.applied else ""
            parts.append(
                f"SELECT {key} AS k, min({at}) AS at, min({detail}) AS detail FROM sent"
                f" WHERE {key} IS NOT NULL AND {key} != ''{skip} GROUP BY {key}"
            )
        return " UNION ALL ".join(parts) or "SELECT NULL AS k, NULL AS at, NULL AS detail WHERE 0"

    def count_source(self, db: sqlite3.Connection) -> int:
        return int(db.execute(f"SELECT count(*) FROM ({self._union()})").fetchone()[0])

    def count_destination(self, conn: psycopg.Connection) -> int:
        row = conn.execute("SELECT count(*) FROM applied_keys WHERE consumer = %s", (self.channel,)).fetchone()
        return int(row[0]) if row else 0

    def copy_batch(self, db: sqlite3.Connection, conn: psycopg.Connection, after: Key, limit: int) -> tuple[int, Key]:
        where, args = ("", ()) if after is None else (" WHERE k > ?", (after,))
        rows = db.execute(
            f"SELECT k, at, detail FROM ({self._union()}){where} ORDER BY k LIMIT ?", (*args, limit)
        ).fetchall()
        if not rows:
            return 0, after
        self.chain = _chain(self.chain, rows)
        values = [
            (self.channel, _no_nul(self.name, k), str(at or ""), str(detail or "").replace("\x00", "\ufffd"))
            for k, at, detail in rows
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO applied_keys (consumer, idempotency_key, applied_at, detail)"
                " VALUES (%s, %s, COALESCE(NULLIF(%s::text, '')::timestamptz, now()), %s) ON CONFLICT DO NOTHING",
                values,
            )
        return len(rows), rows[-1][0]

    def finish(self, conn: psycopg.Connection) -> None:
        pass


def _columns(path: Path, table: str) -> set[str]:
    with closing(open_database(path, Durability.READ_ONLY)) as db:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def _marks_step(channel: str, path: Path) -> MarksCopy:
    """The marks step of a sender file: its ``applied`` table, its ``sent`` table (an earlier version's: hl7-status
    keyed ``idempotency_key``, hl7-documents ``event_id``, each with ``sent_at`` and ``control_id``), or both."""
    tables = _tables(path)
    applied = None
    if "applied" in tables:
        applied = ("applied_at", "detail" if "detail" in _columns(path, "applied") else "''")
    legacy = None
    if "sent" in tables:
        cols = _columns(path, "sent")
        key = next((c for c in ("idempotency_key", "event_id") if c in cols), None)
        if key is None:
            raise MigrationError(f"{path}: its table sent has neither idempotency_key nor event_id")
        legacy = (
            key,
            "coalesce(sent_at, '')" if "sent_at" in cols else "''",
            "coalesce(control_id, '')" if "control_id" in cols else "''",
        )
    return MarksCopy(f"hl7_sender.marks[{channel}]", f"file:{path.name}", channel, applied, legacy)


def _sender_steps(channel: str, path: Path) -> list[Step]:
    """An HL7 sender channel's marks, known orders and pending documents (`traboule.stores.sender_state` →
    ``applied_keys`` with the channel as consumer, ``hl7_known_orders``, ``hl7_pending_documents``). A file of an
    earlier version lacks some tables (hl7-status: ``applied`` and ``orders``; hl7-documents: ``applied`` and
    ``pending``; the oldest: ``sent`` alone): a missing table copies no row."""
    ch, source = _text(channel), f"file:{path.name}"
    return [
        _marks_step(channel, path),
        TableCopy(
            f"hl7_sender.orders[{channel}]", source, "orders", "rowid",
            ("accession", "placer", "filler", "patient_id", "study_uid"),
            "hl7_known_orders", ("channel", "accession", "placer", "filler", "patient_id", "study_uid"),
            lambda row: (ch, *(_text(v) for v in row[1:])), scope=("channel", ch),
        ),
        TableCopy(
            f"hl7_sender.pending[{channel}]", source, "pending", "rowid", ("document_id",),
            "hl7_pending_documents", ("channel", "document_id"), lambda row: (ch, _text(row[1])), scope=("channel", ch),
        ),
    ]  # fmt: skip


def _xds_steps(channel: str, path: Path) -> list[Step]:
    """An ``xds`` channel's submissions (`traboule.stores.submissions` → ``xds_submissions``)."""
    ch = _text(channel)
    return [
        TableCopy(
            f"xds.submissions[{channel}]", f"file:{path.name}", "entries", "rowid",
            ("unique_id", "entry_uuid", "set_id", "status", "submission_set", "updated"),
            "xds_submissions", ("channel", "unique_id", "entry_uuid", "set_id", "status", "submission_set", "updated"),
            lambda row: (ch, _text(row[1]), _text(row[2]), _text(row[3]), row[4], _text(row[5]), row[6]),
            casts={"updated": "timestamptz"}, scope=("channel", ch),
        )
    ]  # fmt: skip


def _report_document(row: tuple[Any, ...], ch: str) -> tuple[Any, ...]:
    """A document version as `traboule.stores.postgres.reports` stores it: the Document event's JSON without its
    content, and the content (base64 in the SQLite row) as bytes."""
    _, doc_id, set_id, version, status, created, text = row
    plain = json.loads(text)
    content = base64.b64decode(plain.pop("content", "") or "")
    return (ch, _text(doc_id), _text(set_id), version, status, created, json.dumps(plain, ensure_ascii=False), content)


_WAITING = (
    "message_key", "set_key", "accession", "study_uid", "received", "deadline", "status", "reason",
    "superseded_by", "document_id", "journal_id", "noted", "requested", "report", "remark",
)  # fmt: skip


def _report_steps(channel: str, path: Path) -> list[Step]:
    """An ``hl7-orders`` channel's reports store (`traboule.stores.reports`, ``<channel>.reports.sqlite`` → the
    ``report_*`` tables): document sets (their numbers kept, the channel's last one after them), versions,
    messages, the catalog's orders, studies and performed steps, the reports held for their study (numbered again:
    the database numbers the held reports of every channel)."""
    ch, source = _text(channel), f"file:{path.name}"
    scope = ("channel", ch)

    def last_set(conn: psycopg.Connection) -> None:
        conn.execute(
            "INSERT INTO report_channels (channel, last_set) SELECT %s, COALESCE(max(n), 0) FROM report_sets"
            " WHERE channel = %s ON CONFLICT (channel) DO UPDATE SET"
            " last_set = GREATEST(report_channels.last_set, excluded.last_set)",
            (ch, ch),
        )

    return [
        TableCopy(
            f"reports.sets[{channel}]", source, "sets", "n", ("set_key", "set_id"),
            "report_sets", ("channel", "n", "set_key", "set_id"),
            lambda row: (ch, row[0], _text(row[1]), _text(row[2])), scope=scope, then=last_set,
        ),
        TableCopy(
            f"reports.documents[{channel}]", source, "documents", "rowid",
            ("id", "set_id", "version", "status", "created", "document"),
            "report_documents", ("channel", "id", "set_id", "version", "status", "created", "document", "content"),
            lambda row: _report_document(row, ch), casts={"created": "timestamptz"}, scope=scope,
        ),
        TableCopy(
            f"reports.messages[{channel}]", source, "messages", "rowid", ("message_key", "document_id", "action"),
            "report_messages", ("channel", "message_key", "document_id", "action"),
            lambda row: (ch, _text(row[1]), _text(row[2]), row[3]), scope=scope,
        ),
        TableCopy(
            f"reports.studies[{channel}]", source, "studies", "rowid", ("uid", "accession", "study"),
            "report_studies", ("channel", "uid", "accession", "study"),
            lambda row: (ch, _text(row[1]), _text(row[2]), row[3]), scope=scope,
        ),
        TableCopy(
            f"reports.orders[{channel}]", source, "orders", "rowid", ("accession", "orders"),
            "report_orders", ("channel", "accession", "orders"), lambda row: (ch, _text(row[1]), row[2]), scope=scope,
        ),
        TableCopy(
            f"reports.performed[{channel}]", source, "performed", "rowid", ("uid", "study_uid", "accession", "step"),
            "report_performed", ("channel", "uid", "study_uid", "accession", "step"),
            lambda row: (ch, _text(row[1]), _text(row[2]), _text(row[3]), row[4]), scope=scope,
        ),
        TableCopy(
            f"reports.waiting[{channel}]", source, "waiting", "n", _WAITING,
            "report_waiting", ("channel", *_WAITING),
            lambda row: (ch, *(v if c in ("deadline", "journal_id", "noted", "requested", "report") else _text(v)
                               for c, v in zip(_WAITING, row[1:], strict=True))),
            scope=scope,
        ),
    ]  # fmt: skip


def _is_sender(tables: set[str]) -> bool:
    """A sender channel's file, of this version or an earlier one (``applied`` or the oldest ``sent``; its other
    tables optional), not a worklist's (which has an ``applied`` table too) nor another store's."""
    others = {"items", "resources", "mpps", "entries", "sets"}
    return bool(tables & {"applied", "sent"}) and not tables & others


PER_CHANNEL.extend(
    [
        PerChannel(".sqlite", frozenset({"mpps"}), _mpps_steps),
        PerChannel(".sqlite", frozenset({"applied"}), _sender_steps, _is_sender),
        PerChannel(".sqlite", frozenset({"entries"}), _xds_steps),
        PerChannel(".reports.sqlite", frozenset({"sets", "documents", "messages", "waiting"}), _report_steps),
    ]
)


# -- the source ------------------------------------------------------------------------------------------------


@dataclass
class Sources:
    """The SQLite file of each store in a data folder: ``journal.sqlite``, ``patients.sqlite``, and the one
    channel file holding a worklist (tables ``items``, ``order_seq``) or a FHIR store (``resources``, ``tokens``);
    the database holds one worklist and one FHIR store, so a folder with several of either must say which
    (``channels``: store → channel name)."""

    data_dir: Path
    channels: dict[str, str] = field(default_factory=dict)
    paths: dict[str, Path | None] = field(default_factory=dict)
    others: list[Path] = field(default_factory=list)  # the worklist or FHIR stores not chosen (not moved)

    def __post_init__(self) -> None:
        if not self.data_dir.is_dir():
            raise MigrationError(f"{self.data_dir} is not a folder")
        found: dict[str, list[Path]] = {"worklist": [], "fhir": []}
        for path in sorted(self.data_dir.glob("*.sqlite")):
            if path.name in _NAMED or path.name.endswith(".reports.sqlite"):
                continue
            tables = _tables(path)
            if {"items", "order_seq"} <= tables:
                found["worklist"].append(path)
            if {"resources", "tokens"} <= tables:
                found["fhir"].append(path)
        for name in ("journal", "patients"):
            path = self.data_dir / f"{name}.sqlite"
            self.paths[name] = path if path.is_file() else None
        for store, candidates in found.items():
            chosen = self.channels.get(store)
            if chosen:
                path = self.data_dir / f"{chosen}.sqlite"
                if path not in candidates:
                    raise MigrationError(f"{path} is not a {store} channel's store")
                self.paths[store] = path
                self.others += [p for p in candidates if p != path]
            elif len(candidates) > 1:
                names = ", ".join(p.stem for p in candidates)
                raise MigrationError(
                    f"{self.data_dir} holds several {store} stores ({names}) and the database holds one:"
                    f" name the channel to migrate (--{store} NAME)"
                )
            else:
                self.paths[store] = candidates[0] if candidates else None

    def path(self, store: str) -> Path | None:
        """The file of ``store``: a store's name, or ``file:<name>`` for a file of the folder."""
        if store.startswith("file:"):
            path = self.data_dir / store.removeprefix("file:")
            return path if path.is_file() else None
        return self.paths.get(store)

    def channel_steps(self) -> list[Step]:
        """The steps of the per-channel stores (`PER_CHANNEL`) the folder holds, file by file in name order."""
        steps: list[Step] = []
        for path in sorted(self.data_dir.glob("*.sqlite")):
            if path.name in _NAMED or path in self.paths.values():
                continue
            suffix = ".reports.sqlite" if path.name.endswith(".reports.sqlite") else ".sqlite"
            tables = _tables(path)
            for kind in PER_CHANNEL:
                if kind.suffix == suffix and kind.matches(tables):
                    steps += kind.make(path.name.removesuffix(suffix), path)
        return steps

    def left(self, steps: Sequence[Step]) -> list[Path]:
        """The SQLite files of the folder none of ``steps`` reads (the embedded bus, stores not migrated)."""
        used = {self.path(step.store) for step in steps}
        return [p for p in sorted(self.data_dir.glob("*.sqlite")) if p not in used and p.name != DELIVERY_LOG]


def _tables(path: Path) -> set[str]:
    try:
        with closing(open_database(path, Durability.READ_ONLY)) as db:
            return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return set()


def pending_deliveries(data_dir: Path) -> tuple[int, int]:
    """(deliveries queued, dead letters) in the embedded bus of ``data_dir`` (0, 0 without one)."""
    path = data_dir / "bus.sqlite"
    if not path.is_file():
        return 0, 0
    with closing(open_database(path, Durability.READ_ONLY)) as db:
        counts = [
            int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) if _has_table(db, t) else 0
            for t in ("messages", "dead_letters")
        ]
    return counts[0], counts[1]


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Count:
    step: str
    source: int
    destination: int
    path: Path | None = None


@dataclass
class Report:
    counts: list[Count] = field(default_factory=list)
    copied: int = 0  # rows copied by this run
    left: list[Path] = field(default_factory=list)  # the folder's SQLite files no step read
    others: list[Path] = field(default_factory=list)  # of those, the worklist or FHIR stores not chosen

    @property
    def unread(self) -> list[Path]:
        """The files left that are neither the embedded bus nor a store left out by choice: data not moved."""
        return [p for p in self.left if p.name != "bus.sqlite" and p not in self.others]

    @property
    def mismatches(self) -> list[Count]:
        return [c for c in self.counts if c.source != c.destination]


Progress = Callable[[str, int, int], None]  # step, rows done, rows in the source


def migrate(
    data_dir: str | Path,
    url: str,
    *,
    channels: dict[str, str] | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    after_batch: Callable[[str, int], None] | None = None,
) -> Report:
    """Copy the stores of the data folder ``data_dir`` into the PostgreSQL database at ``url``; resumable (the same
    call again finishes an interrupted one, and changes nothing after a finished one). Returns the per-step counts
    (compare `Report.mismatches`). ``progress(step, done, total)`` is called after each batch;
    ``after_batch(step, batches)`` after each committed one (it may raise to stop the run there)."""
    from traboule.stores.postgres import connect, migrations

    sources = Sources(Path(data_dir), dict(channels or {}))
    steps = [*STEPS, *sources.channel_steps()]
    if not any(sources.path(step.store) for step in steps):
        raise MigrationError(f"{sources.data_dir} holds no traboule store (journal.sqlite, patients.sqlite...)")
    report = Report(left=sources.left(steps), others=list(sources.others))
    with connect(url) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
        if not row or not row[0]:
            raise MigrationError("another traboule db migrate is running on this database: wait for it to end")
        migrations.upgrade(conn)
        conn.execute(_PROGRESS_SCHEMA)
        if conn.execute(f"SELECT 1 FROM {PROGRESS_TABLE} WHERE step = %s", (RUN_STEP,)).fetchone() is None:
            for step in steps:  # a database in use: refused before anything marks it (its nodes would not start)
                if sources.path(step.store) is not None and (found := step.count_destination(conn)):
                    raise MigrationError(
                        f"{step.name}: the database already holds {found} rows this migration did not write:"
                        " migrate into a new database"
                    )
            conn.execute(
                f"INSERT INTO {PROGRESS_TABLE} (step, source, copied) VALUES (%s, %s, 0)",
                (RUN_STEP, str(sources.data_dir.resolve())),
            )
        for step in steps:
            path = sources.path(step.store)
            if path is None:
                report.counts.append(Count(step.name, 0, step.count_destination(conn)))
                continue
            with _source(path) as db:
                total = step.count_source(db)
                report.copied += _run(step, db, conn, str(path.resolve()), total, batch_size, progress, after_batch)
                report.counts.append(Count(step.name, total, step.count_destination(conn), path))
        conn.execute(f"UPDATE {PROGRESS_TABLE} SET done = true WHERE step = %s", (RUN_STEP,))
    return report


@contextmanager
def _source(path: Path) -> Iterator[sqlite3.Connection]:
    db = open_database(path, Durability.READ_ONLY, busy_timeout_s=30.0)
    try:
        db.execute("BEGIN")  # one snapshot of the file for the whole step
        yield db
    finally:
        db.close()


def _run(
    step: Step,
    db: sqlite3.Connection,
    conn: psycopg.Connection,
    source: str,
    total: int,
    batch_size: int,
    progress: Progress | None,
    after_batch: Callable[[str, int], None] | None,
) -> int:
    """One step, batch after batch, each with its progress row in one transaction; returns the rows copied.

    A step with a ``chain`` (`TableCopy`) keeps, in its progress row, the digest of the source rows it copied
    (`_chain`); a later run reads those rows again and refuses when they differ: rows changed in place under keys
    already copied would not be seen."""
    row = conn.execute(
        f"SELECT source, after, copied, done, fingerprint FROM {PROGRESS_TABLE} WHERE step = %s", (step.name,)
    ).fetchone()
    if row is None:
        found = step.count_destination(conn)
        if found:
            raise MigrationError(
                f"{step.name}: the database already holds {found} rows this migration did not write:"
                " migrate into a new database"
            )
        after, done, finished = None, 0, False
    else:
        if row[0] != source:
            raise MigrationError(f"{step.name}: the database holds a migration from {row[0]}, not from {source}")
        rows_upto = getattr(step, "rows_upto", None)
        if rows_upto is not None and row[4] is not None and _chain("", rows_upto(db, _key(row[1]))) != row[4]:
            raise MigrationError(
                f"{step.name}: {source} changed since the migration into this database began (rows copied"
                " by an earlier run were written to since): start over into a new database"
            )
        after, done, finished = _key(row[1]), int(row[2]), bool(row[3])
    if hasattr(step, "chain"):
        step.chain = "" if row is None else str(row[4] or "")
    if progress is not None:
        progress(step.name, done, total)
    if finished:
        return 0
    copied = batches = 0
    while True:
        with conn.transaction():
            n, last = step.copy_batch(db, conn, after, batch_size)
            if n == 0:
                step.finish(conn)
                _save(conn, step.name, source, after, done, finished=True, mark=getattr(step, "chain", ""))
                break
            done, after = done + n, last
            _save(conn, step.name, source, after, done, finished=False, mark=getattr(step, "chain", ""))
        copied += n
        batches += 1
        if progress is not None:
            progress(step.name, done, total)
        if after_batch is not None:
            after_batch(step.name, batches)
    return copied


def _save(
    conn: psycopg.Connection, step: str, source: str, after: Key, done: int, *, finished: bool, mark: str = ""
) -> None:
    """The step's progress (``mark``: the digest of the rows copied so far)."""
    conn.execute(
        f"INSERT INTO {PROGRESS_TABLE} (step, source, after, copied, done, fingerprint)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (step) DO UPDATE SET after = excluded.after,"
        " copied = excluded.copied, done = excluded.done, fingerprint = excluded.fingerprint",
        (step, source, None if after is None else json.dumps(after), done, finished, mark or None),
    )


def _key(stored: str | None) -> Key:
    """A key as `_save` stored it (JSON: an integer rowid or a text primary key)."""
    if stored is None:
        return None
    value = json.loads(stored)
    if not isinstance(value, int | str):
        raise MigrationError(f"{PROGRESS_TABLE}: unreadable key {stored!r}")
    return value
