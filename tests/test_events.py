"""Change events: every write records its events in its own transaction, with the subject as
REST shows it; Query.events and GET /api/v1/events page through them in commit order,
resume from any cursor or event id, and refuse a cursor older than the retention."""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from datetime import timedelta
from itertools import pairwise
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from consumers_graphql.store import events as events_store
from consumers_graphql.store.models import utcnow
from tests.conftest import GraphQL, StatementCounter

EVENTS = """
query Events($first: Int, $after: String, $types: [EventType!], $subjectId: ID) {
  events(first: $first, after: $after, types: $types, subjectId: $subjectId) {
    edges { cursor node { id type occurredAt subjectId data } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
    totalCount
  }
}
"""
CREATE = """
mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id } userErrors { code } }
}
"""
UPDATE = """
mutation Update($id: ID!, $input: ConsumerUpdateInput!) {
  consumerUpdate(id: $id, input: $input) { consumer { id } userErrors { code } }
}
"""
DELETE = """
mutation Delete($id: ID!) { consumerDelete(id: $id) { consumer { id } userErrors { code } } }
"""
BATCH_CREATE = """
mutation Batch($input: [ConsumerCreateInput!]!, $policy: ErrorPolicy) {
  consumerBatchCreate(input: $input, errorPolicy: $policy) {
    count results { consumer { id } } userErrors { code }
  }
}
"""
BATCH_UPDATE = """
mutation Batch($input: [ConsumerBatchUpdateInput!]!) {
  consumerBatchUpdate(input: $input) { count userErrors { code } }
}
"""
UPSERT = """
mutation Upsert($input: ConsumerUpsertInput!) {
  consumerUpsert(input: $input) { consumer { id } created userErrors { code } }
}
"""
BATCH_UPSERT = """
mutation Batch($input: [ConsumerUpsertInput!]!) {
  consumerBatchUpsert(input: $input) {
    count results { consumer { id } created } userErrors { code }
  }
}
"""
RECORD = """
mutation Record($input: OrderRecordInput!) {
  orderRecord(input: $input) { order { id } userErrors { code } }
}
"""
ORDER_DELETE = """
mutation Delete($id: ID!) { orderDelete(id: $id) { order { id } userErrors { code } } }
"""
AUDIENCE = """
mutation A($input: AudienceCreateInput!) {
  audienceCreate(input: $input) { audience { id } userErrors { code } }
}
"""
AUDIENCE_UPDATE = """
mutation A($id: ID!, $input: AudienceUpdateInput!) {
  audienceUpdate(id: $id, input: $input) { audience { id } userErrors { code } }
}
"""
AUDIENCE_DELETE = """
mutation A($id: ID!) { audienceDelete(id: $id) { audience { id } userErrors { code } } }
"""
ADD = """
mutation A($a: ID!, $c: [ID!]!) {
  audienceAddConsumers(audienceId: $a, consumerIds: $c) { audience { id } userErrors { code } }
}
"""
REMOVE = """
mutation A($a: ID!, $c: [ID!]!) {
  audienceRemoveConsumers(audienceId: $a, consumerIds: $c) {
    audience { id } userErrors { code }
  }
}
"""
NODE = "query N($id: ID!) { node(id: $id) { id ... on Event { type subjectId data } } }"


async def feed(gql: GraphQL, **arguments: Any) -> dict[str, Any]:
    page: dict[str, Any] = (await gql.data(EVENTS, {"first": 100, **arguments}))["events"]
    return page


async def all_events(gql: GraphQL, **arguments: Any) -> list[dict[str, Any]]:
    return [edge["node"] for edge in (await feed(gql, **arguments))["edges"]]


