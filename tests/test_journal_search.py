"""Searching the journal (`traboule.stores.journal_search`) on each backend: every filter, paging, keys from raw
segments and from the mapping, hostile text, a property test against a plain filter, and the engine's indexer."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BACKENDS, database_url_of
from tests.test_flow import engine_config, fixture, send
from traboule import metrics
from traboule.app.journal_indexer import KeyReader, catch_up, index_batch, payload_keys, raw_keys
from traboule.app.runtime import Runtime
from traboule.model import Identifier, ImagingOrder, Patient, PatientUpdate
from traboule.stores.factory import PostgresStores, SQLiteStores, StoreFactory
from traboule.stores.journal import JournalEntry
from traboule.stores.journal_search import (
    BATCH_BYTES,
    KEY_PREFIX,
    MAX_KEY,
    MAX_KEYS,
    JournalSearch,
    SearchQuery,
    byte_batches,
    page_ids,
)

ORM = (
    "MSH|^~\\&|RIS|HOSP|TRABOULE|HOSP|20261125093000||ORM^O01|{cid}|P|2.3.1\r"
    "PID|||{ipp}^^^HOSP^PI~{ins}^^^ASIP-SANTE-INS-NIR^INS||DUPONT^Helene||19800101|F\r"
    "ORC|NW|{placer}^RIS||\r"
    "OBR|1|{placer}^RIS||CT^Scanner||||||||||||||{acc}|RP{acc}\r"
)
ADT_A40 = (
    "MSH|^~\\&|PAM|HOSP|TRABOULE|HOSP|20261125093000||ADT^A40|{cid}|P|2.5\r"
    "PID|||{ipp}^^^HOSP^PI||DUPONT^Helene\r"
    "MRG|{old}^^^HOSP^PI\r"
)


@pytest.fixture(params=BACKENDS)
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    url = database_url_of(request.param, request)
    return PostgresStores(url, tmp_path) if url else SQLiteStores(tmp_path)


@pytest.fixture
def search(factory: StoreFactory) -> Iterator[JournalSearch]:
    found = factory.journal_search()
    yield found
    found.close()


def orm(cid: str, ipp: str, acc: str, *, ins: str = "", placer: str = "") -> bytes:
    return ORM.format(cid=cid, ipp=ipp, ins=ins, acc=acc, placer=placer or f"P{acc}").encode()


def add(
    factory: StoreFactory,
    raw: bytes,
    *,
    status: str = "accepted",
    received: str = "",
    channel: str = "ris-orders",
    message_type: str = "ORM^O01",
    control_id: str = "",
) -> JournalEntry:
    entry = JournalEntry(channel, raw, status, message_type=message_type, control_id=control_id)
    if received:
        entry.received = received
    return factory.record(entry)


def index_all(search: JournalSearch) -> None:
    catch_up(search, KeyReader(None))


def ids(page: object) -> list[int]:
    return [e.id for e in page.entries]  # type: ignore[attr-defined]


def test_each_backend_implements_the_whole_protocol(search: JournalSearch) -> None:
    import inspect

    assert isinstance(search, JournalSearch)
    for name in ("search", "keys_of", "unindexed", "index", "skip", "lag", "close"):
        wanted = inspect.signature(getattr(JournalSearch, name)).parameters.values()
        found = inspect.signature(getattr(type(search), name)).parameters.values()
        assert [(p.name, p.kind, p.default) for p in wanted] == [(p.name, p.kind, p.default) for p in found], name


def test_each_filter_and_combinations(factory: StoreFactory, search: JournalSearch) -> None:
    a = add(
        factory,
        orm("C1", "IPP1", "ACC1", ins="180017512345678"),
        received="2026-03-01T08:00:00.000+00:00",
        control_id="C1",
    )
    b = add(
        factory,
        orm("C2", "IPP2", "ACC2"),
        received="2026-03-02T08:00:00.000+00:00",
        control_id="C2",
        status="rejected",
        channel="other",
    )
    c = add(
        factory,
        ADT_A40.format(cid="C3", ipp="IPP1", old="IPP9").encode(),
        message_type="ADT^A40",
        received="2026-03-03T08:00:00.000+00:00",
        control_id="C3",
    )
    assert search.search(SearchQuery()).entries == []  # nothing indexed yet
    index_all(search)
    assert search.unindexed() == []

    def find(**kw: object) -> list[int]:
        return ids(search.search(SearchQuery(**kw)))  # type: ignore[arg-type]

    assert find() == [c.id, b.id, a.id]
    assert find(accession="ACC1") == [a.id]
    assert find(accession="PACC2") == [b.id]  # the placer order number
    assert find(accession="RPACC1") == [a.id]  # the requested procedure id
    assert find(patient="IPP1") == [c.id, a.id]
    assert find(patient="180017512345678") == [a.id]  # the INS
    assert find(patient="IPP9") == [c.id]  # merged away
    assert find(control_id="C2") == [b.id]
    assert find(statuses=["rejected"]) == [b.id]
    assert find(statuses=["rejected", "accepted"]) == [c.id, b.id, a.id]
    assert find(channels=["other"]) == [b.id]
    assert find(types=["ADT"]) == [c.id]
    assert find(types=["ORM^O01"]) == [b.id, a.id]
    assert find(types=["ORM^O0"]) == []
    assert find(since="2026-03-02") == [c.id, b.id]
    assert find(since="2026-03-02T08:00:00Z", until="2026-03-03") == [b.id]
    assert find(until="2026-03-02T10:00:00+02:00") == [a.id]  # 08:00 UTC
    assert find(patient="IPP1", types=["ORM"]) == [a.id]
    assert find(patient="IPP1", accession="ACC1", control_id="C1") == [a.id]
    assert find(patient="IPP2", accession="ACC1") == []
    assert find(text="dupont", since="2026-03-02") == [c.id, b.id]
    assert find(text="HELENE", accession="ACC2") == [b.id]
    assert search.keys_of(a.id) == {"accession": ["ACC1", "PACC1", "RPACC1"], "patient": ["180017512345678", "IPP1"]}
    assert search.keys_of(c.id) == {"accession": [], "patient": ["IPP1", "IPP9"]}


def test_paging_with_next_before(factory: StoreFactory, search: JournalSearch) -> None:
    made = [add(factory, orm(f"C{i}", "IPP1", f"ACC{i}")).id for i in range(7)]
    add(factory, orm("X", "IPP2", "ACCX"))
    index_all(search)
    for query in (SearchQuery(patient="IPP1"), SearchQuery(text="IPP1^^^")):
        seen, before = [], 0
        while True:
            page = search.search(query, before=before, limit=3)
            seen += ids(page)
            if not page.next_before:
                break
            assert page.next_before == page.entries[-1].id
            before = page.next_before
        assert seen == made[::-1]
    page = search.search(SearchQuery(patient="IPP1"), limit=7)
    assert len(page.entries) == 7 and page.next_before == 0
    assert search.search(SearchQuery(), limit=10_000).next_before == 0  # bounded by MAX_LIMIT, no error


def test_a_rejected_message_is_found_by_its_patient_and_order(factory: StoreFactory, search: JournalSearch) -> None:
    """Refused messages do not map: their keys come from the raw segments."""
    raw = b"MSH|^~\\&|RIS|H|T|H|2026||ORM^O01|R1|P|2.3.1\rPID|||IPP77^^^H^PI\rOBR|1|||||||||||||||||ACC77\r"
    entry = add(factory, raw, status="rejected")
    reader = KeyReader(engine_config(Path("/nonexistent")))  # the ris-orders mapping refuses it (no ORC)
    catch_up(search, reader)
    assert ids(search.search(SearchQuery(patient="IPP77", statuses=["rejected"]))) == [entry.id]
    assert ids(search.search(SearchQuery(accession="ACC77"))) == [entry.id]


def test_a_customised_mapping_gives_its_keys_too(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(Path(__file__).resolve().parents[1] / "mappings", tmp_path / "mappings")
    custom = tmp_path / "mappings" / "hl7_inbound.yaml"
    shipped = custom.read_text(encoding="utf-8")
    line = "accession_number.value: {from: [IPC-1.1, OBR-18], max: 16}"
    assert line in shipped
    custom.write_text(shipped.replace(line, line.replace("[IPC-1.1", "[ORC-4.1, IPC-1.1")), encoding="utf-8")
    segments = fixture("orm_o01_nw_latin1.hl7").split(b"\r")
    orc = next(i for i, s in enumerate(segments) if s.startswith(b"ORC|"))
    fields = segments[orc].split(b"|") + [b""] * 5
    fields[4] = b"GRP42"
    segments[orc] = b"|".join(fields).rstrip(b"|")
    entry = JournalEntry("ris-orders", b"\r".join(segments), "accepted", id=1)
    cfg = engine_config(tmp_path)
    assert "GRP42" not in KeyReader(cfg).keys(entry)["accession"]  # the shipped mapping: raw fields only
    cfg.channels[0]["mapping"] = str(custom)
    keys = KeyReader(cfg).keys(entry)
    assert keys["accession"] == ["ACC0001", "FIL0001", "GRP42", "PLC0001", "RP0001"]  # ORC-4 by the mapping


def test_text_is_case_insensitive_and_hostile_text_is_only_text(factory: StoreFactory, search: JournalSearch) -> None:
    hostile = ["%", "_", "'", '"', "NEAR", "AND", "OR", "*", "\\", ";", "--", "(", ")", "^", "\x00", "\x01"]
    raw = orm("C1", "IPP1", "ACC1").replace(b"Helene", "Hélène 100%_off 'q' \"NEAR(a b)\" x AND y*".encode())
    hit = add(factory, raw)
    add(factory, orm("C2", "IPP2", "ACC2"))
    index_all(search)
    assert ids(search.search(SearchQuery(text="HÉLÈNE"))) == [hit.id]
    assert ids(search.search(SearchQuery(text="dUpOnT"))) == [hit.id + 1, hit.id]
    assert ids(search.search(SearchQuery(text="100%_off"))) == [hit.id]
    assert ids(search.search(SearchQuery(text="1%0"))) == []
    assert ids(search.search(SearchQuery(text="'q'"))) == [hit.id]
    assert ids(search.search(SearchQuery(text='"near(a b)"'))) == [hit.id]
    assert ids(search.search(SearchQuery(text="x and y*"))) == [hit.id]
    assert ids(search.search(SearchQuery(text="x OR y"))) == []
    for bad in hostile:
        for field in ("accession", "patient", "control_id"):
            assert search.search(SearchQuery(**{field: bad})).entries == []  # type: ignore[arg-type]
        assert search.search(SearchQuery(types=[bad], channels=[bad], statuses=[bad])).entries == []
        assert search.search(SearchQuery(text=f"'{bad}%' OR 1=1 --")).entries == []
    assert search.search(SearchQuery(accession="' OR 1=1 --")).entries == []
    with pytest.raises(ValueError, match="at least"):
        search.search(SearchQuery(text="ab"))
    with pytest.raises(ValueError, match="at most"):
        search.search(SearchQuery(text="x" * 1000))
    with pytest.raises(ValueError, match="ISO 8601"):
        search.search(SearchQuery(since="yesterday'; DROP TABLE messages; --"))


def test_pruned_entries_leave_the_index(factory: StoreFactory, search: JournalSearch) -> None:
    def prune(before: str) -> int:
        journal = factory.journal()
        try:
            return journal.prune(before)
        finally:
            journal.close()

    old = add(factory, orm("C1", "IPP1", "ACC1"), received="2020-01-01T00:00:00.000+00:00")
    kept = add(factory, orm("C2", "IPP1", "ACC2"))
    index_all(search)
    assert search.keys_of(old.id)["patient"] == ["IPP1"]
    assert prune("2021-01-01") == 1
    assert ids(search.search(SearchQuery(patient="IPP1"))) == [kept.id]  # at once: pages are read from the journal
    new = add(factory, orm("C3", "IPP1", "ACC3"))
    index_all(search)
    assert search.keys_of(old.id) == {"accession": [], "patient": []}  # forgotten with the next batch
    assert ids(search.search(SearchQuery(patient="IPP1"))) == [new.id, kept.id]
    # Emptied: SQLite numbers the next entries from 1 again; the index starts again with them.
    assert prune("2999-01-01") == 2
    again = add(factory, orm("C4", "IPP4", "ACC4"))
    index_all(search)
    assert ids(search.search(SearchQuery(patient="IPP4"))) == [again.id]
    assert search.search(SearchQuery(patient="IPP1")).entries == []
    assert search.keys_of(again.id) == {"accession": ["ACC4", "PACC4", "RPACC4"], "patient": ["IPP4"]}


def test_keys_are_bounded() -> None:
    many = "~".join(f"IPP{i}^^^H^PI" for i in range(500))
    long = "A" * (MAX_KEY + 1)
    raw = f"MSH|^~\\&|R|H|T|H|2026||ORM^O01|1|P|2.3.1\rPID|||{many}~{long}\rOBR|1|||||||||||||||||{long}\r".encode()
    keys = raw_keys(raw)
    assert len(keys["patient"]) == MAX_KEYS and long not in keys["patient"]
    assert keys["accession"] == []
    assert raw_keys(b"not hl7") == {"accession": [], "patient": []}
    tildes = b"MSH|^~\\&|R|H|T|H|2026||ORM^O01|1|P|2.3.1\rPID|||" + b"~" * KEY_PREFIX + b"IPP1\r"
    assert raw_keys(tildes)["patient"] == []  # repetitions past MAX_KEYS * 2 are not even split apart
    ctl = b"MSH|^~\\&|R|H|T|H|2026||ORM^O01|1|P|2.3.1\rPID|||IP\\X0A\\P^^^H\r"
    assert raw_keys(ctl)["patient"] == []  # a control character (escaped line feed): not a key
    order = ImagingOrder(
        accession_number=Identifier("A1"),
        placer_order_number=Identifier("P1"),
        patient=Patient(ids=[Identifier("IPP1"), Identifier("1" * 200)]),
    )
    merge = PatientUpdate(action="merge", patient=Patient(ids=[Identifier("IPP1")]), merged_ids=[Identifier("IPP0")])
    assert payload_keys([order, merge]) == {"accession": ["A1", "P1"], "patient": ["IPP0", "IPP1"]}


# -- hostile messages never stop the index, large ones are read a bounded slice at a time ----------------------


def test_a_long_msh10_is_not_a_key_and_stops_nothing(factory: StoreFactory, search: JournalSearch) -> None:
    """An MSH-10 of 8,000 characters (accepted and journaled: MSH-10 is not bounded on reception) is not indexed:
    on PostgreSQL it would not fit a B-tree row, and the entries after it would never be indexed."""
    long = "F" * 8000
    first = add(factory, orm("OK1", "IPP1", "ACC1"), control_id="OK1")
    hostile = add(factory, orm(long, "IPP2", "ACC2"), control_id=long)
    second = add(factory, orm("OK2", "IPP3", "ACC3"), control_id="OK2")
    assert search.lag() == 3
    assert index_batch(search, KeyReader(None)) == 3
    assert search.lag() == 0 and search.unindexed() == []
    assert ids(search.search(SearchQuery(control_id="OK2"))) == [second.id]
    assert ids(search.search(SearchQuery(patient="IPP3"))) == [second.id]
    assert ids(search.search(SearchQuery(patient="IPP2"))) == [hostile.id]  # its other keys are indexed
    assert ids(search.search(SearchQuery())) == [second.id, hostile.id, first.id]
    with pytest.raises(ValueError, match="at most 64"):  # never a key: refused, not an empty page
        search.search(SearchQuery(control_id=long))
    with pytest.raises(ValueError, match="at most 64"):
        search.search(SearchQuery(accession="A" * (MAX_KEY + 1)))
    edge = add(factory, orm("E", "IPP4", "ACC4"), control_id="E" * MAX_KEY)
    index_all(search)
    assert ids(search.search(SearchQuery(control_id="E" * MAX_KEY))) == [edge.id]


class PoisonKeys(KeyReader):
    """Keys the index cannot store (a lone surrogate: no text encoding takes it) for one message, as a mapping
    going wrong would give."""

    def __init__(self, poisoned: int) -> None:
        super().__init__(None)
        self.poisoned = poisoned

    def keys(self, entry: JournalEntry) -> dict[str, list[str]]:
        keys = super().keys(entry)
        return {"accession": keys["accession"], "patient": ["\ud800"]} if entry.id == self.poisoned else keys


def test_an_entry_the_index_refuses_is_skipped_not_retried(factory: StoreFactory, search: JournalSearch) -> None:
    import structlog

    before = add(factory, orm("C1", "IPP1", "ACC1"), control_id="C1")
    bad = add(factory, orm("C2", "IPP2", "ACC2"), control_id="C2", status="rejected")
    after = add(factory, orm("C3", "IPP3", "ACC3"), control_id="C3")
    with structlog.testing.capture_logs() as logs:
        assert index_batch(search, PoisonKeys(bad.id)) == 3
    (skipped,) = [e for e in logs if e["event"] == "journal_index.entry_skipped"]
    assert skipped == {
        "event": "journal_index.entry_skipped",
        "message_id": bad.id,
        "error": "UnicodeEncodeError",
        "log_level": "warning",
    }
    assert search.lag() == 0 and search.unindexed() == []
    assert ids(search.search(SearchQuery(control_id="C3"))) == [after.id]
    assert ids(search.search(SearchQuery(patient="IPP1"))) == [before.id]
    assert ids(search.search(SearchQuery(statuses=["rejected"]))) == [bad.id]  # found by time, status...
    assert search.search(SearchQuery(control_id="C2")).entries == []  # ... but by no key
    assert search.keys_of(bad.id) == {"accession": [], "patient": []}


def test_a_database_error_leaves_the_batch_to_retry(tmp_path: Path) -> None:
    """A locked index (SQLite's busy timeout runs out) is not an entry's fault: nothing is skipped, the mark stays,
    and the next try indexes every key."""
    import sqlite3

    factory = SQLiteStores(tmp_path)
    search = factory.journal_search()
    try:
        entry = add(factory, orm("C1", "IPP1", "ACC1"), control_id="C1")
        search._db.execute("PRAGMA busy_timeout = 20")  # type: ignore[attr-defined]
        holder = sqlite3.connect(tmp_path / "journal.index", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            index_batch(search, KeyReader(None))
        assert search.lag() == 1
        holder.execute("ROLLBACK")
        holder.close()
        assert index_batch(search, KeyReader(None)) == 1
        assert ids(search.search(SearchQuery(control_id="C1", patient="IPP1"))) == [entry.id]
    finally:
        search.close()


def oru(cid: str, ipp: str, acc: str, size: int) -> bytes:
    """A report of about ``size`` bytes: its keys first, then OBX segments."""
    head = orm(cid, ipp, acc).replace(b"ORM^O01", b"ORU^R01")
    obx = b"OBX|1|TX|||" + b"x" * 990 + b"\r"
    return head + obx * (size // len(obx))


def test_the_indexer_reads_only_the_start_of_large_messages(factory: StoreFactory, search: JournalSearch) -> None:
    import tracemalloc

    big = [add(factory, oru(f"B{i}", f"IPP{i}", f"ACC{i}", 2 << 20), control_id=f"B{i}") for i in range(6)]
    tracemalloc.start()
    try:
        entries = search.unindexed()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.id for e in entries] == [e.id for e in big]
    for entry in entries:
        assert len(entry.raw) <= KEY_PREFIX and entry.raw.endswith(b"\r")  # whole segments only
    assert peak < 2 * len(entries) * KEY_PREFIX + (1 << 20), peak  # 12 MiB of messages, a few hundred KiB read
    index_all(search)
    assert ids(search.search(SearchQuery(accession="ACC4"))) == [big[4].id]
    assert ids(search.search(SearchQuery(patient="IPP5", control_id="B5"))) == [big[5].id]


def test_pages_and_text_scans_hold_a_bounded_size_of_messages(factory: StoreFactory, search: JournalSearch) -> None:
    """Ten 2 MiB messages: a page stops at `BATCH_BYTES` of raw messages and says where to go on; a text scan of
    them all holds about one batch at a time, not the ten."""
    import tracemalloc

    entries = [add(factory, oru(f"B{i}", "IPP1", f"ACC{i}", 2 << 20), control_id=f"B{i}") for i in range(10)]
    made, sizes = [e.id for e in entries], {e.id: len(e.raw) for e in entries}
    index_all(search)
    for query in (SearchQuery(patient="IPP1"), SearchQuery(), SearchQuery(text="acc")):
        seen, before = [], 0
        while True:
            page = search.search(query, before=before, limit=50)
            assert 1 <= len(page.entries) <= BATCH_BYTES // (2 << 20)
            assert sum(len(e.raw) for e in page.entries) <= BATCH_BYTES
            assert all(len(e.raw) == sizes[e.id] for e in page.entries)  # whole entries: a page is read in full
            seen += ids(page)
            if not page.next_before:
                break
            before = page.next_before
        assert seen == made[::-1], query
    tracemalloc.start()
    try:
        assert search.search(SearchQuery(text="not in any")).entries == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * BATCH_BYTES, peak  # the ten are 20 MiB


def test_byte_batches_and_pages() -> None:
    assert list(byte_batches([(1, 3), (2, 3), (3, 3), (4, 10), (5, 1)], budget=7)) == [[1, 2], [3], [4], [5]]
    assert list(byte_batches([])) == []
    sizes = {9: BATCH_BYTES // 2, 8: BATCH_BYTES // 2, 7: 1, 5: 1}
    assert page_ids([9, 8, 7, 6, 5], sizes, 50, 0) == ([9, 8], True)  # full by bytes, entries left
    assert page_ids([7, 6, 5], sizes, 1, 0) == ([7], True)  # full by count
    assert page_ids([7, 6, 5], sizes, 2, 0) == ([7, 5], False)  # 6: gone from the journal
    assert page_ids([7, 6], sizes, 2, 0) == ([7], False)
    assert page_ids([9], {9: BATCH_BYTES * 3}, 50, 0) == ([9], False)  # one entry at least


# -- a property: the search is a filter of the entries ------------------------------------------------------------

_STATUSES = ["accepted", "rejected", "duplicate"]
_TYPES = ["ORM^O01", "OMI^O23", "ADT^A40", "ORU^R01"]
_CHANNELS = ["ris-orders", "pam"]


@pytest.fixture(scope="module", params=BACKENDS)
def corpus(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[JournalSearch, list[JournalEntry], dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    if request.param == "postgresql":  # one database for the module's examples (``pg_url`` is one per test)
        server = request.getfixturevalue("postgres_server")
        factory: StoreFactory = PostgresStores(server.url(server.create_database()), folder)
    else:
        factory = SQLiteStores(folder)
    rnd = random.Random(7)
    entries, keys = [], {}
    for i in range(80):
        ipp, acc = f"IPP{rnd.randrange(8)}", f"ACC{rnd.randrange(15)}"
        at = f"2026-03-{1 + rnd.randrange(9):02d}T{rnd.randrange(24):02d}:00:00.000+00:00"
        entry = add(
            factory,
            orm(f"C{rnd.randrange(40)}", ipp, acc),
            status=rnd.choice(_STATUSES),
            received=at,
            channel=rnd.choice(_CHANNELS),
            message_type=rnd.choice(_TYPES),
            control_id=f"C{i % 40}",
        )
        entries.append(entry)
        keys[entry.id] = raw_keys(entry.raw)
    search = factory.journal_search()
    index_all(search)
    yield search, entries, keys
    search.close()


def _matches(q: SearchQuery, e: JournalEntry, keys: dict[str, list[str]]) -> bool:
    return (
        (not q.since or e.received >= q.since)
        and (not q.until or e.received < q.until)
        and (not q.statuses or e.status in q.statuses)
        and (not q.channels or e.channel in q.channels)
        and (not q.types or any(e.message_type == t or e.message_type.startswith(t + "^") for t in q.types))
        and (not q.control_id or e.control_id == q.control_id)
        and (not q.accession or q.accession in keys["accession"])
        and (not q.patient or q.patient in keys["patient"])
        and (not q.text or q.text.casefold() in e.raw.decode("latin-1").casefold())
    )


_day = st.integers(1, 10).map(lambda d: f"2026-03-{d:02d}T00:00:00.000+00:00")
_queries = st.builds(
    SearchQuery,
    since=st.one_of(st.just(""), _day),
    until=st.one_of(st.just(""), _day),
    statuses=st.lists(st.sampled_from(_STATUSES), max_size=2),
    types=st.lists(st.sampled_from([*_TYPES, "ORM", "ADT", "OR"]), max_size=2),
    channels=st.lists(st.sampled_from(_CHANNELS), max_size=1),
    control_id=st.one_of(st.just(""), st.integers(0, 45).map(lambda n: f"C{n}")),
    accession=st.one_of(st.just(""), st.integers(0, 16).map(lambda n: f"ACC{n}")),
    patient=st.one_of(st.just(""), st.integers(0, 9).map(lambda n: f"IPP{n}")),
    text=st.one_of(st.just(""), st.sampled_from(["ipp3", "ACC1", "orc|nw", "%_'", "pacc12^"])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=_queries, limit=st.integers(1, 40))
def test_search_is_a_filter_of_the_journal(corpus: tuple, query: SearchQuery, limit: int) -> None:
    search, entries, keys = corpus
    wanted = [e.id for e in reversed(entries) if _matches(query, e, keys[e.id])]
    seen, before = [], 0
    for _ in range(200):
        page = search.search(query, before=before, limit=limit)
        assert len(page.entries) <= limit
        seen += ids(page)
        if not page.next_before:
            break
        before = page.next_before
    assert seen == wanted


# -- the engine's indexer -----------------------------------------------------------------------------------------


async def test_the_engine_indexes_a_sent_order_within_seconds(tmp_path: Path, database_url: str) -> None:
    metrics.journal_index_lag.set(-1)  # set by the indexer
    runtime = Runtime(engine_config(tmp_path, database_url=database_url))
    await runtime.start()
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        search = runtime.stores.journal_search()
        try:
            started = time.monotonic()
            while not (page := await asyncio.to_thread(search.search, SearchQuery(accession="ACC0001"))).entries:
                assert time.monotonic() - started < 5, "not indexed within 5 s"
                await asyncio.sleep(0.05)
            (entry,) = page.entries
            assert entry.message_type == "ORM^O01" and entry.status == "accepted"
            assert b"ACC0001" in entry.raw
            keys = await asyncio.to_thread(search.keys_of, entry.id)
            assert "ACC0001" in keys["accession"] and keys["patient"]
            assert runtime.journal_indexer.lease.held  # the one node indexes
            started = time.monotonic()
            while metrics.REGISTRY.get_sample_value("traboule_journal_index_lag") != 0:
                assert time.monotonic() - started < 5, "no index lag on /metrics"
                await asyncio.sleep(0.05)
        finally:
            search.close()
    finally:
        await runtime.stop()


def test_cli_search_indexes_first_when_no_engine_runs(tmp_path: Path) -> None:
    import os

    from tests.test_engine import cli

    factory = SQLiteStores(tmp_path / "var")
    first = add(factory, orm("C1", "IPP1", "ACC1"), control_id="C1")
    add(factory, orm("C2", "IPP2", "ACC2"), control_id="C2", status="rejected")
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "var"))
    found = cli("journal", "search", "--patient", "IPP1", "--text", "helene", env=env)
    assert found.returncode == 0, found.stderr
    assert "2 journal entries indexed" in found.stderr
    (line,) = found.stdout.splitlines()
    assert line.split()[0] == str(first.id) and "C1" in line and "accepted" in line
    assert "rejected" in cli("journal", "search", "--status", "rejected", "--since", "2000-01-01", env=env).stdout
    refused = cli("journal", "search", "--text", "ab", env=env)
    assert refused.returncode == 1 and "at least 3" in refused.stderr
