"""The HTTP face of API keys: a FastAPI dependency that turns ``Authorization: Bearer sk_…``
into a Principal, or answers 401. GraphQL uses it through its context; REST routes can take
``principal: Principal = Depends(require_api_key)``."""

from __future__ import annotations

from typing import Annotated

from fastapi import BackgroundTasks, Depends, Request
from fastapi.responses import JSONResponse

from consumers_graphql.store.db import Reader
from consumers_graphql.store.keys import KeyStore, Principal, Scope
from consumers_graphql.web import observe
from consumers_graphql.web.dependencies import request_reader

AUTHENTICATION_REQUIRED = "Authentication required"
UNAUTHENTICATED = "UNAUTHENTICATED"
# Where a route that authenticates before reading the body keeps the principal it found.
PRINCIPAL_STATE = "principal"


class AuthenticationRequired(Exception):
    """No usable key: missing or malformed header, unknown or revoked key. Deliberately one
    answer for all of them, so a caller learns nothing about which keys exist."""

    def __init__(self) -> None:
        super().__init__(AUTHENTICATION_REQUIRED)


class Forbidden(Exception):
    """An authenticated key without the scope the endpoint needs."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(f"This API key lacks the `{scope.value}` scope.")
        self.message = str(self)


def bearer_token(request: Request) -> str | None:
    return bearer(request.headers.get("authorization"))


def bearer(value: object) -> str | None:
    """The secret of a `Bearer sk_…` value: the Authorization header's, or a WebSocket's
    connection_init payload's (api/websocket.py). None for anything else."""
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
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
    known: Principal | None = request.scope.get("state", {}).get(PRINCIPAL_STATE)
    if known is not None:
        return known
    keys: KeyStore = request.app.state.keys
    token = bearer_token(request)
    principal = await keys.verify(token, reader) if token is not None else None
    if principal is None:
        raise AuthenticationRequired
    observe.authenticated(principal.key_id)
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
