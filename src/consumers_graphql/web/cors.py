"""CORS for browser apps (README "CORS"): pages of the origins in CONSUMERS_CORS_ORIGINS may
call /graphql, /api/v1 and /openapi.json; nothing else is a browser app's business
(/metrics, the probes, the docs pages, which are this origin's own).

Placed outside the request id and the deadline (web/app.py, web/edge.py), so that every
answer of ours carries the headers a browser needs to read it: 401, 413, 429, 503, 504 and
500 included, or a page sees only an opaque network error. A preflight is answered here,
before any key, rate limit or database work.

Starlette's CORSMiddleware answers the preflights (its checks of the origin, the method and
the headers asked for, 400 "Disallowed CORS ..." when one fails). The other answers get
their headers here: an origin not allowed gets none (Starlette would still send it
Access-Control-Expose-Headers), and every answer says `Vary: Origin`, a request without an
Origin header too (a cached copy must not be given to a page its headers do not allow;
only Starlette's latest releases add it in every case)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumers_graphql.web import idempotency, request_id

METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS")
# What the API reads from a client: its own headers, and W3C Trace Context's and baggage
# (with tracing on, OpenTelemetry's default propagators read them: README "Tracing"; a
# page's OpenTelemetry fetch instrumentation sends them).
# Accept, Content-Type and the other CORS-safelisted headers are added by Starlette.
REQUEST_HEADERS = ("Authorization", "Content-Type", idempotency.HEADER, request_id.HEADER,
                   "traceparent", "tracestate", "baggage")
# What common GraphQL clients send when set up so, read or not here: Apollo's client
# awareness (Apollo Client's `name`/`version`, Apollo Kotlin's interceptor) and its CSRF
# markers (Apollo Kotlin sends X-APOLLO-OPERATION-* by default; apollo-upload-client set-ups
# add Apollo-Require-Preflight). A preflight asking for a header not listed fails, and with
# it every request of the page: a page set up for Apollo Router or Server would see only
# network errors here. Allowing them lets a page send what it sends to any server; with keys
# that are never ambient, nothing is gained by refusing them.
CLIENT_HEADERS = ("apollographql-client-name", "apollographql-client-version",
                  "apollo-require-preflight", "x-apollo-operation-name",
                  "x-apollo-operation-id")
# What a page may read of an answer beyond the CORS-safelisted ones (Content-Type, ...).
RESPONSE_HEADERS = (request_id.HEADER, "RateLimit", "RateLimit-Policy", "Retry-After",
                    idempotency.REPLAYED, "Location", "WWW-Authenticate")
# How long a browser may keep a preflight's answer: Chromium's cap (Firefox allows a day);
# a page sends one preflight per URL and method every two hours at most.
MAX_AGE_S = 7200
_GRAPHQL = "/graphql"
_PREFIXES = ("/api/",)
_PATHS = frozenset({_GRAPHQL, _GRAPHQL + "/", "/openapi.json"})
_ORIGIN = b"origin"
_VARY = b"vary"
_ALLOW_ORIGIN = b"access-control-allow-origin"
_EXPOSE = (b"access-control-expose-headers", ", ".join(RESPONSE_HEADERS).encode())


def applies(path: str) -> bool:
    return path in _PATHS or path.startswith(_PREFIXES)


class Cors:
    def __init__(self, app: ASGIApp, *, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any_origin = origins == ("*",)
        self.origins = frozenset(origins)
        self.preflights = CORSMiddleware(
            app, allow_origins=origins, allow_methods=METHODS,
            allow_headers=REQUEST_HEADERS + CLIENT_HEADERS, expose_headers=RESPONSE_HEADERS,
            max_age=MAX_AGE_S)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answer = self.preflight(scope)
        if answer is not None:
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, self.wrap(scope, send))

    def preflight(self, scope: Scope) -> Response | None:
        """The answer to a CORS preflight (OPTIONS with Origin and
        Access-Control-Request-Method) of a path CORS applies to; None for any other request.
        """
        if scope["method"] != "OPTIONS" or not applies(scope["path"]):
            return None
        headers = Headers(scope=scope)
        if "origin" not in headers or "access-control-request-method" not in headers:
            return None
        return self.preflights.preflight_response(request_headers=headers)

    def wrap(self, scope: Scope, send: Send) -> Send:
        """`send`, adding to the answer's start the CORS headers its request's Origin
        allows, and `Vary: Origin`; `send` itself on paths CORS does not apply to."""
        if not applies(scope["path"]):
            return send
        origin = next((value for name, value in scope["headers"] if name == _ORIGIN), None)
        allowed = origin is not None and (self.any_origin
                                          or origin.decode("latin-1") in self.origins)
        allow_origin = (_ALLOW_ORIGIN, b"*" if self.any_origin else origin or b"")

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = message["headers"] = list(message.get("headers", ()))
                if allowed:
                    raw.extend((allow_origin, _EXPOSE))
                _vary_on_origin(raw)
            await send(message)

        return send_with_cors


def _vary_on_origin(raw: list[tuple[bytes, bytes]]) -> None:
    """`Origin` added to the answer's Vary, unless it is there (or `*`, which covers it):
    into the answer's own Vary field when it has one (a cacheable GET of a persisted
    document varies on Accept and Authorization), so that it says Vary once; caches and
    proxies that read one line only would otherwise miss a part of it."""
    for index, (name, value) in enumerate(raw):
        if name.lower() != _VARY:
            continue
        if any(token.strip().lower() in (b"origin", b"*") for token in value.split(b",")):
            return
        raw[index] = (name, value + b", Origin" if value.strip() else b"Origin")
        return
    raw.append((_VARY, b"Origin"))
