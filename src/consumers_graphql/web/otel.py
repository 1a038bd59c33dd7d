"""Tracing with OpenTelemetry's SDK (the ``[otel]`` extra); imported by web/tracing.py only
when tracing is on.

Per process: the tracer provider is made with the app, its exporter (a batch span
processor and its thread) when the app starts, in the serving process or worker itself.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from urllib.parse import parse_qsl, urlsplit

from opentelemetry import trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.sqlalchemy.version import __version__ as instrumentation
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import (
    SERVICE_INSTANCE_ID,
    SERVICE_NAME,
    SERVICE_VERSION,
    Resource,
)
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumers_graphql import __version__
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.web.access_log import logged_path
from consumers_graphql.web.tracing import OperationSpan

DEFAULT_SERVICE_NAME = "consumers-graphql"
# Probes and scrapes, every few seconds from every load balancer and Prometheus: no trace.
UNTRACED_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
TRACER = "consumers_graphql"
REDACTED = "REDACTED"
# Query parameter names kept as they are (their values never are); any other is dropped.
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-\[\]]{0,63}")
# The request's URL as instrumentations record it: its path, its query, both, or all of it.
_PATH = "url.path"
_QUERY = "url.query"
_TARGETS = ("http.target",)  # path?query
_FULL_URLS = ("url.full", "http.url")  # scheme://host/path?query
_REQUEST_ATTRIBUTES = (_PATH, _QUERY, *_TARGETS, *_FULL_URLS, "http.request.method",
                       "http.method")
# Where the SQLAlchemy instrumentation keeps a statement's span (on its execution context).
_SPAN = "_otel_span"


def redact_query(query: str) -> str:
    """A query string with every value replaced: a GET /graphql carries its document and
    variables there, and a REST filter can carry an email."""
    names = (name for name, _ in parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{name}={REDACTED}" for name in names if _PARAMETER_NAME.fullmatch(name))


def masked_path(path: str) -> str:
    """A path as the access log writes one that no route matched: a span starts before the
    request is routed (see RequestSpans for the route's template, once there is one)."""
    return logged_path({"type": "http", "path": path})


def masked_target(target: str) -> str:
    """path?query: the path masked, the query's values redacted."""
    path, question, query = target.partition("?")
    return masked_path(path) + (f"?{redact_query(query)}" if question else "")


def masked_url(url: str) -> str:
    """scheme://host/path?query: no user or password, the path masked, the query's values
    redacted, no fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    host = parts.netloc.rpartition("@")[2]
    query = f"?{redact_query(parts.query)}" if parts.query else ""
    return f"{parts.scheme}://{host}{masked_path(parts.path)}{query}"


class RedactUrls(SpanProcessor):
    """Masks the request's URL in every span as the span starts, before any exporter sees
    it: the path as the access log writes it (web/access_log.py: emails, phone numbers and
    secrets in a path are masked), the query string's values replaced, and the span's name
    when it holds the path. FastAPI's request span records ``url.path`` and ``url.query``
    and is named by the method until a route matches (then by the route's template); the
    others are what other HTTP instrumentations record."""

    def on_start(self, span: SdkSpan, parent_context: OtelContext | None = None) -> None:
        attributes = span.attributes or {}
        if not any(key in attributes for key in _REQUEST_ATTRIBUTES):
            return  # not a request's span (SQL's are named after the database, a file path)
        masked: dict[str, str] = {}
        for key, mask in ((_PATH, masked_path), (_QUERY, redact_query),
                          *((key, masked_target) for key in _TARGETS),
                          *((key, masked_url) for key in _FULL_URLS)):
            value = attributes.get(key)
            if isinstance(value, str):
                masked[key] = mask(value)
        span.set_attributes(masked)
        # "GET /path" (a path can hold spaces), or the path alone
        method, space, target = span.name.partition(" ")
        if not space:
            method, target = "", method
        if target.startswith("/"):
            span.update_name(f"{method}{space}{masked_target(target)}")
        elif "://" in target:
            span.update_name(f"{method}{space}{masked_url(target)}")


def untraced(scope: Scope) -> bool:
    return scope["type"] == "http" and str(scope.get("path", "")).rstrip("/") in UNTRACED_PATHS


class RequestSpans:
    """No span at all for an untraced path: FastAPI leaves out the request's (its
    `exclude`), and this keeps its SQL (a readiness check's) from starting traces of their
    own. Any other request's span gets the path the access log writes once routing is done
    (the route's template where one matched) as its ``url.path``, in place of the masked
    path it started with (RedactUrls)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if untraced(scope):
            with suppress_instrumentation():
                await self.app(scope, receive, send)
            return
        # FastAPI's request span, current around the whole app (this runs inside it).
        span = trace.get_current_span()
        if not (isinstance(span, SdkSpan) and span.kind is SpanKind.SERVER
                and _PATH in (span.attributes or {})):
            await self.app(scope, receive, send)
            return

        def routed() -> None:
            if span.is_recording():  # not yet ended (it ends with the answer's last byte)
                span.set_attribute(_PATH, logged_path(scope))

        async def send_routed(message: Message) -> None:
            if message["type"] == "http.response.start":
                routed()
            await send(message)

        try:
            await self.app(scope, receive, send_routed)
        finally:
            routed()  # no answer (an error, a deadline's cancel): still routed, maybe


def resource() -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES as the SDK reads them, with this
    service's name when neither gives one, and an instance id of this process's own (each
    worker, each host: their spans told apart) unless they give one."""
    detected = Resource.create({SERVICE_VERSION: __version__})
    defaults: dict[str, str] = {}
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if SERVICE_INSTANCE_ID not in detected.attributes:
        defaults[SERVICE_INSTANCE_ID] = str(uuid.uuid4())
    return detected.merge(Resource(defaults))


def traces_endpoint(settings: Settings) -> str:
    """The OTLP/HTTP URL spans are posted to, by the specification's rule: the traces
    endpoint as given, or the base endpoint with /v1/traces appended."""
    if settings.otel_exporter_otlp_traces_endpoint:
        return settings.otel_exporter_otlp_traces_endpoint.strip()
    base = (settings.otel_exporter_otlp_endpoint or "").strip()
    return f"{base.rstrip('/')}/v1/traces"


class _OperationSpan:
    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def describe(self, name: str, attributes: Mapping[str, str],
                 error_codes: Sequence[str]) -> None:
        self.span.update_name(name)
        self.span.set_attributes(dict(attributes))
        if error_codes:
            self.span.set_attribute("graphql.error.codes", list(error_codes))
            self.span.set_status(Status(StatusCode.ERROR, ", ".join(error_codes)))


def _failed_statement(context: ExceptionContext) -> None:
    """Ends a failed statement's span with the error's type only: a driver's message can
    quote a parameter (asyncpg's "invalid input for query argument $1: '…'", SQLite's JSON
    path errors). The span is taken from where the instrumentation keeps it (the minor
    version is pinned in pyproject.toml; tests/test_tracing.py fails if it moves), so that
    its own handler, which records the message, finds none."""
    execution = context.execution_context
    span = getattr(execution, _SPAN, None) if execution is not None else None
    if not isinstance(span, trace.Span):
        return
    setattr(execution, _SPAN, None)
    error = context.original_exception
    span.set_attribute("error.type", f"{type(error).__module__}.{type(error).__qualname__}")
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    span.end()


class Tracing:
    """One process's tracing: its tracer provider (the app's, or one a test passes in),
    the GraphQL operation spans, and the SQL spans of a database's engines."""

    def __init__(self, settings: Settings, tracer_provider: trace.TracerProvider | None) -> None:
        self._settings = settings
        self._owned = tracer_provider is None
        if tracer_provider is None:
            # Shut down with the app (lifespan), not at interpreter exit: a stopped worker
            # flushes what it has.
            tracer_provider = SdkTracerProvider(resource=resource(), shutdown_on_exit=False)
        if isinstance(tracer_provider, SdkTracerProvider):
            tracer_provider.add_span_processor(RedactUrls())
        self.tracer_provider = tracer_provider
        self._tracer = tracer_provider.get_tracer(TRACER, __version__)
        self._exporting: BatchSpanProcessor | None = None

    middleware = RequestSpans

    def operation_span(self) -> AbstractContextManager[OperationSpan]:
        return self._operation_span()

    @contextmanager
    def _operation_span(self) -> Iterator[OperationSpan]:
        # No exception recorded: its message may quote a value.
        with self._tracer.start_as_current_span(
            "GraphQL Operation", kind=SpanKind.INTERNAL, record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _OperationSpan(span)

    def instrument(self, database: Database) -> None:
        """SQL spans for every statement the database's engines send (their text, with
        placeholders, never the parameters), and, for the app's own provider, the exporter:
        called as the app starts, so in the process that serves."""
        tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy",
                                  instrumentation, self.tracer_provider)
        # The instrumentation also counts pool connections; /metrics does that already.
        connections = NoOpMeterProvider().get_meter(TRACER).create_up_down_counter(
            "db.client.connections.usage")
        # Its spans live on SQLAlchemy's execution contexts: every read goes through them.
        database.driver_reads = False
        for engine in database.engines:
            # Before the instrumentation's own, which would describe the error by its message.
            event.listen(engine, "handle_error", _failed_statement)
            EngineTracer(tracer, engine, connections)  # type: ignore[no-untyped-call]  # the package has no annotations
        if self._owned and self._exporting is None:
            assert isinstance(self.tracer_provider, SdkTracerProvider)
            self._exporting = BatchSpanProcessor(
                OTLPSpanExporter(endpoint=traces_endpoint(self._settings)))
            self.tracer_provider.add_span_processor(self._exporting)

    async def shutdown(self) -> None:
        """Exports what is left (the app's own provider only), off the event loop."""
        if self._owned and isinstance(self.tracer_provider, SdkTracerProvider):
            await asyncio.to_thread(self.tracer_provider.shutdown)
