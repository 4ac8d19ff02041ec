"""Alerts: the incident state machine over readings at given times, the rules' configuration, the incidents store
on both backends, delivery to a real HTTP server (down, then up) and a real SMTP server, and a running engine whose
rejected messages over MLLP open an incident that a webhook receives once, across a restart."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.conftest import BACKENDS, database_url_of
from tests.test_flow import engine_config, fixture, free_port, send
from traboule.app import alerts
from traboule.app.alert_notifiers import deliver_due
from traboule.app.alerts import Incidents, Reading, Rule, apply, list_incidents, parse, parse_hours
from traboule.app.cli import main
from traboule.app.runtime import Runtime
from traboule.errors import ConfigError
from traboule.stores.factory import PostgresStores, SQLiteStores
from traboule.stores.incidents import Incident

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC).timestamp()  # a Monday, 10:00 in Paris
CHANNELS = [
    {"name": "ris-orders", "kind": "hl7-orders", "source": {"adapter": "mllp-listener", "port": 2575}},
    {"name": "worklist", "kind": "worklist", "topics": ["order.#"]},
]


def rule(**overrides: Any) -> Rule:
    values: dict[str, Any] = {
        "name": "orders-rejected",
        "kind": "rejected_rate",
        "channel": "ris-orders",
        "threshold": 0.2,
        "for_s": 60.0,
        "clear_s": 120.0,
        "notify": ("hook",),
    }
    return Rule(**{**values, **overrides})


def run(machine: Incidents, r: Rule, series: list[tuple[float, float | None]]) -> list[tuple[float, str]]:
    """Step the machine through ``(seconds after T0, value)``: the notified events (open, reminder, resolved)."""
    events = []
    for offset, value in series:
        for t in machine.step(T0 + offset, [Reading(r, "ris-orders", value)]):
            if t.event != "value":
                events.append((offset, t.event))
    return events


# -- the state machine ----------------------------------------------------------------------------------------


def test_one_open_no_repeat_one_resolved() -> None:
    r = rule()
    machine = Incidents([r])
    series = [(s, 0.5) for s in range(0, 600, 15)] + [(s, 0.0) for s in range(600, 900, 15)]
    assert run(machine, r, series) == [(60, "open"), (720, "resolved")]  # held 60 s; then clear for 120 s
    assert machine.open == {}


def test_flapping_within_for_opens_nothing() -> None:
    r = rule()
    machine = Incidents([r])
    series = [(s, 0.5 if (s // 45) % 2 == 0 else 0.0) for s in range(0, 1800, 15)]  # 45 s on, 45 s off
    assert run(machine, r, series) == []


def test_flapping_while_open_resolves_only_after_the_clear_period() -> None:
    r = rule(for_s=0.0, clear_s=120.0)
    machine = Incidents([r])
    series = [(0, 0.5), (60, 0.0), (120, 0.5), (150, 0.0), (240, 0.0), (270, 0.0)]
    assert run(machine, r, series) == [(0, "open"), (270, "resolved")]


def test_reminder_every_remind_period_while_open() -> None:
    r = rule(for_s=0.0, remind_s=3600.0)
    machine = Incidents([r])
    series = [(s, 0.5) for s in range(0, 7300, 100)]
    assert run(machine, r, series) == [(0, "open"), (3600, "reminder"), (7200, "reminder")]


def test_no_reading_changes_nothing() -> None:
    r = rule(for_s=60.0, clear_s=0.0)
    machine = Incidents([r])
    assert run(machine, r, [(0, 0.5), (30, None), (60, 0.5), (90, None), (600, None)]) == [(60, "open")]
    assert run(machine, r, [(700, 0.0)]) == [(700, "resolved")]


def test_silence_counts_only_working_hours() -> None:
    hours = parse_hours("Mon-Fri 07:00-19:00", ZoneInfo("Europe/Paris"), "test")
    monday_10h = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    assert hours.period_start(monday_10h) == datetime(2026, 12, 7, 6, 0, tzinfo=UTC)  # 07:00 in Paris (UTC+1)
    assert hours.period_start(datetime(2026, 12, 7, 18, 30, tzinfo=UTC)) is None  # 19:30 in Paris
    assert hours.period_start(datetime(2026, 12, 6, 9, 0, tzinfo=UTC)) is None  # a Sunday
    summer = datetime(2026, 7, 6, 5, 30, tzinfo=UTC)  # 07:30 in Paris (UTC+2)
    assert hours.period_start(summer) == datetime(2026, 7, 6, 5, 0, tzinfo=UTC)


# -- configuration --------------------------------------------------------------------------------------------

EXAMPLE = {
    "interval": "15s",
    "working_hours": "Mon-Fri 07:00-19:00",
    "notify": {
        "ops": {"kind": "webhook", "url": "https://alerts.example.org/traboule", "bearer": "s3cret-token-value"},
        "mail": {
            "kind": "smtp",
            "host": "smtp.example.org",
            "port": 587,
            "starttls": True,
            "from": "traboule@example.org",
            "to": ["ops@example.org"],
        },
    },
    "rule": [
        {
            "name": "orders-rejected",
            "kind": "rejected_rate",
            "channel": "ris-orders",
            "threshold": 0.2,
            "window": "15m",
            "min_count": 10,
            "for": "2m",
            "notify": ["ops", "mail"],
        },
        {"name": "dlq", "kind": "dead_letters", "channel": "*", "notify": "ops"},
        {"name": "quiet", "kind": "silence", "channel": "ris-orders", "window": "30m", "notify": ["mail"]},
        {"name": "outbox", "kind": "queue_depth", "channel": "outbox", "threshold": 1000, "notify": ["ops"]},
        {
            "name": "down",
            "kind": "destination_down",
            "channel": "worklist",
            "for": "5m",
            "remind": "4h",
            "notify": ["ops"],
        },
    ],
}


def test_example_configuration_parses() -> None:
    cfg = parse(EXAMPLE, CHANNELS)
    assert [r.kind for r in cfg.rules] == [
        "rejected_rate",
        "dead_letters",
        "silence",
        "queue_depth",
        "destination_down",
    ]
    assert cfg.rules[0].for_s == 120 and cfg.rules[0].clear_s == 120 and cfg.rules[0].window == 900
    assert cfg.rules[4].remind_s == 4 * 3600
    assert cfg.notifiers["ops"].headers == {"Authorization": "Bearer s3cret-token-value"}  # type: ignore[union-attr]
    assert "s3cret" not in repr(cfg.notifiers["ops"])  # never in a log line
    assert alerts.targets(cfg.rules[1], CHANNELS) == ["ris-orders", "worklist"]  # "*": the consuming channels
    assert alerts.consuming_queues(CHANNELS) == {"ris-orders": ["ris-orders.reports"], "worklist": ["worklist"]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "rejected"}, "kind 'rejected'"),
        ({"channel": "nope"}, "channel 'nope' is not a configured channel"),
        ({"notify": ["pager"]}, "no such [alerts.notify.<name>]"),
        ({"threshold": 20}, "share of the received messages"),
        ({"for": "soon"}, "for: expected seconds or a duration"),
        ({"hours": "Mon-Fri 07:00-19:00"}, "not for a rejected_rate rule"),
    ],
)
def test_bad_rule_is_refused_with_a_clear_error(change: dict[str, Any], message: str) -> None:
    section = json.loads(json.dumps(EXAMPLE))
    section["rule"][0].update(change)
    with pytest.raises(ConfigError, match="orders-rejected") as raised:
        parse(section, CHANNELS)
    assert message in str(raised.value)


def test_bad_notifier_and_hours_are_refused() -> None:
    with pytest.raises(ConfigError, match="url must be an http"):
        parse({**EXAMPLE, "notify": {**EXAMPLE["notify"], "ops": {"kind": "webhook", "url": "file:///etc"}}}, CHANNELS)
    with pytest.raises(ConfigError, match="password_env names TRABOULE_NO_SUCH_VAR"):
        mail = {**EXAMPLE["notify"]["mail"], "password_env": "TRABOULE_NO_SUCH_VAR"}  # type: ignore[dict-item]
        parse({**EXAMPLE, "notify": {**EXAMPLE["notify"], "mail": mail}}, CHANNELS, env={})
    with pytest.raises(ConfigError, match="working_hours"):
        parse({**EXAMPLE, "working_hours": "Mon-Fri 19:00-07:00"}, CHANNELS)


def test_traboule_check_reports_a_bad_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text(
        '[alerts.notify.ops]\nkind = "webhook"\nurl = "http://127.0.0.1:9/hook"\n\n'
        '[[alerts.rule]]\nname = "dlq"\nkind = "dead_letters"\nchannel = "worklst"\nnotify = ["ops"]\n'
    )
    assert main(["-c", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "[[alerts.rule]] dlq: channel 'worklst' is not a configured channel" in err


# -- the incidents store (both backends) ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "postgresql":
        return PostgresStores(request.getfixturevalue("pg_url"), tmp_path)
    return SQLiteStores(tmp_path)


def test_incident_store_keeps_one_open_incident_and_its_notifications(stores: Any) -> None:
    store = stores.incidents()
    try:
        first = Incident("a" * 32, "r1", "dead_letters", "worklist", "2026-12-07T09:00:00+00:00", last_value=3)
        assert store.open(first, [("hook", "open", '{"x": 1}'), ("mail", "open", '{"x": 1}')], T0)
        again = Incident("b" * 32, "r1", "dead_letters", "worklist", "2026-12-07T09:01:00+00:00")
        assert not store.open(again, [("hook", "open", "{}")], T0)  # one open incident per rule and channel
        assert [i.id for i in store.open_incidents()] == [first.id]
        due = store.due(T0)
        assert [(n.notifier, n.event) for n in due] == [("hook", "open"), ("mail", "open")]
        store.failed(due[0].id, T0 + 30, "ConnectError")
        store.delivered(due[1].id, "2026-12-07T09:00:01+00:00")
        assert store.due(T0 + 10) == []
        assert [n.attempts for n in store.due(T0 + 30)] == [1]
        store.update_value(first.id, 5)
        store.resolve(first.id, "2026-12-07T09:10:00+00:00", 0, [("hook", "resolved", "{}")], T0 + 600)
        store.resolve(first.id, "2026-12-07T09:11:00+00:00", 0, [("hook", "resolved", "{}")], T0 + 660)  # no-op
        assert store.open_incidents() == []
        assert [n.event for n in store.notifications(first.id)] == ["open", "open", "resolved"]
        assert store.open(again, [], T0 + 700)  # a new incident once the first resolved
    finally:
        store.close()
    listed = list_incidents(stores)
    assert [(i["id"], i["state"]) for i in listed] == [(again.id, "open"), (first.id, "resolved")]
    assert listed[1]["duration_s"] == 600 and listed[1]["notified"] == ["open", "resolved"]


# -- notifiers: a real HTTP server, a real SMTP server ---------------------------------------------------------


class Hook:
    """An HTTP server on a local port receiving webhook POSTs (started and stopped at will, on one port)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append(json.loads(body))
                hook.headers.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def hook() -> Iterator[Hook]:
    found = Hook(free_port())
    try:
        yield found
    finally:
        found.stop()


