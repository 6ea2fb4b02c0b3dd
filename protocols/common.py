"""Parsing every PMS format shares: text encodings, INI-style key=value files, dates, sex codes.

One place for each of these rules, so VDDS, Dexis, Patterson, CLINIVIEW and OPP agree on what "19850714",
"W" or a UTF-16 file with a BOM mean. Pure functions of bytes and strings: no I/O, no clock, and nothing
heavier than the standard library, because the launch commands a PMS waits on import this module.
"""

from __future__ import annotations

import codecs
import datetime as dt
import functools
import re
from collections.abc import Iterable

# --------------------------------------------------------------------------------------------------
# Encodings

_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class DecodedText:
    """Text decoded from a PMS file, remembering how to write an answer the same way.

    `encoding` is the codec (with `bom` the bytes that preceded the text), `newline` the line ending the
    file used ("\\r\\n" on Windows PMSs, sometimes "\\n").
    """

    __slots__ = ("bom", "encoding", "newline", "text")

    def __init__(self, text: str, encoding: str, bom: bytes, newline: str) -> None:
        self.text = text
        self.encoding = encoding
        self.bom = bom
        self.newline = newline

    def encode(self, text: str) -> bytes:
        """`text` (with "\\n" line ends) as bytes in the received encoding, BOM and line endings.

        Characters the code page cannot hold become "?", as Windows' own conversion does, rather than
        failing the whole answer.
        """
        body = text.replace("\r\n", "\n").replace("\n", self.newline)
        codec = "utf-8" if self.encoding == "utf-8-sig" else self.encoding
        return self.bom + body.encode(codec, errors="replace")


AUTO = "auto"  # a `decode` fallback: UTF-8 when the bytes are UTF-8 with a non-ASCII character, else cp1252


def decode(data: bytes, fallback: str = "cp1252") -> DecodedText:
    """Decode a PMS file: a BOM means UTF-8 or UTF-16 (LE/BE); otherwise the configured code page.

    BOM-less UTF-16 (most high bytes NUL, as in mostly ASCII text) is recognised too. Bytes the code
    page cannot map are kept as U+FFFD rather than refused, so a request is answered rather than dropped.

    The fallback AUTO sniffs BOM-less UTF-8, which some writers use (gdt2dicom writes its VDDS files
    with rust-ini: UTF-8 without a BOM): bytes that are valid UTF-8 and hold at least one multi-byte
    sequence are UTF-8, anything else cp1252. Text in cp1252 is practically never valid UTF-8 once it
    has a non-ASCII letter ("Müller" is 4D FC 6C ..., and FC cannot start a UTF-8 sequence), and pure
    ASCII reads the same either way. An explicit code page is never second-guessed.
    """
    for bom, codec in _BOMS:
        if data.startswith(bom):
            body = data[len(bom) :]
            text = body.decode("utf-8" if codec == "utf-8-sig" else codec, errors="replace")
            return DecodedText(text, codec, bom, _newline(text))
    utf16 = _bomless_utf16(data)
    if utf16:
        text = data.decode(utf16, errors="replace")
        return DecodedText(text, utf16, b"", _newline(text))
    if fallback == AUTO:
        codec = "utf-8" if _multibyte_utf8(data) else "cp1252"
    else:
        codec = "utf-8" if fallback.lower().replace("_", "-") in ("utf-8", "utf8") else fallback
    text = data.decode(codec, errors="replace")
    return DecodedText(text, codec, b"", _newline(text))


def codepage(setting: str) -> str:
    """The code page of the files we write ourselves under an `encoding` setting (a VDDS push file, the
    CSV beside a thumbnail): AUTO means cp1252, what Windows PMSs read [C1]; reading sniffs BOM-less
    UTF-8, but what we write has nothing to sniff from."""
    value = setting.strip().lower()
    return "cp1252" if value in ("", AUTO) else value


def _multibyte_utf8(data: bytes) -> bool:
    """True for bytes that are valid UTF-8 with at least one non-ASCII character."""
    if data.isascii():
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


_UTF16_SNIFF_BYTES = 512  # the first 256 code units: the keys and dates of a PMS file are there


