"""`Subscription.events`: change events over the graphql-transport-ws WebSocket (api/websocket.py),
replayed from `after` and then live, through the process's hub (store/event_hub.py)."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

import strawberry
from graphql import GraphQLError

from consumers_graphql.api import decorators
from consumers_graphql.api.context import Info
from consumers_graphql.api.types import Event
from consumers_graphql.api.websocket import SUBSCRIPTION_LIMIT_REACHED
from consumers_graphql.errors import DomainError
from consumers_graphql.store import events
from consumers_graphql.store.event_hub import (
    EventFilter,
    Overflowed,
    SubscriptionLimitReached,
    head_event,
)
from consumers_graphql.store.events import EventType as EventKind
from consumers_graphql.store.events import Position
from consumers_graphql.store.outage import GRAPHQL_MESSAGE, SERVICE_UNAVAILABLE, is_unavailable
from consumers_graphql.web.rate_limit import THROTTLED, RateLimitUnavailable

logger = logging.getLogger("consumers_graphql.graphql")

INTERNAL_SERVER_ERROR = "INTERNAL_SERVER_ERROR"
INTERNAL_MESSAGE = "Internal server error."
SUBSCRIBER_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"

def _error(message: str, code: str, **extensions: Any) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code, **extensions})


@strawberry.type
class Subscription:
    @decorators.subscription(description=(
        "Change events as they are committed, by any process or host, in commit order. With "
        "`after` (an event id `evt_…` or a cursor of `Query.events`) the events after it are "
        "replayed first, then live ones follow, with no gap and no duplicate; without it, "
        "only events committed from now on. `types` and `subjectId` filter both. At most "
        "CONSUMERS_SUBSCRIPTIONS_PER_KEY subscriptions per API key (per server process). A "
        "client that reads slower than events come has its subscription ended "
        "(SUBSCRIBER_TOO_SLOW) once CONSUMERS_SUBSCRIPTION_BUFFER events wait: resume with "
        "`after` set to the last event received. Only over the graphql-transport-ws "
        "WebSocket at /graphql."))
    async def events(
        self, info: Info, types: list[EventKind] | None = None,
        subject_id: strawberry.ID | None = None, after: str | None = None,
    ) -> AsyncGenerator[Event, None]:
        context = info.context
        hub = context.event_hub
        principal = context.principal
        if hub is None or principal is None:
            raise _error("Subscriptions are served over the graphql-transport-ws WebSocket at "
                         "/graphql only.", "OPERATION_NOT_SUPPORTED")
        if context.rate_limiter is not None:
            # Subscribing costs what the operation is priced at, once.
            try:
                throttle = await context.rate_limiter.take(principal, max(1, context.cost or 1))
            except RateLimitUnavailable:
                raise _error(GRAPHQL_MESSAGE, SERVICE_UNAVAILABLE) from None
            if throttle is not None and not throttle.allowed:
                raise _error(
                    f"Throttled: this API key's bucket holds {math.floor(throttle.available):,} "
                    f"points; retry in {throttle.retry_after} s.", THROTTLED,
                    throttleStatus=throttle.status())
        event_filter = EventFilter(
            types=None if types is None else frozenset(t.value for t in types),
            subject_id=None if subject_id is None else str(subject_id))
        try:
            subscriber = await hub.subscribe(principal.key_id, event_filter)
        except SubscriptionLimitReached as refused:
            raise _error(refused.message, SUBSCRIPTION_LIMIT_REACHED) from None
        except Exception as error:  # the first subscriber's read of the head
            raise _unexpected(error, after) from None
        try:
            # Registered first, then the starting point: nothing committed in between is
            # missed (store/event_hub.py).
            start: Position | None = None
            if after is not None:
                start = await events.resolve_after(hub.database, after)
            elif (newest := await head_event(hub.database)) is not None:
                # Live from now: after the newest event, which is where to resume from.
                start, after = newest
            async for record in subscriber.stream(start):
                hub.delivered(record)
                yield Event.from_record(record)
        except DomainError as error:
            raise _error(error.message, error.code.value,
                         **({"field": list(error.field)} if error.field else {})) from None
        except Overflowed as overflowed:
            resume = overflowed.last_id or after
            raise _error(
                f"This subscription was ended: more than {overflowed.capacity:,} events were "
                "waiting to be sent (the client reads slower than events come). Subscribe "
                + (f'again with `after: "{resume}"` (the last event delivered, or the one '
                   "it started after) to resume without a gap." if resume else
                   "again once you have read the events so far from Query.events (no event "
                   "existed when it began), with `after` set to the last of them."),
                SUBSCRIBER_TOO_SLOW, after=resume) from None
        except Exception as error:
            raise _unexpected(error, subscriber.last_id or after) from None
        finally:
            hub.unsubscribe(subscriber)


def _unexpected(error: Exception, after: str | None) -> GraphQLError:
    """SERVICE_UNAVAILABLE (naming where to resume) for an outage, else masked as every
    unexpected error is (api/schema.py) and logged here: the stream's errors do not pass
    the schema's error handling."""
    if is_unavailable(error):
        return _error(GRAPHQL_MESSAGE, SERVICE_UNAVAILABLE, after=after)
    logger.error("unexpected error in a subscription", exc_info=error)
    return _error(INTERNAL_MESSAGE, INTERNAL_SERVER_ERROR)
