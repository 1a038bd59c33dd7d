"""One benchmark variant in a process of its own, driven by the coordinator over a pipe.

``run`` (the process) sets the app, or a baseline, up in process behind
``httpx.ASGITransport`` inside ``asgi_lifespan.LifespanManager``, then answers commands:
``{"cmd": "round", "n": 10}`` runs n requests and reports their times and SQL statements;
``capture`` returns one response with the statements it sent (for R1); ``profile`` runs n
requests under cProfile; ``quit`` ends the process.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import itertools
import os
import pstats
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import httpx
import orjson
from asgi_lifespan import LifespanManager

# Imported here so that the fork server loads it once, not every variant's process.
import consumers_graphql.web.app  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines
import workloads


def server_settings(url: str) -> Any:
    """The measured server's settings: the environment's, the variant's database, and a rate
    limit bucket no run can empty (limiter on, as in production: its own cost is in the
    numbers, bench/rate_limit.py measures it alone). The default bucket (20,000 points,
    2,000 a second) would answer W1 (520 points a page, hundreds of pages a second) 429
    within a second."""
    from consumers_graphql.settings import Settings

    return Settings(database_url=url, log_level="warning",
                    rate_limit_capacity=1_000_000_000, rate_limit_restore_rate=1_000_000_000)


class Statements:
    """The SQL one request sends on the app's engines, authentication apart, with the time
    spent between sending each statement and getting its cursor back."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.auth: list[tuple[str, Any]] = []
        self.outbox: list[tuple[str, Any]] = []  # the change events' (store/events.py)
        self.db_seconds = 0.0
        self._started: dict[int, float] = {}

    def reset(self) -> None:
        self.items = []
        self.auth = []
        self.outbox = []
        self.db_seconds = 0.0

    def before(self, _conn: Any, cursor: Any, statement: str, params: Any, context: Any,
               _many: bool) -> None:
        from consumers_graphql.store.events import EVENTS_EXECUTION_OPTION, PRUNE_EXECUTION_OPTION
        from consumers_graphql.store.keys import AUTH_EXECUTION_OPTION

        options = context.execution_options if context is not None else {}
        target = (self.auth if options.get(AUTH_EXECUTION_OPTION)
                  else self.outbox if options.get(EVENTS_EXECUTION_OPTION)
                  or options.get(PRUNE_EXECUTION_OPTION) else self.items)
        target.append((statement, params))
        self._started[id(cursor)] = time.perf_counter()

    def after(self, _conn: Any, cursor: Any, *_args: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if started is not None:
            self.db_seconds += time.perf_counter() - started

    def attach(self, engines: list[Any]) -> None:
        from sqlalchemy import event

        for engine in engines:
            event.listen(engine, "before_cursor_execute", self.before)
            event.listen(engine, "after_cursor_execute", self.after)


class Target:
    """What a variant sends its requests to, and how to tidy up after a round."""

    def __init__(self, spec: dict[str, Any], secret: str) -> None:
        self.spec = spec
        self.secret = secret
        self.statements = Statements()
        self.app: Any = None
        self.database: Any = None
        self._tags = itertools.count()
        self.created: list[str] = []

    def build(self) -> Any:
        kind = self.spec["kind"]
        if kind == "graphql" and self.spec["extra"].get("outbox") is False:
            # The baseline of the outbox's cost (W5 without events): this variant's own
            # process records no change events. A benchmark switch, not a setting: the
            # service always records them.
            from consumers_graphql.domain import common
            from consumers_graphql.store import idempotency

            async def no_events(*_args: Any, **_kwargs: Any) -> None:
                return None

            # (A keyed request's unit records its use-cases' events at its end.)
            common.record_events = no_events  # type: ignore[assignment]
            idempotency.record_events = no_events  # type: ignore[assignment]
        if kind == "graphql":
            from consumers_graphql.web.app import create_app

            self.app = create_app(server_settings(self.spec["url"]))
        elif kind == "r1":
            self.app = baselines.R1App(self.spec["extra"]["r1"], counter=self.statements)
        elif kind == "hello":
            self.app = baselines.HelloApp(self.spec["extra"]["body"])
        else:
            raise ValueError(f"unknown variant kind {kind!r}")
        # Every variant runs under the collector settings `serve` uses.
        from consumers_graphql.web.app import tune_gc

        tune_gc()
        return self.app

    def started(self) -> None:
        if self.spec["kind"] == "graphql":
            self.database = self.app.state.database
            self.statements.attach(self.database.engines)

    @property
    def upserts(self) -> bool:
        return bool(self.spec["extra"].get("upsert"))

    def body(self) -> bytes:
        variables = self.spec["variables"]
        if self.spec["write"]:
            tag = f"{os.getpid()}-{time.monotonic_ns()}-{next(self._tags)}"
            items = workloads.upsert_input(tag) if self.upserts else workloads.batch_input(tag)
            variables = {**variables, "input": items}
        return orjson.dumps({"query": self.spec["query"], "variables": variables})

    def collect(self, response: dict[str, Any]) -> None:
        if not self.spec["write"]:
            return
        if self.upserts:
            payload = response["data"]["consumerBatchUpsert"]
            created = [r["consumer"]["id"] for r in payload["results"] if r["created"]]
            expected = workloads.BATCH_SIZE - workloads.W6_EXISTING
        else:
            payload = response["data"]["consumerBatchCreate"]
            created = [r["consumer"]["id"] for r in payload["results"] if r["consumer"]]
            expected = workloads.BATCH_SIZE
        self.created += created
        if (payload["userErrors"] or payload["count"] != workloads.BATCH_SIZE
                or len(created) != expected):
            raise RuntimeError(f"{self.spec['name']} wrote {payload['count']} rows, created "
                               f"{len(created)}: {payload['userErrors'][:3]}")

    async def tidy(self) -> None:
        """Takes out what W5 or W6 created, outside the timed requests; W6's consumers to
        update are made when the worker starts."""
        if not self.spec["write"] or self.database is None:
            return
        from sqlalchemy import text

        ids, self.created = self.created, []
        if self.upserts and not ids:
            await remove_w6_rows(self.database.write_engine)
            await insert_w6_base(self.database.write_engine)
            return
        async with self.database.write_engine.begin() as conn:
            if ids:
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    marks = ", ".join(f":p{i}" for i in range(len(chunk)))
                    await conn.execute(
                        text(f"DELETE FROM consumers WHERE id IN ({marks})"),
                        {f"p{i}": v for i, v in enumerate(chunk)},
                    )
            else:  # leftovers of an interrupted run
                await conn.execute(text(
                    "DELETE FROM consumers WHERE email_key LIKE :domain "
                    "OR external_id LIKE :prefix"
                ), {"domain": f"%@{workloads.W5_DOMAIN}",
                    "prefix": f"{workloads.W5_EXTERNAL_PREFIX}%"})


async def remove_w6_rows(engine: Any) -> None:
    from sqlalchemy import text

    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM consumers WHERE external_id LIKE :base "
                                "OR external_id LIKE :new"),
                           {"base": f"{workloads.W6_BASE_PREFIX}%",
                            "new": f"{workloads.W6_NEW_PREFIX}%"})