def _bomless_utf16(data: bytes) -> str:
    """The codec of UTF-16 text without a BOM ("utf-16-le" or "utf-16-be"), "" for anything else.

    A PMS file is mostly ASCII (keys, digits, dates), so in UTF-16 most code units have a NUL high byte:
    at odd offsets in little endian, even ones in big endian; cp1252 and UTF-8 text has no NULs. Counting
    over the first bytes, rather than testing the first two characters, still recognises a file that
    starts with a character outside Latin-1 ("Łukasz" is 41 01 in UTF-16LE), which was read as cp1252
    and refused as truncated.
    """
    sample = data[:_UTF16_SNIFF_BYTES]
    units = len(sample) // 2
    if units < 2:
        return ""
    even, odd = sample[0 : 2 * units : 2].count(0), sample[1 : 2 * units : 2].count(0)
    if odd * 2 > units and even * 4 < odd:
        return "utf-16-le"
    if even * 2 > units and odd * 4 < even:
        return "utf-16-be"
    return ""


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text or "\n" not in text else "\n"


# --------------------------------------------------------------------------------------------------
# Lines

_LINE_END = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """The lines of a PMS text as Windows reads them: split at CRLF, CR and LF only, line ends dropped.

    `str.splitlines()` also splits at VT, FF, the separators U+001C-U+001E, NEL (U+0085) and U+2028/
    U+2029; GetPrivateProfileString and the PMSs' own readers do not. A value holding one of them then
    became two lines: `PATID=Z2470817\x0b999` opened patient Z2470817, and `BVS=X\x0bPATID=<id>` smuggled
    a key in. Kept inside its value, the character stays with the field it was sent in, and a field the
    bridge uses is refused by the control-character rules. As `splitlines`, a text ending with a line end
    has no empty last line.
    """
    lines = _LINE_END.split(text)
    if lines[-1] == "":
        lines.pop()
    return lines


def last_line_ended(text: str) -> bool:
    """Whether nothing but blanks follows the text's last CR, LF or CRLF: a file a PMS finished writing.

    Every PMS writer ends its last line (CRLF on Windows, CR-only and LF-only writers exist too), so a
    last line without a terminator is a file cut short or still being written, whose last value may be
    cut ("PN=10" of 1042 names another patient).
    """
    return not _LINE_END.split(text)[-1].strip()


# --------------------------------------------------------------------------------------------------
# INI-style files (Windows GetPrivateProfileString semantics)


class IniSection:
    """One section: keys compared case-insensitively, the original spelling and order kept."""

    __slots__ = ("name", "order", "values")

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[str, str] = {}  # upper-cased key -> value
        self.order: list[str] = []  # keys as written

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key.upper(), default)

    def first(self, *keys: str) -> str:
        """The value of the first of `keys` that is present and not empty (for key variants)."""
        for key in keys:
            value = self.values.get(key.upper(), "")
            if value:
                return value
        return ""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.upper() in self.values

    def set(self, key: str, value: str) -> None:
        if key.upper() not in self.values:
            self.order.append(key)
        self.values[key.upper()] = value

    def items(self) -> Iterable[tuple[str, str]]:
        return ((key, self.values[key.upper()]) for key in self.order)


def parse_ini(text: str) -> dict[str, IniSection]:
    """Sections of an INI text, keyed by upper-cased name, in file order.

    As Windows reads these files: everything after the first "=" is the value (commas, semicolons,
    further "=" and quotes inside are kept); one pair of surrounding double quotes is removed; the first
    occurrence of a key wins; lines without "=" and comment lines (";", "#") are skipped. Keys before any
    section go to the section named "".
    """
    sections: dict[str, IniSection] = {}
    current = sections.setdefault("", IniSection(""))
    for raw in split_lines(text):
        kind, name, value = ini_line(raw)
        if kind == "section":
            current = sections.setdefault(name.upper(), IniSection(name))
        elif kind == "key" and name.upper() not in current.values:
            current.set(name, value)
    if not sections[""].values:
        del sections[""]
    return sections


def ini_line(raw: str) -> tuple[str, str, str]:
    """What one line of an INI text is, as `parse_ini` reads it: ("section", name, ""), ("key", key,
    value) or ("other", "", "") for blank, comment and malformed lines.

    Exposed so that an editor that rewrites a file line by line (a VDDS answer keeps the PMS's own
    lines) sees exactly the sections and keys the parser sees.
    """
    line = raw.strip().lstrip("\ufeff")
    if not line or line[0] in ";#":
        return "other", "", ""
    if line.startswith("[") and "]" in line:
        return "section", line[1 : line.index("]")].strip(), ""
    key, sep, value = line.partition("=")
    if not sep or not key.strip():
        return "other", "", ""
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return "key", key.strip(), value


