"""The worklist store on PostgreSQL: the MWL items of several engine nodes in one database, one worklist for all.

`PostgresWorklistStore` implements `traboule.stores.WorklistStore` with the semantics of
`traboule.stores.worklist.SQLiteWorklistStore`: the same index columns (``traboule.formats.worklist_item``), the
same prefilter (`traboule.stores.worklist.prefilter_conditions`, translated to PostgreSQL here) and the same exact
PS3.4 matching in Python on the decoded items. A modality may query any node: every node reads the same tables,
and a committed ``apply_batch`` is seen by the next ``find`` of every node.

* Tables ``worklist_items`` (index columns, the item's bytes as ``bytea``), ``worklist_applied`` (the idempotency
  keys applied, as `traboule.stores.idempotency`'s ``applied``) and ``worklist_order_seq``, created by the
  ``worklist`` migrations (`traboule.stores.postgres.migrations`). Text columns use the ``"C"`` collation: keys
  sort bytewise as SQLite's BINARY collation does, and the B-tree indexes serve equality, date ranges and
  ``LIKE 'prefix%'`` alike.
* ``apply_batch`` runs in one transaction; the batch's idempotency keys are claimed with one ``INSERT ... ON
  CONFLICT DO NOTHING RETURNING`` in that transaction, so two nodes applying the same event at once apply it once
  (the second waits for the first's commit, then finds the key taken); the claimed changes' writes and the order
  sequences then go out together (pipeline). A deadlock between two nodes' batches is retried whole.
  ``keys_with_prefixes`` reads the keys of a batch's orders in one statement.
  Writes of one store are serialised; reads use a bounded pool of autocommit connections (``pool_size``,
  ``MAX_READERS`` by default: `traboule.stores.postgres.pool`) and never wait for the writer. A read whose pooled
  connection the server had closed (a restart) is run once more on a new one; a write is not (its commit outcome
  is unknown: the error is raised, the event redelivered), but a writer found gone at ``BEGIN`` is replaced.
* ``find`` takes the candidate ids in one statement (bounded by ``max_examined``), then reads the items by
  batches of ids, one short statement each: no transaction stays open while a response streams to a slow peer.
  ``deadline`` and ``should_stop`` cancel the candidate statement itself (a watcher thread, server-side cancel).
* PostgreSQL text cannot hold a NUL character: an index value with one is stored as NULL and its row flagged
  ``exact = false`` (always a candidate, the matcher decides), and a query value with one is left out of the
  prefilter. A key with a NUL is refused (the batch fails).
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
from psycopg import errors
from pydicom.dataset import Dataset

from traboule.formats.dicom_match import (
    AnyOf,
    CompiledQuery,
    Condition,
    Range,
    ScanStopped,
    Single,
    Wildcard,
    compile_query,
)
from traboule.formats.worklist_item import EncodedItem, dataset_columns, decode_item, encode_item
from traboule.stores.postgres import connect
from traboule.stores.postgres.migrations import check, register
from traboule.stores.postgres.pool import MAX_READERS, ReaderPool, begin
from traboule.stores.worklist import (
    NOT_OFFERED,
    Change,
    Item,
    _DecodedCache,
    _ScanLimits,
    prefilter_conditions,
)

COMPONENT = "worklist"
T = TypeVar("T")

_MIGRATIONS = [
    (
        1,
        """
