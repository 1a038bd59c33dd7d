"""A deadline for every HTTP request (`CONSUMERS_REQUEST_TIMEOUT_S`): past it the request's
work is cancelled, which gives its database connections back to their pools (a statement
cut short drops its connection: see db.Reader), and the client gets 504 once the work has
stopped (at once, but for a statement on a driver's thread, which ends first), in the shape
of the face it called: GraphQL ``extensions.code = "TIMEOUT"`` with the request id (in the media
type /graphql negotiated), REST the reference's ``{"error": "Request timed out", "details":
[]}``, anything else (/healthz) ``{"status": "timeout"}`` like its 503's ``{"status":
"unavailable"}``. A request whose answer had already started is only cut short (nothing more
can be said on it)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumers_graphql.web import observe, request_id
from consumers_graphql.web.access_log import logged_path
from consumers_graphql.web.dependencies import JSON, MEDIA_TYPE_STATE

TIMEOUT = "TIMEOUT"
REQUEST_TIMED_OUT = "Request timed out"

logger = logging.getLogger("consumers_graphql.http")


class RequestDeadline:
    def __init__(self, app: ASGIApp, *, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        deadline = asyncio.timeout(self.seconds)
        try:
            async with deadline:
                await self.app(scope, receive, send_watched)
        except TimeoutError:
            if not deadline.expired():
                raise  # the app's own, not the deadline's
            await timed_out(send, scope, self.seconds, started=started)


async def timed_out(send: Send, scope: Scope, seconds: float, *, started: bool) -> None:
    """The request's work was stopped at its deadline: counted, logged, and answered 504
    unless its answer had started."""
    current = request_id.current.get()
    observe.refused(TIMEOUT)
    logger.warning("request over its deadline of %s s: %s %s (request_id=%s)",
                   seconds, scope["method"], logged_path(scope), current)
    if not started:
        await send_timeout(send, scope, seconds, current)


async def send_timeout(send: Send, scope: Scope, seconds: float, current: str | None) -> None:
    body: dict[str, Any]
    path = str(scope["path"])
    # ProtocolGuard stores the negotiated type for /graphql only.
    media_type = scope.get("state", {}).get(MEDIA_TYPE_STATE)
    content_type = JSON if media_type is None else f"{media_type}; charset=utf-8"
    if path.startswith("/api/"):
        body = {"error": REQUEST_TIMED_OUT, "details": []}
    elif media_type is None:
        body = {"status": "timeout"}
    else:
        extensions: dict[str, str] = {"code": TIMEOUT}
        if current is not None:
            extensions["requestId"] = current
        body = {"errors": [{
            "message": f"The request did not finish within its {seconds:g} s; it was stopped.",
            "extensions": extensions,
        }]}
    encoded = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 504, "headers": [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(encoded)).encode()),
    ]})
    await send({"type": "http.response.body", "body": encoded})
