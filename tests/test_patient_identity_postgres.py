"""The PostgreSQL patient registry: the registry cases of ``tests/test_patient_identity.py`` run again on
`PostgresPatientRegistry`, and what several nodes on one database need (a real PostgreSQL server,
``tests/peer_postgres.py``).

The shared cases (imported, so collected here) build ``PatientIdentities(path)``: the autouse
``postgres_registry`` fixture makes that name, in their module, open the registry of this test's database instead
(a reopen of the same path: the same database).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

import tests.test_patient_identity as shared
from tests.test_patient_identity import (
    OTHER_INS,
    patient,
    test_a_pair_whose_message_was_never_journaled_stops_holding,
    test_a_refused_or_duplicate_message_stops_holding_its_ins_at_once,
    test_an_ins_reserved_for_an_ipp_is_refused_to_another_of_its_authority,
    test_registry_holds_a_checked_pair_until_its_message_is_journaled,
    test_registry_knows_whose_each_order_is_and_follows_merges,
    test_registry_refuses_another_ins_for_a_recorded_ipp_after_a_restart,
    test_the_rebuild_fills_what_a_crash_lost_and_leaves_a_later_correction,
    test_two_orders_in_flight_never_give_one_exam_to_two_patients,
)
from traboule import model
from traboule.errors import MappingFailure
from traboule.stores import PatientRegistry
from traboule.stores.patient_identity import Pair
from traboule.stores.postgres import APPLICATION_NAME
from traboule.stores.postgres.patient_identity import (
    _RECORD_CALL,
    LOCK_CLASS,
    POOL_SIZE,
    PostgresPatientRegistry,
    _lock_id,
)

pytestmark = pytest.mark.timeout(120)

SHARED_CASES = [  # collected here: run on PostgreSQL through the autouse fixture below
    test_a_pair_whose_message_was_never_journaled_stops_holding,
    test_a_refused_or_duplicate_message_stops_holding_its_ins_at_once,
    test_an_ins_reserved_for_an_ipp_is_refused_to_another_of_its_authority,
    test_registry_holds_a_checked_pair_until_its_message_is_journaled,
    test_registry_knows_whose_each_order_is_and_follows_merges,
    test_registry_refuses_another_ins_for_a_recorded_ipp_after_a_restart,
    test_the_rebuild_fills_what_a_crash_lost_and_leaves_a_later_correction,
    test_two_orders_in_flight_never_give_one_exam_to_two_patients,
]
INS = "279035121518989"
INS_OID = "1.2.250.1.213.1.4.10"


@pytest.fixture(autouse=True)
def postgres_registry(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``PatientIdentities(path)`` in the shared cases opens this test's PostgreSQL database."""
    monkeypatch.setattr(shared, "PatientIdentities", lambda path: PostgresPatientRegistry(pg_url))
    return pg_url


@pytest.fixture
def nodes(pg_url: str) -> Iterator[list[PostgresPatientRegistry]]:
    """Two registries on one database: two engine nodes."""
    opened = [PostgresPatientRegistry(pg_url), PostgresPatientRegistry(pg_url)]
    yield opened
    for registry in opened:
        registry.close()


def test_it_implements_the_protocol(nodes: list[PostgresPatientRegistry]) -> None:
    assert isinstance(nodes[0], PatientRegistry)


def test_two_nodes_checking_conflicting_ins_at_once_accept_exactly_one(pg_url: str) -> None:
    """Many rounds: both nodes check the same IPP with different INS at the same moment; one is accepted, the
    other refused, never both; the loser's INS stays refused once the winner recorded."""
    registries = [PostgresPatientRegistry(pg_url) for _ in range(4)]
    try:
        for round_ in range(15):
            ipp = model.Identifier("IPP0001", f"HOP{round_}", f"1.2.250.1.999.{round_}")  # one patient per authority
            barrier = threading.Barrier(len(registries))
            outcome: list[str | None] = [None] * len(registries)

            def check(
                i: int,
                ipp: model.Identifier = ipp,
                barrier: threading.Barrier = barrier,
                outcome: list[str | None] = outcome,
            ) -> None:
                ins = INS if i % 2 == 0 else OTHER_INS
                barrier.wait()
                try:
                    registries[i].check([patient(ipp, ins)])
                    outcome[i] = ins
                except MappingFailure:
                    outcome[i] = "refused"

            threads = [threading.Thread(target=check, args=(i,)) for i in range(len(registries))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            accepted = {o for o in outcome if o != "refused"}
            assert len(accepted) == 1, outcome  # one INS only (the same one may be accepted twice)
            (winner,) = accepted
            i = outcome.index(winner)
            registries[i].record([patient(ipp, winner)])
            loser = OTHER_INS if winner == INS else INS
            for registry in registries:
                with pytest.raises(MappingFailure):
                    registry.check([patient(ipp, loser)])
            assert [p.ins for p in registries[1].known(Pair(ipp.value, ipp.issuer_oid, ipp.issuer, INS_OID, ""))] == [
                winner
            ]
    finally:
        for registry in registries:
            registry.close()


def test_two_nodes_giving_one_accession_to_two_patients_at_once_accept_one(pg_url: str) -> None:
    registries = [PostgresPatientRegistry(pg_url) for _ in range(4)]
    try:
        barrier = threading.Barrier(len(registries))
        outcome: list[bool] = [False] * len(registries)

        def check(i: int) -> None:
            order = patient(model.Identifier(f"IPP{i}", "CHU-LYON"))
            order.accession_number = model.Identifier("ACC-SHARED")
            barrier.wait()
            try:
                registries[i].check_order([order])
                outcome[i] = True
            except MappingFailure:
                pass

        threads = [threading.Thread(target=check, args=(i,)) for i in range(len(registries))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(outcome) == 1, outcome
    finally:
        for registry in registries:
            registry.close()


def test_a_merge_recorded_on_one_node_is_applied_by_the_next_check_of_another(
    nodes: list[PostgresPatientRegistry],
) -> None:
    a, b = nodes
    chu = model.Identifier("IPP0810", "CHU-LYON")
    a.record([patient(chu, INS)])
    # Before the merge: IPP0910 is another patient of the same authority, the INS is not its.
    with pytest.raises(MappingFailure, match="another IPP of this authority"):
        b.check([patient(model.Identifier("IPP0910", "CHU-LYON"), INS)])
    order = patient(model.Identifier("IPP0910", "CHU-LYON"))
    order.accession_number = model.Identifier("ACC0910")
    b.record([order])
    report = model.Report(patient=patient(chu).patient, accession_number=model.Identifier("ACC0910"))
    with pytest.raises(MappingFailure):
        b.check_report([report])
    assert b.resolve_merged([patient(model.Identifier("IPP0910", "CHU-LYON"))]) == []

    merge = model.PatientUpdate("merge", model.Patient(ids=[chu]), [model.Identifier("IPP0910", "CHU-LYON")])
    a.record([merge])  # node A records the merge
    b.check([patient(model.Identifier("IPP0910", "CHU-LYON"), INS)])  # node B: one person now
    b.check_report([report])  # IPP0910's order is IPP0810's
    late = patient(model.Identifier("IPP0910", "CHU-LYON"))
    (note,) = b.resolve_merged([late])
    assert "was merged into IPP0810 (CHU-LYON)" in note
    assert [i.value for i in late.patient.ids] == ["IPP0810", INS]
    assert b.same_patient(late.patient, patient(model.Identifier("IPP0910", "CHU-LYON")).patient)


def test_an_identity_source_correction_on_one_node_is_seen_by_the_other(nodes: list[PostgresPatientRegistry]) -> None:
    a, b = nodes
    ipp = model.Identifier("IPP0001", "CHU-LYON")
    order = patient(ipp, INS)
    order.accession_number = model.Identifier("ACC1")
    b.check([order])
    b.check_order([order])
    b.record([order], channel="ris-orders", journal_id=3)
    update = model.PatientUpdate(patient=patient(ipp, OTHER_INS).patient, authoritative=True)
    (note,) = a.check([update])
    assert f"replaced by {OTHER_INS}" in note
    a.record([update], channel="ris-orders", journal_id=2)
    assert [i.value for i in b.owner("accession", "ACC1") or []] == ["IPP0001", OTHER_INS]
    with pytest.raises(MappingFailure):
        b.check([patient(ipp, INS)])
    assert b.mark("ris-orders") == 3  # the highest of both nodes
    shown = b.show("IPP0001")
    assert [row["ins"] for row in shown["ins"]] == [OTHER_INS]
    assert [row["action"] for row in shown["actions"]] == ["ins-changed"]
    assert [row["key"] for row in shown["owners"]] == ["ACC1"]


def test_forget_on_one_node_frees_the_ipp_for_every_node(nodes: list[PostgresPatientRegistry]) -> None:
    a, b = nodes
    ipp = model.Identifier("IPP0002", "CHU-LYON")
    a.record([patient(ipp, INS)])
    with pytest.raises(MappingFailure):
        b.check([patient(ipp, OTHER_INS)])
    assert [p.ins for p in b.forget("IPP0002")] == [INS]
    assert b.forget("IPP0002") == []
    a.check([patient(ipp, OTHER_INS)])
    assert [row["action"] for row in a.show("IPP0002")["actions"]] == ["ins-forgotten"]


def test_a_node_that_died_holds_its_reservations_no_longer_than_they_last(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import traboule.stores.patient_identity

    monkeypatch.setattr(traboule.stores.patient_identity, "RESERVED", 0.2)
    ipp = model.Identifier("IPP0003", "CHU-LYON")
    dead = PostgresPatientRegistry(pg_url)
    dead.check([patient(ipp, INS)])
    dead.close()  # never records nor releases
    alive = PostgresPatientRegistry(pg_url)
    try:
        with pytest.raises(MappingFailure):
            alive.check([patient(ipp, OTHER_INS)])
        time.sleep(0.3)
        alive.check([patient(ipp, OTHER_INS)])
    finally:
        alive.close()


def test_nul_characters_and_backslashes_in_identifiers_round_trip(nodes: list[PostgresPatientRegistry]) -> None:
    a, b = nodes
    ipp = model.Identifier("IPP\x00\\0", "CHU\\LYON")
    order = patient(ipp, INS)
    order.accession_number = model.Identifier("ACC\x00")
    a.check([order])
    a.check_order([order])
    a.record([order], channel="ch\x00", journal_id=5)
    assert [i.value for i in b.owner("accession", "ACC\x00") or []] == ["IPP\x00\\0", INS]
    assert b.owner("accession", "ACC") is None
    assert b.known(Pair("IPP\x00\\0", "", "", INS_OID, "")) == [Pair("IPP\x00\\0", "", "CHU\\LYON", INS_OID, INS)]
    assert b.known(Pair("IPP\x00\\\x00", "", "", INS_OID, "")) == []
    assert b.mark("ch\x00") == 5
    other = patient(model.Identifier("IPP9", "CHU-LYON"))
    other.accession_number = model.Identifier("ACC\x00")
    with pytest.raises(MappingFailure, match="belongs to patient IPP"):
        b.check_order([other])


def _ins(n: int) -> str:
    """A valid INS-NIR (its check key computed) per number."""
    body = 1790375000000 + n
    return f"{body}{97 - body % 97:02d}"


def test_check_latency(nodes: list[PostgresPatientRegistry]) -> None:
    """The checks run per message at ingest: a few indexed look-ups on the server, about a millisecond each on a
    local server (printed with ``-s``)."""
    registry = nodes[0]

    def order(i: int) -> model.ImagingOrder:
        found = patient(model.Identifier(f"IPP{i}", "CHU-LYON"), _ins(i))
        found.accession_number = model.Identifier(f"ACC{i}")
        found.placer_order_number = model.Identifier(f"PLC{i}", "RIS")
        return found

    def report(i: int) -> model.Report:
        return model.Report(patient=order(i).patient, accession_number=model.Identifier(f"ACC{i}"))

    for i in range(200):
        registry.record([order(i)], channel="ris-orders", journal_id=i + 1)
    timings = {}
    for name, call in (
        ("check", lambda i: registry.check([order(i)])),
        ("check_order", lambda i: registry.check_order([order(i)])),
        ("check_report", lambda i: registry.check_report([report(i)])),
        ("resolve_merged", lambda i: registry.resolve_merged([order(i)])),
        ("record (known patient and order)", lambda i: registry.record([order(i)], channel="ris-orders")),
        ("record (new order)", lambda i: registry.record([order(1000 + i)], channel="ris-orders")),
    ):
        started = time.perf_counter()
        for i in range(200):
            call(i)
        timings[name] = (time.perf_counter() - started) / 200 * 1000
    print("per call (ms):", {k: round(v, 3) for k, v in timings.items()})
    assert timings["check"] < 20 and timings["check_order"] < 20 and timings["check_report"] < 20


def test_one_registry_serves_many_threads_at_once_on_a_bounded_pool(pg_url: str) -> None:
    """The channels call the registry from threads (``off_loop``): eight at once on one registry, each checking and
    recording orders of its own while all of them race for one accession per round with different patients. Each
    round gives that accession to exactly one patient, every other order is accepted and recorded, and the registry
    never holds more connections than its pool."""
    registry = PostgresPatientRegistry(pg_url)
    threads_count, rounds = 8, 6
    assert registry.off_loop
    try:
        barrier = threading.Barrier(threads_count)
        winners: list[list[int]] = [[] for _ in range(rounds)]
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for r in range(rounds):
                    mine = patient(model.Identifier(f"IPP-T{n}", "CHU-LYON"), _ins(n))
                    mine.accession_number = model.Identifier(f"ACC-{n}-{r}")
                    registry.resolve_merged([mine])
                    registry.check([mine])
                    registry.check_order([mine])
                    registry.record([mine], channel="ris-orders", journal_id=r * threads_count + n + 1)
                    shared_order = patient(model.Identifier(f"IPP-T{n}", "CHU-LYON"), _ins(n))
                    shared_order.accession_number = model.Identifier(f"ACC-SHARED-{r}")
                    barrier.wait()
                    try:
                        registry.check([shared_order])
                        registry.check_order([shared_order])
                    except MappingFailure:
                        registry.release([shared_order])
                        continue
                    winners[r].append(n)
                    registry.record([shared_order], channel="ris-orders", journal_id=1000 + r)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert [len(w) for w in winners] == [1] * rounds, winners
        for r, (n,) in enumerate(winners):
            assert registry.owner("accession", f"ACC-SHARED-{r}")[0].value == f"IPP-T{n}"  # type: ignore[index]
        for n in range(threads_count):
            for r in range(rounds):
                assert registry.owner("accession", f"ACC-{n}-{r}")[0].value == f"IPP-T{n}"  # type: ignore[index]
        assert registry.mark("ris-orders") == 1000 + rounds - 1
        with psycopg.connect(pg_url, autocommit=True, application_name="the test") as db:
            held = db.execute("SELECT count(*) FROM patients_keys_held").fetchone()
            reserved = db.execute("SELECT count(*) FROM patients_reserved").fetchone()
            sessions = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
                (APPLICATION_NAME,),
            ).fetchone()
        assert held == (0,) and reserved == (0,)  # recorded or released: nothing stays held
        assert sessions is not None and 1 <= sessions[0] <= POOL_SIZE
    finally:
        registry.close()


def test_an_order_the_single_statement_check_cannot_settle_gets_the_full_check(
    nodes: list[PostgresPatientRegistry],
) -> None:
    """The usual order is checked by one statement; one whose key is recorded with other identifiers of the same
    patient (a report named the IPP alone), or whose IPP was merged, is checked in full: accepted when it is the
    same patient, refused when it is another."""
    a, b = nodes
    ipp = model.Identifier("IPP-F1", "CHU-LYON")
    report = model.Report(patient=model.Patient(ids=[ipp]), accession_number=model.Identifier("ACC-F1"))
    a.record([report])
    same = patient(ipp, INS)  # the same IPP, its INS now known: another owner text, the same patient
    same.accession_number = model.Identifier("ACC-F1")
    b.check([same])
    b.check_order([same])
    b.record([same], channel="ris-orders", journal_id=1)
    other = patient(model.Identifier("IPP-F2", "CHU-LYON"))
    other.accession_number = model.Identifier("ACC-F1")
    with pytest.raises(MappingFailure, match="belongs to patient"):
        a.check_order([other])
    merge = model.PatientUpdate(
        patient=model.Patient(ids=[ipp]), action="merge", merged_ids=[model.Identifier("IPP-F3", "CHU-LYON")]
    )
    a.record([merge])
    merged = patient(model.Identifier("IPP-F3", "CHU-LYON"))  # merged into IPP-F1: its orders are IPP-F1's
    merged.accession_number = model.Identifier("ACC-F1")
    b.check_order([merged])


def test_a_record_that_adds_a_pair_commits_durably_and_one_of_owners_only_does_not(pg_url: str) -> None:
    """``patients_record`` (the usual record in one statement) turns ``synchronous_commit`` on for its
    transaction when it writes a new IPP-INS pair, off when it writes owners only (see the module docstring)."""
    registry = PostgresPatientRegistry(pg_url)  # creates the schema
    registry.close()
    pair = ["IPP-D1"], ["1.2.3"], ["CHU"], [INS_OID], [INS]
    owners = ["accession"], ["ACC-D1"], ['[["IPP-D1", "CHU", "1.2.3", ""]]'], ["order"]
    args = (LOCK_CLASS, [1, 2], *pair, "node", "2026-01-01T00:00:00Z", *owners, ["ris-orders"], [7], [], [], [])
    with psycopg.connect(pg_url) as db:  # one transaction per block, committed or rolled back by the test
        for expected in ("on", "off"):  # a new pair, then the same again (owners only)
            (added,) = db.execute(_RECORD_CALL, args).fetchone()  # type: ignore[misc]
            (setting,) = db.execute("SHOW synchronous_commit").fetchone()  # type: ignore[misc]
            assert (added, setting) == (expected == "on", expected)
            db.commit()
        assert db.execute("SELECT journal_id FROM patients_marks").fetchall() == [(7,)]


def test_records_arriving_while_one_commits_share_the_next_commit(pg_url: str) -> None:
    """`record` is a group commit across threads: while one record waits on the server (here for a lock another
    session holds on its accession number), the records of the other threads queue, then commit together in one
    transaction, and every caller returns once its own record is written."""
    registry = PostgresPatientRegistry(pg_url)
    try:
        orders = []
        for n in range(8):
            order = patient(model.Identifier(f"IPP-B{n}", "CHU-LYON"))
            order.accession_number = model.Identifier(f"ACC-B{n}")
            orders.append(order)
        with psycopg.connect(pg_url) as blocker:  # a transaction holding the first order's lock
            blocker.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, _lock_id("key:accession|ACC-B0")))
            errors: list[BaseException] = []

            def record(n: int) -> None:
                try:
                    registry.record([orders[n]], channel="ris-orders", journal_id=n + 1)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=record, args=(0,))]
            threads[0].start()
            deadline = time.monotonic() + 10
            while not registry._writing and time.monotonic() < deadline:
                time.sleep(0.01)
            threads += [threading.Thread(target=record, args=(n,)) for n in range(1, 8)]
            for thread in threads[1:]:
                thread.start()
            while len(registry._queue) < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(registry._queue) == 7 and all(t.is_alive() for t in threads)  # all waiting
            blocker.commit()
        for thread in threads:
            thread.join(10)
        assert errors == []
        with psycopg.connect(pg_url, autocommit=True) as db:
            rows = db.execute("SELECT key, xmin::text FROM patients_owners ORDER BY key").fetchall()
        assert [key for key, _ in rows] == [f"ACC-B{n}" for n in range(8)]
        assert len({xmin for key, xmin in rows if key != "ACC-B0"}) == 1  # the seven queued: one transaction
        assert rows[0][1] != rows[1][1]
        assert registry.mark("ris-orders") == 8
    finally:
        registry.close()


