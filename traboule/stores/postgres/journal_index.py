"""The journal's search index on PostgreSQL (`traboule.stores.journal_search.JournalSearch`), shared by every node.

Tables of their own beside the journal's, never an index added to ``journal_messages`` (each would be written by
every group commit): ``journal_search_keys`` (kind, value, message id; its primary key is the index a key search
reads newest first) and ``journal_search_mark`` (the last journal id indexed). Time, status, type and channel are
searched on ``journal_messages`` itself, through the indexes it has (``received``; ``status, id``; the primary key),
up to the mark: the entries not indexed yet are not found, as on SQLite.
Ids grow in commit order across nodes (the journal's group-commit lock), so a mark is enough to know what is left;
``index`` writes with ``ON CONFLICT DO NOTHING`` and moves the mark up only: two nodes indexing the same entries
write them once (the engine lets one node index at a time anyway, the ``journal-index`` lease).

Free text is a bounded scan of the raw messages the other filters select, as on SQLite (`SCAN_BUDGET` a call): a
trigram index (``pg_trgm``) would have to cover a copy of every raw message, as large as the journal again.
As on SQLite, searches select ids first and read raw messages by their sizes (``octet_length``), at most
``BATCH_BYTES`` at a time (a page, a scan's batch), and the indexer reads the first ``KEY_PREFIX`` bytes of each
message (``substring``); an MSH-10 longer than ``MAX_KEY`` is not indexed (nor could a B-tree row hold 8,000).
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from traboule.stores.journal import COLUMNS, JournalEntry, Query
from traboule.stores.journal_index import KIND, KIND_NAMES
from traboule.stores.journal_search import (
    KEY_PREFIX,
    MAX_KEY,
    MAX_LIMIT,
    SCAN_BUDGET,
    SearchPage,
    SearchQuery,
    byte_batches,
    keyed_prefix,
    normalized,
    page_ids,
    text_matches,
)
from traboule.stores.postgres import connect, decode_text, encode_text, migrations, redact
from traboule.stores.postgres.journal import COMPONENT as JOURNAL

__all__ = ["PostgresJournalSearch"]

COMPONENT = "journal_search"
BATCH = 500  # candidate entries (ids and raw message sizes) read at a time by a free-text search
FORGET_BATCH = 10_000  # keys of pruned entries deleted per `index` call
NARROW = 100_000  # entries: a time range holding fewer is read through the time index

migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE journal_search_keys (
                kind SMALLINT NOT NULL,  -- 1 MSH-10, 2 accession, 3 patient (KIND)
                value TEXT NOT NULL,
                message_id BIGINT NOT NULL,
                PRIMARY KEY (kind, value, message_id)
            );
            CREATE INDEX journal_search_keys_message ON journal_search_keys (message_id);
            CREATE TABLE journal_search_mark (
                one INT PRIMARY KEY CHECK (one = 1),
                last_id BIGINT NOT NULL
            );
            """,
        ),
    ],
)

_COLUMNS = ", ".join(f"m.{c}" for c in ("id", *COLUMNS))


