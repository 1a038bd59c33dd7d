"""The ``Idempotency-Key`` header on writes (IETF draft-ietf-httpapi-idempotency-key-header,
Stripe's semantics): REST writes (POST, PUT, PATCH, DELETE under /api/v1) and POST /graphql
carrying a mutation. The key is 1 to 255 visible ASCII characters (the draft's quoted
string form, ``"…"``, is taken too), scoped to the authenticated API key.

A request with a key is fingerprinted (method, path and query, the body as canonical JSON:
sorted keys, no whitespace; for GraphQL the document, operationName and variables) and run
as one unit with its key (store/idempotency.py): the first answer under 500 is recorded in
the write's own transaction and replayed byte for byte, with ``Idempotent-Replayed: true``,
to the same request; another request with the key is 422 IDEMPOTENCY_KEY_REUSED, the same
key while its first request runs 409 IDEMPOTENCY_KEY_IN_USE. 5xx answers are not recorded,
and their writes are rolled back. A request refused for its input alone (a malformed
body, a GraphQL document that does not validate, a use-case's refusal of an invalid value:
store/idempotency.py's Unit.decided) wrote nothing and is not recorded either: the fixed
request can be sent with the same key. A key on a read (REST GET, a GraphQL query) is ignored, as
Stripe ignores it on GET.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from consumers_graphql.errors import DomainError, DomainErrors
from consumers_graphql.store.db import Reader
from consumers_graphql.store.idempotency import Answer, IdempotencyStore, Refusal
from consumers_graphql.store.keys import Principal

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
KEY_MAX = 255
BAD_KEY = "BAD_REQUEST"
# The headers of an answer that are its own, and recorded with it (the others, such as the
# request id and the security headers, are the middleware's, for each answer).
_RECORDED = ("content-type", "location")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_UNRECORDED_GRAPHQL = frozenset({"SERVICE_UNAVAILABLE", "INTERNAL_SERVER_ERROR"})


# How REST writes document the header (rest/body.py's RestRoute).
OPENAPI_PARAMETER: dict[str, Any] = {
    "name": HEADER, "in": "header", "required": False,
    "description": "Makes the write safe to retry: the first answer (under 500) is kept 24 h "
    "(setting) for this API key and replayed, with `Idempotent-Replayed: true`, to the same "
    "request (method, path and query, JSON body); nothing is written again.",
    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX,
               "pattern": "^[\\x21-\\x7e]+$"},
}
OPENAPI_REPLAYED: dict[str, Any] = {
    "description": "`true` when this answer is the replay of the first answer to this "
                   "Idempotency-Key (nothing was written again); absent otherwise.",
    "schema": {"type": "string", "enum": ["true"]},
}
OPENAPI_RESPONSES: dict[int | str, str] = {
    409: "Idempotency-Key in use: the first request with this key is still running; retry "
         "with backoff.",
    422: "Idempotency-Key reused: the key was used for another request.",
}


class MalformedKey(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def key_of(headers: Headers) -> str | None:
    """The request's Idempotency-Key, None without one; MalformedKey for one that is empty,
    longer than 255 characters, not visible ASCII, or sent twice."""
    values = headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise MalformedKey("Send one Idempotency-Key header, not several.")
    value = values[0]
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # the draft's form: a structured-field string
    if not value:
        raise MalformedKey("The Idempotency-Key header is empty: send 1 to 255 visible ASCII "
                           "characters, such as a UUID.")
    if len(value) > KEY_MAX:
        raise MalformedKey(f"The Idempotency-Key header is {len(value)} characters long: at "
                           f"most {KEY_MAX}.")
    if not all("!" <= character <= "~" for character in value):
        raise MalformedKey("The Idempotency-Key header takes visible ASCII characters only "
                           "(no spaces, control characters or non-ASCII), such as a UUID.")
    return value


def fingerprint(method: str, target: str, payload: Any, raw: bytes = b"") -> str:
    """SHA-256 of the request as canonical JSON (sorted keys, compact), so that whitespace
    and key order do not make two requests differ; of its raw bytes when the body is not
    JSON (`payload` None with a body) or holds what JSON cannot write again."""
    try:
        canonical = orjson.dumps([method, target, payload], option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer past 64 bits; or no JSON at all
        try:
            canonical = json.dumps([method, target, payload], sort_keys=True,
                                   separators=(",", ":")).encode()
        except (TypeError, ValueError):
            canonical = b""
    if not canonical or (payload is None and raw):
        canonical = b"\n".join([method.encode(), target.encode(), raw])
    return hashlib.sha256(canonical).hexdigest()


def _store(request: Request) -> IdempotencyStore:
    store: IdempotencyStore = request.app.state.idempotency
    return store


def _target(request: Request) -> str:
    """The path and the query, canonical: its parameters decoded and ordered by name (the
    values of one name kept in their order), so that `?b=2&a=1` and `?a=1&b=%32` are one
    request, as they are to the routes."""
    query = bytes(request.scope.get("query_string", b"")).decode("latin-1")
    path: str = request.scope["path"]
    if not query:
        return path
    pairs = sorted(parse_qsl(query, keep_blank_values=True), key=lambda pair: pair[0])
    return f"{path}?{urlencode(pairs)}"


# ---------------------------------------------------------------------------------- REST


def _rest_error(status: int, message: str) -> Response:
    """The reference's shape; the status tells the cases apart (the API answers 409 and 422
    for nothing else)."""
    body = {"error": _REST_TEXTS[status], "details": [{"field": HEADER, "message": message}]}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_REST_TEXTS = {400: "Invalid Idempotency-Key", 409: "Idempotency-Key in use",
               422: "Idempotency-Key reused"}


async def rest_write(request: Request, principal: Principal, reader: Reader,
                     call: Callable[[], Awaitable[Response]]) -> Response:
    """A REST route's answer, through the key when the request carries one (`call` runs
    the route: FastAPI's handler, body parsing included)."""
    if request.method in _READS:
        return await call()
    try:
        key = key_of(request.headers)
    except MalformedKey as malformed:
        return _rest_error(400, malformed.message)
    if key is None:
        return await call()
    # The body as the route will parse it (cached there): refusals of its size or batch
    # length are raised here, before any transaction, and are not recorded.
    raw = await request.body()
    payload = await request.json() if raw else None
    signed = fingerprint(request.method, _target(request), payload, raw)

    async def work() -> tuple[Answer, bool]:
        try:
            response = await call()
        except (DomainError, DomainErrors) as refused:
            # The use-case ran and refused: its answer (the app's own handler) is recorded.
            response = await _handled(request, refused)
        return _answer(response), True

    try:
        answer = await _store(request).run(principal.key_id, key, signed, reader, work)
    except Refusal as refusal:
        return _rest_error(refusal.status, refusal.message)
    response = Response(answer.body, status_code=answer.status, headers=dict(answer.headers))
    if answer.replayed:
        response.headers[REPLAYED] = "true"
    return response


