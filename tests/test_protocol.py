"""GraphQL over HTTP: methods, media types, status codes, and the requests refused before
any work is done (no SQL, not even the key lookup)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from consumers_graphql.api.http import negotiate
from tests.conftest import StatementCounter, throttle_status

GRAPHQL_RESPONSE = "application/graphql-response+json"
TYPENAME = {"query": "{ __typename }"}
PARSE_ERROR = {"query": "{ consumers { "}
VALIDATION_ERROR = {"query": "{ consumers { nope } }"}
VARIABLE_ERROR = {"query": "query($n: Int) { consumers(first: $n) { totalCount } }",
                  "variables": {"n": "ten"}}
FIELD_ERROR = {"query": "{ consumers(first: 1000) { totalCount } }"}
MUTATION = "mutation { __typename }"


def no_work(sql: StatementCounter) -> None:
    assert sql.statements == [], sql.statements
    assert sql.auth_statements == [], sql.auth_statements


async def post(
    client: httpx.AsyncClient, headers: dict[str, str], body: Any, accept: str | None = None
) -> httpx.Response:
    if accept is not None:
        headers = {**headers, "Accept": accept}
    return await client.post("/graphql", json=body, headers=headers)


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        (None, "application/json"),
        ("application/json", "application/json"),
        ("*/*", "application/json"),
        (GRAPHQL_RESPONSE, GRAPHQL_RESPONSE),
        (f"{GRAPHQL_RESPONSE}, application/json;q=0.9", GRAPHQL_RESPONSE),
        (f"application/json, {GRAPHQL_RESPONSE};q=0.5", "application/json"),
        ("text/html, application/*;q=0.1", "application/json"),
    ],
)
@pytest.mark.usefixtures("execution_path")
async def test_the_response_media_type_follows_accept(
    client: httpx.AsyncClient, auth_headers: dict[str, str], accept: str | None, media_type: str
) -> None:
    response = await post(client, auth_headers, TYPENAME, accept)

    assert response.status_code == 200
    assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
    assert response.json() == {
        "data": {"__typename": "Query"}, "extensions": {"cost": {
            "requested": 0, "limit": 50_000,
            # at least 1 point taken from the key's rate limit bucket
            "throttleStatus": throttle_status(1)}}
    }


async def test_an_accept_allowing_neither_json_type_is_406(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter
) -> None:
    with sql.counting():
        response = await post(client, auth_headers, TYPENAME, "text/html")
        charset = await post(client, auth_headers, TYPENAME, "application/json; charset=latin-1")

    assert response.status_code == 406
    assert charset.status_code == 406
    assert response.json()["errors"][0]["extensions"]["code"] == "NOT_ACCEPTABLE"
    no_work(sql)


def test_negotiation_ignores_ranges_with_q_zero() -> None:
    assert negotiate(f"{GRAPHQL_RESPONSE};q=0, text/plain") is None
    assert negotiate(f"{GRAPHQL_RESPONSE};q=0, */*") == "application/json"


@pytest.mark.parametrize(
    ("body", "code"),
    [(PARSE_ERROR, "GRAPHQL_PARSE_FAILED"), (VALIDATION_ERROR, "GRAPHQL_VALIDATION_FAILED"),
     (VARIABLE_ERROR, "BAD_USER_INPUT")],
)
@pytest.mark.usefixtures("execution_path")
async def test_request_errors_are_400_under_graphql_response_json_and_200_under_json(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter,
    body: dict[str, Any], code: str,
) -> None:
    with sql.counting():
        strict = await post(client, auth_headers, body, GRAPHQL_RESPONSE)
        legacy = await post(client, auth_headers, body, "application/json")

    assert strict.status_code == 400
    assert strict.headers["content-type"].startswith(GRAPHQL_RESPONSE)
    assert legacy.status_code == 200
    for response in (strict, legacy):
        payload = response.json()
        # The request never reached execution: the spec's "no data entry".
        assert "data" not in payload
        assert payload["errors"][0]["extensions"]["code"] == code
    assert sql.statements == []


@pytest.mark.usefixtures("execution_path")
async def test_a_field_error_is_200_with_data_under_both_media_types(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for accept in (GRAPHQL_RESPONSE, "application/json"):
        response = await post(client, auth_headers, FIELD_ERROR, accept)

        assert response.status_code == 200
        payload = response.json()
        assert payload["data"] is None
        assert payload["errors"][0]["path"] == ["consumers"]
        assert payload["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.mark.usefixtures("execution_path")
async def test_queries_are_accepted_over_get(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.get(
        "/graphql",
        params={"query": "query($n: Int) { consumers(first: $n) { totalCount } }",
                "variables": json.dumps({"n": 2})},
        headers={**auth_headers, "Accept": GRAPHQL_RESPONSE},
    )

    assert response.status_code == 200
    assert response.json()["data"] == {"consumers": {"totalCount": 0}}


async def test_a_mutation_over_get_is_405_allowing_post(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter
) -> None:
    with sql.counting():
        response = await client.get(
            "/graphql", params={"query": MUTATION},
            headers={**auth_headers, "Accept": GRAPHQL_RESPONSE},
        )

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["errors"][0]["extensions"]["code"] == "METHOD_NOT_ALLOWED"
    assert sql.statements == []  # the key was checked; nothing else ran


async def test_other_methods_are_405(client: httpx.AsyncClient, sql: StatementCounter) -> None:
    with sql.counting():
        response = await client.put("/graphql", json=TYPENAME)

    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST"
    no_work(sql)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # the CSRF probe: a "simple" cross-site request needs no preflight
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        None,
    ],
)
async def test_a_post_that_is_not_json_is_415(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter,
    content_type: str | None,
) -> None:
    headers = {**auth_headers}
    if content_type is not None:
        headers["Content-Type"] = content_type
    with sql.counting():
        response = await client.post(
            "/graphql", content=json.dumps({"query": MUTATION}), headers=headers
        )

    assert response.status_code == 415
    assert response.json()["errors"][0]["extensions"]["code"] == "UNSUPPORTED_MEDIA_TYPE"
    no_work(sql)


@pytest.mark.usefixtures("execution_path")
async def test_a_utf8_json_post_is_accepted(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post(
        "/graphql", content=json.dumps({"query": '{ __type(name: "Run🏃") { name } }'}),
        headers={**auth_headers, "Content-Type": "application/json; charset=utf-8"},
    )

    assert response.status_code == 200
    assert response.json()["data"] == {"__type": None}


async def test_a_body_over_the_limit_is_413(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter
) -> None:
    two_mib = {"query": "{ __typename }", "variables": {"pad": "x" * (2 * 1024 * 1024)}}
    with sql.counting():
        response = await post(client, auth_headers, two_mib)

    assert response.status_code == 413
    assert response.json()["errors"][0]["extensions"]["code"] == "PAYLOAD_TOO_LARGE"
    no_work(sql)


async def test_a_chunked_body_without_length_is_counted_as_it_streams(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"query": "{ __typename }", "variables": {"pad": "'
        for _ in range(64):  # 64 x 32 KiB = 2 MiB
            sent += 1
            yield b"x" * 32 * 1024
        yield b'"}}'

    with sql.counting():
        response = await client.post(
            "/graphql", content=chunks(),
            headers={**auth_headers, "Content-Type": "application/json"},
        )

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert sent < 64  # refused as soon as the count passed the limit
    no_work(sql)


async def test_a_batch_is_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str], sql: StatementCounter
) -> None:
    with sql.counting():
        response = await post(client, auth_headers, [TYPENAME] * 10)

    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["extensions"]["code"] == "BATCHING_NOT_SUPPORTED"
    assert "one operation per request" in error["message"]
    no_work(sql)


@pytest.mark.parametrize(
    "body",
    [b'{ "not a JSON', b'{"qeury": "{ __typename }"}', b'{"query": 1}', b""],
)
async def test_malformed_requests_are_400_in_json(
    client: httpx.AsyncClient, auth_headers: dict[str, str], body: bytes
) -> None:
    response = await client.post(
        "/graphql", content=body,
        headers={**auth_headers, "Content-Type": "application/json", "Accept": GRAPHQL_RESPONSE},
    )

    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


@pytest.mark.usefixtures("execution_path")
async def test_every_response_carries_a_request_id(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    ok = await post(client, auth_headers, TYPENAME)
    refused = await client.post("/graphql", content=b"{}", headers={"Content-Type": "text/plain"})
    unauthenticated = await post(client, {}, TYPENAME)
    health = await client.get("/healthz")

    ids = [r.headers["x-request-id"] for r in (ok, refused, unauthenticated, health)]
    assert unauthenticated.status_code == 401
    assert all(i.startswith("req_") for i in ids)
    assert len(set(ids)) == 4


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [("4bf92f3577b34da6a3ce929d0e0e4736", True), ("trace-1.2:3_x", True),
     ("has space", False), ("<script>", False), ("x" * 65, False)],
)
async def test_an_incoming_request_id_is_kept_only_when_it_is_a_short_safe_token(
    client: httpx.AsyncClient, incoming: str, kept: bool
) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": incoming})

    assert (response.headers["x-request-id"] == incoming) is kept


async def test_strawberry_runs_the_extension_hooks_through_our_runner() -> None:
    """The contract api/schema.py's `_Runner` relies on (Strawberry's internals, pinned in
    pyproject.toml): Schema.execute takes its runner from `create_extensions_runner` and
    enters its operation(), parsing(), validation() and executing() phases, nested so."""
    import strawberry
    from strawberry.exceptions import MissingQueryError
    from strawberry.extensions import SchemaExtension

    from consumers_graphql.api import schema as api_schema

    calls: list[str] = []
    runners: list[object] = []

    class Recorder(SchemaExtension):
        def on_operation(self) -> Any:
            calls.append("operation")
            try:
                yield
            except MissingQueryError:
                calls.append("/operation: no query")
                raise
            calls.append("/operation")

        def on_parse(self) -> Any:
            calls.append("parse")
            yield
            calls.append("/parse")

        def on_validate(self) -> Any:
            calls.append("validate")
            yield
            calls.append("/validate")

        def on_execute(self) -> Any:
            calls.append("execute")
            yield
            calls.append("/execute")

    class Schema(api_schema.Schema):
        def create_extensions_runner(self, *args: Any, **kwargs: Any) -> Any:
            runner = super().create_extensions_runner(*args, **kwargs)
            runners.append(runner)
            return runner

    @strawberry.type
    class Query:
        @strawberry.field
        def ok(self) -> bool:
            return True

    schema = Schema(query=Query, extensions=[Recorder])
    schema.compiled = False
    result = await schema.execute("{ ok }")

    assert result.errors is None and result.data == {"ok": True}
    assert [type(runner) for runner in runners] == [api_schema._Runner]
    assert calls == ["operation", "parse", "/parse", "validate", "/validate", "execute",
                     "/execute", "/operation"]
    calls.clear()  # an exception goes through the hooks as through context managers
    with pytest.raises(MissingQueryError):
        await schema.execute(None)
    assert calls == ["operation", "/operation: no query"]


async def test_the_extension_phases_also_run_under_execute_sync_and_a_hook_cannot_swallow() -> None:
    """Strawberry's execute_sync enters the runner's phases with `with`; and, as in
    Strawberry's own runner, an exception goes on through a hook that catches it."""
    import contextlib
    from collections.abc import Iterator

    import strawberry
    from strawberry.exceptions import MissingQueryError
    from strawberry.extensions import SchemaExtension

    from consumers_graphql.api import schema as api_schema

    class Swallower(SchemaExtension):
        def on_operation(self) -> Iterator[None]:
            with contextlib.suppress(Exception):  # the point of the test
                yield

    @strawberry.type
    class Query:
        @strawberry.field
        def ok(self) -> bool:
            return True

    schema = api_schema.Schema(query=Query, extensions=[Swallower])
    schema.compiled = False
    result = schema.execute_sync("{ ok }")
    assert result.errors is None and result.data == {"ok": True}
    with pytest.raises(MissingQueryError):
        await schema.execute(None)


async def test_a_schema_run_with_strawberrys_default_context_runs_nothing() -> None:
    """A transport that hands Strawberry's own context (a dict, no key checked) is refused
    by the scope check rather than trusted as an in-process caller."""
    from consumers_graphql.api.schema import build_schema

    schema = build_schema(production=False)
    result = await schema.execute("{ __typename }", context_value={"request": None})
    assert result.data is None
    assert [error.extensions for error in result.errors or []] == [{"code": "UNAUTHENTICATED"}]
