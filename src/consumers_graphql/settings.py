"""Settings, from ``CONSUMERS_*`` variables, and what goes wrong with them: a value that does
not parse, a variable no setting reads (a typo), a database URL without its driver."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from consumers_graphql.documents import ManifestError, load_manifest

ENV_PREFIX = "CONSUMERS_"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class UiAssets(StrEnum):
    CDN = "cdn"
    LOCAL = "local"


class LogLevel(StrEnum):
    """uvicorn's levels (`trace` is its own, below debug)."""

    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"
    TRACE = "trace"

    @classmethod
    def _missing_(cls, value: object) -> LogLevel | None:  # WARNING, Info: as logging takes them
        return cls.__members__.get(str(value).upper())


class WorkerSockets(StrEnum):
    OWN = "own"
    SHARED = "shared"


class HttpProtocol(StrEnum):
    HTTPTOOLS = "httptools"
    H11 = "h11"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class Pooler(StrEnum):
    NONE = "none"
    TRANSACTION = "transaction"


class Settings(BaseSettings):
    """Every knob of the service; read from ``CONSUMERS_*`` variables, passed in, never global."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./consumers.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    env: Environment = Environment.DEVELOPMENT
    log_level: LogLevel = LogLevel.INFO
    sql_echo: bool = False
    # Connection pool per process (PostgreSQL); SQLite uses its own small pool.
    pool_size: int = Field(default=10, ge=1)
    # The Retry-After of a 503 while the database is out of reach.
    retry_after_s: int = Field(default=5, ge=1)
    sqlite_busy_timeout_ms: int = Field(default=10_000, ge=0)
    # SQLite reads first run on the event loop's own thread, and are handed to the driver's
    # thread when they take longer than this (0: always on the driver's thread). See store/db.py.
    sqlite_inline_read_ms: float = Field(default=2.0, ge=0)
    # `serve`'s client connections (see connections.py): the first byte of a request within
    # the keep-alive (idle) timeout, its head within the header timeout of that byte, and at
    # most the body timeout between two reads of its body; at most max_connections open
    # (fewer if the descriptor limit, `ulimit -n`, allows fewer).
    keep_alive_timeout_s: float = Field(default=5.0, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=1_000, ge=1)
    # `serve`'s HTTP/1.1: uvicorn's httptools protocol on the uvloop event loop, or `h11`,
    # uvicorn's pure-Python protocol on asyncio's own loop (the fallback, ~0.3 ms more CPU a
    # request). README "Slow and idle clients".
    http_protocol: HttpProtocol = HttpProtocol.HTTPTOOLS
    # Server-side secret mixed into every API key hash (HMAC-SHA256): a stolen database alone
    # cannot be used to check guesses. Changing it invalidates every existing key.
    key_pepper: SecretStr | None = None
    # A key verified against the database is trusted for this long by each process without
    # asking again (store/keys.py), so a revoked key stops working within it everywhere;
    # 0 checks the database on every request.
    # At most 5 minutes: the cache time is the documented bound on how long a revoked key
    # still works, so a typo (or `inf`) must not remove it.
    key_cache_seconds: float = Field(default=5.0, ge=0, le=300, allow_inf_nan=False)
    # How long an Idempotency-Key's first answer is kept for replays (web/idempotency.py):
    # past it the key counts as new. At most 30 days: the table grows with every keyed
    # write kept, and expired rows are pruned only by later keyed writes.
    idempotency_key_hours: float = Field(default=24.0, gt=0, le=720, allow_inf_nan=False)
    # How long change events are kept (store/events.py): a cursor older than that is refused.
    event_retention_days: int = Field(default=30, ge=1, le=3650)
    # --- Subscriptions (store/event_hub.py, api/subscription.py; README "Change events") ---
    # PostgreSQL: where the one LISTEN connection of each process goes. Unset: the database
    # URL. Behind pgbouncer in transaction mode (CONSUMERS_DATABASE_POOLER=transaction) LISTEN
    # needs a direct connection to the server: set this to it, else each process notices
    # commits by polling (events_poll_interval_ms) instead.
    events_listen_url: str | None = None
    # How often a process looks for events committed by other processes when it has no
    # notification to tell it (SQLite; PostgreSQL without a usable LISTEN connection).
    events_poll_interval_ms: int = Field(default=500, ge=10, le=60_000)
    # Open subscriptions, at most, per API key and per process (each process counts its own).
    subscriptions_per_key: int = Field(default=20, ge=1)
    subscriptions_per_process: int = Field(default=1_000, ge=1)
    # Events a subscriber may have waiting to be sent, at most: a client that reads slower
    # than events come has its subscription ended (resume with `after`).
    subscription_buffer: int = Field(default=1_000, ge=1, le=100_000)
    # A WebSocket must send connection_init within this; pings (protocol level) every
    # interval, and a connection whose pong does not come within it is closed.
    subscription_init_timeout_s: float = Field(default=10.0, gt=0, le=300)
    websocket_ping_interval_s: float = Field(default=20.0, gt=0, le=3_600)
    # Request limits on /graphql, checked before anything runs (see the README).
    max_depth: int = Field(default=12, ge=1)
    max_aliases: int = Field(default=30, ge=0)
    max_tokens: int = Field(default=5_000, ge=1)
    max_directives: int = Field(default=5, ge=0)  # on one field, fragment or operation
    max_duplicate_fields: int = Field(default=50, ge=1)  # one response key, one selection set
    max_cost: int = Field(default=50_000, ge=1)  # nodes an operation can return
    max_body_bytes: int = Field(default=1_048_576, ge=1)
    # Every HTTP request is stopped past this (504), its connections back in the pool.
    request_timeout_s: float = Field(default=30.0, gt=0)
    # On SIGTERM, `serve` stops taking requests and waits this long for those under way.
    shutdown_grace_s: int = Field(default=10, ge=0)
    # REST batch endpoints: 500 items with 16 KiB metadata each are ~8.5 MiB as compact JSON
    # and up to ~28 MiB with every non-ASCII character escaped (\uXXXX); see the README.
    max_batch_body_bytes: int = Field(default=33_554_432, ge=1)

    # --- GraphiQL and API docs offline (web/ui_assets.py) ---
    # Where GraphiQL's scripts come from: `local` (fetched by `consumers-graphql assets
    # fetch`; Swagger UI and ReDoc are always installed) or `cdn` (unpkg, SRI-pinned). Unset:
    # local once fetched, else cdn with a notice at startup.
    ui_assets: UiAssets | None = None
    # The folder `assets fetch` fills and the app serves (default: a per-user data folder,
    # $XDG_DATA_HOME/consumers-graphql/ui-assets).
    ui_assets_dir: Path | None = None
    # --- Tracing (web/tracing.py): the standard OpenTelemetry variables, under their own
    # names (no CONSUMERS_ prefix). An OTLP endpoint turns tracing on; the SDK reads the rest
    # (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_*).
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT"))
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    otel_exporter_otlp_protocol: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                                                    "OTEL_EXPORTER_OTLP_PROTOCOL"))
    otel_traces_exporter: str = Field(
        default="otlp", validation_alias=AliasChoices("OTEL_TRACES_EXPORTER"))
    # Text, read as the SDK reads it ("true" in any case disables): never a validation error.
    otel_sdk_disabled: str = Field(
        default="", validation_alias=AliasChoices("OTEL_SDK_DISABLED"))

    # --- Health, metrics and logs (issue 13; see the README's "Health, metrics and logs") ---
    # json: one JSON object per line; the default is json in production, text otherwise.
    log_format: LogFormat | None = None
    # /metrics (Prometheus text format, every worker summed). Off: 404, nothing collected.
    metrics_enabled: bool = True
    # When set, `serve` answers /metrics on this port (of metrics_host, default host) and
    # the app does not.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str | None = None
    # /readyz waits at most this long for the database before answering 503.
    health_timeout_s: float = Field(default=5.0, gt=0)

    # --- Rate limits (web/rate_limit.py; README "Rate limits") ---
    # Each API key's leaky bucket of cost points: it holds rate_limit_capacity points and
    # gets rate_limit_restore_rate back every second; a GraphQL operation takes its cost, a
    # REST call its page or batch size. 0 turns rate limiting off (keys given a capacity of
    # their own by `keys create --rate-limit-capacity` keep theirs).
    rate_limit_capacity: int = Field(default=20_000, ge=0, le=1_000_000_000)
    # (At least 0.001 a second: store/keys.py RATE_LIMIT_RESTORE_MIN.)
    rate_limit_restore_rate: float = Field(default=2_000.0, ge=0.001, le=1_000_000_000,
                                           allow_inf_nan=False)
    # Shares the buckets between every worker and host (Redis, redis:// rediss:// unix://);
    # unset, each process keeps its own.
    redis_url: str | None = None
    # Redis out of reach: requests go through unlimited (and one warning is logged per
    # outage), or with this set they are refused 503 with Retry-After.
    rate_limit_fail_closed: bool = False

    # --- CORS (web/cors.py; README "CORS") ---
    # The origins whose pages may call /graphql and /api/v1 from a browser, comma-separated
    # (`https://app.example.com,http://localhost:5173`), or `*` for any; none by default (no
    # CORS header at all). NoDecode: a comma-separated list, not pydantic-settings' JSON.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("cors_origins", mode="before")
    @classmethod
    def cors_origins_are_origins(cls, value: object) -> object:
        """Each entry as a browser sends its Origin header (scheme and host in lower case,
        no default port), so that the comparison is an exact match; anything that could
        never match one (a path, a trailing slash, a wildcard host) is refused by name."""
        if isinstance(value, str):
            value = value.split(",") if value.strip() else []
        if not isinstance(value, list | tuple):
            return value  # pydantic's own error
        entries = [str(entry).strip() for entry in value]
        if entries == ["*"]:
            return ("*",)
        if "*" in entries:
            raise ValueError("`*` allows every origin: write it alone, not in a list")
        return tuple(dict.fromkeys(_origin(entry) for entry in entries))

    # --- Persisted queries and trusted documents (api/documents.py; README "Persisted
    # queries and trusted documents") ---
    # Automatic persisted queries (Apollo's protocol): the documents registered by hash, an
    # LRU of at most this many per process (each worker and host keeps its own; a client
    # whose hash is not known sends the document again). 0 turns APQ off.
    persisted_queries_cache_size: int = Field(default=1_000, ge=0, le=1_000_000)
    # A trusted documents manifest: Relay's persisted_queries.json or Apollo's persisted
    # query manifest. Its documents run by `documentId` (or `doc_id`, or an APQ hash).
    trusted_documents: Path | None = None
    # Refuse every other document (PERSISTED_QUERY_REQUIRED): text queries, mutations and
    # APQ registrations alike.
    trusted_documents_only: bool = False
    # A GET of a persisted query (by hash or documentId) answered without errors may be
    # kept this long by the client's own cache (`Cache-Control: private, max-age=N`); 0
    # keeps `no-store`.
    persisted_query_max_age_s: int = Field(default=0, ge=0, le=86_400)

    @field_validator("trusted_documents")
    @classmethod
    def trusted_documents_readable(cls, path: Path | None) -> Path | None:
        """The manifest read once at startup, so that a bad one stops `serve` with its
        problem rather than refusing every request."""
        if path is not None:
            try:
                load_manifest(path, "the manifest")  # (its path is shown already)
            except ManifestError as error:
                raise ValueError(str(error)) from None
        return path

    @model_validator(mode="after")
    def _trusted_only_with_a_manifest(self) -> Settings:
        if self.trusted_documents_only and self.trusted_documents is None:
            raise ValueError("CONSUMERS_TRUSTED_DOCUMENTS_ONLY=true needs a manifest in "
                             "CONSUMERS_TRUSTED_DOCUMENTS: without one every operation would "
                             "be refused")
        return self

    @field_validator("redis_url")
    @classmethod
    def redis_url_parses(cls, url: str | None) -> str | None:
        """A Redis URL the client can use; never repeated in the message (it may carry a
        password)."""
        if url is None:
            return None
        problem = _redis_url_problem(url)
        if problem is not None:
            raise ValueError(f"{problem} (redis://[:password@]host[:port][/db], rediss://… "
                             "for TLS, or unix:///path/to/socket)")
        return url

    @property
    def effective_log_format(self) -> LogFormat:
        if self.log_format is not None:
            return self.log_format
        return LogFormat.JSON if self.is_production else LogFormat.TEXT

    # --- PostgreSQL behind a pooler, and a read replica (README: "PostgreSQL behind
    # pgbouncer", "Read replica") ---
    # `transaction`: the database URL (and the replica's) is a pooler in transaction mode
    # (pgbouncer): no server-side prepared statement outlives its statement. No effect on
    # SQLite. See store/db.py pooler_connect_args.
    database_pooler: Pooler = Pooler.NONE
    # PostgreSQL only: reads that are not part of a write go there (a mutation's own reads
    # and its payload stay on the primary). Its pool is `pool_size` too.
    database_replica_url: str | None = None

    @model_validator(mode="after")
    def _listen_on_postgresql(self) -> Settings:
        """CONSUMERS_EVENTS_LISTEN_URL is the PostgreSQL server's own address: any other
        value would start, and then fail to LISTEN (a SQLite database has nothing to listen
        to: it notices commits in process and by polling)."""
        if self.events_listen_url is not None and (
                self.is_sqlite or not self.events_listen_url.startswith("postgresql")):
            raise ValueError(
                "CONSUMERS_EVENTS_LISTEN_URL needs PostgreSQL for both the database and the "
                "LISTEN connection: it is the address of the database's own server (behind "
                "a transaction pooler); a SQLite database notices commits without it.")
        return self

    @model_validator(mode="after")
    def _replica_on_postgresql(self) -> Settings:
        if self.database_replica_url is not None and (
                self.is_sqlite or self.database_replica_url.startswith("sqlite")):
            raise ValueError(
                "CONSUMERS_DATABASE_REPLICA_URL needs PostgreSQL for both the database and "
                "the replica: a SQLite file has no replicas (its readers already run "
                "alongside its writer), and a second file would be another database."
            )
        return self

    # -- Workers (`serve --workers N`): processes serving one port, each with its own pools.
    workers: int = Field(default=1, ge=1)
    # `own`: each worker listens on a socket of its own (SO_REUSEPORT), the kernel spreads
    # connections by address (keep-alive clients use every worker), but a hung worker keeps
    # its share; `shared`: one socket, a worker takes connections only when it can. README
    # "Workers".
    worker_sockets: WorkerSockets = WorkerSockets.OWN

    @field_validator("database_url", "database_replica_url", "events_listen_url")
    @classmethod
    def database_url_with_driver(cls, url: str | None) -> str | None:
        """The driver this service runs on, for URLs written without one (as most hosts and
        tools hand them out); any other scheme is refused, naming the ones that work."""
        if url is None:
            return None
        scheme, separator, rest = url.partition("://")
        if not separator:
            raise ValueError("not a database URL (scheme://...)")
        driver = _ASYNC_DRIVERS.get(scheme.lower())
        if driver is None:
            # the scheme is named only when it looks like one (not, say, a password's end)
            named = f" {scheme!r}" if re.fullmatch(r"[a-z][a-z0-9+.-]{0,30}", scheme) else ""
            raise ValueError(
                f"the scheme{named} is not supported: use postgresql+asyncpg:// "
                "(or postgres://, postgresql://) or sqlite+aiosqlite:/// (or sqlite:///)")
        normalised = f"{driver}://{rest}"
        try:
            parsed = make_url(normalised)
        except (ArgumentError, ValueError):
            # SQLAlchemy's message quotes the URL: a password must not reach the terminal
            raise ValueError("not a valid database URL (scheme://user:password@host:port/"
                             "database, the port a number)") from None
        if driver == "postgresql+asyncpg" and "sslmode" in parsed.query:
            # libpq's name, as hosts hand URLs out; asyncpg takes the same modes as `ssl`
            query = {**parsed.query, "ssl": parsed.query["sslmode"]}
            del query["sslmode"]
            normalised = parsed.set(query=query).render_as_string(hide_password=False)
        return normalised

    @property
    def is_production(self) -> bool:
        return self.env is Environment.PRODUCTION

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN_FORM = "scheme://host[:port], e.g. https://app.example.com or http://localhost:5173"
# A host name (or IPv4 address) as a browser serializes it in Origin, lowered: labels of
# letters, digits, '-' and '_'. Anything else (a backslash, a percent-escape, a `;`) could
# never be matched.
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def _origin(entry: str) -> str:
    """`entry` as the Origin header a browser would send for it, or a ValueError saying
    why no browser ever sends it."""
    if not entry:
        raise ValueError(f"an empty entry in the list ({_ORIGIN_FORM}, comma-separated)")
    if not entry.isascii():
        raise ValueError(f"{entry!r}: write the host in its ASCII (punycode, xn--) form, as "
                         "browsers send it")
    if any(character.isspace() for character in entry):
        raise ValueError(f"{entry!r} is not an origin: it holds a space (origins are separated "
                         f"by commas; {_ORIGIN_FORM})")
    try:
        parsed = urlsplit(entry)
    except ValueError:  # an unclosed IPv6 bracket
        raise ValueError(f"{entry!r} is not an origin: the host is not an IPv6 address in "
                         f"brackets nor a name ({_ORIGIN_FORM})") from None
    scheme, rest = parsed.scheme.lower(), entry.partition("://")[2]
    if scheme not in _DEFAULT_PORTS or not rest:
        raise ValueError(f"{entry!r} is not an origin: http:// or https:// and a host "
                         f"({_ORIGIN_FORM})")
    if parsed.path or parsed.query or parsed.fragment or entry.endswith(("?", "#")):
        raise ValueError(f"{entry!r} is not an origin: no path, not even a trailing slash "
                         f"({_ORIGIN_FORM})")
    host = (parsed.hostname or "").lower()
    if "@" in parsed.netloc:
        raise ValueError(f"{entry!r} is not an origin: no user or password ({_ORIGIN_FORM})")
    if not host:
        raise ValueError(f"{entry!r} is not an origin: the host is missing ({_ORIGIN_FORM})")
    if "*" in host:
        raise ValueError(f"{entry!r}: wildcard hosts are not supported; list each origin, or "
                         "use `*` alone for every origin")
    if ":" in host:
        host = _ipv6_as_browsers_write_it(entry, host)
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{entry!r} is not an origin: a host holds only letters, digits, "
                         f"'-', '_' and '.' ({_ORIGIN_FORM})")
    try:
        port = parsed.port
    except ValueError:
        raise ValueError(f"{entry!r} is not an origin: the port must be a number from 1 to "
                         "65535") from None
    if port == 0:
        raise ValueError(f"{entry!r} is not an origin: the port must be from 1 to 65535")
    shown_host = f"[{host}]" if ":" in host else host  # IPv6
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{shown_host}"
    return f"{scheme}://{shown_host}:{port}"


def _ipv6_as_browsers_write_it(entry: str, host: str) -> str:
    """`host`, an IPv6 address, serialized as the URL standard does (hex pieces, the first
    longest run of two or more zero pieces as `::`), whatever notation `entry` used."""
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        address = None
    if address is None or address.scope_id:
        raise ValueError(f"{entry!r} is not an origin: the host is not an IPv6 address "
                         f"(without a zone) nor a name ({_ORIGIN_FORM})")
    pieces = [int.from_bytes(address.packed[i:i + 2]) for i in range(0, 16, 2)]
    start, length = 0, 0
    for i in range(8):
        run = next((j for j in range(i, 8) if pieces[j]), 8) - i
        if run > max(length, 1):
            start, length = i, run
    hexed = [f"{piece:x}" for piece in pieces]
    if not length:
        return ":".join(hexed)
    return ":".join(hexed[:start]) + "::" + ":".join(hexed[start + length:])


def _redis_url_problem(url: str) -> str | None:
    parsed = urlsplit(url)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        return "not a Redis URL: the scheme must be redis://, rediss:// or unix://"
    try:
        port = parsed.port
    except ValueError:
        return "not a valid Redis URL: the port is not a number"
    if parsed.scheme == "unix":
        return None if parsed.path else "not a valid Redis URL: unix:// needs a socket path"
    if not parsed.hostname:
        return "not a valid Redis URL: no host"
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        return "not a valid Redis URL: the database (the path) must be a number"
    del port
    return None


# Schemes accepted for CONSUMERS_DATABASE_URL, and the async driver each runs on.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}
# CONSUMERS_* variables that are not settings: the tests' own, and the client-side ones the
# README's examples export (the API's address and a key, for curl and a BFF).
_NOT_SETTINGS = re.compile(r"CONSUMERS_(TEST_.*|DIFFERENTIAL_EXAMPLES|KEY|API)")
# Values never repeated in a message: secrets, and URLs (which may carry a password).
_SECRET_NAME = re.compile(r"url|pepper|secret|password|token", re.IGNORECASE)


def variable(field: str) -> str:
    """The environment variable of a setting (the standard OTEL_* ones read under their own
    names: the first of their aliases)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return ENV_PREFIX + field.upper()


