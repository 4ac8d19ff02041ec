"""The operations console without a browser: token roles in the configuration, login and session, CSRF, escaping
of received values, the security headers, the search form's errors (the browser test drives the same pages)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_flow import engine_config, send
from traboule.app import config as config_mod
from traboule.app.config import ApiToken, find_token
from traboule.app.http import create_app
from traboule.app.runtime import Runtime

ADMIN = "0123456789abcdef0123456789abcdef"
READER = "reader-token-0123456789abcdef"
EVIL = (
    "MSH|^~\\&|RIS<script>|CHU|TRABOULE|CHU|20261125083000||ORM^O01|EVIL<script>alert(1)</script>|P|2.5\r"
    "PID|1||IPP9^^^CHU^PI||<img src=x onerror=alert(2)>^Eve||19800101|F\r"
    "ORC|NW|PLC9^RIS|FIL9^RIS||SC\r"
    'OBR|1|PLC9^RIS|FIL9^RIS|CT^Scanner"><script>alert(3)</script>^L||||||||||||||ACC9|RP9|SPS9||||CT\r'
)


def test_token_tables_with_names_roles_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "traboule.toml"
    digest = hashlib.sha256(READER.encode()).hexdigest()
    path.write_text(
        "[http]\n"
        f'tokens = ["{ADMIN}", {{ name = "ris-team", token_sha256 = "{digest.upper()}", role = "read" }},\n'
        f'          {{ name = "ops", token = "{ADMIN[::-1]}", role = "operate" }}]\n'
        '[console]\nsecret = "a-shared-console-secret-0123456789"\nsession_hours = 2\n'
    )
    cfg = config_mod.load(str(path), env={})
    assert cfg.api_tokens == [ADMIN]  # the plain strings, as before
    tokens = cfg.access_tokens()
    assert [(t.name, t.role) for t in tokens] == [("token-1", "admin"), ("ris-team", "read"), ("ops", "operate")]
    assert find_token(tokens, READER) == tokens[1]
    assert find_token(tokens, ADMIN[::-1].encode()) == tokens[2]
    assert find_token(tokens, "x" * 32) is None
    assert tokens[1].allows("read") and not tokens[1].allows("operate")
    assert tokens[2].allows("operate") and not tokens[2].allows("admin")
    assert cfg.api_headers() == {"Authorization": f"Bearer {ADMIN}"}
    assert cfg.console_secret.startswith("a-shared") and cfg.console_session_hours == 2
    assert config_mod.load(str(path), env={"TRABOULE_CONSOLE_SECRET": "from-the-env-0123456789"}).console_secret == (
        "from-the-env-0123456789"
    )


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ('{ name = "a", role = "read" }', "either token or token_sha256"),
        ('{ name = "a", token = "0123456789abcdef0", token_sha256 = "' + "0" * 64 + '" }', "either token"),
        ('{ name = "a", token_sha256 = "abc" }', "64 hexadecimal"),
        ('{ name = "a", token = "0123456789abcdef0", role = "root" }', "role must be one of"),
        ('{ name = "a b", token = "0123456789abcdef0" }', "name must be"),
        ('{ name = "a", token = "short" }', "at least 16"),
        ('{ name = "a", token = "0123456789abcdef0", scope = "x" }', "unknown keys"),
        ('{ name = "token-1", token = "0123456789abcdef0" }, "0123456789abcdef1"', "same name"),
    ],
)
def test_bad_token_tables_are_refused(tmp_path: Path, entry: str, error: str) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text(f"[http]\ntokens = [{entry}]\n")
    with pytest.raises(config_mod.ConfigError, match=error):
        config_mod.load(str(path), env={})


def test_only_hashed_tokens_need_a_single_process(tmp_path: Path) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text(f'[http]\ntokens = [{{ name = "a", token_sha256 = "{"0" * 64}" }}]\n')
    with pytest.raises(config_mod.ConfigError, match="token given in clear"):
        config_mod.load(str(path), env={})  # the default configuration runs three processes
    path.write_text(path.read_text() + '[engine]\ndefaults = false\n[[channels]]\nname = "x"\nkind = "hl7-orders"\n')
    assert config_mod.load(str(path), env={}).api_headers() == {}


@contextlib.asynccontextmanager
async def open_console(
    tmp_path: Path, database_url: str = "", query_timeout: float = 10.0
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """An engine (orders → worklist) with an admin and a read token, and a client of its HTTP app."""
    cfg = engine_config(tmp_path, database_url=database_url)
    cfg.console_query_timeout = query_timeout
    cfg.api_tokens = [ADMIN]
    cfg.named_tokens = [ApiToken("ris-team", "read", token=READER)]
    runtime = Runtime(cfg)
    await runtime.start()
    transport = httpx.ASGITransport(app=create_app(runtime))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield runtime, client
    finally:
        await runtime.stop()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    async with open_console(tmp_path) as opened:
        yield opened


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text[:500]
    return match.group(1)


async def login(client: httpx.AsyncClient, token: str) -> httpx.Response:
    page = await client.get("/console/login")
    assert page.status_code == 200
    return await client.post("/console/login", data={"csrf": csrf_of(page), "token": token})


async def found(client: httpx.AsyncClient, params: dict[str, str]) -> re.Match[str]:
    """The first message link the browser lists for ``params`` (the search index follows the journal within a
    second or so)."""
    for _ in range(100):
        page = await client.get("/console/messages", params=params)
        assert page.status_code == 200, page.text
        link = re.search(r'href="/console/messages/(\d+)"', page.text)
        if link:
            return link
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing found for {params}")


async def test_login_session_roles_and_logout(console: tuple[Runtime, httpx.AsyncClient], tmp_path: Path) -> None:
    runtime, client = console
    assert (await client.get("/console/")).status_code == 303  # to the login form
    assert (await client.get("/console/messages")).headers["location"] == "/console/login"
    assert (await client.get("/health")).status_code == 401  # the API is as closed as before
    secret = tmp_path / "console-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 64

    refused = await login(client, "not-a-token-0123456789")
    assert refused.status_code == 401 and "not one of the engine" in refused.text
    assert "traboule_session" not in client.cookies

    opened = await login(client, READER)
    assert opened.status_code == 303 and opened.headers["location"] == "/console/"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP here; HTTPS requests get Secure
    async with httpx.AsyncClient(transport=client._transport, base_url="https://127.0.0.1") as tls:
        assert "Secure" in (await login(tls, ADMIN)).headers["set-cookie"]
    dashboard = await client.get("/console/")
    assert dashboard.status_code == 200
    assert "ris-team" in dashboard.text and "read" in dashboard.text and "ris-orders" in dashboard.text
    headers = dashboard.headers
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script at all
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["cache-control"] == "no-store"

    # A session signed with another key, or tampered with, is no session.
    value = client.cookies["traboule_session"]
    client.cookies.set("traboule_session", value[:-2] + ("AA" if value[-2:] != "AA" else "BB"), path="/console")
    assert (await client.get("/console/")).status_code == 303
    client.cookies.set("traboule_session", value, path="/console")
    assert (await client.get("/console/")).status_code == 200

    # Logout needs the form's CSRF token; without it: 403 and still logged in.
    assert (await client.post("/console/logout", data={})).status_code == 403
    out = await client.post("/console/logout", data={"csrf": csrf_of(dashboard)})
    assert out.status_code == 303 and 'traboule_session=""' in out.headers["set-cookie"]
    client.cookies.delete("traboule_session", path="/console")
    assert (await client.get("/console/")).status_code == 303

    # A token removed from the configuration ends its sessions.
    await login(client, READER)
    assert (await client.get("/console/")).status_code == 200
    runtime.config.named_tokens = []
    assert (await client.get("/console/")).status_code == 303


async def test_a_post_without_the_csrf_token_is_refused(console: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = console
    await client.get("/console/login")  # the browser's CSRF cookie
    for form in ({"token": ADMIN}, {"token": ADMIN, "csrf": "forged"}):
        refused = await client.post("/console/login", data=form)
        assert refused.status_code == 403 and "traboule_session" not in client.cookies
    other = httpx.AsyncClient(transport=client._transport, base_url="http://127.0.0.1")  # another browser
    page = await other.get("/console/login")
    refused = await client.post("/console/login", data={"token": ADMIN, "csrf": csrf_of(page)})
    assert refused.status_code == 403  # its token is bound to its own cookie
    await other.aclose()


async def test_received_values_are_shown_escaped(tmp_path: Path, database_url: str) -> None:
    async with open_console(tmp_path, database_url) as (runtime, client):
        await _shown_escaped(runtime, client)


async def _shown_escaped(runtime: Runtime, client: httpx.AsyncClient) -> None:
    (ack,) = await send(runtime, EVIL.encode())
    assert ack.segment("MSA") is not None
    await login(client, ADMIN)
    link = await found(client, {"control_id": "EVIL<script>alert(1)</script>"})
    assert (await found(client, {"accession": "ACC9", "since": "2026-01-01"})).group(1) == link.group(1)
    later = await client.get("/console/messages", params={"accession": "ACC9", "since": "2999-01-01T00:00"})
    assert later.status_code == 200 and "message-link" not in later.text
    page = await client.get(f"/console/messages/{link.group(1)}")
    assert page.status_code == 200
    assert "<script" not in page.text  # the console's pages have no script: any would be a received one
    assert "<img src=x" not in page.text and "&lt;img src=x onerror=alert(2)&gt;" in page.text
    assert "EVIL&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "Patient Name" in page.text and "Placer Order Number" in page.text  # field names from the reference
    assert "order.new" in page.text and "ACC9" in page.text  # the canonical event it maps to today


async def test_form_errors_and_unreadable_messages_are_shown_not_raised(
    console: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = console
    await login(client, ADMIN)
    for params, said in (
        ({"since": "yesterday"}, "not a date"),
        ({"type": "ORM^O01<x>"}, "ORM^O01"),
        ({"text": "ab"}, "at least 3"),
    ):
        page = await client.get("/console/messages", params=params)
        assert page.status_code == 400 and said in page.text, (params, page.text[-800:])
    assert (await client.get("/console/messages/999999")).status_code == 404
    from traboule.stores import journal

    garbage = journal.JournalEntry("ris-orders", b"\xff<b>not HL7</b>", "rejected", error="message does not start")
    entry = await asyncio.to_thread(journal.record, runtime.journal_path, garbage)
    page = await client.get(f"/console/messages/{entry.id}")  # shown as bytes, with why it could not be read
    assert page.status_code == 200 and "ÿ&lt;b&gt;not HL7&lt;/b&gt;" in page.text and "MSH segment" in page.text
    french = await client.get("/console/messages", headers={"Accept-Language": "fr-FR,fr;q=0.9"})
    assert "Rechercher" in french.text and 'lang="fr"' in french.text


async def test_without_tokens_the_console_is_open_and_says_so(tmp_path: Path) -> None:
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            page = await client.get("/console/")
            assert page.status_code == 200 and "on loopback only" in page.text
            css = await client.get("/console/static/console.css")
            assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    finally:
        await runtime.stop()


def test_the_console_assets_are_package_data() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.html" in data["traboule.app.console"] and "static/*.css" in data["traboule.app.console"]
    assert os.path.isfile(root / "traboule/app/console/static/console.css")


def test_journal_scan_answers_the_search_contract_without_an_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from traboule.app.console import reader
    from traboule.stores import journal
    from traboule.stores.journal_search import SearchQuery

    path = tmp_path / "journal.sqlite"
    for n in range(1, 8):
        status = "rejected" if n == 5 else "accepted"
        raw = f"MSH|^~\\&|RIS|CHU|T|CHU|2026||ORM^O01|C{n}|P|2.5\rPID|1||IPP{n}\r".encode()
        journal.record(
            path, journal.JournalEntry("ris-orders", raw, status, control_id=f"C{n}", message_type="ORM^O01")
        )
    monkeypatch.setattr(reader, "SCAN_WINDOW", 2)  # several windows for seven entries
    scan = reader.JournalScan(journal.SQLiteJournal(path))
    first = scan.search(SearchQuery(), limit=3)
    assert [e.id for e in first.entries] == [7, 6, 5] and first.next_before == 5
    second = scan.search(SearchQuery(), before=first.next_before, limit=3)
    assert [e.id for e in second.entries] == [4, 3, 2] and second.next_before == 2
    assert [e.id for e in scan.search(SearchQuery(), before=2, limit=3).entries] == [1]
    assert [e.id for e in scan.search(SearchQuery(control_id="C3")).entries] == [3]
    assert [e.id for e in scan.search(SearchQuery(text="ipp6")).entries] == [6]
    assert [e.id for e in scan.search(SearchQuery(statuses=["rejected"])).entries] == [5]
    with pytest.raises(ValueError, match="search index"):
        scan.search(SearchQuery(accession="ACC1"))
    with pytest.raises(ValueError, match="at least 3"):
        scan.search(SearchQuery(text="ip"))


def test_every_label_exists_in_both_languages() -> None:
    from traboule.app.console.labels import LABELS

    assert set(LABELS["en"]) == set(LABELS["fr"])
    assert not [k for k in LABELS["en"] if hasattr(dict, k)]  # t.keys in a template would be the dict's method
    folder = Path(__file__).resolve().parents[1] / "traboule/app/console/templates"
    used = {m for page in folder.glob("*.html") for m in re.findall(r"\bt\.([a-z_]+)", page.read_text())}
    assert used and used <= set(LABELS["en"]), used - set(LABELS["en"])


def console_of(client: httpx.AsyncClient) -> Any:
    """The `Console` behind a client's app (its reader, its limiter)."""
    app: Any = client._transport.app  # type: ignore[attr-defined]
    while not hasattr(app, "router"):
        app = app.app
    mount = next(r for r in app.router.routes if getattr(r, "name", "") == "console")
    route = next(r for r in mount.app.routes if getattr(r, "name", "") == "dashboard")
    return route.endpoint.__self__


