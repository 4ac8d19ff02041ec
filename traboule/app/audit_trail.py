"""The engine's audit trail (`AuditTrail`): recorded events to the local file, the durable queue, the repository.

``record(event)`` puts the event in a bounded buffer and returns. A writer thread, every `FLUSH_S`, encodes the
buffered events (`traboule.audit.message.encode`) and appends them to the local file (``[audit] file``,
``audit.log`` in the data folder: one JSON line per event with its XML, mode 0600, fsync'd per batch), then, when
an audit record repository is configured, to the queue ``audit.sqlite`` (`traboule.stores.audit_queue`). In the
main process a relay task sends the queued messages to the repository over syslog (`traboule.adapters.syslog`)
and marks them delivered once the repository's TCP stack acknowledged every byte (`SyslogSender.send`): at least
once, in order, after any outage of the repository or restart of the engine. Every process of a node records
through its own trail into the same file and queue; the main process's relay sends them all.

A flood of refusals cannot fill the trail: failed security-alert and user-authentication events are throttled per
(requestor address, kind and subtype, description) — the first passes, the next ones within `THROTTLE_S` are
counted, and one summary event per key and interval says how many ("N more refusals of the same kind from this
address"); the keys are bounded (`THROTTLE_KEYS`, the oldest summarised early). Security events also have their own
small budget in the buffer (`MAX_SECURITY_PENDING`): they never push out patient-data events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import json.encoder
import os
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import structlog

from traboule import metrics
from traboule.adapters.syslog import SyslogSender, format_message
from traboule.app.config import AuditConfig, Config, resolve
from traboule.audit import AuditEvent, Outcome, application_activity, configuration_changed
from traboule.audit.message import AuditSource, encode, event_time
from traboule.stores.audit_queue import FILE as QUEUE_FILE
from traboule.stores.audit_queue import AuditQueue
from traboule.tls import client_context

log = structlog.get_logger("traboule.app.audit_trail")

FLUSH_S = 0.05  # the writer's batch interval
MAX_PENDING = 10_000  # events the buffer holds at most while the disk does not take them (beyond: dropped, logged)
MAX_SECURITY_PENDING = 500  # of those, security events at most (the rest is for patient-data events)
SECURITY_KINDS = frozenset({"security-alert", "user-authentication"})
THROTTLE_S = 60.0  # a failed security event's key: one passes, the next ones summarised once per interval
THROTTLE_KEYS = 4096  # keys the throttle remembers (beyond: the oldest summarised at once and forgotten)
DEGRADED_S = 60.0  # /health says the trail is degraded this long after an event was dropped
MAX_UNQUEUED = 100_000  # messages in the file kept for a queue that fails (beyond: in the file only, logged)
RELAY_BATCH = 500  # messages sent in one write at most
RELAY_BATCH_BYTES = 256 * 1024  # bytes of messages in one write at most (one message larger goes alone)
RELAY_POLL_S = 1.0  # how often the relay looks at an empty queue (the other processes' messages cannot wake it)
MIN_BACKOFF_S = 1.0  # first pause after the repository failed, doubled up to MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
CLOSE_FLUSH_S = 10.0  # at close, how long to wait for what was recorded to be written before stopping the relay
CLOSE_WAIT_S = 5.0  # at close, how long to wait for the writer (then it finishes, and closes its file, alone)
STOP_DRAIN_S = 3.0  # at stop, how long the relay may still send what is queued (the rest waits for the next run)
PRUNE_EVERY_S = 600.0
DEPTH_EVERY_S = 5.0  # how often the relay refreshes the queue depth gauge while it sends
CONFIG_HASH_FILE = "audit-config.sha256"
_json = json.encoder.encode_basestring  # a str as a JSON string, non-ASCII as it is (json.dumps, ensure_ascii=False)
_JSON_ESCAPED = bytes(range(0x20)) + b"\\"  # what a JSON string escapes, but the double quote


def _line(event: AuditEvent, xml: bytes, pid: int) -> bytes:
    """The file's line of ``event``: ``{"at", "kind", "action", "outcome", "transaction", "pid", "xml"}`` as
    ``json.dumps(..., ensure_ascii=False)`` writes them (a lone surrogate as its escape), ``event``
    (`AuditEvent.as_dict`) too when there is no XML. Formatted here rather than by ``json.dumps``: its encoder and
    its escaping of the XML, made once per event, were most of the line's cost."""
    kind, action, transaction = event.kind, event.action, event.transaction
    if xml and type(kind) is str and type(action) is str and type(transaction) is str:
        head = (
            f'{{"at": "{event_time(event.at)}", "kind": {_json(kind)}, "action": {_json(action)}, '
            f'"outcome": {int(event.outcome)}, "transaction": {_json(transaction)}, "pid": {pid}, "xml": '
        ).encode("utf-8", "backslashreplace")
        if len(xml.translate(None, _JSON_ESCAPED)) == len(xml):  # only quotes to escape (UTF-8 is kept as it is)
            return b'%s"%s"}\n' % (head, xml.replace(b'"', b'\\"'))
        return b"%s%s}\n" % (head, _json(xml.decode("utf-8")).encode("utf-8"))
    record = {
        "at": event_time(event.at),
        "kind": kind,
        "action": action,
        "outcome": int(event.outcome),
        "transaction": transaction,
        "pid": pid,
        "xml": xml.decode("utf-8"),
    }
    if not xml:
        record["event"] = event.as_dict()
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")


