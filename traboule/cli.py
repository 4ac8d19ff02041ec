"""``traboule`` command line: run the engine, send HL7 files, look at the worklist and the journal, test mappings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop

from traboule import config as config_mod
from traboule.mapping import MappingError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="traboule", description="Imaging interoperability engine")
    parser.add_argument("--config", "-c", help="TOML configuration file (default: built-in, or $TRABOULE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the engine in the foreground")
    run.add_argument(
        "--process",
        help="run only the channels of this process (started by the main process for each 'process' name)",
    )

    send = sub.add_parser("send", help="send HL7 v2 files over MLLP and print each ACK")
    send.add_argument("files", nargs="+", type=Path)
    send.add_argument("--to", default="", help="host:port (default: the configured MLLP listener)")
    send.add_argument("--timeout", type=float, default=30.0)

    wl = sub.add_parser("worklist", help="worklist items")
    wl_sub = wl.add_subparsers(dest="action", required=True)
    wl_list = wl_sub.add_parser("list", help="list the items of a worklist channel")
    wl_list.add_argument("--channel", default="worklist")
    wl_list.add_argument("--limit", type=int, default=50)

    jr = sub.add_parser("journal", help="the message journal")
    jr_sub = jr.add_subparsers(dest="action", required=True)
    jr_show = jr_sub.add_parser("show", help="one journal entry, with its raw message")
    jr_show.add_argument("id", type=int)
    jr_list = jr_sub.add_parser("list", help="latest entries")
    jr_list.add_argument("--status", choices=["accepted", "duplicate", "rejected", "undelivered"])
    jr_list.add_argument("--limit", type=int, default=20)
    jr_prune = jr_sub.add_parser("prune", help="forget messages older than some days (their events delivered)")
    jr_prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    jr_replay = jr_sub.add_parser("replay", help="send a journaled message through the MLLP listener again")
    jr_replay.add_argument("ids", type=int, nargs="+")
    jr_replay.add_argument("--to", default="", help="host:port (default: the configured MLLP listener)")

    dlq = sub.add_parser("dlq", help="events a channel gave up on (dead-letter queue)")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser("list", help="dead letters of a channel, with their error")
    dlq_list.add_argument("--channel", default="worklist")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_replay = dlq_sub.add_parser("replay", help="put a dead letter back on its channel's queue")
    dlq_replay.add_argument("message_id")
    dlq_replay.add_argument("--channel", default="worklist")

    fhir = sub.add_parser("fhir", help="the FHIR channel's server destination")
    fhir_sub = fhir.add_subparsers(dest="action", required=True)
    fhir_resend = fhir_sub.add_parser(
        "resend", help="send every resource to the FHIR server again (after the server was restored or wiped)"
    )
    fhir_resend.add_argument("--channel", default="fhir")

    sub.add_parser("channels", help="installed channel kinds and adapters, and the configured channels")

    test = sub.add_parser("test", help="run mapping tests (input message + expected values)")
    test.add_argument("path", nargs="?", type=Path, default=None)
    test.add_argument("--inbound", type=Path, help="HL7 inbound mapping (default: the configured one)")
    test.add_argument("--mwl", type=Path, help="MWL mapping (default: the configured one)")

    sub.add_parser("check", help="load the configuration and every mapping; report errors with file and line")

    cda = sub.add_parser("cda", help="CDA documents (CI-SIS CR d'imagerie)")
    cda_sub = cda.add_subparsers(dest="action", required=True)
    cda_validate = cda_sub.add_parser(
        "validate", help="validate CDA files with the ANS testContenuCDA XSD and schematrons; exit 0 when all pass"
    )
    cda_validate.add_argument("files", nargs="+", type=Path)
    cda_validate.add_argument(
        "--validators",
        type=Path,
        help="testContenuCDA tree (default: $TRABOULE_CDA_VALIDATORS)",
    )
    cda_validate.add_argument(
        "--cache", type=Path, help="where compiled schematrons go (default: $XDG_CACHE_HOME/traboule/cda-validators)"
    )

    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](cfg, args)
    except MappingError as exc:
        print(f"mapping error: {exc}", file=sys.stderr)
        return 2
    except config_mod.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


def cmd_run(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule import logging as tlog
    from traboule.runtime import preflight

    tlog.configure(cfg.log_format, cfg.log_level, cfg.log_patient_data)
    _raise_open_files_limit()
    process = args.process or "main"
    if process != "main":
        _die_with_parent()
    else:
        try:
            # Every process's channels and mappings, before anything listens (a worker that cannot start would
            # otherwise restart in a loop behind a main process answering AA).
            preflight(cfg)
        except (config_mod.ConfigError, MappingError) as exc:
            _cannot_start(cfg, exc)
            return 2
    try:
        # uvloop: the MLLP ingest path is event-loop bound; measured ~15% more orders/s than asyncio's loop.
        uvloop.run(_run(cfg, process))
    except KeyboardInterrupt:
        pass
    except (config_mod.ConfigError, MappingError, ValueError) as exc:
        _cannot_start(cfg, exc)
        return 2
    except OSError as exc:
        _cannot_start(cfg, exc)
        return 1
    return 0


def _cannot_start(cfg: config_mod.Config, exc: BaseException) -> None:
    """Why the engine does not start: one JSON line with the JSON log format (the log stays parseable), a plain
    line otherwise. The text is a configuration or bind error (file, line, address): no message data."""
    text = f"cannot start: {exc}"
    if cfg.log_format == "json":
        from traboule import logging as tlog

        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = {"event": "engine.cannot_start", "level": "error", "timestamp": stamp, "message": text}
        tlog.write_line(json.dumps(line, ensure_ascii=False))
    else:
        print(text, file=sys.stderr)


def _raise_open_files_limit() -> None:
    """Up to the hard limit: the listeners' connection caps (HTTP 1,000, MLLP and DICOM 64 each) and the stores'
    files must fit under it; many systems start processes with a soft limit of 1,024."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


