"""Limits measured on the document before an operation runs, and the process-wide cache
that makes them (and parsing and validation) free for an operation seen before.

Checked in this order, each refusal a request error with its own ``extensions.code`` and
nothing executed: tokens (while parsing), then directives, depth, aliases and duplicate
fields (on the document, before validation, so a hostile document never reaches the
validator's quadratic rules), then validation, then cost (which needs the variables).

Cost is the number of nodes the operation can return, as GitHub's node limit counts it:
every connection field costs its page size times the page sizes of all the connections
(and id lists) above it; the cost is the sum over every connection field in the operation.
The page size is ``first`` or ``last`` (variables as graphql-core coerces them for
execution, so ``100.0`` for an Int is 100; clamped to 0..MAX_PAGE_SIZE),
DEFAULT_PAGE_SIZE when neither is given; a field taking a list of ``ids`` (``nodes``) or
of ``representations`` (federation's ``_entities``) counts the length of that list.
Fragments count once per spread.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLList,
    GraphQLNamedType,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    ListTypeNode,
    ListValueNode,
    Node,
    NonNullTypeNode,
    NullValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    ValueNode,
    VariableDefinitionNode,
    VariableNode,
    get_named_type,
    parse,
    specified_rules,
    validate,
    value_from_ast_untyped,
)
from graphql.execution.values import VariableValues, get_variable_values
from graphql.language import Visitor, visit
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from strawberry.extensions import SchemaExtension
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.types.graphql import OperationType as StrawberryOperationType

from consumers_graphql.api.context import Context
from consumers_graphql.api.executor import find_operation
from consumers_graphql.domain.validation import BATCH_MAX
from consumers_graphql.settings import Settings
from consumers_graphql.store.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from consumers_graphql.web.rate_limit import MAX_COST_EXCEEDED as MAX_COST_EXCEEDED
from consumers_graphql.web.rate_limit import THROTTLED

MAX_DEPTH_EXCEEDED = "MAX_DEPTH_EXCEEDED"
MAX_ALIASES_EXCEEDED = "MAX_ALIASES_EXCEEDED"
MAX_TOKENS_EXCEEDED = "MAX_TOKENS_EXCEEDED"
MAX_DIRECTIVES_EXCEEDED = "MAX_DIRECTIVES_EXCEEDED"
MAX_DUPLICATE_FIELDS_EXCEEDED = "MAX_DUPLICATE_FIELDS_EXCEEDED"
BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
BAD_REQUEST = "BAD_REQUEST"
# Whether the request named its operation: Strawberry fills in the first operation's name.
OPERATION_NAMED: ContextVar[bool] = ContextVar("operation_named", default=True)
# The longest list any argument takes (the batch mutations'); a longer one is refused before
# graphql-core coerces it, which costs ~10 µs an item (250,000 `{}` in 1 MiB: seconds).
MAX_LIST_ITEMS = BATCH_MAX
INTROSPECTION_DISABLED = "INTROSPECTION_DISABLED"
# The refusals the metrics count by code (consumers_refusals_total).
LIMIT_CODES = frozenset({
    MAX_DEPTH_EXCEEDED, MAX_ALIASES_EXCEEDED, MAX_TOKENS_EXCEEDED, MAX_DIRECTIVES_EXCEEDED,
    MAX_DUPLICATE_FIELDS_EXCEEDED, MAX_COST_EXCEEDED, BATCH_TOO_LARGE, THROTTLED,
})

# graphql-core's wording for its own token limit (the only way to tell it from a syntax error).
_TOKEN_LIMIT_MESSAGE = "Document contains more than"
_INTROSPECTION_ROOTS = frozenset({"__schema", "__type"})
_STRAWBERRY_RULES = (MaybeNullValidationRule, OneOfInputValidationRule)


@dataclass(frozen=True)
class Limits:
    depth: int = 12
    aliases: int = 30
    tokens: int = 5_000
    directives: int = 5
    duplicate_fields: int = 50
    cost: int = 50_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            depth=settings.max_depth,
            aliases=settings.max_aliases,
            tokens=settings.max_tokens,
            directives=settings.max_directives,
            duplicate_fields=settings.max_duplicate_fields,
            cost=settings.max_cost,
        )


def _refusal(message: str, code: str, **extensions: Any) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code, **extensions})


class NoIntrospection(NoSchemaIntrospectionCustomRule):
    """graphql-core's rule, with a code of its own."""

    def enter_field(self, node: FieldNode, *_args: Any) -> None:
        if node.name.value in _INTROSPECTION_ROOTS:
            self.report_error(_refusal(
                "Introspection is disabled.", INTROSPECTION_DISABLED, field=node.name.value
            ))