def audit_source(config: Config) -> AuditSource:
    """The engine's identity in its audit messages, from ``[audit]`` and the channels (the first DICOM SCP's AE
    title when ``[audit] ae_title`` is not set)."""
    settings = config.audit
    host = socket.gethostname()
    ae_title = settings.ae_title
    if not ae_title:
        for channel in config.channels:
            for endpoint in channel.get("destinations") or []:
                if isinstance(endpoint, dict) and str(endpoint.get("adapter", "")).endswith("-scp"):
                    ae_title = str(endpoint.get("ae_title", ""))
                    break
            if ae_title:
                break
    return AuditSource(
        source_id=settings.source_id or host,
        enterprise_site_id=settings.enterprise_site_id,
        ae_title=ae_title,
        host_name=host,
    )


class Throttle:
    """Failed security events per key (requestor address, kind, subtype, description): `admit` says whether an
    event passes (the first of its key in an interval of ``interval`` seconds) or is only counted; `due` gives the
    summary events of intervals that ended (and of keys forgotten when more than ``keys`` are held). Not
    thread-safe: the trail calls it under its lock."""

    def __init__(self, interval: float = THROTTLE_S, keys: int = THROTTLE_KEYS) -> None:
        self.interval = interval
        self.keys = keys
        # key -> [interval's start (monotonic), the first event, events counted since]; oldest interval first
        self._held: OrderedDict[tuple[str, ...], list[Any]] = OrderedDict()

    @staticmethod
    def applies(event: AuditEvent) -> bool:
        return event.kind in SECURITY_KINDS and event.outcome != Outcome.SUCCESS

    @staticmethod
    def _key(event: AuditEvent) -> tuple[str, ...]:
        who = event.requestor
        address = (who.address or who.user_id) if who is not None else ""
        return (address, event.kind, event.subtype, event.description)

    def admit(self, event: AuditEvent, now: float) -> tuple[bool, list[AuditEvent]]:
        """(whether ``event`` is recorded, summaries due now)."""
        due = self.due(now)
        key = self._key(event)
        held = self._held.get(key)
        if held is not None:
            held[2] += 1
            return False, due
        self._held[key] = [now, event, 0]
        while len(self._held) > self.keys:
            _, (_, first, count) = self._held.popitem(last=False)
            if count:
                due.append(self.summary(first, count))
        return True, due

    def due(self, now: float) -> list[AuditEvent]:
        """The summaries of the intervals ended by ``now`` (their keys forgotten: the next event passes)."""
        out = []
        while self._held:
            key, (start, first, count) = next(iter(self._held.items()))
            if now - start < self.interval:
                break
            del self._held[key]
            if count:
                out.append(self.summary(first, count))
        return out

    def flush(self) -> list[AuditEvent]:
        """Every summary still counting (at close)."""
        out = [self.summary(first, count) for _, first, count in self._held.values() if count]
        self._held.clear()
        return out

    @staticmethod
    def summary(first: AuditEvent, count: int) -> AuditEvent:
        text = f"{count} more refusals of the same kind from this address"
        if first.description:
            text += f": {first.description}"
        return dataclasses.replace(first, description=text, at=time.time())


