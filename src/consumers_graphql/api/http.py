"""GraphQL over HTTP (https://graphql.github.io/graphql-over-http/): what /graphql accepts
and how it answers.

Two layers. ``ProtocolGuard`` (ASGI, in front of everything, authentication included)
refuses what is not a GraphQL request before any work is done: other methods (405), an
``Accept`` that allows neither JSON media type (406), a POST that is not
``application/json`` (415, which also stops the CSRF "simple request" probes), a body
over the limit (413, counted as it streams, so a chunked body cannot slip past), batches
and bodies that are not a JSON object (400), and query strings that are not UTF-8 (400).
``GraphQLApp`` then answers in the negotiated media type with the spec's status codes:
under ``application/graphql-response+json`` a request error (parse, validation, limits,
variables) is 400; under ``application/json`` every GraphQL response is 200. A mutation
over GET is 405 with ``Allow: POST``. The database out of reach is 503 with Retry-After under
both, unless a mutation may have written (past its first field's failure: no retry invited).
A body the client stopped sending is never executed, and nothing is answered. A mutation sent
with an ``Idempotency-Key`` runs as one transaction with its key (web/idempotency.py). A
request may name its document instead of sending it (a trusted document's ``documentId``, an
APQ hash): api/documents.py resolves it to its text first, and the rest is the same.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_to_bytes

import orjson
from fastapi import BackgroundTasks
from graphql import FieldNode, GraphQLError, OperationType, get_operation_ast, parse
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL as StrawberryGraphQL
from strawberry.exceptions import MissingQueryError
from strawberry.http import GraphQLHTTPResponse
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType as StrawberryOperationType

from consumers_graphql.api.context import Context
from consumers_graphql.api.documents import DocumentRefusal, Documents, Resolved
from consumers_graphql.api.limits import LIMIT_CODES
from consumers_graphql.api.permissions import FORBIDDEN
from consumers_graphql.api.websocket import (
    GRAPHQL_TRANSPORT_WS,
    SUBPROTOCOL_CLOSE,
    SubscriptionsHandler,
    TextFrames,
    subprotocol_refusal,
)
from consumers_graphql.store.outage import SERVICE_UNAVAILABLE
from consumers_graphql.timestamps import format_datetime
from consumers_graphql.web import idempotency, observe
from consumers_graphql.web.dependencies import JSON, MEDIA_TYPE_STATE
from consumers_graphql.web.http_auth import (
    AUTHENTICATION_REQUIRED,
    UNAUTHENTICATED,
    AuthenticationRequired,
)
from consumers_graphql.web.rate_limit import THROTTLED, RateLimitUnavailable, Throttle
from consumers_graphql.web.security_headers import page_policy

if TYPE_CHECKING:
    from consumers_graphql.api.schema import Schema

# An answer: status, body, extra headers.
_Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]
GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
_UTF8 = frozenset({"utf-8", "utf8"})
_JSON_WHITESPACE = b" \t\n\r"
BAD_REQUEST = "BAD_REQUEST"
PAYLOAD_TOO_LARGE = observe.PAYLOAD_TOO_LARGE
# Where ProtocolGuard leaves a POST's body, read whole.
BODY = "consumers.graphql_body"


def negotiate(accept: str | None) -> str | None:
    """The response media type for an ``Accept`` header, None when neither is acceptable.
    No header means ``application/json``, and so do ``*/*`` and ``application/*`` (the
    spec's advice until clients have moved to the new type); the highest q wins, the first
    listed on a tie."""
    if accept is None or not accept.strip():
        return JSON
    best, best_q = None, 0.0
    for item in accept.split(","):
        media, params = _media_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            continue
        if params.get("charset", "utf-8") not in _UTF8:
            continue
        if media == GRAPHQL_RESPONSE_JSON:
            candidate = GRAPHQL_RESPONSE_JSON
        elif media in (JSON, "application/*", "*/*"):
            candidate = JSON
        else:
            continue
        if q > best_q:
            best, best_q = candidate, q
    return best


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    media, *parameters = value.split(";")
    params = {}
    for parameter in parameters:
        name, _, setting = parameter.partition("=")
        params[name.strip().lower()] = setting.strip().strip('"').lower()
    return media.strip().lower(), params


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"errors": [{"message": message, "extensions": {"code": code}}]}).encode()


