"""Per-request DataLoaders, named by their key. Paged relation loaders are made per set of
page arguments, so every parent in a batch shares one statement."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from sqlalchemy.engine import Row
from strawberry.dataloader import DataLoader

from consumers_graphql.pagination import Page, PageRequest
from consumers_graphql.repository import Repository

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

    def clear(self) -> None:
        """Forget everything loaded so far (after a write)."""
        self.__init__(self._repository)  # type: ignore[misc]  # every loader anew, in one place

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
