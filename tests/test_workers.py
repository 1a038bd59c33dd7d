"""`serve --workers N` as a real process tree: one port, every worker answering, the schema
and the first key made once by the parent, a killed worker replaced, a clean stop.

Which worker answers a request is the kernel's choice; to see that each one serves, the
test stops (SIGSTOP) every worker but one for the moment of a request on a new connection:
only that one can accept it."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import TEST_DATABASE_URL, bearer
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


@contextmanager
def _only(served: Served, worker: int) -> Iterator[None]:
    """Every other worker stopped (SIGSTOP), well under the parent's 5 s health check."""
    others = _workers(served) - {worker}
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def _count(served: Served, secret: str) -> int:
    response = served.post("/graphql", json=COUNT, headers=bearer(secret))
    assert response.status_code == 200, response.text
    total: int = response.json()["data"]["consumers"]["totalCount"]
    return total


def _until(condition: object, what: str, served: Served, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}:\n{served.output}")


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
        for worker in first:
            with _only(served, worker):
                assert _count(served, secret) == 0
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
        with _only(served, replacement):
            assert _count(served, secret) == 0
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
        for worker in _workers(served):
            with _only(served, worker):
                assert _count(served, secret) == 0
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
