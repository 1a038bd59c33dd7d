"""Request-scoped resources shared by the HTTP faces."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request

from consumers_graphql.store.db import Database, Reader

# Where a route that opened the request's reader itself (to authenticate before reading the
# body, rest.body) keeps it; it closes it too.
READER_STATE = "reader"
JSON = "application/json"
# The media type the GraphQL face negotiated, which request_id's error answers use too.
MEDIA_TYPE_STATE = "graphql_media_type"


async def request_reader(request: Request) -> AsyncIterator[Reader]:
    """The request's read connection, shared by authentication and the API itself (FastAPI
    resolves a dependency once per request), opened on first use, closed after the
    response."""
    opened: Reader | None = request.scope.get("state", {}).get(READER_STATE)
    if opened is not None:
        yield opened
        return
    database: Database = request.app.state.database
    reader = database.request_reader()
    try:
        yield reader
    finally:
        await reader.close()
