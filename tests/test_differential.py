"""Both execution paths give the same answer to any valid query: random operations generated
from schema.graphql (hypothesis-graphql, then given variables, named fragments, aliases and
@skip/@include), each posted once through the compiled executor and once through
graphql-core alone, on a small seeded dataset. Same status, `data`, `errors` (messages, paths,
codes) and extensions; never INTERNAL_SERVER_ERROR (every operation here is either valid or a
client mistake); always an answer within ANSWER_WITHIN_S."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from functools import partial
from typing import Any, cast

import graphql
import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import queries
from ulid import ULID

from consumers_graphql.api import executor
from consumers_graphql.ids import IdKind, sequential_ids
from consumers_graphql.store import models
from consumers_graphql.store.keys import READ_WRITE
from consumers_graphql.store.models import utcnow
from tests.conftest import (
    EXECUTION_PATHS,
    THROUGH_EXECUTE,
    bearer,
    checked_out,
    empty_tables,
    on_path,
    project_root,
)
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

pytestmark = pytest.mark.compares_paths

SCHEMA = graphql.build_schema((project_root() / "schema.graphql").read_text(encoding="utf-8"))
ANSWER_WITHIN_S = 10
# CI runs a fixed set of operations per database; set this to hunt with fresh random ones.
HUNT = os.environ.get("CONSUMERS_DIFFERENTIAL_EXAMPLES")
# Shrinking (minutes, on a failure) only when hunting: a failure's message holds its operation.
PROPERTY = settings(
    max_examples=int(HUNT) if HUNT else 300, derandomize=not HUNT, database=None,
    deadline=None, print_blob=bool(HUNT),
    phases=tuple(Phase) if HUNT else (Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


# -- the dataset: fixed ids and times, so a run is reproducible ---------------------------

def _ids(kind: IdKind, count: int) -> list[str]:
    # from_datetime would add random bits: these are the same on every run
    first = ULID.from_int(int(BASE_TIME.timestamp() * 1000) << 80)
    return sequential_ids(kind, first, count)


@dataclass
class Dataset:
    ids: list[str]  # consumers, audiences, orders
    cursors: list[str] = field(default_factory=list)  # of several connections and orders

    def bind(self, value: Any) -> Any:
        """`{consumer:3}` in a string as the id of the fourth consumer seeded (and so on)."""
        if not isinstance(value, str):
            return value
        for kind, start in (("consumer", 0), ("audience", CONSUMERS),
                            ("order", CONSUMERS + AUDIENCES)):
            for n in range(len(self.ids) - start):
                value = value.replace(f"{{{kind}:{n}}}", self.ids[start + n])
        return value


CONSUMERS, AUDIENCES = 8, 3


async def seed(engine: Any) -> Dataset:
    """8 consumers (one without email, some with phones, metadata, external ids), n % 4
    orders each, 3 audiences (one empty) with overlapping members."""
    consumer_ids = _ids(IdKind.CONSUMER, CONSUMERS)
    audience_ids = _ids(IdKind.AUDIENCE, AUDIENCES)
    order_ids = iter(_ids(IdKind.ORDER, 32))
    consumers, orders = [], []
    for n, consumer_id in enumerate(consumer_ids):
        placed = [BASE_TIME + timedelta(days=k, hours=n) for k in range(n % 4)]
        orders += [order_row(consumer_id, f"{n}.{k}5", at, id=next(order_ids),
                             currency="EUR" if k else "USD", external_id=f"o-{n}-{k}")
                   for k, at in enumerate(placed)]
        consumers.append(consumer_row(
            n, id=consumer_id, email=None if n == 5 else f"user{n}@example.com",
            phone=f"+1415555010{n}" if n % 2 else None,
            full_name=None if n == 6 else f"User {n}",
            metadata={"n": n, "tags": ["a", None]} if n % 3 == 0 else None,
            external_id=f"ext-{n}" if n % 2 == 0 else None, total_orders=len(placed),
            total_order_value=sum((o["amount"] for o in orders[-len(placed):]), Decimal(0))
            if placed else Decimal(0),
            last_order_at=placed[-1] if placed else None,
        ))
    audiences = [audience_row(name, id=audience_id, description=description)
                 for audience_id, name, description in zip(
                     audience_ids, ("VIP", "Lapsed", "Empty"), ("best", None, "none yet"),
                     strict=True)]
    members = [{"consumer_id": c, "audience_id": a, "created_at": BASE_TIME + timedelta(minutes=i)}
               for i, c in enumerate(consumer_ids) for j, a in enumerate(audience_ids[:2])
               if (i + j) % 3 != 1]
    await insert_consumers(engine, consumers)
    await insert_rows(engine, models.Audience, audiences)
    await insert_rows(engine, models.ConsumerAudience, members)
    await insert_rows(engine, models.Order, orders)
    # Events of the last minutes (older ones would be past retention): Query.events and node.
    event_ids = _ids(IdKind.EVENT, 4)
    subjects = [("CONSUMER_CREATED", consumer_ids[0]), ("CONSUMER_UPDATED", consumer_ids[1]),
                ("AUDIENCE_MEMBERS_ADDED", audience_ids[0]), ("ORDER_RECORDED", orders[0]["id"])]
    await insert_rows(engine, models.Event, [
        {"id": event_id, "type": kind, "subject_id": subject,
         "occurred_at": utcnow() - timedelta(minutes=4 - n),
         "data": {"id": subject, "n": n, "consumerIds": consumer_ids[:n]}}
        for n, (event_id, (kind, subject)) in enumerate(zip(event_ids, subjects, strict=True))])
    return Dataset(consumer_ids + audience_ids + [o["id"] for o in orders] + event_ids)


# Cursors the API hands out, so that `after`/`before` often name real positions.
CURSORS = """query($id: ID!) {
  consumers(first: 3) { edges { cursor } }
  byEmail: consumers(first: 3, sortBy: EMAIL, sortDir: ASC) { edges { cursor } }
  audiences { edges { cursor node { consumers(first: 2) { edges { cursor } } } } }
  searchConsumers(q: "user", first: 2) { edges { cursor } }
  consumer(id: $id) { orders(first: 2) { edges { cursor } } audiences { edges { cursor } } }
  events(first: 3) { edges { cursor } }
}"""


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "cursor":
                yield item
            else:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


# -- operations -----------------------------------------------------------------------------

TEXTS = ["", "u", "us", "user", "USER1", "example", "User 3", "user2@example.com",
         "USER4@Example.com", "+14155550101", "+1 415 555 0103", "ext-2", "o-3-1", "nobody",
         "%", "_", "ü"]
TIMES = ["2024-11-01T10:00:00Z", "2024-11-01T10:03:00Z", "2024-11-01T10:03:00.5+00:00",
         "2024-11-01T12:00:00+02:00", "2024-10-01T00:00:00Z", "2024-12-01T00:00:00Z",
         "2024-11-01T10:03:00", "not a time"]


def operations(dataset: Dataset) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A valid query (names, types and arguments all from the schema) with its variables:
    argument values mostly in range and ids mostly of seeded rows, sometimes not."""
    texts = st.sampled_from(TEXTS) | st.sampled_from(dataset.cursors) | st.text(max_size=4)
    scalars = {
        "Int": st.one_of(st.integers(0, 3), st.integers(0, 3),
                         st.sampled_from([-1, 20, 100, 101])).map(_int),
        "String": texts.map(_string),
        "ID": (st.sampled_from([*dataset.ids, "cons_nonsense", "aud_01JD0000000000000000000000"])
               | st.text(max_size=3)).map(_string),
        "DateTime": st.sampled_from(TIMES).map(_string),
    }

    def generated(root_field: str | None = None) -> st.SearchStrategy[graphql.DocumentNode]:
        return queries(SCHEMA, fields=[root_field] if root_field else None,
                       custom_scalars=scalars, print_ast=lambda document: document)

    # Selections on a node type, to graft under a connection's `nodes`: the generator seldom
    # goes that deep by itself, and a page's relations are where the look-ahead works.
    grafts = {
        "Consumer": generated("consumer").map(partial(_selections_on, "Consumer")),
        "Audience": generated("audience").map(partial(_selections_on, "Audience")),
        "Order": generated("node").map(partial(_selections_on, "Order")),
        "Event": generated("node").map(partial(_selections_on, "Event")),
    }
    documents = generated()

    @st.composite
    def rewritten(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
        query, variables = _Rewrite(draw, dataset, grafts).document(draw(documents))
        assert not graphql.validate(SCHEMA, graphql.parse(query)), query  # valid, always
        return query, variables

    return rewritten()


def _selections_on(type_name: str, document: graphql.DocumentNode) -> graphql.SelectionSetNode:
    """The selections of a generated `{ root(...) { ... } }` that apply to `type_name`: all
    of them, or for an interface the fields and the inline fragments on that type."""
    (operation,) = document.definitions
    assert isinstance(operation, graphql.OperationDefinitionNode)
    root = operation.selection_set.selections[0]
    assert isinstance(root, graphql.FieldNode) and root.selection_set is not None
    kept = tuple(selection for selection in root.selection_set.selections
                 if not isinstance(selection, graphql.InlineFragmentNode)
                 or selection.type_condition is None
                 or selection.type_condition.name.value == type_name)
    return graphql.SelectionSetNode(selections=kept or (_field("id"),))


def _field(name: str, *selections: graphql.SelectionNode) -> graphql.FieldNode:
    return graphql.FieldNode(
        name=graphql.NameNode(value=name), arguments=(), directives=(),
        selection_set=graphql.SelectionSetNode(selections=selections) if selections else None)


def _int(value: int) -> graphql.IntValueNode:
    return graphql.IntValueNode(value=str(value))


def _string(value: str) -> graphql.StringValueNode:
    return graphql.StringValueNode(value=value)


class _Rewrite:
    """Turns a generated document into one that uses more of the language: arguments
    become variables (some declared with a default and not sent, some integral Ints sent as
    floats), fields get aliases, @skip/@include (literal or variable), selections move into
    named fragments, inline fragments into named ones, and __typename is asked here and
    there. Every choice shrinks towards the document as generated."""

    def __init__(self, draw: st.DrawFn, dataset: Dataset,
                 grafts: dict[str, st.SearchStrategy[graphql.SelectionSetNode]]) -> None:
        self.draw = draw
        self.dataset = dataset
        self.grafts = grafts
        self.grafted = 0
        self.variables: dict[str, Any] = {}
        self.definitions: list[graphql.VariableDefinitionNode] = []
        self.fragments: list[graphql.FragmentDefinitionNode] = []
        self.aliases = 0

    def chance(self, percent: int) -> bool:
        return bool(self.draw(st.integers(0, 99)) >= 100 - percent)

    def document(self, document: graphql.DocumentNode) -> tuple[str, dict[str, Any]]:
        (operation,) = document.definitions
        assert isinstance(operation, graphql.OperationDefinitionNode)
        selection_set = self.selection_set(operation.selection_set, SCHEMA.query_type)
        rewritten = graphql.OperationDefinitionNode(
            operation=operation.operation,
            name=graphql.NameNode(value="Q") if self.chance(30) else None,
            variable_definitions=tuple(self.definitions), directives=(),
            selection_set=selection_set)
        text = graphql.print_ast(graphql.DocumentNode(
            definitions=(rewritten, *self.fragments)))
        return text, self.variables

    def selection_set(self, selection_set: graphql.SelectionSetNode,
                      parent: Any) -> graphql.SelectionSetNode:
        selections: list[graphql.SelectionNode] = []
        for selection in selection_set.selections:
            if isinstance(selection, graphql.FieldNode):
                selections.append(self.field(selection, parent))
            else:
                assert isinstance(selection, graphql.InlineFragmentNode)
                assert selection.type_condition is not None
                on = SCHEMA.get_type(selection.type_condition.name.value)
                inner = self.selection_set(selection.selection_set, on)
                if self.chance(30):
                    selections.append(self.fragment_spread(on, inner))
                else:
                    selections.append(graphql.InlineFragmentNode(
                        type_condition=selection.type_condition,
                        directives=self.directives(), selection_set=inner))
        if parent.name.endswith("Connection") and self.grafted < 3 and self.chance(60) and not any(
                isinstance(selection, graphql.FieldNode)
                and selection.name.value in ("nodes", "edges") for selection in selections):
            selections.append(self.graft(graphql.get_named_type(parent.fields["nodes"].type)))
        if self.chance(10):
            at = self.draw(st.integers(0, len(selections)))
            selections.insert(at, _field("__typename"))
        return graphql.SelectionSetNode(selections=tuple(selections))

    def graft(self, node_type: Any) -> graphql.FieldNode:
        """`nodes { ... }` or `edges { cursor node { ... } }`, with generated selections."""
        self.grafted += 1
        selection_set = self.selection_set(self.draw(self.grafts[node_type.name]), node_type)
        if self.chance(30):
            return _field("edges", _field("cursor"), _field("node", *selection_set.selections))
        return _field("nodes", *selection_set.selections)

    def field(self, node: graphql.FieldNode, parent: Any) -> graphql.FieldNode:
        definition = parent.fields[node.name.value]
        arguments = []
        for argument in node.arguments or ():
            argument_definition = definition.args[argument.name.value]
            if not graphql.is_required_argument(argument_definition) and self.chance(65):
                continue  # left out, rather than given as null or a value
            value = argument.value
            if argument.name.value in ("after", "before") and self.chance(70):
                value = _string(self.draw(st.sampled_from(self.dataset.cursors)))
            arguments.append(graphql.ArgumentNode(name=argument.name, value=self.value(
                value, argument_definition.type)))
        selection_set = None
        if node.selection_set is not None:
            returns = graphql.get_named_type(definition.type)
            selection_set = self.selection_set(node.selection_set, returns)
            if self.chance(20):
                selection_set = graphql.SelectionSetNode(
                    selections=(self.fragment_spread(returns, selection_set),))
        alias = None
        if self.chance(15):
            self.aliases += 1
            alias = graphql.NameNode(value=f"a{self.aliases}_{node.name.value}")
        return graphql.FieldNode(alias=alias, name=node.name, arguments=tuple(arguments),
                                 directives=self.directives(), selection_set=selection_set)

    def value(self, node: graphql.ValueNode, type_: Any, percent: int = 40) -> graphql.ValueNode:
        if not self.chance(percent):
            return node
        name = f"v{len(self.definitions)}"
        value = graphql.value_from_ast_untyped(node)
        default = None
        if self.chance(20):
            default = cast(graphql.ConstValueNode, node)  # declared with it, and not sent
        else:
            if type(value) is int and self.chance(30):
                value = float(value)  # integral floats are valid Int input
            self.variables[name] = value
        self.definitions.append(graphql.VariableDefinitionNode(
            variable=graphql.VariableNode(name=graphql.NameNode(value=name)),
            type=graphql.parse_type(str(type_)), default_value=default, directives=()))
        return graphql.VariableNode(name=graphql.NameNode(value=name))

    def directives(self) -> tuple[graphql.DirectiveNode, ...]:
        if not self.chance(6):
            return ()
        condition = self.value(graphql.BooleanValueNode(value=self.chance(50)),
                               graphql.GraphQLNonNull(graphql.GraphQLBoolean), percent=50)
        return (graphql.DirectiveNode(
            name=graphql.NameNode(value=self.draw(st.sampled_from(["include", "skip"]))),
            arguments=(graphql.ArgumentNode(name=graphql.NameNode(value="if"),
                                            value=condition),)),)

    def fragment_spread(self, on: Any, selection_set: graphql.SelectionSetNode
                        ) -> graphql.FragmentSpreadNode:
        name = graphql.NameNode(value=f"F{len(self.fragments)}")
        self.fragments.append(graphql.FragmentDefinitionNode(
            name=name, type_condition=graphql.NamedTypeNode(name=graphql.NameNode(
                value=on.name)), directives=(), selection_set=selection_set))
        return graphql.FragmentSpreadNode(name=name, directives=self.directives())


# -- running and comparing ------------------------------------------------------------------

@dataclass
class Answer:
    status: int
    body: dict[str, Any]


Run = Callable[[str, str, dict[str, Any]], Awaitable[Answer]]


def over_http(app: FastAPI, client: httpx.AsyncClient, secret: str) -> Run:
    async def run(path: str, query: str, variables: dict[str, Any]) -> Answer:
        on_path(app, path)
        try:
            async with asyncio.timeout(ANSWER_WITHIN_S):
                response = await client.post(
                    "/graphql", json={"query": query, "variables": variables},
                    headers=bearer(secret))
        except TimeoutError:
            raise AssertionError(f"{path}: no answer within {ANSWER_WITHIN_S} s") from None
        finally:
            on_path(app, "compiled")
        held = _checked_out(app)
        assert not held, f"{path}: pooled connections not returned: {held}\n{query}\n{variables}"
        return Answer(response.status_code, response.json())

    return run


def _checked_out(app: FastAPI) -> dict[str, int]:
    """Connections the app's pools have lent and not had back (none, between requests), but
    those kept for a next request (conftest.checked_out)."""
    database = app.state.database
    write = database.write_engine.pool
    in_use = {"read": checked_out(app),
              "write": write.checkedout() if hasattr(write, "checkedout") else 0}
    return {name: count for name, count in in_use.items() if count}


def _comparable(answer: Answer) -> str:
    """The answer as JSON, errors in a canonical order (the spec gives them none), without
    the request id an internal error carries, and without what the key's bucket holds (it
    restores between the two requests)."""
    body = dict(answer.body)
    throttle = body.get("extensions", {}).get("cost", {}).get("throttleStatus")
    if throttle is not None:
        body["extensions"] = {**body["extensions"], "cost": {
            **body["extensions"]["cost"],
            "throttleStatus": {k: v for k, v in throttle.items() if k != "currentlyAvailable"}}}
    errors = [{**error, "extensions": {k: v for k, v in error.get("extensions", {}).items()
                                       if k != "requestId"}}
              for error in body.pop("errors", None) or ()]
    if errors:
        body["errors"] = sorted(errors, key=lambda error: json.dumps(error, sort_keys=True))
    return json.dumps({"status": answer.status, **body}, indent=1)


async def same_answer(run: Run, query: str, variables: dict[str, Any]) -> str:
    """Asserts both paths answer alike; returns which path answered, for statistics."""
    before = dict(executor.stats)
    paths = (*EXECUTION_PATHS, THROUGH_EXECUTE)
    answers = {path: await run(path, query, variables) for path in paths}
    for path, answer in answers.items():
        codes = [(error.get("extensions") or {}).get("code")
                 for error in answer.body.get("errors") or ()]
        assert "INTERNAL_SERVER_ERROR" not in codes, (
            f"{path}: an internal error\n{query}\n{variables}\n{_comparable(answer)}")
    compiled, reference, through = (_comparable(answers[path]) for path in paths)
    assert compiled == reference, (
        f"the paths differ on\n{query}\n{variables}\ncompiled:\n{compiled}\n"
        f"graphql-core:\n{reference}")
    assert through == compiled, (
        f"the direct path and `execute` differ on\n{query}\n{variables}\n"
        f"direct:\n{compiled}\nthrough execute:\n{through}")
    if executor.stats["compiled"] > before["compiled"]:
        return "compiled alone"
    return "fell back" if executor.stats["fallbacks"] > before["fallbacks"] else "refused"


# -- the tests ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
async def loop(app: FastAPI) -> asyncio.AbstractEventLoop:
    """The app's event loop, for the synchronous property tests to run requests on."""
    return asyncio.get_running_loop()


@pytest.fixture
async def dataset(app: FastAPI, client: httpx.AsyncClient, api_key: str) -> Dataset:
    seeded = await seed(app.state.database.write_engine)
    response = await client.post("/graphql", headers=bearer(api_key), json={
        "query": CURSORS, "variables": {"id": seeded.bind("{consumer:3}")}})
    seeded.cursors = sorted(set(_strings(response.json()["data"])))
    assert len(seeded.cursors) > 10, response.json()
    return seeded


def differential(loop: asyncio.AbstractEventLoop, run: Run, dataset: Dataset,
                 config: settings = PROPERTY) -> None:
    @config
    @given(operation=operations(dataset))
    def property_(operation: tuple[str, dict[str, Any]]) -> None:
        event(loop.run_until_complete(same_answer(run, *operation)))

    property_()


# Operations the paths answered differently (issue 12 section 1, and what this property test
# found), compared the same way. `{consumer:3}` and the like stand for the seeded rows' ids.
REGRESSIONS = [
    pytest.param("""query($o1: ID!, $o2: ID!) {
      node(id: $o1) { ... on Order {
        bad: consumer { orders(first: 101) { totalCount } }
        good: consumer { audiences { totalCount } orders { totalCount } } } }
      later: node(id: $o2) { ... on Order { consumer { audiences { nodes {
        consumers(first: 1) { nodes { orders { totalCount } } } } } } } } }""",
                 {"o1": "{order:0}", "o2": "{order:1}"},
                 id="1a cancelled loader"),
    pytest.param("""query($n: Int, $e: Boolean!) { consumers(first: 3) { nodes { id
      email @include(if: $e) orders(first: $n) { nodes { id } } } } }""", {"n": 2, "e": True},
                 id="1b variable in a relation argument"),
    # found by the property test: the same under `searchConsumers`, through a fragment
    pytest.param("""query($n: Int) { searchConsumers(q: "user") { ...F } }
      fragment F on ConsumerConnection { nodes { orders(first: $n) { totalCount } } }""",
                 {"n": 2},
                 id="1b variable in a relation argument of a search"),
    # found by the property test (with a DataLoader fix under way, not on main): a non-null
    # root field fails while siblings still load; the request's connection must still go
    # back to the pool with the answer (over_http checks)
    pytest.param("""{ node(id: "{audience:0}") { id } consumers { totalCount nodes { id } }
      searchConsumers { totalCount } }""", {}, id="connection returned after a failed root"),
    # found by the property test: a root field that is non-null fails, and so does a relation
    # under another root field; graphql-core alone reports only the first (the data is null
    # while the consumer still loads), and so must the fallback, though the compiled attempt
    # has loaded the consumer already (Loaders.replay)
    pytest.param("""{ consumer(id: "{consumer:3}") { orders(first: 0, last: 0) { totalCount } }
      searchConsumers(q: "") { totalCount } }""", {}, id="1e fallback error list"),
    # found by the property test: two non-null root fields fail, `consumers` in its read
    # (a turn of the event loop later), `searchConsumers` at once; graphql-core alone
    # reports the second, and so must the fallback, though the first's read is over
    pytest.param("""{ consumers(audienceId: "{consumer:0}") { totalCount }
      searchConsumers(q: "") { totalCount } }""", {}, id="1e which failed root comes first"),
]


@pytest.mark.parametrize(("query", "variables"), REGRESSIONS)
def test_both_paths_answer_alike(
    loop: asyncio.AbstractEventLoop, app: FastAPI, client: httpx.AsyncClient, api_key: str,
    dataset: Dataset, query: str, variables: dict[str, Any],
) -> None:
    query, variables = dataset.bind(query), {
        name: dataset.bind(value) for name, value in variables.items()}
    loop.run_until_complete(same_answer(over_http(app, client, api_key), query, variables))


def test_both_paths_answer_random_queries_alike(
    loop: asyncio.AbstractEventLoop, app: FastAPI, client: httpx.AsyncClient, api_key: str,
    dataset: Dataset,
) -> None:
    differential(loop, over_http(app, client, api_key), dataset)


# -- mutations: each path from the same seeded state ---------------------------------------

MUTATIONS = [
    pytest.param("""mutation($n: Int) {
      consumerCreate(input: {email: "new@example.com", metadata: {a: 1}}) {
        consumer { email metadata orders(first: $n) { totalCount } audiences(first: $n) {
          nodes { name } } } userErrors { code } } }""", {"n": 2},
                 id="create, a variable in the payload's relation arguments"),
    pytest.param("""mutation($a: ID!, $n: Int) {
      audienceUpdate(id: $a, input: {description: "changed"}) { audience { description
        consumers(first: 3) { nodes { email orders(first: $n) { totalCount } } } }
        userErrors { code } } }""", {"a": "{audience:0}", "n": 2},
                 id="update, a variable in the relation arguments of the payload's page"),
    pytest.param("""mutation($id: ID!, $full: Boolean!) {
      consumerUpdate(id: $id, input: {fullName: "Renamed", phone: null}) {
        consumer { fullName phone @include(if: $full) audiences { totalCount } }
        userErrors { field code } } }""", {"id": "{consumer:1}", "full": True},
                 id="update, a directive in the payload"),
    pytest.param("""mutation($items: [ConsumerCreateInput!]!) {
      consumerBatchCreate(input: $items, errorPolicy: REJECT_FAILED_ROWS) { ...B } }
      fragment B on ConsumerBatchPayload { count userErrors { field code }
        results { consumer { email } userErrors { code } } }""",
                 {"items": [{"email": "b1@example.com"}, {"email": "USER2@example.com"},
                            {"email": "not an email"}, {"phone": "+1 415 555 0199"}]},
                 id="batch create, rows refused"),
    pytest.param("""mutation($a: ID!, $ids: [ID!]!) {
      added: audienceAddConsumers(audienceId: $a, consumerIds: $ids) {
        audience { name consumers(first: 5) { totalCount nodes { email } } }
        userErrors { field code } }
      order: orderRecord(input: {consumerId: "{consumer:0}", amount: 19.99, currency: "eur",
                                 placedAt: "2024-12-24T18:00:00+01:00"}) {
        order { amount currency consumer { totalOrders totalOrderValue lastOrderAt } }
        userErrors { code } }
      gone: consumerDelete(id: "{consumer:2}") { consumer { email } userErrors { code } } }""",
                 {"a": "{audience:2}", "ids": ["{consumer:0}", "{consumer:4}"]},
                 id="membership, order and delete in one operation"),
    pytest.param("""mutation {
      first: consumerCreate(input: {email: "once@example.com"}) { consumer { email } }
      bad: orderRecord(input: {consumerId: "{consumer:1}", amount: 1, currency: "USD"}) {
        order { consumer { orders(first: 500) { totalCount } } } userErrors { code } }
      after: consumerCreate(input: {email: "after@example.com"}) { consumer { email } } }""",
                 {}, id="an error after a write"),
]


def _masked(value: Any) -> Any:
    """Values a write makes afresh each time (new ids, timestamps) as a placeholder."""
    if isinstance(value, dict):
        return {k: "<new>" if k in {"id", "createdAt", "updatedAt"} and isinstance(v, str)
                else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


async def _state(engine: Any) -> list[Any]:
    async with engine.connect() as conn:
        consumers = await conn.execute(sa.select(
            models.Consumer.email, models.Consumer.full_name, models.Consumer.phone,
            models.Consumer.total_orders, models.Consumer.total_order_value,
        ).order_by(models.Consumer.email_key))
        members = await conn.execute(sa.select(sa.func.count()).select_from(
            models.ConsumerAudience))
        orders = await conn.execute(sa.select(sa.func.count()).select_from(models.Order))
        return [[tuple(row) for row in consumers], members.scalar(), orders.scalar()]


@pytest.mark.parametrize(("query", "variables"), MUTATIONS)
async def test_mutations_answer_alike(
    app: FastAPI, client: httpx.AsyncClient, query: str, variables: dict[str, Any]
) -> None:
    engine = app.state.database.write_engine
    outcomes = []
    for path in EXECUTION_PATHS:
        await empty_tables(engine)
        dataset = await seed(engine)
        secret = (await app.state.keys.create("differential", scopes=READ_WRITE)).secret
        answer = await over_http(app, client, secret.get_secret_value())(
            path, dataset.bind(query),
            {name: _bound(dataset, value) for name, value in variables.items()})
        outcomes.append((path, answer, await _state(engine)))

    for path, answer, _ in outcomes:
        assert all((error.get("extensions") or {}).get("code") != "INTERNAL_SERVER_ERROR"
                   for error in answer.body.get("errors") or ()), (path, answer.body)
    (_, compiled, compiled_state), (_, reference, reference_state) = outcomes
    assert _comparable(Answer(compiled.status, _masked(compiled.body))) == _comparable(
        Answer(reference.status, _masked(reference.body)))
    assert compiled_state == reference_state  # the same writes, each once


def _bound(dataset: Dataset, value: Any) -> Any:
    if isinstance(value, list):
        return [dataset.bind(item) for item in value]
    return dataset.bind(value)


# -- the comparator catches a difference ----------------------------------------------------

def _broken(run: Run, breaks: Callable[[dict[str, Any]], bool]) -> Run:
    """`run`, with a compiled path that alters its answers (`breaks` says whether it did)."""
    async def broken(path: str, query: str, variables: dict[str, Any]) -> Answer:
        answer = await run(path, query, variables)
        if path == "compiled" and breaks(answer.body):
            broken_count.append(query)
        return answer

    broken_count: list[str] = []
    broken.altered = broken_count  # type: ignore[attr-defined]
    return broken


def _drops_a_field(body: dict[str, Any]) -> bool:
    data = body.get("data")
    if not data:
        return False
    data.pop(next(reversed(data)))
    return True


def _alters_an_error(body: dict[str, Any]) -> bool:
    for error in body.get("errors") or ():
        error["message"] = f"ALTERED {error['message']}"
    return bool(body.get("errors"))


@pytest.mark.parametrize(("breaks", "shows"), [(_drops_a_field, "the paths differ"),
                                               (_alters_an_error, "ALTERED")],
                         ids=["a dropped field", "an altered error"])
def test_a_divergence_fails_the_property(
    loop: asyncio.AbstractEventLoop, app: FastAPI, client: httpx.AsyncClient, api_key: str,
    dataset: Dataset, breaks: Callable[[dict[str, Any]], bool], shows: str,
) -> None:
    run = _broken(over_http(app, client, api_key), breaks)
    cheap = settings(PROPERTY, max_examples=50, phases=[Phase.generate], print_blob=False)

    with pytest.raises(AssertionError, match=shows):
        differential(loop, run, dataset, cheap)
    assert run.altered  # type: ignore[attr-defined]
