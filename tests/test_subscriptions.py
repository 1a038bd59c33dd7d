"""Subscription.events over a real WebSocket (graphql-transport-ws, the `websockets` client):
the session app served by uvicorn on a loopback port, writes through GraphQL over HTTP; and
two `serve` processes on one database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import make_url, text
from websockets.asyncio.client import ClientConnection

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.event_hub import LISTENER_NAME, backoff
from consumers_graphql.store.keys import RateLimit, Scope
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app
from consumers_graphql.web.logs import ACCESS_FIELDS
from tests.conftest import (
    ADMIN_DATABASE_URL,
    TEST_DATABASE_URL,
    GraphQL,
    kept_returned,
    new_migrated_database,
    on_path,
)
from tests.log_audit import AUDIT, asgi_client
from tests.processes import PostgresCluster, Served, free_port

SUBSCRIBE = """
subscription Events($types: [EventType!], $subjectId: ID, $after: String) {
  events(types: $types, subjectId: $subjectId, after: $after) { id type subjectId data }
}
"""
CREATE = """
mutation Create($email: String!) { consumerCreate(input: {email: $email}) { consumer { id } } }
"""
BATCH_CREATE = """
mutation BatchCreate($input: [ConsumerCreateInput!]!) {
  consumerBatchCreate(input: $input) { count }
}
"""
UPDATE = """
mutation Update($id: ID!, $name: String!) {
  consumerUpdate(id: $id, input: {fullName: $name}) { consumer { id } }
}
"""
DELETE = 'mutation { consumerDelete(id: "cons_x") { deletedId } }'
PROTOCOL = "graphql-transport-ws"
WAIT_S = 10.0


@asynccontextmanager
async def served(app: FastAPI, ping_s: float | None = None) -> AsyncIterator[str]:
    """`app` (its lifespan already running) on a loopback port: the WebSocket URL. `ping_s`:
    a ping that often, and a socket whose pong is that late closed (as `serve` does)."""
    port = free_port()
    pings: dict[str, Any] = {} if ping_s is None else {"ws_ping_interval": ping_s,
                                                       "ws_ping_timeout": ping_s}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           ws="websockets-sansio", log_level="warning",
                                           **pings))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{port}/graphql"
    finally:
        server.should_exit = True
        await task


@pytest.fixture(scope="session")
async def ws_url(app: FastAPI) -> AsyncIterator[str]:
    async with served(app) as url:
        yield url


@asynccontextmanager
async def connected(url: str, secret: str) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init",
                                      "payload": {"Authorization": f"Bearer {secret}"}}))
        assert await receive(socket) == {"type": "connection_ack"}
        yield socket


async def subscribe(socket: ClientConnection, operation_id: str, **variables: Any) -> None:
    await socket.send(json.dumps({"id": operation_id, "type": "subscribe", "payload": {
        "query": SUBSCRIBE, "variables": variables}}))


async def receive(socket: ClientConnection) -> dict[str, Any]:
    raw = await asyncio.wait_for(socket.recv(), WAIT_S)
    assert isinstance(raw, str), "a text frame (browsers' clients read no binary ones)"
    message: dict[str, Any] = json.loads(raw)
    return message


async def events(socket: ClientConnection, count: int, operation_id: str = "1"
                 ) -> list[dict[str, Any]]:
    found = []
    while len(found) < count:
        message = await receive(socket)
        assert message["type"] == "next" and message["id"] == operation_id, message
        assert "errors" not in message["payload"], message
        # The cost was priced and taken once, at subscribe: not repeated on every event.
        assert "extensions" not in message["payload"], message
        found.append(message["payload"]["data"]["events"])
    return found


async def settled() -> None:
    """Long enough for a subscription sent just before to be registered with the hub."""
    await asyncio.sleep(0.2)


async def registered(app: FastAPI, count: int) -> None:
    """Until `app`'s hub holds `count` subscriptions: for an app of the test's own, whose
    hub no other test shares (a fixed sleep let a slow CI register them out of order)."""
    hub = app.state.event_hub
    async with asyncio.timeout(WAIT_S):
        while hub.active != count:  # noqa: ASYNC110 - the hub offers a count, not an event
            await asyncio.sleep(0.01)


async def live(app: FastAPI) -> None:
    """Until every subscription of `app`'s hub has replayed what the database held and
    takes events as they come (before, an overflow of its buffer means reading on)."""
    hub = app.state.event_hub
    async with asyncio.timeout(WAIT_S):
        while hub.replaying:  # noqa: ASYNC110 - the hub offers a count, not an event
            await asyncio.sleep(0.01)


async def create(gql: GraphQL, *emails: str) -> list[str]:
    return [(await gql.data(CREATE, {"email": email}))["consumerCreate"]["consumer"]["id"]
            for email in emails]


async def closed_with(socket: ClientConnection) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(socket.recv(), WAIT_S)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


# --- the handshake and the key -----------------------------------------------------------------


@pytest.mark.parametrize("payload", [{}, {"Authorization": "Bearer sk_live_unknown"},
                                     {"Authorization": "sk_live_no_scheme"}])
async def test_a_missing_or_unknown_key_closes_4401(ws_url: str, payload: dict[str, str]
                                                    ) -> None:
    async with websockets.connect(ws_url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init", "payload": payload}))
        code, reason = await closed_with(socket)
    assert code == 4401 and "Authorization" in reason


async def test_a_revoked_key_closes_4401(ws_url: str, app: FastAPI) -> None:
    created = await app.state.keys.create("revoked", scopes=frozenset({Scope.READ}))
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    await app.state.keys.revoke(created.info.id)
    async with websockets.connect(ws_url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init",
                                      "payload": {"Authorization": f"Bearer {secret}"}}))
        assert (await closed_with(socket))[0] == 4401


async def test_a_key_revoked_while_its_socket_is_open_closes_it_4401(
        ws_url: str, app: FastAPI, execution_path: str) -> None:
    created = await app.state.keys.create("revoked later", scopes=frozenset({Scope.READ}))
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with connected(ws_url, secret) as socket:
        await subscribe(socket, "1")
        await settled()
        await app.state.keys.revoke(created.info.id)
        code, reason = await closed_with(socket)  # within the key cache's time (5 s)
    assert code == 4401 and "revoked" in reason


async def test_a_key_without_the_read_scope_closes_4403(ws_url: str, app: FastAPI) -> None:
    created = await app.state.keys.create("writer", scopes=frozenset({Scope.WRITE}))
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with websockets.connect(ws_url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init",
                                      "payload": {"Authorization": f"Bearer {secret}"}}))
        code, reason = await closed_with(socket)
    assert code == 4403 and "`read`" in reason


async def test_a_page_of_another_origin_is_refused_at_the_handshake(ws_url: str) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url, subprotocols=[PROTOCOL],  # type: ignore[list-item]
                                      origin="https://elsewhere.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    # while one from the server's own origin is served
    async with websockets.connect(ws_url, subprotocols=[PROTOCOL],  # type: ignore[list-item]
                                  origin=ws_url.replace("ws://", "http://").rsplit("/", 1)[0]  # type: ignore[arg-type]
                                  ) as socket:
        assert socket.subprotocol == PROTOCOL


async def test_a_page_of_an_origin_of_the_cors_allow_list_may_subscribe(
    settings: Settings, execution_path: str, api_key: str
) -> None:
    """CONSUMERS_CORS_ORIGINS is the WebSocket handshake's allow-list too: a browser app
    that may call /graphql over HTTP may subscribe; other pages still may not."""
    app = create_app(settings.model_copy(update={"cors_origins": ("https://app.example",)}))
    on_path(app, execution_path)
    async with LifespanManager(app), served(app) as url:
        async with websockets.connect(url, subprotocols=[PROTOCOL],  # type: ignore[list-item]
                                      origin="https://app.example") as socket:  # type: ignore[arg-type]
            await socket.send(json.dumps({"type": "connection_init",
                                          "payload": {"Authorization": f"Bearer {api_key}"}}))
            assert await receive(socket) == {"type": "connection_ack"}
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, subprotocols=[PROTOCOL],  # type: ignore[list-item]
                                          origin="https://elsewhere.example"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403


async def test_a_socket_without_connection_init_is_closed_4408(settings: Settings) -> None:
    """An unauthenticated socket holds a connection slot only CONSUMERS_SUBSCRIPTION_INIT_
    TIMEOUT_S long."""
    app = create_app(settings.model_copy(update={"subscription_init_timeout_s": 0.3}))
    async with LifespanManager(app), served(app) as url, websockets.connect(
            url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        started = asyncio.get_running_loop().time()
        code, reason = await closed_with(socket)
        waited = asyncio.get_running_loop().time() - started
    assert code == 4408 and "timeout" in reason.lower()
    assert 0.2 < waited < 3


async def test_no_subscription_before_the_ack(ws_url: str, execution_path: str) -> None:
    async with websockets.connect(ws_url, subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await subscribe(socket, "1")
        assert (await closed_with(socket))[0] == 4401


async def test_the_legacy_protocol_is_refused_by_name(ws_url: str) -> None:
    async with websockets.connect(ws_url, subprotocols=["graphql-ws"]) as socket:  # type: ignore[list-item]
        code, reason = await closed_with(socket)
    assert code == 4406 and "graphql-transport-ws" in reason and "legacy" in reason


async def test_trusted_documents_only_holds_over_the_websocket(
    settings: Settings, gql: GraphQL, api_key: str, tmp_path: Path, execution_path: str
) -> None:
    """CONSUMERS_TRUSTED_DOCUMENTS_ONLY refuses a subscription sent as text as it refuses a
    query over HTTP, and runs one named by `documentId` (a graphql-ws client sends an empty
    `query` beside it); an unknown id is named."""
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "apollo-persisted-query-manifest", "version": 1,
                                    "operations": [{"id": "events", "name": "Events",
                                                    "type": "subscription", "body": SUBSCRIBE}]}))
    app = create_app(settings.model_copy(update={"trusted_documents": manifest,
                                                 "trusted_documents_only": True}))
    on_path(app, execution_path)
    async with LifespanManager(app), served(app) as url, connected(url, api_key) as socket:
        await subscribe(socket, "text")
        refused = await receive(socket)
        assert refused["type"] == "error" and refused["id"] == "text", refused
        assert [e["extensions"]["code"] for e in refused["payload"]] == [
            "PERSISTED_QUERY_REQUIRED"]
        await socket.send(json.dumps({"id": "unknown", "type": "subscribe", "payload": {
            "documentId": "nope", "query": ""}}))
        unknown = await receive(socket)
        assert unknown["type"] == "error", unknown
        assert unknown["payload"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
        await socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": {
            "documentId": "events", "query": "", "variables": {"types": ["CONSUMER_CREATED"]}}}))
        await settled()
        [created] = await create(gql, "trusted-socket@example.com")
        [event] = await events(socket, 1)
        # an id in use is the protocol's 4409, whatever the document
        await subscribe(socket, "1")
        assert (await closed_with(socket))[0] == 4409
    assert event["subjectId"] == created and event["type"] == "CONSUMER_CREATED"


async def test_a_subscription_over_http_is_refused(gql: GraphQL, client: httpx.AsyncClient,
                                                  api_key: str) -> None:
    body = await gql(SUBSCRIBE, status=400)
    [error] = body["errors"]
    assert error["extensions"]["code"] == "BAD_REQUEST"
    assert "graphql-transport-ws WebSocket" in error["message"]
    response = await client.get("/graphql", params={"query": "subscription { events { id } }"},
                                headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 400, response.text


async def test_a_message_that_is_not_json_closes_4400(ws_url: str, api_key: str) -> None:
    async with connected(ws_url, api_key) as socket:
        await socket.send("{not json")
        code, reason = await closed_with(socket)
    assert code == 4400 and "JSON" in reason


async def test_queries_and_mutations_go_over_http(ws_url: str, api_key: str,
                                                  execution_path: str) -> None:
    async with connected(ws_url, api_key) as socket:
        for operation_id, query in (("q", "{ __typename }"), ("m", DELETE)):
            await socket.send(json.dumps({"id": operation_id, "type": "subscribe",
                                          "payload": {"query": query}}))
            message = await receive(socket)
            assert message["type"] == "error" and message["id"] == operation_id
            assert message["payload"][0]["extensions"]["code"] == "OPERATION_NOT_SUPPORTED"


# --- order, filters, replay --------------------------------------------------------------------


async def test_live_events_in_commit_order_filtered(ws_url: str, api_key: str,
                                                   gql: GraphQL) -> None:
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1")
        await subscribe(socket, "created", types=["CONSUMER_CREATED"])
        await settled()
        ids = await create(gql, "a@example.com", "b@example.com", "c@example.com")
        await gql.data(UPDATE, {"id": ids[1], "name": "B"})
        await subscribe(socket, "about-b", subjectId=ids[1], after=None)
        every = []
        by_operation: dict[str, list[dict[str, Any]]] = {"1": [], "created": [], "about-b": []}
        await settled()
        await gql.data(UPDATE, {"id": ids[1], "name": "Bee"})
        await gql.data(UPDATE, {"id": ids[0], "name": "A"})
        while len(by_operation["1"]) < 6 or len(by_operation["about-b"]) < 1:
            message = await receive(socket)
            assert message["type"] == "next", message
            by_operation[message["id"]].append(message["payload"]["data"]["events"])
        every = by_operation["1"]
    assert [(e["type"], e["subjectId"]) for e in every] == [
        ("CONSUMER_CREATED", ids[0]), ("CONSUMER_CREATED", ids[1]), ("CONSUMER_CREATED", ids[2]),
        ("CONSUMER_UPDATED", ids[1]), ("CONSUMER_UPDATED", ids[1]), ("CONSUMER_UPDATED", ids[0])]
    assert [e["id"] for e in every] == sorted(e["id"] for e in every)
    assert [e["subjectId"] for e in by_operation["created"]] == ids
    assert [(e["type"], e["data"]["fullName"]) for e in by_operation["about-b"]] == [
        ("CONSUMER_UPDATED", "Bee")]


async def test_after_replays_then_goes_live(ws_url: str, api_key: str, gql: GraphQL) -> None:
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1")
        await settled()
        ids = await create(gql, "r1@example.com", "r2@example.com", "r3@example.com")
        first = (await events(socket, 3))[0]
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1", after=first["id"], types=["CONSUMER_CREATED"])
        replayed = await events(socket, 2)
        assert [e["subjectId"] for e in replayed] == ids[1:]
        live = await create(gql, "r4@example.com")
        assert [e["subjectId"] for e in await events(socket, 1)] == live


async def test_a_bad_after_is_bad_user_input(ws_url: str, api_key: str,
                                             execution_path: str) -> None:
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1", after="evt_nonsense")
        message = await receive(socket)
    assert message["type"] == "next", message
    [error] = message["payload"]["errors"]
    assert error["extensions"]["code"] == "BAD_USER_INPUT" and "`after`" in error["message"]


async def test_no_gap_and_no_duplicate_across_a_reconnect_while_writes_go_on(
        ws_url: str, api_key: str, gql: GraphQL) -> None:
    emails = [f"w{n}@example.com" for n in range(30)]
    seen: list[dict[str, Any]] = []
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1", types=["CONSUMER_CREATED"])
        await settled()
        writer = asyncio.create_task(create(gql, *emails))
        seen += await events(socket, 5)
    # gone while the writes continue; back with `after`
    await asyncio.sleep(0.1)
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1", types=["CONSUMER_CREATED"], after=seen[-1]["id"])
        seen += await events(socket, len(emails) - 5)
        ids = await writer
        with pytest.raises(TimeoutError):  # nothing more: no duplicate came after
            await asyncio.wait_for(socket.recv(), 0.5)
    assert [e["subjectId"] for e in seen] == ids


# --- limits ------------------------------------------------------------------------------------


@pytest.fixture
async def limited(settings: Settings, execution_path: str
                  ) -> AsyncIterator[tuple[FastAPI, str]]:
    """An app with a tiny buffer, two subscriptions per key and three per process, served."""
    app = create_app(settings.model_copy(update={"subscription_buffer": 3,
                                                 "subscriptions_per_key": 2,
                                                 "subscriptions_per_process": 3}))
    on_path(app, execution_path)
    async with LifespanManager(app), served(app) as url:
        yield app, url


async def test_a_subscriber_that_falls_behind_is_ended_and_resumes_with_after(
        limited: tuple[FastAPI, str], api_key: str, execution_path: str) -> None:
    app, url = limited
    async with asgi_client(app) as client:
        gql = GraphQL(client, api_key)
        async with connected(url, api_key) as socket:
            await subscribe(socket, "1")
            await registered(app, 1)
            [first] = await create(gql, "first@example.com")
            [delivered] = await events(socket, 1)
            # ten events in one commit: more than the buffer of 3 at once
            await gql.data(BATCH_CREATE, {"input": [{"email": f"b{n}@example.com"}
                                                    for n in range(10)]})
            message = await receive(socket)
            assert message["type"] == "next" and message["payload"]["data"] is None, message
            [error] = message["payload"]["errors"]
            assert error["extensions"] == {"code": "SUBSCRIBER_TOO_SLOW",
                                           "after": delivered["id"]}
            assert delivered["id"] in error["message"]
            assert (await receive(socket))["type"] == "complete"
            # resumed: all ten, replayed (an overflow while replaying reads on)
            await subscribe(socket, "2", after=delivered["id"])
            resumed = await events(socket, 10, "2")
    assert delivered["subjectId"] == first
    assert len({e["subjectId"] for e in resumed}) == 10


async def test_an_overflow_before_any_delivery_names_where_it_started(
        limited: tuple[FastAPI, str], api_key: str, execution_path: str) -> None:
    """Without `after` and nothing delivered yet, the error still names a place to resume
    from: the newest event when it subscribed (not null, which would leave a gap)."""
    app, url = limited
    async with asgi_client(app) as client:
        gql = GraphQL(client, api_key)
        [before] = await create(gql, "before@example.com")
        async with connected(url, api_key) as socket:
            await subscribe(socket, "1")
            await registered(app, 1)
            await live(app)  # (nothing is delivered first that would show it)
            await gql.data(BATCH_CREATE, {"input": [{"email": f"o{n}@example.com"}
                                                    for n in range(10)]})
            message = await receive(socket)
            [error] = message["payload"]["errors"]
            assert error["extensions"]["code"] == "SUBSCRIBER_TOO_SLOW"
            resume = error["extensions"]["after"]
            assert resume is not None and resume in error["message"]
            assert (await receive(socket))["type"] == "complete"
            await subscribe(socket, "2", after=resume)
            resumed = await events(socket, 10, "2")
    subjects = {e["subjectId"] for e in resumed}
    assert len(subjects) == 10 and before not in subjects


@asynccontextmanager
async def own_database(tmp_path: Path) -> AsyncIterator[str]:
    """A migrated database of the test's own (PostgreSQL: a new one; SQLite: a file)."""
    if TEST_DATABASE_URL:
        async with new_migrated_database("consumers_subs_own") as url:
            yield url
        return
    url = f"sqlite+aiosqlite:///{tmp_path / 'own.db'}"
    engine = make_engine(Settings(database_url=url), writer=True)  # type: ignore[arg-type]
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    yield url


