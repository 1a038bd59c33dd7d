"""Secret keys on /graphql: 401 for every way of not having a usable key, scopes enforced on
the parsed operation, the GraphiQL page open, lastUsedAt throttled, secrets kept out of logs."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import socket
import sys
from datetime import timedelta
from typing import Any

import httpx
import pytest
import strawberry
import uvicorn
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from graphql import GraphQLError
from pydantic import SecretStr
from sqlalchemy import select, text

from consumers_graphql.api.permissions import ScopeCheck
from consumers_graphql.settings import Environment, Settings
from consumers_graphql.store import keys as key_store
from consumers_graphql.store.keys import (
    ANONYMOUS,
    READ_ONLY,
    READ_WRITE,
    KeyStore,
    Principal,
    Scope,
    generate_secret,
    hash_secret,
)
from consumers_graphql.store.models import ApiKey
from consumers_graphql.web.app import create_app
from consumers_graphql.web.logs import RedactSecrets
from tests.conftest import GraphQL, StatementCounter, bearer, on_path
from tests.log_audit import AUDIT

QUERY = "{ consumers(first: 1) { totalCount } }"
UNAUTHENTICATED_BODY = {
    "errors": [{"message": "Authentication required",
                "extensions": {"code": "UNAUTHENTICATED"}}]
}
# Two operations in one document: which one runs (and which scope it needs) is operationName's.
QUERY_AND_MUTATION = """
query Read { consumers(first: 1) { totalCount } }
mutation Write { consumerCreate(input: {email: "new@example.com"}) { consumer { id } } }
"""


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == UNAUTHENTICATED_BODY


# -- 401 ---------------------------------------------------------------------------------

async def test_no_header_is_401_on_post_and_get(client: httpx.AsyncClient, app: FastAPI) -> None:
    assert_unauthenticated(await client.post("/graphql", json={"query": QUERY}))
    assert_unauthenticated(await client.get("/graphql", params={"query": QUERY},
                                            headers={"accept": "application/json"}))


@pytest.mark.parametrize("header", [
    "{secret}",                   # no scheme
    "Basic {secret}",             # another scheme
    "Bearer",                     # no token
    "Bearer ",
    "Bearer {secret} extra",      # two tokens
    "Bearer {secret}x!",          # a character no secret holds
    "Bearer sk_live_short",       # too short to be a secret
    "Bearer pk_live_{body}",      # not a secret key
    "Token {secret}",
])
async def test_malformed_header_is_401(
    client: httpx.AsyncClient, api_key: str, header: str
) -> None:
    value = header.format(secret=api_key, body=api_key.removeprefix("sk_live_"))
    response = await client.post("/graphql", json={"query": QUERY},
                                 headers={"Authorization": value})
    assert_unauthenticated(response)


async def test_unknown_key_is_401(client: httpx.AsyncClient, api_key: str) -> None:
    # well-formed, and even sharing the real key's visible prefix
    unknown = api_key[:12] + "x" * 40
    assert_unauthenticated(await client.post("/graphql", json={"query": QUERY},
                                             headers=bearer(unknown)))
    assert_unauthenticated(await client.post("/graphql", json={"query": QUERY},
                                             headers=bearer(generate_secret(test=True))))


async def test_revoked_key_is_401_from_the_next_request(gql: GraphQL, app: FastAPI) -> None:
    # given a key that works
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    [key] = await app.state.keys.list_keys()
    # when it is revoked
    outcome, _ = await app.state.keys.revoke(key.id)
    assert outcome is key_store.RevokeOutcome.REVOKED
    # then the very next request is refused
    assert await gql(QUERY, status=401) == UNAUTHENTICATED_BODY


async def test_valid_key_is_200_on_post_and_get(
    client: httpx.AsyncClient, gql: GraphQL, api_key: str
) -> None:
    assert await gql.data(QUERY) == {"consumers": {"totalCount": 0}}
    response = await client.get("/graphql", params={"query": QUERY}, headers=bearer(api_key))
    assert response.status_code == 200
    assert response.json()["data"] == {"consumers": {"totalCount": 0}}


@pytest.mark.usefixtures("execution_path")
async def test_scheme_is_case_insensitive(client: httpx.AsyncClient, api_key: str) -> None:
    response = await client.post("/graphql", json={"query": QUERY},
                                 headers={"Authorization": f"bearer {api_key}"})
    assert response.status_code == 200, response.text


async def test_key_made_with_another_pepper_is_refused(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # given a key stored by a process with a different pepper
    database = app.state.database
    other = KeyStore(database.read_engine, database.write_engine, SecretStr("other"))
    created = await other.create("elsewhere")
    # then this app cannot match it
    response = await client.post("/graphql", json={"query": QUERY},
                                 headers=bearer(created.secret.get_secret_value()))
    assert_unauthenticated(response)


# -- open doors ------------------------------------------------------------------------

async def test_graphiql_page_loads_without_a_key(client: httpx.AsyncClient, app: FastAPI) -> None:
    response = await client.get("/graphql", headers={"accept": "text/html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "graphiql" in response.text.lower()


async def test_a_query_in_a_browser_get_still_needs_a_key(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    response = await client.get("/graphql", params={"query": QUERY}, headers={"accept": browser})
    assert_unauthenticated(response)


async def test_healthz_needs_no_key(client: httpx.AsyncClient, app: FastAPI) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_production_has_no_ide_and_no_exemption(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"env": Environment.PRODUCTION}))
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     event_hooks=AUDIT.event_hooks()) as client:
            assert_unauthenticated(await client.get("/graphql", headers={"accept": "text/html"}))


# -- scopes ------------------------------------------------------------------------------

async def test_read_only_key_can_query(read_only_gql: GraphQL) -> None:
    assert await read_only_gql.data(QUERY) == {"consumers": {"totalCount": 0}}


def _has_mutation(app: FastAPI) -> bool:
    return app.state.schema.get_type_by_name("Mutation") is not None


async def test_read_only_key_gets_forbidden_on_a_mutation_and_nothing_is_written(
    read_only_gql: GraphQL, gql: GraphQL, app: FastAPI, write_engine: Any
) -> None:
    if not _has_mutation(app):
        pytest.fail("consumerCreate is not in the schema yet")
    mutation = ('mutation { consumerCreate(input: {email: "ro@example.com"}) '
                "{ consumer { id } userErrors { code } } }")
    # when a read-only key sends a mutation
    body = await read_only_gql(mutation)
    # then it is refused as a whole (HTTP 200, a GraphQL error), before anything runs
    assert body.get("data") is None
    assert body["errors"] == [{
        "message": "This API key lacks the `write` scope.",
        "extensions": {"code": "FORBIDDEN"},
    }]
    async with write_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM consumers"))).scalar() == 0
    # and the same mutation with a read-write key does write
    created = await gql.data(mutation)
    assert created["consumerCreate"]["userErrors"] == []
    async with write_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM consumers"))).scalar() == 1


async def test_forbidden_is_403_under_graphql_response_json(
    client: httpx.AsyncClient, read_only_key: str, write_engine: Any
) -> None:
    response = await client.post(
        "/graphql",
        json={"query": 'mutation { consumerCreate(input: {email: "ro@example.com"}) '
                       "{ consumer { id } } }"},
        headers={**bearer(read_only_key), "Accept": "application/graphql-response+json"},
    )
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/graphql-response+json")
    body = response.json()
    assert "data" not in body
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]
    async with write_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM consumers"))).scalar() == 0


@pytest.mark.usefixtures("execution_path")
async def test_operation_name_decides_the_scope_in_a_multi_operation_document(
    client: httpx.AsyncClient, read_only_key: str, app: FastAPI, write_engine: Any
) -> None:
    if not _has_mutation(app):
        pytest.fail("consumerCreate is not in the schema yet")

    async def run(name: str) -> dict[str, Any]:
        response = await client.post(
            "/graphql", json={"query": QUERY_AND_MUTATION, "operationName": name},
            headers=bearer(read_only_key),
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert (await run("Read"))["data"] == {"consumers": {"totalCount": 0}}
    refused = await run("Write")
    assert refused.get("data") is None
    assert [e["extensions"]["code"] for e in refused["errors"]] == ["FORBIDDEN"]
    async with write_engine.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM consumers"))).scalar() == 0


# The extension on its own, on a schema whose mutation counts its runs: it needs nothing from
# the Consumers schema, and shows that a refused operation never reaches a resolver.
@strawberry.type
class _Query:
    @strawberry.field
    def ping(self) -> str:
        return "pong"


_writes: list[str] = []


@strawberry.type
class _Mutation:
    @strawberry.mutation
    def write(self, value: str) -> str:
        _writes.append(value)
        return value


_SCOPED = strawberry.Schema(query=_Query, mutation=_Mutation, extensions=[ScopeCheck])
_DOCUMENT = 'query R { ping } mutation W { write(value: "x") }'


class _Ctx:
    def __init__(self, principal: Principal | None) -> None:
        self.principal = principal


@pytest.mark.parametrize(("principal", "operation", "code"), [
    (Principal("key_1", "ro", READ_ONLY), "R", None),
    (Principal("key_1", "ro", READ_ONLY), "W", "FORBIDDEN"),
    (Principal("key_1", "rw", READ_WRITE), "W", None),
    (Principal("key_1", "w", frozenset({Scope.WRITE})), "R", "FORBIDDEN"),
    (ANONYMOUS, "R", "UNAUTHENTICATED"),
    (None, "W", None),  # an in-process caller of schema.execute is trusted
])
async def test_scope_check_runs_only_what_the_key_allows(
    principal: Principal | None, operation: str, code: str | None
) -> None:
    _writes.clear()
    result = await _SCOPED.execute(_DOCUMENT, operation_name=operation,
                                   context_value=_Ctx(principal))
    if code is None:
        assert result.errors is None
        assert _writes == (["x"] if operation == "W" else [])
    else:
        assert result.data is None
        assert [e.extensions for e in result.errors or []] == [{"code": code}]
        assert _writes == []


# -- keys --------------------------------------------------------------------------------

def test_secrets_are_long_random_and_prefixed() -> None:
    secrets_ = {generate_secret() for _ in range(1000)}
    assert len(secrets_) == 1000
    for secret in secrets_:
        assert re.fullmatch(r"sk_live_[A-Za-z0-9]{40}", secret)
    assert re.fullmatch(r"sk_test_[A-Za-z0-9]{40}", generate_secret(test=True))


async def test_only_the_peppered_hash_and_a_prefix_are_stored(app: FastAPI, api_key: str) -> None:
    async with app.state.database.read_engine.connect() as conn:
        row = (await conn.execute(select(ApiKey.__table__))).one()
    expected = hmac.new(b"test-pepper", api_key.encode(), hashlib.sha256).hexdigest()
    assert row.secret_hash == expected
    assert row.prefix == api_key[:12]
    assert all(api_key not in str(value) for value in row)


async def test_verifier_compares_in_constant_time(
    app: FastAPI, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(key_store.hmac, "compare_digest", spy)
    keys: KeyStore = app.state.keys
    principal = await keys.verify(api_key)
    assert principal is not None and principal.scopes == READ_WRITE
    digest = hash_secret(api_key, SecretStr("test-pepper"))
    assert calls == [(digest, digest)]
    # and its answer is final: the lookup alone does not let a key in (a key the cache has
    # not seen: the cache only ever holds keys the comparison accepted)
    other = (await keys.create("other")).secret.get_secret_value()
    monkeypatch.setattr(key_store.hmac, "compare_digest", lambda a, b: False)
    assert await keys.verify(other) is None


def test_secret_setting_and_created_keys_do_not_print_their_secrets() -> None:
    settings = Settings(key_pepper="pepper-value-123")  # type: ignore[arg-type]
    assert "pepper-value-123" not in repr(settings) and "pepper-value-123" not in str(settings)
    created = key_store.CreatedKey(info=None, secret=SecretStr("sk_live_" + "a" * 40))  # type: ignore[arg-type]
    assert "aaaa" not in repr(created)


async def test_first_key_is_created_once_even_by_concurrent_starts(app: FastAPI) -> None:
    database = app.state.database
    stores = [KeyStore(database.read_engine, database.write_engine, SecretStr("test-pepper"))
              for _ in range(4)]
    created = await asyncio.gather(*(store.create_first() for store in stores))
    assert sum(1 for c in created if c is not None) == 1
    assert len(await app.state.keys.list_keys()) == 1
    # and once there is a key (even a revoked one), no start makes another
    [key] = await app.state.keys.list_keys()
    await app.state.keys.revoke(key.id)
    assert await stores[0].create_first() is None


# -- lastUsedAt --------------------------------------------------------------------------

def _writes_to_api_keys(sql: StatementCounter) -> list[str]:
    return [s for s in sql.auth_statements if re.match(r"\s*UPDATE api_keys", s)]


async def test_a_thousand_requests_cost_at_most_a_handful_of_last_used_writes(
    gql: GraphQL, sql: StatementCounter, app: FastAPI
) -> None:
    with sql.counting():
        for _ in range(1000):
            await gql.data("{ __typename }")
    writes = _writes_to_api_keys(sql)
    assert 1 <= len(writes) <= 3, writes
    [key] = await app.state.keys.list_keys()
    assert key.last_used_at is not None
    print(f"\nlastUsedAt writes for 1,000 requests: {len(writes)}", file=sys.stderr)


async def test_last_used_is_written_again_after_the_interval(app: FastAPI, api_key: str) -> None:
    # given a store whose clock we move, and a shorter interval so the database agrees
    now = [1000.0]
    database = app.state.database
    keys = KeyStore(database.read_engine, database.write_engine, SecretStr("test-pepper"),
                    use_record_interval=timedelta(milliseconds=50), monotonic=lambda: now[0])
    principal = await keys.verify(api_key)
    assert principal is not None
    assert keys.use_needs_recording(principal) is True
    await keys.record_use(principal.key_id)
    first = (await keys.list_keys())[0].last_used_at
    # within the interval: not even asked
    assert keys.use_needs_recording(principal) is False
    # after it: written again
    now[0] += 1
    await asyncio.sleep(0.06)
    principal = await keys.verify(api_key)
    assert principal is not None and keys.use_needs_recording(principal) is True
    await keys.record_use(principal.key_id)
    second = (await keys.list_keys())[0].last_used_at
    assert first is not None and second is not None and second > first


async def test_another_process_does_not_write_again_within_the_interval(
    app: FastAPI, api_key: str, sql: StatementCounter
) -> None:
    # given one process that recorded a use
    database = app.state.database
    this, other = (KeyStore(database.read_engine, database.write_engine,
                            SecretStr("test-pepper")) for _ in range(2))
    principal = await this.verify(api_key)
    assert principal is not None and this.use_needs_recording(principal)
    await this.record_use(principal.key_id)
    # then a second process sees the fresh value and skips the write altogether
    seen = await other.verify(api_key)
    assert seen is not None and other.use_needs_recording(seen) is False
    # and even a forced write is a no-op in the database (the conditional UPDATE)
    before = (await this.list_keys())[0].last_used_at
    await other.record_use(principal.key_id)
    assert (await this.list_keys())[0].last_used_at == before


# -- secrets stay out of logs ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_no_secret_in_logs_of_a_failed_and_a_successful_request(
    settings: Settings, app: FastAPI, api_key: str, caplog: pytest.LogCaptureFixture,
    execution_path: str,
) -> None:
    # given a real uvicorn server (so its access and error loggers run), everything at DEBUG
    served = create_app(settings)
    on_path(served, execution_path)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(served, host="127.0.0.1", port=port,
                                           log_config=None, log_level="debug"))
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy")
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     event_hooks=AUDIT.event_hooks()) as client:
            # when a request fails (a revoked-looking unknown key) and one succeeds
            other = api_key[:-1] + ("Y" if api_key.endswith("Z") else "Z")  # a wrong key
            failed = await client.post("/graphql", json={"query": QUERY},
                                       headers=bearer(other))
            ok = await client.post("/graphql", json={"query": QUERY}, headers=bearer(api_key))
            broken = await client.post("/graphql", content=b"{not json",
                                       headers={**bearer(api_key),
                                                "content-type": "application/json"})
    finally:
        server.should_exit = True
        await task
        for name in ("uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).removeHandler(caplog.handler)
    assert (failed.status_code, ok.status_code, broken.status_code) == (401, 200, 400)
    # then the server's logs saw the requests, and neither secret nor header (the test's
    # own client, httpx, logs response headers at DEBUG: not the server's doing)
    logged = "\n".join(
        record.getMessage() + (record.exc_text or "") for record in caplog.records
        if not record.name.startswith(("httpx", "httpcore"))
    )
    assert '"POST /graphql HTTP/1.1" 401' in logged and '"POST /graphql HTTP/1.1" 200' in logged
    assert "api_keys" in logged  # the SQL log, with its parameters, was captured too
    assert api_key not in logged
    assert api_key[12:] not in logged and api_key[:-1] not in logged
    assert "Bearer" not in logged and "authorization" not in logged.lower()


def test_log_filter_masks_secrets_in_messages_arguments_and_tracebacks() -> None:
    secret = generate_secret()
    redact = RedactSecrets()
    access = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", f"/graphql?key={secret}", "1.1", 200), None)
    scope = {"headers": [(b"authorization", f"Bearer {secret}".encode())]}
    structured = logging.LogRecord("uvicorn.asgi", 5, __file__, 1, "scope=%s", (scope,), None)
    try:
        raise GraphQLError(f"bad {secret}")
    except GraphQLError:
        failure = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (),
                                    sys.exc_info())
    for record in (access, structured, failure):
        assert redact.filter(record)
        assert secret not in record.getMessage() + (record.exc_text or "")
    assert access.getMessage().endswith(f'key={secret[:12]}…[redacted] HTTP/1.1" 200')
    assert "[redacted]" in (failure.exc_text or "")
