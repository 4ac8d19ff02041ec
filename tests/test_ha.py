"""Several engine nodes on one PostgreSQL survive failures: real ``traboule run`` processes on loopback, a real
PostgreSQL and RabbitMQ, dcmtk findscu as the modality, /fhir over HTTP.

* ``kill -9`` of a node while eight MLLP connections (four per node) send orders: the clients reconnect to the
  survivor and send again what was not acknowledged; the killed node started again, every acknowledged order is
  journaled once, on the worklist once, and both nodes' MWL SCPs and /fhir show the same orders.
* PostgreSQL stopped (fast shutdown) for 20 s under load: no AA without a durable write (AR or no answer while it
  is down), the node answers AA again within seconds of the database's return, nothing acknowledged is lost.
* ``kill -9`` of the holder of the "outbox" lease: the other node publishes the outbox within 10 s, and no event
  is published by two relays (deliveries counted by message id on a queue of the test).

The helpers (`Node`, `node_config`, `Feeder`) also serve bench/failover.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import peer_postgres
from tests.conftest import ROOT
from tests.peer_dcmtk import DcmtkError, findscu, free_port, require_dcmtk
from tests.peer_postgres import PostgresServer, run_postgres
from tests.test_flow import CT_QUERY
from traboule.adapters.mllp import MLLPClient
from traboule.app.runtime import DISPATCH_BATCH
from traboule.bus.retry import UNAVAILABLE_DELAY, DeadLetter, Retry, RetryPolicy, describe
from traboule.stores.postgres import connect
from traboule.stores.postgres.lease import Lease

pytestmark = pytest.mark.timeout(120)

FIXTURE = ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7"  # accession ACC0001, CT, 2026-11-25
_ORDER = FIXTURE.read_bytes() if FIXTURE.exists() else b""
_ACK = re.compile(rb"(?:^|\r)MSA\|([A-Z]{2})")
CONNECTION_ERRORS = (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError)


def order(n: int) -> bytes:
    """The fixture order with its own control id ``MSG000<n>``, order numbers, accession ``ACC000<n>``, study."""
    message = _ORDER
    for old in (b"MSG0001", b"PLC0001", b"FIL0001", b"ACC0001", b"RP0001", b"SPS0001"):
        message = message.replace(old, old[:-1] + str(n).encode())
    return message.replace(b"20261125.1^", f"20261125.{n}^".encode())


def accession(n: int) -> str:
    return f"ACC000{n}"


def control_id(n: int) -> str:
    return f"MSG000{n}"


def ack_code(ack: bytes) -> str:
    found = _ACK.search(ack)
    return found[1].decode() if found else "?"


# -- nodes -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    mllp: int
    mwl: int
    http: int


def node_config(base: Path, name: str, database_url: str, amqp_url: str = "", exchange: str = "traboule") -> Path:
    """A node's configuration file (``<base>/<name>.toml``): its own data folder and ports, the shared database
    (and broker, when given); orders over MLLP, the worklist (MWL SCP) and FHIR (/fhir), all in the main process."""
    ports = Ports(free_port(), free_port(), free_port())
    bus = f'[bus]\namqp_url = "{amqp_url}"\nexchange = "{exchange}"\n' if amqp_url else ""
    config = base / f"{name}.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{base / name}"
defaults = false

[database]
url = "{database_url}"

{bus}
[http]
port = {ports.http}

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{ adapter = "mllp-listener", host = "127.0.0.1", port = {ports.mllp} }}

[[channels]]
name = "worklist"
kind = "worklist"
destinations = [{{ adapter = "mwl-scp", host = "127.0.0.1", port = {ports.mwl}, ae_title = "TRABOULE" }}]

[[channels]]
name = "fhir"
kind = "fhir"
mapping = "mappings/fhir.yaml"
api = true
"""
    )
    (base / f"{name}.ports").write_text(json.dumps(ports.__dict__))
    return config


