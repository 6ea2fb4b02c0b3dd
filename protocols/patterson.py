"""The Patterson Imaging ini Eaglesoft (and Open Dental's Patterson bridge) writes before a launch.

What the PMS sends is known from Open Dental's `Patterson.cs` (reference section 5): first name (40),
middle initial and preferred name (sent empty), last name (40), address (40), city (30), state (2),
zip (10), SSN (9 digits, empty when all zeros), gender (`M`, `F`, or a single space for unknown), birth
date (the Windows short date, at most 11 characters), the patient number (its last 5 characters in the
legacy bridge), the provider number and names. The ini's section and key names are inside a closed DLL
and not public, so they are configuration (`[eaglesoft] ini_section`, `ini_keys`).

The SSN is never used or stored: Patterson treats it as a primary key and merges patients who share one,
which is exactly what this bridge must not do. Patients are matched on the patient number alone. (Record
mode is told the values of unmapped keys, the SSN among them, only to keep them out of captures.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

from bridge.model import Demographics, Sex
from protocols.common import parse_sex
from protocols.fields import PatientFields, read_mapped_ini


def parse(
    data: bytes,
    *,
    section: str,
    keys: Mapping[str, str],
    short_date_formats: Sequence[str],
    today: date,
    encoding: str = "cp1252",
) -> PatientFields:
    """The patient of a Patterson ini; `keys` maps field names (id, last_name ...) to the ini's keys;
    `today` is the daemon's date, which the birth date may not be after."""
    ini = read_mapped_ini(
        data, section=section, keys=keys, encoding=encoding, what="the ini", setting="[eaglesoft] ini_section"
    )
    return PatientFields(
        patient_id=ini.patient_id(),
        demographics=Demographics(
            last_name=ini.name("last_name"),
            first_name=ini.name("first_name"),
            middle_name=ini.text("middle_name"),
            street=ini.text("street", 200),
            city=ini.text("city"),
            postal_code=ini.text("postal_code", 20),
            birth_date=ini.date("birth_date", short_date_formats, today),
            sex=Sex(parse_sex(ini.text("sex", 10))),
        ),
        sensitive=ini.unmapped_values(),
    )
