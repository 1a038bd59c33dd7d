"""A request id for every HTTP request: taken from ``X-Request-ID`` when the caller sends a
short safe token (so ids can be followed across services), generated otherwise; sent back
on every response, 500s included, and available to the code that logs."""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from ulid import ULID

from consumers_graphql.store import outage
from consumers_graphql.web.dependencies import JSON, MEDIA_TYPE_STATE

HEADER = "X-Request-ID"
INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"
# Letters, digits and . _ : - only, so an id can be written to a log line as it is.
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

logger = logging.getLogger("consumers_graphql.http")

current: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return f"req_{ULID()}"


def accept_or_generate(incoming: str | None) -> str:
    if incoming is not None and _SAFE.fullmatch(incoming):
        return incoming
    return new_request_id()


_HEADER_NAME = HEADER.lower().encode()


def set_header(start: Message, name: bytes, value: bytes) -> None:
    """`name` (lower case) set to `value` in an `http.response.start`, replacing any."""
    raw = list(start.get("headers", ()))
    if any(key.lower() == name for key, _ in raw):
        raw = [(key, old) for key, old in raw if key.lower() != name]
    raw.append((name, value))
    start["headers"] = raw


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None
        )
        request_id = accept_or_generate(incoming)
        scope.setdefault("state", {})["request_id"] = request_id
        token = current.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                set_header(message, _HEADER_NAME, request_id.encode())
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            if started:
                logger.exception("unhandled error (request_id=%s)", request_id)
                raise
            await answer_unhandled(scope, error, request_id, send, with_id=True)
        finally:
            current.reset(token)


async def answer_unhandled(scope: Scope, error: Exception, request_id: str, send: Send, *,
                           with_id: bool) -> None:
    """The answer to an error that escaped the app before its answer started: 503 when the
    database is out of reach, else 500 (logged), both with the request id (in the body; in
    the header too `with_id`, where `send` does not add it)."""
    if outage.is_unavailable(error):
        database = getattr(scope["app"].state, "database", None)
        if database is not None:  # the app's lifespan ran
            database.failed(error)
        status, headers, body = _unavailable(scope, request_id)
    else:
        # Starlette's own 500 is sent outside this middleware, without the id.
        logger.exception("unhandled error (request_id=%s)", request_id, exc_info=error)
        status, headers, body = 500, [], _internal(scope, request_id)
        headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(body)).encode()))
    if with_id:
        headers.append((_HEADER_NAME, request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _is_rest(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith("/api/")  # the REST reference's shape


def _internal(scope: Scope, request_id: str) -> bytes:
    if _is_rest(scope):
        return json.dumps({"error": "Internal server error", "details": [
            {"field": "requestId", "message": request_id}]}).encode()
    return json.dumps({"errors": [{
        "message": "Internal server error.",
        "extensions": {"code": INTERNAL_SERVER_ERROR, "requestId": request_id},
    }]}).encode()


def _unavailable(scope: Scope, request_id: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """503 with Retry-After, in the REST reference's shape under /api/, GraphQL's elsewhere
    (in the media type /graphql negotiated)."""
    retry_after = str(scope["app"].state.settings.retry_after_s).encode()
    if _is_rest(scope):
        body = json.dumps({"error": outage.REST_MESSAGE, "details": []}).encode()
        media_type = JSON
    else:
        body = json.dumps({"errors": [{
            "message": outage.GRAPHQL_MESSAGE,
            "extensions": {"code": outage.SERVICE_UNAVAILABLE, "requestId": request_id},
        }]}).encode()
        media_type = scope.get("state", {}).get(MEDIA_TYPE_STATE, JSON) + "; charset=utf-8"
    return 503, [(b"content-type", media_type.encode()),
                 (b"retry-after", retry_after)], body
