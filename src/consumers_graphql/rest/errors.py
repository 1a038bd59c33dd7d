"""Failures as the reference spells them: `{"error": "<text>", "details": [...]}` with its
statuses and texts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError

from consumers_graphql.errors import DomainError, ErrorCode
from consumers_graphql.http_auth import (
    AUTHENTICATION_REQUIRED,
    AuthenticationRequired,
    authentication_required_response,
)

REST_PREFIX = "/api/"
VALIDATION_FAILED = "Validation failed"

# Codes whose reference text is not "Validation failed".
_TEXTS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.EMAIL_TAKEN: (400, "Email already exists"),
    ErrorCode.EXTERNAL_ID_TAKEN: (400, "External ID already exists"),
    ErrorCode.BATCH_TOO_LARGE: (400, "Max batch size is 500"),
    ErrorCode.NOT_FOUND: (404, "Consumer not found"),
}


def error_response(
    status: int, error: str, details: Iterable[dict[str, str]] = (),
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": error, "details": list(details)}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def _field(path: Sequence[Any] | None) -> str:
    return ".".join(str(part) for part in path or ())


def domain_errors_response(errors: Sequence[DomainError]) -> Response:
    """One response for one or more problems: the most specific text the reference has for
    them (a single kind of conflict), else "Validation failed" with every problem listed."""
    details = [{"field": _field(e.field), "message": e.message} for e in errors]
    kinds = {e.code for e in errors}
    if len(kinds) == 1 and (code := next(iter(kinds))) in _TEXTS:
        status, text = _TEXTS[code]
        return error_response(status, text, details)
    return error_response(400, VALIDATION_FAILED, details)


def _validation_details(error: RequestValidationError) -> list[dict[str, str]]:
    details = []
    for problem in error.errors():
        location = list(problem.get("loc", ()))
        if location and location[0] in ("body", "query", "path"):
            location = location[1:]
        if problem.get("type") == "json_invalid":
            details.append({"field": "body", "message": "Malformed JSON: " + problem["msg"]})
            continue
        details.append({"field": _field(location) or "body", "message": problem["msg"]})
    return details


def install(app: FastAPI) -> None:
    async def on_domain_error(_request: Request, error: Exception) -> Response:
        assert isinstance(error, DomainError)
        return domain_errors_response([error])

    async def on_invalid_request(_request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        return error_response(400, VALIDATION_FAILED, _validation_details(error))

    async def on_unauthenticated(request: Request, error: Exception) -> Response:
        if not request.url.path.startswith(REST_PREFIX):
            return await authentication_required_response(request, error)
        return error_response(401, AUTHENTICATION_REQUIRED,
                              headers={"WWW-Authenticate": "Bearer"})

    app.add_exception_handler(DomainError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(AuthenticationRequired, on_unauthenticated)
