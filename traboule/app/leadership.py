"""Work one node does at a time: run it while this node holds a lease, stop it the moment the lease is lost."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("traboule.app.leadership")


async def while_leading(
    lease: Any,
    work: Callable[[], Awaitable[None]],
    name: str,
    *,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """For ever: acquire ``lease`` (a failure is logged as ``<name>.lease_failed`` and retried after a second), run
    ``work()`` until it returns or the lease is lost, cancel both, then ``after()`` (closing what ``work`` opened)."""
    while True:
        try:
            await lease.acquire()
        except Exception as exc:  # the lease's own errors are retried inside; anything else: retry later
            log.warning(f"{name}.lease_failed", error=type(exc).__name__)
            await asyncio.sleep(1.0)
            continue
        running = asyncio.create_task(work(), name=f"{name}-run")
        lost = asyncio.create_task(lease.lost(), name=f"{name}-lease-lost")
        try:
            await asyncio.wait({running, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (running, lost):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if after is not None:
                await after()
