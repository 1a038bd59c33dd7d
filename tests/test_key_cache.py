"""The per-process cache of verified API keys (CONSUMERS_KEY_CACHE_SECONDS): a key seen
recently costs no statement and no connection; a key revoked by another process (`keys
revoke`) is refused within the cache's time, at once when it is 0; a new key works at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import event

from consumers_graphql.settings import Settings
from consumers_graphql.store.keys import KeyStore
from consumers_graphql.web.app import create_app
from tests.conftest import GraphQL, StatementCounter, bearer, on_path
from tests.log_audit import AUDIT, asgi_client

TYPENAME = "{ __typename }"
QUERY = "{ consumers(first: 1) { totalCount } }"
# How long a test waits for a revocation to be seen, past the cache's time: a loaded
# machine's scheduling, never the normal case (the loop ends at the first 401).
MARGIN_S = 5.0


@pytest.fixture
def checkouts(app: FastAPI) -> Iterator[list[str]]:
    """The pool checkouts of the session app's engines, by engine URL."""
    seen: list[str] = []
    listeners = []
    for engine in app.state.database.engines:
        def on_checkout(*_args: Any, engine: Any = engine) -> None:
            seen.append(str(engine.url))
        event.listen(engine, "checkout", on_checkout)
        listeners.append((engine, on_checkout))
    yield seen
    for engine, listener in listeners:
        event.remove(engine, "checkout", listener)


async def test_a_key_seen_recently_costs_no_statement_and_no_connection(
    gql: GraphQL, sql: StatementCounter, checkouts: list[str]
) -> None:
    # given a key the server has just accepted (a look-up, and the first lastUsedAt write)
    with sql.counting():
        assert await gql.data(TYPENAME) == {"__typename": "Query"}
    assert any("api_keys" in s for s in sql.auth_statements), sql.auth_statements
    # when it is used again
    checkouts.clear()
    with sql.counting():
        for _ in range(3):
            assert await gql.data(TYPENAME) == {"__typename": "Query"}
    # then nothing is sent, and for `{ __typename }` no connection is even taken
    assert sql.auth_statements == [] and sql.statements == []
    assert checkouts == []
    # and a query sends its own statements only
    with sql.counting():
        assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert sql.auth_statements == [] and sql.count >= 1


def _store(app: FastAPI, **options: Any) -> KeyStore:
    """Another KeyStore on the app's database (another process's, as far as caches go)."""
    database = app.state.database
    assert app.state.settings.key_pepper is not None
    return KeyStore(database.primary_engine, database.write_engine,
                    app.state.settings.key_pepper, **options)


async def test_the_cache_forgets_the_least_recently_used_key(
    app: FastAPI, sql: StatementCounter
) -> None:
    # given a store that remembers two keys, and three keys it accepted in turn
    keys = _store(app, cache_seconds=60, cache_size=2)
    first, second, third = [(await keys.create(name)).secret.get_secret_value()
                            for name in ("first", "second", "third")]
    for secret in (first, second, first, third):  # `second` is now the least recently used
        assert await keys.verify(secret) is not None
    # then the two used last answer from memory, the other is looked up again
    with sql.counting():
        assert await keys.verify(first) is not None
        assert await keys.verify(third) is not None
    assert sql.auth_statements == []
    with sql.counting():
        assert await keys.verify(second) is not None
    assert len(sql.auth_statements) == 1, sql.auth_statements


@asynccontextmanager
async def served(settings: Settings, cache_seconds: float,
                 execution_path: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"key_cache_seconds": cache_seconds}))
    on_path(app, execution_path)
    async with LifespanManager(app), asgi_client(app) as client:
        yield client


