"""The reports store on PostgreSQL: the documents, their versions and the reports waiting for their study, shared by
every engine node of a channel.

`PostgresReportStorage` implements `traboule.stores.reports.ReportStorage`; the rules (the CDA, its validation, the
version numbers, the reports held for their study) are `traboule.stores.reports.ReportPublisher`'s, the same on
both backends: the factory gives ``ReportPublisher(mapping, PostgresReportStorage(url, channel), ...)``.

* Tables ``report_channels`` (the last set number per channel), ``report_sets``, ``report_documents`` (the
  ``Document`` event as JSON without its content, the CDA itself as ``bytea``), ``report_messages``,
  ``report_studies``, ``report_orders``, ``report_performed`` and ``report_waiting``, created by the ``reports``
  migrations (`traboule.stores.postgres.migrations`). Every row carries its channel: the nodes running channel
  ``ris-orders`` share its rows, as one node shares ``ris-orders.reports.sqlite``. A waiting report's number ``n``
  is unique in the database (``traboule reports publish N`` names it on any node).
* Concurrency between nodes: row locks and unique constraints, no SERIALIZABLE. Every write of a set's outcome (a
  version, a deletion, a waiting report, a withdrawal, a discard) locks the set's row (``SELECT ... FOR UPDATE`` on
  ``report_sets``) and, for a version, checks in that transaction that the set's current version is still the one
  the document was built on, and that the message's waiting row (if any) still waits; otherwise nothing is written
  and `ReportConflict` makes the publisher prepare the report again from what the other node stored (the same
  message handled by two nodes at once: the retry finds the first node's document). The unique keys (channel and
  message key of ``report_waiting``, channel and document id) are the backstop: a violation is a `ReportConflict`
  too (the retry finds the report held, or the document published). So two nodes never number the same version,
  never lose one, and a waiting report is published once. A new set takes the next number under the lock of its
  channel's ``report_channels`` row. Operator asks are handed out by one ``UPDATE ... RETURNING`` (one node each),
  and so are the outcomes to write into journal entries (``unnoted``: claimed for `NOTING` seconds by the node
  that listed them). A deadlock or a serialisation failure between nodes is retried whole.
* One connection per store (autocommit; each method one transaction), serialised by a lock; reopened when the
  server restarted. PostgreSQL text cannot hold a NUL character: every text column is escaped by
  `traboule.stores.postgres.encode_text` (JSON needs none: ``json.dumps`` escapes control characters).
"""

from __future__ import annotations

import base64
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors

from traboule import model
from traboule.errors import ReportConflict
from traboule.stores.postgres import connect, decode_text, encode_text, redact
from traboule.stores.postgres.migrations import check, register
from traboule.stores.reports import (
    DEAD,
    KEPT,
    LISTED,
    UNNOTED,
    Discarded,
    _counts,
    _received,
    _undeleted,
)

COMPONENT = "reports"

