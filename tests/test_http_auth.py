"""Access control of the HTTP API: bearer tokens, and loopback only without them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_flow import engine_config, free_port
from traboule.app import config as config_mod
from traboule.app.config import ApiToken
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime

TOKEN = "0123456789abcdef0123456789abcdef"


def test_tokens_from_the_environment_and_the_file(tmp_path: Path) -> None:
    cfg = config_mod.load(env={"TRABOULE_API_TOKENS": f"{TOKEN}, {TOKEN[::-1]} ,"})
    assert cfg.api_tokens == [TOKEN, TOKEN[::-1]]
    path = tmp_path / "traboule.toml"
    path.write_text(f'[http]\nhost = "0.0.0.0"\ntokens = ["{TOKEN}"]\n')
    assert config_mod.load(str(path), env={}).api_tokens == [TOKEN]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_a_non_loopback_address_without_tokens_refuses_to_start(host: str) -> None:
    with pytest.raises(config_mod.ConfigError, match="without access control"):
        config_mod.load(env={"TRABOULE_HTTP_HOST": host})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_without_tokens_is_allowed(host: str) -> None:
    assert config_mod.load(env={"TRABOULE_HTTP_HOST": host}).http_host == host


def test_short_tokens_are_refused() -> None:
    with pytest.raises(config_mod.ConfigError, match="at least 16"):
        config_mod.load(env={"TRABOULE_API_TOKENS": "secret"})


async def test_requests_without_a_valid_token_get_401_and_nothing_else(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    cfg.api_tokens = [TOKEN]
    cfg.http_limits.max_auth_failures = 100  # 15 refusals here; the limit has its own test
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for path in ("/health", "/channels", "/metrics", "/fhir/metadata", "/fhir/Patient?identifier=x"):
                for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                    response = await client.get(path, headers=headers)
                    assert response.status_code == 401, (path, headers)
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    assert "traboule" not in response.text.replace('realm="traboule"', "")
                    if path.startswith("/fhir"):
                        assert response.json()["resourceType"] == "OperationOutcome"
                good = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
                assert good.status_code == 200, (path, good.text)
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_a_request_without_a_token_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    from tests.test_http_limits import exchange, head

    cfg = engine_config(tmp_path)
    cfg.api_tokens = [TOKEN]
    dicomweb = f"http://127.0.0.1:{free_port()}/dicom-web"
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": dicomweb})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        huge = "Content-Length: 209715200"  # announced, never sent
        assert (await exchange(port, head("POST", "/archive/stable", huge))).status == 401
        assert (
            await exchange(port, head("POST", "/archive/stable", huge, f"Authorization: Bearer {TOKEN}"))
        ).status == 413
        assert runtime.journal.recent(5) == []
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


READER = "reader-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"


class Trail:
    """An audit trail keeping the events recorded on it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def record(self, event: Any) -> None:
        self.events.append(event)


@contextlib.asynccontextmanager
async def api_with_roles(tmp_path: Path, max_auth_failures: int = 10) -> AsyncIterator[tuple[Runtime, Any, Trail]]:
    """An engine with an admin, a read and an operate token, the archive webhook and the FHIR API, its audit trail
    recording, and its HTTP app (called in process: each test client chooses its address)."""
    cfg = engine_config(tmp_path)
    cfg.api_tokens = [TOKEN]
    cfg.named_tokens = [ApiToken("viewer", "read", token=READER), ApiToken("feeder", "operate", token=OPERATOR)]
    cfg.http_limits.max_auth_failures = max_auth_failures
    cfg.channels.append({"name": "archive", "kind": "archive", "dicomweb": f"http://127.0.0.1:{free_port()}/dw"})
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    trail = Trail()
    runtime.audit = trail  # type: ignore[attr-defined]
    await runtime.start()
    try:
        yield runtime, create_app(runtime), trail
    finally:
        await runtime.stop()


def client_at(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


STABLE = {"StudyInstanceUID": "1.2.250.1.59.3.1"}


async def test_roles_are_enforced_on_the_api_and_every_refusal_is_audited(tmp_path: Path) -> None:
    async with api_with_roles(tmp_path) as (runtime, app, trail), client_at(app, "10.1.2.3") as client:
        # read: every GET, and a FHIR search by POST
        for path in ("/health/live", "/channels", "/metrics", "/fhir/metadata", "/fhir/Patient?identifier=x"):
            assert (await client.get(path, headers=bearer(READER))).status_code == 200, path
        search = await client.post("/fhir/Patient/_search", data={"identifier": "x"}, headers=bearer(READER))
        assert search.status_code == 200, search.text
        # a write needs operate: the archive's feed...
        refused = await client.post("/archive/stable", json=STABLE, headers=bearer(READER))
        assert refused.status_code == 403
        assert refused.json() == {"error": "this request needs a token with role operate"}
        assert runtime.journal is not None and runtime.journal.recent(5) == []
        # ... and any other method under /fhir (an OperationOutcome there)
        outcome = await client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=bearer(READER))
        assert outcome.status_code == 403 and outcome.json()["issue"][0]["code"] == "forbidden"
        assert "operate" in outcome.json()["issue"][0]["diagnostics"]
        for token in (OPERATOR, TOKEN):  # operate and admin may
            assert (await client.post("/archive/stable", json=STABLE, headers=bearer(token))).status_code == 202
        assert (await client.get("/channels")).status_code == 401
        assert (await client.get("/channels", headers=bearer("x" * 32))).status_code == 401

    failures = [e for e in trail.events if e.kind == "user-authentication"]
    assert [(e.requestor.user_id, e.requestor.address, e.description) for e in failures] == [
        ("viewer", "10.1.2.3", "token role does not allow the request"),
        ("viewer", "10.1.2.3", "token role does not allow the request"),
        ("anonymous", "10.1.2.3", "no bearer token"),
        ("anonymous", "10.1.2.3", "bearer token not recognised"),
    ]
    recorded = repr([e.as_dict() for e in trail.events])
    assert READER not in recorded and "x" * 32 not in recorded  # never the token presented


