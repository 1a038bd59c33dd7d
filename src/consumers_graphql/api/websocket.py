"""GraphQL over WebSocket at /graphql: the graphql-transport-ws protocol
(https://github.com/enisdenjo/graphql-ws/blob/master/PROTOCOL.md) through Strawberry's handler,
with this service's authentication and one decision of its own.

- The key goes in `connection_init`'s payload, `{"Authorization": "Bearer sk_…"}`, checked as
  an HTTP request's is (store/keys.py): none, or an unknown or revoked one, closes the socket
  with 4401; a key without the `read` scope with 4403. Nothing is subscribed before
  `connection_ack` (Strawberry closes with 4401).
- Only subscriptions: a query or mutation sent over the socket is answered with an `error`
  message (OPERATION_NOT_SUPPORTED) and nothing runs; they go over HTTP, where the limits,
  the cost, the rate limit, idempotency keys and the status codes apply.
- The legacy `graphql-ws` subprotocol (subscriptions-transport-ws) is refused: the socket is
  accepted and closed at once with 4406 and a reason that says which protocol to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from graphql import GraphQLError, OperationType, get_operation_ast, parse
from starlette.websockets import WebSocketDisconnect, WebSocketState
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import (
    NonJsonMessageReceived,
    NonTextMessageReceived,
    WebSocketDisconnected,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    SubscribeMessage,
)

from consumers_graphql.api.context import Context
from consumers_graphql.api.documents import DocumentRefusal, Documents, Resolved
from consumers_graphql.store.keys import Scope
from consumers_graphql.store.outage import is_unavailable
from consumers_graphql.web import observe
from consumers_graphql.web.http_auth import bearer

GRAPHQL_TRANSPORT_WS = "graphql-transport-ws"
LEGACY_GRAPHQL_WS = "graphql-ws"
OPERATION_NOT_SUPPORTED = "OPERATION_NOT_SUPPORTED"
SUBSCRIPTION_LIMIT_REACHED = "SUBSCRIPTION_LIMIT_REACHED"
UNAUTHORIZED_CLOSE = 4401
FORBIDDEN_CLOSE = 4403
SUBPROTOCOL_CLOSE = 4406
TRY_AGAIN_LATER_CLOSE = 1013  # RFC 6455's registry: "Try Again Later"


def subprotocol_refusal(offered: list[str]) -> str | None:
    """The close reason for a handshake that did not offer graphql-transport-ws (a close
    reason holds at most 123 bytes), None when it did."""
    if GRAPHQL_TRANSPORT_WS in offered:
        return None
    if LEGACY_GRAPHQL_WS in offered:
        return "The legacy graphql-ws subprotocol is not supported: use graphql-transport-ws."
    return "Subprotocol not acceptable: /graphql speaks graphql-transport-ws only."


class TextFrames(ASGIWebSocketAdapter):
    """Strawberry's ASGI socket with every message a text frame, as graphql-transport-ws
    wants (a browser's graphql-ws client cannot read binary ones): the view encodes JSON to
    bytes (orjson, for HTTP), which Strawberry would send as binary. Received messages are
    parsed with `json` here: the view's decoder answers HTTP refusals, not
    NonJsonMessageReceived (which closes with 4400)."""

    async def iter_json(self, *, ignore_parsing_errors: bool = False
                        ) -> AsyncGenerator[object, None]:
        try:
            while self.ws.application_state != WebSocketState.DISCONNECTED:
                text = await self.ws.receive_text()
                try:
                    yield json.loads(text)
                except ValueError as error:  # JSONDecodeError, and numbers past the limit
                    if not ignore_parsing_errors:
                        raise NonJsonMessageReceived from error
        except KeyError as error:  # a binary frame
            raise NonTextMessageReceived from error
        except WebSocketDisconnect:
            pass

    async def send_json(self, message: Mapping[str, object]) -> None:
        encoded = self.view.encode_json(message)
        try:
            await self.ws.send_text(encoded.decode() if isinstance(encoded, bytes) else encoded)
        except WebSocketDisconnect as error:
            raise WebSocketDisconnected from error


class SubscriptionsHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """Strawberry's graphql-transport-ws handler with the key check at `connection_init`
    and queries and mutations refused (the module's docstring)."""

    _pending: set[asyncio.Task[None]]

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        if self.connection_timed_out:
            return
        if self.connection_init_timeout_task:
            self.connection_init_timeout_task.cancel()
        payload = message.get("payload") or {}
        if not isinstance(payload, dict):
            await self.websocket.close(code=4400, reason="Invalid connection init payload")
            return
        if self.connection_init_received:
            await self.websocket.close(code=4429, reason="Too many initialisation requests")
            return
        self.connection_init_received = True
        context = self.context
        assert context.keys is not None, "a WebSocket's context carries the keys"
        header = payload.get("Authorization", payload.get("authorization"))
        token = bearer(header)
        # On the key store's own connection, given back at once: the socket's reader would
        # hold one for as long as the socket lives.
        try:
            principal = await context.keys.verify(token) if token is not None else None
        except Exception as error:
            if not is_unavailable(error):
                raise
            context.database.failed(error)  # its one warning per outage
            await self.websocket.close(
                code=TRY_AGAIN_LATER_CLOSE,
                reason="The database is out of reach: connect again in a few seconds.")
            return
        if principal is None:
            # One answer for a missing, malformed, unknown or revoked key (as over HTTP).
            await self.websocket.close(
                code=UNAUTHORIZED_CLOSE,
                reason='Unauthorized: send {"Authorization": "Bearer sk_…"} in '
                       "connection_init's payload.")
            return
        if not principal.allows(Scope.READ):
            await self.websocket.close(
                code=FORBIDDEN_CLOSE,
                reason=f"Forbidden: this API key lacks the `{Scope.READ.value}` scope.")
            return
        context.principal = principal
        observe.authenticated(principal.key_id)
        if context.keys.use_needs_recording(principal):
            task = asyncio.create_task(context.keys.record_use(principal.key_id))
            self._pending = getattr(self, "_pending", set())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        await self.send_message({"type": "connection_ack"})
        self.connection_acknowledged = True
        assert token is not None, "a key was verified"
        self._key_watch = asyncio.create_task(self._watch_key(token))

    async def _watch_key(self, token: str) -> None:
        """A revoked key stops working on an open socket as it does over HTTP: within the
        key cache's time (store/keys.py), the socket is closed with 4401."""
        keys = self.context.keys
        assert keys is not None
        interval = max(1.0, self.context.settings.key_cache_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                principal = await keys.verify(token)
            except Exception:  # the database out of reach: the key stands until it answers
                continue
            if principal is None:
                await self.websocket.close(code=UNAUTHORIZED_CLOSE,
                                           reason="Unauthorized: the API key was revoked.")
                return

    async def shutdown(self) -> None:
        watch: asyncio.Task[None] | None = getattr(self, "_key_watch", None)
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        await super().shutdown()

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        limit = self.max_subscriptions_per_connection
        if (self.connection_acknowledged and message.get("id") not in self.operations
                and limit is not None and len(self.operations) >= limit):
            # Strawberry's own refusal would carry no code; a socket has one key, so its
            # limit is the key's (web/app.py).
            await self.send_message({"id": message["id"], "type": "error", "payload": [
                GraphQLError(
                    f"This socket has {limit} subscriptions open, the most allowed for one "
                    "API key (CONSUMERS_SUBSCRIPTIONS_PER_KEY): complete one first.",
                    extensions={"code": SUBSCRIPTION_LIMIT_REACHED}).formatted]})
            return
        if (self.connection_acknowledged and isinstance(message.get("payload"), dict)
                and message.get("id") not in self.operations):  # (a reused id: 4409 below)
            payload: Any = message["payload"]
            resolved = await self._document(message["id"], payload)
            if resolved is None:
                return
            if resolved.query is not None and resolved.query is not payload.get("query"):
                payload = {**payload, "query": resolved.query}
                message = {**message, "payload": payload}
            operation = _operation_type(payload.get("query"), payload.get("operationName"),
                                        self.context.settings.max_tokens)
            if operation is not None and operation is not OperationType.SUBSCRIPTION:
                await self.send_message({"id": message["id"], "type": "error", "payload": [
                    GraphQLError(
                        f"Only subscriptions are served over the WebSocket; send this "
                        f"{operation.value} over HTTP (POST /graphql).",
                        extensions={"code": OPERATION_NOT_SUPPORTED}).formatted]})
                return
        await super().handle_subscribe(message)

    async def _document(self, operation_id: str, payload: dict[str, Any]) -> Resolved | None:
        """The document a subscribe message names, as over HTTP (api/documents.py): its
        `query`, a trusted document's `documentId` (or `doc_id`) or an APQ hash in
        `extensions.persistedQuery` (an empty `query` beside them is none: graphql-ws' client
        types want a string); CONSUMERS_TRUSTED_DOCUMENTS_ONLY holds here too. None,
        once the refusal is sent as the operation's `error` message."""
        query, extensions = payload.get("query"), payload.get("extensions")
        documents: Documents = self.view.persisted_documents  # type: ignore[attr-defined]
        try:
            return documents.resolve(payload, query if isinstance(query, str) and query else None,
                                     extensions if isinstance(extensions, dict) else None)
        except DocumentRefusal as refusal:
            await self.send_message({"id": operation_id, "type": "error", "payload": [
                GraphQLError(refusal.message, extensions={"code": refusal.code}).formatted]})
            return None


def _operation_type(query: object, operation_name: object,
                    max_tokens: int) -> OperationType | None:
    """The operation's type, None when the document does not parse or names no single
    operation (Strawberry's handling answers those)."""
    if not isinstance(query, str) or not isinstance(operation_name, str | None):
        return None
    try:
        operation = get_operation_ast(parse(query, max_tokens=max_tokens), operation_name)
    except GraphQLError:
        return None
    return None if operation is None else operation.operation
