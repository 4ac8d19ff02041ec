"""FHIR server destination: orders → Patient + ServiceRequest delivered per second, traboule vs a direct client.

Starts ``traboule run`` as a subprocess (the channels docs/performance.md records, written out with ``[engine]
defaults = false``: MLLP orders, worklist in its own process, and a ``fhir`` channel whose destination is the FHIR
server, ``max_bundle = 8``, in the main process or the one ``--fhir-process`` names; fresh data dir, logs at
warning), sends ``--orders`` ORM^O01 NW over one MLLP connection
(every identifier unique to the run: placer, filler, accession, IPP, ...) and times from the first send until
every resource is on the server: the channel's store (read from this process) has every ServiceRequest and
``unpushed() == 0``; then the server's own count (``ServiceRequest?_summary=count``) confirms it. Against the
stub, ``traboule fhir resend`` then queues every resource again: the push stage alone, without HL7 ingest.

Side by side, the same resources (built from the same messages by the same mappings, before timing) posted
straight from this process with ``FHIRClient``: conditional-update transactions of 4 orders (8 entries) or 1 order
(2 entries) per Bundle, one client or four concurrent ones. Every run gets a freshly started server, because the
servers' cost grows with what they hold. Two servers:

* ``medplum``: the in-memory FHIR R4 test server (tests/fhir_server, node). Its search is a linear scan that
  evaluates FHIRPath on every stored resource, twice per conditional update: a Bundle costs O(resources held),
  a run O(orders²). Hence the small default ``--orders``.
* ``stub``: a node server that answers every transaction at once (a Location per entry, no storage, no search):
  what traboule and the client cost when the server costs nothing.

    .venv/bin/python bench/fhir_push.py [--orders 200] [--stub-orders 2000] [--fhir-process main]

(``--orders 0`` or ``--stub-orders 0`` skips that server.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from tests.peer_fhir_server import SERVER_DIR, start_fhir_server, stop_fhir_server  # noqa: E402
from traboule.adapters.fhir_client import FHIRClient, conditional_update, identifier_search, new_full_url  # noqa: E402
from traboule.adapters.mllp import MLLPClient  # noqa: E402
from traboule.formats import hl7  # noqa: E402
from traboule.model import ImagingOrder  # noqa: E402
from traboule.stores.fhir_store import FHIRStore  # noqa: E402
from traboule.translate.fhir_mapping import FHIRMapping, key_identifier  # noqa: E402
from traboule.translate.hl7_mapping import HL7InboundMapping  # noqa: E402

TEMPLATE = (ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1")
IDS = ("MSG0001", "IPP0001", "PLC0001", "FIL0001", "ACC0001", "RP0001", "SPS0001")
STUDY_UID = "1.2.250.1.999.1.2.20261125.1"
MAX_BUNDLE = 8  # entries; the medplum test server's limit for conditional transactions
# The channels measured besides the fhir one (the engine's defaults then), written out: the defaults grow.
ORDERS_AND_WORKLIST: list[dict[str, Any]] = [
    {
        "name": "ris-orders",
        "kind": "hl7-orders",
        "source": {"adapter": "mllp-listener", "host": "127.0.0.1", "port": 2575},
        "mapping": "mappings/hl7_inbound.yaml",
    },
    {
        "name": "worklist",
        "kind": "worklist",
        "topics": ["order.#", "patient.#", "procedure.#"],
        "mapping": "mappings/mwl.yaml",
        "max_attempts": 5,
        "process": "worker",
        "destinations": [{"adapter": "mwl-scp", "host": "127.0.0.1", "port": 11112, "ae_title": "TRABOULE"}],
    },
]

STUB = """
import { createServer } from 'node:http';
const port = Number(process.argv[2]);
const ids = new Map();  // conditional URL -> id
let bundles = 0, entries = 0, next = 0, first = 0, last = 0;  // first/last: Bundle arrivals (ms)
function send(res, status, body) {
  res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
  res.end(JSON.stringify(body));
}
createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const path = new URL(req.url, 'http://127.0.0.1').pathname.replace(/\\/+$/, '');
    if (req.method === 'POST' && path === '/fhir/R4') {
      last = Date.now();
      first = first || last;
      const bundle = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      bundles += 1;
      const entry = (bundle.entry ?? []).map((e) => {
        entries += 1;
        let id = ids.get(e.request.url);
        const created = id === undefined;
        if (created) { id = String(++next); ids.set(e.request.url, id); }
        const type = e.request.url.split('?')[0];
        return { response: { status: created ? '201 Created' : '200 OK', location: `${type}/${id}/_history/1` } };
      });
      return send(res, 200, { resourceType: 'Bundle', type: 'transaction-response', entry });
    }
    if (path === '/fhir/R4/metadata') return send(res, 200, { resourceType: 'CapabilityStatement', status: 'active' });
    if (path === '/fhir/R4/$stats') return send(res, 200, { bundles, entries, first, last });
    if (path === '/fhir/R4/$reset') { bundles = entries = first = last = 0; return send(res, 200, {}); }
    const type = path.match(/^\\/fhir\\/R4\\/([A-Za-z]+)$/);
    if (req.method === 'GET' && type) {
      const total = [...ids.keys()].filter((k) => k.startsWith(type[1] + '?')).length;
      return send(res, 200, { resourceType: 'Bundle', type: 'searchset', total });
    }
    send(res, 404, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'not-found' }] });
  });
}).listen(port, '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ports(count: int) -> int:
    """A free port p with p + 1 ... p + count - 1 free too (process n serves HTTP on the main port + n)."""
    for _ in range(50):
        port = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for n in range(1, count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port + n))
            except OSError:
                continue
            return port
    raise RuntimeError("no run of free ports")


