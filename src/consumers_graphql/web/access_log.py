"""One access line per HTTP request (`consumers_graphql.access`, INFO), in place of
uvicorn's, and the request's numbers handed to the metrics.

The line has the method, the path (the route's template where one matched, so no id or
external id; never the query string, which can carry a key or personal data), the status,
the duration until the last byte of the answer, the API key's id, the GraphQL operation's
type, name and cost, the limit that refused it if one did, and the SQL statements the
request sent (the key look-up included) with their time. Text: uvicorn's look; JSON (see
logs.py): these as fields.

The line is written when the request's work is over, background work after the answer
(an API key's lastUsedAt) included: lines follow the order in which requests end. A
request that ended without an answer is logged with status 499 (the client went away), or
500 when an error escaped."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumers_graphql.web import observe, request_id
from consumers_graphql.web.logs import ACCESS_FIELDS

logger = logging.getLogger("consumers_graphql.access")

CLIENT_CLOSED = 499
REQUEST_TIMEOUT_STATUS = 408
BAD_REQUEST_STATUS = 400
# What stands for the part of a path no route matched: its segments are whatever the client
# sent (a name, an email, a key), so none of them is logged.
UNMATCHED = "{unmatched}"


class Recorder(Protocol):
    def started(self, facts: observe.RequestFacts) -> None: ...

    def finished(self, facts: observe.RequestFacts, status: int, seconds: float) -> None: ...


def logged_path(scope: Scope) -> str:
    """The path as logs and spans may show it: the route's template where one matched;
    else its leading segments that are literal segments of the app's routes (/api/v1/...),
    then {unmatched}."""
    template = getattr(scope.get("route"), "path_format", None)
    if isinstance(template, str):
        return template
    if scope.get("path") == "-":  # no request head (a 408 from the connection)
        return "-"
    known = _literal_prefixes(getattr(scope.get("app"), "routes", None) or ())
    segments = str(scope.get("path", "")).split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if (*kept, segment) not in known:
            return "/" + "".join(f"{part}/" for part in kept) + UNMATCHED
        kept.append(segment)
    return "/" + "/".join(kept)


def _literal_prefixes(routes: Any) -> set[tuple[str, ...]]:
    """Every run of leading literal segments of the routes' templates ("/api/v1/consumers/
    {consumer_id}" gives (api,), (api, v1), (api, v1, consumers)), included routers' too."""
    prefixes: set[tuple[str, ...]] = set()
    for route in routes:
        template = getattr(route, "path_format", None)
        if not isinstance(template, str):
            # an included router (FastAPI keeps it whole, its routes with their full paths)
            inner = getattr(route, "original_router", route)
            prefixes |= _literal_prefixes(getattr(inner, "routes", None) or ())
            continue
        literal: list[str] = []
        for segment in template.split("/")[1:]:
            if "{" in segment or not segment:
                break
            literal.append(segment)
            prefixes.add(tuple(literal))
    return prefixes


