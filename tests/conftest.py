"""Test fixtures: the app on a real database, a SQLite file by default, PostgreSQL when
CONSUMERS_TEST_DATABASE_URL names a server (a fresh database is created per run)."""

from __future__ import annotations

import asyncio
import os
import types
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from consumers_graphql.api import executor
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.events import EVENTS_EXECUTION_OPTION, PRUNE_EXECUTION_OPTION
from consumers_graphql.store.keys import AUTH_EXECUTION_OPTION, READ_ONLY, READ_WRITE, Scope
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app
from tests.log_audit import (
    AUDIT,
    asgi_client,
    pytest_configure,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)
from tests.processes import PostgresCluster

# The log of the whole run is checked for personal data and secrets (see log_audit.py).
__all__ = ["pytest_configure", "pytest_sessionfinish", "pytest_terminal_summary",
           "pytest_testnodedown"]

TEST_DATABASE_URL = os.environ.get("CONSUMERS_TEST_DATABASE_URL")
# Where the tests create and drop their databases when the app's URL is a pooler (CI's run
# through pgbouncer): the server itself. Defaults to the app's URL.
ADMIN_DATABASE_URL = os.environ.get("CONSUMERS_TEST_DATABASE_ADMIN_URL") or TEST_DATABASE_URL
# The session app's rate limit: a bucket (and a restore rate) no other test file can empty.
TEST_BUCKET = 1_000_000


# CI's PostgreSQL runs (direct, and through pgbouncer) set this: the tests that touch no
# database are left out there (reported as deselected), having run in the SQLite run already,
# where they do the same work. Without a PostgreSQL URL it changes nothing: that run is the one
# that runs everything.
DATABASE_ONLY = os.environ.get("CONSUMERS_TEST_DATABASE_ONLY") == "1"
# A test touches the database when its fixtures include one of these (the app, its settings,
# its client, the `gql` fixtures and the CLI's environment all request `database_url`), or when
# it is marked `database`: it reaches the run's server another way (`new_database`,
# TEST_DATABASE_URL read directly, a fixture of its module that does).
DATABASE_FIXTURES = frozenset({"database_url", "cluster"})
# What a test that reaches the run's server without those fixtures names in its code (the
# tests read CONSUMERS_TEST_DATABASE_URL through this module, never from the environment).
RUN_DATABASE_NAMES = frozenset({"TEST_DATABASE_URL", "ADMIN_DATABASE_URL", "new_database",
                                "new_migrated_database"})


def touches_database(item: pytest.Item) -> bool:
    return (not DATABASE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ()))
            or item.get_closest_marker("database") is not None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuses a test that names the run's database in its code (or in its fixtures', or in
    the functions of its module and of this directory they call) without a database fixture
    or the `database` marker: with CONSUMERS_TEST_DATABASE_ONLY its PostgreSQL runs would
    be lost silently. Then, in a PostgreSQL run with CONSUMERS_TEST_DATABASE_ONLY=1,
    deselects the tests that touch no database."""
    database_free = [item for item in items if not touches_database(item)]
    unmarked = [item.nodeid for item in database_free if _names_the_run_database(item)]
    if unmarked:
        raise pytest.UsageError(
            "these tests reach the run's database without a database fixture: mark them "
            "`@pytest.mark.database` (tests/conftest.py, DATABASE_ONLY)\n  "
            + "\n  ".join(unmarked))
    if not (DATABASE_ONLY and TEST_DATABASE_URL) or not database_free:
        return
    config.hook.pytest_deselected(items=database_free)
    kept = set(map(id, database_free))
    items[:] = [item for item in items if id(item) not in kept]


def _names_the_run_database(item: pytest.Item) -> bool:
    functions: list[object] = [getattr(item, "function", None)]
    fixtures = getattr(item, "_fixtureinfo", None)  # pytest's own: no public equivalent
    if fixtures is not None:
        functions += [definition.func for definitions in fixtures.name2fixturedefs.values()
                      for definition in definitions]
    return any(_code_names_the_run_database(function) for function in functions)


_NAMING: dict[types.CodeType, bool] = {}


def _code_names_the_run_database(function: object) -> bool:
    """Whether `function`, or a function or class of its module or of this test directory it
    names, names one of RUN_DATABASE_NAMES."""
    if not isinstance(function, types.FunctionType):
        return False
    code = function.__code__
    if code not in _NAMING:
        _NAMING[code] = False  # (recursion: a function that names itself)
        _NAMING[code] = any(_names(code, function.__globals__))
    return _NAMING[code]


def _names(code: types.CodeType, namespace: dict[str, object]) -> Iterator[bool]:
    yield not RUN_DATABASE_NAMES.isdisjoint(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):  # a nested function, a comprehension
            yield from _names(constant, namespace)
    for name in code.co_names:
        value = namespace.get(name)
        module = getattr(value, "__module__", None)
        if isinstance(module, str) and (module == namespace["__name__"]
                                        or module.startswith("tests.")):
            yield from map(_code_names_the_run_database, _functions(value))


def _functions(value: object) -> Iterable[object]:
    return vars(value).values() if isinstance(value, type) else (value,)


def throttle_status(taken: int = 0) -> dict[str, Any]:
    """`extensions.cost.throttleStatus` on the session app, for a fresh key's first request
    that took `taken` points (0: a refused one, which takes nothing)."""
    return {"maximumAvailable": TEST_BUCKET, "currentlyAvailable": TEST_BUCKET - taken,
            "restoreRate": float(TEST_BUCKET)}


TABLES = ("events", "idempotency_keys", "consumer_audiences", "orders", "api_keys", "audiences",
          "consumers")


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """A private PostgreSQL cluster (tests/processes.py), for tests that stop and restart a
    database: never the shared one on 5432."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
