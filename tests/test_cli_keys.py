"""`consumers-graphql keys …` through the CLI entry point against the test database, and the
first `serve` on an empty database printing one key (and a second start none)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from consumers_graphql.cli import main as cli
from consumers_graphql.store.models import ApiKey
from tests import processes
from tests.conftest import bearer

SECRET = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{32,}")
QUERY = "{ consumers(first: 1) { totalCount } }"
MUTATION = 'mutation { consumerCreate(input: {email: "cli@example.com"}) { consumer { id } } }'


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # The CLI runs its own event loop, so it gets a thread of its own.
    capsys.readouterr()
    code = await asyncio.to_thread(cli, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.usefixtures("execution_path")
async def test_create_prints_a_working_secret_once_and_stores_only_its_hash(
    cli_env: None, capsys: pytest.CaptureFixture[str], app: FastAPI, client: httpx.AsyncClient
) -> None:
    # when
    code, out, _ = await run_cli(capsys, "keys", "create", "--name", "Storefront BFF")
    # then the secret is printed, and it authenticates against the API
    assert code == 0
    secrets_ = set(SECRET.findall(out))
    assert len(secrets_) == 1
    secret = secrets_.pop()
    assert secret.startswith("sk_live_") and len(secret) >= len("sk_live_") + 32
    response = await client.post("/graphql", json={"query": QUERY}, headers=bearer(secret))
    assert response.status_code == 200, response.text
    # and the stored row holds no secret, only a prefix and a hash
    async with app.state.database.read_engine.connect() as conn:
        row = (await conn.execute(select(ApiKey.__table__))).one()
    assert row.name == "Storefront BFF" and row.scopes == "read write"
    assert row.prefix == secret[:12] and row.secret_hash != secret
    assert all(secret not in str(value) for value in row)
    assert row.id in out


@pytest.mark.usefixtures("execution_path")
async def test_read_only_and_test_flags(
    cli_env: None, capsys: pytest.CaptureFixture[str], app: FastAPI, client: httpx.AsyncClient
) -> None:
    code, out, _ = await run_cli(capsys, "keys", "create", "--name", "reports", "--read-only",
                                 "--test")
    assert code == 0
    [secret] = set(SECRET.findall(out))
    assert secret.startswith("sk_test_")
    query = await client.post("/graphql", json={"query": QUERY}, headers=bearer(secret))
    assert query.status_code == 200 and "errors" not in query.json()
    mutation = await client.post("/graphql", json={"query": MUTATION}, headers=bearer(secret))
    assert [e["extensions"]["code"] for e in mutation.json()["errors"]] == ["FORBIDDEN"]


@pytest.mark.usefixtures("execution_path")
async def test_secret_only_prints_just_the_secret_for_scripts(
    cli_env: None, capsys: pytest.CaptureFixture[str], client: httpx.AsyncClient
) -> None:
    # when a script captures the output (KEY=$(consumers-graphql keys create ... --secret-only))
    code, out, err = await run_cli(capsys, "keys", "create", "--name", "script", "--secret-only")
    # then stdout is the secret and a line break, nothing else, and it authenticates
    assert code == 0 and err == ""
    secret = out.removesuffix("\n")
    assert SECRET.fullmatch(secret), out
    response = await client.post("/graphql", json={"query": QUERY}, headers=bearer(secret))
    assert response.status_code == 200 and "errors" not in response.json(), response.text


@pytest.mark.usefixtures("execution_path")
async def test_list_shows_every_key_but_never_a_secret(
    cli_env: None, capsys: pytest.CaptureFixture[str], app: FastAPI, client: httpx.AsyncClient
) -> None:
    # given no keys
    code, out, _ = await run_cli(capsys, "keys", "list")
    assert code == 0 and "No API keys" in out
    # and then two, one of them used
    _, first, _ = await run_cli(capsys, "keys", "create", "--name", "used")
    _, second, _ = await run_cli(capsys, "keys", "create", "--name", "idle", "--read-only")
    used = SECRET.search(first)
    assert used is not None
    await client.post("/graphql", json={"query": QUERY}, headers=bearer(used.group()))
    # when
    code, out, _ = await run_cli(capsys, "keys", "list")
    # then
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["ID", "NAME", "PREFIX", "SCOPES", "CREATED", "LAST", "USED",
                                "REVOKED", "RATE", "LIMIT"]
    keys = {key.name: key for key in await app.state.keys.list_keys()}
    used_line = next(line for line in lines if keys["used"].id in line)
    idle_line = next(line for line in lines if keys["idle"].id in line)
    assert keys["used"].prefix in used_line and "read write" in used_line
    assert keys["used"].last_used_at is not None
    assert keys["used"].last_used_at.strftime("%Y-%m-%d %H:%M:%SZ") in used_line
    assert re.search(r"\bread\b\s+\S+ \S+\s+never\s+-\s+default$", idle_line), idle_line
    assert SECRET.search(out) is None  # prefixes are 4 characters, never a secret
    for created in (first, second):
        match = SECRET.search(created)
        assert match is not None and match.group() not in out


async def test_revoke_stops_the_key_and_explains_an_unknown_id(
    cli_env: None, capsys: pytest.CaptureFixture[str], app: FastAPI, client: httpx.AsyncClient
) -> None:
    _, out, _ = await run_cli(capsys, "keys", "create", "--name", "leaked")
    match = SECRET.search(out)
    assert match is not None
    secret = match.group()
    [key] = await app.state.keys.list_keys()
    # when
    code, out, _ = await run_cli(capsys, "keys", "revoke", key.id)
    # then
    assert code == 0 and "Revoked" in out
    response = await client.post("/graphql", json={"query": QUERY}, headers=bearer(secret))
    assert response.status_code == 401
    _, listing, _ = await run_cli(capsys, "keys", "list")
    [line] = [line for line in listing.splitlines() if key.id in line]
    assert not line.rstrip().endswith(" -")  # the revocation time is shown
    # revoking again is harmless
    code, out, _ = await run_cli(capsys, "keys", "revoke", key.id)
    assert code == 0 and "already revoked" in out
    # an unknown id is an error, on stderr, with a non-zero exit
    code, out, err = await run_cli(capsys, "keys", "revoke", "key_01JD0000000000000000000000")
    assert code == 1 and out == ""
    assert "No API key has the id 'key_01JD0000000000000000000000'" in err


async def test_create_refuses_an_empty_name(
    cli_env: None, capsys: pytest.CaptureFixture[str], app: FastAPI
) -> None:
    code, out, err = await run_cli(capsys, "keys", "create", "--name", "  ")
    assert code == 1 and SECRET.search(out) is None and "name" in err
    assert await app.state.keys.list_keys() == []


# -- the first start -------------------------------------------------------------------

class Served(processes.Served):
    """`consumers-graphql serve` on a SQLite file, as tests/processes.py runs it."""

    def __init__(self, database: Path) -> None:
        super().__init__(f"sqlite+aiosqlite:///{database}", database.parent)

    def post(self, headers: dict[str, str], query: str = QUERY) -> httpx.Response:
        with self.client(timeout=5) as client:
            return client.post("/graphql", json={"query": query}, headers=headers)


def test_first_serve_prints_exactly_one_key_and_a_second_start_none(tmp_path: Path) -> None:
    database = tmp_path / "fresh.db"
    # given a first start on an empty database
    first = Served(database)
    try:
        first.wait_until_up()
        banner = first.output
        secrets_ = set(SECRET.findall(banner))
        # then it printed exactly one key, and how to use it (curl and GraphiQL's headers)
        assert len(secrets_) == 1, banner
        secret = secrets_.pop()
        assert f"curl http://127.0.0.1:{first.port}/graphql -H 'Authorization: Bearer {secret}'" \
            in banner
        assert f'{{"Authorization": "Bearer {secret}"}}' in banner
        # and that key works, and a wrong one, or the key in a URL, is not logged
        assert first.post(bearer(secret)).json()["data"] == {"consumers": {"totalCount": 0}}
        wrong = secret[:-1] + ("y" if secret.endswith("x") else "x")
        assert first.post(bearer(wrong)).status_code == 401
        assert first.post({}).status_code == 401
        with first.client(timeout=5) as client:
            client.get("/graphql", params={"query": "{ __typename }", "api_key": secret},
                       headers={**bearer(secret), "accept": "application/json"})
    finally:
        assert first.stop() == 0, first.output
    after_banner = first.output[len(banner):]
    assert '"POST /graphql HTTP/1.1" 401' in after_banner, after_banner
    # the key pasted into a URL was not logged: access lines have no query string
    assert '"GET /graphql HTTP/1.1" 200' in after_banner and "api_key" not in after_banner
    assert secret not in after_banner and secret[:-1] not in after_banner

    # when the server starts again on the same database
    second = Served(database)
    try:
        second.wait_until_up()
        # then it prints no key, and the first key still works
        assert SECRET.search(second.output) is None, second.output
        assert second.post(bearer(secret)).status_code == 200
    finally:
        assert second.stop() == 0, second.output
    assert SECRET.search(second.output) is None, second.output


@pytest.mark.parametrize(("env", "host", "port"), [
    ({}, "127.0.0.1", "8000"),
    ({"CONSUMERS_HOST": "0.0.0.0", "CONSUMERS_PORT": "9123"}, "0.0.0.0", "9123"),
])
def test_serve_help_shows_the_defaults_in_effect(env: dict[str, str], host: str,
                                                 port: str) -> None:
    script = Path(sys.executable).with_name("consumers-graphql")
    environment = {k: v for k, v in os.environ.items() if k not in ("CONSUMERS_HOST",
                                                                    "CONSUMERS_PORT")}
    done = subprocess.run([str(script), "serve", "--help"], env={**environment, **env},
                          capture_output=True, text=True, check=True, timeout=60)
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    assert f"(default {host}" in help_text and f"(default {port}" in help_text, help_text
    if env:
        assert "from CONSUMERS_HOST" in help_text and "from CONSUMERS_PORT" in help_text
        assert "default 8000" not in help_text and "default 127.0.0.1" not in help_text


def test_secret_only_on_a_new_database_prints_the_secret_alone(tmp_path: Path) -> None:
    # given a database that does not exist yet (the command creates its schema first)
    env = {**os.environ, "CONSUMERS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'new.db'}"}
    # when a script captures the secret
    done = subprocess.run(
        [sys.executable, "-m", "consumers_graphql.cli", "keys", "create", "--name", "script",
         "--secret-only"], env=env, capture_output=True, text=True, timeout=120, check=False)
    # then stdout is the secret and nothing else; the schema's note went to stderr
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"sk_live_[A-Za-z0-9]{32,}\n", done.stdout), done.stdout
    assert "Created the database schema" in done.stderr


def test_a_first_production_start_prints_no_secret(tmp_path: Path) -> None:
    # given a first start in production on an empty database
    served = processes.Served(f"sqlite+aiosqlite:///{tmp_path / 'prod.db'}", tmp_path,
                              env={"CONSUMERS_ENV": "production"})
    try:
        served.wait_until_up()
        # then it says how to make a key, and prints none (its output is a log collector's)
        assert "No API key can be used yet" in served.output, served.output
        assert SECRET.search(served.output) is None, served.output
        assert httpx.post(f"{served.url}/graphql", json={"query": QUERY},
                          timeout=5).status_code == 401
    finally:
        assert served.stop() == 0, served.output
    assert SECRET.search(served.output) is None, served.output
    # and production logs JSON from the first line: the schema's and the key's notes included
    lines = [json.loads(line) for line in served.output.splitlines() if line.strip()]
    assert any("Created the database schema" in line["message"] for line in lines)
    assert any("No API key can be used yet" in line["message"] for line in lines)
