"""What every resolver gets: the request's repository and loaders."""

from __future__ import annotations

from dataclasses import dataclass

import strawberry
from strawberry.fastapi import BaseContext

from consumers_graphql.api.loaders import Loaders
from consumers_graphql.db import Database
from consumers_graphql.repository import Repository
from consumers_graphql.settings import Settings


@dataclass
class Context(BaseContext):
    settings: Settings
    database: Database
    repository: Repository
    loaders: Loaders

    def __post_init__(self) -> None:
        super().__init__()


Info = strawberry.Info[Context, None]