async def test_a_failure_at_subscribe_is_masked(settings: Settings, execution_path: str,
                                               tmp_path: Path) -> None:
    """The first subscriber's read of the head failing (here: the events table gone) is an
    INTERNAL_SERVER_ERROR with the masked message, as anywhere else: never the driver's
    text, which quotes SQL."""
    async with own_database(tmp_path) as url:
        app = create_app(settings.model_copy(update={"database_url": url}))
        on_path(app, execution_path)
        async with LifespanManager(app), served(app) as ws:
            created = await app.state.keys.create("fail", scopes=frozenset({Scope.READ}))
            secret = created.secret.get_secret_value()
            AUDIT.use(secret)
            async with app.state.database.write_engine.begin() as conn:
                await conn.execute(text("ALTER TABLE events RENAME TO events_gone"))
            async with connected(ws, secret) as socket:
                await subscribe(socket, "1")
                message = await receive(socket)
    [error] = message["payload"]["errors"] if message["type"] == "next" else message["payload"]
    assert error["message"] == "Internal server error.", message
    assert error["extensions"]["code"] == "INTERNAL_SERVER_ERROR"


async def test_subscriptions_per_key(limited: tuple[FastAPI, str], api_key: str,
                                     execution_path: str) -> None:
    app, url = limited
    async with connected(url, api_key) as one, connected(url, api_key) as two:
        await subscribe(one, "1")
        await subscribe(one, "2")
        await registered(app, 2)
        await subscribe(two, "3")
        message = await receive(two)
    assert message["type"] == "next"
    [error] = message["payload"]["errors"]
    assert error["extensions"]["code"] == "SUBSCRIPTION_LIMIT_REACHED"
    assert "CONSUMERS_SUBSCRIPTIONS_PER_KEY" in error["message"]


