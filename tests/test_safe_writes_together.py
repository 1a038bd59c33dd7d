"""Idempotency keys, upserts and rate limits together (issue 15), over HTTP: a keyed write the
rate limit refuses is not recorded, so the same key runs it once the bucket allows; an
upsert's 201 is what its retry replays; a batch upsert costs its items."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from consumers_graphql.store import models
from tests.conftest import StatementCounter, bearer
from tests.test_rate_limits import new_key

KEY = "Idempotency-Key"
REPLAYED = "idempotent-replayed"
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { email } userErrors { code } } }"""
# Takes 20 points of a bucket (a page of 20).
COST_20 = "{ consumers(first: 20) { totalCount } }"


async def consumers(app: FastAPI) -> int:
    async with app.state.database.primary_engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(models.Consumer))).scalar_one())


@pytest.mark.usefixtures("execution_path")
async def test_a_keyed_mutation_the_rate_limit_refuses_runs_with_its_key_once_allowed(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    # given a bucket of 20 points restoring 20 a second, emptied by a page of 20
    secret = await new_key(app, 20, 20.0)
    drained = await client.post("/graphql", json={"query": COST_20}, headers=bearer(secret))
    assert drained.status_code == 200, drained.text
    body = {"query": CREATE, "variables": {"input": {"email": "throttled.idem@example.com"}}}
    headers = bearer(secret) | {KEY: "throttled-1"}
    # when a keyed mutation comes at once
    refused = await client.post("/graphql", json=body, headers=headers)
    # then it is throttled, and neither written nor recorded
    assert refused.status_code == 429, refused.text
    assert refused.json()["errors"][0]["extensions"]["code"] == "THROTTLED"
    assert await consumers(app) == 0
    # when the same request is sent with the same key once the bucket holds its cost
    await asyncio.sleep(float(refused.headers["Retry-After"]))
    ran = await client.post("/graphql", json=body, headers=headers)
    again = await client.post("/graphql", json=body, headers=headers)
    # then it runs (no replay of the 429), once, and its retry replays it
    assert ran.status_code == 200, ran.text
    assert REPLAYED not in ran.headers
    assert ran.json()["data"]["consumerCreate"]["consumer"] == {
        "email": "throttled.idem@example.com"}
    assert again.headers.get(REPLAYED) == "true"
    assert again.content == ran.content
    assert await consumers(app) == 1


async def test_a_keyed_upsert_replays_its_201_and_writes_once(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    path = "/api/v1/consumers/external/crm-77"
    body = {"email": "upsert.idem@example.com", "fullName": "Upsert Idem"}
    headers = auth_headers | {KEY: "upsert-1"}
    first = await client.put(path, json=body, headers=headers)
    retried = await client.put(path, json=body, headers=headers)
    unkeyed = await client.put(path, json=body, headers=auth_headers)
    assert first.status_code == 201, first.text
    assert (retried.status_code, retried.content) == (201, first.content)
    assert retried.headers[REPLAYED] == "true"
    assert retried.headers["location"] == first.headers["location"]
    assert unkeyed.status_code == 200, unkeyed.text  # without the key: an update, as it is
    assert await consumers(app) == 1


def _remaining(response: httpx.Response) -> int:
    """`r` of the IETF RateLimit header: `"default";r=15;t=1`."""
    parts = dict(part.split("=", 1) for part in response.headers["RateLimit"].split(";")[1:])
    return int(parts["r"])


async def test_a_batch_upsert_costs_its_items(app: FastAPI, client: httpx.AsyncClient) -> None:
    # given a bucket of 20 points restoring one a thousand seconds (as good as none here)
    secret = await new_key(app, 20, 0.001)
    items: list[dict[str, Any]] = [{"externalId": f"crm-{n}"} for n in range(15)]
    # when a batch of 15 upserts, then one of 10
    first = await client.put("/api/v1/consumers/batch/upsert", json=items,
                             headers=bearer(secret))
    second = await client.put("/api/v1/consumers/batch/upsert", json=items[:10],
                              headers=bearer(secret))
    # then the first takes 15 points, and the second is refused for the 5 left
    assert first.status_code == 200, first.text
    assert _remaining(first) == 5
    assert second.status_code == 429, second.text
    assert second.json() == {"error": "Rate limit exceeded", "details": []}
    assert await consumers(app) == 15


@pytest.mark.usefixtures("execution_path")
async def test_a_keyed_mutation_the_rate_limit_refuses_runs_no_sql(
    app: FastAPI, client: httpx.AsyncClient, sql: StatementCounter
) -> None:
    # given an emptied bucket, and the key verified once (so it comes from the cache)
    secret = await new_key(app, 20, 0.001)
    drained = await client.post("/graphql", json={"query": COST_20}, headers=bearer(secret))
    assert drained.status_code == 200, drained.text
    body = {"query": CREATE, "variables": {"input": {"email": "no.sql@example.com"}}}
    # when a keyed mutation is refused
    with sql.counting():
        refused = await client.post("/graphql", json=body,
                                    headers=bearer(secret) | {KEY: "no-sql-1"})
    # then no statement was sent: no key claimed, looked up or pruned
    assert refused.status_code == 429, refused.text
    assert sql.statements == [] and sql.auth_statements == []


@pytest.mark.usefixtures("execution_path")
async def test_a_keyed_mutation_takes_its_cost_once(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    secret = await new_key(app, 100, 0.001)

    async def left(email: str, headers: dict[str, str]) -> int:
        body = {"query": CREATE, "variables": {"input": {"email": email}}}
        response = await client.post("/graphql", json=body, headers=bearer(secret) | headers)
        assert response.status_code == 200, response.text
        available: int = response.json()["extensions"]["cost"]["throttleStatus"][
            "currentlyAvailable"]
        return available

    unkeyed = await left("unkeyed@example.com", {})
    keyed = await left("keyed@example.com", {KEY: "once-1"})
    # the keyed one is priced and charged before its transaction, then runs: charged once
    assert 100 - unkeyed == unkeyed - keyed > 0


UPSERT_TWO = """mutation Two($a: String!, $b: String!) {
  a: consumerUpsert(input: {externalId: $a, fullName: "A"}) { created userErrors { code } }
  b: consumerUpsert(input: {externalId: $b, fullName: "B"}) { created userErrors { code } } }"""


@pytest.mark.usefixtures("execution_path")
async def test_keyed_documents_upserting_in_opposite_orders_all_succeed(
    app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    """With a key, a document is one transaction: its fields' locks (an upsert's, on
    PostgreSQL) are held until it commits, so two documents taking them in opposite orders
    can deadlock. The loser's whole unit runs again: every document succeeds, none 500."""
    async def send(n: int) -> httpx.Response:
        order = {"a": "crm-x", "b": "crm-y"} if n % 2 else {"a": "crm-y", "b": "crm-x"}
        return await client.post("/graphql", json={"query": UPSERT_TWO, "variables": order},
                                 headers=auth_headers | {KEY: f"opposite-{n}"})

    answers = await asyncio.gather(*(send(n) for n in range(6)))
    assert [answer.status_code for answer in answers] == [200] * 6, [
        answer.text for answer in answers if answer.status_code != 200]
    assert all("errors" not in answer.json() for answer in answers)
    assert await consumers(app) == 2


@pytest.mark.usefixtures("execution_path")
async def test_a_keyed_refusal_reports_the_cost_it_was_charged(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    secret = await new_key(app, 100, 0.001)
    first = {"query": CREATE, "variables": {"input": {"email": "first.idem@example.com"}}}
    other = {"query": CREATE, "variables": {"input": {"email": "other.idem@example.com"}}}
    headers = bearer(secret) | {KEY: "reused-1"}
    ran = await client.post("/graphql", json=first, headers=headers)
    reused = await client.post("/graphql", json=other, headers=headers)
    assert reused.status_code == 422, reused.text
    assert reused.json()["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    cost = reused.json()["extensions"]["cost"]
    taken = 100 - ran.json()["extensions"]["cost"]["throttleStatus"]["currentlyAvailable"]
    # charged as the first was (it was priced and taken before its key was looked up)
    assert cost["requested"] == ran.json()["extensions"]["cost"]["requested"]
    assert cost["throttleStatus"]["currentlyAvailable"] == 100 - 2 * taken
