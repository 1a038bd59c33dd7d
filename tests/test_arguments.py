"""Arguments converted by plan (api/arguments.py) equal Strawberry's own conversion, for
every mutation and for the reads' arguments: same input dataclasses, same UNSET for a field
left out, same None for an explicit null, same enums, scalars and lists."""

from __future__ import annotations

from typing import Any

import pytest
from graphql import FieldNode, OperationDefinitionNode, parse
from graphql.execution.values import get_argument_values, get_variable_values
from strawberry.types.arguments import convert_arguments

from consumers_graphql.api.arguments import plan_arguments
from consumers_graphql.api.schema import build_schema

SCHEMA = build_schema()
GRAPHQL = SCHEMA._schema

CONSUMER = {"email": " A@Example.com ", "phone": "+1 (415) 555-0100", "fullName": "Ada",
            "metadata": {"tier": "gold", "tags": ["a", None], "n": {"x": 1.5}},
            "externalId": "crm-1"}

CASES: list[tuple[str, dict[str, Any]]] = [
    ("mutation($i: ConsumerCreateInput!) { consumerCreate(input: $i) { __typename } }",
     {"i": CONSUMER}),
    ("mutation($i: ConsumerCreateInput!) { consumerCreate(input: $i) { __typename } }",
     {"i": {"email": None}}),  # one explicit null, the rest left out
    ('mutation { consumerCreate(input: {phone: "+44 7700 900000", metadata: {a: [1, 2]}}) '
     "{ __typename } }", {}),
    ("mutation($id: ID!, $i: ConsumerUpdateInput!) { consumerUpdate(id: $id, input: $i) "
     "{ __typename } }", {"id": "cons_1", "i": {"metadata": None, "fullName": "B"}}),
    ('mutation { consumerDelete(id: "cons_1") { __typename } }', {}),
    ("mutation($i: [ConsumerCreateInput!]!, $p: ErrorPolicy) { consumerBatchCreate(input: $i, "
     "errorPolicy: $p) { count } }",
     {"i": [CONSUMER, {}, {"email": None, "phone": None, "metadata": {}}], "p": None}),
    ("mutation($i: [ConsumerCreateInput!]!) { consumerBatchCreate(input: $i, "
     "errorPolicy: REJECT_FAILED_ROWS) { count } }", {"i": [{"fullName": "x"}]}),
    ("mutation($i: [ConsumerCreateInput!]!) { consumerBatchCreate(input: $i) { count } }",
     {"i": []}),  # the policy's default
    ("mutation($i: [ConsumerBatchUpdateInput!]!, $p: ErrorPolicy) { consumerBatchUpdate("
     "input: $i, errorPolicy: $p) { count } }",
     {"i": [{"id": "cons_1", "email": "b@example.com"}, {"id": "cons_2", "phone": None}],
      "p": "REJECT_EVERYTHING"}),
    ("mutation($i: ConsumerUpsertInput!) { consumerUpsert(input: $i) { created } }",
     {"i": {"externalId": "crm-1", "email": None, "metadata": {"a": None}}}),
    ('mutation { consumerUpsert(input: {externalId: "crm-2", fullName: "Ada"}) { created } }',
     {}),
    ("mutation($i: [ConsumerUpsertInput!]!, $p: ErrorPolicy) { consumerBatchUpsert("
     "input: $i, errorPolicy: $p) { count } }",
     {"i": [CONSUMER, {"externalId": "crm-3", "phone": None}], "p": "REJECT_FAILED_ROWS"}),
    ("mutation($i: AudienceCreateInput!) { audienceCreate(input: $i) { __typename } }",
     {"i": {"name": "VIP", "description": "line one\nline two"}}),
    ("mutation($i: AudienceUpdateInput!) { audienceUpdate(id: \"aud_1\", input: $i) "
     "{ __typename } }", {"i": {"description": None}}),
    ('mutation { audienceDelete(id: "aud_1") { __typename } }', {}),
    ("mutation($ids: [ID!]!) { audienceAddConsumers(audienceId: \"aud_1\", consumerIds: $ids) "
     "{ __typename } }", {"ids": ["cons_1", "cons_2"]}),
    ('mutation { audienceRemoveConsumers(audienceId: "aud_1", consumerIds: ["cons_1"]) '
     "{ __typename } }", {}),
    ("mutation($i: OrderRecordInput!) { orderRecord(input: $i) { __typename } }",
     {"i": {"consumerId": "cons_1", "amount": 19.99, "currency": "EUR",
            "placedAt": "2024-11-01T10:00:00Z", "externalId": None}}),
    ('mutation { orderRecord(input: {consumerId: "cons_1", amount: 5, currency: "JPY"}) '
     "{ __typename } }", {}),
    ('mutation { orderDelete(id: "ord_1") { __typename } }', {}),
    ("query($after: String, $s: ConsumerSortField, $d: SortDirection, $t: DateTime) { "
     "consumers(first: 5, after: $after, sortBy: $s, sortDir: $d, createdAfter: $t, "
     'search: "ada") { totalCount } }',
     {"after": None, "s": "LAST_ORDER_AT", "d": "ASC", "t": "2024-11-01T10:00:00+02:00"}),
    ("query($ids: [ID!]!) { nodes(ids: $ids) { __typename } }", {"ids": ["a", "b"]}),
    ('{ searchConsumers(q: "ad", email: "x@y.z", phone: "+1 415", externalId: "e") '
     "{ totalCount } audiences(last: 2, before: null) { totalCount } }", {}),
]


def _root_fields(
    query: str, variables: dict[str, Any]
) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, definition, graphql-core's coerced arguments) of each root field."""
    document = parse(query)
    operation = next(d for d in document.definitions if isinstance(d, OperationDefinitionNode))
    root = GRAPHQL.mutation_type if operation.operation.value == "mutation" else GRAPHQL.query_type
    assert root is not None
    coerced = get_variable_values(GRAPHQL, operation.variable_definitions or (), variables)
    assert not isinstance(coerced, list), coerced  # the variables are valid
    fields = []
    for node in operation.selection_set.selections:
        assert isinstance(node, FieldNode)
        definition = root.fields[node.name.value]
        fields.append((node.name.value, definition,
                       get_argument_values(definition, node, coerced)))
    return fields


@pytest.mark.parametrize(("query", "variables"), CASES)
def test_planned_conversion_equals_strawberrys(query: str, variables: dict[str, Any]) -> None:
    registry = SCHEMA.schema_converter.scalar_registry
    for _, definition, args in _root_fields(query, variables):
        field = definition.extensions["strawberry-definition"]
        plan = plan_arguments(field, registry, SCHEMA.config)
        assert plan is not None, field.python_name
        expected = convert_arguments(args, field.arguments, scalar_registry=registry,
                                     config=SCHEMA.config)
        assert plan(args) == expected
        assert repr(plan(args)) == repr(expected)  # UNSET versus None, types of values


def test_every_mutation_is_covered() -> None:
    assert GRAPHQL.mutation_type is not None
    mutations = set(GRAPHQL.mutation_type.fields)
    covered = {name for query, variables in CASES
               for name, _, _ in _root_fields(query, variables)}
    assert mutations <= covered
