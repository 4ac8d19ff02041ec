"""The engine's HTTP app: health, Prometheus metrics, channel status, and the routes channels contribute.

One address serves every route: the main process's app also answers the routes of channels running in other
processes (the ``/fhir`` API of the ``fhir`` process...) by forwarding them to that process's own HTTP port
(`Forward`), and its ``/metrics`` carries every process's metrics (label ``process``). The children's ports
answer too (their own routes, /health, /metrics), for an operator who wants one process alone.

Access control: with API tokens configured (``TRABOULE_API_TOKENS`` or ``[http] tokens``), every request needs
``Authorization: Bearer <token>``; without one it gets 401 and nothing else, with a token whose role does not allow
the request 403 (`role_needed`: ``read`` to read, ``operate`` to change anything). Each refusal is an audit event
(``authentication_failed``), and an address with too many of them in a minute gets 429 for a while (`BearerTokens`).
Without tokens the API is served on loopback only: the configuration refuses another address
(``traboule.app.config``). The operations console (``/console``, `traboule.app.console`) is the exception: a browser
sends no bearer header, so its pages check the console's own signed session cookie (a token pasted into its login
form) instead.

HTTPS (``[http] tls``): every process's port serves TLS (`serve`), with client certificates when asked; a client
certificate whose subject is not allowed gets 403 (`ClientCertificates`), counted with the refused tokens. The
handshakes are the server's own business (`TLSAcceptor`): each bounded by ``header_timeout``, at most
``max_connections`` under way, a tenth of them per client address, taken on at a bounded rate (`HANDSHAKE_RATE`). The
engine's processes then call each other over HTTPS on the same address, trusting the configured CA and showing the
engine's own certificate when client certificates are required (`internal_client`; that client context reloads a renewed
certificate as the server does).

Internal calls (the supervisor's readiness checks, /health and /metrics gathering, forwarded requests) carry this
run's secret (`internal_secret`: made by the main process, given to its children in their environment) in
``X-Traboule-Internal``; `InternalCalls` marks such a request ``internal`` and removes the header from every
request. An internal request is never counted nor refused by the failed-authentication limiter, passes the client
certificate allow-list, and is the only one whose ``X-Forwarded-For`` a child believes (`traboule.app.fhir_api`).

Limits (``[http]``, `traboule.app.config.HTTPLimits`): a request body longer than its route's limit is refused with
413 before it is read whole (Content-Length up front, then the streamed chunks counted), a body not received within
``body_timeout`` with 408, a request target or headers beyond ``max_header_bytes`` with 414 / 431; uvicorn bounds
the connections (503 beyond), idle keep-alive, and the time to send a request's headers (`serve`). An exception in
a route is one log line (route, exception type) and a 500 without detail: nothing of a traceback reaches a client
or the log. Errors are OperationOutcomes under ``/fhir``, ``{"error": ...}`` elsewhere; a path or method no route
serves is an OperationOutcome 404 / 405 under ``/fhir`` (with or without a FHIR API), plain text elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import re
import secrets
import socket
import ssl
import time
from dataclasses import replace
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route

from traboule import audit, metrics
from traboule.app.config import ApiToken, HTTPLimits, client_host, find_token
from traboule.app.rate_limit import LoginLimiter
from traboule.channel import LimitsBodies, ServesHTTP
from traboule.tls import (
    TLSSettings,
    certificate_subject,
    client_context,
    peer_subject,
    server_context,
    subject_allowed,
    subject_of,
)

log = structlog.get_logger("traboule.app.http")

# FHIR issue types (R4 valueset-issue-type) of the errors answered here, for the OperationOutcomes under /fhir.
ISSUE_TYPES = {
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    408: "timeout",
    413: "too-long",
    414: "too-long",
    429: "throttled",
    431: "too-long",
    500: "exception",
    502: "transient",
    503: "transient",
    504: "timeout",
}
# A forwarded request: connecting to a child on loopback is immediate or refused; its answer may be a large search.
FORWARD_TIMEOUT = httpx.Timeout(connect=2.0, read=30.0, write=30.0, pool=5.0)
FORWARD_KEEPALIVE = 32  # idle connections to a child kept for the next forwarded requests
# Bytes of request bodies the forwarder holds at once, all requests together (each is read whole before it goes
# on): 1,000 connections each sending a 1 MiB body would otherwise hold 1 GiB. Beyond: 503 with Retry-After.
FORWARD_BUFFER = 64 * 1024 * 1024
# A Host header that is a host[:port] (a name, IPv4, or [IPv6]): sent on to a child; another, the main address.
HOST_HEADER = re.compile(rb"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
CHILD_METRICS_TIMEOUT = 1.0  # seconds a child's /metrics may take; beyond, /metrics says it is not up
MAX_CHILD_METRICS = 8 * 1024 * 1024  # bytes of a child's /metrics read at most
# Headers of one connection (RFC 9110 7.6.1), not of the request or response: never passed on.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
}
NOT_FORWARDED = HOP_BY_HOP | {b"date", b"server"}
# Request headers a client's own value of is never passed on: Host and the proxy headers are set by `Forward`;
# expect: 100-continue is this server's business (it answers when the body is read); the length is the body's.
NOT_FROM_CLIENT = {b"host", b"forwarded", b"x-real-ip", b"expect", b"content-length", b"x-traboule-internal"}
# This run's secret of the internal calls (`internal_secret`): the header carrying it, the children's variable.
INTERNAL_HEADER = b"x-traboule-internal"
INTERNAL_SECRET_VARIABLE = "TRABOULE_INTERNAL_SECRET"
# TLS handshakes under way (`TLSAcceptor`): at most max_connections in all, this fraction of them per address.
HANDSHAKES_PER_ADDRESS = 0.1
# How fast TLS connections are taken on (`traboule.adapters.mllp.AcceptRate`): per address a second, that address's
# burst after a quiet spell, all addresses a second. A handshake costs the loop about a millisecond of CPU; a
# browser opens a few connections, a reverse proxy more, and keep-alive spares the handshakes of later requests.
HANDSHAKE_RATE = (50.0, 100, 500.0)


def create_app(runtime: Any) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        """The truth for a monitor: 200 only when every process, the bus and every destination are fine; 503 with
        the same body when starting or degraded (the engine still accepts and journals: see ``problems``)."""
        body = await runtime.health_report()
        if runtime.processes:  # the main process answers for its children too
            body["processes"] = await _children_health(runtime)
            failing = [n for n, p in body["processes"].items() if p.get("status") != "ok"]
            if failing:
                body["problems"] = [*body.get("problems", []), *failing]
                if body["status"] == "ok":
                    body["status"] = "degraded"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    async def live(request: Request) -> JSONResponse:
        """Liveness: this process runs its loop (200 even when degraded); ``pid`` tells which process answered."""
        return JSONResponse({"process": runtime.process or "main", "pid": os.getpid(), "started": runtime.started})

    async def prometheus(request: Request) -> Response:
        if runtime.owns_journal:  # the bus queues of every configured channel, counted once (by main)
            from traboule.app.runtime import channel_bindings

            queues = [q for c in runtime.config.channels for q, _ in channel_bindings(c)]
            await metrics.measure_queues(runtime.bus, queues)
        if len(runtime.config.processes()) == 1 or runtime.process != "main":
            return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(await _all_metrics(runtime)), media_type=CONTENT_TYPE_LATEST)

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
        Route("/health/live", live),
        Route("/metrics", prometheus),
        Route("/channels", channels),
    ]
    if runtime.owns_journal:  # the operations console reads the journal: served by the process that keeps it
        from traboule.app.console import console_mount

        # Before every channel route: whatever is under /console is the console's (its pages, else its 404), so
        # BearerTokens' pass-through for /console never reaches a channel's route (check_routes refuses them too).
        routes.append(console_mount(runtime))
    # A channel that serves HTTP (an API, a webhook) contributes its routes to the app of its process.
    for channel in runtime.channels:
        if isinstance(channel, ServesHTTP):
            routes.extend(channel.routes())
    # The main process also answers, by forwarding, the routes of the other processes' channels.
    from traboule.app.runtime import remote_routes

    forwarded, remote_limits = remote_routes(runtime.config, runtime.process)
    forwarders: dict[str, Forward] = {}
    for remote in forwarded:
        forward = forwarders.setdefault(remote.process, Forward(runtime, remote.process))
        routes.append(Route(remote.path, forward, methods=remote.methods))
    limits: HTTPLimits = runtime.config.http_limits
    body_limits: dict[str, int] = dict(remote_limits)
    for channel in runtime.channels:  # a route's own limit (the archive webhook: 64 KiB), then the operator's
        if isinstance(channel, LimitsBodies):
            body_limits.update(channel.body_limits())
    body_limits.update(limits.body_limits)
    app = Starlette(routes=routes, exception_handlers={404: not_served, 405: not_served})
    app.state.http_limits = limits
    app.state.http_tls = runtime.config.http_tls
    app.state.tls_reload_interval = getattr(runtime.config, "tls_reload_interval", 60.0)
    app.state.forwarders = list(forwarders.values())
    # One count of refused requests per client address: bad bearer tokens and refused certificate subjects alike.
    limiter = LoginLimiter(failures=limits.max_auth_failures, window=60.0, block=limits.auth_block)
    app.state.auth_limiter = limiter
    own = OwnSubject(runtime.config.http_tls.cert_file if runtime.config.http_tls.enabled else "")
    app.state.own_subject = own  # recomputed when `serve` reloads a renewed certificate
    # Added innermost first: CatchAll wraps everything, a request without a token is refused before its body is read.
    app.add_middleware(
        RequestLimits,
        limits=body_limits,
        default=limits.max_body_bytes,
        timeout=limits.body_timeout,
        max_header_bytes=limits.max_header_bytes,
    )
    if runtime.config.access_tokens():
        app.add_middleware(
            BearerTokens,
            tokens=runtime.config.access_tokens(),
            console=runtime.owns_journal,
            runtime=runtime,
            limiter=limiter,
        )
    if runtime.config.http_tls.enabled:
        app.add_middleware(
            ClientCertificates, settings=runtime.config.http_tls, runtime=runtime, limiter=limiter, own=own
        )
    app.add_middleware(InternalCalls)
    app.add_middleware(CatchAll)
    if runtime.owns_journal:  # outermost: console security headers on every answer (413, 500...), Host check
        from traboule.app.console.guard import ConsoleGuard

        app.add_middleware(ConsoleGuard, open=not runtime.config.access_tokens())
    return app


ENGINE_ROUTES = ("/health", "/health/live", "/metrics", "/channels")  # create_app's own, every method


def check_routes(config: Any) -> None:
    """Refuse (``ConfigError``) two channels, whichever processes run them, or a channel and the engine, serving
    the same route (same path template, a method in common): on the one HTTP address only the first would ever
    answer. Each channel with routes is built against a scratch folder, as ``traboule.app.runtime.preflight`` does."""
    import copy
    import re
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from traboule.app.runtime import channel_class, process_of
    from traboule.errors import ConfigError

    served: list[tuple[str, frozenset[str] | None, str, str]] = [(p, None, p, "the engine") for p in ENGINE_ROUTES]
    with tempfile.TemporaryDirectory(prefix="traboule-routes-") as scratch:
        scratch_config = copy.deepcopy(config)
        scratch_config.data_dir = scratch
        probe = SimpleNamespace(
            config=scratch_config, data_dir=Path(scratch), process=None, journal=None, bus=None, processes={}
        )
        for channel_config in config.channels:
            cls = channel_class(channel_config["kind"])
            if not issubclass(cls, ServesHTTP):
                continue
            owner = f"channel {channel_config['name']} (process {process_of(channel_config)})"
            for route in cls(copy.deepcopy(channel_config), probe).routes():
                methods = getattr(route, "methods", None)
                template = re.sub(r"\{[^}]*\}", "{}", route.path)  # /fhir/{type} and /fhir/{kind} take the same
                if template.rstrip("/") == "/console" or template.startswith("/console/"):
                    raise ConfigError(
                        f"route {route.path} of {owner} is under /console, the operations console's: give it "
                        "another path"
                    )
                served.append((template, frozenset(methods) if methods else None, route.path, owner))
    for n, (template, methods, path, owner) in enumerate(served):
        for earlier, earlier_methods, _, other in served[:n]:
            overlap = not methods or not earlier_methods or bool(methods & earlier_methods)
            if earlier == template and other != owner and overlap:
                raise ConfigError(
                    f"route {path} is served by {other} and by {owner}: only the first would answer on the "
                    "engine's HTTP address; give one of them another path (or leave its API off)"
                )


def error_response(path: str, status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer: an OperationOutcome under ``/fhir`` (FHIR clients parse nothing else), JSON elsewhere."""
    if path.startswith("/fhir"):
        issue = {"severity": "error", "code": ISSUE_TYPES.get(status, "processing"), "diagnostics": text}
        body: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": [issue]}
        return JSONResponse(body, status_code=status, media_type="application/fhir+json", headers=headers)
    return JSONResponse({"error": text}, status_code=status, headers=headers)


