"""Readiness and outages, database by database: /readyz probes the primary and the read
replica through connections of their own (not the requests' pools), answers 503 with a
reason naming the one that failed and why (by the error's class, never its message), and
the primary and the replica each have their own outage in the log. `serve` refuses a replica
it cannot use at start (exit 2)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app
from tests.conftest import (
    ADMIN_DATABASE_URL,
    TEST_DATABASE_URL,
    bearer,
    kept_returned,
    new_database,
    on_path,
)
from tests.processes import PostgresCluster, free_port
from tests.test_observability import metrics, value

needs_postgresql = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="a read replica, a missing database or role: PostgreSQL")

QUERY = "{ consumers(first: 2) { totalCount } }"
CREATE = """mutation { consumerCreate(input: {email: "replica.down@example.com"}) {
  consumer { id email } userErrors { code } } }"""
REST = "/api/v1/consumers"
MISSING = "consumers_nosuchdb_fixdb"
# Behind a pooler (CI's run through pgbouncer) a database or role the server refuses is the
# pooler's own error (a login failure), not the server's SQLSTATE.
BEHIND_POOLER = ADMIN_DATABASE_URL != TEST_DATABASE_URL
server_refusals = pytest.mark.skipif(
    BEHIND_POOLER, reason="the server's refusal reaches the client as the pooler's error")


def _on_server(**parts: str) -> str:
    """The test server's URL with another database or user."""
    assert TEST_DATABASE_URL
    return make_url(TEST_DATABASE_URL).set(**parts).render_as_string(hide_password=False)  # type: ignore[arg-type]


