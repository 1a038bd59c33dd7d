"""Which document a request runs: its `query` text, a trusted document named by `documentId`
(or Relay's `doc_id`), or an automatic persisted query (Apollo's protocol,
`extensions.persistedQuery: {version: 1, sha256Hash}`).

APQ: a hash the process does not know answers `PersistedQueryNotFound`
(PERSISTED_QUERY_NOT_FOUND) with HTTP 200 and `Cache-Control: private, no-cache,
must-revalidate`, as Apollo Server does: Apollo's clients then send the hash with the
document, and a 400 or 500 would make Apollo Client turn persisted queries off for good. A
hash with its document is checked (SHA-256 of the text, hex) and, once it has passed parse,
validation and the limits, registered in a bounded LRU kept by each process; then the hash
alone runs it.

Trusted documents (CONSUMERS_TRUSTED_DOCUMENTS) are pinned: prepared once, on first use,
never evicted (api/limits.py PinnedDocument). A trusted document's id also works as an APQ
hash (Apollo Client's persisted query link sends the manifest's ids that way). An id the
manifest does not hold is 404 PERSISTED_QUERY_NOT_FOUND: no client retries on it, the app
and the server's manifest differ. With CONSUMERS_TRUSTED_DOCUMENTS_ONLY every other document
is refused, 400 PERSISTED_QUERY_REQUIRED.

The resolved text is what the rest of the request sees (the mutation-over-GET check, the
Idempotency-Key fingerprint): a document sent as text, by id or by hash is one request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from graphql import GraphQLError, parse, specified_rules, validate

from consumers_graphql.api.limits import Limits, PinnedDocument, measure
from consumers_graphql.documents import load_manifest
from consumers_graphql.settings import Settings

PERSISTED_QUERY_NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"
PERSISTED_QUERY_REQUIRED = "PERSISTED_QUERY_REQUIRED"
PERSISTED_QUERY_HASH_MISMATCH = "PERSISTED_QUERY_HASH_MISMATCH"
PERSISTED_QUERY_NOT_SUPPORTED = "PERSISTED_QUERY_NOT_SUPPORTED"
# The message Apollo's clients and gateways match on.
NOT_FOUND_MESSAGE = "PersistedQueryNotFound"
NOT_SUPPORTED_MESSAGE = "PersistedQueryNotSupported"
BAD_REQUEST = "BAD_REQUEST"
# The GraphQL over HTTP draft's persisted documents appendix prefixes ids with their hash.
_SHA256_PREFIX = "sha256:"


class DocumentRefusal(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


NOT_FOUND_HEADERS = {"Cache-Control": "private, no-cache, must-revalidate"}


@dataclass(frozen=True)
class Resolved:
    """The document to run: its text, the trusted document it is (prepared once), and
    whether it was named rather than sent (a GET of it may be cached: README)."""

    query: str | None
    pinned: PinnedDocument | None = None
    persisted: bool = False
    # The APQ hash to register the text under once it has passed parse, validation and the
    # limits (Documents.register): as Apollo Server, a document that cannot run is not kept.
    registers: str | None = None


class PersistedQueries:
    """The APQ documents a process has been sent: a bounded LRU, by entries and by total
    text (so that registering many large documents cannot grow memory without end)."""

    def __init__(self, max_entries: int, max_chars: int = 16_000_000) -> None:
        self.max_entries, self.max_chars = max_entries, max_chars
        self._entries: OrderedDict[str, str] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def get(self, sha256: str) -> str | None:
        with self._lock:
            text = self._entries.get(sha256)
            if text is not None:
                self._entries.move_to_end(sha256)
            return text

    def put(self, sha256: str, text: str) -> None:
        if self.max_entries == 0 or len(text) > self.max_chars:
            return
        with self._lock:
            if sha256 in self._entries:
                self._entries.move_to_end(sha256)
                return
            self._entries[sha256] = text
            self._chars += len(text)
            while len(self._entries) > self.max_entries or self._chars > self.max_chars:
                _, old = self._entries.popitem(last=False)
                self._chars -= len(old)

    def __len__(self) -> int:
        return len(self._entries)


class Documents:
    """The app's persisted documents: the trusted manifest (if any) and the APQ cache."""

    def __init__(self, settings: Settings) -> None:
        manifest = (load_manifest(settings.trusted_documents)
                    if settings.trusted_documents is not None else {})
        self.trusted = {document_id: PinnedDocument(text)
                        for document_id, text in manifest.items()}
        self.trusted_only = settings.trusted_documents_only
        self.apq = PersistedQueries(settings.persisted_queries_cache_size)

    def resolve(self, data: dict[str, Any], query: str | None,
                extensions: dict[str, Any] | None) -> Resolved:
        """The document of a request whose JSON is `data`; DocumentRefusal for a request
        that names none this server can run."""
        document_id = data.get("documentId")
        if document_id is None:  # (null as well as absent: a client may fill in both names)
            document_id = data.get("doc_id")
        if document_id is not None:
            return self._by_id(document_id, query)
        persisted = extensions.get("persistedQuery") if extensions is not None else None
        if persisted is not None:
            return self._by_hash(persisted, query)
        if self.trusted_only:
            raise DocumentRefusal(
                400, PERSISTED_QUERY_REQUIRED,
                "This server runs trusted documents only: send `documentId` (or `doc_id`) "
                "with the id of a document of its manifest, not the `query` text.")
        return Resolved(query)

    def _by_id(self, document_id: Any, query: str | None) -> Resolved:
        if not isinstance(document_id, str) or not document_id:
            raise DocumentRefusal(400, BAD_REQUEST,
                                  "`documentId` (or `doc_id`) must be a non-empty string.")
        if query is not None:
            raise DocumentRefusal(400, BAD_REQUEST,
                                  "Send `documentId` (or `doc_id`) or `query`, not both.")
        pinned = self._trusted(document_id)
        if pinned is None:
            raise DocumentRefusal(
                404, PERSISTED_QUERY_NOT_FOUND,
                f"No trusted document has the id {document_id[:100]!r}"
                + ("." if self.trusted else " (this server loads no trusted documents "
                   "manifest: CONSUMERS_TRUSTED_DOCUMENTS)."))
        return Resolved(pinned.text, pinned, persisted=True)

    def _trusted(self, document_id: str) -> PinnedDocument | None:
        pinned = self.trusted.get(document_id)
        if pinned is None and document_id.startswith(_SHA256_PREFIX):
            pinned = self.trusted.get(document_id.removeprefix(_SHA256_PREFIX))
        return pinned

    def _by_hash(self, persisted: Any, query: str | None) -> Resolved:
        if not isinstance(persisted, dict):
            raise DocumentRefusal(400, BAD_REQUEST, "`extensions.persistedQuery` must be an "
                                  "object: {\"version\": 1, \"sha256Hash\": \"<hex>\"}.")
        version, sha256 = persisted.get("version"), persisted.get("sha256Hash")
        if version != 1:
            raise DocumentRefusal(
                400, PERSISTED_QUERY_NOT_SUPPORTED,
                f"Unsupported persisted query version {repr(version)[:20]}: this server speaks "
                "version 1 of the automatic persisted queries protocol.")
        if not isinstance(sha256, str) or not sha256:
            raise DocumentRefusal(400, BAD_REQUEST, "`extensions.persistedQuery.sha256Hash` "
                                  "must be the document's SHA-256, in hexadecimal.")
        pinned = self.trusted.get(sha256)
        if pinned is not None and (query is None or query == pinned.text):
            return Resolved(pinned.text, pinned, persisted=True)
        if self.apq.max_entries == 0 and not self.trusted_only:
            # APQ off: Apollo's clients stop sending hashes on this answer (no retry each time).
            raise DocumentRefusal(200, PERSISTED_QUERY_NOT_SUPPORTED, NOT_SUPPORTED_MESSAGE,
                                  NOT_FOUND_HEADERS)
        if query is None:
            text = None if self.trusted_only else self.apq.get(sha256.lower())
            if text is None:
                raise DocumentRefusal(200, PERSISTED_QUERY_NOT_FOUND, NOT_FOUND_MESSAGE,
                                      NOT_FOUND_HEADERS)
            return Resolved(text, persisted=True)
        if self.trusted_only:
            raise DocumentRefusal(
                400, PERSISTED_QUERY_REQUIRED,
                "This server runs trusted documents only: it does not register documents "
                "(automatic persisted queries); send the id of a document of its manifest.")
        try:
            utf8 = query.encode()
        except UnicodeEncodeError:  # a lone surrogate, which JSON can carry: no UTF-8, no hash
            raise DocumentRefusal(400, BAD_REQUEST, "`query` is not Unicode text (it holds a "
                                  "lone surrogate): it has no SHA-256 to match.") from None
        if hashlib.sha256(utf8).hexdigest() != sha256.lower():
            raise DocumentRefusal(
                400, PERSISTED_QUERY_HASH_MISMATCH,
                "`extensions.persistedQuery.sha256Hash` is not the SHA-256 of `query` (hex of "
                "the UTF-8 text, exactly as sent): the document was not registered.")
        return Resolved(query, registers=sha256.lower())

    def register(self, resolved: Resolved) -> None:
        """Keeps an APQ registration's document, once it has been found fit to run."""
        if resolved.registers is not None and resolved.query is not None:
            self.apq.put(resolved.registers, resolved.query)


def check_documents(schema: Any, documents: dict[str, str],
                    limits: Limits) -> list[tuple[str, str]]:
    """Every problem of a manifest's documents against `schema` (a Strawberry schema) and
    the server's `limits`, as (document id, message), in manifest order: what
    `consumers-graphql documents check` prints, the problems each document would meet on
    its first use (but the cost, which depends on the variables)."""
    problems: list[tuple[str, str]] = []
    for document_id, text in documents.items():
        try:
            document = parse(text, max_tokens=limits.tokens)
        except GraphQLError as error:
            problems.append((document_id, _located(error)))
            continue
        invalid = validate(schema._schema, document, specified_rules)
        if not invalid:
            invalid = measure(schema._schema, document, limits)
        problems.extend((document_id, _located(error)) for error in invalid)
    return problems


def _located(error: GraphQLError) -> str:
    where = ", ".join(f"line {location.line}, column {location.column}"
                      for location in error.locations or ())
    code = (error.extensions or {}).get("code")
    if code:
        where = f"{code}, {where}" if where else code
    return f"{error.message} ({where})" if where else error.message
