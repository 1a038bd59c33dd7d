"""Prometheus metrics, summed over every process of `serve`.

prometheus-client chooses between values in memory and values in per-process files
(multiprocess mode) when it is first imported, by `PROMETHEUS_MULTIPROC_DIR`. So this module
imports it only inside functions: `serve` calls `setup_parent` first, which makes a private
directory and sets the variable for itself and every worker it starts; /metrics then reads
every process's files. An app built without `serve` (tests, the benchmark) keeps its
numbers in memory, in a registry of its own: two apps in one process never share counts.

Labels are few by construction: the face (graphql, rest, other), the operation type
(query, mutation, subscription, none), the status, the engine's role, and the codes of the
limits (constants of the code base); never a path, an id or an operation name."""

from __future__ import annotations

import atexit
import errno
import fcntl
import glob
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, event
from starlette.requests import Request
from starlette.responses import Response

from consumers_graphql.settings import Settings
from consumers_graphql.store.db import Database
from consumers_graphql.store.event_hub import EventHub
from consumers_graphql.store.events import EventRecord
from consumers_graphql.store.models import utcnow
from consumers_graphql.web.observe import RequestFacts

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"
# `serve`'s directories: consumers-metrics-<its pid>-<random>, in the temporary directory.
_PREFIX = "consumers-metrics-"
# The text format every Prometheus server reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
STATEMENT_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144)


class MetricsSetupError(RuntimeError):
    """prometheus-client was imported before `setup_parent` could choose its mode."""


# This process's id, renewed in a forked child (see _values_without_system_calls).
_pid = os.getpid()


def _renew_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_renew_pid)


def _process_id() -> int:
    return _pid


def _values_without_system_calls() -> None:
    """prometheus-client's values in files ask the process's id (os.getpid(), a system call)
    on every change, to notice a fork and move to files of the child's own: 15 times a
    request here, 0.8 microseconds each on this project's CI machines. The library takes
    that identifier as a function (`MultiProcessValue(process_identifier)`, made for servers
    with ids of their own, prometheus/client_python#509); ours is the id kept in memory,
    renewed after a fork. Its value class is replaced before any metric is made (in this
    process, only Metrics makes them): a metric keeps the class it was made with."""
    from prometheus_client import values

    if getattr(values.ValueClass, "_process_id_in_memory", False):
        return
    value_class = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]  # untyped upstream
    value_class._process_id_in_memory = True
    values.ValueClass = value_class


def _values_in_files() -> bool:
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


def setup_parent(settings: Settings) -> None:
    """In the `serve` process, before any worker starts (and before anything imports
    prometheus-client): a private, empty directory for every process's numbers, removed at
    exit; and, with `metrics_port`, /metrics served from this process on its own port,
    summed over the workers. Raises OSError when that port cannot be bound (the app's own
    port included: uvicorn would fail to bind it later)."""
    if not settings.metrics_enabled:
        return
    if "prometheus_client" in sys.modules and not _values_in_files():
        raise MetricsSetupError("prometheus_client was imported before metrics.setup_parent: "
                                "its numbers would stay in one process")
    if settings.metrics_port is not None and _same_socket(settings):
        raise OSError(errno.EADDRINUSE, "the app's own port (CONSUMERS_PORT or serve --port); "
                      "give CONSUMERS_METRICS_PORT another")
    _remove_orphans()
    directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
    _hold_lock(directory)
    atexit.register(cleanup)
    os.environ[MULTIPROCESS_DIRECTORY] = directory
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.metrics_host or settings.host,
                          registry=_summed(directory))


_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::", "[::]"})


def _same_socket(settings: Settings) -> bool:
    """Would /metrics take the app's own address (the same port, 0 aside, on the same or a
    wildcard interface)?"""
    if settings.metrics_port != settings.port or settings.port == 0:
        return False
    metrics_host = settings.metrics_host or settings.host
    return metrics_host == settings.host or bool({metrics_host, settings.host} & _ANY_ADDRESS)


def cleanup() -> None:
    """Removes this process's directory (at exit; `serve` calls it too when it must exit
    without running the exit handlers)."""
    directory = os.environ.get(MULTIPROCESS_DIRECTORY, "")
    if os.path.basename(directory).startswith(f"{_PREFIX}{os.getpid()}-"):
        shutil.rmtree(directory, ignore_errors=True)


# A lock file in each directory, held (flock) by its `serve` process for as long as it runs:
# the kernel lets it go however the process ends. The process id alone cannot tell: in a
# container `serve` is PID 1 on every start.
_LOCK = "serve.lock"
_held: list[int] = []  # the descriptor of this process's lock, open until it exits