async def test_subscriptions_per_key_on_one_socket(limited: tuple[FastAPI, str], api_key: str,
                                                   execution_path: str) -> None:
    app, url = limited
    async with connected(url, api_key) as socket:
        await subscribe(socket, "1")
        await subscribe(socket, "2")
        await registered(app, 2)
        await subscribe(socket, "3")
        message = await receive(socket)
    assert message["id"] == "3", message
    [error] = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
    assert error["extensions"]["code"] == "SUBSCRIPTION_LIMIT_REACHED"
    assert "CONSUMERS_SUBSCRIPTIONS_PER_KEY" in error["message"]


async def test_subscribing_takes_from_the_keys_bucket(ws_url: str, app: FastAPI,
                                                     execution_path: str) -> None:
    created = await app.state.keys.create("small bucket", scopes=frozenset({Scope.READ}),
                                          rate_limit=RateLimit(2, 0.001))
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with connected(ws_url, secret) as socket:
        await subscribe(socket, "1")
        await subscribe(socket, "2")
        await settled()
        await subscribe(socket, "3")
        message = await receive(socket)
    assert message["id"] == "3", message
    [error] = message["payload"]["errors"]
    assert error["extensions"]["code"] == "THROTTLED"
    assert error["extensions"]["throttleStatus"]["maximumAvailable"] == 2


