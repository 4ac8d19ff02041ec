"""MLLP ingest on one and on two engine nodes sharing one PostgreSQL and one RabbitMQ: the database work per order
and what the nodes cost each other.

The load of bench/mllp_ingest.py (its configuration, messages and client, imported from it): ORM^O01 NW orders sent
as fast as the ACKs come back, 8 connections in all, after a 200-message warm-up per node. Two setups in one run,
each on a fresh database and a fresh exchange of one PostgreSQL cluster and one RabbitMQ broker that the script
starts (tests/peer_postgres.py: fsync on, synchronous_commit on, loopback; tests/peer_rabbitmq.py): (a) one
``traboule run`` node, 8 connections to it; (b) two nodes, 4 connections to each. Every node runs the orders
channel in its main process and the worklist in its own, with ``[database] url`` and ``[bus] amqp_url``. The
end-to-end rate runs from the first order sent to the last one on the worklist (the shared ``worklist_items``).

Per order, in each setup: the CPU of the nodes' main and worker processes, of the PostgreSQL server (all its
processes, less the backend of this script's sampler), of the broker and of this client (from /proc); commits
(``pg_stat_database``), statements (``pg_stat_statements``, top level, utility statements included), WAL bytes and
syncs (``pg_stat_wal``, the whole cluster). Counters are read after an idle pause of ``SETTLE`` seconds (backends
publish their statistics when idle); the idle nodes' own work (the outbox lease's checks, the relay's polls),
measured over one more pause before the phase, and the script's own polls are subtracted from commits and
statements.

The cross-node costs: ``pg_stat_activity`` sampled every ``SAMPLE`` seconds during the phase (the mean number of the
engine's sessions in each wait event, with the statement that waits), and the journal's global advisory lock:
``journal_append`` (one call per group commit) is timed by ``pg_stat_statements`` with ``track = all``, so the
lock wait inside it (its ``PERFORM pg_advisory_xact_lock``) is timed on its own. The lock is a transaction lock,
held from the end of that wait through the commit's WAL flush: the flush's wait comes from the samples (Little's
law: mean sessions waiting x time sampled / group commits), one fdatasync's time from ``pg_stat_wal``
(``track_wal_io_timing``) beside it. The client's CPU includes the sampler's thread.

    .venv/bin/python bench/cluster_ingest.py [--messages 1600] [--rounds 1] [--wait-idle 0]

``--rounds R`` runs the two setups R times, alternating; ``--wait-idle S`` waits up to S seconds for no pytest
process on the machine before measuring (and says whether one ran during the measurements).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mllp_ingest as mi  # (also puts the repository first on sys.path and quiets the logs)
import psycopg
from postgres_ingest import cpu_seconds, pytest_running

from tests.peer_postgres import PostgresServer, run_postgres
from tests.peer_rabbitmq import run_rabbitmq

SETTLE = 11.0  # seconds: idle backends publish their statistics within 10 s (PGSTAT_IDLE_INTERVAL)
SAMPLE = 0.02  # seconds between two pg_stat_activity samples
WARM_UP = 200  # orders per node, one connection, before anything is measured
FLUSH_WAITS = ("IO:WALSync", "IO:WALWrite", "LWLock:WALWrite")  # a commit waiting for its WAL on disk
SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",  # the statements inside journal_append (its lock wait) timed on their own
    "track_wal_io_timing": "on",
}
OWN = "cluster_ingest_poll"  # the column alias that marks this script's statements in the engine's database
LABEL = re.compile(
    r"\b(journal_append|patients_\w+|worklist_\w+|fhir_\w+|pg_advisory_\w+|INSERT INTO \w+|UPDATE \w+"
    r"|DELETE FROM \w+|SELECT [\w, .*()]{0,40} FROM \w+|BEGIN|COMMIT|ROLLBACK|SET \w+)"
)


def label(query: str) -> str:
    """A short name for a statement: the function it calls, or its verb and table."""
    found = LABEL.search(query or "")
    return found[1] if found else " ".join((query or "?").split())[:40]


@dataclass
class Reading:
    at: float
    commits: float
    wal: dict[str, float]


@dataclass
class Statements:
    """``pg_stat_statements`` of the engine's database since the last reset: (text, top level, calls, ms, rows)."""

    rows: list[tuple[str, bool, float, float, float]] = field(default_factory=list)

    def calls(self, *, toplevel: bool = True) -> float:
        return sum(r[2] for r in self.rows if r[1] == toplevel)

    def find(self, pattern: str, *, toplevel: bool) -> tuple[float, float, float]:
        """Calls, total ms and rows of the statements whose text holds ``pattern``."""
        hits = [r for r in self.rows if r[1] == toplevel and pattern in r[0]]
        return sum(r[2] for r in hits), sum(r[3] for r in hits), sum(r[4] for r in hits)

    def top(self, count: int) -> list[tuple[str, float, float]]:
        """The ``count`` top-level statements that took the most server time, by label: (label, calls, ms)."""
        merged: dict[str, list[float]] = {}
        for query, top, calls, ms, _ in self.rows:
            if top:
                cell = merged.setdefault(label(query), [0.0, 0.0])
                cell[0], cell[1] = cell[0] + calls, cell[1] + ms
        return sorted(((k, v[0], v[1]) for k, v in merged.items()), key=lambda r: -r[2])[:count]


