"""The direct path for queries (Schema.execute_ready in api/schema.py, limits.ready): which
requests take it, that what it needs of a document is learnt once, and that it answers
exactly as Strawberry's `execute` does, errors, refusals and extensions included. The
differential tests compare it with graphql-core alone on random operations too (the
"compiled" path takes it): test_differential.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from consumers_graphql.api.limits import DocumentCache, Limits, ready
from consumers_graphql.store import models
from consumers_graphql.store.keys import Scope
from tests.conftest import _new_key, bearer, on_path
from tests.factories import BASE_TIME, consumer_row, insert_consumers, insert_rows, order_row
from tests.test_rate_limits import new_key

pytestmark = pytest.mark.compares_paths

PAGE = """query Page($after: String) { consumers(first: 3, after: $after) {
  totalCount pageInfo { hasNextPage endCursor }
  nodes { id email createdAt audiences { nodes { id name } }
          orders(first: 2) { nodes { id amount placedAt } } } } }"""
CONSUMER = "query One($id: ID!) { consumer(id: $id) { id email fullName totalOrderValue } }"
TWO = "query A { consumers(first: 1) { nodes { id } } } query B { __typename }"

# (name, query, variables, operationName, whether the direct path answers it)
OPERATIONS: list[tuple[str, str, dict[str, Any], str | None, bool]] = [
    ("a page with relations", PAGE, {}, None, True),
    ("a page after a cursor", PAGE, {"after": "{cursor}"}, None, True),
    ("by id", CONSUMER, {"id": "{consumer}"}, None, True),
    ("by an id of another kind", CONSUMER, {"id": "{order}"}, None, True),
    ("a malformed id", CONSUMER, {"id": "nope"}, None, True),
    ("a variable missing", CONSUMER, {}, None, True),
    ("a variable of the wrong type", CONSUMER, {"id": {"a": 1}}, None, True),
    ("an unknown variable", CONSUMER, {"id": "{consumer}", "other": 1}, None, True),
    ("a bad cursor", PAGE, {"after": "bad"}, None, True),
    ("a directive", "query($s: Boolean!) { consumers(first: 2) { nodes { id "
     "email @skip(if: $s) } } }", {"s": True}, None, True),
    ("introspection", "{ __typename __type(name: \"Consumer\") { name } }", {}, None, True),
    ("a named operation of two", TWO, {}, "B", True),
    ("a search", '{ consumers(first: 2, search: "user") { nodes { id } } }', {}, None, True),
    ("an operation name not in the document", TWO, {}, "C", False),
    ("two operations, none named", TWO, {}, None, False),
    ("a cost read from a variable", "query($n: Int) { consumers(first: $n) { nodes { id } } }",
     {"n": 2}, None, False),
    ("a list variable", "query($ids: [ID!]!) { nodes(ids: $ids) { id } }",
     {"ids": ["{consumer}"]}, None, False),
    ("a syntax error", "{ consumers { ", {}, None, False),
    ("a validation error", "{ consumers { nope } }", {}, None, False),
    ("over the depth limit", "{ consumers { nodes { orders { nodes { consumer { orders { "
     "nodes { consumer { orders { nodes { consumer { orders { nodes { consumer { id } } } } } "
     "} } } } } } } } } }", {}, None, False),
    ("over the cost limit", "{ consumers(first: 100) { nodes { orders(first: 100) { nodes { "
     "consumer { audiences(first: 100) { nodes { id } } } } } } } }", {}, None, False),
    ("a mutation", 'mutation { consumerDelete(id: "nope") { deletedId } }', {}, None, False),
]


@pytest.fixture
def direct(app: FastAPI) -> Iterator[None]:
    """The direct path turned back on after a test that turned it off."""
    yield
    on_path(app, "compiled")


def _bound(value: Any, ids: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, replacement in ids.items():
            value = value.replace("{" + name + "}", replacement)
    return value


def _comparable(response: httpx.Response) -> str:
    """Status, the headers an answer sets, and the body without the request id."""
    body = response.json()
    for error in body.get("errors") or ():
        error.get("extensions", {}).pop("requestId", None)
    headers = {name: response.headers.get(name)
               for name in ("content-type", "retry-after", "cache-control")}
    return json.dumps({"status": response.status_code, "headers": headers, **body}, indent=1)


async def _seed(app: FastAPI, client: httpx.AsyncClient, secret: str) -> dict[str, str]:
    engine = app.state.database.write_engine
    consumers = [consumer_row(n) for n in range(5)]
    order = order_row(consumers[0]["id"], "1.50", BASE_TIME)
    await insert_consumers(engine, consumers)
    await insert_rows(engine, models.Order, [order])
    page = (await client.post("/graphql", headers=bearer(secret), json={
        "query": "{ consumers(first: 2) { edges { cursor } } }"})).json()
    return {"consumer": consumers[0]["id"], "order": order["id"],
            "cursor": page["data"]["consumers"]["edges"][0]["cursor"]}


@pytest.mark.usefixtures("direct")
@pytest.mark.parametrize(("name", "query", "variables", "operation", "takes_it"), OPERATIONS,
                         ids=[operation[0] for operation in OPERATIONS])
async def test_the_direct_path_answers_as_execute_does(
    app: FastAPI, client: httpx.AsyncClient, api_key: str, name: str, query: str,
    variables: dict[str, Any], operation: str | None, takes_it: bool,
) -> None:
    # given consumers, one with an order
    ids = await _seed(app, client, api_key)
    body = {"query": query, "operationName": operation,
            "variables": {k: _bound(v, ids) for k, v in variables.items()}}
    schema = app.state.schema
    answers = {}
    for direct in (True, False, True):  # the second direct run: the document learnt
        # when the same request is answered with the direct path on, and off
        schema.direct = direct
        before = schema.ready_runs
        response = await client.post("/graphql", headers=bearer(api_key), json=body)
        # then the direct path answered it only where it applies, and only when on
        assert schema.ready_runs - before == (direct and takes_it), name
        answers[direct] = _comparable(response)
        # and both answered alike, an error, or none, as `execute` does
        assert answers[direct] == answers[True], f"{name}: the answers differ"
        assert response.status_code != 500 and "INTERNAL_SERVER_ERROR" not in response.text


@pytest.mark.usefixtures("direct")
@pytest.mark.parametrize("direct", [True, False])
async def test_a_throttled_query_is_refused_alike_on_both(
    app: FastAPI, client: httpx.AsyncClient, direct: bool
) -> None:
    # given a bucket of 30 points restoring one a hundred seconds
    app.state.schema.direct = direct
    secret = await new_key(app, 30, 0.01)
    query = {"query": "{ consumers(first: 20) { nodes { id } } }"}
    before = app.state.schema.ready_runs
    # when an operation of 20 points runs twice
    first = await client.post("/graphql", headers=bearer(secret), json=query)
    second = await client.post("/graphql", headers=bearer(secret), json=query)
    # then the first is answered with its cost, the second refused with 429, as `execute` does
    assert app.state.schema.ready_runs - before == (2 if direct else 0)
    assert first.status_code == 200, first.text
    assert first.json()["extensions"]["cost"]["throttleStatus"]["currentlyAvailable"] < 11
    assert second.status_code == 429, second.text
    assert second.headers["retry-after"]
    assert second.json() == {
        "errors": [{"message": second.json()["errors"][0]["message"], "extensions": {
            "code": "THROTTLED", "cost": 20,
            "throttleStatus": second.json()["errors"][0]["extensions"]["throttleStatus"]}}],
        "extensions": {"cost": {"requested": 20, "limit": 50_000, "throttleStatus":
                                second.json()["extensions"]["cost"]["throttleStatus"]}},
    }
    assert second.json()["errors"][0]["message"].startswith(
        "Throttled: this operation costs 20 points and this API key's bucket holds 10;")


@pytest.mark.usefixtures("direct")
async def test_a_key_without_the_read_scope_is_refused_on_the_way_through_execute(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    # given a key that may only write
    secret = await _new_key(app, "write only", frozenset({Scope.WRITE}))
    before = app.state.schema.ready_runs
    # when it sends a query the direct path would answer
    response = await client.post("/graphql", headers=bearer(secret), json={
        "query": "{ consumers(first: 1) { nodes { id } } }"})
    # then `execute` refuses it, as before
    assert app.state.schema.ready_runs == before
    assert response.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert "data" not in response.json()


def test_what_a_document_needs_is_learnt_once_and_leaves_with_it(app: FastAPI) -> None:
    # given a cache of two documents
    cache = DocumentCache(max_entries=2)
    schema, limits = app.state.schema, Limits()
    texts = [f"{{ consumers(first: {n}) {{ nodes {{ id }} }} }}" for n in (1, 2, 3)]
    # when the first is looked up three times
    found = [ready(schema, limits, False, texts[0], None, None, cache) for _ in range(3)]
    # then it was parsed and validated once, and found ready with its cost each time
    assert (cache.parses, cache.validations) == (1, 1)
    assert all(f is not None and f[1].cost == 1 and f[1].name is None for f in found)
    # and when two more documents push it out of the cache, it is parsed again
    for text in texts[1:]:
        assert ready(schema, limits, False, text, None, None, cache) is not None
    assert ready(schema, limits, False, texts[0], None, None, cache) is not None
    assert (cache.parses, cache.validations) == (4, 4)
    # and a document that is not ready is remembered as such, without a second validation
    for _ in range(2):
        assert ready(schema, limits, False, "{ consumers { nope } }", None, None, cache) is None
    assert (cache.parses, cache.validations) == (5, 5)
    # and operation names the document does not hold are not remembered (a client sending
    # a new one each time must not grow the entry)
    for name in ("A", "B", "C"):
        assert ready(schema, limits, False, texts[0], name, None, cache) is None
    assert ready(schema, limits, False, texts[0], None, None, cache) is not None
    entry = cache.get((schema, limits.tokens, False, texts[0]))
    assert entry is not None and list(entry.ready) == [None]
