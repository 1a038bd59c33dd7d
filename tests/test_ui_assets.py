"""Where GraphiQL's and Swagger UI's files come from (CONSUMERS_UI_ASSETS), the pages' CSP in
each mode, `assets fetch` refusing a tarball that is not the pinned one, and `serve`
refusing local mode without the files. The pages in a real browser: tests/test_ui_browser.py."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from consumers_graphql.settings import Environment, Settings, UiAssets
from consumers_graphql.web import ui_assets
from consumers_graphql.web.app import create_app
from consumers_graphql.web.graphiql import WALKTHROUGH
from tests.conftest import project_root
from tests.log_audit import AUDIT
from tests.processes import Served, http_server

SCRIPT = Path(sys.executable).with_name("consumers-graphql")


def _policy(response: httpx.Response) -> dict[str, list[str]]:
    return {name: sources for name, *sources in (
        part.split() for part in response.headers["content-security-policy"].split(";"))}


def _fake_assets(directory: Path) -> dict[str, bytes]:
    """Every file the page loads, each with its own content: what the app must serve back."""
    written = {}
    for package in ui_assets.PACKAGES:
        for asset in package.assets:
            path = f"{package.folder}/{asset.path}"
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            written[path] = f"/* {path} */".encode()
            (directory / path).write_bytes(written[path])
    return written


@pytest.fixture
async def local_app(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    files = _fake_assets(tmp_path)
    app = create_app(settings.model_copy(update={"ui_assets": None, "ui_assets_dir": tmp_path}))
    app.state.fake_assets = files
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver",
                                     event_hooks=AUDIT.event_hooks()) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def test_fetched_assets_are_used_and_the_page_allows_only_this_origin(
    local_app: httpx.AsyncClient
) -> None:
    # given GraphiQL's files in the folder and CONSUMERS_UI_ASSETS unset
    # when the page is asked for
    page = await local_app.get("/graphql", headers={"Accept": "text/html"})

    # then it loads every file from this origin, and its policy names no other
    assert page.status_code == 200
    assert "https://" not in page.text.split("<body>")[0]
    policy = _policy(page)
    assert policy["script-src"][0] == "'self'" and len(policy["script-src"]) == 2
    assert policy["script-src"][1].startswith("'sha256-")
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    assert policy["connect-src"] == ["'self'"] and policy["default-src"] == ["'none'"]
    assert not any("http" in source for sources in policy.values() for source in sources)
    # and the app serves each of them, cacheable for good (their folder names the version)
    files = local_app.app.state.fake_assets  # type: ignore[attr-defined]
    for path, content in files.items():
        url = f"{ui_assets.GRAPHIQL_ASSETS_PATH}/{path}"
        assert f'"{url}"' in page.text
        served = await local_app.get(url)
        assert served.status_code == 200 and served.content == content
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert (await local_app.get(f"{ui_assets.GRAPHIQL_ASSETS_PATH}/../settings.py")
            ).status_code == 404


async def test_without_fetched_assets_the_page_takes_pinned_files_from_the_cdn(
    client: httpx.AsyncClient
) -> None:
    # given the session app: an empty assets folder, CONSUMERS_UI_ASSETS unset
    page = await client.get("/graphql", headers={"Accept": "text/html"})

    scripts = re.findall(r'<script src="([^"]+)" integrity="(sha384-[^"]+)"', page.text)
    assert [url for url, _ in scripts] == [
        "https://unpkg.com/react@18.3.1/umd/react.production.min.js",
        "https://unpkg.com/react-dom@18.3.1/umd/react-dom.production.min.js",
        "https://unpkg.com/graphiql@4.1.2/graphiql.min.js",
        "https://unpkg.com/graphql-ws@6.4.2/umd/graphql-ws.min.js",
    ]
    assert _policy(page)["script-src"][:4] == [url for url, _ in scripts]
    assert (await client.get(f"{ui_assets.GRAPHIQL_ASSETS_PATH}/graphiql@4.1.2/graphiql.min.js")
            ).status_code == 404


async def test_cdn_set_explicitly_wins_over_fetched_assets(
    settings: Settings, tmp_path: Path
) -> None:
    _fake_assets(tmp_path)
    app = create_app(settings.model_copy(update={"ui_assets": UiAssets.CDN,
                                                 "ui_assets_dir": tmp_path}))
    async with LifespanManager(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver",
            event_hooks=AUDIT.event_hooks()) as client:
        page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert "https://unpkg.com/graphiql@4.1.2/graphiql.min.js" in page.text


async def test_swagger_ui_is_served_from_here_and_its_page_allows_only_this_origin(
    local_app: httpx.AsyncClient
) -> None:
    page = await local_app.get("/docs")

    assert page.status_code == 200
    assert "https://" not in page.text
    policy = _policy(page)
    assert policy["script-src"][0] == "'self'" and len(policy["script-src"]) == 2
    assert policy["style-src"] == ["'self'", "'unsafe-inline'"]
    for url in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text):
        served = await local_app.get(url)
        assert served.status_code == 200 and len(served.content) > 1_000, url
        assert served.headers["cache-control"] == "no-cache"
    assert len(re.findall(r'"/docs/assets/', page.text)) == 3  # script, stylesheet, icon
    # Swagger UI's validator badge would send the document to swagger.io
    assert '"validatorUrl": null' in page.text
    # ReDoc is gone: its bundle always fetches Redocly's logo from a CDN
    assert (await local_app.get("/redoc")).status_code == 404


async def test_no_page_and_no_assets_in_production(settings: Settings, tmp_path: Path) -> None:
    _fake_assets(tmp_path)
    app = create_app(settings.model_copy(update={
        "env": Environment.PRODUCTION, "ui_assets": UiAssets.LOCAL, "ui_assets_dir": tmp_path}))
    async with LifespanManager(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver",
            event_hooks=AUDIT.event_hooks()) as client:
        for path in ("/docs", "/docs/assets/swagger-ui-bundle.js",
                     f"{ui_assets.GRAPHIQL_ASSETS_PATH}/graphiql@4.1.2/graphiql.min.js"):
            assert (await client.get(path)).status_code == 404, path


def test_the_page_opens_with_the_readme_walk_through() -> None:
    readme = (project_root() / "README.md").read_text(encoding="utf-8")
    section = readme.split("## GraphiQL walk-through", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```graphql\n(.*?)\n```", section, re.DOTALL)
    assert list(WALKTHROUGH) == blocks


def test_serve_refuses_local_mode_without_the_files(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "serve", "--port", "9"], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, check=False, env={
            **os.environ, "CONSUMERS_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
            "CONSUMERS_UI_ASSETS": "local", "CONSUMERS_UI_ASSETS_DIR": str(tmp_path / "none")})

    assert result.returncode == 2
    assert "`consumers-graphql assets fetch`" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "x.db").exists()  # refused before anything was done


def test_serve_says_once_how_to_serve_graphiql_offline(tmp_path: Path) -> None:
    served = Served(f"sqlite+aiosqlite:///{tmp_path / 'notice.db'}", tmp_path,
                    env={"CONSUMERS_UI_ASSETS_DIR": str(tmp_path / "none")})
    try:
        served.wait_until_up()
    finally:
        assert served.stop() == 0, served.output
    assert served.output.count("run `consumers-graphql assets fetch` once") == 1, served.output


class _Registry(http.server.BaseHTTPRequestHandler):
    tarballs: dict[str, bytes] = {}  # noqa: RUF012 (set per test, read by the handler)
    requested: list[str] = []  # noqa: RUF012

    def do_GET(self) -> None:
        self.requested.append(self.path)
        body = self.tarballs.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[str]:
    with http_server(_Registry) as url:
        yield url


def _tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue())


def test_assets_fetch_refuses_a_tarball_that_is_not_the_pinned_one(
    registry: str, tmp_path: Path
) -> None:
    # given a registry whose react tarball has the right files, but not the pinned bytes
    react = ui_assets.REACT
    _Registry.requested = []
    _Registry.tarballs = {f"/react/-/react-{react.version}.tgz": _tarball(
        {asset.path: b"window.React = 'not react';" for asset in react.assets})}
    directory = tmp_path / "assets"

    # when GraphiQL's files are fetched from it
    result = subprocess.run(
        [str(SCRIPT), "assets", "fetch", "--registry", registry], capture_output=True,
        text=True, timeout=60, check=False,
        env={**os.environ, "CONSUMERS_UI_ASSETS_DIR": str(directory)})

    # then the command fails, naming the package and both hashes, and nothing is written
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"is not the pinned react@{react.version}" in result.stderr
    assert react.integrity in result.stderr
    assert "Traceback" not in result.stderr
    assert _Registry.requested == [f"/react/-/react-{react.version}.tgz"]
    assert list(directory.iterdir()) == []
