"""Real processes for the tests that need them: `consumers-graphql serve` on a free loopback
port, its output collected, and a private PostgreSQL cluster the test starts and stops."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.log_audit import AUDIT

SECRET = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{32,}")
# What the first start prints, this once, on purpose: the first key's secret and its use.
_BANNER = re.compile(r"\nCreated the first API key, .*?\nMore keys: [^\n]*\n", re.DOTALL)
POSTGRES_BIN = Path(os.environ.get("CONSUMERS_TEST_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))


# `serve` with every operation executed by graphql-core alone, as `on_path` does in process:
# the console script run after its schema is built with the compiled executor turned off.
ON_GRAPHQL_CORE = """
import runpy, sys
from consumers_graphql.web import app
build = app.build_schema
def build_schema(**kwargs):
    schema = build(**kwargs)
    schema.compiled = False
    return schema
app.build_schema = build_schema
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A small HTTP server (a stand-in for another service: a page's origin, a registry) on
    a free loopback port, in a thread of this process; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class Served:
    """`consumers-graphql serve` (the console script) in a subprocess, stdout and stderr
    collected line by line, and audited when it stops (tests/log_audit.py): but for the
    first start's banner, no value the run used, no email, phone or secret."""

    def __init__(self, database_url: str, cwd: Path, env: dict[str, str] | None = None,
                 preexec: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env or {})  # what it was given beyond the database and the pepper
        script = Path(sys.executable).with_name("consumers-graphql")
        environment = {**os.environ, "CONSUMERS_DATABASE_URL": database_url,
                       "CONSUMERS_KEY_PEPPER": "serve-pepper", **(env or {})}
        self.process = subprocess.Popen(
            [*preexec, str(script), "serve", "--port", str(self.port)], env=environment,
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._audited = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.process.poll() is None, self.output
                time.sleep(0.1)
        raise AssertionError(f"serve did not come up:\n{self.output}")

    def secret(self) -> str:
        """The first key's secret, as the first start printed it."""
        found = SECRET.search(self.output)
        assert found is not None, self.output
        AUDIT.use(found.group())
        return found.group()

    def client(self, **kwargs: object) -> httpx.Client:
        """A client of this server, audited like the session's `client`."""
        return httpx.Client(base_url=self.url, event_hooks=AUDIT.sync_event_hooks(),
                            **{"timeout": 10, **kwargs})  # type: ignore[arg-type]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout=5)
        self._reader.join(timeout=5)
        if not self._audited:
            self._audited = True
            AUDIT.check_output(_BANNER.sub("\n", self.output), f"serve on port {self.port}")
        return code

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        with self.client() as client:
            return client.get(path, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        with self.client() as client:
            return client.post(path, **kwargs)  # type: ignore[arg-type]


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb) on a free loopback port, in a directory of its
    own. PostgreSQL refuses to run as root: as root (CI) it runs as the `postgres` user, or
    `nobody` where there is none."""

    def __init__(self) -> None:
        if not (POSTGRES_BIN / "initdb").exists():
            pytest.skip(f"PostgreSQL's initdb not found in {POSTGRES_BIN} "
                        "(set CONSUMERS_TEST_POSTGRES_BIN)")
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="consumers-pg-"))
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            shutil.chown(self.directory, user)
            self._as_user = ["runuser", "-u", user, "--"]
        self.data = self.directory / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self._as_user, str(POSTGRES_BIN / tool), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{tool} failed: {result.stdout}{result.stderr}"

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c full_page_writes=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "log"),
                  "-o", options, "-w", "start")

    def stop(self) -> None:
        """As a crash or a pulled cable looks to clients: no goodbye to any connection."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run([*self._as_user, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data),
                        "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60,
                       check=False)
        shutil.rmtree(self.directory, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


PGBOUNCER = Path(os.environ.get("CONSUMERS_TEST_PGBOUNCER", "/usr/sbin/pgbouncer"))


class PgBouncer:
    """A private pgbouncer in transaction mode on a free loopback port, in front of the
    server at `server_port` (every database, `* =`; every user trusted, as the server is).
    pgbouncer refuses to run as root: as root it drops to `postgres` (or `nobody`) itself,
    so that it stays this process's child and stops with it."""

    def __init__(self, server_port: int = 5432, *, pool_size: int = 20) -> None:
        if not PGBOUNCER.exists():
            pytest.skip(f"pgbouncer not found at {PGBOUNCER} (apt-get install pgbouncer, or "
                        "set CONSUMERS_TEST_PGBOUNCER)")
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="consumers-pgbouncer-"))
        (self.directory / "userlist.txt").write_text('"postgres" ""\n"root" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.directory}\n"
            "auth_type = trust\n"
            f"auth_file = {self.directory / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self.directory / 'pgbouncer.log'}\n"
            f"pidfile = {self.directory / 'pgbouncer.pid'}\n"
            "admin_users = postgres\n"
        )
        as_user: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _user_exists("postgres") else "nobody"
            for path in (self.directory, *self.directory.iterdir()):
                shutil.chown(path, user)
            as_user = ["-u", user]
        self.process = subprocess.Popen(
            [str(PGBOUNCER), *as_user, str(self.directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.log
                    self.stop()
                    raise AssertionError(f"pgbouncer did not start: {log}") from None
                time.sleep(0.05)

    def url(self, database: str, user: str = "postgres") -> str:
        return f"postgresql+asyncpg://{user}@127.0.0.1:{self.port}/{database}"

    @property
    def log(self) -> str:
        try:
            return (self.directory / "pgbouncer.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)
