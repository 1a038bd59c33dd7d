"""Look-ahead for the relation connections of a page.

A page's resolver reads, from the query, which relation connections its nodes select (with
which arguments) and loads them for the whole page at once through the same per-request
DataLoaders, before GraphQL descends into the nodes. The nodes' connection resolvers then
answer synchronously from what was loaded. Anything the look-ahead does not recognise
(a directive, an argument that fails to coerce) simply is not prefetched: the resolver then
loads it itself, through the DataLoader, with the same result and the same statement count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLObjectType,
    InlineFragmentNode,
    SelectionSetNode,
)
from graphql.execution.values import VariableValues, get_argument_values
from sqlalchemy.engine import Row

from consumers_graphql.errors import DomainError
from consumers_graphql.store.pagination import Page, PageRequest, SortKey, page_request

PageLoad = Callable[[PageRequest], Any]  # request -> DataLoader of pages by parent id
Prefetched = dict[tuple[str, PageRequest], Page[Row[Any]]]


def _fields(
    selection_set: SelectionSetNode | None, fragments: dict[str, Any]
) -> Iterator[FieldNode]:
    """Field nodes of a selection set, fragments flattened; fields under a directive are
    left out (they may be skipped)."""
    for selection in selection_set.selections if selection_set else ():
        if selection.directives:
            continue
        if isinstance(selection, FieldNode):
            yield selection
        elif isinstance(selection, InlineFragmentNode):
            yield from _fields(selection.selection_set, fragments)
        elif isinstance(selection, FragmentSpreadNode):
            fragment = fragments.get(selection.name.value)
            if fragment is not None:
                yield from _fields(fragment.selection_set, fragments)


def _node_selections(info: Any) -> Iterator[FieldNode]:
    """The fields selected on the nodes of the connection being resolved: under `nodes` and
    under `edges { node }`."""
    fragments = info.fragments
    for connection_node in info.field_nodes:
        for field in _fields(connection_node.selection_set, fragments):
            if field.name.value == "nodes":
                yield from _fields(field.selection_set, fragments)
            elif field.name.value == "edges":
                for edge_field in _fields(field.selection_set, fragments):
                    if edge_field.name.value == "node":
                        yield from _fields(edge_field.selection_set, fragments)


def _variable_values(values: VariableValues | dict[str, Any]) -> VariableValues:
    """graphql-core's container of the coerced variables: the compiled executor passes it,
    Strawberry's execution context only the coerced dict (sources are read only for
    fragment variables, which the schema does not enable)."""
    if isinstance(values, VariableValues):
        return values
    return VariableValues(sources={}, coerced=values)


async def prefetch(
    info: Any,
    node_type: str,
    parent_ids: Sequence[str],
    relations: dict[str, tuple[SortKey, PageLoad]],
) -> dict[str, Prefetched]:
    """Load, for all `parent_ids`, every relation connection in `relations` that the query
    selects on `node_type`, once per distinct set of arguments."""
    if not parent_ids:
        return {}
    raw = info._raw_info  # graphql-core's ResolveInfo: the document and the variables
    variables = _variable_values(raw.variable_values)
    graphql_type = raw.schema.get_type(node_type)
    assert isinstance(graphql_type, GraphQLObjectType)
    wanted: dict[tuple[str, PageRequest], Awaitable[list[Page[Row[Any]]]]] = {}
    for field in _node_selections(raw):
        name = field.name.value
        if name not in relations:
            continue
        sort, loader_for = relations[name]
        try:
            args = get_argument_values(graphql_type.fields[name], field, variables)
            request = page_request(
                sort, first=args.get("first"), after=args.get("after"),
                last=args.get("last"), before=args.get("before"),
            )
        except (DomainError, GraphQLError):
            continue  # the field's own resolver reports it, at its path
        key = (name, request)
        if key not in wanted:
            wanted[key] = loader_for(request).load_many(parent_ids)
    if not wanted:
        return {}
    results = await asyncio.gather(*wanted.values())
    prefetched: dict[str, Prefetched] = {parent: {} for parent in parent_ids}
    for key, pages in zip(wanted, results, strict=True):
        for parent, page in zip(parent_ids, pages, strict=True):
            prefetched[parent][key] = page
    return prefetched
