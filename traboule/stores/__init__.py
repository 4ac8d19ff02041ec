"""What the channels, the runtime and the HTTP API ask of each store, and the guarantees every backend keeps.

One `typing.Protocol` per store, as narrow as its callers (channels/, traboule/app/); a backend implements it and
passes ``tests/test_store_contracts.py`` (parametrised by backend). SQLite (opened through
`traboule.stores.sqlite.open_database`) implements every store; PostgreSQL (``traboule/stores/postgres/``, schema
migrations in ``migrations.py``) implements every one too (and ``postgres.idempotency`` the idempotent consumer;
the reports store's rules are ``ReportPublisher``'s on both, over ``reports.ReportStorage``):

==================  ===================================================  ===================================
protocol            SQLite implementation (file)                         PostgreSQL implementation
==================  ===================================================  ===================================
`Journal`           `journal.SQLiteJournal` (``journal.sqlite``)         `postgres.journal.PostgresJournal`
`WorklistStore`     `worklist.SQLiteWorklistStore` (``<channel>``)       `postgres.worklist`
`FHIRStore`         `fhir_store.SQLiteFHIRStore` (``<channel>``)         `postgres.fhir_store`
`ReportStore`       `reports.ReportPublisher` (``<channel>.reports``)    `postgres.reports`
`PatientRegistry`   `patient_identity.PatientIdentities` (``patients``)  `postgres.patient_identity`
`MPPSStates`        `mpps_state.SQLiteMPPSStates` (``<channel>``)        `postgres.mpps_state`
`SubmissionStore`   `submissions.SQLiteSubmissions` (``<channel>``)      `postgres.submissions`
`SenderState`       `sender_state.SQLiteSenderState` (``<channel>``)     `postgres.sender_state`
==================  ===================================================  ===================================

Common to all: "durable" means a commit that survives power loss (``Durability.POWER_LOSS``), and a method that
writes has committed when it returns (unless it runs inside the store's ``transaction()``, which commits at its
end). Data committed before ``close()`` is there when the store is opened again. Readers see committed data only,
never a half-applied change. A store is used from the event loop's thread and from worker threads
(``asyncio.to_thread``); the notes of each protocol say which calls may run concurrently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio

    from pydicom.dataset import Dataset

    from traboule import model
    from traboule.stores.journal import JournalEntry, OutboxEvent, Query
    from traboule.stores.mpps_state import HeldInstance, MPPSInstance
    from traboule.stores.patient_identity import Pair
    from traboule.stores.reports import Held
    from traboule.stores.sender_state import KnownOrder
    from traboule.stores.submissions import Submission
    from traboule.stores.worklist import Change, Item

__all__ = [
    "FHIRStore",
    "Journal",
    "MPPSStates",
    "PatientRegistry",
    "ReportStore",
    "SenderState",
    "SubmissionStore",
    "WorklistStore",
]


@runtime_checkable
class Journal(Protocol):
    """Every inbound message, stored before it is acknowledged, with the events it produced (transactional outbox).

    * ``append`` returns once the entry, and the events of an accepted entry, are durable: the caller answers the
      sender only then. When it raises (``DiskFull``: less than ``min_free_bytes`` free; an I/O error; closed),
      nothing of the entry is stored and the sender must not be acknowledged. The entry comes back with its
      ``id``: ids grow in commit order.
    * Idempotent ingest: an ``accepted`` entry whose idempotency key an earlier accepted entry has is stored as
      ``duplicate`` (a warning names the first) and its events are dropped. Entries of any other status carry no
      events.
    * Outbox: ``pending_events`` gives the events not yet confirmed, in the order they were journaled (entry by
      entry, each entry's in the order given); ``events_published`` confirms some, which ``pending_events`` and
      ``outbox_depth`` leave out at once, though forgetting them may be committed later: a crash before that
      publishes them again (at least once; consumers are idempotent). ``outbox_ready`` is set when an append or
      ``append_events`` adds events; the dispatcher clears it.
    * ``append_events`` adds events (and a note to its warnings) to the accepted entry of a key in one durable
      transaction; 0, and nothing written, when no accepted entry has that key.
    * ``prune`` forgets entries received before a time, never one with events still in the outbox nor one whose
      idempotency key is in ``keep``; a pruned message is no longer recognised as a duplicate.
    * ``close`` commits what was queued; after it, ``append`` raises.

    Writes (``append``, ``append_events``, ``events_published``, ``close``) run on the event loop's thread;
    concurrent ``append`` calls of one loop iteration may share one commit (group commit).
    """

    outbox_ready: asyncio.Event
    min_free_bytes: int

    async def append(self, entry: JournalEntry, events: list[OutboxEvent] | None = None) -> JournalEntry: ...

    def append_events(self, idempotency_key: str, events: list[OutboxEvent], note: str = "") -> int: ...

    async def events_published(self, ids: list[int]) -> None: ...

    def pending_events(self, limit: int = 500) -> list[OutboxEvent]: ...

    def outbox_depth(self) -> int: ...

    def outbox_of(self, message_id: int) -> list[OutboxEvent]:
        """The events of one entry still in the outbox, in their order."""
        ...

    def disk_free(self, *, fresh: bool = False) -> int: ...

    def accepted(self, idempotency_key: str) -> bool: ...

    def get(self, entry_id: int) -> JournalEntry | None: ...

    def recent(self, limit: int = 50, status: str | None = None) -> list[JournalEntry]:
        """The latest entries, newest first (of one status when given)."""
        ...

    def last_id(self) -> int: ...

    def select(self, query: Query, *, after: int = 0, limit: int = 100) -> list[JournalEntry]:
        """Entries matching ``query`` with an id above ``after``, in id order (page on with the last id)."""
        ...

    def count(self, query: Query, *, after: int = 0) -> int: ...

    def prune(self, before: str, keep: Iterable[str] = ()) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class WorklistStore(Protocol):
    """Modality worklist items keyed by the caller's key (order key + step), queried with PS3.4 C-FIND semantics.

    * ``apply_batch`` applies its changes in order in one durable transaction: all of them or, when it raises, none.
      A change whose idempotency key was applied before (earlier in the same batch too) is skipped: the result
      says which were applied. ``seqs`` (journal sequence per order key) is stored in the same transaction, and
      only ever grows (``order_seqs`` gives the highest recorded). ``apply`` is a batch of one.
    * An upsert replaces the item of its key; a delete of an absent key is no error.
    * ``get`` and ``all`` return fresh datasets the caller may modify without changing the store or ``find``.
      Keys come in key order.
    * ``find`` answers a C-FIND: the requested keys of the matching items, never an item whose SPS status is
      CANCELLED, COMPLETED or DISCONTINUED; it raises ``QueryError`` at the call for an unusable query, and
      ``ScanStopped`` while iterating past ``max_examined``, ``deadline`` or ``should_stop``.
    * Safe from many threads: readers (``find`` from the MWL SCP's threads) never wait for the writer and see only
      committed batches.
    """

    def apply(self, upserts: list[tuple[str, Item]], deletes: list[str], idempotency_key: str = "") -> bool: ...

    def apply_batch(self, changes: list[Change], seqs: dict[str, int] | None = None) -> list[bool]: ...

    def applied(self, idempotency_keys: list[str]) -> set[str]: ...

    def order_seqs(self, order_keys: list[str]) -> dict[str, int]: ...

    def get(self, key: str) -> Dataset | None: ...

    def keys_for_patient(self, patient_id: str, issuer: str) -> list[str]: ...

    def keys_for_accession(self, accession: str) -> list[str]: ...

    def keys_with_prefix(self, prefix: str) -> list[str]: ...

    def count(self) -> int: ...

    def all(self, limit: int | None = None) -> Iterator[tuple[str, Dataset]]: ...

    def find(
        self,
        query: Dataset,
        *,
        case_insensitive_names: bool = False,
        max_examined: int = 0,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Dataset]: ...

    def close(self) -> None: ...


@runtime_checkable
class FHIRStore(Protocol):
    """The current version of each FHIR resource a ``fhir`` channel serves, searchable, and what a FHIR server holds.

    * ``upsert`` writes a resource (its ``resourceType`` and ``id`` say where) and sets ``meta.versionId`` (1, then
      +1 per change) and ``meta.lastUpdated``. Idempotent: the same content (everything but ``meta``, its tags
      excepted) makes no new version and returns False. ``seq`` (the journal sequence of the event) orders writes:
      one older than the stored resource's changes nothing (False), so a late retry never brings back an older
      state.
    * ``transaction()`` makes everything inside one durable transaction (it nests; other callers wait): an event's
      resources are all stored or, when it raises, none.
    * ``search`` gives the total and one page of the resources matching every parameter (a comma: "or"; a list:
      "and"), in the order they were first stored; tokens as ``system|value``, ``value``, ``|value``, ``system|``.
      A parameter the store does not support raises ``SearchError`` (never a silent match-all). A deleted
      DocumentReference (PDSm) and an ``entered-in-error`` DiagnosticReport are found by no search.
    * ``document_of_binary`` finds the DocumentReference whose attachment is ``Binary/<id>`` (the newest when
      several are; a deleted one too), None when none is: one indexed lookup (the audit of an MHD retrieve
      names the document's patient and unique id by it).
    * Remote copies: ``set_remote`` records the version a FHIR server holds (it never goes back), ``unpushed`` counts
      resources whose current version no server has, ``forget_remote`` forgets them all (returns every resource).
    * Safe from worker threads (``asyncio.to_thread``); calls are serialised.
    """

    def transaction(self) -> AbstractContextManager[None]: ...

    def upsert(self, resource: dict[str, Any], seq: int = 0) -> bool: ...

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None: ...

    def seq_of(self, rtype: str, rid: str) -> int: ...

    def get_with_remote(self, rtype: str, rid: str) -> tuple[dict[str, Any] | None, tuple[int, str] | None]: ...

    def set_remote(self, rows: list[tuple[str, str, int, str]]) -> None: ...

    def forget_remote(self) -> list[tuple[str, str]]: ...

    def unpushed(self) -> int: ...

    def holders(self, rtype: str, value: str) -> list[tuple[str, str]]: ...

    def by_subject(self, rtype: str, subject: str, include_deleted: bool = True) -> list[dict[str, Any]]: ...

    def count_tagged(self, rtype: str, tag: dict[str, str], without: dict[str, str] | None = None) -> int: ...

    def count(self, rtype: str | None = None) -> int: ...

    def search(
        self, rtype: str, params: dict[str, str | list[str]], count: int = 20, offset: int = 0
    ) -> tuple[int, list[dict[str, Any]]]: ...

    def withdrawn_binary(self, binary_id: str) -> bool: ...

    def document_of_binary(self, binary_id: str) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


@runtime_checkable
class ReportStore(Protocol):
    """The documents an inbound channel made of reports (sets, versions), what makes their catalog, and the reports
    waiting for their study.

    * ``prepare`` runs before the report's message is journaled and answered: what it stores (a new version, a
      waiting report) is durable when it returns. Idempotent per message key: the same message prepares the same
      document again (no new version) or is held again (``Held.new`` False). ``ReportRefused``: nothing stored.
    * ``discard`` undoes what ``prepare`` stored for a message that was not journaled after all (the version it
      superseded or deleted is current again); ``reconcile`` does so at start for the recent messages the journal
      does not hold as accepted (``journaled(message_key) -> bool``).
    * ``remember`` stores orders, studies and performed steps in one transaction; each new study or step bumps
      ``changes`` (the waiting task rescans on a change).
    * Waiting reports: ``publish_waiting`` publishes one whose study is known (the row and the document in one
      transaction), ``expire`` turns those past their deadline into dead letters, ``unnoted`` lists the outcomes
      not yet written to their journal entries until ``noted``; ``scan`` pages through them in row order.
    * Several stores of one channel on one database (nodes) never number one version twice nor lose one, and a
      message prepared by two of them at once makes one version; a waiting report is published by one of them
      (``publish_waiting`` of the others: None); ``requested`` hands each ask to one.
    * Blocking calls, serialised: run them in a thread.
    """

    validator: Any  # the CDA validator (None: not validated)
    same_patient: Callable[[model.Patient, model.Patient], bool]  # whether a catalog source is the report's patient
    changes: int

    def prepare(self, report: model.Report, message_key: str) -> model.Document | Held: ...

    def discard(self, message_key: str) -> bool: ...

    def reconcile(self, journaled: Any, recent: int = 100) -> int: ...

    def journaled(self, message_key: str, journal_id: int) -> None: ...

    def remember(self, payloads: list[Any]) -> None: ...

    def missing_study(self, report: model.Report) -> tuple[str, str] | None: ...

    def document(self, doc_id: str) -> model.Document | None: ...

    def counts(self) -> dict[str, int]: ...

    def publish_waiting(self, message_key: str) -> model.Document | None: ...

    def waiting_for(self, study_uids: Any, accessions: Any) -> list[str]: ...

    def scan(self, after: int, limit: int) -> list[tuple[int, str, str, str, bool]]: ...

    def held(self, message_key: str) -> dict[str, Any] | None: ...

    def expire(self, now: float | None = None) -> int: ...

    def requested(self) -> list[str]: ...

    def unnoted(self) -> list[dict[str, Any]]: ...

    def noted(self, n: int, journal_id: int = 0) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PatientRegistry(Protocol):
    """The INS each IPP was accepted with, the patient each order key belongs to, and the merges; shared by the
    inbound channels (and processes) of one engine.

    * ``check`` (before the journal write) refuses a message that contradicts what is recorded or reserved
      (``MappingFailure``) and reserves what it lets through, so that two messages in flight cannot both be
      accepted with different INS for one IPP; ``check_order`` does the same for the keys of an order.
      ``release`` frees the reservations of a message that was not accepted; ``record`` writes what an accepted
      message says (idempotent: a redelivery records nothing new).
    * INS pairs and merges are durable when ``record`` returns. The owners of order keys may be written a moment
      later (a crash may lose the last ones): ``mark`` gives the highest journal id of a channel whose owners are
      written, and ``rebuild`` records again what the journal holds after it, so nothing the journal acknowledged
      is unknown to the checks after a restart.
    * ``same_patient`` and ``resolve_merged`` follow merges (a merged IPP is its survivor).
    * Thread-safe; ``close`` writes what is held in memory. ``off_loop``: its calls wait for a database server
      (PostgreSQL), so an asyncio caller makes them on a thread; False (SQLite), they are made on the loop.
    """

    off_loop: bool

    def check(self, payloads: Iterable[Any]) -> list[str]: ...

    def check_order(self, payloads: Iterable[Any]) -> None: ...

    def check_report(self, payloads: Iterable[Any]) -> None: ...

    def check_step(self, step: model.PerformedStep) -> None: ...

    def check_study(self, study: model.Study) -> None: ...

    def release(self, payloads: Iterable[Any]) -> None: ...

    def record(self, payloads: Iterable[Any], *, channel: str = "", journal_id: int = 0) -> None: ...

    def resolve_merged(self, payloads: Iterable[Any]) -> list[str]: ...

    def same_patient(self, a: model.Patient, b: model.Patient) -> bool: ...

    def mark(self, channel: str) -> int: ...

    def rebuild(self, entries: Iterable[tuple[int, str, list[Any]]], channel: str) -> int: ...

    def forget(self, ipp: str) -> list[Pair]: ...

    def show(self, ipp: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class MPPSStates(Protocol):
    """The state of each MPPS instance of one ``mpps`` channel (status, merged attribute list), keyed by its SOP
    Instance UID.

    * ``async with hold(uid) as held`` yields the instance (``held.current``: None when unknown) and keeps it to the
      caller until the block ends: another hold of the same instance, by another store on the same data (another
      node), waits until then and reads what this one saved. ``held.save`` writes the new state, committed when
      the block ends without raising (rolled back when it raises). The caller checks, journals and saves in one
      hold, so two requests for one instance never both apply. The waits run off the event loop.
    * One hold at a time per store; ``get`` reads the committed state.
    """

    def get(self, uid: str) -> MPPSInstance | None: ...

    def hold(self, uid: str) -> AbstractAsyncContextManager[HeldInstance]: ...

    def close(self) -> None: ...


@runtime_checkable
class SubmissionStore(Protocol):
    """The document versions one ``xds`` channel submitted: entryUUID and status by uniqueId.

    * ``begin`` stores a version as ``sending`` with its entryUUID, unless it is stored already: the stored one
      comes back (an entry keeps the entryUUID it was first given). ``skip`` stores a version not for the
      registry (``skipped``), unless stored already.
    * ``registered`` marks a version registered and the one it replaces ``replaced``, in one transaction;
      ``deleted`` marks it deleted; ``refused`` marks a ``sending`` version refused (False, nothing changed, in
      any other status).
    * ``claim(uid)`` yields True when the caller has the document to itself until the block ends, False at once
      when another caller, of this store or of another one on the same data (another node), has it: two callers
      never submit one version at the same time.
    """

    def get(self, unique_id: str) -> Submission | None: ...

    def claim(self, unique_id: str) -> AbstractContextManager[bool]: ...

    def begin(self, unique_id: str, entry_uuid: str, set_id: str) -> Submission: ...

    def skip(self, unique_id: str, set_id: str) -> None: ...

    def registered(self, unique_id: str, submission_set: str, replaced: str = "") -> None: ...

    def deleted(self, unique_id: str) -> None: ...

    def refused(self, unique_id: str) -> bool: ...

    def close(self) -> None: ...


@runtime_checkable
class SenderState(Protocol):
    """What one HL7 v2 sender channel keeps: the marks of the events its receiver accepted (as
    `traboule.stores.idempotency.AppliedKeys`), the orders it has seen by accession number, the documents whose
    message the receiver has not taken yet.

    * ``mark_done`` keeps the first mark (False when the key was marked already, by this store or another on the
      same data); with ``clear_pending`` it also forgets that pending document, in the same transaction: both or
      neither.
    * ``remember_order`` replaces what was known of an accession number; ``set_pending`` of a pending document and
      a clear of one not pending change nothing.
    """

    def is_done(self, key: str) -> bool: ...

    def detail(self, key: str) -> str | None: ...

    def mark_done(self, key: str, detail: str = "", *, clear_pending: str = "") -> bool: ...

    def remember_order(self, accession: str, order: KnownOrder) -> None: ...

    def known_order(self, accession: str) -> KnownOrder | None: ...

    def set_pending(self, document_id: str) -> None: ...

    def is_pending(self, document_id: str) -> bool: ...

    def close(self) -> None: ...