def render_ini(sections: Iterable[tuple[str, Iterable[tuple[str, str]]]]) -> str:
    """INI text ("\\n" line ends; `DecodedText.encode` converts them) from (section, pairs) in order."""
    out: list[str] = []
    for name, pairs in sections:
        out.append(f"[{name}]")
        out.extend(f"{key}={one_line(value)}" for key, value in pairs)
        out.append("")
    return "\n".join(out)


# Every character str.splitlines() breaks a line at: `parse_ini` splits at CR and LF only, but a PMS
# reading our file with another reader must not see a value as two lines either.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))


def one_line(value: str) -> str:
    """A value can never break the file's structure: every kind of line break becomes a space."""
    return value.translate(_LINE_BREAKS)


def parse_key_values(text: str, *, unquote: bool = False) -> dict[str, str]:
    """KEY=value lines without sections (Dexis info files): upper-cased keys, first occurrence wins.

    With `unquote`, one pair of surrounding double quotes is removed from a value: the Dexis Integrator
    documents `LN="Smith"` while its known writers send `LN=Smith`, so both must read the same.
    """
    found: dict[str, str] = {}
    for raw in split_lines(text):
        key, sep, value = raw.partition("=")
        key = key.strip().upper()
        if sep and key and " " not in key and key not in found:
            value = value.strip()
            if unquote and len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found[key] = value
    return found


# --------------------------------------------------------------------------------------------------
# Fields of launch-style messages (Dexis, Patterson, CLINIVIEW): what they say about one patient


# --------------------------------------------------------------------------------------------------
# Dates

EARLIEST_BIRTH_YEAR = 1880  # as Open Dental's bridges: an earlier year means "no date" (0001-01-01 ...)
BIRTH_DATE_SLACK = dt.timedelta(days=1)


class DateFormatError(ValueError):
    """A date that does not match the format the protocol or configuration prescribes."""


class FutureDateError(DateFormatError):
    """A birth date after `latest_birth_date`: a typo (2099 for 1999), never a patient; refused as any
    invalid date is, each protocol saying "in the future"."""


def latest_birth_date(today: dt.date) -> dt.date:
    """The latest birth date a message may carry: `today` (the daemon's local date) plus one day.

    A birth date is a date of the practice's calendar, and the daemon's date may be a day behind it (a
    server kept in UTC serving a practice at UTC+10 reads "yesterday" until 10:00): a newborn registered
    that morning must not be refused. One day covers any practice against a server in UTC (zones reach
    UTC+14); a later date is a typo. The protocols get `today` from their caller, free of the clock.
    """
    return today + BIRTH_DATE_SLACK


def _two_digit_year(yy: int, month: int, day: int, latest: dt.date) -> dt.date:
    """The date with the year yy in the latest century that does not put it after `latest` (45 is 1945
    and 24 is 2024 in 2026): a birth date is never in the future, so no fixed pivot year is needed."""
    base = latest.year - latest.year % 100 + yy
    for year in (base, base - 100):
        try:
            day_of = dt.date(year, month, day)
        except ValueError:  # 29 February of a century year that is no leap year
            continue
        if day_of <= latest:
            return day_of
    raise DateFormatError(f"{month}/{day}/{yy:02d} is not a date of the calendar")


def _birth_date(parsed: dt.date, text: str, latest: dt.date) -> dt.date | None:
    """A parsed birth date checked: None before 1880 ("no date"), FutureDateError after `latest`."""
    if parsed.year < EARLIEST_BIRTH_YEAR:
        return None
    if parsed > latest:
        raise FutureDateError(f"date {text!r} is in the future")
    return parsed


# .NET custom date format specifiers, as whole runs of one letter ("MMM" is a month name, not "MM" + "M").
_DOTNET_RUNS = {
    "yyyy": "%Y",
    "yy": "%y",
    "MM": "%m",
    "M": "%m",
    "dd": "%d",
    "d": "%d",
    "HH": "%H",
    "H": "%H",
    "mm": "%M",
    "m": "%M",
    "ss": "%S",
    "s": "%S",
}
# Characters with a meaning in .NET formats that this translation does not support (quoted literals,
# escapes, single-specifier "%d"): refused rather than read as literal text.
_DOTNET_UNSUPPORTED = "'\"\\%"
_DOTNET_TOKEN = re.compile(r"([A-Za-z])\1*|.", re.DOTALL)  # a run of one letter, or one other character


