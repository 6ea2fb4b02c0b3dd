"""CLINIVIEW (Instrumentarium / KaVo) launches: the one-argument command line and Cliniview.ini.

The argument is confirmed (Open Dental's `Cliniview.cs`, "info directly from the programmers at
CliniView"): `-<id>;<first>;<last>;<ssn>;<birth date MM/dd/yyyy>`. The PMS removes spaces and ";" from
the names ("Van Der Berg" arrives as "VanDerBerg"), so names from here are never a key; the SSN may be
empty or zeros and is never read. `MM/dd/yyyy` is a .NET custom format, whose "/" is the workstation's
date separator: the month comes first everywhere, the separator varies.

Cliniview.ini is what DTX Studio reads from PMSs "that support CLINIVIEW"; its section and key names are
not public, so they are configuration (`[cliniview] ini_section`, `ini_keys`, `ini_date_format`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

from bridge.model import Demographics, Sex
from protocols.common import DateFormatError, FutureDateError, parse_date, parse_sex
from protocols.fields import MessageError, PatientFields, field_id, field_text, read_mapped_ini

MAX_ARGUMENT_CHARS = 1024
ARGUMENT_FIELDS = 5  # id, first, last, SSN, birth date


def parse_argument(argument: str, *, date_formats: Sequence[str], today: date) -> PatientFields:
    """The patient of a `-ID;FIRST;LAST;SSN;BIRTHDATE` argument (a birth date after `today` refused)."""
    text = argument.strip()
    if len(text) > MAX_ARGUMENT_CHARS:
        raise MessageError(f"the argument is longer than {MAX_ARGUMENT_CHARS} characters")
    if not text.startswith("-"):
        raise MessageError("expected one argument -ID;FIRST;LAST;SSN;MM/dd/yyyy")
    parts = text[1:].split(";")
    if len(parts) != ARGUMENT_FIELDS:
        truncated = ": the argument is truncated" if len(parts) < ARGUMENT_FIELDS else ""
        raise MessageError(
            f"expected {ARGUMENT_FIELDS} fields -ID;FIRST;LAST;SSN;MM/dd/yyyy, got {len(parts)}{truncated}"
        )
    patient_id, first, last, ssn, raw_date = parts  # the SSN is never used, only kept out of captures
    return PatientFields(
        patient_id=field_id(patient_id, "patient id"),
        demographics=Demographics(
            last_name=field_text(last, "last name"),
            first_name=field_text(first, "first name"),
            birth_date=_date(raw_date, date_formats, "birth date", today),
        ),
        sensitive=(ssn.strip(),) if ssn.strip() else (),
    )


def parse_ini_file(
    data: bytes,
    *,
    section: str,
    keys: Mapping[str, str],
    date_formats: Sequence[str],
    today: date,
    encoding: str = "cp1252",
) -> PatientFields:
    """The patient of a Cliniview.ini; `keys` maps field names (id, last_name ...) to the ini's keys;
    `today` is the daemon's date, which the birth date may not be after."""
    ini = read_mapped_ini(
        data,
        section=section,
        keys=keys,
        encoding=encoding,
        what="Cliniview.ini",
        setting="[cliniview] ini_section",
    )
    return PatientFields(
        patient_id=ini.patient_id(),
        demographics=Demographics(
            last_name=ini.name("last_name"),
            first_name=ini.name("first_name"),
            middle_name=ini.text("middle_name"),
            birth_date=ini.date("birth_date", date_formats, today),
            sex=Sex(parse_sex(ini.text("sex", 10))),
        ),
        sensitive=ini.unmapped_values(),
    )


def _date(value: str, formats: Sequence[str], name: str, today: date) -> date | None:
    try:
        return parse_date(value, formats, today=today)
    except FutureDateError:
        raise MessageError(f"{name} {value.strip()!r} is in the future") from None
    except DateFormatError:
        raise MessageError(f"{name} {value.strip()!r} is not a date in the configured format") from None
