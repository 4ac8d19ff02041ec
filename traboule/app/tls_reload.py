"""Certificates renewed without a restart: the TLS listeners' certificate, key and CA files checked periodically.

A listener that serves TLS hands its context and settings to a `traboule.tls.CertificateReloader`; whoever owns the
listener (its channel, the HTTP server) runs `watch_certificates` over its reloaders every ``[tls] reload_interval``
seconds (`Config.tls_reload_interval`, 60 by default) for as long as the listener runs, and cancels it at stop. A
changed file is loaded into the same context: the next connections get the new certificate, open ones keep theirs.
A file that cannot be loaded (a key that does not match the certificate, a half-written file) keeps the previous
certificate and is logged at each check until it is fixed.

Events: ``tls.reloaded`` (``listener``, ``files``) and ``tls.reload_failed`` (``listener``, ``error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from traboule.tls import CertificateReloader

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
