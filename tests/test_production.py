"""Production mode: no GraphiQL, no introspection, no field suggestions, and internal
errors masked with a request id that the response header and the log both carry."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from graphql import get_introspection_query

from consumers_graphql.api.schema import build_schema
from consumers_graphql.settings import Environment, Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.keys import READ_WRITE
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app
from tests.conftest import GraphQL, StatementCounter, bearer, on_path
from tests.log_audit import AUDIT

INTROSPECTION = "{ __schema { queryType { name } types { name } } }"
TYPE_INTROSPECTION = '{ __type(name: "Consumer") { fields { name } } }'


@pytest.fixture
async def production(
    app: FastAPI, settings: Settings, execution_path: str
) -> AsyncIterator[GraphQL]:
    """A production app on the tests' database (``app`` is requested so tables get emptied)."""
    production_app = create_app(settings.model_copy(update={"env": Environment.PRODUCTION}))
    on_path(production_app, execution_path)
    async with LifespanManager(production_app):
        created = await production_app.state.keys.create("production", scopes=READ_WRITE)
        transport = httpx.ASGITransport(app=production_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as client:
            yield GraphQL(client, created.secret.get_secret_value())


@pytest.mark.parametrize("query", [INTROSPECTION, TYPE_INTROSPECTION])
async def test_introspection_is_refused(
    production: GraphQL, sql: StatementCounter, query: str
) -> None:
    with sql.counting():
        body = await production(query)

    assert "data" not in body
    assert body["errors"][0]["extensions"]["code"] == "INTROSPECTION_DISABLED"
    assert sql.statements == []


async def test_development_keeps_introspection_within_the_limits(gql: GraphQL) -> None:
    # What GraphiQL sends: deep (ofType x 9), so depth must not count introspection.
    data = await gql.data(get_introspection_query(descriptions=True, input_value_deprecation=True))

    assert data["__schema"]["queryType"]["name"] == "Query"


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        ("{ consumrs { totalCount } }", None),
        ("{ consumers(frist: 1) { totalCount } }", None),
        ("{ consumers { totalCount } } fragment F on Consumr { id }", None),
        ("{ consumers(sortDir: DES) { totalCount } }", None),
        ("query($d: SortDirection) { consumers(sortDir: $d) { totalCount } }", {"d": "DES"}),
    ],
)
async def test_field_suggestions_are_off(
    production: GraphQL, gql: GraphQL, sql: StatementCounter, query: str,
    variables: dict[str, str] | None,
) -> None:
    with sql.counting():
        body = await production(query, variables)
    development = await gql(query, variables)

    assert body["errors"], body
    assert all("Did you mean" not in error["message"] for error in body["errors"])
    assert sql.statements == []
    # The same mistake in development does get a suggestion: the probe is meaningful.
    assert any("Did you mean" in error["message"] for error in development["errors"])


async def test_graphiql_is_off(production: GraphQL) -> None:
    response = await production.client.get(
        "/graphql", headers={**production.headers, "Accept": "text/html"}
    )

    assert response.status_code == 404
    assert "graphiql" not in response.text.lower()


async def test_development_serves_graphiql(client: httpx.AsyncClient) -> None:
    response = await client.get("/graphql", headers={"Accept": "text/html"})

    assert response.status_code == 200
    assert "graphiql" in response.text.lower()


@pytest.fixture
async def broken_production(
    tmp_path: Path, execution_path: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A production app on its own SQLite file whose `audiences` table is gone: a real
    database failure, nothing mocked."""
    path = tmp_path / "broken.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{path}", env=Environment.PRODUCTION)
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE consumer_audiences")
        conn.execute("DROP TABLE audiences")
    app = create_app(settings)
    on_path(app, execution_path)
    async with LifespanManager(app):
        created = await app.state.keys.create("broken", scopes=READ_WRITE)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as client:
            yield client, created.secret.get_secret_value()


@pytest.mark.parametrize("incoming", [None, "trace-7f3a9c"])
async def test_an_internal_error_is_masked_and_logged_with_its_request_id(
    broken_production: tuple[httpx.AsyncClient, str], caplog: pytest.LogCaptureFixture,
    incoming: str | None,
) -> None:
    client, secret = broken_production
    headers = bearer(secret) | ({"X-Request-ID": incoming} if incoming else {})

    with caplog.at_level(logging.ERROR):
        response = await client.post(
            "/graphql", json={"query": "{ audiences { nodes { id name } } }"}, headers=headers
        )

    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert request_id == (incoming or request_id) and request_id
    body = response.json()
    assert body["data"] is None
    assert body["errors"] == [{
        "message": "Internal server error.",
        "locations": [{"line": 1, "column": 3}],
        "path": ["audiences"],
        "extensions": {"code": "INTERNAL_SERVER_ERROR", "requestId": request_id},
    }]
    for leak in ("SELECT", "no such table", "sqlalchemy", "Traceback", "audiences."):
        assert leak.lower() not in response.text.lower()
    # The log has what the response hides, under the same id, and never the key.
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged, caplog.text
    assert "no such table: audiences" in caplog.text
    assert secret not in caplog.text


async def test_an_internal_error_on_rest_has_the_reference_shape_and_no_leak(
    broken_production: tuple[httpx.AsyncClient, str], caplog: pytest.LogCaptureFixture,
) -> None:
    client, secret = broken_production
    created = await client.post("/api/v1/consumers", json={"email": "x@example.com"},
                                headers=bearer(secret))
    assert created.status_code == 201

    with caplog.at_level(logging.ERROR):
        response = await client.get(
            f"/api/v1/consumers/{created.json()['id']}?include=audiences", headers=bearer(secret)
        )

    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.json() == {"error": "Internal server error",
                               "details": [{"field": "requestId", "message": request_id}]}
    for leak in ("SELECT", "no such table", "Traceback"):
        assert leak.lower() not in response.text.lower()
    assert request_id in caplog.text and "no such table: audiences" in caplog.text


async def test_the_federation_sdl_is_answered_in_production(production: GraphQL) -> None:
    """A gateway that composes at start-up reads `_service { sdl }`: production turns
    introspection off, not that (README, Federation; the SDL is schema.federation.graphql,
    published with the code)."""
    body = await production("{ _service { sdl } __typename }")

    assert "errors" not in body, body["errors"]
    assert body["data"]["_service"]["sdl"] == build_schema().as_str()
    assert (await production(INTROSPECTION))["errors"][0]["extensions"]["code"] == (
        "INTROSPECTION_DISABLED")
