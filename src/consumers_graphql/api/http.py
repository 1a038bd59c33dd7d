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
A body the client stopped sending is never executed, and nothing is answered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any, cast
from urllib.parse import unquote_to_bytes

import orjson
from cross_web import HTTPException
from fastapi import BackgroundTasks
from graphql import FieldNode, GraphQLError, OperationType, get_operation_ast, parse
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.asgi import GraphQL as StrawberryGraphQL
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.schema.exceptions import InvalidOperationTypeError
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET

from consumers_graphql.api.context import Context
from consumers_graphql.api.limits import LIMIT_CODES
from consumers_graphql.api.permissions import FORBIDDEN
from consumers_graphql.store.outage import SERVICE_UNAVAILABLE
from consumers_graphql.web import observe
from consumers_graphql.web.dependencies import JSON, MEDIA_TYPE_STATE
from consumers_graphql.web.security_headers import page_policy

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
REQUEST_ERROR_STATE = "graphql_request_error"
_UTF8 = frozenset({"utf-8", "utf8"})
_JSON_WHITESPACE = b" \t\n\r"
BAD_REQUEST = "BAD_REQUEST"
MAY_HAVE_WRITTEN_STATE = "graphql_may_have_written"
PAYLOAD_TOO_LARGE = observe.PAYLOAD_TOO_LARGE


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
        headers = Headers(scope=scope)
        method = scope["method"]
        if method not in ("GET", "POST"):
            await _refuse(send, 405, "METHOD_NOT_ALLOWED",
                          "/graphql takes GET (queries) and POST.", {"Allow": "GET, POST"})
            return
        media_type = negotiate(headers.get("accept"))
        asks_for_page = method == "GET" and "query" not in QueryParams(scope["query_string"])
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
            receive = _replay(body, receive)
        elif not _is_utf8(scope["query_string"]):
            await _refuse(send, 400, BAD_REQUEST, "The query string is not valid UTF-8.")
            return
        await self.app(scope, receive, send)

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | None:
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
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


ContextFactory = Callable[[Request, BackgroundTasks], AbstractAsyncContextManager[Context]]
_REQUEST_SCOPE = "consumers.graphql"


