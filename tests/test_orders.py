"""orderRecord / orderDelete: validation, and the consumer's totals kept exactly true."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from consumers_graphql.store import models
from tests.conftest import GraphQL
from tests.factories import BASE_TIME

CREATE = """
mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id } userErrors { code } }
}
"""
ORDER_FIELDS = "id amount currency placedAt externalId createdAt consumer { id totalOrders }"
RECORD = f"""
mutation Record($input: OrderRecordInput!) {{
  orderRecord(input: $input) {{ order {{ {ORDER_FIELDS} }} userErrors {{ field code message }} }}
}}
"""
DELETE = f"""
mutation Delete($id: ID!) {{
  orderDelete(id: $id) {{ order {{ {ORDER_FIELDS} }} userErrors {{ field code message }} }}
}}
"""
TOTALS = """
query Totals($id: ID!) {
  consumer(id: $id) {
    totalOrders totalOrderValue lastOrderAt updatedAt
    orders(first: 100) { nodes { id amount placedAt } }
  }
}
"""
MISSING_CONSUMER = "cons_01JD0000000000000000000000"


def at(minutes: int) -> str:
    return (BASE_TIME + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


async def new_consumer(gql: GraphQL) -> str:
    payload = (await gql.data(CREATE, {"input": {}}))["consumerCreate"]
    return str(payload["consumer"]["id"])


async def record(gql: GraphQL, consumer_id: str, amount: float, currency: str = "USD",
                 **extra: Any) -> dict[str, Any]:
    input = {"consumerId": consumer_id, "amount": amount, "currency": currency, **extra}
    payload: dict[str, Any] = (await gql.data(RECORD, {"input": input}))["orderRecord"]
    return payload


async def totals(gql: GraphQL, consumer_id: str) -> dict[str, Any]:
    consumer: dict[str, Any] = (await gql.data(TOTALS, {"id": consumer_id}))["consumer"]
    return consumer


def codes(payload: dict[str, Any]) -> list[tuple[list[str], str]]:
    return [(e["field"], e["code"]) for e in payload["userErrors"]]


async def test_record_updates_totals_exactly(gql: GraphQL) -> None:
    consumer = await new_consumer(gql)

    first = await record(gql, consumer, 0.1, placedAt=at(10), externalId="shop-1")
    await record(gql, consumer, 0.1, placedAt=at(30))
    await record(gql, consumer, 0.1, placedAt=at(20))  # out of order: lastOrderAt stays

    assert first["userErrors"] == []
    order = first["order"]
    assert order["id"].startswith("ord_")
    assert (order["amount"], order["currency"], order["placedAt"], order["externalId"]) == (
        0.1, "USD", at(10), "shop-1"
    )
    assert order["consumer"] == {"id": consumer, "totalOrders": 1}
    state = await totals(gql, consumer)
    assert state["totalOrders"] == 3
    # Three float additions of 0.1 give 0.30000000000000004; exact decimals give 0.3.
    assert state["totalOrderValue"] == 0.3
    assert state["lastOrderAt"] == at(30)


async def test_placed_at_defaults_to_now(gql: GraphQL) -> None:
    consumer = await new_consumer(gql)
    order = (await record(gql, consumer, 5))["order"]
    assert order["placedAt"] == order["createdAt"]
    assert (await totals(gql, consumer))["lastOrderAt"] == order["placedAt"]


async def test_delete_takes_the_order_out_of_the_totals(gql: GraphQL) -> None:
    consumer = await new_consumer(gql)
    early = (await record(gql, consumer, 19.99, placedAt=at(1)))["order"]
    late = (await record(gql, consumer, 5.01, placedAt=at(2)))["order"]
    before = await totals(gql, consumer)

    deleted = (await gql.data(DELETE, {"id": late["id"]}))["orderDelete"]

    assert deleted["userErrors"] == []
    assert deleted["order"]["id"] == late["id"] and deleted["order"]["amount"] == 5.01
    state = await totals(gql, consumer)
    assert (state["totalOrders"], state["totalOrderValue"], state["lastOrderAt"]) == (
        1, 19.99, at(1)
    )
    assert state["updatedAt"] > before["updatedAt"]

    await gql.data(DELETE, {"id": early["id"]})
    state = await totals(gql, consumer)
    assert (state["totalOrders"], state["totalOrderValue"], state["lastOrderAt"]) == (0, 0, None)


async def test_delete_of_an_unknown_order_is_not_found(gql: GraphQL) -> None:
    consumer = await new_consumer(gql)
    order = (await record(gql, consumer, 1))["order"]
    await gql.data(DELETE, {"id": order["id"]})

    for id in (order["id"], consumer, "ord_nonsense"):
        payload = (await gql.data(DELETE, {"id": id}))["orderDelete"]
        assert payload["order"] is None
        assert codes(payload) == [(["id"], "NOT_FOUND")]
    assert (await totals(gql, consumer))["totalOrders"] == 0


@pytest.mark.parametrize(
    ("amount", "currency", "field", "fragment"),
    [
        (-1, "USD", "amount", "negative"),
        (1.001, "USD", "amount", "USD allows 2"),
        (100.5, "JPY", "amount", "JPY allows 0"),
        (1.0001, "KWD", "amount", "KWD allows 3"),
        (1e11, "USD", "amount", "less than 100,000,000,000"),
        (1e300, "USD", "amount", "less than"),
        (10, "XYZ", "currency", "ISO 4217"),
        (10, "US", "currency", "ISO 4217"),
        (10, "XAU", "currency", "ISO 4217"),
    ],
)
async def test_record_refuses_bad_amounts_and_currencies(
    gql: GraphQL, amount: float, currency: str, field: str, fragment: str
) -> None:
    consumer = await new_consumer(gql)
    payload = await record(gql, consumer, amount, currency)
    assert payload["order"] is None
    assert codes(payload) == [(["input", field], "VALIDATION_FAILED")]
    assert fragment in payload["userErrors"][0]["message"]
    assert (await totals(gql, consumer))["totalOrders"] == 0


@pytest.mark.parametrize(
    ("amount", "currency", "stored"),
    [(0, "USD", 0), (100, "JPY", 100), (1.234, "KWD", 1.234), (19.99, "eur", 19.99),
     (99999999999.99, "USD", 99999999999.99), (99999999999.9999, "CLF", 99999999999.9999)],
)
async def test_record_accepts_amounts_within_the_currency(
    gql: GraphQL, amount: float, currency: str, stored: float
) -> None:
    consumer = await new_consumer(gql)
    payload = await record(gql, consumer, amount, currency)
    assert payload["userErrors"] == []
    assert payload["order"]["amount"] == stored
    assert payload["order"]["currency"] == currency.upper()
    assert (await totals(gql, consumer))["totalOrderValue"] == stored


async def test_record_refuses_unknown_consumer_and_taken_external_id(gql: GraphQL) -> None:
    consumer = await new_consumer(gql)
    await record(gql, consumer, 1, externalId="shop-9")

    payload = await record(gql, MISSING_CONSUMER, 1, externalId="shop-9")
    assert codes(payload) == [
        (["input", "consumerId"], "NOT_FOUND"), (["input", "externalId"], "EXTERNAL_ID_TAKEN")
    ]
    payload = await record(gql, "garbage", -5, "???", externalId="")
    assert codes(payload) == [
        (["input", "consumerId"], "NOT_FOUND"),
        (["input", "currency"], "VALIDATION_FAILED"),
        (["input", "amount"], "VALIDATION_FAILED"),
        (["input", "externalId"], "VALIDATION_FAILED"),
    ]
    assert (await totals(gql, consumer))["totalOrders"] == 1


async def test_totals_are_capped_where_a_double_gives_them_back(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # Float and JSON numbers are doubles: every amount and total the API accepts (4
    # decimals at most, in CLF) must read back as the exact decimal, as written.
    consumer = await new_consumer(gql)

    async def exact_totals() -> tuple[Decimal, Decimal]:
        graphql = await client.post("/graphql", headers=gql.headers, json={
            "query": TOTALS, "variables": {"id": consumer}})
        rest = await client.get(f"/api/v1/consumers/{consumer}", headers=auth_headers)
        return (json.loads(graphql.content, parse_float=Decimal)["data"]["consumer"][
            "totalOrderValue"], json.loads(rest.content, parse_float=Decimal)["totalOrderValue"])

    response = await client.post("/graphql", headers=gql.headers, json={
        "query": RECORD, "variables": {"input": {
            "consumerId": consumer, "amount": 99_999_999_999.9999, "currency": "CLF"}}})
    recorded = json.loads(response.content, parse_float=Decimal)["data"]["orderRecord"]
    assert recorded["userErrors"] == []
    assert recorded["order"]["amount"] == Decimal("99999999999.9999")
    assert await exact_totals() == (Decimal("99999999999.9999"),) * 2

    assert (await record(gql, consumer, 0.0001, "CLF"))["userErrors"] == []  # the cap itself
    assert await exact_totals() == (Decimal(10) ** 11,) * 2

    payload = await record(gql, consumer, 0.0001, "CLF")
    assert codes(payload) == [(["input", "amount"], "VALIDATION_FAILED")]
    assert "past 100,000,000,000" in payload["userErrors"][0]["message"]
    assert (await totals(gql, consumer))["totalOrders"] == 2
    assert await exact_totals() == (Decimal(10) ** 11,) * 2


async def test_orders_of_a_deleted_consumer_are_gone(gql: GraphQL, write_engine: Any) -> None:
    consumer = await new_consumer(gql)
    order = (await record(gql, consumer, 3))["order"]
    await gql.data("mutation($id: ID!) { consumerDelete(id: $id) { userErrors { code } } }",
                   {"id": consumer})
    payload = (await gql.data(DELETE, {"id": order["id"]}))["orderDelete"]
    assert codes(payload) == [(["id"], "NOT_FOUND")]
    payload = await record(gql, consumer, 1)
    assert codes(payload) == [(["input", "consumerId"], "NOT_FOUND")]


# -- totals stay true under any sequence of writes ----------------------------------------------

RECORD_OR_DELETE = st.one_of(
    st.tuples(
        st.just("record"),
        st.integers(0, 1),  # which consumer
        st.integers(0, 10**9),  # amount in cents
        st.integers(-10_000, 10_000),  # placedAt, minutes from BASE_TIME
    ),
    st.tuples(st.just("delete"), st.integers(0, 1_000)),  # which existing order
)
OPERATIONS = st.lists(RECORD_OR_DELETE, min_size=1, max_size=30)


async def apply(
    gql: GraphQL, consumers: list[str], expected: dict[str, tuple[str, Decimal, str]],
    operation: tuple[Any, ...],
) -> None:
    """Runs one operation and mirrors it in ``expected`` (order id -> consumer, amount,
    placedAt)."""
    if operation[0] == "record":
        _, who, cents, minutes = operation
        amount = Decimal(cents) / 100
        payload = await record(gql, consumers[who], float(amount), placedAt=at(minutes))
        assert payload["userErrors"] == []
        expected[payload["order"]["id"]] = (consumers[who], amount, at(minutes))
    elif expected:
        order_id = sorted(expected)[operation[1] % len(expected)]
        payload = (await gql.data(DELETE, {"id": order_id}))["orderDelete"]
        assert payload["userErrors"] == []
        del expected[order_id]


async def assert_totals_true(
    gql: GraphQL, write_engine: Any, consumers: list[str],
    expected: dict[str, tuple[str, Decimal, str]],
) -> None:
    table = models.Consumer.__table__
    orders = models.Order.__table__
    async with write_engine.connect() as conn:
        stored = {row.id: row for row in (await conn.execute(
            select(table.c.id, table.c.total_orders, table.c.total_order_value)
            .where(table.c.id.in_(consumers))
        )).all()}
        amounts = (await conn.execute(
            select(orders.c.consumer_id, orders.c.amount).where(orders.c.consumer_id.in_(consumers))
        )).all()
    for consumer in consumers:
        mine = [v for v in expected.values() if v[0] == consumer]
        recomputed = sum((a for c, a in amounts if c == consumer), Decimal(0))
        assert stored[consumer].total_orders == len(mine)
        assert stored[consumer].total_order_value == recomputed == sum(
            (v[1] for v in mine), Decimal(0)
        )
        state = await totals(gql, consumer)
        assert state["totalOrders"] == len(mine)
        assert state["lastOrderAt"] == max((v[2] for v in mine), default=None)
        assert Decimal(repr(state["totalOrderValue"])) == recomputed


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS)
async def test_totals_equal_a_recomputation(
    gql: GraphQL, write_engine: Any, operations: list[tuple[Any, ...]]
) -> None:
    consumers = [await new_consumer(gql), await new_consumer(gql)]
    expected: dict[str, tuple[str, Decimal, str]] = {}
    for operation in operations:
        await apply(gql, consumers, expected, operation)
    await assert_totals_true(gql, write_engine, consumers, expected)


async def test_totals_stay_true_through_a_long_random_sequence(
    gql: GraphQL, write_engine: Any
) -> None:
    rng = random.Random(20241101)
    consumers = [await new_consumer(gql), await new_consumer(gql)]
    expected: dict[str, tuple[str, Decimal, str]] = {}
    for step in range(120):
        if rng.random() < 0.65:
            operation: tuple[Any, ...] = (
                "record", rng.randrange(2), rng.randrange(10**9), rng.randrange(-9999, 9999)
            )
        else:
            operation = ("delete", rng.randrange(1000))
        await apply(gql, consumers, expected, operation)
        if step % 10 == 9:
            await assert_totals_true(gql, write_engine, consumers, expected)
    assert len(expected) > 20  # the sequence really built up orders
