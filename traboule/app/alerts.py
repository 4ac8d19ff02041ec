"""Alerts: rules per channel, one incident per problem (opened once, resolved once), notified by webhook or e-mail.

Rule kinds (``[[alerts.rule]]``, see docs/operations.md "Alerts"):

* ``rejected_rate``: the share of rejected messages (AE/AR: journal status ``rejected``) among the channel's received
  ones over ``window``, above ``threshold`` (0..1) once at least ``min_count`` messages came;
* ``dead_letters``: more than ``threshold`` (default 0) messages in the channel's dead-letter queues;
* ``destination_down``: the channel's health says ``down`` (or ``degraded`` too with ``degraded = true``): the
  channels of the main process, and those of the other processes through their /health (a process that does not
  answer: its channels are down);
* ``queue_depth``: more than ``threshold`` messages waiting in the channel's bus queues, or in the journal's
  outbox (``channel = "outbox"``);
* ``silence``: no message received on an inbound channel for ``window`` during working hours (``hours``, default
  ``[alerts] working_hours``, in ``[alerts] timezone``); outside them the rule neither opens nor resolves anything.

``channel = "*"`` applies a rule to every channel it fits (inbound channels for ``rejected_rate`` and ``silence``,
consuming ones for ``dead_letters`` and ``queue_depth``, every channel reporting health for ``destination_down``).

The state machine (`Incidents.step`, pure, its clock given): a condition must hold ``for`` before its incident
opens (one notification); while it holds nothing more is sent (a reminder every ``remind`` when set); once it has
been false for ``clear`` (default: ``for``) the incident resolves (one notification with its duration). A reading
that cannot be made (the database not answering, outside working hours) changes nothing. Incidents and their
queued notifications are stored (`traboule.stores.incidents`): a restart neither forgets an open incident nor
notifies it again; an open incident no configured rule watches any more is resolved, without a notification, when
evaluation starts (`retire`). On several nodes one evaluates at a time (the ``alerts`` lease).

No patient data in an alert: rule and channel names, counts, rates, times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from datetime import time as clock_time
from typing import Any, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
import structlog

from traboule import metrics
from traboule.app.alert_notifiers import (
    Notifier,
    SMTPNotifier,
    WebhookNotifier,
    deliver_due,
    redacted_webhook_urls,
)
from traboule.app.leadership import while_leading
from traboule.errors import ConfigError
from traboule.stores.incidents import Incident, IncidentStore
from traboule.stores.journal import Query

T = TypeVar("T")

log = structlog.get_logger("traboule.app.alerts")

KINDS = ("rejected_rate", "dead_letters", "destination_down", "queue_depth", "silence")
INTERVAL = 15.0  # seconds between two evaluations
RETRY = 5.0  # seconds before a failed notification's first retry (then doubling)
RECENT = 50  # resolved incidents `list_incidents` returns with the open ones
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
OUTBOX = "outbox"  # the channel name of a queue_depth rule on the journal's outbox


# -- configuration ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkingHours:
    """Days and hours, e.g. ``Mon-Fri 07:00-19:00, Sat 08:00-12:00``, in a time zone."""

    spans: tuple[tuple[frozenset[int], clock_time, clock_time], ...]
    zone: ZoneInfo
    text: str = ""

    def period_start(self, moment: datetime) -> datetime | None:
        """When the working period containing ``moment`` began (aware, UTC), or None outside working hours."""
        local = moment.astimezone(self.zone)
        for days, start, end in self.spans:
            if local.weekday() in days and start <= local.time() < end:
                began = local.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
                return began.astimezone(UTC)
        return None


_SPAN = re.compile(r"\s*([A-Za-z]{3})(?:\s*-\s*([A-Za-z]{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def parse_hours(text: Any, zone: ZoneInfo, what: str) -> WorkingHours:
    """``"Mon-Fri 07:00-19:00"`` (several spans comma-separated; ``24:00`` ends a day)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f'{what}: working hours such as "Mon-Fri 07:00-19:00", not {text!r}')
    spans = []
    for part in text.split(","):
        match = _SPAN.fullmatch(part)
        if not match or match[1].lower() not in DAYS or (match[2] and match[2].lower() not in DAYS):
            raise ConfigError(f'{what}: {part.strip()!r} is not "Mon-Fri 07:00-19:00" (days Mon..Sun, hours HH:MM)')
        first = DAYS.index(match[1].lower())
        last = DAYS.index(match[2].lower()) if match[2] else first
        days = frozenset(range(first, last + 1)) if first <= last else frozenset([*range(first, 7), *range(last + 1)])
        h1, m1, h2, m2 = (int(match[i]) for i in (3, 4, 5, 6))
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
            raise ConfigError(f"{what}: {part.strip()!r}: hours are 00:00 to 24:00")
        start = clock_time(h1, m1)
        end = clock_time.max if h2 == 24 else clock_time(h2, m2)
        if end <= start:
            raise ConfigError(f"{what}: {part.strip()!r}: the end comes before the start")
        spans.append((days, start, end))
    return WorkingHours(tuple(spans), zone, text.strip())


