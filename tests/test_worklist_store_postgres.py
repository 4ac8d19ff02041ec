"""The PostgreSQL worklist store: the SQLite store's query cases on it, and what several nodes on one database need.

The backend-neutral cases of ``tests/test_worklist_store.py`` run here again on `PostgresWorklistStore` (they are
imported, and take this module's ``store`` fixture); the SQLite-specific ones (query plan, raw rows, the full-scan
equivalence that opens its own file) have their PostgreSQL counterpart below. A real PostgreSQL server runs them
(``tests/peer_postgres.py``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from tests.peer_dcmtk import mwl_item
from tests.test_worklist_store import (
    ITEM,
    ITEM_EXTRAS,
    QUERY,
    accessions,
    build_item,
    build_query,
    modality_query,
    test_a_replayed_idempotency_key_changes_nothing,
    test_apply_is_one_transaction,
    test_apply_then_get_round_trips_the_dataset,
    test_case_insensitive_names_use_the_same_fold_in_sql_and_matcher,
    test_completed_cancelled_and_discontinued_items_are_not_offered,
    test_find_sees_an_update_despite_the_decoded_cache,
    test_find_stops_after_its_item_budget,
    test_find_stops_at_its_deadline_and_when_told_even_while_nothing_matches,
    test_get_returns_a_copy_that_does_not_leak_into_find,
    test_hostile_wildcards_in_the_sql_prefilter_stay_fast,
    test_invalid_query_raises_before_iteration,
    test_keys_for_patient_and_by_prefix,
    test_readers_do_not_fail_while_a_writer_writes,
    test_should_stop_interrupts_the_candidate_sql_itself,
    test_upsert_replaces_and_delete_removes,
)
from traboule import model, stores
from traboule.formats.dicom_match import QueryError, ScanStopped, compile_query
from traboule.formats.worklist_item import EncodedItem, dataset_columns, encode_item
from traboule.stores.postgres.worklist import PostgresWorklistStore, prefilter_sql
from traboule.stores.worklist import NOT_OFFERED
from traboule.translate.dicom_mapping import MWLMapping

pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR"), pytest.mark.timeout(120)]

SHARED_CASES = [  # run here on PostgreSQL with the fixture below
    test_a_replayed_idempotency_key_changes_nothing,
    test_apply_is_one_transaction,
    test_apply_then_get_round_trips_the_dataset,
    test_case_insensitive_names_use_the_same_fold_in_sql_and_matcher,
    test_completed_cancelled_and_discontinued_items_are_not_offered,
    test_find_sees_an_update_despite_the_decoded_cache,
    test_find_stops_after_its_item_budget,
    test_find_stops_at_its_deadline_and_when_told_even_while_nothing_matches,
    test_get_returns_a_copy_that_does_not_leak_into_find,
    test_hostile_wildcards_in_the_sql_prefilter_stay_fast,
    test_invalid_query_raises_before_iteration,
    test_keys_for_patient_and_by_prefix,
    test_readers_do_not_fail_while_a_writer_writes,
    test_should_stop_interrupts_the_candidate_sql_itself,
    test_upsert_replaces_and_delete_removes,
]


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresWorklistStore]:
    store = PostgresWorklistStore(pg_url)
    yield store
    store.close()


def test_it_is_a_worklist_store(store: PostgresWorklistStore) -> None:
    assert isinstance(store, stores.WorklistStore)


# -- several nodes on one database --------------------------------------------------------------------------------


def test_a_second_node_sees_a_committed_apply_at_once(pg_url: str) -> None:
    node_a, node_b = PostgresWorklistStore(pg_url), PostgresWorklistStore(pg_url)
    try:
        assert accessions(node_b.find(modality_query())) == []  # warm: B's pooled connection exists already
        assert node_a.apply_batch([([("o1#1", mwl_item(accession="A1"))], [], "event-1")], {"o1": 4}) == [True]
        assert accessions(node_b.find(modality_query())) == ["A1"]
        assert node_b.applied(["event-1"]) == {"event-1"} and node_b.order_seqs(["o1"]) == {"o1": 4}
        assert node_b.apply([("o1#1", mwl_item(accession="AGAIN"))], [], "event-1") is False  # A applied it
        node_b.apply([], ["o1#1"], "event-2")
        assert node_a.get("o1#1") is None and node_a.count() == 0
    finally:
        node_a.close()
        node_b.close()


def test_an_event_claimed_by_another_node_waits_for_its_commit_and_then_is_skipped(
    store: PostgresWorklistStore, pg_url: str
) -> None:
    """Node A's transaction holds the event's key: node B's apply of the same event waits; A commits, B applies
    nothing; A rolls back, B applies it."""
    for outcome, applied in (("commit", False), ("rollback", True)):
        key = f"event-{outcome}"
        with psycopg.connect(pg_url, autocommit=True) as other_node:
            other_node.execute("BEGIN")
            other_node.execute("INSERT INTO worklist_applied (idempotency_key) VALUES (%s)", (key,))
            result: list[bool] = []

            def apply(key: str = key, result: list[bool] = result) -> None:
                result.append(store.apply([(key, mwl_item(accession=key))], [], key))

            thread = threading.Thread(target=apply)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive() and result == []  # waiting on the other node's uncommitted key
            other_node.execute(outcome.upper())
            thread.join(10)
        assert result == [applied], outcome
        assert (store.get(key) is not None) is applied


def test_two_nodes_applying_the_same_events_at_once_apply_each_once(pg_url: str) -> None:
    nodes = [PostgresWorklistStore(pg_url), PostgresWorklistStore(pg_url)]
    rounds = 40
    results: dict[int, list[tuple[int, bool]]] = {i: [] for i in range(rounds)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(n: int) -> None:
        try:
            for i in range(rounds):
                barrier.wait(10)
                item = mwl_item(accession=f"N{n}-{i}")
                results[i].append((n, nodes[n].apply([(f"o{i}#1", item)], [], f"event-{i}")))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        for i, outcomes in results.items():
            winners = [n for n, applied in outcomes if applied]
            assert len(outcomes) == 2 and len(winners) == 1, outcomes
            stored = nodes[0].get(f"o{i}#1")
            assert stored is not None and stored.AccessionNumber == f"N{winners[0]}-{i}"
        assert nodes[1].count() == rounds
    finally:
        for node in nodes:
            node.close()


def test_batches_locking_in_opposite_orders_on_two_nodes_all_commit(pg_url: str) -> None:
    """Two nodes upserting the same keys in opposite orders may deadlock: the loser's batch is retried whole."""
    nodes = [PostgresWorklistStore(pg_url), PostgresWorklistStore(pg_url)]
    keys = [f"o{i}#1" for i in range(20)]
    rounds = 4  # a deadlock costs the server's deadlock_timeout (1 s) to detect
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(n: int) -> None:
        try:
            for i in range(rounds):
                barrier.wait(10)
                order = keys if n == 0 else keys[::-1]
                batch = [([(k, mwl_item(accession=f"N{n}-{i}"))], [], f"n{n}-{i}-{k}") for k in order]
                assert nodes[n].apply_batch(batch, {"o": i}) == [True] * len(keys)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert errors == []
        assert nodes[0].count() == len(keys) and nodes[1].order_seqs(["o"]) == {"o": rounds - 1}
        every_event = [f"n{n}-{i}-{k}" for n in (0, 1) for i in range(rounds) for k in keys]
        assert nodes[0].applied(every_event) == set(every_event)
    finally:
        for node in nodes:
            node.close()