async def test_subscriptions_per_process(limited: tuple[FastAPI, str], app: FastAPI,
                                         execution_path: str) -> None:
    served_app, url = limited
    secrets = [await _read_key(app, f"reader {n}") for n in range(2)]
    async with connected(url, secrets[0]) as one, connected(url, secrets[1]) as two:
        await subscribe(one, "1")
        await subscribe(one, "2")
        await subscribe(two, "3")
        await registered(served_app, 3)
        await subscribe(two, "4")
        message = await receive(two)
    [error] = message["payload"]["errors"]
    assert error["extensions"]["code"] == "SUBSCRIPTION_LIMIT_REACHED"
    assert "CONSUMERS_SUBSCRIPTIONS_PER_PROCESS" in error["message"]


async def _read_key(app: FastAPI, name: str) -> str:
    """A read-only key of the session app's database (the limited app shares it)."""
    created = await app.state.keys.create(name, scopes=frozenset({Scope.READ}))
    secret: str = created.secret.get_secret_value()
    AUDIT.use(secret)
    return secret


# --- metrics and the access line ---------------------------------------------------------------


async def test_a_client_that_vanishes_mid_stream_leaves_nothing_behind(
        ws_url: str, api_key: str, app: FastAPI, gql: GraphQL) -> None:
    """A client gone without a close (its TCP connection dropped, with a subscription
    replaying and one live): its subscriptions leave the hub, its tasks end, and no pooled
    connection stays checked out."""
    hub = app.state.event_hub
    pool = app.state.database.primary_engine.pool
    await settled()
    await kept_returned(app)  # (a request's read connection, kept a moment: store/db.py)
    active, checked_out, tasks = hub.active, pool.checkedout(), len(asyncio.all_tasks())
    async with connected(ws_url, api_key) as socket:
        await create(gql, "vanish@example.com")
        await subscribe(socket, "1")
        await subscribe(socket, "2", after=(await events_after_start(gql))[0])
        await settled()
        assert hub.active == active + 2
        await create(gql, "vanish2@example.com")
        socket.transport.abort()
        for _ in range(100):
            if hub.active == active and len(asyncio.all_tasks()) <= tasks:
                break
            await asyncio.sleep(0.05)
    assert hub.active == active
    assert len(asyncio.all_tasks()) <= tasks, asyncio.all_tasks()
    await kept_returned(app)
    assert pool.checkedout() == checked_out


