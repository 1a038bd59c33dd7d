"""Secret API keys: generation, hashing, verification, scopes, revocation.

A secret (``sk_live_…`` / ``sk_test_…``) is shown once, when it is created; the database keeps
only its HMAC-SHA256 (keyed by the optional server-side pepper) and a short visible prefix.
Knows nothing of HTTP: the FastAPI dependency lives in ``http_auth``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

from pydantic import SecretStr
from sqlalchemy import bindparam, func, insert, or_, select, text, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers_graphql.ids import IdKind, new_id
from consumers_graphql.store.db import Reader
from consumers_graphql.store.models import ApiKey, utcnow

logger = logging.getLogger("consumers_graphql.auth")

LIVE_PREFIX = "sk_live_"
TEST_PREFIX = "sk_test_"
SECRET_BODY_LENGTH = 40  # base62: about 238 bits
_ALPHABET = string.ascii_letters + string.digits
VISIBLE_PREFIX_LENGTH = len(LIVE_PREFIX) + 4  # "sk_live_AbCd"
# Anything shaped like a secret, in a header or in a log line. The upper bound keeps a hostile
# header from costing more than a regex match.
SECRET_PATTERN = re.compile(r"sk_(?:live|test)_[A-Za-z0-9]{32,128}")
_SECRET_EXACT = re.compile(rf"\A{SECRET_PATTERN.pattern}\Z")
NAME_MAX = 200
# lastUsedAt is a hint, not an audit log: one write per key per interval at most.
USE_RECORD_INTERVAL = timedelta(seconds=60)
# An execution option on every statement of the key store, so statement counts (and anyone
# tracing SQL) can tell authentication bookkeeping from the request's own work.
AUTH_EXECUTION_OPTION = "consumers_auth"
# How many verified keys a process remembers (KeyStore's cache), the least recently used
# forgotten first: far more than the keys a deployment uses, few enough to stay small
# (a digest and a Principal each, about half a kilobyte).
KEY_CACHE_SIZE = 1_024
# A key's own rate limit: up to this capacity and restore rate (the settings' bound too).
RATE_LIMIT_CAPACITY_MAX = 1_000_000_000
# ... and at least this restore rate (points a second): a bucket of the largest capacity then
# refills in 1e12 s, a number Retry-After and the RateLimit headers can still say (at 1e-320
# the division is infinite).
RATE_LIMIT_RESTORE_MIN = 0.001


class Scope(StrEnum):
    READ = "read"
    WRITE = "write"


READ_WRITE = frozenset({Scope.READ, Scope.WRITE})
READ_ONLY = frozenset({Scope.READ})


def format_scopes(scopes: Iterable[Scope]) -> str:
    return " ".join(scope.value for scope in Scope if scope in set(scopes))


def parse_scopes(value: str) -> frozenset[Scope]:
    known = {scope.value: scope for scope in Scope}
    return frozenset(known[word] for word in value.split() if word in known)


def generate_secret(*, test: bool = False) -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_BODY_LENGTH))
    return (TEST_PREFIX if test else LIVE_PREFIX) + body


def is_well_formed(secret: str) -> bool:
    return _SECRET_EXACT.match(secret) is not None


def _pepper_bytes(pepper: SecretStr | None) -> bytes:
    return pepper.get_secret_value().encode() if pepper is not None else b""


def hash_secret(secret: str, pepper: SecretStr | None) -> str:
    return hmac.new(_pepper_bytes(pepper), secret.encode(), hashlib.sha256).hexdigest()


def _encoded(characters: str) -> str:
    """A pattern for one of `characters` as it is or percent-encoded, up to three times
    (`_`, `%5F`, `%5f`, `%255F`, `%25255F`)."""
    hexes = "|".join(f"{ord(c):02X}" for c in characters)
    return f"(?:[{re.escape(characters)}]|%(?:25){{0,2}}(?i:{hexes}))"


_BODY_CHARACTERS = _encoded(_ALPHABET)
# A secret in a log line, in any encoding a URL or a form can give it (uvicorn's access line
# prints the query string as it was sent).
LOGGED_SECRET_PATTERN = re.compile(
    f"{_encoded('s')}{_encoded('k')}{_encoded('_')}"
    f"(?:{_encoded('l')}{_encoded('i')}{_encoded('v')}{_encoded('e')}"
    f"|{_encoded('t')}{_encoded('e')}{_encoded('s')}{_encoded('t')})"
    f"{_encoded('_')}{_BODY_CHARACTERS}{{32,128}}"
)


def _decoded(text_: str) -> str:
    for _ in range(3):
        text_ = unquote(text_)
    return text_


def redact(text_: str) -> str:
    """Every secret in `text_`, plain or percent-encoded, cut to its visible prefix."""
    return LOGGED_SECRET_PATTERN.sub(
        lambda m: _decoded(m.group())[:VISIBLE_PREFIX_LENGTH] + "…[redacted]", text_
    )


@dataclass(frozen=True)
class RateLimit:
    """A key's own leaky bucket: `capacity` cost points (0: unlimited), `restore_rate` of
    them back per second. Either may be None: the server's setting, read by the server (not
    the one of the process that made the key, whose environment may differ)."""

    capacity: int | None
    restore_rate: float | None

    def __post_init__(self) -> None:
        if self.capacity is None and self.restore_rate is None:
            raise ValueError("A key's own rate limit sets a capacity, a restore rate or both.")
        if self.capacity is not None and not 0 <= self.capacity <= RATE_LIMIT_CAPACITY_MAX:
            raise ValueError(f"A rate limit capacity is 0 (unlimited) to "
                             f"{RATE_LIMIT_CAPACITY_MAX:,} points.")
        if self.restore_rate is not None and not (
                RATE_LIMIT_RESTORE_MIN <= self.restore_rate <= RATE_LIMIT_CAPACITY_MAX):
            raise ValueError(f"A restore rate is {RATE_LIMIT_RESTORE_MIN:g} to "
                             f"{RATE_LIMIT_CAPACITY_MAX:,} points a second.")

    def __str__(self) -> str:
        capacity = "default" if self.capacity is None else str(self.capacity)
        rate = "default" if self.restore_rate is None else f"{self.restore_rate:g}"
        return f"{capacity} points, {rate}/s"


def _rate_limit(capacity: int | None, restore_rate: float | None) -> RateLimit | None:
    if capacity is None and restore_rate is None:
        return None
    return RateLimit(capacity, restore_rate)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key that authenticated the request (never its secret)."""

    key_id: str
    name: str
    scopes: frozenset[Scope]
    last_used_at: datetime | None = None
    # The key's own rate limit (None: the server's), cached with the key.
    rate_limit: RateLimit | None = None

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes

    @property
    def is_anonymous(self) -> bool:
        return not self.key_id


