"""The FHIR server destination of the ``fhir`` channel: the channel's resources → transaction Bundles of
conditional updates on a FHIR R4 server (HAPI, medplum, Azure, Google...).

How it flows:

* The ``fhir`` channel, once an event's resources are committed to its store, publishes one *push message*
  naming them (``traboule.formats.fhir_push``: topic ``fhir.<channel>.push``, body a JSON list of ``[type, id]``)
  before the event is acknowledged. A crash in between redelivers the event, which names the same resources again.
* This destination consumes them (queue ``<channel>.push``) and reads the **current** version of each resource
  at send time: a retry or a late redelivery always sends the latest state, never an older one, and a resource
  changed three times while the server was down is sent once.
* Each resource is a conditional update ``PUT Type?identifier=system|value`` on the identifier its id derives
  from (``urn:dicom:uid`` for ImagingStudy): the server updates its match or creates it, so a redelivered Bundle
  never duplicates anything. References between resources (subject, basedOn, link) are rewritten to the Bundle's
  ``urn:uuid:`` fullUrls, or to the server's ``Type/id`` for a resource it already holds at its current version;
  referenced resources the server has not got yet ride in the same Bundle (one transaction, all or nothing).
* ``remote`` in the store records which version the server holds and under which id: already-sent versions are
  skipped.

Failures: 5xx, 429, timeouts and refused connections are retried inside the handler with exponential backoff
(1 s doubling to 30 s) for ``retry_window`` seconds, so a server outage holds one delivery while the others
wait in the queue; then the attempt counts (bus backoff), and after ``max_attempts`` the message goes to
``<channel>.push.dlq``. Any other 4xx is final: a Bundle of several messages is split (the bus hands each alone);
a single one is journaled as ``undelivered`` with the Bundle sent and the server's OperationOutcome, and
dead-lettered at once (``traboule dlq replay`` sends the then-current state again).

Configuration (the channel's ``destination`` table)::

    destination = {adapter = "fhir-server", base_url = "https://fhir.example.org/fhir/R4", timeout = 10,
                   token_env = "FHIR_TOKEN", tls = { ca_file = "", cert_file = "", key_file = "" },
                   max_bundle = 50, retry_window = 300, max_attempts = 12}

``tls``: the server's TLS settings over the ``[tls]`` defaults (`traboule.app.config.destination_tls`; the older
``ca_file`` / ``cert_file`` / ``key_file`` keys of the destination are still read).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import structlog

from traboule import metrics
from traboule.adapters.fhir_client import (
    FHIRClient,
    conditional_update,
    identifier_search,
    new_full_url,
)
from traboule.app.config import destination_tls, is_loopback
from traboule.app.health import DestinationHealth
from traboule.bus import Delivery
from traboule.channel import recording
from traboule.errors import ConfigError, FHIRServerError, PermanentError
from traboule.formats.fhir_push import Key, push_keys, push_queue, push_topic
from traboule.stores import FHIRStore, journal
from traboule.stores.factory import stores_of
from traboule.translate.fhir_mapping import key_identifier

log = structlog.get_logger("traboule.channels.fhir_push")

ORDER = {"Patient": 0, "ServiceRequest": 1, "ImagingStudy": 2, "DocumentReference": 3, "DiagnosticReport": 4}
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0


class FHIRPush:
    """Consumer of a ``fhir`` channel's push messages, delivering to one FHIR server."""

    def __init__(
        self, channel: str, config: dict[str, Any], store: FHIRStore, runtime: Any, public_base: str = ""
    ) -> None:
        """``public_base``: the base URL of traboule's own ``/fhir`` as the FHIR server's users reach it; the
        document attachments (``Binary/{id}``, served by traboule) are sent with that absolute URL, or without a
        URL when it is not configured (a relative one would point at the server's own, missing, Binary)."""
        if config.get("adapter", "fhir-server") != "fhir-server":
            raise ConfigError(f"channel {channel}: destination adapter {config.get('adapter')!r} not supported")
        base_url = str(config.get("base_url", ""))
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"channel {channel}: destination.base_url must be an http(s) URL, not {base_url!r}")
        self.channel = channel
        self.public_base = public_base.rstrip("/")
        self.queue = push_queue(channel)
        self.store = store
        self.runtime = runtime
        self.base_url = base_url
        self.max_bundle = int(config.get("max_bundle", 50))
        self.retry_window = float(config.get("retry_window", 300))
        self.max_attempts = int(config.get("max_attempts", 12))
        headers = {}
        token_env = str(config.get("token_env", ""))
        host = urlsplit(base_url).hostname or ""
        if token_env and not base_url.startswith("https://") and not is_loopback(host):
            raise ConfigError(f"channel {channel}: a bearer token is sent over https only (base_url {base_url!r})")
        if token_env:
            token = os.environ.get(token_env, "")
            if not token:
                raise ConfigError(f"channel {channel}: destination.token_env names {token_env}, which is not set")
            headers["Authorization"] = f"Bearer {token}"
        self.client = FHIRClient(
            base_url,
            timeout=float(config.get("timeout", 10)),
            headers=headers,
            tls=destination_tls(config, f"channel {channel}: destination", getattr(runtime.config, "tls", None)),
        )
        self._log = log.bind(channel=channel, destination=base_url)
        self.destination = DestinationHealth(base_url)

    async def start(self) -> None:
        await self.runtime.bus.subscribe_batch(
            self.queue, [push_topic(self.channel)], self.handle, max_attempts=self.max_attempts, max_batch=100
        )

    async def stop(self) -> None:
        await self.client.close()

    # -- consuming ----------------------------------------------------------------------------------------

    async def handle(self, deliveries: list[Delivery]) -> None:
        items = [
            (d.headers.get("idempotency-key", ""), d.headers.get("correlation-id", ""), d.attempt) for d in deliveries
        ]
        notes: dict[str, tuple[str, str]] = {}
        self._answers: list[str] = []  # what the server answered, for the delivery log
        with (
            metrics.delivering(self.queue, len(deliveries)),
            recording(self.runtime, self.queue, items, notes, self.max_attempts),
        ):
            await self._handle(deliveries)
            notes.update((key, ("applied", "; ".join(self._answers))) for key, _, _ in items)

    async def _handle(self, deliveries: list[Delivery]) -> None:
        groups = [push_keys(d.body) for d in deliveries]
        chunk: list[Key] = []
        for keys in groups:
            if chunk and len(chunk) + len(keys) > self.max_bundle:
                await self._deliver(chunk, deliveries)
                chunk = []
            chunk.extend(k for k in keys if k not in chunk)
        if chunk:
            await self._deliver(chunk, deliveries)
        metrics.events_processed.labels(self.queue, "delivered").inc(len(deliveries))

    async def _deliver(self, keys: list[Key], deliveries: list[Delivery]) -> None:
        """Send ``keys`` (as they are now) in one transaction, waiting out server outages up to ``retry_window``."""
        deadline = time.monotonic() + self.retry_window
        backoff = FIRST_BACKOFF
        while True:
            entries, sent = await asyncio.to_thread(self.bundle, keys)
            if not entries:
                return
            started = time.perf_counter()
            try:
                response = await self.client.transaction(entries)
            except FHIRServerError as exc:
                self.destination.failed(exc)
                if exc.retryable:
                    if time.monotonic() + backoff > deadline:
                        raise
                    # The status, not the text: a server's diagnostics may quote the resources' values.
                    self._log.warning(
                        "fhir.push_retry",
                        status=exc.status,
                        error=type(exc).__name__,
                        wait_s=backoff,
                        entries=len(entries),
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                await self._refused(exc, entries, deliveries)
                raise  # several messages: the bus hands each alone, to isolate the one refused
            self.destination.succeeded()
            await asyncio.to_thread(self._remember, sent, response)
            self._answers.append(answered(response))
            self._log.info(
                "fhir.pushed",
                message_ids=[d.message_id for d in deliveries],
                correlation_id=deliveries[0].headers.get("correlation-id", ""),
                entries=len(entries),
                ms=round((time.perf_counter() - started) * 1000, 1),
            )
            return

    async def _refused(self, exc: FHIRServerError, entries: list[dict[str, Any]], deliveries: list[Delivery]) -> None:
        """A final refusal of a single message: journal it with the OperationOutcome, dead-letter it now."""
        if len(deliveries) > 1:
            return
        delivery = deliveries[0]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
        error = str(exc)  # "POST <url>: HTTP <status>: <issues>"
        if exc.operation_outcome is not None:
            error += "\n" + json.dumps(exc.operation_outcome, ensure_ascii=False)
        entry = journal.JournalEntry(
            channel=self.queue,
            raw=json.dumps(bundle, ensure_ascii=False, indent=1).encode(),
            status="undelivered",
            peer=self.base_url,
            control_id=delivery.message_id,
            message_type="FHIR transaction",
            ack_code=str(exc.status),
            error=error,
            correlation_id=delivery.headers.get("correlation-id", ""),
        )
        recorded = await asyncio.to_thread(stores_of(self.runtime).record, entry)
        metrics.events_processed.labels(self.queue, "refused").inc()
        self._log.error(
            "fhir.push_refused",
            message_id=delivery.message_id,
            correlation_id=entry.correlation_id,
            status=exc.status,
            journal_id=recorded.id,
        )
        raise PermanentError(f"{error.partition(chr(10))[0]} (journal entry {recorded.id})") from exc

    # -- the Bundle ---------------------------------------------------------------------------------------

    def bundle(self, keys: list[Key]) -> tuple[list[dict[str, Any]], list[tuple[Key, int, str]]]:
        """Transaction entries for ``keys`` and the resources they reference that the server lacks; with, per
        entry, (key, version sent, fullUrl). Resources the server holds at their current version are left out."""
        todo: dict[Key, dict[str, Any]] = {}
        references: dict[str, str] = {}  # local "Type/id" → server "Type/id" for resources left out

        def visit(key: Key, depth: int) -> None:
            if key in todo or f"{key[0]}/{key[1]}" in references or depth > 3:
                return
            resource, remote = self.store.get_with_remote(*key)
            if resource is None:
                return
            if remote is not None and remote[0] >= int(resource["meta"]["versionId"]):
                references[f"{key[0]}/{key[1]}"] = remote[1]
                return
            todo[key] = resource
            for ref in _references(resource):
                rtype, _, rid = ref.partition("/")
                if rtype in ORDER and rid:
                    visit((rtype, rid), depth + 1)

        for key in keys:
            visit(key, 0)
        ordered = []
        for key in sorted(todo, key=lambda k: ORDER.get(k[0], 9)):
            if key_identifier(todo[key]) is None:  # nothing to match it on: not sent, references to it left as are
                self._log.warning("fhir.push_skipped", resource_type=key[0], id=key[1], reason="no identifier")
                continue
            ordered.append(key)
        urls = {k: new_full_url() for k in ordered}
        references.update({f"{k[0]}/{k[1]}": urls[k] for k in ordered})
        entries, sent = [], []
        for key in ordered:
            resource = todo[key]
            ident = key_identifier(resource)
            assert ident is not None
            body = _rewrite({k: v for k, v in resource.items() if k not in ("id", "meta")}, references)
            body = _attachments(body, self.public_base)
            query = identifier_search(ident.get("system", ""), ident["value"])
            entries.append(conditional_update(body, f"{key[0]}?{query}", full_url=urls[key]))
            sent.append((key, int(resource["meta"]["versionId"]), urls[key]))
        return entries, sent

    def _remember(self, sent: list[tuple[Key, int, str]], response: dict[str, Any]) -> None:
        rows = []
        for (key, version, _), entry in zip(sent, response.get("entry") or [], strict=False):
            location = (entry.get("response") or {}).get("location", "") or ""
            resource = entry.get("resource") or {}
            parts = location.split("/_history")[0].rstrip("/").split("/")
            server_ref = "/".join(parts[-2:]) if len(parts) >= 2 else ""
            if resource.get("id"):
                server_ref = f"{key[0]}/{resource['id']}"
            if server_ref:
                rows.append((key[0], key[1], version, server_ref))
        self.store.set_remote(rows)


_ANSWERED = re.compile(r"[A-Z][A-Za-z]{1,40}/[A-Za-z0-9.-]{1,64}(?:/_history/[A-Za-z0-9.-]{1,64})?$")


def answered(response: dict[str, Any]) -> str:
    """What a transaction's answer says was written (``Patient/12/_history/3 201 Created``...), each location
    kept only when it is a plain FHIR reference, at most 10 of them: for the delivery log."""
    said = []
    entries = response.get("entry") or []
    for entry in entries[:10]:
        answer = (entry or {}).get("response") or {}
        location = str(answer.get("location", "") or "")
        found = _ANSWERED.search(location.strip())
        status = str(answer.get("status", "") or "")[:3]
        said.append(" ".join(p for p in (found.group(0) if found else "", status) if p))
    more = f" (+{len(entries) - 10})" if len(entries) > 10 else ""
    return ", ".join(said) + more


def _references(value: Any) -> list[str]:
    """Every ``reference`` string inside a resource (contained ``#id`` references excluded)."""
    out: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str) and not v.startswith("#"):
                out.append(v)
            elif k != "contained":
                out.extend(_references(v))
    elif isinstance(value, list):
        for item in value:
            out.extend(_references(item))
    return out


def _rewrite(value: Any, references: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            k: references.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, references)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, references) for v in value]
    return value


def _attachments(resource: dict[str, Any], public_base: str) -> dict[str, Any]:
    """Attachment URLs relative to traboule's API made absolute (or dropped without a public base)."""
    if resource.get("resourceType") not in ("DocumentReference", "DiagnosticReport"):
        return resource

    def fix(attachment: dict[str, Any]) -> dict[str, Any]:
        url = attachment.get("url", "")
        if not url.startswith("Binary/"):
            return attachment
        if public_base:
            return {**attachment, "url": f"{public_base}/{url}"}
        return {k: v for k, v in attachment.items() if k != "url"}

    out = dict(resource)
    if "content" in out:
        out["content"] = [{**c, "attachment": fix(c.get("attachment") or {})} for c in out["content"]]
    if "presentedForm" in out:
        out["presentedForm"] = [fix(a) for a in out["presentedForm"]]
    return out
