"""Who is using the console: a token pasted into the login form becomes a signed session cookie.

The session cookie holds the token's name, role, a keyed fingerprint of the token (an HMAC of its digest, so a
captured cookie gives nothing to guess the token offline against), a random session id, its opening time and an
expiry, signed with HMAC-SHA256 over the console secret (``[console] secret`` / ``TRABOULE_CONSOLE_SECRET``, else a
random key kept in the data folder, mode 0600). Several nodes behind one load balancer share the secret through the
configuration, so a session opened on one is valid on the others. A session is valid while the token it was opened
with is still configured with the same role (removing a token, and restarting, ends its sessions), for at most the
current ``session_hours`` since it was opened, and until it is logged out: logout puts its id in a revocation list
kept until the session's expiry (`Revoked`, ``<data_dir>/console-revoked``, mode 0600). That list is the node's: a
session logged out on one node stays valid on the others that share the secret until its expiry.

Every POST form carries a CSRF token: an HMAC of a random per-browser value held in its own cookie (HttpOnly,
SameSite=Strict) and of the session cookie sent with it, so a token obtained without a session (the login page's)
is refused for a logged-in session's POST. Without any token configured the console is open, as the API is: the
configuration then keeps the HTTP server on loopback (and `traboule.app.console.guard` the Host to a loopback name).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from traboule.app.config import ROLES, Config, find_token
from traboule.app.rate_limit import LoginLimiter as LoginLimiter  # where the console's views find it

SESSION_COOKIE = "traboule_session"
CSRF_COOKIE = "traboule_csrf"
SECRET_FILE = "console-secret"
REVOKED_FILE = "console-revoked"
MAX_REVOKED = 100_000  # session ids remembered as logged out at most (the oldest expiries forgotten first)
MAX_COOKIE = 2048  # bytes of a session cookie read at most


@dataclass(frozen=True)
class Identity:
    """Who a console request comes from: a token's name and role (``open``: no token configured at all)."""

    name: str
    role: str
    open: bool = False

    def allows(self, needed: str) -> bool:
        """Whether this role allows what ``needed`` (a role of `traboule.app.config.ROLES`) may do."""
        return ROLES.index(self.role) >= ROLES.index(needed)


