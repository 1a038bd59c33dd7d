"""`consumers-graphql serve` as it runs in production: JSON log lines with no personal data
and no secret, /metrics summed from the per-process files, /metrics on a port of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import bearer
from tests.processes import SECRET, Served, free_port

# Each brings its own SQLite file: they run once, in the SQLite run.
pytestmark = pytest.mark.skipif(bool(os.environ.get("CONSUMERS_TEST_DATABASE_URL")),
                                reason="brings its own database: runs once, in the SQLite run")

EMAIL = "jo.serve-logs@example.com"
PHONE = "+14155550177"
NAME = "Jolene Servelogs"
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { id } userErrors { message } }
}"""


def _cli(database_url: str, cwd: Path, *args: str) -> str:
    script = Path(sys.executable).with_name("consumers-graphql")
    result = subprocess.run(
        [str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "CONSUMERS_DATABASE_URL": database_url,
             "CONSUMERS_KEY_PEPPER": "serve-pepper"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _prepared(tmp_path: Path) -> tuple[str, str]:
    """A migrated database with a key (so serve prints no banner): its URL and secret."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'served.db'}"
    _cli(url, tmp_path, "migrate")
    found = SECRET.search(_cli(url, tmp_path, "keys", "create", "--name", "logs"))
    assert found is not None
    return url, found.group()


def _count(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and sample.labels == labels)


def _scraped_once_counted(scrape: Callable[[], httpx.Response],
                          expected: list[tuple[str, dict[str, str], float]]) -> httpx.Response:
    """Scrapes until every expected count is there (a request counts once its work is over:
    the key's lastUsedAt write after its answer may still be running), for at most 30 s;
    the last scrape."""
    deadline = time.monotonic() + 30
    while True:
        response = scrape()
        if response.status_code == 200 and all(
                _count(response.text, name, **labels) == value
                for name, labels, value in expected):
            return response
        if time.monotonic() > deadline:
            return response  # the caller's asserts show what is missing
        time.sleep(0.1)


def test_json_logs_one_object_a_line_with_the_access_fields_and_no_personal_data(
    tmp_path: Path,
) -> None:
    url, secret = _prepared(tmp_path)
    served = Served(url, tmp_path, env={"CONSUMERS_LOG_FORMAT": "json",
                                        "CONSUMERS_LOG_LEVEL": "info"})
    try:
        served.wait_until_up()
        key = bearer(secret)
        with served.client(timeout=10) as client:
            created = client.post(
                f"/graphql?api_key={quote(secret)}&email={quote(EMAIL)}", headers=key,
                json={"query": CREATE, "operationName": "Create", "variables": {"input": {
                    "email": EMAIL, "phone": PHONE, "fullName": NAME,
                    "metadata": {"note": f"{NAME} {EMAIL}"}}}})
            assert created.status_code == 200, created.text
            assert created.json()["data"]["consumerCreate"]["userErrors"] == []
            consumer_id = created.json()["data"]["consumerCreate"]["consumer"]["id"]
            listed = client.get(f"/api/v1/consumers?email={quote(EMAIL)}&key={secret}",
                                headers=key)
            assert listed.status_code == 200
            one = client.get(f"/api/v1/consumers/{consumer_id}", headers=key)
            assert one.json()["email"] == EMAIL
            missing = client.get(f"/nowhere/{quote(EMAIL)}/{PHONE}/{secret}")
            assert missing.status_code == 404
            # (a last character changed: a random secret ends in "x" one time in dozens)
            wrong = secret[:-1] + ("y" if secret.endswith("x") else "x")
            unauthenticated = client.get("/api/v1/consumers", headers=bearer(wrong))
            assert unauthenticated.status_code == 401
            metrics = _scraped_once_counted(lambda: client.get("/metrics"), [
                ("consumers_http_requests_total",
                 {"face": "graphql", "operation_type": "mutation", "status": "200"}, 1),
                ("consumers_http_requests_total",
                 {"face": "rest", "operation_type": "none", "status": "401"}, 1),
                ("consumers_http_requests_in_flight", {"face": "other"}, 1),
            ])
    finally:
        assert served.stop() == 0, served.output

    # then every line of the output is one JSON object
    lines = [json.loads(line) for line in served.lines if line.strip()]
    assert lines and all(isinstance(line, dict) for line in lines), served.output
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # its startup too
    # (logged as each request ends: the mutation's lastUsedAt write follows its answer)
    by_id = {line["request_id"]: line for line in lines
             if line["logger"] == "consumers_graphql.access"}
    responses = [created, listed, one, missing, unauthenticated, metrics]
    assert len(by_id) >= len(responses)
    access = [by_id[response.headers["x-request-id"]] for response in responses]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/graphql", 200),
        ("GET", "/api/v1/consumers", 200),
        ("GET", "/api/v1/consumers/{consumer_id}", 200),
        ("GET", "/{unmatched}", 404),
        ("GET", "/api/v1/consumers", 401),
        ("GET", "/metrics", 200),
    ]
    assert set(by_id) - {r.headers["x-request-id"] for r in responses} <= {
        line["request_id"] for line in by_id.values() if line["path"] == "/metrics"}
    mutation = access[0]
    assert mutation["request_id"] == created.headers["x-request-id"]
    assert mutation["key_id"].startswith("key_") and access[4]["key_id"] is None
    assert (mutation["operation_type"], mutation["operation_name"]) == ("mutation", "Create")
    assert mutation["statements"] >= 2 and mutation["duration_ms"] > 0
    # (the list's own: the key, verified by the mutation a moment ago, is not looked up again)
    assert access[1]["face"] == "rest" and access[1]["statements"] >= 1
    # and nothing personal or secret, in any encoding
    output = unquote(unquote(unquote(served.output)))
    for leak in (EMAIL, EMAIL.split("@")[0], PHONE, PHONE[2:], NAME, NAME.split()[1],
                 secret, secret[12:], secret[-10:]):
        assert leak not in output, leak
    # and /metrics, summed from the per-process files, saw the requests before it
    assert metrics.status_code == 200
    assert _count(metrics.text, "consumers_http_requests_total", face="graphql",
                  operation_type="mutation", status="200") == 1
    assert _count(metrics.text, "consumers_http_requests_total", face="rest",
                  operation_type="none", status="401") == 1
    assert _count(metrics.text, "consumers_http_requests_in_flight", face="other") == 1


def test_metrics_on_their_own_port_and_not_on_the_app(tmp_path: Path) -> None:
    url, secret = _prepared(tmp_path)
    port = free_port()
    served = Served(url, tmp_path, env={"CONSUMERS_METRICS_PORT": str(port)})
    try:
        served.wait_until_up()
        response = served.post("/graphql", json={"query": "{ consumers(first: 1) { totalCount } }"},
                               headers=bearer(secret))
        assert response.status_code == 200, response.text
        assert served.get("/metrics").status_code == 404
        metrics = _scraped_once_counted(
            lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10), [
                ("consumers_http_requests_total",
                 {"face": "graphql", "operation_type": "query", "status": "200"}, 1),
                ("consumers_http_requests_total",
                 {"face": "other", "operation_type": "none", "status": "404"}, 1),
                ("consumers_http_request_sql_statements_count", {"face": "graphql"}, 1),
            ])
    finally:
        assert served.stop() == 0, served.output
    assert metrics.status_code == 200
    assert _count(metrics.text, "consumers_http_requests_total", face="graphql",
                  operation_type="query", status="200") == 1
    assert _count(metrics.text, "consumers_http_requests_total", face="other",
                  operation_type="none", status="404") == 1
    assert _count(metrics.text, "consumers_http_request_sql_statements_count",
                  face="graphql") == 1


def test_a_metrics_port_in_use_is_a_configuration_error(tmp_path: Path) -> None:
    import socket

    url, _secret = _prepared(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        served = Served(url, tmp_path, env={"CONSUMERS_METRICS_PORT": str(port)})
        code = served.stop() if served.process.wait(timeout=30) is not None else None
    assert code == 2, served.output
    assert "CONSUMERS_METRICS_PORT" in served.output and "Traceback" not in served.output


MULTIPROCESS = '''
import os, sys
from consumers_graphql.settings import Settings
from consumers_graphql.web import metrics

metrics.setup_parent(Settings())
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
worker = metrics.Metrics()
worker.in_flight.labels("graphql").inc()
worker.refusals.labels("MAX_COST_EXCEEDED").inc()
print(worker.render().decode())
print("----")
metrics.child_exited(os.getpid())
print(worker.render().decode())
print("----")
print(directory)
'''


def test_a_worker_gone_no_longer_counts_in_the_gauges_but_its_counts_stay() -> None:
    """setup_parent's directory, and child_exited, as the process manager of `serve
    --workers` uses them (one process here: its files are a worker's)."""
    import tempfile

    # given the directory a killed `serve` left behind (its pid no longer runs)
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = Path(tempfile.mkdtemp(prefix=f"consumers-metrics-{gone.pid}-"))
    (orphan / "counter_1.db").write_bytes(b"")
    result = subprocess.run([sys.executable, "-c", MULTIPROCESS], capture_output=True,
                            text=True, timeout=60, check=False,
                            env={k: v for k, v in os.environ.items()
                                 if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert result.returncode == 0, result.stderr
    alive, gone, directory = result.stdout.split("----\n")
    assert _count(alive, "consumers_http_requests_in_flight", face="graphql") == 1
    assert _count(gone, "consumers_http_requests_in_flight", face="graphql") == 0
    for text in (alive, gone):
        assert _count(text, "consumers_refusals_total", code="MAX_COST_EXCEEDED") == 1
    assert not Path(directory.strip()).exists()  # removed at exit
    assert not orphan.exists()  # and the dead one's at start


FORKED = '''
import os, sys
from consumers_graphql.settings import Settings
from consumers_graphql.web import metrics

metrics.setup_parent(Settings())
worker = metrics.Metrics()
worker.in_flight.labels("graphql").inc()
worker.refusals.labels("MAX_COST_EXCEEDED").inc()
child = os.fork()
if child == 0:
    worker.in_flight.labels("graphql").inc()
    worker.refusals.labels("MAX_COST_EXCEEDED").inc()
    os._exit(0)
os.waitpid(child, 0)
print(worker.render().decode())
print("----")
metrics.child_exited(child)
print(worker.render().decode())
'''


def test_a_forked_child_counts_in_files_of_its_own() -> None:
    """The values in files take the process's id from memory (no system call a change),
    renewed in a forked child: the child's numbers are its own, gone from the gauges when
    it is."""
    result = subprocess.run([sys.executable, "-c", FORKED], capture_output=True,
                            text=True, timeout=60, check=False,
                            env={k: v for k, v in os.environ.items()
                                 if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert result.returncode == 0, result.stderr
    both, parent = result.stdout.split("----\n")
    assert _count(both, "consumers_http_requests_in_flight", face="graphql") == 2
    assert _count(parent, "consumers_http_requests_in_flight", face="graphql") == 1
    for text in (both, parent):
        assert _count(text, "consumers_refusals_total", code="MAX_COST_EXCEEDED") == 2


def test_setup_parent_refuses_to_run_after_prometheus_client_was_imported() -> None:
    script = ("import prometheus_client\n"
              "from consumers_graphql.settings import Settings\n"
              "from consumers_graphql.web import metrics\n"
              "metrics.setup_parent(Settings())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False,
                            env={k: v for k, v in os.environ.items()
                                 if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert result.returncode == 1
    assert "MetricsSetupError: prometheus_client was imported before" in result.stderr


def test_a_metrics_port_equal_to_the_apps_is_a_configuration_error(tmp_path: Path) -> None:
    url, _secret = _prepared(tmp_path)
    port = free_port()
    script = Path(sys.executable).with_name("consumers-graphql")
    result = subprocess.run(
        [str(script), "serve", "--port", str(port)], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, check=False,
        env={**os.environ, "CONSUMERS_DATABASE_URL": url, "CONSUMERS_KEY_PEPPER": "serve-pepper",
             "CONSUMERS_METRICS_PORT": str(port)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "CONSUMERS_METRICS_PORT" in result.stderr and "CONSUMERS_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_directory_is_an_orphan_when_its_lock_is_free_whatever_its_pid(
    tmp_path: Path,
) -> None:
    """In a container `serve` is PID 1 on every start: the pid in a directory's name cannot
    tell a live `serve`'s from a killed one's; its lock can."""
    import fcntl

    url, _secret = _prepared(tmp_path)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    # given a killed serve's directory whose pid runs again (this process's), and a live
    # serve's directory (its lock held, here by this process)
    orphan = temporary / f"consumers-metrics-{os.getpid()}-killed"
    live = temporary / "consumers-metrics-1-running"
    for directory in (orphan, live):
        directory.mkdir()
        (directory / "serve.lock").touch()
        (directory / "counter_1.db").write_bytes(b"")
    with open(live / "serve.lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        served = Served(url, tmp_path, env={"TMPDIR": str(temporary)})
        try:
            served.wait_until_up()
            # then serve removed the orphan, kept the live one, and holds its own lock
            assert not orphan.exists()
            assert live.exists()
            [own] = [path for path in temporary.glob(f"consumers-metrics-{served.process.pid}-*")]
            with open(own / "serve.lock", "rb") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    taken = True
                except BlockingIOError:
                    taken = False
            assert not taken
        finally:
            assert served.stop() == 0, served.output
    assert not own.exists()
