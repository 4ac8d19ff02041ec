"""What the HL7 v2 sender channels keep, on PostgreSQL (`traboule.stores.SenderState`, semantics of
`traboule.stores.sender_state.SQLiteSenderState`): the marks in `PostgresAppliedKeys` (consumer: the channel's
name) and, on the same connection, the tables ``hl7_known_orders (channel, accession, placer, filler, patient_id,
study_uid)`` and ``hl7_pending_documents (channel, document_id)``, created by the ``sender_state`` migrations.

* ``mark_done(..., clear_pending=...)`` deletes the pending row and inserts the mark in one transaction of that
  connection: both are kept or neither, as on SQLite.
* Every node reads the same rows: an order seen by node A fills the status message node B sends; a document node
  A could not deliver holds back its replacement on node B.
* Every write is one conditional statement (``ON CONFLICT``): two nodes marking one event at once get one True
  (the first mark is kept); two nodes recording one order keep the last. Two nodes sending the same event at once
  (a redelivery while the first delivery is in flight) may both send it: the at-least-once a crash between the
  acknowledgement and the mark gives too, which the receiver takes.

A connection found gone (a server restart, an administrator's ``pg_terminate_backend``) is closed and replaced, and
the call made once more on the new session: every call is a read or an idempotent write (``mark_done`` replayed
after its first try was kept says False, as for a mark another node made). Every use of the connection holds the
store's lock: the channels call it from worker threads. Text is stored through
`traboule.stores.postgres.encode_text` (no NUL in PostgreSQL text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psycopg

from traboule.stores.postgres import decode_text, encode_text, migrations
from traboule.stores.postgres.idempotency import PostgresAppliedKeys
from traboule.stores.postgres.pool import OwnSession
from traboule.stores.sender_state import KnownOrder

T = TypeVar("T")

COMPONENT = "sender_state"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE hl7_known_orders (
                channel TEXT COLLATE "C" NOT NULL,
                accession TEXT COLLATE "C" NOT NULL,
                placer TEXT NOT NULL,
                filler TEXT NOT NULL,
                patient_id TEXT NOT NULL,
                study_uid TEXT NOT NULL,
                updated TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (channel, accession)
            );
            CREATE TABLE hl7_pending_documents (
                channel TEXT COLLATE "C" NOT NULL,
                document_id TEXT COLLATE "C" NOT NULL,
                since TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (channel, document_id)
            );
            """,
        )
    ],
)


class PostgresSenderState(OwnSession):
    """The state of the sender channel ``channel`` in the database at ``url``; the schemas (``applied_keys``,
    ``sender_state``) are created or upgraded when it opens. Safe from worker threads: calls are serialised."""

    threads = True
    reconnect_event = "database.sender_state_reconnecting"

    def __init__(self, url: str, channel: str) -> None:
        self.url = url
        self._name = channel
        self.channel = encode_text(channel)
        self._open_session(COMPONENT)
        try:
            self.keys = PostgresAppliedKeys(self._db, self._name)
        except BaseException:
            self._db.close()
            raise

    def _replace(self) -> psycopg.Connection:
        """A new session, and the marks' store on it."""
        db = super()._replace()
        self.keys = PostgresAppliedKeys(db, self._name)
        return db

    def _marks(self, body: Callable[[PostgresAppliedKeys], T]) -> T:
        """``body(keys)`` on the current session (see `OwnSession._session`)."""
        return self._session(lambda _db: body(self.keys))

    def is_done(self, key: str) -> bool:
        return self._marks(lambda keys: keys.is_done(key))

    def detail(self, key: str) -> str | None:
        return self._marks(lambda keys: keys.detail(key))

    def mark_done(self, key: str, detail: str = "", *, clear_pending: str = "") -> bool:
        def mark(keys: PostgresAppliedKeys) -> bool:
            with keys.transaction() as db:
                if clear_pending:
                    db.execute(
                        "DELETE FROM hl7_pending_documents WHERE channel = %s AND document_id = %s",
                        (self.channel, encode_text(clear_pending)),
                    )
                return keys.mark_done(key, detail)

        return self._marks(mark)

    def remember_order(self, accession: str, order: KnownOrder) -> None:
        values = (accession, order.placer, order.filler, order.patient_id, order.study_uid)
        self._marks(
            lambda keys: keys.db.execute(
                "INSERT INTO hl7_known_orders (channel, accession, placer, filler, patient_id, study_uid)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (channel, accession) DO UPDATE SET"
                " placer = EXCLUDED.placer, filler = EXCLUDED.filler, patient_id = EXCLUDED.patient_id,"
                " study_uid = EXCLUDED.study_uid, updated = now()",
                (self.channel, *(encode_text(v) for v in values)),
            )
        )

    def known_order(self, accession: str) -> KnownOrder | None:
        row = self._marks(
            lambda keys: keys.db.execute(
                "SELECT placer, filler, patient_id, study_uid FROM hl7_known_orders"
                " WHERE channel = %s AND accession = %s",
                (self.channel, encode_text(accession)),
            ).fetchone()
        )
        return KnownOrder(*(decode_text(v) for v in row)) if row else None

    def set_pending(self, document_id: str) -> None:
        self._marks(
            lambda keys: keys.db.execute(
                "INSERT INTO hl7_pending_documents (channel, document_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (self.channel, encode_text(document_id)),
            )
        )

    def is_pending(self, document_id: str) -> bool:
        row = self._marks(
            lambda keys: keys.db.execute(
                "SELECT 1 FROM hl7_pending_documents WHERE channel = %s AND document_id = %s",
                (self.channel, encode_text(document_id)),
            ).fetchone()
        )
        return row is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()
