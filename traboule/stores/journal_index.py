"""The journal's search index on SQLite (`traboule.stores.journal_search.JournalSearch`): ``journal.index``.

A file of its own beside ``journal.sqlite``, not tables in it: the journal's group commit runs on the event loop's
thread and waits for SQLite's write lock, so an indexer writing into the journal's file would stall ingest for as
long as its transaction lasts; nor does the journal's table get the indexes a search needs (each would be written
by every append). The index is rebuilt from the journal (``Durability.CRASH``): deleting the file only makes the
indexer catch up again. Named ``journal.index``, not ``*.sqlite``: what takes every store of the data folder
(``traboule db migrate``, a backup of ``*.sqlite``) leaves out what it can rebuild.

* ``search_entries``: the searchable columns of each indexed entry (reception time, status, type, channel), indexed
  by time and by status; ``search_keys`` (kind, value, message id): MSH-10 (``control_id``), accession numbers
  (``accession``: accession, placer and filler order numbers, requested procedure ids) and patient identifiers
  (``patient``); ``search_mark``: the last journal id indexed.
* A search finds the ids in the index (a key first when one is asked for, else time, status or type) and reads the
  page's entries from the journal by id, on a read-only connection of its own, at most `BATCH_BYTES` of raw
  messages a page (their sizes are read first; a page of large messages ends early, with its ``next_before``).
* Free text is a scan of the raw messages of the entries the other filters select, newest first, bounded by
  `SCAN_BUDGET` entries per call and read `BATCH_BYTES` at a time (only the matching entries are then read whole):
  when the budget runs out the page holds what was found and ``next_before`` says where to go on. A trigram index
  (FTS5) would answer without a scan but costs several times the journal's raw size (see docs/performance.md);
  narrowing by time, type or status keeps the scan short.
* The indexer reads the first `KEY_PREFIX` bytes of each message (``substr``), `BATCH_BYTES` a batch at most. An
  MSH-10 longer than `MAX_KEY` is not indexed, as any other key.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Any

from traboule.stores.journal import COLUMNS, JournalEntry, Query
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
from traboule.stores.sqlite import Durability, open_database

__all__ = ["SQLiteJournalSearch"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS search_entries (
    id INTEGER PRIMARY KEY,
    received TEXT NOT NULL,
    status TEXT NOT NULL,
    message_type TEXT NOT NULL,
    channel TEXT NOT NULL
);
-- covering: a time range filtered by status, type or channel reads no table row
CREATE INDEX IF NOT EXISTS search_entries_received ON search_entries(received, status, message_type, channel);
CREATE INDEX IF NOT EXISTS search_entries_status ON search_entries(status, id);
CREATE TABLE IF NOT EXISTS search_keys (
    kind INTEGER NOT NULL,            -- 1 MSH-10, 2 accession, 3 patient (KIND)
    value TEXT NOT NULL,
    message_id INTEGER NOT NULL,
    PRIMARY KEY (kind, value, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_keys_message ON search_keys(message_id);
CREATE TABLE IF NOT EXISTS search_mark (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    last_id INTEGER NOT NULL
);
"""

BATCH = 500  # candidate entries whose raw message sizes a free-text search reads at a time
NARROW = 100_000  # entries: a time range holding fewer is read through the time index
KIND = {"control_id": 1, "accession": 2, "patient": 3}  # the key kinds as stored
KIND_NAMES = {code: name for name, code in KIND.items()}
FORGET_BATCH = 10_000  # index rows of pruned entries deleted per `index` call


