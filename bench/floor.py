"""The floor of the Python stack under bench/peer.py's workloads (issue 14): a bare ASGI app
that answers each of them with the JSON our GraphQL server gives, without GraphQL.

Served as our `serve` serves (uvicorn, httptools on uvloop, one process, no access log),
started by bench/peer.py with ``--floor`` (``uvicorn --factory floor:create_app``, spec file
in ``BENCH_FLOOR_SPEC``). Per request it reads the body with orjson, finds the workload by
its query text and variables, checks the `Authorization` header against the known keys (ours
caches a verified key: a set look-up is the same work), and for `{ __typename }` answers our
bytes; for the others it sends the statements our app sent for that workload, with the same
parameters (captured once by bench/peer.py; the related rows' statements take the page's ids
from the page's rows, as ours does), on asyncpg connections of its own (asyncpg's prepared
statement cache, as ours), and writes our JSON with orjson: camelCase keys, decimals as
floats, timestamps by orjson (`...05.123456Z`, no fraction when 0), `metadata` PostgreSQL's
JSON text as is, our `extensions` and response headers (the request id a counter of the same
length). It does not decode the cursor nor escape the search term: those parameters are
taken as captured, so the floor is a little below what the same work would cost.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import pickle
from typing import Any

import baselines
import orjson
from baselines import Receive, Scope, Send

SPEC_ENV = "BENCH_FLOOR_SPEC"
POOL_SIZE = 10  # ours: CONSUMERS_POOL_SIZE's default
PAGE_FIRST = 20  # workloads.PAGE and SEARCH: consumers(first: 20)
AUDIENCES_FIRST = 20  # audiences' default page
ORDERS_FIRST = 5  # orders(first: 5)
# A parameter of a captured statement: as captured, or the ids of the page's consumers.
LITERAL, PAGE_IDS = "literal", "page_ids"
# Per-request headers: ours computes these two; the rest are ours' as captured.
PER_REQUEST = {b"content-length", b"x-request-id"}
UNKNOWN = orjson.dumps({"errors": [{"message": "the floor knows no such operation"}]})


def build_spec(url: str, secrets: list[str], captures: list[dict[str, Any]],
               unauthorized: dict[str, Any]) -> dict[str, Any]:
    """The floor's recipe. `captures`: per workload its `name`, `query`, `variables`, the
    `statements` (SQL, parameters) our app sent for it, and our `response` (`status`,
    `headers`, `body`); `unauthorized`: our answer without a key."""
    workloads = []
    for capture in captures:
        body = orjson.loads(capture["response"]["body"])
        data = body["data"]
        kind = ("typename" if "__typename" in data
                else "consumer" if "consumer" in data else "consumers")
        page_ids: list[str] = []
        if kind == "consumers":
            page_ids = [node["id"] for node in data["consumers"]["nodes"]]
        statements = []
        for n, (sql, params) in enumerate(capture["statements"]):
            # (ours sends the page's ids in a set's order, which differs between processes)
            slots = [(PAGE_IDS, None) if page_ids and isinstance(value, list)
                     and sorted(value) == sorted(page_ids) else (LITERAL, value)
                     for value in params or ()]
            role = _role(kind, n, sql)
            if n and (PAGE_IDS, None) not in slots:
                raise ValueError(f"{capture['name']}: no parameter of the {role} statement "
                                 f"is the page's ids: {params!r:.300}")
            statements.append((sql, slots, role))
        workloads.append({
            "name": capture["name"], "query": capture["query"],
            "variables": capture["variables"], "kind": kind, "statements": statements,
            "relations": kind == "consumers" and bool(data["consumers"]["nodes"])
            and "audiences" in data["consumers"]["nodes"][0],
            "extensions": body.get("extensions"),
            "body": capture["response"]["body"] if kind == "typename" else None,
            "headers": _static_headers(capture["response"]["headers"]),
        })
    return {"url": url, "secrets": secrets, "workloads": workloads,
            "unauthorized": {"status": unauthorized["status"], "body": unauthorized["body"],
                             "headers": _static_headers(unauthorized["headers"])}}


def _role(kind: str, n: int, sql: str) -> str:
    """What a statement's rows are: the page (or the consumer), or a relation's rows."""
    if n == 0:
        return kind
    for table in ("audiences", "orders"):
        if f"FROM {table} " in sql:
            return table
    raise ValueError(f"the floor does not know what this statement reads: {sql[:200]}")


def _static_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers
            if k.lower().encode() not in PER_REQUEST]


class Pool:
    """Up to POOL_SIZE asyncpg connections, opened on demand, one per request (as ours
    holds one for a request's reads); no reset query on release (ours sends none: its
    pool's rollback is a no-op when nothing began a transaction, as here)."""

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn, self.size = dsn, size
        self.free: list[Any] = []
        self.opened = 0
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def acquire(self) -> Any:
        if self.free:
            return self.free.pop()
        if self.opened < self.size:
            import asyncpg

            self.opened += 1
            try:
                return await asyncpg.connect(self.dsn)
            except BaseException:
                self.opened -= 1
                raise
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def release(self, conn: Any) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self.free.append(conn)

    async def close(self) -> None:
        for conn in self.free:
            await conn.close()
        self.free = []


def _consumer(c: Any) -> dict[str, Any]:
    value, metadata = c["total_order_value"], c["metadata"]
    return {
        "id": c["id"], "email": c["email"], "phone": c["phone"], "fullName": c["full_name"],
        "metadata": None if metadata is None else orjson.Fragment(metadata),
        "externalId": c["external_id"], "totalOrders": c["total_orders"],
        "totalOrderValue": None if value is None else float(value),
        "lastOrderAt": c["last_order_at"], "createdAt": c["created_at"],
        "updatedAt": c["updated_at"],
    }


def _by_parent(rows: list[Any], size: int) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for row in rows:
        if row["_kind"] == 0:
            items = grouped.setdefault(row["_parent"], [])
            if len(items) < size:
                items.append(row)
    return grouped


class Workload:
    """One workload's answer: its statements on one connection, then our JSON."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.kind: str = spec["kind"]
        self.statements: list[tuple[str, list[tuple[str, Any]], str]] = spec["statements"]
        self.relations: bool = spec["relations"]
        self.extensions = spec["extensions"]
        self.body: bytes | None = spec["body"]
        self.headers: list[tuple[bytes, bytes]] = spec["headers"]

    async def answer(self, pool: Pool) -> bytes:
        if self.body is not None:
            return self.body
        conn = await pool.acquire()
        try:
            if self.kind == "consumer":
                sql, slots, _role = self.statements[0]
                rows = await conn.fetch(sql, *[value for _kind, value in slots])
                data: dict[str, Any] = {"consumer": _consumer(rows[0]) if rows else None}
            else:
                data = {"consumers": {"nodes": await self._page(conn)}}
        finally:
            pool.release(conn)
        body: dict[str, Any] = {"data": data}
        if self.extensions is not None:
            body["extensions"] = self.extensions
        return orjson.dumps(body, option=orjson.OPT_UTC_Z)

    async def _page(self, conn: Any) -> list[dict[str, Any]]:
        (sql, slots, _role), *related = self.statements
        rows = await conn.fetch(sql, *[value for _kind, value in slots])
        page = [r for r in rows if r["_kind"] == 0][:PAGE_FIRST]
        if not self.relations:
            return [_consumer(c) for c in page]
        ids = [c["id"] for c in page]
        audiences: dict[str, list[Any]] = {}
        orders: dict[str, list[Any]] = {}
        for sql, slots, role in related:
            found = await conn.fetch(sql, *[ids if kind == PAGE_IDS else value
                                            for kind, value in slots])
            if role == "orders":
                orders = _by_parent(found, ORDERS_FIRST)
            else:
                audiences = _by_parent(found, AUDIENCES_FIRST)
        nodes = []
        for c in page:
            node = _consumer(c)
            node["audiences"] = {"nodes": [{"id": a["id"], "name": a["name"]}
                                           for a in audiences.get(c["id"], ())]}
            node["orders"] = {"nodes": [
                {"id": o["id"], "amount": float(o["amount"]), "currency": o["currency"],
                 "placedAt": o["placed_at"]}
                for o in orders.get(c["id"], ())]}
            nodes.append(node)
        return nodes


class FloorApp:
    """POST /graphql with one of the spec's workloads; anything else is a 400."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.pool = Pool(spec["url"].replace("postgresql+asyncpg://", "postgresql://"),
                         POOL_SIZE)
        self.authorized = {f"Bearer {s}".encode() for s in spec["secrets"]}
        self.routes: dict[str, list[tuple[dict[str, Any], Workload]]] = {}
        for w in spec["workloads"]:
            self.routes.setdefault(w["query"], []).append((w["variables"], Workload(w)))
        unauthorized = spec["unauthorized"]
        self.unauthorized = (unauthorized["status"], unauthorized["body"],
                             unauthorized["headers"])
        self.fallback_headers = [(b"content-type", b"application/json")]
        self.ids = itertools.count()

    def _route(self, body: bytes) -> Workload | None:
        try:
            request = orjson.loads(body)
            candidates = self.routes.get(request["query"], ())
            variables = request.get("variables") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        for wanted, workload in candidates:
            if wanted == variables:
                return workload
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await baselines._lifespan(receive, send, None, self.pool.close)
            return
        body = await _read(receive)
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                break
        if authorization not in self.authorized:
            status, payload, headers = self.unauthorized
        else:
            workload = self._route(body)
            if workload is None:
                status, payload, headers = 400, UNKNOWN, self.fallback_headers
            else:
                status, payload, headers = 200, await workload.answer(self.pool), \
                    workload.headers
        await send({"type": "http.response.start", "status": status, "headers": [
            *headers, (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", b"req_%026d" % next(self.ids))]})
        await send({"type": "http.response.body", "body": payload})


async def _read(receive: Receive) -> bytes:
    message = await receive()
    body: bytes = message.get("body", b"")
    while message.get("more_body", False):
        message = await receive()
        body += message.get("body", b"")
    return body


def create_app() -> FloorApp:
    """For uvicorn --factory: the spec is a pickle named by BENCH_FLOOR_SPEC."""
    from consumers_graphql.web.app import tune_gc

    with open(os.environ[SPEC_ENV], "rb") as f:
        spec = pickle.load(f)
    app = FloorApp(spec)
    tune_gc()  # the collector settings `serve` gives the app
    return app
