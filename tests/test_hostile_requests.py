"""Malformed and hostile requests: each is a clear 4xx with a stable code, never a 500, and
nothing runs or is written."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from consumers_graphql.settings import Settings
from consumers_graphql.web.app import create_app
from tests.conftest import StatementCounter
from tests.factories import consumer_row, insert_consumers
from tests.log_audit import AUDIT
from tests.test_batches import BATCH_CREATE, consumer_count

GRAPHQL_RESPONSE = "application/graphql-response+json"
JSON_HEADERS = {"Content-Type": "application/json", "Accept": GRAPHQL_RESPONSE}
DEEP = "[" * 5_000 + "]" * 5_000
HUGE_INTEGER = "9" * 5_000
OPERATION = '{"query": "{ __typename }", "variables": '


def no_work(sql: StatementCounter) -> None:
    assert sql.statements == [], sql.statements


def refused(response: httpx.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    (error,) = response.json()["errors"]
    assert error["extensions"]["code"] == code
    assert message in error["message"]


@pytest.fixture(scope="module")
async def reference_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with every operation run by graphql-core alone (no compiled plans)."""
    app = create_app(settings)
    app.state.schema.compiled = False
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as c:
            yield c


# -- GraphQL: bodies that are not an operation ----------------------------------------------


@pytest.mark.parametrize("body", [b'"hello"', b"123", b"null", b"  true", b"\xff{}"])
async def test_a_post_body_that_is_not_a_json_object_is_400(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter, body: bytes
) -> None:
    with sql.counting():
        response = await client.post("/graphql", content=body,
                                     headers={**auth_headers, **JSON_HEADERS})

    refused(response, 400, "BAD_REQUEST", "The request body must be a JSON object")
    no_work(sql)


