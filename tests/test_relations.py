"""Relation fields load through DataLoaders: a page costs the same statements at any size."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from consumers_graphql.store import models
from tests.conftest import GraphQL, StatementCounter
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

PAGE_WITH_RELATIONS = """
query($first: Int!) {
  consumers(first: $first) {
    nodes {
      id email
      audiences { nodes { id name } }
      orders(first: 5) {
        pageInfo { hasNextPage }
        nodes { id amount consumer { id email } }
      }
    }
  }
}
"""

PAGE_WITH_COUNTS = """
query($first: Int!) {
  consumers(first: $first) {
    totalCount
    nodes {
      audiences { totalCount nodes { id consumers(first: 3) { totalCount nodes { id } } } }
      orders(first: 2) { totalCount nodes { id } }
    }
  }
}
"""


async def given(engine: Any, consumers: list[dict[str, Any]], audiences: list[dict[str, Any]],
                orders: list[dict[str, Any]]) -> None:
    """The rows, consumer i a member of audience j when i + j is odd."""
    await insert_consumers(engine, consumers)
    await insert_rows(engine, models.Audience, audiences)
    await insert_rows(engine, models.ConsumerAudience, [
        {"consumer_id": c["id"], "audience_id": a["id"], "created_at": BASE_TIME}
        for i, c in enumerate(consumers) for j, a in enumerate(audiences) if (i + j) % 2
    ])
    await insert_rows(engine, models.Order, orders)


async def given_consumers_with_relations(engine: Any, count: int = 120) -> list[dict[str, Any]]:
    consumers = [consumer_row(n) for n in range(count)]
    await given(engine, consumers, [audience_row(name) for name in ("VIP", "Newsletter", "Lapsed")],
                [order_row(c["id"], f"{k}.50", BASE_TIME + timedelta(days=k))
                 for i, c in enumerate(consumers) for k in range(i % 8)])
    return consumers


@pytest.mark.parametrize("size", [1, 20, 100])
async def test_page_with_relations_costs_three_statements(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, size: int
) -> None:
    await given_consumers_with_relations(write_engine)
    with sql.counting():
        data = await gql.data(PAGE_WITH_RELATIONS, {"first": size})
    nodes = data["consumers"]["nodes"]
    assert len(nodes) == size
    # page + audiences + orders; Order.consumer is served by the loader the page primed
    assert sql.count == 3, sql.statements


async def test_relation_statements_are_the_same_sql_for_any_number_of_parents(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, dialect: str
) -> None:
    if dialect != "postgresql":
        pytest.skip("SQLite lists the parents in an IN (...)")
    await given_consumers_with_relations(write_engine)
    texts = []
    for size in (2, 7, 100, 1, 1):
        with sql.counting():
            await gql.data(PAGE_WITH_RELATIONS, {"first": size})
        texts.append(sql.statements[1:])  # the relations' (the root page has its LIMIT bound)
    # one array parameter, = ANY($1): rendered and prepared once whatever the page size
    assert texts[0] == texts[1] == texts[2]
    assert all("ANY" in statement for statement in texts[0]), texts[0]
    # but for one parent, bound alone (an index scan, where the array's generic plan is a
    # bitmap scan sized for ten): a statement of its own, the same each time
    assert texts[3] == texts[4] != texts[0]
    assert all("ANY" not in statement and "_parent" in statement for statement in texts[3])


@pytest.mark.parametrize("size", [1, 20, 100])
async def test_counts_and_nested_pages_cost_a_constant_number(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, size: int
) -> None:
    await given_consumers_with_relations(write_engine)
    with sql.counting():
        await gql.data(PAGE_WITH_COUNTS, {"first": size})
    # page, count, audiences, audience counts, audience members, member counts, orders,
    # order counts
    assert sql.count == 8, sql.statements


async def test_relations_hold_the_right_rows(gql: GraphQL, write_engine: Any) -> None:
    consumers = await given_consumers_with_relations(write_engine, count=10)
    newest = consumers[-1]  # created last: first in the default order, 9 % 8 = 1 order
    data = await gql.data(PAGE_WITH_RELATIONS, {"first": 3})
    node = data["consumers"]["nodes"][0]
    assert node["id"] == newest["id"]
    assert [o["amount"] for o in node["orders"]["nodes"]] == [0.5]
    assert node["orders"]["nodes"][0]["consumer"] == {"id": newest["id"],
                                                     "email": newest["email"]}
    # consumer 9 is in the audiences j where (9 + j) is odd: j = 0 and 2, sorted by name
    assert [a["name"] for a in node["audiences"]["nodes"]] == ["Lapsed", "VIP"]

    seven = next(n for n in data["consumers"]["nodes"] if n["id"] == consumers[7]["id"])
    amounts = [o["amount"] for o in seven["orders"]["nodes"]]
    assert amounts == [6.5, 5.5, 4.5, 3.5, 2.5]  # newest placed first, 5 of 7
    assert seven["orders"]["pageInfo"]["hasNextPage"] is True


ORDERS_OF = """
query($id: ID!, $first: Int, $after: String, $last: Int, $before: String) {
  consumer(id: $id) {
    orders(first: $first, after: $after, last: $last, before: $before) {
      totalCount
      pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
      nodes { amount }
    }
  }
}
"""


async def test_nested_connection_pages_both_ways(gql: GraphQL, write_engine: Any) -> None:
    consumers = await given_consumers_with_relations(write_engine, count=8)
    seven = consumers[7]["id"]  # 7 orders: amounts 6.5 (newest) .. 0.5
    first = (await gql.data(ORDERS_OF, {"id": seven, "first": 3}))["consumer"]["orders"]
    assert [n["amount"] for n in first["nodes"]] == [6.5, 5.5, 4.5]
    assert first["totalCount"] == 7
    assert (first["pageInfo"]["hasNextPage"], first["pageInfo"]["hasPreviousPage"]) == (True, False)
    second = (await gql.data(ORDERS_OF, {"id": seven, "first": 3,
                                         "after": first["pageInfo"]["endCursor"]}))
    page = second["consumer"]["orders"]
    assert [n["amount"] for n in page["nodes"]] == [3.5, 2.5, 1.5]
    assert (page["pageInfo"]["hasNextPage"], page["pageInfo"]["hasPreviousPage"]) == (True, True)
    back = (await gql.data(ORDERS_OF, {"id": seven, "last": 2,
                                       "before": page["pageInfo"]["startCursor"]}))
    page = back["consumer"]["orders"]
    assert [n["amount"] for n in page["nodes"]] == [5.5, 4.5]
    assert (page["pageInfo"]["hasNextPage"], page["pageInfo"]["hasPreviousPage"]) == (True, True)


async def test_audience_members_and_filter_agree(gql: GraphQL, write_engine: Any) -> None:
    await given_consumers_with_relations(write_engine, count=30)
    data = await gql.data("{ audiences { nodes { id name consumers(first: 100) "
                          "{ totalCount nodes { id } } } } }")
    assert len(data["audiences"]["nodes"]) == 3
    for audience in data["audiences"]["nodes"]:
        members = [n["id"] for n in audience["consumers"]["nodes"]]
        assert audience["consumers"]["totalCount"] == len(members) == 15
        filtered = await gql.data(
            "query($a: ID!) { consumers(audienceId: $a, first: 100) { totalCount nodes { id } } }",
            {"a": audience["id"]},
        )
        assert [n["id"] for n in filtered["consumers"]["nodes"]] == members
        assert filtered["consumers"]["totalCount"] == 15


MEMBERS = """
query($first: Int, $last: Int) {
  audiences {
    nodes {
      id
      consumers(first: $first, last: $last) {
        pageInfo { hasNextPage hasPreviousPage }
        nodes { id }
      }
    }
  }
}
"""

MEMBERS_OF = """
query($id: ID!, $first: Int, $after: String, $last: Int, $before: String) {
  audience(id: $id) {
    consumers(first: $first, after: $after, last: $last, before: $before) {
      pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
      nodes { id }
    }
  }
}
"""


async def test_members_page_per_audience_in_both_directions(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    # given three audiences of 15 members each among 30 consumers
    await given_consumers_with_relations(write_engine, count=30)
    everything = (await gql.data(MEMBERS, {"first": 100}))["audiences"]["nodes"]
    expected = {a["id"]: [n["id"] for n in a["consumers"]["nodes"]] for a in everything}
    assert len(expected) == 3 and all(len(m) == 15 for m in expected.values())

    # when the first and the last page of every audience come in one request
    for args, window in (({"first": 4}, slice(None, 4)), ({"last": 4}, slice(-4, None))):
        with sql.counting():
            nodes = (await gql.data(MEMBERS, args))["audiences"]["nodes"]
        assert sql.count == 2  # the audiences, and every audience's page in one statement
        for audience in nodes:
            assert [n["id"] for n in audience["consumers"]["nodes"]] == (
                expected[audience["id"]][window])
            info = audience["consumers"]["pageInfo"]
            assert (info["hasNextPage"], info["hasPreviousPage"]) == (
                ("first" in args), ("last" in args))

    # and each audience's members are walked 4 at a time, forwards and backwards
    for audience_id, members in expected.items():
        for forward in (True, False):
            seen: list[str] = []
            cursor = None
            while True:
                args = ({"first": 4, "after": cursor} if forward
                        else {"last": 4, "before": cursor})
                page = (await gql.data(MEMBERS_OF, {"id": audience_id, **args})
                        )["audience"]["consumers"]
                ids = [n["id"] for n in page["nodes"]]
                seen = seen + ids if forward else ids + seen
                info = page["pageInfo"]
                more = info["hasNextPage"] if forward else info["hasPreviousPage"]
                back = info["hasPreviousPage"] if forward else info["hasNextPage"]
                assert back is (cursor is not None)
                if not more:
                    break
                cursor = info["endCursor"] if forward else info["startCursor"]
            # then every member comes once, in the order of the full page
            assert seen == members


# --- a page loaded ahead reads only the columns its nodes select -------------------------------

FULL = """{
  consumers(first: 6) {
    nodes {
      id
      audiences { nodes { id name description createdAt updatedAt } }
      orders(first: 3) {
        edges { cursor }
        nodes { id amount currency placedAt externalId createdAt consumer { id } }
      }
    }
  }
}"""


async def given_relations_with_every_column_set(engine: Any) -> None:
    """Every column of the audiences and orders holds a value (none is NULL), so a column
    read as NULL would show."""
    consumers = [consumer_row(n) for n in range(6)]
    audiences = [audience_row(name, description=f"about {name}",
                              created_at=BASE_TIME + timedelta(hours=n),
                              updated_at=BASE_TIME + timedelta(days=n))
                 for n, name in enumerate(("VIP", "Newsletter", "Lapsed"))]
    await given(engine, consumers, audiences, [
        order_row(c["id"], f"{k}.25", BASE_TIME + timedelta(days=k), external_id=f"x-{i}-{k}",
                  created_at=BASE_TIME - timedelta(minutes=i * 10 + k))
        for i, c in enumerate(consumers) for k in range(1 + i % 5)
    ])


def _only(nodes: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [{name: node[name] for name in names} for node in nodes]


# (query, what each consumer's answer must be, built from FULL's answer for it)
SELECTIONS: list[tuple[str, Any]] = [
    ("""{ consumers(first: 6) { nodes {
        a: audiences { nodes { id description } }
        b: audiences { nodes { createdAt } } } } }""",
     lambda full: {"a": {"nodes": _only(full["audiences"]["nodes"], "id", "description")},
                   "b": {"nodes": _only(full["audiences"]["nodes"], "createdAt")}}),
    ("""{ consumers(first: 6) { nodes { audiences { nodes { ...A ... on Node { id } } } } } }
        fragment A on Audience { updatedAt ... on Audience { description } }""",
     lambda full: {"audiences": {"nodes": _only(full["audiences"]["nodes"], "updatedAt",
                                                "description", "id")}}),
    ("""{ consumers(first: 6) { nodes {
        orders(first: 3) { edges { cursor node { externalId createdAt } } } } } }""",
     lambda full: {"orders": {"edges": [
         {"cursor": edge["cursor"], "node": node} for edge, node in zip(
             full["orders"]["edges"], _only(full["orders"]["nodes"], "externalId",
                                            "createdAt"), strict=True)]}}),
    ("""query($yes: Boolean!) { consumers(first: 6) { nodes {
        orders(first: 3) { nodes { id amount @include(if: $yes) externalId @skip(if: $yes) } }
        } } }""",
     lambda full: {"orders": {"nodes": _only(full["orders"]["nodes"], "id", "amount")}}),
    ("""{ consumers(first: 6) { nodes {
        orders(first: 3) { nodes { currency consumer { id } } } } } }""",
     lambda full: {"orders": {"nodes": _only(full["orders"]["nodes"], "currency",
                                             "consumer")}}),
    ("""{ consumers(first: 6) { nodes { orders(first: 3) { pageInfo { endCursor } } } } }""",
     lambda full: {"orders": {"pageInfo": {"endCursor": (
         full["orders"]["edges"][-1]["cursor"] if full["orders"]["edges"] else None)}}}),
]


@pytest.mark.parametrize("case", range(len(SELECTIONS)))
async def test_nested_pages_answer_alike_whatever_their_nodes_select(
        gql: GraphQL, write_engine: Any, case: int) -> None:
    await given_relations_with_every_column_set(write_engine)
    full = (await gql.data(FULL))["consumers"]["nodes"]
    query, expected = SELECTIONS[case]
    found = (await gql.data(query, {"yes": True} if "$yes" in query else None)
             )["consumers"]["nodes"]
    assert found == [expected(node) for node in full]


async def test_nested_pages_read_only_the_selected_columns(
        gql: GraphQL, sql: StatementCounter, write_engine: Any) -> None:
    """What is not selected is read as NULL (not sent, not decoded); a field with a
    resolver (Order.consumer reads consumer_id) reads every column."""
    await given_relations_with_every_column_set(write_engine)
    with sql.counting():
        await gql.data("""{ consumers(first: 6) { nodes {
            audiences { nodes { id name } } orders(first: 3) { nodes { amount } } } } }""")
    _page, audiences, orders = sql.statements
    for column in ("description", "created_at", "updated_at"):
        assert f"NULL AS {column}" in audiences
    for column in ("consumer_id", "currency", "external_id", "created_at"):
        assert f"NULL AS {column}" in orders
    for column in ("amount", "placed_at"):  # selected; the order's sort
        assert f"NULL AS {column}" not in orders
    with sql.counting():
        await gql.data("""{ consumers(first: 6) { nodes {
            orders(first: 3) { nodes { consumer { id } } } } } }""")
    assert "NULL AS" not in sql.statements[1]


# A relation under a directive is not loaded ahead: its resolver takes the page loaded for
# the other selections of the same relation, which must then hold every column.
HIDDEN = [
    # on the relation field itself, beside an alias without one
    """{ consumers(first: 6) { nodes {
        a: audiences { nodes { id } }
        b: audiences @include(if: true) { nodes { id name description } } } } }""",
    # on `nodes` of the parent connection
    """{ consumers(first: 6) {
        nodes { a: audiences { nodes { id } } }
        nodes @include(if: true) { b: audiences { nodes { id name description } } } } }""",
    # on a fragment spread at the consumer
    """{ consumers(first: 6) { nodes { a: audiences { nodes { id } } ...F @skip(if: false) } } }
       fragment F on Consumer { b: audiences { nodes { id name description } } }""",
    # the same response key, merged (a non-null amount read as NULL would fail the request)
    """{ consumers(first: 6) { nodes {
        orders(first: 3) { nodes { id } }
        orders(first: 3) @include(if: true) { nodes { id amount currency } } } } }""",
]


@pytest.mark.parametrize("case", range(len(HIDDEN)))
async def test_a_relation_under_a_directive_gets_every_column(
        gql: GraphQL, write_engine: Any, case: int) -> None:
    await given_relations_with_every_column_set(write_engine)
    full = (await gql.data(FULL))["consumers"]["nodes"]
    found = (await gql.data(HIDDEN[case]))["consumers"]["nodes"]
    if case < 3:
        assert [node["b"]["nodes"] for node in found] == [
            _only(node["audiences"]["nodes"], "id", "name", "description") for node in full]
    else:
        assert [node["orders"]["nodes"] for node in found] == [
            _only(node["orders"]["nodes"], "id", "amount", "currency") for node in full]


async def test_narrowed_nested_pages_page_on_from_their_cursors(
        gql: GraphQL, write_engine: Any) -> None:
    """A narrowed page's cursors lead to the right rows and flags: after and before add
    probes to the statement (a UNION of selects), each with its NULL columns."""
    await given_relations_with_every_column_set(write_engine)
    full = (await gql.data("""{ consumers(first: 6) { nodes {
        orders(first: 5) { edges { cursor node { id currency } } }
        audiences { edges { cursor node { id description } } } } } }"""))["consumers"]["nodes"]
    for node in full:
        edges = node["orders"]["edges"]
        if len(edges) < 3:
            continue
        middle = edges[1]["cursor"]
        for args, want, info in (
                (f'first: 1, after: "{middle}"', edges[2:3],
                 {"hasNextPage": len(edges) > 3, "hasPreviousPage": True}),
                (f'last: 1, before: "{middle}"', edges[0:1],
                 {"hasNextPage": True, "hasPreviousPage": False})):
            got = (await gql.data(f"""{{ consumers(first: 6) {{ nodes {{ id
                orders({args}) {{ pageInfo {{ hasNextPage hasPreviousPage }}
                edges {{ cursor node {{ id currency }} }} }} }} }} }}"""))["consumers"]["nodes"]
            mine = [g for g in got if g["orders"]["edges"] and any(
                e["node"]["id"] == want[0]["node"]["id"] for e in g["orders"]["edges"])]
            assert mine and mine[0]["orders"]["edges"] == want
            assert mine[0]["orders"]["pageInfo"] == info
    for node in full:
        edges = node["audiences"]["edges"]
        if len(edges) < 2:
            continue
        got = (await gql.data(f"""{{ consumers(first: 6) {{ nodes {{
            audiences(first: 1, after: "{edges[0]['cursor']}") {{
              edges {{ cursor node {{ id description }} }} }} }} }} }}"""))["consumers"]["nodes"]
        assert any(g["audiences"]["edges"] == edges[1:2] for g in got)


async def test_relation_pages_without_a_cursor_from_either_end(
        gql: GraphQL, write_engine: Any) -> None:
    """`first: n` and `last: n` without a cursor on a page of parents (one statement for
    all of them): each parent's own rows, in order, cut to n, with the flag of the end
    that was cut; consumers have 1 to 5 orders here."""
    await given_relations_with_every_column_set(write_engine)
    full = (await gql.data("""{ consumers(first: 6) { nodes { id
        orders { nodes { id } } } } }"""))["consumers"]["nodes"]
    assert sorted(len(node["orders"]["nodes"]) for node in full) == [1, 1, 2, 3, 4, 5]
    for n in (1, 2, 3, 5):
        got = (await gql.data(f"""{{ consumers(first: 6) {{ nodes {{ id
            head: orders(first: {n}) {{ nodes {{ id }}
              pageInfo {{ hasNextPage hasPreviousPage }} }}
            tail: orders(last: {n}) {{ nodes {{ id }}
              pageInfo {{ hasNextPage hasPreviousPage }} }} }} }} }}"""))["consumers"]["nodes"]
        assert [node["id"] for node in got] == [node["id"] for node in full]
        for node, whole in zip(got, full, strict=True):
            ids = [order["id"] for order in whole["orders"]["nodes"]]
            cut = len(ids) > n
            assert [o["id"] for o in node["head"]["nodes"]] == ids[:n], (n, ids)
            assert node["head"]["pageInfo"] == {"hasNextPage": cut, "hasPreviousPage": False}
            assert [o["id"] for o in node["tail"]["nodes"]] == ids[-n:], (n, ids)
            assert node["tail"]["pageInfo"] == {"hasNextPage": False, "hasPreviousPage": cut}


RELATION_PAGES_FROM_VARIABLES = """
query($n: Int, $after: String) { consumers(first: 8) { nodes { id
  orders(first: $n, after: $after) { edges { cursor node { id } } } } } }
