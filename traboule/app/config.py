"""Configuration: the defaults run the whole local loop on loopback; one TOML file extends them; environment
variables go on top.

A file's ``[[channels]]`` entry with a new name adds a channel; one with a default channel's name changes it (its
keys merged over the default's: tables such as ``source`` or ``reports`` key by key, lists and other values
replaced); ``enabled = false`` removes it; ``[engine] defaults = false`` starts from no channel at all.

Environment variables: ``TRABOULE_AMQP_URL`` (selects RabbitMQ; several brokers of one cluster comma-separated),
``TRABOULE_AMQP_QUEUE_TYPE`` (``classic`` | ``quorum``), ``TRABOULE_DATA_DIR``, ``TRABOULE_HTTP_HOST``,
``TRABOULE_HTTP_PORT``, ``TRABOULE_MLLP_PORT``, ``TRABOULE_MWL_PORT``, ``TRABOULE_MWL_AE_TITLE``,
``TRABOULE_MPPS_PORT``, ``TRABOULE_MPPS_AE_TITLE``, ``TRABOULE_LOG_FORMAT`` (``json`` | ``console``),
``TRABOULE_LOG_LEVEL``, ``TRABOULE_CONSOLE_SECRET`` (the console's session key, ``[console] secret``),
``TRABOULE_DATABASE_URL`` (a ``postgresql://`` URL: the stores PostgreSQL has go there;
unset or blank: embedded SQLite files in the data folder), ``TRABOULE_CONFIG`` (the file).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import ipaddress
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from traboule.errors import ConfigError
from traboule.stores.postgres import is_postgres_url, redact
from traboule.tls import TLSSettings

MAX_PARTITIONS = 64  # [bus] partitions: each is a queue (a Raft group on quorum queues) per subscriber

# The whole local loop, on loopback, on the embedded bus: RIS orders, ADT and reports in; the worklist and MPPS for
# modalities; FHIR resources (orders, performed steps, reports and their CDA) served on /fhir. What needs a remote
# system (archive, RIS status messages, FHIR server, DMP, DRIMbox) is added by a configuration file.
DEFAULT_CHANNELS: list[dict[str, Any]] = [
    {
        "name": "ris-orders",
        "kind": "hl7-orders",
        "source": {"adapter": "mllp-listener", "host": "127.0.0.1", "port": 2575},
        "mapping": "mappings/hl7_inbound.yaml",
        # Reports become CDA documents; validated by the CI-SIS validators when TRABOULE_CDA_VALIDATORS names them.
        "reports": {"validate": "auto"},
    },
    {
        "name": "worklist",
        "kind": "worklist",
        "topics": ["order.#", "patient.#", "procedure.#"],
        "mapping": "mappings/mwl.yaml",
        "max_attempts": 5,
        # Its own process: the ingest path and the worklist each need most of a core at full rate (one Python
        # process is one core), and C-FIND answers do not wait behind ingest (docs/performance.md).
        "process": "worker",
        "destinations": [{"adapter": "mwl-scp", "host": "127.0.0.1", "port": 11112, "ae_title": "TRABOULE"}],
    },
    {
        # Main process: an MPPS request is journaled before its DICOM answer, and the journal lives there.
        "name": "mpps",
        "kind": "mpps",
        "destinations": [{"adapter": "mpps-scp", "host": "127.0.0.1", "port": 11113, "ae_title": "TRABOULE"}],
    },
    {
        "name": "fhir",
        "kind": "fhir",
        "mapping": "mappings/fhir.yaml",
        "api": True,
        # Its own process: in the main one its mapping and store writes share the ingest core (ACKs measured
        # falling from 736 to 432 orders/s, docs/performance.md); beside the worklist, C-FIND answers would wait
        # behind FHIR batches. /fhir is still served on the main HTTP port, which forwards it here.
        "process": "fhir",
    },
]


@dataclass
class HTTPLimits:
    """``[http]`` bounds on what a client may make the HTTP server hold (see docs/operations.md)."""

    max_body_bytes: int = 1024 * 1024  # request body of a route without its own limit: 413 beyond
    body_limits: dict[str, int] = field(default_factory=dict)  # route path → bytes, over the routes' own limits
    header_timeout: float = 10.0  # seconds to receive a request line and headers: connection closed beyond
    body_timeout: float = 30.0  # seconds to receive a whole request body: 408 beyond
    # Connections and requests in progress (uvicorn limit_concurrency): 503 beyond. Idle connections cost a few kB
    # each on the event loop, and one that sends no request within header_timeout is closed: 100 let an attacker
    # holding 100 silent sockets (renewed every 10 s) make every route answer 503.
    max_connections: int = 1000
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16 * 1024  # request line and headers (h11 max incomplete event size): 400 beyond
    # Failed bearer-token checks (missing, unknown, a role that does not allow the request) of one client address
    # within a minute: beyond, that address gets 429 for auth_block seconds, whatever token it sends.
    max_auth_failures: int = 10
    auth_block: float = 60.0


@dataclass
class AuditConfig:
    """``[audit]``: the audit trail (IHE ATNA, see docs/operations.md). ``enabled``: record events at all (the local
    file ``file`` in the data folder always; the queue ``audit.sqlite`` when a repository is set). ``repository``:
    the audit record repository as ``host:port`` ("" = the local file only). ``transport``: ``tls`` (RFC 5425) or
    ``tcp`` (plain, for a laboratory). ``tls``: the client TLS settings (over ``[tls]``). ``source_id``: the
    AuditSourceID ("" = the host name). ``enterprise_site_id``: the AuditEnterpriseSiteID. ``ae_title``: the engine's
    UserID in the messages ("" = the AE title of its first DICOM SCP, else ``traboule``)."""

    enabled: bool = True
    repository: str = ""
    transport: str = "tls"
    tls: TLSSettings = field(default_factory=TLSSettings)
    source_id: str = ""
    enterprise_site_id: str = ""
    ae_title: str = ""
    file: str = "audit.log"

    @property
    def address(self) -> tuple[str, int] | None:
        """The repository's host and port; None without one."""
        if not self.repository:
            return None
        host, _, port = self.repository.rpartition(":")
        return host.strip("[]"), int(port)