class SQLiteJournalSearch:
    """The search index of the SQLite journal at ``journal_path``, kept in ``index_path``.

    Thread-safe: one lock serialises the calls (each is short); call them from a thread, not the event loop."""

    def __init__(self, index_path: str | Path, journal_path: str | Path) -> None:
        self.index_path = Path(index_path)
        self.journal_path = Path(journal_path)
        self._lock = threading.RLock()  # held by every use of either connection: `close` never cuts one short
        self._db = open_database(self.index_path, Durability.CRASH, threads=True)
        self._db.executescript(SCHEMA)
        self._journal: sqlite3.Connection | None = None

    # -- the journal (read-only) -------------------------------------------------------------------------------

    def _messages(self) -> sqlite3.Connection | None:
        """A read-only connection to the journal (None while it does not exist yet)."""
        if self._journal is None:
            try:
                self._journal = open_database(self.journal_path, Durability.READ_ONLY, threads=True)
            except FileNotFoundError:
                return None
        return self._journal

    def _entries(self, ids: list[int]) -> dict[int, JournalEntry]:
        db = self._messages()
        if db is None or not ids:
            return {}
        rows = db.execute(
            f"SELECT id, {', '.join(COLUMNS)} FROM messages WHERE id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
        return {int(r[0]): _entry(r) for r in rows}

    def _sizes(self, ids: list[int]) -> dict[int, int]:
        """The raw message sizes of the entries still in the journal (read from the row, not the message)."""
        db = self._messages()
        if db is None or not ids:
            return {}
        rows = db.execute(f"SELECT id, length(raw) FROM messages WHERE id IN ({', '.join('?' * len(ids))})", ids)
        return {int(r[0]): int(r[1] or 0) for r in rows}

    def _page(self, ids: list[int], limit: int, found: list[JournalEntry]) -> int:
        """Add the entries of ``ids`` (newest first) to ``found``, up to ``limit`` and `BATCH_BYTES` of raw; the id
        the next page starts below when it stopped with ids left, else 0."""
        sizes = self._sizes(ids)
        taken, stopped = page_ids(ids, sizes, limit - len(found), sum(len(e.raw) for e in found))
        entries = self._entries(taken)
        found += [entries[i] for i in taken if i in entries]
        return found[-1].id if stopped and found else 0

    # -- the protocol ------------------------------------------------------------------------------------------

    def search(self, query: SearchQuery, *, before: int = 0, limit: int = 50) -> SearchPage:
        q = normalized(query)
        limit = max(1, min(int(limit), MAX_LIMIT))
        upper = int(before) if before and before > 0 else (1 << 62)
        found: list[JournalEntry] = []
        with self._lock:
            sql, args = self._candidates(q)
            if q.text:  # the candidates up to the scan's budget (ids only), their raw messages read by byte batches
                ids = [r[0] for r in self._db.execute(sql, (*args, upper, SCAN_BUDGET))]
                go_on = ids[-1] if len(ids) == SCAN_BUDGET else 0
                matched = self._scan(ids, q.text, limit)
                if len(matched) > limit:  # the scan stopped at a match past the page: on below the page's last
                    matched, go_on = matched[:limit], matched[limit - 1]
                return SearchPage(found, self._page(matched, limit, found) or go_on)
            while True:
                ids = [r[0] for r in self._db.execute(sql, (*args, upper, limit + 1))]
                following = self._page(ids, limit, found)
                if following:
                    return SearchPage(found, following)
                if len(ids) <= limit:
                    return SearchPage(found, 0)
                upper = ids[-1]  # pruned entries made the page short: on below the last id read

    def _scan(self, ids: list[int], text: str, limit: int) -> list[int]:
        """The ids among ``ids`` whose raw message holds ``text``, read `BATCH_BYTES` at a time, until more than
        ``limit`` match."""
        db = self._messages()
        if db is None:
            return []
        matched: list[int] = []
        for at in range(0, len(ids), BATCH):
            chunk = ids[at : at + BATCH]
            sizes = self._sizes(chunk)
            for batch in byte_batches([(i, sizes[i]) for i in chunk if i in sizes]):
                rows = db.execute(f"SELECT id, raw FROM messages WHERE id IN ({', '.join('?' * len(batch))})", batch)
                raws = {int(r[0]): bytes(r[1]) for r in rows}
                matched += [i for i in batch if i in raws and text_matches(raws[i], text)]
                del rows, raws
                if len(matched) > limit:
                    return matched
        return matched

    def _candidates(self, q: SearchQuery) -> tuple[str, list[Any]]:
        """The SQL giving the ids (newest first) of the indexed entries matching every filter but the text: its
        last two parameters are the id bound and the count."""
        where, args = Query(
            statuses=q.statuses, types=q.types, channels=q.channels, since=q.since, until=q.until
        ).where()
        where = where.replace("received", "e.received")
        keys = [(KIND[k], v) for k, v in (("control_id", q.control_id), ("accession", q.accession),
                                          ("patient", q.patient)) if v]  # fmt: skip
        if not keys:
            hint = "INDEXED BY search_entries_received" if self._narrow(q.since, q.until) else ""
            return (
                f"SELECT e.id FROM search_entries e {hint} WHERE {where} AND e.id < ? ORDER BY e.id DESC LIMIT ?",
                args,
            )
        (kind, value), others = keys[0], keys[1:]
        extra = "".join(
            " AND EXISTS (SELECT 1 FROM search_keys o WHERE o.kind = ? AND o.value = ? AND o.message_id = k.message_id)"
            for _ in others
        )
        sql = (
            "SELECT k.message_id FROM search_keys k JOIN search_entries e ON e.id = k.message_id"
            f" WHERE k.kind = ? AND k.value = ?{extra} AND {where} AND k.message_id < ?"
            " ORDER BY k.message_id DESC LIMIT ?"
        )
        return sql, [kind, value, *(x for pair in others for x in pair), *args]

    def _narrow(self, since: str, until: str) -> bool:
        """Whether a time range holds few entries (`NARROW`), read from the ids of its first and last entries by
        time: then its entries are read through the time index and sorted, else the ids are walked down (newest
        first) and the range filters them. Either way the result is exact; the guess only picks the faster."""
        if not since and not until:
            return False
        first = self._db.execute(
            "SELECT id FROM search_entries INDEXED BY search_entries_received WHERE received >= ?"
            " ORDER BY received LIMIT 1",
            (since,),
        ).fetchone()
        last = self._db.execute(
            "SELECT id FROM search_entries INDEXED BY search_entries_received WHERE received < ?"
            " ORDER BY received DESC LIMIT 1",
            (until or "\uffff",),
        ).fetchone()
        if first is None or last is None:
            return True  # nothing in the range
        return abs(int(last[0]) - int(first[0])) < NARROW

    def keys_of(self, message_id: int) -> dict[str, list[str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, value FROM search_keys WHERE message_id = ? AND kind IN (2, 3) ORDER BY kind, value",
                (message_id,),
            ).fetchall()
        keys: dict[str, list[str]] = {"accession": [], "patient": []}
        for kind, value in rows:
            keys[KIND_NAMES[kind]].append(value)
        return keys

    def last_indexed(self) -> int:
        """The last journal id indexed (0: none)."""
        with self._lock:
            row = self._db.execute("SELECT last_id FROM search_mark").fetchone()
        return int(row[0]) if row else 0

    def unindexed(self, limit: int = 1000) -> list[JournalEntry]:
        with self._lock:  # a `close` from another thread waits: closing a connection in use may crash SQLite
            return self._unindexed(limit)

    def _unindexed(self, limit: int) -> list[JournalEntry]:
        db = self._messages()
        if db is None:
            return []
        mark = self.last_indexed()
        if mark and self._reused(db, mark):
            with self._lock:
                self._reset()
            mark = 0
        sizes = db.execute("SELECT id, length(raw) FROM messages WHERE id > ? ORDER BY id LIMIT ?", (mark, limit))
        batches = byte_batches([(int(i), min(int(n or 0), KEY_PREFIX)) for i, n in sizes.fetchall()])
        upto = next(batches, [mark])[-1]
        columns = ", ".join(f"substr(raw, 1, {KEY_PREFIX})" if c == "raw" else c for c in COLUMNS)
        rows = db.execute(
            f"SELECT id, {columns}, length(raw) FROM messages WHERE id > ? AND id <= ? ORDER BY id", (mark, upto)
        ).fetchall()
        entries = [_entry(r[:-1]) for r in rows]
        for entry, row in zip(entries, rows, strict=True):
            entry.raw = keyed_prefix(entry.raw, int(row[-1] or 0))
        return entries

    def _reused(self, db: sqlite3.Connection, mark: int) -> bool:
        """Whether the journal gave indexed ids to other entries: emptied (pruned to nothing, replaced), SQLite
        numbers its entries from its highest id again. Seen on the last entry indexed or, pruned, the oldest one."""
        row = db.execute("SELECT id, received FROM messages WHERE id = ?", (mark,)).fetchone()
        if row is None:
            row = db.execute("SELECT id, received FROM messages ORDER BY id LIMIT 1").fetchone()
            if row is None or row[0] > mark:
                return False  # empty, or only entries above the mark: none reuses an indexed id
        with self._lock:
            indexed = self._db.execute("SELECT received FROM search_entries WHERE id = ?", (row[0],)).fetchone()
        return indexed is None or indexed[0] != row[1]

    def _reset(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("search_entries", "search_keys", "search_mark"):
                self._db.execute(f"DELETE FROM {table}")
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def index(self, done: list[tuple[int, dict[str, list[str]]]]) -> None:
        self._write(done)

    def skip(self, message_id: int) -> None:
        self._write([(message_id, {})], bare=message_id)

    def lag(self) -> int:
        with self._lock:
            db = self._messages()
            if db is None:
                return 0
            (last,) = db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
            return max(0, int(last) - self.last_indexed())

    def _write(self, done: list[tuple[int, dict[str, list[str]]]], bare: int = 0) -> None:
        """`index`; ``bare``: an entry indexed without its MSH-10 (`skip`)."""
        if not done:
            return
        with self._lock:
            self._write_locked(done, bare)

    def _write_locked(self, done: list[tuple[int, dict[str, list[str]]]], bare: int) -> None:
        db = self._messages()
        if db is None:
            return
        upto = max(i for i, _ in done)
        with self._lock:
            row = self._db.execute("SELECT last_id FROM search_mark").fetchone()
            mark = int(row[0]) if row else 0
            # Every entry up to the new mark gets its searchable columns, whether or not it had keys.
            low = min(mark, min(i for i, _ in done) - 1)
            entries = db.execute(
                "SELECT id, received, status, message_type, channel, control_id FROM messages"
                " WHERE id > ? AND id <= ? ORDER BY id",
                (low, upto),
            ).fetchall()
            (oldest,) = db.execute("SELECT COALESCE(MIN(id), 0) FROM messages").fetchone()
            keys = [
                (KIND[k], v, i) for i, by_kind in done for k, values in by_kind.items() if k in KIND for v in values
            ]
            keys += [
                (KIND["control_id"], r[5], r[0]) for r in entries if r[5] and len(r[5]) <= MAX_KEY and bare != r[0]
            ]
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO search_entries (id, received, status, message_type, channel)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [r[:5] for r in entries],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO search_keys (kind, value, message_id) VALUES (?, ?, ?)", keys
                )
                self._db.execute(
                    "INSERT INTO search_mark (one, last_id) VALUES (1, ?)"
                    " ON CONFLICT (one) DO UPDATE SET last_id = max(last_id, excluded.last_id)",
                    (upto,),
                )
                if oldest:  # entries the journal pruned since: a batch at a time
                    self._forget_below(int(oldest))
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def _forget_below(self, oldest: int) -> None:
        gone = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM search_entries WHERE id < ? ORDER BY id LIMIT ?", (oldest, FORGET_BATCH)
            )
        ]
        if gone:
            self._db.execute("DELETE FROM search_entries WHERE id <= ?", (gone[-1],))
            self._db.execute("DELETE FROM search_keys WHERE message_id <= ?", (gone[-1],))

    def size(self) -> int:
        """The index's size on disk, in bytes (its file and its write-ahead log)."""
        return sum(p.stat().st_size for p in (self.index_path, Path(f"{self.index_path}-wal")) if p.exists())

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._journal is not None:
                self._journal.close()
                self._journal = None


def _entry(row: sqlite3.Row | tuple[Any, ...]) -> JournalEntry:
    data = dict(zip(("id", *COLUMNS), row, strict=True))
    data["raw"] = bytes(data["raw"])
    return JournalEntry(**data)