async def rest_consumer(client: httpx.AsyncClient, headers: dict[str, str], id: str
                        ) -> dict[str, Any]:
    response = await client.get(f"/api/v1/consumers/{id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def create(gql: GraphQL, **input: Any) -> str:
    payload = (await gql.data(CREATE, {"input": input}))["consumerCreate"]
    assert payload["userErrors"] == [], payload
    return str(payload["consumer"]["id"])


# -- what each write records ------------------------------------------------------------------


async def test_consumer_writes_record_the_consumer_as_rest_shows_it(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    id = await create(gql, email="ada@example.com", metadata={"tier": "gold"})
    created = await rest_consumer(client, auth_headers, id)
    await gql.data(UPDATE, {"id": id, "input": {"fullName": "Ada Lovelace"}})
    await gql.data(UPDATE, {"id": id, "input": {"fullName": "Ada Lovelace"}})  # no change
    updated = await rest_consumer(client, auth_headers, id)
    await gql.data(DELETE, {"id": id})

    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events] == [
        ("CONSUMER_CREATED", id), ("CONSUMER_UPDATED", id), ("CONSUMER_DELETED", id)]
    assert [e["data"] for e in events] == [created, updated, updated]
    assert all(e["id"].startswith("evt_") for e in events)
    assert events[0]["occurredAt"] >= created["createdAt"]  # (both RFC 3339 in UTC)


async def test_refused_and_rolled_back_writes_record_nothing(gql: GraphQL) -> None:
    id = await create(gql, email="taken@example.com")
    before = await all_events(gql)
    refused = (await gql.data(CREATE, {"input": {"email": "TAKEN@example.com"}}))
    assert refused["consumerCreate"]["userErrors"] == [{"code": "EMAIL_TAKEN"}]
    batch = (await gql.data(BATCH_CREATE, {"input": [
        {"email": "new@example.com"}, {"email": "taken@example.com"}]}))["consumerBatchCreate"]
    assert batch["count"] == 0  # REJECT_EVERYTHING: the good row is not written either
    missing = (await gql.data(RECORD, {"input": {
        "consumerId": id, "amount": 10**15, "currency": "USD"}}))["orderRecord"]
    assert missing["userErrors"]
    assert await all_events(gql) == before


async def test_a_batch_records_one_event_per_written_row_in_one_insert(
    gql: GraphQL, sql: StatementCounter, dialect: str
) -> None:
    items = [{"email": f"b{n}@example.com"} for n in range(5)]
    items[2] = {"email": "not an email"}
    with sql.counting():
        payload = (await gql.data(BATCH_CREATE, {"input": items,
                                                 "policy": "REJECT_FAILED_ROWS"}))
    batch = payload["consumerBatchCreate"]
    assert batch["count"] == 4
    written = [r["consumer"]["id"] for r in batch["results"] if r["consumer"] is not None]
    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events] == [
        ("CONSUMER_CREATED", id) for id in written]
    assert [e["data"]["email"] for e in events] == [f"b{n}@example.com" for n in (0, 1, 3, 4)]
    inserts = [s for s in sql.event_statements if "INSERT" in s.upper()]
    assert len(inserts) == 1, sql.event_statements
    # PostgreSQL: the lock, the INSERT, the pg_notify; SQLite: the INSERT alone.
    assert len(sql.event_statements) == (3 if dialect == "postgresql" else 1)

    with sql.counting():
        updated = (await gql.data(BATCH_UPDATE, {"input": [
            {"id": written[0], "fullName": "Zed"},
            {"id": written[1], "email": "b1@example.com"},  # unchanged
            {"id": written[2], "phone": "+14155550100"},
        ]}))["consumerBatchUpdate"]
    assert updated["count"] == 3
    later = (await all_events(gql))[len(events):]
    assert [(e["type"], e["subjectId"]) for e in later] == [
        ("CONSUMER_UPDATED", written[0]), ("CONSUMER_UPDATED", written[2])]
    assert later[0]["data"]["fullName"] == "Zed"
    assert later[1]["data"]["phone"] == "+14155550100"
    assert len([s for s in sql.event_statements if "INSERT" in s.upper()]) == 1


async def test_upserts_record_created_or_updated_per_row(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    one = (await gql.data(UPSERT, {"input": {"externalId": "x-1", "email": "x1@example.com"}}
                          ))["consumerUpsert"]
    assert one["created"] is True
    batch = (await gql.data(BATCH_UPSERT, {"input": [
        {"externalId": "x-1", "fullName": "One"},
        {"externalId": "x-2", "fullName": "Two"},
        {"externalId": "x-1b"},
    ]}))["consumerBatchUpsert"]
    assert [r["created"] for r in batch["results"]] == [False, True, True]
    ids = [r["consumer"]["id"] for r in batch["results"]]
    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events] == [
        ("CONSUMER_CREATED", one["consumer"]["id"]), ("CONSUMER_UPDATED", ids[0]),
        ("CONSUMER_CREATED", ids[1]), ("CONSUMER_CREATED", ids[2])]
    for event in events[1:]:
        assert event["data"] == await rest_consumer(client, auth_headers, event["subjectId"])


