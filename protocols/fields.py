"""Fields of launch-style messages (Dexis, Patterson, CLINIVIEW): checked text, ids, configurable INI maps.

Apart from `protocols.common` because these produce `bridge.model` types: `protocols.common` must stay
cheap to import for the launch client's daemon-down answer (VDDS), which a PMS waits on.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bridge.model import Demographics
from protocols.common import (
    DateFormatError,
    FutureDateError,
    IniSection,
    decode,
    last_line_ended,
    parse_date,
    parse_ini,
)


class MessageError(ValueError):
    """A PMS message that cannot be served as sent. The text is one line the PMS's user can act on."""


@dataclass(frozen=True)
class PatientFields:
    """What a launch-style message says about its patient, before the PMS profile says what its id is.

    `patient_id` is the one id the message carries (the profile's `id_field` says whether the PMS sends
    its internal id or the chart number there); `chart_number` is a second id a few messages carry
    beside it (Dentrix's `CN=`), empty otherwise.
    """

    patient_id: str
    demographics: Demographics
    chart_number: str = ""
    # Values the message carries that the store never keeps (an SSN, a provider's name): not used for
    # anything but telling record mode what to pseudonymise.
    sensitive: tuple[str, ...] = field(default=(), repr=False)


def field_text(value: str, name: str, max_length: int = 120) -> str:
    """A text field of a message, stripped; control characters or an absurd length are refused.

    The limit protects the store (names are at most 120 characters there) and makes a corrupt file fail
    with a message naming the field instead of a database error. Line and paragraph separators (U+2028,
    U+2029) count as control characters: a line of the file holds them (`split_lines`), a name does not.
    """
    text = value.strip()
    if len(text) > max_length:
        raise MessageError(f"{name} is longer than {max_length} characters")
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text):
        raise MessageError(f"{name} contains control characters")
    return text


def field_id(value: str, name: str, max_length: int = 60) -> str:
    """An id field (patient number, chart number): required, one line, opaque (leading zeros kept)."""
    text = field_text(value, name, max_length)
    if not text:
        raise MessageError(f"{name} is empty: the message names no patient")
    return text


MAX_INI_BYTES = 64 * 1024  # a launch ini (Patterson, Cliniview.ini) is a few hundred bytes


class MappedIni:
    """One section of an INI a PMS writes under key names of its own, read through a field -> key map.

    For formats whose key names are not public (Patterson Imaging ini, Cliniview.ini): the map comes
    from configuration, and every error names the key as the file spells it.
    """

    def __init__(self, section: IniSection, keys: Mapping[str, str], what: str) -> None:
        self.section = section
        self.keys = keys
        self.what = what

    def text(self, name: str, max_length: int = 120) -> str:
        """A mapped field's text; "" when the map has no key for it or the file lacks the key."""
        ini_key = self.keys.get(name)
        return field_text(self.section.get(ini_key), ini_key, max_length) if ini_key else ""

    def name(self, name: str) -> str:
        """A mapped name field (last_name, first_name), whose key must be present when it is mapped.

        Every patient has a last and a first name in the PMS, so a file without one of their keys was
        cut at a line end, which the end-of-line test cannot see; as the Dexis files' required lines, it
        is refused rather than creating a patient without that name. A site whose PMS writes no such
        key leaves the field out of `ini_keys`.
        """
        ini_key = self.keys.get(name)
        if ini_key and ini_key not in self.section:
            raise MessageError(
                f"{self.what} has no {ini_key} key in [{self.section.name}]: it is truncated or not the PMS's"
            )
        return self.text(name)

    def unmapped_values(self) -> tuple[str, ...]:
        """The values of the section's other keys (an SSN, providers, phone numbers): never used, but
        record mode must know them to keep them out of a capture."""
        mapped = {key.upper() for key in self.keys.values()}
        return tuple(
            value for key, value in self.section.items() if key.upper() not in mapped and value.strip()
        )

    def patient_id(self) -> str:
        """The mapped `id` field, required: a file without it is truncated or not the PMS's."""
        ini_key = self.keys.get("id", "")
        if not ini_key or ini_key not in self.section:
            raise MessageError(f"{self.what} has no {ini_key or 'patient id'} key in [{self.section.name}]")
        return field_id(self.section.get(ini_key), ini_key)

    def date(self, name: str, formats: Iterable[str], today: dt.date) -> dt.date | None:
        """A mapped date field in one of `formats`; a date in another format is refused, not guessed, and
        so is one after `today` (`latest_birth_date`)."""
        value = self.text(name, 40)
        try:
            return parse_date(value, formats, today=today)
        except FutureDateError:
            raise MessageError(f"{self.keys.get(name, name)} {value!r} is in the future") from None
        except DateFormatError:
            raise MessageError(
                f"{self.keys.get(name, name)} {value!r} is not a date in the configured format"
            ) from None


def read_mapped_ini(
    data: bytes, *, section: str, keys: Mapping[str, str], encoding: str, what: str, setting: str
) -> MappedIni:
    """The configured section of an INI message; a missing one is refused naming the sections found.

    Every line must be ended: every captured Patterson ini and Cliniview.ini ends its last line with
    CRLF, so a last line without a terminator is a file cut short, refused whole (as the Dexis parser
    does) rather than read with a shortened id, date or name (docs/us-pms.md, "Truncation").
    """
    if len(data) > MAX_INI_BYTES:
        raise MessageError(f"{what} has {len(data)} bytes; at most {MAX_INI_BYTES} are read")
    text = decode(data, encoding).text
    if not last_line_ended(text):
        # Read while the PMS was still writing it: the last value may be cut short ("PatientNumber=10"
        # of 1042 names another patient), so nothing in it can be trusted.
        raise MessageError(f"{what} ends in the middle of a line: it is truncated or still being written")
    sections = parse_ini(text)
    found = sections.get(section.upper())
    if found is None:
        named = ", ".join(f"[{s.name}]" for s in sections.values() if s.name) or "none"
        raise MessageError(f"{what} has no [{section}] section (found: {named}); set {setting}")
    return MappedIni(found, keys, what)