# --- the shape of a document -------------------------------------------------------------


@dataclass(frozen=True)
class CostTerm:
    """A field in the cost tree: a connection (``size`` set), or a plain field or fragment
    spread (``size`` None: costs nothing itself, passes its children through)."""

    size: tuple[str, ValueNode | None, ValueNode | None] | None
    children: tuple[CostTerm, ...]


@dataclass
class _Level:
    """What one selection set holds, fragments included."""

    keys: Counter[str] = field(default_factory=Counter)  # response keys at this level
    depth: int = 0
    aliases: int = 0
    duplicates: tuple[int, str] = (0, "")  # most repeated key in any set below this level
    terms: list[CostTerm] = field(default_factory=list)
    longest_list: int = 0  # items of the longest literal list given to a list argument

    def add(self, other: _Level) -> None:
        self.keys.update(other.keys)
        self.depth = max(self.depth, other.depth)
        self.aliases += other.aliases
        self.duplicates = max(self.duplicates, other.duplicates)
        self.longest_list = max(self.longest_list, other.longest_list)


@dataclass(frozen=True)
class OperationShape:
    depth: int
    aliases: int
    duplicates: tuple[int, str]
    cost: tuple[CostTerm, ...]
    variable_defaults: Mapping[str, Any]
    longest_list: int = 0
    list_variables: tuple[str, ...] = ()  # declared with a list type
    # The definitions of the variables the cost reads (page sizes, id lists).
    cost_variables: tuple[VariableDefinitionNode, ...] = ()


