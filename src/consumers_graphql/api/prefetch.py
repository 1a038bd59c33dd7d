"""Look-ahead for the relation connections of a page.

A page's resolver reads, from the query, which relation connections its nodes select (with
which arguments) and loads them for the whole page at once through the same per-request
DataLoaders, before GraphQL descends into the nodes. The nodes' connection resolvers then
answer synchronously from what was loaded, found by the arguments they were given (the
look-ahead loads only arguments that make a valid request, so nothing is checked again).
Anything the look-ahead does not recognise (a directive, an argument that fails to coerce)
simply is not prefetched: the resolver then loads it itself, through the DataLoader, with
the same result and the same statement count.

A page loaded ahead reads, of its nodes' columns, only those the query selects (with the id
and the sort's, for cursors): the others come as NULL, neither sent nor decoded. A selection
that may read anything else (a field with a resolver, a directive between the connection
and the nodes' fields or in the relation's selection, a fragment it cannot find) reads
every column. Loaders are keyed by the columns too, so the same relation page reached in
one request from two places with different columns (two root connections, or one and
`consumer(id:)`) costs one statement more than when both read every column.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLObjectType,
    InlineFragmentNode,
    SelectionSetNode,
    get_named_type,
)
from graphql.execution.values import VariableValues, get_argument_values
from sqlalchemy.engine import Row

from consumers_graphql.api.executor import reads_variable, strawberry_definition
from consumers_graphql.errors import DomainError
from consumers_graphql.store.pagination import Page, PageRequest, SortKey, page_request

# (request, the nodes' columns read or None for all) -> DataLoader of pages by parent id
PageLoad = Callable[[PageRequest, frozenset[str] | None], Any]
# A relation field's name and its page arguments as given (first, after, last, before): the
# key its resolver looks its page up by, without checking the arguments again (only
# arguments that make a valid request are loaded ahead)
Given = tuple[str, int | None, str | None, int | None, str | None]
Prefetched = dict[Given, Page[Row[Any]]]


class Relation(NamedTuple):
    """A relation connection the look-ahead loads: its order, its loader, and its nodes'
    columns (a node field whose Python name is one of them reads that column, and only it)."""

    sort: SortKey
    loader: PageLoad
    columns: frozenset[str]


class _Unknown(Exception):
    """The selection may read more than its fields' columns."""


def _fields(
    selection_set: SelectionSetNode | None, fragments: dict[str, Any], *, strict: bool = False
) -> Iterator[FieldNode]:
    """Field nodes of a selection set, fragments flattened whatever their type condition (a
    superset). Fields under a directive are left out (they may be skipped); with `strict`,
    a directive, or a fragment not found, raises _Unknown instead."""
    for selection in selection_set.selections if selection_set else ():
        if selection.directives:
            if strict:
                raise _Unknown
            continue
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _fields(selection.selection_set, fragments, strict=strict)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is not None:
                yield from _fields(fragment.selection_set, fragments, strict=strict)
            elif strict:
                raise _Unknown


def _node_fields(
    connection_nodes: Iterable[FieldNode], fragments: dict[str, Any], *, strict: bool = False
) -> Iterator[FieldNode]:
    """The fields selected on the nodes of these connection fields: under `nodes` and under
    `edges { node }` (`strict` as in _fields)."""
    for connection_node in connection_nodes:
        for field in _fields(connection_node.selection_set, fragments, strict=strict):
            if field.name.value == "nodes":
                yield from _fields(field.selection_set, fragments, strict=strict)
            elif field.name.value == "edges":
                for edge_field in _fields(field.selection_set, fragments, strict=strict):
                    if edge_field.name.value == "node":
                        yield from _fields(edge_field.selection_set, fragments, strict=strict)


def _columns_read(connection: FieldNode, field: GraphQLField, relation: Relation,
                  fragments: dict[str, Any]) -> frozenset[str] | None:
    """The columns the nodes of this connection field read: their selected fields' (under
    `nodes` and `edges { node }`), None (all) when that cannot be known."""
    connection_type = get_named_type(field.type)
    assert isinstance(connection_type, GraphQLObjectType)
    node_type = get_named_type(connection_type.fields["nodes"].type)
    assert isinstance(node_type, GraphQLObjectType)
    read: set[str] = set()
    try:
        for node_field in _node_fields([connection], fragments, strict=True):
            if node_field.name.value == "__typename":
                continue
            strawberry_field = strawberry_definition(node_type.fields.get(node_field.name.value))
            if (strawberry_field is None or strawberry_field.base_resolver is not None
                    or strawberry_field.python_name not in relation.columns):
                return None
            read.add(strawberry_field.python_name)
    except _Unknown:
        return None
    return frozenset(read)