PARENT_PID_VARIABLE = "TRABOULE_PARENT_PID"


def _die_with_parent() -> None:
    """A child process ends with the main one, even when that one is killed (-9): otherwise the orphan keeps the
    MWL and HTTP ports and the next start cannot bind them (while /health, answered by the orphan, says ok)."""
    expected = int(os.environ.get(PARENT_PID_VARIABLE, "0") or 0)
    with contextlib.suppress(Exception):  # Linux: the kernel sends SIGTERM when the parent dies
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if expected and os.getppid() != expected:  # the parent died before prctl took effect
        sys.exit(0)


async def _watch_parent(stop: asyncio.Event) -> None:
    """The portable half of `_die_with_parent`: stop once the parent is gone (re-parented to another pid)."""
    expected = int(os.environ.get(PARENT_PID_VARIABLE, "0") or 0)
    while expected and not stop.is_set():
        if os.getppid() != expected:
            stop.set()
            return
        await asyncio.sleep(1.0)


async def _run(cfg: config_mod.Config, process: str) -> None:
    import structlog

    from traboule.http import create_app, serve
    from traboule.runtime import ProcessState, Runtime

    log = structlog.get_logger("traboule").bind(process=process)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_parent(stop)) if process != "main" else None
    runtime = Runtime(cfg, process=process)
    # SIGTERM is honoured at any moment, the start included (a validator warming, a child slow to come up).
    if not await _until_stopped(runtime.start(), stop):
        log.info("engine.stopped_while_starting")
        await runtime.stop()
        return
    names = cfg.processes()
    http_port = cfg.http_port + names.index(process) if process in names else cfg.http_port
    try:
        server = await serve(create_app(runtime), cfg.http_host, http_port, cfg.http_limits)
    except BaseException:
        await runtime.stop()
        raise
    log.info("http.listening", host=cfg.http_host, port=http_port, paths=["/health", "/metrics", "/channels"])
    children: list[asyncio.Task] = []
    if process == "main":
        for name in names[1:]:
            state = runtime.processes[name] = ProcessState(name, cfg.http_port + names.index(name))
            children.append(asyncio.create_task(_supervise(cfg, state, stop), name=f"supervise-{name}"))
        _write_engine_file(cfg, runtime)
        ready = asyncio.create_task(_all_ready(runtime, timeout=60))
        await _until_stopped(ready, stop)
        late = [n for n, p in runtime.processes.items() if p.state != "ready"]
        if late and not stop.is_set():
            log.warning("process.not_ready", processes=late)
    if not stop.is_set():
        log.info(
            "engine.ready",
            bus="rabbitmq" if cfg.amqp_url else "embedded",
            data_dir=str(runtime.data_dir),
            processes=names if process == "main" else [process],
        )
        await stop.wait()
    log.info("engine.stopping")
    await asyncio.gather(*children, return_exceptions=True)
    if watcher is not None:
        watcher.cancel()
    server.should_exit = True
    with contextlib.suppress(Exception):
        await server.task
    await runtime.stop()


