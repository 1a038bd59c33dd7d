"""How the REST routes read request bodies: only once the key and its scope are checked
(401 and 403 before a byte of the body is read), within a size limit (413 past it, by the
declared length or counted as the body streams, so a chunked body cannot slip past), and,
on the batch endpoints, parsed an item at a time, stopping past the batch limit: 32 MiB of
`[{}, …]` would otherwise become 11 million dicts (~700 MB) before anything counts them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Sequence
from contextlib import aclosing
from functools import partial
from typing import Any

import orjson
from fastapi import BackgroundTasks, HTTPException, Request, Response
from fastapi.routing import APIRoute

from consumers_graphql.domain.validation import BATCH_MAX, METADATA_MAX_BYTES, check_metadata_size
from consumers_graphql.errors import DomainError
from consumers_graphql.rest.models import ErrorOut
from consumers_graphql.settings import Settings
from consumers_graphql.store import outage
from consumers_graphql.store.db import Database
from consumers_graphql.store.keys import Principal, Scope
from consumers_graphql.web import idempotency, observe
from consumers_graphql.web.dependencies import READER_STATE
from consumers_graphql.web.http_auth import PRINCIPAL_STATE, Forbidden, require_api_key
from consumers_graphql.web.rate_limit import (
    MAX_COST_EXCEEDED,
    RATE_LIMIT_EXCEEDED,
    RATE_LIMIT_STATE,
    THROTTLED,
    RateLimiter,
    RateLimitUnavailable,
    cost_over_capacity_message,
    rest_cost,
)

# The batch endpoints' paths end so: /api/v1/consumers/batch, /api/v1/consumers/batch/upsert.
BATCH_SUFFIXES = ("/batch", "/batch/upsert")
# Objects and arrays a valid batch can hold: each item, and in its metadata (16 KiB compact)
# at most one per two bytes. Each costs ~64 bytes parsed, so a body of `[{}, …]` inside one
# item's metadata is refused before it becomes millions of dicts.
MAX_BATCH_CONTAINERS = BATCH_MAX * (1 + METADATA_MAX_BYTES // 2)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_FIRST_WINDOW = 64 * 1024  # characters: four times a valid item's metadata


class PayloadTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is over the limit of {limit:,} bytes.",
                         headers={"Connection": "close"})


class BatchTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(400, f"A batch takes at most {BATCH_MAX} items; more were given. "
                         "Nothing was written.")


class TooManyContainers(HTTPException):
    def __init__(self) -> None:
        super().__init__(400, f"The body holds more than {MAX_BATCH_CONTAINERS:,} JSON objects "
                         f"and arrays, more than {BATCH_MAX} items with valid metadata can.")


class ItemTooLarge(HTTPException):
    def __init__(self, number: int, limit: int) -> None:
        super().__init__(400, f"Item {number} takes more than {limit:,} characters of JSON, "
                         "the limit of a body of POST /api/v1/consumers. Nothing was written.")


# Where a request's malformed-JSON reason is kept (in the ASGI scope's state, which the
# exception handlers see): its body parses as null, which no body model accepts, so
# validation refuses it (400) only after the dependencies (authentication, scopes) have run.
MALFORMED_JSON = "rest_malformed_json"


def malformed_json(request: Request) -> str | None:
    reason: str | None = request.scope.get("state", {}).get(MALFORMED_JSON)
    return reason


class RefusedMetadata:
    """Stands for an item's metadata refused as the body was parsed (over 16 KiB serialised,
    or not storable): its error is kept, not its content, so that a batch of oversize
    metadata costs about its body's size while every refused item is still reported."""

    __slots__ = ("error",)

    def __init__(self, error: DomainError) -> None:
        self.error = error


def _metadata_checked(item: Any, index: int) -> Any:
    metadata = item.get("metadata") if isinstance(item, dict) else None
    if isinstance(metadata, dict):
        try:
            check_metadata_size(metadata, ("input", str(index), "metadata"))
        except DomainError as error:
            # Without its traceback, whose frames hold the metadata.
            item["metadata"] = RefusedMetadata(error.with_traceback(None))
        except RecursionError:
            pass  # the field rules report it, as for any body
    return item


def restore_refused_metadata(
    errors: Sequence[DomainError], metadata: Sequence[Any]
) -> list[DomainError]:
    """The services' errors with each refused metadata's own error in place of the one they
    give its stand-in (not an object); ``metadata`` holds each item's value, in input order."""
    refused: dict[tuple[str, ...], DomainError] = {
        ("input", str(i), "metadata"): value.error
        for i, value in enumerate(metadata) if isinstance(value, RefusedMetadata)}
    return [refused.get(error.field, error) if error.field else error for error in errors]