async def events_after_start(gql: GraphQL) -> list[str]:
    """The ids of the oldest events kept (a place to replay from)."""
    data = await gql.data("{ events(first: 2) { edges { node { id } } } }")
    return [edge["node"]["id"] for edge in data["events"]["edges"]]


async def test_a_client_that_stops_reading_is_let_go(app: FastAPI, api_key: str,
                                                    execution_path: str) -> None:
    """A client that keeps its TCP connection but reads nothing more answers no ping: once
    its pong is late the socket is closed and its subscription leaves the hub."""
    hub = app.state.event_hub
    await settled()
    active = hub.active
    async with served(app, ping_s=0.3) as url, connected(url, api_key) as socket:
        await subscribe(socket, "1")
        await settled()
        assert hub.active == active + 1
        socket.transport.pause_reading()
        for _ in range(100):
            if hub.active == active:
                break
            await asyncio.sleep(0.05)
        assert hub.active == active
        socket.transport.abort()  # (its close handshake would wait for a reader)


async def test_metrics_and_one_access_line_per_socket(
        ws_url: str, api_key: str, gql: GraphQL, client: httpx.AsyncClient,
        caplog: pytest.LogCaptureFixture) -> None:
    await settled()  # the sockets of the tests before closed on the server's side too
    before = await metrics(client)
    with caplog.at_level(logging.INFO, logger="consumers_graphql.access"):
        async with connected(ws_url, api_key) as socket:
            await subscribe(socket, "1")
            await settled()
            during = await metrics(client)
            await create(gql, "m1@example.com", "m2@example.com")
            await events(socket, 2)
        await asyncio.sleep(0.2)  # the server's side of the close
    after = await metrics(client)
    assert during["consumers_subscriptions_active"] == before.get(
        "consumers_subscriptions_active", 0) + 1
    assert after["consumers_subscriptions_active"] == before.get(
        "consumers_subscriptions_active", 0)
    assert (after["consumers_subscription_events_delivered_total"]
            - before.get("consumers_subscription_events_delivered_total", 0)) == 2
    assert (after["consumers_subscription_delivery_lag_seconds_count"]
            - before.get("consumers_subscription_delivery_lag_seconds_count", 0)) == 2
    lines = [record for record in caplog.records if " 101 " in record.getMessage()]
    assert len(lines) == 1, [record.getMessage() for record in caplog.records]
    fields = getattr(lines[0], ACCESS_FIELDS)
    assert fields["method"] == "GET" and fields["path"] == "/graphql"
    assert fields["operation_type"] == "subscription" and fields["key_id"].startswith("key_")
    assert fields["close_code"] == 1000