ROLES = ("read", "operate", "admin")  # what a token may do, each role allowing what the ones before it do
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ApiToken:
    """One access token of the HTTP API and the console: its ``name`` (for the console and the audit), its ``role``
    (`ROLES`), and the token itself (``token``) or only its SHA-256 in hex (``token_sha256``)."""

    name: str
    role: str = "admin"
    token: str = ""
    token_sha256: str = ""

    @property
    def digest(self) -> str:
        """SHA-256 of the token in hex (what a ``token_sha256`` entry holds)."""
        return self.token_sha256 or hashlib.sha256(self.token.encode()).hexdigest()

    def allows(self, needed: str) -> bool:
        """Whether this token's role allows what ``needed`` (a role of `ROLES`) may do."""
        return ROLES.index(self.role) >= ROLES.index(needed)


def find_token(tokens: Sequence[ApiToken], presented: str | bytes) -> ApiToken | None:
    """The token entry ``presented`` is (the role lookup of the API and the console), or None. Compared with every
    entry, each in constant time: no early exit that a timing could reveal."""
    raw = presented.encode() if isinstance(presented, str) else presented
    digest = hashlib.sha256(raw).hexdigest().encode()
    found = None
    for entry in tokens:
        same = hmac.compare_digest(raw, entry.token.encode()) if entry.token else False
        same |= hmac.compare_digest(digest, entry.token_sha256.encode()) if entry.token_sha256 else False
        if same and found is None:
            found = entry
    return found


