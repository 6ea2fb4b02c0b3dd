"""OPP, the Open Practice Protocol (DTX Studio's PMS interface): its XML message, its command-line flags,
the OPP web parameters, and the OPP web answer.

Three ways in, one message: the file-based XML (`<opp version><command/><software/><patient/></opp>`), the
command-line flags (`-p 0815 -l Müller -d dd.MM.yyyy ...`) and OPP web's query or form parameters all
become the same `OppMessage`, built and validated by one function (`from_fields`), so the three transports
cannot disagree on what a field means. Confirmed facts and inferred points are listed in docs/opp.md;
every inferred point is a field of `OppOptions` (from the `[opp]` settings), not a constant here.

Pure: bytes and strings in, `PatientRequest` out; `Outcome` in, bytes out. No I/O, no clock, no database.
XML is parsed with entity resolution and network access off, no huge trees, a size limit, and any DTD
refused before parsing (XXE and entity-expansion bombs never reach the parser). lxml is imported only
when XML is parsed or written: the config layer imports this module for the flag vocabulary.
"""

from __future__ import annotations

import codecs
import enum
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from bridge.model import Action, Demographics, Origin, Outcome, PatientRequest, Sex
from protocols.common import DateFormatError, FutureDateError, decode, dotnet_to_strptime, parse_dotnet_date

if TYPE_CHECKING:
    from lxml import etree

MAX_XML_BYTES = 64 * 1024  # an OPP message is a few hundred bytes; anything near this is not one
MAX_FIELD_CHARS = 200  # fields the store does not keep (softwareVersion ...): a corrupt message, not a name
# The OPP fields the store keeps, and the request field each becomes. Their limits are the store's
# (`OppOptions.field_limits`, given by the daemon from bridge.store.limits), so a value too long for its
# column is refused here as field-too-long naming the OPP field, not later by the service in its words.
STORED_FIELDS: dict[str, str] = {
    "software": "pms_system",
    "practiceId": "practice_id",
    "reference": "pms_id",
    "firstName": "first_name",
    "lastName": "last_name",
    "middleName": "middle_name",
}
DEFAULT_VERSION = "1.3"  # what the command line and OPP web parameters speak when they name none
ISO_DATE = "yyyy-MM-dd"  # .NET notation, as the -d flag's