async def metrics(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return {sample.name: sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples if not sample.labels or "le" not in sample.labels}


# --- the LISTEN connection ---------------------------------------------------------------------


async def test_the_listener_reconnects_and_nothing_committed_meanwhile_is_lost(
        ws_url: str, api_key: str, app: FastAPI, settings: Settings, execution_path: str
) -> None:
    if not TEST_DATABASE_URL or app.state.event_hub._listen_url() is None:
        pytest.skip("PostgreSQL with a LISTEN connection (not SQLite, not behind a pooler)")
    # Writes through another app (another process, as far as the hub can tell): they reach
    # the session app's hub only through NOTIFY, never through its in-process commits.
    other = create_app(settings)
    on_path(other, execution_path)
    async with LifespanManager(other), asgi_client(other) as client, \
            connected(ws_url, api_key) as socket:
        gql = GraphQL(client, api_key)
        await subscribe(socket, "1", types=["CONSUMER_CREATED"])
        await settled()
        async with app.state.database.write_engine.connect() as conn:
            killed = (await conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = :name"),
                {"name": LISTENER_NAME})).scalars().all()
            await conn.commit()
        assert killed and all(killed)  # this app's listener (and the other's)
        # committed while no connection listens: found by a poll meanwhile, or by the read
        # after reconnecting
        ids = await create(gql, "during@example.com")
        got = await events(socket, 1)
        assert [e["subjectId"] for e in got] == ids
        for _ in range(100):
            if app.state.event_hub.listening:
                break
            await asyncio.sleep(0.05)
        assert app.state.event_hub.listening
        ids = await create(gql, "after@example.com")  # and live again
        assert [e["subjectId"] for e in await events(socket, 1)] == ids


