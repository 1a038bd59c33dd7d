"""What a trusted document saves (README "Persisted queries and trusted documents", issue 17).

    python bench/persisted_documents.py [--requests N]

A Relay-sized document (a page of consumers with a fragment, as tests/relay's
ConsumerListQuery), on an empty SQLite database, so that the numbers are the request's own
work and not the data's:

1. Parse and validate alone (graphql-core), what a document costs on a cache miss.
2. Through the app, in process, the median of the per-request times of:
   - `query` text, the document cache emptied before each request (every request parses
     and validates: a document the process has not seen, or one the LRU evicted);
   - `query` text, the cache warm (the same text again: found by hashing the text);
   - `documentId` of a trusted document (prepared on its first use, found by its id);
   - an APQ hash (registered once; its text is then looked up by hash like any text).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from graphql import parse, validate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from consumers_graphql.api.limits import DOCUMENTS  # noqa: E402
from consumers_graphql.api.schema import build_schema  # noqa: E402
from consumers_graphql.settings import Settings  # noqa: E402
from consumers_graphql.store.db import make_engine  # noqa: E402
from consumers_graphql.store.migrate import upgrade  # noqa: E402
from consumers_graphql.web.app import create_app, tune_gc  # noqa: E402

DOCUMENT = """query ConsumerListQuery($first: Int!) {
  consumers(first: $first) {
    totalCount
    edges { cursor node { id ...ConsumerList_consumer } }
    pageInfo { hasNextPage endCursor }
  }
}

fragment ConsumerList_consumer on Consumer {
  email fullName phone externalId createdAt updatedAt
  audiences(first: 5) { nodes { id name } }
  orders(first: 5) { nodes { id amount currency placedAt } }
}
"""
DOCUMENT_ID = hashlib.sha256(DOCUMENT.encode()).hexdigest()
# The same operation as another text, so that its hash is not the trusted document's id (an
# id that is also a hash runs the pinned trusted document, not a registered APQ).
APQ_DOCUMENT = DOCUMENT + "# registered by APQ\n"
APQ_HASH = hashlib.sha256(APQ_DOCUMENT.encode()).hexdigest()
VARIABLES = {"first": 10}


def parse_and_validate(n: int) -> float:
    schema = build_schema()._schema
    started = time.perf_counter()
    for _ in range(n):
        errors = validate(schema, parse(DOCUMENT))
        assert not errors, errors
    return (time.perf_counter() - started) / n * 1_000


async def medians(settings: Settings, n: int) -> dict[str, float]:
    app = create_app(settings)
    async with LifespanManager(app):
        tune_gc()
        created = await app.state.keys.create("bench")
        headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
        apq = {"persistedQuery": {"version": 1, "sha256Hash": APQ_HASH}}
        bodies: dict[str, dict[str, Any]] = {
            "query text, cold (parse + validate)": {"query": DOCUMENT, "variables": VARIABLES},
            "query text, warm (document cache)": {"query": DOCUMENT, "variables": VARIABLES},
            "documentId (trusted, pinned)": {"documentId": DOCUMENT_ID,
                                             "variables": VARIABLES},
            "APQ hash (registered)": {"extensions": apq, "variables": VARIABLES},
        }
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            registered = await client.post("/graphql", headers=headers, json={
                "query": APQ_DOCUMENT, "variables": VARIABLES, "extensions": apq})
            assert "errors" not in registered.json(), registered.text
            assert len(app.state.documents.apq) == 1, "the APQ document was not registered"
            results = {}
            for name, body in bodies.items():
                cold = "cold" in name
                for _ in range(200):  # warm up: the key cached, the document prepared
                    (await client.post("/graphql", json=body, headers=headers)
                     ).raise_for_status()
                times = []
                for _ in range(n):
                    if cold:
                        DOCUMENTS.clear()
                    started = time.perf_counter()
                    response = await client.post("/graphql", json=body, headers=headers)
                    times.append(time.perf_counter() - started)
                    assert "errors" not in response.json(), response.text
                results[name] = statistics.median(times) * 1_000
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2_000)
    args = parser.parse_args()
    print(f"parse + validate alone: {parse_and_validate(args.requests):.3f} ms a document")
    with tempfile.TemporaryDirectory() as folder:
        manifest = Path(folder) / "persisted_queries.json"
        manifest.write_text(json.dumps({DOCUMENT_ID: DOCUMENT}))
        settings = Settings(database_url=f"sqlite+aiosqlite:///{folder}/bench.db",
                            log_level="warning", trusted_documents=manifest,
                            rate_limit_capacity=0)
        engine = make_engine(settings, writer=True)
        await upgrade(engine)
        await engine.dispose()
        results = await medians(settings, args.requests)
    print(f"through the app, in process, median of {args.requests:,} requests:")
    for name, ms in results.items():
        print(f"  {name:<40} {ms:.3f} ms")


if __name__ == "__main__":
    asyncio.run(main())
