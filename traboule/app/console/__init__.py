"""The operations console: server-rendered pages under ``/console`` on the engine's HTTP port.

A dashboard (channels and their state, messages received / accepted / rejected per channel in the last hour and
day, outbox backlog, bus and database), a message browser over the journal's search contract
(`traboule.stores.journal_search`), one message laid out with its field names, its journal entry, its indexed
keys and the canonical events it maps to today; the operator actions (`traboule.app.console.actions`: reprocess
with a dry run, dead letters replayed or discarded, recorded in `traboule.app.console.audit`, the last ones listed)
and the worklist as a modality sees it with the published documents (`traboule.app.console.worklist`); the alerting
engine's incidents (`traboule.app.console.alerts`). English and French. Roles:
``read`` looks, ``operate`` acts, ``admin`` both.

Served by the process that keeps the journal (``main``). Access: a session cookie opened by pasting one of the
API's tokens into the login form (`traboule.app.console.auth`); without any token configured, open like the API
(which the configuration then keeps on loopback). No script runs in the pages and nothing comes from another
origin: the assets ship with the package, every page is sent with a Content-Security-Policy that forbids inline
scripts and other origins, ``X-Frame-Options: DENY`` and ``Cache-Control: no-store`` (pages show patient data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles

from traboule.app.console.actions import Actions
from traboule.app.console.alerts import AlertsPage
from traboule.app.console.auth import Sessions, load_secret
from traboule.app.console.guard import SECURITY_HEADERS, secured
from traboule.app.console.reader import RETRY_AFTER, timed_out
from traboule.app.console.views import Console
from traboule.app.console.worklist import WorklistPage
from traboule.errors import ConsoleBusy

__all__ = ["SECURITY_HEADERS", "console_mount"]

HERE = Path(__file__).parent
log = structlog.get_logger("traboule.app.console")


class SecurityHeaders:
    """ASGI wrapper of the console's router: every response gets `SECURITY_HEADERS` (over any the page set itself;
    `traboule.app.console.guard.ConsoleGuard` adds them again outside, to what other layers answer), a request
    the console's threads cannot take (`ConsoleBusy`) gets 503 with Retry-After, and one whose database query ran
    over ``[console] query_timeout`` (`timed_out`) gets ``too_long``'s page (504, "narrow the search")."""

    def __init__(self, app: Router, too_long: Callable[[Request], Response] | None = None) -> None:
        self.app = app
        self.too_long = too_long

    @property
    def routes(self) -> list[Any]:  # for url_path_for through the Mount
        return self.app.routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        started = False
        send = secured(send)

        async def tracking(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except ConsoleBusy:
            if started:
                raise
            busy = PlainTextResponse(
                "the console is busy: try again in a few seconds\n",
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER)},
            )
            await busy(scope, receive, send)
        except Exception as exc:
            if started or not timed_out(exc):
                raise
            endpoint = getattr(scope.get("endpoint"), "__name__", "")
            log.warning("console.query_timeout", page=endpoint, error=type(exc).__name__)
            answer: Response = PlainTextResponse("the query took too long: narrow the search\n", status_code=504)
            if self.too_long is not None:
                with contextlib.suppress(Exception):  # the page cannot be rendered: the plain answer
                    answer = self.too_long(Request(scope, receive))
            await answer(scope, receive, send)


def console_mount(runtime: Any) -> Mount:
    """The ``/console`` routes of ``runtime`` (the engine's HTTP app mounts them)."""
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    data_dir = Path(runtime.config.data_dir)
    sessions = Sessions(runtime.config, load_secret(runtime.config, data_dir), data_dir)
    console = Console(runtime, sessions, templates)
    actions = Actions(console)
    worklist = WorklistPage(console)
    alerts = AlertsPage(console)

    def too_long(request: Request) -> Response:
        """The page of a request whose query ran over the console's statement timeout."""
        identity = console.sessions.identity(request)
        return console.render(request, "error.html", identity, status=504, error="query_timeout")

    router = Router(
        routes=[
            Route("/", console.dashboard, name="dashboard"),
            Route("/login", console.login_page, methods=["GET"], name="login"),
            Route("/login", console.login, methods=["POST"], name="login_post"),
            Route("/logout", console.logout, methods=["POST"], name="logout"),
            Route("/messages", console.messages, name="messages"),
            Route("/messages/{message_id:int}", console.message, name="message"),
            Route("/messages/{message_id:int}/raw", console.message_raw, name="message_raw"),
            Route("/reprocess", actions.reprocess_form, methods=["GET"], name="reprocess"),
            Route("/reprocess/dry-run", actions.reprocess_dry_run, methods=["POST"], name="reprocess_dry_run"),
            Route("/reprocess/run", actions.reprocess_run, methods=["POST"], name="reprocess_run"),
            Route("/worklist", worklist.page, name="worklist"),
            Route("/dead-letters", actions.dead_letters, name="dead_letters"),
            Route("/dead-letters/{queue}", actions.dead_letter_queue, methods=["GET"], name="dead_letter_queue"),
            Route("/dead-letters/{queue}/replay", actions.replay, methods=["POST"], name="dead_letter_replay"),
            Route("/dead-letters/{queue}/discard", actions.discard, methods=["POST"], name="dead_letter_discard"),
            Route("/alerts", alerts.page, name="alerts"),
            Route("/actions", actions.history, name="actions_log"),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        ]
    )
    return Mount("/console", app=SecurityHeaders(router, too_long), name="console")
