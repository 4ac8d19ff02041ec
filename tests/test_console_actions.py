"""The console's operator actions and read pages without a browser, against real engines (in process): reprocess
with a dry run and a confirmation, dead letters listed, replayed and discarded (and the buses' discard), the
worklist page, the login rate limit, the roles and the CSRF token of every POST."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.test_bus import AnyBus, bus, bus_config, eventually, make_bus  # noqa: F401 (fixtures)
from tests.test_console import csrf_of
from tests.test_console import login as first_login
from tests.test_flow import fixture, send, until
from tests.test_reprocess import receive, service_requests, write_config
from traboule.app import config as config_mod
from traboule.app.http import create_app
from traboule.app.runtime import Runtime
from traboule.bus import Delivery

ADMIN = "actions-admin-token-0123456789abcdef"
OPERATOR = "actions-operator-token-0123456789abcdef"
READER = "actions-reader-token-0123456789abcdef"


def with_tokens(path: Path) -> Path:
    """The configuration at ``path`` with an admin, an operator and a read-only token."""
    path.write_text(
        path.read_text()
        + f'\n[http]\ntokens = ["{ADMIN}", {{ name = "night-shift", token = "{OPERATOR}", role = "operate" }},\n'
        f'          {{ name = "ris-team", token = "{READER}", role = "read" }}]\n'
    )
    return path


@contextlib.asynccontextmanager
async def engine(config: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    runtime = Runtime(config_mod.load(str(config), env={}))
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield runtime, client
    finally:
        await runtime.stop()


async def dead_letters(runtime: Runtime, count: int, timeout: float = 30.0) -> list[Delivery]:
    """The worklist channel's dead letters once there are ``count`` of them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(letters := await runtime.bus.dead_letters("worklist")) != count:
        assert asyncio.get_running_loop().time() < deadline, letters
        await asyncio.sleep(0.1)
    return letters


async def login(client: httpx.AsyncClient, token: str) -> httpx.Response:
    """Log in with ``token`` (out of any session first)."""
    client.cookies.delete("traboule_session", path="/console")
    return await first_login(client, token)


def hidden(page: httpx.Response) -> dict[str, Any]:
    """The hidden fields of a page's action form (``to`` may repeat)."""
    form: dict[str, Any] = {}
    for name, value in re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)"', page.text):
        value = html.unescape(value)
        if name == "to":
            form.setdefault("to", []).append(value)
        else:
            form[name] = value
    return form


