"""Logging for ``consumers-graphql serve``: text (uvicorn's format) or one JSON object per
line (`CONSUMERS_LOG_FORMAT`), every handler behind a filter that masks anything shaped
like an API key secret, and every line written during a request carrying its request id.

Nothing here logs request headers, bodies or query strings (the access line, access_log.py,
has the path only); the filter is the second line of defence, for a secret pasted into a
URL or an error, and the JSON formatter masks its whole line once more."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from consumers_graphql.settings import LogFormat
from consumers_graphql.store.keys import LOGGED_SECRET_PATTERN, redact
from consumers_graphql.web import request_id

# The attribute of a record that holds an access line's fields (see access_log.py).
ACCESS_FIELDS = "access"

_PRIMITIVES = (str, int, float, type(None))


class QuietSockets(logging.Filter):
    """Drops uvicorn's own lines about each WebSocket (`"WebSocket /graphql" [accepted]`, with
    the client's address, and the websockets library's `connection open` and `connection
    closed`): the access log writes one line per socket instead (access_log.py)."""

    CHATTER = frozenset({'%s - "WebSocket %s" [accepted]', "connection open",
                         "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith(("uvicorn", "websockets"))
                    and record.msg in self.CHATTER)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(args, tuple) and all(isinstance(arg, _PRIMITIVES) for arg in args):
            # Keep the tuple's shape: uvicorn's access formatter reads it by position.
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif args:
            # Structured arguments (dicts, ASGI scopes with their headers at trace level):
            # render, then mask the rendered line.
            message = record.getMessage()
            if LOGGED_SECRET_PATTERN.search(message):
                record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class WithRequestId(logging.Filter):
    """The id of the request being served, on every line logged while it is (uvicorn's
    errors, the app's warnings, a 500's traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.current.get()
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, request_id when there is
    one, an access line's fields (access_log.py), and the traceback of an error."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, ACCESS_FIELDS, None)
        line: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            # An access line's numbers are fields of their own, not repeated in its message.
            "message": (f"{fields['method']} {fields['path']} {fields['status']}"
                        if isinstance(fields, dict) else record.getMessage()),
        }
        current = getattr(record, "request_id", None)
        if current is not None:
            line["request_id"] = current
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return redact(json.dumps(line, ensure_ascii=False, default=str))


def log_config(level: str, log_format: LogFormat = LogFormat.TEXT) -> dict[str, Any]:
    """uvicorn's own configuration (its formats, or JSON), the filters on every handler, the
    app's loggers; access lines (consumers_graphql.access) on stdout, as uvicorn's were."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_secrets": {"()": RedactSecrets},
                         "request_id": {"()": WithRequestId},
                         "quiet_sockets": {"()": QuietSockets}}
    text = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s",
            "use_colors": None}
    formatter = text if log_format is LogFormat.TEXT else {"()": JsonFormatter}
    config["formatters"] = {"default": formatter, "access": formatter}
    handlers: Mapping[str, dict[str, Any]] = config["handlers"]
    for handler in handlers.values():
        handler["filters"] = ["quiet_sockets", "redact_secrets", "request_id"]
    config["loggers"]["consumers_graphql"] = {"level": level.upper(), "propagate": True}
    config["loggers"]["consumers_graphql.access"] = {"handlers": ["access"],
                                                     "propagate": False}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
