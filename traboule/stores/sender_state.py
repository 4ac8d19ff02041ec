"""What a channel sending HL7 v2 messages (``hl7-status``, ``hl7-documents``) keeps: the marks of the events its
receiver accepted (`traboule.stores.idempotency`), and beside them, on the same connection, the orders it has
seen (to fill ORC-2 / ORC-3 / PID-3 of a status message as the RIS knows them) and the documents whose message
the receiver has not taken yet (their later versions wait) (`traboule.stores.SenderState`).

``mark_done(key, detail, clear_pending=document)`` forgets the pending document and marks the event in one
transaction: both are kept or neither, so a crash in between never leaves a sent document pending (which would
hold its later versions back) nor a pending one marked sent.

`SQLiteSenderState` keeps the tables ``applied``, ``orders (accession, placer, filler, patient_id, study_uid)`` and
``pending (document_id)`` of ``<data_dir>/<channel>.sqlite`` as earlier versions wrote them
(``Durability.POWER_LOSS``: a mark decides what is sent next); `traboule.stores.postgres.sender_state` keeps the
same rows for every node of a database.

``threads`` says whether a store may be called from worker threads (``asyncio.to_thread``; calls are then
serialised by the store): always on PostgreSQL; on SQLite when its connection was opened for threads (`open` does).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from traboule.stores.idempotency import AppliedKeys, Legacy

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    accession TEXT PRIMARY KEY,
    placer TEXT NOT NULL,
    filler TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    study_uid TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (document_id TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class KnownOrder:
    """An order as the RIS knows it, by accession number: placer and filler numbers (EI, HL7-escaped), patient
    identifier (CX, HL7-escaped) and Study Instance UID."""

    placer: str = ""
    filler: str = ""
    patient_id: str = ""
    study_uid: str = ""


class SQLiteSenderState:
    """The state of one sender channel on ``keys``' SQLite connection (``threads``: the connection was opened for
    worker threads)."""

    def __init__(self, keys: AppliedKeys, *, threads: bool = False) -> None:
        self.keys = keys
        self.db = keys.db
        self.threads = threads
        self._lock = threading.RLock()  # the connection is used by one thread at a time
        self.db.executescript(_SCHEMA)

    @classmethod
    def open(cls, path: str | Path, *, legacy: Sequence[Legacy] = ()) -> SQLiteSenderState:
        return cls(AppliedKeys.open(path, legacy=legacy, threads=True), threads=True)

    def is_done(self, key: str) -> bool:
        with self._lock:
            return self.keys.is_done(key)

    def detail(self, key: str) -> str | None:
        with self._lock:
            return self.keys.detail(key)

    def mark_done(self, key: str, detail: str = "", *, clear_pending: str = "") -> bool:
        with self._lock, self.keys.transaction():
            if clear_pending:
                self.db.execute("DELETE FROM pending WHERE document_id = ?", (clear_pending,))
            return self.keys.mark_done(key, detail)

    def remember_order(self, accession: str, order: KnownOrder) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?, ?) ON CONFLICT(accession) DO UPDATE SET"
                " placer = excluded.placer, filler = excluded.filler, patient_id = excluded.patient_id,"
                " study_uid = excluded.study_uid",
                (accession, order.placer, order.filler, order.patient_id, order.study_uid),
            )

    def known_order(self, accession: str) -> KnownOrder | None:
        with self._lock:
            row = self.db.execute(
                "SELECT placer, filler, patient_id, study_uid FROM orders WHERE accession = ?", (accession,)
            ).fetchone()
        return KnownOrder(*row) if row else None

    def set_pending(self, document_id: str) -> None:
        with self._lock:
            self.db.execute("INSERT OR IGNORE INTO pending VALUES (?)", (document_id,))

    def is_pending(self, document_id: str) -> bool:
        with self._lock:
            row = self.db.execute("SELECT 1 FROM pending WHERE document_id = ?", (document_id,)).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            self.keys.close()
