"""MLLP ingest on the embedded SQLite stores and on PostgreSQL: orders/s, ACK latency, database work per order.

The load of bench/mllp_ingest.py (its configuration, messages and client, imported from it): ORM^O01 NW orders sent
as fast as the ACKs come back over 1 then 8 connections, after a 200-message warm-up, to ``traboule run`` with the
orders channel in the main process and the worklist in its own. Twice in one run, each time with a fresh data dir:
(a) the default SQLite files, (b) the same configuration plus ``[database] url`` on a PostgreSQL cluster the script
starts from the Debian binaries (tests/peer_postgres.py: fsync on, synchronous_commit on, loopback). Before each
measured phase the worklist has caught up with the previous one; the end-to-end rate runs from the first order sent
to the last one on the worklist.

On PostgreSQL, the database work per order comes from ``pg_stat_database`` (the engine's database) and
``pg_stat_wal`` (the cluster) read before and after each phase. A backend publishes its counters when it goes idle,
at most every 10 s: each reading is taken after an idle pause of ``SETTLE`` seconds; the counters of the idle
engine (the outbox lease's checks, measured over one more pause) and the script's own worklist polls are
subtracted from the transactions; the WAL counters are the whole cluster's, autovacuum included. The readings come
from sessions on the ``postgres`` database, which do not count in the engine's.

CPU per order, for both stores: the engine's main process (the MLLP loop), its worker processes (the worklist),
the PostgreSQL server (all its processes) and this client, read from /proc around each phase. The machine's cores
bound the rate: with 2 cores, 2 ms of CPU per order in all is at most 1,000 orders/s.

    .venv/bin/python bench/postgres_ingest.py [--messages 3000] [--patients 1] [--statements] [--wait-idle 0]

``--patients N``: the orders name N patients in turn (order i: patient i mod N, its own IPP, INS and Study Instance
UID; every order its own accession, placer and filler numbers), on both stores alike. 1 (the default) is the load
of bench/mllp_ingest.py: one patient, one study. ``--statements``: the server runs with ``pg_stat_statements`` and
the script prints, per phase, the statements the engine sent per order (calls, rows, server time), the costliest
first. ``--stores postgresql`` skips the SQLite run. ``--wait-idle S`` waits up to S seconds for no pytest process
on the machine before measuring (and says whether one ran during the measurements).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mllp_ingest as mi  # (also puts the repository first on sys.path and quiets the logs)
import psycopg

from tests.peer_postgres import run_postgres

SETTLE = 11.0  # seconds: idle backends publish their statistics within 10 s (PGSTAT_IDLE_INTERVAL)
DB_COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")
WAL_COUNTERS = ("wal_records", "wal_fpi", "wal_bytes", "wal_write", "wal_sync")


def patient_messages(patients: int) -> Callable[[int, int, str], bytes]:
    """bench/mllp_ingest.py's ``message`` naming ``patients`` patients in turn (each order of a connection the next
    patient): IPP ``IPP<n>``, a valid NIR of its own (13 digits and their key), Study Instance UID ``...1.<n>``."""
    template = mi.message

    def message(conn: int, i: int, phase: str = "") -> bytes:
        data = template(conn, i, phase)
        if patients <= 1:
            return data
        n = (conn * 7919 + i) % patients  # connections start on different patients
        nir = 2790351215189 + n * 10  # same sex, birth year and month: another commune / order number
        return (
            data.replace(b"IPP0001^", f"IPP{n:06d}^".encode())
            .replace(b"279035121518989^", f"{nir}{97 - nir % 97:02d}^".encode())
            .replace(b"1.2.250.1.999.1.2.20261125.1^", f"1.2.250.1.999.1.2.20261125.1.{n}^".encode())
        )

    return message


def cpu_seconds(root: int) -> tuple[float, float]:
    """CPU time (user + system) of process ``root`` and of its descendants alive now, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    spent: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        spent[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    below = 0.0
    for pid in spent:
        up = parent.get(pid, 0)
        while up and up != root:
            up = parent.get(up, 0)
        if up == root and pid != root:
            below += spent[pid]
    return spent.get(root, 0.0), below


def pytest_running() -> bool:
    found = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, check=False)
    return bool(found.stdout.strip())


