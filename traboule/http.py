"""The engine's HTTP app: health, Prometheus metrics, channel status.

Bound to loopback by default (operations.md explains how to expose it).
"""

from __future__ import annotations

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
        ok = journal is not None
        body = {
            "status": "ok" if ok else "starting",
            "bus": "rabbitmq" if runtime.config.amqp_url else "embedded",
            "journal": journal.counts() if journal else {},
            "outbox_pending": len(journal.pending_events(1000)) if journal else 0,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def channels(request: Request) -> JSONResponse:
        return JSONResponse([{"name": c.name, **c.describe()} for c in runtime.channels])

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", prometheus),
            Route("/channels", channels),
        ]
    )


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
