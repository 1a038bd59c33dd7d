"""What CORS costs a request (README "CORS", issue 17).

    python bench/cors.py [--requests N] [--rounds R]

Through the app, in process, on SQLite: `{ __typename }` over POST /graphql (its Edge) and
GET /api/v1/consumers?first=1 (the middleware stack), with CORS off, on for a request of an
allowed origin, and on for a request without Origin (a server's); median of the
per-request times, the variants taking turns over R rounds (the best round's median kept,
so that a busy moment of the machine counts against no variant). Then a preflight's
median time, answered before any key or database work.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from consumers_graphql.settings import Settings  # noqa: E402
from consumers_graphql.store.db import make_engine  # noqa: E402
from consumers_graphql.store.migrate import upgrade  # noqa: E402
from consumers_graphql.web.app import create_app, tune_gc  # noqa: E402

ORIGIN = "https://app.example.com"
QUERY = {"query": "{ __typename }"}
REST = "/api/v1/consumers?first=1"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


@asynccontextmanager
async def client_of(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = create_app(settings)
    async with LifespanManager(app):
        created = await app.state.keys.create("bench")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            yield client, created.secret.get_secret_value()


async def median_ms(client: httpx.AsyncClient, n: int, method: str, path: str,
                    headers: dict[str, str], json: object = None) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        response = await client.request(method, path, headers=headers, json=json)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return statistics.median(times) * 1_000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n = args.requests
    with tempfile.TemporaryDirectory() as folder:
        base = Settings(database_url=f"sqlite+aiosqlite:///{folder}/bench.db",
                        metrics_enabled=False, rate_limit_capacity=0)
        engine = make_engine(base, writer=True)
        await upgrade(engine)
        await engine.dispose()
        tune_gc()
        on = base.model_copy(update={"cors_origins": (ORIGIN,)})
        async with client_of(base) as (off_client, off_key), \
                client_of(on) as (on_client, on_key):
            variants = {
                "off": (off_client, {"Authorization": f"Bearer {off_key}"}),
                "on, allowed Origin": (on_client, {"Authorization": f"Bearer {on_key}",
                                                   "Origin": ORIGIN}),
                "on, no Origin": (on_client, {"Authorization": f"Bearer {on_key}"}),
            }
            for name, method, path, body in (("POST /graphql { __typename }", "POST",
                                              "/graphql", QUERY),
                                             (f"GET {REST}", "GET", REST, None)):
                for client, headers in variants.values():  # warm up: keys cached, plans made
                    await median_ms(client, 200, method, path, headers, body)
                best = dict.fromkeys(variants, float("inf"))
                for _ in range(args.rounds):
                    for variant, (client, headers) in variants.items():
                        best[variant] = min(best[variant], await median_ms(
                            client, n, method, path, headers, body))
                off = best["off"]
                print(f"{name}: CORS off {off:.3f} ms; " + "; ".join(
                    f"{variant} {ms:.3f} ms ({(ms - off) * 1_000:+.1f} µs)"
                    for variant, ms in best.items() if variant != "off")
                    + f" (median of {n}, best of {args.rounds} rounds)")
            await median_ms(on_client, 200, "OPTIONS", "/graphql", PREFLIGHT)
            preflight = min([await median_ms(on_client, n, "OPTIONS", "/graphql", PREFLIGHT)
                             for _ in range(args.rounds)])
            print(f"preflight OPTIONS /graphql: {preflight:.3f} ms (median of {n})")


if __name__ == "__main__":
    asyncio.run(main())
