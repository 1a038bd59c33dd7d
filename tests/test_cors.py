"""CORS for browser apps (web/cors.py; README "CORS"), over HTTP: preflights answered before
any key or database work, the headers a page needs on every answer (its errors included,
whoever answered them), nothing for an origin not on the list, nothing at all by default,
and CONSUMERS_CORS_ORIGINS checked at startup.

Every test here runs against an app with CORS on: the module's `app` and `client` stand in
for conftest's, so `gql`, `api_key` and `sql` use it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider

from consumers_graphql.settings import Settings
from consumers_graphql.web.app import create_app
from tests import test_ui_browser
from tests.conftest import GraphQL, StatementCounter, bearer, on_path
from tests.log_audit import asgi_client
from tests.processes import Served, http_server
from tests.test_configuration import assert_refused, run
from tests.test_rate_limits import new_key
from tests.test_unhappy_execution import consumers_locked

ORIGIN = "https://app.example.com"
LOCAL_ORIGIN = "http://localhost:5173"
EVIL_ORIGIN = "https://evil.example"
REST = "/api/v1/consumers"
COUNT = "{ consumers(first: 5) { totalCount } }"
CREATE = """mutation ($email: String!) {
  consumerCreate(input: {email: $email}) { consumer { email } userErrors { message } }
}"""
EXPOSED = {"x-request-id", "ratelimit", "ratelimit-policy", "retry-after",
           "idempotent-replayed", "location", "www-authenticate"}


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """conftest's app, with two origins allowed."""
    cors_app = create_app(settings.model_copy(update={"cors_origins": (ORIGIN, LOCAL_ORIGIN)}))
    async with LifespanManager(cors_app):
        yield cors_app


@pytest.fixture(scope="module")
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as cors_client:
        yield cors_client


def preflight_headers(origin: str, method: str = "POST",
                      headers: str = "authorization, content-type") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


def tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def assert_cors(response: httpx.Response, origin: str = ORIGIN) -> None:
    """What a page of `origin` needs to read `response`: its origin allowed, the headers it
    may read, and Vary: Origin for any cache on the way."""
    assert response.headers.get("access-control-allow-origin") == origin, response.headers
    assert tokens(response.headers["access-control-expose-headers"]) == EXPOSED
    assert "origin" in tokens(response.headers["vary"])
    assert "access-control-allow-credentials" not in response.headers  # keys, not cookies


def assert_no_cors(response: httpx.Response) -> None:
    assert not [name for name in response.headers if name.startswith("access-control-")], (
        response.headers)


# --- preflights -------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "method", "headers"), [
    ("/graphql", "POST", "content-type, authorization"),
    ("/graphql", "GET", "Authorization"),
    (REST, "POST", "authorization,content-type,idempotency-key,x-request-id"),
    (f"{REST}/cons_01J0000000000000000000000", "PUT", "authorization, content-type"),
    (f"{REST}/cons_01J0000000000000000000000", "DELETE", "authorization"),
    # a page's trace context (OpenTelemetry's fetch instrumentation)
    ("/graphql", "POST", "content-type, traceparent, tracestate, baggage"),
    # what Apollo's clients send when set up for client awareness, or by default (Kotlin)
    ("/graphql", "POST", "content-type, apollographql-client-name, apollographql-client-version"),
    ("/graphql", "GET", "X-APOLLO-OPERATION-ID, X-APOLLO-OPERATION-NAME, apollo-require-preflight"),
])
async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key_or_any_work(
    client: httpx.AsyncClient, sql: StatementCounter, path: str, method: str, headers: str
) -> None:
    with sql.counting():
        response = await client.options(path, headers=preflight_headers(ORIGIN, method, headers))

    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert tokens(response.headers["access-control-allow-methods"]) == {
        "get", "post", "put", "delete", "options"}
    assert {"authorization", "content-type", "idempotency-key", "x-request-id"} <= tokens(
        response.headers["access-control-allow-headers"])
    assert response.headers["access-control-max-age"] == "7200"
    assert "origin" in tokens(response.headers["vary"])
    assert response.headers["x-content-type-options"] == "nosniff"  # like every answer
    # no key asked for, no key looked up, nothing read
    assert sql.statements == [] and sql.auth_statements == []


async def test_each_listed_origin_is_allowed_as_itself(client: httpx.AsyncClient) -> None:
    response = await client.options("/graphql", headers=preflight_headers(LOCAL_ORIGIN))
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == LOCAL_ORIGIN


