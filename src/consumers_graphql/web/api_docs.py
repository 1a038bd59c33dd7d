"""The browser pages outside production, every file they load served from here: GraphiQL's
scripts at /graphiql/assets (once fetched), Swagger UI at /docs with its installed files at
/docs/assets; each page with a CSP naming exactly what it loads.

No /redoc: ReDoc's bundle always loads Redocly's logo from its CDN (no option turns it off),
which a page of 'self' only cannot allow; /docs and /openapi.json cover the same ground."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from consumers_graphql.settings import Settings, UiAssets
from consumers_graphql.web import graphiql, ui_assets
from consumers_graphql.web.security_headers import page_policy


class _Assets(StaticFiles):
    """Static files that may be cached: for a year under a versioned folder, else checked
    again (ETag) on every use."""

    def __init__(self, directory: Path, *, immutable: bool) -> None:
        super().__init__(directory=directory)
        self._cache_control = "public, max-age=31536000, immutable" if immutable else "no-cache"

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result,
                      scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = self._cache_control
        return response


def graphiql_page(app: FastAPI, settings: Settings) -> str:
    """The GraphiQL page's HTML, its files mounted when they are served from here;
    ui_assets.AssetsMissing when they should be and are not."""
    problem = ui_assets.check(settings)
    if problem is not None:
        raise ui_assets.AssetsMissing(problem)
    mode = ui_assets.graphiql_mode(settings)
    if mode is UiAssets.LOCAL:
        app.mount(ui_assets.GRAPHIQL_ASSETS_PATH,
                  _Assets(ui_assets.assets_dir(settings), immutable=True), name="graphiql-assets")
    return graphiql.page(mode)


def install_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) over /openapi.json, from installed files."""
    assets = ui_assets.DOCS_ASSETS_PATH
    app.mount(assets, _Assets(ui_assets.docs_static_dir(), immutable=False), name="docs-assets")
    title = app.title
    swagger = _with_policy(get_swagger_ui_html(
        openapi_url="/openapi.json",
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        oauth2_redirect_url=None,
        # Swagger UI would send the document to validator.swagger.io for its badge.
        swagger_ui_parameters={"validatorUrl": None},
    ))

    async def docs(request: Request) -> Response:
        return HTMLResponse(*swagger)

    app.add_route("/docs", docs, include_in_schema=False)


def _with_policy(page: HTMLResponse) -> tuple[str, int, dict[str, str]]:
    """A page's body, status and headers (a new response for each request: middleware adds
    headers to the one it sends)."""
    body = bytes(page.body).decode()
    return body, 200, {"Content-Security-Policy": page_policy(body)}
