"""Configuration: the defaults run the whole local loop on loopback; one TOML file extends them; environment
variables go on top.

A file's ``[[channels]]`` entry with a new name adds a channel; one with a default channel's name changes it (its
keys merged over the default's: tables such as ``source`` or ``reports`` key by key, lists and other values
replaced); ``enabled = false`` removes it; ``[engine] defaults = false`` starts from no channel at all.

Environment variables: ``TRABOULE_AMQP_URL`` (selects RabbitMQ; several brokers of one cluster comma-separated),
``TRABOULE_AMQP_QUEUE_TYPE`` (``classic`` | ``quorum``), ``TRABOULE_DATA_DIR``, ``TRABOULE_HTTP_HOST``,
``TRABOULE_HTTP_PORT``, ``TRABOULE_MLLP_PORT``, ``TRABOULE_MWL_PORT``, ``TRABOULE_MWL_AE_TITLE``,
``TRABOULE_MPPS_PORT``, ``TRABOULE_MPPS_AE_TITLE``, ``TRABOULE_LOG_FORMAT`` (``json`` | ``console``),
``TRABOULE_LOG_LEVEL``, ``TRABOULE_DATABASE_URL`` (a ``postgresql://`` URL: the stores PostgreSQL has go there;
unset or blank: embedded SQLite files in the data folder), ``TRABOULE_CONFIG`` (the file).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traboule.errors import ConfigError
from traboule.stores.postgres import is_postgres_url, redact

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

    def api_headers(self) -> dict[str, str]:
        """What the engine's own processes send each other's HTTP API (the first bearer token, if any)."""
        return {"Authorization": f"Bearer {self.api_tokens[0]}"} if self.api_tokens else {}

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
    known = {"engine", "bus", "http", "log", "channels", "database"}
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
    http = doc.get("http", {})
    cfg.http_host = str(http.get("host", cfg.http_host))
    cfg.http_port = int(http.get("port", cfg.http_port))
    tokens = http.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ConfigError(f"{path}: [http] tokens must be a list of strings")
    cfg.api_tokens = [t.strip() for t in tokens if t.strip()]
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
    if tokens:  # an empty or blank variable does not remove the file's tokens
        cfg.api_tokens = tokens
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
    if not cfg.api_tokens and not is_loopback(cfg.http_host):
        raise ConfigError(
            f"the HTTP API would listen on {cfg.http_host} without access control: set bearer tokens "
            "(TRABOULE_API_TOKENS=token1,token2 or [http] tokens = [...]) or keep http host on 127.0.0.1"
        )
    if any(len(t) < 16 for t in cfg.api_tokens):
        raise ConfigError("API tokens must be at least 16 characters long (use e.g. `openssl rand -hex 24`)")
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
