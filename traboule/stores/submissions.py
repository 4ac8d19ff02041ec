"""The documents an ``xds`` channel submitted to an XDS.b registry (the DMP): each version's entryUUID, its status
and the replacement chain (`traboule.stores.SubmissionStore`).

A version's entryUUID is stored before its first attempt (``sending``), so that a retry resends the same entry and
a replacement or deletion names the one registered. Statuses: ``sending`` → ``registered`` (→ ``replaced`` by a
newer version, or ``deleted``), ``refused`` (the registry refused it for good), ``skipped`` (not for the DMP).

`SQLiteSubmissions` keeps the table ``entries`` of ``<data_dir>/<channel>.sqlite`` as earlier versions wrote it
(``Durability.POWER_LOSS``). ``claim`` keeps a document to one caller of the process at a time, whichever store
of the file it calls (on SQLite the engine is one node and a channel runs in one process);
`traboule.stores.postgres.submissions` keeps the same rows, and claims, for every node. Both are called from
worker threads (the channel keeps its store's statements off the event loop): a store serialises its calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from traboule.stores.sqlite import Durability, open_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    unique_id TEXT PRIMARY KEY,         -- XDSDocumentEntry.uniqueId (the CDA id)
    entry_uuid TEXT NOT NULL UNIQUE,    -- the entryUUID traboule gave it
    set_id TEXT NOT NULL,
    status TEXT NOT NULL,               -- sending | registered | replaced | deleted | refused | skipped
    submission_set TEXT NOT NULL DEFAULT '',  -- uniqueId of the SubmissionSet that registered it
    updated TEXT NOT NULL
);
"""
SKIPPED_PREFIX = "skipped:"  # the entryUUID of a version never sent (its uniqueId follows)


@dataclass(frozen=True)
class Submission:
    """A document version as submitted: its uniqueId, the entryUUID it was given, its status."""

    unique_id: str
    entry_uuid: str
    status: str


class Claims:
    """The documents claimed by the callers of one process (a claim is kept to one of them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def take(self, unique_id: str) -> bool:
        with self._lock:
            if unique_id in self._held:
                return False
            self._held.add(unique_id)
            return True

    def release(self, unique_id: str) -> None:
        with self._lock:
            self._held.discard(unique_id)


_FILE_CLAIMS = Claims()  # the documents claimed through SQLite stores: "<file>|<uniqueId>"


class SQLiteSubmissions:
    """The submissions of one channel in the SQLite file at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.db = open_database(path, Durability.POWER_LOSS, threads=True)
        self.db.executescript(_SCHEMA)
        self._file = str(Path(path).resolve())
        self._lock = threading.RLock()  # the connection is used by one thread at a time

    def get(self, unique_id: str) -> Submission | None:
        with self._lock:
            row = self.db.execute(
                "SELECT unique_id, entry_uuid, status FROM entries WHERE unique_id = ?", (unique_id,)
            ).fetchone()
        return Submission(*row) if row else None

    @contextmanager
    def claim(self, unique_id: str) -> Iterator[bool]:
        key = f"{self._file}|{unique_id}"
        mine = _FILE_CLAIMS.take(key)
        try:
            yield mine
        finally:
            if mine:
                _FILE_CLAIMS.release(key)

    def begin(self, unique_id: str, entry_uuid: str, set_id: str) -> Submission:
        with self._lock:
            self.db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, 'sending', '', ?) ON CONFLICT(unique_id) DO NOTHING",
                (unique_id, entry_uuid, set_id, _now()),
            )
            found = self.get(unique_id)
        assert found is not None
        return found

    def skip(self, unique_id: str, set_id: str) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, 'skipped', '', ?) ON CONFLICT(unique_id) DO NOTHING",
                (unique_id, SKIPPED_PREFIX + unique_id, set_id, _now()),
            )

    def registered(self, unique_id: str, submission_set: str, replaced: str = "") -> None:
        with self._lock:
            self._registered(unique_id, submission_set, replaced)

    def _registered(self, unique_id: str, submission_set: str, replaced: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "UPDATE entries SET status = 'registered', submission_set = ?, updated = ? WHERE unique_id = ?",
                (submission_set, _now(), unique_id),
            )
            if replaced:
                self.db.execute(
                    "UPDATE entries SET status = 'replaced', updated = ? WHERE unique_id = ?", (_now(), replaced)
                )
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def deleted(self, unique_id: str) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE entries SET status = 'deleted', updated = ? WHERE unique_id = ?", (_now(), unique_id)
            )

    def refused(self, unique_id: str) -> bool:
        with self._lock:
            cur = self.db.execute(
                "UPDATE entries SET status = 'refused', updated = ? WHERE unique_id = ? AND status = 'sending'",
                (_now(), unique_id),
            )
            return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _now() -> str:
    return datetime.now().isoformat(timespec="milliseconds")
