"""A compiled executor for queries and mutations.

graphql-core's executor walks every field of every object through generic machinery (about
ten microseconds a field here); a page of 20 consumers with their audiences and orders is
some 600 fields. For a query operation this module compiles the selection once per
document (cached) into plans: each object's selection written out as one Python function
(its scalar fields read and serialized in line), run against the very same resolvers
Strawberry installed on the schema, with the same arguments and infos (an info's
GraphQLResolveInfo made only when a resolver reads it). Sibling awaitables of a whole level
are gathered together, as graphql-core does, so DataLoaders still batch. A page's nodes that
select only leaves are read straight from the page's rows, with no object per node, where
the node type says what its `from_rows` does to each column (`row_columns`); and for the
HTTP answer (`wire`), a UTC datetime is left for the response's orjson.dumps to write.

It handles fields, aliases, merged selections, fragments (inline and named, on object and
abstract types), `__typename`, lists, non-null and abstract types. Anything else is left to
graphql-core: introspection, directives, middleware, and any operation whose execution
raises or meets a null where the schema forbids one. Those are executed again by
graphql-core from the start, so errors, their paths and null propagation are exactly
graphql-core's, and the second run reads nothing again: relations come from the
per-request DataLoaders, root pages and counts from `Loaders.once`, replayed (Loaders.replay)
so that each answer arrives in the turn of the event loop a cold run's would. The differential tests
run the same operations through both executors and compare. (One known difference: when a
non-null root field fails, graphql-core alone may cancel a sibling whose replayed read
then finishes first and reports its own error too; both answers are valid, see
tests/test_executor.py.)

Mutations run their root fields one after the other, as the spec wants, each resolved and
then completed before the next starts. A write must not run twice, and a payload must show
the state right after its own write, so when graphql-core has to take over, the root fields
already completed keep their answers and graphql-core runs only the rest, as an operation
of their own: the field that failed first, whose outcome (its value, or what it raised) the
resolvers `plan_mutations` installed replay instead of writing again, then the fields not
reached yet (if graphql-core runs them at all).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from functools import partial
from math import isfinite
from operator import attrgetter
from typing import Any, TypeGuard, cast

from graphql import (
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLAbstractType,
    GraphQLBoolean,
    GraphQLEnumType,
    GraphQLField,
    GraphQLFloat,
    GraphQLID,
    GraphQLInt,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLOutputType,
    GraphQLResolveInfo,
    GraphQLScalarType,
    GraphQLSchema,
    GraphQLString,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    execute,
    is_abstract_type,
)
from graphql.execution.values import VariableValues, get_argument_values, get_variable_values
from graphql.pyutils import Path
from graphql.type.definition import GraphQLResolveInfoHelpers
from strawberry.types.arguments import convert_arguments
from strawberry.types.field import StrawberryField
from strawberry.types.fields.resolver import StrawberryResolver
from strawberry.types.info import Info

from consumers_graphql.api.arguments import ArgumentsConverter, plan_arguments
from consumers_graphql.api.loaders import Loaders
from consumers_graphql.timestamps import format_datetime

_MAX_PLANS = 1000
_NO_VARIABLES = VariableValues(sources={}, coerced={})


class _Unsupported(Exception):
    """The operation uses something this executor leaves to graphql-core."""


class _Fallback(Exception):
    """Execution met something graphql-core must answer (an error, a null in a non-null)."""


def _is_awaitable(value: Any) -> TypeGuard[Awaitable[Any]]:
    return hasattr(value, "__await__")


async def _gather(values: Sequence[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*values))


async def _alone(awaitable: Awaitable[Any]) -> Any:
    """One pending value, awaited in the caller's task, as `settle`'s gather would settle it
    in a task of its own: what it raises sends the operation to graphql-core (_Fallback); a
    cancellation is the caller's own when its task is being cancelled, and passes."""
    try:
        return await awaitable
    except asyncio.CancelledError as cancelled:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise _Fallback("a resolver was cancelled") from cancelled
    except Exception as error:
        raise _Fallback("a resolver raised") from error


def _track(_values: Sequence[Any]) -> None:
    return None


_HELPERS = GraphQLResolveInfoHelpers(gather=_gather, track=_track)


# --- plans -----------------------------------------------------------------------------------

Completer = Callable[[Any, "_Run", Path], Any]
# A list of leaf-only records answered from rows: (the rows, their column names) -> the
# records, or None when the rows lack a column (the objects are made then)
RowsCompleter = Callable[[Sequence[Any], tuple[str, ...]], list[dict[str, Any]] | None]


