"""Health probes, metrics and access lines, through HTTP on the app (the session's, or one of
the test's own), on the test database."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.migrate import head_revision, upgrade
from consumers_graphql.web.app import create_app
from consumers_graphql.web.logs import ACCESS_FIELDS
from tests.conftest import TEST_DATABASE_URL, GraphQL, StatementCounter, bearer, on_path
from tests.log_audit import AUDIT, asgi_client
from tests.test_unhappy_execution import consumers_locked

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

NAMED_QUERY = "query FirstPage { consumers(first: 2) { totalCount nodes { email } } }"
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id } userErrors { message } }
}"""
DEEP = "{ " + "consumers { nodes { audiences { nodes { " * 4 + "id" + " } }" * 8 + " }"


async def metrics(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


# --- health ---------------------------------------------------------------------------------

async def test_livez_and_readyz_need_no_key_and_stay_out_of_the_openapi_document(
    client: httpx.AsyncClient,
) -> None:
    for path in ("/livez", "/readyz", "/healthz"):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert response.json() == {"status": "ok"}
    documented = (await client.get("/openapi.json")).json()["paths"]
    assert not {"/livez", "/readyz", "/healthz", "/metrics"} & set(documented)


async def test_readyz_reads_the_schema_revision_again_only_after_a_while(
    settings: Settings,
) -> None:
    # given an app of its own (nothing cached yet), its statements counted
    app = create_app(settings)
    async with LifespanManager(app):
        counter = StatementCounter()

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            counter.statements.append(statement)

        for engine in app.state.database.engines:
            event.listen(engine, "before_cursor_execute", record)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            # when it is probed three times
            answers = [(await client.get("/readyz")).status_code for _ in range(3)]
    # then the revision was read once, and the database was asked every time
    assert answers == [200, 200, 200]
    assert sum(s.startswith("SELECT alembic_version.version_num") for s in counter.statements
               ) == 1, counter.statements
    assert sum(s.strip() == "SELECT 1" for s in counter.statements) == 2, counter.statements


@pytest.fixture
async def behind_url(tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own at the first schema revision."""
    if TEST_DATABASE_URL:
        server = make_url(TEST_DATABASE_URL)
        name = f"consumers_behind_{uuid.uuid4().hex[:12]}"
        admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = server.set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'behind.db'}"
    try:
        engine = make_engine(Settings(database_url=url), writer=True)
        try:
            await upgrade(engine, "0001")
        finally:
            await engine.dispose()
        yield url
    finally:
        if TEST_DATABASE_URL:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await admin.dispose()


@pytest.mark.database
async def test_readyz_is_503_with_the_reason_while_the_schema_is_behind(
    behind_url: str,
) -> None:
    settings = Settings(database_url=behind_url, retry_after_s=9)
    app = create_app(settings)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            # given a database one migration behind: not ready, and why
            for path in ("/readyz", "/healthz"):
                response = await client.get(path)
                assert response.status_code == 503
                assert response.headers["retry-after"] == "9"
                assert response.json() == {
                    "status": "unavailable",
                    "reason": f"schema at revision 0001, this version needs {head_revision()}:"
                              " run `consumers-graphql migrate`",
                }
            assert (await client.get("/livez")).status_code == 200
            # when it is migrated, then the next probe says ready (nothing cached while behind)
            engine = make_engine(settings, writer=True)
            try:
                await upgrade(engine)
            finally:
                await engine.dispose()
            response = await client.get("/readyz")
            assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- metrics --------------------------------------------------------------------------------

async def test_metrics_count_graphql_queries_and_mutations_by_type_and_status(
    client: httpx.AsyncClient, gql: GraphQL, sql: StatementCounter,
) -> None:
    before = await metrics(client)
    with sql.counting():
        data = await gql.data(CREATE, {"input": {"email": "metrics.one@example.com"}})
        sent = sql.count + len(sql.auth_statements)
    assert data["consumerCreate"]["userErrors"] == []
    await gql.data(NAMED_QUERY)
    await gql.data(NAMED_QUERY)
    # (scraped once the read connection kept for a next request is back: store/db.py)
    after = await _settled(client)

    requests = "consumers_http_requests_total"
    assert delta(before, after, requests, face="graphql", operation_type="mutation",
                 status="200") == 1
    assert delta(before, after, requests, face="graphql", operation_type="query",
                 status="200") == 2
    assert delta(before, after, "consumers_http_request_duration_seconds_count",
                 face="graphql", operation_type="query") == 2
    assert delta(before, after, "consumers_http_request_sql_statements_count",
                 face="graphql") == 3
    # the histogram's sum has the exact statements of the mutation, and those of the queries
    statements = delta(before, after, "consumers_http_request_sql_statements_sum",
                       face="graphql")
    assert sent >= 2 and statements > sent, (sent, statements)
    assert delta(before, after, "consumers_http_request_database_seconds_sum",
                 face="graphql") > 0
    # nothing is left checked out of any pool, and /metrics counts itself in flight
    for pool in ("primary", "write"):
        assert value(after, "consumers_db_pool_checked_out", pool=pool) == 0
        assert value(after, "consumers_db_pool_size", pool=pool) >= 1
    assert value(after, "consumers_http_requests_in_flight", face="other") == 1
    assert value(after, "consumers_http_requests_in_flight", face="graphql") == 0


POOL_DEADLINE_S = 5.0


def _in_use(samples: Samples) -> float:
    """Connections in use, but SQLite's inline one (checked out for the process's life)."""
    return sum(value for (name, labels), value in samples.items()
               if name == "consumers_db_pool_checked_out" and ("pool", "inline") not in labels)


async def _seen_in_use(client: httpx.AsyncClient, request: asyncio.Task[Any]) -> float:
    """Scrapes while `request` waits, until a connection shows as in use (10 s at most)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        in_use = _in_use(await metrics(client))
        if in_use >= 1 or request.done() or asyncio.get_running_loop().time() > deadline:
            return in_use
        await asyncio.sleep(0.02)


async def _settled(client: httpx.AsyncClient) -> Samples:
    """Scrapes until no connection is in use (10 s at most); the last scrape."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        samples = await metrics(client)
        if _in_use(samples) == 0 or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.02)


@pytest.mark.cancels_statements
async def test_the_pool_gauges_count_a_connection_while_its_statement_waits(
    app: FastAPI, settings: Settings, api_key: str,
) -> None:
    """A write held up by a lock another client holds: its connection counts as checked out
    while it waits, and no longer once it is over, whether it finished or its deadline
    stopped it (SQLite's writer waits out its busy timeout, just past the deadline)."""
    own = create_app(settings.model_copy(update={
        "request_timeout_s": POOL_DEADLINE_S,
        "sqlite_busy_timeout_ms": int(POOL_DEADLINE_S * 1000) + 1000}))
    async with LifespanManager(own), asgi_client(own) as client:
        assert _in_use(await metrics(client)) == 0
        for stopped_by_the_deadline in (False, True):
            async with consumers_locked(settings):
                request = asyncio.create_task(client.post(
                    "/api/v1/consumers", headers=bearer(api_key),
                    json={"email": f"held.{stopped_by_the_deadline}@example.com"}))
                # while it waits for the lock, its connection is in use
                assert await _seen_in_use(client, request) >= 1
                assert not request.done()
                if stopped_by_the_deadline:
                    response = await request
            if not stopped_by_the_deadline:
                response = await request
            assert response.status_code == (504 if stopped_by_the_deadline else 201), (
                response.text)
            # and once it is over (the key's lastUsedAt write after the answer too), none is
            after = await _settled(client)
            assert _in_use(after) == 0, {k: v for k, v in after.items() if "pool" in k[0]}
            for pool in ("primary", "write"):
                assert value(after, "consumers_db_pool_checked_out", pool=pool) == 0


async def test_the_statement_histogram_has_exactly_the_statements_sent(
    client: httpx.AsyncClient, gql: GraphQL, sql: StatementCounter,
) -> None:
    await gql.data(NAMED_QUERY)  # the key's lastUsedAt is written now, not below
    before = await metrics(client)
    with sql.counting():
        await gql.data(NAMED_QUERY)
        sent = sql.count + len(sql.auth_statements)
    after = await metrics(client)
    assert delta(before, after, "consumers_http_request_sql_statements_sum",
                 face="graphql") == sent
    assert sent >= 2  # the key, the page


async def test_metrics_count_rest_calls_and_refusals_by_limit_code(
    client: httpx.AsyncClient, gql: GraphQL, auth_headers: dict[str, str], settings: Settings,
) -> None:
    before = await metrics(client)
    assert (await client.get("/api/v1/consumers", headers=auth_headers)).status_code == 200
    assert (await client.get("/api/v1/consumers")).status_code == 401
    body = await gql(DEEP)
    assert body["errors"][0]["extensions"]["code"] == "MAX_DEPTH_EXCEEDED"
    big = b'{"email": "' + b"x" * settings.max_body_bytes + b'"}'
    for path in ("/api/v1/consumers", "/graphql"):
        refused = await client.post(path, content=big, headers={
            **auth_headers, "content-type": "application/json"})
        assert refused.status_code == 413, refused.text
    after = await metrics(client)

    requests = "consumers_http_requests_total"
    assert delta(before, after, requests, face="rest", operation_type="none",
                 status="200") == 1
    assert delta(before, after, requests, face="rest", operation_type="none",
                 status="401") == 1
    assert delta(before, after, requests, face="rest", operation_type="none",
                 status="413") == 1
    assert delta(before, after, requests, face="graphql", operation_type="query",
                 status="200") == 1
    assert delta(before, after, "consumers_refusals_total", code="MAX_DEPTH_EXCEEDED") == 1
    assert delta(before, after, "consumers_refusals_total", code="PAYLOAD_TOO_LARGE") == 2
    # no path, id or operation name is ever a label
    labels = {name for (_, sample_labels) in after for name, _ in sample_labels}
    assert labels <= {"face", "operation_type", "status", "code", "pool", "le"}, labels


async def test_each_app_counts_its_own_requests(settings: Settings) -> None:
    for _ in range(2):
        app = create_app(settings)
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         event_hooks=AUDIT.event_hooks()) as client:
                await client.get("/livez")
                samples = await metrics(client)
        assert value(samples, "consumers_http_requests_total", face="other",
                     operation_type="none", status="200") == 1


@pytest.mark.parametrize("change", [{"metrics_enabled": False}, {"metrics_port": 9}])
async def test_metrics_turned_off_or_on_their_own_port_are_not_on_the_app(
    settings: Settings, change: dict[str, Any],
) -> None:
    app = create_app(settings.model_copy(update=change))
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     event_hooks=AUDIT.event_hooks()) as client:
            assert (await client.get("/metrics")).status_code == 404
            assert (await client.get("/livez")).status_code == 200
    assert (app.state.metrics is None) is (change == {"metrics_enabled": False})