async def _until_stopped(work: Any, stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` comes first (then cancel it); True when it finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if task.done():
        task.result()  # a start failure is raised here
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return False


async def _all_ready(runtime: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while any(p.state != "ready" for p in runtime.processes.values()):
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.05)


async def _supervise(cfg: config_mod.Config, state: Any, stop: asyncio.Event) -> None:
    """Run ``traboule run --process NAME`` as a child; restart it if it dies; stop it with the engine.

    The child is ready once its ``/health/live`` answers with its own pid (not an orphan of an earlier run on the
    port). Restarts wait ``restart_backoff`` seconds, doubling up to ``restart_backoff_max``, and start again from
    the first delay once a child stayed ready for ``restart_reset_after`` seconds.
    """
    import httpx
    import structlog

    log = structlog.get_logger("traboule").bind(process=state.name)
    command = [
        sys.executable,
        "-m",
        "traboule.cli",
        *(["--config", cfg.path] if cfg.path else []),
        "run",
        "--process",
        state.name,
    ]
    env = dict(os.environ, **{PARENT_PID_VARIABLE: str(os.getpid())})
    host, token = config_mod.client_host(cfg.http_host), cfg.api_headers()
    delay = cfg.restart_backoff
    while not stop.is_set():
        child = await asyncio.create_subprocess_exec(*command, env=env)
        state.pid, ready_at = child.pid, None
        state.set("starting")
        log.info("process.started", pid=child.pid)
        waiter = asyncio.create_task(child.wait())
        async with httpx.AsyncClient(timeout=1.0, headers=token) as client:
            while not waiter.done() and not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    answer = await client.get(f"http://{host}:{state.port}/health/live")
                    if answer.status_code == 200 and answer.json().get("pid") == child.pid:
                        state.set("ready")
                        ready_at = time.monotonic()
                        break
                await asyncio.sleep(0.05)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            if child.returncode is None:
                child.terminate()
                try:
                    await asyncio.wait_for(waiter, 20)
                except TimeoutError:
                    child.kill()
                    await waiter
            state.last_exit = child.returncode
            state.set("stopped")
            log.info("process.stopped", pid=child.pid, returncode=child.returncode)
            return
        stopper.cancel()
        if ready_at is not None and time.monotonic() - ready_at >= cfg.restart_reset_after:
            delay = cfg.restart_backoff  # it ran well for a while: this crash is not part of a crash loop
        state.last_exit, state.restarts = child.returncode, state.restarts + 1
        state.set("restarting")
        log.error("process.exited", pid=child.pid, returncode=child.returncode, restart_in=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, cfg.restart_backoff_max)


ENGINE_FILE = "engine.json"


def _write_engine_file(cfg: config_mod.Config, runtime: Any) -> None:
    """What the running engine talks to, for the other commands to compare with their own configuration."""
    info = {
        "pid": os.getpid(),
        "bus": _bus_description(cfg),
        "mllp": _mllp_address(cfg),
        "http": f"{cfg.http_host}:{cfg.http_port}",
        "config": cfg.path,
    }
    path = Path(cfg.data_dir) / ENGINE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)


def _last_engine(cfg: config_mod.Config) -> dict[str, Any] | None:
    """The engine that last ran on this data folder, as it described itself at start (``running`` added); None
    when none ever did. Kept after it stops: its dead letters stay where it left them."""
    try:
        info = json.loads((Path(cfg.data_dir) / ENGINE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    try:
        os.kill(int(info["pid"]), 0)
        info["running"] = True
    except (OSError, ValueError, KeyError, TypeError):
        info["running"] = False
    return info


def _bus_description(cfg: config_mod.Config) -> str:
    """Where the bus is, without credentials: ``rabbitmq amqp://host:port/vhost exchange X`` or the embedded file."""
    if not cfg.amqp_url:
        return f"embedded {Path(cfg.data_dir).resolve() / 'bus.sqlite'}"
    from urllib.parse import urlsplit

    url = urlsplit(cfg.amqp_url)
    where = f"{url.scheme}://{url.hostname or 'localhost'}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"
    return f"rabbitmq {where}{url.path or '/'} exchange {cfg.exchange}"


def _mllp_address(cfg: config_mod.Config) -> str:
    """host:port of the first configured MLLP listener (empty when none)."""
    for channel in cfg.channels:
        source = channel.get("source") or {}
        if isinstance(source, dict) and source.get("adapter") == "mllp-listener":
            return f"{source.get('host', '127.0.0.1')}:{source.get('port', 2575)}"
    return ""


def _same_bus(cfg: config_mod.Config) -> str | None:
    """None when the engine of this data folder (running, or the last one that ran) uses the bus this command
    would open; else why not."""
    engine = _last_engine(cfg)
    if engine is None:
        if not cfg.amqp_url and not (Path(cfg.data_dir) / "bus.sqlite").exists():
            return f"no engine has run on {cfg.data_dir}: no bus to read (--config, TRABOULE_DATA_DIR?)"
        return None
    if engine.get("bus") == _bus_description(cfg):
        return None
    where = cfg.data_dir
    state = f"running on {where} (pid {engine.get('pid')})" if engine["running"] else f"last run on {where}"
    return (
        f"the engine {state} uses the bus {engine.get('bus')}, this command would read {_bus_description(cfg)}: "
        "give it the engine's configuration (--config, TRABOULE_AMQP_URL)"
    )


def cmd_send(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from adapters.mllp import MLLPClient

    to = args.to or _local(_mllp_address(cfg))
    if not to:
        print("no MLLP listener in the configuration: give --to host:port", file=sys.stderr)
        return 2
    host, _, port = to.rpartition(":")
    print(f"sending to mllp://{host or '127.0.0.1'}:{port}", file=sys.stderr)

    async def go() -> int:
        worst = 0
        async with MLLPClient(host or "127.0.0.1", int(port), timeout=args.timeout) as client:
            for path in args.files:
                ack = await client.send(path.read_bytes())
                text = ack.decode("utf-8", "replace")
                code = _ack_code(text)
                print(f"{path}: {code}")
                for line in text.replace("\n", "\r").split("\r"):
                    if line:
                        print(f"  {line}")
                if code not in ("AA", "CA"):
                    worst = 1
        return worst

    try:
        return asyncio.run(go())
    except asyncio.IncompleteReadError:
        print(f"cannot send to {to}: the listener closed the connection without an answer", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as exc:
        print(f"cannot send to {to}: {exc or type(exc).__name__}", file=sys.stderr)
        return 2


def _local(address: str) -> str:
    """A listener's address as a client on this machine reaches it (0.0.0.0 / :: listen everywhere)."""
    host, _, port = address.rpartition(":")
    return f"{config_mod.client_host(host)}:{port}" if port else address


def _ack_code(text: str) -> str:
    for line in text.replace("\n", "\r").split("\r"):
        if line.startswith("MSA"):
            return line.split(line[3])[1] if len(line) > 4 else ""
    return "no MSA"


def _channel_db(cfg: config_mod.Config, name: str, suffix: str) -> Path:
    """A store of the engine's data folder, said on stderr (the command reads the configuration as ``run`` does)."""
    path = Path(cfg.data_dir) / f"{name}{suffix}"
    if not path.exists():
        raise config_mod.ConfigError(f"{path} does not exist (has the engine run with data_dir={cfg.data_dir}?)")
    print(f"reading {path.resolve()}", file=sys.stderr)
    return path


def cmd_worklist(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.worklist import WorklistStore

    store = WorklistStore(str(_channel_db(cfg, args.channel, ".sqlite")))
    rows = list(store.all(limit=args.limit))
    print(f"{store.count()} item(s) in worklist {args.channel!r}")
    for key, ds in rows:
        sps = ds.ScheduledProcedureStepSequence[0] if ds.get("ScheduledProcedureStepSequence") else None
        print(
            " | ".join(
                [
                    str(ds.get("AccessionNumber", "")),
                    str(ds.get("PatientID", "")),
                    str(ds.get("PatientName", "")),
                    str(sps.get("Modality", "")) if sps else "",
                    str(sps.get("ScheduledStationAETitle", "")) if sps else "",
                    f"{sps.get('ScheduledProcedureStepStartDate', '')} {sps.get('ScheduledProcedureStepStartTime', '')}"
                    if sps
                    else "",
                    str(sps.get("ScheduledProcedureStepStatus", "")) if sps else "",
                    key,
                ]
            )
        )
    return 0


def cmd_journal(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.journal import Journal

    _channel_db(cfg, "journal", ".sqlite")
    journal = Journal(Path(cfg.data_dir) / "journal.sqlite")
    try:
        if args.action == "show":
            entry = journal.get(args.id)
            if entry is None:
                print(f"no journal entry {args.id}", file=sys.stderr)
                return 1
            for name, value in vars(entry).items():
                if name != "raw":
                    print(f"{name:16} {value}")
            print("raw:")
            print(entry.raw.decode("utf-8", "replace").replace("\r", "\n"))
        elif args.action == "prune":
            if args.older_than <= 0:
                print("--older-than must be a positive number of days", file=sys.stderr)
                return 1
            before = (datetime.now(UTC) - timedelta(days=args.older_than)).isoformat(timespec="milliseconds")
            print(f"{journal.prune(before)} message(s) received before {before} forgotten")
        elif args.action == "replay":
            return _replay(cfg, journal, args)
        else:
            for entry in journal.recent(args.limit, args.status):
                print(
                    f"{entry.id:>8} {entry.received} {entry.channel:12} {entry.message_type:8} "
                    f"{entry.control_id:20} {entry.status:11} {entry.ack_code} {entry.error.partition(chr(10))[0]}"
                )
    finally:
        journal.close()
    return 0


def _replay(cfg: config_mod.Config, journal: object, args: argparse.Namespace) -> int:
    from adapters.mllp import MLLPClient

    to = args.to or _local(_mllp_address(cfg))
    host, _, port = to.rpartition(":")
    entries = [journal.get(i) for i in args.ids]  # type: ignore[attr-defined]
    missing = [i for i, e in zip(args.ids, entries, strict=True) if e is None]
    if missing or not port:
        print(f"no journal entry {missing}" if missing else "no MLLP listener configured: give --to", file=sys.stderr)
        return 1
    print(f"sending to mllp://{host or '127.0.0.1'}:{port}", file=sys.stderr)

    async def go() -> int:
        worst = 0
        async with MLLPClient(host or "127.0.0.1", int(port)) as client:
            for entry in entries:
                code = _ack_code((await client.send(entry.raw)).decode("utf-8", "replace"))
                print(f"journal entry {entry.id}: {code}")
                worst = worst or (0 if code == "AA" else 1)
        return worst

    return asyncio.run(go())


def cmd_dlq(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.bus import make_bus

    refusal = _same_bus(cfg)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    print(f"bus: {_bus_description(cfg)}", file=sys.stderr)

    async def go() -> int:
        bus = make_bus(cfg.amqp_url, cfg.data_dir, exchange=cfg.exchange)
        await bus.start()
        try:
            try:
                await bus.wait_connected(10.0)
            except ConnectionError as exc:
                print(f"cannot reach the bus {_bus_description(cfg)}: {exc}", file=sys.stderr)
                return 2
            if args.action == "list":
                letters = await bus.dead_letters(args.channel, args.limit)
                print(f"{len(letters)} dead letter(s) for channel {args.channel!r}")
                for d in letters:
                    print(f"{d.message_id}  {d.topic:14} attempts={d.attempt}  {d.headers.get('x-error', '')}")
                return 0
            replayed = await bus.replay_dead_letter(args.channel, args.message_id)
            print("replayed" if replayed else f"no dead letter {args.message_id} for channel {args.channel!r}")
            return 0 if replayed else 1
        finally:
            await bus.close()

    return asyncio.run(go())


def cmd_fhir(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``fhir resend``: forget what the server holds and queue every resource for the running engine to push."""
    from channels.fhir_push import push_message, push_topic
    from traboule.bus import make_bus
    from traboule.fhir_store import FHIRStore

    channel = next((c for c in cfg.channels if c["name"] == args.channel and c["kind"] == "fhir"), None)
    if channel is None or not channel.get("destination"):
        print(f"no fhir channel {args.channel!r} with a destination in the configuration", file=sys.stderr)
        return 1
    refusal = _same_bus(cfg)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    print(f"bus: {_bus_description(cfg)}", file=sys.stderr)
    store = FHIRStore(str(Path(cfg.data_dir) / f"{args.channel}.sqlite"))

    async def go() -> int:
        bus = make_bus(cfg.amqp_url, cfg.data_dir, exchange=cfg.exchange)
        await bus.start()
        try:
            try:
                await bus.wait_connected(10.0)
            except ConnectionError as exc:
                print(f"cannot reach the bus {_bus_description(cfg)}: {exc}", file=sys.stderr)
                return 2
            keys = store.forget_remote()
            stamp = int(time.time())
            for start in range(0, len(keys), 8):
                chunk = keys[start : start + 8]
                await bus.publish(push_topic(args.channel), push_message(chunk), message_id=f"resend-{stamp}-{start}")
        finally:
            await bus.close()
        print(f"{len(keys)} resource(s) queued for {channel['destination'].get('base_url', '')}")
        return 0

    try:
        return asyncio.run(go())
    finally:
        store.close()


def cmd_channels(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.runtime import installed

    print("installed channel kinds:")
    for name, target in sorted(installed("traboule.channels").items()):
        print(f"  {name:20} {target}")
    print("installed adapters:")
    for name, target in sorted(installed("traboule.adapters").items()):
        print(f"  {name:20} {target}")
    print(f"configured channels ({cfg.path or 'built-in defaults'}):")
    for ch in cfg.channels:
        print(
            f"  {ch['name']:20} kind={ch['kind']} "
            + json.dumps({k: v for k, v in ch.items() if k not in ("name", "kind")})
        )
    return 0


def cmd_test(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.mapping_tests import run

    inbound, mwl = args.inbound, args.mwl
    for ch in cfg.channels:
        if ch["kind"] == "hl7-orders" and inbound is None:
            inbound = config_mod.resolve(cfg, ch.get("mapping", "mappings/hl7_inbound.yaml"))
        if ch["kind"] == "worklist" and mwl is None:
            mwl = config_mod.resolve(cfg, ch.get("mapping", "mappings/mwl.yaml"))
    path = args.path or config_mod.resolve(cfg, "mappings/tests")
    results = run(path, inbound, mwl)
    failed = [r for r in results if not r.ok]
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'} {r.file}")
        for f in r.failures:
            print(f"     {f}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


def cmd_check(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """Build every channel (mappings, tables, certificates, settings) as ``run`` does before anything listens."""
    from traboule.runtime import preflight

    for checked in preflight(cfg):
        print(f"ok  {checked}")
    return 0


def cmd_cda(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``cda validate``: one OK/FAIL line per file, then its failures. Exit 0 when all pass, 1 when one fails,
    2 when the validator tree is missing or broken."""
    from traboule import logging as tlog
    from traboule.cda_validation import UPSTREAM_REPO, CDAValidator, CDAValidatorError, default_tree

    tlog.configure(cfg.log_format, cfg.log_level, cfg.log_patient_data)  # compile progress goes to stderr
    tree = args.validators or default_tree()
    if tree is None:
        print(
            "no CDA validator tree: pass --validators PATH or set TRABOULE_CDA_VALIDATORS to a checkout of "
            f"https://github.com/{UPSTREAM_REPO} (it is not shipped with traboule)",
            file=sys.stderr,
        )
        return 2
    try:
        validator = CDAValidator(tree, args.cache)
        worst = 0
        for path in args.files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                print(f"FAIL {path}: cannot read: {exc.strerror}")
                worst = 1
                continue
            report = validator.validate(data, source=str(path))
            print(report.summary())
            worst = worst or (0 if report.valid else 1)
        return worst
    except CDAValidatorError as exc:
        print(f"CDA validators: {exc}", file=sys.stderr)
        return 2


COMMANDS = {
    "run": cmd_run,
    "send": cmd_send,
    "worklist": cmd_worklist,
    "journal": cmd_journal,
    "channels": cmd_channels,
    "dlq": cmd_dlq,
    "fhir": cmd_fhir,
    "test": cmd_test,
    "check": cmd_check,
    "cda": cmd_cda,
}

if __name__ == "__main__":
    sys.exit(main())
