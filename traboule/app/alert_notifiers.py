"""Where alert notifications go: a webhook (an HTTP POST of the incident as JSON) or e-mail (SMTP).

A notification is queued in the incidents store with its incident (`traboule.stores.incidents`) and delivered from
there: `deliver_due` hands each due one to its notifier; a failure (the webhook down, an SMTP error) pushes its next
attempt back (`backoff`: doubling from ``retry`` seconds up to `MAX_BACKOFF`), so a notification is delivered once
its notifier answers again, never lost and never sent twice by this engine (a receiver may still see one again
when the engine stops between its answer and the record of the delivery: the body's ``notification`` id tells).

Secrets (a bearer token, header values, an SMTP password, a webhook URL's query or user part) come from the
configuration or the environment and are never logged: a failure logs the notifier's name and the error's type
only, and httpx's own request lines (debug level) show a webhook's URL as ``scheme://host:port/path``. The body
holds rule and channel names, numbers and times: no patient data.

TLS (an https webhook, SMTPS or STARTTLS) uses the engine's TLS profile (`traboule.tls.client_context`) with the
notifier's ``tls`` settings over the ``[tls]`` defaults: the CAs trusted (the system's when none), a client
certificate, the minimum version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from traboule import metrics
from traboule.stores.incidents import IncidentStore, Notification
from traboule.tls import TLSSettings, client_context, http_client_options

log = structlog.get_logger("traboule.app.alerts")

MAX_BACKOFF = 600.0  # seconds: the longest wait between two attempts of one notification
BATCH = 50


@dataclass(frozen=True)
class WebhookNotifier:
    """``kind = "webhook"``: POST the notification's JSON to ``url``; any 2xx is a delivery."""

    name: str
    url: str = field(repr=False)  # its query or user part may hold a token: never logged (`where` is)
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # may hold a secret: never logged
    timeout: float = 10.0
    tls: TLSSettings = field(default_factory=TLSSettings, repr=False)  # an https URL's

    @property
    def where(self) -> str:
        """``scheme://host:port/path`` of the URL: what may be shown or logged of it."""
        return safe_url(self.url)

    async def send(self, body: dict[str, Any], client: httpx.AsyncClient) -> None:
        if urlsplit(self.url).scheme.lower() == "https":  # its own TLS settings: a client of its own
            async with httpx.AsyncClient(follow_redirects=False, **http_client_options(self.tls)) as own:
                answer = await own.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
        else:
            answer = await client.post(self.url, json=body, headers=self.headers, timeout=self.timeout)
        if not 200 <= answer.status_code < 300:
            raise ConnectionError(f"HTTP {answer.status_code}")


@dataclass(frozen=True)
class SMTPNotifier:
    """``kind = "smtp"``: one plain-text mail (French, then English) per notification, to every ``to`` address."""

    name: str
    host: str
    port: int
    sender: str
    to: tuple[str, ...]
    starttls: bool = False
    tls: bool = False  # TLS from the first byte (SMTPS, port 465)
    username: str = ""
    password: str = field(default="", repr=False)  # never logged
    timeout: float = 10.0
    subject_prefix: str = "[traboule]"
    tls_settings: TLSSettings = field(default_factory=TLSSettings, repr=False)  # of SMTPS or STARTTLS

    async def send(self, body: dict[str, Any], client: httpx.AsyncClient | None = None) -> None:
        await asyncio.to_thread(self._send, message(body, self))

    def _send(self, mail: EmailMessage) -> None:
        if self.tls:
            connection: smtplib.SMTP = smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=client_context(self.tls_settings)
            )
        else:
            connection = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with connection as smtp:
            if self.starttls:
                smtp.starttls(context=client_context(self.tls_settings))
            if self.username:
                smtp.login(self.username, self.password)
            smtp.send_message(mail)


Notifier = WebhookNotifier | SMTPNotifier


