"""Every example of the README runs, in order, as a reader would run it, against a real
`consumers-graphql serve` on a fresh database (SQLite, or PostgreSQL when
CONSUMERS_TEST_DATABASE_URL is set). How each kind of block runs, and the directives a block
may carry: tests/readme_examples.py."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import TEST_DATABASE_URL
from tests.processes import ON_GRAPHQL_CORE, Served
from tests.readme_examples import (
    README,
    ExampleFailed,
    Session,
    clean_environment,
    parse_blocks,
    shape_mismatches,
)

PEPPER = "readme-pepper"


@pytest.fixture
def fresh_database_url(tmp_path: Path) -> Iterator[str]:
    if not TEST_DATABASE_URL:
        yield f"sqlite+aiosqlite:///{tmp_path / 'readme.db'}"
        return
    server = make_url(TEST_DATABASE_URL)
    name = f"consumers_readme_{uuid.uuid4().hex[:12]}"

    async def execute(statement: str) -> None:
        admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
        try:
            async with admin.connect() as conn:
                await conn.execute(text(statement))
        finally:
            await admin.dispose()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_every_readme_block_runs_or_says_why_not() -> None:
    blocks, problems = parse_blocks(README.read_text(encoding="utf-8"))
    assert problems == [], "\n".join(problems)
    run = [b for b in blocks if b.skip is None and b.lang != "text"]
    assert {b.lang for b in run} >= {"sh", "graphql", "python", "json"}, run
    assert all(b.skip for b in blocks if b.skip is not None)


@pytest.mark.parametrize(("markdown", "problem"), [
    ("```yaml\na: 1\n```\n", "a block that no test runs"),
    ("```\nplain\n```\n", "a block that no test runs"),
    ("<!-- readme-test: skip -->\n```sh\ntrue\n```\n", "skip needs a reason"),
    ("<!-- readme-test: skip (why) -->\n\n```sh\ntrue\n```\n", "must come right before"),
    ("<!-- readme-test: variables [1] -->\n```graphql\n{ a }\n```\n", "a JSON object"),
    ("<!-- readme-test: frobnicate -->\n```sh\ntrue\n```\n", "unknown readme-test directive"),
    ("text\n\n```json\n{}\n```\n", "must follow its example"),
    ("```text\nfigure\n```\n```json\n{}\n```\n", "must follow the example it answers"),
], ids=["unknown language", "no language", "skip without reason", "stray directive",
        "bad variables", "unknown directive", "json first", "json after a figure"])
def test_an_unmarked_block_or_a_bad_directive_is_refused(markdown: str, problem: str) -> None:
    _, problems = parse_blocks(markdown)
    assert len(problems) == 1 and problem in problems[0], problems


def test_a_marked_block_is_skipped_and_a_figure_needs_no_mark() -> None:
    blocks, problems = parse_blocks(
        "<!-- readme-test: skip (a unit file) -->\n```ini\n[Unit]\n```\n```text\nsrc/\n```\n")
    assert problems == [] and [b.skip for b in blocks] == ["a unit file", None]


def test_answers_are_compared_in_shape() -> None:
    expected = {"data": {"nodes": [{"id": "cons_…", "n": 1}]}, "extensions": None}
    assert list(shape_mismatches(expected, {"data": {"nodes": []}, "extensions": None}, "$")) \
        == []
    same = {"data": {"nodes": [{"id": "cons_01X", "n": 2.5}, {"id": "cons_2", "n": 0}]},
            "extensions": None}
    assert list(shape_mismatches(expected, same, "$")) == []
    assert list(shape_mismatches(expected, {"data": {"nodes": [{"id": "aud_1", "n": 1}]},
                                            "extensions": None}, "$")) != []
    assert list(shape_mismatches(expected, {"data": {"nodes": [{"id": "cons_1"}]},
                                            "extensions": None}, "$")) != []
    assert list(shape_mismatches(expected, {"data": {"nodes": [{"id": "cons_1", "n": "1"}]},
                                            "extensions": None}, "$")) != []
    assert list(shape_mismatches(expected, {"data": None, "extensions": None}, "$")) != []


# What a broken example looks like to the runner: each must fail it.
BROKEN = {
    "a field that does not exist": "```graphql\n{ consumers { nodes { idd } } }\n```\n",
    "a userError": "```graphql\nmutation { consumerCreate(input: {email: \"not an email\"}) "
                   "{ consumer { id } userErrors { code } } }\n```\n",
    "a command that is not there": "```sh\n.venv/bin/consumers-graphql sevre\n```\n",
    "an HTTP error from curl": "```sh\ncurl http://127.0.0.1:8000/api/v1/consumers "
                               "-H 'Authorization: Bearer sk_live_wrong'\n```\n",
    "GraphQL errors printed by curl": "```sh\ncurl http://127.0.0.1:8000/graphql -H "
        "\"Authorization: Bearer $CONSUMERS_KEY\" -H 'Content-Type: application/json' "
        "-d '{\"query\": \"{ nope }\"}'\n```\n",
    "a script that raises": "```python\nraise SystemExit('no')\n```\n",
    "an answer of another shape": "```graphql\n{ consumers(first: 1) { totalCount } }\n```\n"
                                  "```json\n{\"data\": {\"consumers\": {\"count\": 1}}}\n```\n",
    "a capture that finds nothing": "<!-- readme-test: capture X=data.nope -->\n"
                                    "```graphql\n{ consumers(first: 1) { totalCount } }\n```\n",
    "a placeholder that is not in the block": "<!-- readme-test: replace key_…=$CONSUMERS_KEY "
                                              "-->\n```sh\ntrue\n```\n",
}


def test_the_readme_examples_run(
    fresh_database_url: str, tmp_path: Path, execution_path: str,
    record_property: pytest.RecordProperty,
) -> None:
    blocks, problems = parse_blocks(README.read_text(encoding="utf-8"))
    assert problems == [], problems
    preexec = [sys.executable, "-c", ON_GRAPHQL_CORE] if execution_path == "graphql-core" else []
    workdir = tmp_path / "reader"
    workdir.mkdir()
    # (CORS on for one origin: the README's CORS example asks for its preflight.)
    served = Served(fresh_database_url, workdir, env={
        "CONSUMERS_KEY_PEPPER": PEPPER, "CONSUMERS_CORS_ORIGINS": "https://app.example.com"},
                    preexec=preexec)
    try:
        served.wait_until_up()
        # The reader's shell: the server's settings, and the key its first start printed.
        session = Session(served.url, workdir, {
            **clean_environment(), "CONSUMERS_DATABASE_URL": fresh_database_url,
            # how that database is reached (CI's run through pgbouncer), as the server has it
            **{name: os.environ[name] for name in ("CONSUMERS_DATABASE_POOLER",)
               if name in os.environ},
            "CONSUMERS_KEY_PEPPER": PEPPER, "CONSUMERS_KEY": served.secret(),
        })
        session.run_all(blocks)
        record_property("readme_skipped", [f"{b.where()}: {b.skip}" for b in session.skipped])
        print("README blocks not run:", *(f"{b.where()}: {b.skip}" for b in session.skipped),
              *session.not_run, sep="\n  ")
        for missing in session.not_run:
            warnings.warn(f"README example not run: {missing}", stacklevel=1)

        # and the same runner fails on a broken example, whatever the kind
        for what, markdown in BROKEN.items():
            broken, problems = parse_blocks(markdown)
            assert problems == [], (what, problems)
            with pytest.raises(ExampleFailed):
                session.run_all(broken)
                pytest.fail(f"the runner accepted {what}")
    finally:
        code = served.stop()
    assert code == 0, served.output
    assert "Traceback" not in served.output, served.output
