"""Where a channel's stores come from: one `StoreFactory` per engine process, chosen by one setting.

The engine builds the factory from its configuration (``traboule.app.runtime.make_stores``): `SQLiteStores` (files
in the data folder, the default) or, with ``[database] url`` / ``TRABOULE_DATABASE_URL``, `PostgresStores` (the
stores that have a PostgreSQL implementation there, the others still SQLite files in the data folder). A channel
asks ``runtime.stores`` for what it opens, never a store class by path, so the same channel runs on either backend.
`describe` says where each store is (``traboule check``, ``/channels``).

==================  ============================================  =========================================
factory method      `SQLiteStores` (file in the data folder)      `PostgresStores`
==================  ============================================  =========================================
``journal``         ``journal.sqlite``                            PostgreSQL (`PostgresJournal`)
``record``          ``journal.sqlite``                            PostgreSQL (the journal's tables)
``worklist``        ``<channel>.sqlite``                          PostgreSQL (`PostgresWorklistStore`)
``fhir``            ``<channel>.sqlite``                          PostgreSQL (`PostgresFHIRStore`)
``reports``         ``<channel>.reports.sqlite``                  PostgreSQL (`PostgresReportStorage`)
``patients``        ``patients.sqlite``                           PostgreSQL (`PostgresPatientRegistry`)
``applied_keys``    ``<channel>.sqlite``                          PostgreSQL (`PostgresAppliedKeys`)
``sender_state``    ``<channel>.sqlite``                          PostgreSQL (`PostgresSenderState`)
``mpps_states``     ``<channel>.sqlite``                          PostgreSQL (`PostgresMPPSStates`)
``submissions``     ``<channel>.sqlite``                          PostgreSQL (`PostgresSubmissions`)
``journal_search``  ``journal.index`` (rebuilt, not migrated)     PostgreSQL (`PostgresJournalSearch`)
``incidents``       ``alerts.sqlite``                             PostgreSQL (`PostgresIncidents`)
``delivery_log``    ``deliveries.sqlite``                         PostgreSQL (`PostgresDeliveryLog`)
==================  ============================================  =========================================

``sender_state`` (the ``hl7-status`` and ``hl7-documents``
channels) holds the channel's marks and its own tables on one connection, so that a change and a mark commit in one
transaction on either backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from traboule.stores import (
        FHIRStore,
        Journal,
        MPPSStates,
        PatientRegistry,
        ReportStore,
        SenderState,
        SubmissionStore,
        WorklistStore,
    )
    from traboule.stores.delivery_log import DeliveryLog
    from traboule.stores.idempotency import AppliedKeys, Legacy
    from traboule.stores.incidents import IncidentStore
    from traboule.stores.journal import JournalEntry
    from traboule.stores.journal_search import JournalSearch

__all__ = ["PostgresStores", "SQLiteStores", "StoreFactory", "stores_of"]

DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024

# The stores `PostgresStores` keeps in PostgreSQL: store → the module (and migrations component) holding it.
POSTGRES_COMPONENTS = {
    "journal": ("journal", "journal"),
    "worklist": ("worklist", "worklist"),
    "fhir": ("fhir_store", "fhir"),
    "patients": ("patient_identity", "patients"),
    "reports": ("reports", "reports"),
    "applied_keys": ("idempotency", "applied_keys"),
    "sender_state": ("sender_state", "sender_state"),
    "mpps_states": ("mpps_state", "mpps_state"),
    "submissions": ("submissions", "submissions"),
    "journal_search": ("journal_index", "journal_search"),
    "incidents": ("incidents", "incidents"),
    "delivery_log": ("delivery_log", "delivery_log"),
}


@runtime_checkable
class StoreFactory(Protocol):
    """The stores of one engine process. Each call opens a store (the caller closes it); ``record`` appends an
    entry to the journal from any process (blocking: call it in a thread)."""

    def journal(self) -> Journal: ...

    def record(self, entry: JournalEntry) -> JournalEntry: ...

    def worklist(self, channel: str) -> WorklistStore: ...

    def fhir(self, channel: str, timezone: Any = None) -> FHIRStore: ...

    def reports(
        self, channel: str, mapping: Any, validator: Any = None, *, wait_for_study: float | None = None
    ) -> ReportStore: ...

    def patients(self) -> PatientRegistry: ...

    def applied_keys(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> AppliedKeys: ...

    def sender_state(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> SenderState: ...

    def mpps_states(self, channel: str) -> MPPSStates: ...

    def submissions(self, channel: str) -> SubmissionStore: ...

    def journal_search(self) -> JournalSearch:
        """The journal's search index (`traboule.stores.journal_search`), read and brought up to date by the
        engine's indexer; its calls block (run them in a thread)."""
        ...

    def incidents(self) -> IncidentStore:
        """The alerting engine's incidents and queued notifications (`traboule.stores.incidents`); its calls block."""
        ...

    def delivery_log(self) -> DeliveryLog:
        """What each destination did with each message (`traboule.stores.delivery_log`); its calls block."""
        ...

    def lease(self, name: str) -> Any:
        """The lease ``name`` (work that runs on one node at a time, e.g. the outbox dispatcher): ``acquire()``,
        ``held``, ``lost()``, ``release()`` (see `traboule.stores.postgres.lease`); always held on SQLite."""
        ...

    def check(self) -> None:
        """Make sure the stores can open, changing nothing (the start-up check)."""
        ...

    def describe(self) -> dict[str, str]:
        """Where each store is (no password): ``{"journal": "postgresql (...)", "fhir": "sqlite (...)", ...}``."""
        ...


