"""The audit of the run's log (log_audit.py) fails a run that leaks, and only such a run:
pytest runs planted tests in a subprocess, with the audit's hooks as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import project_root

PLANTED = '''
import logging

from tests.log_audit import AUDIT

log = logging.getLogger("consumers_graphql.planted")


def test_planted() -> None:
    AUDIT.use_json({{"fullName": "Planted Personname", "metadata": {{"note": "left-handed"}}}})
    AUDIT.use("sk_live_" + "P" * 40)
    {line}
'''


def _run(tmp_path: Path, line: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_planted.py").write_text(PLANTED.format(line=line))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.log_audit", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, *args, str(tmp_path / "test_planted.py")],
        cwd=project_root(), capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(project_root())},
    )


LEAKS = [
    ('log.info("looked up %s", "planted.person@example.com")', "planted.person@example.com"),
    ('log.warning("called %s back", "+14155550188")', "+14155550188"),
    ('log.error("for Planted Personname")', "Planted Personname"),
    ('log.debug("note: left-handed")', "left-handed"),
    # a key's body without its prefix, which the redaction cannot recognise
    ('log.info("token %s", "P" * 40)', "P" * 40),
    ('log.info("/x?e=%s", "planted%40example.com")', "planted@example.com"),
]


def test_every_leak_fails_the_run_and_is_named(tmp_path: Path) -> None:
    result = _run(tmp_path, "\n    ".join(line for line, _ in LEAKS))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
    assert f"LOG AUDIT: {len(LEAKS)} value(s)" in result.stdout, result.stdout
    for _, leak in LEAKS:
        assert repr(leak) in result.stdout, (leak, result.stdout)


def test_a_leak_in_a_worker_process_fails_the_run_and_is_named(tmp_path: Path) -> None:
    # the suite runs in pytest-xdist's workers (pyproject.toml): each audits its own log,
    # and the controller reports what they found and fails the run
    result = _run(tmp_path, "\n    ".join(line for line, _ in LEAKS), "-n", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "bringing up nodes" in result.stdout, (
        result.stdout)
    assert f"LOG AUDIT: {len(LEAKS)} value(s)" in result.stdout, result.stdout
    for _, leak in LEAKS:
        assert repr(leak) in result.stdout, (leak, result.stdout)
    # and a worker's run without one passes, its lines counted
    result = _run(tmp_path, 'log.info("nothing personal")', "-n", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "log audit: 1 log lines, none with any of the 4 values" in result.stdout, (
        result.stdout)


def test_a_run_without_a_leak_passes(tmp_path: Path) -> None:
    result = _run(tmp_path, 'log.info("a request for key_01J0000000000000000000000, "'
                            '"sk_live_PPPP…[redacted]")')
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOG AUDIT" not in result.stdout


# The output of a `serve` the run started is audited when it stops (tests/processes.py);
# here a shell in front of the command prints, then exits at once.
SERVED = '''
    import tempfile
    from pathlib import Path
    from tests.processes import Served
    served = Served("sqlite+aiosqlite:///unused.db", Path(tempfile.mkdtemp()),
                    preexec=["sh", "-c", {script!r}, "sh"])
    served.process.wait(timeout=60)
    served.stop()'''


def test_a_leak_in_the_output_of_serve_fails_the_test_and_the_run(tmp_path: Path) -> None:
    script = "echo 'INFO: looked up planted.served@example.com'"
    result = _run(tmp_path, SERVED.format(script=script))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout, result.stdout
    assert "LOG AUDIT: the output of serve on port" in result.stdout, result.stdout
    assert "'planted.served@example.com'" in result.stdout, result.stdout


def test_the_first_start_banner_is_the_one_place_a_secret_is_printed(tmp_path: Path) -> None:
    secret = "sk_live_" + "B" * 40
    banner = (f"printf '\\nCreated the first API key, key_1 (read-write). Its secret is shown "
              f"only this once:\\n\\n    {secret}\\n\\nMore keys: consumers-graphql keys create "
              f"--name NAME\\nINFO: started\\n'")
    assert _run(tmp_path, SERVED.format(script=banner)).returncode == 0
    # the same secret anywhere else is a leak
    leaked = f"printf 'INFO: key {secret}\\n'"
    result = _run(tmp_path, SERVED.format(script=leaked))
    assert result.returncode == 1 and repr(secret) in result.stdout, result.stdout


CLIENT = '''
    import asyncio
    from tests.log_audit import asgi_client

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({{"type": "http.response.start", "status": 204, "headers": []}})
        await send({{"type": "http.response.body", "body": b""}})

    async def call():
        async with asgi_client(app) as client:
            await client.post("/graphql", json={{"variables": {{"fullName": "Sent Clientname"}}}})

    asyncio.run(call())
    log.info("created Sent Clientname")'''


def test_what_a_test_client_sends_is_registered(tmp_path: Path) -> None:
    result = _run(tmp_path, CLIENT.format())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "'Sent Clientname'" in result.stdout, result.stdout