async def test_an_empty_json_array_is_still_a_refused_batch(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post("/graphql", content=b" []",
                                 headers={**auth_headers, **JSON_HEADERS})
    refused(response, 400, "BATCHING_NOT_SUPPORTED", "one operation per request")


MALFORMED_JSON = [
    ("nested 5,000 deep", OPERATION + '{"a": ' + DEEP + "}}", "it is nested too deeply"),
    ("an integer of 5,000 digits", OPERATION + '{"a": ' + HUGE_INTEGER + "}}",
     "a number has too many digits"),
    ("invalid UTF-8", '{"query": "{ __typename }", "variables": {"a": "\udcff"}}',
     "it is not valid UTF-8"),
    ("a syntax error", '{"query": "{ __typename }", "variables": {"a": }', "Expecting value"),
]


@pytest.mark.parametrize(("case", "body", "message"), MALFORMED_JSON,
                         ids=[m[0] for m in MALFORMED_JSON])
async def test_malformed_json_in_a_post_is_400(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter,
    case: str, body: str, message: str,
) -> None:
    with sql.counting():
        response = await client.post(
            "/graphql", content=body.encode("utf-8", "surrogateescape"),
            headers={**auth_headers, **JSON_HEADERS},
        )

    refused(response, 400, "BAD_REQUEST", f"Malformed JSON: {message}")


GET_MALFORMED = [
    ("variables nested 5,000 deep", "variables=" + quote('{"a": ' + DEEP + "}"),
     "Malformed JSON: it is nested too deeply"),
    ("an integer of 5,000 digits", "variables=" + quote('{"a": ' + HUGE_INTEGER + "}"),
     "Malformed JSON: a number has too many digits"),
    ("variables that do not parse", "variables=%7B", "Malformed JSON: Expecting"),
    ("invalid UTF-8", "variables=%7B%22a%22%3A%22%FF%22%7D", "not valid UTF-8"),
    ("variables not an object", "variables=%5B1%5D", "`variables` must be an object"),
    ("extensions not an object", "extensions=1", "`extensions` must be an object"),
]


@pytest.mark.parametrize(("case", "params", "message"), GET_MALFORMED,
                         ids=[m[0] for m in GET_MALFORMED])
async def test_malformed_get_parameters_are_400(
    client: httpx.AsyncClient, auth_headers: dict[str, str], case: str, params: str,
    message: str,
) -> None:
    response = await client.get(f"/graphql?query=%7B__typename%7D&{params}",
                                headers={**auth_headers, "Accept": GRAPHQL_RESPONSE})
    refused(response, 400, "BAD_REQUEST", message)


WRONG_TYPES = [
    ({"query": "{ __typename }", "variables": "x"}, "`variables` must be an object"),
    ({"query": "{ __typename }", "variables": [1]}, "`variables` must be an object"),
    ({"query": "{ __typename }", "extensions": "x"}, "`extensions` must be an object"),
    ({"query": 1}, "`query` must be a string"),
    ({"query": ["{ __typename }"]}, "`query` must be a string"),
    ({"query": "{ __typename }", "operationName": 1}, "`operationName` must be a string"),
]


@pytest.mark.parametrize(("body", "message"), WRONG_TYPES)
async def test_members_of_the_wrong_type_are_400(
    client: httpx.AsyncClient, auth_headers: dict[str, str], body: dict[str, Any], message: str
) -> None:
    response = await client.post("/graphql", json=body, headers={**auth_headers,
                                                                 "Accept": GRAPHQL_RESPONSE})
    refused(response, 400, "BAD_REQUEST", message)


# -- GraphQL: which operation -------------------------------------------------------------

TWO_OPERATIONS = "query A { __typename } mutation B { __typename }"


@pytest.mark.compares_paths
@pytest.mark.parametrize("path", ["compiled", "graphql-core"])
async def test_two_operations_without_an_operation_name_are_refused(
    client: httpx.AsyncClient, reference_client: httpx.AsyncClient,
    auth_headers: dict[str, str], path: str,
) -> None:
    http = client if path == "compiled" else reference_client
    for accept, status in ((GRAPHQL_RESPONSE, 400), ("application/json", 200)):
        response = await http.post("/graphql", json={"query": TWO_OPERATIONS},
                                   headers={**auth_headers, "Accept": accept})
        assert response.status_code == status
        assert response.json()["errors"] == [{
            "message": "Must provide operation name if query contains multiple operations.",
            "extensions": {"code": "BAD_REQUEST"},
        }]
        assert "data" not in response.json()

    named = await http.post("/graphql", json={"query": TWO_OPERATIONS, "operationName": "A"},
                            headers=auth_headers)
    assert named.json()["data"] == {"__typename": "Query"}
    over_get = await http.get("/graphql", params={"query": TWO_OPERATIONS},
                              headers={**auth_headers, "Accept": GRAPHQL_RESPONSE})
    assert over_get.status_code == 400


@pytest.mark.compares_paths
@pytest.mark.parametrize("path", ["compiled", "graphql-core"])
async def test_an_operation_name_that_names_no_operation_is_refused(
    client: httpx.AsyncClient, reference_client: httpx.AsyncClient,
    auth_headers: dict[str, str], path: str,
) -> None:
    http = client if path == "compiled" else reference_client
    for query in (TWO_OPERATIONS, "{ __typename }"):
        response = await http.post("/graphql", json={"query": query, "operationName": "C"},
                                   headers=auth_headers)
        refused(response, 400, "BAD_REQUEST", 'Unknown operation named "C".')


# -- GraphQL: oversize lists ---------------------------------------------------------------


async def test_a_huge_batch_is_refused_before_its_items_are_coerced(
    client: httpx.AsyncClient, auth_headers: dict[str, str], app: FastAPI,
    write_engine: Any, sql: StatementCounter,
) -> None:
    # 250,000 `{}` in 1 MiB: coercing them stalled the process ~3 s before the batch limit.
    body = json.dumps({"query": BATCH_CREATE, "variables": {"input": [{}] * 250_000}})
    assert len(body) <= app.state.settings.max_body_bytes
    with sql.counting():
        response = await client.post("/graphql", content=body,
                                     headers={**auth_headers, **JSON_HEADERS})

    refused(response, 400, "BATCH_TOO_LARGE", "`$input` holds 250,000 items")
    assert response.json()["errors"][0]["extensions"]["limit"] == 500
    no_work(sql)
    assert await consumer_count(write_engine) == 0


async def test_a_literal_list_over_the_limit_is_refused_too(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    items = ", ".join(f'{{email: "u{n}@example.com"}}' for n in range(501))
    query = f"mutation {{ consumerBatchCreate(input: [{items}]) {{ count }} }}"
    response = await client.post("/graphql", json={"query": query},
                                 headers={**auth_headers, "Accept": GRAPHQL_RESPONSE})

    refused(response, 400, "BATCH_TOO_LARGE", "A list argument holds 501 items")
    assert await consumer_count(write_engine) == 0


async def test_lists_inside_metadata_are_not_batches(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str
) -> None:
    metadata = {"tags": list(range(1_000))}
    response = await client.post("/graphql", json={
        "query": "mutation($m: JSON) { consumerCreate(input: {metadata: $m}) "
                 "{ consumer { id } userErrors { code } } }",
        "variables": {"m": metadata},
    }, headers=auth_headers)
    assert response.json()["data"]["consumerCreate"]["userErrors"] == []


# -- REST: the key before the body, and bounded bodies ---------------------------------------

BATCH = "/api/v1/consumers/batch"


def streamed(total: int, counter: list[int]) -> AsyncIterator[bytes]:
    """A `[{}, {}, …]` body of about ``total`` bytes, counting the chunks the server pulls."""

    async def chunks() -> AsyncIterator[bytes]:
        chunk = b"{}," * 21_845  # 64 KiB
        yield b"["
        for _ in range(total // len(chunk)):
            counter[0] += 1
            yield chunk
        yield b"{}]"

    return chunks()


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_huge_body_without_a_key_is_401_before_it_is_read(
    client: httpx.AsyncClient, method: str, write_engine: Any
) -> None:
    pulled = [0]
    response = await client.request(method, BATCH, content=streamed(28 << 20, pulled),
                                     headers={"Content-Type": "application/json"})

    assert response.status_code == 401
    assert response.json() == {"error": "Authentication required", "details": []}
    assert pulled[0] == 0
    assert await consumer_count(write_engine) == 0


async def test_a_huge_body_from_a_read_only_key_is_403_before_it_is_read(
    client: httpx.AsyncClient, read_only_key: str
) -> None:
    pulled = [0]
    response = await client.post(BATCH, content=streamed(28 << 20, pulled), headers={
        "Authorization": f"Bearer {read_only_key}", "Content-Type": "application/json"})

    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden"
    assert pulled[0] == 0


async def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings
) -> None:
    pulled = [0]
    limit = settings.max_batch_body_bytes
    response = await client.post(BATCH, content=streamed(limit + 65_536 * 2, pulled), headers={
        **auth_headers, "Content-Type": "application/json",
        "Content-Length": str(limit + 65_536 * 2 + 4)})

    assert response.status_code == 413
    assert response.json() == {"error": "Request body too large", "details": [{
        "field": "body", "message": f"The request body is over the limit of {limit:,} bytes."}]}
    assert pulled[0] == 0


async def test_a_batch_body_is_parsed_only_up_to_the_batch_limit(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    # 600,000 items (10 MB): once all built as dicts before the size was looked at.
    body = b"[" + b'{"fullName": "x"},' * 600_000 + b"{}]"
    for method in ("POST", "PUT"):
        response = await client.request(method, BATCH, content=body, headers={
            **auth_headers, "Content-Type": "application/json"})

        assert response.status_code == 400
        assert response.json() == {"error": "Max batch size is 500", "details": [{
            "field": "body",
            "message": "A batch takes at most 500 items; more were given. Nothing was written.",
        }]}
    assert await consumer_count(write_engine) == 0


@pytest.mark.parametrize("inside", [False, True], ids=["as items", "in one item's metadata"])
async def test_a_batch_of_millions_of_objects_is_refused_before_it_is_parsed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings,
    write_engine: Any, inside: bool,
) -> None:
    # 32 MiB of `{},`: 11 million dicts, ~800 MB, whether as items or in one item.
    count = (settings.max_batch_body_bytes - 32) // 3
    objects = b"{}," * count + b"{}"
    body = b'[{"metadata": {"a": [' + objects + b"]}}]" if inside else b"[" + objects + b"]"
    assert len(body) <= settings.max_batch_body_bytes
    response = await client.post(BATCH, content=body, headers={
        **auth_headers, "Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json() == {"error": "Validation failed", "details": [{
        "field": "body",
        "message": "The body holds more than 4,096,500 JSON objects and arrays, more than "
                   "500 items with valid metadata can.",
    }]}
    assert await consumer_count(write_engine) == 0


def oversize_metadata(strings: int) -> str:
    # `"ab"` a piece: ~15 times its size once parsed, the costliest metadata per byte.
    return '{"k": [' + ",".join(['"ab"'] * strings) + "]}"


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_batch_of_oversize_metadata_reports_every_item_and_writes_nothing(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any, method: str
) -> None:
    ids = [f"cons_01JD00000000000000000000{n:02d}" for n in range(4)]
    await insert_consumers(write_engine, [
        consumer_row(n, id=id, metadata={"n": n}) for n, id in enumerate(ids)])
    items = [
        f'{{"metadata": {oversize_metadata(20_000)}}}',
        '{"metadata": {"fine": true}, "email": "not an address"}',
        f'{{"metadata": {oversize_metadata(5_000)}, "fullName": "   "}}',
        '{"metadata": {"fine": true}}',
    ]
    if method == "PUT":
        items = [f'{{"id": "{id}", {item[1:]}' for id, item in zip(ids, items, strict=True)]
    response = await client.request(method, BATCH, content=f"[{','.join(items)}]", headers={
        **auth_headers, "Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["details"] == [
        {"field": "0.metadata", "message": "metadata must be at most 16384 bytes once "
                                           "serialised (100007 were given)."},
        {"field": "1.email", "message": "email is not a valid address: An email address must "
                                        "have an @-sign."},
        {"field": "2.fullName", "message": "fullName must not be empty (null means no value)."},
        {"field": "2.metadata", "message": "metadata must be at most 16384 bytes once "
                                           "serialised (25007 were given)."},
    ]
    assert await consumer_count(write_engine) == len(ids)
    unchanged = await client.get(f"/api/v1/consumers/{ids[3]}", headers=auth_headers)
    assert unchanged.json()["metadata"] == {"n": 3}


async def test_a_batch_of_oversize_metadata_costs_about_its_size(
    client: httpx.AsyncClient, auth_headers: dict[str, str], write_engine: Any
) -> None:
    # 4 MiB of 64 items over the metadata limit: ~60 MiB once parsed, were the items kept.
    item = f'{{"metadata": {oversize_metadata(13_000)}}}'.encode()
    body = b"[" + b",".join([item] * 64) + b"]"
    tracemalloc.start()
    try:
        response = await client.post(BATCH, content=body, headers={
            **auth_headers, "Content-Type": "application/json"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert response.status_code == 400
    assert len(response.json()["details"]) == 64
    assert peak < 3 * len(body), peak / len(body)
    assert await consumer_count(write_engine) == 0


async def test_one_item_is_parsed_from_at_most_a_single_body_limit(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings,
    write_engine: Any,
) -> None:
    # One item of 2 MiB would be ~30 MiB parsed; no valid item comes near 1 MiB.
    huge = f'{{"metadata": {oversize_metadata(2 * settings.max_body_bytes // 5)}}}'
    response = await client.post(BATCH, content=f'[{{}}, {huge}]', headers={
        **auth_headers, "Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["details"] == [{"field": "body", "message": (
        f"Item 1 takes more than {settings.max_body_bytes:,} characters of JSON, the limit "
        "of a body of POST /api/v1/consumers. Nothing was written.")}]
    # A malformed item before a long body is still malformed JSON, at its own place.
    response = await client.post(BATCH, content=f'[{{"fullName": nope}}, {huge}]', headers={
        **auth_headers, "Content-Type": "application/json"})
    assert response.json()["details"] == [{"field": "body", "message": (
        "Malformed JSON: Expecting value: line 1 column 15 (char 14)")}]
    assert await consumer_count(write_engine) == 0


@pytest.mark.parametrize("body", [b"[{}, ]", b"[{} {}]", b"[{}] []", b"[", b"\xff[]"])
async def test_a_malformed_batch_is_still_reported_as_malformed_json(
    client: httpx.AsyncClient, auth_headers: dict[str, str], body: bytes
) -> None:
    response = await client.post(BATCH, content=body, headers={
        **auth_headers, "Content-Type": "application/json"})

    assert response.status_code == 400
    (detail,) = response.json()["details"]
    assert detail["field"] == "body"
    assert detail["message"].startswith("Malformed JSON: ")


# -- headers -----------------------------------------------------------------------------

SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY",
                    "referrer-policy": "no-referrer", "cache-control": "no-store"}


async def test_every_answer_carries_the_security_headers(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str
) -> None:
    answers = [
        await client.post("/graphql", json={"query": "{ __typename }"}, headers=auth_headers),
        await client.post("/graphql", json={"query": "{ __typename }"}),  # 401
        await client.post("/graphql", content=b"{}", headers={"Content-Type": "text/plain"}),
        await client.get("/api/v1/consumers", headers=auth_headers),
        await client.get("/api/v1/consumers"),  # 401
        await client.patch(BATCH, headers=auth_headers),  # 405
        await client.get("/api/v1/nothing"),  # 404
        await client.get("/healthz"),
        await client.get("/graphql", headers={"Accept": "text/html"}),
    ]
    for response in answers:
        assert {name: response.headers.get(name) for name in SECURITY_HEADERS} \
            == SECURITY_HEADERS, (response.request.url, response.status_code)
        assert response.headers["x-request-id"].startswith("req_")


async def test_the_graphiql_page_allows_exactly_its_own_scripts_and_is_never_framed(
    client: httpx.AsyncClient
) -> None:
    response = await client.get("/graphql", headers={"Accept": "text/html"})

    assert response.status_code == 200
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'"
    sources = policy["script-src"].split()
    assert "'unsafe-inline'" not in sources
    scripts = [s for s in sources if s.startswith("https://")]
    assert scripts and all(f'src="{s}"' in response.text for s in scripts)
    assert response.text.count("<script") == len(sources)  # the inline one by its hash


async def test_the_rest_description_is_off_in_production(
    client: httpx.AsyncClient, settings: Settings, app: FastAPI
) -> None:
    from consumers_graphql.settings import Environment

    production_app = create_app(settings.model_copy(update={"env": Environment.PRODUCTION}))
    async with LifespanManager(production_app):
        transport = httpx.ASGITransport(app=production_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as prod:
            for path in ("/openapi.json", "/docs"):
                assert (await prod.get(path)).status_code == 404, path
                assert (await client.get(path)).status_code == 200, path


# -- 405: the methods of each path ---------------------------------------------------------

ALLOWED = {
    "/api/v1/consumers": "GET, POST",
    "/api/v1/consumers/search": "GET",
    "/api/v1/consumers/batch": "POST, PUT",
    "/api/v1/consumers/cons_01JD0000000000000000000000": "DELETE, GET, PUT",
}


@pytest.mark.parametrize(("path", "allow"), ALLOWED.items())
async def test_a_405_lists_exactly_the_methods_of_its_path(
    client: httpx.AsyncClient, auth_headers: dict[str, str], path: str, allow: str
) -> None:
    allowed = allow.split(", ")
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        if method in allowed:
            continue
        response = await client.request(method, path, headers=auth_headers)
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allow
        assert response.json() == {"error": "Method not allowed", "details": []}


# -- Bodies that never finish arriving --------------------------------------------------------


async def cut_short(app: FastAPI, path: str, body: bytes, secret: str) -> list[Any]:
    """Sends `body` under a Content-Length 500 bytes longer, then the client goes away (as
    `serve`'s body timeout also reports it); what the app sent back."""
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await app({
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body) + 500).encode()),
                    (b"authorization", f"Bearer {secret}".encode())],
    }, receive, send)
    return sent


async def test_a_graphql_body_cut_short_is_never_executed(
    app: FastAPI, api_key: str, sql: StatementCounter, write_engine: Any, execution_path: str
) -> None:
    body = json.dumps({"query": 'mutation { consumerCreate(input: {email: "cut@example.com"}) '
                                "{ consumer { id } } }"}).encode()

    sent = await cut_short(app, "/graphql", body, api_key)

    assert sent == []  # nobody is left to read an answer
    no_work(sql)
    assert sql.auth_statements == []
    assert await consumer_count(write_engine) == 0


async def test_a_rest_body_cut_short_is_never_executed(
    app: FastAPI, api_key: str, sql: StatementCounter, write_engine: Any
) -> None:
    body = json.dumps({"email": "cut@example.com"}).encode()

    sent = await cut_short(app, "/api/v1/consumers", body, api_key)

    # FastAPI reports the ClientDisconnect as a body it could not parse, to no one
    assert sent[0]["status"] == 400
    no_work(sql)
    assert await consumer_count(write_engine) == 0