class _Analyser:
    """One linear walk per operation: fragments are summarised once and reused per spread,
    so a document that spreads fragments exponentially is still measured in linear time."""

    def __init__(self, schema: GraphQLSchema, document: DocumentNode) -> None:
        self.schema = schema
        self.fragments = {
            d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
        }
        self.summaries: dict[str, tuple[_Level, CostTerm]] = {}
        self.in_progress: set[str] = set()

    def operation(self, operation: OperationDefinitionNode) -> OperationShape:
        root = self.schema.get_root_type(operation.operation)
        level = self.selection_set(operation.selection_set, root)
        defaults = {
            d.variable.name.value: value_from_ast_untyped(d.default_value)
            for d in operation.variable_definitions or ()
            if d.default_value is not None
        }
        used = _variables_in(level.terms)
        return OperationShape(
            depth=level.depth,
            aliases=level.aliases,
            duplicates=max(level.duplicates, _most_common(level.keys)),
            cost=tuple(level.terms),
            variable_defaults=defaults,
            longest_list=level.longest_list,
            list_variables=tuple(
                d.variable.name.value for d in operation.variable_definitions or ()
                if isinstance(d.type.type if isinstance(d.type, NonNullTypeNode) else d.type,
                              ListTypeNode)
            ),
            cost_variables=tuple(d for d in operation.variable_definitions or ()
                                 if d.variable.name.value in used),
        )

    def selection_set(self, selection_set: SelectionSetNode, parent: Any) -> _Level:
        level = _Level()
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                self._field(selection, parent, level)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                type_ = self.schema.get_type(condition.name.value) if condition else parent
                inner = self.selection_set(selection.selection_set, type_)
                level.add(inner)
                level.terms.extend(inner.terms)
            elif isinstance(selection, FragmentSpreadNode):
                summary = self._fragment(selection.name.value)
                if summary is not None:
                    inner, term = summary
                    level.add(inner)
                    level.terms.append(term)
        return level

    def _field(self, node: FieldNode, parent: Any, level: _Level) -> None:
        name = node.name.value
        level.keys[node.alias.value if node.alias else name] += 1
        level.aliases += node.alias is not None
        definition = getattr(parent, "fields", {}).get(name) if parent is not None else None
        for argument in node.arguments or ():
            spec = definition.args.get(argument.name.value) if definition is not None else None
            if (spec is not None and isinstance(argument.value, ListValueNode)
                    and isinstance(_unwrap_non_null(spec.type), GraphQLList)):
                level.longest_list = max(level.longest_list, len(argument.value.values))
        if node.selection_set is None:
            level.depth = max(level.depth, 1)
            return
        type_ = get_named_type(definition.type) if definition is not None else None
        inner = self.selection_set(node.selection_set, type_)
        # Introspection is as deep as the type system; its own cost is bounded.
        level.depth = max(level.depth, 1 if name in _INTROSPECTION_ROOTS else 1 + inner.depth)
        level.aliases += inner.aliases
        level.duplicates = max(level.duplicates, inner.duplicates, _most_common(inner.keys))
        level.longest_list = max(level.longest_list, inner.longest_list)
        size = _size_of(node, definition.type if definition else None, type_)
        if size is not None:
            level.terms.append(CostTerm(size, tuple(inner.terms)))
        elif inner.terms:
            level.terms.append(CostTerm(None, tuple(inner.terms)))

    def _fragment(self, name: str) -> tuple[_Level, CostTerm] | None:
        if name in self.summaries:
            return self.summaries[name]
        definition = self.fragments.get(name)
        if definition is None or name in self.in_progress:
            return None  # unknown or cyclic: the validator reports it
        self.in_progress.add(name)
        type_ = self.schema.get_type(definition.type_condition.name.value)
        inner = self.selection_set(definition.selection_set, type_)
        self.in_progress.discard(name)
        summary = (inner, CostTerm(None, tuple(inner.terms)))
        self.summaries[name] = summary
        return summary


def _variables_in(terms: list[CostTerm]) -> set[str]:
    names: set[str] = set()

    class Collect(Visitor):
        def enter_variable(self, node: VariableNode, *_args: Any) -> None:
            names.add(node.name.value)

    seen: set[int] = set()
    pending = list(terms)
    while pending:
        term = pending.pop()
        if id(term) in seen:  # a fragment's term is shared by its spreads
            continue
        seen.add(id(term))
        pending.extend(term.children)
        for value in term.size[1:] if term.size is not None else ():
            if value is not None:
                visit(value, Collect())
    return names


def _most_common(keys: Counter[str]) -> tuple[int, str]:
    return max(((n, k) for k, n in keys.items()), default=(0, ""))


# The arguments whose list's length is a field's size: `nodes(ids:)`, and federation's
# `_entities(representations:)`, which is priced as `nodes` (a representation is an id).
_LIST_ARGUMENTS = ("ids", "representations")


def _size_of(
    node: FieldNode, type_: Any, named: GraphQLNamedType | None
) -> tuple[str, ValueNode | None, ValueNode | None] | None:
    arguments = {a.name.value: a.value for a in node.arguments or ()}
    if isinstance(named, GraphQLObjectType) and named.name.endswith("Connection"):
        return ("page", arguments.get("first"), arguments.get("last"))
    for name in _LIST_ARGUMENTS:
        if name in arguments and isinstance(_unwrap_non_null(type_), GraphQLList):
            return ("ids", arguments[name], None)
    return None


def _unwrap_non_null(type_: Any) -> Any:
    return type_.of_type if isinstance(type_, GraphQLNonNull) else type_


