"""Cost-based rate limits: a leaky bucket of cost points per API key (Shopify's model).

A key's bucket holds up to `capacity` points and gets `restore_rate` of them back every
second. A request takes its cost (a GraphQL operation its computed cost, a REST call its
page or batch size; at least 1) when the bucket holds that much, and is refused (429 with
Retry-After: the seconds until it will) when it does not; a refused request takes nothing.
A request that costs more than the bucket can ever hold is refused as a bad request, since
waiting would not help.

Where the buckets live: with ``CONSUMERS_REDIS_URL`` set, in Redis, shared by every worker
and host, one atomic script per request on Redis' own clock (so hosts with skewed clocks
agree), each bucket expiring once it is full again; otherwise in the process (each worker
then limits on its own: per-process). Redis out of reach: requests go through (fail open,
one warning per outage, Redis asked again after a short pause, no restart needed), or are
refused 503 with ``CONSUMERS_RATE_LIMIT_FAIL_CLOSED=true``.

Knows HTTP only through the headers it renders (the IETF draft's RateLimit-Policy and
RateLimit); the two faces call `take` after authentication and pricing, before running
anything.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import TypeAdapter, ValidationError

from consumers_graphql.settings import Settings
from consumers_graphql.store.keys import Principal
from consumers_graphql.store.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("consumers_graphql.rate_limit")

THROTTLED = "THROTTLED"
# A request that costs more than its bucket can ever hold (and, in api/limits.py, an operation
# over CONSUMERS_MAX_COST): one code on both faces, in the answers and in the metrics.
MAX_COST_EXCEEDED = "MAX_COST_EXCEEDED"
RATE_LIMIT_EXCEEDED = "Rate limit exceeded"
# Where a REST call keeps its bucket (a Throttle), for the RateLimit headers of its answer.
RATE_LIMIT_STATE = "rate_limit"
# The IETF draft's policy name (draft-ietf-httpapi-ratelimit-headers-11): one policy.
POLICY_NAME = "default"
# Where Redis keeps a key's bucket: the API key's id (never its secret) after this prefix.
REDIS_PREFIX = "consumers-graphql:rate:"
# A dead Redis must not hold requests up: each command gets this long, no retry.
REDIS_TIMEOUT_S = 0.25
# After a failure, Redis is left alone this long (requests answered as the outage
# setting says), then asked again: an outage costs one timeout a second, not one a request.
REDIS_PAUSE_S = 1.0
# Buckets one process remembers at most (in-process mode), the least recently used
# forgotten first: a forgotten bucket is a full one, so far more than the keys in use.
LOCAL_BUCKETS = 100_000
# A REST page size, parsed as FastAPI parses the route's `first`/`last` (an int, lax mode).
_PAGE_SIZE: TypeAdapter[int] = TypeAdapter(int)

# KEYS[1] the bucket; ARGV capacity, restore rate (points/s), cost (0: only look).
# Returns {taken (0/1), points left (a string: Lua numbers become integers on the way)}.
_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local stored = redis.call('HMGET', KEYS[1], 'points', 'at')
local points = capacity
if stored[1] then
  points = math.min(capacity, tonumber(stored[1]) + math.max(0, now - tonumber(stored[2])) * rate)
end
if cost > points then
  return {0, tostring(points)}
end
if cost > 0 then
  points = points - cost
  redis.call('HSET', KEYS[1], 'points', tostring(points), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - points) / rate * 1000) + 1)
end
return {1, tostring(points)}
"""


@dataclass(frozen=True, slots=True)
class Policy:
    capacity: int  # 0: unlimited
    restore_rate: float


@dataclass(frozen=True, slots=True)
class Throttle:
    """A bucket after a request: whether the request took its cost, and what is left."""

    allowed: bool
    cost: int
    capacity: int
    available: float
    restore_rate: float

    @property
    def can_ever_pass(self) -> bool:
        return self.cost <= self.capacity

    @property
    def retry_after(self) -> int:
        """Whole seconds until the bucket holds the cost (at least 1); 0 when it took it."""
        if self.allowed:
            return 0
        return max(1, math.ceil((self.cost - self.available) / self.restore_rate))

    def status(self) -> dict[str, Any]:
        """GraphQL's `extensions.cost.throttleStatus` (Shopify's names)."""
        return {"maximumAvailable": self.capacity,
                "currentlyAvailable": math.floor(self.available),
                "restoreRate": self.restore_rate}

    def headers(self) -> dict[str, str]:
        """The IETF draft's fields: the policy (`q` points per `w` seconds: a full bucket
        restores in w), and what is left (`r`) with the seconds until the bucket is full
        again (`t`)."""
        window = max(1, math.ceil(self.capacity / self.restore_rate))
        full_in = math.ceil((self.capacity - self.available) / self.restore_rate)
        return {
            "RateLimit-Policy": f'"{POLICY_NAME}";q={self.capacity};w={window}',
            "RateLimit": f'"{POLICY_NAME}";r={math.floor(self.available)};t={max(0, full_in)}',
        }


class RateLimitUnavailable(Exception):
    """The shared buckets are out of reach and the limiter fails closed: answer 503."""


class _Buckets(Protocol):
    async def take(self, key: str, policy: Policy, cost: int) -> tuple[bool, float]: ...

    async def close(self) -> None: ...