def _item(text: str, index: int, limit: int, number: int) -> tuple[Any, int]:
    """The array item at ``index``, parsed from at most ``limit`` characters of ``text``: one
    item of a 32 MiB body would otherwise cost ~15 times its size before its size is known.
    A short window first: copying the whole limit for every small item would cost more."""
    for size in (min(_FIRST_WINDOW, limit), limit):
        window = text[index:index + size]
        try:
            item, end = _DECODER.raw_decode(window)
        except json.JSONDecodeError as error:
            # Where a cut item fails: at the window's end, or at a string running past it.
            cut = len(window) == size and (error.pos >= size - 6
                                           or error.msg.startswith("Unterminated string"))
            if not cut:
                raise json.JSONDecodeError(error.msg, text, index + error.pos) from None
            continue
        return item, index + end
    raise ItemTooLarge(number, limit)


def bounded_array(body: bytes, max_items: int, item_limit: int) -> Any:
    """The JSON of ``body``, parsed one array item at a time when it is an array, so that
    no more than ``max_items`` items are ever built (BatchTooLarge past that), none from more
    than ``item_limit`` characters (ItemTooLarge), and not at all when the body holds more
    objects and arrays than a valid batch can (counted in C; a brace inside a string counts
    too, which only a batch of brace-filled metadata would notice). Metadata refused as
    each item is parsed is dropped at once (RefusedMetadata): a batch then costs about
    twice its body's size."""
    if body.count(b"{") + body.count(b"[") > MAX_BATCH_CONTAINERS:
        raise TooManyContainers
    text = body.decode()
    index = _WHITESPACE.match(text).end()  # type: ignore[union-attr]  # `*`: always a match
    if not text.startswith("[", index):
        return json.loads(text)
    items: list[Any] = []
    index = _WHITESPACE.match(text, index + 1).end()  # type: ignore[union-attr]  # `*`: always a match
    while not text.startswith("]", index):
        if len(items) == max_items:
            raise BatchTooLarge
        if items:  # after an item: a comma, then the next
            if not text.startswith(",", index):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
            index = _WHITESPACE.match(text, index + 1).end()  # type: ignore[union-attr]  # `*`: always a match
        item, index = _item(text, index, item_limit, len(items))
        items.append(_metadata_checked(item, len(items)))
        index = _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]  # `*`: always a match
    index = _WHITESPACE.match(text, index + 1).end()  # type: ignore[union-attr]  # `*`: always a match
    if index != len(text):
        raise json.JSONDecodeError("Extra data", text, index)
    return items


class _LimitedRequest(Request):
    limit: int = 0
    max_items: int | None = None  # a batch endpoint's
    item_limit: int = 0  # a batch endpoint's, for one item

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
                self._json = (json.loads(body) if self.max_items is None
                              else bounded_array(body, self.max_items, self.item_limit))
            except RecursionError:
                reason = "it is nested too deeply"
            except ValueError as error:  # JSONDecodeError, bad UTF-8, a huge integer
                reason = str(error)
            if reason is not None:
                self._json = None
                self.scope.setdefault("state", {})[MALFORMED_JSON] = reason
        return self._json


def is_batch(path: str) -> bool:
    return path.endswith(BATCH_SUFFIXES)


def body_limit(settings: Settings, path: str) -> int:
    """The batch endpoints take up to 500 items of 16 KiB metadata each, hence their own limit."""
    if is_batch(path):
        return settings.max_batch_body_bytes
    return settings.max_body_bytes


def _refusal(status: int, error: str, details: list[dict[str, str]],
             headers: dict[str, str]) -> Response:
    return Response(orjson.dumps({"error": error, "details": details}), status_code=status,
                    media_type="application/json", headers=headers)


async def _rate_limited(
    limiter: RateLimiter, principal: Principal, cost: int, request: Request, path: str
) -> Response | None:
    """The key's bucket takes the call's cost, or the refusal to send: 429 (Retry-After:
    when the bucket will hold it), 400 when it never can, 503 when Redis is out of reach and
    the limiter fails closed. Nothing has run yet either way."""
    try:
        throttle = await limiter.take(principal, cost)
    except RateLimitUnavailable:
        retry_after = str(request.app.state.settings.retry_after_s)
        return _refusal(503, outage.REST_MESSAGE, [], {"Retry-After": retry_after})
    request.scope.setdefault("state", {})[RATE_LIMIT_STATE] = throttle
    if throttle is None or throttle.allowed:
        return None
    if not throttle.can_ever_pass:
        # Counted as GraphQL counts the same refusal: no throttle, a cost over a limit.
        observe.refused(MAX_COST_EXCEEDED)
        field = "body" if "/batch" in path else "first"
        return _refusal(400, "Validation failed", [
            {"field": field, "message": cost_over_capacity_message(throttle)}],
            throttle.headers())
    observe.refused(THROTTLED)
    return _refusal(429, RATE_LIMIT_EXCEEDED, [],
                    {"Retry-After": str(throttle.retry_after), **throttle.headers()})


