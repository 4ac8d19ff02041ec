"""``traboule`` command line: run the engine, send HL7 files, look at the worklist and the journal, test mappings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import uvloop

from traboule import stores
from traboule.app import config as config_mod
from traboule.bus import Bus
from traboule.errors import CDAValidatorError, MappingError, NotPublished, ScaffoldError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


def build_parser() -> argparse.ArgumentParser:
    """The command line: a sub-command per row of ``SUBCOMMANDS`` (run by its ``COMMANDS`` handler)."""
    parser = argparse.ArgumentParser(prog="traboule", description="Imaging interoperability engine")
    parser.add_argument("--config", "-c", help="TOML configuration file (default: built-in, or $TRABOULE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if add_arguments is not None:
            add_arguments(command)
    return parser


def _actions(command: argparse.ArgumentParser, dest: str = "action") -> Any:
    """The sub-commands of a command group (``traboule journal show``...), one of which is required."""
    return command.add_subparsers(dest=dest, required=True)


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--process",
        help="run only the channels of this process (started by the main process for each 'process' name)",
    )


def _send_arguments(send: argparse.ArgumentParser) -> None:
    send.add_argument("files", nargs="+", type=Path)
    send.add_argument("--to", default="", help="host:port (default: the configured MLLP listener)")
    send.add_argument("--timeout", type=float, default=30.0)
    _client_tls_arguments(send)


def _client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """TLS of an MLLP client command: on by itself towards the configured listener when it has TLS."""
    tls = parser.add_argument_group("TLS (default: as the configured listener, when --to is not given)")
    tls.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca, --cert, --server-name)")
    tls.add_argument("--ca", default="", help="PEM CAs the listener's certificate is checked against")
    tls.add_argument("--cert", default="", help="PEM client certificate, for a listener that asks for one")
    tls.add_argument("--key", default="", help="PEM private key of --cert")
    tls.add_argument("--server-name", default="", help="name checked in the listener's certificate (SNI)")


def _worklist_arguments(wl: argparse.ArgumentParser) -> None:
    wl_list = _actions(wl).add_parser("list", help="list the items of a worklist channel")
    wl_list.add_argument("--channel", default="worklist")
    wl_list.add_argument("--limit", type=int, default=50)


def _journal_arguments(jr: argparse.ArgumentParser) -> None:
    jr_sub = _actions(jr)
    jr_show = jr_sub.add_parser("show", help="one journal entry, with its raw message")
    jr_show.add_argument("id", type=int)
    jr_list = jr_sub.add_parser("list", help="latest entries")
    jr_list.add_argument("--status", choices=["accepted", "duplicate", "rejected", "undelivered"])
    jr_list.add_argument("--limit", type=int, default=20)
    jr_prune = jr_sub.add_parser("prune", help="forget messages older than some days (their events delivered)")
    jr_prune.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    jr_search = jr_sub.add_parser(
        "search", help="entries by time, status, type, channel, MSH-10, accession number, patient id or text"
    )
    jr_search.add_argument("--since", default="", help="ISO 8601 UTC (2026-03-01 or 2026-03-01T08:00:00Z), included")
    jr_search.add_argument("--until", default="", help="ISO 8601 UTC, excluded")
    jr_search.add_argument("--status", action="append", default=[], help="accepted, duplicate, rejected, undelivered")
    jr_search.add_argument("--type", action="append", default=[], help="message type: ORM^O01, or ORM for all")
    jr_search.add_argument("--channel", action="append", default=[])
    jr_search.add_argument("--control-id", default="", help="MSH-10, exact")
    jr_search.add_argument("--accession", default="", help="accession, placer or filler order number, exact")
    jr_search.add_argument("--patient", default="", help="patient identifier (IPP or INS), exact")
    jr_search.add_argument("--text", default="", help="text of the raw message, any case (3 characters or more)")
    jr_search.add_argument("--limit", type=int, default=20)
    jr_search.add_argument("--before", type=int, default=0, help="entries with a lower id (the next page)")
    jr_replay = jr_sub.add_parser("replay", help="send a journaled message through the MLLP listener again")
    jr_replay.add_argument("ids", type=int, nargs="+")
    jr_replay.add_argument("--to", default="", help="host:port (default: the configured MLLP listener)")
    _client_tls_arguments(jr_replay)
    jr_reprocess = jr_sub.add_parser(
        "reprocess",
        help="map journaled messages again with today's mappings and deliver their events to chosen channels only",
    )
    _reprocess_arguments(jr_reprocess)


def _reprocess_arguments(jr_reprocess: argparse.ArgumentParser) -> None:
    jr_reprocess.add_argument("ids", nargs="*", help="journal ids or ranges: 12 10-20 30,31")
    jr_reprocess.add_argument("--type", action="append", default=[], help="message type: ORM^O01, or ORM for all")
    jr_reprocess.add_argument("--since", default="", help="received from (UTC date or date-time, included)")
    jr_reprocess.add_argument("--until", default="", help="received before (UTC; a date includes that day)")
    jr_reprocess.add_argument(
        "--status",
        action="append",
        default=[],
        help="accepted (default with filters; with ids, duplicate too), duplicate, rejected (only when named)",
    )
    jr_reprocess.add_argument("--channel", action="append", default=[], help="the inbound channel that received it")
    jr_reprocess.add_argument("--to", default="", help="channels that get the events, e.g. fhir,worklist")
    jr_reprocess.add_argument("--dry-run", action="store_true", help="print what would change; change nothing")
    jr_reprocess.add_argument("--resume", action="store_true", help="continue the interrupted run")
    jr_reprocess.add_argument("--max", type=int, default=0, help="stop after this many messages (then --resume)")


def _dlq_arguments(dlq: argparse.ArgumentParser) -> None:
    dlq_sub = _actions(dlq)
    dlq_list = dlq_sub.add_parser("list", help="dead letters of a channel, with their error")
    dlq_list.add_argument("--channel", default="worklist")
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_replay = dlq_sub.add_parser("replay", help="put a dead letter back on its channel's queue")
    dlq_replay.add_argument("message_id")
    dlq_replay.add_argument("--channel", default="worklist")


def _fhir_arguments(fhir: argparse.ArgumentParser) -> None:
    fhir_resend = _actions(fhir).add_parser(
        "resend", help="send every resource to the FHIR server again (after the server was restored or wiped)"
    )
    fhir_resend.add_argument("--channel", default="fhir")


def _test_arguments(test: argparse.ArgumentParser) -> None:
    test.add_argument("path", nargs="?", type=Path, default=None)
    test.add_argument("--inbound", type=Path, help="HL7 inbound mapping (default: the configured one)")
    test.add_argument("--mwl", type=Path, help="MWL mapping (default: the configured one)")
    test.add_argument("--fhir", type=Path, help="FHIR mapping (default: the configured one)")
    test.add_argument("--cda", type=Path, help="CDA mapping (default: the configured one)")
    test.add_argument(
        "--validators", type=Path, help="testContenuCDA tree for 'valid' checks (default: $TRABOULE_CDA_VALIDATORS)"
    )


def _codes_arguments(codes: argparse.ArgumentParser) -> None:
    codes_unmapped = _actions(codes).add_parser(
        "unmapped", help="procedure codes of journaled orders and reports without a row in the CDA acts table"
    )
    codes_unmapped.add_argument("--since", help="only messages received since this date (YYYY-MM-DD or ISO 8601)")
    codes_unmapped.add_argument("--channel", help="only this inbound channel (default: every hl7-orders channel)")


def _model_arguments(model: argparse.ArgumentParser) -> None:
    model.add_argument("--markdown", action="store_true", help="as Markdown (the section of docs/plugins.md)")
    model.add_argument("--update", type=Path, metavar="FILE", help="rewrite the generated section of FILE in place")


def _new_arguments(new: argparse.ArgumentParser) -> None:
    new_channel = _actions(new, dest="what").add_parser(
        "channel", help="a channel kind: pyproject with its entry point, a documented module, README and a test"
    )
    new_channel.add_argument("name", help="the channel kind, lower-case words joined by '-' (e.g. audit-log)")
    new_channel.add_argument(
        "--dir", type=Path, default=Path("."), help="where the package folder traboule-NAME is made (default: here)"
    )


def _cda_arguments(cda: argparse.ArgumentParser) -> None:
    cda_sub = _actions(cda)
    cda_validate = cda_sub.add_parser(
        "validate", help="validate CDA files with the ANS testContenuCDA XSD and schematrons; exit 0 when all pass"
    )
    cda_validate.add_argument("files", nargs="*", type=Path)
    cda_validate.add_argument(
        "--validators",
        type=Path,
        help="testContenuCDA tree (default: $TRABOULE_CDA_VALIDATORS)",
    )
    cda_validate.add_argument(
        "--cache", type=Path, help="where compiled schematrons go (default: $XDG_CACHE_HOME/traboule/cda-validators)"
    )
    cda_validate.add_argument(
        "--keep",
        type=float,
        metavar="SECONDS",
        help="keep the compiled schematrons in a background validation server (~750 MB) for the next runs, until it "
        "has been idle this long (default $TRABOULE_CDA_SERVER_IDLE, else 600; 0: compile in this process, no server)",
    )
    cda_validate.add_argument(
        "--stop", action="store_true", help="stop the validation server of the tree (and cache), then exit; no files"
    )
    cda_export = cda_sub.add_parser("export", help="write a published CDA (by document id, or by accession number)")
    cda_which = cda_export.add_mutually_exclusive_group(required=True)
    cda_which.add_argument("id", nargs="?", help="document id (the CDA's id)")
    cda_which.add_argument("--accession", help="the current version of this accession number's document set")
    cda_export.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    cda_export.add_argument("--channel", help="inbound channel that published it (default: the first with reports)")


def _reports_arguments(rp: argparse.ArgumentParser) -> None:
    rp_sub = _actions(rp)
    rp_waiting = rp_sub.add_parser("waiting", help="reports waiting for their study; dead letters (expired, invalid)")
    rp_waiting.add_argument("--all", action="store_true", help="every outcome: published, superseded, withdrawn too")
    rp_waiting.add_argument("--channel", help="inbound channel (default: the first with reports)")
    rp_publish = rp_sub.add_parser(
        "publish", help="publish a waiting report or a dead letter now, or as soon as its study is known"
    )
    rp_publish.add_argument("id", type=_report_number, help="its number in 'traboule reports waiting'")
    rp_publish.add_argument("--channel", help="inbound channel (default: the first with reports)")
    rp_publish.add_argument("--wait", type=float, default=15.0, help="seconds to wait for the engine's outcome")


def _patients_arguments(pt: argparse.ArgumentParser) -> None:
    pt_sub = _actions(pt)
    pt_show = pt_sub.add_parser("show", help="what the registry holds about an IPP (patient data: on this terminal)")
    pt_show.add_argument("ipp", help="the patient identifier (IPP) value")
    pt_forget = pt_sub.add_parser("forget", help="remove the INS recorded for an IPP (an operator's correction)")
    pt_forget.add_argument("ipp", help="the patient identifier (IPP) value")


def _alerts_arguments(alerts: argparse.ArgumentParser) -> None:
    al_list = _actions(alerts).add_parser("list", help="open incidents, then the latest resolved ones")
    al_list.add_argument("--limit", type=int, default=50)


def _db_arguments(db: argparse.ArgumentParser) -> None:
    db_sub = _actions(db)
    db_sub.add_parser("upgrade", help="create or upgrade the PostgreSQL schema of every store, print their versions")
    db_sub.add_parser("status", help="the schema version of each store: in the database and in this traboule")
    db_migrate = db_sub.add_parser(
        "migrate", help="copy an embedded site's SQLite stores into the PostgreSQL database (resumable)"
    )
    db_migrate.add_argument("--from", dest="source", help="the data folder (default: the configured one)")
    db_migrate.add_argument("--to", dest="url", help="postgresql://... (default: [database] url)")
    db_migrate.add_argument("--force", action="store_true", help="even while an engine runs on the data folder")
    db_migrate.add_argument("--quiet", action="store_true", help="no progress on stderr")
    db_migrate.add_argument("--batch-size", type=int, default=2000, help="rows per transaction (default 2000)")
    db_migrate.add_argument("--worklist", default="", help="the worklist channel to move, when there are several")
    db_migrate.add_argument("--fhir", default="", help="the fhir channel to move, when there are several")
    db_migrate.add_argument(
        "--ignore-bus", action="store_true", help="even with deliveries queued in the embedded bus (they stay there)"
    )


# Sub-command → (its line in --help, what adds its arguments and actions), in the order --help lists them.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None]] = {
    "run": ("start the engine in the foreground", _run_arguments),
    "send": ("send HL7 v2 files over MLLP and print each ACK", _send_arguments),
    "worklist": ("worklist items", _worklist_arguments),
    "journal": ("the message journal", _journal_arguments),
    "dlq": ("events a channel gave up on (dead-letter queue)", _dlq_arguments),
    "fhir": ("the FHIR channel's server destination", _fhir_arguments),
    "channels": ("installed channel kinds and adapters, and the configured channels", None),
    "test": ("run mapping tests (input messages + expected canonical, DICOM, FHIR, CDA)", _test_arguments),
    "check": ("load the configuration and every mapping; report errors with file and line", None),
    "codes": ("procedure codes seen in the journal", _codes_arguments),
    "model": ("the canonical model's reference: every Envelope and payload field", _model_arguments),
    "new": ("scaffold a plug-in package (see docs/plugins.md)", _new_arguments),
    "cda": ("CDA documents (CI-SIS CR d'imagerie)", _cda_arguments),
    "reports": ("structured reports accepted and waiting for their study, and dead letters", _reports_arguments),
    "patients": ("the patient identity registry: INS per IPP, owners of orders, merges", _patients_arguments),
    "alerts": ("alert incidents of the [alerts] rules (open and recent)", _alerts_arguments),
    "db": (
        "the PostgreSQL database ([database] url or TRABOULE_DATABASE_URL): schema versions, migration from SQLite",
        _db_arguments,
    ),
}


def cmd_run(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.app import logging as tlog
    from traboule.app.http import check_routes
    from traboule.app.runtime import preflight

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
            check_routes(cfg)
        except (config_mod.ConfigError, MappingError) as exc:
            _cannot_start(cfg, exc)
            return 2
        except ConnectionError as exc:  # the configured database does not answer
            _cannot_start(cfg, exc)
            return 1
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
        from traboule.app import logging as tlog

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

    from traboule.app.http import create_app, serve
    from traboule.app.runtime import ProcessState, Runtime

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
    http_port = cfg.http_port_of(process)
    try:
        app = create_app(runtime)
        server = await serve(app, cfg.http_host, http_port, cfg.http_limits)
    except BaseException:
        await runtime.stop()
        raise
    log.info("http.listening", host=cfg.http_host, port=http_port, paths=["/health", "/metrics", "/channels"])
    children: list[asyncio.Task] = []
    if process == "main":
        for name in names[1:]:
            state = runtime.processes[name] = ProcessState(name, cfg.http_port_of(name))
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
    if runtime.alerts is not None:  # before the children stop: their stopping is no incident
        await runtime.alerts.stop()
    await asyncio.gather(*children, return_exceptions=True)
    if watcher is not None:
        watcher.cancel()
    server.should_exit = True
    with contextlib.suppress(Exception):
        await server.task
    for forward in app.state.forwarders:
        await forward.aclose()
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

    from traboule import metrics

    log = structlog.get_logger("traboule").bind(process=state.name)
    restarts = metrics.process_restarts.labels(state.name)  # shown at 0 from the start
    command = [
        sys.executable,
        "-m",
        "traboule.app.cli",
        *(["--config", cfg.path] if cfg.path else []),
        "run",
        "--process",
        state.name,
    ]
    from traboule.app.http import INTERNAL_SECRET_VARIABLE, internal_client, internal_secret, internal_url

    # The child believes this run's internal calls by their secret (`traboule.app.http.InternalCalls`).
    env = dict(os.environ, **{PARENT_PID_VARIABLE: str(os.getpid()), INTERNAL_SECRET_VARIABLE: internal_secret()})

    token = cfg.api_headers()
    delay = cfg.restart_backoff
    while not stop.is_set():
        child = await asyncio.create_subprocess_exec(*command, env=env)
        state.pid, ready_at = child.pid, None
        state.set("starting")
        log.info("process.started", pid=child.pid)
        waiter = asyncio.create_task(child.wait())
        async with internal_client(cfg, timeout=1.0, headers=token) as client:  # https with [http] tls
            while not waiter.done() and not stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    answer = await client.get(internal_url(cfg, state.port, "/health/live"))
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
        restarts.inc()
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
    except PermissionError:  # a process of another user (the engine's service account): it runs
        info["running"] = True
    except (OSError, ValueError, KeyError, TypeError):
        info["running"] = False
    return info


def _bus_description(cfg: config_mod.Config) -> str:
    """Where the bus is, without credentials: ``rabbitmq amqp://host:port/vhost exchange X`` or the embedded file."""
    if not cfg.amqp_url:
        return f"embedded {Path(cfg.data_dir).resolve() / 'bus.sqlite'}"
    from urllib.parse import urlsplit

    brokers = []
    for one in cfg.amqp_url.split(","):
        url = urlsplit(one.strip())
        where = f"{url.scheme}://{url.hostname or 'localhost'}:{url.port or (5671 if url.scheme == 'amqps' else 5672)}"
        brokers.append(f"{where}{url.path or '/'}")
    return f"rabbitmq {', '.join(brokers)} exchange {cfg.exchange}"


