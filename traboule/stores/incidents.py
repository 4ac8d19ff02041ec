"""The alerting engine's incidents and the notifications waiting to be delivered (`IncidentStore`).

An incident is one rule's condition holding on one channel, from the moment it opened until it resolved; at most
one incident per (rule, channel) is open at a time (a unique index says so on both backends). Opening, reminding
and resolving an incident queue its notifications in the same transaction: once the incident is recorded, its
notifications are too, and a restart neither forgets them nor queues them again. A notification stays queued until
its notifier delivered it (``delivered``), its next attempt time pushed back after each failure (``failed``).

Nothing here holds patient data: rule and channel names, numbers and times only.

`SQLiteIncidents` keeps them in ``alerts.sqlite`` in the data folder; `traboule.stores.postgres.incidents` in the
database shared by the nodes. Both share the statements of `IncidentTables` (written with ``%s`` placeholders).
Calls block: the engine makes them in a worker thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from traboule.stores.sqlite import Durability, open_database

T = TypeVar("T")
Execute = Callable[[str, Sequence[Any]], Any]  # runs one statement (``%s`` placeholders), returns its cursor

INCIDENT_COLUMNS = ("id", "rule", "kind", "channel", "opened", "resolved", "last_value", "notified", "reminded")

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_incidents (
    id TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    kind TEXT NOT NULL,
    channel TEXT NOT NULL,
    opened TEXT NOT NULL,
    resolved TEXT NOT NULL DEFAULT '',
    last_value REAL NOT NULL DEFAULT 0,
    notified TEXT NOT NULL DEFAULT '',
    reminded TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS alert_incidents_open ON alert_incidents(rule, channel) WHERE resolved = '';
CREATE INDEX IF NOT EXISTS alert_incidents_by_opened ON alert_incidents(opened);
CREATE TABLE IF NOT EXISTS alert_notifications (
    id INTEGER PRIMARY KEY,
    incident TEXT NOT NULL,
    notifier TEXT NOT NULL,
    event TEXT NOT NULL,
    body TEXT NOT NULL,
    created TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    delivered TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS alert_notifications_due ON alert_notifications(delivered, next_at);
"""


@dataclass
class Incident:
    """One incident: ``opened`` / ``resolved`` are ISO 8601 UTC ("" while open); ``notified``: the events whose
    notifications were queued, comma-separated (``open``, ``reminder``, ``resolved``)."""

    id: str
    rule: str
    kind: str
    channel: str
    opened: str
    resolved: str = ""
    last_value: float = 0.0
    notified: str = ""
    reminded: str = ""  # when the last reminder was queued (ISO 8601 UTC)

    @property
    def is_open(self) -> bool:
        return not self.resolved


@dataclass
class Notification:
    """A notification to deliver: ``body`` is the JSON text the notifier sends (or renders)."""

    id: int
    incident: str
    notifier: str
    event: str
    body: str
    created: str
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""
    delivered: str = ""


class IncidentStore(Protocol):
    """What the alerting engine keeps (blocking calls)."""

    def open_incidents(self) -> list[Incident]: ...

    def recent(self, limit: int = 50) -> list[Incident]: ...

    def open(self, incident: Incident, notifications: Sequence[tuple[str, str, str]], now: float) -> bool: ...

    def update_value(self, incident_id: str, value: float) -> None: ...

    def remind(
        self, incident_id: str, at: str, value: float, notifications: Sequence[tuple[str, str, str]], now: float
    ) -> None: ...

    def resolve(
        self, incident_id: str, at: str, value: float, notifications: Sequence[tuple[str, str, str]], now: float
    ) -> None: ...

    def due(self, now: float, limit: int = 50) -> list[Notification]: ...

    def notifications(self, incident_id: str) -> list[Notification]: ...

    def delivered(self, notification_id: int, at: str) -> None: ...

    def failed(self, notification_id: int, next_at: float, error: str) -> None: ...

    def close(self) -> None: ...