@dataclass
class _FieldPlan:
    key: str
    name: str
    definition: GraphQLField | None  # None for __typename
    nodes: list[FieldNode]
    parent: GraphQLObjectType
    basic: bool  # Strawberry's plain attribute read: needs no info and no arguments
    read: Callable[[Any], Any] | None  # that read, without Strawberry's wrapper
    static_args: dict[str, Any] | None  # coerced once when no variable is involved
    complete: Completer = field(repr=False, default=lambda value, run, path: value)
    # For a Strawberry resolver with nothing wrapped around it: its call, with arguments
    # converted to Python once per plan (see _direct_call).
    call: Call | None = None
    # For an attribute read of a scalar or enum (most fields): its type, and whether null is
    # refused. Such a field is answered in the object's written-out function (_written),
    # without a Path or a completer call.
    leaf: GraphQLScalarType | GraphQLEnumType | None = None
    required: bool = False
    # A DateTime leaf of a plan for the wire (see execute_compiled): a UTC datetime is left
    # as it is, for the response's orjson.dumps to write
    as_is: bool = False
    # An attribute read whose completion needs no Path (a list of leaf-only records: a
    # page's `nodes`): completed in the object's written-out function too.
    pathless: bool = False
    # For such a list that the object can hand over as the rows its items would be made
    # from (a Connection's `nodes` not made yet, see _rows_source): the records read
    # straight from the rows, without an object per item (_row_records).
    from_rows: RowsCompleter | None = None


# What a direct call (_direct_call) is given for its resolver's info: graphql-core's (a
# NamedTuple), or, from the compiled executor, what makes it when read: a plain tuple of
# the run, the field's plan and its path
RawInfo = GraphQLResolveInfo[Any] | tuple["_Run", _FieldPlan, Path]
Call = Callable[[Any, RawInfo, dict[str, Any]], Any]


class _CompiledInfo(Info[Any, Any]):
    """Strawberry's Info for a resolver the compiled executor calls directly: its context
    at hand, and graphql-core's GraphQLResolveInfo made only when something reads it (most
    resolvers read only the context; a page of 20 calls each relation's resolver 20 times)."""

    def __init__(self, run: _Run, plan: _FieldPlan, path: Path,
                 field: StrawberryField) -> None:
        self._run, self._plan, self._path, self._field = run, plan, path, field

    @property
    def context(self) -> Any:
        return self._run.context

    def __getattr__(self, name: str) -> Any:
        if name != "_raw_info":  # the one attribute not set at once
            raise AttributeError(name)
        raw = self._raw_info = self._run.info(self._plan, self._path)
        return raw


# An object's selection answered: (the run, the object, its path) -> its response object
Fields = Callable[["_Run", Any, Path | None], dict[str, Any]]


@dataclass
class _Plan:
    operation: OperationDefinitionNode
    fragments: dict[str, FragmentDefinitionNode]
    root_type: GraphQLObjectType
    fields: list[_FieldPlan]
    answer: Fields = field(init=False)

    def __post_init__(self) -> None:
        self.answer = _object_fields(self.fields)