@dataclass(frozen=True)
class Rule:
    """One ``[[alerts.rule]]``."""

    name: str
    kind: str
    channel: str  # a channel's name, "*" (every channel the kind fits) or "outbox" (queue_depth)
    threshold: float = 0.0
    window: float = 900.0  # seconds: rejected_rate's window, silence's quiet time
    min_count: int = 10
    for_s: float = 0.0
    clear_s: float = 0.0
    remind_s: float = 0.0  # 0: no reminder
    notify: tuple[str, ...] = ()
    degraded: bool = False  # destination_down: degraded counts as down
    hours: WorkingHours | None = None  # silence

    def breached(self, value: float) -> bool:
        if self.kind == "destination_down":
            return value >= 1
        if self.kind == "silence":
            return value == 0
        return value > self.threshold


@dataclass
class AlertsConfig:
    """``[alerts]``: the rules, the notifiers, the evaluation interval."""

    rules: list[Rule] = field(default_factory=list)
    notifiers: dict[str, Notifier] = field(default_factory=dict)
    interval: float = INTERVAL
    retry: float = RETRY
    working_hours: WorkingHours | None = None
    timezone: str = "Europe/Paris"


RULE_KEYS = {
    "name",
    "kind",
    "channel",
    "threshold",
    "window",
    "min_count",
    "for",
    "clear",
    "remind",
    "notify",
    "degraded",
    "hours",
}
KIND_KEYS = {
    "rejected_rate": {"threshold", "window", "min_count"},
    "dead_letters": {"threshold"},
    "destination_down": {"degraded"},
    "queue_depth": {"threshold"},
    "silence": {"window", "hours"},
}


