"""The browser pages' scripts, served from this machine: GraphiQL (at /graphql) and Swagger UI
(at /docs), so that they work behind a firewall and under a CSP of 'self'.

Swagger UI comes installed, inside the `fastapi-offline` package (the same swagger-ui-dist 5
files FastAPI's page takes from a CDN). No Python package ships
GraphiQL's build, so `consumers-graphql assets fetch` takes the pinned `graphiql`, `react`,
`react-dom` and `graphql-ws` (subscriptions) tarballs from the npm registry, checks each
against the sha512 pinned here, and keeps only the files the page loads, in
`CONSUMERS_UI_ASSETS_DIR`. Until then GraphiQL loads the same files from unpkg, pinned by
Subresource Integrity (`CONSUMERS_UI_ASSETS` decides).

GraphiQL stays on 4.x, the last major version with a UMD build: 5.x is ES modules only (Monaco
and its workers), which a page without a bundler cannot load from one folder. React 18.3 is the
last React with UMD builds, and GraphiQL 4 supports it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from consumers_graphql.settings import Settings, UiAssets

NPM_REGISTRY = "https://registry.npmjs.org"
CDN = "https://unpkg.com"
GRAPHIQL_ASSETS_PATH = "/graphiql/assets"
DOCS_ASSETS_PATH = "/docs/assets"
FETCH_COMMAND = "consumers-graphql assets fetch"


@dataclass(frozen=True)
class Asset:
    """One file of an npm package that the GraphiQL page loads, with its SRI hash (for the
    CDN's copy; the local one was checked as part of its tarball)."""

    path: str  # inside the package
    sri: str


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    assets: tuple[Asset, ...]

    @property
    def folder(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball_url(self) -> str:
        return f"{NPM_REGISTRY}/{self.name}/-/{self.name}-{self.version}.tgz"


REACT = NpmPackage(
    "react", "18.3.1",
    "sha512-wS+hAgJShR0KhEvPJArfuPVN1+Hz1t0Y6n5jLrGQbkb4urgPE/0Rve+1kMB1v/oWgHgm4WIcV+i7F2pTVj+2iQ==",
    (Asset("umd/react.production.min.js",
           "sha384-DGyLxAyjq0f9SPpVevD6IgztCFlnMF6oW/XQGmfe+IsZ8TqEiDrcHkMLKI6fiB/Z"),),
)
REACT_DOM = NpmPackage(
    "react-dom", "18.3.1",
    "sha512-5m4nQKp+rZRb09LNH59GM4BxTh9251/ylbKIbpe7TpGxfJ+9kv6BLkLBXIjjspbgbnIBNqlI23tRnTWT0snUIw==",
    (Asset("umd/react-dom.production.min.js",
           "sha384-gTGxhz21lVGYNMcdJOyq01Edg0jhn/c22nsx0kyqP0TxaV5WVdsSH1fSDUf5YJj1"),),
)
GRAPHIQL = NpmPackage(
    "graphiql", "4.1.2",
    "sha512-rNlzQIAzm6i2KBXmVQWBgLvt0TloxFVB2d18bukvdsvjEuFDHsKx5IVOomL1W1o5WW+tE54+ioHb2AEKzO2cUg==",
    (Asset("graphiql.min.js",
           "sha384-9XdHu7ajgGJziD4J1zNBKQ842Q/+zZfDv+ib1eMhZWBH6hPAs806x+Jbcf0yNO6B"),
     Asset("graphiql.min.css",
           "sha384-1el1QShFBnnXTx9x/Cprg82hZWKt0ry29OAYIXt05swbi0KcZDFoj0CWguMpopJr")),
)
# The graphql-transport-ws client GraphiQL's fetcher runs subscriptions with (its UMD build
# sets `window.graphqlWs`; the page gives GraphiQL a client of it, api/websocket.py).
GRAPHQL_WS = NpmPackage(
    "graphql-ws", "6.4.2",
    "sha512-wxhPhhOGJo8PbGDkBYVE76sZLDrS+GkyrR4bZECSLVbo0pZZNKs0HtBh2Ip/uaUuiVUxwO9ssI9R92buQfNSqQ==",
    (Asset("umd/graphql-ws.min.js",
           "sha384-mxvR4Mzbsb6QVx/9xI2gtQikQA6m8zMDBFnu3l//4/ROsWt7y2sUGWd+/tYQqDm7"),),
)
PACKAGES = (REACT, REACT_DOM, GRAPHIQL, GRAPHQL_WS)


class AssetsMissing(Exception):
    """CONSUMERS_UI_ASSETS=local, and GraphiQL's files are not in the folder."""


class FetchFailed(Exception):
    pass


def default_dir() -> Path:
    """A per-user data folder (XDG), never inside a checkout."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "consumers-graphql" / "ui-assets"


def assets_dir(settings: Settings) -> Path:
    return settings.ui_assets_dir if settings.ui_assets_dir is not None else default_dir()


def missing(directory: Path) -> list[str]:
    """The files GraphiQL's page needs that are not in ``directory``."""
    return [f"{package.folder}/{asset.path}" for package in PACKAGES for asset in package.assets
            if not (directory / package.folder / asset.path).is_file()]


def graphiql_mode(settings: Settings) -> UiAssets:
    """Where the GraphiQL page loads its scripts from: as set, else local once fetched."""
    if settings.ui_assets is not None:
        return settings.ui_assets
    return UiAssets.CDN if missing(assets_dir(settings)) else UiAssets.LOCAL


def check(settings: Settings) -> str | None:
    """A configuration problem to report before serving, None when there is none."""
    if settings.is_production or settings.ui_assets is not UiAssets.LOCAL:
        return None
    directory = assets_dir(settings)
    absent = missing(directory)
    if not absent:
        return None
    return (f"CONSUMERS_UI_ASSETS=local, but GraphiQL's files are not in {directory} "
            f"({len(absent)} missing, e.g. {absent[0]}): run `{FETCH_COMMAND}` (with the same "
            "CONSUMERS_UI_ASSETS_DIR), or set CONSUMERS_UI_ASSETS=cdn.")


def notice(settings: Settings) -> str | None:
    """The one line `serve` prints when GraphiQL falls back to the CDN by default."""
    if settings.is_production or settings.ui_assets is not None:
        return None
    if graphiql_mode(settings) is UiAssets.LOCAL:
        return None
    return (f"GraphiQL loads its scripts from {CDN}; to serve them from here (offline, "
            f"CSP 'self'), run `{FETCH_COMMAND}` once.")


def graphiql_urls(mode: UiAssets) -> dict[str, tuple[str, str | None]]:
    """Each asset's URL and its SRI hash (None for our own copy), by file name."""
    urls: dict[str, tuple[str, str | None]] = {}
    for package in PACKAGES:
        for asset in package.assets:
            name = asset.path.rsplit("/", 1)[-1]
            if mode is UiAssets.LOCAL:
                urls[name] = (f"{GRAPHIQL_ASSETS_PATH}/{package.folder}/{asset.path}", None)
            else:
                urls[name] = (f"{CDN}/{package.folder}/{asset.path}", asset.sri)
    return urls


def docs_static_dir() -> Path:
    """Swagger UI's files, as fastapi-offline installs them."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def integrity(data: bytes, algorithm: str = "sha512") -> str:
    digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm}-{base64.b64encode(digest).decode()}"


def fetch(directory: Path, *, registry: str = NPM_REGISTRY, timeout_s: float = 60) -> list[str]:
    """Download, verify and unpack every pinned package into ``directory``; the folders
    written. A package whose files are all there already is left alone."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for package in PACKAGES:
        target = directory / package.folder
        if all((target / asset.path).is_file() for asset in package.assets):
            continue
        url = package.tarball_url.replace(NPM_REGISTRY, registry.rstrip("/"), 1)
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                data = response.read()
        except OSError as error:
            raise FetchFailed(f"Could not download {url}: {error}") from error
        found = integrity(data)
        if found != package.integrity:
            raise FetchFailed(f"{url} is not the pinned {package.folder}: its integrity is "
                              f"{found}, expected {package.integrity}. Nothing was written.")
        _unpack(data, package, target)
        written.append(package.folder)
    return written


def _unpack(data: bytes, package: NpmPackage, target: Path) -> None:
    """Only the listed files, written under a temporary name and moved into place whole."""
    staging = Path(tempfile.mkdtemp(prefix=f".{package.folder}.", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for asset in package.assets:
                member = archive.extractfile(f"package/{asset.path}")
                if member is None:
                    raise FetchFailed(f"{package.folder} has no file {asset.path}.")
                destination = staging / asset.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(member.read())
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