def most_directives(document: DocumentNode) -> int:
    """The most directives on any one node of the document (fields, fragments, operations)."""
    most = 0

    class Count(Visitor):
        def enter(self, node: Node, *_args: Any) -> None:
            nonlocal most
            most = max(most, len(getattr(node, "directives", None) or ()))

    visit(document, Count())
    return most


def cost_of(terms: tuple[CostTerm, ...], variables: Mapping[str, Any]) -> int:
    memo: dict[int, int] = {}

    def value(node: ValueNode | None) -> Any:
        if node is None or isinstance(node, NullValueNode):
            return None
        if isinstance(node, VariableNode):
            return variables.get(node.name.value)
        if isinstance(node, IntValueNode):
            return int(node.value)
        if isinstance(node, ListValueNode):
            return node.values
        return node

    def size(spec: tuple[str, ValueNode | None, ValueNode | None]) -> int:
        kind, a, b = spec
        if kind == "ids":
            ids = value(a)
            return len(ids) if isinstance(ids, list | tuple) else 1
        given = [v for v in (value(a), value(b)) if isinstance(v, int) and not isinstance(v, bool)]
        return min(max(max(given), 0), MAX_PAGE_SIZE) if given else DEFAULT_PAGE_SIZE

    def cost(term: CostTerm) -> int:
        key = id(term)
        if key not in memo:
            below = sum(cost(child) for child in term.children)
            memo[key] = below if term.size is None else size(term.size) * (1 + below)
        return memo[key]

    return sum(cost(term) for term in terms)


# --- the process-wide cache --------------------------------------------------------------


@dataclass
class Prepared:
    """A parsed document and what has been learnt about it; shared by every request that
    sends the same text, so it never holds anything that depends on variables."""

    document: DocumentNode
    most_directives: int
    shapes: dict[str | None, OperationShape] = field(default_factory=dict)
    validation: dict[tuple[type[ASTValidationRule], ...], list[GraphQLError]] = field(
        default_factory=dict
    )
    # By the operation name a request gives: the query found ready for the direct path, or
    # None (see `ready`).
    ready: dict[str | None, Ready | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Ready:
    """A query operation of a prepared document within every limit, valid, and priced
    without its variables: what the direct path (Schema.execute_ready) needs of the
    document, learnt once."""

    name: str | None  # the operation's own name, as the access line gives it
    cost: int


class DocumentCache:
    """A bounded LRU of prepared documents, bounded by entries and by total query length
    (a parsed document is proportional to its text)."""

    def __init__(self, max_entries: int = 1_000, max_chars: int = 4_000_000) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._entries: OrderedDict[tuple[Any, ...], Prepared] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.parses = 0  # documents parsed on a miss, for tests and measurements
        self.validations = 0

    def get(self, key: tuple[Any, ...]) -> Prepared | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[Any, ...], entry: Prepared) -> None:
        size = len(key[-1])
        if size > self.max_chars:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self._chars += size
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                old_key, _ = self._entries.popitem(last=False)
                self._chars -= len(old_key[-1])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)


DOCUMENTS = DocumentCache()


def rules_for(production: bool) -> tuple[type[ASTValidationRule], ...]:
    """The validation rules an operation is checked with (Strawberry's defaults, ours)."""
    return (*specified_rules, *((NoIntrospection,) if production else ()), *_STRAWBERRY_RULES)


@dataclass
class PinnedDocument:
    """A document the server keeps for good (a trusted document, api/documents.py): prepared
    on its first use, then reused by every request that names it, never evicted by the LRU,
    and found by its id rather than by hashing its text."""

    text: str
    # (schema, token limit, production) it was prepared under, and what was learnt.
    prepared: tuple[tuple[Any, ...], Prepared] | None = None


