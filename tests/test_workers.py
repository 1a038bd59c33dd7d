"""`serve --workers N` as a real process tree: one port, every worker answering, the schema
and the first key made once by the parent, a killed worker replaced, a clean stop.

Which worker answers a request is the kernel's choice (each worker listens on a socket of
its own, SO_REUSEPORT): to see that each one serves, the test opens connections, queries on
each, and finds which worker holds the server's end of each (/proc)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import TEST_DATABASE_URL
from tests.processes import SECRET, Served

COUNT = {"query": "{ consumers(first: 1) { totalCount } }"}


@pytest.fixture
async def fresh_url(tmp_path: Path) -> AsyncIterator[str]:
    """An empty database, written as people write URLs: without the async driver
    (`postgres://`, `sqlite:///`), which the settings add."""
    if not TEST_DATABASE_URL:
        yield f"sqlite:///{tmp_path / 'workers.db'}"
        return
    server = make_url(TEST_DATABASE_URL)
    name = f"consumers_workers_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        yield "postgres://" + url.split("://", 1)[1]
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _workers(served: Served) -> set[int]:
    """The serving children (multiprocessing's resource tracker is a child too)."""
    workers = set()
    for child in _children(served.process.pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            workers.add(child)
    return workers


def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # exited, not yet reaped by whoever adopted it


# GraphQL queries answered 200, by server port (what /metrics must add up to).
SENT: dict[int, int] = {}


def _graphql_answered(served: Served) -> float:
    """consumers_http_requests_total for GraphQL 200s on /metrics, over every label set."""
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "consumers_http_requests_total"
               and sample.labels.get("face") == "graphql"
               and sample.labels.get("status") == "200")


def _answering(served: Served, secret: str, expected: set[int]) -> set[int]:
    """The workers that answer a query on new connections (the kernel spreads them over the
    workers' sockets by a hash of their addresses): batches of 16, each connection kept open
    until the worker holding its other end is found, until the expected ones have answered
    (the chance that 16 land on one of 2 workers is 2 in 65,536; five batches in a row,
    never)."""
    body = json.dumps(COUNT).encode()
    request = (f"POST /graphql HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {secret}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    answered: set[int] = set()
    for _ in range(5):
        connections = [socket.create_connection(("127.0.0.1", served.port), timeout=30)
                       for _ in range(16)]
        try:
            for connection in connections:
                connection.sendall(request)
                status, answer = _response(connection)
                assert status == 200 and b'"totalCount":0' in answer, answer
                SENT[served.port] = SENT.get(served.port, 0) + 1
            answered |= _holders(served, {c.getsockname()[1] for c in connections})
        finally:
            for connection in connections:
                connection.close()
        if answered >= expected:
            break
    return answered


def _response(connection: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += connection.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        rest += connection.recv(65536)
    return int(head.split(b" ", 2)[1]), rest


def _holders(served: Served, client_ports: set[int]) -> set[int]:
    """The workers holding the server's end of connections from these client ports."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local == served.port and remote in client_ports and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    holders = set()
    for worker in _workers(served):
        descriptors = Path(f"/proc/{worker}/fd")
        if any(os.readlink(fd) in inodes for fd in descriptors.iterdir()):
            holders.add(worker)
    return holders


def _until(condition: object, what: str, served: Served, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}:\n{served.output}")


@pytest.mark.database
def test_two_workers_share_the_port_start_once_replace_a_killed_one_and_stop_cleanly(
    fresh_url: str, tmp_path: Path
) -> None:
    # given `serve --workers 2` on an empty database
    served = Served(fresh_url, tmp_path, env={"CONSUMERS_WORKERS": "2"})
    stopped = False
    try:
        served.wait_until_up()
        _until(lambda: len(_workers(served)) == 2, "two workers", served)
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        first = _workers(served)
        # then the parent made the schema and the first key once, and each worker serves
        secret = served.secret()
        assert _answering(served, secret, first) == first
        # and /metrics, whichever worker answers it, counts what both workers answered
        assert _graphql_answered(served) == SENT[served.port]
        output = served.output
        assert output.count("Created the database schema") == 1, output
        assert output.count("Created the first API key") == 1, output
        assert set(SECRET.findall(output)) == {secret}, output

        # when a worker is killed
        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        # then another takes its place, and it serves too
        _until(lambda: killed not in _workers(served) and len(_workers(served)) == 2,
               "the killed worker replaced", served, seconds=60)
        (replacement,) = _workers(served) - first
        _until(lambda: served.output.count("Application startup complete") == 3,
               "the replacement started", served, seconds=60)
        assert replacement in _answering(served, secret, {replacement})
        # the killed worker's counts stay in the sum, beside its replacement's
        assert _graphql_answered(served) == SENT[served.port]
        assert f"Child process [{killed}] died" in served.output, served.output

        # when the parent is sent SIGTERM
        workers = _workers(served)
        served.process.send_signal(signal.SIGTERM)
        code = served.process.wait(timeout=30)
        stopped = True
    finally:
        if not stopped:
            served.stop()
    # then it exits 0, having stopped every worker, each after its own clean shutdown
    assert code == 0, served.output
    assert all(_gone(pid) for pid in workers), served.output
    served.stop()
    assert served.output.count("Application shutdown complete") == 2, served.output
    assert "Traceback" not in served.output, served.output
    assert SECRET.search(served.output[served.output.index("Uvicorn running"):]) is None


def test_sigint_stops_every_worker_and_exits_130(tmp_path: Path) -> None:
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'sigint.db'}", tmp_path,
                    env={"CONSUMERS_WORKERS": "2"})
    try:
        served.wait_until_up()
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        workers = _workers(served)
        assert len(workers) == 2
        served.process.send_signal(signal.SIGINT)
        code = served.process.wait(timeout=30)
    finally:
        served.stop()
    assert code == 130, served.output
    assert all(_gone(pid) for pid in workers), served.output
    assert "Traceback" not in served.output, served.output


def test_sighup_replaces_every_worker_one_at_a_time(tmp_path: Path) -> None:
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'hup.db'}", tmp_path,
                    env={"CONSUMERS_WORKERS": "2"})
    try:
        served.wait_until_up()
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        secret = served.secret()
        before = _workers(served)
        # when the parent is sent SIGHUP
        served.process.send_signal(signal.SIGHUP)
        # then both workers are replaced, the port never closed, and the new ones serve
        _until(lambda: len(_workers(served)) == 2 and not _workers(served) & before,
               "both workers replaced", served, seconds=90)
        assert _answering(served, secret, _workers(served)) == _workers(served)
        assert served.process.poll() is None
    finally:
        assert served.stop() == 0, served.output
    assert served.output.count("Application shutdown complete") == 4, served.output
    assert "Traceback" not in served.output, served.output


def test_one_worker_is_the_serving_process_itself(tmp_path: Path) -> None:
    # the default: no process manager, no child process
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", tmp_path)
    try:
        served.wait_until_up()
        assert served.get("/healthz").status_code == 200
        assert _children(served.process.pid) == set()
    finally:
        assert served.stop() == 0, served.output
    assert "Started parent process" not in served.output, served.output


@pytest.mark.parametrize("workers", ["2", "1"])
def test_a_port_in_use_is_a_configuration_error(tmp_path: Path, workers: str) -> None:
    script = Path(sys.executable).with_name("consumers-graphql")
    environment = {**os.environ, "CONSUMERS_DATABASE_URL": f"sqlite:///{tmp_path / 'taken.db'}"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(script), "serve", "--workers", workers, "--port", str(port)],
                              env=environment, capture_output=True, text=True, timeout=60,
                              check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "CONSUMERS_PORT" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "taken.db").exists()  # refused before making the schema


def test_an_unresolvable_host_is_a_configuration_error(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("consumers-graphql")
    environment = {**os.environ, "CONSUMERS_DATABASE_URL": f"sqlite:///{tmp_path / 'host.db'}"}
    done = subprocess.run([str(script), "serve", "--host", "no-such-host.invalid"],
                          env=environment, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Cannot listen on no-such-host.invalid:8000" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "host.db").exists()


# Workers that take a while to start: the parent holds the port, and no worker listens yet.
SLOW_WORKERS = ("import sys, time\n"
                "if '--multiprocessing-fork' in sys.argv:  # a spawned worker, not the parent\n"
                "    time.sleep(8)\n")


@pytest.mark.parametrize("workers", ["2", "1"])
def test_a_second_serve_on_the_port_of_one_still_starting_exits_2(
        tmp_path: Path, workers: str) -> None:
    # given `serve --workers 2` that has reserved its port, its workers not yet listening
    (tmp_path / "sitecustomize.py").write_text(SLOW_WORKERS)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    first = Served(f"sqlite+aiosqlite:///{tmp_path / 'first.db'}", tmp_path,
                   env={"CONSUMERS_WORKERS": "2", "PYTHONPATH": path})
    try:
        _until(lambda: "Uvicorn running" in first.output, "the first holds its port", first)
        # when another serve (another database) is started on that port
        script = Path(sys.executable).with_name("consumers-graphql")
        environment = {**os.environ, "CONSUMERS_DATABASE_URL":
                       f"sqlite:///{tmp_path / 'second.db'}"}
        try:
            done = subprocess.run(
                [str(script), "serve", "--workers", workers, "--port", str(first.port)],
                env=environment, capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired as serving:
            raise AssertionError(
                f"the second serve runs beside the first: {serving.stderr!r}") from None
    finally:
        first.stop()
    # then it exits 2 naming the port, before making its schema
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"Cannot listen on 127.0.0.1:{first.port}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "second.db").exists()


def _listening(port: int) -> int:
    """Listening sockets on the port (/proc/net/tcp, state 0A)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            count += 1
    return count


@pytest.mark.parametrize(("sockets", "listening"), [("own", 2), ("shared", 1), (None, 2)])
def test_worker_sockets_own_or_shared(tmp_path: Path, sockets: str | None,
                                      listening: int) -> None:
    env = {"CONSUMERS_WORKERS": "2"}
    if sockets is not None:
        env["CONSUMERS_WORKER_SOCKETS"] = sockets
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'sockets.db'}", tmp_path, env=env)
    try:
        served.wait_until_up()
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        # then: a socket per worker (`own`, the default), or the parent's one. A worker
        # binds its own after "Application startup complete" (uvicorn listens once the
        # lifespan has started): wait for it, then count again once both have answered.
        _until(lambda: _listening(served.port) == listening,
               f"{listening} listening socket(s)", served)
        secret = served.secret()
        if sockets == "shared":  # whichever worker accepts answers
            assert _answering(served, secret, set()) <= _workers(served)
        else:
            assert _answering(served, secret, _workers(served)) == _workers(served)
        assert _listening(served.port) == listening, served.output
    finally:
        assert served.stop() == 0, served.output
    assert "Traceback" not in served.output, served.output


def test_a_stopped_worker_delays_sigterm_by_the_health_ping_only(tmp_path: Path) -> None:
    # given two workers, one of them stopped (it answers nothing, its health ping included)
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'stopped.db'}", tmp_path,
                    env={"CONSUMERS_WORKERS": "2"})
    stopped, frozen = False, 0
    try:
        served.wait_until_up()
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        frozen = min(_workers(served))
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(2)  # the parent's health check is waiting for it
        # when the parent is sent SIGTERM
        sent = time.monotonic()
        served.process.send_signal(signal.SIGTERM)
        try:
            code = served.process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running 40 s after SIGTERM:\n{served.output}") from None
        took = time.monotonic() - sent
        stopped = True
    finally:
        if not stopped:
            served.stop()
        if frozen and not _gone(frozen):
            os.kill(frozen, signal.SIGKILL)
    # then it stops within a compose stop_grace_period (20 s): the 5 s ping, the grace
    # period (10 s), margin; it was 30 s for the ping alone
    assert took < 20, f"{took:.1f} s\n{served.output}"
    assert code == 0, served.output
    served.stop()
    assert _gone(frozen), served.output


