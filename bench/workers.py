"""Throughput of `consumers-graphql serve --workers 1` against `--workers 2`, in the same run.

    .venv/bin/python bench/workers.py            # PostgreSQL, 20,000 consumers, ~2 minutes
    .venv/bin/python bench/workers.py --smoke    # tiny data, short loads (SQLite without PG)

A database of its own (`consumers_bench_workers`, seeded once with `consumers-graphql seed`
and reused while it has the same size), one fresh API key; then, round after round, `serve
--workers 1` and `serve --workers 2` as real processes (not pinned: the workers need both
cores), each loaded by bench/loadgen.py (asyncio, HTTP/1.1 keep-alive, loopback only) with
each workload in turn. Prints req/s, p50 and p99 per workload and worker count (the median
round), the ratio of 2 workers to 1, and the CPU seconds the server and the load generator
used: on a 2-core machine the load generator takes its share of the cores the workers
need, so the ratio here is below what two workers give on a machine of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads  # noqa: E402

PY = sys.executable
CLI = str(Path(PY).with_name("consumers-graphql"))
DATA_DIR = HERE / ".data"
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432"
DATABASE = "consumers_bench_workers"  # and its size: the smoke's tiny data apart
SECRET = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{32,}")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data and loads, no PG needed")
    parser.add_argument("--postgres", default=DEFAULT_PG, help="server URL, without a database")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of PG")
    parser.add_argument("--consumers", type=int, default=None, help="default 20,000 (smoke 200)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (smoke 1)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured seconds per load (default 5, smoke 1)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of load before measuring (default 1, smoke 0.3)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="client connections (enough to keep every worker busy)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "workers.json")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.consumers = args.consumers or (200 if smoke else 20_000)
    args.rounds = args.rounds or (1 if smoke else 3)
    args.seconds = args.seconds or (1.0 if smoke else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if smoke else 1.0)
    args.database_name = f"{DATABASE}_{args.consumers}"
    return args


def _pg_reachable(url: str) -> bool:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def check() -> bool:
        engine = create_async_engine(f"{url}/postgres", connect_args={"timeout": 5})
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False
        finally:
            await engine.dispose()

    return asyncio.run(check())


async def _consumers_in(url: str) -> int | None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(text("SELECT count(*) FROM consumers"))).scalar_one())
    except Exception:
        return None
    finally:
        await engine.dispose()


async def _recreate_pg(server: str, name: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    admin = create_async_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()


def prepare(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """The database (seeded unless it has the right size), a fresh key, one consumer id."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    if args.sqlite:
        path = DATA_DIR / f"workers_{args.consumers}.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        url = f"{args.postgres}/{args.database_name}"
    if asyncio.run(_consumers_in(url)) == args.consumers:
        log(f"reusing {url} ({args.consumers:,} consumers)")
    else:
        if args.sqlite:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        else:
            asyncio.run(_recreate_pg(args.postgres, args.database_name))
        log(f"seeding {args.consumers:,} consumers into {url}")
        _cli("seed", "--consumers", str(args.consumers), "--orders-per-consumer", "3",
             "--audiences-per-consumer", "3", "--random-seed", "1", "--quiet", url=url)
        if not args.sqlite:
            asyncio.run(_analyze(url))  # what autovacuum would do soon after a bulk load
    # a bucket no run can empty: the default one would answer 429 within a second
    created = _cli("keys", "create", "--name", f"bench-workers-{int(time.time())}",
                   "--rate-limit-capacity", "1000000000",
                   "--rate-limit-restore-rate", "1000000000", url=url)
    found = SECRET.search(created)
    assert found is not None, created
    ids = asyncio.run(_some_ids(url))
    return url, found.group(), ids


async def _analyze(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text("VACUUM ANALYZE"))
    finally:
        await engine.dispose()


async def _some_ids(url: str) -> list[str]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT id FROM consumers ORDER BY id LIMIT 50"))
            return [str(row[0]) for row in rows]
    finally:
        await engine.dispose()


def _cli(*command: str, url: str) -> str:
    done = subprocess.run([CLI, *command], env={**os.environ, "CONSUMERS_DATABASE_URL": url},
                          capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"consumers-graphql {' '.join(command)} failed:\n{done.stderr}")
    return done.stdout


