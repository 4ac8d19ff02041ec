"""What every ``/console`` response goes through, whichever layer answers it (a page, a redirect, a 404, a body
refused with 413, a 500): the security headers, and without any token configured a Host check.

Installed by the engine's HTTP app outermost (`traboule.app.http.create_app`). With no token configured the console
is open to whoever reaches it, which the configuration keeps to loopback; a web page in a browser on that machine
could still reach it under its own name by DNS rebinding (``attacker.example`` resolving to 127.0.0.1), so an open
console answers only requests whose Host is a loopback name or address (``localhost``, ``127.0.0.1`` ...,
``[::1]``, with any port) and refuses others with 421.
"""

from __future__ import annotations

import ipaddress
from typing import Any

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
        b"frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_NAMES = {name for name, _ in SECURITY_HEADERS}


def is_console(path: str) -> bool:
    return path == "/console" or path.startswith("/console/")


def loopback_host(host: bytes) -> bool:
    """Whether a Host header names this machine's loopback: ``localhost``, an address of 127.0.0.0/8 or
    ``[::1]``, each with an optional port."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return False
    else:
        address, _, port = text.partition(":")
        if port and not port.isdigit():
            return False
    if address in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def secured(send: Any) -> Any:
    """``send`` adding `SECURITY_HEADERS` to the response start (over any the response set itself)."""

    async def with_headers(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
            message = {**message, "headers": headers + SECURITY_HEADERS}
        await send(message)

    return with_headers


class ConsoleGuard:
    """ASGI middleware for the ``/console`` paths: `SECURITY_HEADERS` on every response; ``open`` (no token
    configured): a Host that is not loopback (`loopback_host`) gets 421."""

    def __init__(self, app: Any, open: bool) -> None:
        self.app = app
        self.open = open

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not is_console(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        send = secured(send)
        if self.open:
            host = next((v for k, v in scope.get("headers") or [] if k == b"host"), b"")
            if not loopback_host(host):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 421,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")],
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"the console without tokens answers only on localhost, 127.0.0.1 or [::1]\n",
                    }
                )
                return
        await self.app(scope, receive, send)