class _Compiler:
    def __init__(self, schema: GraphQLSchema, document: DocumentNode,
                 operation: OperationDefinitionNode, *, wire: bool = False) -> None:
        self.schema = schema
        self.operation = operation
        self.wire = wire
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        self.pathless: set[Completer] = set()  # completers that never read their path
        # records completers whose items can be read from rows: their row variant
        self.from_rows: dict[Completer, RowsCompleter] = {}

    def plan(self) -> _Plan:
        mutation = self.operation.operation is OperationType.MUTATION
        root = self.schema.mutation_type if mutation else self.schema.query_type
        if root is None:
            raise _Unsupported("no root type")
        if self.operation.directives:
            raise _Unsupported("directives")
        if mutation and not all(isinstance(selection, FieldNode)
                                for selection in self.operation.selection_set.selections):
            raise _Unsupported("fragments at a mutation's root")  # see _Run.remaining
        fields = self.fields(root, [self.operation.selection_set])
        if mutation and not all(plan.definition is None or _replays(plan.definition)
                                for plan in fields):
            raise _Unsupported("a mutation whose outcome cannot be replayed")
        return _Plan(self.operation, self.fragments, root, fields)

    def _applies(self, condition: str | None, object_type: GraphQLObjectType) -> bool:
        if condition is None or condition == object_type.name:
            return True
        conditional = self.schema.get_type(condition)
        return is_abstract_type(conditional) and self.schema.is_sub_type(
            conditional, object_type
        )

    def _collect(
        self, object_type: GraphQLObjectType, selection_sets: Sequence[SelectionSetNode],
        into: OrderedDict[str, list[FieldNode]], seen_fragments: set[str],
    ) -> None:
        for selection_set in selection_sets:
            for selection in selection_set.selections:
                if selection.directives:
                    raise _Unsupported("directives")
                if isinstance(selection, FieldNode):
                    key = selection.alias.value if selection.alias else selection.name.value
                    into.setdefault(key, []).append(selection)
                elif isinstance(selection, InlineFragmentNode):
                    condition = selection.type_condition
                    if self._applies(condition.name.value if condition else None, object_type):
                        self._collect(object_type, [selection.selection_set], into,
                                      seen_fragments)
                elif isinstance(selection, FragmentSpreadNode):
                    name = selection.name.value
                    fragment = self.fragments.get(name)
                    if fragment is None:
                        raise _Unsupported("unknown fragment")
                    if name in seen_fragments:
                        continue
                    if self._applies(fragment.type_condition.name.value, object_type):
                        self._collect(object_type, [fragment.selection_set], into,
                                      seen_fragments | {name})
                else:  # pragma: no cover - the language has no other selection
                    raise _Unsupported("selection")

    def fields(
        self, object_type: GraphQLObjectType, selection_sets: Sequence[SelectionSetNode]
    ) -> list[_FieldPlan]:
        collected: OrderedDict[str, list[FieldNode]] = OrderedDict()
        self._collect(object_type, selection_sets, collected, set())
        plans = []
        for key, nodes in collected.items():
            name = nodes[0].name.value
            if name == "__typename":
                plans.append(_FieldPlan(key, name, None, nodes, object_type, True, None, None,
                                        _typename(object_type.name)))
                continue
            if name.startswith("__"):
                raise _Unsupported("introspection")
            definition = object_type.fields.get(name)
            if definition is None or definition.resolve is None:
                raise _Unsupported("field without a resolver")
            basic = bool(getattr(definition.resolve, "_is_default", False))
            static_args = self._static_arguments(definition, nodes[0])
            sub_sets = [n.selection_set for n in nodes if n.selection_set is not None]
            read = _reader(definition, basic)
            plan = _FieldPlan(key, name, definition, nodes, object_type,
                              basic and not nodes[0].arguments, read, static_args,
                              self.completer(definition.type, sub_sets),
                              _direct_call(self.schema, definition, static_args))
            leaf_type = definition.type
            plan.required = isinstance(leaf_type, GraphQLNonNull)
            if plan.required:
                leaf_type = leaf_type.of_type
            if read is not None and plan.basic and isinstance(
                    leaf_type, GraphQLScalarType | GraphQLEnumType):
                plan.leaf = leaf_type
                plan.as_is = self.wire and leaf_type.serialize is format_datetime
            plan.pathless = read is not None and plan.basic and plan.complete in self.pathless
            if plan.pathless and _rows_source(object_type, definition):
                plan.from_rows = self.from_rows.get(plan.complete)
            plans.append(plan)
        return plans

    def _static_arguments(self, definition: GraphQLField, node: FieldNode) -> dict[str, Any] | None:
        if not definition.args:
            return {}
        if any(reads_variable(argument.value) for argument in node.arguments or ()):
            return None
        return get_argument_values(definition, node, _NO_VARIABLES)

    def completer(
        self, return_type: GraphQLOutputType, sub_sets: list[SelectionSetNode],
        plans: list[_FieldPlan] | None = None,
    ) -> Completer:
        """`plans`: the object type's field plans, when the caller has made them already
        (each selection is compiled once: a list's items are planned before choosing how to
        complete them)."""
        if isinstance(return_type, GraphQLNonNull):
            inner = self.completer(return_type.of_type, sub_sets, plans)

            def non_null(value: Any, run: _Run, path: Path) -> Any:
                if value is None:
                    raise _Fallback("null in a non-null position")
                return inner(value, run, path)

            if inner in self.pathless:
                self.pathless.add(non_null)
            if inner in self.from_rows:  # (rows are never null)
                self.from_rows[non_null] = self.from_rows[inner]
            return non_null
        if isinstance(return_type, GraphQLList):
            item_type = return_type.of_type
            object_type = (item_type.of_type if isinstance(item_type, GraphQLNonNull)
                           else item_type)
            item_plans = None
            if isinstance(object_type, GraphQLObjectType):
                item_plans = self.fields(object_type, sub_sets)
                if all(plan.leaf is not None for plan in item_plans):
                    records = _records(item_plans,
                                       required_items=isinstance(item_type, GraphQLNonNull))
                    self.pathless.add(records)
                    from_rows = _row_records(object_type, item_plans)
                    if from_rows is not None:
                        self.from_rows[records] = from_rows
                    return records
            item = self.completer(item_type, sub_sets, item_plans)

            def list_of(value: Any, run: _Run, path: Path) -> Any:
                if value is None:
                    return None
                return [item(v, run, Path(path, i, None)) for i, v in enumerate(value)]

            return list_of
        if isinstance(return_type, GraphQLScalarType | GraphQLEnumType):
            serialize = _serializer(return_type)

            def leaf(value: Any, _run: _Run, _path: Path) -> Any:
                return None if value is None else serialize(value)

            return leaf
        if isinstance(return_type, GraphQLObjectType):
            answer = _object_fields(
                plans if plans is not None else self.fields(return_type, sub_sets))

            def object_value(value: Any, run: _Run, path: Path) -> Any:
                if value is None:
                    return None
                return answer(run, value, path)

            return object_value
        if isinstance(return_type, GraphQLAbstractType):
            by_type: dict[str, Fields] = {}
            for possible in self.schema.get_possible_types(return_type):
                by_type[possible.name] = _object_fields(self.fields(possible, sub_sets))

            def abstract_value(value: Any, run: _Run, path: Path) -> Any:
                if value is None:
                    return None
                definition = getattr(type(value), "__strawberry_definition__", None)
                answer = by_type.get(getattr(definition, "name", None) or "")
                if answer is None:
                    raise _Fallback("unknown runtime type")
                return answer(run, value, path)

            return abstract_value
        raise _Unsupported("output type")


