"""MLLP ingest benchmark: ORM^O01 NW orders/s and ACK latency, 1 and 8 connections, durable journal.

Starts ``traboule run`` with the configuration docs/performance.md records (``CONFIG``: MLLP orders with reports in
the main process, the worklist in its own; embedded bus, fresh data dir) and drives it from this process, so client
and engine do not share an interpreter. Also reports the end-to-end rate: from the first order sent to the last one
on the worklist. Side by side, the same load against a bare MLLP listener that ACKs without parsing or journaling
(the cost of the socket round trip alone) gives the ratio.

Also measured in the same run: the disk's rate of small synchronous writes (a 1 KiB append and ``fsync``, the floor of
a durable ACK at one connection), the CPU time per order of each process (engine main, its worklist worker, this
client; from /proc), and with ``--profile`` (needs ``py-spy``: ``pip install py-spy``) the engine main process's
profile at eight connections, its top functions by own and inclusive samples.

    .venv/bin/python bench/mllp_ingest.py [--messages 4000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from traboule.adapters.mllp import MLLPClient, MLLPListener  # noqa: E402

TEMPLATE = (ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1")
STUDY_UID = "1.2.250.1.999.1.2.20261125.1"  # the template's (ZDS-1)
TEMPLATE_INS = "279035121518989"  # the template's INS (PID-3)
assert STUDY_UID in TEMPLATE and TEMPLATE_INS in TEMPLATE

# The setup measured, written out rather than the engine's defaults (which grow): orders in, the worklist out.
CONFIG = """
[engine]
defaults = false
data_dir = "{data_dir}"

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{adapter = "mllp-listener", host = "127.0.0.1", port = {mllp_port}}}
mapping = "mappings/hl7_inbound.yaml"

[[channels]]
name = "worklist"
kind = "worklist"
topics = ["order.#", "patient.#", "procedure.#"]
mapping = "mappings/mwl.yaml"
max_attempts = 5
process = "worker"
destinations = [{{adapter = "mwl-scp", host = "127.0.0.1", port = {mwl_port}, ae_title = "TRABOULE"}}]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_port_pair() -> int:
    """A port p with p + 1 free too (the worker process serves HTTP on the main port + 1)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no pair of free ports")


PATIENTS = {"each": False}  # --patients each: every order names a patient of its own (a new IPP and INS)


def nir(n: int) -> str:
    """A valid INS-NIR (its key computed), one per ``n``."""
    body = f"{1790375000000 + n:013d}"
    return f"{body}{97 - int(body) % 97:02d}"


def message(conn: int, i: int, phase: str = "") -> bytes:
    """An order of its own: message control id, order numbers, accession number and Study Instance UID (a RIS never
    sends one study UID for thousands of exams); the same patient in every order, or with ``--patients each`` a
    patient of its own (as in a migration's years of orders: most patients new to the registry)."""
    tag = f"{phase}{conn}-{i}"
    text = TEMPLATE
    if PATIENTS["each"]:
        n = int.from_bytes(tag.encode(), "big") % 10**9
        text = text.replace("IPP0001", f"IPP{n:09d}").replace(TEMPLATE_INS, nir(n))
    return (
        text.replace("MSG0001", f"B{tag}")
        .replace("PLC0001", f"P{tag}")
        .replace("FIL0001", f"F{tag}")
        .replace("ACC0001", f"A{tag}")
        .replace(STUDY_UID, f"{STUDY_UID[:-1]}{int.from_bytes(tag.encode(), 'big')}")
        .encode("latin-1")
    )


async def drive(port: int, connections: int, total: int, phase: str = "") -> tuple[float, list[float]]:
    per_conn = total // connections
    latencies: list[float] = []

    async def one(conn: int) -> None:
        async with MLLPClient("127.0.0.1", port, timeout=30) as client:
            for i in range(per_conn):
                data = message(conn, i, phase)
                t0 = time.perf_counter()
                ack = await client.send(data)
                latencies.append(time.perf_counter() - t0)
                if b"MSA|AA" not in ack:
                    raise RuntimeError(f"not accepted: {ack[:200]!r}")

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(connections)))
    return time.perf_counter() - started, latencies


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"port {port} not open")