async def _handled(request: Request, error: Exception) -> Response:
    handlers = request.app.exception_handlers
    for kind in type(error).__mro__:
        if kind in handlers:
            response: Response = await handlers[kind](request, error)
            return response
    raise error


def _answer(response: Response) -> Answer:
    headers = [(name, value) for name, value in response.headers.items()
               if name in _RECORDED]
    return Answer(response.status_code, headers, bytes(response.body))


# ------------------------------------------------------------------------------- GraphQL

GraphQLAnswer = tuple[int, bytes, list[tuple[bytes, bytes]]]


async def graphql_mutation(
    request: Request, principal: Principal, reader: Reader, key: str, payload: dict[str, Any],
    content_type: str, retry_after: bytes, execute: Callable[[], Awaitable[GraphQLAnswer]],
    cost: Callable[[], dict[str, Any] | None] = lambda: None,
) -> GraphQLAnswer:
    """A keyed mutation's answer (status, body, extra headers, its content-type among
    them). The whole operation is one transaction with its key: every mutation field
    commits together, or none does. An answer holding an error that is not the client's
    (the database out of reach, an internal error) rolls everything back and is answered
    without data, 503 (with Retry-After) or 500, and not recorded. `cost` gives the
    operation's `extensions.cost` for the answers made here (a 409 or 422 refusal), which
    the operation was charged for too."""
    signed = fingerprint("POST", _target(request), payload)
    extra: list[tuple[bytes, bytes]] = []

    async def work() -> tuple[Answer, bool]:
        status, body, headers = await execute()
        extra[:] = headers  # those of this run (the unit may run again after a deadlock)
        document = orjson.loads(body)
        errors = document.get("errors") or []
        codes = {(error.get("extensions") or {}).get("code") for error in errors}
        if codes & _UNRECORDED_GRAPHQL:
            failed = [error for error in errors
                      if (error.get("extensions") or {}).get("code") in _UNRECORDED_GRAPHQL]
            status = 503 if "SERVICE_UNAVAILABLE" in codes else 500
            if status == 503 and (b"retry-after", retry_after) not in extra:
                extra.append((b"retry-after", retry_after))
            unrecorded: dict[str, Any] = {"errors": failed}
            if document.get("extensions"):
                unrecorded["extensions"] = document["extensions"]
            return Answer(status, [("content-type", content_type)],
                          orjson.dumps(unrecorded)), False
        # No "data" entry: a request error (parse, validation, variables), nothing ran.
        return Answer(status, [("content-type", content_type)], body), "data" in document

    try:
        answer = await _store(request).run(principal.key_id, key, signed, reader, work)
    except Refusal as refusal:
        refused: dict[str, Any] = {"errors": [{"message": refusal.message,
                                               "extensions": {"code": refusal.code}}]}
        charged = cost()
        if charged is not None:
            refused["extensions"] = {"cost": charged}
        body = orjson.dumps(refused)
        # In the negotiated media type: under application/graphql-response+json a non-2xx
        # answer in application/json is one a client must not read as a GraphQL response
        # (GraphQL over HTTP), and the code is what a BFF retries on.
        return refusal.status, body, [(b"content-type", content_type.encode())]
    headers = [(name.encode(), value.encode()) for name, value in answer.headers]
    if answer.replayed:
        # In the media type this request negotiated: a recorded answer is a 200 with data,
        # whose body is the same under both (the first request may have asked for the other).
        headers = [(b"content-type", content_type.encode()),
                   (REPLAYED.lower().encode(), b"true")]
    else:
        headers.extend(header for header in extra if header[0] != b"content-type")
    return answer.status, answer.body, headers