@dataclass
class Config:
    data_dir: str = "var"
    amqp_url: str = ""  # one AMQP URL, or the brokers of one cluster comma-separated (tried in turn)
    exchange: str = "traboule"
    queue_type: str = "classic"  # RabbitMQ queues: "classic", or "quorum" (replicated on a cluster)
    partitions: int = 1  # RabbitMQ: queues per subscriber (>= 2: per-patient order, patients in parallel)
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    log_format: str = "console"
    log_level: str = "info"
    log_patient_data: bool = False
    api_tokens: list[str] = field(default_factory=list)  # bearer tokens of the HTTP API (none: loopback only)
    # ``[http] tokens`` entries given as tables (name, role, token or token_sha256); the plain strings above are
    # admin tokens named by position (`access_tokens`).
    named_tokens: list[ApiToken] = field(default_factory=list)
    console_secret: str = ""  # ``[console] secret``: the key signing console sessions ("" = a file in data_dir)
    console_session_hours: float = 8.0  # ``[console] session_hours``: a console login lasts this long
    # ``[console] query_timeout``: seconds a console query may run on PostgreSQL (its statement timeout)
    console_query_timeout: float = 10.0
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)
    channels: list[dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_CHANNELS))
    path: str = ""
    # The supervisor of the child processes: first restart delay, its cap, and how long a child must have been
    # ready for its next crash to start again from the first delay (not a crash loop).
    restart_backoff: float = 1.0
    restart_backoff_max: float = 10.0
    restart_reset_after: float = 10.0
    # Free space the journal leaves on its disk: below it, messages are answered "not stored" (AR, 503...).
    min_free_disk_mb: int = 64
    # ``[database] url``: a PostgreSQL database shared by several engine nodes; "" = SQLite files in data_dir.
    # It may hold a password: print it through `database_description`, never as it is.
    database_url: str = ""
    # ``[alerts]``: rules and notifiers (`traboule.app.alerts.AlertsConfig`); None: no alerting.
    alerts: Any = None
    # ``[tls]``: the defaults every ``tls`` setting of a listener or client starts from (`traboule.tls.TLSSettings`,
    # not enabled by itself: a listener's ``tls = true`` turns it on with these files).
    tls: TLSSettings = field(default_factory=TLSSettings)
    # ``[tls] reload_interval``: seconds between two checks of the TLS listeners' certificate and key files (a
    # changed file is loaded without a restart, `traboule.app.tls_reload`).
    tls_reload_interval: float = 60.0
    # ``[http] tls``: HTTPS on every process's HTTP port (and the engine's own calls between them over it).
    http_tls: TLSSettings = field(default_factory=TLSSettings)
    audit: AuditConfig = field(default_factory=AuditConfig)  # ``[audit]``: the audit trail

    @property
    def database_description(self) -> str:
        """Which database backend the stores use, fit for a message or a log (no password)."""
        if self.database_url:
            return f"postgresql ({redact(self.database_url)})"
        return f"sqlite (files in {self.data_dir})"

    def processes(self) -> list[str]:
        """Process names of the configured channels, ``main`` first (it always exists: it holds the journal)."""
        names = ["main"]
        for ch in self.channels:
            name = str(ch.get("process", "main"))
            if name not in names:
                names.append(name)
        return names

    def http_port_of(self, process: str) -> int:
        """The HTTP port of a process: the main one's, then one more per process in configuration order."""
        names = self.processes()
        return self.http_port + (names.index(process) if process in names else 0)

    def access_tokens(self) -> list[ApiToken]:
        """Every token with its name and role: the plain strings first (admin, named ``token-1``, ``token-2``...
        by position), then the table entries. Empty: no access control (loopback only)."""
        plain = [ApiToken(f"token-{n}", "admin", token=t) for n, t in enumerate(self.api_tokens, 1)]
        return plain + list(self.named_tokens)

    @property
    def api_scheme(self) -> str:
        """``https`` when the HTTP API is served over TLS (``[http] tls``), else ``http``."""
        return "https" if self.http_tls.enabled else "http"

    def api_headers(self) -> dict[str, str]:
        """What the engine's own processes send each other's HTTP API (the first token given in clear, if any)."""
        clear = [t.token for t in self.access_tokens() if t.token and t.role == "admin"]
        clear += [t.token for t in self.access_tokens() if t.token]
        return {"Authorization": f"Bearer {clear[0]}"} if clear else {}

    def channel(self, name: str) -> dict[str, Any]:
        for ch in self.channels:
            if ch.get("name") == name:
                return ch
        raise KeyError(name)


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ if env is None else env)
    path = path or env.get("TRABOULE_CONFIG") or ""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        _apply_file(cfg, doc, path)
        cfg.path = str(Path(path).resolve())
    _apply_env(cfg, env)
    _check(cfg)
    return cfg


