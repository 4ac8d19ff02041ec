"""`PostgresAppliedKeys`: the done keys of each consumer, shared by the nodes of one database (a real PostgreSQL
server, ``tests/peer_postgres.py``)."""

from __future__ import annotations

import threading

import pytest

from traboule.stores.postgres import connect
from traboule.stores.postgres.idempotency import PostgresAppliedKeys

pytestmark = pytest.mark.timeout(60)


def test_a_mark_is_kept_once_and_read_by_every_node(pg_url: str) -> None:
    keys = PostgresAppliedKeys(pg_url, "mllp-out")
    try:
        assert not keys.is_done("e1") and not keys.is_done("") and keys.detail("e1") is None
        assert keys.mark_done("e1", "MSG0001") is True
        assert keys.mark_done("e1", "MSG0002") is False  # the first mark is kept
        assert keys.detail("e1") == "MSG0001"
        with pytest.raises(ValueError):
            keys.mark_done("")
        with pytest.raises(ValueError):
            keys.mark_done("bad\x00key")
        assert not keys.is_done("bad\x00key")
        assert keys.mark_done("e2", "ACK\x00") and keys.detail("e2") == "ACK\ufffd"
    finally:
        keys.close()
    other = PostgresAppliedKeys(pg_url, "mllp-out")  # another node, or a restart
    try:
        assert other.is_done("e1") and other.done(["e1", "e2", "e3", "", "x\x00"]) == {"e1", "e2"}
        assert other.done(f"k{i}" for i in range(2500)) == set()  # chunked lookups
    finally:
        other.close()


def test_two_consumers_do_not_see_each_others_keys(pg_url: str) -> None:
    a, b = PostgresAppliedKeys(pg_url, "fhir-push"), PostgresAppliedKeys(pg_url, "mllp-out")
    try:
        assert a.mark_done("event-1", "a")
        assert not b.is_done("event-1") and b.done(["event-1"]) == set() and b.detail("event-1") is None
        assert b.mark_done("event-1", "b")  # its own mark
        assert (a.detail("event-1"), b.detail("event-1")) == ("a", "b")
    finally:
        a.close()
        b.close()


def test_concurrent_marks_of_one_key_give_exactly_one_true(pg_url: str) -> None:
    nodes = [PostgresAppliedKeys(pg_url, "worklist") for _ in range(6)]
    barrier = threading.Barrier(len(nodes))
    results: list[list[bool]] = [[] for _ in nodes]

    def mark(i: int) -> None:
        barrier.wait()
        for n in range(40):
            results[i].append(nodes[i].mark_done(f"event-{n}", f"node {i}"))

    threads = [threading.Thread(target=mark, args=(i,)) for i in range(len(nodes))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for n in range(40):
            assert sum(results[i][n] for i in range(len(nodes))) == 1, n
        winners = {nodes[0].detail(f"event-{n}") for n in range(40)}
        assert winners <= {f"node {i}" for i in range(len(nodes))}
    finally:
        for node in nodes:
            node.close()


def test_a_rolled_back_transaction_marks_nothing_and_a_committed_one_keeps_the_effect(pg_url: str) -> None:
    keys = PostgresAppliedKeys(connect(pg_url), "fhir")  # the consumer's own connection
    try:
        keys.db.execute("CREATE TABLE effects (id TEXT PRIMARY KEY)")
        with pytest.raises(RuntimeError), keys.transaction() as db:
            db.execute("INSERT INTO effects VALUES ('lost')")
            assert keys.mark_done("lost")
            assert keys.is_done("lost")  # seen inside its transaction
            raise RuntimeError("the effect failed")
        assert not keys.is_done("lost")
        with keys.transaction() as db:
            db.execute("INSERT INTO effects VALUES ('kept')")
            assert keys.mark_done("kept", "done")
            other = PostgresAppliedKeys(pg_url, "fhir")
            try:
                assert not other.is_done("kept")  # not committed yet: another node does not see it
            finally:
                other.close()
        effects = [r[0] for r in keys.db.execute("SELECT id FROM effects")]
        assert effects == ["kept"] and keys.is_done("kept") and keys.detail("kept") == "done"
    finally:
        keys.close()
