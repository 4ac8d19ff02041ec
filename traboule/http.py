"""The engine's HTTP app: health, Prometheus metrics, channel status, and the routes channels contribute.

Access control: with API tokens configured (``TRABOULE_API_TOKENS`` or ``[http] tokens``), every request needs
``Authorization: Bearer <token>``; without one it gets 401 and nothing else. Without tokens the API is served on
loopback only: the configuration refuses another address (``traboule.config``).
"""

from __future__ import annotations

import hmac
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from traboule import metrics


def create_app(runtime: Any) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        journal = runtime.journal
        ok = runtime.started
        body: dict[str, Any] = {
            "status": "ok" if ok else "starting",
            "process": runtime.process or "main",
            "bus": "rabbitmq" if runtime.config.amqp_url else "embedded",
        }
        if journal is not None:  # cheap on purpose: it runs on the ingest loop (counts by status are in /metrics)
            body["outbox_pending"] = journal.outbox_depth()
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def channels(request: Request) -> JSONResponse:
        """Every configured channel: described by the process running it, or named with the process that does."""
        local = {c.name: c for c in runtime.channels}
        listing = []
        for cfg in runtime.config.channels:
            channel = local.get(cfg["name"])
            if channel is not None:
                listing.append({"name": channel.name, "process": runtime.process or "main", **channel.describe()})
            else:
                listing.append({"name": cfg["name"], "kind": cfg["kind"], "process": cfg.get("process", "main")})
        return JSONResponse(listing)

    routes: list[Any] = [
        Route("/health", health),
        Route("/metrics", prometheus),
        Route("/channels", channels),
    ]
    # A channel that serves HTTP (an API, a webhook) contributes its routes to the app of its process.
    for channel in runtime.channels:
        contribute = getattr(channel, "routes", None)
        if contribute is not None:
            routes.extend(contribute())
    app = Starlette(routes=routes)
    if runtime.config.api_tokens:
        app.add_middleware(BearerTokens, tokens=runtime.config.api_tokens)
    return app


class BearerTokens:
    """ASGI middleware: a request without a valid bearer token gets 401 (an OperationOutcome under /fhir)."""

    def __init__(self, app: Any, tokens: list[str]) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens]

    def _allowed(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                token = token.strip()
                # Compare with every token, in constant time each: no early exit that a timing could reveal.
                return any([hmac.compare_digest(token, known) for known in self.tokens])
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        if scope.get("path", "").startswith("/fhir"):
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "login", "diagnostics": "a valid bearer token is required"}],
            }
            media_type = "application/fhir+json"
        else:
            body, media_type = {"error": "a valid bearer token is required"}, "application/json"
        response = JSONResponse(
            body, status_code=401, media_type=media_type, headers={"WWW-Authenticate": 'Bearer realm="traboule"'}
        )
        await response(scope, receive, send)


async def serve(app: Starlette, host: str, port: int) -> Any:
    """Start uvicorn inside the running event loop; returns the server (call ``should_exit`` to stop)."""
    import asyncio

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(), name="http")
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
        await asyncio.sleep(0.01)
    server.task = task  # type: ignore[attr-defined]
    return server
