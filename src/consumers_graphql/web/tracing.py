"""OpenTelemetry traces, on only when an OTLP endpoint is configured
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; the ``[otel]``
extra): a request span (FastAPI's own telemetry), the GraphQL operation's span
(api/tracing.py, on both execution paths) and a span per SQL statement (the SQLAlchemy
instrumentation), exported over OTLP/HTTP. See web/otel.py and the README's "Tracing".

This module imports nothing of OpenTelemetry: with tracing off, neither the SDK, the
exporter nor an instrumentation is loaded, and FastAPI's built-in telemetry is switched
off. (FastAPI itself imports the small ``opentelemetry-api`` package, a dependency of it.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from fastapi.telemetry import TelemetryConfig

from consumers_graphql.errors import ConfigurationError
from consumers_graphql.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from consumers_graphql.web.otel import Tracing

INSTALL = "pip install 'consumers-graphql[otel]'"
_PROTOCOL = "http/protobuf"


class TracingUnavailable(ConfigurationError):
    """Tracing is asked for but cannot run as configured (the ``[otel]`` extra is not
    installed, or an OTEL_* variable names what this build does not export): a configuration
    error, which `serve` reports in one line and exits 2 for."""


class OperationSpan(Protocol):
    """The GraphQL operation's span, as the API face sees it."""

    def describe(self, name: str, attributes: Mapping[str, str],
                 error_codes: Sequence[str]) -> None: ...


# Opens the operation's span and makes it current (SQL spans become its children).
StartOperationSpan = Callable[[], AbstractContextManager[OperationSpan]]


def wanted(settings: Settings) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    endpoint = settings.otel_exporter_otlp_traces_endpoint or settings.otel_exporter_otlp_endpoint
    return (bool(endpoint and endpoint.strip())
            and settings.otel_sdk_disabled.strip().lower() != "true"
            and settings.otel_traces_exporter.strip().lower() != "none")


def check(settings: Settings) -> None:
    """Raises TracingUnavailable when tracing is asked for and cannot run; `serve` calls it
    before it starts anything."""
    if not wanted(settings):
        return
    exporter = settings.otel_traces_exporter.strip().lower()
    if exporter != "otlp":
        raise TracingUnavailable(
            f"OTEL_TRACES_EXPORTER={settings.otel_traces_exporter} is not supported: traces are "
            "exported over OTLP (set it to otlp, or none to turn tracing off).")
    for name, value in (("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                         settings.otel_exporter_otlp_traces_endpoint),
                        ("OTEL_EXPORTER_OTLP_ENDPOINT", settings.otel_exporter_otlp_endpoint)):
        if value and value.strip():
            url = urlsplit(value.strip())
            if url.scheme not in ("http", "https") or not url.hostname:
                # Not repeated: a URL can hold a password.
                raise TracingUnavailable(
                    f"{name} is not an absolute http:// or https:// URL (the collector's "
                    "OTLP/HTTP address, e.g. http://127.0.0.1:4318).")
            break
    protocol = (settings.otel_exporter_otlp_protocol or _PROTOCOL).strip().lower()
    if protocol != _PROTOCOL:
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={settings.otel_exporter_otlp_protocol} is not "
            f"supported: traces are exported as {_PROTOCOL}; point OTEL_EXPORTER_OTLP_ENDPOINT "
            "at the collector's OTLP/HTTP port (4318 by default).")
    try:
        importlib.import_module("consumers_graphql.web.otel")  # the SDK, exporter, instrumentation
    except ImportError:
        raise TracingUnavailable(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is not installed: run "
            f"{INSTALL} (or unset the variable).") from None


def setup(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> Tracing | None:
    """The process's tracing, or None when it is off. A tracer provider passed in (tests)
    turns it on without an endpoint; its owner exports and shuts it down."""
    if tracer_provider is None:
        if not wanted(settings):
            return None
        check(settings)
    from consumers_graphql.web.otel import Tracing

    return Tracing(settings, tracer_provider)


def telemetry(tracing: Tracing | None) -> TelemetryConfig:
    """FastAPI's built-in telemetry: the request span when tracing is on, nothing otherwise
    (not even with a global provider someone else configured); never its metrics (see
    /metrics), its logs (they carry exception messages) or its per-dependency spans, and never
    its own exporter set-up (FASTAPI_OTEL_AUTO_CONFIGURE)."""
    if tracing is None:
        return {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                "auto_configure": False}
    from consumers_graphql.web.otel import untraced

    return {"tracing": True, "tracer_provider": tracing.tracer_provider, "metrics": False,
            "logs": False, "operation_spans": False, "auto_configure": False,
            "exclude": untraced}