class Node:
    """``traboule run --config`` in a child process (its own session: ``kill -9`` reaches its processes only), its
    log lines gathered by a thread. ``start`` may be called again after ``kill``."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.ports = Ports(**json.loads(config.with_suffix(".ports").read_text()))
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    def start(self) -> Node:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        env["TRABOULE_LOG_FORMAT"] = "json"
        self.lines = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "traboule.app.cli", "--config", str(self.config), "run"],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        return self

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: list[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self, timeout: float = 40.0) -> Node:
        """Wait for ``engine.ready`` (about two seconds on an idle machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive:
            if any('"engine.ready"' in line for line in list(self.lines)):
                return self
            time.sleep(0.05)
        raise AssertionError(f"node did not start (exit {self.proc and self.proc.poll()}): {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "".join(self.lines[-lines:])

    def health(self) -> dict[str, Any]:
        """The node's /health body ({} when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.http}/health", timeout=2) as answer:
                return dict(json.loads(answer.read()))
        except urllib.error.HTTPError as refused:  # 503 while starting or degraded: the same body
            return dict(json.loads(refused.read()))
        except (OSError, ValueError):
            return {}

    def outbox(self) -> str:
        """What /health says of the outbox: ``leader``, ``standby`` (or ``None`` when it does not answer)."""
        return str(self.health().get("outbox"))

    def worklist(self, *, lenient: bool = False) -> list[str]:
        """The accession numbers a modality's C-FIND (dcmtk findscu) finds on the node's MWL SCP, sorted (``lenient``:
        [] when the C-FIND fails)."""
        try:
            found = findscu(self.ports.mwl, "TRABOULE", CT_QUERY, timeout=60)
        except DcmtkError:
            if not lenient:
                raise
            return []
        return sorted(str(ds.AccessionNumber) for ds in found)

    def service_requests(self, *, lenient: bool = False) -> list[str]:
        """The accession numbers of the ServiceRequests /fhir finds (every page), sorted (``lenient``: [] when /fhir
        answers an error)."""
        found: list[str] = []
        offset = 0
        while True:
            url = f"http://127.0.0.1:{self.ports.http}/fhir/ServiceRequest?_count=100&_offset={offset}"
            try:
                with urllib.request.urlopen(url, timeout=20) as answer:
                    bundle = json.loads(answer.read())
            except urllib.error.HTTPError:
                if not lenient:
                    raise
                return []
            entries = bundle.get("entry", [])
            for entry in entries:
                values = [
                    i.get("value", "")
                    for i in entry["resource"].get("identifier", [])
                    if any(c.get("code") == "ACSN" for c in i.get("type", {}).get("coding", []))
                ]
                found.extend(values)
            offset += len(entries)
            if not entries or offset >= int(bundle.get("total", 0)):
                return sorted(found)

    def kill(self) -> None:
        """``kill -9`` of the node's process group (its processes only: it has a session of its own)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


@contextlib.contextmanager
def running(*nodes: Node) -> Iterator[None]:
    """Stop (or kill) the nodes at the end, whatever happened."""
    try:
        yield
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                node.stop()
            node.kill()


def wait_for(predicate: Any, timeout: float, what: str = "condition") -> float:
    """Poll ``predicate`` (every 50 ms) until true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - started


async def wait_async(predicate: Any, timeout: float, what: str = "condition") -> float:
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# -- clients -----------------------------------------------------------------------------------------------------


@dataclass
class Attempt:
    n: int
    port: int
    sent: float
    code: str  # AA, AE, AR..., or "" when no answer came (connection refused, closed, timed out)
    answered: float = 0.0  # when the answer (or the failure) came


@dataclass
class Feeder:
    """MLLP senders as a RIS behaves: each connection sends its orders one at a time; what is not answered AA (no
    answer, a connection refused or cut, an AR) is sent again, the connection moved to the next node after a
    transport failure."""

    ports: list[int]
    timeout: float = 5.0
    pause: float = 0.2  # seconds before sending again after an AR or a transport failure
    attempts: list[Attempt] = field(default_factory=list)
    acked: dict[int, float] = field(default_factory=dict)  # order → when its AA came
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def connection(self, orders: list[int], first: int, gap: float = 0.0) -> None:
        """Send ``orders`` in turn from the node ``ports[first]``, until all are AA'd or ``stop`` is set."""
        target, client = first, None
        pending = list(orders)
        try:
            while pending and not self.stop.is_set():
                n, port = pending[0], self.ports[target % len(self.ports)]
                sent = time.monotonic()
                try:
                    if client is None:
                        client = MLLPClient("127.0.0.1", port, timeout=self.timeout)
                        await client.connect()
                    code = ack_code(await client.send(order(n)))
                except CONNECTION_ERRORS:
                    self.attempts.append(Attempt(n, port, sent, "", time.monotonic()))
                    if client is not None:
                        with contextlib.suppress(Exception):
                            await client.close()
                    client, target = None, target + 1
                    await asyncio.sleep(self.pause)
                    continue
                self.attempts.append(Attempt(n, port, sent, code, time.monotonic()))
                if code == "AA":
                    self.acked[n] = time.monotonic()
                    pending.pop(0)
                    if gap:
                        await asyncio.sleep(gap)
                else:
                    await asyncio.sleep(self.pause)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()


def journaled(url: str) -> dict[str, int]:
    """Accepted journal entries per control id."""
    with connect(url) as db:
        rows = db.execute(
            "SELECT control_id, count(*) FROM journal_messages WHERE status = 'accepted' GROUP BY control_id"
        ).fetchall()
    return {str(c): int(k) for c, k in rows}


def worklist_rows(url: str) -> dict[str, int]:
    with connect(url) as db:
        rows = db.execute("SELECT accession_number, count(*) FROM worklist_items GROUP BY accession_number").fetchall()
    return {str(a): int(k) for a, k in rows}


# -- 1. kill -9 of a node under load -----------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_node_killed_under_load_loses_nothing_acknowledged_and_both_nodes_agree(
    tmp_path: Path, pg_url: str, rabbitmq_url: str, rabbitmq_exchange: str
) -> None:
    """Two nodes, eight MLLP connections (four per node). ``kill -9`` of node A once a third of the orders are
    acknowledged: its connections move to B and send again what A had not acknowledged. A started again (and
    taking orders again): every order is journaled once (accepted), is one worklist item, and both nodes' MWL SCPs
    (findscu) and /fhir find each order once."""
    require_dcmtk("findscu")
    a = Node(node_config(tmp_path, "a", pg_url, rabbitmq_url, rabbitmq_exchange))
    b = Node(node_config(tmp_path, "b", pg_url, rabbitmq_url, rabbitmq_exchange))
    with running(a, b):
        a.start()
        b.start()
        await asyncio.to_thread(a.ready)
        await asyncio.to_thread(b.ready)
        per_connection, connections = 20, 8
        total = per_connection * connections
        feeder = Feeder([a.ports.mllp, b.ports.mllp])
        senders = [
            asyncio.create_task(
                feeder.connection(list(range(1 + c * per_connection, 1 + (c + 1) * per_connection)), c % 2, 0.01)
            )
            for c in range(connections)
        ]
        await wait_async(lambda: len(feeder.acked) >= total // 3, 60, "a third of the orders acknowledged")
        a.kill()
        killed = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*senders), 60)
        assert len(feeder.acked) == total
        # The connections to A moved to B: nothing is answered by A after the kill.
        assert not [t for t in feeder.attempts if t.port == a.ports.mllp and t.sent > killed + 0.5 and t.code]
        cut = [t for t in feeder.attempts if not t.code]
        assert cut, "the kill cut no connection: it did not happen mid-stream"
        a.start()
        await asyncio.to_thread(a.ready)
        again = Feeder([a.ports.mllp])  # the restarted node takes orders again
        await asyncio.wait_for(again.connection(list(range(total + 1, total + 5)), 0), 30)
        assert [t.code for t in again.attempts] == ["AA"] * 4
        total += 4

        expected = sorted(accession(n) for n in range(1, total + 1))
        for node in (a, b):
            await wait_async(lambda node=node: node.worklist() == expected, 60, f"worklist of {node.config.stem}")
            await wait_async(lambda node=node: node.service_requests() == expected, 60, f"/fhir of {node.config.stem}")
    counts = journaled(pg_url)
    assert {c: k for c, k in counts.items() if k != 1} == {}
    assert sorted(counts) == sorted(control_id(n) for n in range(1, total + 1))
    assert worklist_rows(pg_url) == {accession(n): 1 for n in range(1, total + 1)}