"""


async def test_one_document_pages_its_relations_by_each_requests_variables(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    """The look-ahead works out what a document loads once, unless a relation's argument
    reads a variable: the same document sent again with other values loads those."""
    await given_consumers_with_relations(write_engine, count=8)
    full = {node["id"]: [edge["node"]["id"] for edge in node["orders"]["edges"]]
            for node in (await gql.data(RELATION_PAGES_FROM_VARIABLES, {"n": 7}))[
                "consumers"]["nodes"]}
    assert max(map(len, full.values())) == 7
    for n in (1, 3, 1):
        with sql.counting():
            nodes = (await gql.data(RELATION_PAGES_FROM_VARIABLES, {"n": n}))["consumers"][
                "nodes"]
        assert {node["id"]: [edge["node"]["id"] for edge in node["orders"]["edges"]]
                for node in nodes} == {key: ids[:n] for key, ids in full.items()}
        assert sql.count == 2, sql.statements  # still loaded ahead: the page and the orders
    # and a cursor from a variable: each consumer's orders after its first one
    first_edges = {node["id"]: node["orders"]["edges"] for node in nodes}
    for consumer_id, edges in first_edges.items():
        if not edges:
            continue
        page = (await gql.data(RELATION_PAGES_FROM_VARIABLES,
                               {"n": 2, "after": edges[0]["cursor"]}))["consumers"]["nodes"]
        mine = next(node for node in page if node["id"] == consumer_id)
        assert [edge["node"]["id"] for edge in mine["orders"]["edges"]] == \
            full[consumer_id][1:3]


async def test_one_page_of_a_relation_asked_for_with_its_arguments_spelled_otherwise(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    """Each selection's resolver finds the page loaded ahead by the arguments it was given:
    `orders`, `orders(first: 20)` and `orders(first: 20, after: null)` are one request,
    loaded once (reading only the selected columns: a resolver that missed it would load
    its own, with every column, in a third statement); and so is the same under a
    directive (then with every column, as a directive may hide what is read)."""
    await given_consumers_with_relations(write_engine, count=8)
    spelled = """a: orders { nodes { id } } b: orders(first: 20) { nodes { id amount } }
      c: orders(first: 20, after: null) { nodes { id } }"""
    for selection in (spelled, spelled + " d: orders(first: 20) @include(if: true) "
                      "{ nodes { id } }"):
        with sql.counting():
            nodes = (await gql.data(f"{{ consumers(first: 8) {{ nodes {{ id {selection} }} }} }}"
                                    ))["consumers"]["nodes"]
        assert sql.count == 2, sql.statements  # the page and the orders
        assert sum(len(node["a"]["nodes"]) for node in nodes) == sum(range(8))
        for node in nodes:
            ids = [order["id"] for order in node["a"]["nodes"]]
            for key in "bcd" if "d:" in selection else "bc":
                assert [order["id"] for order in node[key]["nodes"]] == ids
            assert all(isinstance(order["amount"], float) for order in node["b"]["nodes"])
