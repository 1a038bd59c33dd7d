"""CONSUMERS_TEST_DATABASE_ONLY (tests/conftest.py): a PostgreSQL run with it leaves out the
tests that touch no database, and those only; without a PostgreSQL URL it changes nothing; and
a test that reaches the run's database without a database fixture or the `database` marker is
refused, whatever the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import project_root

# Collection connects to nothing: a port nothing listens on proves it.
POSTGRESQL = "postgresql+asyncpg://postgres@127.0.0.1:9/never_reached"
FILES = ("tests/test_ids.py", "tests/test_configuration.py", "tests/test_queries.py")


def collect(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`pytest --collect-only -q` in a subprocess, with `env` as the run's CONSUMERS_TEST_*."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMERS_TEST_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
        env={**environment, "PYTHONPATH": str(project_root()), **env})


def collected(done: subprocess.CompletedProcess[str]) -> set[str]:
    assert done.returncode == 0, done.stdout + done.stderr
    return {line for line in done.stdout.splitlines() if "::" in line}


def test_the_switch_leaves_out_the_database_free_tests_of_a_postgresql_run_only() -> None:
    root = project_root()
    # without a PostgreSQL URL (the SQLite run), it leaves out nothing
    done = collect(*FILES, cwd=root, env={"CONSUMERS_TEST_DATABASE_ONLY": "1"})
    everything = collected(done)
    assert "deselected" not in done.stdout, done.stdout
    # with one, it leaves out the tests that touch no database, and says so
    done = collect(*FILES, cwd=root, env={"CONSUMERS_TEST_DATABASE_URL": POSTGRESQL,
                                         "CONSUMERS_TEST_DATABASE_ONLY": "1"})
    kept = collected(done)
    assert kept < everything
    assert f"({len(everything - kept)} deselected)" in done.stdout, done.stdout
    # kept: a test of the app (its fixtures), and one that makes a database of its own on
    # the run's server (marked)
    assert "tests/test_queries.py::test_consumer_fields_and_timestamps[compiled]" in kept
    assert "tests/test_configuration.py::test_sslmode_in_the_url_works" in kept
    # left out: pure code (every test of ids), a setting refused before any connection
    assert any(test.startswith("tests/test_ids.py::") for test in everything)
    assert not any(test.startswith("tests/test_ids.py::") for test in kept)
    assert "tests/test_configuration.py::test_version" in everything - kept


UNMARKED = '''
import pytest
from tests.conftest import TEST_DATABASE_URL, new_database

def database_of_its_own():
    return new_database("x")

@pytest.fixture
def server_url():
    return TEST_DATABASE_URL

def test_reads_the_url():
    assert TEST_DATABASE_URL

def test_through_a_helper():
    database_of_its_own()

def test_through_a_fixture(server_url):
    assert server_url

def test_touches_nothing():
    pass
'''


def test_a_test_reaching_the_database_without_a_fixture_or_the_marker_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = session\n"
        "markers =\n    database: the run's\n")
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    module = tmp_path / "test_reaching.py"
    module.write_text(UNMARKED)
    # refused in a SQLite run too, naming each test, directly or through a helper or fixture
    done = collect(cwd=tmp_path, env={})
    assert done.returncode == 4, done.stdout + done.stderr
    refused = done.stderr
    assert "mark them `@pytest.mark.database`" in refused, refused
    for test in ("test_reads_the_url", "test_through_a_helper", "test_through_a_fixture"):
        assert f"test_reaching.py::{test}\n" in refused, refused
    assert "test_touches_nothing" not in refused
    # marked, they are kept in a PostgreSQL run with the switch; the other one is left out
    module.write_text(UNMARKED.replace("\ndef test_", "\n@pytest.mark.database\ndef test_")
                      .replace("@pytest.mark.database\ndef test_touches", "def test_touches"))
    kept = collected(collect(cwd=tmp_path, env={"CONSUMERS_TEST_DATABASE_URL": POSTGRESQL,
                                                "CONSUMERS_TEST_DATABASE_ONLY": "1"}))
    assert kept == {f"test_reaching.py::{test}" for test in (
        "test_reads_the_url", "test_through_a_helper", "test_through_a_fixture")}
