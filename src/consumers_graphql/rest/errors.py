"""Failures as the reference spells them: `{"error": "<text>", "details": [...]}` with its
statuses and texts, and the same shape for the statuses it has no row for (403, 404 of an
unknown path, 405, 413)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from consumers_graphql.errors import DomainError, DomainErrors, ErrorCode
from consumers_graphql.rest.body import BatchTooLarge, PayloadTooLarge, malformed_json
from consumers_graphql.rest.models import BATCH_TOO_LARGE
from consumers_graphql.web import observe
from consumers_graphql.web.http_auth import (
    AUTHENTICATION_REQUIRED,
    AuthenticationRequired,
    Forbidden,
    authentication_required_response,
)
from consumers_graphql.web.rate_limit import RATE_LIMIT_STATE

REST_PREFIX = "/api/"
VALIDATION_FAILED = "Validation failed"
MAX_BATCH_SIZE = "Max batch size is 500"
FORBIDDEN = "Forbidden"
PAYLOAD_TOO_LARGE = "Request body too large"
_BODY = "body"

# Codes whose reference text is not "Validation failed".
CONSUMER_NOT_FOUND = "Consumer not found"
_TEXTS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.EMAIL_TAKEN: (400, "Email already exists"),
    ErrorCode.EXTERNAL_ID_TAKEN: (400, "External ID already exists"),
    ErrorCode.BATCH_TOO_LARGE: (400, MAX_BATCH_SIZE),
    ErrorCode.NOT_FOUND: (404, CONSUMER_NOT_FOUND),
}
# Statuses raised as HTTPException (by Starlette, FastAPI or `rest.body`) under /api/.
_HTTP_TEXTS = {
    400: VALIDATION_FAILED,
    404: "Not found",
    405: "Method not allowed",
    413: PAYLOAD_TOO_LARGE,
}


def error_response(
    status: int, error: str, details: Iterable[dict[str, str]] = (),
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": error, "details": list(details)}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def field_path(path: Sequence[Any] | None) -> str:
    """The services' paths re-rooted at the body: ("input", "3", "email") -> "3.email"."""
    parts = list(path or ())
    if parts[:1] == ["input"]:
        parts = parts[1:]
    return ".".join(str(part) for part in parts) or _BODY


def domain_errors_response(errors: Sequence[DomainError]) -> Response:
    """One response for one or more problems: the most specific text the reference has for
    them (a single kind of conflict), else "Validation failed" with every problem listed."""
    # The reference's one text for an unknown id, on every endpoint (all are consumers').
    details = [{"field": field_path(e.field),
                "message": CONSUMER_NOT_FOUND if e.code is ErrorCode.NOT_FOUND else e.message}
               for e in errors]
    kinds = {e.code for e in errors}
    if len(kinds) == 1 and (code := next(iter(kinds))) in _TEXTS:
        status, text = _TEXTS[code]
        return error_response(status, text, details)
    return error_response(400, VALIDATION_FAILED, details)


def _validation_details(
    error: RequestValidationError, malformed: str | None
) -> tuple[str, list[dict[str, str]]]:
    text, details = VALIDATION_FAILED, []
    if malformed is not None:
        details.append({"field": _BODY, "message": f"Malformed JSON: {malformed}"})
    for problem in error.errors():
        location = list(problem.get("loc", ()))
        is_body = location[:1] == [_BODY]
        if location and location[0] in (_BODY, "query", "path"):
            location = location[1:]
        field = field_path(location)
        message = str(problem.get("msg", ""))
        kind = problem.get("type")
        if is_body and malformed is not None:
            continue
        if is_body and isinstance(problem.get("input"), bytes | bytearray):
            field, message = _BODY, "Send the body as JSON, with Content-Type: application/json."
        elif is_body and kind == "missing" and not location:
            message = "A JSON body is required."
        elif kind == BATCH_TOO_LARGE:
            text = MAX_BATCH_SIZE
        details.append({"field": field, "message": message})
    return text, details


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method routed at this path (Starlette's own 405 names only the first route's)."""
    routes = request.app.router.routes
    return [method for method in _METHODS if any(
        route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
    )]


def install(app: FastAPI) -> None:
    async def on_domain_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, DomainError)
        return domain_errors_response([error])

    async def on_domain_errors(_request: Request, error: Exception) -> Response:
        assert isinstance(error, DomainErrors)
        if any(e.code is ErrorCode.BATCH_TOO_LARGE for e in error.errors):
            observe.refused(ErrorCode.BATCH_TOO_LARGE.value)
        return domain_errors_response(error.errors)

    async def on_invalid_request(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        text, details = _validation_details(error, malformed_json(request))
        return error_response(400, text, details)

    async def on_unauthenticated(request: Request, error: Exception) -> Response:
        if not request.url.path.startswith(REST_PREFIX):
            return await authentication_required_response(request, error)
        return error_response(401, AUTHENTICATION_REQUIRED,
                              headers={"WWW-Authenticate": "Bearer"})

    async def on_forbidden(_request: Request, error: Exception) -> Response:
        assert isinstance(error, Forbidden)
        return error_response(403, FORBIDDEN, [{"field": "authorization",
                                                "message": error.message}])

    async def on_http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if not request.url.path.startswith(REST_PREFIX):
            return await http_exception_handler(request, error)
        if isinstance(error, PayloadTooLarge):
            observe.refused(observe.PAYLOAD_TOO_LARGE)
        if isinstance(error, BatchTooLarge):
            observe.refused(ErrorCode.BATCH_TOO_LARGE.value)
            return error_response(400, MAX_BATCH_SIZE, [{"field": _BODY, "message": error.detail}])
        headers = dict(error.headers or {})
        if error.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        text = _HTTP_TEXTS.get(error.status_code, str(error.detail))
        details = [] if error.detail == text or error.status_code in (404, 405) else [
            {"field": _BODY, "message": str(error.detail)}]
        return error_response(error.status_code, text, details, headers=headers)

    app.add_exception_handler(DomainError, _with_rate_limit(on_domain_error))
    app.add_exception_handler(DomainErrors, _with_rate_limit(on_domain_errors))
    app.add_exception_handler(RequestValidationError, _with_rate_limit(on_invalid_request))
    app.add_exception_handler(AuthenticationRequired, on_unauthenticated)
    app.add_exception_handler(Forbidden, on_forbidden)
    app.add_exception_handler(StarletteHTTPException, _with_rate_limit(on_http_error))


_Handler = Callable[[Request, Exception], Awaitable[Response]]


def _with_rate_limit(handler: _Handler) -> _Handler:
    """A refused call still took its cost: its answer carries the RateLimit headers too."""

    async def handle(request: Request, error: Exception) -> Response:
        response = await handler(request, error)
        throttle = request.scope.get("state", {}).get(RATE_LIMIT_STATE)
        if throttle is not None:
            response.headers.update(throttle.headers())
        return response

    return handle