def bodies(ids: list[str]) -> dict[str, list[bytes]]:
    def body(query: str, variables: dict[str, Any]) -> bytes:
        return json.dumps({"query": query, "variables": variables}).encode()

    return {
        "W1 page": [body(workloads.PAGE, {})],
        "W4 consumer": [body(workloads.CONSUMER, {"id": i}) for i in ids],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _listening_inodes(port: int) -> set[str]:
    """The listening sockets on the port: one shared, or one per worker (SO_REUSEPORT)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            found.add(fields[9])
    return found


def _watches(pid: int, inodes: set[str]) -> bool:
    """Whether the process's epoll instance watches one of these sockets."""
    try:
        fds = {fd.name: os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except OSError:
        return False
    sockets = {fd for fd, target in fds.items() if target[8:-1] in inodes}
    for fd, target in fds.items():
        if target == "anon_inode:[eventpoll]":
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            watched = set(re.findall(r"^tfd:\s+(\d+)\s", info, re.MULTILINE))
            if watched & sockets:
                return True
    return False


class Server:
    def __init__(self, url: str, workers: int) -> None:
        self.port = _free_port()
        self.workers = workers
        log_path = DATA_DIR / "logs" / f"workers_{workers}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")  # noqa: SIM115
        env = {**os.environ, "CONSUMERS_DATABASE_URL": url, "CONSUMERS_LOG_LEVEL": "warning"}
        self.process = subprocess.Popen(
            [CLI, "serve", "--port", str(self.port), "--workers", str(workers)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"serve --workers {workers} exited; see {log_path}")
            if self._ready():
                return
            time.sleep(0.2)
        raise SystemExit(f"serve --workers {workers} did not come up; see {log_path}")

    def _ready(self) -> bool:
        """Every worker accepting: as many serving processes as asked for, each watching the
        listening socket with its event loop's epoll, and /healthz answering."""
        serving = self.pids()
        if len(serving) != self.workers:
            return False
        listening = _listening_inodes(self.port)
        if not all(_watches(pid, listening) for pid in serving):
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n"
                             b"Connection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def pids(self) -> list[int]:
        """The processes that serve: the workers, or the process itself for one."""
        if self.workers == 1:
            return [self.process.pid]
        return [c for c in _children(self.process.pid)
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.log.close()
        if code != 0:
            raise SystemExit(f"serve --workers {self.workers} exited {code} on SIGTERM")


def load(server: Server, secret: str, payloads: list[bytes],
         args: argparse.Namespace) -> dict[str, Any]:
    job = {
        "host": "127.0.0.1", "port": server.port, "path": "/graphql",
        "headers": {"Authorization": f"Bearer {secret}", "Content-Type": "application/json",
                    "Accept": "application/json"},
        "bodies": [base64.b64encode(b).decode() for b in payloads],
        "concurrency": args.concurrency, "seconds": args.seconds,
        "warmup_seconds": args.warmup, "max_requests": 10_000_000,
    }
    server_cpu, busy = server.cpu_seconds(), _machine_busy()
    postgres_cpu = _postgres_cpu(args.database_name)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    loadgen = subprocess.Popen([PY, str(HERE / "loadgen.py")], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = loadgen.communicate(json.dumps(job).encode())
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator, reaped
    if loadgen.returncode != 0:
        raise SystemExit(f"load generator failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    if result["errors"]:
        raise SystemExit(f"{result['errors']} failed requests: {result['first_error']}")
    result["server_cpu_s"] = server.cpu_seconds() - server_cpu
    result["postgres_cpu_s"] = _spent(postgres_cpu, _postgres_cpu(args.database_name))
    result["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime
                               - children.ru_utime - children.ru_stime)
    result["machine_busy_s"] = _machine_busy() - busy
    result["wall_s"] = time.perf_counter() - began
    return result


def _postgres_cpu(database: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend of the bench's database (its title names it)."""
    title = f" {database} ".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if title in (entry / "cmdline").read_bytes():
                    found[int(entry.name)] = _cpu_seconds(int(entry.name))
            except OSError:
                continue
    return found


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def _machine_busy() -> float:
    """CPU seconds every core spent on anything but idling, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.sqlite and not _pg_reachable(args.postgres):
        if not args.smoke:
            raise SystemExit(f"PostgreSQL at {args.postgres} is unreachable (--sqlite measures "
                             "a SQLite file instead)")
        log("PostgreSQL unreachable: the smoke runs on SQLite")
        args.sqlite = True
    url, secret, ids = prepare(args)
    load_start = os.getloadavg()
    work = bodies(ids)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {1: [], 2: []} for name in work}
    for round_ in range(1, args.rounds + 1):
        for workers in (1, 2):
            server = Server(url, workers)
            try:
                for name, payloads in work.items():
                    result = load(server, secret, payloads, args)
                    runs[name][workers].append(result)
                    log(f"round {round_}: {name}, {workers} worker(s): "
                        f"{result['rps']:.0f} req/s")
            finally:
                server.stop()
    rows = []
    lines = ["", f"== serve --workers 1 vs 2 ({'SQLite' if args.sqlite else 'PostgreSQL'}, "
             f"{args.consumers:,} consumers, {args.concurrency} connections, "
             f"{args.seconds:g} s per load, median of {args.rounds} round(s), "
             f"{os.cpu_count()} cores)",
             f"{'workload':<14}{'workers':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'cores: server':>15}{'PG':>6}{'loadgen':>9}{'machine':>9}"]
    for name, by_workers in runs.items():
        medians = {}
        for workers, results in by_workers.items():
            middle = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
            medians[workers] = middle
            span = middle["wall_s"]  # the counters span the whole load, warm-up included

            def cores(key: str, result: dict[str, Any] = middle, span: float = span) -> str:
                return f"{result[key] / span:.2f}"

            lines.append(f"{name:<14}{workers:>8}{middle['rps']:>9.0f}{middle['p50_ms']:>9.1f}"
                         f"{middle['p99_ms']:>9.1f}{cores('server_cpu_s'):>15}"
                         f"{cores('postgres_cpu_s'):>6}{cores('loadgen_cpu_s'):>9}"
                         f"{cores('machine_busy_s'):>9}")
            rows.append({"workload": name, "workers": workers, **middle,
                         "rounds_rps": [r["rps"] for r in results]})
        ratio = medians[2]["rps"] / medians[1]["rps"] if medians[1]["rps"] else 0.0
        lines.append(f"{name:<14}{'2 / 1':>8}{ratio:>8.2f}x")
        rows.append({"workload": name, "ratio_2_to_1": ratio})
    lines.append("(cores: CPU seconds per second of load used by the serving processes, "
                 "PostgreSQL, the load generator, and the whole machine, other work included)")
    lines.append("load average at the start / end: "
                 f"{' '.join(f'{x:.1f}' for x in load_start)} / "
                 f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n".join(lines), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "started_at": datetime.now(UTC).isoformat(), "smoke": args.smoke,
        "database": "sqlite" if args.sqlite else "postgresql", "consumers": args.consumers,
        "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
    }, indent=2))
    log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
