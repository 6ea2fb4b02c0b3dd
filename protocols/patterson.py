"""The Patterson Imaging ini Eaglesoft (and Open Dental's Patterson bridge) writes before a launch.

What the PMS sends is known from Open Dental's `Patterson.cs` (reference section 5): first name (40),
middle initial and preferred name (sent empty), last name (40), address (40), city (30), state (2),
zip (10), SSN (9 digits, empty when all zeros), gender (`M`, `F`, or a single space for unknown), birth
date (the Windows short date, at most 11 characters), the patient number (its last 5 characters in the
legacy bridge), the provider number and names. The ini's section and key names are inside a closed DLL
and not public, so they are configuration (`[eaglesoft] ini_section`, `ini_keys`).

The SSN is never read: Patterson treats it as a primary key and merges patients who share one, which is
exactly what this bridge must not do. Patients are matched on the patient number alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bridge.model import Demographics, Sex
from protocols.common import (
    DateFormatError,
    MessageError,
    PatientFields,
    decode,
    field_id,
    field_text,
    parse_date,
    parse_ini,
    parse_sex,
)

MAX_FILE_BYTES = 64 * 1024


def parse(
    data: bytes,
    *,
    section: str,
    keys: Mapping[str, str],
    short_date_formats: Sequence[str],
    encoding: str = "cp1252",
) -> PatientFields:
    """The patient of a Patterson ini; `keys` maps field names (id, last_name ...) to the ini's keys."""
    if len(data) > MAX_FILE_BYTES:
        raise MessageError(f"the ini has {len(data)} bytes; a Patterson ini has at most {MAX_FILE_BYTES}")
    sections = parse_ini(decode(data, encoding).text)
    found = sections.get(section.upper())
    if found is None:
        named = ", ".join(f"[{s.name}]" for s in sections.values() if s.name) or "none"
        raise MessageError(
            f"the ini has no [{section}] section (found: {named}); set [eaglesoft] ini_section to the PMS's"
        )
    id_key = keys.get("id", "")
    if not id_key or id_key not in found:
        raise MessageError(f"the ini has no {id_key or 'patient number'} key in [{section}]")

    def text(name: str, limit: int = 120) -> str:
        ini_key = keys.get(name)
        return field_text(found.get(ini_key), ini_key, limit) if ini_key else ""

    raw_date = text("birth_date", 40)
    try:
        birth = parse_date(raw_date, short_date_formats)
    except DateFormatError:
        raise MessageError(
            f"{keys['birth_date']} {raw_date!r} is not a short date of the configured locale"
        ) from None
    return PatientFields(
        patient_id=field_id(found.get(id_key), id_key),
        demographics=Demographics(
            last_name=text("last_name"),
            first_name=text("first_name"),
            middle_name=text("middle_name"),
            street=text("street", 200),
            city=text("city"),
            postal_code=text("postal_code", 20),
            birth_date=birth,
            sex=Sex(parse_sex(text("sex", 10))),
        ),
    )
