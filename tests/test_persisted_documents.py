"""Automatic persisted queries (Apollo's protocol) and trusted documents, over POST and GET:
the APQ round trip (not found, register, hash alone), a hash that is not its query's, the
GET caching headers, trusted-only mode with a manifest made by the real relay-compiler
(tests/relay) and with an Apollo manifest, an Idempotency-Key replay by documentId, and
`consumers-graphql documents check`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from consumers_graphql.cli import main as cli
from consumers_graphql.settings import Settings
from consumers_graphql.web.app import create_app
from tests.conftest import bearer, on_path, project_root
from tests.log_audit import asgi_client

QUERY = "query Count { consumers(first: 5) { totalCount nodes { email } } }"
CREATE = """mutation Create($input: ConsumerCreateInput!) {
  consumerCreate(input: $input) { consumer { email } userErrors { code } } }"""
NOT_FOUND = {"errors": [{"message": "PersistedQueryNotFound",
                         "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"}}]}
RELAY = project_root() / "tests" / "relay"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def apq(text: str, version: int = 1) -> dict[str, Any]:
    return {"persistedQuery": {"version": version, "sha256Hash": sha256(text)}}


def get_params(**values: Any) -> dict[str, str]:
    return {name: value if isinstance(value, str) else json.dumps(value)
            for name, value in values.items()}


def codes(body: dict[str, Any]) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors", [])]


async def consumers(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    response = await client.post("/graphql", json={"query": QUERY}, headers=headers)
    return [node["email"] for node in response.json()["data"]["consumers"]["nodes"]]


# ------------------------------------------------------------------------------------ APQ


def unique(name: str) -> str:
    """QUERY under another name: a document no other test registered (the process's cache
    outlives tests)."""
    return QUERY.replace("query Count", f"query {name.replace('-', '_')}")


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_apq_round_trip_not_found_then_registered_then_by_hash_alone(
    client: httpx.AsyncClient, auth_headers: dict[str, str], method: str, execution_path: str
) -> None:
    text = unique(f"Count{method}{execution_path}")

    async def send(**payload: Any) -> httpx.Response:
        if method == "POST":
            return await client.post("/graphql", json=payload, headers=auth_headers)
        return await client.get("/graphql", params=get_params(**payload),
                                headers=auth_headers)

    # when the hash alone is sent first
    missing = await send(extensions=apq(text))
    # then Apollo's answer: 200 (a 4xx would turn Apollo Client's APQ off), not to be kept
    assert missing.status_code == 200, missing.text
    assert missing.json() == NOT_FOUND
    assert missing.headers["cache-control"] == "private, no-cache, must-revalidate"
    # when the hash comes with its document, it runs and is registered
    registered = await send(query=text, extensions=apq(text))
    assert registered.status_code == 200, registered.text
    assert registered.json().get("data") == {
        "consumers": {"totalCount": 0, "nodes": []}}, registered.text
    # then the hash alone runs it, and sees new data
    await client.post("/graphql", json={"query": CREATE,
                                        "variables": {"input": {"email": "a@example.com"}}},
                      headers=auth_headers)
    again = await send(extensions=apq(text))
    assert again.status_code == 200, again.text
    assert again.json()["data"]["consumers"] == {
        "totalCount": 1, "nodes": [{"email": "a@example.com"}]}
    # and an answer that is personal data is still not kept by default
    assert again.headers["cache-control"] == "no-store"


async def test_a_hash_that_is_not_its_querys_is_refused_and_not_registered(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str
) -> None:
    text = unique(f"Mismatch{execution_path}")
    wrong = {"persistedQuery": {"version": 1, "sha256Hash": sha256(QUERY + " ")}}
    # when
    response = await client.post("/graphql", json={"query": text, "extensions": wrong},
                                 headers=auth_headers)
    # then
    assert response.status_code == 400, response.text
    assert codes(response.json()) == ["PERSISTED_QUERY_HASH_MISMATCH"]
    assert "not the SHA-256" in response.json()["errors"][0]["message"]
    # and the hash names no document
    by_hash = await client.post("/graphql", json={"extensions": wrong}, headers=auth_headers)
    assert by_hash.json() == NOT_FOUND


@pytest.mark.usefixtures("execution_path")
async def test_a_query_that_is_not_unicode_text_has_no_hash_to_match(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # JSON may carry a lone surrogate ("\\ud800"), which has no UTF-8 and so no SHA-256
    hashed = sha256("{ __typename } #")
    body = ('{"query": "{ __typename } #\\ud800", "extensions": {"persistedQuery": '
            f'{{"version": 1, "sha256Hash": "{hashed}"}}}}}}')
    response = await client.post("/graphql", content=body.encode(), headers={
        **auth_headers, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert codes(response.json()) == ["BAD_REQUEST"]
    assert "not Unicode text" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize("document", ["query Invalid{n} {{ consumers {{ nope }} }}",
                                      "query Unparsable{n} {{ consumers("])
async def test_a_document_that_does_not_validate_is_not_registered(
    client: httpx.AsyncClient, auth_headers: dict[str, str], execution_path: str, document: str
) -> None:
    text = document.format(n=execution_path.replace("-", "_"))
    # when a document that cannot run is sent with its hash
    refused = await client.post("/graphql", json={"query": text, "extensions": apq(text)},
                                headers=auth_headers)
    assert codes(refused.json())[0] in {"GRAPHQL_VALIDATION_FAILED", "GRAPHQL_PARSE_FAILED"}
    # then it was not registered (as Apollo Server: a bad document would only fill the LRU)
    by_hash = await client.post("/graphql", json={"extensions": apq(text)},
                                headers=auth_headers)
    assert by_hash.json() == NOT_FOUND, by_hash.text


@pytest.mark.usefixtures("execution_path")
async def test_an_unsupported_version_or_a_malformed_extension_is_refused(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    response = await client.post("/graphql", json={"query": QUERY, "extensions": apq(QUERY, 2)},
                                 headers=auth_headers)
    assert response.status_code == 400
    assert codes(response.json()) == ["PERSISTED_QUERY_NOT_SUPPORTED"]
    assert "version 2" in response.json()["errors"][0]["message"]
    # and a version that is not a number is not echoed whole
    response = await client.post("/graphql", json={"extensions": {"persistedQuery": {
        "version": "9" * 100_000, "sha256Hash": sha256(QUERY)}}}, headers=auth_headers)
    assert codes(response.json()) == ["PERSISTED_QUERY_NOT_SUPPORTED"]
    assert len(response.content) < 1_000
    response = await client.post("/graphql", json={"extensions": {"persistedQuery": "abc"}},
                                 headers=auth_headers)
    assert response.status_code == 400
    assert codes(response.json()) == ["BAD_REQUEST"]


@pytest.mark.usefixtures("execution_path")
async def test_a_mutation_by_hash_is_never_run_over_get(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    variables = {"input": {"email": "get@example.com"}}
    registered = await client.post("/graphql", json={
        "query": CREATE, "variables": variables, "extensions": apq(CREATE)},
        headers=auth_headers)
    assert registered.json()["data"]["consumerCreate"]["userErrors"] == []
    # when the registered mutation is asked for over GET
    response = await client.get("/graphql", params=get_params(
        extensions=apq(CREATE), variables={"input": {"email": "get2@example.com"}}),
        headers=auth_headers)
    # then
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert await consumers(client, auth_headers) == ["get@example.com"]


@pytest.mark.usefixtures("execution_path")
async def test_a_get_by_hash_without_accept_is_an_operation_not_the_graphiql_page(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # curl sends Accept: */*, which also asks for the page when no operation is named
    response = await client.get("/graphql", params=get_params(extensions=apq("{ x }")),
                                headers={**auth_headers, "Accept": "*/*"})
    assert response.json() == NOT_FOUND


# ------------------------------------------------------------------- trusted documents


@pytest.fixture(scope="module")
def relay_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """persisted_queries.json as the real relay-compiler writes it for tests/relay's
    documents: compiled in a copy of the project, so that runs side by side (SQLite and
    PostgreSQL) never share its output."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("the Relay manifest is made by relay-compiler, which needs Node.js and "
                    "npm on PATH (not found)")
    compiler = RELAY / "node_modules" / ".bin" / "relay-compiler"
    if not compiler.exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=RELAY, check=True,
                       capture_output=True, timeout=600)
    project = tmp_path_factory.mktemp("relay")
    shutil.copytree(RELAY / "src", project / "src",
                    ignore=shutil.ignore_patterns("__generated__"))
    config = json.loads((RELAY / "relay.config.json").read_text())
    config["schema"] = str(project_root() / "schema.graphql")
    (project / "relay.config.json").write_text(json.dumps(config))
    manifest = project / config["persistConfig"]["file"]
    manifest.write_text("{}\n")  # relay-compiler wants the file before it writes it
    done = subprocess.run([str(compiler)], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return manifest


def relay_document(manifest: Path, name: str) -> tuple[str, str]:
    """The id and text of the manifest's operation `name`."""
    documents: dict[str, str] = json.loads(manifest.read_text())
    found = [(document_id, text) for document_id, text in documents.items()
             if f" {name}(" in text or f" {name} " in text]
    assert len(found) == 1, documents
    return found[0]


@pytest.fixture
def apollo_manifest(tmp_path: Path) -> Path:
    operations = [{"id": sha256(text), "name": name, "type": kind, "body": text}
                  for name, kind, text in (("Count", "query", QUERY),
                                           ("Create", "mutation", CREATE))]
    path = tmp_path / "persisted-query-manifest.json"
    path.write_text(json.dumps({"format": "apollo-persisted-query-manifest", "version": 1,
                                "operations": operations}))
    return path


@pytest.fixture
async def trusted_app(
    request: pytest.FixtureRequest, settings: Settings, app: FastAPI, execution_path: str
) -> AsyncIterator[FastAPI]:
    """An app on the test database with a manifest (the fixture named by the test's
    `manifest` parameter), trusted documents only."""
    manifest: Path = request.getfixturevalue(request.param)
    trusted = create_app(settings.model_copy(update={
        "trusted_documents": manifest, "trusted_documents_only": True}))
    async with LifespanManager(trusted):
        on_path(trusted, execution_path)
        yield trusted


@pytest.fixture
async def trusted(trusted_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(trusted_app) as client:
        yield client


@pytest.mark.parametrize("trusted_app", ["relay_manifest"], indirect=True)
async def test_trusted_only_with_relay_compilers_manifest(
    trusted: httpx.AsyncClient, auth_headers: dict[str, str], relay_manifest: Path
) -> None:
    list_id, list_text = relay_document(relay_manifest, "ConsumerListQuery")
    create_id, _ = relay_document(relay_manifest, "ConsumerCreateMutation")
    # when the mutation runs by Relay's doc_id
    created = await trusted.post("/graphql", json={
        "doc_id": create_id, "variables": {"input": {"email": "relay@example.com"}}},
        headers=auth_headers)
    # then
    assert created.status_code == 200, created.text
    assert created.json()["data"]["consumerCreate"]["userErrors"] == []
    # and the query runs by documentId, over POST and GET, by Relay's doc_id too
    variables = {"first": 10}
    answers = [
        await trusted.post("/graphql", json={"documentId": list_id, "variables": variables},
                           headers=auth_headers),
        await trusted.get("/graphql", params=get_params(documentId=list_id,
                                                        variables=variables),
                          headers=auth_headers),
        await trusted.get("/graphql", params=get_params(doc_id=list_id, variables=variables),
                          headers=auth_headers),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        page = answer.json()["data"]["consumers"]
        assert page["totalCount"] == 1
        assert page["edges"][0]["node"]["email"] == "relay@example.com"
    # and the mutation is never run over GET, named by its id either
    over_get = await trusted.get("/graphql", params=get_params(
        documentId=create_id, variables={"input": {"email": "get@example.com"}}),
        headers=auth_headers)
    assert over_get.status_code == 405
    # and relay-compiler's SHA-256 ids work as APQ hashes too
    assert list_id == sha256(list_text)
    by_hash = await trusted.post("/graphql", json={"extensions": apq(list_text),
                                                   "variables": variables},
                                 headers=auth_headers)
    assert by_hash.json()["data"]["consumers"]["totalCount"] == 1


@pytest.mark.parametrize("trusted_app", ["relay_manifest", "apollo_manifest"], indirect=True)
async def test_trusted_only_refuses_every_other_document(
    trusted: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    other = "query Other { consumers(first: 1) { totalCount } }"
    variables = {"input": {"email": "refused@example.com"}}
    refusals = [
        # a query's text, a mutation's text, an APQ registration
        await trusted.post("/graphql", json={"query": other}, headers=auth_headers),
        await trusted.get("/graphql", params={"query": other}, headers=auth_headers),
        await trusted.post("/graphql", json={"query": CREATE + " ", "variables": variables},
                           headers=auth_headers),
        await trusted.post("/graphql", json={"query": other, "extensions": apq(other)},
                           headers=auth_headers),
    ]
    for response in refusals:
        assert response.status_code == 400, response.text
        assert codes(response.json()) == ["PERSISTED_QUERY_REQUIRED"]
    # and an unknown id is named as such
    unknown = await trusted.post("/graphql", json={"documentId": "nope"}, headers=auth_headers)
    assert unknown.status_code == 404
    assert codes(unknown.json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    # and an APQ hash outside the manifest is not found (nothing can register it)
    assert (await trusted.post("/graphql", json={"extensions": apq(other)},
                               headers=auth_headers)).json() == NOT_FOUND
    # nothing was written
    assert await consumers_of(trusted, auth_headers) == 0


async def consumers_of(client: httpx.AsyncClient, headers: dict[str, str]) -> int:
    response = await client.get("/api/v1/consumers", headers=headers)
    assert response.status_code == 200, response.text
    return len(response.json()["data"])


@pytest.mark.parametrize("trusted_app", ["apollo_manifest"], indirect=True)
async def test_apollo_manifest_ids_run_by_documentid_and_as_apq_hashes(
    trusted: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    # Apollo Client's usePersistedQueries sends the manifest's id as the APQ hash.
    created = await trusted.post("/graphql", json={
        "extensions": apq(CREATE), "variables": {"input": {"email": "apollo@example.com"}}},
        headers=auth_headers)
    assert created.json()["data"]["consumerCreate"]["userErrors"] == []
    # and by documentId, with the GraphQL over HTTP draft's `sha256:` prefix too
    for document_id in (sha256(QUERY), f"sha256:{sha256(QUERY)}"):
        response = await trusted.post("/graphql", json={"documentId": document_id},
                                      headers=auth_headers)
        assert response.status_code == 200, response.text
        assert response.json()["data"]["consumers"]["nodes"] == [{"email": "apollo@example.com"}]
    # and a null `documentId` (a client filling both names) leaves Relay's `doc_id` in charge
    response = await trusted.post("/graphql", json={"documentId": None, "doc_id": sha256(QUERY)},
                                  headers=auth_headers)
    assert response.status_code == 200, response.text
    # a request naming a document and sending one too is ambiguous
    both = await trusted.post("/graphql", json={"documentId": sha256(QUERY), "query": QUERY},
                              headers=auth_headers)
    assert both.status_code == 400
    assert codes(both.json()) == ["BAD_REQUEST"]


@pytest.mark.parametrize("trusted_app", ["apollo_manifest"], indirect=True)
async def test_a_trusted_document_is_parsed_and_validated_once(
    trusted: httpx.AsyncClient, trusted_app: FastAPI, auth_headers: dict[str, str]
) -> None:
    # given a document whose text no other request has sent in this process
    from consumers_graphql.api.limits import DOCUMENTS

    pinned = trusted_app.state.documents.trusted[sha256(QUERY)]
    parses, validations = DOCUMENTS.parses, DOCUMENTS.validations
    # when it runs three times by id, the document cache emptied before each but the first
    for run in range(3):
        if run:
            DOCUMENTS.clear()  # (as the LRU evicting it would: the pinned copy is not in it)
        response = await trusted.post("/graphql", json={"documentId": sha256(QUERY)},
                                      headers=auth_headers)
        assert response.json()["data"]["consumers"]["totalCount"] == 0
    # then it was parsed and validated once, on its first use, for good
    assert DOCUMENTS.parses - parses == 1
    assert DOCUMENTS.validations - validations == 1
    assert pinned.prepared is not None


@pytest.mark.parametrize("trusted_app", ["apollo_manifest"], indirect=True)
async def test_a_keyed_mutation_by_documentid_replays_as_the_same_request(
    trusted: httpx.AsyncClient, app: FastAPI, client: httpx.AsyncClient,
    auth_headers: dict[str, str]
) -> None:
    variables = {"input": {"email": "once@example.com"}}
    headers = {**auth_headers, "Idempotency-Key": "by-document-id"}
    body = {"documentId": sha256(CREATE), "variables": variables}
    # when the keyed mutation is sent twice by id
    first = await trusted.post("/graphql", json=body, headers=headers)
    second = await trusted.post("/graphql", json=body, headers=headers)
    # then the second is the first's replay, and one consumer was created
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    assert second.headers.get("idempotent-replayed") == "true"
    assert second.content == first.content
    # and the same document sent as its text (by an app without trusted-only mode) is the
    # same request: replayed too, not IDEMPOTENCY_KEY_REUSED
    as_text = await client.post("/graphql", json={"query": CREATE, "variables": variables},
                                headers=headers)
    assert as_text.headers.get("idempotent-replayed") == "true", as_text.text
    assert as_text.content == first.content
    # while another document under the key is another request
    other = await trusted.post("/graphql", json={**body, "variables": {
        "input": {"email": "twice@example.com"}}}, headers=headers)
    assert other.status_code == 422
    assert await consumers_of(trusted, auth_headers) == 1


async def test_get_by_hash_or_id_may_be_kept_privately_when_configured(
    settings: Settings, app: FastAPI, api_key: str, execution_path: str, apollo_manifest: Path
) -> None:
    cached = create_app(settings.model_copy(update={"persisted_query_max_age_s": 30,
                                                    "trusted_documents": apollo_manifest}))
    async with LifespanManager(cached), asgi_client(cached) as client:
        on_path(cached, execution_path)
        headers = bearer(api_key)
        text = unique(f"Cached{execution_path}")
        params = get_params(extensions=apq(text))
        registered = await client.get("/graphql", params=get_params(query=text,
                                                                    extensions=apq(text)),
                                      headers=headers)
        assert registered.status_code == 200
        # when the hash alone, or a trusted document's id, is sent over GET
        for response in (
            await client.get("/graphql", params=params, headers=headers),
            await client.get("/graphql", params={"documentId": sha256(QUERY)},
                             headers=headers),
        ):
            # then a client's own cache may keep it, no shared cache
            assert response.status_code == 200, response.text
            assert "data" in response.json()
            assert response.headers["cache-control"] == "private, max-age=30"
            assert response.headers["vary"] == "Accept, Authorization"
        # but not an answer with errors, a POST, or a text query
        needs_id = f"query NeedsId{execution_path.replace('-', '_')}($id: ID!) {{ " \
            "consumer(id: $id) { email } }"
        await client.get("/graphql", params=get_params(
            query=needs_id, extensions=apq(needs_id), variables={"id": "x"}), headers=headers)
        bad = await client.get("/graphql", params=get_params(extensions=apq(needs_id)),
                               headers=headers)
        assert codes(bad.json()) == ["BAD_USER_INPUT"], bad.text
        posted = await client.post("/graphql", json={"extensions": apq(text)},
                                   headers=headers)
        plain = await client.get("/graphql", params={"query": text}, headers=headers)
        for answer in (posted, plain):
            assert answer.status_code == 200, answer.text
            assert answer.headers["cache-control"] == "no-store"
        assert bad.headers["cache-control"] == "no-store"


async def test_with_apq_off_clients_are_told_to_stop_sending_hashes(
    settings: Settings, app: FastAPI, api_key: str, execution_path: str
) -> None:
    off = create_app(settings.model_copy(update={"persisted_queries_cache_size": 0}))
    async with LifespanManager(off), asgi_client(off) as client:
        on_path(off, execution_path)
        for payload in ({"extensions": apq(QUERY)},
                        {"query": QUERY, "extensions": apq(QUERY)}):
            response = await client.post("/graphql", json=payload, headers=bearer(api_key))
            # then Apollo's answer, on which its clients send the document alone from now on
            assert response.status_code == 200
            assert response.json() == {"errors": [{
                "message": "PersistedQueryNotSupported",
                "extensions": {"code": "PERSISTED_QUERY_NOT_SUPPORTED"}}]}
        # and a plain query runs
        plain = await client.post("/graphql", json={"query": QUERY}, headers=bearer(api_key))
        assert plain.json()["data"]["consumers"]["totalCount"] == 0


# ----------------------------------------------------------------- settings and the CLI


async def test_a_bad_manifest_stops_the_cli_with_its_problem(
    cli_env: None, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = {
        "[]": "must be a JSON object",
        "{": "is not JSON",
        '{"abc": 3}': "entry 'abc'",
        '{"format": "apollo-persisted-query-manifest", "version": 2, "operations": []}':
            "unsupported apollo-persisted-query-manifest version 2",
        '{"format": "apollo-persisted-query-manifest", "version": 1, "operations": '
        '[{"id": "a", "name": "A", "type": "query"}]}': "operations[0] (a) has no `body`",
    }
    # (a path relative to the working directory: a long absolute one, past 80 characters, is
    # left out of the message, and pytest's temporary paths can be that long)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "manifest.json"
    monkeypatch.setenv("CONSUMERS_TRUSTED_DOCUMENTS", path.name)
    for text, message in cases.items():
        path.write_text(text)
        code, _, err = await run_cli(capsys, "export-schema")
        assert code == 2, text
        assert err.startswith(f"Configuration error: CONSUMERS_TRUSTED_DOCUMENTS='{path.name}': "
                              "the manifest"), err
        assert message in err, (text, err)
    path.unlink()
    code, _, err = await run_cli(capsys, "export-schema")
    assert code == 2 and "the manifest does not exist" in err
    monkeypatch.delenv("CONSUMERS_TRUSTED_DOCUMENTS")
    monkeypatch.setenv("CONSUMERS_TRUSTED_DOCUMENTS_ONLY", "true")
    code, _, err = await run_cli(capsys, "export-schema")
    assert code == 2 and "needs a manifest in CONSUMERS_TRUSTED_DOCUMENTS" in err, err


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(cli, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_documents_check_passes_relay_compilers_manifest(
    cli_env: None, capsys: pytest.CaptureFixture[str], relay_manifest: Path
) -> None:
    code, out, err = await run_cli(capsys, "documents", "check", str(relay_manifest))
    assert code == 0, out + err
    assert "All 2 documents validate" in out


async def test_documents_check_names_every_bad_document(
    cli_env: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    manifest = tmp_path / "persisted_queries.json"
    manifest.write_text(json.dumps({
        "good": QUERY,
        "unknown-field": "query A { consumers { nope } }",
        "syntax": "query B { consumers(",
        "too-deep": "query C { consumers { nodes { audiences { nodes { consumers { nodes { "
                    "audiences { nodes { consumers { nodes { audiences { nodes { name "
                    "} } } } } } } } } } } } }",
    }))
    # when
    code, out, err = await run_cli(capsys, "documents", "check", str(manifest))
    # then
    assert code == 1
    lines = out.splitlines()
    assert any(line.startswith("unknown-field: Cannot query field 'nope'") for line in lines)
    assert any(line.startswith("syntax: Syntax Error") for line in lines), out
    assert "too-deep: The operation is 13 levels deep; the limit is 12. " \
        "(MAX_DEPTH_EXCEEDED)" in lines, out
    assert not any(line.startswith("good:") for line in lines)
    assert "3 of 4 documents do not validate" in err
    # and a manifest in neither format
    manifest.write_text("[1]")
    code, _, err = await run_cli(capsys, "documents", "check", str(manifest))
    assert code == 1 and "must be a JSON object" in err
