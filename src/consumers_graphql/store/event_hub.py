"""The fan-out of change events to the subscriptions of one process.

One hub per process. It learns that events were committed from a *signal* and then reads
the new events once (store/events.py read_events, a page at a time) and hands each to every
subscriber whose filter it matches: N subscribers cost one query per signal, not N.

Signals: on PostgreSQL, ONE dedicated connection per process LISTENs on NOTIFY_CHANNEL
(every event-recording transaction notifies it at its commit); the payload is ignored, the
rows are read. The listener reconnects after an outage, and reads what was committed
meanwhile: nothing is lost, since the hub reads from its own position. Behind pgbouncer in
transaction mode LISTEN needs a direct connection (CONSUMERS_EVENTS_LISTEN_URL); without
one, on SQLite, and while the LISTEN connection is down, other processes' commits are
noticed by polling every CONSUMERS_EVENTS_POLL_INTERVAL_MS; this process's own commits
signal at once (subscribe_commits), unless a LISTEN connection is up (their NOTIFY signals
them).

A subscriber never trusts the live signal alone. It registers first, then replays from its
`after` position (read_events with its filter) until it has caught up, then takes what the
hub hands it, skipping what it has already delivered (by position): no gap, no duplicate at
the seam. Positions are in commit order (store/events.py), so "after position P" is exact.
Each subscriber's buffer is bounded: while it replays, an overflow only means it reads on
from the database (everything in the buffer is there too); once live, an overflow ends the
subscription (`Overflowed`), and the client resumes with `after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
from sqlalchemy import make_url, select

from consumers_graphql.settings import Pooler, Settings
from consumers_graphql.store import events, models
from consumers_graphql.store.db import Database
from consumers_graphql.store.events import EventRecord, Position
from consumers_graphql.store.outage import error_class, is_unavailable

logger = logging.getLogger("consumers_graphql.events")

# Events read per query, by the hub and by a replaying subscriber.
PAGE = 200
# The LISTEN connection's application_name (pg_stat_activity shows which backend it is).
LISTENER_NAME = "consumers-graphql events listener"
# How long the listener waits before connecting again after losing its connection (doubled
# on each failure, up to the most).
_RECONNECT_FIRST_S = 0.2
_RECONNECT_MOST_S = 5.0
# How often the listening connection is checked (a dead peer sends no goodbye).
_LISTENER_CHECK_S = 10.0


def backoff(failures: int) -> float:
    """Seconds to wait after the `failures`-th failure in a row: doubled each time from
    _RECONNECT_FIRST_S, at most _RECONNECT_MOST_S, for an outage of any length (2 ** n as a
    float overflows past n = 1023: about 85 minutes of retries)."""
    return min(_RECONNECT_MOST_S, _RECONNECT_FIRST_S * 2.0 ** min(failures, 16))


class SubscriptionLimitReached(Exception):
    """Too many subscriptions open: for the key, or in this process."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Overflowed(Exception):
    """The subscriber's buffer filled up while it was live: its client reads slower than
    events come. `last_id` is the last event delivered (None: none yet)."""

    def __init__(self, last_id: str | None, capacity: int) -> None:
        super().__init__(f"more than {capacity} events waiting")
        self.last_id, self.capacity = last_id, capacity


@dataclass(frozen=True)
class EventFilter:
    types: frozenset[str] | None = None
    subject_id: str | None = None

    def matches(self, record: EventRecord) -> bool:
        return ((self.types is None or record.type in self.types)
                and (self.subject_id is None or record.subject_id == self.subject_id))


class Subscriber:
    """One subscription's place in the stream: what it has delivered (`position`), and the
    live events handed to it that it has not yet (`_buffer`, at most `capacity`)."""

    def __init__(self, hub: EventHub, key_id: str, event_filter: EventFilter,
                 capacity: int) -> None:
        self.hub, self.key_id, self.filter, self.capacity = hub, key_id, event_filter, capacity
        self.position: Position | None = None
        self.last_id: str | None = None
        self._buffer: deque[EventRecord] = deque()
        self._wake = asyncio.Event()
        self._live = False
        self._lagging = False  # the buffer overflowed while replaying: read the database again
        self._overflowed = False

    @property
    def live(self) -> bool:
        """Past its replay: handed the hub's events as they come."""
        return self._live

    def offer(self, record: EventRecord) -> None:
        """A new event that matches the filter (the hub's read). Never blocks."""
        if self._overflowed:
            return
        if len(self._buffer) >= self.capacity:
            self._buffer.clear()
            if self._live:
                self._overflowed = True
            else:
                self._lagging = True
        else:
            self._buffer.append(record)
        self._wake.set()

    async def stream(self, after: Position | None) -> AsyncIterator[EventRecord]:
        """The events after `after` (None: from the oldest kept), replayed, then live."""
        self.position = after
        types = sorted(self.filter.types) if self.filter.types is not None else None
        while True:
            while True:
                page = await events.read_events(
                    self.hub.database, after=self.position, types=types,
                    subject_id=self.filter.subject_id, limit=PAGE)
                for record in page:
                    yield self._delivered(record)
                if len(page) < PAGE:
                    break
            # No await between the last read and this test: an overflow during the replay
            # means the buffer lost events that the database has; read it again.
            if not self._lagging:
                break
            self._lagging = False
        self._live = True
        while True:
            while not self._buffer:
                if self._overflowed:
                    raise Overflowed(self.last_id, self.capacity)
                self._wake.clear()
                await self._wake.wait()
            if self._overflowed:
                raise Overflowed(self.last_id, self.capacity)
            record = self._buffer.popleft()
            if self.position is not None and record.position <= self.position:
                continue  # replayed already (the seam)
            yield self._delivered(record)

    def _delivered(self, record: EventRecord) -> EventRecord:
        self.position, self.last_id = record.position, record.id
        return record