async def test_reprocess_one_message_and_a_result_set_with_a_dry_run_first(tmp_path: Path) -> None:
    before = write_config(tmp_path, fhir=False)
    await receive(before, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))
    var = tmp_path / "var"
    after = with_tokens(write_config(tmp_path, fhir=True, name="with-fhir.toml"))  # a FHIR channel added since
    async with engine(after) as (runtime, client):
        store: Any = runtime.channel("fhir").store  # type: ignore[attr-defined]
        # A read session sees no reprocess link and cannot open the form or post it.
        await login(client, READER)
        assert "reprocess-link" not in (await client.get("/console/messages/1")).text
        assert (await client.get("/console/reprocess", params={"message": "1"})).status_code == 403
        page = await client.get("/console/")
        refused = await client.post(
            "/console/reprocess/run", data={"csrf": csrf_of(page), "ids": "1", "to": "fhir", "reason": "x"}
        )
        assert refused.status_code == 403 and store.count("ServiceRequest") == 0

        await login(client, OPERATOR)
        message = await client.get("/console/messages/1")
        assert 'href="/console/reprocess?message=1"' in message.text
        form = await client.get("/console/reprocess", params={"message": "1"})
        assert form.status_code == 200 and 'value="fhir"' in form.text and 'value="worklist"' in form.text
        fields = {**hidden(form), "to": ["fhir"], "reason": ""}
        no_reason = await client.post("/console/reprocess/dry-run", data=fields)
        assert no_reason.status_code == 400 and "reason is required" in no_reason.text
        no_csrf = await client.post("/console/reprocess/dry-run", data={**fields, "csrf": "", "reason": "backfill"})
        assert no_csrf.status_code == 403

        fields["reason"] = "FHIR channel added: backfill <b>ticket 42</b>"
        dry = await client.post("/console/reprocess/dry-run", data=fields)
        assert dry.status_code == 200, dry.text[-2000:]
        assert "journal entry 1  ORM^O01  accepted" in dry.text
        assert re.search(r'<span class="add">\+ +&#34;resourceType&#34;: &#34;ServiceRequest&#34;', dry.text)
        assert "nothing was sent" in dry.text and "&lt;b&gt;ticket 42&lt;/b&gt;" in dry.text
        assert store.count("ServiceRequest") == 0  # a dry run changes nothing

        confirm = hidden(dry)
        assert confirm["upto"] == "2" and confirm["ids"] == "1" and confirm["to"] == ["fhir"]
        no_csrf = await client.post("/console/reprocess/run", data={**confirm, "csrf": "forged"})
        assert no_csrf.status_code == 403
        done = await client.post("/console/reprocess/run", data=confirm)
        assert done.status_code == 200, done.text[-2000:]
        assert re.search(r'id="count-messages">1<', done.text) and re.search(r'id="count-failed">0<', done.text)
        assert "night-shift" in done.text
        await until(lambda: store.count("ServiceRequest") == 1)
        state = json.loads((var / "reprocess.json").read_text())
        assert state["operator"] == "night-shift" and state["reason"].startswith("FHIR channel added")
        (action,) = [json.loads(line) for line in (var / "console-actions.jsonl").read_text().splitlines()]
        assert (action["operator"], action["action"], action["to"]) == ("night-shift", "reprocess", ["fhir"])
        assert action["reason"] == fields["reason"] and (var / "console-actions.jsonl").stat().st_mode & 0o777 == 0o600

        # The browser's result set (both orders: the second one too, by type ORM and OMI)
        results = await client.get("/console/reprocess", params={"since": "2000-01-01"})
        assert results.status_code == 200 and "2 message(s) selected" in results.text
        fields = {**hidden(results), "to": ["fhir"], "reason": "the OMI order too"}
        assert fields["ids"] == "1-2"
        dry = await client.post("/console/reprocess/dry-run", data=fields)
        assert dry.status_code == 200 and "journal entry 2  OMI^O23" in dry.text
        done = await client.post("/console/reprocess/run", data=hidden(dry))
        assert re.search(r'id="count-messages">2<', done.text)
        await until(lambda: store.count("ServiceRequest") == 2)
        assert len(service_requests(var)) == 2

        # Nothing reprocessable, and a selection above the console's bound.
        empty = await client.get("/console/reprocess", params={"since": "2999-01-01"})
        assert empty.status_code == 400 and "No message to reprocess" in empty.text
        from traboule.app.console import actions

        actions.MAX_REPROCESS, bound = 1, actions.MAX_REPROCESS
        try:
            large = await client.get("/console/reprocess", params={"since": "2000-01-01", "channel": "ris-orders"})
            assert large.status_code == 400 and "command line" in large.text
            assert (
                "traboule journal reprocess --since 2000-01-01 --channel ris-orders --to CHANNEL --dry-run"
                in large.text
            )
        finally:
            actions.MAX_REPROCESS = bound


