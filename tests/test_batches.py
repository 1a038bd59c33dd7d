"""consumerBatchCreate / consumerBatchUpdate: error policies, aligned results, every bad item
reported with its path, the 500-item limit, and one INSERT statement per batch."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import func, select, text

from consumers_graphql.store import models
from consumers_graphql.store.normalize import derived_fields
from tests.conftest import GraphQL, StatementCounter

RESULT = "consumer { id email phone fullName metadata externalId updatedAt }"
BATCH_CREATE = f"""
mutation BatchCreate($input: [ConsumerCreateInput!]!, $policy: ErrorPolicy) {{
  consumerBatchCreate(input: $input, errorPolicy: $policy) {{
    count
    results {{ {RESULT} userErrors {{ field code message }} }}
    userErrors {{ field code message }}
  }}
}}
"""
BATCH_UPDATE = f"""
mutation BatchUpdate($input: [ConsumerBatchUpdateInput!]!, $policy: ErrorPolicy) {{
  consumerBatchUpdate(input: $input, errorPolicy: $policy) {{
    count
    results {{ {RESULT} userErrors {{ field code message }} }}
    userErrors {{ field code message }}
  }}
}}
"""


def people(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"email": f"user{n}@example.com", "fullName": f"User {n}"}
            for n in range(start, start + count)]


async def consumer_count(write_engine: Any) -> int:
    async with write_engine.connect() as conn:
        statement = select(func.count()).select_from(models.Consumer.__table__)
        return int((await conn.execute(statement)).scalar_one())


async def batch_create(
    gql: GraphQL, items: list[dict[str, Any]], policy: str | None = None
) -> dict[str, Any]:
    variables: dict[str, Any] = {"input": items}
    if policy is not None:
        variables["policy"] = policy
    payload: dict[str, Any] = (await gql.data(BATCH_CREATE, variables))["consumerBatchCreate"]
    return payload


def codes(errors: list[dict[str, Any]]) -> list[tuple[list[str], str]]:
    return [(e["field"], e["code"]) for e in errors]


# -- create -----------------------------------------------------------------------------------


async def test_batch_create_returns_results_in_input_order(gql: GraphQL, write_engine: Any) -> None:
    items = [
        {"email": "a@example.com", "phone": "+1 (415) 555-0100", "metadata": {"n": 1}},
        {"fullName": "No Email"},
        {"email": "c@example.com", "externalId": "ext-c"},
    ]

    payload = await batch_create(gql, items)

    assert payload["count"] == 3
    assert payload["userErrors"] == []
    consumers = [r["consumer"] for r in payload["results"]]
    assert [c["email"] for c in consumers] == ["a@example.com", None, "c@example.com"]
    assert consumers[0]["phone"] == "+14155550100"
    assert consumers[2]["externalId"] == "ext-c"
    # Ids follow input order, so an id sort reproduces the batch.
    ids = [c["id"] for c in consumers]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert await consumer_count(write_engine) == 3


ALL_FIELDS = ("id email phone fullName metadata externalId totalOrders totalOrderValue "
              "lastOrderAt createdAt updatedAt")
READ_BACK = f"""query($ids: [ID!]!) {{
  nodes(ids: $ids) {{ ... on Consumer {{ {ALL_FIELDS} }} }}
}}"""


async def test_created_consumers_are_answered_as_a_read_gives_them(gql: GraphQL) -> None:
    # The written rows are answered from the values inserted, not read back: every field
    # must be what a read of the same consumers gives, formatting and nulls included.
    items = [
        {"email": "Mixed.Case@Example.com", "phone": "+1 (415) 555-0100", "fullName": "Zoë",
         "metadata": {"big": 2**70, "pi": 3.14159, "nested": {"a": [1, None, "é"]}},
         "externalId": "ext-1"},
        {"fullName": "  Trimmed  "},
        {"email": "plain@example.com", "metadata": {}},
    ]
    batch = f"""mutation($input: [ConsumerCreateInput!]!) {{
      consumerBatchCreate(input: $input) {{ results {{ consumer {{ {ALL_FIELDS} }} }} }} }}"""
    single = f"""mutation {{
      consumerCreate(input: {{email: "one@example.com", metadata: {{x: 1}}}}) {{
        consumer {{ {ALL_FIELDS} }} }} }}"""

    created = [r["consumer"] for r in
               (await gql.data(batch, {"input": items}))["consumerBatchCreate"]["results"]]
    created.append((await gql.data(single))["consumerCreate"]["consumer"])

    read = (await gql.data(READ_BACK, {"ids": [c["id"] for c in created]}))["nodes"]
    assert created == read
    assert created[0]["metadata"]["big"] == 2**70 and created[1]["lastOrderAt"] is None


async def test_created_consumers_are_stored_as_sqlalchemy_stores_them(
    gql: GraphQL, write_engine: Any, dialect: str
) -> None:
    # On SQLite the batch INSERT binds its own parameters (_sqlite_parameters, domain/consumers).
    # What it stores must be what SQLAlchemy's own insert of the same consumers stores, to
    # the text of timestamps and JSON: rows sort and compare as stored.
    if dialect != "sqlite":
        pytest.skip("PostgreSQL's batch INSERT is SQLAlchemy's own")
    items = [
        {"email": "Same@Example.com", "phone": "+1 (415) 555-0100", "fullName": "Zoë",
         "metadata": {"big": 2**70, "nested": {"a": [1, None, "é"]}}, "externalId": "s-1"},
        {"email": "no.metadata@example.com", "fullName": "Other"},
    ]
    ids = [r["consumer"]["id"] for r in (await batch_create(gql, items))["results"]]
    table = models.Consumer.__table__
    as_stored = text(f"SELECT {', '.join(c.name for c in table.c)} FROM consumers "
                     "WHERE id IN (:a, :b) ORDER BY id")  # no column types: values as stored

    async with write_engine.begin() as conn:
        written = (await conn.execute(as_stored, {"a": ids[0], "b": ids[1]})).all()
        typed = (await conn.execute(select(table).where(table.c.id.in_(ids)))).all()
        await conn.execute(table.delete().where(table.c.id.in_(ids)))
        await conn.execute(table.insert(), [row._asdict() for row in typed])
        by_sqlalchemy = (await conn.execute(as_stored, {"a": ids[0], "b": ids[1]})).all()

    assert len(written) == 2
    assert written == by_sqlalchemy
    for row in typed:  # and the derived columns are where they belong
        assert row._asdict() | derived_fields(row.email, row.phone, row.full_name) == row._asdict()


async def test_empty_batch_writes_nothing(gql: GraphQL) -> None:
    payload = await batch_create(gql, [])
    assert payload == {"count": 0, "results": [], "userErrors": []}


@pytest.mark.parametrize("policy", [None, "REJECT_EVERYTHING"])
async def test_one_bad_item_of_500_rejects_everything(
    gql: GraphQL, write_engine: Any, policy: str | None
) -> None:
    items = people(500)
    items[250]["email"] = "not an email"

    payload = await batch_create(gql, items, policy)

    assert payload["count"] == 0
    assert codes(payload["userErrors"]) == [(["input", "250", "email"], "VALIDATION_FAILED")]
    assert len(payload["results"]) == 500
    assert all(r["consumer"] is None for r in payload["results"])
    assert codes(payload["results"][250]["userErrors"]) == codes(payload["userErrors"])
    assert all(r["userErrors"] == [] for i, r in enumerate(payload["results"]) if i != 250)
    assert await consumer_count(write_engine) == 0


async def test_one_bad_item_of_500_rejects_only_that_row(gql: GraphQL, write_engine: Any) -> None:
    items = people(500)
    items[250]["email"] = "not an email"

    payload = await batch_create(gql, items, "REJECT_FAILED_ROWS")

    assert payload["count"] == 499
    assert codes(payload["userErrors"]) == [(["input", "250", "email"], "VALIDATION_FAILED")]
    results = payload["results"]
    assert results[250]["consumer"] is None
    assert [r["consumer"]["email"] for i, r in enumerate(results) if i != 250] == [
        item["email"] for i, item in enumerate(items) if i != 250
    ]
    assert await consumer_count(write_engine) == 499


async def test_501_items_write_nothing(gql: GraphQL, write_engine: Any) -> None:
    # Refused before the list is coerced: a request error, nothing run.
    for policy in ("REJECT_EVERYTHING", "REJECT_FAILED_ROWS"):
        body = await gql(BATCH_CREATE, {"input": people(501), "policy": policy})

        assert "data" not in body
        (error,) = body["errors"]
        assert error["extensions"]["code"] == "BATCH_TOO_LARGE"
        assert "`$input` holds 501 items" in error["message"]
    assert await consumer_count(write_engine) == 0


async def test_every_bad_item_is_reported(gql: GraphQL, write_engine: Any) -> None:
    await batch_create(gql, [{"email": "taken@example.com", "externalId": "taken"}])
    items = people(8)
    items[1]["email"] = "TAKEN@example.com"  # exists already
    items[2]["phone"] = "12"  # invalid
    items[2]["fullName"] = "x" * 201  # and a second problem on the same item
    items[4]["email"] = "User0@Example.com"  # repeats item 0, case aside
    items[5]["externalId"] = "e-5"
    items[6]["externalId"] = "e-5"  # repeats item 5
    items[7]["externalId"] = "taken"  # exists already

    for policy, written in (("REJECT_EVERYTHING", 0), ("REJECT_FAILED_ROWS", 3)):
        payload = await batch_create(gql, items, policy)

        expected = [
            (["input", "1", "email"], "EMAIL_TAKEN"),
            (["input", "2", "phone"], "VALIDATION_FAILED"),
            (["input", "2", "fullName"], "VALIDATION_FAILED"),
            (["input", "4", "email"], "DUPLICATE_IN_BATCH"),
            (["input", "6", "externalId"], "DUPLICATE_IN_BATCH"),
            (["input", "7", "externalId"], "EXTERNAL_ID_TAKEN"),
        ]
        assert codes(payload["userErrors"]) == expected, policy
        per_item = [codes(r["userErrors"]) for r in payload["results"]]
        assert [e for item in per_item for e in item] == expected
        assert payload["count"] == written
        written_indices = [i for i, r in enumerate(payload["results"]) if r["consumer"]]
        assert written_indices == ([] if written == 0 else [0, 3, 5])
        assert "item 0" in payload["results"][4]["userErrors"][0]["message"]
    assert await consumer_count(write_engine) == 1 + 3


async def test_a_repeat_is_reported_even_when_its_first_occurrence_is_invalid(
    gql: GraphQL, write_engine: Any
) -> None:
    items = [
        {"email": "dup@example.com", "phone": "12", "externalId": "x-1"},  # invalid phone
        {"email": "DUP@example.com"},  # repeats item 0, which is not written
        {"email": "dup@example.com", "fullName": "x" * 201, "externalId": "x-1"},
        {"email": "fine@example.com"},
    ]
    expected = [
        (["input", "0", "phone"], "VALIDATION_FAILED"),
        (["input", "1", "email"], "DUPLICATE_IN_BATCH"),
        (["input", "2", "fullName"], "VALIDATION_FAILED"),
        (["input", "2", "email"], "DUPLICATE_IN_BATCH"),
        (["input", "2", "externalId"], "DUPLICATE_IN_BATCH"),
    ]
    for policy, written in (("REJECT_EVERYTHING", []), ("REJECT_FAILED_ROWS", [3])):
        payload = await batch_create(gql, items, policy)

        assert codes(payload["userErrors"]) == expected, policy
        results = payload["results"]
        assert [e for r in results for e in codes(r["userErrors"])] == expected
        assert "item 0" in results[1]["userErrors"][0]["message"]
        assert [i for i, r in enumerate(results) if r["consumer"]] == written
    assert await consumer_count(write_engine) == 1


async def test_batch_insert_is_one_statement(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, dialect: str
) -> None:
    # Mixed NULLs and omitted fields, which would split a naive executemany into groups.
    items: list[dict[str, Any]] = []
    for n in range(500):
        item: dict[str, Any] = {"email": f"mixed{n}@example.com"}
        if n % 2:
            item["phone"] = "+14155550100"
        if n % 3:
            item["metadata"] = {"n": n}
        if n % 5 == 0:
            item["fullName"] = None
        if n % 7 == 0:
            item["externalId"] = f"ext-{n}"
        items.append(item)

    with sql.counting():
        started = time.perf_counter()
        payload = await batch_create(gql, items)
        elapsed = time.perf_counter() - started

    assert payload["count"] == 500
    inserts = [s for s in sql.statements if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 1, inserts
    # BEGIN IMMEDIATE (SQLite only), the uniqueness check, the INSERT.
    assert len(sql.statements) == (3 if dialect == "sqlite" else 2), sql.statements
    assert await consumer_count(write_engine) == 500
    print(f"500-row batch create on {dialect}: {elapsed * 1000:.0f} ms")


# -- update -----------------------------------------------------------------------------------


async def batch_update(
    gql: GraphQL, items: list[dict[str, Any]], policy: str | None = None
) -> dict[str, Any]:
    variables: dict[str, Any] = {"input": items}
    if policy is not None:
        variables["policy"] = policy
    payload: dict[str, Any] = (await gql.data(BATCH_UPDATE, variables))["consumerBatchUpdate"]
    return payload


async def test_batch_update_applies_each_item(gql: GraphQL) -> None:
    created = (await batch_create(gql, [
        {"email": "a@example.com", "metadata": {"tier": "gold", "x": 1}},
        {"email": "b@example.com", "metadata": {"tier": "silver"}, "fullName": "Bee"},
        {"email": "c@example.com"},
    ]))["results"]
    ids = [r["consumer"]["id"] for r in created]

    payload = await batch_update(gql, [
        {"id": ids[0], "metadata": {"tier": "platinum", "x": None}},
        {"id": ids[1], "fullName": None},
        {"id": ids[2], "email": "c@example.com"},  # no real change
    ])

    assert payload["userErrors"] == []
    assert payload["count"] == 3
    after = [r["consumer"] for r in payload["results"]]
    assert after[0]["metadata"] == {"tier": "platinum"}
    assert after[1]["fullName"] is None and after[1]["metadata"] == {"tier": "silver"}
    assert after[0]["updatedAt"] > created[0]["consumer"]["updatedAt"]
    assert after[1]["updatedAt"] > created[1]["consumer"]["updatedAt"]
    assert after[2]["updatedAt"] == created[2]["consumer"]["updatedAt"]


async def test_batch_update_reports_every_bad_item(gql: GraphQL) -> None:
    created = (await batch_create(gql, people(4)))["results"]
    ids = [r["consumer"]["id"] for r in created]
    missing = "cons_01JD0000000000000000000000"
    items = [
        {"id": ids[0], "fullName": "Zero"},
        {"id": missing, "fullName": "Nobody"},
        {"id": ids[1], "email": "USER2@example.com"},  # consumer 2 has it
        {"id": ids[0], "fullName": "Zero again"},  # id repeated
        {"id": ids[3], "phone": "nope"},
        {"id": ids[2], "externalId": "e"},
        {"id": ids[3][:-1], "fullName": "bad id"},
    ]

    expected = [
        (["input", "1", "id"], "NOT_FOUND"),
        (["input", "2", "email"], "EMAIL_TAKEN"),
        (["input", "3", "id"], "DUPLICATE_IN_BATCH"),
        (["input", "4", "phone"], "VALIDATION_FAILED"),
        (["input", "6", "id"], "NOT_FOUND"),
    ]
    atomic = await batch_update(gql, items)
    assert codes(atomic["userErrors"]) == expected
    assert atomic["count"] == 0 and all(r["consumer"] is None for r in atomic["results"])
    names = "query { consumers(sortBy: EMAIL, sortDir: ASC) { nodes { fullName externalId } } }"
    before = await gql.data(names)
    assert [n["fullName"] for n in before["consumers"]["nodes"]] == [
        "User 0", "User 1", "User 2", "User 3"
    ]

    partial = await batch_update(gql, items, "REJECT_FAILED_ROWS")
    assert codes(partial["userErrors"]) == expected
    assert partial["count"] == 2
    assert [i for i, r in enumerate(partial["results"]) if r["consumer"]] == [0, 5]
    after = await gql.data(names)
    assert [(n["fullName"], n["externalId"]) for n in after["consumers"]["nodes"]] == [
        ("Zero", None), ("User 1", None), ("User 2", "e"), ("User 3", None)
    ]


async def test_batch_update_reports_a_repeat_even_when_its_first_occurrence_is_invalid(
    gql: GraphQL
) -> None:
    ids = [r["consumer"]["id"] for r in (await batch_create(gql, people(4)))["results"]]
    items = [
        {"id": ids[0], "phone": "12"},  # invalid
        {"id": ids[0], "fullName": "Again"},  # repeats the id of item 0
        {"id": ids[1], "email": "new@example.com", "externalId": "e", "phone": "nope"},
        {"id": ids[2], "email": "NEW@example.com", "externalId": "e"},  # repeats item 2
        {"id": ids[0], "fullName": "x" * 201},  # invalid and repeated
        {"id": ids[3], "fullName": "Fine"},
    ]
    expected = [
        (["input", "0", "phone"], "VALIDATION_FAILED"),
        (["input", "1", "id"], "DUPLICATE_IN_BATCH"),
        (["input", "2", "phone"], "VALIDATION_FAILED"),
        (["input", "3", "email"], "DUPLICATE_IN_BATCH"),
        (["input", "3", "externalId"], "DUPLICATE_IN_BATCH"),
        (["input", "4", "fullName"], "VALIDATION_FAILED"),
        (["input", "4", "id"], "DUPLICATE_IN_BATCH"),
    ]
    names = "query { consumers(sortBy: EMAIL, sortDir: ASC) { nodes { fullName } } }"
    for policy, written in (("REJECT_EVERYTHING", []), ("REJECT_FAILED_ROWS", [5])):
        payload = await batch_update(gql, items, policy)

        assert codes(payload["userErrors"]) == expected, policy
        results = payload["results"]
        assert [e for r in results for e in codes(r["userErrors"])] == expected
        assert "item 0" in results[1]["userErrors"][0]["message"]
        assert [i for i, r in enumerate(results) if r["consumer"]] == written
    after = await gql.data(names)
    assert [n["fullName"] for n in after["consumers"]["nodes"]] == [
        "User 0", "User 1", "User 2", "Fine"
    ]


async def test_batch_update_may_swap_nothing_but_can_move_an_email_freed_earlier(
    gql: GraphQL,
) -> None:
    created = (await batch_create(gql, people(2)))["results"]
    ids = [r["consumer"]["id"] for r in created]
    # Clearing consumer 0's email in one batch, then taking it in the next.
    await batch_update(gql, [{"id": ids[0], "email": None}])
    payload = await batch_update(gql, [{"id": ids[1], "email": "user0@example.com"}])
    assert payload["userErrors"] == []
    assert payload["results"][0]["consumer"]["email"] == "user0@example.com"


async def test_batch_update_over_500_items_is_refused(gql: GraphQL) -> None:
    items = [{"id": f"cons_01JD{n:022d}", "fullName": "x"} for n in range(501)]
    body = await gql(BATCH_UPDATE, {"input": items})
    assert "data" not in body
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BATCH_TOO_LARGE"]


async def test_batch_update_costs_a_constant_number_of_statements(
    gql: GraphQL, sql: StatementCounter, dialect: str
) -> None:
    created = (await batch_create(gql, people(200)))["results"]
    items = [{"id": r["consumer"]["id"], "metadata": {"n": i}, "email": f"new{i}@example.com"}
             for i, r in enumerate(created)]

    with sql.counting():
        payload = await batch_update(gql, items)

    assert payload["count"] == 200
    # [BEGIN IMMEDIATE], SELECT … FOR UPDATE, uniqueness check, the UPDATE (one executemany),
    # SELECT of the updated rows.
    assert len(sql.statements) == (5 if dialect == "sqlite" else 4), sql.statements
    updates = [s for s in sql.statements if s.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1
