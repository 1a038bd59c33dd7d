"""OpenTelemetry traces: request → GraphQL operation → SQL (REST: request → SQL), the same on
both execution paths and both databases, without a value a client sent, exported over
OTLP/HTTP by `serve` when OTEL_EXPORTER_OTLP_ENDPOINT is set, and nothing of OpenTelemetry's
SDK loaded when it is not."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from consumers_graphql.api import executor
from consumers_graphql.settings import Settings
from consumers_graphql.store import models
from consumers_graphql.web import otel
from consumers_graphql.web.access_log import logged_path
from consumers_graphql.web.app import create_app
from consumers_graphql.web.logs import ACCESS_FIELDS
from consumers_graphql.web.tracing import INSTALL, wanted
from tests.conftest import EXECUTION_PATHS, bearer, on_path, project_root
from tests.factories import BASE_TIME, consumer_row, insert_consumers, insert_rows, order_row
from tests.log_audit import AUDIT
from tests.processes import Served, free_port

# Personal data the tests send; none of it may reach a span.
EMAIL = "tracey.person@example.com"
PHONE = "+14155550123"
FULL_NAME = "Tracey Q. Person"
PERSONAL = (EMAIL, "tracey.person", PHONE, "4155550123", FULL_NAME, "Tracey")

LIST = """
query ConsumersWithOrders($first: Int!) {
  consumers(first: $first) { edges { node { id email orders(first: 5) { nodes { id } } } } }
}
"""
CREATE = """
mutation CreateConsumer($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id email } userErrors { field code } }
}
"""


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
async def traced_app(settings: Settings, exporter: InMemorySpanExporter
                     ) -> AsyncIterator[FastAPI]:
    """The app with tracing on, its spans in memory (the test's own provider, as a
    deployment's would be the SDK's with an OTLP exporter)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings, tracer_provider=provider)
    async with LifespanManager(app):
        yield app


@pytest.fixture
async def traced(traced_app: FastAPI, exporter: InMemorySpanExporter
                 ) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=traced_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                 event_hooks=AUDIT.event_hooks()) as client:
        exporter.clear()
        yield client


@pytest.fixture
def traced_path(traced_app: FastAPI, execution_path: str) -> Iterator[str]:
    on_path(traced_app, execution_path)
    try:
        yield execution_path
    finally:
        on_path(traced_app, "compiled")


