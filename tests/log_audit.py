"""The log of a whole test run, checked for personal data and secrets at its end.

For the whole session a handler on the root logger writes every record, as `serve` would
in production (the JSON formatter, behind the same filters), with the app's loggers at
DEBUG. Meanwhile the audit collects what the run used: every secret the key fixtures made,
and every email, phone, full name and metadata text the test client sent. When the session
ends, the run fails if any of those, or anything shaped like an email, a phone number or a
secret, is in the log (in any percent-encoding). The hooks are tests/conftest.py's;
tests/test_log_audit.py plants leaks to show that the check fails the run.

Every test client registers what it sends: the session's `client`, and those of the apps
and servers tests make themselves (`asgi_client`, `event_hooks`, Served's). The output of
every `serve` subprocess (tests/processes.py) is checked when it stops (`check_output`):
a find fails that test, and the run.

Under pytest-xdist (the suite's default, pyproject.toml) each worker audits the log of the
tests it ran and hands what it found to the controller (`workeroutput`), which reports it and
fails the run.

Client-side loggers (httpx, httpcore) are not the server's log and are left out."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
import pytest

from consumers_graphql.web.logs import JsonFormatter, RedactSecrets, WithRequestId

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_PHONE = re.compile(r"\+[1-9]\d{7,14}\b")
# A secret with more of its body than the visible prefix the redaction keeps.
_SECRET = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{8,}")
# Fields whose values are personal data, whatever their shape.
_PERSONAL_FIELDS = frozenset({"email", "phone", "fullName", "full_name", "name"})
_CLIENT_SIDE = ("httpx", "httpcore")
# Shorter texts (a name like "Ada", a tier like "gold") are found inside unrelated words.
MIN_TEXT = 8
MAX_BODY = 256 * 1024


class _ServerSide(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(_CLIENT_SIDE)


class LogAudit:
    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(JsonFormatter())
        for log_filter in (_ServerSide(), RedactSecrets(), WithRequestId()):
            self.handler.addFilter(log_filter)
        self.used: set[str] = set()
        self._level: int | None = None
        # at the session's end: what was found, and the report's lines for each (under
        # pytest-xdist, the controller's hold every worker's), the log lines and the values
        # the run used, counted
        self.found: list[str] = []
        self.reported: list[str] = []
        self.lines = 0
        self.values = 0
        # what the processes' outputs had (check_output), with the lines
        self.in_processes: dict[str, list[str]] = {}

    def install(self) -> None:
        logging.getLogger().addHandler(self.handler)
        app_logger = logging.getLogger("consumers_graphql")
        self._level = app_logger.level
        app_logger.setLevel(logging.DEBUG)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        if self._level is not None:
            logging.getLogger("consumers_graphql").setLevel(self._level)

    def use(self, value: str) -> None:
        """A value the run used that must never be logged (a secret: its body too)."""
        value = value.strip()
        if _SECRET.fullmatch(value):
            self.used.add(value.split("_", 2)[2])
        if len(value) >= MIN_TEXT or _EMAIL.fullmatch(value) or _PHONE.fullmatch(value):
            self.used.add(value)

    def use_json(self, value: Any, personal: bool = False) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                self.use_json(item, personal or name in _PERSONAL_FIELDS or name == "metadata")
        elif isinstance(value, list):
            for item in value:
                self.use_json(item, personal)
        elif isinstance(value, str) and (personal or _EMAIL.fullmatch(value)
                                         or _PHONE.fullmatch(value)):
            self.use(value)

    def use_request(self, request: httpx.Request) -> None:
        """An httpx event hook: the key, the body's personal values, the query's values."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            self.use(token)
        for _, query_value in parse_qsl(request.url.query.decode("latin-1")):
            if _EMAIL.search(query_value) or _PHONE.search(query_value):
                self.use(query_value)
        try:
            content = request.content
        except httpx.RequestNotRead:  # a streamed body
            return
        # Larger bodies are the hostile-request tests' (whose memory is measured), not data.
        is_json = request.headers.get("content-type", "").startswith("application/json")
        if is_json and 0 < len(content) <= MAX_BODY:
            try:
                self.use_json(json.loads(content))
            except (ValueError, RecursionError):  # the tests of malformed bodies
                return

    async def async_use_request(self, request: httpx.Request) -> None:
        self.use_request(request)

    def leaks(self, text: str | None = None) -> list[str]:
        logged = self.stream.getvalue() if text is None else text
        decoded = unquote(unquote(unquote(logged)))
        found = [value for value in sorted(self.used) if value in logged or value in decoded]
        for pattern in (_EMAIL, _PHONE, _SECRET):
            found += sorted({m.group() for m in pattern.finditer(decoded)} - set(found))
        return found

    def report(self, leaks: list[str]) -> list[str]:
        """The lines of the run's report for `leaks`: where each was seen (at most three)."""
        report = []
        for leak in leaks:
            report.append(f"  {leak!r} in:")
            report.extend(f"    {line[:400]}" for line in list(self.lines_with(leak))[:3])
            report.extend(f"    {line}" for line in self.in_processes.get(leak, [])[:3])
        return report

    def lines_with(self, leak: str, text: str | None = None) -> Iterator[str]:
        logged = self.stream.getvalue() if text is None else text
        for line in logged.splitlines():
            if leak in line or leak in unquote(unquote(unquote(line))):
                yield line

    def check_output(self, output: str, what: str) -> None:
        """The output of a process the run started: raises AssertionError, and fails the run,
        when it has a value the run used or anything shaped like personal data or a secret."""
        leaks = self.leaks(output)
        if not leaks:
            return
        report = []
        for leak in leaks:
            lines = [line[:400] for line in list(self.lines_with(leak, output))[:3]]
            self.in_processes.setdefault(leak, []).extend(f"({what}) {line}" for line in lines)
            report.append(f"  {leak!r} in:")
            report.extend(f"    {line}" for line in lines)
        raise AssertionError(f"LOG AUDIT: the output of {what} has {len(leaks)} value(s) the "
                             "run used, or shaped like personal data or a secret:\n"
                             + "\n".join(report))

    def event_hooks(self) -> dict[str, list[Any]]:
        """For an httpx.AsyncClient of the tests: what it sends is registered."""
        return {"request": [self.async_use_request]}

    def sync_event_hooks(self) -> dict[str, list[Any]]:
        """For an httpx.Client."""
        return {"request": [self.use_request]}


AUDIT = LogAudit()
# Where a pytest-xdist worker leaves its audit for the controller (`workeroutput`).
_WORKER_OUTPUT = "consumers_graphql_log_audit"


def asgi_client(app: Any, base_url: str = "http://testserver",
                **kwargs: Any) -> httpx.AsyncClient:
    """A client of an app a test built (its lifespan is the test's), audited like the
    session's `client`."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url,
                             event_hooks=AUDIT.event_hooks(), **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    AUDIT.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    AUDIT.uninstall()
    found = AUDIT.leaks()
    found += sorted(set(AUDIT.in_processes) - set(found))
    own = AUDIT.report(found)
    AUDIT.found += found
    AUDIT.reported += own
    AUDIT.lines += AUDIT.stream.getvalue().count("\n")
    AUDIT.values += len(AUDIT.used)
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller reports, and fails
        workeroutput[_WORKER_OUTPUT] = {"found": found, "report": own, "lines": AUDIT.lines,
                                        "values": AUDIT.values}
    if AUDIT.found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller, as each worker ends: what its audit found (the controller's
    own sessionfinish, which comes after every worker's, then fails the run)."""
    output = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT)
    if output is None:  # a worker that crashed: its tests are failed by xdist itself
        return
    AUDIT.found += output["found"]
    AUDIT.reported += output["report"]
    AUDIT.lines += output["lines"]
    AUDIT.values += output["values"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not AUDIT.found:
        terminalreporter.write_line(
            f"log audit: {AUDIT.lines:,} log lines, none with any of the {AUDIT.values:,} "
            "values the run used (counted in each worker), nor an email, phone or secret")
        return
    report = [f"LOG AUDIT: {len(AUDIT.found)} value(s) the run used, or shaped like personal "
              "data or a secret, reached the log:", *AUDIT.reported]
    terminalreporter.write_line("\n".join(report), red=True)