def _records(plans: list[_FieldPlan], *, required_items: bool) -> Completer:
    """A list of objects whose selected fields are all attribute reads of scalars (a page's
    nodes, most often): each item answered in one loop, with no Path (nothing below it
    resolves) and no completer call per item or per field."""
    namespace: dict[str, Any] = {}
    lines = ["def records(value, _run, _path):",
             "    if value is None:",
             "        return None",
             "    out = []",
             "    append = out.append",
             "    for item in value:",
             "        if item is None:",
             "            raise Fallback('null in a non-null position')" if required_items
             else "            append(None)\n            continue"]
    for index, plan in enumerate(plans):
        lines.extend(_leaf_lines(plan, index, "item", namespace, indent=8))
    record = ", ".join(f"{plan.key!r}: v{index}" for index, plan in enumerate(plans))
    lines += [f"        append({{{record}}})", "    return out"]
    return cast(Completer, _written("\n".join(lines), "records", namespace))


def _object_fields(plans: list[_FieldPlan]) -> Fields:
    """What an object's selection answers, as one function written out for the plan: each
    leaf read and serialized in line, each other field handed to `_Run.field`."""
    namespace: dict[str, Any] = {}
    lines = ["def fields(run, source, path):", "    out = {}"]
    for index, plan in enumerate(plans):
        if plan.leaf is not None:
            lines.extend(_leaf_lines(plan, index, "source", namespace, indent=4))
            lines.append(f"    out[{plan.key!r}] = v{index}")
        elif plan.definition is None:  # __typename
            lines.append(f"    out[{plan.key!r}] = {plan.parent.name!r}")
        elif plan.pathless:  # an attribute's list of records (anything else raises, and
            # graphql-core answers the operation)
            namespace[f"r{index}"], namespace[f"c{index}"] = plan.read, plan.complete
            answer = f"c{index}(r{index}(source), run, None)"
            if plan.from_rows is not None:  # from the rows, when the object hands them over
                namespace[f"f{index}"] = plan.from_rows
                lines += ["    rows = source.unmade_nodes()",
                          f"    v{index} = f{index}(*rows) if rows is not None else None",
                          f"    out[{plan.key!r}] = {answer} if v{index} is None else v{index}"]
            else:
                lines.append(f"    out[{plan.key!r}] = {answer}")
        else:
            namespace[f"p{index}"] = plan
            lines.append(f"    run.field(p{index}, source, path, out)")
    lines.append("    return out")
    return cast(Fields, _written("\n".join(lines), "fields", namespace))


