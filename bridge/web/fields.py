"""What the REST API accepts in ids, cursors and text: one rule each, shared by every route.

* Ids (path segments, `patient_id`) and cursors are ASCII digits within the store's BIGINT keys
  (1 .. 2**63-1); anything else is a 400 naming the parameter, before the store is asked. Python's
  `int()` and `str.isdigit()` take other scripts' digits ('٣', '²'), which no client means as an id,
  and an id beyond the key range makes the database driver fail instead of finding nothing.
* Text follows `bridge.store.limits` (as long as the columns that store it, no control characters),
  checked here so that the problem names the field; the service checks the same rules for every
  protocol.

A wrong field of a JSON body or form is a 422 with `field`, a wrong query parameter, path id or cursor a
400 with `parameter`: the body was understood and its content refused, versus a request naming nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import date, datetime
from typing import Any

from aiohttp import web

from bridge.store.limits import CONTROL, TEXT_RULES, text_problem
from bridge.web.problems import ProblemError

# The store's keys are BIGINT (SQLite's INTEGER is 64-bit too); 0 and below are never handed out.
ID_MAX = 2**63 - 1
_ID_DIGITS = len(str(ID_MAX))
BAD_CURSOR = "the cursor is not one this API handed out"


def body_text(body: dict[str, Any], name: str, *, strip: bool = False) -> str:
    """The text field `name` of a JSON body ("" when absent or null), or a 422 naming it."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProblemError(422, f"{name} must be a string, got {type(value).__name__}", field=name)
    value = value.strip() if strip else value
    problem = text_problem(name, value)
    if problem is not None:
        raise ProblemError(422, f"{name} {problem}", field=name)
    return value


def form_text(fields: dict[str, str], name: str) -> str | None:
    """The text field `name` of a multipart form (None when absent), or a 422 naming it."""
    value = fields.get(name)
    if value is not None and (problem := text_problem(name, value)) is not None:
        raise ProblemError(422, f"{name} {problem}", field=name)
    return value


def query_text(request: web.Request, name: str) -> str | None:
    """The query parameter `name` as search text (None when absent or empty), or a 400 naming it."""
    value = request.query.get(name) or None
    if value is not None and (problem := text_problem(name, value)) is not None:
        raise ProblemError(400, f"query parameter {name!r} {problem}", parameter=name)
    return value


def label_text(text: str, name: str) -> str:
    """`text` made safe to record as the label TEXT_RULES[name]: lone surrogates (bytes that were not
    UTF-8, which aiohttp hands on from headers) become U+FFFD, control characters go, and it is cut to
    the column. Lenient, unlike body fields: a label only tags the audit entry, and a PMS whose
    workstation name is in cp1252 must still be served."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return CONTROL.sub("", text)[: TEXT_RULES[name].limit]


def header_text(request: web.Request, header: str, name: str) -> str:
    """The header `header` as the label `name` (see `label_text`); "" when absent."""
    return label_text(request.headers.get(header, ""), name)


def body_birth_date(body: dict[str, Any], name: str) -> date | None:
    """The birth date field `name` of a JSON body (None when absent, null or ""), or a 422 naming it: a
    number (19810102) is refused, not dropped. A date in the future is the service's refusal, as for
    every protocol (`bridge.service._invalid`), answered as a 422 naming the field too."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise ProblemError(422, f"{name} must be an ISO date (YYYY-MM-DD) or null, got {value!r:.40}", field=name)


def query_date(request: web.Request, name: str) -> date | None:
    """The date query parameter `name` (None when absent or empty), or a 400 naming it."""
    value = request.query.get(name)
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        detail = f"query parameter {name!r} must be an ISO date (YYYY-MM-DD), got {value!r:.40}"
        raise ProblemError(400, detail, parameter=name) from None


def parse_number(raw: str) -> int | None:
    """`raw` as a non-negative whole number of ASCII digits (at most 19 significant), else None."""
    if not (raw.isascii() and raw.isdigit()) or len(raw.lstrip("0")) > _ID_DIGITS:
        return None
    return int(raw)


def parse_id(raw: str, name: str) -> int:
    """A row id from a path segment or query parameter: 1 .. 2**63-1 in ASCII digits, else a 400.

    A well-formed id of a row that does not exist is the caller's 404."""
    value = parse_number(raw)
    if value is None or not 1 <= value <= ID_MAX:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise ProblemError(
            400, f"{name} must be a whole number from 1 to {ID_MAX}, got {shown!r}", parameter=name
        )
    return value


def path_id(request: web.Request, name: str = "id") -> int:
    """The id in the route's `{name}` segment (see `parse_id`)."""
    return parse_id(request.match_info[name], name)


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within [low, high]; `default` when absent or empty."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    value = parse_number(raw)
    if value is None or not low <= value <= high:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise ProblemError(
            400,
            f"query parameter {name!r} must be a whole number from {low} to {high}, got {shown!r}",
            parameter=name,
        )
    return value


# --------------------------------------------------------------------------------------------------
# Bodies


BODY_READ_CHUNK = 64 * 1024


async def read_body(request: web.Request, limit: int, too_large: str) -> bytes:
    """The whole request body, or a 413 problem with `too_large` as soon as it passes `limit` bytes
    (from Content-Length, else while reading a chunked body). A single `content.read(n)` is not enough:
    it answers with what has arrived so far, the first chunk of a body sent in several."""
    if (request.content_length or 0) > limit:
        raise ProblemError(413, too_large)
    body = bytearray()
    while chunk := await request.content.read(BODY_READ_CHUNK):
        body += chunk
        if len(body) > limit:
            raise ProblemError(413, too_large)
    return bytes(body)


# --------------------------------------------------------------------------------------------------
# Cursors: base64url (unpadded) JSON of the last row's sort key


def encode_cursor(value: Any) -> str:
    """The opaque cursor for a page ending at the row whose sort key is `value`."""
    return base64.urlsafe_b64encode(json.dumps(value, default=str).encode()).decode().rstrip("=")


def _bad_cursor() -> ProblemError:
    return ProblemError(400, BAD_CURSOR, parameter="cursor")


def _cursor_value(request: web.Request) -> Any:
    """The decoded JSON of the `cursor` parameter, or None when there is none."""
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # ValueError covers bad UTF-8 and JSON
        raise _bad_cursor() from None


def _cursor_id(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= ID_MAX:  # bool is an int, and never an id
        raise _bad_cursor()
    return value


def cursor_after_id(request: web.Request) -> int:
    """The id to list after, for lists ordered by id (patients, conflicts, audit); 0 without a cursor."""
    value = _cursor_value(request)
    return 0 if value is None else _cursor_id(value)


def cursor_after_capture(request: web.Request) -> tuple[datetime | None, int] | None:
    """(captured_at, id) to list a patient's images after, or None without a cursor."""
    value = _cursor_value(request)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise _bad_cursor()
    captured, last_id = value
    if captured is None:
        return None, _cursor_id(last_id)
    if not isinstance(captured, str):
        raise _bad_cursor()
    try:
        moment = datetime.fromisoformat(captured)
    except ValueError:
        raise _bad_cursor() from None
    if moment.tzinfo is not None:  # capture times are the practice's wall clock, handed out naive
        raise _bad_cursor()
    return moment, _cursor_id(last_id)