class Database:
    """The counters of the engine's database and of the cluster, read from the ``postgres`` database."""

    def __init__(self, server: PostgresServer, dbname: str) -> None:
        self.admin_url, self.url, self.dbname = server.admin_url, server.url(dbname), dbname
        self.own = 0  # transactions of this script in the engine's database

    def read(self) -> Reading:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.dbname,)).fetchone()
            cur = conn.execute("SELECT * FROM pg_stat_wal")
            wal = dict(zip([c.name for c in cur.description or ()], cur.fetchone() or (), strict=True))
        wal = {k: float(v) for k, v in wal.items() if isinstance(v, int | float) or k == "wal_bytes"}
        return Reading(time.monotonic(), float(row[0] if row else 0) - self.own, wal)

    def statements(self, reset: bool = True) -> Statements:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(
                "SELECT s.query, s.toplevel, s.calls, s.total_exec_time, s.rows FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
                (self.dbname,),
            )
            found = Statements()
            for query, top, calls, ms, rows in cur:
                if OWN not in query:
                    found.rows.append((query, bool(top), float(calls), float(ms), float(rows)))
            if reset:
                conn.execute("SELECT pg_stat_statements_reset()")
        return found

    async def until_worklist(self, count: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                cur = await conn.execute(f"SELECT count(*) AS {OWN} FROM worklist_items")
                self.own += 1
                row = await cur.fetchone()
                if row and row[0] >= count:
                    return
                await asyncio.sleep(0.1)
            cur = await conn.execute(f"SELECT count(*) AS {OWN} FROM journal_outbox")
            pending = await cur.fetchone()
        found, unpublished = row[0] if row else "?", pending[0] if pending else "?"
        raise TimeoutError(f"worklist at {found} items, not {count}; {unpublished} events unpublished")


class Sampler:
    """``pg_stat_activity`` of the engine's database every ``SAMPLE`` s on a thread: wait event and statement of
    each active session. ``pid``: its own backend (whose CPU is not the engine's work)."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.conn = psycopg.connect(admin_url, autocommit=True)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        self.pid = int(row[0]) if row else 0
        self.dbname = dbname
        self.samples = 0
        self.seconds = 0.0  # from start to stop
        self.waits: Counter[tuple[str, str]] = Counter()  # (wait event, statement) -> sessions seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.seconds = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.seconds = time.monotonic() - self.seconds
        self.conn.close()

    def session_seconds(self, waits: tuple[str, ...], statement: str) -> float:
        """Seconds spent by the engine's sessions in one of ``waits`` while running ``statement`` (the mean number
        of such sessions over the samples times the time sampled)."""
        seen = sum(n for (wait, query), n in self.waits.items() if wait in waits and statement in query)
        return seen / max(self.samples, 1) * self.seconds

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.conn.execute(
                "SELECT wait_event_type, wait_event, query FROM pg_stat_activity"
                " WHERE datname = %s AND state = 'active' AND backend_type = 'client backend'",
                (self.dbname,),
            ).fetchall()
            self.samples += 1
            for kind, event, query in rows:
                if OWN in (query or ""):
                    continue
                self.waits[(f"{kind}:{event}" if kind else "CPU (no wait)", label(query))] += 1
            self._stop.wait(SAMPLE)


def own_cpu(pid: int) -> float:
    """CPU seconds of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    nodes: int
    messages: int
    rate: float
    p50: float
    p99: float
    end_to_end: float
    cpu: dict[str, float]  # ms per order: engine, workers, server, broker, client
    commits: float  # per order
    statements: float  # per order, top level
    wal: dict[str, float]  # per order
    group_commits: float  # journal_append calls per order
    lock_wait_ms: float  # per group commit
    append_ms: float  # per group commit: journal_append's execution, lock wait included
    sync_ms: float  # per WAL sync
    commit_ms: float  # per group commit: waiting for its WAL flush, from the samples (Little's law)
    lock_wait_sampled_ms: float  # per group commit: waiting for the lock, from the samples
    by_statement: list[tuple[str, float, float]]  # label, calls per order, ms per order (top level)
    waits: list[tuple[str, str, float]]  # wait event, statement, mean sessions
    busy: bool

    @property
    def batch(self) -> float:
        """Orders per journal group commit."""
        return 1 / self.group_commits if self.group_commits else 0.0

    @property
    def held_ms(self) -> float:
        """The journal's global lock held per group commit: from the end of its wait to its commit's WAL flush."""
        return self.append_ms - self.lock_wait_ms + (self.commit_ms or self.sync_ms)

    @property
    def ceiling(self) -> float:
        """Orders/s the lock lets through at this group-commit size (the cluster's serial part)."""
        return self.batch * 1000 / self.held_ms if self.held_ms else 0.0


