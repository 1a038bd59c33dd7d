"""Scopes, checked once per operation on the already parsed document: a mutation needs
``write``, anything else ``read``. A refusal is a GraphQL error (HTTP 200) and nothing runs."""

from __future__ import annotations

from collections.abc import Iterator

from graphql import GraphQLError
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from consumers_graphql.store.keys import Principal, Scope
from consumers_graphql.web.http_auth import AUTHENTICATION_REQUIRED, UNAUTHENTICATED

FORBIDDEN = "FORBIDDEN"


def required_scope(operation_type: OperationType) -> Scope:
    return Scope.WRITE if operation_type is OperationType.MUTATION else Scope.READ


class ScopeCheck(SchemaExtension):
    def on_execute(self) -> Iterator[None]:
        context = self.execution_context.context
        principal: Principal | None = getattr(context, "principal", None)
        # operation_type follows operationName through a multi-operation document.
        scope = required_scope(self.execution_context.operation_type)
        if isinstance(context, dict):
            # Strawberry's default context ({"request", "response"}): a transport that did
            # not check a key (ours always gives a Context). Fail closed.
            self._refuse(AUTHENTICATION_REQUIRED, UNAUTHENTICATED)
        elif principal is None:
            pass  # an in-process caller (schema.execute), not an HTTP request
        elif principal.is_anonymous:
            # The HTTP layer answers 401 first; this guards the GraphiQL page's exemption.
            self._refuse(AUTHENTICATION_REQUIRED, UNAUTHENTICATED)
        elif not principal.allows(scope):
            self._refuse(f"This API key lacks the `{scope}` scope.", FORBIDDEN)
        yield

    def _refuse(self, message: str, code: str) -> None:
        # A result set before execution makes Strawberry skip execution altogether.
        self.execution_context.result = ExecutionResult(
            data=None, errors=[GraphQLError(message, extensions={"code": code})]
        )