def opened_transitions(r: Rule, now: float) -> list[alerts.Transition]:
    machine = Incidents([r])
    return machine.step(now, [Reading(r, "ris-orders", 0.5)])


async def test_webhook_down_then_up_receives_the_alert_once(tmp_path: Path, hook: Hook) -> None:
    cfg = parse(
        {
            "retry": "1s",
            "notify": {"hook": {"kind": "webhook", "url": hook.url, "bearer": "bearer-value-123", "timeout": "2s"}},
            "rule": [
                {
                    "name": "orders-rejected",
                    "kind": "rejected_rate",
                    "channel": "ris-orders",
                    "threshold": 0.2,
                    "notify": ["hook"],
                }
            ],
        },
        CHANNELS,
    )
    store = SQLiteStores(tmp_path).incidents()
    try:
        now = time.time()
        apply(store, opened_transitions(cfg.rules[0], now), now)
        async with httpx.AsyncClient() as client:
            assert await deliver_due(store, cfg.notifiers, client, retry=cfg.retry) == 0  # nobody listens
            (waiting,) = store.due(time.time() + 5)
            assert waiting.attempts == 1 and waiting.last_error == "ConnectError"
            assert store.due(time.time()) == []  # backoff: not before a second
            hook.start()
            assert await deliver_due(store, cfg.notifiers, client, retry=cfg.retry, now=time.time() + 5) == 1
            assert await deliver_due(store, cfg.notifiers, client, retry=cfg.retry, now=time.time() + 600) == 0
    finally:
        store.close()
    (body,) = hook.received
    assert body["state"] == "open" and body["rule"] == "orders-rejected" and body["channel"] == "ris-orders"
    assert body["value"] == 0.5 and body["notification"] == waiting.id
    assert hook.headers[0]["Authorization"] == "Bearer bearer-value-123"


