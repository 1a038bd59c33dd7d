"""CONSUMERS_DATABASE_REPLICA_URL: reads that are not part of a write go to the replica; a
mutation's own reads and its payload, and API key checks, stay on the primary.

The "replica" here is a second database on the test server with the same schema and none of
the primary's rows: a replica that has not caught up at all. A read sent to the wrong side
then shows in the data, not only in the statement counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from pydantic import ValidationError
from sqlalchemy import event

from consumers_graphql.settings import Settings
from consumers_graphql.store import events as events_store
from consumers_graphql.store.keys import AUTH_EXECUTION_OPTION
from consumers_graphql.web.app import create_app
from tests.conftest import TEST_DATABASE_URL, GraphQL, bearer, new_migrated_database, on_path
from tests.log_audit import AUDIT

CONSUMERS = "/api/v1/consumers"
COUNT = "{ consumers(first: 5) { totalCount nodes { email } } }"
CREATE = """mutation($email: String!) { consumerCreate(input: {email: $email}) {
  consumer { id email orders(first: 5) { totalCount } } userErrors { code } } }"""
# The payload reads the consumer through a loader, after the commit: on a replica behind
# the write it would be missing (null, and an error for the non-null field).
RECORD = """mutation($id: ID!) { orderRecord(input: {consumerId: $id, amount: 10,
  currency: "EUR", placedAt: "2024-01-01T00:00:00Z"}) {
  order { amount consumer { email totalOrders orders(first: 5) { totalCount } } }
  userErrors { code } } }"""
AUDIENCE = """mutation { audienceCreate(input: {name: "Replicated"}) {
  audience { id } userErrors { code } } }"""
ADD = """mutation($a: ID!, $c: ID!) {
  first: audienceAddConsumers(audienceId: $a, consumerIds: [$c]) {
    audience { consumers(first: 5) { totalCount } } userErrors { code } }
  again: audienceAddConsumers(audienceId: $a, consumerIds: [$c]) {
    audience { consumers(first: 5) { totalCount nodes { email } } } userErrors { code } } }"""

needs_postgresql = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="a read replica is a PostgreSQL setting (SQLite refuses it: "
    "see test_sqlite_refuses_a_replica)")


class Routing:
    """Statements by engine ("primary": autocommit reads on the primary, "write", "replica"),
    key checks apart."""

    def __init__(self, app: FastAPI) -> None:
        database = app.state.database
        self.engines = {"primary": database.primary_engine.sync_engine,
                        "write": database.write_engine.sync_engine,
                        "replica": database.replica_engine.sync_engine}
        self.statements: Counter[str] = Counter()

    @contextmanager
    def watching(self) -> Iterator[Counter[str]]:
        listeners = []
        for name, engine in self.engines.items():
            def record(_conn: Any, _cursor: Any, _statement: str, _params: Any,
                       context: Any, *_args: Any, name: str = name) -> None:
                options = context.execution_options if context is not None else {}
                self.statements[f"{name} (key)" if options.get(AUTH_EXECUTION_OPTION)
                                else name] += 1
            event.listen(engine, "before_cursor_execute", record)
            listeners.append((engine, record))
        self.statements.clear()
        try:
            yield self.statements
        finally:
            for engine, record in listeners:
                event.remove(engine, "before_cursor_execute", record)


@pytest.fixture
async def replica_app(settings: Settings, execution_path: str) -> AsyncIterator[FastAPI]:
    async with new_migrated_database("consumers_replica") as replica_url:
        app = create_app(settings.model_copy(update={"database_replica_url": replica_url}))
        on_path(app, execution_path)
        async with LifespanManager(app):
            yield app


@pytest.fixture
async def replica_client(replica_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=replica_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 event_hooks=AUDIT.event_hooks()) as client:
        yield client


@needs_postgresql
async def test_queries_read_the_replica_and_mutations_read_their_writes_on_the_primary(
    replica_app: FastAPI, replica_client: httpx.AsyncClient
) -> None:
    # given a key (on the primary only: the replica has no rows at all)
    created = await replica_app.state.keys.create("replica test")
    gql = GraphQL(replica_client, created.secret.get_secret_value())
    routing = Routing(replica_app)

    # when a consumer is created, then the payload's reads came from the primary
    with routing.watching() as statements:
        data = await gql.data(CREATE, {"email": "ana@example.com"})
    consumer = data["consumerCreate"]["consumer"]
    assert consumer["email"] == "ana@example.com"
    assert consumer["orders"] == {"totalCount": 0}
    assert statements["replica"] == 0, statements
    assert statements["write"] >= 1 and statements["primary"] >= 1, statements
    assert statements["primary (key)"] == 1, statements  # the key was checked on the primary

    # when an order is recorded, the payload finds the consumer the replica does not have
    with routing.watching() as statements:
        data = await gql.data(RECORD, {"id": consumer["id"]})
    assert data["orderRecord"] == {"order": {"amount": 10.0, "consumer": {
        "email": "ana@example.com", "totalOrders": 1, "orders": {"totalCount": 1}}},
        "userErrors": []}
    assert statements["replica"] == 0, statements

    # when two mutation fields write in turn, each payload sees the writes before it
    audience = (await gql.data(AUDIENCE))["audienceCreate"]["audience"]["id"]
    with routing.watching() as statements:
        data = await gql.data(ADD, {"a": audience, "c": consumer["id"]})
    assert data["first"]["audience"] == {"consumers": {"totalCount": 1}}
    assert data["again"]["audience"] == {
        "consumers": {"totalCount": 1, "nodes": [{"email": "ana@example.com"}]}}
    assert statements["replica"] == 0, statements

    # when a query runs, then it reads the replica only (which is behind: nothing there)
    with routing.watching() as statements:
        data = await gql.data(COUNT)
    assert data == {"consumers": {"totalCount": 0, "nodes": []}}
    assert statements["replica"] >= 1, statements
    assert statements["primary"] == 0 and statements["write"] == 0, statements


@needs_postgresql
async def test_rest_gets_read_the_replica_and_writes_answer_from_the_primary(
    replica_app: FastAPI, replica_client: httpx.AsyncClient
) -> None:
    created = await replica_app.state.keys.create("replica test")
    headers = bearer(created.secret.get_secret_value())
    routing = Routing(replica_app)

    with routing.watching() as statements:
        response = await replica_client.post(CONSUMERS, headers=headers, json={
            "email": "bruno@example.com", "fullName": "Bruno"})
    assert response.status_code == 201, response.text
    consumer_id = response.json()["id"]
    assert statements["replica"] == 0 and statements["write"] >= 1, statements

    with routing.watching() as statements:
        response = await replica_client.put(f"{CONSUMERS}/{consumer_id}", headers=headers,
                                            json={"fullName": "Bruno Costa"})
    assert response.status_code == 200, response.text
    assert response.json()["fullName"] == "Bruno Costa"
    assert statements["replica"] == 0, statements

    # a GET goes to the replica, which has not caught up: 404 and an empty list, from there
    with routing.watching() as statements:
        one = await replica_client.get(f"{CONSUMERS}/{consumer_id}", headers=headers)
        listed = await replica_client.get(f"{CONSUMERS}?include=audiences,orders",
                                          headers=headers)
    assert one.status_code == 404, one.text
    assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    assert statements["replica"] >= 2, statements
    assert statements["primary"] == 0 and statements["write"] == 0, statements


@needs_postgresql
async def test_a_revoked_key_is_refused_at_once_whatever_the_replica_says(
    replica_app: FastAPI, replica_client: httpx.AsyncClient
) -> None:
    # given a key that works (the replica has never seen it: checks go to the primary)
    keys = replica_app.state.keys
    created = await keys.create("soon revoked")
    gql = GraphQL(replica_client, created.secret.get_secret_value())
    assert (await gql(COUNT))["data"]["consumers"]["totalCount"] == 0
    # when it is revoked, then the next request is refused
    await keys.revoke(created.info.id)
    body = await gql(COUNT, status=401)
    assert body["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


@needs_postgresql
def test_every_engine_is_listed_for_statement_listeners(replica_app: FastAPI) -> None:
    database = replica_app.state.database
    assert database.read_engine is database.replica_engine
    assert database.replica_engine.sync_engine in database.engines
    assert database.primary_engine.sync_engine in database.engines
    assert database.write_engine.sync_engine in database.engines


def test_without_a_replica_reads_go_to_the_primary(app: FastAPI) -> None:
    database = app.state.database
    assert database.replica_engine is None
    assert database.read_engine is database.primary_engine


def test_sqlite_refuses_a_replica(tmp_path: Any) -> None:
    with pytest.raises(ValidationError, match="CONSUMERS_DATABASE_REPLICA_URL needs PostgreSQL"):
        Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
                 database_replica_url=f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")


def test_both_urls_are_normalised_alike() -> None:
    settings = Settings(database_url="postgres://app@db.internal/consumers",
                        database_replica_url="postgresql://app@replica.internal/consumers")
    assert settings.database_url == "postgresql+asyncpg://app@db.internal/consumers"
    assert settings.database_replica_url == "postgresql+asyncpg://app@replica.internal/consumers"


@needs_postgresql
async def test_an_event_the_replica_has_not_caught_up_with_is_a_valid_after(
    replica_app: FastAPI, replica_client: httpx.AsyncClient
) -> None:
    """An event id or cursor handed out on the primary (a subscription, another host's
    page) names an event a replica behind it lacks: the feed answers what the replica has
    after it (nothing yet; the rest follows in commit order), not 400 "names no event"."""
    created = await replica_app.state.keys.create("replica events")
    headers = bearer(created.secret.get_secret_value())
    gql = GraphQL(replica_client, created.secret.get_secret_value())
    await gql.data(CREATE, {"email": "eve@example.com"})
    [record] = await events_store.read_events(replica_app.state.database, after=None,
                                              types=None, subject_id=None, limit=10)
    for after in (record.id, record.cursor):
        response = await replica_client.get("/api/v1/events", params={"after": after},
                                            headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == []
        data = await gql.data("query($after: String) { events(after: $after) { totalCount } }",
                              {"after": after})
        assert data == {"events": {"totalCount": 0}}
    # an id no database has is still refused
    response = await replica_client.get(
        "/api/v1/events", params={"after": "evt_01ZZZZZZZZZZZZZZZZZZZZZZZZ"}, headers=headers)
    assert response.status_code == 400, response.text
