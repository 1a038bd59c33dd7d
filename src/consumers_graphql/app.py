"""The ASGI application: GraphQL at /graphql (GraphiQL in a browser), health at /healthz."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from sqlalchemy import text
from strawberry.fastapi import GraphQLRouter

from consumers_graphql import __version__
from consumers_graphql.api.context import Context
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.api.schema import build_schema
from consumers_graphql.db import Database
from consumers_graphql.repository import Repository
from consumers_graphql.settings import Settings


async def _graphql_context(request: Request) -> AsyncIterator[Context]:
    database: Database = request.app.state.database
    reader = database.reader()
    repository = Repository(reader)
    try:
        yield Context(
            settings=request.app.state.settings,
            database=database,
            repository=repository,
            loaders=Loaders(repository),
        )
    finally:
        await reader.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(settings)
        app.state.database = database
        try:
            yield
        finally:
            await database.dispose()

    app = FastAPI(
        title="Consumers API",
        version=__version__,
        lifespan=lifespan,
        docs_url=None if settings.is_production else "/docs",
    )
    app.state.settings = settings
    schema = build_schema(production=settings.is_production)
    app.state.schema = schema
    graphql: GraphQLRouter[Context, None] = GraphQLRouter(
        schema,
        context_getter=_graphql_context,
        graphql_ide=None if settings.is_production else "graphiql",
    )
    app.include_router(graphql, prefix="/graphql")

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> dict[str, str]:
        async with request.app.state.database.read_engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return {"status": "ok"}

    return app