async def not_served(request: Request, exc: Exception) -> Response:
    """A path no route serves (404) or a method it does not (405): an OperationOutcome under ``/fhir`` whether or
    not a FHIR API is configured (``api = false`` has no /fhir route), Starlette's plain text elsewhere."""
    status = int(getattr(exc, "status_code", 404))
    headers = dict(getattr(exc, "headers", None) or {})  # 405: Allow
    if request.url.path.startswith("/fhir"):
        text = "no FHIR interaction at this path" if status == 404 else "method not allowed at this path"
        return error_response(request.url.path, status, text, headers=headers or None)
    return PlainTextResponse(str(getattr(exc, "detail", "")), status_code=status, headers=headers or None)


async def _children_health(runtime: Any) -> dict[str, Any]:
    """Each child process: its supervisor's view, and its own /health when it answers (1 s at most)."""
    config = runtime.config
    out: dict[str, Any] = {}
    async with internal_client(config, timeout=1.0, headers=config.api_headers()) as client:
        for name, state in runtime.processes.items():
            report: dict[str, Any] = state.as_dict()
            report["status"] = "starting" if state.state == "starting" else "down"
            if state.state == "ready":
                try:
                    answer = (await client.get(internal_url(config, state.port, "/health"))).json()
                    if answer.get("pid", state.pid) == state.pid:  # not an orphan of an earlier run
                        report.update({k: v for k, v in answer.items() if k != "process"})
                    else:
                        report["status"] = "down"
                except (httpx.HTTPError, ValueError) as exc:
                    report["status"], report["error"] = "down", type(exc).__name__
            out[name] = report
    return out