async def test_dead_letters_listed_replayed_and_discarded(tmp_path: Path) -> None:
    config = with_tokens(write_config(tmp_path, fhir=False))
    async with engine(config) as (runtime, client):
        bus = runtime.bus
        broken = b'{"not": "an event <script>alert(1)</script>"}'
        await bus.send("worklist", [("order.new", broken, "dl-1", {}), ("order.new", b"\xffnot json", "dl-2", {})])
        letters = await dead_letters(runtime, 2)
        assert {d.message_id for d in letters} == {"dl-1", "dl-2"}

        await login(client, READER)
        overview = await client.get("/console/dead-letters")
        assert overview.status_code == 200 and 'href="/console/dead-letters/worklist"' in overview.text
        assert re.search(r"worklist</a></td>\s*<td>2</td>", overview.text)
        page = await client.get("/console/dead-letters/worklist")
        assert page.status_code == 200 and "dl-1" in page.text and "dl-2" in page.text
        assert "&#34;not&#34;: &#34;an event &lt;script&gt;" in page.text and "<script" not in page.text
        assert 'class="error-text letter-error"' in page.text and "replay-all" not in page.text  # read: no buttons
        refused = await client.post(
            "/console/dead-letters/worklist/replay", data={"csrf": csrf_of(page), "message_id": "dl-1"}
        )
        assert refused.status_code == 403
        assert (await client.get("/console/dead-letters/no-such-queue")).status_code == 404

        await login(client, OPERATOR)
        page = await client.get("/console/dead-letters/worklist")
        csrf = csrf_of(page)
        assert (
            await client.post("/console/dead-letters/worklist/replay", data={"message_id": "dl-1"})
        ).status_code == 403
        discard = {"csrf": csrf, "message_id": "dl-2", "reason": ""}
        assert (await client.post("/console/dead-letters/worklist/discard", data=discard)).status_code == 400
        gone = await client.post("/console/dead-letters/worklist/discard", data={**discard, "reason": "test order"})
        assert gone.status_code == 303 and "done=discarded" in gone.headers["location"]
        assert [d.message_id for d in await bus.dead_letters("worklist")] == ["dl-1"]
        (action,) = [json.loads(line) for line in (tmp_path / "var" / "console-actions.jsonl").read_text().splitlines()]
        assert (action["operator"], action["action"], action["reason"]) == (
            "night-shift",
            "dead_letter.discard",
            "test order",
        )
        assert base64.b64decode(action["letters"][0]["body"]) == b"\xffnot json"  # kept whole: nothing lost

        replayed = await client.post("/console/dead-letters/worklist/replay", data={"csrf": csrf, "all": "1"})
        assert replayed.status_code == 303 and "done=replayed" in replayed.headers["location"]
        shown = await client.get(replayed.headers["location"])
        assert "Replayed" in shown.text
        # Delivered again (it still fails: it comes back with a fresh count of attempts).
        again = await dead_letters(runtime, 1)
        assert again[0].message_id == "dl-1"
        missing = await client.post(
            "/console/dead-letters/worklist/discard", data={**discard, "message_id": "nope", "reason": "x"}
        )
        assert "done=missing" in missing.headers["location"]


async def test_discard_removes_one_dead_letter_on_both_buses(bus: AnyBus) -> None:  # noqa: F811
    from tests.peer_rabbitmq import unique_name

    async def refuse(delivery: Delivery) -> None:
        raise ValueError("refused")

    queue = unique_name("q")
    await bus.subscribe(queue, ["orders.*"], refuse, max_attempts=1)
    for n in (1, 2, 3):
        await bus.publish("orders.new", f"body-{n}".encode(), message_id=f"m-{n}")
    await eventually(lambda: bus.dead_letters(queue), lambda d: len(d) == 3)
    assert await bus.discard_dead_letter(queue, "m-2")
    assert not await bus.discard_dead_letter(queue, "m-2")
    assert not await bus.discard_dead_letter(queue, "no-such-id")
    left = await bus.dead_letters(queue)
    assert [(d.message_id, d.body) for d in left] == [("m-1", b"body-1"), ("m-3", b"body-3")]  # in order, untouched


async def test_failed_logins_from_one_peer_are_refused_for_a_while(tmp_path: Path) -> None:
    config = with_tokens(write_config(tmp_path, fhir=False))
    async with engine(config) as (_, client):
        for _ in range(5):
            assert (await login(client, "wrong-token-0123456789")).status_code == 401
        blocked = await login(client, ADMIN)  # even the right token, from this peer, for a while
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 60
        assert "Too many failed logins" in blocked.text
        other = httpx.ASGITransport(app=client._transport.app, client=("10.0.0.9", 4000))  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=other, base_url="http://127.0.0.1") as elsewhere:
            assert (await login(elsewhere, ADMIN)).status_code == 303


