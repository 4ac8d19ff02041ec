"""Journal search (the operations console): latency of each kind of search on a journal of 1,000,000 messages.

Generates a journal of ``--messages`` HL7 messages (default 1,000,000) written in bulk straight into the journal's
table (not sent over MLLP): a year of reception times, ``--patients`` patients (IPP and INS each), one accession
number per order and several messages per order (ORM^O01 new / status change / cancel, ORU^R01 reports with a few
lines of text, ADT^A08 updates, a few ADT^A40 merges), 3 % rejected, 2 % duplicates, two channels. Then:

* indexes it: the keys of a sample of messages through the indexer's own readers (raw segments, and the shipped
  mapping: the rate a catch-up after an upgrade runs at), the rest with the keys the generator knows, through the
  store's ``index`` (the same write path);
* runs ``--queries`` searches of each kind (a page of 50, newest first) and prints p50 / p99: by accession number,
  by patient identifier, by time range (a day), by MSH-10, by free text within a day, by status over the whole
  journal, by free text over the whole journal (bounded: one call reads ``SCAN_BUDGET`` messages at most);
* prints the sizes: journal, index, and what an FTS5 trigram index of the raw messages would take (measured on a
  sample, scaled).

    .venv/bin/python bench/journal_search.py [--messages 1000000] [--queries 200] [--keep DIR] [--postgres]

``--postgres``: the same on a PostgreSQL cluster the script starts from the Debian binaries (tests/peer_postgres.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from traboule.app.config import Config
from traboule.app.journal_indexer import SHIPPED, KeyReader
from traboule.stores.factory import PostgresStores, SQLiteStores
from traboule.stores.journal import COLUMNS, SCHEMA, JournalEntry
from traboule.stores.journal_search import JournalSearch, SearchQuery
from traboule.stores.sqlite import Durability, open_database
from traboule.translate.hl7_mapping import HL7InboundMapping

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2025, 12, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
FAMILIES = ["MARTIN", "BERNARD", "THOMAS", "PETIT", "ROBERT", "RICHARD", "DURAND", "DUBOIS", "MOREAU", "LAURENT"]
GIVEN = ["Jean", "Marie", "Pierre", "Sophie", "Luc", "Claire", "Paul", "Anne", "Louis", "Julie"]
EXAMS = [("CT", "TDM THORAX"), ("MR", "IRM GENOU"), ("US", "ECHO ABDO"), ("CR", "RADIO POUMONS"), ("MG", "MAMMO")]
REPORT = (
    "OBX|{n}|TX|TEXTE^Compte rendu||Examen realise sans injection. Pas d'anomalie decelable au niveau du "
    "parenchyme. Conclusion: examen normal, a controler dans six mois.||||||F\r"
)


def patient(n: int) -> tuple[str, str, str]:
    rnd = random.Random(n)
    return f"IPP{n:07d}", f"{1 + n % 2}{rnd.randrange(10**14):014d}", f"{rnd.choice(FAMILIES)}{n % 97}"


def message(i: int, rnd: random.Random, patients: int) -> tuple[JournalEntry, dict[str, list[str]]]:
    """Message ``i`` of the journal and the keys the indexer finds in it."""
    order = i // 3  # about three messages per order
    p = rnd.randrange(patients) if i % 3 == 0 else random.Random(order).randrange(patients)
    ipp, ins, family = patient(p)
    acc, placer = f"A{order:08d}", f"P{order:08d}"
    at = START + YEAR * i / ARGS.messages + timedelta(seconds=rnd.random())
    stamp = at.strftime("%Y%m%d%H%M%S")
    cid = f"M{i:09d}"
    modality, label = EXAMS[order % len(EXAMS)]
    given = GIVEN[p % len(GIVEN)]
    pid = f"PID|1||{ipp}^^^HOSP^PI~{ins}^^^ASIP-SANTE-INS-NIR^INS||{family}^{given}^^^^^L||19{p % 90 + 10:02d}0101|F\r"
    pv1 = "PV1|1|O|RADIO^^^HOSP||||123^DOC^Jean|||||||||||V{p:08d}\r"
    kind = rnd.random()
    keys = {"accession": [acc, placer, f"RP{order:07d}"], "patient": [ins, ipp]}
    if kind < 0.55:
        control = ["NW", "SC", "CA"][i % 3] if kind > 0.05 else "XO"
        mtype = "ORM^O01"
        body = (
            f"{pid}{pv1}ORC|{control}|{placer}^RIS||||||^^^{stamp}^^R||{stamp}|||123^DOC^Jean\r"
            f"OBR|1|{placer}^RIS||{modality}^{label}^L|||{stamp}|||||||||123^DOC^Jean||{acc}|RP{order:07d}|||||"
            f"{modality}\rZDS|1.2.250.1.999.{order}^RIS^Application^DICOM\r"
        )
    elif kind < 0.85:
        mtype = "ORU^R01"
        body = (
            f"{pid}{pv1}ORC|RE|{placer}^RIS\rOBR|1|{placer}^RIS||{modality}^{label}^L|||{stamp}|||||||||"
            f"123^DOC^Jean||{acc}|RP{order:07d}\r" + "".join(REPORT.format(n=n) for n in range(1, 4))
        )
    elif kind < 0.99:
        mtype = "ADT^A08"
        body = f"EVN|A08|{stamp}\r{pid}{pv1}"
        keys["accession"] = []
    else:
        mtype = "ADT^A40"
        old = f"IPP{rnd.randrange(patients):07d}"
        body = f"EVN|A40|{stamp}\r{pid}MRG|{old}^^^HOSP^PI\r"
        keys = {"accession": [], "patient": [ins, ipp, old]}
    sender = "RIS" if mtype.startswith("ORM") else "PACS" if mtype.startswith("ORU") else "PAM"
    raw = f"MSH|^~\\&|{sender}|HOSP|TRABOULE|HOSP|{stamp}||{mtype}|{cid}|P|2.5|||||FRA|8859/1\r{body}".encode()
    status = "rejected" if rnd.random() < 0.03 else "duplicate" if rnd.random() < 0.02 else "accepted"
    channel = "ris-reports" if mtype.startswith("ORU") else "ris-orders"
    entry = JournalEntry(
        channel,
        raw,
        status,
        peer="10.0.0.5",
        control_id=cid,
        message_type=mtype,
        ack_code="AA" if status != "rejected" else "AE",
        idempotency_key=f"{sender}|{cid}",
        received=at.isoformat(timespec="milliseconds"),
        id=i + 1,
    )
    return entry, {k: sorted(set(v)) for k, v in keys.items()}


def generate(rnd: random.Random) -> Iterator[tuple[JournalEntry, dict[str, list[str]]]]:
    for i in range(ARGS.messages):
        yield message(i, rnd, ARGS.patients)


def fill_sqlite(path: Path, keys: dict[int, dict[str, list[str]]]) -> None:
    db = open_database(path, Durability.CRASH)
    db.executescript(SCHEMA)
    rnd = random.Random(1)
    rows: list[tuple] = []
    db.execute("BEGIN")
    for entry, found in generate(rnd):
        rows.append((entry.id, *(getattr(entry, c) for c in COLUMNS)))
        keys[entry.id] = found
        if len(rows) == 50_000:
            db.executemany(f"INSERT INTO messages (id, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * 13)})", rows)
            rows.clear()
    db.executemany(f"INSERT INTO messages (id, {', '.join(COLUMNS)}) VALUES ({', '.join('?' * 13)})", rows)
    db.execute("COMMIT")
    db.close()


def fill_postgres(url: str, keys: dict[int, dict[str, list[str]]]) -> None:
    from traboule.stores.postgres import connect
    from traboule.stores.postgres.journal import PostgresJournal

    PostgresJournal(url).close()  # the schema
    rnd = random.Random(1)
    with connect(url) as db, db.cursor() as cur:
        db.execute("SET statement_timeout = 0")  # one COPY of the whole journal
        with cur.copy(f"COPY journal_messages (id, {', '.join(COLUMNS)}) FROM STDIN") as copy:
            for entry, found in generate(rnd):
                copy.write_row((entry.id, *(getattr(entry, c) for c in COLUMNS)))
                keys[entry.id] = found
        db.execute("SELECT setval(pg_get_serial_sequence('journal_messages', 'id'), %s)", (ARGS.messages,))
        db.execute("VACUUM ANALYZE journal_messages")


def index(search: JournalSearch, keys: dict[int, dict[str, list[str]]], cfg: Config) -> None:
    sample = search.unindexed(2_000)
    reader = KeyReader(cfg)  # the shipped mapping: the raw segments only
    remapping = KeyReader(cfg)  # as with a customised mapping: each message mapped again too
    remapping._mappings = {name: HL7InboundMapping(ROOT / SHIPPED) for name in remapping.channels}
    for name, read in (("raw segments (shipped mapping)", reader.keys), ("raw + a customised mapping", remapping.keys)):
        started = time.perf_counter()
        for entry in sample:
            read(entry)
        rate = len(sample) / (time.perf_counter() - started)
        print(f"  keys from {name}: {rate:,.0f} messages/s (one thread)")
    mismatch = sum(remapping.keys(e) != keys[e.id] for e in sample[:500])
    print(f"  generated keys differing from the indexer's on 500 messages: {mismatch}")
    started = time.perf_counter()
    batch = 5_000
    for low in range(1, ARGS.messages + 1, batch):
        search.index([(i, keys[i]) for i in range(low, min(low + batch, ARGS.messages + 1))])
    print(f"  index writes: {ARGS.messages / (time.perf_counter() - started):,.0f} messages/s")


def measure(name: str, search: JournalSearch, make: Callable[[random.Random], SearchQuery]) -> None:
    rnd = random.Random(name)
    times, sizes = [], []
    for _ in range(ARGS.queries):
        query = make(rnd)
        started = time.perf_counter()
        page = search.search(query, limit=50)
        times.append((time.perf_counter() - started) * 1000)
        sizes.append(len(page.entries))
    times.sort()
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(
        f"  {name:34} p50 {statistics.median(times):8.2f} ms   p99 {p99:8.2f} ms   "
        f"(entries per page: median {statistics.median(sizes):.0f})"
    )


def day(rnd: random.Random) -> tuple[str, str]:
    at = START + timedelta(days=rnd.randrange(365))
    return at.isoformat(), (at + timedelta(days=1)).isoformat()


def month(rnd: random.Random) -> tuple[str, str]:
    at = START + timedelta(days=rnd.randrange(335))
    return at.isoformat(), (at + timedelta(days=30)).isoformat()


def searches(search: JournalSearch) -> None:
    n, patients = ARGS.messages, ARGS.patients
    measure("accession", search, lambda r: SearchQuery(accession=f"A{r.randrange(n // 3):08d}"))
    measure("patient (IPP)", search, lambda r: SearchQuery(patient=patient(r.randrange(patients))[0]))
    measure("patient (INS) + type ORU", search, lambda r: SearchQuery(patient=patient(r.randrange(patients))[1],
                                                                       types=["ORU"]))  # fmt: skip
    measure("time range (a day)", search, lambda r: SearchQuery(*day(r)))
    measure("MSH-10", search, lambda r: SearchQuery(control_id=f"M{r.randrange(n):09d}"))
    measure("text within a day (a name)", search, lambda r: SearchQuery(*day(r), text=f"{r.choice(FAMILIES)}1"))
    measure("text within a day (absent)", search, lambda r: SearchQuery(*day(r), text="absent-text"))
    measure("status rejected (whole journal)", search, lambda r: SearchQuery(statuses=["rejected"]))
    measure("type ADT^A40, a month", search, lambda r: SearchQuery(*month(r), types=["ADT^A40"]))
    measure("text, whole journal (absent)", search, lambda r: SearchQuery(text="absent-text"))


def fts_size(journal: Path) -> int:
    """An FTS5 trigram index of the raw messages: its size on a sample, scaled to the whole journal."""
    sample = min(50_000, ARGS.messages)
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "fts.sqlite")
        db.execute("CREATE VIRTUAL TABLE t USING fts5(raw, tokenize='trigram', content='', detail='none')")
        src = sqlite3.connect(journal)
        db.execute("BEGIN")
        for (raw,) in src.execute("SELECT raw FROM messages ORDER BY id LIMIT ?", (sample,)):
            db.execute("INSERT INTO t (raw) VALUES (?)", (bytes(raw).decode("latin-1"),))
        db.execute("COMMIT")
        db.execute("INSERT INTO t (t) VALUES ('optimize')")
        db.close()
        return (Path(tmp) / "fts.sqlite").stat().st_size * ARGS.messages // sample


def run_sqlite(folder: Path) -> None:
    cfg = Config(data_dir=str(folder))
    keys: dict[int, dict[str, list[str]]] = {}
    started = time.perf_counter()
    fill_sqlite(folder / "journal.sqlite", keys)
    print(f"sqlite: {ARGS.messages:,} messages generated in {time.perf_counter() - started:.0f} s")
    search = SQLiteStores(folder).journal_search()
    index(search, keys, cfg)
    search._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    journal, size = (folder / "journal.sqlite").stat().st_size, search.size()
    print(
        f"  journal {journal / 2**20:,.0f} MiB, index {size / 2**20:,.0f} MiB ({size / ARGS.messages:.0f} B a message)"
    )
    fts = fts_size(folder / "journal.sqlite")
    print(f"  an FTS5 trigram index of the raw messages (contentless, detail=none): about {fts / 2**20:,.0f} MiB")
    searches(search)
    search.close()


def run_postgres() -> None:
    from tests.peer_postgres import run_postgres as cluster

    cfg = Config(data_dir=tempfile.mkdtemp())
    with cluster() as server:
        url = server.url(server.create_database())
        keys: dict[int, dict[str, list[str]]] = {}
        started = time.perf_counter()
        fill_postgres(url, keys)
        print(f"postgresql: {ARGS.messages:,} messages generated in {time.perf_counter() - started:.0f} s")
        search = PostgresStores(url, cfg.data_dir).journal_search()
        index(search, keys, cfg)
        search._db.execute("VACUUM ANALYZE journal_search_keys")
        print(f"  index {search.size() / 2**20:,.0f} MiB ({search.size() / ARGS.messages:.0f} B a message)")
        searches(search)
        search.close()
    shutil.rmtree(cfg.data_dir, ignore_errors=True)


def main() -> None:
    print(f"{os.cpu_count()} cores, SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}")
    folder = Path(ARGS.keep) if ARGS.keep else Path(tempfile.mkdtemp(prefix="journal-search-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if not ARGS.skip_sqlite:
            run_sqlite(folder)
        if ARGS.postgres:
            run_postgres()
    finally:
        if not ARGS.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--messages", type=int, default=1_000_000)
parser.add_argument("--patients", type=int, default=150_000)
parser.add_argument("--queries", type=int, default=200)
parser.add_argument("--keep", default="", help="a folder to generate into and leave (default: a temporary one)")
parser.add_argument("--postgres", action="store_true")
parser.add_argument("--skip-sqlite", action="store_true")
ARGS = parser.parse_args()

if __name__ == "__main__":
    main()
