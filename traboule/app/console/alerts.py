"""The console's alerts: the incidents of the alerting engine (`traboule.app.alerts`), open ones first then the
recently resolved ones, and the count of open incidents per channel that the dashboard shows."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response

from traboule.app import alerts
from traboule.app.console.reader import timed_out

log = structlog.get_logger("traboule.app.console")

LISTED = 50  # incidents listed (open ones first)


def open_by_channel(stores: Any) -> dict[str, int]:
    """Open incidents per channel (blocking: call it in a thread)."""
    store = stores.incidents()
    try:
        return dict(Counter(i.channel for i in store.open_incidents()))
    finally:
        store.close()


async def open_counts(stores: Any) -> dict[str, int] | None:
    """`open_by_channel` of a running engine's ``stores`` (the console's: `traboule.app.console.reader.Reader.stores`),
    None when the incidents cannot be read (the page says so)."""
    try:
        return await asyncio.to_thread(open_by_channel, stores)
    except Exception as exc:  # a database down: the dashboard still shows
        log.warning("console.incidents_unreadable", error=type(exc).__name__)
        return None


def duration(seconds: int) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``4 min 10 s``, ``12 s``."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


class AlertsPage:
    """The ``/console/alerts`` page (role ``read``), over the console's plumbing."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.runtime = console.runtime

    async def page(self, request: Request) -> Response:
        identity = self.console.sessions.identity(request)
        if identity is None:
            return self.console.to_login(request)
        try:
            found = await asyncio.to_thread(alerts.list_incidents, self.console.reader.stores, LISTED)
            error = ""
        except Exception as exc:  # the incidents' database unreachable: said on the page
            if timed_out(exc):  # the console's answer to a query over its time (`traboule.app.console`)
                raise
            found, error = [], type(exc).__name__
            log.warning("console.incidents_unreadable", error=error)
        for incident in found:
            incident["lasted"] = duration(incident["duration_s"])
        return self.console.render(
            request,
            "alerts.html",
            identity,
            status=503 if error else 200,
            open=[i for i in found if i["state"] == "open"],
            resolved=[i for i in found if i["state"] != "open"],
            error=error,
        )
