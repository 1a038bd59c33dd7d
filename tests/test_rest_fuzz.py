"""The REST API against its own OpenAPI document: the document's shape (what client
generators read), then a property-based fuzz with schemathesis, in-process over ASGI, that
finds no 5xx and no response breaking the documented status codes, content types, headers
and schemas. Sized for CI: 100 cases per operation and test, ~15 s each."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from consumers_graphql.domain.validation import BATCH_MAX, METADATA_MAX_BYTES
from consumers_graphql.rest.models import EMAIL
from consumers_graphql.settings import Settings
from consumers_graphql.store.models import EMAIL_MAX, EXTERNAL_ID_MAX
from consumers_graphql.timestamps import parse_datetime
from consumers_graphql.web.app import create_app
from tests.conftest import bearer
from tests.factories import consumer_row, insert_consumers

REST_PATHS = {
    "/api/v1/consumers": {"get", "post"},
    "/api/v1/consumers/search": {"get"},
    "/api/v1/consumers/batch": {"post", "put"},
    "/api/v1/consumers/{consumer_id}": {"get", "put", "delete"},
    "/api/v1/consumers/batch/upsert": {"put"},
    "/api/v1/consumers/external/{external_id}": {"put"},
    "/api/v1/events": {"get"},
}
# Consumers that exist during the fuzz, so that generated ids sometimes hit one.
SEEDED_IDS = [f"cons_01JD00000000000000000000{n:02d}" for n in range(8)]
EXAMPLES_PER_OPERATION = 100


# -- the document ---------------------------------------------------------------------------


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_the_document_covers_exactly_the_rest_api(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    assert {path: set(ops) for path, ops in document["paths"].items()} == REST_PATHS
    assert document["components"]["securitySchemes"] == {"HTTPBearer": {
        "type": "http", "scheme": "bearer", "description": "A secret key: sk_live_… / sk_test_…"}}


def test_every_operation_documents_its_body_responses_and_security(
    document: dict[str, Any],
) -> None:
    base = "/api/v1/consumers"
    one, batch = f"{base}/{{consumer_id}}", f"{base}/batch"
    refs = {
        ("post", base): ("CreateConsumerRequest", "201", "ConsumerOut"),
        ("get", base): (None, "200", "ConsumersListOut"),
        ("get", f"{base}/search"): (None, "200", "ConsumersListOut"),
        ("post", batch): ("BatchCreateConsumersRequest", "201", "[ConsumerOut]"),
        ("put", batch): ("BatchUpdateConsumersRequest", "200", "[ConsumerOut]"),
        ("get", one): (None, "200", "ConsumerWithRelationsOut"),
        ("put", one): ("UpdateConsumerRequest", "200", "ConsumerOut"),
        ("delete", one): (None, "200", "ConsumerOut"),
        ("put", f"{base}/batch/upsert"): ("BatchUpsertConsumersRequest", "200", "[ConsumerOut]"),
        ("put", f"{base}/external/{{external_id}}"): ("UpsertConsumerRequest", "200",
                                                      "ConsumerOut"),
        ("get", "/api/v1/events"): (None, "200", "EventsListOut"),
    }
    created_too = {("put", f"{base}/external/{{external_id}}")}
    for (method, path), (request, status, response) in refs.items():
        operation = document["paths"][path][method]
        assert operation["security"] == [{"HTTPBearer": []}]
        if request is None:
            assert "requestBody" not in operation
        else:
            body = operation["requestBody"]
            assert body["required"] is True
            assert body["content"]["application/json"]["schema"] == {
                "$ref": f"#/components/schemas/{request}"}
        success = [code for code in operation["responses"] if code.startswith("2")]
        assert success == [status, "201"] if (method, path) in created_too else [status], (
            method, path)
        schema = dict(operation["responses"][status]["content"]["application/json"]["schema"])
        schema.pop("title", None)
        if response.startswith("["):
            assert schema == {"type": "array", "items": {
                "$ref": f"#/components/schemas/{response[1:-1]}"}}
        else:
            assert schema == {"$ref": f"#/components/schemas/{response}"}
        errors = {"400", "401", "403", "429", "4XX", "503"}
        if path == one or (method, path) == ("put", batch):
            errors.add("404")
        if request is not None:
            errors.add("413")
        if method != "get":  # the Idempotency-Key's: in use, reused (never FastAPI's 422)
            errors |= {"409", "422"}
        assert set(operation["responses"]) == errors | set(success), (method, path)
        for code in errors:
            assert operation["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorOut"}
        if method == "get":
            assert "422" not in operation["responses"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    created = document["paths"]["/api/v1/consumers"]["post"]["responses"]["201"]
    assert set(created["headers"]) == {"Location", "Idempotent-Replayed", "RateLimit-Policy",
                                       "RateLimit"}


def test_batch_bodies_state_the_500_item_maximum(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, item in (("BatchCreateConsumersRequest", "CreateConsumerRequest"),
                       ("BatchUpdateConsumersRequest", "BatchUpdateConsumerItem"),
                       ("BatchUpsertConsumersRequest", "BatchUpsertConsumerItem")):
        assert schemas[name]["type"] == "array"
        assert schemas[name]["maxItems"] == BATCH_MAX
        assert schemas[name]["items"] == {"$ref": f"#/components/schemas/{item}"}
    create = schemas["CreateConsumerRequest"]
    assert create["additionalProperties"] is False
    assert create["properties"]["email"]["anyOf"][0] == {
        "type": "string", "format": "email", "minLength": 3, "maxLength": 254, "pattern": EMAIL}


def test_query_parameters_are_the_reference_ones(document: dict[str, Any]) -> None:
    def names(path: str) -> set[str]:
        return {p["name"] for p in document["paths"][path]["get"]["parameters"]
                if p["in"] == "query"}

    assert names("/api/v1/consumers") == {
        "first", "after", "before", "last", "search", "sortBy", "sortDir", "createdAfter",
        "createdBefore", "audienceId", "include"}
    assert names("/api/v1/consumers/search") == {
        "q", "email", "phone", "externalId", "first", "after", "include"}
    (sort_by,) = [p for p in document["paths"]["/api/v1/consumers"]["get"]["parameters"]
                  if p["name"] == "sortBy"]
    assert sort_by["schema"]["enum"] == ["createdAt", "email", "fullName", "lastOrderAt",
                                         "totalOrderValue", "totalOrders"]
    assert sort_by["schema"]["default"] == "createdAt"


def test_parameters_state_what_the_server_enforces(document: dict[str, Any]) -> None:
    def schemas(path: str) -> dict[str, dict[str, Any]]:
        return {p["name"]: p["schema"] for p in document["paths"][path]["get"]["parameters"]}

    listing, search = schemas("/api/v1/consumers"), schemas("/api/v1/consumers/search")
    for page in (listing["first"], listing["last"], search["first"]):
        assert (page["minimum"], page["maximum"]) == (0, 100)
    for term in (listing["search"], search["q"]):
        assert (term["minLength"], term["maxLength"]) == (2, 200)
        assert re.fullmatch(term["pattern"], " ab ")
        assert not re.fullmatch(term["pattern"], " a ")
        assert not re.fullmatch(term["pattern"], "ab\x00c")
    include = listing["include"]["pattern"]
    assert re.fullmatch(include, "audiences,orders")
    assert not re.fullmatch(include, "audiences,payments")
    assert re.fullmatch(listing["audienceId"]["pattern"], "aud_01JD0000000000000000000000")
    assert not re.fullmatch(listing["audienceId"]["pattern"], "cons_01JD0000000000000000000000")
    assert listing["createdAfter"]["format"] == listing["createdBefore"]["format"] == "date-time"
    for name in ("email", "phone", "externalId"):
        assert not re.fullmatch(search[name]["pattern"], "a\x00")
    fields = document["components"]["schemas"]["CreateConsumerRequest"]["properties"]
    assert not re.fullmatch(fields["fullName"]["anyOf"][0]["pattern"], "   ")
    assert not re.fullmatch(fields["externalId"]["anyOf"][0]["pattern"], "")
    assert re.fullmatch(fields["phone"]["anyOf"][0]["pattern"], "+1 (415) 555-0100")
    assert not re.fullmatch(fields["phone"]["anyOf"][0]["pattern"], "+0 415")
    for special_use in ("a@b.test", "a@LOCALHOST", "a@x.onion.", "a@home.arpa"):
        assert not re.search(fields["email"]["anyOf"][0]["pattern"], special_use)
    assert re.search(fields["email"]["anyOf"][0]["pattern"], "a@testing.example.com")
    assert fields["metadata"]["anyOf"][0]["maxProperties"] == 3276


# -- the fuzz -------------------------------------------------------------------------------


@pytest.fixture
async def seeded(write_engine: Any) -> None:
    await insert_consumers(write_engine, [
        consumer_row(n, id=consumer_id, metadata={"n": n})
        for n, consumer_id in enumerate(SEEDED_IDS)])


@pytest.fixture
def fuzz_app(settings: Settings) -> FastAPI:
    # An app of its own: schemathesis serves it from its own thread and event loop (running
    # its lifespan there), on the same database as the session's app.
    return create_app(settings)


# Loaded when the module is imported, from an app that is never started (the document does
# not depend on the database); the requests go to `fuzz_app`.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    if "consumer_id" not in (path_parameters or {}):
        return st.just(path_parameters)
    return st.one_of(st.just(path_parameters), st.sampled_from(
        [{**path_parameters, "consumer_id": id} for id in SEEDED_IDS]))


@schema.hook
def flatmap_body(context: Any, body: Any) -> Any:
    # Batch-update items aim at existing consumers about half the time.
    if not (isinstance(body, list) and body
            and all(isinstance(item, dict) and "id" in item for item in body)):
        return st.just(body)
    return st.one_of(st.just(body), st.lists(
        st.sampled_from(SEEDED_IDS), min_size=len(body), max_size=len(body)
    ).map(lambda ids: [{**item, "id": id} for item, id in zip(body, ids, strict=True)]))


# Schema-violating data is generated too (every response must still be documented and never
# a 5xx), but `negative_data_rejection` is left out: a query value that is "not a string"
# reaches the server as a string, and the explicit Authorization header undoes a
# "missing header" mutation, so that check reports requests that were in fact valid.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_the_rest_api_keeps_its_documented_contract(
    case: Any, fuzz_app: FastAPI, api_key: str, seeded: None
) -> None:
    case.call_and_validate(app=fuzz_app, headers=bearer(api_key), checks=CHECKS)


# The acceptance fuzz: positive data only, on a schema object of its own; each case is made to
# respect what the document cannot state. Those rules, each beyond JSON Schema:
# - a phone number must be in use in phonenumbers' metadata: strings become real numbers;
# - email and externalId are unique in the database and within a batch: each gets a tag unique
#   to its case and item;
# - batch-update ids are distinct within a batch (a relation between items);
# - an upsert's externalId in the path gets a tag too (never `.` or `..`, which a URL drops),
#   and one repeated in the body is the path's (a relation between path and body);
# - metadata is at most 16 KiB serialised and holds no NUL (PostgreSQL cannot store it);
# - `first` and `last` exclude each other (OpenAPI cannot relate query parameters): `last` goes;
# - cursors are tokens the server issued: generated ones are dropped;
# - a search needs one of q, email, phone and externalId (a relation again): q is added;
# - a timestamp is an instant of years 1 to 9999 once in UTC (`date-time` allows
#   0001-01-01T00:01:00+01:54, which the API refuses as out of range): such a filter goes.
accepting = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
accepting.config.generation.update(modes=[GenerationMode.POSITIVE])
accepting.hook(flatmap_path_parameters)
# Numbers in use, as phonenumbers' metadata has them, in the formats people write.
REAL_PHONES = ["+14155550100", "+44 20 7946 0958", "+33 1 23 45 67 89", "+49 30 901820",
               "+61 2 9374 4000", "+81 3-3224-5000", "+1 (212) 555-0123", "+919876543210"]
_TAGS = itertools.count()


def _unique(value: str, tag: str, limit: int, *, email: bool) -> str:
    if email:
        local, _, domain = value.rpartition("@")
        local = f"{tag}.{local}" if re.fullmatch(r"[\w.+-]+", local) and \
            not local.startswith(".") else tag
        unique = f"{local}@{domain.strip()}"
        return unique if len(local) <= 64 and len(unique) <= limit else f"{tag}@{domain.strip()}"
    return (tag + value)[:limit]


def _positive_item(item: Any, tag: str, phone: str) -> Any:
    if not isinstance(item, dict):
        return item
    item = dict(item)
    if isinstance(item.get("email"), str):
        item["email"] = _unique(item["email"].strip(), tag, EMAIL_MAX, email=True)
    if isinstance(item.get("externalId"), str):
        item["externalId"] = _unique(item["externalId"], tag, EXTERNAL_ID_MAX, email=False)
    if isinstance(item.get("phone"), str):
        item["phone"] = phone
    metadata = item.get("metadata")
    if isinstance(metadata, dict):
        encoded = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
        if "\\u0000" in encoded or len(encoded.encode()) > METADATA_MAX_BYTES:
            item["metadata"] = {"trimmed": True}
    return item


def _out_of_range(value: Any) -> bool:
    """A timestamp outside years 1 to 9999 once in UTC."""
    try:
        parse_datetime(value)
    except ValueError as error:
        return "out of range" in str(error)
    return False


def _within_rules_beyond_the_document(case: Any) -> None:
    """Makes a case respect the rules listed above; on the case itself, so that it holds for
    every phase (the coverage phase's boundary values do not pass through hooks)."""
    tag = f"t{next(_TAGS)}x"
    if isinstance(case.body, list | dict):
        items = case.body if isinstance(case.body, list) else [case.body]
        fixed = [_positive_item(item, f"{tag}{n}", REAL_PHONES[(n + len(tag)) % len(REAL_PHONES)])
                 for n, item in enumerate(items)]
        ids = iter([*SEEDED_IDS, *(f"cons_unknown{n}" for n in range(len(items)))])
        fixed = [{**item, "id": next(ids)} if isinstance(item, dict) and "id" in item else item
                 for item in fixed]
        case.body = fixed if isinstance(case.body, list) else fixed[0]
    path_parameters = case.path_parameters or {}
    if isinstance(path_parameters.get("external_id"), str):
        # schemathesis holds path parameters percent-encoded
        external_id = _unique(unquote(path_parameters["external_id"]), tag, EXTERNAL_ID_MAX,
                              email=False)
        case.path_parameters = {**path_parameters, "external_id": quote(external_id, safe="")}
        if isinstance(case.body, dict) and "externalId" in case.body:
            case.body = {**case.body, "externalId": external_id}
    query = {name: value for name, value in (case.query or {}).items()
             if name not in ("after", "before") and not _out_of_range(value)}
    if query.get("first") is not None and query.get("last") is not None:
        del query["last"]
    if case.path.endswith("/search") and all(
            query.get(name) is None for name in ("q", "email", "phone", "externalId")):
        query["q"] = "example"
    case.query = query
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None:  # a key is for one request: each case its own (a reuse is 422)
        case.headers["Idempotency-Key"] = f"{tag}{key}"[:255]


@accepting.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_what_the_document_allows_is_accepted(
    case: Any, fuzz_app: FastAPI, api_key: str, seeded: None
) -> None:
    # schemathesis's ST202 (valid data refused: anything but 2xx, or 404 for an id that does
    # not exist, which the document states) and ST205 (`Allow` differing from the document),
    # on every operation, writes included.
    _within_rules_beyond_the_document(case)
    case.call_and_validate(app=fuzz_app, headers=bearer(api_key),
                           checks=[positive_data_acceptance, allow_header_conformance])


@pytest.mark.parametrize("query", [
    "/search?q=ab%00c", "/search?email=a%00b", "/search?phone=%2B1%00",
    "/search?externalId=a%00", "?search=ab%00c", "?audienceId=aud_%00",
])
async def test_nul_in_a_query_parameter_is_validation_failed(
    client: httpx.AsyncClient, auth_headers: dict[str, str], query: str
) -> None:
    # Found by the fuzz: U+0000 reached the database (a 500 on both).
    response = await client.get(f"/api/v1/consumers{query}", headers=auth_headers)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "Validation failed"
    assert [d["field"] for d in body["details"]] == [query.split("?")[1].split("=")[0]]


async def test_the_docs_page_serves_the_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