def dotnet_to_strptime(fmt: str) -> str:
    """Translate a .NET date format string ("dd.MM.yyyy", "M/d/yyyy", "yyyyMMdd") into strptime's.

    Each run of one letter is one .NET specifier; only unambiguous numeric date/time specifiers are
    accepted ("MMM" month names, "ddd" day names, "tt" and quoted literals raise DateFormatError),
    because a guessed date format files images under the wrong patient. Separators are literal, as in
    .NET's invariant culture ("/" stays "/").
    """
    out: list[str] = []
    for match in _DOTNET_TOKEN.finditer(fmt):
        run = match.group(0)
        if run[0].isalpha():
            directive = _DOTNET_RUNS.get(run)
            if directive is None:
                raise DateFormatError(f"unsupported token {run!r} in date format {fmt!r}")
            out.append(directive)
        elif run in _DOTNET_UNSUPPORTED:
            raise DateFormatError(f"unsupported character {run!r} in date format {fmt!r}")
        else:
            out.append(run)
    result = "".join(out)
    if not all(d in result for d in ("%d", "%m")) or not ("%Y" in result or "%y" in result):
        raise DateFormatError(f"date format {fmt!r} lacks day, month or year")
    return result


def dotnet_date_formats(fmt: str, separators: str = "/.-") -> tuple[str, ...]:
    """The strptime formats a .NET custom date format can produce on any workstation.

    In a .NET custom format "/" is the culture's date separator, not a slash: `ToString("MM/dd/yyyy")`
    writes 07.14.1985 on a German workstation and 07-14-1985 on a Dutch one. The field order stays
    as written, so accepting the other separators never turns a month into a day.
    """
    base = dotnet_to_strptime(fmt)
    if "/" not in fmt:
        return (base,)
    return tuple(dict.fromkeys(base.replace("/", sep) for sep in separators))


# Two numeric fields with no separator between them ("%Y%m%d"): strptime's flexible widths would read
# "710315" as the year 7103 and "1971111" as November 1 (or was it January 11?), so such a value is read
# only when it is exactly what the format writes (every field at its full, zero-padded width).
_ADJACENT_FIELDS = re.compile(r"%[YymdHMS]%[YymdHMS]")


@functools.lru_cache(maxsize=4096)
def _strptime_date(text: str, fmt: str) -> dt.date:
    """strptime, remembered: a PMS sends the same few birth dates again and again, and strptime costs
    tens of microseconds (a failed match raises and is not remembered)."""
    return dt.datetime.strptime(text, fmt).date()


def parse_date(value: str, formats: Iterable[str], *, today: dt.date) -> dt.date | None:
    """The birth date in `value`, trying strptime `formats` in order; None for "no date".

    Empty, all-zero ("00000000", "00.00.0000"), and dates before 1880 (".NET's 1/1/0001") mean the PMS
    has no birth date. A value that matches none of the formats raises DateFormatError, a date after
    `latest_birth_date(today)` FutureDateError. A two-digit year ("%y") is in the latest century that
    does not put the date in the future (strptime's fixed pivot read 7/14/45 as 2045).
    """
    text = value.strip()
    if not text or not text.strip("0-./ "):
        return None
    latest = latest_birth_date(today)
    for fmt in formats:
        try:
            parsed = _strptime_date(text, fmt)
        except ValueError:
            continue
        if _ADJACENT_FIELDS.search(fmt) and parsed.strftime(fmt) != text:
            continue  # fields without separators must have their full widths: see _ADJACENT_FIELDS
        if "%y" in fmt:
            parsed = _two_digit_year(parsed.year % 100, parsed.month, parsed.day, latest)
        return _birth_date(parsed, text, latest)
    if re.fullmatch(r"0*1[./-]0*1[./-]0*1", text):  # 1/1/0001, which strptime cannot read
        return None
    raise DateFormatError(f"date {text!r} does not match {', '.join(formats)}")


# Digits each numeric .NET specifier takes when a value is read exactly: a doubled letter ("MM", "dd",
# "HH") and "yyyy"/"yy" a fixed count, a single letter ("M", "d", "H") one or two.
_DOTNET_WIDTHS = {run: (len(run), len(run)) if len(run) > 1 else (1, 2) for run in _DOTNET_RUNS}


