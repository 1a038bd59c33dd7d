"""Configuration errors, through the console script: one or two lines naming the variable and
what to do, exit 2, no traceback, no secret; a typo'd variable is a warning; --version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from sqlalchemy import make_url

import consumers_graphql
from consumers_graphql.settings import Settings
from tests.conftest import TEST_DATABASE_URL, new_database
from tests.processes import free_port

SCRIPT = Path(sys.executable).with_name("consumers-graphql")
PASSWORD = "hunter2-not-to-be-shown"
PEPPER = "pepper-not-to-be-shown"
VERSION_LINE = f"consumers-graphql {version('consumers-graphql')}\n"


def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # no CONSUMERS_* setting of the test run's, but how its database is reached (CI's third
    # run goes through pgbouncer)
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("CONSUMERS_") or k == "CONSUMERS_DATABASE_POOLER"}
    environment |= {"CONSUMERS_KEY_PEPPER": PEPPER, **env}
    return subprocess.run([str(SCRIPT), *args], env=environment, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def assert_refused(done: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit 2, the names in the message, one or two lines, nothing secret, no traceback."""
    message = done.stdout + done.stderr
    assert done.returncode == 2, message
    for name in names:
        assert name in done.stderr, message
    assert 1 <= len(done.stderr.strip().splitlines()) <= 2, message
    assert "Traceback" not in message and PASSWORD not in message and PEPPER not in message
    return done.stderr


COMMANDS = [("serve",), ("keys", "list"), ("migrate",), ("seed", "--consumers", "1")]
BAD_SETTINGS = [
    ({"CONSUMERS_PORT": "abc"}, "CONSUMERS_PORT='abc'"),
    ({"CONSUMERS_WORKERS": "0"}, "CONSUMERS_WORKERS='0'"),
    ({"CONSUMERS_POOL_SIZE": "many"}, "CONSUMERS_POOL_SIZE"),
    ({"CONSUMERS_DATABASE_URL": f"mysql://app:{PASSWORD}@db.example/consumers"},
     "CONSUMERS_DATABASE_URL"),
    ({"CONSUMERS_DATABASE_URL": f"{PASSWORD}"}, "CONSUMERS_DATABASE_URL"),
    ({"CONSUMERS_DATABASE_URL": f"app:{PASSWORD}@db://x"}, "CONSUMERS_DATABASE_URL"),
    ({"CONSUMERS_DATABASE_URL": f"postgres://app:{PASSWORD}@db:port/consumers"},
     "CONSUMERS_DATABASE_URL"),
    ({"CONSUMERS_LOG_LEVEL": "verbose"}, "CONSUMERS_LOG_LEVEL='verbose'"),
    # the documented bound on a revoked key's life must stay a bound
    ({"CONSUMERS_KEY_CACHE_SECONDS": "inf"}, "CONSUMERS_KEY_CACHE_SECONDS='inf'"),
    ({"CONSUMERS_KEY_CACHE_SECONDS": "3600"}, "CONSUMERS_KEY_CACHE_SECONDS='3600'"),
    # idempotency keys are kept for a while, and not for ever
    ({"CONSUMERS_IDEMPOTENCY_KEY_HOURS": "0"}, "CONSUMERS_IDEMPOTENCY_KEY_HOURS='0'"),
    ({"CONSUMERS_IDEMPOTENCY_KEY_HOURS": "nan"}, "CONSUMERS_IDEMPOTENCY_KEY_HOURS='nan'"),
    ({"CONSUMERS_IDEMPOTENCY_KEY_HOURS": "1000"}, "CONSUMERS_IDEMPOTENCY_KEY_HOURS='1000'"),
    # change events too
    ({"CONSUMERS_EVENT_RETENTION_DAYS": "0"}, "CONSUMERS_EVENT_RETENTION_DAYS='0'"),
    ({"CONSUMERS_EVENT_RETENTION_DAYS": "5000"}, "CONSUMERS_EVENT_RETENTION_DAYS='5000'"),
    # the LISTEN connection is a PostgreSQL server's, for a PostgreSQL database
    ({"CONSUMERS_EVENTS_LISTEN_URL": "postgres://app@db/consumers"},
     "CONSUMERS_EVENTS_LISTEN_URL needs PostgreSQL"),
    ({"CONSUMERS_DATABASE_URL": "postgres://app@db/consumers",
      "CONSUMERS_EVENTS_LISTEN_URL": "sqlite:///events.db"},
     "CONSUMERS_EVENTS_LISTEN_URL needs PostgreSQL"),

    ({"CONSUMERS_EVENTS_POLL_INTERVAL_MS": "5"}, "CONSUMERS_EVENTS_POLL_INTERVAL_MS='5'"),
    ({"CONSUMERS_EVENTS_POLL_INTERVAL_MS": "600000"},
     "CONSUMERS_EVENTS_POLL_INTERVAL_MS='600000'"),
    ({"CONSUMERS_SUBSCRIPTION_BUFFER": "0"}, "CONSUMERS_SUBSCRIPTION_BUFFER='0'"),
    ({"CONSUMERS_WEBSOCKET_PING_INTERVAL_S": "0"}, "CONSUMERS_WEBSOCKET_PING_INTERVAL_S='0'"),
]