async def _all_metrics(runtime: Any) -> Any:
    """Every process's metrics as one registry to render: each sample labelled with its ``process``, and
    ``traboule_process_up`` saying which child answered (a child down has no samples meanwhile)."""
    config = runtime.config
    children = config.processes()[1:]

    async def scrape(client: httpx.AsyncClient, name: str) -> str | None:
        try:
            async with client.stream("GET", internal_url(config, config.http_port_of(name), "/metrics")) as answer:
                if answer.status_code != 200:
                    return None
                body = b""
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_CHILD_METRICS:
                        return None
                return body.decode("utf-8", "replace")
        except httpx.HTTPError:
            return None

    async with internal_client(config, timeout=CHILD_METRICS_TIMEOUT, headers=config.api_headers()) as client:
        texts = await asyncio.gather(*(scrape(client, name) for name in children))
    families: dict[str, Metric] = {}

    def add(process: str, found: Any) -> None:
        for family in found:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "process": process}))

    # The main process's own samples go through the same parser: the families then have the same shape (a
    # counter's _created samples, for instance) whichever process they come from.
    add("main", text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()))
    up = Metric("traboule_process_up", "1 when the process answered this scrape, 0 when not", "gauge")
    for name, text in zip(children, texts, strict=True):
        up.add_sample("traboule_process_up", {"process": name}, 0.0 if text is None else 1.0)
        if text is not None:
            try:
                add(name, text_string_to_metric_families(text))
            except ValueError:  # not the exposition format: the process is counted as not answering
                up.samples[-1] = up.samples[-1]._replace(value=0.0)
    families[up.name] = up

    class Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    return Collected()