async def until_worklist(db: Path, count: int, timeout: float = 120) -> None:
    """Wait until the worklist process has applied ``count`` orders (read from its store, as an operator would)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            with contextlib.closing(sqlite3.connect(db)) as conn:
                if conn.execute("SELECT count(*) FROM items").fetchone()[0] >= count:
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"worklist did not reach {count} items")


def fsync_rate(folder: str, seconds: float = 2.0) -> float:
    """Appends of 1 KiB each followed by ``fsync``, per second, in ``folder`` (the engine's data folder's disk)."""
    path = Path(folder) / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.write(fd, b"x" * 1024)
            os.fsync(fd)
            count += 1
        return count / (time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The engine's child processes (its worklist worker)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def start_profile(pid: int, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(spy).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return None
    command = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "-o", str(out), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


ENTRY_FRAMES = ("(threading.py", "(runners.py", "(cli.py", "run (__init__.py", "<frozen runpy>", "(traboule:")


def print_profile(raw: str, top: int = 25) -> None:
    """py-spy's raw stacks summed: the functions with the most samples of their own, and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f.split(" (", 1)[0] + " (" + f.rsplit("/", 1)[-1] if "/" in f else f for f in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    print(f"\nprofile of the engine's main process at 8 connections ({total} samples, all threads)")
    print("own samples:")
    for name, count in own.most_common(top):
        print(f"  {count / total * 100:5.1f}%  {name}")
    print("inclusive (without the threads' and the event loop's entry frames, in nearly every stack):")
    shown = [(name, count) for name, count in inclusive.most_common() if not any(e in name for e in ENTRY_FRAMES)]
    for name, count in shown[:top]:
        print(f"  {count / total * 100:5.1f}%  {name}")


def row(name: str, conns: int, n: int, elapsed: float, lat: list[float]) -> tuple[str, int, float, float, float]:
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1]
    return name, conns, n / elapsed, statistics.median(lat) * 1000, p99 * 1000


async def bare_listener(port: int) -> MLLPListener:
    ack = b"MSH|^~\\&|TRABOULE||RIS||20261125||ACK^O01^ACK|1|P|2.3.1\rMSA|AA|X\r"

    async def handler(data: bytes, peer: str) -> bytes:
        return ack

    listener = MLLPListener(handler, port=port, name="bare")
    await listener.start()
    return listener