class Statements:
    """What ``pg_stat_statements`` counted for the engine's database: a snapshot per reading, diffed per phase."""

    def __init__(self, url: str) -> None:
        self.url = url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")

    def read(self) -> dict[str, tuple[float, float, float]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT query, sum(calls), sum(rows), sum(total_exec_time) FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) GROUP BY query"
            ).fetchall()
        return {q: (float(c), float(r), float(t)) for q, c, r, t in rows}

    @staticmethod
    def report(after: dict[str, tuple[float, float, float]], before: dict[str, tuple[float, float, float]], n: int):
        delta = {
            q: tuple(a - b for a, b in zip(v, before.get(q, (0.0, 0.0, 0.0)), strict=True)) for q, v in after.items()
        }
        own = ("pg_stat", "count(*) FROM worklist_items")  # the script's own statements
        delta = {q: v for q, v in delta.items() if v[0] > 0 and not any(o in q for o in own)}
        calls = sum(v[0] for v in delta.values())
        spent = sum(v[2] for v in delta.values())
        print(f"      statements per order {calls / n:.2f}, server execution {spent / n:.3f} ms per order")
        for q, (c, r, t) in sorted(delta.items(), key=lambda kv: -kv[1][2])[:12]:
            text = " ".join(q.split())[:90]
            print(f"      {c / n:7.2f} calls {r / n:7.2f} rows {t / n:7.3f} ms  {text}")


class PgCounters:
    """Cumulative counters of one database and of the cluster's WAL, read from the ``postgres`` database."""

    def __init__(self, admin_url: str, url: str, dbname: str) -> None:
        self.admin_url = admin_url
        self.url = url
        self.dbname = dbname
        self.polls = 0  # the script's own transactions in the measured database (worklist polls)

    def read(self) -> dict[str, float]:
        # A fresh session each time: its own statistics (in the postgres database) never mix with the engine's.
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(
                f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = %s", (self.dbname,)
            )
            values = dict(zip(DB_COUNTERS, cur.fetchone() or (), strict=True))
            cur = conn.execute("SELECT * FROM pg_stat_wal")
            wal = dict(zip([c.name for c in cur.description or ()], cur.fetchone() or (), strict=True))
        values.update({k: wal[k] for k in WAL_COUNTERS if k in wal})  # wal_write / wal_sync left pg_stat_wal in 18
        with psycopg.connect(self.url, autocommit=True) as conn:  # per table: one transaction of ours there
            self.polls += 1
            for table, ins, upd, dele in conn.execute(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"
            ):
                values.update({f"{table}.ins": ins, f"{table}.upd": upd, f"{table}.del": dele})
        values["own_polls"] = self.polls
        return {k: float(v) for k, v in values.items()}


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


async def until_pg_worklist(url: str, counters: PgCounters, count: int, timeout: float = 120) -> None:
    """Wait until the worklist process has applied ``count`` orders (its table in PostgreSQL)."""
    deadline = time.monotonic() + timeout
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            cur = await conn.execute("SELECT count(*) FROM worklist_items")
            counters.polls += 1
            row = await cur.fetchone()
            if row and row[0] >= count:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"worklist did not reach {count} items")