class GraphQLApp(StrawberryGraphQL[Context, None]):
    """Strawberry's ASGI view, answering in the negotiated media type with the spec's codes.

    Mounted as a plain Starlette route rather than through FastAPI's router: FastAPI's
    dependency resolution cost about 0.3 ms a request here, a tenth of a page of W1 (bench/).
    `context` opens what a request needs (its read connection, its principal) and closes it
    once the response is sent; background tasks (the key's lastUsedAt) run after that."""

    def __init__(self, schema: Any, *, context: ContextFactory,
                 ide_page: str | None = None, retry_after_s: int = 5) -> None:
        """``ide_page``: the GraphiQL page's HTML (web/graphiql.py), None for no page."""
        super().__init__(schema, graphql_ide="graphiql" if ide_page is not None else None)
        self._context = context
        self._retry_after_s = retry_after_s
        self._ide_page = ide_page or ""
        self._page_policy = page_policy(self._ide_page) if ide_page is not None else ""

    async def render_graphql_ide(self, request: Any) -> HTMLResponse:
        return HTMLResponse(self._ide_page,
                            headers={"Content-Security-Policy": self._page_policy})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        tasks = BackgroundTasks()
        async with AsyncExitStack() as resources:
            scope[_REQUEST_SCOPE] = (resources, tasks)
            response = await self.run(Request(scope, receive))
            await response(scope, receive, send)
        await tasks()

    async def get_context(self, request: Any, response: Any) -> Context:
        resources, tasks = cast("tuple[AsyncExitStack, BackgroundTasks]",
                                request.scope[_REQUEST_SCOPE])
        return await resources.enter_async_context(self._context(request, tasks))

    def decode_json(self, data: str | bytes) -> object:
        # Strawberry answers 400 only for a JSONDecodeError; these others would be a 500.
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
        raise HTTPException(400, f"Malformed JSON: {reason}.")

    async def parse_http_body(self, request: Any) -> Any:
        data = await super().parse_http_body(request)
        if isinstance(data, GraphQLRequestData) and not isinstance(data.operation_name,
                                                                   str | None):
            raise HTTPException(400, "The GraphQL operation's `operationName` must be a string "
                                "or null, if provided.")
        return data

    def encode_json(self, data: object) -> bytes:
        try:
            return orjson.dumps(data)
        except TypeError:  # an integer beyond 64 bits in someone's metadata
            return json.dumps(data, separators=(",", ":")).encode()

    async def run(
        self, request: Any, context: Any = UNSET, root_value: Any = UNSET
    ) -> Any:
        if self.is_websocket_request(request):
            return await super().run(request, context, root_value)
        try:
            response = await super().run(request, context, root_value)
        except _Refused as refused:
            return Response(error_body(refused.message, refused.code), status_code=refused.status,
                            media_type=JSON, headers=refused.headers)
        except HTTPException as error:
            code = "NOT_FOUND" if error.status_code == 404 else BAD_REQUEST
            return Response(error_body(error.reason, code), status_code=error.status_code,
                            media_type=JSON)
        if isinstance(response, HTMLResponse | StreamingResponse):
            return response
        state = request.scope.get("state", {})
        media_type = state.get(MEDIA_TYPE_STATE, JSON)
        response.headers["content-type"] = f"{media_type}; charset=utf-8"
        request_error_status = state.get(REQUEST_ERROR_STATE)
        if request_error_status == 503:  # the database out of reach: under both media types
            response.status_code = 503
            response.headers["Retry-After"] = str(self._retry_after_s)
            return response
        if (media_type == GRAPHQL_RESPONSE_JSON and request_error_status
                and response.status_code == 200):
            response.status_code = request_error_status
        return response

    async def execute_single(
        self,
        request: Request,
        request_adapter: Any,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        try:
            result = await super().execute_single(
                request, request_adapter, sub_response, context, root_value, request_data
            )
        except HTTPException as error:
            if isinstance(error.__cause__, InvalidOperationTypeError) and request.method == "GET":
                raise _Refused(405, "METHOD_NOT_ALLOWED",
                               "Mutations are only accepted over POST.", {"Allow": "POST"}
                               ) from error
            raise
        errors = result.errors or ()
        if any(error.path is not None and _is_unavailable(error) for error in errors):
            # Only then is it worth parsing again: a mutation that ran may have committed.
            first = _first_mutation_field(request_data.query, request_data.operation_name)
            failed_first = result.data is None and all(
                error.path is not None and list(error.path) == [first] for error in errors)
            request.scope.setdefault("state", {})[MAY_HAVE_WRITTEN_STATE] = (
                first is not None and not failed_first)
        return result

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        errors = result.errors or []
        # An error before execution (no path anywhere) means the spec's "no data entry".
        request_error = bool(errors) and result.data is None and all(
            error.path is None for error in errors
        )
        # A refused scope is a permission problem (403), any other request error a bad
        # request (400); both only under application/graphql-response+json.
        forbidden = all((error.extensions or {}).get("code") == FORBIDDEN for error in errors)
        state = request.scope.setdefault("state", {})
        # 503 (retry) only when nothing was written: nothing ran, a query came back without
        # data, or a mutation's first field failed; past that a write may have committed.
        unavailable = any(_is_unavailable(error) for error in errors) and (
            request_error
            or (result.data is None and not state.get(MAY_HAVE_WRITTEN_STATE, False)))
        state[REQUEST_ERROR_STATE] = (
            503 if unavailable else (403 if forbidden else 400) if request_error else None
        )
        _observe(result, request_error)
        response: GraphQLHTTPResponse = {} if request_error else {"data": result.data}
        if errors:
            response["errors"] = [error.formatted for error in errors]
        if result.extensions:
            response["extensions"] = result.extensions
        return response


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


def _is_unavailable(error: GraphQLError) -> bool:
    return (error.extensions or {}).get("code") == SERVICE_UNAVAILABLE


def _first_mutation_field(query: str | None, operation_name: str | None) -> str | None:
    """The response key of a mutation's first root field ("" when it is a fragment's), None
    for any other operation."""
    try:
        operation = get_operation_ast(parse(query or ""), operation_name)
    except GraphQLError:
        return None
    if operation is None or operation.operation is not OperationType.MUTATION:
        return None
    first = operation.selection_set.selections[0]
    if not isinstance(first, FieldNode):
        return ""  # matches no path: a fragment's fields are not told apart here
    return (first.alias or first.name).value