class EventHub:
    """See the module's docstring. `start` in the app's lifespan, `close` at its end. One
    piece: registering a subscriber and handing out what a read found must never interleave
    at an await (that is the no-gap argument), so both live here, beside the signals."""

    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings
        self._subscribers: set[Subscriber] = set()
        self._per_key: Counter[str] = Counter()
        self._position: Position | None = None
        self._stale = True  # no subscriber: `_position` means nothing, nothing is read
        self._signal = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None
        self.listening = False  # PostgreSQL: the LISTEN connection is up
        self.reads = 0  # the hub's reads of new events (the benchmark reports them)
        # The metrics' hooks (web/app.py): active subscriptions changed; an event was sent.
        self.on_change: Callable[[int], None] | None = None
        self.on_delivered: Callable[[EventRecord], None] | None = None

    @property
    def active(self) -> int:
        return len(self._subscribers)

    @property
    def replaying(self) -> int:
        """Subscriptions still reading the database before they go live (an overflow of
        their buffer means reading on, not SUBSCRIBER_TOO_SLOW)."""
        return sum(1 for subscriber in self._subscribers if not subscriber.live)

    def _listen_url(self) -> str | None:
        """The URL of the LISTEN connection, None when there is none to use (SQLite, or a
        transaction pooler without CONSUMERS_EVENTS_LISTEN_URL)."""
        settings = self.settings
        if settings.is_sqlite:
            return None
        if settings.events_listen_url is not None:
            return settings.events_listen_url
        if settings.database_pooler is Pooler.TRANSACTION:
            return None
        return settings.database_url

    async def start(self) -> None:
        self._unsubscribe = events.subscribe_commits(self.database, self._committed)
        self._tasks.append(asyncio.create_task(self._fan_out(), name="events fan-out"))
        listen_url = self._listen_url()
        if listen_url is not None:
            self._tasks.append(asyncio.create_task(self._listen(listen_url),
                                                   name="events listener"))
        elif not self.settings.is_sqlite:
            logger.warning(
                "subscriptions: no LISTEN connection behind a transaction pooler (set "
                "CONSUMERS_EVENTS_LISTEN_URL to the server itself); other processes' "
                "events are noticed by polling every %d ms",
                self.settings.events_poll_interval_ms)
        # Also while the LISTEN connection is down (an outage, a wrong listen URL, the
        # server's connections all taken): other processes' events still arrive.
        self._tasks.append(asyncio.create_task(self._poll(), name="events poll"))

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    # --- subscribers ---------------------------------------------------------------------------

    async def subscribe(self, key_id: str, event_filter: EventFilter) -> Subscriber:
        """A new subscriber, registered before it reads anything (the module's docstring);
        SubscriptionLimitReached when over a limit."""
        settings = self.settings
        self._check_limits(key_id)
        if self._stale:
            # Without subscribers the hub reads nothing (not even after a commit): its
            # position is set before the first one registers, so that every event after it
            # is handed on. Set once: a hub already reading must not be moved.
            position = await events.head(self.database)
            if self._stale:
                self._position, self._stale = position, False
        self._check_limits(key_id)  # (again: others may have subscribed meanwhile)
        subscriber = Subscriber(self, key_id, event_filter, settings.subscription_buffer)
        self._subscribers.add(subscriber)
        self._per_key[key_id] += 1
        self._changed()
        return subscriber

    def _check_limits(self, key_id: str) -> None:
        settings = self.settings
        if self._per_key[key_id] >= settings.subscriptions_per_key:
            raise SubscriptionLimitReached(
                f"This API key has {settings.subscriptions_per_key} subscriptions open in "
                "this process, the most allowed (CONSUMERS_SUBSCRIPTIONS_PER_KEY): complete "
                "one first.")
        if len(self._subscribers) >= settings.subscriptions_per_process:
            raise SubscriptionLimitReached(
                f"This server has {settings.subscriptions_per_process} subscriptions open, "
                "the most it serves (CONSUMERS_SUBSCRIPTIONS_PER_PROCESS): retry later.")

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber not in self._subscribers:
            return
        self._subscribers.discard(subscriber)
        self._per_key[subscriber.key_id] -= 1
        if self._per_key[subscriber.key_id] <= 0:
            del self._per_key[subscriber.key_id]
        if not self._subscribers:
            self._stale = True  # no reads until the next subscriber (subscribe)
        self._changed()

    def delivered(self, record: EventRecord) -> None:
        """A subscription is sending `record` now (the metrics count it and its lag)."""
        if self.on_delivered is not None:
            self.on_delivered(record)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self._subscribers))

    # --- the hub's reads -----------------------------------------------------------------------

    async def _fan_out(self) -> None:
        failures = 0
        while True:
            await self._signal.wait()
            self._signal.clear()
            try:
                await self._read_new()
                failures = 0
            except Exception as error:  # the database out of reach: again, a little later
                failures += 1
                if failures == 1:
                    # An outage has its one warning already (store/outage.py); anything else
                    # is worth one of its own.
                    level = logging.INFO if is_unavailable(error) else logging.WARNING
                    logger.log(level, "subscriptions: could not read new events (%s); "
                               "retrying", error_class(error))
                await asyncio.sleep(backoff(failures))
                self._signal.set()

    async def _read_new(self) -> None:
        while not self._stale:
            page = await events.read_events(self.database, after=self._position, types=None,
                                            subject_id=None, limit=PAGE)
            self.reads += 1
            # No await from here to the next read: a subscriber registered before this
            # point gets every event of the page, one registered after it replays them.
            for record in page:
                self._position = record.position
                for subscriber in self._subscribers:
                    if subscriber.filter.matches(record):
                        subscriber.offer(record)
            if len(page) < PAGE:
                return

    # --- signals -------------------------------------------------------------------------------

    async def _poll(self) -> None:
        interval = self.settings.events_poll_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self._subscribers and not self.listening:
                self._signal.set()

    async def _listen(self, url: str) -> None:
        """The one LISTEN connection of the process, for as long as the app runs."""
        delay = _RECONNECT_FIRST_S
        failed = ever_listened = False
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    **_connect_args(url), timeout=10,
                    server_settings={"application_name": LISTENER_NAME})
                lost = asyncio.Event()
                connection.add_termination_listener(functools.partial(_set, lost))
                await connection.add_listener(events.NOTIFY_CHANNEL, self._notified)
                self.listening = ever_listened = True
                if failed:
                    logger.info("subscriptions: listening for events again")
                failed, delay = False, _RECONNECT_FIRST_S
                self._signal.set()  # what was committed while nobody listened
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), _LISTENER_CHECK_S)
                    except TimeoutError:
                        await connection.fetchval("SELECT 1", timeout=_LISTENER_CHECK_S)
            except (OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as error:
                if not failed:
                    # A warning when it cannot be had at all (its URL, the server's
                    # max_connections); a connection lost later is the database's outage,
                    # which has its one warning already (store/outage.py).
                    logger.log(logging.INFO if ever_listened else logging.WARNING,
                               "subscriptions: the LISTEN connection is down (%s); "
                               "reconnecting", error_class(error))
                failed = True
            finally:
                self.listening = False
                if connection is not None:
                    connection.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MOST_S)

    def _notified(self, *_args: object) -> None:
        self._signal.set()

    def _committed(self) -> None:
        """This process committed events. While the LISTEN connection is up its NOTIFY
        signals them too (a loopback round trip later): a second signal would cost a second
        read, which finds nothing, for most commits."""
        if not self.listening:
            self._signal.set()


async def head_event(database: Database) -> tuple[Position, str] | None:
    """The newest event's position and id (None: no event yet). A subscription without
    `after` starts after it, and names it as the place to resume from when it ends before
    it has delivered anything (events.head gives the position only)."""
    table = models.Event.__table__
    async with database.primary_engine.connect() as conn:
        row = (await conn.execute(select(table.c.position, table.c.id)
                                  .order_by(table.c.position.desc()).limit(1))).first()
    return None if row is None else (Position(int(row.position)), str(row.id))


def _set(flag: asyncio.Event, *_args: object) -> None:
    flag.set()


def _connect_args(url: str) -> dict[str, object]:
    """asyncpg's arguments for a SQLAlchemy URL (postgresql+asyncpg://…)."""
    parsed = make_url(url)
    args: dict[str, object] = {
        "host": parsed.host, "port": parsed.port, "user": parsed.username,
        "password": parsed.password, "database": parsed.database,
    }
    ssl = parsed.query.get("ssl")
    if isinstance(ssl, str):
        args["ssl"] = ssl
    return {name: value for name, value in args.items() if value is not None}
