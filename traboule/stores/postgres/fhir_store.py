"""The FHIR store on PostgreSQL: the resources of a ``fhir`` channel shared by several engine nodes in one database.

`PostgresFHIRStore` implements `traboule.stores.FHIRStore` with the semantics of
`traboule.stores.fhir_store.SQLiteFHIRStore`: the same rows (one per resource, its ``seq`` and versions), the same
token index (`traboule.stores.fhir_store._tokens`) and the same search SQL (`traboule.stores.fhir_store.search_where`,
placeholders and table names translated here). A FHIR client may query any node: every node reads the same tables,
and a committed transaction of one node is seen by the next call of every other.

* Tables ``fhir_resources`` (``row_id``: the insertion order searches return), ``fhir_tokens``, ``fhir_remote`` and
  ``fhir_index`` (the version of the token extraction the index was built with: an older one is rebuilt at open),
  created by the ``fhir`` migrations (`traboule.stores.postgres.migrations`). Text columns use the ``"C"``
  collation: comparisons and ranges (dates) are bytewise, as SQLite's BINARY collation.
* ``upsert`` locks the resource's row (``SELECT ... FOR UPDATE``; an absent one is claimed with ``INSERT ... ON
  CONFLICT DO NOTHING``, which waits for another node's insert of the same resource), then decides as SQLite does:
  two nodes writing one resource at once end with the higher ``seq``, whatever the order of their commits.
* ``transaction()`` is one PostgreSQL transaction on the store's writer connection (it nests; other writers of the
  store wait). Reads from another thread use a bounded pool of autocommit connections (`pool_size`, ``MAX_READERS``
  by default: `traboule.stores.postgres.pool`), never wait for the writer, and see committed data only; a read
  whose pooled connection the server had closed (a restart) is run once more on a new one. Reads from inside the
  transaction see its writes. ``search`` is one statement (total and page from
  one snapshot). A deadlock between two nodes is retried for a call made outside ``transaction()``; inside one it
  is raised to the caller (the event is redelivered).
* PostgreSQL text cannot hold a NUL character: every text stored or compared (types, ids, token systems and values,
  locations) is escaped by `_enc` (``\\x01`` → ``\\x01\\x02``, NUL → ``\\x01\\x01``), a prefix-free code that keeps
  equality, prefixes and byte order; the resource itself is JSON, where a NUL is ``\\u0000``.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
from psycopg import errors

from traboule.stores.fhir_store import TOKENS_VERSION, _content, _tokens, search_where
from traboule.stores.postgres import connect, decode_text, encode_text
from traboule.stores.postgres.migrations import check, register
from traboule.stores.postgres.pool import MAX_READERS, ReaderPool, begin

COMPONENT = "fhir"

_MIGRATIONS = [
    (
        1,
        """
