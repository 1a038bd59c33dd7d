"""The reference (the Consumers API page this REST API is wire-compatible with), replayed:
each curl example, the SDK usage sequence and each row of its error tables, against the
app with real keys. Responses are checked against the reference's TypeScript interfaces,
transcribed below as they are written there, and against its example values.

The reference's example emails are obfuscated on the page ("[email protected]"); the
replays use real addresses in their place."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from consumers_graphql.store import models
from tests.factories import audience_row, consumer_row, insert_consumers, insert_rows

URL = "/api/v1/consumers"

# The reference's interfaces, verbatim.
REFERENCE_INTERFACES = """
interface CreateConsumerRequest {
  email?: string;
  phone?: string; // E.164 format recommended
  fullName?: string;
  metadata?: Record<string, unknown>;
  externalId?: string;
}

interface Consumer {
  id: string;
  email: string | null;
  phone: string | null;
  fullName: string | null;
  metadata: Record<string, unknown> | null;
  externalId: string | null;
  totalOrders: number;
  totalOrderValue: number;
  lastOrderAt: string | null;
  createdAt: string;
  updatedAt: string;
}

interface ConsumersListResponse {
  data: Consumer[];
  pageInfo: {
    startCursor: string | null;
    endCursor: string | null;
  };
}

interface UpdateConsumerRequest {
  email?: string | null;
  phone?: string | null;
  fullName?: string | null;
  metadata?: Record<string, unknown> | null;
  externalId?: string | null;
}