class Trace:
    """The spans of one request."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        servers = [s for s in spans if s.kind is SpanKind.SERVER]
        assert len(servers) == 1, [s.name for s in spans]
        self.request = servers[0]
        trace_id = self.request.context.trace_id
        self.spans = [s for s in spans if s.context.trace_id == trace_id]
        assert len(self.spans) == len(spans), "spans outside the request's trace"

    def children(self, parent: ReadableSpan, kind: SpanKind | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans if s.parent is not None
                and s.parent.span_id == parent.context.span_id
                and (kind is None or s.kind is kind)]

    def named(self, name: str) -> ReadableSpan:
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, [s.name for s in self.spans]
        return found[0]

    @property
    def sql(self) -> list[ReadableSpan]:
        return [s for s in self.spans if s.kind is SpanKind.CLIENT]


def statement(span: ReadableSpan) -> str:
    return str((span.attributes or {})["db.statement"])


def everything_recorded(spans: Sequence[ReadableSpan]) -> str:
    """Every name, attribute, event, link and status of the spans, as one text."""
    recorded = []
    for span in spans:
        recorded.append(span.name)
        recorded.append(json.dumps(dict(span.attributes or {}), default=str))
        recorded.extend(json.dumps([e.name, dict(e.attributes or {})], default=str)
                        for e in span.events)
        recorded.append(str(span.status.description))
        recorded.append(json.dumps(dict(span.resource.attributes), default=str))
    return "\n".join(recorded)


def assert_nothing_personal(spans: Sequence[ReadableSpan], *secrets: str) -> None:
    recorded = everything_recorded(spans)
    for value in (*PERSONAL, *secrets):
        assert value.lower() not in recorded.lower(), (value, recorded)


async def _consumers_with_orders(write_engine: Any) -> None:
    rows = [consumer_row(n) for n in range(3)]
    await insert_consumers(write_engine, rows)
    await insert_rows(write_engine, models.Order, [order_row(rows[0]["id"], "10.00", BASE_TIME)])


async def test_a_query_is_request_then_operation_then_sql(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str, write_engine: Any, dialect: str,
) -> None:
    # given
    await _consumers_with_orders(write_engine)
    before = dict(executor.stats)
    # when
    response = await traced.post("/graphql", headers=bearer(api_key),
                                 json={"query": LIST, "variables": {"first": 10}})
    # then
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    if traced_path == "compiled":  # the extension leaves the compiled executor in charge
        assert executor.stats["compiled"] == before["compiled"] + 1
        assert executor.stats["fallbacks"] == before["fallbacks"]
    spans = Trace(exporter.get_finished_spans())
    assert spans.request.name == "POST /graphql"
    assert (spans.request.attributes or {})["http.route"] == "/graphql"
    assert (spans.request.attributes or {})["http.response.status_code"] == 200
    [operation] = spans.children(spans.request, SpanKind.INTERNAL)
    assert operation.name == "query ConsumersWithOrders"
    attributes = dict(operation.attributes or {})
    assert attributes.pop("graphql.document.sha256") == hashlib.sha256(LIST.encode()).hexdigest()
    assert attributes == {"graphql.operation.type": "query",
                          "graphql.operation.name": "ConsumersWithOrders"}
    assert operation.status.status_code is StatusCode.UNSET
    # the page and the orders' batch under the operation; the key's look-up (before it runs)
    # and lastUsedAt write (after the response) under the request; nothing else
    under_operation = [statement(s) for s in spans.children(operation, SpanKind.CLIENT)]
    assert len(under_operation) == 2, under_operation
    assert "FROM consumers" in under_operation[0] and "FROM orders" in under_operation[1]
    under_request = [statement(s) for s in spans.children(spans.request, SpanKind.CLIENT)]
    assert under_request and all("api_keys" in s or s == "BEGIN IMMEDIATE"  # SQLite's write
                                 for s in under_request), under_request
    assert len(spans.sql) == len(under_operation) + len(under_request)
    for span in spans.sql:
        assert (span.attributes or {})["db.system"] == dialect
    assert spans.request.status.status_code is StatusCode.UNSET


@pytest.mark.compares_paths
async def test_both_execution_paths_give_the_same_spans(
    traced_app: FastAPI, traced: httpx.AsyncClient, exporter: InMemorySpanExporter,
    api_key: str, write_engine: Any,
) -> None:
    await _consumers_with_orders(write_engine)
    shapes = []
    try:
        for path in EXECUTION_PATHS:
            on_path(traced_app, path)
            exporter.clear()
            response = await traced.post("/graphql", headers=bearer(api_key),
                                         json={"query": LIST, "variables": {"first": 10}})
            assert response.status_code == 200, response.text
            spans = Trace(exporter.get_finished_spans())
            [operation] = spans.children(spans.request, SpanKind.INTERNAL)
            # (the request's own statements are the key's: its lastUsedAt write is throttled)
            shapes.append((spans.request.name, _shape(spans, operation)))
    finally:
        on_path(traced_app, "compiled")
    assert shapes[0] == shapes[1]
    assert shapes[0][1][0] == "query ConsumersWithOrders" and len(shapes[0][1][-1]) == 2


def _shape(spans: Trace, span: ReadableSpan) -> Any:
    """A span and its descendants, without ids and times."""
    attributes = {k: v for k, v in (span.attributes or {}).items()
                  if k not in ("server.port", "db.statement")}
    children = sorted((_shape(spans, child) for child in spans.children(span)), key=repr)
    return (span.name, span.kind.name, sorted(attributes.items()), span.status.status_code.name,
            children)


async def test_a_mutation_is_traced_without_its_variables(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str,
) -> None:
    variables = {"input": {"email": EMAIL, "phone": PHONE, "fullName": FULL_NAME,
                           "metadata": {"note": EMAIL}}}
    created = await traced.post("/graphql", headers=bearer(api_key),
                                json={"query": CREATE, "variables": variables})
    assert created.json()["data"]["consumerCreate"]["userErrors"] == [], created.text
    spans = Trace(exporter.get_finished_spans())
    [operation] = spans.children(spans.request, SpanKind.INTERNAL)
    assert operation.name == "mutation CreateConsumer"
    assert (operation.attributes or {})["graphql.operation.type"] == "mutation"
    writes = [statement(s) for s in spans.children(operation, SpanKind.CLIENT)]
    assert any(s.lstrip().upper().startswith("INSERT INTO CONSUMERS") for s in writes), writes
    assert_nothing_personal(spans.spans, api_key)
    # the same email again: refused as data (a userError), still nothing personal
    exporter.clear()
    again = await traced.post("/graphql", headers=bearer(api_key),
                              json={"query": CREATE, "variables": variables})
    assert again.json()["data"]["consumerCreate"]["userErrors"][0]["code"] == "EMAIL_TAKEN"
    assert_nothing_personal(Trace(exporter.get_finished_spans()).spans, api_key)


async def test_a_failed_operation_carries_its_error_codes_only(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str,
) -> None:
    # a variable that does not coerce: graphql-core's message quotes the value
    bad_variables = {"input": {"email": EMAIL, "phone": PHONE, "fullName": {"x": FULL_NAME}}}
    response = await traced.post("/graphql", headers=bearer(api_key),
                                 json={"query": CREATE, "variables": bad_variables})
    assert EMAIL in response.text or FULL_NAME in response.text  # the client is told
    [operation] = [s for s in Trace(exporter.get_finished_spans()).spans
                   if s.kind is SpanKind.INTERNAL]
    assert operation.name == "mutation CreateConsumer"
    assert operation.status.status_code is StatusCode.ERROR
    assert operation.status.description == "BAD_USER_INPUT"
    assert (operation.attributes or {})["graphql.error.codes"] == ("BAD_USER_INPUT",)
    assert_nothing_personal(exporter.get_finished_spans(), api_key)
    # a document that does not parse, with a literal in it: no name, no type, the code
    exporter.clear()
    await traced.post("/graphql", headers=bearer(api_key),
                      json={"query": f'{{ consumers(search: "{EMAIL}") {{ '})
    [operation] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.INTERNAL]
    assert operation.name == "GraphQL Operation"
    assert operation.status.description == "GRAPHQL_PARSE_FAILED"
    assert_nothing_personal(exporter.get_finished_spans(), api_key)


async def test_a_get_keeps_its_query_string_out_of_the_span(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str,
) -> None:
    query = f'query Find {{ consumers(search: "{EMAIL}") {{ edges {{ node {{ id }} }} }} }}'
    response = await traced.get("/graphql", headers=bearer(api_key), params={
        "query": query, "variables": json.dumps({"email": EMAIL})})
    assert response.status_code == 200, response.text
    spans = Trace(exporter.get_finished_spans())
    assert spans.request.name == "GET /graphql"
    assert (spans.request.attributes or {})["url.query"] == "query=REDACTED&variables=REDACTED"
    assert spans.named("query Find").parent is not None
    assert_nothing_personal(spans.spans, api_key)


async def test_rest_is_request_then_sql(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter, auth_headers: dict[str, str],
    api_key: str,
) -> None:
    created = await traced.post("/api/v1/consumers", headers=auth_headers,
                                json={"email": EMAIL, "phone": PHONE, "fullName": FULL_NAME})
    assert created.status_code == 201, created.text
    spans = Trace(exporter.get_finished_spans())
    assert spans.request.name == "POST /api/v1/consumers"
    assert not [s for s in spans.spans if s.kind is SpanKind.INTERNAL]  # no operation span
    statements = [statement(s) for s in spans.children(spans.request, SpanKind.CLIENT)]
    assert any(s.lstrip().upper().startswith("INSERT INTO CONSUMERS") for s in statements)
    assert len(statements) == len(spans.sql)
    assert_nothing_personal(spans.spans, api_key)

    exporter.clear()
    consumer_id = created.json()["id"]
    found = await traced.get("/api/v1/consumers/search", headers=auth_headers,
                             params={"email": EMAIL, "first": 5})
    assert found.json()["data"][0]["id"] == consumer_id
    spans = Trace(exporter.get_finished_spans())
    assert spans.request.name == "GET /api/v1/consumers/search"
    assert (spans.request.attributes or {})["url.query"] == "email=REDACTED&first=REDACTED"
    assert any("FROM consumers" in statement(s) for s in spans.children(spans.request))
    assert_nothing_personal(spans.spans, api_key)

    exporter.clear()
    fetched = await traced.get(f"/api/v1/consumers/{consumer_id}", headers=auth_headers)
    assert fetched.status_code == 200
    # the route's template names the span, not the id
    assert Trace(exporter.get_finished_spans()).request.name == \
        "GET /api/v1/consumers/{consumer_id}"


def _access_paths(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(record, ACCESS_FIELDS)["path"] for record in caplog.records
            if record.name == "consumers_graphql.access"]


async def test_a_path_with_personal_data_or_a_secret_reaches_no_span(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # The request span's url.path is the access line's path: the route's template where one
    # matched (an id of any shape), masked where none did (a mount's static files too); the
    # span is named by the template, or the method alone.
    caplog.set_level(logging.INFO, logger="consumers_graphql.access")
    secret_tail = api_key.split("_")[-1]
    consumer = "/api/v1/consumers/{consumer_id}"
    paths: dict[str, tuple[str | None, str | None]] = {  # path: template logged, route
        f"/api/v1/consumers/{EMAIL}": (consumer, consumer),
        f"/api/v1/consumers/{api_key}": (consumer, consumer),
        f"/api/v1/consumers/{PHONE}?email={EMAIL}": (consumer, consumer),
        f"/graphiql/assets/{EMAIL}/{api_key}": (None, None),
        f"/api/v1/nope/{EMAIL}/{api_key}": (None, None),
        f"/api/v1/consumers/{EMAIL}/{PHONE}": (None, None),
        f"/{PHONE}/{api_key}": (None, None),
        f"/api/v1/{EMAIL}": (None, None),
    }
    for path, (template, route) in paths.items():
        exporter.clear()
        caplog.clear()
        response = await traced.get(path, headers=bearer(api_key))
        assert response.status_code in (400, 404), (path, response.status_code)
        spans = Trace(exporter.get_finished_spans())
        attributes = spans.request.attributes or {}
        [logged] = _access_paths(caplog)
        assert attributes["url.path"] == logged, path
        if template is not None:
            assert logged == template
        assert spans.request.name == ("GET" if route is None else f"GET {route}")
        assert attributes.get("http.route") == route
        assert_nothing_personal(spans.spans, api_key, secret_tail)
    # a GraphQL request, on this execution path: its span's path is the route's too
    exporter.clear()
    caplog.clear()
    response = await traced.post("/graphql", headers=bearer(api_key), json={
        "query": "query Find($email: String) { consumers(search: $email) { totalCount } }",
        "variables": {"email": EMAIL}})
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    spans = Trace(exporter.get_finished_spans())
    assert (spans.request.attributes or {})["url.path"] == "/graphql" == \
        _access_paths(caplog)[0]
    assert_nothing_personal(spans.spans, api_key, secret_tail)


def test_other_instrumentations_urls_are_masked_as_their_spans_start(
    settings: Settings, api_key: str,
) -> None:
    # An HTTP client's or another server instrumentation's span: the path in its name, the
    # whole URL in url.full / http.url (with a user and password), path?query in http.target.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    create_app(settings, tracer_provider=provider)  # adds its processor to the provider
    target = f"/api/v1/nope/{EMAIL}/{api_key}?email={EMAIL}#{PHONE}"
    tracer = provider.get_tracer("another.instrumentation")
    tracer.start_span(f"GET {target}", kind=SpanKind.CLIENT, attributes={
        "http.method": "GET", "http.target": target,
        "http.url": f"https://{EMAIL}:{api_key}@example.org:8443{target}",
        "url.full": f"http://user:pw@127.0.0.1{target}",
    }).end()
    tracer.start_span(target, kind=SpanKind.SERVER, attributes={"url.path": target}).end()
    tracer.start_span("SELECT /tmp/12345678/test.db", kind=SpanKind.CLIENT,
                      attributes={"db.system": "sqlite"}).end()
    client, server, sql = exporter.get_finished_spans()
    # the path as the access line has it (whatever its masking: nothing personal, below)
    masked_target = logged_path({"type": "http", "path": f"/api/v1/nope/{EMAIL}/{api_key}"})
    assert client.name == f"GET {masked_target}?email=REDACTED"
    assert dict(client.attributes or {}) == {
        "http.method": "GET", "http.target": f"{masked_target}?email=REDACTED",
        "http.url": f"https://example.org:8443{masked_target}?email=REDACTED",
        "url.full": f"http://127.0.0.1{masked_target}?email=REDACTED",
    }
    assert server.name == f"{masked_target}?email=REDACTED"
    assert_nothing_personal([client, server], api_key, api_key.split("_")[-1], "user:pw")
    assert sql.name == "SELECT /tmp/12345678/test.db"  # not a request's span: as it was


_IMPORTS_NOTHING = textwrap.dedent("""
    import asyncio, json, sys
    import httpx
    from asgi_lifespan import LifespanManager
    from consumers_graphql.settings import Settings
    from consumers_graphql.web.app import create_app

    async def main():
        settings = Settings(database_url=sys.argv[1], key_pepper="test-pepper")
        app = create_app(settings)
        app.state.schema.compiled = sys.argv[2] == "compiled"
        async with LifespanManager(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                headers = {"Authorization": "Bearer " + sys.argv[3]}
                graphql = await client.post("/graphql", headers=headers,
                                            json={"query": "{ consumers { totalCount } }"})
                rest = await client.get("/api/v1/consumers", headers=headers)
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        on = create_app(settings.model_copy(
            update={"otel_exporter_otlp_endpoint": "http://127.0.0.1:9"}))
        loaded_on = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        print(json.dumps({"status": [graphql.status_code, rest.status_code], "off": loaded,
                          "on": loaded_on}))

    asyncio.run(main())
""")


def test_without_the_variable_nothing_of_opentelemetry_is_loaded(
    settings: Settings, api_key: str, execution_path: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run(
        [sys.executable, "-c", _IMPORTS_NOTHING, settings.database_url, execution_path, api_key],
        capture_output=True, text=True, env=env, cwd=project_root(), timeout=120,
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["status"] == [200, 200]
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation")
    # FastAPI imports opentelemetry-api itself (its built-in telemetry, switched off here);
    # the SDK, the exporter and the instrumentation only come with tracing
    assert not [m for m in found["off"] if m.startswith(heavy)], found["off"]
    assert [m for m in found["on"] if m.startswith(heavy)]  # the control: on, they load


class _Receiver(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector's traces endpoint: records what is posted to /v1/traces."""

    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.server.received.append(request)  # type: ignore[attr-defined]
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    received: list[ExportTraceServiceRequest] = []
    server.received = received  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_serve_exports_to_the_otlp_endpoint(
    tmp_path: Path, collector: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    endpoint, received = collector
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'traced.db'}", tmp_path, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        served.wait_until_up()
        secret = served.secret()
        response = served.post("/graphql", headers=bearer(secret), json={
            "query": "query Count { consumers { totalCount } }"})
        assert response.status_code == 200, response.text
        # personal data and a secret in a path no route matches, and in one that does
        for path in (f"/api/v1/nope/{EMAIL}/{secret}", f"/api/v1/consumers/{EMAIL}"):
            assert served.get(path, headers=bearer(secret)).status_code == 404
        deadline = time.monotonic() + 30
        while not _span_names(received) >= {"POST /graphql", "query Count", "GET",
                                            "GET /api/v1/consumers/{consumer_id}"}:
            assert time.monotonic() < deadline, (_span_names(received), served.output)
            time.sleep(0.1)
    finally:
        assert served.stop() == 0, served.output
    resource = {a.key: a.value.string_value
                for export in received for spans in export.resource_spans
                for a in spans.resource.attributes}
    assert resource["service.name"] == "consumers-graphql"
    assert resource["service.version"] and len(resource["service.instance.id"]) == 36
    names = _span_names(received)
    assert any(name.startswith("SELECT") for name in names), names
    exported = "\n".join(str(export) for export in received)  # every name and attribute
    for value in (*PERSONAL, secret, secret.split("_")[-1]):
        assert value.lower() not in exported.lower(), value


def _span_names(received: list[ExportTraceServiceRequest]) -> set[str]:
    return {span.name for export in list(received) for resource in export.resource_spans
            for scope in resource.scope_spans for span in scope.spans}


@pytest.mark.parametrize(("env", "named"), [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL=grpc"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER=console"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT is not"),
    ({"PYTHONPATH": "{shadow}"}, INSTALL),
])
def test_tracing_that_cannot_run_is_a_configuration_error(
    tmp_path: Path, env: dict[str, str], named: str,
) -> None:
    # An `opentelemetry.sdk` that fails to import stands for the extra not installed
    # (opentelemetry is a namespace package: this portion comes first on the path).
    shadow = tmp_path / "shadow"
    (shadow / "opentelemetry" / "sdk").mkdir(parents=True)
    (shadow / "opentelemetry" / "sdk" / "__init__.py").write_text(
        "raise ImportError('opentelemetry-sdk is not installed')\n")
    environment = {k: v.format(shadow=shadow) for k, v in env.items()}
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'never.db'}", tmp_path, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **environment})
    assert served.process.wait(timeout=60) == 2
    served.stop()
    lines = served.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], served.output
    assert not (tmp_path / "never.db").exists()  # refused before anything started