async def test_orders_record_the_order_and_the_consumers_new_totals(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    consumer = await create(gql)
    first = (await gql.data(RECORD, {"input": {
        "consumerId": consumer, "amount": 12.5, "currency": "EUR"}}))["orderRecord"]
    second = (await gql.data(RECORD, {"input": {
        "consumerId": consumer, "amount": 7.25, "currency": "EUR",
        "placedAt": "2026-01-02T03:04:05Z", "externalId": "o-2"}}))["orderRecord"]
    after_both = await rest_consumer(client, auth_headers, consumer)
    orders = (await client.get(f"/api/v1/consumers/{consumer}?include=orders",
                               headers=auth_headers)).json()["orders"]
    by_id = {order["id"]: order for order in orders}
    await gql.data(ORDER_DELETE, {"id": first["order"]["id"]})
    after_delete = await rest_consumer(client, auth_headers, consumer)

    events = (await all_events(gql))[1:]  # after CONSUMER_CREATED
    assert [(e["type"], e["subjectId"]) for e in events] == [
        ("ORDER_RECORDED", first["order"]["id"]), ("CONSUMER_UPDATED", consumer),
        ("ORDER_RECORDED", second["order"]["id"]), ("CONSUMER_UPDATED", consumer),
        ("ORDER_DELETED", first["order"]["id"]), ("CONSUMER_UPDATED", consumer)]
    assert events[0]["data"] == by_id[first["order"]["id"]]
    assert events[2]["data"] == by_id[second["order"]["id"]]
    assert events[4]["data"] == by_id[first["order"]["id"]]  # as it was
    assert events[1]["data"]["totalOrders"] == 1
    assert events[1]["data"]["totalOrderValue"] == 12.5
    assert events[3]["data"] == after_both
    assert events[3]["data"]["totalOrderValue"] == 19.75
    assert events[5]["data"] == after_delete
    assert after_delete["totalOrders"] == 1 and after_delete["totalOrderValue"] == 7.25


async def test_audience_writes_and_membership_changes(gql: GraphQL) -> None:
    ids = [await create(gql) for _ in range(3)]
    audience = (await gql.data(AUDIENCE, {"input": {"name": "VIP"}}))["audienceCreate"]
    aud = audience["audience"]["id"]
    await gql.data(AUDIENCE_UPDATE, {"id": aud, "input": {"description": "best"}})
    await gql.data(ADD, {"a": aud, "c": ids[:2]})
    await gql.data(ADD, {"a": aud, "c": [ids[1], ids[2]]})  # ids[1] is a member already
    await gql.data(ADD, {"a": aud, "c": [ids[0]]})  # nothing changes: no event
    await gql.data(REMOVE, {"a": aud, "c": [ids[2], ids[0]]})
    await gql.data(AUDIENCE_DELETE, {"id": aud})

    events = (await all_events(gql))[3:]
    assert [e["type"] for e in events] == [
        "AUDIENCE_CREATED", "AUDIENCE_UPDATED", "AUDIENCE_MEMBERS_ADDED",
        "AUDIENCE_MEMBERS_ADDED", "AUDIENCE_MEMBERS_REMOVED", "AUDIENCE_DELETED"]
    assert {e["subjectId"] for e in events} == {aud}
    assert events[0]["data"]["name"] == "VIP" and events[0]["data"]["description"] is None
    assert events[1]["data"]["description"] == "best"
    assert events[2]["data"]["consumerIds"] == ids[:2]
    assert events[3]["data"]["consumerIds"] == [ids[2]]
    assert events[4]["data"]["consumerIds"] == [ids[2], ids[0]]
    assert events[4]["data"]["name"] == "VIP"
    assert events[5]["data"] == {k: v for k, v in events[1]["data"].items()}


async def test_keyed_writes_record_once_and_refused_units_record_nothing(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL
) -> None:
    headers = {**auth_headers, "Idempotency-Key": "k-1"}
    body = {"email": "keyed@example.com"}
    first = await client.post("/api/v1/consumers", json=body, headers=headers)
    again = await client.post("/api/v1/consumers", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true"
    events = await all_events(gql)
    assert [(e["type"], e["data"]) for e in events] == [("CONSUMER_CREATED", first.json())]

    # A keyed mutation whose second field is refused: the first field's write and event
    # commit with the unit; a keyed batch refused whole records nothing.
    two = """mutation Two { a: consumerCreate(input: {email: "k2@example.com"}) { consumer { id } }
      b: consumerCreate(input: {email: "keyed@example.com"}) { userErrors { code } } }"""
    response = await client.post("/graphql", json={"query": two},
                                 headers={**auth_headers, "Idempotency-Key": "k-2"})
    assert response.status_code == 200, response.text
    created = response.json()["data"]["a"]["consumer"]["id"]
    refused = await client.post("/api/v1/consumers/batch", json=[
        {"email": "k3@example.com"}, {"email": "keyed@example.com"}],
        headers={**auth_headers, "Idempotency-Key": "k-3"})
    assert refused.status_code == 400, refused.text
    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events[1:]] == [("CONSUMER_CREATED", created)]


async def test_a_keyed_mutation_by_apq_hash_records_once_whatever_form_replays_it(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL
) -> None:
    """A keyed mutation registered by APQ, sent again by hash alone and then as text under
    the same key (one request: api/documents.py), writes and records once."""
    before = len(await all_events(gql))
    persisted = {"persistedQuery": {"version": 1,
                                    "sha256Hash": hashlib.sha256(CREATE.encode()).hexdigest()}}
    variables = {"input": {"email": "apq-keyed@example.com"}}
    headers = {**auth_headers, "Idempotency-Key": "apq-k-1"}
    first = await client.post("/graphql", headers=headers, json={
        "query": CREATE, "extensions": persisted, "variables": variables})
    assert first.status_code == 200 and "errors" not in first.json(), first.text
    for body in ({"extensions": persisted, "variables": variables},
                 {"query": CREATE, "variables": variables}):
        again = await client.post("/graphql", headers=headers, json=body)
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    created = first.json()["data"]["consumerCreate"]["consumer"]["id"]
    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events[before:]] == [
        ("CONSUMER_CREATED", created)]