@pytest.mark.parametrize(("headers", "refused"), [
    (preflight_headers(EVIL_ORIGIN), "origin"),
    # not on the list as the browser sends it: another scheme, another port, a subdomain
    (preflight_headers("http://app.example.com"), "origin"),
    (preflight_headers("https://app.example.com:8443"), "origin"),
    (preflight_headers("https://www.app.example.com"), "origin"),
    (preflight_headers("null"), "origin"),  # a sandboxed page, a file
    (preflight_headers(ORIGIN, method="PATCH"), "method"),
    (preflight_headers(ORIGIN, headers="authorization, x-api-key"), "headers"),
])
async def test_a_preflight_the_list_does_not_allow_is_400_without_allow_origin(
    client: httpx.AsyncClient, sql: StatementCounter, headers: dict[str, str], refused: str
) -> None:
    with sql.counting():
        response = await client.options("/graphql", headers=headers)

    assert response.status_code == 400
    assert response.text == f"Disallowed CORS {refused}"
    if refused == "origin":
        assert "access-control-allow-origin" not in response.headers
    assert sql.statements == [] and sql.auth_statements == []


# --- answers to an allowed origin ----------------------------------------------------------------


async def test_a_graphql_post_from_an_allowed_origin_can_be_read_by_its_page(
    gql: GraphQL, client: httpx.AsyncClient
) -> None:
    response = await client.post("/graphql", json={"query": COUNT},
                                 headers={**gql.headers, "Origin": ORIGIN})

    assert response.status_code == 200, response.text
    assert response.json()["data"] == {"consumers": {"totalCount": 0}}
    assert_cors(response)
    assert response.headers["x-request-id"].startswith("req_")


async def test_a_graphql_get_and_a_mutation_with_an_idempotency_key_from_an_allowed_origin(
    gql: GraphQL, client: httpx.AsyncClient
) -> None:
    got = await client.get("/graphql", params={"query": COUNT},
                           headers={**gql.headers, "Origin": LOCAL_ORIGIN})
    assert got.status_code == 200, got.text
    assert_cors(got, LOCAL_ORIGIN)

    headers = {**gql.headers, "Origin": ORIGIN, "Idempotency-Key": "cors-create-1"}
    body = {"query": CREATE, "variables": {"email": "cors@example.com"}}
    first = await client.post("/graphql", json=body, headers=headers)
    replayed = await client.post("/graphql", json=body, headers=headers)
    assert first.json()["data"]["consumerCreate"]["consumer"] == {"email": "cors@example.com"}
    assert replayed.content == first.content
    assert replayed.headers["idempotent-replayed"] == "true"
    assert_cors(first)
    assert_cors(replayed)


