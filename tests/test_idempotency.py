"""Idempotency-Key on REST writes and GraphQL mutations: replays byte for byte, refusals of a
reused or running key, keys of two API keys apart, malformed keys, 5xx not recorded, expiry
and pruning, concurrent duplicates, and a `kill -9` of the server during a keyed batch."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import func, select, text, update

from consumers_graphql.settings import Settings
from consumers_graphql.store import idempotency, models
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.idempotency import PRUNE_BATCH, now_utc
from consumers_graphql.store.keys import READ_WRITE
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.store.outage import is_unavailable
from consumers_graphql.web.app import create_app
from tests.conftest import (
    TEST_DATABASE_URL,
    StatementCounter,
    _new_key,
    bearer,
    new_migrated_database,
    on_path,
)
from tests.log_audit import asgi_client
from tests.processes import PostgresCluster, Served

URL = "/api/v1/consumers"
BATCH = f"{URL}/batch"
KEY = "Idempotency-Key"
REPLAYED = "idempotent-replayed"
keys_table = models.IdempotencyKey.__table__
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id email } userErrors { code } } }"""
# Two fields, and a payload whose relations must show the first field's write.
TWO_FIELDS = """mutation Two($input: ConsumerCreateInput!, $id: ID!) {
  a: consumerCreate(input: $input) { consumer { id email } userErrors { code } }
  b: orderRecord(input: {consumerId: $id, amount: 10, currency: "EUR",
                         placedAt: "2024-01-01T00:00:00Z"}) {
    order { amount consumer { totalOrders totalOrderValue } } userErrors { code } } }"""


def person(n: int) -> dict[str, Any]:
    return {"email": f"idem{n}@example.com", "fullName": f"Idem {n}"}


async def count(engine: Any, model: Any = models.Consumer) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


def keyed(headers: dict[str, str], key: str) -> dict[str, str]:
    return {**headers, KEY: key}


def assert_same(first: httpx.Response, second: httpx.Response) -> None:
    """The replay is the first answer, byte for byte, marked as a replay."""
    assert REPLAYED not in first.headers
    assert second.headers.get(REPLAYED) == "true", second.headers
    assert second.status_code == first.status_code
    assert second.content == first.content
    for name in ("content-type", "location"):
        assert second.headers.get(name) == first.headers.get(name), name


async def post_graphql(client: httpx.AsyncClient, headers: dict[str, str], query: str,
                       variables: dict[str, Any]) -> httpx.Response:
    return await client.post("/graphql", json={"query": query, "variables": variables},
                             headers=headers)


# -- replays -----------------------------------------------------------------------------