class PostgresJournalSearch:
    """The search index of the PostgreSQL journal at ``url`` (blocking calls, serialised by a lock)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        try:
            self._db = connect(url)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"database {redact(url)}: {exc}".strip()) from exc
        try:
            migrations.check(self._db, JOURNAL)
            migrations.check(self._db, COMPONENT)
        except BaseException:
            self._db.close()
            raise

    def _conn(self) -> psycopg.Connection:
        if self._db.closed:
            self._db = connect(self.url)
        return self._db

    def search(self, query: SearchQuery, *, before: int = 0, limit: int = 50) -> SearchPage:
        q = normalized(query)
        limit = max(1, min(int(limit), MAX_LIMIT))
        found: list[JournalEntry] = []
        with self._lock:
            sql, args = _candidates(q, self._narrow(q.since, q.until))
            mark = self._conn().execute("SELECT last_id FROM journal_search_mark").fetchone()
            upper = min(int(before) if before and before > 0 else (1 << 62), (int(mark[0]) if mark else 0) + 1)
            if q.text:
                matched, go_on = self._scan(sql, args, upper, q.text, limit)
                if len(matched) > limit:  # the scan stopped at a match past the page: on below the page's last
                    matched, go_on = matched[:limit], matched[limit - 1]
                return SearchPage(found, self._page(matched, limit, found) or go_on)
            while True:
                # prepare=False: planned for these values (a generic plan walks the whole journal for a day)
                ids = [r[0] for r in self._conn().execute(sql, (*args, upper, limit + 1), prepare=False)]
                following = self._page(ids, limit, found)
                if following:
                    return SearchPage(found, following)
                if len(ids) <= limit:
                    return SearchPage(found, 0)
                upper = ids[-1]  # pruned entries made the page short: on below the last id read

    def _scan(self, sql: str, args: list[Any], upper: int, text: str, limit: int) -> tuple[list[int], int]:
        """The candidates of ``sql`` below ``upper`` whose raw message holds ``text`` (their raw messages read
        `BATCH_BYTES` at a time), until more than ``limit`` match or `SCAN_BUDGET` entries were read; and the id
        the scan goes on below when the budget ran out (else 0)."""
        db = self._conn()
        matched: list[int] = []
        scanned = 0
        while True:
            ids = [r[0] for r in db.execute(sql, (*args, upper, BATCH), prepare=False)]
            if not ids:
                return matched, 0
            sizes = self._sizes(ids)
            for batch in byte_batches([(i, sizes[i]) for i in ids if i in sizes]):
                rows = db.execute("SELECT id, raw FROM journal_messages WHERE id = ANY(%s)", (batch,)).fetchall()
                raws = {int(r[0]): bytes(r[1]) for r in rows}
                matched += [i for i in batch if i in raws and text_matches(raws[i], text)]
                del rows, raws
                if len(matched) > limit:
                    return matched, 0
            upper = int(ids[-1])
            scanned += len(ids)
            if scanned >= SCAN_BUDGET:
                return matched, upper

    def _sizes(self, ids: list[int]) -> dict[int, int]:
        """The raw message sizes of the entries still in the journal (``octet_length`` reads no message)."""
        if not ids:
            return {}
        rows = self._conn().execute(
            "SELECT id, octet_length(raw) FROM journal_messages WHERE id = ANY(%s)", (list(ids),)
        )
        return {int(r[0]): int(r[1] or 0) for r in rows}

    def _page(self, ids: list[int], limit: int, found: list[JournalEntry]) -> int:
        """Add the entries of ``ids`` (newest first) to ``found``, up to ``limit`` and `BATCH_BYTES` of raw; the id
        the next page starts below when it stopped with ids left, else 0."""
        sizes = self._sizes(ids)
        taken, stopped = page_ids(ids, sizes, limit - len(found), sum(len(e.raw) for e in found))
        if taken:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM journal_messages m WHERE m.id = ANY(%s)", (taken,))
            entries = {int(r[0]): _entry(r) for r in rows}
            found += [entries[i] for i in taken if i in entries]
        return found[-1].id if stopped and found else 0

    def _narrow(self, since: str, until: str) -> bool:
        """Whether a time range holds fewer than `NARROW` entries, guessed from the ids of its first and last entries
        by time (two reads of the time index). Either plan gives the same result; the guess picks the faster."""
        if not since and not until:
            return False
        db = self._conn()
        first = db.execute(
            "SELECT id FROM journal_messages WHERE received >= %s ORDER BY received LIMIT 1", (since,)
        ).fetchone()
        if until:
            last = db.execute(
                "SELECT id FROM journal_messages WHERE received < %s ORDER BY received DESC LIMIT 1", (until,)
            ).fetchone()
        else:
            last = db.execute("SELECT max(id) FROM journal_messages").fetchone()
        return first is None or not last or last[0] is None or abs(int(last[0]) - int(first[0])) < NARROW

    def keys_of(self, message_id: int) -> dict[str, list[str]]:
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT kind, value FROM journal_search_keys WHERE message_id = %s"
                    " AND kind IN (2, 3) ORDER BY kind, value",
                    (message_id,),
                )
                .fetchall()
            )
        keys: dict[str, list[str]] = {"accession": [], "patient": []}
        for kind, value in rows:
            keys[KIND_NAMES[kind]].append(decode_text(value))
        return keys

    def last_indexed(self) -> int:
        with self._lock:
            row = self._conn().execute("SELECT last_id FROM journal_search_mark").fetchone()
        return int(row[0]) if row else 0

    def unindexed(self, limit: int = 1000) -> list[JournalEntry]:
        mark = self.last_indexed()
        columns = ", ".join(f"substring(m.raw from 1 for {KEY_PREFIX})" if c == "raw" else f"m.{c}" for c in COLUMNS)
        with self._lock:
            db = self._conn()
            sizes = db.execute(
                "SELECT id, octet_length(raw) FROM journal_messages WHERE id > %s ORDER BY id LIMIT %s", (mark, limit)
            ).fetchall()
            batches = byte_batches([(int(i), min(int(n or 0), KEY_PREFIX)) for i, n in sizes])
            upto = next(batches, [mark])[-1]
            rows = db.execute(
                f"SELECT m.id, {columns}, octet_length(m.raw) FROM journal_messages m"
                " WHERE m.id > %s AND m.id <= %s ORDER BY m.id",
                (mark, upto),
            ).fetchall()
        entries = [_entry(r[:-1]) for r in rows]
        for entry, row in zip(entries, rows, strict=True):
            entry.raw = keyed_prefix(entry.raw, int(row[-1] or 0))
        return entries

    def index(self, done: list[tuple[int, dict[str, list[str]]]]) -> None:
        self._write(done)

    def skip(self, message_id: int) -> None:
        self._write([(message_id, {})], bare=True)

    def lag(self) -> int:
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT COALESCE((SELECT MAX(id) FROM journal_messages), 0)"
                    " - COALESCE((SELECT last_id FROM journal_search_mark), 0)"
                )
                .fetchone()
            )
        return max(0, int(row[0])) if row else 0

    def _write(self, done: list[tuple[int, dict[str, list[str]]]], bare: bool = False) -> None:
        """`index`; ``bare``: without the entries' MSH-10 (`skip`)."""
        if not done:
            return
        upto = max(i for i, _ in done)
        low = min(i for i, _ in done) - 1
        kinds, values, ids = [], [], []
        for message_id, by_kind in done:
            for kind, found in by_kind.items():
                for value in found if kind in KIND else ():
                    kinds.append(KIND[kind])
                    values.append(encode_text(value))
                    ids.append(message_id)
        with self._lock:
            db = self._conn()
            with db.transaction():
                db.execute(
                    "INSERT INTO journal_search_keys (kind, value, message_id)"
                    " SELECT * FROM unnest(%s::int2[], %s::text[], %s::bigint[]) ON CONFLICT DO NOTHING",
                    (kinds, values, ids),
                )
                if not bare:  # an MSH-10 as bounded as the other keys (a B-tree row holds about 2,700 bytes)
                    db.execute(
                        "INSERT INTO journal_search_keys (kind, value, message_id)"
                        " SELECT 1, control_id, id FROM journal_messages"
                        " WHERE id > %s AND id <= %s AND control_id <> '' AND length(control_id) <= %s"
                        " ON CONFLICT DO NOTHING",
                        (low, upto, MAX_KEY),
                    )
                db.execute(
                    "INSERT INTO journal_search_mark (one, last_id) VALUES (1, %s) ON CONFLICT (one)"
                    " DO UPDATE SET last_id = GREATEST(journal_search_mark.last_id, EXCLUDED.last_id)",
                    (upto,),
                )
                db.execute(  # the keys of entries the journal pruned since, a batch at a time
                    "DELETE FROM journal_search_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM journal_search_keys"
                    " WHERE message_id < (SELECT COALESCE(MIN(id), 0) FROM journal_messages) LIMIT %s))",
                    (FORGET_BATCH,),
                )

    def size(self) -> int:
        """The index's size in the database, in bytes (its tables and their indexes)."""
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT pg_total_relation_size('journal_search_keys')"
                    " + pg_total_relation_size('journal_search_mark')"
                )
                .fetchone()
            )
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _candidates(q: SearchQuery, narrow: bool = False) -> tuple[str, list[Any]]:
    """The SQL of the ids of the entries matching every filter but the text, newest first; its last two parameters
    are the id bound and the count. ``narrow``: a time range of few entries, read through the time index and sorted
    (``id + 0`` keeps the planner off the primary key: walking it down from the newest, it reckons a day's entries
    spread over the whole journal when they lie together)."""
    where, args = Query(statuses=q.statuses, types=q.types, channels=q.channels, since=q.since, until=q.until).where()
    where = "TRUE" if where == "1" else where.replace("?", "%s")
    args = [encode_text(a) if isinstance(a, str) else a for a in args]
    keys = [
        (KIND[k], v) for k, v in (("control_id", q.control_id), ("accession", q.accession), ("patient", q.patient)) if v
    ]
    if not keys:
        order = "m.id + 0" if narrow else "m.id"
        return (
            f"SELECT m.id FROM journal_messages m WHERE {where} AND m.id < %s ORDER BY {order} DESC LIMIT %s",
            args,
        )
    (kind, value), others = keys[0], keys[1:]
    extra = "".join(
        " AND EXISTS (SELECT 1 FROM journal_search_keys o WHERE o.kind = %s AND o.value = %s"
        " AND o.message_id = k.message_id)"
        for _ in others
    )
    sql = (
        "SELECT m.id FROM journal_search_keys k JOIN journal_messages m ON m.id = k.message_id"
        f" WHERE k.kind = %s AND k.value = %s{extra} AND {where} AND k.message_id < %s"
        " ORDER BY k.message_id DESC LIMIT %s"
    )
    return sql, [kind, encode_text(value), *(x for k, v in others for x in (k, encode_text(v))), *args]


def _entry(row: tuple[Any, ...]) -> JournalEntry:
    data = {k: decode_text(v) if isinstance(v, str) else v for k, v in zip(("id", *COLUMNS), row, strict=True)}
    data["raw"] = bytes(data["raw"])
    return JournalEntry(**data)