_STRING = {"schema": {"type": "string"}}
# Documented on every answer of every REST operation (OpenAPI).
RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {**_STRING, "description": "The API key's rate limit (IETF draft "
                         "draft-ietf-httpapi-ratelimit-headers): `\"default\";q=20000;w=10`, "
                         "q cost points that restore in w seconds."},
    "RateLimit": {**_STRING, "description": "What is left of it: `\"default\";r=19980;t=1`, "
                  "r points now, full again in t seconds."},
}


class RestRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        """A write (any method but GET) is documented with the Idempotency-Key header it
        takes, the statuses only that header brings, and the header marking a replay of its
        answer (web/idempotency.py)."""
        if set(kwargs.get("methods") or ()) - {"GET", "HEAD"}:
            responses = {**(kwargs.get("responses") or {}), **{
                status: {"model": ErrorOut, "description": text}
                for status, text in idempotency.OPENAPI_RESPONSES.items()}}
            # every answer a replay may repeat: a success (an upsert's 201 and 200), and a
            # refusal for what the database holds (400 `Email already exists`, 404)
            replayable = {kwargs.get("status_code") or 200} | {
                code for code in responses
                if str(code).startswith("2") or str(code) in ("400", "404")}
            for code in replayable:
                answer = dict(responses.get(code, {}))
                answer["headers"] = {**answer.get("headers", {}),
                                     idempotency.REPLAYED: idempotency.OPENAPI_REPLAYED}
                responses[code] = answer
            kwargs["responses"] = responses
            extra = dict(kwargs.get("openapi_extra") or {})
            extra["parameters"] = [*extra.get("parameters", ()), idempotency.OPENAPI_PARAMETER]
            kwargs["openapi_extra"] = extra
        responses = {code: dict(response)
                     for code, response in (kwargs.get("responses") or {}).items()}
        success = kwargs.get("status_code") or 200
        responses.setdefault(success, {})
        for code, response in responses.items():
            if code not in (401, 403):  # refused before the key's bucket is known
                response["headers"] = {**RATE_LIMIT_HEADERS, **response.get("headers", {})}
        kwargs["responses"] = responses
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        path = self.path
        scope = Scope.READ if self.methods == {"GET"} else Scope.WRITE

        async def limited(request: Request) -> Response:
            limited_request = _LimitedRequest(request.scope, request.receive)
            limited_request.limit = body_limit(request.app.state.settings, path)
            if is_batch(path):
                limited_request.max_items = BATCH_MAX
                limited_request.item_limit = request.app.state.settings.max_body_bytes
            # FastAPI reads the body before it resolves dependencies: authenticate first here,
            # on the request's read connection, which the dependencies then share.
            database: Database = request.app.state.database
            reader = database.request_reader()
            state = request.scope.setdefault("state", {})
            state[READER_STATE] = reader
            try:
                tasks = BackgroundTasks()
                principal = await require_api_key(limited_request, tasks, reader)
                if not principal.allows(scope):
                    raise Forbidden(scope)
                state[PRINCIPAL_STATE] = principal
                limiter: RateLimiter = request.app.state.rate_limiter
                # Before anything runs: a batch's cost is its items (its body parsed here,
                # once: FastAPI's handler reads the same).
                items = None
                if scope is Scope.WRITE and "/batch" in path:
                    parsed = await limited_request.json()
                    items = len(parsed) if isinstance(parsed, list) else None
                cost = rest_cost(is_list=self.methods == {"GET"} and "{" not in path,
                                 query=request.query_params, items=items)
                refusal = await _rate_limited(limiter, principal, cost, request, path)
                if refusal is not None:
                    return refusal
                # A write with an Idempotency-Key runs as one transaction with its key.
                response = await idempotency.rest_write(
                    limited_request, principal, reader, partial(handler, limited_request))
            finally:
                await reader.close()
            throttle = state.get(RATE_LIMIT_STATE)
            if throttle is not None:
                response.headers.update(throttle.headers())
            if tasks.tasks:
                if response.background is not None:
                    tasks.add_task(response.background)
                response.background = tasks
            return response

        return limited
