"""PostgreSQL behind pgbouncer in transaction mode (a private pgbouncer, in front of the test
server): without CONSUMERS_DATABASE_POOLER=transaction, concurrent requests fail on prepared
statements; with it, concurrent GraphQL and REST reads and writes all work.

A small server pool (3 connections for 20 and more clients) makes pgbouncer hand each
transaction, and in autocommit each statement, to whichever server connection is free, as
it does under load in production.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from consumers_graphql.settings import Pooler, Settings
from consumers_graphql.store.db import pooler_connect_args
from consumers_graphql.web.app import create_app
from tests.conftest import ADMIN_DATABASE_URL, TEST_DATABASE_URL, GraphQL, bearer, on_path
from tests.log_audit import AUDIT
from tests.processes import PgBouncer

pytestmark = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="pgbouncer fronts PostgreSQL (CONSUMERS_TEST_DATABASE_URL)")

READ = """{ consumers(first: 10) { totalCount nodes { email
  orders(first: 3) { totalCount } audiences(first: 3) { totalCount } } } }"""
CREATE = """mutation($email: String!) { consumerCreate(input: {email: $email}) {
  consumer { id orders(first: 3) { totalCount } } userErrors { code } } }"""
CONSUMERS = "/api/v1/consumers"
ROUNDS = 5  # without the setting, the first round fails in practice; five make it certain


@pytest.fixture
def bouncer() -> Iterator[PgBouncer]:
    """One per test: server connections a failed test left pinned (a client in an aborted
    transaction, kept alive by its logged traceback) must not starve the next."""
    assert ADMIN_DATABASE_URL
    server_port = make_url(ADMIN_DATABASE_URL).port or 5432
    bouncer = PgBouncer(server_port, pool_size=3)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def behind_bouncer(settings: Settings, bouncer: PgBouncer) -> str:
    """The test database, through the private pgbouncer."""
    database = make_url(settings.database_url).database
    assert database
    return bouncer.url(database)


async def workload(client: httpx.AsyncClient, secret: str, tag: str) -> list[str]:
    """Reads and writes of both faces at once; what went wrong, one line per failure."""
    gql = GraphQL(client, secret)

    async def graphql(query: str, variables: dict[str, Any] | None = None) -> str | None:
        response = await client.post("/graphql", json={"query": query,
                                                       "variables": variables or {}},
                                     headers=gql.headers)
        if response.status_code != 200 or "errors" in response.json():
            return f"GraphQL {response.status_code}: {response.text[:200]}"
        return None

    async def rest(method: str, path: str, **kwargs: Any) -> str | None:
        response = await client.request(method, path, headers=bearer(secret), **kwargs)
        if response.status_code not in (200, 201):
            return f"REST {method} {response.status_code}: {response.text[:200]}"
        return None

    jobs = []
    for n in range(6):
        jobs += [
            graphql(READ),
            graphql(CREATE, {"email": f"gql.{tag}.{n}@example.com"}),
            rest("GET", f"{CONSUMERS}?include=orders,audiences"),
            rest("POST", CONSUMERS, json={"email": f"rest.{tag}.{n}@example.com"}),
        ]
    return [failure for failure in await asyncio.gather(*jobs) if failure is not None]


@pytest.fixture
async def bounced_app(
    request: pytest.FixtureRequest, settings: Settings, behind_bouncer: str,
    execution_path: str,
) -> AsyncIterator[httpx.AsyncClient]:
    pooler: Pooler = request.param
    app: FastAPI = create_app(settings.model_copy(
        update={"database_url": behind_bouncer, "database_pooler": pooler}))
    on_path(app, execution_path)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as c:
            yield c


@pytest.mark.parametrize("bounced_app", [Pooler.NONE], indirect=True)
async def test_without_the_setting_requests_fail_on_prepared_statements(
    bounced_app: httpx.AsyncClient, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    failures: list[str] = []
    for round_ in range(ROUNDS):
        failures = await workload(bounced_app, api_key, f"none{round_}")
        if failures:
            break
    assert failures, "every request worked behind pgbouncer without the setting"
    assert "prepared statement" in caplog.text, caplog.text[-2000:]


@pytest.mark.parametrize("bounced_app", [Pooler.TRANSACTION], indirect=True)
async def test_with_the_setting_concurrent_reads_and_writes_work(
    bounced_app: httpx.AsyncClient, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    for round_ in range(ROUNDS):
        failures = await workload(bounced_app, api_key, f"tx{round_}")
        assert failures == [], failures
    assert "prepared statement" not in caplog.text
    # every write is there: 12 consumers a round
    body = await GraphQL(bounced_app, api_key).data("{ consumers { totalCount } }")
    assert body["consumers"]["totalCount"] == 12 * ROUNDS


async def test_named_statements_break_autocommit_reads_behind_pgbouncer(
    behind_bouncer: str,
) -> None:
    """Why pooler_connect_args does not take SQLAlchemy's documented recipe of unique
    statement names: a named statement is prepared in one exchange and executed in the
    next, and in autocommit pgbouncer may send the second to another server connection.
    Our arguments keep every statement on its connection; the recipe's do not."""

    async def failures(connect_args: dict[str, Any]) -> int:
        engine = create_async_engine(behind_bouncer, isolation_level="AUTOCOMMIT",
                                     pool_size=20, max_overflow=0, connect_args=connect_args)
        failed = 0

        async def client(n: int) -> None:
            nonlocal failed
            try:
                async with engine.connect() as conn:
                    for i in range(10):
                        await conn.execute(text(f"SELECT {i} + :n"), {"n": n})
            except Exception as error:
                assert "prepared statement" in str(error), error
                failed += 1

        try:
            for _ in range(ROUNDS):
                await asyncio.gather(*(client(n) for n in range(20)))
                if failed:
                    break
        finally:
            await engine.dispose()
        return failed

    ours = pooler_connect_args(Settings(database_url=behind_bouncer,
                                        database_pooler=Pooler.TRANSACTION))
    assert await failures(ours) == 0
    recipe = {**ours, "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__"}
    assert await failures(recipe) > 0
