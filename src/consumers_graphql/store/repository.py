"""The read side: Core queries for pages, look-ups by id and batched relation loads, written
by aggregate in ``store.queries`` and held here as one object per request.

Everything is one statement per call, whatever the number of keys, so that the DataLoaders
above it keep a page of any size at a constant number of statements.
"""

from __future__ import annotations

from consumers_graphql.store.queries.audiences import AudienceReads
from consumers_graphql.store.queries.consumers import ConsumerReads
from consumers_graphql.store.queries.orders import OrderReads


class Repository(ConsumerReads, AudienceReads, OrderReads):
    """Read queries over one request's connection."""