async def test_smtp_server_receives_one_open_and_one_resolved_mail(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    class Inbox:
        def __init__(self) -> None:
            self.mails: list[tuple[str, list[str], str]] = []

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            mail = email.message_from_bytes(envelope.content, policy=email.policy.default)
            text = f"Subject: {mail['Subject']}\n{mail.get_content()}"  # type: ignore[attr-defined]
            self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), text))
            return "250 OK"

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        cfg = parse(
            {
                "notify": {
                    "mail": {
                        "kind": "smtp",
                        "host": "127.0.0.1",
                        "port": port,
                        "from": "traboule@example.org",
                        "to": ["ops@example.org", "it@example.org"],
                    }
                },
                "rule": [{"name": "quiet", "kind": "dead_letters", "channel": "worklist", "notify": ["mail"]}],
            },
            CHANNELS,
        )
        r = cfg.rules[0]
        machine = Incidents([r])
        store = SQLiteStores(tmp_path).incidents()
        try:
            now = time.time()
            for offset, value in ((0, 3.0), (15, 3.0), (30, 0.0)):
                apply(store, machine.step(now + offset, [Reading(r, "worklist", value)]), now + offset)
            async with httpx.AsyncClient() as client:
                assert await deliver_due(store, cfg.notifiers, client, retry=1.0, now=now + 60) == 2
        finally:
            store.close()
    finally:
        controller.stop()
    assert [(m[0], m[1]) for m in inbox.mails] == [("traboule@example.org", ["ops@example.org", "it@example.org"])] * 2
    opened, resolved = (m[2] for m in inbox.mails)
    assert "Subject: [traboule] incident open: quiet on worklist" in opened
    assert "Incident ouvert : règle quiet (dead_letters), canal worklist." in opened
    assert "Incident open: rule quiet (dead_letters), channel worklist." in opened
    assert "Subject: [traboule] incident resolved: quiet on worklist" in resolved
    assert "Résolu :" in resolved and "(durée 0 min 30 s)" in resolved and "(lasted 0 min 30 s)" in resolved