async def test_a_large_message_is_laid_out_capped_and_downloadable_whole(
    console: tuple[Runtime, httpx.AsyncClient],
) -> None:
    from traboule.app.console import message as message_mod
    from traboule.stores.journal import JournalEntry

    runtime, client = console
    obx = "".join(f"OBX|{n}|TX|CODE^Text||{'v' * 1000}|||||||F\r" for n in range(1, 1201))
    raw = (
        "MSH|^~\\&|LAB|CHU|TRABOULE|CHU|20261125083000||ORU^R01|BIG1|P|2.5\rPID|1||IPP1^^^CHU^PI||DOE^John\r"
        + "OBR|1|||CT\r"
        + obx
        + "ZZZ|"
        + "w" * 5000
        + "\r"
    ).encode()
    entry = runtime.stores.record(JournalEntry("ris-orders", raw, "rejected", control_id="BIG1"))
    await login(client, ADMIN)
    page = await client.get(f"/console/messages/{entry.id}")
    assert page.status_code == 200
    tables = page.text.count('<table class="segment">')
    assert 0 < tables < message_mod.MAX_SEGMENTS  # the characters of fields ran out first here
    assert 'id="segments-not-shown"' in page.text and f"{1204 - tables} more not shown" in page.text
    assert len(page.text) < 1_000_000 < len(raw)  # the fields and the raw text capped (uncapped: twice the raw)
    download = await client.get(f"/console/messages/{entry.id}/raw")
    assert download.status_code == 200 and download.content == raw
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.headers["x-content-type-options"] == "nosniff"

    # The caps of the layout itself: segments, characters of fields over all segments, one value, the raw text.
    huge = JournalEntry("ris-orders", raw, "rejected")
    view = message_mod.lay_out(huge)
    shown = sum(len(f.value) for s in view.segments for f in s.fields)
    assert shown <= message_mod.MAX_FIELDS + message_mod.MAX_VALUE and view.hidden_segments > 0
    assert len(view.text) == message_mod.MAX_SHOWN and view.hidden_text == len(huge.raw) - message_mod.MAX_SHOWN
    small = JournalEntry("ris-orders", raw.replace(b"v" * 1000, b"v" * 10), "rejected")
    assert len(message_mod.lay_out(small).segments) == message_mod.MAX_SEGMENTS
    zzz = message_mod.lay_out(JournalEntry("ris-orders", raw[:200] + b"\rZZZ|" + b"w" * 5000, "rejected"))
    assert zzz.segments[-1].fields[0].value == "w" * message_mod.MAX_VALUE + "…"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        (b"localhost", True),
        (b"localhost:8080", True),
        (b"127.0.0.1:8080", True),
        (b"127.1.2.3", True),
        (b"[::1]:8080", True),
        (b"[::1]", True),
        (b"attacker.example:8080", False),
        (b"localhost.attacker.example", False),
        (b"127.0.0.1.nip.io", False),
        (b"10.0.0.1:8080", False),
        (b"[::1]x", False),
        (b"localhost:80x", False),
        (b"", False),
    ],
)
def test_loopback_hosts(host: bytes, loopback: bool) -> None:
    from traboule.app.console.guard import loopback_host

    assert loopback_host(host) is loopback