# -- 2. PostgreSQL stopped under load ----------------------------------------------------------------------------

OUTAGE = 20.0  # seconds the database is down
RECOVERY = 10.0  # seconds from the database's return to the first AA, at most


@contextlib.contextmanager
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test alone (tests/peer_postgres.py), which it stops and starts."""
    with run_postgres() as server:
        yield server


def stop_postgres(server: PostgresServer) -> None:
    """Fast shutdown (``pg_ctl stop -m fast``: SIGINT to the postmaster, its sessions disconnected)."""
    peer_postgres._stop(server)


def start_postgres(server: PostgresServer) -> None:
    """Start the stopped cluster again on its data folder and port, with the settings `run_postgres` gives it."""
    bin_dir = peer_postgres._bin_dir()
    assert bin_dir is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C", "TZ": "UTC"}
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(server.base),
        "fsync": "on",
        "synchronous_commit": "on",
        "max_connections": "200",
        "logging_collector": "off",
    }
    with (server.base / "server.log").open("ab") as log:
        server.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(server.base / "data"), "-p", str(server.port)]
            + [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")],
            cwd=server.base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **peer_postgres._run_as(),  # type: ignore[arg-type]
        )
    peer_postgres._wait_ready(server)


def database_down(health: dict[str, Any]) -> bool:
    problems = health.get("problems", [])
    return health.get("status") == "degraded" and "database" in problems and health.get("outbox") == "standby"


async def test_postgresql_down_for_20_s_under_load_no_ack_without_a_durable_write_and_recovery_in_seconds(
    tmp_path: Path,
) -> None:
    """One node (embedded bus) on a PostgreSQL of its own, four MLLP connections sending orders. The database is
    stopped (fast shutdown) for 20 s: while it is down nothing is answered AA; it back, the node answers AA again
    within `RECOVERY` seconds, without a restart. Afterwards every AA'd order is in the journal (once), on the
    worklist and in /fhir."""
    require_dcmtk("findscu")
    with private_postgres() as server:
        dbname = server.create_database()
        url = server.url(dbname)
        node = Node(node_config(tmp_path, "a", url))
        with running(node):
            node.start()
            await asyncio.to_thread(node.ready)
            feeder = Feeder([node.ports.mllp])
            per_connection = 10_000  # more than can be sent: the connections send until told to stop
            senders = [
                asyncio.create_task(feeder.connection(list(range(1 + c * per_connection, (c + 1) * per_connection)), 0))
                for c in range(4)
            ]
            await wait_async(lambda: len(feeder.acked) >= 40, 30, "orders acknowledged before the outage")
            await asyncio.to_thread(stop_postgres, server)
            stopped = time.monotonic()
            # /health says why (not a 500), and the lease's session is gone with the server.
            await wait_async(lambda: database_down(node.health()), 5, "/health saying the database is down")
            await asyncio.sleep(OUTAGE - (time.monotonic() - stopped))
            # The server answers before start_postgres sees it ready (it polls, from a thread of this busy loop):
            # "down" ends when it is launched.
            restarting = time.monotonic()
            await asyncio.to_thread(start_postgres, server)
            started = time.monotonic()
            await wait_async(lambda: any(t > started for t in feeder.acked.values()), RECOVERY + 5, "an AA")
            recovered = min(t for t in feeder.acked.values() if t > started) - started
            await asyncio.sleep(2.0)
            feeder.stop.set()
            await asyncio.wait_for(asyncio.gather(*senders), 30)
            print(f"PostgreSQL down {started - stopped:.1f} s; first AA {recovered:.2f} s after its return")
            assert recovered < RECOVERY
            # Nothing answered AA while the server was down (a message sent then may wait for its return, and be
            # answered AA once written; one committed just before it stopped may be answered a moment after, and is
            # in the journal as every AA'd one is, below); something was refused or left unanswered meanwhile.
            during = [
                t for t in feeder.attempts if stopped + 1.0 < t.answered < restarting and t.code not in ("", "AR", "AE")
            ]
            assert during == [], f"answered while the database was down: {during[:5]}"
            assert [t for t in feeder.attempts if stopped < t.answered < restarting and t.code in ("AR", "")]
            waited = [t.answered - t.sent for t in feeder.attempts if t.sent < started < t.answered]
            print(f"answers held across the database's return: {len(waited)}, longest {max(waited, default=0):.1f} s")
            acked = sorted(feeder.acked)
            counts = journaled(url)
            assert [n for n in acked if counts.get(control_id(n)) != 1] == []
            expected = sorted(accession(n) for n in acked)
            # AA'd orders sent while the server stopped may be journaled without the sender having seen the AA
            # (it gets no answer and sends them again: the duplicate is answered AA); none is missing.
            # The first reads after the outage may fail, once per connection the store kept from before it (a
            # connection of its pool the server ended): polled until they pass.
            await wait_async(
                lambda: set(expected) <= set(node.worklist(lenient=True)), 60, "AA'd orders on the worklist"
            )
            await wait_async(
                lambda: set(expected) <= set(node.service_requests(lenient=True)), 60, "AA'd orders in /fhir"
            )
            await wait_async(lambda: node.health().get("status") == "ok", RECOVERY, "/health ok again")
        server.drop_database(dbname)


# -- 3. the outbox relay's lease ---------------------------------------------------------------------------------

FAILOVER = 10.0  # seconds from kill -9 of the lease's holder to the other node publishing, at most


class Subscriber:
    """A queue of the test bound to every topic of the engine's exchange: each delivery's arrival time, message id
    and journal id."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[float, str, str]] = []
        self._connection: Any = None

    async def open(self, amqp_url: str, exchange: str) -> Subscriber:
        import aio_pika

        self._connection = await aio_pika.connect(amqp_url)
        channel = await self._connection.channel()
        queue = await channel.declare_queue(f"{exchange}.ha-test-every-event", auto_delete=True)
        await queue.bind(exchange, routing_key="#")

        async def received(message: Any) -> None:
            journal_id = str((message.headers or {}).get("journal-id", ""))
            self.deliveries.append((time.monotonic(), str(message.message_id), journal_id))

        await queue.consume(received, no_ack=True)
        return self

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def twice(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _, message_id, _ in self.deliveries:
            seen[message_id] = seen.get(message_id, 0) + 1
        return {m: k for m, k in seen.items() if k > 1}


def control_ids(url: str) -> dict[str, str]:
    """Control id → journal id of the accepted entries."""
    with connect(url) as db:
        rows = db.execute("SELECT control_id, id FROM journal_messages WHERE status = 'accepted'").fetchall()
    return {str(c): str(i) for c, i in rows}


def accepted_ids(url: str) -> set[str]:
    with connect(url) as db:
        rows = db.execute("SELECT id FROM journal_messages WHERE status = 'accepted'").fetchall()
    return {str(r[0]) for r in rows}


@pytest.mark.rabbitmq
async def test_the_outbox_relay_moves_to_the_other_node_within_10_s_and_nothing_is_published_twice(
    tmp_path: Path, pg_url: str, rabbitmq_url: str, rabbitmq_exchange: str
) -> None:
    """Node A holds the "outbox" lease and publishes the shared outbox; orders stream into node B (standby). ``kill
    -9`` of A: B's /health says ``leader`` and B publishes within `FAILOVER` seconds. A queue of the test bound to
    every topic receives each journaled order's event, each message id once."""
    a = Node(node_config(tmp_path, "a", pg_url, rabbitmq_url, rabbitmq_exchange))
    b = Node(node_config(tmp_path, "b", pg_url, rabbitmq_url, rabbitmq_exchange))
    subscriber = Subscriber()
    with running(a, b):
        a.start()
        await asyncio.to_thread(a.ready)
        await wait_async(lambda: a.outbox() == "leader", 10, "A leads")
        await subscriber.open(rabbitmq_url, rabbitmq_exchange)
        b.start()
        await asyncio.to_thread(b.ready)
        await asyncio.sleep(1.5)  # B's lease is tried at least once
        assert (await asyncio.to_thread(a.outbox), await asyncio.to_thread(b.outbox)) == ("leader", "standby")
        feeder = Feeder([b.ports.mllp])
        senders = [
            asyncio.create_task(feeder.connection(list(range(1 + c * 10_000, (c + 1) * 10_000)), 0, 0.02))
            for c in range(2)
        ]
        try:
            await wait_async(lambda: len(subscriber.deliveries) >= 30, 30, "events published by A")
            a.kill()
            killed = time.monotonic()
            leads = await wait_async(lambda: b.outbox() == "leader", FAILOVER, "B leads")
            await wait_async(lambda: any(t > killed for t, _, _ in subscriber.deliveries), FAILOVER, "B publishes")
            publishes = min(t for t, _, _ in subscriber.deliveries if t > killed) - killed
            await asyncio.sleep(2.0)
        finally:
            feeder.stop.set()
            await asyncio.wait_for(asyncio.gather(*senders), 30)
        print(f"outbox failover: B leads {leads:.2f} s after kill -9 of A, publishes after {publishes:.2f} s")
        # While A led, an order B acknowledged reached the queue promptly (A looks at the shared outbox ten times a
        # second: B's appends cannot wake it).
        ids = await asyncio.to_thread(control_ids, pg_url)
        delivered = {j: t for t, _, j in subscriber.deliveries if t < killed}
        lags = sorted(
            delivered[ids[control_id(n)]] - t for n, t in feeder.acked.items() if ids.get(control_id(n)) in delivered
        )
        print(f"B's AA to the queue while A led: median {lags[len(lags) // 2]:.3f} s, max {lags[-1]:.3f} s")
        assert len(lags) >= 20 and lags[len(lags) // 2] < 0.5
        assert publishes < FAILOVER
        journal_ids = await asyncio.to_thread(accepted_ids, pg_url)
        await wait_async(
            lambda: {j for _, _, j in subscriber.deliveries} >= journal_ids, 20, "every accepted order's event"
        )
        await subscriber.close()
        assert {j for _, _, j in subscriber.deliveries} == journal_ids
        assert len(feeder.acked) <= len(journal_ids)
        # One relay at a time: no event twice while A led (both nodes alive). B publishes again what A had sent
        # without its confirmation committed (the batch in flight when it died, whose broker confirms it waited for,
        # some reaching the queue just after the kill): at-least-once, each of those once more, nothing older.
        before = [m for t, m, _ in subscriber.deliveries if t < killed]
        assert len(set(before)) == len(before)
        twice = subscriber.twice()
        assert set(twice.values()) <= {2}
        first = [min(t for t, m, _ in subscriber.deliveries if m == again) for again in twice]
        print(
            f"published again by B: {len(twice)} events, first sent by A {killed - min(first, default=killed):.2f} s"
            " before the kill"
        )
        assert all(killed - 1.0 < t < killed + 0.1 for t in first) and len(twice) <= DISPATCH_BATCH
        assert b.outbox() == "leader"


async def test_a_holder_whose_session_the_server_ended_stops_before_its_next_batch(pg_url: str) -> None:
    """Fencing: the server ends the holder's session (the node lives on): another node may take the lease at once,
    before the holder's periodic check notices; `Lease.confirm`, which the dispatcher calls before each batch, says
    the lease is lost, so the two never publish side by side beyond the batch in flight."""
    holder, other = Lease(pg_url, "outbox"), Lease(pg_url, "outbox")
    try:
        await holder.acquire()
        assert await holder.confirm() and not await other.confirm()
        assert holder._conn is not None
        with connect(pg_url) as db:
            db.execute("SELECT pg_terminate_backend(%s)", (holder._conn.info.backend_pid,))
        assert await other.try_acquire()  # the lock is free the moment the session ends
        assert holder.held  # the periodic check has not run yet
        assert not await holder.confirm() and not holder.held and holder._watch is None  # its check stopped too
        await asyncio.wait_for(holder.lost(), 0.1)
        assert await other.confirm()
    finally:
        await holder.release()
        await other.release()


def test_a_delivery_waiting_for_the_database_is_retried_without_counting_an_attempt() -> None:
    """The engine's database down (psycopg's OperationalError, itself or as the cause): retried every
    `UNAVAILABLE_DELAY` seconds at the same attempt, never dead-lettered. Any other failure, a destination refusing
    the connection included, counts an attempt as before."""
    policy = RetryPolicy(max_attempts=2)
    down = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    assert policy.after_failure(down, 2) == Retry(describe(down), 2, UNAVAILABLE_DELAY)
    try:
        raise ConnectionError("database postgresql://db/traboule: connection refused") from psycopg.OperationalError()
    except ConnectionError as wrapped:
        assert policy.after_failure(wrapped, 2) == Retry(describe(wrapped), 2, UNAVAILABLE_DELAY)
    refused = psycopg.OperationalError("connection failed: Connection refused")  # no SQLSTATE: never connected
    assert policy.after_failure(refused, 2) == Retry(describe(refused), 2, UNAVAILABLE_DELAY)
    for other in (
        psycopg.errors.UndefinedColumn("no such column"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),  # the query's, not the server's
        ConnectionRefusedError(111, "refused"),  # a destination's: counted
    ):
        assert policy.after_failure(other, 1) == Retry(describe(other), 2, 0.2)
        assert policy.after_failure(other, 2) == DeadLetter(describe(other), "max_attempts")
