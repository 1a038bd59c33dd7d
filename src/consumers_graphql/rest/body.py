"""How the REST routes read request bodies: within a size limit (413 past it, counted as the
body streams, so a chunked body cannot slip past), and parsed late, so that authentication
(401) and scopes (403) answer before a malformed body (400) does."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from consumers_graphql.settings import Settings

BATCH_SUFFIX = "/batch"


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over the limit of {limit:,} bytes.",
                         headers={"Connection": "close"})


# Where a request's malformed-JSON reason is kept (in the ASGI scope's state, which the
# exception handlers see): its body parses as null, which no body model accepts, so
# validation refuses it (400) only after the dependencies (authentication, scopes) have run.
MALFORMED_JSON = "rest_malformed_json"


def malformed_json(request: Request) -> str | None:
    reason: str | None = request.scope.get("state", {}).get(MALFORMED_JSON)
    return reason


class _LimitedRequest(Request):
    limit: int = 0

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.limit:
                raise PayloadTooLarge(self.limit)
            chunks, size = [], 0
            async with aclosing(self.stream()) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > self.limit:
                        raise PayloadTooLarge(self.limit)
                    chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            reason = None
            try:
                self._json = json.loads(body)
            except RecursionError:
                reason = "it is nested too deeply"
            except ValueError as error:  # JSONDecodeError, bad UTF-8, a huge integer
                reason = str(error)
            if reason is not None:
                self._json = None
                self.scope.setdefault("state", {})[MALFORMED_JSON] = reason
        return self._json


def body_limit(settings: Settings, path: str) -> int:
    """The batch endpoints take up to 500 items of 16 KiB metadata each, hence their own limit."""
    if path.endswith(BATCH_SUFFIX):
        return settings.max_batch_body_bytes
    return settings.max_body_bytes


class RestRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        path = self.path

        async def limited(request: Request) -> Response:
            limited_request = _LimitedRequest(request.scope, request.receive)
            limited_request.limit = body_limit(request.app.state.settings, path)
            return await handler(limited_request)

        return limited