interface BatchUpdateConsumerItem extends UpdateConsumerRequest {
  id: string;
}
"""


def interface(name: str) -> dict[str, tuple[str, bool]]:
    """`interface Name { key?: type; }` -> {key: (type, optional)} (flat members only)."""
    body = re.search(rf"interface {name}\b[^{{]*\{{(.*?)\n}}", REFERENCE_INTERFACES, re.S)
    assert body is not None, name
    members = re.findall(r"^  (\w+)(\??): ([^;{]+);", body.group(1), re.M)
    return {key: (kind.strip(), optional == "?") for key, optional, kind in members}


def conforms(value: Any, ts_type: str) -> bool:
    checks = {
        "string": lambda v: isinstance(v, str),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "null": lambda v: v is None,
        "Record<string, unknown>": lambda v: isinstance(v, dict),
    }
    return any(checks[part.strip()](value) for part in ts_type.split("|"))


CONSUMER = interface("Consumer")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")


def assert_consumer(value: Any, extra: frozenset[str] = frozenset()) -> None:
    """Exactly the keys of `interface Consumer` (plus relations asked for), each of its type."""
    assert isinstance(value, dict)
    assert set(value) == set(CONSUMER) | extra, set(value) ^ set(CONSUMER)
    for key, (kind, _) in CONSUMER.items():
        assert conforms(value[key], kind), (key, value[key], kind)
    assert value["id"].startswith("cons_")
    for key in ("createdAt", "updatedAt", "lastOrderAt"):
        assert value[key] is None or RFC3339_UTC.fullmatch(value[key]), (key, value[key])


def assert_list_response(body: Any) -> None:
    assert set(body) == {"data", "pageInfo"}
    for consumer in body["data"]:
        assert_consumer(consumer)
    assert set(body["pageInfo"]) == {"startCursor", "endCursor"}
    for cursor in body["pageInfo"].values():
        assert conforms(cursor, "string | null")


def test_the_transcribed_interfaces_parse() -> None:
    assert len(CONSUMER) == 11
    assert not any(optional for _, optional in CONSUMER.values())
    assert all(optional for _, optional in interface("CreateConsumerRequest").values())
    assert interface("BatchUpdateConsumerItem") == {"id": ("string", False)}


# -- the curl examples ----------------------------------------------------------------------

CREATE_EXAMPLE_RESPONSE = {
    "id": "cons_01HXYZ123456789",
    "email": "[email protected]",
    "phone": None,
    "fullName": "John Doe",
    "metadata": {"source": "import", "tier": "vip"},
    "externalId": None,
    "totalOrders": 0,
    "totalOrderValue": 0,
    "lastOrderAt": None,
    "createdAt": "2024-11-01T10:00:00Z",
    "updatedAt": "2024-11-01T10:00:00Z",
}


async def test_create_consumer_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # curl -X POST /api/v1/consumers -H "Authorization: Bearer sk_live_…"
    #   -H "Content-Type: application/json" -d '{"email": …, "fullName": "John Doe", …}'
    response = await client.post(URL, headers={**auth_headers,
                                               "Content-Type": "application/json"}, content=b"""{
        "email": "john@example.com",
        "fullName": "John Doe",
        "metadata": {
          "source": "import",
          "tier": "vip"
        }
      }""")
    assert response.status_code == 201
    created = response.json()
    assert_consumer(created)
    assert set(created) == set(CREATE_EXAMPLE_RESPONSE)
    varying = {"id", "email", "createdAt", "updatedAt"}
    assert {k: v for k, v in created.items() if k not in varying} == {
        k: v for k, v in CREATE_EXAMPLE_RESPONSE.items() if k not in varying}
    assert created["email"] == "john@example.com"
    assert created["createdAt"] == created["updatedAt"]


async def test_list_consumers_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    example = [
        {"id": "cons_01HXYZ123456789", "email": "[email protected]", "fullName": "John Doe",
         "createdAt": "2024-11-01T10:00:00Z"},
        {"id": "cons_01HXYZ123456790", "email": "[email protected]", "fullName": "John Smith",
         "createdAt": "2024-10-15T08:00:00Z"},
    ]
    await insert_consumers(write_engine, [
        consumer_row(1, email="john.doe@example.com", full_name="John Doe",
                     created_at=datetime(2024, 11, 1, 10, 0, tzinfo=UTC)),
        consumer_row(2, email="john.smith@example.com", full_name="John Smith",
                     created_at=datetime(2024, 10, 15, 8, 0, tzinfo=UTC)),
        consumer_row(3, email="jane@example.com", full_name="Jane Roe",
                     created_at=datetime(2024, 11, 2, 10, 0, tzinfo=UTC)),
    ])
    # curl -X GET "/api/v1/consumers?first=20&search=john&sortBy=createdAt&sortDir=desc"
    response = await client.get(
        f"{URL}?first=20&search=john&sortBy=createdAt&sortDir=desc", headers=auth_headers)
    assert response.status_code == 200
    body = response.json()
    assert_list_response(body)
    assert [{k: c[k] for k in ("fullName", "createdAt")} for c in body["data"]] == [
        {k: c[k] for k in ("fullName", "createdAt")} for c in example]
    for ours, theirs in zip(body["data"], example, strict=True):
        assert set(theirs) <= set(ours)
    assert body["pageInfo"]["startCursor"] and body["pageInfo"]["endCursor"]


async def test_get_consumer_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    row = consumer_row(1)
    audience = audience_row("VIP", description="Top spenders")
    await insert_consumers(write_engine, [row])
    await insert_rows(write_engine, models.Audience, [audience])
    await insert_rows(write_engine, models.ConsumerAudience, [
        {"consumer_id": row["id"], "audience_id": audience["id"],
         "created_at": row["created_at"]}])
    # curl -X GET "/api/v1/consumers/cons_…?include=audiences"
    response = await client.get(f"{URL}/{row['id']}?include=audiences", headers=auth_headers)
    assert response.status_code == 200
    body = response.json()
    assert_consumer(body, frozenset({"audiences"}))
    assert [a["name"] for a in body["audiences"]] == ["VIP"]
    assert set(body["audiences"][0]) == {"id", "name", "description", "createdAt", "updatedAt"}
    response = await client.get(f"{URL}/{row['id']}?include=audiences,orders",
                                headers=auth_headers)
    assert_consumer(response.json(), frozenset({"audiences", "orders"}))


async def test_update_consumer_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    consumer = (await client.post(URL, headers=auth_headers, json={
        "email": "john@example.com", "fullName": "John Doe",
        "metadata": {"source": "import", "tier": "vip"}})).json()
    # curl -X PUT /api/v1/consumers/cons_… -d '{"fullName": "John A. Doe",
    #   "metadata": {"tier": "platinum"}}'
    response = await client.put(f"{URL}/{consumer['id']}", headers=auth_headers, json={
        "fullName": "John A. Doe", "metadata": {"tier": "platinum"}})
    assert response.status_code == 200
    updated = response.json()
    assert_consumer(updated)
    assert updated["fullName"] == "John A. Doe"
    assert updated["metadata"] == {"source": "import", "tier": "platinum"}
    assert updated["email"] == "john@example.com"


async def test_delete_consumer_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    consumer = (await client.post(URL, headers=auth_headers,
                                  json={"email": "john@example.com"})).json()
    # curl -X DELETE /api/v1/consumers/cons_…  -> "Returns the deleted consumer."
    response = await client.delete(f"{URL}/{consumer['id']}", headers=auth_headers)
    assert response.status_code == 200
    assert_consumer(response.json())
    assert response.json() == consumer
    assert (await client.get(f"{URL}/{consumer['id']}", headers=auth_headers)).status_code == 404


async def test_batch_create_consumers_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    example = [
        {"id": "cons_01HXYZ123456789", "email": "[email protected]", "fullName": "User One"},
        {"id": "cons_01HXYZ123456790", "email": "[email protected]", "fullName": "User Two"},
        {"id": "cons_01HXYZ123456791", "email": "[email protected]", "fullName": "User Three"},
    ]
    # curl -X POST /api/v1/consumers/batch -d '[{"email": …, "fullName": "User One"}, …]'
    response = await client.post(f"{URL}/batch", headers=auth_headers, json=[
        {"email": "user1@example.com", "fullName": "User One"},
        {"email": "user2@example.com", "fullName": "User Two"},
        {"email": "user3@example.com", "fullName": "User Three"},
    ])
    assert response.status_code == 201
    created = response.json()
    assert isinstance(created, list)
    for consumer in created:
        assert_consumer(consumer)
    assert [c["fullName"] for c in created] == [c["fullName"] for c in example]
    assert [c["email"] for c in created] == [f"user{n}@example.com" for n in (1, 2, 3)]
    assert len({c["id"] for c in created}) == 3


async def test_batch_update_consumers_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    created = (await client.post(f"{URL}/batch", headers=auth_headers, json=[
        {"email": "a@example.com"}, {"email": "b@example.com"}])).json()
    # curl -X PUT /api/v1/consumers/batch -d '[{"id": "cons_…", "metadata": {"tier": "gold"}},
    #   {"id": "cons_…", "metadata": {"tier": "silver"}}]'
    response = await client.put(f"{URL}/batch", headers=auth_headers, json=[
        {"id": created[0]["id"], "metadata": {"tier": "gold"}},
        {"id": created[1]["id"], "metadata": {"tier": "silver"}},
    ])
    assert response.status_code == 200
    updated = response.json()
    for consumer in updated:
        assert_consumer(consumer)
    assert [(c["id"], c["metadata"]) for c in updated] == [
        (created[0]["id"], {"tier": "gold"}), (created[1]["id"], {"tier": "silver"})]


async def test_search_consumers_example(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    consumer = (await client.post(URL, headers=auth_headers,
                                  json={"email": "john@example.com"})).json()
    await client.post(URL, headers=auth_headers, json={"email": "johnny@example.com"})
    # curl -X GET "/api/v1/consumers/search?email=…"
    response = await client.get(f"{URL}/search?email=john@example.com", headers=auth_headers)
    assert response.status_code == 200
    body = response.json()
    assert_list_response(body)
    assert body["data"] == [consumer]


@pytest.mark.parametrize("sort_by", ["createdAt", "email", "fullName", "lastOrderAt",
                                     "totalOrderValue", "totalOrders"])
async def test_every_sortable_field_of_the_reference_is_accepted(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sort_by: str
) -> None:
    for direction in ("asc", "desc"):
        response = await client.get(f"{URL}?sortBy={sort_by}&sortDir={direction}",
                                    headers=auth_headers)
        assert response.status_code == 200
        assert_list_response(response.json())


async def test_first_defaults_to_20_and_is_at_most_100(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    await insert_consumers(write_engine, [consumer_row(n) for n in range(105)])
    assert len((await client.get(URL, headers=auth_headers)).json()["data"]) == 20
    assert len((await client.get(f"{URL}?first=100", headers=auth_headers)).json()["data"]) == 100
    assert (await client.get(f"{URL}?first=101", headers=auth_headers)).status_code == 400


# -- the SDK usage sequence ------------------------------------------------------------------


async def test_sdk_usage_sequence(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    """What `@fanfare/admin-sdk` sends for the reference's SDK example, step by step."""
    await insert_consumers(write_engine, [
        consumer_row(n, email=f"john{n}@example.com", full_name=f"John {n}") for n in range(30)])

    # const consumer = await admin.consumers.create({email, fullName: "John Doe"});
    response = await client.post(URL, headers=auth_headers,
                                 json={"email": "john.doe@example.com", "fullName": "John Doe"})
    assert response.is_success
    consumer = response.json()
    assert_consumer(consumer)

    # const { data: consumers, pageInfo } = await admin.consumers.list({first: 20,
    #   search: "john", sortBy: "createdAt", sortDir: "desc"});
    response = await client.get(URL, headers=auth_headers, params={
        "first": 20, "search": "john", "sortBy": "createdAt", "sortDir": "desc"})
    assert response.is_success
    first_page = response.json()
    assert_list_response(first_page)
    assert len(first_page["data"]) == 20
    assert first_page["data"][0]["id"] == consumer["id"]

    # if (pageInfo.endCursor) { await admin.consumers.list({first: 20, after: endCursor}); }
    assert first_page["pageInfo"]["endCursor"]
    response = await client.get(URL, headers=auth_headers, params={
        "first": 20, "after": first_page["pageInfo"]["endCursor"]})
    assert response.is_success
    next_page = response.json()
    assert_list_response(next_page)
    everything = (await client.get(f"{URL}?first=100", headers=auth_headers)).json()["data"]
    ids = [c["id"] for c in everything]
    assert [c["id"] for c in first_page["data"] + next_page["data"]] == ids[:31]

    # await admin.consumers.update(consumer.id, {metadata: {tier: "vip"}});
    response = await client.put(f"{URL}/{consumer['id']}", headers=auth_headers,
                                json={"metadata": {"tier": "vip"}})
    assert response.is_success
    assert response.json()["metadata"] == {"tier": "vip"}

    # await admin.consumers.batchCreate([{email: …}, {email: …}]);
    response = await client.post(f"{URL}/batch", headers=auth_headers, json=[
        {"email": "first@example.com"}, {"email": "second@example.com"}])
    assert response.is_success
    assert [c["email"] for c in response.json()] == ["first@example.com", "second@example.com"]

    # await admin.consumers.delete(consumer.id);
    response = await client.delete(f"{URL}/{consumer['id']}", headers=auth_headers)
    assert response.is_success
    assert response.json()["id"] == consumer["id"]