async def _migrated(url: str) -> None:
    engine = make_engine(Settings(database_url=url), writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


@asynccontextmanager
async def _served(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def _database_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "consumers_graphql.db"]


@needs_postgresql
async def test_readyz_checks_the_replica_and_metrics_show_its_pool(
    settings: Settings, execution_path: str
) -> None:
    async with new_database("consumers_replica") as replica_url:
        await _migrated(replica_url)
        app = create_app(settings.model_copy(update={"database_replica_url": replica_url,
                                                     "retry_after_s": 4}))
        on_path(app, execution_path)
        async with _served(app) as client:
            # given a primary and a replica that answer: ready
            response = await client.get("/readyz")
            assert response.status_code == 200 and response.json() == {"status": "ok"}
            # and /metrics has the replica's pool beside the others
            samples = await metrics(client)
            for pool in ("primary", "write", "replica"):
                assert ("consumers_db_pool_size", frozenset({("pool", pool)})) in samples, pool
            assert value(samples, "consumers_db_pool_size", pool="replica") == settings.pool_size
            assert ("consumers_db_pool_checked_out", frozenset({("pool", "replica")})
                    ) in samples

            # when a query has read the replica, its pool shows it, all given back
            key = bearer((await app.state.keys.create("replica pool")).secret
                         .get_secret_value())
            response = await client.post("/graphql", headers=key, json={"query": QUERY})
            assert response.status_code == 200, response.text
            await kept_returned(app)  # (kept for a next request a moment: store/db.py)
            samples = await metrics(client)
            assert value(samples, "consumers_db_pool_checked_out", pool="replica") == 0
            # and a connection held on the replica shows there, not in the primary's pools
            async with app.state.database.replica_engine.connect():
                samples = await metrics(client)
            assert value(samples, "consumers_db_pool_checked_out", pool="replica") == 1
            assert value(samples, "consumers_db_pool_checked_out", pool="primary") == 0

            # when the replica's database is gone while the primary answers
            await _drop(replica_url)
            for path in ("/readyz", "/healthz"):
                response = await client.get(path)
                # then not ready, and the reason names the replica, not the primary
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "4"
                reason = response.json()["reason"]
                assert reason.startswith(
                    "read replica refused the probe (CONSUMERS_DATABASE_REPLICA_URL): "
                    if not BEHIND_POOLER else "read replica "), reason
            # and the primary alone would be ready
            assert app.state.database.replica_probe is not None
            app.state.database.replica_probe = None
            assert (await client.get("/readyz")).status_code == 200


async def _drop(url: str) -> None:
    assert ADMIN_DATABASE_URL
    admin = create_async_engine(make_url(ADMIN_DATABASE_URL), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(
                f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@needs_postgresql
async def test_replica_down_readyz_names_it_reads_503_writes_go_on_one_warning_each_way(
    settings: Settings, cluster: PostgresCluster, execution_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="consumers_graphql")
    await _migrated(cluster.url)
    app = create_app(settings.model_copy(update={"database_replica_url": cluster.url,
                                                 "retry_after_s": 6}))
    on_path(app, execution_path)
    async with _served(app) as client:
        key = bearer((await app.state.keys.create("replica down")).secret.get_secret_value())
        # given a replica that answers
        assert (await client.get("/readyz")).json() == {"status": "ok"}
        response = await client.post("/graphql", headers=key, json={"query": QUERY})
        assert response.status_code == 200, response.text

        # when it stops, the primary still up
        cluster.stop()
        for _ in range(3):
            # then /readyz names the replica
            response = await client.get("/readyz")
            assert response.status_code == 503, response.text
            assert response.json() == {"status": "unavailable",
                                       "reason": "read replica unreachable"}
            # and reads are 503, each after a key check on the primary that works
            response = await client.post("/graphql", headers=key, json={"query": QUERY})
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "6"
            [error] = response.json()["errors"]
            assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE"
            response = await client.get(REST, headers=key)
            assert response.status_code == 503, response.text
        # while writes go on, on the primary, their payloads read there
        response = await client.post("/graphql", headers=key, json={"query": CREATE})
        assert response.status_code == 200, response.text
        assert response.json()["data"]["consumerCreate"]["consumer"]["email"] == (
            "replica.down@example.com")
        assert not app.state.database.outage.down
        assert app.state.database.replica_outage.down

        # when the replica is back, then the next probe finds it, and reads work again
        cluster.start()
        assert (await client.get("/readyz")).json() == {"status": "ok"}
        response = await client.post("/graphql", headers=key, json={"query": QUERY})
        assert response.status_code == 200, response.text
        assert not app.state.database.replica_outage.down

    # one warning for the replica's outage, naming it, one line for its end; the primary's
    # outage never began (the key checks that worked did not end the replica's either)
    log = _database_log(caplog)
    assert sum(m.startswith("read replica unavailable (") for m in log) == 1, log
    assert sum(m.startswith("read replica available again") for m in log) == 1, log
    assert not any(m.startswith("database unavailable") or
                   m.startswith("database available again") for m in log), log
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)


@needs_postgresql
@server_refusals
@pytest.mark.parametrize(("role", "user", "database", "problem"), [
    ("replica", None, MISSING, "InvalidCatalogNameError (SQLSTATE 3D000)"),
    ("replica", "nosuchrole_fixdb", None,
     "InvalidAuthorizationSpecificationError (SQLSTATE 28000)"),
    ("primary", None, MISSING, "InvalidCatalogNameError (SQLSTATE 3D000)"),
    ("primary", "nosuchrole_fixdb", None,
     "InvalidAuthorizationSpecificationError (SQLSTATE 28000)"),
])
async def test_a_database_that_refuses_the_connection_is_503_naming_the_setting(
    settings: Settings, caplog: pytest.LogCaptureFixture, role: str, user: str | None,
    database: str | None, problem: str,
) -> None:
    """A missing database or role (or a bad password): not ready, why (the setting, the
    error's class and SQLSTATE), never the driver's message or the URL; no traceback."""
    parts = {k: v for k, v in (("username", user), ("database", database)) if v}
    wrong = _on_server(**parts)
    update = ({"database_replica_url": wrong} if role == "replica" else {"database_url": wrong})
    app = create_app(settings.model_copy(update={**update, "retry_after_s": 5}))
    async with _served(app) as client:
        for _ in range(2):
            response = await client.get("/readyz")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            name, setting = (("read replica", "CONSUMERS_DATABASE_REPLICA_URL")
                             if role == "replica" else ("database", "CONSUMERS_DATABASE_URL"))
            assert response.json() == {
                "status": "unavailable",
                "reason": f"{name} refused the probe ({setting}): {problem}"}
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records), [
        r.getMessage() for r in caplog.records]


async def _hold_every_connection(app: FastAPI) -> list[AsyncConnection]:
    """Every connection the primary's read pool has, its overflow included."""
    engine = app.state.database.primary_engine
    held: list[AsyncConnection] = []
    for _ in range(50):
        try:
            held.append(await asyncio.wait_for(engine.connect(), 1.0))
        except TimeoutError:
            return held
    raise AssertionError("the pool never ran out")


async def test_readyz_says_ready_while_requests_hold_every_pooled_connection(
    settings: Settings,
) -> None:
    # given a process whose pools are all in use, for longer than the probe's timeout
    app = create_app(settings.model_copy(update={"pool_size": 1, "health_timeout_s": 1}))
    async with _served(app) as client:
        held = await _hold_every_connection(app)
        try:
            assert len(held) >= 2
            # then it is still ready: the probe does not queue behind the requests
            for _ in range(2):  # the schema read, then SELECT 1
                response = await client.get("/readyz")
                assert response.status_code == 200, response.text
        finally:
            for conn in held:
                await conn.close()


@needs_postgresql
@pytest.mark.parametrize(("parts", "problem"), [
    ({"database": MISSING}, "InvalidCatalogNameError (SQLSTATE 3D000)"),
    ({"username": "nosuchrole_fixdb"},
     "InvalidAuthorizationSpecificationError (SQLSTATE 28000)"),
    ({"host": "127.0.0.1", "port": "1"}, "ConnectionRefusedError"),
])
def test_serve_refuses_a_replica_it_cannot_use_as_a_configuration_error(
    settings: Settings, tmp_path: Path, parts: dict[str, Any], problem: str,
) -> None:
    replica = _on_server(**parts)
    script = Path(sys.executable).with_name("consumers-graphql")
    env = {**os.environ, "CONSUMERS_DATABASE_URL": settings.database_url,
           "CONSUMERS_DATABASE_REPLICA_URL": replica, "CONSUMERS_KEY_PEPPER": "serve-pepper"}
    process = subprocess.Popen([str(script), "serve", "--port", str(free_port())], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"serve started with a replica it cannot use:\n{out}{err}") from None
    assert process.returncode == 2, out + err
    prefix = "Cannot connect to the read replica (CONSUMERS_DATABASE_REPLICA_URL): "
    assert err.strip() == f"{prefix}{problem}." or (BEHIND_POOLER and err.startswith(prefix)
                                                     and "\n" not in err.strip()), err
    assert MISSING not in err and "nosuchrole" not in err and "Traceback" not in err


@pytest.mark.skipif(bool(TEST_DATABASE_URL), reason="a SQLite file's lock")
async def test_readiness_probes_do_not_end_an_outage_of_a_locked_sqlite_file(
    settings: Settings, caplog: pytest.LogCaptureFixture, execution_path: str
) -> None:
    """The probe opens a connection at each call, which a locked file allows: that says
    nothing of writes, so the outage goes on (one warning, not one per probe)."""
    caplog.set_level(logging.INFO, logger="consumers_graphql")
    locked = settings.model_copy(update={"sqlite_busy_timeout_ms": 50})
    app = create_app(locked)
    on_path(app, execution_path)
    async with _served(app) as client:
        key = bearer((await app.state.keys.create("locked")).secret.get_secret_value())
        holder = sqlite3.connect(make_url(locked.database_url).database or "",
                                 isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
            for _ in range(3):
                response = await client.post(REST, headers=key, json={})
                assert response.status_code == 503, response.text
                assert (await client.get("/readyz")).status_code == 200  # reads go on
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    log = _database_log(caplog)
    assert sum(m.startswith("database unavailable") for m in log) == 1, log
    assert not any(m.startswith("database available again") for m in log), log


@pytest.mark.database
@needs_postgresql
async def test_a_start_refused_for_its_replica_leaves_a_new_database_untouched(
    tmp_path: Path,
) -> None:
    async with new_database("consumers_untouched") as primary:
        env = {**os.environ, "CONSUMERS_DATABASE_URL": primary,
               "CONSUMERS_DATABASE_REPLICA_URL": _on_server(database=MISSING),
               "CONSUMERS_KEY_PEPPER": "serve-pepper"}
        done = await asyncio.to_thread(
            subprocess.run, [str(Path(sys.executable).with_name("consumers-graphql")), "serve",
                             "--port", str(free_port())],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        # the replica is checked before anything is made: no schema, no key
        engine = create_async_engine(make_url(primary))
        try:
            async with engine.connect() as conn:
                tables = (await conn.execute(text(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = 'public'"))).scalar_one()
        finally:
            await engine.dispose()
        assert tables == 0
