"""Migrations over a database that already holds data: the search indexes of 0002 (SQLite)
and 0003 (PostgreSQL) are built from the rows there, kept in step by the triggers, and the
downgrades take them away again.

Each test has a database of its own, of the kind the suite runs on: a SQLite file, or a
fresh database on the PostgreSQL server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from asgi_lifespan import LifespanManager
from sqlalchemy import text

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.keys import READ_WRITE
from consumers_graphql.store.migrate import alembic_config, upgrade
from consumers_graphql.web.app import create_app
from tests.conftest import TEST_DATABASE_URL, GraphQL, new_database, on_path
from tests.factories import consumer_row, insert_consumers
from tests.log_audit import AUDIT
from tests.processes import Served
from tests.test_bench_workloads import CREATE, DELETE, UPDATE

SEARCH = """query Search($search: String!) {
  consumers(first: 50, search: $search) { totalCount nodes { email } }
}"""
PEOPLE = [
    ("ana.lima@example.com", "+447700900123", "Ana Lima"),
    ("bruno@example.com", "+14155550100", "Bruno Costa"),
    ("desk+447700900@example.com", None, "Front Desk"),
    ("gone@example.com", None, "Soon Gone"),
]
TERMS = ["lima", "+447700", "7700900", "0100", "desk+44", "+1415", "0199", "costa", "gone"]
# After one consumer is created, one renamed and one deleted (see `searches`).
EXPECTED = {
    "lima": ["ana.lima@example.com", "new@example.com"],
    "+447700": ["ana.lima@example.com", "desk+447700900@example.com", "new@example.com"],
    "7700900": ["ana.lima@example.com", "desk+447700900@example.com"],
    "0100": ["bruno@example.com"],
    "desk+44": ["desk+447700900@example.com"],
    "+1415": ["bruno@example.com"],
    "0199": ["new@example.com"],
    "costa": [],
    "gone": [],
}


@pytest.fixture
async def old_url(tmp_path: Path) -> AsyncIterator[str]:
    """A database of its own at revision 0001, with rows."""
    async with AsyncExitStack() as stack:
        if TEST_DATABASE_URL:
            url = await stack.enter_async_context(new_database("consumers_migrations"))
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        settings = database_settings(url)
        await migrate_to(settings, "0001")
        engine = make_engine(settings, writer=True)
        try:
            await insert_consumers(engine, [
                consumer_row(n, email=email, phone=phone, full_name=name)
                for n, (email, phone, name) in enumerate(PEOPLE)
            ])
        finally:
            await engine.dispose()
        yield url


def database_settings(url: str) -> Settings:
    return Settings(database_url=url, sqlite_inline_read_ms=1_000)


async def migrate_to(settings: Settings, revision: str) -> None:
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine, revision)
    finally:
        await engine.dispose()


async def downgrade_to(url: str, revision: str) -> None:
    engine = make_engine(database_settings(url), writer=True)

    def run(connection: Any) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    try:
        async with engine.begin() as conn:
            await conn.run_sync(run)
    finally:
        await engine.dispose()


async def query(url: str, sql: str, **params: Any) -> list[Any]:
    engine = make_engine(database_settings(url), writer=False)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())
    finally:
        await engine.dispose()


async def search_objects(url: str) -> set[str]:
    """The dialect's search tables (shadow tables apart) and every trigger on consumers."""
    if url.startswith("sqlite"):
        rows = await query(url, "SELECT name FROM sqlite_master WHERE (type = 'table' AND "
                           "name LIKE 'consumer%' AND sql LIKE 'CREATE VIRTUAL TABLE%') OR "
                           "(type = 'trigger' AND tbl_name = 'consumers')")
    else:
        rows = await query(url, "SELECT tablename FROM pg_tables WHERE tablename = "
                           "'consumer_search' UNION SELECT tgname FROM pg_trigger WHERE "
                           "tgrelid = 'consumers'::regclass AND NOT tgisinternal")
    return {name for (name,) in rows}


async def searches(url: str, terms: list[str], execution_path: str) -> dict[str, list[str]]:
    """Each term's matches (their emails, sorted) through the API, after a consumer is
    created, one renamed and one deleted, so that the triggers are exercised too."""
    app = create_app(database_settings(url))
    on_path(app, execution_path)
    async with LifespanManager(app):
        secret = (await app.state.keys.create("t", scopes=READ_WRITE)).secret
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            gql = GraphQL(client, secret.get_secret_value())
            ids = {email: id_ for id_, email in await query(url, "SELECT id, email FROM consumers")}
            for operation, variables in (
                (CREATE, {"input": {"email": "new@example.com", "phone": "+447700019946",
                                    "fullName": "New Lima"}}),
                (UPDATE, {"id": ids["bruno@example.com"], "input": {"fullName": "Bruno"}}),
                (DELETE, {"id": ids["gone@example.com"]}),
            ):
                outcome = next(iter((await gql.data(operation, variables)).values()))
                assert outcome["userErrors"] == []
            found: dict[str, list[str]] = {}
            for term in terms:
                data: Any = (await gql.data(SEARCH, {"search": term}))["consumers"]
                emails = sorted(node["email"] for node in data["nodes"])
                assert data["totalCount"] == len(emails)
                found[term] = emails
            return found


