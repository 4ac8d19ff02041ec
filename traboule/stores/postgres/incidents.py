"""The alerting engine's incidents on PostgreSQL (`traboule.stores.incidents.IncidentStore`, the statements of
`IncidentTables`): the tables ``alert_incidents`` and ``alert_notifications``, created by the ``incidents``
migrations, shared by every node (one of them evaluates the rules at a time: the ``alerts`` lease).

A connection found gone is replaced and the call made once more (`OwnSession`): a read, or a transaction rolled
back with its session. Text goes through `traboule.stores.postgres.encode_text` (no NUL in PostgreSQL text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg

from traboule.stores.incidents import Execute, IncidentTables
from traboule.stores.postgres import encode_text, migrations
from traboule.stores.postgres.pool import OwnSession

T = TypeVar("T")

COMPONENT = "incidents"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE alert_incidents (
                id TEXT COLLATE "C" PRIMARY KEY,
                rule TEXT COLLATE "C" NOT NULL,
                kind TEXT NOT NULL,
                channel TEXT COLLATE "C" NOT NULL,
                opened TEXT COLLATE "C" NOT NULL,
                resolved TEXT COLLATE "C" NOT NULL DEFAULT '',
                last_value DOUBLE PRECISION NOT NULL DEFAULT 0,
                notified TEXT NOT NULL DEFAULT '',
                reminded TEXT NOT NULL DEFAULT ''
            );
            CREATE UNIQUE INDEX alert_incidents_open ON alert_incidents (rule, channel) WHERE resolved = '';
            CREATE INDEX alert_incidents_by_opened ON alert_incidents (opened);
            CREATE TABLE alert_notifications (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                incident TEXT COLLATE "C" NOT NULL,
                notifier TEXT NOT NULL,
                event TEXT NOT NULL,
                body TEXT NOT NULL,
                created TEXT NOT NULL,
                attempts INT NOT NULL DEFAULT 0,
                next_at DOUBLE PRECISION NOT NULL,
                last_error TEXT NOT NULL DEFAULT '',
                delivered TEXT NOT NULL DEFAULT ''
            );
            CREATE INDEX alert_notifications_due ON alert_notifications (delivered, next_at);
            """,
        )
    ],
)


class PostgresIncidents(OwnSession, IncidentTables):
    """The incidents in the database at ``url``; its schema is created or upgraded when it opens. Safe from worker
    threads: calls are serialised."""

    reconnect_event = "database.incidents_reconnecting"

    def __init__(self, url: str) -> None:
        self.url = url
        self._open_session(COMPONENT)

    @staticmethod
    def _executor(db: psycopg.Connection) -> Execute:
        def execute(sql: str, args: Sequence[Any]) -> Any:
            return db.execute(sql, [encode_text(a) if isinstance(a, str) else a for a in args])

        return execute

    def _read(self, body: Callable[[Execute], T]) -> T:
        return self._session(lambda db: body(self._executor(db)))

    def _transaction(self, body: Callable[[Execute], T]) -> T:
        def run(db: psycopg.Connection) -> T:
            with db.transaction():
                return body(self._executor(db))

        return self._session(run)

    def close(self) -> None:
        with self._lock:
            self._db.close()