def message(tag: str, i: int) -> bytes:
    """The fixture order with every identifier unique to (run, phase, order), within DICOM SH's 16 characters (the
    accession number, the step ids): its first letter, the run's tag, the order's number."""
    text = TEMPLATE
    for ident in IDS:
        text = text.replace(ident, f"{ident[0]}{tag}-{i}")
    return text.replace(STUDY_UID, f"{STUDY_UID}.{tag.replace('-', '.')}.{i + 1}").encode("latin-1")


def new_tag() -> str:
    return str(uuid.uuid4().int % 10**8 + 1)


# -- servers ---------------------------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str  # "medplum" | "stub"
    base_url: str
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def fhir_server(kind: str, tmp: Path) -> Iterator[Server]:
    """A freshly started FHIR server (medplum test server or the stub) on a free loopback port."""
    node = shutil.which("node")
    if node is None:
        sys.exit("node is needed for the FHIR servers (apt-get install nodejs; make fhir-peer)")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/fhir/R4"
    if kind == "medplum":
        process = start_fhir_server(node, port, tmp / "medplum.log")
    else:
        script = tmp / "stub.mjs"
        script.write_text(STUB)
        process = subprocess.Popen([node, str(script), str(port)], stdout=subprocess.DEVNULL)
        try:
            wait_http(f"{base_url}/metadata", process)
        except BaseException:
            stop_fhir_server(process)
            raise
    try:
        yield Server(kind, base_url, process)
    finally:
        stop_fhir_server(process)


def wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


async def server_counts(server: Server) -> tuple[int, int, str]:
    """(ServiceRequests, Patients) the server holds, and what it says of the Bundles it got (stub only)."""
    async with FHIRClient(server.base_url, timeout=300) as client:
        requests = (await client.search("ServiceRequest", {"_summary": "count"}))["total"]
        patients = (await client.search("Patient", {"_summary": "count"}))["total"]
        stats = ""
        if server.kind == "stub":
            stats = per_bundle(await stub_operation(server, "$stats"))
    return int(requests), int(patients), stats