async def test_the_worklist_page_filters_like_a_c_find_and_shows_the_published_report(
    tmp_path: Path, database_url: str
) -> None:
    from tests.test_console import READER as CONSOLE_READER
    from tests.test_console import open_console
    from tests.test_reports import report_of, study
    from traboule.model import Envelope

    async with open_console(tmp_path, database_url) as (runtime, client):
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        env = Envelope(study())
        await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
        await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)
        await until(lambda: runtime.channel("worklist").store.count() == 1)  # type: ignore[attr-defined]
        (ack,) = await send(runtime, fixture("oru_r01_report.hl7"))
        assert ack.segment("MSA").field(1) == "AA"  # type: ignore[union-attr]

        await login(client, CONSOLE_READER)  # role read is enough
        today = await client.get("/console/worklist")
        assert today.status_code == 200 and 'id="wl-date" value="20' in today.text  # today's, by default
        page = await client.get("/console/worklist", params={"date": "", "modality": "CT", "accession": "ACC*"})
        assert page.status_code == 200, page.text[-1500:]
        items = page.text[page.text.index('id="items"') :]
        assert "ACC0001" in items and "DUPONT^Hélène^Marie" in items and ">CT<" in items
        for _ in range(50):  # the document is published once the report's study is known (at once here)
            if "Published documents" in page.text:
                break
            await asyncio.sleep(0.1)
            page = await client.get("/console/worklist", params={"date": "", "accession": "ACC0001"})
        documents = page.text[page.text.index('id="docs-h"') :]
        assert "v1 current" in documents and "Contrôle dans 12 mois." in documents
        assert "<ClinicalDocument" not in page.text and "&lt;ClinicalDocument" not in page.text  # narrative only
        assert re.search(r"<h4>[^<]+</h4>", documents)  # the sections' titles

        none = await client.get("/console/worklist", params={"date": "", "modality": "MR"})
        assert none.status_code == 200 and 'id="no-items"' in none.text
        bad = await client.get("/console/worklist", params={"date": "yesterday", "station": "A\\B"})
        assert bad.status_code == 400 and "not a value a C-FIND takes" in bad.text


async def test_every_action_post_needs_the_role_and_the_csrf_token(tmp_path: Path) -> None:
    config = with_tokens(write_config(tmp_path, fhir=False))
    async with engine(config) as (runtime, client):
        await runtime.bus.send("worklist", [("order.new", b"{}", "dl-9", {})])
        await dead_letters(runtime, 1)
        posts = {
            "/console/reprocess/dry-run": {"ids": "1", "to": "worklist", "reason": "r"},
            "/console/reprocess/run": {"ids": "1", "to": "worklist", "reason": "r"},
            "/console/dead-letters/worklist/replay": {"message_id": "dl-9"},
            "/console/dead-letters/worklist/discard": {"message_id": "dl-9", "reason": "r"},
        }
        await login(client, READER)
        csrf = csrf_of(await client.get("/console/"))
        for url, form in posts.items():  # a read session, with a valid CSRF token
            assert (await client.post(url, data={**form, "csrf": csrf})).status_code == 403, url
        await login(client, OPERATOR)
        for url, form in posts.items():  # an operate session, without or with a forged token
            for forged in ({}, {"csrf": "x" * 43}):
                assert (await client.post(url, data={**form, **forged})).status_code == 403, url
        client.cookies.delete("traboule_session", path="/console")
        for url, form in posts.items():  # no session: to the login form
            response = await client.post(url, data={**form, "csrf": csrf})
            assert response.status_code == 303 and response.headers["location"] == "/console/login", url
        assert [d.message_id for d in await runtime.bus.dead_letters("worklist")] == ["dl-9"]  # nothing done
        assert not (tmp_path / "var" / "console-actions.jsonl").exists()


async def test_discard_archives_every_copy_it_deletes(tmp_path: Path, monkeypatch: Any) -> None:
    from traboule.app.console import actions

    config = with_tokens(write_config(tmp_path, fhir=False))
    async with engine(config) as (runtime, client):
        bus = runtime.bus
        await bus.send("worklist", [("order.new", b"first copy", "dup", {})])
        await dead_letters(runtime, 1)
        await bus.send("worklist", [("order.new", b"other", "other", {}), ("order.new", b"second copy", "dup", {})])
        await dead_letters(runtime, 3)
        await login(client, OPERATOR)
        csrf = csrf_of(await client.get("/console/dead-letters/worklist"))
        form = {"csrf": csrf, "message_id": "dup", "reason": "test order"}

        monkeypatch.setattr(actions, "DISCARD_SCAN", 2)  # more letters than the console reads: refused, kept
        refused = await client.post("/console/dead-letters/worklist/discard", data=form)
        assert refused.status_code == 409 and "traboule dlq replay" in refused.text
        assert len(await bus.dead_letters("worklist")) == 3

        monkeypatch.setattr(actions, "DISCARD_SCAN", 1000)
        monkeypatch.setattr(actions, "LETTERS", 1)  # the page lists one letter: both copies are archived anyway
        gone = await client.post("/console/dead-letters/worklist/discard", data=form)
        assert gone.status_code == 303 and "done=discarded" in gone.headers["location"]
        assert [d.message_id for d in await bus.dead_letters("worklist")] == ["other"]
        (action,) = [json.loads(line) for line in (tmp_path / "var" / "console-actions.jsonl").read_text().splitlines()]
        bodies = sorted(base64.b64decode(letter["body"]) for letter in action["letters"])
        assert bodies == [b"first copy", b"second copy"]


