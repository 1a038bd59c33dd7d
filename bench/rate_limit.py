"""What the rate limiter costs a request (README "Rate limits", issue 15).

    python bench/rate_limit.py [--requests N] [--redis-url redis://127.0.0.1:6379/9]

1. In process: `RateLimiter.take` alone, on the per-process buckets (target < 0.05 ms).
2. Through the app, in process: `{ __typename }` (cost 1) with rate limiting on and off
   (`CONSUMERS_RATE_LIMIT_CAPACITY=0`), median of the per-request times: the difference is
   what the limiter adds to a whole request (pricing hook, bucket, throttleStatus).
3. Shared (with --redis-url, or db 9 of 127.0.0.1:6379 when it answers): Redis' own count of
   script calls (`INFO commandstats`, cmdstat_evalsha) before and after N requests: one
   round trip each; and the median time of a request then. The Redis db is flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from asgi_lifespan import LifespanManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from consumers_graphql.settings import Settings  # noqa: E402
from consumers_graphql.store.db import make_engine  # noqa: E402
from consumers_graphql.store.keys import Principal  # noqa: E402
from consumers_graphql.store.migrate import upgrade  # noqa: E402
from consumers_graphql.web.app import create_app, tune_gc  # noqa: E402
from consumers_graphql.web.rate_limit import RateLimiter  # noqa: E402

QUERY = {"query": "{ __typename }"}


def _without_password(url: str) -> str:
    """The URL to print: its password (if any) left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


async def bucket_alone(settings: Settings, n: int) -> float:
    limiter = RateLimiter(settings)
    principal = Principal(key_id="key_bench", name="bench", scopes=frozenset())
    for _ in range(1_000):  # warm up
        await limiter.take(principal, 1)
    started = time.perf_counter()
    for _ in range(n):
        await limiter.take(principal, 1)
    return (time.perf_counter() - started) / n * 1_000


async def requests(settings: Settings, n: int, redis: Any = None) -> tuple[float, int | None]:
    """Median ms of a `{ __typename }` request, and the script calls Redis counted."""
    app = create_app(settings)
    async with LifespanManager(app):
        created = await app.state.keys.create("bench")
        headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for _ in range(200):  # warm up: the key cached, the document prepared
                (await client.post("/graphql", json=QUERY, headers=headers)).raise_for_status()
            before = await _evalsha_calls(redis)
            times = []
            for _ in range(n):
                started = time.perf_counter()
                response = await client.post("/graphql", json=QUERY, headers=headers)
                times.append(time.perf_counter() - started)
                response.raise_for_status()
            after = await _evalsha_calls(redis)
    calls = None if redis is None else after - before
    return statistics.median(times) * 1_000, calls


async def _evalsha_calls(redis: Any) -> int:
    if redis is None:
        return 0
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite+aiosqlite:///{folder}/bench.db"
        base = Settings(database_url=url, metrics_enabled=False)
        engine = make_engine(base, writer=True)
        await upgrade(engine)
        await engine.dispose()
        tune_gc()

        alone = await bucket_alone(base, 100_000)
        print(f"in process, RateLimiter.take alone: {alone * 1_000:.2f} µs a call "
              f"(target < 50 µs)")
        on, _ = await requests(base, n)
        off, _ = await requests(base.model_copy(update={"rate_limit_capacity": 0}), n)
        print(f"{{ __typename }} in process: {on:.3f} ms with the limiter, {off:.3f} ms "
              f"without: {(on - off) * 1_000:+.1f} µs a request (median of {n})")

        from redis.asyncio import Redis

        redis = Redis.from_url(args.redis_url, socket_timeout=1)
        try:
            await redis.ping()
        except Exception as error:  # no Redis: the shared part is skipped
            print(f"shared: skipped, no Redis at {_without_password(args.redis_url)} "
                  f"({type(error).__name__})")
            return
        await redis.flushdb()
        try:
            shared, calls = await requests(
                base.model_copy(update={"redis_url": args.redis_url}), n, redis)
        finally:
            await redis.flushdb()
            await redis.aclose()
        print(f"shared through Redis: {calls} script calls (EVALSHA) for {n} requests "
              f"({(calls or 0) / n:.2f} round trips a request); {shared:.3f} ms a request")


if __name__ == "__main__":
    asyncio.run(main())
