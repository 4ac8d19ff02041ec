"""Console pages: how long each page of the operations console takes to render on a journal of 1,000,000 messages.

Generates the journal of `bench/journal_search.py` (its generator: a year of HL7 messages written in bulk, 3 %
rejected, 2 % duplicates, two channels) ending now, so that the dashboard's last hour and last day hold traffic, and
its search index; starts an engine in-process on that data folder (orders → worklist, an admin token, as
tests/test_console.py does), sends ``--orders`` orders over MLLP so the worklist has items, logs in to the console,
then requests each page ``--requests`` times through httpx against the ASGI app (the whole Starlette stack: session,
CSRF token, rendering, security headers) and prints p50 / p99 and p99 against the 300 ms target.

    .venv/bin/python bench/console_pages.py [--messages 1000000] [--requests 30] [--orders 1000] [--keep DIR]
                                            [--postgres]

``--keep DIR`` generates into DIR once and reuses it on the next runs (its journal then ends when it was made).
``--postgres``: the journal, its index and the engine's stores on a PostgreSQL cluster the script starts from the
Debian binaries (tests/peer_postgres.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--messages", type=int, default=1_000_000)
parser.add_argument("--patients", type=int, default=150_000)
parser.add_argument("--requests", type=int, default=30)
parser.add_argument("--orders", type=int, default=1000, help="orders sent over MLLP before measuring (the worklist)")
parser.add_argument("--keep", default="", help="a folder to generate into and reuse (default: a temporary one)")
parser.add_argument("--postgres", action="store_true")
ARGS = parser.parse_args()

sys.path.insert(0, str(Path(__file__).resolve().parent))
_argv, sys.argv = sys.argv, sys.argv[:1]  # the generator's module parses its own arguments when imported
import journal_search as gen  # noqa: E402

sys.argv = _argv
gen.ARGS.messages, gen.ARGS.patients = ARGS.messages, ARGS.patients
gen.START = datetime.now(UTC).replace(microsecond=0) - gen.YEAR  # the journal ends now

from tests.test_flow import engine_config, send  # noqa: E402
from traboule.app.http import create_app  # noqa: E402
from traboule.app.logging import configure  # noqa: E402
from traboule.app.runtime import Runtime  # noqa: E402
from traboule.stores.factory import PostgresStores, SQLiteStores  # noqa: E402

TOKEN = "0123456789abcdef0123456789abcdef"
TARGET_MS = 300.0


def index_all(search: object, keys: dict[int, dict[str, list[str]]]) -> None:
    started = time.perf_counter()
    for low in range(1, ARGS.messages + 1, 5_000):
        search.index([(i, keys[i]) for i in range(low, min(low + 5_000, ARGS.messages + 1))])  # type: ignore[attr-defined]
    print(f"  indexed in {time.perf_counter() - started:.0f} s")


def build_sqlite(folder: Path) -> None:
    if (folder / "journal.sqlite").exists():
        print(f"sqlite: reusing {folder}")
        return
    keys: dict[int, dict[str, list[str]]] = {}
    started = time.perf_counter()
    gen.fill_sqlite(folder / "journal.sqlite", keys)
    print(f"sqlite: {ARGS.messages:,} messages generated in {time.perf_counter() - started:.0f} s")
    search = SQLiteStores(folder).journal_search()
    index_all(search, keys)
    search._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    search.close()


def build_postgres(url: str) -> None:
    keys: dict[int, dict[str, list[str]]] = {}
    started = time.perf_counter()
    gen.fill_postgres(url, keys)
    print(f"postgresql: {ARGS.messages:,} messages generated in {time.perf_counter() - started:.0f} s")
    search = PostgresStores(url, tempfile.gettempdir()).journal_search()
    index_all(search, keys)
    search._db.execute("VACUUM ANALYZE journal_search_keys")
    search.close()


def orm(n: int) -> str:
    """A new order for today (the worklist page's default date)."""
    today = datetime.now(UTC).strftime("%Y%m%d")
    return (
        f"MSH|^~\\&|RIS|HOSP|TRABOULE|HOSP|{today}080000||ORM^O01|BENCH{n:06d}|P|2.5\r"
        f"PID|1||IPP{n:07d}^^^HOSP^PI||BENCH{n % 97}^Jean||19700101|F\r"
        f"PV1|1|O|RADIO^^^HOSP\rORC|NW|PB{n:06d}^RIS|||SC||^^^{today}0900\r"
        f"OBR|1|PB{n:06d}^RIS||CT^TDM THORAX^L|||{today}0900||||||||||||AB{n:06d}|RPB{n:06d}|SPSB{n:06d}||||CT\r"
    )


def pages(rnd: random.Random, sample_id: Callable[[], int]) -> dict[str, Callable[[], tuple[str, dict[str, str]]]]:
    n, patients = ARGS.messages, ARGS.patients

    def day() -> dict[str, str]:
        at = gen.START + timedelta(days=rnd.randrange(365))
        return {"since": at.strftime("%Y-%m-%dT00:00"), "until": (at + timedelta(days=1)).strftime("%Y-%m-%dT00:00")}

    return {
        "dashboard": lambda: ("/console/", {}),
        "messages, no filter": lambda: ("/console/messages", {}),
        "messages by accession": lambda: ("/console/messages", {"accession": f"A{rnd.randrange(n // 3):08d}"}),
        "messages by patient (IPP)": lambda: (
            "/console/messages",
            {"patient": gen.patient(rnd.randrange(patients))[0]},
        ),
        "messages, a day": lambda: ("/console/messages", day()),
        "messages, text within a day": lambda: ("/console/messages", {**day(), "text": f"{rnd.choice(gen.FAMILIES)}1"}),
        "one message (ORM^O01)": lambda: (f"/console/messages/{sample_id()}", {}),
        "worklist": lambda: ("/console/worklist", {}),
        "alerts": lambda: ("/console/alerts", {}),
    }


async def measure(client: httpx.AsyncClient, name: str, make: Callable[[], tuple[str, dict[str, str]]]) -> list[float]:
    times = []
    for _ in range(ARGS.requests):
        path, params = make()
        started = time.perf_counter()
        page = await client.get(path, params=params)
        times.append((time.perf_counter() - started) * 1000)
        assert page.status_code == 200, (name, page.status_code, page.text[:300])
    return sorted(times)


async def run_console(folder: Path, database_url: str, orm_ids: list[int]) -> list[tuple[str, list[float]]]:
    cfg = engine_config(folder, database_url=database_url)
    cfg.api_tokens = [TOKEN]
    runtime = Runtime(cfg)
    await runtime.start()
    configure(level="warning")  # one line per message received would bury the table
    results = []
    try:
        acks = await send(runtime, *(orm(i).encode() for i in range(ARGS.orders)))
        assert all(a.segment("MSA").field(1) == "AA" for a in acks)  # type: ignore[union-attr]
        await asyncio.sleep(2)  # the worklist worker applies them
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=60) as client:
            form = await client.get("/console/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf, form.text[:300]
            opened = await client.post("/console/login", data={"csrf": csrf.group(1), "token": TOKEN})
            assert opened.status_code == 303, opened.text[:300]
            worklist = await client.get("/console/worklist")
            items = worklist.text.count("SCHEDULED")
            print(f"  the worklist page lists {items} items (at most 200) of the {ARGS.orders} orders sent")
            rnd = random.Random(7)
            table = pages(rnd, lambda: rnd.choice(orm_ids))
            for name, make in table.items():
                path, params = make()
                await client.get(path, params=params)  # a first request: the console's threads open
                results.append((name, await measure(client, name, make)))
    finally:
        await runtime.stop()
    return results


def orm_sample_sqlite(folder: Path) -> list[int]:
    db = sqlite3.connect(f"file:{folder / 'journal.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT id FROM messages WHERE message_type = 'ORM^O01' AND id % 997 = 0 LIMIT 200").fetchall()
    db.close()
    return [r[0] for r in rows]


def orm_sample_postgres(url: str) -> list[int]:
    from traboule.stores.postgres import connect

    with connect(url) as db:
        rows = db.execute(
            "SELECT id FROM journal_messages WHERE message_type = 'ORM^O01' AND id % 997 = 0 LIMIT 200"
        ).fetchall()
    return [r[0] for r in rows]


def report(backend: str, results: list[tuple[str, list[float]]]) -> None:
    print(f"\n{backend}: {ARGS.requests} requests per page (ms)")
    print(f"  {'page':32} {'p50':>8} {'p99':>8}   p99 / {TARGET_MS:.0f} ms")
    for name, times in results:
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        flag = "" if p99 <= TARGET_MS else "   OVER"
        print(f"  {name:32} {statistics.median(times):8.1f} {p99:8.1f}   {p99 / TARGET_MS:6.2f}{flag}")


def main() -> None:
    print(f"{os.cpu_count()} cores, SQLite {sqlite3.sqlite_version}, Python {sys.version.split()[0]}")
    folder = Path(ARGS.keep) if ARGS.keep else Path(tempfile.mkdtemp(prefix="console-pages-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if ARGS.postgres:
            from tests.peer_postgres import run_postgres

            with run_postgres() as server:
                url = server.url(server.create_database())
                build_postgres(url)
                report("postgresql", asyncio.run(run_console(folder, url, orm_sample_postgres(url))))
        else:
            build_sqlite(folder)
            report("sqlite", asyncio.run(run_console(folder, "", orm_sample_sqlite(folder))))
    finally:
        if not ARGS.keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)


if __name__ == "__main__":
    main()
