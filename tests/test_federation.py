"""The Apollo Federation v2 subgraph: `_service { sdl }`, `_entities` through the loaders
(statements counted), its pricing and scope, and composition with a second subgraph by
`@apollo/composition` (Node; skipped when it is missing)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import graphql
import httpx
import pytest
from fastapi import FastAPI

from consumers_graphql.api import executor, federation
from consumers_graphql.api.schema import Schema, build_schema
from consumers_graphql.cli import main as cli
from consumers_graphql.store import models
from consumers_graphql.store.keys import Scope
from tests.conftest import (
    TEST_DATABASE_URL,
    GraphQL,
    StatementCounter,
    _new_key,
    new_database,
    project_root,
    throttle_status,
)
from tests.factories import (
    BASE_TIME,
    audience_row,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)
from tests.processes import ON_GRAPHQL_CORE, Served

FEDERATION_DIR = project_root() / "tests" / "federation"
FEDERATION_V2 = "https://specs.apollo.dev/federation/v2.11"

ENTITIES = """
query($representations: [_Any!]!) {
  _entities(representations: $representations) {
    __typename
    ... on Consumer { id email }
    ... on Audience { id name }
    ... on Order { id amount consumer { id } }
  }
}
"""


def consumer_ref(id: str) -> dict[str, str]:
    return {"__typename": "Consumer", "id": id}


def sdl_ast(sdl: str) -> dict[str, graphql.ObjectTypeDefinitionNode]:
    document = graphql.parse(sdl)
    return {d.name.value: d for d in document.definitions
            if isinstance(d, graphql.ObjectTypeDefinitionNode)}


def keys_of(definition: graphql.ObjectTypeDefinitionNode) -> list[str]:
    return [graphql.print_ast(argument.value)
            for directive in definition.directives or () if directive.name.value == "key"
            for argument in directive.arguments or () if argument.name.value == "fields"]


# --- _service ------------------------------------------------------------------------------


async def test_service_sdl_is_a_federation_v2_subgraph_with_three_entities(gql: GraphQL) -> None:
    sdl = (await gql.data("{ _service { sdl } }"))["_service"]["sdl"]

    assert sdl == build_schema().as_str()
    schema_definition = next(d for d in graphql.parse(sdl).definitions
                             if isinstance(d, graphql.SchemaDefinitionNode))
    links = [{a.name.value: graphql.value_from_ast_untyped(a.value) for a in d.arguments}
             for d in schema_definition.directives if d.name.value == "link"]
    assert links == [{"url": FEDERATION_V2, "import": ["@key"]}]
    types = sdl_ast(sdl)
    entities = {name for name, definition in types.items() if keys_of(definition)}
    assert entities == {"Consumer", "Audience", "Order"}
    for name in entities:
        assert keys_of(types[name]) == ['"id"']
    query_fields = {f.name.value: graphql.print_ast(f.type) for f in types["Query"].fields}
    assert query_fields["_entities"] == "[_Entity]!"
    assert query_fields["_service"] == "_Service!"
    assert "union _Entity = Audience | Consumer | Order" in sdl


def test_service_is_answered_by_our_field_from_a_cached_sdl() -> None:
    """Strawberry's own `_service` prints the schema on every call (3 ms, the whole SDL);
    ours (api/federation.py) answers the schema's SDL printed once. Strawberry uses a Query
    type's own `_service` field instead of adding its own (0.331.4's release notes, with
    this very example): pinned, so that an upgrade that adds its own anyway fails here."""
    schema = build_schema()
    field = schema.get_field_for_type("_service", "Query")
    assert field is not None and field.base_resolver is not None
    assert field.base_resolver.wrapped_func is federation.service
    assert schema.subgraph_sdl == schema.as_str()
    assert schema.subgraph_sdl is schema.subgraph_sdl  # printed once


def test_schema_graphql_has_no_federation_additions() -> None:
    public = (project_root() / "schema.graphql").read_text(encoding="utf-8")

    for added in ("_entities", "_service", "_Any", "_Entity", "@key", "@link"):
        assert added not in public
    # and what is left out is exactly what federation adds: the rest is the same schema
    subgraph = graphql.build_ast_schema(graphql.parse(build_schema().as_str()),
                                        assume_valid_sdl=True)
    plain = graphql.build_schema(public)
    assert set(subgraph.type_map) - set(plain.type_map) == {"_Any", "_Entity", "_Service"}
    assert set(plain.type_map) <= set(subgraph.type_map)
    assert set(subgraph.query_type.fields) - set(plain.query_type.fields) == {  # type: ignore[union-attr]
        "_entities", "_service"}


def test_schema_federation_graphql_matches_the_running_schema(tmp_path: Path) -> None:
    exported = (project_root() / "schema.federation.graphql").read_text(encoding="utf-8")
    assert exported == build_schema().as_str() + "\n", (
        "schema.federation.graphql is stale: run "
        "`consumers-graphql export-schema --federation -o schema.federation.graphql`"
    )
    target = tmp_path / "subgraph.graphql"
    assert cli(["export-schema", "--federation", "-o", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == exported


# --- _entities -----------------------------------------------------------------------------


def test_entities_are_resolved_by_our_resolver() -> None:
    """Strawberry's federation Schema installs `self.entities_resolver` as the `_entities`
    resolver (api/schema.py overrides it to load through the loaders): pinned, so that an
    upgrade that wires `_entities` otherwise fails here, by name, and not as a statement
    count."""
    schema = build_schema()
    query = schema._schema.query_type
    assert query is not None
    definition = query.fields["_entities"].extensions["strawberry-definition"]
    resolver = definition.base_resolver.wrapped_func
    assert resolver.__func__ is Schema.entities_resolver
    assert resolver.__self__ is schema



async def test_entities_of_twenty_consumers_cost_one_statement(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, execution_path: str
) -> None:
    consumers = [consumer_row(n) for n in range(20)]
    await insert_consumers(write_engine, consumers)
    representations = [consumer_ref(c["id"]) for c in reversed(consumers)]
    before = dict(executor.stats)

    with sql.counting():
        entities = (await gql.data(ENTITIES, {"representations": representations}))["_entities"]

    assert entities == [{"__typename": "Consumer", "id": c["id"], "email": c["email"]}
                        for c in reversed(consumers)]
    assert sql.count == 1
    if execution_path == "compiled":  # answered by the plan, not by a fallback
        assert executor.stats["fallbacks"] == before["fallbacks"]
        assert executor.stats["compiled"] == before["compiled"] + 1


async def test_entities_with_relations_cost_one_statement_per_level(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    consumers = [consumer_row(n) for n in range(10)]
    await insert_consumers(write_engine, consumers)
    await insert_rows(write_engine, models.Order, [
        order_row(c["id"], f"{n}.00", BASE_TIME) for n, c in enumerate(consumers)])
    query = """query($r: [_Any!]!) { _entities(representations: $r) {
      ... on Consumer { id orders(first: 2) { nodes { amount } } } } }"""

    with sql.counting():
        entities = (await gql.data(query, {"r": [consumer_ref(c["id"]) for c in consumers]}))

    assert [e["orders"]["nodes"] for e in entities["_entities"]] == [
        [{"amount": float(n)}] for n in range(10)]
    assert sql.count == 2  # the consumers, then every consumer's first orders


async def test_entities_of_every_type_in_the_order_given(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    consumer = consumer_row(1)
    audiences = [audience_row(name) for name in ("Gold", "Silver")]
    orders = [order_row(consumer["id"], "12.3400", BASE_TIME),
              order_row(consumer["id"], "5.0000", BASE_TIME)]
    await insert_consumers(write_engine, [consumer])
    await insert_rows(write_engine, models.Audience, audiences)
    await insert_rows(write_engine, models.Order, orders)
    representations = [
        {"__typename": "Order", "id": orders[0]["id"]},
        {"__typename": "Audience", "id": audiences[1]["id"]},
        consumer_ref(consumer["id"]),
        {"__typename": "Audience", "id": audiences[0]["id"]},
        {"__typename": "Order", "id": orders[1]["id"]},
    ]

    with sql.counting():
        entities = (await gql.data(ENTITIES, {"representations": representations}))["_entities"]

    assert entities == [
        {"__typename": "Order", "id": orders[0]["id"], "amount": 12.34,
         "consumer": {"id": consumer["id"]}},
        {"__typename": "Audience", "id": audiences[1]["id"], "name": "Silver"},
        {"__typename": "Consumer", "id": consumer["id"], "email": consumer["email"]},
        {"__typename": "Audience", "id": audiences[0]["id"], "name": "Gold"},
        {"__typename": "Order", "id": orders[1]["id"], "amount": 5.0,
         "consumer": {"id": consumer["id"]}},
    ]
    # one statement a type: the orders' consumer is the consumer already loaded
    assert sql.count == 3


async def test_unknown_malformed_and_other_types_ids_are_null(
    gql: GraphQL, sql: StatementCounter, write_engine: Any
) -> None:
    consumer = consumer_row(1)
    audience = audience_row("VIP")
    await insert_consumers(write_engine, [consumer])
    await insert_rows(write_engine, models.Audience, [audience])
    unknown = "cons_01JD0000000000000000000000"
    representations = [
        consumer_ref(unknown),  # well-formed, no such consumer
        consumer_ref("garbage"),
        consumer_ref(audience["id"]),  # an audience's id as a Consumer
        {"__typename": "Audience", "id": consumer["id"]},  # and the other way round
        {"__typename": "Order", "id": "ord_" + consumer["id"][5:]},  # a ULID, wrong prefix
        consumer_ref(consumer["id"]),
        {"__typename": "Consumer", "id": consumer["id"], "email": "ignored@example.com"},
    ]

    with sql.counting():
        body = await gql(ENTITIES, {"representations": representations})

    assert "errors" not in body
    found = {"__typename": "Consumer", "id": consumer["id"], "email": consumer["email"]}
    assert body["data"]["_entities"] == [None, None, None, None, None, found, found]
    assert sql.count == 2  # the consumers (the found and the unknown), the order; no audience

    with sql.counting():
        none = await gql.data(ENTITIES, {"representations": [
            consumer_ref("cons_"), consumer_ref(audience["id"])]})
    assert none["_entities"] == [None, None]
    assert sql.count == 0  # nothing that could name a row is looked up


@pytest.mark.parametrize(("representation", "message", "field"), [
    ({"id": "cons_01JD0000000000000000000000"},
     "Representation 1 has `__typename` none; this subgraph's entities are `Consumer`, "
     "`Audience`, `Order`.", ["representations", "1", "__typename"]),
    ({"__typename": "PageInfo", "id": "cons_01JD0000000000000000000000"},
     "Representation 1 has `__typename` `PageInfo`; this subgraph's entities are "
     "`Consumer`, `Audience`, `Order`.", ["representations", "1", "__typename"]),
    ({"__typename": "Consumer"},
     "Representation 1 (Consumer) needs its key, a string `id` (`@key(fields: \"id\")`); "
     "it has none.", ["representations", "1", "id"]),
    ({"__typename": "Consumer", "id": 42},
     "Representation 1 (Consumer) needs its key, a string `id` (`@key(fields: \"id\")`); "
     "it has a value of type int.", ["representations", "1", "id"]),
    ("cons_01JD0000000000000000000000",
     "Representation 1 is not an object.", ["representations", "1"]),
])
async def test_a_representation_without_a_key_or_a_known_type_is_an_error_for_its_entry(
    gql: GraphQL, write_engine: Any, representation: Any, message: str, field: list[str]
) -> None:
    consumer = consumer_row(1)
    await insert_consumers(write_engine, [consumer])

    body = await gql(ENTITIES, {"representations": [
        consumer_ref(consumer["id"]), representation, consumer_ref(consumer["id"])]})

    found = {"__typename": "Consumer", "id": consumer["id"], "email": consumer["email"]}
    assert body["data"] == {"_entities": [found, None, found]}
    assert [(e["message"], e["path"], e["extensions"]) for e in body["errors"]] == [
        (message, ["_entities", 1], {"code": "BAD_USER_INPUT", "field": field})]


async def test_errors_nulls_and_entities_mixed_keep_their_places(
    gql: GraphQL, sql: StatementCounter, write_engine: Any, execution_path: str
) -> None:
    """Several entries' errors beside nulls and entities: each error at its own index, the
    others' data kept, the same answer on both paths (the compiled executor falls back to
    graphql-core on an error) and still one statement (its loads are replayed, not sent
    again)."""
    consumer = consumer_row(1)
    await insert_consumers(write_engine, [consumer])
    found = {"__typename": "Consumer", "id": consumer["id"], "email": consumer["email"]}

    with sql.counting():
        body = await gql(ENTITIES, {"representations": [
            consumer_ref("cons_01JD0000000000000000000000"), {"__typename": "Nope"},
            consumer_ref("garbage"), {"__typename": "Audience", "id": None},
            consumer_ref(consumer["id"]), 7]})

    assert body["data"] == {"_entities": [None, None, None, None, found, None]}
    assert [(e["path"], e["extensions"]["field"]) for e in body["errors"]] == [
        (["_entities", 1], ["representations", "1", "__typename"]),
        (["_entities", 3], ["representations", "3", "id"]),
        (["_entities", 5], ["representations", "5"]),
    ]
    assert sql.count == 1


# --- limits, cost, rate limit and scope ----------------------------------------------------


async def test_entities_are_priced_like_nodes(gql: GraphQL, write_engine: Any) -> None:
    consumers = [consumer_row(n) for n in range(3)]
    await insert_consumers(write_engine, consumers)
    query = """query($r: [_Any!]!) { _entities(representations: $r) {
      ... on Consumer { orders(first: 5) { nodes { id } } } } }"""
    nodes = """query($ids: [ID!]!) { nodes(ids: $ids) {
      ... on Consumer { orders(first: 5) { nodes { id } } } } }"""

    body = await gql(query, {"r": [consumer_ref(c["id"]) for c in consumers]})
    as_nodes = await gql(nodes, {"ids": [c["id"] for c in consumers]})

    assert "errors" not in body
    # 3 representations, each with a page of 5 orders: 3 + 3 x 5, as `nodes` counts it
    assert body["extensions"]["cost"] == {"requested": 18, "limit": 50_000,
                                          "throttleStatus": throttle_status(18)}
    assert as_nodes["extensions"]["cost"]["requested"] == 18
    # a literal list counts as well
    literal = ("{ _entities(representations: [" + ", ".join(
        f'{{__typename: "Consumer", id: "{c["id"]}"}}' for c in consumers)
        + "]) { ... on Consumer { id } } }")
    body = await gql(literal)
    assert [e["id"] for e in body["data"]["_entities"]] == [c["id"] for c in consumers]
    assert body["extensions"]["cost"]["requested"] == 3


async def test_more_representations_than_nodes_takes_ids_are_refused(
    gql: GraphQL, sql: StatementCounter
) -> None:
    representations = [consumer_ref(f"cons_01JD{n:022d}") for n in range(101)]

    with sql.counting():
        body = await gql(ENTITIES, {"representations": representations})

    assert body["data"] is None
    assert [(e["message"], e["extensions"]) for e in body["errors"]] == [(
        "`representations` takes at most 100 entries (as `nodes` takes ids); 101 were given.",
        {"code": "BAD_USER_INPUT", "field": ["representations"]})]
    assert sql.statements == []
    assert body["extensions"]["cost"]["requested"] == 101  # the rate limit took them too


async def test_entities_over_the_cost_limit_are_refused_before_any_statement(
    gql: GraphQL, sql: StatementCounter
) -> None:
    query = """query($r: [_Any!]!) { _entities(representations: $r) {
      ... on Consumer { orders(first: 100) { nodes { consumer { audiences(first: 100) {
        totalCount } } } } } } }"""
    representations = [consumer_ref(f"cons_01JD{n:022d}") for n in range(100)]

    with sql.counting():
        body = await gql(query, {"r": representations})

    assert "data" not in body
    assert [e["extensions"] for e in body["errors"]] == [
        {"code": "MAX_COST_EXCEEDED", "cost": 1_010_100, "limit": 50_000}]
    assert sql.statements == []


async def test_entities_need_the_read_scope(
    client: httpx.AsyncClient, app: FastAPI, sql: StatementCounter, write_engine: Any,
    execution_path: str,
) -> None:
    consumer = consumer_row(1)
    await insert_consumers(write_engine, [consumer])
    write_only = GraphQL(client, await _new_key(app, "write only", frozenset({Scope.WRITE})))

    with sql.counting():
        body = await write_only(ENTITIES, {"representations": [consumer_ref(consumer["id"])]})

    assert body.get("data") is None
    assert body["errors"] == [{"message": "This API key lacks the `read` scope.",
                               "extensions": {"code": "FORBIDDEN"}}]
    assert sql.statements == []


# --- composition ---------------------------------------------------------------------------


def _node_modules(directory: Path = FEDERATION_DIR) -> Path:
    """`directory`'s packages, installed with `npm ci` when missing or installed from
    another lock file (a stamp of the lock's hash, written once `npm ci` succeeded): a lock
    that moved on is never tested with the packages of the old one. Once a checkout."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are needed to compose a supergraph (@apollo/composition)")
    modules = directory / "node_modules"
    stamp = modules / ".installed-lock.sha256"
    lock = hashlib.sha256((directory / "package-lock.json").read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text(encoding="utf-8") != lock:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=directory,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        stamp.write_text(lock, encoding="utf-8")
    return modules


def test_packages_installed_from_another_lock_are_installed_anew(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text(
        '{"name": "empty", "version": "1.0.0", "private": true}', encoding="utf-8")
    (tmp_path / "package-lock.json").write_text(json.dumps({
        "name": "empty", "version": "1.0.0", "lockfileVersion": 3, "requires": True,
        "packages": {"": {"name": "empty", "version": "1.0.0"}}}), encoding="utf-8")
    stale = tmp_path / "node_modules" / "@apollo" / "composition"
    stale.mkdir(parents=True)  # what an older lock installed

    modules = _node_modules(tmp_path)

    assert not stale.exists()
    installed = (modules / ".installed-lock.sha256").stat().st_mtime_ns
    _node_modules(tmp_path)  # the same lock: no second `npm ci`
    assert (modules / ".installed-lock.sha256").stat().st_mtime_ns == installed


def compose(subgraphs: dict[str, Path]) -> dict[str, Any]:
    _node_modules()
    done = subprocess.run(
        ["node", "compose.mjs", *(f"{name}={path}" for name, path in subgraphs.items())],
        cwd=FEDERATION_DIR, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_subgraph_composes_with_a_subgraph_that_extends_consumer(tmp_path: Path) -> None:
    ours = tmp_path / "consumers.graphql"
    assert cli(["export-schema", "--federation", "-o", str(ours)]) == 0

    result = compose({"consumers": ours, "loyalty": FEDERATION_DIR / "loyalty.graphql"})

    assert "errors" not in result, result["errors"]
    supergraph = graphql.parse(result["supergraphSdl"])
    types = {d.name.value: d for d in supergraph.definitions
             if isinstance(d, graphql.ObjectTypeDefinitionNode)}
    consumer = {f.name.value: f for f in types["Consumer"].fields or ()}
    assert {"id", "email", "orders", "audiences", "loyaltyPoints"} <= set(consumer)

    def graphs(field: graphql.FieldDefinitionNode) -> set[str]:
        return {graphql.print_ast(a.value) for d in field.directives or ()
                if d.name.value == "join__field" for a in d.arguments if a.name.value == "graph"}

    assert graphs(consumer["loyaltyPoints"]) == {"LOYALTY"}
    assert graphs(consumer["email"]) == {"CONSUMERS"}
    assert {"consumers", "nodes", "loyaltyLeaders"} <= {
        f.name.value for f in types["Query"].fields or ()}
    assert "_entities" not in {f.name.value for f in types["Query"].fields or ()}


def test_composition_reads_a_file_whose_path_has_an_equals_sign(tmp_path: Path) -> None:
    folder = tmp_path / "a=b"  # compose.mjs takes NAME=FILE: only the first `=` splits
    folder.mkdir()
    ours = folder / "consumers.graphql"
    assert cli(["export-schema", "--federation", "-o", str(ours)]) == 0

    result = compose({"consumers": ours})

    assert "errors" not in result, result["errors"]


def test_composition_fails_when_a_subgraph_contradicts_ours(tmp_path: Path) -> None:
    """The composition test can fail: a second subgraph that gives `Consumer.email`
    another type does not compose."""
    ours = tmp_path / "consumers.graphql"
    assert cli(["export-schema", "--federation", "-o", str(ours)]) == 0
    contradicting = tmp_path / "contradicting.graphql"
    contradicting.write_text(
        'extend schema @link(url: "https://specs.apollo.dev/federation/v2.11", '
        'import: ["@key", "@shareable"])\n'
        'type Consumer @key(fields: "id") { id: ID! email: Int! @shareable }\n',
        encoding="utf-8",
    )

    result = compose({"consumers": ours, "contradicting": contradicting})

    assert any("email" in error for error in result["errors"]), result


# --- a gateway -----------------------------------------------------------------------------


def _gateway_url(gateway: subprocess.Popen[str], within: float = 60) -> str:
    """The gateway's address, from the line gateway.mjs prints once it listens; an error
    when it exits or says nothing of the kind `within` seconds (a hung Node process must
    not hang the run). Its output is read to the end meanwhile, so that it never blocks on
    a full pipe."""
    assert gateway.stdout is not None
    stdout = gateway.stdout
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + within
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"the gateway did not start within {within} s:\n"
                                 + "".join(seen)) from None
        if line is None:
            raise AssertionError("the gateway did not start:\n" + "".join(seen))
        if line.startswith("{"):
            return str(json.loads(line)["gateway"])
        seen.append(line)


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def test_a_gateway_that_never_listens_fails_the_test_in_time() -> None:
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"did not start within 0\.5 s"):
            _gateway_url(silent, within=0.5)
        assert time.monotonic() - started < 5
    finally:
        _stop(silent)


@pytest.fixture
async def subgraph_database_url(tmp_path: Path) -> AsyncIterator[str]:
    """The served subgraph's database: of its own, on the run's server (SQLite, PostgreSQL,
    through the pooler in CI's third run)."""
    if not TEST_DATABASE_URL:
        yield f"sqlite+aiosqlite:///{tmp_path / 'subgraph.db'}"
        return
    async with new_database("consumers_subgraph") as url:
        yield url


def test_a_gateway_answers_one_query_across_both_subgraphs(
    tmp_path: Path, subgraph_database_url: str, execution_path: str
) -> None:
    """Apollo Gateway on the composed supergraph: our served subgraph beside a loyalty
    subgraph (tests/federation/gateway.mjs) that extends Consumer with `loyaltyPoints`."""
    _node_modules()
    preexec = [sys.executable, "-c", ON_GRAPHQL_CORE] if execution_path == "graphql-core" else []
    served = Served(subgraph_database_url, tmp_path, preexec=preexec)
    gateway: subprocess.Popen[str] | None = None
    try:
        served.wait_until_up()
        secret = served.secret()
        emails = ["ada@example.com", "grace@example.com", "edsger@example.com"]
        with served.client(headers={"Authorization": f"Bearer {secret}"}) as client:
            ids = []
            for email in emails:
                created = client.post("/graphql", json={
                    "query": "mutation($email: String!) { consumerCreate(input: {email: $email})"
                             " { consumer { id } } }", "variables": {"email": email}}).json()
                ids.append(created["data"]["consumerCreate"]["consumer"]["id"])
        ours = tmp_path / "consumers.graphql"
        assert cli(["export-schema", "--federation", "-o", str(ours)]) == 0
        supergraph = tmp_path / "supergraph.graphql"
        supergraph.write_text(compose({"consumers": ours,
                                       "loyalty": FEDERATION_DIR / "loyalty.graphql"})
                              ["supergraphSdl"], encoding="utf-8")
        gateway = subprocess.Popen(
            ["node", "gateway.mjs"], cwd=FEDERATION_DIR, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "SUPERGRAPH": str(supergraph), "CONSUMERS_KEY": secret,
                 "CONSUMERS_URL": f"{served.url}/graphql", "LEADERS": ",".join(ids[::-1])},
        )
        url = _gateway_url(gateway)

        def ask(query: str, variables: dict[str, Any] | None = None) -> Any:
            response = httpx.post(url, json={"query": query, "variables": variables or {}},
                                  timeout=30)
            assert response.status_code == 200, response.text
            body = response.json()
            assert "errors" not in body, body["errors"]
            return body["data"]

        # from the loyalty subgraph into ours (the gateway asks `_entities` for the leaders)
        leaders = ask("{ loyaltyLeaders(first: 2) { id loyaltyPoints email "
                      "orders { totalCount } } }")
        assert leaders == {"loyaltyLeaders": [
            {"id": ids[2], "loyaltyPoints": 100, "email": emails[2], "orders": {"totalCount": 0}},
            {"id": ids[1], "loyaltyPoints": 90, "email": emails[1], "orders": {"totalCount": 0}},
        ]}
        # and from ours into the loyalty subgraph
        page = ask("{ consumers(first: 3, sortBy: EMAIL, sortDir: ASC) { nodes { email "
                   "loyaltyPoints } } }")
        assert page == {"consumers": {"nodes": [
            {"email": emails[0], "loyaltyPoints": 80},
            {"email": emails[2], "loyaltyPoints": 100},
            {"email": emails[1], "loyaltyPoints": 90},
        ]}}
    finally:
        if gateway is not None:
            _stop(gateway)
        assert served.stop() == 0, served.output