def test_a_restarted_evaluator_neither_forgets_nor_notifies_again(tmp_path: Path) -> None:
    r = rule(for_s=0.0, clear_s=0.0)
    store = SQLiteStores(tmp_path).incidents()
    apply(store, Incidents([r]).step(T0, [Reading(r, "ris-orders", 0.5)]), T0)
    store.close()
    store = SQLiteStores(tmp_path).incidents()  # a new process
    try:
        machine = Incidents([r], store.open_incidents())
        later = machine.step(T0 + 60, [Reading(r, "ris-orders", 0.6)])
        assert [t.event for t in later] == ["value"]
        apply(store, later, T0 + 60)
        (incident,) = store.open_incidents()
        assert incident.last_value == 0.6
        assert [n.event for n in store.notifications(incident.id)] == ["open"]
        done = machine.step(T0 + 120, [Reading(r, "ris-orders", 0.0)])
        apply(store, done, T0 + 120)
        assert [n.event for n in store.notifications(incident.id)] == ["open", "resolved"]
        body = json.loads(store.notifications(incident.id)[1].body)
        assert body["state"] == "resolved" and body["duration_s"] == 120
    finally:
        store.close()


# -- end to end ---------------------------------------------------------------------------------------------------


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rejected_messages_over_mllp_open_one_incident_the_webhook_receives(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, hook: Hook
) -> None:
    """On each store backend (PostgreSQL: the incidents in the database, the "alerts" lease held)."""
    hook.start()
    cfg = engine_config(tmp_path, database_url=database_url_of(backend, request))
    cfg.channels = [{**cfg.channel("ris-orders"), "reports": False}]  # orders only: a quick start
    cfg.alerts = parse(
        {
            "interval": "1s",
            "notify": {"hook": {"kind": "webhook", "url": hook.url}},
            "rule": [
                {
                    "name": "orders-rejected",
                    "kind": "rejected_rate",
                    "channel": "ris-orders",
                    "threshold": 0.5,
                    "min_count": 3,
                    "window": "10m",
                    "notify": ["hook"],
                }
            ],
        },
        cfg.channels,
    )
    cfg.alerts.interval = 0.2  # below what a configuration may set (1 s): a quick test
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        bad = fixture("orm_o01_no_pid3.hl7")
        await send(runtime, bad, bad, b"THIS IS NOT HL7", bad)
        await until(lambda: len(hook.received) == 1)
        (body,) = hook.received
        assert body["state"] == "open" and body["channel"] == "ris-orders" and body["value"] == 1.0
        assert "PID" not in json.dumps(body)  # names, counts and times only
        await asyncio.sleep(0.6)  # more evaluations: still open, nothing more sent
        assert len(hook.received) == 1
    finally:
        await runtime.stop()
    runtime = Runtime(cfg)  # a restart: the open incident is remembered, not sent again
    await runtime.start()
    try:
        await asyncio.sleep(0.6)
        assert len(hook.received) == 1
        listed = await alerts.incidents(runtime)
        assert [(i["rule"], i["state"]) for i in listed] == [("orders-rejected", "open")]
        good = fixture("orm_o01_nw_latin1.hl7")
        await send(runtime, *[good] * 5)  # 4 rejected of 9 received: below half
        await until(lambda: len(hook.received) == 2)
        assert hook.received[1]["state"] == "resolved" and hook.received[1]["incident"] == body["incident"]
    finally:
        await runtime.stop()


