"""The ASGI application: GraphQL at /graphql (GraphiQL in a browser), REST at /api/v1,
health at /livez and /readyz (/healthz), Prometheus metrics at /metrics."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from fastapi import BackgroundTasks, FastAPI, Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from consumers_graphql import __version__
from consumers_graphql.api.context import Context
from consumers_graphql.api.documents import Documents
from consumers_graphql.api.http import GraphQLApp, ProtocolGuard
from consumers_graphql.api.limits import Limits
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.api.schema import build_schema
from consumers_graphql.rest import errors as rest_errors
from consumers_graphql.rest import events as rest_events
from consumers_graphql.rest import routes as rest_routes
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.store.event_hub import EventHub
from consumers_graphql.store.idempotency import IdempotencyStore
from consumers_graphql.store.keys import KeyStore
from consumers_graphql.store.repository import Repository
from consumers_graphql.web import api_docs, health, observe
from consumers_graphql.web import tracing as web_tracing
from consumers_graphql.web.access_log import AccessLog, SocketAccessLog
from consumers_graphql.web.cors import Cors
from consumers_graphql.web.deadline import RequestDeadline
from consumers_graphql.web.edge import Edge
from consumers_graphql.web.http_auth import (
    AuthenticationRequired,
    authentication_required_response,
    require_api_key,
)
from consumers_graphql.web.metrics import Metrics
from consumers_graphql.web.rate_limit import RateLimiter
from consumers_graphql.web.request_id import RequestIdMiddleware
from consumers_graphql.web.security_headers import SecurityHeaders

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


GRAPHQL_PATH = "/graphql"


class App(FastAPI):
    """FastAPI, with /graphql answered before FastAPI's own stack (its error and exception
    middleware, the exit stack, the router): our middleware wraps the GraphQL app directly,
    as it wraps the router for every other path. With tracing on, /graphql goes the long
    way, through FastAPI's telemetry (the request span) and the tracing middleware."""

    graphql_stack: ASGIApp | None = None
    graphql_route: Route | None = None
    # WebSockets at /graphql (subscriptions): their own access line, none of the HTTP
    # middleware (no deadline on a socket that lives for hours, no response headers).
    socket_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "websocket" and scope["path"] == GRAPHQL_PATH
                and self.socket_stack is not None):
            scope["app"] = self
            scope["route"] = self.graphql_route
            await self.socket_stack(scope, receive, send)
            return
        stack = self.graphql_stack
        if stack is not None and scope["type"] == "http" and scope["path"] == GRAPHQL_PATH:
            scope["app"] = self
            scope["route"] = self.graphql_route  # as the router sets it: the logged path
            await stack(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


@asynccontextmanager
async def _graphql_context(
    request: Request, background_tasks: BackgroundTasks
) -> AsyncIterator[Context]:
    """The request's context: its read connection (shared by the API key look-up and the
    resolvers, closed after the response) and its principal."""
    database: Database = request.app.state.database
    reader = database.request_reader()
    try:
        # (The GraphiQL page, which needs no key, is answered before: api/http.py.)
        principal = await require_api_key(request, background_tasks, reader)
        repository = Repository(reader)
        yield Context(
            settings=request.app.state.settings,
            database=database,
            repository=repository,
            loaders=Loaders(repository),
            principal=principal,
            rate_limiter=request.app.state.rate_limiter,
        )
    finally:
        await reader.close()


def _socket_context(socket: WebSocket) -> Context:
    """A WebSocket's context, for its whole life: no principal until connection_init has
    given a key (api/websocket.py); a read connection only if something reads on it."""
    state = socket.scope["app"].state
    database: Database = state.database
    repository = Repository(database.reader())
    return Context(settings=state.settings, database=database, repository=repository,
                   loaders=Loaders(repository), rate_limiter=state.rate_limiter,
                   event_hub=state.event_hub, keys=state.keys)


# A young-generation threshold for a server: at CPython's default of 700 allocations, a
# GraphQL request of a few hundred fields runs the collector one to two times, at about a
# tenth of its time (measured with bench/, W1 on SQLite).
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Garbage collection set for a long-running server, once the app is built: what exists
    now (modules, the schema, compiled plans) lives as long as the process, so it is moved
    out of the collector's sight (`gc.freeze`), and the young generation is collected every
    GC_YOUNG_THRESHOLD allocations instead of 700. `serve` calls it; so does the benchmark
    for every variant it measures, the baselines included."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def worker_app(settings: Settings) -> App:
    """The app of one `serve --workers N` worker (uvicorn calls this factory in each worker
    process), set up as a single `serve` sets up its own."""
    app = create_app(settings)
    tune_gc()
    return app


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> App:
    """The app. Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT is set (web/tracing.py), or
    with a `tracer_provider` given (tests; its owner exports)."""
    settings = settings or Settings()
    tracing = web_tracing.setup(settings, tracer_provider=tracer_provider)
    metrics = Metrics() if settings.metrics_enabled else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings)
        app.state.database = database
        observe.count_statements(database)
        app.state.readiness.head()
        if metrics is not None:
            metrics.watch_pools(database)
        if tracing is not None:  # here: in the process (worker) that serves
            tracing.instrument(database)
        # Keys are verified on the primary, and trusted for key_cache_seconds (store/keys.py).
        app.state.idempotency = IdempotencyStore(
            database, timedelta(hours=settings.idempotency_key_hours))
        app.state.keys = KeyStore(database.primary_engine, database.write_engine,
                                  settings.key_pepper, cache_seconds=settings.key_cache_seconds)
        app.state.rate_limiter = RateLimiter(settings)
        hub = app.state.event_hub = EventHub(database, settings)
        if metrics is not None:
            metrics.watch_subscriptions(hub)
        await hub.start()
        try:
            yield
        finally:
            try:
                try:
                    await hub.close()
                    await app.state.rate_limiter.close()
                finally:
                    await database.dispose()
            finally:
                if tracing is not None:
                    await tracing.shutdown()

    app = App(
        title="Consumers API",
        version=__version__,
        lifespan=lifespan,
        telemetry=web_tracing.telemetry(tracing),
        # Like introspection: the API's description is for development, not production.
        openapi_url=None if settings.is_production else "/openapi.json",
        docs_url=None,  # web/api_docs.py: from installed files, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.readiness = health.Readiness(settings)
    app.add_exception_handler(AuthenticationRequired, authentication_required_response)
    schema = build_schema(production=settings.is_production, limits=Limits.from_settings(settings),
                          operation_spans=tracing.operation_span if tracing else None)
    app.state.schema = schema
    app.state.documents = Documents(settings)  # persisted queries, trusted documents
    graphql = GraphQLApp(
        schema,
        context=_graphql_context,
        documents=app.state.documents,
        ide_page=None if settings.is_production else api_docs.graphiql_page(app, settings),
        retry_after_s=settings.retry_after_s,
        persisted_max_age_s=settings.persisted_query_max_age_s,
        socket_context=_socket_context,
        init_timeout_s=settings.subscription_init_timeout_s,
        subscriptions_per_socket=settings.subscriptions_per_key,
        allowed_origins=settings.cors_origins,
    )
    app.socket_stack = SocketAccessLog(graphql)
    if not settings.is_production:
        api_docs.install_docs(app)
    # A Starlette route: /openapi.json documents the REST API only (GraphQL has its own
    # schema at /graphql), and FastAPI's dependency resolution is not needed here.
    graphql_route = Route(GRAPHQL_PATH, graphql, methods=["GET", "POST"])
    app.router.routes.append(graphql_route)
    if tracing is not None:
        app.add_middleware(tracing.middleware)  # probes: no spans; others: the logged path
    # The guard answers before authentication; the deadline covers reading the body too; the
    # request id wraps everything, 500s and 504s included.
    app.add_middleware(ProtocolGuard, path="/graphql", max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestDeadline, seconds=settings.request_timeout_s)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins:
        # Outside the request id: its 500s and 503s (and everything within) carry the CORS
        # headers, and a preflight is answered before any other work.
        app.add_middleware(Cors, origins=settings.cors_origins)
    app.add_middleware(SecurityHeaders)  # on every answer, the request id's 500s too
    # Outermost: its line and numbers have the final status, whoever answered.
    app.add_middleware(AccessLog, recorder=metrics)
    if tracing is None:
        # The same middleware as below, in the same order, around the GraphQL app alone.
        app.graphql_stack = Edge(
            ProtocolGuard(graphql, path=GRAPHQL_PATH, max_body_bytes=settings.max_body_bytes),
            access_log=AccessLog(graphql, recorder=metrics), seconds=settings.request_timeout_s,
            cors=Cors(graphql, origins=settings.cors_origins) if settings.cors_origins else None)
        app.graphql_route = graphql_route
    rest_errors.install(app)
    app.include_router(rest_routes.router)
    app.include_router(rest_events.router)

    # Starlette routes: outside the OpenAPI document, and no key needed.
    app.router.routes.append(Route("/livez", health.livez, methods=["GET"]))
    for path in ("/readyz", "/healthz"):
        app.router.routes.append(Route(path, health.readyz, methods=["GET"]))
    if metrics is not None and settings.metrics_port is None:
        app.router.routes.append(Route("/metrics", metrics.endpoint, methods=["GET"]))

    return app