def _variable_values(values: VariableValues | dict[str, Any]) -> VariableValues:
    """graphql-core's container of the coerced variables: the compiled executor passes it,
    Strawberry's execution context only the coerced dict (sources are read only for
    fragment variables, which the schema does not enable)."""
    if isinstance(values, VariableValues):
        return values
    return VariableValues(sources={}, coerced=values)


# What the look-ahead loads for a connection field of a document, by the ids of its field
# nodes (kept in the value, so that no other node takes their ids while it is kept): worked
# out once when no relation argument reads a variable. Parsed documents are cached
# (api/limits.py), so a document sent again brings the same nodes.
Wanted = dict[tuple[str, PageRequest], frozenset[str] | None]
# each relation field's arguments as given, and the request they make
Requests = dict[Given, tuple[str, PageRequest]]
_wanted: dict[tuple[Any, ...], tuple[Sequence[FieldNode], Wanted, Requests]] = {}
_WANTED_MAX = 512


async def prefetch(
    info: Any,
    node_type: str,
    parent_ids: Sequence[str],
    relations: dict[str, Relation],
) -> dict[str, Prefetched]:
    """Load, for all `parent_ids`, every relation connection in `relations` that the query
    selects on `node_type`, once per distinct set of arguments, reading the columns that
    all its selections with those arguments read."""
    if not parent_ids:
        return {}
    raw = info._raw_info  # graphql-core's ResolveInfo: the document and the variables
    nodes_key = (id(raw.schema), node_type, *map(id, raw.field_nodes))
    found = _wanted.get(nodes_key)
    if found is not None:
        columns, requests = found[1], found[2]
    else:
        columns, requests, static = _selected(raw, node_type, relations)
        if static:
            if len(_wanted) >= _WANTED_MAX:
                _wanted.clear()
            _wanted[nodes_key] = (list(raw.field_nodes), columns, requests)
    if not columns:
        return {}
    wanted: dict[tuple[str, PageRequest], Awaitable[list[Page[Row[Any]]]]] = {
        key: relations[key[0]].loader(key[1], read).load_all(parent_ids)
        for key, read in columns.items()}
    results = dict(zip(wanted, await asyncio.gather(*wanted.values()), strict=True))
    prefetched: dict[str, Prefetched] = {parent: {} for parent in parent_ids}
    for given, key in requests.items():
        for parent, page in zip(parent_ids, results[key], strict=True):
            prefetched[parent][given] = page
    return prefetched


def _selected(raw: Any, node_type: str, relations: dict[str, Relation]
              ) -> tuple[Wanted, Requests, bool]:
    """The relation connections the query selects on `node_type` under these field nodes,
    by name and page request, with the columns all their selections read; the request each
    selection's arguments make; and whether that holds whatever the variables (no relation
    argument reads one)."""
    variables = _variable_values(raw.variable_values)
    graphql_type = raw.schema.get_type(node_type)
    assert isinstance(graphql_type, GraphQLObjectType)
    # A relation under a directive on the way to the nodes' fields is not prefetched, and
    # its resolver takes the page loaded for the others: that page must then read every
    # column. Without one (and with every fragment found), both walks find the same fields.
    try:
        node_fields = list(_node_fields(raw.field_nodes, raw.fragments, strict=True))
        narrow = True
    except _Unknown:
        node_fields = list(_node_fields(raw.field_nodes, raw.fragments))
        narrow = False
    columns: Wanted = {}
    requests: Requests = {}
    static = True
    for field in node_fields:
        name = field.name.value
        relation = relations.get(name)
        if relation is None:
            continue
        static = static and not any(reads_variable(argument.value)
                                    for argument in field.arguments or ())
        definition = graphql_type.fields[name]
        try:
            args = get_argument_values(definition, field, variables)
            given: Given = (name, args.get("first"), args.get("after"), args.get("last"),
                            args.get("before"))
            request = page_request(relation.sort, first=given[1], after=given[2],
                                   last=given[3], before=given[4])
        except (DomainError, GraphQLError):
            continue  # the field's own resolver reports it, at its path
        key = requests[given] = (name, request)
        read = _columns_read(field, definition, relation, raw.fragments) if narrow else None
        if key in columns:  # another selection of it: both are read
            before = columns[key]
            read = None if before is None or read is None else before | read
        columns[key] = read
    return columns, requests, static