def test_operations_guide_alerts_example_is_valid() -> None:
    """The example of docs/operations.md "Alerts" loads against the default channels."""
    import tomllib

    from tests.conftest import ROOT
    from traboule.app.config import DEFAULT_CHANNELS

    text = (ROOT / "docs" / "operations.md").read_text().split("## Alerts", 1)[1]
    doc = tomllib.loads(text.split("```toml", 1)[1].split("```", 1)[0])
    env = {"TRABOULE_ALERT_TOKEN": "t0ken-from-env", "TRABOULE_SMTP_PASSWORD": "pw"}
    cfg = parse(doc["alerts"], DEFAULT_CHANNELS, env=env)
    assert sorted(r.kind for r in cfg.rules) == sorted(alerts.KINDS)
    assert cfg.notifiers["ops"].headers["Authorization"] == "Bearer t0ken-from-env"  # type: ignore[union-attr]
    assert cfg.notifiers["mail"].password == "pw"  # type: ignore[union-attr]


def test_journal_readings_count_the_window_and_working_hours(tmp_path: Path) -> None:
    """rejected_rate and silence read the journal's entries of their window only (ids found by reception time)."""
    from traboule.stores.journal import JournalEntry, SQLiteJournal, record

    path = tmp_path / "journal.sqlite"
    journal = SQLiteJournal(path)

    def at(offset: float) -> str:
        return datetime.fromtimestamp(T0 + offset, UTC).isoformat(timespec="milliseconds")

    try:
        for offset, status in [(-3600, "rejected")] * 5 + [(-300, "accepted")] * 3 + [(-200, "rejected")] * 2:
            record(path, JournalEntry("ris-orders", b"x", status, received=at(offset)))
        record(path, JournalEntry("other", b"x", "rejected", received=at(-100)))
        rate = rule(min_count=5, window=600.0)
        assert alerts._first_id_since(journal, at(-600)) == 5  # the five old entries come before the window
        quiet = Rule(
            "quiet",
            "silence",
            "ris-orders",
            window=900.0,
            notify=("hook",),
            hours=parse_hours("Mon-Fri 07:00-19:00", ZoneInfo("Europe/Paris"), "test"),
        )
        quieter = Rule("quieter", "silence", "ris-orders", window=120.0, notify=("hook",), hours=quiet.hours)
        sunday = Rule(
            "sunday",
            "silence",
            "ris-orders",
            window=60.0,
            notify=("hook",),
            hours=parse_hours("Sun 00:00-24:00", ZoneInfo("Europe/Paris"), "test"),
        )
        targets = {r.name: ["ris-orders"] for r in (rate, quiet, quieter, sunday)}
        readings = alerts.journal_readings(journal, [rate, quiet, quieter, sunday], targets, T0)
        values = {r.rule.name: r.value for r in readings}
        assert values == {"orders-rejected": 0.4, "quiet": 5.0, "quieter": 0.0, "sunday": None}
        assert rate.breached(0.4) and quieter.breached(0.0) and not quiet.breached(5.0)
        few = rule(min_count=6, window=600.0)  # 5 received in the window: below min_count, not a rate
        assert alerts.journal_readings(journal, [few], {few.name: ["ris-orders"]}, T0)[0].value == 0.0
    finally:
        journal.close()


