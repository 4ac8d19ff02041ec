"""The worklist store: transactions, idempotency, and a SQL prefilter that never changes what matches."""

from __future__ import annotations

import itertools
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from tests.peer_dcmtk import mwl_item
from traboule import model
from traboule.formats.dicom_match import QueryError, ScanStopped, compile_query
from traboule.formats.worklist_item import EncodedItem, dataset_columns, encode_item
from traboule.stores.worklist import NOT_OFFERED, WorklistStore, prefilter_sql
from traboule.translate.dicom_mapping import MWLMapping

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")  # range and wild card query values


@pytest.fixture
def store(tmp_path: Path) -> Iterator[WorklistStore]:
    store = WorklistStore(str(tmp_path / "worklist.sqlite"))
    yield store
    store.close()


def modality_query(**sps: str) -> Dataset:
    q = Dataset()
    q.SpecificCharacterSet = ""
    q.AccessionNumber = ""
    q.PatientName = ""
    step = Dataset()
    step.ScheduledProcedureStepStartDate = ""
    for keyword, value in sps.items():
        setattr(step, keyword, value)
    q.ScheduledProcedureStepSequence = [step]
    return q


def accessions(found: Iterator[Dataset]) -> list[str]:
    return sorted(ds.AccessionNumber for ds in found)


def test_apply_then_get_round_trips_the_dataset(store: WorklistStore) -> None:
    item = mwl_item(charset="ISO_IR 192", patient_name="KOWALSKI^Łukasz")
    assert store.apply([("o1#1", item)], []) is True
    stored = store.get("o1#1")
    assert stored == item
    assert stored is not None and stored.PatientName == "KOWALSKI^Łukasz"
    assert store.get("missing") is None
    assert store.count() == 1


def test_a_replayed_idempotency_key_changes_nothing(store: WorklistStore) -> None:
    assert store.apply([("o1#1", mwl_item())], [], idempotency_key="msg-1") is True
    assert store.apply([("o1#1", mwl_item(accession="CHANGED")), ("o2#1", mwl_item())], [], "msg-1") is False
    assert store.get("o1#1").AccessionNumber == "ACC0001"  # type: ignore[union-attr]
    assert store.count() == 1


def test_upsert_replaces_and_delete_removes(store: WorklistStore) -> None:
    store.apply([("o1#1", mwl_item()), ("o2#1", mwl_item(accession="ACC0002"))], [])
    store.apply([("o1#1", mwl_item(accession="ACC0001-B"))], ["o2#1"])
    assert [key for key, _ in store.all()] == ["o1#1"]
    assert accessions(store.find(modality_query())) == ["ACC0001-B"]


def test_apply_is_one_transaction(store: WorklistStore) -> None:
    store.apply([("keep", mwl_item())], [])
    with pytest.raises(Exception):  # noqa: B017 - sqlite3 cannot bind a dict: the delete fails mid-transaction
        store.apply([("new", mwl_item())], ["keep", {"not": "a key"}], idempotency_key="msg-2")  # type: ignore[list-item]
    assert store.get("new") is None and store.get("keep") is not None
    assert store.apply([], [], idempotency_key="msg-2") is True  # the key was not recorded either


def test_keys_for_patient_and_by_prefix(store: WorklistStore) -> None:
    store.apply(
        [
            ("ord*1#1", mwl_item(patient_id="P1", issuer="CHU-X")),
            ("ord*1#2", mwl_item(patient_id="P1", issuer="CHU-X")),
            ("ord11#1", mwl_item(patient_id="P1", issuer="")),
            ("ord2#1", mwl_item(patient_id="P2", issuer="CHU-X")),
        ],
        [],
    )
    assert store.keys_for_patient("P1", "CHU-X") == ["ord*1#1", "ord*1#2"]
    assert store.keys_for_patient("P1", "") == ["ord11#1"]
    assert store.keys_with_prefix("ord*1#") == ["ord*1#1", "ord*1#2"]  # `*` is literal, not a wild card
    assert [key for key, _ in store.all(limit=2)] == ["ord*1#1", "ord*1#2"]


def test_completed_cancelled_and_discontinued_items_are_not_offered(store: WorklistStore) -> None:
    store.apply([(s, mwl_item(accession=s, status=s)) for s in ("SCHEDULED", *NOT_OFFERED)], [])
    assert accessions(store.find(modality_query())) == ["SCHEDULED"]


def test_find_sees_an_update_despite_the_decoded_cache(store: WorklistStore) -> None:
    store.apply([("o1#1", mwl_item(patient_name="BEFORE^X"))], [])
    assert [str(ds.PatientName) for ds in store.find(modality_query())] == ["BEFORE^X"]
    store.apply([("o1#1", mwl_item(patient_name="AFTER^X"))], [])
    assert [str(ds.PatientName) for ds in store.find(modality_query())] == ["AFTER^X"]


def test_get_returns_a_copy_that_does_not_leak_into_find(store: WorklistStore) -> None:
    store.apply([("o1#1", mwl_item())], [])
    list(store.find(modality_query()))  # warm the cache
    copy = store.get("o1#1")
    assert copy is not None
    copy.AccessionNumber = "EDITED"
    assert accessions(store.find(modality_query())) == ["ACC0001"]