def _apply_file(cfg: Config, doc: dict[str, Any], path: str) -> None:
    known = {"engine", "bus", "http", "log", "channels", "database", "console", "alerts", "tls", "audit"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{path}: unknown section [{key}] (expected one of {sorted(known)})")
    engine = doc.get("engine", {})
    if not isinstance(engine.get("defaults", True), bool):
        raise ConfigError(f"{path}: [engine] defaults must be true or false")
    cfg.data_dir = str(engine.get("data_dir", cfg.data_dir))
    if "min_free_disk_mb" in engine:
        value = engine["min_free_disk_mb"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{path}: [engine] min_free_disk_mb must be a whole number of MiB (0: no reserve)")
        cfg.min_free_disk_mb = value
    for key in ("restart_backoff", "restart_backoff_max", "restart_reset_after"):
        if key in engine:
            try:
                setattr(cfg, key, float(engine[key]))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: [engine] {key} must be a number of seconds") from exc
            if getattr(cfg, key) <= 0:
                raise ConfigError(f"{path}: [engine] {key} must be a positive number of seconds")
    database = doc.get("database", {})
    if not isinstance(database, dict) or set(database) - {"url"}:
        raise ConfigError(f"{path}: [database] has one key, url (a postgresql:// URL)")
    if not isinstance(database.get("url", ""), str):
        raise ConfigError(f"{path}: [database] url must be a string (postgresql://user:password@host:port/dbname)")
    cfg.database_url = database.get("url", cfg.database_url).strip()
    bus = doc.get("bus", {})
    amqp_url = bus.get("amqp_url", cfg.amqp_url)
    if isinstance(amqp_url, list):  # the brokers of one cluster
        if not all(isinstance(u, str) and u.strip() and "," not in u for u in amqp_url):
            raise ConfigError(f"{path}: [bus] amqp_url must be a URL or a list of URLs (the brokers of one cluster)")
        amqp_url = ",".join(u.strip() for u in amqp_url)
    cfg.amqp_url = str(amqp_url)
    cfg.exchange = str(bus.get("exchange", cfg.exchange))
    cfg.queue_type = str(bus.get("queue_type", cfg.queue_type))
    partitions = bus.get("partitions", cfg.partitions)
    if not isinstance(partitions, int) or isinstance(partitions, bool):
        raise ConfigError(f"{path}: [bus] partitions must be a whole number (1, the default, or 2 to {MAX_PARTITIONS})")
    cfg.partitions = partitions
    tls_table = doc.get("tls", {})
    if isinstance(tls_table, dict) and "reload_interval" in tls_table:
        tls_table = dict(tls_table)
        cfg.tls_reload_interval = seconds(tls_table.pop("reload_interval"), f"{path}: [tls] reload_interval")
        if cfg.tls_reload_interval <= 0:
            raise ConfigError(f"{path}: [tls] reload_interval must be above 0")
    if isinstance(tls_table, dict) and "verify" in tls_table:  # it would turn off every client's server check
        raise ConfigError(f"{path}: [tls] verify is not a default: set tls = {{ verify = false }} on one destination")
    cfg.tls = TLSSettings.from_config(tls_table, f"{path}: [tls]", TLSSettings())
    cfg.tls = replace(cfg.tls, enabled=False)  # the defaults; each listener or client turns TLS on
    cfg.audit = _audit_config(doc.get("audit", {}), path, cfg.tls)
    http = doc.get("http", {})
    cfg.http_host = str(http.get("host", cfg.http_host))
    cfg.http_port = int(http.get("port", cfg.http_port))
    cfg.http_tls = TLSSettings.from_config(http.get("tls"), f"{path}: [http]", cfg.tls)
    cfg.http_tls.check_server(f"{path}: [http]")
    tokens = http.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str | dict) for t in tokens):
        raise ConfigError(
            f'{path}: [http] tokens must be a list of strings or of tables {{ name = "...", token = "..." or '
            'token_sha256 = "<hex>", role = "read" | "operate" | "admin" }'
        )
    cfg.api_tokens = [t.strip() for t in tokens if isinstance(t, str) and t.strip()]
    cfg.named_tokens = [_named_token(t, path) for t in tokens if isinstance(t, dict)]
    console = doc.get("console", {})
    if not isinstance(console, dict) or set(console) - {"secret", "session_hours", "query_timeout"}:
        raise ConfigError(f"{path}: [console] has three keys, secret, session_hours and query_timeout")
    if not isinstance(console.get("secret", ""), str):
        raise ConfigError(f"{path}: [console] secret must be a string (e.g. `openssl rand -hex 32`)")
    cfg.console_secret = console.get("secret", cfg.console_secret).strip()
    hours = console.get("session_hours", cfg.console_session_hours)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or not 0 < hours <= 24 * 30:
        raise ConfigError(f"{path}: [console] session_hours must be a number of hours (0 to 720)")
    cfg.console_session_hours = float(hours)
    timeout = seconds(console.get("query_timeout", cfg.console_query_timeout), f"{path}: [console] query_timeout")
    if not 0.001 <= timeout <= 3600:
        raise ConfigError(f'{path}: [console] query_timeout must be a duration of 1 ms to 1 h (seconds, or "10s")')
    cfg.console_query_timeout = timeout
    for key, default in vars(cfg.http_limits).items():  # the numbers; body_limits below
        if key in http and key != "body_limits":
            number, kind = http[key], type(default)
            if isinstance(number, bool) or not isinstance(number, int | kind) or number <= 0:
                raise ConfigError(f"{path}: [http] {key} must be a positive {kind.__name__}, not {number!r}")
            setattr(cfg.http_limits, key, kind(number))
    body_limits = http.get("body_limits", {})
    if not isinstance(body_limits, dict) or not all(
        str(route).startswith("/") and isinstance(n, int) and not isinstance(n, bool) and n > 0
        for route, n in body_limits.items()
    ):
        raise ConfigError(f'{path}: [http] body_limits maps route paths to bytes, e.g. {{"/archive/stable" = 65536}}')
    cfg.http_limits.body_limits = dict(body_limits)
    log = doc.get("log", {})
    cfg.log_format = str(log.get("format", cfg.log_format))
    cfg.log_level = str(log.get("level", cfg.log_level))
    cfg.log_patient_data = bool(log.get("patient_data", cfg.log_patient_data))
    channels = doc.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(ch, dict) for ch in channels):
        raise ConfigError(f"{path}: [[channels]] must be an array of tables")
    base = cfg.channels if engine.get("defaults", True) else []
    cfg.channels = merge_channels(base, channels, path)
    if "alerts" in doc:  # checked against the channels: a rule names one
        from traboule.app.alerts import parse as parse_alerts

        try:
            cfg.alerts = parse_alerts(doc["alerts"], cfg.channels, tls=cfg.tls)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _audit_config(section: Any, path: str, tls: TLSSettings) -> AuditConfig:
    """The ``[audit]`` section (see `AuditConfig`)."""
    where = f"{path}: [audit]"
    keys = {"enabled", "repository", "transport", "tls", "source_id", "enterprise_site_id", "ae_title", "file"}
    if not isinstance(section, dict) or set(section) - keys:
        unknown = sorted(set(section) - keys) if isinstance(section, dict) else section
        raise ConfigError(f"{where}: unknown setting {unknown} (known: {', '.join(sorted(keys))})")
    audit = AuditConfig()
    if not isinstance(section.get("enabled", True), bool):
        raise ConfigError(f"{where}: enabled must be true or false")
    audit.enabled = section.get("enabled", True)
    for key in ("repository", "source_id", "enterprise_site_id", "ae_title", "file", "transport"):
        value = section.get(key, getattr(audit, key))
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ConfigError(f"{where}: {key} must be a string on one line")
        setattr(audit, key, value.strip())
    if audit.transport not in ("tls", "tcp"):
        raise ConfigError(f'{where}: transport must be "tls" (RFC 5425) or "tcp" (plain, for a laboratory)')
    if audit.repository:
        host, _, port = audit.repository.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f'{where}: repository must be "host:port" (e.g. "arr.example.org:6514")')
    if not audit.file or "/" in audit.file or audit.file in (".", ".."):
        raise ConfigError(f"{where}: file must be a file name in the data folder (audit.log)")
    audit.tls = TLSSettings.from_config(section.get("tls", True), f"{where} tls", tls)
    audit.tls = replace(audit.tls, enabled=audit.transport == "tls")
    return audit