def _row_records(object_type: GraphQLObjectType, plans: list[_FieldPlan]
                 ) -> RowsCompleter | None:
    """For leaf-only records of a type whose objects are made from rows (a class attribute
    `row_columns`: each field's column, read under the field's own name, and the conversion
    its `from_rows` applies, None for none): the records read straight from rows of one
    statement, each column found by its position among the rows' column names, once per
    set of column names. None for any other type, or a field it does not list."""
    columns: dict[str, Callable[[Any], Any] | None] | None = getattr(
        getattr(strawberry_definition(object_type), "origin", None), "row_columns", None)
    names = [_python_name(plan) for plan in plans]
    if columns is None or not all(name is not None and name in columns for name in names):
        return None
    namespace: dict[str, Any] = {"positions": {}, "names": tuple(names)}
    lines = ["def records(rows, fields):",
             "    at = positions.get(fields)",
             "    if at is None:",
             "        if not all(name in fields for name in names):",
             "            return None",
             "        at = tuple(map(fields.index, names))",
             "        if len(positions) < 64:  # one per statement shape: a handful",
             "            positions[fields] = at",
             f"    {', '.join(f'a{index}' for index in range(len(plans)))}, = at",
             "    out = []",
             "    append = out.append",
             "    for item in rows:"]
    for index, (plan, name) in enumerate(zip(plans, names, strict=True)):
        convert = columns[name]  # type: ignore[index]  # (every name checked above)
        if convert is None:
            lines.extend(_leaf_lines(plan, index, "item", namespace, indent=8,
                                     read=f"item[a{index}]"))
            continue
        namespace[f"k{index}"] = convert
        lines += [f"        v{index} = item[a{index}]",
                  f"        if v{index} is not None:",
                  f"            v{index} = k{index}(v{index})"]
        lines.extend(_leaf_lines(plan, index, "item", namespace, indent=8, assigned=True))
    record = ", ".join(f"{plan.key!r}: v{index}" for index, plan in enumerate(plans))
    lines += [f"        append({{{record}}})", "    return out"]
    return cast(RowsCompleter, _written("\n".join(lines), "records", namespace))


def strawberry_definition(element: GraphQLField | GraphQLObjectType | None) -> Any:
    """What Strawberry made this GraphQL field or type from (its StrawberryField or type
    definition, in the element's `extensions`), None for none (`__typename`, a type of
    graphql-core's own)."""
    return (None if element is None
            else (element.extensions or {}).get("strawberry-definition"))


def _python_name(plan: _FieldPlan) -> str | None:
    return getattr(strawberry_definition(plan.definition), "python_name", None)


def _rows_source(object_type: GraphQLObjectType, definition: GraphQLField) -> bool:
    """Whether objects of this type can hand over the rows this field's items are made
    from: the field is `nodes` and the class has `unmade_nodes` (api/types.py: Connection)."""
    strawberry_type = strawberry_definition(object_type)
    return (getattr(strawberry_definition(definition), "python_name", None) == "nodes"
            and callable(getattr(getattr(strawberry_type, "origin", None), "unmade_nodes",
                                 None)))


def _leaf_lines(plan: _FieldPlan, index: int, source: str, namespace: dict[str, Any], *,
                indent: int, read: str | None = None, assigned: bool = False) -> list[str]:
    """Lines that leave in `v<index>` the serialized value (see _serialized) of a leaf
    plan read from `source` (or by the expression `read`, or already in `v<index>` when
    `assigned`), null refused where the schema refuses it."""
    assert plan.leaf is not None and plan.read is not None
    value, serialize = f"v{index}", f"s{index}"
    namespace[serialize] = plan.leaf.serialize
    expression = _serialized(plan.leaf, value, serialize)
    if plan.as_is:
        expression = (f"{value} if type({value}) is datetime and {value}.tzinfo is UTC "
                      f"else {expression}")
    pad = " " * indent
    lines = []
    if read is None:
        namespace[f"r{index}"] = plan.read
        read = f"r{index}({source})"
    if not assigned:
        lines.append(f"{pad}{value} = {read}")
    lines += [f"{pad}if {value} is not None:",
              f"{pad}    {value} = {expression}"]
    if plan.required:
        lines += [f"{pad}else:", f"{pad}    raise Fallback('null in a non-null position')"]
    return lines


def _written(source: str, name: str, namespace: dict[str, Any]) -> Any:
    """The function `name` defined by `source`, with `namespace` as its globals (the plan's
    reads, serializers and field plans; response keys are GraphQL names, written as string
    literals). Written once per plan, as graphql-jit and dataclasses write theirs: a loop
    over the fields, per object and per field, costs more than the fields' own work."""
    namespace.update(Fallback=_Fallback, isfinite=isfinite, datetime=datetime, UTC=UTC)
    exec(compile(source, f"<compiled plan: {name}>", "exec"), namespace)
    return namespace[name]


def _reader(definition: GraphQLField, basic: bool) -> Callable[[Any], Any] | None:
    """For a basic Strawberry field using the default resolver (getattr), the attribute read
    itself: what Strawberry's `get_result` would do, minus two calls."""
    strawberry_field = strawberry_definition(definition)
    if not basic or strawberry_field is None or strawberry_field.base_resolver is not None:
        return None
    if strawberry_field.default_resolver is not getattr:
        return None
    return attrgetter(strawberry_field.python_name)