CREATE TABLE worklist_items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text COLLATE "C" NOT NULL UNIQUE,
    status text COLLATE "C" NOT NULL DEFAULT '',
    patient_id text COLLATE "C",
    issuer_of_patient_id text COLLATE "C",
    patient_name text COLLATE "C",
    patient_name_upper text COLLATE "C",
    accession_number text COLLATE "C",
    requested_procedure_id text COLLATE "C",
    study_uid text COLLATE "C",
    modality text COLLATE "C",
    station_aet text COLLATE "C",
    start_date text COLLATE "C",
    start_time text COLLATE "C",
    exact boolean NOT NULL DEFAULT true,
    updated timestamptz NOT NULL DEFAULT now(),
    dataset bytea NOT NULL
);
-- The modality query: "scheduled today (or a date range), for CT, for my AE title".
CREATE INDEX worklist_items_sps ON worklist_items (start_date, modality, station_aet);
CREATE INDEX worklist_items_accession ON worklist_items (accession_number);
CREATE INDEX worklist_items_patient ON worklist_items (patient_id, issuer_of_patient_id);
CREATE INDEX worklist_items_patient_name ON worklist_items (patient_name);
CREATE INDEX worklist_items_patient_name_upper ON worklist_items (patient_name_upper);
CREATE INDEX worklist_items_study ON worklist_items (study_uid);
-- Rows the columns cannot describe are candidates of every query.
CREATE INDEX worklist_items_inexact ON worklist_items (id) WHERE NOT exact;
CREATE TABLE worklist_applied (
    idempotency_key text COLLATE "C" PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- The journal sequence of the latest event applied per order (or per patient, keys "patient|..."): an older
-- event must not undo a newer change.
CREATE TABLE worklist_order_seq (
    order_key text COLLATE "C" PRIMARY KEY,
    seq bigint NOT NULL
);
""",
    )
]
register(COMPONENT, _MIGRATIONS)

_BATCH = 256  # items read per statement while a response streams
_LOOKUP_CHUNK = 1000  # keys per `= ANY(...)` lookup
_WATCH_INTERVAL_S = 0.02  # how often a running candidate statement checks the deadline and should_stop
_CANCEL_TIMEOUT_S = 2.0
_RETRIES = 5  # attempts of a batch that lost a deadlock or a serialisation conflict to another node

_UPSERT = """
INSERT INTO worklist_items (key, status, patient_id, issuer_of_patient_id, patient_name, patient_name_upper,
    accession_number, requested_procedure_id, study_uid, modality, station_aet, start_date, start_time,
    exact, dataset)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (key) DO UPDATE SET
    status = excluded.status, patient_id = excluded.patient_id,
    issuer_of_patient_id = excluded.issuer_of_patient_id, patient_name = excluded.patient_name,
    patient_name_upper = excluded.patient_name_upper, accession_number = excluded.accession_number,
    requested_procedure_id = excluded.requested_procedure_id, study_uid = excluded.study_uid,
    modality = excluded.modality, station_aet = excluded.station_aet, start_date = excluded.start_date,
    start_time = excluded.start_time, exact = excluded.exact, dataset = excluded.dataset, updated = now()
"""
_CLAIM = (  # a batch's keys at once: those it inserts come back
    "INSERT INTO worklist_applied (idempotency_key) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING"
    " RETURNING idempotency_key"
)
_SEQS = (  # one row per order key (a dict's): no row is affected twice
    "INSERT INTO worklist_order_seq (order_key, seq) SELECT * FROM unnest(%s::text[], %s::bigint[])"
    " ON CONFLICT (order_key) DO UPDATE SET seq = GREATEST(worklist_order_seq.seq, excluded.seq)"
)


class PostgresWorklistStore:
    """Durable MWL items keyed by the caller's key, in the PostgreSQL database at ``url``, safe from many threads
    and shared by every node that opens the same database. The schema is created or upgraded on open."""

    def __init__(self, url: str, *, cache_size: int = 4096, pool_size: int = MAX_READERS) -> None:
        """``pool_size``: the reader connections open at most (a read waits for one beyond)."""
        self.url = url
        self._write_lock = threading.Lock()
        self._writer = connect(url)
        try:
            encoding = self._writer.execute("SHOW server_encoding").fetchone()
            if encoding is None or encoding[0] != "UTF8":
                # LIKE's `_` is one character only in UTF8; elsewhere the prefilter could hide a match.
                raise ValueError(f"the worklist needs a UTF8 database, not {encoding[0] if encoding else '?'}")
            check(self._writer, COMPONENT)
        except BaseException:
            self._writer.close()
            raise
        self._readers = ReaderPool(url, size=pool_size, name="worklist store")
        self._cache = _DecodedCache(cache_size)
        self._watcher = _Watcher()
        self._closed = False

    def _read(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body`` on a connection of the reader pool, replayed once on a new connection when the pooled one's
        session was gone (a server restart: `traboule.stores.postgres.pool`)."""
        if self._closed:
            raise RuntimeError("the worklist store is closed")
        return self._readers.read(body)

    def close(self) -> None:
        """Close every connection (connections in use are closed when handed back)."""
        self._closed = True
        self._watcher.close()
        with self._write_lock:
            self._writer.close()
        self._readers.close()

    # -- writes ----------------------------------------------------------------------------------------------

    def apply(self, upserts: list[tuple[str, Item]], deletes: list[str], idempotency_key: str = "") -> bool:
        """Write upserts and deletes in one transaction; False (and nothing changed) if the key was applied."""
        return self.apply_batch([(upserts, deletes, idempotency_key)])[0]

    def apply_batch(self, changes: list[Change], seqs: dict[str, int] | None = None) -> list[bool]:
        """Apply several changes (upserts, deletes, idempotency key) in one transaction, in order; each change
        whose key was already applied (by any node, or earlier in the batch) is skipped. ``seqs`` records, in the
        same transaction, the latest event sequence seen per order key (it never goes back)."""
        encoded = [([_row(key, ds) for key, ds in upserts], deletes, key) for upserts, deletes, key in changes]
        ordered_seqs = sorted((seqs or {}).items())  # one lock order across nodes
        for attempt in range(1, _RETRIES + 1):
            try:
                with self._write_lock:
                    if self._closed:
                        raise RuntimeError("the worklist store is closed")
                    # A new session when the server ended the writer's, found before anything was sent.
                    self._writer, tx = begin(self._writer, self.url)
                    with contextlib.ExitStack() as stack:
                        stack.push(tx)
                        return _apply(self._writer, encoded, ordered_seqs)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def order_seqs(self, order_keys: list[str]) -> dict[str, int]:
        """The latest event sequence applied for each of these order keys (absent: none yet)."""
        sql = "SELECT order_key, seq FROM worklist_order_seq WHERE order_key = ANY(%s)"
        return {k: int(v) for k, v in self._lookup(sql, order_keys)}

    def applied(self, idempotency_keys: list[str]) -> set[str]:
        """Which of these idempotency keys were already applied (by any node)."""
        sql = "SELECT idempotency_key FROM worklist_applied WHERE idempotency_key = ANY(%s)"
        return {r[0] for r in self._lookup(sql, idempotency_keys)}

    def _lookup(self, sql: str, keys: list[str]) -> list[tuple[object, ...]]:
        wanted = [k for k in dict.fromkeys(keys) if k and "\x00" not in k]  # no stored key holds a NUL
        if not wanted:
            return []

        def body(conn: psycopg.Connection) -> list[tuple[object, ...]]:
            found: list[tuple[object, ...]] = []
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                found += conn.execute(sql, (wanted[start : start + _LOOKUP_CHUNK],)).fetchall()
            return found

        return self._read(body)

    # -- reads -----------------------------------------------------------------------------------------------

    def get(self, key: str) -> Dataset | None:
        """The stored item (a fresh copy the caller may modify), or None."""
        if "\x00" in key:
            return None
        sql = "SELECT dataset FROM worklist_items WHERE key = %s"
        row = self._read(lambda conn: conn.execute(sql, (key,)).fetchone())
        return None if row is None else decode_item(row[0])

    def keys_for_patient(self, patient_id: str, issuer: str) -> list[str]:
        """Keys of the items of one patient identifier (issuer compared exactly, '' for none)."""
        if "\x00" in patient_id or "\x00" in issuer:
            return []
        sql = (
            "SELECT key FROM worklist_items WHERE patient_id = %s AND coalesce(issuer_of_patient_id, '') = %s"
            " ORDER BY key"
        )
        return self._keys(sql, (patient_id, issuer))

    def keys_for_accession(self, accession: str) -> list[str]:
        """Keys of the items of one accession number (e.g. to find the order a modality's MPPS reports on)."""
        if "\x00" in accession:
            return []
        return self._keys("SELECT key FROM worklist_items WHERE accession_number = %s ORDER BY key", (accession,))

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` (e.g. every step of one order), in key order."""
        if "\x00" in prefix:
            return []
        # A literal LIKE prefix is a range scan of the key index (collation "C"); planned with its value.
        sql = "SELECT key FROM worklist_items WHERE key LIKE %s ORDER BY key"
        return self._keys(sql, (_like_literal(prefix) + "%",))

    def keys_with_prefixes(self, prefixes: list[str]) -> dict[str, list[str]]:
        """`keys_with_prefix` of several prefixes in one statement (a batch's orders): a range scan of the key index
        per prefix (collation "C": the keys starting with ``p`` are those from ``p`` up to ``p`` with its last
        character's successor, excluded)."""
        wanted = sorted({p for p in prefixes if p and "\x00" not in p and _successor(p[-1])})
        found: dict[str, list[str]] = {p: [] for p in prefixes}
        if not wanted:
            return found
        highs = [p[:-1] + _successor(p[-1]) for p in wanted]
        # One range scan of the key index per prefix (a LATERAL kept apart by OFFSET 0): a join would be planned
        # once for any prefixes (prepared) and may scan far more.
        sql = (
            "SELECT r.lo, w.key FROM unnest(%s::text[], %s::text[]) AS r(lo, hi) CROSS JOIN LATERAL"
            " (SELECT key FROM worklist_items WHERE key >= r.lo AND key < r.hi ORDER BY key OFFSET 0) AS w"
        )
        for prefix, key in self._read(lambda conn: conn.execute(sql, (wanted, highs)).fetchall()):
            found[str(prefix)].append(str(key))
        for prefix in prefixes:
            if prefix not in wanted and prefix:  # a NUL, or no successor: the one-prefix lookup
                found[prefix] = self.keys_with_prefix(prefix)
        return found

    def _keys(self, sql: str, params: tuple[object, ...]) -> list[str]:
        return self._read(lambda conn: [r[0] for r in conn.execute(sql, params, prepare=False)])

    def count(self) -> int:
        row = self._read(lambda conn: conn.execute("SELECT count(*) FROM worklist_items").fetchone())
        return int(row[0]) if row else 0

    def all(self, limit: int | None = None) -> Iterator[tuple[str, Dataset]]:
        """Every item as (key, fresh dataset), in key order."""
        sql = "SELECT id FROM worklist_items ORDER BY key" + (" LIMIT %s" if limit is not None else "")
        ids = self._read(lambda conn: [r[0] for r in conn.execute(sql, () if limit is None else (limit,))])
        for key, blob in self._fetch(ids):
            yield key, decode_item(blob)

    def find(
        self,
        query: Dataset,
        *,
        case_insensitive_names: bool = False,
        max_examined: int = 0,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Dataset]:
        """C-FIND: the response identifiers of the offered items matching `query`.

        Raises `traboule.formats.dicom_match.QueryError` at once (not on first iteration) for an unusable query.
        While iterating, raises `ScanStopped` before examining one more item when `max_examined` (> 0) items were
        examined, when `time.monotonic()` passed `deadline`, or when `should_stop()` returns True; the candidate
        statement is cancelled for the last two as well.
        """
        compiled = compile_query(query, case_insensitive_names=case_insensitive_names)
        limit = max_examined + 1 if max_examined > 0 else None  # one more than the budget: to know it is exceeded
        sql, params = prefilter_sql(compiled, limit)
        return self._find(compiled, sql, params, limit, _ScanLimits(max_examined, deadline, should_stop))

    def _find(
        self, compiled: CompiledQuery, sql: str, params: list[object], limit: int | None, limits: _ScanLimits
    ) -> Iterator[Dataset]:
        limits.check(0)
        ids = self._candidates(sql, params, limits)
        examined = 0
        for _key, blob in self._fetch(ids):
            limits.check(examined)
            examined += 1
            item = self._cache.get(blob)
            if compiled.matches(item):
                yield compiled.response(item)
        if limit is not None and len(ids) == limit:
            # More candidates than the budget, some deleted meanwhile: the answer is incomplete all the same.
            raise ScanStopped("max_examined", examined)

    def _candidates(self, sql: str, params: list[object], limits: _ScanLimits) -> list[int]:
        """The candidate ids, the statement cancelled when the deadline passes or ``should_stop`` says so."""
        if limits.deadline is None and limits.should_stop is None:
            return self._read(lambda conn: [r[0] for r in conn.execute(sql, params, prepare=False)])
        return self._read(lambda conn: self._watched(conn, sql, params, limits))

    def _watched(self, conn: psycopg.Connection, sql: str, params: list[object], limits: _ScanLimits) -> list[int]:
        """The candidate statement on ``conn``, cancelled by the watcher when the scan must stop (then `ScanStopped`
        says why: not replayed)."""
        token = self._watcher.start(conn, limits)
        try:
            return [r[0] for r in conn.execute(sql, params, prepare=False)]
        except errors.QueryCanceled:
            limits.check(0)  # cancelled by the watcher: say why
            raise
        finally:
            if self._watcher.stop(token):
                conn.close()  # a cancel may still be in flight: never hand this session to another query

    def _fetch(self, ids: list[int]) -> Iterator[tuple[str, bytes]]:
        """(key, dataset bytes) for ids, in their order, one short statement per batch. Rows deleted meanwhile are
        skipped."""
        sql = "SELECT id, key, dataset FROM worklist_items WHERE id = ANY(%s)"
        for start in range(0, len(ids), _BATCH):
            batch = ids[start : start + _BATCH]
            found = self._read(lambda conn, batch=batch: {r[0]: (r[1], r[2]) for r in conn.execute(sql, (batch,))})
            for item_id in batch:
                if item_id in found:
                    yield found[item_id]

    def explain(self, query: Dataset, *, case_insensitive_names: bool = False) -> list[str]:
        """PostgreSQL's plan for the prefilter of `query` (to check which index serves a query)."""
        compiled = compile_query(query, case_insensitive_names=case_insensitive_names)
        sql, params = prefilter_sql(compiled, None)
        return self._read(lambda conn: [str(r[0]) for r in conn.execute("EXPLAIN " + sql, params, prepare=False)])


class _Watcher:
    """One thread per store that cancels the running candidate statements whose scan must stop (deadline passed,
    ``should_stop`` True), looking every `_WATCH_INTERVAL_S` at those running longer than that (a quick statement
    costs no check); started on first use, asleep while none runs."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._running: dict[int, tuple[psycopg.Connection, _ScanLimits, float]] = {}
        self._cancelled: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, conn: psycopg.Connection, limits: _ScanLimits) -> int:
        """Watch the statement about to run on ``conn``; the token for `stop`."""
        with self._lock:
            token = next(self._tokens)
            self._running[token] = (conn, limits, time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="worklist-find-watcher", daemon=True)
                self._thread.start()
            self._lock.notify()
        return token

    def stop(self, token: int) -> bool:
        """Stop watching; whether the statement was cancelled (its session must not be reused)."""
        with self._lock:
            del self._running[token]
            if token in self._cancelled:
                self._cancelled.discard(token)
                return True
            return False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                if not self._running:
                    self._lock.wait()
                    continue
                due = time.monotonic() - _WATCH_INTERVAL_S
                for token, (conn, limits, started) in list(self._running.items()):
                    if started <= due and token not in self._cancelled and limits.reason(0) is not None:
                        self._cancelled.add(token)
                        with contextlib.suppress(Exception):  # a server out of reach: the statement timeout ends it
                            conn.cancel_safe(timeout=_CANCEL_TIMEOUT_S)
                self._lock.wait(_WATCH_INTERVAL_S)


_Encoded = list[tuple[list[tuple[object, ...]], list[str], str]]  # rows to upsert, keys to delete, idempotency key


def _apply(conn: psycopg.Connection, encoded: _Encoded, seqs: list[tuple[str, int]]) -> list[bool]:
    """The body of `PostgresWorklistStore.apply_batch`, inside its transaction: the batch's idempotency keys claimed
    in one statement (sorted: one lock order across nodes), then the claimed changes' upserts and deletes, in
    order, and the sequences, sent together (pipeline: one round trip)."""
    keys = sorted({key for _, _, key in encoded if key})
    claimed: set[str] = set()
    if keys:
        claimed = {row[0] for row in conn.execute(_CLAIM, (keys,)).fetchall()}
    applied: list[bool] = []
    with conn.pipeline(), conn.cursor() as cur:
        upserts: list[tuple[object, ...]] = []
        for rows, deletes, idempotency_key in encoded:
            if idempotency_key:
                if idempotency_key not in claimed:
                    applied.append(False)  # applied before (by any node), or earlier in this batch
                    continue
                claimed.discard(idempotency_key)
            upserts += rows
            deletes = [k for k in deletes if not (isinstance(k, str) and "\x00" in k)]  # never stored: absent
            if deletes:
                if upserts:  # the upserts before it first: same order as the changes
                    cur.executemany(_UPSERT, upserts)
                    upserts = []
                cur.execute("DELETE FROM worklist_items WHERE key = ANY(%s)", (deletes,))
            applied.append(True)
        if upserts:
            cur.executemany(_UPSERT, upserts)
        if seqs:
            cur.execute(_SEQS, ([k for k, _ in seqs], [v for _, v in seqs]))
    return applied


def _successor(char: str) -> str:
    """The next character UTF-8 can hold ("" for the last code point and the one before the surrogates)."""
    n = ord(char) + 1
    return "" if n > 0x10FFFF or 0xD800 <= n <= 0xDFFF else chr(n)


def _row(key: str, item: Item) -> tuple[object, ...]:
    """The upsert parameters: an index value holding a NUL (which PostgreSQL text cannot) becomes NULL and the
    row inexact, so that the matcher, not the prefilter, decides on it."""
    if isinstance(item, EncodedItem):
        columns, data = item.columns, item.data
    else:
        columns, data = dataset_columns(item), encode_item(item)
    *values, exact = columns
    exact = bool(exact)
    for i, value in enumerate(values):
        if isinstance(value, str) and "\x00" in value:
            values[i] = "" if i == 0 else None  # status is never NULL
            exact = False
    return (key, *values, exact, data)


def _like_literal(text: str) -> str:
    """`text` as a LIKE pattern matching itself only (default escape character: backslash)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(pattern: str) -> str:
    """A DICOM wild card pattern as a LIKE pattern: `*` any characters, `?` one character, case-sensitive."""
    return "".join("%" if ch == "*" else "_" if ch == "?" else _like_literal(ch) for ch in pattern)


def _column_sql(column: str, condition: Condition) -> tuple[str, list[object]] | None:
    """SQL selecting a superset of the rows whose column satisfies the condition; None when not expressible."""
    if isinstance(condition, Single):
        values = sorted(condition.values)
        if any("\x00" in v for v in values):
            return None
        if len(values) == 1:
            return f"{column} = %s", values
        return f"{column} = ANY(%s)", [values]
    if isinstance(condition, Wildcard):
        # PostgreSQL's LIKE gives up on a `%` once the rest cannot match anywhere: no exponential backtracking.
        if "\x00" in condition.pattern:
            return None
        return f"{column} LIKE %s", [_like(condition.pattern)]
    if isinstance(condition, Range) and condition.vr == "DA":
        # DA columns hold YYYYMMDD text, which sorts like the dates (collation "C").
        if condition.low is not None and condition.low == condition.high:
            return f"{column} = %s", [condition.low]
        if condition.low is not None and condition.high is not None:
            return f"{column} BETWEEN %s AND %s", [condition.low, condition.high]
        if condition.low is not None:
            return f"{column} >= %s", [condition.low]
        if condition.high is not None:
            return f"{column} <= %s", [condition.high]
        return None
    if isinstance(condition, AnyOf):
        parts = [_column_sql(column, c) for c in condition.conditions]
        if any(p is None for p in parts):
            return None
        sqls = [p[0] for p in parts if p is not None]
        params = [v for p in parts if p is not None for v in p[1]]
        return "(" + " OR ".join(sqls) + ")", params
    return None


def prefilter_sql(compiled: CompiledQuery, limit: int | None = None) -> tuple[str, list[object]]:
    """The ids of the candidate items for a compiled query (a superset of the matches), in insertion order, at
    most ``limit``."""
    where: list[str] = []
    params: list[object] = []
    for column, condition in prefilter_conditions(compiled):
        part = _column_sql(column, condition)
        if part is not None:
            where.append(part[0])
            params.extend(part[1])
    offered = "status <> ALL(%s)"
    tail = " ORDER BY id" + (" LIMIT %s" if limit is not None else "")
    tail_params: list[object] = [] if limit is None else [limit]
    if not where:
        return f"SELECT id FROM worklist_items WHERE {offered}{tail}", [list(NOT_OFFERED), *tail_params]
    # Rows the columns cannot describe faithfully are always candidates (served by a partial index).
    sql = (
        f"SELECT id FROM worklist_items WHERE exact AND {offered} AND {' AND '.join(where)}"
        f" UNION ALL SELECT id FROM worklist_items WHERE NOT exact AND {offered}{tail}"
    )
    return sql, [list(NOT_OFFERED), *params, list(NOT_OFFERED), *tail_params]