class Forward:
    """ASGI endpoint: a request for a route of a channel in another process, sent on to that process's HTTP port
    (same method, path, query, end-to-end headers and body) and its answer (status, headers, body) streamed back.

    The main address's request limits and bearer-token check apply before (they wrap the app). The body (bounded
    by the route's limit and ``body_timeout``) is read whole before a connection to the child is taken: a slow
    client holds its own server slot, never one of the pool's connections, and the pool is as large as the
    server's ``max_connections``, so it cannot run out before the server itself refuses (503). A GET or HEAD
    with a body is refused (400): its meaning is undefined (RFC 9110 9.3.1) and nothing here reads one.

    The path goes on byte for byte as received (never normalised); one with a ``.`` or ``..`` segment, literal or
    percent-encoded, is refused (400): resolved by any later hop, it would leave the route's prefix for the
    child's own ``/health`` or ``/channels``. The client's ``X-Forwarded-*`` / ``Forwarded`` headers are dropped
    and ``X-Forwarded-For`` / ``-Proto`` set from what this server saw (the children trust no proxy header:
    `serve`); the ``Host`` goes on as received when it is a host[:port], else this server's configured address,
    so the child's links name the main address, never the child's port.

    A child that is starting, restarting or not answering: 503 with ``Retry-After``; a broken answer 502, a slow
    one 504: an OperationOutcome under ``/fhir``, ``{"error": ...}`` elsewhere."""

    def __init__(self, runtime: Any, process: str) -> None:
        self.runtime = runtime
        self.process = process
        self._client: httpx.AsyncClient | None = None
        self.buffered = 0  # bytes of bodies read and not yet sent on (FORWARD_BUFFER at most)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # made on the serving loop, at the first request
            # One connection per request in progress at most, and the server has at most max_connections of
            # those: the pool is never what a request waits for (100, with bodies streamed through, let 100
            # slow uploads make every other forwarded request wait, then answer 504).
            size = self.runtime.config.http_limits.max_connections
            limits = httpx.Limits(max_connections=size, max_keepalive_connections=FORWARD_KEEPALIVE)
            self._client = internal_client(self.runtime.config, timeout=FORWARD_TIMEOUT, limits=limits)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        received = scope.get("headers") or []
        with_body = any(
            (k == b"content-length" and v.strip() not in (b"", b"0")) or k == b"transfer-encoding" for k, v in received
        )
        refused = _target_refused(scope) or (
            "a GET or HEAD request carries no body" if with_body and method in ("GET", "HEAD") else None
        )
        if refused is not None:
            log.warning("http.forward_refused", process=self.process, route=route_template(scope), method=method)
            # Connection: close: a body, if any, is left unread.
            await error_response(path, 400, refused, {"Connection": "close"})(scope, receive, send)
            return
        state = self.runtime.processes.get(self.process)
        if state is not None and state.state != "ready":
            text = f"the {self.process} process serving this route is {state.state}: try again shortly"
            await error_response(path, 503, text, {"Retry-After": "1"})(scope, receive, send)
            return
        config = self.runtime.config
        main_address = f"{client_host(config.http_host)}:{config.http_port}"
        # The target goes to our own child, at the address from the configuration: the path (matched by one of the
        # child's route templates) and query as received, which the child checks as it would from a client.
        target = scope.get("raw_path") or path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        url = httpx.URL(
            scheme=config.api_scheme,
            host=client_host(config.http_host),
            port=config.http_port_of(self.process),
            raw_path=target,
        )
        if url.raw_path != target:  # httpx would send another path than the one matched: not ours to send
            refusal = error_response(path, 400, "request target not served", {"Connection": "close"})
            await refusal(scope, receive, send)
            return
        headers = _forwarded_headers(scope, main_address)
        held = 0
        try:
            body = b""
            if with_body:  # whole, within the route's limit and body_timeout (RequestLimits), before any connection
                chunks, more = [], True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk = message.get("body", b"")
                    if self.buffered + len(chunk) > FORWARD_BUFFER:
                        text = "too many request bodies in progress: try again shortly"
                        busy = error_response(path, 503, text, {"Retry-After": "1", "Connection": "close"})
                        await busy(scope, receive, send)
                        return
                    self.buffered += len(chunk)
                    held += len(chunk)
                    chunks.append(chunk)
                    more = bool(message.get("more_body", False))
                body = b"".join(chunks)
            await self._forward(scope, receive, send, url, headers, body if with_body else None)
        finally:
            self.buffered -= held

    async def _forward(
        self, scope: dict[str, Any], receive: Any, send: Any, url: httpx.URL, headers: Any, body: bytes | None
    ) -> None:
        path = scope.get("path", "")
        request = httpx.Request(scope.get("method", "GET"), url, headers=headers, content=body)
        try:
            answer = await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            await error_response(path, 504, f"the {self.process} process did not answer in time")(scope, receive, send)
            return
        except httpx.TransportError as exc:
            log.warning(
                "http.forward_failed", process=self.process, route=route_template(scope), error=type(exc).__name__
            )
            text = f"the {self.process} process serving this route is not answering: try again shortly"
            status = 503 if isinstance(exc, httpx.ConnectError) else 502
            await error_response(path, status, text, {"Retry-After": "1"})(scope, receive, send)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status_code,
                    # date and server: the answering server's (uvicorn adds them), not twice.
                    "headers": [(k, v) for k, v in answer.headers.raw if k.lower() not in NOT_FORWARDED],
                }
            )
            async for chunk in answer.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await answer.aclose()


def _target_refused(scope: dict[str, Any]) -> str | None:
    """Why a request target may not be forwarded: a ``.`` / ``..`` segment, literal or percent-encoded (the
    path is decoded once by the server, ``%2e%2e`` and ``%2F`` included), or None."""
    segments = scope.get("path", "").split("/")
    raw = unquote_to_bytes(scope.get("raw_path") or b"").split(b"/")
    if any(s in (".", "..") for s in segments) or any(s in (b".", b"..") for s in raw):
        return "a path with '.' or '..' segments is not served"
    return None


