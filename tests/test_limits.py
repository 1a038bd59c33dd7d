"""Limits measured before execution: each refusal has its own code and runs no SQL; the
cost is reported on every response; parsing and validation are cached per document."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import strawberry.schema.schema as strawberry_schema

from consumers_graphql.api import limits
from consumers_graphql.api.limits import Limits
from consumers_graphql.api.schema import build_schema
from tests.conftest import GraphQL, StatementCounter, throttle_status

CONNECTION_OF_100 = "consumers(first: 100) { nodes { audiences(first: 100) { nodes { " \
    "consumers(first: 100) { nodes { id } } } } } }"

# Cost, by hand (default page size 20, $pageSize defaults to 10):
#   consumers(first: $pageSize)                        10
#     audiences(first: 5)                  10 x 5    =  50
#       consumers (default 20)         10 x 5 x 20   = 1000
#     ...Orders: orders(last: 3)           10 x 3    =  30
#   audiences (default 20)                              20
#   nodes(ids: [2 ids])                                  2
#     ...Orders: orders(last: 3)            2 x 3    =   6
#                                                     ----
#                                                     1118
PRICED = """
query Priced($pageSize: Int = 10) {
  consumers(first: $pageSize) {
    nodes {
      audiences(first: 5) { nodes { consumers { totalCount } } }
      ...Orders
    }
  }
  audiences { totalCount }
  nodes(ids: ["cons_01JD0000000000000000000000", "cons_01JD0000000000000000000001"]) {
    ... on Consumer { ...Orders }
  }
}
fragment Orders on Consumer { orders(last: 3) { nodes { id } } }
"""


def nested(depth: int) -> str:
    """`consumer { orders { nodes { consumer { … } } } }`: depth levels of fields."""
    query, levels = "id", 1
    while levels + 3 <= depth:
        query = f"orders {{ nodes {{ consumer {{ {query} }} }} }}"
        levels += 3
    return f'{{ consumer(id: "cons_01JD0000000000000000000000") {{ {query} }} }}'


async def refused(gql: GraphQL, sql: StatementCounter, query: str, code: str,
                  variables: dict[str, Any] | None = None) -> dict[str, Any]:
    with sql.counting():
        body = await gql(query, variables)
    assert "data" not in body
    assert [e["extensions"]["code"] for e in body["errors"]] == [code], body["errors"]
    assert sql.statements == []  # only the API key lookup ran
    return body


async def test_101_aliases_are_refused(gql: GraphQL, sql: StatementCounter) -> None:
    query = "{ " + " ".join(f"a{i}: __typename" for i in range(101)) + " }"

    body = await refused(gql, sql, query, "MAX_ALIASES_EXCEEDED")

    assert body["errors"][0]["message"] == "The operation uses 101 aliases; the limit is 30."


async def test_aliases_in_a_fragment_count_once_per_spread(
    gql: GraphQL, sql: StatementCounter
) -> None:
    fragment = "fragment F on Query { " + " ".join(f"a{i}: __typename" for i in range(8)) + " }"
    query = "{ ...F ... on Query { ...F ...F ...F } } " + fragment  # 4 x 8 = 32

    await refused(gql, sql, query, "MAX_ALIASES_EXCEEDED")


async def test_a_field_duplicated_500_times_is_refused(gql: GraphQL, sql: StatementCounter) -> None:
    query = "query cop { " + "__typename " * 500 + "}"

    body = await refused(gql, sql, query, "MAX_DUPLICATE_FIELDS_EXCEEDED")

    assert "`__typename` is selected 500 times" in body["errors"][0]["message"]


async def test_a_depth_20_query_is_refused(gql: GraphQL, sql: StatementCounter) -> None:
    body = await refused(gql, sql, nested(20), "MAX_DEPTH_EXCEEDED")

    assert body["errors"][0]["message"] == "The operation is 20 levels deep; the limit is 12."
    # a refused operation still tells its price: 6 nested orders connections of 20 each
    assert body["extensions"]["cost"] == {
        "requested": sum(20**n for n in range(1, 7)), "limit": 50_000,
        # the key's rate limit bucket, untouched: a refused operation takes nothing
        "throttleStatus": throttle_status()}


async def test_a_depth_12_query_runs(gql: GraphQL) -> None:
    assert await gql.data(nested(12)) == {"consumer": None}


async def test_depth_counts_through_fragments(gql: GraphQL, sql: StatementCounter) -> None:
    query = nested(10).replace("{ id }", "{ ...Deeper }") + \
        " fragment Deeper on Consumer { orders { nodes { consumer { id } } } }"

    await refused(gql, sql, query, "MAX_DEPTH_EXCEEDED")


async def test_too_many_tokens_are_refused(gql: GraphQL, sql: StatementCounter) -> None:
    query = "{ " + "__typename @skip(if: false) " * 900 + "}"  # 7 tokens a field

    body = await refused(gql, sql, query, "MAX_TOKENS_EXCEEDED")

    assert body["errors"][0]["message"] == "The document has more than 5000 tokens, the limit."


async def test_directive_overloading_is_refused(gql: GraphQL, sql: StatementCounter) -> None:
    query = "query cop { __typename @aa@aa@aa@aa@aa@aa@aa@aa@aa@aa }"  # graphql-cop's probe

    await refused(gql, sql, query, "MAX_DIRECTIVES_EXCEEDED")


async def test_a_cost_over_the_cap_is_refused_and_priced(
    gql: GraphQL, sql: StatementCounter
) -> None:
    body = await refused(gql, sql, "{ " + CONNECTION_OF_100 + " }", "MAX_COST_EXCEEDED")

    requested = 100 + 100 * 100 + 100 * 100 * 100
    assert body["extensions"]["cost"] == {"requested": requested, "limit": 50_000,
                                          "throttleStatus": throttle_status()}
    assert body["errors"][0]["extensions"]["cost"] == requested


async def test_cost_uses_the_variables(gql: GraphQL, sql: StatementCounter) -> None:
    query = "query($n: Int!, $m: Int) { consumers(first: $n) { nodes { " \
        "audiences(first: $n) { nodes { consumers(last: $m) { totalCount } } } } } }"

    small = await gql(query, {"n": 10, "m": 100})  # 10 + 10 x 10 + 10 x 10 x 100
    await refused(gql, sql, query, "MAX_COST_EXCEEDED", {"n": 100, "m": 5})

    assert small["extensions"]["cost"]["requested"] == 10_110


async def test_extensions_cost_is_right_for_nested_connections_and_fragments(
    gql: GraphQL,
) -> None:
    default = await gql(PRICED)
    smaller = await gql(PRICED, {"pageSize": 4})

    assert "errors" not in default
    assert default["extensions"]["cost"] == {"requested": 1118, "limit": 50_000,
                                             "throttleStatus": throttle_status(1118)}
    # 4 + 4x5 + 4x5x20 + 4x3 + 20 + 2 + 2x3
    assert smaller["extensions"]["cost"]["requested"] == 464


async def test_the_cost_is_reported_with_errors_from_execution(gql: GraphQL) -> None:
    body = await gql("{ consumers(last: 1000) { totalCount } }")

    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert body["extensions"]["cost"] == {  # clamped
        "requested": 100, "limit": 50_000,
        "throttleStatus": throttle_status(100)}


async def test_an_exponential_fragment_document_is_measured_quickly(
    gql: GraphQL, sql: StatementCounter
) -> None:
    # F0 spreads F1 twice, F1 spreads F2 twice, …: 2^40 __typename once expanded.
    fragments = " ".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}"
                         for i in range(40))
    query = "{ ...F0 } " + fragments + " fragment F40 on Query { __typename }"

    started = time.perf_counter()
    await refused(gql, sql, query, "MAX_DUPLICATE_FIELDS_EXCEEDED")

    assert time.perf_counter() - started < 1


async def test_limits_come_from_settings() -> None:
    schema = build_schema(limits=Limits(depth=3, cost=30))

    deep = await schema.execute("{ consumer(id: \"x\") { orders { nodes { id } } } }")
    costly = await schema.execute("{ consumers(first: 31) { totalCount } }")

    assert deep.errors is not None
    assert deep.errors[0].extensions == {"code": "MAX_DEPTH_EXCEEDED", "limit": 3}
    assert costly.errors is not None
    assert costly.extensions == {"cost": {"requested": 31, "limit": 30}}


async def test_a_repeated_operation_is_parsed_and_validated_once(
    gql: GraphQL, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"parse": 0, "validate": 0}

    def counting(name: str, function: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return counted

    # (Strawberry's parse, or the direct path's: api/schema.py, Schema.execute_ready)
    monkeypatch.setattr(strawberry_schema, "parse", counting("parse", strawberry_schema.parse))
    monkeypatch.setattr(limits, "parse", counting("parse", limits.parse))
    monkeypatch.setattr(limits, "validate", counting("validate", limits.validate))
    # A text no other test sends, so the first request is a miss.
    query = f"# {uuid.uuid4()}\nquery($n: Int) {{ consumers(first: $n) {{ totalCount }} }}"

    costs = [(await gql(query, {"n": n}))["extensions"]["cost"]["requested"] for n in (1, 2, 3)]

    assert calls == {"parse": 1, "validate": 1}
    assert costs == [1, 2, 3]  # the cost still follows each request's variables


def test_the_document_cache_is_bounded() -> None:
    cache = limits.DocumentCache(max_entries=2, max_chars=100)
    document = limits.Prepared(document=None, most_directives=0)  # type: ignore[arg-type]

    for text in ("a", "b", "c"):
        cache.put(("schema", text), document)
    cache.put(("schema", "x" * 101), document)

    assert len(cache) == 2
    assert cache.get(("schema", "a")) is None
    assert cache.get(("schema", "c")) is document