class OperationLimits(SchemaExtension):
    """Parses through the cache, measures, validates through the cache, prices. Reports
    ``extensions.cost`` whenever the cost was computed."""

    def __init__(
        self, limits: Limits, *, production: bool, cache: DocumentCache = DOCUMENTS
    ) -> None:
        self.limits = limits
        self.production = production
        self.cache = cache
        self.prepared: Prepared | None = None
        self.cost: int | None = None

    def _key(self) -> tuple[Any, ...]:
        context = self.execution_context
        return _cache_key(context.schema, self.limits, self.production, context.query or "")

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options["max_tokens"] = self.limits.tokens
        if self.production:
            context.validation_rules = (*context.validation_rules, NoIntrospection)
        yield

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        request = context.context
        pinned = request.pinned if isinstance(request, Context) else None
        if pinned is not None and pinned.text is not context.query:
            pinned = None  # (the text of another document: not this one's)
        if context.graphql_document is None and context.query:
            self.prepared = _cached(self.cache, self._key(), pinned)
            if self.prepared is not None:
                context.graphql_document = self.prepared.document
        yield
        for error in context.pre_execution_errors or ():
            if error.message.startswith(f"Syntax Error: {_TOKEN_LIMIT_MESSAGE}"):
                error.message = (
                    f"The document has more than {self.limits.tokens} tokens, the limit."
                )
                error.extensions = {**(error.extensions or {}), "code": MAX_TOKENS_EXCEEDED,
                                    "limit": self.limits.tokens}
        if self.prepared is None and context.graphql_document is not None:
            self.prepared = _keep(self.cache, self._key(), pinned, context.graphql_document)

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        prepared = self.prepared
        if prepared is None or prepared.document is not context.graphql_document:
            yield  # a document given by another extension: Strawberry validates it
            return
        operation = context.operation_name  # the first operation's when none was given
        if not OPERATION_NAMED.get() and _operation_count(prepared.document) > 1:
            # The spec's rule; graphql-core says the same, but only once execution starts.
            context.pre_execution_errors = [_refusal(
                "Must provide operation name if query contains multiple operations.",
                BAD_REQUEST,
            )]
            yield
            return
        shape = prepared.shapes.get(operation)
        if shape is None:
            shape = _Analyser(context.schema._schema, prepared.document).operation(
                _operation(prepared.document, operation)
            )
            prepared.shapes[operation] = shape
        # Known before anything else is decided, so that every answer carries it, refusals too.
        variables = {**shape.variable_defaults, **(context.variables or {})}
        self.cost = cost_of(shape.cost, variables)
        refusals = _measured(self.limits, prepared, shape)
        lists = [(shape.longest_list, "A list argument"), *(
            (len(value), f"`${name}`") for name in shape.list_variables
            if isinstance(value := variables.get(name), list)
        )]
        items, holder = max(lists)
        if items > MAX_LIST_ITEMS:
            refusals.append(_refusal(
                f"{holder} holds {items:,} items; a batch takes at most {MAX_LIST_ITEMS} and no "
                "list argument more. Nothing was run.", BATCH_TOO_LARGE, limit=MAX_LIST_ITEMS,
            ))
        if not refusals:
            refusals = list(_validated(self.cache, prepared, context.schema._schema,
                                       (*context.validation_rules, *_STRAWBERRY_RULES),
                                       self.production))
        if not refusals and shape.cost_variables:
            # Priced again from the values execution will use: `100.0` or `1e2` for an Int
            # is 100 to graphql-core. Values that fail to coerce are reported by execution.
            coerced = get_variable_values(
                context.schema._schema, shape.cost_variables, context.variables or {}
            )
            if isinstance(coerced, VariableValues):
                self.cost = cost_of(shape.cost, coerced.coerced)
        if not refusals and self.cost > self.limits.cost:
            refusals = [_refusal(
                f"This operation can return up to {self.cost:,} nodes; the limit is "
                f"{self.limits.cost:,}. Ask for smaller pages (`first`/`last`) or fewer "
                "nested connections.",
                MAX_COST_EXCEEDED, cost=self.cost, limit=self.limits.cost,
            )]
        context.pre_execution_errors = refusals
        if not refusals and isinstance(context.context, Context):
            # What the rate limit takes, before execution: the nodes, and the writes.
            context.context.requested = self.cost
            context.context.cost = self.cost + _writes(
                prepared.document, _operation(prepared.document, operation), variables)
        yield

    def get_results(self) -> dict[str, Any]:
        if self.cost is None or self._subscribing():
            return {}
        return cost_extension(self.cost, self.limits, self.execution_context.context)

    def _subscribing(self) -> bool:
        """A subscription is priced and charged once, at subscribe: its events (Strawberry
        asks for the extensions' results again for each) do not repeat that price."""
        try:
            return self.execution_context.operation_type is StrawberryOperationType.SUBSCRIPTION
        except RuntimeError:  # no document, or no such operation: no subscription either
            return False