async def test_a_failed_statement_is_described_by_its_error_type_only(
    traced_app: FastAPI, exporter: InMemorySpanExporter, dialect: str,
) -> None:
    # Both drivers quote the parameter in their message; neither message reaches the span.
    failing = {"sqlite": "SELECT json_extract('{}', :value)",
               "postgresql": "SELECT CAST(:value AS integer)"}[dialect]
    exporter.clear()
    with pytest.raises(DBAPIError) as raised:
        async with traced_app.state.database.write_engine.connect() as conn:
            await conn.execute(text(failing), {"value": EMAIL})
    assert EMAIL in str(raised.value.orig)  # what the span would have said
    [span] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT
              and statement(s) == failing.replace(":value", "?" if dialect == "sqlite" else "$1")]
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == type(raised.value.orig).__name__
    assert str((span.attributes or {})["error.type"]).endswith(type(raised.value.orig).__name__)
    assert_nothing_personal(exporter.get_finished_spans())


async def test_an_anonymous_operation_is_named_by_its_type(
    traced: httpx.AsyncClient, traced_path: str, exporter: InMemorySpanExporter,
    api_key: str,
) -> None:
    response = await traced.post("/graphql", headers=bearer(api_key),
                                 json={"query": "{ consumers { totalCount } }"})
    assert response.status_code == 200, response.text
    [operation] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.INTERNAL]
    assert operation.name == "query"
    assert "graphql.operation.name" not in (operation.attributes or {})


