"""Health probes, without a key and outside the OpenAPI document.

- `/livez`: the process answers HTTP (no I/O): restart it when this fails.
- `/readyz` (and `/healthz`, its older name): the database (and the replica, when one is
  configured) answers, within
  `CONSUMERS_HEALTH_TIMEOUT_S`, and its schema is the one this version needs; 503 with
  Retry-After and the reason otherwise: send it no traffic.

The probes connect through engines of their own, without a pool (Database.primary_probe,
replica_probe): requests holding every pooled connection of a busy process must not read
as a database that is down, or a load balancer would drop every busy instance at once.
A database that refuses the connection (a missing database or role, a bad password) is a
503 too, its reason naming the setting and the error's class or SQLSTATE, never the
driver's message or the URL.

The schema revision is read again at most every SCHEMA_RECHECK_S while it is at head (a
migration only moves it on, and a probe every few seconds need not read alembic_version
each time; `SELECT 1` still proves the database answers), and at every probe while it is
not, so a process becomes ready as soon as `consumers-graphql migrate` has run. A revision
this version does not know is a newer one (a later version migrated first, as a rolling
deploy does with backward-compatible migrations): ready, so the old processes keep serving
until they are replaced."""

from __future__ import annotations

import asyncio
import time

from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.store.migrate import alembic_config, current_revision
from consumers_graphql.store.outage import error_class, is_unavailable

SCHEMA_RECHECK_S = 30.0
UNREACHABLE = "database unreachable"
REPLICA_UNREACHABLE = "read replica unreachable"
PRIMARY, REPLICA = "database", "read replica"
SETTINGS = {PRIMARY: "CONSUMERS_DATABASE_URL", REPLICA: "CONSUMERS_DATABASE_REPLICA_URL"}


class Readiness:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._head: str | None = None
        self._known: frozenset[str] = frozenset()
        self._verified_until = 0.0

    def head(self) -> str:
        """The revision this version needs (the scripts are read once, at startup)."""
        if self._head is None:
            script = ScriptDirectory.from_config(alembic_config())
            self._known = frozenset(r.revision for r in script.walk_revisions())
            head = script.get_current_head()
            assert head is not None
            self._head = head
        return self._head

    async def problem(self, database: Database) -> str | None:
        """None when ready; the reason otherwise."""
        head = self.head()
        timeout = self.settings.health_timeout_s
        probing = PRIMARY
        try:
            async with asyncio.timeout(timeout):
                # The replica answers too, when there is one: queries go there.
                if database.replica_probe is not None:
                    probing = REPLICA
                    async with database.replica_probe.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                    probing = PRIMARY
                if time.monotonic() < self._verified_until:
                    async with database.primary_probe.connect() as conn:
                        await conn.execute(text("SELECT 1"))
                    return None
                current = await current_revision(database.primary_probe)
        except TimeoutError:  # before OSError, of which it is one
            self._verified_until = 0.0
            return f"{probing} did not answer within {timeout:g} s"
        except (DBAPIError, OSError) as error:
            self._verified_until = 0.0
            if not is_unavailable(error):  # refused: a configuration to fix, not an outage
                return f"{probing} refused the probe ({SETTINGS[probing]}): " \
                       f"{error_class(error)}"
            if probing == REPLICA:
                assert database.replica_outage is not None
                database.replica_outage.failed(error)
                return REPLICA_UNREACHABLE
            database.outage.failed(error)
            return UNREACHABLE
        if current is None:
            return f"database has no schema, this version needs revision {head}: run " \
                   "`consumers-graphql migrate`"
        if current != head and current in self._known:
            return f"schema at revision {current}, this version needs {head}: run " \
                   "`consumers-graphql migrate`"
        self._verified_until = time.monotonic() + SCHEMA_RECHECK_S
        return None


async def livez(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    readiness: Readiness = request.app.state.readiness
    settings: Settings = request.app.state.settings
    reason = await readiness.problem(request.app.state.database)
    if reason is None:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503,
                        headers={"Retry-After": str(settings.retry_after_s)})