def _hold_lock(directory: str) -> None:
    """Locks a file in `directory` under a temporary name first, then renames it: a
    directory whose lock file exists is always locked while its process runs."""
    pending = os.path.join(directory, f".{_LOCK}")
    descriptor = os.open(pending, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(pending, os.path.join(directory, _LOCK))
    _held.append(descriptor)


def _remove_orphans() -> None:
    """The directories of `serve` processes that died without cleaning up (killed): whose
    lock can be taken (or, in a directory without one, whose process is gone)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_PREFIX}*-*")):
        if _orphaned(path):
            shutil.rmtree(path, ignore_errors=True)


def _orphaned(path: str) -> bool:
    try:
        descriptor = os.open(os.path.join(path, _LOCK), os.O_RDWR)
    except FileNotFoundError:  # being made just now, or by an older version: by its pid
        pid = os.path.basename(path)[len(_PREFIX):].split("-", 1)[0]
        return pid.isdigit() and not _alive(int(pid))
    except OSError:  # another user's, or not a directory
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: its process runs
        return False
    finally:
        os.close(descriptor)  # (drops the lock just taken, if any)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def child_exited(pid: int) -> None:
    """A worker is gone: its gauges (in-flight requests, pool use) no longer count."""
    from prometheus_client import multiprocess

    directory = os.environ.get(MULTIPROCESS_DIRECTORY)
    if directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # untyped upstream


def _summed(directory: str) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]  # untyped upstream
    return registry


class Metrics:
    """The app's metrics (one per app: see the module's docstring)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.directory = os.environ.get(MULTIPROCESS_DIRECTORY) or None
        if self.directory is not None and not _values_in_files():
            raise MetricsSetupError(f"{MULTIPROCESS_DIRECTORY} was set after prometheus_client "
                                    "was imported")
        if self.directory is not None:
            _values_without_system_calls()
        registry = None if self.directory is not None else CollectorRegistry()
        self.registry = registry
        request = ("face", "operation_type")
        self.requests = Counter(
            "consumers_http_requests", "HTTP requests answered, by face, GraphQL operation "
            "type and status (499: the client left first).", [*request, "status"],
            registry=registry)
        self.latency = Histogram(
            "consumers_http_request_duration_seconds", "Time to the last byte of the answer.",
            request, buckets=LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "consumers_http_requests_in_flight", "Requests being answered.", ["face"],
            multiprocess_mode="livesum", registry=registry)
        self.statements = Histogram(
            "consumers_http_request_sql_statements", "SQL statements sent for one request "
            "(the API key look-up included).", ["face"], buckets=STATEMENT_BUCKETS,
            registry=registry)
        self.database = Histogram(
            "consumers_http_request_database_seconds", "Time spent waiting for SQL "
            "statements in one request.", ["face"], buckets=DATABASE_BUCKETS,
            registry=registry)
        self.refusals = Counter(
            "consumers_refusals", "Requests refused by a limit, by its code (GraphQL's "
            "extensions.code: MAX_DEPTH_EXCEEDED, MAX_COST_EXCEEDED, ...; PAYLOAD_TOO_LARGE, "
            "TIMEOUT, REQUEST_TIMEOUT).", ["code"], registry=registry)
        self.pool_checked_out = Gauge(
            "consumers_db_pool_checked_out", "Database connections in use, by engine.",
            ["pool"], multiprocess_mode="livesum", registry=registry)
        self.pool_overflow = Gauge(
            "consumers_db_pool_overflow", "Connections open beyond the pool's size.",
            ["pool"], multiprocess_mode="livesum", registry=registry)
        self.pool_size = Gauge(
            "consumers_db_pool_size", "The pool's size (PostgreSQL: CONSUMERS_POOL_SIZE; as "
            "many again may overflow).", ["pool"], multiprocess_mode="livesum",
            registry=registry)

        self.subscriptions = Gauge(
            "consumers_subscriptions_active", "GraphQL subscriptions open.",
            multiprocess_mode="livesum", registry=registry)
        self.events_delivered = Counter(
            "consumers_subscription_events_delivered", "Change events sent to subscriptions.",
            registry=registry)
        self.delivery_lag = Histogram(
            "consumers_subscription_delivery_lag_seconds", "From an event's commit "
            "(occurredAt) to its sending to a subscription (a replayed event's lag includes "
            "its age).", buckets=LATENCY_BUCKETS, registry=registry)

        # Each metric's child per label values, as `labels()` finds it (the same object), found
        # without its checks and locks on every request.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def started(self, facts: RequestFacts) -> None:
        self._child(self.in_flight, facts.face).inc()

    def finished(self, facts: RequestFacts, status: int, seconds: float) -> None:
        face = facts.face
        self._child(self.in_flight, face).dec()
        self._child(self.requests, face, facts.operation_type, str(status)).inc()
        self._child(self.latency, face, facts.operation_type).observe(seconds)
        self._child(self.statements, face).observe(facts.statements)
        self._child(self.database, face).observe(facts.database_s)
        for code in facts.refusals:
            self._child(self.refusals, code).inc()

    def watch_subscriptions(self, hub: EventHub) -> None:
        def on_delivered(record: EventRecord) -> None:
            self.events_delivered.inc()
            self.delivery_lag.observe(max(0.0, (utcnow() - record.occurred_at).total_seconds()))

        hub.on_change = self.subscriptions.set
        hub.on_delivered = on_delivered

    def watch_pools(self, database: Database) -> None:
        engines: list[tuple[str, Engine]] = [("primary", database.primary_engine.sync_engine),
                                             ("write", database.write_engine.sync_engine)]
        if database.replica_engine is not None:
            engines.append(("replica", database.replica_engine.sync_engine))
        if database.inline is not None:
            engines.append(("inline", database.inline.engine))
        for role, engine in engines:
            self._watch(role, engine)

    def _watch(self, role: str, engine: Engine) -> None:
        pool: Any = engine.pool
        checked_out = self.pool_checked_out.labels(role)
        overflow = self.pool_overflow.labels(role)
        size = getattr(pool, "size", None)
        if callable(size):
            self.pool_size.labels(role).set(size())
        counts_overflow = callable(getattr(pool, "overflow", None))

        def on_checkout(*_args: Any) -> None:
            checked_out.inc()
            if counts_overflow:
                overflow.set(max(0, pool.overflow()))

        def on_checkin(*_args: Any) -> None:
            checked_out.dec()
            if counts_overflow:
                overflow.set(max(0, pool.overflow()))

        event.listen(engine, "checkout", on_checkout)
        event.listen(engine, "checkin", on_checkin)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        registry = self.registry if self.registry is not None else _summed(
            self.directory or "")
        return generate_latest(registry)

    async def endpoint(self, _request: Request) -> Response:
        return Response(self.render(), media_type=CONTENT_TYPE)