async def test_slow_concurrent_logins_are_counted_on_arrival(tmp_path: Path) -> None:
    from collections import Counter

    from traboule.app.console.auth import LoginLimiter

    config = with_tokens(write_config(tmp_path, fhir=False))
    async with engine(config) as (_, client):
        csrf = csrf_of(await client.get("/console/login"))
        gate = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield f"csrf={csrf}&".encode()
            await gate.wait()  # every login's body is in flight at once
            yield b"token=wrong-token-0123456789"

        posts = [
            asyncio.ensure_future(
                client.post(
                    "/console/login",
                    content=slow_body(),
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
            )
            for _ in range(30)
        ]
        await asyncio.sleep(0.3)
        gate.set()
        statuses = Counter(r.status_code for r in await asyncio.gather(*posts))
        assert statuses == Counter({401: 5, 429: 25}), statuses  # five guesses, not thirty

    limiter = LoginLimiter(concurrent=2)  # at most two checks at once, whichever peers
    assert limiter.attempt("10.0.0.1") == 0 and limiter.attempt("10.0.0.2") == 0
    assert limiter.attempt("10.0.0.3") == 1
    limiter.done()
    assert limiter.attempt("10.0.0.3") == 0
    limiter.succeeded("10.0.0.3")  # a right token forgives its reserved attempt
    assert limiter._failed.get("10.0.0.3") is None and limiter._failed["10.0.0.1"]


def test_a_channel_route_under_console_is_refused(tmp_path: Path) -> None:
    from tests.test_flow import engine_config
    from traboule.app.http import check_routes
    from traboule.errors import ConfigError

    cfg = engine_config(tmp_path)
    cfg.channels.append(
        {"name": "archive", "kind": "archive", "dicomweb": "http://127.0.0.1:9/dicom-web", "webhook": "/console/hook"}
    )
    try:
        check_routes(cfg)
    except ConfigError as exc:
        assert "under /console" in str(exc)
    else:
        raise AssertionError("a channel route under /console was accepted")
    cfg.channels[-1]["webhook"] = "/archive/stable"
    check_routes(cfg)


async def test_a_channel_route_under_console_is_never_served_without_a_token(tmp_path: Path) -> None:
    from tests.test_flow import engine_config
    from traboule.app.config import ApiToken

    cfg = engine_config(tmp_path)
    cfg.named_tokens = [ApiToken("ops", "admin", token=ADMIN)]
    cfg.channels.append(
        {"name": "archive", "kind": "archive", "dicomweb": "http://127.0.0.1:9/dicom-web", "webhook": "/console/hook"}
    )
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            hook = await client.post("/console/hook", json={"StudyInstanceUID": "1.2.3.4"})
            assert hook.status_code in (404, 405) and runtime.stores.journal().last_id() == 0
    finally:
        await runtime.stop()


async def test_the_worklist_page_says_refine_the_filters_past_its_bound(
    tmp_path: Path, database_url: str, monkeypatch: Any
) -> None:
    from tests.test_console import READER as CONSOLE_READER
    from tests.test_console import open_console
    from traboule.app.console import worklist

    async with open_console(tmp_path, database_url) as (runtime, client):
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await send(runtime, fixture("omi_o23_nw_utf8.hl7"))
        await until(lambda: runtime.channel("worklist").store.count() == 2)  # type: ignore[attr-defined]
        await login(client, CONSOLE_READER)
        assert "ACC0001" in (await client.get("/console/worklist", params={"date": ""})).text
        monkeypatch.setattr(worklist, "MAX_EXAMINED", 1)  # two candidates: one more than examined
        page = await client.get("/console/worklist", params={"date": ""})
        assert page.status_code == 400 and "refine the filters" in page.text and "ACC0001" not in page.text