# A request let through without a key (the GraphiQL page): may run nothing.
ANONYMOUS = Principal(key_id="", name="anonymous", scopes=frozenset())


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    prefix: str
    scopes: frozenset[Scope]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    rate_limit: RateLimit | None = None


@dataclass(frozen=True)
class CreatedKey:
    info: KeyInfo
    # The only place the secret ever exists outside the caller's hands; repr keeps it out of
    # tracebacks and debug output.
    secret: SecretStr


class RevokeOutcome(StrEnum):
    REVOKED = "revoked"
    ALREADY_REVOKED = "already_revoked"
    NOT_FOUND = "not_found"


def _info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id, name=row.name, prefix=row.prefix, scopes=parse_scopes(row.scopes),
        created_at=row.created_at, last_used_at=row.last_used_at, revoked_at=row.revoked_at,
        rate_limit=_rate_limit(row.rate_limit_capacity, row.rate_limit_restore_rate),
    )


# Built once, options included: a statement object made per request costs SQLAlchemy a
# cache-key computation and a re-mapping of its cached result columns every time.
_VERIFY = select(
    ApiKey.id, ApiKey.name, ApiKey.scopes, ApiKey.secret_hash, ApiKey.last_used_at,
    ApiKey.rate_limit_capacity, ApiKey.rate_limit_restore_rate,
).where(
    ApiKey.secret_hash == bindparam("digest"), ApiKey.revoked_at.is_(None)
).execution_options(**{AUTH_EXECUTION_OPTION: True})


class KeyStore:
    """The process's view of the api_keys table. Holds the in-process throttle of lastUsedAt
    writes and the cache of verified keys, so keep one per process (the app keeps it in
    ``app.state.keys``).

    The cache (`cache_seconds` > 0): a key the database accepted is accepted again without a
    statement for `cache_seconds` from the moment that look-up began, then looked up again.
    A key revoked by another process (`keys revoke`) is therefore refused within
    `cache_seconds` by every process, every worker and host; one revoked through this store
    is forgotten by it at once. Only accepted keys are remembered: an unknown key is looked
    up every time, so a key just created works at once. Entries are keyed by the secret's
    HMAC digest, never by the secret: the process then holds what the database holds, and
    keeps no secret past the request that sent it (for a heap dump or a debugger to find);
    the digest costs about 2 µs a request (a cached verify, 2 to 3 µs in all). At most
    `cache_size` entries, the least recently used dropped first.
    """

    def __init__(
        self,
        read_engine: AsyncEngine,
        write_engine: AsyncEngine,
        pepper: SecretStr | None,
        *,
        use_record_interval: timedelta = USE_RECORD_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
        cache_seconds: float = 0.0,
        cache_size: int = KEY_CACHE_SIZE,
    ) -> None:
        self._read = read_engine.execution_options(**{AUTH_EXECUTION_OPTION: True})
        self._write = write_engine.execution_options(**{AUTH_EXECUTION_OPTION: True})
        self._pepper = pepper
        self._pepper_key = _pepper_bytes(pepper)
        self._interval = use_record_interval
        self._monotonic = monotonic
        self._recorded: dict[str, float] = {}
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        # digest -> (principal, monotonic time its look-up began), least recently used first
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        # Bumped by every revoke through this store: a look-up that began before one does
        # not fill the cache (it may have read the key before the revocation committed).
        self._revocations = 0

    def __repr__(self) -> str:
        return f"KeyStore({self._read.url.render_as_string(hide_password=True)!r})"

    def _new_key(
        self, name: str, scopes: frozenset[Scope], test: bool,
        rate_limit: RateLimit | None = None,
    ) -> tuple[dict[str, object], CreatedKey]:
        name = name.strip()
        if not name or len(name) > NAME_MAX:
            raise ValueError(f"A key name takes 1 to {NAME_MAX} characters.")
        if not scopes or not scopes <= READ_WRITE:
            raise ValueError("A key needs at least one of the scopes read, write.")
        secret = generate_secret(test=test)
        info = KeyInfo(
            id=new_id(IdKind.API_KEY), name=name, prefix=secret[:VISIBLE_PREFIX_LENGTH],
            scopes=scopes, created_at=utcnow(), last_used_at=None, revoked_at=None,
            rate_limit=rate_limit,
        )
        row = {
            "id": info.id, "name": info.name, "prefix": info.prefix,
            "secret_hash": hash_secret(secret, self._pepper), "scopes": format_scopes(scopes),
            "created_at": info.created_at, "last_used_at": None, "revoked_at": None,
            "rate_limit_capacity": rate_limit.capacity if rate_limit else None,
            "rate_limit_restore_rate": rate_limit.restore_rate if rate_limit else None,
        }
        return row, CreatedKey(info=info, secret=SecretStr(secret))

    async def create(
        self, name: str, *, scopes: frozenset[Scope] = READ_WRITE, test: bool = False,
        rate_limit: RateLimit | None = None,
    ) -> CreatedKey:
        row, created = self._new_key(name, scopes, test, rate_limit)
        async with self._write.begin() as conn:
            await conn.execute(insert(ApiKey).values(**row))
        return created

    async def create_first(self, name: str = "default") -> CreatedKey | None:
        """A read-write key when the table holds none at all (revoked keys count: revoking
        every key must not be undone by a restart); None otherwise. Safe against two
        processes starting at once."""
        row, created = self._new_key(name, READ_WRITE, False)
        async with self._write.begin() as conn:
            if self._write.dialect.name == "postgresql":
                # Self-conflicting, so a concurrent first start waits and then sees our key.
                await conn.execute(text("LOCK TABLE api_keys IN SHARE ROW EXCLUSIVE MODE"))
            # (SQLite: the writer's BEGIN IMMEDIATE already serialises this transaction.)
            count = (await conn.execute(select(func.count()).select_from(ApiKey))).scalar_one()
            if count:
                return None
            await conn.execute(insert(ApiKey).values(**row))
        return created

    async def list_keys(self) -> list[KeyInfo]:
        async with self._read.connect() as conn:
            rows = (await conn.execute(
                select(ApiKey.__table__).order_by(ApiKey.created_at, ApiKey.id)
            )).all()
        return [_info(row) for row in rows]

    async def revoke(self, key_id: str) -> tuple[RevokeOutcome, KeyInfo | None]:
        async with self._write.begin() as conn:
            done = await conn.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            row = (await conn.execute(
                select(ApiKey.__table__).where(ApiKey.id == key_id)
            )).first()
        self.forget(key_id)
        if row is None:
            return RevokeOutcome.NOT_FOUND, None
        outcome = RevokeOutcome.REVOKED if done.rowcount else RevokeOutcome.ALREADY_REVOKED
        return outcome, _info(row)

    def forget(self, key_id: str) -> None:
        """Drops the key from the cache at once (it was revoked through this process)."""
        self._revocations += 1
        for digest in [d for d, (p, _at) in self._cache.items() if p.key_id == key_id]:
            del self._cache[digest]

    async def verify(self, secret: str, reader: Reader | None = None) -> Principal | None:
        """The live key this secret belongs to, or None. From the cache when the database
        accepted it less than `cache_seconds` ago (no statement); else one indexed read (on
        the request's read connection when given and on the primary, else on one of the
        store's own, on the primary: a revoked key must stop working as soon as the cache
        lets it, not once a replica catches up); no write."""
        if not is_well_formed(secret):
            return None
        digest = hmac.new(self._pepper_key, secret.encode(), hashlib.sha256).hexdigest()
        started = self._monotonic()
        if self._cache_seconds > 0:
            cached = self._cache.get(digest)
            if cached is not None:
                if started - cached[1] < self._cache_seconds:
                    self._cache.move_to_end(digest)
                    return cached[0]
                del self._cache[digest]
        revocations = self._revocations
        row: Row[*tuple[Any, ...]] | None  # a reader's rows are untyped, the engine's typed
        if reader is not None and reader.on_primary:
            row = (await reader.execute(_VERIFY, {"digest": digest})).first()
        else:
            async with self._read.connect() as conn:
                row = (await conn.execute(_VERIFY, {"digest": digest})).first()
        # The index lookup found the row; the constant-time comparison is what accepts it.
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            return None
        principal = Principal(
            key_id=row.id, name=row.name, scopes=parse_scopes(row.scopes),
            last_used_at=row.last_used_at,
            rate_limit=_rate_limit(row.rate_limit_capacity, row.rate_limit_restore_rate),
        )
        if self._cache_seconds > 0 and revocations == self._revocations:
            self._cache[digest] = (principal, started)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    def use_needs_recording(self, principal: Principal) -> bool:
        """Whether this use should be written to lastUsedAt; claims the write for this
        process, so concurrent requests with the same key do not all write."""
        now = self._monotonic()
        interval = self._interval.total_seconds()
        last = self._recorded.get(principal.key_id)
        if last is not None and now - last < interval:
            return False
        self._recorded[principal.key_id] = now
        seen = principal.last_used_at
        # Another process wrote it recently: nothing to do, and no write lock to take.
        return seen is None or utcnow() - seen >= self._interval

    async def record_use(self, key_id: str) -> None:
        """Set lastUsedAt unless some process already did within the interval. A failure is
        logged and swallowed: bookkeeping must never fail a request."""
        now = utcnow()
        try:
            async with self._write.begin() as conn:
                await conn.execute(
                    update(ApiKey)
                    .where(
                        ApiKey.id == key_id,
                        or_(
                            ApiKey.last_used_at.is_(None),
                            ApiKey.last_used_at < now - self._interval,
                        ),
                    )
                    .values(last_used_at=now)
                )
        except (SQLAlchemyError, OSError) as error:  # OSError: no connection to be had
            logger.warning("could not record the use of API key %s: %s", key_id,
                           type(error).__name__)
