"""The audit messages waiting for the audit record repository: `AuditQueue`, ``audit.sqlite`` in the data folder.

Each engine process's audit trail appends the messages it encodes (`put`); the main process's relay sends the
oldest waiting (`take`), marks them delivered once the repository took them (`done`), and forgets delivered rows
after a while (`prune`). A message stays until it was delivered: the queue outlives a repository outage and an
engine restart (``Durability.POWER_LOSS``).

The file is local to a node, also when the engine keeps its other stores in PostgreSQL: each node sends its own
audit messages. The processes of one node share it (WAL, busy timeout, one short transaction per call). Calls
block: make them in a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from traboule.stores.sqlite import Durability, open_database

FILE = "audit.sqlite"
KEEP_DELIVERED_S = 3600.0  # how long `prune` keeps delivered rows by default

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_queue (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    outcome INTEGER NOT NULL,
    message BLOB NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS audit_queue_waiting ON audit_queue (id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS audit_queue_delivered ON audit_queue (delivered_at) WHERE delivered_at IS NOT NULL;
"""


@dataclass(frozen=True)
class Queued:
    """One waiting message: its row id, the event's time (epoch seconds), its outcome indicator, the XML."""

    id: int
    at: float
    outcome: int
    message: bytes


class AuditQueue:
    """The queue in the SQLite file ``path`` (usable from any thread: calls are serialised)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = open_database(path, Durability.POWER_LOSS, threads=True)
        self._db.executescript(SCHEMA)

    def put(self, messages: Sequence[tuple[float, int, bytes]]) -> None:
        """Append ``(at, outcome, xml)`` messages in one transaction."""
        if not messages:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO audit_queue (at, outcome, message) VALUES (?, ?, ?)",
                    [(float(at), int(outcome), bytes(xml)) for at, outcome, xml in messages],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def take(self, n: int, max_bytes: int = 0) -> list[Queued]:
        """The ``n`` oldest messages not delivered yet (they stay queued until `done`); with ``max_bytes``, only as
        many as fit in that many bytes of messages (the first one always)."""
        out: list[Queued] = []
        size = 0
        with self._lock:
            rows = self._db.execute(
                "SELECT id, at, outcome, message FROM audit_queue WHERE delivered_at IS NULL ORDER BY id LIMIT ?",
                (n,),
            )
            for row in rows:
                size += len(row[3])
                if max_bytes and out and size > max_bytes:
                    break
                out.append(Queued(row[0], row[1], row[2], bytes(row[3])))
        return out

    def done(self, ids: Sequence[int]) -> None:
        """Mark messages delivered."""
        if not ids:
            return
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "UPDATE audit_queue SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
                    [(now, i) for i in ids],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def depth(self) -> int:
        """Messages not delivered yet, from the ids (two index look-ups, whatever the backlog: no count): rows are
        appended in id order and delivered oldest first, so the waiting ones are the ids from the oldest waiting
        to the last."""
        with self._lock:
            oldest = self._db.execute("SELECT min(id) FROM audit_queue WHERE delivered_at IS NULL").fetchone()[0]
            if oldest is None:
                return 0
            last = self._db.execute("SELECT max(id) FROM audit_queue").fetchone()[0]
        return int(last) - int(oldest) + 1

    def prune(self, keep_s: float = KEEP_DELIVERED_S) -> int:
        """Forget the messages delivered more than ``keep_s`` seconds ago; how many."""
        with self._lock:
            return self._db.execute(
                "DELETE FROM audit_queue WHERE delivered_at IS NOT NULL AND delivered_at < ?", (time.time() - keep_s,)
            ).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
