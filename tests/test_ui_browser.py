"""GraphiQL and the API docs in a real headless browser (Debian's chromium, driven by
Playwright), served by a real `consumers-graphql serve` with GraphiQL's files fetched by the
real `assets fetch`, and no network beyond loopback: every request elsewhere is aborted and
recorded, and the test asserts there was none.

The server runs its default execution path (a subprocess cannot be switched per test): what
is under test is the page; the operations it sends run on both paths in the other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from consumers_graphql.web import ui_assets
from consumers_graphql.web.graphiql import WALKTHROUGH
from tests.processes import Served

SCRIPT = Path(sys.executable).with_name("consumers-graphql")
CHROMIUM = Path(os.environ.get("CONSUMERS_TEST_CHROMIUM", "/usr/bin/chromium"))
TIMEOUT_MS = 20_000
# Records what a Content-Security-Policy blocked, before any script of the page runs.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
});
"""


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found: apt-get install chromium (or set CONSUMERS_TEST_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: its absence is a broken run, not a skip
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="session")
def fetched_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GraphiQL's files, as `consumers-graphql assets fetch` puts them (from the npm registry,
    once per session)."""
    directory = tmp_path_factory.mktemp("ui-assets")
    result = subprocess.run([str(SCRIPT), "assets", "fetch"], capture_output=True, text=True,
                            timeout=300, check=False,
                            env={**os.environ, "CONSUMERS_UI_ASSETS_DIR": str(directory)})
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


def test_assets_fetch_keeps_only_the_files_the_page_loads(fetched_assets: Path) -> None:
    # then exactly the pinned packages' listed files are there, each as published
    found = sorted(str(path.relative_to(fetched_assets))
                   for path in fetched_assets.rglob("*") if path.is_file())
    assert found == sorted(f"{package.folder}/{asset.path}" for package in ui_assets.PACKAGES
                           for asset in package.assets)
    for package in ui_assets.PACKAGES:
        for asset in package.assets:
            content = (fetched_assets / package.folder / asset.path).read_bytes()
            assert ui_assets.integrity(content, "sha384") == asset.sri  # the CDN's pins too
    # and a second run downloads nothing
    result = subprocess.run([str(SCRIPT), "assets", "fetch"], capture_output=True, text=True,
                            timeout=60, check=False,
                            env={**os.environ, "CONSUMERS_UI_ASSETS_DIR": str(fetched_assets)})
    assert result.returncode == 0 and "(nothing new)" in result.stdout, result.stderr


@pytest.fixture(scope="module")
def served(fetched_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # A SQLite file of its own on either suite: the first start prints the key to type in.
    directory = tmp_path_factory.mktemp("browser")
    server = Served(f"sqlite+aiosqlite:///{directory / 'browser.db'}", directory, env={
        "CONSUMERS_UI_ASSETS": "local", "CONSUMERS_UI_ASSETS_DIR": str(fetched_assets)})
    try:
        server.wait_until_up()
        yield server
    finally:
        assert server.stop() == 0, server.output


class Browser:
    """One page of a fresh browser context, whose requests beyond the server are aborted."""

    def __init__(self, context: Any, page: Any, origin: str) -> None:
        self.context, self.page, self.origin = context, page, origin
        self.outside: list[str] = []
        self.console_errors: list[str] = []

    async def start(self) -> None:
        await self.context.route("**/*", self._route)
        await self.page.add_init_script(RECORD_CSP_VIOLATIONS)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    async def _route(self, route: Any) -> None:
        if route.request.url.startswith(self.origin + "/"):
            await route.continue_()
        else:
            self.outside.append(route.request.url)
            await route.abort()

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    async def csp_violations(self) -> list[str]:
        return list(await self.page.evaluate("window.__cspViolations"))

    def csp_errors(self) -> list[str]:
        return [text for text in self.console_errors if "Content Security Policy" in text]


@pytest.fixture
async def browser(chromium: Path, served: Served) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # --no-sandbox: as root in CI; --disable-dev-shm-usage: a container's /dev/shm can
        # be 64 MB, too small for chromium's shared memory (it crashes); /tmp is used instead.
        launched = await playwright.chromium.launch(
            executable_path=str(chromium), args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            context = await launched.new_context()
            browser = Browser(context, await context.new_page(), served.url)
            await browser.start()
            yield browser
            assert browser.outside == [], "requests beyond loopback"
            assert await browser.csp_violations() == []
            assert browser.csp_errors() == []
        finally:
            await launched.close()


async def test_graphiql_runs_a_query_and_shows_the_docs_once_a_key_is_typed_in(
    browser: Browser, served: Served
) -> None:
    page = browser.page
    secret = served.secret()
    # given the page, opened with the walk-through's operations in its tabs
    await page.goto(f"{served.url}/graphql")
    await page.wait_for_selector(".graphiql-container", timeout=TIMEOUT_MS)
    names = [query.split("(")[0].split("{")[0].split()[-1] for query in WALKTHROUGH]
    tabs = page.locator(".graphiql-tab")
    await tabs.nth(len(names) - 1).wait_for(timeout=TIMEOUT_MS)
    assert [name.strip() for name in await tabs.all_inner_texts()] == names
    # and the Headers panel open, saying where the key goes
    headers = page.locator(".graphiql-editor-tool .graphiql-editor").last
    assert '"Authorization": "Bearer sk_live_..."' in await headers.inner_text()

    # when the key is typed into the Headers panel, and the first tab's operation run
    await headers.click()
    await page.keyboard.press("Control+A")
    await page.keyboard.type(json.dumps({"Authorization": f"Bearer {secret}"}))
    async with page.expect_response(
        lambda r: r.request.method == "POST" and "ListConsumers" in (r.request.post_data or "")
    ) as answer:
        await page.locator("button.graphiql-execute-button").click()
    assert (await answer.value).status == 200

    # then the result is shown
    response = page.locator(".graphiql-response")
    await response.get_by_text('"totalCount"').wait_for(timeout=TIMEOUT_MS)
    result = json.loads((await response.inner_text()).replace("\xa0", " "))
    assert result["data"]["consumers"] == {
        "totalCount": 0, "pageInfo": {"hasNextPage": False, "endCursor": None}, "nodes": []}

    # and another walk-through tab takes the key without it being typed again
    await tabs.nth(names.index("Search")).click()
    assert secret in await headers.inner_text()
    await page.wait_for_timeout(1_000)  # GraphiQL takes the new tab's operation name (100 ms)
    async with page.expect_response(
        lambda r: r.request.method == "POST" and "query Search" in (r.request.post_data or "")
    ) as answer:
        await page.locator("button.graphiql-execute-button").click()
    searched = await answer.value
    assert searched.status == 200, (searched.request.post_data, await searched.text())
    await response.get_by_text('"searchConsumers"').wait_for(timeout=TIMEOUT_MS)

    # and the docs show the schema, fetched again with the key (no manual re-fetch)
    await page.get_by_label("Show Documentation Explorer").click()
    docs = page.locator(".graphiql-doc-explorer")
    await docs.get_by_text("Root Types").wait_for(timeout=TIMEOUT_MS)
    await docs.get_by_role("link", name="Query", exact=True).first.click()
    await docs.get_by_text("searchConsumers").first.wait_for(timeout=TIMEOUT_MS)

    # and the key was kept in the page only, never in the browser's storage
    stored = await page.evaluate(
        "JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])")
    assert secret not in stored
    assert "graphiql:tabState" in stored and "query Search" in stored  # history was kept


async def test_swagger_ui_lists_the_operations_offline(browser: Browser, served: Served) -> None:
    page = browser.page
    await page.goto(f"{served.url}/docs")
    operations = page.locator(".opblock-summary-path")
    await operations.first.wait_for(timeout=TIMEOUT_MS)
    assert "/api/v1/consumers" in await operations.all_inner_texts()



async def test_graphiql_runs_a_subscription_over_the_websocket(
    browser: Browser, served: Served
) -> None:
    page = browser.page
    secret = served.secret()
    await page.goto(f"{served.url}/graphql")
    await page.wait_for_selector(".graphiql-container", timeout=TIMEOUT_MS)
    # given the key typed into the Headers panel and a subscription in the editor
    headers = page.locator(".graphiql-editor-tool .graphiql-editor").last
    await headers.click()
    await page.keyboard.press("Control+A")
    await page.keyboard.type(json.dumps({"Authorization": f"Bearer {secret}"}))
    await page.locator(".graphiql-query-editor .CodeMirror").first.click()
    await page.keyboard.press("Control+A")
    await page.keyboard.insert_text(
        "subscription Live { events(types: [CONSUMER_CREATED]) { type subjectId } }")
    await page.wait_for_timeout(1_000)  # GraphiQL takes the operation's name (100 ms)
    # when it runs (over a WebSocket: the page's CSP allows it) and a write comes in
    async with page.expect_websocket(timeout=TIMEOUT_MS) as opened:
        await page.locator("button.graphiql-execute-button").click()
    socket = await opened.value
    frames: list[str] = []
    socket.on("framesent", lambda payload: frames.append(f"> {payload}"))
    socket.on("framereceived", lambda payload: frames.append(f"< {payload}"))
    socket.on("close", lambda *_: frames.append("closed"))
    assert socket.url == served.url.replace("http://", "ws://") + "/graphql"
    await page.wait_for_timeout(1_000)  # subscribed
    created = served.post("/graphql", headers={"Authorization": f"Bearer {secret}"}, json={
        "query": 'mutation { consumerCreate(input: {email: "live@example.com"}) '
                 "{ consumer { id } } }"}).json()
    consumer_id = created["data"]["consumerCreate"]["consumer"]["id"]
    # then the event shows in the result pane
    response = page.locator(".graphiql-response")
    try:
        await response.get_by_text(consumer_id).wait_for(timeout=TIMEOUT_MS)
    except Exception as error:  # what the socket carried, and what the page shows
        raise AssertionError((frames, await response.inner_text(),
                              browser.console_errors)) from error
    assert "CONSUMER_CREATED" in await response.inner_text()