async def insert_w6_base(engine: Any) -> None:
    """The consumers W6 updates, created a year before the data's oldest (so that W1's pages
    and W2's cursors never meet them)."""
    from datetime import UTC, datetime
    from decimal import Decimal

    from sqlalchemy import insert

    from consumers_graphql.ids import IdKind, new_id
    from consumers_graphql.store import models
    from consumers_graphql.store.normalize import derived_fields

    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(workloads.W6_EXISTING):
        email, name = f"w6.base.{2 * i}@{workloads.W6_DOMAIN}", f"Bench Base {i}"
        rows.append({
            "id": new_id(IdKind.CONSUMER, long_ago), "email": email, "phone": None,
            "full_name": name, "metadata": {"n": i},
            "external_id": f"{workloads.W6_BASE_PREFIX}{i}",
            "total_orders": 0, "total_order_value": Decimal(0), "last_order_at": None,
            "created_at": long_ago, "updated_at": long_ago,
            **derived_fields(email, None, name),
        })
    async with engine.begin() as conn:
        await conn.execute(insert(models.Consumer.__table__), rows)


async def serve(conn: Connection, spec: dict[str, Any], secret: str) -> None:
    target = Target(spec, secret)
    app = target.build()
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json",
               "accept": "application/json"}
    async with LifespanManager(app) as manager:
        target.started()
        await target.tidy()
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def one(body: bytes) -> tuple[float, dict[str, Any]]:
                target.statements.reset()
                started = time.perf_counter()
                response = await client.post("/graphql", content=body, headers=headers)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    raise RuntimeError(f"{spec['name']}: HTTP {response.status_code}: "
                                       f"{response.text[:500]}")
                parsed = orjson.loads(response.content)
                if parsed.get("errors"):
                    raise RuntimeError(f"{spec['name']}: {parsed['errors']}")
                target.collect(parsed)
                return elapsed, parsed

            conn.send({"ready": True, "pid": os.getpid()})
            while True:
                command = conn.recv()
                cmd = command["cmd"]
                if cmd == "quit":
                    break
                if cmd == "round":
                    times, counts, db = [], [], []
                    bodies = [target.body() for _ in range(command["n"])]
                    for body in bodies:
                        elapsed, _ = await one(body)
                        times.append(elapsed)
                        counts.append(len(target.statements.items))
                        db.append(target.statements.db_seconds)
                    await target.tidy()
                    gc.collect()
                    reply: dict[str, Any] = {"times": times, "statements": counts, "db": db}
                elif cmd == "capture":
                    _, parsed = await one(target.body())
                    reply = {
                        "response": parsed,
                        "statements": [s for s, _ in target.statements.items],
                        "auth_statements": len(target.statements.auth),
                        "outbox_statements": [s for s, _ in target.statements.outbox],
                        "recorded": {"items": target.statements.items,
                                     "auth": target.statements.auth},
                    }
                    await target.tidy()
                elif cmd == "profile":
                    bodies = [target.body() for _ in range(command["n"])]
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for body in bodies:
                        await one(body)
                    profiler.disable()
                    await target.tidy()
                    text_out = io.StringIO()
                    stats = pstats.Stats(profiler, stream=text_out)
                    stats.sort_stats(command.get("sort", "cumulative")).print_stats(
                        command.get("limit", 40))
                    if command.get("dump"):
                        stats.dump_stats(command["dump"])
                    reply = {"profile": text_out.getvalue()}
                else:
                    reply = {"error": f"unknown command {cmd!r}"}
                conn.send(reply)


def run(conn: Connection, spec: dict[str, Any], secret: str, log_path: str) -> None:
    """The process's entry point (forked from a server that has imported the app)."""
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    try:
        asyncio.run(serve(conn, spec, secret))
    except BaseException as error:  # the coordinator shows it and stops the run
        traceback.print_exc()
        sys.stderr.flush()
        conn.send({"error": f"{type(error).__name__}: {error}"})
    finally:
        conn.close()