def _named_token(entry: dict[str, Any], path: str) -> ApiToken:
    """One ``[http] tokens`` table: ``name``, ``role`` and ``token`` or ``token_sha256`` (hex)."""
    where = f"{path}: [http] tokens entry {entry.get('name')!r}"
    unknown = set(entry) - {"name", "token", "token_sha256", "role"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (name, token or token_sha256, role)")
    name, role = entry.get("name"), entry.get("role", "admin")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", name):
        raise ConfigError(f"{where}: name must be 1 to 64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise ConfigError(f"{where}: role must be one of {list(ROLES)}")
    token, digest = entry.get("token", ""), entry.get("token_sha256", "")
    if not isinstance(token, str) or not isinstance(digest, str) or bool(token.strip()) == bool(digest.strip()):
        raise ConfigError(f"{where}: give either token or token_sha256 (one of them, a string)")
    digest = digest.strip().lower()
    if digest and not _SHA256_HEX.fullmatch(digest):
        raise ConfigError(f"{where}: token_sha256 must be 64 hexadecimal digits (`printf %s TOKEN | sha256sum`)")
    return ApiToken(name, role, token=token.strip(), token_sha256=digest)


def merge_channels(base: list[dict[str, Any]], entries: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """The file's ``[[channels]]`` over ``base`` (the defaults): a new name is added (in file order, after the
    defaults), a known name changes that channel (`merge`), ``enabled = false`` removes it."""
    names = [ch.get("name") for ch in entries]
    twice = sorted({str(n) for n in names if n is not None and names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: a channel appears twice in [[channels]]: {twice} (one entry per name)")
    out = copy.deepcopy(base)
    for entry in entries:
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{path}: channel {entry.get('name')!r}: enabled must be true or false")
        entry = {k: v for k, v in entry.items() if k != "enabled"}
        known = next((i for i, ch in enumerate(out) if ch.get("name") == entry.get("name")), None)
        if known is None:
            if enabled:
                out.append(copy.deepcopy(entry))
        elif not enabled:
            del out[known]
        else:
            kind = entry.get("kind", out[known].get("kind"))
            if kind != out[known].get("kind"):
                raise ConfigError(
                    f"{path}: channel {entry['name']!r} is a default {out[known].get('kind')} channel, not {kind}: "
                    "give yours another name (and `enabled = false` the default one if it should not run)"
                )
            out[known] = merge(out[known], entry)
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over``'s keys over ``base``'s: tables merged key by key, any other value (a list too) replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_env(cfg: Config, env: dict[str, str]) -> None:
    if "TRABOULE_AMQP_URL" in env:
        cfg.amqp_url = env["TRABOULE_AMQP_URL"]
    cfg.queue_type = env.get("TRABOULE_AMQP_QUEUE_TYPE", cfg.queue_type).strip() or cfg.queue_type
    if env.get("TRABOULE_AMQP_PARTITIONS", "").strip():
        try:
            cfg.partitions = int(env["TRABOULE_AMQP_PARTITIONS"])
        except ValueError:
            raise ConfigError("environment: TRABOULE_AMQP_PARTITIONS must be a whole number") from None
    cfg.data_dir = env.get("TRABOULE_DATA_DIR", cfg.data_dir)
    if env.get("TRABOULE_DATABASE_URL", "").strip():  # blank does not switch a configured database to SQLite
        cfg.database_url = env["TRABOULE_DATABASE_URL"].strip()
    cfg.http_host = env.get("TRABOULE_HTTP_HOST", cfg.http_host)
    cfg.log_format = env.get("TRABOULE_LOG_FORMAT", cfg.log_format)
    cfg.log_level = env.get("TRABOULE_LOG_LEVEL", cfg.log_level)
    tokens = [t.strip() for t in env.get("TRABOULE_API_TOKENS", "").split(",") if t.strip()]
    if tokens:  # an empty or blank variable does not remove the file's tokens (the tables stay in any case)
        cfg.api_tokens = tokens
    cfg.console_secret = env.get("TRABOULE_CONSOLE_SECRET", "").strip() or cfg.console_secret
    try:
        if "TRABOULE_HTTP_PORT" in env:
            cfg.http_port = int(env["TRABOULE_HTTP_PORT"])
        for var, adapter, key in (
            ("TRABOULE_MLLP_PORT", "mllp-listener", "port"),
            ("TRABOULE_MWL_PORT", "mwl-scp", "port"),
            ("TRABOULE_MWL_AE_TITLE", "mwl-scp", "ae_title"),
            ("TRABOULE_MPPS_PORT", "mpps-scp", "port"),
            ("TRABOULE_MPPS_AE_TITLE", "mpps-scp", "ae_title"),
        ):
            if var in env:
                value: Any = env[var] if key == "ae_title" else int(env[var])
                for endpoint in _endpoints(cfg, adapter):
                    endpoint[key] = value
    except ValueError as exc:
        raise ConfigError(f"environment: {exc}") from exc


def _endpoints(cfg: Config, adapter: str) -> list[dict[str, Any]]:
    out = []
    for ch in cfg.channels:
        for ep in [ch.get("source") or {}, *(ch.get("destinations") or [])]:
            if isinstance(ep, dict) and ep.get("adapter") == adapter:
                out.append(ep)
    return out


def _check(cfg: Config) -> None:
    names = [ch.get("name") for ch in cfg.channels]
    for ch in cfg.channels:
        if not ch.get("name") or not ch.get("kind"):
            raise ConfigError(f"{cfg.path or 'config'}: every [[channels]] needs 'name' and 'kind' ({ch})")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{cfg.path or 'config'}: channel names must be unique: {sorted(dupes)}")
    if not cfg.access_tokens() and not is_loopback(cfg.http_host):
        raise ConfigError(
            f"the HTTP API would listen on {cfg.http_host} without access control: set bearer tokens "
            "(TRABOULE_API_TOKENS=token1,token2 or [http] tokens = [...]) or keep http host on 127.0.0.1"
        )
    if any(t.token and len(t.token) < 16 for t in cfg.access_tokens()):
        raise ConfigError("API tokens must be at least 16 characters long (use e.g. `openssl rand -hex 24`)")
    token_names = [t.name for t in cfg.access_tokens()]
    if len(set(token_names)) != len(token_names):
        raise ConfigError(f"[http] tokens: two tokens have the same name ({token_names})")
    if cfg.access_tokens() and not cfg.api_headers() and len(cfg.processes()) > 1:
        raise ConfigError(
            "[http] tokens: the engine's processes call each other's HTTP API with a token given in clear: add one "
            "(token = ...), or run every channel in the main process"
        )
    if cfg.console_secret and len(cfg.console_secret) < 16:
        raise ConfigError("[console] secret must be at least 16 characters long (use e.g. `openssl rand -hex 32`)")
    if cfg.database_url and not is_postgres_url(cfg.database_url):
        raise ConfigError(
            f"database url {redact(cfg.database_url)!r}: only PostgreSQL is supported"
            " (postgresql://user:password@host:port/dbname)"
        )
    if cfg.log_format not in ("json", "console"):
        raise ConfigError(f"log format {cfg.log_format!r}: use 'json' or 'console'")
    if cfg.queue_type not in ("classic", "quorum"):
        raise ConfigError(f"[bus] queue_type {cfg.queue_type!r}: use 'classic' (the default) or 'quorum'")
    if not 1 <= cfg.partitions <= MAX_PARTITIONS:
        raise ConfigError(f"[bus] partitions {cfg.partitions}: use 1 (the default) to {MAX_PARTITIONS}")


def destination_tls(table: dict[str, Any], where: str, base: TLSSettings | None = None) -> TLSSettings:
    """The TLS settings of an outbound client's destination (a FHIR server, the DMP, a DICOMweb archive, an alert
    webhook...): its ``tls = { ... }`` table over the ``[tls]`` defaults (``base``), with the older top-level keys
    ``ca_file``, ``cert_file``, ``key_file`` still read as aliases of the table's (the table wins). Enabled: the
    context is used for every ``https://`` URL of the destination (a plain ``http://`` one has no TLS)."""
    value = table.get("tls", True)
    if value is False:
        raise ConfigError(f"{where}: tls = false is not supported for an outbound client: use an http:// URL")
    aliases = {k: table[k] for k in ("ca_file", "cert_file", "key_file") if k in table}
    for key, path in aliases.items():
        if not isinstance(path, str):
            raise ConfigError(f"{where}: {key} must be a string, not {path!r}")
    aliases = {k: v for k, v in aliases.items() if v}
    if "cert_file" in aliases and "key_file" not in aliases:  # the key in the certificate's PEM, as before
        aliases["key_file"] = aliases["cert_file"]
    if value is True:
        value = aliases or True
    elif isinstance(value, dict):
        value = {**aliases, **value}
    return TLSSettings.from_config(value, where, base)


def client_host(host: str) -> str:
    """The address a client on this machine uses for a listener bound to ``host`` (0.0.0.0 / :: listen everywhere)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(base: Config, relative: str) -> Path:
    """A path from the configuration: an absolute one as is; a relative one in the config file's folder when it
    exists there, else in the working directory when it exists there, else in traboule's own folder (its
    ``mappings/``)."""
    p = Path(relative)
    if p.is_absolute():
        return p
    if base.path:
        candidate = Path(base.path).parent / p
        if candidate.exists():
            return candidate
    here = Path.cwd() / p
    if here.exists():
        return here
    return Path(__file__).resolve().parents[2] / p


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*", re.ASCII)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(setting: Any, what: str) -> float:
    """A duration setting: a number of seconds, or a string such as ``"90s"``, ``"30m"``, ``"24h"``, ``"2d"``."""
    if isinstance(setting, int | float) and not isinstance(setting, bool) and setting >= 0:
        return float(setting)
    match = _DURATION.fullmatch(setting) if isinstance(setting, str) else None
    if match is None:
        raise ConfigError(f'{what}: expected seconds or a duration such as "24h", not {setting!r}')
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]