# -- each row of the reference's error tables ------------------------------------------------

MISSING = "cons_01HXYZ00000000000000000000"


ERROR_ROWS = [
    # (endpoint, row description, method, url, body, authenticated, status, error)
    ("create", "Invalid request data", "POST", URL, {"email": "not an email"}, True,
     400, "Validation failed"),
    ("create", "Duplicate email", "POST", URL, {"email": "TAKEN@example.com"}, True,
     400, "Email already exists"),
    ("create", "Missing authentication", "POST", URL, {"email": "a@example.com"}, False,
     401, "Authentication required"),
    ("get", "Consumer ID does not exist", "GET", f"{URL}/{MISSING}", None, True,
     404, "Consumer not found"),
    ("update", "Invalid request data", "PUT", "{existing}", {"phone": "call me"}, True,
     400, "Validation failed"),
    ("update", "Consumer ID does not exist", "PUT", f"{URL}/{MISSING}", {"fullName": "X"}, True,
     404, "Consumer not found"),
    ("batch create", "Too many consumers in batch", "POST", f"{URL}/batch",
     [{"email": f"u{n}@example.com"} for n in range(501)], True, 400, "Max batch size is 500"),
]


@pytest.mark.parametrize(
    ("endpoint", "row", "method", "url", "body", "authenticated", "status", "error"),
    ERROR_ROWS, ids=[f"{r[0]}: {r[1]}" for r in ERROR_ROWS],
)
async def test_error_table_row(
    client: httpx.AsyncClient, auth_headers: dict[str, str], endpoint: str, row: str,
    method: str, url: str, body: Any, authenticated: bool, status: int, error: str,
) -> None:
    existing = (await client.post(URL, headers=auth_headers,
                                  json={"email": "taken@example.com"})).json()
    url = url.replace("{existing}", f"{URL}/{existing['id']}")
    response = await client.request(method, url, json=body,
                                    headers=auth_headers if authenticated else {})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert set(response.json()) == {"error", "details"}
    assert (await client.get(f"{URL}?first=100", headers=auth_headers)).json()["data"] == [
        existing]


# -- the request shapes, as the OpenAPI document states them ----------------------------------


async def test_openapi_request_bodies_are_the_reference_interfaces(
    client: httpx.AsyncClient,
) -> None:
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("CreateConsumerRequest", "UpdateConsumerRequest"):
        assert set(schemas[name]["properties"]) == set(interface(name)), name
        assert "required" not in schemas[name]
    item = schemas["BatchUpdateConsumerItem"]
    assert set(item["properties"]) == set(interface("UpdateConsumerRequest")) | {"id"}
    assert item["required"] == ["id"]
    consumer = schemas["ConsumerOut"]
    assert set(consumer["properties"]) == set(CONSUMER)
    assert set(consumer["required"]) == set(CONSUMER)
    for key, (kind, _) in CONSUMER.items():
        prop = consumer["properties"][key]
        types = {t["type"] for t in prop["anyOf"]} if "anyOf" in prop else {prop["type"]}
        expected = {{"string": "string", "number": "number", "null": "null",
                     "Record<string, unknown>": "object"}[part.strip()]
                    for part in kind.split("|")}
        if key == "totalOrders":
            expected = {"integer"}
        assert types == expected, (key, types, expected)