def _mllp_address(cfg: config_mod.Config) -> str:
    """host:port of the first configured MLLP listener (empty when none)."""
    source = _mllp_source(cfg)
    return f"{source.get('host', '127.0.0.1')}:{source.get('port', 2575)}" if source is not None else ""


def _mllp_source(cfg: config_mod.Config) -> dict[str, Any] | None:
    """The ``source`` table of the first configured MLLP listener."""
    for channel in cfg.channels:
        source = channel.get("source") or {}
        if isinstance(source, dict) and source.get("adapter") == "mllp-listener":
            return source
    return None


class ClientTLS(NamedTuple):
    """How `send` and `journal replay` connect: ``context`` None for plain MLLP."""

    context: ssl.SSLContext | None
    server_name: str = ""
    client_cert: bool = False  # a client certificate is presented


def _client_tls(cfg: config_mod.Config, args: argparse.Namespace) -> ClientTLS:
    """The TLS of an MLLP client command. Towards the configured listener (no ``--to``) with TLS: TLS, its
    certificate checked against ``--ca``, else the listener's ``ca_file`` (the site CA), and the name in it (its
    first DNS name: the command connects to an address); the listener's own certificate presented when it requires
    client certificates or admits listed subjects only (a site certificate for both uses), unless ``--cert`` (with
    ``optional`` none is: one the listener could not check would fail a handshake it would let through without).
    Towards ``--to``: TLS when asked (``--tls``, ``--ca``, ``--cert``, ``--server-name``), the ``[tls]`` CA unless
    ``--ca``."""
    from traboule.tls import TLSSettings, client_context

    asked = bool(args.tls or args.ca or args.cert or args.server_name)
    if bool(args.cert) != bool(args.key):
        raise config_mod.ConfigError("--cert and --key go together")
    source = None if args.to else _mllp_source(cfg)
    listener = TLSSettings()
    if source is not None:
        try:
            listener = TLSSettings.from_config(source.get("tls"), "the MLLP listener", cfg.tls)
        except config_mod.ConfigError as exc:  # e.g. its key, which this user may not read and a client needs not
            raise config_mod.ConfigError(f"{exc} (or give --to host:port with --ca, --cert and --key)") from None
    if not (asked or listener.enabled):
        return ClientTLS(None)
    cert, key, password = args.cert, args.key, ""
    if not cert and listener.enabled and (listener.client_certs == "required" or listener.allowed_subjects):
        cert, key, password = listener.cert_file, listener.key_file, listener.key_password
    settings = TLSSettings(
        enabled=True,
        ca_file=args.ca or (listener.ca_file if listener.enabled else cfg.tls.ca_file),
        cert_file=cert,
        key_file=key,
        key_password=password,
        min_version=listener.min_version if listener.enabled else "1.2",
        server_name=args.server_name,
    )
    settings.check("TLS of this command")
    name = args.server_name or (_certificate_name(listener.cert_file) if listener.enabled else "")
    return ClientTLS(client_context(settings), name, bool(cert))