async def test_commit_callbacks_run_after_each_commit_that_recorded_events(
    client: httpx.AsyncClient, auth_headers: dict[str, str], app: FastAPI, gql: GraphQL
) -> None:
    """subscribe_commits (what subscriptions wake on): once per committed write that
    recorded events, the keyed ones included, when its events can be read; never for a
    write that recorded none or was rolled back."""
    database = app.state.database
    heads: list[Any] = []
    unsubscribe = events_store.subscribe_commits(
        database, lambda: heads.append(asyncio.ensure_future(events_store.head(database))))
    try:
        await create(gql, email="cb@example.com")
        keyed = await client.post("/api/v1/consumers", json={"email": "cb2@example.com"},
                                  headers={**auth_headers, "Idempotency-Key": "cb-1"})
        assert keyed.status_code == 201
        assert len(heads) == 2
        refused = await client.post("/api/v1/consumers/batch", json=[
            {"email": "cb3@example.com"}, {"email": "cb@example.com"}],
            headers={**auth_headers, "Idempotency-Key": "cb-2"})
        assert refused.status_code == 400
        await gql.data(UPDATE, {"id": keyed.json()["id"], "input": {"email": "cb2@example.com"}})
        assert len(heads) == 2
        # A keyed mutation whose second field is refused (its SAVEPOINT rolled back): one
        # callback, at the commit of the first field's write.
        two = """mutation { a: consumerCreate(input: {email: "cb4@example.com"}) { consumer { id } }
          b: consumerCreate(input: {email: "cb@example.com"}) { userErrors { code } } }"""
        response = await client.post("/graphql", json={"query": two},
                                     headers={**auth_headers, "Idempotency-Key": "cb-3"})
        assert response.json()["data"]["b"]["userErrors"] == [{"code": "EMAIL_TAKEN"}]
        assert len(heads) == 3
        # each callback ran once its transaction's events were committed
        positions = [await head for head in heads]
        feed_positions = await events_store.read_events(
            database, after=None, types=None, subject_id=None, limit=10)
        assert positions == [record.position for record in feed_positions]
    finally:
        unsubscribe()
    await create(gql)
    assert len(heads) == 3