async def test_an_open_console_answers_loopback_host_names_only(tmp_path: Path) -> None:
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        for base, status in (
            ("http://attacker.example:8080", 421),  # DNS rebinding: the attacker's name resolving to 127.0.0.1
            ("http://localhost:8080", 200),
            ("http://[::1]:8080", 200),
        ):
            async with httpx.AsyncClient(transport=transport, base_url=base) as client:
                page = await client.get("/console/")
                assert page.status_code == status, base
                assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
                posted = await client.post("/console/dead-letters/worklist/discard", data={"message_id": "x"})
                assert (posted.status_code == 421) is (status == 421)
            async with httpx.AsyncClient(transport=transport, base_url=base) as client:
                assert (await client.get("/health/live")).status_code == 200  # the API as before
    finally:
        await runtime.stop()


async def test_a_csrf_token_made_without_a_session_is_refused_for_a_session(
    console: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, victim = console
    await login(victim, ADMIN)
    async with httpx.AsyncClient(transport=victim._transport, base_url="http://127.0.0.1") as attacker:
        anonymous = await attacker.get("/console/login")  # cookie K and token T, no account needed
        key, token = attacker.cookies["traboule_csrf"], csrf_of(anonymous)
    own = csrf_of(await victim.get("/console/"))
    victim.cookies.set("traboule_csrf", key, path="/console")  # K tossed into the victim's browser
    tossed = await victim.post("/console/logout", data={"csrf": token})
    assert tossed.status_code == 403 and (await victim.get("/console/")).status_code == 200
    assert own != token
    fresh = csrf_of(await victim.get("/console/"))  # the page made with the victim's session and K
    for site in ("same-site", "cross-site"):  # another port of this host (Orthanc Explorer...), another site
        posted = await victim.post("/console/logout", data={"csrf": fresh}, headers={"Sec-Fetch-Site": site})
        assert posted.status_code == 403
    assert (await victim.post("/console/logout", data={"csrf": fresh})).status_code == 303


async def test_logout_ends_the_session_on_the_server(console: tuple[Runtime, httpx.AsyncClient]) -> None:
    from traboule.app.console.auth import REVOKED_FILE, Sessions

    runtime, client = console
    await login(client, READER)
    page = await client.get("/console/")
    copied = client.cookies["traboule_session"]
    assert (await client.post("/console/logout", data={"csrf": csrf_of(page)})).status_code == 303
    client.cookies.set("traboule_session", copied, path="/console")  # the cookie replayed after the logout
    assert (await client.get("/console/")).status_code == 303
    revoked = Path(runtime.config.data_dir) / REVOKED_FILE
    assert revoked.stat().st_mode & 0o777 == 0o600
    sessions = console_of(client).sessions
    restarted = Sessions(runtime.config, sessions.secret, Path(runtime.config.data_dir))  # after a restart
    assert len(restarted.revoked.until) == 1 and set(restarted.revoked.until) == set(sessions.revoked.until)

    # A session lasts no longer than today's session_hours since its login, whatever its cookie says.
    client.cookies.delete("traboule_session", path="/console")
    await login(client, READER)
    assert (await client.get("/console/")).status_code == 200
    sessions.lifetime = 0
    assert (await client.get("/console/")).status_code == 303


async def test_every_console_answer_has_the_security_headers(console: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = console
    answers = [
        await client.get("/console"),  # the redirect to /console/
        await client.get("/console/nope"),
        await client.get("/console/"),  # to the login form
        await client.post("/console/login", content=b"token=" + b"x" * 3_000_000),  # 413 from the body limit
    ]
    await login(client, ADMIN)
    reader = console_of(client).reader

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    reader.search = broken  # type: ignore[method-assign]
    answers.append(await client.get("/console/messages"))  # a 500 from CatchAll
    assert [a.status_code for a in answers] == [307, 404, 303, 413, 500]
    for answer in answers:
        assert "default-src 'none'" in answer.headers["content-security-policy"], answer.status_code
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"


async def test_a_form_with_too_many_fields_is_refused_not_a_500(console: tuple[Runtime, httpx.AsyncClient]) -> None:
    _, client = console
    page = await client.get("/console/login")
    fields = {f"f{n}": "x" for n in range(30)} | {"csrf": csrf_of(page), "token": ADMIN}
    assert (await client.post("/console/login", data=fields)).status_code == 413
    await login(client, ADMIN)
    page = await client.get("/console/")
    fields = {f"f{n}": "x" for n in range(100)} | {"csrf": csrf_of(page), "message_id": "x", "reason": "r"}
    refused = await client.post("/console/dead-letters/worklist/discard", data=fields)
    assert refused.status_code == 400 and "The form is too large" in refused.text
    unknown = await client.get("/console/messages", params={"channel": "no-such-channel"})
    assert unknown.status_code == 400 and "ris-orders" in unknown.text  # not walked: the channels are named


async def test_a_busy_console_answers_503_with_retry_after(console: tuple[Runtime, httpx.AsyncClient]) -> None:
    import threading

    from traboule.app.console.reader import Reader
    from traboule.errors import ConsoleBusy

    _, client = console
    await login(client, ADMIN)
    reader = console_of(client).reader
    reader.queued = reader.pending  # nothing more is taken
    busy = await client.get("/console/messages")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    assert busy.headers["x-frame-options"] == "DENY"
    reader.queued = 8
    assert (await client.get("/console/messages")).status_code == 200

    # Two threads, a bounded queue: a third job is refused while two run; the pool is free again after.
    pool = Reader(console_of(client).runtime, workers=2, queued=2)
    release = threading.Event()
    running = [asyncio.ensure_future(pool.run(release.wait, 10)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(ConsoleBusy):
        await pool.run(lambda: None)
    release.set()
    assert await asyncio.gather(*running) == [True, True]
    assert await pool.run(lambda: 42) == 42 and pool.pending == 0
    pool.close()


async def test_opening_a_4_mib_message_does_not_hold_the_event_loop(
    console: tuple[Runtime, httpx.AsyncClient],
) -> None:
    from traboule.stores.journal import JournalEntry

    runtime, client = console
    obx = "".join(f"OBX|{n}|TX|CODE^Text||{'v' * 480}|||||||F\r" for n in range(1, 9001))
    raw = ("MSH|^~\\&|LAB|CHU|TRABOULE|CHU|20261125083000||ORU^R01|BIG2|P|2.5\rOBR|1|||CT\r" + obx).encode()
    assert len(raw) > 4 * 1024 * 1024
    entry = runtime.stores.record(JournalEntry("ris-orders", raw, "rejected", control_id="BIG2"))
    await login(client, ADMIN)
    loop = asyncio.get_running_loop()
    stalls: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:  # what the MLLP acknowledgements need: the loop turning
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            stalls.append(loop.time() - before - 0.01)

    ticking = asyncio.ensure_future(ticker())
    page = await client.get(f"/console/messages/{entry.id}")
    done.set()
    await ticking
    assert page.status_code == 200 and len(page.content) < 2_000_000  # was about 85 MiB
    assert '<table class="segment">' in page.text and 'id="segments-not-shown"' in page.text
    assert max(stalls) < 0.5, max(stalls)


def test_the_console_stores_carry_its_statement_timeout_in_their_url(tmp_path: Path) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from traboule.app.console.reader import bounded_stores
    from traboule.stores.factory import PostgresStores, SQLiteStores

    sqlite = SQLiteStores(tmp_path)
    assert bounded_stores(sqlite, 2.5) is sqlite  # no statement timeout on SQLite
    for url in (
        "postgresql://traboule:s3cret@db.example:5433/engine?options=-c%20search_path%3Dris&sslmode=prefer",
        "host=db.example port=5433 dbname=engine user=traboule password=s3cret options='-c search_path=ris'",
    ):
        engine = PostgresStores(url, tmp_path)
        console = bounded_stores(engine, 2.5)
        assert engine.url == url and console is not engine  # the engine's own connections keep theirs
        given = conninfo_to_dict(console.url)
        assert given["options"] == "-c search_path=ris -c statement_timeout=2500"  # after the URL's own: it wins
        assert (given["host"], given["port"], given["dbname"], given["password"]) == (
            "db.example",
            "5433",
            "engine",
            "s3cret",
        )
    assert config_mod.load(str(_console_toml(tmp_path, 'query_timeout = "90s"')), env={}).console_query_timeout == 90
    assert config_mod.Config().console_query_timeout == 10
    for bad in ("0", "-1", '"forever"', "7200"):
        with pytest.raises(config_mod.ConfigError, match="query_timeout"):
            config_mod.load(str(_console_toml(tmp_path, f"query_timeout = {bad}")), env={})


def _console_toml(folder: Path, line: str) -> Path:
    path = folder / "traboule.toml"
    path.write_text(f"[console]\n{line}\n")
    return path


async def test_a_console_query_over_its_timeout_answers_504_and_ingest_waits_on(tmp_path: Path, pg_url: str) -> None:
    """On PostgreSQL the console's connections run each statement with ``[console] query_timeout``: a search held
    up (another session holds the journal's table) is cancelled after it and answered 504 "narrow the search",
    while a message arriving meanwhile waits, on the engine's own connections, and is accepted."""
    import time

    from traboule.stores.postgres import connect

    async with open_console(tmp_path, pg_url, query_timeout=0.5) as (runtime, client):
        await login(client, ADMIN)
        assert (await client.get("/console/messages")).status_code == 200
        reader = console_of(client).reader

        def statement_timeout(url: str) -> str:
            with contextlib.closing(connect(url)) as db:
                row = db.execute("SHOW statement_timeout").fetchone()
            return str(row[0]) if row else ""

        assert statement_timeout(reader.stores.url) == "500ms"
        assert statement_timeout(runtime.stores.url) == "30s"  # the engine's default, not the console's

        holder = await asyncio.to_thread(connect, pg_url, autocommit=False)
        try:
            await asyncio.to_thread(holder.execute, "LOCK TABLE journal_messages IN ACCESS EXCLUSIVE MODE")
            ingest = asyncio.ensure_future(send(runtime, EVIL.encode()))  # waits for the lock
            started = time.monotonic()
            slow = await client.get("/console/messages", params={"text": "EVIL"})
            elapsed = time.monotonic() - started
            assert not ingest.done()
        finally:
            await asyncio.to_thread(holder.rollback)
            holder.close()
        assert slow.status_code == 504, slow.text[-600:]
        assert "narrow the search" in slow.text and slow.headers["x-frame-options"] == "DENY"
        assert 0.4 < elapsed < 5, elapsed  # cancelled after its 0.5 s, not the engine's 30 s
        (ack,) = await ingest
        assert ack.segment("MSA") is not None and ack.segment("MSA").field(1) == "AA"
        french = await client.get("/console/messages", params={"text": "EVIL"}, headers={"Accept-Language": "fr"})
        assert french.status_code == 200 and "Rechercher" in french.text  # the same connections serve on
