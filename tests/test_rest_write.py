"""The REST API's write side: create, update, delete, batch create and batch update over the
same services as GraphQL, with the reference's statuses, texts and shapes; scopes, body
limits and the order in which refusals answer."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from consumers_graphql.domain.validation import BATCH_MAX, METADATA_MAX_BYTES
from consumers_graphql.settings import Settings
from consumers_graphql.store import models
from consumers_graphql.store.models import EMAIL_MAX, EXTERNAL_ID_MAX, FULL_NAME_MAX
from tests.conftest import GraphQL, bearer
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)
from tests.test_rest_read import assert_consumer_shape

URL = "/api/v1/consumers"
BATCH = f"{URL}/batch"
MISSING_ID = "cons_01JD0000000000000000000000"


async def count_consumers(engine: Any) -> int:
    async with engine.connect() as conn:
        statement = select(func.count()).select_from(models.Consumer)
        return int((await conn.execute(statement)).scalar_one())


def people(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"email": f"user{n}@example.com", "fullName": f"User {n}"}
            for n in range(start, start + count)]


def assert_error(response: httpx.Response, status: int, error: str,
                 fields: list[str] | None = None) -> list[dict[str, str]]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "details"}
    assert body["error"] == error, body
    for detail in body["details"]:
        assert set(detail) == {"field", "message"} and detail["message"], detail
    if fields is not None:
        assert [d["field"] for d in body["details"]] == fields, body["details"]
    details: list[dict[str, str]] = body["details"]
    return details


# -- create ---------------------------------------------------------------------------------


async def test_create_returns_201_with_the_consumer_and_its_location(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(URL, headers=auth_headers, json={
        "email": "Ada@Example.com", "phone": "+1 (415) 555-0100", "fullName": "Ada Lovelace",
        "metadata": {"source": "import", "tier": "vip"}, "externalId": "crm-1",
    })
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    created = response.json()
    assert_consumer_shape(created)
    assert created["id"].startswith("cons_")
    assert response.headers["location"] == f"{URL}/{created['id']}"
    assert {k: created[k] for k in ("email", "phone", "fullName", "metadata", "externalId",
                                    "totalOrders", "totalOrderValue", "lastOrderAt")} == {
        "email": "Ada@Example.com", "phone": "+14155550100", "fullName": "Ada Lovelace",
        "metadata": {"source": "import", "tier": "vip"}, "externalId": "crm-1",
        "totalOrders": 0, "totalOrderValue": 0, "lastOrderAt": None,
    }
    assert created["createdAt"] == created["updatedAt"]
    assert created["createdAt"].endswith("Z")
    fetched = await client.get(response.headers["location"], headers=auth_headers)
    assert fetched.json() == created


async def test_create_with_nothing_is_a_consumer_with_every_key_null(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(URL, headers=auth_headers, json={})
    assert response.status_code == 201
    created = response.json()
    assert_consumer_shape(created)
    assert [created[k] for k in ("email", "phone", "fullName", "metadata", "externalId")] == [
        None] * 5


async def test_create_reports_every_problem_with_its_field(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    response = await client.post(URL, headers=auth_headers, json={
        "email": "not-an-email", "phone": "12", "fullName": 42,
        "metadata": ["not", "an", "object"], "externalId": "",
    })
    details = assert_error(response, 400, "Validation failed",
                           ["email", "phone", "fullName", "metadata", "externalId"])
    assert "email is not a valid address" in details[0]["message"]
    assert details[2]["message"] == "fullName must be a string."
    assert await count_consumers(write_engine) == 0


async def test_rest_and_graphql_refuse_with_the_same_rule_and_message(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL
) -> None:
    rest = (await client.post(URL, headers=auth_headers, json={"email": "nope"})).json()
    graphql = await gql.data('mutation { consumerCreate(input: {email: "nope"}) '
                             "{ userErrors { field message } } }")
    (user_error,) = graphql["consumerCreate"]["userErrors"]
    assert rest["details"] == [{"field": "email", "message": user_error["message"]}]
    assert user_error["field"] == ["input", "email"]


async def test_metadata_over_16_kib_is_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(URL, headers=auth_headers,
                                 json={"metadata": {"x": "a" * METADATA_MAX_BYTES}})
    details = assert_error(response, 400, "Validation failed", ["metadata"])
    assert "16384 bytes" in details[0]["message"]


@pytest.mark.parametrize("email", ["taken@example.com", "TAKEN@example.COM"])
async def test_a_taken_email_is_email_already_exists(
    client: httpx.AsyncClient, auth_headers: dict[str, str], email: str
) -> None:
    first = await client.post(URL, headers=auth_headers, json={"email": "taken@example.com"})
    assert first.status_code == 201
    response = await client.post(URL, headers=auth_headers, json={"email": email})
    assert_error(response, 400, "Email already exists", ["email"])


async def test_a_taken_external_id_is_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    await client.post(URL, headers=auth_headers, json={"externalId": "crm-1"})
    response = await client.post(URL, headers=auth_headers, json={"externalId": "crm-1"})
    assert_error(response, 400, "External ID already exists", ["externalId"])


async def test_an_unknown_key_is_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(URL, headers=auth_headers,
                                 json={"email": "a@example.com", "nickname": "Al"})
    details = assert_error(response, 400, "Validation failed", ["nickname"])
    assert details[0]["message"] == "Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b'{"email": ', "application/json", "Malformed JSON"),
        (b"{'email': 'a@example.com'}", "application/json", "Malformed JSON"),
        (b'{"a": 1}\xff', "application/json", "Malformed JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json", "Malformed JSON"),
        (b"", "application/json", "A JSON body is required."),
        (b"email=a@example.com", "application/x-www-form-urlencoded", "Send the body as JSON"),
        (b'"a string"', "application/json", "valid dictionary"),
        (b"[]", "application/json", "valid dictionary"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_validation_failed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any,
    content: bytes, content_type: str, message: str,
) -> None:
    response = await client.post(URL, headers={**auth_headers, "Content-Type": content_type},
                                 content=content)
    details = assert_error(response, 400, "Validation failed", ["body"])
    assert message in details[0]["message"]
    assert await count_consumers(write_engine) == 0


async def test_metadata_the_fast_encoder_refuses_still_round_trips(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # An integer past 64 bits and nesting past 255 levels are valid JSON that orjson cannot
    # write: the response falls back to the standard library rather than failing.
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"d": deep}
    metadata = {"big": 2**70, "deep": deep}
    response = await client.post(URL, headers=auth_headers, json={"metadata": metadata})
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata
    fetched = await client.get(response.headers["location"], headers=auth_headers)
    assert fetched.json()["metadata"] == metadata


# -- update ---------------------------------------------------------------------------------


async def create(client: httpx.AsyncClient, headers: dict[str, str], **fields: Any) -> Any:
    response = await client.post(URL, headers=headers, json=fields)
    assert response.status_code == 201, response.text
    return response.json()


async def test_update_leaves_omitted_keys_clears_nulls_and_merges_metadata(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    consumer = await create(client, auth_headers, email="john@example.com", fullName="John Doe",
                            phone="+14155550100", externalId="crm-7",
                            metadata={"source": "import", "tier": "vip", "stale": 1})
    response = await client.put(f"{URL}/{consumer['id']}", headers=auth_headers, json={
        "fullName": "John A. Doe", "phone": None,
        "metadata": {"tier": "platinum", "stale": None},
    })
    assert response.status_code == 200, response.text
    updated = response.json()
    assert_consumer_shape(updated)
    assert updated["fullName"] == "John A. Doe"
    assert updated["phone"] is None
    assert updated["email"] == "john@example.com"
    assert updated["externalId"] == "crm-7"
    assert updated["metadata"] == {"source": "import", "tier": "platinum"}
    assert updated["createdAt"] == consumer["createdAt"]
    assert updated["updatedAt"] > consumer["updatedAt"]

    cleared = (await client.put(f"{URL}/{consumer['id']}", headers=auth_headers,
                                json={"metadata": None})).json()
    assert cleared["metadata"] is None
    unchanged = await client.put(f"{URL}/{consumer['id']}", headers=auth_headers, json={})
    assert unchanged.status_code == 200
    assert unchanged.json() == cleared


@pytest.mark.parametrize("consumer_id", [MISSING_ID, "nope", "aud_01JD0000000000000000000000"])
async def test_updating_or_deleting_an_unknown_consumer_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str], consumer_id: str
) -> None:
    # the reference's one text, as GET says it
    not_found = {"error": "Consumer not found",
                 "details": [{"field": "id", "message": "Consumer not found"}]}
    for method in ("GET", "PUT", "DELETE"):
        body = {"fullName": "X"} if method == "PUT" else None
        response = await client.request(method, f"{URL}/{consumer_id}", headers=auth_headers,
                                        json=body)
        assert (response.status_code, response.json()) == (404, not_found), method


async def test_update_validation_and_conflicts(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    await create(client, auth_headers, email="taken@example.com")
    consumer = await create(client, auth_headers, email="mine@example.com")
    url = f"{URL}/{consumer['id']}"
    assert_error(await client.put(url, headers=auth_headers, json={"email": "Taken@Example.com"}),
                 400, "Email already exists", ["email"])
    assert_error(await client.put(url, headers=auth_headers,
                                  json={"email": "bad", "metadata": 3}),
                 400, "Validation failed", ["email", "metadata"])
    # Nothing of a refused update is written.
    assert (await client.get(url, headers=auth_headers)).json() == consumer


# -- delete ---------------------------------------------------------------------------------


async def test_delete_returns_the_deleted_consumer_and_removes_its_relations(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    row = consumer_row(1, metadata={"tier": "vip"}, total_orders=1,
                       total_order_value=19.99, last_order_at=BASE_TIME)
    await insert_consumers(write_engine, [row])
    audience = audience_row("VIP")
    await insert_rows(write_engine, models.Audience, [audience])
    await insert_rows(write_engine, models.ConsumerAudience, [
        {"consumer_id": row["id"], "audience_id": audience["id"], "created_at": BASE_TIME}])
    await insert_rows(write_engine, models.Order, [
        order_row(row["id"], "19.99", BASE_TIME + timedelta(days=1))])
    before = (await client.get(f"{URL}/{row['id']}", headers=auth_headers)).json()

    response = await client.delete(f"{URL}/{row['id']}", headers=auth_headers)
    assert response.status_code == 200
    assert response.json() == before
    assert before["totalOrderValue"] == 19.99
    assert_error(await client.get(f"{URL}/{row['id']}", headers=auth_headers),
                 404, "Consumer not found")
    assert_error(await client.delete(f"{URL}/{row['id']}", headers=auth_headers),
                 404, "Consumer not found")
    async with write_engine.connect() as conn:
        for model in (models.Order, models.ConsumerAudience):
            assert (await conn.execute(select(func.count()).select_from(model))).scalar_one() == 0


# -- batch create ---------------------------------------------------------------------------


async def test_batch_create_returns_the_created_consumers_in_input_order(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    items = people(3)
    items[0] |= {"phone": "+1 (415) 555-0100", "externalId": "x-0",
                 "metadata": {"big": 2**70, "pi": 3.14159, "nested": {"a": [1, None, "é"]}}}
    response = await client.post(BATCH, headers=auth_headers, json=items)
    assert response.status_code == 201, response.text
    created = response.json()
    assert [c["email"] for c in created] == [p["email"] for p in people(3)]
    for consumer in created:
        assert_consumer_shape(consumer)
    # answered from the values inserted: exactly what a read gives
    listed = (await client.get(f"{URL}?sortDir=asc", headers=auth_headers)).json()["data"]
    assert listed == created


async def test_an_empty_batch_creates_nothing(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(BATCH, headers=auth_headers, json=[])
    assert response.status_code == 201
    assert response.json() == []


async def test_a_batch_is_atomic_and_reports_every_bad_item(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    await create(client, auth_headers, email="taken@example.com")
    items = people(6)
    items[1]["email"] = "bad"
    items[3] = {"email": "taken@example.com", "phone": "12"}
    items[5]["email"] = items[0]["email"].upper()
    response = await client.post(BATCH, headers=auth_headers, json=items)
    details = assert_error(response, 400, "Validation failed",
                           ["1.email", "3.phone", "5.email"])
    assert "Same email as item 0" in details[2]["message"]
    assert await count_consumers(write_engine) == 1


async def test_a_batch_reports_a_repeat_of_an_invalid_item(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    created = await create(client, auth_headers, email="a@example.com")
    response = await client.post(BATCH, headers=auth_headers, json=[
        {"email": "dup@example.com", "phone": "12"}, {"email": "DUP@example.com"}])
    details = assert_error(response, 400, "Validation failed", ["0.phone", "1.email"])
    assert "Same email as item 0" in details[1]["message"]
    response = await client.put(BATCH, headers=auth_headers, json=[
        {"id": created["id"], "phone": "12"}, {"id": created["id"], "fullName": "Again"}])
    details = assert_error(response, 400, "Validation failed", ["0.phone", "1.id"])
    assert "Same id as item 0" in details[1]["message"]
    assert await count_consumers(write_engine) == 1
    assert (await client.get(f"{URL}/{created['id']}", headers=auth_headers)).json() == created


async def test_a_single_email_conflict_in_a_batch_is_email_already_exists(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    await create(client, auth_headers, email="user2@example.com")
    response = await client.post(BATCH, headers=auth_headers, json=people(4))
    assert_error(response, 400, "Email already exists", ["2.email"])
    assert await count_consumers(write_engine) == 1


async def test_a_batch_of_items_that_are_not_objects_is_refused_item_by_item(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(BATCH, headers=auth_headers,
                                 json=[{"email": "a@example.com"}, 5, {"nick": "x"}])
    assert_error(response, 400, "Validation failed", ["1", "2.nick"])
    response = await client.post(BATCH, headers=auth_headers, json={"email": "a@example.com"})
    assert_error(response, 400, "Validation failed", ["body"])


async def test_500_items_are_created_and_501_are_max_batch_size(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    too_many = people(BATCH_MAX + 1)
    too_many[7] = 5  # type: ignore[call-overload]  # reported alone: the size comes first
    response = await client.post(BATCH, headers=auth_headers, json=too_many)
    details = assert_error(response, 400, "Max batch size is 500", ["body"])
    assert "at most 500 items; more were given" in details[0]["message"]
    assert await count_consumers(write_engine) == 0

    response = await client.post(BATCH, headers=auth_headers, json=people(BATCH_MAX))
    assert response.status_code == 201
    assert len(response.json()) == BATCH_MAX
    assert await count_consumers(write_engine) == BATCH_MAX


# -- batch update ---------------------------------------------------------------------------


async def test_batch_update_returns_the_updated_consumers(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = (await client.post(BATCH, headers=auth_headers, json=[
        {**p, "metadata": {"tier": "bronze", "since": 2020}} for p in people(3)])).json()
    response = await client.put(BATCH, headers=auth_headers, json=[
        {"id": created[2]["id"], "metadata": {"tier": "gold"}},
        {"id": created[0]["id"], "metadata": {"tier": "silver"}, "fullName": None},
    ])
    assert response.status_code == 200, response.text
    updated = response.json()
    assert [c["id"] for c in updated] == [created[2]["id"], created[0]["id"]]
    for consumer in updated:
        assert_consumer_shape(consumer)
    assert [c["metadata"] for c in updated] == [{"tier": "gold", "since": 2020},
                                                {"tier": "silver", "since": 2020}]
    assert updated[0]["fullName"] == "User 2"
    assert updated[1]["fullName"] is None
    untouched = (await client.get(f"{URL}/{created[1]['id']}", headers=auth_headers)).json()
    assert untouched == created[1]


async def test_batch_update_is_atomic(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = (await client.post(BATCH, headers=auth_headers, json=people(3))).json()
    response = await client.put(BATCH, headers=auth_headers, json=[
        {"id": created[0]["id"], "fullName": "Changed"},
        {"id": created[1]["id"], "email": "nope"},
        {"id": created[2]["id"], "email": created[0]["email"]},
        {"fullName": "no id"},
    ])
    assert_error(response, 400, "Validation failed", ["3.id"])  # structure first
    response = await client.put(BATCH, headers=auth_headers, json=[
        {"id": created[0]["id"], "fullName": "Changed"},
        {"id": created[1]["id"], "email": "nope"},
        {"id": created[2]["id"], "email": created[0]["email"]},
        {"id": MISSING_ID, "fullName": "X"},
    ])
    assert_error(response, 400, "Validation failed", ["1.email", "2.email", "3.id"])
    listed = (await client.get(f"{URL}?sortDir=asc", headers=auth_headers)).json()["data"]
    assert listed == created


async def test_batch_update_of_unknown_ids_only_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = await create(client, auth_headers, email="a@example.com")
    response = await client.put(BATCH, headers=auth_headers, json=[
        {"id": created["id"], "fullName": "A"}, {"id": MISSING_ID, "fullName": "X"}])
    details = assert_error(response, 404, "Consumer not found", ["1.id"])
    assert details[0]["message"] == "Consumer not found"
    response = await client.put(BATCH, headers=auth_headers,
                                json=[{"id": created["id"]}] * (BATCH_MAX + 1))
    assert_error(response, 400, "Max batch size is 500", ["body"])


# -- who may write, and in what order refusals answer ----------------------------------------

WRITES = [
    ("POST", URL, {"email": "a@example.com"}),
    ("PUT", f"{URL}/{MISSING_ID}", {"fullName": "X"}),
    ("DELETE", f"{URL}/{MISSING_ID}", None),
    ("POST", BATCH, [{"email": "a@example.com"}]),
    ("PUT", BATCH, [{"id": MISSING_ID, "fullName": "X"}]),
]


@pytest.mark.parametrize(("method", "url", "body"), WRITES)
async def test_a_read_only_key_gets_403_and_nothing_is_written(
    client: httpx.AsyncClient, read_only_key: str, write_engine: Any,
    method: str, url: str, body: Any,
) -> None:
    row = consumer_row(1, id=MISSING_ID)
    await insert_consumers(write_engine, [row])
    response = await client.request(method, url, headers=bearer(read_only_key), json=body)
    assert_error(response, 403, "Forbidden", ["authorization"])
    assert response.json()["details"][0]["message"] == "This API key lacks the `write` scope."
    async with write_engine.connect() as conn:
        rows = (await conn.execute(select(models.Consumer.full_name))).scalars().all()
    assert rows == ["User 1"]
    # The same key reads.
    response = await client.get(f"{URL}/{MISSING_ID}", headers=bearer(read_only_key))
    assert response.status_code == 200


@pytest.mark.parametrize(("method", "url", "body"), WRITES)
async def test_writes_without_a_key_are_401(
    client: httpx.AsyncClient, method: str, url: str, body: Any
) -> None:
    response = await client.request(method, url, json=body)
    assert_error(response, 401, "Authentication required", [])
    assert response.headers["www-authenticate"] == "Bearer"


async def test_authentication_and_scope_answer_before_a_malformed_body(
    client: httpx.AsyncClient, read_only_key: str
) -> None:
    headers = {"Content-Type": "application/json"}
    response = await client.post(URL, headers=headers, content=b"{nope")
    assert_error(response, 401, "Authentication required")
    response = await client.post(URL, headers={**headers, **bearer(read_only_key)},
                                 content=b"{nope")
    assert_error(response, 403, "Forbidden")


async def test_a_key_without_the_read_scope_cannot_read(
    client: httpx.AsyncClient, app: Any
) -> None:
    from consumers_graphql.store.keys import Scope

    created = await app.state.keys.create("write only", scopes=frozenset({Scope.WRITE}))
    headers = bearer(created.secret.get_secret_value())
    assert_error(await client.get(URL, headers=headers), 403, "Forbidden")
    assert (await client.post(URL, headers=headers, json={})).status_code == 201


async def test_other_methods_and_paths_answer_in_the_same_shape(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.patch(f"{URL}/{MISSING_ID}", headers=auth_headers, json={})
    assert_error(response, 405, "Method not allowed", [])
    assert response.headers["allow"] == "DELETE, GET, PUT"
    assert_error(await client.get("/api/v1/nothing", headers=auth_headers), 404, "Not found", [])


# -- body limits ----------------------------------------------------------------------------


async def test_a_single_write_over_1_mib_is_413(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings
) -> None:
    body = json.dumps({"metadata": {"x": "a" * settings.max_body_bytes}}).encode()
    for method, url in (("POST", URL), ("PUT", f"{URL}/{MISSING_ID}")):
        response = await client.request(method, url, content=body, headers={
            **auth_headers, "Content-Type": "application/json"})
        details = assert_error(response, 413, "Request body too large", ["body"])
        assert f"{settings.max_body_bytes:,} bytes" in details[0]["message"]


async def test_a_chunked_body_is_counted_as_it_streams(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"metadata": {"x": "'
        for _ in range(settings.max_body_bytes // 65_536 + 1):
            yield b"a" * 65_536
        yield b'"}}'

    response = await client.post(URL, content=chunks(), headers={
        **auth_headers, "Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "Request body too large", ["body"])


def worst_case_batch(update: bool) -> list[dict[str, Any]]:
    """500 items with every field at its limit, in characters that cost the most bytes once
    escaped as \\uXXXX (4 UTF-8 bytes, 12 escaped): the largest valid batch a client whose
    encoder escapes non-ASCII (Python's json.dumps by default) can send."""
    emoji = "\U0001f600"
    metadata_chars = (METADATA_MAX_BYTES - len('{"k":""}')) // 4
    items = []
    for n in range(BATCH_MAX):
        tag = f"{n:03d}"
        item: dict[str, Any] = {
            "email": f"{tag}{'a' * (64 - 3)}@{'b' * 63}.{'c' * 63}.{'d' * 57}.com",
            "phone": "+1 (415) 555-0100" + " " * 47,
            "fullName": tag + emoji * (FULL_NAME_MAX - 3),
            "metadata": {"k": emoji * metadata_chars},
            "externalId": tag + emoji * (EXTERNAL_ID_MAX - 3),
        }
        if update:
            item = {"id": MISSING_ID, **item}
        items.append(item)
    assert len(items[0]["email"]) == EMAIL_MAX
    return items


async def test_the_largest_valid_batch_fits_the_batch_body_limit(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings,
    write_engine: Any,
) -> None:
    for update in (False, True):
        escaped = json.dumps(worst_case_batch(update)).encode()
        assert settings.max_body_bytes < len(escaped) <= settings.max_batch_body_bytes
    body = json.dumps(worst_case_batch(update=False)).encode()
    response = await client.post(BATCH, content=body, headers={
        **auth_headers, "Content-Type": "application/json"})
    assert response.status_code == 201, response.text[:500]
    assert len(response.json()) == BATCH_MAX
    assert await count_consumers(write_engine) == BATCH_MAX


async def test_a_batch_over_its_limit_is_413(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings
) -> None:
    body = b"[" + b" " * settings.max_batch_body_bytes + b"]"
    for method in ("POST", "PUT"):
        response = await client.request(method, BATCH, content=body, headers={
            **auth_headers, "Content-Type": "application/json"})
        details = assert_error(response, 413, "Request body too large", ["body"])
        assert f"{settings.max_batch_body_bytes:,} bytes" in details[0]["message"]
