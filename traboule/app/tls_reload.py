"""Certificates renewed without a restart: the TLS listeners' certificate, key and CA files checked periodically.

A listener that serves TLS hands its context and settings to a `traboule.tls.CertificateReloader`; whoever owns the
listener (its channel, the HTTP server) runs `watch_certificates` over its reloaders (`start_watch` for one context)
every ``[tls] reload_interval`` seconds (`Config.tls_reload_interval`, 60 by default) for as long as the listener
runs, and cancels it at stop. A changed file is loaded into the same context: the next connections get the new
certificate, open ones keep theirs. A client context is reloaded the same way (the certificate it shows a server,
the CAs it trusts). A file that cannot be loaded (a key that does not match the certificate, a half-written file)
keeps the previous certificate and is logged at each check until it is fixed.

Events: ``tls.reloaded`` (``listener``, ``files``) and ``tls.reload_failed`` (``listener``, ``error``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping

import structlog

from traboule.tls import CertificateReloader, TLSSettings

log = structlog.get_logger("traboule.tls")


def check_certificates(reloaders: Mapping[str, CertificateReloader]) -> None:
    """One check of each listener's files (named by the mapping's keys), logged."""
    for name, reloader in reloaders.items():
        result = reloader.check()
        if result == "reloaded":
            log.info("tls.reloaded", listener=name, files=list(reloader.settings.files()))
        elif result is not None:
            log.error("tls.reload_failed", listener=name, error=result)


async def watch_certificates(reloaders: Mapping[str, CertificateReloader], interval: float) -> None:
    """Check the files every ``interval`` seconds until cancelled (run it as a task while the listeners run)."""
    if not reloaders:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            check_certificates(reloaders)
        except Exception:  # a bug here must not end the watch
            log.exception("tls.reload_failed", listener=",".join(reloaders))


def start_watch(
    name: str,
    ctx: ssl.SSLContext | None,
    settings: TLSSettings,
    interval: float,
    on_reload: Callable[[], None] | None = None,
) -> asyncio.Task[None] | None:
    """Watch one context's files (``settings``'s) every ``interval`` seconds, logged as listener ``name``; None
    without a context. ``on_reload``: called after each successful reload (to recompute what depends on the
    certificate). Cancel the task when the listener stops."""
    if ctx is None or not settings.files():
        return None
    reloader = _Notifying(ctx, settings, on_reload) if on_reload is not None else CertificateReloader(ctx, settings)
    return asyncio.create_task(watch_certificates({name: reloader}, interval), name=f"{name}-certificates")


class _Notifying(CertificateReloader):
    def __init__(self, ctx: ssl.SSLContext, settings: TLSSettings, on_reload: Callable[[], None]) -> None:
        super().__init__(ctx, settings)
        self.on_reload = on_reload

    def check(self) -> str | None:
        result = super().check()
        if result == "reloaded":
            self.on_reload()
        return result
