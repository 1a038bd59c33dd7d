"""Apollo Federation v2: `_entities` through the request's loaders, and the two SDLs.

A gateway (Apollo Router or Gateway, Hive Gateway) asks this subgraph for the entities it
owns with `_entities(representations: [{__typename, id}, ...])`, one request per subgraph
and level of a query plan, often for a whole page of another subgraph's rows at once. Each
representation is looked up as `nodes` looks up its ids (api/query.py): through the
request's DataLoaders, so N consumers (or audiences, or orders) are one SQL statement per
type whatever N is, and an id that names nothing, names another type, or is no id at all
is null for its entry. A representation the gateway should never send (not an object, no
`__typename` we own, no string `id`) is an error for its entry alone (BAD_USER_INPUT): the
others still resolve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import strawberry
from graphql import GraphQLNamedType, GraphQLObjectType, GraphQLSchema
from graphql.utilities.print_schema import is_defined_type, print_type

from consumers_graphql.api import query
from consumers_graphql.api.context import Info
from consumers_graphql.api.query import MAX_NODES, load_node
from consumers_graphql.api.types import Audience, Consumer, Order
from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import IdKind, kind_of

if TYPE_CHECKING:
    from consumers_graphql.api.schema import Schema

Entity = Consumer | Audience | Order

# The entities by __typename, and the kind of id each one's key carries.
_ENTITIES: dict[str, IdKind] = {
    "Consumer": IdKind.CONSUMER,
    "Audience": IdKind.AUDIENCE,
    "Order": IdKind.ORDER,
}

# What federation adds to the Query type and to the types (`_Any`, `_Entity`, `_Service`,
# `_FieldSet`, and the `link__` types of the @link spec): left out of the exported public SDL.
FEDERATION_FIELDS = frozenset({"_service", "_entities"})


@strawberry.type(name="_Service")
class Service:
    """What `_service` answers (federation's `_Service`): the subgraph's SDL."""

    sdl: str


def service(info: Info) -> Service:
    """Federation's `_service`. Strawberry's own prints the whole schema on every call
    (3 ms); this one answers the SDL the schema printed once (`Schema.subgraph_sdl`), the
    same text."""
    return Service(sdl=cast("Schema", info.schema).subgraph_sdl)


@strawberry.type
class Query(query.Query):
    """The queries, with our `_service` (Strawberry adds `_entities`, and uses a Query
    type's own `_service` instead of adding one: 0.331.4 on, tests/test_federation.py)."""

    _service: Service = strawberry.field(name="_service", resolver=service)


def _is_federation_type(name: str) -> bool:
    return name.startswith(("_", "link__", "federation__"))


async def resolve_entities(
    info: Info, representations: list[Any]
) -> list[Entity | BadUserInput | None]:
    """The entities in the order given; an error for an entry is returned in its place
    (graphql-core raises it at `_entities.<index>`, and the other entries keep their data)."""
    if len(representations) > MAX_NODES:
        raise BadUserInput(
            f"`representations` takes at most {MAX_NODES} entries (as `nodes` takes ids); "
            f"{len(representations)} were given.", field=["representations"],
        )
    return list(await asyncio.gather(*(
        _entity(info, index, representation)
        for index, representation in enumerate(representations)
    )))


async def _entity(
    info: Info, index: int, representation: Any
) -> Entity | BadUserInput | None:
    where = ["representations", str(index)]
    if not isinstance(representation, Mapping):
        return BadUserInput(f"Representation {index} is not an object.", field=where)
    typename = representation.get("__typename")
    kind = _ENTITIES.get(typename) if isinstance(typename, str) else None
    if kind is None:
        known = ", ".join(f"`{name}`" for name in _ENTITIES)
        return BadUserInput(
            f"Representation {index} has `__typename` {_shown(typename)}; this subgraph's "
            f"entities are {known}.", field=[*where, "__typename"],
        )
    id = representation.get("id")
    if not isinstance(id, str):
        return BadUserInput(
            f"Representation {index} ({typename}) needs its key, a string `id` "
            f"(`@key(fields: \"id\")`); it has {_shown(id)}.", field=[*where, "id"],
        )
    if kind_of(id) is not kind:  # malformed, or another type's id: names no such entity
        return None
    return cast("Entity | None", await load_node(info, id))  # of `kind`: checked above


def _shown(value: Any) -> str:
    """A value of the request in an error message, briefly (what it is, not all of it)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return f"`{value[:40]}`" + ("…" if len(value) > 40 else "")
    return f"a value of type {type(value).__name__}"


def public_sdl(schema: GraphQLSchema) -> str:
    """The schema as clients see it (schema.graphql): without what federation adds, the
    `_service` and `_entities` fields and their types, and without directives. Printed as
    Strawberry prints a schema without them: the types by name, graphql-core's printer."""
    printed = []
    for name in sorted(schema.type_map):
        type_ = schema.type_map[name]
        if not is_defined_type(type_) or _is_federation_type(name):
            continue
        printed.append(print_type(_without_federation_fields(type_, schema)))
    return "\n\n".join(printed)


def _without_federation_fields(type_: GraphQLNamedType, schema: GraphQLSchema
                               ) -> GraphQLNamedType:
    if type_ is not schema.query_type or not isinstance(type_, GraphQLObjectType):
        return type_
    return GraphQLObjectType(
        type_.name,
        {name: field for name, field in type_.fields.items() if name not in FEDERATION_FIELDS},
        interfaces=type_.interfaces,
        description=type_.description,
    )
