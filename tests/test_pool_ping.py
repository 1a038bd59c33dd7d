"""Pooled PostgreSQL connections are pinged only when they have been idle (store/db.py,
ping_idle_connections): none under steady use, one after a pause, and a connection the
server closed while the pool held it is replaced, not handed to a request. The same holds
for a connection handed from one request to the next (Lending), and none is kept once no
request has come for LENDING_GRACE_S."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import event, text

from consumers_graphql.ids import IdKind, new_id
from consumers_graphql.settings import Settings
from consumers_graphql.store import db
from consumers_graphql.web.app import create_app
from tests.conftest import (
    TEST_DATABASE_URL,
    GraphQL,
    checked_out,
    kept_returned,
    lock_waiters,
    new_migrated_database,
    on_path,
)
from tests.log_audit import AUDIT, asgi_client

pytestmark = pytest.mark.skipif(not TEST_DATABASE_URL,
                                reason="a PostgreSQL pool's pings (SQLite has none)")

QUERY = "{ consumers(first: 1) { totalCount } }"


not_behind_a_pooler = pytest.mark.skipif(
    bool(os.environ.get("CONSUMERS_DATABASE_POOLER")),
    reason="behind a pooler the server's end of a connection never reaches the client's "
           "(the pooler opens another): nothing to replace")


async def end_connections(app: FastAPI, where: str = "") -> int:
    """The server ends the app's database's client connections but the one asking (`where`
    narrows them), as an administrator or a restart would; how many, once the event loop
    has heard their goodbye."""
    async with app.state.database.write_engine.connect() as conn:
        ended = (await conn.execute(text(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            f"AND backend_type = 'client backend' {where}"))).scalar_one()
        await conn.rollback()
    await asyncio.sleep(0.05)
    return int(ended)


@pytest.fixture
async def own_app(settings: Settings, execution_path: str) -> AsyncIterator[FastAPI]:
    """An app on a database of its own, whose connections a test may cut."""
    async with new_migrated_database("consumers_ping") as url:
        app = create_app(settings.model_copy(update={"database_url": url}))
        on_path(app, execution_path)
        async with LifespanManager(app):
            yield app


@pytest.fixture
async def gql(own_app: FastAPI) -> AsyncIterator[GraphQL]:
    created = await own_app.state.keys.create("pings")
    secret = created.secret.get_secret_value()
    AUDIT.use(secret)
    async with asgi_client(own_app) as client:
        yield GraphQL(client, secret)


@pytest.fixture
def pings(own_app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The pings the app's read engine sends (the dialect's own ping, still sent)."""
    dialect = own_app.state.database.primary_engine.sync_engine.dialect
    sent: list[object] = []
    real = dialect.do_ping

    def do_ping(dbapi_connection: Any) -> bool:
        sent.append(dbapi_connection)
        return bool(real(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", do_ping)
    return sent


async def test_no_ping_under_steady_use_and_one_after_a_pause(
    gql: GraphQL, pings: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a threshold a loaded machine does not reach between two requests: 0.1 s was, once,
    # under the whole suite)
    monkeypatch.setattr(db, "POOL_PING_IDLE_S", 1.0)
    # given requests one after the other: each checks a connection out, none is pinged
    for _ in range(5):
        assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert pings == []
    # when the pool has been idle past the threshold, then the next checkout pings
    await asyncio.sleep(1.2)
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert len(pings) == 1


@not_behind_a_pooler
async def test_a_connection_the_server_closed_in_the_pool_is_replaced_not_used(
    own_app: FastAPI, gql: GraphQL, pings: list[object]
) -> None:
    # given a pooled connection, used a moment ago (no ping will check it)
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    # when the server ends it (an administrator, a restart)
    assert await end_connections(own_app) >= 1
    # then the next request gets a new connection, without an error and without a ping
    assert (await gql.data(QUERY))["consumers"]["totalCount"] == 0
    assert pings == []


# --- connections handed from one request to the next (store/db.py, Lending) ---------------

PAGE = "{ consumers(first: 1) { nodes { id } } }"
HELD = "{ audiences(first: 1) { nodes { id } } }"


def out_of_pool(app: FastAPI) -> int:
    """The read pool's connections out: in use by requests, and kept for a next one."""
    return int(app.state.database.read_engine.sync_engine.pool.checkedout())


@pytest.fixture
def checkouts(own_app: FastAPI) -> Iterator[list[object]]:
    """The connections the read engine's pool hands out."""
    handed: list[object] = []

    def checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        handed.append(dbapi_connection)

    engine = own_app.state.database.primary_engine.sync_engine
    event.listen(engine, "checkout", checkout)
    yield handed
    event.remove(engine, "checkout", checkout)


@asynccontextmanager
async def a_request_in_flight(own_app: FastAPI, gql: GraphQL) -> AsyncIterator[
        asyncio.Future[Any]]:
    """A request held mid-statement (its read waits on a lock of the audiences table) for
    the block's duration; it ends after it. The orders table is locked too."""
    async with own_app.state.database.write_engine.connect() as holder:
        await holder.execute(text("LOCK TABLE audiences, orders IN ACCESS EXCLUSIVE MODE"))
        held = asyncio.ensure_future(gql.data(HELD))
        assert len(await lock_waiters(holder, 1)) == 1 and not held.done()
        try:
            yield held
        finally:
            await holder.rollback()
    assert await asyncio.wait_for(held, 10) == {"audiences": {"nodes": []}}


@pytest.fixture
def unhurried(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection goes stale within the test (a loaded machine may take longer than
    half a second between two requests): what is kept is lent, unless the test says why
    not."""
    monkeypatch.setattr(db, "POOL_PING_IDLE_S", 60.0)


@pytest.mark.usefixtures("unhurried")
async def test_a_connection_goes_to_the_next_request_while_another_is_in_flight(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], pings: list[object]
) -> None:
    await gql.data(PAGE)  # the key verified (and cached) on a connection of its own
    async with a_request_in_flight(own_app, gql):
        checkouts.clear()
        # when requests follow one another while it is held
        for _ in range(5):
            assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        # then the first one's connection served them all (the held request took the one
        # kept before): one checkout, and it is kept after the last of them, out of the
        # pool with the held request's
        assert len(checkouts) == 1
        assert out_of_pool(own_app) == 2 and checked_out(own_app) == 1
    # and once no request has come for the grace, every connection is back in the pool
    await kept_returned(own_app)
    assert out_of_pool(own_app) == 0
    assert pings == []


@pytest.mark.usefixtures("unhurried")
async def test_requests_one_at_a_time_share_a_connection_returned_after_the_grace(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], pings: list[object],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    await gql.data(PAGE)  # the key verified (and cached) on a connection of its own
    await kept_returned(own_app)
    checkouts.clear()
    # when requests come one at a time, each within the grace of the one before (a long one:
    # a loaded machine may take a while between two requests)
    monkeypatch.setattr(db, "LENDING_GRACE_S", 30.0)
    for _ in range(4):
        assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        # then the connection is kept between them, not in use by any request
        assert out_of_pool(own_app) == 1 and checked_out(own_app) == 0
    # and the first one's checkout served them all
    assert len(checkouts) == 1 and pings == []
    # when no request comes for the grace after the last, then it is back in the pool
    monkeypatch.setattr(db, "LENDING_GRACE_S", 0.05)
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    await kept_returned(own_app)
    assert out_of_pool(own_app) == 0 and own_app.state.database.lending.kept == 0
    # and the next request checks one out again
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    assert len(checkouts) == 2


async def test_a_connection_kept_past_the_ping_threshold_is_pinged_before_use(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], pings: list[object],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "POOL_PING_IDLE_S", 0.1)
    await gql.data(PAGE)
    async with a_request_in_flight(own_app, gql):
        checkouts.clear()
        await gql.data(PAGE)  # its connection kept
        await asyncio.sleep(0.2)
        # when the next request comes after the threshold
        assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        # then the kept connection went back to the pool as idle since it was kept: the
        # pool's checkout pinged it before the request used it
        assert len(checkouts) == 2 and checkouts[1] is checkouts[0]
        assert pings == [checkouts[0]]
    assert checked_out(own_app) == 0


@not_behind_a_pooler
@pytest.mark.usefixtures("unhurried")
async def test_a_kept_connection_the_server_closed_is_not_lent(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object]
) -> None:
    await gql.data(PAGE)
    async with a_request_in_flight(own_app, gql) as held:
        await gql.data(PAGE)  # its connection kept
        # when the server ends every idle connection (the kept one among them)
        assert await end_connections(own_app, "AND state = 'idle'") >= 1
        checkouts.clear()
        # then the next request is answered on a connection from the pool, not the dead one
        assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        assert len(checkouts) == 1
        assert not held.done()
    assert checked_out(own_app) == 0


@not_behind_a_pooler
@pytest.mark.usefixtures("unhurried")
async def test_a_connection_kept_in_the_grace_the_server_closed_is_not_lent(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "LENDING_GRACE_S", 30.0)
    await gql.data(PAGE)
    # given a connection kept after the last request, none in flight (the grace)
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    assert own_app.state.database.lending.kept == 1
    # when the server ends every idle connection (the kept one among them)
    assert await end_connections(own_app, "AND state = 'idle'") >= 1
    checkouts.clear()
    # then the next request is answered on a connection from the pool, not the dead one
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    assert len(checkouts) == 1
    assert checked_out(own_app) == 0 and out_of_pool(own_app) == 1


@not_behind_a_pooler
@pytest.mark.usefixtures("unhurried")
async def test_kept_connections_the_server_closed_go_back_invalidated_after_the_grace(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(db, "LENDING_GRACE_S", 2.0)
    await gql.data(PAGE)
    # given a connection kept after the last request, for the grace
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    assert own_app.state.database.lending.kept == 1
    # when the server ends it within the grace
    assert await end_connections(own_app, "AND state = 'idle'") >= 1
    # then at the grace's end it goes back to the pool, which drops it (nothing logged)
    await kept_returned(own_app)
    assert own_app.state.database.lending.kept == 0 and out_of_pool(own_app) == 0
    assert "could not go back" not in caplog.text
    # and the next request, on a connection the pool hands out without a ping (unhurried),
    # gets a live one: the dead one was not put back
    checkouts.clear()
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
    assert len(checkouts) == 1


@pytest.mark.cancels_statements
@pytest.mark.usefixtures("unhurried")
async def test_a_request_cancelled_mid_statement_keeps_no_connection(
    own_app: FastAPI, gql: GraphQL
) -> None:
    await gql.data(PAGE)
    async with a_request_in_flight(own_app, gql):
        # given a second request whose look-up (a DataLoader's batch, a task of its own)
        # waits on the lock of the orders table
        waiting = asyncio.ensure_future(gql.data(
            "query($id: ID!) { node(id: $id) { id } }", {"id": new_id(IdKind.ORDER)}))
        async with own_app.state.database.write_engine.connect() as watcher:
            assert len(await lock_waiters(watcher, 2)) == 2
            await watcher.rollback()
        assert out_of_pool(own_app) == 2
        # when its client goes away (the app's call cancelled) while another is in flight
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # then its connection, in the middle of a statement, is dropped (by a shielded task,
        # which may end after the cancelled call), not kept for the next request: only the
        # held request's is out of the pool
        for _ in range(200):
            if out_of_pool(own_app) == 1:
                break
            await asyncio.sleep(0.01)
        assert out_of_pool(own_app) == 1
        # and the next request is answered on a sound connection, and kept
        assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        assert out_of_pool(own_app) == 2 and checked_out(own_app) == 1
    assert checked_out(own_app) == 0
    assert await gql.data(PAGE) == {"consumers": {"nodes": []}}


@pytest.mark.usefixtures("unhurried")
async def test_during_an_outage_no_connection_is_lent_every_checkout_pings(
    own_app: FastAPI, gql: GraphQL, checkouts: list[object], pings: list[object]
) -> None:
    outage = own_app.state.database.outage
    await gql.data(PAGE)
    async with a_request_in_flight(own_app, gql):
        checkouts.clear()
        await gql.data(PAGE)  # its connection kept
        # when a request meets the database out of reach (its outage begins)
        outage.failed(ConnectionRefusedError())
        # then the next request is not lent the kept connection: the pool's checkout pings
        # it first, and that ping, answered, ends the outage
        assert await gql.data(PAGE) == {"consumers": {"nodes": []}}
        assert len(checkouts) == 2 and pings == [checkouts[1]]
        assert not outage.down
        # and once it is over, connections are kept and lent again, without a ping
        await gql.data(PAGE)
        assert len(checkouts) == 2 and len(pings) == 1
    assert checked_out(own_app) == 0