_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _serializer(leaf_type: GraphQLScalarType | GraphQLEnumType) -> Callable[[Any], Any]:
    """The type's serialize, short-cut as in _serialized (a leaf not read as an attribute:
    a resolver's value, a list's items)."""
    if _serialized(leaf_type, "value", "serialize") == "serialize(value)":
        return leaf_type.serialize
    return cast(Callable[[Any], Any], _written(
        f"def serializer(value):\n    return {_serialized(leaf_type, 'value', 'serialize')}",
        "serializer", {"serialize": leaf_type.serialize}))


def _serialized(leaf_type: GraphQLScalarType | GraphQLEnumType, value: str, serialize: str
                ) -> str:
    """The expression that serializes `value` with the type's `serialize`, short-cut where
    the value is already what it would return: a str for String and ID, an int in range for
    Int, a finite float, a bool."""
    if leaf_type is GraphQLString or leaf_type is GraphQLID:
        return f"{value} if type({value}) is str else {serialize}({value})"
    if leaf_type is GraphQLInt:
        return (f"{value} if type({value}) is int and {_INT_MIN} <= {value} <= {_INT_MAX}"
                f" else {serialize}({value})")
    if leaf_type is GraphQLFloat:
        return f"{value} if type({value}) is float and isfinite({value}) else {serialize}({value})"
    if leaf_type is GraphQLBoolean:
        return f"{value} if type({value}) is bool else {serialize}({value})"
    return f"{serialize}({value})"


_IMMUTABLE = (str, int, float, bool, Enum, datetime, type(None))


def _direct_call(
    schema: GraphQLSchema, definition: GraphQLField, static_args: dict[str, Any] | None
) -> Call | None:
    """What Strawberry's resolver wrapper does for a field without extensions (convert the
    arguments, add `self` and `info`, call): with the conversion done once when the
    arguments are literals of immutable values, else by the field's conversion plan
    (api/arguments.py). None where anything else applies."""
    strawberry_schema = getattr(schema, "_strawberry_schema", None)
    strawberry_field = strawberry_definition(definition)
    if strawberry_schema is None or strawberry_field is None:
        return None
    resolver = strawberry_field.base_resolver
    config = strawberry_schema.config
    if (resolver is None or strawberry_field.extensions or resolver.parent_parameter
            or resolver.root_parameter or config.info_class is not Info):
        return None
    registry = strawberry_schema.schema_converter.scalar_registry
    arguments: ArgumentsConverter | None = None
    if static_args is not None:
        converted = convert_arguments(static_args, strawberry_field.arguments,
                                      scalar_registry=registry, config=config)
        if all(isinstance(value, _IMMUTABLE) for value in converted.values()):
            arguments = lambda _args: dict(converted)  # noqa: E731
    if arguments is None:
        arguments = plan_arguments(strawberry_field, registry, config)
        if arguments is None:
            return None
    info_name = resolver.info_parameter.name if resolver.info_parameter else None
    with_self = resolver.self_parameter is not None
    function = resolver.wrapped_func
    if (type(strawberry_field).get_result is not StrawberryField.get_result
            or type(resolver).__call__ is not StrawberryResolver.__call__
            or not callable(function)):
        function = None

    def call(source: Any, info: RawInfo, args: dict[str, Any]) -> Any:
        if type(info) is tuple:  # the compiled executor's (graphql-core's is a NamedTuple)
            strawberry_info: Info[Any, Any] = _CompiledInfo(
                *cast("tuple[_Run, _FieldPlan, Path]", info), strawberry_field)
        else:
            strawberry_info = Info(_raw_info=cast("GraphQLResolveInfo[Any]", info),
                                   _field=strawberry_field)
        kwargs = arguments(args)
        if info_name is not None:
            kwargs[info_name] = strawberry_info
        if function is not None:  # what get_result and the resolver's __call__ come to
            return function(source, **kwargs) if with_self else function(**kwargs)
        return strawberry_field.get_result(
            source, strawberry_info, [source] if with_self else [], kwargs
        )

    return call


# The outcome (its value, or what it raised) of the root field a compiled mutation stopped
# at, by response key, while graphql-core runs the rest of the operation (execute_compiled).
_replay: ContextVar[dict[str, Any] | None] = ContextVar("replay", default=None)