# -- find ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["deadline", "stopped"])
def test_a_waiting_candidate_statement_is_cancelled(store: PostgresWorklistStore, pg_url: str, limit: str) -> None:
    """The candidate statement itself ends at the deadline or when told, not at the server's statement timeout:
    here it waits behind another session's exclusive lock."""
    store.apply([("o1#1", mwl_item())], [])
    with psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("LOCK TABLE worklist_items IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        if limit == "deadline":
            found = store.find(modality_query(), deadline=started + 0.3)
        else:
            found = store.find(modality_query(), should_stop=lambda: time.monotonic() > started + 0.3)
        with pytest.raises(ScanStopped) as stopped:
            next(found)
        assert (stopped.value.reason, stopped.value.examined) == (limit, 0)
        assert time.monotonic() - started < 3
        other.execute("ROLLBACK")
    assert accessions(store.find(modality_query(), deadline=time.monotonic() + 5)) == ["ACC0001"]  # pool is sane


def test_the_item_budget_bounds_the_candidate_statement(store: PostgresWorklistStore) -> None:
    item = mwl_item()
    encoded = EncodedItem(encode_item(item), dataset_columns(item), lambda: item)
    store.apply([(f"o{i:03}#1", encoded) for i in range(300)], [])
    sql, params = prefilter_sql(compile_query(modality_query()), 11)
    assert sql.endswith("ORDER BY id LIMIT %s") and params[-1] == 11
    found = store.find(modality_query(), max_examined=10)
    assert len(list(itertools.islice(found, 10))) == 10
    with pytest.raises(ScanStopped) as stopped:
        next(found)
    assert (stopped.value.reason, stopped.value.examined) == ("max_examined", 10)
    assert len(list(store.find(modality_query(), max_examined=300))) == 300  # exactly the budget: no stop


def test_wild_cards_become_like_patterns_matching_literal_percent_and_underscore(store: PostgresWorklistStore) -> None:
    store.apply(
        [
            ("a", mwl_item(accession="A", patient_id="50%_OFF")),
            ("b", mwl_item(accession="B", patient_id="50XYOFF")),
            ("c", mwl_item(accession="C", patient_id="50%_ON")),
        ],
        [],
    )
    for pattern, expected in (("50%_O*", ["A", "C"]), ("50??OFF", ["A", "B"]), ("50_*", []), ("*%*", ["A", "C"])):
        query = modality_query()
        query.PatientID = pattern
        assert "patient_id LIKE %s" in prefilter_sql(compile_query(query))[0]
        assert accessions(store.find(query)) == expected, pattern
    store.apply([("a_%1", mwl_item()), ("ab%2", mwl_item()), ("a_x3", mwl_item())], [])
    assert store.keys_with_prefix("a_%") == ["a_%1"] and store.keys_with_prefix("a_") == ["a_%1", "a_x3"]


def test_keys_of_several_prefixes_in_one_statement_are_those_of_each_prefix(store: PostgresWorklistStore) -> None:
    keys = ["o1#1", "o1#2", "o10#1", "o1$", "o2#1", "a_%1", "ab%2", "é#1", "\U0010ffff#1"]
    store.apply([(k, mwl_item()) for k in keys], [], "prefixes")
    store.apply([("o2#1", mwl_item())], ["o2#1"], "")
    prefixes = ["o1#", "o10#", "o2#", "a_%", "é#", "zz", "\U0010ffff", "n\x00", "o1#"]
    found = store.keys_with_prefixes(prefixes)
    assert found == {p: store.keys_with_prefix(p) for p in prefixes}
    assert found["o1#"] == ["o1#1", "o1#2"] and found["o2#"] == [] and found["\U0010ffff"] == ["\U0010ffff#1"]


def test_a_batch_deleting_then_upserting_a_key_applies_them_in_order(store: PostgresWorklistStore) -> None:
    store.apply([("k#1", mwl_item(accession="A"))], [])
    changes = [
        ([("k#2", mwl_item(accession="B"))], ["k#1"], "e1"),
        ([("k#1", mwl_item(accession="C"))], [], "e2"),
        ([("k#3", mwl_item(accession="D"))], [], "e1"),  # claimed earlier in the batch: skipped
        ([], ["k#2"], "e3"),
    ]
    assert store.apply_batch(changes, {"k": 3}) == [True, True, False, True]
    assert store.keys_with_prefix("k#") == ["k#1"] and store.get("k#1").AccessionNumber == "C"
    assert store.order_seqs(["k"]) == {"k": 3} and store.applied(["e1", "e2", "e3", "e4"]) == {"e1", "e2", "e3"}


def test_nul_characters_are_stored_and_queried_without_the_prefilter(store: PostgresWorklistStore) -> None:
    """PostgreSQL text holds no NUL: such an index value is left to the matcher, on both sides."""
    store.apply([("nul", mwl_item(accession="N", patient_id="P\x001")), ("x", mwl_item(accession="X"))], [])
    query = modality_query()
    query.PatientID = "P\x001"
    assert accessions(store.find(query)) == ["N"]
    query.PatientID = "P\x00*"
    assert accessions(store.find(query)) == ["N"]
    assert store.keys_for_patient("P\x001", "CHU-X") == [] and store.get("x\x00") is None
    assert store.keys_with_prefix("n\x00") == [] and store.applied(["k\x00"]) == set()
    assert store.apply([], ["nul\x00"], "delete-nul") is True and store.count() == 2  # an absent key
    with pytest.raises(psycopg.DataError):
        store.apply([("key\x00", mwl_item())], [], "refused")
    assert store.applied(["refused"]) == set()


def test_modality_query_is_served_by_the_sps_index(store: PostgresWorklistStore, pg_url: str) -> None:
    item = mwl_item()
    rows = []
    for i in range(3000):
        ds = mwl_item(start_date=f"202403{i % 28 + 1:02}", modality=("CT", "MR", "US")[i % 3])
        rows.append((f"o{i}#1", EncodedItem(encode_item(ds), dataset_columns(ds), lambda: item)))
    store.apply(rows, [])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ANALYZE worklist_items")
    plan = "\n".join(
        store.explain(
            modality_query(ScheduledProcedureStepStartDate="20240315", Modality="CT", ScheduledStationAETitle="CT01")
        )
    )
    assert "worklist_items_sps" in plan and "start_date = '20240315'" in plan, plan
    plan = "\n".join(store.explain(modality_query(ScheduledProcedureStepStartDate="20240301-20240302")))
    assert "worklist_items_sps" in plan and "start_date >= '20240301'" in plan, plan
    assert "worklist_items_inexact" in plan or "NOT exact" in plan, plan


def test_encoded_items_are_stored_like_their_datasets(store: PostgresWorklistStore, pg_url: str) -> None:
    """The MWL mapping's fast path: an EncodedItem gives the row (index columns, bytes) its Dataset gives."""
    order = model.ImagingOrder(
        accession_number=model.Identifier("ACC9", "CHU-X"),
        requested_procedure_id="RP9",
        study_instance_uid="1.2.3.9",
        patient=model.Patient(ids=[model.Identifier("P9", "CHU-X")], name=model.PersonName("KOWALSKI", "Łukasz")),
        steps=[
            model.ScheduledStep(step_id=f"S{i}", modality="CT", station_aet="CT01", start="202403150930")
            for i in (1, 2)
        ],
    )
    items = [item for _, item in MWLMapping().encoded_items(order)]
    assert all(isinstance(item, EncodedItem) for item in items)
    store.apply([("enc#1", items[0])], [])
    assert store.apply_batch([([("enc#2", items[1]), ("ds#1", items[0].dataset)], [], "m1"), ([], [], "m2")]) == [
        True,
        True,
    ]
    store.apply([("ds#2", items[1].dataset)], [])
    with psycopg.connect(pg_url) as conn:
        cursor = conn.execute("SELECT * FROM worklist_items")
        columns = [d[0] for d in cursor.description or ()]
        rows = {r[columns.index("key")]: r for r in cursor}
    varying = {columns.index("id"), columns.index("key"), columns.index("updated")}
    for i in (1, 2):
        enc, ds = rows[f"enc#{i}"], rows[f"ds#{i}"]
        assert [v for n, v in enumerate(enc) if n not in varying] == [v for n, v in enumerate(ds) if n not in varying]
        assert store.get(f"enc#{i}") == store.get(f"ds#{i}")
    assert rows["enc#1"][columns.index("patient_name")] == "KOWALSKI^Łukasz"
    q = modality_query(Modality="CT")
    q.PatientName = "KOWALSKI*"
    found = list(store.find(q))
    assert len(found) == 4 and {str(ds.PatientName) for ds in found} == {"KOWALSKI^Łukasz"}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    items=st.lists(st.tuples(ITEM, ITEM_EXTRAS), min_size=1, max_size=16),
    queries=st.lists(QUERY, min_size=1, max_size=8),
    case_insensitive=st.booleans(),
)
def test_find_equals_a_full_scan(
    store: PostgresWorklistStore,
    items: list[tuple[dict[str, object], dict[str, object]]],
    queries: list[dict[str, str]],
    case_insensitive: bool,
) -> None:
    """The PostgreSQL prefilter never changes what matches (the same property as the SQLite store's)."""
    datasets = {f"k{i}": build_item(i, fields, extras) for i, (fields, extras) in enumerate(items)}
    store.apply([], [key for key, _ in store.all()])  # one store for every example: start empty
    store.apply(list(datasets.items()), [])
    for keys in queries:
        q = build_query(keys)
        try:
            compiled = compile_query(q, case_insensitive_names=case_insensitive)
        except QueryError:
            with pytest.raises(QueryError):
                store.find(q, case_insensitive_names=case_insensitive)
            continue
        expected = sorted(
            str(compiled.response(ds).to_json_dict())
            for ds in datasets.values()
            if ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus not in NOT_OFFERED
            and compiled.matches(ds)
        )
        found = sorted(str(ds.to_json_dict()) for ds in store.find(q, case_insensitive_names=case_insensitive))
        assert found == expected, keys


