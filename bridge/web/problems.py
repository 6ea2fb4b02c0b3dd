"""RFC 9457 problem details: every HTTP error the bridge sends is one of these JSON bodies.

The `type` URIs are stable names (not links to fetch); tests and clients compare them.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from aiohttp import web

PROBLEM_TYPE_BASE = "urn:pms-bridge:problem:"
CONTENT_TYPE = "application/problem+json"

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal error",
    502: "Bad gateway",
    503: "Service unavailable",
    507: "Insufficient storage",
}

# An OSError with one of these means the store's disk or quota is full (507); any other one escaping a
# handler, that the store cannot be reached or written right now (503). Both say more to an admin than
# "internal error".
STORAGE_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def storage_status(exc: OSError) -> int:
    """The HTTP status for a failure of the disk or share under the store."""
    return 507 if exc.errno in STORAGE_FULL else 503


def json_text(data: Any) -> str:
    """`data` as JSON text, non-ASCII as it is; a text holding a lone surrogate (a file name that is not
    UTF-8, as Python keeps it) has no UTF-8 form, so then every non-ASCII character is escaped instead."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(data, default=str)
    return text


def problem(status: int, detail: str, *, kind: str = "", instance: str = "", **extra: Any) -> web.Response:
    """A problem+json response; `kind` names the problem type (defaults to the status' title)."""
    title = TITLES.get(status, "Error")
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    body.update(extra)
    headers = {"WWW-Authenticate": 'Bearer realm="pms-bridge"'} if status == 401 else None
    return web.Response(status=status, text=json_text(body), content_type=CONTENT_TYPE, headers=headers)


class ProblemError(Exception):
    """Raised by handlers to answer with a problem body; the middleware renders it."""

    def __init__(self, status: int, detail: str, *, kind: str = "", **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.extra = extra

    def response(self, instance: str = "") -> web.Response:
        return problem(self.status, self.detail, kind=self.kind, instance=instance, **self.extra)