# Versions 1.0 to 1.3, optionally with a revision ("1.3.4"); anything else is refused.
_SUPPORTED_VERSION = re.compile(r"1\.[0-3](?:\.\d{1,3})?")
_XML_DECLARATION = re.compile(r"\A\s*<\?xml[^>]*\?>")
_DECLARED_ENCODING = re.compile(rb"\A\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._:-]{1,40})[\"']")
_DTD = re.compile(r"<!DOCTYPE|<!ENTITY", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What XML 1.0 cannot carry besides the C0 controls (which text fields turn into spaces): refused in any
# field, so nothing an answer cannot hold is stored.
_NOT_XML = re.compile("[\ud800-\udfff\ufffe\uffff]")
# Everything XML 1.0 cannot carry: replaced in an answer, since other protocols may have stored it.
_UNWRITABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class Command(enum.StrEnum):
    """OPP commands (the v1.0 ... v1.3 changelog names them; their semantics are inferred from names)."""

    UPDATE = "UPDATE"
    UPDATE_CREATE = "UPDATE_CREATE"
    ACQUIRE = "ACQUIRE"
    VIEW = "VIEW"
    VIEW_DATA = "VIEW_DATA"


# What each command asks of the service. UPDATE never creates; VIEW_DATA reads (BridgeService.view_data).
COMMAND_ACTIONS: dict[Command, Action] = {
    Command.UPDATE: Action.UPDATE,
    Command.UPDATE_CREATE: Action.OPEN,
    Command.ACQUIRE: Action.ACQUIRE,
    Command.VIEW: Action.OPEN,
    Command.VIEW_DATA: Action.LIST_IMAGES,
}

# The field names every transport shares: the XML attribute names (plus `command`, `silent`, `software`,
# `softwareVersion`, `version` and the command line's `dateFormat`). OPP web parameters use these names.
FIELDS = (
    "command",
    "silent",
    "software",
    "softwareVersion",
    "practiceId",
    "reference",
    "firstName",
    "lastName",
    "middleName",
    "birthdate",
    "gender",
    "dateFormat",
    "version",
)

# The command-line flags. Confirmed: -p/-P exist (v1.1: "UPDATE ... in combination with -p, -P") and
# -d/-D pass a .NET date format (v1.3 rev. 2). Everything else here is inferred and configurable
# ([opp] cli_flags); docs/opp.md says so.
DEFAULT_CLI_FLAGS = (
    "c=command p=reference f=firstName l=lastName m=middleName b=birthdate g=gender s=silent d=dateFormat"
)

_GENDERS = {"MALE": Sex.MALE, "FEMALE": Sex.FEMALE}
_GENDER_WORDS = {Sex.MALE: "MALE", Sex.FEMALE: "FEMALE", Sex.OTHER: "OTHER", Sex.UNKNOWN: "UNKNOWN"}


class OppError(ValueError):
    """A message OPP cannot accept; `kind` names the problem (it becomes the problem type on OPP web)."""

    def __init__(self, message: str, kind: str = "invalid-message") -> None:
        super().__init__(message)
        self.kind = kind


def is_flag_letter(text: str) -> bool:
    """One ASCII letter: the letter of an OPP flag (`-p`). Not `str.isalpha`, which takes `é`, `ß` or `ª`
    too: OPP's flags are getopt-style letters of Windows PMSs' command lines, and case folding (`-P` =
    `-p`) is only one letter to one letter for ASCII (`"ß".swapcase()` is `"SS"`)."""
    return len(text) == 1 and text.isascii() and text.isalpha()


def split_flags(args: Sequence[str]) -> list[tuple[str, str | None]]:
    """Each argument of the flag form as (flag, value), by its getopt-style grammar: `-p0815` is
    ("-p", "0815"); a lone `-p` is ("-p", None) and the argument after it is its value, ("", arg), even when
    it starts with `-` (`-l -Strich`); any other argument is ("", arg).

    The one reading of the grammar for the parser (`parse_args`) and for record mode, which redacts a value
    attached to its flag apart from the flag; neither refuses anything here.
    """
    parts: list[tuple[str, str | None]] = []
    value_next = False
    for arg in args:
        if not value_next and arg[:1] == "-" and is_flag_letter(arg[1:2]):
            parts.append((arg[:2], arg[2:] if len(arg) > 2 else None))
            value_next = len(arg) == 2
        else:
            parts.append(("", arg))
            value_next = False
    return parts


def parse_flag_map(text: str) -> dict[str, str]:
    """`"p=reference f=firstName ..."` (spaces or commas between pairs) as {letter: field}.

    Raises ValueError naming the bad pair: a flag is one letter, a field one of FIELDS, a letter once.
    """
    flags: dict[str, str] = {}
    for pair in text.replace(",", " ").split():
        letter, sep, name = pair.partition("=")
        if not sep or not is_flag_letter(letter):
            raise ValueError(f"{pair!r} is not LETTER=FIELD")
        if name not in FIELDS:
            raise ValueError(f"{pair!r}: {name!r} is not one of {', '.join(FIELDS)}")
        if letter in flags:
            raise ValueError(f"flag -{letter} is mapped twice")
        flags[letter] = name
    if "reference" not in flags.values():
        raise ValueError("no flag carries the patient reference")
    return flags


@dataclass(frozen=True)
class OppOptions:
    """The inferred points of OPP, as the `[opp]` settings fix them (see docs/opp.md)."""

    software_name: str = "OPP"  # pms_system when a message names no software (the command line never does)
    practice_id: str = ""  # practice id when a message carries none
    practice_id_attribute: str = "practiceId"  # on <patient>, else on <software>
    middle_name_attribute: str = "middleName"  # on <patient> (v1.3 rev. 4; name not seen)
    encoding: str = "cp1252"  # XML that is neither UTF-8 nor what it declares
    cli_flags: Mapping[str, str] = field(default_factory=lambda: parse_flag_map(DEFAULT_CLI_FLAGS))
    cli_case_sensitive: bool = False  # no: -P means -p (as -d/-D name one option in the changelog)
    cli_command: Command = Command.UPDATE_CREATE  # when the command line names no command
    max_bytes: int = MAX_XML_BYTES
    # The longest text each of STORED_FIELDS may hold, in UTF-16 code units as the store counts them
    # (its columns' lengths); a field not named here may hold MAX_FIELD_CHARS characters.
    field_limits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OppMessage:
    """One OPP request, whichever transport it came by."""

    version: str
    command: Command
    silent: bool
    software: str
    software_version: str
    practice_id: str
    reference: str
    demographics: Demographics
    data_elements: int = 0  # <data> children of the XML (shape unpublished): counted, not interpreted

    def request(self, origin: Origin) -> PatientRequest:
        """The service request this message makes; the patient key is (software, practice, reference)."""
        return PatientRequest(
            action=COMMAND_ACTIONS[self.command],
            origin=origin,
            pms_system=self.software,
            pms_id=self.reference,
            practice_id=self.practice_id,
            demographics=self.demographics,
            silent=self.silent,
        )


# --------------------------------------------------------------------------------------------------
# Fields -> message (shared by the three transports)


def from_fields(
    fields: Mapping[str, str],
    options: OppOptions,
    *,
    today: date,
    version: str = DEFAULT_VERSION,
    data_elements: int = 0,
) -> OppMessage:
    """Validate fields named as in FIELDS into a message; OppError names the first bad field. `today` is
    the daemon's date, which a birth date may not be after (`latest_birth_date`)."""
    for name, value in fields.items():
        if found := _NOT_XML.search(value):
            raise OppError(
                f"{name} contains U+{ord(found.group()):04X}, a character XML cannot carry", "invalid-field"
            )
    version = fields.get("version", "").strip() or version
    check_version(version)
    raw_command = fields.get("command", "").strip()
    if not raw_command:
        raise OppError("the message names no command", "unknown-command")
    try:
        command = Command(raw_command.upper())
    except ValueError:
        known = ", ".join(c.value for c in Command)
        raise OppError(f"unknown OPP command {raw_command!r} (known: {known})", "unknown-command") from None
    reference = _field(fields, options, "reference")
    if not reference:
        raise OppError("the message carries no patient reference", "missing-reference")
    return OppMessage(
        version=version,
        command=command,
        silent=_silent(fields.get("silent", "")),
        software=_field(fields, options, "software") or options.software_name,
        software_version=_field(fields, options, "softwareVersion"),
        practice_id=_field(fields, options, "practiceId") or options.practice_id,
        reference=reference,
        demographics=Demographics(
            last_name=_field(fields, options, "lastName"),
            first_name=_field(fields, options, "firstName"),
            middle_name=_field(fields, options, "middleName"),
            birth_date=_birth_date(fields.get("birthdate", ""), fields.get("dateFormat", ""), today),
            sex=_GENDERS.get(fields.get("gender", "").strip().upper(), Sex.UNKNOWN),
        ),
        data_elements=data_elements,
    )


def check_version(version: str) -> None:
    """Versions 1.0 to 1.3 (with an optional revision); OppError for any other."""
    if not _SUPPORTED_VERSION.fullmatch(version):
        raise OppError(
            f"OPP version {version!r} is not supported (supported: 1.0 to 1.3)", "unsupported-version"
        )


def _field(fields: Mapping[str, str], options: OppOptions, name: str) -> str:
    """A text field: trimmed, control characters as spaces, at most as long as `options.field_limits`
    allows (else MAX_FIELD_CHARS). A stored field is measured as the store measures it, in UTF-16 code
    units (SQL Server's NVARCHAR counts those), so 61 emoji (122 units) are field-too-long as 121 letters
    are, not a different refusal by the service."""
    value = _CONTROL.sub(" ", fields.get(name, "")).strip()
    limit = options.field_limits.get(name, MAX_FIELD_CHARS)
    if len(value) > limit:
        raise OppError(f"{name} is longer than {limit} characters", "field-too-long")
    # Lone surrogates were refused before (_NOT_XML): every character encodes.
    if name in options.field_limits and (units := len(value.encode("utf-16-le")) // 2) > limit:
        raise OppError(
            f"{name} is longer than {limit} characters (UTF-16 code units, as the store counts), got {units}",
            "field-too-long",
        )
    return value


def _silent(value: str) -> bool:
    word = value.strip().upper()
    if word in ("", "NO"):
        return False
    if word == "YES":
        return True
    raise OppError(f"silent must be YES or NO, got {value!r}", "invalid-field")


def _birth_date(value: str, dotnet_format: str, today: date) -> date | None:
    """ISO (yyyy-MM-dd) unless the PMS passes a .NET format, read exactly as that format writes dates
    (`parse_dotnet_date`: "1985111" is not read as a yyyyMMdd date); a two-digit year is refused, not
    guessed."""
    fmt = dotnet_format.strip() or ISO_DATE
    try:
        directives = dotnet_to_strptime(fmt)
    except DateFormatError as exc:
        raise OppError(str(exc), "invalid-date-format") from None
    if "%Y" not in directives:
        raise OppError(
            f"date format {fmt!r} has a two-digit year, which cannot tell 1925 from 2025; use yyyy",
            "invalid-date-format",
        )
    try:
        return parse_dotnet_date(value, fmt, today=today)
    except FutureDateError:
        raise OppError(f"birthdate {value.strip()!r} is in the future", "invalid-date") from None
    except DateFormatError:
        raise OppError(f"birthdate {value.strip()!r} does not match {fmt}", "invalid-date") from None


# --------------------------------------------------------------------------------------------------
# The command line


def parse_args(args: Sequence[str], options: OppOptions, *, today: date) -> OppMessage:
    """The flag form: `-p 0815 -l Müller ...` (getopt style: `-p0815` works too; a value may start with -).

    With `cli_case_sensitive` off, a flag not mapped as written is looked up in the other case.
    """
    fields: dict[str, str] = {}
    flags = options.cli_flags
    parts = split_flags(args)
    i = 0
    while i < len(parts):
        flag, value = parts[i]
        if not flag:
            raise OppError(f"unexpected argument {value!r}: OPP flags look like -p VALUE", "invalid-flag")
        letter = flag[1]
        name = flags.get(letter)
        if name is None and not options.cli_case_sensitive:
            name = flags.get(letter.swapcase())
        if name is None:
            known = " ".join(f"-{k} ({v})" for k, v in flags.items())
            raise OppError(f"unknown flag -{letter} (known: {known})", "invalid-flag")
        if value is None:
            if i + 1 == len(args):
                raise OppError(f"flag -{letter} ({name}) needs a value", "invalid-flag")
            i += 1
            value = args[i]
        if name in fields:
            raise OppError(f"{name} is given twice (flag -{letter})", "invalid-flag")
        fields[name] = value
        i += 1
    fields.setdefault("command", options.cli_command.value)
    return from_fields(fields, options, today=today)


# --------------------------------------------------------------------------------------------------
# OPP web parameters


def parse_params(params: Iterable[tuple[str, str]], options: OppOptions, *, today: date) -> OppMessage:
    """Query or form parameters named as in FIELDS (names compared case-insensitively; others ignored).

    A parameter given twice is refused, as a flag given twice is: `reference=D1&reference=D2` names two
    patients, and taking either one files images under a patient the PMS may not have meant.
    """
    by_lower = {name.lower(): name for name in FIELDS}
    fields: dict[str, str] = {}
    for key, value in params:
        name = by_lower.get(key.lower())
        if name is None:
            continue
        if name in fields:
            raise OppError(f"parameter {name} is given twice", "invalid-field")
        fields[name] = value
    return from_fields(fields, options, today=today)


def form_params(data: bytes, charset: str | None, fallback: str) -> list[tuple[str, str]]:
    """The (name, value) pairs of a query string or an application/x-www-form-urlencoded body, as sent
    (`+` a space, %XX a byte), each value decoded by `decode_param`. Names are compared with the ASCII
    field names only, so they are read byte for byte (latin-1)."""
    codec = text_codec(charset) if charset else "utf-8"
    pairs: list[tuple[str, str]] = []
    for piece in data.split(b"&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition(b"=")
        name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("latin-1")
        pairs.append(
            (name, decode_param(name, unquote_to_bytes(raw_value.replace(b"+", b" ")), codec, fallback))
        )
    return pairs


def decode_param(name: str, data: bytes, codec: str, fallback: str) -> str:
    """A parameter's bytes as text: in `codec` (the request's charset, UTF-8 when it names none), else in
    the `fallback` code page (`[opp] encoding`, as for XML: a PMS percent-encoding Latin-1 means
    "Müller", never "M\ufffdller"); OppError naming the parameter when neither reads them."""
    for candidate in dict.fromkeys((codec, fallback)):
        try:
            return data.decode(candidate)
        except UnicodeError:
            continue
    raise OppError(
        f"parameter {name} is neither {codec} nor {fallback} text (the [opp] encoding)", "invalid-field"
    )


# --------------------------------------------------------------------------------------------------
# XML


# Codecs Python has that are no text encoding a PMS writes XML in: escape codecs would read `\u0030` in
# a name as "0", punycode/idna are for host names, UTF-7 can yield lone surrogates, "undefined" always fails.
_NOT_TEXT_CODECS = frozenset(
    {"undefined", "unicode-escape", "raw-unicode-escape", "punycode", "idna", "utf-7"}
)


def text_codec(name: str) -> str:
    """The codec for an encoding a message names (XML declaration, charset parameter), as Python names
    it; OppError (`unsupported-encoding`) for a name that is no text encoding, whatever Python knows
    (base64, rot13, unicode_escape, punycode ...: a codec lookup alone would honour those)."""
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise OppError(f"unknown encoding {name!r}", "unsupported-encoding") from None
    if not info._is_text_encoding or info.name in _NOT_TEXT_CODECS:
        raise OppError(f"{name!r} is not a text encoding OPP accepts", "unsupported-encoding")
    return info.name


def xml_text(data: bytes, fallback: str) -> str:
    """The text of an XML document, by XML's rules with one concession to Windows PMSs.

    A BOM (UTF-8, UTF-16) decides; else the declared encoding; else UTF-8. Bytes that are not valid in
    that encoding are read with the `fallback` code page: PMSs that declare UTF-8 and write cp1252 are
    common, and a readable umlaut beats a refused patient. Bytes without a BOM and without a NUL byte
    are not UTF-16 (or UTF-32) whatever they declare: .NET's StringWriter declares utf-16 on text that
    is then written as UTF-8, so such a declaration is read as UTF-8.
    """
    if data[:3] == b"\xef\xbb\xbf" or data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4]:
        return decode(data, fallback).text
    declared = _DECLARED_ENCODING.match(data)
    codec = "utf-8"
    if declared:
        try:
            codec = text_codec(declared.group(1).decode("ascii"))
        except OppError as exc:
            raise OppError(f"{exc} in the XML declaration", "not-xml") from None
    if codec.startswith(("utf-16", "utf-32")) and b"\x00" not in data:
        codec = "utf-8"
    try:
        return data.decode(codec)
    except UnicodeError:
        return data.decode(fallback, errors="replace")


def _local(element: etree._Element) -> str:
    tag = element.tag
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


_parsers = threading.local()


def _parser() -> etree.XMLParser:
    """This thread's safe parser: no entities resolved, no network, no huge trees, no DTD loaded.

    lxml parsers may be reused but not shared between threads; building one costs more than parsing a
    message.
    """
    parser: etree.XMLParser | None = getattr(_parsers, "parser", None)
    if parser is None:
        from lxml import etree

        parser = etree.XMLParser(
            resolve_entities=False,
            no_network=True,
            huge_tree=False,
            load_dtd=False,
            remove_comments=True,
            remove_pis=True,
        )
        _parsers.parser = parser
    return parser


def parse_xml(data: bytes, options: OppOptions, *, today: date) -> OppMessage:
    """The file-based XML form (also OPP web's POST body)."""
    from lxml import etree

    if len(data) > options.max_bytes:
        raise OppError(f"an OPP message may be at most {options.max_bytes} bytes", "too-large")
    if not data.strip():
        raise OppError("the message is empty", "not-xml")
    text = xml_text(data, options.encoding)
    if _DTD.search(text):
        raise OppError(
            "DTDs and entity declarations are not accepted in OPP messages (XXE protection)", "forbidden-dtd"
        )
    parser = _parser()
    body = _XML_DECLARATION.sub("", text.lstrip("\ufeff"), count=1)
    try:
        root = etree.fromstring(body.encode("utf-8"), parser)
    except etree.XMLSyntaxError as exc:
        raise OppError(f"not well-formed XML: {exc.msg}", "not-xml") from None
    if _local(root) != "opp":
        raise OppError(f"the root element is <{_local(root)}>, not <opp>", "not-opp")
    version = root.get("version")
    if version is None:
        raise OppError("the <opp> element has no version attribute", "unsupported-version")
    check_version(version)  # before the content: another version may mean another shape
    found: dict[str, list[etree._Element]] = {}
    for child in root:
        found.setdefault(_local(child), []).append(child)
    for name in ("command", "patient"):
        if name not in found:
            raise OppError(f"the <opp> element has no <{name}> element", "invalid-message")
    for name in ("command", "patient", "software"):  # the software name is part of the patient key
        if len(found.get(name, ())) > 1:
            raise OppError(f"the <opp> element has {len(found[name])} <{name}> elements, not one")
    command, patient = found["command"][0], found["patient"][0]
    software = found.get("software", [None])[0]

    def attr(element: etree._Element | None, name: str) -> str:
        return "" if element is None else element.get(name, "")

    fields = {
        "version": version,
        "command": attr(command, "type"),
        "silent": attr(command, "silent"),
        "software": attr(software, "name"),
        "softwareVersion": attr(software, "version"),
        "practiceId": attr(patient, options.practice_id_attribute)
        or attr(software, options.practice_id_attribute),
        "reference": attr(patient, "reference"),
        "firstName": attr(patient, "firstName"),
        "lastName": attr(patient, "lastName"),
        "middleName": attr(patient, options.middle_name_attribute),
        "birthdate": attr(patient, "birthdate"),
        "gender": attr(patient, "gender"),
    }
    return from_fields(
        fields, options, today=today, version=version, data_elements=len(found.get("data", []))
    )


# --------------------------------------------------------------------------------------------------
# The OPP web answer


def answer_data(outcome: Outcome, message: OppMessage, thumbnail_urls: Mapping[int, str]) -> dict[str, Any]:
    """The answer as JSON-ready data: status, the store's patient id, the patient, and for VIEW_DATA the
    images with their watermarked thumbnail URLs."""
    patient = outcome.patient
    data: dict[str, Any] = {
        "version": message.version,
        "command": message.command.value,
        "status": outcome.status.value,
        "message": outcome.message,
        "patient_id": patient.id if patient else None,
        "patient": patient.to_json() if patient else None,
    }
    if message.command is Command.VIEW_DATA:
        data["images"] = [
            {**image.to_json(), "thumbnail_url": thumbnail_urls.get(image.id, "")} for image in outcome.images
        ]
    return data


def render_json(outcome: Outcome, message: OppMessage, thumbnail_urls: Mapping[int, str]) -> bytes:
    """The JSON answer, UTF-8; a lone surrogate (which UTF-8 cannot hold) becomes "?" rather than fail."""
    text = json.dumps(answer_data(outcome, message, thumbnail_urls), ensure_ascii=False)
    return text.encode("utf-8", errors="replace")


def _writable(text: str) -> str:
    """`text` as XML 1.0 can carry it: what it cannot becomes U+FFFD. OPP refuses such characters on the
    way in, but a patient stored through another protocol may hold them, and one stored name must not
    make every answer about that patient fail."""
    return _UNWRITABLE.sub("\ufffd", text)


def _element(parent: etree._Element, tag: str, **attributes: str) -> etree._Element:
    from lxml import etree

    return etree.SubElement(parent, tag, {name: _writable(value) for name, value in attributes.items()})


def render_xml(outcome: Outcome, message: OppMessage, thumbnail_urls: Mapping[int, str]) -> bytes:
    """`<oppResult version command status patientId><message/><patient/><images><image/>...</oppResult>`,
    UTF-8, written by lxml so names with apostrophes, ampersands and umlauts are escaped correctly;
    characters XML cannot carry become U+FFFD (`_writable`)."""
    from lxml import etree

    root = etree.Element(
        "oppResult",
        version=message.version,
        command=message.command.value,
        status=outcome.status.value,
    )
    patient = outcome.patient
    if patient is not None:
        root.set("patientId", str(patient.id))
    _element(root, "message").text = _writable(outcome.message)
    if patient is not None:
        _element(
            root,
            "patient",
            id=str(patient.id),
            reference=patient.pms_id or "",
            software=patient.pms_system or "",
            practiceId=patient.practice_id or "",
            firstName=patient.first_name,
            middleName=patient.middle_name,
            lastName=patient.last_name,
            birthdate=patient.birth_date.isoformat() if patient.birth_date else "",
            gender=_GENDER_WORDS[patient.sex],
        )
    if message.command is Command.VIEW_DATA:
        images = _element(root, "images", count=str(len(outcome.images)))
        for image in outcome.images:
            _element(
                images,
                "image",
                id=str(image.id),
                capturedAt=image.captured_at.isoformat() if image.captured_at else "",
                category=image.category.value,
                teeth=" ".join(str(t) for t in image.tooth_numbers),
                width=str(image.width),
                height=str(image.height),
                color="true" if image.color else "false",
                studyUid=image.study_uid,
                seriesUid=image.series_uid,
                thumbnail=thumbnail_urls.get(image.id, ""),
            )
    xml: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    return xml