_MIGRATIONS = [
    (
        1,
        """
CREATE TABLE report_channels (
    channel text COLLATE "C" PRIMARY KEY,
    last_set bigint NOT NULL DEFAULT 0          -- the number of the channel's latest document set
);
CREATE TABLE report_sets (
    channel text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    set_key text COLLATE "C" NOT NULL,          -- accession number, or the set id of a ready CDA
    set_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (channel, set_key),
    UNIQUE (channel, n)
);
CREATE INDEX report_sets_id ON report_sets (channel, set_id);
CREATE TABLE report_documents (
    channel text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    set_id text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    status text COLLATE "C" NOT NULL,           -- current | superseded | deleted
    created timestamptz NOT NULL DEFAULT now(),
    document text NOT NULL,                     -- the Document event (JSON) without its content
    content bytea NOT NULL,                     -- the CDA
    PRIMARY KEY (channel, id)
);
CREATE INDEX report_documents_set ON report_documents (channel, set_id, version);
CREATE TABLE report_messages (
    n bigint GENERATED ALWAYS AS IDENTITY,
    channel text COLLATE "C" NOT NULL,
    message_key text COLLATE "C" NOT NULL,      -- idempotency key of a report message
    document_id text COLLATE "C" NOT NULL,      -- the document version it made
    action text COLLATE "C" NOT NULL,           -- publish | replace | delete
    node text COLLATE "C" NOT NULL DEFAULT '',  -- the node that prepared it (``reconcile``)
    prepared timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, message_key)
);
CREATE INDEX report_messages_recent ON report_messages (channel, n);
CREATE TABLE report_studies (
    n bigint GENERATED ALWAYS AS IDENTITY,      -- the order they were first stored (the latest first)
    channel text COLLATE "C" NOT NULL,
    uid text COLLATE "C" NOT NULL,
    accession text COLLATE "C" NOT NULL,
    study text NOT NULL,
    PRIMARY KEY (channel, uid)
);
CREATE INDEX report_studies_accession ON report_studies (channel, accession);
CREATE TABLE report_orders (
    channel text COLLATE "C" NOT NULL,
    accession text COLLATE "C" NOT NULL,
    orders text NOT NULL,
    PRIMARY KEY (channel, accession)
);
CREATE TABLE report_performed (                 -- MPPS instances with performed series and instances
    channel text COLLATE "C" NOT NULL,
    uid text COLLATE "C" NOT NULL,
    study_uid text COLLATE "C" NOT NULL,
    accession text COLLATE "C" NOT NULL,
    step text NOT NULL,
    PRIMARY KEY (channel, uid)
);
CREATE INDEX report_performed_study ON report_performed (channel, study_uid);
CREATE INDEX report_performed_accession ON report_performed (channel, accession);
CREATE TABLE report_waiting (
    n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel text COLLATE "C" NOT NULL,
    message_key text COLLATE "C" NOT NULL,      -- idempotency key of the report message (its journal entry)
    set_key text COLLATE "C" NOT NULL,
    accession text COLLATE "C" NOT NULL,
    study_uid text COLLATE "C" NOT NULL,
    received text NOT NULL,                     -- ISO 8601 UTC
    deadline double precision NOT NULL,         -- epoch seconds: expired after
    status text COLLATE "C" NOT NULL,           -- waiting | published | superseded | withdrawn | expired | invalid
    reason text NOT NULL DEFAULT '',
    superseded_by text COLLATE "C" NOT NULL DEFAULT '',
    document_id text COLLATE "C" NOT NULL DEFAULT '',
    journal_id bigint NOT NULL DEFAULT 0,
    noted integer NOT NULL DEFAULT 0,           -- its last outcome is written to its journal entry
    requested integer NOT NULL DEFAULT 0,       -- an operator asked for it to be published now
    report text NOT NULL,                       -- the canonical Report (JSON)
    remark text NOT NULL DEFAULT '',            -- why a waiting report still waits (a study of another patient)
    noting_by text COLLATE "C" NOT NULL DEFAULT '', -- the store (node) that listed its outcome to note last
    noting_until double precision NOT NULL DEFAULT 0, -- epoch seconds: no other node lists it before
    node text COLLATE "C" NOT NULL DEFAULT '',  -- the node that prepared it (``reconcile``)
    prepared timestamptz NOT NULL DEFAULT now(),
    UNIQUE (channel, message_key)
);
CREATE INDEX report_waiting_status ON report_waiting (channel, status, n);
CREATE INDEX report_waiting_set ON report_waiting (channel, set_key, status);
CREATE INDEX report_waiting_accession ON report_waiting (channel, status, accession);
CREATE INDEX report_waiting_study ON report_waiting (channel, status, study_uid);
CREATE INDEX report_waiting_deadline ON report_waiting (channel, status, deadline);
CREATE INDEX report_waiting_superseded ON report_waiting (channel, superseded_by) WHERE superseded_by != '';
CREATE INDEX report_waiting_to_note ON report_waiting (channel, n)
    WHERE noted = 0 AND (status != 'waiting' OR remark != '');
CREATE INDEX report_waiting_requested ON report_waiting (channel, n) WHERE requested = 1;
""",
    ),
    # The console's documents page finds the message that made each document shown (its DRIMbox feed rows).
    (2, "CREATE INDEX report_messages_document ON report_messages (channel, document_id);"),
]
register(COMPONENT, _MIGRATIONS)