class AccessLog:
    def __init__(self, app: ASGIApp, *, recorder: Recorder | None = None) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            state = scope.get("state")
            if scope["type"] == "lifespan" and isinstance(state, dict):
                # uvicorn hands this state to every connection (web/connections.py)
                state[observe.TIMEOUT_HOOK] = self.head_timed_out
                state[observe.MALFORMED_HOOK] = self.malformed
            await self.app(scope, receive, send)
            return
        facts = observe.RequestFacts(face=observe.face_of(scope["path"]))
        token = observe.current.set(facts)
        status: int | None = None
        ended: float | None = None

        async def send_watched(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                ended = time.perf_counter()
            await send(message)

        if self.recorder is not None:
            self.recorder.started(facts)
        failed = True
        try:
            await self.app(scope, receive, send_watched)
            failed = False
        finally:
            observe.current.reset(token)
            self.finished(scope, facts, status, ended, failed=failed)

    def finished(self, scope: Scope, facts: observe.RequestFacts, status: int | None,
                 ended: float | None, *, failed: bool) -> None:
        """The request's line and numbers: `status` as sent (None: none was), `ended` when
        the answer's last byte was, `failed` when an error escaped."""
        final = status if status is not None else 500 if failed else CLIENT_CLOSED
        if scope.get(observe.TIMED_OUT):  # the connection answered 408 (a stalled body)
            final = REQUEST_TIMEOUT_STATUS
            facts.refusals.append(observe.REQUEST_TIMEOUT)
        elif scope.get(observe.MALFORMED):  # the connection answered 400 (a broken body)
            final = BAD_REQUEST_STATUS
        seconds = (ended or time.perf_counter()) - facts.started
        if self.recorder is not None:
            self.recorder.finished(facts, final, seconds)
        if logger.isEnabledFor(logging.INFO):
            _log(scope, facts, final, seconds)

    def head_timed_out(self, seconds: float) -> None:
        """A connection answered 408 to a request head that did not arrive in time: no
        request reached the app, but it is counted and logged (method and path unknown)."""
        facts = observe.RequestFacts(face=observe.OTHER, started=time.perf_counter() - seconds)
        facts.refusals.append(observe.REQUEST_TIMEOUT)
        if self.recorder is not None:
            self.recorder.started(facts)
            self.recorder.finished(facts, REQUEST_TIMEOUT_STATUS, seconds)
        if logger.isEnabledFor(logging.INFO):
            _log({"type": "http", "method": "-", "path": "-"}, facts, REQUEST_TIMEOUT_STATUS,
                 seconds)


    def malformed(self) -> None:
        """A connection answered 400 to a request it could not read (malformed, or its head
        over the limit): no request reached the app, but it is counted and logged (method
        and path unknown)."""
        facts = observe.RequestFacts(face=observe.OTHER)
        if self.recorder is not None:
            self.recorder.started(facts)
            self.recorder.finished(facts, BAD_REQUEST_STATUS, 0.0)
        if logger.isEnabledFor(logging.INFO):
            _log({"type": "http", "method": "-", "path": "-"}, facts, BAD_REQUEST_STATUS, 0.0)


class SocketAccessLog:
    """One access line per WebSocket, when it closes: the handshake's method and path, 101
    when it was accepted (403 when refused before), its whole life as the duration, the key
    it authenticated with, and the close code. A request id as for HTTP (X-Request-ID or a
    new one), in the scope for the code that logs. No request numbers: a socket's life is not
    a request's latency (the subscriptions have metrics of their own)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        facts = observe.RequestFacts(face=observe.face_of(scope["path"]))
        token = observe.current.set(facts)
        incoming = next((v.decode("latin-1") for k, v in scope["headers"]
                         if k == b"x-request-id"), None)
        current_id = request_id.accept_or_generate(incoming)
        scope.setdefault("state", {})["request_id"] = current_id
        id_token = request_id.current.set(current_id)
        status: int | None = None
        closed: int | None = None

        async def send_watched(message: Message) -> None:
            nonlocal status, closed
            if message["type"] == "websocket.accept":
                status = 101
            elif message["type"] == "websocket.close":
                closed = int(message.get("code", 1000))
                if status is None:
                    status = 403  # refused before the handshake ended
            await send(message)

        async def receive_watched() -> Message:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.disconnect" and closed is None:
                closed = int(message.get("code", 1005))
            return message

        failed = True
        try:
            await self.app(scope, receive_watched, send_watched)
            failed = False
        finally:
            request_id.current.reset(id_token)
            observe.current.reset(token)
            final = status if status is not None else 500 if failed else CLIENT_CLOSED
            if logger.isEnabledFor(logging.INFO):
                _log({**scope, "method": "GET"}, facts, final,
                     time.perf_counter() - facts.started, closed=closed)


def _log(scope: Scope, facts: observe.RequestFacts, status: int, seconds: float,
         closed: int | None = None) -> None:
    path = logged_path(scope)
    method = str(scope.get("method", ""))
    fields: dict[str, Any] = {
        "request_id": scope.get("state", {}).get("request_id"),
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "face": facts.face,
        "key_id": facts.key_id,
        "operation_type": facts.operation_type,
        "operation_name": facts.operation_name,
        "cost": facts.cost,
        "refused": facts.refusals[0] if facts.refusals else None,
        "statements": facts.statements,
        "database_ms": round(facts.database_s * 1000, 2),
    }
    extra = [f"request_id={fields['request_id']}"]
    if facts.key_id:
        extra.append(f"key={facts.key_id}")
    if facts.face == observe.GRAPHQL:
        extra.append(f"operation={facts.operation_type}"
                     + (f":{facts.operation_name}" if facts.operation_name else ""))
        if facts.cost is not None:
            extra.append(f"cost={facts.cost}")
    if facts.refusals:
        extra.append(f"refused={','.join(facts.refusals)}")
    extra.append(f"sql={facts.statements}/{fields['database_ms']:g}ms")
    if closed is not None:  # a WebSocket's close code
        fields["close_code"] = closed
        extra.append(f"close={closed}")
    logger.info('"%s %s HTTP/%s" %d %.1fms %s', method, path,
                scope.get("http_version", "1.1"), status, seconds * 1000, " ".join(extra),
                extra={ACCESS_FIELDS: fields, "request_id": fields["request_id"]})
