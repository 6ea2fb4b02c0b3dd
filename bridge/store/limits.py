"""How long and what text the store takes: one rule per text, read from the SQLAlchemy models.

* Text is at most as long as every column that stores it, read from the models so the limits cannot
  drift from the schema (PostgreSQL refuses a longer value with an error, SQLite stores it). Lengths
  count UTF-16 code units: SQL Server's NVARCHAR(n) counts those, PostgreSQL and SQLite count
  characters, so a value that fits here fits on all three.
* Text holds no C0 control character, no DEL and no lone surrogate: PostgreSQL refuses NUL in text, no
  encoder writes a lone surrogate (JSON's "\\ud800" makes one), and a control character in an id or a
  name is a fault of the sender, never part of the name. Free text (an image comment, a conflict's
  resolution) may hold tab and line breaks. An id or a name holds no C1 control either (U+0080 to
  U+009F: NEL, or cp1252 bytes read as ISO-8859-15) and no line or paragraph separator (U+2028,
  U+2029): the protocols read a value with one of them as one line (`protocols.common.split_lines`),
  and it must not be stored as a name.
* An id or a name holds no U+FFFD: the protocols' readers put it where a file's bytes were not text in
  the encoding they were read in (a PMS writing cp1252 to a bridge set to UTF-8). Stored, "M\ufffdller"
  would overwrite a correct "Müller" and make a second key; refused, the message names the setting.

The REST API checks its fields with these rules (bridge.web.fields, naming the field in its problem);
the service checks every protocol's request with them (bridge.service), so a PMS message with a
150-character surname is refused in the protocol's way instead of failing on PostgreSQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, String

from bridge.store.models import AuditEntry, ChartAlias, Conflict, Image, Patient, PmsLink

CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CONTROL_IN_FREE_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


@dataclass(frozen=True)
class TextRule:
    """How long a text may be (UTF-16 code units) and whether it is free text (tab, line breaks)."""

    limit: int
    free: bool = False


def column_limit(*columns: Column[Any]) -> int:
    """The longest text every one of `columns` holds: a value that reaches several columns (a PMS id
    is kept in its link and, when refused, in the conflict) must fit the shortest."""
    lengths = []
    for column in columns:
        if not isinstance(column.type, String) or column.type.length is None:
            raise TypeError(f"{column} is not a text column with a length")
        lengths.append(column.type.length)
    return min(lengths)


def _rule(*columns: Column[Any], free: bool = False) -> TextRule:
    return TextRule(column_limit(*columns), free)


def _column(model: type[Any], name: str) -> Column[Any]:
    column: Column[Any] = model.__table__.c[name]
    return column


# The text fields of bridge.model.Demographics, each stored in the patient's column of that name.
DEMOGRAPHIC_TEXTS = (
    "last_name",
    "first_name",
    "middle_name",
    "title",
    "street",
    "city",
    "postal_code",
    "phone",
    "email",
)
# Every text the API stores or searches by, and the columns it ends up in.
TEXT_RULES: dict[str, TextRule] = {
    "pms_system": _rule(_column(PmsLink, "pms_system"), _column(Conflict, "pms_system")),
    "practice_id": _rule(
        _column(PmsLink, "practice_id"), _column(PmsLink, "practice_key"), _column(Conflict, "practice_id")
    ),
    "pms_id": _rule(_column(PmsLink, "pms_id"), _column(Conflict, "pms_id")),
    "chart_number": _rule(_column(ChartAlias, "chart_number"), _column(Conflict, "chart_number")),
    **{name: _rule(_column(Patient, name)) for name in DEMOGRAPHIC_TEXTS},
    "name": _rule(_column(Patient, "name_key")),  # the search: a prefix of the folded "last first"
    "device": _rule(_column(Image, "device")),
    "comment": _rule(_column(Image, "comment"), free=True),
    # A person's note: its first 40 characters are the conflict's resolution (the service cuts it), the
    # whole text goes to the audit log's unbounded detail; 1000 characters is a paragraph.
    "resolution": TextRule(limit=1000, free=True),
    # Headers that only label the audit entry (see `label_text`).
    "workstation": _rule(_column(AuditEntry, "workstation"), _column(Conflict, "origin")),
    "transport": _rule(_column(AuditEntry, "transport")),
    "request_id": _rule(_column(AuditEntry, "request_id")),
}


def text_problem(name: str, value: str) -> str | None:
    """What is wrong with `value` as the text `name` (TEXT_RULES), or None when it is acceptable."""
    rule = TEXT_RULES[name]
    if len(value) > rule.limit:  # code points never outnumber UTF-16 code units: a cheap first test
        return f"must be at most {rule.limit} characters, got {len(value)}"
    found = (_CONTROL_IN_FREE_TEXT if rule.free else CONTROL).search(value)
    if found is not None:
        char = ord(found.group())
        kind = (
            "a lone surrogate"
            if 0xD800 <= char <= 0xDFFF
            else "a line separator"
            if char in (0x2028, 0x2029)
            else "a control character"
        )
        return f"must not contain {kind} (U+{char:04X})"
    if not rule.free and "\ufffd" in value:
        return (
            "must not contain U+FFFD, the replacement character: the sender's bytes were not text in the"
            " encoding they were read in (check the PMS's code page setting, e.g. [vdds] encoding)"
        )
    if not value.isascii() and (units := len(value.encode("utf-16-le")) // 2) > rule.limit:
        return f"must be at most {rule.limit} characters (UTF-16 code units), got {units}"
    return None
