"""Pooled PostgreSQL connections are pinged only when they have been idle (store/db.py,
ping_idle_connections): none under steady use, one after a pause, and a connection the
server closed while the pool held it is replaced, not handed to a request."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import text

from consumers_graphql.settings import Settings
from consumers_graphql.store import db
from consumers_graphql.web.app import create_app
from tests.conftest import TEST_DATABASE_URL, GraphQL, new_migrated_database, on_path
from tests.log_audit import AUDIT, asgi_client

pytestmark = pytest.mark.skipif(not TEST_DATABASE_URL,
                                reason="a PostgreSQL pool's pings (SQLite has none)")

QUERY = "{ consumers(first: 1) { totalCount } }"


@pytest.fixture
async def own_app(settings: Settings, execution_path: str) -> AsyncIterator[FastAPI]:
    """An app on a database of its own, whose connections a test may cut."""
    async with new_migrated_database("consumers_ping") as url:
        app = create_app(settings.model_copy(update={"database_url": url}))
        on_path(app, execution_path)
        async with LifespanManager(app):
            yield app


@pytest.fixture
async def gql(own_app: FastAPI) -> AsyncIterator[GraphQL]:
    created = await own_app.state.keys.create("pings")
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with asgi_client(own_app) as client:
        yield GraphQL(client, secret)


@pytest.fixture
def pings(own_app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The pings the app's read engine sends (the dialect's own ping, still sent)."""
    dialect = own_app.state.database.primary_engine.sync_engine.dialect
    sent: list[object] = []
    real = dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        sent.append(dbapi_connection)
        return bool(real(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", do_ping)
    return sent


async def test_no_ping_under_steady_use_and_one_after_a_pause(
    gql: GraphQL, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "POOL_PING_IDLE_S", 0.1)
    # given requests one after the other: each checks a connection out, none is pinged
    for _ in range(5):
        assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert pings == []
    # when the pool has been idle past the threshold, then the next checkout pings
    await asyncio.sleep(0.2)
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert len(pings) == 1


@pytest.mark.skipif(bool(os.environ.get("CONSUMERS_DATABASE_POOLER")),
                    reason="behind a pooler the server's end of a connection never reaches "
                           "the client's (the pooler opens another): nothing to replace")
async def test_a_connection_the_server_closed_in_the_pool_is_replaced_not_used(
    own_app: FastAPI, gql: GraphQL, pings: list[object]
) -> None:
    # given a pooled connection, used a moment ago (no ping will check it)
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    # when the server ends it (an administrator, a restart)
    async with own_app.state.database.write_engine.connect() as conn:
        ended = (await conn.execute(text(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"))).scalar_one()
        await conn.rollback()
    assert ended >= 1
    await asyncio.sleep(0.05)  # the event loop hears the server's goodbye
    # then the next request gets a new connection, without an error and without a ping
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert pings == []