async def test_rest_answers_to_an_allowed_origin_expose_their_headers(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    headers = {**auth_headers, "Origin": ORIGIN}
    listed = await client.get(REST, headers=headers)
    assert listed.status_code == 200, listed.text
    assert_cors(listed)
    assert listed.headers["ratelimit"] and listed.headers["ratelimit-policy"]

    created = await client.post(REST, json={"email": "rest.cors@example.com"},
                                headers={**headers, "Idempotency-Key": "cors-rest-1"})
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"{REST}/{created.json()['id']}"
    assert_cors(created)


async def test_a_cacheable_get_by_hash_says_vary_once_with_origin_among_its_own(
    settings: Settings, api_key: str, execution_path: str
) -> None:
    """A GET of a persisted document kept privately (CONSUMERS_PERSISTED_QUERY_MAX_AGE_S)
    varies on Accept and Authorization, and CORS adds Origin: one Vary field holding the
    three (two Vary lines are one list to HTTP, but caches and proxies that read the first
    only would serve a page another origin's copy)."""
    cached = create_app(settings.model_copy(update={"cors_origins": (ORIGIN,),
                                                    "persisted_query_max_age_s": 60}))
    async with LifespanManager(cached), asgi_client(cached) as client:
        on_path(cached, execution_path)
        headers = {**bearer(api_key), "Origin": ORIGIN}
        sha = hashlib.sha256(COUNT.encode()).hexdigest()
        persisted = {"persistedQuery": {"version": 1, "sha256Hash": sha}}
        extensions = json.dumps(persisted)
        registered = await client.post("/graphql", headers=headers, json={
            "query": COUNT, "extensions": persisted})
        assert registered.status_code == 200, registered.text
        got = await client.get("/graphql", params={"extensions": extensions}, headers=headers)
        assert got.status_code == 200 and "errors" not in got.json(), got.text
        assert got.headers["cache-control"] == "private, max-age=60"
        assert_cors(got)
        varies = got.headers.get_list("vary")
        assert len(varies) == 1, varies
        assert tokens(varies[0]) == {"accept", "authorization", "origin"}
        events = await client.get("/api/v1/events", headers=headers)
        assert events.status_code == 200, events.text
        assert_cors(events)
        assert len(events.headers.get_list("vary")) == 1


# --- errors: a page must be able to read them too -----------------------------------------------


async def test_401_carries_the_cors_headers_on_both_faces(
    client: httpx.AsyncClient, sql: StatementCounter
) -> None:
    graphql = await client.post("/graphql", json={"query": COUNT}, headers={"Origin": ORIGIN})
    rest = await client.get(REST, headers={"Origin": ORIGIN, **bearer("sk_live_unknown")})

    for response in (graphql, rest):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert_cors(response)


@pytest.mark.usefixtures("execution_path")
async def test_429_carries_the_cors_headers_and_its_retry_after_can_be_read(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    secret = await new_key(app, 30, 0.01)  # 20 points, then 10 left
    headers = {**bearer(secret), "Origin": ORIGIN}
    operation = {"query": "{ consumers(first: 20) { totalCount } }"}
    assert (await client.post("/graphql", json=operation, headers=headers)).status_code == 200
    graphql = await client.post("/graphql", json=operation, headers=headers)
    rest = await client.get(f"{REST}?first=20", headers=headers)

    for response in (graphql, rest):
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) > 0
        assert_cors(response)
    assert graphql.json()["errors"][0]["extensions"]["code"] == "THROTTLED"


async def test_413_from_the_protocol_guard_carries_the_cors_headers(
    client: httpx.AsyncClient, auth_headers: dict[str, str], settings: Settings
) -> None:
    response = await client.post(
        "/graphql", content=b'{"query": "' + b" " * settings.max_body_bytes + b'"}',
        headers={**auth_headers, "Origin": ORIGIN, "Content-Type": "application/json"})

    assert response.status_code == 413
    assert_cors(response)


@pytest.mark.cancels_statements
async def test_504_past_the_deadline_carries_the_cors_headers_on_both_faces(
    settings: Settings, execution_path: str
) -> None:
    hurried = create_app(settings.model_copy(update={
        "cors_origins": (ORIGIN,), "request_timeout_s": 1.0, "sqlite_busy_timeout_ms": 2_000}))
    on_path(hurried, execution_path)
    async with LifespanManager(hurried), asgi_client(hurried) as client:
        secret = await new_key(hurried, 1_000, 1_000.0)
        headers = {**bearer(secret), "Origin": ORIGIN}
        async with consumers_locked(settings), asyncio.timeout(10):
            graphql = await client.post("/graphql", headers=headers, json={
                "query": CREATE, "variables": {"email": "late@example.com"}})
            rest = await client.post(REST, headers=headers, json={"email": "late@example.com"})

    for response in (graphql, rest):
        assert response.status_code == 504, response.text
        assert_cors(response)


async def test_503_with_the_database_out_of_reach_carries_the_cors_headers(
    settings: Settings, execution_path: str
) -> None:
    # nothing listens on port 1: the key cannot even be looked up
    down = create_app(settings.model_copy(update={
        "cors_origins": (ORIGIN,), "database_url": "postgresql+asyncpg://app@127.0.0.1:1/x",
        "database_replica_url": None}))
    on_path(down, execution_path)
    async with LifespanManager(down), asgi_client(down) as client:
        headers = {**bearer("sk_live_" + "A" * 40), "Origin": ORIGIN}  # well-formed
        graphql = await client.post("/graphql", json={"query": COUNT}, headers=headers)
        rest = await client.get(REST, headers=headers)

    for response in (graphql, rest):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(settings.retry_after_s)
        assert_cors(response)


async def test_with_tracing_on_graphql_goes_the_long_way_with_the_same_cors(
    settings: Settings
) -> None:
    traced = create_app(settings.model_copy(update={"cors_origins": (ORIGIN,)}),
                        tracer_provider=TracerProvider())
    async with LifespanManager(traced), asgi_client(traced) as client:
        preflight = await client.options("/graphql", headers=preflight_headers(ORIGIN))
        refused = await client.post("/graphql", json={"query": COUNT},
                                    headers={"Origin": ORIGIN})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert refused.status_code == 401
    assert_cors(refused)


# --- origins not allowed, paths CORS is not for ----------------------------------------------


async def test_a_request_from_an_origin_not_allowed_is_served_but_its_page_cannot_read_it(
    gql: GraphQL, client: httpx.AsyncClient
) -> None:
    response = await client.post("/graphql", json={"query": COUNT},
                                 headers={**gql.headers, "Origin": EVIL_ORIGIN})

    assert response.status_code == 200
    assert response.json()["data"] == {"consumers": {"totalCount": 0}}
    assert_no_cors(response)
    assert "origin" in tokens(response.headers["vary"])


async def test_an_answer_to_a_request_without_origin_still_varies_on_it(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    """A cache must not give a copy made for a server (no Origin) to a page."""
    response = await client.get(REST, headers=auth_headers)
    assert response.status_code == 200
    assert_no_cors(response)
    assert "origin" in tokens(response.headers["vary"])


@pytest.mark.parametrize("path", ["/metrics", "/livez", "/readyz"])
async def test_metrics_and_probes_are_not_for_browser_apps(
    client: httpx.AsyncClient, path: str
) -> None:
    preflight = await client.options(path, headers=preflight_headers(ORIGIN, "GET", ""))
    response = await client.get(path, headers={"Origin": ORIGIN})

    assert preflight.status_code == 405
    assert response.status_code == 200
    for answer in (preflight, response):
        assert_no_cors(answer)
        assert "vary" not in answer.headers


# --- `*`, and CORS off ---------------------------------------------------------------------------


async def test_any_origin_with_a_star(
    settings: Settings, api_key: str, execution_path: str
) -> None:
    anyone = create_app(settings.model_copy(update={"cors_origins": ("*",)}))
    on_path(anyone, execution_path)
    async with LifespanManager(anyone), asgi_client(anyone) as client:
        preflight = await client.options(REST, headers=preflight_headers(EVIL_ORIGIN))
        response = await client.post("/graphql", json={"query": COUNT},
                                     headers={**bearer(api_key), "Origin": EVIL_ORIGIN})

    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert response.status_code == 200, response.text
    assert_cors(response, "*")


async def test_by_default_no_cors_at_all(
    settings: Settings, api_key: str, execution_path: str
) -> None:
    assert Settings().cors_origins == ()
    plain = create_app(settings)
    on_path(plain, execution_path)
    async with LifespanManager(plain), asgi_client(plain) as client:
        graphql_preflight = await client.options("/graphql", headers=preflight_headers(ORIGIN))
        rest_preflight = await client.options(REST, headers=preflight_headers(ORIGIN))
        response = await client.post("/graphql", json={"query": COUNT},
                                     headers={**bearer(api_key), "Origin": ORIGIN})

    # the preflight is an OPTIONS request like any other: /graphql and the REST routes
    # take none
    assert graphql_preflight.status_code == rest_preflight.status_code == 405
    assert response.status_code == 200, response.text
    for answer in (graphql_preflight, rest_preflight, response):
        assert_no_cors(answer)
        assert "origin" not in tokens(answer.headers.get("vary", ""))


# --- the setting ---------------------------------------------------------------------------------


def test_origins_are_kept_as_browsers_send_them() -> None:
    settings = Settings(cors_origins=(  # type: ignore[arg-type]
        " https://App.Example.com:443, http://localhost:5173,http://[::1]:8080 ,"
        "http://localhost:5173"))
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:5173",
                                     "http://[::1]:8080")
    # IPv6 as the URL standard writes it: lower-case hex pieces, the longest zero run as ::
    assert Settings(cors_origins=(  # type: ignore[arg-type]
        "http://[0:0::1]:8080,http://[2001:DB8:0:0:1:0:0:1],http://[::FFFF:1.2.3.4]")
    ).cors_origins == ("http://[::1]:8080", "http://[2001:db8::1:0:0:1]",
                       "http://[::ffff:102:304]")
    assert Settings(cors_origins="").cors_origins == ()  # type: ignore[arg-type]
    assert Settings(cors_origins="*").cors_origins == ("*",)  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "why"), [
    ("https://app.example.com/", "no path, not even a trailing slash"),
    ("https://app.example.com/app", "no path"),
    ("app.example.com", "http:// or https:// and a host"),
    ("null", "http:// or https:// and a host"),
    ("ftp://app.example.com", "http:// or https:// and a host"),
    ("https://*.example.com", "wildcard hosts are not supported"),
    ("https://app.example.com,*", "`*` allows every origin: write it alone"),
    ("https://app.example.com,,http://localhost:5173", "an empty entry"),
    ("https://app.example.com:99999", "the port must be a number from 1 to 65535"),
    ("https://user:pw@app.example.com", "no user or password"),
    ("https://bücher.example", "ASCII (punycode, xn--) form"),
    # hosts no browser sends: a space-separated list, a backslash, an escape, a bad IPv6
    ("https://app.example.com https://admin.example.com", "origins are separated by commas"),
    ("https://app.example.com\\admin", "a host holds only letters, digits"),
    ("https://%61pp.example.com", "a host holds only letters, digits"),
    ("http://[::1", "the host is not an IPv6 address"),
    ("http://[fe80::1%25eth0]:8080", "the host is not an IPv6 address (without a zone)"),
])
def test_a_value_that_is_not_an_origin_is_refused_at_startup(
    value: str, why: str, tmp_path: Path
) -> None:
    message = assert_refused(run("serve", env={"CONSUMERS_CORS_ORIGINS": value}, cwd=tmp_path),
                             "CONSUMERS_CORS_ORIGINS")
    assert why in message
    assert "Configuration error" in message


