"""Expected failures, as data. The GraphQL face turns them into errors or userErrors with a
stable code; the REST face into the reference's 4xx bodies."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_USER_INPUT = "BAD_USER_INPUT"
    VALIDATION_FAILED = "VALIDATION_FAILED"
    EMAIL_TAKEN = "EMAIL_TAKEN"
    EXTERNAL_ID_TAKEN = "EXTERNAL_ID_TAKEN"
    NAME_TAKEN = "NAME_TAKEN"
    NOT_FOUND = "NOT_FOUND"
    BATCH_TOO_LARGE = "BATCH_TOO_LARGE"
    DUPLICATE_IN_BATCH = "DUPLICATE_IN_BATCH"


class DomainError(Exception):
    """An expected failure with a stable code and, where it applies, the path of the input
    field at fault (``("input", "3", "email")``: list indices are strings, as in the
    GraphQL `UserError.field: [String!]`)."""

    code: ErrorCode = ErrorCode.VALIDATION_FAILED

    def __init__(
        self,
        message: str,
        *,
        field: Sequence[str] | None = None,
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = tuple(field) if field is not None else None
        if code is not None:
            self.code = code


class BadUserInput(DomainError):
    """A malformed read request: an argument out of range, a bad cursor, a short search."""

    code = ErrorCode.BAD_USER_INPUT


class DomainErrors(Exception):
    """Every problem found in one write's input at once, not just the first."""

    def __init__(self, errors: Sequence[DomainError]) -> None:
        super().__init__("; ".join(error.message for error in errors))
        self.errors = list(errors)


class ConfigurationError(Exception):
    """A setting the service cannot start with (a missing extra, a database behind the code):
    every command prints its message, one or two lines naming the variable and what to do,
    and exits 2, without a traceback."""