def safe_url(url: str) -> str:
    """``scheme://host:port/path`` of ``url``: without its user part, query and fragment (they may hold a token)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<invalid url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{parts.path}"


class _RedactWebhookURLs(logging.Filter):
    """httpx logs each request's whole URL (at debug level): of the webhooks' URLs, keep only `safe_url`."""

    def __init__(self, notifiers: dict[str, Notifier]) -> None:
        super().__init__()
        urls = [httpx.URL(n.url) for n in notifiers.values() if isinstance(n, WebhookNotifier)]
        self.targets = {(url.host, url.path or "/") for url in urls}

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                safe_url(str(a)) if isinstance(a, httpx.URL) and (a.host, a.path or "/") in self.targets else a
                for a in record.args
            )
        return True


@contextlib.contextmanager
def redacted_webhook_urls(notifiers: dict[str, Notifier]) -> Iterator[None]:
    """While delivering: httpx's request log lines show the webhooks' URLs without user part, query or fragment."""
    redact = _RedactWebhookURLs(notifiers)
    logger = logging.getLogger("httpx")
    logger.addFilter(redact)
    try:
        yield
    finally:
        logger.removeFilter(redact)


def message(body: dict[str, Any], notifier: SMTPNotifier) -> EmailMessage:
    """The mail of a notification: subject and a plain-text body in French then English."""
    state = body.get("state", "")
    reminder = body.get("reminder", False)
    word_fr = {"open": "RAPPEL: incident ouvert" if reminder else "incident ouvert", "resolved": "incident résolu"}
    word_en = {"open": "REMINDER: incident open" if reminder else "incident open", "resolved": "incident resolved"}
    mail = EmailMessage()
    mail["From"] = notifier.sender
    mail["To"] = ", ".join(notifier.to)
    mail["Subject"] = (
        f"{notifier.subject_prefix} {word_en.get(state, state)}: {body.get('rule')} on {body.get('channel')}"
    ).strip()
    duration = body.get("duration_s")
    lines_fr = [
        f"{word_fr.get(state, state).capitalize()} : règle {body.get('rule')} ({body.get('kind')}),"
        f" canal {body.get('channel')}.",
        f"Valeur : {body.get('value')} (seuil {body.get('threshold')}).",
        f"Ouvert : {body.get('opened')}.",
    ]
    lines_en = [
        f"{word_en.get(state, state).capitalize()}: rule {body.get('rule')} ({body.get('kind')}),"
        f" channel {body.get('channel')}.",
        f"Value: {body.get('value')} (threshold {body.get('threshold')}).",
        f"Opened: {body.get('opened')}.",
    ]
    if state == "resolved":
        lines_fr.append(f"Résolu : {body.get('resolved')} (durée {_duration(duration)}).")
        lines_en.append(f"Resolved: {body.get('resolved')} (lasted {_duration(duration)}).")
    lines_fr.append(f"{body.get('summary_fr', '')}")
    lines_en.append(f"{body.get('summary', '')}")
    tail = f"Incident {body.get('incident')} — notification {body.get('notification')}"
    mail.set_content("\n".join([*lines_fr, "", *lines_en, "", tail, ""]))
    return mail


def _duration(seconds: Any) -> str:
    try:
        total = int(float(seconds))
    except (TypeError, ValueError):
        return "?"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def backoff(attempts: int, retry: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``retry`` doubling, at most `MAX_BACKOFF`."""
    return min(MAX_BACKOFF, retry * (2 ** max(0, attempts - 1)))


async def deliver_due(
    store: IncidentStore,
    notifiers: dict[str, Notifier],
    client: httpx.AsyncClient,
    *,
    retry: float,
    now: float | None = None,
) -> int:
    """Deliver the notifications due now (store calls in a worker thread); returns how many were delivered."""
    moment = time.time() if now is None else now
    due: list[Notification] = await asyncio.to_thread(store.due, moment, BATCH)
    delivered = 0
    for item in due:
        notifier = notifiers.get(item.notifier)
        if notifier is None:  # removed from the configuration since it was queued: kept, retried rarely
            await asyncio.to_thread(store.failed, item.id, moment + MAX_BACKOFF, "notifier not configured")
            continue
        body = json.loads(item.body)
        body["notification"] = item.id
        try:
            await notifier.send(body, client)
        except Exception as exc:  # the peer down or refusing: retried later, never lost
            attempts = item.attempts + 1
            wait = backoff(attempts, retry)
            metrics.alert_notifications.labels(item.notifier, "failed").inc()
            log.warning(
                "alerts.notification_failed",
                notifier=item.notifier,
                incident=item.incident,
                notification=item.event,
                attempts=attempts,
                retry_in_s=round(wait, 1),
                error=type(exc).__name__,
            )
            await asyncio.to_thread(store.failed, item.id, time.time() + wait, type(exc).__name__)
            continue
        await asyncio.to_thread(store.delivered, item.id, _now_iso())
        metrics.alert_notifications.labels(item.notifier, "sent").inc()
        log.info("alerts.notification_sent", notifier=item.notifier, incident=item.incident, notification=item.event)
        delivered += 1
    return delivered


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