class LocalBuckets:
    """One process's buckets, on its monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 size: int = LOCAL_BUCKETS) -> None:
        self._clock = clock
        self._size = size
        # key -> [points, monotonic time of points], least recently used first
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    async def take(self, key: str, policy: Policy, cost: int) -> tuple[bool, float]:
        return self.take_now(key, policy, cost)

    def take_now(self, key: str, policy: Policy, cost: int) -> tuple[bool, float]:
        now = self._clock()
        bucket = self._buckets.get(key)
        points = float(policy.capacity)
        if bucket is not None:
            points = min(points, bucket[0] + max(0.0, now - bucket[1]) * policy.restore_rate)
        if cost > points:
            return False, points
        if cost > 0:
            points -= cost
            if bucket is None:
                self._buckets[key] = [points, now]
                if len(self._buckets) > self._size:
                    self._buckets.popitem(last=False)
            else:
                bucket[0], bucket[1] = points, now
                self._buckets.move_to_end(key)
        return True, points

    async def close(self) -> None:
        self._buckets.clear()


class RedisBuckets:
    """Buckets in Redis: one EVALSHA a request (the script is loaded once per server)."""

    def __init__(self, url: str) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.client: Redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )
        self._script: AsyncScript = self.client.register_script(_SCRIPT)

    async def take(self, key: str, policy: Policy, cost: int) -> tuple[bool, float]:
        taken, points = await self._script(
            keys=[REDIS_PREFIX + key], args=[policy.capacity, policy.restore_rate, cost])
        return bool(taken), float(points)

    async def close(self) -> None:
        await self.client.aclose()


class RateLimiter:
    """The app's limiter (`app.state.rate_limiter`): the policy of each key, its bucket,
    and what an unreachable Redis means."""

    def __init__(self, settings: Settings, *, buckets: _Buckets | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = Policy(settings.rate_limit_capacity, settings.rate_limit_restore_rate)
        self.fail_closed = settings.rate_limit_fail_closed
        self.shared = settings.redis_url is not None
        if buckets is None:
            buckets = (RedisBuckets(settings.redis_url) if settings.redis_url is not None
                       else LocalBuckets(clock))
        self._buckets = buckets
        self._local = buckets if isinstance(buckets, LocalBuckets) else None
        self._clock = clock
        self._down_since: float | None = None  # an outage under way: when Redis last failed

    def policy(self, principal: Principal) -> Policy:
        own = principal.rate_limit
        if own is None:
            return self.default
        return Policy(self.default.capacity if own.capacity is None else own.capacity,
                      self.default.restore_rate if own.restore_rate is None
                      else own.restore_rate)

    async def take(self, principal: Principal, cost: int) -> Throttle | None:
        """The bucket after taking `cost` (at least 1) from it, refused or not; None when
        nothing limits this key (unlimited, an in-process caller, or Redis down with the
        limiter failing open). Raises RateLimitUnavailable when failing closed."""
        return await self._bucket(principal, max(1, cost))

    async def peek(self, principal: Principal) -> Throttle | None:
        """The bucket as it is, nothing taken (for answers that ran nothing)."""
        return await self._bucket(principal, 0)

    async def _bucket(self, principal: Principal, cost: int) -> Throttle | None:
        policy = self.policy(principal)
        if policy.capacity == 0 or principal.is_anonymous:
            return None
        if cost > policy.capacity:  # never: nothing taken, said so without asking the store
            return Throttle(False, cost, policy.capacity, policy.capacity, policy.restore_rate)
        local = self._local
        if local is not None:  # no await: the in-process path stays a few microseconds
            allowed, points = local.take_now(principal.key_id, policy, cost)
        else:
            if self._down_since is not None and self._clock() - self._down_since < REDIS_PAUSE_S:
                return self._unavailable()
            try:
                allowed, points = await self._buckets.take(principal.key_id, policy, cost)
            except Exception as error:  # redis' errors, timeouts, OSError
                return self._failed(error)
            if self._down_since is not None:
                self._down_since = None
                logger.info("rate limiting: Redis answers again; buckets are shared again")
        return Throttle(allowed, cost, policy.capacity, points, policy.restore_rate)

    def _failed(self, error: Exception) -> Throttle | None:
        if self._down_since is None:
            # Once per outage; the error's type only: its text may quote the URL.
            logger.warning(
                "rate limiting: Redis is out of reach (%s); requests are %s until it answers",
                type(error).__name__,
                "refused (503)" if self.fail_closed else "let through unlimited")
        self._down_since = self._clock()
        return self._unavailable()

    def _unavailable(self) -> Throttle | None:
        if self.fail_closed:
            raise RateLimitUnavailable
        return None

    async def close(self) -> None:
        await self._buckets.close()


def rest_cost(*, is_list: bool, query: Mapping[str, str], items: int | None) -> int:
    """A REST call's cost: a list's page size (`first` or `last`, DEFAULT_PAGE_SIZE when
    neither is a number, at most MAX_PAGE_SIZE), a batch's items; 1 for anything else.

    The page size is read as the route reads it (pydantic's int, lax: `+100`, `100.0` and
    `1_00` are 100 to it), or a page of 100 would be priced as the default 20."""
    if items is not None:
        return max(1, items)
    if not is_list:
        return 1
    for name in ("first", "last"):
        value = query.get(name)
        if value is None:
            continue
        try:
            size = _PAGE_SIZE.validate_python(value)
        except ValidationError:
            continue  # the route refuses it (400)
        return max(1, min(size, MAX_PAGE_SIZE))
    return DEFAULT_PAGE_SIZE


def cost_over_capacity_message(throttle: Throttle) -> str:
    return (f"This request costs {throttle.cost:,} points, more than this API key's rate limit "
            f"bucket holds ({throttle.capacity:,}): it can never run. Ask for smaller pages "
            "or batches.")