def test_case_insensitive_names_use_the_same_fold_in_sql_and_matcher(store: WorklistStore) -> None:
    store.apply(
        [("a", mwl_item(accession="A", patient_name="STRAßE^Anna")), ("b", mwl_item(accession="B"))],
        [],
    )
    for name, expected in (("strasse*", ["A"]), ("dupont^hélène", ["B"]), ("D?PONT^HÉLÈNE", ["B"])):
        q = modality_query()
        q.PatientName = name
        assert accessions(store.find(q, case_insensitive_names=True)) == expected, name
        assert accessions(store.find(q)) == [], name


def test_invalid_query_raises_before_iteration(store: WorklistStore) -> None:
    with pytest.raises(QueryError):
        store.find(modality_query(ScheduledProcedureStepStartDate="2024-13"))


def test_find_stops_after_its_item_budget(store: WorklistStore) -> None:
    store.apply([(f"o{i}#1", mwl_item(accession=f"ACC{i}")) for i in range(5)], [])
    found = store.find(modality_query(), max_examined=3)
    assert [ds.AccessionNumber for ds in itertools.islice(found, 3)] == ["ACC0", "ACC1", "ACC2"]
    with pytest.raises(ScanStopped) as stopped:
        next(found)
    assert (stopped.value.reason, stopped.value.examined) == ("max_examined", 3)


def test_find_stops_at_its_deadline_and_when_told_even_while_nothing_matches(store: WorklistStore) -> None:
    store.apply([(f"o{i}#1", mwl_item(accession=f"ACC{i}")) for i in range(5)], [])
    no_match = modality_query()
    no_match.RequestedProcedureDescription = "NOTHING LIKE IT*"  # no index column: every item is examined
    with pytest.raises(ScanStopped) as late:
        list(store.find(no_match, deadline=time.monotonic() - 1))
    assert (late.value.reason, late.value.examined) == ("deadline", 0)
    asked = itertools.count(1)
    with pytest.raises(ScanStopped) as told:
        list(store.find(no_match, should_stop=lambda: next(asked) > 3))  # before the SQL, then each item
    assert (told.value.reason, told.value.examined) == ("stopped", 2)


def test_should_stop_interrupts_the_candidate_sql_itself(store: WorklistStore) -> None:
    item = mwl_item()
    encoded = EncodedItem(encode_item(item), dataset_columns(item), lambda: item)
    store.apply([(f"o{i}#1", encoded) for i in range(3000)], [])  # enough rows for SQLite's progress handler
    asked = itertools.count(1)
    with pytest.raises(ScanStopped) as told:
        next(store.find(modality_query(), should_stop=lambda: next(asked) > 1))  # True from the SQL on
    assert (told.value.reason, told.value.examined) == ("stopped", 0)


@pytest.mark.filterwarnings("ignore:The value length")
def test_hostile_wildcards_in_the_sql_prefilter_stay_fast(store: WorklistStore) -> None:
    """SQLite's GLOB gets the same pattern as the matcher: it must not be a second exponential path."""
    store.apply([(f"o{i}#1", mwl_item(accession=f"A{i}", patient_id="a" * 60 + str(i))) for i in range(20)], [])
    hostile = {"*a" * 40 + "*b": [], "*?" * 30 + "1": ["A1", "A11"], "*a" * 2000 + "*": []}
    for pattern, expected in hostile.items():
        query = modality_query()
        query.PatientID = pattern
        assert "patient_id GLOB ?" in prefilter_sql(compile_query(query))[0]
        started = time.perf_counter()
        assert accessions(store.find(query)) == expected
        assert time.perf_counter() - started < 2


def test_modality_query_is_served_by_the_sps_index(store: WorklistStore) -> None:
    plan = store.explain(
        modality_query(ScheduledProcedureStepStartDate="20240315", Modality="CT", ScheduledStationAETitle="CT01")
    )
    assert any("items_sps (start_date=? AND modality=? AND station_aet=?)" in line for line in plan), plan
    ranged = store.explain(modality_query(ScheduledProcedureStepStartDate="20240301-20240331"))
    assert any("items_sps (start_date>? AND start_date<?)" in line for line in ranged), ranged


def test_readers_do_not_fail_while_a_writer_writes(store: WorklistStore) -> None:
    store.apply([(f"k{i}", mwl_item(accession=f"A{i}")) for i in range(20)], [])
    errors: list[BaseException] = []
    counts: list[int] = []

    def read() -> None:
        try:
            for _ in range(30):
                counts.append(len(list(store.find(modality_query(Modality="CT")))))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(4)]
    for thread in readers:
        thread.start()
    for i in range(20, 40):
        store.apply([(f"k{i}", mwl_item(accession=f"A{i}"))], [])
    for thread in readers:
        thread.join()
    assert errors == []
    assert min(counts) >= 20 and max(counts) <= 40
    assert store.count() == 40