# --- access lines ---------------------------------------------------------------------------

def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, ACCESS_FIELDS) for r in caplog.records
            if r.name == "consumers_graphql.access"]


async def test_one_access_line_per_request_with_its_key_operation_cost_and_statements(
    app: FastAPI, client: httpx.AsyncClient, api_key: str, execution_path: str,
    caplog: pytest.LogCaptureFixture, sql: StatementCounter,
) -> None:
    [key] = [k for k in await app.state.keys.list_keys() if api_key.startswith(k.prefix)]
    caplog.set_level(logging.INFO, logger="consumers_graphql.access")
    with sql.counting():
        response = await client.post("/graphql?debug=ada@example.com", headers=bearer(api_key),
                                     json={"query": NAMED_QUERY})
        sent = sql.count + len(sql.auth_statements)
    rest = await client.get("/api/v1/consumers/cons_01J0000000000000000000000?x=secret",
                            headers=bearer(api_key))
    missing = await client.get("/nowhere/ada@example.com/+14155550123")
    named = await client.get("/api/v1/Ada Lovelace/orders", headers=bearer(api_key))

    graphql_line, rest_line, missing_line, named_line = _access_lines(caplog)
    assert graphql_line == {
        "request_id": response.headers["x-request-id"], "method": "POST", "path": "/graphql",
        "status": 200, "duration_ms": graphql_line["duration_ms"], "face": "graphql",
        "key_id": key.id, "operation_type": "query", "operation_name": "FirstPage",
        "cost": 2, "refused": None, "statements": sent,
        "database_ms": graphql_line["database_ms"],
    }
    assert graphql_line["duration_ms"] > 0 and graphql_line["database_ms"] > 0
    # a route's template stands for its path; no query string
    assert rest.status_code == 404
    assert rest_line["path"] == "/api/v1/consumers/{consumer_id}"
    assert (rest_line["face"], rest_line["status"], rest_line["key_id"]) == ("rest", 404, key.id)
    assert rest_line["operation_type"] == "none" and rest_line["cost"] is None
    # of a path no route matched, only the segments that begin the app's own routes
    assert missing.status_code == 404 and missing_line["key_id"] is None
    assert missing_line["path"] == "/{unmatched}"
    assert named.status_code == 404 and named_line["path"] == "/api/v1/{unmatched}"
    text_lines = [r.getMessage() for r in caplog.records if r.name == "consumers_graphql.access"]
    assert text_lines[0].startswith('"POST /graphql HTTP/1.1" 200 ')
    assert f"key={key.id} operation=query:FirstPage cost=2 sql={sent}/" in text_lines[0]
    assert not any("ada@example.com" in line or "secret" in line or "Lovelace" in line
                   for line in text_lines)


