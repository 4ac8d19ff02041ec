"""Reports: ORU^R01 → validated CDA per second (validation on and off), and the validator's own cost per document.

Three parts, each with its baseline side by side:

1. In-process pipeline, one thread: HL7 decode + parse + map (``HL7InboundMapping``) then
   ``ReportPublisher.prepare`` (CDA built by ``traboule.translate.cda``, validated, stored in the publisher's
   SQLite), for
   ``--reports`` distinct reports (unique MSH-10, placer, filler and accession numbers, built from
   ``fixtures/hl7/oru_r01_report.hl7`` by substitution; each report's study remembered beforehand). Validator:
   none, a ``CDAValidator`` in this process, a ``ProcessValidator`` (one worker process). Reports/s, p50/p99 per
   report, and the split: map, CDA build, validation, the publisher's SQLite calls, the rest. Then the same pipeline
   on N + 1 threads with a ``ProcessValidator`` of N processes (each of ``--processes``), as the orders channel runs
   it: reports/s and reports/s per core.
2. End to end over MLLP: a ``Runtime`` (``ORDERS_AND_WORKLIST``: the channels measured, all in one spawned engine
   process on uvloop, embedded bus, fresh data dir) with reports validation off, on (``ProcessValidator``, warmed at
   start, as ``make_publisher`` builds it, with ``reports.validation_processes`` = each of ``--processes``, default
   1, 2 and the cores the bench may use) and, for the ratio, on with a ``CDAValidator`` in the engine process
   (validation in a thread of the engine: what the worker process avoids). The studies are announced with
   ``study.stable`` events first. Reports sent on 1 and 4 connections (and 2N with N validation processes when
   that is more) with ``MLLPClient``: reports/s, reports/s per core (the validation processes, at most the cores)
   and ACK p50/p99 (every ACK must be AA). Then ORM^O01 orders paced at ``--order-interval`` on their own
   connection: ACK p50/p99 alone and while reports flow on another connection (and alone on an engine with
   ``reports = false``, the orders-only baseline).
3. The validator's cost per document, for the level-3 CDA traboule generates: XSD and each schematron (p50/p99
   over ``--runs``), against the naive way of bench/cda_validate.py (a fresh Saxon processor and a stylesheet
   compile per schematron per document, ``--naive-runs``), with the ratio.

The schematron cache (copy of the validator tree + generated XSLT) goes to a temporary directory unless
``--cache`` names one; every temporary directory and process this script starts is removed or stopped at the end.

    .venv/bin/python bench/reports.py [--reports 200] [--orders 200] [--runs 50] [--naive-runs 3] \\
        [--validators ../shared/standards/ans-testcontenucda] [--cache DIR] [--processes 1,2,4] [--skip 2,3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import multiprocessing
import os
import platform
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from traboule.app import logging as tlog  # noqa: E402

tlog.configure("console", "warning")

from traboule import model  # noqa: E402
from traboule.adapters.mllp import MLLPClient  # noqa: E402
from traboule.channels.orders import _idempotency_key  # noqa: E402
from traboule.formats import hl7  # noqa: E402
from traboule.stores.reports import ReportPublisher  # noqa: E402
from traboule.translate.cda import CDAMapping  # noqa: E402
from traboule.translate.hl7_mapping import HL7InboundMapping  # noqa: E402

STANDARDS = ROOT.parent / "shared" / "standards"
ORU = (ROOT / "fixtures" / "hl7" / "oru_r01_report.hl7").read_bytes().decode("utf-8")
ORM = (ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7").read_bytes().decode("latin-1")
STUDY_ROOT = "1.2.250.1.999.1.2.20261125"
WARMUP = 10  # reports per pipeline / engine before timing (the first validations are 2-4x slower)


# -- messages and studies ---------------------------------------------------------------------------------------


def report_message(k: int) -> bytes:
    """The fixture report with its own MSH-10, placer, filler and accession numbers."""
    return (
        ORU.replace("REP0001", f"R{k}")
        .replace("PLC0001", f"P{k}")
        .replace("FIL0001", f"F{k}")
        .replace("ACC0001", f"A{k}")
        .encode("utf-8")
    )


def order_message(k: int) -> bytes:
    return (
        ORM.replace("MSG0001", f"O{k}")
        .replace("PLC0001", f"OP{k}")
        .replace("FIL0001", f"OF{k}")
        .replace("ACC0001", f"OA{k}")
        .encode("latin-1")
    )


def study(k: int) -> model.Study:
    """The archive's view of report ``k``'s study (a CT series of 2 images, an SR), as in tests/test_reports.py."""
    uid = f"{STUDY_ROOT}.{k}"
    return model.Study(
        uid,
        f"A{k}",
        model.Patient(ids=[model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1")]),
        "20261125093512",
        series=[
            model.Series(
                f"{uid}.1",
                "1",
                "CT",
                instances=[model.Instance(f"{uid}.1.{i}", "1.2.840.10008.5.1.4.1.1.2", str(i)) for i in (1, 2)],
            ),
            model.Series(
                f"{uid}.2", "2", "SR", instances=[model.Instance(f"{uid}.2.1", "1.2.840.10008.5.1.4.1.1.88.11", "1")]
            ),
        ],
    )


# -- small helpers ------------------------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def ms(seconds: float, width: int = 9) -> str:
    return f"{seconds * 1000:{width}.1f}"


def short(sch: str) -> str:
    return Path(sch).name.removesuffix(".sch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> str:
    model_name = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model_name = found.group(1).strip() if found else "?"
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: nproc {nproc}, {model_name}; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; "
        f"load average at start {load}"
    )


class Timed:
    """A stand-in for an object that times the calls of one method (and passes everything else through)."""

    def __init__(self, inner: Any, method: str) -> None:
        self.inner = inner
        self.times: list[float] = []
        self.worker: list[float] = []  # validation: the seconds the validator itself reports (report.timings)
        call = getattr(inner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = call(*args, **kwargs)
            self.times.append(time.perf_counter() - start)
            if timings := getattr(result, "timings", None):
                self.worker.append(sum(timings.values()))
            return result

        setattr(self, method, timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def time_methods(obj: Any, names: Iterable[str], times: list[float] | None = None) -> list[float]:
    """Per-call seconds of the named methods of ``obj`` (instance attributes shadow the bound methods), appended to
    ``times`` when given."""
    times = [] if times is None else times
    for name in names:
        call = getattr(obj, name)

        def timed(*args: Any, _call: Callable[..., Any] = call, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _call(*args, **kwargs)
            finally:
                times.append(time.perf_counter() - start)

        setattr(obj, name, timed)
    return times


# -- part 1: in-process pipeline ---------------------------------------------------------------------------------


def pipeline(label: str, validator: Any, ks: list[int], workdir: Path) -> dict[str, Any]:
    """Map + prepare ``ks`` (after WARMUP reports), one thread; per-report seconds of each stage."""
    mapping = Timed(CDAMapping(), "build")
    timed_validator = Timed(validator, "validate") if validator is not None else None
    publisher = ReportPublisher(mapping, workdir / f"{label.split()[0]}.reports.sqlite", timed_validator)  # type: ignore[arg-type]
    # The publisher's SQLite work per report: set lookup/creation, study and order look-ups, the stored version.
    sql = time_methods(publisher, ("_set_for", "study_for", "order_for"))
    time_methods(publisher.storage, ("store",), sql)
    inbound = HL7InboundMapping()
    for k in ks:
        publisher.remember_study(study(k))
    messages = {k: report_message(k) for k in ks}
    maps, prepares, totals, sql_per = [], [], [], []
    builds: list[float] = []
    validations: list[float] = []
    worker: list[float] = []
    document = b""
    started = first = 0.0
    for i, k in enumerate(ks):
        if i == WARMUP:
            mapping.times.clear()
            sql.clear()
            if timed_validator is not None:
                timed_validator.times.clear()
                timed_validator.worker.clear()
            started = time.perf_counter()
        t0 = time.perf_counter()
        msg = hl7.parse(hl7.decode(messages[k]).text)
        (report,) = inbound.map(msg)
        key = _idempotency_key(msg)
        t1 = time.perf_counter()
        before = len(sql)
        doc = publisher.prepare(report, key)
        t2 = time.perf_counter()
        if i == 0:
            first = t2 - t0
        assert doc.action == "publish" and doc.version == 1 and doc.level == 3, (doc.action, doc.version, doc.level)
        if i >= WARMUP:
            maps.append(t1 - t0)
            prepares.append(t2 - t1)
            totals.append(t2 - t0)
            sql_per.append(sum(sql[before:]))
        document = base64.b64decode(doc.content)
    elapsed = time.perf_counter() - started
    builds = list(mapping.times)
    if timed_validator is not None:
        validations, worker = list(timed_validator.times), list(timed_validator.worker)
    publisher.close()
    n = len(totals)
    assert len(builds) == n and len(sql_per) == n and (validator is None or len(validations) == n)
    zero = [0.0] * n
    validations = validations or zero
    rest = [p - b - v - s for p, b, v, s in zip(prepares, builds, validations, sql_per, strict=True)]
    return {
        "label": label,
        "n": n,
        "rate": n / elapsed,
        "total": totals,
        "map": maps,
        "build": builds,
        "validate": validations,
        "worker": worker,
        "sql": sql_per,
        "rest": rest,
        "document": document,
        "first": first,
    }


def part1(args: argparse.Namespace, cache: Path, workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    from traboule.formats.cda_validation import CDAValidator, ProcessValidator

    n = args.reports + WARMUP
    results = []
    startup: dict[str, Any] = {}
    progress(f"part 1: pipeline without validation ({args.reports} reports)")
    results.append(pipeline("none (validation off)", None, list(range(1, n + 1)), workdir))

    progress("part 1: CDAValidator in this process (compiling the schematrons)")
    start = time.perf_counter()
    in_process = CDAValidator(args.validators, cache)
    startup["setup"] = time.perf_counter() - start
    startup["compile"] = in_process.compile_all()
    startup["cold_cache"] = not args.cache_given
    results.append(pipeline("CDAValidator (in process)", in_process, list(range(n + 1, 2 * n + 1)), workdir))

    progress("part 1: ProcessValidator (worker process, compiling the schematrons there)")
    worker = ProcessValidator(args.validators, cache, processes=1)
    try:
        start = time.perf_counter()
        startup["worker_compile"] = worker.compile_all()
        startup["worker_start"] = time.perf_counter() - start
        results.append(pipeline("ProcessValidator (worker)", worker, list(range(2 * n + 1, 3 * n + 1)), workdir))
    finally:
        worker.close()
    counts = [int(c) for c in args.processes.replace(",", " ").split()]
    base = 3 * n
    for count in counts:
        progress(f"part 1: ProcessValidator x{count}, {count + 1} threads (as the orders channel runs them)")
        pool = ProcessValidator(args.validators, cache, processes=count)
        try:
            pool.warm()
            ks = list(range(base + 1, base + n + max(0, 2 * count - WARMUP) + 1))
            base += len(ks)
            startup.setdefault("parallel", []).append(parallel_pipeline(pool, ks, workdir))
        finally:
            pool.close()
    return results, startup, in_process


def parallel_pipeline(validator: Any, ks: list[int], workdir: Path) -> dict[str, Any]:
    """Map + prepare ``ks`` on ``processes + 1`` threads (the orders channel's reports threads), each report a set
    of its own: reports/s once the first WARMUP (one per thread at least) are done."""
    from concurrent.futures import ThreadPoolExecutor

    publisher = ReportPublisher(CDAMapping(), workdir / f"parallel-{validator.processes}.reports.sqlite", validator)
    inbound = HL7InboundMapping()
    publisher.remember([study(k) for k in ks])
    messages = {k: report_message(k) for k in ks}

    def one(k: int) -> None:
        msg = hl7.parse(hl7.decode(messages[k]).text)
        (report,) = inbound.map(msg)
        doc = publisher.prepare(report, _idempotency_key(msg))
        assert doc.action == "publish" and doc.version == 1 and doc.level == 3, (doc.action, doc.version)

    warm = max(WARMUP, 2 * validator.processes)
    try:
        with ThreadPoolExecutor(publisher.parallel + 1) as threads:
            list(threads.map(one, ks[:warm]))
            started = time.perf_counter()
            list(threads.map(one, ks[warm:]))
            elapsed = time.perf_counter() - started
    finally:
        publisher.close()
    return {"processes": validator.processes, "n": len(ks) - warm, "rate": (len(ks) - warm) / elapsed}


def print_part1(results: list[dict[str, Any]], startup: dict[str, Any], reports: int) -> None:
    print(f"\n1. In-process pipeline, one thread: ORU^R01 → Report → ReportPublisher.prepare ({reports} reports,")
    print(f"   after {WARMUP} warm-up ones; ms per report)")
    print(f"{'validator':30} {'reports/s':>9} {'p50 ms':>8} {'p99 ms':>8}   ratio to no validation")
    base = results[0]["rate"]
    for r in results:
        print(
            f"{r['label']:30} {r['rate']:9.1f} {ms(pct(r['total'], 50), 8)} {ms(pct(r['total'], 99), 8)}"
            f"   {r['rate'] / base:6.3f}"
        )
    print("\n   split, ms per report: p50 (mean)")
    stages = [
        ("map", "decode+parse+map"),
        ("build", "CDA build"),
        ("validate", "validation"),
        ("sql", "publisher SQLite"),
        ("rest", "other (header, JSON, b64)"),
        ("total", "total"),
    ]
    print(f"{'validator':30} " + " ".join(f"{title:>18}" for _, title in stages))
    for r in results:
        cells = [f"{pct(r[key], 50) * 1000:8.2f} ({statistics.fmean(r[key]) * 1000:7.2f})" for key, _ in stages]
        print(f"{r['label']:30} " + " ".join(f"{c:>18}" for c in cells))
    firsts = ", ".join(f"{r['label']} {r['first'] * 1000:.0f} ms" for r in results)
    print(f"   first report of each pipeline (a warm-up one, not counted above): {firsts}")
    for r in results:
        if r["worker"] and "Process" in r["label"]:
            ipc = [a - b for a, b in zip(r["validate"], r["worker"], strict=True)]
            print(
                f"   {r['label']}: validate() as the caller sees it p50 {ms(pct(r['validate'], 50), 0)} ms, "
                f"of which the worker's own validation p50 {ms(pct(r['worker'], 50), 0)} ms, "
                f"IPC + pickling p50 {ms(pct(ipc, 50), 0)} ms"
            )
    cores = len(os.sched_getaffinity(0))
    if startup.get("parallel"):
        print(f"\n   the same pipeline, N validation processes, N + 1 threads (per core: reports/s / min(N, {cores}))")
        one = startup["parallel"][0]["rate"] if startup["parallel"][0]["processes"] == 1 else None
        for r in startup["parallel"]:
            ratio = f"   x{r['rate'] / one:.2f} of one process" if one else ""
            per_core = r["rate"] / min(r["processes"], cores)
            rate = r["rate"]
            print(f"   ProcessValidator x{r['processes']:<3} {rate:9.1f} reports/s {per_core:7.1f} per core{ratio}")
    compile_in = sum(startup["compile"].values())
    compile_worker = sum(startup["worker_compile"].values())
    cache = "empty cache: copy tree, schematron → XSLT, Saxon compile" if startup["cold_cache"] else "--cache given"
    print(
        f"   start-up: in-process validator {startup['setup'] + compile_in:.1f} s ({cache}); "
        f"ProcessValidator worker spawn + compile {startup['worker_start']:.1f} s (warm cache, "
        f"{compile_worker:.1f} s of compile)"
    )


# -- part 2: the engine over MLLP ---------------------------------------------------------------------------------


# The channels of part 2 (the engine's defaults when it was measured), written out: the defaults grow.
ORDERS_AND_WORKLIST: list[dict[str, Any]] = [
    {
        "name": "ris-orders",
        "kind": "hl7-orders",
        "source": {"adapter": "mllp-listener", "host": "127.0.0.1", "port": 0},
        "mapping": "mappings/hl7_inbound.yaml",
    },
    {
        "name": "worklist",
        "kind": "worklist",
        "topics": ["order.#", "patient.#", "procedure.#"],
        "mapping": "mappings/mwl.yaml",
        "max_attempts": 5,
        "destinations": [{"adapter": "mwl-scp", "host": "127.0.0.1", "port": 11112, "ae_title": "TRABOULE"}],
    },
]


def engine_process(conn: Any, settings: dict[str, Any]) -> None:
    """Spawned: one Runtime with the orders and worklist channels, on uvloop as ``traboule run`` runs it."""
    import uvloop

    uvloop.run(_engine(conn, settings))


async def _engine(conn: Any, s: dict[str, Any]) -> None:
    from traboule.app.config import Config
    from traboule.app.runtime import Runtime
    from traboule.model import Envelope

    cfg = Config(data_dir=s["data_dir"], log_level="warning", channels=copy.deepcopy(ORDERS_AND_WORKLIST))
    cfg.channels[1]["destinations"][0]["port"] = s["mwl_port"]
    if s["mode"] == "disabled":  # orders only: no report publisher on the channel at all
        cfg.channels[0]["reports"] = False
    elif s["mode"] == "off":
        cfg.channels[0]["reports"] = {"validate": False}
    else:
        cfg.channels[0]["reports"] = {"validate": True, "validators": s["validators"], "cache": s["cache"]}
        if s["mode"] == "process":
            cfg.channels[0]["reports"]["validation_processes"] = s["processes"]
    runtime = Runtime(cfg)
    channel: Any = runtime.channel("ris-orders")
    if s["mode"] == "thread":  # the baseline: validation in a thread of the engine process
        from traboule.formats.cda_validation import CDAValidator

        channel.reports.validator = CDAValidator(s["validators"], s["cache"])
    start = time.perf_counter()
    await runtime.start()  # compiles the schematrons (warm cache) before the listener opens
    started = time.perf_counter() - start
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(conn.fileno(), stop.set)
    try:
        for k in s["studies"]:
            env = Envelope(study(k))
            await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        db = Path(s["data_dir"]) / "ris-orders.reports.sqlite"
        deadline = time.monotonic() + 120
        while s["studies"]:
            with contextlib.closing(sqlite3.connect(db)) as c:
                if c.execute("SELECT count(*) FROM studies").fetchone()[0] >= len(s["studies"]):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the studies did not reach the report publisher")
            await asyncio.sleep(0.05)
        validator = channel.reports.validator if channel.reports is not None else None
        pids = list(getattr(validator, "pids", []))
        conn.send(("ready", channel.listener.port, started, pids))
        await stop.wait()
        conn.recv()
    finally:
        loop.remove_reader(conn.fileno())
        await runtime.stop()
        if channel.reports is not None and hasattr(channel.reports.validator, "close"):
            channel.reports.validator.close()
        conn.send(("stopped",))


async def send_reports(port: int, ks: list[int], connections: int) -> tuple[float, list[float]]:
    per_conn = [ks[c::connections] for c in range(connections)]
    latencies: list[float] = []

    async def one(mine: list[int]) -> None:
        async with MLLPClient("127.0.0.1", port, timeout=120) as client:
            for k in mine:
                data = report_message(k)
                t0 = time.perf_counter()
                ack = await client.send(data)
                latencies.append(time.perf_counter() - t0)
                assert b"MSA|AA|" in ack, f"report {k} not accepted: {ack.decode('utf-8', 'replace')!r}"

    started = time.perf_counter()
    await asyncio.gather(*(one(m) for m in per_conn))
    return time.perf_counter() - started, latencies


async def paced_orders(port: int, first: int, interval: float, count: int, stop: asyncio.Event | None) -> list[float]:
    """ORM^O01 NW at a fixed rate on one connection (late ACKs are not made up for); ACK latencies."""
    latencies: list[float] = []
    async with MLLPClient("127.0.0.1", port, timeout=120) as client:
        tick = time.perf_counter()
        k = first
        while (stop is None and len(latencies) < count) or (stop is not None and not stop.is_set()):
            data = order_message(k)
            t0 = time.perf_counter()
            ack = await client.send(data)
            latencies.append(time.perf_counter() - t0)
            assert b"MSA|AA|" in ack, f"order {k} not accepted: {ack.decode('latin-1')!r}"
            k += 1
            tick += interval
            delay = tick - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                tick = time.perf_counter()
    return latencies


async def engine_run(
    mode: str, args: argparse.Namespace, cache: Path, base_k: int, processes: int = 1
) -> dict[str, Any]:
    """Start an engine in ``mode`` (disabled | off | process | thread; ``processes``: the validation processes of
    ``process``), drive it, stop it; rows of results."""
    n = args.reports
    runs = {"disabled": [], "thread": ["concurrent"]}.get(mode, ["r1", "r4", "concurrent"])
    if mode == "process" and processes > 1:  # the rows that show the scaling: enough connections to keep N busy
        runs = ["r1", "r4", *([f"r{2 * processes}"] if 2 * processes > 4 else [])]
    warm = list(range(base_k, base_k + WARMUP * max(1, processes))) if runs else []
    first = base_k + len(warm)
    ks = {run: list(range(first + i * n, first + (i + 1) * n)) for i, run in enumerate(runs)}
    out: dict[str, Any] = {"mode": mode, "processes": processes if mode == "process" else 0}
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    with tempfile.TemporaryDirectory(prefix="reports-bench-engine-") as data_dir:
        settings = {
            "mode": mode,
            "data_dir": data_dir,
            "mwl_port": free_port(),
            "validators": str(args.validators),
            "cache": str(cache),
            "studies": warm + [k for run in runs for k in ks[run]],
            "processes": processes,
        }
        proc = context.Process(target=engine_process, args=(theirs, settings), name=f"engine-{mode}")
        proc.start()
        pids: list[int] = []
        try:
            if not ours.poll(300):
                raise TimeoutError("the engine did not start")
            _, port, out["start"], pids = ours.recv()
            if warm:  # each validation process's first documents are slower: WARMUP for each, at once
                await send_reports(port, warm, max(1, processes))
            await paced_orders(port, base_k, args.order_interval, 20, None)
            out["orders_alone"] = await paced_orders(port, base_k + 100, args.order_interval, args.orders, None)
            for run in runs:
                progress(f"part 2: engine {mode}, {run} ({n} reports)")
                if run == "concurrent":
                    stop = asyncio.Event()
                    orders = asyncio.create_task(
                        paced_orders(port, base_k + 100 + args.orders, args.order_interval, 0, stop)
                    )
                    await asyncio.sleep(args.order_interval * 5)  # the orders are flowing when the reports start
                    out[run] = await send_reports(port, ks[run], 1)
                    stop.set()
                    out["orders_during"] = await orders
                else:
                    out[run] = await send_reports(port, ks[run], int(run[1:]))
            if runs:
                db = Path(data_dir) / "ris-orders.reports.sqlite"
                with contextlib.closing(sqlite3.connect(db)) as c:
                    out["documents"] = c.execute("SELECT count(*) FROM documents").fetchone()[0]
                assert out["documents"] == len(warm) + n * len(runs), out["documents"]
        finally:
            with contextlib.suppress(OSError, BrokenPipeError):
                ours.send("stop")
            if ours.poll(60):
                with contextlib.suppress(EOFError):
                    ours.recv()
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            for pid in pids:  # the validator's worker, should the engine not have stopped it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)
            ours.close()
            theirs.close()
    return out


def engine_name(r: dict[str, Any]) -> str:
    names = {
        "disabled": "reports disabled (orders only)",
        "off": "validation off",
        "thread": "CDAValidator in engine thread",
    }
    return names.get(r["mode"]) or f"ProcessValidator x{r['processes']} process(es)"


def print_part2(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    print(
        f"\n2. End to end over MLLP: Runtime in its own process (orders and worklist channels, embedded bus, uvloop), "
        f"{args.reports} reports per row"
    )
    print("   (+ warm-up), every ACK AA; reports/s = reports / (first send → last ACK); per core: reports/s divided by")
    print(f"   the validation processes (at most the {cores} core(s) the bench may use)")
    columns = f"{'conns':>5} {'reports/s':>9} {'per core':>8} {'ACK p50 ms':>10} {'p99 ms':>8} {'max ms':>8}"
    print(f"{'reports validation':34} {columns}  note")
    for r in runs:
        keys = [*sorted((k for k in r if re.fullmatch(r"r\d+", k)), key=lambda k: int(k[1:])), "concurrent"]
        for run in keys:
            if run not in r:
                continue
            conns, note = (1, "orders paced on another conn") if run == "concurrent" else (int(run[1:]), "")
            elapsed, lat = r[run]
            rate = len(lat) / elapsed
            per_core = f"{rate / min(r['processes'], cores):8.1f}" if r["processes"] else f"{'-':>8}"
            print(
                f"{engine_name(r):34} {conns:>5} {rate:9.1f} {per_core} {ms(pct(lat, 50), 10)} "
                f"{ms(pct(lat, 99), 8)} {ms(max(lat), 8)}  {note}"
            )
    print(
        f"\n   ORM^O01 order ACK latency, one order every {args.order_interval * 1000:.0f} ms on its own connection, "
        "alone and while reports flow (1 connection)"
    )
    print(f"{'reports validation':34} {'orders':>7} {'alone p50':>10} {'p99':>8} {'during':>7} {'p50':>8} {'p99':>8}")
    for r in runs:
        alone, during = r["orders_alone"], r.get("orders_during")
        cells = f"{len(during):>7} {ms(pct(during, 50), 8)} {ms(pct(during, 99), 8)}" if during else f"{'-':>7}"
        print(f"{engine_name(r):34} {len(alone):>7} {ms(pct(alone, 50), 10)} {ms(pct(alone, 99), 8)} {cells}")
    starts = ", ".join(f"{engine_name(r)} {r['start']:.1f} s" for r in runs if r["mode"] in ("process", "thread"))
    print(f"   engine start (Runtime.start, schematrons compiled before the listener opens): {starts}")


# -- part 3: the validator's cost per document -------------------------------------------------------------------


def naive_once(validator: Any, xsd: Any, data: bytes, path: Path, schematrons: tuple[str, ...]) -> float:
    """As bench/cda_validate.py: XSD (schema loaded once), then per schematron a new processor, a compile of the
    already generated XSLT, a transform and a regex over the SVRL."""
    from lxml import etree
    from saxonche import PySaxonProcessor

    from traboule.formats.cda_validation import COMPILED_SUFFIX

    start = time.perf_counter()
    xsd.validate(etree.fromstring(data).getroottree())
    for sch in schematrons:
        xsl = validator.work / "schematrons" / (sch.removesuffix(".sch") + COMPILED_SUFFIX)
        with PySaxonProcessor(license=False) as proc:
            svrl = (
                proc.new_xslt30_processor()
                .compile_stylesheet(stylesheet_file=str(xsl))
                .transform_to_string(source_file=str(path))
            )
        re.findall(r"<svrl:failed-assert.*?<svrl:text>(.*?)</svrl:text>", svrl, re.S)
    return time.perf_counter() - start


def part3(args: argparse.Namespace, validator: Any, document: bytes, workdir: Path) -> dict[str, Any]:
    from lxml import etree

    from traboule.formats.cda_validation import XSD

    progress(f"part 3: validator cost per document ({args.runs} runs, naive {args.naive_runs})")
    path = workdir / "level3.xml"
    path.write_bytes(document)
    steps: dict[str, list[float]] = {}
    totals = []
    report = validator.validate(document)
    assert report.valid, report.summary()
    for _ in range(args.runs):
        start = time.perf_counter()
        report = validator.validate(document)
        totals.append(time.perf_counter() - start)
        assert report.valid, report.summary()
        for key, value in report.timings.items():
            steps.setdefault(key, []).append(value)
    xsd = etree.XMLSchema(etree.parse(str(validator.work / XSD)))
    naive = [naive_once(validator, xsd, document, path, report.schematrons) for _ in range(args.naive_runs)]
    return {"steps": steps, "totals": totals, "naive": naive, "report": report, "size": len(document)}


def print_part3(r: dict[str, Any], args: argparse.Namespace, process_validate: list[float]) -> None:
    report, steps, totals = r["report"], r["steps"], r["totals"]
    print(
        f"\n3. Validator cost per document: the level-3 CDA traboule generates ({r['size'] / 1024:.1f} KiB, "
        f"{report.document}), ms over {args.runs} runs"
    )
    total_p50 = pct(totals, 50)
    print(f"{'step':40} {'p50':>9} {'p99':>9} {'share':>6}")
    for key in ("parse", "xsd", "saxon-parse", *report.schematrons):
        share = pct(steps[key], 50) / total_p50 * 100
        print(f"{short(key):40} {ms(pct(steps[key], 50))} {ms(pct(steps[key], 99))} {share:5.1f}%")
    sch = [sum(steps[s][i] for s in report.schematrons) for i in range(len(totals))]
    print(f"{'(all schematrons)':40} {ms(pct(sch, 50))} {ms(pct(sch, 99))} {pct(sch, 50) / total_p50 * 100:5.1f}%")
    print(f"{'CDAValidator.validate() total':40} {ms(total_p50)} {ms(pct(totals, 99))}")
    if process_validate:
        print(
            f"{'ProcessValidator.validate() (part 1)':40} {ms(pct(process_validate, 50))} "
            f"{ms(pct(process_validate, 99))}"
        )
    naive = r["naive"]
    print(f"{f'naive, {args.naive_runs} runs (p50, max)':40} {ms(pct(naive, 50))} {ms(max(naive))}")
    print(f"ratio naive / CDAValidator (p50): {pct(naive, 50) / total_p50:.0f}x")


# -- main -------------------------------------------------------------------------------------------------------


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--reports", type=int, default=200, help="reports per timed run (default 200)")
    parser.add_argument("--orders", type=int, default=200, help="paced orders sent alone (default 200)")
    parser.add_argument("--order-interval", type=float, default=0.02, help="seconds between orders (default 0.02)")
    parser.add_argument("--runs", type=int, default=50, help="validations of the document in part 3")
    parser.add_argument("--naive-runs", type=int, default=3)
    parser.add_argument("--validators", type=Path, default=STANDARDS / "ans-testcontenucda")
    parser.add_argument("--cache", type=Path, help="schematron cache to use (default: a fresh temporary one)")
    parser.add_argument("--skip", default="", help="parts to skip: 2 and/or 3 (part 1 always runs)")
    cores = len(os.sched_getaffinity(0))
    parser.add_argument(
        "--processes",
        default=",".join(str(n) for n in dict.fromkeys((1, 2, cores))),
        help=f"validation processes of the engine rows of part 2 (default 1,2 and the cores: {cores})",
    )
    args = parser.parse_args()
    args.validators = args.validators.resolve()
    args.cache_given = args.cache is not None
    skip = set(args.skip.replace(",", " ").split())
    header = machine()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="reports-bench-")))
        cache = args.cache or workdir / "cda-cache"  # removed with workdir
        results, startup, validator = part1(args, cache, workdir)
        process_validate = results[2]["validate"]
        r3 = part3(args, validator, results[1]["document"], workdir) if "3" not in skip else None
        del validator
        engines = []
        if "2" not in skip:
            base = 1_000_000
            counts = [int(n) for n in args.processes.replace(",", " ").split()]
            modes = [("disabled", 1), ("off", 1), *(("process", n) for n in counts), ("thread", 1)]
            for mode, processes in modes:
                engines.append(await engine_run(mode, args, cache, base, processes))
                base += 1_000_000
    print(header)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print_part1(results, startup, args.reports)
    if engines:
        print_part2(engines, args)
    if r3 is not None:
        print_part3(r3, args, process_validate)
    print(f"\n(bench ran {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
