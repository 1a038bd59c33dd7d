"""Strawberry's resolver decorators, typed: given options, its stubs return Any (untyped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import strawberry

ResolverT = TypeVar("ResolverT", bound=Callable[..., Any])


def field(*, description: str) -> Callable[[ResolverT], ResolverT]:
    # The resolver keeps its own type for the checker, as with strawberry.field(resolver=...).
    return cast("Callable[[ResolverT], ResolverT]", strawberry.field(description=description))


def mutation(*, description: str) -> Callable[[ResolverT], ResolverT]:
    return cast("Callable[[ResolverT], ResolverT]", strawberry.mutation(description=description))


def subscription(*, description: str) -> Callable[[ResolverT], ResolverT]:
    return cast("Callable[[ResolverT], ResolverT]",
                strawberry.subscription(description=description))
