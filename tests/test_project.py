"""The artefacts around the API: the exported schema, migrations, seed data, the server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from consumers_graphql.api.schema import build_schema
from consumers_graphql.cli import main as cli
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.models import Base
from tests.conftest import TEST_DATABASE_URL, GraphQL, project_root
from tests.test_bench_workloads import reference_match, walk


def test_schema_graphql_matches_the_running_schema() -> None:
    exported = (project_root() / "schema.graphql").read_text(encoding="utf-8")
    assert exported == build_schema().public_sdl() + "\n", (
        "schema.graphql is stale: run `consumers-graphql export-schema -o schema.graphql`"
    )


def test_export_schema_command_writes_the_schema(tmp_path: Path) -> None:
    target = tmp_path / "schema.graphql"
    assert cli(["export-schema", "-o", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == build_schema().public_sdl() + "\n"


async def test_migrations_match_the_models(settings: Settings) -> None:
    engine = make_engine(settings, writer=False)

    def migration_only(name: str | None, type_: str, _parent: Any) -> bool:
        # Search indexes are dialect-specific and live only in the migrations: SQLite's FTS5
        # tables (and their shadow tables), PostgreSQL's trigram GIN indexes and its
        # consumer_search table.
        return not (name or "").startswith((
            "consumers_text_fts", "consumers_phone_fts", "ix_consumers_search_text_trgm",
            "consumer_search", "ix_consumer_search_trgm"))

    def diff(connection: Any) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": migration_only}
        )
        return compare_metadata(context, Base.metadata)

    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []


async def test_seed_produces_consistent_totals(
    settings: Settings, app: Any, gql: GraphQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a seeded database (through the CLI entry point)
    monkeypatch.setenv("CONSUMERS_DATABASE_URL", settings.database_url)
    result = await _run_cli_in_thread(["seed", "--consumers", "300", "--random-seed", "5",
                                       "--quiet"])
    assert result == 0

    # then every consumer's totals equal a recomputation from its orders
    engine = app.state.database.read_engine
    async with engine.connect() as conn:
        consumers = (await conn.execute(text(
            "SELECT id, total_orders, total_order_value, last_order_at, email, phone, "
            "full_name, metadata FROM consumers"))).all()
        orders = (await conn.execute(text(
            "SELECT consumer_id, count(*), sum(amount), max(placed_at) FROM orders "
            "GROUP BY consumer_id"))).all()
        members = (await conn.execute(text("SELECT count(*) FROM consumer_audiences"))).scalar()
    assert len(consumers) == 300
    by_consumer = {row[0]: row[1:] for row in orders}
    for consumer in consumers:
        # raw column values on both sides: the same storage, so equality is exact
        count, total, last = by_consumer.get(consumer.id, (0, 0, None))
        assert consumer.total_orders == count
        assert consumer.total_order_value == total
        assert consumer.last_order_at == last
    assert sum(1 for c in consumers if c.total_orders) > 100
    assert members and members > 100
    # realistic, with some NULLs
    assert any(c.email is None for c in consumers) and any(c.phone is None for c in consumers)
    assert all(c.phone is None or re.fullmatch(r"\+[1-9]\d{6,14}", c.phone) for c in consumers)
    assert any(c.metadata is not None for c in consumers)
    # emails the API itself would accept (RFC 2606 example domains)
    assert all(c.email is None or re.fullmatch(r"[^@\s]+@example\.(com|org|net)", c.email)
               for c in consumers)

    # and seeding again adds more, numbered on from what is there
    assert await _run_cli_in_thread(["seed", "--consumers", "50", "--quiet"]) == 0
    async with engine.connect() as conn:
        total = (await conn.execute(text("SELECT count(*) FROM consumers"))).scalar()
        rows = (await conn.execute(text("SELECT id, email, phone, full_name FROM consumers")))
        people = {row.id: (row.email, row.phone, row.full_name) for row in rows}
    assert total == 350

    # and both runs are in the search indexes (filled in bulk on SQLite)
    first_run = {c.id for c in consumers}
    first, second = (
        next(p for id_, p in people.items() if p[0] and p[1] and (id_ in first_run) is run)
        for run in (True, False)
    )
    for email, phone, _ in (first, second):
        for term in (email.split("@")[0], phone[:7], phone[-6:]):
            ids, count = await walk(gql, term)
            expected = {id_ for id_, person in people.items() if reference_match(term, person)}
            assert (set(ids), count) == (expected, len(expected))


async def _run_cli_in_thread(argv: list[str]) -> int:
    # The CLI runs an event loop of its own.
    return await asyncio.to_thread(cli, argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_answers_a_query_over_http(tmp_path: Path, settings: Settings) -> None:
    # given `consumers-graphql serve` on a free port, on a fresh SQLite file (or the
    # PostgreSQL test database)
    port = _free_port()
    if TEST_DATABASE_URL:
        url = settings.database_url
        asyncio.run(_forget_keys(settings))  # so that this start is a first start
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "CONSUMERS_DATABASE_URL": url}
    process = subprocess.Popen(
        [sys.executable, "-m", "consumers_graphql.cli", "serve", "--port", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")))
    reader.start()
    try:
        body = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and body is None:
            headers = _authorization(output)
            if not headers:  # the first start prints its key once it has made it
                time.sleep(0.1)
                continue
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/graphql",
                    json={"query": "{ consumers(first: 1) { totalCount nodes { id } } }"},
                    headers=headers,
                    timeout=5,
                )
                body = response.json()
            except httpx.TransportError:
                time.sleep(0.2)
        # then it answers over real HTTP
        assert body is not None, "".join(output)
        assert body["data"] == {"consumers": {"totalCount": 0, "nodes": []}}, body
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        reader.join(timeout=5)
    # and stops cleanly on SIGTERM
    assert process.returncode == 0, "".join(output)


async def _forget_keys(settings: Settings) -> None:
    engine = make_engine(settings, writer=True)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM api_keys"))
    finally:
        await engine.dispose()


def _authorization(output: list[str]) -> dict[str, str]:
    """Authenticates with the key a first start prints."""
    for line in list(output):
        match = re.search(r"\bsk_(?:live|test)_[A-Za-z0-9_\-]+", line)
        if match:
            return {"Authorization": f"Bearer {match.group(0)}"}
    return {}