class ProtocolGuard:
    def __init__(self, app: ASGIApp, *, path: str, max_body_bytes: int) -> None:
        self.app = app
        self.path = path.rstrip("/")
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        method = scope["method"]
        if method not in ("GET", "POST"):
            await _refuse(send, 405, "METHOD_NOT_ALLOWED",
                          "/graphql takes GET (queries) and POST.", {"Allow": "GET, POST"})
            return
        media_type = negotiate(headers.get("accept"))
        asks_for_page = method == "GET" and not _names_operation(QueryParams(scope["query_string"]))
        if media_type is None and not asks_for_page:  # the GraphiQL page is not JSON
            await _refuse(send, 406, "NOT_ACCEPTABLE",
                          f"Accept {GRAPHQL_RESPONSE_JSON} or {JSON}.",
                          {"Accept": f"{GRAPHQL_RESPONSE_JSON}, {JSON}"})
            return
        scope.setdefault("state", {})[MEDIA_TYPE_STATE] = media_type or JSON
        if method == "POST":
            content_type, params = _media_type(headers.get("content-type", ""))
            if content_type != JSON or params.get("charset", "utf-8") not in _UTF8:
                await _refuse(send, 415, "UNSUPPORTED_MEDIA_TYPE",
                              f"Send the operation as {JSON} (UTF-8).", {"Accept-Post": JSON})
                return
            try:
                body = await self._read_body(headers, receive)
            except _Disconnected:  # a body that never finished is never executed
                return
            if body is None:
                observe.refused(PAYLOAD_TOO_LARGE)
                await _refuse(send, 413, PAYLOAD_TOO_LARGE,
                              f"The request body is over the limit of {self.max_body_bytes:,} "
                              "bytes.", {"Connection": "close"})
                return
            first = body.lstrip(_JSON_WHITESPACE)[:1]
            if first == b"[":
                await _refuse(send, 400, "BATCHING_NOT_SUPPORTED",
                              "Batched operations (a JSON array) are not supported: send one "
                              "operation per request.")
                return
            if first != b"{":  # a string, number, null: no operation in it
                await _refuse(send, 400, BAD_REQUEST,
                              "The request body must be a JSON object: "
                              '{"query": ..., "variables": {...}, "operationName": ...}.')
                return
            scope[BODY] = body  # for GraphQLApp, which reads it no more
            receive = _replay(body, receive)
        elif not _is_utf8(scope["query_string"]):
            await _refuse(send, 400, BAD_REQUEST, "The query string is not valid UTF-8.")
            return
        await self.app(scope, receive, send)

    async def _read_body(self, headers: dict[str, str], receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to be over the limit; _Disconnected
        when the client (or the server's body timeout) ended the request first."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


_GUARDED = ("accept", "content-type", "content-length")


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers the guard reads, each its first value, in one pass."""
    found: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        if name in _GUARDED and name not in found:
            found[name] = raw_value.decode("latin-1")
    return found


class _Disconnected(Exception):
    """The request ended before its body did: there is no one left to answer."""


def _is_utf8(query_string: bytes) -> bool:
    try:
        unquote_to_bytes(query_string.replace(b"+", b" ")).decode()
    except UnicodeDecodeError:
        return False
    return True


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    response = Response(error_body(message, code), status_code=status, media_type=JSON,
                        headers=headers)
    await send({"type": "http.response.start", "status": status,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


ContextFactory = Callable[[Request, BackgroundTasks], AbstractAsyncContextManager[Context]]
SocketContextFactory = Callable[[WebSocket], Context]
_MALFORMED_VARIABLES = "The GraphQL operation's `variables` must be an object or null, if provided."


class GraphQLApp(StrawberryGraphQL[Context, None]):
    """GraphQL over HTTP for GET and POST: the request's context (its principal: 401 first,
    as Strawberry's view does), the operation's JSON, `schema.execute` (or its direct path,
    `execute_ready`, for a query ready to run), and the answer in the
    negotiated media type with the spec's codes. Strawberry's ASGI view is kept for anything
    else (WebSockets); its HTTP view is not used: its per-request machinery (adapters, a
    sub-response, content-type parsing with `email.message`, hooks found with `inspect`)
    cost about 0.06 ms of CPU, a fifth of a `{ __typename }` request in process.

    Mounted as a plain Starlette route rather than through FastAPI's router: FastAPI's
    dependency resolution cost about 0.3 ms a request here, a tenth of a page of W1 (bench/).
    `context` opens what a request needs (its read connection, its principal) and closes it
    once the response is sent; background tasks (the key's lastUsedAt) run after that."""

    graphql_transport_ws_handler_class = SubscriptionsHandler
    websocket_adapter_class = TextFrames

    def __init__(self, schema: Any, *, context: ContextFactory, documents: Documents,
                 ide_page: str | None = None, retry_after_s: int = 5,
                 persisted_max_age_s: int = 0,
                 socket_context: SocketContextFactory | None = None,
                 init_timeout_s: float = 10.0, subscriptions_per_socket: int = 20,
                 allowed_origins: Sequence[str] = ()) -> None:
        """``ide_page``: the GraphiQL page's HTML (web/graphiql.py), None for no page.
        ``documents``: the persisted ones (api/documents.py); ``persisted_max_age_s``: how
        long a client may keep the answer to a GET of one (0: not at all).
        ``socket_context``: a WebSocket's context (None: WebSockets are refused).
        ``allowed_origins``: pages of other origins that may open a WebSocket (the CORS
        allow-list, CONSUMERS_CORS_ORIGINS; `*` for any); the server's own origin always."""
        super().__init__(schema, graphql_ide="graphiql" if ide_page is not None else None,
                         subscription_protocols=(GRAPHQL_TRANSPORT_WS,),
                         connection_init_wait_timeout=timedelta(seconds=init_timeout_s),
                         max_subscriptions_per_connection=subscriptions_per_socket,
                         allowed_origins=tuple(allowed_origins))  # its handshake's check
        self.persisted_documents = documents
        self._cached_get: list[tuple[bytes, bytes]] = [
            (b"cache-control", f"private, max-age={persisted_max_age_s}".encode()),
            (b"vary", b"Accept, Authorization"),
        ] if persisted_max_age_s > 0 else []
        self._context = context
        self._socket_context = socket_context
        self._retry_after = str(retry_after_s).encode()
        self._ide_page = ide_page
        self._page_policy = page_policy(ide_page) if ide_page is not None else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
            return
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        method = scope["method"]
        params = QueryParams(scope["query_string"]) if method == "GET" else None
        if params is not None and self._ide_page is not None and _asks_for_page(scope, params):
            # The page carries no data: no key needed, no connection opened.
            page = HTMLResponse(self._ide_page,
                                headers={"Content-Security-Policy": self._page_policy})
            await page(scope, receive, send)
            return
        request = Request(scope, receive)
        tasks = BackgroundTasks()
        try:
            async with self._context(request, tasks) as context:
                try:
                    status, body, extra = await self._answer(request, params, context)
                except _Refused as refused:
                    status, body = refused.status, error_body(refused.message, refused.code)
                    extra = [(name.lower().encode(), value.encode())
                             for name, value in (refused.headers or {}).items()]
                    media_type = JSON
                else:
                    media_type = scope.get("state", {}).get(MEDIA_TYPE_STATE, JSON)
                    media_type = f"{media_type}; charset=utf-8"
                own_type = any(name == b"content-type" for name, _ in extra)  # a replay's
                await send({"type": "http.response.start", "status": status, "headers": [
                    (b"content-length", str(len(body)).encode()),
                    *(() if own_type else ((b"content-type", media_type.encode()),)),
                    *extra,
                ]})
                await send({"type": "http.response.body", "body": body})
        except AuthenticationRequired:
            await send({"type": "http.response.start", "status": 401,
                        "headers": _UNAUTHENTICATED_HEADERS})
            await send({"type": "http.response.body", "body": _UNAUTHENTICATED_BODY})
            return
        await tasks()

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket (api/websocket.py): refused at once without graphql-transport-ws, else
        Strawberry's view with a context of its own for the connection's life."""
        socket = WebSocket(scope, receive, send)
        if self._socket_context is None:
            await socket.close(code=4403)  # (before the handshake: HTTP 403)
            return
        refusal = subprotocol_refusal(list(scope.get("subprotocols") or ()))
        if refusal is not None:
            await socket.accept()
            await socket.close(code=SUBPROTOCOL_CLOSE, reason=refusal)
            return
        context = self._socket_context(socket)
        try:
            await self.run(socket, context=context)
        finally:
            await context.repository.reader.close()

    async def _answer(
        self, request: Request, params: QueryParams | None, context: Context
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        method = request.method
        if params is not None:
            if not _names_operation(params) and _accepts_page(request.scope):
                raise _Refused(404, "NOT_FOUND", "Not Found")  # no GraphiQL (production)
            data: Any = dict(params)
            for name in ("variables", "extensions"):
                if data.get(name):
                    data[name] = self.decode_json(data[name])
        elif method == "POST":
            body = request.scope.get(BODY)
            data = self.decode_json(body if body is not None else await request.body())
        else:  # ProtocolGuard answers 405 first
            raise _Refused(405, BAD_REQUEST, "GraphQL only supports GET and POST requests.")
        if not isinstance(data, dict):
            raise _Refused(400, BAD_REQUEST, "The request body must be a JSON object.")
        query, variables = data.get("query"), data.get("variables")
        extensions, operation_name = data.get("extensions"), data.get("operationName")
        if not isinstance(query, str | None):
            raise _Refused(400, BAD_REQUEST, "The GraphQL operation's `query` must be a string "
                           "or null, if provided.")
        if not isinstance(variables, dict | None):
            raise _Refused(400, BAD_REQUEST, _MALFORMED_VARIABLES)
        if not isinstance(extensions, dict | None):
            raise _Refused(400, BAD_REQUEST, "The GraphQL operation's `extensions` must be an "
                           "object or null, if provided.")
        if not isinstance(operation_name, str | None):
            raise _Refused(400, BAD_REQUEST, "The GraphQL operation's `operationName` must be a "
                           "string or null, if provided.")
        try:
            resolved = self.persisted_documents.resolve(data, query, extensions)
        except DocumentRefusal as refusal:
            if refusal.status == 200:  # APQ's "send the document": under both media types
                extra = [(name.lower().encode(), value.encode())
                         for name, value in (refusal.headers or {}).items()]
                return 200, error_body(refusal.message, refusal.code), extra
            raise _Refused(refusal.status, refusal.code, refusal.message,
                           refusal.headers) from None
        query, context.pinned = resolved.query, resolved.pinned
        run = partial(self._execute, request, context, query, variables, extensions,
                      operation_name, cacheable=resolved.persisted and method == "GET",
                      resolved=resolved)
        # The document parsed here under the same token limit as its execution: a keyed
        # request must not make the server lex a whole body the limit would refuse at once.
        if (method != "POST" or idempotency.HEADER not in request.headers
                or _first_mutation_field(query, operation_name,
                                         request.app.state.settings.max_tokens) is None):
            return await run()  # (a key on a query is ignored; a refused document too)
        key = _idempotency_key(request)
        # A mutation with an Idempotency-Key: one transaction with its key (web/idempotency.py).
        assert context.principal is not None, "an HTTP request is authenticated"
        if context.rate_limiter is not None:
            refused = await _charged_first(run, context)
            if refused is not None:
                return refused
        media_type = request.scope.get("state", {}).get(MEDIA_TYPE_STATE, JSON)

        async def attempt() -> _Answer:
            # Each run reads anew: a run again of the whole unit (after a deadlock) must not
            # see what the rolled-back run loaded.
            context.loaders.clear()
            return await run()

        return await idempotency.graphql_mutation(
            request, context.principal, context.repository.reader, key,
            {"query": query, "operationName": operation_name, "variables": variables or {}},
            f"{media_type}; charset=utf-8", self._retry_after, attempt,
            partial(_charged_cost, context))

    async def _execute(
        self, request: Request, context: Context, query: str | None,
        variables: dict[str, Any] | None, extensions: dict[str, Any] | None,
        operation_name: str | None, *, cacheable: bool = False,
        resolved: Resolved | None = None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        method = request.method
        try:
            # a query ready to run (api/schema.py; allowed over both methods), else the rest
            result = await cast("Schema", self.schema).execute_ready(
                query, variables, context, operation_name, extensions)
            if result is None:
                result = await self.schema.execute(
                    query, variable_values=variables, context_value=context,
                    operation_name=operation_name,
                    allowed_operation_types=_ALLOWED[method],
                    operation_extensions=extensions,
                )
        except CannotGetOperationTypeError as error:
            raise _Refused(400, BAD_REQUEST, error.as_http_error_reason()) from error
        except InvalidOperationTypeError as error:
            if error.operation_type is StrawberryOperationType.SUBSCRIPTION:
                raise _Refused(400, BAD_REQUEST, SUBSCRIPTIONS_OVER_HTTP) from error
            if method == "GET":
                raise _Refused(405, "METHOD_NOT_ALLOWED",
                               "Mutations are only accepted over POST.", {"Allow": "POST"}
                               ) from error
            raise _Refused(400, BAD_REQUEST, error.as_http_error_reason(method)) from error
        except MissingQueryError as error:
            raise _Refused(400, BAD_REQUEST, "No GraphQL query found in the request") from error
        if resolved is not None and context.cost is not None:
            # (priced: parsed, valid, within the limits)
            self.persisted_documents.register(resolved)
        if not context.admitted:
            await _throttle_status(context, result)
        status, body, extra = self._response(request, result, query, operation_name,
                                             context.throttle)
        if cacheable and status == 200 and not result.errors:
            extra = [*extra, *self._cached_get]  # (a mutation over GET was refused: 405)
        return status, body, extra

    def _response(
        self, request: Request, result: ExecutionResult, query: str | None,
        operation_name: str | None, throttle: Throttle | None = None,
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        errors = result.errors or []
        # An error before execution (no path anywhere) means the spec's "no data entry".
        request_error = bool(errors) and result.data is None and all(
            error.path is None for error in errors
        )
        state = request.scope.setdefault("state", {})
        unavailable = False
        if any(_is_unavailable(error) for error in errors):
            # 503 (retry) only when nothing was written: nothing ran, a query came back
            # without data, or a mutation's first field failed; past that a write may have
            # committed. Only then is it worth parsing again.
            may_have_written = False
            if any(error.path is not None and _is_unavailable(error) for error in errors):
                first = _first_mutation_field(query, operation_name)
                failed_first = result.data is None and all(
                    error.path is not None and list(error.path) == [first] for error in errors)
                may_have_written = first is not None and not failed_first
            unavailable = request_error or (result.data is None and not may_have_written)
        _observe(result, request_error)
        response: GraphQLHTTPResponse = {} if request_error else {"data": result.data}
        if errors:
            response["errors"] = [error.formatted for error in errors]
        if result.extensions:
            response["extensions"] = result.extensions
        body = self.encode_json(response)
        if unavailable:  # the database (or the rate limit's Redis) out of reach: under both
            return 503, body, [(b"retry-after", self._retry_after)]
        if request_error and throttle is not None and not throttle.allowed and any(
                (error.extensions or {}).get("code") == THROTTLED for error in errors):
            # Under both media types, as a 503: a client backs off on the status alone.
            return 429, body, [(b"retry-after", str(throttle.retry_after).encode())]
        if request_error and state.get(MEDIA_TYPE_STATE, JSON) == GRAPHQL_RESPONSE_JSON:
            # A refused scope is a permission problem (403), any other request error a bad
            # request (400); both only under application/graphql-response+json.
            forbidden = all((error.extensions or {}).get("code") == FORBIDDEN
                            for error in errors)
            return (403 if forbidden else 400), body, []
        return 200, body, []

    def decode_json(self, data: str | bytes) -> object:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass  # json's own answer, and its reason: it also takes NaN and long integers
        try:
            return json.loads(data)
        except json.JSONDecodeError as error:
            reason = str(error)
        except UnicodeDecodeError:
            reason = "it is not valid UTF-8"
        except RecursionError:
            reason = "it is nested too deeply"
        except ValueError:  # an integer past Python's limit of 4,300 digits
            reason = "a number has too many digits"
        raise _Refused(400, BAD_REQUEST, f"Malformed JSON: {reason}.")

    def encode_json(self, data: object) -> bytes:
        # OPT_UTC_Z: a compiled query's data may hold UTC datetimes, written here as the
        # DateTime scalar writes them (api/executor.py: execute_compiled's `wire`)
        try:
            return orjson.dumps(data, option=orjson.OPT_UTC_Z)
        except TypeError:  # an integer beyond 64 bits in someone's metadata
            return json.dumps(data, separators=(",", ":"), default=_wire_datetime).encode()


def _wire_datetime(value: object) -> str:
    if isinstance(value, datetime):
        return format_datetime(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# Subscriptions only over the WebSocket (api/websocket.py): Strawberry would also stream them
# over HTTP (multipart), which this endpoint does not speak.
_ALLOWED = {method: frozenset(StrawberryOperationType.from_http(method))
            - {StrawberryOperationType.SUBSCRIPTION} for method in ("GET", "POST")}
SUBSCRIPTIONS_OVER_HTTP = ("Subscriptions are served over the graphql-transport-ws WebSocket at "
                           "/graphql, not over HTTP.")
_UNAUTHENTICATED_BODY = json.dumps(
    {"errors": [{"message": AUTHENTICATION_REQUIRED, "extensions": {"code": UNAUTHENTICATED}}]},
    separators=(",", ":")).encode()
_UNAUTHENTICATED_HEADERS = [
    (b"content-length", str(len(_UNAUTHENTICATED_BODY)).encode()),
    (b"content-type", JSON.encode()),
    (b"www-authenticate", b"Bearer"),
]


def _accepts_page(scope: Scope) -> bool:
    accept = Headers(scope=scope).get("accept", "")
    return "text/html" in accept or "*/*" in accept


def _asks_for_page(scope: Scope, params: QueryParams) -> bool:
    """Strawberry's own test for serving the IDE page: a GET without a query from a browser
    (or `*/*`); the page carries no data."""
    return not _names_operation(params) and _accepts_page(scope)


_OPERATION_PARAMETERS = ("query", "documentId", "doc_id", "extensions")


def _names_operation(params: QueryParams) -> bool:
    """A GET that names an operation: its text, a trusted document's id or an APQ hash."""
    return any(name in params for name in _OPERATION_PARAMETERS)


def _observe(result: ExecutionResult, request_error: bool) -> None:
    """The operation's cost, and the limits that refused it, for the access line and the
    metrics."""
    cost = (result.extensions or {}).get("cost", {}).get("requested")
    if isinstance(cost, int):
        observe.priced(cost)
    if request_error:
        for error in result.errors or ():
            code = (error.extensions or {}).get("code")
            if code in LIMIT_CODES:
                observe.refused(code)


async def _throttle_status(context: Context, result: ExecutionResult) -> None:
    """`extensions.cost.throttleStatus` for an answer whose operation never reached the rate
    limit (refused by a limit, invalid, unparsable): the bucket as it is, nothing taken."""
    limiter = context.rate_limiter
    if limiter is None or context.principal is None:
        return
    try:
        context.throttle = await limiter.peek(context.principal)
    except RateLimitUnavailable:
        return  # the refusal stands as it is; no status to report
    if context.throttle is not None:
        extensions = result.extensions if result.extensions is not None else {}
        extensions.setdefault("cost", {})["throttleStatus"] = context.throttle.status()
        result.extensions = extensions


def _charged_cost(context: Context) -> dict[str, Any] | None:
    """`extensions.cost` of an operation priced and charged, for an answer that did not
    execute it (a keyed mutation refused 409 or 422)."""
    if context.requested is None:
        return None
    cost: dict[str, Any] = {"requested": context.requested,
                            "limit": context.settings.max_cost}
    if context.throttle is not None:
        cost["throttleStatus"] = context.throttle.status()
    return cost


async def _charged_first(
    run: Callable[[], Awaitable[_Answer]], context: Context
) -> _Answer | None:
    """A keyed mutation priced, and its cost taken from the key's bucket, before its
    transaction opens and its key is claimed: a throttled one (or one refused by a limit,
    invalid, or meeting a Redis out of reach when the limiter fails closed) sends no SQL and
    is not recorded. The answer of that refusal; None once the cost is taken (the second
    pass then executes without taking it again)."""
    context.charge_only = True
    try:
        answer = await run()
    finally:
        context.charge_only = False
    return None if context.charged else answer


def _is_unavailable(error: GraphQLError) -> bool:
    return (error.extensions or {}).get("code") == SERVICE_UNAVAILABLE


def _idempotency_key(request: Request) -> str:
    try:
        key = idempotency.key_of(request.headers)
    except idempotency.MalformedKey as malformed:
        raise _Refused(400, idempotency.BAD_KEY, malformed.message) from None
    assert key is not None, "the header is there"
    return key


def _first_mutation_field(query: str | None, operation_name: str | None,
                          max_tokens: int | None = None) -> str | None:
    """The response key of a mutation's first root field ("" when it is a fragment's), None
    for any other operation, and for a document over `max_tokens`."""
    try:
        operation = get_operation_ast(parse(query or "", max_tokens=max_tokens), operation_name)
    except GraphQLError:
        return None
    if operation is None or operation.operation is not OperationType.MUTATION:
        return None
    first = operation.selection_set.selections[0]
    if not isinstance(first, FieldNode):
        return ""  # matches no path: a fragment's fields are not told apart here
    return (first.alias or first.name).value
