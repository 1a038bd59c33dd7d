"""The HTTP face of API keys: a FastAPI dependency that turns ``Authorization: Bearer sk_…``
into a Principal, or answers 401. GraphQL uses it through its context; REST routes can take
``principal: Principal = Depends(require_api_key)``."""

from __future__ import annotations

from typing import Annotated

from fastapi import BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse

from consumers_graphql.auth import KeyStore, Principal
from consumers_graphql.db import Reader
from consumers_graphql.dependencies import request_reader

AUTHENTICATION_REQUIRED = "Authentication required"
UNAUTHENTICATED = "UNAUTHENTICATED"


class AuthenticationRequired(Exception):
    """No usable key: missing or malformed header, unknown or revoked key. Deliberately one
    answer for all of them, so a caller learns nothing about which keys exist."""

    def __init__(self) -> None:
        super().__init__(AUTHENTICATION_REQUIRED)


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    # The scheme is case-insensitive (RFC 7235); a token never contains spaces.
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


async def require_api_key(
    request: Request,
    background_tasks: BackgroundTasks,
    reader: Annotated[Reader, Depends(request_reader)],
) -> Principal:
    keys: KeyStore = request.app.state.keys
    token = bearer_token(request)
    principal = await keys.verify(token, reader) if token is not None else None
    if principal is None:
        raise AuthenticationRequired
    if keys.use_needs_recording(principal):
        # After the response: a busy SQLite writer must not delay the request it serves.
        background_tasks.add_task(keys.record_use, principal.key_id)
    return principal


async def authentication_required_response(
    _request: Request, _exc: Exception
) -> JSONResponse:
    # GraphQL-shaped, since /graphql is what answers today; REST can branch on the path.
    return JSONResponse(
        {"errors": [{"message": AUTHENTICATION_REQUIRED,
                     "extensions": {"code": UNAUTHENTICATED}}]},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )
