"""The worklist consumer's reads for a batch of events: one statement for every order's existing items, the same
keys as one statement per order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.peer_dcmtk import mwl_item
from traboule.channels.worklist import WorklistChannel
from traboule.model import Envelope, Identifier, ImagingOrder, Patient, ScheduledStep
from traboule.stores import worklist as worklist_store
from traboule.stores.worklist import WorklistStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[WorklistStore]:
    store = WorklistStore(str(tmp_path / "worklist.sqlite"))
    yield store
    store.close()


def test_keys_of_several_prefixes_in_one_statement_are_those_of_each_prefix(store: WorklistStore) -> None:
    keys = ["o1#1", "o1#2", "o10#1", "o1$", "o2#1", "a_%1", "ab%2", "a*#1", "a[#2", "a?#3", "é#1", "\U0010ffff#1"]
    keys += ["ab#\x00x", "ab\x00#1", "q\ud7ff#1", "q\ue000#2", "x#\U0010ffff"]
    store.apply([(k, mwl_item()) for k in keys], [], "prefixes")
    store.apply([("o2#1", mwl_item())], ["o2#1"], "")
    prefixes = ["o1#", "o10#", "o2#", "a_%", "a*#", "a[#", "a?#", "é#", "zz", "\U0010ffff", "n\x00", "o1#", "ab#"]
    prefixes += ["ab\x00#", "ab", "", "q\ud7ff", "q", "x#", "a"]  # NUL, empty, no successor: one statement each
    found = store.keys_with_prefixes(prefixes)
    assert found == {p: store.keys_with_prefix(p) for p in prefixes}
    assert found["o1#"] == ["o1#1", "o1#2"] and found["o2#"] == [] and found["a*#"] == ["a*#1"]
    assert found["\U0010ffff"] == ["\U0010ffff#1"] and found["q\ud7ff"] == ["q\ud7ff#1"]


def test_more_prefixes_than_one_statement_takes(store: WorklistStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worklist_store, "_PREFIXES", 3)
    store.apply([(f"o{i}#1", mwl_item()) for i in range(10)], [], "")
    prefixes = [f"o{i}#" for i in range(12)]
    assert store.keys_with_prefixes(prefixes) == {p: store.keys_with_prefix(p) for p in prefixes}


def order(number: str, *steps: str, action: str = "new") -> Envelope:
    patient = Patient(ids=[Identifier("P1", issuer="CHU-X")])
    payload = ImagingOrder(
        action=action,  # type: ignore[arg-type]
        placer_order_number=Identifier(number, issuer="RIS"),
        accession_number=Identifier(f"A{number}"),
        patient=patient,
        steps=[ScheduledStep(step_id=s, modality="CT", start="202612060900") for s in steps],
    )
    return Envelope(payload, idempotency_key=f"{number}:{action}:{'-'.join(steps)}")


def test_a_batch_reads_the_items_of_its_orders_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = SimpleNamespace(config=SimpleNamespace(path=None), data_dir=tmp_path)
    channel = WorklistChannel({"name": "worklist"}, runtime)
    try:
        first = channel._apply([order("1", "S1", "S2"), order("2", "S1")], [1, 2])
        assert first == [("applied", 2, 0), ("applied", 1, 0)]

        def one_by_one(prefix: str) -> list[str]:
            raise AssertionError(f"{prefix}: read alone")

        monkeypatch.setattr(channel.store, "keys_with_prefix", one_by_one)
        # A step dropped from order 1, order 2 cancelled, then order 2 again in the same batch.
        batch = [order("1", "S2", action="change"), order("2", action="cancel"), order("2", "S3", action="change")]
        assert channel._apply(batch, [3, 4, 5]) == [("applied", 1, 1), ("applied", 0, 1), ("applied", 1, 0)]
        assert [key for key, _ in channel.store.all()] == ["RIS|1#S2", "RIS|2#S3"]
    finally:
        channel.store.close()