async def test_upgrade_indexes_the_rows_already_there(old_url: str, execution_path: str) -> None:
    before = await search_objects(old_url)

    await migrate_to(database_settings(old_url), "head")

    if old_url.startswith("sqlite"):
        assert before == {"consumers_fts", *(
            f"consumers_fts_{event}" for event in ("insert", "update", "delete"))}
        assert await search_objects(old_url) == {"consumers_text_fts", "consumers_phone_fts", *(
            f"consumers_search_{event}"
            for event in ("insert", "update_text", "update_phone", "delete"))}
    else:
        assert before == set()
        assert await search_objects(old_url) == {"consumer_search", *(
            f"consumer_search_{event}" for event in ("insert", "update", "delete", "truncate"))}
    assert await searches(old_url, TERMS, execution_path) == EXPECTED
    if not old_url.startswith("sqlite"):  # the narrow copy holds exactly the table's text
        copy = await query(old_url, "SELECT id, search_text FROM consumer_search ORDER BY id")
        assert copy == await query(old_url, "SELECT id, search_text FROM consumers ORDER BY id")


async def test_downgrade_restores_what_was_there(old_url: str, execution_path: str) -> None:
    before = await search_objects(old_url)
    await migrate_to(database_settings(old_url), "head")
    await searches(old_url, [], execution_path)  # writes at the head revision

    await downgrade_to(old_url, "0001")

    assert await search_objects(old_url) == before
    # and writes still work, kept in 0001's index on SQLite
    engine = make_engine(database_settings(old_url), writer=True)
    try:
        await insert_consumers(engine, [consumer_row(
            9, email="later@example.com", phone="+14155550199", full_name="Later Lima")])
    finally:
        await engine.dispose()
    if old_url.startswith("sqlite"):  # rebuilt with what was written at 0002, then kept
        matches = {term: (await query(
            old_url, "SELECT count(*) FROM consumers_fts WHERE consumers_fts MATCH :m",
            m=f'"{term}"'))[0][0] for term in ("lima", "7700900", "0199", "costa")}
        assert matches == {"lima": 3, "7700900": 2, "0199": 2, "costa": 0}


def _serve_on(url: str, directory: Path) -> tuple[int | None, str]:
    """`serve` on ``url``: its exit code if it stopped by itself within its start, and its
    output; a server that came up answers an authenticated REST list first."""
    served = Served(url, directory)
    try:
        served.wait_until_up()
    except AssertionError:
        return served.process.wait(timeout=30), served.output
    try:
        response = served.get("/api/v1/consumers?first=1",
                              headers={"Authorization": f"Bearer {served.secret()}"})
        assert response.status_code == 200, response.text
    finally:
        assert served.stop() == 0, served.output
    return None, served.output


@pytest.mark.database
async def test_serve_refuses_a_database_behind_the_code_and_serves_one_ahead_of_it(
    old_url: str, tmp_path: Path
) -> None:
    # given a database at 0001: behind this version, so `serve` refuses it, naming the command
    code, output = await asyncio.to_thread(_serve_on, old_url, tmp_path)
    assert code not in (None, 0), output
    assert "schema revision 0001" in output and "consumers-graphql migrate" in output, output
    assert "Traceback" not in output, output
    # when a newer release has migrated it past this version's head (its revision unknown here)
    await migrate_to(database_settings(old_url), "head")
    engine = make_engine(database_settings(old_url), writer=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00d0newer'"))
    finally:
        await engine.dispose()
    # then this version serves it (expand/contract migrations: a rolling deploy or a
    # roll-back runs the older version on the newer schema), and says so
    code, output = await asyncio.to_thread(_serve_on, old_url, tmp_path)
    assert code is None, output
    assert "f00d0newer, newer than this version's" in output, output


@pytest.mark.database
async def test_downgrading_the_rate_limit_columns_keeps_the_idempotency_keys(
    old_url: str,
) -> None:
    """0005's downgrade drops two columns of api_keys. Rebuilding the table (SQLite's batch
    mode) would drop it first, and with it, by its foreign key's ON DELETE CASCADE, every
    idempotency key: retries of writes already made would then run again."""
    await migrate_to(database_settings(old_url), "head")
    engine = make_engine(database_settings(old_url), writer=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO api_keys (id, name, prefix, secret_hash, scopes, created_at, "
                "rate_limit_capacity) VALUES ('key_1', 'k', 'sk_test_', 'h', 'read write', "
                ":now, 10)"), {"now": datetime.now(UTC)})
            await conn.execute(text(
                "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, status, headers, "
                "body, created_at) VALUES ('key_1', 'retry-1', 'f', 201, '[]', :body, :now)"),
                {"body": b"{}", "now": datetime.now(UTC)})
    finally:
        await engine.dispose()
    await downgrade_to(old_url, "0004")
    assert await query(old_url, "SELECT key FROM idempotency_keys") == [("retry-1",)]
    assert await query(old_url, "SELECT id, name FROM api_keys") == [("key_1", "k")]