CREATE TABLE fhir_resources (
    row_id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    type text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    version_id integer NOT NULL,
    last_updated text COLLATE "C" NOT NULL,
    seq bigint NOT NULL DEFAULT 0,
    json text NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE TABLE fhir_tokens (
    type text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    system text COLLATE "C" NOT NULL,
    value text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL
);
CREATE INDEX fhir_tokens_value ON fhir_tokens (type, name, value, system);
CREATE INDEX fhir_tokens_id ON fhir_tokens (type, id);
-- Which version of a resource a FHIR server holds, and under which Type/id there.
CREATE TABLE fhir_remote (
    type text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    version_id integer NOT NULL,
    location text NOT NULL,
    pushed_at text NOT NULL,
    PRIMARY KEY (type, id)
);
-- The version of the token extraction the index was built with (one row).
CREATE TABLE fhir_index (
    tokens_version integer NOT NULL
);
INSERT INTO fhir_index (tokens_version) VALUES (2);
""",
    )
]
register(COMPONENT, _MIGRATIONS)

_RETRIES = 5  # attempts of a call made outside transaction() that a deadlock between nodes aborted
_TOKEN_INSERT = "INSERT INTO fhir_tokens (type, name, system, value, id) VALUES (%s, %s, %s, %s, %s)"
_TABLES = re.compile(r"\b(FROM|JOIN) tokens\b")

T = TypeVar("T")


_enc, _dec = encode_text, decode_text  # NUL and \x01 escaped: see `traboule.stores.postgres.encode_text`


def _text(value: Any) -> Any:
    """A token field as stored (SQLite's TEXT affinity turns a number into its text too)."""
    if value is None:
        return None
    return _enc(value if isinstance(value, str) else str(value))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sql(sqlite_sql: str) -> str:
    """The search SQL of `search_where` (SQLite's placeholders and table names) for this schema."""
    return _TABLES.sub(r"\1 fhir_tokens", sqlite_sql).replace("?", "%s")


class PostgresFHIRStore:
    """The FHIR resources of one ``fhir`` channel (`traboule.stores.FHIRStore`) in the PostgreSQL database at
    ``url``, shared by every node that opens it; the schema is created or upgraded on open."""

    def __init__(self, url: str, timezone: Any = None, *, pool_size: int = MAX_READERS) -> None:
        """``timezone``: how a date or a zone-less time in a date search is read (local days); UTC when None.
        ``pool_size``: the reader connections open at most (a read waits for one beyond)."""
        self.url = url
        self.timezone = timezone or UTC
        self._lock = threading.RLock()
        self._depth = 0
        self._owner: int | None = None  # the thread inside transaction()
        self._closed = False
        self._readers = ReaderPool(url, size=pool_size, name="FHIR store")
        self._writer = connect(url)
        try:
            check(self._writer, COMPONENT)
            self._reindex()
        except BaseException:
            self._writer.close()
            raise

    def _reindex(self) -> None:
        """Rebuild the search index written by an older traboule (new search parameters), once for all nodes."""
        row = self._writer.execute("SELECT tokens_version FROM fhir_index").fetchone()
        if row is not None and row[0] >= TOKENS_VERSION:
            return
        with self.transaction():
            conn = self._writer
            row = conn.execute("SELECT tokens_version FROM fhir_index FOR UPDATE").fetchone()
            if row is not None and row[0] >= TOKENS_VERSION:
                return  # another node rebuilt it while we waited
            conn.execute("DELETE FROM fhir_tokens")
            with conn.cursor() as cur:
                for (text,) in conn.execute("SELECT json FROM fhir_resources ORDER BY row_id").fetchall():
                    resource = json.loads(text)
                    cur.executemany(_TOKEN_INSERT, _token_rows(resource))
            conn.execute("DELETE FROM fhir_index")
            conn.execute("INSERT INTO fhir_index (tokens_version) VALUES (%s)", (TOKENS_VERSION,))

    # -- connections -------------------------------------------------------------------------------------------

    def _read(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body`` on the writer for the thread inside `transaction` (it sees its own writes), else on a connection
        of the reader pool (committed data only, never waiting for the writer; replayed once on a new connection
        when the pooled one's session was gone: `traboule.stores.postgres.pool`)."""
        if self._owner == threading.get_ident():
            with self._lock:
                return body(self._writer)
        if self._closed:
            raise RuntimeError("the FHIR store is closed")
        return self._readers.read(body)

    def close(self) -> None:
        """Close every connection (a connection in use by a read is closed when handed back)."""
        with self._lock:
            self._closed = True
            self._writer.close()
        self._readers.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One PostgreSQL transaction for everything done inside (nests; the store's lock is held throughout)."""
        with self._lock:
            if self._depth > 0:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            if self._closed:
                raise RuntimeError("the FHIR store is closed")
            # A new session when the server ended the writer's (a restart), found before anything was sent.
            self._writer, tx = begin(self._writer, self.url)
            self._depth, self._owner = 1, threading.get_ident()
            try:
                with contextlib.ExitStack() as stack:
                    stack.push(tx)
                    yield
            finally:
                self._depth, self._owner = 0, None

    def _write(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body`` inside `transaction`; retried whole after a deadlock with another node unless the caller's own
        transaction is open (then the caller's transaction fails: its event is redelivered)."""
        for attempt in range(1, _RETRIES + 1):
            nested = self._owner == threading.get_ident()
            try:
                with self.transaction():
                    return body(self._writer)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if nested or attempt == _RETRIES:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- writes ------------------------------------------------------------------------------------------------

    def upsert(self, resource: dict[str, Any], seq: int = 0) -> bool:
        """Store ``resource`` (its ``resourceType`` and ``id`` say where); True when it was created or changed.
        ``seq``: the journal sequence of the event; a resource written by a later event is left alone."""
        return self._write(lambda conn: _upsert(conn, resource, seq))

    def set_remote(self, rows: list[tuple[str, str, int, str]]) -> None:
        """Record pushed copies: (type, id, version pushed, ``Type/id`` on the server); a version never goes back."""
        pushed_at = _now()
        params = sorted((_enc(t), _enc(i), v, _enc(loc), pushed_at) for t, i, v, loc in rows)  # one lock order
        if not params:
            return

        def body(conn: psycopg.Connection) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO fhir_remote (type, id, version_id, location, pushed_at) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (type, id) DO UPDATE SET"
                    " version_id = GREATEST(fhir_remote.version_id, excluded.version_id),"
                    " location = excluded.location, pushed_at = excluded.pushed_at",
                    params,
                )

        self._write(body)

    def forget_remote(self) -> list[tuple[str, str]]:
        """Forget every pushed copy (the server was restored or wiped); returns every resource, to push again."""

        def body(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
            conn.execute("DELETE FROM fhir_remote")
            return conn.execute("SELECT type, id FROM fhir_resources ORDER BY row_id").fetchall()

        return [(_dec(t), _dec(i)) for t, i in self._write(body)]

    # -- reads -------------------------------------------------------------------------------------------------

    def _one(self, sql: str, params: tuple[Any, ...] | list[Any]) -> tuple[Any, ...] | None:
        return self._read(lambda conn: conn.execute(sql, params).fetchone())

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        return self._read(lambda conn: conn.execute(sql, params, prepare=False).fetchall())

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        row = self._one("SELECT json FROM fhir_resources WHERE type = %s AND id = %s", (_enc(rtype), _enc(rid)))
        return None if row is None else json.loads(row[0])

    def seq_of(self, rtype: str, rid: str) -> int:
        """The journal sequence of the latest event that wrote the resource (0: none, or unknown)."""
        row = self._one("SELECT seq FROM fhir_resources WHERE type = %s AND id = %s", (_enc(rtype), _enc(rid)))
        return int(row[0] or 0) if row else 0

    def get_with_remote(self, rtype: str, rid: str) -> tuple[dict[str, Any] | None, tuple[int, str] | None]:
        """A resource and its pushed copy (``remote``), in one query."""
        row = self._one(
            "SELECT r.json, p.version_id, p.location FROM fhir_resources r LEFT JOIN fhir_remote p"
            " ON p.type = r.type AND p.id = r.id WHERE r.type = %s AND r.id = %s",
            (_enc(rtype), _enc(rid)),
        )
        if row is None:
            return None, None
        return json.loads(row[0]), (int(row[1]), _dec(str(row[2]))) if row[1] is not None else None

    def remote(self, rtype: str, rid: str) -> tuple[int, str] | None:
        """(version pushed, ``Type/id`` on the FHIR server) of a resource, None when never pushed."""
        row = self._one(
            "SELECT version_id, location FROM fhir_remote WHERE type = %s AND id = %s", (_enc(rtype), _enc(rid))
        )
        return None if row is None else (int(row[0]), _dec(str(row[1])))

    def unpushed(self) -> int:
        """Resources whose current version no FHIR server has been sent yet."""
        row = self._one(
            "SELECT count(*) FROM fhir_resources r LEFT JOIN fhir_remote p ON p.type = r.type AND p.id = r.id"
            " WHERE p.version_id IS NULL OR p.version_id < r.version_id",
            (),
        )
        return int(row[0]) if row else 0

    def holders(self, rtype: str, value: str) -> list[tuple[str, str]]:
        """(id, system) of every identifier of ``rtype`` with this exact value, whatever its system."""
        rows = self._all(
            "SELECT id, system FROM fhir_tokens WHERE type = %s AND name = 'identifier' AND value = %s"
            " ORDER BY system, id",
            (_enc(rtype), _enc(value)),
        )
        return [(_dec(i), _dec(s)) for i, s in rows]

    def by_subject(self, rtype: str, subject: str, include_deleted: bool = True) -> list[dict[str, Any]]:
        """Every resource of ``rtype`` whose subject is the reference ``subject`` (``Patient/id``), in insertion
        order; with ``include_deleted`` those no search finds too (a deleted DocumentReference): a merge moves
        them all."""
        sql = (
            "SELECT r.json FROM fhir_resources r WHERE r.type = %s AND r.id IN"
            " (SELECT id FROM fhir_tokens WHERE type = %s AND name = 'subject' AND value = %s)"
        )
        args = [_enc(rtype), _enc(rtype), _enc(subject)]
        if not include_deleted:
            sql += " AND r.id NOT IN (SELECT id FROM fhir_tokens WHERE type = %s AND name = 'deleted')"
            args.append(_enc(rtype))
        return [json.loads(r[0]) for r in self._all(f"{sql} ORDER BY r.row_id", args)]

    def count_tagged(self, rtype: str, tag: dict[str, str], without: dict[str, str] | None = None) -> int:
        """Resources of ``rtype`` carrying the ``meta.tag`` ``tag`` (and not ``without``)."""
        tagged = "type = %s AND name = '_tag' AND system = %s AND value = %s"
        sql = f"SELECT count(DISTINCT id) FROM fhir_tokens WHERE {tagged}"
        args = [_enc(rtype), _enc(tag["system"]), _enc(tag["code"])]
        if without is not None:
            sql += f" AND id NOT IN (SELECT id FROM fhir_tokens WHERE {tagged})"
            args += [_enc(rtype), _enc(without["system"]), _enc(without["code"])]
        row = self._one(sql, args)
        return int(row[0]) if row else 0

    def count(self, rtype: str | None = None) -> int:
        if rtype is None:
            row = self._one("SELECT count(*) FROM fhir_resources", ())
        else:
            row = self._one("SELECT count(*) FROM fhir_resources WHERE type = %s", (_enc(rtype),))
        return int(row[0]) if row else 0

    def search(
        self, rtype: str, params: dict[str, str | list[str]], count: int = 20, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]:
        """Resources of ``rtype`` matching every parameter (a comma in a value means "or"; a parameter given
        several times, as a list, means "and", e.g. a date range); in insertion order.
        Tokens: ``system|value``, ``value`` (any system), ``|value`` (no system), ``system|`` (any value).
        The total and the page come from one statement: one snapshot."""
        where, args = search_where(rtype, params, count, offset, self.timezone, _enc)
        sql = (
            f"WITH m AS (SELECT r.row_id FROM fhir_resources r WHERE {_sql(where)}),"
            " page AS (SELECT row_id FROM m ORDER BY row_id LIMIT %s OFFSET %s)"
            " SELECT -1::bigint AS k, (SELECT count(*) FROM m) AS total, NULL::text AS json"
            " UNION ALL SELECT r.row_id, NULL, r.json FROM fhir_resources r JOIN page USING (row_id)"
            " ORDER BY 1"
        )
        rows = self._all(sql, [*args, count, offset])
        return int(rows[0][1]), [json.loads(r[2]) for r in rows[1:]]

    def withdrawn_binary(self, binary_id: str) -> bool:
        """Whether the document a Binary holds was deleted (PDSm: the document itself is no longer served)."""
        row = self._one(
            "SELECT 1 FROM fhir_tokens b JOIN fhir_tokens d ON d.type = b.type AND d.id = b.id AND d.name = 'deleted'"
            " WHERE b.type = 'DocumentReference' AND b.name = 'binary' AND b.value = %s LIMIT 1",
            (_enc(binary_id),),
        )
        return row is not None

    def document_of_binary(self, binary_id: str) -> dict[str, Any] | None:
        """The DocumentReference whose attachment is ``Binary/<binary_id>`` (the newest when several; deleted or
        not), None when none is: the ``binary`` token (indexed), then the resource by its key."""
        row = self._one(
            "SELECT r.json FROM fhir_tokens b JOIN fhir_resources r ON r.type = b.type AND r.id = b.id"
            " WHERE b.type = 'DocumentReference' AND b.name = 'binary' AND b.value = %s"
            " ORDER BY r.row_id DESC LIMIT 1",
            (_enc(binary_id),),
        )
        return None if row is None else json.loads(row[0])


def _token_rows(resource: dict[str, Any]) -> list[tuple[Any, ...]]:
    rtype, rid = _enc(resource["resourceType"]), _enc(resource["id"])
    return [(rtype, _text(name), _text(system), _text(value), rid) for name, system, value in _tokens(resource)]


def _upsert(conn: psycopg.Connection, resource: dict[str, Any], seq: int) -> bool:
    """The body of `PostgresFHIRStore.upsert`, inside its transaction: the row locked, then SQLite's rules."""
    rtype, rid = resource["resourceType"], resource["id"]
    key = (_enc(rtype), _enc(rid))
    while True:
        row = conn.execute(
            "SELECT version_id, seq, json FROM fhir_resources WHERE type = %s AND id = %s FOR UPDATE", key
        ).fetchone()
        if row is not None:
            break
        out, text, updated = _versioned(resource, 1)
        created = conn.execute(
            "INSERT INTO fhir_resources (type, id, version_id, last_updated, seq, json)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (type, id) DO NOTHING",
            (*key, 1, updated, seq, text),
        )
        if created.rowcount == 1:
            _index(conn, out)
            return True
        # Another node stored it meanwhile (and committed: the insert waited for it): lock it and compare.
    version, stored_seq, stored = row
    if seq and stored_seq and seq < stored_seq:
        return False
    if _content(json.loads(stored)) == _content(resource):
        if seq > stored_seq:
            conn.execute("UPDATE fhir_resources SET seq = %s WHERE type = %s AND id = %s", (seq, *key))
        return False
    out, text, updated = _versioned(resource, version + 1)
    conn.execute(
        "UPDATE fhir_resources SET version_id = %s, last_updated = %s, seq = GREATEST(seq, %s), json = %s"
        " WHERE type = %s AND id = %s",
        (version + 1, updated, seq, text, *key),
    )
    conn.execute("DELETE FROM fhir_tokens WHERE type = %s AND id = %s", key)
    _index(conn, out)
    return True


def _versioned(resource: dict[str, Any], version: int) -> tuple[dict[str, Any], str, str]:
    """The resource as stored (``meta.versionId``, ``meta.lastUpdated``), its JSON text and the time."""
    updated = _now()
    out = dict(resource)
    out["meta"] = {**(resource.get("meta") or {}), "versionId": str(version), "lastUpdated": updated}
    return out, json.dumps(out, ensure_ascii=False, separators=(",", ":")), updated


def _index(conn: psycopg.Connection, resource: dict[str, Any]) -> None:
    rows = _token_rows(resource)
    if rows:
        with conn.cursor() as cur:
            cur.executemany(_TOKEN_INSERT, rows)