def test_encoded_items_are_stored_like_their_datasets(store: WorklistStore) -> None:
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
    conn = sqlite3.connect(store.path)
    try:
        cursor = conn.execute("SELECT * FROM items")
        columns = [d[0] for d in cursor.description]
        rows = {r[0]: r[1:] for r in cursor}
    finally:
        conn.close()
    updated = columns.index("updated") - 1
    for i in (1, 2):
        enc, ds = list(rows[f"enc#{i}"]), list(rows[f"ds#{i}"])
        del enc[updated], ds[updated]
        assert enc == ds
        assert store.get(f"enc#{i}") == store.get(f"ds#{i}")
    assert rows["enc#1"][columns.index("patient_name") - 1] == "KOWALSKI^Łukasz"
    q = modality_query(Modality="CT")
    q.PatientName = "KOWALSKI*"
    found = list(store.find(q))
    assert len(found) == 4 and {str(ds.PatientName) for ds in found} == {"KOWALSKI^Łukasz"}


# -- the prefilter never changes the result: store.find == a full scan with the matcher ----------------------------

NAMES = ["DUPONT^Hélène", "dupont^hélène", "MARTIN^Jean", "STRAßE^Anna", "O[BRIEN]^Pat", "DUPONT^Hélène^^"]
ITEM = st.fixed_dictionaries(
    {
        "patient_name": st.sampled_from(NAMES),
        "patient_id": st.sampled_from(["P1", "P2", "p1"]),
        "issuer": st.sampled_from(["CHU-X", ""]),
        "modality": st.sampled_from(["CT", "MR", "US"]),
        "station_aet": st.sampled_from(["CT01", "CT02", "MR01", "CT01", "CT02", ["CT01", "MR01"]]),
        "start_date": st.sampled_from(["20240314", "20240315", "20240316", "2024.03.15"]),
        "start_time": st.sampled_from(["08", "093000", "120030", "235959.5"]),
        "status": st.sampled_from(["SCHEDULED", "SCHEDULED", "STARTED", "COMPLETED", ""]),
    }
)
# Rare on purpose: such items are not described by the index columns (exact = 0) and bypass the prefilter.
RARELY = st.sampled_from([False] * 5 + [True])
ITEM_EXTRAS = st.fixed_dictionaries(
    {
        "second_step": RARELY,
        "drop": st.sampled_from([set()] * 4 + [{"PatientID"}, {"Modality"}, {"ScheduledStationAETitle"}]),
    }
)
QUERY_VALUES = {
    "PatientName": ["", "*", "DUP*", "dup*", "D?PONT^*", "O[BRIEN]*", "STRASSE*", "MARTIN^Jean", "dupont^hélène"],
    "PatientID": ["", "P1", "p?", "P*"],
    "IssuerOfPatientID": ["", "CHU-X"],
    "AccessionNumber": ["", "A1", "A*", "A1\\A3"],
    "sps_Modality": ["", "CT", "C*", "CT\\MR"],
    "sps_ScheduledStationAETitle": ["", "CT01", "CT*", "MR01"],
    "sps_ScheduledProcedureStepStartDate": ["", "20240315", "20240314-20240315", "-20240315", "20240316-"],
    "sps_ScheduledProcedureStepStartTime": ["", "0800-1200", "09", "-093000", "1000-0900"],
    "sps_ScheduledProcedureStepStatus": ["", "SCHEDULED"],
}
# One to three matching keys per query, so that queries often match something and the prefilter is exercised.
QUERY = st.lists(st.sampled_from(sorted(QUERY_VALUES)), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: st.sampled_from(QUERY_VALUES[name]) for name in names})
)


def build_item(index: int, fields: dict[str, object], extras: dict[str, object]) -> Dataset:
    item = mwl_item(accession=f"A{index}", **fields)  # type: ignore[arg-type]
    step = item.ScheduledProcedureStepSequence[0]
    if extras["second_step"]:
        other = Dataset()
        other.Modality = "US"
        other.ScheduledStationAETitle = "US01"
        other.ScheduledProcedureStepStartDate = "20240315"
        other.ScheduledProcedureStepStartTime = "100000"
        item.ScheduledProcedureStepSequence.append(other)
    for keyword in extras["drop"]:  # type: ignore[attr-defined]
        target = item if keyword == "PatientID" else step
        delattr(target, keyword)
    return item


def build_query(keys: dict[str, str]) -> Dataset:
    q = modality_query()
    for keyword, value in keys.items():
        target = q.ScheduledProcedureStepSequence[0] if keyword.startswith("sps_") else q
        setattr(target, keyword.removeprefix("sps_"), value)
    return q


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.tuples(ITEM, ITEM_EXTRAS), min_size=1, max_size=16),
    queries=st.lists(QUERY, min_size=1, max_size=8),
    case_insensitive=st.booleans(),
)
def test_find_equals_a_full_scan(
    items: list[tuple[dict[str, object], dict[str, object]]], queries: list[dict[str, str]], case_insensitive: bool
) -> None:
    datasets = {f"k{i}": build_item(i, fields, extras) for i, (fields, extras) in enumerate(items)}
    with tempfile.TemporaryDirectory() as folder:
        store = WorklistStore(str(Path(folder) / "w.sqlite"))
        try:
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
        finally:
            store.close()