def _certificate_name(cert_file: str) -> str:
    """The first DNS name of a PEM certificate; "" when it names addresses only (the one connected to is checked),
    or is unreadable; its subject's CN when it has no alternative name."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError):
        return ""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        dns = names.get_values_for_type(x509.DNSName)
        return str(dns[0]) if dns else ""
    common = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(common[0].value) if common else ""


def _closed_hint(tls: ClientTLS) -> str:
    """What a connection closed or reset by the listener may mean."""
    if tls.context is None:
        return " (does the listener speak TLS? give --tls)"
    return "" if tls.client_cert else " (does the listener ask for a client certificate? give --cert and --key)"


def _silence_hint(tls: ClientTLS) -> str:
    """What a listener that does not answer may mean."""
    return " (a listener without TLS does not answer a TLS handshake: leave out --tls)" if tls.context else ""


def _tls_failure(to: str, exc: ssl.SSLError, tls: ClientTLS) -> str:
    """Why a TLS handshake failed, with what to give (no certificate content)."""
    reason = str(getattr(exc, "reason", None) or type(exc).__name__)
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        hint = "; give --ca with the CA of the listener's certificate (or --server-name with the name in it)"
    elif reason == "WRONG_VERSION_NUMBER":
        hint = "; the listener does not speak TLS (leave out --tls, --ca, --cert)"
    elif "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:  # an alert about the client's certificate
        hint = (
            "; the listener refused the client certificate (its CA, its subject)"
            if tls.client_cert
            else "; the listener asks for a client certificate: give --cert and --key"
        )
    else:
        hint = ""
    return f"cannot send to {to} over TLS: {reason}{hint}"


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
    to = args.to or _local(_mllp_address(cfg))
    if not to:
        print("no MLLP listener in the configuration: give --to host:port", file=sys.stderr)
        return 2

    async def send(client: Any) -> int:
        worst = 0
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

    return _over_mllp(cfg, args, to, args.timeout, send)


def _over_mllp(
    cfg: config_mod.Config, args: argparse.Namespace, to: str, timeout: float, exchange: Callable[[Any], Awaitable[int]]
) -> int:
    """Connect to ``to`` (host:port) as `_client_tls` says, run ``exchange`` with the client and return its exit
    code; a connection that fails is said on stderr with what to give (exit 2), never as a traceback."""
    from traboule.adapters.mllp import MLLPClient

    host, _, port = to.rpartition(":")
    try:
        tls = _client_tls(cfg, args)
    except (config_mod.ConfigError, ssl.SSLError, OSError) as exc:
        print(f"cannot use TLS: {exc}", file=sys.stderr)
        return 2
    over = " over TLS" if tls.context is not None else ""
    print(f"sending to mllp://{host or '127.0.0.1'}:{port}{over}", file=sys.stderr)

    async def go() -> int:
        client = MLLPClient(
            host or "127.0.0.1", int(port), timeout=timeout, ssl=tls.context, server_hostname=tls.server_name
        )
        async with client:
            return await exchange(client)

    try:
        return asyncio.run(go())
    except ssl.SSLError as exc:
        print(_tls_failure(to, exc, tls), file=sys.stderr)
        return 2
    except (ConnectionResetError, asyncio.IncompleteReadError) as exc:
        closed = "the listener closed the connection without an answer" if isinstance(exc, EOFError) else str(exc)
        print(f"cannot send to {to}: {closed}{_closed_hint(tls)}", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"cannot send to {to}: no answer within {timeout:g} s{_silence_hint(tls)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot send to {to}: {str(exc) or type(exc).__name__}", file=sys.stderr)
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
    from traboule.app.runtime import make_stores

    if not cfg.database_url:  # the worklist is a file of the data folder: say which (and that it exists)
        _channel_db(cfg, args.channel, ".sqlite")
    store = make_stores(cfg).worklist(args.channel)
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
    from traboule.app.runtime import make_stores

    if not cfg.database_url:  # the journal is a file of the data folder: say which (and that it exists)
        _channel_db(cfg, "journal", ".sqlite")
    journal: stores.Journal = make_stores(cfg).journal()
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
            try:
                held = _held_reports(cfg)
            except OSError as exc:
                print(f"{exc}: nothing pruned", file=sys.stderr)
                return 2
            print(
                f"{journal.prune(before, keep=held)} message(s) received before {before} forgotten"
                + (f"; the entries of {len(held)} report message(s) held for their study kept" if held else "")
            )
            deliveries = make_stores(cfg).delivery_log()
            try:
                print(f"{deliveries.prune(before)} delivery log row(s) recorded before {before} forgotten")
            finally:
                deliveries.close()
        elif args.action == "replay":
            return _replay(cfg, journal, args)
        elif args.action == "reprocess":
            return _reprocess(cfg, journal, args)
        elif args.action == "search":
            return _search(cfg, args)
        else:
            for entry in journal.recent(args.limit, args.status):
                print(
                    f"{entry.id:>8} {entry.received} {entry.channel:12} {entry.message_type:8} "
                    f"{entry.control_id:20} {entry.status:11} {entry.ack_code} {entry.error.partition(chr(10))[0]}"
                )
    finally:
        journal.close()
    return 0


def _search(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``journal search``: the index brought up to date first when no engine runs (its indexer does otherwise)."""
    from traboule.app.journal_indexer import KeyReader, catch_up
    from traboule.app.runtime import make_stores
    from traboule.stores.journal_search import SearchQuery

    query = SearchQuery(
        since=args.since,
        until=args.until,
        statuses=args.status,
        types=args.type,
        channels=args.channel,
        control_id=args.control_id,
        accession=args.accession,
        patient=args.patient,
        text=args.text,
    )
    search = make_stores(cfg).journal_search()
    try:
        engine = _last_engine(cfg)
        if not (engine and engine["running"]):
            done = catch_up(search, KeyReader(cfg))
            if done:
                print(f"{done} journal entries indexed", file=sys.stderr)
        try:
            page = search.search(query, before=args.before, limit=args.limit)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
    finally:
        search.close()
    for entry in page.entries:
        print(
            f"{entry.id:>8} {entry.received} {entry.channel:12} {entry.message_type:8} "
            f"{entry.control_id:20} {entry.status:11} {entry.ack_code} {entry.error.partition(chr(10))[0]}"
        )
    if page.next_before:
        print(f"more: --before {page.next_before}", file=sys.stderr)
    return 0