class IncidentTables:
    """The statements of an incident store over a backend's ``_read`` and ``_transaction``."""

    def _read(self, body: Callable[[Execute], T]) -> T:
        raise NotImplementedError

    def _transaction(self, body: Callable[[Execute], T]) -> T:
        raise NotImplementedError

    def open_incidents(self) -> list[Incident]:
        """The incidents still open, oldest first."""
        sql = f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM alert_incidents WHERE resolved = '' ORDER BY opened, id"
        return self._read(lambda ex: [_incident(r) for r in ex(sql, ()).fetchall()])

    def recent(self, limit: int = 50) -> list[Incident]:
        """The open incidents, then the latest resolved ones (most recent first), ``limit`` in all."""
        sql = (
            f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM alert_incidents"
            " ORDER BY CASE WHEN resolved = '' THEN 0 ELSE 1 END, opened DESC, id LIMIT %s"
        )
        return self._read(lambda ex: [_incident(r) for r in ex(sql, (limit,)).fetchall()])

    def open(self, incident: Incident, notifications: Sequence[tuple[str, str, str]], now: float) -> bool:
        """Record ``incident`` and queue its ``(notifier, event, body)`` notifications, in one transaction; False
        (nothing written) when an incident of the same rule and channel is open already."""

        def body(ex: Execute) -> bool:
            found = ex(
                "SELECT 1 FROM alert_incidents WHERE rule = %s AND channel = %s AND resolved = ''",
                (incident.rule, incident.channel),
            ).fetchone()
            if found:
                return False
            incident.notified = "open" if notifications else ""
            values = [getattr(incident, c) for c in INCIDENT_COLUMNS]
            ex(
                f"INSERT INTO alert_incidents ({', '.join(INCIDENT_COLUMNS)})"
                f" VALUES ({', '.join(['%s'] * len(INCIDENT_COLUMNS))})",
                values,
            )
            _queue(ex, incident.id, notifications, incident.opened, now)
            return True

        return self._transaction(body)

    def update_value(self, incident_id: str, value: float) -> None:
        self._transaction(
            lambda ex: ex("UPDATE alert_incidents SET last_value = %s WHERE id = %s", (value, incident_id))
        )

    def remind(
        self, incident_id: str, at: str, value: float, notifications: Sequence[tuple[str, str, str]], now: float
    ) -> None:
        """Queue a reminder of an open incident (its time in ``reminded``)."""

        def body(ex: Execute) -> None:
            ex("UPDATE alert_incidents SET reminded = %s, last_value = %s WHERE id = %s", (at, value, incident_id))
            if notifications:
                _mark(ex, incident_id, "reminder")
            _queue(ex, incident_id, notifications, at, now)

        self._transaction(body)

    def resolve(
        self, incident_id: str, at: str, value: float, notifications: Sequence[tuple[str, str, str]], now: float
    ) -> None:
        """Mark the incident resolved at ``at`` and queue its notifications (nothing when it is resolved already)."""

        def body(ex: Execute) -> None:
            cur = ex(
                "UPDATE alert_incidents SET resolved = %s, last_value = %s WHERE id = %s AND resolved = ''",
                (at, value, incident_id),
            )
            if cur.rowcount and notifications:
                _mark(ex, incident_id, "resolved")
                _queue(ex, incident_id, notifications, at, now)

        self._transaction(body)

    def due(self, now: float, limit: int = 50) -> list[Notification]:
        """Notifications not delivered whose next attempt is due, in the order they were queued."""
        sql = (
            f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM alert_notifications"
            " WHERE delivered = '' AND next_at <= %s ORDER BY id LIMIT %s"
        )
        return self._read(lambda ex: [Notification(*r) for r in ex(sql, (now, limit)).fetchall()])

    def notifications(self, incident_id: str) -> list[Notification]:
        """Every notification of an incident, delivered or not, in order."""
        sql = f"SELECT {', '.join(NOTIFICATION_COLUMNS)} FROM alert_notifications WHERE incident = %s ORDER BY id"
        return self._read(lambda ex: [Notification(*r) for r in ex(sql, (incident_id,)).fetchall()])

    def delivered(self, notification_id: int, at: str) -> None:
        self._transaction(
            lambda ex: ex(
                "UPDATE alert_notifications SET delivered = %s, attempts = attempts + 1, last_error = '' WHERE id = %s",
                (at, notification_id),
            )
        )

    def failed(self, notification_id: int, next_at: float, error: str) -> None:
        self._transaction(
            lambda ex: ex(
                "UPDATE alert_notifications SET attempts = attempts + 1, next_at = %s, last_error = %s WHERE id = %s",
                (next_at, error[:200], notification_id),
            )
        )


NOTIFICATION_COLUMNS = (
    "id",
    "incident",
    "notifier",
    "event",
    "body",
    "created",
    "attempts",
    "next_at",
    "last_error",
    "delivered",
)


def _mark(ex: Execute, incident_id: str, event: str) -> None:
    """Add ``event`` to the incident's ``notified`` list (once)."""
    (notified,) = ex("SELECT notified FROM alert_incidents WHERE id = %s", (incident_id,)).fetchone()
    events = [e for e in str(notified).split(",") if e]
    if event not in events:
        ex("UPDATE alert_incidents SET notified = %s WHERE id = %s", (",".join([*events, event]), incident_id))


def _queue(ex: Execute, incident_id: str, notifications: Sequence[tuple[str, str, str]], at: str, now: float) -> None:
    for notifier, event, body in notifications:
        ex(
            "INSERT INTO alert_notifications (incident, notifier, event, body, created, next_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (incident_id, notifier, event, body, at, now),
        )


def _incident(row: Sequence[Any]) -> Incident:
    values = dict(zip(INCIDENT_COLUMNS, row, strict=True))
    values["last_value"] = float(values["last_value"])
    return Incident(**values)


class SQLiteIncidents(IncidentTables):
    """The incidents in a SQLite file (``alerts.sqlite`` of the data folder); safe from worker threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = open_database(self.path, Durability.POWER_LOSS, threads=True)
        self._db.executescript(SQLITE_SCHEMA)

    def _execute(self, sql: str, args: Sequence[Any]) -> sqlite3.Cursor:
        return self._db.execute(sql.replace("%s", "?"), tuple(args))

    def _read(self, body: Callable[[Execute], T]) -> T:
        with self._lock:
            return body(self._execute)

    def _transaction(self, body: Callable[[Execute], T]) -> T:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._execute)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._db.close()