async def test_rest_create_is_replayed_and_written_once(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    headers = keyed(auth_headers, "create-1")
    first = await client.post(URL, json=person(1), headers=headers)
    assert first.status_code == 201, first.text
    # the same request, its JSON spelt otherwise (key order, whitespace)
    again = await client.post(
        URL, content=b'{ "fullName": "Idem 1",\n "email": "idem1@example.com" }',
        headers={**headers, "Content-Type": "application/json"})
    assert_same(first, again)
    assert again.headers["location"] == f"{URL}/{first.json()['id']}"
    assert await count(write_engine) == 1
    assert await count(write_engine, models.IdempotencyKey) == 1


async def test_rest_batch_create_update_and_delete_are_replayed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    batch = [person(n) for n in range(3)]
    first = await client.post(BATCH, json=batch, headers=keyed(auth_headers, "batch"))
    assert first.status_code == 201, first.text
    assert_same(first, await client.post(BATCH, json=batch, headers=keyed(auth_headers,
                                                                            "batch")))
    assert await count(write_engine) == 3
    ids = [row["id"] for row in first.json()]

    # an update, replayed after a later change: the first answer, not the current row
    change = {"fullName": "Renamed"}
    updated = await client.put(f"{URL}/{ids[0]}", json=change,
                               headers=keyed(auth_headers, "update"))
    assert updated.status_code == 200 and updated.json()["fullName"] == "Renamed"
    later = await client.put(f"{URL}/{ids[0]}", json={"fullName": "Later"}, headers=auth_headers)
    assert later.status_code == 200
    assert_same(updated, await client.put(f"{URL}/{ids[0]}", json=change,
                                          headers=keyed(auth_headers, "update")))
    row = await client.get(f"{URL}/{ids[0]}", headers=auth_headers)
    assert row.json()["fullName"] == "Later"

    # a delete, replayed: the deleted consumer again, not 404
    deleted = await client.delete(f"{URL}/{ids[1]}", headers=keyed(auth_headers, "delete"))
    assert deleted.status_code == 200, deleted.text
    assert_same(deleted, await client.delete(f"{URL}/{ids[1]}",
                                             headers=keyed(auth_headers, "delete")))
    assert await count(write_engine) == 2
    # a batch update, replayed
    items = [{"id": ids[0], "phone": "+14155550100"}, {"id": ids[2], "fullName": "Third"}]
    batch_updated = await client.put(BATCH, json=items, headers=keyed(auth_headers, "bu"))
    assert batch_updated.status_code == 200, batch_updated.text
    assert_same(batch_updated, await client.put(BATCH, json=items,
                                                headers=keyed(auth_headers, "bu")))


async def test_a_refusal_of_the_use_case_is_recorded_and_replayed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    created = await client.post(URL, json=person(1), headers=auth_headers)
    assert created.status_code == 201
    # a taken email: the use-case ran and refused, its answer is the key's
    first = await client.post(URL, json=person(1), headers=keyed(auth_headers, "taken"))
    assert first.status_code == 400, first.text
    await client.delete(f"{URL}/{created.json()['id']}", headers=auth_headers)
    assert_same(first, await client.post(URL, json=person(1),
                                         headers=keyed(auth_headers, "taken")))
    assert await count(write_engine) == 0


async def test_a_body_refused_before_the_use_case_is_not_recorded(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    malformed = await client.post(URL, content=b'{"email": ', headers={
        **keyed(auth_headers, "fixed"), "Content-Type": "application/json"})
    assert malformed.status_code == 400
    # the request fixed, with the same key: run, not refused as another request's key
    fixed = await client.post(URL, json=person(1), headers=keyed(auth_headers, "fixed"))
    assert fixed.status_code == 201, fixed.text
    assert await count(write_engine) == 1


async def test_a_refusal_of_the_input_alone_is_not_recorded_and_the_fixed_request_runs(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    execution_path: str,
) -> None:
    """As Stripe: a request that fails validation wrote nothing and would fail again, so
    its answer is not kept, and the fixed request is sent with the same key (an answer
    that depends on the database, such as a taken email, is kept: see above)."""
    headers = keyed(auth_headers, "invalid-rest")
    for body in ({"email": "not-an-email"}, {"email": 5}):
        refused = await client.post(URL, json=body, headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "Validation failed"
    fixed = await client.post(URL, json=person(1), headers=headers)
    assert fixed.status_code == 201, fixed.text
    assert_same(fixed, await client.post(URL, json=person(1), headers=headers))

    headers = keyed(auth_headers, "invalid-batch")
    refused = await client.post(BATCH, json=[{"email": "x"}, {"email": "y"}], headers=headers)
    assert refused.status_code == 400, refused.text
    fixed = await client.post(BATCH, json=[person(2)], headers=headers)
    assert fixed.status_code == 201, fixed.text

    headers = keyed(auth_headers, "invalid-gql")
    refused = await post_graphql(client, headers, CREATE, {"input": {"email": "nope"}})
    assert refused.json()["data"]["consumerCreate"]["userErrors"] == [
        {"code": "VALIDATION_FAILED"}], refused.text
    fixed = await post_graphql(client, headers, CREATE, {"input": person(3)})
    assert fixed.json()["data"]["consumerCreate"]["consumer"] is not None, fixed.text
    assert_same(fixed, await post_graphql(client, headers, CREATE, {"input": person(3)}))
    assert await count(write_engine) == 3
    assert await count(write_engine, models.IdempotencyKey) == 3


async def test_graphql_mutations_are_replayed_one_transaction_for_every_field(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    execution_path: str,
) -> None:
    headers = keyed(auth_headers, "gql-1")
    variables = {"input": person(1)}
    first = await post_graphql(client, headers, CREATE, variables)
    assert first.status_code == 200, first.text
    consumer_id = first.json()["data"]["consumerCreate"]["consumer"]["id"]
    assert_same(first, await post_graphql(client, headers, CREATE, variables))
    assert await count(write_engine) == 1

    # a document of two fields: the second's payload reads the first's uncommitted write
    headers = keyed(auth_headers, "gql-2")
    variables = {"input": person(2), "id": consumer_id}
    both = await post_graphql(client, headers, TWO_FIELDS, variables)
    assert both.status_code == 200, both.text
    data = both.json()["data"]
    assert data["a"]["consumer"]["email"] == "idem2@example.com"
    assert data["b"]["order"]["consumer"] == {"totalOrders": 1, "totalOrderValue": 10}
    assert_same(both, await post_graphql(client, headers, TWO_FIELDS, variables))
    assert await count(write_engine) == 2
    assert await count(write_engine, models.Order) == 1

    # a query with a key: the key is ignored
    query = await post_graphql(client, keyed(auth_headers, "gql-1"),
                               "{ consumers { totalCount } }", {})
    assert query.status_code == 200 and REPLAYED not in query.headers
    assert query.json()["data"] == {"consumers": {"totalCount": 2}}


async def test_a_keyed_document_over_the_token_limit_is_refused_without_being_parsed_whole(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str
) -> None:
    """The key's check of "is this a mutation" parses under the execution's token limit:
    a body of ~1 MB of fields costs what it costs without a key (lexing stops at the limit),
    not a whole parse on the event loop (1.3 s of CPU more, every other request stalled).
    Measured against the same request without a key, the best of three each, so that a
    slow or busy machine moves both alike."""
    fields = " ".join(f"f{n}: __typename" for n in range(52_000))
    document = f"mutation {{ {fields} }}"
    assert len(document) < 1_000_000  # under the body limit: the parse is what is measured

    async def cpu(headers: dict[str, str]) -> float:
        best = math.inf
        for _ in range(3):
            started = time.process_time()
            response = await client.post("/graphql", json={"query": document}, headers=headers)
            best = min(best, time.process_time() - started)
            assert response.status_code == 200, response.text
            assert "more than 5000 tokens" in response.json()["errors"][0]["message"]
        return best

    without = await cpu(auth_headers)
    with_key = await cpu(keyed(auth_headers, "many-tokens"))
    assert with_key < 2 * without + 0.1, (
        f"{with_key:.2f} s of CPU with the key, {without:.2f} without")


async def test_a_graphql_replay_is_in_the_media_type_its_request_negotiated(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str
) -> None:
    """A retry may come from another client of the BFF's: the first asked for
    application/graphql-response+json, the retry for application/json only."""
    body = {"query": CREATE, "variables": {"input": person(1)}}
    first = await client.post("/graphql", json=body, headers={
        **keyed(auth_headers, "media"), "Accept": "application/graphql-response+json"})
    assert first.headers["content-type"] == "application/graphql-response+json; charset=utf-8"
    again = await client.post("/graphql", json=body, headers={
        **keyed(auth_headers, "media"), "Accept": "application/json"})
    assert again.headers.get(REPLAYED) == "true"
    assert again.status_code == first.status_code == 200
    assert again.content == first.content
    assert again.headers["content-type"] == "application/json; charset=utf-8"


async def test_the_query_string_in_another_order_or_encoding_is_the_same_request(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    headers = keyed(auth_headers, "query-order")
    first = await client.post(f"{URL}?b=2&a=1&a=0", json=person(1), headers=headers)
    assert first.status_code == 201, first.text
    assert_same(first, await client.post(f"{URL}?a=1&b=%32&a=0", json=person(1),
                                         headers=headers))
    # the values of one name in another order are another request
    refused = await client.post(f"{URL}?a=0&a=1&b=2", json=person(1), headers=headers)
    assert refused.status_code == 422, refused.text
    assert await count(write_engine) == 1


@pytest.mark.parametrize("accept", ["application/json", "application/graphql-response+json"])
async def test_graphql_refusals_of_a_key_are_in_the_negotiated_media_type(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str, accept: str
) -> None:
    """Under application/graphql-response+json a 4xx in application/json is not a GraphQL
    response to its client (GraphQL over HTTP): the refusal's code could not be relied on."""
    headers = {**keyed(auth_headers, "negotiated"), "Accept": accept}
    first = await post_graphql(client, headers, CREATE, {"input": person(1)})
    assert first.status_code == 200, first.text
    reused = await post_graphql(client, headers, CREATE, {"input": person(2)})
    assert reused.status_code == 422, reused.text
    assert reused.headers["content-type"] == f"{accept}; charset=utf-8"
    assert reused.json()["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"


# -- refusals ----------------------------------------------------------------------------


async def test_a_key_reused_for_another_request_is_422(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    execution_path: str,
) -> None:
    headers = keyed(auth_headers, "reused")
    assert (await client.post(URL, json=person(1), headers=headers)).status_code == 201
    for response in (await client.post(URL, json=person(2), headers=headers),
                     await client.post(BATCH, json=[person(1)], headers=headers),
                     await client.post(f"{URL}?x=1", json=person(1), headers=headers)):
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "Idempotency-Key reused"
        [detail] = response.json()["details"]
        assert detail["field"] == KEY and "another request" in detail["message"]
    response = await post_graphql(client, headers, CREATE, {"input": person(1)})
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    # GraphQL's own: another document or other variables with one key
    headers = keyed(auth_headers, "reused-gql")
    assert (await post_graphql(client, headers, CREATE, {"input": person(3)})).status_code == 200
    response = await post_graphql(client, headers, CREATE, {"input": person(4)})
    assert response.json()["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await count(write_engine) == 2


async def test_keys_of_two_api_keys_are_independent(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    other = bearer(await _new_key(app, "other", READ_WRITE))
    first = await client.post(URL, json=person(1), headers=keyed(auth_headers, "shared"))
    second = await client.post(URL, json=person(2), headers=keyed(other, "shared"))
    assert first.status_code == second.status_code == 201, second.text
    assert REPLAYED not in second.headers
    assert await count(write_engine) == 2


@pytest.mark.parametrize("value", [b"", b" ", b"x" * 256, "cl\u00e9".encode(), b"a\x01b",
                                   b"two words", b"tab\there"])
async def test_a_malformed_key_is_400_and_nothing_is_written(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any, value: bytes,
    execution_path: str,
) -> None:
    headers: dict[str, Any] = {**auth_headers, KEY: value}
    response = await client.post(URL, json=person(1), headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "Invalid Idempotency-Key"
    assert response.json()["details"][0]["field"] == KEY
    response = await client.post("/graphql", json={"query": CREATE,
                                                    "variables": {"input": person(1)}},
                                 headers=headers)
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["errors"][0]["message"]
    assert await count(write_engine) == 0
    assert await count(write_engine, models.IdempotencyKey) == 0


async def test_the_longest_key_and_the_drafts_quoted_form_are_taken(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    longest = "~" * 255
    first = await client.post(URL, json=person(1), headers=keyed(auth_headers, longest))
    assert first.status_code == 201, first.text
    assert_same(first, await client.post(URL, json=person(1),
                                         headers=keyed(auth_headers, f'"{longest}"')))


# -- concurrency -------------------------------------------------------------------------


@pytest.fixture
async def second_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """Another process's app on the same database: its own in-flight set, so the database
    alone keeps the two apart."""
    app = create_app(settings)
    async with LifespanManager(app):
        yield app


async def test_concurrent_duplicates_write_once(
    client: httpx.AsyncClient, second_app: FastAPI, auth_headers: dict[str, str],
    write_engine: Any, dialect: str,
) -> None:
    # a batch big enough for the first to still run when the others come
    batch = [person(n) for n in range(500 if dialect == "postgresql" else 200)]
    headers = keyed(auth_headers, "racing")
    async with asgi_client(second_app) as other:
        responses = await asyncio.gather(*(
            (client if n % 2 else other).post(BATCH, json=batch, headers=headers)
            for n in range(10)))
    statuses = sorted(response.status_code for response in responses)
    written = [r for r in responses if r.status_code == 201 and REPLAYED not in r.headers]
    assert len(written) == 1, statuses
    for response in responses:
        if response.status_code == 201 and response is not written[0]:
            assert_same(written[0], response)
        elif response.status_code != 201:
            assert response.status_code == 409, response.text
            assert response.json()["error"] == "Idempotency-Key in use"
    assert await count(write_engine) == len(batch)


async def test_a_key_running_on_another_host_is_409_on_postgresql(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any, dialect: str,
    execution_path: str,
) -> None:
    """Another host running the key holds its advisory lock (held here, by the test): this
    process, which does not run it, answers 409 at once, and writes nothing."""
    if dialect != "postgresql":
        pytest.skip("SQLite's other processes queue for the write lock: then a replay")
    [key_id] = await _key_ids(write_engine)
    async with write_engine.connect() as other_host:
        await other_host.execute(text("SELECT pg_advisory_xact_lock(:id)"),
                                 {"id": idempotency._lock_id(key_id, "elsewhere")})
        headers = keyed(auth_headers, "elsewhere")
        response = await client.post(URL, json=person(1), headers=headers)
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "Idempotency-Key in use"
        response = await post_graphql(client, headers, CREATE, {"input": person(1)})
        assert response.status_code == 409, response.text
        assert response.json()["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_IN_USE"
        await other_host.rollback()
    assert await count(write_engine) == 0
    # the other host gone (its lock with its transaction), the key runs here
    response = await client.post(URL, json=person(1), headers=headers)
    assert response.status_code == 201, response.text


async def test_a_key_in_use_is_409_in_graphql(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    execution_path: str,
) -> None:
    batch = "mutation($input: [ConsumerCreateInput!]!) { consumerBatchCreate(input: $input) " \
            "{ userErrors { code } } }"
    headers = keyed(auth_headers, "gql-racing")
    variables = {"input": [person(n) for n in range(300)]}
    responses = await asyncio.gather(*(post_graphql(client, headers, batch, variables)
                                       for _ in range(4)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}, statuses
    for response in responses:
        if response.status_code == 409:
            [error] = response.json()["errors"]
            assert error["extensions"]["code"] == "IDEMPOTENCY_KEY_IN_USE"
    assert sum(REPLAYED not in r.headers and r.status_code == 200 for r in responses) == 1
    assert await count(write_engine) == 300


# -- 5xx, expiry, pruning ----------------------------------------------------------------


async def test_a_5xx_is_not_recorded_and_its_writes_are_rolled_back(
    settings: Settings, write_engine: Any, dialect: str, execution_path: str
) -> None:
    """A request stopped by its deadline (504) while another connection holds a lock its
    write needs: nothing written, no key; once the lock is gone the same key writes once."""
    # (On SQLite the write stopped by the deadline still waits in the driver's thread for the
    # lock until the busy timeout: 2 s, not the default 10, keeps the test short; the
    # deadline, 1 s, still comes first.)
    app = create_app(settings.model_copy(update={"request_timeout_s": 1.0,
                                                 "sqlite_busy_timeout_ms": 2_000}))
    on_path(app, execution_path)
    async with LifespanManager(app), asgi_client(app) as client:
        headers = keyed(bearer(await _new_key(app, "deadline", READ_WRITE)), "stuck")
        async with write_engine.connect() as holder:
            if dialect == "postgresql":
                await holder.execute(text("BEGIN"))
                await holder.execute(text("LOCK TABLE consumers IN ACCESS EXCLUSIVE MODE"))
            else:
                await holder.execute(text("DELETE FROM consumers WHERE 0"))  # the write lock
            for request in (client.post(URL, json=person(1), headers=headers),
                            post_graphql(client, headers, CREATE, {"input": person(1)})):
                response = await request
                assert response.status_code == 504, response.text
            await holder.rollback()
        assert await count(write_engine) == 0
        assert await count(write_engine, models.IdempotencyKey) == 0
        first = await client.post(URL, json=person(1), headers=headers)
        assert first.status_code == 201, first.text
        assert_same(first, await client.post(URL, json=person(1), headers=headers))
    assert await count(write_engine) == 1


async def test_a_503_of_an_outage_is_not_recorded_and_a_resend_writes_once(
    settings: Settings, write_engine: Any, dialect: str, execution_path: str
) -> None:
    """SQLite's outage: another process holds the write lock past the busy timeout."""
    if dialect != "sqlite":
        pytest.skip("tests/test_outage.py stops PostgreSQL; here SQLite's lock is the outage")
    app = create_app(settings.model_copy(update={"sqlite_busy_timeout_ms": 50}))
    on_path(app, execution_path)
    path = settings.database_url.removeprefix("sqlite+aiosqlite:///")
    async with LifespanManager(app), asgi_client(app) as client:
        headers = keyed(bearer(await _new_key(app, "outage", READ_WRITE)), "outage")
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            for request in (client.post(URL, json=person(1), headers=headers),
                            post_graphql(client, headers, CREATE, {"input": person(1)})):
                response = await request
                assert response.status_code == 503, response.text
                assert "retry-after" in response.headers
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await count(write_engine, models.IdempotencyKey) == 0
        first = await post_graphql(client, headers, CREATE, {"input": person(1)})
        assert first.status_code == 200 and "errors" not in first.json(), first.text
        assert_same(first, await post_graphql(client, headers, CREATE, {"input": person(1)}))
    assert await count(write_engine) == 1


@pytest.mark.skipif(bool(TEST_DATABASE_URL),
                    reason="brings its own PostgreSQL: runs once, in the SQLite run")
async def test_postgresql_stopped_under_a_keyed_write_is_503_and_a_resend_writes_once(
    cluster: PostgresCluster, execution_path: str
) -> None:
    """The server stops (as a crash looks to clients) while a keyed write waits inside its
    transaction: 503 with Retry-After in each face's shape, nothing recorded; once it is
    back, the resend with the key writes once."""
    settings = Settings(database_url=cluster.url)  # type: ignore[arg-type]
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    app = create_app(settings)
    on_path(app, execution_path)
    async with LifespanManager(app), asgi_client(app) as client:
        secret = bearer(await _new_key(app, "outage", READ_WRITE))
        writes = {
            "rest": lambda: client.post(URL, json=person(1), headers=keyed(secret, "rest")),
            "gql": lambda: post_graphql(client, keyed(secret, "gql"), CREATE,
                                        {"input": person(2)}),
        }
        for send in writes.values():
            holder = make_engine(settings, writer=True)
            try:
                async with holder.connect() as conn:
                    await _hold_the_write_lock(conn)
                    sending = asyncio.create_task(send())
                    await asyncio.sleep(0.5)  # waiting for the lock, in its transaction
                    await asyncio.to_thread(cluster.stop)
                    response = await sending
                    assert response.status_code == 503, response.text
                    assert "retry-after" in response.headers
            except Exception as error:
                if not is_unavailable(error):  # the holder's connection went with it
                    raise
            finally:
                await holder.dispose()
            await asyncio.to_thread(cluster.start)
        for _ in range(50):  # the outage ends at the next connection that opens
            first = await writes["rest"]()
            if first.status_code != 503:
                break
            await asyncio.sleep(0.2)
        assert first.status_code == 201, first.text
        assert_same(first, await writes["rest"]())
        first = await writes["gql"]()
        assert first.status_code == 200 and "errors" not in first.json(), first.text
        assert_same(first, await writes["gql"]())
    engine = make_engine(settings, writer=True)
    try:
        assert await count(engine) == 2
        assert await count(engine, models.IdempotencyKey) == 2
    finally:
        await engine.dispose()


async def test_a_keyed_mutation_is_one_transaction_rolled_back_whole_on_a_5xx(
    settings: Settings, write_engine: Any, dialect: str, execution_path: str
) -> None:
    """Two mutation fields with a key: the first writes, the second waits for a lock on
    orders until the deadline (504). The first field's consumer is rolled back with it (it
    would stay, committed, were each field its own transaction), and no key is recorded."""
    if dialect != "postgresql":
        pytest.skip("SQLite has one writer: the test could not let the first field write "
                    "and hold back the second")
    app = create_app(settings.model_copy(update={"request_timeout_s": 1.0}))
    on_path(app, execution_path)
    async with LifespanManager(app), asgi_client(app) as client:
        secret = bearer(await _new_key(app, "deadline", READ_WRITE))
        created = await client.post(URL, json=person(0), headers=secret)
        variables = {"input": person(1), "id": created.json()["id"]}
        async with write_engine.connect() as holder:
            await holder.execute(text("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"))
            response = await post_graphql(client, keyed(secret, "two"), TWO_FIELDS, variables)
            assert response.status_code == 504, response.text
            await holder.rollback()
        assert await count(write_engine) == 1
        assert await count(write_engine, models.IdempotencyKey) == 0
        # resent once the lock is gone: both fields, once
        first = await post_graphql(client, keyed(secret, "two"), TWO_FIELDS, variables)
        assert first.status_code == 200 and "errors" not in first.json(), first.text
        assert_same(first, await post_graphql(client, keyed(secret, "two"), TWO_FIELDS,
                                              variables))
    assert await count(write_engine) == 2
    assert await count(write_engine, models.Order) == 1


async def test_an_expired_key_is_new_and_expired_rows_are_pruned_a_few_at_a_time(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(idempotency, "PRUNE_INTERVAL_S", 0.0)  # every keyed write prunes
    first = await client.post(URL, json=person(1), headers=keyed(auth_headers, "old"))
    assert first.status_code == 201
    # a day and a bit later (its timestamp moved back), with 150 other expired keys
    long_ago = now_utc() - timedelta(hours=24, minutes=1)
    key_id = (await _key_ids(write_engine))[0]
    async with write_engine.begin() as conn:
        await conn.execute(update(keys_table).values(created_at=long_ago))
        await conn.execute(keys_table.insert(), [
            {"api_key_id": key_id, "key": f"expired-{n}", "fingerprint": "0" * 64,
             "status": 201, "headers": [], "body": b"{}",
             "created_at": long_ago - timedelta(minutes=n)} for n in range(150)])
    # then the same key with another body is a new request, not a reuse
    again = await client.post(URL, json=person(2), headers=keyed(auth_headers, "old"))
    assert again.status_code == 201, again.text
    assert REPLAYED not in again.headers
    assert await count(write_engine) == 2
    # and that keyed write pruned at most PRUNE_BATCH expired rows, the oldest
    async with write_engine.connect() as conn:
        left = (await conn.execute(select(keys_table.c.key).where(
            keys_table.c.created_at < now_utc() - timedelta(hours=24))
            .order_by(keys_table.c.created_at))).scalars().all()
    assert set(left) == {f"expired-{n}" for n in range(150 - PRUNE_BATCH)}, left
    # a replay of the new answer
    assert_same(again, await client.post(URL, json=person(2), headers=keyed(auth_headers,
                                                                             "old")))


async def test_concurrent_keyed_writes_prune_once_a_second_in_a_process(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str],
    sql: StatementCounter, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keyed writes arriving together when a prune is due: one of them prunes."""
    monkeypatch.setattr(idempotency, "PRUNE_INTERVAL_S", 60.0)
    monkeypatch.setattr(app.state.idempotency, "_next_prune", 0.0)  # a prune is due
    with sql.counting():
        responses = await asyncio.gather(*(
            client.post(URL, json=person(n), headers=keyed(auth_headers, f"prune-{n}"))
            for n in range(8)))
    assert [response.status_code for response in responses] == [201] * 8
    prunes = [statement for statement in sql.statements
              if statement.lstrip().upper().startswith("DELETE FROM IDEMPOTENCY_KEYS")]
    assert len(prunes) == 1, prunes


async def _key_ids(engine: Any) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(models.ApiKey.id))).scalars().all())


# -- kill -9 -----------------------------------------------------------------------------


@pytest.fixture
async def served_url(tmp_path: Path) -> AsyncIterator[str]:
    """A database of the server's own, of the kind the suite runs on."""
    if TEST_DATABASE_URL:
        async with new_migrated_database("idem_kill") as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'kill.db'}"


@pytest.mark.database
async def test_kill_9_during_a_keyed_batch_then_a_resend_writes_one_batch(
    served_url: str, tmp_path: Path
) -> None:
    """`serve` killed (SIGKILL) while keyed 500-row batches are under way: first while the
    batch waits inside its transaction for a lock the test holds (deterministic), then at a
    few moments of its run. After each crash the batch and its key are both there or
    neither; after a restart, each batch resent with its key is written exactly once."""
    engine = make_engine(Settings(database_url=served_url), writer=True)  # type: ignore[arg-type]
    served = Served(served_url, tmp_path)
    try:
        served.wait_until_up()
        secret = served.secret()
    finally:
        served.stop()
    batches = {f"kill-{n}": _batch(n) for n in range(1 + len(DELAYS))}
    try:
        for number, (key, batch) in enumerate(batches.items()):
            served = Served(served_url, tmp_path)
            try:
                served.wait_until_up()
                if number == 0:
                    async with engine.connect() as holder:
                        await _hold_the_write_lock(holder)
                        answered = await _killed_while_sending(served, secret, key, batch, 0.5)
                        await holder.rollback()
                else:
                    answered = await _killed_while_sending(served, secret, key, batch,
                                                           DELAYS[number - 1])
            finally:
                served.stop()
            rows, recorded = await _written(engine, key, batch)
            assert (rows, recorded) in ((0, 0), (500, 1)), (rows, recorded)
            if number == 0:
                assert not answered and rows == 0
        restarted = Served(served_url, tmp_path)
        try:
            restarted.wait_until_up()
            with restarted.client(timeout=60) as client:
                for key, batch in batches.items():
                    headers = keyed(bearer(secret), key)
                    first = client.post(BATCH, json=batch, headers=headers)
                    assert first.status_code == 201, first.text
                    again = client.post(BATCH, json=batch, headers=headers)
                    assert again.status_code == 201 and again.content == first.content
                    assert again.headers.get(REPLAYED) == "true"
        finally:
            restarted.stop()
        for key, batch in batches.items():
            assert await _written(engine, key, batch) == (500, 1)
        assert await count(engine) == 500 * len(batches)
    finally:
        await engine.dispose()


# After the request is sent: before, during and after its batch's ~100 ms.
DELAYS = (0.04, 0.07, 0.1, 0.15)


def _batch(n: int) -> list[dict[str, Any]]:
    return [{"email": f"killed{n}.{i}@example.com", "fullName": f"Killed {i}",
             "metadata": {"n": i, "pad": "x" * 200}} for i in range(500)]


async def _hold_the_write_lock(holder: Any) -> None:
    if holder.dialect.name == "postgresql":
        await holder.execute(text("LOCK TABLE consumers IN ACCESS EXCLUSIVE MODE"))
    else:
        await holder.execute(text("DELETE FROM consumers WHERE 0"))  # BEGIN IMMEDIATE first


async def _killed_while_sending(served: Served, secret: str, key: str,
                                batch: list[dict[str, Any]], delay: float) -> bool:
    """Sends the keyed batch and kills the server `delay` seconds later; whether an answer
    came first."""
    def send() -> bool:
        try:
            with served.client(timeout=30) as client:
                client.post(BATCH, json=batch, headers=keyed(bearer(secret), key))
        except httpx.HTTPError:
            return False  # killed under it
        return True

    sending = asyncio.create_task(asyncio.to_thread(send))
    await asyncio.sleep(delay)
    os.kill(served.process.pid, signal.SIGKILL)
    return await sending


async def _written(engine: Any, key: str, batch: list[dict[str, Any]]) -> tuple[int, int]:
    """The batch's rows, and its key's."""
    emails = [item["email"] for item in batch]
    async with engine.connect() as conn:
        rows = (await conn.execute(select(func.count()).select_from(models.Consumer)
                                   .where(models.Consumer.email.in_(emails)))).scalar_one()
        keys = (await conn.execute(select(func.count()).select_from(keys_table).where(
            keys_table.c.key == key))).scalar_one()
    return int(rows), int(keys)


# -- OpenAPI -----------------------------------------------------------------------------


async def test_openapi_lists_the_header_and_its_statuses_on_writes(
    client: httpx.AsyncClient
) -> None:
    document = (await client.get("/openapi.json")).json()
    writes = 0
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            names = [p["name"] for p in operation.get("parameters", ())]
            if method == "get":
                assert KEY not in names, path
                continue
            writes += 1
            assert KEY in names, (method, path)
            assert {"409", "422"} <= set(operation["responses"]), (method, path)
            successes = [status for status in operation["responses"] if status < "300"]
            assert successes, (method, path)
            for success in successes:  # an upsert's 201 and 200 alike
                assert "Idempotent-Replayed" in operation["responses"][success]["headers"], (
                    method, path, success)
            # a refusal for what the database holds is recorded, and replayed, too
            assert "Idempotent-Replayed" in operation["responses"]["400"]["headers"], path
    assert writes >= 5
