"""What the worklist and mpps channels share about their DICOM SCPs' security: the TLS settings of an ``mwl-scp`` /
``mpps-scp`` entry turned into the adapter's arguments, the reload of their certificates, and the audit of a peer
refused.

An entry's ``tls = true`` takes the ``[tls]`` defaults of the configuration; a table overrides them
(`traboule.tls.TLSSettings`); ``ae_certificates = { CT01 = "CN=ct01.example" }`` binds calling AE titles to the
client certificate subject they must show (`traboule.adapters.dicom_server.SCPSecurity`). The certificate, key and
CA files are checked every ``[tls] reload_interval`` seconds while the SCPs run (`traboule.app.tls_reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from traboule.adapters.dicom_server import Peer, SCPSecurity
from traboule.app.tls_reload import start_watch
from traboule.audit import Actor, node_authentication_failed, trail_of
from traboule.tls import TLSSettings, server_context


def actor_of(peer: Peer) -> Actor:
    """The audit participant of a DICOM peer: known by its calling AE title (its address before it sent one)."""
    return Actor(
        user_id=peer.ae_title or peer.address,
        address=peer.address,
        cert_subject=peer.cert_subject,
        ae_title=peer.ae_title,
    )


def refusal_recorder(runtime: Any) -> Callable[[Peer, str], None]:
    """``on_peer_refused`` of an SCP: a certificate refused is a node-authentication failure on the audit trail."""

    def record(peer: Peer, reason: str) -> None:
        trail_of(runtime).record(node_authentication_failed(peer=actor_of(peer), reason=reason))

    return record


class SCPCertificates:
    """The TLS of one channel's SCPs: ``security(entry, where, name)`` gives the adapter's security arguments
    (``ssl_context``, None without TLS; ``allowed_subjects``; ``ae_certificates``; ``on_peer_refused``);
    ``start()`` / ``stop()`` run the reload of the certificates of those with TLS."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.watched: dict[str, tuple[ssl.SSLContext, TLSSettings]] = {}  # SCP name -> its context and settings
        self._tasks: list[asyncio.Task[None]] = []

    def security(self, entry: Mapping[str, Any], where: str, name: str) -> dict[str, Any]:
        """ConfigError names a bad setting (a file that cannot be read, ``ae_certificates`` without client
        certificates...)."""
        config = getattr(self.runtime, "config", None)
        base = getattr(config, "tls", None)
        tls = SCPSecurity.from_config(entry, where, base if isinstance(base, TLSSettings) else None)
        context = None
        if tls.tls.enabled:
            context = server_context(tls.tls)
            self.watched[name] = (context, tls.tls)
        return {
            "ssl_context": context,
            "allowed_subjects": tls.tls.allowed_subjects if context is not None else (),
            "ae_certificates": dict(tls.ae_certificates),
            "on_peer_refused": refusal_recorder(self.runtime),
        }

    def start(self) -> None:
        if self.watched and not self._tasks:
            interval = float(getattr(getattr(self.runtime, "config", None), "tls_reload_interval", 60.0))
            for name, (context, settings) in self.watched.items():
                if (task := start_watch(name, context, settings, interval)) is not None:
                    self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