UPSERT_TWO = """mutation Two($a: String!, $b: String!) {
  a: consumerUpsert(input: {externalId: $a, fullName: "A"}) { created userErrors { code } }
  b: consumerUpsert(input: {externalId: $b, fullName: "B"}) { created userErrors { code } } }"""


async def test_units_run_again_after_a_deadlock_record_their_events_once(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL
) -> None:
    """Keyed documents upserting two externalIds in opposite orders deadlock on PostgreSQL
    (tests/test_safe_writes_together.py); the loser's unit is rolled back and run again.
    Its first run's events go with it: per consumer, one CONSUMER_CREATED, then only
    updates that changed something (never the same fullName twice in a row), the last one
    as REST shows the consumer."""
    async def send(n: int) -> httpx.Response:
        order = {"a": "crm-x", "b": "crm-y"} if n % 2 else {"a": "crm-y", "b": "crm-x"}
        return await client.post("/graphql", json={"query": UPSERT_TWO, "variables": order},
                                 headers={**auth_headers, "Idempotency-Key": f"opposite-{n}"})

    answers = await asyncio.gather(*(send(n) for n in range(6)))
    assert all(a.status_code == 200 and "errors" not in a.json() for a in answers)
    events = await all_events(gql)
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_subject.setdefault(event["subjectId"], []).append(event)
    assert len(by_subject) == 2
    for subject, history in by_subject.items():
        assert [e["type"] for e in history] == (
            ["CONSUMER_CREATED"] + ["CONSUMER_UPDATED"] * (len(history) - 1))
        names = [e["data"]["fullName"] for e in history]
        assert all(a != b for a, b in pairwise(names)), names
        assert history[-1]["data"] == await rest_consumer(client, auth_headers, subject)