@pytest.mark.parametrize("reuse_port", [True, False], ids=["own-sockets", "one-socket"])
def test_workers_bind_over_time_waits_on_their_port(tmp_path: Path, reuse_port: bool) -> None:
    # given a port with a connection in TIME_WAIT on the server's side, of an earlier serve:
    # with workers of their own sockets, or of one socket (--workers 1, or shared)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server's end closes first: it waits in TIME_WAIT
        time.sleep(0.1)
        client.close()
    # when `serve --workers 2` is started on it
    script = Path(sys.executable).with_name("consumers-graphql")
    environment = {**os.environ, "CONSUMERS_DATABASE_URL": f"sqlite:///{tmp_path / 'tw.db'}"}
    process = subprocess.Popen([str(script), "serve", "--workers", "2", "--port", str(port)],
                               env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        # then it serves
        assert process.poll() is None, process.communicate()[0]
        assert httpx.get(f"http://127.0.0.1:{port}/livez", timeout=5).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0, output


# In a worker started once the marker file exists: exit as soon as its live gauges exist.
FAILING_REPLACEMENTS = '''import os, sys, threading, time
from pathlib import Path
MARKER = Path(__file__).with_name("replacements-fail")
if "--multiprocessing-fork" in sys.argv and MARKER.exists():
    # a replacement that never answers uvicorn's readiness ping (as a hung start would),
    # so the restart gives it up whatever the timing; it dies once its gauges exist
    from uvicorn.supervisors import multiprocess
    multiprocess.Process.always_pong = lambda self: None

    def _exit_once_counted() -> None:
        directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        while not list(directory.glob(f"gauge_live*_{os.getpid()}.db")):
            time.sleep(0.05)
        os._exit(1)
    threading.Thread(target=_exit_once_counted, daemon=True).start()
'''


def test_a_replacement_that_fails_during_sighup_leaves_no_live_gauges(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(FAILING_REPLACEMENTS)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'failing.db'}", tmp_path,
                    env={"CONSUMERS_WORKERS": "2", "PYTHONPATH": path})
    try:
        served.wait_until_up()
        _until(lambda: served.output.count("Application startup complete") == 2,
               "both workers started", served)
        (directory,) = Path(tempfile.gettempdir()).glob(
            f"consumers-metrics-{served.process.pid}-*")
        workers = _workers(served)
        # when SIGHUP starts a replacement that dies once its gauges exist
        (tmp_path / "replacements-fail").touch()
        served.process.send_signal(signal.SIGHUP)
        _until(lambda: "aborting the restart" in served.output, "the restart given up", served,
               seconds=90)
        # then the old workers serve on, and only their live gauges are left
        assert _workers(served) == workers, served.output
        live = {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("gauge_live*_*.db")}
        assert live == workers, (live, workers, served.output)
    finally:
        assert served.stop() == 0, served.output
