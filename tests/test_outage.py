"""The database out of reach: `serve` against a PostgreSQL cluster of the test's own, stopped
under it and started again. Every request answers 503 with Retry-After meanwhile, the log
has one warning for the outage and one line when it is over, no traceback and no personal
data, and the server recovers by itself.

The cluster is the test's own whatever the suite's database, so it runs in the SQLite run
only (the PostgreSQL run would repeat it unchanged)."""

from __future__ import annotations

import logging
import os
import re
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import create_async_engine

from consumers_graphql.settings import Settings
from consumers_graphql.store.outage import Outage, is_unavailable
from tests.conftest import GraphQL, bearer, on_path
from tests.log_audit import AUDIT
from tests.processes import PostgresCluster, Served

# the tests with a database of their own run once, in the SQLite run
own_database = pytest.mark.skipif(
    bool(os.environ.get("CONSUMERS_TEST_DATABASE_URL")),
    reason="brings its own database: runs once, in the SQLite run",
)

REST = "/api/v1/consumers"
QUERY = "{ consumers(first: 2) { totalCount nodes { email } } }"
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
PEOPLE = [("ada.outage@example.com", "Ada Outagelace"), ("grace.outage@example.com",
                                                          "Grace Outagehopper")]


def _create(email: str, name: str) -> str:
    return (f'mutation {{ consumerCreate(input: {{email: "{email}", fullName: "{name}"}}) '
            f"{{ consumer {{ id }} userErrors {{ message }} }} }}")