def parse(
    section: Any, channels: Sequence[dict[str, Any]], env: dict[str, str] | None = None, tls: Any = None
) -> AlertsConfig:
    """The ``[alerts]`` table, checked against the configured ``channels`` (``ConfigError`` saying what is wrong).
    ``tls``: the ``[tls]`` defaults (`traboule.tls.TLSSettings`) a notifier's ``tls`` table goes over."""
    from traboule.app.config import seconds

    env = dict(os.environ if env is None else env)
    if not isinstance(section, dict):
        raise ConfigError("[alerts] must be a table")
    unknown = set(section) - {"interval", "retry", "working_hours", "timezone", "rule", "notify"}
    if unknown:
        raise ConfigError(
            f"[alerts]: unknown key(s) {sorted(unknown)} (interval, retry, working_hours, timezone,"
            " [[alerts.rule]], [alerts.notify.<name>])"
        )
    cfg = AlertsConfig()
    cfg.interval = seconds(section.get("interval", INTERVAL), "[alerts] interval")
    if cfg.interval < 1:
        raise ConfigError("[alerts] interval: at least 1 s")
    cfg.retry = seconds(section.get("retry", RETRY), "[alerts] retry")
    if cfg.retry <= 0:
        raise ConfigError("[alerts] retry: a positive duration")
    cfg.timezone = str(section.get("timezone", cfg.timezone))
    try:
        zone = ZoneInfo(cfg.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"[alerts] timezone {cfg.timezone!r}: not a known time zone (e.g. Europe/Paris)") from exc
    if "working_hours" in section:
        cfg.working_hours = parse_hours(section["working_hours"], zone, "[alerts] working_hours")
    notify = section.get("notify", {})
    if not isinstance(notify, dict) or not all(isinstance(v, dict) for v in notify.values()):
        raise ConfigError('[alerts.notify.<name>] must be tables (kind = "webhook" or "smtp")')
    cfg.notifiers = {name: _notifier(str(name), table, env, tls) for name, table in notify.items()}
    rules = section.get("rule", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError("[[alerts.rule]] must be an array of tables")
    names = {str(c.get("name")) for c in channels}
    for n, table in enumerate(rules, 1):
        rule = _rule(table, n, names, cfg, zone)
        if any(r.name == rule.name for r in cfg.rules):
            raise ConfigError(f"[[alerts.rule]] {rule.name}: two rules have that name")
        cfg.rules.append(rule)
    return cfg


def _rule(table: dict[str, Any], n: int, channels: set[str], cfg: AlertsConfig, zone: ZoneInfo) -> Rule:
    from traboule.app.config import seconds

    name = table.get("name")
    what = f"[[alerts.rule]] {name}" if isinstance(name, str) and name else f"[[alerts.rule]] number {n}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"{what}: name = letters, digits, '.', '_' or '-' (64 at most)")
    kind = table.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{what}: kind {kind!r}: one of {', '.join(KINDS)}")
    allowed = KIND_KEYS[kind] | {"name", "kind", "channel", "for", "clear", "remind", "notify"}
    extra = set(table) - allowed
    if extra:
        raise ConfigError(f"{what}: {sorted(extra)} not for a {kind} rule (it takes {sorted(allowed)})")
    channel = table.get("channel")
    known = channels | {"*"} | ({OUTBOX} if kind == "queue_depth" else set())
    if not isinstance(channel, str) or channel not in known:
        raise ConfigError(f'{what}: channel {channel!r} is not a configured channel (nor "*"): {sorted(channels)}')
    rule: dict[str, Any] = {"name": name, "kind": kind, "channel": channel}
    if "threshold" in table:
        value = table["threshold"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{what}: threshold must be a number >= 0")
        if kind == "rejected_rate" and not 0 <= value < 1:
            raise ConfigError(f"{what}: threshold is a share of the received messages, 0 to 1 (0.2: 20 %)")
        rule["threshold"] = float(value)
    elif kind == "rejected_rate":
        raise ConfigError(f"{what}: threshold (a share, e.g. 0.2) is required")
    elif kind == "queue_depth":
        raise ConfigError(f"{what}: threshold (messages waiting) is required")
    if "min_count" in table:
        if isinstance(table["min_count"], bool) or not isinstance(table["min_count"], int) or table["min_count"] < 1:
            raise ConfigError(f"{what}: min_count must be a whole number >= 1")
        rule["min_count"] = table["min_count"]
    if "window" in table:
        rule["window"] = seconds(table["window"], f"{what}: window")
        if rule["window"] < 1:
            raise ConfigError(f"{what}: window must be at least 1 s")
    elif kind == "silence":
        raise ConfigError(f'{what}: window (how long without a message, e.g. "30m") is required')
    for key, attr in (("for", "for_s"), ("clear", "clear_s"), ("remind", "remind_s")):
        if key in table:
            rule[attr] = seconds(table[key], f"{what}: {key}")
    rule.setdefault("clear_s", rule.get("for_s", 0.0))
    if "degraded" in table:
        if not isinstance(table["degraded"], bool):
            raise ConfigError(f"{what}: degraded must be true or false")
        rule["degraded"] = table["degraded"]
    if kind == "silence":
        rule["hours"] = parse_hours(table["hours"], zone, f"{what}: hours") if "hours" in table else cfg.working_hours
        if rule["hours"] is None:
            raise ConfigError(f'{what}: a silence rule needs hours ("Mon-Fri 07:00-19:00") or [alerts] working_hours')
    notify = table.get("notify", [])
    if isinstance(notify, str):
        notify = [notify]
    if not isinstance(notify, list) or not notify or not all(isinstance(x, str) for x in notify):
        raise ConfigError(f'{what}: notify = ["<name>", ...], the [alerts.notify.<name>] that receive it')
    missing = [x for x in notify if x not in cfg.notifiers]
    if missing:
        raise ConfigError(f"{what}: notify {missing}: no such [alerts.notify.<name>] (have {sorted(cfg.notifiers)})")
    rule["notify"] = tuple(notify)
    return Rule(**rule)


def _notifier(name: str, table: dict[str, Any], env: dict[str, str], tls_defaults: Any = None) -> Notifier:
    from traboule.app.config import seconds
    from traboule.tls import TLSSettings

    what = f"[alerts.notify.{name}]"
    kind = table.get("kind")
    timeout = seconds(table.get("timeout", 10), f"{what} timeout")
    if timeout <= 0:
        raise ConfigError(f"{what} timeout must be positive")

    def secret(key: str) -> str:
        """``key`` itself, or the environment variable ``<key>_env`` names (which must then be set)."""
        if f"{key}_env" in table:
            variable = str(table[f"{key}_env"])
            if not env.get(variable):
                raise ConfigError(f"{what}: {key}_env names {variable}, which is not set")
            return env[variable]
        value = table.get(key, "")
        if not isinstance(value, str):
            raise ConfigError(f"{what}: {key} must be a string")
        return value

    if kind == "webhook":
        allowed = {"kind", "url", "timeout", "bearer", "bearer_env", "headers", "tls"}
        if set(table) - allowed:
            raise ConfigError(
                f"{what}: unknown key(s) {sorted(set(table) - allowed)} (a webhook takes {sorted(allowed)})"
            )
        url = _webhook_url(table.get("url"), what)
        headers = table.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9-]+", k) and isinstance(v, str) for k, v in headers.items()
        ):
            raise ConfigError(f'{what}: headers = {{ "X-Name" = "value" }} (names of letters, digits and -)')
        for key, value in headers.items():
            if _CONTROL.search(value):  # the value may be a secret: named by its header only
                raise ConfigError(f"{what}: header {key}: its value holds a line break or another control character")
        headers = dict(headers)
        bearer = secret("bearer")
        if bearer:
            if _CONTROL.search(bearer):
                raise ConfigError(f"{what}: bearer: the token holds a line break or another control character")
            headers["Authorization"] = f"Bearer {bearer}"
        if "tls" in table and not isinstance(table["tls"], dict):
            raise ConfigError(f"{what}: tls = {{ ca_file = ..., ... }} (the TLS settings of an https url)")
        settings = TLSSettings.from_config(table.get("tls", True), what, tls_defaults)
        return WebhookNotifier(name, url, headers, timeout, tls=settings)
    if kind == "smtp":
        allowed = {
            "kind",
            "host",
            "port",
            "from",
            "to",
            "starttls",
            "tls",
            "allow_plaintext_password",
            "username",
            "password",
            "password_env",
            "timeout",
            "subject_prefix",
        }
        if set(table) - allowed:
            raise ConfigError(f"{what}: unknown key(s) {sorted(set(table) - allowed)} (smtp takes {sorted(allowed)})")
        host, port = table.get("host"), table.get("port", 25)
        if not isinstance(host, str) or not host:
            raise ConfigError(f"{what}: host (the SMTP server) is required")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"{what}: port must be a port number")
        sender, to = table.get("from"), table.get("to")
        if isinstance(to, str):
            to = [to]
        address = re.compile(r"[^@\s<>,]+@[^@\s<>,]+")
        if not isinstance(sender, str) or not address.fullmatch(sender):
            raise ConfigError(f"{what}: from must be an e-mail address")
        if not isinstance(to, list) or not to or not all(isinstance(a, str) and address.fullmatch(a) for a in to):
            raise ConfigError(f"{what}: to must be an e-mail address or a list of them")
        starttls = table.get("starttls", False)
        tls = table.get("tls", port == SMTPS_PORT and starttls is not True)
        # tls = { ca_file = ... }: the TLS settings, of TLS from the first byte, or of STARTTLS with starttls = true
        settings = TLSSettings.from_config(tls if isinstance(tls, dict) else True, what, tls_defaults)
        if isinstance(tls, dict):
            tls = starttls is not True
        plaintext = table.get("allow_plaintext_password", False)
        for key, flag in (("starttls", starttls), ("tls", tls), ("allow_plaintext_password", plaintext)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{what}: {key} must be true or false")
        if starttls and tls:
            raise ConfigError(
                f"{what}: starttls (upgrade a plain connection, port 587) or tls (TLS from the start, port 465),"
                " not both"
            )
        username, password = secret("username"), secret("password")
        if password and not username:
            raise ConfigError(f"{what}: a password without a username: set username")
        if username and not (starttls or tls or plaintext):
            raise ConfigError(
                f"{what}: the SMTP login (username and password) would go in clear: set starttls = true (port 587) or"
                f" tls = true (port {SMTPS_PORT}), or allow_plaintext_password = true for a server on a trusted network"
            )
        return SMTPNotifier(
            name,
            host,
            port,
            sender,
            tuple(to),
            starttls=starttls,
            tls=tls,
            username=username,
            password=password,
            timeout=timeout,
            subject_prefix=str(table.get("subject_prefix", "[traboule]")),
            tls_settings=settings,
        )
    raise ConfigError(f'{what}: kind {kind!r}: "webhook" or "smtp"')


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # CR, LF, NUL and the other control characters
SMTPS_PORT = 465  # SMTP over TLS from the first byte (``tls`` defaults to true on it)


def _webhook_url(url: Any, what: str) -> str:
    """A webhook's URL checked: http or https, a host, a valid port, no space or control character. Never quoted
    in the error: its query or user part may hold a token."""
    if not isinstance(url, str) or _CONTROL.search(url) or " " in url:
        raise ConfigError(f"{what}: url must be an http:// or https:// URL (no space or control character)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in 0..65535
    except ValueError as exc:
        raise ConfigError(f"{what}: url must be an http:// or https:// URL with a valid port") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: url must be an http:// or https:// URL with a host (https://host[:port]/path)")
    return url


# -- the state machine -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What one rule measured on one channel: ``value`` (None: could not be measured, changes nothing)."""

    rule: Rule
    channel: str
    value: float | None


@dataclass
class Transition:
    """What `Incidents.step` decided: ``open``, ``reminder``, ``resolved`` (notified) or ``value`` (stored)."""

    event: str
    incident: Incident
    rule: Rule


@dataclass
class _Track:
    since: float | None = None  # the condition holds since (no incident yet)
    clear_since: float | None = None  # the open incident's condition is false since


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds")


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Incidents:
    """The incidents of a set of rules over readings taken at given times (pure: no clock, no I/O)."""

    def __init__(self, rules: Iterable[Rule], open_incidents: Iterable[Incident] = ()) -> None:
        self.rules = {r.name: r for r in rules}
        self.open: dict[tuple[str, str], Incident] = {(i.rule, i.channel): i for i in open_incidents}
        self._tracks: dict[tuple[str, str], _Track] = {}

    def step(self, now: float, readings: Iterable[Reading]) -> list[Transition]:
        out: list[Transition] = []
        for reading in readings:
            rule, key = reading.rule, (reading.rule.name, reading.channel)
            if reading.value is None:
                continue
            track = self._tracks.setdefault(key, _Track())
            incident = self.open.get(key)
            if rule.breached(reading.value):
                track.clear_since = None
                if incident is None:
                    track.since = now if track.since is None else track.since
                    if now - track.since >= rule.for_s:
                        incident = Incident(
                            uuid.uuid4().hex, rule.name, rule.kind, reading.channel, _iso(now), "", reading.value
                        )
                        incident.notified = "open"
                        self.open[key] = incident
                        track.since = None
                        out.append(Transition("open", incident, rule))
                    continue
                last_notice = _epoch(incident.reminded or incident.opened)
                changed, incident.last_value = incident.last_value != reading.value, reading.value
                if rule.remind_s and now - last_notice >= rule.remind_s:
                    incident.reminded = _iso(now)
                    out.append(Transition("reminder", incident, rule))
                elif changed:  # stored for the console; an unchanged value writes nothing
                    out.append(Transition("value", incident, rule))
                continue
            track.since = None
            if incident is None:
                continue
            changed, incident.last_value = incident.last_value != reading.value, reading.value
            track.clear_since = now if track.clear_since is None else track.clear_since
            if now - track.clear_since >= rule.clear_s:
                incident.resolved = _iso(now)
                del self.open[key]
                track.clear_since = None
                out.append(Transition("resolved", incident, rule))
            elif changed:
                out.append(Transition("value", incident, rule))
        return out


# -- measuring -------------------------------------------------------------------------------------------------


def inbound_channels(channels: Sequence[dict[str, Any]]) -> list[str]:
    """The channels that receive messages from a sender (a ``source`` listener)."""
    return [str(c["name"]) for c in channels if isinstance(c.get("source"), dict)]


def consuming_queues(channels: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Each channel consuming bus queues → its queues."""
    from traboule.app.runtime import channel_bindings

    found: dict[str, list[str]] = {}
    for c in channels:
        with contextlib.suppress(Exception):  # a kind not installed: `traboule check` says so
            queues = [queue for queue, _ in channel_bindings(c)]
            if queues:
                found[str(c["name"])] = queues
    return found


def targets(rule: Rule, channels: Sequence[dict[str, Any]]) -> list[str]:
    """The channels a rule watches."""
    if rule.channel != "*":
        return [rule.channel]
    if rule.kind in ("rejected_rate", "silence"):
        return inbound_channels(channels)
    if rule.kind in ("dead_letters", "queue_depth"):
        return list(consuming_queues(channels))
    return [str(c["name"]) for c in channels]


def journal_readings(
    journal: Any, rules: Sequence[Rule], targets_of: dict[str, list[str]], now: float
) -> list[Reading]:
    """The readings of the journal's rules (``rejected_rate``, ``silence``); blocking (run it in a thread). A failing
    read gives None (changes nothing)."""
    readings = []
    moment = datetime.fromtimestamp(now, UTC)
    for rule in rules:
        for channel in targets_of[rule.name]:
            value: float | None
            try:
                if rule.kind == "rejected_rate":
                    since = (moment - timedelta(seconds=rule.window)).isoformat(timespec="milliseconds")
                    start = _first_id_since(journal, since)
                    # Both counts up to one id (ids grow in commit order): the same messages, whatever arrives between.
                    upto = journal.last_id()
                    rejected = journal.count(
                        Query(channels=[channel], statuses=["rejected"], since=since, upto=upto), after=start
                    )
                    received = journal.count(
                        Query(
                            channels=[channel], statuses=["accepted", "duplicate", "rejected"], since=since, upto=upto
                        ),
                        after=start,
                    )
                    value = min(1.0, rejected / received) if received >= rule.min_count else 0.0
                elif rule.kind == "silence":
                    assert rule.hours is not None
                    began = rule.hours.period_start(moment)
                    if began is None or (moment - began).total_seconds() < rule.window:
                        value = None  # outside working hours, or not yet ``window`` into them
                    else:
                        since = (moment - timedelta(seconds=rule.window)).isoformat(timespec="milliseconds")
                        start = _first_id_since(journal, since)
                        value = float(journal.count(Query(channels=[channel], since=since), after=start))
                else:
                    continue
            except Exception as exc:  # the journal's database does not answer: no reading
                _failed(rule, channel, exc)
                value = None
            else:
                FAILING.discard((rule.name, channel))
            readings.append(Reading(rule, channel, value))
    return readings


FAILING: set[tuple[str, str]] = set()  # (rule, channel) whose reading fails: logged once per outage


def _failed(rule: Rule, channel: str, exc: Exception) -> None:
    if (rule.name, channel) not in FAILING:
        FAILING.add((rule.name, channel))
        log.warning("alerts.reading_failed", rule=rule.name, channel=channel, error=type(exc).__name__)


def _first_id_since(journal: Any, since: str) -> int:
    """The id after which the entries received since ``since`` are (a binary search on the ids, which grow with
    reception time): a window's count reads the window's rows, not the whole journal."""
    low, high = 0, journal.last_id()
    while low < high:
        mid = (low + high + 1) // 2
        found = journal.select(Query(), after=mid - 1, limit=1)
        if not found:
            high = mid - 1
        elif found[0].received < since:
            low = found[0].id
        else:
            high = mid - 1
    return low


# -- the engine ------------------------------------------------------------------------------------------------


class AlertEngine:
    """The rules of ``[alerts]`` evaluated every ``interval`` in the main process, on the node holding the
    ``alerts`` lease; notifications delivered from the incidents store."""

    def __init__(self, runtime: Any, config: AlertsConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.store: IncidentStore | None = None
        self.journal: Any = None  # a journal of its own, read in a worker thread
        self.machine: Incidents | None = None
        self.lease: Any = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Held by each read of ``journal`` in a thread and by its close: a cancelled task's thread may still be
        # reading when the engine stops, and closing a SQLite connection in use from another thread may crash.
        self._reading = threading.Lock()

    def start(self) -> None:
        self.lease = self.runtime.stores.lease("alerts")
        self._task = asyncio.create_task(self._lead(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.lease is not None:
            with contextlib.suppress(Exception):
                await self.lease.release()
        await self._close()

    async def _close(self) -> None:
        for opened in (self.store, self.journal):
            if opened is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._locked, opened.close)
        self.store = self.journal = self.machine = None

    async def _lead(self) -> None:
        await while_leading(self.lease, self._run, "alerts", after=self._close)

    async def _run(self) -> None:
        delivery = asyncio.create_task(self._deliver(), name="alerts-delivery")
        failing = False
        try:
            while True:
                try:
                    if self.store is None:
                        self.store = await asyncio.to_thread(self.runtime.stores.incidents)
                        self.journal = await asyncio.to_thread(self.runtime.stores.journal)
                        opened = await asyncio.to_thread(self.store.open_incidents)
                        channels = self.runtime.config.channels
                        retired = await asyncio.to_thread(retire, self.store, self.config.rules, channels, time.time())
                        opened = [i for i in opened if i.id not in {r.id for r in retired}]
                        self.machine = Incidents(self.config.rules, opened)
                        log.info("alerts.evaluating", rules=len(self.config.rules), open=len(opened))
                    await self.evaluate(time.time())
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not failing:
                        log.warning("alerts.evaluation_failed", error=type(exc).__name__)
                        failing = True
                    await self._close()
                await asyncio.sleep(self.config.interval)
        finally:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await delivery

    async def evaluate(self, now: float) -> list[Transition]:
        """One evaluation: measure, step the state machine, store what changed (and queue its notifications)."""
        assert self.machine is not None and self.store is not None
        readings = await self.measure(now)
        transitions = self.machine.step(now, readings)
        if transitions:
            stored = await asyncio.to_thread(apply, self.store, transitions, now)
            if stored is not None:
                self.machine.open = {(i.rule, i.channel): i for i in stored}
            if any(t.event != "value" for t in transitions):
                self._wake.set()
        metrics.alerts_open.set(len(self.machine.open))
        return transitions

    async def measure(self, now: float) -> list[Reading]:
        channels = self.runtime.config.channels
        rules = self.config.rules
        targets_of = {r.name: targets(r, channels) for r in rules}
        from_journal = [r for r in rules if r.kind in ("rejected_rate", "silence")]
        readings = await asyncio.to_thread(self._locked, journal_readings, self.journal, from_journal, targets_of, now)
        queues = consuming_queues(channels)
        health: dict[str, Any] | None = None
        for rule in rules:
            for channel in targets_of[rule.name]:
                value: float | None = None
                try:
                    if rule.kind == "dead_letters":
                        value = 0.0
                        for queue in queues.get(channel, []):
                            value += len(await self.runtime.bus.dead_letters(queue, int(rule.threshold) + 1))
                    elif rule.kind == "queue_depth" and channel == OUTBOX:
                        value = float(await self._outbox_depth())
                    elif rule.kind == "queue_depth":
                        value = 0.0
                        for queue in queues.get(channel, []):
                            value += await self.runtime.bus.depth(queue)
                    elif rule.kind == "destination_down":
                        health = await self._health() if health is None else health
                        state = health.get(channel)
                        if state is None:
                            continue
                        down = ("down", "degraded") if rule.degraded else ("down",)
                        value = 1.0 if state in down else 0.0
                    else:
                        continue
                except Exception as exc:  # the bus does not answer: no reading
                    _failed(rule, channel, exc)
                else:
                    FAILING.discard((rule.name, channel))
                readings.append(Reading(rule, channel, value))
        return readings

    def _locked(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` holding the journal's reading lock (in a worker thread)."""
        with self._reading:
            return call(*args)

    async def _outbox_depth(self) -> int:
        """The outbox backlog as the process holding the journal counts it (events confirmed by the bus but not
        yet deleted left out): on PostgreSQL off the event loop; SQLite's local file at once, as /health does."""
        journal = self.runtime.journal
        if getattr(self.runtime.stores, "backend", "") == "postgresql":
            return int(await asyncio.to_thread(journal.outbox_depth))
        return int(journal.outbox_depth())

    async def _health(self) -> dict[str, str]:
        """Each channel's health state: this process's channels, and the other processes' through their /health."""
        states: dict[str, str] = {}
        report = await self.runtime.health_report()
        for name, state in (report.get("channels") or {}).items():
            states[name] = str(state.get("state", "unknown"))
        if self.runtime.processes:
            from traboule.app.http import _children_health

            children = await _children_health(self.runtime)
            for process, child in children.items():
                # starting or stopped (the engine stopping): no reading; restarting, or ready but not answering: down
                if child.get("state") in ("starting", "stopped"):
                    continue
                reported = child.get("channels") or {}
                for c in self.runtime.config.channels:
                    if str(c.get("process", "main")) != process:
                        continue
                    name = str(c["name"])
                    # a channel without destinations to report is up while its process is
                    up = str((reported.get(name) or {}).get("state", "ok"))
                    states[name] = "down" if child.get("status") == "down" else up
        return states

    async def _deliver(self) -> None:
        with redacted_webhook_urls(self.config.notifiers):
            await self._deliver_loop()

    async def _deliver_loop(self) -> None:
        async with httpx.AsyncClient(follow_redirects=False) as client:
            while True:
                try:
                    if self.store is not None:
                        await deliver_due(self.store, self.config.notifiers, client, retry=self.config.retry)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("alerts.delivery_failed", error=type(exc).__name__)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(self.config.retry, 1.0))


def payload(transition: Transition, now: float) -> dict[str, Any]:
    """The JSON body of a notification (what a webhook receives; the mail is made from it)."""
    incident, rule = transition.incident, transition.rule
    state = "resolved" if transition.event == "resolved" else "open"
    end = now if state == "open" else _epoch(incident.resolved)
    value = round(incident.last_value, 4)
    summaries = {
        "rejected_rate": (
            f"{value:.0%} of the messages received over {int(rule.window // 60)} min rejected",
            f"{value:.0%} des messages reçus sur {int(rule.window // 60)} min refusés",
        ),
        "dead_letters": (f"{int(value)} dead letter(s)", f"{int(value)} message(s) en lettres mortes"),
        "destination_down": (
            "destination down" if value else "destination up",
            "destination indisponible" if value else "destination disponible",
        ),
        "queue_depth": (f"{int(value)} message(s) waiting", f"{int(value)} message(s) en attente"),
        "silence": (
            f"no message for {int(rule.window // 60)} min",
            f"aucun message depuis {int(rule.window // 60)} min",
        ),
    }
    summary, summary_fr = summaries.get(rule.kind, ("", ""))
    if state == "resolved":
        summary, summary_fr = "resolved", "résolu"
    return {
        "incident": incident.id,
        "rule": rule.name,
        "kind": rule.kind,
        "channel": incident.channel,
        "state": state,
        "reminder": transition.event == "reminder",
        "value": value,
        "threshold": rule.threshold,
        "opened": incident.opened,
        "resolved": incident.resolved or None,
        "duration_s": round(end - _epoch(incident.opened)),
        "summary": summary,
        "summary_fr": summary_fr,
        "sent_at": _iso(now),
    }


def apply(store: IncidentStore, transitions: Sequence[Transition], now: float) -> list[Incident] | None:
    """Record what the state machine decided, with the notifications it queues (blocking: run it in a thread).
    Returns the stored open incidents when the store already had one the machine did not know (another node
    opened it), for the machine to take them: else None."""
    stale = False
    for t in transitions:
        incident = t.incident
        notifications = [(n, t.event, json.dumps(payload(t, now))) for n in t.rule.notify if t.event != "value"]
        if t.event == "open":
            if store.open(incident, notifications, now):
                log.warning(
                    "alerts.incident_opened",
                    incident=incident.id,
                    rule=t.rule.name,
                    channel=incident.channel,
                    value=incident.last_value,
                )
            else:
                stale = True
        elif t.event == "reminder":
            store.remind(incident.id, incident.reminded, incident.last_value, notifications, now)
        elif t.event == "resolved":
            store.resolve(incident.id, incident.resolved, incident.last_value, notifications, now)
            log.info("alerts.incident_resolved", incident=incident.id, rule=t.rule.name, channel=incident.channel)
        else:
            store.update_value(incident.id, incident.last_value)
    return store.open_incidents() if stale else None


def retire(
    store: IncidentStore, rules: Sequence[Rule], channels: Sequence[dict[str, Any]], now: float
) -> list[Incident]:
    """Resolve, without notifying, the open incidents no configured rule watches any more (its rule removed, its
    kind changed, or its channel no longer among the rule's): nothing would ever resolve them. Blocking (run it in a
    thread); returns them."""
    watched = {r.name: (r.kind, set(targets(r, channels))) for r in rules}
    retired = []
    for incident in store.open_incidents():
        kind, watching = watched.get(incident.rule, ("", set()))
        if kind == incident.kind and incident.channel in watching:
            continue
        incident.resolved = _iso(now)
        store.resolve(incident.id, incident.resolved, incident.last_value, [], now)
        retired.append(incident)
        log.warning(
            "alerts.incident_retired",
            incident=incident.id,
            rule=incident.rule,
            channel=incident.channel,
            reason="rule removed" if incident.rule not in watched else "channel no longer watched",
        )
    return retired


# -- reading -----------------------------------------------------------------------------------------------------


def list_incidents(stores: Any, limit: int = RECENT) -> list[dict[str, Any]]:
    """The open incidents, then the most recent resolved ones (``limit`` in all), each a dict: ``id``, ``rule``,
    ``kind``, ``channel``, ``state`` (open | resolved), ``opened``, ``resolved`` (None while open),
    ``duration_s``, ``last_value``, ``notified`` (the events notified). ``stores``: the engine's store factory
    (``runtime.stores``). Blocking: call it in a thread (`incidents`)."""
    store = stores.incidents()
    try:
        found = store.recent(limit)
    finally:
        store.close()
    now = time.time()
    return [
        {
            "id": i.id,
            "rule": i.rule,
            "kind": i.kind,
            "channel": i.channel,
            "state": "open" if i.is_open else "resolved",
            "opened": i.opened,
            "resolved": i.resolved or None,
            "duration_s": round((_epoch(i.resolved) if i.resolved else now) - _epoch(i.opened)),
            "last_value": i.last_value,
            "notified": [e for e in i.notified.split(",") if e],
        }
        for i in found
    ]


async def incidents(runtime: Any, limit: int = RECENT) -> list[dict[str, Any]]:
    """`list_incidents` of a running engine, off the event loop (what the console calls)."""
    return await asyncio.to_thread(list_incidents, runtime.stores, limit)