def cli(settings: Settings, *argv: str) -> str:
    """The `consumers-graphql` command, in a process of its own; its stdout."""
    assert settings.key_pepper is not None
    env = {**os.environ, "CONSUMERS_DATABASE_URL": settings.database_url,
           "CONSUMERS_KEY_PEPPER": settings.key_pepper.get_secret_value()}
    done = subprocess.run([sys.executable, "-m", "consumers_graphql.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def revoke_elsewhere(settings: Settings, key_id: str) -> None:
    out = await asyncio.to_thread(cli, settings, "keys", "revoke", key_id)
    assert "Revoked" in out, out


async def test_a_key_revoked_by_another_process_is_refused_within_the_cache_time(
    app: FastAPI, settings: Settings, execution_path: str
) -> None:
    # given a server that trusts a verified key for 0.2 s, and a key it has just accepted
    cache_seconds = 0.2
    created = await app.state.keys.create("revoked elsewhere")
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with served(settings, cache_seconds, execution_path) as client:
        gql = GraphQL(client, secret)
        assert await gql.data(TYPENAME) == {"__typename": "Query"}
        # when `keys revoke` runs in another process
        await revoke_elsewhere(settings, created.info.id)
        revoked_at = time.monotonic()
        # then the key is refused within the cache's time
        while (await client.post("/graphql", json={"query": TYPENAME},
                                 headers=bearer(secret))).status_code != 401:
            assert time.monotonic() - revoked_at < cache_seconds + MARGIN_S
            await asyncio.sleep(0.02)
        # and stays refused
        assert (await gql(QUERY, status=401))["errors"][0]["extensions"]["code"] == (
            "UNAUTHENTICATED")


async def test_without_the_cache_a_key_revoked_by_another_process_is_refused_at_once(
    app: FastAPI, settings: Settings, execution_path: str
) -> None:
    created = await app.state.keys.create("revoked elsewhere, no cache")
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with served(settings, 0, execution_path) as client:
        gql = GraphQL(client, secret)
        assert await gql.data(TYPENAME) == {"__typename": "Query"}
        await revoke_elsewhere(settings, created.info.id)
        # the very next request
        await gql(TYPENAME, status=401)


async def test_a_key_created_by_another_process_works_at_once(
    app: FastAPI, settings: Settings, execution_path: str
) -> None:
    # given a server that caches keys, and has just refused an unknown one
    async with served(settings, 60, execution_path) as client:
        await GraphQL(client, "sk_live_" + "x" * 40)(TYPENAME, status=401)
        # when a key is made by `keys create`, then its first request is served
        secret = (await asyncio.to_thread(cli, settings, "keys", "create", "--name", "new",
                                          "--secret-only")).strip()
        AUDIT.use(secret)
        assert await GraphQL(client, secret).data(TYPENAME) == {"__typename": "Query"}


async def test_a_key_in_use_is_refused_once_its_look_up_is_older_than_the_cache_time(
    app: FastAPI, sql: StatementCounter
) -> None:
    """The bound holds for a key in constant use: a hit does not make its entry younger."""
    # given a store on a clock of ours that trusts a verified key for 5 s, and a key it
    # has just accepted
    now = [1_000.0]
    keys = _store(app, cache_seconds=5, monotonic=lambda: now[0])
    created = await keys.create("in constant use")
    secret = created.secret.get_secret_value()
    assert await keys.verify(secret) is not None
    # when another store (another process) revokes it, while this one keeps using it
    await _store(app).revoke(created.info.id)
    answers = []
    for _ in range(20):
        now[0] += 0.5
        answers.append(await keys.verify(secret) is not None)
    # then it answered from memory until 5 s after its look-up, and never after
    assert answers == [True] * 9 + [False] * 11


async def test_a_look_up_that_a_revocation_overtakes_is_answered_but_not_remembered(
    app: FastAPI, sql: StatementCounter
) -> None:
    # given a store that caches keys, and a revocation through it that lands while a
    # look-up of the key is on the wire (after its statement ran, before it returns)
    keys = _store(app, cache_seconds=60)
    created = await keys.create("overtaken")
    secret = created.secret.get_secret_value()

    def revoked_meanwhile(*_args: Any) -> None:
        keys.forget(created.info.id)

    engine = app.state.database.primary_engine.sync_engine
    event.listen(engine, "after_cursor_execute", revoked_meanwhile, once=True)
    try:
        # when the look-up finishes, then it answers as the row it read said
        assert await keys.verify(secret) is not None
    finally:
        if event.contains(engine, "after_cursor_execute", revoked_meanwhile):
            event.remove(engine, "after_cursor_execute", revoked_meanwhile)
    # and the next use is looked up again, not answered from memory
    with sql.counting():
        await keys.verify(secret)
    assert len(sql.auth_statements) == 1, sql.auth_statements
