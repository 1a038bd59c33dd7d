"""The floors a GraphQL workload is compared with, as bare ASGI apps.

R1 answers W1 (`consumers(first: 20)` with audiences and orders) by hand: the statements the
app sent for W1 (captured with a ``before_cursor_execute`` listener, the API key look-up
included) replayed on the raw driver (sqlite3 in the event loop, or an asyncpg pool), and the
same JSON built with orjson. Hello answers with fixed bytes. Served in process by the workers
and over HTTP by uvicorn (``uvicorn --factory baselines:create_app``, spec file in
``BENCH_BASELINE_SPEC``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_HEADERS = [(b"content-type", b"application/json")]
UNAUTHORIZED = orjson.dumps({"errors": [{"message": "Authentication required",
                                          "extensions": {"code": "UNAUTHENTICATED"}}]})

# A parameter of a captured statement: a literal, the n-th page id, or the key's digest.
LITERAL, PAGE_ID, DIGEST = "literal", "page_id", "digest"


def build_r1_spec(capture: dict[str, Any], secret: str, pepper: str | None,
                  url: str) -> dict[str, Any]:
    """R1's recipe from a W1 capture: each statement with its parameters made into slots."""
    recorded = capture["recorded"]
    digest = hmac.new((pepper or "").encode(), secret.encode(), hashlib.sha256).hexdigest()
    nodes = capture["response"]["data"]["consumers"]["nodes"]
    page_ids = [node["id"] for node in nodes]
    position = {value: n for n, value in enumerate(page_ids)}

    def template(params: Any) -> list[tuple[str, Any]]:
        slots = []
        for value in params or ():
            if isinstance(value, str) and value in position:
                slots.append((PAGE_ID, position[value]))
            elif value == digest:
                slots.append((DIGEST, None))
            else:
                slots.append((LITERAL, value))
        return slots

    auth = [(sql, template(params)) for sql, params in recorded["auth"]
            if "api_keys" in sql and "secret_hash" in sql and sql.lstrip().upper().startswith(
                "SELECT")]
    return {
        "url": url,
        "pepper": pepper,
        "auth": auth[:1],
        "statements": [(sql, template(params)) for sql, params in recorded["items"]],
        "extensions": capture["response"].get("extensions"),
        "orders_first": 5,
        "page_first": 20,
        "audiences_first": 20,
    }


def _bind(slots: list[tuple[str, Any]], page_ids: list[str], digest: str) -> list[Any]:
    values = []
    for kind, value in slots:
        if kind == PAGE_ID:
            values.append(page_ids[value])
        elif kind == DIGEST:
            values.append(digest)
        else:
            values.append(value)
    return values


def _sqlite_time(value: str | None) -> str | None:
    # SQLAlchemy stores "YYYY-MM-DD HH:MM:SS.ffffff"; the API shows microseconds only if set.
    if value is None:
        return None
    micro = value[20:26]
    return f"{value[:10]}T{value[11:19]}{'.' + micro if micro and micro != '000000' else ''}Z"


def _pg_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value.astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{value.microsecond:06d}Z" if value.microsecond else text + "Z"