def _forwarded_headers(scope: dict[str, Any], main_address: str) -> list[tuple[bytes, bytes]]:
    """The headers a forwarded request carries: the client's end-to-end ones, without any proxy header it sent,
    and ``Host``, ``X-Forwarded-For`` / ``-Proto`` as this server knows them, with this run's secret
    (`internal_secret`)."""
    received = scope.get("headers") or []
    # Headers a Connection header names are of that connection only (RFC 9110 7.6.1).
    named = {n.strip().lower() for k, v in received if k == b"connection" for n in v.split(b",")}
    host = next((v for k, v in received if k == b"host"), b"")
    if HOST_HEADER.fullmatch(host) is None:
        host = main_address.encode()
    headers = [(b"host", host)]
    headers += [
        (k, v)
        for k, v in received
        if k not in HOP_BY_HOP and k not in named and k not in NOT_FROM_CLIENT and not k.startswith(b"x-forwarded-")
    ]
    client = scope.get("client") or ("", 0)
    if client[0]:
        headers.append((b"x-forwarded-for", str(client[0]).encode()))
    headers.append((b"x-forwarded-proto", str(scope.get("scheme", "http")).encode()))
    headers.append((INTERNAL_HEADER, internal_secret().encode()))  # the child believes X-Forwarded-For on it
    return headers


def role_needed(method: str, path: str) -> str:
    """The token role (`traboule.app.config.ROLES`) a request of the API needs: ``read`` to read (GET, HEAD, a FHIR
    search by ``POST [type]/_search``), ``operate`` for anything else, which changes something (the archive's
    webhook feeds the engine: a write). No route of the API changes the configuration: none needs ``admin``."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return "read"
    if method == "POST" and path.startswith("/fhir/") and path.endswith("/_search"):
        return "read"
    return "operate"


def client_address(scope: dict[str, Any]) -> str:
    """The client's IP address as this server saw it (no proxy header is trusted)."""
    client = scope.get("client") or ("", 0)
    return str(client[0] or "")


class BearerTokens:
    """ASGI middleware: a request without a valid bearer token gets 401 (an OperationOutcome under /fhir), one whose
    token's role does not allow it (`role_needed`) 403 naming the role needed. The token found (`ApiToken`: name,
    role) is put in the request's state as ``token``.

    Each refusal is recorded on the runtime's audit trail (``authentication_failed``: the token's name or
    ``anonymous``, the client address, a fixed reason; never the token presented) and counted against the client
    address (``limiter``, shared with `ClientCertificates`): after ``max_auth_failures`` within a minute
    (`HTTPLimits`), that address gets 429 with Retry-After for ``auth_block`` seconds, its token not even checked
    (a right guess then would tell the guesser). Requests that pass are not counted; other addresses go on; an
    internal call (`InternalCalls`) is neither counted nor refused for its address, so no local process can lock
    the main process out of its children. At most 10,000 addresses are remembered (the oldest forgotten).

    ``console``: ``/console`` and what is under it go through without a bearer token, to the console's own check
    of its session cookie (`traboule.app.console.auth`). Only the console answers there: its Mount comes before
    every channel route (`create_app`) and `check_routes` refuses a channel route under /console."""

    def __init__(
        self,
        app: Any,
        tokens: list[ApiToken],
        console: bool = False,
        runtime: Any = None,
        limits: HTTPLimits | None = None,
        limiter: LoginLimiter | None = None,
    ) -> None:
        self.app = app
        self.tokens = list(tokens)
        self.console = console
        self.runtime = runtime
        limits = limits or getattr(getattr(runtime, "config", None), "http_limits", None) or HTTPLimits()
        self.limiter = limiter or LoginLimiter(failures=limits.max_auth_failures, window=60.0, block=limits.auth_block)

    def _token(self, scope: dict[str, Any]) -> tuple[ApiToken | None, bool]:
        """The token entry presented (or None), and whether a bearer token was presented at all."""
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token.strip():
                    return None, False
                return find_token(self.tokens, token.strip()), True
        return None, False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.console and (path == "/console" or path.startswith("/console/")):
            await self.app(scope, receive, send)
            return
        address = client_address(scope)
        internal = is_internal(scope)
        wait = 0 if internal else self.limiter.refused_for(address)
        if wait:
            await too_many_refusals(path, wait)(scope, receive, send)
            return
        token, presented = self._token(scope)
        needed = role_needed(scope.get("method", "GET"), path)
        if token is not None and token.allows(needed):
            scope.setdefault("state", {})["token"] = token
            await self.app(scope, receive, send)
            return
        if token is None:
            reason = "bearer token not recognised" if presented else "no bearer token"
            user = audit.Actor(user_id="anonymous", address=address, cert_subject=peer_subject.get())
            status, text = 401, "a valid bearer token is required"
            headers = {"WWW-Authenticate": 'Bearer realm="traboule"'}
        else:
            reason = "token role does not allow the request"
            user = audit.Actor(token.name, address=address, cert_subject=peer_subject.get(), user_name=token.role)
            status, text, headers = 403, f"this request needs a token with role {needed}", {}
        audit.trail_of(self.runtime).record(audit.authentication_failed(user=user, reason=reason))
        if not internal and self.limiter.failed(address):
            log.warning("http.address_blocked", address=address, seconds=self.limiter.block)
        await error_response(path, status, text, headers=headers)(scope, receive, send)


def too_many_refusals(path: str, wait: int) -> Response:
    """The 429 of an address with too many refused requests lately (``wait``: seconds left)."""
    text = "too many refused requests from this address: try again later"
    return error_response(path, 429, text, headers={"Retry-After": str(wait)})


