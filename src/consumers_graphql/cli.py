"""The ``consumers-graphql`` command: serve, migrate, seed, export-schema."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from consumers_graphql.settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from consumers_graphql.app import create_app

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = settings.model_copy(update=overrides)
    problem = asyncio.run(_prepare_database(settings))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    # Uvicorn drains requests on SIGTERM, then raises the signal again for the previous
    # handler: make that a clean exit, since a requested graceful stop is a success.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=False,
        server_header=False,
    )
    return 0


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


async def _prepare_database(settings: Settings) -> str | None:
    """Migrate an empty database; refuse to serve one that is behind the code."""
    from consumers_graphql.db import make_engine
    from consumers_graphql.migrate import current_revision, head_revision, upgrade

    engine = make_engine(settings, writer=True)
    try:
        current = await current_revision(engine)
        if current is None:
            await upgrade(engine)
            print(f"Created the database schema (revision {head_revision()}).", flush=True)
        elif current != head_revision():
            return (
                f"The database is at schema revision {current}, this version needs "
                f"{head_revision()}: run `consumers-graphql migrate` first."
            )
        return None
    finally:
        await engine.dispose()


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from consumers_graphql.db import make_engine
    from consumers_graphql.migrate import current_revision, upgrade

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

    from consumers_graphql.db import make_engine
    from consumers_graphql.migrate import upgrade
    from consumers_graphql.seed import seed

    async def run() -> None:
        engine = make_engine(settings, writer=True)
        try:
            await upgrade(engine)
            with tqdm(total=args.consumers, unit=" consumers", disable=args.quiet) as bar:
                report = await seed(
                    engine, args.consumers, random_seed=args.random_seed, progress=bar.update
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

    sdl = build_schema().as_str() + "\n"
    if args.output is None:
        sys.stdout.write(sdl)
    else:
        Path(args.output).write_text(sdl, encoding="utf-8")
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="consumers-graphql",
        description="GraphQL (and REST) API over Consumers data. Configured by CONSUMERS_* "
        "environment variables, e.g. CONSUMERS_DATABASE_URL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (migrates an empty database)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.add_argument("--revision", default="head", help="target revision (default head)")
    migrate.set_defaults(handler=_migrate)

    seed = commands.add_parser("seed", help="add realistic demo data")
    seed.add_argument("--consumers", type=_positive, default=1_000,
                      help="how many consumers to add (default 1000)")
    seed.add_argument("--random-seed", type=int, default=None,
                      help="make the data reproducible")
    seed.add_argument("--quiet", action="store_true", help="no progress bar")
    seed.set_defaults(handler=_seed)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.add_argument("--output", "-o", help="write to this file instead of stdout")
    export.set_defaults(handler=_export_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args, Settings()))


if __name__ == "__main__":
    sys.exit(main())
