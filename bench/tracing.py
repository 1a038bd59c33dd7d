#!/usr/bin/env python
"""What tracing costs a request: the same GraphQL page (20 consumers with their audiences and
orders) through two apps in one process, tracing off and on (the SDK with a batch processor
and an exporter that discards, so the network is not measured), in interleaved rounds.

  .venv/bin/python bench/tracing.py                    a fresh SQLite file
  .venv/bin/python bench/tracing.py postgresql+asyncpg://postgres@127.0.0.1:5432/empty_db

Needs the [otel] extra. Only the ratio means much on a shared machine.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumers_graphql.settings import Settings
from consumers_graphql.store import models
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app, tune_gc
from tests.factories import (
    BASE_TIME,
    consumer_row,
    insert_consumers,
    insert_rows,
    order_row,
)

PAGE = """query Page { consumers(first: 20) { edges { node { id email fullName phone totalOrders
  audiences(first: 5) { nodes { id name } } orders(first: 5) { nodes { id amount placedAt } }
} } } }"""
ROUNDS, PER_ROUND, WARM_UP = 30, 20, 5


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


async def main(url: str) -> None:
    # A rate limit bucket no run empties (1,200 pages of 220 points): see bench/worker.py.
    settings = Settings(database_url=url, key_pepper="bench",  # type: ignore[arg-type]
                        rate_limit_capacity=1_000_000_000,
                        rate_limit_restore_rate=1_000_000_000)
    engine = make_engine(settings, writer=True)
    await upgrade(engine)
    rows = [consumer_row(n) for n in range(40)]
    await insert_consumers(engine, rows)
    await insert_rows(engine, models.Order,
                      [order_row(r["id"], "5.00", BASE_TIME) for r in rows for _ in range(3)])
    await engine.dispose()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    apps = {"off": create_app(settings), "on": create_app(settings, tracer_provider=provider)}
    tune_gc()
    async with LifespanManager(apps["off"]), LifespanManager(apps["on"]):
        created = await apps["off"].state.keys.create("bench")
        headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
        clients = {name: httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                           base_url="http://bench") for name, app in apps.items()}
        times: dict[str, list[float]] = {name: [] for name in apps}
        for n in range(ROUNDS):
            for name in ("off", "on") if n % 2 else ("on", "off"):
                started = time.perf_counter()
                for _ in range(PER_ROUND):
                    response = await clients[name].post("/graphql", json={"query": PAGE},
                                                        headers=headers)
                    assert response.status_code == 200 and "errors" not in response.json()
                times[name].append((time.perf_counter() - started) / PER_ROUND * 1000)
        medians = {name: statistics.median(values[WARM_UP:]) for name, values in times.items()}
        for name, median in medians.items():
            print(f"tracing {name:3}  {median:.2f} ms/request (median)")
        print(f"on/off   {medians['on'] / medians['off']:.3f}")
    provider.shutdown()


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else (
        f"sqlite+aiosqlite:///{tempfile.mkdtemp(prefix='tracing-bench-')}/bench.db")
    asyncio.run(main(target))
