"""What every resolver gets: the request's repository and loaders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import strawberry

from consumers_graphql.api.loaders import Loaders
from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.store.event_hub import EventHub
from consumers_graphql.store.keys import KeyStore, Principal
from consumers_graphql.store.repository import Repository
from consumers_graphql.web.rate_limit import RateLimiter, Throttle

if TYPE_CHECKING:
    from consumers_graphql.api.limits import PinnedDocument


@dataclass
class Context:
    settings: Settings
    database: Database
    repository: Repository
    loaders: Loaders
    # The API key of the HTTP request (auth.ANONYMOUS for the GraphiQL page); None for an
    # in-process caller of schema.execute, which is trusted.
    principal: Principal | None = None
    # The API key's rate limit (web/rate_limit.py); None: not limited (in-process callers).
    rate_limiter: RateLimiter | None = None
    # The operation's cost once priced and no limit refused it (api/limits.py), and its
    # key's bucket once the cost was taken from it (`admitted`: the bucket was asked).
    cost: int | None = None
    requested: int | None = None  # its `extensions.cost.requested`: the nodes alone
    admitted: bool = False
    throttle: Throttle | None = None
    # A keyed mutation is priced and charged before its transaction opens (api/http.py), so
    # that a refusal sends no SQL: `charge_only` runs that first pass (execution stops once
    # the cost is taken), `charged` says it was taken (the second pass executes at once).
    charge_only: bool = False
    charged: bool = False
    # The trusted document the request named (api/documents.py): parsed and validated once.
    pinned: PinnedDocument | None = None

    # A WebSocket's context (api/websocket.py): the process's fan-out of change events, and
    # the keys that connection_init checks. None over HTTP.
    event_hub: EventHub | None = None
    keys: KeyStore | None = None


Info = strawberry.Info[Context, None]
