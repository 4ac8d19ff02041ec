"""The figures on /metrics (deliveries and their latency per queue, queue depths and dead letters, process restarts,
over every process of a running engine), the console's alerts page and dashboard columns, and its list of operator
actions."""

from __future__ import annotations

import base64
import os
import re
import signal
import time
from datetime import UTC, datetime, timedelta

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.test_console import ADMIN, READER, login, open_console
from tests.test_engine import cli, running_engine  # noqa: F401 (fixture)
from tests.test_flow import fixture, send, store, until
from traboule.app.console.audit import Audit
from traboule.stores.incidents import Incident

BEARER = {"Authorization": f"Bearer {ADMIN}"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics answer by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def test_metrics_alerts_dashboard_and_actions_pages(tmp_path: object) -> None:
    async with open_console(tmp_path) as (runtime, client):  # type: ignore[arg-type]
        before = samples((await client.get("/metrics", headers=BEARER)).text)
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), fixture("orm_o01_no_pid3.hl7"))
        await until(lambda: store(runtime).count() == 1)

        # /metrics: the worklist's deliveries counted and timed, its queue and dead letters measured at the scrape.
        found = samples((await client.get("/metrics", headers=BEARER)).text)
        delivered = value(found, "traboule_deliveries_total", queue="worklist", outcome="ok") or 0
        assert delivered - (value(before, "traboule_deliveries_total", queue="worklist", outcome="ok") or 0) >= 1
        timed = value(found, "traboule_delivery_seconds_count", queue="worklist") or 0
        assert timed >= 1 and 0 < (value(found, "traboule_delivery_seconds_sum", queue="worklist") or 0) < 60 * timed
        assert value(found, "traboule_queue_depth", queue="worklist") == 0
        assert value(found, "traboule_dead_letters", queue="worklist") == 0

        # An incident, with values the page must escape; the dashboard counts it on its channel.
        opened = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="seconds")
        incidents = runtime.stores.incidents()
        try:
            incident = Incident("inc-1", "<b>dl</b>", "dead_letters", "worklist", opened, last_value=3.0)
            assert incidents.open(incident, [], time.time())
            old = Incident("inc-0", "quiet", "silence", "ris-orders", "2026-01-01T00:00:00+00:00")
            assert incidents.open(old, [], time.time())
            incidents.resolve("inc-0", "2026-01-01T01:00:00+00:00", 0.0, [], time.time())
        finally:
            incidents.close()
        assert (await login(client, READER)).status_code == 303
        page = await client.get("/console/alerts")
        assert page.status_code == 200
        assert "<b>dl</b>" not in page.text and "&lt;b&gt;dl&lt;/b&gt;" in page.text
        open_table = page.text.split('id="open-incidents"')[1].split("</table>")[0]
        assert "dead_letters" in open_table and "3.0" in open_table and "5 min" in open_table
        resolved = page.text.split('id="resolved-incidents"')[1].split("</table>")[0]
        assert "quiet" in resolved and "1 h 0 min" in resolved
        assert (await client.get("/console/alerts", params={"lang": "fr"})).text.count("Incidents ouverts") == 1

        dashboard = (await client.get("/console/", params={"lang": "en"})).text
        assert 'id="alerts-banner"' in dashboard
        rows = {
            m.group(1): m.group(2)
            for m in re.finditer(r'<th scope="row"><a [^>]*>([^<]+)</a></th>(.*?)</tr>', dashboard, re.S)
        }
        assert re.search(r'class="open-alerts"><a [^>]*>1</a>', rows["worklist"])
        assert 'class="open-alerts">0<' in rows["ris-orders"]
        last_error = rows["ris-orders"].split('class="last-error">')[1].split("</td>")[0]
        assert "/console/messages/2" in last_error and "AE" in last_error and "<code>PID-3</code>" in last_error
        assert "required" not in last_error.lower()  # the error's text stays on the message's page

        # The record of operator actions: newest first, a discarded letter by its size, never its body.
        audit = Audit(runtime.config.data_dir)
        audit.record("night-shift", "dead_letter.replay", "RIS resent", queue="worklist", ids=["m1"])
        body = b"SECRET-BODY " * 100
        letter = {
            "topic": "order.new",
            "headers": {"x-error": "PatientSecret"},
            "body": base64.b64encode(body).decode(),
        }
        audit.record("night-shift", "dead_letter.discard", "<i>duplicate</i>", queue="worklist", letters=[letter])
        page = await client.get("/console/actions")
        assert page.status_code == 200
        actions = page.text.split('id="actions"')[1]
        assert actions.index("dead_letter.discard") < actions.index("dead_letter.replay")
        assert "&lt;i&gt;duplicate&lt;/i&gt;" in actions and "<i>" not in actions
        assert f"({len(body)} bytes)" in actions and "night-shift" in actions
        assert "SECRET" not in page.text and letter["body"][:20] not in page.text and "PatientSecret" not in page.text

        client.cookies.clear()  # no session: the login form; an admin reads them too
        assert (await client.get("/console/alerts")).status_code == 303
        await login(client, ADMIN)
        assert (await client.get("/console/actions")).status_code == 200


def test_the_main_process_metrics_cover_every_process(running_engine: dict[str, str]) -> None:  # noqa: F811
    env = running_engine
    to = f"127.0.0.1:{env['TRABOULE_MLLP_PORT']}"
    assert cli("send", "fixtures/hl7/orm_o01_nw_latin1.hl7", "--to", to, env=env).returncode == 0
    url = f"http://127.0.0.1:{env['TRABOULE_HTTP_PORT']}/metrics"
    deadline = time.monotonic() + 10
    while True:
        found = samples(httpx.get(url, timeout=10).text)
        if value(found, "traboule_deliveries_total", queue="worklist", outcome="ok", process="worker"):
            break
        assert time.monotonic() < deadline, "the worker's deliveries never showed on the main process's /metrics"
        time.sleep(0.2)
    assert (value(found, "traboule_delivery_seconds_count", queue="worklist", process="worker") or 0) >= 1
    for child in ("worker", "fhir"):
        assert value(found, "traboule_process_restarts_total", child=child, process="main") == 0
        assert value(found, "traboule_process_up", process=child) == 1
    for queue in ("worklist", "fhir"):
        assert value(found, "traboule_dead_letters", queue=queue, process="main") == 0
        assert value(found, "traboule_queue_depth", queue=queue, process="main") is not None
    assert (
        value(found, "traboule_messages_received_total", channel="ris-orders", status="accepted", process="main") or 0
    ) >= 1

    # A child that dies is counted as restarted by the main process's supervisor.
    health = httpx.get(url.replace("/metrics", "/health"), timeout=10).json()
    os.kill(health["processes"]["fhir"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (
        value(samples(httpx.get(url, timeout=10).text), "traboule_process_restarts_total", child="fhir", process="main")
        != 1
    ):
        assert time.monotonic() < deadline, "the restart was not counted"
        time.sleep(0.1)