def held_keys(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as db:
        return [(k, v) for k, v in db.execute("SELECT kind, key FROM patients_keys_held ORDER BY kind, key")]


def test_the_usual_order_is_admitted_in_one_statement_holding_only_keys_nobody_owns(pg_url: str) -> None:
    """`admit`: the checks of the usual order at once; a key already recorded as this very patient's is not held,
    the others are until the record; what it cannot settle it declines, writing nothing (the full checks decide)."""
    a, b = PostgresPatientRegistry(pg_url), PostgresPatientRegistry(pg_url)
    try:
        ipp = model.Identifier("IPP-A1", "CHU-LYON")
        first = patient(ipp, INS)
        first.accession_number, first.study_instance_uid = model.Identifier("ACC-A1"), "1.2.3.1"
        assert a.admit([first])
        assert held_keys(pg_url) == [("accession", "ACC-A1"), ("study", "1.2.3.1")]
        a.record([first], channel="ris-orders", journal_id=1)
        assert held_keys(pg_url) == []
        second = patient(ipp, INS)  # the same patient's next order in the same study
        second.accession_number, second.study_instance_uid = model.Identifier("ACC-A2"), "1.2.3.1"
        assert a.admit([second])
        assert held_keys(pg_url) == [("accession", "ACC-A2")]
        # Another patient naming the held accession or the owned study: declined, then refused by the checks.
        for key in ("accession", "study"):
            other = patient(model.Identifier("IPP-A9", "CHU-LYON"))
            other.accession_number = model.Identifier("ACC-A2" if key == "accession" else "ACC-A9")
            other.study_instance_uid = "1.2.3.1" if key == "study" else "1.2.3.9"
            assert not b.admit([other])
            with pytest.raises(MappingFailure, match="belongs to patient"):
                b.check_order([other])
        assert not b.admit([patient(ipp, OTHER_INS)])  # another INS for the IPP: `check` refuses it
        with pytest.raises(MappingFailure, match="accepted with another"):
            b.check([patient(ipp, OTHER_INS)])
        merge = model.PatientUpdate(
            patient=model.Patient(ids=[ipp]), action="merge", merged_ids=[model.Identifier("IPP-A3", "CHU-LYON")]
        )
        assert not b.admit([merge])  # a merge, an identity source's update, a report: never admitted here
        b.record([merge])
        merged = patient(model.Identifier("IPP-A3", "CHU-LYON"))
        merged.accession_number = model.Identifier("ACC-A3")
        assert not b.admit([merged])  # its IPP was merged: `resolve_merged` first
        a.release([second])
        assert held_keys(pg_url) == []
    finally:
        a.close()
        b.close()


def test_nodes_admitting_one_accession_for_two_patients_at_once_accept_one(pg_url: str) -> None:
    registries = [PostgresPatientRegistry(pg_url) for _ in range(4)]
    try:
        barrier = threading.Barrier(len(registries))
        outcome: list[bool] = [False] * len(registries)

        def check(i: int) -> None:
            order = patient(model.Identifier(f"IPP{i}", "CHU-LYON"))
            order.accession_number = model.Identifier("ACC-SHARED")
            barrier.wait()
            try:  # as the channel does: the one statement, else the full checks
                if not registries[i].admit([order]):
                    registries[i].resolve_merged([order])
                    registries[i].check([order])
                    registries[i].check_order([order])
                outcome[i] = True
            except MappingFailure:
                pass

        threads = [threading.Thread(target=check, args=(i,)) for i in range(len(registries))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(outcome) == 1, outcome
    finally:
        for registry in registries:
            registry.close()


def test_nodes_admitting_conflicting_ins_for_one_ipp_at_once_accept_one(pg_url: str) -> None:
    """`admit` reserves pairs as `check` does: of patient updates giving one IPP two INS at the same moment on four
    nodes, one INS only is let through (by `admit` or, when it declines, by `check`)."""
    registries = [PostgresPatientRegistry(pg_url) for _ in range(4)]
    try:
        for round_ in range(10):  # (an IPP value another authority holds too is left to `check`: a new one each)
            ipp = model.Identifier(f"IPP{round_:04d}", "HOP", "1.2.250.1.999.1")
            barrier = threading.Barrier(len(registries))
            outcome: list[str] = [""] * len(registries)

            def check(
                i: int, ipp: model.Identifier = ipp, barrier: threading.Barrier = barrier, outcome: list[str] = outcome
            ) -> None:
                ins = INS if i % 2 == 0 else OTHER_INS
                update = model.PatientUpdate(patient=patient(ipp, ins).patient, action="update")
                barrier.wait()
                try:
                    admitted = registries[i].admit([update])
                    if not admitted:
                        registries[i].check([update])
                    outcome[i] = ins + (" admitted" if admitted else "")
                except MappingFailure:
                    outcome[i] = "refused"
                barrier.wait()
                registries[i].release([update])  # the next round's IPP may take these INS

            threads = [threading.Thread(target=check, args=(i,)) for i in range(len(registries))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            accepted = {o.split()[0] for o in outcome if o != "refused"}
            assert len(accepted) == 1 and any(o.endswith("admitted") for o in outcome), outcome
    finally:
        for registry in registries:
            registry.close()