# Every bad setting through one command, the commands in turn (each meets several settings):
# they all validate the settings on one path, and the whole cross product was 84 processes.
@pytest.mark.parametrize(("env", "variable", "command"), [
    (env, variable, COMMANDS[index % len(COMMANDS)])
    for index, (env, variable) in enumerate(BAD_SETTINGS)])
def test_a_bad_setting_names_its_variable_for_every_command(
    env: dict[str, str], variable: str, command: tuple[str, ...], tmp_path: Path
) -> None:
    message = assert_refused(run(*command, env=env, cwd=tmp_path), variable)
    assert "Configuration error" in message


def test_help_and_version_still_answer_with_a_bad_setting(tmp_path: Path) -> None:
    bad = {"CONSUMERS_PORT": "abc"}
    done = run("--version", env=bad, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, VERSION_LINE)
    done = run("serve", "--help", env=bad, cwd=tmp_path)
    assert done.returncode == 0 and "--workers" in done.stdout, done.stderr


def test_version(tmp_path: Path) -> None:
    done = run("--version", env={}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == VERSION_LINE == f"consumers-graphql {consumers_graphql.__version__}\n"


def test_an_unknown_variable_is_a_warning_with_the_closest_name(tmp_path: Path) -> None:
    done = run("export-schema", "-o", str(tmp_path / "schema.graphql"), cwd=tmp_path, env={
        "CONSUMERS_DATABSE_URL": f"postgres://app:{PASSWORD}@db/consumers",  # a typo
        "CONSUMERS_WORKER": "4",
        "CONSUMERS_TEST_ANYTHING": "1",  # the tests' own: not a setting, not warned about
        "CONSUMERS_KEY": "sk_live_x",  # the README's client-side variables, likewise
    })
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "Warning: CONSUMERS_DATABSE_URL is not a setting of consumers-graphql, ignored; "
        "did you mean CONSUMERS_DATABASE_URL?",
        "Warning: CONSUMERS_WORKER is not a setting of consumers-graphql, ignored; "
        "did you mean CONSUMERS_WORKERS?",
    ]
    assert PASSWORD not in done.stderr


@pytest.mark.parametrize(("written", "normalised"), [
    ("postgres://app:pw@db:5432/consumers", "postgresql+asyncpg://app:pw@db:5432/consumers"),
    ("postgresql://app@db/consumers", "postgresql+asyncpg://app@db/consumers"),
    ("postgresql+asyncpg://app@db/consumers", "postgresql+asyncpg://app@db/consumers"),
    ("sqlite:///./consumers.db", "sqlite+aiosqlite:///./consumers.db"),
    ("sqlite+aiosqlite:////var/x.db", "sqlite+aiosqlite:////var/x.db"),
    # libpq's sslmode, as hosts hand URLs out, is asyncpg's ssl (the same modes)
    ("postgres://app@db/consumers?sslmode=require&application_name=x",
     "postgresql+asyncpg://app@db/consumers?application_name=x&ssl=require"),
])
def test_a_url_without_the_async_driver_gets_it(written: str, normalised: str) -> None:
    assert Settings(database_url=written).database_url == normalised


def test_a_sqlite_url_without_the_driver_works(tmp_path: Path) -> None:
    done = run("keys", "create", "--name", "ci", cwd=tmp_path,
               env={"CONSUMERS_DATABASE_URL": f"sqlite:///{tmp_path / 'plain.db'}"})
    assert done.returncode == 0, done.stderr
    # nothing but the note that the new file got its schema: no warning, no traceback
    assert re.fullmatch(r"Created the database schema \(revision \w+\)\.\n", done.stderr), \
        done.stderr


# -- a database that cannot be used ------------------------------------------------------