class ClientCertificates:
    """ASGI middleware of an HTTPS server (``[http] tls``): the subject of the client's certificate (`serve` puts
    it in the request's state) is the request's `traboule.tls.peer_subject`; with ``allowed_subjects``, a subject
    not in the list (or no certificate) gets 403 and an audit event, and counts as a refusal of its address in
    ``limiter`` (the one of `BearerTokens`): an address refused too often gets 429 for a while, unaudited. The
    engine's own certificate (``own``, its current subject) is always admitted, and so is an internal call
    (`InternalCalls`): the engine's processes show that certificate when they call each other (`internal_client`),
    the renewed one as soon as they reloaded it."""

    def __init__(
        self,
        app: Any,
        settings: TLSSettings,
        runtime: Any = None,
        limiter: LoginLimiter | None = None,
        own: OwnSubject | None = None,
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.allowed = tuple(settings.allowed_subjects)
        self.own = own or OwnSubject(settings.cert_file)
        limits = getattr(getattr(runtime, "config", None), "http_limits", None) or HTTPLimits()
        self.limiter = limiter or LoginLimiter(failures=limits.max_auth_failures, window=60.0, block=limits.auth_block)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        subject = str((scope.get("state") or {}).get("tls_subject", ""))
        allowed = (*self.allowed, self.own.subject) if self.own.subject else self.allowed
        if self.allowed and not is_internal(scope) and not subject_allowed(subject, allowed):
            path, address = scope.get("path", ""), client_address(scope)
            wait = self.limiter.refused_for(address)
            if wait:
                await too_many_refusals(path, wait)(scope, receive, send)
                return
            user = audit.Actor(user_id="anonymous", address=address, cert_subject=subject)
            reason = "client certificate subject not allowed"
            audit.trail_of(self.runtime).record(audit.authentication_failed(user=user, reason=reason))
            log.warning("http.certificate_refused", address=address)
            if self.limiter.failed(address):
                log.warning("http.address_blocked", address=address, seconds=self.limiter.block)
            text = "this client certificate is not allowed here"
            await error_response(path, 403, text)(scope, receive, send)
            return
        token = peer_subject.set(subject)
        try:
            await self.app(scope, receive, send)
        finally:
            peer_subject.reset(token)


class OwnSubject:
    """The subject of the engine's own HTTPS certificate (``cert_file``), read at start and again by `refresh`
    (`serve` calls it when it reloads a renewed certificate); the previous one kept while the file cannot be read."""

    def __init__(self, cert_file: str) -> None:
        self.cert_file = cert_file
        self.subject = ""
        self.refresh()

    def refresh(self) -> None:
        if not self.cert_file:
            return
        try:
            self.subject = certificate_subject(self.cert_file)
        except (OSError, ValueError) as exc:  # the server context loads it: unreadable, start fails there
            log.warning("http.own_certificate_unread", error=type(exc).__name__)


_secret = ""


def internal_secret() -> str:
    """This run's secret of the engine's internal calls: made by the main process at its first call, read by a
    child from its environment (``TRABOULE_INTERNAL_SECRET``, set by the supervisor)."""
    global _secret
    if not _secret:
        _secret = os.environ.get(INTERNAL_SECRET_VARIABLE, "") or secrets.token_urlsafe(32)
    return _secret


def is_internal(scope: dict[str, Any]) -> bool:
    """Whether `InternalCalls` found this run's secret on the request."""
    return bool((scope.get("state") or {}).get("internal"))


class InternalCalls:
    """ASGI middleware: a request whose ``X-Traboule-Internal`` is this run's secret (`internal_secret`) comes
    from one of the engine's own processes: its state gets ``internal = True`` (`is_internal`). The header is
    removed from every request, right or wrong, so nothing behind this sees it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            presented = [v for k, v in headers if k == INTERNAL_HEADER]
            if presented:
                scope["headers"] = [(k, v) for k, v in headers if k != INTERNAL_HEADER]
                secret = internal_secret().encode()
                internal = len(presented) == 1 and hmac.compare_digest(presented[0], secret)
                scope["state"] = {**(scope.get("state") or {}), "internal": internal}
        await self.app(scope, receive, send)


def internal_settings(settings: TLSSettings) -> TLSSettings:
    """The client side of the HTTPS settings ``settings``: the configured CA, and the engine's certificate when its
    ports ask for one."""
    shown = settings.client_certs != "none"
    return replace(
        settings,
        cert_file=settings.cert_file if shown else "",
        key_file=settings.key_file if shown else "",
        key_password=settings.key_password if shown else "",
        client_certs="none",
        allowed_subjects=(),
        verify=True,
    )


_internal_contexts: dict[TLSSettings, ssl.SSLContext] = {}


def internal_context(settings: TLSSettings) -> ssl.SSLContext:
    """The one client context of the internal calls under ``settings`` (made at the first call): `serve` reloads
    its files when they change, so every internal client, the long-lived forwarding ones included, shows the
    renewed certificate to its next connections."""
    ctx = _internal_contexts.get(settings)
    if ctx is None:
        ctx = _internal_contexts[settings] = client_context(internal_settings(settings))
    return ctx


def internal_client(config: Any, **kwargs: Any) -> httpx.AsyncClient:
    """A client of the engine's own processes' HTTP ports (`internal_url`): over HTTPS (``[http] tls``) it trusts
    the configured CA (``ca_file``; the system's CAs when empty) and checks the certificate names the address it
    connects to; it shows the engine's certificate when the ports require client certificates. Every request
    carries this run's secret (`internal_secret`; `Forward` adds it itself). Proxy variables of the environment are
    ignored: these calls stay on the machine."""
    verify: ssl.SSLContext | bool = internal_context(config.http_tls) if config.http_tls.enabled else True
    headers = {**dict(kwargs.pop("headers", None) or {}), INTERNAL_HEADER.decode(): internal_secret()}
    return httpx.AsyncClient(verify=verify, trust_env=False, headers=headers, **kwargs)


def internal_url(config: Any, port: int, path: str) -> str:
    """The URL of ``path`` on one of the engine's processes' HTTP ports (http or https as served)."""
    host = client_host(config.http_host)
    host = f"[{host}]" if ":" in host else host
    return f"{config.api_scheme}://{host}:{port}{path}"


class _BodyRefused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class RequestLimits:
    """ASGI middleware: a request target or headers beyond ``max_header_bytes`` get 414 / 431, a body beyond its
    route's limit 413, a body not received within ``timeout`` 408.

    Content-Length is checked before anything is read; a chunked body (no Content-Length) is counted chunk by
    chunk as the route reads it, so at most one chunk beyond the limit is ever held. Measured before this: a
    200 MB webhook body was journaled whole, a 300 MB one took the process to 622 MB RSS. The header check
    repeats h11's on purpose: h11 bounds only a head still incomplete, so one arriving in a single read passed."""

    def __init__(self, app: Any, limits: dict[str, int], default: int, timeout: float, max_header_bytes: int) -> None:
        self.app = app
        self.limits = limits
        self.default = default
        self.timeout = timeout
        self.max_header_bytes = max_header_bytes

    def _head_refused(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        target = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if target > self.max_header_bytes:
            return 414, f"request target longer than {self.max_header_bytes} bytes"
        headers = sum(len(name) + len(value) + 4 for name, value in scope.get("headers") or [])  # ": ", CRLF
        if target + headers > self.max_header_bytes:
            return 431, f"request headers larger than {self.max_header_bytes} bytes"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._head_refused(scope)
        if refused is not None:
            await self._refuse(scope, receive, send, *refused)
            return
        limit = self.limits.get(scope.get("path", ""), self.default)
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, receive, send, 413, f"request body larger than {limit} bytes")
                return
        received, more, started = 0, True, False

        async def bounded_receive() -> dict[str, Any]:
            nonlocal received, more
            if not more:  # the body is in: what follows is the wait for a disconnect, which has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                raise _BodyRefused(408, f"request body not received within {self.timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyRefused(413, f"request body larger than {limit} bytes")
                more = bool(message.get("more_body", False))
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _BodyRefused as exc:
            if not started:
                await self._refuse(scope, receive, send, exc.status, exc.text)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any, status: int, text: str) -> None:
        path = scope.get("path", "")
        route = path if path in self.limits else route_template(scope)  # a configured path, or the template
        log.warning("http.request_refused", route=route, method=scope.get("method", ""), status=status)
        # Connection: close: the rest of the body is never read, so the connection cannot carry another request.
        response = error_response(path, status, text, headers={"Connection": "close"})
        await response(scope, receive, send)


def route_template(scope: dict[str, Any]) -> str:
    """The path of the route a request matches (``/fhir/{type}/{id}``), for logs: never a received value."""
    route = scope.get("route")  # set by the router; a request refused before routing is matched here
    for candidate in [] if route is not None else getattr(getattr(scope.get("app"), "router", None), "routes", []):
        if candidate.matches(scope)[0] is not Match.NONE:
            route = candidate
            break
    return getattr(route, "path", None) or "unmatched"


class CatchAll:
    """ASGI middleware: an exception escaping a route is answered 500 (an OperationOutcome under ``/fhir``) and
    logged as one line naming the route template, the method and the exception type. Not its message nor its
    traceback: both may quote a received value or patient data, and a multi-line traceback breaks the JSON log.
    Starlette's own handler would answer, then re-raise to uvicorn, which logs the whole traceback."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:  # the client left while its body was read: nobody to answer, nothing broken
            log.info("http.client_disconnected", route=route_template(scope), method=scope.get("method", ""))
        except Exception as exc:
            route, method = route_template(scope), scope.get("method", "")
            log.error("http.error", route=route, method=method, error_type=type(exc).__name__)
            if not started:
                await error_response(scope.get("path", ""), 500, "internal error")(scope, receive, send)


async def serve(
    app: Starlette, host: str, port: int, limits: HTTPLimits | None = None, tls: TLSSettings | None = None
) -> Any:
    """Start uvicorn inside the running event loop; returns the server (call ``should_exit`` to stop).
    ``limits`` and ``tls`` (HTTPS when enabled): the app's (`create_app`) by default. Over HTTPS the server's
    ``tls_context`` is the `traboule.tls.server_context` it serves (BCP 195 profile, client certificates as
    ``client_certs`` says), its connections accepted and their handshakes bounded by `TLSAcceptor` (the server's
    ``acceptor``); its files, and those of the internal client context (`internal_context`), are checked every
    ``[tls] reload_interval`` seconds while it runs (`traboule.app.tls_reload`: a renewed certificate is served
    and shown to the next connections, no restart)."""
    import uvicorn

    limits = limits or getattr(app.state, "http_limits", None) or HTTPLimits()
    tls = tls or getattr(app.state, "http_tls", None) or TLSSettings()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        # None: uvicorn's default dictConfig would install its plain-text handlers over the engine's JSON ones.
        log_config=None,
        # h11 (never httptools, even when installed): the only one that takes a header size limit.
        http=_h11_with_header_deadline(limits.header_timeout),
        limit_concurrency=limits.max_connections,
        # No proxy header is trusted, from 127.0.0.1 either: that is where the main process forwards from, and any
        # local client too. The scheme is the one served (http or https); behind a proxy, links come from a channel's
        # ``base_url``.
        proxy_headers=False,
        timeout_keep_alive=limits.keep_alive_timeout,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )
    context = server_context(tls) if tls.enabled else None
    server: Any
    if context is not None:
        # uvicorn builds its own context from file names, without the engine's profile: the config is loaded here
        # and its context replaced (Server.serve does not load a loaded config again).
        config.load()
        config.ssl = context
        family = (await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM))[0][0]
        listening = socket.create_server((host, port), family=family, backlog=config.backlog)
        listening.setblocking(False)
        acceptor = TLSAcceptor(
            listening,
            context,
            handshake_timeout=limits.header_timeout,
            max_handshakes=limits.max_connections,
            per_address=max(1, int(limits.max_connections * HANDSHAKES_PER_ADDRESS)),
            rate=HANDSHAKE_RATE,
        )
        server = _https_server(config, acceptor)
    else:
        server = uvicorn.Server(config)
    server.tls_context = context

    async def run() -> None:
        watches: list[asyncio.Task[None] | None] = []
        if context is not None:
            from traboule.app.tls_reload import start_watch

            interval = float(getattr(app.state, "tls_reload_interval", 60.0))
            own = getattr(app.state, "own_subject", None)
            on_reload = own.refresh if isinstance(own, OwnSubject) else None
            watches.append(start_watch("http", context, tls, interval, on_reload=on_reload))
            client = internal_settings(tls)
            watches.append(start_watch("http-client", internal_context(tls), client, interval))
        try:
            await server.serve()
        finally:
            for watch in watches:
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch

    task = asyncio.create_task(run(), name="http")
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
        await asyncio.sleep(0.01)
    server.task = task  # type: ignore[attr-defined]
    return server


def _https_server(config: Any, acceptor: TLSAcceptor) -> Any:
    """A uvicorn server whose connections come from ``acceptor`` (its listening socket, its handshake bounds)
    rather than from ``loop.create_server``, which has neither a limit on handshakes nor one shorter than 60 s."""
    import uvicorn

    class HTTPSServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await self.lifespan.startup()  # lifespan "off": nothing to start

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[no-any-return]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
                )

            acceptor.start(create_protocol)
            self.servers = [acceptor]  # type: ignore[list-item]  # closed and awaited by uvicorn's shutdown
            self.started = True

    server = HTTPSServer(config)
    server.acceptor = acceptor  # type: ignore[attr-defined]
    return server


class TLSAcceptor:
    """The listening socket of an HTTPS port: accepts connections itself and hands each to the loop with the TLS context
    (``connect_accepted_socket``), so that a handshake is bounded: ``handshake_timeout`` seconds each (the ``[http]
    header_timeout``), ``max_handshakes`` under way in all and ``per_address`` from one client address, and taken on
    at most at ``rate`` (per address a second, its burst, all addresses a second: `AcceptRate`); a connection beyond
    is closed at once, before its handshake. A silent or slow peer thus holds a descriptor for ``handshake_timeout``
    at most, and one address cannot take every slot nor the loop's time. A handshake that fails (not TLS, a version
    or cipher refused, a client certificate refused) closes the connection (``http.tls_refused``, at most one line a
    second, with the number of the others: ``unlogged``). Once done, the connection is uvicorn's
    (``limit_concurrency``, header deadline...). Closed and awaited like an ``asyncio.Server``."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        handshake_timeout: float,
        max_handshakes: int,
        per_address: int,
        rate: tuple[float, int, float] = HANDSHAKE_RATE,
    ) -> None:
        from traboule.adapters.mllp import AcceptRate

        self.socket = sock
        self.ctx = ctx
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.per_address = per_address
        self.refusals = 0  # connections closed before or during their handshake, since the start
        self._handshakes: dict[asyncio.Task[None], str] = {}  # handshakes under way, their client's address
        self._task: asyncio.Task[None] | None = None
        self._protocol: Any = None
        self._logged_at = 0.0
        self._unlogged = 0
        self._rate = AcceptRate(*rate)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    @property
    def handshakes(self) -> int:
        return len(self._handshakes)

    def start(self, protocol: Any) -> None:
        self._protocol = protocol
        self._task = asyncio.create_task(self._accept(), name="http-accept")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.socket.close()
        for task in self._handshakes:
            task.cancel()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._task, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self.socket)
            except OSError as exc:  # out of file descriptors, a connection reset before accept...
                log.warning("http.accept_failed", error=type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            host = str(address[0])
            pending = list(self._handshakes.values())
            refused = self._rate.take(host, loop.time())
            if pending.count(host) >= self.per_address or len(pending) >= self.max_handshakes:
                refused = "too_many_handshakes"
            if refused:
                sock.close()
                self._refused(host, refused)
                continue
            task = asyncio.create_task(self._handshake(sock, host), name="http-handshake")
            self._handshakes[task] = host
            task.add_done_callback(self._handshakes.pop)

    async def _handshake(self, sock: socket.socket, host: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                self._protocol, sock, ssl=self.ctx, ssl_handshake_timeout=self.handshake_timeout
            )
            return
        except ssl.SSLCertVerificationError as exc:  # the client certificate: expired, another CA...
            reason = str(exc.verify_message or exc.reason or "certificate_verify_failed")
        except ssl.SSLError as exc:  # not TLS, a version or cipher refused, no certificate
            reason = str(exc.reason or type(exc).__name__)
        except ConnectionAbortedError:  # the loop aborts a handshake longer than ssl_handshake_timeout
            reason = "handshake_timeout"
        except (OSError, TimeoutError) as exc:  # the peer left during the handshake
            reason = type(exc).__name__
        with contextlib.suppress(OSError):
            sock.close()
        self._refused(host, reason)

    def _refused(self, host: str, reason: str) -> None:
        self.refusals += 1
        now = time.monotonic()
        if now - self._logged_at < 1.0:  # a flood of handshakes is not a flood of lines
            self._unlogged += 1
            return
        self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        reason = "".join(c if c.isprintable() else "?" for c in reason[:80])
        log.warning("http.tls_refused", address=host, reason=reason, unlogged=unlogged)


def _h11_with_header_deadline(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers are not in within ``timeout``,
    and giving the requests of a TLS connection the subject of the client's certificate (state ``tls_subject``).

    uvicorn times out an idle keep-alive connection, but not one that sends nothing, or a header a byte at a time:
    with ``limit_concurrency`` set, a client holding that many such sockets would get every other request a 503."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:  # made after the handshake: the client's certificate is known
                subject = subject_of(ssl_object.getpeercert())
                self.app_state = {**self.app_state, "tls_subject": subject}  # this connection's requests' state
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are in: its body has body_timeout (RequestLimits)
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # first: the next request (pipelined) may start inside
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline
