"""Pseudonymising PHI in recorded PMS traffic, consistently within one capture.

A capture sent to a vendor must not carry names, birth dates, ids, addresses or SSNs, yet must still
replay: the same input value always gets the same pseudonym inside one capture (an HMAC under a secret
that lives only in the recording daemon's memory), and a pseudonym keeps the shape of what it replaces
(digits stay digits, letters stay letters, the length stays, a date stays a valid date in the same
textual format), so parsers, code pages and field limits treat it like the original.

Known limit: two spellings of one name (Müller, Mueller) get unrelated pseudonyms, so a recorded session
that relied on the spelling rule replays as a conflict. Documented in docs/replay.md.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import itertools
import json
import re
import secrets
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from urllib.parse import quote, quote_plus

from protocols.common import latest_birth_date

# Textual forms a date takes in PMS traffic (VDDS, OPP, Dexis, Patterson, CLINIVIEW, JSON, DICOM).
DATE_FORMATS = (
    "%Y%m%d",
    "%Y-%m-%d",
    "%d.%m.%Y",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%Y/%m/%d",
    "{M}/{D}/%Y",
    "{D}.{M}.%Y",
    "{D}/{M}/%Y",
)
# .NET date format runs (as PMSs declare them: OPP -d/dateFormat, CLINIVIEW settings) in the forms above.
_DOTNET_DATE_RUNS = {"yyyy": "%Y", "yy": "%y", "MM": "%m", "M": "{M}", "dd": "%d", "d": "{D}"}
MIN_LENGTH = 2  # single characters (an initial, a sex code) are not identifying on their own
MAX_DRAWS = 50  # pseudonyms drawn until one keeps the original's date-ness (or side of 12, for a date)


def date_format_forms(dotnet: str) -> tuple[str, ...]:
    """The forms (as in DATE_FORMATS) a numeric .NET date format ("dd.MM.yy", "M/d/yyyy") writes, one per
    date separator ("/" is the workstation's separator in .NET); () when `dotnet` is not such a format.

    A message's declared format is structure, not PHI, and it tells how the message's dates read."""
    out = []
    for run in re.finditer(r"([A-Za-z])\1*|.", dotnet):
        piece = run.group(0)
        directive = _DOTNET_DATE_RUNS.get(piece) if piece[0].isalpha() else piece if piece in "./- " else None
        if directive is None:
            return ()
        out.append(directive)
    base = "".join(out)
    fields = [("%d", "{D}"), ("%m", "{M}"), ("%Y", "%y")]
    if sorted(base.count(a) + base.count(b) for a, b in fields) != [1, 1, 1]:
        return ()
    return tuple(dict.fromkeys(base.replace("/", sep) for sep in "/.-")) if "/" in base else (base,)


def _format(day: date, fmt: str) -> str:
    return day.strftime(fmt.replace("{M}", str(day.month)).replace("{D}", str(day.day)))


def _parse_date(text: str, formats: Sequence[str] = DATE_FORMATS) -> tuple[date, str] | None:
    """The date `text` reads as in one of `formats`, with that format; None when it is none."""
    if not any(ch.isdigit() for ch in text):
        return None
    for fmt in formats:
        try:
            parsed = datetime.strptime(text, fmt.replace("{M}", "%m").replace("{D}", "%d"))
        except ValueError:
            continue
        return parsed.date(), fmt
    return None


@dataclass
class Redactor:
    """Replaces PHI values with consistent pseudonyms; `learn` what is sensitive, then `apply`."""

    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _values: dict[str, str] = field(default_factory=dict)  # original text -> pseudonym text
    # DATE_FORMATS and the formats the traffic declares (learn_formats): a date is replaced in all of them
    _formats: list[str] = field(default_factory=lambda: list(DATE_FORMATS))
    _dates: set[date] = field(default_factory=set)
    _fake_dates: dict[date, date] = field(default_factory=dict)  # every date's pseudonym, once drawn
    _pattern: re.Pattern[str] | None = None

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, kind: str, value: str) -> str:
        """A same-shaped stand-in for `value`: digits for digits, letters (same case) for letters.

        It is a date exactly when `value` is one: a date becomes another date in the same format, and a
        token of a message the bridge refused (a birth date of 31.31.1970) never turns into a valid date,
        or the capture would replay as accepted. It is neither a value learned so far nor another value's
        pseudonym: two patients must stay two on replay, and a capture must not show one patient's
        value in another's place."""
        dated = _parse_date(value, self._formats)
        if dated is not None:
            day, fmt = dated
            return _format(self.pseudo_date(day), fmt)
        taken = self._values.keys() | set(self._values.values())
        for attempt in range(MAX_DRAWS):
            fake = self._shaped(f"{kind}\0{attempt}" if attempt else kind, value)
            if fake != value and _parse_date(fake, self._formats) is None and fake not in taken:
                return fake
        # A short value whose shape is nearly used up (many two-digit ids): the first free form in order;
        # failing that, one that is only another learned value (replaced itself wherever it stands), since
        # two values sharing a pseudonym would become one patient on replay.
        fakes = set(self._values.values())
        for avoid in (taken, fakes):
            for fake in _same_shaped(value):
                if fake != value and fake not in avoid and _parse_date(fake, self._formats) is None:
                    return fake
        # every form of the shape is some value's pseudonym, or it has none (no letter or digit): never the
        # original itself
        return "X" * len(value)

    def _shaped(self, kind: str, value: str) -> str:
        stream = self._digest(kind, value)
        while len(stream) < len(value):
            stream += hashlib.sha256(stream).digest()
        out = []
        for ch, byte in zip(value, stream, strict=False):
            if ch.isdigit():
                out.append(string.digits[byte % 10])
            elif ch.isalpha():
                letters = string.ascii_uppercase if ch.isupper() else string.ascii_lowercase
                out.append(letters[byte % 26])
            else:
                out.append(ch)
        return "".join(out)

    def pseudo_date(self, day: date) -> date:
        """Another valid date, 1 to 3650 days away, the same for the same input, whose day is above 12
        exactly when the original's is.

        The day decides whether a day-first text (14/07/1985) also reads month-first: keeping it on the same
        side of 12 keeps every form of the date valid or invalid in the other order, so a date refused in a
        month-first message (a Dexis BD of 14/07/1985 on an en-US profile) is refused again on replay.
        A birth date after `latest_birth_date` (refused as in the future) moves further into the future,
        every other one back in time, so each is refused or accepted on replay as it was.
        It is neither a date learned so far nor another date's pseudonym (a birth date and the conflicting
        one a year later must stay two dates on replay, and neither may show the other's real value)."""
        if day in self._fake_dates:
            return self._fake_dates[day]
        taken = self._dates | set(self._fake_dates.values())
        shifted = day
        later = day.year <= 1905 or day > latest_birth_date(date.today())
        for attempt in range(MAX_DRAWS):
            kind = f"date\0{attempt}" if attempt else "date"
            offset = int.from_bytes(self._digest(kind, day.isoformat())[:4], "big") % 3650 + 1
            shifted = day + timedelta(days=offset) if later else day - timedelta(days=offset)
            if (shifted.day > 12) == (day.day > 12) and shifted not in taken:
                break
        else:
            # about one capture in 2**50: the same side of 12 by hand (13 to 28 exist in every month)
            shifted = shifted.replace(day=13 + shifted.day % 16 if day.day > 12 else 1 + shifted.day % 12)
        self._fake_dates[day] = shifted
        return shifted

    def learn_text(self, kind: str, value: str) -> None:
        """Mark a text value (name, id, address, SSN) as sensitive, with the forms it takes in traffic."""
        value = value.strip()
        if len(value) < MIN_LENGTH or value in self._values:
            return
        fake = self.pseudonym(kind, value)
        for original, pseudo in _variants(value, fake):
            self._values.setdefault(original, pseudo)
        self._pattern = None

    def learn_date(self, day: date | None) -> None:
        """Mark a date as sensitive, in every known textual form."""
        if day is None:
            return
        self._dates.add(day)
        fake = self.pseudo_date(day)
        for fmt in self._formats:
            self._values.setdefault(_format(day, fmt), _format(fake, fmt))
        self._pattern = None

    def learn_formats(self, formats: Iterable[str]) -> None:
        """Date forms (as in DATE_FORMATS) a message declares or the configuration sets (dd-MM-yyyy,
        yyyy.MM.dd): the dates learned before and after are replaced in them too, and a token that reads
        as a date in them is replaced by a date (see `pseudonym`)."""
        new = [fmt for fmt in formats if fmt not in self._formats]
        if not new:
            return
        self._formats += new
        for day in self._dates:
            fake = self.pseudo_date(day)
            for fmt in new:
                self._values.setdefault(_format(day, fmt), _format(fake, fmt))
        self._pattern = None

    def learn_all(self, items: Iterable[tuple[str, str]]) -> None:
        for kind, value in items:
            self.learn_text(kind, value)

    def apply(self, text: str) -> str:
        """`text` with every learned value replaced (whole tokens only, longest values first)."""
        if not self._values:
            return text
        if self._pattern is None:
            alternatives = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile(
                r"(?<![0-9A-Za-zÀ-ÿ])(" + "|".join(map(re.escape, alternatives)) + r")(?![0-9A-Za-zÀ-ÿ])"
            )
        return self._pattern.sub(lambda m: self._values[m.group(1)], text)

    @property
    def originals(self) -> list[str]:
        """Every learned original form (what must not appear in a capture)."""
        return list(self._values)


MAX_SCAN = 100_000  # forms of a value tried in order after the random draws (a 5-digit id has 100,000)


def _same_shaped(value: str) -> Iterator[str]:
    """The texts of `value`'s shape in order (digits for digits, letters of the same case for letters, the
    rest as it is), at most MAX_SCAN of them."""
    slots = [
        (
            i,
            string.digits
            if ch.isdigit()
            else string.ascii_uppercase
            if ch.isupper()
            else string.ascii_lowercase,
        )
        for i, ch in enumerate(value)
        if ch.isdigit() or ch.isalpha()
    ]
    chars = list(value)
    for choice in itertools.islice(itertools.product(*(alphabet for _, alphabet in slots)), MAX_SCAN):
        for (index, _), ch in zip(slots, choice, strict=True):
            chars[index] = ch
        yield "".join(chars)


def _variants(value: str, fake: str) -> list[tuple[str, str]]:
    """The forms a value takes in traffic (as sent, upper case, XML/HTML-, JSON- and URL-escaped)."""
    pairs = [
        (value, fake),
        (value.upper(), fake.upper()),
        (html.escape(value, quote=True), html.escape(fake, quote=True)),
        (
            html.escape(value, quote=False).replace("'", "&apos;"),
            html.escape(fake, quote=False).replace("'", "&apos;"),
        ),
        (json.dumps(value)[1:-1], json.dumps(fake)[1:-1]),
        (json.dumps(value, ensure_ascii=False)[1:-1], json.dumps(fake, ensure_ascii=False)[1:-1]),
        (quote(value, safe=""), quote(fake, safe="")),
        (quote_plus(value), quote_plus(fake)),
    ]
    return [(a, b) for a, b in pairs if a]
