"""Access control of the HTTP API: bearer tokens, and loopback only without them."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.test_flow import engine_config, free_port
from traboule.app import config as config_mod
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
