"""Trusted documents manifests (``CONSUMERS_TRUSTED_DOCUMENTS``), read in either format client
tooling writes: Relay's ``persisted_queries.json`` (``{"<id>": "<document text>"}``, from
relay-compiler's ``persistConfig``) and Apollo's persisted query manifest (``{"format":
"apollo-persisted-query-manifest", "version": 1, "operations": [{"id", "name", "type",
"body"}]}``, from ``@apollo/generate-persisted-query-manifest``).

Only the format is checked here (settings validation, at startup, and ``documents check``):
the documents themselves are validated against the schema on their first use, like any
other, and ``consumers-graphql documents check`` validates them all for a client's CI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

APOLLO_FORMAT = "apollo-persisted-query-manifest"
_OPERATION_TYPES = frozenset({"query", "mutation", "subscription"})


class ManifestError(ValueError):
    """A manifest that cannot be read or is in neither format; the message says which entry."""


def load_manifest(path: Path, name: str | None = None) -> dict[str, str]:
    """The manifest's documents, id to text; `name` is how messages call it (its path)."""
    name = name or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{name} does not exist") from None
    except OSError as error:
        raise ManifestError(f"cannot read {name}: {error.strerror or error}") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{name} is not JSON ({error})") from None
    return parse_manifest(manifest, name)


def parse_manifest(manifest: Any, name: str = "the manifest") -> dict[str, str]:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{name} must be a JSON object: Relay's {{\"<id>\": \"<document>\"}} "
                            f"or Apollo's {{\"format\": \"{APOLLO_FORMAT}\", ...}}")
    if "format" in manifest:
        return _apollo(manifest, name)
    documents: dict[str, str] = {}
    for document_id, text in manifest.items():
        if not document_id or not isinstance(text, str) or not text.strip():
            raise ManifestError(
                f"{name}: entry {document_id!r} is not a document id with its text (Relay's "
                "format maps each id to a GraphQL document string)")
        documents[document_id] = text
    return documents


def _apollo(manifest: dict[str, Any], name: str) -> dict[str, str]:
    if manifest["format"] != APOLLO_FORMAT:
        raise ManifestError(f"{name}: unknown format {manifest['format']!r} (expected "
                            f"{APOLLO_FORMAT!r})")
    if manifest.get("version") != 1:
        raise ManifestError(f"{name}: unsupported {APOLLO_FORMAT} version "
                            f"{manifest.get('version')!r} (this server reads version 1)")
    operations = manifest.get("operations")
    if not isinstance(operations, list):
        raise ManifestError(f"{name}: `operations` must be a list")
    documents: dict[str, str] = {}
    for index, operation in enumerate(operations):
        where = f"{name}: operations[{index}]"
        if not isinstance(operation, dict):
            raise ManifestError(f"{where} must be an object with id, name, type and body")
        document_id, body = operation.get("id"), operation.get("body")
        if not isinstance(document_id, str) or not document_id:
            raise ManifestError(f"{where} has no `id` string")
        if not isinstance(body, str) or not body.strip():
            raise ManifestError(f"{where} ({document_id}) has no `body` string")
        if operation.get("type") not in _OPERATION_TYPES:
            raise ManifestError(f"{where} ({document_id}): `type` must be query, mutation or "
                                "subscription")
        if documents.get(document_id, body) != body:
            raise ManifestError(f"{where}: the id {document_id} is given to two documents")
        documents[document_id] = body
    return documents