def node_config(tmp: Path, name: str, db_url: str, amqp_url: str, exchange: str) -> tuple[Path, int]:
    data = tmp / name
    data.mkdir()
    port = mi.free_port()
    config = tmp / f"{name}.toml"
    config.write_text(
        mi.CONFIG.format(data_dir=data, mllp_port=port, mwl_port=mi.free_port())
        + f'\n[database]\nurl = "{db_url}"\n\n[bus]\namqp_url = "{amqp_url}"\nexchange = "{exchange}"\n'
    )
    return config, port


async def run_setup(name: str, nodes: int, messages: int, server: PostgresServer, amqp_url: str, broker: int) -> Result:
    """``nodes`` engines on a fresh database and exchange, warmed up, then ``messages`` orders over 8 connections
    (8 / ``nodes`` to each) and the counters around them."""
    db = Database(server, server.create_database())
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    busy = [pytest_running()]
    with tempfile.TemporaryDirectory() as tmp:
        configs = [node_config(Path(tmp), f"node{i}", db.url, amqp_url, exchange) for i in range(nodes)]
        procs = []
        try:
            for config, port in configs:
                env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
                env.update(
                    TRABOULE_HTTP_PORT=str(mi.http_port_pair()),
                    TRABOULE_LOG_LEVEL="warning",
                    TRABOULE_LOG_FORMAT="json",
                )
                command = [str(mi.ROOT / ".venv" / "bin" / "traboule"), "--config", str(config), "run"]
                procs.append(subprocess.Popen(command, env=env, cwd=mi.ROOT))
                await mi.wait_port(port, timeout=90)  # one after the other: the first migrates the schema
            ports = [port for _, port in configs]
            for i, port in enumerate(ports):
                await mi.drive(port, 1, WARM_UP, f"w{i}-")
            await db.until_worklist(WARM_UP * nodes)

            await asyncio.sleep(SETTLE)
            idle_start = db.read()
            db.statements()  # reset
            await asyncio.sleep(SETTLE)
            before = db.read()
            idle_statements = db.statements()
            idle_seconds = before.at - idle_start.at
            idle_commits = (before.commits - idle_start.commits) / idle_seconds
            idle_calls = idle_statements.calls() / idle_seconds

            sampler = Sampler(server.admin_url, db.dbname)
            assert server.process is not None
            pids = [p.pid for p in procs]

            def cpu_now() -> list[float]:
                nodes_cpu = [cpu_seconds(pid) for pid in pids]
                return [
                    sum(c[0] for c in nodes_cpu),
                    sum(c[1] for c in nodes_cpu),
                    sum(cpu_seconds(server.process.pid)) - own_cpu(sampler.pid),  # type: ignore[union-attr]
                    sum(cpu_seconds(broker)),
                    time.process_time(),
                ]

            sampler.start()
            cpu_before = cpu_now()
            started = time.perf_counter()
            per_node = messages // 8 * (8 // nodes)  # mllp_ingest.drive sends the same number over each connection
            driven = await asyncio.gather(
                *(mi.drive(port, 8 // nodes, per_node, f"{name[0]}{i}-") for i, port in enumerate(ports))
            )
            elapsed = time.perf_counter() - started
            await db.until_worklist(WARM_UP * nodes + per_node * nodes)
            end_to_end = per_node * nodes / (time.perf_counter() - started)
            cpu_after = cpu_now()
            sampler.stop()
            busy.append(pytest_running())

            await asyncio.sleep(SETTLE)
            after = db.read()
            phase = db.statements(reset=False)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    server.drop_database(db.dbname)

    sent = per_node * nodes
    seconds = after.at - before.at
    latencies = [lat for _, lats in driven for lat in lats]
    _, _, rate, p50, p99 = mi.row(name, 8, sent, elapsed, latencies)
    cpu = dict(
        zip(
            ("engine", "workers", "server", "broker", "client"),
            [(a - b) * 1000 / sent for a, b in zip(cpu_after, cpu_before, strict=True)],
            strict=True,
        )
    )
    wal = {k: (after.wal[k] - before.wal.get(k, 0.0)) / sent for k in after.wal if k != "stats_reset"}
    appends, append_ms, _ = phase.find("journal_append", toplevel=True)
    _, lock_ms, _ = phase.find("pg_advisory_xact_lock(lock_key)", toplevel=False)
    syncs = after.wal.get("wal_sync", 0.0) - before.wal.get("wal_sync", 0.0)
    sync_ms = (after.wal.get("wal_sync_time", 0.0) - before.wal.get("wal_sync_time", 0.0)) / syncs if syncs else 0.0
    samples = max(sampler.samples, 1)
    return Result(
        name=name,
        nodes=nodes,
        messages=sent,
        rate=rate,
        p50=p50,
        p99=p99,
        end_to_end=end_to_end,
        cpu=cpu,
        commits=(after.commits - before.commits - idle_commits * seconds) / sent,
        statements=(phase.calls() - idle_calls * seconds) / sent,
        wal=wal,
        group_commits=appends / sent,
        lock_wait_ms=lock_ms / appends if appends else 0.0,
        append_ms=append_ms / appends if appends else 0.0,
        sync_ms=sync_ms,
        commit_ms=sampler.session_seconds(FLUSH_WAITS, "journal_append") * 1000 / appends if appends else 0.0,
        lock_wait_sampled_ms=sampler.session_seconds(("Lock:advisory",), "journal_append") * 1000 / appends
        if appends
        else 0.0,
        by_statement=[(text, calls / sent, ms / sent) for text, calls, ms in phase.top(8)],
        waits=[(w, q, n / samples) for (w, q), n in sampler.waits.most_common(10)],
        busy=any(busy),
    )


def report(results: list[Result], pg_version: str) -> None:
    print(f"PostgreSQL {pg_version}, {results[0].messages} orders per setup, 8 connections in all")
    print(f"{'setup':22} {'orders/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'e2e/s':>7}")
    for r in results:
        print(f"{r.name:22} {r.rate:>9.0f} {r.p50:>8.2f} {r.p99:>8.2f} {r.end_to_end:>7.0f}")

    print("\nCPU ms per order, first order sent to last one on the worklist (2 cores: 2 ms per order = 1,000/s)")
    names = list(results[0].cpu)
    print(f"{'setup':22} " + " ".join(f"{k:>8}" for k in [*names, "total"]))
    for r in results:
        print(f"{r.name:22} " + " ".join(f"{v:>8.2f}" for v in [*r.cpu.values(), sum(r.cpu.values())]))

    print("\nPostgreSQL work per order (idle nodes and this script subtracted from commits and statements)")
    print(f"{'setup':22} {'commits':>8} {'stmts':>7} {'WAL rec':>8} {'WAL B':>8} {'writes':>7} {'syncs':>7}")
    for r in results:
        print(
            f"{r.name:22} {r.commits:>8.2f} {r.statements:>7.1f} {r.wal.get('wal_records', 0):>8.1f}"
            f" {r.wal.get('wal_bytes', 0):>8.0f} {r.wal.get('wal_write', 0):>7.2f} {r.wal.get('wal_sync', 0):>7.2f}"
        )

    print("\nThe journal's group commit (journal_append) and its global advisory lock, ms per group commit")
    print(
        f"{'setup':22} {'orders/gc':>9} {'exec':>7} {'wait':>7} {'wait~':>7} {'commit~':>8} {'sync':>7} {'held':>7}"
        f" {'ceiling/s':>10}"
    )
    for r in results:
        print(
            f"{r.name:22} {r.batch:>9.2f} {r.append_ms:>7.3f} {r.lock_wait_ms:>7.3f} {r.lock_wait_sampled_ms:>7.3f}"
            f" {r.commit_ms:>8.3f} {r.sync_ms:>7.3f} {r.held_ms:>7.3f} {r.ceiling:>10.0f}"
        )
    print(
        "  exec: journal_append's execution (pg_stat_statements), lock wait included; wait: the lock wait inside it;"
        "\n  ~: from the pg_stat_activity samples (Little's law); commit~: waiting for the commit's WAL flush;"
        "\n  sync: one WAL fdatasync (pg_stat_wal); held = exec - wait + commit~;"
        " ceiling = orders per group commit / held"
    )

    for r in results:
        print(f"\n{r.name}: top-level statements by server time (calls per order, ms per order)")
        for name, calls, ms in r.by_statement:
            print(f"  {name:48} {calls:>6.2f} {ms:>7.3f}")
        print(f"{r.name}: engine sessions active in pg_stat_activity (mean sessions, by wait event and statement)")
        for wait, query, mean in r.waits:
            print(f"  {wait:34} {query:40} {mean:>6.2f}")
    print(f"\npytest seen on the machine during the measurements: {'yes' if any(r.busy for r in results) else 'no'}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1600, help="orders per setup (a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=1, help="times each setup runs, alternating")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="seconds to wait for no pytest on the machine")
    args = parser.parse_args()
    deadline = time.monotonic() + args.wait_idle
    while pytest_running() and time.monotonic() < deadline:
        await asyncio.sleep(5)

    with run_postgres(settings=SERVER_SETTINGS) as server, tempfile.TemporaryDirectory() as broker_dir:
        with psycopg.connect(server.admin_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            version = conn.execute("SHOW server_version").fetchone()
        with run_rabbitmq(Path(broker_dir)) as broker:
            assert broker.server is not None
            results = []
            for round_ in range(1, args.rounds + 1):
                for name, nodes in (("one node, 8 conns", 1), ("two nodes, 4 + 4", 2)):
                    name += f" #{round_}" if args.rounds > 1 else ""
                    results.append(await run_setup(name, nodes, args.messages, server, broker.url, broker.server.pid))
    report(results, version[0] if version else "?")


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the nodes, the broker and the cluster are stopped on the way out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
