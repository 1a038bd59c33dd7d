"""The REST API's read side: list, get, search, with the reference's shapes and errors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest

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

CONSUMER_KEYS = {
    "id": str, "email": (str, type(None)), "phone": (str, type(None)),
    "fullName": (str, type(None)), "metadata": (dict, type(None)),
    "externalId": (str, type(None)), "totalOrders": int, "totalOrderValue": (int, float),
    "lastOrderAt": (str, type(None)), "createdAt": str, "updatedAt": str,
}


def assert_consumer_shape(consumer: dict[str, Any], extra: set[str] = frozenset()) -> None:
    assert set(consumer) == set(CONSUMER_KEYS) | extra
    for key, kind in CONSUMER_KEYS.items():
        assert isinstance(consumer[key], kind), (key, consumer[key])


async def given_data(engine: Any) -> list[dict[str, Any]]:
    rows = [consumer_row(n, email=f"john{n}@example.com", full_name=f"John {n}",
                         metadata={"tier": "vip"} if n % 2 else None) for n in range(30)]
    await insert_consumers(engine, rows)
    audience = audience_row("VIP", description="Top spenders")
    await insert_rows(engine, models.Audience, [audience])
    await insert_rows(engine, models.ConsumerAudience, [
        {"consumer_id": rows[0]["id"], "audience_id": audience["id"], "created_at": BASE_TIME}])
    await insert_rows(engine, models.Order, [
        order_row(rows[0]["id"], "19.99", BASE_TIME + timedelta(days=1)),
        order_row(rows[0]["id"], "5", BASE_TIME + timedelta(days=2)),
    ])
    return rows


async def test_list_has_the_reference_shape(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    rows = await given_data(write_engine)
    response = await client.get(
        "/api/v1/consumers?first=20&search=john&sortBy=createdAt&sortDir=desc",
        headers=auth_headers,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"data", "pageInfo"}
    assert set(body["pageInfo"]) == {"startCursor", "endCursor"}
    assert len(body["data"]) == 20
    for consumer in body["data"]:
        assert_consumer_shape(consumer)
    assert [c["id"] for c in body["data"]] == [r["id"] for r in reversed(rows)][:20]
    assert body["data"][0]["createdAt"] == "2024-11-01T10:29:00Z"


async def test_rest_and_graphql_cursors_are_interchangeable(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL, write_engine: Any
) -> None:
    await given_data(write_engine)
    rest = (await client.get("/api/v1/consumers?first=5&sortBy=email&sortDir=asc",
                             headers=auth_headers)).json()
    graphql = (await gql.data("{ consumers(first: 5, sortBy: EMAIL, sortDir: ASC) "
                              "{ pageInfo { startCursor endCursor } nodes { id } } }"))
    assert rest["pageInfo"] == graphql["consumers"]["pageInfo"]
    cursor = rest["pageInfo"]["endCursor"]
    url = f"/api/v1/consumers?first=5&sortBy=email&sortDir=asc&after={cursor}"
    rest_next = (await client.get(url, headers=auth_headers)).json()
    gql_next = await gql.data("query($c: String) { consumers(first: 5, sortBy: EMAIL, "
                              "sortDir: ASC, after: $c) { nodes { id } } }", {"c": cursor})
    assert [c["id"] for c in rest_next["data"]] == [n["id"] for n in gql_next["consumers"]["nodes"]]


@pytest.mark.parametrize("sort_by", ["createdAt", "email", "fullName", "lastOrderAt",
                                     "totalOrderValue", "totalOrders"])
async def test_paging_both_ways_gives_every_consumer_once(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any, sort_by: str
) -> None:
    rows = [consumer_row(n, email=None if n % 7 == 0 else f"u{n % 17}.{n}@x.io",
                         last_order_at=None if n % 2 else BASE_TIME + timedelta(hours=n % 5),
                         total_orders=n % 4) for n in range(120)]
    await insert_consumers(write_engine, rows)
    for direction in ("asc", "desc"):
        forward: list[str] = []
        cursor = ""
        while True:
            url = f"/api/v1/consumers?first=13&sortBy={sort_by}&sortDir={direction}"
            body = (await client.get(url + (f"&after={cursor}" if cursor else ""),
                                     headers=auth_headers)).json()
            if not body["data"]:
                break
            forward += [c["id"] for c in body["data"]]
            cursor = body["pageInfo"]["endCursor"]
        backward: list[str] = []
        cursor = ""
        while True:
            url = f"/api/v1/consumers?last=13&sortBy={sort_by}&sortDir={direction}"
            body = (await client.get(url + (f"&before={cursor}" if cursor else ""),
                                     headers=auth_headers)).json()
            if not body["data"]:
                break
            backward = [c["id"] for c in body["data"]] + backward
            cursor = body["pageInfo"]["startCursor"]
        assert len(forward) == len(set(forward)) == 120
        assert backward == forward


async def test_get_with_include(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    rows = await given_data(write_engine)
    consumer_id = rows[0]["id"]
    plain = (await client.get(f"/api/v1/consumers/{consumer_id}", headers=auth_headers)).json()
    assert_consumer_shape(plain)
    assert plain["email"] == "john0@example.com"

    both = await client.get(f"/api/v1/consumers/{consumer_id}?include=audiences,orders",
                            headers=auth_headers)
    body = both.json()
    assert_consumer_shape(body, {"audiences", "orders"})
    assert body["audiences"] == [{"id": body["audiences"][0]["id"], "name": "VIP",
                                  "description": "Top spenders",
                                  "createdAt": "2024-11-01T10:00:00Z",
                                  "updatedAt": "2024-11-01T10:00:00Z"}]
    assert [(o["amount"], o["placedAt"], o["consumerId"]) for o in body["orders"]] == [
        (5.0, "2024-11-03T10:00:00Z", consumer_id), (19.99, "2024-11-02T10:00:00Z", consumer_id)]

    listed = (await client.get("/api/v1/consumers?include=audiences&first=100",
                               headers=auth_headers)).json()
    for consumer in listed["data"]:
        assert_consumer_shape(consumer, {"audiences"})
    assert sum(len(c["audiences"]) for c in listed["data"]) == 1


async def test_search_endpoint(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    rows = await given_data(write_engine)
    body = (await client.get("/api/v1/consumers/search?email=JOHN3@example.com",
                             headers=auth_headers)).json()
    assert [c["id"] for c in body["data"]] == [rows[3]["id"]]
    body = (await client.get("/api/v1/consumers/search?q=john2&first=5",
                             headers=auth_headers)).json()
    assert len(body["data"]) == 5  # john2, john20..john29, newest first
    assert body["data"][0]["id"] == rows[29]["id"]


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/consumers?first=101", "first"),
        ("/api/v1/consumers?first=-1", "first"),
        ("/api/v1/consumers?first=abc", "first"),
        ("/api/v1/consumers?first=1&last=1", "last"),
        ("/api/v1/consumers?sortBy=phone", "sortBy"),
        ("/api/v1/consumers?sortDir=up", "sortDir"),
        ("/api/v1/consumers?after=garbage", "after"),
        ("/api/v1/consumers?search=j", "search"),
        ("/api/v1/consumers?createdAfter=yesterday", "createdAfter"),
        ("/api/v1/consumers?audienceId=cons_01JD0000000000000000000000", "audienceId"),
        ("/api/v1/consumers?include=friends", "include"),
        ("/api/v1/consumers/search", "q"),
        ("/api/v1/consumers/search?q=x", "q"),
    ],
)
async def test_bad_queries_are_validation_failed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], url: str, field: str
) -> None:
    response = await client.get(url, headers=auth_headers)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "Validation failed"
    assert [d["field"] for d in body["details"]] == [field]
    assert all(d["message"] for d in body["details"])


async def test_unknown_consumer_is_404(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for consumer_id in ("cons_01JD0000000000000000000000", "nope"):
        response = await client.get(f"/api/v1/consumers/{consumer_id}", headers=auth_headers)
        assert response.status_code == 404
        assert response.json() == {"error": "Consumer not found", "details": [
            {"field": "id", "message": "Consumer not found"}]}


async def test_no_key_is_401(client: httpx.AsyncClient) -> None:
    for url in ("/api/v1/consumers", "/api/v1/consumers/search?q=jo",
                "/api/v1/consumers/cons_01JD0000000000000000000000"):
        response = await client.get(url)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": "Authentication required", "details": []}
    response = await client.get("/api/v1/consumers", headers={"Authorization": "Bearer sk_live_x"})
    assert response.status_code == 401
