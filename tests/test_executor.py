"""The compiled executor answers exactly as graphql-core does: the same operations run
through both, on the same data, must give the same response."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI

from consumers_graphql import models
from consumers_graphql.api import executor
from consumers_graphql.api.context import Context
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.api.schema import build_schema
from consumers_graphql.repository import Repository
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

COMPILED = build_schema()
REFERENCE = build_schema(compiled=False)

OPERATIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("page with relations", """
      { consumers(first: 5) { totalCount pageInfo { hasNextPage hasPreviousPage startCursor
        endCursor } edges { cursor node { id email phone fullName metadata externalId
        totalOrders totalOrderValue lastOrderAt createdAt updatedAt
        audiences { totalCount nodes { id name description createdAt } }
        orders(first: 2) { pageInfo { hasNextPage endCursor } nodes { id amount currency
        placedAt externalId consumer { id email } } } } } } }""", {}),
    ("aliases with different arguments, merged selections", """
      { a: consumers(first: 2, sortBy: EMAIL, sortDir: ASC) { nodes { id email } }
        b: consumers(last: 3, sortBy: TOTAL_ORDERS) { nodes { id totalOrders }
                                                     nodes { email } }
        c: consumers(first: 1) { nodes { x: orders(first: 1) { nodes { id } }
                                          y: orders(last: 1) { nodes { id } } } } }""", {}),
    ("fragments on types and interfaces, __typename", """
      query($ids: [ID!]!) { nodes(ids: $ids) { __typename ...N ... on Consumer { email
        ...C } ... on Audience { name consumers(first: 2) { nodes { ...C } } } } }
      fragment N on Node { id }
      fragment C on Consumer { fullName orders { totalCount nodes { __typename amount } } }
    """, {"ids": "IDS"}),
    ("variables, enums, timestamps", """
      query($n: Int, $s: ConsumerSortField!, $d: SortDirection, $t: DateTime) {
        consumers(first: $n, sortBy: $s, sortDir: $d, createdAfter: $t) {
          nodes { id lastOrderAt } } }""",
     {"n": 4, "s": "LAST_ORDER_AT", "d": "ASC", "t": "2024-11-01T10:02:00Z"}),
    ("search and single look-ups", """
      query($id: ID!) { searchConsumers(q: "user1") { totalCount nodes { id } }
        consumer(id: $id) { id audiences { nodes { id } } }
        audience(id: "aud_01JD0000000000000000000000") { id }
        node(id: "nonsense") { id } audiences(first: 2) { nodes { name } } }""",
     {"id": "ID0"}),
    ("misuse: an error with a path", "{ consumers(first: 2) { nodes { orders(first: 500) "
     "{ nodes { id } } } } }", {}),
    ("misuse: a top-level error", '{ consumers(after: "nope") { nodes { id } } }', {}),
    ("directives (left to graphql-core)", """
      query($yes: Boolean!) { consumers(first: 2) { nodes { id email @include(if: $yes)
        fullName @skip(if: $yes) } } }""", {"yes": True}),
]


async def _given_data(engine: Any) -> dict[str, str]:
    consumers = [consumer_row(n, email=None if n == 3 else f"user{n}@example.com",
                              last_order_at=None if n % 2 else BASE_TIME + timedelta(hours=n),
                              metadata={"n": n, "tags": ["a", "b"]} if n % 3 else None,
                              total_orders=n % 3)
                 for n in range(12)]
    audiences = [audience_row("VIP", description="best"), audience_row("Lapsed")]
    await insert_consumers(engine, consumers)
    await insert_rows(engine, models.Audience, audiences)
    await insert_rows(engine, models.ConsumerAudience, [
        {"consumer_id": c["id"], "audience_id": a["id"], "created_at": BASE_TIME}
        for i, c in enumerate(consumers) for j, a in enumerate(audiences) if (i + j) % 3 == 0])
    orders = [order_row(c["id"], f"{i}.25", BASE_TIME + timedelta(days=k))
              for i, c in enumerate(consumers) for k in range(i % 4)]
    await insert_rows(engine, models.Order, orders)
    return {"ID0": consumers[0]["id"], "IDS": [consumers[1]["id"], audiences[0]["id"],
                                               orders[0]["id"], "missing", consumers[5]["id"]]}


async def _run(app: FastAPI, schema: Any, query: str, variables: dict[str, Any]) -> Any:
    database = app.state.database
    reader = database.reader()
    repository = Repository(reader)
    context = Context(settings=app.state.settings, database=database, repository=repository,
                      loaders=Loaders(repository))
    try:
        result = await schema.execute(query, variable_values=variables, context_value=context)
    finally:
        await reader.close()
    errors = [error.formatted for error in result.errors or ()]
    return result.data, errors


@pytest.mark.parametrize(("case", "query", "variables"), OPERATIONS,
                         ids=[o[0] for o in OPERATIONS])
async def test_compiled_execution_equals_graphql_core(
    app: FastAPI, write_engine: Any, case: str, query: str, variables: dict[str, Any]
) -> None:
    ids = await _given_data(write_engine)
    variables = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in variables.items()}
    before = dict(executor.stats)

    compiled = await _run(app, COMPILED, query, variables)
    reference = await _run(app, REFERENCE, query, variables)

    # the same JSON, key order included (the spec answers fields in the order asked)
    assert json.dumps(compiled) == json.dumps(reference)
    assert reference[0] is not None or reference[1]
    # and the compiled executor really ran the operations it supports
    ran_compiled = executor.stats["compiled"] > before["compiled"]
    assert ran_compiled == (not compiled[1] and "@" not in query), case


async def test_the_compiled_path_keeps_statement_counts(
    gql: Any, sql: Any, write_engine: Any
) -> None:
    await _given_data(write_engine)
    with sql.counting():
        await gql.data(OPERATIONS[0][1])
    # page, count, audiences, audience counts, orders (Order.consumer primed by the page)
    assert sql.count == 5, sql.statements