async def test_one_read_per_commit_with_a_listen_connection(
        ws_url: str, api_key: str, app: FastAPI, gql: GraphQL, execution_path: str) -> None:
    """This process's own commits signal through NOTIFY only while it listens, not also
    through the commit callback: one hub read per commit, not two."""
    hub = app.state.event_hub
    if not TEST_DATABASE_URL or hub._listen_url() is None:
        pytest.skip("PostgreSQL with a LISTEN connection (not SQLite, not behind a pooler)")
    async with connected(ws_url, api_key) as socket:
        await subscribe(socket, "1", types=["CONSUMER_CREATED"])
        await settled()
        reads = hub.reads
        for n in range(10):
            ids = await create(gql, f"read{n}@example.com")
            assert [e["subjectId"] for e in await events(socket, 1)] == ids
            await asyncio.sleep(0.05)  # a second signal's read, if any, apart from the next
        assert hub.reads - reads <= 11


def test_the_hubs_retries_wait_at_most_5_s_however_long_the_outage() -> None:
    """The hub retries its read every few seconds for as long as the database is out: the
    2,000th failure in a row (hours) waits 5 s too, rather than ending the hub's reads for
    good with an OverflowError (nothing could be delivered after the outage)."""
    assert backoff(1) == 0.4
    assert [backoff(n) for n in (5, 1_100, 2_000)] == [5.0, 5.0, 5.0]


async def test_without_its_listen_connection_a_process_polls(
        settings: Settings, api_key: str, execution_path: str) -> None:
    """A LISTEN connection that cannot be had (here: CONSUMERS_EVENTS_LISTEN_URL names a
    port nothing listens on) does not cut a process off from the others' events: it polls
    until it listens."""
    if not TEST_DATABASE_URL:
        pytest.skip("PostgreSQL (SQLite always polls)")
    nowhere = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    app = create_app(settings.model_copy(update={"events_listen_url": nowhere,
                                                 "events_poll_interval_ms": 100}))
    other = create_app(settings)
    on_path(other, execution_path)
    async with LifespanManager(app), LifespanManager(other), served(app) as url, \
            asgi_client(other) as client, connected(url, api_key) as socket:
        await subscribe(socket, "1", types=["CONSUMER_CREATED"])
        await settled()
        assert not app.state.event_hub.listening
        ids = await create(GraphQL(client, api_key), "polled@example.com")
        assert [e["subjectId"] for e in await events(socket, 1)] == ids


@pytest.mark.skipif(bool(TEST_DATABASE_URL),
                    reason="brings its own database: runs once, in the SQLite run")
async def test_a_database_outage_loses_nothing(cluster: PostgresCluster, tmp_path: Path
                                               ) -> None:
    """PostgreSQL stopped under an open subscription and started again: the listener
    reconnects and the subscription goes on; a socket opened meanwhile is told to retry
    (1013). Keys are checked on every use, so the outage meets them."""
    served_ = Served(cluster.url, tmp_path, env={"CONSUMERS_KEY_CACHE_SECONDS": "0"})
    try:
        served_.wait_until_up()
        secret = served_.secret()
        ws = served_.url.replace("http://", "ws://") + "/graphql"
        async with httpx.AsyncClient(base_url=served_.url, event_hooks=AUDIT.event_hooks(),
                                     timeout=30) as client, connected(ws, secret) as socket:
            gql = GraphQL(client, secret)
            await subscribe(socket, "1", types=["CONSUMER_CREATED"])
            await settled()
            before = await create(gql, "before@example.com")
            assert [e["subjectId"] for e in await events(socket, 1)] == before
            cluster.stop()
            async with websockets.connect(ws, subprotocols=[PROTOCOL]) as refused:  # type: ignore[list-item]
                await refused.send(json.dumps({"type": "connection_init", "payload": {
                    "Authorization": f"Bearer {secret}"}}))
                code, reason = await closed_with(refused)
            assert code == 1013 and "again" in reason
            await asyncio.sleep(3)  # several of the listener's attempts, not one line each
            cluster.start()
            await asyncio.sleep(1)  # the pools' and the listener's next attempts
            after = await create(gql, "after@example.com")
            assert [e["subjectId"] for e in await events(socket, 1)] == after
    finally:
        assert served_.stop() == 0, served_.output
    assert "Traceback" not in served_.output and "ERROR" not in served_.output, served_.output
    assert served_.output.count("the LISTEN connection is down") == 1, served_.output
    assert served_.output.count("could not read new events") <= 1, served_.output


# --- several processes -------------------------------------------------------------------------