def _unreachable_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """URL, and what the message must say."""
    refused = f"postgresql://app:{PASSWORD}@127.0.0.1:{free_port()}/consumers"
    return {
        "refused": (refused, "connection refused"),
        "no such host": (f"postgres://app:{PASSWORD}@no-such-host.invalid/consumers",
                         "does not resolve"),
        "missing directory": (f"sqlite:///{tmp_path / 'missing' / 'consumers.db'}",
                              "its directory does not exist"),
    }


@pytest.mark.parametrize("case", ["refused", "no such host", "missing directory"])
@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreachable_database_is_two_lines_and_exit_2(
    case: str, command: tuple[str, ...], tmp_path: Path
) -> None:
    url, reason = _unreachable_cases(tmp_path)[case]
    message = assert_refused(run(*command, env={"CONSUMERS_DATABASE_URL": url}, cwd=tmp_path),
                             "CONSUMERS_DATABASE_URL", reason)
    assert len(message.strip().splitlines()) == 2, message


def test_a_sqlite_file_that_may_only_be_read(tmp_path: Path) -> None:
    path = tmp_path / "read-only.db"
    assert run("migrate", env={"CONSUMERS_DATABASE_URL": f"sqlite:///{path}"},
               cwd=tmp_path).returncode == 0
    # (as root, file permissions stop nothing: SQLite is told to open it read-only instead)
    url = f"sqlite:///file:{path}?mode=ro&uri=true"
    done = run("keys", "create", "--name", "x", env={"CONSUMERS_DATABASE_URL": url},
               cwd=tmp_path)
    assert "readonly database" in assert_refused(done, "CONSUMERS_DATABASE_URL")


@pytest.mark.database
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="needs the PostgreSQL server of the run")
@pytest.mark.parametrize(("part", "reason"), [
    ("database", 'database "no_such_database_here" does not exist'),
    ("username", 'role "no_such_role_here" does not exist'),
])
def test_postgresql_refusing_the_database_or_the_user(part: str, reason: str,
                                                      tmp_path: Path) -> None:
    assert TEST_DATABASE_URL is not None
    server = make_url(TEST_DATABASE_URL)
    wrong = server.set(**{part: f"no_such_{'database' if part == 'database' else 'role'}_here",
                          "password": PASSWORD})
    done = run("serve", env={"CONSUMERS_DATABASE_URL": wrong.render_as_string(False)},
               cwd=tmp_path)
    message = assert_refused(done, "CONSUMERS_DATABASE_URL")
    # behind pgbouncer (CI's third run) the pooler checks the user itself, in its own words
    if not (os.environ.get("CONSUMERS_DATABASE_POOLER") and part == "username"):
        assert reason in message


def test_a_schema_behind_the_code_is_exit_2_and_says_to_migrate(tmp_path: Path) -> None:
    env = {"CONSUMERS_DATABASE_URL": f"sqlite:///{tmp_path / 'old.db'}"}
    assert run("migrate", "--revision", "0002", env=env, cwd=tmp_path).returncode == 0
    for command in (("serve",), ("keys", "list")):
        message = assert_refused(run(*command, env=env, cwd=tmp_path), "revision 0002")
        assert "run `consumers-graphql migrate` first" in message


def test_log_levels_are_taken_in_any_case() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"  # type: ignore[arg-type]


@pytest.mark.database
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="needs the PostgreSQL server of the run")
def test_a_url_parameter_the_driver_does_not_take_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    assert TEST_DATABASE_URL
    url = make_url(TEST_DATABASE_URL).update_query_dict({"connect_timeout": "5"})
    done = run("keys", "list", cwd=tmp_path, env={
        "CONSUMERS_DATABASE_URL": url.render_as_string(hide_password=False)})
    assert "'connect_timeout'" in assert_refused(done, "CONSUMERS_DATABASE_URL")


@pytest.mark.database
@pytest.mark.skipif(not TEST_DATABASE_URL, reason="needs the PostgreSQL server of the run")
async def test_sslmode_in_the_url_works(tmp_path: Path) -> None:
    # a database of its own: `keys list` migrates the one it is given, and the server's
    # shared database may hold anything
    async with new_database("consumers_sslmode") as fresh:
        url = make_url(fresh).update_query_dict({"sslmode": "disable"})
        done = run("keys", "list", cwd=tmp_path, env={
            "CONSUMERS_DATABASE_URL": url.render_as_string(hide_password=False)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No API keys.")