async def test_engine_measures_health_of_other_processes_queues_and_outbox(tmp_path: Path) -> None:
    """The main process reads the worker's channels as down while the supervisor restarts it (or it does not
    answer), not at all while it is stopped; the worker's queues and dead letters, and the outbox, on the bus and
    journal this process holds."""
    from traboule.app.runtime import ProcessState

    cfg = engine_config(tmp_path)
    cfg.channels = [{**cfg.channel("ris-orders"), "reports": False}, cfg.channel("worklist")]  # worklist: "worker"
    cfg.alerts = parse(
        {
            "notify": {"hook": {"kind": "webhook", "url": "http://127.0.0.1:9/hook"}},
            "rule": [
                {"name": "down", "kind": "destination_down", "channel": "*", "notify": ["hook"]},
                {"name": "dlq", "kind": "dead_letters", "channel": "*", "notify": ["hook"]},
                {"name": "depth", "kind": "queue_depth", "channel": "worklist", "threshold": 10, "notify": ["hook"]},
                {"name": "outbox", "kind": "queue_depth", "channel": "outbox", "threshold": 10, "notify": ["hook"]},
            ],
        },
        cfg.channels,
    )
    runtime = Runtime(cfg, process="main")
    await runtime.start()
    try:
        assert runtime.alerts is not None
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))  # an order event for the worklist queue
        await runtime.wait_idle()
        worker = ProcessState("worker", free_port(), state="restarting")
        runtime.processes["worker"] = worker

        async def values() -> dict[tuple[str, str], float | None]:
            return {(r.rule.name, r.channel): r.value for r in await runtime.alerts.measure(time.time())}

        found = await values()
        assert found[("down", "worklist")] == 1.0  # restarting
        assert found[("dlq", "worklist")] == 0.0
        assert found[("depth", "worklist")] == 1.0  # the order waits: nobody consumes it here
        assert found[("outbox", "outbox")] == 0.0
        worker.set("ready")  # said ready, but nothing answers on its port
        assert (await values())[("down", "worklist")] == 1.0
        worker.set("stopped")
        assert ("down", "worklist") not in await values()
    finally:
        await runtime.stop()