async def floor_listener(port: int, folder: str) -> None:
    """The floor of a durable ingest in Python on this machine, run as a process of its own (``--floor``): the same
    framing, the message decoded and tokenized, a few fields to a JSON event, the raw bytes and the event inserted
    in SQLite (WAL, ``synchronous=FULL``) and committed in groups (every message read while a commit is due shares
    it), then the ACK built. No mapping, no patient registry, no outbox relay, no audit, no worklist: what plain
    library calls cost, so that the engine's figures can be read against what any Python engine must spend."""
    import json

    from traboule.formats import hl7

    db = sqlite3.connect(Path(folder) / "floor.sqlite", isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, raw BLOB, control_id TEXT, event TEXT)")
    loop = asyncio.get_running_loop()
    due: list[asyncio.Future[None] | None] = [None]

    def commit() -> None:
        waiting, due[0] = due[0], None
        db.execute("COMMIT")
        assert waiting is not None
        waiting.set_result(None)

    async def handler(data: bytes, peer: str) -> bytes:
        decoded = hl7.decode(data)
        msg = hl7.parse(decoded.text)
        pid = msg.segment("PID")
        orc = msg.segment("ORC")
        event = json.dumps(
            {
                "type": msg.message_type,
                "patient": pid.fields[3] if pid and len(pid.fields) > 3 else "",
                "order": orc.fields[2] if orc and len(orc.fields) > 2 else "",
            }
        )
        if due[0] is None:
            db.execute("BEGIN")
            due[0] = loop.create_future()
            loop.call_soon(commit)
        waiting = due[0]
        db.execute("INSERT INTO messages (raw, control_id, event) VALUES (?, ?, ?)", (data, msg.control_id, event))
        await waiting
        ack = hl7.build_ack(msg, "AA", control_id="1", timestamp="20261206000000")
        return ack.encode(decoded.codec, "replace")

    listener = MLLPListener(handler, port=port, name="floor")
    await listener.start()
    await asyncio.Event().wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--profile", action="store_true", help="py-spy profile of the engine at 8 connections")
    parser.add_argument(
        "--patients", choices=("one", "each"), default="one", help="one patient for every order, or each its own"
    )
    parser.add_argument("--floor", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)  # the floor's process
    args = parser.parse_args()
    if args.floor:
        await floor_listener(int(args.floor[0]), args.floor[1])
        return
    PATIENTS["each"] = args.patients == "each"
    rows = []
    end_to_end: dict[int, float] = {}
    cpu: dict[int, tuple[float, float, float]] = {}
    floor_cpu: dict[int, float] = {}
    profile = ""
    with tempfile.TemporaryDirectory() as tmp:
        disk = fsync_rate(tmp)
        port = free_port()
        config = Path(tmp) / "traboule.toml"
        config.write_text(CONFIG.format(data_dir=tmp, mllp_port=port, mwl_port=free_port()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
        env.update(TRABOULE_HTTP_PORT=str(http_port_pair()), TRABOULE_LOG_LEVEL="warning", TRABOULE_LOG_FORMAT="json")
        command = [str(ROOT / ".venv" / "bin" / "traboule"), "--config", str(config), "run"]
        engine = subprocess.Popen(command, env=env, cwd=ROOT)
        try:
            await wait_port(port)
            await drive(port, 1, 200, "w")  # warm-up
            done = 200
            workers = children(engine.pid)
            spy = None
            for conns in (1, 8):
                await until_worklist(Path(tmp) / "worklist.sqlite", done)
                if conns == 8 and args.profile:
                    spy = start_profile(engine.pid, Path(tmp) / "profile.txt")
                before = (cpu_seconds(engine.pid), sum(map(cpu_seconds, workers)), time.process_time())
                started = time.perf_counter()
                elapsed, lat = await drive(port, conns, args.messages, f"c{conns}-")
                done += args.messages
                await until_worklist(Path(tmp) / "worklist.sqlite", done)
                end_to_end[conns] = args.messages / (time.perf_counter() - started)
                after = (cpu_seconds(engine.pid), sum(map(cpu_seconds, workers)), time.process_time())
                cpu[conns] = tuple((a - b) / args.messages * 1000 for a, b in zip(after, before, strict=True))
                rows.append(row("traboule (journal fsync)", conns, args.messages, elapsed, lat))
            if spy is not None:
                spy.send_signal(2)  # py-spy writes its file on SIGINT
                spy.wait(30)
        finally:
            engine.terminate()
            engine.wait(30)
        if (Path(tmp) / "profile.txt").exists():
            profile = (Path(tmp) / "profile.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        floor_port = free_port()
        floor = subprocess.Popen([sys.executable, __file__, "--floor", str(floor_port), tmp], cwd=ROOT)
        try:
            await wait_port(floor_port)
            await drive(floor_port, 1, 200, "w")
            for conns in (1, 8):
                before_floor = cpu_seconds(floor.pid)
                elapsed, lat = await drive(floor_port, conns, args.messages, f"c{conns}-")
                floor_cpu[conns] = (cpu_seconds(floor.pid) - before_floor) / args.messages * 1000
                rows.append(row("plain durable (parse+SQLite+fsync)", conns, args.messages, elapsed, lat))
        finally:
            floor.terminate()
            floor.wait(30)
    bare_port = free_port()
    listener = await bare_listener(bare_port)
    for conns in (1, 8):
        elapsed, lat = await drive(bare_port, conns, args.messages)
        rows.append(row("bare MLLP ACK (no parse/journal)", conns, args.messages, elapsed, lat))
    await listener.stop()

    print(f"{'listener':34} {'conns':>5} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, conns, rate, p50, p99 in rows:
        print(f"{name:34} {conns:>5} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}")
    ours = {r[1]: r[2] for r in rows if r[0].startswith("traboule")}
    bare = {r[1]: r[2] for r in rows if r[0].startswith("bare")}
    floor = {r[1]: r[2] for r in rows if r[0].startswith("plain")}
    for conns in (1, 8):
        print(f"ratio traboule / bare at {conns} connection(s): {ours[conns] / bare[conns]:.2f}")
    for conns in (1, 8):
        print(
            f"ratio traboule / plain durable at {conns} connection(s): {ours[conns] / floor[conns]:.2f}"
            f" (plain durable's CPU: {floor_cpu[conns]:.3f} ms per order)"
        )
    for conns in (1, 8):
        print(f"end to end at {conns} connection(s) (sent -> on the worklist): {end_to_end[conns]:.0f} orders/s")
    print(f"disk: {disk:.0f} fsync'd 1 KiB appends/s; ratio orders/s at 1 connection / fsyncs/s: {ours[1] / disk:.2f}")
    print(f"{'CPU ms per order':34} {'conns':>5} {'engine':>8} {'worker':>8} {'client':>8}")
    for conns, (main_ms, worker_ms, client_ms) in cpu.items():
        print(f"{'':34} {conns:>5} {main_ms:>8.3f} {worker_ms:>8.3f} {client_ms:>8.3f}")
    if profile:
        print_profile(profile)


if __name__ == "__main__":
    if "--floor" in sys.argv:  # the floor's process runs on uvloop, as the engine does
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