# --- a real browser --------------------------------------------------------------------------

# A page's fetches, as an app's code makes them; what the page can read of each answer, or
# the error the browser gives it instead.
PAGE_FETCHES = """async ([api, key, query]) => {
  const read = async (path, init) => {
    try {
      const res = await fetch(api + path, init);
      return {status: res.status, body: await res.json(),
              requestId: res.headers.get("X-Request-ID"), rateLimit: res.headers.get("RateLimit"),
              authenticate: res.headers.get("WWW-Authenticate")};
    } catch (error) {
      return {blocked: String(error)};
    }
  };
  const auth = {Authorization: `Bearer ${key}`};
  return {
    graphql: await read("/graphql", {method: "POST", body: JSON.stringify({query}), headers: {
      ...auth, "Content-Type": "application/json", "apollographql-client-name": "web"}}),
    rest: await read("/api/v1/consumers?first=3", {headers: {...auth, "X-Request-ID": "page-1"}}),
    unauthenticated: await read("/api/v1/consumers", {}),
  };
}"""


chromium = test_ui_browser.chromium  # the fixture: Chromium's path, or a skip


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>app</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # not the server's log


def page_server() -> AbstractContextManager[str]:
    """An app's page, served from an origin of its own (another port)."""
    return http_server(_Page)


