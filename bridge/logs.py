"""Structured logging: one line per event, JSON by default, with the request id of the current request.

The request id lives in a context variable set where a request enters (HTTP middleware, watched-folder
file, launch command); database worker threads inherit it (`Database` copies the context), so every line
a request causes carries the same id, from the listener down to the store.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

# Attributes every LogRecord has; anything else passed in `extra=` is a structured field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


_REQUEST_ID_PREFIX = secrets.token_hex(3)
_request_numbers = itertools.count()


def new_request_id() -> str:
    """12 hex digits: a per-process random prefix and a counter. Unique enough to find a request in the
    logs, and free of the getrandom system call a random id costs on every request."""
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers) & 0xFFFFFF:06x}"


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and the `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id  # type: ignore[attr-defined]
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name != "request_id":
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A readable single line for a console: time, level, request id, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and k != "request_id"
        )
        rid = getattr(record, "request_id", "")
        line = (
            f"{self.formatTime(record)} {record.levelname:<7} {rid + ' ' if rid else ''}{record.getMessage()}"
        )
        if fields:
            line += f" [{fields}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class MalformedRequestFilter(logging.Filter):
    """Keeps the request line of a malformed HTTP request out of the logs.

    aiohttp logs a request it cannot parse (`aiohttp.server`, "Error handling request from <address>")
    with a traceback whose exception quotes the raw request line: an OPP web call whose query holds
    unencoded names (`GET /opp?lastName=Müller ...`, a space or tab in a value, a query over 8190
    bytes) put those names into the daemon log, which carries paths only (docs/operations.md, "Logs").
    Such a record becomes one line with the exception's class and the client's address; a malformed
    request is the client's fault, so it is a warning, not an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError  # loaded already: aiohttp is logging

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            client = record.args[0] if isinstance(record.args, tuple) and record.args else ""
            record.msg, record.args = "malformed HTTP request refused", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.error = type(exc).__name__
            record.client = str(client)
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure(level: str = "info", fmt: str = "json", file: Path | None = None) -> None:
    """Set up the root logger once for the daemon or a command."""
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_ContextFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