async def stub_operation(server: Server, name: str) -> dict[str, Any]:
    """The stub's own ``$stats`` / ``$reset`` (not FHIR interactions: the FHIR client names resource types only)."""
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        answer = await client.get(f"{server.base_url}/{name}")
        answer.raise_for_status()
        return dict(answer.json())


# -- traboule --------------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def engine_toml(channels: list[dict[str, Any]]) -> str:
    """These channels alone (not over the engine's defaults)."""
    return "[engine]\ndefaults = false\n\n" + "\n".join(
        "[[channels]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in channel.items()) for channel in channels
    )


@dataclass
class Engine:
    mllp_port: int
    health: list[str]  # /health of each process
    store_path: Path  # the fhir channel's store
    command: list[str]  # ``traboule --config ...``
    env: dict[str, str]


@contextlib.contextmanager
def traboule(base_url: str, tmp: Path, process: str) -> Iterator[Engine]:
    """``traboule run``: orders and worklist + a ``fhir`` channel pushing to ``base_url``, run by ``process``."""
    data = tmp / "data"
    channels = copy.deepcopy(ORDERS_AND_WORKLIST)
    destination = {"base_url": base_url, "max_bundle": MAX_BUNDLE}
    channels.append({"name": "fhir", "kind": "fhir", "process": process, "destination": destination})
    config = tmp / "traboule.toml"
    config.write_text(engine_toml(channels))
    port = free_port()
    processes = len({"main", "worker", process})
    http_port = http_ports(processes)
    env = dict(
        os.environ,
        TRABOULE_DATA_DIR=str(data),
        TRABOULE_MLLP_PORT=str(port),
        TRABOULE_MWL_PORT=str(free_port()),
        TRABOULE_HTTP_PORT=str(http_port),
        TRABOULE_LOG_LEVEL="warning",
        TRABOULE_LOG_FORMAT="json",
    )
    command = [str(ROOT / ".venv" / "bin" / "traboule"), "--config", str(config)]
    # Its own process group: if it does not stop on SIGTERM, its worker child goes down with it.
    engine = subprocess.Popen([*command, "run"], env=env, cwd=ROOT, start_new_session=True)
    try:
        health = [f"http://127.0.0.1:{http_port + n}/health" for n in range(processes)]
        yield Engine(port, health, data / "fhir.sqlite", command, env)
    finally:
        engine.terminate()
        try:
            engine.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            engine.wait(10)