def parse_dotnet_date(value: str, fmt: str, *, today: dt.date) -> dt.date | None:
    """The birth date in `value`, read exactly as the .NET custom format `fmt` writes it; None for "no
    date", FutureDateError after `latest_birth_date(today)` (a "yy" year is read as `parse_date` reads it).

    strptime is lenient about widths ("%Y%m%d" reads "1985111" as 1985-11-01), which guesses a date the
    PMS never wrote. Here a doubled or four-letter field takes exactly that many digits, a single-letter
    field one or two, separators must be there as written, and a value whose digits can be split into
    the fields in more than one way ("1985111" for "yyyyMd": January 11 or November 1) is refused rather
    than read either way. The "no date" values are those of `parse_date`. DateFormatError otherwise.
    """
    dotnet_to_strptime(fmt)  # refuses what the format may not contain (names, escapes, no day)
    text = value.strip()
    if not text or not text.strip("0-./ "):
        return None
    tokens = [match.group(0) for match in _DOTNET_TOKEN.finditer(fmt)]
    readings = _readings(text, tokens)
    if len(readings) != 1:
        reason = "does not match" if not readings else "can be read in more than one way as"
        raise DateFormatError(f"date {text!r} {reason} {fmt!r}")
    fields = readings[0]
    year, month, day = fields.get("y", ""), int(fields["M"]), int(fields["d"])
    latest = latest_birth_date(today)
    try:
        if len(year) == 2:
            parsed = _two_digit_year(int(year), month, day, latest)
        else:
            parsed = dt.date(int(year), month, day)
    except ValueError:  # DateFormatError included
        raise DateFormatError(f"date {text!r} in {fmt!r} is not a date of the calendar") from None
    return _birth_date(parsed, text, latest)


def _readings(text: str, tokens: list[str]) -> list[dict[str, str]]:
    """Every way `text` splits into the format's `tokens` (numeric fields by letter; at most two kept,
    which is enough to tell one from several)."""
    if not tokens:
        return [{}] if not text else []
    token, rest = tokens[0], tokens[1:]
    if not token[0].isalpha():
        return _readings(text[len(token) :], rest) if text.startswith(token) else []
    low, high = _DOTNET_WIDTHS[token]
    found: list[dict[str, str]] = []
    for width in range(low, min(high, len(text)) + 1):
        digits = text[:width]
        if not (digits.isascii() and digits.isdigit()):
            break
        for reading in _readings(text[width:], rest):
            found.append({**reading, token[0]: digits})
            if len(found) > 1:
                return found
    return found


# Short date formats of the workstation locales the US/Canadian bridges write (Dexis info file, Patterson).
LOCALE_SHORT_DATES: dict[str, tuple[str, ...]] = {
    "en-us": ("%m/%d/%Y", "%m/%d/%y"),
    "en-ca": ("%d/%m/%Y", "%Y-%m-%d", "%d/%m/%y"),
    "fr-ca": ("%Y-%m-%d", "%d/%m/%Y"),
    "en-gb": ("%d/%m/%Y", "%d/%m/%y"),
    "de-de": ("%d.%m.%Y", "%d.%m.%y"),
    "de-at": ("%d.%m.%Y", "%d.%m.%y"),
    "de-ch": ("%d.%m.%Y", "%d.%m.%y"),
    "nl-nl": ("%d-%m-%Y",),
    "fr-fr": ("%d/%m/%Y",),
    "iso": ("%Y-%m-%d",),
}


def locale_formats(locale: str) -> tuple[str, ...]:
    """The short-date formats of a configured locale; a day/month ambiguity is settled by it alone."""
    try:
        return LOCALE_SHORT_DATES[locale.lower()]
    except KeyError:
        raise DateFormatError(f"unknown locale {locale!r}; known: {', '.join(LOCALE_SHORT_DATES)}") from None


# --------------------------------------------------------------------------------------------------
# Sex codes

# Every dialect's codes: M/MALE; W (weiblich)/F/FEMALE; D (divers), X, I, O, OTHER; U, " ", empty.
_SEX_CODES = {
    "M": "M",
    "MALE": "M",
    "MAENNLICH": "M",
    "MÄNNLICH": "M",
    "W": "F",
    "F": "F",
    "FEMALE": "F",
    "WEIBLICH": "F",
    "D": "O",
    "X": "O",
    "I": "O",
    "O": "O",
    "OTHER": "O",
    "DIVERS": "O",
    "U": "U",
    "UNKNOWN": "U",
}


def parse_sex(value: str) -> str:
    """'M', 'F', 'O' or 'U' for any dialect's code; anything unrecognised is unknown, never guessed.

    Blank is unknown too: Patterson writes a single space for it, the Dexis Integrator omits the key.
    """
    return _SEX_CODES.get(value.strip().upper(), "U")