@pytest.mark.parametrize(("variables", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "TRUE"},
     False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
     False),
])
def test_the_standard_variables_turn_tracing_on_and_off(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], on: bool,
) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert wanted(Settings()) is on


async def test_probes_are_not_traced(
    traced: httpx.AsyncClient, exporter: InMemorySpanExporter,
) -> None:
    response = await traced.get("/healthz")
    assert response.status_code == 200
    # neither the request nor its SELECT 1 (which would start a trace of its own)
    assert exporter.get_finished_spans() == ()
    await traced.get("/api/v1/consumers")  # the control: a 401, traced
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /api/v1/consumers"]


async def test_headers_stay_out_even_when_the_variables_ask_for_them(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, api_key: str, execution_path: str,
) -> None:
    # OpenTelemetry's instrumentations capture the headers these name; FastAPI's must not,
    # and the Authorization header (the key) and cookies never reach a span.
    for variable in ("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
                     "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE"):
        monkeypatch.setenv(variable, ".*")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(settings, tracer_provider=provider)
    on_path(app, execution_path)
    async with LifespanManager(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver",
            event_hooks=AUDIT.event_hooks()) as client:
        response = await client.post(
            "/graphql", json={"query": "{ consumers { totalCount } }"},
            headers={**bearer(api_key), "Cookie": f"session={EMAIL}", "X-Email": EMAIL})
    assert response.status_code == 200, response.text
    spans = exporter.get_finished_spans()
    assert len(spans) >= 3  # request, operation, SQL
    assert_nothing_personal(spans, api_key, api_key.split("_")[-1])


@pytest.mark.parametrize(("variables", "name", "instance"), [
    ({}, "consumers-graphql", None),
    ({"OTEL_SERVICE_NAME": "consumers-eu"}, "consumers-eu", None),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=api,service.instance.id=pod-7"}, "api",
     "pod-7"),
])
def test_the_service_is_named_by_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], name: str,
    instance: str | None,
) -> None:
    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    attributes = otel.resource().attributes
    assert attributes["service.name"] == name
    assert attributes["service.instance.id"] == instance or (
        instance is None and len(str(attributes["service.instance.id"])) == 36)
