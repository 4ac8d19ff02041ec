"""The PostgreSQL backend of the stores: several engine nodes on one database.

`connect` and `async_connect` are the one way a store opens a connection, as `traboule.stores.sqlite.open_database`
is for SQLite: ``application_name`` ``traboule`` (what ``pg_stat_activity`` shows), a statement timeout unless the
URL sets its own ``options``, and ``synchronous_commit`` left on: a commit is durable (flushed to the server's WAL)
when it returns, the PostgreSQL counterpart of ``Durability.POWER_LOSS``. Connections are in autocommit mode by
default: a store opens its transactions itself (``with conn.transaction():``), so their extent is visible where
they are written.

The schema of each store is versioned by `traboule.stores.postgres.migrations`. `redact` gives a URL fit for a
message or a log line (no password).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import psycopg

APPLICATION_NAME = "traboule"
STATEMENT_TIMEOUT_MS = 30_000  # a statement waiting longer (a lock another node never releases) fails
CONNECT_TIMEOUT_S = 10


def _params(url: str) -> dict[str, object]:
    """Defaults the URL does not set itself (a URL's own ``application_name`` or ``options`` win)."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    params: dict[str, object] = {}
    if "application_name" not in given:
        params["application_name"] = APPLICATION_NAME
    if "options" not in given:
        params["options"] = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
    if "connect_timeout" not in given:
        params["connect_timeout"] = CONNECT_TIMEOUT_S
    return params


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A blocking connection to the database at ``url`` (``postgresql://user:password@host:port/dbname``)."""
    import psycopg

    return psycopg.connect(url, autocommit=autocommit, **_params(url))  # type: ignore[arg-type]


async def async_connect(url: str, *, autocommit: bool = True) -> psycopg.AsyncConnection:
    """An asyncio connection to the database at ``url``, with the same settings as `connect`."""
    import psycopg

    return await psycopg.AsyncConnection.connect(url, autocommit=autocommit, **_params(url))  # type: ignore[arg-type]


def redact(url: str) -> str:
    """``url`` without its password (``postgresql://user:***@host/db``), for messages and logs; a ``password=``
    query parameter is masked too. Anything that does not parse is reduced to its scheme."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = "&".join(
            ("password=***" if item.lower().startswith("password=") else item)
            for item in parts.query.split("&")
            if item
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return url.split(":", 1)[0] + "://***" if ":" in url else "***"


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres") and "://" in url