ORPHANED = 600.0  # seconds after which another node's unjournaled preparation is undone by ``reconcile``
NOTING = 30.0  # seconds an outcome listed by ``unnoted`` is left to the store (node) that listed it
_RETRIES = 5  # attempts of a write that lost a deadlock or a serialisation conflict to another node
_CHUNK = 1000  # values per ``= ANY(...)`` lookup
_TEXT = frozenset({"message_key", "status", "accession", "study_uid", "reason", "document_id", "superseded_by",
                   "remark", "received"})  # fmt: skip

_enc, _dec = encode_text, decode_text  # NUL and \x01 escaped: see `traboule.stores.postgres.encode_text`

T = TypeVar("T")


class PostgresReportStorage:
    """The reports tables of channel ``channel`` in the PostgreSQL database at ``url``, shared by every node that
    runs the channel; the schema is created or upgraded on open."""

    def __init__(self, url: str, channel: str, *, node: str = "") -> None:
        """``node``: this engine node, the same across its restarts (default: the host name)."""
        self.url = url
        self.channel = channel
        self.node = _enc(node or socket.gethostname())
        self.path = f"{redact(url)} (channel {channel})"
        self._ch = _enc(channel)
        self._me = uuid.uuid4().hex  # this store, in the claims of ``unnoted``
        self._lock = threading.RLock()
        self._closed = False
        self._conn = connect(url)
        try:
            check(self._conn, COMPONENT)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    # -- connection ----------------------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection:
        if self._closed:
            raise RuntimeError("the reports store is closed")
        if self._conn.broken or self._conn.closed:
            self._conn = connect(self.url)  # the server restarted: a new session
        return self._conn

    def _write(self, body: Callable[[psycopg.Connection], T]) -> T:
        """``body`` in one transaction, retried whole after a deadlock or a serialisation failure with another
        node; a unique key taken meanwhile is a `ReportConflict`."""
        for attempt in range(1, _RETRIES + 1):
            try:
                with self._lock:
                    conn = self._connection()
                    with conn.transaction():
                        return body(conn)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * attempt)
            except errors.UniqueViolation as exc:
                raise ReportConflict(f"taken by another node: {exc.diag.constraint_name}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _one(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            return self._connection().execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    # -- catalog sources -----------------------------------------------------------------------------------------

    def remember(
        self,
        orders: list[tuple[str, dict[str, Any]]],
        studies: list[tuple[str, str, str]],
        steps: list[tuple[str, str, str, str]],
        merge: Callable[[Any, Any], Any],
    ) -> None:
        ch = self._ch
        # One lock order on every node (sorted keys): two batches naming the same orders never deadlock.
        order_rows = sorted(((_enc(a), s) for a, s in orders), key=lambda r: r[0])
        study_rows = sorted((ch, _enc(u), _enc(a), text) for u, a, text in studies)
        step_rows = sorted((ch, _enc(u), _enc(s), _enc(a), text) for u, s, a, text in steps)

        def body(conn: psycopg.Connection) -> None:
            # The batch's orders merged with the stored ones under their row locks: one read of them all, the
            # updates of those stored (pipelined), one insert of the others; an accession another node inserted
            # meanwhile (not inserted here) is read, locked and merged again.
            pending: dict[str, list[dict[str, Any]]] = {}
            for accession, summary in order_rows:
                pending.setdefault(accession, []).append(summary)
            while pending:
                stored = {
                    accession: json.loads(text)
                    for accession, text in conn.execute(
                        "SELECT accession, orders FROM report_orders WHERE channel = %s AND accession = ANY(%s)"
                        " ORDER BY accession FOR UPDATE",
                        (ch, list(pending)),
                    )
                }
                merged = {}
                for accession, summaries in pending.items():
                    current = stored.get(accession) or {}
                    for summary in summaries:
                        current = merge(current, summary) if current else summary
                    merged[accession] = json.dumps(current, ensure_ascii=False)
                old = [a for a in pending if a in stored]
                if old:  # one statement per row (its key's index), sent together
                    with conn.cursor() as cur:
                        cur.executemany(
                            "UPDATE report_orders SET orders = %s WHERE channel = %s AND accession = %s",
                            [(merged[a], ch, a) for a in old],
                        )
                new = [a for a in pending if a not in stored]
                inserted: set[str] = set()
                if new:
                    inserted = {
                        row[0]
                        for row in conn.execute(
                            "INSERT INTO report_orders (channel, accession, orders)"
                            " SELECT %s, a, o FROM unnest(%s::text[], %s::text[]) AS u(a, o)"
                            " ON CONFLICT DO NOTHING RETURNING accession",
                            (ch, new, [merged[a] for a in new]),
                        )
                    }
                pending = {a: pending[a] for a in new if a not in inserted}
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO report_studies (channel, uid, accession, study) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (channel, uid) DO UPDATE SET accession = excluded.accession, study = excluded.study",
                    study_rows,
                )
                cur.executemany(
                    "INSERT INTO report_performed (channel, uid, study_uid, accession, step)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (channel, uid) DO UPDATE SET"
                    " study_uid = excluded.study_uid, accession = excluded.accession, step = excluded.step",
                    step_rows,
                )

        self._write(body)

    def order(self, accession: str) -> dict[str, Any] | None:
        row = self._one(
            "SELECT orders FROM report_orders WHERE channel = %s AND accession = %s", (self._ch, _enc(accession))
        )
        return json.loads(row[0]) if row else None

    def sources(self, by: str, value: str) -> tuple[list[str], list[str]]:
        study, step = {"study": ("uid", "study_uid"), "accession": ("accession", "accession")}[by]
        params = (self._ch, _enc(value))
        with self._lock:
            conn = self._connection()
            studies = conn.execute(
                f"SELECT study FROM report_studies WHERE channel = %s AND {study} = %s ORDER BY n DESC", params
            ).fetchall()
            steps = conn.execute(f"SELECT step FROM report_performed WHERE channel = %s AND {step} = %s", params)
            return [r[0] for r in studies], [r[0] for r in steps.fetchall()]

    # -- documents ---------------------------------------------------------------------------------------------

    def message(self, message_key: str) -> tuple[str, str] | None:
        row = self._one(
            "SELECT document_id, action FROM report_messages WHERE channel = %s AND message_key = %s",
            (self._ch, _enc(message_key)),
        )
        return (_dec(row[0]), _dec(row[1])) if row else None

    def document(self, doc_id: str) -> model.Document | None:
        row = self._one(
            "SELECT document, content FROM report_documents WHERE channel = %s AND id = %s", (self._ch, _enc(doc_id))
        )
        return _document(row) if row else None

    def current(self, set_id: str) -> model.Document | None:
        row = self._one(
            "SELECT document, content FROM report_documents WHERE channel = %s AND set_id = %s AND status = 'current'"
            " ORDER BY version DESC LIMIT 1",
            (self._ch, _enc(set_id)),
        )
        return _document(row) if row else None

    def set_of(self, set_key: str) -> str | None:
        row = self._one("SELECT set_id FROM report_sets WHERE channel = %s AND set_key = %s", (self._ch, _enc(set_key)))
        return _dec(row[0]) if row else None

    def new_set(self, set_key: str, set_id: str, prefix: str) -> str:
        ch, key = self._ch, _enc(set_key)

        def body(conn: psycopg.Connection) -> str:
            conn.execute("INSERT INTO report_channels (channel) VALUES (%s) ON CONFLICT DO NOTHING", (ch,))
            (last,) = conn.execute(  # the channel's sets are numbered one at a time
                "SELECT last_set FROM report_channels WHERE channel = %s FOR UPDATE", (ch,)
            ).fetchone() or (0,)
            row = conn.execute("SELECT set_id FROM report_sets WHERE channel = %s AND set_key = %s", (ch, key))
            found = row.fetchone()
            if found is not None:  # another node created it while this one waited
                return _dec(found[0])
            n = int(last) + 1
            new = set_id or f"{prefix}.{n}"
            conn.execute("UPDATE report_channels SET last_set = %s WHERE channel = %s", (n, ch))
            conn.execute(
                "INSERT INTO report_sets (channel, n, set_key, set_id) VALUES (%s, %s, %s, %s)", (ch, n, key, _enc(new))
            )
            return new

        return self._write(body)

    def last_version(self, set_id: str) -> int:
        row = self._one(
            "SELECT MAX(version) FROM report_documents WHERE channel = %s AND set_id = %s", (self._ch, _enc(set_id))
        )
        return int(row[0] or 0) if row else 0

    def _lock_set(self, conn: psycopg.Connection, *, set_key: str = "", set_id: str = "") -> None:
        """In the caller's transaction: the set's row locked (every write of a set's outcome takes it)."""
        column, value = ("set_key", set_key) if set_key else ("set_id", set_id)
        conn.execute(
            f"SELECT 1 FROM report_sets WHERE channel = %s AND {column} = %s ORDER BY n FOR UPDATE",
            (self._ch, _enc(value)),
        )

    def store(self, doc: model.Document, message_key: str, *, current: str, supersede: str, withdraw: bool) -> None:
        ch, key = self._ch, _enc(message_key)
        text, content = _json(doc)

        def body(conn: psycopg.Connection) -> None:
            self._lock_set(conn, set_id=doc.set_id)
            row = conn.execute(
                "SELECT id FROM report_documents WHERE channel = %s AND set_id = %s AND status = 'current'"
                " ORDER BY version DESC LIMIT 1",
                (ch, _enc(doc.set_id)),
            ).fetchone()
            if (_dec(row[0]) if row else "") != current:
                raise ReportConflict(f"set {doc.set_id}: its current version changed")
            held = conn.execute(  # locked: no other node expires or publishes it before this commits
                "SELECT status FROM report_waiting WHERE channel = %s AND message_key = %s FOR UPDATE", (ch, key)
            ).fetchone()
            if held is not None and held[0] != "waiting":
                raise ReportConflict("the report waits no more")
            if supersede:
                self._supersede(conn, supersede, message_key, "withdrawn" if withdraw else "superseded")
            conn.execute(
                "UPDATE report_waiting SET status = 'published', document_id = %s, reason = '', noted = 0"
                " WHERE channel = %s AND message_key = %s AND status = 'waiting'",
                (_enc(doc.id), ch, key),
            )
            if doc.action == "delete":
                conn.execute(
                    "UPDATE report_documents SET status = 'deleted', document = %s WHERE channel = %s AND id = %s",
                    (text, ch, _enc(doc.id)),
                )
            else:
                if doc.replaces:
                    conn.execute(
                        "UPDATE report_documents SET status = 'superseded' WHERE channel = %s AND id = %s",
                        (ch, _enc(doc.replaces)),
                    )
                conn.execute(
                    "INSERT INTO report_documents (channel, id, set_id, version, status, document, content)"
                    " VALUES (%s, %s, %s, %s, 'current', %s, %s)",
                    (ch, _enc(doc.id), _enc(doc.set_id), doc.version, text, content),
                )
            conn.execute(
                "INSERT INTO report_messages (channel, message_key, document_id, action, node)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (channel, message_key) DO UPDATE SET"
                " document_id = excluded.document_id, action = excluded.action, node = excluded.node, prepared = now()",
                (ch, key, _enc(doc.id), doc.action, self.node),
            )

        self._write(body)

    # -- reports held --------------------------------------------------------------------------------------------

    def _supersede(self, conn: psycopg.Connection, set_key: str, message_key: str, status: str) -> int:
        """In the caller's transaction: the held versions of the set superseded (or withdrawn) by ``message_key``."""
        cur = conn.execute(
            "UPDATE report_waiting SET status = %s, superseded_by = %s, noted = 0, requested = 0"
            " WHERE channel = %s AND set_key = %s AND message_key != %s"
            " AND status IN ('waiting', 'expired', 'invalid')",
            (status, _enc(message_key), self._ch, _enc(set_key), _enc(message_key)),
        )
        return int(cur.rowcount or 0)

    def wait(
        self, message_key: str, set_key: str, accession: str, study_uid: str, deadline: float, report: str, remark: str
    ) -> tuple[int, int]:
        def body(conn: psycopg.Connection) -> tuple[int, int]:
            self._lock_set(conn, set_key=set_key)
            superseded = self._supersede(conn, set_key, message_key, "superseded")
            row = conn.execute(
                "INSERT INTO report_waiting (channel, message_key, set_key, accession, study_uid, received, deadline,"
                " status, report, remark, noted, node) VALUES (%s, %s, %s, %s, %s, %s, %s, 'waiting', %s, %s, 1, %s)"
                " RETURNING n",
                (
                    self._ch,
                    _enc(message_key),
                    _enc(set_key),
                    _enc(accession),
                    _enc(study_uid),
                    _received(),
                    deadline,
                    report,
                    _enc(remark),
                    self.node,
                ),
            ).fetchone()
            assert row is not None
            return int(row[0]), superseded

        return self._write(body)

    def withdraw(self, set_key: str, message_key: str) -> int:
        def body(conn: psycopg.Connection) -> int:
            self._lock_set(conn, set_key=set_key)
            return self._supersede(conn, set_key, message_key, "withdrawn")

        return self._write(body)

    def held_again(self, message_key: str, deadline: float) -> tuple[int, str, float] | None:
        row = self._one(
            "SELECT n, status, deadline FROM report_waiting WHERE channel = %s AND message_key = %s",
            (self._ch, _enc(message_key)),
        )
        if row is not None and row[1] in DEAD:  # written only for a dead letter sent again
            row = self._write(
                lambda conn: conn.execute(
                    "UPDATE report_waiting SET status = 'waiting', deadline = %s, reason = '', noted = 1"
                    " WHERE n = %s AND status IN ('expired', 'invalid') RETURNING n, status, deadline",
                    (deadline, row[0]),
                ).fetchone()
            ) or self._one("SELECT n, status, deadline FROM report_waiting WHERE n = %s", (row[0],))
        return (int(row[0]), _dec(row[1]), float(row[2])) if row else None

    def withdrawn_by(self, message_key: str) -> int:
        row = self._one(
            "SELECT count(*) FROM report_waiting WHERE channel = %s AND superseded_by = %s AND status = 'withdrawn'",
            (self._ch, _enc(message_key)),
        )
        return int(row[0]) if row else 0

    def waiting_report(self, message_key: str) -> tuple[str, str] | None:
        row = self._one(
            "SELECT report, status FROM report_waiting WHERE channel = %s AND message_key = %s",
            (self._ch, _enc(message_key)),
        )
        return (str(row[0]), _dec(row[1])) if row else None

    def remark(self, message_key: str, remark: str) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE report_waiting SET remark = %s, noted = 0 WHERE channel = %s AND message_key = %s"
                " AND status = 'waiting' AND remark != %s",
                (_enc(remark), self._ch, _enc(message_key), _enc(remark)),
            )
        )

    def settle(self, message_key: str, status: str, reason: str) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE report_waiting SET status = %s, reason = %s, noted = 0 WHERE channel = %s AND message_key = %s"
                " AND status = 'waiting'",
                (status, _enc(reason), self._ch, _enc(message_key)),
            )
        )

    def rows(self, statuses: tuple[str, ...]) -> list[dict[str, Any]]:
        rows = self._all(
            f"SELECT {', '.join(LISTED)} FROM report_waiting WHERE channel = %s AND status = ANY(%s) ORDER BY n",
            (self._ch, list(statuses)),
        )
        return [_listed(LISTED, r) for r in rows]

    def row(self, *, n: int = 0, message_key: str = "") -> dict[str, Any] | None:
        where, value = ("n", n) if n else ("message_key", _enc(message_key))
        row = self._one(
            f"SELECT {', '.join(LISTED)} FROM report_waiting WHERE channel = %s AND {where} = %s", (self._ch, value)
        )
        return _listed(LISTED, row) if row else None

    def waiting_for(self, study_uids: list[str], accessions: list[str]) -> list[str]:
        keys: set[tuple[int, str]] = set()
        for column, values in (("study_uid", study_uids), ("accession", accessions)):
            for i in range(0, len(values), _CHUNK):
                chunk = [_enc(v) for v in values[i : i + _CHUNK]]
                rows = self._all(
                    f"SELECT n, message_key FROM report_waiting WHERE channel = %s AND status = 'waiting'"
                    f" AND {column} = ANY(%s)",
                    (self._ch, chunk),
                )
                keys.update((int(r[0]), _dec(r[1])) for r in rows)
        return [key for _, key in sorted(keys)]

    def scan(self, after: int, limit: int) -> list[tuple[int, str, str, str, bool]]:
        rows = self._all(
            "SELECT n, message_key, study_uid, accession, CASE WHEN study_uid != '' THEN"
            " EXISTS (SELECT 1 FROM report_studies s WHERE s.channel = w.channel AND s.uid = w.study_uid)"
            " OR EXISTS (SELECT 1 FROM report_performed p WHERE p.channel = w.channel AND p.study_uid = w.study_uid)"
            " ELSE accession != '' AND ("
            "EXISTS (SELECT 1 FROM report_studies s WHERE s.channel = w.channel AND s.accession = w.accession)"
            " OR EXISTS (SELECT 1 FROM report_performed p WHERE p.channel = w.channel AND p.accession = w.accession))"
            " END FROM report_waiting AS w WHERE channel = %s AND status = 'waiting' AND n > %s ORDER BY n LIMIT %s",
            (self._ch, after, limit),
        )
        return [(int(r[0]), _dec(r[1]), _dec(r[2]), _dec(r[3]), bool(r[4])) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._all(
            "SELECT status, count(*) FROM report_waiting WHERE channel = %s"
            " AND status IN ('waiting', 'expired', 'invalid') GROUP BY status",
            (self._ch,),
        )
        return _counts({str(s): int(c) for s, c in rows})

    def expire(self, now: float) -> int:
        return self._write(
            lambda conn: int(
                conn.execute(
                    "UPDATE report_waiting SET status = 'expired', noted = 0, requested = 0,"
                    " reason = 'no study known for it before its deadline'"
                    " WHERE channel = %s AND status = 'waiting' AND deadline < %s",
                    (self._ch, now),
                ).rowcount
                or 0
            )
        )

    def request(self, n: int, deadline: float) -> str | None:
        def body(conn: psycopg.Connection) -> str | None:
            row = conn.execute(
                "SELECT status FROM report_waiting WHERE channel = %s AND n = %s FOR UPDATE", (self._ch, n)
            ).fetchone()
            if row is None or row[0] not in ("waiting", "expired", "invalid"):
                return None if row is None else _dec(row[0])
            conn.execute(
                "UPDATE report_waiting SET status = 'waiting', requested = 1, reason = '', noted = 1, deadline = %s"
                " WHERE n = %s",
                (deadline, n),
            )
            return _dec(row[0])

        return self._write(body)

    def requested(self) -> list[str]:
        """The operator's asks, each handed to one node (the update that clears it returns it)."""
        row = self._one(
            "SELECT EXISTS (SELECT 1 FROM report_waiting WHERE channel = %s AND requested = 1)", (self._ch,)
        )
        if not row or not row[0]:  # looked at every few seconds: written only when an operator asked
            return []
        rows = self._write(
            lambda conn: conn.execute(
                "UPDATE report_waiting SET requested = 0 WHERE channel = %s AND requested = 1 RETURNING n, message_key",
                (self._ch,),
            ).fetchall()
        )
        return [_dec(key) for _, key in sorted(rows)]

    def unnoted(self) -> list[dict[str, Any]]:
        """The outcomes to note, each claimed for this store for `NOTING` seconds: the waiting task of another node
        does not list it meanwhile (each outcome is written into its journal entry by one node; one that stalls
        longer than that may see it written twice: at least once)."""
        now = time.time()
        rows = self._write(
            lambda conn: conn.execute(
                f"UPDATE report_waiting SET noting_by = %s, noting_until = %s WHERE n IN (SELECT n FROM report_waiting"
                " WHERE channel = %s AND noted = 0 AND (status != 'waiting' OR remark != '')"
                " AND (noting_until < %s OR noting_by = %s) FOR UPDATE SKIP LOCKED)"
                f" RETURNING {', '.join(UNNOTED)}",
                (self._me, now + NOTING, self._ch, now, self._me),
            ).fetchall()
        )
        return sorted((_listed(UNNOTED, r) for r in rows), key=lambda r: r["n"])

    def noted(self, n: int, journal_id: int) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE report_waiting SET noted = 1, journal_id = CASE WHEN %s != 0 THEN %s ELSE journal_id END"
                " WHERE channel = %s AND n = %s",
                (journal_id, journal_id, self._ch, n),
            )
        )

    def journaled(self, message_key: str, journal_id: int) -> None:
        self._write(
            lambda conn: conn.execute(
                "UPDATE report_waiting SET journal_id = %s WHERE channel = %s AND message_key = %s",
                (journal_id, self._ch, _enc(message_key)),
            )
        )

    def kept(self) -> set[str]:
        sql = KEPT.format(waiting="report_waiting", scope="channel = %s AND ")
        return {_dec(r[0]) for r in self._all(sql, (self._ch, self._ch))}

    # -- undo --------------------------------------------------------------------------------------------------

    def recent(self, limit: int) -> list[str]:
        """The latest preparations of this node, and of any node when older than `ORPHANED` seconds (a node that
        never came back): never another live node's, which may be journaling it right now."""
        mine = f"channel = %s AND (node = %s OR prepared < now() - interval '{int(ORPHANED)} seconds')"
        params = (self._ch, self.node, limit)
        keys = [
            _dec(r[0])
            for r in self._all(f"SELECT message_key FROM report_messages WHERE {mine} ORDER BY n DESC LIMIT %s", params)
        ]
        rows = self._all(
            f"SELECT message_key FROM report_waiting WHERE {mine} AND status = 'waiting' AND journal_id = 0"
            " ORDER BY n DESC LIMIT %s",
            params,
        )
        return keys + [k for k in (_dec(r[0]) for r in rows) if k not in keys]

    def discard(self, message_key: str) -> Discarded:
        ch, key = self._ch, _enc(message_key)

        def body(conn: psycopg.Connection) -> Discarded:
            journaled = conn.execute(
                "SELECT n FROM report_waiting WHERE channel = %s AND message_key = %s AND journal_id != 0", (ch, key)
            ).fetchone()
            if journaled is not None:
                return Discarded(refused=int(journaled[0]))
            made = conn.execute(
                "SELECT m.document_id, m.action, d.set_id FROM report_messages m LEFT JOIN report_documents d"
                " ON d.channel = m.channel AND d.id = m.document_id WHERE m.channel = %s AND m.message_key = %s",
                (ch, key),
            ).fetchone()
            held = conn.execute(
                "SELECT set_key FROM report_waiting WHERE channel = %s AND message_key = %s", (ch, key)
            ).fetchone()
            if made is not None and made[2] is not None:
                self._lock_set(conn, set_id=_dec(made[2]))
            elif held is not None:
                self._lock_set(conn, set_key=_dec(held[0]))
            undone = Discarded(
                restored=conn.execute(
                    "UPDATE report_waiting SET status = CASE WHEN reason = '' THEN 'waiting' ELSE 'expired' END,"
                    " superseded_by = '', noted = 1 WHERE channel = %s AND superseded_by = %s",
                    (ch, key),
                ).rowcount,
                waiting=conn.execute(
                    "DELETE FROM report_waiting WHERE channel = %s AND message_key = %s", (ch, key)
                ).rowcount,
            )
            if made is None:
                return undone
            undone.document_id, undone.action = _dec(made[0]), _dec(made[1])
            doc_id = made[0]
            found = conn.execute(
                "SELECT document, content, status FROM report_documents WHERE channel = %s AND id = %s", (ch, doc_id)
            ).fetchone()
            if undone.action == "delete":
                if found is not None:
                    conn.execute(
                        "UPDATE report_documents SET status = 'current', document = %s WHERE channel = %s AND id = %s",
                        (_json(_undeleted(_document(found)))[0], ch, doc_id),
                    )
            else:
                # The version it replaced is current again, unless a later version replaced this one meanwhile.
                replaced = _document(found).replaces if found is not None and found[2] == "current" else ""
                conn.execute("DELETE FROM report_documents WHERE channel = %s AND id = %s", (ch, doc_id))
                if replaced:
                    conn.execute(
                        "UPDATE report_documents SET status = 'current' WHERE channel = %s AND id = %s"
                        " AND status = 'superseded'",
                        (ch, _enc(replaced)),
                    )
            conn.execute("DELETE FROM report_messages WHERE channel = %s AND message_key = %s", (ch, key))
            return undone

        return self._write(body)


def _json(doc: model.Document) -> tuple[str, bytes]:
    """The Document event as stored: its JSON without the content, and the content's bytes (the CDA)."""
    plain = model.plain(doc)
    content = base64.b64decode(plain.pop("content", "") or "")
    return json.dumps(plain, ensure_ascii=False), content


def _document(row: tuple[Any, ...]) -> model.Document:
    """The Document event of a stored row (JSON, content)."""
    plain = json.loads(row[0])
    plain["content"] = base64.b64encode(bytes(row[1])).decode("ascii")
    return model.from_dict(model.Document, plain)


def _listed(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    return {c: _dec(v) if c in _TEXT else v for c, v in zip(columns, row, strict=True)}
