#!/usr/bin/env python
"""The benchmark: builds its data with `consumers-graphql seed`, measures each workload side by
side with its baselines, prints a table and the targets, and writes bench/results/latest.json.

  /work/venv/bin/python bench/run.py            full run (SQLite and PostgreSQL)
  /work/venv/bin/python bench/run.py --smoke    tiny data, few rounds, no targets (< 60 s)
  /work/venv/bin/python bench/run.py --profile sqlite:W1   cProfile one variant in process

Three measurements per workload variant:
  in process  median per-request time of POST /graphql through httpx.ASGITransport into
              create_app(settings) (asgi_lifespan), one fresh process per variant, rounds
              interleaved across variants (A, B, C, ... then B, C, ..., A, ...);
  SQL         statements per request (before_cursor_execute on the app's engines, minus the
              API key bookkeeping marked with auth.AUTH_EXECUTION_OPTION), and the time spent
              in them ("db ms");
  HTTP        requests/s, p50 and p99 over real HTTP: uvicorn on core 0, this package's
              asyncio keep-alive client (bench/loadgen.py) on core 1, loopback only.
Ratios (xR1, xhello) are of in-process medians measured in the same interleaved rounds.
Only ratios are meaningful on a shared machine: absolute times drift up to 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import multiprocessing
import os
import pickle
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

if TYPE_CHECKING:
    from consumers_graphql.settings import Settings

import baselines  # noqa: E402
import workloads  # noqa: E402
from workloads import Variant  # noqa: E402

PY = sys.executable
DATA_DIR = HERE / ".data"
RESULTS_DIR = HERE / "results"
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432"
DATASET_FORMAT = 1  # bump when the way datasets are built changes
DEEP_ROW = 50_000
SEARCH_TERMS = (  # (what it is part of, the term): about 22,000, 60 and 1,000 matches in 1M
    ("name", "garcia"),
    ("email", "lucas.silva.1"),
    ("phone", "+44770091"),
)

TARGETS_TEXT = {
    "w1_ratio": "W1 GraphQL / R1 <= 4x",
    "w1_statements": "W1 SQL statements <= 4",
    "w2_deep": "W2 deep page / first page <= 1.5x",
    "w3_plain": "W3 search p50 < 10 ms (no totalCount)",
    "w3_count": "W3 search p50 < 50 ms (with totalCount)",
    "w5_inserts": "W5 <= 2 INSERT statements",
    "w5_time": "W5 < 40 ms per 500 rows (SQLite)",
    "w6_ratio": "W6 batchUpsert / W5 batchCreate <= 2x",
    "w6_inserts": "W6 = 1 INSERT statement",
    "w5_outbox": "W5 with change events / without < 1.15x (the outbox's write overhead)",
    "rss": "server RSS < 200 MB after the run",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- datasets --------------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    database: str  # "sqlite" | "postgresql"
    consumers: int
    orders: int
    audiences: int
    url: str
    build_seconds: float | None = None
    reused: bool = False

    @property
    def params(self) -> dict[str, Any]:
        return {"consumers": self.consumers, "orders_per_consumer": self.orders,
                "audiences_per_consumer": self.audiences, "random_seed": 1,
                "format": DATASET_FORMAT}

    @property
    def path(self) -> Path:
        return Path(self.url.split("///", 1)[1])


def datasets_for(args: argparse.Namespace, database: str) -> tuple[Dataset, Dataset]:
    main_n, search_n = (500, 2_000) if args.smoke else (args.consumers, args.search_consumers)
    suffix = "smoke" if args.smoke else ""

    def label(n: int) -> str:
        return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else (
            f"{n // 1000}k" if n % 1000 == 0 else str(n))

    names = ([f"smoke_{label(main_n)}", f"smoke_search_{label(search_n)}"] if suffix
             else [label(main_n), label(search_n)])
    made = []
    for name, n, per in ((names[0], main_n, 3), (names[1], search_n, 0)):
        if database == "sqlite":
            url = f"sqlite+aiosqlite:///{DATA_DIR / f'consumers_{name}.db'}"
        else:
            url = f"{args.postgres}/consumers_bench_{name}"
        made.append(Dataset(name, database, n, per, per, url))
    return made[0], made[1]


def _pg_admin_url(url: str) -> str:
    return url.rsplit("/", 1)[0] + "/postgres"


async def _pg_exists(url: str) -> bool:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    name = url.rsplit("/", 1)[1]
    admin = create_async_engine(_pg_admin_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            found = await conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                                       {"n": name})
            return found.first() is not None
    finally:
        await admin.dispose()


async def recorded_params(ds: Dataset) -> dict[str, Any] | None:
    """What the dataset was built with (the bench_dataset table), None if absent or broken."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    if ds.database == "sqlite" and not ds.path.exists():
        return None
    if ds.database == "postgresql" and not await _pg_exists(ds.url):
        return None
    engine = create_async_engine(ds.url)
    try:
        async with engine.connect() as conn:
            raw = (await conn.execute(text("SELECT params FROM bench_dataset"))).scalar_one()
        return dict(json.loads(raw))
    except Exception:
        return None
    finally:
        await engine.dispose()


def reset_database(ds: Dataset) -> None:
    if ds.database == "sqlite":
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{ds.path}{suffix}").unlink(missing_ok=True)
    else:
        asyncio.run(_recreate_pg(ds))


