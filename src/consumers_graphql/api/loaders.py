"""Per-request DataLoaders, named by their key. Paged relation loaders are made per set of
page arguments, so every parent in a batch shares one statement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.engine import Row
from strawberry import dataloader

from consumers_graphql.store.pagination import Page, PageRequest
from consumers_graphql.store.repository import Repository

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class DataLoader(dataloader.DataLoader[K, T]):
    """Strawberry's DataLoader, with loads that a cancelled waiter cannot reach.

    graphql-core 3.3 cancels the siblings of a field that fails. A waiter awaiting the
    loader's own future would cancel it: the future other fields share through the cache,
    and, once all of a batch's futures are cancelled, the batch itself, even before it
    started; later loads then join that batch and wait forever. Each load is shielded, so a
    batch always runs to its end and only the cancelled waiter stops waiting."""

    def load(self, key: K) -> Awaitable[T]:
        return asyncio.shield(_unwatched(super().load(key)))

    def load_many(self, keys: Iterable[K]) -> Awaitable[list[T]]:
        load = super().load
        # gather takes what its loads raised; what it raises itself is taken here
        return asyncio.shield(_unwatched(asyncio.gather(*map(load, keys))))


def _unwatched(future: Awaitable[T]) -> Awaitable[T]:
    """A future whose failure nobody may wait for any more (its waiters were cancelled, the
    request is over): what it raised is taken, so asyncio does not log it as lost."""
    if isinstance(future, asyncio.Future) and not future.done():
        future.add_done_callback(_take_exception)
    return future


def _take_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


PageLoader = DataLoader[str, Page[Row[Any]]]


class Loaders:
    def __init__(self, repository: Repository) -> None:
        self._repository = repository
        self.consumer_by_id = DataLoader(repository.consumers_by_ids)
        self.audience_by_id = DataLoader(repository.audiences_by_ids)
        self.order_by_id = DataLoader(repository.orders_by_ids)
        self.audience_count_by_consumer_id = DataLoader(
            repository.audience_counts_by_consumer_ids
        )
        self.order_count_by_consumer_id = DataLoader(repository.order_counts_by_consumer_ids)
        self.consumer_count_by_audience_id = DataLoader(
            repository.consumer_counts_by_audience_ids
        )
        self._pages: dict[tuple[str, PageRequest], PageLoader] = {}
        self._once: dict[Hashable, asyncio.Future[Any]] = {}

    def clear(self) -> None:
        """Forget everything loaded so far (after a write)."""
        self.__init__(self._repository)  # type: ignore[misc]  # every loader anew, in one place

    def once(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """A read that is not by key (a root page, a count) made once per request: when
        graphql-core takes an operation over from the compiled executor, it gets what was
        already read instead of reading again. Shielded as loads are."""
        future = self._once.get(key)
        if future is None:
            future = self._once[key] = asyncio.ensure_future(read())
            _unwatched(future)
        return asyncio.shield(future)

    def prime_consumers(self, rows: Sequence[Row[Any]]) -> None:
        """Consumers read as a page need no second look-up (e.g. through Order.consumer)."""
        self.consumer_by_id.prime_many({row.id: row for row in rows})

    def audiences_by_consumer_id(self, request: PageRequest) -> PageLoader:
        return self._paged("audiences", request, self._repository.audience_pages_by_consumer_ids)

    def orders_by_consumer_id(self, request: PageRequest) -> PageLoader:
        return self._paged("orders", request, self._repository.order_pages_by_consumer_ids)

    def consumers_by_audience_id(self, request: PageRequest) -> PageLoader:
        return self._paged(
            "consumers", request, self._repository.consumer_pages_by_audience_ids
        )

    def _paged(
        self,
        name: str,
        request: PageRequest,
        load: Callable[[Sequence[str], PageRequest], Awaitable[list[Page[Row[Any]]]]],
    ) -> PageLoader:
        key = (name, request)
        loader = self._pages.get(key)
        if loader is None:
            loader = self._pages[key] = DataLoader(partial(_load_pages, load, request))
        return loader


async def _load_pages(
    load: Callable[[Sequence[str], PageRequest], Awaitable[list[Page[Row[Any]]]]],
    request: PageRequest,
    keys: list[str],
) -> list[Page[Row[Any]]]:
    return await load(keys, request)