def test_cli_alerts_list_prints_open_then_resolved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = SQLiteStores(tmp_path / "var").incidents()
    try:
        old = Incident("1" * 32, "dlq", "dead_letters", "worklist", "2026-12-07T08:00:00+00:00", last_value=2)
        store.open(old, [("ops", "open", "{}")], T0)
        store.resolve(old.id, "2026-12-07T08:30:00+00:00", 0, [("ops", "resolved", "{}")], T0)
        store.open(Incident("2" * 32, "quiet", "silence", "ris-orders", "2026-12-07T09:00:00+00:00"), [], T0)
    finally:
        store.close()
    path = tmp_path / "traboule.toml"
    path.write_text(f'[engine]\ndata_dir = "{tmp_path / "var"}"\n')
    assert main(["-c", str(path), "alerts", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 open incident(s); 0 rule(s) configured"
    assert lines[1].startswith("open ") and "quiet  ris-orders" in lines[1]
    assert lines[2].startswith("resolved 2026-12-07T08:00:00+00:00  2026-12-07T08:30:00+00:00")
    assert "1800s  dlq  worklist  value=0  notified=open,resolved" in lines[2]


# -- notifiers' security: credentials over TLS only, header values, webhook URLs, incidents of removed rules ----


def mail_notifier(**changes: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "kind": "smtp",
        "host": "smtp.example.org",
        "port": 25,
        "from": "traboule@example.org",
        "to": "ops@example.org",
        "username": "traboule",
        "password_env": "TRABOULE_SMTP_PASSWORD",
    }
    for key, value in changes.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return table


def load_notifier(table: dict[str, Any]) -> Any:
    env = {"TRABOULE_SMTP_PASSWORD": "pw-in-env-42"}
    return parse({"notify": {"n": table}}, CHANNELS, env=env).notifiers["n"]


def test_smtp_password_without_tls_is_refused_unless_explicitly_allowed() -> None:
    for table in (mail_notifier(), mail_notifier(password="pw-in-clear-42", password_env=None)):
        with pytest.raises(ConfigError, match=r"\[alerts.notify.n\]: the SMTP login .* would go in clear") as raised:
            load_notifier(table)
        assert "starttls = true" in str(raised.value) and "tls = true (port 465)" in str(raised.value)
        assert "pw-in" not in str(raised.value)
    with pytest.raises(ConfigError, match="a password without a username"):
        load_notifier(mail_notifier(username=None, starttls=True))
    with pytest.raises(ConfigError, match="not both"):
        load_notifier(mail_notifier(starttls=True, tls=True))
    with pytest.raises(ConfigError, match="allow_plaintext_password must be true or false"):
        load_notifier(mail_notifier(allow_plaintext_password="yes"))
    allowed = load_notifier(mail_notifier(allow_plaintext_password=True))
    assert (allowed.starttls, allowed.tls, allowed.password) == (False, False, "pw-in-env-42")
    assert not load_notifier(mail_notifier(starttls=True, port=587)).tls
    smtps = load_notifier(mail_notifier(port=465))  # implicit TLS by default on 465
    assert smtps.tls and not smtps.starttls
    assert not load_notifier(mail_notifier(port=465, starttls=True)).tls
    assert not load_notifier(mail_notifier(username=None, password_env=None)).tls  # no login: plain port 25 is fine


async def test_smtps_notifier_logs_in_over_implicit_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SMTP server speaking TLS from the first byte (port 465 style), requiring AUTH."""
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    from tests.xds_endpoint import make_pki

    pki = make_pki(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(pki.server_cert, pki.server_key)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))  # the client trusts the test CA (verifying the name)
    logins: list[tuple[bytes, bytes, bool]] = []
    mails: list[str] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        logins.append((data.login, data.password, server.transport.get_extra_info("ssl_object") is not None))
        return AuthResult(success=(data.login, data.password) == (b"traboule", b"pw-in-env-42"))

    class Inbox:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            mails.append(envelope.content.decode())
            return "250 OK"

    port = free_port()
    controller = Controller(
        Inbox(),
        hostname="127.0.0.1",
        port=port,
        ssl_context=server_tls,
        server_hostname="localhost",
        authenticator=authenticator,
        auth_require_tls=False,  # aiosmtpd counts only STARTTLS as TLS; the test checks the transport itself
    )
    controller.start()
    try:
        notifier = load_notifier(mail_notifier(host="localhost", port=port, tls=True))
        assert notifier.tls
        r = rule(for_s=0.0, notify=("n",))
        await notifier.send(alerts.payload(opened_transitions(r, T0)[0], T0 + 5))
    finally:
        controller.stop()
    assert logins == [(b"traboule", b"pw-in-env-42", True)]  # the password went inside TLS
    assert len(mails) == 1 and "incident open: orders-rejected on ris-orders" in mails[0]


@pytest.mark.parametrize("value", ["abc\r\nX-Injected: 1", "abc\rdef", "abc\x00", "tab\there"])
def test_webhook_header_with_a_control_character_is_refused_naming_the_header(value: str) -> None:
    table = {"kind": "webhook", "url": "https://alerts.example.org/h", "headers": {"X-Api-Key": value}}
    with pytest.raises(ConfigError, match=r"\[alerts.notify.n\]: header X-Api-Key: its value holds") as raised:
        load_notifier(table)
    assert "abc" not in str(raised.value) and "tab" not in str(raised.value)
    with pytest.raises(ConfigError, match="bearer: the token holds a line break"):
        load_notifier({"kind": "webhook", "url": "https://alerts.example.org/h", "bearer": value})
    fine = {"X-Api-Key": "plain-value 42"}
    assert load_notifier({**table, "headers": fine}).headers == fine


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://alerts.example.org/h",
        "http:///only-a-path?token=tok-in-url",
        "https://user:tok-in-url@/h",
        "https://alerts.example.org:99999/h?token=tok-in-url",
        "https://alerts.example.org:port/h",
        "https://alerts.example.org/h?token=tok in url",
        "https://alerts.example.org/h\r\n?token=tok-in-url",
        "alerts.example.org/h",
    ],
)
def test_webhook_url_without_http_scheme_or_host_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[alerts.notify.n\]: url must be an http:// or https:// URL") as raised:
        load_notifier({"kind": "webhook", "url": url})
    assert "tok" not in str(raised.value) and "example" not in str(raised.value)


async def test_webhook_url_query_and_user_never_logged(hook: Hook, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    notifier = load_notifier({"kind": "webhook", "url": f"http://someone:pw-in-url@127.0.0.1:{hook.port}/hook?k=tok-q"})
    assert notifier.where == f"http://127.0.0.1:{hook.port}/hook"
    assert "pw-in-url" not in repr(notifier) and "tok-q" not in repr(notifier)
    hook.start()
    body = alerts.payload(opened_transitions(rule(for_s=0.0, notify=("n",)), T0)[0], T0)
    caplog.set_level(logging.DEBUG, logger="httpx")
    async with httpx.AsyncClient() as client:
        with alerts.redacted_webhook_urls({"n": notifier}):
            await notifier.send(body, client)
        await client.get(f"http://127.0.0.1:{hook.port}/other?q=kept")  # another URL: left as it is
    assert hook.received == [body]
    assert hook.headers[0]["Authorization"].startswith("Basic ")  # the user part still authenticates
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any(f"POST http://127.0.0.1:{hook.port}/hook " in line for line in lines)
    assert not any("tok-q" in line or "pw-in-url" in line for line in lines)
    assert any("/other?q=kept" in line for line in lines)
    assert not logging.getLogger("httpx").filters  # removed once delivery ends


def test_open_incidents_of_rules_no_longer_configured_are_resolved_silently(tmp_path: Path) -> None:
    kept = rule(for_s=0.0)
    moved = Rule(name="dlq", kind="dead_letters", channel="worklist", notify=("hook",))
    store = SQLiteStores(tmp_path).incidents()
    try:
        seeded = [
            Incident("1" * 32, "orders-rejected", "rejected_rate", "ris-orders", "2026-12-07T08:00:00+00:00", "", 0.5),
            Incident("2" * 32, "removed-rule", "silence", "ris-orders", "2026-12-07T08:00:00+00:00"),
            Incident("3" * 32, "dlq", "dead_letters", "ris-orders", "2026-12-07T08:00:00+00:00", "", 2),
            Incident("4" * 32, "dlq", "dead_letters", "worklist", "2026-12-07T08:00:00+00:00", "", 2),
            Incident("5" * 32, "orders-rejected-old", "queue_depth", "outbox", "2026-12-07T08:00:00+00:00"),
        ]
        for incident in seeded:
            assert store.open(incident, [("hook", "open", "{}")], T0)
        retired = alerts.retire(store, [kept, moved], CHANNELS, T0 + 60)
        assert sorted(i.id[0] for i in retired) == ["2", "3", "5"]
        assert sorted(i.id[0] for i in store.open_incidents()) == ["1", "4"]
        for incident in retired:  # resolved at the start, notified of nothing more
            assert [n.event for n in store.notifications(incident.id)] == ["open"]
        assert {i.resolved for i in retired} == {alerts._iso(T0 + 60)}
        assert alerts.retire(store, [kept, moved], CHANNELS, T0 + 120) == []
    finally:
        store.close()


async def test_engine_start_resolves_the_incident_of_a_removed_rule(tmp_path: Path, hook: Hook) -> None:
    store = SQLiteStores(tmp_path).incidents()
    stale = Incident("9" * 32, "gone", "dead_letters", "ris-orders", "2026-12-07T08:00:00+00:00", "", 3)
    try:
        assert store.open(stale, [("hook", "open", "{}")], T0)
        store.delivered(store.due(T0)[0].id, "2026-12-07T08:00:01+00:00")
    finally:
        store.close()
    hook.start()
    cfg = engine_config(tmp_path)
    cfg.channels = [{**cfg.channel("ris-orders"), "reports": False}]
    cfg.alerts = parse(
        {
            "notify": {"hook": {"kind": "webhook", "url": hook.url}},
            "rule": [{"name": "dlq", "kind": "dead_letters", "channel": "ris-orders", "notify": ["hook"]}],
        },
        cfg.channels,
    )
    cfg.alerts.interval = 0.2
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        await until(lambda: runtime.alerts is not None and runtime.alerts.machine is not None)
        listed = await alerts.incidents(runtime)
        assert [(i["id"], i["state"], i["notified"]) for i in listed] == [(stale.id, "resolved", ["open"])]
        assert runtime.alerts.machine.open == {}  # type: ignore[union-attr]
        await asyncio.sleep(0.4)
        assert hook.received == []  # resolved without a notification
    finally:
        await runtime.stop()
