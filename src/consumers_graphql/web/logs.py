"""Logging for ``consumers-graphql serve``: uvicorn's format, and every handler behind a
filter that masks anything shaped like an API key secret.

Nothing here logs request headers (uvicorn's access line is client, method, path, status);
the filter is the second line of defence, for a secret pasted into a URL or an error."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from consumers_graphql.store.keys import LOGGED_SECRET_PATTERN, redact

_PRIMITIVES = (str, int, float, type(None))


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


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's own configuration, plus the filter on every handler and the app's loggers."""
    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_secrets": {"()": RedactSecrets}}
    handlers: Mapping[str, dict[str, Any]] = config["handlers"]
    for handler in handlers.values():
        handler["filters"] = ["redact_secrets"]
    config["loggers"]["consumers_graphql"] = {"level": level.upper(), "propagate": True}
    config["root"] = {"handlers": ["default"], "level": "WARNING"}
    return config
