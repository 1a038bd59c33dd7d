"""What sending the API's reads to asyncpg directly saves (README "PostgreSQL", issue 14).

    python bench/driver_reads.py [--requests N] [--rounds R] [--postgres URL]

In process, on the PostgreSQL 100k dataset of bench/peer.py (built when missing): W1, W2,
W3 and the search page of bench/peer.py, POST /graphql through httpx.ASGITransport into
one app, with its reads sent to asyncpg directly and through SQLAlchemy's execution in
turn (the app's `database.driver_reads`), R rounds of N requests each, on uvloop as
`serve` runs. Per workload and
variant: the median over the rounds of the CPU time per request (process time: the
server's and the in-process client's, which is the same for both variants) and the ratio.
The answers of both variants are compared first.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx
import orjson
import uvloop
from asgi_lifespan import LifespanManager

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import peer  # noqa: E402
import run  # noqa: E402

from consumers_graphql.settings import Settings  # noqa: E402
from consumers_graphql.web.app import create_app, tune_gc  # noqa: E402


async def cpu_ms(client: httpx.AsyncClient, n: int, body: bytes, headers: dict[str, str]
                 ) -> float:
    started = time.process_time()
    for _ in range(n):
        response = await client.post("/graphql", content=body, headers=headers)
        response.raise_for_status()
    return (time.process_time() - started) / n * 1_000


async def measure(ds: run.Dataset, prep: dict[str, object], requests: int, rounds: int
                  ) -> None:
    settings = Settings(database_url=ds.url, log_level="warning",
                        rate_limit_capacity=1_000_000_000,
                        rate_limit_restore_rate=1_000_000_000)
    app = create_app(settings)
    tune_gc()
    async with LifespanManager(app) as manager:
        database = app.state.database
        headers = {"Authorization": f"Bearer {prep['secret']}",
                   "Content-Type": "application/json"}
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for w in peer.make_workloads(prep):
                if w.name == "typename":
                    continue  # no read
                body = orjson.dumps({"query": w.ours[0], "variables": w.ours[1]})
                answers = []
                for driver_reads in (True, False):
                    database.driver_reads = driver_reads
                    answers.append((await client.post("/graphql", content=body,
                                                      headers=headers)).json())
                if answers[0] != answers[1] or "errors" in answers[0]:
                    raise SystemExit(f"{w.name}: the two variants answer differently")
                times: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(rounds):
                    for driver_reads in (True, False):
                        database.driver_reads = driver_reads
                        await cpu_ms(client, 20, body, headers)  # this variant's warm-up
                        times[driver_reads].append(await cpu_ms(client, requests, body,
                                                                headers))
                direct, through = (statistics.median(times[True]),
                                   statistics.median(times[False]))
                print(f"{w.name} ({w.what}): to asyncpg {direct:.3f} ms, through "
                      f"SQLAlchemy {through:.3f} ms of CPU a request, "
                      f"{direct / through:.3f}x ({(direct - through) * 1_000:+.0f} µs)",
                      flush=True)
    print(f"median of {rounds} rounds of {requests} requests per variant, in process "
          "(the in-process client's CPU included in both)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--postgres", default=run.DEFAULT_PG)
    args = parser.parse_args()
    if not asyncio.run(run._postgres_reachable(args.postgres)):
        raise SystemExit(f"PostgreSQL at {args.postgres} is unreachable")
    ds = peer.dataset(args.postgres)
    prep = asyncio.run(peer.prepare(ds))
    prep["peer_cursor"] = None  # (the peer is not run here)
    uvloop.run(measure(ds, prep, args.requests, args.rounds))  # the served loop


if __name__ == "__main__":
    main()
