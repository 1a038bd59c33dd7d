"""The schema, and the translation of failures into stable ``extensions.code`` values."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, cast

import strawberry
from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import GraphQLError, get_operation_ast
from strawberry.execution import optimized_is_awaitable
from strawberry.extensions import SchemaExtension
from strawberry.extensions.runner import SchemaExtensionsRunner
from strawberry.federation.schema import FederationAny
from strawberry.schema._graphql_core import execution_context_class_kwargs
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext, ExecutionResult
from strawberry.types.graphql import OperationType

from consumers_graphql.api.context import Context, Info
from consumers_graphql.api.executor import execute_compiled, plan_mutations
from consumers_graphql.api.federation import Query, public_sdl, resolve_entities
from consumers_graphql.api.limits import (
    MAX_COST_EXCEEDED,
    OPERATION_NAMED,
    Limits,
    OperationLimits,
    cost_extension,
    ready,
)
from consumers_graphql.api.mutation import Mutation
from consumers_graphql.api.permissions import ScopeCheck, required_scope
from consumers_graphql.api.scalars import DateTime
from consumers_graphql.api.subscription import Subscription
from consumers_graphql.api.tracing import OperationTracing
from consumers_graphql.api.types import Audience, Consumer, Event, Order
from consumers_graphql.errors import DomainError
from consumers_graphql.store import outage
from consumers_graphql.store.keys import Principal
from consumers_graphql.web import observe, request_id
from consumers_graphql.web.rate_limit import (
    THROTTLED,
    RateLimiter,
    RateLimitUnavailable,
    Throttle,
    cost_over_capacity_message,
)
from consumers_graphql.web.tracing import StartOperationSpan

_T = TypeVar("_T")

logger = logging.getLogger("consumers_graphql.graphql")

INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"
INTERNAL_MESSAGE = "Internal server error."


def _tag(errors: list[GraphQLError] | None, code: str) -> None:
    for error in errors or ():
        if not (error.extensions or {}).get("code"):
            error.extensions = {**(error.extensions or {}), "code": code}


def _is_unexpected(error: GraphQLError) -> bool:
    original = error.original_error
    return (
        error.path is not None
        and not isinstance(original, DomainError | GraphQLError)
        and not (error.extensions or {}).get("code")
    )


class ErrorCodes(SchemaExtension):
    """Every error leaves with a code: parse and validation failures, BAD_USER_INPUT for
    misuse (domain errors and variables that do not coerce), the domain's own codes, and
    INTERNAL_SERVER_ERROR for anything unexpected: its message masked in every mode (it may
    hold SQL or the values of a query), the real exception logged with the request id; and
    SERVICE_UNAVAILABLE when the database is out of reach (see outage.py)."""

    def on_parse(self) -> Iterator[None]:
        yield
        _tag(self.execution_context.pre_execution_errors, "GRAPHQL_PARSE_FAILED")

    def on_validate(self) -> Iterator[None]:
        yield
        _tag(self.execution_context.pre_execution_errors, "GRAPHQL_VALIDATION_FAILED")

    def on_operation(self) -> Iterator[None]:
        yield
        result = self.execution_context.result
        if result is None or not getattr(result, "errors", None):
            return
        result.errors = [coded(error) for error in result.errors or ()]


def coded(error: GraphQLError) -> GraphQLError:
    """An execution error as it leaves (ErrorCodes)."""
    original = error.original_error
    if isinstance(original, DomainError):
        error.extensions = {**(error.extensions or {}), "code": original.code.value}
        if original.field is not None:
            error.extensions["field"] = list(original.field)
        return error
    if _is_unexpected(error) and outage.is_unavailable(original):
        error = GraphQLError(
            outage.GRAPHQL_MESSAGE, nodes=error.nodes, source=error.source,
            positions=error.positions, path=error.path,
        )
        _tag([error], outage.SERVICE_UNAVAILABLE)
        if (current_id := request_id.current.get()) is not None:
            error.extensions = {**(error.extensions or {}), "requestId": current_id}
        return error
    if _is_unexpected(error):
        error = GraphQLError(
            INTERNAL_MESSAGE, nodes=error.nodes, source=error.source,
            positions=error.positions, path=error.path,
        )
        _tag([error], INTERNAL_SERVER_ERROR)
        if (current_id := request_id.current.get()) is not None:
            error.extensions = {**(error.extensions or {}), "requestId": current_id}
        return error
    _tag([error], "BAD_USER_INPUT")
    return error


class OperationFacts(SchemaExtension):
    """The operation's type and name, for the access line and the metrics (web/observe.py),
    once the document is parsed."""

    def on_parse(self) -> Iterator[None]:
        yield
        context = self.execution_context
        if context.graphql_document is None or observe.current.get() is None:
            return
        operation = get_operation_ast(context.graphql_document, context.operation_name)
        if operation is not None:
            observe.operation(operation.operation.value,
                              operation.name.value if operation.name else None)


_PHASES = ("on_operation", "on_parse", "on_validate", "on_execute")
_Hook = Callable[[SchemaExtension], Generator[None, None, None]]


def _hooks(cls: type) -> dict[str, _Hook] | None:
    """An extension class's hooks by phase, found once per class; None when one is not a
    plain generator function (Strawberry's own runner then runs every hook)."""
    hooks: dict[str, _Hook] = {}
    for phase in _PHASES:
        hook = getattr(cls, phase)
        if hook is getattr(SchemaExtension, phase):
            continue
        if not inspect.isgeneratorfunction(hook):
            return None
        hooks[phase] = hook
    return hooks


def _leave(hook: Generator[None, None, None], error: BaseException | None) -> bool:
    """The rest of a hook after its `yield`, as contextlib.contextmanager runs it: True when
    the hook suppressed `error`."""
    if error is None:
        try:
            next(hook)
        except StopIteration:
            return False
        raise RuntimeError("an extension hook did not stop after its yield")
    try:
        hook.throw(error)
    except StopIteration as stop:
        return stop is not error
    except BaseException as raised:
        if raised is error:
            return False
        raise
    raise RuntimeError("an extension hook did not stop after throw()")


class _Phase:
    """One phase's hooks run to their `yield` in order, then on in reverse, an exception
    passed to each in turn (contextlib's semantics, an ExitStack's), without a context
    manager per hook and request."""

    __slots__ = ("entered", "extensions", "phase")

    def __init__(self, extensions: list[tuple[SchemaExtension, dict[str, _Hook]]],
                 phase: str) -> None:
        self.extensions, self.phase = extensions, phase
        self.entered: list[Generator[None, None, None]] = []

    async def __aenter__(self) -> None:
        phase = self.phase
        for extension, hooks in self.extensions:
            hook = hooks.get(phase)
            if hook is not None:
                running = hook(extension)
                try:
                    try:
                        next(running)
                    except StopIteration:
                        raise RuntimeError("an extension hook did not yield") from None
                except BaseException as error:  # those entered are left first
                    await self.__aexit__(type(error), error, error.__traceback__)
                    raise
                self.entered.append(running)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool:
        pending = exc
        while self.entered:
            try:
                if _leave(self.entered.pop(), pending):
                    pending = None
            except BaseException as raised:  # a hook's own
                raised.__context__ = pending
                pending = raised
        if pending is exc or pending is None:
            # The original exception (or none) goes on: as in Strawberry's own runner, a
            # hook cannot swallow it.
            return False
        raise pending

    # Strawberry's execute_sync enters the phases with `with`; the hooks are the same
    # plain generators.
    def __enter__(self) -> None:
        _run_sync(self.__aenter__())

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> bool:
        return _run_sync(self.__aexit__(exc_type, exc, tb))


def _run_sync(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """A coroutine that never awaits anything (the phases': their hooks are generators),
    run to its end without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast("_T", done.value)
    coroutine.close()
    raise RuntimeError("a phase of extension hooks awaited something")


class _Runner(SchemaExtensionsRunner):
    """Strawberry's runner of extension hooks, for extensions whose hooks are all plain
    generators (ours): Strawberry's wraps every hook of every extension in a new
    context manager on each request (contextlib.contextmanager, functools.update_wrapper)
    and runs them in ExitStacks: about 0.07 ms of CPU, a quarter of a `{ __typename }`
    request in process. Relies on
    Strawberry's Schema.execute using the runner's operation(), parsing(), validation() and
    executing() as async context managers (tests/test_protocol.py pins it)."""

    def __init__(self, execution_context: ExecutionContext,
                 extensions: list[tuple[SchemaExtension, dict[str, _Hook]]]) -> None:
        super().__init__(execution_context, [extension for extension, _ in extensions])
        self._hooked = extensions

    def operation(self) -> Any:
        return _Phase(self._hooked, "on_operation")

    def parsing(self) -> Any:
        return _Phase(self._hooked, "on_parse")

    def validation(self) -> Any:
        return _Phase(self._hooked, "on_validate")

    def executing(self) -> Any:
        return _Phase(self._hooked, "on_execute")


class Schema(strawberry.federation.Schema):
    """An Apollo Federation v2 subgraph (`_service`, `_entities`; see api/federation.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lean_hooks: dict[type, dict[str, _Hook] | None] = {}

    # Strawberry's resolves each representation with the type's resolve_reference, one at a
    # time, and fails the whole field on a representation without a known __typename; ours
    # loads them all through the request's DataLoaders. Strawberry installs this method as
    # the `_entities` resolver (and sets its return annotation to the `_Entity` union).
    def entities_resolver(  # type: ignore[override]  # async: one gather for every entry
        self, info: Info, representations: list[FederationAny]
    ) -> Awaitable[list[FederationAny]]:
        return resolve_entities(info, representations)  # type: ignore[return-value]  # entities

    @functools.cached_property
    def subgraph_sdl(self) -> str:
        """`as_str()` printed once: what `_service { sdl }` answers (api/federation.py)."""
        return self.as_str()

    def public_sdl(self) -> str:
        """The SDL clients see, schema.graphql: without federation's additions (`as_str()`
        is the subgraph's SDL, what `_service { sdl }` answers)."""
        return public_sdl(self._schema)

    def create_extensions_runner(
        self, execution_context: ExecutionContext, extensions: list[SchemaExtension]
    ) -> SchemaExtensionsRunner:
        hooked = []
        known = self._lean_hooks
        for extension in extensions:
            cls = type(extension)
            if cls not in known:
                known[cls] = _hooks(cls)
            factories = known[cls]
            if factories is None:
                return super().create_extensions_runner(execution_context, extensions)
            hooked.append((extension, factories))
        return _Runner(execution_context, hooked)

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Expected failures are answers, not incidents: only log what nobody planned for.
        for error in errors:
            if _is_unexpected(error) and outage.is_unavailable(error.original_error):
                context = execution_context.context if execution_context else None
                if isinstance(context, Context):  # one warning per outage, not a traceback
                    context.database.failed(error.original_error)  # type: ignore[arg-type]  # not None: unavailable
                    continue
            if _is_unexpected(error):
                logger.error(
                    "unexpected error in %s (request_id=%s)", error.path,
                    request_id.current.get(), exc_info=error.original_error,
                )

    def _get_custom_context_kwargs(
        self, operation_extensions: dict[str, Any] | None = None, *, sync: bool = False
    ) -> dict[str, Any]:
        kwargs = super()._get_custom_context_kwargs(operation_extensions, sync=sync)
        # graphql-core's own switch, so variable errors make no "Did you mean" either.
        kwargs["hide_suggestions"] = self.config.disable_field_suggestions
        return kwargs

    async def execute(
        self,
        query: str | None,
        variable_values: dict[str, Any] | None = None,
        context_value: Any | None = None,
        root_value: Any | None = None,
        operation_name: str | None = None,
        allowed_operation_types: Iterable[OperationType] | None = None,
        operation_extensions: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        named = OPERATION_NAMED.set(operation_name is not None)
        try:
            return await super().execute(
                query, variable_values, context_value, root_value, operation_name,
                allowed_operation_types, operation_extensions,
            )
        finally:
            OPERATION_NAMED.reset(named)

    compiled = True
    # The direct path for queries ready to run (execute_ready), unless a test compares it
    # with `execute`; never while tracing gives each operation a span (OperationTracing).
    direct = True
    operation_spans = False
    limits = Limits()
    production = False
    ready_runs = 0  # operations the direct path answered, for tests and measurements

    async def execute_ready(
        self, query: str | None, variable_values: dict[str, Any] | None, context: Any,
        operation_name: str | None, operation_extensions: dict[str, Any] | None,
    ) -> ExecutionResult | None:
        """`execute`'s answer to an authenticated request for a query whose document is
        ready (limits.ready: parsed, within the limits, valid and priced once per document),
        without Strawberry's execution context and extension phases: the same steps, in the
        same order, with what only depends on the document looked up instead of worked out
        (about 0.05 ms a request, a quarter of a `{ __typename }`). Per request: the scope,
        the operation for the access line, the cost and the rate limit, the compiled
        execution, and the errors processed and coded as ErrorCodes does. None for any
        other request (a mutation, an error before execution, a scope refused, a cost that
        reads variables, tracing on), which `execute` answers."""
        if (not (self.direct and self.compiled) or self.operation_spans or not query
                or self.config.enable_experimental_incremental_execution
                or not isinstance(context, Context)):
            return None
        principal = context.principal
        if (principal is None or principal.is_anonymous
                or not principal.allows(required_scope(OperationType.QUERY))
                or context.charge_only or context.charged):
            return None
        pinned = context.pinned if context.pinned and context.pinned.text is query else None
        found = ready(self, self.limits, self.production, query, operation_name, pinned)
        if found is None:
            return None
        prepared, operation = found
        self.ready_runs += 1
        observe.operation(OperationType.QUERY.value, operation.name)
        context.requested = context.cost = operation.cost
        result: GraphQLExecutionResult
        try:
            refusal = None
            if context.rate_limiter is not None:
                refusal = await _admit(context, context.rate_limiter, principal, operation.cost)
            if refusal is not None:
                result = GraphQLExecutionResult(data=None, errors=[refusal])
            else:
                result = await execute_compiled(
                    self._schema, prepared.document, context_value=context,
                    variable_values=variable_values, operation_name=operation.name,
                    wire=True,  # (its one caller, api/http.py, writes the data with orjson)
                    is_awaitable=optimized_is_awaitable,
                    **execution_context_class_kwargs(self.execution_context_class),
                    **self._get_custom_context_kwargs(operation_extensions),
                )
            errors = result.errors
            if errors:
                self._process_errors(errors, self._create_execution_context(
                    query, (OperationType.QUERY,), variable_values, context, None,
                    operation_name, operation_extensions))
                errors = [coded(error) for error in errors]
        except Exception as exc:  # what `execute` makes of it: an error, neither coded
            errors = [GraphQLError(str(exc), original_error=exc)]  # nor masked (no path)
            self._process_errors(errors)
            result = GraphQLExecutionResult(data=None, errors=errors)
        return ExecutionResult(data=result.data, errors=errors,
                               extensions=cost_extension(operation.cost, self.limits, context))

    def _get_execute_function(self) -> Callable[..., Any]:
        # Queries run through compiled plans (api/executor.py); everything else, and any
        # operation that errs, through graphql-core itself. Either only once the rate limit
        # has taken the operation's cost.
        if not self.compiled or self.config.enable_experimental_incremental_execution:
            return _rate_limited(super()._get_execute_function())
        return _rate_limited_compiled


def _rate_limited(execute: Callable[..., Any]) -> Callable[..., Any]:
    """`execute`, run once the request's API key's bucket has given the operation's cost
    (priced by api/limits.py, which also refused what is over the limits): the one place
    between pricing and execution, the same for both execution paths. A refusal runs
    nothing and is a request error (no data): THROTTLED (429), MAX_COST_EXCEEDED when the
    bucket can never hold the cost, SERVICE_UNAVAILABLE (503) when Redis is out of reach
    and the limiter fails closed."""

    def run(*args: Any, **kwargs: Any) -> Any:
        context = kwargs.get("context_value")
        if isinstance(context, Context) and context.charged:
            return execute(*args, **kwargs)  # its cost taken by a first pass (charge_only)
        if (isinstance(context, Context) and context.rate_limiter is not None
                and context.principal is not None and context.cost is not None):
            return admitted(context, context.rate_limiter, context.principal, context.cost,
                            args, kwargs)
        return execute(*args, **kwargs)  # as it is: execute_sync needs no coroutine

    async def admitted(context: Context, limiter: RateLimiter, principal: Principal,
                       cost: int, args: Any, kwargs: Any) -> Any:
        refusal = await _admit(context, limiter, principal, cost)
        if refusal is not None:
            return GraphQLExecutionResult(data=None, errors=[refusal])
        if context.charge_only:
            context.charged = True
            return GraphQLExecutionResult(data=None, errors=None)  # executes nothing
        result = execute(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    return run


async def _admit(
    context: Context, limiter: RateLimiter, principal: Principal, cost: int
) -> GraphQLError | None:
    context.admitted = True
    try:
        throttle: Throttle | None = await limiter.take(principal, cost)
    except RateLimitUnavailable:
        return GraphQLError(outage.GRAPHQL_MESSAGE,
                            extensions={"code": outage.SERVICE_UNAVAILABLE})
    context.throttle = throttle
    if throttle is None or throttle.allowed:
        return None
    if not throttle.can_ever_pass:
        context.throttle, context.admitted = None, False  # nothing taken: api/http.py looks
        return GraphQLError(cost_over_capacity_message(throttle), extensions={
            "code": MAX_COST_EXCEEDED, "cost": throttle.cost, "limit": throttle.capacity})
    return GraphQLError(
        f"Throttled: this operation costs {cost:,} points and this API key's bucket holds "
        f"{math.floor(throttle.available):,}; retry in {throttle.retry_after} s.",
        extensions={"code": THROTTLED, "cost": cost, "throttleStatus": throttle.status()})


_rate_limited_compiled = _rate_limited(execute_compiled)


def build_schema(
    *, production: bool = False, limits: Limits | None = None, compiled: bool = True,
    operation_spans: StartOperationSpan | None = None,
) -> Schema:
    """The schema; `compiled=False` executes every operation with graphql-core alone (the
    reference the compiled executor is tested against). `operation_spans` (tracing on, see
    web/tracing.py) gives every operation a span."""
    limits = limits or Limits()
    extensions: list[Any] = [
        OperationFacts,
        ErrorCodes,
        lambda: OperationLimits(limits, production=production),
        ScopeCheck,
    ]
    if operation_spans is not None:
        # First, so that it ends last: after ErrorCodes has given every error its code.
        extensions.insert(0, lambda: OperationTracing(operation_spans))
    schema = Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[Consumer, Audience, Order, Event],
        extensions=extensions,
        config=StrawberryConfig(
            scalar_map={datetime: DateTime},
            disable_field_suggestions=production,
        ),
    )
    schema.compiled = compiled
    schema.limits, schema.production = limits, production
    schema.operation_spans = operation_spans is not None
    if compiled:
        plan_mutations(schema._schema)
    return schema
