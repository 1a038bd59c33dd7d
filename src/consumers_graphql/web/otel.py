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
from urllib.parse import parse_qsl

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
from starlette.types import ASGIApp, Receive, Scope, Send

from consumers_graphql import __version__
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.web.tracing import OperationSpan

DEFAULT_SERVICE_NAME = "consumers-graphql"
# Probes and scrapes, every few seconds from every load balancer and Prometheus: no trace.
UNTRACED_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
TRACER = "consumers_graphql"
REDACTED = "REDACTED"
# Query parameter names kept as they are (their values never are); any other is dropped.
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-\[\]]{0,63}")
_QUERY_ATTRIBUTES = ("url.query", "url.full", "http.url", "http.target")
# Where the SQLAlchemy instrumentation keeps a statement's span (on its execution context).
_SPAN = "_otel_span"


def redact_query(query: str) -> str:
    """A query string with every value replaced: a GET /graphql carries its document and
    variables there, and a REST filter can carry an email."""
    names = (name for name, _ in parse_qsl(query, keep_blank_values=True))
    return "&".join(f"{name}={REDACTED}" for name in names if _PARAMETER_NAME.fullmatch(name))


class RedactQueries(SpanProcessor):
    """Replaces the query string's values in every span's URL attributes as the span starts
    (FastAPI's request span records ``url.query``), before any exporter sees it."""

    def on_start(self, span: SdkSpan, parent_context: OtelContext | None = None) -> None:
        attributes = span.attributes or {}
        for key in _QUERY_ATTRIBUTES:
            value = attributes.get(key)
            if not isinstance(value, str):
                continue
            if key == "url.query":
                span.set_attribute(key, redact_query(value))
            elif "?" in value:
                base, _, query = value.partition("?")
                span.set_attribute(key, f"{base}?{redact_query(query)}")


def untraced(scope: Scope) -> bool:
    return scope["type"] == "http" and str(scope.get("path", "")).rstrip("/") in UNTRACED_PATHS


class Untraced:
    """No span at all for an untraced path: FastAPI leaves out the request's (its
    `exclude`), and this keeps its SQL (a readiness check's) from starting traces of their
    own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not untraced(scope):
            await self.app(scope, receive, send)
            return
        with suppress_instrumentation():
            await self.app(scope, receive, send)


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
            tracer_provider.add_span_processor(RedactQueries())
        self.tracer_provider = tracer_provider
        self._tracer = tracer_provider.get_tracer(TRACER, __version__)
        self._exporting: BatchSpanProcessor | None = None

    untraced_paths = Untraced

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