async def test_a_keyed_unit_waiting_for_a_row_holds_back_no_other_writer(
    client: httpx.AsyncClient, auth_headers: dict[str, str], gql: GraphQL, dialect: str,
    write_engine: Any,
) -> None:
    """A keyed document's events are inserted at the end of its unit (under the commit-order
    lock on PostgreSQL), not by its first field: a unit whose second field waits for a row
    another transaction holds keeps no other writer from committing, and cannot close a
    deadlock with a writer that holds a row it wants while waiting for the lock."""
    if dialect != "postgresql":
        pytest.skip("SQLite's writers queue for the write lock whole")
    first, second = await create(gql, email="held-1@example.com"), await create(gql)
    document = f"""mutation {{
      a: consumerUpdate(id: "{first}", input: {{fullName: "A"}}) {{ userErrors {{ code }} }}
      b: consumerUpdate(id: "{second}", input: {{fullName: "B"}}) {{ userErrors {{ code }} }}
    }}"""
    async with write_engine.connect() as other, write_engine.connect() as watcher:
        await other.execute(text("SELECT id FROM consumers WHERE id = :id FOR UPDATE"),
                            {"id": second})
        keyed = asyncio.create_task(client.post(
            "/graphql", json={"query": document},
            headers={**auth_headers, "Idempotency-Key": "held"}))
        for _ in range(500):  # until its field b waits for the row
            await watcher.rollback()
            waiting = (await watcher.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database()"))).scalar_one()
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting == 1
        third = await asyncio.wait_for(create(gql, email="free@example.com"), timeout=10)
        await other.rollback()
    response = await keyed
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    events = await all_events(gql)
    assert [(e["type"], e["subjectId"]) for e in events[2:]] == [
        ("CONSUMER_CREATED", third), ("CONSUMER_UPDATED", first),
        ("CONSUMER_UPDATED", second)]


async def test_writes_in_the_same_millisecond_record_distinct_event_ids(app: FastAPI) -> None:
    """A write's events take consecutive ids from a ULID of their time: two writes of the
    same millisecond (keyed units end together, batches) must not share any."""
    database = app.state.database
    at = utcnow()
    new = [events_store.NewEvent("CONSUMER_CREATED", f"cons_{n}", {"n": n}) for n in range(3)]
    for _ in range(2):
        async with database.write_session() as session, session.begin():
            await events_store.record_events(database, session, new, at)
    records = await events_store.read_events(database, after=None, types=None,
                                             subject_id=None, limit=10)
    assert len({record.id for record in records}) == 6
    assert [record.id for record in records[:3]] == sorted(record.id for record in records[:3])


# -- reading: pages, filters, cursors ---------------------------------------------------------


async def test_pages_filters_and_resuming_from_any_cursor_or_event_id(gql: GraphQL) -> None:
    ids = [await create(gql) for _ in range(4)]
    await gql.data(UPDATE, {"id": ids[1], "input": {"fullName": "B"}})
    await gql.data(DELETE, {"id": ids[2]})
    everything = await feed(gql)
    edges = everything["edges"]
    assert len(edges) == 6 and everything["totalCount"] == 6
    assert everything["pageInfo"]["hasNextPage"] is False
    assert everything["pageInfo"]["hasPreviousPage"] is False

    # Page by page, from every cursor: the rest of the feed, in order, exactly.
    for index, edge in enumerate(edges):
        rest = await feed(gql, after=edge["cursor"])
        assert [e["node"]["id"] for e in rest["edges"]] == [
            e["node"]["id"] for e in edges[index + 1:]]
        assert rest["pageInfo"]["hasPreviousPage"] is True
        by_id = await feed(gql, after=edge["node"]["id"])
        assert by_id["edges"] == rest["edges"]
    two = await feed(gql, first=2)
    assert [e["node"]["id"] for e in two["edges"]] == [e["node"]["id"] for e in edges[:2]]
    assert two["pageInfo"]["hasNextPage"] is True
    assert two["pageInfo"]["endCursor"] == edges[1]["cursor"]
    zero = await feed(gql, first=0)
    assert zero["edges"] == [] and zero["pageInfo"]["hasNextPage"] is True

    types = await feed(gql, types=["CONSUMER_UPDATED", "CONSUMER_DELETED"])
    assert [(e["node"]["type"], e["node"]["subjectId"]) for e in types["edges"]] == [
        ("CONSUMER_UPDATED", ids[1]), ("CONSUMER_DELETED", ids[2])]
    assert types["totalCount"] == 2
    subject = await feed(gql, subjectId=ids[1])
    assert [e["node"]["type"] for e in subject["edges"]] == [
        "CONSUMER_CREATED", "CONSUMER_UPDATED"]
    after_first = await feed(gql, subjectId=ids[1], after=subject["edges"][0]["cursor"])
    assert [e["node"]["type"] for e in after_first["edges"]] == ["CONSUMER_UPDATED"]
    assert after_first["pageInfo"]["hasPreviousPage"] is True
    assert (await feed(gql, subjectId=ids[3], after=edges[0]["cursor"]))["pageInfo"][
        "hasPreviousPage"] is False

    node = (await gql.data(NODE, {"id": edges[4]["node"]["id"]}))["node"]
    assert node == {k: edges[4]["node"][k] for k in ("id", "type", "subjectId", "data")}
    assert (await gql.data(NODE, {"id": "evt_01JD0000000000000000000000"}))["node"] is None


@pytest.mark.parametrize(("arguments", "field", "message"), [
    ({"first": 101}, "first", "`first` must be between 0 and 100; 101 was given."),
    ({"first": -1}, "first", "`first` must be between 0 and 100; -1 was given."),
    ({"after": "nonsense"}, "after", "`after` is not a valid cursor."),
    ({"after": "evt_nonsense"}, "after", "`after` is not a valid event id."),
    ({"after": "evt_01M95ZAEESDAWB26HJS2EVW6CR"}, "after", "`after` names no event."),
])
async def test_bad_arguments_are_bad_user_input(
    gql: GraphQL, arguments: dict[str, Any], field: str, message: str
) -> None:
    await create(gql)
    body = await gql(EVENTS, arguments)
    (error,) = body["errors"]
    assert error["message"] == message
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_a_cursor_older_than_retention_is_refused_and_old_events_are_pruned(
    gql: GraphQL, app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [await create(gql) for _ in range(3)]
    edges = (await feed(gql))["edges"]
    database = app.state.database
    old = utcnow() - timedelta(days=database.settings.event_retention_days, minutes=10)
    async with database.write_engine.begin() as conn:  # the first two events, 30 days on
        await conn.execute(text("UPDATE events SET occurred_at = :at WHERE id IN (:a, :b)"),
                           {"at": old, "a": edges[0]["node"]["id"], "b": edges[1]["node"]["id"]})
    message = ("`after` is older than the event retention (30 days): its events are no longer "
               "kept. Start again without `after`, from the oldest event kept.")
    for after in (edges[0]["cursor"], edges[1]["node"]["id"]):
        (error,) = (await gql(EVENTS, {"after": after}))["errors"]
        assert (error["message"], error["extensions"]["code"]) == (message, "BAD_USER_INPUT")
        response = await client.get("/api/v1/events", params={"after": after},
                                    headers=auth_headers)
        assert response.status_code == 400
        assert response.json() == {"error": "Validation failed",
                                   "details": [{"field": "after", "message": message}]}
    assert len((await feed(gql, after=edges[2]["cursor"]))["edges"]) == 0

    # The next write prunes them (its process's first prune in a second: made due now).
    monkeypatch.setattr(events_store, "_next_prune", weakref.WeakKeyDictionary())
    await gql.data(UPDATE, {"id": ids[2], "input": {"fullName": "C"}})
    remaining = [e["node"]["id"] for e in (await feed(gql))["edges"]]
    assert remaining == [edges[2]["node"]["id"], remaining[-1]] and len(remaining) == 2
    (error,) = (await gql(EVENTS, {"after": edges[0]["cursor"]}))["errors"]
    assert error["message"] == message


async def test_reading_from_the_start_begins_within_retention(
    gql: GraphQL, app: FastAPI, client: httpx.AsyncClient, auth_headers: dict[str, str],
) -> None:
    """Events past retention stay a few minutes (PRUNE_GRACE) before a prune deletes them,
    but a cursor at one is refused: a reader starting without `after` must start at the
    oldest event in retention, or its second page would be refused, and so on for ever."""
    [await create(gql) for _ in range(3)]
    edges = (await feed(gql))["edges"]
    database = app.state.database
    past = utcnow() - timedelta(days=database.settings.event_retention_days, minutes=1)
    async with database.write_engine.begin() as conn:  # past retention, not yet pruned
        await conn.execute(text("UPDATE events SET occurred_at = :at WHERE id IN (:a, :b)"),
                           {"at": past, "a": edges[0]["node"]["id"], "b": edges[1]["node"]["id"]})
    first = await feed(gql, first=1)
    assert [e["node"]["id"] for e in first["edges"]] == [edges[2]["node"]["id"]]
    assert first["totalCount"] == 1
    assert (await feed(gql, after=first["pageInfo"]["endCursor"]))["edges"] == []
    response = await client.get("/api/v1/events", params={"first": 1}, headers=auth_headers)
    assert [e["id"] for e in response.json()["data"]] == [edges[2]["node"]["id"]]
    then = await client.get("/api/v1/events", headers=auth_headers,
                            params={"after": response.json()["pageInfo"]["endCursor"]})
    assert then.status_code == 200, then.text
    records = await events_store.read_events(database, after=None, types=None,
                                             subject_id=None, limit=10)
    assert [record.id for record in records] == [edges[2]["node"]["id"]]


# -- REST -------------------------------------------------------------------------------------


async def test_rest_lists_events_as_the_reference_lists_consumers(
    gql: GraphQL, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    ids = [await create(gql, email=f"r{n}@example.com") for n in range(3)]
    await gql.data(DELETE, {"id": ids[0]})
    graphql = await all_events(gql)

    response = await client.get("/api/v1/events", params={"first": 2}, headers=auth_headers)
    assert response.status_code == 200, response.text
    page = response.json()
    assert [e["id"] for e in page["data"]] == [e["id"] for e in graphql[:2]]
    assert page["data"][0] == {key: graphql[0][key] for key in
                               ("id", "type", "occurredAt", "subjectId", "data")}
    seen = [e["id"] for e in page["data"]]
    cursor = page["pageInfo"]["endCursor"]
    while True:  # a BFF's poll: `after` the last endCursor until a page comes back empty
        page = (await client.get("/api/v1/events", params={"first": 2, "after": cursor},
                                 headers=auth_headers)).json()
        if not page["data"]:
            assert page["pageInfo"] == {"startCursor": None, "endCursor": None}
            break
        seen += [e["id"] for e in page["data"]]
        cursor = page["pageInfo"]["endCursor"]
    assert seen == [e["id"] for e in graphql]

    deleted = (await client.get("/api/v1/events", params={
        "types": "CONSUMER_DELETED,CONSUMER_UPDATED"}, headers=auth_headers)).json()
    assert [(e["type"], e["subjectId"]) for e in deleted["data"]] == [
        ("CONSUMER_DELETED", ids[0])]
    subject = (await client.get("/api/v1/events", params={"subjectId": ids[1]},
                                headers=auth_headers)).json()
    assert [e["subjectId"] for e in subject["data"]] == [ids[1]]

    for params, field, message in [
        ({"first": 101}, "first", "`first` must be between 0 and 100; 101 was given."),
        ({"after": "nonsense"}, "after", "`after` is not a valid cursor."),
        ({"types": "CONSUMER_CREATED,NOPE"}, "types", None),
        # repeated, as some clients send lists: refused, not narrowed to the last one
        ([("types", "CONSUMER_DELETED"), ("types", "CONSUMER_CREATED")], "types",
         "`types` was given more than once: send one comma-separated list."),
    ]:
        response = await client.get("/api/v1/events", params=params, headers=auth_headers)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "Validation failed"
        assert body["details"][0]["field"] == field
        if message is not None:
            assert body["details"][0]["message"] == message
    assert (await client.get("/api/v1/events")).status_code == 401
    openapi = (await client.get("/openapi.json")).json()
    assert "get" in openapi["paths"]["/api/v1/events"]


# -- commit order under concurrency -----------------------------------------------------------


async def test_concurrent_writers_never_show_a_reader_a_smaller_position_later(
    client: httpx.AsyncClient, auth_headers: dict[str, str], app: FastAPI, execution_path: str
) -> None:
    """Writers of every length at once: single writes, batches, and keyed mutations of three
    fields (one transaction, whose events are recorded at its end). A reader
    polling the feed all along must only ever see positions grow, and in the end every
    event exactly once. (Without the commit-order lock a poller reading after its last
    position misses the events whose smaller positions commit late: 115 of 144 seen.)"""
    database = app.state.database
    writers, rounds = 8, 6
    done = asyncio.Event()
    seen: list[int] = []

    async def write(writer: int) -> None:
        for n in range(rounds):
            tag = f"w{writer}-{n}"
            if n % 3 == 0:
                response = await client.post("/api/v1/consumers", json={
                    "email": f"{tag}@example.com"}, headers=auth_headers)
                assert response.status_code == 201, response.text
            elif n % 3 == 1:
                response = await client.post("/api/v1/consumers/batch", json=[
                    {"email": f"{tag}-{i}@example.com"} for i in range(5)],
                    headers=auth_headers)
                assert response.status_code == 201, response.text
            else:
                fields = " ".join(
                    f'f{i}: consumerCreate(input: {{email: "{tag}-k{i}@example.com"}}) '
                    "{ consumer { id } }" for i in range(3))
                response = await client.post("/graphql", json={"query": f"mutation {{ {fields} }}"},
                                             headers={**auth_headers, "Idempotency-Key": tag})
                assert response.status_code == 200 and "errors" not in response.json(), \
                    response.text

    async def read() -> None:
        after = None
        while True:
            finished = done.is_set()  # read once more after the last commit
            records = await events_store.read_events(
                database, after=after, types=None, subject_id=None, limit=1000)
            for record in records:
                assert after is None or record.position > after
                after = record.position
                seen.append(record.position)
            if finished:
                return
            await asyncio.sleep(0)

    reader = asyncio.create_task(read())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await reader
    expected = writers * (rounds // 3) * (1 + 5 + 3)
    assert len(seen) == len(set(seen)) == expected
    async with database.write_engine.connect() as conn:
        stored = (await conn.execute(text("SELECT position FROM events ORDER BY position"))
                  ).scalars().all()
    assert seen == list(stored)