async def test_a_browser_page_of_a_listed_origin_reads_the_answers_and_another_cannot(
    chromium: Path, tmp_path: Path
) -> None:
    """Chromium's own CORS: its preflights, what it lets the page read. The server runs its
    default execution path (a subprocess): the operations run on both paths above."""
    from playwright.async_api import async_playwright

    with page_server() as app_origin, page_server() as other_origin:
        served = Served(f"sqlite+aiosqlite:///{tmp_path / 'cors.db'}", tmp_path,
                        env={"CONSUMERS_CORS_ORIGINS": app_origin})
        try:
            served.wait_until_up()
            secret = served.secret()
            async with async_playwright() as playwright:
                launched = await playwright.chromium.launch(
                    executable_path=str(chromium),
                    args=["--no-sandbox", "--disable-dev-shm-usage"])
                try:
                    page = await launched.new_page()
                    await page.goto(app_origin)
                    allowed = await page.evaluate(PAGE_FETCHES, [served.url, secret, COUNT])
                    await page.goto(other_origin)
                    refused = await page.evaluate(PAGE_FETCHES, [served.url, secret, COUNT])
                finally:
                    await launched.close()
        finally:
            assert served.stop() == 0, served.output

    graphql, rest, unauthenticated = (allowed[k] for k in ("graphql", "rest", "unauthenticated"))
    assert (graphql["status"], graphql["body"]["data"]) == (200, {"consumers": {"totalCount": 0}})
    assert graphql["requestId"].startswith("req_")
    assert rest["status"] == 200 and rest["body"]["data"] == []
    assert rest["requestId"] == "page-1"  # sent by the page (allowed), read back (exposed)
    assert rest["rateLimit"].startswith('"default";r=')
    assert unauthenticated["status"] == 401 and unauthenticated["authenticate"] == "Bearer"
    # the other origin's page gets nothing: the browser refuses every answer
    assert all("blocked" in refused[k] for k in ("graphql", "rest", "unauthenticated")), refused
    # and its requests that needed a preflight were never sent: only the preflights were
    requests = re.findall(r'"(\w+) (/[^ ]*) HTTP/1.1" (\d+)', served.output)
    assert [r for r in requests if r[0] == "POST"] == [("POST", "/graphql", "200")]
    assert ("OPTIONS", "/graphql", "400") in requests