async def wait_ready(engine: Engine, timeout: float = 60) -> None:
    """Every process of the engine answers on /health, and the fhir channel's store exists."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1) as client:
        for url in engine.health:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} does not answer")
                await asyncio.sleep(0.1)
    while not engine.store_path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {engine.store_path}")
        await asyncio.sleep(0.05)


async def delivered(store: FHIRStore, orders: int, timeout: float) -> None:
    """Every order's ServiceRequest in the channel's store, and nothing left to push."""
    deadline = time.monotonic() + timeout
    while not (store.count("ServiceRequest") >= orders and store.unpushed() == 0):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout:.0f} s: {store.count('ServiceRequest')} ServiceRequests, {store.unpushed()} unpushed"
            )
        await asyncio.sleep(0.02)


@dataclass
class TrabouleRun:
    acked: float  # first send → last ACK, seconds
    delivered: float  # first send → every resource on the server
    resend: float = 0.0  # ``fhir resend``: first Bundle at the server → every resource pushed again
    per_bundle: str = ""  # entries per Bundle the stub received, during the run and during the resend
    resend_per_bundle: str = ""


async def run_traboule(
    server: Server, tmp: Path, orders: int, timeout: float, process: str, resend: bool
) -> TrabouleRun:
    tag = new_tag()
    messages = [message(tag, i) for i in range(orders)]
    with traboule(server.base_url, tmp, process) as engine:
        await wait_ready(engine)
        store = FHIRStore(str(engine.store_path))
        try:
            started = time.perf_counter()
            async with MLLPClient("127.0.0.1", engine.mllp_port, timeout=30) as client:
                for data in messages:
                    ack = await client.send(data)
                    if b"MSA|AA" not in ack:
                        raise RuntimeError(f"not accepted: {ack[:200]!r}")
            acked = time.perf_counter() - started
            await delivered(store, orders, timeout)
            run = TrabouleRun(acked, time.perf_counter() - started)
            if resend:
                run.resend, run.per_bundle, run.resend_per_bundle = await run_resend(
                    server, engine, store, orders, timeout
                )
            return run
        finally:
            store.close()


async def run_resend(
    server: Server, engine: Engine, store: FHIRStore, orders: int, timeout: float
) -> tuple[float, str, str]:
    """The push stage alone: ``traboule fhir resend`` queues every resource again (8 per push message, a
    Patient next to its ServiceRequest) for the running engine; timed from the first Bundle the server receives
    to ``unpushed() == 0``. The stub answers a second PUT of the same resource as it did the first."""
    before = await stub_operation(server, "$stats")
    await stub_operation(server, "$reset")
    cli_started = time.time()
    done = await asyncio.to_thread(
        subprocess.run, [*engine.command, "fhir", "resend"], env=engine.env, cwd=ROOT, capture_output=True
    )
    cli_done = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"fhir resend failed: {done.stderr.decode(errors='replace')[-500:]}")
    await delivered(store, orders, timeout)
    ended = time.time()
    stats = await stub_operation(server, "$stats")
    first = stats["first"] / 1000
    print(
        f"resend: cli {cli_done - cli_started:.2f} s (queued by {cli_done - first:.2f} s after the first Bundle), "
        f"{stats['bundles']} Bundles / {stats['entries']} entries in {ended - first:.2f} s",
        file=sys.stderr,
    )
    return ended - first, per_bundle(before), per_bundle(stats)


def per_bundle(stats: dict[str, Any]) -> str:
    return f"{stats['entries'] / max(stats['bundles'], 1):.1f}"


# -- direct ----------------------------------------------------------------------------------------------------


def order_entries(order: ImagingOrder, mapping: FHIRMapping) -> list[dict[str, Any]]:
    """Patient + ServiceRequest as conditional updates, as traboule's destination sends them."""
    patient = mapping.patient(order.patient)
    request = mapping.service_request(order, f"Patient/{patient['id']}")
    patient_url, request_url = new_full_url(), new_full_url()
    request["subject"] = {"reference": patient_url}
    entries = []
    for resource, url in ((patient, patient_url), (request, request_url)):
        ident = key_identifier(resource)
        assert ident is not None
        body = {k: v for k, v in resource.items() if k not in ("id", "meta")}
        query = identifier_search(ident.get("system", ""), ident["value"])
        entries.append(conditional_update(body, f"{resource['resourceType']}?{query}", full_url=url))
    return entries


def bundles(orders: int, per_bundle: int) -> list[list[dict[str, Any]]]:
    """Transaction entries for ``orders`` fresh orders, ``per_bundle`` orders per Bundle (built before timing)."""
    inbound = HL7InboundMapping(ROOT / "mappings" / "hl7_inbound.yaml")
    mapping = FHIRMapping()
    tag = new_tag()
    out: list[list[dict[str, Any]]] = []
    for i in range(orders):
        (order,) = inbound.map(hl7.parse(hl7.decode(message(tag, i)).text))
        assert isinstance(order, ImagingOrder)
        if i % per_bundle == 0:
            out.append([])
        out[-1].extend(order_entries(order, mapping))
    return out


async def run_direct(server: Server, work: list[list[dict[str, Any]]], clients: int) -> float:
    queue = iter(work)

    async def one() -> None:
        async with FHIRClient(server.base_url, timeout=300) as client:
            for entries in queue:  # shared: each Bundle goes to the next free client
                await client.transaction(entries)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return time.perf_counter() - started


