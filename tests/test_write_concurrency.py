"""Concurrent writers through the HTTP app: uniqueness races end in userErrors (never in
`errors`), SQLite writers queue instead of failing, and read-modify-write loses nothing."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from consumers_graphql.domain import consumers as consumer_service
from consumers_graphql.store import models
from tests.conftest import GraphQL

CREATE = """
mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id email } userErrors { field code } }
}
"""
BATCH_CREATE = """
mutation BatchCreate($input: [ConsumerCreateInput!]!, $policy: ErrorPolicy) {
  consumerBatchCreate(input: $input, errorPolicy: $policy) {
    count results { consumer { id } userErrors { field code } }
  }
}
"""
UPDATE = """
mutation Update($id: ID!, $input: ConsumerUpdateInput!) {
  consumerUpdate(id: $id, input: $input) { consumer { id metadata } userErrors { field code } }
}
"""
RECORD = """
mutation Record($input: OrderRecordInput!) {
  orderRecord(input: $input) { order { id } userErrors { field code } }
}
"""
ADD = """
mutation Add($audienceId: ID!, $consumerIds: [ID!]!) {
  audienceAddConsumers(audienceId: $audienceId, consumerIds: $consumerIds) {
    audience { id } userErrors { field code }
  }
}
"""
AUDIENCE = """
mutation { audienceCreate(input: {name: "VIP"}) { audience { id } userErrors { code } } }
"""


async def count(write_engine: Any, model: Any) -> int:
    async with write_engine.connect() as conn:
        statement = select(func.count()).select_from(model.__table__)
        return int((await conn.execute(statement)).scalar_one())


async def gather(gql: GraphQL, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Sends the operations at once; every response must be free of GraphQL errors."""
    bodies = await asyncio.gather(*(gql(query, variables) for query, variables in calls))
    for body in bodies:
        assert "errors" not in body, body["errors"]
    return [body["data"] for body in bodies]


def email_case(n: int) -> str:
    """The same address in its n-th spelling: jane@example.com, JANE@example.com, …"""
    local, domain = "janedoe", "@example.com"
    return "".join(ch.upper() if (n >> i) & 1 else ch for i, ch in enumerate(local)) + domain


async def test_20_racing_creates_with_one_email_make_one_consumer(
    gql: GraphQL, write_engine: Any
) -> None:
    calls = [(CREATE, {"input": {"email": email_case(n)}}) for n in range(20)]
    assert len({variables["input"]["email"] for _, variables in calls}) == 20

    results = [data["consumerCreate"] for data in await gather(gql, calls)]

    winners = [r for r in results if r["consumer"] is not None]
    losers = [r for r in results if r["consumer"] is None]
    assert len(winners) == 1 and winners[0]["userErrors"] == []
    assert len(losers) == 19
    assert all(r["userErrors"] == [{"field": ["input", "email"], "code": "EMAIL_TAKEN"}]
               for r in losers)
    assert await count(write_engine, models.Consumer) == 1