def plan_mutations(schema: GraphQLSchema) -> None:
    """Gives mutation resolvers the direct call, so that graphql-core, too, converts their
    arguments by plan (a 500-item batch input is most of that cost), and the replay of an
    outcome the compiled executor already has."""
    mutation = schema.mutation_type
    for definition in (mutation.fields.values() if mutation is not None else ()):
        call = _direct_call(schema, definition, None)
        if call is not None:
            definition.resolve = partial(_resolve_with, call)


def _resolve_with(call: Call,
                  source: Any, info: GraphQLResolveInfo[Any], **args: Any) -> Any:
    outcomes = _replay.get()
    if outcomes is not None and info.path.prev is None and info.path.key in outcomes:
        outcome = outcomes.pop(info.path.key)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return call(source, info, args)


def _replays(definition: GraphQLField) -> bool:
    resolve = definition.resolve
    return isinstance(resolve, partial) and resolve.func is _resolve_with


def _typename(name: str) -> Completer:
    return lambda _value, _run, _path: name


def reads_variable(node: Any) -> bool:
    """Whether an argument's value (a literal, a list, an object) holds a variable."""
    kind = getattr(node, "kind", "")
    if kind == "variable":
        return True
    if kind == "list_value":
        return any(reads_variable(v) for v in node.values)
    if kind == "object_value":
        return any(reads_variable(f.value) for f in node.fields)
    return False


# --- running ---------------------------------------------------------------------------------


