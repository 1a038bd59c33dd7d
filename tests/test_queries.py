"""Look-ups by id, search and filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from consumers_graphql.ids import IdKind, new_id
from consumers_graphql.store import models
from tests.conftest import GraphQL
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

NODES = """
query($ids: [ID!]!) {
  nodes(ids: $ids) {
    __typename id
    ... on Consumer { email }
    ... on Audience { name }
    ... on Order { amount consumer { id } }
  }
}
"""


async def test_node_and_nodes_resolve_every_type_in_order(gql: GraphQL, write_engine: Any) -> None:
    consumer = consumer_row(1)
    audience = audience_row("VIP")
    order = order_row(consumer["id"], "12.3400", BASE_TIME)
    await insert_consumers(write_engine, [consumer])
    await insert_rows(write_engine, models.Audience, [audience])
    await insert_rows(write_engine, models.Order, [order])
    unknown = "cons_01JD0000000000000000000000"
    ids = [order["id"], "garbage", audience["id"], unknown, consumer["id"], consumer["id"],
           "aud_" + consumer["id"][5:]]

    nodes = (await gql.data(NODES, {"ids": ids}))["nodes"]

    assert len(nodes) == len(ids)
    assert nodes[0] == {"__typename": "Order", "id": order["id"], "amount": 12.34,
                        "consumer": {"id": consumer["id"]}}
    assert nodes[1] is None
    assert nodes[2] == {"__typename": "Audience", "id": audience["id"], "name": "VIP"}
    assert nodes[3] is None
    assert nodes[4] == nodes[5] == {"__typename": "Consumer", "id": consumer["id"],
                                    "email": consumer["email"]}
    assert nodes[6] is None  # a consumer's ULID under the audience prefix names nothing

    for node_id, typename in ((consumer["id"], "Consumer"), (audience["id"], "Audience"),
                              (order["id"], "Order")):
        node = (await gql.data("query($id: ID!) { node(id: $id) { __typename id } }",
                               {"id": node_id}))["node"]
        assert node == {"__typename": typename, "id": node_id}
    assert (await gql.data('{ node(id: "nope") { id } }'))["node"] is None
    assert (await gql.data(f'{{ consumer(id: "{audience["id"]}") {{ id }} }}'))["consumer"] is None
    assert (await gql.data(f'{{ audience(id: "{unknown}") {{ id }} }}'))["audience"] is None


async def test_a_root_look_up_by_id_is_read_once_and_kept_for_the_request(
    gql: GraphQL, sql: Any, write_engine: Any
) -> None:
    consumers = [consumer_row(n) for n in range(2)]
    await insert_consumers(write_engine, consumers)
    first, second = (c["id"] for c in consumers)
    await insert_rows(write_engine, models.Order, [
        order_row(first, "1.50", BASE_TIME + timedelta(days=n)) for n in range(2)])
    # a `consumer(id:)`: its orders' consumer is the one read, not read again
    with sql.counting():
        data = await gql.data(
            "query($id: ID!) { consumer(id: $id) { id orders(first: 5) { nodes { consumer {"
            " id email } } } } }", {"id": first})
    assert data["consumer"]["id"] == first
    assert [n["consumer"] for n in data["consumer"]["orders"]["nodes"]] == [
        {"id": first, "email": consumers[0]["email"]}] * 2
    assert sql.count == 2
    # two of them in one operation still share one statement, and each alias its answer
    with sql.counting():
        data = await gql.data(
            "query($a: ID!, $b: ID!) { a: consumer(id: $a) { id } b: consumer(id: $b) { id }"
            " c: consumer(id: $a) { email } }", {"a": first, "b": second})
    assert data == {"a": {"id": first}, "b": {"id": second},
                    "c": {"email": consumers[0]["email"]}}
    assert sql.count == 1
    # one that names nothing is null, read once
    with sql.counting():
        data = await gql.data("query($id: ID!) { consumer(id: $id) { id } }",
                              {"id": new_id(IdKind.CONSUMER)})
    assert data == {"consumer": None}
    assert sql.count == 1


async def test_nodes_cost_one_statement_per_type(
    gql: GraphQL, sql: Any, write_engine: Any
) -> None:
    consumers = [consumer_row(n) for n in range(20)]
    await insert_consumers(write_engine, consumers)
    with sql.counting():
        nodes = (await gql.data(NODES, {"ids": [c["id"] for c in consumers]}))["nodes"]
    assert [n["id"] for n in nodes] == [c["id"] for c in consumers]
    assert sql.count == 1


async def test_consumer_fields_and_timestamps(gql: GraphQL, write_engine: Any) -> None:
    row = consumer_row(1, metadata={"tier": "vip", "nested": {"a": [1, 2]}}, phone="+14155550100",
                       external_id="crm-1", created_at=BASE_TIME.replace(microsecond=120000),
                       last_order_at=BASE_TIME)
    await insert_consumers(write_engine, [row])
    data = await gql.data(
        "query($id: ID!) { consumer(id: $id) { id email phone fullName metadata externalId "
        "totalOrders totalOrderValue lastOrderAt createdAt updatedAt } }", {"id": row["id"]}
    )
    assert data["consumer"] == {
        "id": row["id"], "email": "user1@example.com", "phone": "+14155550100",
        "fullName": "User 1", "metadata": {"tier": "vip", "nested": {"a": [1, 2]}},
        "externalId": "crm-1", "totalOrders": 0, "totalOrderValue": 0.0,
        "lastOrderAt": "2024-11-01T10:00:00Z",
        "createdAt": "2024-11-01T10:00:00.120000Z", "updatedAt": "2024-11-01T10:00:00.120000Z",
    }


async def test_timestamps_are_written_alike_beside_an_integer_orjson_cannot_write(
    gql: GraphQL, write_engine: Any
) -> None:
    # given a consumer whose metadata holds an integer beyond 64 bits (the response is then
    # written by json, not orjson) and one without, both with orders
    rows = [consumer_row(1, metadata={"big": 2**70 + 1}, created_at=BASE_TIME.replace(
                microsecond=5), last_order_at=BASE_TIME),
            consumer_row(2, created_at=BASE_TIME + timedelta(seconds=1))]
    await insert_consumers(write_engine, rows)
    await insert_rows(write_engine, models.Order, [
        order_row(rows[0]["id"], "1.50", BASE_TIME.replace(microsecond=250000))])
    query = ("{ consumers(first: 2, sortDir: ASC) { nodes { metadata createdAt lastOrderAt "
             "orders { nodes { placedAt } } } } }")
    data = await gql.data(query)
    # then every timestamp is RFC 3339 in UTC with a Z, microseconds when not zero
    assert data["consumers"]["nodes"] == [
        {"metadata": {"big": 2**70 + 1}, "createdAt": "2024-11-01T10:00:00.000005Z",
         "lastOrderAt": "2024-11-01T10:00:00Z",
         "orders": {"nodes": [{"placedAt": "2024-11-01T10:00:00.250000Z"}]}},
        {"metadata": None, "createdAt": "2024-11-01T10:00:01Z", "lastOrderAt": None,
         "orders": {"nodes": []}},
    ]


async def test_postgresql_driver_decodes_timestamps_in_utc_whatever_the_session_zone(
    dialect: str, write_engine: Any
) -> None:
    """store/db.py's UTCDateTime leaves asyncpg's timestamptz values as they come: aware, UTC."""
    if dialect != "postgresql":
        pytest.skip("asyncpg's contract")
    async with write_engine.begin() as conn:
        await conn.execute(text("SET LOCAL TIME ZONE 'America/New_York'"))
        value = (await conn.execute(
            text("SELECT '2024-11-01 12:00:00.5+02'::timestamptz"))).scalar_one()
    assert value == datetime(2024, 11, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert value.tzinfo is UTC


async def test_postgresql_infinite_timestamps_are_read_aware_too(
    dialect: str, write_engine: Any
) -> None:
    """asyncpg gives timestamptz's ±infinity as naive datetime.max/min; UTCDateTime makes
    them aware like every other value (a key's lastUsedAt set so by hand must not break
    the key)."""
    if dialect != "postgresql":
        pytest.skip("asyncpg's contract")
    from sqlalchemy import literal_column, select

    from consumers_graphql.store.db import UTCDateTime

    async with write_engine.connect() as conn:
        high, low = (await conn.execute(select(
            literal_column("'infinity'::timestamptz", UTCDateTime()),
            literal_column("'-infinity'::timestamptz", UTCDateTime())))).one()
    assert (high, low) == (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC))


async def test_created_after_a_read_back_timestamp_excludes_its_consumer(
    gql: GraphQL, write_engine: Any
) -> None:
    rows = [consumer_row(n, created_at=BASE_TIME + timedelta(microseconds=n)) for n in range(3)]
    await insert_consumers(write_engine, rows)
    middle = (await gql.data(f'{{ consumer(id: "{rows[1]["id"]}") {{ createdAt }} }}'))
    stamp = middle["consumer"]["createdAt"]
    assert stamp == "2024-11-01T10:00:00.000001Z"
    after = await gql.data("query($t: DateTime) { consumers(createdAfter: $t) { nodes { id } } }",
                           {"t": stamp})
    assert [n["id"] for n in after["consumers"]["nodes"]] == [rows[2]["id"]]
    before = await gql.data("query($t: DateTime) { consumers(createdBefore: $t) "
                            "{ nodes { id } } }", {"t": stamp})
    assert [n["id"] for n in before["consumers"]["nodes"]] == [rows[0]["id"]]
    # other offsets name the same instant
    same = await gql.data('{ consumers(createdAfter: "2024-11-01T12:00:00.000001+02:00") '
                          "{ nodes { id } } }")
    assert [n["id"] for n in same["consumers"]["nodes"]] == [rows[2]["id"]]


SEARCH = """
query($search: String, $sortBy: ConsumerSortField!, $sortDir: SortDirection!,
      $audienceId: ID, $after: DateTime) {
  consumers(search: $search, sortBy: $sortBy, sortDir: $sortDir, audienceId: $audienceId,
            createdAfter: $after, first: 100) {
    totalCount
    nodes { id fullName email phone }
  }
}
"""


async def given_search_data(engine: Any) -> list[dict[str, Any]]:
    rows = [
        consumer_row(0, email="John.Doe@Example.com", full_name="John Doe", phone="+14155550100"),
        consumer_row(1, email="jsmith@example.org", full_name="John Smith", phone="+442071838750"),
        consumer_row(2, email="zoe@example.net", full_name="Zoë Johnson", phone=None),
        consumer_row(3, email=None, full_name="Émile JOHNS", phone="+33612345678"),
        consumer_row(4, email="100%_off@example.com", full_name=None, phone="+14155550199"),
        consumer_row(5, email="mary@example.com", full_name="Mary Major", phone=None),
    ]
    await insert_consumers(engine, rows)
    return rows


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("john", [0, 1, 2, 3]),        # name, case-insensitive, as a substring
        ("JOHN", [0, 1, 2, 3]),
        ("doe@exa", [0]),               # part of an email
        ("example.org", [1]),
        ("5550100", [0]),               # part of a phone
        ("(415) 555-01", [0, 4]),       # formatted phone input
        ("+44 20", [1]),
        ("zoë", [2]),                   # non-ASCII
        ("ÉMILE", [3]),
        ("%_", [4]),                    # LIKE wildcards are literal
        ("jo", [0, 1, 2, 3, 5]),        # the two-character minimum (Mary Ma-jo-r)
        ("nobody-here", []),
    ],
)
async def test_search_matches_part_of_email_phone_or_name(
    gql: GraphQL, write_engine: Any, term: str, expected: list[int]
) -> None:
    rows = await given_search_data(write_engine)
    data = await gql.data(SEARCH, {"search": term, "sortBy": "CREATED_AT", "sortDir": "ASC"})
    assert [n["id"] for n in data["consumers"]["nodes"]] == [rows[i]["id"] for i in expected]
    assert data["consumers"]["totalCount"] == len(expected)


async def test_search_combines_with_filters_and_sorting(gql: GraphQL, write_engine: Any) -> None:
    rows = await given_search_data(write_engine)
    audience = audience_row("Johns")
    await insert_rows(write_engine, models.Audience, [audience])
    await insert_rows(write_engine, models.ConsumerAudience, [
        {"consumer_id": rows[i]["id"], "audience_id": audience["id"], "created_at": BASE_TIME}
        for i in (1, 3, 5)
    ])
    by_name = await gql.data(SEARCH, {"search": "john", "sortBy": "FULL_NAME", "sortDir": "DESC"})
    # case-insensitive, then by code point: "é" sorts after "z"
    assert [n["fullName"] for n in by_name["consumers"]["nodes"]] == [
        "Émile JOHNS", "Zoë Johnson", "John Smith", "John Doe"]
    members = await gql.data(SEARCH, {"search": "john", "sortBy": "EMAIL", "sortDir": "ASC",
                                      "audienceId": audience["id"]})
    assert [n["id"] for n in members["consumers"]["nodes"]] == [rows[1]["id"], rows[3]["id"]]
    assert members["consumers"]["totalCount"] == 2
    recent = await gql.data(SEARCH, {"search": "john", "sortBy": "CREATED_AT", "sortDir": "DESC",
                                     "after": "2024-11-01T10:01:00Z"})
    assert [n["id"] for n in recent["consumers"]["nodes"]] == [rows[3]["id"], rows[2]["id"]]


SEARCH_CONSUMERS = """
query($q: String, $email: String, $phone: String, $externalId: String, $first: Int,
      $after: String) {
  searchConsumers(q: $q, email: $email, phone: $phone, externalId: $externalId, first: $first,
                  after: $after) {
    totalCount
    pageInfo { hasNextPage endCursor }
    nodes { id }
  }
}
"""


async def test_search_consumers_exact_criteria(gql: GraphQL, write_engine: Any) -> None:
    rows = await given_search_data(write_engine)
    external = consumer_row(9, email="ext@example.com", external_id="crm-42")
    await insert_consumers(write_engine, [external])

    async def ids(**variables: Any) -> list[str]:
        data = await gql.data(SEARCH_CONSUMERS, variables)
        return [n["id"] for n in data["searchConsumers"]["nodes"]]

    assert await ids(email="john.doe@example.COM") == [rows[0]["id"]]
    assert await ids(email="john.doe@example") == []  # exact, not a substring
    assert await ids(phone="+1 (415) 555-0100") == [rows[0]["id"]]
    assert await ids(externalId="crm-42") == [external["id"]]
    assert await ids(externalId="CRM-42") == []
    assert await ids(q="john", phone="+33 6 12 34 56 78") == [rows[3]["id"]]
    # newest first: consumer 9, then 5, 4, 2, 1, 0 (3 has no email)
    found = await ids(q="example")
    assert found[1:] == [r["id"] for r in reversed(rows) if r["email"]]
    assert len(found) == 6
    page = (await gql.data(SEARCH_CONSUMERS, {"q": "john", "first": 2}))["searchConsumers"]
    assert page["totalCount"] == 4 and page["pageInfo"]["hasNextPage"] is True
    rest = (await gql.data(SEARCH_CONSUMERS, {"q": "john", "first": 2,
                                              "after": page["pageInfo"]["endCursor"]}))
    assert len(rest["searchConsumers"]["nodes"]) == 2
    assert rest["searchConsumers"]["pageInfo"]["hasNextPage"] is False


async def test_audiences_connection(gql: GraphQL, write_engine: Any) -> None:
    await insert_rows(write_engine, models.Audience,
                      [audience_row(n) for n in ("b", "C", "a", "Á")])
    data = await gql.data("{ audiences(first: 3) { totalCount pageInfo { hasNextPage } "
                          "nodes { name } } }")
    # byte-wise order on both databases: upper case before lower case before non-ASCII
    assert [n["name"] for n in data["audiences"]["nodes"]] == ["C", "a", "b"]
    assert data["audiences"]["totalCount"] == 4
    assert data["audiences"]["pageInfo"]["hasNextPage"] is True
