"""Connection semantics: keyset walks in both directions, exact page flags, NULLs last,
stability under concurrent inserts, and every misuse as BAD_USER_INPUT."""

from __future__ import annotations

import base64
import json
import random
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from consumers_graphql.store import models
from tests.conftest import GraphQL
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
)

PAGE = """
query Page($first: Int, $after: String, $last: Int, $before: String,
           $sortBy: ConsumerSortField!, $sortDir: SortDirection!) {
  consumers(first: $first, after: $after, last: $last, before: $before,
            sortBy: $sortBy, sortDir: $sortDir) {
    edges { cursor node { id } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  }
}
"""

SORT_FIELDS = {
    # sort field -> (row key, whether it can be NULL)
    "CREATED_AT": "created_at",
    "EMAIL": "email_key",
    "FULL_NAME": "full_name_key",
    "LAST_ORDER_AT": "last_order_at",
    "TOTAL_ORDER_VALUE": "total_order_value",
    "TOTAL_ORDERS": "total_orders",
}


def make_consumers(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Consumers with NULLs in every nullable sort field, ties in every tie-able one, mixed
    case and non-ASCII names."""
    rng = random.Random(seed)
    names = ["alice", "Bob", "chloé", "Zoë", "émile", "dave", "Eve", None]
    rows = []
    for n in range(count):
        name = rng.choice(names)
        rows.append(consumer_row(
            n,
            created_at=BASE_TIME + timedelta(seconds=rng.randrange(0, 40),
                                             microseconds=rng.choice([0, 123456])),
            email=None if n % 9 == 0 else f"{rng.choice(['A', 'b', 'C'])}{n % 13}.{n}@Example.com",
            full_name=None if name is None else f"{name} {rng.randrange(3)}",
            last_order_at=None if n % 3 else BASE_TIME + timedelta(hours=rng.randrange(5)),
            total_orders=rng.randrange(4),
            total_order_value=Decimal(rng.randrange(5)) / 4,
        ))
    return rows


def reference_order(rows: list[dict[str, Any]], key: str, descending: bool) -> list[str]:
    present = sorted((r for r in rows if r[key] is not None), key=lambda r: (r[key], r["id"]),
                     reverse=descending)
    missing = sorted((r for r in rows if r[key] is None), key=lambda r: r["id"], reverse=descending)
    return [r["id"] for r in present + missing]


async def walk(gql: GraphQL, sort_by: str, sort_dir: str, *, forward: bool) -> list[str]:
    ids: list[str] = []
    cursor = None
    pages = 0
    while True:
        variables: dict[str, Any] = {"sortBy": sort_by, "sortDir": sort_dir}
        if forward:
            variables.update(first=7, after=cursor)
        else:
            variables.update(last=7, before=cursor)
        conn = (await gql.data(PAGE, variables))["consumers"]
        info = conn["pageInfo"]
        page_ids = [edge["node"]["id"] for edge in conn["edges"]]
        assert info["startCursor"] == conn["edges"][0]["cursor"]
        assert info["endCursor"] == conn["edges"][-1]["cursor"]
        more, back = (info["hasNextPage"], info["hasPreviousPage"]) if forward else (
            info["hasPreviousPage"], info["hasNextPage"])
        # Exact flags at both ends: nothing behind the first page, something behind later ones.
        assert back is (pages > 0)
        pages += 1
        if forward:
            ids += page_ids
            cursor = info["endCursor"]
        else:
            ids = page_ids + ids
            cursor = info["startCursor"]
        if not more:
            return ids


@pytest.mark.parametrize("sort_dir", ["ASC", "DESC"])
@pytest.mark.parametrize("sort_by", list(SORT_FIELDS))
async def test_walks_every_consumer_once_in_reference_order(
    gql: GraphQL, write_engine: Any, sort_by: str, sort_dir: str
) -> None:
    # given 250 consumers with NULLs and ties in the sort field
    rows = make_consumers(250)
    await insert_consumers(write_engine, rows)
    expected = reference_order(rows, SORT_FIELDS[sort_by], sort_dir == "DESC")

    # when walking forwards with first: 7 and backwards with last: 7
    forwards = await walk(gql, sort_by, sort_dir, forward=True)
    backwards = await walk(gql, sort_by, sort_dir, forward=False)

    # then both give every consumer once, in the reference order
    assert forwards == expected
    assert backwards == expected


async def test_nulls_sort_last_in_both_directions(gql: GraphQL, write_engine: Any) -> None:
    rows = [consumer_row(0, email=None), consumer_row(1, email="b@x.io"),
            consumer_row(2, email="A@x.io"), consumer_row(3, email=None)]
    await insert_consumers(write_engine, rows)
    for sort_dir, emails in (("ASC", ["A@x.io", "b@x.io"]), ("DESC", ["b@x.io", "A@x.io"])):
        query = f"{{ consumers(sortBy: EMAIL, sortDir: {sort_dir}) {{ nodes {{ email }} }} }}"
        nodes = (await gql.data(query))["consumers"]["nodes"]
        assert [n["email"] for n in nodes] == [*emails, None, None]


async def test_flags_are_exact_with_cursors_on_both_sides(gql: GraphQL, write_engine: Any) -> None:
    rows = make_consumers(30)
    await insert_consumers(write_engine, rows)
    order = reference_order(rows, "last_order_at", False)
    everything = await gql.data(PAGE, {"first": 30, "sortBy": "LAST_ORDER_AT", "sortDir": "ASC"})
    cursors = [e["cursor"] for e in everything["consumers"]["edges"]]
    assert [e["node"]["id"] for e in everything["consumers"]["edges"]] == order
    flags = everything["consumers"]["pageInfo"]
    assert (flags["hasNextPage"], flags["hasPreviousPage"]) == (False, False)

    # A window between two cursors, read from either end.
    for args in ({"first": 100}, {"last": 100}, {"first": 3}, {"last": 3}):
        variables = {"after": cursors[4], "before": cursors[20], "sortBy": "LAST_ORDER_AT",
                     "sortDir": "ASC", **args}
        conn = (await gql.data(PAGE, variables))["consumers"]
        ids = [e["node"]["id"] for e in conn["edges"]]
        size = next(iter(args.values()))
        window = order[5:20]
        assert ids == (window[:size] if "first" in args else window[-size:])
        assert conn["pageInfo"]["hasPreviousPage"] is True
        assert conn["pageInfo"]["hasNextPage"] is True

    # first: 0 returns no edges but still knows whether rows follow.
    conn = (await gql.data(PAGE, {"first": 0, "sortBy": "EMAIL", "sortDir": "ASC"}))["consumers"]
    assert conn["edges"] == []
    assert conn["pageInfo"] == {"hasNextPage": True, "hasPreviousPage": False,
                                "startCursor": None, "endCursor": None}

    # After the last row: empty page, rows before it.
    conn = (await gql.data(PAGE, {"after": cursors[-1], "sortBy": "LAST_ORDER_AT",
                                  "sortDir": "ASC"}))["consumers"]
    assert conn["edges"] == []
    assert conn["pageInfo"]["hasPreviousPage"] is True
    assert conn["pageInfo"]["hasNextPage"] is False


async def test_inserts_between_pages_neither_repeat_nor_skip(
    gql: GraphQL, write_engine: Any
) -> None:
    # given 60 consumers read in pages of 7, newest first
    rows = make_consumers(60)
    await insert_consumers(write_engine, rows)
    existing = set(r["id"] for r in rows)
    seen: list[str] = []
    cursor = None
    rng = random.Random(3)
    extra = 1000
    while True:
        conn = (await gql.data(PAGE, {"first": 7, "after": cursor, "sortBy": "CREATED_AT",
                                      "sortDir": "DESC"}))["consumers"]
        seen += [e["node"]["id"] for e in conn["edges"]]
        if not conn["pageInfo"]["hasNextPage"]:
            break
        cursor = conn["pageInfo"]["endCursor"]
        # when new rows land before, inside and after the part already read
        new = []
        for _ in range(3):
            extra += 1
            new.append(consumer_row(extra, created_at=BASE_TIME + timedelta(
                seconds=rng.randrange(-5, 45), microseconds=rng.randrange(1_000_000))))
        await insert_consumers(write_engine, new)

    # then every row that existed throughout was seen exactly once
    old_seen = [i for i in seen if i in existing]
    assert len(old_seen) == len(set(old_seen)) == len(existing)
    assert len(seen) == len(set(seen))


def forged(scope: str, value: Any, row_id: str = "cons_01JD0000000000000000000000") -> str:
    """A cursor with the right shape but a value the server never writes."""
    payload = json.dumps([scope, value, row_id]).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


FORGED = [
    ("int out of range", "consumers:totalOrders:asc", 2**40),
    ("huge int", "consumers:totalOrders:asc", 2**70),
    ("huge decimal", "consumers:totalOrderValue:asc", "1e30"),
    ("too precise decimal", "consumers:totalOrderValue:asc", "1.000001"),
    ("non-UTC timestamp", "consumers:createdAt:desc", "0001-01-01T00:00:00+01:00"),
    ("naive timestamp", "consumers:createdAt:desc", "2024-01-01T00:00:00"),
    ("NUL in text", "consumers:email:asc", "a\u0000b"),
    ("lone surrogate", "consumers:email:asc", "a\ud800"),
]


@pytest.mark.parametrize(("case", "scope", "value"), FORGED, ids=[f[0] for f in FORGED])
async def test_forged_cursors_are_bad_user_input(
    gql: GraphQL, write_engine: Any, case: str, scope: str, value: Any
) -> None:
    await insert_consumers(write_engine, [consumer_row(1)])
    sort_by = {"totalOrders": "TOTAL_ORDERS", "totalOrderValue": "TOTAL_ORDER_VALUE",
               "createdAt": "CREATED_AT", "email": "EMAIL"}[scope.split(":")[1]]
    sort_dir = scope.split(":")[2].upper()
    cursor = forged(scope, value)
    for args in ({"first": 2, "after": cursor}, {"last": 2, "before": cursor}):
        body = await gql(PAGE, {**args, "sortBy": sort_by, "sortDir": sort_dir})
        assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body
    # a well-formed value with an id of no known kind is refused too
    body = await gql(PAGE, {"first": 1, "after": forged("consumers:email:asc", "a", "x_1"),
                            "sortBy": "EMAIL", "sortDir": "ASC"})
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"]


MISUSES = [
    ("first and last", "consumers(first: 1, last: 1)"),
    ("negative first", "consumers(first: -1)"),
    ("negative last", "consumers(last: -1)"),
    ("first over 100", "consumers(first: 101)"),
    ("last over 100", "consumers(last: 101)"),
    ("garbage cursor", 'consumers(after: "not-a-cursor")'),
    ("garbage before", 'consumers(before: "%%%")'),
    ("base64 non-json", 'consumers(after: "aGVsbG8")'),
    ("json wrong shape", 'consumers(after: "eyJpZCI6ImNvbnNfMDFIWFlaIn0=")'),
    ("short search", 'consumers(search: "a")'),
    ("blank search", 'consumers(search: "   ")'),
    ("too long search", f'consumers(search: "{"x" * 201}")'),
    ("NUL in search", 'consumers(search: "ab\\u0000")'),
    ("NUL in exact email", 'searchConsumers(email: "a\\u0000@x.io")'),
    ("NUL in exact phone", 'searchConsumers(phone: "+1\\u0000")'),
    ("NUL in externalId", 'searchConsumers(externalId: "x\\u0000")'),
    ("bad audience id", 'consumers(audienceId: "cons_01JD0000000000000000000000")'),
    ("nested first over 100", "consumers { nodes { orders(first: 101) { nodes { id } } } }"),
    ("nested first and last",
     "audiences { nodes { consumers(first: 1, last: 1) { nodes { id } } } }"),
    ("search without criteria", "searchConsumers"),
    ("search short q", 'searchConsumers(q: "x")'),
    ("search first over 100", 'searchConsumers(q: "xy", first: 500)'),
    ("audiences last over 100", "audiences(last: 1000)"),
    ("too many node ids", "nodes(ids: [" + ",".join(['"x"'] * 101) + "]) { id }"),
]


def _field(selection: str) -> str:
    if "{" in selection or selection.startswith("nodes("):
        return selection
    return selection + " { nodes { id } }"


@pytest.mark.parametrize(("case", "selection"), MISUSES, ids=[m[0] for m in MISUSES])
async def test_misuse_is_bad_user_input(
    gql: GraphQL, write_engine: Any, case: str, selection: str
) -> None:
    # given a consumer and an audience, so nested connections are resolved too
    await insert_consumers(write_engine, [consumer_row(1)])
    await insert_rows(write_engine, models.Audience, [audience_row("VIP")])
    body = await gql("{ " + _field(selection) + " }")
    assert body["errors"], case
    codes = {e["extensions"]["code"] for e in body["errors"]}
    assert codes == {"BAD_USER_INPUT"}, body


async def test_unencodable_search_text_is_bad_user_input(gql: GraphQL) -> None:
    # a lone surrogate can only arrive through a variable (the parser refuses it in text),
    # as a JSON escape
    payload = json.dumps({"query": "query($s: String) { consumers(search: $s) { nodes { id } } }",
                          "variables": {"s": "ab\ud800"}})
    response = await gql.client.post("/graphql", content=payload, headers={
        **gql.headers, "Content-Type": "application/json"})
    body = response.json()
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BAD_USER_INPUT"], body


async def test_cursor_of_another_order_is_refused(gql: GraphQL, write_engine: Any) -> None:
    await insert_consumers(write_engine, [consumer_row(n) for n in range(3)])
    conn = (await gql.data(PAGE, {"first": 1, "sortBy": "EMAIL", "sortDir": "ASC"}))["consumers"]
    cursor = conn["pageInfo"]["endCursor"]
    for sort_by, sort_dir in (("EMAIL", "DESC"), ("FULL_NAME", "ASC"), ("CREATED_AT", "ASC")):
        body = await gql(PAGE, {"first": 1, "after": cursor, "sortBy": sort_by,
                                "sortDir": sort_dir})
        assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        assert "another connection or sort order" in body["errors"][0]["message"]
    # and a consumers cursor is no audiences cursor
    body = await gql("query($a: String) { audiences(after: $a) { nodes { id } } }", {"a": cursor})
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_invalid_variable_values_are_bad_user_input(gql: GraphQL) -> None:
    body = await gql("query($t: DateTime) { consumers(createdAfter: $t) { nodes { id } } }",
                     {"t": "yesterday"})
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    body = await gql("query($t: DateTime) { consumers(createdAfter: $t) { nodes { id } } }",
                     {"t": "2024-11-01T10:00:00"})
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
    assert "time zone" in body["errors"][0]["message"]