async def test_an_access_line_names_the_limit_that_refused_the_request(
    client: httpx.AsyncClient, gql: GraphQL, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumers_graphql.access")
    await gql("mutation Deep " + DEEP)
    [line] = _access_lines(caplog)
    assert (line["operation_type"], line["operation_name"]) == ("mutation", "Deep")
    assert line["refused"] == "MAX_DEPTH_EXCEEDED"
    [record] = [r for r in caplog.records if r.name == "consumers_graphql.access"]
    assert "refused=MAX_DEPTH_EXCEEDED" in record.getMessage()


async def test_an_app_of_its_own_on_its_path(settings: Settings, execution_path: str) -> None:
    """The in-process metrics of an app built by a test, on both execution paths."""
    app = create_app(settings)
    on_path(app, execution_path)
    async with LifespanManager(app):
        created = await app.state.keys.create("own app")
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         event_hooks=AUDIT.event_hooks()) as client:
                gql = GraphQL(client, created.secret.get_secret_value())
                await gql.data("{ consumers(first: 1) { totalCount } }")
                samples = await metrics(client)
        finally:
            await app.state.keys.revoke(created.info.id)
    assert value(samples, "consumers_http_requests_total", face="graphql",
                 operation_type="query", status="200") == 1


async def test_a_500_is_logged_in_json_with_its_request_id_and_no_secret(
    tmp_path: Path, execution_path: str,
) -> None:
    import io
    import json
    import sqlite3

    from consumers_graphql.web.logs import JsonFormatter, RedactSecrets, WithRequestId

    # given an app whose `audiences` table is gone (a real database failure) and a JSON log
    path = tmp_path / "broken.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{path}")
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE consumer_audiences")
        conn.execute("DROP TABLE audiences")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecrets())
    handler.addFilter(WithRequestId())
    app_logger = logging.getLogger("consumers_graphql")
    app_logger.addHandler(handler)
    app = create_app(settings)
    on_path(app, execution_path)
    try:
        async with LifespanManager(app):
            created = await app.state.keys.create("broken")
            secret = created.secret.get_secret_value()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         event_hooks=AUDIT.event_hooks()) as client:
                # when a GraphQL field and a REST call fail on it
                graphql = await client.post("/graphql", headers=bearer(secret), json={
                    "query": "{ audiences { nodes { id } } }"})
                made = await client.post("/api/v1/consumers", headers=bearer(secret),
                                         json={"email": "broken.json@example.com"})
                rest = await client.get(
                    f"/api/v1/consumers/{made.json()['id']}?include=audiences&k={secret}",
                    headers=bearer(secret))
    finally:
        app_logger.removeHandler(handler)
    # then each error line is JSON, carries its request's id, and the traceback
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [line for line in lines if line["level"] == "error"]
    assert graphql.json()["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"
    assert rest.status_code == 500
    assert [e["request_id"] for e in errors] == [graphql.headers["x-request-id"],
                                                 rest.headers["x-request-id"]], errors
    assert all("no such table: audiences" in e["exception"] for e in errors)
    assert secret not in stream.getvalue() and secret[12:] not in stream.getvalue()