class _Run:
    def __init__(self, plan: _Plan, schema: GraphQLSchema, root_value: Any, context: Any,
                 variables: VariableValues) -> None:
        self.plan = plan
        self.schema = schema
        self.root_value = root_value
        self.context = context
        self.variables = variables
        self.pending: list[tuple[Any, Callable[[Any], None]]] = []
        # A mutation: the answers of the root fields completed, by response key, and the
        # outcome of the one being run.
        self.done: dict[str, Any] = {}
        self.outcomes: dict[str, Any] = {}

    def field(self, plan: _FieldPlan, source: Any, path: Path | None,
              out: dict[str, Any]) -> None:
        """A field that is not a leaf (see _object_fields): resolved, then completed at once
        or, when its value is awaited, once the level's awaitables are settled."""
        field_path = Path(path, plan.key, plan.parent.name)
        value = self.resolve(plan, source, field_path)
        if _is_awaitable(value):
            out[plan.key] = None
            self.pending.append((value, _filler(out, plan, self, field_path)))
        else:
            out[plan.key] = plan.complete(value, self, field_path)

    def resolve(self, plan: _FieldPlan, source: Any, field_path: Path) -> Any:
        assert plan.definition is not None and plan.definition.resolve is not None
        if plan.read is not None:
            return plan.read(source)
        if plan.basic:
            return plan.definition.resolve(source, None)
        args = plan.static_args
        if args is None:
            args = get_argument_values(plan.definition, plan.nodes[0], self.variables)
        if plan.call is not None:  # the info made only if the resolver reads it
            return plan.call(source, (self, plan, field_path), args)
        return plan.definition.resolve(source, self.info(plan, field_path), **args)

    def info(self, plan: _FieldPlan, field_path: Path) -> GraphQLResolveInfo[Any]:
        assert plan.definition is not None
        return GraphQLResolveInfo(
            plan.name, plan.nodes, plan.definition.type, plan.parent, field_path,
            self.schema, self.plan.fragments, self.root_value, self.plan.operation,
            self.variables, self.context, _is_awaitable, None, _HELPERS,
        )

    async def mutate(self) -> dict[str, Any]:
        """The root fields one after the other, each resolved once and completed before
        the next (see `remaining` for what happens when one fails)."""
        for plan in self.plan.fields:
            path = Path(None, plan.key, plan.parent.name)
            if plan.definition is None:  # __typename
                self.done[plan.key] = plan.complete(self.root_value, self, path)
                continue
            try:
                value = self.resolve(plan, self.root_value, path)
                if _is_awaitable(value):
                    value = await value
            except Exception as error:
                self.outcomes = {plan.key: error}
                raise _Fallback("a mutation raised") from error
            self.outcomes = {plan.key: value}
            answer = plan.complete(value, self, path)
            await self.settle()
            self.done[plan.key] = answer
            self.outcomes = {}
        return self.done

    def remaining(self, document: DocumentNode) -> DocumentNode:
        """The operation without the root fields already done (the compiler left
        mutations with fragments at the root to graphql-core), with the fragments."""
        operation = self.plan.operation
        selections = tuple(
            s for s in operation.selection_set.selections
            if isinstance(s, FieldNode) and (s.alias or s.name).value not in self.done
        )
        rest = OperationDefinitionNode(
            operation=operation.operation, name=operation.name,
            variable_definitions=operation.variable_definitions, directives=(),
            selection_set=SelectionSetNode(selections=selections),
        )
        return DocumentNode(definitions=(rest, *(
            d for d in document.definitions if isinstance(d, FragmentDefinitionNode))))

    async def settle(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            if len(batch) == 1:  # (a root field, a W2 look-up): awaited here, no task
                (awaitable, fill), = batch
                fill(await _alone(awaitable))
                continue
            results = await asyncio.gather(*(a for a, _ in batch), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise _Fallback("a resolver raised") from result
            for (_, fill), result in zip(batch, results, strict=True):
                fill(result)

    def abandon(self) -> None:
        for awaitable, _ in self.pending:
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
        self.pending = []


def _filler(out: dict[str, Any], plan: _FieldPlan, run: _Run, path: Path) -> Callable[[Any], None]:
    def fill(value: Any) -> None:
        out[plan.key] = plan.complete(value, run, path)

    return fill


# --- the entry point -------------------------------------------------------------------------

_plans: OrderedDict[tuple[int, str, str | None, bool], _Plan | None] = OrderedDict()
stats = {"compiled": 0, "fallbacks": 0}


def find_operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    """The operation a request names: the only one when it names none (None when the
    document holds several), None when the document holds no operation of that name."""
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        return operations[0] if len(operations) == 1 else None
    return next((o for o in operations if o.name and o.name.value == name), None)


def _plan_for(schema: GraphQLSchema, document: DocumentNode, name: str | None, *,
              wire: bool = False) -> _Plan | None:
    if document.loc is None:
        return None
    key = (id(schema), document.loc.source.body, name, wire)
    if key in _plans:
        _plans.move_to_end(key)
        return _plans[key]
    operation = find_operation(document, name)
    plan = None
    if operation is not None and operation.operation is not OperationType.SUBSCRIPTION:
        try:
            plan = _Compiler(schema, document, operation, wire=wire).plan()
        except _Unsupported:
            plan = None
    _plans[key] = plan
    if len(_plans) > _MAX_PLANS:
        _plans.popitem(last=False)
    return plan


async def execute_compiled(
    schema: GraphQLSchema,
    document: DocumentNode,
    root_value: Any = None,
    context_value: Any = None,
    variable_values: dict[str, Any] | None = None,
    operation_name: str | None = None,
    middleware: Any = None,
    *,
    wire: bool = False,
    **kwargs: Any,
) -> ExecutionResult:
    """graphql-core's `execute`, through a compiled plan where the operation allows one.

    `wire`: the caller writes the data with orjson's OPT_UTC_Z (api/http.py), so a UTC
    datetime read as an attribute is left in the data as it is: orjson writes the same text
    as the DateTime scalar's format_datetime (which is that same orjson call), without a
    call and a string per value (a page of 20 has over a hundred)."""

    async def standard(operations: DocumentNode = document) -> ExecutionResult:
        stats["fallbacks"] += 1
        result = execute(schema, operations, root_value=root_value,
                         context_value=context_value, variable_values=variable_values,
                         operation_name=operation_name, middleware=middleware, **kwargs)
        return await result if _is_awaitable(result) else cast(ExecutionResult, result)

    if middleware and list(getattr(middleware, "middlewares", None) or ()):
        return await standard()
    plan = _plan_for(schema, document, operation_name, wire=wire)
    if plan is None:
        return await standard()
    variables = get_variable_values(
        schema, plan.operation.variable_definitions or (), variable_values or {}
    )
    if not isinstance(variables, VariableValues):
        return await standard()  # coercion errors: graphql-core reports them
    run = _Run(plan, schema, root_value, context_value, variables)
    try:
        if plan.operation.operation is OperationType.MUTATION:
            data = await run.mutate()
        else:
            data = plan.answer(run, root_value, None)
            await run.settle()
    except (_Fallback, Exception):
        run.abandon()
        loaders = getattr(context_value, "loaders", None)
        if isinstance(loaders, Loaders):  # graphql-core's turns of the loop, not warm caches
            loaders.replay()
        if plan.operation.operation is not OperationType.MUTATION:
            return await standard()
        replaying = _replay.set(run.outcomes)
        try:
            rest = await standard(run.remaining(document))
        finally:
            _replay.reset(replaying)
        if rest.data is None:  # a non-null root field failed: null for the whole data
            return rest
        return ExecutionResult(data={**run.done, **rest.data}, errors=rest.errors)
    stats["compiled"] += 1
    return ExecutionResult(data=data, errors=None)