async def test_an_address_with_too_many_refusals_gets_429_and_others_go_on(tmp_path: Path) -> None:
    async with (
        api_with_roles(tmp_path, max_auth_failures=3) as (_runtime, app, trail),
        client_at(app, "10.0.0.66") as guesser,
        client_at(app, "10.0.0.7") as neighbour,
    ):
        for _ in range(20):  # requests that pass are not counted
            assert (await guesser.get("/channels", headers=bearer(READER))).status_code == 200
        for n in range(3):
            assert (await guesser.get("/channels", headers=bearer(f"guess-{n}-0123456789abcdef"))).status_code == 401
        blocked = await guesser.get("/fhir/metadata", headers=bearer("guess-3-0123456789abcdef"))
        assert blocked.status_code == 429 and blocked.json()["resourceType"] == "OperationOutcome"
        assert 0 < int(blocked.headers["retry-after"]) <= 61
        # While blocked, even the right token is not checked: a right guess would not be told apart.
        assert (await guesser.get("/channels", headers=bearer(READER))).status_code == 429
        # Another address goes on, its own refusals counted apart.
        assert (await neighbour.get("/channels", headers=bearer("wrong-0123456789abcdef"))).status_code == 401
        assert (await neighbour.get("/channels", headers=bearer(READER))).status_code == 200
    addresses = [e.requestor.address for e in trail.events if e.kind == "user-authentication"]
    assert addresses == ["10.0.0.66"] * 3 + ["10.0.0.7"]  # the blocked requests do not flood the trail


def internal(**more: str) -> dict[str, str]:
    """The headers of one of the engine's internal calls (this run's secret, `traboule.app.http.internal_secret`)."""
    from traboule.app.http import INTERNAL_HEADER, internal_secret

    return {INTERNAL_HEADER.decode(): internal_secret(), **more}


async def test_a_local_guesser_cannot_lock_the_internal_calls_out(tmp_path: Path) -> None:
    """Every local process connects from 127.0.0.1, as the main process does: bad tokens from one block 127.0.0.1,
    but the internal calls (this run's secret) are neither refused nor counted; a wrong secret is a plain request."""
    from traboule.app.http import INTERNAL_HEADER

    async with (
        api_with_roles(tmp_path, max_auth_failures=3) as (_runtime, app, trail),
        client_at(app, "127.0.0.1") as local,
    ):
        for n in range(3):
            assert (await local.get("/channels", headers=bearer(f"guess-{n}-0123456789abcdef"))).status_code == 401
        assert (await local.get("/health/live", headers=bearer(TOKEN))).status_code == 429
        for _ in range(20):  # the supervisor's readiness checks go on
            assert (await local.get("/health/live", headers=internal(**bearer(TOKEN)))).status_code == 200
        # An internal call with a wrong token is refused (the token is still checked), never blocked nor counted.
        assert (await local.get("/channels", headers=internal(**bearer("bad-0123456789abcdef")))).status_code == 401
        forged = {INTERNAL_HEADER.decode(): "0" * 43, **bearer(TOKEN)}
        assert (await local.get("/health/live", headers=forged)).status_code == 429
    refusals = [e for e in trail.events if e.kind == "user-authentication"]
    assert len(refusals) == 4


async def test_x_forwarded_for_is_believed_only_from_the_main_process(tmp_path: Path) -> None:
    """The FHIR API records the client's address; a request's X-Forwarded-For names another one only on a request
    of the main process (this run's secret), never from another local process."""
    async with api_with_roles(tmp_path) as (_runtime, app, trail), client_at(app, "127.0.0.1") as local:
        spoofed = {"X-Forwarded-For": "10.6.6.6", **bearer(READER)}
        assert (await local.get("/fhir/Patient?identifier=x", headers=spoofed)).status_code == 200
        assert (await local.get("/fhir/Patient?identifier=y", headers=internal(**spoofed))).status_code == 200
        wrong = {"X-Traboule-Internal": "x" * 43, **spoofed}
        assert (await local.get("/fhir/Patient?identifier=z", headers=wrong)).status_code == 200
    queries = [e for e in trail.events if e.kind == "query"]
    assert [e.requestor.address for e in queries] == ["127.0.0.1", "10.6.6.6", "127.0.0.1"]
    assert {e.requestor.user_id for e in queries} == {"viewer"}


def test_a_forwarded_request_carries_the_secret_and_never_the_clients_own() -> None:
    from traboule.app.http import INTERNAL_HEADER, _forwarded_headers, internal_secret

    scope = {
        "headers": [(b"host", b"engine.example"), (INTERNAL_HEADER, b"guessed"), (b"x-forwarded-for", b"10.6.6.6")],
        "client": ("10.1.2.3", 40000),
        "scheme": "https",
    }
    headers = _forwarded_headers(scope, "127.0.0.1:8080")
    assert [v for k, v in headers if k == INTERNAL_HEADER] == [internal_secret().encode()]
    assert [v for k, v in headers if k == b"x-forwarded-for"] == [b"10.1.2.3"]