async def _recreate_pg(ds: Dataset) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    name = ds.url.rsplit("/", 1)[1]
    assert name.startswith("consumers_bench"), name
    admin = create_async_engine(_pg_admin_url(ds.url), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


async def mark_built(ds: Dataset, seconds: float) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(ds.url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            if ds.database == "postgresql":
                # What autovacuum would do soon after a bulk load; plans depend on it.
                await conn.execute(text("VACUUM ANALYZE"))
            await conn.execute(text("CREATE TABLE bench_dataset (params TEXT NOT NULL)"))
            params = {**ds.params, "built_at": datetime.now(UTC).isoformat(),
                      "build_seconds": round(seconds, 1)}
            await conn.execute(text("INSERT INTO bench_dataset (params) VALUES (:p)"),
                               {"p": json.dumps(params)})
    finally:
        await engine.dispose()


def _cli() -> list[str]:
    script = Path(PY).parent / "consumers-graphql"
    return [str(script)] if script.exists() else [PY, "-m", "consumers_graphql.cli"]


def build_datasets(datasets: list[Dataset], rebuild: bool) -> dict[str, Any]:
    """Builds what is missing or was built differently, all at once (SQLite and PostgreSQL
    seeding overlap: one is CPU in this process, the other mostly the server)."""
    todo = []
    for ds in datasets:
        found = None if rebuild else asyncio.run(recorded_params(ds))
        if found is not None and all(found.get(k) == v for k, v in ds.params.items()):
            ds.reused = True
            ds.build_seconds = found.get("build_seconds")
            log(f"reusing {ds.database} {ds.name} (built {found.get('built_at')}, "
                f"{found.get('build_seconds')} s)")
        else:
            todo.append(ds)
    started = time.perf_counter()
    running = []
    for ds in todo:
        reset_database(ds)
    for ds in todo:
        command = [*_cli(), "seed", "--consumers", str(ds.consumers),
                   "--orders-per-consumer", str(ds.orders),
                   "--audiences-per-consumer", str(ds.audiences), "--random-seed", "1",
                   "--quiet"]
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        seed_log = open(DATA_DIR / f"seed_{ds.database}_{ds.name}.log", "w")  # noqa: SIM115
        env = {**os.environ, "CONSUMERS_DATABASE_URL": ds.url}
        log(f"seeding {ds.database} {ds.name}: {' '.join(command[-11:])}")
        process = subprocess.Popen(command, env=env, stdout=seed_log, stderr=subprocess.STDOUT)
        running.append((ds, process, time.perf_counter(), seed_log))
    while running:
        time.sleep(0.5)
        for item in list(running):
            ds, process, began, seed_log = item
            code = process.poll()
            if code is None:
                continue
            running.remove(item)
            seed_log.close()
            seconds = time.perf_counter() - began
            if code != 0:
                for _, other, _, _ in running:
                    other.kill()
                raise SystemExit(f"seeding {ds.database} {ds.name} failed ({code}); see "
                                 f"{seed_log.name}")
            ds.build_seconds = round(seconds, 1)
            log(f"seeded {ds.database} {ds.name} in {seconds:.1f} s")
            marked = time.perf_counter()
            asyncio.run(mark_built(ds, seconds))
            if ds.database == "postgresql":
                log(f"VACUUM ANALYZE {ds.name}: {time.perf_counter() - marked:.1f} s")
    return {"built": [d.name for d in todo], "seconds": round(time.perf_counter() - started, 1)}


def fresh_url(search: Dataset) -> str:
    return f"{search.url}_fresh"


async def make_fresh_copy(search: Dataset) -> str | None:
    """PostgreSQL: a copy of the search database as a bulk load leaves it before autovacuum
    analyses it (issue 14): no column statistics for consumers and consumer_search, their
    row counts unknown (reltuples -1: the planner estimates from the pages), autovacuum off
    on both so that it stays so for the run. Made again each run (a file copy, seconds), its
    API key the search database's. Returns its URL; None (and says why) when the server
    does not let this user make it (it takes a superuser, as `postgres` is here)."""
    from sqlalchemy import exc, text
    from sqlalchemy.ext.asyncio import create_async_engine

    url = fresh_url(search)
    name, template = url.rsplit("/", 1)[1], search.url.rsplit("/", 1)[1]
    assert name.startswith("consumers_bench"), name
    admin = create_async_engine(_pg_admin_url(url), isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            version = (await conn.execute(text("SHOW server_version_num"))).scalar_one()
            strategy = " STRATEGY FILE_COPY" if int(version) >= 150000 else ""
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}'))
    finally:
        await admin.dispose()
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            for table in ("consumers", "consumer_search"):
                await conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = off, "
                                        "toast.autovacuum_enabled = off)"))
                await conn.execute(text("DELETE FROM pg_statistic WHERE starelid = "
                                        f"'{table}'::regclass"))
                await conn.execute(text("UPDATE pg_class SET reltuples = -1 WHERE oid = "
                                        f"'{table}'::regclass"))
    except exc.DBAPIError as error:
        log(f"fresh search database skipped: {str(error.orig).splitlines()[0]}")
        return None
    finally:
        await engine.dispose()
    return url