class _Rows:
    """The result sets of one request, recognised by their columns."""

    def __init__(self) -> None:
        self.consumers: list[dict[str, Any]] | None = None
        self.audiences: list[dict[str, Any]] = []
        self.orders: list[dict[str, Any]] = []

    def add(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        names = set(columns)
        if "_parent" in names and "amount" in names:
            self.orders += rows
        elif "_parent" in names and "name" in names:
            self.audiences += rows
        elif "total_orders" in names and self.consumers is None:
            self.consumers = rows
        else:
            raise ValueError(f"R1 does not know a statement returning {sorted(names)}")


def _page(rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("_kind", 0) == 0][:size]


def _children(rows: list[dict[str, Any]], size: int) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("_kind", 0) == 0:
            grouped.setdefault(row["_parent"], []).append(row)
    return {parent: items[:size] for parent, items in grouped.items()}


class R1App:
    """The hand-written W1 endpoint."""

    def __init__(self, spec: dict[str, Any], counter: Any = None) -> None:
        self.spec = spec
        self.counter = counter
        self.sqlite = spec["url"].startswith("sqlite")
        # "aiosqlite": the app's SQLite driver (a thread hop per call), for comparison only.
        self.aiosqlite = spec.get("driver") == "aiosqlite"
        self.conn: sqlite3.Connection | None = None
        self.aconn: Any = None
        self.pool: Any = None
        self.pepper = (spec["pepper"] or "").encode()
        self.time = _sqlite_time if self.sqlite else _pg_time

    async def startup(self) -> None:
        if self.sqlite and self.aiosqlite:
            import aiosqlite

            path = self.spec["url"].split("///", 1)[1]
            self.aconn = await aiosqlite.connect(path, isolation_level=None)
        elif self.sqlite:
            path = self.spec["url"].split("///", 1)[1]
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout=10000")
        else:
            import asyncpg

            dsn = self.spec["url"].replace("postgresql+asyncpg://", "postgresql://")
            self.pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10)

    async def shutdown(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.aconn is not None:
            await self.aconn.close()
        if self.pool is not None:
            await self.pool.close()

    async def _run(self, run: Callable[[str, list[Any]], Awaitable[tuple[list[Any], list[str]]]],
                   digest: str) -> bytes | None:
        for sql, slots in self.spec["auth"]:
            rows, _ = await run(sql, _bind(slots, [], digest))
            if not rows:
                return None
        found = _Rows()
        page_ids: list[str] = []
        for sql, slots in self.spec["statements"]:
            started = time.perf_counter()
            rows, columns = await run(sql, _bind(slots, page_ids, digest))
            if self.counter is not None:
                self.counter.items.append((sql, None))
                self.counter.db_seconds += time.perf_counter() - started
            dicts = [dict(zip(columns, row, strict=True)) for row in rows]
            found.add(dicts, columns)
            if found.consumers is not None and not page_ids:
                page_ids = [r["id"] for r in _page(found.consumers, self.spec["page_first"])]
        return self._render(found)

    def _render(self, found: _Rows) -> bytes:
        time_, sqlite = self.time, self.sqlite
        audiences = _children(found.audiences, self.spec["audiences_first"])
        orders = _children(found.orders, self.spec["orders_first"])
        nodes = []
        for c in _page(found.consumers or [], self.spec["page_first"]):
            metadata = c["metadata"]
            nodes.append({
                "id": c["id"], "email": c["email"], "phone": c["phone"],
                "fullName": c["full_name"],
                "metadata": orjson.Fragment(metadata) if metadata is not None else None,
                "externalId": c["external_id"], "totalOrders": c["total_orders"],
                "totalOrderValue": (c["total_order_value"] / 10_000 if sqlite
                                    else float(c["total_order_value"])),
                "lastOrderAt": time_(c["last_order_at"]), "createdAt": time_(c["created_at"]),
                "updatedAt": time_(c["updated_at"]),
                "audiences": {"nodes": [{"id": a["id"], "name": a["name"]}
                                        for a in audiences.get(c["id"], ())]},
                "orders": {"nodes": [
                    {"id": o["id"],
                     "amount": o["amount"] / 10_000 if sqlite else float(o["amount"]),
                     "currency": o["currency"], "placedAt": time_(o["placed_at"])}
                    for o in orders.get(c["id"], ())
                ]},
            })
        body: dict[str, Any] = {"data": {"consumers": {"nodes": nodes}}}
        if self.spec["extensions"] is not None:
            body["extensions"] = self.spec["extensions"]
        return orjson.dumps(body)

    async def _sqlite_run(self, sql: str, params: list[Any]) -> tuple[list[Any], list[str]]:
        assert self.conn is not None
        cursor = self.conn.execute(sql, params)
        rows = cursor.fetchall()
        return rows, [d[0] for d in cursor.description or ()]

    async def _aiosqlite_run(self, sql: str, params: list[Any]) -> tuple[list[Any], list[str]]:
        cursor = await self.aconn.execute(sql, params)
        rows = await cursor.fetchall()
        return list(rows), [d[0] for d in cursor.description or ()]

    async def answer(self, authorization: bytes | None) -> tuple[int, bytes]:
        secret = authorization[7:] if authorization and authorization[:7] == b"Bearer " else b""
        if not secret:
            return 401, UNAUTHORIZED
        digest = hmac.new(self.pepper, secret, hashlib.sha256).hexdigest()
        if self.aiosqlite:
            body = await self._run(self._aiosqlite_run, digest)
        elif self.sqlite:
            body = await self._run(self._sqlite_run, digest)
        else:
            async with self.pool.acquire() as conn:

                async def run(sql: str, params: list[Any]) -> tuple[list[Any], list[str]]:
                    rows = await conn.fetch(sql, *params)
                    return rows, list(rows[0].keys()) if rows else []

                body = await self._run(run, digest)
        return (401, UNAUTHORIZED) if body is None else (200, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.startup, self.shutdown)
            return
        await _drain(receive)
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
        status, body = await self.answer(authorization)
        await _respond(send, status, body)


class HelloApp:
    """Bare ASGI: the given bytes, whatever the request."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, None, None)
            return
        await _drain(receive)
        await _respond(send, 200, self.body)


class Baselines:
    """R1 at /r1 and hello at /hello, for one uvicorn process."""

    def __init__(self, r1: R1App, hello: HelloApp) -> None:
        self.r1, self.hello = r1, hello

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.r1.startup, self.r1.shutdown)
            return
        app = self.hello if scope["path"] == "/hello" else self.r1
        await app(scope, receive, send)


async def _drain(receive: Receive) -> None:
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send, startup: Any, shutdown: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app() -> Baselines:
    """For uvicorn --factory: the spec is a pickle named by BENCH_BASELINE_SPEC."""
    from consumers_graphql.web.app import tune_gc

    with open(os.environ["BENCH_BASELINE_SPEC"], "rb") as f:
        spec = pickle.load(f)
    app = Baselines(R1App(spec["r1"]), HelloApp(spec["hello"]))
    tune_gc()  # the collector settings `serve` gives the app
    return app