def known_variables() -> set[str]:
    return {variable(name) for name in Settings.model_fields}  # OTEL_* ones never warned of


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for every CONSUMERS_* variable no setting reads (a typo, a removed setting),
    with the closest known name when there is one."""
    known = known_variables()
    warnings = []
    for name in sorted(environ):
        upper = name.upper()
        if (not upper.startswith(ENV_PREFIX) or upper in known
                or _NOT_SETTINGS.fullmatch(upper)):
            continue
        # compared without the prefix, which every name shares
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX),
                                          [k.removeprefix(ENV_PREFIX) for k in known], n=1)
        hint = (f"; did you mean {ENV_PREFIX}{close[0]}?" if close
                else " (the README's Configuration lists every setting)")
        warnings.append(f"Warning: {name} is not a setting of consumers-graphql, ignored{hint}")
    return warnings


def describe_invalid(error: ValidationError) -> list[str]:
    """One line per bad setting: its variable, what is wrong, what to do. A value is repeated
    only when it is not a secret or a URL."""
    lines = []
    for problem in error.errors(include_url=False):
        field = str(problem["loc"][0]) if problem["loc"] else ""
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not field:  # a rule between settings: its message names them
            lines.append(f"Configuration error: {message}")
            continue
        name = variable(field) if field in Settings.model_fields else "a CONSUMERS_* variable"
        shown = _shown_value(field, problem.get("input"))
        lines.append(f"Configuration error: {name}{shown}: {message}. Set it to a valid value "
                     f"or unset it (the README's Configuration lists every setting).")
    return lines


def describe_unparsable(message: str) -> str:
    """pydantic-settings' own error (a complex value that is not JSON) names the field."""
    found = re.search(r'field "(\w+)"', message)
    name = variable(found.group(1)) if found else "a CONSUMERS_* variable"
    return (f"Configuration error: {name} could not be read (a list or object is written "
            f"as JSON). Set it to a valid value or unset it.")


def _shown_value(field: str, value: Any) -> str:
    info = Settings.model_fields.get(field)
    secret = info is not None and "SecretStr" in str(info.annotation)
    if secret or _SECRET_NAME.search(field) or not isinstance(value, str | int | float) or (
            isinstance(value, str) and len(value) > 80):
        return ""
    return f"={value!r}" if isinstance(value, str) else f"={value}"