def cost_extension(cost: int, limits: Limits, request: Any) -> dict[str, Any]:
    """`extensions.cost` of an answer: the nodes requested, the limit, and the API key's
    bucket once the rate limit has looked at it."""
    reported: dict[str, Any] = {"requested": cost, "limit": limits.cost}
    if isinstance(request, Context) and request.throttle is not None:
        reported["throttleStatus"] = request.throttle.status()
    return {"cost": reported}


def _cache_key(schema: Any, limits: Limits, production: bool, query: str) -> tuple[Any, ...]:
    return (schema, limits.tokens, production, query)


def _cached(cache: DocumentCache, key: tuple[Any, ...], pinned: PinnedDocument | None
            ) -> Prepared | None:
    """The document prepared before under `key` (a pinned one's own, else the cache's)."""
    if pinned is not None:
        if pinned.prepared is not None and pinned.prepared[0] == key[:3]:
            return pinned.prepared[1]
        return None
    return cache.get(key)


def _keep(cache: DocumentCache, key: tuple[Any, ...], pinned: PinnedDocument | None,
          document: DocumentNode) -> Prepared:
    """A document just parsed, prepared and kept: by its pinned entry, else in the cache."""
    cache.parses += 1
    prepared = Prepared(document, most_directives(document))
    if pinned is not None:
        pinned.prepared = (key[:3], prepared)
    elif key[-1]:
        cache.put(key, prepared)
    return prepared


def _validated(cache: DocumentCache, prepared: Prepared, schema: GraphQLSchema,
               rules: tuple[type[ASTValidationRule], ...], production: bool
               ) -> list[GraphQLError]:
    """The document's validation errors under `rules`, found once per document."""
    errors = prepared.validation.get(rules)
    if errors is None:
        cache.validations += 1
        errors = validate(schema, prepared.document, rules, hide_suggestions=production)
        prepared.validation[rules] = errors
    return errors


def ready(
    schema: Any, limits: Limits, production: bool, query: str, operation_name: str | None,
    pinned: PinnedDocument | None, cache: DocumentCache = DOCUMENTS,
) -> tuple[Prepared, Ready] | None:
    """The prepared document of `query` and its operation `operation_name` when that is a
    query the direct path can run (Schema.execute_ready): parsed within the token limit,
    within every other limit of the document, valid, its cost reading no variable and
    within the limit, no list variable to count. Learnt once per document and operation
    name, kept with the document (so bounded with the cache); None for anything else,
    which OperationLimits checks and reports on the way through Strawberry."""
    key = _cache_key(schema, limits, production, query)
    prepared = _cached(cache, key, pinned)
    if prepared is None:
        try:
            document = parse(query, max_tokens=limits.tokens)
        except GraphQLError:
            return None  # reported on the way through Strawberry
        prepared = _keep(cache, key, pinned, document)
    if operation_name in prepared.ready:
        found = prepared.ready[operation_name]
        return None if found is None else (prepared, found)
    found = None
    operation = find_operation(prepared.document, operation_name)
    if operation is None:
        return None  # not remembered: the names a request may send are not the document's
    if operation.operation is OperationType.QUERY:
        name = operation.name.value if operation.name else None
        shape = prepared.shapes.get(name)
        if shape is None:
            shape = prepared.shapes[name] = _Analyser(
                schema._schema, prepared.document).operation(operation)
        if (not shape.cost_variables and not shape.list_variables
                and shape.longest_list <= MAX_LIST_ITEMS
                and not _measured(limits, prepared, shape)
                and not _validated(cache, prepared, schema._schema, rules_for(production),
                                   production)):
            cost = cost_of(shape.cost, shape.variable_defaults)
            if cost <= limits.cost:
                found = Ready(name, cost)
    prepared.ready[operation_name] = found
    return None if found is None else (prepared, found)


