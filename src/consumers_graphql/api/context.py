"""What every resolver gets: the request's repository and loaders."""

from __future__ import annotations

from dataclasses import dataclass

import strawberry

from consumers_graphql.api.loaders import Loaders
from consumers_graphql.auth import Principal
from consumers_graphql.db import Database
from consumers_graphql.repository import Repository
from consumers_graphql.settings import Settings


@dataclass
class Context:
    settings: Settings
    database: Database
    repository: Repository
    loaders: Loaders
    # The API key of the HTTP request (auth.ANONYMOUS for the GraphiQL page); None for an
    # in-process caller of schema.execute, which is trusted.
    principal: Principal | None = None


Info = strawberry.Info[Context, None]
