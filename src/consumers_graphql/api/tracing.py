"""The GraphQL operation's span, on both execution paths.

A schema extension without a ``resolve`` hook runs around parsing, validation and
execution whichever executor runs the operation (schema.py swaps only the execute
function), so the compiled executor and graphql-core give the same span. Strawberry's own
OpenTelemetryExtension is not used: it records the document text and, per field, argument
values (personal data); its operation span is not made current, so SQL spans would not
be its children; and its per-field ``resolve`` hook is graphql-core middleware, which
would send every operation to graphql-core.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from graphql import get_operation_ast
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionContext

from consumers_graphql.web.tracing import StartOperationSpan

UNKNOWN_OPERATION = "GraphQL Operation"


class OperationTracing(SchemaExtension):
    """A span per operation, named "<type> <name>" as OpenTelemetry's GraphQL conventions
    say, with the operation's type and name and a hash of the document: never its text or
    its variables, which can hold personal data."""

    def __init__(self, start: StartOperationSpan) -> None:
        self._start = start

    def on_operation(self) -> Iterator[None]:
        with self._start() as span:
            yield
            span.describe(*describe(self.execution_context))


def describe(context: ExecutionContext) -> tuple[str, dict[str, str], list[str]]:
    """The span's name, attributes and the error codes of the result (after ErrorCodes)."""
    attributes: dict[str, str] = {}
    name = UNKNOWN_OPERATION
    document = context.graphql_document
    # The operation the document really holds: a client's operationName is any string.
    operation = get_operation_ast(document, context.operation_name) if document else None
    if operation is not None:
        kind = operation.operation.value
        attributes["graphql.operation.type"] = kind
        name = kind
        if operation.name is not None:
            attributes["graphql.operation.name"] = operation.name.value
            name = f"{kind} {operation.name.value}"
    if context.query is not None:
        # The same hash as Apollo's persisted queries (sha256 of the document's text).
        attributes["graphql.document.sha256"] = hashlib.sha256(
            context.query.encode("utf-8", "surrogatepass")).hexdigest()
    result = context.result
    errors = getattr(result, "errors", None) or ()
    codes = sorted({str((error.extensions or {}).get("code") or "ERROR") for error in errors})
    return name, attributes, codes
