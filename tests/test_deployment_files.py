"""`Dockerfile` and `compose.yaml` agree with the code they ship: no image can be built here (no
registry), so they are read instead. Every `consumers-graphql` command they run parses with
the CLI's own parser, every CONSUMERS_* variable they set is a Settings field, the ports
agree, the app reaches PostgreSQL through pgbouncer in transaction mode, migrations run once
in a service of their own, no secret is written in them, and the image's Python is the one
pyproject.toml says."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from starlette.routing import BaseRoute

from consumers_graphql.cli import build_parser
from consumers_graphql.settings import Settings, known_variables
from consumers_graphql.web.app import create_app

ROOT = Path(__file__).parent.parent
SECRET_NAMES = re.compile(r"PASSWORD|PEPPER|SECRET|TOKEN|_KEY$", re.IGNORECASE)
REQUIRED_SUBSTITUTION = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")
API_KEY = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{8,}")


@dataclass
class Instruction:
    line: int
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON (exec) form's list, or the shell form split as sh would."""
        text = self.arguments.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
            return value
        return shlex.split(text)


def dockerfile() -> list[Instruction]:
    """Instructions by line: comments dropped, continuation lines (trailing backslash) joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate((ROOT / "Dockerfile").read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), arguments))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def settings_variables() -> set[str]:
    return known_variables()  # the standard OTEL_* ones under their own names


def cli_arguments(command: list[str]) -> Any:
    """What the CLI makes of ``command`` (without the program name); a bad one fails."""
    try:
        return build_parser().parse_args(command)
    except SystemExit as error:
        raise AssertionError(f"consumers-graphql refuses {command}") from error


def image_command(service: dict[str, Any]) -> list[str]:
    """The arguments the image's ENTRYPOINT (consumers-graphql) gets in ``service``."""
    command = service.get("command")
    if command is None:
        return one(dockerfile(), "CMD").exec_form()
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def app_paths() -> set[str]:
    routes: list[BaseRoute] = create_app(Settings()).router.routes
    return {path for route in routes if isinstance(path := getattr(route, "path", None), str)}


def database_url(service: dict[str, Any]) -> Any:
    """The service's CONSUMERS_DATABASE_URL, parsed with its ${…} substitutions stood in for."""
    value = environment(service)["CONSUMERS_DATABASE_URL"]
    return urlsplit(re.sub(r"\$\{[^}]*\}", "substituted", value))


def container_port(mapping: str | int | dict[str, Any]) -> int:
    if isinstance(mapping, dict):  # the long form
        return int(mapping["target"])
    return int(str(mapping).split(":")[-1].split("/")[0])


def test_the_image_runs_consumers_graphql_serve_as_a_non_root_user() -> None:
    instructions = dockerfile()
    assert instructions[0].keyword in ("FROM", "ARG"), instructions[0]
    assert one(instructions, "ENTRYPOINT").exec_form() == ["consumers-graphql"]
    arguments = cli_arguments(one(instructions, "CMD").exec_form())
    assert arguments.command == "serve" and arguments.host == "0.0.0.0", arguments
    users = [i for i in instructions if i.keyword == "USER"]
    assert users and users[-1].arguments.split(":")[0] not in ("root", "0"), users
    # every RUN that installs comes before the switch to the unprivileged user
    assert all(i.line < users[-1].line for i in instructions if i.keyword == "RUN")
    assert any(i.keyword == "RUN" and "pip install" in i.arguments for i in instructions)


def test_the_images_python_is_the_floor_of_requires_python() -> None:
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", requires)
    assert floor is not None, f"requires-python {requires!r}: update this test's reading of it"
    base = one(dockerfile(), "FROM").arguments
    image = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim(?:-\w+)?(?:@sha256:\w+)?", base)
    assert image is not None, base
    assert image.group(1) == floor.group(1), (base, requires)


def test_ports_agree_everywhere() -> None:
    instructions = dockerfile()
    [exposed] = [int(p.split("/")[0]) for p in one(instructions, "EXPOSE").arguments.split()]
    served = cli_arguments(one(instructions, "CMD").exec_form())
    assert served.port == exposed
    health = one(instructions, "HEALTHCHECK").arguments
    [url] = re.findall(r"https?://[^\s'\"]+", health)
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port == exposed, url
    assert parts.path in app_paths(), f"{parts.path} is not served by the app"
    app = compose()["services"]["app"]
    app_port = cli_arguments(image_command(app)).port
    assert app_port == exposed
    assert [container_port(p) for p in app.get("ports", [])] == [exposed]


def test_the_app_has_time_to_drain_on_stop() -> None:
    app = compose()["services"]["app"]
    grace = float(environment(app).get("CONSUMERS_SHUTDOWN_GRACE_S",
                                       Settings.model_fields["shutdown_grace_s"].default))
    period = re.fullmatch(r"(\d+)s", str(app.get("stop_grace_period", "10s")))
    assert period is not None and int(period.group(1)) > grace, (
        "stop_grace_period must exceed CONSUMERS_SHUTDOWN_GRACE_S, or Docker kills requests "
        "the app is still draining")