def _measured(limits: Limits, prepared: Prepared, shape: OperationShape) -> list[GraphQLError]:
    refusals = []
    if prepared.most_directives > limits.directives:
        refusals.append(_refusal(
            f"A field carries {prepared.most_directives} directives; the limit is "
            f"{limits.directives}.", MAX_DIRECTIVES_EXCEEDED, limit=limits.directives,
        ))
    if shape.depth > limits.depth:
        refusals.append(_refusal(
            f"The operation is {shape.depth} levels deep; the limit is {limits.depth}.",
            MAX_DEPTH_EXCEEDED, limit=limits.depth,
        ))
    if shape.aliases > limits.aliases:
        refusals.append(_refusal(
            f"The operation uses {shape.aliases} aliases; the limit is {limits.aliases}.",
            MAX_ALIASES_EXCEEDED, limit=limits.aliases,
        ))
    repeats, key = shape.duplicates
    if repeats > limits.duplicate_fields:
        refusals.append(_refusal(
            f"`{key}` is selected {repeats} times in one selection set; the limit is "
            f"{limits.duplicate_fields}.", MAX_DUPLICATE_FIELDS_EXCEEDED,
            limit=limits.duplicate_fields,
        ))
    return refusals


def measure(schema: GraphQLSchema, document: DocumentNode, limits: Limits) -> list[GraphQLError]:
    """What the limits refuse of a valid document's operations before they run, whatever the
    variables (directives, depth, aliases, duplicate fields; not the cost, which depends on
    them): for checking documents ahead of use (api/documents.py)."""
    prepared = Prepared(document, most_directives(document))
    refusals: list[GraphQLError] = []
    for operation in document.definitions:
        if isinstance(operation, OperationDefinitionNode):
            shape = _Analyser(schema, document).operation(operation)
            refusals.extend(error for error in _measured(limits, prepared, shape)
                            if error.message not in {known.message for known in refusals})
    return refusals


def _writes(document: DocumentNode, operation: OperationDefinitionNode,
            variables: Mapping[str, Any]) -> int:
    """The writes a mutation asks for, for the rate limit (web/rate_limit.py): each root
    field one, a batch its items (its longest list argument, literal or variable), as a
    REST call is priced; 0 for a query. Node cost alone would price a 500-item
    `consumerBatchCreate` at nothing."""
    if operation.operation is not OperationType.MUTATION:
        return 0
    fragments = {d.name.value: d for d in document.definitions
                 if isinstance(d, FragmentDefinitionNode)}
    total = 0
    pending: list[SelectionSetNode] = [operation.selection_set]
    seen: set[str] = set()
    while pending:
        for selection in pending.pop().selections:
            if isinstance(selection, InlineFragmentNode):
                pending.append(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name in fragments and name not in seen:  # validation refuses cycles
                    seen.add(name)
                    pending.append(fragments[name].selection_set)
            elif isinstance(selection, FieldNode):
                items = 1
                for argument in selection.arguments or ():
                    value = argument.value
                    if isinstance(value, VariableNode):
                        given = variables.get(value.name.value)
                        if isinstance(given, list):
                            items = max(items, len(given))
                    elif isinstance(value, ListValueNode):
                        items = max(items, len(value.values))
                total += items
    return total


def _operation_count(document: DocumentNode) -> int:
    return sum(isinstance(d, OperationDefinitionNode) for d in document.definitions)


def _operation(document: DocumentNode, name: str | None) -> OperationDefinitionNode:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if name is None:
        return operations[0]
    return next(o for o in operations if o.name is not None and o.name.value == name)