@pytest.mark.database
@pytest.mark.parametrize("poll", [False, True])
async def test_a_write_through_one_process_reaches_a_subscriber_on_another(
        tmp_path: Path, poll: bool) -> None:
    """Two `serve` processes on one database: PostgreSQL through LISTEN/NOTIFY (or polling,
    as behind a pooler without a listen URL), SQLite by polling."""
    env = {"CONSUMERS_EVENTS_POLL_INTERVAL_MS": "100"}
    if TEST_DATABASE_URL:
        async with new_migrated_database("consumers_subs") as url:
            if poll:
                env["CONSUMERS_DATABASE_POOLER"] = "transaction"
            elif os.environ.get("CONSUMERS_DATABASE_POOLER") == "transaction":
                # CI behind pgbouncer: LISTEN on the server itself, in the same database
                assert ADMIN_DATABASE_URL
                env["CONSUMERS_EVENTS_LISTEN_URL"] = make_url(ADMIN_DATABASE_URL).set(
                    database=make_url(url).database).render_as_string(hide_password=False)
            await _across_processes(url, tmp_path, env)
    else:
        if not poll:
            pytest.skip("SQLite: other processes' commits are seen by polling only")
        await _across_processes(f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}", tmp_path, env)


@pytest.mark.database
async def test_serve_with_workers_delivers_to_every_socket(tmp_path: Path) -> None:
    """`serve --workers 2`: sockets spread over the workers by the kernel; a write through
    any of them reaches every socket."""
    env = {"CONSUMERS_WORKERS": "2", "CONSUMERS_EVENTS_POLL_INTERVAL_MS": "100"}
    if TEST_DATABASE_URL:
        async with new_migrated_database("consumers_subs") as url:
            await _workers(url, tmp_path, env)
    else:
        await _workers(f"sqlite+aiosqlite:///{tmp_path / 'workers.db'}", tmp_path, env)


@asynccontextmanager
async def subscribed_sockets(served_: Served, count: int
                             ) -> AsyncIterator[tuple[str, list[ClientConnection]]]:
    """`count` sockets to `served_` (once it is up), each with subscription "1" registered:
    the first key's secret and the sockets."""
    served_.wait_until_up()
    secret = served_.secret()
    ws = served_.url.replace("http://", "ws://") + "/graphql"
    async with contextlib.AsyncExitStack() as stack:
        sockets = [await stack.enter_async_context(connected(ws, secret)) for _ in range(count)]
        for socket in sockets:
            await subscribe(socket, "1")
        await settled()
        yield secret, sockets


@pytest.mark.skipif(bool(TEST_DATABASE_URL),
                    reason="brings its own database: runs once, in the SQLite run")
async def test_sigterm_closes_open_sockets_1012_and_exits_within_the_grace(
        tmp_path: Path) -> None:
    """`serve --workers 2` with subscribed sockets, then SIGTERM: every socket is closed
    with 1012 (Service Restart) well within the grace period, and the server exits 0."""
    served_ = Served(f"sqlite+aiosqlite:///{tmp_path / 'stop.db'}", tmp_path,
                     {"CONSUMERS_WORKERS": "2", "CONSUMERS_SHUTDOWN_GRACE_S": "5"})
    try:
        async with subscribed_sockets(served_, 4) as (_secret, sockets):
            started = asyncio.get_running_loop().time()
            served_.process.send_signal(signal.SIGTERM)
            codes = [(await closed_with(socket))[0] for socket in sockets]
            assert asyncio.get_running_loop().time() - started < 5
        assert codes == [1012] * 4
        assert await asyncio.to_thread(served_.process.wait, 10) == 0
    finally:
        served_.stop()


async def _workers(url: str, tmp_path: Path, env: dict[str, str]) -> None:
    if os.environ.get("CONSUMERS_DATABASE_POOLER") == "transaction" and TEST_DATABASE_URL:
        env = {**env, "CONSUMERS_DATABASE_POOLER": "transaction"}  # (polls: no listen URL)
    served_ = Served(url, tmp_path, env)
    try:
        async with subscribed_sockets(served_, 4) as (secret, sockets):
            async with httpx.AsyncClient(base_url=served_.url,
                                         event_hooks=AUDIT.event_hooks()) as client:
                ids = await create(GraphQL(client, secret), "workers@example.com")
            for socket in sockets:
                assert [e["subjectId"] for e in await events(socket, 1)] == ids
    finally:
        assert served_.stop() == 0, served_.output


async def _across_processes(url: str, tmp_path: Path, env: dict[str, str]) -> None:
    writer = Served(url, tmp_path, env)
    try:
        writer.wait_until_up()
        secret = writer.secret()
        reader = Served(url, tmp_path, env)
        try:
            reader.wait_until_up()
            ws = reader.url.replace("http://", "ws://") + "/graphql"
            async with connected(ws, secret) as socket:
                await subscribe(socket, "1")
                await settled()
                async with httpx.AsyncClient(base_url=writer.url,
                                             event_hooks=AUDIT.event_hooks()) as client:
                    ids = await create(GraphQL(client, secret), "x1@example.com",
                                       "x2@example.com")
                got = await events(socket, 2)
            assert [e["subjectId"] for e in got] == ids
        finally:
            reader.stop()
        # one access line for the socket, and none of uvicorn's own about it
        assert reader.output.count('"GET /graphql HTTP/1.1" 101 ') == 1, reader.output
        assert "[accepted]" not in reader.output and "connection open" not in reader.output
    finally:
        writer.stop()