class SQLiteStores:
    """Every store in a SQLite file of ``data_dir``, named as it always was (``journal.sqlite``, ``patients.sqlite``,
    ``<channel>.sqlite``, ``<channel>.reports.sqlite``)."""

    backend = "sqlite"

    def __init__(self, data_dir: str | Path, *, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
        self.data_dir = Path(data_dir)
        self.min_free_bytes = min_free_bytes

    @property
    def journal_path(self) -> Path:
        return self.data_dir / "journal.sqlite"

    def journal(self) -> Journal:
        from traboule.stores.journal import SQLiteJournal

        return SQLiteJournal(self.journal_path, min_free_bytes=self.min_free_bytes)

    def record(self, entry: JournalEntry) -> JournalEntry:
        from traboule.stores import journal

        return journal.record(self.journal_path, entry)

    def worklist(self, channel: str) -> WorklistStore:
        from traboule.stores.worklist import SQLiteWorklistStore

        return SQLiteWorklistStore(str(self.data_dir / f"{channel}.sqlite"))

    def fhir(self, channel: str, timezone: Any = None) -> FHIRStore:
        from traboule.stores.fhir_store import SQLiteFHIRStore

        return SQLiteFHIRStore(str(self.data_dir / f"{channel}.sqlite"), timezone)

    def reports(
        self, channel: str, mapping: Any, validator: Any = None, *, wait_for_study: float | None = None
    ) -> ReportStore:
        from traboule.stores.reports import WAIT_FOR_STUDY, ReportPublisher

        wait = WAIT_FOR_STUDY if wait_for_study is None else wait_for_study
        return ReportPublisher(mapping, self.data_dir / f"{channel}.reports.sqlite", validator, wait_for_study=wait)

    def patients(self) -> PatientRegistry:
        from traboule.stores.patient_identity import PatientIdentities

        return PatientIdentities(self.data_dir / "patients.sqlite")

    def applied_keys(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> AppliedKeys:
        from traboule.stores.idempotency import AppliedKeys

        return AppliedKeys.open(self.data_dir / f"{channel}.sqlite", legacy=legacy)

    def sender_state(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> SenderState:
        from traboule.stores.sender_state import SQLiteSenderState

        return SQLiteSenderState(self.applied_keys(channel, legacy=legacy))

    def mpps_states(self, channel: str) -> MPPSStates:
        from traboule.stores.mpps_state import SQLiteMPPSStates

        return SQLiteMPPSStates(self.data_dir / f"{channel}.sqlite")

    def submissions(self, channel: str) -> SubmissionStore:
        from traboule.stores.submissions import SQLiteSubmissions

        return SQLiteSubmissions(self.data_dir / f"{channel}.sqlite")

    def journal_search(self) -> JournalSearch:
        from traboule.stores.journal_index import SQLiteJournalSearch

        return SQLiteJournalSearch(self.data_dir / "journal.index", self.journal_path)

    def incidents(self) -> IncidentStore:
        from traboule.stores.incidents import SQLiteIncidents

        return SQLiteIncidents(self.data_dir / "alerts.sqlite")

    def delivery_log(self) -> DeliveryLog:
        from traboule.stores.delivery_log import SQLiteDeliveryLog

        return SQLiteDeliveryLog(self.data_dir / "deliveries.sqlite")

    def lease(self, name: str) -> Any:
        """One node: the lease is always held."""
        from traboule.stores.postgres.lease import LocalLease

        return LocalLease(name)

    def check(self) -> None:
        """Nothing to reach: the files are created when the stores open."""

    def describe(self) -> dict[str, str]:
        where = f"sqlite (files in {self.data_dir})"
        stored = ("journal", "worklist", "fhir", "reports", "patients", "applied_keys", "sender_state")
        return {
            store: where
            for store in (*stored, "mpps_states", "submissions", "journal_search", "incidents", "delivery_log")
        }


class PostgresStores(SQLiteStores):
    """The journal (with ``record``), the worklist, the FHIR store, the patient registry, the reports and the
    channels' own states (sent-message marks, MPPS instances, XDS submissions) in the PostgreSQL database at ``url``,
    shared by every node that names it.

    The database holds one worklist and one FHIR store: every ``worklist`` (``fhir``) channel of the database shares
    it (the engine refuses two channels of either kind on one database at its start-up check)."""

    backend = "postgresql"

    def __init__(self, url: str, data_dir: str | Path, *, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
        super().__init__(data_dir, min_free_bytes=min_free_bytes)
        self.url = url

    def journal(self) -> Journal:
        from traboule.stores.postgres.journal import PostgresJournal

        return PostgresJournal(self.url)

    def record(self, entry: JournalEntry) -> JournalEntry:
        """Append ``entry`` (an ``undelivered`` outbound message, say) to the PostgreSQL journal on a connection of
        its own, in commit order with the journal's group commits (the same advisory lock)."""
        import psycopg

        from traboule.stores.postgres import connect, migrations, redact
        from traboule.stores.postgres.journal import COMPONENT, LOCK_KEY, _insert_blocking

        try:
            db = connect(self.url)
        except psycopg.OperationalError as exc:
            raise ConnectionError(f"database {redact(self.url)}: {exc}".strip()) from exc
        try:
            migrations.check(db, COMPONENT)
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                _insert_blocking(db, entry, [])
        finally:
            db.close()
        return entry

    def worklist(self, channel: str) -> WorklistStore:
        from traboule.stores.postgres.worklist import PostgresWorklistStore

        return PostgresWorklistStore(self.url)

    def fhir(self, channel: str, timezone: Any = None) -> FHIRStore:
        from traboule.stores.postgres.fhir_store import PostgresFHIRStore

        return PostgresFHIRStore(self.url, timezone)

    def patients(self) -> PatientRegistry:
        from traboule.stores.postgres.patient_identity import PostgresPatientRegistry

        return PostgresPatientRegistry(self.url)

    def reports(
        self, channel: str, mapping: Any, validator: Any = None, *, wait_for_study: float | None = None
    ) -> ReportStore:
        """The reports of ``channel`` in the tables every node running it shares (the same rules as on SQLite:
        `ReportPublisher` on a `PostgresReportStorage`); this node is its host and data folder."""
        import socket

        from traboule.stores.postgres.reports import PostgresReportStorage
        from traboule.stores.reports import WAIT_FOR_STUDY, ReportPublisher

        wait = WAIT_FOR_STUDY if wait_for_study is None else wait_for_study
        node = f"{socket.gethostname()}:{self.data_dir.resolve()}"
        storage = PostgresReportStorage(self.url, channel, node=node)
        return ReportPublisher(mapping, storage, validator, wait_for_study=wait)

    def applied_keys(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> AppliedKeys:
        """The marks of ``channel`` in the table every node shares (a fresh database has no ``legacy`` table)."""
        from traboule.stores.postgres.idempotency import PostgresAppliedKeys

        return PostgresAppliedKeys(self.url, channel)  # type: ignore[return-value]

    def sender_state(self, channel: str, *, legacy: Sequence[Legacy] = ()) -> SenderState:
        from traboule.stores.postgres.sender_state import PostgresSenderState

        return PostgresSenderState(self.url, channel)

    def mpps_states(self, channel: str) -> MPPSStates:
        from traboule.stores.postgres.mpps_state import PostgresMPPSStates

        return PostgresMPPSStates(self.url, channel)

    def submissions(self, channel: str) -> SubmissionStore:
        from traboule.stores.postgres.submissions import PostgresSubmissions

        return PostgresSubmissions(self.url, channel)

    def journal_search(self) -> JournalSearch:
        from traboule.stores.postgres.journal_index import PostgresJournalSearch

        return PostgresJournalSearch(self.url)

    def incidents(self) -> IncidentStore:
        from traboule.stores.postgres.incidents import PostgresIncidents

        return PostgresIncidents(self.url)

    def delivery_log(self) -> DeliveryLog:
        from traboule.stores.postgres.delivery_log import PostgresDeliveryLog

        return PostgresDeliveryLog(self.url)

    def lease(self, name: str) -> Any:
        """The lease ``name`` shared by every node of the database (a session advisory lock)."""
        from traboule.stores.postgres.lease import Lease

        return Lease(self.url, name)

    def check(self) -> None:
        """The database answers and none of its schemas is newer than this code (``ConfigError``); changes nothing
        (an absent or older schema is brought up to date when its store opens). Raises ``ConnectionError`` when
        the database does not answer, ``ConfigError`` when it refuses the URL's settings (`database_error`)."""
        import importlib

        import psycopg

        from traboule.stores.postgres import connect, migrations, redact

        for module, _ in POSTGRES_COMPONENTS.values():
            importlib.import_module(f"traboule.stores.postgres.{module}")  # registers its migrations
        known = migrations.registered()
        try:
            with connect(self.url) as conn:
                found = migrations.versions(conn)
                unfinished = conn.execute("SELECT to_regclass('traboule_migration')").fetchone()
                if unfinished and unfinished[0]:  # a `traboule db migrate` ran: is every step of it done?
                    unfinished = conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM traboule_migration WHERE NOT done)"
                    ).fetchone()
        except psycopg.Error as exc:
            raise database_error(self.url, exc) from exc
        if unfinished and unfinished[0]:
            from traboule.errors import ConfigError

            raise ConfigError(
                f"database {redact(self.url)}: a migration from an embedded site into it is unfinished: finish"
                " `traboule db migrate` (the same command again) before an engine starts on it"
            )
        for _, component in POSTGRES_COMPONENTS.values():
            if found.get(component, 0) > known[component]:
                raise migrations._too_new(component, found[component], known[component])

    def describe(self) -> dict[str, str]:
        from traboule.stores.postgres import redact

        described = super().describe()
        for store in POSTGRES_COMPONENTS:
            described[store] = f"postgresql ({redact(self.url)})"
        return described


# What the server answers for a setting to change, not a network to wait for: SQLSTATE classes 28 (authentication)
# and 3D (no such database), 42501 (permission); when connecting, libpq gives only the server's message.
_CONFIG_SQLSTATES = ("28", "3D", "42501")
_CONFIG_MESSAGES = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # database or role
    "permission denied",
    "no password supplied",
    "certificate",
    "ssl",
)


def database_error(url: str, exc: Exception) -> Exception:
    """What a failure to reach the database at ``url`` means (the password never shown): ``ConfigError`` when the
    server answered that a setting is wrong (authentication, an unknown database or role, a permission: SQLSTATE
    28xxx, 3D000, 42501, or the same in the server's message when libpq gives no SQLSTATE); ``ConnectionError``
    when it did not answer (refused, timed out, unknown host: no SQLSTATE, or class 08) or is busy (too many
    connections, starting up)."""
    from traboule.errors import ConfigError
    from traboule.stores.postgres import redact

    text = " ".join(str(exc).replace(url, redact(url)).split())
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    message = text.lower().split("fatal:", 1)[1] if "fatal:" in text.lower() else ""
    pgconn = getattr(exc, "pgconn", None)
    if sqlstate.startswith(_CONFIG_SQLSTATES) or (
        not sqlstate
        and (any(m in message for m in _CONFIG_MESSAGES) or bool(pgconn is not None and pgconn.needs_password))
    ):
        return ConfigError(f"database {redact(url)}: {text}")
    return ConnectionError(f"database {redact(url)}: {type(exc).__name__}: {text}".strip())


def stores_of(runtime: Any) -> StoreFactory:
    """The store factory of a channel's runtime: its ``stores``; SQLite files in its ``data_dir`` for a runtime that
    has none (a test double or a tool building a channel with only ``config`` and ``data_dir``)."""
    found = getattr(runtime, "stores", None)
    return found if found is not None else SQLiteStores(Path(runtime.data_dir))