async def database_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    if not TEST_DATABASE_URL:
        path = tmp_path_factory.mktemp("db") / "consumers.db"
        yield f"sqlite+aiosqlite:///{path}"
        return
    # A database of our own on the given server, dropped afterwards. Failing to reach the
    # server fails the run: CI must never skip PostgreSQL silently.
    async with new_database("consumers_test") as url:
        yield url


@asynccontextmanager
async def new_database(prefix: str) -> AsyncIterator[str]:
    """A database of its own on the PostgreSQL test server, as the app reaches it (through
    the pooler, if any: its `*` entry serves any database), created and dropped on the
    server directly (ADMIN_DATABASE_URL)."""
    assert TEST_DATABASE_URL and ADMIN_DATABASE_URL
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(make_url(ADMIN_DATABASE_URL), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(TEST_DATABASE_URL).set(database=name).render_as_string(
            hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@asynccontextmanager
async def new_migrated_database(prefix: str) -> AsyncIterator[str]:
    """new_database, with the schema at its latest revision."""
    async with new_database(prefix) as url:
        engine = make_engine(Settings(database_url=url), writer=True)
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        yield url


@pytest.fixture(scope="session")
async def settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A pepper, so every test also proves that keys are hashed with it consistently. A wide
    # budget for SQLite reads on the loop: statement counts are exact, and a read over the
    # default 2 ms of CPU (a loaded machine) would be sent twice, inline and then on the
    # driver's thread; test_sqlite_driver covers that hand-over.
    # GraphiQL's files from an empty folder: the page takes them from the CDN, whatever this
    # machine's user has fetched (tests/test_ui_assets.py covers the local mode).
    # Rate limits on (every answer shows its throttle status), but a bucket no test empties
    # by accident (tests/test_rate_limits.py gives its keys small ones of their own).
    settings = Settings(database_url=database_url, key_pepper="test-pepper",  # type: ignore[arg-type]
                        sqlite_inline_read_ms=1_000, ui_assets=None,
                        ui_assets_dir=tmp_path_factory.mktemp("no-ui-assets"),
                        rate_limit_capacity=TEST_BUCKET, rate_limit_restore_rate=TEST_BUCKET)
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    return settings


@pytest.fixture(scope="session")
def dialect(settings: Settings) -> str:
    return "sqlite" if settings.is_sqlite else "postgresql"


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with LifespanManager(app):
        yield app


@pytest.fixture(scope="session")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


@pytest.fixture(autouse=True)
async def clean_database(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every test starts from empty tables (the schema stays)."""
    if "app" not in request.fixturenames:
        yield
        return
    app: FastAPI = request.getfixturevalue("app")
    yield
    await empty_tables(app.state.database.write_engine)


async def empty_tables(engine: Any) -> None:
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        else:
            for table in TABLES:
                await conn.execute(text(f"DELETE FROM {table}"))


# pgbouncer 1.18 (Debian 12's) can exit with "FATAL ... disconnect_client(): bad client
# state: 0" when the client of a cancel request closes it before the server has answered
# (pgbouncer issue 801, fixed since): asyncpg does so when it drops a connection whose
# statement it is cancelling. Below 1.21, the release the README asks for, these tests are
# skipped; CI sets the version for its run through pgbouncer.
PGBOUNCER_VERSION = os.environ.get("CONSUMERS_TEST_PGBOUNCER_VERSION")


def _pooler_crashes_on_cancel() -> bool:
    if not PGBOUNCER_VERSION:
        return False
    major, minor, *_ = (int(part) for part in PGBOUNCER_VERSION.split("."))
    return (major, minor) < (1, 21)


@pytest.fixture(autouse=True)
def statements_cancelled_only_where_the_pooler_survives_it(
    request: pytest.FixtureRequest,
) -> None:
    if (request.node.get_closest_marker("cancels_statements") is not None
            and _pooler_crashes_on_cancel()):
        pytest.skip(f"cancels statements: pgbouncer {PGBOUNCER_VERSION} can crash on a "
                    "cancel request (issue 801); runs in the direct PostgreSQL run")


# Every GraphQL test runs twice: through the compiled executor, and through graphql-core
# alone (the path of every fallback: directives, introspection, any error). "compiled"
# takes the direct path for the queries it can answer (Schema.execute_ready), Strawberry's
# `execute` for the rest; the differential tests also compare THROUGH_EXECUTE, the compiled
# executor always reached through `execute`.
EXECUTION_PATHS = ("compiled", "graphql-core")
THROUGH_EXECUTE = "compiled through execute"


def on_path(app: FastAPI, execution_path: str) -> None:
    """Sends the app's GraphQL operations down ``execution_path``."""
    app.state.schema.compiled = execution_path != "graphql-core"
    app.state.schema.direct = execution_path == "compiled"


@pytest.fixture(params=EXECUTION_PATHS)
def execution_path(request: pytest.FixtureRequest, app: FastAPI) -> Iterator[str]:
    """The path the session app executes this test's GraphQL operations on (the ``gql``
    fixtures request it, so every test using them runs on both)."""
    path: str = request.param
    before = dict(executor.stats)
    on_path(app, path)
    try:
        yield path
    finally:
        on_path(app, "compiled")
    if path == "graphql-core":
        # not one operation went near the compiled executor, not even to fall back
        assert executor.stats == before, "the graphql-core variant ran the compiled executor"


@pytest.fixture(autouse=True)
def graphql_runs_on_both_paths(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that executes GraphQL without ``execution_path`` fails: it would check only
    one of the two paths. (Tests that compare the two themselves are marked so.)"""
    if ("execution_path" in request.fixturenames
            or request.node.get_closest_marker("compares_paths") is not None):
        yield
        return
    before = dict(executor.stats)
    yield
    assert executor.stats == before, (
        "this test executes GraphQL: request the `execution_path` fixture (or a `gql` "
        "fixture) so that it runs on both execution paths"
    )


class GraphQL:
    """Posts operations to /graphql and returns the JSON body; authenticated with ``secret``
    (a Bearer key) unless it is None."""

    def __init__(self, client: httpx.AsyncClient, secret: str | None = None) -> None:
        self.client = client
        self.headers: dict[str, str] = bearer(secret) if secret is not None else {}

    async def __call__(
        self, query: str, variables: dict[str, Any] | None = None, *, status: int = 200
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/graphql", json={"query": query, "variables": variables or {}},
            headers=self.headers,
        )
        assert response.status_code == status, response.text
        body: dict[str, Any] = response.json()
        return body

    async def data(self, query: str, variables: dict[str, Any] | None = None) -> Any:
        body = await self(query, variables)
        assert "errors" not in body, body["errors"]
        return body["data"]


def checked_out(app: FastAPI) -> int:
    """Connections of the read pool in use by requests (none once every request has
    answered): out of the pool, but those kept for a next request (store/db.py, Lending),
    which go back by themselves once no request has come for LENDING_GRACE_S."""
    lending = app.state.database.lending
    kept = lending.kept if lending is not None else 0
    pool = app.state.database.read_engine.sync_engine.pool
    return int(pool.checkedout()) - kept if hasattr(pool, "checkedout") else 0


async def kept_returned(app: FastAPI) -> None:
    """Once the connections kept for a next request (store/db.py, Lending) have gone back
    to the pool, LENDING_GRACE_S after the last request ended (5 s at most)."""
    lending = app.state.database.lending
    for _ in range(250):
        if lending is None or not (lending.kept or lending.returning):
            return
        await asyncio.sleep(0.02)


async def lock_waiters(conn: Any, expected: int,
                       stop: asyncio.Future[Any] | None = None) -> list[int]:
    """The backends (PostgreSQL) of the statements waiting on a lock, but `conn`'s own,
    once `expected` wait or `stop` is done (bounded: a statement reaches its lock in
    milliseconds)."""
    waiting: list[int] = []
    for _ in range(500):
        # pg_stat_activity is a snapshot kept for the transaction: take a new one
        await conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        waiting = list((await conn.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"))).scalars())
        if len(waiting) >= expected or (stop is not None and stop.done()):
            break
        await asyncio.sleep(0.02)
    return waiting


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def _new_key(app: FastAPI, name: str, scopes: frozenset[Scope]) -> str:
    created = await app.state.keys.create(name, scopes=scopes)
    AUDIT.use(created.secret.get_secret_value())
    return str(created.secret.get_secret_value())


@pytest.fixture
async def api_key(app: FastAPI) -> str:
    """The secret of a fresh read-write key (the tables are emptied after each test)."""
    return await _new_key(app, "tests", READ_WRITE)


@pytest.fixture
async def read_only_key(app: FastAPI) -> str:
    return await _new_key(app, "tests (read-only)", READ_ONLY)


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    """For raw ``client`` calls: ``await client.get(url, headers=auth_headers)``."""
    return bearer(api_key)


@pytest.fixture
def gql(client: httpx.AsyncClient, api_key: str, execution_path: str) -> GraphQL:
    return GraphQL(client, api_key)


@pytest.fixture
def read_only_gql(
    client: httpx.AsyncClient, read_only_key: str, execution_path: str
) -> GraphQL:
    return GraphQL(client, read_only_key)


@pytest.fixture
def anonymous_gql(client: httpx.AsyncClient, app: FastAPI, execution_path: str) -> GraphQL:
    """No Authorization header (expect ``status=401``)."""
    return GraphQL(client)


class StatementCounter:
    """The app's SQL statements; authentication's own (the key lookup, the throttled
    lastUsedAt write) are kept apart in ``auth_statements``, the outbox's (store/events.py) in
    ``event_statements``, and its prune (at most once a second) in ``prune_statements``,
    so counts measure the API work."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.auth_statements: list[str] = []
        self.event_statements: list[str] = []
        self.prune_statements: list[str] = []

    @property
    def count(self) -> int:
        return len(self.statements)

    @contextmanager
    def counting(self) -> Iterator[StatementCounter]:
        self.statements.clear()
        self.auth_statements.clear()
        self.event_statements.clear()
        self.prune_statements.clear()
        yield self


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads its settings from the environment: point it at the test database."""
    monkeypatch.setenv("CONSUMERS_DATABASE_URL", settings.database_url)
    assert settings.key_pepper is not None
    monkeypatch.setenv("CONSUMERS_KEY_PEPPER", settings.key_pepper.get_secret_value())


@pytest.fixture
def sql(app: FastAPI) -> Iterator[StatementCounter]:
    """Counts the SQL statements the app sends, on both of its engines."""
    counter = StatementCounter()

    def record(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any,
               *_args: Any) -> None:
        options = context.execution_options if context is not None else {}
        if options.get(AUTH_EXECUTION_OPTION):
            counter.auth_statements.append(statement)
        elif options.get(EVENTS_EXECUTION_OPTION):
            counter.event_statements.append(statement)
        elif options.get(PRUNE_EXECUTION_OPTION):
            counter.prune_statements.append(statement)
        else:
            counter.statements.append(statement)

    database = app.state.database
    engines = database.engines
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    yield counter
    for engine in engines:
        event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
def write_engine(app: FastAPI) -> Any:
    return app.state.database.write_engine


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
