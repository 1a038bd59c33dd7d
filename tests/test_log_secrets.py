"""A secret pasted into a URL never reaches `serve`'s output, in whatever encoding it came:
the access line has no query string, a matched route's template in place of its path, and
of an unknown path only the segments that begin the app's routes ({unmatched} for the rest)."""

from __future__ import annotations

import logging
import secrets
import string
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
from asgi_lifespan import LifespanManager

from consumers_graphql.settings import Settings
from consumers_graphql.web.app import create_app
from tests.conftest import bearer
from tests.log_audit import AUDIT
from tests.processes import Served


def _every_character(text: str, pattern: str) -> str:
    return "".join(pattern % ord(c) for c in text)


def test_a_secret_in_a_url_is_redacted_in_every_encoding(tmp_path: Path) -> None:
    body = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    secret = f"sk_live_{body}"
    encoded = [
        secret,
        secret.replace("_", "%5F"),
        secret.replace("_", "%5f"),
        _every_character(secret, "%%%02X"),
        _every_character(secret, "%%%02x"),
        quote(secret.replace("_", "%5F")),  # double-encoded: %255F
        quote(quote(secret.replace("_", "%5f"))),  # three times: %25255f
        quote(_every_character(secret, "%%%02x")),
        "Bearer+" + secret,
        "Bearer%2B" + secret.replace("_", "%5F"),
        "Bearer%20" + secret[:20] + _every_character(secret[20:], "%%%02X"),
    ]
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'secrets.db'}", tmp_path,
                    env={"CONSUMERS_LOG_LEVEL": "info"})
    try:
        served.wait_until_up()
        banner = served.output
        with served.client(timeout=10) as client:
            for form in encoded:
                for target in (f"/graphql?query=%7B__typename%7D&api_key={form}",
                               f"/api/v1/consumers?api_key={form}&limit=1",
                               f"/api/v1/consumers/{form}", f"/nowhere/{form}"):
                    response = client.get(target, headers={"accept": "application/json"})
                    expected = 404 if target.startswith("/nowhere/") else 401
                    assert response.status_code == expected, (target, response.text)
    finally:
        assert served.stop() == 0, served.output
    log = served.output[len(banner):]
    # every request was logged; the unknown path as the segments the app knows (none)
    assert log.count('HTTP/1.1" 401') == 3 * len(encoded), log
    assert log.count('"GET /{unmatched} HTTP/1.1" 404') == len(encoded), log
    assert "api_key" not in log and "/api/v1/consumers/{consumer_id}" in log, log
    # and no part of the secret past that prefix is there, in any encoding
    decoded = unquote(unquote(unquote(log)))
    assert body[4:] not in decoded and body[-8:] not in decoded, log


async def test_statements_are_logged_without_their_values(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Echoed statements, and the text of any database error, never carry the values."""
    app = create_app(settings.model_copy(update={"sql_echo": True}))
    async with LifespanManager(app):
        created = await app.state.keys.create("echo")
        caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test",
                                     event_hooks=AUDIT.event_hooks()) as client:
            response = await client.post("/api/v1/consumers", headers=bearer(
                created.secret.get_secret_value()), json={
                    "email": "echo.person@example.com", "fullName": "Echo Person"})
            assert response.status_code == 201, response.text
            await client.delete(f"/api/v1/consumers/{response.json()['id']}",
                                headers=bearer(created.secret.get_secret_value()))
        await app.state.keys.revoke(created.info.id)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "INSERT INTO consumers" in logged
    assert "echo.person@example.com" not in logged and "Echo Person" not in logged