def load_secret(config: Config, data_dir: Path) -> bytes:
    """The key signing sessions: the configured secret, else ``<data_dir>/console-secret`` (created 0600 with 32
    random bytes the first time)."""
    if config.console_secret:
        return config.console_secret.encode()
    path = data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes().strip()
        if len(key) >= 32:
            return key
        raise RuntimeError(f"{path} holds no usable key: remove it to have a new one made") from None
    with os.fdopen(fd, "wb") as fh:
        key = secrets.token_hex(32).encode()
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Revoked:
    """Session ids logged out, each until its session's expiry: in memory, and appended to ``path`` (fsynced,
    mode 0600) so that a restart keeps them; the file is rewritten without the expired ones when loaded."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.until: dict[str, int] = {}
        if path is None:
            return
        now = time.time()
        try:
            lines = path.read_text("ascii", "replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[-MAX_REVOKED:]:
            sid, _, expiry = line.partition(" ")
            if expiry.isdigit() and int(expiry) > now:
                self.until[sid] = int(expiry)
        if len(self.until) < len(lines):
            self._write(self.until, "w")

    def _write(self, entries: dict[str, int], mode: str) -> None:
        if self.path is None:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC), 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.writelines(f"{sid} {expiry}\n" for sid, expiry in entries.items())
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, sid: str, expiry: int) -> None:
        self._write({sid: expiry}, "a")
        self.until[sid] = expiry
        if len(self.until) > MAX_REVOKED:
            now = time.time()
            self.until = {k: v for k, v in self.until.items() if v > now}
            while len(self.until) > MAX_REVOKED:
                self.until.pop(min(self.until, key=self.until.__getitem__))

    def __contains__(self, sid: str) -> bool:
        return sid in self.until


class Sessions:
    """Signing and checking console sessions and CSRF tokens for one engine's tokens."""

    def __init__(self, config: Config, secret: bytes, data_dir: Path | None = None) -> None:
        self.config = config
        self.secret = secret
        self.lifetime = int(config.console_session_hours * 3600)
        self.revoked = Revoked(data_dir / REVOKED_FILE if data_dir is not None else None)

    @property
    def open(self) -> bool:
        """No token configured: the console, like the API, is open (on loopback only)."""
        return not self.config.access_tokens()

    def _mac(self, purpose: str, data: bytes) -> str:
        return _b64(hmac.new(self.secret, purpose.encode() + b"\0" + data, hashlib.sha256).digest())

    # -- sessions ----------------------------------------------------------------------------------------------

    def login(self, presented: str) -> tuple[Identity, str] | None:
        """The identity and session cookie value for a token pasted into the form, or None when it is not one."""
        token = find_token(self.config.access_tokens(), presented.strip())
        if token is None:
            return None
        now = int(time.time())
        body = {
            "n": token.name,
            "r": token.role,
            "f": self._fingerprint(token.digest),
            "s": secrets.token_urlsafe(16),
            "i": now,
            "e": now + self.lifetime,
        }
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return Identity(token.name, token.role), f"{payload}.{self._mac('session', payload.encode())}"

    def _fingerprint(self, digest: str) -> str:
        return self._mac("fingerprint", digest.encode())[:22]

    def _session(self, request: Request) -> dict[str, Any] | None:
        """The signed, unexpired, not logged-out session of ``request``'s cookie, None without one."""
        cookie = request.cookies.get(SESSION_COOKIE, "")
        payload, _, mac = cookie[:MAX_COOKIE].partition(".")
        if not payload or not hmac.compare_digest(mac.encode(), self._mac("session", payload.encode()).encode()):
            return None
        try:
            body: dict[str, Any] = json.loads(_unb64(payload))
            str(body["n"]), str(body["r"]), str(body["f"]), str(body["s"]), int(body["i"]), int(body["e"])
        except (ValueError, KeyError, TypeError):
            return None
        now = time.time()
        # The expiry written at login, and no longer than today's session_hours since the login.
        if int(body["e"]) < now or int(body["i"]) + self.lifetime < now or str(body["s"]) in self.revoked:
            return None
        return body

    def identity(self, request: Request) -> Identity | None:
        """Who sends ``request``: the session's token, None without a valid session (open console: ``open``)."""
        if self.open:
            return Identity("local", "admin", open=True)
        body = self._session(request)
        if body is None:
            return None
        name, role, fingerprint = str(body["n"]), str(body["r"]), str(body["f"])
        # Still configured, with the same role: a token removed (or given another role) ends its sessions.
        for token in self.config.access_tokens():
            if (
                token.name == name
                and token.role == role
                and hmac.compare_digest(self._fingerprint(token.digest), fingerprint)
            ):
                return Identity(name, role)
        return None

    def logout(self, request: Request) -> None:
        """End ``request``'s session on this node: its id is revoked until its expiry."""
        body = self._session(request)
        if body is not None:
            self.revoked.add(str(body["s"]), int(body["e"]))

    def set_session(self, response: Response, request: Request, value: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=self.lifetime,
            path="/console",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def clear_session(self, response: Response) -> None:
        response.delete_cookie(SESSION_COOKIE, path="/console", httponly=True, samesite="strict")

    # -- CSRF --------------------------------------------------------------------------------------------------

    def browser_key(self, request: Request) -> tuple[str, bool]:
        """The per-browser random value the CSRF token is made from, and whether it is new (to be set)."""
        key = request.cookies.get(CSRF_COOKIE, "")
        if len(key) == 43 and key.replace("-", "").replace("_", "").isalnum():
            return key, False
        return secrets.token_urlsafe(32), True

    def csrf_token(self, key: str, request: Request) -> str:
        """The CSRF token of browser key ``key`` with ``request``'s session cookie (none: the login form's)."""
        session = request.cookies.get(SESSION_COOKIE, "")[:MAX_COOKIE]
        return self._mac("csrf", key.encode() + b"\0" + session.encode())

    def csrf_ok(self, request: Request, submitted: str) -> bool:
        """Whether a POST carries the CSRF token of its browser key and session, and its browser does not say it
        comes from another site (``Sec-Fetch-Site``: another port of this host is ``same-site``, not same-origin)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        key = request.cookies.get(CSRF_COOKIE, "")
        if not key or not submitted:
            return False
        return hmac.compare_digest(submitted.encode(), self.csrf_token(key, request).encode())

    def set_browser_key(self, response: Response, request: Request, key: str) -> None:
        response.set_cookie(
            CSRF_COOKIE, key, path="/console", httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
