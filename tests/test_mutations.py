"""Consumer and audience mutations: happy paths, every refusal with its code and field path,
and update semantics (omitted vs null, metadata merge, updatedAt)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select, text

from consumers_graphql.store import models
from tests.conftest import GraphQL
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

CONSUMER_FIELDS = """
  id email phone fullName metadata externalId totalOrders totalOrderValue lastOrderAt
  createdAt updatedAt
"""
USER_ERRORS = "userErrors { field message code }"

CREATE = f"""
mutation Create($input: ConsumerCreateInput!) {{
  consumerCreate(input: $input) {{ consumer {{ {CONSUMER_FIELDS} }} {USER_ERRORS} }}
}}
"""
UPDATE = f"""
mutation Update($id: ID!, $input: ConsumerUpdateInput!) {{
  consumerUpdate(id: $id, input: $input) {{ consumer {{ {CONSUMER_FIELDS} }} {USER_ERRORS} }}
}}
"""
DELETE = f"""
mutation Delete($id: ID!) {{
  consumerDelete(id: $id) {{ consumer {{ {CONSUMER_FIELDS} }} {USER_ERRORS} }}
}}
"""
GET = f"query Get($id: ID!) {{ consumer(id: $id) {{ {CONSUMER_FIELDS} }} }}"

AUDIENCE_FIELDS = "id name description createdAt updatedAt"
AUDIENCE_CREATE = f"""
mutation Create($input: AudienceCreateInput!) {{
  audienceCreate(input: $input) {{ audience {{ {AUDIENCE_FIELDS} }} {USER_ERRORS} }}
}}
"""
AUDIENCE_UPDATE = f"""
mutation Update($id: ID!, $input: AudienceUpdateInput!) {{
  audienceUpdate(id: $id, input: $input) {{ audience {{ {AUDIENCE_FIELDS} }} {USER_ERRORS} }}
}}
"""
AUDIENCE_DELETE = f"""
mutation Delete($id: ID!) {{
  audienceDelete(id: $id) {{ audience {{ {AUDIENCE_FIELDS} }} {USER_ERRORS} }}
}}
"""
ADD = f"""
mutation Add($audienceId: ID!, $consumerIds: [ID!]!) {{
  audienceAddConsumers(audienceId: $audienceId, consumerIds: $consumerIds) {{
    audience {{ id consumers(first: 100) {{ nodes {{ id }} totalCount }} }} {USER_ERRORS}
  }}
}}
"""
REMOVE = f"""
mutation Remove($audienceId: ID!, $consumerIds: [ID!]!) {{
  audienceRemoveConsumers(audienceId: $audienceId, consumerIds: $consumerIds) {{
    audience {{ id consumers(first: 100) {{ nodes {{ id }} totalCount }} }} {USER_ERRORS}
  }}
}}
"""

MISSING_CONSUMER = "cons_01JD0000000000000000000000"
MISSING_AUDIENCE = "aud_01JD0000000000000000000000"


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def create(gql: GraphQL, **input: Any) -> dict[str, Any]:
    payload = (await gql.data(CREATE, {"input": input}))["consumerCreate"]
    assert payload["userErrors"] == [], payload["userErrors"]
    consumer: dict[str, Any] = payload["consumer"]
    return consumer


async def refused(gql: GraphQL, query: str, variables: dict[str, Any], name: str) -> list[Any]:
    payload = (await gql.data(query, variables))[name]
    node = next(v for k, v in payload.items() if k != "userErrors")
    assert node is None
    errors: list[Any] = payload["userErrors"]
    assert errors
    return errors


async def count_rows(write_engine: Any, model: Any) -> int:
    async with write_engine.connect() as conn:
        return int((await conn.execute(
            select(func.count()).select_from(model.__table__)
        )).scalar_one())


# -- consumerCreate ---------------------------------------------------------------------------


async def test_create_normalises_and_returns_the_consumer(gql: GraphQL) -> None:
    consumer = await create(
        gql, email="  John@Example.COM ", phone="+1 (415) 555-0100", fullName=" John Doe ",
        metadata={"source": "import", "tier": "vip"}, externalId="crm-1",
    )

    assert consumer["id"].startswith("cons_")
    assert consumer["email"] == "John@Example.COM"
    assert consumer["phone"] == "+14155550100"
    assert consumer["fullName"] == "John Doe"
    assert consumer["metadata"] == {"source": "import", "tier": "vip"}
    assert consumer["externalId"] == "crm-1"
    assert consumer["totalOrders"] == 0
    assert consumer["totalOrderValue"] == 0
    assert consumer["lastOrderAt"] is None
    assert consumer["createdAt"] == consumer["updatedAt"]
    assert consumer["createdAt"].endswith("Z")
    stored = (await gql.data(GET, {"id": consumer["id"]}))["consumer"]
    assert stored == consumer


async def test_create_with_no_fields_is_allowed(gql: GraphQL) -> None:
    consumer = await create(gql)
    assert consumer["email"] is None and consumer["metadata"] is None


async def test_created_consumer_is_searchable(gql: GraphQL) -> None:
    consumer = await create(gql, email="zed@example.com", fullName="Zoë Müller",
                            phone="+44 20 7946 0958")
    query = 'query($q: String!) { consumers(search: $q) { nodes { id } } }'
    for term in ("zoë", "MÜLLER", "zed@exa", "7946"):
        nodes = (await gql.data(query, {"q": term}))["consumers"]["nodes"]
        assert nodes == [{"id": consumer["id"]}], term


@pytest.mark.parametrize(
    ("input", "field", "fragment"),
    [
        ({"email": "not-an-email"}, "email", "valid address"),
        ({"email": "a@b"}, "email", "valid address"),
        ({"email": "x" * 245 + "@example.com"}, "email", "at most 254"),
        ({"email": "   "}, "email", "must not be empty"),
        ({"phone": "4155550100"}, "phone", "international"),
        ({"phone": "+1 555"}, "phone", "international"),
        ({"phone": "call me"}, "phone", "international"),
        ({"fullName": "x" * 201}, "fullName", "at most 200"),
        ({"fullName": "John\u0000Doe"}, "fullName", "control characters"),
        ({"fullName": "John\nDoe"}, "fullName", "control characters"),
        ({"externalId": "x" * 256}, "externalId", "at most 255"),
        ({"externalId": "a\u0007b"}, "externalId", "control characters"),
        ({"metadata": ["not", "an", "object"]}, "metadata", "JSON object"),
        ({"metadata": "text"}, "metadata", "JSON object"),
        ({"metadata": {"blob": "x" * 16_400}}, "metadata", "16384 bytes"),
        ({"metadata": {"nul": "a\u0000b"}}, "metadata", "NUL"),
    ],
)
async def test_create_refuses_invalid_fields(
    gql: GraphQL, write_engine: Any, input: dict[str, Any], field: str, fragment: str
) -> None:
    errors = await refused(gql, CREATE, {"input": input}, "consumerCreate")

    assert [(e["field"], e["code"]) for e in errors] == [(["input", field], "VALIDATION_FAILED")]
    assert fragment in errors[0]["message"]
    assert await count_rows(write_engine, models.Consumer) == 0


async def test_metadata_of_exactly_16_kib_is_accepted(gql: GraphQL) -> None:
    filler = 16 * 1024 - len('{"k":""}')
    consumer = await create(gql, metadata={"k": "x" * filler})
    assert len(consumer["metadata"]["k"]) == filler


async def test_every_invalid_field_is_reported(gql: GraphQL) -> None:
    errors = await refused(
        gql, CREATE, {"input": {"email": "nope", "phone": "nope", "fullName": ""}},
        "consumerCreate",
    )
    assert [e["field"] for e in errors] == [
        ["input", "email"], ["input", "phone"], ["input", "fullName"]
    ]


async def test_email_is_unique_case_insensitively(gql: GraphQL, write_engine: Any) -> None:
    await create(gql, email="Jane@Example.com")

    errors = await refused(gql, CREATE, {"input": {"email": "jANE@example.COM "}},
                           "consumerCreate")

    assert [(e["field"], e["code"]) for e in errors] == [(["input", "email"], "EMAIL_TAKEN")]
    assert await count_rows(write_engine, models.Consumer) == 1


async def test_external_id_is_unique_when_set(gql: GraphQL) -> None:
    await create(gql, externalId="crm-7")
    await create(gql)  # any number of consumers without one
    await create(gql)

    errors = await refused(gql, CREATE, {"input": {"externalId": "crm-7"}}, "consumerCreate")

    assert [(e["field"], e["code"]) for e in errors] == [
        (["input", "externalId"], "EXTERNAL_ID_TAKEN")
    ]


async def test_both_conflicts_are_reported(gql: GraphQL) -> None:
    await create(gql, email="a@example.com", externalId="x-1")
    errors = await refused(gql, CREATE, {"input": {"email": "A@example.com", "externalId": "x-1"}},
                           "consumerCreate")
    assert [e["code"] for e in errors] == ["EMAIL_TAKEN", "EXTERNAL_ID_TAKEN"]


# -- consumerUpdate ---------------------------------------------------------------------------


async def test_update_changes_only_the_fields_given(gql: GraphQL) -> None:
    original = await create(gql, email="a@example.com", phone="+14155550100",
                            fullName="Ann", metadata={"tier": "gold"}, externalId="e-1")

    payload = (await gql.data(UPDATE, {"id": original["id"], "input": {"fullName": "Ann B"}}))
    updated = payload["consumerUpdate"]["consumer"]

    assert payload["consumerUpdate"]["userErrors"] == []
    unchanged = ("email", "phone", "metadata", "externalId", "createdAt", "id")
    assert {k: updated[k] for k in unchanged} == {k: original[k] for k in unchanged}
    assert updated["fullName"] == "Ann B"
    assert parse_time(updated["updatedAt"]) > parse_time(original["updatedAt"])


async def test_explicit_null_clears_a_field(gql: GraphQL) -> None:
    original = await create(gql, email="a@example.com", phone="+14155550100",
                            fullName="Ann", metadata={"tier": "gold"}, externalId="e-1")

    updated = (await gql.data(UPDATE, {"id": original["id"], "input": {
        "email": None, "phone": None, "fullName": None, "metadata": None, "externalId": None,
    }}))["consumerUpdate"]["consumer"]

    assert [updated[k] for k in ("email", "phone", "fullName", "metadata", "externalId")] == [
        None, None, None, None, None
    ]
    # A cleared email and externalId are free for another consumer.
    await create(gql, email="a@example.com", externalId="e-1")


async def test_metadata_is_merged_shallowly(gql: GraphQL) -> None:
    original = await create(gql, metadata={"tier": "gold", "source": "import",
                                           "nested": {"a": 1, "b": 2}})

    updated = (await gql.data(UPDATE, {"id": original["id"], "input": {
        "metadata": {"tier": "platinum", "source": None, "nested": {"c": 3}, "new": [1, 2]},
    }}))["consumerUpdate"]["consumer"]

    # Given keys replace (nested objects too: the merge is shallow), null removes a key.
    assert updated["metadata"] == {"tier": "platinum", "nested": {"c": 3}, "new": [1, 2]}


async def test_metadata_null_clears_and_empty_object_changes_nothing(gql: GraphQL) -> None:
    original = await create(gql, metadata={"tier": "gold"})

    same = (await gql.data(UPDATE, {"id": original["id"], "input": {"metadata": {}}}))
    cleared = (await gql.data(UPDATE, {"id": original["id"], "input": {"metadata": None}}))

    assert same["consumerUpdate"]["consumer"]["metadata"] == {"tier": "gold"}
    assert same["consumerUpdate"]["consumer"]["updatedAt"] == original["updatedAt"]
    assert cleared["consumerUpdate"]["consumer"]["metadata"] is None


async def test_merged_metadata_over_16_kib_is_refused(gql: GraphQL) -> None:
    original = await create(gql, metadata={"a": "x" * 9000})
    errors = await refused(gql, UPDATE, {"id": original["id"], "input": {
        "metadata": {"b": "y" * 9000}}}, "consumerUpdate")
    assert [(e["field"], e["code"]) for e in errors] == [
        (["input", "metadata"], "VALIDATION_FAILED")
    ]
    stored = (await gql.data(GET, {"id": original["id"]}))["consumer"]
    assert stored["metadata"] == {"a": "x" * 9000}


async def test_updated_at_moves_only_on_real_changes(gql: GraphQL) -> None:
    original = await create(gql, email="a@example.com", phone="+14155550100",
                            metadata={"k": "v"})

    # Same values, in another spelling: nothing really changes.
    same = (await gql.data(UPDATE, {"id": original["id"], "input": {
        "email": " a@example.com ", "phone": "+1 415-555-0100", "metadata": {"k": "v"},
        "fullName": None,
    }}))["consumerUpdate"]["consumer"]
    assert same["updatedAt"] == original["updatedAt"]

    stamps = [parse_time(original["updatedAt"])]
    for input in ({"email": "A@example.com"}, {"metadata": {"k": "w"}}, {"fullName": "A"}):
        updated = (await gql.data(UPDATE, {"id": original["id"], "input": input}))
        stamps.append(parse_time(updated["consumerUpdate"]["consumer"]["updatedAt"]))
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert (await gql.data(GET, {"id": original["id"]}))["consumer"]["createdAt"] == (
        original["createdAt"]
    )


async def test_updated_at_moves_forward_even_when_stored_in_the_future(
    gql: GraphQL, write_engine: Any
) -> None:
    future = datetime(2999, 1, 1, tzinfo=UTC)
    row = consumer_row(1, updated_at=future)
    await insert_consumers(write_engine, [row])

    updated = (await gql.data(UPDATE, {"id": row["id"], "input": {"fullName": "New"}}))

    assert parse_time(updated["consumerUpdate"]["consumer"]["updatedAt"]) > future


async def test_update_can_change_the_case_of_its_own_email(gql: GraphQL) -> None:
    original = await create(gql, email="ann@example.com")
    updated = (await gql.data(UPDATE, {"id": original["id"],
                                       "input": {"email": "Ann@Example.com"}}))
    assert updated["consumerUpdate"]["userErrors"] == []
    assert updated["consumerUpdate"]["consumer"]["email"] == "Ann@Example.com"


async def test_update_refuses_an_email_or_external_id_of_another_consumer(gql: GraphQL) -> None:
    await create(gql, email="taken@example.com", externalId="taken")
    other = await create(gql, email="mine@example.com")

    errors = await refused(gql, UPDATE, {"id": other["id"], "input": {
        "email": "TAKEN@example.com", "externalId": "taken"}}, "consumerUpdate")

    assert [(e["field"], e["code"]) for e in errors] == [
        (["input", "email"], "EMAIL_TAKEN"), (["input", "externalId"], "EXTERNAL_ID_TAKEN")
    ]
    stored = (await gql.data(GET, {"id": other["id"]}))["consumer"]
    assert stored["email"] == "mine@example.com" and stored["externalId"] is None


@pytest.mark.parametrize("id", [MISSING_CONSUMER, "aud_01JD0000000000000000000000", "garbage"])
async def test_update_of_an_unknown_consumer_is_not_found(gql: GraphQL, id: str) -> None:
    errors = await refused(gql, UPDATE, {"id": id, "input": {"fullName": "x"}}, "consumerUpdate")
    assert [(e["field"], e["code"]) for e in errors] == [(["id"], "NOT_FOUND")]


async def test_update_validates_fields(gql: GraphQL) -> None:
    original = await create(gql)
    errors = await refused(gql, UPDATE, {"id": original["id"], "input": {
        "email": "bad", "metadata": [1]}}, "consumerUpdate")
    assert [(e["field"], e["code"]) for e in errors] == [
        (["input", "email"], "VALIDATION_FAILED"), (["input", "metadata"], "VALIDATION_FAILED")
    ]


# -- consumerDelete ---------------------------------------------------------------------------


async def test_delete_returns_the_consumer_and_removes_memberships_and_orders(
    gql: GraphQL, write_engine: Any
) -> None:
    doomed, kept = consumer_row(1), consumer_row(2)
    await insert_consumers(write_engine, [doomed, kept])
    audience = audience_row("VIP")
    await insert_rows(write_engine, models.Audience, [audience])
    await insert_rows(write_engine, models.ConsumerAudience, [
        {"consumer_id": c["id"], "audience_id": audience["id"], "created_at": BASE_TIME}
        for c in (doomed, kept)
    ])
    await insert_rows(write_engine, models.Order, [
        order_row(doomed["id"], "10.00", BASE_TIME), order_row(kept["id"], "5.00", BASE_TIME)
    ])
    before = (await gql.data(GET, {"id": doomed["id"]}))["consumer"]

    payload = (await gql.data(DELETE, {"id": doomed["id"]}))["consumerDelete"]

    assert payload["userErrors"] == []
    assert payload["consumer"] == before
    assert (await gql.data(GET, {"id": doomed["id"]}))["consumer"] is None
    async with write_engine.connect() as conn:
        members = (await conn.execute(text("SELECT consumer_id FROM consumer_audiences"))).all()
        owners = (await conn.execute(text("SELECT consumer_id FROM orders"))).all()
    assert [m[0] for m in members] == [kept["id"]]
    assert [o[0] for o in owners] == [kept["id"]]


async def test_delete_of_an_unknown_consumer_is_not_found(gql: GraphQL) -> None:
    errors = await refused(gql, DELETE, {"id": MISSING_CONSUMER}, "consumerDelete")
    assert [(e["field"], e["code"]) for e in errors] == [(["id"], "NOT_FOUND")]


async def test_deleting_twice_is_not_found_the_second_time(gql: GraphQL) -> None:
    consumer = await create(gql, email="once@example.com")
    await gql.data(DELETE, {"id": consumer["id"]})
    errors = await refused(gql, DELETE, {"id": consumer["id"]}, "consumerDelete")
    assert errors[0]["code"] == "NOT_FOUND"
    await create(gql, email="once@example.com")  # the email is free again


# -- audiences --------------------------------------------------------------------------------


async def create_audience(gql: GraphQL, **input: Any) -> dict[str, Any]:
    payload = (await gql.data(AUDIENCE_CREATE, {"input": input}))["audienceCreate"]
    assert payload["userErrors"] == []
    audience: dict[str, Any] = payload["audience"]
    return audience


async def test_audience_create_update_delete(gql: GraphQL) -> None:
    audience = await create_audience(gql, name=" VIP ", description="Best\ncustomers")
    assert audience["id"].startswith("aud_")
    assert (audience["name"], audience["description"]) == ("VIP", "Best\ncustomers")

    renamed = (await gql.data(AUDIENCE_UPDATE, {"id": audience["id"],
                                                "input": {"name": "VVIP"}}))["audienceUpdate"]
    assert renamed["audience"]["name"] == "VVIP"
    assert renamed["audience"]["description"] == "Best\ncustomers"
    assert parse_time(renamed["audience"]["updatedAt"]) > parse_time(audience["updatedAt"])

    cleared = (await gql.data(AUDIENCE_UPDATE, {"id": audience["id"],
                                                "input": {"description": None}}))
    assert cleared["audienceUpdate"]["audience"]["description"] is None

    same = (await gql.data(AUDIENCE_UPDATE, {"id": audience["id"], "input": {"name": "VVIP"}}))
    assert same["audienceUpdate"]["audience"] == cleared["audienceUpdate"]["audience"]

    deleted = (await gql.data(AUDIENCE_DELETE, {"id": audience["id"]}))["audienceDelete"]
    assert deleted["audience"] == cleared["audienceUpdate"]["audience"]
    query = "query($id: ID!) { audience(id: $id) { id } }"
    assert (await gql.data(query, {"id": audience["id"]}))["audience"] is None


async def test_audience_names_are_unique(gql: GraphQL) -> None:
    first = await create_audience(gql, name="VIP")
    second = await create_audience(gql, name="Churned")

    on_create = await refused(gql, AUDIENCE_CREATE, {"input": {"name": "VIP"}}, "audienceCreate")
    on_update = await refused(gql, AUDIENCE_UPDATE, {"id": second["id"],
                                                     "input": {"name": " VIP"}}, "audienceUpdate")

    for errors in (on_create, on_update):
        assert [(e["field"], e["code"]) for e in errors] == [(["input", "name"], "NAME_TAKEN")]
    # Renaming to its own name is no conflict.
    same = await gql.data(AUDIENCE_UPDATE, {"id": first["id"], "input": {"name": "VIP"}})
    assert same["audienceUpdate"]["userErrors"] == []


@pytest.mark.parametrize(
    ("input", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "a\tb"}, "name"),
        ({"name": "ok", "description": "x" * 2001}, "description"),
        ({"name": "ok", "description": "bell\u0007"}, "description"),
    ],
)
async def test_audience_fields_are_validated(
    gql: GraphQL, input: dict[str, Any], field: str
) -> None:
    errors = await refused(gql, AUDIENCE_CREATE, {"input": input}, "audienceCreate")
    assert [(e["field"], e["code"]) for e in errors] == [(["input", field], "VALIDATION_FAILED")]


async def test_audience_name_cannot_be_cleared(gql: GraphQL) -> None:
    audience = await create_audience(gql, name="VIP")
    errors = await refused(gql, AUDIENCE_UPDATE, {"id": audience["id"], "input": {"name": None}},
                           "audienceUpdate")
    assert [(e["field"], e["code"]) for e in errors] == [(["input", "name"], "VALIDATION_FAILED")]


async def test_unknown_audience_is_not_found(gql: GraphQL) -> None:
    for query, variables, name in (
        (AUDIENCE_UPDATE, {"id": MISSING_AUDIENCE, "input": {"name": "x"}}, "audienceUpdate"),
        (AUDIENCE_DELETE, {"id": MISSING_AUDIENCE}, "audienceDelete"),
        (AUDIENCE_DELETE, {"id": MISSING_CONSUMER}, "audienceDelete"),
    ):
        errors = await refused(gql, query, variables, name)
        assert [(e["field"], e["code"]) for e in errors] == [(["id"], "NOT_FOUND")]


async def test_audience_members_are_added_and_removed(gql: GraphQL, write_engine: Any) -> None:
    audience = await create_audience(gql, name="VIP")
    ids = [(await create(gql))["id"] for _ in range(3)]

    added = (await gql.data(ADD, {"audienceId": audience["id"], "consumerIds": ids[:2]}))
    again = (await gql.data(ADD, {"audienceId": audience["id"], "consumerIds": ids}))
    removed = (await gql.data(REMOVE, {"audienceId": audience["id"],
                                       "consumerIds": [ids[0]]}))

    assert added["audienceAddConsumers"]["audience"]["consumers"]["totalCount"] == 2
    members = again["audienceAddConsumers"]["audience"]["consumers"]["nodes"]
    assert sorted(m["id"] for m in members) == sorted(ids)
    remaining = removed["audienceRemoveConsumers"]["audience"]["consumers"]["nodes"]
    assert sorted(m["id"] for m in remaining) == sorted(ids[1:])
    # Removing a consumer that is not a member is no error.
    again_removed = await gql.data(REMOVE, {"audienceId": audience["id"], "consumerIds": [ids[0]]})
    assert again_removed["audienceRemoveConsumers"]["userErrors"] == []
    assert await count_rows(write_engine, models.ConsumerAudience) == 2


async def test_membership_changes_are_all_or_nothing(gql: GraphQL, write_engine: Any) -> None:
    audience = await create_audience(gql, name="VIP")
    real = (await create(gql))["id"]

    errors = await refused(gql, ADD, {"audienceId": audience["id"],
                                      "consumerIds": [real, MISSING_CONSUMER, "junk", real]},
                           "audienceAddConsumers")

    assert [(e["field"], e["code"]) for e in errors] == [
        (["consumerIds", "1"], "NOT_FOUND"),
        (["consumerIds", "2"], "NOT_FOUND"),
        (["consumerIds", "3"], "DUPLICATE_IN_BATCH"),
    ]
    errors = await refused(gql, ADD, {"audienceId": audience["id"],
                                      "consumerIds": [real, MISSING_CONSUMER]},
                           "audienceAddConsumers")
    assert [(e["field"], e["code"]) for e in errors] == [(["consumerIds", "1"], "NOT_FOUND")]
    errors = await refused(gql, REMOVE, {"audienceId": MISSING_AUDIENCE, "consumerIds": [real]},
                           "audienceRemoveConsumers")
    assert [(e["field"], e["code"]) for e in errors] == [(["audienceId"], "NOT_FOUND")]
    assert await count_rows(write_engine, models.ConsumerAudience) == 0


async def test_membership_lists_over_500_are_refused(gql: GraphQL) -> None:
    audience = await create_audience(gql, name="VIP")
    ids = [f"cons_01JD{n:022d}" for n in range(501)]
    body = await gql(ADD, {"audienceId": audience["id"], "consumerIds": ids})
    assert "data" not in body  # refused before the list is coerced
    assert [e["extensions"]["code"] for e in body["errors"]] == ["BATCH_TOO_LARGE"]


async def test_deleting_an_audience_keeps_its_consumers(gql: GraphQL, write_engine: Any) -> None:
    audience = await create_audience(gql, name="VIP")
    consumer = await create(gql)
    await gql.data(ADD, {"audienceId": audience["id"], "consumerIds": [consumer["id"]]})

    await gql.data(AUDIENCE_DELETE, {"id": audience["id"]})

    assert await count_rows(write_engine, models.ConsumerAudience) == 0
    assert (await gql.data(GET, {"id": consumer["id"]}))["consumer"]["id"] == consumer["id"]


async def test_each_mutation_field_reads_the_writes_before_it(gql: GraphQL) -> None:
    # given a consumer and an audience
    created = await gql.data('mutation { consumerCreate(input: {email: "seq@example.com"}) '
                             "{ consumer { id } } audienceCreate(input: {name: \"Seq\"}) "
                             "{ audience { id } } }")
    consumer = created["consumerCreate"]["consumer"]["id"]
    audience = created["audienceCreate"]["audience"]["id"]
    # when one operation writes several times and reads after each write
    data = await gql.data(
        """mutation($c: ID!, $a: ID!) {
          o1: orderRecord(input: {consumerId: $c, amount: 10, currency: "USD"}) {
            order { consumer { totalOrders totalOrderValue audiences { totalCount } } } }
          o2: orderRecord(input: {consumerId: $c, amount: 5, currency: "USD"}) {
            order { consumer { totalOrders totalOrderValue } } }
          add: audienceAddConsumers(audienceId: $a, consumerIds: [$c]) {
            audience { consumers { totalCount } } }
          u: consumerUpdate(id: $c, input: {fullName: "After"}) {
            consumer { fullName totalOrders audiences { totalCount } } } }""",
        {"c": consumer, "a": audience},
    )
    # then every payload shows the state after its own write, not a cached earlier read
    assert data["o1"]["order"]["consumer"] == {
        "totalOrders": 1, "totalOrderValue": 10.0, "audiences": {"totalCount": 0}}
    assert data["o2"]["order"]["consumer"] == {"totalOrders": 2, "totalOrderValue": 15.0}
    assert data["add"]["audience"]["consumers"]["totalCount"] == 1
    assert data["u"]["consumer"] == {"fullName": "After", "totalOrders": 2,
                                     "audiences": {"totalCount": 1}}