async def run_engine(
    name: str,
    messages: int,
    database: str,
    caught_up: Callable[[Path, int], Awaitable[None]],
    between: Callable[[], Awaitable[None]] | None = None,
    server_pid: int = 0,
) -> tuple[list[tuple[str, int, float, float, float]], dict[int, float], list[float], dict[int, list[float]]]:
    """Warm-up, then ``messages`` orders over 1 and over 8 connections; ``between`` runs before and after each, and
    once more with the engine idle (``marks``: when each ``between`` returned). ``cpu``: per phase, the CPU seconds
    of the engine's main process, of its worker processes, of the database server (``server_pid`` and its
    processes) and of this client, from the first order sent to the last one on the worklist."""
    rows = []
    cpu: dict[int, list[float]] = {}
    end_to_end: dict[int, float] = {}
    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        port = mi.free_port()
        config = Path(tmp) / "traboule.toml"
        config.write_text(mi.CONFIG.format(data_dir=tmp, mllp_port=port, mwl_port=mi.free_port()) + database)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        env.update(
            TRABOULE_HTTP_PORT=str(mi.http_port_pair()), TRABOULE_LOG_LEVEL="warning", TRABOULE_LOG_FORMAT="json"
        )
        command = [str(mi.ROOT / ".venv" / "bin" / "traboule"), "--config", str(config), "run"]
        engine = subprocess.Popen(command, env=env, cwd=mi.ROOT)
        try:
            await mi.wait_port(port, timeout=60)
            await mi.drive(port, 1, 200, "w")  # warm-up
            done = 200
            await caught_up(Path(tmp), done)
            for conns in (1, 8):
                if between:
                    await between()
                marks.append(time.monotonic())
                started = time.perf_counter()
                before = [*cpu_seconds(engine.pid), sum(cpu_seconds(server_pid)) if server_pid else 0.0]
                client = time.process_time()
                elapsed, lat = await mi.drive(port, conns, messages, f"c{conns}-")
                done += messages // conns * conns  # what was sent: an equal share per connection
                await caught_up(Path(tmp), done)
                end_to_end[conns] = messages / (time.perf_counter() - started)
                after = [*cpu_seconds(engine.pid), sum(cpu_seconds(server_pid)) if server_pid else 0.0]
                cpu[conns] = [a - b for a, b in zip(after, before, strict=True)] + [time.process_time() - client]
                rows.append(mi.row(name, conns, messages, elapsed, lat))
            if between:  # after the last phase, then once more: that pause measures the idle engine
                for _ in range(2):
                    await between()
                    marks.append(time.monotonic())
        finally:
            engine.terminate()
            engine.wait(30)
    return rows, end_to_end, marks, cpu


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--wait-idle", type=float, default=0.0, help="seconds to wait for no pytest on the machine")
    parser.add_argument("--patients", type=int, default=1, help="patients the orders name in turn (1: one patient)")
    parser.add_argument("--statements", action="store_true", help="count the statements (pg_stat_statements)")
    parser.add_argument("--stores", default="sqlite,postgresql", help="which stores to measure")
    args = parser.parse_args()
    stores = args.stores.split(",")
    mi.message = patient_messages(args.patients)  # (mi.drive looks it up in its module at each order)

    deadline = time.monotonic() + args.wait_idle
    while pytest_running() and time.monotonic() < deadline:
        await asyncio.sleep(5)
    busy = [pytest_running()]

    settings = {"shared_preload_libraries": "pg_stat_statements"} if args.statements else None
    with run_postgres(settings=settings) as server:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()
        dbname = server.create_database()
        url = server.url(dbname)

        async def sqlite_caught_up(tmp: Path, count: int) -> None:
            busy.append(pytest_running())
            await mi.until_worklist(tmp / "worklist.sqlite", count)

        sqlite_rows: list[tuple[str, int, float, float, float]] = []
        sqlite_e2e: dict[int, float] = {}
        sqlite_cpu: dict[int, list[float]] = {}
        if "sqlite" in stores:
            sqlite_rows, sqlite_e2e, _, sqlite_cpu = await run_engine("sqlite", args.messages, "", sqlite_caught_up)
        statements = Statements(url) if args.statements else None
        seen: list[dict[str, tuple[float, float, float]]] = []

        counters = PgCounters(server.admin_url, url, dbname)
        readings: list[dict[str, float]] = []

        async def pg_caught_up(tmp: Path, count: int) -> None:
            busy.append(pytest_running())
            await until_pg_worklist(url, counters, count)

        async def settle_and_read() -> None:
            await asyncio.sleep(SETTLE)
            readings.append(counters.read())
            if statements is not None:
                seen.append(statements.read())

        database = f'\n[database]\nurl = "{url}"\n'
        assert server.process is not None
        pg_rows, pg_e2e, marks, pg_cpu = await run_engine(
            "postgresql", args.messages, database, pg_caught_up, settle_and_read, server.process.pid
        )
        # The running engine left idle for one pause: what it does on its own (the outbox lease's checks), per second.
        # Only its transactions: the WAL of that pause is mostly autovacuum catching up with the phases' writes.
        seconds, quiet = marks[3] - marks[2], diff(readings[3], readings[2])
        idle = {"xact_commit": (quiet["xact_commit"] - quiet["own_polls"]) / seconds}

    rows = sqlite_rows + pg_rows
    load = "one patient, one study" if args.patients <= 1 else f"{args.patients} patients in turn"
    print(f"PostgreSQL {pg_version[0] if pg_version else '?'}, {args.messages} orders per row, {load}")
    print(f"{'stores':12} {'conns':>5} {'orders/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'e2e/s':>7}")
    e2e = {"sqlite": sqlite_e2e, "postgresql": pg_e2e}
    for name, conns, rate, p50, p99 in rows:
        print(f"{name:12} {conns:>5} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f} {e2e[name][conns]:>7.0f}")
    rate = {(r[0], r[1]): r[2] for r in rows}
    for conns in (1, 8):
        if ("sqlite", conns) in rate:
            ratio = rate["postgresql", conns] / rate["sqlite", conns]
            print(f"ratio PostgreSQL / SQLite at {conns} connection(s): {ratio:.2f}")

    print("\nCPU ms per order, first order sent to last one on the worklist (2 cores: 2 ms per order = 1,000/s)")
    print(f"{'stores':12} {'conns':>5} {'engine':>8} {'workers':>8} {'server':>8} {'client':>8} {'total':>8}")
    for name, spent in (("sqlite", sqlite_cpu), ("postgresql", pg_cpu)):
        for conns in sorted(spent):
            cells = [v * 1000 / args.messages for v in spent[conns]]
            print(f"{name:12} {conns:>5} " + " ".join(f"{v:>8.2f}" for v in [*cells, sum(cells)]))

    print(f"\nPostgreSQL work per order (idle engine subtracted: {fmt_rate(idle)})")
    print(f"{'conns':>5} " + " ".join(f"{k:>13}" for k in DB_COUNTERS + WAL_COUNTERS if k in readings[0]))
    for i, conns in enumerate((1, 8)):
        delta = diff(readings[i + 1], readings[i])
        seconds = marks[i + 1] - marks[i]
        work = {k: v - idle.get(k, 0.0) * seconds for k, v in delta.items()}
        work["xact_commit"] -= delta["own_polls"]
        cells = " ".join(f"{work[k] / args.messages:>13.2f}" for k in DB_COUNTERS + WAL_COUNTERS if k in work)
        print(f"{conns:>5} {cells}")
        tables = sorted({k.rsplit(".", 1)[0] for k in work if "." in k})
        per_table = [
            f"{t} " + "/".join(f"{work.get(f'{t}.{op}', 0.0) / args.messages:.2f}" for op in ("ins", "upd", "del"))
            for t in tables
            if any(work.get(f"{t}.{op}", 0.0) / args.messages >= 0.01 for op in ("ins", "upd", "del"))
        ]
        print(f"      rows inserted/updated/deleted per order by table: {', '.join(per_table)}")
        if len(seen) > i + 1:
            Statements.report(seen[i + 1], seen[i], args.messages)
    print(f"\npytest seen on the machine during the measurements: {'yes' if any(busy) else 'no'}")


def fmt_rate(rate: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}/s" for k, v in rate.items())


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
