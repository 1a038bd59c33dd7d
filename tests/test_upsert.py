"""Upsert by externalId: consumerUpsert / consumerBatchUpsert and REST PUT
/api/v1/consumers/external/{externalId} and PUT /api/v1/consumers/batch/upsert. Update
semantics on an existing consumer, create semantics otherwise, one INSERT … ON CONFLICT for
a whole batch, and racing upserts of one externalId that end in one consumer."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from consumers_graphql.domain.validation import BATCH_MAX
from consumers_graphql.store import models
from consumers_graphql.store.models import EXTERNAL_ID_MAX
from tests.conftest import GraphQL, StatementCounter, bearer
from tests.factories import BASE_TIME, consumer_row, insert_consumers
from tests.test_rest_read import assert_consumer_shape
from tests.test_rest_write import assert_error

FIELDS = ("id email phone fullName metadata externalId totalOrders totalOrderValue "
          "lastOrderAt createdAt updatedAt")
ERRORS = "userErrors { field code message }"
UPSERT = f"""
mutation Upsert($input: ConsumerUpsertInput!) {{
  consumerUpsert(input: $input) {{ consumer {{ {FIELDS} }} created {ERRORS} }}
}}
"""
BATCH_UPSERT = f"""
mutation BatchUpsert($input: [ConsumerUpsertInput!]!, $policy: ErrorPolicy) {{
  consumerBatchUpsert(input: $input, errorPolicy: $policy) {{
    count
    results {{ consumer {{ {FIELDS} }} created {ERRORS} }}
    {ERRORS}
  }}
}}
"""
URL = "/api/v1/consumers"
EXTERNAL = f"{URL}/external"
BATCH_UPSERT_URL = f"{URL}/batch/upsert"


async def upsert(gql: GraphQL, item: dict[str, Any]) -> dict[str, Any]:
    payload: dict[str, Any] = (await gql.data(UPSERT, {"input": item}))["consumerUpsert"]
    return payload


async def batch_upsert(
    gql: GraphQL, items: list[dict[str, Any]], policy: str | None = None
) -> dict[str, Any]:
    variables: dict[str, Any] = {"input": items}
    if policy is not None:
        variables["policy"] = policy
    payload: dict[str, Any] = (await gql.data(BATCH_UPSERT, variables))["consumerBatchUpsert"]
    return payload


def codes(errors: list[dict[str, Any]]) -> list[tuple[list[str], str]]:
    return [(e["field"], e["code"]) for e in errors]


async def stored(write_engine: Any) -> list[dict[str, Any]]:
    """Every consumer as stored, by externalId."""
    table = models.Consumer.__table__
    async with write_engine.connect() as conn:
        rows = (await conn.execute(select(table).order_by(table.c.external_id))).all()
    return [row._asdict() for row in rows]


async def consumer_count(write_engine: Any) -> int:
    async with write_engine.connect() as conn:
        statement = select(func.count()).select_from(models.Consumer.__table__)
        return int((await conn.execute(statement)).scalar_one())


async def existing(write_engine: Any, n: int, external_id: str, **fields: Any) -> dict[str, Any]:
    """A consumer with orders behind it (totals set), created and updated a day ago."""
    row = consumer_row(n, external_id=external_id, total_orders=3,
                       total_order_value=Decimal("42.5"),
                       last_order_at=BASE_TIME + timedelta(days=1), **fields)
    await insert_consumers(write_engine, [row])
    return row


# -- consumerUpsert -------------------------------------------------------------------------


async def test_upsert_creates_then_updates_the_same_consumer(gql: GraphQL) -> None:
    created = await upsert(gql, {"externalId": "crm-1", "email": "Jane@Example.com",
                                 "phone": "+1 (415) 555-0100", "fullName": "Jane",
                                 "metadata": {"tier": "gold", "gone": None}})

    assert created["created"] is True and created["userErrors"] == []
    consumer = created["consumer"]
    assert consumer["externalId"] == "crm-1"
    assert consumer["email"] == "Jane@Example.com" and consumer["phone"] == "+14155550100"
    # create semantics as an update of nothing: a metadata key set to null is left out
    assert consumer["metadata"] == {"tier": "gold"}
    assert consumer["totalOrders"] == 0 and consumer["createdAt"] == consumer["updatedAt"]

    updated = await upsert(gql, {"externalId": "crm-1", "phone": None,
                                 "metadata": {"seen": 2, "tier": None}})

    assert updated["created"] is False and updated["userErrors"] == []
    after = updated["consumer"]
    assert after["id"] == consumer["id"] and after["createdAt"] == consumer["createdAt"]
    # omitted kept, explicit null cleared, metadata merged (a null key removed)
    assert after["email"] == "Jane@Example.com" and after["fullName"] == "Jane"
    assert after["phone"] is None
    assert after["metadata"] == {"seen": 2}
    assert after["updatedAt"] > consumer["updatedAt"]


async def test_an_upsert_that_changes_nothing_keeps_updated_at(
    gql: GraphQL, write_engine: Any
) -> None:
    item = {"externalId": "crm-1", "email": "same@example.com", "metadata": {"a": 1}}
    first = await upsert(gql, item)
    before = await stored(write_engine)

    again = await upsert(gql, item)

    assert again["created"] is False and again["userErrors"] == []
    assert again["consumer"] == first["consumer"]
    assert await stored(write_engine) == before


async def test_metadata_true_is_not_one(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    # Python's == says True == 1 == 1.0 and False == 0: as JSON they differ, and a write
    # that sends them changes the consumer (upsert, and update, which shares the check).
    row = await existing(write_engine, 1, "crm-1", metadata={"vip": 1, "n": 0, "r": [1]})
    await existing(write_engine, 2, "crm-2", metadata={"ratio": 1})

    payload = await upsert(gql, {"externalId": "crm-1",
                                 "metadata": {"vip": True, "n": False, "r": [1.0]}})
    updated = await client.put(f"{URL}/{(await stored(write_engine))[1]['id']}",
                               headers=auth_headers, json={"metadata": {"ratio": 1.0}})

    assert payload["userErrors"] == []
    assert json.dumps(payload["consumer"]["metadata"]) == '{"vip": true, "n": false, "r": [1.0]}'
    assert payload["consumer"]["updatedAt"] > "2024-11-01T10:01:00Z"
    assert updated.status_code == 200 and '"ratio":1.0' in updated.text
    first, second = await stored(write_engine)
    assert first["id"] == row["id"] and first["metadata"]["vip"] is True
    assert isinstance(second["metadata"]["ratio"], float)


async def test_an_upsert_never_touches_totals_id_or_created_at(
    gql: GraphQL, write_engine: Any
) -> None:
    row = await existing(write_engine, 1, "crm-1", metadata={"keep": True})

    payload = await upsert(gql, {"externalId": "crm-1", "fullName": "Renamed",
                                 "metadata": {"new": 1}})

    assert payload["created"] is False and payload["userErrors"] == []
    consumer = payload["consumer"]
    assert consumer["id"] == row["id"]
    assert consumer["fullName"] == "Renamed" and consumer["metadata"] == {"keep": True, "new": 1}
    assert consumer["totalOrders"] == 3 and consumer["totalOrderValue"] == 42.5
    assert consumer["lastOrderAt"] == "2024-11-02T10:00:00Z"
    assert consumer["createdAt"] == "2024-11-01T10:01:00Z"
    assert consumer["updatedAt"] > consumer["createdAt"]
    (after,) = await stored(write_engine)
    assert (after["id"], after["total_orders"], after["total_order_value"],
            after["last_order_at"], after["created_at"]) == (
        row["id"], 3, Decimal("42.5"), row["last_order_at"], row["created_at"])
    assert after["full_name_key"] == "renamed" and after["email_key"] == "user1@example.com"


async def test_the_answer_is_what_a_read_gives(gql: GraphQL, write_engine: Any) -> None:
    await existing(write_engine, 1, "crm-1")
    items = [{"externalId": "crm-1", "metadata": {"big": 2**70, "é": [1, None]}},
             {"externalId": "crm-2", "email": "New@Example.com", "fullName": " Zoë "}]
    written = [r["consumer"] for r in (await batch_upsert(gql, items))["results"]]

    read = await gql.data(f"query($ids: [ID!]!) {{ nodes(ids: $ids) {{ ... on Consumer "
                          f"{{ {FIELDS} }} }} }}", {"ids": [c["id"] for c in written]})

    assert written == read["nodes"]
    assert written[1]["fullName"] == "Zoë"


async def test_bad_fields_are_refused_and_nothing_is_written(
    gql: GraphQL, write_engine: Any
) -> None:
    payload = await upsert(gql, {"externalId": "crm-1", "email": "not an email",
                                 "phone": "12", "metadata": {"x": "y" * 17_000}})

    assert payload["consumer"] is None and payload["created"] is False
    assert codes(payload["userErrors"]) == [
        (["input", "email"], "VALIDATION_FAILED"),
        (["input", "phone"], "VALIDATION_FAILED"),
        (["input", "metadata"], "VALIDATION_FAILED"),
    ]
    assert await consumer_count(write_engine) == 0


async def test_merged_metadata_over_16_kib_is_refused(gql: GraphQL, write_engine: Any) -> None:
    await existing(write_engine, 1, "crm-1", metadata={"a": "x" * 9_000})
    before = await stored(write_engine)

    payload = await upsert(gql, {"externalId": "crm-1", "metadata": {"b": "y" * 9_000}})

    assert codes(payload["userErrors"]) == [(["input", "metadata"], "VALIDATION_FAILED")]
    assert "16384 bytes" in payload["userErrors"][0]["message"]
    assert await stored(write_engine) == before


@pytest.mark.parametrize("external_id", ["", "x" * (EXTERNAL_ID_MAX + 1), "a\x00b", "tab\there"])
async def test_an_invalid_external_id_is_refused(
    gql: GraphQL, write_engine: Any, external_id: str
) -> None:
    payload = await upsert(gql, {"externalId": external_id, "email": "a@example.com"})

    assert payload["consumer"] is None
    assert codes(payload["userErrors"]) == [(["input", "externalId"], "VALIDATION_FAILED")]
    assert await consumer_count(write_engine) == 0


async def test_an_external_id_is_kept_exactly_as_given(gql: GraphQL) -> None:
    # Not trimmed, case-sensitive, up to 255 characters: " a", "a" and "A" are three keys.
    keys = [" a", "a", "A", "k" * EXTERNAL_ID_MAX]
    results = [await upsert(gql, {"externalId": key}) for key in keys]

    assert [r["created"] for r in results] == [True] * 4
    assert [r["consumer"]["externalId"] for r in results] == keys


async def test_an_email_another_consumer_has_is_taken(gql: GraphQL, write_engine: Any) -> None:
    await existing(write_engine, 1, "crm-1")  # user1@example.com
    await existing(write_engine, 2, "crm-2")  # user2@example.com
    before = await stored(write_engine)

    new = await upsert(gql, {"externalId": "crm-3", "email": "USER1@example.com"})
    changed = await upsert(gql, {"externalId": "crm-2", "email": "user1@EXAMPLE.com"})
    own = await upsert(gql, {"externalId": "crm-1", "email": "User1@Example.com"})

    for payload in (new, changed):
        assert payload["consumer"] is None
        assert codes(payload["userErrors"]) == [(["input", "email"], "EMAIL_TAKEN")]
    # a consumer's own email, in another case, is not taken
    assert own["userErrors"] == [] and own["consumer"]["email"] == "User1@Example.com"
    assert [row["email"] for row in await stored(write_engine)] == [
        "User1@Example.com", before[1]["email"]]


async def test_read_only_key_cannot_upsert(
    read_only_gql: GraphQL, write_engine: Any
) -> None:
    body = await read_only_gql(UPSERT, {"input": {"externalId": "crm-1"}})

    assert body.get("data") is None
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]
    assert await consumer_count(write_engine) == 0


async def test_anonymous_upsert_is_401(anonymous_gql: GraphQL, write_engine: Any) -> None:
    await anonymous_gql(UPSERT, {"input": {"externalId": "crm-1"}}, status=401)
    assert await consumer_count(write_engine) == 0


# -- consumerBatchUpsert --------------------------------------------------------------------


async def test_batch_upsert_creates_and_updates_with_aligned_results(
    gql: GraphQL, write_engine: Any
) -> None:
    row = await existing(write_engine, 1, "crm-1", metadata={"a": 1})
    items = [
        {"externalId": "new-1", "email": "n1@example.com"},
        {"externalId": "crm-1", "metadata": {"b": 2}, "phone": "+14155550100"},
        {"externalId": "new-2", "fullName": "Second"},
    ]

    payload = await batch_upsert(gql, items)

    assert payload["count"] == 3 and payload["userErrors"] == []
    assert [r["created"] for r in payload["results"]] == [True, False, True]
    assert [r["userErrors"] for r in payload["results"]] == [[], [], []]
    consumers = [r["consumer"] for r in payload["results"]]
    assert [c["externalId"] for c in consumers] == ["new-1", "crm-1", "new-2"]
    assert consumers[1]["id"] == row["id"]
    assert consumers[1]["metadata"] == {"a": 1, "b": 2}
    assert consumers[1]["email"] == "user1@example.com"  # omitted: kept
    assert consumers[0]["id"] < consumers[2]["id"]  # new ids follow input order
    assert await consumer_count(write_engine) == 3


async def test_batch_item_that_changes_nothing_is_accepted_unchanged(
    gql: GraphQL, write_engine: Any
) -> None:
    await existing(write_engine, 1, "crm-1")
    before = await stored(write_engine)

    payload = await batch_upsert(gql, [{"externalId": "crm-1", "email": "user1@example.com"},
                                       {"externalId": "crm-2"}])

    assert payload["count"] == 2
    assert [r["created"] for r in payload["results"]] == [False, True]
    assert payload["results"][0]["consumer"]["updatedAt"] == "2024-11-01T10:01:00Z"
    assert (await stored(write_engine))[0] == before[0]


async def test_reject_everything_writes_nothing_when_one_item_is_refused(
    gql: GraphQL, write_engine: Any
) -> None:
    await existing(write_engine, 1, "crm-1")
    before = await stored(write_engine)
    items = [{"externalId": "crm-1", "fullName": "Changed"},
             {"externalId": "new-1", "email": "bad"},
             {"externalId": "new-2"}]

    payload = await batch_upsert(gql, items)

    assert payload["count"] == 0
    assert [r["consumer"] for r in payload["results"]] == [None, None, None]
    assert [r["created"] for r in payload["results"]] == [False, False, False]
    assert codes(payload["userErrors"]) == [(["input", "1", "email"], "VALIDATION_FAILED")]
    assert [codes(r["userErrors"]) for r in payload["results"]] == [
        [], [(["input", "1", "email"], "VALIDATION_FAILED")], []]
    assert await stored(write_engine) == before


async def test_reject_failed_rows_writes_the_accepted_items(
    gql: GraphQL, write_engine: Any
) -> None:
    await existing(write_engine, 1, "crm-1")
    await existing(write_engine, 2, "crm-2")
    items = [{"externalId": "crm-1", "fullName": "Changed"},
             {"externalId": "new-1", "email": "user2@example.com"},  # crm-2's
             {"externalId": "new-2", "phone": "12"},
             {"externalId": "new-3", "fullName": "Three"}]

    payload = await batch_upsert(gql, items, "REJECT_FAILED_ROWS")

    assert payload["count"] == 2
    assert [r["created"] for r in payload["results"]] == [False, False, False, True]
    assert [r["consumer"] is not None for r in payload["results"]] == [True, False, False, True]
    assert codes(payload["userErrors"]) == [(["input", "1", "email"], "EMAIL_TAKEN"),
                                            (["input", "2", "phone"], "VALIDATION_FAILED")]
    rows = await stored(write_engine)
    assert [(r["external_id"], r["full_name"]) for r in rows] == [
        ("crm-1", "Changed"), ("crm-2", "User 2"), ("new-3", "Three")]


async def test_repeats_inside_a_batch_are_duplicates(gql: GraphQL, write_engine: Any) -> None:
    await existing(write_engine, 1, "crm-1")  # user1@example.com, not sent below
    items = [{"externalId": "a", "email": "x@example.com"},
             {"externalId": "a", "fullName": "Again"},
             {"externalId": "b", "email": "X@EXAMPLE.com"},
             {"externalId": "c", "email": "user1@example.com"}]

    payload = await batch_upsert(gql, items, "REJECT_FAILED_ROWS")

    assert codes(payload["userErrors"]) == [
        (["input", "1", "externalId"], "DUPLICATE_IN_BATCH"),
        (["input", "2", "email"], "DUPLICATE_IN_BATCH"),
        (["input", "3", "email"], "EMAIL_TAKEN"),
    ]
    assert "item 0" in payload["userErrors"][0]["message"]
    assert payload["count"] == 1 and payload["results"][0]["created"] is True
    assert await consumer_count(write_engine) == 2


async def test_an_email_another_item_of_the_batch_keeps_is_taken(
    gql: GraphQL, write_engine: Any
) -> None:
    # crm-1 keeps its email (sent or not); a new consumer cannot have it too.
    await existing(write_engine, 1, "crm-1")
    items = [{"externalId": "crm-1", "fullName": "Kept"},
             {"externalId": "new-1", "email": "user1@example.com"}]

    payload = await batch_upsert(gql, items)

    assert codes(payload["userErrors"]) == [(["input", "1", "email"], "EMAIL_TAKEN")]
    assert payload["count"] == 0


async def test_a_batch_over_500_items_is_refused(gql: GraphQL, write_engine: Any) -> None:
    items = [{"externalId": f"e{n}"} for n in range(BATCH_MAX + 1)]

    body = await gql(BATCH_UPSERT, {"input": items})

    assert body.get("data") is None
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BATCH_TOO_LARGE"]
    assert await consumer_count(write_engine) == 0


async def test_a_batch_of_500_is_accepted(gql: GraphQL, write_engine: Any) -> None:
    payload = await batch_upsert(gql, [{"externalId": f"e{n}"} for n in range(BATCH_MAX)])
    assert payload["count"] == BATCH_MAX and payload["userErrors"] == []
    assert await consumer_count(write_engine) == BATCH_MAX


@pytest.mark.parametrize("size", [2, 100])
async def test_batch_upsert_costs_a_constant_number_of_statements(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, dialect: str, size: int
) -> None:
    half = size // 2
    await insert_consumers(write_engine, [
        consumer_row(n, external_id=f"e{n}") for n in range(half)])
    items = [{"externalId": f"e{n}", "email": f"new{n}@example.com", "metadata": {"n": n}}
             for n in range(size)]

    with sql.counting():
        payload = await batch_upsert(gql, items)

    assert payload["count"] == size
    assert [r["created"] for r in payload["results"]] == [False] * half + [True] * half
    # BEGIN IMMEDIATE (SQLite) or the externalIds' advisory locks (PostgreSQL), the SELECT
    # of the externalIds and emails, the upsert.
    assert len(sql.statements) == 3, sql.statements
    assert sql.statements[0].startswith("BEGIN IMMEDIATE" if dialect == "sqlite"
                                        else "SELECT pg_advisory_xact_lock(")
    (write,) = [s for s in sql.statements if s.lstrip().upper().startswith("INSERT")]
    assert "ON CONFLICT (external_id) DO UPDATE" in write
    rows = await stored(write_engine)
    assert [r["email"] for r in rows] == [f"new{n}@example.com" for n in
                                         sorted(range(size), key=lambda n: f"e{n}")]


async def test_an_upsert_keeps_the_search_text_in_step(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    # The search copies (FTS on SQLite, consumer_search on PostgreSQL) follow by trigger.
    await existing(write_engine, 1, "crm-1", full_name="Old Name")
    await batch_upsert(gql, [{"externalId": "crm-1", "fullName": "Quentin Blake"},
                             {"externalId": "crm-2", "fullName": "Quentin Tarantino"}])

    found = (await client.get(f"{URL}/search", params={"q": "quentin"},
                              headers=auth_headers)).json()["data"]
    gone = (await client.get(f"{URL}/search", params={"q": "old name"},
                             headers=auth_headers)).json()["data"]

    assert sorted(c["externalId"] for c in found) == ["crm-1", "crm-2"]
    assert gone == []


# -- races ----------------------------------------------------------------------------------


async def test_20_racing_upserts_of_one_external_id_make_one_consumer(
    gql: GraphQL, write_engine: Any
) -> None:
    calls = [upsert(gql, {"externalId": "race-1", "metadata": {f"k{n}": n}})
             for n in range(20)]

    results = await asyncio.gather(*calls)

    assert all(r["userErrors"] == [] for r in results), results
    assert sum(r["created"] for r in results) == 1
    assert len({r["consumer"]["id"] for r in results}) == 1
    (row,) = await stored(write_engine)
    # every upsert's metadata was merged in: none was applied as a create over another
    assert row["metadata"] == {f"k{n}": n for n in range(20)}


async def test_racing_rest_upserts_answer_one_201_and_200s(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    responses = await asyncio.gather(*(
        client.put(f"{EXTERNAL}/race-2", headers=auth_headers, json={"metadata": {f"k{n}": n}})
        for n in range(20)))

    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    (row,) = await stored(write_engine)
    assert row["metadata"] == {f"k{n}": n for n in range(20)}


async def test_racing_upserts_of_one_email_make_one_consumer(
    gql: GraphQL, write_engine: Any
) -> None:
    # Ten new externalIds, one email: the unique index settles the race, the losers' rerun
    # reports the conflict as the plain case does.
    calls = [upsert(gql, {"externalId": f"race-{n}", "email": "Same@Example.com"
                          if n % 2 else "same@example.com"}) for n in range(10)]

    results = await asyncio.gather(*calls)

    winners = [r for r in results if r["consumer"] is not None]
    assert len(winners) == 1 and winners[0]["created"] is True
    assert all(codes(r["userErrors"]) == [(["input", "email"], "EMAIL_TAKEN")]
               for r in results if r["consumer"] is None)
    assert await consumer_count(write_engine) == 1


async def test_racing_batches_over_the_same_external_ids(
    gql: GraphQL, write_engine: Any, sql: StatementCounter
) -> None:
    # Ten batches over the same 50 externalIds, in different orders: no error, 50
    # consumers, each created once. They queue (on PostgreSQL, on advisory locks of their
    # externalIds) rather than race: none is run again, none deadlocks (a deadlock cost a
    # second, PostgreSQL's deadlock_timeout, and five of them a 500), so each sends its
    # three statements once (its locks or BEGIN IMMEDIATE, the SELECT, the INSERT).
    keys = [f"shared-{n}" for n in range(50)]
    calls = [batch_upsert(gql, [{"externalId": k, "metadata": {f"b{b}": 1}}
                                for k in (keys if b % 2 else keys[::-1])])
             for b in range(10)]

    with sql.counting():
        payloads = await asyncio.gather(*calls)

    assert len(sql.statements) == 3 * len(calls), sql.statements

    assert all(p["userErrors"] == [] and p["count"] == 50 for p in payloads)
    created = sum(r["created"] for p in payloads for r in p["results"])
    assert created == 50
    rows = await stored(write_engine)
    assert len(rows) == 50
    assert all(r["metadata"] == {f"b{b}": 1 for b in range(10)} for r in rows)


# -- REST -----------------------------------------------------------------------------------


async def test_rest_put_creates_201_then_updates_200(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = await client.put(f"{EXTERNAL}/crm-1", headers=auth_headers,
                               json={"email": "jane@example.com", "metadata": {"a": 1}})

    assert created.status_code == 201, created.text
    body = created.json()
    assert_consumer_shape(body)
    assert body["externalId"] == "crm-1" and body["metadata"] == {"a": 1}
    assert created.headers["location"] == f"{URL}/{body['id']}"

    updated = await client.put(f"{EXTERNAL}/crm-1", headers=auth_headers,
                               json={"fullName": "Jane", "metadata": {"b": 2},
                                     "externalId": "crm-1"})

    assert updated.status_code == 200, updated.text
    assert "location" not in updated.headers
    after = updated.json()
    assert_consumer_shape(after)
    assert after["id"] == body["id"] and after["email"] == "jane@example.com"
    assert after["fullName"] == "Jane" and after["metadata"] == {"a": 1, "b": 2}
    got = (await client.get(f"{URL}/{body['id']}", headers=auth_headers)).json()
    assert got == after


async def test_rest_external_ids_with_slashes_and_spaces_are_one_path(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.put(f"{EXTERNAL}/shop%2F42 %C3%A9/x", headers=auth_headers, json={})
    assert response.status_code == 201, response.text
    assert response.json()["externalId"] == "shop/42 é/x"
    again = await client.put(f"{EXTERNAL}/shop/42%20é/x", headers=auth_headers, json={})
    assert again.status_code == 200 and again.json()["id"] == response.json()["id"]


async def test_rest_put_refusals_are_the_reference_400s(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    await existing(write_engine, 1, "crm-1")
    before = await stored(write_engine)

    invalid = await client.put(f"{EXTERNAL}/crm-2", headers=auth_headers,
                               json={"email": "bad", "phone": "12"})
    assert_error(invalid, 400, "Validation failed", ["email", "phone"])
    taken = await client.put(f"{EXTERNAL}/crm-2", headers=auth_headers,
                             json={"email": "USER1@example.com"})
    assert_error(taken, 400, "Email already exists", ["email"])
    moved = await client.put(f"{EXTERNAL}/crm-1", headers=auth_headers,
                             json={"externalId": "crm-9"})
    assert_error(moved, 400, "Validation failed", ["externalId"])
    unknown = await client.put(f"{EXTERNAL}/crm-2", headers=auth_headers,
                               json={"nickname": "x"})
    assert_error(unknown, 400, "Validation failed", ["nickname"])
    too_long = await client.put(f"{EXTERNAL}/{'x' * (EXTERNAL_ID_MAX + 1)}",
                                headers=auth_headers, json={})
    assert_error(too_long, 400, "Validation failed", ["externalId"])
    empty = await client.put(f"{EXTERNAL}/", headers=auth_headers, json={})
    assert_error(empty, 400, "Validation failed", ["externalId"])
    control = await client.put(f"{EXTERNAL}/a%00b", headers=auth_headers, json={})
    assert_error(control, 400, "Validation failed", ["externalId"])
    malformed = await client.put(f"{EXTERNAL}/crm-2", headers={
        **auth_headers, "Content-Type": "application/json"}, content=b"{")
    assert_error(malformed, 400, "Validation failed", ["body"])

    assert await stored(write_engine) == before


async def test_rest_batch_upsert_answers_the_consumers_in_input_order(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    row = await existing(write_engine, 1, "crm-1", metadata={"a": 1})
    items = [{"externalId": "new-1", "email": "n1@example.com"},
             {"externalId": "crm-1", "metadata": {"b": 2}}]

    response = await client.put(BATCH_UPSERT_URL, headers=auth_headers, json=items)

    assert response.status_code == 200, response.text
    body = response.json()
    for consumer in body:
        assert_consumer_shape(consumer)
    assert [c["externalId"] for c in body] == ["new-1", "crm-1"]
    assert body[1]["id"] == row["id"] and body[1]["metadata"] == {"a": 1, "b": 2}
    assert body[1]["totalOrders"] == 3
    assert await consumer_count(write_engine) == 2


async def test_rest_batch_upsert_refusals(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    await existing(write_engine, 1, "crm-1")
    before = await stored(write_engine)

    async def put(body: Any) -> httpx.Response:
        return await client.put(BATCH_UPSERT_URL, headers=auth_headers, json=body)

    invalid = await put([{"externalId": "crm-1", "fullName": "X"},
                         {"externalId": "n", "email": "bad"}])
    assert_error(invalid, 400, "Validation failed", ["1.email"])
    repeated = await put([{"externalId": "n"}, {"externalId": "n"}])
    details = assert_error(repeated, 400, "Validation failed", ["1.externalId"])
    assert "Same externalId as item 0" in details[0]["message"]
    taken = await put([{"externalId": "n", "email": "user1@example.com"}])
    assert_error(taken, 400, "Email already exists", ["0.email"])
    missing = await put([{"email": "m@example.com"}])
    assert_error(missing, 400, "Validation failed", ["0.externalId"])
    null = await put([{"externalId": None}])
    assert_error(null, 400, "Validation failed", ["0.externalId"])
    not_a_list = await put({"externalId": "n"})
    assert_error(not_a_list, 400, "Validation failed")
    too_many = await put([{"externalId": f"e{n}"} for n in range(BATCH_MAX + 1)])
    assert_error(too_many, 400, "Max batch size is 500")

    assert await stored(write_engine) == before


async def test_rest_batch_upsert_takes_the_batch_body_limit(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Any
) -> None:
    # 500 items with 4 KiB of metadata each: ~2 MiB, over a single write's 1 MiB.
    items = [{"externalId": f"e{n}", "metadata": {"blob": "x" * 4096}} for n in range(500)]
    body = json.dumps(items).encode()
    assert settings.max_body_bytes < len(body) < settings.max_batch_body_bytes

    response = await client.put(BATCH_UPSERT_URL, headers={
        **auth_headers, "Content-Type": "application/json"}, content=body)

    assert response.status_code == 200, response.text[:200]
    assert len(response.json()) == 500


async def test_rest_upserts_need_a_write_key(
    client: httpx.AsyncClient, read_only_key: str, write_engine: Any
) -> None:
    for url, body in ((f"{EXTERNAL}/crm-1", {}), (BATCH_UPSERT_URL, [{"externalId": "x"}])):
        assert_error(await client.put(url, json=body), 401, "Authentication required")
        assert_error(await client.put(url, json=body, headers=bearer(read_only_key)),
                     403, "Forbidden")
    assert await consumer_count(write_engine) == 0


async def test_rest_upsert_paths_route_and_other_methods_are_405(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for method, url in (("GET", f"{EXTERNAL}/crm-1"), ("POST", f"{EXTERNAL}/crm-1"),
                        ("DELETE", f"{EXTERNAL}/crm-1"), ("GET", BATCH_UPSERT_URL),
                        ("POST", BATCH_UPSERT_URL)):
        response = await client.request(method, url, headers=auth_headers)
        assert_error(response, 405, "Method not allowed", [])
        assert response.headers["allow"] == "PUT", (method, url)
    # /external alone is an id like any other, of no consumer
    for method in ("GET", "PUT"):
        response = await client.request(method, EXTERNAL, headers=auth_headers, json={})
        assert_error(response, 404, "Consumer not found")
    # the collection's other paths are as they were
    batch = await client.get(f"{URL}/batch", headers=auth_headers)
    assert batch.status_code == 405 and batch.headers["allow"] == "POST, PUT"


async def test_rest_upserts_are_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]

    one = paths["/api/v1/consumers/external/{external_id}"]
    batch = paths["/api/v1/consumers/batch/upsert"]

    assert set(one) == {"put"} and set(batch) == {"put"}
    assert {"200", "201", "400", "401", "403", "413"} <= set(one["put"]["responses"])
    assert set(one["put"]["responses"]["201"]["headers"]) == {
        "Location", "Idempotent-Replayed", "RateLimit-Policy", "RateLimit"}
    assert {"200", "400", "401", "403", "413"} <= set(batch["put"]["responses"])
    assert batch["put"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BatchUpsertConsumersRequest"}