async def test_a_unique_index_violation_becomes_the_same_user_error(
    gql: GraphQL, write_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulates losing the race: the first check sees nothing, as if the other writer's row
    # were committed just after it, so only the unique index can catch the duplicate.
    await gql.data(CREATE, {"input": {"email": "first@example.com", "externalId": "x"}})
    real_check = consumer_service._taken_consumer_keys
    calls = 0

    async def blind_first_time(*args: Any) -> tuple[set[str], set[str]]:
        nonlocal calls
        calls += 1
        return (set(), set()) if calls == 1 else await real_check(*args)

    monkeypatch.setattr(consumer_service, "_taken_consumer_keys", blind_first_time)

    payload = (await gql.data(CREATE, {"input": {"email": "FIRST@example.com"}}))
    assert payload["consumerCreate"] == {
        "consumer": None, "userErrors": [{"field": ["input", "email"], "code": "EMAIL_TAKEN"}]
    }
    assert calls == 2  # the transaction was run again after the index refused the row

    calls = 0
    batch = (await gql.data(BATCH_CREATE, {
        "input": [{"email": "new@example.com"}, {"externalId": "x"}],
        "policy": "REJECT_FAILED_ROWS",
    }))["consumerBatchCreate"]
    assert batch["count"] == 1
    assert batch["results"][1]["userErrors"] == [
        {"field": ["input", "1", "externalId"], "code": "EXTERNAL_ID_TAKEN"}
    ]
    assert calls == 2
    assert await count(write_engine, models.Consumer) == 2


async def test_10_concurrent_batches_of_100_all_succeed(
    gql: GraphQL, write_engine: Any
) -> None:
    calls = [
        (BATCH_CREATE, {"input": [{"email": f"b{b}-{n}@example.com", "fullName": f"B {b} {n}"}
                                  for n in range(100)]})
        for b in range(10)
    ]

    results = [data["consumerBatchCreate"] for data in await gather(gql, calls)]

    assert [r["count"] for r in results] == [100] * 10
    assert await count(write_engine, models.Consumer) == 1000


async def test_overlapping_batches_write_each_email_once(
    gql: GraphQL, write_engine: Any
) -> None:
    # Five batches of the same 50 addresses (spelt differently) plus 10 of their own.
    calls = [
        (BATCH_CREATE, {
            "input": [{"email": f"Shared{n}@Example.com".swapcase() if b % 2 else
                       f"shared{n}@example.com"} for n in range(50)]
                     + [{"email": f"own{b}-{n}@example.com"} for n in range(10)],
            "policy": "REJECT_FAILED_ROWS",
        })
        for b in range(5)
    ]

    results = [data["consumerBatchCreate"] for data in await gather(gql, calls)]

    assert sum(r["count"] for r in results) == 50 + 5 * 10
    for n in range(50):
        outcomes = [r["results"][n] for r in results]
        assert sum(o["consumer"] is not None for o in outcomes) == 1
        assert all(o["userErrors"] == [{"field": ["input", str(n), "email"],
                                        "code": "EMAIL_TAKEN"}]
                   for o in outcomes if o["consumer"] is None)
    assert await count(write_engine, models.Consumer) == 100


async def test_concurrent_metadata_merges_lose_nothing(gql: GraphQL) -> None:
    created = await gql.data(CREATE, {"input": {"email": "m@example.com"}})
    id = created["consumerCreate"]["consumer"]["id"]
    calls = [(UPDATE, {"id": id, "input": {"metadata": {f"k{n}": n}}}) for n in range(15)]

    await gather(gql, calls)

    final = await gql.data("query($id: ID!) { consumer(id: $id) { metadata } }", {"id": id})
    assert final["consumer"]["metadata"] == {f"k{n}": n for n in range(15)}


async def test_concurrent_orders_keep_exact_totals(gql: GraphQL, write_engine: Any) -> None:
    created = await gql.data(CREATE, {"input": {}})
    id = created["consumerCreate"]["consumer"]["id"]
    calls = [(RECORD, {"input": {"consumerId": id, "amount": 0.1, "currency": "EUR"}})
             for _ in range(20)]

    results = [data["orderRecord"] for data in await gather(gql, calls)]

    assert all(r["userErrors"] == [] for r in results)
    table = models.Consumer.__table__
    async with write_engine.connect() as conn:
        row = (await conn.execute(
            select(table.c.total_orders, table.c.total_order_value).where(table.c.id == id)
        )).one()
    assert (row.total_orders, row.total_order_value) == (20, Decimal("2"))


async def test_racing_order_external_ids(gql: GraphQL, write_engine: Any) -> None:
    created = await gql.data(CREATE, {"input": {}})
    id = created["consumerCreate"]["consumer"]["id"]
    calls = [(RECORD, {"input": {"consumerId": id, "amount": 1, "currency": "USD",
                                 "externalId": "shop-1"}}) for _ in range(10)]

    results = [data["orderRecord"] for data in await gather(gql, calls)]

    assert sum(r["order"] is not None for r in results) == 1
    assert sorted(str(r["userErrors"]) for r in results if r["order"] is None) == [
        str([{"field": ["input", "externalId"], "code": "EXTERNAL_ID_TAKEN"}])
    ] * 9
    assert await count(write_engine, models.Order) == 1


async def test_racing_membership_adds(gql: GraphQL, write_engine: Any) -> None:
    audience = (await gql.data(AUDIENCE))["audienceCreate"]["audience"]["id"]
    consumer = (await gql.data(CREATE, {"input": {}}))["consumerCreate"]["consumer"]["id"]
    calls = [(ADD, {"audienceId": audience, "consumerIds": [consumer]}) for _ in range(10)]

    results = [data["audienceAddConsumers"] for data in await gather(gql, calls)]

    assert all(r["userErrors"] == [] for r in results)
    assert await count(write_engine, models.ConsumerAudience) == 1


async def test_racing_external_ids_make_one_consumer(gql: GraphQL, write_engine: Any) -> None:
    calls = [(CREATE, {"input": {"externalId": "crm-1", "email": f"e{n}@example.com"}})
             for n in range(10)]

    results = [data["consumerCreate"] for data in await gather(gql, calls)]

    assert sum(r["consumer"] is not None for r in results) == 1
    assert [r["userErrors"] for r in results if r["consumer"] is None] == [
        [{"field": ["input", "externalId"], "code": "EXTERNAL_ID_TAKEN"}]
    ] * 9
    assert await count(write_engine, models.Consumer) == 1


async def test_racing_updates_to_one_email(gql: GraphQL, write_engine: Any) -> None:
    ids = [(await gql.data(CREATE, {"input": {}}))["consumerCreate"]["consumer"]["id"]
           for _ in range(10)]
    calls = [(UPDATE, {"id": id, "input": {"email": email_case(n)}}) for n, id in enumerate(ids)]

    results = [data["consumerUpdate"] for data in await gather(gql, calls)]

    assert sum(r["consumer"] is not None for r in results) == 1
    assert [r["userErrors"] for r in results if r["consumer"] is None] == [
        [{"field": ["input", "email"], "code": "EMAIL_TAKEN"}]
    ] * 9
    table = models.Consumer.__table__
    async with write_engine.connect() as conn:
        emails = (await conn.execute(
            select(table.c.email).where(table.c.email.is_not(None))
        )).scalars().all()
    assert len(emails) == 1


async def test_racing_audience_names(gql: GraphQL, write_engine: Any) -> None:
    calls = [(AUDIENCE, {}) for _ in range(10)]

    results = [data["audienceCreate"] for data in await gather(gql, calls)]

    assert sum(r["audience"] is not None for r in results) == 1
    assert [r["userErrors"] for r in results if r["audience"] is None] == [
        [{"code": "NAME_TAKEN"}]
    ] * 9
    assert await count(write_engine, models.Audience) == 1
