"""The compiled executor answers exactly as graphql-core does: the same operations run
through both, on the same data, must give the same response."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select, text, update

from consumers_graphql.api import executor, types
from consumers_graphql.api.context import Context
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.api.schema import build_schema
from consumers_graphql.store import models
from consumers_graphql.store.repository import Repository
from tests.conftest import empty_tables
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


async def _given_data(engine: Any) -> dict[str, Any]:
    rows, ids = _data()
    await _insert(engine, rows)
    return ids


def _data() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    consumers = [consumer_row(n, email=None if n == 3 else f"user{n}@example.com",
                              last_order_at=None if n % 2 else BASE_TIME + timedelta(hours=n),
                              metadata={"n": n, "tags": ["a", "b"]} if n % 3 else None,
                              total_orders=n % 3)
                 for n in range(12)]
    audiences = [audience_row("VIP", description="best"), audience_row("Lapsed")]
    members = [{"consumer_id": c["id"], "audience_id": a["id"], "created_at": BASE_TIME}
               for i, c in enumerate(consumers) for j, a in enumerate(audiences)
               if (i + j) % 3 == 0]
    orders = [order_row(c["id"], f"{i}.25", BASE_TIME + timedelta(days=k))
              for i, c in enumerate(consumers) for k in range(i % 4)]
    rows = {"consumers": consumers, "audiences": audiences, "members": members,
            "orders": orders}
    return rows, {"ID0": consumers[0]["id"],
                  "IDS": [consumers[1]["id"], audiences[0]["id"], orders[0]["id"], "missing",
                          consumers[5]["id"]]}


async def _insert(engine: Any, rows: dict[str, list[dict[str, Any]]]) -> None:
    await insert_consumers(engine, rows["consumers"])
    await insert_rows(engine, models.Audience, rows["audiences"])
    await insert_rows(engine, models.ConsumerAudience, rows["members"])
    await insert_rows(engine, models.Order, rows["orders"])


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


@pytest.mark.compares_paths
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


@pytest.mark.compares_paths
async def test_a_stored_value_the_schema_refuses_is_answered_as_graphql_core_answers_it(
    app: FastAPI, write_engine: Any, dialect: str
) -> None:
    # given a row holding what its field's type refuses: on SQLite, whose INTEGER holds it,
    # a count beyond GraphQL's 32-bit Int; on PostgreSQL, whose integer does not, a NULL
    # where the schema promises a name (the column's NOT NULL dropped for the test)
    ids = await _given_data(write_engine)
    if dialect == "sqlite":
        table, column, value, field = models.Consumer, "total_orders", 2**31, "totalOrders"
        page, one, row_id = "consumers(first: 12)", "consumer", ids["ID0"]
    else:
        table, column, value, field = models.Audience, "name", None, "name"
        page, one, row_id = "audiences(first: 2)", "audience", ids["IDS"][1]
    async with write_engine.begin() as conn:
        if value is None:
            await conn.execute(text("ALTER TABLE audiences ALTER COLUMN name DROP NOT NULL"))
        await conn.execute(update(table).where(table.id == row_id).values({column: value}))
    # read as a page's nodes (all leaves: one loop) and as one object (its fields in line)
    query = f'{{ a: {page} {{ nodes {{ id {field} }} }} b: {one}(id: "{row_id}") {{ {field} }} }}'
    before = dict(executor.stats)
    try:
        compiled = await _run(app, COMPILED, query, {})
        reference = await _run(app, REFERENCE, query, {})
    finally:
        if value is None:
            async with write_engine.begin() as conn:
                await conn.execute(update(table).where(table.id == row_id).values(name="VIP"))
                await conn.execute(text("ALTER TABLE audiences ALTER COLUMN name SET NOT NULL"))

    # then the compiled executor hands the operation to graphql-core, whose answer is null
    # for the whole data (`a` is non-null) with the field's error
    assert compiled[0] is None and reference[0] is None
    assert any(error["path"][:2] == ["a", "nodes"] and error["path"][3:] == [field]
               for error in compiled[1])
    if dialect == "sqlite":
        assert json.dumps(compiled) == json.dumps(reference)
    else:
        # graphql-core alone cancels `b` once `a` has failed; after the compiled run, `b`'s
        # replayed read can finish first and report its own error too (both are valid
        # answers: noticed in issue 14, left as it is)
        assert all(error in compiled[1] for error in reference[1])
    assert executor.stats["fallbacks"] > before["fallbacks"]


# A page whose nodes select only leaves (the orders' and audiences' here, and the
# consumers' of the second page), the same relation twice with different leaves.
LEAF_NODES = """
  { consumers(first: 12) { nodes { id audiences { nodes { id name description createdAt } }
      a: orders(first: 3) { nodes { id amount currency placedAt externalId } }
      b: orders(first: 3) { nodes { amount createdAt } } } }
    searchConsumers(q: "user1") { nodes { id email metadata totalOrderValue lastOrderAt } } }"""


@pytest.mark.compares_paths
async def test_leaf_only_nodes_are_read_from_the_rows_without_an_object_per_node(
    app: FastAPI, write_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given orders whose amounts have cents and none (a whole amount is still a Float: 3.0)
    rows, _ = _data()
    rows["orders"].append(order_row(rows["consumers"][1]["id"], "3", BASE_TIME))
    await _insert(write_engine, rows)
    made: list[str] = []
    for node_type in (types.Consumer, types.Audience, types.Order):
        from_rows = node_type.from_rows

        def counted(*args: Any, _from_rows: Any = from_rows, _name: str = node_type.__name__
                    ) -> Any:
            made.append(_name)
            return _from_rows(*args)

        monkeypatch.setattr(node_type, "from_rows", counted)
    before = dict(executor.stats)

    compiled = await _run(app, COMPILED, LEAF_NODES, {})
    made_compiled, made[:] = list(made), []
    reference = await _run(app, REFERENCE, LEAF_NODES, {})

    # then the compiled run answers as graphql-core does, from the rows: the consumers of
    # the first page are objects (their relations resolve), no order, audience or searched
    # consumer is
    assert json.dumps(compiled) == json.dumps(reference)
    assert 3.0 in [order["amount"] for consumer in compiled[0]["consumers"]["nodes"]
                   for order in consumer["a"]["nodes"]]
    assert executor.stats["compiled"] == before["compiled"] + 1
    assert made_compiled == ["Consumer"]
    assert {"Audience", "Order", "Consumer"} <= set(made)  # (graphql-core makes them all)


@pytest.mark.parametrize("table", [models.Consumer, models.Audience, models.Order],
                         ids=["Consumer", "Audience", "Order"])
async def test_a_node_types_row_columns_say_what_its_from_rows_does(
    write_engine: Any, table: Any
) -> None:
    # given every kind of stored value: nulls and not, metadata, whole and fractional sums
    rows, _ = _data()
    rows["orders"].append(order_row(rows["consumers"][1]["id"], "3", BASE_TIME,
                                    external_id="ext-3"))
    rows["consumers"][2]["total_order_value"] = Decimal("12.5")
    await _insert(write_engine, rows)
    node_type = {models.Consumer: types.Consumer, models.Audience: types.Audience,
                 models.Order: types.Order}[table]
    async with write_engine.connect() as conn:
        stored = (await conn.execute(select(table))).all()
    # when the objects are made from the rows
    nodes = node_type.from_rows(stored)
    # then each field the type lists reads, from the row, what its object holds
    for row, node in zip(stored, nodes, strict=True):
        for name, convert in node_type.row_columns.items():
            value = getattr(row, name)
            if value is not None and convert is not None:
                value = convert(value)
            assert (value, type(value)) == (getattr(node, name), type(getattr(node, name)))


async def test_each_execution_path_is_the_one_that_runs(gql: Any, execution_path: str) -> None:
    # The suite's switch (conftest.execution_path) really changes the executor.
    before = dict(executor.stats)

    await gql.data("{ consumers(first: 1) { totalCount nodes { id } } }")

    ran = {k: executor.stats[k] - before[k] for k in before}
    assert ran == ({"compiled": 1, "fallbacks": 0} if execution_path == "compiled" else
                   {"compiled": 0, "fallbacks": 0})


async def test_a_page_with_relations_costs_five_statements_on_both_paths(
    gql: Any, sql: Any, write_engine: Any
) -> None:
    await _given_data(write_engine)
    with sql.counting():
        await gql.data(OPERATIONS[0][1])
    # page, count, audiences, audience counts, orders (Order.consumer primed by the page)
    assert sql.count == 5, sql.statements


# (case, operation, variables, whether the compiled executor answers it alone)
MUTATIONS: list[tuple[str, str, dict[str, Any], bool]] = [
    ("create, with the new consumer's relations", """
      mutation { consumerCreate(input: {email: "New@Example.com", fullName: "New One",
                                        metadata: {tier: "gold", n: 1}}) {
        consumer { id email fullName metadata totalOrders lastOrderAt createdAt
                   audiences { totalCount nodes { id } } orders(first: 2) { nodes { id } } }
        userErrors { field code message } } }""", {}, True),
    ("root fields in order; refusals, aliases, fragments, __typename", """
      mutation($id: ID!, $items: [ConsumerCreateInput!]!) {
        first: consumerUpdate(id: $id, input: {fullName: "Renamed"}) {
          consumer { ...C } userErrors { code } }
        batch: consumerBatchCreate(input: $items, errorPolicy: REJECT_FAILED_ROWS) {
          count results { consumer { email } userErrors { field code message } }
          userErrors { field code } }
        gone: consumerDelete(id: "cons_nonsense") { consumer { id } userErrors { field code } }
        __typename }
      fragment C on Consumer { __typename id fullName audiences { totalCount } }""",
     {"id": "ID0", "items": [{"email": "b1@example.com"}, {"email": "not an email"},
                             {"email": "USER1@example.com"}, {"phone": "+1 (415) 555-0100"}]},
     True),
    ("an error inside the payload: the write is replayed, not repeated", """
      mutation { consumerCreate(input: {email: "once@example.com"}) {
        consumer { email orders(first: 500) { nodes { id } } } userErrors { code } } }""", {},
     False),
    ("an error after two writes: their payloads show the state right after each", """
      mutation($id: ID!) {
        a: orderRecord(input: {consumerId: $id, amount: 1, currency: "USD",
                               placedAt: "2024-01-01T00:00:00Z"}) {
          order { consumer { totalOrders } } userErrors { code } }
        b: orderRecord(input: {consumerId: $id, amount: 1, currency: "USD",
                               placedAt: "2024-01-02T00:00:00Z"}) {
          order { consumer { totalOrders } } userErrors { code } }
        c: consumerCreate(input: {email: "once@example.com"}) {
          consumer { orders(first: 500) { nodes { id } } } userErrors { code } }
        d: consumerCreate(input: {email: "after@example.com"}) { consumer { email } } }""",
     {"id": "ID0"}, False),
    ("fragments at the root (left to graphql-core)", """
      mutation { ...M } fragment M on Mutation {
        consumerCreate(input: {email: "frag@example.com"}) { consumer { email } } }""", {},
     False),
]
_GENERATED = {"id", "createdAt", "updatedAt"}


def _masked(value: Any) -> Any:
    """Values a write generates afresh each run (ids, timestamps) as a placeholder."""
    if isinstance(value, dict):
        return {k: "<generated>" if k in _GENERATED and isinstance(v, str) else _masked(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


async def _stored(engine: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(
            models.Consumer.email, models.Consumer.full_name, models.Consumer.phone
        ).order_by(models.Consumer.email_key, models.Consumer.phone))
        return [tuple(row) for row in rows]


@pytest.mark.compares_paths
@pytest.mark.parametrize(("case", "query", "variables", "compiled_alone"), MUTATIONS,
                         ids=[m[0] for m in MUTATIONS])
async def test_compiled_mutations_equal_graphql_core(
    app: FastAPI, write_engine: Any, case: str, query: str, variables: dict[str, Any],
    compiled_alone: bool,
) -> None:
    # the same data before each run, ids included
    rows, ids = _data()
    variables = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in variables.items()}
    await _insert(write_engine, rows)
    before = dict(executor.stats)

    compiled = await _run(app, COMPILED, query, variables)
    compiled_rows = await _stored(write_engine)
    ran = {k: executor.stats[k] - before[k] for k in before}
    await empty_tables(write_engine)
    await _insert(write_engine, rows)
    reference = await _run(app, REFERENCE, query, variables)

    assert json.dumps(_masked(compiled)) == json.dumps(_masked(reference))
    assert compiled_rows == await _stored(write_engine)  # each write done once
    assert ran == ({"compiled": 1, "fallbacks": 0} if compiled_alone else
                   {"compiled": 0, "fallbacks": 1}), case


def test_each_selection_is_compiled_once_however_deep_the_lists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A list's items are planned once, whether they end up answered in one loop or field by
    field: planning them twice doubled the work at every list level (2^levels), which a
    client could ask for with a new document on every request."""
    from graphql import parse

    calls: list[tuple[str, int]] = []
    fields = executor._Compiler.fields

    def counted(self: Any, object_type: Any, sub_sets: Any) -> Any:
        calls.append((object_type.name, id(sub_sets[0])))
        return fields(self, object_type, sub_sets)

    monkeypatch.setattr(executor._Compiler, "fields", counted)
    # given five levels of lists, each with a nested connection (so not answered in one loop)
    members = "nodes { id }"
    for _ in range(4):
        members = f"nodes {{ id audiences {{ nodes {{ id consumers {{ {members} }} }} }} }}"
    document = parse(f"{{ consumers(first: 1) {{ {members} }} }}")
    schema = COMPILED._schema
    # when the document is planned
    assert executor._plan_for(schema, document, None) is not None
    # then every object selection was planned exactly once
    assert len(calls) == len(set(calls)), calls
