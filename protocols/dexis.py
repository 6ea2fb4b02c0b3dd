"""Dexis-style bridge messages: the classic info file, the Dexis Integrator file and its SET command.

Three shapes of one key set (Open Dental's `Dexis.cs` and `DexisIntegrator.cs`, reference section 6):

* Classic info file, passed as `DEXIS.EXE "@<file>"`: a free first line ("Smith, John  7/14/1985  (17)"),
  then `PN=`, `LN=`, `FN=`, `BD=` in the workstation's *short date* format, and `SX=F` or `SX=M`, where M
  is written for everyone who is not female. cp1252, CRLF, every line ended.
* Integrator communication file `Patient_<workstation>.txt`: `PN=` (up to 12 characters), `LN=`, `FN=`,
  `MI=`, `BD=yyyyMMdd` only for a valid date, `SX=F|M` only when known. Values may be quoted.
* SET command (the Integrator's DDE Execute string): `SET <id> LN="<last>" FN="<first>" MI="<mi>"
  BD=<yyyyMMdd>`, under 256 characters.

`CN=` (a chart number beside the internal id) is this bridge's extension for Dentrix program links; no
Dexis writer sends it. The patient id is the only matching key; names are lossy in cp1252.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from bridge.model import Demographics, Sex
from protocols.common import (
    DateFormatError,
    FutureDateError,
    decode,
    last_line_ended,
    parse_date,
    parse_key_values,
    parse_sex,
    split_lines,
)
from protocols.fields import MessageError, PatientFields, field_id, field_text

INFO_FILE = "info-file"
INTEGRATOR = "integrator"

MAX_FILE_BYTES = 64 * 1024  # a Dexis file is a few hundred bytes
MAX_COMMAND_CHARS = 1024  # the Integrator's own limit is 255; some room for other writers
INTEGRATOR_DATE: tuple[str, ...] = ("%Y%m%d",)

# Lines every known writer writes; optional ones (the Integrator's MI, BD, SX; the classic SX, which a
# MediaDent-style writer may leave out) are not required, so no writer's files are refused for them.
_REQUIRED = {INFO_FILE: ("PN", "LN", "FN", "BD"), INTEGRATOR: ("PN", "LN", "FN")}
_KEY_BOUNDARY = re.compile(r"\s+(?=[A-Z]{2}=)")
_INTEGRATOR_FILE = re.compile(r"^Patient_(?P<workstation>.+)\.txt$", re.IGNORECASE)


def integrator_workstation(name: str) -> str | None:
    """The workstation an Integrator communication file is named after (`Patient_<workstation>.txt`, any
    case); None for any other file name, which a watched Integrator folder leaves alone."""
    match = _INTEGRATOR_FILE.match(name)
    return match.group("workstation") if match else None


@dataclass(frozen=True)
class DexisMessage:
    """A parsed Dexis message and which dialect it was in (INFO_FILE, INTEGRATOR or "set")."""

    fields: PatientFields
    dialect: str


def is_set_command(text: str) -> bool:
    """True for a SET command string (what the Integrator receives over DDE)."""
    return text.lstrip().upper().startswith("SET ")


def parse_file(
    data: bytes,
    *,
    short_date_formats: Sequence[str],
    today: date,
    encoding: str = "cp1252",
    info_file_male: bool = False,
) -> DexisMessage:
    """Read a classic info file or an Integrator file (told apart by the free first line).

    `short_date_formats` are the configured workstation locale's (classic BD); `info_file_male` says
    whether the classic file's `SX=M` means male or, as by default, "not female" (unknown). `today` is
    the daemon's date, which `BD` may not be after.
    """
    if len(data) > MAX_FILE_BYTES:
        raise MessageError(f"the file has {len(data)} bytes; a Dexis file has at most {MAX_FILE_BYTES}")
    text = decode(data, encoding).text
    if not text.strip():
        raise MessageError("the file is empty")
    if not last_line_ended(text):  # CRLF, LF or CR-only, as the Patterson and Cliniview readers accept
        raise MessageError("the file ends in the middle of a line: it is truncated or still being written")
    first = next(line for line in split_lines(text) if line.strip())
    dialect = INTEGRATOR if first.lstrip().upper().startswith("PN=") else INFO_FILE
    values = parse_key_values(text, unquote=True)
    # A missing required line means a file cut at a line end, which the trailing-newline test cannot see.
    for required in _REQUIRED[dialect]:
        if required not in values:
            raise MessageError(f"the file has no {required}= line: it is truncated or not a Dexis file")
    if dialect == INTEGRATOR:
        formats, date_label, sex = INTEGRATOR_DATE, "yyyyMMdd", _sex(values.get("SX", ""))
    else:
        formats, date_label = tuple(short_date_formats), "the configured locale's short date"
        sex = _info_file_sex(values.get("SX", ""), info_file_male)
    return DexisMessage(_fields(values, formats, date_label, sex, today), dialect)


def parse_set_command(command: str, *, today: date) -> PatientFields:
    """Read `SET <id> LN="..." FN="..." MI="..." BD=yyyyMMdd`, quoted or not.

    A value runs to the next `XX=` key, so a command whose quotes a shell removed (or whose arguments
    were split at spaces and joined again) reads the same: `LN=Van Der Berg FN=Ann`. What the
    Integrator file requires is required here too (the id, `LN=` and `FN=`), and a value with an
    unbalanced quote is refused: both are what a command cut short looks like.
    """
    text = command.strip()
    if len(text) > MAX_COMMAND_CHARS:
        raise MessageError(f"the SET command is longer than {MAX_COMMAND_CHARS} characters")
    if not is_set_command(text + " "):
        raise MessageError("not a SET command: expected SET <id> LN=... FN=... BD=yyyyMMdd")
    rest = text[3:].strip()
    if rest.startswith('"'):
        end = rest.find('"', 1)
        if end < 0:
            raise MessageError("the patient id of the SET command has no closing quote")
        patient_id, rest = rest[1:end], rest[end + 1 :]
    else:
        patient_id, _, rest = rest.partition(" ")
        if "=" in patient_id:
            # Without this, `SET LN="Smith" FN=...` keys the patient by the text "LN=Smith", one record
            # shared by every such launch.
            raise MessageError(f"the SET command has no patient id: {patient_id[:40]!r} is a key, not an id")
    values: dict[str, str] = {}
    for part in _KEY_BOUNDARY.split(" " + rest.strip())[1:] if rest.strip() else []:
        key, _, value = part.partition("=")
        value = value.strip()
        if value.count('"') % 2:
            # An opening quote whose value never closes is a command cut short (`LN="Smit`): its value,
            # and any value after it, would overwrite the stored one with a fragment.
            raise MessageError(f"{key} has an unbalanced quote: the SET command is truncated")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values.setdefault(key, value)
    if rest.strip() and not _KEY_BOUNDARY.match(" " + rest.strip()):
        raise MessageError(f"unexpected text after the patient id: {rest.strip()[:40]!r}")
    values["PN"] = field_id(patient_id, "PN")
    for required in _REQUIRED[INTEGRATOR]:  # what the Integrator file requires
        if required not in values:
            raise MessageError(
                f"the SET command has no {required}=: it is truncated or not an Integrator SET"
            )
    return _fields(values, INTEGRATOR_DATE, "yyyyMMdd", _sex(values.get("SX", "")), today)


def _fields(
    values: dict[str, str], formats: Sequence[str], date_label: str, sex: Sex, today: date
) -> PatientFields:
    raw_date = values.get("BD", "")
    try:
        birth = parse_date(raw_date, formats, today=today)
    except FutureDateError:
        raise MessageError(f"BD {raw_date.strip()!r} is in the future") from None
    except DateFormatError:
        raise MessageError(f"BD {raw_date.strip()!r} is not a date in {date_label}") from None
    chart = values.get("CN", "").strip()
    return PatientFields(
        patient_id=field_id(values.get("PN", ""), "PN"),
        chart_number=field_id(chart, "CN") if chart else "",
        demographics=Demographics(
            last_name=field_text(values.get("LN", ""), "LN"),
            first_name=field_text(values.get("FN", ""), "FN"),
            middle_name=field_text(values.get("MI", ""), "MI"),
            birth_date=birth,
            sex=sex,
        ),
    )


def _sex(value: str) -> Sex:
    """Integrator and SET: F, M, or nothing for unknown ("Dexis has no support for unknown")."""
    return Sex(parse_sex(value))


def _info_file_sex(value: str, male_means_male: bool) -> Sex:
    """Classic info file: F is female; M is written for male *and* unknown, so it is unknown unless the
    practice's PMS is known to send M only for men."""
    sex = Sex(parse_sex(value))
    if sex is Sex.MALE and not male_means_male:
        return Sex.UNKNOWN
    return sex