def _assert_unavailable(response: httpx.Response, retry_after: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == retry_after
    assert response.headers["x-request-id"].startswith("req_")


@own_database
def test_postgresql_stopped_and_started_again_503_one_warning_and_recovery(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    served = Served(cluster.url, tmp_path,
                    env={"CONSUMERS_RETRY_AFTER_S": "7", "CONSUMERS_LOG_LEVEL": "info"})
    try:
        served.wait_until_up()
        key = bearer(served.secret())
        started = len(served.lines)
        # given a server that works
        assert served.post("/graphql", json={"query": QUERY}, headers=key).status_code == 200
        assert served.get(REST, headers=key).status_code == 200
        assert served.get("/healthz").json() == {"status": "ok"}

        # when the database stops under it
        cluster.stop()
        # then GraphQL answers 503, under either media type, with SERVICE_UNAVAILABLE
        for accept in ("application/json", GRAPHQL_RESPONSE_JSON):
            for body in ({"query": QUERY}, {"query": _create(*PEOPLE[0])}):
                response = served.post("/graphql", json=body,
                                       headers={**key, "accept": accept})
                _assert_unavailable(response, "7")
                assert response.headers["content-type"].startswith(accept)
                [error] = response.json()["errors"]
                assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE",
                                               "requestId": response.headers["x-request-id"]}
        response = served.get("/graphql", params={"query": QUERY},
                              headers={**key, "accept": "application/json"})
        _assert_unavailable(response, "7")
        # and REST answers 503 in the reference's shape, reads and writes alike
        for response in (
            served.get(REST, headers=key),
            # (a well-formed id: the key, verified a moment ago, is not looked up again)
            served.get(f"{REST}/cons_01J00000000000000000000000", headers=key),
            served.post(REST, headers=key, json={"email": PEOPLE[1][0],
                                                 "fullName": PEOPLE[1][1]}),
            served.post(f"{REST}/batch", headers=key,
                        json=[{"email": email, "fullName": name} for email, name in PEOPLE]),
        ):
            _assert_unavailable(response, "7")
            assert response.json() == {"error": "Service unavailable", "details": []}
        # and so do the readiness checks, with the reason, while the process is alive
        for probe in ("/healthz", "/readyz"):
            response = served.get(probe)
            _assert_unavailable(response, "7")
            assert response.json() == {"status": "unavailable",
                                       "reason": "database unreachable"}
        assert served.get("/livez").json() == {"status": "ok"}
        # while a request refused before the database is needed is answered as always
        assert served.get(REST).status_code == 401

        # when the database is back
        cluster.start()
        # then the same server answers again, without a restart
        response = served.post("/graphql", json={"query": _create(*PEOPLE[0])}, headers=key)
        assert response.status_code == 200, response.text
        assert response.json()["data"]["consumerCreate"]["userErrors"] == []
        response = served.post(REST, headers=key, json={"email": PEOPLE[1][0],
                                                        "fullName": PEOPLE[1][1]})
        assert response.status_code == 201, response.text
        assert served.get("/healthz").json() == {"status": "ok"}
        assert served.get("/readyz").json() == {"status": "ok"}
        response = served.post("/graphql", json={"query": QUERY}, headers=key)
        assert response.json()["data"]["consumers"]["totalCount"] == 2
    finally:
        assert served.stop() == 0, served.output
    log = "".join(served.lines[started:])
    # one warning for the outage, one line for its end, and nothing else of it
    assert log.count("database unavailable") == 1, log
    # named by the driver's connection error, not by a wrapper (a fallback, SQLAlchemy's)
    assert re.search(r"database unavailable \((ConnectionRefusedError|ConnectionResetError|"
                     r"ConnectionDoesNotExistError|CannotConnectNowError|AdminShutdownError"
                     r"|OSError): ", log), log
    assert log.count("WARNING") == 1, log
    assert log.count("database available again") == 1, log
    assert "Traceback" not in log and "ERROR" not in log, log
    # no personal data, not even in the failed writes
    for email, name in PEOPLE:
        assert email not in log and name not in log, log
    assert '"GET /healthz HTTP/1.1" 503' in log


@own_database
async def test_a_sqlite_file_locked_past_the_busy_timeout_is_503_then_recovers(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, execution_path: str
) -> None:
    """SQLite's outage: another process holding the write lock past the busy timeout."""
    from asgi_lifespan import LifespanManager

    from consumers_graphql.store.keys import KeyStore
    from consumers_graphql.web.app import create_app

    caplog.set_level(logging.INFO, logger="consumers_graphql")
    locked = settings.model_copy(update={"sqlite_busy_timeout_ms": 50, "retry_after_s": 3})
    app = create_app(locked)
    on_path(app, execution_path)
    async with LifespanManager(app):
        keys: KeyStore = app.state.keys
        created = await keys.create("outage")
        key = bearer(created.secret.get_secret_value())
        path = locked.database_url.removeprefix("sqlite+aiosqlite:///")
        holder = sqlite3.connect(path, isolation_level=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            try:
                # given another process in the middle of a long write
                holder.execute("BEGIN IMMEDIATE")
                # then writes answer 503 (REST and GraphQL), reads go on
                response = await client.post(REST, headers=key, json={
                    "email": "locked.out@example.com", "fullName": "Locked Out"})
                _assert_unavailable(response, "3")
                assert response.json() == {"error": "Service unavailable", "details": []}
                response = await client.post("/graphql", headers=key, json={
                    "query": _create("locked.out@example.com", "Locked Out")})
                _assert_unavailable(response, "3")
                [error] = response.json()["errors"]
                assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE"
                assert (await client.get(REST, headers=key)).status_code == 200
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            # when the lock is released, writes succeed again
            response = await client.post(REST, headers=key, json={
                "email": "locked.out@example.com", "fullName": "Locked Out"})
            assert response.status_code == 201, response.text
            await client.delete(f"{REST}/{response.json()['id']}", headers=key)
        await keys.revoke(created.info.id)
    messages = [r.getMessage() for r in caplog.records if r.name == "consumers_graphql.db"]
    assert sum("database unavailable" in m for m in messages) == 1, messages
    assert any(m.startswith("database unavailable (OperationalError: database is locked)")
               for m in messages), messages
    assert sum("database available again" in m for m in messages) == 1, messages
    assert not any("locked.out" in r.getMessage() or r.exc_info for r in caplog.records)


# Cuts every other connection to the database, the request's read connection among them,
# from inside the order's INSERT: the write commits, the payload's reads meet a dead socket.
CUT_READERS = [
    """CREATE FUNCTION cut_readers() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
         PERFORM pg_terminate_backend(pid, 5000) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND backend_type = 'client backend';
         RETURN NEW; END $$""",
    "CREATE TRIGGER cut_readers AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION "
    "cut_readers()",
]
RECORD_ORDER = """mutation($id: ID!) { orderRecord(input: {consumerId: $id, amount: 10,
  currency: "EUR", placedAt: "2024-01-01T00:00:00Z"}) {
  order { amount consumer { totalOrders } } userErrors { code } } }"""


@own_database
@pytest.mark.parametrize("accept", ["application/json", GRAPHQL_RESPONSE_JSON])
async def test_a_mutation_that_committed_is_never_503_when_its_payload_meets_an_outage(
    cluster: PostgresCluster, accept: str, execution_path: str
) -> None:
    from asgi_lifespan import LifespanManager
    from sqlalchemy import text

    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.migrate import upgrade
    from consumers_graphql.web.app import create_app

    # Keys checked on every request: the key check opens the request's read connection
    # before the write, so the payload's reads meet it dead (a connection that died in the
    # pool is replaced at checkout instead, and the payload would simply be read).
    settings = Settings(database_url=cluster.url, key_pepper="outage-pepper",  # type: ignore[arg-type]
                        key_cache_seconds=0)
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            for statement in CUT_READERS:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()
    app = create_app(settings)
    on_path(app, execution_path)
    async with LifespanManager(app):
        key = bearer((await app.state.keys.create("outage")).secret.get_secret_value())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            created = await client.post("/graphql", headers=key, json={
                "query": _create(*PEOPLE[0])})
            consumer_id = created.json()["data"]["consumerCreate"]["consumer"]["id"]

            # when the order is written and its payload's reads find the database gone
            response = await client.post("/graphql", headers={**key, "Accept": accept}, json={
                "query": RECORD_ORDER, "variables": {"id": consumer_id}})

            # then the answer is the mutation's own, not a 503 inviting a retry
            assert response.status_code == 200, response.text
            assert "retry-after" not in response.headers
            body = response.json()
            assert body["data"] == {"orderRecord": {"order": None, "userErrors": []}}
            [error] = body["errors"]
            assert error["path"][:2] == ["orderRecord", "order"]
            assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE"

            # and the order was written, once
            response = await client.post("/graphql", headers=key, json={
                "query": "{ consumers { nodes { totalOrders } } }"})
            assert response.json()["data"] == {"consumers": {"nodes": [{"totalOrders": 1}]}}


async def test_an_outage_of_waiting_for_the_pool_ends_at_the_next_checkout(
    app: FastAPI, read_only_gql: GraphQL, settings: Settings,
    caplog: pytest.LogCaptureFixture, execution_path: str
) -> None:
    """A pool that gave no connection in time: read-only traffic on pooled connections
    (no new connection, no commit) ends it, so the next outage is logged too."""
    caplog.set_level(logging.INFO, logger="consumers_graphql")
    outage = app.state.database.outage
    tiny = create_async_engine(settings.database_url, pool_size=1, max_overflow=0,
                               pool_timeout=0.01)
    await read_only_gql.data(QUERY)  # the key's first use written, the pool warm
    try:
        for _ in range(2):
            # given an outage flagged by a real wait for a pool past its timeout
            async with tiny.connect():
                with pytest.raises(PoolTimeout) as waited:
                    await tiny.connect()
            outage.failed(waited.value)
            assert outage.down
            # when a read-only request checks a connection out of the app's pool
            await read_only_gql.data(QUERY)
            # then the outage is over
            assert not outage.down
    finally:
        await tiny.dispose()
    messages = [r.getMessage() for r in caplog.records if r.name == "consumers_graphql.db"]
    assert sum(m.startswith("database unavailable (TimeoutError: QueuePool limit")
               for m in messages) == 2, messages
    assert sum("database available again" in m for m in messages) == 2, messages


async def _refused() -> OSError:
    """What the driver raises for a server that is not there: a real connection refused."""
    with socket.socket() as closed:  # a port bound, never listened on: refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none")
        try:
            with pytest.raises(OSError) as refused:
                await engine.connect()
        finally:
            await engine.dispose()
    return refused.value


async def test_only_what_an_error_was_raised_from_classifies_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = await _refused()
    assert isinstance(refused, ConnectionRefusedError)
    assert is_unavailable(refused)
    # a wrapper raised from it (a fallback, GraphQL's original_error) is an outage, named by it
    try:
        raise RuntimeError("a resolver raised") from refused
    except RuntimeError as wrapper:
        assert is_unavailable(wrapper)
        caplog.set_level(logging.INFO, logger="consumers_graphql")
        Outage(1).failed(wrapper)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("database unavailable (ConnectionRefusedError: "), warning
    # a bug raised while handling one is a bug (500), not an outage
    try:
        try:
            raise refused
        except OSError:
            {}["missing"]
    except KeyError as bug:
        assert bug.__context__ is refused
        assert not is_unavailable(bug)
    # nor is every OSError: a missing file, a permission
    assert not is_unavailable(FileNotFoundError(2, "No such file or directory"))
    assert not is_unavailable(PermissionError(13, "Permission denied"))