def _dataset_with_two_steps() -> Dataset:
    item = mwl_item(accession="TWO")
    other = Dataset()
    other.Modality = "US"
    other.ScheduledStationAETitle = "US01"
    other.ScheduledProcedureStepStartDate = "20240316"
    item.ScheduledProcedureStepSequence.append(other)
    return item


def test_an_item_the_columns_cannot_describe_is_always_a_candidate(store: PostgresWorklistStore) -> None:
    store.apply([("two#1", _dataset_with_two_steps()), ("one#1", mwl_item(accession="ONE"))], [])
    assert accessions(store.find(modality_query(Modality="US"))) == ["TWO"]  # its second step's modality
    assert accessions(store.find(modality_query(ScheduledProcedureStepStartDate="20240315"))) == ["ONE", "TWO"]


# -- connections --------------------------------------------------------------------------------------------------


def test_the_first_finds_and_apply_after_a_server_restart_succeed() -> None:
    """Four pooled reader connections (and the writer) from before a restart of the server: no C-FIND's read and
    no apply fails after it; while the server is down a read fails at once, it does not hang."""
    from tests.test_ha import private_postgres, start_postgres, stop_postgres

    with private_postgres() as server:
        store = PostgresWorklistStore(server.url(server.create_database()), pool_size=4)
        try:
            store.apply([("o1#1", mwl_item(accession="A1"))], [], "event-1")
            held = [store._readers.acquire() for _ in range(4)]
            for conn in held:
                store._readers.release(conn)
            assert store._readers.idle == 4
            stop_postgres(server)
            with pytest.raises(psycopg.OperationalError):
                store.count()
            start_postgres(server)
            for _ in range(10):
                assert accessions(store.find(modality_query())) == ["A1"]
                assert accessions(store.find(modality_query(), deadline=time.monotonic() + 30)) == ["A1"]
            assert store.apply([("o2#1", mwl_item(accession="A2"))], [], "event-2") is True
            assert store.count() == 2 and store.applied(["event-1", "event-2"]) == {"event-1", "event-2"}
        finally:
            store.close()


def test_the_reader_pool_is_bounded(pg_url: str) -> None:
    """At most ``size`` connections are open at once: one more read waits for one to be handed back, or fails with
    _PoolTimeout (an OperationalError: the database is unavailable for now) after ``wait_s``."""
    from traboule.stores.postgres.pool import ReaderPool, _PoolTimeout

    pool = ReaderPool(pg_url, size=2, wait_s=0.3)
    try:
        held = [pool.acquire(), pool.acquire()]
        started = time.monotonic()
        with pytest.raises(_PoolTimeout):
            pool.read(lambda conn: conn.execute("SELECT 1").fetchone())
        assert 0.25 < time.monotonic() - started < 5
        threading.Timer(0.2, pool.release, (held.pop(),)).start()
        assert pool.read(lambda conn: conn.execute("SELECT 1").fetchone()) == (1,)  # waited for the one released
        with pytest.raises(psycopg.errors.DivisionByZero):  # a statement's own error: raised, not retried
            pool.read(lambda conn: conn.execute("SELECT 1/0").fetchone())
        assert pool.idle == 1  # its session lives on: kept
        pool.release(held.pop())
        assert pool.idle == 2
    finally:
        pool.close()
    assert pool.idle == 0