# -- main ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    server: str
    sender: str
    per_bundle: str
    clients: int
    orders: int
    seconds: float
    on_server: tuple[int, int, str]
    acked: float = 0.0

    @property
    def rate(self) -> float:
        return self.orders / self.seconds


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orders", type=int, default=200, help="orders per run against medplum (0: skip it)")
    parser.add_argument("--stub-orders", type=int, default=2000, help="orders per run against the stub (0: skip it)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for one run")
    parser.add_argument(
        "--fhir-process", default="main", help="the process running the fhir channel (main: with MLLP ingest)"
    )
    args = parser.parse_args()
    if not (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        sys.exit("the FHIR test server's packages are missing: make fhir-peer")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.2f} before the run: the machine is not idle", file=sys.stderr)
    rows: list[Row] = []
    for kind, orders in (("medplum", args.orders), ("stub", args.stub_orders)):
        if orders <= 0:
            continue
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            with fhir_server(kind, tmp) as server:
                run = await run_traboule(server, tmp, orders, args.timeout, args.fhir_process, kind == "stub")
                counts = await server_counts(server)
            e2e_counts = (*counts[:2], run.per_bundle)
            rows.append(Row(kind, "traboule (MLLP → push)", "≤ 4", 1, orders, run.delivered, e2e_counts, run.acked))
            if run.resend:
                resend_counts = (*counts[:2], run.resend_per_bundle)
                rows.append(Row(kind, "traboule push (resend)", "4", 1, orders, run.resend, resend_counts))
            print(f"{kind}: traboule {orders / run.delivered:.1f} orders/s", file=sys.stderr)
            for per_bundle, clients in ((4, 1), (1, 1), (4, 4)):
                work = bundles(orders, per_bundle)
                with fhir_server(kind, tmp) as server:
                    seconds = await run_direct(server, work, clients)
                    counts = await server_counts(server)
                rows.append(Row(kind, "direct FHIRClient", str(per_bundle), clients, orders, seconds, counts))
                print(f"{kind}: direct {per_bundle}/Bundle x{clients}: {orders / seconds:.1f}/s", file=sys.stderr)

    print(
        f"{'server':8} {'sender':24} {'orders/Bundle':>13} {'clients':>7} {'orders':>6} {'seconds':>8} "
        f"{'orders/s':>9} {'SR/Patient on server':>21} {'entries/Bundle':>14}"
    )
    for r in rows:
        on_server = f"{r.on_server[0]}/{r.on_server[1]}"
        print(
            f"{r.server:8} {r.sender:24} {r.per_bundle:>13} {r.clients:>7} {r.orders:>6} {r.seconds:>8.2f} "
            f"{r.rate:>9.1f} {on_server:>21} {r.on_server[2] or '-':>14}"
        )
    for kind in dict.fromkeys(r.server for r in rows):
        ours = [r for r in rows if r.server == kind and r.sender.startswith("traboule")]
        direct = [r for r in rows if r.server == kind and r.sender.startswith("direct")]
        print(f"{kind}: traboule ingest (first send → last ACK): {ours[0].orders / ours[0].acked:.0f} orders/s")
        for mine in ours:
            for r in direct:
                print(
                    f"{kind}: ratio {mine.sender} / direct ({r.per_bundle} per Bundle, {r.clients} client(s)): "
                    f"{mine.rate / r.rate:.2f}"
                )
        for r in rows:
            if r.server == kind and r.on_server[:2] != (r.orders, r.orders):
                print(f"WARNING {kind} {r.sender} x{r.clients}: the server holds {r.on_server[:2]}, not {r.orders}")
    load = os.getloadavg()[0]
    if load > 1.5:
        print(f"WARNING: load average {load:.2f} after the run", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