class AuditTrail:
    """The audit trail of one engine process (``runtime.audit``). ``relay``: this process sends the queue to the
    repository (the main process)."""

    def __init__(self, config: Config, *, relay: bool) -> None:
        self.settings: AuditConfig = config.audit
        self.source = audit_source(config)
        self.data_dir = Path(config.data_dir)
        self.path = self.data_dir / self.settings.file
        self.address = self.settings.address
        self.relays = relay and self.address is not None
        self.ssl_context = (
            client_context(self.settings.tls) if self.address is not None and self.settings.transport == "tls" else None
        )
        self._pending: list[AuditEvent] = []
        self._pending_security = 0  # of `_pending`, security events (`MAX_SECURITY_PENDING` at most)
        self._throttle = Throttle()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._written = threading.Condition(self._lock)
        self._recorded = 0  # events taken in by `record` (and not dropped)
        self._done = 0  # of those, written to the file (and the queue)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abandoned = False  # close() gave up waiting for the writer: the thread closes its own resources
        self._fd: int | None = None
        self._queue: AuditQueue | None = None
        self._unqueued: list[tuple[float, int, bytes]] = []  # in the file, not yet in the queue (a failed put)
        self._failing = False
        self.dropped = 0  # events lost (buffer full, or recorded after close)
        self.throttled = 0  # failed security events counted in a summary instead of recorded one by one
        self._dropped_at = 0.0  # monotonic time of the last drop (/health: degraded for `DEGRADED_S`)
        self._depth_at = 0.0  # when the queue depth gauge was last refreshed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued: asyncio.Event | None = None
        self._relay: asyncio.Task | None = None
        self._sender: SyslogSender | None = None
        self.repository_down = False
        self._stopping = False

    # -- recording (any thread, never blocks, never raises) --------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        try:
            with self._lock:
                if self._closing and self._thread is None:
                    self._drop()
                    return
                if Throttle.applies(event):
                    admitted, summaries = self._throttle.admit(event, time.monotonic())
                    if not admitted:
                        self.throttled += 1
                    for summary in summaries:
                        self._take(summary)
                    if not admitted:
                        return
                self._take(event)
        except Exception:  # recording never fails its caller
            return

    def _take(self, event: AuditEvent) -> None:
        """``event`` into the buffer, within its budget (else dropped); called under the lock."""
        security = event.kind in SECURITY_KINDS
        if security:
            full = self._pending_security >= MAX_SECURITY_PENDING
        else:
            full = len(self._pending) - self._pending_security >= MAX_PENDING - MAX_SECURITY_PENDING
        if full:
            self._drop()
            return
        self._pending.append(event)
        self._pending_security += security
        self._recorded += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()

    def _drop(self) -> None:
        self.dropped += 1
        self._dropped_at = time.monotonic()
        with contextlib.suppress(Exception):
            metrics.audit_dropped.inc()
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("audit.dropped", dropped=self.dropped)

    def health(self) -> dict[str, Any]:
        """The trail's state for /health: ``degraded`` while events are being dropped (one dropped in the last
        `DEGRADED_S` seconds), else ``ok``; the counts of dropped and throttled events, the repository's state."""
        dropping = self.dropped and time.monotonic() - self._dropped_at < DEGRADED_S
        out: dict[str, Any] = {"state": "degraded" if dropping else "ok", "dropped": self.dropped}
        if self.throttled:
            out["throttled"] = self.throttled
        if self.relays:
            out["repository"] = "down" if self.repository_down else "ok"
        return out

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was recorded so far is in the file and the queue (blocking); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._recorded
            self._wake.set()
            while self._done < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._written.wait(min(left, FLUSH_S))
        return True

    # -- the writer thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            with self._lock:
                events, self._pending = self._pending, []
                self._pending_security = 0
                # The summaries due go in the emptied buffer (written next time): taken before, they met the
                # security budget still full of the events a failed write had put back, and were dropped.
                for summary in self._throttle.flush() if self._closing else self._throttle.due(time.monotonic()):
                    self._take(summary)
                closing = self._closing
            if events or self._unqueued:
                try:
                    self._write(events)
                except Exception as exc:  # a bug: said, and the thread goes on (the events are lost)
                    log.error("audit.writer_failed", error=type(exc).__name__, events=len(events))
                    with self._lock:
                        self._done += len(events)
            if closing and not events:
                with self._lock:
                    if self._pending:
                        continue
                    self._thread = None
                    abandoned = self._abandoned
                if abandoned:  # close() stopped waiting: the thread's resources are its own to close
                    self._release()
                return

    def _write(self, events: list[AuditEvent]) -> None:
        """Encode and append ``events`` to the file, then to the queue. A batch the file refuses goes back to the
        buffer, retried next time; messages the queue refuses are retried on their own (they are in the file)."""
        lines, queued = [], []
        pid = os.getpid()
        queues = self.address is not None
        for event in events:
            try:
                xml = encode(event, self.source)
            except Exception as exc:  # a bug, not data: said, and the event kept as data in the file
                log.error("audit.encode_failed", kind=event.kind, error=type(exc).__name__)
                xml = b""
            lines.append(_line(event, xml, pid))
            if xml and queues:
                queued.append((event.at, int(event.outcome), xml))
        try:
            if lines:
                self._append(b"".join(lines))
        except Exception as exc:
            self._failed("file", exc)
            with self._lock:
                self._pending[:0] = events
                self._pending_security = sum(e.kind in SECURITY_KINDS for e in self._pending)
            time.sleep(FLUSH_S * 10)
            return
        self._enqueue(queued)
        with self._lock:  # in the file, and in the queue unless it failed (then retried on its own)
            self._done += len(events)
            self._written.notify_all()

    def _enqueue(self, queued: list[tuple[float, int, bytes]]) -> None:
        if self.address is None:
            self._recovered()
            return
        self._unqueued.extend(queued)
        try:
            if self._queue is None:
                self._queue = AuditQueue(self.data_dir / QUEUE_FILE)
            self._queue.put(self._unqueued)
        except Exception as exc:
            self._failed("queue", exc)
            if len(self._unqueued) > MAX_UNQUEUED:  # only in the file from here on
                log.error("audit.not_queued", messages=len(self._unqueued) - MAX_UNQUEUED)
                del self._unqueued[: len(self._unqueued) - MAX_UNQUEUED]
            time.sleep(FLUSH_S * 10)
            return
        self._unqueued = []
        self._recovered()
        if self._loop is not None and self._queued is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed
                self._loop.call_soon_threadsafe(self._queued.set)

    def _failed(self, where: str, exc: Exception) -> None:
        if not self._failing:  # once until it works again
            log.error("audit.write_failed", to=where, error=type(exc).__name__)
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("audit.writing_again")
            self._failing = False

    def _append(self, data: bytes) -> None:
        if self._fd is not None and self._moved():  # rotated: a new file where the old one was
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
            raise

    def _moved(self) -> bool:
        assert self._fd is not None
        try:
            return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True

    # -- the relay (main process) ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay (in the process that sends, with a repository configured)."""
        if not self.relays or self._relay is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._queued = asyncio.Event()
        assert self.address is not None
        host, port = self.address
        self._sender = SyslogSender(host, port, self.ssl_context, server_name=self.settings.tls.server_name)
        self._relay = asyncio.create_task(self._run_relay(), name="audit-relay")

    def _queue_now(self) -> AuditQueue:
        if self._queue is None:
            self._queue = AuditQueue(self.data_dir / QUEUE_FILE)
        return self._queue

    async def _send_some(self) -> int:
        """Send the oldest queued messages once; how many (0: the queue is empty). Raises when the repository
        does not take them."""
        assert self._sender is not None
        queue = await asyncio.to_thread(self._queue_now)
        batch = await asyncio.to_thread(queue.take, RELAY_BATCH, RELAY_BATCH_BYTES)
        if not batch:
            metrics.audit_queue_depth.set(0)
            return 0
        pid = str(os.getpid())
        messages = [
            format_message(q.message, at=q.at, hostname=self.source.host_name, procid=pid, failed=q.outcome != 0)
            for q in batch
        ]
        await self._sender.send(messages)  # returns once the repository's TCP stack acknowledged every byte
        await asyncio.to_thread(queue.done, [q.id for q in batch])
        await self._refresh_depth(queue)
        return len(batch)

    async def _refresh_depth(self, queue: AuditQueue, *, now: bool = False) -> None:
        """The queue depth gauge, at most every `DEPTH_EVERY_S` unless ``now``."""
        if not now and time.monotonic() - self._depth_at < DEPTH_EVERY_S:
            return
        self._depth_at = time.monotonic()
        metrics.audit_queue_depth.set(await asyncio.to_thread(queue.depth))

    async def _run_relay(self) -> None:
        assert self._queued is not None
        backoff = MIN_BACKOFF_S
        pruned = time.monotonic()
        repository = self.settings.repository
        while True:
            try:
                sent = await self._send_some()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self.repository_down:  # once per outage, not per message
                    self.repository_down = True
                    log.warning("audit.repository_down", repository=repository, error=type(exc).__name__)
                with contextlib.suppress(Exception):
                    await self._refresh_depth(await asyncio.to_thread(self._queue_now))
                if self._stopping:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            if self.repository_down:
                self.repository_down = False
                log.info("audit.repository_back", repository=repository)
            backoff = MIN_BACKOFF_S
            if time.monotonic() - pruned > PRUNE_EVERY_S:
                pruned = time.monotonic()
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._queue_now().prune)
            if not sent:
                if self._stopping:
                    return
                self._queued.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), RELAY_POLL_S)

    async def close(self) -> None:
        """Write what was recorded (file and queue), send what the repository takes within `STOP_DRAIN_S` (the
        rest stays queued for the next run), stop."""
        await asyncio.to_thread(self.flush, CLOSE_FLUSH_S)
        if self._relay is not None:
            assert self._queued is not None
            self._stopping = True
            self._queued.set()
            done, _ = await asyncio.wait({self._relay}, timeout=STOP_DRAIN_S)
            if not done:
                self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relay
            self._relay = None
        if self._sender is not None:
            await self._sender.close()
        with self._lock:
            self._closing = True
            self._wake.set()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, CLOSE_WAIT_S)
        with self._lock:
            if self._thread is not None:  # still writing (a slow disk): it closes the file and queue itself
                self._abandoned = True
                log.warning("audit.writer_still_running")
                return
        self._release()

    def _release(self) -> None:
        """Close the file and the queue (by close(), or by the writer thread once close() stopped waiting)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self._queue.close()
            self._queue = None

    # -- events of the engine itself -------------------------------------------------------------------------------

    def started(self, config: Config) -> None:
        """Record the engine's start, and a configuration change when its digest differs from the last start's
        (kept in ``audit-config.sha256`` in the data folder; none recorded on the very first start)."""
        self.record(application_activity("start"))
        digest = config_digest(config)
        path = self.data_dir / CONFIG_HASH_FILE
        try:
            previous = path.read_text().strip() if path.exists() else ""
            if previous != digest:
                if previous:
                    self.record(configuration_changed(by=None, what=config.path or "configuration"))
                tmp = path.with_suffix(".tmp")
                tmp.write_text(digest + "\n")
                os.replace(tmp, path)
        except OSError as exc:
            log.warning("audit.config_digest_failed", error=type(exc).__name__)

    def stopping(self) -> None:
        self.record(application_activity("stop"))


MAPPING_SUFFIXES = (".yaml", ".yml", ".csv", ".toml", ".json")
MAX_DIGESTED_FILES = 200  # files of a configuration whose content counts in its digest


def mapping_files(config: Config) -> list[Path]:
    """The files the channels name (mappings, code tables, CDA mappings...) and the code tables beside each mapping
    (``tables/*.csv``): an integrator editing one changes what the engine does with patient data."""
    found: dict[Path, None] = {}

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.endswith(MAPPING_SUFFIXES) and len(found) < MAX_DIGESTED_FILES:
            path = resolve(config, value)
            if path.is_file():
                found[path] = None
                tables = path.parent / "tables"
                if tables.is_dir():
                    for table in sorted(tables.glob("*.csv"))[:MAX_DIGESTED_FILES]:
                        found[table] = None

    walk(config.channels)
    return list(found)[:MAX_DIGESTED_FILES]


def config_digest(config: Config) -> str:
    """SHA-256 of the configuration as loaded (every setting, the channels, and the content of the mapping files and
    code tables they name; not the file's path)."""
    digest = hashlib.sha256(_settings_text(config).encode())
    for path in mapping_files(config):
        try:
            digest.update(f"\n{path.name}\n".encode() + hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(f"\n{path.name}\n-".encode())
    return digest.hexdigest()


def _settings_text(config: Config) -> str:

    def plain(value: Any) -> Any:
        if isinstance(value, set | frozenset):
            return sorted(map(str, value))
        return type(value).__name__  # an object without a stable text of its own

    try:
        data = {k: v for k, v in dataclasses.asdict(config).items() if k != "path"}
        return json.dumps(data, sort_keys=True, default=plain)
    except Exception:
        return Path(config.path).read_text() if config.path else repr(config.channels)
