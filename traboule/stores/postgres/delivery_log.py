"""The delivery log on PostgreSQL (`traboule.stores.delivery_log.DeliveryLog`): the table ``deliveries``, created by
the ``delivery_log`` migrations, written by every node. Text goes through `encode_text` (no NUL in PostgreSQL text).
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from traboule.stores.delivery_log import COLUMNS, MAX_ROWS, DeliveryRecord, key_range
from traboule.stores.postgres import decode_text, encode_text, migrations
from traboule.stores.postgres.pool import OwnSession

COMPONENT = "delivery_log"
migrations.register(
    COMPONENT,
    [
        (
            1,
            """
            CREATE TABLE deliveries (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_key TEXT COLLATE "C" NOT NULL,
                correlation_id TEXT COLLATE "C" NOT NULL,
                channel TEXT NOT NULL,
                outcome TEXT NOT NULL,
                detail TEXT NOT NULL,
                at TEXT COLLATE "C" NOT NULL
            );
            CREATE INDEX deliveries_by_key ON deliveries (message_key);
            CREATE INDEX deliveries_by_correlation ON deliveries (correlation_id) WHERE message_key = '';
            CREATE INDEX deliveries_by_time ON deliveries (at);
            """,
        )
    ],
)


class PostgresDeliveryLog(OwnSession):
    """The delivery log in the database at ``url``; its schema is created or upgraded when it opens."""

    reconnect_event = "database.delivery_log_reconnecting"

    def __init__(self, url: str) -> None:
        self.url = url
        self._open_session(COMPONENT)

    def add(self, records: Sequence[DeliveryRecord]) -> None:
        rows = [
            tuple(encode_text(v) for v in (r.key, r.correlation_id, r.channel, r.outcome, r.detail, r.at))
            for r in records
        ]

        def insert(db: psycopg.Connection) -> None:
            with db.transaction(), db.cursor() as cur:
                cur.executemany(f"INSERT INTO deliveries ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)", rows)

        self._session(insert)

    def of(self, key: str, correlation_id: str = "") -> list[DeliveryRecord]:
        low, high = (encode_text(v) for v in key_range(key))
        rows = self._session(
            lambda db: db.execute(
                f"SELECT {COLUMNS} FROM deliveries WHERE message_key = %s"
                " OR (message_key >= %s AND message_key < %s)"
                " OR (message_key = '' AND correlation_id = %s AND correlation_id != '') ORDER BY at, id LIMIT %s",
                (encode_text(key), low, high, encode_text(correlation_id), MAX_ROWS),
            ).fetchall()
        )
        return [DeliveryRecord(*(decode_text(v) for v in row)) for row in rows]

    def prune(self, before: str) -> int:
        return self._session(lambda db: db.execute("DELETE FROM deliveries WHERE at < %s", (before,)).rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()