def _held_reports(cfg: config_mod.Config) -> set[str]:
    """Idempotency keys of the report messages whose journal entries ``journal prune`` must keep: reports still
    held in the reports stores of the inbound channels (waiting for their study, or dead letters an operator may
    publish) and outcomes not yet written into their entries (a report whose entry is gone is dropped)."""
    import sqlite3

    from traboule.app.runtime import make_stores
    from traboule.stores.reports import kept_messages

    keys: set[str] = set()
    for channel in (c for c in cfg.channels if c["kind"] == "hl7-orders"):
        path = Path(cfg.data_dir) / f"{channel['name']}.reports.sqlite"
        if not cfg.database_url and not path.is_file():
            continue
        try:
            with contextlib.closing(make_stores(cfg).reports(channel["name"], None)) as store:  # no CDA mapping
                keys.update(kept_messages(store))
        except sqlite3.Error as exc:
            raise OSError(f"{path}: unreadable ({exc})") from exc
    return keys


def _replay(cfg: config_mod.Config, journal: stores.Journal, args: argparse.Namespace) -> int:
    to = args.to or _local(_mllp_address(cfg))
    entries = [journal.get(i) for i in args.ids]
    missing = [i for i, e in zip(args.ids, entries, strict=True) if e is None]
    if missing or not to.rpartition(":")[2]:
        print(f"no journal entry {missing}" if missing else "no MLLP listener configured: give --to", file=sys.stderr)
        return 1

    async def replay(client: Any) -> int:
        worst = 0
        for entry in entries:
            code = _ack_code((await client.send(entry.raw)).decode("utf-8", "replace"))
            print(f"journal entry {entry.id}: {code}")
            worst = worst or (0 if code == "AA" else 1)
        return worst

    return _over_mllp(cfg, args, to, REPLAY_TIMEOUT, replay)