async def migrated_with_a_key(settings: Settings, name: str) -> str:
    """Migrations up to date and a fresh API key (named `name` and the time): its secret.
    The key's rate limit is a bucket no run can empty (the limiter stays on, as in
    production, and its cost is in the numbers): the default bucket (20,000 points, 2,000 a
    second) would answer W1 (520 points a page, hundreds of pages a second) 429 in a second."""
    from consumers_graphql.store.db import Database, make_engine
    from consumers_graphql.store.keys import RATE_LIMIT_CAPACITY_MAX, KeyStore, RateLimit
    from consumers_graphql.store.migrate import upgrade

    engine = make_engine(settings, writer=True)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    database = Database(settings)
    try:
        keys = KeyStore(database.primary_engine, database.write_engine, settings.key_pepper)
        created = await keys.create(
            f"{name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}",
            rate_limit=RateLimit(RATE_LIMIT_CAPACITY_MAX, RATE_LIMIT_CAPACITY_MAX))
        return created.secret.get_secret_value()
    finally:
        await database.dispose()


async def prepare(main: Dataset, search: Dataset, smoke: bool) -> dict[str, Any]:
    """Migrations up to date, a fresh API key in each database, the cursors and ids."""
    from sqlalchemy import func, select

    from consumers_graphql.settings import Settings
    from consumers_graphql.store import models
    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.pagination import encode_cursor
    from consumers_graphql.store.queries.consumers import ConsumerSortField, consumer_sort

    secrets: dict[str, str] = {}
    pepper = None
    for ds in (main, search):
        settings = Settings(database_url=ds.url)
        pepper = settings.key_pepper.get_secret_value() if settings.key_pepper else None
        secrets[ds.name] = await migrated_with_a_key(settings, "bench")

    table = models.Consumer.__table__
    c = table.c
    engine = make_engine(Settings(database_url=main.url), writer=False)
    try:
        async with engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            deep = min(DEEP_ROW, max(1, total // 2))
            orders = {
                ("CREATED_AT", "DESC"): [c.created_at.desc(), c.id.desc()],
                ("LAST_ORDER_AT", "ASC"): [c.last_order_at.asc().nulls_last(), c.id.asc()],
                ("LAST_ORDER_AT", "DESC"): [c.last_order_at.desc().nulls_last(), c.id.desc()],
            }
            cursors = {}
            for (field_name, direction), ordering in orders.items():
                column = c.created_at if field_name == "CREATED_AT" else c.last_order_at
                row = (await conn.execute(
                    select(column, c.id).order_by(*ordering).offset(deep - 1).limit(1)
                )).one()
                sort = consumer_sort(ConsumerSortField[field_name],
                                     descending=direction == "DESC")
                cursors[f"{field_name}:{direction}"] = encode_cursor(sort, row[0], row[1])
            ids = list((await conn.execute(select(c.id).order_by(c.id))).scalars())
    finally:
        await engine.dispose()
    sample = random.Random(7).sample(ids, min(20, len(ids)))
    fresh = None
    if search.database == "postgresql":
        fresh = await make_fresh_copy(search)
        secrets[f"{search.name}_fresh"] = secrets[search.name]
    return {"secrets": secrets, "pepper": pepper, "cursors": cursors, "deep_row": deep,
            "ids": sample, "consumers": total, "fresh_url": fresh}


def make_variants(database: str, main: Dataset, search: Dataset, prep: dict[str, Any],
                  smoke: bool) -> list[Variant]:
    m, s = main.url, search.url
    cur = prep["cursors"]
    loa_asc = {"sortBy": "LAST_ORDER_AT", "sortDir": "ASC"}
    loa_desc = {"sortBy": "LAST_ORDER_AT", "sortDir": "DESC"}
    items = [
        Variant("hello", "hello", database, m),
        Variant("R1", "r1", database, m),
        *([Variant("R1 aiosqlite", "r1", database, m, extra={"driver": "aiosqlite"})]
          if database == "sqlite" and not smoke else []),
        Variant("W1", "graphql", database, m, workloads.PAGE),
        Variant("W1 totalCount", "graphql", database, m, workloads.PAGE_COUNT),
        Variant("W2 deep", "graphql", database, m, workloads.PAGE,
                {"after": cur["CREATED_AT:DESC"]}),
        Variant("W2 lastOrderAt asc", "graphql", database, m, workloads.PAGE, loa_asc),
        Variant("W2 lastOrderAt asc deep", "graphql", database, m, workloads.PAGE,
                {**loa_asc, "after": cur["LAST_ORDER_AT:ASC"]}),
        Variant("W2 lastOrderAt desc", "graphql", database, m, workloads.PAGE, loa_desc),
        Variant("W2 lastOrderAt desc deep", "graphql", database, m, workloads.PAGE,
                {**loa_desc, "after": cur["LAST_ORDER_AT:DESC"]}),
    ]
    terms = SEARCH_TERMS[:1] if smoke else SEARCH_TERMS
    # PostgreSQL: each search also on a copy no ANALYZE has seen (make_fresh_copy)
    searched = [("", s, "search")] + (
        [(" fresh", prep["fresh_url"], "search_fresh")] if prep.get("fresh_url") else [])
    for suffix, url, dataset in searched:
        for what, term in terms:
            items.append(Variant(f"W3 {what}{suffix}", "graphql", database, url,
                                 workloads.SEARCH, {"search": term},
                                 extra={"dataset": dataset}))
            items.append(Variant(f"W3 {what}{suffix} totalCount", "graphql", database, url,
                                 workloads.SEARCH_COUNT, {"search": term},
                                 extra={"dataset": dataset}))
    items += [
        Variant("W4 consumer", "graphql", database, m, workloads.CONSUMER,
                {"id": prep["ids"][0]}),
        Variant("W4 nodes", "graphql", database, m, workloads.NODES, {"ids": prep["ids"]}),
        Variant("W5 batchCreate", "graphql", database, m, workloads.BATCH_CREATE, write=True),
        # The same without the change events (bench/worker.py switches them off): the
        # outbox's write overhead, measured in the same interleaved rounds.
        Variant("W5 batchCreate no outbox", "graphql", database, m, workloads.BATCH_CREATE,
                write=True, extra={"outbox": False}),
        Variant("W6 batchUpsert", "graphql", database, m, workloads.BATCH_UPSERT, write=True,
                extra={"upsert": True}),
    ]
    if smoke:
        skip = {"W2 lastOrderAt asc", "W2 lastOrderAt desc", "W2 lastOrderAt desc deep"}
        items = [v for v in items if v.name not in skip]
    return items


# --- in-process workers ----------------------------------------------------------------------


_FORK = multiprocessing.get_context("forkserver")
# Every variant's process is forked from a server that has imported the app and nothing
# else (its sys.path is the default one, hence no bench module): a fresh process, without
# paying the imports once per variant.
_FORK.set_forkserver_preload(["consumers_graphql.web.app", "httpx", "asgi_lifespan", "orjson"])


class Worker:
    def __init__(self, variant: Variant, secret: str, log_dir: Path) -> None:
        import worker

        self.variant = variant
        safe = variant.key.replace(":", "_").replace(" ", "_")
        self.log_path = log_dir / f"worker_{safe}.log"
        self.conn, child = _FORK.Pipe()
        self.process = _FORK.Process(
            target=worker.run, args=(child, variant.to_json(), secret, str(self.log_path)),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.pid: int | None = None

    def _receive(self) -> dict[str, Any]:
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"worker {self.variant.key} died; see {self.log_path}")
        try:
            reply: dict[str, Any] = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker {self.variant.key} died; see {self.log_path}") from None
        if "error" in reply:
            raise RuntimeError(f"worker {self.variant.key}: {reply['error']} "
                               f"(see {self.log_path})")
        return reply

    def ready(self) -> None:
        self.pid = self._receive()["pid"]

    def call(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        self.conn.send({"cmd": cmd, **kwargs})
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send({"cmd": "quit"})
            self.process.join(timeout=20)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()


def _r1_spec(capture: dict[str, Any], secret: str, pepper: str | None,
             url: str) -> dict[str, Any]:
    return baselines.build_r1_spec(capture, secret, pepper, url)


def difference(a: Any, b: Any, path: str = "",
               names: tuple[str, str] = ("one", "the other")) -> str | None:
    """Where two JSON answers first differ (None if nowhere), `names` saying whose is whose."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{path}.{key}: only in {names[0] if key in a else names[1]}"
            found = difference(a[key], b[key], f"{path}.{key}", names)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            found = difference(x, y, f"{path}[{n}]", names)
            if found:
                return found
        return None
    return None if a == b else f"{path}: {names[0]}'s {a!r} vs {names[1]}'s {b!r}"


def _secrets_by_url(prep: dict[str, Any], main: Dataset, search: Dataset) -> dict[str, str]:
    found = {main.url: prep["secrets"][main.name], search.url: prep["secrets"][search.name]}
    if prep.get("fresh_url"):
        found[prep["fresh_url"]] = prep["secrets"][search.name]
    return found


def in_process(database: str, variants: list[Variant], prep: dict[str, Any],
               main: Dataset, search: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant in its own process, measured in interleaved rounds."""
    log_dir = DATA_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    secret_of = _secrets_by_url(prep, main, search)
    graphql = [v for v in variants if v.kind == "graphql"]
    workers: dict[str, Worker] = {}
    results: dict[str, Any] = {}
    try:
        for v in graphql:
            workers[v.name] = Worker(v, secret_of[v.url], log_dir)
        for w in workers.values():
            w.ready()
        log(f"{database}: {len(workers)} GraphQL workers up")
        captures = {name: w.call("capture") for name, w in workers.items()}
        w1 = captures["W1"]
        w1_body = json.dumps(w1["response"], separators=(",", ":")).encode()
        for v in variants:
            if v.kind == "r1":
                v.extra["r1"] = {**_r1_spec(w1, secret_of[main.url], prep["pepper"], main.url),
                                 "driver": v.extra.get("driver")}
            elif v.kind == "hello":
                v.extra["body"] = w1_body
        for v in variants:
            if v.kind in ("r1", "hello"):
                workers[v.name] = Worker(v, secret_of[v.url], log_dir)
                workers[v.name].ready()
                captures[v.name] = workers[v.name].call("capture")
        same = {}
        for v in variants:
            if v.kind == "r1":
                same[v.name] = difference(captures[v.name]["response"], w1["response"])
                if same[v.name]:
                    log(f"{database}: WARNING {v.name}'s response differs from W1's: "
                        f"{same[v.name]}")
                else:
                    log(f"{database}: {v.name} returns the same JSON as W1 "
                        f"({len(captures[v.name]['statements'])} statements)")
        order = [v for v in variants if v.name in workers]
        # Warm up, then size each variant's round to about the same time.
        sizes = {}
        for v in order:
            reply = workers[v.name].call("round", n=args.warmup)
            per = statistics.median(reply["times"])
            sizes[v.name] = max(1, min(args.max_per_round, round(args.round_seconds / per)))
        samples: dict[str, dict[str, list[float]]] = {
            v.name: {"times": [], "statements": [], "db": [], "round_medians": []}
            for v in order
        }
        log(f"{database}: {args.rounds} rounds over {len(order)} variants")
        for r in range(args.rounds):
            shift = r % len(order)
            for v in order[shift:] + order[:shift]:
                reply = workers[v.name].call("round", n=sizes[v.name])
                s = samples[v.name]
                s["times"] += reply["times"]
                s["statements"] += reply["statements"]
                s["db"] += reply["db"]
                s["round_medians"].append(statistics.median(reply["times"]))
        for v in order:
            s = samples[v.name]
            times = sorted(s["times"])
            statements = captures[v.name]["statements"]
            results[v.name] = {
                "variant": v.name, "kind": v.kind, "database": database,
                "dataset": {search.url: search.name, prep.get("fresh_url"): f"{search.name}_fresh"
                            }.get(v.url, main.name),
                "variables": {k: val for k, val in v.variables.items() if k != "input"},
                "samples": len(times),
                "median_ms": statistics.median(times) * 1000,
                "p90_ms": times[int(0.9 * (len(times) - 1))] * 1000,
                "round_median_spread_ms": [min(s["round_medians"]) * 1000,
                                           max(s["round_medians"]) * 1000],
                "statements_per_request": sorted(set(s["statements"])),
                "db_ms": statistics.median(s["db"]) * 1000,
                "inserts_per_request": sum(1 for q in statements
                                           if q.lstrip().upper().startswith("INSERT")),
                "statements": statements,
                "auth_statements": captures[v.name].get("auth_statements"),
                "outbox_statements": captures[v.name].get("outbox_statements"),
                "pid": workers[v.name].pid,
            }
        for name, differs in same.items():
            results[name]["same_json_as_w1"] = differs is None
        if args.profile_all:
            for v in order:
                if v.kind == "graphql":
                    results[v.name]["profile"] = workers[v.name].call(
                        "profile", n=args.profile_requests, limit=25)["profile"]
    finally:
        for w in workers.values():
            w.close()
    r1, hello = results["R1"]["median_ms"], results["hello"]["median_ms"]
    for row in results.values():
        row["x_r1"] = row["median_ms"] / r1
        row["x_hello"] = row["median_ms"] / hello
    return results


# --- HTTP ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(core: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(core), *command] if shutil.which("taskset") else command


@dataclass
class Server:
    label: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    rss_mb: float | None = None
    served: list[str] = field(default_factory=list)

    def rss(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_up(port: int, process: subprocess.Popen[bytes], path: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}); see {log_path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not come up; see {log_path}")


def start_app_server(ds: Dataset, label: str) -> Server:
    port = _free_port()
    log_path = DATA_DIR / "logs" / f"server_{label}.log"
    env = {**os.environ, "CONSUMERS_DATABASE_URL": ds.url, "CONSUMERS_LOG_LEVEL": "warning"}
    out = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(
        _pinned(0, [*_cli(), "serve", "--host", "127.0.0.1", "--port", str(port)]),
        env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    _wait_up(port, process, "/healthz", log_path)
    return Server(label, process, port, log_path)


def start_baseline_server(database: str, r1_spec: dict[str, Any], hello_body: bytes
                          ) -> Server:
    port = _free_port()
    spec_path = DATA_DIR / f"baselines_{database}.pickle"
    spec_path.write_bytes(pickle.dumps({
        "r1": r1_spec, "hello": hello_body,
    }))
    log_path = DATA_DIR / "logs" / f"server_baselines_{database}.log"
    env = {**os.environ, "BENCH_BASELINE_SPEC": str(spec_path)}
    out = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(
        _pinned(0, [PY, "-m", "uvicorn", "--factory", "baselines:create_app", "--app-dir",
                    str(HERE), "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                    "--log-level", "warning"]),
        env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    _wait_up(port, process, "/hello", log_path)
    return Server(f"baselines_{database}", process, port, log_path)


def load(server: Server, path: str, bodies: list[bytes], secret: str,
         args: argparse.Namespace, unique: bool = False, expect: str = "") -> dict[str, Any]:
    job = {
        "host": "127.0.0.1", "port": server.port, "path": path,
        "headers": {"Authorization": f"Bearer {secret}", "Content-Type": "application/json",
                    "Accept": "application/json"},
        "bodies": [base64.b64encode(b).decode() for b in bodies],
        "unique_bodies": unique, "expect": expect, "concurrency": args.concurrency,
        # A batch is sent once: no warm-up to throw any away (the server is warm by then),
        # and the run is bounded by the number of batches rather than by a short window.
        "seconds": args.http_seconds * (10 if unique else 1),
        "warmup_seconds": 0 if unique else args.http_warmup,
        "max_requests": args.http_max_requests,
    }
    done = subprocess.run(_pinned(1, [PY, str(HERE / "loadgen.py")]),
                          input=json.dumps(job).encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    if result["errors"]:
        raise RuntimeError(f"{path}: {result['errors']} failed requests: "
                           f"{result['first_error']}")
    return result


async def remove_w5_rows(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "DELETE FROM consumers WHERE email_key LIKE :d OR external_id LIKE :p"
            ), {"d": f"%@{workloads.W5_DOMAIN}", "p": f"{workloads.W5_EXTERNAL_PREFIX}%"})
            await conn.execute(text(  # W6's created ones; those it updates stay for the next
                "DELETE FROM consumers WHERE external_id LIKE :p"
            ), {"p": f"{workloads.W6_NEW_PREFIX}%"})
    finally:
        await engine.dispose()


async def remove_w6_base(url: str) -> None:
    """W6's consumers to update, once its in-process and HTTP runs are over."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM consumers WHERE external_id LIKE :p"),
                               {"p": f"{workloads.W6_BASE_PREFIX}%"})
    finally:
        await engine.dispose()


def over_http(database: str, variants: list[Variant], prep: dict[str, Any], main: Dataset,
              search: Dataset, args: argparse.Namespace) -> tuple[dict[str, Any], list[Server]]:
    results: dict[str, Any] = {}
    servers: list[Server] = []
    by_name = {v.name: v for v in variants}
    secret_of = {main.url: prep["secrets"][main.name], search.url: prep["secrets"][search.name]}
    names = [v.name for v in variants]
    if args.smoke:
        keep = {"hello", "R1", "W1", "W5 batchCreate", "W6 batchUpsert"}  # two servers, not three
        names = [n for n in names if n in keep]
    try:
        base = start_baseline_server(database, by_name["R1"].extra["r1"],
                                     by_name["hello"].extra["body"])
        servers.append(base)
        for name, path in (("hello", "/hello"), ("R1", "/r1")):
            results[name] = load(base, path, [b"{}"], secret_of[main.url], args)
            base.served.append(name)
        base.rss_mb = base.rss()
        base.stop()
        for ds, label in ((main, f"app_{database}_{main.name}"),
                          (search, f"app_{database}_{search.name}")):
            todo = [by_name[n] for n in names if by_name[n].kind == "graphql"
                    and by_name[n].url == ds.url]
            if not todo:
                continue
            server = start_app_server(ds, label)
            servers.append(server)
            for v in todo:
                if v.write:
                    make = workloads.upsert_input if v.extra.get("upsert") else \
                        workloads.batch_input
                    bodies = [json.dumps({"query": v.query, "variables": {
                        "input": make(f"http{os.getpid()}-{n}")}}).encode()
                        for n in range(args.http_write_bodies)]
                else:
                    bodies = [json.dumps({"query": v.query, "variables": v.variables}).encode()]
                expect = f'"count":{workloads.BATCH_SIZE}' if v.write else ""
                results[v.name] = load(server, "/graphql", bodies, secret_of[ds.url], args,
                                       unique=v.write, expect=expect)
                server.served.append(v.name)
                if v.write:
                    asyncio.run(remove_w5_rows(ds.url))
                log(f"{database} HTTP {v.name}: {results[v.name]['rps']:.0f} req/s")
            server.rss_mb = server.rss()
            server.stop()
    finally:
        for server in servers:
            server.stop()
    return results, servers


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(database: str, inproc: dict[str, Any], http: dict[str, Any]) -> str:
    header = (f"{'workload':<27}{'median ms':>10}{'p90':>8}{'xR1':>7}{'xhello':>8}"
              f"{'SQL':>5}{'db ms':>7}{'HTTP req/s':>11}{'p50 ms':>8}{'p99 ms':>8}")
    lines = [f"== {database}", header, "-" * len(header)]
    for name, row in inproc.items():
        h = http.get(name, {})
        sql = "/".join(str(n) for n in row["statements_per_request"])
        lines.append(
            f"{name:<27}{_fmt(row['median_ms'], 2):>10}{_fmt(row['p90_ms'], 2):>8}"
            f"{_fmt(row['x_r1'], 2):>7}{_fmt(row['x_hello'], 1):>8}{sql:>5}"
            f"{_fmt(row['db_ms'], 2):>7}{_fmt(h.get('rps'), 0):>11}"
            f"{_fmt(h.get('p50_ms'), 1):>8}{_fmt(h.get('p99_ms'), 1):>8}"
        )
    return "\n".join(lines)


def targets(all_inproc: dict[str, dict[str, Any]], servers: list[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    found = []

    def add(key: str, database: str, what: str, value: float, limit: float, unit: str,
            ok: bool) -> None:
        found.append({"target": key, "text": TARGETS_TEXT[key], "database": database,
                      "what": what, "value": round(value, 3), "limit": limit, "unit": unit,
                      "pass": ok})

    for database, rows in all_inproc.items():
        w1 = rows["W1"]
        add("w1_ratio", database, "W1 / R1", w1["x_r1"], 4, "x", w1["x_r1"] <= 4)
        worst = max(w1["statements_per_request"])
        add("w1_statements", database, "W1", worst, 4, "statements", worst <= 4)
        for deep, first in (("W2 deep", "W1"),
                            ("W2 lastOrderAt asc deep", "W2 lastOrderAt asc"),
                            ("W2 lastOrderAt desc deep", "W2 lastOrderAt desc")):
            if deep in rows and first in rows:
                ratio = rows[deep]["median_ms"] / rows[first]["median_ms"]
                add("w2_deep", database, f"{deep} / {first}", ratio, 1.5, "x", ratio <= 1.5)
        for name, row in rows.items():
            if name.startswith("W3"):
                key, limit = ("w3_count", 50) if name.endswith("totalCount") else ("w3_plain", 10)
                add(key, database, name, row["median_ms"], limit, "ms", row["median_ms"] < limit)
        w5 = rows.get("W5 batchCreate")
        if w5 is not None:
            add("w5_inserts", database, "W5 INSERT statements", w5["inserts_per_request"], 2,
                "statements", w5["inserts_per_request"] <= 2)
        w6 = rows.get("W6 batchUpsert")
        if w6 is not None:
            add("w6_inserts", database, "W6 INSERT statements", w6["inserts_per_request"], 1,
                "statements", w6["inserts_per_request"] == 1)
        bare = rows.get("W5 batchCreate no outbox")
        if w5 is not None and bare is not None:
            ratio = w5["median_ms"] / bare["median_ms"]
            add("w5_outbox", database, "W5 / W5 no outbox", ratio, 1.15, "x", ratio < 1.15)
        if w5 is not None and w6 is not None:
            ratio = w6["median_ms"] / w5["median_ms"]
            add("w6_ratio", database, "W6 / W5", ratio, 2, "x", ratio <= 2)
            if database == "sqlite":
                add("w5_time", database, "W5 per 500 rows", w5["median_ms"], 40, "ms",
                    w5["median_ms"] < 40)
    for server in servers:
        if server["rss_mb"] is not None and server["label"].startswith("app_"):
            add("rss", server["database"], server["label"], server["rss_mb"], 200, "MB",
                server["rss_mb"] < 200)
    return found


def _versions() -> dict[str, Any]:
    import sqlite3

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip()

    versions = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                "git_head": git("rev-parse", "--short", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--", "src")),
                "src_sha256": _src_fingerprint(),
                "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    try:
        import uvicorn

        versions["uvicorn"] = uvicorn.__version__
        versions["uvicorn_loop_http"] = (
            "uvloop" if _importable("uvloop") else "asyncio",
            "httptools" if _importable("httptools") else "h11",
        )
    except ImportError:
        pass
    return versions


def _src_fingerprint() -> str:
    """Which code was measured, uncommitted changes included."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "src").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


async def _postgres_reachable(url: str) -> bool:
    try:
        import asyncpg

        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://")
                                     + "/postgres", timeout=3)
        await conn.close()
        return True
    except Exception:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data (500 consumers, 2,000 for search), 3 rounds, short "
                        "HTTP runs, no targets; PostgreSQL only if reachable. Writes "
                        "bench/results/smoke.json")
    parser.add_argument("--databases", default="sqlite,postgresql",
                        help="which databases to measure (default: sqlite,postgresql)")
    parser.add_argument("--postgres", default=DEFAULT_PG,
                        help=f"PostgreSQL server URL, without a database (default {DEFAULT_PG})")
    parser.add_argument("--consumers", type=int, default=100_000,
                        help="consumers in the main dataset (W1, W2, W4, W5; default 100,000)")
    parser.add_argument("--search-consumers", type=int, default=1_000_000,
                        help="consumers in the search dataset (W3; default 1,000,000)")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the datasets even when built with the same parameters")
    parser.add_argument("--build-only", action="store_true", help="build the data and stop")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 10; smoke 3)")
    parser.add_argument("--round-seconds", type=float, default=None,
                        help="about how long each variant runs per round (default 0.12 s)")
    parser.add_argument("--max-per-round", type=int, default=50,
                        help="requests per variant per round at most (default 50)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="warm-up requests per variant (default 3)")
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    parser.add_argument("--http-seconds", type=float, default=None,
                        help="measured seconds per HTTP workload (default 1.5; smoke 0.3)")
    parser.add_argument("--http-warmup", type=float, default=None,
                        help="unmeasured seconds before each (default 0.3; smoke 0.1)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="keep-alive connections of the HTTP load generator (default 4)")
    parser.add_argument("--http-max-requests", type=int, default=20_000,
                        help="requests per HTTP workload at most (default 20,000)")
    parser.add_argument("--http-write-bodies", type=int, default=None,
                        help="W5 batches over HTTP, each sent once (default 24; at most 10x "
                        "--http-seconds)")
    parser.add_argument("--workloads", default=None, metavar="NAME,...",
                        help="measure only the variants whose names start with these, e.g. "
                        "'W5,W6' (W1, R1 and hello always run: every ratio needs them)")
    parser.add_argument("--profile", metavar="DB:VARIANT",
                        help="only cProfile one variant in process, e.g. 'sqlite:W1' "
                        "(prints the top functions; writes bench/results/<variant>.prof)")
    parser.add_argument("--profile-requests", type=int, default=50,
                        help="requests under the profiler (default 50)")
    parser.add_argument("--profile-all", action="store_true",
                        help="also keep a short cProfile of every GraphQL variant in the JSON")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default bench/results/latest.json; smoke: "
                        "bench/results/smoke.json)")
    args = parser.parse_args(argv)
    from sqlalchemy import make_url

    if make_url(args.postgres).host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--postgres must be on this machine (127.0.0.1): the bench sends load")
    unknown = set(args.databases.split(",")) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown database(s) {', '.join(sorted(unknown))}")
    smoke = args.smoke
    args.rounds = args.rounds or (3 if smoke else 10)
    args.round_seconds = args.round_seconds or (0.03 if smoke else 0.12)
    args.http_seconds = args.http_seconds or (0.3 if smoke else 1.5)
    args.http_warmup = args.http_warmup if args.http_warmup is not None else (
        0.1 if smoke else 0.3)
    args.http_write_bodies = args.http_write_bodies or (5 if smoke else 24)
    if smoke:
        args.warmup = min(args.warmup, 2)
    args.output = args.output or RESULTS_DIR / ("smoke.json" if smoke else "latest.json")
    return args


def selected(variants: list[Variant], names: str | None) -> list[Variant]:
    """The variants `--workloads` names (by prefix), with the ones every ratio needs."""
    if names is None:
        return variants
    prefixes = tuple(name.strip() for name in names.split(",") if name.strip())
    return [v for v in variants
            if v.name in ("W1", "R1", "hello") or v.name.startswith(prefixes)]


def profile(args: argparse.Namespace, plan: dict[str, tuple[Dataset, Dataset]]) -> int:
    database, _, name = args.profile.partition(":")
    main, search = plan[database]
    prep = asyncio.run(prepare(main, search, args.smoke))
    variant = next((v for v in make_variants(database, main, search, prep, args.smoke)
                    if v.name == name and v.kind == "graphql"), None)
    if variant is None:
        raise SystemExit(f"no GraphQL variant {name!r}")
    secret = _secrets_by_url(prep, main, search)[variant.url]
    log_dir = DATA_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker = Worker(variant, secret, log_dir)
    try:
        worker.ready()
        worker.call("round", n=args.warmup + 5)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        dump = RESULTS_DIR / f"{database}_{name.replace(' ', '_')}.prof"
        for sort in ("cumulative", "tottime"):
            reply = worker.call("profile", n=args.profile_requests, sort=sort, limit=45,
                                dump=str(dump))
            print(reply["profile"])
        print(f"profile data: {dump}")
    finally:
        worker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    phases: dict[str, float] = {}
    databases = [d.strip() for d in args.databases.split(",") if d.strip()]
    notes = []
    if "postgresql" in databases and not asyncio.run(_postgres_reachable(args.postgres)):
        if args.smoke:
            databases.remove("postgresql")
            notes.append("PostgreSQL unreachable: smoke ran on SQLite only")
            log(notes[-1])
        else:
            raise SystemExit(f"PostgreSQL at {args.postgres} is unreachable "
                             "(use --databases sqlite to measure SQLite only)")
    plan = {db: datasets_for(args, db) for db in databases}
    every = [ds for pair in plan.values() for ds in pair]
    build = build_datasets(every, args.rebuild)
    phases["data"] = time.perf_counter() - began
    if args.build_only:
        log(f"data ready in {phases['data']:.1f} s")
        return 0
    if args.profile:
        return profile(args, plan)
    versions = _versions()
    all_inproc: dict[str, dict[str, Any]] = {}
    all_http: dict[str, dict[str, Any]] = {}
    server_rows: list[dict[str, Any]] = []
    tables = []
    for database in databases:
        main_ds, search_ds = plan[database]
        started = time.perf_counter()
        prep = asyncio.run(prepare(main_ds, search_ds, args.smoke))
        variants = selected(make_variants(database, main_ds, search_ds, prep, args.smoke),
                            args.workloads)
        all_inproc[database] = in_process(database, variants, prep, main_ds, search_ds, args)
        phases[f"{database} in-process"] = time.perf_counter() - started
        started = time.perf_counter()
        if not args.no_http:
            http_rows, servers = over_http(database, variants, prep, main_ds, search_ds, args)
            all_http[database] = http_rows
            server_rows += [{"label": s.label, "database": database, "rss_mb": s.rss_mb,
                             "served": s.served} for s in servers]
        phases[f"{database} HTTP"] = time.perf_counter() - started
        asyncio.run(remove_w6_base(main_ds.url))
        tables.append(table(database, all_inproc[database], all_http.get(database, {})))
        print(tables[-1], flush=True)
    checked = [] if args.smoke else targets(all_inproc, server_rows)
    total = time.perf_counter() - began
    lines = ["", "== servers (VmRSS after their run)"]
    lines += [f"{s['label']:<34}{_fmt(s['rss_mb'])} MB  ({', '.join(s['served'])})"
              for s in server_rows]
    if checked:
        lines += ["", "== targets"]
        lines += [f"{'PASS' if t['pass'] else 'MISS'}  {t['database']:<11}{t['text']:<42}"
                  f"{t['what']}: {t['value']:g} {t['unit']}" for t in checked]
    else:
        lines += ["", "(smoke: targets not evaluated)"]
    http_note = (f"HTTP: uvicorn {versions.get('uvicorn', '?')} "
                 f"({'/'.join(versions.get('uvicorn_loop_http', ('?',)))}) pinned to core 0, "
                 f"bench/loadgen.py (asyncio, HTTP/1.1 keep-alive, {args.concurrency} "
                 f"connections) pinned to core 1, loopback")
    lines += ["", http_note,
              "data: " + ", ".join(f"{d.database} {d.name} "
                                   f"{'reused' if d.reused else 'built'} "
                                   f"({_fmt(d.build_seconds)} s)" for d in every),
              "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())
              + f"; total {total:.0f} s"]
    print("\n".join(lines), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "started_at": datetime.now(UTC).isoformat(), "smoke": args.smoke,
        "versions": {**versions, "load_average_end": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "datasets": [{"name": d.name, "database": d.database, **d.params,
                      "reused": d.reused, "build_seconds": d.build_seconds} for d in every],
        "build": build, "phases_seconds": phases, "total_seconds": total,
        "in_process": all_inproc, "http": all_http, "servers": server_rows,
        "targets": checked, "notes": [*notes, http_note], "tables": tables,
    }, indent=2, default=str))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
