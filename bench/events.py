#!/usr/bin/env python
"""Commit-to-delivery latency of subscriptions: p50 and p99, for 1 and 100 subscribers, on
SQLite and on PostgreSQL (target: p50 under 100 ms).

The app (create_app, its lifespan) is served by uvicorn on a loopback port in this process;
each subscriber is a WebSocket of its own (the `websockets` client) subscribed to every
event. A writer records one event per transaction (store/events.py record_events, the path
every write takes), `--events` of them, `--gap-ms` apart; an event's latency is from the end
of its commit to its arrival at a subscriber, every subscriber counted.

  .venv/bin/python bench/events.py                       SQLite (a temporary file)
  .venv/bin/python bench/events.py --postgres postgresql+asyncpg://postgres@127.0.0.1/postgres
        (a database of its own is created there and dropped)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn
import websockets
from asgi_lifespan import LifespanManager
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import make_engine
from consumers_graphql.store.events import NewEvent, record_events
from consumers_graphql.store.migrate import upgrade
from consumers_graphql.web.app import create_app

SUBSCRIBE = "subscription { events { id subjectId } }"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _subscriber(url: str, secret: str, count: int, arrived: dict[str, list[float]],
                      ready: asyncio.Event, ready_count: list[int], total: int) -> None:
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                                  max_queue=None) as socket:
        await socket.send(json.dumps({"type": "connection_init",
                                      "payload": {"Authorization": f"Bearer {secret}"}}))
        await socket.recv()
        await socket.send(json.dumps({"id": "1", "type": "subscribe",
                                      "payload": {"query": SUBSCRIBE}}))
        ready_count[0] += 1
        if ready_count[0] == total:
            ready.set()
        for _ in range(count):
            message: dict[str, Any] = json.loads(await socket.recv())
            at = time.perf_counter()
            arrived.setdefault(message["payload"]["data"]["events"]["subjectId"], []).append(at)


async def measure(database_url: str, subscribers: int, count: int, gap_s: float
                  ) -> tuple[list[float], int]:
    """Every delivery's latency, and the reads of new events the hub made (one per signal,
    whatever the number of subscribers)."""
    settings = Settings(database_url=database_url, key_pepper="bench",  # type: ignore[arg-type]
                        subscriptions_per_key=subscribers, metrics_enabled=False,
                        rate_limit_capacity=0)
    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    app = create_app(settings)
    port = _free_port()
    async with LifespanManager(app):
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               lifespan="off", log_level="warning",
                                               ws="websockets-sansio"))
        serving = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110  # uvicorn's flag has no event
            await asyncio.sleep(0.01)
        secret = (await app.state.keys.create("bench")).secret.get_secret_value()
        arrived: dict[str, list[float]] = {}
        ready, ready_count = asyncio.Event(), [0]
        url = f"ws://127.0.0.1:{port}/graphql"
        tasks = [asyncio.create_task(_subscriber(url, secret, count, arrived, ready,
                                                 ready_count, subscribers))
                 for _ in range(subscribers)]
        await ready.wait()
        await asyncio.sleep(0.5)  # every subscription registered with the hub
        database = app.state.database
        committed: dict[str, float] = {}
        run = uuid.uuid4().hex[:8]
        for n in range(count):
            subject = f"cons_bench{run}{n}"
            async with database.write_sessions() as session, session.begin():
                await record_events(database, session,
                                    [NewEvent("CONSUMER_UPDATED", subject, {"n": n})])
            committed[subject] = time.perf_counter()
            await asyncio.sleep(gap_s)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        reads = app.state.event_hub.reads
        server.should_exit = True
        await serving
    return [at - committed[subject] for subject, times in arrived.items() for at in times], reads


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL server's URL (a database is made)")
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    targets: list[tuple[str, str]] = []
    directory = Path(tempfile.mkdtemp(prefix="bench-events-"))
    targets.append(("sqlite", f"sqlite+aiosqlite:///{directory / 'events.db'}"))
    admin = None
    name = f"bench_events_{uuid.uuid4().hex[:8]}"
    if args.postgres:
        admin = create_async_engine(make_url(args.postgres), isolation_level="AUTOCOMMIT")
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        targets.append(("postgresql", make_url(args.postgres).set(database=name)
                        .render_as_string(hide_password=False)))
    failed = False
    try:
        print(f"{'database':<12}{'subscribers':>12}{'deliveries':>12}{'hub reads':>11}"
              f"{'p50 ms':>10}{'p99 ms':>10}")
        for label, url in targets:
            for subscribers in (1, 100):
                latencies, reads = await measure(url, subscribers, args.events,
                                                 args.gap_ms / 1000)
                p50 = statistics.median(latencies) * 1000
                p99 = _quantile(latencies, 0.99) * 1000
                failed |= p50 >= 100
                print(f"{label:<12}{subscribers:>12}{len(latencies):>12}{reads:>11}"
                      f"{p50:>10.1f}{p99:>10.1f}")
    finally:
        if admin is not None:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await admin.dispose()
    print("target p50 < 100 ms:", "missed" if failed else "met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