REPLAY_TIMEOUT = 30.0  # seconds for the listener's answer to a replayed message


def _reprocess(cfg: config_mod.Config, journal: stores.Journal, args: argparse.Namespace) -> int:
    """``journal reprocess``: plan (selection, targets, checkpoint), then a dry run or a live run on the bus of the
    engine of this data folder (the engine need not run: the events wait in its channels' durable queues)."""
    from traboule.app import logging as tlog
    from traboule.app import reprocess

    tlog.configure(cfg.log_format, "warning", cfg.log_patient_data)  # the channels' own lines stay off stdout
    if args.resume and args.dry_run:
        print("--dry-run previews a new selection: it does not resume", file=sys.stderr)
        return 2
    if args.max < 0:
        print("--max must be a positive number of messages", file=sys.stderr)
        return 2
    try:
        chosen = reprocess.plan(
            cfg,
            journal,
            ids=args.ids,
            types=args.type,
            statuses=args.status,
            channels=args.channel,
            since=args.since,
            until=args.until,
            to=[name.strip() for name in args.to.split(",") if name.strip()],
            resume=args.resume,
        )
        print(f"{chosen.total} message(s) to reprocess into {', '.join(chosen.state.to)}", file=sys.stderr)
        if args.dry_run:
            return asyncio.run(reprocess.dry_run(cfg, journal, chosen, limit=args.max, progress=sys.stderr))
        refusal = _same_bus(cfg)
        if refusal:
            print(refusal, file=sys.stderr)
            return 2
        engine = _last_engine(cfg)
        running = bool(engine and engine["running"])
        print(
            f"bus: {_bus_description(cfg)}"
            + ("" if running else " (engine not running: the channels take the events when it starts)"),
            file=sys.stderr,
        )
        return asyncio.run(reprocess.run(cfg, journal, chosen, limit=args.max, progress=sys.stderr))
    except reprocess.ReprocessError as exc:
        print(str(exc), file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("interrupted: `traboule journal reprocess --resume` continues after the last batch done", file=sys.stderr)
        return 130


def _with_bus(cfg: config_mod.Config, work: Callable[[Bus], Awaitable[int]]) -> int:
    """Run ``work`` with the running engine's bus (the same one, or exit 2 saying why), closed afterwards."""
    from traboule.app.bus_backend import make_bus

    refusal = _same_bus(cfg)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    print(f"bus: {_bus_description(cfg)}", file=sys.stderr)

    async def go() -> int:
        bus = make_bus(
            cfg.amqp_url, cfg.data_dir, exchange=cfg.exchange, queue_type=cfg.queue_type, partitions=cfg.partitions
        )
        await bus.start()
        try:
            try:
                await bus.wait_connected(10.0)
            except ConnectionError as exc:
                print(f"cannot reach the bus {_bus_description(cfg)}: {exc}", file=sys.stderr)
                return 2
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(go())


def cmd_dlq(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    async def work(bus: Bus) -> int:
        if args.action == "list":
            letters = await bus.dead_letters(args.channel, args.limit)
            print(f"{len(letters)} dead letter(s) for channel {args.channel!r}")
            for d in letters:
                print(f"{d.message_id}  {d.topic:14} attempts={d.attempt}  {d.headers.get('x-error', '')}")
            return 0
        replayed = await bus.replay_dead_letter(args.channel, args.message_id)
        print("replayed" if replayed else f"no dead letter {args.message_id} for channel {args.channel!r}")
        return 0 if replayed else 1

    return _with_bus(cfg, work)


def cmd_fhir(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``fhir resend``: forget what the server holds and queue every resource for the running engine to push."""
    from traboule.app.runtime import make_stores
    from traboule.formats.fhir_push import push_message, push_topic

    channel = next((c for c in cfg.channels if c["name"] == args.channel and c["kind"] == "fhir"), None)
    if channel is None or not channel.get("destination"):
        print(f"no fhir channel {args.channel!r} with a destination in the configuration", file=sys.stderr)
        return 1
    store = make_stores(cfg).fhir(args.channel)

    async def work(bus: Bus) -> int:
        keys = store.forget_remote()
        stamp = int(time.time())
        for start in range(0, len(keys), 8):
            chunk = keys[start : start + 8]
            await bus.publish(push_topic(args.channel), push_message(chunk), message_id=f"resend-{stamp}-{start}")
        print(f"{len(keys)} resource(s) queued for {channel['destination'].get('base_url', '')}")
        return 0

    try:
        return _with_bus(cfg, work)
    finally:
        store.close()


def _configuration_source(cfg: config_mod.Config) -> str:
    """What the configuration is made of: the built-in defaults, a file over them, or a file alone."""
    if not cfg.path:
        return "the built-in defaults"
    import tomllib

    with open(cfg.path, "rb") as fh:  # read and checked by load() already
        defaults = tomllib.load(fh).get("engine", {}).get("defaults", True)
    return f"the built-in defaults + {cfg.path}" if defaults else f"{cfg.path} alone ([engine] defaults = false)"


def cmd_channels(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.app.runtime import installed

    print("installed channel kinds:")
    for name, target in sorted(installed("traboule.channels").items()):
        print(f"  {name:20} {target}")
    print("installed adapters:")
    for name, target in sorted(installed("traboule.adapters").items()):
        print(f"  {name:20} {target}")
    print(f"configured channels, from {_configuration_source(cfg)}:")
    for ch in cfg.channels:
        print(
            f"  {ch['name']:20} kind={ch['kind']} "
            + json.dumps({k: v for k, v in ch.items() if k not in ("name", "kind")})
        )
    return 0


def cmd_test(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from traboule.app import logging as tlog
    from traboule.app.mapping_tests import run

    tlog.configure(cfg.log_format, "warning", cfg.log_patient_data)  # the channels' own lines would drown the results
    inbound, mwl, fhir, cda = args.inbound, args.mwl, args.fhir, args.cda
    for ch in cfg.channels:
        if ch["kind"] == "hl7-orders" and inbound is None:
            inbound = config_mod.resolve(cfg, ch.get("mapping", "mappings/hl7_inbound.yaml"))
        if ch["kind"] == "hl7-orders" and cda is None and isinstance(ch.get("reports"), dict):
            cda = config_mod.resolve(cfg, ch["reports"].get("cda_mapping", "mappings/cda.yaml"))
        if ch["kind"] == "worklist" and mwl is None:
            mwl = config_mod.resolve(cfg, ch.get("mapping", "mappings/mwl.yaml"))
        if ch["kind"] == "fhir" and fhir is None:
            fhir = config_mod.resolve(cfg, ch.get("mapping", "mappings/fhir.yaml"))
    path = args.path or config_mod.resolve(cfg, "mappings/tests")
    results = run(path, inbound, mwl, fhir, cda, validator=_test_validator(args.validators))
    failed = [r for r in results if not r.ok]
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'} {r.file}")
        for f in r.failures:
            print(f"     {f}")
        for note in r.notes:
            print(f"     note: {note}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


def _test_validator(tree: Path | None) -> Any:
    """What makes the CDA validator of the 'valid' checks (None without a validator tree): the validation server of
    ``cda validate`` when it can run, so that the schematrons are compiled once across runs."""
    from traboule.formats.cda_validation import CDAValidator, ServedValidator, default_tree, server_address, server_idle

    tree = tree or default_tree()
    if tree is None:
        return None
    if server_address(tree) is not None and server_idle() > 0:
        return lambda: ServedValidator(tree)
    return lambda: CDAValidator(tree)


def cmd_check(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """Build every channel (mappings, tables, certificates, settings) as ``run`` does before anything listens."""
    from traboule.app.http import check_routes
    from traboule.app.runtime import check_database, preflight

    for checked in preflight(cfg, database=False):
        print(f"ok  {checked}")
    if cfg.alerts is not None:  # its rules and notifiers were checked as the configuration loaded
        notifiers = ", ".join(sorted(cfg.alerts.notifiers)) or "-"
        print(f"ok  alerts: {len(cfg.alerts.rules)} rule(s), notifiers {notifiers}")
    check_routes(cfg)
    if cfg.database_url and not cfg.amqp_url:
        print(
            "warn bus: [database] url without an AMQP URL: the embedded bus is this node's own, so this is one node"
            " only; several nodes on one database need a shared RabbitMQ ([bus] amqp_url)"
        )
    try:
        check_database(cfg)  # a schema newer than this traboule, two worklist (fhir) channels: ConfigError
    except ConnectionError as exc:  # the configuration is valid; ``run`` will not start until the database answers
        print(f"warn database: {_database_use(cfg)}: not reachable from here ({exc})")
        return 0
    print(f"ok  database: {_database_use(cfg)}")
    return 0


def _database_use(cfg: config_mod.Config) -> str:
    """Which database each store would use (no password), from the engine's store factory."""
    from traboule.app.runtime import make_stores

    if not cfg.database_url:
        return cfg.database_description
    where: dict[str, list[str]] = {}
    for store, place in make_stores(cfg).describe().items():
        where.setdefault(place, []).append(store)
    return "; ".join(f"{', '.join(names)} on {place}" for place, names in where.items())


def cmd_alerts(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``alerts list``: the open incidents, then the latest resolved ones, one per line."""
    from traboule.app.alerts import list_incidents
    from traboule.app.runtime import make_stores

    found = list_incidents(make_stores(cfg), max(1, args.limit))
    rules = len(cfg.alerts.rules) if cfg.alerts is not None else 0
    print(f"{sum(i['state'] == 'open' for i in found)} open incident(s); {rules} rule(s) configured")
    for i in found:
        until = i["resolved"] or "-"
        print(
            f"{i['state']:8} {i['opened']}  {until:25}  {i['duration_s']:>7}s  {i['rule']}  {i['channel']}"
            f"  value={i['last_value']:g}  notified={','.join(i['notified']) or '-'}  {i['id']}"
        )
    return 0


def cmd_db(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``db upgrade``: apply the pending schema migrations of every store, one line per store (exit 1 when the
    database is newer than this traboule, 2 without a database). ``db status``: the versions, changing nothing."""
    import psycopg

    from traboule.stores.postgres import connect, migrations, redact

    if args.action == "migrate":
        return _db_migrate(cfg, args)
    if not cfg.database_url:
        print(
            "no database configured ([database] url or TRABOULE_DATABASE_URL): the stores use SQLite files,"
            " nothing to upgrade",
            file=sys.stderr,
        )
        return 2
    try:
        with connect(cfg.database_url) as conn:
            if args.action == "status":
                migrations.discover()
                found = migrations.versions(conn)
                for name, known in migrations.registered().items():
                    state = "current" if found.get(name, 0) == known else "upgrade needed"
                    if found.get(name, 0) > known:
                        state = "newer than this traboule"
                    print(f"{name:12} database {found.get(name, 0)}  traboule {known}  {state}")
                return 0
            for name, (before, after) in migrations.upgrade(conn).items():
                print(f"{name:12} {before} -> {after}" if after != before else f"{name:12} {after} (current)")
    except config_mod.ConfigError as exc:  # the database is newer than this traboule
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        print(f"database {redact(cfg.database_url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def _db_migrate(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``db migrate``: the data folder's stores copied into the database (`traboule.stores.migrate`), progress on
    stderr, then each store's rows in the folder and in the database. Exit 0 when every count matches, 1 when one
    does not or the migration is refused, 2 without a database URL, 130 when interrupted (run it again)."""
    import dataclasses
    import sqlite3

    import psycopg

    from traboule.stores import migrate
    from traboule.stores.postgres import redact

    url = args.url or cfg.database_url
    source = Path(args.source or cfg.data_dir)
    if not url:
        print("no database: give --to postgresql://... ([database] url or TRABOULE_DATABASE_URL)", file=sys.stderr)
        return 2
    engine = _last_engine(dataclasses.replace(cfg, data_dir=str(source)))
    if engine is not None and engine["running"] and not args.force:
        print(
            f"refused: an engine is running on {source} (pid {engine.get('pid')}): stop it first, so that nothing"
            " changes during the copy (--force to copy anyway)",
            file=sys.stderr,
        )
        return 1
    queued, dead = migrate.pending_deliveries(source)
    if queued and not args.ignore_bus:
        print(
            f"refused: the embedded bus of {source} holds {queued} deliveries not yet consumed, which the database"
            " does not take: let the engine drain them first (start it, wait for the bus to empty, stop it), or"
            " --ignore-bus to leave them in bus.sqlite",
            file=sys.stderr,
        )
        return 1
    shown: dict[str, float] = {}

    def progress(step: str, done: int, total: int) -> None:
        now = time.monotonic()
        if args.quiet or (done < total and now - shown.get(step, 0.0) < 0.5):
            return
        shown[step] = now
        print(f"{step}: {done}/{total}", file=sys.stderr, flush=True)

    try:
        report = migrate.migrate(
            source,
            url,
            channels={k: v for k, v in (("worklist", args.worklist), ("fhir", args.fhir)) if v},
            batch_size=max(1, args.batch_size),
            progress=progress,
        )
    except KeyboardInterrupt:
        print("interrupted: what was copied is kept; run the same command again to finish", file=sys.stderr)
        return 130
    except migrate.MigrationError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:
        text = " ".join(str(exc).replace(url, redact(url)).split())
        print(f"database {redact(url)}: {type(exc).__name__}: {text} (run the same command again)", file=sys.stderr)
        return 1
    except (sqlite3.Error, OSError) as exc:  # a source file unreadable
        print(f"cannot read {source}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for count in report.counts:
        state = "ok" if count.source == count.destination else "MISMATCH"
        print(f"{count.step:20} source {count.source:>9}  database {count.destination:>9}  {state}")
    if queued or dead:
        print(
            f"note: the embedded bus of {source} holds {queued} deliveries not yet consumed and {dead} dead letters;"
            " they are not in the database (a node keeping the embedded bus finds them there)",
            file=sys.stderr,
        )
    if report.others:
        print(f"left out (not chosen): {', '.join(p.name for p in report.others)}", file=sys.stderr)
    if report.mismatches:
        names = ", ".join(c.step for c in report.mismatches)
        print(f"count mismatch ({names}): the database does not hold what {source} holds", file=sys.stderr)
        return 1
    if report.unread:
        print(
            f"not migrated: {', '.join(p.name for p in report.unread)} in {source} holds no store the migration"
            " knows (an unknown or unreadable file): its data is not in the database",
            file=sys.stderr,
        )
        return 1
    print(f"migrated {source} to {redact(url)}: {report.copied} rows copied by this run")
    return 0


def cmd_cda(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``cda validate``: one OK/FAIL line per file, then its failures. Exit 0 when all pass, 1 when one fails,
    2 when the validator tree is missing or broken. ``cda export``: see ``_cda_export``."""
    if args.action == "export":
        return _cda_export(cfg, args)
    from traboule.app import logging as tlog
    from traboule.formats.cda_validation import (
        UPSTREAM_REPO,
        CDAValidator,
        ServedValidator,
        default_tree,
        server_address,
        server_idle,
    )

    if bool(args.files) == args.stop:
        print("cda validate: give the files to validate, or --stop alone", file=sys.stderr)
        return 2
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
        if args.stop:
            stopped = server_address(tree, args.cache) is not None and ServedValidator(tree, args.cache).stop()
            print(f"{'stopped the' if stopped else 'no'} validation server of {tree}")
            return 0
        validator: CDAValidator | ServedValidator
        keep = server_idle() if args.keep is None else args.keep
        if keep > 0 and server_address(tree, args.cache) is not None:
            validator = ServedValidator(tree, args.cache, idle=keep)
        else:
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


def _cda_export(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """A published CDA from the channel's reports store, to a file or standard output. Exit 1 when there is no
    such document (or no current version for the accession number), 2 when there is no store."""
    from traboule.stores.published import PublishedDocuments

    names = [c["name"] for c in cfg.channels if c["kind"] == "hl7-orders" and c.get("reports", {}) is not False]
    channel = args.channel or (names[0] if names else "")
    if not channel:
        print("no inbound channel with reports in the configuration: give --channel", file=sys.stderr)
        return 2
    path = _channel_db(cfg, channel, ".reports.sqlite")
    with PublishedDocuments(path) as store:
        try:
            doc = store.by_accession(args.accession) if args.accession else store.by_id(args.id)
        except NotPublished as exc:
            print(str(exc), file=sys.stderr)
            return 1
    if doc.status != "current":
        print(f"note: version {doc.version} of {doc.set_id} is {doc.status}", file=sys.stderr)
    if args.output:
        args.output.write_bytes(doc.data)
        print(f"{args.output}: {doc.id} (version {doc.version}, {doc.status}, {len(doc.data)} bytes)", file=sys.stderr)
    else:
        sys.stdout.buffer.write(doc.data)
        sys.stdout.flush()
    return 0


def cmd_model(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``model``: the reference as text, as Markdown, or rewritten into a document's generated section."""
    from traboule.app import model_reference

    if args.update:
        try:
            changed = model_reference.update(args.update)
        except (OSError, ValueError) as exc:
            print(f"cannot update {args.update}: {exc}", file=sys.stderr)
            return 2
        print(f"{args.update}: {'updated' if changed else 'already up to date'}")
        return 0
    sys.stdout.write(model_reference.markdown() if args.markdown else model_reference.text())
    return 0


def cmd_new(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``new channel NAME``: a plug-in package that installs beside the engine."""
    from traboule.app.scaffold import names, new_channel

    try:
        root = new_channel(args.name, args.dir)
    except (ScaffoldError, OSError) as exc:
        print(f"cannot scaffold: {exc}", file=sys.stderr)
        return 2
    n = names(args.name)
    print(f"{root}: channel kind {n['kind']!r} ({n['package']}.channel:{n['cls']})")
    print(f"  test:    cd {root} && PYTHONPATH=. {sys.executable} -m pytest")
    print(f"  install: {Path(sys.executable).parent / 'pip'} install -e {root}")
    return 0


def cmd_reports(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``reports waiting`` lists the reports held for their study; ``reports publish N`` asks the running engine to
    publish one now (a dead letter waits again, with a new deadline) and prints what became of it."""
    from traboule.app.runtime import make_stores

    channels = [c for c in cfg.channels if c["kind"] == "hl7-orders" and c.get("reports", {}) is not False]
    channel = next((c for c in channels if c["name"] == (args.channel or c["name"])), None)
    if channel is None:
        print("no inbound channel with reports of that name in the configuration", file=sys.stderr)
        return 2
    if not cfg.database_url:  # the reports store is a file of the data folder: say which (and that it exists)
        _channel_db(cfg, channel["name"], ".reports.sqlite")
    with contextlib.closing(make_stores(cfg).reports(channel["name"], None)) as store:  # no CDA mapping needed
        return _reports_command(store, channel, args)


def _reports_command(store: Any, channel: dict[str, Any], args: argparse.Namespace) -> int:
    """``cmd_reports`` on the channel's open reports store (its SQLite file, or PostgreSQL with [database] url)."""
    from traboule.app.config import seconds
    from traboule.stores.reports import DEAD, held_report, held_reports, request_publication

    if args.action == "waiting":
        statuses = ("waiting", *DEAD) + (("published", "superseded", "withdrawn") if args.all else ())
        rows = held_reports(store, statuses)
        print(f"{len(rows)} report(s)")
        for r in rows:
            deadline = datetime.fromtimestamp(r["deadline"], UTC).isoformat(timespec="minutes")
            print(
                f"{r['n']:>6} {r['status']:10} journal={r['journal_id'] or '?':<8} {r['accession']:16} "
                f"{r['study_uid'] or '-':40} received={r['received']} until={deadline} "
                f"{r['reason'] or r['document_id'] or r['remark']}"
            )
        return 0
    wait = seconds((channel.get("reports") or {}).get("wait_for_study", "24h"), "reports.wait_for_study")
    before = request_publication(store, args.id, wait)
    if before is None or before not in ("waiting", *DEAD):
        print(f"no waiting report {args.id}" + (f" (it is {before})" if before else ""), file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.wait
    while True:
        row = held_report(store, args.id)
        if row is None or row["status"] != "waiting" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if row is not None and row["status"] == "published":
        print(f"published: document {row['document_id']}")
        return 0
    if row is not None and row["status"] in DEAD:
        print(f"not published ({row['status']}): {row['reason']}")
        return 1
    print("waiting: its study is not known yet (or the engine is not running); published as soon as it is")
    return 1


def _report_number(text: str) -> int:
    """A report's number in ``traboule reports waiting``: a whole number from 1 (argparse says so otherwise)."""
    from traboule.stores.reports import MAX_REPORT_NUMBER

    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 0 < n <= MAX_REPORT_NUMBER:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a report number (1 to {MAX_REPORT_NUMBER})")
    return n


def cmd_codes(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``codes unmapped``: one line per procedure code without a LOINC act, most frequent first. Exit 0 when every
    code has one, 1 when some have none."""
    from traboule.app.code_usage import acts_file, scan
    from traboule.translate.cda import CDAMapping
    from traboule.translate.hl7_mapping import HL7InboundMapping

    since = ""
    if args.since:
        try:
            moment = datetime.fromisoformat(args.since)
        except ValueError:
            print(f"--since {args.since!r}: expected a date (YYYY-MM-DD) or an ISO 8601 time", file=sys.stderr)
            return 2
        since = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC).isoformat("T", "milliseconds")
    channels = [c for c in cfg.channels if c["kind"] == "hl7-orders" and args.channel in (None, c["name"])]
    if not channels:
        print(f"no hl7-orders channel {args.channel or ''} in the configuration".replace("  ", " "), file=sys.stderr)
        return 2
    mappings = {
        c["name"]: HL7InboundMapping(config_mod.resolve(cfg, c.get("mapping", "mappings/hl7_inbound.yaml")))
        for c in channels
    }
    reports = channels[0].get("reports")
    cda_path = (
        (reports or {}).get("cda_mapping", "mappings/cda.yaml") if isinstance(reports, dict) else "mappings/cda.yaml"
    )
    cda_mapping = config_mod.resolve(cfg, cda_path)
    acts = CDAMapping(cda_mapping).acts
    journal = _channel_db(cfg, "journal", ".sqlite")
    usage = scan(journal, mappings, acts, since)
    unmapped = usage.unmapped()
    print(
        f"{usage.messages} order/report message(s) read{' since ' + since if since else ''}: "
        f"{len(unmapped)} procedure code(s) without a row in {acts_file(cda_mapping)}"
    )
    if unmapped:
        print(f"{'code':16} {'system':8} {'orders':>7} {'reports':>7} {'example':>8}  display")
        for c in unmapped:
            print(f"{c.code:16} {c.system:8} {c.orders:>7} {c.reports:>7} {c.example:>8}  {c.display}")
        print("example: the latest journal entry with the code (traboule journal show ID)")
    if usage.unreadable:
        print(f"{usage.unreadable} message(s) the mapping refuses now were left out")
    if usage.dropped:
        print(f"{usage.dropped} occurrence(s) of further codes not listed (more than the codes kept)")
    return 1 if unmapped else 0


def cmd_patients(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """``patients show IPP`` prints what the patient identity registry holds about an IPP (its INS, the order keys
    it owns, its merges, the changes of its INS); ``patients forget IPP`` removes its recorded INS (the next
    message's INS is recorded instead), kept among the registry's actions and logged (without patient data)."""
    import getpass

    import structlog

    from traboule.app import logging as tlog
    from traboule.app.runtime import make_stores

    ipp = args.ipp.strip()
    if not ipp or len(ipp) > 250 or not ipp.isprintable():
        print("give an IPP value (printable, at most 250 characters)", file=sys.stderr)
        return 2
    factory = make_stores(cfg)
    local = factory.describe()["patients"].startswith("sqlite")
    if local and not (Path(cfg.data_dir) / "patients.sqlite").is_file():
        print(f"no patient identity registry in {cfg.data_dir} (no message received yet)", file=sys.stderr)
        return 1
    identities = factory.patients()
    try:
        if args.action == "forget":
            pairs = identities.forget(ipp)
            if not pairs:
                print(f"no INS recorded for IPP {ipp}", file=sys.stderr)
                return 1
            tlog.configure(cfg.log_format, "info", cfg.log_patient_data)
            structlog.get_logger("traboule.patients").warning(
                "patients.ins_forgotten", pairs=len(pairs), operator=getpass.getuser()
            )
            for pair in pairs:
                authority = pair.ipp_namespace or pair.ipp_oid
                print(f"forgotten: IPP {ipp}{f' ({authority})' if authority else ''} {pair.ins} ({pair.ins_oid})")
            return 0
        found = identities.show(ipp)
    finally:
        identities.close()
    if not any(found.values()):
        print(f"nothing recorded for IPP {ipp}", file=sys.stderr)
        return 1
    print(f"IPP {ipp}")
    for row in found["ins"]:
        print(f"  {row['kind']} {row['ins']}  (IPP authority {row['authority'] or '-'}, recorded {row['recorded']})")
    if not found["ins"]:
        print("  no INS recorded")
    for row in found["merged_into"]:
        print(f"  merged into {row['survivor']}  (recorded {row['recorded']})")
    for row in found["merged_in"]:
        print(f"  {row['ipp']} was merged into it  (recorded {row['recorded']})")
    if found["owners"]:
        print("  orders:")
    for row in found["owners"]:
        print(f"    {row['kind']} {row['key']}: {row['patient']}  ({row['source']}, {row['recorded']})")
    for row in found["actions"]:
        print(f"  {row['at']}  {row['action']}: {row['detail']}")
    return 0


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
    "model": cmd_model,
    "new": cmd_new,
    "cda": cmd_cda,
    "codes": cmd_codes,
    "reports": cmd_reports,
    "patients": cmd_patients,
    "alerts": cmd_alerts,
    "db": cmd_db,
}

if __name__ == "__main__":
    sys.exit(main())
