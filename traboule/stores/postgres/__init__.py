"""The PostgreSQL backend of the stores: several engine nodes on one database.

`connect` and `async_connect` are the one way a store opens a connection, as `traboule.stores.sqlite.open_database`
is for SQLite: ``application_name`` ``traboule`` (what ``pg_stat_activity`` shows), statement, lock and
idle-in-transaction timeouts and TCP keepalives on both sides, the client's (libpq) and the server's
(``tcp_keepalives_*`` and ``tcp_user_timeout`` of the session, so that the server ends the session of a host lost
without closing its sockets, and frees its locks, in about 10 s), unless the URL sets them (its own ``options`` are
kept, ours are appended for what they do not set), and ``synchronous_commit = on`` always, whatever the URL or
the server's defaults say, checked with ``SHOW`` once connected: a commit is durable (flushed to the server's WAL)
when it returns, the PostgreSQL counterpart of ``Durability.POWER_LOSS``. Connections are in autocommit mode by
default: a store opens its transactions itself (``with conn.transaction():``), so their extent is visible where
they are written.

The schema of each store is versioned by `traboule.stores.postgres.migrations`. `redact` gives a URL fit for a
message or a log line (no password).
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    import psycopg

APPLICATION_NAME = "traboule"
STATEMENT_TIMEOUT_MS = 30_000  # a statement waiting longer (a lock another node never releases) fails
LOCK_TIMEOUT_MS = 20_000  # a lock wait fails first, with a clearer error than the statement timeout
IDLE_IN_TRANSACTION_MS = 15_000  # a session idle in an open transaction (a node gone mid-commit) is ended
CONNECT_TIMEOUT_S = 10
# TCP keepalives: a peer gone without closing (a frozen VM, a partition) is noticed in about 25 s, not 2 hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 30_000  # unacknowledged data on the socket for this long: the connection is dead (libpq ≥ 12)
# The server's side of each session (settable per session by any role): a node whose host is gone without closing
# its sockets (power loss, frozen VM, partition) has its session, and the locks it holds (the outbox relay's lease),
# ended in about 10 s rather than after the OS's 2 hours of TCP keepalive idle time.
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": 5,
    "tcp_keepalives_interval": 1,
    "tcp_keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms
}
# Always in force, whatever the URL and the server's defaults (``ALTER DATABASE ... SET`` included): appended last
# to the startup ``options``, so it wins over the URL's own ``-c synchronous_commit``.
ENFORCED = "-c synchronous_commit=on"


def _params(url: str) -> dict[str, object]:
    """The connection parameters added to ``url``: ``synchronous_commit=on`` always; the statement, lock and
    idle-in-transaction timeouts, keepalives (the client's and the server's), ``application_name`` and
    ``connect_timeout`` unless the URL sets them itself (its own ``options`` are kept, ours appended)."""
    from psycopg import pq
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    params: dict[str, object] = {}
    if "application_name" not in given:
        params["application_name"] = APPLICATION_NAME
    if "connect_timeout" not in given:
        params["connect_timeout"] = CONNECT_TIMEOUT_S
    for key, value in KEEPALIVES.items():
        if key not in given:
            params[key] = value
    if "tcp_user_timeout" not in given and pq.version() >= 120000 and sys.platform.startswith("linux"):
        params["tcp_user_timeout"] = TCP_USER_TIMEOUT_MS
    own = str(given.get("options") or "")
    options = [own] if own.strip() else []
    # what the URL's options set (``-c name=value``, ``-cname=value`` or ``--name=value``): never overridden
    named = {m.replace("-", "_").lower() for m in re.findall(r"(?:-c\s*|--)([A-Za-z0-9_.-]+)\s*=", own)}
    for name, value in (
        ("statement_timeout", STATEMENT_TIMEOUT_MS),
        ("lock_timeout", LOCK_TIMEOUT_MS),
        ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_MS),
        *SERVER_KEEPALIVES.items(),
    ):
        if name not in named:
            options.append(f"-c {name}={value}")
    options.append(ENFORCED)
    params["options"] = " ".join(options)
    return params


def _verify(value: str) -> None:
    """Refuse a session where ``synchronous_commit`` is not on (a pooler that drops the startup options)."""
    if value not in ("on", "remote_apply"):
        from traboule.errors import ConfigError

        raise ConfigError(
            f"the database session runs with synchronous_commit = {value}; traboule needs it on (a connection"
            " pooler in between must pass the startup options, or set it for the role: ALTER ROLE ... SET"
            " synchronous_commit = on)"
        )


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A blocking connection to the database at ``url`` (``postgresql://user:password@host:port/dbname``)."""
    import psycopg

    conn = psycopg.connect(url, autocommit=autocommit, **_params(url))  # type: ignore[arg-type]
    try:
        row = conn.execute("SHOW synchronous_commit").fetchone()
        if not conn.autocommit:
            conn.rollback()
        _verify(str(row[0]) if row else "")
    except BaseException:
        conn.close()
        raise
    return conn


async def async_connect(url: str, *, autocommit: bool = True) -> psycopg.AsyncConnection:
    """An asyncio connection to the database at ``url``, with the same settings as `connect`."""
    import psycopg

    conn = await psycopg.AsyncConnection.connect(url, autocommit=autocommit, **_params(url))  # type: ignore[arg-type]
    try:
        row = await (await conn.execute("SHOW synchronous_commit")).fetchone()
        if not conn.autocommit:
            await conn.rollback()
        _verify(str(row[0]) if row else "")
    except BaseException:
        await conn.close()
        raise
    return conn


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs: rebuilt from what libpq reads in it
    (``postgresql://user:***@host:port/dbname?param=...``, ``***`` when it has a password), without ``password``,
    ``sslpassword`` or any parameter whose name holds "pass". Anything that does not parse is
    ``postgresql://***``."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parsed = conninfo_to_dict(url)
    except Exception:
        return "postgresql://***"
    given = {k: str(v) for k, v in parsed.items() if v is not None and "pass" not in k.lower()}
    user, host, port, dbname = (given.pop(k, "") for k in ("user", "host", "port", "dbname"))
    netloc = quote(user, safe="") + (":***" if parsed.get("password") else "")
    netloc += "@" if netloc else ""
    hosts, ports = host.split(","), port.split(",")
    netloc += (
        ",".join(
            (f"[{h}]" if ":" in h else quote(h, safe="")) + (f":{p}" if p else "")
            for h, p in zip(hosts, ports + [ports[-1]] * (len(hosts) - len(ports)), strict=False)
        )
        if host
        else ""
    )
    query = urlencode(sorted(given.items()), quote_via=quote)
    return f"postgresql://{netloc}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


def encode_text(text: str) -> str:
    """Text as stored in a PostgreSQL ``text`` column: NUL (which it cannot hold) and ``\\x01`` escaped by an
    order-preserving, prefix-free code (``\\x01`` → ``\\x01\\x02``, NUL → ``\\x01\\x01``): injective, so
    keys stay distinct, and ``encode_text(a + b) == encode_text(a) + encode_text(b)``."""
    if "\x00" not in text and "\x01" not in text:
        return text
    return text.replace("\x01", "\x01\x02").replace("\x00", "\x01\x01")


def decode_text(text: str) -> str:
    """The inverse of `encode_text`."""
    if "\x01" not in text:
        return text
    return re.sub("\x01([\x01\x02])", lambda m: "\x00" if m[1] == "\x01" else "\x01", text)


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres") and "://" in url
