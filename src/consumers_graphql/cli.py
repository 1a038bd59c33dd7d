"""The ``consumers-graphql`` command: serve, keys, migrate, seed, assets, documents,
export-schema."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import logging.config
import math
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from consumers_graphql.errors import ConfigurationError
from consumers_graphql.settings import (
    Settings,
    describe_invalid,
    describe_unparsable,
    unknown_variables,
)

if TYPE_CHECKING:
    from consumers_graphql.store.db import Database
    from consumers_graphql.store.keys import KeyInfo, KeyStore
    from consumers_graphql.web.connections import ConnectionLimits

# A configuration that cannot work: a bad or missing setting, an unreachable database, a
# schema behind the code (argparse uses it for bad arguments too).
EXIT_CONFIGURATION = 2
# How long `serve --workers N` waits for a new worker to be serving (a SIGHUP restart waits
# for that before stopping the old one): uvicorn's 5 s is less than a worker takes to start
# on a busy 2-core machine (importing and building the app), and a restart gave up. A
# running worker's health ping keeps uvicorn's 5 s: the parent handles no signal (SIGTERM
# included) while it waits for one.
WORKER_STARTUP_S = 30


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.store.db import replica_problem
    from consumers_graphql.web import tracing, ui_assets
    from consumers_graphql.web.connections import ConnectionLimits
    from consumers_graphql.web.logs import log_config
    from consumers_graphql.web.workers import check_address

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port),
                                    ("workers", args.workers)) if v is not None}
    settings = settings.model_copy(update=overrides)
    # What can be refused is checked before anything is made (a schema, a first key).
    check_address(settings.host, settings.port)  # before the schema and the first key
    assets_problem = ui_assets.check(settings)
    if assets_problem:
        raise ConfigurationError(assets_problem)
    tracing.check(settings)
    replica = asyncio.run(replica_problem(settings))
    if replica:
        raise ConfigurationError(replica)
    # From here on, what `serve` has to say goes through its logging (JSON lines when
    # CONSUMERS_LOG_FORMAT=json), as the server's own lines will.
    logging.config.dictConfig(log_config(settings.log_level, settings.effective_log_format))
    log = logging.getLogger("consumers_graphql")
    problem = asyncio.run(_prepare_database(settings, note=log.info))
    if problem:
        raise ConfigurationError(problem)
    notice = ui_assets.notice(settings)
    if notice:
        log.warning(notice)
    asyncio.run(_create_first_key(settings))
    limits = ConnectionLimits.for_settings(settings)
    if limits.max_connections < settings.max_connections:
        per_process = " per worker" if settings.workers > 1 else ""
        log.warning(f"At most {limits.max_connections} client connections{per_process}, not "
                    f"{settings.max_connections}: the process may open only "
                    f"{resource.getrlimit(resource.RLIMIT_NOFILE)[0]} files (ulimit -n).")
    # Before the app: it chooses how prometheus-client keeps its numbers, before anything
    # imports it (and serves them on CONSUMERS_METRICS_PORT, summed over the workers).
    from consumers_graphql.web import metrics

    try:
        metrics.setup_parent(settings)
    except OSError as error:
        raise ConfigurationError(
            f"Cannot serve /metrics on port {settings.metrics_port} (CONSUMERS_METRICS_PORT): "
            f"{error.strerror or error}.") from error
    if settings.workers > 1:
        return _serve_workers(settings, limits)

    import uvicorn

    from consumers_graphql.web.app import create_app, tune_gc

    # Uvicorn drains requests on SIGTERM and SIGINT, then raises the signal again for the
    # previous handler: make that a clean exit, since a requested graceful stop is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    app = create_app(settings)
    tune_gc()
    uvicorn.run(app, http=limits.protocol(), **_server_options(settings, limits))
    return 0


def _server_options(settings: Settings, limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn's options for one serving process, a single `serve` or each worker."""
    from consumers_graphql.settings import HttpProtocol
    from consumers_graphql.web.logs import log_config

    return {
        # httptools' protocol on uvloop (uvicorn's "auto": asyncio's own loop where uvloop
        # is not installed); h11's, the pure-Python fallback, on asyncio's loop
        "loop": "asyncio" if limits.http is HttpProtocol.H11 else "auto",
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config(settings.log_level, settings.effective_log_format),
        "access_log": False,  # web/access_log.py writes one line per request instead
        "proxy_headers": False,
        "server_header": False,
        "backlog": limits.backlog,
        "timeout_keep_alive": math.ceil(limits.idle_s),  # the protocol keeps the exact value
        # Requests still running after the grace period are cancelled: a hung one must not
        # keep the process from stopping.
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        # WebSockets (subscriptions): websockets' sans-I/O protocol, a ping every interval
        # and the socket closed when its pong is that late, messages no larger than a body.
        "ws": "websockets-sansio",
        "ws_ping_interval": settings.websocket_ping_interval_s,
        "ws_ping_timeout": settings.websocket_ping_interval_s,
        "ws_max_size": settings.max_body_bytes,
    }


def _serve_workers(settings: Settings, limits: ConnectionLimits) -> int:
    """`serve --workers N`: this process holds the address and uvicorn's process manager
    spawns N workers, each listening on a socket of its own there (`OwnSocket`; or on the
    parent's, CONSUMERS_WORKER_SOCKETS=shared) and building
    its own app (`_worker_app`) with these settings, pickled to it, command-line overrides
    included. It replaces a worker that dies, restarts them
    all on SIGHUP (each replacement ready before the one it replaces stops), adds one on
    SIGTTIN, removes one on SIGTTOU, and on SIGTERM or SIGINT stops them all, each draining
    its requests within the grace period."""
    import uvicorn

    from consumers_graphql.settings import WorkerSockets
    from consumers_graphql.web.workers import OwnSocket, Workers, reserve_port, shared_socket

    config = uvicorn.Config(
        functools.partial(_worker_app, settings), factory=True, workers=settings.workers,
        http=limits.protocol_factory(),  # type: ignore[arg-type]  # uvicorn calls it, a class or not
        **_server_options(settings, limits),
    )
    own = settings.worker_sockets == WorkerSockets.OWN
    if own:
        reserved = reserve_port(settings.host, settings.port)
    else:
        reserved = shared_socket(settings.host, settings.port, limits.backlog)
    host, port = reserved.getsockname()[:2]
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
        f"[{host}]" if ":" in host else host, port)
    # own: each worker binds a socket of its own to the address (see OwnSocket)
    sockets = [OwnSocket(host, port)] if own else [reserved]
    supervisor = Workers(config, sockets=sockets,  # type: ignore[arg-type]  # OwnSocket: a socket once in the worker
                         startup_s=WORKER_STARTUP_S)
    try:
        supervisor.run()
    finally:
        reserved.close()
    if supervisor.startup_failed:
        print("A worker could not start (its error is above): stopped.", file=sys.stderr)
        return EXIT_CONFIGURATION
    return 128 + signal.SIGINT if supervisor.stopped_by == signal.SIGINT else 0


def _worker_app(settings: Settings) -> Any:
    """Runs in each worker process: its app, or uvicorn's start-up failure exit, which stops
    the parent instead of restarting a worker that would fail the same way."""
    from uvicorn.config import STARTUP_FAILURE

    from consumers_graphql.web.app import worker_app

    try:
        return worker_app(settings)
    except ConfigurationError as error:
        print(error, file=sys.stderr, flush=True)
    except Exception:
        logging.getLogger("consumers_graphql").exception("the app could not be built")
    sys.exit(STARTUP_FAILURE)


def _leave_stuck_work(code: int) -> None:
    """Work cancelled at the end of the grace period can still be unwinding: a statement it
    started goes on on the driver's thread (a SQLite write waiting out its busy timeout,
    which no interrupt ends), and asyncio.run would wait for it before the process exits.
    Uvicorn has finished its shutdown when this runs: exit without it; what it had not
    committed the database rolls back."""
    try:
        current = asyncio.current_task()
        stuck = [task for task in asyncio.all_tasks() if task is not current]
    except RuntimeError:  # no loop running
        return
    if not stuck:
        return
    logging.getLogger("consumers_graphql").warning(
        "stopping with %d task(s) still waiting for the database", len(stuck))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    from consumers_graphql.web import metrics

    metrics.cleanup()  # os._exit runs no exit handler
    os._exit(code)


async def _create_first_key(settings: Settings) -> None:
    """On a database without any key, make one and show its secret, this once. Not in
    production: what a server prints there goes to a log collector, and no secret may."""
    from consumers_graphql.store.db import Database

    database = Database(settings)
    try:
        keys = _key_store(database)
        if settings.is_production:
            if not any(key.revoked_at is None for key in await keys.list_keys()):
                logging.getLogger("consumers_graphql").warning(
                    "No API key can be used yet, so every request is refused: create one with "
                    "`consumers-graphql keys create --name NAME` (in production `serve` prints "
                    "no secret).")
            return
        created = await keys.create_first()
    finally:
        await database.dispose()
    if created is None:
        return
    secret = created.secret.get_secret_value()
    host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(settings.host, settings.host)
    url = f"http://{host}:{settings.port}/graphql"
    query = '{"query": "{ consumers(first: 1) { totalCount } }"}'
    print(
        f"\nCreated the first API key, {created.info.id} ({_scopes(created.info)}). "
        f"Its secret is shown only this once; keep it somewhere safe:\n\n"
        f"    {secret}\n\n"
        f"Send it with every request:\n"
        f"    curl {url} -H 'Authorization: Bearer {secret}' \\\n"
        f"      -H 'Content-Type: application/json' -d '{query}'\n"
        f"In GraphiQL ({url}), paste this into the Headers panel:\n"
        f'    {{"Authorization": "Bearer {secret}"}}\n'
        f"More keys: consumers-graphql keys create --name NAME [--read-only]\n",
        flush=True,
    )


def _exit_cleanly(signum: int, _frame: object) -> None:
    # Ctrl-C exits 130 (128 + SIGINT), as shells report an interrupted command.
    code = 128 + signal.SIGINT if signum == signal.SIGINT else 0
    _leave_stuck_work(code)
    raise SystemExit(code)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _prepare_database(
    settings: Settings, note: Callable[[str], None] = _to_stderr
) -> str | None:
    """Migrate an empty database; refuse to serve one that is behind the code."""
    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.migrate import (
        current_revision,
        head_revision,
        is_behind,
        upgrade,
    )

    engine = make_engine(settings, writer=True)
    try:
        current = await current_revision(engine)
        if current is None:
            await upgrade(engine)
            # on stderr: stdout is for what a command is asked for (`keys create
            # --secret-only` prints the secret alone, for a script to capture)
            note(f"Created the database schema (revision {head_revision()}).")
        elif is_behind(current):
            return (
                f"The database is at schema revision {current}, this version needs "
                f"{head_revision()}: run `consumers-graphql migrate` first."
            )
        elif current != head_revision():
            note(f"The database is at schema revision {current}, newer than this version's "
                 f"{head_revision()}: serving it (migrations are backward-compatible).")
        return None
    finally:
        await engine.dispose()


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.migrate import current_revision, upgrade

    async def run() -> str | None:
        engine = make_engine(settings, writer=True)
        try:
            await upgrade(engine, args.revision)
            return await current_revision(engine)
        finally:
            await engine.dispose()

    print(f"Database at schema revision {asyncio.run(run())}.")
    return 0


def _seed(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.migrate import upgrade
    from consumers_graphql.store.seed import seed

    async def run() -> None:
        engine = make_engine(settings, writer=True)
        try:
            await upgrade(engine)
            with tqdm(total=args.consumers, unit=" consumers", disable=args.quiet) as bar:
                report = await seed(
                    engine, args.consumers, random_seed=args.random_seed, progress=bar.update,
                    orders_per_consumer=args.orders_per_consumer,
                    audiences_per_consumer=args.audiences_per_consumer,
                )
        finally:
            await engine.dispose()
        print(
            f"Added {report.consumers:,} consumers, {report.orders:,} orders and "
            f"{report.memberships:,} memberships in {report.audiences} audiences."
        )

    asyncio.run(run())
    return 0


def _export_schema(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.api.schema import build_schema

    schema = build_schema()
    sdl = (schema.as_str() if args.federation else schema.public_sdl()) + "\n"
    if args.output is None:
        sys.stdout.write(sdl)
    else:
        Path(args.output).write_text(sdl, encoding="utf-8")
    return 0


def _documents_check(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.api.documents import check_documents
    from consumers_graphql.api.limits import Limits
    from consumers_graphql.api.schema import build_schema
    from consumers_graphql.documents import ManifestError, load_manifest

    try:
        documents = load_manifest(Path(args.manifest))
    except ManifestError as error:
        print(f"Cannot check the manifest: {error}.", file=sys.stderr)
        return 1
    problems = check_documents(build_schema(), documents, Limits.from_settings(settings))
    for document_id, message in problems:
        print(f"{document_id}: {message}")
    bad = len({document_id for document_id, _ in problems})
    if bad:
        print(f"{bad} of {len(documents)} documents do not validate against the schema.",
              file=sys.stderr)
        return 1
    print(f"All {len(documents)} documents validate against the schema.")
    return 0


def _assets_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.web import ui_assets

    directory = ui_assets.assets_dir(settings)
    try:
        written = ui_assets.fetch(directory, registry=args.registry or ui_assets.NPM_REGISTRY)
    except ui_assets.FetchFailed as error:
        print(error, file=sys.stderr)
        return 1
    fetched = ", ".join(written) if written else "nothing new"
    print(f"GraphiQL's files are in {directory} ({fetched}): `serve` uses them from now on.")
    return 0


def _key_store(database: Database) -> KeyStore:
    from consumers_graphql.store.keys import KeyStore

    return KeyStore(database.primary_engine, database.write_engine, database.settings.key_pepper)


def _scopes(info: KeyInfo) -> str:
    from consumers_graphql.store.keys import format_scopes

    return format_scopes(info.scopes)


def _when(moment: datetime | None, default: str) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ") if moment is not None else default


def _run_with_keys(settings: Settings, job: Callable[[KeyStore], Awaitable[int]]) -> int:
    from consumers_graphql.store.db import Database

    problem = asyncio.run(_prepare_database(settings))
    if problem:
        raise ConfigurationError(problem)

    async def run() -> int:
        database = Database(settings)
        try:
            return await job(_key_store(database))
        finally:
            await database.dispose()

    return asyncio.run(run())


def _keys_create(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.store.keys import READ_ONLY, READ_WRITE, RateLimit

    async def job(keys: KeyStore) -> int:
        try:
            rate_limit = None
            if args.rate_limit_capacity is not None or args.rate_limit_restore_rate is not None:
                # One given: the other stays the server's setting, read by the server (this
                # process's environment need not be the server's).
                rate_limit = RateLimit(args.rate_limit_capacity, args.rate_limit_restore_rate)
            created = await keys.create(
                args.name, scopes=READ_ONLY if args.read_only else READ_WRITE, test=args.test,
                rate_limit=rate_limit,
            )
        except ValueError as error:
            print(error, file=sys.stderr)
            return 1
        secret = created.secret.get_secret_value()
        if args.secret_only:  # for scripts: KEY=$(consumers-graphql keys create ... --secret-only)
            print(secret, flush=True)
            return 0
        print(
            f"Created API key {created.info.id} \"{created.info.name}\" "
            f"({_scopes(created.info)}). Its secret is shown only this once:\n\n"
            f"    {secret}\n\n"
            f"Send it as the header  Authorization: Bearer {secret}",
            flush=True,
        )
        return 0

    return _run_with_keys(settings, job)


def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    async def job(keys: KeyStore) -> int:
        found = await keys.list_keys()
        if not found:
            print("No API keys. Create one: consumers-graphql keys create --name NAME")
            return 0
        header = ("ID", "NAME", "PREFIX", "SCOPES", "CREATED", "LAST USED", "REVOKED",
                  "RATE LIMIT")
        rows = [header] + [
            (k.id, k.name, k.prefix + "…", _scopes(k), _when(k.created_at, ""),
             _when(k.last_used_at, "never"), _when(k.revoked_at, "-"),
             str(k.rate_limit) if k.rate_limit is not None else "default")
            for k in found
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                  .rstrip())
        return 0

    return _run_with_keys(settings, job)


def _keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.store.keys import RevokeOutcome

    async def job(keys: KeyStore) -> int:
        outcome, info = await keys.revoke(args.id)
        if outcome is RevokeOutcome.NOT_FOUND or info is None:
            print(f"No API key has the id {args.id!r} (see `consumers-graphql keys list`).",
                  file=sys.stderr)
            return 1
        if outcome is RevokeOutcome.ALREADY_REVOKED:
            print(f"{info.id} \"{info.name}\" was already revoked "
                  f"({_when(info.revoked_at, '')}).")
            return 0
        print(f"Revoked {info.id} \"{info.name}\": requests with it now get 401.")
        return 0

    return _run_with_keys(settings, job)


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError("must be from 0 to 65535")
    return number


def _rate(value: str) -> float:
    from consumers_graphql.store.keys import RATE_LIMIT_CAPACITY_MAX, RATE_LIMIT_RESTORE_MIN

    number = float(value)
    if not RATE_LIMIT_RESTORE_MIN <= number <= RATE_LIMIT_CAPACITY_MAX:
        raise argparse.ArgumentTypeError(
            f"must be {RATE_LIMIT_RESTORE_MIN:g} to {RATE_LIMIT_CAPACITY_MAX:,}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def _default(settings: Settings, name: str) -> str:
    """The default in effect, and the variable that set it if one did."""
    value = getattr(settings, name)
    if name in settings.model_fields_set:
        return f"default {value}, from CONSUMERS_{name.upper()}"
    return f"default {value}"


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    """``settings``: whose host and port `serve --help` shows (the built-in ones if None)."""
    settings = settings if settings is not None else Settings.model_construct()
    parser = argparse.ArgumentParser(
        prog="consumers-graphql",
        description="GraphQL (and REST) API over Consumers data. Configured by CONSUMERS_* "
        "environment variables, e.g. CONSUMERS_DATABASE_URL.",
    )
    parser.add_argument("--version", action="version",
                        version=f"consumers-graphql {version('consumers-graphql')}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (migrates an empty database)")
    serve.add_argument("--host", help=f"interface to listen on ({_default(settings, 'host')})")
    serve.add_argument("--port", type=_port,
                       help=f"port to listen on ({_default(settings, 'port')})")
    serve.add_argument("--workers", type=_at_least_one,
                       help="processes serving the port, about one per core "
                       f"({_default(settings, 'workers')})")
    serve.set_defaults(handler=_serve)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key and print its secret, once")
    create.add_argument("--name", required=True, help="what the key is for, e.g. the app")
    create.add_argument("--read-only", action="store_true",
                        help="scope read only: mutations are refused (default: read write)")
    create.add_argument("--test", action="store_true",
                        help="an sk_test_ key instead of sk_live_ (a label; same access)")
    create.add_argument("--secret-only", action="store_true",
                        help="print the secret alone, for scripts: "
                        "KEY=$(consumers-graphql keys create --name N --secret-only)")
    create.add_argument("--rate-limit-capacity", type=_positive, metavar="POINTS",
                        help="this key's bucket of cost points, 0 for unlimited "
                        f"({_default(settings, 'rate_limit_capacity')})")
    create.add_argument("--rate-limit-restore-rate", type=_rate, metavar="POINTS_PER_S",
                        help="points this key gets back per second "
                        f"({_default(settings, 'rate_limit_restore_rate')})")
    create.set_defaults(handler=_keys_create)
    listing = key_commands.add_parser("list", help="every key, without secrets")
    listing.set_defaults(handler=_keys_list)
    revoke = key_commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("id", help="the key's id (key_…), from `keys list`")
    revoke.set_defaults(handler=_keys_revoke)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.set_defaults(handler=_migrate)

    seed = commands.add_parser("seed", help="add realistic demo data")
    seed.add_argument("--consumers", type=_positive, default=1_000,
                      help="how many consumers to add (default 1000)")
    seed.add_argument("--random-seed", type=int, default=None,
                      help="make the data reproducible")
    seed.add_argument("--orders-per-consumer", type=_positive, default=None,
                      help="exactly this many orders each (default: 0 to 5, 2 on average)")
    seed.add_argument("--audiences-per-consumer", type=int, default=None, choices=range(9),
                      metavar="{0..8}",
                      help="exactly this many audience memberships each, at most 8 "
                      "(default: each of the 8 audiences with a 30%% chance)")
    seed.add_argument("--quiet", action="store_true", help="no progress bar")
    seed.set_defaults(handler=_seed)

    assets = commands.add_parser("assets", help="GraphiQL's scripts, served from here")
    asset_commands = assets.add_subparsers(dest="assets_command", required=True)
    fetch = asset_commands.add_parser(
        "fetch", help="download the pinned graphiql, react and react-dom from the npm registry "
        "(each checked against its pinned sha512) into CONSUMERS_UI_ASSETS_DIR")
    fetch.add_argument("--registry", default=None,
                       help="an npm registry mirror (default https://registry.npmjs.org)")
    fetch.set_defaults(handler=_assets_fetch)

    documents = commands.add_parser("documents", help="trusted documents manifests")
    document_commands = documents.add_subparsers(dest="documents_command", required=True)
    check = document_commands.add_parser(
        "check", help="validate every document of a manifest (Relay's persisted_queries.json "
        "or Apollo's persisted query manifest) against the schema and the limits "
        "(CONSUMERS_MAX_*); exit 1 on any problem")
    check.add_argument("manifest", help="the manifest's path")
    check.set_defaults(handler=_documents_check)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.add_argument(
        "--federation", action="store_true",
        help="the Apollo Federation v2 subgraph SDL (what `_service { sdl }` answers: @link, "
        "@key, _entities, _service) instead of the public schema")
    export.set_defaults(handler=_export_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for warning in unknown_variables(os.environ):
        print(warning, file=sys.stderr)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as error:
        build_parser().parse_args(argv)  # --help and --version still answer
        lines = (describe_invalid(error) if isinstance(error, ValidationError)
                 else [describe_unparsable(str(error))])
        print("\n".join(lines), file=sys.stderr)
        return EXIT_CONFIGURATION
    args = build_parser(settings).parse_args(argv)
    from consumers_graphql.store.outage import explain_unreachable, missing_sqlite_directory

    missing = missing_sqlite_directory(settings.database_url)
    if missing and args.command not in ("export-schema", "documents"):
        print(missing, file=sys.stderr)
        return EXIT_CONFIGURATION
    try:
        return int(args.handler(args, settings))
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIGURATION
    except Exception as error:
        explained = explain_unreachable(error, settings.database_url)
        if explained is None:
            raise
        print(explained, file=sys.stderr)
        return EXIT_CONFIGURATION


if __name__ == "__main__":
    sys.exit(main())