def test_every_command_and_variable_is_the_clis() -> None:
    known = settings_variables()
    for name, service in compose()["services"].items():
        if "build" in service:  # this project's image: its ENTRYPOINT is consumers-graphql
            cli_arguments(image_command(service))
        for variable in environment(service):
            if variable.startswith("CONSUMERS_"):
                assert variable in known, f"{name}: {variable} is not a Settings field"
    for instruction in dockerfile():
        if instruction.keyword == "ENV":
            for variable in re.findall(r"\b(CONSUMERS_[A-Z0-9_]+)=", instruction.arguments):
                assert variable in known, f"Dockerfile: {variable} is not a Settings field"


def test_the_app_goes_through_pgbouncer_in_transaction_mode_and_migrate_runs_once() -> None:
    services = compose()["services"]
    app, migrate, pgbouncer = services["app"], services["migrate"], services["pgbouncer"]
    app_env = environment(app)
    assert database_url(app).hostname == "pgbouncer"
    assert app_env["CONSUMERS_DATABASE_POOLER"] == "transaction"
    assert environment(pgbouncer)["POOL_MODE"] == "transaction"
    # migrations: a one-shot service of their own, straight to PostgreSQL, before the app
    assert cli_arguments(image_command(migrate)).command == "migrate"
    assert database_url(migrate).hostname == "postgres"
    assert migrate.get("restart", "no") == "no"
    assert cli_arguments(image_command(app)).command == "serve"
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # both talk to the same database with the same key pepper
    assert environment(migrate)["CONSUMERS_KEY_PEPPER"] == app_env["CONSUMERS_KEY_PEPPER"]
    assert database_url(migrate).path == \
        database_url(app).path


def test_no_secret_is_written_in_the_files() -> None:
    for name, service in compose()["services"].items():
        for variable, value in environment(service).items():
            if SECRET_NAMES.search(variable):
                assert REQUIRED_SUBSTITUTION.match(value), (
                    f"{name}: {variable} must come from the environment, as "
                    f"${{{variable}:?message}}")
            if "://" in value:
                password = re.match(r"^[a-z0-9+]+://[^:/@]+:(.*)@", value)
                assert password is None or REQUIRED_SUBSTITUTION.match(password.group(1)), (
                    f"{name}: {variable} has a password written in it")
    for path in ("Dockerfile", "compose.yaml"):
        text = (ROOT / path).read_text()
        assert API_KEY.search(text) is None, path


@pytest.mark.parametrize("planted", [
    ("compose.yaml", "      POOL_MODE: transaction", "      POOL_MODE: session"),
    ("compose.yaml", "      CONSUMERS_LOG_FORMAT: json\n    depends_on:\n      postgres:",
     "      CONSUMERS_LOG_FORMT: json\n    depends_on:\n      postgres:"),
    ("compose.yaml", '    command: ["migrate"]', '    command: ["migrate", "--all"]'),
    ("compose.yaml", "CONSUMERS_KEY_PEPPER: ${CONSUMERS_KEY_PEPPER:?set CONSUMERS_KEY_PEPPER}\n"
     "      # One", "CONSUMERS_KEY_PEPPER: hunter2hunter2\n      # One"),
    ("compose.yaml", '"127.0.0.1:8000:8000"', '"127.0.0.1:8000:8080"'),
    ("Dockerfile", "EXPOSE 8000", "EXPOSE 8080"),
    ("Dockerfile", "FROM python:3.11-slim", "FROM python:3.12-slim"),
    ("Dockerfile", "USER consumers", "USER root"),
], ids=["session pooling", "unknown variable", "unknown flag", "secret literal",
        "compose port", "exposed port", "python version", "root user"])
def test_each_check_fails_on_a_planted_mistake(
    planted: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before, after = planted
    for name in ("Dockerfile", "compose.yaml", "pyproject.toml"):
        text = (ROOT / name).read_text()
        if name == path:
            assert text.count(before) == 1, before
            text = text.replace(before, after)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    checks = [test_the_image_runs_consumers_graphql_serve_as_a_non_root_user,
              test_the_images_python_is_the_floor_of_requires_python,
              test_ports_agree_everywhere, test_every_command_and_variable_is_the_clis,
              test_the_app_goes_through_pgbouncer_in_transaction_mode_and_migrate_runs_once,
              test_no_secret_is_written_in_the_files]
    failed = []
    for check in checks:
        try:
            check()
        except AssertionError:
            failed.append(check.__name__)
    assert failed, f"no check noticed {after!r} in {path}"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    """A setting no reader can find is a setting nobody uses: each variable has a row."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    listed: set[str] = set()
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        names = re.findall(r"`((?:CONSUMERS|OTEL)_[A-Z0-9_]+|_[A-Z0-9_]+)`", row.split(" | ")[0])
        family = ""
        for name in names:
            if name.startswith("_"):  # `CONSUMERS_MAX_DEPTH`, `_ALIASES`: the same family
                listed.add(family + name)
            else:
                listed.add(name)
                family = name.rsplit("_", 1)[0]
    missing = sorted(settings_variables() - listed)
    assert not missing, f"settings without a row in the README's Configuration: {missing}"


def test_every_image_is_pinned_to_a_version() -> None:
    """`latest` (or no tag) is a different image a year from now."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    images = [service["image"] for service in compose["services"].values() if "image" in service]
    from_lines = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    for image in [*images, *from_lines]:
        tag = image.rpartition(":")[2] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and re.match(r"\d", tag), f"{image}: pin a version tag"
