"""Per-request DataLoaders, named by their key. Paged relation loaders are made per set of
page arguments, so every parent in a batch shares one statement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy.engine import Row
from strawberry import dataloader
from strawberry.exceptions import WrongNumberOfResultsReturned

from consumers_graphql.store.db import Database, Reader
from consumers_graphql.store.events import EventRecord, events_by_id
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

    def __init__(self, load_fn: Callable[[list[K]], Awaitable[Sequence[T | BaseException]]],
                 recorded: dict[K, asyncio.Future[T]] | None = None) -> None:
        super().__init__(partial(_replaying, load_fn, recorded) if recorded else load_fn)
        # every key's future, as handed out by load: what replay() hands on
        self.loaded: dict[K, asyncio.Future[T]] = {}

    def load(self, key: K) -> Awaitable[T]:
        future = self.loaded[key] = cast("asyncio.Future[T]", super().load(key))
        return asyncio.shield(_unwatched(future))

    def load_many(self, keys: Iterable[K]) -> Awaitable[list[T]]:
        # gather takes what its loads raised; what it raises itself is taken here
        return asyncio.shield(_unwatched(asyncio.gather(*map(self._load, keys))))

    def load_all(self, keys: Sequence[K]) -> Awaitable[list[T]]:
        """`load_many` for a look-ahead's keys (a page's ids): those not loaded yet are read
        at once, as one batch of their own, by one task; each key's future is set from it,
        so the cache and `loaded` are as `load_many` leaves them, but no batch is scheduled
        and no callback runs per key (a page of 20 made 60 of them per relation). Shielded
        as `load` is: the batch runs to its end whoever stops waiting."""
        futures: dict[K, asyncio.Future[T]] = {}
        missing: list[K] = []
        for key in keys:
            if key in futures:
                continue
            future = self.cache_map.get(key)
            if future is None or future.cancelled():
                future = self.loop.create_future()
                self.cache_map.set(key, future)
                missing.append(key)
            futures[key] = self.loaded[key] = future
        return asyncio.shield(_unwatched(asyncio.ensure_future(
            _read_all(self.load_fn, missing, futures, keys))))

    def _load(self, key: K) -> asyncio.Future[T]:
        future = cast("asyncio.Future[T]", super().load(key))
        self.loaded[key] = future
        return future


async def _read_all(
    load_fn: Callable[[list[K]], Awaitable[Sequence[T | BaseException]]],
    missing: list[K],
    futures: dict[K, asyncio.Future[T]],
    keys: Sequence[K],
) -> list[T]:
    """DataLoader.load_all's batch: reads `missing`, settles their futures as Strawberry's
    dispatch does (a value, the key's exception, or what the read raised for every key),
    then answers every key, awaiting those another batch still reads."""
    if missing:
        try:
            values = list(await load_fn(missing))
            if len(values) != len(missing):
                raise WrongNumberOfResultsReturned(
                    expected=len(missing), received=len(values))
        except Exception as error:  # every key's outcome, as in dispatch_batch
            values = [error] * len(missing)
        except BaseException:  # cancelled: nobody gets an answer from this batch
            for key in missing:
                futures[key].cancel()
            raise
        for key, value in zip(missing, values, strict=True):
            future = futures[key]
            if future.done():  # primed meanwhile, or cancelled
                continue
            if isinstance(value, BaseException):
                future.set_exception(value)
                future.exception()  # taken: the waiters below, or nobody, see it
            else:
                future.set_result(value)
    return [await futures[key] for key in keys]


async def _replaying(
    load_fn: Callable[[list[K]], Awaitable[Sequence[T | BaseException]]],
    recorded: dict[K, asyncio.Future[T]],
    keys: list[K],
) -> list[T | BaseException]:
    """A batch that reads only the keys not read before, in the batch's own turn of the
    event loop, as the first run's batch answered (see Loaders.replay)."""
    missing = [key for key in keys if key not in recorded]
    outcomes = dict(zip(missing, await load_fn(missing), strict=True)) if missing else {}
    for key in keys:
        if key in recorded:
            outcome = await _outcome(recorded[key])
            outcomes[key] = outcome
    return [outcomes[key] for key in keys]


async def _outcome(future: asyncio.Future[T]) -> T | BaseException:
    try:
        return await asyncio.shield(future)  # no turn of the loop when it is done already
    except Exception as error:  # a DataLoader hands an exception on as the key's outcome
        return error


async def _replayed(future: asyncio.Future[T]) -> T:
    return await asyncio.shield(future)


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


# The loaders by key, and the repository's batch read each one calls.
_BY_KEY = {
    "consumer_by_id": "consumers_by_ids",
    "audience_by_id": "audiences_by_ids",
    "order_by_id": "orders_by_ids",
    "audience_count_by_consumer_id": "audience_counts_by_consumer_ids",
    "order_count_by_consumer_id": "order_counts_by_consumer_ids",
    "consumer_count_by_audience_id": "consumer_counts_by_audience_ids",
}


class Loaders:
    # Made on first use (see __getattr__): most requests use one or none of them.
    consumer_by_id: DataLoader[str, Row[Any] | None]
    audience_by_id: DataLoader[str, Row[Any] | None]
    order_by_id: DataLoader[str, Row[Any] | None]
    audience_count_by_consumer_id: DataLoader[str, int]
    order_count_by_consumer_id: DataLoader[str, int]
    consumer_count_by_audience_id: DataLoader[str, int]

    def __init__(
        self, repository: Repository,
        recorded: dict[Hashable, dict[Any, asyncio.Future[Any]]] | None = None,
        recorded_once: dict[Hashable, asyncio.Future[Any]] | None = None,
    ) -> None:
        self._repository = repository
        self._recorded = recorded or {}
        self._recorded_once = recorded_once or {}
        self._loaders: dict[Hashable, DataLoader[Any, Any]] = {}
        for name in _BY_KEY:  # those of a previous run (clear, replay) are forgotten
            self.__dict__.pop(name, None)
        self._once: dict[Hashable, asyncio.Future[Any]] = {}
        # rows read before their by-id loader was first used, to prime it with then
        # (prime_consumers)
        self._primes: dict[str, list[Sequence[Row[Any]]]] = {}

    def __getattr__(self, name: str) -> DataLoader[Any, Any]:
        read = _BY_KEY.get(name)
        if read is None:
            raise AttributeError(name)
        loader = self._loader(name, getattr(self._repository, read))
        setattr(self, name, loader)
        for rows in self._primes.pop(name, ()):
            loader.prime_many({row.id: row for row in rows})
        return loader

    def _loader(
        self, name: Hashable, load_fn: Callable[[list[Any]], Awaitable[Sequence[Any]]]
    ) -> DataLoader[Any, Any]:
        loader = self._loaders[name] = DataLoader(load_fn, self._recorded.get(name))
        return loader

    def clear(self) -> None:
        """Forget everything loaded so far (after a write)."""
        self.__init__(self._repository)  # type: ignore[misc]  # every loader anew, in one place

    def replay(self) -> None:
        """Before graphql-core runs an operation again (the compiled executor fell back):
        every loader and read anew, cold, but answered from what the first run read, each
        in its batch's or read's own turn of the event loop. With warm caches, fields that
        waited for a load in the first run would complete at once, and reach errors that
        graphql-core alone never reaches, because a failing non-null field cancels them
        while their loads are still under way."""
        recorded = {name: {**self._recorded.get(name, {}), **{
            key: future for key, future in loader.loaded.items() if not future.cancelled()}}
            for name, loader in self._loaders.items()}
        once = {**self._recorded_once, **{
            key: future for key, future in self._once.items() if not future.cancelled()}}
        self.__init__(self._repository, recorded, once)  # type: ignore[misc]  # as clear()

    def once(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """A read that is not by key (a root page, a count) made once per request: when
        graphql-core takes an operation over from the compiled executor, it gets what was
        already read instead of reading again (see replay). Shielded as loads are."""
        future = self._once.get(key)
        if future is None:
            recorded = self._recorded_once.get(key)
            future = self._once[key] = asyncio.ensure_future(
                read() if recorded is None else _replayed(recorded))
            _unwatched(future)
        return asyncio.shield(future)

    def event_by_id(self, database: Database, reader: Reader
                    ) -> DataLoader[str, EventRecord | None]:
        """Events by id (``node(id: "evt_…")``), on the request's connection."""
        loader = self._loaders.get("event_by_id")
        if loader is None:
            loader = self._loader("event_by_id", partial(_load_events, database, reader))
        return cast("DataLoader[str, EventRecord | None]", loader)

    def prime_consumers(self, rows: Sequence[Row[Any]]) -> None:
        """Consumers read as a page need no second look-up (e.g. through Order.consumer).
        Primed when consumer_by_id is first used: most requests that read a page never use
        it, and a future per row costs more than keeping the page."""
        loader = self.__dict__.get("consumer_by_id")
        if loader is None:
            self._primes.setdefault("consumer_by_id", []).append(rows)
        else:
            loader.prime_many({row.id: row for row in rows})

    def audiences_by_consumer_id(self, request: PageRequest,
                                 columns: frozenset[str] | None = None) -> PageLoader:
        """`columns`: the audiences' columns the pages need (None: all); a loader each."""
        return self._paged("audiences", request, partial(
            self._repository.audience_pages_by_consumer_ids, columns=columns), columns)

    def orders_by_consumer_id(self, request: PageRequest,
                              columns: frozenset[str] | None = None) -> PageLoader:
        """`columns`: the orders' columns the pages need (None: all); a loader each."""
        return self._paged("orders", request, partial(
            self._repository.order_pages_by_consumer_ids, columns=columns), columns)

    def consumers_by_audience_id(self, request: PageRequest) -> PageLoader:
        return self._paged(
            "consumers", request, self._repository.consumer_pages_by_audience_ids
        )

    def _paged(
        self,
        name: str,
        request: PageRequest,
        load: Callable[[Sequence[str], PageRequest], Awaitable[list[Page[Row[Any]]]]],
        columns: frozenset[str] | None = None,
    ) -> PageLoader:
        key = (name, request) if columns is None else (name, request, columns)
        loader = self._loaders.get(key)
        if loader is None:
            loader = self._loader(key, partial(_load_pages, load, request))
        return cast(PageLoader, loader)


async def _load_pages(
    load: Callable[[Sequence[str], PageRequest], Awaitable[list[Page[Row[Any]]]]],
    request: PageRequest,
    keys: list[str],
) -> list[Page[Row[Any]]]:
    return await load(keys, request)


async def _load_events(database: Database, reader: Reader, keys: list[str]
                       ) -> list[EventRecord | None]:
    found = await events_by_id(database, keys, reader)
    return [found.get(key) for key in keys]
