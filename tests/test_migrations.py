"""Migrations over a database that already holds data: SQLite's search indexes (0002) are
built from the rows there, and taken back down to 0001's.

On a SQLite file of their own, whichever database the rest of the suite runs on: 0002
changes nothing on PostgreSQL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from asgi_lifespan import LifespanManager
from sqlalchemy import create_engine

from consumers_graphql.app import create_app
from consumers_graphql.auth import READ_WRITE
from consumers_graphql.db import make_engine
from consumers_graphql.migrate import alembic_config, upgrade
from consumers_graphql.settings import Settings
from tests.conftest import GraphQL
from tests.factories import consumer_row, insert_consumers

SEARCH = """query Search($search: String!) {
  consumers(first: 50, search: $search) { totalCount nodes { email } }
}"""
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id } userErrors { field code } }
}"""
PEOPLE = [
    ("ana.lima@example.com", "+447700900123", "Ana Lima"),
    ("bruno@example.com", "+14155550100", "Bruno Costa"),
    ("desk+447700900@example.com", None, "Front Desk"),
]


def sqlite_settings(path: Path) -> Settings:
    return Settings(database_url=f"sqlite+aiosqlite:///{path}", sqlite_inline_read_ms=1_000)


async def migrate_to(settings: Settings, revision: str) -> None:
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine, revision)
    finally:
        await engine.dispose()


def downgrade_to(path: Path, revision: str) -> None:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def old_index_matches(path: Path, term: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM consumers_fts WHERE consumers_fts MATCH ?", (f'"{term}"',)
        ).fetchone()[0])


def search_tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger') "
            "AND (name LIKE 'consumers%fts' OR name LIKE 'consumers_%_insert')"
        ).fetchall()
    return {name for (name,) in rows}


@pytest.fixture
async def old_database(tmp_path: Path) -> Path:
    """A SQLite file at revision 0001 (one trigram index over search_text), with rows."""
    path = tmp_path / "old.db"
    settings = sqlite_settings(path)
    await migrate_to(settings, "0001")
    engine = make_engine(settings, writer=True)
    try:
        await insert_consumers(engine, [
            consumer_row(n, email=email, phone=phone, full_name=name)
            for n, (email, phone, name) in enumerate(PEOPLE)
        ])
    finally:
        await engine.dispose()
    return path


async def searches(path: Path, terms: list[str]) -> dict[str, list[str]]:
    """Each term's matches (their emails, sorted) through the API; one consumer created
    first, so that the triggers are exercised too."""
    app = create_app(sqlite_settings(path))
    async with LifespanManager(app):
        secret = (await app.state.keys.create("t", scopes=READ_WRITE)).secret
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            gql = GraphQL(client, secret.get_secret_value())
            created = (await gql.data(CREATE, {"input": {
                "email": "new@example.com", "phone": "+447700019946", "fullName": "New Lima",
            }}))["consumerCreate"]
            assert created["userErrors"] == []
            found: dict[str, list[str]] = {}
            for term in terms:
                data: Any = (await gql.data(SEARCH, {"search": term}))["consumers"]
                emails = sorted(node["email"] for node in data["nodes"])
                assert data["totalCount"] == len(emails)
                found[term] = emails
            return found


TERMS = ["lima", "+447700", "7700900", "0100", "desk+44", "+1415", "0199"]
EXPECTED = {
    "lima": ["ana.lima@example.com", "new@example.com"],
    "+447700": ["ana.lima@example.com", "desk+447700900@example.com", "new@example.com"],
    "7700900": ["ana.lima@example.com", "desk+447700900@example.com"],
    "0100": ["bruno@example.com"],
    "desk+44": ["desk+447700900@example.com"],
    "+1415": ["bruno@example.com"],
    "0199": ["new@example.com"],
}


async def test_upgrade_indexes_the_rows_already_there(old_database: Path) -> None:
    assert search_tables(old_database) == {"consumers_fts", "consumers_fts_insert"}

    await migrate_to(sqlite_settings(old_database), "head")

    assert search_tables(old_database) == {
        "consumers_text_fts", "consumers_phone_fts", "consumers_search_insert"
    }
    assert await searches(old_database, TERMS) == EXPECTED


async def test_downgrade_restores_the_single_index(old_database: Path) -> None:
    await migrate_to(sqlite_settings(old_database), "head")

    await searches(old_database, [])  # a consumer created at 0002
    downgrade_to(old_database, "0001")

    assert search_tables(old_database) == {"consumers_fts", "consumers_fts_insert"}
    matches = {term: old_index_matches(old_database, term) for term in ("lima", "7700900", "0199")}
    assert matches == {"lima": 2, "7700900": 2, "0199": 1}
